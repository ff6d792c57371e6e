"""`mel-ray link`: new mentions against the whole KB, end to end (real tiny diffusion + CLIP, a real model).

The reference is the evaluation stage: linking a dataset's own test mentions (same text, mention, image,
mention_id, so the same seeds and views) must give the top-10 that exact full-KB evaluation gives."""

from __future__ import annotations

import json
import time
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
    rows = [dict(r) for r in s["rows"][:6]]
    corrupt = s["root"] / "corrupt.jpg"
    corrupt.write_bytes(b"not an image")
    (s["root"] / "a-folder.jpg").mkdir()
    rows[0]["image"] = str(corrupt)
    rows[1]["image"] = str(s["root"] / "nowhere.jpg")
    rows[2]["image"] = str(s["root"] / "a-folder.jpg")     # a folder is a missing image (docs/data-contract.md)
    rows[3]["image"] = "a-folder.jpg/"                     # the same, relative to the mentions file
    path = s["root"] / "new.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = link(s["model"], s["ds"], str(path), str(s["root"] / "out-pq"), top_k=5, batch_size=3)
    assert report["linked"] == 6
    assert report["images"]["undecodable"] == 1 and report["images"]["missing"] == 3
    assert report["images"]["no_image"] == sum(r["image"] is None for r in rows)
    links = _links(s["root"] / "out-pq")
    assert set(links) == {r["mention_id"] for r in rows}
    # untouched mentions link exactly as from JSONL (their views were drawn again, with the same seeds)
    for r in rows[4:]:
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


def test_a_model_that_reads_no_view_draws_none_and_needs_no_diffusion_model(linked_setup, tmp_path):
    """model.views 0 (CVaCPT reads no view): link draws nothing and never resolves models.diffusion (here a folder
    that does not exist); it fell back to synthesize.views (2) before."""
    from mel_ray.checkpoints import export_model, load_checkpoint
    from mel_ray.link import link

    s = linked_setup
    state = load_checkpoint(s["model"])
    missing = tmp_path / "no-such-diffusion"
    config = {**state["config"], "models": {**state["config"]["models"], "diffusion": str(missing)}}
    model = export_model({"model": state["model"], "dims": {**state["dims"], "views": 0}}, config,
                         tmp_path / "no-views.pt")
    report = link(str(model), s["ds"], str(_write_jsonl(tmp_path / "two.jsonl", s["rows"][:2])), str(tmp_path / "out"),
                  top_k=3)
    assert report["linked"] == 2 and report["views_per_mention"] == 0 and report["views_drawn"] == 0
    assert not (tmp_path / "out" / "synthetic").exists() and not missing.exists()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli_link(s: dict, mentions: Path, output: Path, *extra: str) -> int:
    return cli.main(["link", "--model", s["model"], "--kb", str(s["ds"]), "--mentions", str(mentions),
                     "--output", str(output), *extra])


def test_damaged_parquet_mentions_are_one_line(linked_setup, tmp_path, capsys):
    """Truncated, empty or not Parquet at all: `error: FILE: not a readable Parquet file: ...`, exit 2."""
    s = linked_setup
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(s["rows"]), good)
    data = good.read_bytes()
    for name, content in (("truncated", data[:len(data) // 2]), ("cut-footer", data[:-3]), ("empty", b""),
                          ("jsonl", s["jsonl"].read_bytes())):
        path = tmp_path / f"{name}.parquet"
        path.write_bytes(content)
        assert _cli_link(s, path, tmp_path / "out", "--log-file", str(tmp_path / "link.log")) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: not a readable Parquet file: "), err
    assert not (tmp_path / "out").exists()


# image URIs the actors could not read: (image, what the one line says); none may show its credentials
UNUSABLE_IMAGES = [
    ("gs://bucket/x.png", "unsupported URI scheme 'gs'"),
    ("https://example.org/x.png", "unsupported URI scheme 'https'"),
    ("s3://AKIAKEY:S3cretLEAK42@bucket/x.png", "credentials do not belong in the URI"),
    ("s3://AKIAKEY:wJalr/K7MDENG/LEAK42@bucket/x.png", "credentials do not belong in the URI"),   # "/" in it
    ("http://alice:S3cretLEAK42@127.0.0.1:9/x.png", "unsupported URI scheme 'http'"),
    ("http://alice:pa/ss5LEAK42@127.0.0.1:9/x.png", "unsupported URI scheme 'http'"),              # "/" in it
    ("file://alice:S3cretLEAK42@host/x.png", "malformed file:// URI"),
]


def test_unusable_image_uris_are_one_line_before_any_work(linked_setup, tmp_path):
    """Checked on the driver as the file is read: within a second, before Ray draws a view or writes a file."""
    from mel_ray.link import link

    s = linked_setup
    for image, says in UNUSABLE_IMAGES:
        rows = [dict(r) for r in s["rows"][:3]]
        rows[1]["image"] = image
        path = _write_jsonl(tmp_path / "mentions.jsonl", rows)
        start = time.perf_counter()
        with pytest.raises(DataError) as err:
            link(s["model"], s["ds"], str(path), str(tmp_path / "out"))
        assert time.perf_counter() - start < 1.0, image
        line = str(err.value)
        assert line.startswith(f"{path}: record line 2: field 'image': ") and says in line, line
        for secret in ("LEAK42", "AKIAKEY", "alice"):
            assert secret not in line, line
    assert not (tmp_path / "out").exists()                 # no synthetic view drawn, nothing written


def test_image_credentials_reach_neither_the_terminal_nor_the_log_file(linked_setup, tmp_path, capsys):
    s = linked_setup
    log_file = tmp_path / "logs" / "link.log"
    for image in ("s3://AKIAKEY:S3cretLEAK42@bucket/x.png", "http://alice:pa/ss5LEAK42@127.0.0.1:9/x.png"):
        path = _write_jsonl(tmp_path / "mentions.jsonl", [{**s["rows"][0], "image": image}])
        assert _cli_link(s, path, tmp_path / "out", "--log-file", str(log_file)) == 2
        out = capsys.readouterr()
        assert f"error: {path}: record line 1: field 'image': " in out.err
        written = out.out + out.err + log_file.read_text()
        assert "LEAK42" not in written and "AKIAKEY" not in written and "alice" not in written


@pytest.mark.parametrize("field", ["mention_id", "text", "image"])
def test_integers_over_python_s_digit_limit_are_one_line(linked_setup, tmp_path, field):
    """A 5000-digit number (Python refuses int <-> str conversions over 4300 digits) in any field: one line that
    names the file and line, without the number."""
    from mel_ray.link import link

    s = linked_setup
    row = {k: v for k, v in {"text": "A sentence about Paris.", "mention": "Paris"}.items() if k != field}
    path = tmp_path / "mentions.jsonl"
    path.write_text(json.dumps(row)[:-1] + f', "{field}": {"7" * 5000}}}\n')
    with pytest.raises(DataError) as err:
        link(s["model"], s["ds"], str(path), str(tmp_path / "out"))
    line = str(err.value)
    assert line.startswith(f"{path}: ") and "line 1" in line and "\n" not in line and len(line) < 400, line
