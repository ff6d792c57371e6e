"""The one feature-set finder (train, tune, the pipeline and link use it): the only complete set, or the one made
with a given CLIP; one message when there is none or several. The node cache of entity features follows its set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mel_ray import storage
from mel_ray.errors import UsageError
from mel_ray.feature_store import EntityStore, find_features
from mel_ray.features import model_fingerprint


def _model(folder: Path, weights: bytes) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return str(folder)


def _feature_set(dataset: Path, key: str, fingerprint: dict | None, complete: bool = True) -> None:
    folder = dataset / "features" / key
    (folder / "entities").mkdir(parents=True)
    (folder / "entities" / "part-00000.parquet").write_bytes(b"")
    if complete:                                 # the manifest is written last: without it a set is unfinished
        (folder / "manifest.json").write_text(json.dumps({"key": key, "model": {"fingerprint": fingerprint}}))


def test_the_only_complete_set_or_a_clear_error(tmp_path):
    ds = tmp_path / "ds"
    with pytest.raises(UsageError, match=r"no complete feature sets; run: mel-ray extract-features --dataset"):
        find_features(str(ds))
    _feature_set(ds, "aaa", None, complete=False)
    with pytest.raises(UsageError, match=r"no complete feature sets"):
        find_features(str(ds))
    _feature_set(ds, "bbb", None)
    assert find_features(str(ds)) == str(ds / "features" / "bbb")
    assert find_features(str(ds), "s3://b/elsewhere") == "s3://b/elsewhere"      # a given set is taken as is
    _feature_set(ds, "ccc", None)
    with pytest.raises(UsageError, match=r"2 complete feature sets \(bbb, ccc\); pass the one to use"):
        find_features(str(ds))


def _texts_by(dataset: Path, key: str, text_encoder: str | None) -> None:
    _feature_set(dataset, key, None)
    manifest = dataset / "features" / key / "manifest.json"
    settings = {"text_encoder": text_encoder} if text_encoder else {}
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "settings": settings}))


def test_frozen_training_prefers_the_sets_whose_texts_its_config_names(tmp_path):
    """A release with a CLIP-text set and a BERT-text set: models.text_encoder set / unset picks one (by the
    manifest, no model file read); with no set of the wanted kind the other stays a candidate, so training's
    require_text_encoder names the mismatch instead of "no feature sets"."""
    ds = tmp_path / "ds"
    _texts_by(ds, "clip-text", None)
    assert find_features(str(ds), encoder=None, text_encoder_named=True) == str(ds / "features" / "clip-text")
    _texts_by(ds, "bert-text", "fingerprint-of-a-bert")
    with pytest.raises(UsageError, match=r"2 complete feature sets \(bert-text, clip-text\)"):
        find_features(str(ds), encoder=None)                                       # no preference: ambiguous
    assert find_features(str(ds), encoder=None, text_encoder_named=True) == str(ds / "features" / "bert-text")
    assert find_features(str(ds), encoder=None, text_encoder_named=False) == str(ds / "features" / "clip-text")
    _texts_by(ds, "bert-text-2", "fingerprint-of-another-bert")
    with pytest.raises(UsageError, match=r"2 complete feature sets \(bert-text, bert-text-2\)"):
        find_features(str(ds), encoder=None, text_encoder_named=True)


def test_the_set_made_with_a_model(tmp_path):
    ds = tmp_path / "ds"
    clip_a, clip_b = _model(tmp_path / "a", b"weights a"), _model(tmp_path / "b", b"weights b")
    _feature_set(ds, "k1", model_fingerprint(clip_a))
    _feature_set(ds, "k2", model_fingerprint(clip_b))
    assert find_features(str(ds), model=clip_b) == str(ds / "features" / "k2")
    clip_c = _model(tmp_path / "c", b"weights c")
    with pytest.raises(UsageError, match=r"no complete feature sets made with .*c \(2 with other models\); "
                                         r"run: mel-ray extract-features --dataset .* --model .*c$"):
        find_features(str(ds), model=clip_c)
    _feature_set(ds, "k0", model_fingerprint(clip_b))                  # a second set made with b
    with pytest.raises(UsageError, match=r"2 complete feature sets made with .*\(k0, k2\)"):
        find_features(str(ds), model=clip_b)
    assert find_features(str(ds), model=clip_b, several="first") == str(ds / "features" / "k0")


# ------------------------------------------------------------------------ the node cache of entity features


SHAPES = {"text_global": [4], "text_local": [2, 4], "text_mask": [2], "image_global": [4], "image_local": [2, 4]}


def _entity_shard(path: Path, first: int, rows: int, text_value: float | None = None) -> None:
    """A valid entity shard (the contract's columns); text_global = text_value everywhere when given. Plain
    encoding, no compression or statistics: the file's size depends on the row count only, so a test can replace
    a shard by a different one of exactly its size."""
    rng = np.random.default_rng(first)
    columns = {"entity_id": pa.array(np.arange(first, first + rows), type=pa.int64())}
    fields = [pa.field("entity_id", pa.int64())]
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        dtype, typ = (np.int8, pa.int8()) if name == "text_mask" else (np.float16, pa.float16())
        values = rng.standard_normal(rows * size).astype(dtype)
        if name == "text_global" and text_value is not None:
            values[:] = text_value
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(values, type=typ), size)
        fields.append(pa.field(name, columns[name].type, metadata={"shape": json.dumps(shape)}))
    columns["has_image"] = pa.array([True] * rows)
    fields.append(pa.field("has_image", pa.bool_()))
    pq.write_table(pa.table(list(columns.values()), schema=pa.schema(fields)), path, compression="none",
                   use_dictionary=False, write_statistics=False)


def _entity_set(folder: Path, rows: int = 6, shard_rows: int = 3) -> str:
    (folder / "entities").mkdir(parents=True)
    shards = [f"entities/part-{i:05d}.parquet" for i in range(-(-rows // shard_rows))]
    for i, shard in enumerate(shards):
        _entity_shard(folder / shard, i * shard_rows, min(shard_rows, rows - i * shard_rows))
    manifest = {"key": "cache-test-key", "shapes": SHAPES,
                "tables": {"entities": {"rows": rows, "shards": shards, "columns": list(SHAPES)}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def _same_size_nan_shard(path: Path, first: int, rows: int) -> None:
    """Replace the shard in place by a different valid one (NaN text_global) of exactly its size and mtime."""
    before = path.stat()
    _entity_shard(path, first, rows, text_value=float("nan"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def test_entity_cache_follows_a_shard_rewritten_at_its_size_and_mtime(tmp_path):
    """issue 22: the node cache was keyed by the features key only, so a shard rewritten after the first use
    (here: a valid shard of NaN text_global, same size, mtime set back) was still served from the clean copy."""
    features = _entity_set(tmp_path / "features")
    cache = str(tmp_path / "cache")
    clean = EntityStore(features, cache_root=cache).gather(np.arange(6))["text_global"]
    assert torch.isfinite(clean).all()
    _same_size_nan_shard(tmp_path / "features" / "entities" / "part-00001.parquet", 3, 3)
    got = EntityStore(features, cache_root=cache).gather(np.arange(6))["text_global"]
    assert torch.equal(got[:3], clean[:3]) and torch.isnan(got[3:]).all()


def test_entity_cache_is_rebuilt_when_its_own_file_is_tampered_and_kept_when_bytes_are_the_same(tmp_path):
    features = _entity_set(tmp_path / "features")
    cache = tmp_path / "cache"
    clean = EntityStore(features, cache_root=str(cache)).gather(np.arange(6))["text_global"]
    cached = cache / "cache-test-key" / "entities.arrow"
    # the cache entry itself overwritten with other (NaN) features of the same schema
    other = _entity_set(tmp_path / "other")
    for i, shard in enumerate(("part-00000.parquet", "part-00001.parquet")):
        _entity_shard(tmp_path / "other" / "entities" / shard, 3 * i, 3, text_value=float("nan"))
    nan_table = EntityStore(other, cache_root=str(tmp_path / "other-cache")).table
    with pa.ipc.new_file(str(cached), nan_table.schema) as writer:
        writer.write_table(nan_table)
    assert torch.equal(EntityStore(features, cache_root=str(cache)).gather(np.arange(6))["text_global"], clean)
    # a shard only touched (same bytes, new times): hashed, found the same, the entry is kept as it is
    inode = cached.stat().st_ino
    shard = tmp_path / "features" / "entities" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes())
    assert torch.equal(EntityStore(features, cache_root=str(cache)).gather(np.arange(6))["text_global"], clean)
    assert cached.stat().st_ino == inode
    # an entry from before the record existed (or with a damaged record) is not trusted: rebuilt
    (cache / "cache-test-key" / "entities.json").write_text("{not json")
    assert torch.equal(EntityStore(features, cache_root=str(cache)).gather(np.arange(6))["text_global"], clean)
    assert cached.stat().st_ino != inode


def test_entity_cache_follows_a_shard_rewritten_on_s3(tmp_path, s3_bucket):
    """The same on S3, where a stamp is size and whole-second mtime only: a same-size rewrite within the second
    of the first use must still be found (the stamp has not settled, so the shard is hashed)."""
    local = _entity_set(tmp_path / "features")
    features = f"{s3_bucket}/features"
    for rel in storage.list_files(local):
        storage.write_bytes(storage.join(features, rel), storage.read_bytes(storage.join(local, rel)))
    cache = str(tmp_path / "cache")
    clean = EntityStore(features, cache_root=cache).gather(np.arange(6))["text_global"]
    shard = tmp_path / "features" / "entities" / "part-00000.parquet"
    _entity_shard(shard, 0, 3, text_value=float("inf"))
    storage.write_bytes(f"{features}/entities/part-00000.parquet", shard.read_bytes())
    got = EntityStore(features, cache_root=cache).gather(np.arange(6))["text_global"]
    assert torch.isinf(got[:3]).all() and torch.equal(got[3:], clean[3:])
