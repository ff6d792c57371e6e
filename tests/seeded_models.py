"""A copy of the small release with its CLIP features, and a seeded, untrained MELModel exported as a model.pt
that fits them: where tests of evaluate, link and bad checkpoints start (a real model, no training needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from mel_ray.checkpoints import export_model
from mel_ray.config import FeaturesConfig
from mel_ray.feature_store import model_dims_from, read_manifest
from mel_ray.features import extract_features
from mel_ray.model import MELModel, ModelDims


def copy_with_features(small_data, root: Path, **extract) -> tuple[str, str]:
    """(dataset path, features URI): a private copy of the small release and its features (local engine, CPU)."""
    ds = small_data.copy(root)
    features = extract_features(ds, small_data.models["clip"], FeaturesConfig(num_gpus=0), engine="local",
                                quiet=True, **extract)["uri"]
    return ds, features


def seeded_model(features: str, path: Path, *, seed: int = 0, config=None, **dims) -> tuple[MELModel, str]:
    """(model in eval mode, model.pt path): MELModel(seed) sized to `features`, `dims` overriding ModelDims."""
    sizes = ModelDims(**model_dims_from(read_manifest(features)), **dims)
    torch.manual_seed(seed)
    model = MELModel(sizes).eval()
    state = {"model": model.state_dict(), "dims": sizes.to_dict()}
    return model, str(export_model(state, config if config is not None else {"models": {}}, path))
