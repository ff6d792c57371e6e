"""The kill-and-resume tests' one tool: run something, wait for a sign of progress, SIGKILL it.

A kill test proves that a stage resumes from what a real crash leaves behind (no cleanup handlers, no
`finally`, writes cut mid-file). The four kill tests (features, synthesize, tune: the driver; train: one Ray
Train worker) differ only in what they start, what "far enough" means and what they kill:

    proc = run_and_kill(script, until=lambda: len(parts()) >= 3, env=env, log=log, timeout=120,
                        what="3 finished record parts")        # python -c script, its process group killed
    kill_when(until, victims=lambda: [pid], alive=thread.is_alive, timeout=600, what="...")   # any process

Waiting fails the test (with the tail of the process's log) when the process ends first or time runs out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tail(log: Path | None, chars: int = 3000) -> str:
    if log is None or not log.exists():
        return ""
    return "\n" + log.read_text(errors="replace")[-chars:]


def wait_until(until: Callable[[], bool], *, timeout: float, what: str, alive: Callable[[], bool] | None = None,
               log: Path | None = None, poll: float = 0.05) -> None:
    """Poll `until()` every `poll` s; fail if `alive()` turns false first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not until():
        if alive is not None and not alive():
            raise AssertionError(f"ended before {what}, so it could not be killed{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s{_tail(log)}")
        time.sleep(poll)


def kill_when(until: Callable[[], bool], victims: Callable[[], Iterable[int]], *, timeout: float, what: str,
              alive: Callable[[], bool] | None = None, log: Path | None = None, poll: float = 0.05) -> list[int]:
    """Wait until `until()` holds, then SIGKILL every pid `victims()` names (a negative pid is a process group,
    as in kill(2)); returns those pids. Fails when there is nothing to kill."""
    wait_until(until, timeout=timeout, what=what, alive=alive, log=log, poll=poll)
    pids = list(victims())
    assert pids, f"nothing to kill after {what}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def start(script: str, *, env: dict[str, str], log: Path, args: Sequence[str] = (),
          cwd: Path = ROOT) -> subprocess.Popen:
    """`python -c script *args` in a session of its own (so one killpg reaches it and everything it started), its
    output to `log` (a file, not a pipe: a full pipe would stall it)."""
    with open(log, "wb") as sink:
        return subprocess.Popen([sys.executable, "-c", script, *args], cwd=cwd, env=env, start_new_session=True,
                                stdout=sink, stderr=subprocess.STDOUT)


def run_and_kill(script: str, until: Callable[[], bool], *, env: dict[str, str], log: Path, timeout: float,
                 what: str, args: Sequence[str] = (), cwd: Path = ROOT, poll: float = 0.05) -> subprocess.Popen:
    """Start `python -c script *args`, SIGKILL its process group once `until()` holds, and return the reaped process
    (its returncode is -SIGKILL). Whatever fails on the way, nothing of it is left running."""
    proc = start(script, env=env, log=log, args=args, cwd=cwd)
    try:
        kill_when(until, lambda: [-proc.pid], timeout=timeout, what=what,
                  alive=lambda: proc.poll() is None, log=log, poll=poll)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return proc


def train_workers(token: str) -> list:
    """Live Ray Train worker processes of THIS test session's cluster (its auth token is unique)."""
    return actor_processes("RayTrainWorker", token)


def actor_processes(actor_class: str, token: str) -> list:
    """Live processes of a Ray actor class (`ray::<class>` in their command line) of THIS test session's cluster."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (proc.info["cmdline"] or [""])[0].startswith(f"ray::{actor_class}") and \
                    proc.environ().get("RAY_AUTH_TOKEN") == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
