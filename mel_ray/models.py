"""Where pretrained models come from: a local folder, an `s3://` folder, or a Hugging Face hub id.

A hub id is pinned once, on the driver, to the commit its revision (default `main`) points at: `id@<commit>`.
Stage keys are computed from the pinned form and workers load exactly that commit, so a key neither changes
when the model gets cached nor mixes weights when `main` moves during a run.

Cluster nodes often cannot reach the hub, so a model folder can live next to the data on S3; it is fetched
once per node into a cache keyed by the URI. The fetch goes to a temporary folder that is renamed into
place only when complete, so a killed fetch is never mistaken for a model and concurrent workers on one
node do not corrupt each other's copy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from mel_ray import storage
from mel_ray.errors import UsageError
from mel_ray.keys import sha256_hex

log = logging.getLogger(__name__)

DEFAULT_CACHE = "~/.cache/mel-ray/models"
HUB_TIMEOUT_S = 10     # a cluster without internet often drops packets instead of refusing: do not hang
COMPLETE = ".mel-ray-complete"   # written inside the fetched folder before it is renamed into place


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", "file://")) or os.path.exists(value)


def is_hub_id(value: str) -> bool:
    return not (storage.is_s3(value) or _looks_like_path(value))


@functools.lru_cache(maxsize=64)
def hub_commit(model_id: str, revision: str = "main") -> str:
    """The commit `revision` of a hub model points at: asked of the hub, else found in the local Hugging Face
    cache (offline nodes). Neither -> a UsageError, never a guess. Asked once per process: every key and load
    of one run names the same commit, and the stages' repeated pins cost no further round trips."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import HfApi, snapshot_download

    try:
        return HfApi().model_info(model_id, revision=revision, timeout=HUB_TIMEOUT_S).sha
    except Exception as err:  # noqa: BLE001 - offline, unreachable or refused: the local cache may still know
        hub_error = err
    try:
        return Path(snapshot_download(model_id, revision=revision, local_files_only=True)).name
    except Exception as err:  # reported below, with the hub's answer
        raise UsageError(
            f"{model_id}: cannot tell which commit revision {revision!r} is: the hub gave none "
            f"({type(hub_error).__name__}) and the model is not in the local Hugging Face cache "
            f"({type(err).__name__}). Pass a 40-character commit as the revision, download the model first, "
            "or use a local or s3:// model folder") from err


def pin_model(id_or_path: str, revision: str | None = None) -> str:
    """A local or s3:// folder as given (its content is fingerprinted); a hub id as `id@<commit>`."""
    value = str(id_or_path)
    if not is_hub_id(value):
        return value
    model_id, _, given = value.partition("@")
    commit = hub_commit(model_id, given or revision or "main")      # an id@rev already given wins
    log.info("%s: pinned to commit %s", model_id, commit)
    return f"{model_id}@{commit}"


def pretrained_args(id_or_path: str, cache_dir: str = DEFAULT_CACHE) -> tuple[str, dict]:
    """(what to give from_pretrained, its extra kwargs): a folder path, or a hub id with its pinned revision."""
    value = resolve_model(id_or_path, cache_dir)
    if is_hub_id(value) and "@" in value:
        model_id, _, revision = value.partition("@")
        return model_id, {"revision": revision}
    return value, {}


def resolve_model(id_or_path: str, cache_dir: str = DEFAULT_CACHE) -> str:
    """A local folder as is; an s3:// folder fetched to `cache_dir` first; anything else is a hub id,
    returned unchanged for from_pretrained to resolve (offline, it fails with the library's own error)."""
    value = str(id_or_path)
    if storage.is_s3(value):
        return str(_fetch(value.rstrip("/"), Path(cache_dir).expanduser()))
    if _looks_like_path(value):
        return str(Path(value.removeprefix("file://")).expanduser())
    return value


def _fetch(uri: str, cache: Path) -> Path:
    dest = cache / hashlib.sha256(uri.encode("utf-8")).hexdigest()[:24]
    if (dest / COMPLETE).exists():
        return dest
    if not storage.list_files(uri):
        raise FileNotFoundError(f"{uri}: no model files there")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        storage.download_dir(uri, tmp)
        (tmp / COMPLETE).write_text(uri + "\n", encoding="utf-8")
        if dest.exists() and not (dest / COMPLETE).exists():
            shutil.rmtree(dest, ignore_errors=True)      # left by a fetch from an older, non-atomic layout
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / COMPLETE).exists():           # another worker's complete copy won the race: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -------------------------------------------------------------------------------------------- identity

FINGERPRINTS = "fingerprints.json"          # under the model cache: file hashes by (path, size, mtime)
_WEIGHTS = (".safetensors", ".bin")
_SMALL_FILES = (".json", ".txt", ".model")  # configs, tokenizer, processor
_HASHES: dict[str, dict[str, list]] = {}    # cache_dir -> the file-hash cache, loaded once per process


def _hash_cache(cache_dir: str) -> tuple[Path, dict[str, list]]:
    cache_file = Path(cache_dir).expanduser() / FINGERPRINTS
    if str(cache_file) not in _HASHES:
        try:
            _HASHES[str(cache_file)] = json.loads(cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            _HASHES[str(cache_file)] = {}
    return cache_file, _HASHES[str(cache_file)]


def file_sha256(path: str | Path, cache_dir: str = DEFAULT_CACHE) -> str:
    """sha256 of a file's bytes, cached by (real path, size, mtime) in memory and in `cache_dir`/fingerprints.json,
    so a model folder is read once per machine, not once per stage or process."""
    path = os.path.realpath(path)
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns]
    cache_file, cache = _hash_cache(cache_dir)
    hit = cache.get(path)
    if hit and hit[:2] == stamp:
        return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    cache[path] = [*stamp, h.hexdigest()]
    try:
        storage.write_json(str(cache_file), cache)
    except OSError:
        pass                                   # a read-only home only costs re-hashing next time
    return h.hexdigest()


def _loaded_files(root: Path) -> list[str]:
    """What from_pretrained reads from a folder, relative and in a fixed order. A diffusers pipeline
    (model_index.json): model_index.json, then every non-hidden file in its component folders. Any other
    model (transformers): its configs, tokenizer and processor files and its weights (*.safetensors if any,
    else *.bin); hub snapshots also hold TF/Flax weights that nothing here loads."""
    if (root / "model_index.json").is_file():
        rest = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
        return ["model_index.json"] + [r for r in rest
                                       if "/" in r and not any(part.startswith(".") for part in r.split("/"))]
    files = [f for f in storage.list_files(str(root)) if not os.path.basename(f).startswith(".")]
    weights = [f for f in files if f.endswith(".safetensors")] or [f for f in files if f.endswith(".bin")]
    if not weights:
        raise UsageError(f"{root}: no model weights (*.safetensors or *.bin)")
    return sorted([f for f in files if f.endswith(_SMALL_FILES)] + weights)


def folder_fingerprint(folder: str | Path, cache_dir: str = DEFAULT_CACHE) -> str:
    """sha256 over what from_pretrained loads from a local model folder, by content: a moved or copied model
    keeps its fingerprint, a rebuilt or fine-tuned one at the same path does not."""
    root = Path(folder)
    entries = [[rel, file_sha256(root / rel, cache_dir)] for rel in _loaded_files(root)]
    return sha256_hex(json.dumps(entries).encode("utf-8"))


def model_fingerprint(id_or_path: str, cache_dir: str = DEFAULT_CACHE) -> str:
    """THE identity of a model's weights, for every stage key: a hub id pinned as `id@<commit>` (pin_model),
    a local folder's content fingerprint, an s3:// folder's fingerprint after it is fetched to `cache_dir`
    (that copy is what the workers load)."""
    value = str(id_or_path)
    if is_hub_id(value):
        return pin_model(value)
    return folder_fingerprint(resolve_model(value, cache_dir), cache_dir)


def _torch_dtype(dtype):
    import torch

    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_clip(id_or_path: str, device: str = "cpu", dtype=None, cache_dir: str = DEFAULT_CACHE):
    """(CLIPModel in eval mode on `device`, CLIPProcessor with `.tokenizer` and `.image_processor`)."""
    from transformers import CLIPModel, CLIPProcessor

    path, pinned = pretrained_args(id_or_path, cache_dir)
    kwargs = {} if dtype is None else {"dtype": _torch_dtype(dtype)}
    model = CLIPModel.from_pretrained(path, **pinned, **kwargs).to(device).eval()
    return model, CLIPProcessor.from_pretrained(path, **pinned)
