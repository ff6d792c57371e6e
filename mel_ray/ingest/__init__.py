"""`mel-ray ingest`: convert a MEL release (mimic, melbench, jsonl) into the canonical dataset.

Order of work, chosen so a failure never looks like success: delete DST/manifest.json first, parse and
validate every input record (fatal problems raise DataError before anything is written), then place images,
then `dataset.write_dataset`, which writes manifest.json last. The input formats, the attribute rule and
which problems are fatal versus skipped are documented in docs/data-contract.md.

Nothing outside the release is read as its data. "The release" is the folder the user named (SRC for mimic
and jsonl, `--image-dir` for melbench's images), links resolved; the same check (`common.outside`) serves
every format. Image paths with `..`, absolute paths and URLs are fatal (`safe_name`). An annotation file
(kb_entity.json, a split file, entities.jsonl, ...) or a mimic image folder that is a link out of the release
is fatal. A local image whose real path lies outside the release is never read, copied or referenced: it is
counted as missing, and separately as `images.<kb|mentions>.outside_release` with examples under
`image_outside_release` in the report. Local images are looked up one path at a time, never by listing a
folder, so a link loop (`mention_image/x -> /`) cannot make ingest walk the disk. A release with no entities
or no kept mentions is refused: there is nothing to link. `.tmp-*` files that a killed ingest left in DST are
removed when DST is written again.
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mel_ray import storage
from mel_ray.config import IngestConfig
from mel_ray.dataset import MANIFEST, SPLITS, entities_table, mentions_table, write_dataset
from mel_ray.errors import DataError, UsageError
from mel_ray.ingest import jsonl, melbench, mimic
from mel_ray.ingest.common import (
    IMAGE_MISSING,
    IMAGE_OUTSIDE,
    IMAGE_UNDECODABLE,
    Image,
    Parsed,
    add_example,
    dedupe,
    is_inside,
    new_report,
    real_path,
    source_uri,
)

__all__ = ["FORMATS", "ingest", "summary_line"]

FORMATS: dict[str, Callable[[str, IngestConfig, dict[str, Any]], Parsed]] = {
    "mimic": mimic.parse,
    "melbench": melbench.parse,
    "jsonl": jsonl.parse,
}
IMAGE_DIRS = {"kb": "kb", "mentions": "mentions"}   # report key -> folder under DST/images/


def default_name(output: str) -> str:
    if storage.is_s3(output):
        return posixpath.basename(output.rstrip("/")) or output
    return os.path.basename(os.path.abspath(output))


def ingest(fmt: str, source: str, output: str, *, name: str | None = None,
           options: IngestConfig | None = None) -> dict[str, Any]:
    """Ingest `source` in format `fmt` into the dataset at `output`; returns the ingest report."""
    options = options or IngestConfig()
    if fmt not in FORMATS:
        raise UsageError(f"unknown ingest format {fmt!r} (expected one of {', '.join(FORMATS)})")
    source, output = str(source), str(output)
    storage.delete(storage.join(output, MANIFEST))   # from here on, DST is "incomplete" until we finish
    storage.remove_stale_tmp(output)                 # half-written files of a killed earlier run
    report = new_report(fmt, source, output)
    report["options"] = options.model_dump(mode="json", exclude={"format", "input"})   # provenance
    parsed = FORMATS[fmt](source, options, report)
    require_something_to_link(parsed, source, report)

    release = source if fmt != "melbench" else (options.image_dir or source)
    images = _Images(output, options.copy_images, options.check_images, report, release=release)
    entities = [{"entity_id": eid, "qid": e["qid"], "name": e["name"], "description": e["description"],
                 "attributes": e["attributes"],
                 "image_uris": dedupe(u for u in (images.place("kb", i) for i in e["images"]) if u)}
                for eid, e in enumerate(parsed.entities)]
    mentions = {}
    for split in SPLITS:
        rows = [{**{k: v for k, v in m.items() if k != "image"},
                 "image_uri": images.place("mentions", m["image"]) if m["image"] else None}
                for m in parsed.mentions[split]]
        mentions[split] = mentions_table(rows)
        report["rows"]["mentions"]["splits"][split] = len(rows)
    report["rows"]["entities"]["read"] = report["rows"]["entities"]["kept"] = len(entities)
    report["rows"]["mentions"]["kept"] = sum(t.num_rows for t in mentions.values())

    write_dataset(output, name=name or default_name(output), source_format=fmt,
                  entities=entities_table(entities), mentions=mentions, report=report)
    return report


def require_something_to_link(parsed: Parsed, source: str, report: dict[str, Any]) -> None:
    """An empty KB or no usable mention gives a dataset every later stage fails on: refuse it here."""
    if not parsed.entities:
        raise DataError(parsed.entities_file or source, "no entities: nothing to link")
    if not any(parsed.mentions.values()):
        read = report["rows"]["mentions"]["read"]
        skipped = report["rows"]["mentions"]["skipped"]
        why = f"{read} read, all skipped: {', '.join(f'{r} {n}' for r, n in sorted(skipped.items()))}" \
            if read else "none read"
        raise DataError(parsed.mentions_file or source, f"no mentions to keep ({why}): nothing to link")


@dataclass
class _Images:
    """Finds, checks and copies (or references) images; each distinct image is handled once."""
    output: str
    copy: bool
    check: bool
    report: dict[str, Any]
    release: str | None = None
    done: dict[tuple, str | None] = field(default_factory=dict)
    real_release: str | None = None
    written: set[str] = field(default_factory=set)
    listings: dict[str, set[str]] = field(default_factory=dict)

    def place(self, kind: str, image: Image) -> str | None:
        key = (kind, tuple(image.candidates), image.optional)
        if key not in self.done:
            self.done[key] = self._place(kind, image)
        return self.done[key]

    def _exists(self, root: str, rel: str) -> bool:
        if not storage.is_s3(root):
            # one stat per image: listing a local folder would walk through its links (and their loops)
            return os.path.isfile(storage.resolve(source_uri(root, rel))[1])
        # one listing per S3 image folder instead of one HEAD per image: 100K HEADs cost minutes
        if root not in self.listings:
            self.listings[root] = set(storage.list_files(root)) if storage.is_dir(root) else set()
        return rel in self.listings[root]

    def _outside(self, src: str) -> bool:
        """True if the local file `src` really (links resolved) lies outside the release the user named."""
        real = real_path(src)
        if real is None or not self.release:
            return False   # object stores have no links
        if self.real_release is None:
            self.real_release = real_path(self.release) or ""
        return not self.real_release or not is_inside(real, self.real_release)

    def _place(self, kind: str, image: Image) -> str | None:
        counts = self.report["images"][kind]
        for root, rel in image.candidates:
            if not self._exists(root, rel):
                continue
            src = source_uri(root, rel)
            if self._outside(src):
                counts["missing"] += 1
                counts["outside_release"] = counts.get("outside_release", 0) + 1
                add_example(self.report, IMAGE_OUTSIDE, f"{image.context} (a link to a file outside the release)")
                return None
            data = storage.read_bytes(src) if self.copy or self.check else b""
            if self.check and not _decodable(data):
                counts["undecodable"] += 1
                add_example(self.report, IMAGE_UNDECODABLE, f"{src} ({image.context})")
                return None
            counts["found"] += 1
            if not self.copy:
                return src if storage.is_s3(src) else storage.resolve(src)[1]   # absolute local path
            dest = posixpath.join("images", IMAGE_DIRS[kind], rel)
            if dest not in self.written:
                storage.write_bytes(storage.join(self.output, *dest.split("/")), data)
                self.written.add(dest)
                counts["copied"] += 1
            return dest
        if not image.optional:
            counts["missing"] += 1
            add_example(self.report, IMAGE_MISSING, image.context)
        return None


def _decodable(data: bytes) -> bool:
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as img:
            img.load()   # open() only reads the header; load() decodes, which is what catches truncation
        return True
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return False


def summary_line(output: str, report: dict[str, Any]) -> str:
    """One line for the terminal, e.g. `ingested DST: 123 entities, train/dev/test = 80/10/20 mentions, ...`."""
    rows = report["rows"]
    splits = rows["mentions"]["splits"]
    skipped: dict[str, int] = {}
    for table in ("entities", "mentions"):
        for reason, n in rows[table]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    detail = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
    images = report["images"].values()
    n_outside = sum(i.get("outside_release", 0) for i in images)
    outside = f" ({n_outside} outside the release)" if n_outside else ""
    return (f"ingested {output}: {rows['entities']['kept']} entities, "
            f"train/dev/test = {'/'.join(str(splits[s]) for s in SPLITS)} mentions, "
            f"skipped {sum(skipped.values())}{f' ({detail})' if detail else ''}, "
            f"images missing {sum(i['missing'] for i in images)}{outside}, "
            f"undecodable {sum(i['undecodable'] for i in images)}")
