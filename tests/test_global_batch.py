"""The global-batch softmax (mel_ray/train/global_batch.py): 2 ranks x 16 under DDP == 1 process x 32.

Real torch.distributed (gloo on 127.0.0.1), 2 processes from torch.multiprocessing (spawn), a DDP-wrapped
GlobalBatchStep around a small float64 MELModel. One spawn runs every distributed check and saves what it saw
(losses, DDP-averaged gradients, gathered tensors) to files; the tests compare those with a single process.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import numpy as np
import pytest
import torch

from mel_ray.model import MELModel, ModelDims
from mel_ray.model.losses import build_columns, contrastive_loss
from mel_ray.train.global_batch import (
    GlobalBatchStep,
    fallback_rows,
    gather_rows,
    gather_side,
    global_mean,
    global_plan,
)

DIMS = {"text_global": 8, "text_local": 8, "image_global": 8, "image_local": 12, "hidden": 8}
L, P, S = 5, 5, 2           # text tokens, image tokens (CLS + 2 x 2 patches), synthetic views
N_ENTITIES, K, POOL = 40, 3, 6
WORLD = 2
# rank 0 takes the first half: ids 0 and 7 are gold on both ranks, 2, 5 and 14 twice on one rank
GOLD = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 2, 13, 5,
                 0, 7, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 14, 26])
# rank 1's gold ids are all gold on rank 0 too: in in_batch mode rank 1 contributes no entity rows
GOLD_SUBSET = np.concatenate([GOLD[:16], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 1]])

# name: mode, gold, rank 0's share, synthetic views (CVaCPT used), find_unused_parameters, ids with empty pools,
# and whether the plan is used (False: each rank's own softmax, the behaviour being fixed)
SCENARIOS = {
    "in_batch": ("in_batch", GOLD, 16, True, False, (), True),
    "both": ("both", GOLD, 16, True, False, (), True),
    "jaccard": ("jaccard", GOLD, 16, True, False, (), True),
    "jaccard_fallback": ("jaccard", GOLD, 16, True, False, (20,), True),     # a fallback on rank 1 only
    "in_batch_unused": ("in_batch", GOLD, 16, False, True, (), True),         # CVaCPT unused: find_unused=True
    "both_uneven": ("both", GOLD, 20, False, True, (), True),                 # 20 + 12 mentions
    "in_batch_subset": ("in_batch", GOLD_SUBSET, 16, True, False, (), True),  # rank 1 sends zero rows
    "in_batch_local": ("in_batch", GOLD, 16, True, False, (), False),
    "both_local": ("both", GOLD, 16, True, False, (), False),
    "jaccard_fallback_local": ("jaccard", GOLD, 16, True, False, (20,), False),
}
STEPS = 2                   # the second step runs after DDP has rebuilt its buckets


def features(n: int, seed: int, views: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"text_global": torch.randn(n, DIMS["text_global"], generator=g, dtype=torch.float64),
           "text_local": torch.randn(n, L, DIMS["text_local"], generator=g, dtype=torch.float64),
           "text_mask": torch.ones(n, L, dtype=torch.bool),
           "image_global": torch.randn(n, DIMS["image_global"], generator=g, dtype=torch.float64),
           "image_local": torch.randn(n, P, DIMS["image_local"], generator=g, dtype=torch.float64)}
    if views:
        out["synthetic_global"] = torch.randn(n, S, DIMS["image_global"], generator=g, dtype=torch.float64)
        out["n_views"] = torch.randint(0, S + 1, (n,), generator=g)
    return out


ENTITIES = features(N_ENTITIES, 1, views=False)


def entity_rows(ids: np.ndarray) -> dict:
    return {k: v[torch.from_numpy(np.asarray(ids, dtype=np.int64))] for k, v in ENTITIES.items()}


def pools(empty: tuple = ()) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    out = [rng.permutation(np.delete(np.arange(N_ENTITIES), e))[:POOL] for e in range(N_ENTITIES)]
    for e in empty:
        out[e] = out[e][:0]
    return out


def make_model(views: bool) -> MELModel:
    torch.manual_seed(0)
    return MELModel(ModelDims(**DIMS, cvacpt_weight=1.0 if views else 0.0)).double()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
            for n, p in model.named_parameters()}


def reference(name: str, step: int) -> tuple[float, dict]:
    """One process, the whole batch of 32: build_columns as train_step does today."""
    mode, gold, _, views, _, empty, _ = SCENARIOS[name]
    model = make_model(views)
    the_pools = pools(empty)
    cols = build_columns(gold, [the_pools[g] for g in gold], k=K, mode=mode)
    loss, _ = contrastive_loss(model(features(len(gold), 10 + step, views), entity_rows(cols.entity_ids)),
                               cols.targets, cols.mask)
    loss.backward()
    return float(loss.detach()), grads(model)


# ------------------------------------------------------------------------------------------- the workers


def _gather_checks(rank: int) -> dict:
    out = {}
    for counts in ([3, 0], [2, 5], [0, 0]):
        n = counts[rank]
        t = (torch.arange(n * 3, dtype=torch.float64).reshape(n, 3) + 100 * rank).requires_grad_()
        gathered = gather_rows(t, grad=True)
        weight = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape) * (rank + 1)
        if gathered.numel():
            (gathered * weight).sum().backward()
        out[f"rows{counts}"] = (gathered.detach(), t.grad if t.grad is not None else torch.zeros_like(t))
        ints = torch.arange(n * 4).reshape(n, 2, 2) + 1000 * rank
        out[f"ints{counts}"] = gather_rows(ints, grad=False)
        out[f"bool{counts}"] = gather_rows(ints[:, 0, 0] % 2 == 0, grad=False)
        out[f"bf16{counts}"] = gather_rows(ints.to(torch.bfloat16), grad=False, lengths=counts)
    n = [2, 3][rank]
    side = {"a": {"x": torch.full((n, 2, 3), float(rank), dtype=torch.float64),
                  "y": torch.arange(n, dtype=torch.float32) + 10 * rank},
            "b": {"z": torch.full((n, 4), rank + 0.5, dtype=torch.float64)}}
    out["side"] = gather_side(side, grad=False)
    return out


def _scenario(name: str, rank: int) -> list[dict]:
    mode, gold, split, views, find_unused, empty, use_plan = SCENARIOS[name]
    core = make_model(views)
    ddp = torch.nn.parallel.DistributedDataParallel(GlobalBatchStep(core), find_unused_parameters=find_unused)
    the_pools = pools(empty)
    rows = slice(0, split) if rank == 0 else slice(split, len(gold))
    steps = []
    for step in range(STEPS):
        mentions = {k: v[rows] for k, v in features(len(gold), 10 + step, views).items()}
        local_gold = gold[rows]
        batch_pools = [the_pools[g] for g in local_gold]
        cols = build_columns(local_gold, batch_pools, k=K, mode=mode)
        plan = global_plan(cols, local_gold, mode, fallback=fallback_rows(batch_pools, K)) if use_plan else None
        ids, targets, mask = (plan.entity_ids, plan.targets, plan.mask) if plan else (cols.entity_ids, cols.targets,
                                                                                      cols.mask)
        ddp.zero_grad(set_to_none=True)
        logits = ddp(mentions, entity_rows(ids), plan)
        loss, parts = contrastive_loss(logits, targets, mask)
        (loss * (plan.loss_scale if plan else 1.0)).backward()
        steps.append({"loss": sum(global_mean(parts, plan).values()) if plan else None,
                      "total": float(loss.detach()) * (plan.loss_scale if plan else 1.0),
                      "grads": grads(core), "counts": plan.counts if plan else None,
                      "n_columns": mask.shape[1], "fallbacks": cols.fallbacks})
    return steps


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results = {"gather": _gather_checks(rank)}
        for name in SCENARIOS:
            results[name] = _scenario(name, rank)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = str(tmp_path_factory.mktemp("global_batch"))
    ctx = torch.multiprocessing.spawn(_worker, args=(_free_port(), folder), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("the distributed workers did not finish in 120 s (a collective hung?)")
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


# --------------------------------------------------------------------------------------------- the tests


def test_gather_rows_unequal_counts_and_gradient(ranks):
    for counts in ([3, 0], [2, 5], [0, 0]):
        expected = torch.cat([torch.arange(n * 3, dtype=torch.float64).reshape(n, 3) + 100 * r
                              for r, n in enumerate(counts)])
        weight = torch.arange(expected.numel(), dtype=torch.float64).reshape(expected.shape)
        starts = [0, counts[0]]
        ints = torch.cat([torch.arange(n * 4).reshape(n, 2, 2) + 1000 * r for r, n in enumerate(counts)])
        for r in range(WORLD):
            gathered, grad = ranks[r]["gather"][f"rows{counts}"]
            assert torch.equal(gathered, expected)
            # the backward sums every rank's gradient of this rank's rows: weight x (1 + 2)
            assert torch.equal(grad, 3 * weight[starts[r]:starts[r] + counts[r]])
            assert torch.equal(ranks[r]["gather"][f"ints{counts}"], ints)
            assert torch.equal(ranks[r]["gather"][f"bool{counts}"], ints[:, 0, 0] % 2 == 0)
            assert ranks[r]["gather"][f"bf16{counts}"].dtype == torch.bfloat16
            assert torch.equal(ranks[r]["gather"][f"bf16{counts}"], ints.to(torch.bfloat16))
    for r in range(WORLD):
        side = ranks[r]["gather"]["side"]
        assert torch.equal(side["a"]["x"], torch.tensor([0.0] * 2 + [1.0] * 3, dtype=torch.float64)
                           .reshape(5, 1, 1).expand(5, 2, 3))
        assert torch.equal(side["a"]["y"], torch.tensor([0, 1, 10, 11, 12], dtype=torch.float32))
        assert torch.equal(side["b"]["z"], torch.tensor([0.5] * 2 + [1.5] * 3, dtype=torch.float64)
                           .reshape(5, 1).expand(5, 4))


def _assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s[-1]])
def test_two_ranks_of_16_equal_one_process_of_32(ranks, name):
    for step in range(STEPS):
        want_loss, want_grads = reference(name, step)
        for r in range(WORLD):
            got = ranks[r][name][step]
            assert got["loss"] == pytest.approx(want_loss, rel=1e-9)   # global mean, the same on both ranks
            _assert_grads_close(got["grads"], want_grads)              # DDP's average of the ranks
        # the scaled local losses average to the global-batch mean
        assert np.mean([ranks[r][name][step]["total"] for r in range(WORLD)]) == pytest.approx(want_loss, rel=1e-9)


def test_the_scenarios_exercise_what_they_claim(ranks):
    # the global set is one column per distinct gold id, though 0 and 7 are gold on both ranks
    assert ranks[0]["in_batch"][0]["n_columns"] == len(set(GOLD.tolist()))
    assert sum(ranks[0]["in_batch"][0]["counts"]) == len(set(GOLD.tolist()))
    assert ranks[0]["in_batch_subset"][0]["counts"][1] == 0                   # zero rows from rank 1
    assert ranks[0]["jaccard"][0]["counts"] is None                           # no gather needed
    assert ranks[0]["jaccard_fallback"][0]["fallbacks"] == 0 < ranks[1]["jaccard_fallback"][0]["fallbacks"]
    assert ranks[0]["jaccard_fallback"][0]["counts"] is not None              # rank 0 gathers for rank 1's sake
    # negatives shared across the ranks: the union is smaller than the two local sets together
    the_pools = pools()
    local = [build_columns(GOLD[rows], [the_pools[g] for g in GOLD[rows]], k=K, mode="both").entity_ids
             for rows in (slice(0, 16), slice(16, 32))]
    assert len(set(local[0]) & set(local[1]) - set(GOLD.tolist())) > 0
    assert ranks[0]["both"][0]["n_columns"] == len(set(local[0]) | set(local[1]))


@pytest.mark.parametrize("name", ["in_batch", "both", "jaccard_fallback"])
def test_without_the_gather_the_gradients_differ(ranks, name):
    """Each rank's own softmax (what training did before): not the 1 x 32 gradient, so the test above can fail."""
    _, want_grads = reference(name, 0)
    got = ranks[0][f"{name}_local"][0]["grads"]
    worst = max(float((got[n] - want_grads[n]).abs().max()) for n in want_grads)
    assert worst > 1e-3
    with pytest.raises(AssertionError):
        _assert_grads_close(got, want_grads)


def test_one_process_plan_is_the_local_columns():
    """Not distributed: the plan is build_columns' result and the step is MELModel.forward."""
    the_pools = pools((20,))
    for mode in ("in_batch", "both", "jaccard"):
        batch_pools = [the_pools[g] for g in GOLD]
        cols = build_columns(GOLD, batch_pools, k=K, mode=mode)
        plan = global_plan(cols, GOLD, mode, fallback=fallback_rows(batch_pools, K))
        assert plan.counts is None and plan.loss_scale == 1.0
        assert np.array_equal(plan.entity_ids, cols.entity_ids)
        assert torch.equal(plan.targets, cols.targets) and torch.equal(plan.mask, cols.mask)
        model = make_model(True)
        mentions = features(len(GOLD), 10, True)
        entities = entity_rows(plan.entity_ids)
        got, want = GlobalBatchStep(model)(mentions, entities, plan), model(mentions, entities)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert global_mean({"loss": 1.5}, plan) == {"loss": 1.5}
    with pytest.raises(ValueError, match="fallback"):
        global_plan(cols, GOLD, "jaccard")
    with pytest.raises(ValueError, match="fallback"):
        global_plan(cols, GOLD, "jaccard", fallback=np.zeros(len(GOLD), dtype=bool))
