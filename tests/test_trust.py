"""Issue 13, items 2, 3, 6 and 9 (the data side): no secret in any output, nothing outside a release or a
dataset read as its data, unsupported / malformed URIs and bad config values refused with ONE line.

Every case asserts the exact exit code and stderr line, like tests/test_ingest_bad_input.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

try:
    from tests.test_ingest import mimic_files, png, rows, write_tree
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from test_ingest import mimic_files, png, rows, write_tree

from mel_ray import cli, redact, storage, tracking
from mel_ray.config import load_config
from mel_ray.dataset import load_dataset
from mel_ray.errors import DataError, UsageError

SECRET = "S3cr3t-PASSWORD-42"
SLASHED = "wJalr/K7MDENG/bPxRfi?#EXAMPLE@KEY"   # AWS secret keys hold "/"; passwords may hold "?", "#", "@"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ingest_mimic(tmp_path: Path, capsys, name: str = "ds", files: dict | None = None) -> Path:
    src = write_tree(tmp_path / f"src-{name}", files or mimic_files())
    out = tmp_path / name
    code, _, err = run(capsys, "ingest", "--format", "mimic", "--input", str(src), "--output", str(out),
                       "--name", name)
    assert code == 0, err
    return out


# ---------------------------------------------------------------------------------------------- redaction


@pytest.mark.parametrize("raw, shown", [
    (f"http://alice:{SECRET}@mlflow.internal:5000/", "http://[redacted]@mlflow.internal:5000/"),
    (f"https://alice:{SECRET}@h/a?X-Amz-Signature={SECRET}&X-Amz-Date=1&token={SECRET}",
     "https://[redacted]@h/a?X-Amz-Signature=[redacted]&X-Amz-Date=1&token=[redacted]"),
    (f"postgresql://u:{SECRET}@db:5432/mlflow", "postgresql://[redacted]@db:5432/mlflow"),
    (f"API request to http://u:{SECRET}@127.0.0.1:9/api/2.0/x failed",
     "API request to http://[redacted]@127.0.0.1:9/api/2.0/x failed"),
    (f"http://h/?password={SECRET}#access_token={SECRET}", "http://h/?password=[redacted]#access_token=[redacted]"),
    (f"s3://u:{SECRET}@bucket/k", "s3://[redacted]@bucket/k"),
    (f"s3://AKIAEXAMPLE:{SLASHED}@mybucket/data", "s3://[redacted]@mybucket/data"),
    (f"http://alice:{SLASHED}@127.0.0.1:9/", "http://[redacted]@127.0.0.1:9/"),
    ("error: 'http://alice:pa/ss5LEAK@h:9/x' refused", "error: 'http://[redacted]@h:9/x' refused"),
    ("two: s3://k:a/b@b1/x and http://u:c/d@h/y.", "two: s3://[redacted]@b1/x and http://[redacted]@h/y."),
    ("s3://bucket/key?versionId=3", "s3://bucket/key?versionId=3"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("write to me@example.org", "write to me@example.org"),
])
def test_redact(raw, shown):
    assert redact.text(raw) == shown
    assert redact.text(shown) == shown   # idempotent


def test_excerpt_is_bounded_for_an_alias_bomb():
    bomb: list = ["x"]
    for _ in range(40):   # 2**40 leaves if expanded
        bomb = [bomb, bomb]
    assert len(redact.excerpt(bomb, 200)) <= 200


# ---------------------------------------------------------------------------------------------- URIs


@pytest.mark.parametrize("uri, line", [
    ("gs://bucket/ds", ("gs://bucket/ds: unsupported URI scheme 'gs' (use a local path, file:///path or "
                       "s3://bucket/prefix)")),
    ("S3://bucket/ds", ("S3://bucket/ds: unsupported URI scheme 'S3' (use a local path, file:///path or "
                       "s3://bucket/prefix)")),
    (f"https://u:{SECRET}@host/ds", ("https://[redacted]@host/ds: unsupported URI scheme 'https' (use a local "
                                    "path, file:///path or s3://bucket/prefix)")),
    ("s3:/bucket/ds", ("s3:/bucket/ds: malformed URI (expected s3://...; the project reads local paths, "
                      "file:///path and s3://bucket/prefix)")),
    ("s3://", "s3://: malformed s3:// URI: no bucket (expected s3://bucket/prefix)"),
    ("s3:///ds", "s3:///ds: malformed s3:// URI: no bucket (expected s3://bucket/prefix)"),
    (f"s3://u:{SECRET}@bucket/ds", ("s3://[redacted]@bucket/ds: malformed s3:// URI: credentials do not belong "
                                   "in the URI (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")),
    (f"s3://AKIAEXAMPLE:{SLASHED}@mybucket/data", ("s3://[redacted]@mybucket/data: malformed s3:// URI: credentials "
                                                  "do not belong in the URI (set AWS_ACCESS_KEY_ID / "
                                                  "AWS_SECRET_ACCESS_KEY)")),
    (f"https://u:{SLASHED}@host/ds", ("https://[redacted]@host/ds: unsupported URI scheme 'https' (use a local "
                                     "path, file:///path or s3://bucket/prefix)")),
    ("file://otherhost/ds", "file://otherhost/ds: malformed file:// URI (expected file:///absolute/path)"),
])
def test_unsupported_and_malformed_uris_are_refused(tmp_path, monkeypatch, capsys, uri, line):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "info", uri)
    assert (code, err.splitlines()) == (2, [f"error: {line}"])
    assert SECRET not in out + err and not any(part in out + err for part in SLASHED.split("/"))
    code, out, err = run(capsys, "make-demo-data", "--output", uri, "--entities", "3", "--mentions", "3")
    assert (code, err.splitlines()) == (2, [f"error: {line}"])
    assert list(tmp_path.iterdir()) == []     # nothing written under a folder named after the URI


def test_count_arguments_are_checked(capsys):
    cases = [(["evaluate", "--dataset", "d", "--checkpoint", "c", "--shards", "0"],
              "argument --shards: expected an integer >= 1, got 0"),
             (["link", "--top-k", "0"], "argument --top-k: expected an integer >= 1, got 0"),
             (["mine-negatives", "--dataset", "d", "--k", "true"],
              "argument --k: expected an integer >= 1, got 'true'"),
             (["synthesize", "--dataset", "d", "--views", "-1"], "argument --views: expected an integer >= 1, got -1"),
             (["synthesize", "--dataset", "d", "--limit", "0"], "argument --limit: expected an integer >= 1, got 0")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"mel-ray {argv[0]}: error: {message}"


# ---------------------------------------------------------------------------------------------- config


def _ingest_with(capsys, tmp_path, *extra: str) -> tuple[int, str]:
    code, _, err = run(capsys, "ingest", "--format", "mimic", "--input", str(tmp_path / "nope"),
                       "--output", str(tmp_path / "out"), *extra)
    return code, err


@pytest.mark.parametrize("setting, line", [
    ("negatives.k=true", "<defaults>: 'negatives.k': Value error, expected a number, got a boolean (got True)"),
    ("train.lr=false", "<defaults>: 'train.lr': Value error, expected a number, got a boolean (got False)"),
    ("tune.k=[2, true]", "<defaults>: 'tune.k': Value error, expected a number, got a boolean (got [2, True])"),
    ("negatives.k=0", "<defaults>: 'negatives.k': Input should be greater than or equal to 1 (got 0)"),
    ("synthesize.views=-2", "<defaults>: 'synthesize.views': Input should be greater than or equal to 1 (got -2)"),
    ("link.top_k=0", "<defaults>: 'link.top_k': Input should be greater than or equal to 1 (got 0)"),
    ("train.batch_size=0", "<defaults>: 'train.batch_size': Input should be greater than or equal to 1 (got 0)"),
    ("tune.k=[-1]", "<defaults>: 'tune.k.0': Input should be greater than or equal to 0 (got -1)"),
    ("train.lr=0", "<defaults>: 'train.lr': Input should be greater than 0 (got 0)"),
    ("model.hidden=0", "<defaults>: 'model.hidden': Input should be greater than or equal to 1 (got 0)"),
    ("train.lr=[1, 2", ("--set train.lr: value '[1, 2' is not valid YAML (expected ',' or ']', but got "
                       "'<stream end>'); quote it, e.g. --set 'tracking.experiment=\"a: b\"'")),
    ("=3", "--set '=3': expected KEY=VALUE with a dotted key, e.g. --set train.lr=1e-4"),
    ("train..lr=3", "--set 'train..lr=3': expected KEY=VALUE with a dotted key, e.g. --set train.lr=1e-4"),
])
def test_bad_config_values_get_one_line(tmp_path, capsys, setting, line):
    code, err = _ingest_with(capsys, tmp_path, "--set", setting)
    assert (code, err.splitlines()) == (2, [f"error: {line}"])


def test_config_error_shows_a_bounded_excerpt_of_an_alias_bomb(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    lines.append("data:\n  name: *a8")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    code, err = _ingest_with(capsys, tmp_path, "--config", str(path))
    assert code == 2
    assert len(err.splitlines()) == 1 + 9      # one line per offending key: a0..a8 unknown, then data.name
    assert max(len(x) for x in err.splitlines()) < 400
    name_line = next(x for x in err.splitlines() if "'data.name'" in x)
    prefix = f"error: {path}: 'data.name': Input should be a valid string (got "
    assert name_line.startswith(prefix + "[[[[...], [...], [...], [...], [...], [...], [...], [...], ...], [[...],")
    assert name_line.endswith("...)") and len(name_line) == len(prefix) + 200 + 1   # the value: 200 chars at most


def test_non_utf8_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  lr: 0.1\ndata:\n  name: caf\xe9\n".encode("latin-1"))
    code, err = _ingest_with(capsys, tmp_path, "--config", str(path))
    assert (code, err.splitlines()) == (2, [f"error: {path}: config is not valid UTF-8: byte 0xe9 at line 4"])


# ---------------------------------------------------------------------------------------------- ingest


def test_symlink_out_of_the_release_is_counted_missing_and_never_copied(tmp_path, capsys):
    secret = tmp_path / "outside" / "credentials"
    secret.parent.mkdir()
    secret.write_bytes(png((9, 9, 9)))     # even a valid image outside the release is not its data
    src = write_tree(tmp_path / "src", mimic_files())
    (src / "kb_image" / "Q76_0.png").unlink()
    (src / "kb_image" / "Q76_0.png").symlink_to(secret)
    (src / "mention_image" / "m10.jpg").unlink()
    (src / "mention_image" / "m10.jpg").symlink_to(src / "kb_image" / "Q6294_0.png")   # inside: allowed
    out = tmp_path / "ds"
    code, stdout, err = run(capsys, "ingest", "--format", "mimic", "--input", str(src), "--output", str(out))
    assert (code, err) == (0, "")
    assert stdout.splitlines() == [
        (f"ingested {out}: 3 entities, train/dev/test = 2/1/1 mentions, skipped 2 (answer_not_in_kb 1, "
        "nil_answer 1), images missing 3 (1 outside the release), undecodable 0")]
    assert not (out / "images" / "kb" / "Q76_0.png").exists()
    assert rows(out)[1]["image_uris"] == []
    assert (out / "images" / "mentions" / "m10.jpg").read_bytes() == png((4, 5, 6))
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["images"]["kb"]["outside_release"] == 1
    assert report["examples"]["image_outside_release"] == [
        "entity Q76: Q76_0.png (a link to a file outside the release)"]
    # referencing instead of copying refuses it too: the dataset never points at the outside file
    out2 = tmp_path / "ds-ref"
    code, _, _ = run(capsys, "ingest", "--format", "mimic", "--input", str(src), "--output", str(out2),
                     "--reference-images")
    assert code == 0
    assert rows(out2)[1]["image_uris"] == []
    assert str(secret) not in (out2 / "entities.parquet").read_bytes().decode("latin-1")


def test_image_folder_that_is_itself_a_symlink_is_fine(tmp_path, capsys):
    # inside the release only (issue 22): a link out of it is refused, tests/test_ingest_bad_input.py
    files = mimic_files()
    big = write_tree(tmp_path / "src" / "bigdisk", {k.removeprefix("kb_image/"): v for k, v in files.items()
                                                    if k.startswith("kb_image/")})
    src = write_tree(tmp_path / "src", {k: v for k, v in files.items() if not k.startswith("kb_image/")})
    (src / "kb_image").symlink_to(big, target_is_directory=True)
    out = tmp_path / "ds"
    code, stdout, _ = run(capsys, "ingest", "--format", "mimic", "--input", str(src), "--output", str(out))
    assert code == 0 and "images missing 2," in stdout
    assert rows(out)[1]["image_uris"] == ["images/kb/Q76_0.png"]


def test_dotdot_image_path_is_fatal(tmp_path, capsys):
    files = mimic_files()
    files["kb_entity.json"][0]["image_list"] = ["../../outside/credentials"]
    src = write_tree(tmp_path / "src", files)
    code, _, err = run(capsys, "ingest", "--format", "mimic", "--input", str(src), "--output", str(tmp_path / "o"))
    assert (code, err.splitlines()) == (2, [
        (f"error: {src}/kb_entity.json: record #0 (id 1): field 'image_list': image path "
        "'../../outside/credentials' escapes the image folder ('..')")])


def test_stale_tmp_files_of_a_killed_ingest_are_removed(tmp_path, capsys):
    out = tmp_path / "ds"
    stale = [out / "images" / "kb" / ".tmp-0123abcd-Q76_0.png", out / ".tmp-4567-entities.parquet"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    ingest_mimic(tmp_path, capsys)
    assert not any(p.exists() for p in stale)
    assert not [p for p in out.rglob(".tmp-*")]


def test_qid_with_inner_whitespace_matches_on_both_sides(tmp_path, capsys):
    files = mimic_files()
    files["kb_entity.json"][0]["qid"] = "Q76\u00a0 x"          # KB side: normalised to "Q76 x"
    files["qid2id.json"] = {"Q6294": 0, "Q76 x": 1, "Q1297": 2}
    files["WikiMEL_train.json"][0]["answer"] = " Q76\t\tx "      # answer side: the same normalisation
    files["WikiMEL_test.json"][0]["answer"] = "Q76  x"
    out = ingest_mimic(tmp_path, capsys, files=files)
    assert [m["qid"] for m in rows(out, "train")] == ["Q76 x", "Q6294"]
    assert [m["qid"] for m in rows(out, "test")] == ["Q76 x"]


# ---------------------------------------------------------------------------------------------- datasets


def test_relative_uri_outside_the_dataset_is_refused(tmp_path, capsys):
    out = ingest_mimic(tmp_path, capsys)
    ds = load_dataset(str(out))
    assert ds.resolve_uri("images/kb/Q76_0.png") == str(out / "images" / "kb" / "Q76_0.png")
    assert ds.resolve_uri("images/../images/kb/x.png") == str(out / "images" / "kb" / "x.png")
    assert ds.resolve_uri("/abs/x.png") == "/abs/x.png"        # --reference-images stores absolute paths
    for bad in ("../../x", "images/../../x", "./../x"):
        with pytest.raises(DataError) as exc:
            ds.resolve_uri(bad, file=ds.path("mentions/train.parquet"))
        assert exc.value.line() == (f"{out}/mentions/train.parquet: field 'image_uri': image URI {bad!r} resolves "
                                    f"outside the dataset root {out}")


# ---------------------------------------------------------------------------------------------- merge


def test_merge_refuses_an_output_that_is_an_input_under_any_spelling(tmp_path, monkeypatch, capsys):
    a = ingest_mimic(tmp_path, capsys, "a")
    files = mimic_files()
    b = ingest_mimic(tmp_path, capsys, "b", files)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link-to-a").symlink_to(a, target_is_directory=True)
    before = sorted(str(p) for p in a.rglob("*"))
    for spelling in ("a", "./a", "a/", "b/../a", str(a), f"file://{a}", "link-to-a"):
        code, _, err = run(capsys, "merge", "a", str(b), "--output", spelling)
        # the CLI runs the merge stage, which takes relative paths under the current directory first
        shown = spelling if "://" in spelling or spelling.startswith("/") else str(tmp_path / spelling)
        assert (code, err.splitlines()) == (2, [
            f"error: merge: output {shown} is also an input ({a}; both are {a}); write the merge somewhere else"])
    code, _, err = run(capsys, "merge", "a", "b", "--output", "a/images/merged")
    assert (code, err.splitlines()) == (2, [
        (f"error: merge: output {a}/images/merged and input {a} overlap (one folder holds the other: "
        f"{a}/images/merged, {a}); write the merge somewhere else")])
    assert sorted(str(p) for p in a.rglob("*")) == before
    assert run(capsys, "merge", "a", "b", "--output", "m")[0] == 0


# ---------------------------------------------------------------------------------------------- secrets


def test_unreachable_tracking_server_fails_fast_without_the_password(tmp_path, monkeypatch, capsys):
    import time

    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:pa/ss{SECRET}@127.0.0.1:{port}/")
    for key in tracking.HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    code, out, err = run(capsys, "link", "--model", "runs:/" + "0" * 32, "--kb", "kb", "--mentions", "m.jsonl",
                         "--output", "links")
    assert time.monotonic() - t0 < 60
    assert (code, err.splitlines()[-1:]) == (1, [
        ("error: MLflow tracking: not a valid URL (percent-encode / ? # @ in a user name or password, e.g. / as "
         "%2F) (after 2 retries; check tracking.mlflow_uri / MLFLOW_TRACKING_URI)")])
    assert SECRET not in out + err
    # the same through tracking.start_run (train, tune), with the config's URI
    with pytest.raises(tracking.TrackingError) as exc, \
            tracking.start_run("e", "r", f"http://bob:{SECRET}@127.0.0.1:{port}"):
        pass
    assert str(exc.value) == (f"MLflow tracking at http://[redacted]@127.0.0.1:{port}: connection refused (after "
                              "2 retries; check tracking.mlflow_uri / MLFLOW_TRACKING_URI)")


def test_password_in_tracking_uri_never_reaches_params_or_tags(mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = mlflow_server.replace("http://", f"http://alice:{SECRET}@")   # the test server ignores basic auth
    cfg = load_config(None, [f"tracking.mlflow_uri={uri}", f"data.dataset=s3://bucket/ds?X-Amz-Signature={SECRET}",
                             f"link.kb=s3://AKIA:{SLASHED}@bucket/r"])
    with tracking.start_run("trust", "r", uri, tags={"source": uri}) as run_:
        tracking.log_params_flat(cfg)
    run = MlflowClient(mlflow_server).get_run(run_.info.run_id)
    shown = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert SECRET not in shown and not any(part in shown for part in SLASHED.split("/"))
    assert run.data.params["link.kb"] == "s3://[redacted]@bucket/r"
    assert run.data.params["tracking.mlflow_uri"] == mlflow_server.replace("http://", "http://[redacted]@")
    assert run.data.tags["source"] == mlflow_server.replace("http://", "http://[redacted]@")


def test_s3_endpoint_with_userinfo_works_and_is_never_shown(s3_server, s3_bucket, monkeypatch, capsys):
    endpoint = s3_server.url.replace("http://", f"http://user:{SECRET}@")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    storage.write_bytes(f"{s3_bucket}/x.txt", b"hi")      # userinfo dropped: S3 credentials are AWS_* only
    assert storage.read_bytes(f"{s3_bucket}/x.txt") == b"hi"
    code, out, err = run(capsys, "info", f"{s3_bucket}/nothing-here")
    assert code == 2 and SECRET not in out + err
    dead = f"http://user:{SLASHED}@127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 1)
    code, out, err = run(capsys, "info", f"{s3_bucket}/ds")
    assert code == 1 and len(err.splitlines()) == 1 and SECRET not in out + err
    assert not any(part in out + err for part in SLASHED.split("/"))
    assert err.startswith(f"error: {s3_bucket}/ds/manifest.json: could not check existence:")


def test_usage_error_lines_are_redacted_even_when_raised_elsewhere(capsys):
    def boom(_argv):
        raise UsageError(f"cannot reach http://u:{SECRET}@host/x")
    assert cli.run_guarded(boom, []) == 2
    assert capsys.readouterr().err == "error: cannot reach http://[redacted]@host/x\n"
