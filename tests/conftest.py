"""Shared test setup: a hermetic environment and real servers (S3 via moto, `mlflow server`, local Ray).

Fixtures (all lazy: a test pays only for the servers it asks for):

* `s3_server` (session)   -> services.Server for moto on 127.0.0.1 (`.url` is the endpoint). While it is
                             up, AWS_ENDPOINT_URL[_S3], MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID /
                             AWS_SECRET_ACCESS_KEY=testing and AWS_REGION / AWS_DEFAULT_REGION=us-east-1
                             point every client (boto3, pyarrow, mel_ray.storage, MLflow) at it.
* `s3_bucket` (function)  -> "s3://<fresh bucket>" created for this test.
* `s3_client` (function)  -> a boto3 S3 client for the test server (to check objects behind our back).
* `mlflow_server` (session) -> tracking URI "http://127.0.0.1:PORT" of a real `mlflow server` process
                             (sqlite backend, artifacts proxied to s3://mlflow-artifacts on the moto server).
                             It is launched in the background as soon as collection shows that a selected
                             test needs it, so its ~10-15 s start overlaps with other tests.
* `ray_local` (session)   -> the RayContext of one shared local Ray instance (address="local", 2 CPUs,
                             the dashboard (State API) on a free loopback port, token authentication on,
                             temp dir under the session tmp dir).
                             It depends on `s3_server` so Ray workers inherit the S3 environment.
* `session_env` (session) -> a pytest.MonkeyPatch for environment changes that last the whole session.
* `session_tmp` (session) -> the session's private tmp dir (server and Ray logs).
* `tiny_models` (session) -> {"clip": path, "stable-diffusion": path}: mel_ray.tiny_models, built once.
* `small_data` (session)  -> SmallData: the tiny models, one generated MIMIC release (SMALL_DATA sizes) and
                             that release ingested, built once and shared by every test that needs "a small
                             dataset". Shared means read-only: every stage writes under its dataset
                             (negatives/, synthetic/, features/), so a test that runs one works on
                             `small_data.copy(folder)` or the `small_dataset` fixture (a fresh copy). The
                             session checks at its end that nobody wrote into the shared one.
* `small_dataset` (function) -> path (str) of a private copy of small_data.dataset under the test's tmp_path.

The whole session runs with: HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1, HF_HOME in a tmp dir, telemetry
off (Ray, MLflow, Hugging Face), MLFLOW_TRACKING_URI=sqlite in a tmp dir, RAY_AUTH_MODE=token with a random
per-session RAY_AUTH_TOKEN (so nothing writes ~/.ray/auth_token), RAY_ADDRESS unset and RAY_TMPDIR in the
session dir (a bare `ray.init()` never finds a cluster started outside the tests), real AWS credentials
and profiles removed, and S3 pointed at a closed 127.0.0.1 port until `s3_server` starts (a test that
forgets the fixture fails fast instead of reaching the internet).
Set MEL_RAY_KEEP_TEST_TMP=1 to keep the session dir (server logs, Ray logs) after the run, and
MEL_RAY_TEST_PRESTART=0 to start `mlflow server` only when the first test asks for it.
Servers are tests/services.py's; never call `ray stop` in a test (it kills every Ray process of the user).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import services` works in every import mode
import services

# Environment for the whole session, set before any test module is imported.
_SESSION_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GIT_PYTHON_REFRESH": "quiet",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    # S3: nothing real, nothing remote. s3_server() replaces the endpoint with the moto server.
    "AWS_ACCESS_KEY_ID": services.S3_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": services.S3_SECRET_KEY,
    "AWS_DEFAULT_REGION": services.S3_REGION,
    "AWS_REGION": services.S3_REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
    "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9",
}
_SESSION_UNSET = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                  "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                  "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                  "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class _Services:
    """Servers of this test session, started on first use and stopped at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.s3: services.Server | None = None
        self.mlflow: services.Server | None = None
        self.timings: dict[str, float] = {}

    def get_s3(self) -> services.Server:
        if self.s3 is None:
            self.s3 = services.start_s3_server(self.root / "s3")
            self.timings["moto S3 server"] = self.s3.startup_seconds or 0.0
        return self.s3

    def launch_mlflow(self) -> None:
        if self.mlflow is None:
            self.mlflow = services.start_mlflow_server(self.root / "mlflow", self.get_s3())

    def get_mlflow(self) -> services.Server:
        self.launch_mlflow()
        assert self.mlflow is not None
        self.mlflow.wait_ready(timeout=90)
        self.timings["mlflow server"] = self.mlflow.startup_seconds or 0.0
        return self.mlflow

    def stop(self) -> None:
        for server in (self.mlflow, self.s3):
            if server is not None:
                server.stop()


_STATE: dict = {}


def pytest_configure(config: pytest.Config) -> None:
    root = Path(tempfile.mkdtemp(prefix="melray-"))
    env = pytest.MonkeyPatch()
    for key, value in _SESSION_ENV.items():
        env.setenv(key, value)
    for key in _SESSION_UNSET:
        env.delenv(key, raising=False)
    env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))  # same format as `ray get-auth-token --generate`
    env.setenv("RAY_TMPDIR", str(root))  # Ray's default temp dir <root>/ray: no attaching to a developer's cluster
    env.setenv("HF_HOME", str(root / "hf"))
    env.setenv("AWS_CONFIG_FILE", str(root / "aws" / "config"))                 # never read ~/.aws
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(root / "aws" / "credentials"))
    (root / "mlflow-default").mkdir()
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow-default' / 'mlflow.db'}")
    _STATE.update(root=root, env=env, services=_Services(root))


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Launch `mlflow server` early (it takes seconds to import) when a selected test will need it."""
    if os.environ.get("MEL_RAY_TEST_PRESTART", "1") == "0" or config.option.collectonly:
        return
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in items):
        _STATE["services"].launch_mlflow()


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _STATE:
        return
    try:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    finally:
        _STATE["services"].stop()
        _STATE["env"].undo()
        if os.environ.get("MEL_RAY_KEEP_TEST_TMP") != "1":
            shutil.rmtree(_STATE["root"], ignore_errors=True)
        _STATE.clear()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    timings = _STATE.get("services").timings if _STATE else {}
    if timings:
        line = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
        terminalreporter.write_line(f"server startup: {line}")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _console_routing_stays_in_its_test():
    """`console.setup(verbose=True)` sets MEL_RAY_VERBOSE for subprocesses, and setup() adds root handlers on the
    streams of this test's capture: left behind, every later test (and the commands they start) would run verbose
    and log into a closed stream. Whatever a test did, the next one starts as the session did."""
    from mel_ray import console

    before = os.environ.get(console.VERBOSE)
    yield
    console.reset()
    if before is None:
        os.environ.pop(console.VERBOSE, None)
    else:
        os.environ[console.VERBOSE] = before


@pytest.fixture(scope="session")
def session_env():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    """The session's private tmp dir (server logs live here)."""
    return _STATE["root"]


@pytest.fixture(scope="session")
def s3_server(session_env):
    server = _STATE["services"].get_s3()
    for key, value in services.s3_env(server.url).items():
        session_env.setenv(key, value)
    return server


@pytest.fixture
def s3_client(s3_server):
    return services.s3_client(s3_server.url)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    bucket = f"t-{uuid.uuid4().hex[:20]}"
    services.create_bucket(s3_server.url, bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def mlflow_server(s3_server) -> str:
    return _STATE["services"].get_mlflow().url


@pytest.fixture(scope="session")
def ray_local(s3_server):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    started = time.monotonic()
    context = ray.init(
        address="local",             # never attach to another cluster on this machine (`ray start`)
        num_cpus=2,
        # as runtime.init_ray: the dashboard serves the State API, without which Ray Train's PlacementGroupCleaner
        # logs "Failed to query Ray Train Controller actor state" every second after a training ends (forwarded
        # here, such lines once landed in another test's captured stderr) and cannot release a dead run's group
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=services.free_port(),
        object_store_memory=1024**3,
        _temp_dir=str(_STATE["root"] / "ray"),
        log_to_driver=True,
    )
    _STATE["services"].timings["ray.init"] = time.monotonic() - started
    yield context
    ray.shutdown()


# ------------------------------------------------------------------------------- the shared small dataset

# One size for every test that just needs "a small dataset with images, ambiguous names and all three splits":
# 60 entities (enough for top-10 links and k=4 mined negatives), 90 mentions (63 / 9 / 18 train / dev / test).
SMALL_DATA = {"n_entities": 60, "n_mentions": 90, "seed": 0}
SMALL_NAME = "small"


@dataclass
class SmallData:
    """The session's small data, all read-only: copy before running a stage on it."""

    root: Path
    models: dict[str, str]          # {"clip": path, "stable-diffusion": path}
    raw: str                        # the generated MIMIC-format release (make_demo_data)
    dataset: str                    # raw ingested ("mimic", name SMALL_NAME, default options)
    name: str = SMALL_NAME
    stats: dict = field(default_factory=dict)

    def copy(self, folder: Path | str) -> str:
        """A private copy of the dataset (images included) at FOLDER/ds; returns its path."""
        dest = Path(folder) / "ds"
        shutil.copytree(self.dataset, dest)
        return str(dest)


def _snapshot(folder: str) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from mel_ray.tiny_models import make_tiny_models

    return make_tiny_models(str(tmp_path_factory.mktemp("tiny-models")))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, tiny_models):
    from mel_ray.config import IngestConfig
    from mel_ray.demo_data import make_demo_data
    from mel_ray.ingest import ingest

    root = tmp_path_factory.mktemp("small-data")
    stats = make_demo_data(str(root / "raw"), **SMALL_DATA)
    ingest("mimic", str(root / "raw"), str(root / "ds"), name=SMALL_NAME, options=IngestConfig())
    data = SmallData(root=root, models=tiny_models, raw=str(root / "raw"), dataset=str(root / "ds"), stats=stats)
    before = {folder: _snapshot(folder) for folder in (data.raw, data.dataset, *tiny_models.values())}
    yield data
    changed = [folder for folder, files in before.items() if _snapshot(folder) != files]
    assert not changed, f"a test wrote into the shared small data (use small_data.copy()): {changed}"


@pytest.fixture
def small_dataset(small_data, tmp_path) -> str:
    return small_data.copy(tmp_path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """Path of a tiny BertModel + BertTokenizer folder (mel_ray.tiny_models.build_tiny_bert): models.text_encoder."""
    from mel_ray.tiny_models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "bert", seed=0)
