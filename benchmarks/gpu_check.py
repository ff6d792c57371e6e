"""GPU checks and timings for a lent device machine, as one short run without Ray.

The device machines (the `device` tool) have PyTorch, transformers and pyarrow but no Ray, MLflow or
diffusers, and reach nothing outside. So this script checks the GPU code paths the CPU test suite cannot,
calling the stage code directly:

1. evaluation kernel: `rank_counts` with the model on the GPU and its inputs on the CPU (what the dev
   evaluation inside a GPU training worker does) against the same kernel on the CPU: rank agreement on a
   small KB (a mention whose ranks differ must have a competitor within NEAR_TIE of its gold score), then
   pairs/s at the paper's sizes (40 text tokens, 50 patches, h 96, 110K entities);
2. training step: `train_step` with bf16 autocast and JD-CCL columns at the paper's shapes: median step time,
   finite loss parts;
3. finetune step (`model.encoder: finetune`): `train_step` of a ViT-B/32-sized CLIP (CLIPConfig's default sizes:
   vision 768 x 12 layers, patch 32, 224 px; text 512 x 12 layers; projection 512; random weights) + the matcher
   (h 96) at a global batch of 128 mentions, in_batch negatives (each mention's gold entity encoded too), bf16
   autocast: median step time, peak GPU memory, finite loss parts;
4. KB re-encoding: the same CLIP as `ClipEncoder` in eval mode on batches of 256 KB entities (40 text tokens +
   one 224 px image each): entities/s in bf16 (weights cast, as extract-features with dtype bfloat16) and in
   fp32 (what the in-training dev evaluation, mel_ray.train.finetune, runs), and vision-tower-only images/s;
5. Stable Diffusion (needs diffusers and pydantic carried as wheels; skipped, and said so, without them): a
   UNet, VAE and text encoder built from the SD 1.5 configs with random weights (timing only), saved in fp16,
   loaded through `mel_ray.synthesize.load_pipeline` (fp16, SDPA, DPM-Solver++), 512x512, 25 steps: images/s.

    python3 benchmarks/gpu_check.py --out "$OUT"                         # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --small --device cpu --out /tmp/gpu-smoke   # the script, here

Writes OUT/gpu.md (for docs/benchmarks.md) and OUT/gpu.json. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_eval import build, gold_gaps, ours
from bench_eval import random_rows as eval_rows

from mel_ray.train.global_batch import GlobalBatchStep
from mel_ray.train.loop import train_step

WIKIDM_TEST_PAIRS = 7_247 * 242_000
NEAR_TIE = 1e-3     # scores are O(10) (no temperature); fp32 reductions in another order differ by ~1e-5 to 1e-4


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_eval(device: str, args) -> dict:
    """Ranks from the GPU equal the CPU's (up to float near-ties), then throughput at the paper's KB size, and
    what it makes of WikiDM's test evaluation (docs/cluster.md). fp32 with TF32 off, as evaluate's GPU shards."""
    torch.set_float32_matmul_precision("highest")
    model, mentions, pool = build(0, args.check_entities, args.check_mentions, pool=min(args.check_entities, 4096))
    cpu_ranks = ours(model, mentions, pool, args.check_entities, 32, 512)
    model = model.to(device)
    dev_ranks = ours(model, mentions, pool, args.check_entities, args.mention_batch, args.entity_chunk)
    same = float((cpu_ranks == dev_ranks).mean())
    worst = int(np.abs(cpu_ranks - dev_ranks).max())
    # a rank that differs is a near-tie if some entity's score is within fp32 rounding of the gold's (on the CPU)
    differ = np.flatnonzero(cpu_ranks != dev_ranks)
    cpu_model, _, _ = build(0, args.check_entities, args.check_mentions, pool=min(args.check_entities, 4096))
    gaps = gold_gaps(cpu_model, mentions, pool, differ, 512, args.check_entities) if len(differ) else []
    max_gap = max(gaps, default=0.0)

    model, mentions, pool = build(0, args.entities, args.mentions, pool=min(args.entities, 8192))
    model = model.to(device)
    ours(model, {k: v[:8] for k, v in mentions.items()}, pool, min(args.entities, args.entity_chunk), 8,
         args.entity_chunk)                                             # warm-up: kernels, allocator
    sync(device)
    t0 = time.perf_counter()
    ours(model, mentions, pool, args.entities, args.mention_batch, args.entity_chunk)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"ranks_identical_fraction": same, "max_rank_difference": worst,
            "differing_mentions_max_gold_gap": max_gap,
            "check": f"{args.check_mentions} mentions x {args.check_entities} entities",
            "pairs": args.mentions * args.entities, "seconds": round(seconds, 2),
            "pairs_per_second": round(args.mentions * args.entities / seconds),
            # WikiDM test: 7,247 mentions x <= 242K entities (docs/cluster.md), on one GPU at this rate
            "wikidm_test_eval_seconds_one_gpu": round(WIKIDM_TEST_PAIRS * seconds / (args.mentions * args.entities)),
            "ok": worst <= 3 and max_gap <= NEAR_TIE}


def check_train(device: str, args) -> dict:
    """JD-CCL steps at the paper's shapes; bf16 autocast exactly as the Ray Train worker runs it."""
    from bench_eval import DIMS, EntityPool

    from mel_ray.model import MELModel

    torch.manual_seed(0)
    model = GlobalBatchStep(MELModel(DIMS).to(device))          # what the worker trains (train_step calls it)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_pool = 4096
    store = EntityPool(n_pool)
    rng = np.random.default_rng(0)
    pools = [rng.choice(n_pool, 16, replace=False) for _ in range(n_pool)]
    cfg = {"k": 4, "negatives": "jaccard", "sample_top": None, "grad_clip": 1.0}
    mentions = eval_rows(args.train_batch, 5, views=True)
    mentions["gold"] = torch.from_numpy(rng.choice(n_pool, args.train_batch, replace=False))
    times, parts = [], {}
    for step in range(args.train_steps + 3):
        sync(device)
        t0 = time.perf_counter()
        parts, _ = train_step(model, optimizer, dict(mentions), store, pools, cfg, rng, torch.device(device),
                              use_gpu=device == "cuda")
        sync(device)
        if step >= 3:                                                 # after warm-up
            times.append(time.perf_counter() - t0)
    finite = all(math.isfinite(v) for v in parts.values())
    return {"batch": args.train_batch, "k": 4, "steps_timed": len(times),
            "median_step_seconds": round(statistics.median(times), 4),
            "loss_parts": {k: round(v, 4) for k, v in parts.items()}, "ok": finite}


def clip_config(small: bool) -> dict:
    """A CLIP config as a plain dict (what a finetune checkpoint's dims carry): CLIPConfig's defaults are
    ViT-B/32's sizes; --small: a tiny one."""
    from transformers import CLIPConfig

    if small:
        config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                         "num_attention_heads": 2},
                            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                           "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                            projection_dim=32)
    else:
        config = CLIPConfig()
    return json.loads(config.to_json_string(use_diff=False))


def clip_rows(config: dict, n: int, generator: torch.Generator, length: int = 40) -> dict:
    """Encoder inputs of n random rows: token ids (EOS last among the unmasked ones), mask, pixels."""
    text, size = config["text_config"], config["vision_config"]["image_size"]
    ids = torch.randint(0, text["vocab_size"] - 2, (n, length), generator=generator)
    used = torch.randint(length // 4, length + 1, (n,), generator=generator)
    mask = (torch.arange(length)[None, :] < used[:, None]).long()
    ids[torch.arange(n), used - 1] = text["eos_token_id"]
    return {"input_ids": ids, "attention_mask": mask, "pixels": torch.randn(n, 3, size, size, generator=generator)}


class RowStore:
    """train_step's entity source: entity id -> its fixed random row (text + image)."""

    def __init__(self, config: dict, n: int):
        self.rows = clip_rows(config, n, torch.Generator().manual_seed(1))

    def gather(self, ids: np.ndarray) -> dict:
        index = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        return {k: v[index] for k, v in self.rows.items()}


def check_finetune(device: str, args) -> dict:
    """One finetune step (CLIP's towers train with the matcher) at a global batch of 128, bf16 autocast, as the
    Ray Train worker runs it on one GPU: median step time, peak memory."""
    from mel_ray.model import MELModel, ModelDims
    from mel_ray.model.encoder import encoder_sizes
    from mel_ray.train.loop import make_optimizer

    config = clip_config(args.small)
    torch.manual_seed(0)
    core = MELModel(ModelDims(**encoder_sizes(config), hidden=96, encoder="finetune", encoder_config=config))
    model = GlobalBatchStep(core).to(device)
    cfg = {"k": 4, "negatives": "in_batch", "sample_top": None, "grad_clip": 1.0, "lr": 1e-4, "encoder_lr": 1e-5,
           "weight_decay": 0.01, "adam_betas": (0.9, 0.999), "adam_eps": 1e-8}
    optimizer = make_optimizer(model.model, cfg)
    n_entities = 4 * args.ft_batch
    store = RowStore(config, n_entities)
    pools = [np.zeros(0, np.int64)] * n_entities
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    params = sum(p.numel() for p in core.parameters())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, parts = [], {}
    for step in range(args.ft_steps + 2):
        mentions = clip_rows(config, args.ft_batch, generator)
        mentions["gold"] = torch.from_numpy(rng.choice(n_entities, args.ft_batch, replace=False))
        sync(device)
        t0 = time.perf_counter()
        parts, _ = train_step(model, optimizer, mentions, store, pools, cfg, rng, torch.device(device),
                              use_gpu=device == "cuda")
        sync(device)
        if step >= 2:                                                 # after warm-up
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    finite = all(math.isfinite(v) for v in parts.values())
    size = config["vision_config"]
    return {"clip": f"vision {size['hidden_size']}x{size['num_hidden_layers']} patch {size['patch_size']} "
                    f"{size['image_size']}px, text {config['text_config']['hidden_size']}x"
                    f"{config['text_config']['num_hidden_layers']}",
            "parameters": params, "batch": args.ft_batch, "negatives": "in_batch", "autocast": device == "cuda",
            "steps_timed": len(times), "median_step_seconds": round(statistics.median(times), 4),
            "mentions_per_second": round(args.ft_batch / statistics.median(times), 1),
            "peak_memory_gib": None if peak is None else round(peak, 2),
            "loss_parts": {k: round(v, 4) for k, v in parts.items()}, "ok": finite}


def check_reencode(device: str, args) -> dict:
    """KB re-encoding with the fine-tuned encoder's architecture: ClipEncoder in eval mode, batches of 256."""
    from mel_ray.model.encoder import ClipEncoder

    config = clip_config(args.small)
    torch.manual_seed(0)
    rows = clip_rows(config, args.kb_batch, torch.Generator().manual_seed(2))
    rows = {k: v.to(device) for k, v in rows.items()}
    out: dict = {"batch": args.kb_batch, "reps": args.kb_reps}

    def per_second(run) -> tuple[float, torch.Tensor]:
        for _ in range(2):                                            # warm-up
            run()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.kb_reps):
            result = run()
        sync(device)
        return args.kb_batch * args.kb_reps / (time.perf_counter() - t0), result

    finite = True
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32} if device == "cuda" else {"fp32": torch.float32}
    for name, dtype in dtypes.items():
        encoder = ClipEncoder(config).eval().to(device=device, dtype=dtype)
        batch = {**rows, "pixels": rows["pixels"].to(dtype)}
        with torch.inference_mode():
            rate, result = per_second(lambda e=encoder, b=batch: e(b))
            out[f"{name} entities/s"] = round(rate, 1)
            finite &= bool(torch.isfinite(result["image_global"].float()).all())
            rate, result = per_second(lambda e=encoder, b=batch: e.image(b["pixels"]))
            out[f"{name} images/s (vision tower only)"] = round(rate, 1)
            finite &= bool(torch.isfinite(result[0].float()).all())
        del encoder
    out["ok"] = finite
    return out


def build_sd(folder: Path, small: bool) -> str:
    """Stable Diffusion from configs: SD 1.5's UNet / VAE / CLIP text encoder sizes, or tiny ones (--small)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from mel_ray.tiny_models import build_tokenizer

    tokenizer, _ = build_tokenizer()
    torch.manual_seed(0)
    if small:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=16,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77)
    else:   # the SD 1.5 configs (v1-inference.yaml): 860M-parameter UNet, 84M VAE, ViT-L/14 text encoder
        unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                    cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=unet,
                                   scheduler=DPMSolverMultistepScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16 if not small else torch.float32)
    pipe.save_pretrained(folder)
    return str(folder)


def check_sd(device: str, args, work: Path) -> dict:
    if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("pydantic") is None:
        return {"skipped": "diffusers or pydantic is not installed (carry them as wheels)", "ok": True}
    from mel_ray.synthesize import load_pipeline

    t0 = time.perf_counter()
    path = build_sd(work / "sd", args.small)
    built = time.perf_counter() - t0
    dtype = "float16" if device == "cuda" else "float32"
    pipe = load_pipeline(path, device=device, dtype=dtype, scheduler="dpmsolver++")
    params = sum(p.numel() for p in pipe.unet.parameters())
    prompt = "An image of Jordan: Jordan scored 40 points in the final game of the season."

    def draw(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        for i in range(n):
            image = pipe(prompt, num_inference_steps=args.sd_steps, guidance_scale=7.5, height=args.sd_size,
                         width=args.sd_size, generator=torch.Generator(device).manual_seed(i)).images[0]
        sync(device)
        assert image.size == (args.sd_size, args.sd_size)
        return time.perf_counter() - start

    draw(1)                                                          # warm-up
    seconds = draw(args.sd_images)
    return {"unet_parameters": params, "dtype": dtype, "size": args.sd_size, "steps": args.sd_steps,
            "scheduler": "DPM-Solver++", "attention": type(pipe.unet.attn_processors[
                next(iter(pipe.unet.attn_processors))]).__name__,
            "images": args.sd_images, "seconds": round(seconds, 2),
            "images_per_second": round(args.sd_images / seconds, 3), "build_seconds": round(built, 1), "ok": True}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="tiny sizes: checks the script itself on a CPU")
    ap.add_argument("--only", nargs="*", choices=["eval", "train", "finetune", "reencode", "sd"],
                    default=["eval", "train", "finetune", "reencode", "sd"])
    args = ap.parse_args()
    big = not args.small
    args.check_entities, args.check_mentions = (20000, 32) if big else (300, 8)
    args.entities, args.mentions = (110000, 256) if big else (600, 16)
    args.mention_batch, args.entity_chunk = (64, 4096) if args.device == "cuda" else (16, 256)
    args.train_batch, args.train_steps = (128, 20) if big else (8, 2)
    args.ft_batch, args.ft_steps = (128, 10) if big else (8, 2)
    args.kb_batch, args.kb_reps = (256, 5) if big else (16, 2)
    args.sd_size, args.sd_steps, args.sd_images = (512, 25, 8) if big else (32, 2, 2)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "small": args.small,
              "command": " ".join(sys.argv)}
    checks = {"eval": lambda: check_eval(args.device, args),
              "train": lambda: check_train(args.device, args),
              "finetune": lambda: check_finetune(args.device, args),
              "reencode": lambda: check_reencode(args.device, args)}
    with tempfile.TemporaryDirectory() as tmp:
        checks["sd"] = lambda: check_sd(args.device, args, Path(tmp))
        for name in args.only:
            t0 = time.perf_counter()
            print(f"[gpu_check] {name} ...", flush=True)
            report[name] = checks[name]()
            print(f"[gpu_check] {name}: {json.dumps(report[name])} ({time.perf_counter() - t0:.1f}s)", flush=True)

    (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# GPU check ({report['gpu']}, torch {report['torch']}, {report['date']})", "",
             f"- command: `{report['command']}`", ""]
    for name in args.only:
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in report[name].items()))
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(report[name]["ok"] for name in args.only) else 1


if __name__ == "__main__":
    raise SystemExit(main())
