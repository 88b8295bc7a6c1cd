"""Sweeps (issue 26): plan a sweep's levels, run its steps (prune, streamline, recover, eval, export, bench) on an
executor, write results.json. Above report and bench (it writes what report reads and calls bench to measure);
below plan and the commands.

sweep.py runs a sweep and writes its results; executors.py says where its work runs (this process, a Ray
cluster); replicate.py sets a run up to re-measure an earlier one."""
