"""Feature shards and the manifest (layout, columns and metadata: docs/data-contract.md, "CLIP features").

A shard is one Parquet file written atomically from its units' encoder outputs; its own counters, encoders and
position are stored in the file's schema metadata, so the manifest (written last) is rebuilt from the shards
alone and a killed and resumed run ends with the same bytes as an uninterrupted one. Reading is
mel_ray.feature_store's job.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mel_ray import __version__, storage
from mel_ray.dataset import SPLITS

if TYPE_CHECKING:
    from mel_ray.features.plan import Plan, Table

FORMAT_VERSION = 1
SHARD_META = b"mel_ray.features"          # per-shard JSON in each Parquet file's schema metadata
MAX_EXAMPLES = 20                          # examples of missing / undecodable URIs kept in the manifest


def _fsl(flat: np.ndarray, size: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), size)


def shard_table(plan: Plan, table: Table, shard: int, units: list[dict]) -> pa.Table:
    """Concatenate a shard's unit outputs (sorted by row) into its Parquet table."""
    units = sorted(units, key=lambda u: u["start"])
    lo = shard * plan.shard_rows
    rows = sum(u["n"] for u in units)
    if units[0]["start"] != lo or rows != min(table.rows, lo + plan.shard_rows) - lo:
        raise RuntimeError(f"extract-features: {table.name} shard {shard}: units do not cover its rows")
    shapes = plan.shapes
    cols: dict[str, pa.Array] = {}
    ids = table.ids[lo:lo + rows]
    cols[table.id_column] = pa.array(ids, type=pa.int64() if table.id_column == "entity_id" else pa.string())

    def cat(name: str, dtype, per_row: int, slicer=None) -> np.ndarray:
        parts = []
        for u in units:
            arr = np.frombuffer(u[name], dtype=dtype)
            if slicer is not None:
                arr = slicer(arr.reshape(-1, per_row), u)
            parts.append(arr.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    width = shapes["text_global"][0]        # CLIP's projection, or a text encoder's hidden size (models.text_encoder)
    cols["text_global"] = _fsl(cat("text_global", np.float16, width), width)
    proj = shapes["image_global"][0]
    size = int(np.prod(shapes["text_local"]))
    cols["text_local"] = _fsl(cat("text_local", np.float16, size), size)
    cols["text_mask"] = _fsl(cat("text_mask", np.int8, plan.text_length), plan.text_length)
    cols["image_global"] = _fsl(cat("image_global", np.float16, proj, lambda a, u: a[:u["n"]]), proj)
    size = int(np.prod(shapes["image_local"]))
    cols["image_local"] = _fsl(cat("image_local", np.float16, size), size)
    cols["has_image"] = pa.array(cat("has_image", np.bool_, 1), type=pa.bool_())
    encoders = sorted({u["encoder"] for u in units})
    stats = merge_stats([u["stats"] for u in units])
    if table.views is not None:
        n_s = plan.n_views
        synth = np.zeros((rows, max(n_s, 0), proj), dtype=np.float16)
        n_views = cat("n_views", np.int32, 1)
        view_ids: list[list[int]] = []
        r = 0
        for u in units:
            globals_ = np.frombuffer(u["image_global"], dtype=np.float16).reshape(-1, proj)[u["n"]:]
            pos = 0
            for j, used in enumerate(u["view_ids"]):
                synth[r + j, :len(used)] = globals_[pos:pos + len(used)]
                pos += len(used)
                view_ids.append(used)
            r += u["n"]
        cols["synthetic_global"] = _fsl(synth, n_s * proj)
        cols["n_views"] = pa.array(n_views, type=pa.int32())
        cols["synthetic_view_ids"] = pa.array(view_ids, type=pa.list_(pa.int32()))
    fields = []
    for name, arr in cols.items():
        meta = {b"shape": json.dumps(shapes[name]).encode()} if name in shapes else None
        fields.append(pa.field(name, arr.type, nullable=False, metadata=meta))
    info = {"table": table.name, "shard": shard, "rows": rows, "first_row": lo, "stats": stats,
            "encoders": encoders, "format_version": FORMAT_VERSION}
    schema = pa.schema(fields, metadata={SHARD_META: json.dumps(info, sort_keys=True).encode()})
    return pa.Table.from_arrays(list(cols.values()), schema=schema)


def merge_stats(items: list[dict]) -> dict:
    """Sum counters (and nested 'synthetic' counters); keep up to MAX_EXAMPLES examples per reason."""
    out: dict[str, Any] = {}
    for st in items:
        for k, v in st.items():
            if k == "examples":
                ex = out.setdefault("examples", {})
                for reason, uris in v.items():
                    ex.setdefault(reason, [])
                    ex[reason].extend(uris[:MAX_EXAMPLES - len(ex[reason])])
            elif isinstance(v, dict):
                out[k] = merge_stats([out.get(k, {}), v])
            else:
                out[k] = out.get(k, 0) + v
    return out


def write_shard(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    id_col = table.column_names[0]
    pq.write_table(table, buf, compression="zstd", use_dictionary=[id_col], write_statistics=[id_col])
    storage.write_bytes(uri, buf.getvalue())


def _shard_info(uri: str) -> dict:
    fs, path = storage.resolve(uri)
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except OSError as err:
        raise storage.StorageError(f"{uri}: could not read Parquet footer: {err}") from err
    return json.loads(schema.metadata[SHARD_META])


def build_manifest(plan: Plan, existing: set[str]) -> dict:
    """Built only from settings and the shards' own metadata: identical for resumed and uninterrupted runs."""
    tables, counters, encoders = {}, {}, set()
    for name in ["entities", *[f"mentions/{s}" for s in SPLITS]]:
        table = plan.tables.get(name)
        if table is None:
            continue
        shards = [table.shard_name(s) for s in range(table.n_shards(plan.shard_rows))]
        infos = [_shard_info(storage.join(plan.uri, s)) for s in shards if s in existing]
        if len(infos) != len(shards):
            continue
        columns = [table.id_column, "text_global", "text_local", "text_mask", "image_global", "image_local",
                   "has_image"]
        if table.views is not None:
            columns += ["synthetic_global", "n_views", "synthetic_view_ids"]
        tables[name] = {"rows": table.rows, "shards": shards, "columns": columns}
        stats = merge_stats([i["stats"] for i in infos])
        stats.setdefault("rows", 0)
        stats.setdefault("examples", {})
        counters[name] = stats
        for i in infos:
            encoders.update(i["encoders"])
    dtypes = {"entity_id": "int64", "mention_id": "string", **{k: "float16" for k in plan.shapes},
              "text_mask": "int8", "has_image": "bool"}
    if "synthetic_global" in plan.shapes:
        dtypes.update(n_views="int32", synthetic_view_ids="list<int32>")
    return {
        "format_version": FORMAT_VERSION,
        "key": plan.key,
        "mel_ray_version": __version__,
        "model": {"id": plan.model, "fingerprint": plan.settings["model"]},
        **({"text_encoder": {"id": plan.text_encoder, "fingerprint": plan.settings["text_encoder"],
                             "pooling": plan.text_pooling}} if plan.text_encoder else {}),
        "settings": {k: v for k, v in plan.settings.items() if k not in ("model", "inputs", "stage")},
        "inputs": plan.inputs,
        "storage": {"format": "parquet (zstd)", "tensor_layout": "fixed_size_list flattened row-major; shape below",
                    "shard_rows": plan.shard_rows},
        "shapes": plan.shapes,
        "dtypes": dtypes,
        "n_views": plan.n_views,
        "tables": tables,
        "counters": counters,
        "encoders": sorted(encoders),
    }
