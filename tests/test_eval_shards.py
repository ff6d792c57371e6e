"""Issue 16, items 1-2: evaluate's KB shards are pipelined (batches in flight, no global wait), keep their entity
sides in a bounded cache, survive a killed shard process, and refuse settings that cannot work with one line.

A real (untrained, seeded) model on the small release's real tiny-CLIP features; every comparison is against a
brute-force full score matrix + stable sort, or between two evaluate() runs' prediction files."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from killing import actor_processes
from seeded_models import copy_with_features, seeded_model

from mel_ray.checkpoints import build_model, load_checkpoint
from mel_ray.eval.evaluate import evaluate, side_bytes_per_entity
from mel_ray.feature_store import EntityStore, mention_tensors
from mel_ray.scoring import metrics_from_ranks


@pytest.fixture(scope="module")
def scored(small_data, tmp_path_factory, ray_local):
    """(dataset, features URI, model.pt): the small release, its features, a seeded random model that fits them."""
    root = tmp_path_factory.mktemp("eval-shards")
    ds, features = copy_with_features(small_data, root)
    _, model_pt = seeded_model(features, root / "model.pt", seed=0, hidden=8)
    return ds, features, model_pt


def brute_force_ranks(ds: str, features: str, model_pt: str) -> np.ndarray:
    model = build_model(load_checkpoint(model_pt))
    store = EntityStore(features)
    mentions = mention_tensors(features, ds, "test")
    with torch.no_grad():
        scores = model({k: v for k, v in mentions.items() if isinstance(v, torch.Tensor)},
                       store.chunk(0, store.num_entities))["overall"].numpy()
    order = np.argsort(-scores, axis=1, kind="stable")
    gold = mentions["gold"].numpy()
    return np.array([1 + int(np.where(order[i] == gold[i])[0][0]) for i in range(len(gold))])


def predictions(folder) -> dict:
    return pq.read_table(f"{folder}/predictions_test.parquet").to_pydict()


def test_pipelined_cached_shards_equal_brute_force(scored, tmp_path):
    ds, features, model_pt = scored
    per_entity = side_bytes_per_entity(load_checkpoint(model_pt), features)
    n_entities = EntityStore(features).num_entities
    # in_flight 3 with batches of 4 mentions: several batches queued per shard; a cache of 2.5 chunks holds part of
    # each shard's KB, the rest is recomputed per batch
    cached = evaluate(ds, features, model_pt, "test", num_shards=2, batch_size=4, entity_chunk=7, mention_batch=3,
                      cpus_per_shard=0.5, in_flight=3, cache_gb=per_entity * 7 * 2.5 / 2**30,
                      output_uri=str(tmp_path / "cached"))
    ranks = np.array(predictions(tmp_path / "cached")["rank"])
    assert ranks.tolist() == brute_force_ranks(ds, features, model_pt).tolist()
    assert cached["metrics"] == pytest.approx(metrics_from_ranks(ranks), abs=1e-12)
    assert 0 < cached["cache_gb_per_shard"] * 2**30 < per_entity * n_entities / 2     # only part of a shard fits
    streamed = evaluate(ds, features, model_pt, "test", num_shards=2, batch_size=4, entity_chunk=7,
                        mention_batch=3, cpus_per_shard=0.5, in_flight=1, cache_gb=0,
                        output_uri=str(tmp_path / "streamed"))
    assert predictions(tmp_path / "cached") == predictions(tmp_path / "streamed")
    assert (streamed["cache_gb_per_shard"], streamed["in_flight"]) == (0, 1)
    assert streamed["shard_restarts"] == cached["shard_restarts"] == 0


def test_entity_sides_keep_what_the_budget_holds_and_score_as_raw_chunks(scored):
    """scoring.EntitySides (the cache of evaluate's shards and link's scorers): a budget of 2.5 chunks keeps the
    first 2, hands the same objects out at the next pass, and ranks exactly as the raw chunks do."""
    from mel_ray.scoring import EntitySides, chunks_of, rank_counts

    ds, features, model_pt = scored
    model = build_model(load_checkpoint(model_pt)).eval()
    store = EntityStore(features)
    mentions = mention_tensors(features, ds, "test")
    gold = store.gather(mentions["gold"].numpy())
    per_entity = side_bytes_per_entity(load_checkpoint(model_pt), features)
    sides = EntitySides(store.chunk, 0, store.num_entities, 16, int(2.5 * 16 * per_entity))
    first = dict(sides.chunks(model))
    assert sorted(sides.kept) == [0, 16] and sides.kept_bytes <= 2.5 * 16 * per_entity
    second = dict(sides.chunks(model))
    assert all(second[a] is first[a] for a in (0, 16)) and all(second[a] is not first[a] for a in (32, 48))
    cached = rank_counts(model, mentions, gold, sides.chunks(model), topk=10)
    raw = rank_counts(model, mentions, gold, chunks_of(store.chunk, 0, store.num_entities, 16), topk=10)
    assert np.array_equal(cached[0], raw[0]) and np.array_equal(cached[1], raw[1])
    assert np.allclose(cached[2], raw[2], rtol=0, atol=1e-6)


def test_killed_shard_is_restarted_and_its_batches_rerun(scored, tmp_path):
    """SIGKILL a KB shard's process after the first merged batch: Ray restarts it, its queued batches run again,
    and the ranks and predictions are those of an undisturbed run."""
    ds, features, model_pt = scored
    kwargs = {"num_shards": 2, "batch_size": 4, "entity_chunk": 16, "mention_batch": 4, "cpus_per_shard": 0.5}
    calm = evaluate(ds, features, model_pt, "test", output_uri=str(tmp_path / "calm"), **kwargs)
    token = os.environ["RAY_AUTH_TOKEN"]
    before = {p.pid for p in actor_processes("KBShard", token)}    # the calm run's shards, maybe not gone yet
    killed: list[int] = []

    def kill_a_shard(done: int, total: int) -> None:
        if done == 1:
            assert total > 3                  # batches are still to come when it dies
            victim = next(p for p in actor_processes("KBShard", token) if p.pid not in before)
            victim.kill()
            victim.wait(timeout=30)
            killed.append(victim.pid)

    hurt = evaluate(ds, features, model_pt, "test", output_uri=str(tmp_path / "hurt"), progress=kill_a_shard,
                    **kwargs)
    assert killed and hurt["shard_restarts"] == 1, (killed, hurt["shard_restarts"])
    assert hurt["metrics"] == calm["metrics"]
    assert predictions(tmp_path / "hurt") == predictions(tmp_path / "calm")


def test_settings_that_cannot_work_are_one_line(scored, tmp_path, capsys):
    from mel_ray import cli
    from mel_ray.errors import UsageError

    ds, features, model_pt = scored
    with pytest.raises(UsageError, match=r"^evaluate: eval.cache_gb=1e-09 cannot hold one entity chunk of 64 "
                                         r"entities \(.* GiB of entity sides\); raise it, or set 0"):
        evaluate(ds, features, model_pt, "test", entity_chunk=64, cache_gb=1e-9)
    argv = ["evaluate", "--dataset", ds, "--checkpoint", model_pt, "--features", features,
            "--log-file", str(tmp_path / "log")]
    code = cli.main([*argv, "--num-gpus", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("mel-ray evaluate: ")]
    assert (code, err) == (2, [("error: evaluate: num_gpus=1 per actor but the Ray cluster has 0 GPUs (set "
                                "eval.num_gpus=0 to run on CPUs; on an autoscaling cluster whose GPU nodes start "
                                "at zero, export MEL_RAY_AUTOSCALING=1)")]), err
    code = cli.main([*argv, "--set", "eval.in_flight=0"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("mel-ray evaluate: ")]
    assert code == 2 and len(err) == 1 and "eval.in_flight" in err[0], err
