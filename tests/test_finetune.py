"""End-to-end fine-tuning (model.encoder=finetune): CLIP's towers give the frozen features' numbers, a 2-worker
run that loses a worker mid-epoch resumes with the encoder's weights, its dev metrics are the exact full-KB ranks
of the re-encoded KB, and its own feature set serves evaluate while other encoders' sets are refused."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from killing import kill_when, train_workers

from mel_ray.checkpoints import export_model, load_checkpoint
from mel_ray.config import FeaturesConfig, load_config
from mel_ray.errors import UsageError
from mel_ray.model import MELModel, ModelDims
from mel_ray.model.encoder import ClipEncoder, clip_config_of, encoder_fingerprint, encoder_sizes, encoder_state
from mel_ray.scoring import metrics_from_ranks
from mel_ray.train import inputs as ft

# a global batch of 16 over 2 workers, in_batch negatives: the softmax covers the global batch (global_batch.py)
TRAIN = ["model.encoder=finetune", "train.negatives=in_batch", "train.epochs=2", "train.batch_size=16",
         "train.num_workers=2", "train.cpus_per_worker=0.5", "train.lr=1e-3", "train.encoder_lr=1e-3",
         "model.hidden=16", "tracking.experiment=ft", "train.max_failures=2"]


def _numpy_batch(table: pa.Table) -> dict:
    """A reference table as the numpy batch Ray Data hands decode_rows (object columns for bytes / lists)."""
    out = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        out[name] = np.array(values, dtype=np.int64) if name in ("gold", "entity_id") else \
            np.array(values + [None], dtype=object)[:-1]
    return out


def _encode_table(encoder, table: pa.Table, inputs: ft.FinetuneInputs) -> tuple[dict, dict | None, dict]:
    """decode_rows + to_tensors + the encoder, in this process (no Ray): the reference for Ray's path."""
    decode = inputs.decode_kwargs()
    rows, candidates = ft.to_tensors(ft.decode_rows(_numpy_batch(table), **decode), decode)
    with torch.no_grad():
        features = encoder({k: v for k, v in rows.items() if k not in ("gold", "entity_id")})
    return rows, candidates, features


def _inputs(dataset: str, clip: str, cache: str) -> ft.FinetuneInputs:
    from mel_ray.dataset import load_dataset

    n = load_dataset(dataset).num_entities
    return ft.build_inputs(dataset, clip, text_length=40, synthetic_key=None, views=None,
                           pools=[np.zeros(0, np.int64)] * n, pool_head=0, seed=0, cache_dir=cache)


def test_clip_encoder_gives_the_frozen_features(small_data, tmp_path):
    """The towers that train in finetune mode compute what extract-features stores (at its float16), from the
    same pixels: the two modes start from the same model. Rows without an image differ on purpose (all-zero
    pixels, as MIMIC, vs the paper's blank white)."""
    from mel_ray.features import extract_features, load_features

    ds = small_data.copy(tmp_path)
    clip = small_data.models["clip"]
    cache = str(tmp_path / "cache")
    stored = extract_features(ds, clip, FeaturesConfig(num_gpus=0), engine="local", quiet=True, cache_dir=cache)
    inputs = _inputs(ds, clip, cache)
    encoder = ClipEncoder(clip_config_of(clip, cache))
    encoder.load_pretrained(clip, cache)
    encoder.eval()
    for table, name in ((inputs.tables["kb"], "entities"), (inputs.tables["dev"], "mentions/dev")):
        _, _, features = _encode_table(encoder, table, inputs)
        frozen = load_features(stored["uri"], name)
        with_image = np.asarray(frozen["has_image"], dtype=bool)
        assert 0 < with_image.sum() < len(with_image) or name == "mentions/dev"
        for key in ("text_global", "text_local", "image_global", "image_local"):
            ours = features[key].numpy()
            theirs = frozen[key].astype(np.float32)
            rows = slice(None) if key.startswith("text") else with_image
            np.testing.assert_allclose(ours[rows], theirs[rows], rtol=2e-3, atol=2e-3, err_msg=f"{name} {key}")
        if (~with_image).any():                       # zero pixels, not white: the image features differ there
            assert not np.allclose(features["image_global"].numpy()[~with_image],
                                   frozen["image_global"][~with_image].astype(np.float32), atol=1e-2)


def test_synthetic_views_go_through_the_same_vision_tower(small_data, tmp_path):
    clip = small_data.models["clip"]
    encoder = ClipEncoder(clip_config_of(clip, str(tmp_path))).eval()
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    views = torch.randn(3, 2, 3, 32, 32)
    n_views = torch.tensor([2, 0, 1])
    batch = {"input_ids": torch.ones(3, 8, dtype=torch.long), "attention_mask": torch.ones(3, 8, dtype=torch.long),
             "pixels": pixels, "view_pixels": views, "n_views": n_views}
    with torch.no_grad():
        out = encoder(batch)
        direct = encoder.image(views.reshape(6, 3, 32, 32))[0].reshape(3, 2, -1)
    synthetic = out["synthetic_global"]
    torch.testing.assert_close(synthetic[0], direct[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(synthetic[2, 0], direct[2, 0], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(synthetic[1]) == 0 and torch.count_nonzero(synthetic[2, 1]) == 0   # unused slots


def test_encoder_learning_rate_is_its_own(small_data, tmp_path):
    from mel_ray.train.loop import make_optimizer

    clip = small_data.models["clip"]
    config = clip_config_of(clip, str(tmp_path))
    model = MELModel(ModelDims(**encoder_sizes(config), hidden=8, encoder="finetune", encoder_config=config))
    cfg = load_config(None, ["train.lr=1e-3", "train.encoder_lr=1e-5"]).train.model_dump()
    optimizer = make_optimizer(model, cfg)
    tower = {id(p) for p in model.encoder.parameters()}
    for group in optimizer.param_groups:
        kinds = {id(p) in tower for p in group["params"]}
        assert len(kinds) == 1
        assert group["lr"] == (1e-5 if kinds == {True} else 1e-3)
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert trained == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not model.encoder.clip.logit_scale.requires_grad        # CLIP's temperature is not part of MEL


# ------------------------------------------------------------------------------------------ a real run



@pytest.fixture(scope="module")
def finetuned(small_data, tmp_path_factory, ray_local):
    """A 2-worker finetune run whose one worker is SIGKILLed mid-way through epoch 2 (restarts from epoch 1's
    checkpoint and finishes)."""
    from mel_ray.train.run import train

    root = tmp_path_factory.mktemp("finetune")
    ds = small_data.copy(root)
    cfg = load_config(None, [*TRAIN, f"models.clip={small_data.models['clip']}",
                             f"models.cache_dir={root / 'cache'}"])
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=train(
        cfg, ds, storage_path=str(root / "runs"), run_name="ft", tracking_dir=str(root))))
    runner.start()
    snapshot = root / "runs" / "ft" / "checkpoint_manager_snapshot.json"
    kill_when(lambda: snapshot.exists() and "checkpoint_" in snapshot.read_text(),
              lambda: [w.pid for w in train_workers(os.environ["RAY_AUTH_TOKEN"])][:1],
              alive=runner.is_alive, timeout=600, poll=0.5, what="registered checkpoint")
    runner.join(timeout=900)
    assert not runner.is_alive()
    return root, ds, cfg, outcome["result"]


def _checkpoints(root: Path) -> dict[int, dict]:
    """Every checkpoint the run kept, by epoch."""
    out = {}
    for folder in sorted(p for p in (root / "runs" / "ft").glob("checkpoint_*") if p.is_dir()):
        saved = torch.load(folder / "state.pt", weights_only=True)
        out[saved["state"]["epoch"]] = {**saved, "folder": str(folder)}
    return out


def test_killed_finetune_worker_resumes_with_the_encoders_weights(finetuned, small_data):
    root, _, _, result = finetuned
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2]                    # epoch 1 was not trained again
    assert history[0]["restarts"] == 0 and history[1]["restarts"] == 1
    saved = _checkpoints(root)
    epoch1 = encoder_fingerprint(encoder_state(saved[1]["model"]))
    assert history[1]["restored_encoder_sha256"] == epoch1          # the restart loaded epoch 1's CLIP ...
    pretrained = ClipEncoder(saved[1]["dims"]["encoder_config"])
    pretrained.load_pretrained(small_data.models["clip"], str(root / "cache"))
    assert encoder_fingerprint(pretrained.clip.state_dict()) != epoch1   # ... which had moved off the pretrained one
    last = encoder_state(saved[2]["model"])
    assert encoder_fingerprint(last) != epoch1                       # and it trained on after the restart
    assert all(np.isfinite(h["dev_MRR"]) for h in history)


def test_dev_metrics_are_exact_ranks_of_the_re_encoded_kb(finetuned):
    """Epoch 2's dev metrics (2 ranks, each encoding half the KB, counts summed) equal one process encoding every
    entity and dev mention with epoch 2's weights and ranking the whole KB (stable sort: the tie policy)."""
    root, ds, cfg, result = finetuned
    saved = _checkpoints(root)[2]
    model = MELModel(ModelDims(**saved["dims"]))
    model.load_state_dict(saved["model"])
    model.eval()
    inputs = _inputs(ds, cfg.models.clip, cfg.models.cache_dir)
    _, _, kb = _encode_table(model.encoder, inputs.tables["kb"], inputs)
    dev_rows, _, dev = _encode_table(model.encoder, inputs.tables["dev"], inputs)
    with torch.no_grad(), model.on_features():
        scores = model(dev, kb)["overall"].numpy()
    order = np.argsort(-scores, axis=1, kind="stable")
    gold = dev_rows["gold"].numpy()
    ranks = np.array([1 + int(np.where(order[i] == gold[i])[0][0]) for i in range(len(gold))])
    expected = metrics_from_ranks(ranks)
    reported = result["history"][-1]
    for key, value in expected.items():
        assert reported[f"dev_{key}"] == pytest.approx(value, abs=1e-9), key


def test_fine_tuned_features_serve_evaluate_and_other_encoders_are_refused(finetuned, tmp_path):
    from mel_ray.eval.evaluate import evaluate
    from mel_ray.feature_store import read_manifest
    from mel_ray.features import extract_features

    _, ds, cfg, result = finetuned
    best = load_checkpoint(result["checkpoint"])
    manifest = read_manifest(result["features_uri"])
    assert manifest["settings"]["encoder_checkpoint"] == encoder_fingerprint(encoder_state(best["model"]))
    report = evaluate(ds, result["features_uri"], result["checkpoint"], "test", num_shards=2, cpus_per_shard=0.5)
    assert report["mentions"] > 0 and np.isfinite(report["metrics"]["MRR"])

    base = extract_features(ds, cfg.models.clip, FeaturesConfig(num_gpus=0), engine="local", quiet=True,
                            cache_dir=cfg.models.cache_dir)["uri"]
    with pytest.raises(UsageError, match="extract-features --checkpoint"):
        evaluate(ds, base, result["checkpoint"], "test")            # base CLIP features, fine-tuned model
    # the finder tells the two sets apart by encoder (frozen training, sweeps and evaluate's default look for theirs)
    from mel_ray.feature_store import find_features

    fingerprint = manifest["settings"]["encoder_checkpoint"]
    assert find_features(ds, encoder=None) == base
    assert find_features(ds, encoder=fingerprint) == result["features_uri"]
    with pytest.raises(UsageError, match="2 complete feature sets"):
        find_features(ds)
    with pytest.raises(UsageError, match=r"by the fine-tuned encoder .* \(2 by other encoders\).*--checkpoint"):
        find_features(ds, encoder="0" * 64)

    frozen = tmp_path / "frozen.pt"
    dims = ModelDims(**{**best["dims"], "encoder": "frozen", "encoder_config": None})
    export_model({"model": MELModel(dims).state_dict(), "dims": dims.to_dict()}, cfg, frozen)
    with pytest.raises(UsageError, match="trained on frozen CLIP features"):
        evaluate(ds, result["features_uri"], str(frozen), "test")    # fine-tuned features, frozen model
    with pytest.raises(UsageError, match="model.encoder=frozen"):
        extract_features(ds, cfg.models.clip, FeaturesConfig(num_gpus=0), engine="local", quiet=True,
                         cache_dir=cfg.models.cache_dir, checkpoint=str(frozen))


def test_a_release_without_images_trains_on_zero_pixels_and_says_so_once(small_data, tmp_path, caplog):
    from mel_ray.dataset import load_dataset, write_dataset
    from mel_ray.train.run import finetune_inputs

    source = load_dataset(small_data.dataset)
    entities = source.entities()
    entities = entities.set_column(entities.schema.get_field_index("image_uris"), "image_uris",
                                   pa.array([[] for _ in range(entities.num_rows)], pa.list_(pa.string())))
    mentions = {}
    for split in ("train", "dev", "test"):
        table = source.mentions(split)
        mentions[split] = table.set_column(table.schema.get_field_index("image_uri"), "image_uri",
                                           pa.nulls(table.num_rows, pa.string()))
    out = str(tmp_path / "text-only")
    write_dataset(out, name="text-only", source_format="test", entities=entities, mentions=mentions, report={})
    cfg = load_config(None, ["model.encoder=finetune", "train.negatives=in_batch",
                             f"models.clip={small_data.models['clip']}", f"models.cache_dir={tmp_path / 'c'}"])
    with caplog.at_level(logging.WARNING, logger="mel_ray.train.run"):
        inputs = finetune_inputs(cfg, out, None, None)
    lines = [r.getMessage() for r in caplog.records if "all-zero pixel" in r.getMessage()]
    assert len(lines) == 1 and out in lines[0]
    decode = inputs.decode_kwargs()
    batch = ft.decode_rows(_numpy_batch(inputs.tables["train"].slice(0, 4)), **decode)
    rows, _ = ft.to_tensors(batch, decode)
    assert torch.count_nonzero(rows["pixels"]) == 0 and int(batch["blank_images"].sum()) == 0


def test_link_encodes_new_mentions_with_the_fine_tuned_clip(finetuned, small_data, tmp_path):
    """link with a finetune model reads the KB's fine-tuned feature set and encodes the new mentions with the same
    fine-tuned CLIP: its scores are recomputed here with those weights, and differ from the base CLIP's."""
    import json

    import pyarrow.parquet as pq

    from mel_ray.checkpoints import build_model
    from mel_ray.config import SynthesizeConfig
    from mel_ray.dataset import load_dataset
    from mel_ray.feature_store import EntityStore
    from mel_ray.link import MentionEncoder, link
    from mel_ray.synthesize import plan_synthesis

    _, ds, cfg, result = finetuned
    data = load_dataset(ds)
    rows = [{"mention_id": m["mention_id"], "text": m["sentence"], "mention": m["mention"],
             "image": data.resolve_uri(m["image_uri"]) if m["image_uri"] else None}
            for m in data.mentions("test").to_pylist()[:4]]
    jsonl = tmp_path / "new.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = cfg.model_dump(mode="json")
    config["models"]["diffusion"] = small_data.models["stable-diffusion"]
    config["synthesize"].update(views=1, steps=2, size=32, batch_size=4, num_gpus=0)
    out = tmp_path / "links"
    report = link(result["checkpoint"], ds, str(jsonl), str(out), top_k=3, config=config,
                  cache_dir=cfg.models.cache_dir)
    assert report["kb_features"] == result["features_uri"] and report["linked"] == 4
    links = {}
    for row in pq.read_table(out / "links.parquet").to_pylist():
        links.setdefault(row["mention_id"], []).append(row)

    state = load_checkpoint(result["checkpoint"])
    model = build_model(state)
    store = EntityStore(result["features_uri"])
    key = plan_synthesis(config["models"]["diffusion"], SynthesizeConfig.model_validate(config["synthesize"]),
                         cfg.models.cache_dir).key
    batch = {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in ("mention_id", "text", "mention",
                                                                                       "image")}

    def top1(weights):
        encoder = MentionEncoder(cfg.models.clip, cfg.models.cache_dir, 40, False, 1, str(out), key, weights)
        features = encoder(batch)
        mentions = {k: torch.from_numpy(np.stack(features[k]).astype(np.float32))
                    for k in ("text_global", "text_local", "image_global", "image_local", "synthetic_global")}
        mentions["n_views"] = torch.from_numpy(np.asarray(features["n_views"], dtype=np.int64))
        with torch.no_grad():
            scores = model(mentions, store.chunk(0, store.num_entities))["overall"].numpy()
        return scores.max(axis=1)

    linked = np.array([links[r["mention_id"]][0]["score"] for r in rows])
    np.testing.assert_allclose(top1(encoder_state(state["model"])), linked, rtol=1e-4, atol=1e-4)
    assert not np.allclose(top1(None), linked, rtol=1e-4, atol=1e-4)      # the base CLIP would score otherwise
