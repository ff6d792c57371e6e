"""`mel-ray tune`: the paper's Table 2 (k x n_s) as a Ray Tune sweep of distributed training runs.

Ray 2.60's Train-inside-Tune pattern: every Tune trial runs a small driver function (`run_trial`) that builds a
TorchTrainer and calls `fit()`; Ray Train's `TuneReportCallback` forwards each epoch's metrics to Tune (so ASHA
can stop weak trials early). The trial's Train workers ask for their own resources (train.num_workers x
train.cpus_per_worker / use_gpu); the trial driver itself only holds `tune.trial_cpus`.

One mined pool (negatives.k >= max k) and one feature set (synthetic views >= max n_s) serve every trial:
k is how many negatives a step samples from the pool, n_s caps the views CVaCPT may use (model.views).

MLflow: a parent run for the sweep and a child run per trial (train() logs it, evaluate's test metrics are
added); at the end the parent gets the ablation table (markdown, like Table 2, with the per-arm means ± std over
`tune.seeds` and paired t-tests against `tune.baseline`: mel_ray.tune.stats; the arms also as
ablation_arms.json), k x n_s heatmaps of dev and test H@1 / MRR, and the best trial's model. A trial that failed
(training diverged: NonFiniteError) is listed as failed with its one line and gives no number to the table,
the arms or "best". The table has one zero-shot row too: the encoder's own ranking (cosine of the feature set's
global vectors, mel_ray/eval/zero_shot.py) on the same split(s), computed once per sweep on the driver, not per
trial. An interrupted sweep resumes with `Tuner.restore`: finished trials
are kept, unfinished ones run again; the parent run id is kept next to the experiment so it is reused.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from mel_ray import console, redact, storage
from mel_ray.config import Config
from mel_ray.errors import DataError, UsageError, unwrap

log = logging.getLogger(__name__)
SWEEP_STATE = "mel_ray_sweep.json"
TABLE_METRICS = ("dev_H@1", "dev_MRR", "test_H@1", "test_MRR")
TUNE_METRIC = "checkpoint_score"   # every epoch report has it: dev MRR, or -1 for epochs without evaluation


def trial_overrides(cfg: Config) -> dict[str, list]:
    """The grid: k and n_s always, lr / w / seed when the sweep lists values for them."""
    t = cfg.tune
    grid = {"k": t.k, "views": t.views}
    for name, values in (("lr", t.lr), ("cvacpt_weight", t.cvacpt_weight), ("seed", t.seeds)):
        if values:
            grid[name] = values
    return grid


def trial_config(base: dict, params: dict) -> Config:
    """The sweep's config with tune.train applied over train, then this trial's grid values."""
    base = {**base, "train": {**base.get("train", {}), **base.get("tune", {}).get("train", {})}}
    cfg = Config.model_validate(base)
    cfg.model.encoder = cfg.tune.encoder          # sweeps default to frozen features (fast) whatever model.encoder is
    cfg.train.k = int(params["k"])
    cfg.model.views = int(params["views"])
    if "lr" in params:
        cfg.train.lr = float(params["lr"])
    if "cvacpt_weight" in params:
        cfg.model.cvacpt_weight = float(params["cvacpt_weight"])
    if "seed" in params:
        cfg.train.seed = int(params["seed"])
    return cfg


def trial_name(params: dict) -> str:
    return "_".join(f"{'ns' if k == 'views' else k}{v}" for k, v in params.items())


def run_trial(params: dict, *, base: dict, dataset_uri: str, features_uri: str, negatives_uri: str | None,
              storage_path: str, sweep: str, tracking_uri: str, parent_run_id: str) -> None:
    """One Tune trial: distributed training (child MLflow run), then exact test evaluation."""
    import mlflow
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mel_ray.eval.evaluate import evaluate, shard_settings
    from mel_ray.feature_store import read_manifest
    from mel_ray.train.run import mlflow_name, train

    cfg = trial_config(base, params)
    cfg.tracking.mlflow_uri = tracking_uri
    name = trial_name(params)
    # a finetune trial reads pixels and the views the sweep's feature set was made with; it makes its own features
    views_key = read_manifest(features_uri).get("settings", {}).get("synthetic")
    result = train(cfg, dataset_uri, features_uri=features_uri, negatives_uri=negatives_uri,
                   storage_path=storage.join(storage_path, f"{sweep}-trials"), run_name=name,
                   parent_run_id=parent_run_id, callbacks=[TuneReportCallback()], synthetic_key=views_key)
    final = {f"best_{k}": v for k, v in result["best"].items() if k.startswith("dev_")}
    if cfg.tune.evaluate_test:
        report = evaluate(dataset_uri, result["features_uri"], result["checkpoint"], "test",
                          **shard_settings(cfg))
        final.update({f"test_{k}": v for k, v in report["metrics"].items()})
        client = mlflow.tracking.MlflowClient(tracking_uri)
        for key, value in report["metrics"].items():
            client.log_metric(result["run_id"], mlflow_name(f"test_{key}"), float(value))
    # the last report of the trial: what the sweep table reads (epoch metrics came through the callback);
    # it carries the sweep metric too, as every result must
    ray.tune.report({**final, TUNE_METRIC: result["best"].get("dev_MRR", -1.0), "epoch": len(result["history"]),
                     "mlflow_run_id": result["run_id"], "model_checkpoint": result["checkpoint"],
                     "trial_done": True})


def trial_error(error: BaseException) -> str:
    """A failed trial's one line: the DataError / UsageError it raised (out of Tune's and Ray's wrappers), else
    the first line of what Tune reports."""
    from mel_ray import redact

    inner = unwrap(error)
    if isinstance(inner, (DataError, UsageError)):
        return redact.text(str(inner))
    lines = str(error).strip().splitlines()
    return redact.text((lines[-1] if lines else type(error).__name__)[:300])


def _check_inputs(cfg: Config, features_uri: str) -> None:
    from mel_ray.feature_store import read_manifest

    trial = trial_config(cfg.model_dump(mode="json"), {"k": max(cfg.tune.k), "views": max(cfg.tune.views)})
    if max(cfg.tune.k) > cfg.negatives.k and trial.train.negatives != "in_batch":
        raise UsageError(f"tune.k up to {max(cfg.tune.k)} needs a mined pool of negatives.k >= that "
                         f"(negatives.k = {cfg.negatives.k})")
    shapes = read_manifest(features_uri).get("shapes", {})
    available = shapes.get("synthetic_global", [0])[0] if "synthetic_global" in shapes else 0
    if max(cfg.tune.views) > available:
        raise UsageError(f"{features_uri}: tune.views up to {max(cfg.tune.views)} but the features hold "
                         f"{available} synthetic views; synthesize and extract with --views {max(cfg.tune.views)}")


def _check_resources(cfg: Config) -> None:
    """Ray Data's file listing (the first operator of every read_parquet) asks for one whole CPU that no trial
    may hold, or the trials' readers wait for it forever. Fail early instead, unless the cluster may grow."""
    import ray

    from mel_ray.runtime import cluster_may_grow

    trial = trial_config(cfg.model_dump(mode="json"), {"k": cfg.tune.k[0], "views": cfg.tune.views[0]})
    per_trial = cfg.tune.trial_cpus + trial.train.num_workers * trial.train.cpus_per_worker
    concurrent = min(cfg.tune.max_concurrent_trials, len(cfg.tune.k) * len(cfg.tune.views))
    total = ray.cluster_resources().get("CPU", 0.0)
    if concurrent * per_trial > total - 1 + 1e-9 and not cluster_may_grow():
        raise UsageError(
            f"tune: {concurrent} concurrent trial(s) x {per_trial:g} CPUs (tune.trial_cpus + num_workers x "
            f"cpus_per_worker) leave less than the one whole CPU Ray Data's readers need on this cluster of "
            f"{total:g} CPUs; lower tune.max_concurrent_trials or tune.train.cpus_per_worker (on an autoscaling "
            f"cluster, export MEL_RAY_AUTOSCALING=1)")


def _sweep_state(experiment_path: str) -> dict:
    uri = storage.join(experiment_path, SWEEP_STATE)
    return storage.read_json_object(uri) if storage.exists(uri) else {}


def _parent_run(cfg: Config, tracking_uri: str, experiment_path: str) -> str:
    """The sweep's parent MLflow run, left RUNNING until the sweep ends; reused when the sweep resumes."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from mel_ray import tracking

    state = _sweep_state(experiment_path)
    if state.get("parent_run_id") and state.get("tracking_uri") == redact.strip_userinfo(tracking_uri):
        return state["parent_run_id"]
    client = MlflowClient(tracking_uri)
    experiment_id = tracking.ensure_experiment(cfg.tracking.experiment, tracking_uri)
    run_id = client.create_run(experiment_id, run_name=cfg.tune.name, tags={"mel_ray.sweep": cfg.tune.name}).info.run_id
    params = [Param(k, v) for k, v in tracking.safe_params(cfg).items()]
    for i in range(0, len(params), 100):               # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i:i + 100])
    storage.write_json(storage.join(experiment_path, SWEEP_STATE),     # never the credentials: beside the results
                       {"parent_run_id": run_id, "tracking_uri": redact.strip_userinfo(tracking_uri)})
    return run_id


def ablation_rows(results: list[dict], grid: dict[str, list]) -> list[dict]:
    """One row per trial (grid order), with the table metrics (NaN where a trial has none), its status (done,
    failed, stopped, missing) and a failed trial's one-line error."""
    rows = []
    by_params = {json.dumps(r["params"], sort_keys=True): r for r in results}
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        found = by_params.get(json.dumps(params, sort_keys=True), {})
        metrics = found.get("metrics", {})
        rows.append({"params": params, **{m: metrics.get(m if m.startswith("test_") else f"best_{m}", np.nan)
                                         for m in TABLE_METRICS},
                     "status": found.get("status", "missing"), "error": found.get("error")})
    return rows


def ablation_table(rows: list[dict], zero_shot: dict | None = None) -> str:
    """The trials' table; zero_shot (zero_shot_row): one more row, the encoder's floor, under the trials."""
    names = list(rows[0]["params"]) if rows else []
    head = "| " + " | ".join(["n_s" if n == "views" else n for n in names] + list(TABLE_METRICS) + ["status"]) + " |"
    lines = [head, "|" + " --- |" * (len(names) + len(TABLE_METRICS) + 1)]

    def number(value) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) and np.isfinite(value) else "-"

    for r in rows:
        cells = [str(r["params"][n]) for n in names] + [number(r[m]) for m in TABLE_METRICS] + [r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    if zero_shot is not None:
        first = ["zero-shot"] + ["-"] * (len(names) - 1)
        cells = first + [number(zero_shot["metrics"].get(m)) for m in TABLE_METRICS] + ["encoder only, no training"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:          # e.g. training diverged (NaN loss / non-finite dev scores): the line, never a number
        lines += ["", "Failed trials (no metrics):", ""]
        lines += [f"- {trial_name(r['params'])}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def arm_statistics(rows: list[dict], baseline: dict | None) -> tuple[dict, str]:
    """The arms (grid points without the seed) with mean ± std over seeds and paired t-tests against the
    baseline arm (tune.baseline, else the grid's first); the JSON object of ablation_arms.json and its markdown."""
    from mel_ray.tune import stats

    arms = stats.arms_from_rows(rows, TABLE_METRICS)
    source = "tune.baseline" if baseline else "the grid's first arm; set tune.baseline to choose another"
    stats.compare_with_baseline(arms, baseline or arms[0]["arm"], TABLE_METRICS)
    base = next(a for a in arms if a["baseline"])
    data = {"metrics": list(TABLE_METRICS), "baseline": {"arm": base["arm"], "name": base["name"], "source": source},
            "test": "paired t-test (scipy.stats.ttest_rel), paired by seed, difference = arm - baseline",
            "arms": arms}
    return data, stats.arms_markdown(arms, TABLE_METRICS, source)


def zero_shot_row(cfg: Config, dataset_uri: str, features_uri: str) -> dict:
    """The encoder's own ranking on the sweep's feature set (the base encoder's, also for finetune trials, which
    make their own): dev, and test when tune.evaluate_test; the KB shards sized as a trial's test evaluation."""
    from mel_ray.eval.evaluate import evaluate, shard_settings
    from mel_ray.eval.zero_shot import RANKER

    trial = trial_config(cfg.model_dump(mode="json"), {"k": cfg.tune.k[0], "views": cfg.tune.views[0]})
    metrics, report = {}, {}
    for split in ("dev", "test") if cfg.tune.evaluate_test else ("dev",):
        report = evaluate(dataset_uri, features_uri, None, split, ranker=RANKER, **shard_settings(trial))
        metrics.update({f"{split}_{k}": v for k, v in report["metrics"].items()})
    return {"metrics": metrics, "encoder": report.get("encoder"), "features": features_uri}


def heatmaps(rows: list[dict], grid: dict[str, list], folder: Path) -> list[Path]:
    """k x n_s heatmaps (mean over any other swept values)."""
    from mel_ray.plots import plot_heatmap

    paths = []
    for metric in TABLE_METRICS:
        matrix = np.full((len(grid["k"]), len(grid["views"])), np.nan)
        for i, k in enumerate(grid["k"]):
            for j, v in enumerate(grid["views"]):
                vals = [r[metric] for r in rows if r["params"]["k"] == k and r["params"]["views"] == v
                        and np.isfinite(r[metric])]
                if vals:
                    matrix[i, j] = float(np.mean(vals))
        name = metric.replace("@", "_at_")
        paths.append(plot_heatmap(matrix, grid["k"], grid["views"], f"{metric} (k x n_s)",
                                  folder / f"heatmap_{name}.png", row_name="k", col_name="n_s"))
    return paths


def _result_loggers() -> list:
    """Tune's result files (progress.csv, result.json) without its default TensorBoard logger, which rejects
    every metric name with '@' (dev_H@3: "Summary name ... is illegal") once per result; the metrics are in
    MLflow. Explicit loggers plus TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1, as Ray documents for choosing them."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    return [CSVLoggerCallback(), JsonLoggerCallback()]


def run_sweep(cfg: Config, dataset_uri: str, *, features_uri: str | None = None, negatives_uri: str | None = None,
              storage_path: str | None = None, tracking_dir: str = ".") -> dict:
    import ray.tune
    from mlflow.tracking import MlflowClient

    from mel_ray import tracking
    from mel_ray.eval.zero_shot import zero_shot_state
    from mel_ray.feature_store import find_features, read_manifest, require_text_encoder
    from mel_ray.runtime import init_ray, job_placement_groups, release_placement_groups
    from mel_ray.train.run import find_negatives
    from mel_ray.verify import require_dataset, require_features

    require_dataset(dataset_uri)        # every input checked on the driver before a trial starts
    features_uri = find_features(dataset_uri, features_uri, encoder=None,
                                 text_encoder_named=bool(cfg.models.text_encoder))
    require_features(features_uri, dataset_uri)
    require_text_encoder(read_manifest(features_uri), cfg.models.text_encoder, features_uri)
    negatives_uri = find_negatives(dataset_uri, negatives_uri, cfg.negatives.k, cfg.train.negatives,
                                   cfg.negatives.source)
    _check_inputs(cfg, features_uri)
    zero_shot_state(features_uri)       # a set without global vectors: one line now, not after the trials
    storage_path = storage_path or cfg.tracking.storage
    if not storage.is_s3(storage_path):
        storage_path = str(Path(storage_path).absolute())
    experiment_path = storage.join(storage_path, cfg.tune.name)
    uri = tracking.tracking_uri(cfg.tracking.mlflow_uri, tracking_dir)
    init_ray()
    state = _sweep_state(experiment_path)
    store = redact.strip_userinfo(uri)
    if state.get("done") and state.get("tracking_uri") == store:
        print(state["table"])
        if len(cfg.tune.seeds) > 1:
            print(state.get("arms_table", ""))
        return {**state, "tracking_uri": uri, "skipped": True, "experiment_path": experiment_path}
    if state.get("done"):
        # its trials' runs live in the other store; restoring the finished Tune experiment would not log them here
        raise UsageError(redact.text(
            f"sweep '{cfg.tune.name}' already finished with MLflow tracking at {state.get('tracking_uri')}, and "
            f"tracking now goes to {store}: to run it again there, set another tune.name or remove "
            f"{experiment_path}"))
    _check_resources(cfg)
    parent = _parent_run(cfg, uri, experiment_path)

    grid = trial_overrides(cfg)
    trainable = ray.tune.with_parameters(
        run_trial, base=cfg.model_dump(mode="json"), dataset_uri=dataset_uri, features_uri=features_uri,
        negatives_uri=negatives_uri, storage_path=storage_path, sweep=cfg.tune.name, tracking_uri=uri,
        parent_run_id=parent)
    trainable = ray.tune.with_resources(trainable, {"cpu": cfg.tune.trial_cpus})
    # S3 goes through our filesystem (endpoint, retries); Tune then wants paths without the scheme
    fs, root = storage.resolve(storage_path) if storage.is_s3(storage_path) else (None, storage_path)
    restore_path = f"{root}/{cfg.tune.name}"
    if ray.tune.Tuner.can_restore(restore_path, storage_filesystem=fs):
        log.info("tune: resuming %s", experiment_path)
        _result_loggers()           # a restored Tuner keeps its RunConfig; the switch is read at fit()
        tuner = ray.tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True,
                                       storage_filesystem=fs)
    else:
        scheduler = None
        if cfg.tune.scheduler == "asha":
            scheduler = ray.tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs,
                                                          grace_period=cfg.tune.asha_grace_period)
        tuner = ray.tune.Tuner(
            trainable,
            param_space={name: ray.tune.grid_search(values) for name, values in grid.items()},
            tune_config=ray.tune.TuneConfig(metric=TUNE_METRIC, mode="max", scheduler=scheduler,
                                            max_concurrent_trials=cfg.tune.max_concurrent_trials),
            run_config=ray.tune.RunConfig(name=cfg.tune.name, storage_path=root, storage_filesystem=fs,
                                          callbacks=_result_loggers(),
                                          # the trial status tables: with --verbose only (ours: one table)
                                          verbose=None if console.is_verbose() else 0),
        )
    reserved_before = job_placement_groups()
    grid_results = tuner.fit()
    release_placement_groups(reserved_before, f"tune {cfg.tune.name}")

    results = []
    for r in grid_results:
        metrics = dict(r.metrics or {}) if (r.metrics or {}).get("trial_done") else {}
        status = "failed" if r.error else ("done" if metrics else "stopped")
        results.append({"params": {k: r.config[k] for k in grid}, "metrics": metrics, "status": status,
                        "error": trial_error(r.error) if r.error else None})
    rows = ablation_rows(results, grid)
    floor = zero_shot_row(cfg, dataset_uri, features_uri)      # once per sweep, now that the trials' CPUs are free
    arms, arms_md = arm_statistics(rows, cfg.tune.baseline)
    finished = [r for r in results if r["metrics"]]
    best = max(finished, key=lambda r: r["metrics"].get("best_dev_MRR", -1.0), default=None)

    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = ablation_table(rows, floor)
        (tmp / "ablation.md").write_text(f"# {cfg.tune.name}: k x n_s (paper Table 2)\n\n{table}\n{arms_md}")
        (tmp / "ablation_arms.json").write_text(json.dumps(_json_safe(arms), indent=1))
        client.log_artifact(parent, str(tmp / "ablation.md"))
        client.log_artifact(parent, str(tmp / "ablation_arms.json"))
        for key, value in floor["metrics"].items():
            client.log_metric(parent, f"zero_shot_{key}".replace("@", "_at_"), float(value))
        for path in heatmaps(rows, grid, tmp):
            client.log_artifact(parent, str(path), "heatmaps")
        if best:
            child = best["metrics"]["mlflow_run_id"]
            model = client.download_artifacts(child, "model.pt", str(tmp))
            client.log_artifact(parent, model, "best")
            client.set_tag(parent, "best_trial", trial_name(best["params"]))
            for key, value in best["metrics"].items():
                if key.startswith(("best_dev_", "test_")) and isinstance(value, (int, float)):
                    client.log_metric(parent, f"best_{key}".replace("best_best_", "best_").replace("@", "_at_"),
                                      float(value))
    failed = [r for r in results if r["status"] == "failed"]
    client.set_terminated(parent, "FAILED" if failed else "FINISHED")
    print(table)
    if len(cfg.tune.seeds) > 1:     # the arms over seeds (in ablation.md always; one run per arm says little)
        print(arms_md)
    for r in failed:        # e.g. a trial whose training diverged (NonFiniteError): its line, never its numbers
        print(f"[tune] trial {trial_name(r['params'])} failed: {r['error']}")
    summary = {"parent_run_id": parent, "tracking_uri": uri, "rows": rows, "table": table, "arms": arms,
               "arms_table": arms_md, "best": best, "zero_shot": floor}
    if not failed:      # a finished sweep is not run again (a failed one resumes its errored trials)
        storage.write_json(storage.join(experiment_path, SWEEP_STATE),
                           _json_safe({**summary, "tracking_uri": store, "done": True}))
    return {**summary, "skipped": False, "experiment_path": experiment_path}


def _json_safe(value):
    """For the state file: NaN (a metric a trial lacks) becomes null, numpy numbers plain numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
