"""Exact top-k Jaccard neighbours of attribute sets: the numeric kernel of JD-CCL negative mining.

Pure numpy/scipy, no Ray: `mel_ray.negatives` distributes `mine_rows` over row blocks. Definitions:

* J(i, j) = |A_i & A_j| / |A_i | A_j| over the sets of attribute ids (duplicates within an entity count once).
* Result for query i: the candidates j != i with J(i, j) > 0, ordered by (J desc, pair_key(seed, i, j) asc),
  the first k of them. `pair_key` is a seeded splitmix64 mix of (seed, i, j); for a fixed (seed, i) it is a
  bijection of j, so the order is strict and total and the result is a pure function of
  (attribute sets, k, seed): independent of block size, worker count and the order attributes are listed.
* Scores are compared as float64 inter/union: inter and union are small integers, IEEE division is
  correctly rounded, so equal rationals give equal doubles and distinct ones (denominators < 2^26) differ.

Algorithm (exact; the naive sparse product costs sum_a df_a^2, ~N^2 for attributes with df 30-80%):

1. Attribute ids are ranked by document frequency. The F most frequent ("head", F <= 48, chosen by a cost
   model or forced with `frequent_bits`) become a bitmask m_i in a uint64 that also holds |A_i| in its high
   bits; the rest ("tail") stay as CSR.
2. Groups: entities with the same (m_j, |A_j|). For a candidate j that shares no tail attribute with i
   (r_ij = 0), J(i, j) = f / (|A_i| + |A_j| - f) with f = popcount(m_i & m_j) depends on j's group only.
3. Per query key (a group, since queries with equal (m, size) behave identically) over all groups:
   sort group scores descending, accumulate member counts (minus the query itself) and let g* be the score
   at which the count first reaches k. Every member of a group scoring >= g* scores >= g* itself (members
   with r_ij > 0 score strictly more than their group), so at least k candidates score >= g*: the k-th best
   score is >= g*. Candidate groups of the key: those with score > g* (fewer than k members in total, all
   taken) and those with score == g* ("tie" groups). If fewer than k members score > 0, g* = 0 and every
   group with f > 0 is taken. A key's score for a group depends only on (f, group size), so the counts are
   binned by (f, size) and g* is found on a few hundred bins instead of G groups.
4. Per block of queries: tail overlaps r_ij from the sparse product A_tail[block] @ A_tail^T; these pairs
   get exact scores (popcount(m_i & m_j) + r_ij) / (s_i + s_j - inter) and are kept when >= g* (all others
   rank below at least k candidates; a float pre-filter with a safety margin runs first, the exact test on
   its survivors). Members of candidate groups are expanded; self and members already found by the
   product are dropped (a member with r_ij > 0 of a group scoring >= g* scores > g*, so it is among the
   kept product pairs, with its exact score). Of the tie members only the k with the smallest pair keys
   can be selected, so large tie sets are thinned with a key threshold (expected 4k survivors; a row left
   with fewer than k falls back to all its ties). Final order: an int64 sort of (row, floor(score * 2^40))
   finds each row's k-th best score (distinct rationals with denominators < 2^18 differ by > 2^-36, so
   this integer image of the score is exact); candidates reaching it are ordered by (score, pair key) and
   the first k per row are the result.

Work: sum over tail attributes of df^2 (the product; the head is never multiplied) plus G^2 for the key x
group table plus the members of candidate groups; memory per block is bounded by the block's work, which
`mine_rows` splits into chunks of at most `CHUNK_WORK` pairs. Worst case: a KB where most entities share
one identical attribute set makes every query hash that whole tie group (quadratic in its size).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_SALT_CAND = 0xD1B54A32D192ED03
MAX_FREQUENT_BITS = 48       # the packed word holds the head mask (low bits) and the set size (high bits)
CHUNK_WORK = 1_000_000        # pairs per chunk (product nnz bound + group members): cache-sized temporaries
TIE_OVERSAMPLE = 4.0          # expected survivors of the tie thinning, in units of k
KEY_TABLE_CHUNK = 4_000_000   # entries of the key x group score table computed at once
ALGORITHM_VERSION = 1


# ------------------------------------------------------------------------------------------- pair keys


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic); a bijection of uint64."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _C1
    z = (z ^ (z >> np.uint64(27))) * _C2
    return z ^ (z >> np.uint64(31))


def mix_py(z: int) -> int:
    """Pure-Python splitmix64 finaliser (reference for tests)."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _seed_words(seed: int) -> tuple[np.uint64, np.uint64]:
    s = mix_py(int(seed) & MASK64)
    return np.uint64(s), np.uint64(mix_py(s ^ _SALT_CAND))


def query_salts(seed: int, ids: np.ndarray) -> np.ndarray:
    sq, _ = _seed_words(seed)
    return _mix(np.asarray(ids, dtype=np.int64).astype(np.uint64) ^ sq)


def candidate_salts(seed: int, ids: np.ndarray) -> np.ndarray:
    _, sc = _seed_words(seed)
    return _mix(np.asarray(ids, dtype=np.int64).astype(np.uint64) ^ sc)


def pair_keys(seed: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Tie-break keys of pairs (i, j): mix(mix(i ^ s1) ^ mix(j ^ s2)), s1, s2 derived from the seed."""
    return _mix(query_salts(seed, i) ^ candidate_salts(seed, j))


def reaching_kth(comp: np.ndarray, rows: np.ndarray, n_rows: int, k: int, shift: int) -> np.ndarray:
    """Mask of the entries that reach their row's k-th best: the top k and the ties at the k-th score.
    comp = (row << shift) | a key that sorts each row's entries best first; rows are 0..n_rows-1."""
    srt = np.sort(comp)
    first = np.searchsorted(srt, np.arange(n_rows, dtype=np.int64) << shift)
    last = np.append(first[1:], len(srt))
    full = last - first >= k
    kth = np.full(n_rows, np.iinfo(np.int64).max, dtype=np.int64)
    kth[full] = srt[first[full] + k - 1]
    return comp <= kth[rows]


def pair_key_py(seed: int, i: int, j: int) -> int:
    s1 = mix_py(int(seed) & MASK64)
    s2 = mix_py(s1 ^ _SALT_CAND)
    return mix_py(mix_py(i ^ s1) ^ mix_py(j ^ s2))


# ------------------------------------------------------------------------------------------- encoding


@dataclasses.dataclass
class Encoded:
    """Attribute sets as CSR over ids ranked by document frequency (id 0 = most frequent)."""
    indptr: np.ndarray     # int64 (N+1,)
    indices: np.ndarray    # int32, sorted and unique within each row
    df: np.ndarray         # int64 (n_attrs,), descending

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.indptr).astype(np.int32)


def encode_csr(indptr: np.ndarray, indices: np.ndarray) -> Encoded:
    """Normalise any CSR of attribute ids: dedupe within rows, re-rank ids by df (ties: smaller id first)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indptr) - 1
    if n < 0 or indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices):
        raise ValueError("malformed CSR indptr")
    if len(indices) and indices.min() < 0:
        raise ValueError("attribute ids must be >= 0")
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    if len(indices):
        order = np.lexsort((indices, rows))
        rows, indices = rows[order], indices[order]
        keep = np.ones(len(indices), dtype=bool)
        keep[1:] = (rows[1:] != rows[:-1]) | (indices[1:] != indices[:-1])
        rows, indices = rows[keep], indices[keep]
        _, indices = np.unique(indices, return_inverse=True)   # compact ids
    df = np.bincount(indices, minlength=int(indices.max()) + 1 if len(indices) else 0).astype(np.int64)
    rank_order = np.argsort(-df, kind="stable")
    rank = np.empty_like(rank_order)
    rank[rank_order] = np.arange(len(rank_order))
    new = rank[indices] if len(indices) else indices
    order = np.lexsort((new, rows))
    counts = np.bincount(rows, minlength=n)
    out_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=out_ptr[1:])
    return Encoded(out_ptr, new[order].astype(np.int32), df[rank_order])


def encode_attributes(attributes: Sequence[Sequence[str]] | pa.Array | pa.ChunkedArray) -> Encoded:
    """list of attribute lists (or an Arrow list<string> column) -> Encoded. Null items are ignored."""
    if isinstance(attributes, Encoded):
        return attributes
    if not isinstance(attributes, (pa.Array, pa.ChunkedArray)):
        attributes = pa.array([list(a) if a is not None else [] for a in attributes],
                              type=pa.list_(pa.string()))
    if isinstance(attributes, pa.ChunkedArray):
        attributes = (attributes.combine_chunks() if attributes.num_chunks
                      else pa.array([], pa.list_(pa.string())))
    n = len(attributes)
    if attributes.null_count:
        attributes = pc.fill_null(attributes, pa.scalar([], attributes.type))
    flat = pc.list_flatten(attributes)
    parents = pc.list_parent_indices(attributes).to_numpy().astype(np.int64)
    valid = pc.is_valid(flat).to_numpy(zero_copy_only=False)
    codes = pc.dictionary_encode(flat).indices.to_numpy(zero_copy_only=False)
    parents, codes = parents[valid], codes[valid].astype(np.int64)
    counts = np.bincount(parents, minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    order = np.argsort(parents, kind="stable")
    return encode_csr(indptr, codes[order])


# ------------------------------------------------------------------------------------------- index


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def _expand(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ranges [starts[t], starts[t] + counts[t]) and, for each element, its t."""
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    offsets = np.cumsum(counts) - counts
    idx = np.arange(len(owner), dtype=np.int64) - offsets[owner] + np.asarray(starts, dtype=np.int64)[owner]
    return idx, owner


def _masks(enc: Encoded, bits: int) -> np.ndarray:
    rows = np.repeat(np.arange(enc.n, dtype=np.int64), np.diff(enc.indptr))
    sel = enc.indices < bits
    masks = np.zeros(enc.n, dtype=np.uint64)
    np.bitwise_or.at(masks, rows[sel], np.left_shift(np.uint64(1), enc.indices[sel].astype(np.uint64)))
    return masks


def _count_groups(masks: np.ndarray, sizes: np.ndarray) -> int:
    key = np.stack([masks, sizes.astype(np.uint64)], axis=1)
    order = np.lexsort((key[:, 1], key[:, 0]))
    key = key[order]
    return int(1 + np.count_nonzero(np.any(key[1:] != key[:-1], axis=1))) if len(key) else 0


def size_shift(sizes: np.ndarray) -> int:
    """Bit position of the size in the packed (mask | size << shift) word; the head gets the bits below."""
    top = int(sizes.max()) if len(sizes) else 0
    return 64 - max(top.bit_length(), 1)


def choose_frequent_bits(enc: Encoded, max_bits: int = MAX_FREQUENT_BITS) -> tuple[int, dict]:
    """F minimising (tail product work) + (key x group table) = sum_{a >= F} df_a^2 + G(F)^2."""
    df = enc.df
    useful = int(np.count_nonzero(df >= 2))
    limit = min(max_bits, useful, size_shift(enc.sizes))
    tail_work = np.concatenate([np.cumsum(df[::-1] ** 2)[::-1], [0]])
    best, best_cost, table = 0, None, {}
    sizes = enc.sizes
    for bits in sorted({0, *range(2, limit + 1, 2), limit}):
        g = _count_groups(_masks(enc, bits), sizes)
        cost = int(tail_work[bits]) + g * g
        table[bits] = (int(tail_work[bits]), g)
        if best_cost is None or cost < best_cost:
            best, best_cost = bits, cost
    return best, table


@dataclasses.dataclass
class Index:
    """Everything a worker needs, as flat numpy arrays (ray.put once, zero-copy ray.get in the actors)."""
    arrays: dict[str, np.ndarray]
    params: dict[str, Any]

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.arrays[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_payload(self) -> dict:
        return {"arrays": self.arrays, "params": self.params}

    @classmethod
    def from_payload(cls, payload: dict) -> Index:
        return cls(payload["arrays"], payload["params"])


def build_index(enc: Encoded, k: int, frequent_bits: int | None = None) -> Index:
    if k < 1:
        raise ValueError("k must be >= 1")
    t0 = time.perf_counter()
    n = enc.n
    sizes = enc.sizes
    if frequent_bits is None:
        bits, _ = choose_frequent_bits(enc)
    else:
        bits = int(min(max(frequent_bits, 0), MAX_FREQUENT_BITS, len(enc.df), size_shift(sizes)))
    masks = _masks(enc, bits)
    shift = size_shift(sizes)
    packed = masks | (sizes.astype(np.uint64) << np.uint64(shift))
    # tail CSR (rows) and its transpose (postings)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(enc.indptr))
    tail = enc.indices >= bits
    t_rows, t_cols = rows[tail], enc.indices[tail].astype(np.int64) - bits
    n_tail = max(len(enc.df) - bits, 0)
    t_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(t_rows, minlength=n), out=t_ptr[1:])
    t_idx = t_cols.astype(np.int32)
    order = np.lexsort((t_rows, t_cols))
    p_ptr = np.zeros(n_tail + 1, dtype=np.int64)
    np.cumsum(np.bincount(t_cols, minlength=n_tail), out=p_ptr[1:])
    p_idx = t_rows[order].astype(np.int32)
    if len(p_idx) < 2 ** 31 - 1:
        p_ptr = p_ptr.astype(np.int32)   # all-int32 index arrays: scipy's product then copies nothing
    tail_df = enc.df[bits:]
    tail_work = np.zeros(n, dtype=np.int64)
    np.add.at(tail_work, t_rows, tail_df[t_cols])
    # groups of (mask, size)
    gorder = np.lexsort((np.arange(n), sizes, masks))
    gm, gs = masks[gorder], sizes[gorder]
    new = np.ones(n, dtype=bool)
    if n:
        new[1:] = (gm[1:] != gm[:-1]) | (gs[1:] != gs[:-1])
    starts = np.flatnonzero(new)
    n_groups = len(starts)
    g_ptr = np.append(starts, n).astype(np.int64)
    g_count = np.diff(g_ptr)
    g_mask, g_size = gm[starts], gs[starts].astype(np.int64)
    gid = np.empty(n, dtype=np.int32)
    gid[gorder] = np.repeat(np.arange(n_groups, dtype=np.int32), g_count)
    g_members = gorder.astype(np.int32)
    # key x group table: per key, its g* and candidate groups
    g_star, kc_rows, kc_group, kc_score, kc_tie = _key_table(g_mask, g_size, g_count, bits, k)
    kc_rows_a = kc_rows
    kc_ptr = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(kc_rows_a, minlength=n_groups), out=kc_ptr[1:])
    kc_group_a = kc_group
    kc_members = np.zeros(n_groups, dtype=np.int64)
    np.add.at(kc_members, kc_rows_a, g_count[kc_group_a])
    arrays = {
        "sizes": sizes, "masks": masks, "packed": packed, "gid": gid, "tail_work": tail_work,
        "t_ptr": t_ptr, "t_idx": t_idx, "p_ptr": p_ptr, "p_idx": p_idx,
        "g_ptr": g_ptr, "g_members": g_members, "g_count": g_count, "g_star": g_star,
        "kc_ptr": kc_ptr, "kc_group": kc_group_a, "kc_score": kc_score,
        "kc_tie": kc_tie, "kc_members": kc_members,
    }
    params = {
        "n": n, "k": int(k), "frequent_bits": bits, "size_shift": shift,
        "fast_select": bool(2 * (int(sizes.max()) if n else 0) < (1 << 18)),
        "n_tail_attributes": n_tail, "n_groups": n_groups,
        "key_group_entries": len(kc_group_a),
        "tail_df2": int((tail_df.astype(np.int64) ** 2).sum()),
        "all_df2": int((enc.df.astype(np.int64) ** 2).sum()),
        "index_seconds": round(time.perf_counter() - t0, 3),
    }
    return Index(arrays, params)


def _key_table(g_mask: np.ndarray, g_size: np.ndarray, g_count: np.ndarray, bits: int, k: int):
    """For every key (= group, as a query), g* and its candidate groups (score >= g*, score > 0).

    A key's score for a group depends only on (f, size) with f = popcount(key mask & group mask), so the
    member counts are binned by (f, size) (a few hundred bins instead of G groups), g* is found on the
    bins, and each group is a candidate iff its bin is.
    """
    n_groups = len(g_mask)
    size_vals, sidx = np.unique(g_size, return_inverse=True)
    n_sizes = len(size_vals)
    n_bins = (bits + 1) * n_sizes
    f_of_bin = np.repeat(np.arange(bits + 1, dtype=np.int64), n_sizes)
    s_of_bin = np.tile(size_vals, bits + 1)
    sidx = sidx.astype(np.int32)
    weights = g_count.astype(np.float64)
    g_star = np.zeros(n_groups, dtype=np.float64)
    out_rows, out_group, out_score, out_tie = [], [], [], []
    chunk = max(1, KEY_TABLE_CHUNK // max(n_groups, n_bins, 1))
    for c0 in range(0, n_groups, chunk):
        keys = np.arange(c0, min(c0 + chunk, n_groups))
        c = len(keys)
        f = np.bitwise_count(g_mask[keys][:, None] & g_mask[None, :]).astype(np.int32)
        flat = f * n_sizes
        flat += sidx[None, :]
        flat += (np.arange(c, dtype=np.int32) * n_bins)[:, None]
        w = np.bincount(flat.ravel(), weights=np.broadcast_to(weights, (c, n_groups)).ravel(),
                        minlength=c * n_bins).reshape(c, n_bins)
        self_bin = np.bitwise_count(g_mask[keys]).astype(np.int64) * n_sizes + sidx[keys]
        w[np.arange(c), self_bin] -= 1                       # the query itself is no candidate
        fb = f_of_bin[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(fb > 0, fb / np.maximum(g_size[keys][:, None] + s_of_bin[None, :] - fb, 1), 0.0)
        w = np.where(score > 0, w, 0.0)
        order = np.argsort(-score, axis=1, kind="stable")
        s_sorted = np.take_along_axis(score, order, axis=1)
        cum = np.cumsum(np.take_along_axis(w, order, axis=1), axis=1)
        reached = cum >= k
        has = reached.any(axis=1)
        gstar = np.where(has, s_sorted[np.arange(c), reached.argmax(axis=1)], 0.0)
        g_star[keys] = gstar
        cand_bin = (score > 0) & (score >= gstar[:, None])
        r, g = np.nonzero(cand_bin.ravel()[flat])
        sc = score.ravel()[flat[r, g]]
        out_rows.append(keys[r])
        out_group.append(g.astype(np.int32))
        out_score.append(sc)
        out_tie.append((sc == gstar[r]) & (gstar[r] > 0))
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    return (g_star, cat(out_rows, np.int64), cat(out_group, np.int32), cat(out_score, np.float64),
            cat(out_tie, bool))


# ------------------------------------------------------------------------------------------- mining


class Tail:
    """The tail posting matrix as a scipy CSR built on the index arrays (no copy)."""

    def __init__(self, ix: Index):
        n = ix.params["n"]
        n_tail = ix.params["n_tail_attributes"]
        self.ones = np.ones(len(ix.p_idx), dtype=np.int32)
        self.postings = sp.csr_matrix((self.ones, ix.p_idx, ix.p_ptr), shape=(n_tail, n), copy=False)
        self.n_tail = n_tail


def new_stats() -> dict[str, int]:
    return {"rows": 0, "chunks": 0, "product_pairs": 0, "exact_kept": 0, "group_pairs": 0,
            "tie_pairs": 0, "tie_fallback_rows": 0, "sorted_candidates": 0,
            "t_product": 0.0, "t_exact": 0.0, "t_groups": 0.0, "t_select": 0.0}


def mine_rows(ix: Index, start: int, stop: int, seed: int, tail: Tail | None = None,
              stats: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k of queries start..stop-1: (counts per row int32, ids int64 flat, scores float32 flat)."""
    tail = tail or Tail(ix)
    stats = stats if stats is not None else new_stats()
    work = ix.tail_work[start:stop] + ix.kc_members[ix.gid[start:stop]] + 1
    cum = np.cumsum(work)
    bounds = [start]
    while bounds[-1] < stop:
        base = cum[bounds[-1] - start - 1] if bounds[-1] > start else 0
        nxt = start + int(np.searchsorted(cum, base + CHUNK_WORK, side="right"))
        bounds.append(min(stop, max(nxt, bounds[-1] + 1)))
    parts = [_mine_chunk(ix, tail, a, b, seed, stats) for a, b in itertools.pairwise(bounds)]
    stats["rows"] += stop - start
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


def _mine_chunk(ix: Index, tail: Tail, c0: int, c1: int, seed: int, stats: dict):
    n, k = ix.params["n"], ix.params["k"]
    b = c1 - c0
    stats["chunks"] += 1
    sizes, masks, gid = ix.sizes, ix.masks, ix.gid
    q_size = sizes[c0:c1].astype(np.int64)
    q_mask = masks[c0:c1]
    q_key = gid[c0:c1].astype(np.int64)
    q_star = ix.g_star[q_key]

    # 1. exact candidates: pairs sharing a tail attribute. A float pre-filter with a safety margin keeps
    #    every pair whose score could be >= g*; survivors get the exact score and the exact test.
    p0, p1 = ix.t_ptr[c0], ix.t_ptr[c1]
    if p1 > p0 and tail.n_tail:
        a_q = sp.csr_matrix((tail.ones[:p1 - p0], ix.t_idx[p0:p1],
                             (ix.t_ptr[c0:c1 + 1] - p0).astype(ix.p_ptr.dtype)),
                            shape=(b, tail.n_tail), copy=False)
        t0 = time.perf_counter()
        prod = a_q @ tail.postings
        t1 = time.perf_counter()
        stats["t_product"] += t1 - t0
        per_row = np.diff(prod.indptr)
        cols, r = prod.indices, prod.data
        stats["product_pairs"] += len(cols)
        pj = ix.packed[cols]
        inter = np.bitwise_count(np.repeat(q_mask, per_row) & pj).astype(np.int32)
        inter += r
        union = (pj >> np.uint64(ix.params["size_shift"])).astype(np.int32)
        union += np.repeat(q_size.astype(np.int32), per_row)
        union -= inter
        cut = np.repeat(q_star * (1.0 - 1e-9), per_row)
        cut *= union
        idx = np.flatnonzero(inter >= cut)
        del pj, cut
        e_row = np.searchsorted(prod.indptr, idx, side="right") - 1
        e_col = cols[idx].astype(np.int64)
        e_score = inter[idx] / union[idx]
        del prod, cols, r, inter, union
        keep = (e_score >= q_star[e_row]) & (e_col != e_row + c0)
        e_row, e_col, e_score = e_row[keep], e_col[keep], e_score[keep]
        stats["t_exact"] += time.perf_counter() - t1
    else:
        e_row = e_col = np.zeros(0, np.int64)
        e_score = np.zeros(0, np.float64)
    stats["exact_kept"] += len(e_col)

    # 2. candidates without a shared tail attribute: members of the key's candidate groups
    t2 = time.perf_counter()
    kst = ix.kc_ptr[q_key]
    kcnt = ix.kc_ptr[q_key + 1] - kst
    pidx, prow = _expand(kst, kcnt)
    grp = ix.kc_group[pidx]
    gcnt = ix.g_count[grp]
    midx, mown = _expand(ix.g_ptr[grp], gcnt)
    m_col = ix.g_members[midx].astype(np.int64)
    m_row = prow[mown]
    m_score = ix.kc_score[pidx][mown]
    m_tie = ix.kc_tie[pidx][mown]
    stats["group_pairs"] += len(m_col)
    drop = m_col == m_row + c0
    if len(e_col) and len(m_col):
        ekeys = np.sort(e_row * n + e_col)
        mkeys = m_row * n + m_col
        pos = np.minimum(np.searchsorted(ekeys, mkeys), len(ekeys) - 1)
        drop |= ekeys[pos] == mkeys
    m_row, m_col, m_score, m_tie = m_row[~drop], m_col[~drop], m_score[~drop], m_tie[~drop]
    m_key = pair_keys(seed, m_row + c0, m_col)
    stats["tie_pairs"] += int(m_tie.sum())
    # thin large tie sets: only the k smallest keys of a row's tie members can be selected
    t_per_row = np.bincount(m_row[m_tie], minlength=b)
    big = t_per_row > TIE_OVERSAMPLE * k
    if big.any():
        frac = np.where(big, TIE_OVERSAMPLE * k / np.maximum(t_per_row, 1), 1.0)
        thresh = np.where(big, (frac * 2.0 ** 64).astype(np.float64), 0.0)
        limit = np.full(b, np.iinfo(np.uint64).max, dtype=np.uint64)
        limit[big] = thresh[big].astype(np.uint64)
        passed = ~m_tie | (m_key < limit[m_row])
        kept_ties = np.bincount(m_row[m_tie & passed], minlength=b)
        short = big & (kept_ties < k)
        if short.any():
            stats["tie_fallback_rows"] += int(short.sum())
            passed |= short[m_row]
        m_row, m_col, m_score, m_key = m_row[passed], m_col[passed], m_score[passed], m_key[passed]

    # 3. final order: row, score desc, key asc; first k per row
    t3 = time.perf_counter()
    stats["t_groups"] += t3 - t2
    rows = np.concatenate([e_row, m_row])
    cols = np.concatenate([e_col, m_col])
    scores = np.concatenate([e_score, m_score])
    stats["sorted_candidates"] += len(rows)
    if ix.params["fast_select"] and b < (1 << 22):
        # exact integer image of the score order (distinct rationals with denominators < 2^18 differ by
        # more than 2^-36, so floor(score * 2^40) keeps them apart and equal ones together), composed
        # with the row: one int64 sort gives each row's k-th best score; keep what reaches it (top k plus
        # ties at the k-th score) and order only those by pair key.
        comp = (rows << 41) | ((1 << 41) - 1 - np.floor(scores * 2.0 ** 40).astype(np.int64))
        keep = reaching_kth(comp, rows, b, k, 41)
        rows, cols, scores, comp = rows[keep], cols[keep], scores[keep], comp[keep]
        order = np.lexsort((pair_keys(seed, rows + c0, cols), comp))
    else:
        order = np.lexsort((pair_keys(seed, rows + c0, cols), -scores, rows))
    rows, cols, scores = rows[order], cols[order], scores[order]
    first = np.searchsorted(rows, np.arange(b))
    rank = np.arange(len(rows)) - first[rows]
    sel = rank < k
    counts = np.bincount(rows[sel], minlength=b).astype(np.int32)
    stats["t_select"] += time.perf_counter() - t3
    return counts, cols[sel], scores[sel].astype(np.float32)


# ------------------------------------------------------------------------------------------- references


def brute_force_topk(attributes, k: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Reference: every pair with Python sets; order (J desc, pair_key_py asc); J > 0, j != i."""
    if isinstance(attributes, Encoded):
        sets = [set(attributes.indices[attributes.indptr[i]:attributes.indptr[i + 1]].tolist())
                for i in range(attributes.n)]
    else:
        sets = [{a for a in attrs if a is not None} for attrs in attributes]
    ids_out, scores_out = [], []
    for i, a in enumerate(sets):
        cands = []
        for j, b in enumerate(sets):
            if j == i or not a or not b:
                continue
            inter = len(a & b)
            if inter:
                cands.append((-(inter / len(a | b)), pair_key_py(seed, i, j), j))
        cands.sort()
        top = cands[:k]
        ids_out.append(np.array([c[2] for c in top], dtype=np.int64))
        scores_out.append(np.array([-c[0] for c in top], dtype=np.float32))
    return ids_out, scores_out
