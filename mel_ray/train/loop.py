"""The per-worker training loop (Ray Train `TorchTrainer`), JD-CCL + CVaCPT, with exact dev evaluation.

Runs on every worker. Rank r trains on its Ray Data shard of the mentions, evaluates rows r::world of dev
against the whole KB, and the ranks all-reduce their rank statistics so every worker sees the same exact dev
metrics (and so takes the same early-stopping decision). Rank 0 writes the checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from mel_ray.checkpoints import CHECKPOINT_FILE
from mel_ray.feature_store import EntityStore, arrow_to_tensors, load_pools, mention_tensors, model_dims_from
from mel_ray.model import MELModel, ModelDims
from mel_ray.model.losses import build_columns, contrastive_loss
from mel_ray.scoring import HITS_AT, chunks_of, rank_counts


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """MIMIC's AdamW groups: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def dev_statistics(model: MELModel, store: EntityStore, dev: dict, rows: np.ndarray, cfg: dict) -> torch.Tensor:
    """[n, sum 1/rank, sum rank, hits@k...] of the given dev rows, against every KB entity."""
    if len(rows) == 0:
        return torch.zeros(3 + len(HITS_AT), dtype=torch.float64)
    mentions = {k: v[rows] for k, v in dev.items() if isinstance(v, torch.Tensor)}
    gold = store.gather(mentions["gold"].numpy())
    counts, _, _ = rank_counts(model, mentions, gold,
                               chunks_of(store.chunk, 0, store.num_entities, cfg["eval_entity_chunk"]),
                               mention_batch=cfg["eval_mention_batch"])
    ranks = counts.astype(np.float64) + 1
    return torch.tensor([len(ranks), (1 / ranks).sum(), ranks.sum(), *[(ranks <= k).sum() for k in HITS_AT]],
                        dtype=torch.float64)


def metrics_from_statistics(stats: torch.Tensor, prefix: str = "dev_") -> dict[str, float]:
    n = max(float(stats[0]), 1.0)
    out = {f"{prefix}H@{k}": float(stats[3 + i]) / n for i, k in enumerate(HITS_AT)}
    out[f"{prefix}MRR"] = float(stats[1]) / n
    out[f"{prefix}MR"] = float(stats[2]) / n
    return out


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, mentions: dict, store: EntityStore,
               pools: list[np.ndarray], cfg: dict, rng: np.random.Generator, device: torch.device,
               use_gpu: bool) -> tuple[dict[str, float], int]:
    """One JD-CCL step on a mention batch (tensors incl. `gold`): loss parts and the in-batch fallback count."""
    mentions = {k: v.to(device) for k, v in mentions.items()}
    gold = mentions.pop("gold").cpu().numpy()
    cols = build_columns(gold, [pools[g] for g in gold], k=cfg["k"], mode=cfg["negatives"], rng=rng,
                         sample_top=cfg["sample_top"])
    entities = {k: v.to(device) for k, v in store.gather(cols.entity_ids).items()}
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_gpu):
        logits = model(mentions, entities)
    loss, parts = contrastive_loss({k: v.float() for k, v in logits.items()}, cols.targets.to(device),
                                   cols.mask.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    optimizer.step()
    return parts, cols.fallbacks


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = torch.cuda.is_available() and cfg["use_gpu"]
    if not use_gpu:
        torch.set_num_threads(cfg["torch_threads"])
    torch.manual_seed(cfg["seed"])

    store = EntityStore(config["features_uri"])
    pools = load_pools(config.get("negatives_uri"), store.num_entities)
    dev = mention_tensors(config["features_uri"], config["dataset_uri"], "dev")
    dims = ModelDims(**model_dims_from(store.manifest), **config["dims"])
    model = MELModel(dims)
    optimizer = torch.optim.AdamW(decay_groups(model, cfg["weight_decay"]), lr=cfg["lr"])
    state = {"epoch": 0, "best_mrr": -1.0, "bad_evals": 0, "history": []}

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:                                  # restarted after a failure: continue, never retrain epochs
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, CHECKPOINT_FILE), weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        state["restarts"] = state.get("restarts", 0) + 1
        if state["bad_evals"] >= cfg["patience"]:   # it had early-stopped before the failure: nothing to do
            return

    # CVaCPT's parameters get no gradient when w = 0 or the features carry no synthetic views
    uses_cvacpt = dims.cvacpt_weight > 0.0 and "synthetic_global" in store.shapes
    ddp_kwargs = {"find_unused_parameters": not uses_cvacpt}
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    core: MELModel = model.module if hasattr(model, "module") else model
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    shapes = store.shapes

    for epoch in range(state["epoch"], cfg["epochs"]):
        model.train()
        rng = np.random.default_rng([cfg["seed"], epoch, rank])
        sums: dict[str, float] = {}
        steps, fallbacks, t0 = 0, 0, time.perf_counter()
        for batch in shard.iter_batches(batch_size=cfg["batch_size"], batch_format="pyarrow",
                                        local_shuffle_buffer_size=cfg["shuffle_buffer"],
                                        local_shuffle_seed=cfg["seed"] * 1000 + epoch):
            parts, n_fallbacks = train_step(model, optimizer, arrow_to_tensors(batch, shapes), store, pools, cfg,
                                            rng, device, use_gpu)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            steps += 1
            fallbacks += n_fallbacks
        metrics = {"epoch": epoch + 1, "steps": steps, "negative_fallbacks": fallbacks,
                   "restarts": state.get("restarts", 0),
                   "epoch_seconds": time.perf_counter() - t0,
                   **{k: v / max(steps, 1) for k, v in sums.items()}}

        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
            rows = np.arange(rank, len(dev["gold"]), world)
            stats = dev_statistics(core, store, {k: v for k, v in dev.items()}, rows, cfg)
            if world > 1:
                # NCCL only reduces CUDA tensors (gloo takes CPU ones); device is the worker's own
                stats = stats.to(device)
                torch.distributed.all_reduce(stats)
                stats = stats.cpu()
            metrics.update(metrics_from_statistics(stats))
            if metrics["dev_MRR"] > state["best_mrr"]:
                state["best_mrr"], state["bad_evals"] = metrics["dev_MRR"], 0
            else:
                state["bad_evals"] += 1
        state["epoch"] = epoch + 1
        state["history"].append(metrics)
        stop = state["bad_evals"] >= cfg["patience"]
        metrics["early_stopped"] = stop
        with tempfile.TemporaryDirectory() as folder:
            ckpt = None
            if rank == 0:
                torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                            "dims": dims.to_dict()}, os.path.join(folder, CHECKPOINT_FILE))
                ckpt = ray.train.Checkpoint.from_directory(folder)
            # checkpoints are ranked by dev MRR; epochs without evaluation rank last (the latest is kept anyway)
            ray.train.report({**metrics, "checkpoint_score": metrics.get("dev_MRR", -1.0)}, checkpoint=ckpt)
        if stop:
            break
