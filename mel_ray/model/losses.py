"""Contrastive objectives: MIMIC's sum of cross-entropies with JD-CCL column masks (paper eq. 1 and 4).

A step builds ONE entity set: the batch's gold entities plus each gold entity's sampled hard negatives.
Every mention is scored against all of them once; a boolean mask says which columns are in each mention's
softmax:
- jaccard:  its own gold + the k negatives mined for that gold (eq. 4),
- in_batch: the batch's gold entities (MIMIC's behaviour, eq. 1 with in-batch negatives),
- both:     every column.
A gold entity without mined negatives falls back to in-batch negatives (counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NEGATIVE_MODES = ("jaccard", "in_batch", "both")


@dataclass
class Columns:
    entity_ids: np.ndarray       # [Ne] KB ids whose features form the step's entity set
    targets: torch.Tensor        # [Nm] column of each mention's gold entity
    mask: torch.Tensor           # [Nm, Ne] bool, True where a column is in that mention's softmax
    fallbacks: int               # mentions whose gold had no mined negatives (in-batch used instead)


def sample_negatives(pool: np.ndarray, k: int, rng: np.random.Generator | None, top: int | None) -> np.ndarray:
    """k negatives from one entity's mined pool: the first k, or k at random from the pool's first `top`."""
    if rng is None or top is None:
        return pool[:k]
    head = pool[: max(k, top)]
    return head if len(head) <= k else rng.choice(head, size=k, replace=False)


def build_columns(gold: np.ndarray, pools: list[np.ndarray], k: int, mode: str,
                  rng: np.random.Generator | None = None, sample_top: int | None = None) -> Columns:
    """gold [Nm] KB ids; pools[i] the mined negatives of gold[i] (best first)."""
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {mode!r}")
    negatives = [sample_negatives(p, k, rng, sample_top) if mode != "in_batch" else p[:0] for p in pools]
    ids = list(dict.fromkeys(int(g) for g in gold))          # unique gold ids, batch order kept
    n_gold = len(ids)
    for neg in negatives:
        ids.extend(int(e) for e in neg)
    entity_ids = np.array(list(dict.fromkeys(ids)), dtype=np.int64)
    column = {int(e): c for c, e in enumerate(entity_ids)}
    targets = torch.tensor([column[int(g)] for g in gold], dtype=torch.long)

    n_m, n_e = len(gold), len(entity_ids)
    in_batch = torch.zeros(n_e, dtype=torch.bool)
    in_batch[:n_gold] = True                                  # the first columns are the batch's gold ids
    fallbacks = 0
    if mode == "both":
        mask = torch.ones(n_m, n_e, dtype=torch.bool)
    elif mode == "in_batch":
        mask = in_batch.expand(n_m, n_e).clone()
    else:
        mask = torch.zeros(n_m, n_e, dtype=torch.bool)
        for i, neg in enumerate(negatives):
            if len(neg) == 0:
                mask[i] = in_batch
                fallbacks += 1
            else:
                mask[i, [column[int(e)] for e in neg]] = True
        mask[torch.arange(n_m), targets] = True
    return Columns(entity_ids=entity_ids, targets=targets, mask=mask, fallbacks=fallbacks)


def contrastive_loss(logits: dict[str, torch.Tensor], targets: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the cross-entropies of the overall and the three unit logits, each over its masked columns."""
    parts = {}
    for name in ("overall", "text", "image", "cross"):
        masked = logits[name].masked_fill(~mask, float("-inf"))
        parts[name] = F.cross_entropy(masked, targets)
    total = sum(parts.values())
    return total, {f"loss_{k}": float(v.detach()) for k, v in parts.items()}
