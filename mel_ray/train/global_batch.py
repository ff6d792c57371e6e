"""The global-batch softmax under DDP: N workers x B/N mentions score against the same entity set as 1 worker x B.

Why: with `in_batch` and `both` negatives a mention's softmax runs over the batch's entities. If every worker
built its columns from its own share only, N workers would train with N times fewer negatives than one worker
with the same global batch (a different objective). Here each step's entity set is the union over the ranks:

1. `global_plan` (before the forward; small integer collectives, no gradients): every rank sends its local
   column ids (what `build_columns` gives it) and its mentions' gold ids. Every rank then derives the same
   global entity set: the ranks' local columns concatenated in rank order, an entity kept at its FIRST
   occurrence only (an entity that is gold or a negative on two ranks is one column of the softmax, not two).
   So rank r computes the entity side of just the entities it contributes (`plan.entity_ids`); the plan also
   holds the global column of each local mention's gold (`targets`) and the [n_r, Ne] softmax mask:
   in_batch = the columns that are the gold of ANY rank's mention, both = every column.
2. `GlobalBatchStep.forward` (inside the DDP wrapper): mention side and entity side as `MELModel.forward`, then
   the entity side is all-gathered WITH gradients (`gather_side`), then `pair_logits` against the global set.
3. `contrastive_loss(logits, plan.targets, plan.mask) * plan.loss_scale` on each rank.

Why the gradient is exactly the one-worker gradient: let L = (1/B) sum over the global batch. Rank r's loss is
l_r = (1/n_r) sum over its mentions, times loss_scale = n_r N / B, i.e. (N/B) sum over its mentions (1 when
the shares are equal). The backward of the autograd all_gather SUMS, onto the rank that computed an entity row,
the gradients that row received on every rank; so after backward rank s holds the gradient of (N/B) sum over
ALL mentions of the terms that flow through ITS mention rows and ITS entity rows (plus the pair part of its own
mentions). Summed over ranks that covers every term once: N dL/dtheta. DDP divides the sum by N: dL/dtheta.
The losses themselves average to L over the ranks (`global_mean` reports that).

`jaccard` needs no gather: a mention's softmax holds only its own gold and its own k negatives, which are all
in its rank's local columns, so each per-mention term is the same as on one worker; an entity row used by
mentions of two ranks is computed on both and each rank back-propagates its own mentions' share, which DDP
sums (the gradient of a sum of uses). The exception is a mention whose gold had no mined negatives (a
fallback): its softmax is "the batch's gold entities", which on one worker means the global batch. If any rank
has a fallback in the step (one tiny all-gather tells every rank), jaccard takes the gathered path too, with
the fallback rows' mask set to the global gold columns and every other row to its own gold + negatives.

Why a module (`GlobalBatchStep`) and not calls around the DDP wrapper: DDP prepares its reducer in its own
forward, and with find_unused_parameters=True it marks as unused every parameter it cannot reach from that
forward's outputs; a parameter used only outside (the entity side, were it computed on the unwrapped model)
would then be marked ready twice and the backward fails. Wrapping `GlobalBatchStep(core)` in DDP puts the
whole step (mention side, entity side, gather, pair logits) inside one DDP forward, so both settings of
find_unused_parameters work (tests/test_global_batch.py runs both). The gather's backward is a collective that
runs during DDP's backward; every rank runs the same graph in the same order, so the collectives match (what
CLIP-style training with an autograd all_gather under DDP relies on too). Every rank must call
forward and backward every step, as DDP requires anyway.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mel_ray.model.losses import NEGATIVE_MODES, Columns


def _world() -> int:
    """World size when torch.distributed is initialised, else 1 (then nothing is gathered)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _exchange_lengths(n: int, device: torch.device) -> list[int]:
    """First-axis length of every rank (one small all_gather; on `device`, as NCCL takes only CUDA tensors)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(_world())]
    dist.all_gather(out, mine)
    return [int(x) for x in out]


def gather_rows(t: torch.Tensor, *, grad: bool, lengths: list[int] | None = None) -> torch.Tensor:
    """Every rank's rows of `t`, concatenated in rank order; ranks may hold different numbers of rows (zero too).

    Collectives need one shape on every rank, so each rank pads to the longest share, gathers, and the padding
    is cut off again; `lengths` (every rank's row count) saves the exchange when the caller knows them. With
    grad=True the autograd all_gather is used (torch's functional collective; its backward is a reduce-scatter
    with SUM): the rank that computed a row gets the sum of the gradients that row got on every rank. With
    grad=False a plain all_gather (no graph: evaluation tensors).
    Any dtype (bool travels as uint8) and trailing shape; the tensor must be on the process group's device
    (CUDA for NCCL, CPU for gloo). Not distributed or world size 1: `t` unchanged."""
    world = _world()
    if world == 1:
        return t
    if lengths is None:
        lengths = _exchange_lengths(t.shape[0], t.device)
    if len(lengths) != world or lengths[dist.get_rank()] != t.shape[0]:
        raise ValueError(f"lengths {lengths} do not match this rank's {t.shape[0]} rows (world {world})")
    top = max(lengths)
    if top == 0:
        return t
    is_bool = t.dtype == torch.bool
    x = t.to(torch.uint8) if is_bool else t
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
    if grad:
        # the autograd all_gather (torch.distributed.nn.functional.all_gather is deprecated in favour of it)
        import torch.distributed._functional_collectives as funcol
        parts = funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD).chunk(world)
    else:
        x = x.detach().contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
    out = torch.cat([p[:n] for p, n in zip(parts, lengths)])
    return out.bool() if is_bool else out


def gather_side(side: dict, *, grad: bool, lengths: list[int] | None = None) -> dict:
    """gather_rows on every tensor of an entity_side()-style dict (unit -> name -> tensor, entity axis first).

    The tensors are packed into one [n, total width] tensor per dtype, so a side of ~24 tensors costs one
    collective (per dtype) instead of 24; the pack and the split are autograd operations."""
    flat = [(unit, name, t) for unit, parts in side.items() for name, t in parts.items()]
    if _world() == 1 or not flat:
        return side
    n = flat[0][2].shape[0]
    if lengths is None:
        lengths = _exchange_lengths(n, flat[0][2].device)
    out: dict = {unit: {} for unit in side}
    for dtype in dict.fromkeys(t.dtype for _, _, t in flat):
        group = [(unit, name, t) for unit, name, t in flat if t.dtype == dtype]
        widths = [math.prod(t.shape[1:]) for _, _, t in group]
        packed = gather_rows(torch.cat([t.reshape(n, w) for (_, _, t), w in zip(group, widths)], dim=1),
                             grad=grad, lengths=lengths)
        for (unit, name, t), part in zip(group, torch.split(packed, widths, dim=1)):
            out[unit][name] = part.reshape(packed.shape[0], *t.shape[1:])
    return {unit: {name: out[unit][name] for name in parts} for unit, parts in side.items()}


@dataclass
class GlobalPlan:
    """One rank's view of a step's global entity set (the same set on every rank)."""

    entity_ids: np.ndarray          # ids whose entity side THIS rank computes (its share of the global set)
    counts: list[int] | None        # rows every rank contributes; None: no gather, score the local columns
    global_ids: np.ndarray          # [Ne] the entity set scored (== entity_ids when counts is None)
    targets: torch.Tensor           # [n_r] column of each local mention's gold in global_ids
    mask: torch.Tensor              # [n_r, Ne] bool, True where a column is in that mention's softmax
    loss_scale: float               # n_r * world / global batch: makes DDP's average the global-batch mean
    device: torch.device


def fallback_rows(batch_pools: list[np.ndarray], k: int) -> np.ndarray:
    """Mentions whose gold gets no mined negatives in jaccard mode (build_columns' fallbacks): sample_negatives
    returns nothing exactly when the pool is empty or k is 0."""
    return np.array([k == 0 or len(p) == 0 for p in batch_pools], dtype=bool)


def global_plan(cols: Columns, gold: np.ndarray, mode: str, *, fallback: np.ndarray | None = None,
                device: torch.device | str = "cpu") -> GlobalPlan:
    """The step's global entity set from this rank's `build_columns` result (cols) and gold ids [n_r].

    `fallback` [n_r] bool (fallback_rows) is required in jaccard mode: which rows use in-batch negatives.
    Collectives: one all_gather of 3 integers, and in in_batch/both (or jaccard with a fallback on some rank)
    one of the ids; on `device` (the worker's: NCCL needs CUDA). Every rank must call it, in the same mode."""
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {mode!r}")
    device = torch.device(device)
    gold = np.asarray(gold, dtype=np.int64)
    if mode == "jaccard":
        if fallback is None:
            raise ValueError("global_plan needs `fallback` (fallback_rows) in jaccard mode")
        fallback = np.asarray(fallback, dtype=bool)
        if fallback.shape != gold.shape or int(fallback.sum()) != cols.fallbacks:
            raise ValueError(f"fallback marks {int(fallback.sum())} of {len(fallback)} rows, build_columns "
                             f"counted {cols.fallbacks} of {len(gold)}")
    local = GlobalPlan(entity_ids=cols.entity_ids, counts=None, global_ids=cols.entity_ids,
                       targets=cols.targets.to(device), mask=cols.mask.to(device), loss_scale=1.0, device=device)
    world = _world()
    if world == 1:
        return local
    header = torch.tensor([[len(gold), len(cols.entity_ids), cols.fallbacks]], dtype=torch.int64, device=device)
    headers = gather_rows(header, grad=False, lengths=[1] * world).cpu().numpy()
    n_gold, n_ids = headers[:, 0], headers[:, 1]
    local.loss_scale = len(gold) * world / int(n_gold.sum())
    if mode == "jaccard" and int(headers[:, 2].sum()) == 0:
        return local                # every softmax is within its rank's columns: exact as it is
    mine = torch.from_numpy(np.concatenate([gold, cols.entity_ids.astype(np.int64)])).to(device)
    both_ids = gather_rows(mine, grad=False, lengths=(n_gold + n_ids).tolist()).cpu().numpy()
    ends = np.cumsum(n_gold + n_ids)
    starts = ends - (n_gold + n_ids)
    all_gold = np.concatenate([both_ids[s:s + g] for s, g in zip(starts, n_gold)])
    per_rank = [both_ids[s + g:e] for s, g, e in zip(starts, n_gold, ends)]
    all_ids = np.concatenate(per_rank)
    first = np.zeros(len(all_ids), dtype=bool)
    first[np.unique(all_ids, return_index=True)[1]] = True      # first occurrence of each id, rank order
    global_ids = all_ids[first]
    bounds = np.cumsum([0, *n_ids])
    kept = [first[a:b] for a, b in itertools.pairwise(bounds)]
    rank = dist.get_rank()

    order = np.argsort(global_ids, kind="stable")
    def column(ids: np.ndarray) -> np.ndarray:
        return order[np.searchsorted(global_ids, ids, sorter=order)]

    golds = np.isin(global_ids, all_gold)
    if mode == "both":
        mask = np.ones((len(gold), len(global_ids)), dtype=bool)
    elif mode == "in_batch":
        mask = np.broadcast_to(golds, (len(gold), len(global_ids))).copy()
    else:
        mask = np.zeros((len(gold), len(global_ids)), dtype=bool)
        mask[:, column(cols.entity_ids)] = cols.mask.cpu().numpy()
        mask[fallback] = golds
    return GlobalPlan(entity_ids=per_rank[rank][kept[rank]], counts=[int(k.sum()) for k in kept],
                      global_ids=global_ids, targets=torch.from_numpy(column(gold)).to(device),
                      mask=torch.from_numpy(mask).to(device), loss_scale=local.loss_scale, device=device)


class GlobalBatchStep(nn.Module):
    """MELModel.forward with the entity side gathered across ranks (wrap THIS module in DDP; see the module doc).

    forward(mentions, entities, plan): `entities` are the features of plan.entity_ids; returns the logits of the
    local mentions against plan.global_ids. With plan None (or a plan without gather) it is MELModel.forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, mentions: dict, entities: dict, plan: GlobalPlan | None = None) -> dict[str, torch.Tensor]:
        m = self.model
        ms = m.mention_side(m.mention_features(mentions))
        es = m.entity_side(m.entity_features(entities))
        if plan is not None and plan.counts is not None:
            es = gather_side(es, grad=True, lengths=plan.counts)
        return m.pair_logits(ms, es)


def global_mean(parts: dict[str, float], plan: GlobalPlan) -> dict[str, float]:
    """Loss parts (contrastive_loss's dict, this rank's mean) -> their global-batch means, the same on every rank
    (one all_reduce). Not distributed: unchanged."""
    world = _world()
    if world == 1:
        return dict(parts)
    values = torch.tensor([v * plan.loss_scale for v in parts.values()], dtype=torch.float64, device=plan.device)
    dist.all_reduce(values)
    return {k: float(v) / world for k, v in zip(parts, values.cpu())}
