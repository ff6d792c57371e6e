"""The whole chain from one config: ingest or merge -> mine negatives -> synthesize -> extract features ->
train -> evaluate on test. `jobs/pipeline.py` and `mel-ray pipeline` run it; each `jobs/<stage>.py` runs one
stage function; the demo reuses the lower-level functions.

Resumable: every stage first checks for its complete output and is skipped when it is there, so resubmitting
a failed pipeline continues where it stopped. Ingest and merge are skipped only when the complete dataset was
built from the same inputs (and options); mining, synthesis and features are skipped by the stages
themselves; train and evaluate leave a marker file beside the Ray Train run once they have finished, and a
training run killed midway resumes from its last checkpoint (same Ray Train run name and storage path).

Relative paths in the config (data.dataset, data.merge, data.ingest.input / image_dir, local model folders,
tracking.storage) are taken under `root`: the current directory for jobs and `mel-ray pipeline` (--root
changes it), the output folder for the demo. Absolute paths and s3:// URIs are used as they are; a relative
models.* value that is not a folder under `root` is a Hugging Face hub id.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from mel_ray import redact, storage
from mel_ray.config import Config, IngestConfig
from mel_ray.dataset import MANIFEST, REPORT, load_dataset
from mel_ray.errors import UsageError
from mel_ray.keys import settings_key
from mel_ray.runtime import device_note

TRAIN_MARKER = "mel_ray_train.json"        # in <tracking.storage>/<run name>/, written after train() returned
EVAL_MARKER = "mel_ray_evaluate_{split}.json"   # beside it, written after the test metrics reached MLflow
SPLIT = "test"


class Outcome(NamedTuple):
    """What a stage helper (ingest_dataset, mine, synthesize_views, encode_features, train_model, ...) returns;
    `_timed` turns it into a StageResult."""

    value: Any                 # the stage's full return value, for the next stage
    ran: bool                  # False: complete output found, nothing done
    note: str                  # one human line about what was done or found
    info: dict[str, Any]       # small JSON summary (URIs, counts) for the job's last line


@dataclasses.dataclass
class StageResult:
    stage: str
    ran: bool                  # False: complete output found, nothing done
    seconds: float
    note: str                  # one human line about what was done or found
    info: dict[str, Any]       # small JSON summary (URIs, counts) for the job's last line
    value: Any = None          # the stage's full return value, for the next stage

    def line(self) -> str:
        return f"[pipeline] {self.stage}: {'ran' if self.ran else 'skipped'} ({self.seconds:.1f}s) {self.note}"

    def summary(self) -> dict[str, Any]:
        return {"stage": self.stage, "skipped": not self.ran, "seconds": round(self.seconds, 2), **self.info}


# ------------------------------------------------------------------------------------------------ paths


def under(root: str | os.PathLike, uri: str) -> str:
    """A relative local path taken under `root`; absolute paths and URIs with a scheme stay as they are."""
    uri = str(uri)
    if "://" in uri:
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else Path(root).absolute() / path)


def model_under(root: str | os.PathLike, value: str) -> str:
    """Like `under` for local folders; a relative value with no folder under `root` stays a hub id."""
    if "://" in value or Path(value).expanduser().is_absolute():
        return value
    local = Path(root).absolute() / value
    return str(local) if local.exists() else value


def resolve_paths(cfg: Config, root: str | os.PathLike = ".") -> Config:
    """A copy of `cfg` whose local paths are absolute (see the module doc); resolving twice changes nothing."""
    c = cfg.model_copy(deep=True)
    c.data.dataset = under(root, c.data.dataset)
    c.data.merge = [under(root, u) for u in c.data.merge]
    if c.data.ingest.input:
        c.data.ingest.input = under(root, c.data.ingest.input)
    if c.data.ingest.image_dir:
        c.data.ingest.image_dir = under(root, c.data.ingest.image_dir)
    c.models.clip = model_under(root, c.models.clip)
    c.models.diffusion = model_under(root, c.models.diffusion)
    c.models.text_encoder = model_under(root, c.models.text_encoder) if c.models.text_encoder else None
    c.tracking.storage = under(root, c.tracking.storage)
    return c


def _timed(stage: str, fn, *args, **kwargs) -> StageResult:
    """Run `fn`, which returns an Outcome, and time it."""
    t0 = time.perf_counter()
    out: Outcome = fn(*args, **kwargs)
    return StageResult(stage, out.ran, time.perf_counter() - t0, out.note, out.info, out.value)


# ------------------------------------------------------------------------------------------ ingest, merge


def _json_object(uri: str) -> dict | None:
    """The JSON object at `uri`, or None when it is missing or damaged (the skip checks then say "not done")."""
    from mel_ray.errors import DataError

    if not storage.exists(uri):
        return None
    try:
        return storage.read_json_object(uri)
    except DataError:
        return None


def _sound(dataset: str) -> bool:
    """The dataset's quick check passes (manifest, footers, schemas, counts): a damaged one is rebuilt."""
    from mel_ray.verify import check_dataset_quick

    return not check_dataset_quick(dataset)


def ingested_with(output: str, options: IngestConfig, source: str, name: str) -> bool:
    """True when `output` is a complete, sound dataset ingested from `source` in this format with these options."""
    manifest = _json_object(storage.join(output, MANIFEST))
    if manifest is None:
        return False
    report = _json_object(storage.join(output, REPORT)) or {}
    return (manifest.get("name") == name and report.get("format") == options.format
            and report.get("input") == str(source)
            and report.get("options") == options.model_dump(mode="json", exclude={"format", "input"})
            and _sound(output))


def ingest_dataset(options: IngestConfig, source: str, output: str, name: str, *, force: bool = False) -> Outcome:
    """force: ingest even when the same input was ingested with the same options (the skip check compares the
    input's path, not its content: `mel-ray ingest`, asked explicitly, always reads the release again)."""
    from mel_ray.ingest import ingest, summary_line

    if not force and ingested_with(output, options, source, name):
        return Outcome(load_dataset(output).manifest, False, f"already ingested {output} from {source}",
                       {"dataset": output})
    report = ingest(options.format, source, output, name=name, options=options)
    return Outcome(report, True, summary_line(output, report), {"dataset": output, "rows": report["rows"]})


def merged_from(output: str, inputs: list[str], name: str) -> bool:
    """True when `output` is a complete, sound merge of `inputs` (same URIs, in order) whose counts have not
    changed.

    Counts, not content hashes: cheap, and they catch the usual case (an input re-ingested from a new release).
    """
    manifest = _json_object(storage.join(output, MANIFEST))
    if manifest is None:
        return False
    recorded = manifest.get("inputs") or []
    if (manifest.get("source_format") != "merge" or manifest.get("name") != name
            or not isinstance(recorded, list) or not all(isinstance(r, dict) for r in recorded)
            or [r.get("uri") for r in recorded] != [str(u) for u in inputs]):
        return False
    for r in recorded:
        input_manifest = _json_object(storage.join(r["uri"], MANIFEST))
        if input_manifest is None or input_manifest.get("counts") != r.get("counts"):
            return False
    return _sound(output)


def merge_datasets(inputs: list[str], output: str, name: str) -> Outcome:
    from mel_ray.merge import merge

    if merged_from(output, inputs, name):
        return Outcome(load_dataset(output).manifest, False, f"already merged {output}", {"dataset": output})
    manifest = merge(inputs, output, name=name)
    note = f"merged {', '.join(inputs)} -> {output}: {manifest['counts']}"
    return Outcome(manifest, True, note, {"dataset": output, "counts": manifest["counts"]})


def ingest_stage(cfg: Config, root: str | os.PathLike = ".", *, force: bool = False) -> StageResult:
    cfg = resolve_paths(cfg, root)
    if not cfg.data.ingest.input:
        raise UsageError("data.ingest.input is not set: nothing to ingest (set it, or list datasets in data.merge)")
    return _timed("ingest", ingest_dataset, cfg.data.ingest, cfg.data.ingest.input, cfg.data.dataset, cfg.data.name,
                  force=force)


def merge_stage(cfg: Config, root: str | os.PathLike = ".") -> StageResult:
    cfg = resolve_paths(cfg, root)
    if not cfg.data.merge:
        raise UsageError("data.merge lists no input datasets: nothing to merge")
    return _timed("merge", merge_datasets, cfg.data.merge, cfg.data.dataset, cfg.data.name)


def data_stage(cfg: Config, root: str | os.PathLike = ".") -> StageResult:
    """Merge when data.merge lists datasets (already ingested), else ingest data.ingest.input."""
    return merge_stage(cfg, root) if cfg.data.merge else ingest_stage(cfg, root)


# ------------------------------------------------------------------------------ negatives, views, features


def mine(cfg: Config, dataset: str, *, num_workers: int | None = None, force: bool = False) -> Outcome:
    """num_workers: Ray actors (None: one per CPU; 0: no Ray); force: recompute a complete pool. Neither
    changes the output."""
    from mel_ray.negatives import mine_negatives

    n = cfg.negatives
    manifest = mine_negatives(dataset, k=n.k, seed=n.seed, block_size=n.block_size, num_workers=num_workers,
                              force=force, source=n.source)
    counts = {k: manifest[k] for k in ("n_entities", "n_without_attributes", "n_without_name",
                                       "n_fallback_no_attributes", "n_fallback_short", "n_short") if k in manifest}
    ran = not manifest.get("skipped")
    algorithm = manifest.get("algorithm", {})
    engine = algorithm.get("engine") or algorithm.get("jaccard", {}).get("engine")
    what = f"top-{n.k}" if n.source == "jaccard" else f"top-{n.k} {n.source}"
    note = f"{'mined' if ran else 'already mined'} {what}: {counts}{f' ({engine})' if ran and engine else ''}"
    return Outcome(manifest, ran, note, {"output": manifest.get("output"), **counts})


def negatives_stage(cfg: Config, root: str | os.PathLike = ".", *, num_workers: int | None = None,
                    force: bool = False) -> StageResult:
    cfg = resolve_paths(cfg, root)
    return _timed("mine_negatives", mine, cfg, cfg.data.dataset, num_workers=num_workers, force=force)


def synthesize_views(cfg: Config, dataset: str, *, limit: int | None = None) -> Outcome:
    """limit: only the first N mentions of each split (a try-out; the key does not depend on it)."""
    from mel_ray.synthesize import synthesize

    summary = synthesize(dataset, cfg.models.diffusion, cfg.synthesize, limit=limit, cache_dir=cfg.models.cache_dir)
    ran = summary["generated"] > 0 or summary["todo"] > 0
    note = (f"synthetic/{summary['key']}: {summary['images']} images ({summary['generated']} new) on "
            f"{device_note(summary['num_gpus'])}")
    return Outcome(summary, ran, note, {"key": summary["key"], "uri": summary["uri"], "images": summary["images"]})


def no_views(cfg: Config, tune: bool = False) -> str | None:
    """Why this run reads no synthetic view, so nothing is drawn and models.diffusion is never resolved; None when
    it reads them. tune: for a sweep, whose trials set model.views from tune.views."""
    from mel_ray.synthesize import views_unused

    if tune:
        return "every tune.views is 0: no trial reads a view" if max(cfg.tune.views) == 0 else None
    return views_unused(cfg.model.cvacpt_weight, cfg.model.views)


def synthesize_stage(cfg: Config, root: str | os.PathLike = ".", *, limit: int | None = None,
                     tune: bool = False) -> StageResult:
    """Skipped, with the reason, when the run reads no view (`no_views`): its value's key is then None."""
    cfg = resolve_paths(cfg, root)
    reason = no_views(cfg, tune)
    if reason:
        return StageResult("synthesize", False, 0.0, f"nothing to draw: {reason}", {"key": None, "reason": reason},
                           {"key": None, "reason": reason})
    return _timed("synthesize", synthesize_views, cfg, cfg.data.dataset, limit=limit)


def synthetic_key(cfg: Config) -> str:
    """The synthetic/<key> the config's synthesize settings write, without running anything (the same
    plan_synthesis that synthesize() starts from)."""
    from mel_ray.synthesize import plan_synthesis

    return plan_synthesis(cfg.models.diffusion, cfg.synthesize, cfg.models.cache_dir).key


def encode_features(cfg: Config, dataset: str, key: str | None, checkpoint: str | None = None) -> Outcome:
    """key: the synthetic/<key> whose first synthesize.views views to encode; None: no synthetic views.
    checkpoint: a finetune model whose fine-tuned CLIP encodes (extract-features --checkpoint)."""
    from mel_ray.features import extract_features

    manifest = extract_features(dataset, cfg.models.clip, cfg.features, synthetic_key=key,
                                views=cfg.synthesize.views if key else None, cache_dir=cfg.models.cache_dir,
                                checkpoint=checkpoint, text_encoder=cfg.models.text_encoder,
                                text_pooling=cfg.models.text_pooling)
    run = manifest["run"]
    note = (f"{manifest['uri']}: {run['shards_written']} shards written, {run['shards_skipped']} already there, "
            f"on {device_note(run['num_gpus'])}")
    return Outcome(manifest, run["shards_written"] > 0, note, {"uri": manifest["uri"], "key": manifest["key"]})


def features_views(cfg: Config, synthetic: str | None, with_views: bool) -> str | None:
    """The synthetic/<key> features_stage encodes: `synthetic`, else the config's own when the run reads views
    (no_views); None without views, and then models.diffusion is not resolved."""
    if synthetic or not with_views:
        return synthetic if with_views else None
    return None if no_views(cfg) else synthetic_key(cfg)


def features_stage(cfg: Config, root: str | os.PathLike = ".", synthetic: str | None = None, *,
                   with_views: bool = True, checkpoint: str | None = None) -> StageResult:
    """synthetic: the synthetic/<key> to encode; default: the one the config's synthesize settings write.
    with_views=False: entities and mentions only, no synthetic views. checkpoint: a finetune model (its CLIP)."""
    from mel_ray.verify import require_dataset

    cfg = resolve_paths(cfg, root)
    require_dataset(cfg.data.dataset)      # before the synthesis key (which reads the diffusion model's files)
    key = features_views(cfg, synthetic, with_views)
    return _timed("extract_features", encode_features, cfg, cfg.data.dataset, key, checkpoint)


# ------------------------------------------------------------------------------------------ train, evaluate


def run_name(cfg: Config, dataset: str, features: str, base: str = "pipeline", negatives: str | None = None,
             tracking_target: str | None = None) -> str:
    """Ray Train run (and MLflow run) name: the same settings and inputs give the same name, so a resubmitted
    job finds its checkpoints and its marker; other settings never restore a run trained with different ones.
    negatives: an explicit negatives/k{K}.parquet URI (default: the one negatives.k names; not in the key).
    tracking_target: where the run is tracked (tracking_target()): a run finished in one MLflow store is not
    "already trained" for another, whose users would never see it."""
    # negatives.source at its default is left out: runs named before sources existed keep their names
    negatives_settings = cfg.negatives.model_dump(mode="json", exclude={"source"} if cfg.negatives.source ==
                                                  "jaccard" else None)
    inputs = {"model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
              "negatives": negatives_settings, "dataset": dataset, "features": features,
              "experiment": cfg.tracking.experiment}
    if tracking_target:
        inputs["tracking"] = tracking_target
    if negatives:
        inputs["negatives_uri"] = negatives
    return f"{base}-{settings_key(inputs, length=10)}"


def tracking_target(cfg: Config, root: str | os.PathLike) -> tuple[str, str]:
    """(the tracking URI to connect to, the same without credentials): the second names the store in run names
    and markers, so a new password is the same store and nothing secret is written beside the checkpoints."""
    from mel_ray import tracking

    uri = tracking.tracking_uri(cfg.tracking.mlflow_uri, str(Path(root).absolute()))
    return uri, redact.strip_userinfo(uri)


def run_folder(cfg: Config, name: str) -> str:
    return storage.join(cfg.tracking.storage, name)


def finetuning(cfg: Config) -> bool:
    """model.encoder=finetune: training reads pixels (not a feature set) and makes its own features at the end."""
    return cfg.model.encoder == "finetune"


def finetune_views(cfg: Config, dataset: str) -> str | None:
    """The synthetic/<key> the config's synthesize settings write, when that run is complete; else None (a
    fine-tuned model then trains without views: CVaCPT is the identity); None, without resolving models.diffusion,
    when the run reads no view (no_views)."""
    if no_views(cfg):
        return None
    key = synthetic_key(cfg)
    return key if storage.exists(storage.join(dataset, "synthetic", key, "complete.json")) else None


def train_model(cfg: Config, dataset: str, features: str | None, root: str | os.PathLike, base: str = "pipeline",
                negatives: str | None = None) -> Outcome:
    """features: the frozen feature set (model.encoder=frozen); with finetune it is not read: the synthetic views
    of the config's synthesize settings are used when complete, and the run's own features come back in
    `features_uri`."""
    from mel_ray.train.run import train

    synthetic = finetune_views(cfg, dataset) if finetuning(cfg) else None
    if finetuning(cfg):
        features = f"pixels+views:{synthetic}"      # the run's name follows what it reads
    live_uri, store = tracking_target(cfg, root)
    name = run_name(cfg, dataset, features, base, negatives, store)
    marker = storage.join(run_folder(cfg, name), TRAIN_MARKER)
    if storage.exists(marker):
        result = {**storage.read_json_object(marker), "tracking_uri": live_uri}
        return Outcome(result, False, f"already trained: MLflow run {result['run_id']} at {redact.uri(store)}",
                       _train_info(result, name))
    result = train(cfg, dataset, features_uri=None if finetuning(cfg) else features, negatives_uri=negatives,
                   storage_path=cfg.tracking.storage, run_name=name, tracking_dir=str(Path(root).absolute()),
                   synthetic_key=synthetic)
    kept = {k: result[k] for k in ("run_id", "tracking_uri", "best", "checkpoint", "features_uri", "negatives_uri")}
    storage.write_json(marker, json.loads(json.dumps({**kept, "tracking_uri": store}, default=float)))
    best = result["best"]
    note = (f"best dev MRR {best.get('dev_MRR', float('nan')):.4f} (epoch {best['epoch']}), "
            f"MLflow run {result['run_id']}")
    return Outcome(kept, True, note, _train_info(kept, name))


def _train_info(result: dict, name: str) -> dict:
    return {"run_name": name, "run_id": result["run_id"], "tracking_uri": redact.uri(result["tracking_uri"]),
            "checkpoint": result["checkpoint"]}


def _find_features(cfg: Config) -> str:
    from mel_ray.feature_store import find_features
    from mel_ray.verify import require_dataset

    require_dataset(cfg.data.dataset)   # a missing or damaged dataset says so, rather than "no feature sets"
    # the base CLIP's sets, with texts by models.text_encoder where one is named: what frozen training reads
    return find_features(cfg.data.dataset, None, encoder=None, text_encoder_named=bool(cfg.models.text_encoder))


def train_stage(cfg: Config, root: str | os.PathLike = ".", features: str | None = None,
                base: str = "pipeline", negatives: str | None = None) -> StageResult:
    """features: the features/<key> URI; default: the only complete set under the dataset. negatives: a
    negatives/k{K}.parquet URI; default: the one negatives.k names."""
    cfg = resolve_paths(cfg, root)
    if finetuning(cfg):
        features = None
    else:
        features = under(root, features) if features else _find_features(cfg)
    return _timed("train", train_model, cfg, cfg.data.dataset, features, root, base,
                  under(root, negatives) if negatives else None)


def evaluate_model(cfg: Config, dataset: str, features: str | None, trained: dict, name: str,
                   split: str = SPLIT) -> Outcome:
    """Exact full-KB evaluation of the best checkpoint: train.num_workers KB shards of train.cpus_per_worker
    CPUs each (the resources training just gave back); the metrics are added to the training's MLflow run.
    The encoder's zero-shot floor is evaluated beside it on the same split and compared mention by mention
    (`zero_shot_floor`); it is part of the report, the marker and the MLflow run."""
    from mel_ray.eval.evaluate import evaluate, shard_settings

    base = features                 # the set frozen training read: where the zero-shot floor ranks
    if finetuning(cfg):             # the fine-tuned encoder's own features, written when training finished
        features = trained["features_uri"]
    folder = run_folder(cfg, name)
    marker = storage.join(folder, EVAL_MARKER.format(split=split))
    if storage.exists(marker):      # a marker from before the floor existed has none: it is shown without
        report = storage.read_json_object(marker)
        note = f"already evaluated on {split}: {_eval_note(report)}"
        return Outcome(report, False, note, _eval_info(report, split))
    report = evaluate(dataset, features, trained["checkpoint"], split, output_uri=storage.join(folder, "eval"),
                      **shard_settings(cfg))
    report["zero_shot"] = zero_shot_floor(cfg, dataset, base, folder, split)
    report = json.loads(json.dumps(report, default=float))
    log_eval_to_mlflow(trained, report, split)
    storage.write_json(marker, report)
    note = f"{report['mentions']} {split} mentions x {report['entities']} entities: {_eval_note(report)}"
    return Outcome(report, True, note, _eval_info(report, split))


ZERO_SHOT_EVAL = "eval_zero_shot"     # beside the run's eval/: the floor's predictions and eval_<split>.json


def zero_shot_floor(cfg: Config, dataset: str, base: str | None, folder: str, split: str) -> dict:
    """The encoder's own ranking (evaluate's zero-shot ranker) of the split the model was just evaluated on, and
    the comparison paired by mention (model - floor: McNemar exact on H@1, Wilcoxon signed-rank on reciprocal
    ranks). Frozen: on the features the model read. Finetune: on the BASE encoder's features (the set frozen
    training would read), not the fine-tuned ones, so the floor is what training started from; when there is no
    such set (finetune extracts none) the floor is skipped with the reason, never guessed."""
    from mel_ray.eval import zero_shot
    from mel_ray.eval.evaluate import evaluate, shard_settings

    which = "the features the model was trained and evaluated on"
    if finetuning(cfg):
        which = "the base encoder's features (what frozen training reads), not the fine-tuned encoder's"
        try:
            base = _find_features(cfg)
        except UsageError as err:
            return {"skipped": f"no base feature set for the zero-shot floor ({err}); run extract-features "
                               "without --checkpoint to get one"}
    output = storage.join(folder, ZERO_SHOT_EVAL)
    floor = evaluate(dataset, base, None, split, output_uri=output, ranker=zero_shot.RANKER, **shard_settings(cfg))
    model = storage.read_table(storage.join(folder, "eval", f"predictions_{split}.parquet"),
                               columns=["mention_id", "rank"]).to_pydict()
    ranks = storage.read_table(storage.join(output, f"predictions_{split}.parquet"),
                               columns=["mention_id", "rank"]).to_pydict()
    return {"metrics": floor["metrics"], "mentions": floor["mentions"], "entities": floor["entities"],
            "encoder": floor["encoder"], "score": floor["score"], "features": base, "features_are": which,
            "seconds": floor["seconds"], "vs_model": zero_shot.paired_by_mention(model, ranks)}


def _eval_note(report: dict) -> str:
    """'MRR 0.81 H@1 0.74 (zero-shot MRR 0.80 H@1 0.73; model - floor: H@1 +0.01 (p=..), MRR ...)'."""
    def two(metrics: dict) -> str:
        return f"MRR {metrics.get('MRR', float('nan')):.4f} H@1 {metrics.get('H@1', float('nan')):.4f}"

    note = two(report["metrics"])
    floor = report.get("zero_shot") or {}
    if floor.get("metrics"):
        from mel_ray.eval.zero_shot import comparison_line

        note += f" (zero-shot {two(floor['metrics'])}; model - zero-shot: {comparison_line(floor['vs_model'])})"
    elif floor.get("skipped"):
        note += " (zero-shot floor skipped: no base feature set)"
    return note


def _eval_info(report: dict, split: str) -> dict:
    info = {"split": split, "metrics": report["metrics"]}
    if (report.get("zero_shot") or {}).get("metrics"):
        info["zero_shot_metrics"] = report["zero_shot"]["metrics"]
    return info


def log_eval_to_mlflow(trained: dict, report: dict, split: str) -> None:
    """`<split>_<metric>` metrics and eval_<split>.json on the training's run, so one run holds dev and test; the
    zero-shot floor as `<split>_zero_shot_<metric>` and its paired comparison as `<split>_vs_zero_shot_*` (deltas
    model - floor, p of McNemar on H@1 and of Wilcoxon on reciprocal ranks where a test could be made)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from mel_ray.train.run import mlflow_name

    client = MlflowClient(tracking_uri=trained["tracking_uri"])
    now = int(time.time() * 1000)
    values = {f"{split}_{k}": v for k, v in report["metrics"].items()}
    floor = report.get("zero_shot") or {}
    if floor.get("metrics"):
        paired = floor["vs_model"]
        values.update({f"{split}_zero_shot_{k}": v for k, v in floor["metrics"].items()})
        values.update({f"{split}_vs_zero_shot_delta_H@1": paired["delta_H@1"],
                       f"{split}_vs_zero_shot_delta_MRR": paired["delta_MRR"]})
        values.update({f"{split}_vs_zero_shot_p_{m}": paired[m]["p"] for m in ("H@1", "MRR")
                       if isinstance(paired[m]["p"], float)})
    client.log_batch(trained["run_id"], metrics=[Metric(mlflow_name(k), float(v), now, 0) for k, v in values.items()])
    client.log_text(trained["run_id"], json.dumps(report, indent=2), f"eval_{split}.json")


def evaluate_stage(cfg: Config, root: str | os.PathLike = ".", features: str | None = None,
                   trained: dict | None = None, base: str = "pipeline", split: str = SPLIT) -> StageResult:
    """trained: train_model's result; default: the marker of the run this config trains."""
    from mel_ray.verify import require_dataset, require_features

    cfg = resolve_paths(cfg, root)
    require_dataset(cfg.data.dataset)
    live_uri, store = tracking_target(cfg, root)
    if finetuning(cfg):             # named as train_model names it; the features come from the training's marker
        name = run_name(cfg, cfg.data.dataset, f"pixels+views:{finetune_views(cfg, cfg.data.dataset)}", base,
                        tracking_target=store)
    else:
        features = under(root, features) if features else _find_features(cfg)
        require_features(features, cfg.data.dataset)
        name = run_name(cfg, cfg.data.dataset, features, base, tracking_target=store)
    if trained is None:
        marker = storage.join(run_folder(cfg, name), TRAIN_MARKER)
        if not storage.exists(marker):
            raise UsageError(f"{marker}: no finished training for this config with tracking at "
                             f"{redact.uri(store)}; run the train job first")
        trained = {**storage.read_json_object(marker), "tracking_uri": live_uri}
    return _timed("evaluate", evaluate_model, cfg, cfg.data.dataset, features, trained, name, split)


# ------------------------------------------------------------------------------------------------- tune


def sweep(cfg: Config, dataset: str, features: str, root: str | os.PathLike) -> Outcome:
    from mel_ray.tune.sweep import run_sweep

    result = run_sweep(cfg, dataset, features_uri=features, storage_path=cfg.tracking.storage,
                       tracking_dir=str(Path(root).absolute()))
    best = result.get("best") or {}
    trial = best.get("params", {})
    note = (f"{'already swept' if result['skipped'] else 'swept'} {len(result['rows'])} trials; best "
            f"{trial} (dev MRR {best.get('metrics', {}).get('best_dev_MRR', float('nan')):.4f}), "
            f"MLflow parent run {result['parent_run_id']}")
    info = {"parent_run_id": result["parent_run_id"], "tracking_uri": redact.uri(result["tracking_uri"]),
            "best": trial}
    return Outcome(result, not result["skipped"], note, info)


def tune_stage(cfg: Config, root: str | os.PathLike = ".", features: str | None = None) -> StageResult:
    """The Tune sweep (cfg.tune) on the dataset's features; skipped when the same sweep finished."""
    cfg = resolve_paths(cfg, root)
    features = under(root, features) if features else _find_features(cfg)
    return _timed("tune", sweep, cfg, cfg.data.dataset, features, root)


# ------------------------------------------------------------------------------------------------ chain


def run_pipeline(cfg: Config, root: str | os.PathLike = ".", base: str = "pipeline") -> dict[str, Any]:
    """Every stage in order, one progress line each; returns the stages' summaries, the MLflow run and the
    test metrics."""
    cfg = resolve_paths(cfg, root)
    t0 = time.perf_counter()
    results: list[StageResult] = []

    def step(result: StageResult) -> StageResult:
        print(result.line(), flush=True)
        results.append(result)
        return result

    step(data_stage(cfg, root))
    step(negatives_stage(cfg, root))
    views = step(synthesize_stage(cfg, root))
    # finetune trains on pixels and writes its own features; frozen trains on a feature set made here
    features = None if finetuning(cfg) else step(features_stage(cfg, root, synthetic=views.value["key"],
                                                                with_views=views.value["key"] is not None)).value["uri"]
    trained = step(train_stage(cfg, root, features=features, base=base)).value
    report = step(evaluate_stage(cfg, root, features=features, trained=trained, base=base)).value
    floor = (report.get("zero_shot") or {}).get("metrics")
    print(f"[pipeline] done in {time.perf_counter() - t0:.1f}s: {SPLIT} MRR "
          f"{report['metrics'].get('MRR', float('nan')):.4f}"
          + (f" (zero-shot {floor.get('MRR', float('nan')):.4f})" if floor else "")
          + f", MLflow run {trained['run_id']} at {redact.uri(trained['tracking_uri'])}", flush=True)
    return {"stages": [r.summary() for r in results], "run_id": trained["run_id"],
            "tracking_uri": trained["tracking_uri"], "checkpoint": trained["checkpoint"],
            f"{SPLIT}_metrics": report["metrics"], **({f"{SPLIT}_zero_shot_metrics": floor} if floor else {})}


def link_stage(cfg: Config, root: str | os.PathLike = ".") -> StageResult:
    """Batch linking (link.*): new mentions -> views -> features -> top-k over the whole KB."""
    from mel_ray import tracking
    from mel_ray.link import link

    cfg = resolve_paths(cfg, root)
    missing = [f"link.{k}" for k in ("model", "kb", "mentions") if not getattr(cfg.link, k)]
    if missing:
        raise UsageError(f"{', '.join(missing)} not set: nothing to link")
    lc = cfg.link
    model = lc.model if "://" in lc.model or not Path(under(root, lc.model)).exists() else under(root, lc.model)

    def run() -> Outcome:
        report = link(model, under(root, lc.kb), under(root, lc.mentions), under(root, lc.output), top_k=lc.top_k,
                      config=cfg.model_dump(mode="json"),
                      tracking_uri=tracking.tracking_uri(cfg.tracking.mlflow_uri, str(Path(root).absolute())),
                      batch_size=lc.batch_size, entity_chunk=lc.entity_chunk, concurrency=lc.concurrency,
                      use_gpu=lc.use_gpu, cache_dir=cfg.models.cache_dir, scorer_gpus=cfg.eval.num_gpus,
                      candidates=lc.candidates, cache_gb=cfg.eval.cache_gb)
        note = f"{report['linked']} mentions linked -> {under(root, lc.output)}/links.parquet"
        return Outcome(report, not report["skipped"], note, {"output": under(root, lc.output),
                                                             "linked": report["linked"], "images": report["images"]})

    return _timed("link", run)


def run_tune_pipeline(cfg: Config, root: str | os.PathLike = ".") -> dict[str, Any]:
    """What jobs/tune.py runs: the sweep's inputs (data, one mined pool of negatives.k >= max tune.k, one
    synthesis of synthesize.views >= max tune.views, their features; each skipped when done), then the sweep."""
    cfg = resolve_paths(cfg, root)
    if max(cfg.tune.views) > cfg.synthesize.views:
        raise UsageError(f"tune.views up to {max(cfg.tune.views)} needs synthesize.views >= that "
                         f"(it is {cfg.synthesize.views}): one synthesis run serves every trial")
    results = []
    for make in (data_stage, negatives_stage, lambda c, r: synthesize_stage(c, r, tune=True)):
        results.append(make(cfg, root))
        print(results[-1].line(), flush=True)
    key = results[-1].value["key"]
    results.append(features_stage(cfg, root, synthetic=key, with_views=key is not None))
    print(results[-1].line(), flush=True)
    results.append(tune_stage(cfg, root, features=results[-1].value["uri"]))
    print(results[-1].line(), flush=True)
    return {"stages": [r.summary() for r in results], **results[-1].info}
