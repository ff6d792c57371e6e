"""Benchmark of extract-features: the Ray Data stage (CPU decode tasks -> CLIP actor pool) against a plain
single-process loop over the same work, and 2 actors against 1.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_features.py                  # ~6-9 min on 2 cores
    .venv/bin/python benchmarks/bench_features.py --entities 60 --mentions 40 --repeats 1   # smoke run

The CLIP is built from a config with random weights, big enough that compute dominates decoding (vision:
hidden 256, 6 layers, 112x112 images, patch 16 -> 49 patches + CLS; text: hidden 256, 6 layers, 40 tokens).
The data are the generated demo release (64x64 PNG/JPEG images, upscaled to 112) with 3 synthetic views per
mention. Every mode runs the real `extract_features` end to end (plan, decode, encode, Parquet shards,
manifest) into a fresh folder, with one torch thread per encoder (the default): `local` = engine="local"
(one process, one unit after another), `ray-1` / `ray-2` = one / two encoder actors. Model loading, Ray Data
start-up and actor start-up are inside the timed region. Modes are interleaved within each repeat so that
background load drifts hit all of them alike; the table shows medians. The outputs of all modes must be
byte-identical (checked). The markdown table is printed and written to benchmarks/results/features.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import secrets
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# Ray reads these when it is imported: set before anything imports it
os.environ.setdefault("RAY_AUTH_MODE", "token")
if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pyarrow as pa
from PIL import Image

from mel_ray import storage
from mel_ray.config import FeaturesConfig, IngestConfig
from mel_ray.dataset import SPLITS, load_dataset
from mel_ray.demo_data import make_demo_data
from mel_ray.features import extract_features, stage
from mel_ray.ingest import ingest
from mel_ray.keys import sha256_hex, stable_seed


def build_clip(folder: Path, hidden: int, layers: int, image: int, patch: int) -> str:
    """A CLIP of the given size with random (seeded) weights, saved like a hub checkpoint."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from mel_ray.tiny_models import MAX_POSITIONS, build_tokenizer, write_tokenizer_files

    if (folder / "model.safetensors").exists():
        return str(folder)
    tokenizer, merges = build_tokenizer()
    common = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": max(1, hidden // 64), "projection_dim": hidden}
    text = {**common, "vocab_size": len(tokenizer), "max_position_embeddings": MAX_POSITIONS,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text, vision_config={**common, "image_size": image, "patch_size": patch},
                        projection_dim=hidden)
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(str(folder))
    images = CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(folder))
    images.save_pretrained(str(folder))
    write_tokenizer_files(folder, merges)
    return str(folder)


def build_data(work: Path, entities: int, mentions: int, views: int) -> str:
    ds_uri = str(work / "ds")
    if storage.exists(storage.join(ds_uri, "manifest.json")) and storage.exists(
            storage.join(ds_uri, "synthetic", "bench", "complete.json")):
        return ds_uri
    make_demo_data(str(work / "raw"), n_entities=entities, n_mentions=mentions, seed=0)
    ingest("mimic", str(work / "raw"), ds_uri, name="bench", options=IngestConfig())
    ds = load_dataset(ds_uri)
    rows = []
    for split in SPLITS:
        for mid in ds.mentions(split, columns=["mention_id"]).column("mention_id").to_pylist():
            for view in range(views):
                rng = np.random.default_rng(stable_seed(mid, view))
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
                rel = f"synthetic/bench/images/{mid[-2:]}/{mid}_{view}.png"
                storage.write_bytes(ds.path(rel), buf.getvalue())
                rows.append({"mention_id": mid, "view": view, "seed": stable_seed(mid, view), "prompt": "",
                             "uri": rel, "sha256": sha256_hex(buf.getvalue())})
    schema = pa.schema([("mention_id", pa.string()), ("view", pa.int32()), ("seed", pa.int64()),
                        ("prompt", pa.string()), ("uri", pa.string()), ("sha256", pa.string())])
    storage.write_table(ds.path("synthetic", "bench", "manifest.parquet"), pa.Table.from_pylist(rows, schema=schema))
    storage.write_json(ds.path("synthetic", "bench", "complete.json"), {"key": "bench", "images": len(rows)})
    return ds_uri


def batch_invariance(clip: str, n: int = 29) -> list[str]:
    """Does a row's CLIP output depend on the batch it is computed in? Same n rows encoded in batches of
    1, 2, 7 and n, with 1 and 2 torch threads; counts float16 values that differ from the batch-of-1 run."""
    import torch

    from mel_ray.models import load_clip

    model, _ = load_clip(clip)
    g = torch.Generator().manual_seed(0)
    vocab, size = model.config.text_config.vocab_size, model.config.vision_config.image_size
    ids = torch.randint(0, vocab - 2, (n, 40), generator=g)
    ids[:, -8:] = model.config.text_config.eos_token_id
    mask = torch.ones(n, 40, dtype=torch.long)
    mask[:, 33:] = 0
    px = torch.randn(n, 3, size, size, generator=g)
    names = ("text_global", "text_local", "image_global", "image_local")

    def run(bs):
        outs = []
        with torch.inference_mode():
            for i in range(0, n, bs):
                t = model.get_text_features(input_ids=ids[i:i + bs], attention_mask=mask[i:i + bs])
                v = model.get_image_features(pixel_values=px[i:i + bs])
                outs.append([t.pooler_output, t.last_hidden_state, v.pooler_output, v.last_hidden_state])
        return [torch.cat(x).half() for x in zip(*outs, strict=True)]

    lines = ["| torch threads | batch size | " + " | ".join(f"{k} fp16 values != batch 1" for k in names) + " |",
             "| --- | --- |" + " --- |" * len(names)]
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ref = run(1)
            for bs in (2, 7, n):
                diff = [int((a != b).sum()) for a, b in zip(ref, run(bs), strict=True)]
                cells = " | ".join(f"{d} of {a.numel()}" for d, a in zip(diff, ref, strict=True))
                lines.append(f"| {threads} | {bs} | {cells} |")
    finally:
        torch.set_num_threads(saved)
    return lines


class FirstResult:
    """Records when the driver receives its first encoded unit (both engines go through stage.Collector.add), so
    start-up (model load, Ray Data and actor start) can be told apart from steady-state throughput."""

    def __init__(self):
        self.at = None
        self.images = 0
        original = stage.Collector.add
        probe = self

        def add(collector, out):
            if probe.at is None:
                probe.at = time.perf_counter()
                probe.images = len(out["image_global"]) // (2 * collector.plan.shapes["image_global"][0])
            return original(collector, out)
        stage.Collector.add = add

    def reset(self):
        self.at, self.images = None, 0


def images_encoded(manifest: dict) -> int:
    """Every row's image (blank ones are encoded too) plus every synthetic view used."""
    return sum(c["rows"] + c.get("synthetic", {}).get("used", 0) for c in manifest["counters"].values())


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, default=400)
    ap.add_argument("--mentions", type=int, default=320)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--image", type=int, default=112)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    ap.add_argument("--out", default=str(HERE / "results" / "features.md"))
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-features-"))
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now()
    load_start = os.getloadavg()
    try:
        t0 = time.perf_counter()
        clip = build_clip(work / "clip", args.hidden, args.layers, args.image, args.patch)
        ds_uri = build_data(work, args.entities, args.mentions, args.views)
        print(f"setup {time.perf_counter() - t0:.1f}s: model {clip}, dataset {ds_uri}", flush=True)
        invariance = batch_invariance(clip)
        print("\n".join(invariance), flush=True)

        import ray
        from ray.data import DataContext

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(work / "ray"))
        DataContext.get_current().enable_progress_bars = False

        modes = {"local": ({"engine": "local"}, 1), "ray-1": ({}, 1), "ray-2": ({}, 2)}
        times: dict[str, list[float]] = {m: [] for m in modes}
        startup: dict[str, list[float]] = {m: [] for m in modes}
        steady: dict[str, list[float]] = {m: [] for m in modes}
        first = FirstResult()
        images = texts = None
        reference: dict[str, bytes] | None = None
        identical = True
        for rep in range(args.repeats):
            for mode, (kwargs, concurrency) in modes.items():
                root = work / f"out-{mode}-{rep}"
                shutil.rmtree(root, ignore_errors=True)
                first.reset()
                t = time.perf_counter()
                section = FeaturesConfig(batch_size=args.batch_size, concurrency=concurrency, num_gpus=0)
                manifest = extract_features(ds_uri, clip, section, synthetic_key="bench",
                                            micro_batch=args.micro_batch, shard_rows=256, features_root=str(root),
                                            quiet=True, **kwargs)
                end = time.perf_counter()
                times[mode].append(end - t)
                images = images_encoded(manifest)
                startup[mode].append(first.at - t)
                steady[mode].append((images - first.images) / (end - first.at))
                texts = sum(c["rows"] for c in manifest["counters"].values())
                files = {rel: storage.read_bytes(storage.join(manifest["uri"], rel))
                         for rel in storage.list_files(manifest["uri"])}
                if reference is None:
                    reference = files
                identical &= files == reference
                print(f"repeat {rep} {mode}: {times[mode][-1]:.1f}s, {images / times[mode][-1]:.1f} images/s, "
                      f"start-up {startup[mode][-1]:.1f}s, then {steady[mode][-1]:.1f} images/s, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
                shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    med = {m: statistics.median(v) for m, v in times.items()}
    rate = {m: images / med[m] for m in med}
    up = {m: statistics.median(v) for m, v in startup.items()}
    st = {m: statistics.median(v) for m, v in steady.items()}
    titles = {"local": "plain loop (engine=local, 1 process)", "ray-1": "Ray Data, 1 encoder actor",
              "ray-2": "Ray Data, 2 encoder actors"}
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_features.py", *sys.argv[1:]])
    lines = [
        "# extract-features benchmark",
        "",
        f"- date: {started:%Y-%m-%d %H:%M}",
        f"- machine: {machine()}; Ray local instance with {args.num_cpus} CPUs",
        (f"- load average (1 min) at start / end: {load_start[0]:.1f} / {os.getloadavg()[0]:.1f} "
        "(other processes on the machine compete for the same cores)"),
        f"- command: `{cmd}`",
        (f"- model: random CLIP, hidden {args.hidden}, {args.layers} layers (text and vision), image {args.image}, "
        f"patch {args.patch} ({(args.image // args.patch) ** 2} patches + CLS), 40 text tokens; float32, "
        "1 torch thread per encoder"),
        (f"- work: {args.entities} entities + {args.mentions} mentions (demo data) + {args.views} synthetic views per "
        f"mention = {images} images and {texts} texts (rows after ingest); "
        f"micro_batch {args.micro_batch}, batch_size {args.batch_size}, shard_rows 256"),
        (f"- timed: the whole `extract_features` call (plan, model load, Ray Data and actor start-up, decode, "
        f"encode, Parquet writes, manifest); median of {args.repeats} repeats, modes interleaved"),
        f"- outputs of all modes and repeats byte-identical: {'yes' if identical else 'NO'}",
        "",
        "End to end (the whole call):",
        "",
        "| mode | runs (s) | median (s) | images/s | vs plain loop | vs 1 actor |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, title in titles.items():
        runs = ", ".join(f"{t:.1f}" for t in times[mode])
        vs1 = f"{rate[mode] / rate['ray-1']:.2f}x" if mode == "ray-2" else ""
        lines.append(f"| {title} | {runs} | {med[mode]:.1f} | {rate[mode]:.1f} | "
                     f"{rate[mode] / rate['local']:.2f}x | {vs1} |")
    lines += [
        "",
        ("Start-up (until the driver holds the first encoded unit: plan, model load, Ray Data and actor start, "
        "first decode) and steady state (images/s from then to the end, Parquet writes and manifest included):"),
        "",
        ("| mode | start-up (s), median | steady images/s, median | vs plain loop (target ray-1 >= 0.8x) "
        "| vs 1 actor (target >= 1.6x) |"),
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, title in titles.items():
        vs1 = f"{st[mode] / st['ray-1']:.2f}x" if mode == "ray-2" else ""
        lines.append(f"| {title} | {up[mode]:.1f} | {st[mode]:.1f} | {st[mode] / st['local']:.2f}x | {vs1} |")
    lines += [
        "",
        "## Why the encoder runs fixed micro-batches",
        "",
        ("The same 29 random rows through the benchmark CLIP (float32, CPU) in batches of different sizes; "
        "float16 values that differ from computing each row alone:"),
        "",
        *invariance,
        "",
        ("A row's features depend on the batch it is computed in (GEMV vs GEMM paths and blocking in the "
        "projections; with 2 threads also in the encoders), and some differences survive float16 rounding. "
        "extract-features therefore runs one forward pass per micro-batch defined by row index (`micro_batch`, "
        "part of the output key) and one torch thread per CPU actor, so `batch_size` and `concurrency` do not "
        "change a single byte (checked above and in tests/test_features.py)."),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"written to {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
