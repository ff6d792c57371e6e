"""Exact full-KB ranks with a stated tie policy, computed shard by shard.

rank(m) = 1 + #{e : s(m,e) > s(m,gold)} + #{e : s(m,e) == s(m,gold) and e < gold}

which is the rank a stable descending sort of the full score row gives. A shard only needs the gold score to
count its part, so every shard scores its entities and the batch's gold entities in one call (the gold column
and the others come out of the same kernel) and returns per-mention counts plus its local top-k; summing counts
and merging top-k lists over shards is exact, and memory never holds a mentions x KB matrix.
"""

from __future__ import annotations

import numpy as np
import torch

HITS_AT = (1, 3, 5, 10, 20)


def count_before_gold(scores: torch.Tensor, entity_ids: torch.Tensor, gold_scores: torch.Tensor,
                      gold_ids: torch.Tensor) -> torch.Tensor:
    """scores [Nm, Ne] of one shard, entity_ids [Ne]; per mention the number of shard entities ranked before gold."""
    gs, gi = gold_scores[:, None], gold_ids[:, None]
    ahead = (scores > gs) | ((scores == gs) & (entity_ids[None, :] < gi))
    ahead &= entity_ids[None, :] != gi          # the gold entity itself is never ahead of itself
    return ahead.sum(dim=1)


def local_topk(scores: torch.Tensor, entity_ids: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a shard by (score desc, entity_id asc), as numpy arrays [Nm, k'] with k' = min(k, Ne)."""
    k = min(k, scores.shape[1])
    order = np.lexsort((np.broadcast_to(entity_ids.numpy(), scores.shape), -scores.double().numpy()), axis=1)
    top = order[:, :k]
    return entity_ids.numpy()[top], np.take_along_axis(scores.numpy(), top, axis=1)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((ids, -scores.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return {**{f"H@{k}": float("nan") for k in HITS_AT}, "MRR": float("nan"), "MR": float("nan")}
    out = {f"H@{k}": float((ranks <= k).mean()) for k in HITS_AT}
    out["MRR"] = float((1.0 / ranks).mean())
    out["MR"] = float(ranks.mean())
    return out
