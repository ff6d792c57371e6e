"""Trained models on disk: the one reader (and the writer of the exported file) shared by train, evaluate and link.

Two files hold a model, both loadable with `torch.load(..., weights_only=True)`:

* `state.pt` in a Ray Train checkpoint folder (written by the training loop every epoch): model, optimizer,
  training state and `dims`; no config.
* `model.pt`, exported once training is done (logged to the MLflow run as an artifact): `state_dict`, `dims`
  and the resolved config, so it is all `mel-ray link` needs.

`load_checkpoint` takes either file, a folder holding one (model.pt first), or an MLflow run (`runs:/<id>` or
a bare 32-hex run id) whose model.pt artifact it downloads.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

from mel_ray import storage
from mel_ray.errors import UsageError

CHECKPOINT_FILE = "state.pt"       # a Ray Train checkpoint folder's file
MODEL_FILE = "model.pt"            # the exported model


def is_run_id(source: str) -> bool:
    return source.startswith("runs:/") or (len(source) == 32 and all(c in "0123456789abcdef" for c in source))


def load_checkpoint(source: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """{'model': state_dict, 'dims': dict, 'config': dict or None} from model.pt / state.pt, a folder holding
    one (model.pt first: a Ray Train checkpoint folder has state.pt) or an MLflow run holding model.pt."""
    import torch

    if is_run_id(source):
        from mlflow.tracking import MlflowClient

        run_id = source.removeprefix("runs:/").split("/")[0]
        with tempfile.TemporaryDirectory() as tmp:
            local = MlflowClient(tracking_uri).download_artifacts(run_id, MODEL_FILE, tmp)
            saved = torch.load(local, weights_only=True)
    else:
        uri = source
        if not uri.endswith(".pt"):
            exported = storage.join(uri, MODEL_FILE)
            uri = exported if storage.exists(exported) else storage.join(uri, CHECKPOINT_FILE)
        if not storage.exists(uri):
            raise UsageError(f"{source}: no {MODEL_FILE} or {CHECKPOINT_FILE} there (give an exported model, a "
                             "checkpoint folder or an MLflow run id)")
        saved = torch.load(io.BytesIO(storage.read_bytes(uri)), weights_only=True)
    return {"model": saved.get("state_dict", saved.get("model")), "dims": saved["dims"],
            "config": saved.get("config")}


def build_model(state: dict):
    """The MELModel of a loaded checkpoint, in eval mode."""
    from mel_ray.model import MELModel, ModelDims

    model = MELModel(ModelDims(**state["dims"]))
    model.load_state_dict(state["model"])
    return model.eval()


def export_model(state: dict, config, path: Path) -> Path:
    """The artifact users load later: state_dict + dims + the resolved config (a `Config` or its JSON dict)."""
    import torch

    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    torch.save({"state_dict": state["model"], "dims": state["dims"], "config": config}, path)
    return path
