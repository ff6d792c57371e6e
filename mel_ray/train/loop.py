"""The per-worker training loop (Ray Train `TorchTrainer`), JD-CCL + CVaCPT, with exact dev evaluation.

Runs on every worker. Rank r trains on its Ray Data shard of the mentions, evaluates rows r::world of dev
against the whole KB, and the ranks all-reduce their rank statistics so every worker sees the same exact dev
metrics (and so takes the same early-stopping decision). Rank 0 writes the checkpoint.

A non-finite loss or gradient (a step) or non-finite dev scores (an evaluation) stop the run on every rank at
once (the ranks agree through an all-reduce): the step's update is not applied, and rank 0 writes a last
checkpoint whose metrics carry `nonfinite` (one line naming the epoch, step or split and how many mentions were
affected) and no dev metric. The driver raises that line as a NonFiniteError (mel_ray.train.run); a restored
run that finds such a checkpoint stops at once with the same line.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from mel_ray.checkpoints import CHECKPOINT_FILE
from mel_ray.errors import NonFiniteError
from mel_ray.feature_store import EntityStore, arrow_to_tensors, load_pools, mention_tensors, model_dims_from
from mel_ray.model import MELModel, ModelDims
from mel_ray.model.losses import build_columns, contrastive_loss
from mel_ray.scoring import HITS_AT, NonFiniteScores, chunks_of, rank_counts
from mel_ray.train import inputs as finetune_inputs
from mel_ray.train.finetune import CandidateStore, pools_of
from mel_ray.train.finetune import dev_statistics as finetune_dev_statistics
from mel_ray.train.global_batch import GlobalBatchStep, fallback_rows, global_mean, global_plan

NONFINITE = "nonfinite"     # the metric (and state key) that carries a non-finite failure's line


# every parameter of these modules (scale and shift) is exempt from weight decay, whatever the module's name
NORM_MODULES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.LocalResponseNorm,
                torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
                torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """MIMIC's AdamW groups: no weight decay on biases (of any module: Linear, Conv, ...) and on the parameters of
    normalisation layers (every nn.LayerNorm, found by module type, not by name); decay on everything else."""
    exempt: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, NORM_MODULES) or name == "bias":
                exempt.add(id(param))
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if id(param) in exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: dict) -> torch.optim.AdamW:
    """AdamW over every trainable parameter with train.lr, adam_betas, adam_eps and weight_decay (decay_groups).
    A fine-tuned encoder (model.encoder, when it has parameters) gets its own rate, train.encoder_lr (MIMIC:
    1e-5 for CLIP), with the same decay rule."""
    encoder = getattr(model, "encoder", None)
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    groups = []
    for group in decay_groups(model, cfg["weight_decay"]):
        heads = [p for p in group["params"] if id(p) not in encoder_ids]
        tower = [p for p in group["params"] if id(p) in encoder_ids]
        groups.append({**group, "params": heads})
        if tower:
            groups.append({**group, "params": tower, "lr": cfg.get("encoder_lr") or cfg["lr"]})
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["adam_betas"]), eps=cfg["adam_eps"])


def worker_batch_size(global_batch: int, world: int) -> int:
    """train.batch_size is the global batch (MIMIC: 128 on one GPU): each of the `world` workers takes an equal
    share, and DDP's gradient average over the ranks is the mean over the global batch."""
    if global_batch % world:
        raise ValueError(f"train.batch_size {global_batch} (the global batch) does not split evenly over "
                         f"{world} workers")
    return global_batch // world


def clip_gradients(parameters, max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the gradients (before any clipping); with max_norm they are scaled down to at most
    max_norm, with None they are left exactly as they are (MIMIC: no clipping). The norm feeds the step's
    non-finite check either way."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm is None:
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def dev_statistics(model: MELModel, store: EntityStore, dev: dict, rows: np.ndarray, cfg: dict) -> torch.Tensor:
    """[n, sum 1/rank, sum rank, hits@k..., non-finite rows] of the given dev rows, against every KB entity.
    Rows with non-finite scores only count in the last slot (all the others are then zero)."""
    stats = torch.zeros(4 + len(HITS_AT), dtype=torch.float64)
    if len(rows) == 0:
        return stats
    mentions = {k: v[rows] for k, v in dev.items() if isinstance(v, torch.Tensor)}
    gold = store.gather(mentions["gold"].numpy())
    try:
        counts, _, _ = rank_counts(model, mentions, gold,
                                   chunks_of(store.chunk, 0, store.num_entities, cfg["eval_entity_chunk"]),
                                   mention_batch=cfg["eval_mention_batch"])
    except NonFiniteScores as err:
        stats[-1] = float(err.mask.sum())
        return stats
    ranks = counts.astype(np.float64) + 1
    stats[:-1] = torch.tensor([len(ranks), (1 / ranks).sum(), ranks.sum(), *[(ranks <= k).sum() for k in HITS_AT]],
                              dtype=torch.float64)
    return stats


def metrics_from_statistics(stats: torch.Tensor, prefix: str = "dev_") -> dict[str, float]:
    n = max(float(stats[0]), 1.0)
    out = {f"{prefix}H@{k}": float(stats[3 + i]) / n for i, k in enumerate(HITS_AT)}
    out[f"{prefix}MRR"] = float(stats[1]) / n
    out[f"{prefix}MR"] = float(stats[2]) / n
    return out


def _world_any(flag: bool, device: torch.device, *values: float) -> tuple[bool, list[float]]:
    """(flag on any rank, values summed over ranks): one small all-reduce when training is distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return flag, list(values)
    t = torch.tensor([float(flag), *values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return bool(t[0] > 0), [float(v) for v in t[1:]]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, mentions: dict, store: EntityStore,
               pools: list[np.ndarray], cfg: dict, rng: np.random.Generator, device: torch.device,
               use_gpu: bool) -> tuple[dict[str, float], int]:
    """One JD-CCL step on a mention batch (tensors incl. `gold`): loss parts and the in-batch fallback count.

    A loss or gradient norm that is NaN or inf on any rank raises NonFiniteError on every rank (they agree
    through one all-reduce per step) before the optimizer step, so the weights stay those of the last good step."""
    mentions = {k: v.to(device) for k, v in mentions.items()}
    gold = mentions.pop("gold").cpu().numpy()
    batch_pools = [pools[g] for g in gold]
    cols = build_columns(gold, batch_pools, k=cfg["k"], mode=cfg["negatives"], rng=rng,
                         sample_top=cfg["sample_top"])
    # in_batch / both: the softmax covers the GLOBAL batch's entities (gathered from every rank with gradients),
    # so N workers x B/N train exactly as 1 worker x B (mel_ray.train.global_batch)
    plan = global_plan(cols, gold, cfg["negatives"], fallback=fallback_rows(batch_pools, cfg["k"]), device=device)
    entities = {k: v.to(device) for k, v in store.gather(plan.entity_ids).items()}   # this rank's share only
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_gpu):
        logits = model(mentions, entities, plan)
    loss, parts = contrastive_loss({k: v.float() for k, v in logits.items()}, plan.targets, plan.mask)
    loss = loss * plan.loss_scale
    parts = global_mean(parts, plan)        # global-batch means, the same on every rank
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = clip_gradients(model.parameters(), cfg["grad_clip"])
    finite = bool(torch.isfinite(torch.stack([loss.detach(), norm.detach().to(loss.device)])).all())
    bad, _ = _world_any(not finite, device)
    if bad:
        optimizer.zero_grad(set_to_none=True)
        rows = torch.zeros(len(gold), dtype=torch.bool)
        for value in logits.values():
            rows |= ~torch.isfinite(value.detach().float()).all(dim=1).cpu()
        _, (n_rows, n_batch) = _world_any(True, device, float(rows.sum()), float(len(gold)))
        if finite:
            what = "another rank's loss or gradient norm is not finite"
        elif not bool(torch.isfinite(loss.detach())):
            what = f"the loss is {float(loss.detach())}"
        else:
            what = f"the gradient norm is {float(norm)}"
        raise NonFiniteError("train", f"{what} ({n_rows:g} of {n_batch:g} mentions of the batch got non-finite "
                             "scores)", rows=int(n_rows))
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

    finetune = config["dims"].get("encoder") == "finetune"
    if finetune:                                    # pixels and token ids in; CLIP trains with the matcher
        import ray

        store, pools, dev = None, None, None
        dims = ModelDims(**config["dims"])
        tables = ray.get(config["finetune"]["tables"])
        decode = config["finetune"]["decode"]
    else:
        store = EntityStore(config["features_uri"])
        pools = load_pools(config.get("negatives_uri"), store.num_entities)
        dev = mention_tensors(config["features_uri"], config["dataset_uri"], "dev")
        dims = ModelDims(**model_dims_from(store.manifest), **config["dims"])
    model = MELModel(dims)
    checkpoint = ray.train.get_checkpoint()
    if finetune and not checkpoint:                 # the pretrained CLIP is where fine-tuning starts
        model.encoder.load_pretrained(config["finetune"]["clip"], config["finetune"]["cache_dir"])
    optimizer = make_optimizer(model, cfg)
    state = {"epoch": 0, "best_mrr": -1.0, "bad_evals": 0, "history": []}
    restored_encoder = None

    if checkpoint:                                  # restarted after a failure: continue, never retrain epochs
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, CHECKPOINT_FILE), weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        state["restarts"] = state.get("restarts", 0) + 1
        if finetune:        # which encoder weights this restart continues from (tests compare it with the file's)
            from mel_ray.model.encoder import encoder_fingerprint, encoder_state

            restored_encoder = encoder_fingerprint(encoder_state(model.state_dict()))
        if state["bad_evals"] >= cfg["patience"]:   # it had early-stopped before the failure: nothing to do
            return
        if state.get(NONFINITE):                    # it had stopped on non-finite values: the same line again
            return

    # CVaCPT's parameters get no gradient when w = 0 or the features carry no synthetic views
    has_views = decode["n_views"] > 0 if finetune else "synthetic_global" in store.shapes
    uses_cvacpt = dims.cvacpt_weight > 0.0 and has_views
    ddp_kwargs = {"find_unused_parameters": not uses_cvacpt}
    # the whole step (mention side, entity side, cross-rank gather, pair logits) is one DDP forward
    model = ray.train.torch.prepare_model(GlobalBatchStep(model), parallel_strategy_kwargs=ddp_kwargs)
    core: MELModel = (model.module if hasattr(model, "module") else model).model
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    shapes = None if finetune else store.shapes
    worker_batch = worker_batch_size(cfg["batch_size"], world)

    for epoch in range(state["epoch"], cfg["epochs"]):
        model.train()
        rng = np.random.default_rng([cfg["seed"], epoch, rank])
        sums: dict[str, float] = {}
        steps, fallbacks, blanks, t0 = 0, 0, 0, time.perf_counter()
        failure = None
        for batch in shard.iter_batches(batch_size=worker_batch, batch_format="numpy" if finetune else "pyarrow",
                                        # finetune rows hold decoded pixels (MBs each at 224 px): a buffer of
                                        # 4 batches, not train.shuffle_buffer rows (a weaker shuffle: noted)
                                        local_shuffle_buffer_size=min(cfg["shuffle_buffer"], 4 * worker_batch)
                                        if finetune else cfg["shuffle_buffer"],
                                        local_shuffle_seed=cfg["seed"] * 1000 + epoch):
            if finetune:
                mentions, candidates = finetune_inputs.to_tensors(batch, decode)
                blanks += int(np.sum(batch["blank_images"]))
                step_store = CandidateStore(candidates)
                step_pools = pools_of(mentions["gold"].numpy(), candidates)
            else:
                mentions, step_store, step_pools = arrow_to_tensors(batch, shapes), store, pools
            try:
                parts, n_fallbacks = train_step(model, optimizer, mentions, step_store, step_pools,
                                                cfg, rng, device, use_gpu)
            except NonFiniteError as err:
                failure = f"epoch {epoch + 1}, step {steps + 1} (split 'train'): {err.message}; training stopped"
                break
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            steps += 1
            fallbacks += n_fallbacks
        if failure:
            stop_nonfinite(core, optimizer, state, dims, rank, epoch, failure)
            return
        metrics = {"epoch": epoch + 1, "steps": steps, "negative_fallbacks": fallbacks,
                   **({"blank_images": blanks} if finetune else {}),
                   **({"restored_encoder_sha256": restored_encoder} if restored_encoder else {}),
                   "restarts": state.get("restarts", 0),
                   "epoch_seconds": time.perf_counter() - t0,
                   **{k: v / max(steps, 1) for k, v in sums.items()}}

        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
            if finetune:                            # the KB re-encoded with the current weights; summed over ranks
                stats = finetune_dev_statistics(core, tables["dev"], tables["kb"], decode, rank, world, cfg, device,
                                                4 + len(HITS_AT))
                n_dev = tables["dev"].num_rows
            else:
                rows = np.arange(rank, len(dev["gold"]), world)
                stats = dev_statistics(core, store, {k: v for k, v in dev.items()}, rows, cfg)
                n_dev = len(dev["gold"])
            if world > 1 and not finetune:
                # NCCL only reduces CUDA tensors (gloo takes CPU ones); device is the worker's own
                stats = stats.to(device)
                torch.distributed.all_reduce(stats)
                stats = stats.cpu()
            if stats[-1] > 0:
                stop_nonfinite(core, optimizer, state, dims, rank, epoch,
                               f"epoch {epoch + 1}, dev evaluation (split 'dev'): {int(stats[-1])} of "
                               f"{n_dev} mentions got non-finite scores (NaN or inf); training stopped, "
                               "no dev metrics reported")
                return
            metrics.update(metrics_from_statistics(stats))
            if metrics["dev_MRR"] > state["best_mrr"]:
                state["best_mrr"], state["bad_evals"] = metrics["dev_MRR"], 0
            else:
                state["bad_evals"] += 1
        state["epoch"] = epoch + 1
        state["history"].append(metrics)
        restored_encoder = None
        stop = state["bad_evals"] >= cfg["patience"]
        metrics["early_stopped"] = stop
        # checkpoints are ranked by dev MRR; epochs without evaluation rank last (the latest is kept anyway)
        report_with_checkpoint(core, optimizer, state, dims, rank,
                               {**metrics, "checkpoint_score": metrics.get("dev_MRR", -1.0)})
        if stop:
            break


def stop_nonfinite(core: MELModel, optimizer, state: dict, dims: ModelDims, rank: int, epoch: int, line: str) -> None:
    """Every rank's last report: `nonfinite` = line, no dev metric; rank 0 attaches a checkpoint (so the driver
    reads the line from the run's result, and a restored run stops at once). Its weights are the model's as
    they are now (a failed step was not applied); evaluating them is refused by the loaders and the kernel."""

    state = {**state, NONFINITE: line}
    report_with_checkpoint(core, optimizer, state, dims, rank,
                           {"epoch": epoch + 1, NONFINITE: line, "checkpoint_score": -1.0})


def report_with_checkpoint(core: MELModel, optimizer, state: dict, dims: ModelDims, rank: int, metrics: dict) -> None:
    """Every rank reports `metrics`; rank 0 attaches the checkpoint (model, optimizer, loop state, dims)."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        ckpt = None
        if rank == 0:
            torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                        "dims": dims.to_dict()}, os.path.join(folder, CHECKPOINT_FILE))
            ckpt = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=ckpt)
