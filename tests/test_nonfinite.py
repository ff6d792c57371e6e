"""Non-finite scores and losses are errors, never results (issue 13, item 1): the ranking kernel, `evaluate`,
`link` and training (a diverging step, a NaN dev score) stop with one line naming the checkpoint or the
epoch/step, the split and how many mentions were affected; and `evaluate --shards N` never waits forever for
shards the cluster cannot place (clamped, with a printed note)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_lines import run_cli
from seeded_models import copy_with_features, seeded_model

from mel_ray.checkpoints import export_model
from mel_ray.config import load_config
from mel_ray.model import MELModel, ModelDims
from mel_ray.scoring import NonFiniteScores, chunks_of, rank_counts

SMALL = ["model.hidden=16", "model.cvacpt_weight=0.0"]
TRAIN = ["train.negatives=in_batch", "train.epochs=2", "train.batch_size=16", "train.num_workers=2",
         "train.cpus_per_worker=0.5", "train.max_failures=0", "tracking.experiment=nonfinite"]


# ------------------------------------------------------------------------------------------- the kernel


def _features(n: int, mention: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"text_global": torch.randn(n, 8, generator=g), "text_local": torch.randn(n, 5, 8, generator=g),
           "text_mask": torch.ones(n, 5, dtype=torch.bool), "image_global": torch.randn(n, 8, generator=g),
           "image_local": torch.randn(n, 5, 8, generator=g)}
    if mention:
        out["synthetic_global"] = torch.zeros(n, 2, 8)
        out["n_views"] = torch.zeros(n, dtype=torch.long)
    return out


def test_kernel_raises_on_a_nan_row_and_counts_the_rows():
    torch.manual_seed(0)
    model = MELModel(ModelDims(text_global=8, text_local=8, image_global=8, image_local=8, hidden=4))
    mentions, kb = _features(6, mention=True), _features(20, seed=1)
    mentions["gold"] = torch.tensor([0, 1, 2, 3, 4, 5])
    gold = {k: v[mentions["gold"]] for k, v in kb.items()}

    def chunks():
        return chunks_of(lambda a, b: {k: v[a:b] for k, v in kb.items()}, 0, 20, 7)

    counts, _, scores = rank_counts(model, mentions, gold, chunks(), mention_batch=4)
    assert np.isfinite(scores).all() and counts.shape == (6,)
    mentions["text_global"] = mentions["text_global"].clone()
    mentions["text_global"][2] = float("nan")                 # one mention's features are NaN
    with pytest.raises(NonFiniteScores) as info:
        rank_counts(model, mentions, gold, chunks(), mention_batch=4)
    assert info.value.mask.tolist() == [False, False, True, False, False, False]
    assert str(info.value) == "scores: 1 of 6 mentions got non-finite scores (NaN or inf)"
    with pytest.raises(NonFiniteScores):                      # top-k only (link): the same check
        rank_counts(model, mentions, None, chunks(), mention_batch=4)
    kb["image_global"][13] = float("inf")                     # one KB entity: every mention is affected
    mentions["text_global"][2] = 0.0
    with pytest.raises(NonFiniteScores, match=r"^scores: 6 of 6 mentions got non-finite"):
        rank_counts(model, mentions, gold, chunks(), mention_batch=4)


# ---------------------------------------------------------------------------------------- on the cluster


@pytest.fixture(scope="module")
def prepared(small_data, tmp_path_factory, ray_local):
    """A copy of the small dataset with features (no synthetic views), and models exported from it."""
    root = tmp_path_factory.mktemp("nonfinite")
    ds, features = copy_with_features(small_data, root)
    cfg = load_config(None, [*SMALL, f"models.clip={small_data.models['clip']}"])
    model, _ = seeded_model(features, root / "seeded.pt", seed=0, config=cfg, hidden=16, cvacpt_weight=0.0)
    weights, dims = model.state_dict(), model.dims
    models = {}
    for name, scale in (("good", 1.0), ("huge", 1e10)):     # huge: finite weights, scores overflow to inf / NaN
        state = {"model": {k: v * scale if v.is_floating_point() else v for k, v in weights.items()},
                 "dims": dims.to_dict()}
        models[name] = str(export_model(state, cfg, root / f"{name}.pt"))
    nan = {k: v.clone() for k, v in weights.items()}
    nan["tglu.w_q.weight"][0, 0] = float("nan")
    models["nan"] = str(export_model({"model": nan, "dims": dims.to_dict()}, cfg, root / "nan.pt"))
    return {"root": root, "ds": ds, "features": features, "models": models, "clip": small_data.models["clip"]}


def test_evaluate_refuses_non_finite_scores_and_nan_weights(prepared, tmp_path, capsys):
    p = prepared
    out = tmp_path / "eval"
    base = ["evaluate", "--dataset", p["ds"], "--features", p["features"], "--output", str(out)]
    code, stdout, lines = run_cli(tmp_path, capsys, *base, "--checkpoint", p["models"]["huge"])
    assert (code, lines) == (2, [(f"error: {p['models']['huge']}: split 'test': 18 of 18 mentions got non-finite "
                                 "scores (NaN or inf) against the KB; no metrics reported")])
    assert "H@1" not in stdout and not out.exists()
    code, stdout, lines = run_cli(tmp_path, capsys, *base, "--checkpoint", p["models"]["nan"], "--split", "dev")
    assert (code, lines) == (2, [(f"error: {p['models']['nan']}: weights are not finite: 1 of 66 tensors hold NaN "
                                 "or inf (first: tglu.w_q.weight); the model cannot be evaluated or used")])
    assert not out.exists()


def test_evaluate_clamps_shards_to_what_the_cluster_can_place(prepared, tmp_path, capsys):
    import ray

    p = prepared
    total = int(ray.cluster_resources()["CPU"])
    assert total == 2
    base = ["evaluate", "--dataset", p["ds"], "--features", p["features"], "--checkpoint", p["models"]["good"]]
    for shards in (3, 100000):
        code, stdout, lines = run_cli(tmp_path, capsys, *base, "--shards", str(shards),
                                   "--output", str(tmp_path / f"s{shards}"))
        assert (code, lines) == (0, [])
        assert stdout.splitlines()[0] == (f"[evaluate] {shards} shards x 1 CPUs do not fit on this cluster of 2 "
                                          f"CPUs: using 2 shards")
        report = json.loads((tmp_path / f"s{shards}" / "eval_test.json").read_text())
        assert report["shards"] == 2 and np.isfinite(report["metrics"]["MRR"])


def test_link_refuses_non_finite_scores(prepared, tmp_path, capsys):
    from mel_ray.dataset import load_dataset

    p = prepared
    data = load_dataset(p["ds"])
    rows = [{"mention_id": m["mention_id"], "text": m["sentence"], "mention": m["mention"],
             "image": data.resolve_uri(m["image_uri"]) if m["image_uri"] else None}
            for m in data.mentions("test").to_pylist()[:5]]
    mentions = tmp_path / "new.jsonl"
    mentions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["link", "--kb", p["ds"], "--mentions", str(mentions)]
    code, _, lines = run_cli(tmp_path, capsys, *base, "--model", p["models"]["huge"], "--output", str(tmp_path / "o1"))
    assert (code, lines) == (2, [(f"error: {p['models']['huge']}: 5 of 5 mentions of {mentions} got non-finite "
                                 f"scores (NaN or inf) against the KB {p['ds']}; no links written")])
    assert not (tmp_path / "o1" / "links.parquet").exists()
    code, _, lines = run_cli(tmp_path, capsys, *base, "--model", p["models"]["nan"], "--output", str(tmp_path / "o2"))
    assert (code, lines) == (2, [(f"error: {p['models']['nan']}: weights are not finite: 1 of 66 tensors hold NaN "
                                 "or inf (first: tglu.w_q.weight); the model cannot be evaluated or used")])


def _trainrun_cli(tmp_path: Path, capsys, monkeypatch, ds: str, features: str, *settings: str):
    monkeypatch.chdir(tmp_path)          # tracking.storage and the MLflow store are relative: under tmp_path
    sets = [arg for s in (*SMALL, *TRAIN, *settings) for arg in ("--set", s)]
    return run_cli(tmp_path, capsys, "train", "--dataset", ds, "--features", features, *sets)


def _last_state(tmp_path: Path) -> dict:
    states = sorted(tmp_path.rglob("checkpoint_*/state.pt"), key=lambda p: p.stat().st_mtime_ns)
    return torch.load(states[-1], weights_only=True)["state"]


def test_a_diverging_run_stops_at_its_step_with_one_line(prepared, tmp_path, capsys, monkeypatch):
    p = prepared
    code, stdout, lines = _trainrun_cli(tmp_path, capsys, monkeypatch, p["ds"], p["features"], "train.lr=1e30")
    assert code == 2, lines
    assert len(lines) == 1, lines
    print(lines[0])
    assert re.fullmatch(r"error: train run 'train-[0-9a-f]+': epoch 1, step 2 \(split 'train'\): (the loss is "
                        r"(nan|inf)|the gradient norm is (nan|inf)) \(\d+ of \d+ mentions of the batch got non-finite "
                        r"scores\); training stopped", lines[0]), lines[0]
    assert "dev_MRR" not in stdout and "H@" not in stdout
    state = _last_state(tmp_path)
    assert state["nonfinite"] in lines[0] and all("dev_MRR" not in h for h in state["history"])


def _poison_dev_mention(features: str, row: int = 0) -> None:
    """Make one dev mention's text features NaN in the feature shard (as a broken encoder might write them)."""
    from mel_ray.feature_store import mention_shard_uris

    uri = mention_shard_uris(features, "dev")[0]
    table = pq.read_table(uri)
    col = table.column("text_global").combine_chunks()
    values = col.values.to_numpy(zero_copy_only=False).copy().reshape(len(col), -1)
    values[row] = np.nan
    poisoned = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=col.type.value_type),
                                                 col.type.list_size)
    table = table.set_column(table.schema.get_field_index("text_global"), "text_global", poisoned)
    pq.write_table(table, uri)


def test_a_nan_dev_score_is_never_kept_as_best(prepared, tmp_path, capsys, monkeypatch):
    p = prepared
    ds = str(tmp_path / "ds")
    shutil.copytree(p["ds"], ds)
    features = str(Path(ds) / Path(p["features"]).relative_to(p["ds"]))
    _poison_dev_mention(features)
    code, stdout, lines = _trainrun_cli(tmp_path, capsys, monkeypatch, ds, features, "train.lr=1e-3")
    assert code == 2, lines
    assert len(lines) == 1 and re.fullmatch(
        r"error: train run 'train-[0-9a-f]+': epoch 1, dev evaluation \(split 'dev'\): 1 of 9 mentions got "
        r"non-finite scores \(NaN or inf\); training stopped, no dev metrics reported", lines[0]), lines
    assert "dev_MRR" not in stdout
    state = _last_state(tmp_path)
    assert state["best_mrr"] == -1.0 and state["nonfinite"] in lines[0]


def _poison_entities(features: str) -> None:
    """Every entity's text_global NaN, each shard rewritten in place (the node cache holds the clean copy)."""
    from mel_ray.feature_store import read_manifest

    for shard in read_manifest(features)["tables"]["entities"]["shards"]:
        path = Path(features) / shard
        table = pq.read_table(path)
        col = table.column("text_global").combine_chunks()
        nan = pa.array(np.full(len(col.values), np.nan, dtype=np.float16), type=col.type.value_type)
        i = table.schema.get_field_index("text_global")
        table = table.set_column(i, table.schema.field(i), pa.FixedSizeListArray.from_arrays(nan, col.type.list_size))
        pq.write_table(table, path, compression="zstd")


def test_evaluate_reads_rewritten_entity_shards_not_a_stale_node_cache(prepared, tmp_path, capsys):
    """issue 22: evaluate once (the node caches the entity features), rewrite the entity shards with NaN
    text_global, evaluate again: the non-finite scores are reported, not the clean metrics of the cached copy.
    (Variants without Ray, on EntityStore: tests/test_feature_store.py.)"""
    p = prepared
    ds = str(tmp_path / "ds")
    shutil.copytree(p["ds"], ds)
    features = str(Path(ds) / Path(p["features"]).relative_to(p["ds"]))
    model = p["models"]["good"]
    base = ["evaluate", "--dataset", ds, "--features", features, "--checkpoint", model]
    code, clean, lines = run_cli(tmp_path, capsys, *base)
    assert (code, lines) == (0, []) and "H@1" in clean
    _poison_entities(features)
    code, stdout, lines = run_cli(tmp_path, capsys, *base)
    assert (code, lines) == (2, [(f"error: {model}: split 'test': 18 of 18 mentions got non-finite scores (NaN or "
                                  "inf) against the KB; no metrics reported")])
    assert "H@1" not in stdout


@pytest.mark.slow
def test_a_diverging_tune_trial_is_failed_and_gives_no_number(prepared, tmp_path, capsys):
    """A sweep over lr 1e-3 / 1e30 x seeds 1, 2: the diverging trials are failed with their one line, their rows
    have no metric, the best trial and the arms' means come from the finite ones only, and the artefacts say so."""
    from mlflow.tracking import MlflowClient

    from mel_ray.runtime import job_placement_groups
    from mel_ray.tune.sweep import run_sweep

    p = prepared
    reserved_before = job_placement_groups()
    cfg = load_config(None, [*SMALL, "tune.name=diverge", "tune.k=[2]", "tune.views=[0]", "tune.lr=[1e-3, 1e30]",
                             "tune.seeds=[1, 2]", "tune.baseline={lr: 1e-3}", "tune.max_concurrent_trials=2",
                             "tune.train={epochs: 1, num_workers: 1, cpus_per_worker: 0.45, max_failures: 0}",
                             "train.negatives=in_batch", "train.batch_size=16", "tracking.experiment=nonfinite-tune"])
    result = run_sweep(cfg, p["ds"], features_uri=p["features"], storage_path=str(tmp_path / "runs"),
                       tracking_dir=str(tmp_path))
    stdout = capsys.readouterr().out
    # nothing of the failed trials stays reserved (their worker groups' placement groups once did, and every
    # later Ray Data read in this process then waited for CPUs forever)
    assert job_placement_groups() <= reserved_before
    metrics = ("dev_H@1", "dev_MRR", "test_H@1", "test_MRR")
    rows = {(r["params"]["lr"], r["params"]["seed"]): r for r in result["rows"]}
    assert sorted(rows) == [(1e-3, 1), (1e-3, 2), (1e30, 1), (1e30, 2)]
    for seed in (1, 2):
        good, bad = rows[1e-3, seed], rows[1e30, seed]
        assert good["status"] == "done" and good["error"] is None and all(np.isfinite(good[m]) for m in metrics)
        name = f"k2_ns0_lr1e+30_seed{seed}"
        assert bad["status"] == "failed" and all(np.isnan(bad[m]) for m in metrics), bad
        assert re.fullmatch(rf"train run '{re.escape(name)}': epoch 1, (step \d+ \(split 'train'\): (the loss is "
                            r"(nan|inf)|the gradient norm is (nan|inf)) \(\d+ of \d+ mentions of the batch got "
                            r"non-finite scores\); training stopped|dev evaluation \(split 'dev'\): \d+ of \d+ "
                            r"mentions got non-finite scores \(NaN or inf\); training stopped, no dev metrics "
                            r"reported)", bad["error"]), bad["error"]
        assert f"| 2 | 0 | 1e+30 | {seed} | - | - | - | - | failed |" in result["table"]
        assert f"- {name}: {bad['error']}" in result["table"]
        assert f"[tune] trial {name} failed: {bad['error']}" in stdout
    assert "## Arms: mean ± std over seeds" in stdout and result["arms_table"] in stdout     # 2 seeds: printed
    best = result["best"]
    assert best["params"]["lr"] == 1e-3
    assert best["metrics"]["best_dev_MRR"] == max(rows[1e-3, s]["dev_MRR"] for s in (1, 2))

    client = MlflowClient(result["tracking_uri"])
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FAILED"
    assert parent.data.tags["best_trial"] == f"k2_ns0_lr0.001_seed{best['params']['seed']}"
    assert np.isfinite(parent.data.metrics["best_dev_MRR"])
    exp = client.get_experiment_by_name("nonfinite-tune")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["k2_ns0_lr0.001_seed1", "k2_ns0_lr0.001_seed2"]
    folder = tmp_path / "artifacts"
    table = Path(client.download_artifacts(parent.info.run_id, "ablation.md", str(folder))).read_text()
    assert "| 2 | 0 | 1e+30 | 1 | - | - | - | - | failed |" in table and "Failed trials (no metrics):" in table

    # the arms (grid points without the seed) over the 2 seeds: the diverged arm has no mean and no p-value
    arms = Path(client.download_artifacts(parent.info.run_id, "ablation_arms.json", str(folder))).read_text()
    arms = json.loads(arms)
    assert arms == result["arms"]
    assert arms["baseline"] == {"arm": {"k": 2, "views": 0, "lr": 0.001}, "name": "k=2, views=0, lr=0.001",
                                "source": "tune.baseline"}
    good, bad = arms["arms"]
    assert good["baseline"] and good["seeds"] == [1, 2] and bad["seeds"] == [1, 2]
    for m in metrics:
        values = [rows[1e-3, s][m] for s in (1, 2)]
        assert good["values"][m] == values and good["stats"][m]["n"] == 2
        assert good["stats"][m]["mean"] == pytest.approx(np.mean(values))
        assert good["stats"][m]["std"] == pytest.approx(np.std(values, ddof=1))
        assert bad["values"][m] == [None, None] and bad["stats"][m] == {"n": 0, "mean": None, "std": None}
        assert bad["vs_baseline"][m] == {"n_pairs": 0, "seeds": [], "mean_diff": None, "t": "n/a", "p": "n/a",
                                         "reason": "0 paired seeds with a finite result in both arms (needs 2)"}
    assert "## Arms: mean ± std over seeds" in table and "Baseline: **k=2, views=0, lr=0.001** (tune.baseline)" in table
    assert "| 2 | 0 | 1e+30 | 0 of 2 | - | - | - | - |" in table
    mrr = good["stats"]["dev_MRR"]
    assert "| 2 | 0 | 0.001 | 2 of 2 | " in table and f"{mrr['mean']:.4f} ± {mrr['std']:.4f}" in table
    assert ("| 2 | 0 | 1e+30 | dev_MRR | 0 | - | - | n/a (0 paired seeds with a finite result in both arms "
            "(needs 2)) |") in table
