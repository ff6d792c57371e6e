"""`mel-ray evaluate`: exact ranks of every mention of a split against EVERY KB entity, on Ray.

The KB is cut into contiguous shards, one Ray actor each; an actor memory-maps the node's entity features,
loads the model once, and for each streamed mention batch returns per-mention counts of entities ranked
before the gold one plus its local top-k (mel_ray/scoring.py). The driver sums counts and merges top-k lists, so the
result equals a full score matrix + stable sort, while no process ever holds mentions x KB scores.

Non-finite scores stop the evaluation: every shard scores all its batches, marking the mentions whose scores
are NaN or inf (mel_ray.scoring), and the driver raises a NonFiniteError naming the checkpoint, the split and
how many mentions were affected; no metric and no prediction file is written from such scores.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import pyarrow as pa
import torch

from mel_ray import storage
from mel_ray.checkpoints import build_model, load_checkpoint, require_matching_features
from mel_ray.dataset import load_dataset
from mel_ray.errors import NonFiniteError, UsageError
from mel_ray.feature_store import EntityStore, mention_tensors, read_manifest
from mel_ray.runtime import init_ray
from mel_ray.scoring import NonFiniteScores, chunks_of, describe_rows, merge_topk, metrics_from_ranks, rank_counts

log = logging.getLogger(__name__)
TOPK = 10


class KBShard:
    """One contiguous range of the KB; scores mention batches against it."""

    def __init__(self, features_uri: str, state: dict, start: int, stop: int, entity_chunk: int,
                 mention_batch: int, threads: int):
        torch.set_num_threads(threads)
        self.store = EntityStore(features_uri)
        self.model = build_model(state)
        self.start, self.stop = start, min(stop, self.store.num_entities)
        self.entity_chunk, self.mention_batch = entity_chunk, mention_batch

    def score(self, mentions: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray] | NonFiniteScores:
        """counts, top ids, top scores; or the NonFiniteScores (returned, not raised: the driver adds up every
        shard's and every batch's affected mentions before it stops)."""
        gold = self.store.gather(mentions["gold"].numpy())
        try:
            return rank_counts(self.model, mentions, gold,
                               chunks_of(self.store.chunk, self.start, self.stop, self.entity_chunk),
                               mention_batch=self.mention_batch, topk=TOPK)
        except NonFiniteScores as err:
            return err


def fit_shards(num_shards: int, cpus_per_shard: float, n_entities: int) -> int:
    """How many KB shards to start: at most one per entity and at most what the cluster can place at once.

    Every shard must be alive at the same time (each mention batch is scored by all of them), so shards x
    cpus_per_shard CPUs above the cluster's would wait for resources forever. Such a request is clamped to the
    shards that fit, with a printed note; a cluster that may grow (MEL_RAY_AUTOSCALING=1) is asked as given.
    A cluster where not even one shard fits is refused with one line (UsageError)."""
    import ray

    from mel_ray.runtime import cluster_may_grow

    if num_shards < 1:
        raise UsageError(f"evaluate: --shards must be at least 1 (got {num_shards})")
    wanted = min(num_shards, max(1, n_entities))
    if cluster_may_grow():
        return wanted
    node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    total = sum(node_cpus)
    # an actor lives on one node: count what each node can hold
    fits = sum(int((c + 1e-9) // cpus_per_shard) for c in node_cpus) if cpus_per_shard > 0 else wanted
    if fits < 1:
        raise UsageError(f"evaluate: one KB shard needs {cpus_per_shard:g} CPUs but the cluster has {total:g}; "
                         f"lower the CPUs per shard")
    if wanted > fits:
        print(f"[evaluate] {num_shards} shards x {cpus_per_shard:g} CPUs do not fit on this cluster of {total:g} "
              f"CPUs: using {fits} shards", flush=True)
        return fits
    return wanted


def shard_settings(train_cfg) -> dict:
    """evaluate()'s parallelism after a training run: train.num_workers KB shards of train.cpus_per_worker CPUs
    and train.torch_threads threads each (the resources training just gave back), with train's eval chunking."""
    t = train_cfg
    return {"num_shards": t.num_workers, "entity_chunk": t.eval_entity_chunk, "mention_batch": t.eval_mention_batch,
            "threads_per_shard": t.torch_threads, "cpus_per_shard": max(0.1, t.cpus_per_worker)}


def evaluate(dataset_uri: str, features_uri: str, checkpoint_uri: str, split: str = "test", *,
             output_uri: str | None = None, num_shards: int = 2, batch_size: int = 256, entity_chunk: int = 1024,
             mention_batch: int = 64, threads_per_shard: int = 1, cpus_per_shard: float = 1.0,
             candidates: int | None = None) -> dict:
    """checkpoint_uri: anything mel_ray.checkpoints.load_checkpoint takes (a Ray Train checkpoint folder,
    model.pt, an MLflow run holding one); it is validated on the driver before any shard starts.

    num_shards: KB shards (Ray actors of cpus_per_shard CPUs each), all alive at once. More than the cluster can
    place (or than there are entities) is clamped to what fits, with a printed `[evaluate] ...` note, instead of
    waiting for resources forever (`fit_shards`); less than 1 is refused.

    candidates: None = exact (the default); C = retrieve, then rerank (approximate; mel_ray/eval/candidates.py).

    Raises NonFiniteError (one line: checkpoint, split, how many mentions) when any score is NaN or inf."""
    import ray

    if candidates is not None:          # retrieve, then rerank: its own shards and loop
        from mel_ray.eval.candidates import evaluate_candidates

        return evaluate_candidates(dataset_uri, features_uri, checkpoint_uri, split, candidates,
                                   output_uri=output_uri, num_shards=num_shards, batch_size=batch_size,
                                   entity_chunk=entity_chunk, threads_per_shard=threads_per_shard,
                                   cpus_per_shard=cpus_per_shard)

    t0 = time.perf_counter()
    state = load_checkpoint(checkpoint_uri)     # validated here, before Ray and any shard starts
    require_matching_features(state, read_manifest(features_uri), features_uri, checkpoint_uri)
    state.pop("config")                     # the shards need weights and dims only
    state["model"] = build_model(state).state_dict()      # a fine-tuned encoder's weights stay here
    init_ray()
    ds = load_dataset(dataset_uri)
    n_entities = ds.num_entities
    mentions = mention_tensors(features_uri, dataset_uri, split)
    n = len(mentions["mention_id"])
    num_shards = fit_shards(num_shards, cpus_per_shard, n_entities)
    bounds = np.linspace(0, n_entities, num_shards + 1).astype(int)
    # "DEFAULT": the shards ask the cluster for their own CPUs even when called from inside a Tune trial,
    # whose placement group (sized for the trial's driver only) would otherwise capture them
    actor = ray.remote(num_cpus=cpus_per_shard, scheduling_strategy="DEFAULT")(KBShard)
    state_ref = ray.put(state)
    shards = [actor.remote(features_uri, state_ref, int(a), int(b), entity_chunk, mention_batch, threads_per_shard)
              for a, b in itertools.pairwise(bounds) if b > a]
    counts = np.zeros(n, dtype=np.int64)
    top_ids = np.zeros((n, min(TOPK, n_entities)), dtype=np.int64)
    top_scores = np.zeros((n, min(TOPK, n_entities)), dtype=np.float32)
    nonfinite = np.zeros(n, dtype=bool)
    for a in range(0, n, batch_size):
        b = min(n, a + batch_size)
        batch_ref = ray.put({k: v[a:b] for k, v in mentions.items() if isinstance(v, torch.Tensor)})
        parts = ray.get([s.score.remote(batch_ref) for s in shards])
        for part in parts:
            if isinstance(part, NonFiniteScores):
                nonfinite[a:b] |= part.mask
        if nonfinite.any():
            continue                        # only counted from now on: nothing computed from them is kept
        counts[a:b] = sum(p[0] for p in parts)
        top_ids[a:b], top_scores[a:b] = merge_topk([(p[1], p[2]) for p in parts], TOPK)
        log.info("evaluate %s: %d/%d mentions scored against %d entities", split, b, n, n_entities)
    if nonfinite.any():
        raise NonFiniteError(checkpoint_uri, f"split '{split}': {describe_rows(nonfinite)} got non-finite scores "
                             "(NaN or inf) against the KB; no metrics reported", rows=int(nonfinite.sum()))
    ranks = counts + 1
    metrics = metrics_from_ranks(ranks)
    seconds = time.perf_counter() - t0
    report = {"split": split, "mentions": n, "entities": n_entities, "metrics": metrics,
              "pairs_per_second": n * n_entities / max(seconds, 1e-9), "seconds": seconds,
              "shards": len(shards), "threads_per_shard": threads_per_shard,
              "tie_policy": "rank = 1 + #{score > gold} + #{score == gold and entity_id < gold_id}",
              "same_name_failures": same_name_failures(ds, mentions, top_ids)}
    if output_uri:
        write_predictions(output_uri, split, mentions, ranks, top_ids, top_scores, report)
    return report


def same_name_failures(ds, mentions: dict, top_ids: np.ndarray, examples: int = 20) -> dict:
    """Mentions whose top-1 is a different entity with the gold entity's name (paper Appendix C)."""
    names = ds.entities(columns=["name"]).column("name").to_pylist()
    gold = mentions["gold"].numpy()
    rows = [i for i in range(len(gold)) if top_ids.shape[1] and top_ids[i, 0] != gold[i]
            and names[top_ids[i, 0]] == names[gold[i]]]
    wrong = int(sum(1 for i in range(len(gold)) if top_ids.shape[1] and top_ids[i, 0] != gold[i]))
    return {"count": len(rows), "of_wrong_top1": wrong,
            "examples": [{"mention_id": mentions["mention_id"][i], "name": names[gold[i]],
                          "gold": int(gold[i]), "predicted": int(top_ids[i, 0])} for i in rows[:examples]]}


def write_predictions(output_uri: str, split: str, mentions: dict, ranks, top_ids, top_scores, report) -> None:
    table = pa.table({
        "mention_id": pa.array(mentions["mention_id"], pa.string()),
        "gold_entity_id": pa.array(mentions["gold"].numpy(), pa.int64()),
        "rank": pa.array(ranks, pa.int64()),
        "top_entity_ids": pa.array(list(top_ids), pa.list_(pa.int64())),
        "top_scores": pa.array(list(top_scores.astype(np.float32)), pa.list_(pa.float32())),
    })
    storage.write_table(storage.join(output_uri, f"predictions_{split}.parquet"), table)
    storage.write_json(storage.join(output_uri, f"eval_{split}.json"), report)


def format_table(report: dict) -> str:
    m = report["metrics"]
    keys = ["H@1", "H@3", "H@5", "H@10", "H@20", "MRR", "MR"]
    head = "| split | " + " | ".join(keys) + " |"
    sep = "|" + "---|" * (len(keys) + 1)
    row = f"| {report['split']} | " + " | ".join(
        f"{m[k]:.2f}" if k == "MR" else f"{100 * m[k]:.2f}" for k in keys) + " |"
    if report.get("approximate"):       # retrieve, then rerank: say so above the numbers
        from mel_ray.eval.candidates import approximate_line

        return f"{approximate_line(report)}\n{head}\n{sep}\n{row}"
    return f"{head}\n{sep}\n{row}"

