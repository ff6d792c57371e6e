"""Name-similarity hard negatives: each entity's top-k other KB entities by cosine of character n-gram TF-IDF
vectors of the entity NAME (`negatives.source: names`), and JD-CCL's fallback onto them
(`negatives.source: jaccard+names`). The stage that writes them is `mel_ray.negatives`.

Why: JD-CCL's Jaccard pool (paper §4.2) needs attributes, and many KBs have none (MELBench's Richpedia-MEL):
training then only sees easy in-batch negatives. Every KB has names, and entities whose names look alike
are the ones a linker confuses (same-name entities are the hardest, paper App. C).

Vectorizer (`VECTORIZER`, fixed in code, recorded in the manifest and part of the pool's skip key): scikit-learn's
`TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3), lowercase=True, strip_accents="unicode",
sublinear_tf=True, norm="l2")`, fitted on the KB's names.
* char_wb trigrams: the character trigrams of each word padded with spaces (" ob", "oba", "bam", "ama",
  "ma "), robust to word order, initials and small spelling differences. (2, 4) was measured on
  Richpedia-MEL's 17,805 names: bigrams such as " s" are in a fifth of all names, so its product costs 6.7x the
  work (sum of n-gram df^2: 633M vs 94M) and pairs 73% of all entities instead of 19%, for a ranking still
  led by the shared trigrams; trigrams keep the mining at seconds.
* lowercase + strip_accents="unicode": "François" and "francois" are one name to a reader.
* idf: a rare shared trigram ("krz") says more than a common one (" th"); sublinear_tf: a trigram repeated
  within one name counts 1 + log(tf), not tf; l2 norm: the dot product is the cosine.

Exact, in the same sense and with the same tie policy as the Jaccard pool (`mel_ray.jaccard`):
* score(i, j) = float32 of the cosine computed in float64 by a sparse product row i x X^T; each score
  depends only on the two rows (the product sums row i's n-grams in their stored order), so the chunking
  never changes a bit of it. No unlisted entity scores higher than the k-th listed one.
* Order: score desc, then the seeded splitmix64 pair key of (seed, query id, candidate id) ascending
  (`mel_ray.jaccard.pair_keys`): equal scores (duplicate names score 1.0) are not biased to low ids, and the
  output is a pure function of (names, k, seed).
* Only score > 0 is listed (no shared trigram: no hard negative); the entity itself never is; entities with
  the same name are (score 1.0). An entity whose name has no trigram (empty or blank) gets an empty list.

Cost: rows are mined in chunks whose product has at most `CHUNK_WORK` candidate entries (a row's work, the sum
of its n-grams' document frequencies, bounds its product's entries), so memory is bounded whatever the KB;
total work is the sum over n-grams of df^2. In process (no Ray): 17,805 names take seconds (docs/benchmarks.md).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from mel_ray.jaccard import pair_keys, reaching_kth

__all__ = ["ALGORITHM_VERSION", "VECTORIZER", "fill_from_names", "mine_name_topk", "name_vectors", "run_name_mining"]

ALGORITHM_VERSION = 1
# JSON-native (the manifest's skip key compares it with the stored one); ngram_range becomes a tuple for sklearn
VECTORIZER: dict[str, Any] = {"analyzer": "char_wb", "ngram_range": [3, 3], "lowercase": True,
                              "strip_accents": "unicode", "sublinear_tf": True, "use_idf": True,
                              "smooth_idf": True, "norm": "l2", "min_df": 1}
CHUNK_WORK = 4_000_000      # candidate entries of one chunk's product (~100 MB of temporaries)
BUCKETS = 256               # score buckets of the pre-filter (_top_k)


def name_vectors(names: Sequence[str]) -> sp.csr_matrix:
    """L2-normalised TF-IDF rows (float64) of the names; a name without any trigram is a zero row."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    names = ["" if n is None else str(n) for n in names]
    settings = {**VECTORIZER, "ngram_range": tuple(VECTORIZER["ngram_range"])}
    try:
        x = TfidfVectorizer(dtype=np.float64, **settings).fit_transform(names)
    except ValueError as err:
        if "empty vocabulary" not in str(err):
            raise
        x = sp.csr_matrix((len(names), 0), dtype=np.float64)       # no name has a trigram: every row is zero
    x = sp.csr_matrix(x, dtype=np.float64)
    x.sort_indices()
    return x


def _chunks(row_work: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most `budget` work each (a single heavier row is a chunk of its own)."""
    n = len(row_work)
    cum = np.cumsum(row_work + 1)
    bounds = [0]
    while bounds[-1] < n:
        base = cum[bounds[-1] - 1] if bounds[-1] else 0
        nxt = int(np.searchsorted(cum, base + budget, side="right"))
        bounds.append(min(n, max(nxt, bounds[-1] + 1)))
    return list(itertools.pairwise(bounds))


def _top_k(prod: sp.csr_matrix, start: int, k: int, seed: int, stats: dict):
    """Top k of each row of a chunk's product: (counts int32, ids int64, scores float32), (score desc, pair key)."""
    b = prod.shape[0]
    rows = np.repeat(np.arange(b, dtype=np.int64), np.diff(prod.indptr))
    cols = prod.indices.astype(np.int64)
    scores = prod.data.astype(np.float32)
    keep = (cols != rows + start) & (scores > 0)
    rows, cols, scores = rows[keep], cols[keep], scores[keep]
    # pre-filter without sorting: scores binned into 256 buckets (monotone: x * 256 is exact in float32), each
    # row's cut bucket is the highest one with at least k entries at or above it; the k-th best score lies in
    # it, so dropping the buckets below loses nothing
    bucket = np.minimum((scores * np.float32(BUCKETS)).astype(np.int64), BUCKETS - 1)
    hist = np.bincount(rows * BUCKETS + bucket, minlength=b * BUCKETS).reshape(b, BUCKETS)
    reach = np.cumsum(hist[:, ::-1], axis=1) >= k               # [r, j]: >= k entries in buckets >= 255 - j
    cut = np.where(reach.any(axis=1), BUCKETS - 1 - reach.argmax(axis=1), 0)
    keep = bucket >= cut[rows]
    rows, cols, scores = rows[keep], cols[keep], scores[keep]
    # positive float32s order like their bit patterns, so (row, inverted bits) in one int64 sorts every row's
    # scores descending at once; each row's k-th entry is its cut, and everything reaching it (the top k and
    # the ties at the k-th score) is ordered by pair key
    comp = (rows << 32) | (np.int64(0x7FFFFFFF) - scores.view(np.int32).astype(np.int64))
    keep = reaching_kth(comp, rows, b, k, 32)
    rows, cols, scores, comp = rows[keep], cols[keep], scores[keep], comp[keep]
    stats["sorted_candidates"] += len(rows)
    order = np.lexsort((pair_keys(seed, rows + start, cols), comp))
    rows, cols, scores = rows[order], cols[order], scores[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, np.arange(b))[rows]
    sel = rank < k
    return np.bincount(rows[sel], minlength=b).astype(np.int32), cols[sel], scores[sel]


def run_name_mining(x: sp.csr_matrix, k: int, seed: int, chunk_work: int = CHUNK_WORK):
    """Exact top-k cosine neighbours of every row of `x` (L2-normalised, non-negative):
    (counts int32 per row, ids int64 flat, scores float32 flat, stats)."""
    t0 = time.perf_counter()
    n = x.shape[0]
    xt = x.T.tocsr()
    df = np.diff(xt.indptr).astype(np.int64)
    owner = np.repeat(np.arange(n, dtype=np.int64), np.diff(x.indptr))
    row_work = np.bincount(owner, weights=df[x.indices], minlength=n).astype(np.int64)
    chunks = _chunks(row_work, chunk_work)
    stats = {"n_features": int(x.shape[1]), "sum_df2": int((df ** 2).sum()), "product_pairs": 0,
             "sorted_candidates": 0, "n_chunks": len(chunks), "chunk_work": int(chunk_work)}
    parts = []
    for a, b in chunks:
        prod = x[a:b] @ xt
        stats["product_pairs"] += int(prod.nnz)
        parts.append(_top_k(prod, a, k, seed, stats))
    if parts:
        counts, ids, scores = (np.concatenate([p[i] for p in parts]) for i in range(3))
    else:
        counts, ids, scores = np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    stats["mine_seconds"] = round(time.perf_counter() - t0, 3)
    return counts, ids, scores, stats


def mine_name_topk(names: Sequence[str], k: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Exact top-k name-similarity neighbours of each entity: (neg_ids per entity int64, neg_scores float32)."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (got {k!r})")
    counts, ids, scores, _ = run_name_mining(name_vectors(names), k, seed)
    off = np.concatenate([[0], np.cumsum(counts)])
    return ([ids[off[i]:off[i + 1]] for i in range(len(counts))],
            [scores[off[i]:off[i + 1]] for i in range(len(counts))])


def fill_from_names(jaccard: tuple[np.ndarray, np.ndarray, np.ndarray],
                    names: tuple[np.ndarray, np.ndarray, np.ndarray], k: int):
    """JD-CCL's fallback: each entity keeps its Jaccard list (best first) and gets its remaining slots up to k
    from its name-similarity list (best first), skipping entities the Jaccard list already holds.

    Both inputs are (counts per entity, ids flat, scores flat) in entity order. Returns (counts, ids, scores,
    from_names per entity). A listed score is that candidate's score under the source that listed it (Jaccard
    first, descending; then cosine, descending)."""
    jc, jids, jsc = jaccard
    nc, nids, nsc = names
    n = len(jc)
    j_rows = np.repeat(np.arange(n, dtype=np.int64), jc)
    n_rows = np.repeat(np.arange(n, dtype=np.int64), nc)
    j_pos = np.arange(len(jids)) - np.repeat(np.cumsum(jc) - jc, jc)
    n_pos = np.arange(len(nids)) - np.repeat(np.cumsum(nc) - nc, nc) + k     # after every Jaccard slot
    fresh = ~np.isin(n_rows * n + nids, j_rows * n + jids)
    rows = np.concatenate([j_rows, n_rows[fresh]])
    ids = np.concatenate([jids, nids[fresh]]).astype(np.int64)
    scores = np.concatenate([jsc, nsc[fresh]]).astype(np.float32)
    from_names = np.concatenate([np.zeros(len(jids), bool), np.ones(int(fresh.sum()), bool)])
    order = np.lexsort((np.concatenate([j_pos, n_pos[fresh]]), rows))
    rows, ids, scores, from_names = rows[order], ids[order], scores[order], from_names[order]
    sel = np.arange(len(rows)) - np.searchsorted(rows, np.arange(n))[rows] < k
    counts = np.bincount(rows[sel], minlength=n).astype(np.int32)
    filled = np.bincount(rows[sel & from_names], minlength=n).astype(np.int32)
    return counts, ids[sel], scores[sel], filled
