"""Synthetic knowledge bases whose attribute statistics resemble Wikidata-derived MEL KBs (seeded).

What the JD-CCL miner has to cope with in WikiMEL / RichpediaMEL / WikiDiverse style KBs:
- a handful of "property: value" statements with document frequency 30-80% ("instance of: human",
  "sex or gender: male", "country of citizenship: United States", ...), partly correlated;
- a mid band of a few-percent statements (common occupations, decades, big countries);
- a Zipf-like long tail (places of birth, employers, awards, exact dates), vocabulary growing with the KB;
- 5-15 statements per entity, a few entities with none, and some near-duplicate entities whose attribute
  sets are identical (stubs that only say "human, male, United States"), which is where ties come from.

`make_kb(n, seed)` returns a list of attribute lists (strings) and `make_kb_csr(n, seed)` the same KB as a
CSR (indptr, indices) over integer attribute ids without building the strings. Usage from the shell:

    python benchmarks/kbgen.py --n 110000 --stats
"""

from __future__ import annotations

import argparse
import json

import numpy as np

# (statement, document frequency) of the head: people dominate Wikidata-derived MEL KBs
HEAD = [
    ("instance of: human", 0.60),
    ("sex or gender: male", 0.55),
    ("country of citizenship: United States", 0.36),
    ("occupation: actor", 0.31),
    ("languages spoken: English", 0.42),
    ("sex or gender: female", 0.22),
    ("instance of: city", 0.06),
    ("occupation: politician", 0.09),
    ("country of citizenship: United Kingdom", 0.08),
    ("occupation: singer", 0.07),
    ("award received: Academy Award", 0.03),
    ("instance of: film", 0.05),
]
TAIL_PROPERTIES = ["place of birth", "date of birth", "employer", "educated at", "award received",
                   "member of sports team", "genre", "notable work", "position held", "located in"]
MIN_ATTRS, MAX_ATTRS = 5, 15
EMPTY_FRACTION = 0.01       # entities without attributes (the ingest keeps them)
STUB_FRACTION = 0.03        # entities made only of head statements (identical sets -> ties)
DUP_FRACTION = 0.02         # exact copies of another entity's attribute set
ZIPF_EXPONENT = 1.05
ZIPF_OFFSET = 10           # flattens the top of the tail: its most common value has df ~10%


def tail_vocabulary_size(n: int) -> int:
    """Heaps-like growth: a larger KB mentions more distinct places, employers, awards."""
    return max(200, int(3 * n ** 0.85))


def make_kb_csr(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(indptr int64, indices int32 sorted per row, n_attribute_ids): ids < len(HEAD) are the head."""
    rng = np.random.default_rng([seed, n, 20240611])
    n_head = len(HEAD)
    v_tail = tail_vocabulary_size(n)
    head_p = np.array([p for _, p in HEAD])
    head = rng.random((n, n_head)) < head_p
    # correlation: male and female exclusive; "human" implied by either
    both = head[:, 1] & head[:, 5]
    head[both, 5] = False
    head[head[:, 1] | head[:, 5], 0] = True
    sizes = rng.integers(MIN_ATTRS, MAX_ATTRS + 1, size=n)
    n_head_i = head.sum(1)
    n_tail = np.maximum(sizes - n_head_i, 0)
    # Zipf tail by inverse CDF over ranks 1..v_tail
    ranks = np.arange(1, v_tail + 1, dtype=np.float64)
    cdf = np.cumsum((ranks + ZIPF_OFFSET) ** -ZIPF_EXPONENT)
    cdf /= cdf[-1]
    draws = np.searchsorted(cdf, rng.random((n, MAX_ATTRS)), side="right").astype(np.int64) + n_head
    draws = np.minimum(draws, n_head + v_tail - 1)
    cols = np.arange(MAX_ATTRS)
    draws[cols[None, :] >= n_tail[:, None]] = -1
    stub = rng.random(n) < STUB_FRACTION
    draws[stub] = -1
    rows = [np.where(head, np.arange(n_head)[None, :], -1), draws]
    mat = np.concatenate(rows, axis=1)
    empty = rng.random(n) < EMPTY_FRACTION
    mat[empty] = -1
    dup = np.flatnonzero(rng.random(n) < DUP_FRACTION)
    if len(dup):
        mat[dup] = mat[rng.integers(0, n, size=len(dup))]
    mat.sort(axis=1)
    keep = mat >= 0
    keep[:, 1:] &= mat[:, 1:] != mat[:, :-1]      # drop repeated tail draws
    counts = keep.sum(1)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = mat[keep].astype(np.int32)
    return indptr, indices, n_head + v_tail


def attribute_names(n_ids: int, seed: int = 0) -> list[str]:
    names = [s for s, _ in HEAD]
    for t in range(n_ids - len(HEAD)):
        names.append(f"{TAIL_PROPERTIES[(t * 7 + seed) % len(TAIL_PROPERTIES)]}: Q{t + 1000}")
    return names


def make_kb(n: int, seed: int = 0) -> list[list[str]]:
    indptr, indices, n_ids = make_kb_csr(n, seed)
    names = np.array(attribute_names(n_ids, seed), dtype=object)
    flat = names[indices].tolist()
    return [flat[indptr[i]:indptr[i + 1]] for i in range(n)]


def kb_stats(indptr: np.ndarray, indices: np.ndarray, n_ids: int) -> dict:
    n = len(indptr) - 1
    df = np.bincount(indices, minlength=n_ids).astype(np.int64)
    sizes = np.diff(indptr)
    top = np.sort(df)[::-1]
    return {
        "entities": n,
        "distinct_attributes": int((df > 0).sum()),
        "attributes_per_entity_mean": round(float(sizes.mean()), 2),
        "empty_entities": int((sizes == 0).sum()),
        "top_df_fraction": [round(float(d) / n, 3) for d in top[:8]],
        "sum_df_squared": int((df ** 2).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", action="store_true")
    args = parser.parse_args()
    indptr, indices, n_ids = make_kb_csr(args.n, args.seed)
    print(json.dumps(kb_stats(indptr, indices, n_ids), indent=2))


if __name__ == "__main__":
    main()
