"""Training on Ray Train with 2 workers, MLflow records, and exact sharded evaluation vs brute force."""

from __future__ import annotations

import math
import os
import uuid

import numpy as np
import pytest
import torch
from killing import kill_when, train_workers

from mel_ray.checkpoints import build_model, load_checkpoint
from mel_ray.config import load_config
from mel_ray.eval.evaluate import evaluate
from mel_ray.feature_store import EntityStore, mention_tensors

pytestmark = pytest.mark.slow

# MIMIC's optimizer (AdamW betas / eps / weight decay, no clipping) as the paper configs set it; a global batch
# of 16 over 2 workers
TRAIN = ["train.negatives=in_batch", "train.epochs=2", "train.batch_size=16", "train.num_workers=2",
         "train.cpus_per_worker=0.5", "train.lr=1e-3", "train.adam_betas=[0.9, 0.999]", "train.adam_eps=1e-4",
         "train.weight_decay=1e-4", "train.grad_clip=null", "model.hidden=16", "tracking.experiment=t"]


@pytest.fixture(scope="module")
def prepared(small_data, tmp_path_factory, ray_local):
    from mel_ray.config import FeaturesConfig
    from mel_ray.features import extract_features

    root = tmp_path_factory.mktemp("train")
    ds = small_data.copy(root)                  # the features are written into the dataset
    features = extract_features(ds, small_data.models["clip"], FeaturesConfig(num_gpus=0), engine="local",
                                quiet=True)
    return root, features["uri"]


@pytest.fixture(scope="module")
def trained(prepared, s3_server, mlflow_server):
    """Ray Train's storage_path on the S3 test server; MLflow on the real server (artifacts on S3 too)."""
    import services

    from mel_ray.train.run import train

    root, features = prepared
    bucket = f"train-{uuid.uuid4().hex[:12]}"
    services.create_bucket(s3_server.url, bucket)
    cfg = load_config(None, [*TRAIN, f"tracking.mlflow_uri={mlflow_server}"])
    result = train(cfg, str(root / "ds"), features_uri=features, storage_path=f"s3://{bucket}/runs",
                   run_name="t", tracking_dir=str(root))
    return root, features, result, bucket


def test_training_reports_every_epoch_and_logs_to_mlflow(trained, s3_client):
    import mlflow

    root, _, result, bucket = trained
    # checkpoints live in the bucket (RunConfig storage_path=s3://...), and the best one is a folder there
    assert result["checkpoint"].startswith(f"s3://{bucket}/runs/t/checkpoint_"), result["checkpoint"]
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="runs/t/").get("Contents", [])]
    assert any(k.endswith("/state.pt") for k in keys), keys[:20]
    assert result["tracking_uri"].startswith("http://127.0.0.1:")
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    # train.batch_size is the global batch: each of the 2 workers steps through its equal half 8 mentions at a time
    n_train = len(mention_tensors(trained[1], str(root / "ds"), "train")["gold"])
    assert result["history"][0]["steps"] == math.ceil(n_train // 2 / 8), n_train
    assert all(np.isfinite(h["loss_overall"]) and "dev_MRR" in h for h in result["history"])
    client = mlflow.tracking.MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.data.params["train.epochs"] == "2" and "dev_H_at_1" in run.data.metrics
    params = run.data.params
    assert (params["train.adam_eps"], params["train.adam_betas"], params["train.grad_clip"]) == \
        ("0.0001", "[0.9, 0.999]", "None")
    assert len(client.get_metric_history(result["run_id"], "loss_overall")) == 2
    names = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"config.yaml", "model.pt", "eval_report.json", "curves.png"} <= names
    local = client.download_artifacts(result["run_id"], "model.pt", str(root))
    saved = torch.load(local, weights_only=True)
    assert {"state_dict", "dims", "config"} <= set(saved)


def test_sharded_evaluation_equals_brute_force(trained):
    root, features, result, _ = trained
    state = load_checkpoint(result["checkpoint"])
    report = evaluate(str(root / "ds"), features, result["checkpoint"], "test", num_shards=3, batch_size=16,
                      entity_chunk=7, mention_batch=5, cpus_per_shard=0.5)
    model = build_model(state)
    store = EntityStore(features)
    mentions = mention_tensors(features, str(root / "ds"), "test")
    with torch.no_grad():
        scores = model({k: v for k, v in mentions.items() if isinstance(v, torch.Tensor)},
                       store.chunk(0, store.num_entities))["overall"].numpy()
    order = np.argsort(-scores, axis=1, kind="stable")
    gold = mentions["gold"].numpy()
    ranks = np.array([1 + int(np.where(order[i] == gold[i])[0][0]) for i in range(len(gold))])
    from mel_ray.scoring import metrics_from_ranks

    expected = metrics_from_ranks(ranks)
    for key, value in expected.items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert report["entities"] == store.num_entities
    assert report["shards"] == 3



def test_killed_worker_resumes_from_the_last_checkpoint(prepared, trained):
    """SIGKILL one training worker mid-epoch: the run restarts from its checkpoint and still finishes."""
    import threading

    from mel_ray.train.run import train

    root, features = prepared
    cfg = load_config(None, [*TRAIN, "train.max_failures=2"])
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=train(
        cfg, str(root / "ds"), features_uri=features, storage_path=str(root / "runs-kill"), run_name="kill",
        tracking_dir=str(root))))
    runner.start()
    snapshot = root / "runs-kill" / "kill" / "checkpoint_manager_snapshot.json"

    def checkpoint_registered() -> bool:       # the snapshot is written once Ray has REGISTERED a checkpoint
        return snapshot.exists() and "checkpoint_" in snapshot.read_text()

    # a real process kill of one training worker, mid-way through epoch 2
    kill_when(checkpoint_registered, lambda: [w.pid for w in train_workers(os.environ["RAY_AUTH_TOKEN"])][:1],
              alive=runner.is_alive, timeout=600, poll=0.5, what="registered checkpoint")
    runner.join(timeout=900)
    assert not runner.is_alive()
    history = outcome["result"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]  # epoch 1 was not trained again
    assert history[0]["restarts"] == 0 and history[1]["restarts"] == 1   # epoch 2 ran after a restart
    uninterrupted = trained[2]["history"][-1]["dev_MRR"]
    assert abs(history[-1]["dev_MRR"] - uninterrupted) < 0.15


def test_a_finished_run_is_trained_again_for_another_tracking_store_only(prepared, mlflow_server, tmp_path):
    """The skip considers where tracking goes: a run finished in one MLflow store is not 'already trained' for
    another (whose users would never see it); the same store with other credentials is the same store, and the
    marker beside the checkpoints never holds the credentials."""
    from mlflow.tracking import MlflowClient

    from mel_ray import pipeline

    root, features = prepared
    dataset = str(root / "ds")
    one_epoch = [*TRAIN, "train.epochs=1", f"tracking.storage={tmp_path / 'runs'}"]
    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = load_config(None, [*one_epoch, f"tracking.mlflow_uri={sqlite}"])
    first = pipeline.train_model(pipeline.resolve_paths(local, tmp_path), dataset, features, tmp_path)
    again = pipeline.train_model(pipeline.resolve_paths(local, tmp_path), dataset, features, tmp_path)
    assert first.ran and not again.ran and again.value["run_id"] == first.value["run_id"]
    assert again.note == f"already trained: MLflow run {first.value['run_id']} at {sqlite}"

    server = load_config(None, [*one_epoch, "tracking.mlflow_uri=" + mlflow_server.replace("//", "//alice:S3CRET@")])
    moved = pipeline.train_model(pipeline.resolve_paths(server, tmp_path), dataset, features, tmp_path)
    assert moved.ran and moved.value["run_id"] != first.value["run_id"]
    assert MlflowClient(mlflow_server).get_run(moved.value["run_id"]).info.status == "FINISHED"
    markers = list((tmp_path / "runs").rglob(pipeline.TRAIN_MARKER))
    assert len(markers) == 2 and not any("S3CRET" in m.read_text() for m in markers)

    new_password = load_config(None, [*one_epoch, "tracking.mlflow_uri=" + mlflow_server.replace("//", "//bob:x@")])
    same_store = pipeline.train_model(pipeline.resolve_paths(new_password, tmp_path), dataset, features, tmp_path)
    assert not same_store.ran and same_store.value["run_id"] == moved.value["run_id"]
    assert same_store.value["tracking_uri"] == mlflow_server.replace("//", "//bob:x@")   # the live URI, to log to
