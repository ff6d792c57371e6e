"""Tiny offline CLIP / Stable Diffusion: loadable with the real classes, deterministic, idempotent; and
model resolution for local folders, hub ids and s3:// folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mel_ray import models, storage
from mel_ray.models import load_clip, resolve_model
from mel_ray.synthesize import load_pipeline
from mel_ray.tiny_models import MARKER, make_tiny_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # conftest sets it too; nothing here may touch the hub


def _hashes(root: Path, pattern: str = "*.safetensors") -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(pattern))}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny") / "models"
    return out, make_tiny_models(str(out), seed=0)


def test_layout(tiny):
    out, paths = tiny
    assert paths == {"clip": str(out / "clip"), "stable-diffusion": str(out / "stable-diffusion")}
    clip = Path(paths["clip"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
                 "processor_config.json", "preprocessor_config.json"):
        assert (clip / name).is_file(), name
    sd = Path(paths["stable-diffusion"])
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (sd / name).is_file(), name
    index = json.loads((sd / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert json.loads((out / MARKER).read_text())["seed"] == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary build folder left behind"


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    out, _ = tiny
    reference = _hashes(out)
    assert len(reference) == 4     # clip, unet, vae, text encoder
    make_tiny_models(str(tmp_path / "again"), seed=0)
    assert _hashes(tmp_path / "again") == reference
    assert _hashes(tmp_path / "again", "tokenizer.json") == _hashes(out, "tokenizer.json")
    make_tiny_models(str(tmp_path / "other"), seed=1)
    other = _hashes(tmp_path / "other")
    assert other.keys() == reference.keys()
    assert all(other[k] != reference[k] for k in reference)


def test_complete_models_are_not_rebuilt(tmp_path):
    out = tmp_path / "m"
    make_tiny_models(str(out), seed=0)
    before = _mtimes(out)
    make_tiny_models(str(out), seed=0)
    assert _mtimes(out) == before
    # a build killed before its marker was written is redone, leftovers and all
    (out / MARKER).unlink()
    (out / "clip" / "junk.bin").write_bytes(b"half written")
    make_tiny_models(str(out), seed=0)
    assert not (out / "clip" / "junk.bin").exists() and (out / MARKER).exists()
    # another seed replaces the models
    seed0 = _hashes(out)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_models(str(out), seed=5)
    assert torch.equal(torch.rand(3), expected), "building must not disturb the caller's RNG"
    assert json.loads((out / MARKER).read_text())["seed"] == 5
    assert _hashes(out) != seed0


def test_tokenizer_handles_any_text(tiny):
    from transformers import AutoTokenizer, CLIPTokenizer

    clip = Path(tiny[1]["clip"])
    tok = CLIPTokenizer.from_pretrained(str(clip))
    assert type(AutoTokenizer.from_pretrained(str(clip))) is type(tok)
    assert len(tok) < 2000 and tok.model_max_length == 77
    texts = ["John Murphy, the painter from Norway, poses for a portrait.",
             "Zoë Dvořák visited São Paulo — 東京タワー 🎉 (1843–1901) naïve café ÅÆØ",
             "instance of: human. occupation: painter. country of citizenship: Norway.",
             "   weird\tspacing\n\nand CAPITALS!!! ",
             ""]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        # unk is <|endoftext|> in CLIP: an unknown piece would show up as an inner eos
        assert tok.eos_token_id not in ids[1:-1] and tok.bos_token_id not in ids[1:]
        decoded = tok.decode(ids, skip_special_tokens=True)
        expected = unicodedata.normalize("NFC", text).lower()
        assert decoded.replace(" ", "") == "".join(expected.split())
    # learned merges keep MEL's 40-token budget for words, not bytes
    assert len(tok(texts[0])["input_ids"]) < 0.5 * len(texts[0])
    # truncation to the MEL text length
    long = tok([texts[2] * 5], padding="max_length", max_length=40, truncation=True, return_tensors="pt")
    assert long["input_ids"].shape == (1, 40)


def test_tokenizer_loads_from_plain_vocab_and_merges(tiny, tmp_path):
    from transformers import CLIPTokenizer

    clip = Path(tiny[1]["clip"])
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(clip / name, tmp_path / name)
    plain = CLIPTokenizer.from_pretrained(str(tmp_path))
    full = CLIPTokenizer.from_pretrained(str(clip))
    text = "Ålesund Cathedral, a Gothic architecture landmark built of granite, is lit up at night."
    assert plain(text)["input_ids"] == full(text)["input_ids"]
    assert (clip / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")


def test_clip_loads_and_encodes(tiny):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = load_clip(tiny[1]["clip"])
    assert isinstance(model, CLIPModel) and isinstance(processor, CLIPProcessor)
    assert not model.training
    texts = [f"John Murphy [SEP] instance of: human. occupation: painter number {i}" for i in range(8)]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)) for _ in range(8)]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding="max_length", max_length=40,
                       truncation=True)
    assert inputs["pixel_values"].shape == (8, 3, 32, 32)
    with torch.no_grad():
        out = model(**inputs)
    assert out.text_embeds.shape == out.image_embeds.shape == (8, 32)
    assert out.vision_model_output.last_hidden_state.shape == (8, 17, 32)   # 4x4 patches + CLS
    assert out.text_model_output.last_hidden_state.shape == (8, 40, 32)
    assert torch.isfinite(out.logits_per_image).all()
    # the 77-token prompts Stable Diffusion uses fit the position table too
    long = processor.tokenizer(["word " * 100], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt")
    with torch.no_grad():
        # transformers 5: get_*_features return an output object; the projection is in pooler_output
        assert model.get_text_features(**long).pooler_output.shape == (1, 32)
    half, _ = load_clip(tiny[1]["clip"], dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_stable_diffusion_generates_deterministically(tiny):
    from diffusers import StableDiffusionPipeline

    pipe = load_pipeline(tiny[1]["stable-diffusion"], scheduler="model")     # the one loader production uses
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    prompts = [f"An image of John Murphy: the painter number {i} poses for a portrait." for i in range(8)]

    def run(seed: int) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        images = pipe(prompts, num_inference_steps=4, guidance_scale=7.5,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images
        return images, time.perf_counter() - t0

    run(0)   # warm-up (first call allocates)
    first, seconds = run(0)
    second, _ = run(0)
    other, _ = run(1)
    assert first.shape == (8, 32, 32, 3)
    assert np.isfinite(first).all() and first.min() >= 0 and first.max() <= 1
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)
    assert first.std() > 0
    print(f"tiny SD: 8 images 32x32, 4 steps: {seconds:.3f}s")
    pil = pipe(prompts[:1], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.size == (32, 32)


def test_resolve_model_local_paths_and_hub_ids(tmp_path, monkeypatch):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model(f"file://{tmp_path}") == str(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/models/clip") == str(tmp_path / "models" / "clip")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    assert resolve_model("rel") == "rel"
    assert resolve_model("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    for load in (load_clip, load_pipeline):   # offline: the library's own error, no silent fallback
        with pytest.raises(OSError):
            load("mel-ray-tests/certainly-not-a-cached-model")


def test_models_on_s3_are_fetched_once_into_the_cache(tiny, s3_bucket, tmp_path, monkeypatch):
    root = f"{s3_bucket}/models"
    paths = make_tiny_models(root, seed=0)
    assert paths["clip"] == f"{root}/clip"
    assert storage.exists(f"{root}/{MARKER}")
    local_hashes = _hashes(tiny[0] / "clip")
    assert make_tiny_models(root, seed=0) == paths          # complete on S3: skipped

    cache = tmp_path / "cache"
    # a fetch killed half-way leaves a temporary folder that must never be used
    (cache / ".tmp-deadbeef").mkdir(parents=True)
    (cache / ".tmp-deadbeef" / "config.json").write_text("{")
    local = Path(resolve_model(paths["clip"], cache_dir=str(cache)))
    assert local.parent == cache and not local.name.startswith(".")
    assert _hashes(local) == local_hashes
    model, processor = load_clip(paths["clip"], cache_dir=str(cache))
    assert model.config.projection_dim == 32 and processor.tokenizer is not None

    def no_download(*args, **kwargs):
        raise AssertionError("already cached: must not download again")

    monkeypatch.setattr(storage, "download_dir", no_download)
    assert resolve_model(paths["clip"] + "/", cache_dir=str(cache)) == str(local)
    monkeypatch.undo()

    # a cache entry without its completion mark (older layout, manual copy) is fetched again
    (local / models.COMPLETE).unlink()
    (local / "model.safetensors").write_bytes(b"truncated")
    again = Path(resolve_model(paths["clip"], cache_dir=str(cache)))
    assert again == local and _hashes(again) == local_hashes
    pipe = load_pipeline(paths["stable-diffusion"], cache_dir=str(cache))
    assert pipe.unet.config.sample_size == 16
    with pytest.raises(FileNotFoundError):
        resolve_model(f"{s3_bucket}/nothing-here", cache_dir=str(cache))


def _in_hub_cache(model_id: str, folder: Path, commit: str) -> None:
    """Lay a model folder out as huggingface_hub's cache holds a downloaded snapshot of `main`."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + model_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_are_pinned_to_the_commit_their_revision_points_at(tiny):
    from mel_ray.errors import UsageError
    from mel_ray.features import model_fingerprint
    from mel_ray.synthesize import model_identity

    commit = hashlib.sha1(str(time.time_ns()).encode()).hexdigest()
    clip_id, sd_id = f"mel-ray-tests/clip-{commit[:8]}", f"mel-ray-tests/sd-{commit[:8]}"
    # offline (the session's HF_HUB_OFFLINE) and not cached: no key can name the weights, so refuse
    for stage_key in (models.pin_model, model_fingerprint, model_identity):
        with pytest.raises(UsageError, match=rf"{clip_id}: cannot tell which commit revision 'main' is"):
            stage_key(clip_id)
    _in_hub_cache(clip_id, tiny[0] / "clip", commit)
    _in_hub_cache(sd_id, tiny[0] / "stable-diffusion", commit)
    # the hub does not answer; the local cache knows what main was when it was downloaded
    assert models.pin_model(clip_id) == f"{clip_id}@{commit}"
    assert models.pin_model(f"{clip_id}@{commit}", revision="main") == f"{clip_id}@{commit}"
    assert models.pin_model(clip_id, revision=commit) == f"{clip_id}@{commit}"   # a commit needs no lookup
    assert model_fingerprint(clip_id) == model_fingerprint(f"{clip_id}@{commit}") == {"id": f"{clip_id}@{commit}"}
    assert model_identity(sd_id) == {"hub_id": sd_id, "revision": commit}
    with pytest.raises(UsageError, match="revision 'v2'"):
        models.pin_model(clip_id, revision="v2")
    assert models.pin_model(str(tiny[0] / "clip")) == str(tiny[0] / "clip")      # folders: by content instead
    # the pinned id loads that very snapshot through from_pretrained(id, revision=commit)
    assert models.pretrained_args(f"{clip_id}@{commit}") == (clip_id, {"revision": commit})
    pinned, _ = load_clip(f"{clip_id}@{commit}")
    local, _ = load_clip(str(tiny[0] / "clip"))
    assert all(torch.equal(a, b) for a, b in zip(pinned.state_dict().values(), local.state_dict().values()))
    assert load_pipeline(f"{sd_id}@{commit}").unet.config.sample_size == 16


def test_one_fingerprint_and_one_hash_cache_for_every_stage(tiny, tmp_path):
    """features and synthesize name a local model folder by models.model_fingerprint; its file hashes are
    cached once, in cache_dir/fingerprints.json, whichever stage asked first."""
    from mel_ray.config import SynthesizeConfig
    from mel_ray.features import model_fingerprint
    from mel_ray.synthesize import synthesis_settings

    cache = str(tmp_path / "cache")
    clip, sd = tiny[1]["clip"], tiny[1]["stable-diffusion"]
    assert model_fingerprint(clip, cache) == {"content": models.model_fingerprint(clip, cache)}
    settings = synthesis_settings(sd, SynthesizeConfig(num_gpus=0), cache)
    assert settings["model"] == {"fingerprint": models.model_fingerprint(sd, cache)}
    hashed = json.loads((tmp_path / "cache" / models.FINGERPRINTS).read_text())
    assert any(p.endswith("unet/diffusion_pytorch_model.safetensors") for p in hashed)
    assert any(p.endswith("clip/model.safetensors") or "/clip/" in p for p in hashed)
