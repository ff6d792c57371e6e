"""`mel-ray train`: build the TorchTrainer, run it, and record the run in MLflow.

The driver does the MLflow work after `fit()` (params, per-epoch metrics from the run's history, artifacts),
so workers need no access to the tracking server, and a run on a cluster with the embedded sqlite store still
lands on the driver's machine.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from mel_ray import storage
from mel_ray.checkpoints import CHECKPOINT_FILE, build_model, export_model
from mel_ray.config import Config
from mel_ray.dataset import ENTITIES, load_dataset
from mel_ray.errors import NonFiniteError, UsageError, unwrap
from mel_ray.feature_store import find_features, mention_dataset, mention_tensors, read_manifest, require_text_encoder
from mel_ray.keys import sha256_hex
from mel_ray.model.encoder import clip_config_of, encoder_sizes, text_config_of
from mel_ray.runtime import init_ray
from mel_ray.train.inputs import FinetuneInputs, build_inputs, decoded
from mel_ray.train.loop import NONFINITE, train_loop_per_worker
from mel_ray.verify import pool_paths, require_dataset, require_features, require_negatives

log = logging.getLogger(__name__)
PATCH_MAP_MENTIONS = 4


def mlflow_name(metric: str) -> str:
    """MLflow metric names allow no '@': dev_H@1 is logged as dev_H_at_1."""
    return metric.replace("@", "_at_")


def find_negatives(dataset_uri: str, negatives_uri: str | None, k_pool: int, mode: str,
                   source: str = "jaccard") -> str | None:
    """The mined pool training samples its hard negatives from: `negatives_uri`, else the dataset's pool of
    negatives.k and negatives.source (train.negatives jaccard / both read it whatever its source); None for
    in_batch."""
    if mode == "in_batch":
        return None
    uri = negatives_uri or storage.join(dataset_uri, pool_paths(k_pool, source)[0])
    # the manifest is written last: a pool without one is incomplete
    manifest_uri = uri.replace(".parquet", ".manifest.json")
    flag = "" if source == "jaccard" else f" --source {source}"
    if not storage.exists(uri) or not storage.exists(manifest_uri):
        raise UsageError(f"{uri}: no mined negatives; run `mel-ray mine-negatives --k {k_pool}{flag}` first "
                         f"or train with --set train.negatives=in_batch")
    require_negatives(dataset_uri, k_pool, uri, source)     # manifest, footer, schema, one row per entity
    # pools index entities by id: pools mined on another entities table would silently be wrong negatives
    mined_for = storage.read_json_object(manifest_uri).get("entities_sha256")
    entities_uri = load_dataset(dataset_uri).path(ENTITIES)
    actual = sha256_hex(storage.read_bytes(entities_uri))
    if mined_for != actual:
        raise UsageError(f"{manifest_uri}: entities_sha256 {str(mined_for)[:12]}... does not match {entities_uri} "
                         f"({actual[:12]}...); the entities changed since mining, rerun `mel-ray mine-negatives "
                         f"--k {k_pool}{flag}`")
    return uri


def pool_coverage(dataset_uri: str, negatives_uri: str, k: int) -> dict[str, int]:
    """How the mined pool serves the training mentions: how many there are, how many have a gold entity with
    an empty pool (no hard negatives at all: in jaccard mode they train on in-batch negatives, in both on the
    in-batch ones only, so JD-CCL does nothing for them) and how many a pool shorter than k."""
    from mel_ray.feature_store import load_pools

    ds = load_dataset(dataset_uri)
    gold = ds.mentions("train", columns=["entity_id"]).column("entity_id").to_numpy()
    sizes = np.array([len(p) for p in load_pools(negatives_uri, ds.num_entities)], dtype=np.int64)[gold]
    return {"train_mentions": len(gold), "empty_pool": int(np.count_nonzero(sizes == 0)),
            "short_pool": int(np.count_nonzero((sizes > 0) & (sizes < k)))}


def report_coverage(coverage: dict[str, int], negatives_uri: str, source: str) -> None:
    """One line at the start of training: the user sees why hard negatives do nothing on an attribute-less KB."""
    empty, total = coverage["empty_pool"], coverage["train_mentions"]
    line = (f"negatives: {empty} of {total} training mentions have a gold entity with no mined negatives in "
            f"{negatives_uri} (no hard negatives for them: in-batch ones only), {coverage['short_pool']} fewer "
            f"than train.k")
    if empty and source == "jaccard":
        line += ("; a gold entity without attributes shared with others has an empty Jaccard pool: "
                 "negatives.source=names or jaccard+names fills it from name similarity")
    (log.warning if empty else log.info)(line)


def trainer_for(cfg: Config, dataset_uri: str, features_uri: str | None, negatives_uri: str | None,
                storage_path: str, name: str, callbacks: list | None = None, finetune: FinetuneInputs | None = None):
    """finetune: the reference tables of end-to-end training (model.encoder = finetune); features_uri is then
    not read."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    loop_config = {
        "train": t.model_dump(),
        "dims": {"hidden": cfg.model.hidden, "cvacpt_weight": cfg.model.cvacpt_weight,
                 "cvacpt_init": cfg.model.cvacpt_init,
                 "views": cfg.model.views},
        "dataset_uri": dataset_uri, "features_uri": features_uri, "negatives_uri": negatives_uri,
    }
    if finetune is not None:
        clip_config = clip_config_of(cfg.models.clip, cfg.models.cache_dir)
        loop_config["dims"].update(encoder="finetune", encoder_config=clip_config, **encoder_sizes(clip_config))
        if cfg.models.text_encoder:         # a BERT-family model replaces CLIP's text tower and trains too
            from mel_ray.models import pin_model, resolve_text_pooling

            text_config = text_config_of(cfg.models.text_encoder, cfg.models.cache_dir)
            pooling = resolve_text_pooling(cfg.models.text_encoder, cfg.models.text_pooling, cfg.models.cache_dir)
            loop_config["dims"].update(text_encoder_config=text_config, text_encoder=pin_model(cfg.models.text_encoder),
                                       text_pooling=pooling, **encoder_sizes(clip_config, text_config))
        loop_config["finetune"] = {"tables": ray.put({k: finetune.tables[k] for k in ("dev", "kb")}),
                                   "decode": finetune.decode_kwargs(), "clip": cfg.models.clip,
                                   "cache_dir": cfg.models.cache_dir}
        train_data = decoded(finetune.tables["train"], finetune)
    else:
        train_data = mention_dataset(features_uri, dataset_uri, "train")
    fs = None
    path = storage_path
    if storage.is_s3(storage_path):
        fs, path = storage.resolve(storage_path)
    else:
        path = str(Path(storage_path).absolute())
    run_config = ray.train.RunConfig(
        name=name, storage_path=path, storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                                     checkpoint_score_attribute="checkpoint_score",
                                                     checkpoint_score_order="max"),
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        callbacks=callbacks or [],
    )
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        datasets={"train": train_data},
        dataset_config=ray.train.DataConfig(execution_options=ingest_options()),
    )


def ingest_options():
    """Ray Train's default ingest options (DataConfig.default_ingest_options) built with the current API: Ray
    2.60 copies the deprecated `exclude_resources` (always zero here) into them and then warns about its own
    call (RayDeprecationWarning in every run); left out, it is zero all the same."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=current.preserve_order,
                            verbose_progress=current.verbose_progress)


def load_checkpoint_state(checkpoint) -> dict:
    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, CHECKPOINT_FILE), weights_only=True)


def train(cfg: Config, dataset_uri: str, *, features_uri: str | None = None, negatives_uri: str | None = None,
          storage_path: str | None = None, run_name: str = "train", tracking_dir: str = ".",
          parent_run_id: str | None = None, callbacks: list | None = None,
          synthetic_key: str | None = None) -> dict:
    """Train on Ray Train and record one MLflow run; returns run id, history, best dev metrics, checkpoint URI.

    parent_run_id: make the MLflow run a child (a Tune trial of a sweep); callbacks: Ray Train callbacks
    (a sweep passes Tune's TuneReportCallback so each epoch's metrics reach Tune).

    model.encoder=finetune: CLIP trains with the matcher on pixels and token ids (mel_ray.train.inputs; the views
    of DATASET/synthetic/<synthetic_key>, none when it is None); features_uri is not read. Once training is
    done the best checkpoint's encoder writes a feature set (extract-features --checkpoint, a Ray Data actor
    pool), returned as `features_uri`, so `evaluate` and `link` work on the fine-tuned model.

    A NaN or infinite loss, gradient or dev score stops the run: NonFiniteError naming the run, the epoch and
    step or split and how many mentions were affected; nothing is logged to MLflow and no model exported.
    """
    from mel_ray import tracking
    from mel_ray.plots import plot_curves

    require_dataset(dataset_uri)        # every input checked here, on the driver, before any worker reads it
    finetune = cfg.model.encoder == "finetune"
    if not finetune:
        # frozen: the base CLIP's sets, texts by models.text_encoder where one is named
        features_uri = find_features(dataset_uri, features_uri, encoder=None,
                                     text_encoder_named=bool(cfg.models.text_encoder))
        require_features(features_uri, dataset_uri)
        require_text_encoder(read_manifest(features_uri), cfg.models.text_encoder, features_uri)
    negatives_uri = find_negatives(dataset_uri, negatives_uri, cfg.negatives.k, cfg.train.negatives,
                                   cfg.negatives.source)
    if cfg.train.k > cfg.negatives.k and cfg.train.negatives != "in_batch":
        raise UsageError(f"train.k = {cfg.train.k} is larger than the mined pool negatives.k = {cfg.negatives.k}")
    coverage = pool_coverage(dataset_uri, negatives_uri, cfg.train.k) if negatives_uri else None
    if coverage:
        report_coverage(coverage, negatives_uri, cfg.negatives.source)
    if finetune and cfg.models.text_encoder:    # a text encoder that is no BERT or too short: one line, before Ray
        from mel_ray.features.plan import check_text_encoder
        from mel_ray.models import resolve_text_pooling

        check_text_encoder(cfg.models.text_encoder, cfg.features.text_length, cfg.models.cache_dir)
        resolve_text_pooling(cfg.models.text_encoder, cfg.models.text_pooling, cfg.models.cache_dir)
    storage_path = storage_path or cfg.tracking.storage
    init_ray()
    inputs = finetune_inputs(cfg, dataset_uri, negatives_uri, synthetic_key) if finetune else None
    trainer = trainer_for(cfg, dataset_uri, None if finetune else features_uri, negatives_uri, storage_path,
                          run_name, callbacks, finetune=inputs)
    result = trainer.fit()
    if result.error:
        cause = unwrap(result.error)        # a DataError raised in a worker: its own line, not Ray's wrapping
        if cause is result.error:
            raise result.error
        raise cause from result.error
    line = (result.metrics or {}).get(NONFINITE)
    if line:                                # the workers stopped on a NaN / inf loss or dev score
        raise NonFiniteError(f"train run '{run_name}'", line)
    best = result.get_best_checkpoint(metric="checkpoint_score", mode="max") or result.checkpoint
    state = load_checkpoint_state(result.checkpoint)       # the latest holds the whole history
    best_state = load_checkpoint_state(best)
    history = state["state"]["history"]
    best_metrics = max((h for h in history if "dev_MRR" in h), key=lambda h: h["dev_MRR"], default=history[-1])
    # Ray reports paths inside its storage filesystem; users (and `evaluate`) need a URI
    best_uri = f"s3://{best.path}" if storage.is_s3(storage_path) else best.path
    if finetune:                            # the fine-tuned encoder's features: what evaluate and link read
        features_uri = fine_tuned_features(cfg, dataset_uri, best_uri, synthetic_key)

    uri = tracking.tracking_uri(cfg.tracking.mlflow_uri, tracking_dir)
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    with tracking.start_run(cfg.tracking.experiment, run_name, uri, tags=tags) as run, \
            tempfile.TemporaryDirectory() as tmp:
        import mlflow

        tracking.log_params_flat(cfg.model_dump(mode="json"))
        mlflow.log_params({"inputs.dataset": dataset_uri, "inputs.features": features_uri,
                           "inputs.negatives": negatives_uri or "none"})
        if coverage:       # training mentions whose gold got no (or fewer than train.k) hard negatives
            mlflow.log_params({f"inputs.negatives_{name}": value for name, value in coverage.items()})
        for h in history:
            mlflow.log_metrics({mlflow_name(k): float(v) for k, v in h.items()
                                if isinstance(v, (int, float)) and k != "epoch"}, step=int(h["epoch"]))
        tmp = Path(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        export_model(best_state, cfg, tmp / "model.pt")
        report = {"best_epoch": best_metrics["epoch"], "best_dev": {k: v for k, v in best_metrics.items()
                                                                   if k.startswith("dev_")},
                  "epochs_trained": len(history), "history": history, "checkpoint": best_uri}
        (tmp / "eval_report.json").write_text(json.dumps(report, indent=2))
        plot_curves(history, tmp / "curves.png")
        maps = patch_maps(best_state, cfg, dataset_uri, features_uri, tmp / "cvacpt_patch_maps.png")
        for name in ("config.yaml", "model.pt", "eval_report.json", "curves.png"):
            mlflow.log_artifact(str(tmp / name))
        if maps:
            mlflow.log_artifact(str(maps))
        run_id = run.info.run_id
    log.info("training done: best dev MRR %.4f at epoch %s; MLflow run %s at %s",
             best_metrics.get("dev_MRR", float("nan")), best_metrics["epoch"], run_id, uri)
    return {"run_id": run_id, "tracking_uri": uri, "best": best_metrics, "history": history,
            "checkpoint": best_uri, "features_uri": features_uri, "negatives_uri": negatives_uri,
            "negatives_coverage": coverage}


def finetune_inputs(cfg: Config, dataset_uri: str, negatives_uri: str | None,
                    synthetic_key: str | None) -> FinetuneInputs:
    """The reference tables of end-to-end training; says once (a warning) when the release has no images."""
    from mel_ray.feature_store import load_pools

    t = cfg.train
    pools = load_pools(negatives_uri, load_dataset(dataset_uri).num_entities)
    head = 0 if t.negatives == "in_batch" else max(t.k, t.sample_top or 0)
    inputs = build_inputs(dataset_uri, cfg.models.clip, text_length=cfg.features.text_length,
                          synthetic_key=synthetic_key, views=cfg.synthesize.views if synthetic_key else None,
                          pools=pools, pool_head=head, seed=t.seed, cache_dir=cfg.models.cache_dir,
                          text_encoder=cfg.models.text_encoder)
    if not any(inputs.images.values()):
        log.warning("%s: no entity or mention has an image; fine-tuning trains on all-zero pixel tensors "
                    "(text only, as MIMIC feeds a missing image)", dataset_uri)
    return inputs


def fine_tuned_features(cfg: Config, dataset_uri: str, checkpoint: str, synthetic_key: str | None) -> str:
    """extract-features --checkpoint with the training's own settings: the feature set evaluate and link read."""
    from mel_ray.features import extract_features

    manifest = extract_features(dataset_uri, cfg.models.clip, cfg.features, synthetic_key=synthetic_key,
                                views=cfg.synthesize.views if synthetic_key else None,
                                cache_dir=cfg.models.cache_dir, checkpoint=checkpoint, quiet=True,
                                text_encoder=cfg.models.text_encoder, text_pooling=cfg.models.text_pooling)
    return manifest["uri"]


def patch_maps(state: dict, cfg: Config, dataset_uri: str, features_uri: str, path: Path) -> Path | None:
    """CVaCPT alpha/beta per patch over a few dev mention images with views (the paper's Fig. 6)."""
    import io

    from PIL import Image

    from mel_ray.plots import plot_patch_maps

    dev = mention_tensors(features_uri, dataset_uri, "dev")
    ds = load_dataset(dataset_uri)
    table = ds.mentions("dev", columns=["mention_id", "mention", "image_uri"]).to_pylist()
    by_id = {r["mention_id"]: r for r in table}
    has_view = dev["n_views"] > 0 if "n_views" in dev else None
    if has_view is None:
        return None
    picks = [i for i, mid in enumerate(dev["mention_id"]) if has_view[i] and by_id[mid]["image_uri"]]
    picks = picks[:PATCH_MAP_MENTIONS]
    if not picks:
        return None
    model = build_model(state)
    with torch.no_grad():
        maps = model.cvacpt_maps({k: v[picks] for k, v in dev.items() if isinstance(v, torch.Tensor)})
    images, titles = [], []
    for i in picks:
        row = by_id[dev["mention_id"][i]]
        data = storage.read_bytes(ds.resolve_uri(row["image_uri"]))
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        titles.append(f"{row['mention_id']}: {row['mention']}")
    return plot_patch_maps(images, list(maps["alpha"].numpy()), list(maps["beta"].numpy()), titles, path)
