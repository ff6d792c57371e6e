"""Ingest of the three formats on tiny hand-built releases (the builders are reused by the other ingest tests)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mel_ray import cli
from mel_ray.config import IngestConfig
from mel_ray.dataset import SPLITS, load_dataset
from mel_ray.ingest import ingest, summary_line
from mel_ray.ingest.common import hash_split, split_attributes

# ---------------------------------------------------------------------------------------------------------
# fixture builders: a release is a dict {relative path: content}; tests mutate it, then write_tree() it


def png(color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format=fmt)
    return buf.getvalue()


def write_tree(root: Path, files: dict[str, Any]) -> Path:
    """bytes are written as is, str as UTF-8, a list under *.jsonl one JSON per line, anything else as JSON."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif rel.endswith(".jsonl"):
            path.write_text("".join(json.dumps(x) + "\n" for x in content), encoding="utf-8")
        else:
            path.write_text(json.dumps(content), encoding="utf-8")
    return root


OBAMA_ATTR = ("instance of: human. sex or gender: male. place of birth: Honolulu. height: 1.85. "
              "Instance Of:  human. country of citizenship: United States of America.")


def mimic_files() -> dict[str, Any]:
    kb = [  # deliberately not in id order: ingest must sort by id
        {"id": 1, "qid": "Q76", "entity_name": "Barack_Obama", "desc": "44th  president", "attr": OBAMA_ATTR,
         "image_list": ["Q76_0.png", "Q76_gone.png"], "type": "PER"},
        {"id": 0, "qid": "Q6294", "entity_name": "Hillary%20Clinton", "attr": "occupation: lawyer.",
         "image_list": ["Q6294_0.png"], "type": "PER"},
        {"id": 2, "qid": "Q1297", "entity_name": "Chicago", "desc": "city", "type": "LOC",
         "attr": "instance of: city. country: U.S. twinned administrative body: St. Louis.", "image_list": []},
    ]
    return {
        "kb_entity.json": kb,
        "qid2id.json": {"Q6294": 0, "Q76": 1, "Q1297": 2},
        "WikiMEL_train.json": [
            {"id": 10, "mentions": "Barack%20Obama", "sentence": "Barack Obama spoke in Chicago.",
             "imgPath": "m10.png", "answer": "Q76"},   # only m10.jpg exists: the .jpg fallback
            {"id": 11, "mentions": "Hillary", "sentence": "Hillary  waved.", "imgPath": "m11.jpg", "answer": "Q6294"},
            {"id": 12, "mentions": "someone", "sentence": "Someone else.", "imgPath": "", "answer": "nil"},
        ],
        "WikiMEL_dev.json": [
            {"id": 20, "mentions": "Chicago", "sentence": "Chicago in winter.", "imgPath": "gone.jpg",
             "answer": "Q1297"},
        ],
        "WikiMEL_test.json": [
            {"id": 30, "mentions": "Obama", "sentence": "Obama smiled.", "imgPath": "m11.jpg", "answer": "Q76"},
            {"id": 31, "mentions": "X", "sentence": "X happened.", "imgPath": "", "answer": "Q999"},
        ],
        "kb_image/Q76_0.png": png((1, 2, 3)),
        "kb_image/Q6294_0.png": png((4, 5, 6)),
        "mention_image/m10.jpg": png((7, 8, 9), "JPEG"),
        "mention_image/m11.jpg": png((10, 11, 12), "JPEG"),
    }


def melbench_files() -> dict[str, Any]:
    samples = {
        "s1": {"id": "s1", "sentence": "Obama met Clinton.", "mentions": ["Obama", "Clinton"],
               "entities": ["Barack Obama", "Hillary Clinton"], "answer": ["Q76", "Q6294"]},
        "s2": {"id": "s2", "sentence": "Clinton spoke.", "mentions": ["Clinton"], "entities": [""],
               "answer": ["Q6294"], "imgPath": "pics/s2.png"},
        "s3": {"id": "s3", "sentence": "Who is this?", "mentions": "him", "entities": "nobody", "answer": "nil"},
        "s4": {"id": "s4", "sentence": "Chicago at night.", "mentions": "Chicago", "entities": "Chicago",
               "answer": "Q1297"},
    }
    return {"WikiMEL.json": samples, "imgs/s1.jpg": png(fmt="JPEG"), "imgs/pics/s2.png": png((0, 9, 0))}


def jsonl_files() -> dict[str, Any]:
    return {
        "entities.jsonl": [
            {"qid": "Q76", "name": "Barack Obama", "description": "president",
             "attributes": ["instance of: human", "Instance of:  human", "occupation: politician"],
             "images": ["img/kb/obama.png"]},
            {"qid": "Q1297", "name": "Chicago", "attributes": [], "images": []},
        ],
        "mentions.jsonl": [
            {"id": "a", "mention": "Obama", "sentence": "Obama waved.", "image": "img/m/a.png", "qid": "Q76",
             "split": "train"},
            {"id": "b", "mention": "Chicago", "sentence": "Chicago.", "image": None, "qid": "Q1297", "split": "test"},
            {"id": "c", "mention": "", "sentence": "Nobody.", "image": None, "qid": "Q76", "split": "dev"},
        ],
        "img/kb/obama.png": png(),
        "img/m/a.png": png((3, 3, 3)),
    }


def rows(ds_path: Path, split: str | None = None) -> list[dict[str, Any]]:
    ds = load_dataset(str(ds_path))
    return (ds.entities() if split is None else ds.mentions(split)).to_pylist()


# ---------------------------------------------------------------------------------------------------------
# mimic


def test_mimic_entities_keep_kb_ids_and_normalise(tmp_path):
    src = write_tree(tmp_path / "src", mimic_files())
    ingest("mimic", str(src), str(tmp_path / "ds"))
    ents = rows(tmp_path / "ds")
    assert [(e["entity_id"], e["qid"], e["name"]) for e in ents] == [
        (0, "Q6294", "Hillary Clinton"), (1, "Q76", "Barack Obama"), (2, "Q1297", "Chicago")]
    obama = ents[1]
    assert obama["description"] == "44th president"
    assert obama["attributes"] == ["instance of: human", "sex or gender: male", "place of birth: Honolulu",
                                   "height: 1.85", "country of citizenship: United States of America"]
    assert ents[2]["attributes"] == ["instance of: city", "country: U.S",
                                     "twinned administrative body: St. Louis"]
    assert ents[0]["description"] == ""
    assert obama["image_uris"] == ["images/kb/Q76_0.png"]          # Q76_gone.png is missing: dropped
    assert (tmp_path / "ds/images/kb/Q76_0.png").read_bytes() == png((1, 2, 3))


def test_mimic_mentions_splits_skips_and_images(tmp_path):
    src = write_tree(tmp_path / "src", mimic_files())
    report = ingest("mimic", str(src), str(tmp_path / "ds"))
    train = rows(tmp_path / "ds", "train")
    assert [(m["mention_id"], m["mention"], m["entity_id"], m["qid"]) for m in train] == [
        ("10", "Barack Obama", 1, "Q76"), ("11", "Hillary", 0, "Q6294")]
    assert train[0]["image_uri"] == "images/mentions/m10.jpg"     # imgPath m10.png -> m10.jpg fallback
    assert train[1]["sentence"] == "Hillary waved."
    assert rows(tmp_path / "ds", "dev")[0]["image_uri"] is None   # gone.jpg is missing
    assert [m["mention_id"] for m in rows(tmp_path / "ds", "test")] == ["30"]
    assert report["rows"]["mentions"] == {"read": 6, "kept": 4, "skipped": {"nil_answer": 1, "answer_not_in_kb": 1},
                                          "splits": {"train": 2, "dev": 1, "test": 1}}
    assert report["rows"]["entities"] == {"read": 3, "kept": 3, "skipped": {}}
    assert report["images"] == {"kb": {"found": 2, "copied": 2, "missing": 1, "undecodable": 0},
                                "mentions": {"found": 2, "copied": 2, "missing": 1, "undecodable": 0}}
    assert report["examples"]["nil_answer"] == ["WikiMEL_train.json #2 (id 12): answer 'nil'"]
    assert report["examples"]["answer_not_in_kb"] == ["WikiMEL_test.json #1 (id 31): answer 'Q999'"]
    assert report["examples"]["image_missing"] == ["entity Q76: Q76_gone.png", "sample 20: gone.jpg"]
    written = json.loads((tmp_path / "ds/ingest_report.json").read_text())
    assert written == report
    manifest = load_dataset(str(tmp_path / "ds")).manifest
    assert manifest["name"] == "ds" and manifest["source_format"] == "mimic"
    assert manifest["counts"] == {"entities": 3, "train": 2, "dev": 1, "test": 1}


def test_mimic_mention_images_folder_and_no_qid2id(tmp_path):
    files = mimic_files()
    del files["qid2id.json"]
    for name in ("m10.jpg", "m11.jpg"):
        files[f"mention_images/{name}"] = files.pop(f"mention_image/{name}")
    src = write_tree(tmp_path / "src", files)
    ingest("mimic", str(src), str(tmp_path / "ds"))
    assert [m["image_uri"] for m in rows(tmp_path / "ds", "train")] == [
        "images/mentions/m10.jpg", "images/mentions/m11.jpg"]


def test_reference_images_instead_of_copying(tmp_path):
    src = write_tree(tmp_path / "src", mimic_files())
    ingest("mimic", str(src), str(tmp_path / "ds"), options=IngestConfig(copy_images=False))
    assert rows(tmp_path / "ds")[1]["image_uris"] == [str(src / "kb_image/Q76_0.png")]
    assert rows(tmp_path / "ds", "train")[0]["image_uri"] == str(src / "mention_image/m10.jpg")
    assert not (tmp_path / "ds/images").exists()


def test_nested_new_output_and_explicit_name(tmp_path):
    src = write_tree(tmp_path / "src", mimic_files())
    out = tmp_path / "a/b/c/wikimel"
    ingest("mimic", str(src), str(out))
    assert load_dataset(str(out)).name == "wikimel"
    ingest("mimic", str(src), str(out), name="WikiMEL-v2")
    assert load_dataset(str(out)).name == "WikiMEL-v2"


def test_ingest_twice_gives_identical_tables(tmp_path):
    src = write_tree(tmp_path / "src", mimic_files())
    out = tmp_path / "ds"
    ingest("mimic", str(src), str(out))
    first = {p: pq.read_table(out / p) for p in ["entities.parquet", *(f"mentions/{s}.parquet" for s in SPLITS)]}
    report = (out / "ingest_report.json").read_bytes()
    ingest("mimic", str(src), str(out))
    for path, table in first.items():
        assert pq.read_table(out / path).equals(table), path
    assert (out / "ingest_report.json").read_bytes() == report


def test_cli_prints_summary_line(tmp_path, capsys):
    src = write_tree(tmp_path / "src", mimic_files())
    out = tmp_path / "ds"
    assert cli.main(["ingest", "--format", "mimic", "--input", str(src), "--output", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        (f"ingested {out}: 3 entities, train/dev/test = 2/1/1 mentions, skipped 2 (answer_not_in_kb 1, "
        "nil_answer 1), images missing 2, undecodable 0")]


def test_summary_line_without_skips():
    report = {"rows": {"entities": {"read": 5, "kept": 5, "skipped": {}},
                       "mentions": {"read": 3, "kept": 3, "skipped": {}, "splits": {"train": 1, "dev": 1, "test": 1}}},
              "images": {"kb": {"missing": 0, "undecodable": 1}, "mentions": {"missing": 2, "undecodable": 0}}}
    assert summary_line("out", report) == ("ingested out: 5 entities, train/dev/test = 1/1/1 mentions, skipped 0, "
                                           "images missing 2, undecodable 1")


# ---------------------------------------------------------------------------------------------------------
# attribute split rule


@pytest.mark.parametrize("text, expected", [
    (("instance of: human. sex or gender: male. country of citizenship: United States of America. "
     "occupation: politician."),
     ["instance of: human", "sex or gender: male", "country of citizenship: United States of America",
      "occupation: politician"]),
    # periods inside values: abbreviations, decimals, dates, URLs, initials
    (("place of birth: St. Louis. height: 1.85. member of: N.A.T.O.. official website: https://example.org/a.b. "
     "date of birth: 1961-08-04T00:00:00Z. time: 12:30. described by source: Mr. Smith. award received: Nobel "
     "Peace Prize."),
     ["place of birth: St. Louis", "height: 1.85", "member of: N.A.T.O.", "official website: https://example.org/a.b",
      "date of birth: 1961-08-04T00:00:00Z", "time: 12:30", "described by source: Mr. Smith",
      "award received: Nobel Peace Prize"]),
    # property names lower-cased, whitespace normalised, duplicates dropped keeping the first
    ("Instance Of:\thuman.  instance of: human. VIAF ID:  123 456. occupation: actor. Occupation: actor",
     ["instance of: human", "viaf id: 123 456", "occupation: actor"]),
    # a separator followed by no whitespace does not split; empty values are dropped; text without kv is kept
    ("nickname: J.R.R.. occupation: . sport: chess.", ["nickname: J.R.R.", "sport: chess"]),
    ("free text without statements.", ["free text without statements"]),
    ("instance of: human.sex or gender: male.", ["instance of: human.sex or gender: male"]),
    ("", []),
    ("   ", []),
])
def test_split_attributes(text, expected):
    assert split_attributes(text, ".", ":") == expected


def test_split_attributes_custom_separators(tmp_path):
    assert split_attributes("instance of = human; height = 1.85; occupation = actor;", ";", "=") == [
        "instance of: human", "height: 1.85", "occupation: actor"]
    assert split_attributes("a: x | b: y|z | c: 1", " | ", ":") == ["a: x", "b: y|z", "c: 1"]
    files = mimic_files()
    files["kb_entity.json"][2]["attr"] = "instance of = city; country = U.S.;"
    src = write_tree(tmp_path / "src", files)
    ingest("mimic", str(src), str(tmp_path / "ds"), options=IngestConfig(attr_separator=";", attr_kv_separator="="))
    assert rows(tmp_path / "ds")[2]["attributes"] == ["instance of: city", "country: U.S."]


# ---------------------------------------------------------------------------------------------------------
# melbench


def test_melbench_lists_and_strings_kb_and_images(tmp_path):
    src = write_tree(tmp_path / "src", melbench_files())
    out = tmp_path / "ds"
    report = ingest("melbench", str(src / "WikiMEL.json"), str(out), options=IngestConfig(image_dir=str(src / "imgs")))
    ents = rows(out)
    # KB = answer QIDs in order of first appearance; an empty entity name gives way to a later one / the qid
    assert [(e["entity_id"], e["qid"], e["name"]) for e in ents] == [
        (0, "Q76", "Barack Obama"), (1, "Q6294", "Hillary Clinton"), (2, "Q1297", "Chicago")]
    assert all(e["attributes"] == [] and e["description"] == "" and e["image_uris"] == [] for e in ents)
    mentions = {m["mention_id"]: (split, m) for split in SPLITS for m in rows(out, split)}
    assert sorted(mentions) == ["s1:0", "s1:1", "s2:0", "s4:0"]
    for mid, (split, m) in mentions.items():
        assert split == hash_split(mid.split(":")[0], (0.7, 0.1, 0.2))
    assert mentions["s1:0"][1]["image_uri"] == mentions["s1:1"][1]["image_uri"] == "images/mentions/s1.jpg"
    assert mentions["s2:0"][1]["image_uri"] == "images/mentions/pics/s2.png"
    assert mentions["s4:0"][1]["image_uri"] is None          # no image key and no s4.jpg: not "missing"
    assert mentions["s1:1"][1]["entity_id"] == 1
    assert report["rows"]["mentions"]["skipped"] == {"nil_answer": 1}
    assert report["images"]["mentions"] == {"found": 2, "copied": 2, "missing": 0, "undecodable": 0}


def test_melbench_split_ratios_and_no_image_dir(tmp_path):
    src = write_tree(tmp_path / "src", melbench_files())
    report = ingest("melbench", str(src / "WikiMEL.json"), str(tmp_path / "ds"),
                    options=IngestConfig(split_ratios=(0.0, 0.0, 1.0)))
    assert report["rows"]["mentions"]["splits"] == {"train": 0, "dev": 0, "test": 4}
    assert all(m["image_uri"] is None for m in rows(tmp_path / "ds", "test"))


def test_hash_split_is_stable_and_follows_ratios():
    assert hash_split("s1", (0.7, 0.1, 0.2)) == hash_split("s1", (0.7, 0.1, 0.2))
    counts = {s: 0 for s in SPLITS}
    for i in range(3000):
        counts[hash_split(str(i), (0.7, 0.1, 0.2))] += 1
    assert 1950 < counts["train"] < 2250 and 200 < counts["dev"] < 400 and 450 < counts["test"] < 750


def test_melbench_cli_image_dir(tmp_path, capsys):
    src = write_tree(tmp_path / "src", melbench_files())
    out = tmp_path / "ds"
    code = cli.main(["ingest", "--format", "melbench", "--input", str(src / "WikiMEL.json"), "--output", str(out),
                     "--image-dir", str(src / "imgs"), "--name", "wikidata-mel"])
    assert code == 0
    assert "3 entities" in capsys.readouterr().out
    assert load_dataset(str(out)).name == "wikidata-mel"


# ---------------------------------------------------------------------------------------------------------
# jsonl


def test_jsonl_ingest(tmp_path):
    src = write_tree(tmp_path / "src", jsonl_files())
    report = ingest("jsonl", str(src), str(tmp_path / "ds"))
    ents = rows(tmp_path / "ds")
    assert [(e["entity_id"], e["qid"]) for e in ents] == [(0, "Q76"), (1, "Q1297")]
    assert ents[0]["attributes"] == ["instance of: human", "occupation: politician"]
    assert ents[0]["image_uris"] == ["images/kb/img/kb/obama.png"]
    assert ents[1]["description"] == ""
    assert rows(tmp_path / "ds", "train") == [{"mention_id": "a", "mention": "Obama", "sentence": "Obama waved.",
                                               "image_uri": "images/mentions/img/m/a.png", "entity_id": 0,
                                               "qid": "Q76"}]
    assert rows(tmp_path / "ds", "test")[0]["image_uri"] is None
    assert rows(tmp_path / "ds", "dev") == []
    assert report["rows"]["mentions"]["skipped"] == {"empty_mention": 1}
    assert report["examples"]["empty_mention"] == ["line 3"]


# ---------------------------------------------------------------------------------------------------------
# S3 (a real S3-protocol server, moto, from conftest)


def test_s3_input_and_output(tmp_path, s3_bucket):
    from mel_ray import storage

    local = write_tree(tmp_path / "src", mimic_files())
    src = f"{s3_bucket}/releases/wikimel"
    for path in local.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{src}/{path.relative_to(local).as_posix()}", path.read_bytes())
    out = f"{s3_bucket}/datasets/wikimel"
    report = ingest("mimic", src, out)
    ds = load_dataset(out)
    assert ds.name == "wikimel"
    assert [e["qid"] for e in ds.entities().to_pylist()] == ["Q6294", "Q76", "Q1297"]
    assert ds.mentions("train").column("image_uri").to_pylist() == ["images/mentions/m10.jpg",
                                                                     "images/mentions/m11.jpg"]
    assert storage.read_bytes(ds.resolve_uri("images/kb/Q76_0.png")) == png((1, 2, 3))
    assert report["images"]["kb"]["missing"] == 1
    # referencing instead of copying keeps the source's s3:// URIs
    ingest("mimic", src, out, options=IngestConfig(copy_images=False))
    assert load_dataset(out).entities().to_pylist()[1]["image_uris"] == [f"{src}/kb_image/Q76_0.png"]
