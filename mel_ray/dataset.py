"""The canonical MEL dataset: schemas, writer and reader (the contract in docs/data-contract.md).

A dataset is a directory URI holding entities.parquet, mentions/{train,dev,test}.parquet, images/,
ingest_report.json and manifest.json. manifest.json is written last, so its presence means "complete".
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any

import pyarrow as pa

from mel_ray import __version__, storage
from mel_ray.errors import DataError

SCHEMA_VERSION = 1
SPLITS = ("train", "dev", "test")

ENTITY_SCHEMA = pa.schema([
    pa.field("entity_id", pa.int64(), nullable=False),
    pa.field("qid", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("description", pa.string(), nullable=False),
    pa.field("attributes", pa.list_(pa.string()), nullable=False),
    pa.field("image_uris", pa.list_(pa.string()), nullable=False),
])

MENTION_SCHEMA = pa.schema([
    pa.field("mention_id", pa.string(), nullable=False),
    pa.field("mention", pa.string(), nullable=False),
    pa.field("sentence", pa.string(), nullable=False),
    pa.field("image_uri", pa.string(), nullable=True),
    pa.field("entity_id", pa.int64(), nullable=False),
    pa.field("qid", pa.string(), nullable=False),
])

MANIFEST = "manifest.json"
ENTITIES = "entities.parquet"
REPORT = "ingest_report.json"


def mentions_path(split: str) -> str:
    return f"mentions/{split}.parquet"


def entities_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ENTITY_SCHEMA)


def mentions_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MENTION_SCHEMA)


def validate_tables(entities: pa.Table, mentions: dict[str, pa.Table], where: str) -> None:
    """Invariants every dataset must hold, whoever wrote it (ingest, merge, user code)."""
    ids = entities.column("entity_id").to_pylist()
    if ids != list(range(len(ids))):
        raise DataError(where, "entity_id must be dense 0..N-1 in row order", field="entity_id")
    qids = entities.column("qid").to_pylist()
    if len(set(qids)) != len(qids):
        raise DataError(where, "duplicate qid in entities", field="qid")
    seen: set[str] = set()
    n = len(ids)
    for split, table in mentions.items():
        if split not in SPLITS:
            raise DataError(where, f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        gold_qids = table.column("qid").to_pylist()
        for row, (mid, eid) in enumerate(zip(table.column("mention_id").to_pylist(),
                                             table.column("entity_id").to_pylist())):
            if mid in seen:
                raise DataError(where, f"mention_id {mid!r} is not unique across splits", field="mention_id")
            seen.add(mid)
            if not 0 <= eid < n:
                raise DataError(where, f"split {split}: mention {mid!r} has gold entity_id {eid} outside 0..{n-1}",
                                field="entity_id")
            if gold_qids[row] != qids[eid]:
                raise DataError(where, f"split {split}: mention {mid!r} has qid {gold_qids[row]!r} but entity "
                                f"{eid} is {qids[eid]!r}", field="qid")


def write_dataset(uri: str, *, name: str, source_format: str, entities: pa.Table,
                  mentions: dict[str, pa.Table], report: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    """Write tables, then the report, then manifest.json last (its presence marks completion)."""
    entities = entities.cast(ENTITY_SCHEMA)
    unknown = sorted(set(mentions) - set(SPLITS))
    if unknown:
        raise DataError(uri, f"unknown split(s) {unknown} (expected {', '.join(SPLITS)})")
    mentions = {s: mentions.get(s, mentions_table([])).cast(MENTION_SCHEMA) for s in SPLITS}
    validate_tables(entities, mentions, where=uri)
    storage.delete(storage.join(uri, MANIFEST))  # a rewrite is incomplete until the new manifest lands
    storage.write_table(storage.join(uri, ENTITIES), entities)
    for split, table in mentions.items():
        storage.write_table(storage.join(uri, mentions_path(split)), table)
    storage.write_json(storage.join(uri, REPORT), report)
    manifest = {
        "name": name,
        "source_format": source_format,
        "schema_version": SCHEMA_VERSION,
        "mel_ray_version": __version__,
        "counts": {"entities": entities.num_rows, **{s: mentions[s].num_rows for s in SPLITS}},
        **(extra or {}),
    }
    storage.write_json(storage.join(uri, MANIFEST), manifest)
    return manifest


@dataclasses.dataclass
class Dataset:
    uri: str
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def num_entities(self) -> int:
        return int(self.manifest["counts"]["entities"])

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def entities(self, columns: list[str] | None = None) -> pa.Table:
        return storage.read_table(self.path(ENTITIES), columns=columns)

    def mentions(self, split: str, columns: list[str] | None = None) -> pa.Table:
        if split not in SPLITS:
            raise DataError(self.uri, f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        return storage.read_table(self.path(mentions_path(split)), columns=columns)

    def report(self) -> dict[str, Any]:
        return storage.read_json_object(self.path(REPORT))

    def resolve_uri(self, relative: str | None, *, file: str | None = None, field: str = "image_uri") -> str | None:
        """Image URIs in the tables are relative to the dataset root unless they carry a scheme.

        A relative URI that leaves the dataset root (`../x`, `images/../../x`) is refused with a DataError
        naming the table (`file`, default the dataset) and `field`: stored data never reads outside its dataset.
        Absolute paths and s3:// URIs are kept (`ingest --reference-images` stores them on purpose).
        """
        if relative is None:
            return None
        if "://" in relative or relative.startswith("/"):
            return relative
        parts = relative.replace("\\", "/").split("/")
        depth = 0
        for part in parts:
            if part == "..":
                depth -= 1
            elif part not in ("", "."):
                depth += 1
            if depth < 0:
                break
        if depth < 0 or "\x00" in relative:
            shown = relative if len(relative) <= 120 else relative[:117] + "..."
            raise DataError(file or self.uri, f"image URI {shown!r} resolves outside the dataset root "
                            f"{self.uri}" if depth < 0 else f"image URI {shown!r} is not a file name", field=field)
        return self.path(*posixpath.normpath("/".join(parts)).split("/"))


def load_dataset(uri: str) -> Dataset:
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri):
        raise DataError(manifest_uri, "no manifest.json: not a mel-ray dataset, or an ingest that did not finish")
    manifest = storage.read_json_object(manifest_uri)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(manifest_uri, f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})",
                        field="schema_version")
    return Dataset(uri=str(uri), manifest=manifest)
