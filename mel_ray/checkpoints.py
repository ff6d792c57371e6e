"""Trained models on disk: the one reader (and the writer of the exported file) shared by train, evaluate and link.

Two files hold a model, both loadable with `torch.load(..., weights_only=True)`:

* `state.pt` in a Ray Train checkpoint folder (written by the training loop every epoch): model, optimizer,
  training state and `dims`; no config.
* `model.pt`, exported once training is done (logged to the MLflow run as an artifact): `state_dict`, `dims`
  and the resolved config, so it is all `mel-ray link` needs.

`load_checkpoint` takes either file, a folder holding one (model.pt first), or an MLflow run (`runs:/<id>` or
a bare 32-hex run id) whose model.pt artifact it downloads.

Everything it reads is validated on the driver before any actor gets it (`validate`): a file torch cannot load
(random bytes, truncated, a pickle `weights_only=True` refuses), something that is not a dict with the model's
weights and `dims`, dims that do not describe a model, weights whose names or shapes do not match the model the
dims describe, and weights that are NaN or infinite all raise a DataError naming the file and what was expected
(`mel-ray` prints it as one line, exit 2).
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

from mel_ray import storage
from mel_ray.errors import DataError, NonFiniteError, UsageError

CHECKPOINT_FILE = "state.pt"       # a Ray Train checkpoint folder's file
MODEL_FILE = "model.pt"            # the exported model


def is_run_id(source: str) -> bool:
    return source.startswith("runs:/") or (len(source) == 32 and all(c in "0123456789abcdef" for c in source))


def load_checkpoint(source: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """{'model': state_dict, 'dims': dict, 'config': dict or None} from model.pt / state.pt, a folder holding
    one (model.pt first: a Ray Train checkpoint folder has state.pt) or an MLflow run holding model.pt."""
    if is_run_id(source):
        from mlflow.tracking import MlflowClient

        run_id = source.removeprefix("runs:/").split("/")[0]
        with tempfile.TemporaryDirectory() as tmp:
            local = MlflowClient(tracking_uri).download_artifacts(run_id, MODEL_FILE, tmp)
            with open(local, "rb") as f:
                data = f.read()
        return validate(data, f"runs:/{run_id}/{MODEL_FILE}")
    else:
        uri = source
        if not uri.endswith(".pt"):
            exported = storage.join(uri, MODEL_FILE)
            uri = exported if storage.exists(exported) else storage.join(uri, CHECKPOINT_FILE)
        if source.endswith(".pt") and not storage.exists(uri):
            raise UsageError(f"{source}: no such file (expected an exported {MODEL_FILE} or a checkpoint's "
                             f"{CHECKPOINT_FILE})")
        if not storage.exists(uri):
            raise UsageError(f"{source}: no {MODEL_FILE} or {CHECKPOINT_FILE} there (give an exported model, a "
                             "checkpoint folder or an MLflow run id)")
        return validate(storage.read_bytes(uri), uri)


EXPECTED = "expected a dict with 'state_dict' (model.pt) or 'model' (state.pt) and 'dims'"


def _kind(value: Any) -> str:
    name = type(value).__name__
    return f"a {name}" if name[0].lower() not in "aeiou" else f"an {name}"


def validate(data: bytes, name: str) -> dict[str, Any]:
    """The {'model', 'dims', 'config'} of a model.pt / state.pt file's bytes, or a DataError naming `name`."""

    import torch

    if not data:
        raise DataError(name, f"not a mel-ray checkpoint: the file is empty ({EXPECTED})")
    try:
        with warnings.catch_warnings():         # torch warns about pickle protocols on stderr: one line only
            warnings.simplefilter("ignore")
            saved = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, KeyError... on bad files
        raise DataError(name, f"not a mel-ray checkpoint: {_load_failure(data, err)}") from None
    if not isinstance(saved, dict):
        raise DataError(name, f"not a mel-ray checkpoint: {EXPECTED}, got {_kind(saved)}")
    weights = saved.get("state_dict", saved.get("model"))
    if weights is None or "dims" not in saved:
        keys = ", ".join(repr(k) for k in list(saved)[:8]) or "none"
        raise DataError(name, f"not a mel-ray checkpoint: {EXPECTED}; its keys: {keys}")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise DataError(name, f"not a mel-ray checkpoint: its weights should be a dict of tensors, got {_kind(weights)}"
                        + ("" if not isinstance(weights, dict) else " holding other values"))
    config = saved.get("config")
    if config is not None and not isinstance(config, dict):
        raise DataError(name, f"not a mel-ray checkpoint: 'config' should be a dict (the resolved config), got "
                        f"{_kind(config)}")
    dims = saved["dims"]
    _check_weights(name, weights, dims)
    return {"model": weights, "dims": dims, "config": config}


def _load_failure(data: bytes, err: BaseException) -> str:
    """What torch.load's failure means, in a few words: a pickle that asks to run code, a damaged file, or no torch
    file. Read from the pickle's own opcodes, not torch's message (its wording changes and it advises
    weights_only=False, which is exactly what must never be done with such a file)."""
    callables = [name for name in pickled_callables(data) if not _torch_may_call(name)]
    if callables:
        more = f" and {len(callables) - 1} more" if len(callables) > 1 else ""
        return (f"it asks to run code when loaded ({callables[0][:120]}{more}): refused (model files are read as "
                "weights only: tensors, numbers, strings, lists and dicts; a pickle never runs)")
    if not data.startswith((b"PK\x03\x04", b"\x80\x02")):        # torch.save's zip / legacy pickle formats
        return f"not a file torch.save wrote ({EXPECTED})"
    return f"the file is damaged or truncated ({_torch_reason(err)})"


def _torch_may_call(name: str) -> bool:
    return name.startswith("torch.") or name in ("collections.OrderedDict", "_codecs.encode", "builtins.set",
                                                 "builtins.frozenset", "builtins.bytearray", "builtins.complex")


def pickled_callables(data: bytes, max_pickles: int = 8) -> list[str]:
    """The callables (module.name) that the pickles in `data` would call on load, read with pickletools without
    running anything: GLOBAL / INST / STACK_GLOBAL, the last with its strings followed through the memo. `data` is
    a torch zip (every *.pkl member) or a stream of pickles (torch's legacy format holds several in a row); a
    stream that stops parsing (truncated, not a pickle) yields what was read up to there."""
    import pickletools
    import zipfile

    streams = [data]
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                streams = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError):   # damaged zip: nothing to read
            return []
    names: list[str] = []
    for stream in streams:
        start = 0
        for _ in range(max_pickles):
            end = _callables_of_one_pickle(pickletools, stream, start, names)
            if end is None or end >= len(stream):
                break
            start = end
    return names


def _callables_of_one_pickle(pickletools: Any, stream: bytes, start: int, names: list[str]) -> int | None:
    """Append the callables of the pickle at `stream[start:]` to `names`; the offset after its STOP, or None."""
    memo: dict[int, Any] = {}
    pushed: list[Any] = []       # the values the opcodes pushed, enough to follow STACK_GLOBAL's two strings
    view = io.BytesIO(stream)
    view.seek(start)
    try:
        for op, arg, _pos in pickletools.genops(view):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(".".join(str(x) for x in pushed[-2:]))
            elif op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif op.name == "STOP":
                return view.tell()
            else:
                pushed.append(arg)
    except (ValueError, EOFError, IndexError, KeyError, UnicodeDecodeError):   # not (or no longer) a pickle
        return None
    return None


def _torch_reason(err: BaseException) -> str:
    """torch's own words for the failure, without its advice to load with weights_only=False."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not any(
        word in line for word in ("weights_only", "Weights only load failed", "Please file an issue",
                                  "Check the documentation", "trusted source"))]
    return _first_line(useful[0] if useful else type(err).__name__)


def _first_line(err: BaseException | str, limit: int = 160) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _check_weights(name: str, weights: dict, dims: Any) -> None:
    """dims describe a MELModel, the weights are exactly that model's (names and shapes), and all finite."""
    import dataclasses

    import torch

    from mel_ray.model import MELModel, ModelDims

    fields = {f.name for f in dataclasses.fields(ModelDims)}
    required = {f.name for f in dataclasses.fields(ModelDims)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(dims, dict):
        raise DataError(name, f"not a mel-ray checkpoint: 'dims' should be a dict of the model's sizes, got "
                        f"{_kind(dims)}")
    missing, unknown = sorted(required - set(dims)), sorted(set(dims) - fields)
    if missing or unknown:
        what = "; ".join(part for part in (missing and f"missing {', '.join(missing)}",
                                           unknown and f"unknown {', '.join(map(str, unknown))}") if part)
        raise DataError(name, f"not a mel-ray checkpoint: 'dims' does not describe a model ({what})")
    try:
        with torch.device("meta"):                 # shapes only: no memory, no initialisation
            expected = MELModel(ModelDims(**dims)).state_dict()
    except Exception as err:  # noqa: BLE001 - a size of the wrong type or sign fails inside torch
        raise DataError(name, f"not a mel-ray checkpoint: 'dims' does not describe a model ({_first_line(err)})") \
            from None
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = "; ".join(part for part in (missing and f"{len(missing)} missing (first: {missing[0]})",
                                           unexpected and f"{len(unexpected)} unexpected (first: {unexpected[0]})")
                         if part)
        raise DataError(name, f"weights do not match the model its 'dims' describe: {what}")
    for key, tensor in expected.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise DataError(name, f"weights do not match the model its 'dims' describe: {key} has shape "
                            f"{list(weights[key].shape)}, expected {list(tensor.shape)}")
    bad = [key for key, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteError(name, f"weights are not finite: {len(bad)} of {len(weights)} tensors hold NaN or inf "
                             f"(first: {bad[0]}); the model cannot be evaluated or used", rows=len(bad))


def build_model(state: dict):
    """The MELModel of a loaded checkpoint, in eval mode, reading CLIP features: a fine-tuned model's encoder is
    left out (its features come from `extract-features --checkpoint`, which `require_matching_features` checks)."""
    from mel_ray.model import MELModel, ModelDims

    dims = {**state["dims"], "encoder": "frozen", "encoder_config": None, "text_encoder_config": None,
            "text_encoder": None}
    model = MELModel(ModelDims(**dims))
    model.load_state_dict({k: v for k, v in state["model"].items() if not k.startswith("encoder.")})
    return model.eval()


def encoder_fingerprint_of(state: dict) -> str | None:
    """The fingerprint of a checkpoint's fine-tuned encoder (mel_ray.model.encoder), None for a frozen-mode one."""
    from mel_ray.model.encoder import encoder_state, fine_tuned_fingerprint, text_encoder_state

    if state["dims"].get("encoder", "frozen") != "finetune":
        return None
    return fine_tuned_fingerprint(encoder_state(state["model"]), text_encoder_state(state["model"]) or None)


def require_matching_features(state: dict, manifest: dict, features_uri: str, source: str) -> None:
    """A feature set must come from the checkpoint's own encoder: the base CLIP for a frozen-mode model, its
    fine-tuned CLIP (same fingerprint) for a finetune one. Anything else is refused with one line."""
    made_with = manifest.get("settings", {}).get("encoder_checkpoint")
    want = encoder_fingerprint_of(state)
    if made_with == want:
        require_fitting_widths(state, manifest, features_uri, source)
        return
    if want is None:
        raise UsageError(f"{features_uri}: made by a fine-tuned encoder, but {source} was trained on frozen CLIP "
                         "features (model.encoder=frozen); use a feature set extracted without --checkpoint")
    what = "the base CLIP" if made_with is None else "another fine-tuned encoder"
    raise UsageError(f"{features_uri}: made by {what}, not by the fine-tuned encoder of {source} "
                     f"(model.encoder=finetune); run `mel-ray extract-features --checkpoint {source}` and use that set")


def require_fitting_widths(state: dict, manifest: dict, features_uri: str, source: str) -> None:
    """The feature set's widths are the ones the checkpoint's matcher was built for: text widths differ when the
    set was made with another text encoder (models.text_encoder; e.g. BERT's 768 against CLIP's 512), image widths
    with another CLIP (models.clip). One line naming the setting, the set and the checkpoint."""
    from mel_ray.feature_store import model_dims_from

    try:
        have = model_dims_from(manifest)
    except (KeyError, IndexError, TypeError):
        return                          # no shapes to compare: require_features reports a damaged manifest
    want = {k: state["dims"].get(k) for k in have}
    for setting, names in (("models.text_encoder", ("text_global", "text_local")),
                           ("models.clip", ("image_global", "image_local"))):
        if any(have[n] != want[n] for n in names):
            made = manifest.get("text_encoder", {}).get("id") if setting == "models.text_encoder" else None
            by = (f"text encoder {made}" if made else "CLIP's text tower") if setting == "models.text_encoder" \
                else f"CLIP {manifest.get('model', {}).get('id', '?')}"
            raise UsageError(f"{features_uri}: its {'/'.join(names)} features are {have[names[0]]}/{have[names[1]]} "
                             f"wide (made with {by}), but {source} was trained on {want[names[0]]}/{want[names[1]]}"
                             f"-wide ones: {setting} differs; use features extracted with the {setting} the model "
                             "was trained with")


def export_model(state: dict, config, path: Path) -> Path:
    """The artifact users load later: state_dict + dims + the resolved config (a `Config` or its JSON dict)."""
    import torch

    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    torch.save({"state_dict": state["model"], "dims": state["dims"], "config": config}, path)
    return path
