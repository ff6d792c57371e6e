"""JD-CCL hard-negative mining: exact top-k Jaccard against a brute-force reference, ties, edge cases, the
stage's output contract (schema, manifest last, idempotent), Ray Data distribution and s3:// datasets."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mel_ray import jaccard, negatives, storage
from mel_ray.dataset import entities_table, load_dataset, write_dataset
from mel_ray.errors import DataError, UsageError
from mel_ray.negatives import (
    OUTPUT_SCHEMA,
    brute_force_topk,
    choose_engine,
    mine_negatives,
    mine_topk,
    output_paths,
    read_negatives,
)

# ---------------------------------------------------------------------------------------------- helpers


def assert_same(got, want, attrs=None):
    got_ids, got_scores = got
    want_ids, want_scores = want
    assert len(got_ids) == len(want_ids)
    for i, (gi, wi, gs, ws) in enumerate(zip(got_ids, want_ids, got_scores, want_scores)):
        context = f"entity {i}" + (f" attrs={attrs[i]!r}" if attrs else "")
        assert gi.dtype == np.int64 and gs.dtype == np.float32, context
        assert gi.tolist() == wi.tolist(), context
        assert gs.tolist() == ws.tolist(), context


def true_jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def kb_strategy(max_n: int = 60):
    """Small KBs with a few very frequent attributes (so head masks, groups and ties all occur)."""
    @st.composite
    def build(draw):
        n = draw(st.integers(2, max_n))
        n_vocab = draw(st.integers(1, 14))
        weights = [1.0 / (r + 1) ** draw(st.sampled_from([0.5, 1.0, 2.0])) for r in range(n_vocab)]
        rng = random.Random(draw(st.integers(0, 2 ** 32 - 1)))
        attrs = []
        for _ in range(n):
            size = rng.choice([0, 1, 2, 3, 3, 4, 5, 6])
            attrs.append([f"p{rng.choices(range(n_vocab), weights)[0]}" for _ in range(size)])
        if draw(st.booleans()):       # duplicated sets: ties on identical attribute sets
            for i in rng.sample(range(n), k=n // 3):
                attrs[i] = list(attrs[rng.randrange(n)])
        k = draw(st.integers(1, n - 1))
        return attrs, k
    return build()


PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------- kernel


def test_pair_keys_match_python_reference():
    rng = np.random.default_rng(0)
    i = rng.integers(0, 2 ** 40, 200)
    j = rng.integers(0, 2 ** 40, 200)
    for seed in (0, 1, 2 ** 63 + 5):
        got = jaccard.pair_keys(seed, i, j)
        assert got.tolist() == [jaccard.pair_key_py(seed, int(a), int(b)) for a, b in zip(i, j)]
    # a bijection of the candidate for a fixed (seed, query): a strict order, no hash ties
    keys = jaccard.pair_keys(7, np.full(5000, 3), np.arange(5000))
    assert len(np.unique(keys)) == 5000


@PROPERTY
@given(kb=kb_strategy(), seed=st.integers(0, 3), bits=st.sampled_from([None, 0, 1, 2, 3, 48]),
       block=st.integers(1, 61))
def test_matches_brute_force(kb, seed, bits, block):
    attrs, k = kb
    want = brute_force_topk(attrs, k, seed)
    assert_same(mine_topk(attrs, k, seed=seed, block_size=block, frequent_bits=bits), want, attrs)
    for i, (ids, scores) in enumerate(zip(*want)):          # the reference itself: exact, sorted, no self
        assert i not in ids.tolist()
        assert all(np.float32(true_jaccard(attrs[i], attrs[j])) == s for j, s in zip(ids, scores))
        assert list(scores) == sorted(scores, reverse=True) and all(s > 0 for s in scores)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kb=kb_strategy(), seed=st.integers(0, 3), bits=st.sampled_from([None, 0, 1, 2]),
       block=st.integers(1, 61))
def test_tiny_chunks_and_tie_thinning_fallback(kb, seed, bits, block, monkeypatch_module):
    # chunks of one row and a tie thinning that keeps ~k/2 per row: the fallback path must stay exact
    attrs, k = kb
    monkeypatch_module.setattr(jaccard, "CHUNK_WORK", 3)
    monkeypatch_module.setattr(jaccard, "TIE_OVERSAMPLE", 0.5)
    assert_same(mine_topk(attrs, k, seed=seed, block_size=block, frequent_bits=bits),
                brute_force_topk(attrs, k, seed), attrs)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_result_independent_of_block_size_bits_and_attribute_order():
    rng = random.Random(5)
    attrs = [[f"a{min(int(rng.expovariate(0.4)), 30)}" for _ in range(rng.randint(0, 9))] for _ in range(300)]
    shuffled = [rng.sample(a, len(a)) + a[:1] for a in attrs]       # other order, a duplicate item
    base = mine_topk(attrs, 10, seed=11)
    for block, bits in [(1, 0), (7, 3), (64, None), (1000, 48)]:
        assert_same(mine_topk(shuffled, 10, seed=11, block_size=block, frequent_bits=bits), base)
    assert_same(base, brute_force_topk(attrs, 10, seed=11))


def test_seed_changes_only_tie_order():
    attrs = [["x", "y"]] * 40 + [["x"]] * 5
    a = mine_topk(attrs, 8, seed=0)
    b = mine_topk(attrs, 8, seed=1)
    assert [s.tolist() for s in a[1]] == [s.tolist() for s in b[1]]
    assert [i.tolist() for i in a[0]] != [i.tolist() for i in b[0]]


def test_ties_are_not_biased_to_low_ids():
    n, k = 400, 8
    ids, scores = mine_topk([["same"]] * n, k, seed=3)
    picked = np.concatenate(ids)
    assert set(np.concatenate(scores).tolist()) == {1.0}
    # with id order, every list would be drawn from ids 0..k; a hash spreads picks over the whole KB
    assert np.mean(picked) == pytest.approx((n - 1) / 2, rel=0.1)
    assert len(set(picked.tolist())) > n * 0.9


def test_edge_cases():
    # empty sets: empty lists, and never listed as anyone's candidate
    ids, scores = mine_topk([[], ["a"], [], ["a", "b"]], 2)
    assert [x.tolist() for x in ids] == [[], [3], [], [1]]
    assert [x.tolist() for x in scores] == [[], [0.5], [], [0.5]]
    assert [x.tolist() for x in mine_topk([[], [], None], 1)[0]] == [[], [], []]
    # N = 2
    assert [x.tolist() for x in mine_topk([["a"], ["a"]], 1)[0]] == [[1], [0]]
    assert [x.tolist() for x in mine_topk([["a"], ["b"]], 1)[0]] == [[], []]
    # all identical: score 1 everywhere, k others, never self
    ids, scores = mine_topk([["a", "b", "c"]] * 30, 5, seed=2)
    assert all(len(x) == 5 and i not in x.tolist() for i, x in enumerate(ids))
    assert {float(s) for x in scores for s in x} == {1.0}
    # one attribute shared by everyone, the rest private: J = 1 / (|A_i| + |A_j| - 1)
    attrs = [["common"] + [f"own{i}-{t}" for t in range(i % 4)] for i in range(50)]
    assert_same(mine_topk(attrs, 7, seed=1, frequent_bits=0), brute_force_topk(attrs, 7, seed=1))
    assert_same(mine_topk(attrs, 7, seed=1), brute_force_topk(attrs, 7, seed=1))
    # nulls in an attribute list are ignored; an Arrow column and an (indptr, indices) CSR are accepted
    col = pa.array([["a", None, "b"], None, ["a"]], pa.list_(pa.string()))
    assert [x.tolist() for x in mine_topk(col, 1)[0]] == [[2], [], [0]]
    csr = (np.array([0, 2, 3, 5]), np.array([7, 9, 7, 9, 7]))
    assert [x.tolist() for x in mine_topk(csr, 2)[0]] == [[2, 1], [0, 2], [0, 1]]


@pytest.mark.parametrize("k", [0, -1, 3, 4])
def test_bad_k(k):
    with pytest.raises(UsageError, match="k"):
        mine_topk([["a"], ["a"], ["b"]], k)


# ---------------------------------------------------------------------------------------------- stage


def make_dataset(uri: str, attributes: list[list[str]], name: str = "neg-test") -> str:
    rows = [{"entity_id": i, "qid": f"Q{i}", "name": f"E{i % 7}", "description": "", "attributes": a,
             "image_uris": []} for i, a in enumerate(attributes)]
    write_dataset(uri, name=name, source_format="jsonl", entities=entities_table(rows), mentions={},
                  report={})
    return uri


def random_attrs(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[f"p{min(int(rng.expovariate(0.3)), 40)}" for _ in range(rng.randint(0, 8))] for _ in range(n)]


def test_stage_output_contract(tmp_path, monkeypatch):
    attrs = random_attrs(500, 1) + [[], []]
    uri = make_dataset(str(tmp_path / "ds"), attrs)
    calls = []

    def recording(name, real):
        def wrapper(uri, *args, **kwargs):
            calls.append((name, uri))
            return real(uri, *args, **kwargs)
        return wrapper

    for fn in ("write_table", "write_json", "delete"):
        monkeypatch.setattr(negatives.storage, fn, recording(fn, getattr(storage, fn)))
    manifest = mine_negatives(uri, k=6, seed=4, block_size=97, num_workers=0)
    parquet_rel, manifest_rel = output_paths(6)
    assert parquet_rel == "negatives/k6.parquet" and manifest_rel == "negatives/k6.manifest.json"
    # old manifest removed first, Parquet next, manifest last
    assert [c[0] for c in calls] == ["delete", "write_table", "write_json"]
    assert calls[-1][1].endswith("k6.manifest.json") and calls[1][1].endswith("k6.parquet")

    table = pq.read_table(tmp_path / "ds" / "negatives" / "k6.parquet")
    assert table.schema.equals(OUTPUT_SCHEMA)
    assert table.column("entity_id").to_pylist() == list(range(len(attrs)))
    ids = [np.array(x, dtype=np.int64) for x in table.column("neg_entity_ids").to_pylist()]
    scores = [np.array(x, dtype=np.float32) for x in table.column("neg_scores").to_pylist()]
    assert_same((ids, scores), brute_force_topk(attrs, 6, seed=4))
    assert read_negatives(uri, 6).equals(table)

    assert manifest == storage.read_json(str(tmp_path / "ds" / "negatives" / "k6.manifest.json"))
    assert manifest["k"] == 6 and manifest["seed"] == 4 and manifest["n_entities"] == len(attrs)
    assert manifest["n_without_attributes"] == sum(1 for a in attrs if not a)
    assert manifest["n_short"] == sum(1 for a, x in zip(attrs, ids) if a and len(x) < 6)
    assert manifest["zero_scores_listed"] is False
    assert set(manifest["timings"]) >= {"read_s", "encode_s", "index_s", "mine_s", "write_s", "total_s"}
    assert manifest["algorithm"]["work"]["naive_sum_df2"] >= manifest["algorithm"]["work"]["tail_sum_df2"]


def test_stage_rerun_skips_and_recompute_is_byte_identical(tmp_path):
    uri = make_dataset(str(tmp_path / "ds"), random_attrs(300, 2))
    path = tmp_path / "ds" / "negatives" / "k5.parquet"
    first = mine_negatives(uri, k=5, block_size=64, num_workers=0)
    data = path.read_bytes()
    again = mine_negatives(uri, k=5, block_size=64, num_workers=0)
    assert again["skipped"] is True and path.read_bytes() == data
    forced = mine_negatives(uri, k=5, block_size=17, num_workers=0, force=True, frequent_bits=1)
    assert "skipped" not in forced and path.read_bytes() == data
    assert first["entities_sha256"] == forced["entities_sha256"]
    other_seed = mine_negatives(uri, k=5, seed=9, num_workers=0)       # different key: recomputed
    assert "skipped" not in other_seed and other_seed["seed"] == 9


def test_stage_bad_input(tmp_path):
    with pytest.raises(DataError, match="manifest.json"):
        mine_negatives(str(tmp_path / "not-a-dataset"), k=4, num_workers=0)
    uri = make_dataset(str(tmp_path / "ds"), [["a"], ["a", "b"], ["b"]])
    with pytest.raises(UsageError, match=r"k=3.*3"):
        mine_negatives(uri, k=3, num_workers=0)
    with pytest.raises(UsageError) as err:
        mine_negatives(uri, k=0, num_workers=0)
    assert uri in str(err.value)
    with pytest.raises(DataError, match="no hard negatives mined"):
        read_negatives(uri, 2)
    assert not storage.exists(storage.join(uri, "negatives"))


def test_cli_exit_code_2(tmp_path, capsys):
    from mel_ray import cli

    if "mine-negatives" not in cli.build_parser()._subparsers._group_actions[0].choices:
        pytest.skip("mine-negatives is not wired into the CLI yet")
    assert cli.main(["mine-negatives", "--dataset", str(tmp_path / "missing")]) == 2
    assert "manifest.json" in capsys.readouterr().err
    uri = make_dataset(str(tmp_path / "ds"), [["a"], ["a", "b"]])
    assert cli.main(["mine-negatives", "--dataset", uri, "--k", "2"]) == 2
    with pytest.raises(SystemExit) as refused:           # argparse: a usage line and one error line
        cli.main(["mine-negatives", "--dataset", uri, "--k", "0"])
    assert refused.value.code == 2


# ---------------------------------------------------------------------------------------------- Ray


def test_ray_two_workers_equal_in_process(ray_local):
    attrs = random_attrs(1500, 3)
    local = mine_topk(attrs, 12, seed=5, block_size=1500)
    distributed = mine_topk(attrs, 12, seed=5, block_size=137, num_workers=2)
    assert_same(distributed, local)


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    """Not the shared small data: mining is checked on the demo's full 400-entity KB (one Ray block per 101)."""
    from mel_ray.demo_data import make_demo_data
    from mel_ray.ingest import ingest

    root = tmp_path_factory.mktemp("demo-neg")
    make_demo_data(str(root / "release"), n_entities=400, n_mentions=40, seed=0)
    ingest("mimic", str(root / "release"), str(root / "dataset"))
    return root / "dataset"


def test_demo_dataset_end_to_end_on_s3_with_ray(ray_local, s3_bucket, demo_dataset, monkeypatch):
    uri = f"{s3_bucket}/datasets/demo"
    for rel in storage.list_files(str(demo_dataset)):
        if not rel.startswith("images/"):
            storage.copy_file(str(demo_dataset / rel), storage.join(uri, *rel.split("/")))
    monkeypatch.setattr(negatives, "RAY_MIN_ENTITIES", 100)      # the Ray path at a test's size
    manifest = mine_negatives(uri, k=8, seed=1, block_size=101)        # num_workers=None: one per CPU
    assert manifest["algorithm"]["num_workers"] == 2 and manifest["n_entities"] == 400
    assert manifest["algorithm"]["engine"] == "2 Ray actors (one per CPU of the cluster) for 400 entities"
    table = read_negatives(uri, 8)
    assert table.schema.equals(OUTPUT_SCHEMA) and table.num_rows == 400
    attrs = load_dataset(uri).entities(["attributes"]).column("attributes").to_pylist()
    ids = [np.array(x, dtype=np.int64) for x in table.column("neg_entity_ids").to_pylist()]
    scores = [np.array(x, dtype=np.float32) for x in table.column("neg_scores").to_pylist()]
    assert_same((ids, scores), brute_force_topk(attrs, 8, seed=1))
    # a demo KB has same-name entities with similar attributes: they are mined, not excluded
    assert sum(len(x) for x in ids) > 0.9 * 8 * 400


def test_tie_thinning_and_its_fallback_are_exercised(monkeypatch):
    attrs = [["a", "b"]] * 150 + [["a"]] * 30 + [["a", "b", "c"]] * 20
    enc = jaccard.encode_attributes(attrs)
    want = brute_force_topk(attrs, 5, seed=2)
    for oversample, fallback in [(4.0, False), (0.5, True)]:
        monkeypatch.setattr(jaccard, "TIE_OVERSAMPLE", oversample)
        result = negatives.run_mining(enc, 5, seed=2, block_size=64, num_workers=0, frequent_bits=2)
        assert result.stats["tie_pairs"] > 0
        assert (result.stats["tie_fallback_rows"] > 0) == fallback
        assert_same(result.lists(), want)


def test_training_refuses_pools_mined_on_other_entities(tmp_path):
    """The pools index entities by id: after the entities table changes, train must not use stale pools."""
    from mel_ray.train.run import find_negatives

    uri = make_dataset(str(tmp_path / "ds"), random_attrs(40, 3))
    mine_negatives(uri, k=4, num_workers=0)
    assert find_negatives(uri, None, 4, "jaccard").endswith("negatives/k4.parquet")
    other = make_dataset(str(tmp_path / "other"), random_attrs(40, 4))        # same shape, other attributes
    with pytest.raises(UsageError, match=r"k4\.manifest\.json: entities_sha256 .* does not match .*entities\.parquet"):
        find_negatives(other, storage.join(uri, "negatives", "k4.parquet"), 4, "jaccard")
    with pytest.raises(UsageError, match="no mined negatives"):
        find_negatives(other, None, 4, "jaccard")
    assert find_negatives(other, None, 4, "in_batch") is None


def test_a_small_kb_is_mined_in_process_whatever_the_workers_asked(demo_dataset, tmp_path, capsys):
    """Ray's start-up costs more than mining a small KB (72 s vs 0.4 s at 400 entities): the stage mines in
    process below RAY_MIN_ENTITIES and says so; the pool is the same as the Ray path's (test above)."""
    from mel_ray import cli

    ds = tmp_path / "ds"
    shutil.copytree(demo_dataset, ds)
    code = cli.main(["mine-negatives", "--dataset", str(ds), "--workers", "2", "--set", "negatives.k=8",
                     "--log-file", str(tmp_path / "log")])
    out = capsys.readouterr().out
    assert code == 0
    assert ("(in-process: 400 entities < 50,000, where Ray's start-up costs more than it saves (--workers 2 not "
            "used))") in out
    manifest = json.loads((ds / "negatives" / "k8.manifest.json").read_text())
    assert manifest["algorithm"]["num_workers"] == 0 and manifest["algorithm"]["engine"].startswith("in-process")
    assert choose_engine(50_000, 3) == (3, "3 Ray actors for 50,000 entities")
    assert choose_engine(10, 0) == (0, "in-process (10 entities; --workers 0)")
