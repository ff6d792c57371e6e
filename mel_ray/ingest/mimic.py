"""`mimic` format: the cleaned WikiMEL / RichpediaMEL / WikiDiverse releases used by MIMIC.

A folder holding kb_entity.json, an optional qid2id.json, exactly one `*_train.json`, `*_dev.json` and
`*_test.json`, and image folders kb_image/ and mention_image/ (or mention_images/). Entity ids are kept
equal to kb_entity.json's `id`, because MIMIC's code and published checkpoints index entities by it.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from mel_ray import storage
from mel_ray.config import IngestConfig
from mel_ray.errors import DataError
from mel_ray.ingest.common import (
    EMPTY_MENTION,
    EMPTY_SENTENCE,
    NIL_ANSWER,
    NOT_IN_KB,
    Image,
    Parsed,
    attribute_item,
    clean,
    dedupe,
    describe,
    expect_object,
    get_id,
    get_qid,
    get_str,
    get_str_list,
    is_nil,
    label,
    load_json,
    require_inside,
    safe_name,
    skip,
    split_attributes,
)

KB_FILE = "kb_entity.json"
QID2ID_FILE = "qid2id.json"
KB_IMAGES = "kb_image"
MENTION_IMAGE_DIRS = ("mention_image", "mention_images")   # releases use both spellings
SPLIT_FILE = re.compile(r"^.+_(train|dev|test)\.json$")


def parse(source: str, options: IngestConfig, report: dict[str, Any]) -> Parsed:
    if not storage.is_dir(source):
        raise DataError(source, f"not found or not a folder (the mimic format is a folder with {KB_FILE} "
                                "and *_train.json, *_dev.json, *_test.json)")
    parsed = Parsed(entities=read_kb(source, options), entities_file=storage.join(source, KB_FILE),
                    mentions_file=source)
    check_qid2id(source, parsed.entities)
    qid_to_id = {e["qid"]: i for i, e in enumerate(parsed.entities)}
    # look in whichever image folders exist; with none, still name the default so "missing" counts per image
    image_roots = [storage.join(source, d) for d in MENTION_IMAGE_DIRS if storage.is_dir(storage.join(source, d))]
    for folder in [*image_roots, storage.join(source, KB_IMAGES)]:
        if storage.is_dir(folder):
            require_inside(folder, source, "folder")
    image_roots = image_roots or [storage.join(source, MENTION_IMAGE_DIRS[0])]
    seen: dict[str, str] = {}
    for split, fname in split_files(source).items():
        parsed.mentions[split] = read_split(source, fname, qid_to_id, image_roots, seen, report)
    return parsed


def entity_name(raw: str) -> str:
    # names are URL-quoted page titles: "Jill%20Biden", "Barack_Obama"
    return clean(unquote(raw).replace("_", " "))


def read_kb(source: str, options: IngestConfig) -> list[dict[str, Any]]:
    uri = storage.join(source, KB_FILE)
    data = load_json(uri, source)
    if not isinstance(data, list):
        raise DataError(uri, f"top level must be a JSON list of entity objects, got {describe(data)}")
    kb_root = storage.join(source, KB_IMAGES)
    by_id: dict[int, dict[str, Any]] = {}
    where_qid: dict[str, str] = {}
    where_id: dict[int, str] = {}
    for index, raw in enumerate(data):
        record = label(index, raw)
        obj = expect_object(raw, uri, record)
        eid = obj.get("id")
        if "id" not in obj:
            raise DataError(uri, "missing required field", record, "id")
        if not isinstance(eid, int) or isinstance(eid, bool):
            raise DataError(uri, f"expected an integer, got {describe(eid)}", record, "id")
        if eid in where_id:
            raise DataError(uri, f"duplicate entity id {eid} (also {where_id[eid]})", record, "id")
        if not 0 <= eid < len(data):
            raise DataError(uri, f"id {eid} is outside 0..{len(data) - 1}: ids must be dense, they are the "
                                 "model's entity ids", record, "id")
        where_id[eid] = record
        qid = get_qid(obj, "qid", uri, record)
        if qid in where_qid:
            raise DataError(uri, f"duplicate qid {qid!r} (also {where_qid[qid]})", record, "qid")
        where_qid[qid] = record
        name = entity_name(get_str(obj, "entity_name", uri, record) or "")
        if not name:
            raise DataError(uri, "entity name is empty", record, "entity_name")
        by_id[eid] = {
            "qid": qid,
            "name": name,
            "description": clean(get_str(obj, "desc", uri, record, optional=True) or ""),
            "attributes": attributes(obj, uri, record, options),
            "images": [Image([(kb_root, n)], f"entity {qid}: {n}")
                       for n in dedupe(safe_name(n, uri, record, "image_list")
                                       for n in get_str_list(obj, "image_list", uri, record, optional=True))],
        }
    # unique ids inside 0..N-1 are exactly 0..N-1, so sorting by id makes row number == id
    return [by_id[i] for i in range(len(data))]


def attributes(obj: dict[str, Any], uri: str, record: str, options: IngestConfig) -> list[str]:
    value = obj.get("attr")
    if isinstance(value, list):   # already split (some re-exports): normalise the items only
        items = get_str_list(obj, "attr", uri, record)
        return dedupe(i for i in (attribute_item(x, options.attr_kv_separator) for x in items) if i)
    text = get_str(obj, "attr", uri, record, optional=True) or ""
    return split_attributes(text, options.attr_separator, options.attr_kv_separator)


def check_qid2id(source: str, entities: list[dict[str, Any]]) -> None:
    """qid2id.json is redundant with kb_entity.json; when present it must say the same thing."""
    uri = storage.join(source, QID2ID_FILE)
    if not storage.exists(uri):
        return
    data = load_json(uri, source)
    if not isinstance(data, dict):
        raise DataError(uri, f"top level must be a JSON object mapping qid to id, got {describe(data)}")
    kb = {e["qid"]: i for i, e in enumerate(entities)}
    for qid, eid in data.items():
        if not isinstance(eid, int) or isinstance(eid, bool):
            raise DataError(uri, f"expected an integer id, got {describe(eid)}", record=repr(qid))
        if qid not in kb:
            raise DataError(uri, f"qid is not in {KB_FILE}", record=repr(qid))
        if kb[qid] != eid:
            raise DataError(uri, f"id {eid} disagrees with {KB_FILE} (id {kb[qid]})", record=repr(qid))
    missing = [q for q in kb if q not in data]
    if missing:
        raise DataError(uri, f"{len(missing)} qids of {KB_FILE} are missing here, e.g. {missing[0]!r}")


def split_files(source: str) -> dict[str, str]:
    found: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for name in storage.list_files(source, recursive=False):
        match = SPLIT_FILE.match(name)
        if match:
            found[match.group(1)].append(name)
    for split, names in found.items():
        if not names:
            raise DataError(source, f"no *_{split}.json split file in the folder")
        if len(names) > 1:
            raise DataError(source, f"several *_{split}.json split files: {', '.join(names)}")
    return {split: names[0] for split, names in found.items()}


def read_split(source: str, fname: str, qid_to_id: dict[str, int], image_roots: list[str],
               seen: dict[str, str], report: dict[str, Any]) -> list[dict[str, Any]]:
    uri = storage.join(source, fname)
    data = load_json(uri, source)
    if not isinstance(data, list):
        raise DataError(uri, f"top level must be a JSON list of sample objects, got {describe(data)}")
    rows = []
    for index, raw in enumerate(data):
        record = label(index, raw)
        obj = expect_object(raw, uri, record)
        # every field is checked before deciding to skip: a broken file fails even in its nil samples
        mid = get_id(obj, "id", uri, record)
        if mid in seen:
            raise DataError(uri, f"sample id {mid!r} is not unique across splits (also {seen[mid]})", record, "id")
        seen[mid] = f"{fname} {record}"
        mention = clean(unquote(get_str(obj, "mentions", uri, record) or ""))
        sentence = clean(get_str(obj, "sentence", uri, record) or "")
        img = (get_str(obj, "imgPath", uri, record, optional=True) or "").strip()
        img = safe_name(img, uri, record, "imgPath") if img else None
        answer = get_str(obj, "answer", uri, record) or ""
        report["rows"]["mentions"]["read"] += 1
        where = f"{fname} {record}"
        if is_nil(answer):
            skip(report, "mentions", NIL_ANSWER, f"{where}: answer {answer!r}")
        elif clean(answer) not in qid_to_id:   # normalised like the KB's qids (get_qid)
            skip(report, "mentions", NOT_IN_KB, f"{where}: answer {clean(answer)!r}")
        elif not mention:
            skip(report, "mentions", EMPTY_MENTION, where)
        elif not sentence:
            skip(report, "mentions", EMPTY_SENTENCE, where)
        else:
            qid = clean(answer)
            rows.append({"mention_id": mid, "mention": mention, "sentence": sentence,
                         "image": mention_image(img, image_roots, mid), "entity_id": qid_to_id[qid], "qid": qid})
    return rows


def mention_image(name: str | None, roots: list[str], mid: str) -> Image | None:
    """MIMIC's authors re-encoded mention images as `<stem>.jpg` but kept the old name in imgPath."""
    if name is None:
        return None
    names = [name]
    stem, dot, suffix = name.rpartition(".")
    if dot and suffix.lower() != "jpg" and stem:
        names.append(f"{stem}.jpg")
    return Image([(root, n) for root in roots for n in names], f"sample {mid}: {name}")
