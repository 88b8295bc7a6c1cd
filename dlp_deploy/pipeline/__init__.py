"""Sweeps (issue 26): plan a sweep's levels, run its steps (prune, streamline, recover, eval, export, bench) on an
executor, write results.json. Above report and bench (it writes what report reads and calls bench to measure);
below plan and the commands.

levels.py says what a sweep is (settings, levels, pairs, the checks before any work); steps.py does one step of
one level or one measured round; executors.py says where the steps run (this process, a Ray cluster); sweep.py
runs a sweep and writes run.json and results.json; replicate.py sets a run up to re-measure an earlier one."""
