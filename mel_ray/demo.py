"""`make demo`: the whole chain on the embedded default (no services), on generated data and tiny models.

Each step is skipped when its output is already complete, so rerunning the demo after an interruption
continues where it stopped. Paths in configs/demo.yaml are relative to the output folder. The stages are
mel_ray.pipeline's functions; only the data differs (two generated releases, ingested, then merged).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from mel_ray import pipeline, redact
from mel_ray.config import Config, load_config
from mel_ray.dataset import SPLITS, load_dataset

DEMO_SEEDS = (0, 1)


def _line(stage: str, t0: float, note: str) -> None:
    """The demo's one line per stage: what was done, with counts, and how long it took."""
    print(f"[demo] {stage}: {note} ({time.perf_counter() - t0:.1f}s)", flush=True)


def build_datasets(root: Path, cfg: Config) -> str:
    """tiny models -> demo data (two seeds) -> ingest both -> merge. Returns the merged dataset URI."""
    from mel_ray.demo_data import make_demo_data
    from mel_ray.tiny_models import make_tiny_models

    t0 = time.perf_counter()
    paths = make_tiny_models(str(root / "models"))
    _line("models", t0, "tiny offline " + " and ".join(f"{k} ({Path(v).name})" for k, v in paths.items()))

    parts = []
    for seed in DEMO_SEEDS:
        name = f"demo{seed}"
        raw = root / "raw" / name
        out = str(root / "datasets" / name)
        if not pipeline.ingested_with(out, cfg.data.ingest, str(raw), name):
            t0 = time.perf_counter()
            if not (raw / "kb_entity.json").exists():
                make_demo_data(str(raw), seed=seed)
            note = pipeline.ingest_dataset(cfg.data.ingest, str(raw), out, name).note
            _line(f"demo data seed {seed} (mimic format) -> ingest", t0, note.replace(str(root) + "/", ""))
        parts.append(out)

    merged = pipeline.under(root, cfg.data.dataset)
    if not pipeline.merged_from(merged, parts, cfg.data.name):
        t0 = time.perf_counter()
        counts = pipeline.merge_datasets(parts, merged, cfg.data.name).value["counts"]
        _line(f"merge {' + '.join(Path(p).name for p in parts)}", t0,
              f"{Path(merged).name}: {', '.join(f'{k} {v}' for k, v in counts.items())}")
    return merged


def mine(merged: str, cfg: Config) -> dict:
    t0 = time.perf_counter()
    mined = pipeline.mine(cfg, merged)
    manifest, note = mined.value, mined.note
    _line(f"JD-CCL hard negatives (exact top-{cfg.negatives.k} Jaccard)", t0, note)
    return manifest


def views_and_features(merged: str, cfg: Config) -> str:
    """CVaCPT synthetic views with the tiny diffusion model, then frozen CLIP features of everything.
    `cfg` has its paths resolved (pipeline.resolve_paths) after the tiny models exist."""
    s = cfg.synthesize
    t0 = time.perf_counter()
    drawn = pipeline.synthesize_views(cfg, merged)
    views, note = drawn.value, drawn.note
    _line(f"synthetic views: {s.views} per mention ({s.steps} steps, {s.size}px)", t0, note)
    t0 = time.perf_counter()
    encoded = pipeline.encode_features(cfg, merged, views["key"])
    feats, note = encoded.value, encoded.note
    _line("CLIP features (entities, mentions, synthetic views)", t0, note.replace(merged + "/", ""))
    return feats["uri"]


def train_and_evaluate(root: Path, merged: str, features: str, cfg: Config) -> dict:
    from mel_ray.eval.evaluate import format_table

    t0 = time.perf_counter()
    outcome = pipeline.train_model(cfg, merged, features, root, base="demo")
    trained, note, info = outcome.value, outcome.note, outcome.info
    _line(f"training: {cfg.train.num_workers} Ray Train workers, {cfg.train.epochs} epochs, "
          f"negatives={cfg.train.negatives}, k={cfg.train.k}", t0, note)
    t0 = time.perf_counter()
    report = pipeline.evaluate_model(cfg, merged, features, trained, info["run_name"]).value
    _line("exact full-KB evaluation on test", t0, f"{report['mentions']} mentions x {report['entities']} entities")
    print(format_table(report), flush=True)
    return {**report, "tracking_uri": trained["tracking_uri"], "run_id": trained["run_id"]}


def summarize(uri: str) -> dict:
    ds = load_dataset(uri)
    entities = ds.entities(columns=["name", "attributes", "image_uris"])
    names = Counter(entities.column("name").to_pylist())
    attrs = entities.column("attributes").to_pylist()
    df = Counter(a for items in attrs for a in set(items))
    report = ds.report()
    summary = {
        "dataset": uri,
        "entities": ds.num_entities,
        **{f"mentions_{s}": ds.manifest["counts"][s] for s in SPLITS},
        "entities_sharing_a_name": round(sum(c for c in names.values() if c > 1) / max(1, len(attrs)), 3),
        "distinct_attributes": len(df),
        "most_frequent_attribute": df.most_common(1)[0] if df else None,
        "mean_attributes_per_entity": round(sum(map(len, attrs)) / max(1, len(attrs)), 2),
        "entities_without_image": sum(1 for u in entities.column("image_uris").to_pylist() if not u),
        "merged_duplicate_entities": report.get("duplicate_entities"),
        "merge_conflicting_fields": report.get("conflicting_entities_fields"),
    }
    return summary


def tune_sweep(root: Path, merged: str, features: str, cfg: Config) -> dict:
    t = cfg.tune
    t0 = time.perf_counter()
    result = pipeline.sweep(cfg, merged, features, root).value       # prints the ablation table
    _line(f"Ray Tune sweep '{t.name}': k in {t.k} x n_s in {t.views}", t0,
          f"{len(result['rows'])} trials; table, heatmaps and the best model on MLflow parent run "
          f"{result['parent_run_id']}")
    return result


STAGES = ("data", "features", "train", "tune")


def run_demo(output: str, config_path: str | None = None, overrides: list[str] | None = None,
             until: str = "tune") -> dict:
    """until: 'data' stops after ingest/merge/mining, 'features' after synthesis + features, 'train' after
    training + test evaluation, 'tune' (everything) after the sweep."""
    from mel_ray import console, tracking

    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}")
    root = Path(output).absolute()
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config_path, overrides)
    t_start = time.perf_counter()
    merged = build_datasets(root, cfg)
    cfg = pipeline.resolve_paths(cfg, root)      # after build_datasets: local model folders exist now
    mine(merged, cfg)
    summary = summarize(merged)
    print("[demo] dataset summary:")
    print(json.dumps(summary, indent=2, default=str))
    if until != "data":
        features = views_and_features(merged, cfg)
        if until in ("train", "tune"):
            summary["test"] = train_and_evaluate(root, merged, features, cfg)["metrics"]
        if until == "tune":
            summary["sweep"] = tune_sweep(root, merged, features, cfg)["rows"]
    print(f"demo finished in {time.perf_counter() - t_start:.1f}s. Where to look next:")
    print(f"  outputs: {root}")
    if until in ("train", "tune"):
        uri = tracking.tracking_uri(cfg.tracking.mlflow_uri, str(root))
        print(f"  MLflow:  mlflow ui --backend-store-uri {redact.uri(uri)}   (experiment '{cfg.tracking.experiment}')")
    log_file = console.log_file()
    print(f"  log:     {log_file} (Ray, Train, Tune and Data output; --verbose shows it here)" if log_file else
          "  log:     none, everything went to the terminal (--verbose)", flush=True)
    return summary
