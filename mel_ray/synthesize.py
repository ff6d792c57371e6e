"""Synthetic views for CVaCPT (paper §4.3): Stable Diffusion draws `views` (n_s) images per mention.

Prompt: a template over the mention and its sentence, by default "An image of {mention}: {sentence}" -- the
paper's "An image of" + sentence, with the mention named so that two mentions of one sentence get different
prompts (and images). Prompts longer than the text encoder's limit are cut at the last whole word that fits,
and the manifest stores exactly the text the pipeline received.

model "procedural:demo" is a TEST TOOL, not a model (mel_ray/procedural.py): it draws what a demo-data prompt's
attribute clues describe with the demo generator's drawing code, so experiments on generated data have views
that carry information (the tiny Stable Diffusion's weights are random). It has no text encoder, so prompts
are never cut; its settings key holds its name and version instead of a weights fingerprint.

Output contract (read by extract-features), all under DATASET/synthetic/<key>/:

    settings.json       the settings that made <key> (everything that changes the pixels) + provenance
    images/<h2>/<safe id>-<h10>_<view>.png      h = sha256(mention_id); safe id = id with [^A-Za-z0-9._-] -> _
    manifest.parquet    mention_id, view int32, seed int64, prompt, uri (relative to the dataset root),
                        sha256 (of the PNG bytes), nsfw (bool; null when the safety checker is off);
                        one row per existing (mention_id, view), sorted by (mention_id, view)
    complete.json       written after the manifest: counts and, per split, how many leading views every
                        mention of that split has (`complete_views`)
    parts/*.parquet     per-batch records written by the actors; present only while a run is going on or
                        after one was killed; merged into manifest.parquet at the end of the next run

<key> = settings_key(model content fingerprint or hub revision, template, steps, guidance, size, scheduler,
seed, dtype, device, CPU torch threads, safety checker). `views`, splits, limit, batch size and the number
of actors are NOT part of it: each (mention, view) image depends only on the key's settings and on
stable_seed(seed, mention_id, view), so asking for more views later generates only the missing ones, and
the manifest lists every image that exists.

Determinism: a batched diffusers call does not give the same bits as one image at a time (CPU GEMM/conv
kernels pick their blocking from the batch shape; measured: max |diff| 1.7e-6 in [0, 1], enough to change
some uint8 pixels), and on CPU the torch thread count changes the bits too. So every image is generated on
its own (one prompt, one generator; classifier-free guidance still runs the UNet on the [uncond, cond] pair)
and the CPU thread count is part of the key: results are byte-identical whatever the batch size, the
partitioning, the number of actors or a kill-and-resume, on the same hardware and library versions.

Resumable: each PNG is written atomically, then the actor writes its batch's records as one small Parquet
part. A (mention, view) counts as done when it has a record and its PNG exists; a PNG written just before a
kill, without a record yet, is regenerated (same bytes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import string
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mel_ray import __version__, procedural, storage
from mel_ray.config import SynthesizeConfig
from mel_ray.dataset import SPLITS, load_dataset
from mel_ray.errors import UsageError
from mel_ray.keys import settings_key, sha256_hex, stable_seed
from mel_ray.models import DEFAULT_CACHE, is_hub_id, pin_model, pretrained_args, resolve_model
from mel_ray.runtime import check_gpus, cpu_threads_per_worker, init_ray, resolve_num_gpus

log = logging.getLogger(__name__)

FORMAT_VERSION = 1          # bump when the generation procedure changes the pixels for the same settings
SYNTHETIC_DIR = "synthetic"
MANIFEST = "manifest.parquet"
SETTINGS = "settings.json"
COMPLETE = "complete.json"
PARTS = "parts"
IMAGES = "images"

_DEFAULTS = SynthesizeConfig()
DEFAULT_TEMPLATE = _DEFAULTS.template

MANIFEST_SCHEMA = pa.schema([
    pa.field("mention_id", pa.string(), nullable=False),
    pa.field("view", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("nsfw", pa.bool_(), nullable=True),
])

# scheduler name -> (diffusers class, extra config); "model" keeps the scheduler saved with the model
SCHEDULERS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmsolver++-karras": ("DPMSolverMultistepScheduler",
                           {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "model": None,
}
DTYPES = ("float32", "float16", "bfloat16")


# ------------------------------------------------------------------------------------------------ naming


def image_relpath(key: str, mention_id: str, view: int) -> str:
    """Dataset-relative URI of one view. Mention ids may hold '/' and ':' (merged datasets): the file name
    keeps a readable safe form and adds a hash of the exact id, so different ids never share a file."""
    h = sha256_hex(mention_id.encode("utf-8"))
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", mention_id).strip("._-")[:80] or "m"
    return f"{SYNTHETIC_DIR}/{key}/{IMAGES}/{h[:2]}/{safe}-{h[:10]}_{int(view)}.png"


def view_seed(seed: int, mention_id: str, view: int) -> int:
    return stable_seed(seed, mention_id, int(view))


def check_template(template: str) -> None:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = sorted(fields - {"mention", "sentence"})
    if unknown or "" in fields:
        raise UsageError(f"synthesize template {template!r}: only {{mention}} and {{sentence}} may be used "
                         f"(got {', '.join(repr(f) for f in unknown) or 'a positional {}'})")


def render_prompt(template: str, mention: str, sentence: str) -> str:
    return template.format(mention=mention, sentence=sentence)


def prompt_limit(tokenizer, text_encoder=None) -> int:
    """Tokens the text encoder sees, special tokens included (77 for Stable Diffusion 1.x)."""
    limit = int(tokenizer.model_max_length) if tokenizer.model_max_length < 10**6 else 77
    if text_encoder is not None:
        limit = min(limit, int(text_encoder.config.max_position_embeddings))
    return limit


def fit_prompt(text: str, tokenizer, limit: int) -> str:
    """`text` if it fits in `limit` tokens (with BOS/EOS); else its longest prefix ending at a whole word that
    fits, so the stored prompt is exactly what the text encoder reads; a single over-long word is cut by
    tokens and decoded."""
    def n_tokens(t: str) -> int:
        return len(tokenizer(t, truncation=False, verbose=False)["input_ids"])

    if n_tokens(text) <= limit:
        return text
    cuts = [m.end() for m in re.finditer(r"\S+", text)]
    lo, hi, best = 0, len(cuts) - 1, None      # token counts grow with whole-word prefixes: binary search
    while lo <= hi:
        mid = (lo + hi) // 2
        if n_tokens(text[:cuts[mid]]) <= limit:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best is not None:
        return text[:cuts[best]]
    ids = tokenizer(text, truncation=True, max_length=limit)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ settings/key


def _hash_file(path: Path, cache: dict) -> str:
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    hit = cache.get(str(path))
    if hit and hit[:2] == stamp:
        return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    cache[str(path)] = [*stamp, h.hexdigest()]
    return h.hexdigest()


def model_fingerprint(folder: str | Path, cache_dir: str = DEFAULT_CACHE) -> str:
    """sha256 over what from_pretrained loads: model_index.json and every non-hidden file in the component
    folders (weights, configs, tokenizer), by content. A rebuilt or fine-tuned model gets a new key; a moved
    or copied one keeps its key. File hashes are cached by (path, size, mtime) under `cache_dir`."""
    root = Path(folder)
    if not (root / "model_index.json").is_file():
        raise UsageError(f"{root}: not a diffusers pipeline folder (no model_index.json)")
    files = [root / "model_index.json"]
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and len(rel.parts) > 1 and not any(part.startswith(".") for part in rel.parts):
            files.append(p)
    cache_file = Path(cache_dir).expanduser() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    entries = [[p.relative_to(root).as_posix(), _hash_file(p.absolute(), cache)] for p in files]
    try:
        storage.write_json(str(cache_file), cache)
    except OSError:
        pass                                   # a read-only home only costs re-hashing next time
    return sha256_hex(json.dumps(entries).encode("utf-8"))


def model_identity(model: str, revision: str | None = None, cache_dir: str = DEFAULT_CACHE) -> dict[str, Any]:
    """What identifies the weights: the content fingerprint of a local folder (an s3:// folder is fetched to
    the model cache first and fingerprinted there: that copy is what the workers load), or a hub id with the
    commit its revision points at (mel_ray.models.pin_model: the hub, else the local cache, else an error)."""
    model = str(model)
    if procedural.is_procedural(model):       # a test tool, no weights: see mel_ray/procedural.py
        return procedural.identity(model)
    if not is_hub_id(model):
        return {"fingerprint": model_fingerprint(resolve_model(model, cache_dir), cache_dir)}
    model_id, _, commit = pin_model(model, revision).partition("@")
    return {"hub_id": model_id, "revision": commit}


def resolve_device_dtype(num_gpus: float | str, dtype: str | None) -> tuple[str, str]:
    if isinstance(num_gpus, str):     # "auto": the key names the device it resolves to, never "auto"
        num_gpus = resolve_num_gpus("synthesize", num_gpus, "synthesize.num_gpus")
    device = "cuda" if num_gpus and num_gpus > 0 else "cpu"
    dtype = dtype or ("float16" if device == "cuda" else "float32")
    if dtype not in DTYPES:
        raise UsageError(f"synthesize dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return device, dtype


def synthesis_settings(model: str, *, template: str = DEFAULT_TEMPLATE, steps: int = _DEFAULTS.steps,
                       guidance: float = _DEFAULTS.guidance, size: int = _DEFAULTS.size,
                       scheduler: str = _DEFAULTS.scheduler, seed: int = _DEFAULTS.seed,
                       num_gpus: float = _DEFAULTS.num_gpus, dtype: str | None = None,
                       safety_checker: bool = False, revision: str | None = None,
                       cpu_threads: int | None = None, cache_dir: str = DEFAULT_CACHE) -> dict[str, Any]:
    """Every setting that changes the pixels; settings_key() of this dict names the output folder."""
    check_template(template)
    if scheduler not in SCHEDULERS:
        raise UsageError(f"synthesize scheduler {scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
    if size % 8:
        raise UsageError(f"synthesize size {size}: must be a multiple of 8")
    if steps < 1:
        raise UsageError(f"synthesize steps {steps}: must be at least 1")
    device, dtype = resolve_device_dtype(num_gpus, dtype)
    if safety_checker and not is_hub_id(model):
        index = json.loads((Path(resolve_model(model, cache_dir)) / "model_index.json").read_text("utf-8"))
        if not any(index.get("safety_checker") or [None]):
            raise UsageError(f"{model}: safety_checker=True but the model has no safety checker")
    settings = {"format": FORMAT_VERSION, "model": model_identity(model, revision, cache_dir),
                "template": template, "steps": int(steps), "guidance": float(guidance), "size": int(size),
                "scheduler": scheduler, "seed": int(seed), "dtype": dtype, "device": device,
                "safety_checker": bool(safety_checker)}
    if device == "cpu":       # CPU kernels split work by thread count, which changes the last bits
        settings["cpu_threads"] = int(cpu_threads or cpu_threads_per_worker())
    return settings


def synthesis_key(settings: dict[str, Any]) -> str:
    return settings_key(settings)


def synthetic_uri(dataset_uri: str, key: str) -> str:
    return storage.join(dataset_uri, SYNTHETIC_DIR, key)


# ----------------------------------------------------------------------------------------------- generator


def load_pipeline(model: str, *, device: str = "cpu", dtype: str = "float32", scheduler: str = "dpmsolver++",
                  safety_checker: bool = False, cache_dir: str = DEFAULT_CACHE):
    """StableDiffusionPipeline on `device` in `dtype`, with the named scheduler; the safety checker only when
    asked for (it blacks out flagged images). Attention is diffusers' default SDPA (AttnProcessor2_0)."""
    import importlib.util

    import torch
    from diffusers import StableDiffusionPipeline

    path, pinned = pretrained_args(model, cache_dir)      # a hub id comes pinned: id@<commit> (see synthesize)
    # diffusers >= 0.36 takes `dtype` (and warns about `torch_dtype`); older releases only `torch_dtype`
    new_api = importlib.util.find_spec("diffusers.utils.deprecation_utils") is not None
    kwargs: dict[str, Any] = {"dtype" if new_api else "torch_dtype": getattr(torch, dtype),
                              "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None, **pinned}
    if not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
    if safety_checker and pipe.safety_checker is None:
        raise UsageError(f"{model}: safety_checker=True but the model has no safety checker")
    spec = SCHEDULERS[scheduler]
    if spec is not None:
        import diffusers

        cls, extra = spec
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_png(image) -> bytes:
    """float image in [0, 1] (H, W, 3) -> PNG bytes; PIL writes no timestamps, so equal pixels, equal bytes."""
    import numpy as np
    from PIL import Image

    pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class ViewGenerator:
    """Holds one pipeline; called with a batch of (mention_id, view, seed, mention, sentence) rows it draws each
    image on its own, writes the PNGs, then the batch's records as one Parquet part; returns the records.

    The same class is the Ray Data actor (map_batches) and the plain loop (benchmark, tests)."""

    def __init__(self, *, dataset_uri: str, key: str, model: str, template: str, steps: int, guidance: float,
                 size: int, scheduler: str, device: str, dtype: str, safety_checker: bool = False,
                 cache_dir: str = DEFAULT_CACHE, cpu_threads: int = 1,
                 write_parts: bool = True):
        import torch

        if device == "cpu":
            torch.set_num_threads(int(cpu_threads))
        elif not torch.cuda.is_available():
            raise RuntimeError("synthesize: num_gpus > 0 but this worker sees no CUDA device")
        self.dataset_uri, self.key = dataset_uri, key
        self.template, self.steps, self.guidance, self.size = template, steps, guidance, size
        self.device, self.write_parts = device, write_parts
        if procedural.is_procedural(model):   # TEST TOOL (mel_ray/procedural.py): no text encoder, no limit
            self.pipe, self.limit = procedural.ProceduralPipeline(model), None
        else:
            self.pipe = load_pipeline(model, device=device, dtype=dtype, scheduler=scheduler,
                                      safety_checker=safety_checker, cache_dir=cache_dir)
            self.limit = prompt_limit(self.pipe.tokenizer, self.pipe.text_encoder)
        self.safety_checker = safety_checker

    def prompt(self, mention: str, sentence: str) -> str:
        text = render_prompt(self.template, mention, sentence)
        return text if self.limit is None else fit_prompt(text, self.pipe.tokenizer, self.limit)

    def generate_one(self, prompt: str, seed: int):
        import torch

        if isinstance(self.pipe, procedural.ProceduralPipeline):
            return self.pipe.generate(prompt, seed, self.size), None

        out = self.pipe(prompt=prompt, num_inference_steps=self.steps, guidance_scale=self.guidance,
                        height=self.size, width=self.size, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(int(seed)))
        nsfw = out.nsfw_content_detected
        return out.images[0], (bool(nsfw[0]) if nsfw is not None else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = []
        for row in batch.to_pylist():
            prompt = self.prompt(row["mention"], row["sentence"])
            image, nsfw = self.generate_one(prompt, row["seed"])
            png = encode_png(image)
            rel = image_relpath(self.key, row["mention_id"], row["view"])
            storage.write_bytes(storage.join(self.dataset_uri, rel), png)
            records.append({"mention_id": row["mention_id"], "view": int(row["view"]), "seed": int(row["seed"]),
                            "prompt": prompt, "uri": rel, "sha256": sha256_hex(png), "nsfw": nsfw})
        table = pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA)
        if self.write_parts and records:
            part = storage.join(synthetic_uri(self.dataset_uri, self.key), PARTS, f"{uuid.uuid4().hex}.parquet")
            storage.write_table(part, table)
        return table


# --------------------------------------------------------------------------------------------- the stage


def _read_records(out: str) -> tuple[pa.Table, int]:
    """manifest.parquet + every part left by earlier (possibly killed) runs; (records, number of parts)."""
    tables = []
    if storage.exists(storage.join(out, MANIFEST)):
        tables.append(storage.read_table(storage.join(out, MANIFEST)))
    parts = [storage.join(out, PARTS, p) for p in storage.list_files(storage.join(out, PARTS))
             if p.endswith(".parquet")]
    if parts:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            tables.extend(pool.map(storage.read_table, parts))
    if not tables:
        return MANIFEST_SCHEMA.empty_table(), 0
    return pa.concat_tables([t.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA) for t in tables]), len(parts)


def _existing_images(dataset_uri: str, key: str) -> set[str]:
    prefix = f"{SYNTHETIC_DIR}/{key}/{IMAGES}/"
    return {prefix + rel for rel in storage.list_files(storage.join(synthetic_uri(dataset_uri, key), IMAGES))}


def _dedupe_sorted(records: pa.Table, existing: set[str]) -> pa.Table:
    """One row per (mention_id, view) whose PNG exists, the latest record winning, sorted."""
    rows: dict[tuple[str, int], dict] = {}
    for row in records.to_pylist():
        if row["uri"] in existing:
            rows[(row["mention_id"], row["view"])] = row
    return pa.Table.from_pylist([rows[k] for k in sorted(rows)], schema=MANIFEST_SCHEMA)


def _complete_views(ds, manifest: pa.Table) -> tuple[dict[str, int], dict[str, int]]:
    have: dict[str, set[int]] = {}
    for mid, view in zip(manifest.column("mention_id").to_pylist(), manifest.column("view").to_pylist()):
        have.setdefault(mid, set()).add(view)
    complete, counts = {}, {}
    for split in SPLITS:
        ids = ds.mentions(split, columns=["mention_id"]).column("mention_id").to_pylist()
        counts[split] = len(ids)
        best = None
        for mid in ids:
            views, n = have.get(mid, set()), 0
            while n in views:
                n += 1
            best = n if best is None else min(best, n)
        complete[split] = best                 # None: the split has no mentions
    return complete, counts


def _requested_mentions(ds, splits, limit: int | None) -> pa.Table:
    tables = []
    for split in dict.fromkeys(splits):
        if split not in SPLITS:
            raise UsageError(f"synthesize split {split!r}: expected some of {', '.join(SPLITS)}")
        tables.append(ds.mentions(split, columns=["mention_id", "mention", "sentence"]))
    table = pa.concat_tables(tables) if tables else pa.table({"mention_id": [], "mention": [], "sentence": []})
    return table.slice(0, limit) if limit is not None else table


def _todo_table(mentions: pa.Table, views: int, seed: int, done: set[tuple[str, int]]) -> pa.Table:
    rows = [{"mention_id": mid, "view": v, "seed": view_seed(seed, mid, v), "mention": m, "sentence": s}
            for mid, m, s in zip(mentions.column("mention_id").to_pylist(), mentions.column("mention").to_pylist(),
                                 mentions.column("sentence").to_pylist())
            for v in range(views) if (mid, v) not in done]
    schema = pa.schema([("mention_id", pa.string()), ("view", pa.int32()), ("seed", pa.int64()),
                        ("mention", pa.string()), ("sentence", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def _blocks(table: pa.Table, batch_size: int, max_blocks: int = 2000) -> list[pa.Table]:
    """Whole batches per block (so no batch straddles two blocks), enough blocks to spread over the actors."""
    n_batches = math.ceil(table.num_rows / batch_size)
    per_block = batch_size * math.ceil(n_batches / max(1, min(n_batches, max_blocks)))
    return [table.slice(i, per_block) for i in range(0, table.num_rows, per_block)]


def _run_ray(todo: pa.Table, generator_kwargs: dict, *, batch_size: int, concurrency: int, num_gpus: float,
             cpu_threads: int) -> pa.Table:
    import ray

    init_ray()
    device = generator_kwargs["device"]
    check_gpus("synthesize", num_gpus if device == "cuda" else 0, "synthesize.num_gpus")
    ds = ray.data.from_arrow(_blocks(todo, batch_size))
    resources = {"num_gpus": num_gpus, "num_cpus": 1} if device == "cuda" else {"num_cpus": cpu_threads}
    out = ds.map_batches(ViewGenerator, fn_constructor_kwargs=generator_kwargs, batch_size=batch_size,
                         batch_format="pyarrow",
                         # one queued batch per actor: a batch takes seconds, and deeper queues leave one actor
                         # idle at the end while another still holds several batches
                         compute=ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1),
                         **resources)
    got, t0, last_log = [], time.perf_counter(), 0.0
    done = 0
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        got.append(batch)
        done += batch.num_rows
        now = time.perf_counter()
        if now - last_log > 30 or done == todo.num_rows:
            last_log = now
            log.info("synthesize: %d/%d images (%.0f%%), %.2f images/s", done, todo.num_rows,
                     100.0 * done / max(1, todo.num_rows), done / max(1e-9, now - t0))
    return pa.concat_tables([t.cast(MANIFEST_SCHEMA) for t in got]) if got else MANIFEST_SCHEMA.empty_table()


def synthesize(dataset_uri: str, model: str, views: int = _DEFAULTS.views, *, splits=SPLITS,
               template: str = DEFAULT_TEMPLATE, steps: int = _DEFAULTS.steps, guidance: float = _DEFAULTS.guidance,
               size: int = _DEFAULTS.size, scheduler: str = _DEFAULTS.scheduler, seed: int = _DEFAULTS.seed,
               batch_size: int = _DEFAULTS.batch_size, concurrency: int = _DEFAULTS.concurrency,
               num_gpus: float = _DEFAULTS.num_gpus, dtype: str | None = None, safety_checker: bool = False,
               limit: int | None = None, revision: str | None = None,
               cache_dir: str = DEFAULT_CACHE) -> dict[str, Any]:
    """Draw `views` images for every mention of `splits` (the first `limit` only, if given) that does not have
    them yet; write PNGs, manifest.parquet and complete.json under DATASET/synthetic/<key>/. Returns a summary
    (key, uri, counts: pairs requested, skipped = already there, generated)."""
    t0 = time.perf_counter()
    if views < 1 or batch_size < 1 or concurrency < 1:
        raise UsageError("synthesize: views, batch_size and concurrency must be at least 1")
    if limit is not None and limit < 0:
        raise UsageError(f"synthesize: limit {limit} must not be negative")
    ds = load_dataset(dataset_uri)
    if isinstance(splits, str):
        splits = (splits,)
    cpu_threads = cpu_threads_per_worker()
    if isinstance(num_gpus, str):      # "auto": decided once, here; the strict check of a number is in _run_ray
        num_gpus = resolve_num_gpus("synthesize", num_gpus, "synthesize.num_gpus")
    if not procedural.is_procedural(model):
        model = pin_model(model, revision)     # workers load the very commit the key names
    settings = synthesis_settings(model, template=template, steps=steps, guidance=guidance, size=size,
                                  scheduler=scheduler, seed=seed, num_gpus=num_gpus, dtype=dtype,
                                  safety_checker=safety_checker, revision=revision, cpu_threads=cpu_threads,
                                  cache_dir=cache_dir)
    key = synthesis_key(settings)
    out = synthetic_uri(dataset_uri, key)
    if not storage.exists(storage.join(out, SETTINGS)):
        from importlib.metadata import version  # not `import diffusers`: the driver needs no torch

        storage.write_json(storage.join(out, SETTINGS), {
            "key": key, "settings": settings, "model": str(model),
            "created_with": {"mel_ray": __version__, "diffusers": version("diffusers"), "torch": version("torch")},
            "created_at": datetime.now(UTC).isoformat(timespec="seconds")})

    mentions = _requested_mentions(ds, splits, limit)
    records, n_parts = _read_records(out)
    existing = _existing_images(dataset_uri, key)
    done = {(m, v) for m, v, u in zip(records.column("mention_id").to_pylist(), records.column("view").to_pylist(),
                                      records.column("uri").to_pylist()) if u in existing}
    todo = _todo_table(mentions, views, seed, done)
    pairs = mentions.num_rows * views
    log.info("synthesize %s -> %s: %d mentions x %d views = %d images; %d already there (skipped), %d to do",
             dataset_uri, key, mentions.num_rows, views, pairs, pairs - todo.num_rows, todo.num_rows)

    new = MANIFEST_SCHEMA.empty_table()
    if todo.num_rows:
        device, dtype_ = resolve_device_dtype(num_gpus, dtype)
        kwargs = {"dataset_uri": dataset_uri, "key": key, "model": str(model), "template": template,
                  "steps": int(steps), "guidance": float(guidance), "size": int(size), "scheduler": scheduler,
                  "device": device, "dtype": dtype_, "safety_checker": bool(safety_checker),
                  "cache_dir": cache_dir, "cpu_threads": cpu_threads}
        new = _run_ray(todo, kwargs, batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus,
                       cpu_threads=cpu_threads)
        existing |= set(new.column("uri").to_pylist())

    complete_uri = storage.join(out, COMPLETE)
    if new.num_rows or n_parts or not storage.exists(complete_uri):
        manifest = _dedupe_sorted(pa.concat_tables([records, new]), existing)
        storage.write_table(storage.join(out, MANIFEST), manifest)
        storage.delete(storage.join(out, PARTS))         # their records are in the manifest now
        complete_views, counts = _complete_views(ds, manifest)
        storage.write_json(complete_uri, {
            "key": key, "images": manifest.num_rows, "mentions": counts, "complete_views": complete_views,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds")})
    marker = storage.read_json(complete_uri)
    seconds = time.perf_counter() - t0
    summary = {"key": key, "uri": out, "manifest": storage.join(out, MANIFEST), "settings": settings,
               "num_gpus": float(num_gpus),
               "mentions": mentions.num_rows, "views": views, "pairs": pairs, "skipped": pairs - todo.num_rows,
               "todo": todo.num_rows, "generated": new.num_rows, "images": marker["images"],
               "complete_views": marker["complete_views"], "seconds": round(seconds, 2),
               "images_per_second": round(new.num_rows / seconds, 3) if new.num_rows else None}
    log.info("synthesize %s: generated %d, skipped %d, manifest %d images, %.1fs", key, new.num_rows,
             summary["skipped"], marker["images"], seconds)
    return summary


# ------------------------------------------------------------------------------------------------ readers


@dataclasses.dataclass
class SyntheticViews:
    uri: str                  # DATASET/synthetic/<key>
    key: str
    settings: dict[str, Any]  # settings.json
    complete: dict[str, Any]  # complete.json
    manifest: pa.Table        # manifest.parquet

    def views_of(self, mention_id: str) -> list[dict]:
        mask = pc.equal(self.manifest.column("mention_id"), mention_id)
        return self.manifest.filter(mask).to_pylist()


def list_keys(dataset_uri: str) -> list[str]:
    """Keys under DATASET/synthetic/ that have a complete.json, newest first."""
    fs, path = storage.resolve(storage.join(dataset_uri, SYNTHETIC_DIR))
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    found = []
    for info in infos:
        if info.type != pafs.FileType.Directory:
            continue
        key = info.path.rstrip("/").rsplit("/", 1)[-1]
        marker = storage.join(synthetic_uri(dataset_uri, key), COMPLETE)
        if storage.exists(marker):
            found.append((storage.read_json(marker).get("finished_at", ""), key))
    return [k for _, k in sorted(found, reverse=True)]


def load_synthetic(dataset_uri: str, key: str | None = None) -> SyntheticViews:
    """The synthetic views of `key`, or of the most recently completed key when None."""
    if key is None:
        keys = list_keys(dataset_uri)
        if not keys:
            raise UsageError(f"{dataset_uri}: no completed synthetic views (run `mel-ray synthesize` first)")
        key = keys[0]
    out = synthetic_uri(dataset_uri, key)
    if not storage.exists(storage.join(out, COMPLETE)):
        raise UsageError(f"{out}: no completed synthetic views with this key")
    return SyntheticViews(uri=out, key=key, settings=storage.read_json(storage.join(out, SETTINGS)),
                          complete=storage.read_json(storage.join(out, COMPLETE)),
                          manifest=storage.read_table(storage.join(out, MANIFEST)))


def _font(size: int):
    """DejaVu Sans (shipped with matplotlib: covers accented and most non-Latin letters), else Pillow's own."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:           # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def show_views(dataset_uri: str, key: str | None, mention_ids: list[str], output_png: str,
               tile: int = 160) -> str:
    """Grid for a person to look at (paper Table 5): one row per mention -- its own image (or a grey "no image"
    tile) and its synthetic views -- captioned with the mention and the prompt. Writes `output_png` (local or
    s3://) and returns it."""
    from PIL import Image, ImageDraw

    views = load_synthetic(dataset_uri, key)
    ds = load_dataset(dataset_uri)
    wanted = list(dict.fromkeys(mention_ids))
    if not wanted:
        raise UsageError("show_views: no mention ids given")
    info: dict[str, dict] = {}
    for split in SPLITS:
        table = ds.mentions(split, columns=["mention_id", "mention", "sentence", "image_uri"])
        table = table.filter(pc.is_in(table.column("mention_id"), pa.array(wanted, pa.string())))
        info.update({r["mention_id"]: r for r in table.to_pylist()})
    missing = [m for m in wanted if m not in info]
    if missing:
        raise UsageError(f"show_views: mention id(s) not in {dataset_uri}: {', '.join(missing[:5])}")
    rows = {m: views.views_of(m) for m in wanted}
    n_views = max([len(r) for r in rows.values()] + [1])
    font, small = _font(16), _font(12)
    caption_h, label_h, pad = 44, 18, 8
    width = pad + (n_views + 1) * (tile + pad)
    height = pad + len(wanted) * (caption_h + label_h + tile + pad)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)

    def load(uri: str | None):
        if uri is None:
            return None
        try:
            return Image.open(io.BytesIO(storage.read_bytes(ds.resolve_uri(uri)))).convert("RGB")
        except (OSError, ValueError):
            return None

    y = pad
    for mid in wanted:
        row, recs = info[mid], rows[mid]
        draw.text((pad, y), f"{row['mention']}  [{mid}]", fill="black", font=font)
        prompt = recs[0]["prompt"] if recs else "(no synthetic views)"
        draw.text((pad, y + 22), prompt if len(prompt) <= 140 else prompt[:137] + "...", fill="#444", font=small)
        y += caption_h
        cells = [("mention image", load(row["image_uri"]))]
        cells += [(f"view {r['view']}", load(r["uri"])) for r in recs]
        for i, (label, img) in enumerate(cells):
            x = pad + i * (tile + pad)
            draw.text((x, y), label, fill="black", font=small)
            if img is None:
                draw.rectangle([x, y + label_h, x + tile - 1, y + label_h + tile - 1], fill="#ccc")
                draw.text((x + 8, y + label_h + tile // 2 - 6), "no image", fill="#555", font=small)
            else:
                if max(img.size) > tile:
                    img.thumbnail((tile, tile), Image.Resampling.LANCZOS)
                elif max(img.size) < tile:        # tiny views: scale up without blurring
                    scale = tile / max(img.size)
                    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                     Image.Resampling.NEAREST)
                grid.paste(img, (x, y + label_h))
        y += label_h + tile + pad
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    storage.write_bytes(str(output_png), buf.getvalue())
    return str(output_png)
