"""The one feature-set finder (train, tune, the pipeline and link use it): the only complete set, or the one made
with a given CLIP; one message when there is none or several."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mel_ray.errors import UsageError
from mel_ray.feature_store import find_features
from mel_ray.features import model_fingerprint


def _model(folder: Path, weights: bytes) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return str(folder)


def _feature_set(dataset: Path, key: str, fingerprint: dict | None, complete: bool = True) -> None:
    folder = dataset / "features" / key
    (folder / "entities").mkdir(parents=True)
    (folder / "entities" / "part-00000.parquet").write_bytes(b"")
    if complete:                                 # the manifest is written last: without it a set is unfinished
        (folder / "manifest.json").write_text(json.dumps({"key": key, "model": {"fingerprint": fingerprint}}))


def test_the_only_complete_set_or_a_clear_error(tmp_path):
    ds = tmp_path / "ds"
    with pytest.raises(UsageError, match=r"no complete feature sets; run: mel-ray extract-features --dataset"):
        find_features(str(ds))
    _feature_set(ds, "aaa", None, complete=False)
    with pytest.raises(UsageError, match=r"no complete feature sets"):
        find_features(str(ds))
    _feature_set(ds, "bbb", None)
    assert find_features(str(ds)) == str(ds / "features" / "bbb")
    assert find_features(str(ds), "s3://b/elsewhere") == "s3://b/elsewhere"      # a given set is taken as is
    _feature_set(ds, "ccc", None)
    with pytest.raises(UsageError, match=r"2 complete feature sets \(bbb, ccc\); pass the one to use"):
        find_features(str(ds))


def _texts_by(dataset: Path, key: str, text_encoder: str | None) -> None:
    _feature_set(dataset, key, None)
    manifest = dataset / "features" / key / "manifest.json"
    settings = {"text_encoder": text_encoder} if text_encoder else {}
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "settings": settings}))


def test_frozen_training_prefers_the_sets_whose_texts_its_config_names(tmp_path):
    """A release with a CLIP-text set and a BERT-text set: models.text_encoder set / unset picks one (by the
    manifest, no model file read); with no set of the wanted kind the other stays a candidate, so training's
    require_text_encoder names the mismatch instead of "no feature sets"."""
    ds = tmp_path / "ds"
    _texts_by(ds, "clip-text", None)
    assert find_features(str(ds), encoder=None, text_encoder_named=True) == str(ds / "features" / "clip-text")
    _texts_by(ds, "bert-text", "fingerprint-of-a-bert")
    with pytest.raises(UsageError, match=r"2 complete feature sets \(bert-text, clip-text\)"):
        find_features(str(ds), encoder=None)                                       # no preference: ambiguous
    assert find_features(str(ds), encoder=None, text_encoder_named=True) == str(ds / "features" / "bert-text")
    assert find_features(str(ds), encoder=None, text_encoder_named=False) == str(ds / "features" / "clip-text")
    _texts_by(ds, "bert-text-2", "fingerprint-of-another-bert")
    with pytest.raises(UsageError, match=r"2 complete feature sets \(bert-text, bert-text-2\)"):
        find_features(str(ds), encoder=None, text_encoder_named=True)


def test_the_set_made_with_a_model(tmp_path):
    ds = tmp_path / "ds"
    clip_a, clip_b = _model(tmp_path / "a", b"weights a"), _model(tmp_path / "b", b"weights b")
    _feature_set(ds, "k1", model_fingerprint(clip_a))
    _feature_set(ds, "k2", model_fingerprint(clip_b))
    assert find_features(str(ds), model=clip_b) == str(ds / "features" / "k2")
    clip_c = _model(tmp_path / "c", b"weights c")
    with pytest.raises(UsageError, match=r"no complete feature sets made with .*c \(2 with other models\); "
                                         r"run: mel-ray extract-features --dataset .* --model .*c$"):
        find_features(str(ds), model=clip_c)
    _feature_set(ds, "k0", model_fingerprint(clip_b))                  # a second set made with b
    with pytest.raises(UsageError, match=r"2 complete feature sets made with .*\(k0, k2\)"):
        find_features(str(ds), model=clip_b)
    assert find_features(str(ds), model=clip_b, several="first") == str(ds / "features" / "k0")
