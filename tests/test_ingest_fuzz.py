"""Generated garbage thrown at the three parsers: ingest either succeeds or raises DataError (never another
exception type), and a failure leaves no manifest.json behind."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

try:
    from tests.test_ingest import jsonl_files, melbench_files, mimic_files, write_tree
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from test_ingest import jsonl_files, melbench_files, mimic_files, write_tree

from mel_ray.config import IngestConfig
from mel_ray.dataset import MANIFEST, SPLITS, load_dataset
from mel_ray.errors import DataError
from mel_ray.ingest import ingest
from mel_ray.ingest.common import safe_name, split_attributes

# derandomize: the same examples on every run (and no example database shared by parallel runs), so CI is
# reproducible; print_blob makes any failure replayable with @reproduce_failure.
FUZZ = settings(max_examples=70, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])

# values that are close to valid (so parsing gets past the first check) mixed with arbitrary JSON
PLAUSIBLE = st.sampled_from(["", " ", "nil", "NIL", "Q76", "Q6294", "Q1297", "Q999", "m10.png", "m11.jpg",
                             "../x.jpg", "/etc/passwd", "a\\..\\b", ".", "x//y.png", "Barack_Obama", "%zz",
                             "train", "dev", "val", "a: b. c: d.", 0, 1, 2, 3, -1, 10, 10**30, 2.5, True, None,
                             [], {}, ["Q76"], ["a", "b"], ["m10.png"]])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)
VALUES = PLAUSIBLE | JSON
KEYS = st.sampled_from(["id", "qid", "entity_name", "desc", "attr", "image_list", "mentions", "sentence", "imgPath",
                        "answer", "entities", "name", "description", "attributes", "images", "mention", "image",
                        "split", "image_path"]) | st.text(max_size=6)


def containers(value: Any) -> list[Any]:
    """Every dict and list inside a JSON value, outermost first."""
    found = []
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, (dict, list)):
            found.append(node)
            stack.extend(node.values() if isinstance(node, dict) else node)
    return found


def mutate_structure(data: st.DataObject, value: Any) -> None:
    nodes = containers(value)
    if not nodes:
        return
    node = data.draw(st.sampled_from(nodes))
    if isinstance(node, dict):
        key = data.draw(st.sampled_from(list(node)) | KEYS) if node else data.draw(KEYS)
        if data.draw(st.booleans()) and key in node:
            del node[key]
        else:
            node[key] = data.draw(VALUES)
    elif node and data.draw(st.booleans()):
        node[data.draw(st.integers(0, len(node) - 1))] = data.draw(VALUES)
    else:
        node.append(data.draw(VALUES))


def mutate_files(data: st.DataObject, files: dict[str, Any]) -> None:
    """One to three changes: a field inside a file, or a whole file replaced by garbage, or a file removed."""
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(files)))
        op = data.draw(st.sampled_from(["field", "field", "field", "json", "bytes", "truncate", "delete"]))
        content = files[name]
        if op == "field" and isinstance(content, (dict, list)):
            mutate_structure(data, content)
        elif op == "json":
            files[name] = json.dumps(data.draw(JSON))
        elif op == "bytes":
            files[name] = data.draw(st.binary(max_size=40))
        elif op == "truncate":
            raw = content if isinstance(content, bytes) else json.dumps(content).encode()
            files[name] = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
        elif op == "delete":
            del files[name]


def check_ingest(fmt: str, files: dict[str, Any], target: str, options: IngestConfig,
                 image_dir: str | None = None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-ingest-"))
    try:
        src = write_tree(tmp / "src", files)
        if image_dir is not None:
            options.image_dir = str(src / image_dir)
        out = tmp / "out"
        out.mkdir()
        (out / MANIFEST).write_text("{}")   # a stale manifest from an earlier run must not survive a failure
        try:
            report = ingest(fmt, str(src / target) if target else str(src), str(out), options=options)
        except DataError as err:
            event(f"DataError on field {err.field}")   # see: pytest --hypothesis-show-statistics
            assert str(err) and "\n" not in str(err)
            assert not (out / MANIFEST).exists()
            return
        event("ingested")
        ds = load_dataset(str(out))
        counts = ds.manifest["counts"]
        assert report["rows"]["mentions"]["kept"] == sum(counts[s] for s in SPLITS)
        assert report["rows"]["entities"]["kept"] == counts["entities"] == ds.entities().num_rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


OPTIONS = st.builds(IngestConfig, copy_images=st.booleans(), check_images=st.booleans())


@FUZZ
@given(data=st.data(), options=OPTIONS)
def test_fuzz_mimic(data, options):
    files = mimic_files()
    mutate_files(data, files)
    check_ingest("mimic", files, "", options)


@FUZZ
@given(data=st.data(), options=OPTIONS)
def test_fuzz_melbench(data, options):
    files = melbench_files()
    mutate_files(data, files)
    image_dir = data.draw(st.sampled_from([None, "imgs", "missing-folder"]))
    check_ingest("melbench", files, "WikiMEL.json", options, image_dir)


@FUZZ
@given(data=st.data(), options=OPTIONS)
def test_fuzz_jsonl(data, options):
    files = jsonl_files()
    if data.draw(st.booleans()):   # also garbage lines, not only garbage values
        files["mentions.jsonl"] = "\n".join(json.dumps(x) for x in files["mentions.jsonl"]) + "\n" + data.draw(
            st.text(max_size=30))
    mutate_files(data, files)
    check_ingest("jsonl", files, "", options)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(text=st.text(max_size=200), sep=st.sampled_from([".", ";", " | ", "||"]), kv=st.sampled_from([":", "=", "->"]))
def test_fuzz_split_attributes(text, sep, kv):
    items = split_attributes(text, sep, kv)
    assert len(items) == len(set(items))
    assert all(i and i == " ".join(i.split()) for i in items)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(name=st.text(alphabet=st.sampled_from(list("ab./\\:\x00")), max_size=12))
def test_fuzz_safe_name(name):
    try:
        rel = safe_name(name, "f", 0, "imgPath")
    except DataError:
        return
    assert rel and not rel.startswith("/") and ".." not in rel.split("/") and "\x00" not in rel
