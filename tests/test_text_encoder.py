"""models.text_encoder: a BERT-family text encoder instead of CLIP's text tower (issue 15, item 4).

On a text-only MELBench release (names and sentences; no images, no attributes) with the tiny BERT of
mel_ray.tiny_models.build_tiny_bert (hidden 24, where the tiny CLIP's text widths are 32): frozen features and a
frozen training run; a finetune run whose checkpoint holds the fine-tuned BERT, the feature set its
`extract-features --checkpoint` makes from it, and link's mention encoder; and the bad inputs, each one line
naming the setting. The tests that run Ray Train (one frozen run, one finetune run) are marked slow.

models.text_pooling (issue 23): the tiny BERT copied into a sentence-transformers folder by the test
(modules.json + 1_Pooling/config.json) is mean-pooled under "auto"; a plain BERT folder keeps [CLS] and its keys.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mel_ray.config import FeaturesConfig, IngestConfig, load_config
from mel_ray.errors import UsageError
from mel_ray.features import extract_features
from mel_ray.models import DEFAULT_CACHE
from mel_ray.tiny_models import BERT_HIDDEN, HIDDEN

TEXT_LENGTH = 16
NAMES = ["Black River", "Red Heart", "Silent Storm", "Golden Garden", "Broken Mirror", "Iron Crown", "Crystal Wolf",
         "Velvet Harbor"]
CITIES = ["London", "Paris", "Berlin", "Rome", "Tokyo", "Oslo", "Madrid", "Toronto"]
# a global batch of 8 mentions on one worker, in-batch negatives, one epoch; tiny matcher
TRAIN = ["train.negatives=in_batch", "train.epochs=1", "train.batch_size=8", "train.num_workers=1",
         "train.cpus_per_worker=0.5", "train.lr=1e-3", "train.encoder_lr=1e-3", "train.eval_mention_batch=8",
         "train.eval_entity_chunk=8", "model.hidden=16", "tracking.experiment=text-encoder",
         f"features.text_length={TEXT_LENGTH}", "features.num_gpus=0"]


def melbench_release() -> dict:
    """32 samples of one mention each over 8 entities (19 / 3 / 10 train / dev / test by the sample-id hash)."""
    samples = {}
    for i in range(32):
        entity = NAMES[i % len(NAMES)]
        samples[f"s{i:02d}"] = {"id": f"s{i:02d}", "sentence": f"The {entity.split()[1].lower()} of "
                                f"{CITIES[i % len(CITIES)]} was in the city {i % 5} year",
                                "mentions": [entity.split()[1]], "entities": [entity],
                                "answer": [f"Q{100 + i % len(NAMES)}"]}
    return samples


@pytest.fixture(scope="module")
def melbench(tmp_path_factory) -> str:
    from mel_ray.dataset import SPLITS, load_dataset
    from mel_ray.ingest import ingest

    root = tmp_path_factory.mktemp("melbench")
    (root / "WikiMEL.json").write_text(json.dumps(melbench_release()), encoding="utf-8")
    ingest("melbench", str(root / "WikiMEL.json"), str(root / "ds"), name="melbench", options=IngestConfig())
    ds = load_dataset(str(root / "ds"))
    assert ds.num_entities == len(NAMES)
    assert all(ds.mentions(s).num_rows for s in SPLITS)
    assert not any(ds.entities().column("attributes").to_pylist()[i] for i in range(ds.num_entities))
    return str(root / "ds")


def bert_states(folder: str, texts: list[str], state_dict: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The BERT's own final states of `texts` ([CLS] state, every state), tokenised as the features are: the
    reference extract-features / ClipEncoder must match (float32)."""
    from mel_ray.features import tokenize
    from mel_ray.models import load_text_encoder

    model, tokenizer = load_text_encoder(folder)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    ids, mask = tokenize(tokenizer, texts, TEXT_LENGTH)
    with torch.no_grad():
        states = model(input_ids=torch.from_numpy(ids).long(),
                       attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    return states[:, 0], states


def entity_texts(ds_uri: str) -> list[str]:
    from mel_ray.dataset import load_dataset
    from mel_ray.features import entity_text

    entities = load_dataset(ds_uri).entities(columns=["name", "attributes"])
    return [entity_text(n, a) for n, a in zip(entities.column("name").to_pylist(),
                                              entities.column("attributes").to_pylist())]


def close_to_half(stored: np.ndarray, reference: np.ndarray) -> None:
    """Features are stored as float16: equal to the float32 reference up to its rounding (and batch GEMM bits)."""
    np.testing.assert_allclose(stored.astype(np.float32), reference, rtol=2e-3, atol=2e-3)


def sentence_folder(bert: str, folder: Path, modes: dict[str, bool] | None = None, pooling: bool = True) -> str:
    """A copy of the tiny BERT as sentence-transformers writes a model: modules.json (Transformer, then Pooling
    when `pooling`) and 1_Pooling/config.json with the given pooling_mode_* flags (default: mean only)."""
    shutil.copytree(bert, folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if pooling:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        flags = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                 "pooling_mode_mean_sqrt_len_tokens": False, **(modes or {})}
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": BERT_HIDDEN,
                                                                      **flags}))
    (folder / "modules.json").write_text(json.dumps(modules))
    return str(folder)


def masked_mean(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask.astype(np.float32)[..., None]
    return (states * weights).sum(axis=1) / weights.sum(axis=1)


# ------------------------------------------------------------------------------------------ no Ray


def test_finetune_encoder_starts_at_the_frozen_features(tiny_models, tiny_bert):
    """ClipEncoder with a text encoder: CLIP's text tower is left out, BERT's weights are the pretrained ones after
    load_pretrained, and t_G / T_L are exactly what extract-features' Encoder computes (the frozen features)."""
    from mel_ray.checkpoints import _check_weights
    from mel_ray.features import Encoder
    from mel_ray.features.inputs import tokenize
    from mel_ray.model import MELModel, ModelDims
    from mel_ray.model.encoder import clip_config_of, encoder_sizes, text_config_of
    from mel_ray.models import load_text_encoder

    clip, cache = tiny_models["clip"], DEFAULT_CACHE
    clip_config, text_config = clip_config_of(clip, cache), text_config_of(tiny_bert, cache)
    sizes = encoder_sizes(clip_config, text_config)
    assert (sizes["text_global"], sizes["text_local"], sizes["image_global"]) == (BERT_HIDDEN, BERT_HIDDEN, HIDDEN)
    dims = ModelDims(**sizes, hidden=16, encoder="finetune", encoder_config=clip_config,
                     text_encoder_config=text_config, text_encoder=tiny_bert)
    model = MELModel(dims)
    names = list(model.state_dict())
    assert not any(n.startswith(("encoder.clip.text_model.", "encoder.clip.text_projection")) for n in names)
    assert not any("pooler" in n for n in names)          # BERT's pooler is not read: it would get no gradient
    model.encoder.load_pretrained(clip, cache)
    pretrained, tokenizer = load_text_encoder(tiny_bert)
    for name, tensor in pretrained.state_dict().items():
        assert torch.equal(model.state_dict()[f"encoder.text_model.{name}"], tensor), name
    _check_weights("model.pt", model.state_dict(), dims.to_dict())      # a checkpoint of it validates

    ids, mask = tokenize(tokenizer, ["Iron Crown [SEP] the crown of Oslo", "Wolf [SEP] a city"], TEXT_LENGTH)
    threads = torch.get_num_threads()
    try:
        frozen = Encoder(clip, cache, None, False, (32, 32), TEXT_LENGTH, text_encoder=tiny_bert)
        feats = frozen.encode(ids.astype(np.int64), mask, np.zeros((2, 3, 32, 32), np.float32), 2)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        t_global, t_local = model.encoder.text(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
    assert feats["text_global"].shape == (2, BERT_HIDDEN) and feats["text_local"].shape == (2, TEXT_LENGTH, BERT_HIDDEN)
    close_to_half(feats["text_global"], t_global.numpy())
    close_to_half(feats["text_local"], t_local.numpy())


def test_bad_text_encoders_are_one_line(melbench, tiny_models, tiny_bert, tmp_path, capsys):
    """Each refused (before Ray, any model or actor starts) with one line naming the setting."""
    from mel_ray import cli

    clip = tiny_models["clip"]
    root = str(tmp_path / "f")
    with pytest.raises(UsageError, match=r"^models\.text_encoder=.*'clip' model, not a BERT-family text encoder"):
        extract_features(melbench, clip, FeaturesConfig(num_gpus=0), engine="local", quiet=True, features_root=root,
                         text_encoder=clip)
    with pytest.raises(UsageError, match=r"^models\.text_encoder=.*: features\.text_length 100 exceeds the 64 "):
        extract_features(melbench, clip, FeaturesConfig(num_gpus=0, text_length=100), engine="local", quiet=True,
                         features_root=root, text_encoder=tiny_bert)
    with pytest.raises(UsageError, match=r"^models\.text_encoder=.*: cannot read a model config there"):
        extract_features(melbench, clip, FeaturesConfig(num_gpus=0), engine="local", quiet=True, features_root=root,
                         text_encoder=str(tmp_path / "no-such-model"))
    # end-to-end training refuses it before Ray starts
    from mel_ray.train.run import train

    cfg = load_config(None, [*TRAIN, "model.encoder=finetune", f"models.clip={clip}", f"models.text_encoder={clip}"])
    with pytest.raises(UsageError, match=r"^models\.text_encoder=.*not a BERT-family text encoder"):
        train(cfg, melbench, storage_path=str(tmp_path / "runs"), run_name="x", tracking_dir=str(tmp_path))
    # the CLI: exit 2 and one line on stderr naming the setting
    code = cli.main(["--log-file", str(tmp_path / "log.txt"), "extract-features", "--dataset", melbench, "--model",
                     clip, "--no-synthetic", "--set", f"models.text_encoder={clip}", "--set", "features.num_gpus=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: models.text_encoder=") and "not a BERT-family" in err[-1], err


def test_text_pooling_is_what_the_folder_declares(tiny_bert, tmp_path):
    """auto: a sentence-transformers folder's Pooling module (mean -> mean, cls -> cls), else cls; an explicit
    setting wins; what mel-ray cannot compute, a damaged declaration or a pooling without a text encoder: one line
    naming the file or the setting."""
    from mel_ray.models import resolve_text_pooling

    mean = sentence_folder(tiny_bert, tmp_path / "mean")
    assert resolve_text_pooling(tiny_bert) == "cls"                    # a plain BERT folder: the paper's [CLS]
    assert resolve_text_pooling(mean) == "mean"
    assert resolve_text_pooling(mean, "cls") == "cls" and resolve_text_pooling(tiny_bert, "mean") == "mean"
    cls = sentence_folder(tiny_bert, tmp_path / "cls", {"pooling_mode_cls_token": True,
                                                         "pooling_mode_mean_tokens": False})
    assert resolve_text_pooling(cls) == "cls"
    assert resolve_text_pooling(sentence_folder(tiny_bert, tmp_path / "no-pooling", pooling=False)) == "cls"
    assert resolve_text_pooling(None) is None                           # CLIP's text tower
    maxed = sentence_folder(tiny_bert, tmp_path / "max", {"pooling_mode_max_tokens": True,
                                                           "pooling_mode_mean_tokens": False})
    with pytest.raises(UsageError, match=r"1_Pooling/config.json: declares pooling \['max'\], which mel-ray does "
                                         r"not compute; set models.text_pooling=cls or mean$"):
        resolve_text_pooling(maxed)
    assert resolve_text_pooling(maxed, "mean") == "mean"
    (Path(mean) / "1_Pooling" / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"1_Pooling/config.json: not readable JSON"):
        resolve_text_pooling(mean)
    with pytest.raises(UsageError, match=r"^models.text_pooling=mean applies to models.text_encoder only"):
        resolve_text_pooling(None, "mean")
    with pytest.raises(UsageError, match=r"models.text_pooling"):
        load_config(None, ["models.text_pooling=max"])


def test_mean_pooled_features_equal_the_finetune_modules_and_cls_keys_stay(melbench, tiny_models, tiny_bert,
                                                                          tmp_path):
    """A sentence-transformers folder declaring mean pooling: extract-features stores t_G = the attention-mask-
    weighted mean of the final states (not [CLS]), its manifest and key say so, and ClipEncoder (finetune) pools
    the same text to the same vector, also when its checkpoint encodes (extract-features --checkpoint), which
    refuses another pooling. A plain BERT folder: the key and settings of a [CLS] set, as before the setting."""
    from mel_ray.checkpoints import export_model
    from mel_ray.feature_store import load_features, read_manifest
    from mel_ray.features.inputs import tokenize
    from mel_ray.features.plan import features_key
    from mel_ray.model import MELModel, ModelDims
    from mel_ray.model.encoder import clip_config_of, encoder_sizes, text_config_of
    from mel_ray.models import load_text_tokenizer, resolve_text_pooling

    clip, cache = tiny_models["clip"], DEFAULT_CACHE
    st = sentence_folder(tiny_bert, tmp_path / "st")
    config = FeaturesConfig(num_gpus=0, text_length=TEXT_LENGTH)
    made = extract_features(melbench, clip, config, engine="local", quiet=True, features_root=str(tmp_path / "f"),
                            text_encoder=st)
    assert made["text_encoder"]["pooling"] == "mean" and made["settings"]["text_pooling"] == "mean"
    stored = load_features(made["uri"], "entities", columns=["text_global"])["text_global"]
    texts = entity_texts(melbench)
    cls_states, states = bert_states(st, texts)
    _, mask = tokenize(load_text_tokenizer(st), texts, TEXT_LENGTH)
    close_to_half(stored, masked_mean(states, mask))
    assert np.abs(stored.astype(np.float32) - cls_states).max() > 0.1        # not the [CLS] state

    # the finetune module (dims as train builds them) gives the same vector for the same text
    clip_config, text_config = clip_config_of(clip, cache), text_config_of(st, cache)
    dims = ModelDims(**encoder_sizes(clip_config, text_config), hidden=16, encoder="finetune",
                     encoder_config=clip_config, text_encoder_config=text_config, text_encoder=st,
                     text_pooling=resolve_text_pooling(st))
    model = MELModel(dims).eval()
    model.encoder.load_pretrained(clip, cache)
    ids, mask = tokenize(load_text_tokenizer(st), texts, TEXT_LENGTH)
    with torch.no_grad():
        t_global, _ = model.encoder.text(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
    close_to_half(stored, t_global.numpy())
    # ... and its checkpoint's extract-features --checkpoint pools so too; another pooling is one line
    checkpoint = export_model({"model": model.state_dict(), "dims": dims.to_dict()}, {"models": {}},
                              tmp_path / "model.pt")
    tuned = extract_features(melbench, clip, config, engine="local", quiet=True, features_root=str(tmp_path / "f"),
                             text_encoder=st, checkpoint=str(checkpoint))
    close_to_half(load_features(tuned["uri"], "entities", columns=["text_global"])["text_global"], t_global.numpy())
    assert read_manifest(tuned["uri"])["text_encoder"]["pooling"] == "mean"
    with pytest.raises(UsageError, match=r"fine-tuned with models.text_pooling=mean, but it resolves to cls here"):
        extract_features(melbench, clip, config, engine="local", quiet=True, features_root=str(tmp_path / "f"),
                         text_encoder=st, text_pooling="cls", checkpoint=str(checkpoint))

    # keys: cls (auto on a plain BERT folder, or explicit) is the key a [CLS] set always had; mean is another
    def key(encoder: str, pooling: str) -> str:
        return features_key(melbench, clip, text_length=TEXT_LENGTH, text_encoder=encoder, text_pooling=pooling)

    assert key(tiny_bert, "auto") == key(tiny_bert, "cls") != key(tiny_bert, "mean")
    assert key(st, "auto") == key(st, "mean") != key(st, "cls")


# ------------------------------------------------------------------------------- frozen: features, training


@pytest.fixture(scope="module")
def frozen(melbench, tiny_models, tiny_bert, ray_local, tmp_path_factory):
    from mel_ray.train.run import train

    clip = tiny_models["clip"]
    features = extract_features(melbench, clip, FeaturesConfig(num_gpus=0, text_length=TEXT_LENGTH), engine="local",
                                quiet=True, text_encoder=tiny_bert)
    root = tmp_path_factory.mktemp("frozen-run")
    cfg = load_config(None, [*TRAIN, f"models.clip={clip}", f"models.text_encoder={tiny_bert}"])
    result = train(cfg, melbench, features_uri=features["uri"], storage_path=str(root / "runs"), run_name="frozen",
                   tracking_dir=str(root))
    return features, result


@pytest.mark.slow
def test_frozen_features_are_berts_and_train(frozen, melbench, tiny_models, tiny_bert):
    from mel_ray.checkpoints import load_checkpoint
    from mel_ray.feature_store import load_features
    from mel_ray.features.plan import make_plan, model_fingerprint
    from mel_ray.verify import require_features

    features, result = frozen
    assert features["shapes"]["text_global"] == [BERT_HIDDEN]
    assert features["shapes"]["text_local"] == [TEXT_LENGTH, BERT_HIDDEN]
    assert features["shapes"]["image_global"] == [HIDDEN]               # images stay CLIP's
    assert features["settings"]["text_encoder"] == model_fingerprint(tiny_bert)
    assert features["text_encoder"] == {"id": tiny_bert, "fingerprint": model_fingerprint(tiny_bert), "pooling": "cls"}
    assert "text_pooling" not in features["settings"]                   # [CLS]: the key as before the setting
    require_features(features["uri"], melbench)                          # evaluation-ready
    # t_G = BERT's [CLS] final state, T_L = its final states, of MIMIC's entity text
    stored = load_features(features["uri"], "entities", columns=["text_global", "text_local"])
    cls, states = bert_states(tiny_bert, entity_texts(melbench))
    close_to_half(stored["text_global"], cls)
    close_to_half(stored["text_local"], states)
    # without a text encoder the plan is CLIP's as always: no text_encoder setting, CLIP's widths, another key
    plain = make_plan(melbench, tiny_models["clip"], synthetic_key=None, views=None, text_length=TEXT_LENGTH,
                      dtype=None, splits=(), micro_batch=32, shard_rows=1024, features_root=None,
                      cache_dir=DEFAULT_CACHE)
    assert "text_encoder" not in plain.settings and plain.shapes["text_global"] == [HIDDEN]
    assert plain.key != features["key"]

    assert [h["epoch"] for h in result["history"]] == [1] and "dev_MRR" in result["history"][0]
    state = load_checkpoint(result["checkpoint"])
    assert (state["dims"]["text_global"], state["dims"]["text_local"]) == (BERT_HIDDEN, BERT_HIDDEN)
    assert state["dims"]["encoder"] == "frozen"


@pytest.mark.slow
def test_frozen_mismatches_are_one_line(frozen, melbench, tiny_models, tmp_path):
    """A checkpoint trained on BERT features against CLIP-text features (other widths), and training on BERT
    features with models.text_encoder unset: one line each, naming the setting and the file."""
    from mel_ray.eval.evaluate import evaluate
    from mel_ray.feature_store import find_features
    from mel_ray.train.run import train

    features, result = frozen
    clip_text = extract_features(melbench, tiny_models["clip"], FeaturesConfig(num_gpus=0, text_length=TEXT_LENGTH),
                                 engine="local", quiet=True)
    # both sets now in the release: frozen training's finder takes the one its models.text_encoder names
    assert find_features(melbench, encoder=None, text_encoder_named=True) == features["uri"]
    assert find_features(melbench, encoder=None, text_encoder_named=False) == clip_text["uri"]
    with pytest.raises(UsageError) as err:
        evaluate(melbench, clip_text["uri"], result["checkpoint"], "test")
    line = str(err.value)
    assert "\n" not in line and line.startswith(clip_text["uri"]) and "models.text_encoder differs" in line, line
    assert f"are {HIDDEN}/{HIDDEN} wide" in line and f"{BERT_HIDDEN}/{BERT_HIDDEN}-wide" in line, line
    cfg = load_config(None, [*TRAIN, f"models.clip={tiny_models['clip']}"])
    with pytest.raises(UsageError, match=r"its texts were encoded by text encoder .*models\.text_encoder is unset"):
        train(cfg, melbench, features_uri=features["uri"], storage_path=str(tmp_path / "runs"), run_name="x",
              tracking_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------- finetune


@pytest.mark.slow
def test_finetune_trains_bert_and_extracts_with_it(melbench, tiny_models, tiny_bert, ray_local, tmp_path):
    from mel_ray.checkpoints import encoder_fingerprint_of, load_checkpoint
    from mel_ray.feature_store import load_features, read_manifest
    from mel_ray.link import MentionEncoder
    from mel_ray.model.encoder import encoder_state, text_encoder_state
    from mel_ray.models import load_text_encoder
    from mel_ray.train.run import train

    clip = tiny_models["clip"]
    cfg = load_config(None, [*TRAIN, "model.encoder=finetune", f"models.clip={clip}",
                             f"models.text_encoder={tiny_bert}"])
    result = train(cfg, melbench, storage_path=str(tmp_path / "runs"), run_name="finetune",
                   tracking_dir=str(tmp_path))
    assert [h["epoch"] for h in result["history"]] == [1] and "dev_MRR" in result["history"][0]
    state = load_checkpoint(result["checkpoint"])
    assert state["dims"]["text_encoder_config"]["model_type"] == "bert"
    assert state["dims"]["text_pooling"] == "cls"                       # a plain BERT folder: [CLS], as extracted
    assert (state["dims"]["text_global"], state["dims"]["text_local"]) == (BERT_HIDDEN, BERT_HIDDEN)
    assert not any(k.startswith("encoder.clip.text_model.") for k in state["model"])
    bert = text_encoder_state(state["model"])
    pretrained = load_text_encoder(tiny_bert)[0].state_dict()
    assert set(bert) == set(pretrained)
    changed = [k for k in bert if not torch.equal(bert[k], pretrained[k])]
    assert len(changed) > len(bert) // 2, changed                     # BERT trained with the matcher

    # train's extract-features --checkpoint: the fine-tuned BERT made the texts' features
    manifest = read_manifest(result["features_uri"])
    assert manifest["settings"]["encoder_checkpoint"] == encoder_fingerprint_of(state)
    assert manifest["shapes"]["text_local"] == [TEXT_LENGTH, BERT_HIDDEN]
    stored = load_features(result["features_uri"], "entities", columns=["text_global", "text_local"])
    cls, states = bert_states(tiny_bert, entity_texts(melbench), bert)
    close_to_half(stored["text_global"], cls)
    close_to_half(stored["text_local"], states)
    base_cls, _ = bert_states(tiny_bert, entity_texts(melbench))
    assert np.abs(stored["text_global"].astype(np.float32) - base_cls).max() > 1e-2      # not the pretrained one

    # link's mention encoder: the fine-tuned BERT too
    threads = torch.get_num_threads()
    try:
        encoder = MentionEncoder(clip, DEFAULT_CACHE, TEXT_LENGTH, False, 0, str(tmp_path / "links"), "",
                                 encoder_state(state["model"]), tiny_bert, bert)
        out = encoder({"mention_id": np.array(["m0"], dtype=object), "mention": np.array(["Crown"], dtype=object),
                       "text": np.array(["The crown of Oslo"], dtype=object), "image": np.array([None], dtype=object)})
    finally:
        torch.set_num_threads(threads)
    from mel_ray.features import mention_text

    close_to_half(out["text_global"], bert_states(tiny_bert, [mention_text("Crown", "The crown of Oslo")], bert)[0])

    # extract-features --checkpoint needs models.text_encoder to say which tokenizer and architecture: one line
    with pytest.raises(UsageError, match=r"a fine-tuned bert .* but models\.text_encoder is unset"):
        extract_features(melbench, clip, FeaturesConfig(num_gpus=0, text_length=TEXT_LENGTH), engine="local",
                         quiet=True, checkpoint=result["checkpoint"], features_root=str(tmp_path / "f"))
