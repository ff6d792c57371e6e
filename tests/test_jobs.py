"""jobs/pipeline.py submitted with `ray job submit` semantics to a real `ray start --head` (token auth on),
logging to the real `mlflow server`; a failed submission, then a resubmission that continues where it stopped.

The head is this test's own: free loopback ports, its own temp dir, stopped by signalling only the processes
it started (never `ray stop`, which stops every Ray instance of the machine's user).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import services

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
WORKER_PORTS = 200
JOB_TIMEOUT = 420


# ------------------------------------------------------------------------------------- the head's processes


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()   # the command name may hold spaces and parentheses
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ours(head_pid: int, temp_dir: str) -> dict[int, int]:
    """pid -> start time of the head's descendants and of every process naming our temp dir.

    Descendants: gcs_server, raylet, dashboard, workers, job drivers (all below `ray start --block`). The temp
    dir: processes Ray re-parented (its cmdline is unique to this head: --temp-dir / --session-dir).
    """
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            procs[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [head_pid]
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    found |= {pid for pid in procs if temp_dir in _cmdline(pid)}
    found.discard(os.getpid())
    return {pid: procs[pid][1] for pid in found}


def _signal_same(procs: dict[int, int], sig: int) -> int:
    """Signal each recorded process that still runs with the same start time (never a recycled pid)."""
    alive = 0
    for pid, started in procs.items():
        st = _stat(pid)
        if st is not None and st[1] == started:
            alive += 1
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
    return alive


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """What `ray stop` would do, limited to this head: SIGTERM `ray start --block` (its shutdown hook stops
    the processes it started, the raylet stops its workers), then SIGTERM / SIGKILL whatever is left of the
    processes recorded before, each only if it is still the same process."""
    procs = _ours(head.pid, temp_dir)
    with contextlib.suppress(ProcessLookupError):
        head.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=30)
    procs.update(_ours(head.pid, temp_dir))     # anything started meanwhile
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + grace
        if not _signal_same(procs, sig):
            break
        while time.monotonic() < deadline and _signal_same(procs, 0):
            time.sleep(0.2)
    if head.poll() is None:
        head.kill()
        head.wait(timeout=5)


# ------------------------------------------------------------------------------------------------ fixtures


def _free_range(n: int) -> int:
    """First port of n consecutive ports that are free on 127.0.0.1 right now (for Ray's workers)."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 45000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


class Head:
    """`ray start --head --block` in the background; `ready()` waits for its job server."""

    def __init__(self, session_tmp: Path):
        self.temp_dir = str(session_tmp / f"rh{uuid.uuid4().hex[:4]}")   # short: socket paths are length-limited
        ports = {name: services.free_port() for name in (
            "port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port")}
        low = _free_range(WORKER_PORTS)
        cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               f"--object-store-memory={512 * 1024**2}", f"--min-worker-port={low}",
               f"--max-worker-port={low + WORKER_PORTS - 1}", *(f"--{k}={v}" for k, v in ports.items())]
        # no 30 s drain on SIGTERM (Ray 2.60 waits for Serve-style draining by default; nothing to drain here)
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.log_path = Path(self.temp_dir + ".log")
        with open(self.log_path, "wb") as log:       # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.url = f"http://127.0.0.1:{ports['dashboard-port']}"

    def ready(self, timeout: float = 180) -> str:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                JobSubmissionClient(self.url).list_jobs()
                return self.url
            except (ConnectionError, RuntimeError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


@pytest.fixture(scope="module")
def ray_head(session_tmp):
    """A real head with the job server, started in the background (tests call `.ready()`), so it boots
    while the other fixtures build models and data.

    Token auth: the session runs with RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN (conftest); Ray reads
    the token from RAY_AUTH_TOKEN first (docs: "Token Sources and Precedence"), so `ray start` and every
    process it starts use it, and the job client sends it as a bearer header. No token file is written.
    """
    assert os.environ.get("RAY_AUTH_MODE") == "token" and os.environ.get("RAY_AUTH_TOKEN")
    head = Head(session_tmp)
    try:
        yield head
    finally:
        stop_head(head.proc, head.temp_dir)


@pytest.fixture(scope="module")
def tiny_setup(small_data, tmp_path_factory):
    """The session's tiny models and small release (read only: the job ingests it into a dataset of its own)
    and a config with every path absolute (the job's working dir is Ray's copy of the repo, so relative paths
    would land there)."""
    root = tmp_path_factory.mktemp("jobs")
    cfg = {
        "data": {"name": "tiny", "dataset": str(root / "ds"), "ingest": {"format": "mimic", "input": small_data.raw}},
        "models": {"clip": small_data.models["clip"], "diffusion": small_data.models["stable-diffusion"]},
        "negatives": {"k": 4},
        "synthesize": {"views": 1, "steps": 1, "size": 16, "batch_size": 32, "num_gpus": 0},
        "features": {"text_length": 8, "batch_size": 64, "num_gpus": 0},
        "model": {"hidden": 16},
        # train.k > negatives.k: the first submission fails at the train stage (fixed with --set on resubmit)
        "train": {"num_workers": 1, "cpus_per_worker": 1, "batch_size": 32, "epochs": 1, "lr": 1e-3, "k": 6},
        "tracking": {"experiment": f"jobs-{uuid.uuid4().hex[:8]}", "storage": str(root / "runs")},
    }
    path = root / "cfg.yaml"
    path.write_text(json.dumps(cfg))   # JSON is YAML
    return root, path, cfg


def _submit(url: str, entrypoint: str, env: dict[str, str]) -> str:
    from ray.job_submission import JobSubmissionClient

    # what `ray job submit --working-dir <repo> -- python jobs/...` sends; sys.executable: the cluster's python
    deadline = time.monotonic() + 180
    while True:
        try:
            return JobSubmissionClient(url).submit_job(
                entrypoint=f"{sys.executable} {entrypoint}",
                runtime_env={"working_dir": str(ROOT), "env_vars": env})
        except RuntimeError as err:
            # the job server answers before the head's dashboard agent has registered (slow on a loaded machine):
            # a start-up wait, the same as `ready()`'s; any other refusal fails the test at once
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _wait(url: str, job_id: str, timeout: float = JOB_TIMEOUT) -> tuple[str, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return str(status.value), client.get_job_logs(job_id)
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            logs = client.get_job_logs(job_id)[-5000:]
            pytest.fail(f"job {job_id} still {status} after {timeout:.0f}s; logs:\n{logs}")
        time.sleep(2)


def test_pipeline_job_fails_readably_then_resumes_and_logs_to_mlflow(ray_head, tiny_setup, s3_server,
                                                                    mlflow_server):
    from mlflow.tracking import MlflowClient

    from mel_ray import pipeline
    from mel_ray.config import load_config

    root, cfg_path, cfg = tiny_setup
    url = ray_head.ready()
    env = {**services.s3_env(s3_server.url), "MLFLOW_TRACKING_URI": mlflow_server,
           "MEL_RAY_NODE_CACHE": str(root / "node-cache"), "PYTHONUNBUFFERED": "1"}
    pipeline_job = f"jobs/pipeline.py --config {cfg_path}"

    # a dataset that is not there: fails at once with one clear line (and no traceback)
    missing = _submit(url, f"jobs/mine_negatives.py --config {cfg_path} --set data.dataset={root / 'nope'}",
                      env)
    first = _submit(url, pipeline_job, env)
    status, logs = _wait(url, missing, timeout=180)
    assert status == "FAILED", logs[-3000:]
    expected = (f"error: {root / 'nope' / 'manifest.json'}: no manifest.json: not a mel-ray dataset, "
                "or an ingest that did not finish")
    assert [line for line in logs.splitlines() if line.startswith("error: ")] == [expected], logs[-3000:]
    assert "Traceback" not in logs

    # the first pipeline runs the data stages, then stops at train with the config's error
    status, logs = _wait(url, first)
    assert status == "FAILED", logs[-5000:]
    assert "[pipeline] extract_features: ran" in logs, logs[-5000:]
    assert "error: train.k = 6 is larger than the mined pool negatives.k = 4" in logs, logs[-5000:]

    # resubmitted with the fix: finished stages are skipped, training and evaluation run
    status, logs = _wait(url, _submit(url, f"{pipeline_job} --set train.k=2", env))
    assert status == "SUCCEEDED", logs[-5000:]
    for stage in ("ingest", "mine_negatives", "synthesize", "extract_features"):
        assert f"[pipeline] {stage}: skipped" in logs, logs[-5000:]
    assert "[pipeline] train: ran" in logs and "[pipeline] evaluate: ran" in logs, logs[-5000:]

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert {"dev_MRR", "test_MRR", "test_H_at_1", "loss_overall"} <= set(run.data.metrics)
    assert run.data.params["train.k"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "curves.png", "config.yaml", "eval_report.json", "eval_test.json"} <= artifacts

    # the features job finds the views by recomputing the synthesize key from the config: it must agree
    resolved = pipeline.resolve_paths(load_config(str(cfg_path)), root)
    assert [p.name for p in (root / "ds" / "synthetic").iterdir()] == [pipeline.synthetic_key(resolved)]


def test_token_auth_is_enforced(ray_head):
    url = ray_head.ready()
    with pytest.raises(urllib.error.HTTPError) as err:   # no bearer token: refused
        urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)


def test_job_output_is_redacted_with_verbose_too(tmp_path, capsys, monkeypatch):
    """A job prints through the same redacting streams as mel-ray's CLI: a secret (with "/") in anything the
    stage prints or logs never reaches the terminal, --verbose included."""
    import logging

    from mel_ray import console
    from mel_ray.jobs import run_job

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(console.VERBOSE, "0")   # recorded, so setup(verbose=True) setting it is undone
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  name: x\n")

    def secret_stage(cfg):
        print("reading s3://AKIA:wJalr/K7MD/bPxKEY@bucket/ds")
        # a library logger that propagates to the root (Ray's own hold the stderr of their import time)
        logging.getLogger("some_library.module").warning("retrying http://alice:pa/ss5LEAK@127.0.0.1:9/api")
        return {"ok": True}

    try:
        assert run_job(secret_stage, "A test job.", ["--config", str(config), "--verbose"]) == 0
    finally:
        console.reset()       # no handler on a stream that closes with this test
    out, err = capsys.readouterr()
    assert "reading s3://[redacted]@bucket/ds" in out and "http://[redacted]@127.0.0.1:9/api" in err
    assert not any(part in out + err for part in ("wJalr", "K7MD", "bPxKEY", "pa/ss", "ss5LEAK"))
