"""Bad input: fatal problems exit 2 with ONE stderr line naming file, record and field; skippable ones are
counted. Every case asserts the exact exit code and line, and that no manifest.json is left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

try:
    from tests.test_ingest import jsonl_files, melbench_files, mimic_files, png, rows, write_tree
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from test_ingest import jsonl_files, melbench_files, mimic_files, png, rows, write_tree

from mel_ray import cli
from mel_ray.dataset import MANIFEST


def run(capsys, fmt: str, src: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["ingest", "--format", fmt, "--input", str(src), "--output", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def kb(files):
    return files["kb_entity.json"]


def set_in(path: str, key: str, value: Any) -> Callable[[dict], None]:
    """Mutation: files[file][index][key] = value, path being "file#index"."""
    file, index = path.split("#")

    def mutate(files: dict) -> None:
        files[file][int(index)][key] = value
    return mutate


def delete_in(path: str, key: str) -> Callable[[dict], None]:
    file, index = path.split("#")
    return lambda files: files[file][int(index)].pop(key)


def replace(file: str, content: Any) -> Callable[[dict], None]:
    return lambda files: files.__setitem__(file, content)


TRAIN, DEV = "WikiMEL_train.json", "WikiMEL_dev.json"

# (case id, mutation, stderr line after "error: {src}/")
MIMIC_FATAL = [
    ("truncated-json", replace("kb_entity.json", '[{"id": 0, "qid": "Q1"'),
     "kb_entity.json: invalid JSON at line 1 column 23: Expecting ',' delimiter"),
    ("malformed-json", replace(TRAIN, '[{"id": 10,, }]'),
     "WikiMEL_train.json: invalid JSON at line 1 column 12: Expecting property name enclosed in double quotes"),
    ("empty-file", replace(DEV, ""), "WikiMEL_dev.json: invalid JSON at line 1 column 1: Expecting value"),
    ("kb-top-level-object", replace("kb_entity.json", {}),
     "kb_entity.json: top level must be a JSON list of entity objects, got object {}"),
    ("split-top-level-string", replace(DEV, "\"hello\""),
     "WikiMEL_dev.json: top level must be a JSON list of sample objects, got string \"hello\""),
    ("entity-not-object", lambda f: kb(f).__setitem__(2, [1, 2]),
     "kb_entity.json: record #2: expected a JSON object, got list [1, 2]"),
    ("missing-qid", delete_in("kb_entity.json#1", "qid"),
     "kb_entity.json: record #1 (id 0): field 'qid': missing required field"),
    ("missing-id", delete_in("kb_entity.json#0", "id"),
     "kb_entity.json: record #0: field 'id': missing required field"),
    ("id-wrong-type", set_in("kb_entity.json#0", "id", "1"),
     "kb_entity.json: record #0 (id '1'): field 'id': expected an integer, got string \"1\""),
    ("id-bool", set_in("kb_entity.json#0", "id", True),
     "kb_entity.json: record #0: field 'id': expected an integer, got boolean true"),
    ("qid-wrong-type", set_in("kb_entity.json#0", "qid", 76),
     "kb_entity.json: record #0 (id 1): field 'qid': expected a string, got integer 76"),
    ("attr-wrong-type", set_in("kb_entity.json#0", "attr", {"a": 1}),
     "kb_entity.json: record #0 (id 1): field 'attr': expected a string, got object {\"a\": 1}"),
    ("image-list-wrong-type", set_in("kb_entity.json#0", "image_list", "Q76_0.png"),
     "kb_entity.json: record #0 (id 1): field 'image_list': expected a list of strings, got string \"Q76_0.png\""),
    ("empty-entity-name", set_in("kb_entity.json#2", "entity_name", "_%20_"),
     "kb_entity.json: record #2 (id 2): field 'entity_name': entity name is empty"),
    ("duplicate-qid", set_in("kb_entity.json#2", "qid", "Q76"),
     "kb_entity.json: record #2 (id 2): field 'qid': duplicate qid 'Q76' (also #0 (id 1))"),
    ("duplicate-id", set_in("kb_entity.json#2", "id", 1),
     "kb_entity.json: record #2 (id 1): field 'id': duplicate entity id 1 (also #0 (id 1))"),
    ("id-gap", set_in("kb_entity.json#2", "id", 5),
     ("kb_entity.json: record #2 (id 5): field 'id': id 5 is outside 0..2: ids must be dense, they are the model's "
     "entity ids")),
    ("negative-id", set_in("kb_entity.json#2", "id", -1),
     ("kb_entity.json: record #2 (id -1): field 'id': id -1 is outside 0..2: ids must be dense, they are the model's "
     "entity ids")),
    ("qid2id-disagrees", replace("qid2id.json", {"Q6294": 0, "Q76": 2, "Q1297": 1}),
     "qid2id.json: record 'Q76': id 2 disagrees with kb_entity.json (id 1)"),
    ("qid2id-unknown-qid", replace("qid2id.json", {"Q6294": 0, "Q76": 1, "Q1297": 2, "Q5": 3}),
     "qid2id.json: record 'Q5': qid is not in kb_entity.json"),
    ("qid2id-incomplete", replace("qid2id.json", {"Q6294": 0, "Q76": 1}),
     "qid2id.json: 1 qids of kb_entity.json are missing here, e.g. 'Q1297'"),
    ("qid2id-wrong-type", replace("qid2id.json", ["Q6294"]),
     "qid2id.json: top level must be a JSON object mapping qid to id, got list [\"Q6294\"]"),
    ("sentence-wrong-type", set_in(f"{TRAIN}#1", "sentence", 5),
     "WikiMEL_train.json: record #1 (id 11): field 'sentence': expected a string, got integer 5"),
    ("answer-null", set_in(f"{TRAIN}#1", "answer", None),
     "WikiMEL_train.json: record #1 (id 11): field 'answer': expected a string, got null"),
    ("missing-mentions", delete_in(f"{DEV}#0", "mentions"),
     "WikiMEL_dev.json: record #0 (id 20): field 'mentions': missing required field"),
    ("sample-id-float", set_in(f"{DEV}#0", "id", 2.5),
     "WikiMEL_dev.json: record #0: field 'id': expected a non-empty string or an integer, got number 2.5"),
    ("lone-surrogate", replace(DEV, '[{"id": 20, "mentions": "x", "sentence": "bad \\ud800", "answer": "Q76"}]'),
     ("WikiMEL_dev.json: record #0 (id 20): field 'sentence': string holds an invalid Unicode escape (lone "
     "surrogate)")),
    ("non-utf8", replace(DEV, b'[{"id": 20,\n "mentions": "Chicago\xff", "sentence": "s", "answer": "Q1297"}]'),
     "WikiMEL_dev.json: not valid UTF-8: byte 0xff at line 2"),
    ("mention-image-escapes", set_in(f"{TRAIN}#0", "imgPath", "../secret.jpg"),
     ("WikiMEL_train.json: record #0 (id 10): field 'imgPath': image path '../secret.jpg' escapes the image "
     "folder ('..')")),
    ("mention-image-escapes-backslash", set_in(f"{TRAIN}#0", "imgPath", "a\\..\\..\\x.jpg"),
     ("WikiMEL_train.json: record #0 (id 10): field 'imgPath': image path 'a\\\\..\\\\..\\\\x.jpg' escapes the "
     "image folder ('..')")),
    ("kb-image-absolute", set_in("kb_entity.json#1", "image_list", ["/etc/passwd"]),
     ("kb_entity.json: record #1 (id 0): field 'image_list': image path '/etc/passwd' must be relative to the "
     "image folder")),
    ("kb-image-url", set_in("kb_entity.json#1", "image_list", ["http://example.org/a.jpg"]),
     ("kb_entity.json: record #1 (id 0): field 'image_list': image path 'http://example.org/a.jpg' must be "
     "relative to the image folder")),
    ("duplicate-sample-id", set_in(f"{DEV}#0", "id", "10"),
     ("WikiMEL_dev.json: record #0 (id '10'): field 'id': sample id '10' is not unique across splits (also "
     "WikiMEL_train.json #0 (id 10))")),
    ("fatal-even-in-nil-sample", set_in(f"{TRAIN}#2", "mentions", ["someone"]),
     "WikiMEL_train.json: record #2 (id 12): field 'mentions': expected a string, got list [\"someone\"]"),
    # Python refuses to convert integers over 4300 digits (ValueError): a line, not a traceback
    ("integer-over-4300-digits", replace("kb_entity.json", '[{"qid": "Q1",\n  "id": ' + "9" * 5000 + "}]"),
     "kb_entity.json: invalid JSON at line 2 column 9: an integer with more than 4300 digits"),
    ("negative-integer-over-4300-digits", replace(TRAIN, '[{"id": -' + "1" * 4301 + "}]"),
     "WikiMEL_train.json: invalid JSON at line 1 column 9: an integer with more than 4300 digits"),
]


@pytest.mark.parametrize("mutate, line", [c[1:] for c in MIMIC_FATAL], ids=[c[0] for c in MIMIC_FATAL])
def test_mimic_fatal(tmp_path, capsys, mutate, line):
    files = mimic_files()
    mutate(files)
    src = write_tree(tmp_path / "src", files)
    out = tmp_path / "ds"
    code, stdout, stderr = run(capsys, "mimic", src, out)
    assert (code, stdout, stderr) == (2, "", f"error: {src}/{line}\n")
    assert not (out / MANIFEST).exists()


def test_mimic_split_file_problems(tmp_path, capsys):
    files = mimic_files()
    del files["WikiMEL_test.json"]
    src = write_tree(tmp_path / "src", files)
    assert run(capsys, "mimic", src, tmp_path / "ds") == (2, "", (f"error: {src}: no *_test.json split file in the "
                                                                 "folder\n"))
    write_tree(src, {"WikiMEL_test.json": [], "other_dev.json": []})
    assert run(capsys, "mimic", src, tmp_path / "ds") == (
        2, "", f"error: {src}: several *_dev.json split files: WikiMEL_dev.json, other_dev.json\n")


def test_missing_input(tmp_path, capsys):
    src = tmp_path / "nope"
    assert run(capsys, "mimic", src, tmp_path / "ds") == (
        2, "", (f"error: {src}: not found or not a folder (the mimic format is a folder with kb_entity.json and "
               "*_train.json, *_dev.json, *_test.json)\n"))
    assert run(capsys, "melbench", src, tmp_path / "ds") == (2, "", f"error: {src}: file not found\n")
    images = tmp_path / "no-images"
    assert run(capsys, "melbench", src, tmp_path / "ds", "--image-dir", str(images)) == (
        2, "", f"error: {images}: image folder (--image-dir) not found or not a folder\n")
    assert run(capsys, "melbench", tmp_path, tmp_path / "ds") == (
        2, "", f"error: {tmp_path}: is a folder: the melbench input is the release's JSON file\n")


def test_failed_ingest_removes_previous_manifest(tmp_path, capsys):
    files = mimic_files()
    src = write_tree(tmp_path / "src", files)
    out = tmp_path / "ds"
    assert run(capsys, "mimic", src, out)[0] == 0
    assert (out / MANIFEST).exists()
    write_tree(src, {"kb_entity.json": "[{"})
    assert run(capsys, "mimic", src, out)[0] == 2
    assert not (out / MANIFEST).exists()   # the old tables are still there, but no longer marked complete


def test_debug_shows_traceback(tmp_path, capsys):
    files = mimic_files()
    delete_in("kb_entity.json#1", "qid")(files)
    src = write_tree(tmp_path / "src", files)
    code = cli.main(["--debug", "ingest", "--format", "mimic", "--input", str(src), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == f"error: {src}/kb_entity.json: record #1 (id 0): field 'qid': missing required field"


# ---------------------------------------------------------------------------------------------------------
# skippable problems: counted, shown in the report and the summary line


def test_mimic_skips_empty_mention_sentence_and_unknown_answer(tmp_path, capsys):
    files = mimic_files()
    files[TRAIN][0]["mentions"] = "%20 "
    files[TRAIN][1]["sentence"] = " \n\t"
    files[DEV][0]["answer"] = "NIL"
    src = write_tree(tmp_path / "src", files)
    out = tmp_path / "ds"
    code, stdout, stderr = run(capsys, "mimic", src, out)
    assert code == 0 and stderr == ""
    assert stdout == (f"ingested {out}: 3 entities, train/dev/test = 0/0/1 mentions, skipped 5 (answer_not_in_kb 1, "
                      "empty_mention 1, empty_sentence 1, nil_answer 2), images missing 1, undecodable 0\n")
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["rows"]["mentions"]["skipped"] == {"empty_mention": 1, "empty_sentence": 1, "nil_answer": 2,
                                                     "answer_not_in_kb": 1}
    assert report["examples"]["empty_mention"] == ["WikiMEL_train.json #0 (id 10)"]
    assert report["examples"]["nil_answer"] == ["WikiMEL_train.json #2 (id 12): answer 'nil'",
                                                "WikiMEL_dev.json #0 (id 20): answer 'NIL'"]


def test_examples_are_capped_at_20(tmp_path):
    from mel_ray.ingest import ingest

    files = mimic_files()
    files[TRAIN] += [{"id": 100 + i, "mentions": "m", "sentence": "s", "imgPath": "", "answer": "nil"}
                     for i in range(30)]
    report = ingest("mimic", str(write_tree(tmp_path / "src", files)), str(tmp_path / "ds"))
    assert report["rows"]["mentions"]["skipped"]["nil_answer"] == 31
    assert len(report["examples"]["nil_answer"]) == 20


def test_missing_and_corrupt_images(tmp_path, capsys):
    files = mimic_files()
    files["kb_image/Q76_0.png"] = png()[:30]                    # truncated PNG
    files["mention_image/m11.jpg"] = b"this is not an image"
    files["mention_image/sub/m12.jpg"] = png()
    files[TRAIN][0]["imgPath"] = "sub"                           # a folder, not a file: missing
    src = write_tree(tmp_path / "src", files)
    out = tmp_path / "ds"
    # without --check-images nothing is decoded: bad bytes are copied as they are
    code, stdout, _ = run(capsys, "mimic", src, out)
    assert code == 0 and stdout.endswith("images missing 3, undecodable 0\n")
    assert rows(out)[1]["image_uris"] == ["images/kb/Q76_0.png"]
    code, stdout, _ = run(capsys, "mimic", src, out, "--check-images")
    assert code == 0 and stdout.endswith("images missing 3, undecodable 2\n")
    assert rows(out)[1]["image_uris"] == []
    assert [m["image_uri"] for m in rows(out, "train")] == [None, None]
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["images"]["kb"] == {"found": 1, "copied": 1, "missing": 1, "undecodable": 1}
    assert report["images"]["mentions"] == {"found": 0, "copied": 0, "missing": 2, "undecodable": 1}
    assert report["examples"]["image_undecodable"] == [f"{src}/kb_image/Q76_0.png (entity Q76: Q76_0.png)",
                                                       f"{src}/mention_image/m11.jpg (sample 11: m11.jpg)"]


# ---------------------------------------------------------------------------------------------------------
# melbench and jsonl


def mb_set(sample: str, key: str, value: Any) -> Callable[[dict], None]:
    return lambda files: files["WikiMEL.json"][sample].__setitem__(key, value)


MELBENCH_FATAL = [
    ("top-level-list", replace("WikiMEL.json", [{"id": "s1"}]),
     "top level must be a JSON object mapping sample id to sample, got list [{\"id\": \"s1\"}]"),
    ("truncated", replace("WikiMEL.json", '{"s1": {"sentence": "x", "ment'),
     "invalid JSON at line 1 column 26: Unterminated string starting at"),
    ("duplicate-sample-key", replace("WikiMEL.json", '{"s1": {}, "s1": {}}'),
     "invalid JSON: duplicate key 's1' in one object"),
    ("unequal-lists", mb_set("s1", "answer", ["Q76"]),
     "record 's1': field 'answer': 'mentions', 'entities' and 'answer' must be parallel lists, got lengths 2, 2, 1"),
    ("answer-wrong-type", mb_set("s4", "answer", 1297),
     "record 's4': field 'answer': expected a string or a list of strings, got integer 1297"),
    ("list-item-wrong-type", mb_set("s1", "mentions", ["Obama", None]),
     "record 's1': field 'mentions': expected a string or a list of strings, got list [\"Obama\", null]"),
    ("missing-sentence", lambda f: f["WikiMEL.json"]["s2"].pop("sentence"),
     "record 's2': field 'sentence': missing required field"),
    ("sample-not-object", replace("WikiMEL.json", {"s9": "oops"}),
     "record 's9': expected a JSON object, got string \"oops\""),
    ("image-escapes", mb_set("s2", "imgPath", "../../etc/shadow"),
     "record 's2': field 'imgPath': image path '../../etc/shadow' escapes the image folder ('..')"),
    ("integer-over-4300-digits", replace("WikiMEL.json", '{"s1": {"answer": ' + "7" * 4301 + "}}"),
     "invalid JSON at line 1 column 19: an integer with more than 4300 digits"),
]


@pytest.mark.parametrize("mutate, line", [c[1:] for c in MELBENCH_FATAL], ids=[c[0] for c in MELBENCH_FATAL])
def test_melbench_fatal(tmp_path, capsys, mutate, line):
    files = melbench_files()
    mutate(files)
    src = write_tree(tmp_path / "src", files)
    code, stdout, stderr = run(capsys, "melbench", src / "WikiMEL.json", tmp_path / "ds",
                               "--image-dir", str(src / "imgs"))
    assert (code, stdout, stderr) == (2, "", f"error: {src}/WikiMEL.json: {line}\n")
    assert not (tmp_path / "ds" / MANIFEST).exists()


def jl_set(file: str, index: int, key: str, value: Any) -> Callable[[dict], None]:
    return lambda files: files[file][index].__setitem__(key, value)


JSONL_FATAL = [
    ("invalid-json-line", lambda f: f.update({"mentions.jsonl": json.dumps(f["mentions.jsonl"][0]) + '\n{"id": 1,\n'}),
     "mentions.jsonl: invalid JSON on line 2 column 10: Expecting property name enclosed in double quotes"),
    ("duplicate-key-in-line", replace("entities.jsonl", '{"qid": "Q1", "name": "x", "qid": "Q2"}\n'),
     "entities.jsonl: invalid JSON on line 1: duplicate key 'qid' in one object"),
    ("line-not-object", replace("entities.jsonl", '{"qid": "Q1", "name": "x"}\n\n[1]\n'),
     "entities.jsonl: record line 3: expected a JSON object, got list [1]"),
    ("non-utf8-line", replace("entities.jsonl", b'{"qid": "Q1", "name": "x"}\n{"qid": "Q2", "name": "\xc3("}\n'),
     "entities.jsonl: not valid UTF-8: byte 0xc3 at line 2"),
    ("bad-split", jl_set("mentions.jsonl", 1, "split", "val"),
     "mentions.jsonl: record line 2: field 'split': split must be one of train, dev, test, got 'val'"),
    ("missing-split", lambda f: f["mentions.jsonl"][0].pop("split"),
     "mentions.jsonl: record line 1: field 'split': missing required field"),
    ("duplicate-mention-id", jl_set("mentions.jsonl", 2, "id", "a"),
     "mentions.jsonl: record line 3: field 'id': duplicate mention id 'a' (also on line 1)"),
    ("duplicate-qid", jl_set("entities.jsonl", 1, "qid", "Q76"),
     "entities.jsonl: record line 2: field 'qid': duplicate qid 'Q76' (also on line 1)"),
    ("attributes-wrong-type", jl_set("entities.jsonl", 0, "attributes", "instance of: human"),
     ("entities.jsonl: record line 1: field 'attributes': expected a list of strings, got string \"instance of: "
     "human\"")),
    ("image-absolute", jl_set("mentions.jsonl", 0, "image", "/tmp/a.png"),
     "mentions.jsonl: record line 1: field 'image': image path '/tmp/a.png' must be relative to the image folder"),
    ("missing-file", lambda f: f.pop("mentions.jsonl"), "mentions.jsonl: file not found"),
    ("integer-over-4300-digits", replace("entities.jsonl", '{"qid": "Q1", "name": "x"}\n{"qid": ' + "5" * 4301 + "}\n"),
     "entities.jsonl: invalid JSON on line 2 column 9: an integer with more than 4300 digits"),
    # a long float is fine for Python: the line points at the integer after it
    ("integer-after-long-float", replace("mentions.jsonl", '{"w": 1' + "1" * 5000 + '.5, "id": -' + "3" * 4400 + "}"),
     "mentions.jsonl: invalid JSON on line 1 column 5018: an integer with more than 4300 digits"),
]


@pytest.mark.parametrize("mutate, line", [c[1:] for c in JSONL_FATAL], ids=[c[0] for c in JSONL_FATAL])
def test_jsonl_fatal(tmp_path, capsys, mutate, line):
    files = jsonl_files()
    mutate(files)
    src = write_tree(tmp_path / "src", files)
    assert run(capsys, "jsonl", src, tmp_path / "ds") == (2, "", f"error: {src}/{line}\n")
    assert not (tmp_path / "ds" / MANIFEST).exists()


def test_jsonl_skips_unknown_qid_and_nil(tmp_path, capsys):
    files = jsonl_files()
    files["mentions.jsonl"][0]["qid"] = "Q404"
    files["mentions.jsonl"][1]["qid"] = "nil"
    files["mentions.jsonl"].append({"id": "d", "mention": "Obama", "sentence": "Obama.", "qid": "Q76",
                                    "split": "test"})   # one kept: a release with none is refused
    src = write_tree(tmp_path / "src", files)
    code, stdout, _ = run(capsys, "jsonl", src, tmp_path / "ds")
    assert code == 0
    assert stdout == (f"ingested {tmp_path / 'ds'}: 2 entities, train/dev/test = 0/0/1 mentions, skipped 3 "
                      "(answer_not_in_kb 1, empty_mention 1, nil_answer 1), images missing 0, undecodable 0\n")


# ---------------------------------------------------------------------------------------------------------
# the real command line, in a subprocess


@pytest.mark.parametrize("fmt, files, mutate, target, line", [
    ("mimic", mimic_files, delete_in(f"{TRAIN}#0", "answer"), "",
     "WikiMEL_train.json: record #0 (id 10): field 'answer': missing required field"),
    ("melbench", melbench_files, mb_set("s1", "entities", ["Barack Obama"]), "WikiMEL.json",
     ("WikiMEL.json: record 's1': field 'answer': 'mentions', 'entities' and 'answer' must be parallel lists, got "
     "lengths 2, 1, 2")),
])
def test_subprocess_exit_code_and_one_line(tmp_path, fmt, files, mutate, target, line):
    tree = files()
    mutate(tree)
    src = write_tree(tmp_path / "src", tree)
    proc = subprocess.run([sys.executable, "-m", "mel_ray.cli", "ingest", "--format", fmt, "--input",
                           str(src / target) if target else str(src), "--output", str(tmp_path / "ds")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"error: {src}/{line}\n"


# ---------------------------------------------------------------------------------------------------------
# a release is read only from inside the folder the user named, links resolved (every format)

REFUSED = "not read: a release is read only from inside its folder"


def passwd_dir(tmp_path: Path) -> Path:
    """A folder outside the release holding a file a release must never make us copy."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return folder


@pytest.mark.parametrize("folder, target", [
    ("mention_image", "etc"),         # the attack: an image folder that is a link to /etc, imgPath "passwd"
    ("kb_image", "etc"),
    ("mention_images", "../etc"),     # the second spelling, as a relative link
    ("mention_image", "/"),           # a link to / is refused before anything is walked
])
def test_mimic_image_folder_linked_out_of_the_release_is_refused(tmp_path, capsys, folder, target):
    etc = passwd_dir(tmp_path)
    files = {k: v for k, v in mimic_files().items() if not k.startswith(f"{folder}/")}
    files[TRAIN][0]["imgPath"] = "passwd" if target != "/" else str(etc / "passwd").lstrip("/")
    kb(files)[0]["image_list"] = ["passwd"]
    src = write_tree(tmp_path / "src", files)
    (src / folder).symlink_to(etc if target == "etc" else target, target_is_directory=True)
    out = tmp_path / "ds"
    real = etc if target != "/" else Path("/")
    assert run(capsys, "mimic", src, out) == (
        2, "", f"error: {src}/{folder}: a link to a folder outside the release folder ({str(real)!r}): {REFUSED}\n")
    assert not (out / MANIFEST).exists()
    assert not [p for p in out.rglob("*") if p.name == "passwd"]


@pytest.mark.parametrize("fmt, name", [
    ("mimic", "kb_entity.json"),
    ("mimic", "WikiMEL_test.json"),
    ("mimic", "qid2id.json"),
    ("jsonl", "entities.jsonl"),
    ("jsonl", "mentions.jsonl"),
])
def test_annotation_file_linked_out_of_the_release_is_refused(tmp_path, capsys, fmt, name):
    files = mimic_files() if fmt == "mimic" else jsonl_files()
    src = write_tree(tmp_path / "src", files)
    # the outside file is a valid copy: it is refused for where it is, not for what it holds
    elsewhere = write_tree(tmp_path / "elsewhere", {name: files[name]}) / name
    (src / name).unlink()
    (src / name).symlink_to(elsewhere)
    assert run(capsys, fmt, src, tmp_path / "ds") == (
        2, "", f"error: {src}/{name}: a link to a file outside the release folder ({str(elsewhere)!r}): {REFUSED}\n")
    assert not (tmp_path / "ds" / MANIFEST).exists()


def test_links_inside_the_release_are_fine(tmp_path, capsys):
    files = mimic_files()
    src = write_tree(tmp_path / "src", {("data/" + k if k == "kb_entity.json" else k): v for k, v in files.items()})
    (src / "kb_entity.json").symlink_to(src / "data" / "kb_entity.json")
    (src / "mention_images").symlink_to("mention_image", target_is_directory=True)
    (src / "mention_image").rename(src / "real_mentions")
    (src / "mention_image").symlink_to(src / "real_mentions", target_is_directory=True)
    # the user may name the release by a link: containment is against where it really is
    (tmp_path / "release").symlink_to(src, target_is_directory=True)
    out = tmp_path / "ds"
    code, stdout, err = run(capsys, "mimic", tmp_path / "release", out)
    assert (code, err) == (0, "")
    assert stdout.endswith("images missing 2, undecodable 0\n")
    assert (out / "images" / "mentions" / "m10.jpg").read_bytes() == mimic_files()["mention_image/m10.jpg"]


@pytest.mark.parametrize("fmt", ["jsonl", "melbench"])
def test_image_under_a_folder_linked_out_is_counted_missing(tmp_path, capsys, fmt):
    etc = passwd_dir(tmp_path)
    files = jsonl_files() if fmt == "jsonl" else melbench_files()
    if fmt == "jsonl":
        files["mentions.jsonl"][0]["image"] = "img/etc/passwd"
        src = write_tree(tmp_path / "src", files)
        (src / "img" / "etc").symlink_to(etc, target_is_directory=True)
        extra: tuple[str, ...] = ()
        fsrc = src
    else:
        files["WikiMEL.json"]["s2"]["imgPath"] = "etc/passwd"
        src = write_tree(tmp_path / "src", files)
        (src / "imgs" / "etc").symlink_to(etc, target_is_directory=True)
        extra, fsrc = ("--image-dir", str(src / "imgs")), src / "WikiMEL.json"
    out = tmp_path / "ds"
    code, stdout, err = run(capsys, fmt, fsrc, out, *extra)
    assert (code, err) == (0, "")
    assert "(1 outside the release)" in stdout
    assert not [p for p in out.rglob("*") if p.name == "passwd"]
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["images"]["mentions"]["outside_release"] == 1


@pytest.mark.parametrize("fmt", ["mimic", "jsonl"])
def test_link_loops_in_a_release_are_never_walked(tmp_path, fmt):
    """Two links to their own folder make 2^40 paths for a walker that follows links; ingest looks images up
    one by one instead, so it finishes at once (before: it never did)."""
    files = mimic_files() if fmt == "mimic" else jsonl_files()
    src = write_tree(tmp_path / "src", files)
    folder = src / ("mention_image" if fmt == "mimic" else "img")
    for name in ("a", "b"):
        (folder / name).symlink_to(".", target_is_directory=True)
    (folder / "root").symlink_to("/", target_is_directory=True)
    proc = subprocess.run([sys.executable, "-m", "mel_ray.cli", "ingest", "--format", fmt, "--input", str(src),
                           "--output", str(tmp_path / "ds")], capture_output=True, text=True, timeout=60,
                          check=False)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert (tmp_path / "ds" / MANIFEST).exists()


# ---------------------------------------------------------------------------------------------------------
# an empty release: nothing to link


@pytest.mark.parametrize("fmt, mutate, file, message", [
    ("mimic", lambda f: f.update({"kb_entity.json": [], "qid2id.json": {}}), "/kb_entity.json",
     "no entities: nothing to link"),
    ("mimic", lambda f: [m.__setitem__("answer", "nil") for n in (TRAIN, DEV, "WikiMEL_test.json") for m in f[n]],
     "", "no mentions to keep (6 read, all skipped: nil_answer 6): nothing to link"),
    ("mimic", lambda f: f.update({TRAIN: [], DEV: [], "WikiMEL_test.json": []}),
     "", "no mentions to keep (none read): nothing to link"),
    ("jsonl", replace("entities.jsonl", ""), "/entities.jsonl", "no entities: nothing to link"),
    ("jsonl", replace("mentions.jsonl", "\n"), "/mentions.jsonl", "no mentions to keep (none read): nothing to link"),
    ("melbench", replace("WikiMEL.json", {}), "/WikiMEL.json", "no entities: nothing to link"),
])
def test_empty_release_is_refused(tmp_path, capsys, fmt, mutate, file, message):
    files = {"mimic": mimic_files, "jsonl": jsonl_files, "melbench": melbench_files}[fmt]()
    mutate(files)
    src = write_tree(tmp_path / "src", files)
    out = tmp_path / "ds"
    assert run(capsys, fmt, src / "WikiMEL.json" if fmt == "melbench" else src, out) == (
        2, "", f"error: {src}{file}: {message}\n")
    assert not (out / MANIFEST).exists()
