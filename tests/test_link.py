"""`mel-ray link`: new mentions against the whole KB, end to end (real tiny diffusion + CLIP, a real model).

The reference is the evaluation stage: linking a dataset's own test mentions (same text, mention, image,
mention_id, so the same seeds and views) must give the top-10 that exact full-KB evaluation gives."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mel_ray import cli, storage
from mel_ray.config import load_config
from mel_ray.errors import DataError, UsageError

pytestmark = pytest.mark.slow
SETTINGS = ["synthesize.views=2", "synthesize.steps=2", "synthesize.size=32", "model.hidden=16"]


@pytest.fixture(scope="module")
def linked_setup(small_data, tmp_path_factory, ray_local):
    from mel_ray.checkpoints import export_model
    from mel_ray.config import FeaturesConfig
    from mel_ray.dataset import load_dataset
    from mel_ray.eval.evaluate import evaluate
    from mel_ray.feature_store import model_dims_from, read_manifest
    from mel_ray.features import extract_features
    from mel_ray.model import MELModel, ModelDims
    from mel_ray.synthesize import synthesize

    root = tmp_path_factory.mktemp("link")
    models = small_data.models
    ds = small_data.copy(root)                  # views and features are written into the dataset
    cfg = load_config(None, [*SETTINGS, f"models.clip={models['clip']}",
                             f"models.diffusion={models['stable-diffusion']}"])
    views = synthesize(ds, cfg.models.diffusion, cfg.synthesize.model_copy(update={"batch_size": 4, "num_gpus": 0}),
                       splits=("test",))
    # micro_batch 1: one CLIP forward per mention, as the linker encodes, so the features are bit-identical
    features = extract_features(ds, cfg.models.clip, FeaturesConfig(num_gpus=0), synthetic_key=views["key"],
                                views=2, splits=("test",), micro_batch=1, engine="local", quiet=True)["uri"]
    torch.manual_seed(3)
    dims = ModelDims(**model_dims_from(read_manifest(features)), hidden=16)
    net = MELModel(dims)                              # a real (untrained) model: its scores are real scores
    model_pt = export_model({"model": net.state_dict(), "dims": dims.to_dict()}, cfg, root / "model.pt")
    report = evaluate(ds, features, str(model_pt), "test", output_uri=str(root / "eval"), cpus_per_shard=0.5)
    predictions = pq.read_table(root / "eval" / "predictions_test.parquet").to_pylist()

    data = load_dataset(ds)
    rows = [{"mention_id": m["mention_id"], "text": m["sentence"], "mention": m["mention"],
             "image": data.resolve_uri(m["image_uri"]) if m["image_uri"] else None}
            for m in data.mentions("test").to_pylist()]
    jsonl = root / "new.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "ds": ds, "model": str(model_pt), "rows": rows, "jsonl": jsonl,
            "predictions": {p["mention_id"]: p for p in predictions}, "report": report}


def _links(output: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in pq.read_table(output / "links.parquet").to_pylist():
        out.setdefault(row["mention_id"], []).append(row)
    return out


def _assert_links_are_the_evaluations(links: dict[str, list[dict]], predictions: dict[str, dict]) -> None:
    """Every mention linked, its top-10 = the exact evaluation's (ranks 1..10, same entities, same scores)."""
    assert set(links) == set(predictions)
    for mention_id, ranked in links.items():
        expected = predictions[mention_id]
        assert [r["rank"] for r in ranked] == list(range(1, 11))
        assert [r["entity_id"] for r in ranked] == expected["top_entity_ids"], mention_id
        assert torch.allclose(torch.tensor([r["score"] for r in ranked]), torch.tensor(expected["top_scores"]),
                              atol=1e-4)


def test_links_equal_exact_full_kb_evaluation_and_rerun_skips(linked_setup, capsys):
    from mel_ray.link import link

    s = linked_setup
    out = s["root"] / "out"
    report = link(s["model"], s["ds"], str(s["jsonl"]), str(out), top_k=10, batch_size=8)
    assert report["linked"] == len(s["rows"]) and not report["skipped"]
    assert report["views_per_mention"] == 2 and report["views_drawn"] == 2 * len(s["rows"])
    links = _links(out)
    _assert_links_are_the_evaluations(links, s["predictions"])
    # the views a person can look at, under the output
    assert len(list((out / "synthetic").rglob("*.png"))) == 2 * len(s["rows"])
    before = (out / "links.parquet").stat().st_mtime_ns
    again = link(s["model"], s["ds"], str(s["jsonl"]), str(out), top_k=10, batch_size=8)
    assert again["skipped"] and (out / "links.parquet").stat().st_mtime_ns == before
    # the CLI (what jobs/link.py runs through the config's link.* section) finds the same finished output
    assert cli.main(["link", "--model", s["model"], "--kb", s["ds"], "--mentions", str(s["jsonl"]),
                     "--output", str(out)]) == 0
    assert '"skipped": true' in capsys.readouterr().out


def test_scorers_keep_entity_sides_across_batches_and_link_the_same(linked_setup):
    """eval.cache_gb for link's exact scorer: a budget holding 1.5 of the KB's 4 chunks (one kept, three
    recomputed per batch of 8 mentions) links exactly as the evaluation ranks; a budget below one chunk is one
    line naming the setting."""
    import shutil

    from mel_ray.checkpoints import load_checkpoint
    from mel_ray.eval.evaluate import side_bytes_per_entity
    from mel_ray.feature_store import find_features
    from mel_ray.link import link

    s = linked_setup
    per_entity = side_bytes_per_entity(load_checkpoint(s["model"]), find_features(s["ds"], several="first"))
    chunk = 16                                                   # the small KB: 60 entities = 4 chunks
    out = s["root"] / "out-cached"
    if (s["root"] / "out" / "synthetic").exists():                # the first test's views: not drawn again
        shutil.copytree(s["root"] / "out" / "synthetic", out / "synthetic")
    report = link(s["model"], s["ds"], str(s["jsonl"]), str(out), top_k=10, batch_size=8, entity_chunk=chunk,
                  cache_gb=1.5 * chunk * per_entity / 2**30)
    assert report["cache_gb_per_scorer"] * 2**30 == pytest.approx(1.5 * chunk * per_entity, abs=1)
    links = _links(out)
    assert len(links) > 8                                                   # several batches per scorer
    _assert_links_are_the_evaluations(links, s["predictions"])
    with pytest.raises(UsageError, match=r"^link: eval.cache_gb=\S+ cannot hold one entity chunk of 16 entities"):
        link(s["model"], s["ds"], str(s["jsonl"]), str(s["root"] / "out-small-cache"), entity_chunk=chunk,
             cache_gb=0.5 * chunk * per_entity / 2**30)
    assert not (s["root"] / "out-small-cache").exists()


def test_parquet_input_missing_images_and_bad_fields(linked_setup):
    from mel_ray.link import link

    s = linked_setup
    rows = [dict(r) for r in s["rows"][:4]]
    corrupt = s["root"] / "corrupt.jpg"
    corrupt.write_bytes(b"not an image")
    rows[0]["image"] = str(corrupt)
    rows[1]["image"] = str(s["root"] / "nowhere.jpg")
    path = s["root"] / "new.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = link(s["model"], s["ds"], str(path), str(s["root"] / "out-pq"), top_k=5, batch_size=3)
    assert report["linked"] == 4
    assert report["images"]["undecodable"] == 1 and report["images"]["missing"] == 1
    links = _links(s["root"] / "out-pq")
    # untouched mentions link exactly as from JSONL (their views were drawn again, with the same seeds)
    for r in rows[2:]:
        assert [x["entity_id"] for x in links[r["mention_id"]]] == \
            s["predictions"][r["mention_id"]]["top_entity_ids"][:5]

    bad = s["root"] / "bad.jsonl"
    bad.write_text(json.dumps({"text": "A sentence.", "mention": ""}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: record line 1: field 'mention'"):
        link(s["model"], s["ds"], str(bad), str(s["root"] / "out-bad"))
    bad.write_text(json.dumps({"mention": "Paris"}) + "\n")
    with pytest.raises(DataError, match=r"field 'text'"):
        link(s["model"], s["ds"], str(bad), str(s["root"] / "out-bad"))
    assert not storage.exists(str(s["root"] / "out-bad" / "links.parquet"))
