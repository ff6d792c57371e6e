"""Feeding the model: entity features memory-mapped once per node, mentions streamed by Ray Data.

Entity features are needed at random rows (gold entities and their hard negatives) on every step, so they are
converted once per node into an uncompressed Arrow IPC file and memory-mapped: every worker on the node shares
the same page cache instead of holding its own copy, and nothing is shipped per batch. Mentions are read
sequentially, so Ray Data streams them from the Parquet shards of the features stage.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mel_ray import storage
from mel_ray.dataset import load_dataset
from mel_ray.keys import settings_key

TENSOR_COLUMNS = ("text_global", "text_local", "text_mask", "image_global", "image_local")
MENTION_TENSOR_COLUMNS = TENSOR_COLUMNS + ("synthetic_global",)
NODE_CACHE = os.environ.get("MEL_RAY_NODE_CACHE", os.path.join(tempfile.gettempdir(), "mel-ray-node-cache"))


def read_manifest(features_uri: str) -> dict:
    return storage.read_json(storage.join(features_uri, "manifest.json"))


def model_dims_from(manifest: dict) -> dict:
    s = manifest["shapes"]
    return {"text_global": s["text_global"][-1], "text_local": s["text_local"][-1],
            "image_global": s["image_global"][-1], "image_local": s["image_local"][-1]}


def arrow_to_tensors(table: pa.Table | pa.RecordBatch, shapes: dict) -> dict[str, torch.Tensor]:
    """Fixed-size-list columns -> float32 tensors [rows, *shape]; masks -> bool; counts -> long."""
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
            out[name] = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(rows, -1).astype(bool))
        elif name in ("n_views", "entity_id", "gold"):
            out[name] = torch.from_numpy(col.to_numpy(zero_copy_only=False).astype(np.int64))
    return out


class EntityStore:
    """All entity features of a features folder, memory-mapped from a node-local Arrow file."""

    def __init__(self, features_uri: str, cache_root: str = NODE_CACHE):
        self.manifest = read_manifest(features_uri)
        self.shapes = self.manifest["shapes"]
        path = self._ensure_local(features_uri, Path(cache_root))
        self.table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        self.num_entities = self.table.num_rows

    def _ensure_local(self, features_uri: str, cache_root: Path) -> Path:
        key = self.manifest.get("key") or settings_key({"uri": features_uri})
        target = cache_root / key / "entities.arrow"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)        # one worker per node converts; the others wait and reuse
            if not target.exists():
                shards = self.manifest["tables"]["entities"]["shards"]
                columns = ["entity_id", *TENSOR_COLUMNS, "has_image"]
                tmp = target.with_suffix(f".tmp-{os.getpid()}")
                writer = None
                for shard in shards:
                    part = storage.read_table(storage.join(features_uri, shard), columns=columns)
                    if writer is None:
                        writer = pa.ipc.new_file(str(tmp), part.schema)
                    writer.write_table(part)
                writer.close()
                os.replace(tmp, target)
        return target

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


READ_CPUS = 0.25


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


def describe(manifest: dict) -> str:
    return json.dumps({k: manifest["shapes"][k] for k in manifest["shapes"]})
