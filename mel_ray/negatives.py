"""JD-CCL hard-negative mining (paper §4.2, eq. 3-4): `mel-ray mine-negatives --dataset URI [--k 16]`.

For every KB entity, its top-k other entities by Jaccard similarity of attribute sets, written beside the
dataset as `negatives/k{K}.parquet` (row order = entity_id):

    entity_id int64, neg_entity_ids list<int64>, neg_scores list<float32>   (scores descending)

and then, last, `negatives/k{K}.manifest.json` (its presence marks the output complete): k, seed, counts,
timings and the algorithm's parameters and work counters. k is the pool size k_max; training samples its
k hard negatives per positive from this pool.

`--source` (negatives.source) picks the ranking: `jaccard` (this, the default), `names` (name similarity,
`negatives/names_k{K}`, for KBs without attributes) or `jaccard+names` (`negatives/jaccard_names_k{K}`: the
Jaccard list, its remaining slots filled from the name ranking, each reason counted). Same schema; the name
kernel and the fallback are `mel_ray.name_negatives`. The rest of this docstring is about the Jaccard kernel.

Decisions:
* **Exact.** Every listed score is the true Jaccard (computed in float64 as inter/union of small integers,
  stored as float32) and no unlisted entity scores higher than the k-th listed one. Algorithm and
  correctness argument: `mel_ray.jaccard`.
* **Ties** are broken by a seeded splitmix64 hash of (seed, query id, candidate id), not by entity id, so
  equal-score candidates (very common: many entities share identical attribute sets) are not biased
  towards low ids. Order = (score desc, pair hash asc). The output is a pure function of
  (attribute sets, k, seed): block size, number of workers and attribute order within an entity do not
  change a byte of it.
* **Only candidates with score > 0 are listed.** A zero-Jaccard entity shares nothing with the gold entity:
  it is no hard negative, and training falls back to in-batch negatives for the rest of the pool. So an
  entity whose attributes are shared by fewer than k others gets a shorter list (counted in the manifest
  as `n_short`); an entity without attributes gets an empty list (`n_without_attributes`).
* The entity itself is never listed. Entities sharing the gold entity's *name* are not excluded: they are
  the hardest negatives (paper App. C).
* Attributes are sets: an attribute repeated within one entity counts once; null items are ignored.

Distribution: Ray Data over row blocks of the KB. The shared index (bit masks of the frequent attributes,
CSR posting lists of the rest, sizes, groups and the per-key group table) is `ray.put` once; a fixed pool
of `num_workers` actors `ray.get`s it in their constructor (zero-copy numpy views of the object store) and
mines one block per call. Memory per call is bounded by the block's work, which the kernel splits into
cache-sized chunks, never by N^2. Ray Data shows a progress bar; each block also logs one line.
Results are ordered by entity_id and written as one Parquet file atomically (local or s3://).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mel_ray import __version__, storage
from mel_ray.dataset import ENTITIES, load_dataset
from mel_ray.errors import DataError, UsageError
from mel_ray.jaccard import (
    ALGORITHM_VERSION,
    Encoded,
    Index,
    Tail,
    brute_force_topk,
    build_index,
    encode_attributes,
    encode_csr,
    mine_rows,
    new_stats,
)
from mel_ray.name_negatives import ALGORITHM_VERSION as NAMES_ALGORITHM_VERSION
from mel_ray.name_negatives import VECTORIZER, fill_from_names, name_vectors, run_name_mining
from mel_ray.verify import POOL_PREFIXES, check_negatives_quick, pool_paths, require_dataset

__all__ = ["OUTPUT_SCHEMA", "brute_force_topk", "mine_negatives", "mine_topk", "output_paths",
           "read_negatives"]

log = logging.getLogger(__name__)

NEGATIVES_DIR = "negatives"
OUTPUT_SCHEMA = pa.schema([
    pa.field("entity_id", pa.int64(), nullable=False),
    pa.field("neg_entity_ids", pa.list_(pa.field("item", pa.int64(), nullable=False)), nullable=False),
    pa.field("neg_scores", pa.list_(pa.field("item", pa.float32(), nullable=False)), nullable=False),
])
DEFAULT_BLOCK_SIZE = 4096
SOURCES = tuple(POOL_PREFIXES)      # jaccard, names, jaccard+names (negatives.source)


def output_paths(k: int, source: str = "jaccard") -> tuple[str, str]:
    """(Parquet, manifest) paths relative to the dataset root: negatives/k{K} (jaccard), names_k{K},
    jaccard_names_k{K}."""
    if source not in SOURCES:
        raise UsageError(f"negatives.source must be one of {', '.join(SOURCES)} (got {source!r})")
    return pool_paths(k, source)


# ---------------------------------------------------------------------------------------------- mining


class MiningResult:
    """Flat result of a mining run: counts per entity, concatenated ids and scores, work counters."""

    def __init__(self, counts: np.ndarray, ids: np.ndarray, scores: np.ndarray, stats: dict, params: dict):
        self.counts, self.ids, self.scores, self.stats, self.params = counts, ids, scores, stats, params

    @property
    def offsets(self) -> np.ndarray:
        off = np.zeros(len(self.counts) + 1, dtype=np.int64)
        np.cumsum(self.counts, out=off[1:])
        return off

    def lists(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        off = self.offsets
        return ([self.ids[off[i]:off[i + 1]] for i in range(len(self.counts))],
                [self.scores[off[i]:off[i + 1]] for i in range(len(self.counts))])


def _as_encoded(attributes: Any) -> Encoded:
    if isinstance(attributes, Encoded):
        return attributes
    if isinstance(attributes, tuple) and len(attributes) == 2:          # (indptr, indices) CSR of ids
        return encode_csr(*attributes)
    return encode_attributes(attributes)


def _check_args(k: int, n: int, block_size: int, num_workers: int | None, where: str) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise UsageError(f"{where}: k must be an integer >= 1 (got {k!r})")
    if k >= n:
        raise UsageError(f"{where}: k={k} needs more than k entities, but the KB has {n} "
                         f"(k is the pool of other entities per entity: use k <= {max(n - 1, 0)})")
    if block_size < 1:
        raise UsageError(f"{where}: block_size must be >= 1 (got {block_size})")
    if num_workers is not None and num_workers < 0:
        raise UsageError(f"{where}: num_workers must be >= 0 (got {num_workers})")


def mine_topk(attributes: Sequence[Sequence[str]] | Encoded | tuple, k: int, seed: int = 0,
              block_size: int = DEFAULT_BLOCK_SIZE, num_workers: int | None = None,
              frequent_bits: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Exact top-k Jaccard neighbours of each entity: (neg_ids per entity int64, neg_scores float32).

    `attributes`: a list of attribute lists, an Arrow list<string> column, an `Encoded`, or an
    (indptr, indices) CSR of integer attribute ids. `num_workers`: None or 0 = in this process; >= 1 = a
    Ray Data actor pool of that size (Ray is initialised if needed). `frequent_bits` forces the number of
    attributes handled as bit masks (None: chosen by a cost model); it never changes the result.
    """
    enc = _as_encoded(attributes)
    _check_args(k, enc.n, block_size, num_workers, "mine_topk")
    return run_mining(enc, k, seed, block_size, num_workers, frequent_bits).lists()


def run_mining(enc: Encoded, k: int, seed: int, block_size: int, num_workers: int | None,
               frequent_bits: int | None = None) -> MiningResult:
    ix = build_index(enc, k, frequent_bits)
    n = enc.n
    blocks = [(s, min(s + block_size, n)) for s in range(0, n, block_size)]
    log.info("negatives: %d entities, k=%d, %d blocks of %d, %d frequent attributes as bit masks, %d groups, "
             "index %.1fs", n, k, len(blocks), block_size, ix.params["frequent_bits"], ix.params["n_groups"],
             ix.params["index_seconds"])
    t0 = time.perf_counter()
    if not num_workers:
        counts, ids, scores, stats = _mine_local(ix, blocks, seed)
    else:
        counts, ids, scores, stats = _mine_ray(ix, blocks, seed, num_workers)
    params = {**ix.params, "mine_seconds": round(time.perf_counter() - t0, 3), "block_size": block_size,
              "num_workers": num_workers or 0, "n_blocks": len(blocks)}
    return MiningResult(counts, ids, scores, stats, params)


def _merge_stats(total: dict, part: dict) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def _mine_local(ix: Index, blocks: list[tuple[int, int]], seed: int):
    tail = Tail(ix)
    stats = new_stats()
    parts = []
    for b, (start, stop) in enumerate(blocks):
        t = time.perf_counter()
        parts.append(mine_rows(ix, start, stop, seed, tail, stats))
        log.debug("negatives: block %d/%d rows %d-%d in %.2fs", b + 1, len(blocks), start, stop - 1,
                  time.perf_counter() - t)
    return _concat(parts) + (stats,)


def _concat(parts):
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


class BlockMiner:
    """Ray Data actor: holds the shared index (zero-copy from the object store), mines one block per row."""

    def __init__(self, index_refs: list, seed: int, blocks: list[tuple[int, int]]):
        import ray

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log.setLevel(logging.INFO)
        self.ix = Index.from_payload(ray.get(index_refs[0]))
        self.tail = Tail(self.ix)
        self.seed = seed
        self.blocks = blocks

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = []
        for b in np.asarray(batch["block"]).tolist():
            start, stop = self.blocks[b]
            t = time.perf_counter()
            stats = new_stats()
            counts, ids, scores = mine_rows(self.ix, start, stop, self.seed, self.tail, stats)
            seconds = time.perf_counter() - t
            log.info("negatives: block %d/%d (entities %d-%d) mined in %.2fs on pid %d: "
                     "%d tail-product pairs, %d group pairs", b + 1, len(self.blocks), start, stop - 1,
                     seconds, os.getpid(), stats["product_pairs"], stats["group_pairs"])
            rows.append((b, counts, ids, scores, stats))

        def lists(arrays, typ):
            offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
            np.cumsum([len(a) for a in arrays], out=offsets[1:])
            values = np.concatenate(arrays) if arrays else np.zeros(0)
            return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ))

        return pa.table({
            "block": pa.array([r[0] for r in rows], pa.int64()),
            "counts": lists([r[1] for r in rows], pa.int32()),
            "ids": lists([r[2] for r in rows], pa.int64()),
            "scores": lists([r[3] for r in rows], pa.float32()),
            "stats": pa.array([json.dumps(r[4]) for r in rows], pa.string()),
        })


def _ensure_ray() -> None:
    from mel_ray.runtime import init_ray

    init_ray()   # the cluster in RAY_ADDRESS, else a local instance; token auth stays on; no-op if Ray is up


def _mine_ray(ix: Index, blocks: list[tuple[int, int]], seed: int, num_workers: int):
    import ray

    _ensure_ray()
    index_ref = ray.put(ix.to_payload())      # once; actors get zero-copy views
    ds = ray.data.from_items([{"block": b} for b in range(len(blocks))], override_num_blocks=len(blocks))
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_restarts: the deprecated **ray_remote_args is the only way
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        out = ds.map_batches(
            BlockMiner,
            fn_constructor_kwargs={"index_refs": [index_ref], "seed": seed, "blocks": blocks},
            batch_size=1,
            batch_format="numpy",
            # no more actors than blocks (Ray Data warns that the extra ones could never get work)
            compute=ray.data.ActorPoolStrategy(size=max(1, min(num_workers, len(blocks)))),
            num_cpus=1,
            # the index is an object-store argument of the actors' constructor, which a restarted actor may no
            # longer find (ray#53727, logged per actor): a lost miner fails the stage, and a rerun mines again
            max_restarts=0,
        )
    tables = [t for t in ray.get(out.to_arrow_refs()) if t.num_rows]
    table = pa.concat_tables(tables) if tables else None
    del index_ref
    got = {} if table is None else dict(zip(table.column("block").to_pylist(), range(table.num_rows)))
    if sorted(got) != list(range(len(blocks))):
        raise RuntimeError(f"negatives: Ray returned blocks {sorted(got)}, expected 0..{len(blocks) - 1}")
    counts_col, ids_col, scores_col = (table.column(c).combine_chunks() for c in ("counts", "ids", "scores"))
    stats_col = table.column("stats").to_pylist()
    parts, stats = [], new_stats()
    for b in range(len(blocks)):
        r = got[b]
        parts.append((counts_col[r].values.to_numpy(), ids_col[r].values.to_numpy(),
                      scores_col[r].values.to_numpy()))
        _merge_stats(stats, json.loads(stats_col[r]))
    return _concat(parts) + (stats,)


# ---------------------------------------------------------------------------------------------- stage


def negatives_table(counts: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> pa.Table:
    n = len(counts)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    off = pa.array(offsets.astype(np.int32) if offsets[-1] < 2 ** 31 else offsets)
    ids_arr = pa.ListArray.from_arrays(off, pa.array(ids.astype(np.int64), pa.int64()))
    sc_arr = pa.ListArray.from_arrays(off, pa.array(scores.astype(np.float32), pa.float32()))
    table = pa.table({"entity_id": pa.array(np.arange(n, dtype=np.int64)), "neg_entity_ids": ids_arr,
                      "neg_scores": sc_arr})
    return table.cast(OUTPUT_SCHEMA)


def read_negatives(dataset_uri: str, k: int, source: str = "jaccard") -> pa.Table:
    """The mined pool of a dataset; DataError if it was not mined (or not completely) for this k and source."""
    parquet, manifest = output_paths(k, source)
    if not storage.exists(storage.join(dataset_uri, manifest)):
        flag = "" if source == "jaccard" else f" --source {source}"
        raise DataError(storage.join(dataset_uri, manifest),
                        f"no hard negatives mined for k={k}: run `mel-ray mine-negatives --dataset "
                        f"{dataset_uri} --k {k}{flag}`")
    return storage.read_table(storage.join(dataset_uri, parquet))


# Below this many entities the pool is mined in this process whatever the number of workers asked: Ray's start-up
# (its actors, the index shipped through the object store) costs more than the mining. Measured on 2 cores
# (docs/benchmarks.md, "JD-CCL negative mining", run 2): 10K entities 1.7 s in-process vs 10-14 s on Ray, 50K
# 21 s vs 34-55 s, 110K about even.
RAY_MIN_ENTITIES = 50_000


def choose_engine(n_entities: int, num_workers: int | None) -> tuple[int, str]:
    """(the Ray actors to mine with, 0 = in this process; a line saying which and why)."""
    if num_workers == 0:
        return 0, f"in-process ({n_entities:,} entities; --workers 0)"
    if n_entities < RAY_MIN_ENTITIES:
        return 0, (f"in-process: {n_entities:,} entities < {RAY_MIN_ENTITIES:,}, where Ray's start-up costs more "
                   f"than it saves{f' (--workers {num_workers} not used)' if num_workers else ''}")
    if num_workers is None:
        _ensure_ray()
        import ray

        num_workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return num_workers, f"{num_workers} Ray actors (one per CPU of the cluster) for {n_entities:,} entities"
    return num_workers, f"{num_workers} Ray actors for {n_entities:,} entities"


def pool_key(source: str, k: int, seed: int, entities_sha256: str) -> dict[str, Any]:
    """What a complete pool must have been mined with to be kept: every input and algorithm its bytes depend on.
    The Jaccard pool's key is the one it always had (no source field), so existing pools stay valid."""
    key: dict[str, Any] = {"k": int(k), "seed": int(seed), "entities_sha256": entities_sha256}
    if source == "jaccard":
        return {**key, "algorithm_version": ALGORITHM_VERSION}
    names = {"names_algorithm_version": NAMES_ALGORITHM_VERSION, "vectorizer": dict(VECTORIZER)}
    if source == "names":
        return {"source": source, **key, **names}
    return {"source": source, **key, "algorithm_version": ALGORITHM_VERSION, **names}


def mine_negatives(dataset_uri: str, k: int = 16, seed: int = 0, block_size: int = DEFAULT_BLOCK_SIZE,
                   num_workers: int | None = None, force: bool = False,
                   frequent_bits: int | None = None, source: str = "jaccard") -> dict[str, Any]:
    """Mine the dataset's hard-negative pool of `source`; returns the manifest written last.

    source: "jaccard" (JD-CCL: attribute sets, `negatives/k{K}`), "names" (name similarity,
    `mel_ray.name_negatives`, `negatives/names_k{K}`) or "jaccard+names" (`negatives/jaccard_names_k{K}`: each
    entity's Jaccard list, its remaining slots up to k filled from its name-similarity list, best first
    without repeats: JD-CCL's fallback where attributes are missing or shared by fewer than k others; the
    manifest counts both reasons).
    num_workers: None = one Ray actor per CPU of the Ray cluster (Ray is initialised if needed; set
    RAY_ADDRESS to use a cluster); 0 = in this process without Ray; n >= 1 = n actors. Below RAY_MIN_ENTITIES
    entities the pool is mined in this process whatever num_workers says (manifest: algorithm.engine says why).
    Name similarity is always mined in this process. A complete output with the same key (pool_key) is kept as
    it is unless `force`; a recomputation writes byte-identical Parquet.
    """
    t_start = time.perf_counter()
    dataset_uri = str(dataset_uri)
    require_dataset(dataset_uri)                   # manifest, footers, schemas, counts: one line, exit 2
    ds = load_dataset(dataset_uri)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise UsageError(f"{dataset_uri}: --k must be an integer >= 1 (got {k!r})")
    parquet_rel, manifest_rel = output_paths(k, source)
    parquet_uri, manifest_uri = ds.path(*parquet_rel.split("/")), ds.path(*manifest_rel.split("/"))

    t = time.perf_counter()
    entities_uri = ds.path(ENTITIES)
    data = storage.read_bytes(entities_uri)
    key = pool_key(source, k, seed, hashlib.sha256(data).hexdigest())
    if not force and storage.exists(manifest_uri):
        try:
            old = storage.read_json_object(manifest_uri)
        except DataError:                          # a damaged manifest: the pool is mined again
            old = {}
        if (all(old.get(name) == value for name, value in key.items()) and storage.exists(parquet_uri)
                and not check_negatives_quick(dataset_uri, int(k), source)):    # and a damaged pool too
            log.info("negatives: %s is complete for k=%d seed=%d, skipping", parquet_uri, k, seed)
            return {**old, "skipped": True}
    columns = ["entity_id"] + (["attributes"] if source != "names" else []) + (["name"] if source != "jaccard" else [])
    try:
        table = pq.read_table(io.BytesIO(data), columns=columns)
    except (pa.ArrowInvalid, KeyError) as err:
        raise DataError(entities_uri, f"cannot read {'/'.join(columns)}: {err}") from err
    del data
    n = table.num_rows
    ids = table.column("entity_id").to_numpy()
    if not np.array_equal(ids, np.arange(n)):
        raise DataError(entities_uri, "entity_id must be dense 0..N-1 in row order", field="entity_id")
    _check_args(k, n, block_size, num_workers, dataset_uri)
    timings = {"read_s": round(time.perf_counter() - t, 3)}

    counts_out: dict[str, int] = {}
    algorithm: dict[str, Any] = {}
    if source != "names":
        jac_counts, jac_ids, jac_scores, sizes, algorithm["jaccard"] = _mine_jaccard(
            table, k, seed, block_size, num_workers, frequent_bits, timings)
        counts, ids, scores = jac_counts, jac_ids, jac_scores
        counts_out.update(n_without_attributes=int(np.count_nonzero(sizes == 0)),
                          n_short=int(np.count_nonzero((sizes > 0) & (jac_counts < k))),   # with attributes
                          n_no_candidates=int(np.count_nonzero((sizes > 0) & (jac_counts == 0))))
    if source != "jaccard":
        t = time.perf_counter()
        x = name_vectors(table.column("name").to_pylist())
        timings["vectorize_s"] = round(time.perf_counter() - t, 3)
        has_name = np.diff(x.indptr) > 0
        if source == "names" and not has_name.any():
            raise DataError(entities_uri, "no entity name has a character trigram to compare: name-similarity "
                            "negatives need names (use negatives.source=jaccard)", field="name")
        name_counts, name_ids, name_scores, stats = run_name_mining(x, k, seed)
        timings["names_mine_s"] = stats.pop("mine_seconds")
        algorithm["names"] = {"name": "exact-tfidf-cosine-topk", "library": f"scikit-learn {_sklearn_version()}",
                              **stats}
        counts_out["n_without_name"] = int(np.count_nonzero(~has_name))
        if source == "names":
            counts, ids, scores = name_counts, name_ids, name_scores
            counts_out.update(n_short=int(np.count_nonzero(has_name & (name_counts < k))),     # with a name
                              n_no_candidates=int(np.count_nonzero(has_name & (name_counts == 0))))
        else:
            counts, ids, scores, filled = fill_from_names((jac_counts, jac_ids, jac_scores),
                                                          (name_counts, name_ids, name_scores), k)
            counts_out.update(
                n_fallback_no_attributes=counts_out["n_without_attributes"],   # every slot offered to names
                n_fallback_short=counts_out["n_short"],    # with attributes, < k Jaccard candidates: the rest
                n_filled_from_names=int(filled.sum()),     # pairs the fallback listed
                n_short=int(np.count_nonzero(counts < k)),           # after the fallback
                n_no_candidates=int(np.count_nonzero(counts == 0)))  # after the fallback
    del table

    t = time.perf_counter()
    storage.delete(manifest_uri)        # from here on the output is incomplete until the new manifest lands
    storage.write_table(parquet_uri, negatives_table(counts, ids, scores))
    timings["write_s"] = round(time.perf_counter() - t, 3)
    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    manifest = {
        **key,
        "source": source,
        "dataset": dataset_uri,
        "dataset_name": ds.name,
        "output": parquet_rel,
        "n_entities": n,
        **counts_out,
        "n_pairs_listed": int(counts.sum()),
        "zero_scores_listed": False,
        "tie_break": "splitmix64(seed, entity_id, candidate_id) ascending",
        # the Jaccard pool's manifest keeps its layout (one algorithm); the others name each part
        "algorithm": algorithm["jaccard"] if source == "jaccard" else algorithm,
        "timings": timings,
        "mel_ray_version": __version__,
    }
    if source == "jaccard+names":
        manifest["order"] = "Jaccard candidates (score desc), then name-similarity ones (cosine desc)"
    storage.write_json(manifest_uri, manifest)
    counted = ", ".join(f"{name} {value}" for name, value in {"n_entities": n, **counts_out}.items())
    log.info("negatives: wrote %s (%s) in %.1fs", parquet_uri, counted, timings["total_s"])
    return manifest


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def _mine_jaccard(table: pa.Table, k: int, seed: int, block_size: int, num_workers: int | None,
                  frequent_bits: int | None, timings: dict):
    """The exact Jaccard pool of the entities' attribute sets: (counts, ids, scores, attribute set sizes,
    the manifest's algorithm section); fills timings' encode_s, index_s, mine_s."""
    n = table.num_rows
    num_workers, engine = choose_engine(n, num_workers)
    log.info("negatives: %s", engine)
    t = time.perf_counter()
    enc = encode_attributes(table.column("attributes"))
    timings["encode_s"] = round(time.perf_counter() - t, 3)

    result = run_mining(enc, k, seed, block_size, num_workers, frequent_bits)
    p, st = result.params, result.stats
    timings["index_s"], timings["mine_s"] = p["index_seconds"], p["mine_seconds"]
    algorithm = {
        "name": "exact-jaccard-topk",
        "block_size": block_size,
        "num_workers": p["num_workers"],
        "engine": engine,
        "n_blocks": p["n_blocks"],
        "frequent_bits": p["frequent_bits"],
        "n_groups": p["n_groups"],
        "n_tail_attributes": p["n_tail_attributes"],
        "n_attributes": len(enc.df),
        "key_group_entries": p["key_group_entries"],
        "work": {
            "naive_sum_df2": p["all_df2"],         # cost of the plain sparse product A @ A.T
            "tail_sum_df2": p["tail_df2"],
            "tail_product_pairs": st["product_pairs"],
            "exact_pairs_kept": st["exact_kept"],
            "group_pairs": st["group_pairs"],
            "tie_pairs": st["tie_pairs"],
            "tie_fallback_rows": st["tie_fallback_rows"],
            "sorted_candidates": st["sorted_candidates"],
        },
    }
    return result.counts, result.ids, result.scores, enc.sizes, algorithm
