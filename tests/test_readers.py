"""Issue 13, items 4 and 7 (the stages' side) and 9 (link's JSONL): every reader of a stored artefact checks what
it reads at start-up, on the driver, before Ray or any actor starts (mel_ray.verify's quick checks), so a damaged
dataset, feature set, negatives pool or synthetic run is ONE stderr line naming the file and exit 2, never a
traceback, never counts printed as if whole; a data error after Ray started exits 2, never aborts; relative paths
mean the caller's directory; link reads JSONL with ingest's reader.

Every case asserts the exact exit code and stderr line, like tests/test_ingest_bad_input.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mel_ray import cli, console, storage
from mel_ray.errors import DataError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _console_reset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # logs/ and anything relative land in the test's folder
    yield
    console.reset()


def run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines other than the quiet commands' "output -> log file" note)."""
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    command = next(a for a in argv if not a.startswith("-"))
    lines = [line for line in captured.err.splitlines() if not line.startswith(f"mel-ray {command}: ")]
    return code, captured.out, lines


# ------------------------------------------------------------------------------------------- damaged datasets


def _truncate(rel: str, keep: float = 0.5):
    def mutate(ds: Path) -> None:
        data = (ds / rel).read_bytes()
        (ds / rel).write_bytes(data[:int(len(data) * keep)])
    return mutate


def _write(rel: str, data: bytes):
    return lambda ds: (ds / rel).write_bytes(data)


def _remove(rel: str):
    return lambda ds: (ds / rel).unlink()


def _drop_column(rel: str, column: str):
    def mutate(ds: Path) -> None:
        table = pq.read_table(ds / rel)
        pq.write_table(table.drop_columns([column]), ds / rel)
    return mutate


def _recount(split: str, count: int):
    def mutate(ds: Path) -> None:
        manifest = json.loads((ds / "manifest.json").read_text())
        manifest["counts"][split] = count
        (ds / "manifest.json").write_text(json.dumps(manifest))
    return mutate


# (case id, mutation, stderr line after "error: {dataset}/")
DAMAGED = [
    ("truncated-entities", _truncate("entities.parquet"),
     "entities.parquet: not a readable Parquet file: footer does not parse (truncated or not Parquet)"),
    ("truncated-mentions", _truncate("mentions/test.parquet", 0.9),
     "mentions/test.parquet: not a readable Parquet file: footer does not parse (truncated or not Parquet)"),
    ("empty-mentions", _write("mentions/train.parquet", b""),
     "mentions/train.parquet: empty file (0 bytes), expected Parquet"),
    ("missing-mentions", _remove("mentions/dev.parquet"), "mentions/dev.parquet: missing (part of every dataset)"),
    ("missing-entities", _remove("entities.parquet"), "entities.parquet: missing (part of every dataset)"),
    ("manifest-list", _write("manifest.json", b"[1, 2]"), "manifest.json: expected a JSON object, got a list"),
    ("manifest-invalid-json", _write("manifest.json", b'{"name": "x",'),
     "manifest.json: invalid JSON: line 1 column 14: Expecting property name enclosed in double quotes"),
    ("manifest-not-utf8", _write("manifest.json", '{"name": "caf\u00e9"}'.encode("latin-1")),
     "manifest.json: not UTF-8: byte 0xe9 at offset 13 (line 1)"),
    ("manifest-empty", _write("manifest.json", b""), "manifest.json: empty file (0 bytes), expected JSON"),
    ("missing-manifest", _remove("manifest.json"),
     "manifest.json: no manifest.json: not a mel-ray dataset, or an ingest that did not finish"),
    ("missing-column-entities", _drop_column("entities.parquet", "qid"),
     "entities.parquet: field 'qid': column missing (expected string)"),
    ("missing-column-attributes", _drop_column("entities.parquet", "attributes"),
     "entities.parquet: field 'attributes': column missing (expected list<string>)"),
    ("missing-column-mentions", _drop_column("mentions/test.parquet", "entity_id"),
     "mentions/test.parquet: field 'entity_id': column missing (expected int64)"),
    ("count-mismatch", _recount("train", 999), ("mentions/train.parquet: {train} rows but manifest.json counts.train "
     "says 999")),
]


@pytest.fixture(scope="module")
def damaged(small_data, tmp_path_factory) -> dict[str, Path]:
    """One damaged copy of the small dataset per case (read-only for the tests: every command fails first)."""
    root = tmp_path_factory.mktemp("damaged")
    out = {}
    for case, mutate, _ in DAMAGED:
        shutil.copytree(small_data.dataset, root / case)
        mutate(root / case)
        out[case] = root / case
    return out


def _commands(ds: str, tmp: Path, clip: str) -> dict[str, list[str]]:
    """Every command that reads a dataset, as README writes it (plus what makes it fail fast offline)."""
    log = ["--log-file", str(tmp / "cmd.log")]
    return {
        "info": ["info", ds],
        "mine-negatives": ["mine-negatives", *log, "--dataset", ds, "--k", "4"],
        "synthesize": ["synthesize", *log, "--dataset", ds, "--model", "procedural:demo", "--views", "1"],
        "extract-features": ["extract-features", *log, "--dataset", ds, "--model", clip, "--no-synthetic"],
        "extract-features-views": ["extract-features", *log, "--dataset", ds, "--model", clip, "--synthetic", "k"],
        "train": ["train", *log, "--dataset", ds, "--set", "train.negatives=in_batch"],
        "tune": ["tune", *log, "--dataset", ds],
        "evaluate": ["evaluate", *log, "--dataset", ds, "--checkpoint", str(tmp / "model.pt")],
        "merge": ["merge", ds, "--output", str(tmp / "merged")],
        "show-views": ["show-views", "--dataset", ds, "--mention", "x", "--output", str(tmp / "v.png")],
    }


COMMANDS = list(_commands("D", Path("T"), "C"))


@pytest.mark.parametrize("case, line", [(c, line) for c, _, line in DAMAGED], ids=[c for c, _, _ in DAMAGED])
@pytest.mark.parametrize("command", COMMANDS)
def test_damaged_dataset_is_one_line_for_every_command(damaged, small_data, tmp_path, capsys, command, case, line):
    import ray

    ds = damaged[case]
    ray_was_up = ray.is_initialized()
    before = sorted(str(p.relative_to(ds)) for p in ds.rglob("*"))
    argv = _commands(str(ds), tmp_path, small_data.models["clip"])[command]
    code, out, err = run(capsys, *argv)
    line = line.format(train=pq.read_metadata(Path(small_data.dataset) / "mentions/train.parquet").num_rows)
    assert (code, err) == (2, [f"error: {ds}/{line}"]), (command, out)
    assert "Traceback" not in out
    assert ray.is_initialized() == ray_was_up   # checked on the driver before Ray started
    assert sorted(str(p.relative_to(ds)) for p in ds.rglob("*")) == before
    assert not (tmp_path / "merged").exists() and not (tmp_path / "links").exists()


@pytest.mark.parametrize("case, line", [(c, line) for c, _, line in DAMAGED], ids=[c for c, _, _ in DAMAGED])
def test_damaged_kb_is_one_line_for_link(damaged, small_data, tmp_path, capsys, monkeypatch, case, line):
    """link loads its model first (a tracking server that is down says so first), then reads the mentions, then
    checks the KB before any actor starts."""
    import ray

    import mel_ray.link

    monkeypatch.setattr(mel_ray.link, "load_linker", lambda *a, **k: {"config": {}, "dims": {}})
    (tmp_path / "m.jsonl").write_text(json.dumps({"text": "A sentence.", "mention": "A"}) + "\n")
    ds = damaged[case]
    ray_was_up = ray.is_initialized()
    code, _, err = run(capsys, "link", "--log-file", str(tmp_path / "log"), "--model", str(tmp_path / "model.pt"),
                       "--kb", str(ds), "--mentions", "m.jsonl", "--output", "links")
    line = line.format(train=pq.read_metadata(Path(small_data.dataset) / "mentions/train.parquet").num_rows)
    assert (code, err) == (2, [f"error: {ds}/{line}"])
    assert ray.is_initialized() == ray_was_up and not (tmp_path / "links").exists()


def test_info_prints_a_sound_dataset(small_data, capsys):
    code, out, err = run(capsys, "info", small_data.dataset)
    assert (code, err) == (0, [])
    assert json.loads(out)["counts"]["entities"] == 60


def test_start_up_checks_are_cheap(small_data):
    """The quick checks read manifests and footers only: milliseconds on the demo-size dataset."""
    from mel_ray.verify import check_dataset_quick

    check_dataset_quick(small_data.dataset)
    t0 = time.perf_counter()
    for _ in range(20):
        assert check_dataset_quick(small_data.dataset) == []
    assert (time.perf_counter() - t0) / 20 < 0.25


# ---------------------------------------------------------------------- damaged features, pools, synthetic runs


@pytest.fixture(scope="module")
def with_features(small_data, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the small dataset with CLIP features (local engine, no Ray) and a mined k=4 pool."""
    from seeded_models import copy_with_features

    from mel_ray.negatives import mine_negatives

    ds, features = copy_with_features(small_data, tmp_path_factory.mktemp("with-features"))
    mine_negatives(ds, k=4, num_workers=0)
    return Path(ds), Path(features).name


@pytest.fixture(scope="module")
def frozen_model(with_features, tmp_path_factory) -> str:
    """A real (untrained) frozen-mode model.pt that fits the feature set: evaluate reads the checkpoint first (its
    encoder picks the feature set), so the damaged set is what fails, not a missing model."""
    from seeded_models import seeded_model

    ds, key = with_features
    return seeded_model(str(ds / "features" / key), tmp_path_factory.mktemp("frozen-model") / "model.pt", hidden=8)[1]


def _damaged_copy(with_features, tmp_path: Path, rel: str, mutate) -> Path:
    src, key = with_features
    ds = tmp_path / "ds"
    shutil.copytree(src, ds)
    mutate(ds, rel.format(key=key))
    return ds


def _trunc(ds: Path, rel: str) -> None:
    _truncate(rel)(ds)


ARTEFACTS = [
    ("features-shard-truncated", "features/{key}/entities/part-00000.parquet", _trunc,
     "not a readable Parquet file: footer does not parse (truncated or not Parquet)"),
    ("features-shard-missing", "features/{key}/mentions/dev/part-00000.parquet", lambda ds, rel: (ds / rel).unlink(),
     "missing (listed by the features manifest)"),
    ("features-manifest-invalid", "features/{key}/manifest.json", lambda ds, rel: (ds / rel).write_text("{"),
     "invalid JSON: line 1 column 2: Expecting property name enclosed in double quotes"),
    ("features-manifest-list", "features/{key}/manifest.json", lambda ds, rel: (ds / rel).write_text("[]"),
     "expected a JSON object, got a list"),
]


@pytest.mark.parametrize("case, rel, mutate, message", ARTEFACTS, ids=[a[0] for a in ARTEFACTS])
@pytest.mark.parametrize("command", ["train", "tune", "evaluate"])
def test_damaged_features_are_one_line(with_features, frozen_model, tmp_path, capsys, command, case, rel, mutate,
                                      message):
    import ray

    ds = _damaged_copy(with_features, tmp_path, rel, mutate)
    ray_was_up = ray.is_initialized()
    argv = {"train": ["train", "--dataset", str(ds), "--set", "train.negatives=in_batch"],
            "tune": ["tune", "--dataset", str(ds), "--set", "train.negatives=in_batch"],
            "evaluate": ["evaluate", "--dataset", str(ds), "--checkpoint", frozen_model]}[command]
    code, _, err = run(capsys, *argv, "--log-file", str(tmp_path / "log"))
    assert (code, err) == (2, [f"error: {ds}/{rel.format(key=with_features[1])}: {message}"])
    assert ray.is_initialized() == ray_was_up


POOLS = [
    ("pool-truncated", "negatives/k4.parquet", _trunc,
     "not a readable Parquet file: footer does not parse (truncated or not Parquet)"),
    ("pool-empty", "negatives/k4.parquet", lambda ds, rel: (ds / rel).write_bytes(b""),
     "empty file (0 bytes), expected Parquet"),
    ("pool-manifest-list", "negatives/k4.manifest.json", lambda ds, rel: (ds / rel).write_text("[]"),
     "expected a JSON object, got a list"),
    ("pool-manifest-not-utf8", "negatives/k4.manifest.json", lambda ds, rel: (ds / rel).write_bytes(b"{\"k\": \xff}"),
     "not UTF-8: byte 0xff at offset 6 (line 1)"),
    ("pool-wrong-rows", "negatives/k4.parquet",
     lambda ds, rel: pq.write_table(pq.read_table(ds / rel).slice(0, 10), ds / rel),
     "10 rows but the dataset has 60 entities (one row per entity)"),
]


@pytest.mark.parametrize("case, rel, mutate, message", POOLS, ids=[p[0] for p in POOLS])
def test_damaged_negatives_pool_is_one_line_for_train(with_features, tmp_path, capsys, case, rel, mutate, message):
    import ray

    ds = _damaged_copy(with_features, tmp_path, rel, mutate)
    ray_was_up = ray.is_initialized()
    code, _, err = run(capsys, "train", "--dataset", str(ds), "--set", "negatives.k=4", "--set", "train.k=2",
                       "--log-file", str(tmp_path / "log"))
    assert (code, err) == (2, [f"error: {ds}/{rel}: {message}"])
    assert ray.is_initialized() == ray_was_up


def test_damaged_pool_is_mined_again(with_features, tmp_path):
    """A complete-looking pool whose Parquet is damaged is not 'already mined': mine-negatives rewrites it."""
    from mel_ray.negatives import mine_negatives
    from mel_ray.verify import check_negatives_quick

    ds = _damaged_copy(with_features, tmp_path, "negatives/k4.parquet", _trunc)
    manifest = mine_negatives(str(ds), k=4, num_workers=0)
    assert not manifest.get("skipped")
    assert check_negatives_quick(str(ds), 4) == []
    (ds / "negatives/k4.manifest.json").write_text("[]")          # a damaged manifest: mined again too
    assert not mine_negatives(str(ds), k=4, num_workers=0).get("skipped")


def test_damaged_synthetic_run_is_one_line(with_features, small_data, tmp_path, capsys):
    ds = _damaged_copy(with_features, tmp_path, "synthetic/k", lambda ds, rel: (ds / rel).mkdir(parents=True))
    (ds / "synthetic/k/complete.json").write_text(json.dumps({"images": 3}))
    (ds / "synthetic/k/settings.json").write_text("[]")
    (ds / "synthetic/k/manifest.parquet").write_bytes(b"PAR1 not really")
    code, _, err = run(capsys, "extract-features", "--dataset", str(ds), "--model", small_data.models["clip"],
                       "--synthetic", "k", "--log-file", str(tmp_path / "log"))
    assert (code, err) == (2, [(f"error: {ds}/synthetic/k/settings.json: expected a JSON object, got a list "
                               f"(and 1 more problem: run `mel-ray verify {ds}`)")])


# ------------------------------------------------------------------------ a data error after Ray started: exit 2


MINE_AFTER_RAY = """
import sys
from mel_ray import cli, negatives
from mel_ray.errors import DataError

real = negatives.run_mining

def failing(*args, **kwargs):            # a data error raised once Ray is up (what used to abort at exit)
    import ray
    assert ray.is_initialized()
    raise DataError("entities.parquet", "bad data found while mining")

negatives.run_mining = failing
negatives.RAY_MIN_ENTITIES = 0           # the Ray path at a test's size (small KBs are mined in process)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_mine_negatives_exits_2_after_ray_started_five_times_in_a_row(small_data, tmp_path):
    """`mine-negatives` ending on a data error with its own local Ray instance up: exit 2 and one line, five runs
    in a row (it used to die with `terminate called without an active exception`, exit 134, about one in three)."""
    ds = small_data.copy(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    for attempt in range(5):
        proc = subprocess.run([sys.executable, "-c", MINE_AFTER_RAY, "mine-negatives", "--dataset", ds, "--k", "4",
                               "--log-file", str(tmp_path / "log")],
                              check=False, capture_output=True, text=True, timeout=300, env=env,
                              cwd=tmp_path)
        lines = [x for x in proc.stderr.splitlines() if not x.startswith("mel-ray mine-negatives: ")]
        assert (proc.returncode, lines) == (2, ["error: entities.parquet: bad data found while mining"]), \
            (attempt, proc.stderr[-3000:])


# ------------------------------------------------------------------------ relative paths: the caller's directory


def test_path_flags_are_made_absolute_on_the_driver():
    from mel_ray.cli import _here

    here = Path.cwd()
    assert _here("ds") == str(here / "ds")
    assert _here("./a/../b") == str(here / "a/../b")
    assert _here("/abs/x") == "/abs/x"
    for uri in ("s3://bucket/x", "runs:/0123abc", "file:///x", None):
        assert _here(uri) == uri


@pytest.mark.slow
def test_readme_commands_with_relative_paths_from_the_callers_directory(with_features, small_data, ray_local,
                                                                         tmp_path, capsys):
    """README's `mel-ray train --config configs/X.yaml` run from the folder holding the dataset, with every path
    relative (config values and flags), then `evaluate`, `info` and `verify` with relative flags: Ray Train's
    workers run in another directory, so every path must be absolute before it reaches them."""
    src, key = with_features
    work = tmp_path / "work"
    shutil.copytree(src, work / "datasets" / "small")
    (work / "configs").mkdir()
    (work / "configs" / "t.yaml").write_text(
        "data:\n  dataset: datasets/small\n"
        "train:\n  negatives: in_batch\n  epochs: 1\n  batch_size: 16\n  num_workers: 2\n  cpus_per_worker: 0.5\n"
        "model:\n  hidden: 16\n"
        "tracking:\n  experiment: relative\n  storage: runs\n")
    os.chdir(work)
    code, out, err = run(capsys, "train", "--config", "configs/t.yaml", "--features", f"datasets/small/features/{key}")
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    checkpoint = summary["checkpoint"]
    assert checkpoint.startswith(str(work / "runs")), checkpoint
    rel_checkpoint = os.path.relpath(checkpoint, work)
    code, out, err = run(capsys, "evaluate", "--dataset", "datasets/small", "--checkpoint", rel_checkpoint,
                         "--shards", "1", "--output", "eval")
    assert code == 0, err
    assert (work / "eval" / "eval_test.json").exists() and (work / "eval" / "predictions_test.parquet").exists()
    code, out, err = run(capsys, "info", "datasets/small")
    assert (code, json.loads(out)["counts"]["entities"]) == (0, 60)
    code, out, err = run(capsys, "verify", "datasets/small")
    assert code == 0 and out.startswith("verified datasets/small: "), out


# ---------------------------------------------------------------------------- link: JSONL as ingest reads it


def _jsonl_rows(n: int = 3) -> list[dict]:
    return [{"text": f"Sentence {i} about Paris.", "mention": "Paris", "mention_id": f"m{i}"} for i in range(n)]


VALID_JSONL = [
    ("crlf", lambda rows: "".join(json.dumps(r) + "\r\n" for r in rows)),
    ("no-final-newline", lambda rows: "\n".join(json.dumps(r) for r in rows)),
    ("blank-lines", lambda rows: "\n\n" + "\n  \n".join(json.dumps(r) for r in rows) + "\n\n"),
    ("bom", lambda rows: "\ufeff" + "".join(json.dumps(r) + "\n" for r in rows)),
    ("u2028-in-strings", lambda rows: "".join(json.dumps({**r, "text": r["text"] + " \u2028 \u2029 \x85 x"},
                                                         ensure_ascii=False) + "\n" for r in rows)),
]


@pytest.mark.parametrize("case, render", VALID_JSONL, ids=[c for c, _ in VALID_JSONL])
def test_link_reads_valid_jsonl_as_ingest_does(tmp_path, case, render):
    from mel_ray.ingest.common import iter_jsonl
    from mel_ray.link import read_mentions

    rows = _jsonl_rows()
    path = tmp_path / "m.jsonl"
    path.write_bytes(render(rows).encode("utf-8"))
    table = read_mentions(str(path))
    assert table.column("mention_id").to_pylist() == ["m0", "m1", "m2"]
    assert [r for _, r in iter_jsonl(str(path))] == table.select(["text", "mention", "mention_id"]).to_pylist()
    if case == "u2028-in-strings":
        assert table.column("text")[0].as_py().endswith(" \u2028 \u2029 \x85 x")


BAD_JSONL = [
    ("invalid-json", b'{"text": "a", "mention": "b"}\n{"text": \n',
     "invalid JSON on line 2 column 10: Expecting value"),
    ("not-utf8", b'{"text": "a", "mention": "b"}\n{"text": "caf\xe9", "mention": "b"}\n',
     "not valid UTF-8: byte 0xe9 at line 2"),
    ("duplicate-key", b'{"text": "a", "text": "b", "mention": "c"}\n',
     "invalid JSON on line 1: duplicate key 'text' in one object"),
    ("not-object", b'{"text": "a", "mention": "b"}\r\n\r\n[1, 2]\r\n', ("record line 3: expected a JSON object with "
     "'text' and 'mention'")),
    ("empty-mention", b'{"text": "a", "mention": " "}\n', ("record line 1: field 'mention': must be a non-empty "
     "string (got ' ')")),
    ("lone-surrogate", b'{"text": "a \\ud800", "mention": "b"}\n',
     "record line 1: field 'text': string holds an invalid Unicode escape (lone surrogate)"),
    ("duplicate-id", (b'{"text": "a", "mention": "b", "mention_id": "x"}\n\n{"text": "a", "mention": "b", '
     b'"mention_id": "x"}\n'), "record line 3: field 'mention_id': 'x' is not unique (also line 1)"),
    ("only-blank", b"\n \r\n\n", "no mentions"),
]


@pytest.mark.parametrize("case, data, message", BAD_JSONL, ids=[c for c, _, _ in BAD_JSONL])
def test_link_rejects_bad_jsonl_with_one_line(tmp_path, case, data, message):
    from mel_ray.link import read_mentions

    path = tmp_path / "m.jsonl"
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        read_mentions(str(path))
    assert str(err.value) == f"{path}: {message}"


def test_link_parquet_records_are_named_by_row(tmp_path):
    from mel_ray.link import read_mentions

    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a", "mention": "b"}, {"text": "a", "mention": ""}]), path)
    with pytest.raises(DataError) as err:
        read_mentions(str(path))
    assert str(err.value) == f"{path}: record row 1: field 'mention': must be a non-empty string (got '')"
    assert storage.exists(str(path))
