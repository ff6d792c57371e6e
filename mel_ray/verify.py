"""`mel-ray verify PATH`: check a whole dataset tree against docs/data-contract.md, one line per problem.

What is checked (every artefact the stages write under a dataset root, local or `s3://`):

* dataset: `manifest.json` and `ingest_report.json` are UTF-8 JSON objects; the manifest's
  `schema_version` and `counts`; `entities.parquet` and `mentions/{train,dev,test}.parquet` open (footer
  parses), have the contract's columns and types, as many rows as the manifest says, and decode; entity ids
  are dense `0..N-1`, qids unique, mention ids unique across splits, gold ids inside the KB and their qids
  equal to the entity's; required strings are not null, mention and sentence not empty.
* images the tables reference: a relative URI must stay inside the dataset root (no `..` escape) and the
  file must exist (one listing of the tree, no request per image); on a local disk, a referenced file that
  is a symlink must not resolve outside the root.
* links (local disk): no file that resolves outside the root is read (tables, manifests, shards: one line,
  "not read"); the listing does not follow folder links out of the root (one line each, "not followed") nor
  links back up their own path, so it always ends.
* `negatives/[names_|jaccard_names_]k{K}.parquet` + `.manifest.json` (the pools of negatives.source jaccard,
  names, jaccard+names): both present, the manifest's `k`, `source` and `n_entities`, its
  `entities_sha256` against today's entities.parquet (a pool mined from an earlier dataset is stale), the
  pool's schema, one row per entity in order, neighbour ids inside the KB, never the entity itself, at most
  K of them, as many scores as ids, every score finite (no NaN / inf).
* `synthetic/<key>/`: `settings.json` and `complete.json` (objects; `complete.json` absent = an unfinished
  run), `manifest.parquet`'s schema, `complete.json`'s image count against its rows, unique
  (mention_id, view), every listed image inside the root and present.
* `features/<key>/`: `manifest.json` (absent = an unfinished run) with `tables`, `shapes`, `dtypes`,
  `storage.shard_rows`; each table's row count against the dataset, its inputs' sha256 against today's
  tables (stale features), every shard present and open, with the manifest's columns, each tensor column a
  `fixed_size_list<dtype>` of prod(shape) values with the manifest's shape in its field metadata, the rows
  a shard of its number must have, and ids equal to the dataset's rows in order.

Three levels, one code path:

* quick (`check_dataset_quick`, `check_features_quick`, `check_negatives_quick`): manifests, Parquet
  footers, schemas and row counts only -- no table data read. Stages call these at start-up.
* default (`verify(uri)`): everything above. The dataset tables and negatives pools are read whole (they are
  small: text and ids); of a feature shard only the footer and the id column are read.
* deep (`verify(uri, deep=True)`, `mel-ray verify --deep`): also the sha256 of every synthetic view against
  its manifest, every column of every feature shard decoded and every float column checked for NaN / inf, and
  absolute image URIs (`--reference-images` datasets) checked to exist. At WikiMEL scale this reads every byte
  of the tree (tens of GB of features).

Messages are `FILE: [row R: ][field 'F': ]what is wrong`; when many rows break one rule, the first one is
named and the rest counted (`(and 41 more rows)`), so one rule gives one line per file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mel_ray import storage
from mel_ray.dataset import (
    ENTITIES,
    ENTITY_SCHEMA,
    MANIFEST,
    MENTION_SCHEMA,
    REPORT,
    SCHEMA_VERSION,
    SPLITS,
    mentions_path,
)
from mel_ray.errors import DataError, one_line

# a pool's source (negatives.source) -> the prefix of its files under negatives/ (the Jaccard pool keeps the
# names it always had, so existing pools stay valid)
POOL_PREFIXES = {"jaccard": "", "names": "names_", "jaccard+names": "jaccard_names_"}
NEGATIVES_RE = re.compile(r"^negatives/(names_|jaccard_names_)?k(\d+)\.(parquet|manifest\.json)$")
FEATURES_MANIFEST = "manifest.json"
SYNTH_MANIFEST = "manifest.parquet"
SYNTH_SETTINGS = "settings.json"
SYNTH_COMPLETE = "complete.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID_DTYPES = {"entity_id": pa.int64(), "mention_id": pa.string()}
_SIMPLE_DTYPES = {"int64": pa.int64(), "int32": pa.int32(), "int8": pa.int8(), "string": pa.string(),
                  "bool": pa.bool_(), "float16": pa.float16(), "float32": pa.float32(),
                  "list<int32>": pa.list_(pa.int32())}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    file: str
    message: str
    row: int | None = None
    field: str | None = None

    def line(self) -> str:
        return one_line(self.file, self.message, where=None if self.row is None else f"row {self.row}",
                        field=self.field)

    __str__ = line

    def error(self) -> DataError:
        """As the DataError a stage raises (the CLI prints it as one line, exit 2)."""
        return DataError(self.file, self.line()[len(self.file) + 2:])


def raise_first(problems: list[Problem], verify_uri: str | None = None) -> None:
    """Raise the first problem as a DataError (stages: `raise_first(check_dataset_quick(uri), uri)`)."""
    if not problems:
        return
    first = problems[0]
    more = len(problems) - 1
    if more:
        hint = f" (and {more} more problem{'s' if more > 1 else ''}"
        hint += f": run `mel-ray verify {verify_uri}`)" if verify_uri else ")"
        raise DataError(first.file, first.line()[len(first.file) + 2:] + hint)
    raise first.error()


# ------------------------------------------------------------------------------------------------ helpers


def _type_str(t: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_type_str(t.value_type)}>[{t.list_size}]"
    if t == pa.float16():
        return "float16"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_str(t.value_type)}>"
    if pa.types.is_large_string(t):
        return "large_string"
    return str(t)


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Equal types, ignoring list item names and nullability."""
    if pa.types.is_list(expected):
        return pa.types.is_list(actual) and _same_type(actual.value_type, expected.value_type)
    if pa.types.is_fixed_size_list(expected):
        return (pa.types.is_fixed_size_list(actual) and actual.list_size == expected.list_size
                and _same_type(actual.value_type, expected.value_type))
    return actual == expected


def _json_type(obj: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(obj), type(obj).__name__)


def _short(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nonfinite_rows(col: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """Per row: does it hold a NaN or inf (any of its values, for a list or tensor column)? None: not a float
    column or a list of floats. Nulls are no values here (check_nulls reports them)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_floating(arr.type):
        values = arr.fill_null(0).to_numpy(zero_copy_only=False)
        return ~np.isfinite(values)
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)) \
            or not pa.types.is_floating(arr.type.value_type):
        return None
    values = pc.list_flatten(arr).fill_null(0).to_numpy(zero_copy_only=False)
    rows = np.zeros(len(arr), dtype=bool)
    rows[pc.list_parent_indices(arr).to_numpy()[~np.isfinite(values)]] = True
    return rows


def uri_problem(uri: Any) -> str | None:
    """What is wrong with an image URI stored in a table (None: fine). Relative URIs are resolved against
    the dataset root and must stay inside it; absolute ones are local paths, file:// or s3://."""
    if not isinstance(uri, str) or not uri:
        return "empty image URI"
    if "\0" in uri:
        return "image URI contains a NUL byte"
    if "://" in uri:
        if uri.startswith(("s3://", "file://")):
            return None
        return f"image URI {uri!r} has an unsupported scheme (use a relative path, a local path or s3://)"
    if uri.startswith("/"):
        return None
    depth = 0
    for part in uri.replace("\\", "/").split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return f"image URI {uri!r} resolves outside the dataset root"
        elif part not in ("", "."):
            depth += 1
    return None


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _local_files(base: str, real_root: str) -> tuple[set[str], list[tuple[str, str]]]:
    """Files under the local folder `base` ("/"-separated, relative; `.tmp-*` left out) and the folder links
    that point outside `real_root`, with their targets. A folder link inside the root is followed unless it
    leads back to a folder already on its own path (a loop); a link out is not followed. So the walk ends,
    and never reads the disk outside the root (a link to / made the walker of pyarrow walk it all)."""
    files: set[str] = set()
    links_out: list[tuple[str, str]] = []
    stack: list[tuple[str, str, frozenset[str]]] = [("", real_root, frozenset())]
    while stack:
        rel, real, on_path = stack.pop()
        on_path = on_path | {real}
        try:
            entries = list(os.scandir(os.path.join(base, *rel.split("/")) if rel else base))
        except FileNotFoundError:
            continue
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:   # a link loop (ELOOP) or an unreadable link: neither a file nor a folder
                continue
            if is_dir:
                target = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                if not _inside(target, real_root):
                    links_out.append((name, target))
                elif target not in on_path:
                    stack.append((name, target, on_path))
            elif is_file and not entry.name.startswith(".tmp-"):
                files.add(name)
    return files, links_out


class _Rule:
    """Counts the rows breaking one rule of one file; reports the first and how many more."""

    def __init__(self, checker: _Checker, rel: str, field: str | None):
        self.checker, self.rel, self.field = checker, rel, field
        self.first: tuple[int | None, str] | None = None
        self.count = 0

    def hit(self, row: int | None, message: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = (row, message)

    def flush(self) -> None:
        if self.first is None:
            return
        row, message = self.first
        if self.count > 1:
            message += f" (and {self.count - 1} more row{'s' if self.count > 2 else ''})"
        self.checker.add(self.rel, message, row=row, field=self.field)


class _Checker:
    def __init__(self, root: str, level: str):
        self.root = str(root).rstrip("/") if storage.is_s3(str(root)) else str(root)
        self.level = level                       # "quick", "default" or "deep"
        self.problems: list[Problem] = []
        self.files: set[str] | None = None       # every file under the root (relative, "/"-separated)
        self.counts: dict[str, int] | None = None
        self.table_sha: dict[str, str] = {}      # "entities" / split -> sha256 of the Parquet bytes (if sound)
        self.pending_sha: dict[str, tuple[str, str]] = {}
        self.rows: dict[str, int] = {}           # "entities" / split -> rows of the table as read
        self.entity_qids: list | None = None
        self.split_ids: dict[str, list] = {}
        self.summary: dict[str, Any] = {}
        self.fs, self.base = storage.resolve(self.root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        # what every file read must really (links resolved) lie inside; object stores have no links
        self.real_root = os.path.realpath(self.base) if self.local else None
        self.root_what = "the dataset root"

    # ------------------------------------------------------------------ plumbing

    def uri(self, rel: str) -> str:
        return storage.join(self.root, *rel.split("/"))

    def expected_rows(self, key: str) -> int | None:
        """Rows of a dataset table: as read (if it was), else as its manifest counts them."""
        if key in self.rows:
            return self.rows[key]
        return self.counts.get(key) if self.counts else None

    def add(self, rel: str, message: str, row: int | None = None, field: str | None = None) -> None:
        self.problems.append(Problem(self.uri(rel), message, row, field))

    def rule(self, rel: str, field: str | None = None) -> _Rule:
        return _Rule(self, rel, field)

    def path(self, rel: str) -> str:
        return posixpath.join(self.base, rel) if not self.local else os.path.join(self.base, *rel.split("/"))

    def listing(self) -> set[str]:
        if self.files is None:
            if self.real_root is None:
                self.files = set(storage.list_files(self.root))
            else:
                self.files, links_out = _local_files(self.base, self.real_root)
                for rel, target in links_out:
                    self.add(rel, f"a link to a folder outside {self.root_what} ({target!r}): not followed")
        return self.files

    def exists(self, rel: str) -> bool:
        if self.files is not None:
            return rel in self.files
        return storage.exists(self.uri(rel))

    def link_out(self, rel: str) -> str | None:
        """Where the local file `rel` really is when a link takes it outside the root; None when inside (or S3)."""
        if self.real_root is None:
            return None
        real = os.path.realpath(self.path(rel))
        return None if _inside(real, self.real_root) else real

    def refuse_link_out(self, rel: str) -> bool:
        """True (and one problem line) when `rel` is a link out of the root: such a file is not read."""
        target = self.link_out(rel)
        if target is not None:
            self.add(rel, f"a link to a file outside {self.root_what} ({target!r}): not read")
        return target is not None

    def read_bytes(self, rel: str, what: str) -> bytes | None:
        if self.refuse_link_out(rel):
            return None
        try:
            data = storage.read_bytes(self.uri(rel))
        except FileNotFoundError:
            self.add(rel, f"missing ({what})")
            return None
        except OSError as err:
            self.add(rel, f"cannot read: {_short(err)}")
            return None
        return data

    def read_json(self, rel: str, what: str, data: bytes | None = None) -> dict | None:
        if data is None:
            data = self.read_bytes(rel, what)
            if data is None:
                return None
        if not data:
            self.add(rel, "empty file (0 bytes), expected a JSON object")
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[:err.start].count(b"\n") + 1
            self.add(rel, f"not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} (line {line})")
            return None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            self.add(rel, f"invalid JSON: line {err.lineno} column {err.colno}: {err.msg}")
            return None
        except RecursionError:
            self.add(rel, "invalid JSON: nested too deeply")
            return None
        except ValueError:   # int() past sys.get_int_max_str_digits()
            self.add(rel, f"invalid JSON: an integer of more than {sys.get_int_max_str_digits()} digits")
            return None
        if not isinstance(obj, dict):
            self.add(rel, f"expected a JSON object, got {_json_type(obj)}")
            return None
        return obj

    def open_parquet(self, rel: str, what: str, data: bytes | None = None) -> pq.ParquetFile | None:
        """The file's footer (data given: from those bytes; else random access, footer only)."""
        if data is None:
            if self.refuse_link_out(rel):
                return None
            try:
                info = self.fs.get_file_info(self.path(rel))
            except OSError as err:
                self.add(rel, f"cannot read: {_short(err)}")
                return None
            if info.type == pafs.FileType.NotFound:
                self.add(rel, f"missing ({what})")
                return None
            if info.type != pafs.FileType.File:
                self.add(rel, f"not a file ({what})")
                return None
            size = info.size
        else:
            size = len(data)
        if size == 0:
            self.add(rel, "empty file (0 bytes), expected Parquet")
            return None
        try:
            source = pa.BufferReader(data) if data is not None else self.fs.open_input_file(self.path(rel))
            return pq.ParquetFile(source)
        except (pa.ArrowException, OSError, ValueError) as err:
            if isinstance(err, FileNotFoundError):
                self.add(rel, f"missing ({what})")
            elif "magic" in str(err).lower() or "footer" in str(err).lower() or "size" in str(err).lower():
                self.add(rel, "not a readable Parquet file: footer does not parse (truncated or not Parquet)")
            else:
                self.add(rel, f"not a readable Parquet file: {_short(err)}")
            return None

    def read_columns(self, rel: str, pf: pq.ParquetFile, columns: list[str]) -> pa.Table | None:
        try:
            return pf.read(columns=columns)
        except (pa.ArrowException, OSError, ValueError) as err:
            # find the column that does not decode, for a precise line
            for col in columns:
                try:
                    pf.read(columns=[col])
                except (pa.ArrowException, OSError, ValueError) as col_err:
                    self.add(rel, f"data does not decode: {_short(col_err)}", field=col)
                    return None
            self.add(rel, f"data does not decode: {_short(err)}")
            return None

    def check_schema(self, rel: str, schema: pa.Schema, expected: pa.Schema) -> list[str]:
        """Problems for missing / mistyped columns; returns the expected columns that are fine."""
        good = []
        for f in expected:
            if f.name not in schema.names:
                self.add(rel, f"column missing (expected {_type_str(f.type)})", field=f.name)
            elif not _same_type(schema.field(f.name).type, f.type):
                self.add(rel, f"type {_type_str(schema.field(f.name).type)} (expected {_type_str(f.type)})",
                         field=f.name)
            else:
                good.append(f.name)
        return good

    def check_finite(self, rel: str, table: pa.Table) -> None:
        """NaN / inf in a float column (features, scores): one line per column with how many rows hold any."""
        for name in table.column_names:
            rows = _nonfinite_rows(table.column(name))
            if rows is not None and rows.any():
                self.add(rel, f"{int(rows.sum())} of {len(rows)} rows hold NaN or inf (first: row "
                         f"{int(np.flatnonzero(rows)[0])})", field=name)

    def check_nulls(self, rel: str, table: pa.Table, expected: pa.Schema) -> None:
        for f in expected:
            if f.nullable or f.name not in table.column_names:
                continue
            col = table.column(f.name)
            if col.null_count:
                rows = [i for i, v in enumerate(col.is_null().to_pylist()) if v]
                r = self.rule(rel, f.name)
                for i in rows:
                    r.hit(i, "null (the column is not nullable)")
                r.flush()

    # ------------------------------------------------------------------ dataset

    def dataset_manifest(self) -> None:
        manifest = self.read_json(MANIFEST, "not a mel-ray dataset, or an ingest that did not finish")
        if manifest is None:
            return
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            self.add(MANIFEST, f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})",
                     field="schema_version")
        for key in ("name", "source_format"):
            if not isinstance(manifest.get(key), str):
                self.add(MANIFEST, "missing" if key not in manifest else f"expected a string, got "
                         f"{_json_type(manifest[key])}", field=key)
        counts = manifest.get("counts")
        if not isinstance(counts, dict):
            self.add(MANIFEST, "missing" if counts is None else f"expected an object, got {_json_type(counts)}",
                     field="counts")
            return
        good = {}
        for key in ("entities", *SPLITS):
            value = counts.get(key)
            if not _is_int(value) or value < 0:
                self.add(MANIFEST, "missing" if key not in counts else f"expected a count >= 0, got {value!r}",
                         field=f"counts.{key}")
            else:
                good[key] = value
        self.counts = good
        self.summary["counts"] = dict(good)
        self.summary["name"] = manifest.get("name")

    def dataset_table(self, rel: str, schema: pa.Schema, count_key: str) -> pa.Table | None:
        """Footer, schema, row count; at levels above quick also the whole table (returned)."""
        data = None
        if self.level != "quick":
            data = self.read_bytes(rel, "part of every dataset")
            if data is None:
                return None
        elif not self.exists(rel):
            self.add(rel, "missing (part of every dataset)")
            return None
        if data is not None:
            self.pending_sha[count_key] = (rel, hashlib.sha256(data).hexdigest())
        pf = self.open_parquet(rel, "part of every dataset", data)
        if pf is None:
            return None
        good = self.check_schema(rel, pf.schema_arrow, schema)
        rows = pf.metadata.num_rows
        self.rows[count_key] = rows
        if self.counts is not None and count_key in self.counts and rows != self.counts[count_key]:
            self.add(rel, f"{rows} rows but manifest.json counts.{count_key} says {self.counts[count_key]}")
        if self.level == "quick" or not good:
            return None
        table = self.read_columns(rel, pf, good)
        if table is not None:
            self.check_nulls(rel, table, schema)
        return table

    def dataset(self) -> None:
        self.dataset_manifest()
        if self.level != "quick":
            self.read_json(REPORT, "written by ingest and merge")
        entities = self.dataset_table(ENTITIES, ENTITY_SCHEMA, "entities")
        n = self.expected_rows("entities")
        qids: list | None = None
        if entities is not None:
            n = entities.num_rows
            if "entity_id" in entities.column_names:
                r = self.rule(ENTITIES, "entity_id")
                for i, eid in enumerate(entities.column("entity_id").to_pylist()):
                    if eid != i:
                        r.hit(i, f"entity_id {eid} (ids must be dense 0..N-1 in row order: expected {i})")
                r.flush()
            if "qid" in entities.column_names:
                qids = entities.column("qid").to_pylist()
                r, seen = self.rule(ENTITIES, "qid"), {}
                for i, q in enumerate(qids):
                    if q is not None and q in seen:
                        r.hit(i, f"duplicate qid {q!r} (first at row {seen[q]})")
                    seen.setdefault(q, i)
                r.flush()
            if "image_uris" in entities.column_names:
                self.image_uris(ENTITIES, "image_uris",
                                ((i, u) for i, us in enumerate(entities.column("image_uris").to_pylist())
                                 for u in (us or [])))
        self.entity_qids = qids
        seen_mentions: dict[str, str] = {}
        for split in SPLITS:
            rel = mentions_path(split)
            table = self.dataset_table(rel, MENTION_SCHEMA, split)
            if table is None:
                continue
            cols = table.column_names
            if "mention_id" in cols:
                mids = table.column("mention_id").to_pylist()
                self.split_ids[split] = mids
                r = self.rule(rel, "mention_id")
                for i, mid in enumerate(mids):
                    if mid is None:
                        continue
                    if mid in seen_mentions:
                        r.hit(i, f"mention_id {mid!r} is not unique (also in {seen_mentions[mid]})")
                    else:
                        seen_mentions[mid] = rel
                r.flush()
            for name in ("mention", "sentence"):
                if name in cols:
                    r = self.rule(rel, name)
                    for i, v in enumerate(table.column(name).to_pylist()):
                        if v is not None and not v.strip():
                            r.hit(i, "empty")
                    r.flush()
            if "entity_id" in cols and n is not None:
                gold = table.column("entity_id").to_pylist()
                r = self.rule(rel, "entity_id")
                for i, eid in enumerate(gold):
                    if eid is not None and not 0 <= eid < n:
                        r.hit(i, f"gold entity_id {eid} outside the KB (0..{n - 1})")
                r.flush()
                if qids is not None and "qid" in cols:
                    r = self.rule(rel, "qid")
                    for i, (eid, q) in enumerate(zip(gold, table.column("qid").to_pylist())):
                        if eid is not None and 0 <= eid < n and q != qids[eid]:
                            r.hit(i, f"qid {q!r} but entity {eid} is {qids[eid]!r}")
                    r.flush()
            if "image_uri" in cols:
                self.image_uris(rel, "image_uri",
                                ((i, u) for i, u in enumerate(table.column("image_uri").to_pylist()) if u is not None))
        # a table's sha256 is compared with what negatives / features were made from only when the table itself
        # is fine: a damaged table is reported once, not again as "stale" derived artefacts
        damaged = {p.file for p in self.problems}
        for key, (rel, sha) in self.pending_sha.items():
            if self.uri(rel) not in damaged:
                self.table_sha[key] = sha

    def image_uris(self, rel: str, field: str, rows: Iterable[tuple[int, Any]]) -> None:
        escape, missing, link = self.rule(rel, field), self.rule(rel, field), self.rule(rel, field)
        files = self.listing()
        for i, uri in rows:
            bad = uri_problem(uri)
            if bad:
                escape.hit(i, bad)
                continue
            if "://" in uri or uri.startswith("/"):
                if self.level == "deep" and not storage.exists(uri):
                    missing.hit(i, f"image {uri!r} does not exist")
                continue
            norm = posixpath.normpath(uri.replace("\\", "/"))
            # before the listing: a file under a folder link out of the root is not listed (links out are
            # not followed), and is a link out, not a missing image
            if self.link_out(norm) is not None:
                link.hit(i, f"image {uri!r} is a link to a file outside the dataset root")
            elif norm not in files:
                missing.hit(i, f"image {uri!r} does not exist")
        for r in (escape, missing, link):
            r.flush()

    # ------------------------------------------------------------------ negatives

    def negatives(self, k: int, has_parquet: bool = True, has_manifest: bool = True, source: str = "jaccard") -> None:
        from mel_ray.negatives import OUTPUT_SCHEMA

        prel, mrel = pool_paths(k, source)
        manifest = None
        if not has_manifest:
            self.add(mrel, "missing: an unfinished mine-negatives run (its Parquet is not usable; rerun it)")
        else:
            manifest = self.read_json(mrel, "written last by mine-negatives")
        n = self.expected_rows("entities")
        if manifest is not None:
            if manifest.get("k") != k or isinstance(manifest.get("k"), bool):
                self.add(mrel, f"k {manifest.get('k')!r} but the file is named k{k}", field="k")
            if manifest.get("source", "jaccard") != source:     # pools written before sources existed: Jaccard
                self.add(mrel, f"source {manifest.get('source')!r} but the file is named for {source!r}",
                         field="source")
            if n is not None and manifest.get("n_entities") != n:
                self.add(mrel, f"n_entities {manifest.get('n_entities')!r} but the dataset has {n} entities",
                         field="n_entities")
            sha = self.table_sha.get("entities")
            if sha and manifest.get("entities_sha256") != sha:
                self.add(mrel, "mined from another entities.parquet (its sha256 differs): stale, rerun "
                         "mine-negatives", field="entities_sha256")
        if not has_parquet:
            if has_manifest:
                self.add(prel, "missing (listed by its manifest)")
            return
        pf = self.open_parquet(prel, "listed by its manifest")
        if pf is None:
            return
        good = self.check_schema(prel, pf.schema_arrow, OUTPUT_SCHEMA)
        rows = pf.metadata.num_rows
        if n is not None and rows != n:
            self.add(prel, f"{rows} rows but the dataset has {n} entities (one row per entity)")
        if self.level == "quick" or not good:
            return
        table = self.read_columns(prel, pf, good)
        if table is None:
            return
        self.check_nulls(prel, table, OUTPUT_SCHEMA)
        self.check_finite(prel, table)
        if "entity_id" in good:
            r = self.rule(prel, "entity_id")
            for i, eid in enumerate(table.column("entity_id").to_pylist()):
                if eid != i:
                    r.hit(i, f"entity_id {eid} (rows must be in entity order: expected {i})")
            r.flush()
        if "neg_entity_ids" in good:
            ids = table.column("neg_entity_ids").to_pylist()
            scores = table.column("neg_scores").to_pylist() if "neg_scores" in good else None
            out, self_, many, lens = (self.rule(prel, "neg_entity_ids"), self.rule(prel, "neg_entity_ids"),
                                      self.rule(prel, "neg_entity_ids"), self.rule(prel, "neg_scores"))
            for i, row in enumerate(ids):
                row = row or []
                bad = [e for e in row if e is None or n is None or not 0 <= e < n]
                if bad and n is not None:
                    out.hit(i, f"negative entity_id {bad[0]} outside the KB (0..{n - 1})")
                if i in row:
                    self_.hit(i, "lists the entity itself")
                if len(row) > k:
                    many.hit(i, f"{len(row)} negatives (at most k={k})")
                if scores is not None and len(scores[i] or []) != len(row):
                    lens.hit(i, f"{len(scores[i] or [])} scores for {len(row)} negatives")
            for r in (out, self_, many, lens):
                r.flush()

    # ------------------------------------------------------------------ synthetic views

    def synthetic(self, key: str) -> None:
        from mel_ray.synthesize import MANIFEST_SCHEMA

        base = f"synthetic/{key}"
        self.read_json(f"{base}/{SYNTH_SETTINGS}", "written by synthesize")
        if not self.exists(f"{base}/{SYNTH_COMPLETE}"):
            self.add(f"{base}/{SYNTH_COMPLETE}", "missing: an unfinished synthesize run (rerun it)")
            return
        complete = self.read_json(f"{base}/{SYNTH_COMPLETE}", "written last by synthesize")
        mrel = f"{base}/{SYNTH_MANIFEST}"
        pf = self.open_parquet(mrel, "written by synthesize before complete.json")
        if pf is None:
            return
        good = self.check_schema(mrel, pf.schema_arrow, MANIFEST_SCHEMA)
        rows = pf.metadata.num_rows
        images = complete.get("images") if complete else None
        if complete is not None and images != rows:
            self.add(f"{base}/{SYNTH_COMPLETE}", f"images {images!r} but manifest.parquet has {rows} rows",
                     field="images")
        self.summary.setdefault("synthetic", {})[key] = rows
        if self.level == "quick" or not good:
            return
        table = self.read_columns(mrel, pf, good)
        if table is None:
            return
        self.check_nulls(mrel, table, MANIFEST_SCHEMA)
        cols = table.column_names
        if "mention_id" in cols and "view" in cols:
            r, seen = self.rule(mrel, "view"), {}
            for i, pair in enumerate(zip(table.column("mention_id").to_pylist(), table.column("view").to_pylist())):
                if pair in seen:
                    r.hit(i, f"mention {pair[0]!r} has view {pair[1]} twice (first at row {seen[pair]})")
                seen.setdefault(pair, i)
            r.flush()
        if "uri" not in cols:
            return
        uris = table.column("uri").to_pylist()
        shas = table.column("sha256").to_pylist() if "sha256" in cols else [None] * len(uris)
        files = self.listing()
        escape, missing, badsha, mismatch = (self.rule(mrel, "uri"), self.rule(mrel, "uri"),
                                             self.rule(mrel, "sha256"), self.rule(mrel, "sha256"))
        link = self.rule(mrel, "uri")
        for i, (uri, sha) in enumerate(zip(uris, shas)):
            if uri is None:
                continue
            bad = uri_problem(uri)
            if bad is None and ("://" in uri or uri.startswith("/")):
                bad = f"image URI {uri!r} is not relative to the dataset root"
            if bad:
                escape.hit(i, bad)
                continue
            norm = posixpath.normpath(uri)
            if self.link_out(norm) is not None:
                link.hit(i, f"image {uri!r} is a link to a file outside the dataset root")
                continue
            if norm not in files:
                missing.hit(i, f"image {uri!r} does not exist")
                continue
            if sha is not None and not _HEX64.match(sha):
                badsha.hit(i, f"{sha!r} is not a sha256 hex digest")
            elif sha is not None and self.level == "deep":
                try:
                    got = hashlib.sha256(storage.read_bytes(self.uri(norm))).hexdigest()
                except OSError as err:
                    missing.hit(i, f"image {uri!r} cannot be read: {_short(err)}")
                    continue
                if got != sha:
                    mismatch.hit(i, f"image {uri!r} has sha256 {got[:12]}..., the manifest says {sha[:12]}...")
        for r in (escape, missing, badsha, mismatch, link):
            r.flush()

    # ------------------------------------------------------------------ features

    def features(self, key: str) -> None:
        base = f"features/{key}"
        mrel = f"{base}/{FEATURES_MANIFEST}"
        if not self.exists(mrel):
            self.add(mrel, "missing: an unfinished extract-features run (its shards are not usable; rerun it)")
            return
        manifest = self.read_json(mrel, "written last by extract-features")
        if manifest is None:
            return
        self.features_manifest(base, manifest)

    def features_manifest(self, base: str, manifest: dict) -> None:
        mrel = f"{base}/{FEATURES_MANIFEST}"
        tables, shapes, dtypes = manifest.get("tables"), manifest.get("shapes"), manifest.get("dtypes")
        shard_rows = (manifest.get("storage") or {}).get("shard_rows") if isinstance(manifest.get("storage"),
                                                                                     dict) else None
        ok = True
        for name, value in (("tables", tables), ("shapes", shapes), ("dtypes", dtypes)):
            if not isinstance(value, dict):
                self.add(mrel, "missing" if value is None else f"expected an object, got {_json_type(value)}",
                         field=name)
                ok = False
        if not _is_int(shard_rows) or shard_rows < 1:
            self.add(mrel, f"expected a count >= 1, got {shard_rows!r}", field="storage.shard_rows")
            ok = False
        if not ok:
            return
        for col, shape in shapes.items():
            if not isinstance(shape, list) or not shape or not all(_is_int(d) and d >= 0 for d in shape):
                self.add(mrel, f"shape {shape!r} is not a list of sizes", field=f"shapes.{col}")
                return
            size = 1
            for d in shape:
                size *= d
            if size >= 2 ** 31:
                self.add(mrel, f"shape {shape} has {size} values per row (at most 2^31 - 1)", field=f"shapes.{col}")
                return
        inputs = (manifest.get("inputs") or {}).get("dataset_tables_sha256") if isinstance(
            manifest.get("inputs"), dict) else None
        n_shards = 0
        for name, info in tables.items():
            where = f"tables.{name}"
            if name == "entities":
                count_key, id_col = "entities", "entity_id"
            elif name.startswith("mentions/") and name[len("mentions/"):] in SPLITS:
                count_key, id_col = name[len("mentions/"):], "mention_id"
            else:
                self.add(mrel, f"unknown table {name!r} (expected entities or mentions/<split>)", field=where)
                continue
            if not isinstance(info, dict) or not _is_int(info.get("rows")) or not isinstance(
                    info.get("shards"), list) or not isinstance(info.get("columns"), list):
                self.add(mrel, "expected an object with rows, shards and columns", field=where)
                continue
            rows, shards, columns = info["rows"], info["shards"], info["columns"]
            want = self.expected_rows(count_key)
            if want is not None and rows != want:
                table = ENTITIES if count_key == "entities" else mentions_path(count_key)
                self.add(mrel, f"rows {rows} but the dataset's {table} has {want}", field=f"{where}.rows")
            sha = self.table_sha.get(count_key)
            if sha and isinstance(inputs, dict) and inputs.get(count_key) not in (None, sha):
                self.add(mrel, f"made from another {ENTITIES if count_key == 'entities' else mentions_path(count_key)}"
                         " (its sha256 differs): stale, rerun extract-features",
                         field=f"inputs.dataset_tables_sha256.{count_key}")
            expected_shards = -(-rows // shard_rows) if rows else 0
            if len(shards) != expected_shards:
                self.add(mrel, f"{len(shards)} shards for {rows} rows of {shard_rows} per shard (expected "
                         f"{expected_shards})", field=f"{where}.shards")
            bad_cols = [c for c in columns if c not in dtypes]
            if bad_cols:
                self.add(mrel, f"column {bad_cols[0]!r} has no dtype", field="dtypes")
                continue
            expected = []
            for c in columns:
                if c in shapes:
                    size = 1
                    for d in shapes[c]:
                        size *= d
                    value = _SIMPLE_DTYPES.get(dtypes[c])
                    if value is None:
                        self.add(mrel, f"unknown dtype {dtypes[c]!r}", field=f"dtypes.{c}")
                        break
                    expected.append(pa.field(c, pa.list_(value, size)))
                else:
                    typ = _ID_DTYPES.get(c) if c in _ID_DTYPES and dtypes[c] in ("int64", "string") else \
                        _SIMPLE_DTYPES.get(dtypes[c])
                    if typ is None:
                        self.add(mrel, f"unknown dtype {dtypes[c]!r}", field=f"dtypes.{c}")
                        break
                    expected.append(pa.field(c, typ))
            else:
                n_ent = self.expected_rows("entities")
                dataset_ids = (list(range(n_ent)) if n_ent is not None else None) if id_col == "entity_id" \
                    else self.split_ids.get(count_key)
                for s, srel in enumerate(shards):
                    if not isinstance(srel, str) or uri_problem(srel) or "://" in srel or srel.startswith("/"):
                        self.add(mrel, f"shard {srel!r} is not a path inside the features folder",
                                 field=f"{where}.shards")
                        continue
                    want = max(0, min(shard_rows, rows - s * shard_rows))
                    self.feature_shard(f"{base}/{posixpath.normpath(srel)}", pa.schema(expected), shapes,
                                       want, id_col, dataset_ids, s * shard_rows)
                    n_shards += 1
        self.summary.setdefault("features", {})[base.rsplit("/", 1)[-1]] = n_shards

    def feature_shard(self, rel: str, expected: pa.Schema, shapes: dict, want_rows: int, id_col: str,
                      dataset_ids: list | None, first_row: int) -> int | None:
        pf = self.open_parquet(rel, "listed by the features manifest")
        if pf is None:
            return None
        schema = pf.schema_arrow
        good = self.check_schema(rel, schema, expected)
        for name in good:
            if name in shapes:
                meta = schema.field(name).metadata or {}
                try:
                    stored = json.loads(meta[b"shape"]) if b"shape" in meta else None
                except ValueError:
                    stored = "unparsable"
                if stored is not None and stored != shapes[name]:
                    self.add(rel, f"shape {stored} in the field metadata (the manifest says {shapes[name]})",
                             field=name)
        rows = pf.metadata.num_rows
        if rows != want_rows:
            self.add(rel, f"{rows} rows (expected {want_rows} for this shard)")
        if self.level == "quick" or id_col not in good:
            return rows
        cols = good if self.level == "deep" else [id_col]
        table = self.read_columns(rel, pf, cols)
        if table is None:
            return rows
        self.check_finite(rel, table)          # deep: every column is read
        if dataset_ids is None:
            return rows
        r = self.rule(rel, id_col)
        for i, v in enumerate(table.column(id_col).to_pylist()):
            j = first_row + i
            expect = dataset_ids[j] if j < len(dataset_ids) else None
            if v != expect:
                r.hit(i, f"{id_col} {v!r} but dataset row {j} is {expect!r} (features out of order or stale)")
        r.flush()
        return rows

    # ------------------------------------------------------------------ the tree

    def tree(self) -> None:
        try:
            is_dir = storage.is_dir(self.root)
        except OSError as err:
            self.problems.append(Problem(self.root, f"cannot read: {_short(err)}"))
            return
        if not is_dir and not (storage.is_s3(self.root) and self.listing()):
            self.problems.append(Problem(self.root, "no such dataset folder"))
            return
        files = self.listing()
        self.guarded(MANIFEST, self.dataset)
        pools: dict[tuple[str, int], set[str]] = {}
        for rel in files:
            m = NEGATIVES_RE.match(rel)
            if m:
                pools.setdefault((m.group(1) or "", int(m.group(2))), set()).add(m.group(3))
        source_of = {prefix: source for source, prefix in POOL_PREFIXES.items()}
        for prefix, k in sorted(pools):
            kinds = pools[prefix, k]
            self.guarded(pool_paths(k, source_of[prefix])[0], self.negatives, k, has_parquet="parquet" in kinds,
                         has_manifest="manifest.json" in kinds, source=source_of[prefix])
        self.summary["negatives"] = [f"{prefix}k{k}" for prefix, k in sorted(pools)]
        for key in sorted({rel.split("/")[1] for rel in files if rel.startswith("synthetic/") and rel.count("/") >= 2}):
            self.guarded(f"synthetic/{key}", self.synthetic, key)
        for key in sorted({rel.split("/")[1] for rel in files if rel.startswith("features/") and rel.count("/") >= 2}):
            self.guarded(f"features/{key}", self.features, key)

    def guarded(self, rel: str, check, *args, **kwargs) -> None:
        """A check that fails in a way no rule foresaw is one more problem line, never a traceback."""
        try:
            check(*args, **kwargs)
        except (DataError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError,
                pa.ArrowException, RecursionError, MemoryError) as err:
            self.add(rel, f"could not be checked: {type(err).__name__}: {_short(err)}")


# ------------------------------------------------------------------------------------------------ API


def verify(uri: str, deep: bool = False) -> list[Problem]:
    """Every problem of the dataset tree at `uri` (empty: clean). See the module docstring."""
    return verify_with_summary(uri, deep=deep)[0]


def verify_with_summary(uri: str, deep: bool = False) -> tuple[list[Problem], dict[str, Any]]:
    checker = _Checker(str(uri), "deep" if deep else "default")
    checker.tree()
    return checker.problems, checker.summary


def check_dataset_quick(uri: str) -> list[Problem]:
    """Start-up check of a dataset: manifest.json, the tables' footers, schemas and row counts (no data read)."""
    checker = _Checker(str(uri), "quick")
    checker.dataset()
    return checker.problems


def pool_paths(k: int, source: str = "jaccard") -> tuple[str, str]:
    """(Parquet, manifest) of the negatives pool of `source` (POOL_PREFIXES) and size k, under the dataset root."""
    stem = f"negatives/{POOL_PREFIXES[source]}k{k}"
    return f"{stem}.parquet", f"{stem}.manifest.json"


def check_negatives_quick(dataset_uri: str, k: int, source: str = "jaccard") -> list[Problem]:
    """Start-up check of `negatives/[prefix]k{K}`: manifest, footer, schema, one row per entity (no data read)."""
    checker = _Checker(str(dataset_uri), "quick")
    checker.dataset_manifest()
    checker.problems.clear()              # the dataset's own problems are check_dataset_quick's
    prel, mrel = pool_paths(k, source)
    checker.negatives(k, has_parquet=checker.exists(prel), has_manifest=checker.exists(mrel), source=source)
    return checker.problems


def check_synthetic_quick(dataset_uri: str, key: str) -> list[Problem]:
    """Start-up check of `synthetic/<key>`: settings.json, complete.json, manifest footer, schema, image count."""
    checker = _Checker(str(dataset_uri), "quick")
    checker.synthetic(key)
    return checker.problems


def check_features_quick(features_uri: str, dataset_uri: str | None = None) -> list[Problem]:
    """Start-up check of a `features/<key>` folder (anywhere, also outside a dataset): manifest.json, every
    shard's footer, schema (columns, tensor sizes, shape metadata) and row count; with `dataset_uri` also the
    tables' row counts against the dataset's manifest. No tensor data is read."""
    features_uri = str(features_uri)
    parent, key = (features_uri.rstrip("/").rsplit("/", 1) if storage.is_s3(features_uri)
                   else os.path.split(os.path.abspath(features_uri)))
    checker = _Checker(parent, "quick")
    if dataset_uri is not None:
        ds = _Checker(str(dataset_uri), "quick")
        ds.dataset_manifest()
        checker.counts = ds.counts
    # the folder's own name is the key; paths are relative to its parent
    checker.root = parent
    checker.fs, checker.base = storage.resolve(parent)
    if checker.real_root is not None:   # the folder named may be a link; its shards must stay inside it
        checker.real_root = os.path.realpath(checker.path(key))
        checker.root_what = "the features folder"
    mrel = f"{key}/{FEATURES_MANIFEST}"
    if not checker.exists(mrel):
        checker.add(mrel, "missing: not a features folder, or an extract-features run that did not finish")
        return checker.problems
    manifest = checker.read_json(mrel, "written last by extract-features")
    if manifest is not None:
        checker.features_manifest(key, manifest)
    return checker.problems


# ------------------------------------------------------------------------------- stages' start-up checks
# What a stage calls on the driver before it reads an artefact or starts actors: the quick check, the first
# problem raised as a DataError (one line naming the file, exit 2; the rest counted, with a pointer to
# `mel-ray verify`). A few milliseconds on a local disk (manifests and Parquet footers, no data).


def require_dataset(uri: str) -> None:
    """A dataset's manifest, tables' footers, schemas and row counts are sound, else DataError. The URI and the
    manifest go through `load_dataset` first (its messages for a malformed URI, an unreachable store or a
    missing manifest), then the quick check."""
    from mel_ray.dataset import load_dataset

    load_dataset(str(uri))
    raise_first(check_dataset_quick(uri), str(uri))


def require_negatives(dataset_uri: str, k: int, negatives_uri: str | None = None, source: str = "jaccard") -> None:
    """The pool of `source` and size k of the dataset (or `negatives_uri`, named like a pool) is sound."""
    if negatives_uri and storage.join(str(dataset_uri), pool_paths(k, source)[0]) != str(negatives_uri):
        folder, name = _split_uri(str(negatives_uri))
        parent, leaf = _split_uri(folder)
        match = NEGATIVES_RE.fullmatch(f"{leaf}/{name}")
        if not match or match.group(3) != "parquet":    # not laid out as a pool: find_negatives' own checks only
            return
        checker = _Checker(parent, "quick")
        ds = _Checker(str(dataset_uri), "quick")
        ds.dataset_manifest()
        checker.counts = ds.counts
        k = int(match.group(2))
        source = {prefix: s for s, prefix in POOL_PREFIXES.items()}[match.group(1) or ""]
        prel, mrel = pool_paths(k, source)
        checker.negatives(k, has_parquet=checker.exists(prel), has_manifest=checker.exists(mrel), source=source)
        raise_first(checker.problems, parent)
        return
    raise_first(check_negatives_quick(str(dataset_uri), k, source), str(dataset_uri))


def require_synthetic(dataset_uri: str, key: str) -> None:
    """`synthetic/<key>` of the dataset is a finished, sound synthesis run, else DataError."""
    raise_first(check_synthetic_quick(str(dataset_uri), key), str(dataset_uri))


def require_features(features_uri: str, dataset_uri: str | None = None) -> None:
    """A `features/<key>` folder (with `dataset_uri`: against that dataset's counts) is sound, else DataError."""
    raise_first(check_features_quick(str(features_uri), dataset_uri), str(dataset_uri) if dataset_uri else None)


def _split_uri(uri: str) -> tuple[str, str]:
    uri = uri.rstrip("/")
    if storage.is_s3(uri):
        head, _, tail = uri.rpartition("/")
        return head, tail
    return os.path.split(os.path.abspath(uri))


def summary_line(uri: str, summary: dict[str, Any]) -> str:
    counts = summary.get("counts", {})
    parts = [f"{counts.get('entities', '?')} entities",
             "train/dev/test = " + "/".join(str(counts.get(s, "?")) for s in SPLITS) + " mentions"]
    pools = summary.get("negatives") or []
    parts.append("negatives " + (", ".join(pools) if pools else "none"))
    synth = summary.get("synthetic") or {}
    parts.append(f"{len(synth)} synthetic key{'s' if len(synth) != 1 else ''} ({sum(synth.values())} views)")
    feats = summary.get("features") or {}
    parts.append(f"{len(feats)} feature key{'s' if len(feats) != 1 else ''} ({sum(feats.values())} shards)")
    return f"verified {uri}: " + ", ".join(parts) + ": no problems"
