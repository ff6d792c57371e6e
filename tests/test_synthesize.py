"""Synthetic views (CVaCPT): prompts, keys, byte-identical output whatever the batching / actors / kills,
resumption that generates only the missing (mention, view) pairs, S3 round trip, and the view grid.

All runs use the tiny offline Stable Diffusion (32x32, 2 steps) on the shared local Ray instance."""

from __future__ import annotations

import io
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from killing import run_and_kill

from mel_ray import storage
from mel_ray.config import SynthesizeConfig
from mel_ray.dataset import SPLITS, load_dataset, mentions_table, write_dataset
from mel_ray.errors import UsageError
from mel_ray.keys import sha256_hex, stable_seed
from mel_ray.synthesize import (
    MANIFEST_SCHEMA,
    ViewGenerator,
    fit_prompt,
    image_relpath,
    list_keys,
    load_synthetic,
    render_prompt,
    show_views,
    synthesis_key,
    synthesis_settings,
    synthesize,
)

ROOT = Path(__file__).resolve().parents[1]
RUN = {"steps": 2, "size": 32, "num_gpus": 0}          # + template, guidance, scheduler, seed: defaults
PAIR_IDS = ("wikidm:demo/pair-1", "wikidm:demo/pair-2")   # two mentions of one sentence, ids with '/' and ':'
PAIR_SENTENCE = "Alice Smith and Bob Jones shake hands in front of the old town hall."
LONG_ID = "demo:long"


def cfg(**changes) -> SynthesizeConfig:
    """The synthesize config section of these tests: RUN + `changes`."""
    return SynthesizeConfig(**{**RUN, **changes})


@pytest.fixture(scope="module")
def sd(tiny_models) -> str:
    return tiny_models["stable-diffusion"]


@pytest.fixture(scope="module")
def base_ds(small_data, tmp_path_factory) -> Path:
    """The session's small dataset cut to 9 mentions (every mention costs real diffusion runs, several per test),
    plus two mentions sharing one sentence and one over-long sentence."""
    root = tmp_path_factory.mktemp("synth-data")
    src = load_dataset(small_data.dataset)
    entities = src.entities()
    qids = entities.column("qid").to_pylist()
    mentions = {s: src.mentions(s).slice(0, n) for s, n in zip(SPLITS, (6, 1, 2), strict=True)}
    sentence = PAIR_SENTENCE
    extra_dev = [{"mention_id": PAIR_IDS[0], "mention": "Alice Smith", "sentence": sentence, "image_uri": None,
                  "entity_id": 0, "qid": qids[0]},
                 {"mention_id": PAIR_IDS[1], "mention": "Bob Jones", "sentence": sentence, "image_uri": None,
                  "entity_id": 1, "qid": qids[1]}]
    long_sentence = " ".join(f"word{i} of a very long caption about the Gothic cathedral" for i in range(40))
    extra_test = [{"mention_id": LONG_ID, "mention": "Cathedral", "sentence": long_sentence, "image_uri": None,
                   "entity_id": 2, "qid": qids[2]}]
    mentions["dev"] = pa.concat_tables([mentions["dev"], mentions_table(extra_dev)])
    mentions["test"] = pa.concat_tables([mentions["test"], mentions_table(extra_test)])
    out = root / "ds"
    shutil.copytree(small_data.dataset, out)          # images/ come along
    write_dataset(str(out), name="synth", source_format="mimic", entities=entities, mentions=mentions,
                  report=src.report())
    return out


def _copy(base: Path, dest: Path) -> str:
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("synthetic"))
    return str(dest)


def _n_mentions(ds: str) -> int:
    return sum(load_dataset(ds).mentions(s).num_rows for s in SPLITS)


def _files(folder: str) -> dict[str, str]:
    """relative path -> sha256 of every (non-temporary) file under a folder."""
    return {rel: sha256_hex(storage.read_bytes(storage.join(folder, rel))) for rel in storage.list_files(folder)}


def _output(files: dict[str, str]) -> dict[str, str]:
    """The images and the manifest (settings.json and complete.json also hold timestamps)."""
    return {k: v for k, v in files.items() if k.startswith("images/") or k == "manifest.parquet"}


@pytest.fixture(scope="module")
def reference(ray_local, sd, base_ds, tmp_path_factory) -> dict:
    """An uninterrupted run, one image per Ray batch, one actor, both views at once."""
    ds = _copy(base_ds, tmp_path_factory.mktemp("ref") / "ds")
    summary = synthesize(ds, sd, cfg(views=2, batch_size=1, concurrency=1))
    return {"ds": ds, "summary": summary, "key": summary["key"], "files": _files(summary["uri"]),
            "manifest_bytes": storage.read_bytes(summary["manifest"])}


# ------------------------------------------------------------------------------------- no Ray needed


def test_prompts_fit_the_text_encoder_and_name_the_mention(sd):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(Path(sd) / "tokenizer"))
    short = render_prompt("An image of {mention}: {sentence}", "Alice Smith", "Alice and Bob in Paris.")
    assert short == "An image of Alice Smith: Alice and Bob in Paris."
    assert fit_prompt(short, tok, 77) == short
    text = render_prompt("An image of {mention}: {sentence}", "Cathedral", "stone arches " * 100)
    cut = fit_prompt(text, tok, 77)
    assert text.startswith(cut) and len(cut) < len(text) and not cut.endswith(" ")
    assert len(tok(cut)["input_ids"]) <= 77
    assert len(tok(cut + " " + text[len(cut):].split()[0])["input_ids"]) > 77      # the longest that fits
    # a single word longer than the budget is cut by tokens
    assert len(tok(fit_prompt("x" * 2000, tok, 20))["input_ids"]) <= 20
    for bad in ("{mention} {caption}", "{} {sentence}", "{0}"):
        with pytest.raises(UsageError):
            synthesis_settings(sd, cfg(template=bad))


def test_file_names_are_safe_and_unique():
    ids = ["a/b", "a:b", "a_b", "../x", ".hidden", "Zoë Dvořák", "x" * 300]
    paths = [image_relpath("k", mid, 0) for mid in ids]
    assert len(set(paths)) == len(paths)
    for p in paths:
        name = p.rsplit("/", 1)[-1]
        assert p.startswith("synthetic/k/images/") and p.count("/") == 4
        assert not name.startswith(".") and len(name) < 120
        assert all(c.isalnum() or c in "._-" for c in name)
    assert image_relpath("k", "a/b", 0) != image_relpath("k", "a/b", 1)


def test_key_covers_what_changes_pixels_and_only_that(sd, tmp_path):
    base = synthesis_settings(sd, cfg())
    assert synthesis_key(base) == synthesis_key(synthesis_settings(sd, cfg()))
    # a copied model folder is the same model; a changed weight is not
    copy = tmp_path / "sd-copy"
    shutil.copytree(sd, copy)
    assert synthesis_key(synthesis_settings(str(copy), cfg())) == synthesis_key(base)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    keys = {synthesis_key(base), synthesis_key(synthesis_settings(str(copy), cfg()))}
    for change in ({"seed": 1}, {"steps": 3}, {"size": 64}, {"guidance": 5.0}, {"scheduler": "ddim"},
                   {"template": "A photo of {mention}"}, {"dtype": "bfloat16"}, {"cpu_threads": 2},
                   {"num_gpus": 1}):
        threads = change.pop("cpu_threads", None)       # the workers' torch threads: not a config value
        keys.add(synthesis_key(synthesis_settings(sd, cfg(**change), cpu_threads=threads)))
    assert len(keys) == 11
    with pytest.raises(UsageError, match="no safety checker"):      # the tiny model has none
        synthesis_settings(sd, cfg(safety_checker=True))
    with pytest.raises(UsageError):
        synthesis_settings(sd, cfg(scheduler="nope"))


def test_nothing_to_draw_resolves_no_diffusion_model(small_data, tmp_path):
    """A run that reads no view (model.cvacpt_weight 0, model.views 0; a sweep whose tune.views are all 0) skips
    the synthesize stage with the reason and never looks at models.diffusion (here a folder that does not exist),
    nor do the features and finetune stages' synthetic keys; when views are read, the same setting is one line."""
    from mel_ray import pipeline
    from mel_ray.config import load_config

    missing = tmp_path / "no-such-diffusion"
    base = [f"data.dataset={small_data.dataset}", f"models.diffusion={missing}", "synthesize.num_gpus=0"]
    for setting, tune in (("model.cvacpt_weight=0", False), ("model.views=0", False), ("tune.views=[0]", True)):
        config = load_config(None, [*base, setting])
        result = pipeline.synthesize_stage(config, tmp_path, tune=tune)
        assert not result.ran and result.value["key"] is None, setting
        assert result.line().startswith("[pipeline] synthesize: skipped") and setting[:10] in result.note, setting
        if not tune:
            assert pipeline.features_views(config, None, True) is None
            assert pipeline.finetune_views(config, small_data.dataset) is None
    assert not missing.exists()
    reads_views = load_config(None, base)
    for stage in (lambda: pipeline.synthesize_stage(reads_views, tmp_path),
                  lambda: pipeline.features_views(reads_views, None, True),
                  lambda: pipeline.synthesize_stage(load_config(None, [*base, "model.views=0"]), tmp_path, tune=True)):
        with pytest.raises(UsageError, match=f"^{missing}: not a diffusers pipeline folder") as err:
            stage()
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- with Ray


def test_reference_run_layout_and_prompts(reference, sd):
    ds, summary, key = reference["ds"], reference["summary"], reference["key"]
    n = _n_mentions(ds)
    assert summary["generated"] == summary["images"] == 2 * n and summary["skipped"] == 0
    assert summary["complete_views"] == {s: 2 for s in SPLITS}
    out = summary["uri"]
    assert out == storage.join(ds, "synthetic", key)
    assert {"settings.json", "manifest.parquet", "complete.json"} <= set(reference["files"])
    assert not storage.exists(storage.join(out, "parts"))          # merged into the manifest
    settings = storage.read_json(storage.join(out, "settings.json"))
    assert settings["key"] == key and synthesis_key(settings["settings"]) == key
    manifest = storage.read_table(summary["manifest"])
    assert manifest.schema.equals(MANIFEST_SCHEMA)
    rows = manifest.to_pylist()
    assert [(r["mention_id"], r["view"]) for r in rows] == sorted((r["mention_id"], r["view"]) for r in rows)
    for r in rows:
        assert r["seed"] == stable_seed(0, r["mention_id"], r["view"])
        assert r["uri"] == image_relpath(key, r["mention_id"], r["view"])
        assert reference["files"][r["uri"].split(f"{key}/", 1)[1]] == r["sha256"]
        assert r["nsfw"] is None
    by = {(r["mention_id"], r["view"]): r for r in rows}
    a, b = by[(PAIR_IDS[0], 0)], by[(PAIR_IDS[1], 0)]
    assert "Alice Smith" in a["prompt"] and "Bob Jones" in b["prompt"] and a["prompt"] != b["prompt"]
    assert a["sha256"] != b["sha256"] and by[(PAIR_IDS[0], 1)]["sha256"] != a["sha256"]
    long = by[(LONG_ID, 0)]["prompt"]
    assert long.startswith("An image of Cathedral: word0 ") and len(long) < 600
    # the same settings again: same key, nothing generated, nothing rewritten
    before = os.stat(summary["manifest"]).st_mtime_ns
    again = synthesize(ds, sd, cfg(views=2, batch_size=4, concurrency=2))
    assert (again["key"], again["generated"], again["skipped"]) == (key, 0, 2 * n)
    assert os.stat(summary["manifest"]).st_mtime_ns == before
    # the plain in-process generator, given the key's settings, gives the very same bytes as the Ray actors
    gen = ViewGenerator(dataset_uri=ds, key="plain", model=sd, settings=settings["settings"], write_parts=False)
    batch = pa.Table.from_pylist([{"mention_id": PAIR_IDS[1], "view": 1, "seed": by[(PAIR_IDS[1], 1)]["seed"],
                                   "mention": "Bob Jones", "sentence": PAIR_SENTENCE}])
    plain = gen(batch).to_pylist()[0]
    assert plain["sha256"] == by[(PAIR_IDS[1], 1)]["sha256"] and plain["prompt"] == by[(PAIR_IDS[1], 1)]["prompt"]


@pytest.fixture(scope="module")
def batched(reference, sd, base_ds, tmp_path_factory) -> dict:
    """The same work in batches of 3 over 2 actors."""
    ds = _copy(base_ds, tmp_path_factory.mktemp("batched") / "ds")
    return {"ds": ds, "summary": synthesize(ds, sd, cfg(views=2, batch_size=3, concurrency=2))}


def test_batch_size_and_actor_count_do_not_change_a_byte(reference, batched, sd):
    summary = batched["summary"]
    assert summary["key"] == reference["key"] and summary["generated"] == reference["summary"]["generated"]
    assert _output(_files(summary["uri"])) == _output(reference["files"])
    assert storage.read_bytes(summary["manifest"]) == reference["manifest_bytes"]
    # fewer views than exist: nothing to do, the manifest keeps listing every view that exists
    fewer = synthesize(batched["ds"], sd, cfg(views=1, batch_size=3, concurrency=2))
    assert (fewer["generated"], fewer["images"]) == (0, summary["images"])


def test_more_views_later_and_other_settings_elsewhere(batched, sd):
    ds, first = batched["ds"], batched["summary"]
    manifest_bytes = storage.read_bytes(first["manifest"])
    # views are not part of the key: asking for a third view generates only that one
    more = synthesize(ds, sd, cfg(views=3, batch_size=2, concurrency=1), limit=2)
    assert more["key"] == first["key"]
    assert (more["generated"], more["skipped"], more["images"]) == (2, 4, first["images"] + 2)
    assert more["complete_views"] == first["complete_views"]          # only 2 mentions have a third view
    rows = storage.read_table(more["manifest"])
    assert rows.filter(pc.equal(rows.column("view"), 2)).num_rows == 2
    # another seed: another key, another folder; the first one is left alone
    other = synthesize(ds, sd, cfg(views=1, seed=1, batch_size=2, concurrency=1), limit=2)
    assert other["key"] != first["key"] and other["generated"] == 2
    assert set(list_keys(ds)) == {first["key"], other["key"]}
    old = {(r["mention_id"], r["view"]): r for r in storage.read_table(first["manifest"]).to_pylist()}
    for r in storage.read_table(other["manifest"]).to_pylist():
        assert r["sha256"] != old[(r["mention_id"], r["view"])]["sha256"] and f"/{other['key']}/" in r["uri"]
    assert load_synthetic(ds, first["key"]).manifest.num_rows == first["images"] + 2
    assert storage.read_bytes(first["manifest"]) != manifest_bytes   # rewritten with the third views


def _finished_parts(out: Path) -> list[Path]:
    """Record parts written completely. A write cut by the kill leaves a hidden `.tmp-*` file, which the stage
    never lists (storage.list_files) and deletes with the parts folder once the run completes."""
    return [p for p in (out / "parts").glob("*.parquet") if not p.name.startswith(".")]


def _quiet(folder: Path, seconds: float = 3.0, timeout: float = 60.0) -> None:
    """Wait until nothing under `folder` changes for `seconds` (the killed job's actors are gone)."""
    def snapshot():
        return sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()) \
            if folder.exists() else []

    last, since, end = snapshot(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.5)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
    raise AssertionError(f"{folder} kept changing after the kill")


def test_killed_run_resumes_with_only_the_missing_pairs(reference, sd, base_ds, tmp_path, ray_local):
    ds = _copy(base_ds, tmp_path / "ds")
    n_pairs = 2 * _n_mentions(ds)
    key = reference["key"]
    out = Path(ds) / "synthetic" / key
    script = textwrap.dedent(f"""
        from mel_ray.config import SynthesizeConfig
        from mel_ray.synthesize import synthesize
        synthesize({ds!r}, {sd!r}, SynthesizeConfig(views=2, batch_size=1, concurrency=1, steps=2, size=32,
                                                    num_gpus=0))
    """)
    env = {**os.environ, "RAY_ADDRESS": ray_local.address_info["gcs_address"]}   # + the session's token
    run_and_kill(script, lambda: len(_finished_parts(out)) >= 3, env=env, log=tmp_path / "killed-run.log",
                 timeout=120, what="3 finished record parts")     # the driver and its process group
    _quiet(out)
    assert not (out / "manifest.parquet").exists() and not (out / "complete.json").exists()
    parts = [storage.read_table(str(p)) for p in _finished_parts(out)]
    recorded = sum(t.num_rows for t in parts)
    assert 3 <= recorded < n_pairs
    resumed = synthesize(ds, sd, cfg(views=2, batch_size=3, concurrency=1))
    assert resumed["key"] == key
    assert (resumed["skipped"], resumed["generated"]) == (recorded, n_pairs - recorded)
    assert _output(_files(resumed["uri"])) == _output(reference["files"])
    assert storage.read_bytes(resumed["manifest"]) == reference["manifest_bytes"]
    assert not (out / "parts").exists()      # merged into the manifest, cut writes' temporary files with them


def test_s3_round_trip_and_view_grid(reference, sd, base_ds, s3_bucket, s3_client, tmp_path):
    from PIL import Image

    ds = f"{s3_bucket}/datasets/synth"
    for rel in storage.list_files(str(base_ds)):
        if not rel.startswith("synthetic/"):
            storage.copy_file(str(base_ds / rel), f"{ds}/{rel}")
    dev = load_dataset(ds).mentions("dev").column("mention_id").to_pylist()
    summary = synthesize(ds, sd, cfg(views=1, batch_size=2, concurrency=1), splits=("dev",))
    assert summary["key"] == reference["key"] and summary["generated"] == len(dev)
    assert summary["complete_views"]["dev"] == 1 and summary["complete_views"]["train"] == 0
    bucket = s3_bucket.removeprefix("s3://")
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix=f"datasets/synth/synthetic/{summary['key']}/")
    names = {o["Key"].split(f"{summary['key']}/", 1)[1] for o in listed["Contents"]}
    assert {"settings.json", "manifest.parquet", "complete.json"} <= names
    assert sum(n.endswith(".png") for n in names) == len(dev)
    ref = {(r["mention_id"], r["view"]): r for r in storage.read_table(reference["summary"]["manifest"]).to_pylist()}
    rows = storage.read_table(summary["manifest"]).to_pylist()
    assert [r["mention_id"] for r in rows] == sorted(dev)
    for r in rows:
        assert r == ref[(r["mention_id"], 0)]                     # same bytes as on local disk
        body = s3_client.get_object(Bucket=bucket, Key=f"datasets/synth/{r['uri']}")["Body"].read()
        assert sha256_hex(body) == r["sha256"]
    assert synthesize(ds, sd, cfg(views=1), splits=("dev",))["generated"] == 0

    grid_uri = show_views(ds, None, [PAIR_IDS[0], dev[0]], f"{s3_bucket}/grids/dev.png")
    grid = Image.open(io.BytesIO(storage.read_bytes(grid_uri)))
    assert grid.size[0] >= 2 * 160 and grid.size[1] >= 2 * 160
    local = show_views(reference["ds"], reference["key"], [PAIR_IDS[0], PAIR_IDS[1]], str(tmp_path / "g.png"))
    assert Image.open(local).size[0] >= 3 * 160                     # mention image + 2 views
    with pytest.raises(UsageError):
        show_views(reference["ds"], None, ["no-such-mention"], str(tmp_path / "x.png"))


# ------------------------------------------------------------------------------ the CLI runs the job's stage


def _last_json(text: str) -> dict:
    import json

    return json.loads(text.strip().splitlines()[-1])


def _run_job(script: str, argv: list[str], monkeypatch) -> None:
    """jobs/<script> as `python jobs/<script> ARGV` runs it (in this process, so it uses the test's Ray)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "jobs" / script), run_name="__main__")
    assert done.value.code == 0


def test_cli_and_job_write_the_same_keys_for_the_same_config(reference, sd, tmp_path, capsys, monkeypatch):
    """`mel-ray synthesize / extract-features` with flags == jobs/synthesize.py / extract_features.py with the
    same values in the config: the same stage, the same synthetic and features keys (the CLI once forgot
    `views=` and keyed features differently)."""
    import yaml

    from mel_ray import cli
    from mel_ray.tiny_models import make_tiny_models

    ds = reference["ds"]
    clip = make_tiny_models(str(Path(sd).parent))["clip"]      # complete already: only returns the paths
    section = {**RUN, "views": 2, "batch_size": 4}
    common = {"synthesize": section, "features": {"num_gpus": 0, "batch_size": 16}}
    job_cfg, cli_cfg = tmp_path / "job.yaml", tmp_path / "cli.yaml"
    job_cfg.write_text(yaml.safe_dump({"data": {"dataset": ds}, "models": {"diffusion": sd, "clip": clip},
                                       **common}))
    cli_cfg.write_text(yaml.safe_dump({**common, "synthesize": {**section, "views": 1}}))  # --views wins

    _run_job("synthesize.py", ["--config", str(job_cfg)], monkeypatch)
    job = _last_json(capsys.readouterr().out)
    assert cli.main(["synthesize", "--config", str(cli_cfg), "--dataset", ds, "--model", sd, "--views", "2"]) == 0
    by_cli = _last_json(capsys.readouterr().out)
    assert job["key"] == by_cli["key"] == reference["key"] and job["skipped"] and by_cli["skipped"]

    _run_job("extract_features.py", ["--config", str(job_cfg)], monkeypatch)
    job = _last_json(capsys.readouterr().out)
    assert cli.main(["extract-features", "--config", str(cli_cfg), "--dataset", ds, "--model", clip,
                     "--set", f"models.diffusion={sd}", "--views", "2"]) == 0
    by_cli = _last_json(capsys.readouterr().out)
    assert not job["skipped"] and by_cli["skipped"]            # the CLI found the job's complete output
    assert by_cli["key"] == job["key"] and by_cli["uri"] == job["uri"]
    manifest = storage.read_json(storage.join(job["uri"], "manifest.json"))
    assert manifest["settings"]["synthetic"] == reference["key"] and manifest["settings"]["synthetic_views"] == 2
