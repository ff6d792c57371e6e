"""Synthetic views for CVaCPT (paper §4.3): Stable Diffusion draws `views` (n_s) images per mention.

Prompt: a template over the mention and its sentence, by default "An image of {mention}: {sentence}" -- the
paper's "An image of" + sentence, with the mention named so that two mentions of one sentence get different
prompts (and images). Prompts longer than the text encoder's limit are cut at the last whole word that fits,
and the manifest stores exactly the text the pipeline received.

Views come from a view source chosen by the model string's prefix (VIEW_SOURCES; see ViewSource): Stable
Diffusion through diffusers by default. The `procedural:` prefix names a TEST TOOL, not a model
(mel_ray/procedural.py, which plugs itself in from its side): it draws what a demo-data prompt's attribute
clues describe with the demo generator's drawing code, so experiments on generated data have views that carry
information (the tiny Stable Diffusion's weights are random). It has no text encoder, so prompts are never
cut; its settings key holds its name and version instead of a weights fingerprint.

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
import importlib
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
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mel_ray import __version__, storage
from mel_ray.config import SynthesizeConfig
from mel_ray.dataset import SPLITS, load_dataset
from mel_ray.errors import UsageError
from mel_ray.keys import settings_key, sha256_hex, stable_seed
from mel_ray.models import (
    DEFAULT_CACHE,
    is_hub_id,
    model_fingerprint,
    pin_model,
    pretrained_args,
    resolve_model,
)
from mel_ray.runtime import check_gpus, cpu_threads_per_worker, init_ray, resolve_num_gpus
from mel_ray.verify import require_dataset, require_synthetic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1          # bump when the generation procedure changes the pixels for the same settings
SYNTHETIC_DIR = "synthetic"
MANIFEST = "manifest.parquet"
SETTINGS = "settings.json"
COMPLETE = "complete.json"
PARTS = "parts"
IMAGES = "images"

DEFAULT_TEMPLATE = SynthesizeConfig().template

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


def resolve_device_dtype(num_gpus: float | str, dtype: str | None) -> tuple[str, str]:
    if isinstance(num_gpus, str):     # "auto": the key names the device it resolves to, never "auto"
        num_gpus = resolve_num_gpus("synthesize", num_gpus, "synthesize.num_gpus")
    device = "cuda" if num_gpus and num_gpus > 0 else "cpu"
    dtype = dtype or ("float16" if device == "cuda" else "float32")
    if dtype not in DTYPES:
        raise UsageError(f"synthesize dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return device, dtype


def synthesis_settings(model: str, cfg: SynthesizeConfig, cache_dir: str = DEFAULT_CACHE, *,
                       cpu_threads: int | None = None) -> dict[str, Any]:
    """Every setting that changes the pixels; settings_key() of this dict names the output folder. `cfg` is
    the synthesize config section (views, batch_size and concurrency are not settings: they change no pixel);
    cpu_threads: torch threads per CPU worker (default: what this machine's workers get)."""
    check_template(cfg.template)
    if cfg.scheduler not in SCHEDULERS:
        raise UsageError(f"synthesize scheduler {cfg.scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
    if cfg.size % 8:
        raise UsageError(f"synthesize size {cfg.size}: must be a multiple of 8")
    if cfg.steps < 1:
        raise UsageError(f"synthesize steps {cfg.steps}: must be at least 1")
    device, dtype = resolve_device_dtype(cfg.num_gpus, cfg.dtype)
    settings = {"format": FORMAT_VERSION, "model": view_source(model).identity(model, cfg, cache_dir),
                "template": cfg.template, "steps": int(cfg.steps), "guidance": float(cfg.guidance),
                "size": int(cfg.size), "scheduler": cfg.scheduler, "seed": int(cfg.seed), "dtype": dtype,
                "device": device, "safety_checker": bool(cfg.safety_checker)}
    if device == "cpu":       # CPU kernels split work by thread count, which changes the last bits
        settings["cpu_threads"] = int(cpu_threads or cpu_threads_per_worker())
    return settings


def views_unused(cvacpt_weight: float, views: int | None) -> str | None:
    """Why a model with these settings (model.cvacpt_weight, model.views) reads no synthetic view, so none need
    be drawn; None when it reads them."""
    if cvacpt_weight == 0:
        return "model.cvacpt_weight is 0 (CVaCPT is the identity)"
    if views == 0:
        return "model.views is 0 (CVaCPT reads no view)"
    return None


def synthesis_key(settings: dict[str, Any]) -> str:
    return settings_key(settings)


def synthetic_uri(dataset_uri: str, key: str) -> str:
    return storage.join(dataset_uri, SYNTHETIC_DIR, key)


@dataclasses.dataclass(frozen=True)
class Synthesis:
    """What one config draws: the model as the workers load it (a hub id pinned to its commit), the settings
    and their key. The synthesize stage, `pipeline.synthetic_key` and `link` all start from `plan_synthesis`,
    so the key and the pixels always come from the same pinned model and settings."""

    model: str
    settings: dict[str, Any]
    key: str
    cache_dir: str = DEFAULT_CACHE

    def generator_kwargs(self, dataset_uri: str, write_parts: bool = True) -> dict[str, Any]:
        """ViewGenerator's constructor arguments (Ray Data's fn_constructor_kwargs)."""
        return {"dataset_uri": dataset_uri, "key": self.key, "model": self.model, "settings": self.settings,
                "cache_dir": self.cache_dir, "write_parts": write_parts}


def plan_synthesis(model: str, cfg: SynthesizeConfig, cache_dir: str = DEFAULT_CACHE, *,
                   cpu_threads: int | None = None) -> Synthesis:
    """Pin the model (its view source's rule), then settle its settings and key; runs nothing."""
    model = view_source(str(model)).pin(str(model))
    settings = synthesis_settings(model, cfg, cache_dir, cpu_threads=cpu_threads)
    return Synthesis(model=model, settings=settings, key=synthesis_key(settings), cache_dir=cache_dir)


# -------------------------------------------------------------------------------------------- view sources


class Drawer(Protocol):
    """A loaded view source: `fit` gives the prompt exactly as the model reads it; `draw` one image."""

    def fit(self, prompt: str) -> str: ...

    def draw(self, prompt: str, seed: int) -> tuple[Any, bool | None]:
        """(float [0, 1] (H, W, 3) image, NSFW flag or None when there is no safety checker)."""
        ...


class ViewSource(Protocol):
    """Where views come from for a model string: `pin` names exactly what the workers load, `identity` stands
    in the settings key for the weights, `load` builds the Drawer in each worker."""

    def pin(self, model: str) -> str: ...

    def identity(self, model: str, cfg: SynthesizeConfig, cache_dir: str) -> dict[str, Any]: ...

    def load(self, model: str, settings: dict[str, Any], cache_dir: str) -> Drawer: ...


# model-string prefix -> a ViewSource, or "module:attribute" naming one (a class or an instance), imported on
# first use in whichever process asks (driver or Ray worker), so a plug-in needs no import here and no
# registration call before the workers start. The dependency points from the plug-in to this module.
VIEW_SOURCES: dict[str, ViewSource | str] = {
    "procedural:": "mel_ray.procedural:ProceduralSource",     # a TEST TOOL for the demo data, not a model
}


def register_view_source(prefix: str, source: ViewSource | str) -> None:
    VIEW_SOURCES[prefix] = source


def view_source(model: str) -> ViewSource:
    """The source registered for the model string's prefix; Stable Diffusion (diffusers) otherwise."""
    for prefix, source in VIEW_SOURCES.items():
        if str(model).startswith(prefix):
            if isinstance(source, str):
                module, _, attr = source.partition(":")
                source = getattr(importlib.import_module(module), attr)
                source = source() if isinstance(source, type) else source
                VIEW_SOURCES[prefix] = source
            return source
    return DIFFUSERS


def model_identity(model: str, revision: str | None = None, cache_dir: str = DEFAULT_CACHE) -> dict[str, Any]:
    """What identifies a diffusion model's weights (mel_ray.models.model_fingerprint): a hub id with the commit
    its revision points at, or the content fingerprint of a local (or fetched s3://) pipeline folder."""
    model = str(model)
    if not is_hub_id(model):
        folder = Path(resolve_model(model, cache_dir))
        if not (folder / "model_index.json").is_file():
            raise UsageError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        return {"fingerprint": model_fingerprint(model, cache_dir)}
    model_id, _, commit = pin_model(model, revision).partition("@")
    return {"hub_id": model_id, "revision": commit}


class DiffusersSource:
    """Stable Diffusion through diffusers: the default view source."""

    def pin(self, model: str) -> str:
        return pin_model(model)

    def identity(self, model: str, cfg: SynthesizeConfig, cache_dir: str) -> dict[str, Any]:
        if cfg.safety_checker and not is_hub_id(model):
            index = json.loads((Path(resolve_model(model, cache_dir)) / "model_index.json").read_text("utf-8"))
            if not any(index.get("safety_checker") or [None]):
                raise UsageError(f"{model}: safety_checker=True but the model has no safety checker")
        return model_identity(model, cache_dir=cache_dir)

    def load(self, model: str, settings: dict[str, Any], cache_dir: str) -> Drawer:
        pipe = load_pipeline(model, device=settings["device"], dtype=settings["dtype"],
                             scheduler=settings["scheduler"], safety_checker=settings["safety_checker"],
                             cache_dir=cache_dir)
        return DiffusersDrawer(pipe, settings)


DIFFUSERS = DiffusersSource()


class DiffusersDrawer:
    def __init__(self, pipe, settings: dict[str, Any]):
        self.pipe, self.settings = pipe, settings
        self.limit = prompt_limit(pipe.tokenizer, pipe.text_encoder)

    def fit(self, prompt: str) -> str:
        return fit_prompt(prompt, self.pipe.tokenizer, self.limit)

    def draw(self, prompt: str, seed: int) -> tuple[Any, bool | None]:
        import torch

        s = self.settings
        out = self.pipe(prompt=prompt, num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                        height=s["size"], width=s["size"], output_type="np",
                        generator=torch.Generator("cpu").manual_seed(int(seed)))
        nsfw = out.nsfw_content_detected
        return out.images[0], (bool(nsfw[0]) if nsfw is not None else None)


# ----------------------------------------------------------------------------------------------- generator


def load_pipeline(model: str, *, device: str = "cpu", dtype: str = "float32", scheduler: str = "dpmsolver++",
                  safety_checker: bool = False, cache_dir: str = DEFAULT_CACHE):
    """THE Stable Diffusion loader (production, tests, benchmarks): StableDiffusionPipeline on `device` in
    `dtype`, with the named scheduler ("model": the one saved with it); the safety checker only when asked for
    (it blacks out flagged images); progress bars off. Attention is diffusers' default SDPA (AttnProcessor2_0).
    A hub id should come pinned (`id@<commit>`, see plan_synthesis)."""
    import importlib.util

    import torch
    from diffusers import StableDiffusionPipeline

    path, pinned = pretrained_args(model, cache_dir)
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
    """Holds one view source's drawer; called with a batch of (mention_id, view, seed, mention, sentence) rows it
    draws each image on its own, writes the PNGs, then the batch's records as one Parquet part; returns the
    records. It draws exactly what `settings` (the key's settings, see plan_synthesis) say.

    The same class is the Ray Data actor (map_batches) and the plain loop (benchmark, tests)."""

    def __init__(self, *, dataset_uri: str, key: str, model: str, settings: dict[str, Any],
                 cache_dir: str = DEFAULT_CACHE, write_parts: bool = True):
        import torch

        if settings["device"] == "cpu":
            torch.set_num_threads(int(settings["cpu_threads"]))
        elif not torch.cuda.is_available():
            raise RuntimeError("synthesize: num_gpus > 0 but this worker sees no CUDA device")
        self.dataset_uri, self.key, self.template = dataset_uri, key, settings["template"]
        self.write_parts = write_parts
        self.drawer = view_source(model).load(model, settings, cache_dir)

    def prompt(self, mention: str, sentence: str) -> str:
        return self.drawer.fit(render_prompt(self.template, mention, sentence))

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = []
        for row in batch.to_pylist():
            prompt = self.prompt(row["mention"], row["sentence"])
            image, nsfw = self.drawer.draw(prompt, row["seed"])
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


def existing_images(dataset_uri: str, key: str) -> set[str]:
    """Dataset-relative URIs of the PNGs under DATASET/synthetic/<key>/images/."""
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


def todo_table(mentions: pa.Table, views: int, seed: int, done: set[tuple[str, int]]) -> pa.Table:
    """The (mention, view) pairs still to draw, as ViewGenerator's input rows; `mentions` has mention_id,
    mention and sentence."""
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


def draw_views(todo: pa.Table, plan: Synthesis, dataset_uri: str, *, batch_size: int, concurrency: int,
               num_gpus: float, write_parts: bool = True, gpu_setting: str = "synthesize.num_gpus") -> pa.Table:
    """Draw `todo` (todo_table's rows) with a Ray Data pool of ViewGenerator actors into
    DATASET/synthetic/<plan.key>/images/; returns their records. Used by the synthesize stage and by link."""
    import ray

    init_ray()
    on_gpu = plan.settings["device"] == "cuda"
    check_gpus("synthesize", num_gpus if on_gpu else 0, gpu_setting)
    ds = ray.data.from_arrow(_blocks(todo, batch_size))
    resources = {"num_gpus": num_gpus, "num_cpus": 1} if on_gpu else {"num_cpus": plan.settings["cpu_threads"]}
    out = ds.map_batches(ViewGenerator, fn_constructor_kwargs=plan.generator_kwargs(dataset_uri, write_parts),
                         batch_size=batch_size, batch_format="pyarrow",
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


def synthesize(dataset_uri: str, model: str, cfg: SynthesizeConfig, *, splits=SPLITS, limit: int | None = None,
               cache_dir: str = DEFAULT_CACHE) -> dict[str, Any]:
    """Draw cfg.views images for every mention of `splits` (the first `limit` only, if given) that does not have
    them yet; write PNGs, manifest.parquet and complete.json under DATASET/synthetic/<key>/. `cfg` is the
    synthesize config section. Returns a summary (key, uri, counts: pairs requested, skipped = already there,
    generated)."""
    t0 = time.perf_counter()
    views = cfg.views
    if views < 1 or cfg.batch_size < 1 or cfg.concurrency < 1:
        raise UsageError("synthesize: views, batch_size and concurrency must be at least 1")
    if limit is not None and limit < 0:
        raise UsageError(f"synthesize: limit {limit} must not be negative")
    require_dataset(dataset_uri)      # manifest, footers, schemas, counts (mel_ray.verify): one line, exit 2
    ds = load_dataset(dataset_uri)
    if isinstance(splits, str):
        splits = (splits,)
    if isinstance(cfg.num_gpus, str):    # "auto": decided once, here; the strict check of a number is in draw_views
        cfg = cfg.model_copy(update={"num_gpus": resolve_num_gpus("synthesize", cfg.num_gpus, "synthesize.num_gpus")})
    plan = plan_synthesis(model, cfg, cache_dir)     # workers load the very commit the key names
    key, settings = plan.key, plan.settings
    out = synthetic_uri(dataset_uri, key)
    if not storage.exists(storage.join(out, SETTINGS)):
        from importlib.metadata import version  # not `import diffusers`: the driver needs no torch

        storage.write_json(storage.join(out, SETTINGS), {
            "key": key, "settings": settings, "model": plan.model,
            "created_with": {"mel_ray": __version__, "diffusers": version("diffusers"), "torch": version("torch")},
            "created_at": datetime.now(UTC).isoformat(timespec="seconds")})

    mentions = _requested_mentions(ds, splits, limit)
    records, n_parts = _read_records(out)
    existing = existing_images(dataset_uri, key)
    done = {(m, v) for m, v, u in zip(records.column("mention_id").to_pylist(), records.column("view").to_pylist(),
                                      records.column("uri").to_pylist()) if u in existing}
    todo = todo_table(mentions, views, cfg.seed, done)
    pairs = mentions.num_rows * views
    log.info("synthesize %s -> %s: %d mentions x %d views = %d images; %d already there (skipped), %d to do",
             dataset_uri, key, mentions.num_rows, views, pairs, pairs - todo.num_rows, todo.num_rows)

    new = MANIFEST_SCHEMA.empty_table()
    if todo.num_rows:
        new = draw_views(todo, plan, dataset_uri, batch_size=cfg.batch_size, concurrency=cfg.concurrency,
                         num_gpus=cfg.num_gpus)
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
    marker = storage.read_json_object(complete_uri)
    seconds = time.perf_counter() - t0
    summary = {"key": key, "uri": out, "manifest": storage.join(out, MANIFEST), "settings": settings,
               "num_gpus": float(cfg.num_gpus),
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
            found.append((storage.read_json_object(marker).get("finished_at", ""), key))
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
    require_synthetic(dataset_uri, key)
    return SyntheticViews(uri=out, key=key, settings=storage.read_json_object(storage.join(out, SETTINGS)),
                          complete=storage.read_json_object(storage.join(out, COMPLETE)),
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

    require_dataset(dataset_uri)
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
