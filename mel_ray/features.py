"""extract-features: frozen CLIP features for KB entities, mentions and synthetic views (MIMIC's inputs).

`extract_features(dataset, model, synthetic_key=...)` encodes, with one CLIP model (paper §5.4: ViT-B/32 as
both visual and text encoder), exactly what MIMIC's encoder feeds its matcher (`MIMICEncoder.forward`):

* global text  = `text_embeds`  (projected EOS state, L2-normalised as in `CLIPModel.forward`)   [d_proj]
* local text   = text model `last_hidden_state` (after the final layer norm)                       [L x d_text]
* text mask    = the tokenizer's attention mask (1 = token, 0 = padding)                           [L]
* global image = `image_embeds` (projected CLS state, L2-normalised as in `CLIPModel.forward`)     [d_proj]
* local image  = vision model `last_hidden_state`: CLS + patch tokens (before post-layernorm)     [(P+1) x d_vis]
* synthetic    = global image feature of each synthetic view (paper §4.3, VES^G)                 [n_s x d_proj]

Text inputs (MIMIC `codes/utils/dataset.py`; the CLIP tokenizer lower-cases and splits "[SEP]" into plain
tokens, as it did for MIMIC):

* entity:  ``f"{name} [SEP] {'. '.join(attributes)}."``  (just ``f"{name} [SEP] "`` without attributes);
  our attributes are MIMIC's `attr` string split into "property: value" items, so joining them with ". "
  and ending with "." gives back MIMIC's text.
* mention: ``f"{mention} [SEP] {sentence}"``.
* tokenised with ``padding="max_length", max_length=text_length (40), truncation=True`` (EOS kept).

Images (MIMIC's `choose_image`, paper §5.4): the entity's *first* image (MIMIC's evaluation choice), the
mention's image, each synthetic view. Decoded with PIL, converted to RGB (transparency over white), resized
to the processor's crop size with LANCZOS (MIMIC resizes to 224x224 with LANCZOS first), then CLIP's image
preprocessing with the model's processor settings (`preprocess_image`: bit-identical to transformers'
CLIPImageProcessor PIL/NumPy backend; for CLIP the resize and crop are then no-ops, leaving rescale +
normalise). A row without a usable image gets a blank *white* image (paper §5.4) and ``has_image =
false``; MIMIC used zero pixel values instead. An image that
is referenced but absent is counted as `missing`, one that PIL cannot decode as `undecodable`; both are
treated as "no image", never replaced by noise. Synthetic views that are absent, undecodable or whose bytes
do not match the synthetic manifest's sha256 (`mismatched`) are left out and counted.

Pipeline (Ray Data, streaming): work is cut into *units* of `micro_batch` consecutive rows of one shard;
the driver tokenises their texts. Stage 1 (`map_batches` with a plain function, `decode_num_cpus` each,
no torch or transformers import) reads, decodes and preprocesses the images; stage 2 (`map_batches` with the
callable `_Encoder`, an actor pool of `concurrency` actors with `num_gpus` each) runs CLIP, one forward per
unit; the driver collects units per shard and writes each finished shard atomically (background threads,
so encoding does not wait on S3).

Determinism: on CPU, CLIP outputs depend in the last bits on the batch they are computed in (the projection
of a batch of 1 takes a GEMV path, larger batches a GEMM with other blocking; more torch threads change the
vision encoder's reduction order) and those differences survive float16 rounding now and then. So the
encoder never batches by Ray's `batch_size`: each unit (rows ``[k*micro_batch, (k+1)*micro_batch)`` of a
shard) is one forward pass, whatever `batch_size` (units per actor call) or `concurrency` is. CPU actors
use `mel_ray.runtime.cpu_threads_per_worker()` torch threads (1 by default); the thread count and device
of every shard are recorded (`encoders`), since a different count or device changes the last bits.

Output: ``DATASET/features/<key>/`` (or ``features_root/<key>``), key = `settings_key` of everything that
changes the bytes (model fingerprint, text length and templates, image preprocessing, dtype, micro-batch,
shard size, synthetic key and n_s, a sha256 of the dataset tables and one of the synthetic-manifest rows
used)::

    entities/part-00000.parquet ...           rows [i*shard_rows, (i+1)*shard_rows) of entities.parquet
    mentions/<split>/part-00000.parquet ...   same for mentions/<split>.parquet (row order kept)
    manifest.json                             written last: settings, shapes, dtypes, counts, counters

Columns (tensors are ``fixed_size_list<float16>`` flattened row-major; the field metadata `shape` and the
manifest give the shape, e.g. text_local 40*512 values = [40, 512]):

    entity_id int64 | mention_id string
    text_global   fixed_size_list<float16>[d_proj]
    text_local    fixed_size_list<float16>[L*d_text]
    text_mask     fixed_size_list<int8>[L]
    image_global  fixed_size_list<float16>[d_proj]
    image_local   fixed_size_list<float16>[(P+1)*d_vis]
    has_image     bool
    synthetic_global    fixed_size_list<float16>[n_s*d_proj]   (mentions, with a synthetic key only; views
                                      0..n_s-1 of DATASET/synthetic/<key>/manifest.parquet, n_s = `views`)
    n_views             int32         views filled in synthetic_global (rows >= n_views are zeros: mask them)
    synthetic_view_ids  list<int32>   the synthesize `view` number of each filled row

Resumable: shards already present are skipped, each shard is one atomic write, the manifest is rebuilt from
the shards' own metadata (per-shard counters are stored in each file's schema metadata), so a killed and
resumed run ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mel_ray import __version__, storage
from mel_ray.dataset import ENTITIES, SPLITS, load_dataset, mentions_path
from mel_ray.errors import DataError, UsageError
from mel_ray.keys import settings_key, sha256_hex
from mel_ray.models import DEFAULT_CACHE, is_hub_id, pin_model, pretrained_args, resolve_model

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_META = b"mel_ray.features"          # per-shard JSON in each Parquet file's schema metadata
ENTITY_TEMPLATE = "{name} [SEP] {attributes}"
MENTION_TEMPLATE = "{mention} [SEP] {sentence}"
ATTRIBUTE_JOIN = ". "
ATTRIBUTE_END = "."
BLANK_COLOR = (255, 255, 255)             # paper §5.4: rows without an image get a blank white image
DEFAULT_MICRO_BATCH = 32
DEFAULT_SHARD_ROWS = 1024
MAX_EXAMPLES = 20                          # examples of missing / undecodable URIs kept in the manifest

_SMALL_FILES = (".json", ".txt", ".model")   # configs, tokenizer, processor


# ---------------------------------------------------------------------------------------------- text


def entity_text(name: str, attributes: list[str] | None) -> str:
    """MIMIC's entity input: the name, " [SEP] ", then the attribute statements ("a: b. c: d.")."""
    attrs = ATTRIBUTE_JOIN.join(attributes or [])
    return ENTITY_TEMPLATE.format(name=name, attributes=attrs + ATTRIBUTE_END if attrs else "")


def mention_text(mention: str, sentence: str) -> str:
    """MIMIC's mention input: the mention words, " [SEP] ", the sentence."""
    return MENTION_TEMPLATE.format(mention=mention, sentence=sentence)


# ---------------------------------------------------------------------------------------- model identity


_SHA_CACHE: dict[tuple, str] = {}


def _file_sha(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def model_fingerprint(model: str, cache_dir: str = DEFAULT_CACHE) -> dict[str, Any]:
    """A hub id is its pinned form `id@<commit>` (mel_ray.models.pin_model); a local or s3:// folder is
    fingerprinted by content: sha256 of its configs, tokenizer and processor files and of its weights
    (safetensors if any, else .bin), so a copy elsewhere has the same fingerprint and a retrained checkpoint at
    the same path does not."""
    if is_hub_id(str(model)):
        return {"id": pin_model(str(model))}
    path = resolve_model(str(model), cache_dir)
    files = [f for f in storage.list_files(path) if not os.path.basename(f).startswith(".")]
    weights = [f for f in files if f.endswith(".safetensors")] or [f for f in files if f.endswith(".bin")]
    chosen = sorted([f for f in files if f.endswith(_SMALL_FILES)] + weights)
    if not weights:
        raise UsageError(f"{model}: no model weights (*.safetensors or *.bin) in {path}")
    digest = hashlib.sha256()
    for rel in chosen:
        digest.update(f"{rel}\0{_file_sha(os.path.join(path, rel))}\n".encode())
    return {"content": digest.hexdigest(), "files": len(chosen)}


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class _Table:
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


@dataclass
class _Plan:
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
    tables: dict[str, _Table]
    inputs: dict
    tokenizer: Any = None


def _read_parquet_bytes(uri: str) -> tuple[pa.Table, str]:
    data = storage.read_bytes(uri)
    return pq.read_table(io.BytesIO(data)), sha256_hex(data)


_IMAGE_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
               "do_normalize", "image_mean", "image_std")


def image_config(image_processor) -> dict:
    """The settings `preprocess_image` needs, from a transformers CLIP image processor, as plain JSON."""
    cfg = image_processor.to_dict()
    out = json.loads(json.dumps({k: cfg.get(k) for k in _IMAGE_KEYS}, default=int))
    if out["resample"] is None:
        out["resample"] = 2                 # transformers' default: BILINEAR
    return out


def _output_size(cfg: dict) -> tuple[int, int]:
    """(height, width) of preprocessed images."""
    if cfg["do_center_crop"] and cfg.get("crop_size"):
        return int(cfg["crop_size"]["height"]), int(cfg["crop_size"]["width"])
    size = cfg["size"]
    if "height" in size:
        return int(size["height"]), int(size["width"])
    raise UsageError("image processors that resize the shortest edge without a center crop give images of "
                     "varying size; extract-features needs a fixed size (crop_size)")


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


def _plan(dataset_uri: str, model: str, *, synthetic_key: str | None, views: int | None, text_length: int,
          dtype: str | None, splits: tuple[str, ...], micro_batch: int, shard_rows: int, features_root: str | None,
          cache_dir: str) -> _Plan:
    from transformers import CLIPConfig, CLIPProcessor

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
    processor = CLIPProcessor.from_pretrained(path, **pinned)
    if text_length > config.text_config.max_position_embeddings:
        raise UsageError(f"text_length {text_length} exceeds the model's {config.text_config.max_position_embeddings} "
                         "positions")
    image_cfg = image_config(processor.image_processor)
    height, width = _output_size(image_cfg)
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
    shapes = {"text_global": [proj], "text_local": [text_length, config.text_config.hidden_size],
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
    }
    settings = json.loads(json.dumps(settings, default=str))     # plain JSON types, as the manifest stores them
    key = settings_key(settings)
    root = features_root or ds.path("features")
    tables: dict[str, _Table] = {}
    names = entities.column("name").to_pylist()
    attrs = entities.column("attributes").to_pylist()
    first = [ds.resolve_uri(u[0]) if u else None for u in entities.column("image_uris").to_pylist()]
    tables["entities"] = _Table("entities", "entities", entities.num_rows, "entity_id",
                                entities.column("entity_id").to_pylist(),
                                [entity_text(n, a) for n, a in zip(names, attrs)], first)
    for split in splits:
        t = mention_tables[split]
        mids = t.column("mention_id").to_pylist()
        texts = [mention_text(m, s) for m, s in zip(t.column("mention").to_pylist(), t.column("sentence").to_pylist())]
        images = [ds.resolve_uri(u) for u in t.column("image_uri").to_pylist()]
        views = [synthetic.get(mid, []) for mid in mids] if synthetic_key else None
        tables[f"mentions/{split}"] = _Table(f"mentions/{split}", f"mentions/{split}", t.num_rows, "mention_id",
                                             mids, texts, images, views)
    if synthetic_key:
        known = {mid for s in SPLITS for mid in mention_tables[s].column("mention_id").to_pylist()}
        inputs["synthetic_rows"] = synth_rows
        inputs["synthetic_unknown_mentions"] = sum(1 for mid in synthetic if mid not in known)
    return _Plan(uri=storage.join(root, key), key=key, settings=settings, model=model, cache_dir=cache_dir,
                 text_length=text_length, image_size=(height, width), image_cfg=image_cfg, shapes=shapes,
                 micro_batch=micro_batch, shard_rows=shard_rows, n_views=n_s, dtype=dtype, tables=tables,
                 inputs=inputs, tokenizer=processor.tokenizer)


def features_key(dataset_uri: str, model: str, *, synthetic_key: str | None = None, views: int | None = None,
                 text_length: int = 40, dtype: str | None = None, micro_batch: int = DEFAULT_MICRO_BATCH,
                 shard_rows: int = DEFAULT_SHARD_ROWS, cache_dir: str = DEFAULT_CACHE) -> str:
    """The folder name under DATASET/features that `extract_features` with these settings writes to."""
    return _plan(dataset_uri, model, synthetic_key=synthetic_key, views=views, text_length=text_length, dtype=dtype,
                 splits=(), micro_batch=micro_batch, shard_rows=shard_rows, features_root=None,
                 cache_dir=cache_dir).key


def _n_shards(rows: int, shard_rows: int) -> int:
    return math.ceil(rows / shard_rows)


def tokenize(tokenizer, texts: list[str], text_length: int) -> tuple[np.ndarray, np.ndarray]:
    """MIMIC's text input: (input_ids int32, attention_mask int8), padded / truncated to text_length."""
    if not texts:
        return np.zeros((0, text_length), np.int32), np.zeros((0, text_length), np.int8)
    enc = tokenizer(texts, padding="max_length", max_length=text_length, truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int8)


def _units(plan: _Plan) -> list[dict]:
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
                              "n": stop - start, "input_ids": _pack(ids[start - lo:stop - lo]),
                              "attention_mask": _pack(mask[start - lo:stop - lo]),
                              "payload": json.dumps(payload, ensure_ascii=False)})
    return units


# ------------------------------------------------------------------------------ stage 1: decode (CPU)

PREPROCESS_VERSION = 1      # bump when preprocess_image / to_rgb change what they return


def to_rgb(image):
    """RGB, transparency composited over white (as transformers' `convert_to_rgb`)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image, cfg: dict) -> np.ndarray:
    """CLIP's image preprocessing on an RGB PIL image -> float32 [3, H, W]: resize (shortest edge or fixed
    size, PIL with the configured filter), center crop (zero padding if too small), rescale, normalise.

    Bit for bit what transformers' CLIPImageProcessor does with its PIL/NumPy backend (the pipeline MIMIC
    ran; tests/test_features.py checks equality), implemented here so that decode workers import neither
    torch nor transformers, and so that the pixels do not change when torchvision is installed (transformers
    5 then switches CLIPImageProcessor to a torchvision backend that resizes differently)."""
    if cfg["do_resize"]:
        size, (w, h) = cfg["size"], image.size
        if size.get("shortest_edge"):
            edge = int(size["shortest_edge"])
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = edge, int(edge * long / short)
            new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
        else:
            new_h, new_w = int(size["height"]), int(size["width"])
        image = image.resize((new_w, new_h), resample=int(cfg["resample"]))
    arr = np.asarray(image).transpose(2, 0, 1)
    if cfg["do_center_crop"]:
        ch, cw = int(cfg["crop_size"]["height"]), int(cfg["crop_size"]["width"])
        h, w = arr.shape[1:]
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0:
            arr = arr[:, top:top + ch, left:left + cw]
        else:                               # too small: pad with zeros, centred, then crop
            nh, nw = max(ch, h), max(cw, w)
            padded = np.zeros((arr.shape[0], nh, nw), dtype=arr.dtype)
            tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
            padded[:, tp:tp + h, lp:lp + w] = arr
            top, left = (nh - ch) // 2, (nw - cw) // 2
            arr = padded[:, top:top + ch, left:left + cw]
    if cfg["do_rescale"]:
        arr = (arr.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
    if cfg["do_normalize"]:
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        mean = np.array(cfg["image_mean"], dtype=arr.dtype)
        std = np.array(cfg["image_std"], dtype=arr.dtype)
        arr = ((arr.T - mean) / std).T
    return np.ascontiguousarray(arr, dtype=np.float32)


def _decode(uri: str, size: tuple[int, int], want_sha: str = "") -> tuple[Any, str]:
    """(RGB image resized to size with LANCZOS, "ok") or (None, "missing" | "undecodable" | "mismatched").
    Storage errors other than a missing file are raised: a flaky bucket must fail the run, not blank images."""
    from PIL import Image

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None, "missing"
    if want_sha and sha256_hex(data) != want_sha:
        return None, "mismatched"
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = to_rgb(im)
        return rgb.resize((size[1], size[0]), Image.Resampling.LANCZOS), "ok"
    except Exception:            # noqa: BLE001 - PIL raises many types (OSError, ValueError, SyntaxError, ...)
        return None, "undecodable"


def _note(stats: dict, reason: str, uri: str) -> None:
    stats[reason] = stats.get(reason, 0) + 1
    examples = stats.setdefault("examples", {}).setdefault(reason, [])
    if len(examples) < 5:
        examples.append(uri)


def prepare_unit(payload: dict, *, image_cfg: dict, image_size: tuple[int, int]) -> dict[str, Any]:
    """Decode and preprocess one unit's images: its rows' images (blank white where there is none), then
    the synthetic views that could be used; with per-unit counters (the CPU stage's work)."""
    from PIL import Image

    images, has_image = [], []
    stats: dict[str, Any] = {"rows": len(payload["i"])}
    for uri in payload["i"]:
        img, status = (None, "no_image") if uri is None else _decode(uri, image_size)
        if img is None:
            if status == "no_image":
                stats["no_image"] = stats.get("no_image", 0) + 1
            else:
                _note(stats, status, uri)
            img = Image.new("RGB", (image_size[1], image_size[0]), BLANK_COLOR)
        else:
            stats["with_image"] = stats.get("with_image", 0) + 1
        has_image.append(status == "ok")
        images.append(img)
    n_views, view_ids = [], []
    if "v" in payload:
        synth: dict[str, Any] = {"listed": 0, "used": 0, "mentions_with_views": 0}
        for views in payload["v"]:
            used = []
            for view, uri, sha in views:
                synth["listed"] += 1
                img, status = _decode(uri, image_size, sha)
                if img is None:
                    _note(synth, status, uri)
                    continue
                images.append(img)
                used.append(int(view))
            synth["used"] += len(used)
            synth["mentions_with_views"] += bool(used)
            n_views.append(len(used))
            view_ids.append(used)
        stats["synthetic"] = synth
    pixels = np.stack([preprocess_image(im, image_cfg) for im in images])
    return {"pixels": pixels, "has_image": np.array(has_image, dtype=bool),
            "n_views": np.array(n_views, dtype=np.int32), "view_ids": view_ids, "stats": stats}


def _pack(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr).tobytes()


def _unpack(data: bytes, dtype, shape: tuple) -> np.ndarray:
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()     # writable, as torch.from_numpy wants


def _prepare_batch(batch: dict[str, np.ndarray], *, image_cfg: dict,
                   image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Ray Data stage 1 (plain function, CPU tasks): units in, pixel tensors (raw float32 bytes) out;
    token ids pass through."""
    out: dict[str, list] = {k: [] for k in ("unit", "n", "n_images", "input_ids", "attention_mask", "pixels",
                                            "has_image", "n_views", "meta")}
    for i, (unit, payload) in enumerate(zip(batch["unit"], batch["payload"])):
        p = prepare_unit(json.loads(payload), image_cfg=image_cfg, image_size=tuple(image_size))
        out["unit"].append(int(unit))
        out["n"].append(len(p["has_image"]))
        out["n_images"].append(len(p["pixels"]))
        out["input_ids"].append(batch["input_ids"][i])
        out["attention_mask"].append(batch["attention_mask"][i])
        for k in ("pixels", "has_image", "n_views"):
            out[k].append(_pack(p[k]))
        out["meta"].append(json.dumps({"view_ids": p["view_ids"], "stats": p["stats"]}))
    return {k: np.array(v, dtype=object if k not in ("unit", "n", "n_images") else np.int64)
            for k, v in out.items()}


# ----------------------------------------------------------------------------- stage 2: encode (actors)


class _Encoder:
    """CLIP in an actor (Ray Data callable class). One forward pass per unit, never across units."""

    def __init__(self, model: str, cache_dir: str, dtype: str | None, use_gpu: bool, image_size: tuple[int, int],
                 text_length: int):
        import torch

        from mel_ray.models import load_clip
        from mel_ray.runtime import cpu_threads_per_worker

        self.torch = torch
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("extract-features: num_gpus > 0 but this actor sees no CUDA device")
            self.device = "cuda"
            self.name = f"cuda/{torch.cuda.get_device_name()}"
        else:
            torch.set_num_threads(cpu_threads_per_worker())
            self.device = "cpu"
            self.name = f"cpu/threads={torch.get_num_threads()}"
        self.model, _ = load_clip(model, self.device, dtype, cache_dir)
        self.dtype = self.model.dtype
        self.image_size = tuple(image_size)
        self.text_length = text_length

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixels: np.ndarray,
               n: int) -> dict[str, np.ndarray]:
        """float16 features of one unit: text of its n rows, images (n main first, then synthetic views).
        Three forward passes: texts, the n row images, the synthetic views; so a row's own features do not
        depend on how many views its unit has (and are the same with or without a synthetic key)."""
        torch = self.torch
        half = torch.float16
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask.astype(np.int64)).to(self.device)
            text = self.model.get_text_features(input_ids=ids, attention_mask=mask)
            tg = text.pooler_output
            tg = tg / _vector_norm(torch, tg)
            globals_, local = [], None
            for part in (pixels[:n], pixels[n:]):
                if not len(part):
                    continue
                vision = self.model.get_image_features(pixel_values=torch.from_numpy(part).to(self.device,
                                                                                              dtype=self.dtype))
                ig = vision.pooler_output
                globals_.append((ig / _vector_norm(torch, ig)).to(half).cpu().numpy())
                if local is None:
                    local = vision.last_hidden_state.to(half).cpu().numpy()
            return {"text_global": tg.to(half).cpu().numpy(),
                    "text_local": text.last_hidden_state.to(half).cpu().numpy(),
                    "image_global": np.concatenate(globals_), "image_local": local}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {k: [] for k in ("unit", "text_global", "text_local", "image_global", "image_local",
                                                "text_mask", "has_image", "n_views", "meta", "encoder")}
        h, w = self.image_size
        for i, unit in enumerate(batch["unit"]):
            n, k = int(batch["n"][i]), int(batch["n_images"][i])
            ids = _unpack(batch["input_ids"][i], np.int32, (n, self.text_length)).astype(np.int64)
            mask = _unpack(batch["attention_mask"][i], np.int8, (n, self.text_length))
            pixels = _unpack(batch["pixels"][i], np.float32, (k, 3, h, w))
            feats = self.encode(ids, mask, pixels, n)
            out["unit"].append(int(unit))
            for name, arr in feats.items():
                out[name].append(_pack(arr))
            out["text_mask"].append(_pack(mask))
            for name in ("has_image", "n_views", "meta"):
                out[name].append(batch[name][i])
            out["encoder"].append(self.name)
        return {k: np.array(v, dtype=np.int64 if k == "unit" else object) for k, v in out.items()}


def _vector_norm(torch, t):
    """`transformers.models.clip.modeling_clip._get_vector_norm`, so globals equal CLIPModel's embeds."""
    return torch.pow(torch.sum(torch.pow(t, 2), dim=-1, keepdim=True), 0.5)


# ----------------------------------------------------------------------------------- shards (driver)


def _fsl(flat: np.ndarray, size: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), size)


def _shard_table(plan: _Plan, table: _Table, shard: int, units: list[dict]) -> pa.Table:
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

    proj = shapes["text_global"][0]
    cols["text_global"] = _fsl(cat("text_global", np.float16, proj), proj)
    size = int(np.prod(shapes["text_local"]))
    cols["text_local"] = _fsl(cat("text_local", np.float16, size), size)
    cols["text_mask"] = _fsl(cat("text_mask", np.int8, plan.text_length), plan.text_length)
    cols["image_global"] = _fsl(cat("image_global", np.float16, proj, lambda a, u: a[:u["n"]]), proj)
    size = int(np.prod(shapes["image_local"]))
    cols["image_local"] = _fsl(cat("image_local", np.float16, size), size)
    cols["has_image"] = pa.array(cat("has_image", np.bool_, 1), type=pa.bool_())
    encoders = sorted({u["encoder"] for u in units})
    stats = _merge_stats([u["stats"] for u in units])
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


def _merge_stats(items: list[dict]) -> dict:
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
                out[k] = _merge_stats([out.get(k, {}), v])
            else:
                out[k] = out.get(k, 0) + v
    return out


def _write_shard(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    id_col = table.column_names[0]
    pq.write_table(table, buf, compression="zstd", use_dictionary=[id_col], write_statistics=[id_col])
    storage.write_bytes(uri, buf.getvalue())


# ------------------------------------------------------------------------------------------ execution


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"extract-features: {msg}", file=sys.stderr, flush=True)


class _Collector:
    """Gathers unit outputs per shard; a completed shard is assembled and written in a background thread."""

    def __init__(self, plan: _Plan, units: list[dict], quiet: bool, writers: int = 2):
        self.plan, self.quiet = plan, quiet
        self.units = {u["unit"]: u for u in units}
        self.expected = Counter((u["table"], u["shard"]) for u in units)
        self.buffers: dict[tuple[str, int], list[dict]] = {}
        self.pool = cf.ThreadPoolExecutor(max_workers=writers, thread_name_prefix="features-writer")
        self.futures: list[cf.Future] = []
        self.max_pending = 2 * writers
        self.total_shards = len(self.expected)
        self.done_shards = 0
        self.rows = self.images = 0
        self.t0 = time.perf_counter()

    def add(self, out: dict) -> None:
        unit = self.units[out["unit"]]
        meta = json.loads(out.pop("meta"))
        out.update(table=unit["table"], shard=unit["shard"], start=unit["start"], n=unit["n"],
                   view_ids=meta["view_ids"], stats=meta["stats"])
        self.rows += unit["n"]
        self.images += len(out["image_global"]) // (2 * self.plan.shapes["image_global"][0])
        key = (unit["table"], unit["shard"])
        buf = self.buffers.setdefault(key, [])
        buf.append(out)
        if len(buf) == self.expected[key]:
            del self.buffers[key]
            self._reap(block=len(self.futures) >= self.max_pending)
            self.futures.append(self.pool.submit(self._write, key, buf))

    def _write(self, key: tuple[str, int], units: list[dict]) -> None:
        table = self.plan.tables[key[0]]
        shard_table = _shard_table(self.plan, table, key[1], units)
        _write_shard(storage.join(self.plan.uri, table.shard_name(key[1])), shard_table)

    def _reap(self, block: bool) -> None:
        if block and self.futures:
            cf.wait(self.futures, return_when=cf.FIRST_COMPLETED)
        still = []
        for f in self.futures:
            if f.done():
                f.result()                      # re-raise a failed write here
                self.done_shards += 1
                elapsed = time.perf_counter() - self.t0
                _log(self.quiet, f"{self.done_shards}/{self.total_shards} shards written, {self.rows} rows, "
                     f"{self.images} images encoded in {elapsed:.1f}s ({self.images / max(elapsed, 1e-9):.1f} images/s)")
            else:
                still.append(f)
        self.futures = still

    def finish(self) -> None:
        """Wait for the writes; every shard must be complete."""
        try:
            for f in cf.as_completed(list(self.futures)):
                f.result()
            self._reap(block=False)
            if self.buffers:
                raise RuntimeError(f"extract-features: units missing for shards {sorted(self.buffers)}")
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """After a failure: let shards already handed to the writers land (a rerun keeps them), drop the rest."""
        cf.wait(self.futures)
        self.pool.shutdown(wait=True, cancel_futures=True)


def _consume(collector: _Collector, rows) -> None:
    try:
        for row in rows:
            collector.add(row)
    except BaseException:
        collector.abort()
        raise
    collector.finish()


def _rows_of(batch: dict[str, np.ndarray]):
    for i in range(len(batch["unit"])):
        yield {k: (int(v[i]) if k == "unit" else v[i]) for k, v in batch.items()}


def _run_ray(plan: _Plan, units: list[dict], *, batch_size: int, concurrency: int, num_gpus: float,
             num_cpus: float | None, decode_num_cpus: float, quiet: bool) -> None:
    import ray

    from mel_ray.runtime import check_gpus, init_ray

    init_ray()
    check_gpus("extract-features", num_gpus, "features.num_gpus")
    if num_cpus is None:
        if num_gpus > 0:
            num_cpus = 1.0
        else:   # leave room for one decode task next to the actors, or a small cluster deadlocks
            total = float(ray.cluster_resources().get("CPU", 1.0))
            num_cpus = max(0.05, min(1.0, (total - decode_num_cpus) / concurrency))
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(_prepare_batch, batch_size=1, num_cpus=decode_num_cpus,
                        fn_kwargs={"image_cfg": plan.image_cfg, "image_size": list(plan.image_size)})
    ds = ds.map_batches(_Encoder, batch_size=max(1, math.ceil(batch_size / plan.micro_batch)),
                        compute=ray.data.ActorPoolStrategy(size=concurrency), num_gpus=num_gpus, num_cpus=num_cpus,
                        fn_constructor_kwargs={"model": plan.model, "cache_dir": plan.cache_dir, "dtype": plan.dtype,
                                               "use_gpu": num_gpus > 0, "image_size": list(plan.image_size),
                                               "text_length": plan.text_length})
    batches = ds.iter_batches(batch_size=None, batch_format="numpy")
    _consume(_Collector(plan, units, quiet), (row for batch in batches for row in _rows_of(batch)))


def _run_local(plan: _Plan, units: list[dict], *, use_gpu: bool, quiet: bool) -> None:
    """The same work in this process, one unit after another (debugging; the benchmark's baseline)."""
    import torch

    threads = torch.get_num_threads()
    try:
        encoder = _Encoder(plan.model, plan.cache_dir, plan.dtype, use_gpu, plan.image_size, plan.text_length)

        def rows():
            for unit in units:
                batch = {k: np.array([unit[k]], dtype=np.int64 if k == "unit" else object)
                         for k in ("unit", "input_ids", "attention_mask", "payload")}
                prepared = _prepare_batch(batch, image_cfg=plan.image_cfg, image_size=plan.image_size)
                yield from _rows_of(encoder(prepared))
        _consume(_Collector(plan, units, quiet), rows())
    finally:
        torch.set_num_threads(threads)


def _shard_info(uri: str) -> dict:
    fs, path = storage.resolve(uri)
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except OSError as err:
        raise storage.StorageError(f"{uri}: could not read Parquet footer: {err}") from err
    return json.loads(schema.metadata[SHARD_META])


def _manifest(plan: _Plan, existing: set[str]) -> dict:
    """Built only from settings and the shards' own metadata: identical for resumed and uninterrupted runs."""
    tables, counters, encoders = {}, {}, set()
    for name in ["entities", *[f"mentions/{s}" for s in SPLITS]]:
        table = plan.tables.get(name)
        if table is None:
            continue
        shards = [table.shard_name(s) for s in range(_n_shards(table.rows, plan.shard_rows))]
        infos = [_shard_info(storage.join(plan.uri, s)) for s in shards if s in existing]
        if len(infos) != len(shards):
            continue
        columns = [table.id_column, "text_global", "text_local", "text_mask", "image_global", "image_local",
                   "has_image"]
        if table.views is not None:
            columns += ["synthetic_global", "n_views", "synthetic_view_ids"]
        tables[name] = {"rows": table.rows, "shards": shards, "columns": columns}
        stats = _merge_stats([i["stats"] for i in infos])
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


def extract_features(dataset_uri: str, model: str, *, synthetic_key: str | None = None, views: int | None = None,
                     text_length: int = 40, batch_size: int = 64, concurrency: int = 1, num_gpus: float | str = 0,
                     dtype: str | None = None, splits: tuple[str, ...] | list[str] = SPLITS,
                     micro_batch: int = DEFAULT_MICRO_BATCH, shard_rows: int = DEFAULT_SHARD_ROWS,
                     num_cpus: float | None = None, decode_num_cpus: float = 0.5, features_root: str | None = None,
                     cache_dir: str = DEFAULT_CACHE, engine: str = "ray", quiet: bool = False) -> dict:
    """Write CLIP features of the dataset's entities and mentions (and synthetic views) under
    DATASET/features/<key>/ (or features_root/<key>/); returns the manifest plus `uri` and `run`.

    synthetic_key: DATASET/synthetic/<key> (synthesize's output); views: use only synthetic views < views
    (n_s; default: every view in its manifest). dtype: float32 / float16 / bfloat16 for the model (default:
    as saved); features are stored as float16 either way. batch_size: rows handed to an encoder actor per
    call (rounded up to whole micro-batches); it does not change the output. micro_batch: rows per forward
    pass (part of the key). shard_rows: rows per Parquet shard (part of the key). concurrency / num_gpus /
    num_cpus: the encoder actor pool; num_cpus None = 1 per actor with GPUs, else what fits next to one
    decode task. decode_num_cpus: CPUs per decode task. engine "local" runs everything in this process
    (debugging, the benchmark's baseline; same bytes). quiet: no progress lines on stderr.
    """
    from mel_ray.runtime import resolve_num_gpus

    if num_gpus == "auto" and engine == "local":     # without Ray: this machine's GPU
        import torch

        num_gpus = 1.0 if torch.cuda.is_available() else 0.0
    if isinstance(num_gpus, str):   # "auto": 1 GPU per encoder where the cluster has GPUs, else CPU
        num_gpus = resolve_num_gpus("extract-features", num_gpus, "features.num_gpus")
    if batch_size < 1 or concurrency < 1 or num_gpus < 0:
        raise UsageError("batch_size and concurrency must be >= 1 and num_gpus >= 0")
    if engine not in ("ray", "local"):
        raise UsageError(f"engine {engine!r}: expected 'ray' or 'local'")
    t0 = time.perf_counter()
    model = pin_model(str(model))         # a hub id: the commit the key names and every encoder loads
    plan = _plan(str(dataset_uri), model, synthetic_key=synthetic_key, views=views, text_length=text_length,
                 dtype=dtype, splits=tuple(splits), micro_batch=micro_batch, shard_rows=shard_rows,
                 features_root=features_root, cache_dir=cache_dir)
    existing = set(storage.list_files(plan.uri))
    for table in plan.tables.values():
        table.pending = [s for s in range(_n_shards(table.rows, shard_rows)) if table.shard_name(s) not in existing]
    units = _units(plan)
    total = sum(_n_shards(t.rows, shard_rows) for t in plan.tables.values())
    pending = sum(len(t.pending) for t in plan.tables.values())
    _log(quiet, f"{plan.uri}: {', '.join(f'{t.name} {t.rows} rows' for t in plan.tables.values())}; "
         f"{total - pending}/{total} shards already written, {len(units)} units of <= {micro_batch} rows to encode")
    if units:
        if engine == "local":
            _run_local(plan, units, use_gpu=num_gpus > 0, quiet=quiet)
        else:
            _run_ray(plan, units, batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus,
                     num_cpus=num_cpus, decode_num_cpus=decode_num_cpus, quiet=quiet)
        existing = set(storage.list_files(plan.uri))
    manifest = _manifest(plan, existing)
    missing = [t for t in plan.tables if t not in manifest["tables"]]
    if missing:
        raise RuntimeError(f"extract-features: shards missing for {missing} after the run")
    manifest_uri = storage.join(plan.uri, MANIFEST)
    if not storage.exists(manifest_uri) or storage.read_json(manifest_uri) != manifest:
        storage.write_json(manifest_uri, manifest)
    elapsed = time.perf_counter() - t0
    _log(quiet, f"done: {plan.uri} ({pending} shards written, {total - pending} skipped, {elapsed:.1f}s)")
    return {**manifest, "uri": plan.uri,
            "run": {"shards_written": pending, "shards_skipped": total - pending, "units": len(units),
                    "seconds": round(elapsed, 3), "num_gpus": float(num_gpus)}}


# ---------------------------------------------------------------------------------------------- reading


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
    """All shards of one table ("entities" or "mentions/<split>") concatenated in row order."""
    manifest = storage.read_json(storage.join(features_uri, MANIFEST))
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
