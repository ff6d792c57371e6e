"""Sharded exact ranks equal a brute-force full score matrix + stable argsort, ties included."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mel_ray.scoring import count_before_gold, local_topk, merge_topk, metrics_from_ranks


def brute_force(scores: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, axis=1, kind="stable")            # stable: equal scores keep id order
    ranks = np.array([1 + int(np.where(order[i] == gold[i])[0][0]) for i in range(len(gold))])
    return ranks, order


@settings(max_examples=150, deadline=None, derandomize=True)
@given(n_m=st.integers(1, 6), n_e=st.integers(1, 30), levels=st.integers(1, 6), shards=st.integers(1, 5),
       seed=st.integers(0, 10_000))
def test_sharded_counts_and_topk_equal_brute_force(n_m, n_e, levels, shards, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=(n_m, n_e)).astype(np.float32)    # few levels: many exact ties
    gold = rng.integers(0, n_e, size=n_m)
    ranks_ref, order_ref = brute_force(scores, gold)

    gold_scores = torch.from_numpy(scores[np.arange(n_m), gold])
    bounds = np.linspace(0, n_e, shards + 1).astype(int)
    counts = torch.zeros(n_m, dtype=torch.long)
    parts = []
    for a, b in itertools.pairwise(bounds):
        if a == b:
            continue
        ids = torch.arange(a, b)
        shard = torch.from_numpy(scores[:, a:b])
        counts += count_before_gold(shard, ids, gold_scores, torch.from_numpy(gold))
        parts.append(local_topk(shard, ids, 10))
    assert (counts.numpy() + 1).tolist() == ranks_ref.tolist()
    top_ids, top_scores = merge_topk(parts, 10)
    assert top_ids.tolist() == order_ref[:, :10].tolist()
    assert np.array_equal(top_scores, np.take_along_axis(scores, order_ref[:, :10], axis=1))


def test_metrics():
    m = metrics_from_ranks(np.array([1, 2, 4, 30]))
    assert m["H@1"] == 0.25 and m["H@3"] == 0.5 and m["H@5"] == 0.75 and m["H@20"] == 0.75
    assert np.isclose(m["MRR"], (1 + 0.5 + 0.25 + 1 / 30) / 4) and m["MR"] == 37 / 4
