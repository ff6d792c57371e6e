"""MLflow tracking with an embedded default.

Where runs go, in order: `tracking.mlflow_uri` from the config, else MLFLOW_TRACKING_URI, else an embedded
sqlite store `<workdir>/mlflow.db` with artifacts in `<workdir>/mlartifacts` (no server needed). Against an
`mlflow server`, artifacts go wherever the server puts them (e.g. `--artifacts-destination s3://...`);
`artifact_root` can point a new experiment's artifacts at any local path or s3:// URI instead.

Parameters are logged flat (`train.lr`), and anything that looks like a secret is redacted: secret-looking keys
lose their value, and every value goes through `mel_ray.redact` (a `user:password@` in a URI, a signed URL's
`X-Amz-Signature=`); so do tags. The tracking URI itself is shown only as `display_uri(uri)`.

A tracking server that does not answer fails in bounded time: unless the user set them, MLflow's HTTP client
gets MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1 and MLFLOW_HTTP_REQUEST_TIMEOUT=30
(MLflow's own defaults, 7 retries with factor 2 and 120 s, wait about 4 minutes on a dead server), and the
failure is ONE line without credentials (`TrackingError`, exit code 1 like other service failures).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mel_ray import redact, storage
from mel_ray.errors import UsageError

logger = logging.getLogger(__name__)

REDACTED = redact.MASK
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "pwd", "token", "credential",
                 "credentials", "apikey", "passphrase"}
_SECRET_PAIRS = ("access_key", "secret_key", "api_key", "private_key", "session_token", "auth_token")
# bounded defaults for MLflow's HTTP client (see the module docstring); the user's own settings win
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(storage.StorageError):
    """The tracking server failed or did not answer; the message never holds credentials (exit code 1)."""


def bounded_http() -> None:
    """Set HTTP_DEFAULTS in os.environ where unset (Ray workers started later inherit them)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def display_uri(uri: str | None) -> str | None:
    """The tracking URI as it may be printed, logged or stored in a summary: credentials removed."""
    return None if uri is None else redact.uri(uri)


def _reason(err: BaseException) -> str:
    text = str(err)
    low = text.lower()
    if "connection refused" in low or "failed to establish a new connection" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '?')} s"
    if "name or service not known" in low or "nodename nor servname" in low or "name resolution" in low:
        return "host not found"
    if "invalid url" in low:   # requests' word for userinfo that holds "/", "?" or "#" (the host is lost)
        return "not a valid URL (percent-encode / ? # @ in a user name or password, e.g. / as %2F)"
    if re.search(r"error code 401\b", text) or "unauthorized" in low:
        return "401 unauthorized (check the credentials)"
    if re.search(r"error code 403\b", text) or "forbidden" in low:
        return "403 forbidden"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return redact.excerpt(first, 200).strip("'\"")


def describe_error(err: BaseException, uri: str | None = None) -> TrackingError | UsageError | None:
    """A one-line error for an MLflow / HTTP failure (None if `err` is neither); never shows credentials."""
    import sys

    # only look at the classes if their modules are loaded: an error from elsewhere must not import MLflow
    mlflow_exc = getattr(sys.modules.get("mlflow.exceptions"), "MlflowException", None)
    requests_exc = getattr(getattr(sys.modules.get("requests"), "exceptions", None), "RequestException", None)
    if mlflow_exc is not None and isinstance(err, mlflow_exc):
        code = getattr(err, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "ENDPOINT_NOT_FOUND"):
            return UsageError(redact.text(f"MLflow: {redact.excerpt(err.message, 300).strip(chr(39) + chr(34))}"))
    elif requests_exc is None or not isinstance(err, requests_exc):
        return None
    where = f" at {display_uri(uri)}" if uri else ""
    retries = (f"after {os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '?')} retries; "
               if uri is None or uri.startswith(("http://", "https://")) else "")
    return TrackingError(f"MLflow tracking{where}: {_reason(err)} ({retries}check tracking.mlflow_uri / "
                         "MLFLOW_TRACKING_URI)")


def tracking_uri(cfg_uri: str | None, workdir: str | os.PathLike) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else the embedded `sqlite:///<workdir>/mlflow.db`."""
    bounded_http()
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
    bounded_http()
    try:
        return _ensure_experiment(experiment, uri, artifact_root)
    except Exception as err:
        line = describe_error(err, uri)
        if line is None:
            raise
        raise line from None


def _ensure_experiment(experiment: str, uri: str, artifact_root: str | None) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    existing = client.get_experiment_by_name(experiment)
    location = _artifact_location(artifact_root) if artifact_root else default_artifact_root(uri)
    if existing is not None:
        if artifact_root and existing.artifact_location.rstrip("/") != (location or "").rstrip("/"):
            logger.warning("experiment %r already stores artifacts in %s; keeping that location, not %s",
                           experiment, redact.uri(existing.artifact_location), redact.uri(location))
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

    bounded_http()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment_id = ensure_experiment(experiment, tracking_uri, artifact_root)
        active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                  tags={k: redact.text(v) for k, v in (tags or {}).items()})
    except Exception as err:
        line = describe_error(err, tracking_uri)
        if line is None:
            raise
        raise line from None
    with active as run:
        yield run


def is_secret_key(key: str) -> bool:
    """True for keys like `aws_secret_access_key`, `db.password`, `hfToken`, `api-key` (any segment)."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    joined = "_".join(words)
    return any(w in _SECRET_WORDS for w in words) or any(p in joined for p in _SECRET_PAIRS)


def _scrub_value(value: str) -> str:
    """Drop `user:password@` and secret query values from URIs anywhere in the value."""
    return redact.text(value)


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
