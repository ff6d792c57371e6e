"""Retrieve, then rerank (issue 16 item 4; mel_ray/eval/candidates.py): a real tiny CLIP's features of the small
dataset and a real (untrained) model, against exact scoring (mel_ray.scoring.rank_counts) and brute force over the
full mention x KB matrices (the KB has 60 entities, so the full matrices are small here)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cli_lines import run_cli
from seeded_models import copy_with_features, seeded_model

from mel_ray.config import load_config
from mel_ray.eval.candidates import (
    entity_vector_table,
    first_stage,
    mention_vectors,
    order_by_score_then_id,
    score_with_candidates,
    stable_topk,
)
from mel_ray.scoring import NonFiniteScores, chunks_of, rank_counts

SMALL = ["model.hidden=16", "model.cvacpt_weight=0.0"]


@pytest.fixture(scope="module")
def setup(small_data, tmp_path_factory, ray_local):
    """A copy of the small dataset with features (one CLIP forward per mention, as link encodes), a model.pt,
    the test split in memory and the exact kernel's ranks and top-10."""
    from mel_ray.feature_store import EntityStore, mention_tensors

    root = tmp_path_factory.mktemp("candidates")
    ds, features = copy_with_features(small_data, root, micro_batch=1, splits=("test",))
    cfg = load_config(None, [*SMALL, f"models.clip={small_data.models['clip']}"])
    model, model_pt = seeded_model(features, root / "model.pt", seed=5, config=cfg, hidden=16, cvacpt_weight=0.0)
    store = EntityStore(features)
    mentions = mention_tensors(features, ds, "test")
    gold = store.gather(mentions["gold"].numpy())
    n_kb = store.num_entities
    counts, top_ids, top_scores = rank_counts(model, mentions, gold, chunks_of(store.chunk, 0, n_kb, 16), topk=10)
    vecs = entity_vector_table(model, chunks_of(store.chunk, 0, n_kb, 16))
    return {"root": root, "ds": ds, "features": features, "model": model, "model_pt": model_pt, "store": store,
            "mentions": mentions, "gold": gold, "n_kb": n_kb, "vecs": vecs,
            "exact": {"ranks": counts + 1, "top_ids": top_ids, "top_scores": top_scores}}


def _candidates(s: dict, c: int, topk: int = 10, **kw) -> dict:
    return score_with_candidates(s["model"], s["mentions"], s["vecs"], s["store"].gather, c, topk,
                                 gold_features=s["gold"], **kw)


def _full_sides(s: dict) -> tuple[dict, dict]:
    model = s["model"]
    with torch.no_grad():
        ms = model.mention_side(model.mention_features(dict(s["mentions"])))
        es = model.entity_side(model.entity_features(s["store"].chunk(0, s["n_kb"])))
    return ms, es


def _brute_first_stage(s: dict) -> np.ndarray:
    """g2g / 2 + s_C over the full matrix, from the matcher's own side dicts and CMFU's pair scores."""
    ms, es = _full_sides(s)
    with torch.no_grad():
        g2g = ms["text"]["t"] @ es["text"]["t"].T
        return (g2g / 2 + s["model"].cmfu.pair_scores(ms["cross"], es["cross"])).numpy()


def _stable_order(scores: np.ndarray) -> np.ndarray:
    """Entity ids of each row by (score desc, id asc)."""
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((ids, -scores.astype(np.float64)), axis=1)


# ------------------------------------------------------------------------------------------- the kernel


def test_all_of_the_kb_as_candidates_is_exact_scoring(setup):
    s = setup
    got = _candidates(s, s["n_kb"], mention_batch=7)
    assert got["gold_in_candidates"].all()
    np.testing.assert_array_equal(got["ranks"], s["exact"]["ranks"])
    np.testing.assert_array_equal(got["top_ids"], s["exact"]["top_ids"])
    np.testing.assert_allclose(got["top_scores"], s["exact"]["top_scores"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("c, chunk", [(5, 7), (12, 64), (60, 13)])
def test_first_stage_is_the_brute_force_dot_product_top_c(setup, c, chunk):
    s = setup
    brute = _brute_first_stage(s)
    with torch.no_grad():
        vecs = mention_vectors(s["model"], dict(s["mentions"]))
        first = first_stage(vecs, s["vecs"], 0, c, chunk=chunk)
    np.testing.assert_array_equal(first["ids"].numpy(), _stable_order(brute)[:, :c])
    np.testing.assert_allclose(first["scores"].numpy(), np.take_along_axis(brute, first["ids"].numpy(), 1),
                               atol=1e-5)


def test_the_tie_rule_is_score_then_entity_id():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 40), generator=g).float()          # many ties, straddling every cut
    ids = torch.arange(100, 140)
    for k in (1, 3, 17, 40):
        top_ids, top_scores = stable_topk(scores, ids, k)
        want = _stable_order(scores.numpy())[:, :k] + 100
        np.testing.assert_array_equal(top_ids.numpy(), want)
        np.testing.assert_array_equal(top_scores.numpy(), np.take_along_axis(scores.numpy(), want - 100, 1))
    shuffled = torch.randperm(40, generator=g)
    i, _ = order_by_score_then_id(ids[shuffled][None].expand(50, 40), scores[:, shuffled])
    np.testing.assert_array_equal(i.numpy(), _stable_order(scores.numpy()) + 100)


def test_approximate_ranks_follow_the_stated_rule(setup):
    """Candidates reranked first (full score desc, id asc); a gold outside them gets its first-stage rank."""
    s = setup
    c = 4
    got = _candidates(s, c, topk=4, mention_batch=5)
    brute = _brute_first_stage(s)
    ms, es = _full_sides(s)
    with torch.no_grad():
        full = s["model"].pair_logits(ms, es)["overall"].numpy()
    gold = s["mentions"]["gold"].numpy()
    first_order = _stable_order(brute)
    outside = 0
    for i, g in enumerate(gold):
        cands = first_order[i, :c]
        np.testing.assert_array_equal(got["candidates"][i], cands)
        reranked = cands[np.lexsort((cands, -full[i, cands].astype(np.float64)))]
        np.testing.assert_array_equal(got["top_ids"][i], reranked)
        if g in cands:
            assert got["ranks"][i] == 1 + list(reranked).index(g) and got["gold_in_candidates"][i]
        else:
            outside += 1
            first_rank = 1 + list(first_order[i]).index(g)
            assert got["ranks"][i] == first_rank > c and not got["gold_in_candidates"][i]
    assert outside >= 3, "the case needs golds outside the candidates"          # untrained: most are outside


def test_non_finite_scores_raise(setup):
    s = setup
    mentions = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s["mentions"].items()}
    mentions["text_global"][3] = float("nan")
    with pytest.raises(NonFiniteScores) as info:
        score_with_candidates(s["model"], mentions, s["vecs"], s["store"].gather, 5, 5, gold_features=s["gold"])
    assert info.value.mask.nonzero()[0].tolist() == [3]


# ------------------------------------------------------------------------------------------ the commands


def test_evaluate_candidates_reports_recall_and_is_labelled(setup, tmp_path, capsys):
    s = setup
    base = ["evaluate", "--dataset", s["ds"], "--features", s["features"], "--checkpoint", s["model_pt"]]
    c = 6
    code, stdout, lines = run_cli(tmp_path, capsys, *base, "--candidates", str(c), "--output", str(tmp_path / "a"))
    assert (code, lines) == (0, [])
    report = json.loads((tmp_path / "a" / "eval_test.json").read_text())
    kernel = _candidates(s, c)
    assert report["approximate"] is True and report["candidates"] == c
    assert report["gold_in_candidates"] == pytest.approx(kernel["gold_in_candidates"].mean())
    assert stdout.splitlines()[0].startswith(f"APPROXIMATE: top-{c} first-stage candidates")
    predictions = pq.read_table(tmp_path / "a" / "predictions_test.parquet").to_pydict()
    np.testing.assert_array_equal(predictions["rank"], kernel["ranks"])
    np.testing.assert_array_equal(np.array(predictions["top_entity_ids"]), kernel["top_ids"][:, :6])
    # recall against exact scoring: exact top-1 among the candidates, and H@1 / MRR with vs without
    exact_top1_in = (kernel["candidates"] == s["exact"]["top_ids"][:, :1]).any(axis=1)
    approx_top1_is_exact = kernel["top_ids"][:, 0] == s["exact"]["top_ids"][:, 0]
    np.testing.assert_array_equal(exact_top1_in, approx_top1_is_exact)    # inside -> reranked to the top
    assert report["metrics"]["H@1"] == pytest.approx(float((kernel["ranks"] == 1).mean()))
    # C = KB size through the command: the exact evaluation's ranks
    code, _, lines = run_cli(tmp_path, capsys, *base, "--candidates", str(s["n_kb"]), "--output", str(tmp_path / "b"))
    assert (code, lines) == (0, [])
    full = pq.read_table(tmp_path / "b" / "predictions_test.parquet").to_pydict()
    np.testing.assert_array_equal(full["rank"], s["exact"]["ranks"])
    np.testing.assert_array_equal(np.array(full["top_entity_ids"]), s["exact"]["top_ids"])


def test_bad_candidate_counts_are_one_line(setup, tmp_path, capsys):
    s = setup
    evaluate = ["evaluate", "--dataset", s["ds"], "--features", s["features"], "--checkpoint", s["model_pt"]]
    for value, line in (("0", "evaluate: --candidates must be at least 1 (got 0)"),
                        ("-3", "evaluate: --candidates must be at least 1 (got -3)"),
                        ("61", "evaluate: --candidates 61 is larger than the KB (60 entities)")):
        assert run_cli(tmp_path, capsys, *evaluate, "--candidates", value)[::2] == (2, [f"error: {line}"])
    mentions = tmp_path / "m.jsonl"
    mentions.write_text(json.dumps({"text": "A sentence about Paris.", "mention": "Paris"}) + "\n")
    link = ["link", "--model", s["model_pt"], "--kb", s["ds"], "--mentions", str(mentions),
            "--output", str(tmp_path / "links")]
    for extra, line in ((["--candidates", "0"], "link.candidates: Input should be greater than or equal to 1 (got 0)"),
                        (["--candidates", "61"], ("link.candidates (--candidates) 61 is larger than the KB "
                                                  "(60 entities)")),
                        (["--candidates", "5"], ("link.candidates (--candidates) 5 is smaller than link.top_k "
                                                 "(--top-k) 10: the links are the reranked candidates"))):
        assert run_cli(tmp_path, capsys, *link, *extra)[::2] == (2, [f"error: {line}"])
    assert not (tmp_path / "links" / "links.parquet").exists()


def test_link_candidates_are_the_candidate_scoring_path(setup, tmp_path, capsys):
    from mel_ray.dataset import load_dataset

    s = setup
    data = load_dataset(s["ds"])
    rows = [{"mention_id": m["mention_id"], "text": m["sentence"], "mention": m["mention"],
             "image": data.resolve_uri(m["image_uri"]) if m["image_uri"] else None}
            for m in data.mentions("test").to_pylist()]
    mentions = tmp_path / "new.jsonl"
    mentions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c, k = 8, 5
    code, _, lines = run_cli(tmp_path, capsys, "link", "--model", s["model_pt"], "--kb", s["ds"], "--mentions",
                          str(mentions), "--output", str(tmp_path / "out"), "--candidates", str(c),
                          "--top-k", str(k))
    assert (code, lines) == (0, [])
    report = json.loads((tmp_path / "out" / "link_report.json").read_text())
    assert report["approximate"] is True and report["candidates"] == c
    links: dict[str, list] = {}
    for row in pq.read_table(tmp_path / "out" / "links.parquet").to_pylist():
        links.setdefault(row["mention_id"], []).append(row)
    kernel = _candidates(s, c, topk=k)
    for i, mention_id in enumerate(s["mentions"]["mention_id"]):
        assert [r["entity_id"] for r in links[mention_id]] == kernel["top_ids"][i].tolist(), mention_id
        np.testing.assert_allclose([r["score"] for r in links[mention_id]], kernel["top_scores"][i], atol=1e-4)


def test_read_only_arrays_from_ray_become_tensors_without_a_warning():
    """ray.get and Ray Data hand out read-only arrays; torch.from_numpy on one prints a raw UserWarning (once per
    process: hence a fresh interpreter with warnings as errors)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import numpy as np
        from mel_ray.eval.candidates import _link_batch_tensors, writable_tensor
        from mel_ray.link import FLOAT_COLUMNS
        def frozen(a):
            a.flags.writeable = False
            return a
        t = writable_tensor(frozen(np.arange(6, dtype=np.int64)))
        t[0] = 7                                  # a copy: the read-only original is untouched
        batch = {k: frozen(np.zeros((2, 3), dtype=np.float32)) for k in FLOAT_COLUMNS}
        batch.update(text_mask=frozen(np.ones((2, 3), dtype=bool)), n_views=frozen(np.zeros(2, dtype=np.int64)))
        out = _link_batch_tensors(batch)
        print(int(t[0]), sorted(out) == sorted([*FLOAT_COLUMNS, "text_mask", "n_views"]))
    """)
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script], capture_output=True, text=True,
                       timeout=120, check=False)
    assert (r.returncode, r.stdout.strip()) == (0, "7 True"), r.stderr[-2000:]
