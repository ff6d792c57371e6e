"""MLflow tracking with an embedded default.

Where runs go, in order: `tracking.mlflow_uri` from the config, else MLFLOW_TRACKING_URI, else an embedded
sqlite store `<workdir>/mlflow.db` with artifacts in `<workdir>/mlartifacts` (no server needed). Against an
`mlflow server`, artifacts go wherever the server puts them (e.g. `--artifacts-destination s3://...`);
`artifact_root` can point a new experiment's artifacts at any local path or s3:// URI instead.

Parameters are logged flat (`train.lr`), and anything that looks like a secret is redacted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mel_ray import storage
from mel_ray.errors import UsageError

logger = logging.getLogger(__name__)

REDACTED = "[redacted]"
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "pwd", "token", "credential",
                 "credentials", "apikey", "passphrase"}
_SECRET_PAIRS = ("access_key", "secret_key", "api_key", "private_key", "session_token", "auth_token")
_URI_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@\s]+)@")


def tracking_uri(cfg_uri: str | None, workdir: str | os.PathLike) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else the embedded `sqlite:///<workdir>/mlflow.db`."""
    if cfg_uri:
        return cfg_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if storage.is_s3(str(workdir)):
        raise UsageError(f"{workdir}: the embedded MLflow store needs a local work dir; set "
                         "tracking.mlflow_uri or MLFLOW_TRACKING_URI to use a tracking server")
    root = Path(workdir).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_root(uri: str) -> str | None:
    """`<dir of mlflow.db>/mlartifacts` for an embedded sqlite store; None (the server decides) otherwise."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").absolute().as_uri()
    return None


def _artifact_location(artifact_root: str) -> str:
    if "://" in artifact_root:
        return artifact_root.rstrip("/")
    return Path(artifact_root).expanduser().absolute().as_uri()


def ensure_experiment(experiment: str, uri: str, artifact_root: str | None = None) -> str:
    """Create the experiment if needed (with its artifact location) and return its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    existing = client.get_experiment_by_name(experiment)
    location = _artifact_location(artifact_root) if artifact_root else default_artifact_root(uri)
    if existing is not None:
        if artifact_root and existing.artifact_location.rstrip("/") != (location or "").rstrip("/"):
            logger.warning("experiment %r already stores artifacts in %s; keeping that location, not %s",
                           experiment, existing.artifact_location, location)
        return existing.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except Exception:  # created concurrently by another worker
        existing = client.get_experiment_by_name(experiment)
        if existing is None:
            raise
        return existing.experiment_id


@contextlib.contextmanager
def start_run(experiment: str, run_name: str | None, tracking_uri: str, artifact_root: str | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """`with start_run(...) as run:` an active MLflow run in `experiment` at `tracking_uri`.

    The run ends FINISHED, or FAILED if the block raises. The tracking URI is set process-wide (MLflow's
    fluent API has one active store), so `mlflow.log_metric` etc. inside the block go to this run.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(experiment, tracking_uri, artifact_root)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {})) as run:
        yield run


def is_secret_key(key: str) -> bool:
    """True for keys like `aws_secret_access_key`, `db.password`, `hfToken`, `api-key` (any segment)."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    joined = "_".join(words)
    return any(w in _SECRET_WORDS for w in words) or any(p in joined for p in _SECRET_PAIRS)


def _scrub_value(value: str) -> str:
    """Drop `user:password@` from URI-looking values."""
    return _URI_USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", value)


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (or pydantic models) to `{"a.b.c": value}`; lists stay values."""
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for key, value in dict(params).items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def safe_params(params: Any) -> dict[str, str]:
    """Flattened, stringified params with secret-looking keys redacted and URI passwords removed."""
    out: dict[str, str] = {}
    for key, value in flatten(params).items():
        if is_secret_key(key):
            out[key] = REDACTED
            continue
        text = _scrub_value(str(value))
        out[key] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return out


def log_params_flat(params: Any) -> dict[str, str]:
    """Log a nested config to the active run as dotted params (secrets redacted); returns what was logged."""
    import mlflow

    safe = safe_params(params)
    items = list(safe.items())
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        mlflow.log_params(dict(items[i:i + 100]))
    return safe
