"""`mel-ray tune`: a k x n_s grid of distributed training trials, MLflow parent/child runs with the ablation table,
heatmaps and best model, and an interrupted sweep (the driver SIGKILLed) resumed with Tuner.restore."""

from __future__ import annotations

import glob
import os
import textwrap
from pathlib import Path

import pytest
from killing import run_and_kill
from test_features import make_synthetic  # the synthesize stage's output contract, written by hand

from mel_ray.config import load_config
from mel_ray.errors import UsageError

pytestmark = pytest.mark.slow
SWEEP = ["tune.name=t", "tune.k=[2,4]", "tune.views=[2]", "tune.max_concurrent_trials=1",
         "tune.train={epochs: 1, num_workers: 2, cpus_per_worker: 0.45}",
         "train.negatives=jaccard", "train.epochs=5", "train.batch_size=16", "train.lr=1e-3",
         "model.hidden=16", "negatives.k=4", "tracking.experiment=tune-test"]


@pytest.fixture(scope="module")
def prepared(small_data, tmp_path_factory, ray_local):
    from mel_ray.config import FeaturesConfig
    from mel_ray.features import extract_features
    from mel_ray.negatives import mine_negatives

    root = tmp_path_factory.mktemp("tune")
    ds = small_data.copy(root)          # negatives, views and features are written into the dataset
    mine_negatives(ds, k=4, num_workers=0)
    make_synthetic(ds, key="views", n_s=2)
    features = extract_features(ds, small_data.models["clip"], FeaturesConfig(num_gpus=0), synthetic_key="views",
                                engine="local",
                                quiet=True)["uri"]
    return root, ds, features


def _children(client, experiment: str, parent: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'") if exp else []


def test_sweep_inputs_are_checked(prepared, monkeypatch):
    from mel_ray.runtime import AUTOSCALING
    from mel_ray.tune.sweep import _check_resources, run_sweep

    root, ds, features = prepared
    with pytest.raises(UsageError, match="features hold 2 synthetic views"):
        run_sweep(load_config(None, [*SWEEP, "tune.views=[3]"]), ds, features_uri=features,
                  storage_path=str(root / "bad"), tracking_dir=str(root / "bad"))
    with pytest.raises(UsageError, match="negatives.k >= that"):
        run_sweep(load_config(None, [*SWEEP, "tune.k=[6]"]), ds, features_uri=features,
                  storage_path=str(root / "bad"), tracking_dir=str(root / "bad"))
    # 2 workers x 0.5 CPU + the trial's driver would leave Ray Data's file listing no whole CPU (a deadlock)
    tight = load_config(None, [*SWEEP, "tune.train={cpus_per_worker: 0.5}"])
    with pytest.raises(UsageError, match="one whole CPU"):
        run_sweep(tight, ds, features_uri=features, storage_path=str(root / "bad"), tracking_dir=str(root / "bad"))
    monkeypatch.setenv(AUTOSCALING, "1")     # a cluster that grows on demand is not judged by its present size
    _check_resources(tight)
    monkeypatch.delenv(AUTOSCALING)
    with pytest.raises(UsageError, match="unknown train keys"):
        load_config(None, [*SWEEP, "tune.train={epoch: 1}"])


def test_killed_sweep_resumes_and_logs_parent_and_children(prepared, ray_local):
    from mlflow.tracking import MlflowClient

    from mel_ray.tune.sweep import run_sweep

    root, ds, features = prepared
    runs, mlflow_dir = root / "runs", root / "mlflow"
    mlflow_dir.mkdir()
    sweep = [*SWEEP, f"tracking.mlflow_uri=sqlite:///{mlflow_dir / 'mlflow.db'}"]
    script = textwrap.dedent(f"""
        from mel_ray.config import load_config
        from mel_ray.tune.sweep import run_sweep
        run_sweep(load_config(None, {sweep!r}), {ds!r}, features_uri={features!r}, storage_path={str(runs)!r})
    """)
    env = {**os.environ, "RAY_ADDRESS": ray_local.address_info["gcs_address"], "TUNE_GLOBAL_CHECKPOINT_S": "1"}

    def finished_trial() -> bool:       # Tune's own experiment state records one (so the restore must keep it)
        states = glob.glob(str(runs / "t" / "experiment_state-*.json"))
        return any("TERMINATED" in Path(s).read_text() for s in states)

    run_and_kill(script, finished_trial, env=env, log=root / "sweep-1.log", timeout=300, poll=0.5,
                 what="finished trial in Tune's experiment state")

    result = run_sweep(load_config(None, sweep), ds, features_uri=features, storage_path=str(runs))
    client = MlflowClient(result["tracking_uri"])
    children = _children(client, "tune-test", result["parent_run_id"])
    names = sorted(c.info.run_name for c in children)
    assert names == ["k2_ns2", "k4_ns2"], names            # the finished trial was not trained again
    for child in children:
        assert {"test_MRR", "test_H_at_1", "dev_MRR"} <= set(child.data.metrics)
        assert child.data.params["train.k"] in ("2", "4") and child.data.params["model.views"] == "2"
        assert child.data.params["train.epochs"] == "1"          # tune.train over train
    assert [r["status"] for r in result["rows"]] == ["done", "done"]
    assert "| 2 | 2 |" in result["table"] and "| 4 | 2 |" in result["table"]
    # one zero-shot row (the encoder alone, computed once by the driver), dev and test, and its parent metrics
    assert result["table"].splitlines()[-1].startswith("| zero-shot | - | 0.") and " - |" not in \
        result["table"].splitlines()[-1].split("| zero-shot | - |")[1], result["table"]
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and "best_test_MRR" in parent.data.metrics
    assert parent.data.metrics["zero_shot_test_MRR"] == result["zero_shot"]["metrics"]["test_MRR"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation.md", "ablation_arms.json", "heatmaps", "best"} <= artifacts
    # without tune.seeds an arm is one trial (train.seed): its mean, no std, no paired test (the reason says why)
    table = Path(client.download_artifacts(parent.info.run_id, "ablation.md", str(root / "artifacts"))).read_text()
    assert "## Arms: mean ± std over seeds" in table and "Baseline: **k=2, views=2** (the grid's first arm" in table
    arm_rows = [line for line in table.splitlines() if line.startswith(("| 2 | 2 | 1 of 1 | ", "| 4 | 2 | 1 of 1 | "))]
    assert len(arm_rows) == 2 and not any("±" in line for line in arm_rows), arm_rows
    assert "| 4 | 2 | dev_MRR | 1 | " in table and "n/a (1 paired seed with a finite result in both arms" in table
    assert [a["name"] for a in result["arms"]["arms"]] == ["k=2, views=2", "k=4, views=2"]
    assert len(client.list_artifacts(parent.info.run_id, "heatmaps")) == 4
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "best")] == ["best/model.pt"]

    # a finished sweep is not run again: same parent run, nothing trained
    again = run_sweep(load_config(None, sweep), ds, features_uri=features, storage_path=str(runs))
    assert again["skipped"] and again["parent_run_id"] == result["parent_run_id"]
    assert len(_children(client, "tune-test", result["parent_run_id"])) == 2
    # ... but not "skipped" for another tracking store, whose users would see no run: it says why and what to do
    other = f"sqlite:///{root / 'other.db'}"
    with pytest.raises(UsageError) as err:
        run_sweep(load_config(None, [*sweep, f"tracking.mlflow_uri={other}"]), ds, features_uri=features,
                  storage_path=str(runs))
    assert str(err.value) == (f"sweep 't' already finished with MLflow tracking at sqlite:///{mlflow_dir / 'mlflow.db'}"
                              f", and tracking now goes to {other}: to run it again there, set another tune.name or "
                              f"remove {runs / 't'}")
