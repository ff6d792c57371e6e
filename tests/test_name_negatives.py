"""Name-similarity hard negatives (mel_ray.name_negatives), JD-CCL's fallback onto them and how training finds
and reports the pool of negatives.source."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from mel_ray import storage
from mel_ray.config import load_config
from mel_ray.dataset import entities_table, load_dataset, mentions_table, write_dataset
from mel_ray.errors import DataError, UsageError
from mel_ray.jaccard import brute_force_topk, pair_key_py
from mel_ray.name_negatives import fill_from_names, mine_name_topk, name_vectors, run_name_mining
from mel_ray.negatives import OUTPUT_SCHEMA, mine_negatives, read_negatives
from mel_ray.verify import summary_line, verify, verify_with_summary

FIRST = ["Anna", "Jan", "Maria", "José", "Jose", "Hans", "Li", "Ana", "Jean-Luc", "O'Neil"]
LAST = ["Krebs", "Müller", "Muller", "Smith", "Smyth", "de la Cruz", "Wang", "of Bavaria", "I", "II"]


def random_names(n: int, seed: int) -> list[str]:
    """Names with collisions: exact duplicates, accent and case variants, shared words, blank names."""
    rng = random.Random(seed)
    names = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            names.append(rng.choice(["", "   "]))
        elif r < 0.25 and names:
            names.append(rng.choice(names).upper() if rng.random() < 0.3 else rng.choice(names))
        elif r < 0.35:
            names.append(rng.choice(FIRST))
        else:
            names.append(f"{rng.choice(FIRST)} {rng.choice(LAST)}")
    return names


def reference_vectors(names: list[str]) -> np.ndarray:
    """The documented vectorizer, built here from scikit-learn directly (dense rows)."""
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3), lowercase=True, strip_accents="unicode",
                          sublinear_tf=True, norm="l2", dtype=np.float64)
    return vec.fit_transform(names).toarray()


def brute_force_names(names: list[str], k: int, seed: int):
    """Dense cosine of every pair, float32, order (score desc, pair_key_py asc), score > 0, j != i; and how many
    rows have a tie cut at the k-th slot (so a test can show the tie policy was exercised)."""
    x = reference_vectors(names)
    sim = (x @ x.T).astype(np.float32)
    ids, scores, cut_ties = [], [], 0
    for i in range(len(names)):
        cands = sorted((-float(sim[i, j]), pair_key_py(seed, i, j), j) for j in range(len(names))
                       if j != i and sim[i, j] > 0)
        if len(cands) > k and cands[k][0] == cands[k - 1][0]:
            cut_ties += 1
        ids.append(np.array([c[2] for c in cands[:k]], dtype=np.int64))
        scores.append(np.array([-c[0] for c in cands[:k]], dtype=np.float32))
    return ids, scores, cut_ties


def assert_lists_equal(got, want):
    assert len(got[0]) == len(want[0])
    for i, (a, b, sa, sb) in enumerate(zip(got[0], want[0], got[1], want[1])):
        assert a.tolist() == b.tolist(), f"row {i}: {a.tolist()} != {b.tolist()}"
        assert np.array_equal(sa, sb), f"row {i}: {sa} != {sb}"


# ------------------------------------------------------------------------------------------------ kernel


@pytest.mark.parametrize("n,k,seed", [(120, 3, 0), (150, 5, 7), (40, 12, 3)])
def test_pool_equals_dense_brute_force(n, k, seed):
    names = random_names(n, seed)
    want_ids, want_scores, cut_ties = brute_force_names(names, k, seed)
    if k <= 5:       # duplicates score 1.0 (more of them than slots): the seeded pair key decides who is listed
        assert cut_ties > 0
    assert_lists_equal(mine_name_topk(names, k, seed), (want_ids, want_scores))
    # tiny chunks (one row or a few per product) give the same bytes: scores never depend on the chunking
    counts, ids, scores, stats = run_name_mining(name_vectors(names), k, seed, chunk_work=7)
    assert stats["n_chunks"] > n // 4
    off = np.concatenate([[0], np.cumsum(counts)])
    assert_lists_equal(([ids[off[i]:off[i + 1]] for i in range(n)], [scores[off[i]:off[i + 1]] for i in range(n)]),
                       (want_ids, want_scores))
    blank = [i for i, name in enumerate(names) if not name.strip()]
    assert blank and all(len(want_ids[i]) == 0 for i in blank)


def test_fill_from_names_keeps_jaccard_first_and_skips_repeats():
    # 5 entities. 0: 1 Jaccard candidate (2), names list 2 again then 3, 4 -> [2, 3, 4]; 1: full; 2: no Jaccard
    # candidates -> its names list; 3, 4: nothing anywhere
    jaccard = (np.array([1, 3, 0, 0, 0]), np.array([2, 0, 2, 3]), np.array([0.5, 0.9, 0.8, 0.7], np.float32))
    names = (np.array([3, 1, 2, 0, 0]), np.array([2, 3, 4, 3, 0, 1]), np.array([1, .6, .4, .9, .3, .2], np.float32))
    counts, ids, scores, filled = fill_from_names(jaccard, names, 3)
    assert counts.tolist() == [3, 3, 2, 0, 0] and filled.tolist() == [2, 0, 2, 0, 0]
    assert ids.tolist() == [2, 3, 4, 0, 2, 3, 0, 1]
    assert scores.tolist() == pytest.approx([0.5, 0.6, 0.4, 0.9, 0.8, 0.7, 0.3, 0.2])


# ------------------------------------------------------------------------------------------------ stage


def make_dataset(uri: str, names: list[str], attributes: list[list[str]] | None = None,
                 golds: list[int] | None = None) -> str:
    attributes = attributes or [[] for _ in names]
    rows = [{"entity_id": i, "qid": f"Q{i}", "name": name, "description": "", "attributes": a, "image_uris": []}
            for i, (name, a) in enumerate(zip(names, attributes))]
    mentions = {"train": mentions_table([{"mention_id": f"m{j}", "mention": names[g] or "x", "sentence": "s",
                                          "image_uri": None, "entity_id": g, "qid": f"Q{g}"}
                                         for j, g in enumerate(golds or [])])}
    write_dataset(uri, name="names-test", source_format="jsonl", entities=entities_table(rows), mentions=mentions,
                  report={})
    return uri


def test_names_stage_output_determinism_and_skip(tmp_path):
    names = random_names(200, 1)
    uri = make_dataset(str(tmp_path / "ds"), names)
    manifest = mine_negatives(uri, k=4, seed=2, num_workers=0, source="names")
    path = tmp_path / "ds" / "negatives" / "names_k4.parquet"
    assert manifest["output"] == "negatives/names_k4.parquet"
    assert not (tmp_path / "ds" / "negatives" / "k4.parquet").exists()      # never the Jaccard pool's files
    table = pq.read_table(path)
    assert table.schema.equals(OUTPUT_SCHEMA)                                   # training reads it unchanged
    assert read_negatives(uri, 4, "names").equals(table)
    want_ids, want_scores, _ = brute_force_names(names, 4, 2)
    got = ([np.array(x, np.int64) for x in table.column("neg_entity_ids").to_pylist()],
           [np.array(x, np.float32) for x in table.column("neg_scores").to_pylist()])
    assert_lists_equal(got, (want_ids, want_scores))
    assert manifest["source"] == "names" and manifest["k"] == 4 and manifest["seed"] == 2
    assert manifest["vectorizer"]["analyzer"] == "char_wb" and manifest["vectorizer"]["ngram_range"] == [3, 3]
    assert manifest["n_without_name"] == sum(1 for n in names if not n.strip())
    assert manifest["n_short"] == sum(1 for n, x in zip(names, want_ids) if n.strip() and len(x) < 4)
    assert manifest == storage.read_json(str(tmp_path / "ds" / "negatives" / "names_k4.manifest.json"))
    data = path.read_bytes()
    assert mine_negatives(uri, k=4, seed=2, num_workers=0, source="names")["skipped"] is True
    assert "skipped" not in mine_negatives(uri, k=4, seed=2, num_workers=0, source="names", force=True)
    assert path.read_bytes() == data
    other = make_dataset(str(tmp_path / "other"), names)                      # same names elsewhere: same bytes
    mine_negatives(other, k=4, seed=2, num_workers=0, source="names")
    assert (tmp_path / "other" / "negatives" / "names_k4.parquet").read_bytes() == data
    reseeded = mine_negatives(uri, k=4, seed=3, num_workers=0, source="names")   # another key: mined again
    assert "skipped" not in reseeded and path.read_bytes() != data
    assert verify(uri) == []


def test_fallback_fills_exactly_the_attribute_less_entities(tmp_path, capsys):
    from mel_ray import cli

    rng = random.Random(5)
    names = random_names(90, 5)
    # every entity with attributes shares "p0" with 59 others (>= k Jaccard candidates), 30 have none
    attrs = [["p0", f"p{rng.randint(1, 9)}"] for _ in range(60)] + [[] for _ in range(30)]
    rng.shuffle(attrs)
    uri = make_dataset(str(tmp_path / "ds"), names, attrs)
    code = cli.main(["mine-negatives", "--dataset", uri, "--source", "jaccard+names", "--k", "3", "--workers", "0",
                     "--log-file", str(tmp_path / "log")])
    out = capsys.readouterr().out
    assert code == 0
    manifest = json.loads((tmp_path / "ds" / "negatives" / "jaccard_names_k3.manifest.json").read_text())
    assert manifest["n_fallback_no_attributes"] == 30 and manifest["n_fallback_short"] == 0
    assert "'n_fallback_no_attributes': 30, 'n_fallback_short': 0" in out and "top-3 jaccard+names" in out
    jac = brute_force_topk(attrs, 3, 0)
    nam = brute_force_names(names, 3, 0)
    pool = read_negatives(uri, 3, "jaccard+names")
    got_ids = pool.column("neg_entity_ids").to_pylist()
    got_scores = pool.column("neg_scores").to_pylist()
    for i, a in enumerate(attrs):
        source = jac if a else nam                 # attribute-less entities: the name ranking, nobody else
        assert got_ids[i] == source[0][i].tolist() and got_scores[i] == source[1][i].tolist(), i
    assert manifest["n_filled_from_names"] == sum(len(nam[0][i]) for i, a in enumerate(attrs) if not a)


def test_fallback_counts_short_jaccard_lists(tmp_path):
    rng = random.Random(6)
    names = random_names(120, 6)
    attrs = [[f"p{min(int(rng.expovariate(0.4)), 30)}" for _ in range(rng.randint(0, 3))] for _ in names]
    uri = make_dataset(str(tmp_path / "ds"), names, attrs)
    k = 5
    manifest = mine_negatives(uri, k=k, num_workers=0, source="jaccard+names")
    jac_ids, jac_scores = brute_force_topk(attrs, k, 0)
    nam_ids, nam_scores, _ = brute_force_names(names, k, 0)
    short = [i for i, a in enumerate(attrs) if a and len(jac_ids[i]) < k]
    assert short and manifest["n_fallback_short"] == len(short)
    assert manifest["n_fallback_no_attributes"] == manifest["n_without_attributes"] == sum(1 for a in attrs if not a)
    pool = read_negatives(uri, k, "jaccard+names")
    got = pool.column("neg_entity_ids").to_pylist()
    got_scores = pool.column("neg_scores").to_pylist()
    for i in range(len(names)):
        want, want_scores = jac_ids[i].tolist(), jac_scores[i].tolist()   # each score the one of its source
        for j, score in zip(nam_ids[i].tolist(), nam_scores[i].tolist()):
            if len(want) < k and j not in want:
                want.append(j)
                want_scores.append(score)
        assert (got[i], got_scores[i]) == (want, want_scores), i
    assert manifest["n_short"] == sum(1 for x in got if len(x) < k)
    # the three sources live side by side, each verified against its own name
    mine_negatives(uri, k=k, num_workers=0)
    mine_negatives(uri, k=k, num_workers=0, source="names")
    problems, summary = verify_with_summary(uri)
    assert problems == [] and "negatives k5, jaccard_names_k5, names_k5," in summary_line(uri, summary)
    # a pool filed under another source's name is caught
    neg = tmp_path / "ds" / "negatives"
    shutil.copy(neg / "names_k5.manifest.json", neg / "k5.manifest.json")
    assert [p.line() for p in verify(uri)] == [
        f"{uri}/negatives/k5.manifest.json: field 'source': source 'names' but the file is named for 'jaccard'"]


def test_bad_input(tmp_path):
    uri = make_dataset(str(tmp_path / "ds"), ["Anna Krebs", "Anna Smith", "Jan Wang"])
    with pytest.raises(UsageError, match=r"k=3 needs more than k entities, but the KB has 3") as err:
        mine_negatives(uri, k=3, num_workers=0, source="names")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="negatives.source must be one of jaccard, names, jaccard\\+names"):
        mine_negatives(uri, k=1, num_workers=0, source="name")
    blank = make_dataset(str(tmp_path / "blank"), ["", " ", "\t"])
    with pytest.raises(DataError) as err:
        mine_negatives(blank, k=2, num_workers=0, source="names")
    assert str(err.value).startswith(f"{blank}/entities.parquet: field 'name': no entity name has a character")
    # blank names among real ones are counted, with empty lists
    assert mine_negatives(blank, k=2, num_workers=0, source="jaccard+names")["n_without_name"] == 3
    assert not storage.exists(storage.join(blank, "negatives", "names_k2.parquet"))
    with pytest.raises(Exception, match="negatives.source"):
        load_config(None, ["negatives.source=tfidf"])


# ------------------------------------------------------------------------------------------ training side


def test_run_name_keeps_its_key_at_the_default_source():
    """Runs named before negatives.source existed keep their names; another source is another run."""
    from mel_ray.keys import settings_key
    from mel_ray.pipeline import run_name

    cfg = load_config(None, [])
    before = {"model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
              "negatives": {"k": 16, "seed": 0, "block_size": 4096}, "dataset": "d", "features": "f",
              "experiment": cfg.tracking.experiment}
    assert run_name(cfg, "d", "f") == f"pipeline-{settings_key(before, length=10)}"
    names = load_config(None, ["negatives.source=names"])
    assert run_name(names, "d", "f") != run_name(cfg, "d", "f")


def test_training_finds_the_pool_of_its_source_and_counts_empty_pools(tmp_path):
    from mel_ray.train.run import find_negatives, pool_coverage

    names = ["Anna Krebs", "Anna Smith", "Jan Wang", "Jan Wong", "", "Li Wang"]
    uri = make_dataset(str(tmp_path / "ds"), names, golds=[0, 1, 4, 4, 5, 2])
    with pytest.raises(UsageError, match=r"names_k2\.parquet: no mined negatives; run `mel-ray mine-negatives "
                                         r"--k 2 --source names`"):
        find_negatives(uri, None, 2, "jaccard", "names")
    mine_negatives(uri, k=2, num_workers=0)                      # no attributes: every Jaccard pool is empty
    mine_negatives(uri, k=2, num_workers=0, source="names")
    jaccard = find_negatives(uri, None, 2, "both")
    assert jaccard.endswith("negatives/k2.parquet")
    assert pool_coverage(uri, jaccard, 2) == {"train_mentions": 6, "empty_pool": 6, "short_pool": 0}
    pool = find_negatives(uri, None, 2, "jaccard", "names")
    assert pool.endswith("negatives/names_k2.parquet")
    assert find_negatives(uri, pool, 2, "jaccard") == pool        # an explicit URI is checked as what it is
    lengths = [len(x) for x in read_negatives(uri, 2, "names").column("neg_entity_ids").to_pylist()]
    golds = [0, 1, 4, 4, 5, 2]
    assert pool_coverage(uri, pool, 2) == {"train_mentions": 6, "empty_pool": sum(lengths[g] == 0 for g in golds),
                                           "short_pool": sum(0 < lengths[g] < 2 for g in golds)}
    assert lengths[4] == 0


@pytest.mark.slow
def test_training_reads_the_names_pool(small_data, tmp_path, ray_local):
    """An attribute-less KB (the Richpedia-MEL case): JD-CCL mode trains on the names pool. Its empty pools (blank
    names) are exactly the mentions that fall back to in-batch negatives, which the run reports up front."""
    import mlflow

    from mel_ray.config import FeaturesConfig
    from mel_ray.features import extract_features
    from mel_ray.train.run import pool_coverage, train

    src = load_dataset(small_data.dataset)
    entities = src.entities()
    train_golds = src.mentions("train", columns=["entity_id"]).column("entity_id").to_pylist()
    blank = set(train_golds[:3])                                # a few gold entities lose their name
    rows = entities.to_pylist()
    for row in rows:
        row["attributes"] = []
        if row["entity_id"] in blank:
            row["name"] = ""
    uri = str(tmp_path / "ds")
    shutil.copytree(small_data.dataset, uri)
    write_dataset(uri, name=src.name, source_format=src.manifest["source_format"], entities=entities_table(rows),
                  mentions={s: src.mentions(s) for s in ("train", "dev", "test")}, report=src.report())
    features = extract_features(uri, small_data.models["clip"], FeaturesConfig(num_gpus=0), engine="local",
                                quiet=True)
    cfg = load_config(None, ["negatives.source=names", "negatives.k=4", "train.negatives=jaccard", "train.k=2",
                             "train.epochs=1", "train.batch_size=16", "train.num_workers=1",
                             "train.cpus_per_worker=0.5", "model.hidden=16", "tracking.experiment=names"])
    mine_negatives(uri, k=4, num_workers=0, source="names")
    result = train(cfg, uri, features_uri=features["uri"], storage_path=str(tmp_path / "runs"), run_name="names",
                   tracking_dir=str(tmp_path))
    assert result["negatives_uri"].endswith("negatives/names_k4.parquet")
    coverage = pool_coverage(uri, result["negatives_uri"], 2)
    assert 0 < coverage["empty_pool"] < coverage["train_mentions"] == len(train_golds)
    assert result["negatives_coverage"] == coverage
    # one worker sees every training mention once: the fallbacks are the empty pools, no more (the Jaccard pool
    # of this KB would make every mention one)
    assert result["history"][0]["negative_fallbacks"] == coverage["empty_pool"]
    params = mlflow.tracking.MlflowClient(result["tracking_uri"]).get_run(result["run_id"]).data.params
    assert params["inputs.negatives_empty_pool"] == str(coverage["empty_pool"])
    assert params["negatives.source"] == "names"
    assert pa.types.is_list(read_negatives(uri, 4, "names").schema.field("neg_entity_ids").type)
