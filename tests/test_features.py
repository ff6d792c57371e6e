"""extract-features: shapes and dtypes as the manifest says, equality with a direct CLIPModel call, image
flags and counters (missing / corrupt images and synthetic views), synthetic rows vs the synthetic manifest,
byte-identical output across batch sizes, actor counts and engines, SIGKILL + resume, S3 round trip."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from killing import run_and_kill
from PIL import Image

from mel_ray import storage
from mel_ray.config import FeaturesConfig, IngestConfig
from mel_ray.dataset import SPLITS, load_dataset
from mel_ray.errors import DataError, UsageError
from mel_ray.features import (
    MANIFEST,
    entity_text,
    extract_features,
    image_config,
    load_features,
    mention_text,
    model_fingerprint,
    preprocess_image,
    read_shard,
    to_rgb,
)
from mel_ray.ingest import ingest
from mel_ray.keys import sha256_hex, stable_seed
from mel_ray.synthesize import MANIFEST_SCHEMA

SYNTH = "synthkey0"
N_S = 3
SMALL = {"micro_batch": 4, "shard_rows": 16, "quiet": True}    # many shards and units on a small dataset


def fc(**changes) -> FeaturesConfig:
    """The features config section of these tests: CPU encoders + `changes`."""
    return FeaturesConfig(**{"num_gpus": 0, **changes})

SYNTH_SCHEMA = MANIFEST_SCHEMA          # the synthesize stage's own manifest schema (nsfw stays null here)


def _png(seed: int, side: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_synthetic(dataset_uri: str, key: str = SYNTH, n_s: int = N_S) -> dict[str, list[dict]]:
    """The synthesize stage's output contract (mel_ray/synthesize.py), written by hand: 0..n_s PNG views per
    mention under DATASET/synthetic/<key>/images/, manifest.parquet (mention_id, view, seed, prompt, uri,
    sha256), settings.json, complete.json written last."""
    ds = load_dataset(dataset_uri)
    rows: list[dict] = []
    for split in SPLITS:
        for mid in ds.mentions(split, columns=["mention_id"]).column("mention_id").to_pylist():
            for view in range(stable_seed("views", mid) % (n_s + 1)):
                data = _png(stable_seed(mid, view))
                rel = f"synthetic/{key}/images/{mid[-2:]}/{mid}_{view}.png"
                storage.write_bytes(ds.path(rel), data)
                rows.append({"mention_id": mid, "view": view, "seed": stable_seed(mid, view),
                             "prompt": f"An image of {mid}", "uri": rel, "sha256": sha256_hex(data)})
    storage.write_table(ds.path("synthetic", key, "manifest.parquet"), pa.Table.from_pylist(rows, schema=SYNTH_SCHEMA))
    storage.write_json(ds.path("synthetic", key, "settings.json"), {"key": key, "settings": {"by": "hand"}})
    storage.write_json(ds.path("synthetic", key, "complete.json"), {"key": key, "images": len(rows)})
    by_mention: dict[str, list[dict]] = {}
    for r in rows:
        by_mention.setdefault(r["mention_id"], []).append(r)
    return by_mention


def _files(uri: str) -> dict[str, bytes]:
    return {rel: storage.read_bytes(storage.join(uri, rel)) for rel in storage.list_files(uri)}


@pytest.fixture(scope="module")
def world(small_data, tmp_path_factory) -> SimpleNamespace:
    """The session's small dataset, copied (the hand-written synthetic views and the features go into it)."""
    root = tmp_path_factory.mktemp("features")
    ds = small_data.copy(root)
    synthetic = make_synthetic(ds)
    return SimpleNamespace(root=root, clip=small_data.models["clip"], ds=ds, synthetic=synthetic,
                           raw=small_data.raw, name=small_data.name)


@pytest.fixture(scope="module")
def reference(world, ray_local) -> dict:
    """batch_size 1, one actor: every other run must produce these exact bytes."""
    manifest = extract_features(world.ds, world.clip, fc(batch_size=1, concurrency=1), synthetic_key=SYNTH,
                                features_root=str(world.root / "f-ref"), **SMALL)
    return {"manifest": manifest, "files": _files(manifest["uri"])}


@pytest.fixture(scope="module")
def direct(world):
    """A plain CLIPModel call, MIMIC-style: tokenizer to 40 tokens, LANCZOS resize, CLIP processor."""
    import torch

    from mel_ray.models import load_clip

    model, proc = load_clip(world.clip)

    def encode(text: str, image: Image.Image | None):
        enc = proc.tokenizer([text], padding="max_length", max_length=40, truncation=True, return_tensors="pt")
        img = (image or Image.new("RGB", (32, 32), (255, 255, 255))).convert("RGB")
        px = proc.image_processor(images=[img.resize((32, 32), Image.Resampling.LANCZOS)],
                                  return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px)
        return {"text_global": out.text_embeds[0].numpy(),
                "text_local": out.text_model_output.last_hidden_state[0].numpy(),
                "text_mask": enc["attention_mask"][0].numpy(), "image_global": out.image_embeds[0].numpy(),
                "image_local": out.vision_model_output.last_hidden_state[0].numpy()}
    return encode


def _close(stored: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(stored.astype(np.float32), expected.astype(np.float32), rtol=1e-2, atol=2e-3)


# --------------------------------------------------------------------------------------------- pure parts


def test_text_templates_follow_mimic():
    assert entity_text("Gordon Brown", ["instance of: human", "occupation: politician"]) == \
        "Gordon Brown [SEP] instance of: human. occupation: politician."
    assert entity_text("Gordon Brown", []) == "Gordon Brown [SEP] "
    assert mention_text("Brown", "Brown spoke today.") == "Brown [SEP] Brown spoke today."


def test_model_fingerprint_is_by_content(world, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "clip-copy"
    shutil.copytree(world.clip, copy)
    assert model_fingerprint(str(copy)) == model_fingerprint(world.clip)
    # a hub id is named by the commit it is pinned to; offline and uncached there is none to name
    with pytest.raises(UsageError, match="openai/clip-vit-base-patch32: cannot tell which commit"):
        model_fingerprint("openai/clip-vit-base-patch32")
    weights = load_file(str(copy / "model.safetensors"))
    name = min(weights)
    weights[name] = weights[name] + torch.ones_like(weights[name])
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert model_fingerprint(str(copy)) != model_fingerprint(world.clip)


@pytest.mark.parametrize("sizes", [
    {},                                                                      # CLIP ViT: 224 / 224
    {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 30}},   # resize, then crop
    {"size": {"shortest_edge": 20}, "crop_size": {"height": 32, "width": 32}},   # crop pads with zeros
    {"size": {"height": 20, "width": 36}, "crop_size": {"height": 16, "width": 16}},
])
def test_preprocessing_is_bit_identical_to_transformers_pil_backend(sizes):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(**sizes)
    cfg = image_config(hf)
    rng = np.random.default_rng(0)
    for shape, mode in [((32, 32, 3), "RGB"), ((47, 23, 3), "RGB"), ((13, 70, 4), "RGBA"), ((90, 60), "P")]:
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode)
        ours = preprocess_image(to_rgb(image), cfg)
        theirs = hf(images=[image], return_tensors="np")["pixel_values"][0]
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        assert np.array_equal(ours, theirs), (sizes, shape, mode)


def test_unknown_or_unfinished_synthetic_key_is_a_data_error(world, tmp_path):
    with pytest.raises(DataError, match="synthesize"):
        extract_features(world.ds, world.clip, fc(), synthetic_key="nope", engine="local", **SMALL)
    ds_uri = str(tmp_path / "ds")
    shutil.copytree(world.ds, ds_uri)
    (Path(ds_uri) / "synthetic" / SYNTH / "complete.json").unlink()          # a synthesize run that did not finish
    with pytest.raises(DataError, match="complete"):
        extract_features(ds_uri, world.clip, fc(), synthetic_key=SYNTH, engine="local", **SMALL)


def test_views_limits_synthetic_views_to_the_first_n(world, reference, tmp_path):
    out = extract_features(world.ds, world.clip, fc(), synthetic_key=SYNTH, views=2, engine="local",
                           features_root=str(tmp_path), **SMALL)
    assert out["key"] != reference["manifest"]["key"] and out["shapes"]["synthetic_global"] == [2, 32]
    full = load_features(reference["manifest"]["uri"], "mentions/train")
    two = load_features(out["uri"], "mentions/train")
    for i, mid in enumerate(two["mention_id"]):
        views = [r["view"] for r in world.synthetic.get(mid, []) if r["view"] < 2]
        assert two["synthetic_view_ids"][i] == views and two["n_views"][i] == len(views)
        _close(two["synthetic_global"][i], full["synthetic_global"][i, :2])
    for col in ("text_global", "text_local", "image_global", "image_local", "has_image"):
        assert np.array_equal(two[col], full[col]), col      # a row's own features do not depend on the views


# ------------------------------------------------------------------------------------ the reference run


def test_layout_shapes_and_dtypes_match_the_manifest(world, reference):
    manifest = reference["manifest"]
    uri = manifest["uri"]
    assert json.loads(reference["files"][MANIFEST]) == {k: v for k, v in manifest.items() if k not in ("uri", "run")}
    ds = load_dataset(world.ds)
    shapes = manifest["shapes"]
    assert shapes == {"text_global": [32], "text_local": [40, 32], "text_mask": [40], "image_global": [32],
                      "image_local": [17, 32], "synthetic_global": [N_S, 32]}      # tiny CLIP: 16 patches + CLS
    assert set(manifest["tables"]) == {"entities", "mentions/train", "mentions/dev", "mentions/test"}
    for name, info in manifest["tables"].items():
        source = ds.entities() if name == "entities" else ds.mentions(name.split("/")[1])
        assert info["rows"] == source.num_rows
        assert info["shards"] == [f"{name}/part-{i:05d}.parquet" for i in range(-(-source.num_rows // 16))]
        ids = []
        for i, shard in enumerate(info["shards"]):
            table = pq.read_table(storage.join(uri, shard))
            assert table.column_names == info["columns"]
            assert table.num_rows == min(16, source.num_rows - 16 * i)
            for col in info["columns"]:
                typ = table.schema.field(col).type
                if col in shapes:
                    assert pa.types.is_fixed_size_list(typ), col
                    assert typ.list_size == int(np.prod(shapes[col])), col
                    assert str(typ.value_type) == {"float16": "halffloat"}.get(manifest["dtypes"][col],
                                                                                manifest["dtypes"][col]), col
                    assert json.loads(table.schema.field(col).metadata[b"shape"]) == shapes[col]
            assert table.schema.field("has_image").type == pa.bool_()
            ids += table.column(info["columns"][0]).to_pylist()
        assert ids == source.column(info["columns"][0]).to_pylist()     # dataset row order, nothing lost
        loaded = load_features(uri, name)
        for col, shape in shapes.items():
            if col in loaded:
                assert loaded[col].shape == (source.num_rows, *shape)
                assert loaded[col].dtype == np.dtype(manifest["dtypes"][col])
        assert loaded["text_mask"].dtype == np.int8 and loaded["has_image"].dtype == np.bool_
    assert manifest["encoders"] == ["cpu/threads=1"]


def test_features_equal_a_direct_clip_call(world, reference, direct):
    uri = reference["manifest"]["uri"]
    ds = load_dataset(world.ds)
    ents = ds.entities().to_pylist()
    feats = load_features(uri, "entities")
    two = next(e for e in ents if len(e["image_uris"]) >= 2)    # the first image is the one encoded
    row = two["entity_id"]
    first = Image.open(ds.resolve_uri(two["image_uris"][0]))
    want = direct(entity_text(two["name"], two["attributes"]), first)
    for col, expected in want.items():
        _close(feats[col][row], expected)
    second = direct(entity_text(two["name"], two["attributes"]), Image.open(ds.resolve_uri(two["image_uris"][1])))
    stored = feats["image_local"][row].astype(np.float32)
    assert np.abs(stored - second["image_local"]).max() > 10 * np.abs(stored - want["image_local"]).max()
    blank = next(e for e in ents if not e["image_uris"])             # no image: a white blank is encoded
    _close(feats["image_global"][blank["entity_id"]], direct("x", None)["image_global"])
    # a mention with an image and synthetic views
    mentions = ds.mentions("train").to_pylist()
    mfeats = load_features(uri, "mentions/train")
    i, m = next((i, m) for i, m in enumerate(mentions)
                if m["image_uri"] and len(world.synthetic.get(m["mention_id"], [])) >= 2)
    want = direct(mention_text(m["mention"], m["sentence"]), Image.open(ds.resolve_uri(m["image_uri"])))
    for col, expected in want.items():
        _close(mfeats[col][i], expected)
    for j, view in enumerate(world.synthetic[m["mention_id"]]):
        synth = direct("x", Image.open(ds.resolve_uri(view["uri"])))
        _close(mfeats["synthetic_global"][i, j], synth["image_global"])


def test_has_image_and_counters_follow_the_data(world, reference):
    ds = load_dataset(world.ds)
    manifest = reference["manifest"]
    ents = ds.entities(columns=["image_uris"]).column("image_uris").to_pylist()
    feats = load_features(manifest["uri"], "entities", columns=["entity_id", "has_image"])
    assert feats["has_image"].tolist() == [bool(u) for u in ents]
    assert manifest["counters"]["entities"] == {"rows": len(ents), "with_image": sum(map(bool, ents)),
                                                "no_image": sum(not u for u in ents),
                                                "blank_shared": sum(not u for u in ents), "examples": {}}
    without = 0
    for split in SPLITS:
        uris = ds.mentions(split, columns=["image_uri"]).column("image_uri").to_pylist()
        flags = load_features(manifest["uri"], f"mentions/{split}", columns=["has_image"])["has_image"]
        assert flags.tolist() == [u is not None for u in uris]
        without += uris.count(None)
        counters = manifest["counters"][f"mentions/{split}"]
        assert counters.get("no_image", 0) == uris.count(None) and "missing" not in counters
        assert counters.get("blank_shared", 0) == uris.count(None)
    assert without > 0, "the demo data is meant to have mentions without an image"


@pytest.fixture
def clip_encoder(world):
    """A CPU Encoder of the tiny CLIP in this process (torch's thread count put back afterwards) and its
    tokenizer, image settings and size."""
    import torch

    from mel_ray.features import Encoder, load_processor, output_size
    from mel_ray.models import DEFAULT_CACHE

    threads = torch.get_num_threads()
    tokenizer, cfg = load_processor(world.clip, DEFAULT_CACHE)
    size = output_size(cfg)
    try:
        yield SimpleNamespace(encoder=Encoder(world.clip, DEFAULT_CACHE, None, False, size, 40, image_cfg=cfg),
                              tokenizer=tokenizer, cfg=cfg, size=size)
    finally:
        torch.set_num_threads(threads)


def test_rows_without_an_image_share_the_blank_encoded_alone(world, reference, clip_encoder, tmp_path):
    """Each encoder encodes the blank white image once, alone; every image-less row (whatever unit it sat in,
    beside rows with images or not) gets exactly those features, and has_image stays false. The settings name the
    encoding version (new key); a set made before it (no encoding_version) still verifies and loads."""
    from mel_ray.features import ENCODING_VERSION, blank_pixels, tokenize
    from mel_ray.verify import require_features

    manifest = reference["manifest"]
    assert manifest["settings"]["encoding_version"] == ENCODING_VERSION == 2
    ids, mask = tokenize(clip_encoder.tokenizer, ["x"], 40)
    # the blank as the only image of a one-row unit: the ordinary path, not the shared one
    pixels = blank_pixels(clip_encoder.cfg, clip_encoder.size)
    alone = clip_encoder.encoder.encode(ids.astype(np.int64), mask, pixels, 1)
    mixed = 0
    for table in ("entities", "mentions/train", "mentions/test"):
        f = load_features(manifest["uri"], table, columns=["has_image", "image_global", "image_local"])
        blank = ~f["has_image"]
        assert blank.any() and f["has_image"].any(), table
        assert (f["image_global"][blank] == alone["image_global"][0]).all(), table
        assert (f["image_local"][blank] == alone["image_local"][0]).all(), table
        assert not (f["image_global"][~blank] == alone["image_global"][0]).all(axis=1).any(), table
        units = f["has_image"][:len(blank) // 4 * 4].reshape(-1, 4)       # micro_batch 4
        mixed += int((units.any(axis=1) & ~units.all(axis=1)).sum())
    assert mixed, "some units should mix rows with and without an image"
    old = tmp_path / "old-set"
    shutil.copytree(manifest["uri"], old)
    stored = json.loads((old / MANIFEST).read_text())
    del stored["settings"]["encoding_version"]
    (old / MANIFEST).write_text(json.dumps(stored))
    require_features(str(old), world.ds)
    assert np.array_equal(load_features(str(old), "entities")["image_local"],
                          load_features(manifest["uri"], "entities")["image_local"])


def test_the_decode_stage_ships_no_pixels_for_rows_without_an_image(world, clip_encoder):
    from mel_ray.features import prepare_unit

    ds = load_dataset(world.ds)
    uri = ds.resolve_uri(next(u for u in ds.mentions("train", columns=["image_uri"]).column("image_uri").to_pylist()
                              if u))
    unit = prepare_unit({"i": [None, uri, str(Path(world.root) / "gone.png"), None]}, image_cfg=clip_encoder.cfg,
                        image_size=clip_encoder.size)
    assert unit["pixels"].shape == (1, 3, *clip_encoder.size)
    assert unit["has_image"].tolist() == [False, True, False, False]
    assert {k: unit["stats"].get(k) for k in ("with_image", "no_image", "missing", "blank_shared")} == \
        {"with_image": 1, "no_image": 2, "missing": 1, "blank_shared": 3}
    nothing = prepare_unit({"i": [None, None]}, image_cfg=clip_encoder.cfg, image_size=clip_encoder.size)
    assert nothing["pixels"].shape == (0, 3, *clip_encoder.size) and not nothing["has_image"].any()


def test_link_encodes_a_mention_without_an_image_as_the_kb_s_blank(world, reference, clip_encoder, direct, tmp_path):
    """mel-ray link prepares and encodes new mentions with the same functions, one mention per forward: a mention
    without an image gets the shared blank's features, bit for bit those of the KB's image-less rows (as link's
    lone blank always was); a mention with an image is its image alone, as before."""
    import torch

    from mel_ray.link import MentionEncoder
    from mel_ray.models import DEFAULT_CACHE

    ds = load_dataset(world.ds)
    m = next(m for m in ds.mentions("train").to_pylist() if m["image_uri"])
    batch = {"mention_id": np.array(["none", "with"], object), "mention": np.array([m["mention"]] * 2, object),
             "text": np.array([m["sentence"]] * 2, object),
             "image": np.array([None, ds.resolve_uri(m["image_uri"])], object)}
    threads = torch.get_num_threads()
    try:
        out = MentionEncoder(world.clip, DEFAULT_CACHE, 40, False, 0, str(tmp_path), "")(batch)
    finally:
        torch.set_num_threads(threads)
    assert out["has_image"].tolist() == [False, True]
    kb = load_features(reference["manifest"]["uri"], "entities", columns=["has_image", "image_global", "image_local"])
    row = int(np.flatnonzero(~kb["has_image"])[0])
    assert np.array_equal(out["image_global"][0], kb["image_global"][row])
    assert np.array_equal(out["image_local"][0], kb["image_local"][row])
    want = direct(mention_text(m["mention"], m["sentence"]), Image.open(ds.resolve_uri(m["image_uri"])))
    for col in ("text_global", "text_local", "image_global", "image_local"):
        _close(out[col][1], want[col])
    assert np.array_equal(out["text_global"][0], out["text_global"][1])


def test_synthetic_rows_match_the_synthetic_manifest(world, reference):
    manifest = reference["manifest"]
    assert manifest["n_views"] == N_S
    listed = used = 0
    for split in SPLITS:
        f = load_features(manifest["uri"], f"mentions/{split}")
        for i, mid in enumerate(f["mention_id"]):
            views = [r["view"] for r in world.synthetic.get(mid, [])]
            assert f["n_views"][i] == len(views)
            assert f["synthetic_view_ids"][i] == views
            rows = f["synthetic_global"][i].astype(np.float32)
            assert np.all(np.abs(rows[:len(views)]).sum(axis=1) > 0)
            assert not rows[len(views):].any(), "rows beyond n_views must be zeros"
            listed += len(views)
        synth = manifest["counters"][f"mentions/{split}"]["synthetic"]
        used += synth["used"]
        assert synth["listed"] == synth["used"]
    assert listed == used == sum(len(v) for v in world.synthetic.values()) > 0


def test_rerun_skips_everything(world, reference):
    uri = reference["manifest"]["uri"]
    before = {p: p.stat().st_mtime_ns for p in Path(uri).rglob("*") if p.is_file()}
    again = extract_features(world.ds, world.clip, fc(), synthetic_key=SYNTH,
                             features_root=str(world.root / "f-ref"), **SMALL)
    assert again["run"]["shards_written"] == 0 and again["run"]["shards_skipped"] == len(before) - 1
    assert {p: p.stat().st_mtime_ns for p in Path(uri).rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------------------- determinism


# batch_size 1 vs 7 with one actor is also checked by test_round_trip_on_s3 (batch_size 7, one actor)
@pytest.mark.parametrize("batch_size,concurrency,engine", [(7, 2, "ray"), (64, 1, "local")])
def test_output_does_not_depend_on_batch_size_actors_or_engine(world, reference, batch_size, concurrency, engine):
    out = extract_features(world.ds, world.clip, fc(batch_size=batch_size, concurrency=concurrency),
                           synthetic_key=SYNTH, engine=engine,
                           features_root=str(world.root / f"f-{batch_size}-{concurrency}-{engine}"),
                           **SMALL)
    assert out["key"] == reference["manifest"]["key"]
    files = _files(out["uri"])
    assert sorted(files) == sorted(reference["files"])
    assert [f for f in files if files[f] != reference["files"][f]] == []


# ----------------------------------------------------------------------------------- bad images, views


def test_corrupt_and_missing_images_are_counted_and_flagged(world, tmp_path):
    ds_uri = str(tmp_path / "ds")
    shutil.copytree(world.ds, ds_uri)
    ds = load_dataset(ds_uri)
    ents = ds.entities().to_pylist()
    bad_ent = next(e for e in ents if len(e["image_uris"]) >= 2)
    Path(ds.resolve_uri(bad_ent["image_uris"][0])).write_bytes(b"\x89PNG\r\n\x1a\n garbage, not an image")
    train = ds.mentions("train").to_pylist()
    with_img = [i for i, m in enumerate(train) if m["image_uri"]]
    corrupt, gone, folder = with_img[0], with_img[1], with_img[2]
    shared = {ds.resolve_uri(train[i]["image_uri"]) for i in (corrupt, gone, folder)}
    assert not {ds.resolve_uri(u) for e in ents for u in e["image_uris"]} & shared
    Path(ds.resolve_uri(train[corrupt]["image_uri"])).write_bytes(os.urandom(300))
    Path(ds.resolve_uri(train[gone]["image_uri"])).unlink()
    Path(ds.resolve_uri(train[folder]["image_uri"])).unlink()
    Path(ds.resolve_uri(train[folder]["image_uri"])).mkdir()      # a folder is no image: counted as missing
    # synthetic views: one undecodable (its manifest sha256 updated to match), one replaced by a valid
    # image whose bytes no longer match the manifest's sha256
    multi = [i for i, m in enumerate(train) if len(world.synthetic.get(m["mention_id"], [])) >= 2]
    v_bad, v_swap = world.synthetic[train[multi[0]]["mention_id"]][0], world.synthetic[train[multi[1]]["mention_id"]][1]
    garbage = b"GIF89a truncated"
    Path(ds.resolve_uri(v_bad["uri"])).write_bytes(garbage)
    Path(ds.resolve_uri(v_swap["uri"])).write_bytes(_png(12345))
    rows = [r for views in world.synthetic.values() for r in views]
    rows = [{**r, "sha256": sha256_hex(garbage)} if r["uri"] == v_bad["uri"] else r for r in rows]
    storage.write_table(ds.path("synthetic", SYNTH, "manifest.parquet"),
                        pa.Table.from_pylist(rows, schema=SYNTH_SCHEMA))

    out = extract_features(ds_uri, world.clip, fc(), synthetic_key=SYNTH, engine="local", **SMALL)
    c = out["counters"]
    assert c["entities"]["undecodable"] == 1 and c["entities"]["examples"]["undecodable"] == \
        [ds.resolve_uri(bad_ent["image_uris"][0])]
    t = c["mentions/train"]
    assert t["undecodable"] == 1 and t["missing"] == 2
    assert t["examples"]["missing"] == [ds.resolve_uri(train[i]["image_uri"]) for i in sorted((gone, folder))]
    assert t["synthetic"]["undecodable"] == 1 and t["synthetic"]["mismatched"] == 1
    assert t["synthetic"]["used"] == t["synthetic"]["listed"] - 2
    assert t["with_image"] == len(with_img) - 3
    ef = load_features(out["uri"], "entities", columns=["has_image"])
    assert not ef["has_image"][bad_ent["entity_id"]]
    assert ef["has_image"].sum() == sum(bool(e["image_uris"]) for e in ents) - 1
    mf = load_features(out["uri"], "mentions/train")
    assert not mf["has_image"][corrupt] and not mf["has_image"][gone] and not mf["has_image"][folder]
    assert mf["has_image"].sum() == len(with_img) - 3
    for row, view in ((multi[0], v_bad), (multi[1], v_swap)):
        views = [r["view"] for r in world.synthetic[train[row]["mention_id"]]]
        kept = [v for v in views if v != view["view"]]
        assert mf["synthetic_view_ids"][row] == kept and mf["n_views"][row] == len(kept)
        assert not mf["synthetic_global"][row, len(kept):].any()


# ----------------------------------------------------------------------------------- kill, S3


KILL_SCRIPT = """
import sys, time
import mel_ray.features as f
from mel_ray.features import shards
write = shards.write_shard
def slow_write(uri, table):          # slow writes, so the kill lands mid-run
    write(uri, table)
    time.sleep(1.0)
shards.write_shard = slow_write
from mel_ray.config import FeaturesConfig
f.extract_features(sys.argv[1], sys.argv[2], FeaturesConfig(batch_size=1, num_gpus=0), synthetic_key=sys.argv[3],
                   features_root=sys.argv[4], micro_batch=4, shard_rows=16)
"""


def test_sigkill_mid_run_then_resume_gives_identical_output(world, reference, ray_local, tmp_path):
    root = tmp_path / "features"
    env = {**os.environ, "RAY_ADDRESS": ray_local.address_info["gcs_address"]}
    total = sum(len(t["shards"]) for t in reference["manifest"]["tables"].values())
    proc = run_and_kill(KILL_SCRIPT, lambda: len(list(root.rglob("part-*.parquet"))) >= 2,
                        args=[world.ds, world.clip, SYNTH, str(root)], env=env, log=tmp_path / "killed-run.log",
                        timeout=150, what="2 written shards")
    assert proc.returncode == -signal.SIGKILL
    key_dir = root / reference["manifest"]["key"]
    survivors = {p: p.stat().st_mtime_ns for p in key_dir.rglob("part-*.parquet")}
    assert 2 <= len(survivors) < total and not (key_dir / MANIFEST).exists()

    out = extract_features(world.ds, world.clip, fc(batch_size=64), synthetic_key=SYNTH, features_root=str(root),
                           **SMALL)
    assert out["run"]["shards_skipped"] == len(survivors)
    assert {p: p.stat().st_mtime_ns for p in survivors} == survivors, "finished shards must not be redone"
    files = _files(out["uri"])
    assert sorted(files) == sorted(reference["files"])
    assert [f for f in files if files[f] != reference["files"][f]] == []


def test_round_trip_on_s3(world, reference, ray_local, s3_bucket, s3_client):
    """Dataset, images, synthetic views and features on the S3 test server, read and written by Ray workers;
    same bytes as the local reference (batch_size 7 there vs 1: batch size does not change the output)."""
    ds_uri = f"{s3_bucket}/datasets/feat"
    ingest("mimic", world.raw, ds_uri, name=world.name, options=IngestConfig())
    make_synthetic(ds_uri)
    out = extract_features(ds_uri, world.clip, fc(batch_size=7, concurrency=1), synthetic_key=SYNTH, **SMALL)
    assert out["uri"] == f"{ds_uri}/features/{reference['manifest']['key']}"   # same tables -> same key
    files = _files(out["uri"])
    assert sorted(files) == sorted(reference["files"])
    assert [f for f in files if files[f] != reference["files"][f]] == []
    bucket, prefix = s3_bucket[len("s3://"):], f"datasets/feat/features/{out['key']}/"
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    assert sorted(o["Key"][len(prefix):] for o in listed["Contents"]) == sorted(files)
    shard = read_shard(f"{out['uri']}/mentions/train/part-00000.parquet")
    assert shard["image_local"].shape == (16, 17, 32)


def test_gpu_stages_fail_fast_on_a_cluster_without_gpus_unless_it_autoscales(world, ray_local, tmp_path,
                                                                              monkeypatch):
    from mel_ray.runtime import AUTOSCALING, check_gpus

    monkeypatch.delenv(AUTOSCALING, raising=False)
    with pytest.raises(UsageError, match=r"extract-features: num_gpus=1 .* has 0 GPUs .*features\.num_gpus=0"):
        extract_features(world.ds, world.clip, fc(num_gpus=1), features_root=str(tmp_path / "f"), **SMALL)
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").rglob("*.parquet"))
    check_gpus("extract-features", 0, "features.num_gpus")        # CPU encoders need no GPU
    monkeypatch.setenv(AUTOSCALING, "1")                          # GPU nodes may still come: submit and wait
    check_gpus("extract-features", 1, "features.num_gpus")
