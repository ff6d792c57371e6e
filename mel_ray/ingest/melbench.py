"""`melbench` format: the original Wikidata-MEL and Richpedia-MEL releases.

ONE JSON file mapping sample id -> {"sentence", "mentions", "entities", "answer", optional image key}.
Wikidata-MEL holds parallel lists (several mentions per sample), Richpedia-MEL single strings. There is no
KB file and there are no splits, so both are derived here, deterministically.
"""

from __future__ import annotations

import re
from typing import Any

from mel_ray import storage
from mel_ray.config import IngestConfig
from mel_ray.errors import DataError
from mel_ray.ingest.common import (
    EMPTY_MENTION,
    EMPTY_SENTENCE,
    NIL_ANSWER,
    Image,
    Parsed,
    clean,
    describe,
    expect_object,
    get_str,
    hash_split,
    is_nil,
    load_json,
    safe_name,
    skip,
    valid_unicode,
)

IMAGE_KEYS = ("imgPath", "img_path", "image")   # first present wins; absent: `<sample id>.jpg` if it exists
PARALLEL = ("mentions", "entities", "answer")
_PLAIN_ID = re.compile(r"^[\w.-]+$")


def parse(source: str, options: IngestConfig, report: dict[str, Any]) -> Parsed:
    if storage.is_dir(source):
        raise DataError(source, "is a folder: the melbench input is the release's JSON file")
    if options.image_dir is not None and not storage.is_dir(options.image_dir):
        raise DataError(options.image_dir, "image folder (--image-dir) not found or not a folder")
    data = load_json(source)
    if not isinstance(data, dict):
        raise DataError(source, f"top level must be a JSON object mapping sample id to sample, got {describe(data)}")
    samples = [read_sample(source, sid, raw, options.image_dir) for sid, raw in data.items()]

    # KB = every non-nil answer QID, in order of first appearance in the file (the file order is the only
    # order the release defines; it keeps ids stable across re-ingests). First non-empty name wins.
    names: dict[str, str] = {}
    for sample in samples:
        for _mention, name, qid in sample["items"]:
            if not is_nil(qid) and not names.get(clean(qid)):
                names[clean(qid)] = name
    qid_to_id = {qid: i for i, qid in enumerate(names)}
    parsed = Parsed(entities=[{"qid": q, "name": n or q, "description": "", "attributes": [], "images": []}
                              for q, n in names.items()], entities_file=source, mentions_file=source)

    for sample in samples:
        # split by the SAMPLE id, so a sentence's mentions never straddle train and test
        split = hash_split(sample["id"], tuple(options.split_ratios))
        for index, (mention, _name, answer) in enumerate(sample["items"]):
            mid = f"{sample['id']}:{index}"
            report["rows"]["mentions"]["read"] += 1
            if is_nil(answer):
                skip(report, "mentions", NIL_ANSWER, f"sample {sample['id']!r} mention {index}: answer {answer!r}")
            elif not mention:
                skip(report, "mentions", EMPTY_MENTION, f"sample {sample['id']!r} mention {index}")
            elif not sample["sentence"]:
                skip(report, "mentions", EMPTY_SENTENCE, f"sample {sample['id']!r} mention {index}")
            else:
                qid = clean(answer)
                parsed.mentions[split].append({"mention_id": mid, "mention": mention, "sentence": sample["sentence"],
                                               "image": sample["image"], "entity_id": qid_to_id[qid], "qid": qid})
    return parsed


def as_list(obj: dict[str, Any], key: str, uri: str, sid: str) -> list[str]:
    """Richpedia-MEL stores one string, Wikidata-MEL a list: both become a list."""
    if key not in obj:
        raise DataError(uri, "missing required field", sid, key)
    value = obj[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(uri, f"expected a string or a list of strings, got {describe(value)}", sid, key)
    return [valid_unicode(v, uri, sid, key) for v in value]


def read_sample(uri: str, sid: str, raw: Any, image_dir: str | None) -> dict[str, Any]:
    record = repr(valid_unicode(sid, uri, None, "sample id"))
    obj = expect_object(raw, uri, record)
    sentence = clean(get_str(obj, "sentence", uri, record) or "")
    mentions, names, answers = (as_list(obj, key, uri, record) for key in PARALLEL)
    if not len(mentions) == len(names) == len(answers):
        raise DataError(uri, f"'mentions', 'entities' and 'answer' must be parallel lists, got lengths "
                             f"{len(mentions)}, {len(names)}, {len(answers)}", record, "answer")
    return {
        "id": sid,
        "sentence": sentence,
        "items": [(clean(m), clean(n), a) for m, n, a in zip(mentions, names, answers)],
        "image": sample_image(obj, uri, sid, record, image_dir),
    }


def sample_image(obj: dict[str, Any], uri: str, sid: str, record: str, image_dir: str | None) -> Image | None:
    key = next((k for k in IMAGE_KEYS if k in obj), None)
    name = (get_str(obj, key, uri, record, optional=True) or "").strip() if key else ""
    name = safe_name(name, uri, record, key) if name else ""   # checked even without image_dir: bad data is bad
    if image_dir is None:
        return None   # images are optional in this format; without --image-dir there is nowhere to look
    if name:
        return Image([(image_dir, name)], f"sample {sid!r}: {name}")
    if key is None and _PLAIN_ID.match(sid) and sid not in (".", "..") and len(sid.encode()) <= 200:
        guess = f"{sid}.jpg"
        return Image([(image_dir, guess)], f"sample {sid!r}", optional=True)
    return None
