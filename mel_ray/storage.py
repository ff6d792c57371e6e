"""One code path for local folders and `s3://bucket/prefix` URIs.

Everything goes through pyarrow filesystems, so Ray Data, Parquet readers and our own writes agree on what
a URI means. S3 endpoint, region and credentials come from the standard AWS environment variables or config
files (`AWS_ENDPOINT_URL[_S3]`, `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, ...); they are never
logged. Writes are atomic: local files are written under a temporary name and renamed; S3 objects are sent
in one PUT of a finished buffer, so a killed writer never leaves a half object behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# bounded retries with exponential backoff (AWS standard strategy) on transient errors
S3_MAX_ATTEMPTS = int(os.environ.get("MEL_RAY_S3_MAX_ATTEMPTS", "6"))


class StorageError(OSError):
    """An object-store or filesystem operation failed after retries; names the URI, never credentials."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _s3_settings() -> tuple:
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    # credentials are part of the cache key only so that a change of identity is picked up
    return (endpoint, region, env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"),
            env.get("AWS_SESSION_TOKEN"), env.get("AWS_PROFILE"))


_S3_CACHE: dict[tuple, pafs.S3FileSystem] = {}


def s3_filesystem() -> pafs.S3FileSystem:
    key = _s3_settings()
    fs = _S3_CACHE.get(key)
    if fs is None:
        endpoint, region, access_key, secret_key, token, _profile = key
        kwargs: dict[str, Any] = {
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
            "region": region or "us-east-1",
            # one PUT per object instead of a multipart upload: atomic and cheaper for small files
            "allow_delayed_open": True,
        }
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["scheme"] = "http"
        if access_key and secret_key:
            kwargs.update(access_key=access_key, secret_key=secret_key, session_token=token)
        fs = pafs.S3FileSystem(**kwargs)
        _S3_CACHE[key] = fs
    return fs


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path or s3://bucket/prefix)")
    uri = uri.removeprefix("file://")
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def join(uri: str | os.PathLike, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def _wrap(uri: str, action: str, err: Exception) -> StorageError:
    return StorageError(f"{uri}: could not {action}: {err}")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise _wrap(uri, "check existence", err) from err


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
    except OSError as err:
        raise _wrap(uri, "stat", err) from err


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as err:
        raise _wrap(uri, "create directory", err) from err


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as err:
        try:
            missing = fs.get_file_info(path).type == pafs.FileType.NotFound
        except OSError:
            missing = False
        if missing:
            raise FileNotFoundError(uri) from err
        raise _wrap(uri, "read", err) from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old object/file or the complete new one, never a partial one."""
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as err:
        raise _wrap(uri, "write", err) from err


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8"))


def write_table(uri: str, table: pa.Table, row_group_size: int | None = None) -> None:
    """Write a Parquet file atomically (buffered in memory, then one atomic write)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    write_bytes(uri, buf.getvalue())


def read_table(uri: str, columns: list[str] | None = None, memory_map: bool = False) -> pa.Table:
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            return pq.read_table(path, columns=columns, memory_map=memory_map)
        return pq.read_table(path, columns=columns, filesystem=fs)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise _wrap(uri, "read Parquet", err) from err


def delete(uri: str, missing_ok: bool = True) -> None:
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
        elif not missing_ok:
            raise FileNotFoundError(uri)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise _wrap(uri, "delete", err) from err


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Relative paths of files under a directory URI, sorted."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as err:
        raise _wrap(uri, "list", err) from err
    prefix = path.rstrip("/") + "/"
    return sorted(i.path[len(prefix):] for i in infos
                  if i.type == pafs.FileType.File and not posixpath.basename(i.path).startswith(".tmp-"))


def copy_file(src: str, dst: str) -> None:
    write_bytes(dst, read_bytes(src))


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy every file under `uri` into `local_dir` (used to fetch model folders from s3:// to a cache)."""
    local_dir = Path(local_dir)
    for rel in list_files(uri):
        target = local_dir / rel
        if not target.exists():
            write_bytes(str(target), read_bytes(join(uri, rel)))
    return local_dir
