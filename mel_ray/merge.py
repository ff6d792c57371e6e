"""Merge canonical datasets into one large-KB dataset (the paper's Table 3: WikiDM = WikiDiverse + WikiMEL,
WikiDR = WikiDiverse + RichpediaMEL), for any number of inputs.

* KB: union of the inputs' entities, de-duplicated by QID. The first input that has a QID wins on every
  field; disagreeing fields of later inputs are counted per field in the report (with up to 20 examples).
  `image_uris` are compared as the inputs store them (relative paths), not by image content.
* entity_id is re-assigned densely: the first input's entities in their order, then the QIDs new in the
  second input in its order, and so on.
* Mentions of each split are concatenated in input order; gold entity ids are remapped through the QID, and
  mention ids become `<input name>/<mention id>` (so input names must be distinct).
* Images: relative image URIs are copied into the output under `images/<input name>/...` (default, the
  result is self-contained), or with `copy_images=False` rewritten to absolute URIs of the input. URIs that
  are already absolute are kept. A referenced image that does not exist is dropped and counted.

The result is an ordinary dataset (manifest.json last, `source_format: merge`, `inputs` recorded).
"""

from __future__ import annotations

import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mel_ray import storage
from mel_ray.dataset import (
    MANIFEST,
    SPLITS,
    Dataset,
    entities_table,
    load_dataset,
    mentions_table,
    write_dataset,
)
from mel_ray.errors import DataError, UsageError
from mel_ray.verify import require_dataset

CONFLICT_FIELDS = ("name", "description", "attributes", "image_uris")
MAX_EXAMPLES = 20
COPY_THREADS = 16


def _absolute(uri: str) -> str:
    if storage.is_s3(uri):
        return uri.rstrip("/")
    return storage.resolve(uri)[1]


def _canonical(uri: str) -> str:
    """One spelling per folder: s3 keys normalised (`//`, `./`, trailing `/`), local paths fully resolved
    (`./x`, `x/`, `a/../x`, symlinked folders, `file://`), so the same folder compares equal."""
    uri = storage.check_uri(uri)
    if storage.is_s3(uri):
        bucket, _, key = uri[len("s3://"):].partition("/")
        key = posixpath.normpath("/" + key).lstrip("/") if key else ""
        return f"s3://{bucket}/{key}".rstrip("/")
    return os.path.realpath(os.path.expanduser(storage.resolve(uri)[1]))


def _overlap(a: str, b: str) -> bool:
    """True if the canonical folders `a` and `b` are the same or one holds the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _default_name(output: str) -> str:
    return posixpath.basename(_absolute(output).rstrip("/")) or "merged"


def _is_absolute_uri(uri: str) -> bool:
    return "://" in uri or uri.startswith("/")


class _Images:
    """Plans image copies (each source once) and rewrites URIs for one output dataset."""

    def __init__(self, output: str, copy: bool):
        self.output = output
        self.copy = copy
        self.planned: dict[str, str] = {}     # source URI -> relative target in the output
        self.missing: set[str] = set()

    def rewrite(self, ds: Dataset, uri: str | None) -> str | None:
        if uri is None or uri == "":
            return uri
        if _is_absolute_uri(uri):
            return uri
        source = ds.resolve_uri(uri)
        if not self.copy:
            return _absolute(source) if not storage.is_s3(source) else source
        rel = uri.removeprefix("images/")
        target = posixpath.join("images", ds.name, rel)
        self.planned.setdefault(source, target)
        return self.planned[source]

    def run(self) -> int:
        def copy_one(item: tuple[str, str]) -> bool:
            source, target = item
            try:
                storage.copy_file(source, storage.join(self.output, *target.split("/")))
                return True
            except FileNotFoundError:
                return False

        items = list(self.planned.items())
        with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
            done = list(pool.map(copy_one, items))
        self.missing = {self.planned[src] for (src, _), ok in zip(items, done) if not ok}
        return sum(done)


def merge(inputs: list[str], output: str, name: str | None = None, copy_images: bool = True) -> dict[str, Any]:
    """Merge `inputs` (dataset URIs, first wins) into a new dataset at `output`; returns its manifest."""
    if not inputs:
        raise UsageError("merge: give at least one input dataset")
    out_real = _canonical(output)
    for uri in inputs:
        in_real = _canonical(uri)
        if in_real == out_real:
            raise UsageError(f"merge: output {output} is also an input ({uri}; both are {in_real}); write the "
                             "merge somewhere else")
        if _overlap(in_real, out_real):
            raise UsageError(f"merge: output {output} and input {uri} overlap (one folder holds the other: "
                             f"{out_real}, {in_real}); write the merge somewhere else")
    for uri in inputs:                                 # manifests, footers, schemas, counts: one line, exit 2
        require_dataset(uri)
    datasets = [load_dataset(uri) for uri in inputs]
    by_name: dict[str, list[str]] = {}
    for ds in datasets:
        by_name.setdefault(ds.name, []).append(ds.uri)
    dups = {n: uris for n, uris in by_name.items() if len(uris) > 1}
    if dups:
        n, uris = next(iter(dups.items()))
        raise DataError(", ".join(uris), f"input datasets share the name {n!r}; merged mention ids are "
                        "prefixed with the dataset name, so names must be distinct (re-ingest with --name)",
                        field="name")
    for ds in datasets:
        if "/" in ds.name or not ds.name:
            raise DataError(ds.path(MANIFEST), f"dataset name {ds.name!r} cannot prefix mention ids "
                            "(it must be non-empty and contain no '/')", field="name")

    storage.delete(storage.join(output, MANIFEST))  # incomplete until the new manifest lands
    storage.remove_stale_tmp(output)                # half-written files of a killed earlier merge
    images = _Images(output, copy_images)
    entities: list[dict[str, Any]] = []
    qid_to_id: dict[str, int] = {}
    origin: list[str] = []                          # name of the input each merged entity came from
    raw_fields: list[dict[str, Any]] = []           # winning values as the input stored them
    conflicts = {f: {"count": 0, "examples": []} for f in CONFLICT_FIELDS}
    per_input: list[dict[str, Any]] = []
    eid_to_qid: list[list[str]] = []

    for ds in datasets:
        rows = ds.entities().to_pylist()
        eid_to_qid.append([r["qid"] for r in rows])
        new = dup = 0
        for row in rows:
            qid = row["qid"]
            known = qid_to_id.get(qid)
            if known is None:
                qid_to_id[qid] = len(entities)
                origin.append(ds.name)
                raw_fields.append({f: row[f] for f in CONFLICT_FIELDS})
                entities.append({
                    "entity_id": len(entities), "qid": qid, "name": row["name"],
                    "description": row["description"], "attributes": list(row["attributes"]),
                    "image_uris": [images.rewrite(ds, u) for u in row["image_uris"]],
                })
                new += 1
                continue
            dup += 1
            kept = raw_fields[known]
            for f in CONFLICT_FIELDS:
                if row[f] != kept[f]:
                    c = conflicts[f]
                    c["count"] += 1
                    if len(c["examples"]) < MAX_EXAMPLES:
                        c["examples"].append({"qid": qid, "kept_from": origin[known], "kept": kept[f],
                                              "dropped_from": ds.name, "dropped": row[f]})
        per_input.append({"name": ds.name, "uri": ds.uri, "entities": len(rows), "new_entities": new,
                          "duplicate_entities": dup})

    mentions: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for ds, qids, info in zip(datasets, eid_to_qid, per_input):
        info["mentions"] = {}
        for split in SPLITS:
            rows = ds.mentions(split).to_pylist()
            info["mentions"][split] = len(rows)
            where = ds.path("mentions", f"{split}.parquet")
            for row in rows:
                eid = row["entity_id"]
                if not 0 <= eid < len(qids):
                    raise DataError(where, f"gold entity_id {eid} is outside the input's KB",
                                    record=row["mention_id"], field="entity_id")
                if qids[eid] != row["qid"]:
                    raise DataError(where, f"gold qid {row['qid']!r} disagrees with entity_id {eid} "
                                    f"(qid {qids[eid]!r})", record=row["mention_id"], field="qid")
                mentions[split].append({
                    "mention_id": f"{ds.name}/{row['mention_id']}", "mention": row["mention"],
                    "sentence": row["sentence"], "image_uri": images.rewrite(ds, row["image_uri"]),
                    "entity_id": qid_to_id[row["qid"]], "qid": row["qid"],
                })

    copied = images.run() if copy_images else 0
    if images.missing:
        for e in entities:
            e["image_uris"] = [u for u in e["image_uris"] if u not in images.missing]
        for rows in mentions.values():
            for m in rows:
                if m["image_uri"] in images.missing:
                    m["image_uri"] = None

    conflict_total = sum(c["count"] for c in conflicts.values())
    report = {
        "source_format": "merge",
        "inputs": per_input,
        "entities": len(entities),
        "duplicate_entities": sum(i["duplicate_entities"] for i in per_input),
        "mentions": {s: len(mentions[s]) for s in SPLITS},
        "conflicts": conflicts,
        "conflicting_entities_fields": conflict_total,
        "images_copied": copied,
        "missing_images": sorted(images.missing)[:MAX_EXAMPLES],
        "missing_images_count": len(images.missing),
        "copy_images": copy_images,
    }
    return write_dataset(
        output, name=name or _default_name(output), source_format="merge",
        entities=entities_table(entities), mentions={s: mentions_table(rows) for s, rows in mentions.items()},
        report=report,
        extra={"inputs": [{"name": ds.name, "uri": ds.uri, "counts": ds.manifest.get("counts")}
                          for ds in datasets]},
    )

