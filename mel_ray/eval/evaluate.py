"""`mel-ray evaluate`: exact ranks of every mention of a split against EVERY KB entity, on Ray.

The KB is cut into contiguous shards, one Ray actor each; an actor memory-maps the node's entity features,
loads the model once, and for each streamed mention batch returns per-mention counts of entities ranked
before the gold one plus its local top-k (mel_ray/scoring.py). The driver sums counts and merges top-k lists, so the
result equals a full score matrix + stable sort, while no process ever holds mentions x KB scores.

The ranker is the trained model (a checkpoint), or with ranker="zero-shot" the encoder alone: the cosine of the
feature set's global vectors (mel_ray/eval/zero_shot.py), through the same shards, tie policy, metrics and files.

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
from mel_ray.scoring import (
    EntitySides,
    NonFiniteScores,
    describe_rows,
    merge_topk,
    metrics_from_ranks,
    prepare_chunk,
    rank_counts,
)

log = logging.getLogger(__name__)
TOPK = 10


MAX_SHARD_RESTARTS = 3          # a shard process that dies is restarted (and its queued batches re-run) this often


class KBShard:
    """One contiguous range of the KB; scores mention batches against it.

    Its entity sides (every unit's entity part, mel_ray.scoring.PreparedChunk) are computed at the first batch
    and kept for the next ones, up to `cache_bytes`; chunks beyond the budget are recomputed per batch
    (streamed). The model stays fp32 on a GPU too (TF32 off): the tie policy compares scores exactly."""

    def __init__(self, features_uri: str, start: int, stop: int, entity_chunk: int, mention_batch: int,
                 threads: int, cache_bytes: int = 0, use_gpu: bool = False, ranker: str = "model"):
        import os

        from mel_ray.eval.zero_shot import RANKER, EntityGlobals

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if use_gpu:
            torch.set_float32_matmul_precision("highest")
        self.store = EntityStore(features_uri)
        self.model = None                    # built from the first batch's state (see `score`)
        self.start, self.stop = start, min(stop, self.store.num_entities)
        self.mention_batch = mention_batch
        # the zero-shot ranker reads only the global vectors and has_image of the same memory-mapped entities
        rows = EntityGlobals(self.store) if ranker == RANKER else self.store
        self.gather = rows.gather
        self.sides = EntitySides(rows.chunk, self.start, self.stop, entity_chunk, cache_bytes)
        self.pid = os.getpid()               # a restarted shard is a new process: the driver counts restarts by it

    def score(self, mentions: dict, state_box: list) -> tuple[int, tuple | NonFiniteScores]:
        """(this process's pid, counts / top ids / top scores, or the NonFiniteScores: returned, not raised, so
        that the driver adds up every shard's and every batch's affected mentions before it stops).

        state_box = [object ref of the weights and dims]: boxed so that Ray does not resolve it for every call;
        the shard builds its model at its first call, also after a restart. (Not a constructor argument: Ray
        warns at error level about restartable actors whose constructor arguments live in the object store.)"""
        import ray

        if self.model is None:
            self.model = build_scorer(ray.get(state_box[0])).to(self.device).eval()
        gold = self.gather(mentions["gold"].numpy())
        try:
            return self.pid, rank_counts(self.model, mentions, gold, self.sides.chunks(self.model),
                                         mention_batch=self.mention_batch, topk=TOPK)
        except NonFiniteScores as err:
            return self.pid, err


def build_scorer(state: dict):
    """What a KB shard scores with: the checkpoint's model, or the zero-shot scorer (zero_shot.zero_shot_state)."""
    from mel_ray.eval.zero_shot import RANKER, ZeroShotScorer

    return ZeroShotScorer().eval() if state.get("ranker") == RANKER else build_model(state)


def side_bytes_per_entity(state: dict, features_uri: str) -> int:
    """Memory of one entity's side (all units' entity parts, fp32): what eval.cache_gb is measured against."""
    from mel_ray.eval.zero_shot import RANKER, EntityGlobals

    store = EntityStore(features_uri)
    rows = EntityGlobals(store) if state.get("ranker") == RANKER else store
    return prepare_chunk(build_scorer(state), rows.chunk(0, min(1, store.num_entities))).nbytes


def cache_budget(cache_gb: float, entity_chunk: int, per_entity: int, command: str = "evaluate") -> int:
    """eval.cache_gb in bytes; 0 turns the cache off; a budget that cannot hold one chunk is a mistake."""
    budget = int(cache_gb * 2**30)
    if 0 < budget < per_entity * entity_chunk:
        need = per_entity * entity_chunk / 2**30
        raise UsageError(f"{command}: eval.cache_gb={cache_gb:g} cannot hold one entity chunk of {entity_chunk} "
                         f"entities ({need:.3g} GiB of entity sides); raise it, or set 0 to recompute every batch")
    return budget


def fit_shards(num_shards: int, cpus_per_shard: float, n_entities: int, gpus_per_shard: float = 0.0) -> int:
    """How many KB shards to start: at most one per entity and at most what the cluster can place at once.

    Every shard must be alive at the same time (each mention batch is scored by all of them), so shards x
    cpus_per_shard CPUs (or GPUs) above the cluster's would wait for resources forever. Such a request is clamped
    to the shards that fit, with a printed note; a cluster that may grow (MEL_RAY_AUTOSCALING=1) is asked as given.
    A cluster where not even one shard fits is refused with one line (UsageError)."""
    import ray

    from mel_ray.runtime import cluster_may_grow

    if num_shards < 1:
        raise UsageError(f"evaluate: --shards must be at least 1 (got {num_shards})")
    wanted = min(num_shards, max(1, n_entities))
    if cluster_may_grow():
        return wanted
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    total = sum(node.get("CPU", 0.0) for node in nodes)

    def per_node(resource: str, need: float, node: dict) -> int:
        return int((node.get(resource, 0.0) + 1e-9) // need) if need > 0 else wanted

    # an actor lives on one node: count what each node can hold of both its CPUs and its GPUs
    fits = sum(min(per_node("CPU", cpus_per_shard, node), per_node("GPU", gpus_per_shard, node)) for node in nodes)
    if fits < 1:
        raise UsageError(f"evaluate: one KB shard needs {cpus_per_shard:g} CPUs but the cluster has {total:g}; "
                         f"lower the CPUs per shard")
    if wanted > fits:
        print(f"[evaluate] {num_shards} shards x {cpus_per_shard:g} CPUs"
              + (f" x {gpus_per_shard:g} GPUs" if gpus_per_shard else "")
              + f" do not fit on this cluster of {total:g} CPUs: using {fits} shards", flush=True)
        return fits
    return wanted


def shard_settings(cfg) -> dict:
    """evaluate()'s settings after a training run: train.num_workers KB shards of train.cpus_per_worker CPUs
    and train.torch_threads threads each (the resources training just gave back), with train's eval chunking
    and the eval section (GPUs, cache, batches in flight)."""
    t, e = cfg.train, cfg.eval
    return {"num_shards": t.num_workers, "entity_chunk": t.eval_entity_chunk, "mention_batch": t.eval_mention_batch,
            "threads_per_shard": t.torch_threads, "cpus_per_shard": max(0.1, t.cpus_per_worker),
            **eval_settings(e)}


def eval_settings(e) -> dict:
    return {"num_gpus": e.num_gpus, "cache_gb": e.cache_gb, "in_flight": e.in_flight, "batch_size": e.batch_size}


class _Batch:
    """What the driver holds for one mention batch until every shard has scored it: its object ref and the
    shards' parts (counts and a top-k each: a batch's worth, never a score matrix)."""

    def __init__(self, a: int, b: int, ref):
        self.a, self.b, self.ref, self.parts = a, b, ref, []


def evaluate(dataset_uri: str, features_uri: str, checkpoint_uri: str | None, split: str = "test", *,
             output_uri: str | None = None, num_shards: int = 2, batch_size: int = 256, entity_chunk: int = 1024,
             mention_batch: int = 64, threads_per_shard: int = 1, cpus_per_shard: float = 1.0,
             num_gpus: float | str = "auto", cache_gb: float = 1.0, in_flight: int = 2,
             progress=None, candidates: int | None = None, ranker: str = "model") -> dict:
    """checkpoint_uri: anything mel_ray.checkpoints.load_checkpoint takes (a Ray Train checkpoint folder,
    model.pt, an MLflow run holding one); it is validated on the driver before any shard starts.

    ranker: "model" (the checkpoint's) or "zero-shot": no checkpoint (None), the cosine of the set's global
    vectors (mel_ray/eval/zero_shot.py); the report then says `"ranker": "zero-shot"` and names the encoder. A set
    without global vectors is refused with one line.

    num_shards: KB shards (Ray actors of cpus_per_shard CPUs and num_gpus GPUs each: eval.num_gpus, "auto" = 1
    where the cluster has GPUs), all alive at once. More than the cluster can place (or than there are
    entities) is clamped to what fits, with a printed `[evaluate] ...` note, instead of waiting for resources
    forever (`fit_shards`); less than 1 is refused.

    Pipelined: each shard has up to `in_flight` mention batches queued and works through them at its own pace
    (no wait for the slowest shard after every batch); a batch's counts and top-k are merged as soon as every
    shard has returned it, and a shard runs at most 2 x in_flight batches ahead of the oldest unmerged one. A
    shard process that dies is restarted by Ray and its queued batches re-run (same results: scoring is a pure
    function of the weights and features); the report counts `shard_restarts`. progress(done, total), if given,
    is called after each merged batch.

    candidates: None = exact (the default); C = retrieve, then rerank (approximate; mel_ray/eval/candidates.py).

    Raises NonFiniteError (one line: checkpoint, split, how many mentions) when any score is NaN or inf."""
    import ray

    from mel_ray.eval import zero_shot
    from mel_ray.runtime import device_note, resolve_num_gpus

    if ranker not in zero_shot.RANKERS:
        raise UsageError(f"evaluate: ranker {ranker!r}: expected one of {', '.join(zero_shot.RANKERS)}")
    if ranker == zero_shot.RANKER and checkpoint_uri is not None:
        raise UsageError("evaluate: the zero-shot ranker uses no checkpoint; give either a checkpoint or zero-shot")
    if ranker == zero_shot.MODEL and checkpoint_uri is None:
        raise UsageError("evaluate: no checkpoint to evaluate (give one, or rank zero-shot)")
    if ranker == zero_shot.RANKER and candidates is not None:
        raise UsageError("evaluate: --candidates reranks with a trained matcher; the zero-shot ranking is exact "
                         "and cheap, leave --candidates out")
    if candidates is not None:          # retrieve, then rerank: its own shards and loop
        from mel_ray.eval.candidates import evaluate_candidates

        return evaluate_candidates(dataset_uri, features_uri, checkpoint_uri, split, candidates,
                                   output_uri=output_uri, num_shards=num_shards, batch_size=batch_size,
                                   entity_chunk=entity_chunk, threads_per_shard=threads_per_shard,
                                   cpus_per_shard=cpus_per_shard)

    t0 = time.perf_counter()
    if in_flight < 1:
        raise UsageError(f"evaluate: eval.in_flight must be at least 1 (got {in_flight})")
    if ranker == zero_shot.RANKER:
        state = zero_shot.zero_shot_state(features_uri)       # a set without global vectors: one line, here
        source = f"zero-shot ranking of {features_uri}"
    else:
        state = load_checkpoint(checkpoint_uri)     # validated here, before Ray and any shard starts
        require_matching_features(state, read_manifest(features_uri), features_uri, checkpoint_uri)
        state.pop("config")                     # the shards need weights and dims only
        state["model"] = build_model(state).state_dict()      # a fine-tuned encoder's weights stay here
        source = checkpoint_uri
    cache_bytes = cache_budget(cache_gb, entity_chunk, side_bytes_per_entity(state, features_uri))
    init_ray()
    num_gpus = resolve_num_gpus("evaluate", num_gpus, "eval.num_gpus")
    ds = load_dataset(dataset_uri)
    n_entities = ds.num_entities
    mentions = (zero_shot.mention_globals if ranker == zero_shot.RANKER else mention_tensors)(
        features_uri, dataset_uri, split)
    n = len(mentions["mention_id"])
    num_shards = fit_shards(num_shards, cpus_per_shard, n_entities, num_gpus)
    bounds = np.linspace(0, n_entities, num_shards + 1).astype(int)
    # "DEFAULT": the shards ask the cluster for their own CPUs even when called from inside a Tune trial,
    # whose placement group (sized for the trial's driver only) would otherwise capture them
    actor = ray.remote(num_cpus=cpus_per_shard, num_gpus=num_gpus, scheduling_strategy="DEFAULT",
                       max_restarts=MAX_SHARD_RESTARTS, max_task_retries=MAX_SHARD_RESTARTS)(KBShard)
    state_ref = ray.put(state)
    shards = [actor.remote(features_uri, int(a), int(b), entity_chunk, mention_batch, threads_per_shard,
                           cache_bytes, num_gpus > 0, ranker)
              for a, b in itertools.pairwise(bounds) if b > a]
    log.info("evaluate %s: %d mentions x %d entities on %d shards (%s, entity-side cache %.2f GiB each)", split,
             n, n_entities, len(shards), device_note(num_gpus), cache_bytes / 2**30)
    counts = np.zeros(n, dtype=np.int64)
    top_ids = np.zeros((n, min(TOPK, n_entities)), dtype=np.int64)
    top_scores = np.zeros((n, min(TOPK, n_entities)), dtype=np.float32)
    nonfinite = np.zeros(n, dtype=bool)
    spans = [(a, min(n, a + batch_size)) for a in range(0, n, batch_size)]
    batches: dict[int, _Batch] = {}          # submitted, not yet merged
    next_of = [0] * len(shards)              # the next batch each shard gets
    pending: dict = {}                       # object ref -> (shard, batch)
    pids: list[set[int]] = [set() for _ in shards]
    oldest = 0                               # the first batch not yet merged

    queued = [0] * len(shards)

    def submit(s: int) -> None:
        """Queue shard s's next batches until it has in_flight queued or would run too far ahead of the oldest.
        (A loop, not recursion: a self-referencing closure would keep the shard handles, and so the shards'
        CPUs, alive after evaluate() returns, until Python's cycle collector happened to run.)"""
        while queued[s] < in_flight and next_of[s] < len(spans) and next_of[s] < oldest + 2 * in_flight:
            j = next_of[s]
            if j not in batches:
                a, b = spans[j]
                batches[j] = _Batch(a, b, ray.put({k: v[a:b] for k, v in mentions.items()
                                                   if isinstance(v, torch.Tensor)}))
            pending[shards[s].score.remote(batches[j].ref, [state_ref])] = (s, j)
            next_of[s] += 1
            queued[s] += 1

    try:
        for s in range(len(shards)):
            submit(s)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            s, j = pending.pop(ref)
            queued[s] -= 1
            try:
                pid, part = ray.get(ref)
            except ray.exceptions.RayActorError as err:     # restarted MAX_SHARD_RESTARTS times and died again
                raise RuntimeError(f"evaluate: KB shard {s} (entities {bounds[s]}..{bounds[s + 1] - 1}) died more than "
                                   f"{MAX_SHARD_RESTARTS} times; last: {str(err).splitlines()[0][:200]}") from err
            pids[s].add(pid)
            batches[j].parts.append(part)
            while oldest in batches and len(batches[oldest].parts) == len(shards):
                done = batches.pop(oldest)
                _merge(done, counts, top_ids, top_scores, nonfinite)
                oldest += 1
                log.info("evaluate %s: %d/%d mentions scored against %d entities", split, done.b, n, n_entities)
                if progress is not None:
                    progress(oldest, len(spans))
            for t in range(len(shards)):         # refill this shard's queue, and any the window held back
                submit(t)
    finally:
        for shard in shards:        # their CPUs (GPUs) go back now, not whenever the handles are collected
            ray.kill(shard, no_restart=True)
    if nonfinite.any():
        raise NonFiniteError(source, f"split '{split}': {describe_rows(nonfinite)} got non-finite scores "
                             "(NaN or inf) against the KB; no metrics reported", rows=int(nonfinite.sum()))
    ranks = counts + 1
    metrics = metrics_from_ranks(ranks)
    seconds = time.perf_counter() - t0
    report = {"split": split, "ranker": ranker, "mentions": n, "entities": n_entities, "metrics": metrics,
              "pairs_per_second": n * n_entities / max(seconds, 1e-9), "seconds": seconds,
              "shards": len(shards), "threads_per_shard": threads_per_shard, "gpus_per_shard": num_gpus,
              "cache_gb_per_shard": cache_bytes / 2**30, "in_flight": in_flight,
              "shard_restarts": sum(max(0, len(p) - 1) for p in pids),
              "tie_policy": "rank = 1 + #{score > gold} + #{score == gold and entity_id < gold_id}",
              "same_name_failures": same_name_failures(ds, mentions, top_ids)}
    if ranker == zero_shot.RANKER:
        report.update(encoder=state["encoder"], score=zero_shot.SCORE, features=features_uri)
    if output_uri:
        write_predictions(output_uri, split, mentions, ranks, top_ids, top_scores, report)
    return report


def _merge(batch: _Batch, counts, top_ids, top_scores, nonfinite) -> None:
    """A batch every shard has scored: counts summed, top-k lists merged (exact, mel_ray.scoring)."""
    a, b = batch.a, batch.b
    for part in batch.parts:
        if isinstance(part, NonFiniteScores):
            nonfinite[a:b] |= part.mask
    if nonfinite.any():
        return                              # only counted from now on: nothing computed from them is kept
    counts[a:b] = sum(p[0] for p in batch.parts)
    top_ids[a:b], top_scores[a:b] = merge_topk([(p[1], p[2]) for p in batch.parts], TOPK)


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
    if report.get("ranker") == "zero-shot":     # the encoder alone: say which, above the numbers
        encoder = report.get("encoder") or {}
        named = encoder.get("text_encoder") or encoder.get("clip")
        pooling = f", {encoder['text_pooling']} pooling" if encoder.get("text_pooling") else ""
        head = f"zero-shot ranking by {named}{pooling}: {report.get('score')}\n{head}"
    if report.get("approximate"):       # retrieve, then rerank: say so above the numbers
        from mel_ray.eval.candidates import approximate_line

        return f"{approximate_line(report)}\n{head}\n{sep}\n{row}"
    return f"{head}\n{sep}\n{row}"

