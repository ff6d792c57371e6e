"""`make demo`: the whole chain on the embedded default (no services), on generated data and tiny models.

Each step is skipped when its output is already complete, so rerunning the demo after an interruption
continues where it stopped. Paths in configs/demo.yaml are relative to the output folder.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from mel_ray import storage
from mel_ray.config import Config, load_config
from mel_ray.dataset import SPLITS, load_dataset

DEMO_SEEDS = (0, 1)


def _step(title: str):
    print(f"==> {title}", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"    {what} ({time.perf_counter() - t0:.1f}s)", flush=True)


def _under(root: Path, uri: str) -> str:
    return uri if storage.is_s3(uri) or os.path.isabs(uri) else str(root / uri)


def build_datasets(root: Path, cfg: Config) -> str:
    """tiny models -> demo data (two seeds) -> ingest both -> merge. Returns the merged dataset URI."""
    from mel_ray.demo_data import make_demo_data
    from mel_ray.ingest import ingest, summary_line
    from mel_ray.merge import merge
    from mel_ray.tiny_models import make_tiny_models

    t0 = _step("tiny offline models (CLIP, Stable Diffusion)")
    paths = make_tiny_models(str(root / "models"))
    _done(t0, ", ".join(f"{k}: {v}" for k, v in paths.items()))

    parts = []
    for seed in DEMO_SEEDS:
        name = f"demo{seed}"
        raw = root / "raw" / name
        out = str(root / "datasets" / name)
        if not storage.exists(storage.join(out, "manifest.json")):
            t0 = _step(f"demo data seed {seed} (mimic format) -> ingest")
            if not (raw / "kb_entity.json").exists():
                make_demo_data(str(raw), seed=seed)
            report = ingest("mimic", str(raw), out, name=name, options=cfg.data.ingest)
            _done(t0, summary_line(out, report))
        parts.append(out)

    merged = _under(root, cfg.data.dataset)
    if not storage.exists(storage.join(merged, "manifest.json")):
        t0 = _step(f"merge {' + '.join(Path(p).name for p in parts)}")
        merge(parts, merged, name=cfg.data.name)
        _done(t0, merged)
    return merged


def mine(merged: str, cfg: Config) -> dict:
    from mel_ray.negatives import mine_negatives

    t0 = _step(f"JD-CCL hard negatives (exact top-{cfg.negatives.k} Jaccard)")
    manifest = mine_negatives(merged, k=cfg.negatives.k, seed=cfg.negatives.seed,
                              block_size=cfg.negatives.block_size)
    counts = {k: manifest[k] for k in ("n_entities", "n_without_attributes", "n_short") if k in manifest}
    _done(t0, f"{'already mined' if manifest.get('skipped') else 'mined'}: {counts}")
    return manifest


def views_and_features(root: Path, merged: str, cfg: Config) -> str:
    """CVaCPT synthetic views with the tiny diffusion model, then frozen CLIP features of everything."""
    from mel_ray.features import extract_features
    from mel_ray.synthesize import synthesize

    s, f = cfg.synthesize, cfg.features
    t0 = _step(f"synthetic views: {s.views} per mention ({s.steps} steps, {s.size}px, tiny Stable Diffusion)")
    views = synthesize(merged, _under(root, cfg.models.diffusion), views=s.views, template=s.template,
                       steps=s.steps, guidance=s.guidance, size=s.size, scheduler=s.scheduler, seed=s.seed,
                       batch_size=s.batch_size, concurrency=s.concurrency, num_gpus=s.num_gpus)
    _done(t0, f"synthetic/{views['key']}: {views.get('images', '')} images")
    t0 = _step("CLIP features (entities, mentions, synthetic views)")
    feats = extract_features(merged, _under(root, cfg.models.clip), synthetic_key=views["key"],
                             text_length=f.text_length, batch_size=f.batch_size, concurrency=f.concurrency,
                             num_gpus=f.num_gpus)
    _done(t0, feats["uri"])
    return feats["uri"]


def train_and_evaluate(root: Path, merged: str, features: str, cfg: Config) -> dict:
    from mel_ray.eval.evaluate import evaluate, format_table
    from mel_ray.train.run import train

    t0 = _step(f"training: {cfg.train.num_workers} Ray Train workers, {cfg.train.epochs} epochs, "
               f"negatives={cfg.train.negatives}, k={cfg.train.k}")
    result = train(cfg, merged, features_uri=features, storage_path=str(root / "runs"), run_name="demo",
                   tracking_dir=str(root))
    _done(t0, f"best dev MRR {result['best'].get('dev_MRR', float('nan')):.4f} (epoch {result['best']['epoch']})")
    t0 = _step("exact full-KB evaluation on test")
    report = evaluate(merged, features, result["checkpoint"], "test", output_uri=str(root / "eval"),
                      cpus_per_shard=0.5)
    _done(t0, f"{report['mentions']} mentions x {report['entities']} entities")
    print(format_table(report))
    print(f"MLflow: run {result['run_id']} at {result['tracking_uri']} "
          f"(mlflow ui --backend-store-uri {result['tracking_uri']})")
    return report


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


STAGES = ("data", "features", "train")


def run_demo(output: str, config_path: str | None = None, overrides: list[str] | None = None,
             until: str = "train") -> dict:
    """until: 'data' stops after ingest/merge/mining, 'features' after synthesis + features, 'train' runs all."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}")
    root = Path(output).absolute()
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config_path, overrides)
    t_start = time.perf_counter()
    merged = build_datasets(root, cfg)
    mine(merged, cfg)
    summary = summarize(merged)
    print("==> summary")
    print(json.dumps(summary, indent=2, default=str))
    if until != "data":
        features = views_and_features(root, merged, cfg)
        if until == "train":
            summary["test"] = train_and_evaluate(root, merged, features, cfg)["metrics"]
    print(f"demo finished in {time.perf_counter() - t_start:.1f}s; outputs under {root}")
    return summary
