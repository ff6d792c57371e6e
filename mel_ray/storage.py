"""One code path for local folders and `s3://bucket/prefix` URIs.

Everything goes through pyarrow filesystems, so Ray Data, Parquet readers and our own writes agree on what
a URI means. S3 endpoint, region and credentials come from the standard AWS environment variables or config
files (`AWS_ENDPOINT_URL[_S3]`, `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, ...); they are never
logged, and every URI in an error message goes through `mel_ray.redact` (a `user:password@` in the endpoint is
dropped: S3 takes its credentials from the AWS variables, never from the URL).

URIs: a local path, `file:///absolute/path` or `s3://bucket/prefix`. Any other scheme (`https://`, `gs://`,
`S3://`, `s3a://`, ...) and malformed URIs (`s3:/bucket`, `s3://` without a bucket, credentials inside an
s3:// URI, a NUL byte) are refused with one line (`URIError`, a UsageError: exit code 2), never taken as a
local folder named after them. Writes are atomic: local files are written under a temporary name and
renamed; S3 objects are sent in one PUT of a finished buffer, so a killed writer never leaves a half object
behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mel_ray import redact
from mel_ray.errors import DataError, UsageError

# bounded retries with exponential backoff (AWS standard strategy) on transient errors
S3_MAX_ATTEMPTS = int(os.environ.get("MEL_RAY_S3_MAX_ATTEMPTS", "6"))


class StorageError(OSError):
    """An object-store or filesystem operation failed after retries; names the URI, never credentials."""


class NotAFileError(StorageError, IsADirectoryError):
    """read_bytes of a folder (or S3 prefix): the data contract counts an image URI that names one as missing."""


class URIError(UsageError, StorageError):
    """A URI the project cannot use: unsupported scheme or malformed (a UsageError first: exit code 2)."""


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# schemes users plausibly type; "<scheme>:/x" with one of these is a mistyped URI, not a local file name
_KNOWN_SCHEMES = {"s3", "s3a", "s3n", "file", "gs", "gcs", "http", "https", "hdfs", "abfs", "abfss", "az", "adl",
                  "wasb", "wasbs", "ftp", "sftp", "ssh", "hf", "oss", "r2", "minio"}
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def check_uri(uri: str | os.PathLike) -> str:
    """`uri` as a string if the project can use it (local path, file:///path, s3://bucket/...); else URIError."""
    uri = os.fspath(uri)
    shown = redact.uri(uri)
    if "\x00" in uri:
        raise URIError(f"{shown!r}: malformed URI (holds a NUL byte)")
    if is_s3(uri):
        bucket = uri[len("s3://"):].split("/", 1)[0]
        # a bucket name never holds ":" or "@": either one means "key:secret@" (the secret may hold "/")
        if "@" in bucket or ":" in bucket:
            raise URIError(f"{shown}: malformed s3:// URI: credentials do not belong in the URI "
                           "(set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        if not _BUCKET.match(bucket):
            what = "no bucket" if not bucket else f"bad bucket name {bucket!r}"
            raise URIError(f"{shown}: malformed s3:// URI: {what} (expected s3://bucket/prefix)")
        return uri
    match = _SCHEME.match(uri)
    if match is None:
        return uri
    scheme = match.group(1)
    rest = uri[match.end():]
    if rest.startswith("//"):
        if scheme == "file":
            if not rest.startswith("///") and not rest.startswith("//localhost/"):
                raise URIError(f"{shown}: malformed file:// URI (expected file:///absolute/path)")
            return uri
        raise URIError(f"{shown}: unsupported URI scheme {scheme!r} (use a local path, file:///path or "
                       "s3://bucket/prefix)")
    if scheme.lower() in _KNOWN_SCHEMES:
        raise URIError(f"{shown}: malformed URI (expected {scheme.lower()}://...; the project reads local paths, "
                       "file:///path and s3://bucket/prefix)")
    return uri


def _s3_settings() -> tuple:
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    if endpoint:
        endpoint = redact.strip_userinfo(endpoint)   # never sent or shown: S3 credentials are the AWS_* keys
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
    uri = check_uri(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    uri = uri.removeprefix("file://localhost").removeprefix("file://")
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def join(uri: str | os.PathLike, *parts: str) -> str:
    uri = check_uri(uri)   # before Path() turns "gs://b" into the local "gs:/b"
    if is_s3(uri) or uri.startswith("file://"):      # Path() would fold "file:///x" into "file:/x"
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def _wrap(uri: str, action: str, err: Exception) -> StorageError:
    return StorageError(redact.text(f"{uri}: could not {action}: {err}"))


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
            kind = fs.get_file_info(path).type
        except OSError:
            kind = None
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(uri) from err
        if kind == pafs.FileType.Directory:
            raise NotAFileError(redact.text(f"{uri}: could not read: a folder, not a file")) from err
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
    """The JSON document at `uri`; a file that is not UTF-8 JSON is a DataError naming it (one line, exit 2)."""
    return parse_json(read_bytes(uri), uri)


def parse_json(data: bytes, uri: str) -> Any:
    """`data` (the bytes of the file `uri`) as JSON; DataError with the file, line and column when it is not."""
    if not data:
        raise DataError(uri, "empty file (0 bytes), expected JSON")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(uri, f"not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} (line {line})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(uri, f"invalid JSON: line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise DataError(uri, "invalid JSON: nested too deeply") from None
    except ValueError:   # int() past sys.get_int_max_str_digits(): no field of ours holds such a number
        raise DataError(uri, f"invalid JSON: an integer of more than {sys.get_int_max_str_digits()} digits") from None


def read_json_object(uri: str, what: str = "") -> dict:
    """read_json for files that hold one JSON object (manifests, settings, reports)."""
    obj = read_json(uri)
    if not isinstance(obj, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
                type(None): "null"}.get(type(obj), type(obj).__name__)
        raise DataError(uri, f"expected a JSON object{f' ({what})' if what else ''}, got {kind}")
    return obj


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8"))


def write_table(uri: str, table: pa.Table, row_group_size: int | None = None) -> None:
    """Write a Parquet file atomically (buffered in memory, then one atomic write)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    write_bytes(uri, buf.getvalue())


def read_table(uri: str, columns: list[str] | None = None, memory_map: bool = False) -> pa.Table:
    """The Parquet file at `uri`; one that is truncated, not Parquet or lacks `columns` is a DataError naming it
    (pyarrow says so with ArrowInvalid, a ValueError, which would otherwise reach the user as a traceback)."""
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            return pq.read_table(path, columns=columns, memory_map=memory_map)
        return pq.read_table(path, columns=columns, filesystem=fs)
    except FileNotFoundError:
        raise
    except pa.ArrowInvalid as err:
        raise DataError(redact.uri(uri), f"not a readable Parquet file: {_arrow_reason(err)}") from None
    except OSError as err:
        raise _wrap(uri, "read Parquet", err) from err


def _arrow_reason(err: Exception) -> str:
    """pyarrow's message on one line, without its "Could not open Parquet input source '<path>': " prefix (the
    error names the file already) and without the schema dump it appends to a missing column."""
    reason = re.sub(r"^Could not open Parquet input source '[^']*': ", "", str(err)).strip()
    missing = re.match(r"No match for FieldRef\.Name\((.*?)\)", reason)
    if missing:
        return f"no column {missing.group(1)!r}"
    return reason.splitlines()[0] if reason else type(err).__name__


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


def remove_stale_tmp(uri: str) -> int:
    """Delete the `.tmp-*` files a killed local writer left under the folder `uri`; returns how many.

    Only for a folder this process is about to (re)write: another writer's live temporary file would go too.
    S3 writes leave no temporary objects, so this is a no-op there.
    """
    if is_s3(uri):
        return 0
    _fs, root = resolve(uri)
    removed = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(".tmp-"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
    return removed


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
