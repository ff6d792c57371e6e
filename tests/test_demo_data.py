"""The generated MIMIC-format release: layout, determinism, and the properties the pipeline relies on
(ambiguous names, skewed attributes, informative but noisy images, overlapping KBs across seeds)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from mel_ray import demo_data, storage
from mel_ray.demo_data import make_demo_data
from mel_ray.errors import UsageError

SPLITS = ("train", "dev", "test")


def _load(root: Path) -> tuple[list[dict], dict, dict[str, list[dict]]]:
    kb = json.loads((root / "kb_entity.json").read_text(encoding="utf-8"))
    qid2id_text = (root / "qid2id.json").read_text(encoding="utf-8")
    assert qid2id_text.count("\n") == 1, "MIMIC reads qid2id.json with a single readline()"
    splits = {s: json.loads((root / f"demo_{s}.json").read_text(encoding="utf-8")) for s in SPLITS}
    return kb, json.loads(qid2id_text), splits


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _name(rec: dict) -> str:
    return unquote(rec["entity_name"]).replace("_", " ")


def _values(rec: dict) -> list[str]:
    return [s.split(": ", 1)[1] for s in rec["attr"].rstrip(".").split(". ")]


def _mention_image(root: Path, img_path: str) -> Path:
    p = root / "mention_image" / img_path
    return p if p.exists() else p.with_suffix(".jpg")   # MIMIC's <stem>.jpg convention


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("demo")
    out = {}
    for key, seed in (("a", 0), ("a_again", 0), ("b", 1)):
        out[key] = (base / key, make_demo_data(str(base / key), seed=seed))
    return out


def test_layout_and_ids(releases):
    root, stats = releases["a"]
    kb, qid2id, splits = _load(root)
    assert [r["id"] for r in kb] == list(range(len(kb))) == list(range(400))
    assert qid2id == {r["qid"]: r["id"] for r in kb}
    assert len(qid2id) == len(kb)
    for r in kb:
        assert set(r) == {"id", "qid", "entity_name", "desc", "attr", "image_list", "type"}
        assert r["type"] == "entity" and r["qid"].startswith("Q") and r["desc"]
        assert " " not in r["entity_name"] and "_" not in _name(r)
        for fname in r["image_list"]:
            assert (root / "kb_image" / fname).is_file()
    sizes = {s: len(rows) for s, rows in splits.items()}
    assert sizes == stats["mentions"] == {"train": 420, "dev": 60, "test": 120}
    ids = [m["id"] for rows in splits.values() for m in rows]
    assert len(ids) == len(set(ids)) == 600
    for m in (m for rows in splits.values() for m in rows):
        assert set(m) == {"id", "mentions", "sentence", "imgPath", "answer"}
        if m["imgPath"]:
            assert _mention_image(root, m["imgPath"]).is_file()
    assert stats["jpg_fallback_images"] > 0
    fallback = [m for rows in splits.values() for m in rows
                if m["imgPath"] and not (root / "mention_image" / m["imgPath"]).exists()]
    assert len(fallback) == stats["jpg_fallback_images"]
    assert 0.02 <= len(fallback) / len(ids) <= 0.08


def test_same_seed_gives_identical_files(releases):
    a, b = _hashes(releases["a"][0]), _hashes(releases["a_again"][0])
    assert len(a) > 900 and a == b
    assert _hashes(releases["b"][0]) != a


def test_names_collide(releases):
    root, stats = releases["a"]
    kb, _, _ = _load(root)
    counts = Counter(_name(r) for r in kb)
    rate = sum(1 for r in kb if counts[_name(r)] > 1) / len(kb)
    assert rate >= 0.2
    assert rate == pytest.approx(stats["name_collision_rate"], abs=1e-3)
    kinds_per_name = {}
    for r in kb:
        kinds_per_name.setdefault(_name(r), set()).add(r["attr"].split(". ")[0])
    assert any(len(k) > 1 for k in kinds_per_name.values()), "some names should be shared across types"
    assert any(_name(r) != _name(r).encode("ascii", "ignore").decode() for r in kb), "unicode names expected"


def test_image_and_nil_rates(releases):
    root, stats = releases["a"]
    _, _, splits = _load(root)
    mentions = [m for rows in splits.values() for m in rows]
    no_image = sum(1 for m in mentions if not m["imgPath"]) / len(mentions)
    assert 0.10 <= no_image <= 0.20
    assert no_image == pytest.approx(stats["no_image_rate"], abs=1e-3)
    nil = sum(1 for m in mentions if m["answer"] == "nil") / len(mentions)
    assert 0 < nil <= 0.04


def test_answers_exist_and_sentences_carry_clues(releases):
    root, _ = releases["a"]
    kb, qid2id, splits = _load(root)
    by_qid = {r["qid"]: r for r in kb}
    for m in (m for rows in splits.values() for m in rows):
        surface = unquote(m["mentions"])
        assert surface and surface in m["sentence"]
        if m["answer"] == "nil":
            continue
        assert m["answer"] in qid2id
        assert any(v in m["sentence"] for v in _values(by_qid[m["answer"]])), m


def test_attribute_frequencies_are_skewed(releases):
    root, stats = releases["a"]
    kb, _, _ = _load(root)
    df = Counter()
    for r in kb:
        assert r["attr"].endswith(".")
        statements = r["attr"].rstrip(".").split(". ")
        assert all(s.count(": ") == 1 for s in statements), r["attr"]
        assert statements[0].startswith("instance of: ")
        df.update(set(statements))
    top, top_n = df.most_common(1)[0]
    assert top_n / len(kb) > 0.3 and top == stats["top_attribute"]
    assert np.median(list(df.values())) <= 3          # a long tail of rare statements
    assert len(df) > len(kb)


def test_vocabulary_has_no_separator_characters():
    for spec in demo_data.TYPES.values():
        for prop, _, source, _ in spec["props"]:
            assert "." not in prop and ":" not in prop
            for v in source if isinstance(source, list) else []:
                assert "." not in v and ":" not in v, v
    for group in (demo_data.CITIES, demo_data.FIRST, demo_data.LAST):
        assert all("." not in v and ":" not in v and "_" not in v for v in group)


def test_name_is_ambiguous_but_attributes_and_images_disambiguate(releases):
    root, _ = releases["a"]
    kb, _, splits = _load(root)

    def small(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB").resize((16, 16))).astype(np.float32)

    ambiguous = by_text = by_image = image_cases = total = 0
    for m in (m for rows in splits.values() for m in rows if m["answer"] != "nil"):
        total += 1
        surface = unquote(m["mentions"])
        cands = [r for r in kb if _name(r) == surface or _name(r).split(" ")[-1] == surface]
        if len(cands) < 2:
            continue
        ambiguous += 1
        scores = {r["qid"]: sum(v in m["sentence"] for v in set(_values(r))) for r in cands}
        best = max(scores.values())
        if scores[m["answer"]] == best and list(scores.values()).count(best) == 1:
            by_text += 1
        if m["imgPath"] and all(r["image_list"] for r in cands):
            img = small(_mention_image(root, m["imgPath"]))
            dist = {r["qid"]: float(np.mean((small(root / "kb_image" / r["image_list"][0]) - img) ** 2))
                    for r in cands}
            image_cases += 1
            by_image += min(dist, key=dist.get) == m["answer"]
    assert ambiguous / total >= 0.3
    assert by_text / ambiguous >= 0.7
    assert image_cases > 50 and by_image / image_cases >= 0.6


def test_two_seeds_share_part_of_the_kb(releases):
    kb_a, _, _ = _load(releases["a"][0])
    kb_b, _, _ = _load(releases["b"][0])
    a = {r["qid"]: r for r in kb_a}
    b = {r["qid"]: r for r in kb_b}
    shared = set(a) & set(b)
    assert 0.2 <= len(shared) / len(a) <= 0.4
    for q in shared:
        ra, rb = dict(a[q]), dict(b[q])
        ra.pop("id"), rb.pop("id")
        assert ra == rb
        for fname in ra["image_list"]:
            assert (releases["a"][0] / "kb_image" / fname).read_bytes() == \
                   (releases["b"][0] / "kb_image" / fname).read_bytes()


def test_rerun_is_skipped_other_parameters_regenerate(tmp_path):
    out = tmp_path / "demo"
    first = make_demo_data(str(out), n_entities=30, n_mentions=40, seed=3)
    assert not first.get("skipped")
    before = _hashes(out)
    again = make_demo_data(str(out), n_entities=30, n_mentions=40, seed=3)
    assert again["skipped"] and _hashes(out) == before
    other = make_demo_data(str(out), n_entities=40, n_mentions=40, seed=3)
    assert not other.get("skipped") and other["entities"] == 40
    assert len(json.loads((out / "kb_entity.json").read_text())) == 40
    assert not [p for p in tmp_path.iterdir() if p.name != "demo"], "no temporary folders left behind"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(UsageError):
        make_demo_data(str(foreign), n_entities=30, n_mentions=40)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_small_release_runs_fast_and_writes_to_s3(s3_bucket):
    uri = f"{s3_bucket}/raw/demo"
    stats = make_demo_data(uri, n_entities=20, n_mentions=30, seed=2)
    files = storage.list_files(uri)
    assert {"kb_entity.json", "qid2id.json", "demo_train.json", "demo_dev.json", "demo_test.json"} <= set(files)
    assert any(f.startswith("kb_image/") for f in files) and any(f.startswith("mention_image/") for f in files)
    assert len(storage.read_json(f"{uri}/kb_entity.json")) == 20
    assert make_demo_data(uri, n_entities=20, n_mentions=30, seed=2)["skipped"]
    assert stats["name_collision_rate"] >= 0.2


def test_wiki_title_quotes_like_wikipedia():
    assert demo_data.wiki_title("Saint John's Episcopal Church") == "Saint_John's_Episcopal_Church"
    assert demo_data.wiki_title("Zoë Tromsø") == "Zo%C3%AB_Troms%C3%B8"
    assert unquote(demo_data.wiki_title("Björn Müller")).replace("_", " ") == "Björn Müller"
