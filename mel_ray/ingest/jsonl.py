"""`jsonl` format: a small documented format for users' own data.

A folder holding entities.jsonl and mentions.jsonl, one JSON object per line (blank lines ignored, unknown
keys ignored so files can carry extra columns). Image paths are relative to the folder. Entity ids are the
line order of entities.jsonl.
"""

from __future__ import annotations

from typing import Any

from mel_ray import storage
from mel_ray.config import IngestConfig
from mel_ray.dataset import SPLITS
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
    expect_object,
    get_id,
    get_qid,
    get_str,
    get_str_list,
    is_nil,
    iter_jsonl,
    safe_name,
    skip,
)

ENTITIES_FILE = "entities.jsonl"
MENTIONS_FILE = "mentions.jsonl"


def parse(source: str, options: IngestConfig, report: dict[str, Any]) -> Parsed:
    if not storage.is_dir(source):
        raise DataError(source, f"not found or not a folder (the jsonl format is a folder with {ENTITIES_FILE} "
                                f"and {MENTIONS_FILE})")
    parsed = Parsed(entities=read_entities(source, options), entities_file=storage.join(source, ENTITIES_FILE),
                    mentions_file=storage.join(source, MENTIONS_FILE))
    qid_to_id = {e["qid"]: i for i, e in enumerate(parsed.entities)}
    read_mentions(source, qid_to_id, parsed, report)
    return parsed


def read_entities(source: str, options: IngestConfig) -> list[dict[str, Any]]:
    uri = storage.join(source, ENTITIES_FILE)
    entities: list[dict[str, Any]] = []
    where: dict[str, str] = {}
    for line, raw in iter_jsonl(uri, source):
        record = f"line {line}"
        obj = expect_object(raw, uri, record)
        qid = get_qid(obj, "qid", uri, record)
        if qid in where:
            raise DataError(uri, f"duplicate qid {qid!r} (also on {where[qid]})", record, "qid")
        where[qid] = record
        name = clean(get_str(obj, "name", uri, record) or "")
        if not name:
            raise DataError(uri, "entity name is empty", record, "name")
        items = (attribute_item(a, options.attr_kv_separator)
                 for a in get_str_list(obj, "attributes", uri, record, optional=True))
        images = dedupe(safe_name(n, uri, record, "images")
                        for n in get_str_list(obj, "images", uri, record, optional=True))
        entities.append({
            "qid": qid,
            "name": name,
            "description": clean(get_str(obj, "description", uri, record, optional=True) or ""),
            "attributes": dedupe(i for i in items if i),
            "images": [Image([(source, n)], f"entity {qid}: {n}") for n in images],
        })
    return entities


def read_mentions(source: str, qid_to_id: dict[str, int], parsed: Parsed, report: dict[str, Any]) -> None:
    uri = storage.join(source, MENTIONS_FILE)
    where: dict[str, str] = {}
    for line, raw in iter_jsonl(uri, source):
        record = f"line {line}"
        obj = expect_object(raw, uri, record)
        mid = get_id(obj, "id", uri, record)
        if mid in where:
            raise DataError(uri, f"duplicate mention id {mid!r} (also on {where[mid]})", record, "id")
        where[mid] = record
        mention = clean(get_str(obj, "mention", uri, record) or "")
        sentence = clean(get_str(obj, "sentence", uri, record) or "")
        image = (get_str(obj, "image", uri, record, optional=True) or "").strip()
        image = safe_name(image, uri, record, "image") if image else None
        qid = clean(get_str(obj, "qid", uri, record) or "")   # normalised like the KB's qids (get_qid)
        split = get_str(obj, "split", uri, record)
        if split not in SPLITS:
            raise DataError(uri, f"split must be one of {', '.join(SPLITS)}, got {split!r}", record, "split")
        report["rows"]["mentions"]["read"] += 1
        if is_nil(qid):
            skip(report, "mentions", NIL_ANSWER, f"{record}: qid {qid!r}")
        elif qid not in qid_to_id:
            skip(report, "mentions", NOT_IN_KB, f"{record}: qid {qid!r}")
        elif not mention:
            skip(report, "mentions", EMPTY_MENTION, record)
        elif not sentence:
            skip(report, "mentions", EMPTY_SENTENCE, record)
        else:
            img = Image([(source, image)], f"mention {mid}: {image}") if image else None
            parsed.mentions[split].append({"mention_id": mid, "mention": mention, "sentence": sentence,
                                           "image": img, "entity_id": qid_to_id[qid], "qid": qid})
