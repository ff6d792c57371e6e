"""Pieces shared by the three ingest formats: strict reading, field checks, text and attribute
normalisation, hash splits and the report.

Parsers never write anything: they return plain rows whose images are still *candidates* (image folder,
relative name). `mel_ray.ingest.ingest` places them afterwards, so a data error found late in a
file cannot leave half-written output behind, and image policy lives in one place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mel_ray import storage
from mel_ray.dataset import SPLITS
from mel_ray.errors import DataError, UsageError

MAX_EXAMPLES = 20
MAX_NAME_BYTES = 255          # one path component; longer names fail in the OS with an unhelpful error

# skip reasons (the keys of report["rows"][...]["skipped"] and report["examples"])
NIL_ANSWER = "nil_answer"
NOT_IN_KB = "answer_not_in_kb"
EMPTY_MENTION = "empty_mention"
EMPTY_SENTENCE = "empty_sentence"
IMAGE_MISSING = "image_missing"
IMAGE_UNDECODABLE = "image_undecodable"
IMAGE_OUTSIDE = "image_outside_release"   # a symlink whose target is outside the release: counted as missing

NIL_VALUES = {"", "nil"}      # compared case-insensitively: the releases use "nil", users write "NIL"


# ---------------------------------------------------------------------------------------------------------
# parsed rows


@dataclass
class Image:
    """Where an image may be found (first existing candidate wins) and the name it gets under images/KIND/."""
    candidates: list[tuple[str, str]]   # (image folder URI, relative name: also its name under images/KIND/)
    context: str                         # who referenced it, for report examples
    optional: bool = False               # a guessed name (melbench `<id>.jpg`): absence is not "missing"


@dataclass
class Parsed:
    entities: list[dict[str, Any]] = field(default_factory=list)          # "images": list[Image]
    mentions: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    entities_file: str = ""     # where the entities / mentions came from, for "nothing to link" errors
    mentions_file: str = ""


# ---------------------------------------------------------------------------------------------------------
# report


def new_report(fmt: str, source: str, output: str) -> dict[str, Any]:
    def rows() -> dict[str, Any]:
        return {"read": 0, "kept": 0, "skipped": {}}

    def images() -> dict[str, int]:
        return {"found": 0, "copied": 0, "missing": 0, "undecodable": 0}

    return {
        "format": fmt,
        "input": source,
        "output": output,
        "rows": {"entities": rows(), "mentions": {**rows(), "splits": {s: 0 for s in SPLITS}}},
        "examples": {},
        "images": {"kb": images(), "mentions": images()},
    }


def add_example(report: dict[str, Any], reason: str, text: str) -> None:
    examples = report["examples"].setdefault(reason, [])
    if len(examples) < MAX_EXAMPLES:
        examples.append(text if len(text) <= 200 else text[:197] + "...")


def skip(report: dict[str, Any], table: str, reason: str, example: str) -> None:
    skipped = report["rows"][table]["skipped"]
    skipped[reason] = skipped.get(reason, 0) + 1
    add_example(report, reason, example)


# ---------------------------------------------------------------------------------------------------------
# reading files


def read_text(uri: str, release: str | None = None) -> str:
    """Whole file as text; a missing file or non-UTF-8 bytes are data errors naming the line. With `release`
    (the folder the user named), a file that is really (links resolved) outside it is refused unread."""
    if release is not None:
        require_inside(uri, release, "file")
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise DataError(uri, "file not found") from None
    except storage.StorageError:
        if storage.is_dir(uri):
            raise DataError(uri, "is a folder, expected a file") from None
        raise
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(uri, f"not valid UTF-8: byte 0x{data[err.start]:02x} at line {line}") from None
    return text.removeprefix("\ufeff")   # tolerate a BOM written by Windows editors


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; for a map of sample ids that loses data.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def parse_json(text: str, uri: str, line: int | None = None) -> Any:
    """Parse JSON text; `line` is the JSON Lines line number the text came from, if any."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        where = f"on line {line} column {err.colno}" if line else f"at line {err.lineno} column {err.colno}"
        raise DataError(uri, f"invalid JSON {where}: {err.msg}") from None
    except ValueError:
        # the only other ValueError json.loads raises: an integer longer than Python converts (a DoS guard)
        raise DataError(uri, f"invalid JSON{_long_int_where(text, line)}: an integer with more than "
                             f"{sys.get_int_max_str_digits()} digits") from None
    except _DuplicateKey as err:
        where = f" on line {line}" if line else ""
        raise DataError(uri, f"invalid JSON{where}: duplicate key {str(err)!r} in one object") from None
    except RecursionError:
        where = f" on line {line}" if line else ""
        raise DataError(uri, f"invalid JSON{where}: nested too deeply") from None


def _long_int_where(text: str, line: int | None) -> str:
    """` on line N column C` / ` at line L column C` of the first integer over the digit limit ("" if unseen)."""
    limit = sys.get_int_max_str_digits()
    # possessive and anchored on a non-digit: linear even on a megabyte of digits
    match = re.search(rf"(?<!\d)-?\d{{{limit + 1},}}+(?![.eE])", text) if limit else None
    if match is None:
        return f" on line {line}" if line else ""
    column = match.start() - text.rfind("\n", 0, match.start())
    if line:
        return f" on line {line} column {column}"
    return f" at line {text.count(chr(10), 0, match.start()) + 1} column {column}"


def load_json(uri: str, release: str | None = None) -> Any:
    return parse_json(read_text(uri, release), uri)


def iter_jsonl(uri: str, release: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) per non-blank line. Split on "\\n" only: JSON strings may hold U+2028."""
    for number, line in enumerate(read_text(uri, release).split("\n"), start=1):
        if line.strip():
            yield number, parse_json(line, uri, line=number)


# ---------------------------------------------------------------------------------------------------------
# field checks


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    kind = {int: "integer", float: "number", str: "string", list: "list", dict: "object"}.get(type(value), "value")
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


def expect_object(value: Any, uri: str, record: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(uri, f"expected a JSON object, got {describe(value)}", record=record)
    return value


def valid_unicode(text: str, uri: str, record: Any, key: str) -> str:
    # JSON escapes can produce lone surrogates, which Parquet (UTF-8) cannot store.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(uri, "string holds an invalid Unicode escape (lone surrogate)", record, key) from None
    return text


def label(index: int, obj: Any, key: str = "id") -> str:
    """How a list item is named in errors: its position, plus its id when it has a printable one."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(value, (int, str)) and not isinstance(value, bool) and len(str(value)) <= 40:
        return f"#{index} ({key} {value!r})" if isinstance(value, str) else f"#{index} ({key} {value})"
    return f"#{index}"


def get_str(obj: dict[str, Any], key: str, uri: str, record: Any, *, optional: bool = False) -> str | None:
    """A string field. Missing or null is allowed only when optional (then None is returned)."""
    if key not in obj:
        if optional:
            return None
        raise DataError(uri, "missing required field", record, key)
    value = obj[key]
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise DataError(uri, f"expected a string, got {describe(value)}", record, key)
    return valid_unicode(value, uri, record, key)


def get_id(obj: dict[str, Any], key: str, uri: str, record: Any) -> str:
    """A record id: a string, or an integer (JSON releases use both); returned as a string."""
    if key not in obj:
        raise DataError(uri, "missing required field", record, key)
    value = obj[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return valid_unicode(value.strip(), uri, record, key)
    raise DataError(uri, f"expected a non-empty string or an integer, got {describe(value)}", record, key)


def get_str_list(obj: dict[str, Any], key: str, uri: str, record: Any, *, optional: bool = False) -> list[str]:
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return []
        raise DataError(uri, "missing required field", record, key)
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(uri, f"expected a list of strings, got {describe(value)}", record, key)
    return [valid_unicode(v, uri, record, key) for v in value]


def get_qid(obj: dict[str, Any], key: str, uri: str, record: Any) -> str:
    qid = clean(get_str(obj, key, uri, record) or "")
    if not qid:
        raise DataError(uri, "expected a non-empty QID", record, key)
    return qid


def is_nil(answer: str) -> bool:
    return answer.strip().lower() in NIL_VALUES


# ---------------------------------------------------------------------------------------------------------
# text


def clean(text: str) -> str:
    """Collapse every run of whitespace (tabs, newlines, NBSP) to one space: the releases mix them freely."""
    return " ".join(text.split())


def attribute_item(item: str, kv: str) -> str | None:
    """Normalise one statement to "property: value" (property lower-cased); None if it says nothing."""
    prop, found, value = item.partition(kv)
    if not found:
        return clean(item) or None
    prop, value = clean(prop).lower(), clean(value)
    if not value:
        return None           # "occupation:" with no value carries no information
    return f"{prop}: {value}" if prop else value


@functools.lru_cache(maxsize=16)
def _splitter(sep: str, kv: str) -> re.Pattern[str]:
    # A separator ends a statement only when whitespace and a "property name:" follow it. The property name
    # is at most 80 characters, holds neither separator and has a letter, so "St. Louis", "1.85", "U.S. Army",
    # "12:30" and URLs stay inside their value.
    s, k = re.escape(sep), re.escape(kv)
    if len(sep) == 1 and len(kv) == 1:   # a character class is several times faster than the tempered dot
        name_char = f"[^{s}{k}\\n]"
    else:
        name_char = rf"(?:(?!{s}|{k})[^\n])"
    gap = r"\s*" if sep[-1].isspace() else r"\s+"
    return re.compile(rf"{s}{gap}(?={name_char}{{1,80}}?{k})(?={name_char}*?[^\W\d_])")


def split_attributes(text: str, sep: str, kv: str) -> list[str]:
    """Split a MIMIC `attr` string into normalised, de-duplicated "property: value" items (order kept)."""
    if not sep or not kv:
        raise UsageError("data.ingest.attr_separator and attr_kv_separator must be non-empty")
    text = text.strip()
    text = text.removesuffix(sep)   # the last statement's terminator
    items = (attribute_item(part, kv) for part in _splitter(sep, kv).split(text))
    return dedupe(i for i in items if i)


def dedupe(items: Any) -> list[str]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------------------
# names and splits


_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_name(name: str, uri: str, record: Any, key: str) -> str:
    """A relative file name that stays inside its image folder, as a clean posix path.

    Absolute paths, `..` components, URLs and NUL bytes are rejected: a release must not make us read (or,
    worse, write) outside the folders we were pointed at.
    """
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or "://" in name:
        raise DataError(uri, f"image path {name!r} must be relative to the image folder", record, key)
    if ".." in parts:
        raise DataError(uri, f"image path {name!r} escapes the image folder ('..')", record, key)
    if "\x00" in name:
        raise DataError(uri, "image path holds a NUL byte", record, key)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise DataError(uri, f"image path {name!r} is not a file name", record, key)
    if any(len(p.encode("utf-8")) > MAX_NAME_BYTES for p in parts):
        raise DataError(uri, f"image path has a component longer than {MAX_NAME_BYTES} bytes", record, key)
    return posixpath.join(*parts)


def hash_split(key: str, ratios: tuple[float, float, float]) -> str:
    """train/dev/test from a stable hash: the same key lands in the same split on every run and machine."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < ratios[0]:
        return "train"
    if u < ratios[0] + ratios[1]:
        return "dev"
    return "test"


def source_uri(root: str, rel: str) -> str:
    return storage.join(root, *rel.split("/"))


# ---------------------------------------------------------------------------------------------------------
# containment: a release is read only from inside the folder the user named. Its own files may be links (a
# release laid out with links is common), but what a link points at must lie inside that folder too, or a
# release could make us read /etc/passwd into a dataset. Object stores have no links, so S3 is always inside.


def real_path(uri: str) -> str | None:
    """The local path of `uri` with every link resolved; None for s3://."""
    if storage.is_s3(uri):
        return None
    return os.path.realpath(storage.resolve(uri)[1])


def is_inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def outside(uri: str, release: str) -> str | None:
    """Where the local `uri` really is when that is outside the folder `release`; None when inside (or S3)."""
    real, root = real_path(uri), real_path(release)
    if real is None or root is None or is_inside(real, root):
        return None
    return real


def require_inside(uri: str, release: str, what: str) -> None:
    """DataError naming `uri` (a "file" or "folder" of the release) when it is a link out of `release`."""
    target = outside(uri, release)
    if target is not None:
        raise DataError(uri, f"a link to a {what} outside the release folder ({target!r}): not read: a release is "
                             "read only from inside its folder")
