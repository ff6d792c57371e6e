"""The worker side of end-to-end training (`model.encoder: finetune`): candidates of a step, and the exact dev
evaluation with the encoder's current weights.

Dev evaluation re-encodes the KB with the weights as they are now and still ranks every dev mention against
every entity, without any process holding the whole KB's features:

1. rank r encodes dev rows r::world (mentions and their gold entities) into CLIP features;
2. the ranks all-gather those features, so every rank holds all dev mentions (small: dev is a split, not the KB);
3. rank r encodes its contiguous slice of the KB chunk by chunk (Ray Data decodes the images on CPU tasks) and
   counts, per dev mention, its slice's entities ranked before the gold (mel_ray.scoring.rank_counts, the
   evaluation kernel, on features: `MELModel.on_features`);
4. the ranks sum the counts: rank = 1 + total, exactly what one process scoring the whole KB gives.
"""

from __future__ import annotations

import numpy as np
import torch

from mel_ray.train import inputs as finetune_inputs


class CandidateStore:
    """train_step's entity source for one batch: the candidates its rows carried (gold + pool head)."""

    def __init__(self, candidates: dict):
        self.candidates = candidates

    def gather(self, ids: np.ndarray) -> dict:
        return finetune_inputs.entities(self.candidates, ids)


def pools_of(gold: np.ndarray, candidates: dict) -> dict[int, np.ndarray]:
    """gold entity id -> the pool head its row carried (cand_ids after the gold), as train_step reads pools."""
    return {int(g): row[1:] for g, row in zip(gold, candidates["ids"])}


def kb_slice(num_entities: int, rank: int, world: int) -> tuple[int, int]:
    """Rank r's contiguous part of the KB (every entity in exactly one part)."""
    return num_entities * rank // world, num_entities * (rank + 1) // world


@torch.no_grad()
def _encode(encoder, batch: dict, device: torch.device) -> dict:
    return {k: v.float().cpu() for k, v in encoder({k: v.to(device) for k, v in batch.items()
                                                           if k not in ("gold", "entity_id")}).items()
            if v.is_floating_point() or k == "n_views"}


def dev_statistics(core, dev, kb, decode: dict, rank: int, world: int, cfg: dict,
                   device: torch.device, n_stats: int) -> torch.Tensor:
    """[n, sum 1/rank, sum rank, hits@k..., non-finite rows] over ALL dev mentions (identical on every rank).

    dev, kb: the Arrow reference tables (mel_ray.train.inputs); every rank must call this at the same time."""
    import ray.data

    from mel_ray.scoring import HITS_AT, NonFiniteScores, rank_counts
    from mel_ray.train.global_batch import gather_rows

    ray.data.DataContext.get_current().enable_progress_bars = False    # per evaluation datasets: no bars per rank
    core.eval()
    encoder = core.encoder          # the KB chunks are encoded lazily, inside core.on_features()
    mine = dev.take(np.arange(rank, dev.num_rows, world))
    mention_parts, gold_parts, gold_ids = [], [], []
    if mine.num_rows:
        for batch in finetune_inputs.decoded(mine, decode).iter_batches(batch_size=cfg["eval_mention_batch"],
                                                                        batch_format="numpy"):
            mentions, candidates = finetune_inputs.to_tensors(batch, decode)
            mention_parts.append(_encode(encoder, mentions, device))
            gold_parts.append(_encode(encoder, finetune_inputs.entities(candidates, mentions["gold"].numpy()), device))
            gold_ids.append(mentions["gold"])
    mentions = _gathered(mention_parts, gather_rows, device)
    gold = _gathered(gold_parts, gather_rows, device)
    mentions["gold"] = gather_rows(torch.cat(gold_ids).to(device), grad=False).cpu()
    n = len(mentions["gold"])

    lo, hi = kb_slice(kb.num_rows, rank, world)

    def chunks():
        part = kb.slice(lo, hi - lo)
        if not part.num_rows:
            return
        for batch in finetune_inputs.decoded(part, decode).iter_batches(batch_size=cfg["eval_entity_chunk"],
                                                                        batch_format="numpy"):
            rows, _ = finetune_inputs.to_tensors(batch, decode)
            yield rows["entity_id"].numpy(), _encode(encoder, rows, device)

    counts = np.zeros(n, dtype=np.int64)
    bad = np.zeros(n, dtype=bool)
    with core.on_features():
        try:
            part, _, _ = rank_counts(core, mentions, gold, chunks(), mention_batch=cfg["eval_mention_batch"])
            counts += part
        except NonFiniteScores as err:
            bad |= err.mask
    totals = torch.from_numpy(np.stack([counts, bad.astype(np.int64)])).to(device)
    if world > 1:
        torch.distributed.all_reduce(totals)
    counts, bad = totals[0].cpu().numpy(), totals[1].cpu().numpy() > 0
    stats = torch.zeros(n_stats, dtype=torch.float64)
    if bad.any():
        stats[-1] = float(bad.sum())
        return stats
    ranks = counts.astype(np.float64) + 1
    stats[:-1] = torch.tensor([len(ranks), (1 / ranks).sum(), ranks.sum(), *[(ranks <= k).sum() for k in HITS_AT]],
                              dtype=torch.float64)
    return stats


def _gathered(parts: list[dict], gather_rows, device: torch.device) -> dict:
    """Concatenate this rank's encoded batches, then all-gather every tensor (rank order; on the worker's device,
    as NCCL wants)."""
    keys = sorted(parts[0]) if parts else None
    # every rank must gather the same keys in the same order, even a rank with no rows
    if keys is None:
        raise RuntimeError("dev evaluation: a rank got no dev rows; use fewer workers than dev mentions")
    return {k: gather_rows(torch.cat([p[k] for p in parts]).to(device), grad=False).cpu() for k in keys}
