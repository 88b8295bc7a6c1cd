"""Engine work in a worker process, so that an engine that crashes (a native segfault), hangs or is killed for
memory ends its worker and never the toolkit.

Every engine compile and run goes through `run_in_worker`: export validation, `eval --engine`, `generate` and each
benchmark pair. The worker (`python -m dlp_deploy.runtime.worker`, its request as JSON on stdin) runs one task of
TASKS and answers in JSON lines on its stdout: events while it works (a generated token, progress), then its result
or a user error. Whatever native libraries print goes to stderr, so it cannot break those lines.
"""
from __future__ import annotations

import collections
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from ..errors import UserError

# name -> "module:function"; a task is function(args: dict, emit: Callable[[dict], None]) -> a JSON-able result
TASKS = {
    "bench": "dlp_deploy.bench.harness:bench_task",
    "validate": "dlp_deploy.export.deployment:validation_task",
    "eval": "dlp_deploy.eval.evaluate:deployment_perplexity_task",
    "generate": "dlp_deploy.runtime.decode:generate_task",
    "plan-ppl": "dlp_deploy.plan.stages:validation_perplexity_task",
}
FAULT_ENV = "DLP_DEPLOY_FAULT"
_FAULT_SIGNALS = {"crash": signal.SIGSEGV, "kill": signal.SIGKILL}
# DeepSparse installs its own handler for fatal signals: it prints this line and a native stack trace, then exits 1
# instead of dying by the signal, so the signal is read off stderr
_HANDLED_SIGNAL = re.compile(r"Received signal: ([^(\n]+?)\s*(?:\(|$)", re.M)
_SIGNAL_BY_DESCRIPTION = {signal.strsignal(s): s for s in signal.Signals if signal.strsignal(s)}
_STDERR_LINES_KEPT = 2000


class EngineFailure(UserError):
    """An engine's worker ended without an answer: killed by a signal (a crash, or the kernel's out-of-memory
    killer) or by its time limit. `record` is what a results file keeps of it beside the message: how it failed
    (crashed, killed, timed out), the signal's name and the time limit."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


class EngineTimeout(EngineFailure):
    """The worker was still running at its time limit and has been killed (an engine's compiler can hang)."""


def workaround(engine: str, avoid: str) -> str:
    """What a user can do about an engine that fails on a graph; `avoid` says how to do without it."""
    if engine == "deepsparse":
        return ("run DeepSparse with the KV cache in Python instead (engine deepsparse-external, --external-cache "
                f"in bench and sweep), or {avoid}")
    return avoid


def run_in_worker(task: str, args: dict, engine: str, label: str, during: str, timeout: float | None = None,
                  on_event: Callable[[dict], None] | None = None, hint: str | None = None):
    """Run TASKS[task](args) in a fresh interpreter and return its result. A UserError there is raised here as
    one; a worker killed by a signal raises EngineFailure, one still running after `timeout` seconds is killed and
    raises EngineTimeout (their messages name `engine`, `label` and `during`, then `hint`)."""
    request = json.dumps({"task": task, "args": args, "engine": engine, "label": label})
    proc = subprocess.Popen([sys.executable, "-m", "dlp_deploy.runtime.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
    stderr = collections.deque(maxlen=_STDERR_LINES_KEPT)
    drain = threading.Thread(target=stderr.extend, args=(proc.stderr,), daemon=True)
    drain.start()
    expired = threading.Event()
    timer = threading.Timer(timeout, lambda: (expired.set(), proc.kill())) if timeout else None
    answer: dict = {}
    try:
        if timer:
            timer.start()
        proc.stdin.write(request)
        proc.stdin.close()
        for line in proc.stdout:
            message = json.loads(line)
            if "event" in message:
                if on_event:
                    on_event(message["event"])
            else:
                answer = message
        proc.wait()
    finally:  # an interrupt, or an error in on_event, must not leave the worker running
        if timer:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        drain.join(timeout=10)
    return _outcome(proc.returncode, answer, "".join(stderr), expired.is_set(),
                    _Context(engine, label, during, timeout, hint))


class _Context:
    def __init__(self, engine: str, label: str, during: str, timeout: float | None, hint: str | None):
        self.engine, self.label, self.during, self.timeout, self.hint = engine, label, during, timeout, hint

    def message(self, what: str) -> str:
        return f"{what}{'; ' + self.hint if self.hint else ''}"


def _outcome(returncode: int, answer: dict, stderr: str, expired: bool, c: _Context):
    if returncode == 0 and "result" in answer:  # a limit reached just after the answer changes nothing
        return answer["result"]
    if expired:
        raise EngineTimeout(c.message(f"{c.label} on {c.engine} did not finish in {c.timeout:g} s ({c.during}; "
                                      "the worker was killed)"),
                            {"failed": "timed out", "signal": None, "timeout_s": c.timeout})
    if "error" in answer:
        raise UserError(answer["error"])
    signum = fatal_signal(returncode, stderr)
    if signum == signal.SIGKILL:
        raise EngineFailure(c.message(f"{c.engine} was killed (SIGKILL) on {c.label} ({c.during}), as the kernel's "
                                      "out-of-memory killer does when memory runs out"),
                            {"failed": "killed", "signal": "SIGKILL", "timeout_s": None})
    if signum is not None:
        raise EngineFailure(c.message(f"{c.engine} crashed with {signum.name} ({signal.strsignal(signum)}) on "
                                      f"{c.label} ({c.during})"),
                            {"failed": "crashed", "signal": signum.name, "timeout_s": None})
    tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
    raise RuntimeError(f"{c.engine} worker for {c.label} failed (exit {returncode}): {tail}")


def fatal_signal(returncode: int, stderr: str) -> signal.Signals | None:
    """The signal that ended a worker: the one it died by, or the one DeepSparse's handler reported before it
    exited; None when it ended by itself."""
    if returncode < 0:
        return signal.Signals(-returncode)
    found = _HANDLED_SIGNAL.search(stderr) if returncode != 0 else None
    return _SIGNAL_BY_DESCRIPTION.get(found.group(1)) if found else None


# ---------------------------------------------------------------- the worker's side

def inject_fault(label: str, engine: str) -> None:
    """Test hook: DLP_DEPLOY_FAULT="hang:NAME" makes a worker hang, as DeepSparse's compiler has on 21- and
    22-layer graphs; "crash:NAME" makes it die of SIGSEGV before it compiles, as DeepSparse's internal cache does
    on Gemma-3-270M; "kill:NAME" of SIGKILL, as the kernel's out-of-memory killer would. NAME is the deployment's
    folder name or the engine; entries are comma-separated."""
    for one in os.environ.get(FAULT_ENV, "").split(","):
        kind, _, name = one.strip().partition(":")
        if name not in (label, engine):
            continue
        if kind == "hang":
            time.sleep(24 * 3600)
        elif kind in _FAULT_SIGNALS:
            os.kill(os.getpid(), _FAULT_SIGNALS[kind])


class ProgressEvents:
    """A progress bar's add_task/advance, sent to the parent as events (replay_progress shows them there)."""

    def __init__(self, emit: Callable[[dict], None]):
        self.emit = emit

    def add_task(self, label: str, total: int | None = None) -> str:
        self.emit({"progress": label, "total": total})
        return label

    def advance(self, task: str) -> None:
        self.emit({"advance": task})


def replay_progress(progress) -> Callable[[dict], None]:
    """on_event for run_in_worker: a worker's ProgressEvents on this process's progress bar (or nowhere)."""
    tasks: dict[str, object] = {}

    def on_event(event: dict) -> None:
        if progress is None:
            return
        if "progress" in event:
            tasks[event["progress"]] = progress.add_task(event["progress"], total=event["total"])
        elif "advance" in event:
            progress.advance(tasks[event["advance"]])

    return on_event


def _answer_channel():
    """A private copy of stdout for the answers; stdout itself then points at stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return channel


def main() -> None:
    channel = _answer_channel()
    request = json.loads(sys.stdin.read())
    inject_fault(request["label"], request["engine"])
    module, _, name = TASKS[request["task"]].partition(":")
    task = getattr(importlib.import_module(module), name)

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    try:
        result = task(request["args"], lambda event: send({"event": event}))
    except UserError as exc:
        send({"error": str(exc)})
        sys.exit(2)
    send({"result": result})


if __name__ == "__main__":
    main()
