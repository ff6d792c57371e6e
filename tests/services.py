"""Start and stop the real servers the tests run against: an S3-protocol server (moto) and `mlflow server`.

Everything binds to 127.0.0.1 on a free port. Servers run as separate processes in their own session
(process group) and die with the test process: `stop()` signals the whole group, and on Linux the child
also gets SIGTERM from the kernel if pytest itself dies (PR_SET_PDEATHSIG), so no orphan keeps a port.

Used by tests/conftest.py; usable on its own, e.g. from a benchmark script:

    s3 = start_s3_server(workdir)
    mlflow = start_mlflow_server(workdir, s3)   # returns at once; .wait_ready() blocks until /health answers
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"
S3_REGION = "us-east-1"
MLFLOW_ARTIFACT_BUCKET = "mlflow-artifacts"

_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Server:
    name: str
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    health_path: str = "/"
    started_at: float = field(default_factory=time.monotonic)
    startup_seconds: float | None = None
    _ready: threading.Event = field(default_factory=threading.Event, repr=False)
    _watcher: threading.Thread | None = field(default=None, repr=False)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.health_path, timeout=2) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError:
            return True  # it answers HTTP: ready
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def watch(self) -> Server:
        """Poll in a background thread, so `startup_seconds` is exact even if nobody waits yet."""
        if self._watcher is None:
            def poll() -> None:
                while self.alive() and not self._answers():
                    time.sleep(0.1)
                if self.alive():
                    self.startup_seconds = time.monotonic() - self.started_at
                self._ready.set()

            self._watcher = threading.Thread(target=poll, name=f"watch-{self.name}", daemon=True)
            self._watcher.start()
        return self

    def wait_ready(self, timeout: float = 60.0) -> Server:
        """Block until the server answers HTTP on its health path; raise with the log tail otherwise."""
        self.watch()
        self._ready.wait(max(0.0, self.started_at + timeout - time.monotonic()))
        if self.startup_seconds is not None:
            return self
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was "
                               f"ready; log {self.log_path}:\n{self.log_tail()}")
        self.stop()
        raise RuntimeError(f"{self.name} did not answer on {self.url} within {timeout:.0f}s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after `timeout` seconds."""
        if self.proc.poll() is not None and not _group_alive(self.proc.pid):
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not _group_alive(self.proc.pid):
                    return
                time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _spawn(name: str, cmd: list[str], env: dict[str, str], workdir: Path, port: int,
           health_path: str) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        # preexec_fn only calls prctl; Popen is always called from the main thread here
        proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)  # noqa: PLW1509
    return Server(name=name, url=f"http://127.0.0.1:{port}", port=port, proc=proc, log_path=log_path,
                  health_path=health_path)


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment that points boto3, pyarrow, MLflow and mel_ray.storage at the test S3 server."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_REGION": S3_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def start_s3_server(workdir: Path, attempts: int = 3, timeout: float = 30.0) -> Server:
    """moto in server mode, in its own process, on a free 127.0.0.1 port; returns once it answers."""
    last: Exception | None = None
    for _ in range(attempts):  # a port picked by free_port() can be taken by someone else meanwhile
        port = free_port()
        env = {**os.environ, **s3_env(f"http://127.0.0.1:{port}")}
        server = _spawn("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                        env, workdir, port, health_path="/moto-api/")
        try:
            return server.wait_ready(timeout)
        except RuntimeError as err:
            server.stop()
            last = err
    raise RuntimeError(f"could not start the S3 test server: {last}")


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ACCESS_KEY,
                        aws_secret_access_key=S3_SECRET_KEY, region_name=S3_REGION)


def create_bucket(endpoint: str, bucket: str) -> None:
    client = s3_client(endpoint)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)


def start_mlflow_server(workdir: Path, s3: Server, port: int | None = None) -> Server:
    """`mlflow server` with a sqlite backend and proxied artifacts in s3://mlflow-artifacts on `s3`.

    Returns as soon as the process is started (startup takes ~10-15 s on 2 cores, mostly imports);
    call `.wait_ready()` before use. Job execution (a pool of huey consumer processes MLflow 3 starts
    by default) is switched off: the tests don't use it and it doubles startup time.
    """
    create_bucket(s3.url, MLFLOW_ARTIFACT_BUCKET)
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **s3_env(s3.url),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{MLFLOW_ARTIFACT_BUCKET}", "--serve-artifacts",
           "--workers", "1"]
    return _spawn("mlflow", cmd, env, workdir, port, health_path="/health").watch()
