"""Merging datasets into one large KB (WikiDM / WikiDR style), locally and on S3."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mel_ray import cli, storage
from mel_ray.dataset import MANIFEST, SPLITS, entities_table, load_dataset, mentions_table, write_dataset
from mel_ray.errors import DataError
from mel_ray.merge import merge


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (seed * 40 % 256, 10, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _make(uri: str, name: str, kb: list[tuple], mentions: dict[str, list[tuple]], seed: int) -> dict:
    """kb: (qid, name, description, [attributes], n_images); mentions: split -> (id, qid, has_image)."""
    entities, images = [], {}
    for i, (qid, ename, desc, attrs, n_img) in enumerate(kb):
        uris = [f"images/kb/{qid}_{k}.png" for k in range(n_img)]
        images.update({u: _png(seed + i + k) for k, u in enumerate(uris)})
        entities.append({"entity_id": i, "qid": qid, "name": ename, "description": desc, "attributes": attrs,
                         "image_uris": uris})
    index = {e["qid"]: e["entity_id"] for e in entities}
    tables = {}
    for split, rows in mentions.items():
        out = []
        for mid, qid, has_image in rows:
            image = f"images/mentions/{mid}.png" if has_image else None
            if image:
                images[image] = _png(seed + 100 + len(images))
            out.append({"mention_id": mid, "mention": f"{mid} text", "sentence": f"about {mid} in {name}",
                        "image_uri": image, "entity_id": index[qid], "qid": qid})
        tables[split] = mentions_table(out)
    for rel, data in images.items():
        storage.write_bytes(storage.join(uri, rel), data)
    write_dataset(uri, name=name, source_format="jsonl", entities=entities_table(entities), mentions=tables,
                  report={})
    return images


def _inputs(root: str) -> tuple[list[str], dict[str, dict]]:
    a, b, c = (storage.join(root, n) for n in ("wikidiverse", "wikimel", "richpedia"))
    images = {
        a: _make(a, "wikidiverse", [
            ("Q1", "Barack Obama", "44th president", ["occupation: politician"], 2),
            ("Q2", "Chicago", "city", [], 1),
            ("Q3", "Paris", "capital of France", ["country: France"], 0),
        ], {"train": [("1", "Q1", True), ("2", "Q3", False)], "dev": [("3", "Q2", True)],
            "test": [("4", "Q1", False)]}, seed=1),
        b: _make(b, "wikimel", [
            ("Q9", "Berlin", "capital of Germany", [], 1),
            ("Q2", "Chicago, Illinois", "city", [], 1),           # name conflicts, images conflict
            ("Q1", "Barack Obama", "44th president", ["occupation: politician"], 2),  # same except images
            ("Q8", "Tokyo", "capital of Japan", [], 0),
        ], {"train": [("1", "Q2", True), ("7", "Q8", False)], "test": [("8", "Q9", True)]}, seed=50),
        c: _make(c, "richpedia", [
            ("Q3", "Paris", "city in France", ["country: France"], 0),  # description conflicts
            ("Q7", "Rome", "capital of Italy", [], 1),
        ], {"dev": [("1", "Q7", True), ("2", "Q3", False)]}, seed=90),
    }
    return [a, b, c], images


def _check_merged(out: str, inputs: list[str], images: dict[str, dict]) -> dict:
    ds = load_dataset(out)
    ents = ds.entities().to_pylist()
    assert [e["qid"] for e in ents] == ["Q1", "Q2", "Q3", "Q9", "Q8", "Q7"]   # first input's order, then new
    assert [e["entity_id"] for e in ents] == list(range(6))                  # dense
    by_qid = {e["qid"]: e for e in ents}
    assert by_qid["Q2"]["name"] == "Chicago" and by_qid["Q3"]["description"] == "capital of France"  # 1st wins
    assert by_qid["Q1"]["image_uris"] == ["images/wikidiverse/kb/Q1_0.png", "images/wikidiverse/kb/Q1_1.png"]
    assert by_qid["Q9"]["image_uris"] == ["images/wikimel/kb/Q9_0.png"]

    # every mention keeps its gold QID, gets a remapped id and a prefixed mention id
    originals = {}
    for uri in inputs:
        src = load_dataset(uri)
        for split in SPLITS:
            for m in src.mentions(split).to_pylist():
                originals[(split, f"{src.name}/{m['mention_id']}")] = (m, src)
    merged = {(s, m["mention_id"]): m for s in SPLITS for m in ds.mentions(s).to_pylist()}
    assert merged.keys() == originals.keys()
    for (split, mid), m in merged.items():
        orig, src = originals[(split, mid)]
        assert m["qid"] == orig["qid"] and ents[m["entity_id"]]["qid"] == orig["qid"]
        assert (m["image_uri"] is None) == (orig["image_uri"] is None)
        if m["image_uri"]:  # the merged dataset's image is the input's image, byte for byte
            assert m["image_uri"].startswith(f"images/{src.name}/")
            assert storage.read_bytes(ds.resolve_uri(m["image_uri"])) == \
                storage.read_bytes(src.resolve_uri(orig["image_uri"]))
    assert [m["mention_id"] for m in ds.mentions("dev").to_pylist()] == ["wikidiverse/3", "richpedia/1",
                                                                        "richpedia/2"]
    for e in ents:
        for u in e["image_uris"]:
            assert storage.exists(ds.resolve_uri(u)), u

    # only images of kept entities and of mentions are copied
    files = [f for f in storage.list_files(out) if f.startswith("images/")]
    assert "images/wikimel/kb/Q2_0.png" not in files and "images/wikimel/kb/Q1_0.png" not in files
    assert len(files) == 3 + 1 + 1 + 2 + 2 + 1  # kb: Q1x2 Q2 / Q9 / Q7 ; mentions: 2 + 2 + 1

    report = ds.report()
    assert [i["name"] for i in report["inputs"]] == ["wikidiverse", "wikimel", "richpedia"]
    assert [(i["new_entities"], i["duplicate_entities"]) for i in report["inputs"]] == [(3, 0), (2, 2), (1, 1)]
    assert report["inputs"][1]["mentions"] == {"train": 2, "dev": 0, "test": 1}
    conflicts = report["conflicts"]
    assert conflicts["name"]["count"] == 1 and conflicts["description"]["count"] == 1
    assert conflicts["attributes"]["count"] == 0
    assert conflicts["image_uris"]["count"] == 0   # same relative names: not a conflict by itself
    example = conflicts["name"]["examples"][0]
    assert example == {"qid": "Q2", "kept_from": "wikidiverse", "kept": "Chicago", "dropped_from": "wikimel",
                       "dropped": "Chicago, Illinois"}
    assert ds.manifest["source_format"] == "merge"
    assert [i["name"] for i in ds.manifest["inputs"]] == ["wikidiverse", "wikimel", "richpedia"]
    assert ds.manifest["counts"] == {"entities": 6, "train": 4, "dev": 3, "test": 2}
    return ds.manifest


def test_merge_local(tmp_path):
    inputs, images = _inputs(str(tmp_path / "in"))
    out = str(tmp_path / "wikidm")
    manifest = merge(inputs, out)
    assert manifest["name"] == "wikidm"
    assert _check_merged(out, inputs, images) == manifest


def test_merge_two_inputs_and_name(tmp_path):
    inputs, _ = _inputs(str(tmp_path / "in"))
    manifest = merge(inputs[:2], str(tmp_path / "out"), name="WikiDM")
    assert manifest["name"] == "WikiDM" and manifest["counts"]["entities"] == 5


def test_merge_on_s3(s3_bucket, tmp_path):
    """Inputs on local disk and on S3, output on S3; images are copied into the bucket."""
    local_inputs, images = _inputs(str(tmp_path / "in"))
    s3_input = f"{s3_bucket}/in/richpedia"
    storage.write_bytes(f"{s3_bucket}/in/.keep", b"")
    for rel in storage.list_files(local_inputs[2]):
        storage.copy_file(storage.join(local_inputs[2], rel), storage.join(s3_input, rel))
    inputs = local_inputs[:2] + [s3_input]
    out = f"{s3_bucket}/merged/wikidr"
    merge(inputs, out)
    _check_merged(out, inputs, images)


def test_merge_reference_images_instead_of_copying(tmp_path):
    inputs, _ = _inputs(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    merge(inputs, out, copy_images=False)
    ds = load_dataset(out)
    assert not [f for f in storage.list_files(out) if f.startswith("images/")]
    uris = [u for e in ds.entities().to_pylist() for u in e["image_uris"]]
    assert uris and all(u.startswith(str(tmp_path / "in")) and storage.exists(u) for u in uris)


def test_missing_images_are_dropped_and_counted(tmp_path):
    inputs, _ = _inputs(str(tmp_path / "in"))
    storage.delete(storage.join(inputs[0], "images/kb/Q1_1.png"))
    storage.delete(storage.join(inputs[1], "images/mentions/1.png"))
    merge(inputs, str(tmp_path / "out"))
    ds = load_dataset(str(tmp_path / "out"))
    assert ds.entities().to_pylist()[0]["image_uris"] == ["images/wikidiverse/kb/Q1_0.png"]
    train = {m["mention_id"]: m for m in ds.mentions("train").to_pylist()}
    assert train["wikimel/1"]["image_uri"] is None
    assert ds.report()["missing_images_count"] == 2


def test_duplicate_names_are_a_data_error(tmp_path):
    inputs, _ = _inputs(str(tmp_path / "in"))
    twin = str(tmp_path / "in2" / "wikimel")
    _make(twin, "wikimel", [("Q5", "X", "", [], 0)], {"train": [("1", "Q5", False)]}, seed=3)
    with pytest.raises(DataError, match="'wikimel'") as info:
        merge([inputs[1], inputs[0], twin], str(tmp_path / "out"))
    assert inputs[1] in str(info.value) and twin in str(info.value)
    assert not storage.exists(str(tmp_path / "out"))


def test_output_equal_to_an_input_is_refused(tmp_path):
    inputs, _ = _inputs(str(tmp_path / "in"))
    with pytest.raises(Exception, match="also an input"):
        merge(inputs, inputs[1])
    assert load_dataset(inputs[1]).name == "wikimel"


def test_cli_merge(tmp_path, capsys):
    inputs, _ = _inputs(str(tmp_path / "in"))
    out = str(tmp_path / "cli-out")
    assert cli.main(["merge", *inputs[:2], "--output", out, "--name", "wikidm"]) == 0
    assert '"entities": 5' in capsys.readouterr().out


def test_cli_missing_manifest_exits_2_with_one_line(tmp_path, capsys):
    inputs, _ = _inputs(str(tmp_path / "in"))
    storage.delete(storage.join(inputs[1], MANIFEST))
    code = cli.main(["merge", *inputs, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert storage.join(inputs[1], MANIFEST) in err and "no manifest.json" in err


def test_cli_duplicate_names_exit_2_with_one_line(tmp_path, capsys):
    inputs, _ = _inputs(str(tmp_path / "in"))
    code = cli.main(["merge", inputs[0], inputs[0] + "/", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "'wikidiverse'" in err and "distinct" in err
