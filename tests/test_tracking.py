"""MLflow tracking: a real `mlflow server` with artifacts in S3, and the embedded sqlite default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import services  # tests/services.py (conftest puts tests/ on sys.path)

from mel_ray import tracking
from mel_ray.errors import UsageError

CONFIG = {
    "train": {"lr": 1e-5, "batch_size": 128, "negatives": "both"},
    "data": {"dataset": "s3://bucket/wikidm", "merge": ["a", "b"]},
    "storage": {"aws_secret_access_key": "AKIAVERYSECRET1", "db_password": "hunter2-secret",
                "hfToken": "hf_secret_token_value", "api-key": "sk-secret", "tokenizer": "clip"},
    "tracking": {"mlflow_uri": "http://alice:pa55w0rd-secret@mlflow.internal:5000"},
}
SECRET_VALUES = ("AKIAVERYSECRET1", "hunter2-secret", "hf_secret_token_value", "sk-secret", "pa55w0rd-secret")


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1234")
    assert tracking.tracking_uri("http://cfg:1", tmp_path) == "http://cfg:1"
    assert tracking.tracking_uri(None, tmp_path) == "http://127.0.0.1:1234"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(None, tmp_path / "w") == f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}"
    assert (tmp_path / "w").is_dir()
    with pytest.raises(UsageError, match="local work dir"):
        tracking.tracking_uri(None, "s3://bucket/work")


def test_flatten_and_redaction():
    flat = tracking.flatten(CONFIG)
    assert flat["train.lr"] == 1e-5 and flat["data.merge"] == ["a", "b"]
    safe = tracking.safe_params(CONFIG)
    assert safe["train.lr"] == "1e-05" and safe["train.negatives"] == "both"
    for key in ("storage.aws_secret_access_key", "storage.db_password", "storage.hfToken", "storage.api-key"):
        assert safe[key] == tracking.REDACTED, key
    assert safe["storage.tokenizer"] == "clip"  # 'token' as a word only, not inside 'tokenizer'
    assert safe["tracking.mlflow_uri"] == f"http://{tracking.REDACTED}@mlflow.internal:5000"
    assert not any(s in v for v in safe.values() for s in SECRET_VALUES)
    for key in ("AWS_ACCESS_KEY_ID", "session_token", "credentials.file", "x.secret", "passwd"):
        assert tracking.is_secret_key(key), key
    for key in ("train.lr", "features.text_length", "max_tokens", "tokenizer_path", "models.clip"):
        assert not tracking.is_secret_key(key), key


def test_flatten_pydantic_config():
    from mel_ray.config import load_config

    safe = tracking.safe_params(load_config(None, ["train.lr=0.01"]))
    assert safe["train.lr"] == "0.01" and safe["models.clip"] == "openai/clip-vit-base-patch32"
    assert safe["tracking.mlflow_uri"] == "None"


def _run_with_artifact(uri: str, experiment: str, tmp_path: Path, artifact_root: str | None = None):
    import mlflow

    artifact = tmp_path / "metrics.json"
    artifact.write_text(json.dumps({"recall@1": 0.5}))
    with tracking.start_run(experiment, "unit", uri, artifact_root=artifact_root) as run:
        logged = tracking.log_params_flat(CONFIG)
        mlflow.log_metric("recall_at_1", 0.5, step=1)
        mlflow.log_artifact(str(artifact), artifact_path="eval")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.params == logged
    assert finished.data.params["train.lr"] == "1e-05"
    assert not any(s in v for v in finished.data.params.values() for s in SECRET_VALUES)
    assert finished.data.metrics["recall_at_1"] == 0.5
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval")] == ["eval/metrics.json"]
    return finished


def test_run_against_mlflow_server_lands_in_s3(mlflow_server, s3_client, tmp_path):
    run = _run_with_artifact(mlflow_server, "mel-ray-test-server", tmp_path)
    objects = s3_client.list_objects_v2(Bucket=services.MLFLOW_ARTIFACT_BUCKET).get("Contents", [])
    keys = [o["Key"] for o in objects if run.info.run_id in o["Key"]]
    assert any(k.endswith("eval/metrics.json") for k in keys), keys
    key = next(k for k in keys if k.endswith("eval/metrics.json"))
    body = s3_client.get_object(Bucket=services.MLFLOW_ARTIFACT_BUCKET, Key=key)["Body"].read()
    assert json.loads(body) == {"recall@1": 0.5}


def test_failed_block_marks_run_failed(mlflow_server):
    import mlflow

    with pytest.raises(RuntimeError), tracking.start_run("mel-ray-test-server", "boom", mlflow_server) as run:
        raise RuntimeError("training diverged")
    status = mlflow.tracking.MlflowClient(tracking_uri=mlflow_server).get_run(run.info.run_id).info.status
    assert status == "FAILED"


@pytest.fixture(scope="module")
def embedded_workdir(tmp_path_factory) -> Path:
    """One embedded store for the module: creating a fresh sqlite store costs seconds (schema migrations)."""
    return tmp_path_factory.mktemp("embedded") / "work"


def test_embedded_default_needs_no_server(embedded_workdir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri(None, embedded_workdir)
    assert uri == f"sqlite:///{embedded_workdir / 'mlflow.db'}"
    run = _run_with_artifact(uri, "mel-ray-embedded", tmp_path)
    assert (embedded_workdir / "mlflow.db").is_file()
    assert run.info.artifact_uri.startswith((embedded_workdir / "mlartifacts").as_uri())
    stored = [p for p in (embedded_workdir / "mlartifacts").rglob("metrics.json") if run.info.run_id in str(p)]
    assert len(stored) == 1


def test_embedded_store_with_s3_artifacts(embedded_workdir, tmp_path, s3_bucket, s3_client, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri(None, embedded_workdir)
    run = _run_with_artifact(uri, "mel-ray-embedded-s3", tmp_path, artifact_root=f"{s3_bucket}/mlflow")
    assert run.info.artifact_uri.startswith(f"{s3_bucket}/mlflow/")
    bucket = s3_bucket[len("s3://"):]
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert f"mlflow/{run.info.run_id}/artifacts/eval/metrics.json" in keys
