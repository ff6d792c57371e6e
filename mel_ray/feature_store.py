"""Reading a feature set (`features/<key>/`, docs/data-contract.md "CLIP features"): the one module that train,
eval, tune and link read features through.

* `find_features`: which feature set to use (a given URI, or the only complete one under DATASET/features/,
  optionally the one made with a given CLIP);
* `read_manifest`, `model_dims_from`, `read_shard`, `load_features`: the manifest and shards as numpy;
* `EntityStore`: all entity features of a set, memory-mapped once per node. Entity rows are needed at random
  (gold entities and their hard negatives) on every training step and by every KB shard of an evaluation, so
  they are converted once per node into an uncompressed Arrow IPC file under $MEL_RAY_NODE_CACHE and
  memory-mapped: every worker on the node shares the same page cache and nothing is shipped per batch. The
  entry records what it copies (each shard's size, times and sha256) and is checked on every use: a shard
  rewritten since is copied again (`open_entity_cache`);
* `mention_dataset` (Ray Data, streamed: training) and `mention_tensors` (a whole split in memory: evaluation),
  both with each mention's `gold` entity id joined from the dataset;
* `load_pools`: the mined JD-CCL negatives per entity.

torch is imported only where tensors are made, so finding and reading a feature set stays light.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mel_ray import redact, storage
from mel_ray.dataset import load_dataset
from mel_ray.errors import DataError, UsageError
from mel_ray.keys import settings_key, sha256_hex

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
TENSOR_COLUMNS = ("text_global", "text_local", "text_mask", "image_global", "image_local")
MENTION_TENSOR_COLUMNS = TENSOR_COLUMNS + ("synthetic_global",)
NODE_CACHE = os.environ.get("MEL_RAY_NODE_CACHE", os.path.join(tempfile.gettempdir(), "mel-ray-node-cache"))
READ_CPUS = 0.25


# ------------------------------------------------------------------------------------------ finding a set


ANY_ENCODER = "any"     # find_features: do not filter by encoder


def find_features(dataset_uri: str, features_uri: str | None = None, *, model: str | None = None,
                  cache_dir: str | None = None, several: str = "error", encoder: str | None = ANY_ENCODER,
                  text_encoder: str | None = None, text_encoder_named: bool | None = None) -> str:
    """The feature set to use: `features_uri` when given, else the complete set under DATASET/features/
    (made with the CLIP `model`, same fingerprint, when given, and then only sets whose texts were encoded by
    `text_encoder` (models.text_encoder, same fingerprint; None = CLIP's text tower); made by the encoder whose
    fingerprint is `encoder` when given: None = the base CLIP, a fingerprint = that fine-tuned encoder,
    mel_ray.model.encoder). text_encoder_named (frozen training, which reads no model file): True / False =
    prefer the sets whose texts were / were not encoded by a text encoder (models.text_encoder set / unset), by
    the manifest alone; when there is none such, the other sets stay candidates, so the caller's own check
    (require_text_encoder) names the mismatch; None = no preference. Several candidates are an error unless
    several="first" (link: it reads only the KB's entity features; the first key in sorted order is taken)."""
    if features_uri:
        return features_uri
    if several not in ("error", "first"):
        raise ValueError(f"several={several!r}: expected 'error' or 'first'")
    root = storage.join(dataset_uri, "features")
    keys = sorted({p.split("/")[0] for p in storage.list_files(root) if p.endswith(f"/{MANIFEST}")}) \
        if storage.exists(root) else []
    other = 0
    manifests = {k: read_manifest(storage.join(root, k)) for k in keys} if model is not None or \
        encoder != ANY_ENCODER or text_encoder_named is not None else {}
    if model is not None:
        from mel_ray.features import model_fingerprint
        from mel_ray.models import DEFAULT_CACHE

        want = model_fingerprint(model, cache_dir or DEFAULT_CACHE)
        want_text = model_fingerprint(text_encoder, cache_dir or DEFAULT_CACHE) if text_encoder else None
        made_with = [k for k in keys if manifests[k].get("model", {}).get("fingerprint") == want
                     and manifests[k].get("settings", {}).get("text_encoder") == want_text]
        other, keys = len(keys) - len(made_with), made_with
    other_encoders = 0
    if encoder != ANY_ENCODER:
        by_encoder = [k for k in keys if manifests[k].get("settings", {}).get("encoder_checkpoint") == encoder]
        other_encoders, keys = len(keys) - len(by_encoder), by_encoder
    if text_encoder_named is not None:
        by_texts = [k for k in keys if bool(manifests[k].get("settings", {}).get("text_encoder")) == text_encoder_named]
        keys = by_texts or keys
    if len(keys) == 1 or (keys and several == "first"):
        return storage.join(root, keys[0])
    made = f" made with {model}" if model is not None else ""
    if model is not None and text_encoder:
        made += f" and text encoder {text_encoder}"
    if encoder not in (None, ANY_ENCODER):
        made += f" by the fine-tuned encoder {encoder[:12]}..."
    if keys:
        raise UsageError(f"{root}: {len(keys)} complete feature sets{made} ({', '.join(keys)}); "
                         "pass the one to use (--features URI)")
    others = "".join(f" ({n} {what})" for n, what in ((other, "with other models"),
                                                        (other_encoders, "by other encoders")) if n)
    model_flag = f" --model {model}" if model is not None else ""
    fix = " --checkpoint CHECKPOINT" if encoder not in (None, ANY_ENCODER) else ""
    if model is not None and text_encoder:
        model_flag += f" --set models.text_encoder={text_encoder}"
    raise UsageError(f"{root}: no complete feature sets{made}{others}; "
                     f"run: mel-ray extract-features --dataset {dataset_uri}{model_flag}{fix}")


def require_text_encoder(manifest: dict, text_encoder: str | None, features_uri: str) -> None:
    """Frozen training: the set's texts were encoded by a text encoder exactly when the config names one
    (models.text_encoder), so the model's config leads `link` and `extract-features --checkpoint` to the same kind
    of features. Only the presence is compared, from the manifest (no model file is read: a trial may run where
    the text encoder's folder is not); which model it is, link checks by fingerprint (find_features)."""
    made = manifest.get("settings", {}).get("text_encoder")
    made_id = (manifest.get("text_encoder") or {}).get("id") or made
    if bool(made) == bool(text_encoder):
        return
    if made:
        raise UsageError(f"{features_uri}: its texts were encoded by text encoder {made_id}, but models.text_encoder "
                         f"is unset; set models.text_encoder={made_id} or use features made with CLIP's text tower")
    raise UsageError(f"{features_uri}: its texts were encoded by CLIP's text tower, but models.text_encoder="
                     f"{text_encoder}; extract features with it (mel-ray extract-features --set "
                     f"models.text_encoder={text_encoder}) or unset models.text_encoder")


# ------------------------------------------------------------------------------------- manifest, shards


def read_manifest(features_uri: str) -> dict:
    return storage.read_json_object(storage.join(features_uri, MANIFEST))


def text_pooling_of(manifest: dict) -> str:
    """How the set's t_G was pooled from its text encoder's states (models.text_pooling): "cls" or "mean"; "cls"
    for sets made before the setting existed and for CLIP's text tower (whose pooled state is its own)."""
    return ((manifest.get("text_encoder") or {}).get("pooling") or manifest.get("settings", {}).get("text_pooling")
            or "cls")


def model_dims_from(manifest: dict) -> dict:
    """The feature widths a model built on this set needs (mel_ray.model.ModelDims)."""
    s = manifest["shapes"]
    return {"text_global": s["text_global"][-1], "text_local": s["text_local"][-1],
            "image_global": s["image_global"][-1], "image_local": s["image_local"][-1]}


def read_shard(uri: str, columns: list[str] | None = None) -> dict[str, Any]:
    """One shard as numpy: tensors reshaped to [rows, *shape] (float16/int8), other columns as arrays/lists."""
    table = storage.read_table(uri, columns=columns)
    out: dict[str, Any] = {}
    for f in table.schema:
        col = table.column(f.name).combine_chunks()
        if pa.types.is_fixed_size_list(f.type):
            shape = json.loads(f.metadata[b"shape"]) if f.metadata and b"shape" in f.metadata else [f.type.list_size]
            out[f.name] = col.values.to_numpy(zero_copy_only=False).reshape(len(col), *shape)
        elif pa.types.is_list(f.type):
            out[f.name] = col.to_pylist()
        else:
            out[f.name] = col.to_numpy(zero_copy_only=False)
    return out


def load_features(features_uri: str, table: str = "entities", columns: list[str] | None = None) -> dict[str, Any]:
    """All shards of one table ("entities" or "mentions/<split>") concatenated in row order, as numpy."""
    manifest = read_manifest(features_uri)
    if table not in manifest["tables"]:
        raise DataError(features_uri, f"no table {table!r} (have {', '.join(manifest['tables'])})")
    parts = [read_shard(storage.join(features_uri, s), columns) for s in manifest["tables"][table]["shards"]]
    if not parts:                           # an empty split: empty arrays of the right shape and dtype
        out = {}
        for col in columns or manifest["tables"][table]["columns"]:
            dtype = manifest["dtypes"][col]
            if col in manifest["shapes"]:
                out[col] = np.zeros((0, *manifest["shapes"][col]), dtype=dtype)
            else:
                out[col] = [] if dtype.startswith("list") else np.zeros(0, dtype=object if dtype == "string" else dtype)
        return out
    out: dict[str, Any] = {}
    for name in parts[0]:
        vals = [p[name] for p in parts]
        out[name] = [x for v in vals for x in v] if isinstance(vals[0], list) else np.concatenate(vals)
    return out


# -------------------------------------------------------------------------------------------- tensors


def arrow_to_tensors(table: pa.Table | pa.RecordBatch, shapes: dict) -> dict[str, torch.Tensor]:
    """Fixed-size-list columns -> float32 tensors [rows, *shape]; masks -> bool; counts and ids -> long."""
    import torch

    out: dict[str, torch.Tensor] = {}
    rows = table.num_rows
    for name in table.schema.names:
        col = table.column(name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if name in shapes:
            values = col.values.to_numpy(zero_copy_only=False).reshape(rows, *shapes[name])
            out[name] = torch.from_numpy(values.astype(np.float32))
        elif name == "text_mask":
            # the list's own width: a gather of zero rows (a rank adding no entity to a step) still has a shape
            width = col.type.list_size if pa.types.is_fixed_size_list(col.type) else -1
            out[name] = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(rows, width).astype(bool))
        elif name in ("n_views", "entity_id", "gold"):
            out[name] = torch.from_numpy(col.to_numpy(zero_copy_only=False).astype(np.int64))
    return out


# ------------------------------------------------------------------------------------- the node cache

CACHE_FILE = "entities.arrow"
CACHE_RECORD = "entities.json"      # what the cached file copies; written after it, checked on every use
CACHE_COLUMNS = ["entity_id", *TENSOR_COLUMNS, "has_image"]
# A file's times can stay the same across two writes within one tick of a coarse clock (kernel jiffies, S3's whole
# seconds; git's "racy clean" files): a stamp taken less than this after the file's last change proves nothing,
# so that file is hashed instead until its stamp has settled.
RACY_NS = 2 * 10**9


def open_entity_cache(features_uri: str, manifest: dict, cache_root: Path) -> pa.Table:
    """The entity features of a set, memory-mapped from CACHE_ROOT/<key>/entities.arrow: built once per node, and
    rebuilt whenever it no longer copies what the set holds now (`_cache_is_current`), so a shard damaged or
    rewritten after a first run is read again, never served from the old copy.

    Check, rebuild and map happen under one lock: the node's other workers wait and reuse the entry, and none can
    map an entry that another one (reading a copy of the set at another URI) replaces between check and map."""
    key = manifest.get("key") or settings_key({"uri": features_uri})
    folder = cache_root / key
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _cache_is_current(folder, features_uri, manifest):
            _build_cache(folder, features_uri, manifest)
        # the mapping keeps the file's bytes even when a later rebuild replaces the file
        return pa.ipc.open_file(pa.memory_map(str(folder / CACHE_FILE), "r")).read_all()


def _stamp(uri: str) -> dict:
    """What a rewrite of the file changes: size and mtime everywhere, and on a local disk also ctime and inode,
    which no user can set back (mtime can be: touch -d, os.utime)."""
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(uri)
    return {"size": info.size, "mtime_ns": info.mtime_ns}


def _settled(stamp: dict, taken_ns: int) -> bool:
    return max(stamp["mtime_ns"], stamp.get("ctime_ns", 0)) < taken_ns - RACY_NS


def _manifest_sha(manifest: dict) -> str:
    return sha256_hex(json.dumps(manifest, sort_keys=True).encode())


def _read_record(folder: Path) -> dict | None:
    """The entry's record; None when there is none or it is not one this code wrote (an older cache, damage)."""
    try:
        record = json.loads((folder / CACHE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("cache"), dict) and isinstance(record.get("shards"), list) \
        and all(isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("sha256"), str)
                and isinstance(e.get("stamp"), dict) and isinstance(e.get("taken_ns"), int) for e in record["shards"])
    return record if ok else None


def _write_record(folder: Path, record: dict) -> None:
    tmp = folder / f"{CACHE_RECORD}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / CACHE_RECORD)


def _cache_is_current(folder: Path, features_uri: str, manifest: dict) -> bool:
    """The entry copies this set as it is now: same URI and manifest, its own file untouched since it was written,
    and every shard unchanged since it was copied. A shard's stamp that matches and has settled is proof enough
    (no byte read: a big KB is not re-read at every worker start); any other shard is hashed and compared with the
    sha256 of the bytes that were copied: the same bytes (a file touched, restored, or written just before it was
    cached) keep the entry and refresh the stamp, other bytes make it stale. A stale entry is rebuilt, not an
    error: the set is what is true, and damage inside it is `mel-ray verify --deep`'s and the scores' check."""
    record = _read_record(folder)
    shards = manifest["tables"]["entities"]["shards"]
    if record is None or record.get("features") != features_uri or record.get("manifest_sha256") != \
            _manifest_sha(manifest) or [e["name"] for e in record["shards"]] != shards:
        return False
    try:
        if _stamp(str(folder / CACHE_FILE)) != record["cache"]:
            return False                # the cached file itself was written to or replaced since
        refreshed = False
        for entry in record["shards"]:
            uri = storage.join(features_uri, entry["name"])
            taken, now = time.time_ns(), _stamp(uri)
            if now == entry["stamp"] and _settled(now, entry["taken_ns"]):
                continue
            if now["size"] != entry["stamp"].get("size") or sha256_hex(storage.read_bytes(uri)) != entry["sha256"]:
                return False
            entry["stamp"], entry["taken_ns"], refreshed = now, taken, True
    except FileNotFoundError:
        return False                    # rebuilding names what is missing
    if refreshed:
        _write_record(folder, record)
    return True


def _build_cache(folder: Path, features_uri: str, manifest: dict) -> None:
    """Copy the entity shards into one Arrow IPC file, recording each shard's stamp (taken before it is read, so
    a write during the read leaves a stamp that no longer matches) and the sha256 of the bytes copied."""
    target, tmp = folder / CACHE_FILE, folder / f"{CACHE_FILE}.tmp-{os.getpid()}"
    entries, writer = [], None
    try:
        for name in manifest["tables"]["entities"]["shards"]:
            uri = storage.join(features_uri, name)
            taken, stamp = time.time_ns(), _stamp(uri)
            data = storage.read_bytes(uri)
            try:
                part = pq.read_table(pa.BufferReader(data), columns=CACHE_COLUMNS)
            except pa.ArrowInvalid as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise DataError(redact.uri(uri), f"not a readable Parquet file: {reason}") from None
            entries.append({"name": name, "sha256": sha256_hex(data), "stamp": stamp, "taken_ns": taken})
            if writer is None:
                writer = pa.ipc.new_file(str(tmp), part.schema)
            writer.write_table(part)
        if writer is None:
            raise DataError(redact.uri(storage.join(features_uri, MANIFEST)), "tables.entities lists no shards")
        writer.close()
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    _write_record(folder, {"features": features_uri, "manifest_sha256": _manifest_sha(manifest),
                           "shards": entries, "cache": _stamp(str(target))})


class EntityStore:
    """All entity features of a features folder, memory-mapped from a node-local Arrow file (`open_entity_cache`)."""

    def __init__(self, features_uri: str, cache_root: str = NODE_CACHE):
        self.manifest = read_manifest(features_uri)
        self.shapes = self.manifest["shapes"]
        self.table = open_entity_cache(features_uri, self.manifest, Path(cache_root))
        self.num_entities = self.table.num_rows

    def gather(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows for the given entity ids (entity_id == row number by the dataset contract)."""
        rows = self.table.select(list(TENSOR_COLUMNS)).take(pa.array(np.asarray(ids, dtype=np.int64)))
        return arrow_to_tensors(rows, self.shapes)

    def chunk(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return arrow_to_tensors(self.table.select(list(TENSOR_COLUMNS)).slice(start, stop - start), self.shapes)


def mention_shard_uris(features_uri: str, split: str) -> list[str]:
    manifest = read_manifest(features_uri)
    return [storage.join(features_uri, s) for s in manifest["tables"][f"mentions/{split}"]["shards"]]


def gold_ids(dataset_uri: str, split: str) -> dict[str, int]:
    table = load_dataset(dataset_uri).mentions(split, columns=["mention_id", "entity_id"])
    return dict(zip(table.column("mention_id").to_pylist(), table.column("entity_id").to_pylist()))


def add_gold(batch: pa.Table, gold: dict[str, int]) -> pa.Table:
    """Ray Data map_batches fn: attach each mention's gold entity id (the features carry only mention_id)."""
    ids = [gold[m] for m in batch.column("mention_id").to_pylist()]
    return batch.append_column("gold", pa.array(ids, type=pa.int64()))


def mention_dataset(features_uri: str, dataset_uri: str, split: str):
    """Ray Dataset of one split's mention features with a `gold` column."""
    import ray

    uris = mention_shard_uris(features_uri, split)
    fs, _ = storage.resolve(uris[0])
    paths = [storage.resolve(u)[1] for u in uris]
    # reading a few Parquet shards is light: a fraction of a CPU each, so the reads still fit next to the
    # training workers (and a Tune trial's driver) on a machine whose whole CPUs are all reserved
    ds = ray.data.read_parquet(paths, filesystem=fs, num_cpus=READ_CPUS)
    return ds.map_batches(add_gold, fn_kwargs={"gold": gold_ids(dataset_uri, split)}, batch_format="pyarrow",
                          num_cpus=READ_CPUS)


def mention_tensors(features_uri: str, dataset_uri: str, split: str, rows: slice | None = None) -> dict:
    """A whole split (or a slice of rows) in memory: for evaluation, where every mention is needed anyway."""
    manifest = read_manifest(features_uri)
    parts = [storage.read_table(u) for u in mention_shard_uris(features_uri, split)]
    table = pa.concat_tables(parts)
    if rows is not None:
        table = table.slice(rows.start, rows.stop - rows.start)
    gold = gold_ids(dataset_uri, split)
    table = add_gold(table, gold)
    out = arrow_to_tensors(table, manifest["shapes"])
    out["mention_id"] = table.column("mention_id").to_pylist()
    return out


def load_pools(negatives_uri: str | None, num_entities: int) -> list[np.ndarray]:
    """Mined JD-CCL pools per entity (best first); empty pools without a negatives file."""
    if not negatives_uri:
        return [np.zeros(0, dtype=np.int64)] * num_entities
    table = storage.read_table(negatives_uri, columns=["entity_id", "neg_entity_ids"])
    ids = table.column("entity_id").to_numpy()
    lists = table.column("neg_entity_ids").combine_chunks()
    offsets = lists.offsets.to_numpy()
    values = pc.list_flatten(lists).to_numpy()
    pools = [np.zeros(0, dtype=np.int64)] * num_entities
    for row, eid in enumerate(ids):
        pools[int(eid)] = values[offsets[row]:offsets[row + 1]]
    return pools
