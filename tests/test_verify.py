"""`mel-ray verify`: a clean tree passes; each kind of damage gives exactly one line and exit 2; the quick
start-up checks; one S3 tree through the moto server.

The tree (dataset + negatives k4 + procedural synthetic views + CLIP features) is built once per module,
without Ray (synthesize's actor pool is replaced by its own ViewGenerator called in-process, features run
with engine="local"), and copied for each damage case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mel_ray import storage
from mel_ray.cli import main
from mel_ray.config import IngestConfig
from mel_ray.demo_data import make_demo_data
from mel_ray.errors import DataError
from mel_ray.ingest import ingest
from mel_ray.negatives import mine_negatives
from mel_ray.tiny_models import make_tiny_models
from mel_ray.verify import (
    check_dataset_quick,
    check_features_quick,
    check_negatives_quick,
    check_synthetic_quick,
    raise_first,
    uri_problem,
    verify,
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> SimpleNamespace:
    import mel_ray.synthesize as synth
    from mel_ray.config import FeaturesConfig, SynthesizeConfig
    from mel_ray.features import extract_features

    root = tmp_path_factory.mktemp("verify")
    clip = make_tiny_models(str(root / "models"))["clip"]
    make_demo_data(str(root / "raw"), n_entities=24, n_mentions=30, seed=0)
    ds = str(root / "ds")
    ingest("mimic", str(root / "raw"), ds, name="v", options=IngestConfig())
    mine_negatives(ds, k=4, num_workers=0)
    mp = pytest.MonkeyPatch()
    mp.setattr(synth, "draw_views", lambda todo, plan, dataset_uri, **_:      # in-process, no Ray actors
               synth.ViewGenerator(**plan.generator_kwargs(dataset_uri, False))(todo))
    try:
        summary = synth.synthesize(ds, "procedural:demo", SynthesizeConfig(views=2, size=32, batch_size=16, num_gpus=0))
    finally:
        mp.undo()
    feats = extract_features(ds, clip, FeaturesConfig(text_length=8, num_gpus=0), synthetic_key=summary["key"],
                             micro_batch=4, shard_rows=8,
                             engine="local", quiet=True)
    return SimpleNamespace(ds=ds, synth_key=summary["key"], feat_key=feats["key"],
                           proj=feats["shapes"]["text_global"][0])


@pytest.fixture
def ds(tree, tmp_path) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(tree.ds, copy)
    return copy


def _run(path, *extra) -> tuple[int, list[str]]:
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["verify", str(path), *extra])
    return rc, out.getvalue().splitlines()


def _one(path, line: str, *extra) -> None:
    rc, lines = _run(path, *extra)
    assert (rc, lines) == (2, [line, f"1 problem in {path}"])


def _rewrite(path: Path, fn) -> None:
    table = pq.read_table(path)
    pq.write_table(fn(table), path, compression="zstd")


def _set(table: pa.Table, name: str, row: int, value) -> pa.Table:
    values = table.column(name).to_pylist()
    values[row] = value
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(name), pa.array(values, table.schema.field(name).type))


# --------------------------------------------------------------------------------------------- clean


def test_clean_tree_passes(tree):
    assert verify(tree.ds) == []
    assert verify(tree.ds, deep=True) == []
    rc, lines = _run(tree.ds)
    assert rc == 0 and len(lines) == 1
    assert lines[0].startswith(f"verified {tree.ds}: 24 entities, train/dev/test = ")
    assert lines[0].endswith("negatives k4, 1 synthetic key (58 views), 1 feature key (8 shards): no problems")
    assert check_dataset_quick(tree.ds) == []
    assert check_negatives_quick(tree.ds, 4) == []
    assert check_synthetic_quick(tree.ds, tree.synth_key) == []
    assert check_features_quick(f"{tree.ds}/features/{tree.feat_key}", tree.ds) == []


# ------------------------------------------------------------------------------------- damaged files


def test_truncated_parquet(ds):
    path = ds / "entities.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _one(ds, f"{path}: not a readable Parquet file: footer does not parse (truncated or not Parquet)")


def test_zero_byte_parquet(ds):
    (ds / "mentions" / "dev.parquet").write_bytes(b"")
    _one(ds, f"{ds}/mentions/dev.parquet: empty file (0 bytes), expected Parquet")


def test_missing_parquet(ds):
    (ds / "mentions" / "test.parquet").unlink()
    _one(ds, f"{ds}/mentions/test.parquet: missing (part of every dataset)")


def test_manifest_that_is_a_json_list(ds):
    (ds / "manifest.json").write_text("[1, 2]\n")
    _one(ds, f"{ds}/manifest.json: expected a JSON object, got a list")


def test_invalid_json(ds):
    (ds / "negatives" / "k4.manifest.json").write_text('{"k": 4,\n  oops}')
    _one(ds, f"{ds}/negatives/k4.manifest.json: invalid JSON: line 2 column 3: "
         "Expecting property name enclosed in double quotes")


def test_integer_longer_than_python_reads(ds):
    from mel_ray.dataset import load_dataset

    manifest = ds / "manifest.json"
    manifest.write_text(manifest.read_text().replace("{", '{"x": ' + "7" * 5000 + ",", 1))
    _one(ds, f"{ds}/manifest.json: invalid JSON: an integer of more than 4300 digits")
    with pytest.raises(DataError) as err:
        load_dataset(str(ds))
    assert str(err.value) == f"{ds}/manifest.json: invalid JSON: an integer of more than 4300 digits"


def test_not_utf8(ds):
    (ds / "ingest_report.json").write_bytes(b'{"format":\n "mim\xffic"}')
    _one(ds, f"{ds}/ingest_report.json: not UTF-8: byte 0xff at offset 16 (line 2)")


def test_missing_column(ds):
    _rewrite(ds / "entities.parquet", lambda t: t.drop_columns(["description"]))
    _one(ds, f"{ds}/entities.parquet: field 'description': column missing (expected string)")


def test_row_count_disagrees_with_manifest(ds):
    manifest = json.loads((ds / "manifest.json").read_text())
    n = manifest["counts"]["train"]
    manifest["counts"]["train"] = n + 1
    (ds / "manifest.json").write_text(json.dumps(manifest))
    _one(ds, f"{ds}/mentions/train.parquet: {n} rows but manifest.json counts.train says {n + 1}")


def test_gold_id_outside_the_kb(ds):
    _rewrite(ds / "mentions" / "dev.parquet", lambda t: _set(t, "entity_id", 1, 999))
    _one(ds, f"{ds}/mentions/dev.parquet: row 1: field 'entity_id': gold entity_id 999 outside the KB (0..23)")


def test_non_dense_entity_ids(ds):
    _rewrite(ds / "entities.parquet", lambda t: _set(t, "entity_id", 3, 7))
    _one(ds, f"{ds}/entities.parquet: row 3: field 'entity_id': entity_id 7 (ids must be dense 0..N-1 in row "
         "order: expected 3)")


def test_negatives_id_outside_the_kb(ds):
    path = ds / "negatives" / "k4.parquet"
    row = next(i for i, v in enumerate(pq.read_table(path).column("neg_entity_ids").to_pylist()) if v)

    def damage(t: pa.Table) -> pa.Table:
        ids = t.column("neg_entity_ids").to_pylist()
        ids[row] = [500, *ids[row][1:]]
        return t.set_column(1, t.schema.field(1), pa.array(ids, t.schema.field(1).type))

    _rewrite(path, damage)
    _one(ds, f"{path}: row {row}: field 'neg_entity_ids': negative entity_id 500 outside the KB (0..23)")


def test_feature_shard_with_a_wrong_shape(ds, tree):
    path = ds / "features" / tree.feat_key / "entities" / "part-00001.parquet"
    table = pq.read_table(path)
    i = table.schema.get_field_index("text_global")
    field = table.schema.field(i)
    col = table.column(i).combine_chunks()
    flat = col.values.slice(0, len(col) * (tree.proj // 2))
    wrong = pa.FixedSizeListArray.from_arrays(flat, tree.proj // 2)
    table = table.set_column(i, pa.field("text_global", wrong.type, nullable=False, metadata=field.metadata), wrong)
    pq.write_table(table, path)
    _one(ds, f"{path}: field 'text_global': type fixed_size_list<float16>[{tree.proj // 2}] (expected "
         f"fixed_size_list<float16>[{tree.proj}])")
    # the same line from the quick start-up check
    assert [p.line() for p in check_features_quick(str(ds / "features" / tree.feat_key), str(ds))] == [
        (f"{path}: field 'text_global': type fixed_size_list<float16>[{tree.proj // 2}] (expected "
        f"fixed_size_list<float16>[{tree.proj}])")]


def test_missing_synthetic_image(ds, tree):
    manifest = ds / "synthetic" / tree.synth_key / "manifest.parquet"
    uri = pq.read_table(manifest).column("uri")[5].as_py()
    (ds / uri).unlink()
    _one(ds, f"{manifest}: row 5: field 'uri': image {uri!r} does not exist")


def test_sha256_mismatch_with_deep(ds, tree):
    manifest = pq.read_table(ds / "synthetic" / tree.synth_key / "manifest.parquet")
    uri, want = manifest.column("uri")[2].as_py(), manifest.column("sha256")[2].as_py()
    other = manifest.column("uri")[3].as_py()
    shutil.copyfile(ds / other, ds / uri)
    got = manifest.column("sha256")[3].as_py()
    assert _run(ds)[0] == 0                          # the default level does not hash images
    _one(ds, f"{ds}/synthetic/{tree.synth_key}/manifest.parquet: row 2: field 'sha256': image {uri!r} has sha256 "
         f"{got[:12]}..., the manifest says {want[:12]}...", "--deep")


def _tensor_values(table: pa.Table, name: str, rows, value: float) -> pa.Table:
    i = table.schema.get_field_index(name)
    col = table.column(i).combine_chunks()
    values = col.values.to_numpy(zero_copy_only=False).copy().reshape(len(col), -1)
    values[rows, 0] = value
    flat = pa.array(values.reshape(-1), type=col.type.value_type)
    return table.set_column(i, table.schema.field(i), pa.FixedSizeListArray.from_arrays(flat, col.type.list_size))


def test_nan_and_inf_in_features_and_negative_scores(ds, tree):
    """issue 22: NaN / inf in feature shards and in the pool's scores passed `verify --deep` as "no problems".
    Each float column is checked; one line per column names how many rows hold any. The pool is read whole at the
    default level already, so its scores are checked there too; the feature values only with --deep."""
    entities = ds / "features" / tree.feat_key / "entities" / "part-00001.parquet"
    _rewrite(entities, lambda t: _tensor_values(_tensor_values(t, "text_global", slice(None), float("nan")),
                                                "image_local", [5], float("-inf")))
    mentions = ds / "features" / tree.feat_key / "mentions" / "train" / "part-00000.parquet"
    _rewrite(mentions, lambda t: _tensor_values(t, "synthetic_global", [2, 3], float("inf")))
    pool = ds / "negatives" / "k4.parquet"
    scores = pq.read_table(pool).column("neg_scores").to_pylist()
    row = next(i for i, v in enumerate(scores) if v)
    _rewrite(pool, lambda t: _set(t, "neg_scores", row, [float("nan")] * len(scores[row])))
    pool_line = f"{pool}: field 'neg_scores': 1 of 24 rows hold NaN or inf (first: row {row})"
    assert _run(ds) == (2, [pool_line, f"1 problem in {ds}"])
    assert _run(ds, "--deep") == (2, [
        pool_line,
        f"{entities}: field 'text_global': 8 of 8 rows hold NaN or inf (first: row 0)",
        f"{entities}: field 'image_local': 1 of 8 rows hold NaN or inf (first: row 5)",
        f"{mentions}: field 'synthetic_global': 2 of 8 rows hold NaN or inf (first: row 2)",
        f"4 problems in {ds}"])


def test_relative_image_uri_escaping_the_root(ds):
    _rewrite(ds / "mentions" / "test.parquet", lambda t: _set(t, "image_uri", 0, "../../etc/passwd"))
    _one(ds, f"{ds}/mentions/test.parquet: row 0: field 'image_uri': image URI '../../etc/passwd' resolves "
         "outside the dataset root")


def test_image_link_outside_the_root(ds, tmp_path):
    uri = next(u for us in pq.read_table(ds / "entities.parquet").column("image_uris").to_pylist() for u in us)
    secret = tmp_path / "secret.txt"
    secret.write_text("not an image")
    (ds / uri).unlink()
    (ds / uri).symlink_to(secret)
    rc, lines = _run(ds)
    assert rc == 2 and len(lines) == 2
    assert lines[0].startswith(f"{ds}/entities.parquet: row ")
    assert lines[0].endswith(f": field 'image_uris': image {uri!r} is a link to a file outside the dataset root")


def _link_out(ds: Path, rel: str, tmp_path: Path) -> Path:
    """Move DS/rel outside the dataset and leave a link to it: the same bytes, but no longer the dataset's."""
    target = tmp_path / "elsewhere" / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(ds / rel, target)
    (ds / rel).symlink_to(target, target_is_directory=target.is_dir())
    return target


@pytest.mark.parametrize("rel", ["mentions/test.parquet", "entities.parquet", "negatives/k4.parquet"])
def test_table_link_outside_the_root(ds, tmp_path, rel):
    target = _link_out(ds, rel, tmp_path)
    line = f"{ds}/{rel}: a link to a file outside the dataset root ({str(target)!r}): not read"
    _one(ds, line)
    quick = check_negatives_quick(str(ds), 4) if rel.startswith("negatives/") else check_dataset_quick(str(ds))
    assert [p.line() for p in quick] == [line]


def test_feature_shard_link_outside_its_folder(ds, tree, tmp_path):
    rel = f"features/{tree.feat_key}/mentions/train/part-00001.parquet"
    target = _link_out(ds, rel, tmp_path)
    _one(ds, f"{ds}/{rel}: a link to a file outside the dataset root ({str(target)!r}): not read")
    assert [p.line() for p in check_features_quick(str(ds / "features" / tree.feat_key), str(ds))] == [
        f"{ds}/{rel}: a link to a file outside the features folder ({str(target)!r}): not read"]


def test_image_folder_link_outside_the_root_is_not_followed(ds, tree, tmp_path):
    target = _link_out(ds, "images/kb", tmp_path)
    rc, lines = _run(ds)
    assert rc == 2 and len(lines) == 3
    assert lines[0] == f"{ds}/images/kb: a link to a folder outside the dataset root ({str(target)!r}): not followed"
    assert lines[1].startswith(f"{ds}/entities.parquet: row 0: field 'image_uris': image 'images/kb/")
    assert lines[1].endswith("is a link to a file outside the dataset root (and 31 more rows)")
    # synthetic views are images too
    synth = ds / "synthetic" / tree.synth_key
    view = next(p for p in synth.rglob("*.png"))
    view.unlink()
    view.symlink_to(next(target.rglob("*")))
    rc, lines = _run(ds)
    assert rc == 2 and len(lines) == 4
    assert lines[2].startswith(f"{synth}/manifest.parquet: row ")
    assert lines[2].endswith("is a link to a file outside the dataset root")


def test_links_inside_the_root_are_followed_and_loops_cut(ds, tmp_path):
    (ds / "images" / "kb").rename(ds / "images" / "kb-real")
    (ds / "images" / "kb").symlink_to("kb-real", target_is_directory=True)
    (ds / "images" / "kb-real" / "up").symlink_to("..", target_is_directory=True)
    (ds / "snapshot").symlink_to(ds, target_is_directory=True)
    rc, lines = _run(ds)
    assert rc == 0, lines


def test_link_loops_are_never_walked(ds):
    """Two links to their own folder make 2^40 paths for a walker that follows links, and a link to / the
    whole disk: verify reports the link out and ends at once (before: it did not)."""
    import subprocess
    import sys

    for name in ("a", "b"):
        (ds / "images" / name).symlink_to(".", target_is_directory=True)
    (ds / "images" / "root").symlink_to("/", target_is_directory=True)
    proc = subprocess.run([sys.executable, "-m", "mel_ray.cli", "verify", str(ds)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (proc.returncode, proc.stdout.splitlines(), proc.stderr) == (2, [
        f"{ds}/images/root: a link to a folder outside the dataset root ('/'): not followed",
        f"1 problem in {ds}"], "")


def test_many_bad_rows_give_one_line(ds):
    _rewrite(ds / "mentions" / "train.parquet",
             lambda t: t.set_column(t.schema.get_field_index("entity_id"), t.schema.field("entity_id"),
                                    pa.array([100 + i for i in range(t.num_rows)], pa.int64())))
    n = pq.read_metadata(ds / "mentions" / "train.parquet").num_rows
    _one(ds, f"{ds}/mentions/train.parquet: row 0: field 'entity_id': gold entity_id 100 outside the KB (0..23) "
         f"(and {n - 1} more rows)")


def test_stale_negatives_and_unfinished_runs(ds, tree):
    # entities rewritten (same content, other bytes): the pool and the features were made from other bytes
    _rewrite(ds / "entities.parquet", lambda t: t)
    (ds / "synthetic" / tree.synth_key / "complete.json").unlink()
    rc, lines = _run(ds)
    assert rc == 2
    assert lines == [
        (f"{ds}/negatives/k4.manifest.json: field 'entities_sha256': mined from another entities.parquet (its "
        "sha256 differs): stale, rerun mine-negatives"),
        f"{ds}/synthetic/{tree.synth_key}/complete.json: missing: an unfinished synthesize run (rerun it)",
        (f"{ds}/features/{tree.feat_key}/manifest.json: field 'inputs.dataset_tables_sha256.entities': made from "
        "another entities.parquet (its sha256 differs): stale, rerun extract-features"),
        f"3 problems in {ds}",
    ]


def test_not_a_dataset(tmp_path):
    _one(tmp_path / "nope", f"{tmp_path / 'nope'}: no such dataset folder")


# --------------------------------------------------------------------------------------- quick checks


def test_quick_checks_and_raise_first(ds):
    _rewrite(ds / "entities.parquet", lambda t: t.drop_columns(["qid"]))
    (ds / "mentions" / "dev.parquet").write_bytes(b"")
    problems = check_dataset_quick(str(ds))
    assert [p.line() for p in problems] == [
        f"{ds}/entities.parquet: field 'qid': column missing (expected string)",
        f"{ds}/mentions/dev.parquet: empty file (0 bytes), expected Parquet",
    ]
    with pytest.raises(DataError) as err:
        raise_first(problems, str(ds))
    assert str(err.value) == (f"{ds}/entities.parquet: field 'qid': column missing (expected string) (and 1 more "
                              f"problem: run `mel-ray verify {ds}`)")
    raise_first([])                                # nothing to raise
    (ds / "negatives" / "k4.parquet").write_bytes(b"PAR1")
    assert [p.line() for p in check_negatives_quick(str(ds), 4)] == [
        f"{ds}/negatives/k4.parquet: not a readable Parquet file: footer does not parse (truncated or not Parquet)"]
    assert [p.line() for p in check_negatives_quick(str(ds), 8)] == [
        (f"{ds}/negatives/k8.manifest.json: missing: an unfinished mine-negatives run (its Parquet is not usable; "
        "rerun it)")]


def test_uri_problem():
    assert uri_problem("images/kb/a.png") is None
    assert uri_problem("images/../images/a.png") is None
    assert uri_problem("/abs/a.png") is None and uri_problem("s3://b/a.png") is None
    assert uri_problem("images/../../a.png") == "image URI 'images/../../a.png' resolves outside the dataset root"
    assert uri_problem("..\\x.png") == "image URI '..\\\\x.png' resolves outside the dataset root"
    assert uri_problem("http://x/a.png").endswith("has an unsupported scheme (use a relative path, a local path "
                                                  "or s3://)")


# ------------------------------------------------------------------------------------------------ S3


def test_s3_tree(tree, s3_bucket):
    root = f"{s3_bucket}/ds"
    for rel in storage.list_files(tree.ds):
        storage.write_bytes(storage.join(root, rel), storage.read_bytes(storage.join(tree.ds, rel)))
    assert verify(root) == []
    assert check_dataset_quick(root) == []
    assert check_features_quick(f"{root}/features/{tree.feat_key}", root) == []
    shard = f"{root}/features/{tree.feat_key}/mentions/train/part-00001.parquet"
    storage.write_bytes(shard, storage.read_bytes(shard)[:100])
    storage.delete(f"{root}/negatives/k4.parquet")
    rc, lines = _run(root)
    assert (rc, lines) == (2, [
        f"{root}/negatives/k4.parquet: missing (listed by its manifest)",
        f"{shard}: not a readable Parquet file: footer does not parse (truncated or not Parquet)",
        f"2 problems in {root}",
    ])


def test_hostile_features_manifest(ds, tree):
    path = ds / "features" / tree.feat_key / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shapes"]["text_local"] = [1 << 20, 1 << 12]
    path.write_text(json.dumps(manifest))
    _one(ds, f"{path}: field 'shapes.text_local': shape [1048576, 4096] has 4294967296 values per row "
         "(at most 2^31 - 1)")
    manifest["tables"]["entities"] = {"rows": 3, "shards": "x", "columns": []}
    manifest["shapes"]["text_local"] = [8, 32]
    path.write_text(json.dumps(manifest))
    _one(ds, f"{path}: field 'tables.entities': expected an object with rows, shards and columns")
