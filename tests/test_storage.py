"""mel_ray.storage against a local folder and a real S3-protocol server (moto on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest

from mel_ray import storage
from mel_ray.storage import StorageError


def _roundtrip(root: str) -> None:
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", None]})
    storage.write_bytes(storage.join(root, "raw", "one.bin"), b"\x00\x01payload")
    storage.write_json(storage.join(root, "meta.json"), {"k": [1, "é"]})
    storage.write_table(storage.join(root, "tables", "t.parquet"), table)
    storage.write_bytes(storage.join(root, "raw", "deep", "two.bin"), b"two")

    assert storage.read_bytes(storage.join(root, "raw", "one.bin")) == b"\x00\x01payload"
    assert storage.read_json(storage.join(root, "meta.json")) == {"k": [1, "é"]}
    assert storage.read_table(storage.join(root, "tables", "t.parquet")).equals(table)
    assert storage.read_table(storage.join(root, "tables", "t.parquet"), columns=["b"]).column_names == ["b"]
    assert storage.list_files(root) == ["meta.json", "raw/deep/two.bin", "raw/one.bin", "tables/t.parquet"]
    assert storage.list_files(storage.join(root, "raw"), recursive=False) == ["one.bin"]
    assert storage.list_files(storage.join(root, "nothing-here")) == []
    assert storage.exists(storage.join(root, "raw", "one.bin"))
    assert storage.exists(storage.join(root, "raw"))
    assert storage.is_dir(storage.join(root, "raw"))
    assert not storage.exists(storage.join(root, "raw", "missing.bin"))

    # overwrite replaces the whole object
    storage.write_bytes(storage.join(root, "raw", "one.bin"), b"new")
    assert storage.read_bytes(storage.join(root, "raw", "one.bin")) == b"new"

    storage.copy_file(storage.join(root, "raw", "one.bin"), storage.join(root, "copy", "one.bin"))
    assert storage.read_bytes(storage.join(root, "copy", "one.bin")) == b"new"

    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "raw", "missing.bin"))
    with pytest.raises(FileNotFoundError):
        storage.read_table(storage.join(root, "missing.parquet"))

    storage.delete(storage.join(root, "raw", "one.bin"))
    assert not storage.exists(storage.join(root, "raw", "one.bin"))
    storage.delete(storage.join(root, "raw", "one.bin"))  # missing_ok by default
    with pytest.raises(FileNotFoundError):
        storage.delete(storage.join(root, "raw", "one.bin"), missing_ok=False)
    storage.delete(storage.join(root, "copy"))             # a whole directory / prefix
    assert storage.list_files(root) == ["meta.json", "raw/deep/two.bin", "tables/t.parquet"]


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path / "root"))


def test_s3_roundtrip(s3_bucket, s3_client):
    _roundtrip(f"{s3_bucket}/prefix")
    bucket = s3_bucket[len("s3://"):]
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"])
    assert "prefix/tables/t.parquet" in keys  # really in the bucket, seen by another client
    body = s3_client.get_object(Bucket=bucket, Key="prefix/raw/deep/two.bin")["Body"].read()
    assert body == b"two"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_download_dir(where, tmp_path, request):
    root = str(tmp_path / "src") if where == "local" else request.getfixturevalue("s3_bucket") + "/model"
    storage.write_bytes(storage.join(root, "config.json"), b"{}")
    storage.write_bytes(storage.join(root, "sub", "weights.bin"), b"w" * 1000)
    target = storage.download_dir(root, tmp_path / "cache")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        "config.json", os.path.join("sub", "weights.bin")]
    assert (target / "sub" / "weights.bin").read_bytes() == b"w" * 1000


def test_local_paths_and_file_uris(tmp_path):
    storage.write_bytes(f"file://{tmp_path}/a.txt", b"a")
    assert (tmp_path / "a.txt").read_bytes() == b"a"
    fs, path = storage.resolve(tmp_path / "a.txt")
    assert fs.type_name == "local"
    assert path == str(tmp_path / "a.txt")
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/x")


_FAILING_WRITER = textwrap.dedent("""
    import resource, signal, sys
    from mel_ray import storage
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))   # the disk "fills up" after 4 KiB
    try:
        storage.write_bytes(sys.argv[1], b"x" * 1_000_000)
    except storage.StorageError as err:
        print("StorageError:", err)
        sys.exit(3)
    sys.exit(0)
""")


def test_local_write_failing_midway_leaves_nothing(tmp_path):
    """A writer whose disk fills up mid-file: the old file is intact and no partial/temp file shows."""
    target = tmp_path / "d" / "data.bin"
    storage.write_bytes(str(target), b"old")
    proc = subprocess.run([sys.executable, "-c", _FAILING_WRITER, str(target)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert str(target) in proc.stdout
    assert target.read_bytes() == b"old"
    assert storage.list_files(str(tmp_path / "d")) == ["data.bin"]
    leftovers = [p.name for p in (tmp_path / "d").iterdir() if p.name != "data.bin"]
    assert leftovers == [], f"write_bytes left temp files behind after a failed write: {leftovers}"


def test_list_files_hides_temp_files_of_killed_writers(tmp_path):
    """A writer killed by SIGKILL cannot clean up: its `.tmp-*` file must not look like data."""
    root = tmp_path / "d"
    storage.write_bytes(str(root / "a.bin"), b"a")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, sys, time
        from mel_ray import storage
        real_fsync = os.fsync
        def slow_fsync(fd):                 # stall mid-write, after the temp file has data
            print("writing", flush=True); time.sleep(60)
        os.fsync = slow_fsync
        storage.write_bytes(sys.argv[1], b"partial" * 1000)
    """), str(root / "b.bin")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert not (root / "b.bin").exists()
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # what a killed writer leaves
    assert storage.list_files(str(root)) == ["a.bin"]
    target = storage.download_dir(str(root), tmp_path / "copy")
    assert sorted(p.name for p in target.iterdir()) == ["a.bin"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_parquet", "missing_column"])
def test_damaged_parquet_is_one_data_error_naming_the_file(tmp_path, damage):
    """pyarrow reports these with ArrowInvalid (a ValueError, not an OSError): every reader of a table gets one
    line naming the file, never a traceback."""
    from mel_ray.errors import DataError

    path = tmp_path / f"{damage}.parquet"
    storage.write_table(str(path), pa.table({"text": ["a sentence"] * 50, "mention": ["x"] * 50}))
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "not_parquet": b'{"text": "json"}\n',
                      "missing_column": data}[damage])
    columns = ["image"] if damage == "missing_column" else None
    with pytest.raises(DataError) as err:
        storage.read_table(str(path), columns=columns)
    line = str(err.value)
    assert line.startswith(f"{path}: not a readable Parquet file: ") and "\n" not in line
    assert line.count(str(path)) == 1                      # pyarrow's own copy of the path is dropped
    if damage == "missing_column":
        assert line.endswith("no column 'image'")


def test_missing_bucket_is_a_clear_storage_error(s3_server, monkeypatch):
    secret = "Sup3rSecretKeyValue-do-not-print"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any credentials
    uri = "s3://no-such-bucket-mel-ray/x/data.bin"
    with pytest.raises(StorageError) as info:
        storage.write_bytes(uri, b"data")
    message = str(info.value)
    assert uri in message
    assert secret not in message and secret not in repr(info.value.__cause__)
    with pytest.raises((StorageError, FileNotFoundError)) as info:
        storage.read_bytes(uri)
    assert "no-such-bucket-mel-ray" in str(info.value) and secret not in str(info.value)


def _closed_port() -> int:
    with socket.socket() as sock:  # bound then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_within_bounded_time(monkeypatch):
    """Retries are bounded: a dead endpoint ends in a StorageError naming the URI, not a hang.

    With the default S3_MAX_ATTEMPTS (6) one call gives up after ~20 s; 2 attempts keep this test short
    while exercising the same retry strategy.
    """
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    monkeypatch.setattr(storage, "_S3_CACHE", {})
    actions = {
        "exists": lambda: storage.exists("s3://bucket/key"),
        "write_bytes": lambda: storage.write_bytes("s3://bucket/key", b"x"),
        "read_bytes": lambda: storage.read_bytes("s3://bucket/key"),
        "list_files": lambda: storage.list_files("s3://bucket/key"),
    }
    for name, action in actions.items():
        started = time.monotonic()
        with pytest.raises(StorageError, match="s3://bucket/key"):
            action()
        assert time.monotonic() - started < 15, f"{name}: retries must be bounded"
