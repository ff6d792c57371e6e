"""Scoring mentions against a KB (or a shard of it) without ever holding a mentions x KB matrix.

Outer loop: entity chunks, whose entity-side work (model.entity_side) is done once per chunk. Inner loop:
mention batches, whose mention side is computed once per evaluation. Each call scores a mention batch
against [chunk entities ; the batch's gold entities], so a mention's gold score comes out of the same kernel
as the scores it is compared with (see ranking.py for the exact tie policy).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch

from mel_ray.eval.ranking import count_before_gold, local_topk, merge_topk
from mel_ray.model import MELModel


def _on(batch: dict, device: torch.device, a: int = 0, b: int | None = None) -> dict:
    """The tensors of rows [a, b) of a batch, on `device`."""
    return {k: v[a:b].to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _cat_sides(x: dict, y: dict) -> dict:
    return {unit: {k: torch.cat([x[unit][k], y[unit][k]]) for k in x[unit]} for unit in x}


@torch.no_grad()
def rank_counts(model: MELModel, mentions: dict, gold_features: dict,
                entity_chunks: Iterator[tuple[int, dict]], *, mention_batch: int = 64,
                topk: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per mention: #entities of the given chunks ranked before its gold, and the chunks' top-k (ids, scores).

    mentions: tensors of N mentions plus `gold` [N]; gold_features: entity tensors of those gold entities
    (row i = gold of mention i); entity_chunks yields (first entity id, entity tensors) covering the KB part.
    Inputs may live on the CPU (they come from Arrow / memory maps); the work runs where the model's weights are
    (a GPU during GPU training) and the results come back as numpy.
    """
    model.eval()
    device = next(model.parameters()).device
    n = mentions["gold"].shape[0]
    bounds = list(range(0, n, mention_batch)) + [n]
    spans = list(itertools.pairwise(bounds))
    mention_sides = [model.mention_side(model.mention_features(_on(mentions, device, a, b))) for a, b in spans]
    gold_sides = [model.entity_side(model.entity_features(_on(gold_features, device, a, b))) for a, b in spans]
    gold_ids = mentions["gold"].to(device)
    counts = np.zeros(n, dtype=np.int64)
    tops: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in spans]
    for first_id, chunk in entity_chunks:
        n_chunk = chunk["text_global"].shape[0]
        chunk_side = model.entity_side(model.entity_features(_on(chunk, device)))
        ids_cpu = torch.arange(first_id, first_id + n_chunk)     # local_topk works in numpy
        ids = ids_cpu.to(device)
        for j, (a, b) in enumerate(spans):
            logits = model.pair_logits(mention_sides[j], _cat_sides(chunk_side, gold_sides[j]))["overall"]
            scores = logits[:, :n_chunk]
            rows = torch.arange(b - a, device=device)
            gold_scores = logits[rows, n_chunk + rows]
            counts[a:b] += count_before_gold(scores, ids, gold_scores, gold_ids[a:b]).cpu().numpy()
            tops[j] = [merge_topk(tops[j] + [local_topk(scores.cpu(), ids_cpu, topk)], topk)]
    top_ids = np.concatenate([t[0][0] for t in tops]) if n else np.zeros((0, topk), dtype=np.int64)
    top_scores = np.concatenate([t[0][1] for t in tops]) if n else np.zeros((0, topk), dtype=np.float32)
    return counts, top_ids, top_scores


def chunks_of(fetch: Callable[[int, int], dict], start: int, stop: int, size: int) -> Iterator[tuple[int, dict]]:
    for a in range(start, stop, size):
        yield a, fetch(a, min(stop, a + size))
