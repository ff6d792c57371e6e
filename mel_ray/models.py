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


# ------------------------------------------------------------------------------ a BERT-family text encoder

TEXT_ENCODER_SETTING = "models.text_encoder"
# encoders whose AutoModel gives last_hidden_state [N, L, D] with the [CLS] (<s>) token's state at position 0
BERT_FAMILY = ("albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
               "megatron-bert", "modernbert", "mpnet", "roberta", "roberta-prelayernorm", "xlm-roberta",
               "xlm-roberta-xl")
# position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids): pad_token_id + 1
# of max_position_embeddings are never a token's position
_PADDING_OFFSET = ("camembert", "mpnet", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl")


def text_encoder_config(id_or_path: str, cache_dir: str = DEFAULT_CACHE):
    """The config of `models.text_encoder` (transformers' AutoConfig), refused with one line (UsageError naming the
    setting) when it cannot be read or is not a BERT-family encoder (BERT_FAMILY)."""
    from transformers import AutoConfig

    path, pinned = pretrained_args(id_or_path, cache_dir)
    try:
        config = AutoConfig.from_pretrained(path, **pinned)
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, KeyError ... all mean "no usable config there"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UsageError(f"{TEXT_ENCODER_SETTING}={id_or_path}: cannot read a model config there ({first})") from None
    kind = getattr(config, "model_type", None)
    if kind not in BERT_FAMILY or getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise UsageError(f"{TEXT_ENCODER_SETTING}={id_or_path}: its config.json describes a {kind!r} model, not a "
                         f"BERT-family text encoder (model_type one of {', '.join(BERT_FAMILY)}); leave "
                         f"{TEXT_ENCODER_SETTING} unset for CLIP's text tower")
    return config


def text_config_from_dict(config: dict):
    """A text encoder's config (as a finetune checkpoint's dims carry it, `config.to_dict()`) as a config object."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def text_positions(config) -> int:
    """How many tokens the text encoder takes: its max_position_embeddings, less RoBERTa's padding offset."""
    positions = int(config.max_position_embeddings)
    if config.model_type in _PADDING_OFFSET and config.pad_token_id is not None:
        positions -= int(config.pad_token_id) + 1
    return positions


def _no_pooler(config) -> dict:
    """AutoModel kwargs that leave out BERT's pooler (a dense + tanh over [CLS] that MEL does not read: unused
    parameters would get no gradient, which DDP refuses), for the models that have one."""
    import inspect

    from transformers import MODEL_MAPPING

    model_class = MODEL_MAPPING[type(config)]
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}


def text_model_from_config(config):
    """The text encoder built from its config (random weights; a checkpoint or load_text_encoder fills them)."""
    from transformers import AutoModel

    return AutoModel.from_config(config, **_no_pooler(config))


def load_text_encoder(id_or_path: str, device: str = "cpu", dtype=None, cache_dir: str = DEFAULT_CACHE):
    """(the BERT-family encoder of `models.text_encoder` in eval mode on `device`, without a pooler; its tokenizer)."""
    import logging as _logging

    from transformers import AutoModel

    config = text_encoder_config(id_or_path, cache_dir)
    path, pinned = pretrained_args(id_or_path, cache_dir)
    kwargs = {} if dtype is None else {"dtype": _torch_dtype(dtype)}
    quiet = _logging.getLogger("transformers.modeling_utils")
    level = quiet.level
    quiet.setLevel(_logging.ERROR)          # "pooler.* not used": left out on purpose
    try:
        model = AutoModel.from_pretrained(path, **pinned, **kwargs, **_no_pooler(config)).to(device).eval()
    finally:
        quiet.setLevel(level)
    return model, load_text_tokenizer(id_or_path, cache_dir)


def load_text_tokenizer(id_or_path: str, cache_dir: str = DEFAULT_CACHE):
    """The text encoder's own tokenizer (AutoTokenizer), refused with one line when the folder has none."""
    from transformers import AutoTokenizer

    path, pinned = pretrained_args(id_or_path, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(path, **pinned)
    except Exception as err:  # noqa: BLE001 - OSError, ValueError ... : no tokenizer files there
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UsageError(f"{TEXT_ENCODER_SETTING}={id_or_path}: cannot load its tokenizer ({first})") from None


# ----------------------------------------------------------------- how t_G is pooled (models.text_pooling)

TEXT_POOLING_SETTING = "models.text_pooling"
TEXT_POOLINGS = ("cls", "mean")
ST_MODULES = "modules.json"                     # a sentence-transformers folder's module list
ST_POOLING = "sentence_transformers.models.Pooling"
# sentence-transformers' Pooling config: which of its modes mel-ray computes the same way
_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                  "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def resolve_text_pooling(text_encoder: str | None, pooling: str = "auto", cache_dir: str = DEFAULT_CACHE) -> str | None:
    """How t_G is pooled from `text_encoder`'s final states: "cls" or "mean"; None without a text encoder (CLIP's
    text tower has its own pooled state). "auto": what the folder's sentence-transformers Pooling module declares
    (mean -> mean, cls -> cls), else cls (a plain BERT folder: the paper's [CLS], as before this setting existed).
    An explicit pooling without a text encoder, and a declared pooling mel-ray does not compute, are one line."""
    if not text_encoder:
        if pooling != "auto":
            raise UsageError(f"{TEXT_POOLING_SETTING}={pooling} applies to models.text_encoder only (CLIP's text "
                             f"tower has its own pooled state); set models.text_encoder or leave "
                             f"{TEXT_POOLING_SETTING}=auto")
        return None
    if pooling in TEXT_POOLINGS:
        return pooling
    if pooling != "auto":
        raise UsageError(f"{TEXT_POOLING_SETTING}={pooling!r}: expected auto, cls or mean")
    return declared_pooling(text_encoder, cache_dir) or "cls"


def declared_pooling(text_encoder: str, cache_dir: str = DEFAULT_CACHE) -> str | None:
    """The pooling a sentence-transformers folder declares (modules.json's Pooling module, its config.json), or
    None when the folder is not one (no modules.json, or no Pooling module in it)."""
    modules = _model_file(text_encoder, ST_MODULES, cache_dir)
    if modules is None:
        return None
    listed = _json_file(modules, text_encoder)
    entries = [m for m in listed if isinstance(m, dict) and m.get("type") == ST_POOLING] \
        if isinstance(listed, list) else None
    if entries is None:
        raise UsageError(f"{text_encoder}/{ST_MODULES}: not a list of sentence-transformers modules; set "
                         f"{TEXT_POOLING_SETTING}=cls or mean")
    if not entries:
        return None
    relative = f"{str(entries[0].get('path') or '').strip('/')}/config.json".lstrip("/")
    config_path = _model_file(text_encoder, relative, cache_dir)
    if config_path is None:
        raise UsageError(f"{text_encoder}/{relative}: missing, though {ST_MODULES} lists a Pooling module there; "
                         f"set {TEXT_POOLING_SETTING}=cls or mean")
    config = _json_file(config_path, text_encoder)
    modes = sorted({_POOLING_MODES.get(k, k) for k, v in (config.items() if isinstance(config, dict) else [])
                    if k.startswith("pooling_mode") and v is True})
    if len(modes) == 1 and modes[0] in TEXT_POOLINGS:
        return modes[0]
    raise UsageError(f"{text_encoder}/{relative}: declares pooling {modes or 'none'}, which mel-ray does not "
                     f"compute; set {TEXT_POOLING_SETTING}=cls or mean")


def _json_file(path: str, text_encoder: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"{path}: not readable JSON ({type(err).__name__}); {TEXT_POOLING_SETTING}=auto reads "
                         f"it from {text_encoder}; fix it or set {TEXT_POOLING_SETTING}=cls or mean") from None


def _model_file(id_or_path: str, relative: str, cache_dir: str) -> str | None:
    """A file of a model folder as a local path, None when the model has no such file. A hub id's file is asked of
    the hub at the pinned commit (or found in the local cache); an unreachable hub is one line, never a guess."""
    value = str(id_or_path)
    if not is_hub_id(value):
        path = Path(resolve_model(value, cache_dir)) / relative
        return str(path) if path.is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    model_id, _, revision = pin_model(value).partition("@")
    try:
        return hf_hub_download(model_id, relative, revision=revision, etag_timeout=HUB_TIMEOUT_S)
    except RemoteEntryNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - offline or refused: the local cache may still know
        hub_error = err
    cached = try_to_load_from_cache(model_id, relative, revision=revision)
    if isinstance(cached, str):
        return cached
    if cached is not None:                      # the cache records that the hub has no such file
        return None
    raise UsageError(f"{TEXT_POOLING_SETTING}=auto: cannot tell whether {model_id} declares a pooling: {relative} "
                     f"neither from the hub ({type(hub_error).__name__}) nor in the local Hugging Face cache; set "
                     f"{TEXT_POOLING_SETTING}=cls or mean")
