"""Training input: JD-CCL steps fed by Ray Data (the production path) vs the same steps from in-memory tensors.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_train_input.py            # ~6 min on 2 cores
    .venv/bin/python benchmarks/bench_train_input.py --mentions 200 --reps 1   # smoke run

One Ray Train worker (TorchTrainer, as `mel-ray train` builds it) runs both feeds in alternating epochs, so
they share the worker process, the model, the entity store and the machine's state:

- ray: `get_dataset_shard("train").iter_batches(...)` over `mention_dataset` (Parquet shards read by Ray Data
  tasks, local shuffle buffer), converted with `arrow_to_tensors`, exactly as train_loop_per_worker does;
- memory: the whole split loaded once with `mention_tensors`, batches sliced from a shuffled permutation.

Both call the real `train_step` (gather of positives + mined negatives from the memory-mapped entity store,
forward, loss, backward, AdamW). Features have the paper's shapes (CLIP text 512, vision 768 with 50 tokens,
projection 512; 40 text tokens), from a 1-layer random CLIP so extraction is quick; the matcher uses MIMIC's
h 96. Step time = time from the end of one step to the end of the next (so it includes waiting for data).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np
import torch

from mel_ray import storage


def build_clip(folder: Path) -> str:
    """Random CLIP with ViT-B/32 shapes (text 512, vision 768, 224 px / 32 px patches, projection 512), 1 layer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from mel_ray.tiny_models import MAX_POSITIONS, build_tokenizer, write_tokenizer_files

    if (folder / "model.safetensors").exists():
        return str(folder)
    tokenizer, merges = build_tokenizer()
    text = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 1, "num_attention_heads": 8,
            "vocab_size": len(tokenizer), "max_position_embeddings": MAX_POSITIONS,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 1, "num_attention_heads": 12,
              "image_size": 224, "patch_size": 32}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).eval().save_pretrained(
        str(folder))
    images = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(folder))
    write_tokenizer_files(folder, merges)
    return str(folder)


def prepare(work: Path, entities: int, mentions: int, views: int) -> tuple[str, str, str]:
    from bench_features import build_data

    from mel_ray.config import FeaturesConfig
    from mel_ray.features import extract_features
    from mel_ray.negatives import mine_negatives

    clip = build_clip(work / "clip")
    ds_uri = build_data(work, entities, mentions, views)
    features = extract_features(ds_uri, clip, FeaturesConfig(num_gpus=0), synthetic_key="bench", engine="local",
                                quiet=True)["uri"]
    mine_negatives(ds_uri, k=8, num_workers=0)
    return ds_uri, features, storage.join(ds_uri, "negatives", "k8.parquet")


def bench_loop(config: dict) -> None:
    import ray.train

    from mel_ray.feature_store import (
        EntityStore,
        arrow_to_tensors,
        load_pools,
        mention_tensors,
        model_dims_from,
    )
    from mel_ray.model import MELModel, ModelDims
    from mel_ray.train.global_batch import GlobalBatchStep
    from mel_ray.train.loop import make_optimizer, train_step

    cfg = config["train"]
    torch.set_num_threads(cfg["torch_threads"])
    store = EntityStore(config["features_uri"])
    pools = load_pools(config["negatives_uri"], store.num_entities)
    shapes = store.shapes
    memory = {k: v for k, v in mention_tensors(config["features_uri"], config["dataset_uri"], "train").items()
              if isinstance(v, torch.Tensor)}
    n = len(memory["gold"])
    torch.manual_seed(0)
    model = MELModel(ModelDims(**model_dims_from(store.manifest)))
    optimizer = make_optimizer(model, cfg)
    shard = ray.train.get_dataset_shard("train")
    bs = cfg["batch_size"]
    times: dict[str, list[list[float]]] = {"ray": [], "memory": []}

    def ray_batches(epoch: int):
        for batch in shard.iter_batches(batch_size=bs, batch_format="pyarrow",
                                        local_shuffle_buffer_size=cfg["shuffle_buffer"],
                                        local_shuffle_seed=epoch):
            yield arrow_to_tensors(batch, shapes)

    def memory_batches(epoch: int):
        perm = torch.from_numpy(np.random.default_rng(epoch).permutation(n))
        for a in range(0, n, bs):
            rows = perm[a:a + bs]
            yield {k: v[rows] for k, v in memory.items()}

    epoch = 0
    step_model = GlobalBatchStep(model)     # train_step calls the step module (global-batch softmax), as the loop does
    for _ in range(config["reps"]):
        for mode, feed in (("ray", ray_batches), ("memory", memory_batches)):
            rng = np.random.default_rng(epoch)
            steps = []
            last = time.perf_counter()
            for batch in feed(epoch):
                train_step(step_model, optimizer, batch, store, pools, cfg, rng, torch.device("cpu"), False)
                now = time.perf_counter()
                steps.append(now - last)
                last = now
            times[mode].append(steps)
            epoch += 1
    # a file, not ray.train.report: Train V2 keeps metrics only with checkpoints (result.metrics is None here)
    Path(config["times_out"]).write_text(json.dumps({"times": times, "rows": n}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entities", type=int, default=400)
    ap.add_argument("--mentions", type=int, default=960)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the worker (the config default)")
    ap.add_argument("--workdir", default="/tmp/mel-ray-bench-train-input")
    ap.add_argument("--out", default=str(HERE / "results" / "train_input.md"))
    args = ap.parse_args()

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from mel_ray.config import load_config
    from mel_ray.feature_store import mention_dataset

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds_uri, features, negatives = prepare(work, args.entities, args.mentions, args.views)
    print(f"prepared in {time.perf_counter() - t0:.0f}s", flush=True)
    cfg = load_config(None, [f"train.batch_size={args.batch_size}", "train.k=4", "train.negatives=jaccard",
                             f"train.torch_threads={args.threads}"]).train
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=str(work / "ray"))
    trainer = TorchTrainer(
        bench_loop,
        train_loop_config={"train": cfg.model_dump(), "features_uri": features, "dataset_uri": ds_uri,
                           "negatives_uri": negatives, "reps": args.reps,
                           "times_out": str(work / "times.json")},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="bench-train-input", storage_path=str(work / "runs")),
        datasets={"train": mention_dataset(features, ds_uri, "train")},
    )
    result = trainer.fit()
    ray.shutdown()
    if result.error:
        raise result.error
    saved = json.loads((work / "times.json").read_text())
    times, rows = saved["times"], saved["rows"]

    def median_step(mode):
        return statistics.median(t for epoch in times[mode] for t in epoch[1:])   # first step: iterator start-up

    def epoch_seconds(mode):
        return statistics.median(sum(epoch) for epoch in times[mode])

    step = {m: median_step(m) for m in times}
    total = {m: epoch_seconds(m) for m in times}
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_train_input.py", *sys.argv[1:]])
    lines = [
        "# Training input benchmark (CPU)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        (f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
         f"torch {torch.__version__}, no GPU; load average at the end {os.getloadavg()[0]:.1f}"),
        f"- command: `{cmd}`",
        (f"- work: {rows} train mentions, batch size {args.batch_size}, jaccard negatives k 4 (pool 8), "
         f"{args.views} synthetic views; features at the paper's shapes, matcher h 96; 1 Ray Train "
         f"worker, {args.threads} torch thread(s); {args.reps} epochs per feed, alternating"),
        "",
        "| feed | median step (s) | median epoch (s) |",
        "| --- | ---: | ---: |",
        f"| in-memory tensors | {step['memory']:.3f} | {total['memory']:.1f} |",
        f"| Ray Data shard (production) | {step['ray']:.3f} | {total['ray']:.1f} |",
        "",
        (f"**Ray Data / in-memory: {step['ray'] / step['memory']:.3f}x per step, "
         f"{total['ray'] / total['memory']:.3f}x per epoch** (target <= 1.1x)."),
        "",
        "Per epoch (s): " + "; ".join(f"{m}: " + ", ".join(f"{sum(e):.1f}" for e in times[m]) for m in times),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
