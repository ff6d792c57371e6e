"""Benchmark of JD-CCL negative mining (exact top-k Jaccard) against datasketch MinHash LSH Forest.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_mining.py                      # full run, ~10-15 min on 2 cores
    .venv/bin/python benchmarks/bench_mining.py --sizes 10000 --workers 1 --e2e-n 0   # smoke run

For each KB size (benchmarks/kbgen.py, Wikidata-like attribute frequencies) it reports, per number of Ray
workers: wall time (index on the driver + mining), peak memory of the whole process tree (driver, raylet,
GCS, Ray workers; PSS, so shared object-store pages are not counted twice, and RSS), and the work: the
naive sparse product's sum_a df_a^2 (what A @ A.T costs) next to what the algorithm did (tail product
pairs, group member pairs, key x group table entries). Exactness is checked on sampled queries against a
per-query dense reference. Side by side: datasketch MinHashLSHForest (build + query time, recall of the
exact top-k, tie-aware). A final run pushes the largest KB through the whole stage (`mine_negatives` on a
written dataset, Ray path). The markdown table is printed and written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from kbgen import attribute_names, kb_stats, make_kb_csr

from mel_ray import jaccard
from mel_ray.negatives import run_mining

# ---------------------------------------------------------------------------------------------- memory


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_ticks() -> dict[int, int]:
    """pid -> user + system CPU ticks of this process and all its descendants."""
    out = {}
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = int(fields[11]) + int(fields[12])       # utime, stime
    return out


def tree_memory() -> tuple[int, int]:
    """(PSS, RSS) in bytes summed over this process and all its descendants (Ray processes included)."""
    pss = rss = 0
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return pss, rss


class PeakMemory:
    """Samples tree_memory() every `interval` seconds in a thread (`.peak_pss`, `.peak_rss`, `.base_pss`);
    `.cpu_s` = CPU seconds the process tree used meanwhile (robust to other jobs sharing the cores)."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak_pss = self.peak_rss = self.base_pss = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base_pss, _ = tree_memory()
        # Ray reaps ended workers without accumulating their CPU time in the parent, so CPU is tracked per
        # pid while sampling (at most one interval of an ending process is missed)
        self._cpu0 = tree_cpu_ticks()
        self._cpu_last = dict(self._cpu0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self._cpu_last.update(tree_cpu_ticks())
            pss, rss = tree_memory()
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._cpu_last.update(tree_cpu_ticks())
        ticks = sum(last - self._cpu0.get(pid, 0) for pid, last in self._cpu_last.items())
        self.cpu_s = ticks / os.sysconf("SC_CLK_TCK")
        pss, rss = tree_memory()
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)


# ---------------------------------------------------------------------------------------------- reference


class Reference:
    """Exact top-k of single queries by a dense pass over all N (ground truth for sampled queries)."""

    def __init__(self, enc: jaccard.Encoded, seed: int):
        self.enc, self.seed = enc, seed
        self.a = sp.csr_matrix((np.ones(len(enc.indices), np.int32), enc.indices, enc.indptr),
                               shape=(enc.n, len(enc.df)))
        self.at = self.a.T.tocsr()
        self.sizes = enc.sizes.astype(np.int64)

    def scores(self, i: int) -> np.ndarray:
        row = self.a[i]
        inter = np.asarray(self.at[row.indices].sum(axis=0)).ravel().astype(np.int64)
        union = self.sizes + self.sizes[i] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(inter > 0, inter / np.maximum(union, 1), 0.0)
        score[i] = 0.0
        return score

    def topk(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        score = self.scores(i)
        cand = np.flatnonzero(score > 0)
        keys = jaccard.pair_keys(self.seed, np.full(len(cand), i), cand)
        order = np.lexsort((keys, -score[cand]))[:k]
        return cand[order], score[cand[order]]


# ---------------------------------------------------------------------------------------------- runs


def ensure_ray(num_cpus: int):
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token":
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=2 * 1024 ** 3, _temp_dir=tempfile.mkdtemp(prefix="bench-ray-"))
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    return ray


def run_ours(enc, k: int, seed: int, workers: int, block_size: int):
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        result = run_mining(enc, k, seed, block_size, workers)
    wall = time.perf_counter() - t0
    return result, wall, mem


def check_sampled(result, ref: Reference, k: int, queries: np.ndarray) -> int:
    off = result.offsets
    ok = 0
    for i in queries:
        ids, scores = ref.topk(int(i), k)
        got_ids = result.ids[off[i]:off[i + 1]]
        got_scores = result.scores[off[i]:off[i + 1]]
        ok += int(np.array_equal(got_ids, ids) and np.array_equal(got_scores, scores.astype(np.float32)))
    return ok


def run_minhash(enc, names: np.ndarray, k: int, num_perm: int, oversample: int, ref: Reference,
                queries: np.ndarray, n_timed_queries: int | None):
    """Build a MinHashLSHForest; time top-(oversample*k) queries for every entity (or a sample, scaled);
    recall of the exact top-k after an exact re-rank of the candidates, for k+1 and oversample*k+1."""
    from datasketch import MinHash, MinHashLSHForest

    n = enc.n
    t0 = time.perf_counter()
    sets = [[names[a].encode() for a in enc.indices[enc.indptr[i]:enc.indptr[i + 1]]] for i in range(n)]
    hashes = MinHash.bulk(sets, num_perm=num_perm)
    forest = MinHashLSHForest(num_perm=num_perm)
    for i, m in enumerate(hashes):
        if sets[i]:
            forest.add(i, m)
    forest.index()
    build = time.perf_counter() - t0
    timed = np.arange(n) if n_timed_queries is None or n_timed_queries >= n else \
        np.random.default_rng(1).choice(n, n_timed_queries, replace=False)
    t0 = time.perf_counter()
    for i in timed:
        if sets[i]:
            forest.query(hashes[i], oversample * k + 1)
    query = (time.perf_counter() - t0) * n / len(timed)
    # a returned entity counts as found when its exact score reaches the exact k-th score (ties are
    # interchangeable); candidates are re-ranked by exact Jaccard first
    recalls: dict[int, list[float]] = {1: [], oversample: []}
    for i in queries:
        ids, scores = ref.topk(int(i), k)
        if not len(ids):
            continue
        exact = ref.scores(int(i))
        for mult, found in recalls.items():
            cand = np.array([j for j in forest.query(hashes[i], mult * k + 1) if j != i], dtype=np.int64)
            got = np.sort(exact[cand])[::-1][:k] if len(cand) else np.zeros(0)
            found.append(np.count_nonzero(got >= scores[-1]) / len(ids))
    return build, query, {m: float(np.mean(v)) for m, v in recalls.items()}, len(timed) < n


def end_to_end(n: int, k: int, seed: int, workers: int, kb_seed: int) -> dict:
    """Write a dataset with an n-entity KB and run the whole stage through the Ray path."""
    import pyarrow as pa

    from mel_ray.dataset import ENTITY_SCHEMA, write_dataset
    from mel_ray.negatives import mine_negatives, read_negatives

    indptr, indices, n_ids = make_kb_csr(n, kb_seed)
    names = pa.array(attribute_names(n_ids, kb_seed))
    attrs = pa.ListArray.from_arrays(pa.array(indptr.astype(np.int32)), names.take(pa.array(indices)))
    ids = pa.array(np.arange(n, dtype=np.int64))
    strs = pa.array([f"Q{i}" for i in range(n)])
    empty = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))
    table = pa.Table.from_arrays([ids, strs, strs, pa.array([""] * n), attrs, empty], schema=ENTITY_SCHEMA)
    root = tempfile.mkdtemp(prefix="bench-neg-")
    write_dataset(root, name=f"kbgen-{n}", source_format="jsonl", entities=table, mentions={}, report={})
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        manifest = mine_negatives(root, k=k, seed=seed, num_workers=workers)
    wall = time.perf_counter() - t0
    out = read_negatives(root, k)
    assert out.num_rows == n and out.column("entity_id").to_pylist() == list(range(n))
    return {"n": n, "workers": workers, "wall_s": wall, "peak_pss": mem.peak_pss, "manifest": manifest,
            "uri": root}


# ---------------------------------------------------------------------------------------------- report


def gib(b: float) -> str:
    return f"{b / 1024 ** 3:.2f}"


def fmt_big(x: float) -> str:
    return f"{x:.2e}"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}, numpy {np.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,110000,250000")
    parser.add_argument("--workers", default="1,2", help="Ray actor counts to time (0 = in-process, no Ray)")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kb-seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--check-queries", type=int, default=300, help="sampled queries checked exactly")
    parser.add_argument("--minhash-max-n", type=int, default=110000, help="no MinHash above this N")
    parser.add_argument("--minhash-full-query-max-n", type=int, default=10000,
                        help="above this N, MinHash query time is extrapolated from --minhash-queries")
    parser.add_argument("--minhash-queries", type=int, default=5000)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--minhash-oversample", type=int, default=16,
                        help="MinHash candidates per query = this * k + 1, re-ranked exactly")
    parser.add_argument("--e2e-n", type=int, default=250000,
                        help="KB size of the end-to-end stage run (0: skip)")
    parser.add_argument("--out", default=None,
                        help="markdown file (default benchmarks/results/mining-DATE.md)")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    workers = [int(x) for x in args.workers.split(",") if x]
    started = datetime.datetime.now()
    load_start = os.getloadavg()
    ray = ensure_ray(max(2, max(workers))) if any(workers) or args.e2e_n else None

    rows, notes = [], []
    for n in sizes:
        indptr, indices, n_ids = make_kb_csr(n, args.kb_seed)
        stats = kb_stats(indptr, indices, n_ids)
        t0 = time.perf_counter()
        enc = jaccard.encode_csr(indptr, indices)
        encode_s = time.perf_counter() - t0
        ref = Reference(enc, args.seed)
        queries = np.random.default_rng(n).choice(n, min(args.check_queries, n), replace=False)
        for w in workers:
            result, wall, mem = run_ours(enc, args.k, args.seed, w, args.block_size)
            ok = check_sampled(result, ref, args.k, queries)
            p, st = result.params, result.stats
            row = {
                "method": "exact (ours)", "n": n, "workers": w, "wall_s": wall + encode_s,
                "index_s": p["index_seconds"], "mine_s": p["mine_seconds"], "cpu_s": mem.cpu_s,
                "peak_pss": mem.peak_pss,
                "peak_rss": mem.peak_rss, "base_pss": mem.base_pss, "naive_df2": p["all_df2"],
                "tail_df2": p["tail_df2"], "product_pairs": st["product_pairs"],
                "group_pairs": st["group_pairs"], "key_table": p["n_groups"] ** 2,
                "bits": p["frequent_bits"], "groups": p["n_groups"], "recall": ok / len(queries),
                "checked": f"{ok}/{len(queries)} exact", "kb": stats,
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "kb"}), flush=True)
            if ok != len(queries):
                notes.append(f"N={n} workers={w}: only {ok}/{len(queries)} sampled queries matched!")
        if n <= args.minhash_max_n:
            names = np.array(attribute_names(n_ids, args.kb_seed), dtype=object)
            # encoded id -> name (encode_csr ranks ids by df, ties by id)
            names = names[np.argsort(-np.bincount(indices, minlength=n_ids), kind="stable")]
            nq = None if n <= args.minhash_full_query_max_n else args.minhash_queries
            t0 = time.perf_counter()
            with PeakMemory() as mem:
                build, query, recall, extrapolated = run_minhash(enc, names, args.k, args.num_perm,
                                                                 args.minhash_oversample, ref, queries, nq)
            row = {"method": f"MinHash LSH Forest ({args.num_perm} perm, top-{args.minhash_oversample}k)",
                   "n": n, "workers": 0, "wall_s": build + query, "build_s": build, "query_s": query,
                   "cpu_s": mem.cpu_s,
                   "recall": recall,
                   "peak_pss": mem.peak_pss, "extrapolated": extrapolated,
                   "checked": f"recall on {len(queries)} queries"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    e2e = None
    if args.e2e_n:
        e2e = end_to_end(args.e2e_n, args.k, args.seed, max(workers) or 2, args.kb_seed)
        print(json.dumps({k: v for k, v in e2e.items() if k != "manifest"}), flush=True)

    report = render(args, rows, e2e, notes, started, load_start)
    out = Path(args.out) if args.out else HERE / "results" / f"mining-{started:%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    print(f"written to {out}")
    if ray is not None:
        ray.shutdown()
    return 0


NOTES = [
    ("wall s = encode + index (driver, one core) + mining (Ray actors) + collecting results; Ray start-up "
    "is not included, actor start-up is."),
    ("CPU s = user + system CPU seconds of the whole process tree during the run (driver, Ray workers, "
     "raylet, GCS); it depends less than wall time on other jobs competing for the cores, but heavy "
     "contention inflates it too (cache and memory-bandwidth sharing). For MinHash with extrapolated "
     "queries it covers the sampled queries only."),
    ("peak PSS sums the proportional set size of the driver and every descendant process (raylet, GCS, Ray "
    "workers), sampled every 0.25 s; shared object-store pages count once."),
    ("naive sum df² = the work of the plain sparse product A·Aᵀ; tail sum df² = the same over the "
    "non-bit-mask attributes only (what our product pays); G² = the key x group table on the driver."),
    ("exact: sampled queries compared id-for-id and score-for-score with a per-query dense reference "
    "(same tie-break hash)."),
    ("MinHash: datasketch MinHashLSHForest; query time is for top-(oversample*k+1) candidates per entity; "
    "recall is given for top-(k+1) and top-(oversample*k+1) candidates re-ranked by exact Jaccard, and "
    "counts a returned entity as found when its exact score reaches the exact k-th score (ties are "
    "interchangeable)."),
]


def render(args, rows, e2e, notes, started, load_start) -> str:
    cmd = "python benchmarks/bench_mining.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    loads = (" / ".join(f"{x:.2f}" for x in load_start), " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    lines = [
        "# JD-CCL negative mining benchmark",
        "",
        f"- date: {started:%Y-%m-%d %H:%M}",
        f"- machine: {machine()}",
        (f"- load average at start (1/5/15 min): {loads[0]}; at end: {loads[1]} "
        "(a shared machine: other jobs compete for the cores)"),
        f"- command: `{cmd.strip()}`",
        (f"- KB: benchmarks/kbgen.py seed {args.kb_seed}; k = {args.k}; block size {args.block_size}; "
        "Ray local instance with 2 CPUs, token auth"),
        "",
        ("| method | N | workers | wall s | index s | mine s | CPU s (tree) | peak PSS GiB (tree) "
         "| naive sum df² "
        "| tail sum df² | tail product pairs | group pairs | G² key table | exact / recall@k |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if r["method"].startswith("exact"):
            cells = [r["method"], f"{r['n']:,}", str(r["workers"]), f"{r['wall_s']:.1f}",
                     f"{r['index_s']:.1f}", f"{r['mine_s']:.1f}", f"{r['cpu_s']:.1f}", gib(r["peak_pss"]),
                     fmt_big(r["naive_df2"]), fmt_big(r["tail_df2"]),
                     fmt_big(r["product_pairs"]), fmt_big(r["group_pairs"]), fmt_big(r["key_table"]),
                     r["checked"]]
        else:
            query = f"{r['query_s']:.1f}" + (" (extrapolated)" if r["extrapolated"] else "")
            recall = ", ".join(f"{v:.3f} ({'k' if m == 1 else f'{m}k'}+1 candidates)"
                               for m, v in r["recall"].items())
            cells = [r["method"], f"{r['n']:,}", "1 (in-process)", f"{r['wall_s']:.1f}",
                     f"build {r['build_s']:.1f}", f"query {query}", f"{r['cpu_s']:.1f}", gib(r["peak_pss"]),
                     "", "", "", "", "",
                     f"recall {recall}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "KB statistics:", "",
              "| N | distinct attributes | attributes/entity | top document frequencies | no attributes |",
              "| ---: | ---: | ---: | --- | ---: |"]
    seen = set()
    for r in rows:
        if "kb" in r and r["n"] not in seen:
            seen.add(r["n"])
            kb = r["kb"]
            top = ", ".join(f"{x:.0%}" for x in kb["top_df_fraction"][:6])
            lines.append(f"| {r['n']:,} | {kb['distinct_attributes']:,} | {kb['attributes_per_entity_mean']} "
                         f"| {top} | {kb['empty_entities']:,} |")
    ours = [r for r in rows if r["method"].startswith("exact")]
    lines += ["", "Frequent attributes as bit masks (F) and groups (G) chosen by the cost model:", ""]
    lines += [f"- N={r['n']:,}: F={r['bits']}, G={r['groups']:,}"
              for r in ours if r["workers"] == ours[0]["workers"]]
    if e2e:
        m = e2e["manifest"]
        lines += ["", (f"End to end through the stage (`mine_negatives`, Ray path, {e2e['workers']} workers) "
                  f"on a written {e2e['n']:,}-entity dataset: {e2e['wall_s']:.1f} s wall, peak PSS "
                  f"{gib(e2e['peak_pss'])} GiB; manifest timings {json.dumps(m['timings'])}; "
                  f"{m['n_without_attributes']:,} entities without attributes, {m['n_short']:,} with fewer "
                  f"than k={m['k']} candidates of score > 0.")]
    minhash = (f"MinHash runs only up to N={args.minhash_max_n:,}; above N={args.minhash_full_query_max_n:,} "
               f"its query time is measured on {args.minhash_queries:,} queries and scaled to N "
               "(datasketch queries are single-threaded Python).")
    lines += ["", "Notes:", ""] + [f"- {x}" for x in [*NOTES, minhash, *notes]]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    sys.exit(main())
