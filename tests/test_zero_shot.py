"""Issue 23, item 1: the zero-shot floor (mel_ray/eval/zero_shot.py) as a first-class arm of the exact evaluation:
the encoder alone ranks every mention against the whole KB by the cosine of the global features, through
evaluate's shards, tie policy and files; the pipeline's evaluate stage puts it beside the trained model, paired by
mention; the sweep's table gets one zero-shot row.

The small release's real tiny-CLIP features; every ranking is compared with a brute-force numpy cosine matrix +
stable sort. One test starts Ray (evaluate's KB shards): the pipeline's evaluate stage and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from seeded_models import copy_with_features, seeded_model

from mel_ray.errors import DataError, UsageError
from mel_ray.eval.zero_shot import EntityGlobals, ZeroShotScorer, mention_globals, paired_by_mention
from mel_ray.feature_store import EntityStore, load_features, read_manifest
from mel_ray.scoring import chunks_of, metrics_from_ranks, rank_counts


@pytest.fixture(scope="module")
def release(small_data, tmp_path_factory):
    """(dataset, features URI, model.pt): the small release, its features and a seeded untrained model on them."""
    root = tmp_path_factory.mktemp("zero-shot")
    ds, features = copy_with_features(small_data, root)
    _, model_pt = seeded_model(features, root / "model.pt", seed=0, hidden=8)
    return ds, features, model_pt


def brute_force_ranks(ds: str, features: str, split: str = "test") -> np.ndarray:
    """Ranks by cos(t_G) + [both have an image] cos(v_G), from the stored float16 features, with a stable sort
    (ties: the smaller entity id first)."""
    from mel_ray.dataset import load_dataset

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    entities = load_features(features, "entities", ["text_global", "image_global", "has_image"])
    mentions = load_features(features, f"mentions/{split}", ["mention_id", "text_global", "image_global",
                                                             "has_image"])
    both = mentions["has_image"][:, None] & entities["has_image"][None, :]
    scores = unit(mentions["text_global"]) @ unit(entities["text_global"]).T
    scores += both * (unit(mentions["image_global"]) @ unit(entities["image_global"]).T)
    table = load_dataset(ds).mentions(split, columns=["mention_id", "entity_id"])
    gold_of = dict(zip(table.column("mention_id").to_pylist(), table.column("entity_id").to_pylist()))
    gold = np.array([gold_of[m] for m in mentions["mention_id"]])
    order = np.argsort(-scores.astype(np.float32), axis=1, kind="stable")
    return np.array([1 + int(np.where(order[i] == gold[i])[0][0]) for i in range(len(gold))])


# --------------------------------------------------------------------------------------------- no Ray


def test_the_score_is_text_cosine_plus_image_cosine_where_both_have_an_image():
    """Two rows without an image have the same blank encoding (cosine 1): only the text counts for them; with an
    image on both sides the image cosine is added; text-only features give the text cosine alone."""
    text = torch.tensor([[1.0, 0.0], [3.0, 4.0]])               # unnormalised: the scorer normalises
    blank = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    image = torch.tensor([[0.0, 2.0], [0.5, 0.5]])
    scorer = ZeroShotScorer()
    mentions = scorer.mention_side(scorer.mention_features(
        {"text_global": text, "image_global": blank, "has_image": torch.tensor([False, True])}))
    entities = scorer.entity_side(scorer.entity_features(
        {"text_global": text, "image_global": image, "has_image": torch.tensor([False, True])}))
    scores = scorer.pair_logits(mentions, entities)["overall"]
    text_cos = torch.tensor([[1.0, 0.6], [0.6, 1.0]])
    assert torch.allclose(scores[0], text_cos[0])                      # no image on the mention: text only
    assert torch.allclose(scores[1, 0], text_cos[1, 0])                # no image on the entity: text only
    assert torch.allclose(scores[1, 1], text_cos[1, 1] + 1.0)          # both: + cos(blank-ish, [.5, .5]) = 1
    text_only = scorer.pair_logits(scorer.mention_side(scorer.mention_features({"text_global": text})),
                                   scorer.entity_side(scorer.entity_features({"text_global": text})))["overall"]
    assert torch.allclose(text_only, text_cos)


def test_the_kernel_ranks_zero_shot_as_a_brute_force_cosine(release):
    """ZeroShotScorer through scoring.rank_counts (the kernel of evaluate's shards), in chunks of 7 entities and
    batches of 5 mentions: the brute-force ranks, ties included; the images matter on this release."""
    ds, features, _ = release
    mentions = mention_globals(features, ds, "test")
    rows = EntityGlobals(EntityStore(features))
    has_image = load_features(features, "entities", ["has_image"])["has_image"]
    assert has_image.any() and not has_image.all()          # both kinds of entity: the mask is exercised
    counts, top_ids, _ = rank_counts(ZeroShotScorer(), mentions, rows.gather(mentions["gold"].numpy()),
                                     chunks_of(rows.chunk, 0, len(has_image), 7), mention_batch=5, topk=10)
    assert (counts + 1).tolist() == brute_force_ranks(ds, features).tolist()
    assert top_ids.shape == (len(counts), 10)


def test_paired_by_mention_counts_discordant_mentions_and_tests_them():
    """McNemar exact on H@1: 8 mentions right by the model only, 1 by the floor only: p = 2 (1 + 9) / 2^9."""
    ids = [f"m{i}" for i in range(12)]
    model = {"mention_id": ids, "rank": [1] * 8 + [3] + [1, 1, 2]}
    floor = {"mention_id": ids[::-1], "rank": ([2] * 8 + [1] + [1, 1, 4])[::-1]}     # another order: joined by id
    paired = paired_by_mention(model, floor)
    h1 = paired["H@1"]
    assert (h1["model_only"], h1["zero_shot_only"], h1["both"]) == (8, 1, 2)
    assert h1["p"] == pytest.approx(2 * (1 + 9) / 2**9, rel=1e-9)
    assert paired["delta_H@1"] == pytest.approx((10 - 3) / 12)
    assert paired["delta_MRR"] == pytest.approx((8 * 0.5 + (1 / 3 - 1) + (0.5 - 0.25)) / 12)
    assert paired["MRR"]["nonzero"] == 10 and 0 < paired["MRR"]["p"] < 0.05
    same = paired_by_mention(model, model)
    assert same["H@1"]["p"] == same["MRR"]["p"] == "n/a" and same["delta_MRR"] == 0
    assert same["H@1"]["reason"] == "no discordant mention"
    with pytest.raises(DataError, match="not the same mentions"):
        paired_by_mention(model, {"mention_id": ids[:11] + ["other"], "rank": floor["rank"]})


def test_zero_shot_requests_that_cannot_work_are_one_line(release, tmp_path, capsys):
    """--checkpoint with --zero-shot, neither, and a feature set without global vectors: one line, exit 2, before
    Ray or any shard starts."""
    from mel_ray import cli
    from mel_ray.eval.evaluate import evaluate

    ds, features, model_pt = release
    for extra in (["--zero-shot", "--checkpoint", model_pt], []):
        code = cli.main(["--log-file", str(tmp_path / "log"), "evaluate", "--dataset", ds, "--features", features,
                         *extra])
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("mel-ray evaluate: ")]
        assert code == 2 and len(err) == 1 and err[0].startswith("error: evaluate: "), err
        assert ("leave out --checkpoint" if extra else "give --checkpoint") in err[0], err
    with pytest.raises(UsageError, match="uses no checkpoint"):
        evaluate(ds, features, model_pt, "test", ranker="zero-shot")
    bare = tmp_path / "no-globals"
    manifest = read_manifest(features)
    for name in ("text_global", "image_global"):
        manifest["shapes"].pop(name)
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError) as err:
        evaluate(ds, str(bare), None, "test", ranker="zero-shot")
    assert str(err.value).startswith(f"{bare}: its manifest lists no global vectors") and "\n" not in str(err.value)


def test_the_sweep_table_has_one_zero_shot_row():
    from mel_ray.tune.sweep import ablation_rows, ablation_table

    rows = ablation_rows([{"params": {"k": 2, "views": 1}, "status": "done",
                           "metrics": {"best_dev_H@1": 0.5, "best_dev_MRR": 0.6, "test_H@1": 0.4, "test_MRR": 0.5}}],
                         {"k": [2], "views": [1]})
    floor = {"metrics": {"dev_H@1": 0.25, "dev_MRR": 0.375, "dev_MR": 3.0}}      # no test: evaluate_test off
    lines = ablation_table(rows, floor).splitlines()
    assert lines[2] == "| 2 | 1 | 0.5000 | 0.6000 | 0.4000 | 0.5000 | done |"
    assert lines[3] == "| zero-shot | - | 0.2500 | 0.3750 | - | - | encoder only, no training |"
    assert len(ablation_table(rows).splitlines()) == 3


# ---------------------------------------------------------------------------------------------- Ray


def test_pipeline_evaluates_the_floor_beside_the_model(release, ray_local, tmp_path, capsys):
    """The evaluate stage of a (seeded, untrained) model: the zero-shot floor on the same features and split, its
    predictions equal to the brute-force cosine ranks, the comparison paired by mention in the report, the
    marker and MLflow; a rerun skips (an old marker without the floor is shown as it is); the CLI's --zero-shot
    prints the floor labelled with its encoder."""
    from mlflow.tracking import MlflowClient

    from mel_ray import cli, pipeline
    from mel_ray.config import load_config

    ds, features, model_pt = release
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    run_id = client.create_run(client.create_experiment("zero-shot")).info.run_id
    cfg = load_config(None, ["train.num_workers=2", "train.cpus_per_worker=0.5", "train.eval_entity_chunk=16",
                             f"tracking.storage={tmp_path / 'runs'}"])
    trained = {"checkpoint": model_pt, "run_id": run_id, "tracking_uri": tracking}
    out = pipeline.evaluate_model(cfg, ds, features, trained, "run")
    report = out.value
    floor = report["zero_shot"]
    folder = tmp_path / "runs" / "run"
    ranks = pq.read_table(folder / "eval_zero_shot" / "predictions_test.parquet").column("rank").to_pylist()
    assert ranks == brute_force_ranks(ds, features).tolist()
    assert floor["metrics"] == pytest.approx(metrics_from_ranks(np.array(ranks)), abs=1e-12)
    assert floor["encoder"]["clip"] and floor["encoder"]["text_encoder"] is None and floor["features"] == features
    assert json.loads((folder / "eval_zero_shot" / "eval_test.json").read_text())["ranker"] == "zero-shot"
    model_ranks = pq.read_table(folder / "eval" / "predictions_test.parquet").column("rank").to_pylist()
    paired = floor["vs_model"]
    hit_model, hit_floor = np.array(model_ranks) == 1, np.array(ranks) == 1     # same mention order (same set)
    assert paired["H@1"]["model_only"] == int(np.sum(hit_model & ~hit_floor))
    assert paired["H@1"]["zero_shot_only"] == int(np.sum(~hit_model & hit_floor))
    assert paired["delta_MRR"] == pytest.approx(report["metrics"]["MRR"] - floor["metrics"]["MRR"], abs=1e-12)
    assert out.ran and "(zero-shot MRR " in out.note and "model - zero-shot: H@1 " in out.note, out.note
    metrics = client.get_run(run_id).data.metrics
    assert metrics["test_zero_shot_MRR"] == pytest.approx(floor["metrics"]["MRR"])
    assert metrics["test_zero_shot_H_at_1"] == pytest.approx(floor["metrics"]["H@1"])
    assert metrics["test_vs_zero_shot_delta_MRR"] == pytest.approx(paired["delta_MRR"])
    assert "test_MRR" in metrics

    again = pipeline.evaluate_model(cfg, ds, features, trained, "run")
    assert not again.ran and again.value == json.loads(json.dumps(report)) and "(zero-shot MRR " in again.note
    marker = folder / pipeline.EVAL_MARKER.format(split="test")
    old = {k: v for k, v in report.items() if k != "zero_shot"}      # written before the floor existed
    marker.write_text(json.dumps(old))
    older = pipeline.evaluate_model(cfg, ds, features, trained, "run")
    assert not older.ran and "zero-shot" not in older.note and older.note.startswith("already evaluated on test: MRR")

    code = cli.main(["--log-file", str(tmp_path / "log"), "evaluate", "--dataset", ds, "--features", features,
                     "--zero-shot", "--shards", "2", "--output", str(tmp_path / "cli"), "--set",
                     "eval.num_gpus=0"])
    printed = capsys.readouterr().out
    assert code == 0 and "zero-shot ranking by " in printed, printed
    assert pq.read_table(tmp_path / "cli" / "predictions_test.parquet").column("rank").to_pylist() == ranks
