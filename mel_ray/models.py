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
import importlib.util
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from mel_ray import storage
from mel_ray.errors import UsageError

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


def load_diffusion(id_or_path: str, device: str = "cpu", dtype=None, cache_dir: str = DEFAULT_CACHE):
    """StableDiffusionPipeline on `device`, without the safety checker (it would black out synthetic views
    of ordinary mentions now and then, and costs a second CLIP), progress bars off."""
    from diffusers import StableDiffusionPipeline

    kwargs = {"safety_checker": None, "requires_safety_checker": False,
              # without accelerate diffusers warns and falls back anyway; say it up front
              "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    if dtype is not None:
        kwargs["torch_dtype"] = _torch_dtype(dtype)
    path, pinned = pretrained_args(id_or_path, cache_dir)
    pipe = StableDiffusionPipeline.from_pretrained(path, **pinned, **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
