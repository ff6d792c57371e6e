"""The canonical dataset: write/read round trips (local and s3://), manifest last, invariants."""

from __future__ import annotations

import json

import pytest

from mel_ray import storage
from mel_ray.dataset import (
    ENTITIES,
    MANIFEST,
    REPORT,
    SCHEMA_VERSION,
    entities_table,
    load_dataset,
    mentions_table,
    validate_tables,
    write_dataset,
)
from mel_ray.errors import DataError


def _entities(n: int = 3) -> list[dict]:
    return [{"entity_id": i, "qid": f"Q{100 + i}", "name": f"Entity {i}", "description": f"desc {i}",
             "attributes": [f"p: v{i}"], "image_uris": [f"images/kb/{i}.png"] if i % 2 == 0 else []}
            for i in range(n)]


def _mention(mid: str, eid: int, image: str | None = None) -> dict:
    return {"mention_id": mid, "mention": f"m{mid}", "sentence": f"sentence about {mid}",
            "image_uri": image, "entity_id": eid, "qid": f"Q{100 + eid}"}


def _write(uri: str) -> dict:
    return write_dataset(
        uri, name="tiny", source_format="jsonl", entities=entities_table(_entities()),
        mentions={"train": mentions_table([_mention("a", 0, "images/m/a.png"), _mention("b", 2)]),
                  "test": mentions_table([_mention("c", 1)])},
        report={"note": "unit test"}, extra={"extra_key": 7})


def _check_roundtrip(uri: str) -> None:
    manifest = _write(uri)
    assert manifest["counts"] == {"entities": 3, "train": 2, "dev": 0, "test": 1}
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["extra_key"] == 7
    ds = load_dataset(uri)
    assert ds.name == "tiny" and ds.num_entities == 3 and ds.manifest == manifest
    assert ds.entities().to_pylist() == _entities()
    assert ds.mentions("train").column("mention_id").to_pylist() == ["a", "b"]
    assert ds.mentions("dev").num_rows == 0
    assert ds.mentions("test", columns=["qid"]).to_pylist() == [{"qid": "Q101"}]
    assert ds.report() == {"note": "unit test"}
    assert ds.resolve_uri("images/m/a.png") == storage.join(uri, "images/m/a.png")
    assert ds.resolve_uri("s3://elsewhere/x.png") == "s3://elsewhere/x.png"
    assert ds.resolve_uri(None) is None
    with pytest.raises(DataError, match="unknown split"):
        ds.mentions("validation")
    assert storage.list_files(uri) == [ENTITIES, REPORT, MANIFEST, "mentions/dev.parquet",
                                       "mentions/test.parquet", "mentions/train.parquet"]


def test_roundtrip_local(tmp_path):
    _check_roundtrip(str(tmp_path / "ds"))


def test_roundtrip_s3(s3_bucket, s3_client):
    """A dataset written to and read back from s3://."""
    uri = f"{s3_bucket}/datasets/tiny"
    _check_roundtrip(uri)
    bucket = s3_bucket[len("s3://"):]
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"datasets/tiny/{MANIFEST}" in keys and "datasets/tiny/mentions/train.parquet" in keys
    raw = json.loads(s3_client.get_object(Bucket=bucket, Key=f"datasets/tiny/{MANIFEST}")["Body"].read())
    assert raw["name"] == "tiny"


def test_manifest_is_written_last(tmp_path):
    uri = str(tmp_path / "ds")
    _write(uri)
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    assert max(files, key=files.get) == MANIFEST
    # without its manifest a folder is not a dataset (an unfinished write looks exactly like this)
    storage.delete(storage.join(uri, MANIFEST))
    with pytest.raises(DataError, match="no manifest.json") as info:
        load_dataset(uri)
    assert info.value.file == storage.join(uri, MANIFEST)


def test_invalid_rewrite_keeps_old_dataset(tmp_path):
    """A rewrite that fails validation leaves the old dataset intact and loadable."""
    uri = str(tmp_path / "ds")
    _write(uri)
    with pytest.raises(DataError):
        write_dataset(uri, name="tiny", source_format="jsonl", entities=entities_table(_entities()),
                      mentions={"train": mentions_table([_mention("a", 7)])}, report={})
    assert load_dataset(uri).name == "tiny"  # validation happens before anything is touched


def test_unsupported_schema_version(tmp_path):
    uri = str(tmp_path / "ds")
    _write(uri)
    manifest = storage.read_json(storage.join(uri, MANIFEST))
    storage.write_json(storage.join(uri, MANIFEST), {**manifest, "schema_version": 99})
    with pytest.raises(DataError, match="schema_version 99"):
        load_dataset(uri)


def test_load_missing_dataset_on_s3(s3_bucket):
    with pytest.raises(DataError, match="no manifest.json"):
        load_dataset(f"{s3_bucket}/nothing")


@pytest.mark.parametrize("entities, mentions, message", [
    ([{**e, "entity_id": i + 1} for i, e in enumerate(_entities())], {}, "dense"),
    ([_entities()[0], {**_entities()[1], "qid": "Q100"}], {}, "duplicate qid"),
    (_entities(), {"train": [_mention("a", 0)], "test": [_mention("a", 1)]}, "'a' is not unique"),
    (_entities(), {"dev": [_mention("x", 3)]}, "gold entity_id 3 outside 0..2"),
    (_entities(), {"dev": [_mention("x", -1)]}, "gold entity_id -1"),
])
def test_validate_tables_errors(entities, mentions, message):
    with pytest.raises(DataError, match=message) as info:
        validate_tables(entities_table(entities), {s: mentions_table(r) for s, r in mentions.items()}, where="W")
    assert info.value.file == "W"
    assert info.value.line().startswith("W: ")


def test_write_refuses_invalid_tables_and_writes_nothing(tmp_path):
    uri = str(tmp_path / "bad")
    bad = [{**e, "entity_id": 5} for e in _entities(1)]
    with pytest.raises(DataError, match="dense"):
        write_dataset(uri, name="bad", source_format="jsonl", entities=entities_table(bad), mentions={}, report={})
    assert storage.list_files(uri) == []
