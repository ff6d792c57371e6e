"""Scoring mentions against a KB (or a shard of it): exact ranks with a stated tie policy, and top-k lists,
without ever holding a mentions x KB matrix. Used by training's dev evaluation, `mel-ray evaluate` and
`mel-ray link` alike (one kernel, so link's top-k is evaluation's top-k).

    rank(m) = 1 + #{e : s(m,e) > s(m,gold)} + #{e : s(m,e) == s(m,gold) and e < gold}

which is the rank a stable descending sort of the full score row gives. A shard only needs the gold score to
count its part, so every shard scores its entities and the batch's gold entities in one call (the gold column
and the others come out of the same kernel) and returns per-mention counts plus its local top-k; summing counts
and merging top-k lists over shards is exact.

Loop order: entity chunks outside (their entity side, `model.entity_side`, is computed once per chunk),
mention batches inside (their mention side is computed once per call).

Non-finite scores are an error, never a rank: NaN compares false, so a NaN row would rank its gold first (a NaN
model would get H@1 100). Every scored block is checked with one `torch.isfinite(...).all()`; after the first
failure the kernel only counts the affected mentions through the remaining chunks and raises `NonFiniteScores`
(its `mask`: which mentions), which callers turn into a NonFiniteError naming the checkpoint or step and split.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mel_ray.errors import NonFiniteError
from mel_ray.model import MELModel

HITS_AT = (1, 3, 5, 10, 20)


# ------------------------------------------------------------------------------------ the tie policy


class NonFiniteScores(NonFiniteError):
    """Some mentions got a NaN or infinite score (against some entity or their gold): `mask` [N] marks them."""

    def __init__(self, mask: np.ndarray, what: str = "scores"):
        self.mask = np.asarray(mask, dtype=bool)
        super().__init__(what, f"{describe_rows(self.mask)} got non-finite scores (NaN or inf)",
                         rows=int(self.mask.sum()))


def describe_rows(mask: np.ndarray, noun: str = "mentions") -> str:
    return f"{int(np.sum(mask))} of {len(mask)} {noun}"


def check_finite(scores: np.ndarray, what: str = "scores") -> None:
    """Raise NonFiniteScores if any row of a [N, K] score array (a merged top-k, say) is not finite."""
    scores = np.asarray(scores)
    if scores.size and not np.isfinite(scores).all():
        raise NonFiniteScores(~np.isfinite(scores.reshape(len(scores), -1)).all(axis=1), what)


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


# ---------------------------------------------------------------------------------- chunked scoring


def _on(batch: dict, device: torch.device, a: int = 0, b: int | None = None) -> dict:
    """The tensors of rows [a, b) of a batch, on `device`."""
    return {k: v[a:b].to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _cat_sides(x: dict, y: dict) -> dict:
    return {unit: {k: torch.cat([x[unit][k], y[unit][k]]) for k in x[unit]} for unit in x}


@dataclass
class PreparedChunk:
    """An entity chunk whose entity side (`model.entity_side`) is already computed, on the model's device: what
    a KB shard keeps between mention batches (mel_ray.eval.evaluate's cache) so that it is computed once per
    evaluation, not once per call. `rank_counts` takes it where it takes a chunk's raw features."""

    rows: int
    side: dict

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for unit in self.side.values() for t in unit.values())


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a scorer's work runs: its weights' device (a scorer without weights, the zero-shot one, has a buffer)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def prepare_chunk(model: MELModel, chunk: dict) -> PreparedChunk:
    device = model_device(model)
    model.eval()
    with torch.no_grad():
        side = model.entity_side(model.entity_features(_on(chunk, device)))
    return PreparedChunk(_rows(chunk), side)


class EntitySides:
    """The entity chunks [start, stop) of a KB (`fetch(a, b)` -> raw features), each handed out as a
    PreparedChunk; the first ones are kept up to `budget` bytes, the rest recomputed at every pass. What a KB
    scorer holds between mention batches (evaluate's shards, link's scorers), so that an entity side is computed
    once per process instead of once per batch; budget 0 keeps nothing. The model must not change between passes
    (it is given at the first one and kept)."""

    def __init__(self, fetch: Callable[[int, int], dict], start: int, stop: int, size: int, budget: int):
        self.fetch, self.start, self.stop, self.size, self.budget = fetch, start, stop, size, budget
        self.kept: dict[int, PreparedChunk] = {}
        self.kept_bytes = 0

    def chunks(self, model: MELModel) -> Iterator[tuple[int, PreparedChunk]]:
        for a in range(self.start, self.stop, self.size):
            if a in self.kept:
                yield a, self.kept[a]
                continue
            prepared = prepare_chunk(model, self.fetch(a, min(self.stop, a + self.size)))
            if self.kept_bytes + prepared.nbytes <= self.budget:
                self.kept[a] = prepared
                self.kept_bytes += prepared.nbytes
            yield a, prepared


def _rows(chunk: dict) -> int:
    return next(v for v in chunk.values() if isinstance(v, torch.Tensor)).shape[0]


@torch.no_grad()
def rank_counts(model: MELModel, mentions: dict, gold_features: dict | None,
                entity_chunks: Iterator[tuple[int, dict]], *, mention_batch: int = 64,
                topk: int = 10) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Per mention: #entities of the given chunks ranked before its gold, and the chunks' top-k (ids, scores).

    mentions: tensors of N mentions plus `gold` [N]; gold_features: entity tensors of those gold entities
    (row i = gold of mention i), or None for top-k only (new mentions, no gold: counts is then None);
    entity_chunks yields (first entity id, entity tensors) covering the KB part (or (entity ids [C], tensors) for
    rows that are not consecutive); a PreparedChunk may stand for the tensors (its entity side already
    computed). Inputs may live on the CPU (they come from Arrow / memory maps); the work runs where the model's
    weights are (a GPU during GPU training, a GPU shard's) and the results come back as numpy.
    Raises NonFiniteScores (which mentions) if any score of a mention, its gold's included, is NaN or inf.
    """
    model.eval()
    device = model_device(model)
    n = next(v for v in mentions.values() if isinstance(v, torch.Tensor)).shape[0]
    bounds = list(range(0, n, mention_batch)) + [n]
    spans = list(itertools.pairwise(bounds))
    mention_sides = [model.mention_side(model.mention_features(_on(mentions, device, a, b))) for a, b in spans]
    gold_sides = None if gold_features is None else \
        [model.entity_side(model.entity_features(_on(gold_features, device, a, b))) for a, b in spans]
    gold_ids = None if gold_features is None else mentions["gold"].to(device)
    counts = None if gold_features is None else np.zeros(n, dtype=np.int64)
    tops: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in spans]
    bad: np.ndarray | None = None            # set at the first non-finite block: from then on only counted
    for first_id, chunk in entity_chunks:
        prepared = chunk if isinstance(chunk, PreparedChunk) else prepare_chunk(model, chunk)
        n_chunk, chunk_side = prepared.rows, prepared.side
        # local_topk works in numpy; a chunk is rows first_id.. of the KB, or the rows of given entity ids
        ids_cpu = torch.arange(first_id, first_id + n_chunk) if isinstance(first_id, int) else \
            torch.as_tensor(first_id, dtype=torch.long)
        ids = ids_cpu.to(device)
        for j, (a, b) in enumerate(spans):
            if gold_sides is None:
                scores = logits = model.pair_logits(mention_sides[j], chunk_side)["overall"]
            else:
                logits = model.pair_logits(mention_sides[j], _cat_sides(chunk_side, gold_sides[j]))["overall"]
                scores = logits[:, :n_chunk]
            if bad is not None or not bool(torch.isfinite(logits).all()):
                bad = np.zeros(n, dtype=bool) if bad is None else bad
                bad[a:b] |= (~torch.isfinite(logits).all(dim=1)).cpu().numpy()
                continue
            if gold_sides is not None:
                rows = torch.arange(b - a, device=device)
                gold_scores = logits[rows, n_chunk + rows]
                counts[a:b] += count_before_gold(scores, ids, gold_scores, gold_ids[a:b]).cpu().numpy()
            tops[j] = [merge_topk(tops[j] + [local_topk(scores.cpu(), ids_cpu, topk)], topk)]
    if bad is not None:
        raise NonFiniteScores(bad)
    top_ids = np.concatenate([t[0][0] for t in tops]) if n else np.zeros((0, topk), dtype=np.int64)
    top_scores = np.concatenate([t[0][1] for t in tops]) if n else np.zeros((0, topk), dtype=np.float32)
    return counts, top_ids, top_scores


def chunks_of(fetch: Callable[[int, int], dict], start: int, stop: int, size: int) -> Iterator[tuple[int, dict]]:
    for a in range(start, stop, size):
        yield a, fetch(a, min(stop, a + size))
