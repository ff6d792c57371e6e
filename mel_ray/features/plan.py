"""What extract-features writes, and under which key: the plan (tables, rows, images, synthetic views, shapes,
settings) and its work units. The key and the layout are docs/data-contract.md, "CLIP features".
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mel_ray import models, storage
from mel_ray.dataset import ENTITIES, SPLITS, load_dataset, mentions_path
from mel_ray.errors import DataError, UsageError
from mel_ray.features.encoder import ENCODING_VERSION
from mel_ray.features.inputs import (
    ATTRIBUTE_END,
    ATTRIBUTE_JOIN,
    ENTITY_TEMPLATE,
    MENTION_TEMPLATE,
    PREPROCESS_VERSION,
    entity_text,
    load_processor,
    mention_text,
    output_size,
    pack,
    tokenize,
)
from mel_ray.features.shards import FORMAT_VERSION
from mel_ray.keys import settings_key, sha256_hex
from mel_ray.models import DEFAULT_CACHE, is_hub_id, pretrained_args
from mel_ray.verify import require_synthetic

DEFAULT_MICRO_BATCH = 32
DEFAULT_SHARD_ROWS = 1024


# ---------------------------------------------------------------------------------------- model identity


def model_fingerprint(model: str, cache_dir: str = DEFAULT_CACHE) -> dict[str, Any]:
    """The CLIP model's identity in the features key (mel_ray.models.model_fingerprint): a hub id as its pinned
    form `id@<commit>`, a local or s3:// folder by the content of what from_pretrained loads."""
    fingerprint = models.model_fingerprint(str(model), cache_dir)
    return {"id": fingerprint} if is_hub_id(str(model)) else {"content": fingerprint}


def check_text_encoder(text_encoder: str, text_length: int, cache_dir: str = DEFAULT_CACHE):
    """models.text_encoder's config, refused with one line naming the setting when it is not a BERT-family encoder
    or takes fewer than `text_length` (features.text_length) tokens. Reads its config.json only."""
    config = models.text_encoder_config(text_encoder, cache_dir)
    positions = models.text_positions(config)
    if text_length > positions:
        raise UsageError(f"{models.TEXT_ENCODER_SETTING}={text_encoder}: features.text_length {text_length} exceeds "
                         f"the {positions} positions it takes (max_position_embeddings in its config.json); lower "
                         "features.text_length")
    return config


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class Table:
    name: str                 # "entities" or "mentions/<split>"
    folder: str               # relative output folder
    rows: int
    id_column: str
    ids: list
    texts: list[str]
    images: list[str | None]                       # resolved URIs, None = no image
    views: list[list[tuple[int, str, str]]] | None = None   # per row: (view, uri, sha256) sorted by view
    pending: list[int] = field(default_factory=list)         # shard numbers still to write

    def shard_name(self, shard: int) -> str:
        return f"{self.folder}/part-{shard:05d}.parquet"

    def n_shards(self, shard_rows: int) -> int:
        return math.ceil(self.rows / shard_rows)


@dataclass
class Plan:
    uri: str                   # features folder
    key: str
    settings: dict
    model: str
    cache_dir: str
    text_length: int
    image_size: tuple[int, int]      # (height, width) fed to the vision model
    image_cfg: dict                  # the CLIP image processor's settings (see preprocess_image)
    shapes: dict[str, list[int]]
    micro_batch: int
    shard_rows: int
    n_views: int                     # n_s (0 without synthetic views)
    dtype: str | None
    tables: dict[str, Table]
    inputs: dict
    tokenizer: Any = None
    weights: Any = None              # a fine-tuned encoder's CLIP weights (extract-features --checkpoint)
    text_encoder: str | None = None  # models.text_encoder (None: CLIP's text tower encodes the texts)
    text_pooling: str | None = None  # how its t_G is pooled: "cls" / "mean" (models.text_pooling, resolved)
    text_weights: Any = None         # a fine-tuned text encoder's weights (extract-features --checkpoint)


def _read_parquet_bytes(uri: str) -> tuple[pa.Table, str]:
    data = storage.read_bytes(uri)
    return pq.read_table(io.BytesIO(data)), sha256_hex(data)


def _load_synthetic(ds, key: str, views: int | None) -> tuple[dict[str, list[tuple[int, str, str]]], int, str, int]:
    """Views of DATASET/synthetic/<key> (the synthesize stage's contract: manifest.parquet with mention_id,
    view, uri, sha256; complete.json once a run finished). Only views < `views` are used when it is given;
    n_s = `views`, else the largest view number + 1. Returns (views per mention sorted by view, n_s, sha256
    of the rows used, rows used)."""
    folder = ds.path("synthetic", key)
    manifest_uri = storage.join(folder, "manifest.parquet")
    if not storage.exists(storage.join(folder, "complete.json")) or not storage.exists(manifest_uri):
        raise DataError(folder, f"no completed synthetic views for key {key!r} (complete.json and manifest.parquet "
                        "missing): run synthesize first, or check --synthetic")
    require_synthetic(ds.uri, key)     # settings, complete.json, manifest footer, schema, image count
    table, _ = _read_parquet_bytes(manifest_uri)
    missing = {"mention_id", "view", "uri"} - set(table.column_names)
    if missing:
        raise DataError(manifest_uri, f"synthetic manifest lacks column(s) {sorted(missing)}")
    shas = table.column("sha256").to_pylist() if "sha256" in table.column_names else [None] * table.num_rows
    rows = []
    for mid, view, uri, digest in zip(table.column("mention_id").to_pylist(), table.column("view").to_pylist(),
                                      table.column("uri").to_pylist(), shas):
        if mid is None or view is None or uri is None:
            raise DataError(manifest_uri, "null mention_id, view or uri in the synthetic manifest", field="mention_id")
        if views is None or int(view) < views:
            rows.append((mid, int(view), uri, digest or ""))
    rows.sort()
    n_s = views if views is not None else max((v for _, v, _, _ in rows), default=-1) + 1
    by_mention: dict[str, list[tuple[int, str, str]]] = {}
    digest = hashlib.sha256()
    for i, (mid, view, uri, sha) in enumerate(rows):
        if i and rows[i - 1][:2] == (mid, view):
            raise DataError(manifest_uri, f"mention {mid!r} has view {view} twice", field="view")
        by_mention.setdefault(mid, []).append((view, ds.resolve_uri(uri), sha))
        digest.update(f"{mid}\0{view}\0{uri}\0{sha}\n".encode())
    return by_mention, n_s, digest.hexdigest(), len(rows)



def make_plan(dataset_uri: str, model: str, *, synthetic_key: str | None, views: int | None, text_length: int,
          dtype: str | None, splits: tuple[str, ...], micro_batch: int, shard_rows: int, features_root: str | None,
          cache_dir: str, encoder_checkpoint: str | None = None, text_encoder: str | None = None,
          text_pooling: str = "auto") -> Plan:
    """encoder_checkpoint: the fingerprint of a fine-tuned encoder's weights (mel_ray.model.encoder), part of
    the key and the manifest's settings; None (the base CLIP) leaves both as they always were.

    text_encoder: models.text_encoder, a BERT-family model that encodes the texts instead of CLIP's text tower
    (its tokenizer, its widths in `shapes`, its identity in the key and the settings); None leaves all three as
    they always were. text_pooling: models.text_pooling (auto / cls / mean), resolved here
    (mel_ray.models.resolve_text_pooling); in the key and the settings only when it is not cls, so sets made
    before the setting existed (all [CLS]) keep their keys."""
    from transformers import CLIPConfig

    if text_length < 2:
        raise UsageError("text_length must be at least 2 (BOS and EOS)")
    if micro_batch < 1 or shard_rows < 1 or (views is not None and views < 1):
        raise UsageError("micro_batch, shard_rows and views must be positive")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise UsageError(f"unknown split(s) {unknown} (expected a subset of {', '.join(SPLITS)})")
    if dtype not in (None, "float32", "float16", "bfloat16"):
        raise UsageError(f"dtype {dtype!r}: expected float32, float16 or bfloat16 (or nothing: the model's own)")
    ds = load_dataset(dataset_uri)
    path, pinned = pretrained_args(model, cache_dir)
    config = CLIPConfig.from_pretrained(path, **pinned)
    tokenizer, image_cfg = load_processor(model, cache_dir)
    text_width = config.text_config.hidden_size
    if text_encoder:                  # a BERT-family encoder: its tokenizer, its widths, its positions
        text_config = check_text_encoder(text_encoder, text_length, cache_dir)
        tokenizer, text_width = models.load_text_tokenizer(text_encoder, cache_dir), text_config.hidden_size
    elif text_length > config.text_config.max_position_embeddings:
        raise UsageError(f"text_length {text_length} exceeds the model's {config.text_config.max_position_embeddings} "
                         "positions")
    pooling = models.resolve_text_pooling(text_encoder, text_pooling, cache_dir)
    height, width = output_size(image_cfg)
    vc = config.vision_config
    tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    if (height, width) != (vc.image_size, vc.image_size):
        raise UsageError(f"{model}: processor crops to {height}x{width} but the vision model expects {vc.image_size}")

    entities, ent_sha = _read_parquet_bytes(ds.path(ENTITIES))
    mention_tables, split_sha = {}, {}
    for split in SPLITS:
        mention_tables[split], split_sha[split] = _read_parquet_bytes(ds.path(mentions_path(split)))
    synthetic, n_s, synth_sha, synth_rows = ({}, 0, None, 0)
    if synthetic_key:
        synthetic, n_s, synth_sha, synth_rows = _load_synthetic(ds, synthetic_key, views)

    fingerprint = model_fingerprint(model, cache_dir)
    proj = config.projection_dim
    # with a text encoder: t_G is its pooled state ([CLS] or mean) and T_L its token states, both its hidden size wide
    shapes = {"text_global": [text_width if text_encoder else proj], "text_local": [text_length, text_width],
              "text_mask": [text_length], "image_global": [proj], "image_local": [tokens, vc.hidden_size]}
    if synthetic_key:
        shapes["synthetic_global"] = [n_s, proj]
    inputs = {"dataset_tables_sha256": {"entities": ent_sha, **split_sha}, "synthetic_views_sha256": synth_sha}
    settings = {
        "stage": "extract-features", "format_version": FORMAT_VERSION, "model": fingerprint,
        "text_length": text_length, "entity_template": ENTITY_TEMPLATE, "mention_template": MENTION_TEMPLATE,
        "attribute_join": ATTRIBUTE_JOIN, "attribute_end": ATTRIBUTE_END,
        "image": {"decode": "PIL, RGB (transparency over white), LANCZOS to the crop size first (as MIMIC)",
                  "blank": "white", "preprocess": f"mel_ray.features.preprocess_image v{PREPROCESS_VERSION}",
                  "processor": image_cfg},
        "dtype": dtype or "model default", "micro_batch": micro_batch, "shard_rows": shard_rows,
        "synthetic": synthetic_key, "synthetic_views": n_s if synthetic_key else None, "inputs": inputs,
        "encoding_version": ENCODING_VERSION,      # how image-less rows are encoded (features/encoder.py)
    }
    if encoder_checkpoint:
        settings["encoder_checkpoint"] = encoder_checkpoint
    if text_encoder:
        settings["text_encoder"] = model_fingerprint(text_encoder, cache_dir)
    if pooling not in (None, "cls"):
        settings["text_pooling"] = pooling
    settings = json.loads(json.dumps(settings, default=str))     # plain JSON types, as the manifest stores them
    key = settings_key(settings)
    root = features_root or ds.path("features")
    tables: dict[str, Table] = {}
    names = entities.column("name").to_pylist()
    attrs = entities.column("attributes").to_pylist()
    first = [ds.resolve_uri(u[0]) if u else None for u in entities.column("image_uris").to_pylist()]
    tables["entities"] = Table("entities", "entities", entities.num_rows, "entity_id",
                                entities.column("entity_id").to_pylist(),
                                [entity_text(n, a) for n, a in zip(names, attrs)], first)
    for split in splits:
        t = mention_tables[split]
        mids = t.column("mention_id").to_pylist()
        texts = [mention_text(m, s) for m, s in zip(t.column("mention").to_pylist(), t.column("sentence").to_pylist())]
        images = [ds.resolve_uri(u) for u in t.column("image_uri").to_pylist()]
        views = [synthetic.get(mid, []) for mid in mids] if synthetic_key else None
        tables[f"mentions/{split}"] = Table(f"mentions/{split}", f"mentions/{split}", t.num_rows, "mention_id",
                                             mids, texts, images, views)
    if synthetic_key:
        known = {mid for s in SPLITS for mid in mention_tables[s].column("mention_id").to_pylist()}
        inputs["synthetic_rows"] = synth_rows
        inputs["synthetic_unknown_mentions"] = sum(1 for mid in synthetic if mid not in known)
    return Plan(uri=storage.join(root, key), key=key, settings=settings, model=model, cache_dir=cache_dir,
                 text_length=text_length, image_size=(height, width), image_cfg=image_cfg, shapes=shapes,
                 micro_batch=micro_batch, shard_rows=shard_rows, n_views=n_s, dtype=dtype, tables=tables,
                 inputs=inputs, tokenizer=tokenizer, text_encoder=text_encoder or None, text_pooling=pooling)


def features_key(dataset_uri: str, model: str, *, synthetic_key: str | None = None, views: int | None = None,
                 text_length: int = 40, dtype: str | None = None, micro_batch: int = DEFAULT_MICRO_BATCH,
                 shard_rows: int = DEFAULT_SHARD_ROWS, cache_dir: str = DEFAULT_CACHE,
                 text_encoder: str | None = None, text_pooling: str = "auto") -> str:
    """The folder name under DATASET/features that `extract_features` with these settings writes to."""
    return make_plan(dataset_uri, model, synthetic_key=synthetic_key, views=views, text_length=text_length, dtype=dtype,
                 splits=(), micro_batch=micro_batch, shard_rows=shard_rows, features_root=None,
                 cache_dir=cache_dir, text_encoder=text_encoder, text_pooling=text_pooling).key


def make_units(plan: Plan) -> list[dict]:
    """Work units for every shard not written yet: `micro_batch` consecutive rows, never across shards.
    Texts are tokenised here, in the driver (fast, and decode workers then need no transformers)."""
    units: list[dict] = []
    for table in plan.tables.values():
        for shard in table.pending:
            lo, hi = shard * plan.shard_rows, min(table.rows, (shard + 1) * plan.shard_rows)
            ids, mask = tokenize(plan.tokenizer, table.texts[lo:hi], plan.text_length)
            for start in range(lo, hi, plan.micro_batch):
                stop = min(hi, start + plan.micro_batch)
                payload: dict[str, Any] = {"i": table.images[start:stop]}
                if table.views is not None:
                    payload["v"] = [[list(v) for v in views] for views in table.views[start:stop]]
                units.append({"unit": len(units), "table": table.name, "shard": shard, "start": start,
                              "n": stop - start, "input_ids": pack(ids[start - lo:stop - lo]),
                              "attention_mask": pack(mask[start - lo:stop - lo]),
                              "payload": json.dumps(payload, ensure_ascii=False)})
    return units
