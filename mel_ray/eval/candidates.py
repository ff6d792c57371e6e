"""Retrieve, then rerank: approximate full-KB ranking for KBs too large to score every pair with the matcher
(`mel-ray evaluate --candidates C`, `mel-ray link --candidates C`; exact scoring stays the default).

The matcher's overall score is (s_T + s_V + s_C) / 3 with s_T = (g2l + g2g) / 2 (mel_ray/model/matcher.py), so

    overall = g2g / 6 + s_C / 3 + (g2l / 6 + s_V / 3)

and the first two terms are plain dot products of per-side vectors: g2g = <t_G,m, t_G,e> (after the input
LayerNorm) and s_C = <f_m, f_e> (CMFU's fused vectors). Scaled by 3:

    first stage  s1(m, e) = g2g / 2 + s_C = <[t_G,m / 2, f_m], [t_G,e, f_e]>

one matrix product of [mentions, Dtg + h] by [Dtg + h, entities]. The entity vectors are computed once per job
(per KB shard actor, per linker actor) and kept: entities x (Dtg + h) float32 (2.4 GB for 1M entities at CLIP
ViT-B/32 sizes, 0.4 GB with the tiny CLIP).

1. First stage: the WHOLE KB is ranked by s1 exactly, chunk by chunk (never mentions x KB in memory beyond a
   chunk); per mention the top C are kept with the project's tie rule (score descending, entity id ascending),
   merged exactly across chunks and shards.
2. Second stage: the C candidates are rescored with the full matcher, with the very kernel of exact scoring
   (`model.mention_side / entity_side / pair_logits`), and ordered by (full score desc, entity id asc).

The approximate ranking of a mention is: its C reranked candidates first, then the rest of the KB in first-stage
order (s1 desc, id asc). A gold entity among the candidates gets its position in the reranked list; a gold outside
them gets rank C + 1 + #{non-candidates ahead of it by s1}, which is its first-stage rank (> C). With C = KB size
the ranking is the exact one.

Non-finite scores (first stage or full matcher) are errors as in exact scoring: the affected mentions are counted
and NonFiniteScores (mel_ray.scoring) is raised; nothing computed from them is returned.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from mel_ray.errors import NonFiniteError, UsageError
from mel_ray.model import MELModel
from mel_ray.scoring import NonFiniteScores, count_before_gold, describe_rows, metrics_from_ranks

log = logging.getLogger(__name__)
FIRST_STAGE = "g2g/2 + s_C = <[t_G,m/2, f_m], [t_G,e, f_e]>"
RANK_RULE = ("the C candidates reranked by the full matcher (score desc, entity_id asc), then the rest of the KB "
             "by the first stage (score desc, entity_id asc); a gold outside the candidates gets its first-stage rank")
FIRST_STAGE_CHUNK = 65_536      # entities per first-stage matrix product: [mention batch, chunk] scores at once
RERANK_PAIRS = 4096             # mentions are reranked in groups of about RERANK_PAIRS / C mentions


# --------------------------------------------------------------------------------------- bad settings


def check_candidates(candidates: int, n_entities: int, setting: str) -> None:
    """One line naming the setting (UsageError, exit 2) for a count that cannot be a candidate list size."""
    if candidates < 1:
        raise UsageError(f"{setting} must be at least 1 (got {candidates})")
    if candidates > n_entities:
        raise UsageError(f"{setting} {candidates} is larger than the KB ({n_entities} entities)")


def check_link_candidates(candidates: int, top_k: int, n_entities: int) -> None:
    """link: also at least top_k, since the links are the reranked candidates."""
    check_candidates(candidates, n_entities, "link.candidates (--candidates)")
    if candidates < top_k:
        raise UsageError(f"link.candidates (--candidates) {candidates} is smaller than link.top_k (--top-k) {top_k}: "
                         "the links are the reranked candidates")


def approximate_fields(candidates: int | None) -> dict:
    """What a report says about how it ranked: nothing for exact scoring (the default)."""
    if candidates is None:
        return {}
    return {"approximate": True, "candidates": candidates, "first_stage": FIRST_STAGE, "rank_rule": RANK_RULE}


def approximate_line(report: dict) -> str:
    return (f"APPROXIMATE: top-{report['candidates']} first-stage candidates ({FIRST_STAGE}) reranked by the full "
            f"matcher; gold among the candidates for {100 * report['gold_in_candidates']:.2f}% of mentions")


# ------------------------------------------------------------------------------- first-stage vectors


def entity_vectors(model: MELModel, entities: dict) -> torch.Tensor:
    """[N, Dtg + h] = [t_G,e, f_e] of entity feature tensors: the same modules as model.entity_side."""
    side = model.entity_features(entities)
    return torch.cat([side.text_global, model.cmfu.fuse(side)], dim=1)


def mention_vectors(model: MELModel, mentions: dict) -> torch.Tensor:
    """[N, Dtg + h] = [t_G,m / 2, f_m] (after CVaCPT, as model.mention_side sees them)."""
    side = model.mention_features(mentions)
    return torch.cat([side.text_global / 2, model.cmfu.fuse(side)], dim=1)


@torch.no_grad()
def entity_vector_table(model: MELModel, chunks: Iterator[tuple[int, dict]]) -> torch.Tensor:
    """The first-stage vectors of a KB range, computed chunk by chunk (once per job)."""
    model.eval()
    device = next(model.parameters()).device
    parts = [entity_vectors(model, _tensors(chunk, device)) for _, chunk in chunks]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def _tensors(batch: dict, device: torch.device, a: int = 0, b: int | None = None) -> dict:
    return {k: v[a:b].to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------------ tie rule


def order_by_score_then_id(ids: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of [B, K] (ids, scores) sorted by score descending, ties by entity id ascending (two stable sorts)."""
    by_id = ids.argsort(dim=1, stable=True)
    ids, scores = ids.gather(1, by_id), scores.gather(1, by_id)
    by_score = scores.argsort(dim=1, descending=True, stable=True)
    return ids.gather(1, by_score), scores.gather(1, by_score)


def stable_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of [B, N] scores over entity ids [N] by (score desc, id asc), as [B, k'] (ids, scores), k' <= N.

    torch.topk picks arbitrarily among ties at the k-th value; rows where such a tie straddles the cut (rare)
    are sorted in full instead, so the kept set is always the tie rule's."""
    b, n = scores.shape
    k = min(k, n)
    all_ids = ids[None, :].expand(b, n)
    if k == n:
        return order_by_score_then_id(all_ids, scores)
    top = scores.topk(k, dim=1)
    kth = top.values[:, -1:]
    straddling = (scores >= kth).sum(dim=1) > k
    top_ids, top_scores = ids[top.indices], top.values
    if bool(straddling.any()):
        rows = straddling.nonzero().squeeze(1)
        full_ids, full_scores = order_by_score_then_id(all_ids[rows], scores[rows])
        top_ids, top_scores = top_ids.clone(), top_scores.clone()
        top_ids[rows], top_scores[rows] = full_ids[:, :k], full_scores[:, :k]
    return order_by_score_then_id(top_ids, top_scores)


def merge_candidates(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of several (ids, scores) top-k lists of disjoint entity sets (chunks, shards)."""
    ids, scores = order_by_score_then_id(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1))
    return ids[:, :k], scores[:, :k]


# ------------------------------------------------------------------------------------------ stage 1


@torch.no_grad()
def first_stage(mention_vecs: torch.Tensor, entity_vecs: torch.Tensor, first_id: int, candidates: int, *,
                gold_vecs: torch.Tensor | None = None, gold_ids: torch.Tensor | None = None,
                chunk: int = FIRST_STAGE_CHUNK) -> dict:
    """The top-`candidates` entities of a KB range (rows first_id.. of the KB) by s1, per mention.

    Returns {"ids", "scores"} [B, C'] (C' = min(C, range size)), "ahead" [B] (with gold: entities of the range
    ranked before the gold by s1 and the tie rule, else None), "gold_scores" [B] (s1 of the gold, or None) and
    "nonfinite" [B] (mentions with a NaN or inf s1 anywhere; their other outputs are meaningless)."""
    b, n = mention_vecs.shape[0], entity_vecs.shape[0]
    device = mention_vecs.device
    with_gold = gold_vecs is not None
    gold_scores = (mention_vecs * gold_vecs).sum(dim=1) if with_gold else None
    bad = torch.zeros(b, dtype=torch.bool, device=device) if not with_gold else ~torch.isfinite(gold_scores)
    ahead = torch.zeros(b, dtype=torch.long, device=device) if with_gold else None
    best: list[tuple[torch.Tensor, torch.Tensor]] = []
    for a in range(0, n, chunk):
        stop = min(n, a + chunk)
        scores = mention_vecs @ entity_vecs[a:stop].T
        ids = torch.arange(first_id + a, first_id + stop, device=device)
        finite = torch.isfinite(scores).all(dim=1)
        if not bool(finite.all()):
            bad |= ~finite
            # the marked rows are dropped by the caller; -inf keeps topk and the counts well defined meanwhile
            scores = torch.where(torch.isfinite(scores), scores, torch.tensor(float("-inf"), device=device))
        if with_gold:
            ahead += count_before_gold(scores, ids, gold_scores, gold_ids)
        best = [merge_candidates(best + [stable_topk(scores, ids, candidates)], candidates)]
    if not best:
        empty = torch.zeros(b, 0, device=device)
        best = [(empty.long(), empty)]
    return {"ids": best[0][0], "scores": best[0][1], "ahead": ahead, "gold_scores": gold_scores, "nonfinite": bad}


# ------------------------------------------------------------------------------------------ stage 2


@torch.no_grad()
def rerank(model: MELModel, mentions: dict, candidate_ids: np.ndarray, fetch: Callable[[np.ndarray], dict],
           *, pairs: int = RERANK_PAIRS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-matcher scores of each mention's candidates [B, C], reordered by (score desc, id asc).

    Mentions go in groups of about pairs / C; a group's candidates (deduplicated) get their entity side once and
    the group is scored against all of them with model.pair_logits (the exact kernel), each mention keeping its
    own columns. Returns (ids, scores, nonfinite [B])."""
    model.eval()
    device = next(model.parameters()).device
    b, c = candidate_ids.shape
    out_scores = np.zeros((b, c), dtype=np.float32)
    bad = np.zeros(b, dtype=bool)
    group = max(1, pairs // max(1, c))
    for a in range(0, b, group):
        stop = min(b, a + group)
        wanted = candidate_ids[a:stop]
        unique, columns = np.unique(wanted, return_inverse=True)
        ms = model.mention_side(model.mention_features(_tensors(mentions, device, a, stop)))
        es = model.entity_side(model.entity_features(_tensors(fetch(unique), device)))
        logits = model.pair_logits(ms, es)["overall"]                        # [group, unique]
        mine = logits.gather(1, torch.as_tensor(columns.reshape(stop - a, c), device=device)).cpu()
        bad[a:stop] = ~torch.isfinite(mine).all(dim=1).numpy()
        out_scores[a:stop] = mine.numpy()
    ids, scores = order_by_score_then_id(torch.as_tensor(candidate_ids), torch.as_tensor(out_scores))
    return ids.numpy(), scores.numpy(), bad


def approximate_ranks(reranked_ids: np.ndarray, first_ids: np.ndarray, first_scores: np.ndarray,
                      ahead: np.ndarray, gold_scores: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ranks [B], gold among the candidates [B]) under RANK_RULE.

    ahead: KB entities before the gold by s1 (all shards summed); first_ids / first_scores: the candidates with
    their s1. A gold outside the candidates follows all C of them and the non-candidates ahead of it by s1:
    rank = C + 1 + (ahead - candidates ahead), which is its first-stage rank (ahead + 1) whenever the candidates
    are s1's top C (they are: the subtraction only guards against rounding between two matrix products)."""
    c = reranked_ids.shape[1]
    hit = reranked_ids == gold[:, None]
    inside = hit.any(axis=1)
    position = hit.argmax(axis=1) + 1
    g_s, g_id = gold_scores[:, None], gold[:, None]
    candidates_ahead = ((first_scores > g_s) | ((first_scores == g_s) & (first_ids < g_id))).sum(axis=1)
    outside_rank = c + 1 + np.maximum(ahead - candidates_ahead, 0)
    return np.where(inside, position, outside_rank).astype(np.int64), inside


# ------------------------------------------------------------------------------------ one process


@torch.no_grad()
def score_with_candidates(model: MELModel, mentions: dict, entity_vecs: torch.Tensor,
                          fetch: Callable[[np.ndarray], dict], candidates: int, topk: int, *,
                          gold_features: dict | None = None, mention_batch: int = 256,
                          chunk: int = FIRST_STAGE_CHUNK) -> dict:
    """Both stages in this process against a whole KB whose first-stage vectors are `entity_vecs` (row = id).

    mentions: mention tensors (plus `gold` [N] when gold_features, the gold entities' tensors, are given).
    Returns {"top_ids", "top_scores"} [N, min(topk, C)], "candidates" [N, C] (first-stage order), and with gold
    "ranks" [N] (RANK_RULE) and "gold_in_candidates" [N]. Raises NonFiniteScores (which mentions)."""
    model.eval()
    device = next(model.parameters()).device
    n = next(v for v in mentions.values() if isinstance(v, torch.Tensor)).shape[0]
    c = min(candidates, entity_vecs.shape[0])
    k = min(topk, c)
    out = {"top_ids": np.zeros((n, k), dtype=np.int64), "top_scores": np.zeros((n, k), dtype=np.float32),
           "candidates": np.zeros((n, c), dtype=np.int64)}
    if gold_features is not None:
        out["ranks"], out["gold_in_candidates"] = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    bad = np.zeros(n, dtype=bool)
    for a, b in itertools.pairwise([*range(0, n, mention_batch), n]):
        vecs = mention_vectors(model, _tensors(mentions, device, a, b))
        gold_vecs = gold_ids = None
        if gold_features is not None:
            gold_vecs = entity_vectors(model, _tensors(gold_features, device, a, b))
            gold_ids = mentions["gold"][a:b].to(device)
        first = first_stage(vecs, entity_vecs, 0, c, gold_vecs=gold_vecs, gold_ids=gold_ids, chunk=chunk)
        first_ids = first["ids"].cpu().numpy()
        ids, scores, bad_full = rerank(model, _tensors(mentions, "cpu", a, b), first_ids, fetch)
        bad[a:b] = first["nonfinite"].cpu().numpy() | bad_full
        out["candidates"][a:b], out["top_ids"][a:b], out["top_scores"][a:b] = first_ids, ids[:, :k], scores[:, :k]
        if gold_features is not None:
            out["ranks"][a:b], out["gold_in_candidates"][a:b] = approximate_ranks(
                ids, first_ids, first["scores"].cpu().numpy(), first["ahead"].cpu().numpy(),
                first["gold_scores"].cpu().numpy(), mentions["gold"][a:b].numpy())
    if bad.any():
        raise NonFiniteScores(bad)
    return out


# --------------------------------------------------------------------------------- mel-ray evaluate


class CandidateShard:
    """A contiguous KB range for `evaluate --candidates`: its first-stage vectors are computed once, here;
    `first_stage` ranks a mention batch against the range, `rerank` rescores any mentions' candidates (every
    node memory-maps the whole KB, so any shard can fetch any candidate)."""

    def __init__(self, features_uri: str, state: dict, start: int, stop: int, entity_chunk: int, threads: int):
        from mel_ray.checkpoints import build_model
        from mel_ray.feature_store import EntityStore
        from mel_ray.scoring import chunks_of

        torch.set_num_threads(threads)
        self.store = EntityStore(features_uri)
        self.model = build_model(state)
        self.start, self.stop = start, min(stop, self.store.num_entities)
        self.vecs = entity_vector_table(self.model, chunks_of(self.store.chunk, self.start, self.stop,
                                                              entity_chunk))

    def first_stage(self, mentions: dict, candidates: int) -> dict:
        with torch.no_grad():
            gold = mentions["gold"]
            vecs = mention_vectors(self.model, _tensors(mentions, "cpu"))
            gold_vecs = entity_vectors(self.model, self.store.gather(gold.numpy()))
            first = first_stage(vecs, self.vecs, self.start, candidates, gold_vecs=gold_vecs, gold_ids=gold)
        return {k: None if v is None else v.numpy() for k, v in first.items()}

    def rerank(self, mentions: dict, candidate_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return rerank(self.model, mentions, candidate_ids, self.store.gather)


def evaluate_candidates(dataset_uri: str, features_uri: str, checkpoint_uri: str, split: str, candidates: int, *,
                        output_uri: str | None = None, num_shards: int = 2, batch_size: int = 256,
                        entity_chunk: int = 1024, threads_per_shard: int = 1, cpus_per_shard: float = 1.0) -> dict:
    """`mel-ray evaluate --candidates C`: approximate ranks (RANK_RULE) of a split against the whole KB.

    Per mention batch every KB shard returns its first-stage top C, its count of entities ahead of the gold by
    s1 and the gold's s1; the driver merges them exactly, then the batch's mentions are split over the shards
    for the rerank. The report says "approximate": true and how often the gold was among the candidates."""
    import ray

    from mel_ray.checkpoints import build_model, load_checkpoint, require_matching_features
    from mel_ray.dataset import load_dataset
    from mel_ray.eval.evaluate import TOPK, fit_shards, same_name_failures, write_predictions
    from mel_ray.feature_store import mention_tensors, read_manifest
    from mel_ray.runtime import init_ray

    t0 = time.perf_counter()
    state = load_checkpoint(checkpoint_uri)
    require_matching_features(state, read_manifest(features_uri), features_uri, checkpoint_uri)
    ds = load_dataset(dataset_uri)
    n_entities = ds.num_entities
    check_candidates(candidates, n_entities, "evaluate: --candidates")
    state.pop("config")
    state["model"] = build_model(state).state_dict()
    init_ray()
    mentions = mention_tensors(features_uri, dataset_uri, split)
    n = len(mentions["mention_id"])
    num_shards = fit_shards(num_shards, cpus_per_shard, n_entities)
    bounds = np.linspace(0, n_entities, num_shards + 1).astype(int)
    actor = ray.remote(num_cpus=cpus_per_shard, scheduling_strategy="DEFAULT")(CandidateShard)
    state_ref = ray.put(state)
    shards = [actor.remote(features_uri, state_ref, int(a), int(b), entity_chunk, threads_per_shard)
              for a, b in itertools.pairwise(bounds) if b > a]
    k = min(TOPK, candidates)
    ranks, inside = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    top_ids, top_scores = np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=np.float32)
    nonfinite = np.zeros(n, dtype=bool)
    for a in range(0, n, batch_size):
        b = min(n, a + batch_size)
        batch = {key: v[a:b] for key, v in mentions.items() if isinstance(v, torch.Tensor)}
        batch_ref = ray.put(batch)
        parts = ray.get([s.first_stage.remote(batch_ref, candidates) for s in shards])
        bad = np.logical_or.reduce([p["nonfinite"] for p in parts])
        first_ids, first_scores = merge_candidates([(writable_tensor(p["ids"]), writable_tensor(p["scores"]))
                                                    for p in parts], candidates)
        first_ids, first_scores = first_ids.numpy(), first_scores.numpy()
        # the rerank: the batch's mentions split evenly over the shards
        spans = [(x, y) for x, y in itertools.pairwise(np.linspace(0, b - a, len(shards) + 1).astype(int)) if y > x]
        reranked = ray.get([s.rerank.remote({key: v[x:y] for key, v in batch.items()}, first_ids[x:y])
                            for s, (x, y) in zip(shards, spans)])
        ids = np.concatenate([r[0] for r in reranked])
        scores = np.concatenate([r[1] for r in reranked])
        nonfinite[a:b] = bad | np.concatenate([r[2] for r in reranked])
        if nonfinite.any():
            continue                        # only counted from now on: nothing computed from them is kept
        ranks[a:b], inside[a:b] = approximate_ranks(ids, first_ids, first_scores, sum(p["ahead"] for p in parts),
                                                    parts[0]["gold_scores"], batch["gold"].numpy())
        top_ids[a:b], top_scores[a:b] = ids[:, :k], scores[:, :k]
        log.info("evaluate --candidates %d %s: %d/%d mentions", candidates, split, b, n)
    if nonfinite.any():
        raise NonFiniteError(checkpoint_uri, f"split '{split}': {describe_rows(nonfinite)} got non-finite scores "
                             "(NaN or inf) against the KB; no metrics reported", rows=int(nonfinite.sum()))
    seconds = time.perf_counter() - t0
    report = {"split": split, "mentions": n, "entities": n_entities, "metrics": metrics_from_ranks(ranks),
              **approximate_fields(candidates), "gold_in_candidates": float(inside.mean()) if n else float("nan"),
              "mentions_per_second": n / max(seconds, 1e-9), "seconds": seconds, "shards": len(shards),
              "threads_per_shard": threads_per_shard,
              "tie_policy": "score desc, entity_id asc (first stage and rerank alike)",
              "same_name_failures": same_name_failures(ds, mentions, top_ids)}
    if output_uri:
        write_predictions(output_uri, split, mentions, ranks, top_ids, top_scores, report)
    return report


# ------------------------------------------------------------------------------------- mel-ray link


class CandidateScorer:
    """`link --candidates C`'s Ray Data actor (in place of link.KBScorer): the KB's first-stage vectors are
    computed once when the actor starts; a mention batch -> its top-k of the reranked candidates."""

    def __init__(self, features_uri: str, state: dict, top_k: int, entity_chunk: int, threads: int,
                 candidates: int):
        from mel_ray.checkpoints import build_model
        from mel_ray.feature_store import EntityStore
        from mel_ray.scoring import chunks_of

        torch.set_num_threads(threads)
        self.store, self.model = EntityStore(features_uri), build_model(state)
        self.top_k, self.candidates = top_k, candidates
        self.vecs = entity_vector_table(self.model, chunks_of(self.store.chunk, 0, self.store.num_entities,
                                                              entity_chunk))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mentions = _link_batch_tensors(batch)
        n = len(batch["mention_id"])
        try:
            result = score_with_candidates(self.model, mentions, self.vecs, self.store.gather, self.candidates,
                                           self.top_k, mention_batch=max(1, n))
            ids, scores, nonfinite = result["top_ids"], result["top_scores"], np.zeros(n, dtype=bool)
        except NonFiniteScores as err:      # marked, not raised: the driver counts every batch's, then stops
            k = min(self.top_k, self.candidates)
            ids, scores, nonfinite = np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=np.float32), err.mask
        return {"mention_id": batch["mention_id"], "entity_ids": ids, "scores": scores, "stats": batch["stats"],
                "nonfinite": nonfinite}


def _link_batch_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A link batch (MentionEncoder's columns) as the model's mention tensors (as link.KBScorer reads them)."""
    from mel_ray.link import FLOAT_COLUMNS

    mentions = {k: writable_tensor(batch[k], np.float32) for k in FLOAT_COLUMNS}
    mentions["text_mask"] = writable_tensor(batch["text_mask"], bool)
    mentions["n_views"] = writable_tensor(batch["n_views"], np.int64)
    return mentions


def writable_tensor(array: np.ndarray, dtype: Any = None) -> torch.Tensor:
    """A tensor of `array`, copied: arrays from ray.get and Ray Data batches are read-only views of the object
    store, and torch.from_numpy on those prints a UserWarning (and would share memory torch may write to)."""
    return torch.from_numpy(np.array(array, dtype=dtype))
