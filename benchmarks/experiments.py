"""Issue 5: do JD-CCL and CVaCPT help on the generated demo benchmark? An experiment, not a test.

Run by hand (2 cores: ~15 min of preparation, then 2.5 to 4.5 min per arm x seed, ~33 runs: well over an
hour; resumable, so it can be run in pieces; nice it when the machine is shared):

    nice -n 19 .venv/bin/python benchmarks/experiments.py                 # everything, resumable
    nice -n 19 .venv/bin/python benchmarks/experiments.py --until features   # data, views, features only

One generated release (mel_ray.demo_data, larger than the demo's), ingested, mined (pool k = 8, which covers
k in {2, 4, 6}), 3 synthetic views per mention from BOTH the tiny random-weight Stable Diffusion and the
`procedural:demo` stand-in (mel_ray/procedural.py, a TEST TOOL that draws what a prompt's attribute clues
describe), CLIP features with n_s = 1, 2, 3 views of each, then for every arm x seed the library's own
`train()` (Ray Train, 2 workers x 0.5 CPU) and exact full-KB `evaluate()` on test. Arms:

    base      JD-CCL (negatives=jaccard, k=4), CVaCPT w=1 with 3 tiny-SD views   -- (a)(b)(c)(d) reference
    in_batch  MIMIC's in-batch negatives instead of JD-CCL                        -- (a)
    both      JD-CCL's k=4 hard negatives AND the in-batch ones in one softmax    -- (a), added to explain it
    k2, k6    k = 2 / 6 hard negatives                                            -- (c)
    w0        CVaCPT off (w = 0: the module is an exact identity, so the views are ignored;
              one arm serves as the w = 0 control for both view sources)          -- (b)
    sd_ns1/2  n_s = 1 / 2 tiny-SD views                                           -- (d)
    proc      CVaCPT w=1 with 3 procedural views                                  -- (b)(d)
    proc_ns1/2 n_s = 1 / 2 procedural views                                       -- (d)
    proc_*    issue 14: every comparison above on procedural views (`--arms matcher`)
    ft_proc*  issue 15: the same six with the tiny CLIP fine-tuned (model.encoder=finetune, train.encoder_lr
              1e-3) on the images' and the procedural views' pixels, evaluated on its own features
              (`--arms finetune`; the default runs these, then their frozen twins)

Every arm x seed writes RESULTS/<arm>-s<seed>.json when it finishes; a rerun skips those (kill it any time).
Then diagnostics (are the mined negatives the model's confusions? do the views carry information? does
CVaCPT change the mention features, does it get gradient?) and docs/experiments.md: the part between the
GENERATED markers is rewritten, the hand-written analysis around it is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mel_ray import storage

POOL_K = 8
VIEWS = 3
SOURCES = {"sd": "tiny Stable Diffusion (random weights)", "proc": "procedural:demo (test tool)"}
# arm -> (features: (view source, n_s), config overrides on top of the common ones)
ARMS = {
    "base": (("sd", 3), []),
    "in_batch": (("sd", 3), ["train.negatives=in_batch"]),
    "both": (("sd", 3), ["train.negatives=both"]),
    "k2": (("sd", 3), ["train.k=2"]),
    "k6": (("sd", 3), ["train.k=6"]),
    "w0": (("sd", 3), ["model.cvacpt_weight=0.0"]),
    "sd_ns1": (("sd", 1), []),
    "sd_ns2": (("sd", 2), []),
    "proc": (("proc", 3), []),
    "proc_ns1": (("proc", 1), []),
    "proc_ns2": (("proc", 2), []),
    "sd_identity": (("sd", 3), ["model.cvacpt_init=identity"]),
    "proc_identity": (("proc", 3), ["model.cvacpt_init=identity"]),
    # issue 14 (MIMIC's matcher as published): every comparison on procedural views, so CVaCPT has information
    "proc_in_batch": (("proc", 3), ["train.negatives=in_batch"]),
    "proc_both": (("proc", 3), ["train.negatives=both"]),
    "proc_w0": (("proc", 3), ["model.cvacpt_weight=0.0"]),
    "proc_k2": (("proc", 3), ["train.k=2"]),
    "proc_k6": (("proc", 3), ["train.k=6"]),
}
MATCHER_ARMS = ["proc", "proc_in_batch", "proc_both", "proc_w0", "proc_k2", "proc_k6"]
# issue 15: the same six arms with the tiny CLIP fine-tuned with the matcher (model.encoder=finetune) on pixels
# and the procedural views' pixels; CLIP's rate = the heads' (1e-3: the tiny CLIP has random weights, as
# configs/demo.yaml sets it; a real CLIP would take MIMIC's 1e-5)
FINETUNE = ["model.encoder=finetune", "train.encoder_lr=1e-3"]
for _arm in MATCHER_ARMS:
    ARMS[f"ft_{_arm}"] = (ARMS[_arm][0], FINETUNE + ARMS[_arm][1])
FINETUNE_ARMS = [f"ft_{a}" for a in MATCHER_ARMS]
ARM_GROUPS = {"matcher": MATCHER_ARMS, "finetune": FINETUNE_ARMS}     # --arms finetune: just these six
BEGIN, END = "<!-- BEGIN GENERATED (benchmarks/experiments.py) -->", "<!-- END GENERATED -->"


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def start_ray(temp_dir: Path) -> None:
    """A private local Ray instance (never another user's cluster on this machine), token auth on."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(temp_dir), object_store_memory=1024**3)


# ------------------------------------------------------------------------------------------------ inputs


def build_inputs(out: Path, args) -> dict:
    """models, release, dataset, negatives, both view sets, six feature sets; each step resumes."""
    from mel_ray.config import IngestConfig
    from mel_ray.demo_data import make_demo_data
    from mel_ray.ingest import ingest, summary_line
    from mel_ray.negatives import mine_negatives
    from mel_ray.tiny_models import make_tiny_models

    t0 = time.perf_counter()
    models = make_tiny_models(str(out / "models"))
    stats = make_demo_data(str(out / "raw"), n_entities=args.entities, n_mentions=args.mentions, seed=args.data_seed)
    dataset = str(out / "dataset")
    if not storage.exists(storage.join(dataset, "manifest.json")):
        report = ingest("mimic", str(out / "raw"), dataset, name="experiments",
                        options=IngestConfig(check_images=True))
        log(summary_line(dataset, report))
    mined = mine_negatives(dataset, k=POOL_K, seed=0)
    log(f"data ready ({time.perf_counter() - t0:.0f}s): {stats['entities']} entities, mentions {stats['mentions']}, "
        f"name collisions {stats['name_collision_rate']}; negatives: n_short {mined.get('n_short')}")
    # only the view sets and n_s the chosen arms use; a fine-tuned arm reads the views' pixels, no feature set
    views = {src: synthesize_views(dataset, models, src) for src in sorted({ARMS[a][0][0] for a in args.arms})}
    needed = sorted({ARMS[a][0] for a in args.arms if not finetuned(a)})
    features = {(src, n_s): extract(dataset, models["clip"], views[src], n_s) for src, n_s in needed}
    return {"dataset": dataset, "models": models, "data_stats": stats, "views": views, "features": features,
            "negatives": {k: mined.get(k) for k in ("n_entities", "n_short", "n_without_attributes")},
            "seconds": time.perf_counter() - t0}


def synthesize_views(dataset: str, models: dict, source: str) -> str:
    from mel_ray.config import SynthesizeConfig
    from mel_ray.synthesize import synthesize

    t0 = time.perf_counter()
    # tiny SD: the demo's settings (32 px, 2 steps; its weights are random, so more steps would add nothing);
    # the stand-in draws at the demo images' own 64 px
    model, size = (models["stable-diffusion"], 32) if source == "sd" else ("procedural:demo", 64)
    section = SynthesizeConfig(views=VIEWS, steps=2, size=size, seed=0, batch_size=16, concurrency=2, num_gpus=0)
    summary = synthesize(dataset, model, section)
    log(f"views {source}: {summary['images']} images, generated {summary['generated']} "
        f"({time.perf_counter() - t0:.0f}s) -> synthetic/{summary['key']}")
    return summary["key"]


def extract(dataset: str, clip: str, key: str, n_s: int) -> str:
    from mel_ray.config import FeaturesConfig
    from mel_ray.features import extract_features

    t0 = time.perf_counter()
    feats = extract_features(dataset, clip, FeaturesConfig(batch_size=64, num_gpus=0), synthetic_key=key, views=n_s,
                             quiet=True)
    log(f"features n_s={n_s} of {key[:12]}: {feats['uri']} ({time.perf_counter() - t0:.0f}s)")
    return feats["uri"]


# -------------------------------------------------------------------------------------------------- arms


def finetuned(arm: str) -> bool:
    return "model.encoder=finetune" in ARMS[arm][1]


def arm_config(arm: str, seed: int, args, clip: str):
    from mel_ray.config import load_config

    # batch_size is the global batch: 2 workers x 32, as in the runs docs/experiments.md records.
    # configs/demo.yaml fine-tunes since issue 15: the frozen arms say model.encoder=frozen; a fine-tuned arm
    # reads the arm's n_s views (synthesize.views) and this release's tiny CLIP (models.clip)
    n_s = ARMS[arm][0][1]
    common = ["model.encoder=frozen", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.batch_size=64",
              f"train.epochs={args.epochs}", "train.lr=1e-3", "train.k=4", "train.negatives=jaccard",
              f"train.patience={args.epochs}", f"train.seed={seed}", f"negatives.k={POOL_K}", "model.cvacpt_weight=1.0",
              f"model.hidden={args.hidden}", "tracking.experiment=mel-ray-experiments", f"models.clip={clip}",
              f"synthesize.views={n_s}", "features.batch_size=64"]
    return load_config(ROOT / "configs" / "demo.yaml", common + ARMS[arm][1])


def run_arm(arm: str, seed: int, inputs: dict, out: Path, args) -> dict:
    """The library's train() then evaluate() on test; the result JSON is written last."""
    from mel_ray.eval.evaluate import evaluate
    from mel_ray.train.run import train

    cfg = arm_config(arm, seed, args, inputs["models"]["clip"])
    name = f"{arm}-s{seed}"
    shutil.rmtree(out / "runs" / name, ignore_errors=True)    # a killed attempt must not be resumed into
    t0 = time.perf_counter()
    if finetuned(arm):      # pixels + the views' pixels; evaluate reads the fine-tuned encoder's own feature set
        result = train(cfg, inputs["dataset"], synthetic_key=inputs["views"][ARMS[arm][0][0]],
                       storage_path=str(out / "runs"), run_name=name, tracking_dir=str(out))
        features = result["features_uri"]
    else:
        features = inputs["features"][ARMS[arm][0]]
        result = train(cfg, inputs["dataset"], features_uri=features, storage_path=str(out / "runs"), run_name=name,
                       tracking_dir=str(out))
    t_train = time.perf_counter() - t0
    report = evaluate(inputs["dataset"], features, result["checkpoint"], "test", output_uri=str(out / "eval" / name),
                      cpus_per_shard=0.5)
    record = {"arm": arm, "seed": seed, "features": features, "overrides": ARMS[arm][1],
              "encoder": cfg.model.encoder, "encoder_lr": cfg.train.encoder_lr if finetuned(arm) else None,
              "test": report["metrics"], "dev": {k[4:]: v for k, v in result["best"].items() if k.startswith("dev_")},
              "best_epoch": result["best"]["epoch"], "epochs": len(result["history"]),
              "train_loss_last": {k: v for k, v in result["history"][-1].items() if k.startswith("loss")},
              "train_loss_first": {k: v for k, v in result["history"][0].items() if k.startswith("loss")},
              "same_name_failures": report["same_name_failures"].get("count"),
              "checkpoint": result["checkpoint"], "train_seconds": t_train,
              "eval_seconds": report["seconds"]}
    storage.write_json(str(out / "results" / f"{name}.json"), record)
    return record


PRIORITY = (("ft_proc", "ft_proc_in_batch", "ft_proc_both", "ft_proc_w0"), ("ft_proc_k2", "ft_proc_k6"),
            ("proc", "proc_in_batch", "proc_both", "proc_w0"), ("proc_k2", "proc_k6"),
            ("base", "in_batch", "w0", "proc"), ("k2", "k6", "both"), ("proc_ns1", "proc_ns2", "sd_ns1", "sd_ns2"))


def run_order(arms: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(a)/(b) first, then (c), then (d); every seed of a group before the next group, so a run stopped early
    (or out of time) has whole comparisons at every seed rather than every arm at one seed."""
    groups = [[a for a in g if a in arms] for g in PRIORITY] + [[a for a in arms if not any(a in g for g in PRIORITY)]]
    order = [(a, s) for group in groups for s in seeds for a in group]
    return list(dict.fromkeys(order))            # an arm listed in two groups runs (and is reported) once


def run_arms(inputs: dict, out: Path, args) -> list[dict]:
    todo = run_order(args.arms, args.seeds)
    done_before = sum((out / "results" / f"{a}-s{s}.json").exists() for a, s in todo)
    t0, ran = time.perf_counter(), 0
    records = []
    for i, (arm, seed) in enumerate(todo, 1):
        path = out / "results" / f"{arm}-s{seed}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            continue
        rec = run_arm(arm, seed, inputs, out, args)
        ran += 1
        left = len(todo) - i
        per = (time.perf_counter() - t0) / ran
        log(f"[{i}/{len(todo)}] {arm} seed {seed}: test H@1 {rec['test']['H@1']:.4f} MRR {rec['test']['MRR']:.4f} "
            f"(dev MRR {rec['dev'].get('MRR', float('nan')):.4f}, {rec['train_seconds']:.0f}s train + "
            f"{rec['eval_seconds']:.0f}s eval; ~{left * per / 60:.0f} min left)")
        records.append(rec)
    log(f"arms: {ran} run, {done_before} already done")
    return records


# ------------------------------------------------------------------------------------------- diagnostics


def _cos_rank_stats(queries: np.ndarray, keys: np.ndarray, gold: np.ndarray) -> dict:
    """H@1 / MRR of ranking every key by cosine to each query (ties count against the gold)."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-9)
    k = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-9)
    scores = q @ k.T
    gold_scores = scores[np.arange(len(gold)), gold]
    ranks = (scores >= gold_scores[:, None]).sum(1)
    return {"n": len(gold), "H@1": float((ranks == 1).mean()), "MRR": float((1 / ranks).mean())}


def _mention_has_image(features_uri: str, split: str) -> np.ndarray:
    """has_image of a split's mention features, in row order (mention_tensors keeps only tensors)."""
    from mel_ray.feature_store import mention_shard_uris

    parts = [storage.read_table(u, columns=["has_image"]) for u in mention_shard_uris(features_uri, split)]
    return np.concatenate([t.column("has_image").to_numpy(zero_copy_only=False) for t in parts]).astype(bool)


def view_information(inputs: dict) -> dict:
    """Do the views point at the gold entity? Rank every KB entity image by cosine to a mention's mean view
    feature (no training involved), next to the mention's own image and a shuffled-views control."""
    from mel_ray.feature_store import EntityStore, mention_tensors

    out = {}
    for src in inputs["views"]:
        if (src, VIEWS) not in inputs["features"]:
            continue
        uri = inputs["features"][(src, VIEWS)]
        store = EntityStore(uri)
        ents = store.gather(np.arange(store.num_entities))
        keys = ents["image_global"].numpy()
        ent_has_image = store.table.column("has_image").to_numpy(zero_copy_only=False).astype(bool)
        test = mention_tensors(uri, inputs["dataset"], "test")
        gold = test["gold"].numpy()
        views = test["synthetic_global"].numpy()
        n_views = test["n_views"].numpy()
        mean_view = views.sum(1) / np.maximum(n_views, 1)[:, None]
        has_img = _mention_has_image(uri, "test")
        ok = (n_views > 0) & ent_has_image[gold]
        rng = np.random.default_rng(0)
        out[src] = {"views_vs_kb_images": _cos_rank_stats(mean_view[ok], keys, gold[ok]),
                    "shuffled_views_control": _cos_rank_stats(mean_view[ok][rng.permutation(ok.sum())], keys, gold[ok]),
                    "mention_image_vs_kb_images": _cos_rank_stats(test["image_global"].numpy()[ok & has_img], keys,
                                                                  gold[ok & has_img])}
    return out


def encoder_probes(inputs: dict, records: list[dict]) -> dict:
    """What the encoder alone gives, before any matcher: test MRR of ranking the whole KB by cosine of CLIP's
    global features (mention text vs entity text, mention image vs entity image, mean view vs entity image),
    for the frozen features and for every fine-tuned run's own feature set."""
    from mel_ray.feature_store import EntityStore, mention_tensors

    sets = {"frozen": inputs["features"].get(("proc", VIEWS))} if ("proc", VIEWS) in inputs["features"] else {}
    sets.update({f"{r['arm']}-s{r['seed']}": r["features"] for r in sorted(records, key=lambda r: (r["arm"], r["seed"]))
                 if r.get("encoder") == "finetune"})
    out = {}
    for name, uri in sets.items():
        store = EntityStore(uri)
        ents = store.gather(np.arange(store.num_entities))
        ent_has_image = store.table.column("has_image").to_numpy(zero_copy_only=False).astype(bool)
        test = mention_tensors(uri, inputs["dataset"], "test")
        gold = test["gold"].numpy()
        has_img = _mention_has_image(uri, "test") & ent_has_image[gold]
        n_views = test["n_views"].numpy()
        mean_view = test["synthetic_global"].numpy().sum(1) / np.maximum(n_views, 1)[:, None]
        ok = (n_views > 0) & ent_has_image[gold]
        out[name] = {
            "text_vs_kb_text_MRR": _cos_rank_stats(test["text_global"].numpy(), ents["text_global"].numpy(),
                                                   gold)["MRR"],
            "image_vs_kb_images_MRR": _cos_rank_stats(test["image_global"].numpy()[has_img],
                                                      ents["image_global"].numpy(), gold[has_img])["MRR"],
            "views_vs_kb_images_MRR": _cos_rank_stats(mean_view[ok], ents["image_global"].numpy(), gold[ok])["MRR"]}
    return out


def procedural_look_agreement(inputs: dict) -> dict:
    """Before CLIP: how often a procedural view draws the gold entity's shape / colour / pattern / background
    (demo entities are rebuilt from their qid), per view and for the best of n_s views."""
    from mel_ray import demo_data as dd
    from mel_ray import procedural
    from mel_ray.dataset import load_dataset
    from mel_ray.synthesize import load_synthetic

    ds = load_dataset(inputs["dataset"])
    test = ds.mentions("test", columns=["mention_id", "qid"]).to_pylist()
    if "proc" not in inputs["views"]:
        return {}
    views = load_synthetic(inputs["dataset"], inputs["views"]["proc"]).manifest.to_pylist()
    by_mention: dict[str, list[dict]] = {}
    for v in views:
        by_mention.setdefault(v["mention_id"], []).append(v)
    parts = ("shape", "fg", "pattern", "bg")
    per_view = {p: [] for p in parts}
    best = {n: {p: [] for p in parts} for n in range(1, VIEWS + 1)}
    for row in test:
        u = int(row["qid"][1:])
        gold = dd.look(dd._make_entity(u, dd.TYPE_PATTERN[u % len(dd.TYPE_PATTERN)]))
        looks = [procedural.view_look(v["prompt"], v["seed"]) for v in sorted(by_mention[row["mention_id"]],
                                                                              key=lambda v: v["view"])]
        for p in parts:
            hits = [lk[p] == gold[p] for lk in looks]
            per_view[p].extend(hits)
            for n in best:
                best[n][p].append(any(hits[:n]))
    return {"test_mentions": len(test),
            "per_view_match": {p: float(np.mean(v)) for p, v in per_view.items()},
            "any_of_n_views_match": {f"n_s={n}": {p: float(np.mean(v)) for p, v in d.items()}
                                     for n, d in best.items()},
            "chance": {"fg": 1 / len(dd.PALETTE), "pattern": 1 / len(dd.PATTERNS), "bg": 1 / len(dd.BACKGROUNDS)}}


def negative_confusability(inputs: dict, records: list[dict], out: Path) -> dict:
    """Are the mined negatives the entities the trained models confuse the gold with?"""
    import pyarrow.parquet as pq

    from mel_ray.dataset import load_dataset
    from mel_ray.negatives import read_negatives

    ds = load_dataset(inputs["dataset"])
    ents = ds.entities(columns=["entity_id", "name", "attributes"]).to_pylist()
    names = [e["name"] for e in ents]
    attrs = [set(e["attributes"] or []) for e in ents]
    pool_rows = read_negatives(inputs["dataset"], POOL_K).column("neg_entity_ids").to_pylist()
    pools = [np.asarray(p, dtype=np.int64) for p in pool_rows]
    same_name = {}
    for i, n in enumerate(names):
        same_name.setdefault(n, []).append(i)
    pool_same_name = [np.mean([names[j] == names[i] for j in p[:4]]) for i, p in enumerate(pools) if len(p)]
    has_namesake = [i for i in range(len(names)) if len(same_name[names[i]]) > 1]
    namesake_in_pool = [any(names[j] == names[i] for j in pools[i]) for i in has_namesake]
    rng = np.random.default_rng(0)
    jac = [len(attrs[i] & attrs[j]) / max(1, len(attrs[i] | attrs[j])) for i, p in enumerate(pools) for j in p[:4]]
    rand = [len(attrs[i] & attrs[j]) / max(1, len(attrs[i] | attrs[j]))
            for i, j in rng.integers(0, len(ents), size=(2000, 2)) if i != j]
    # what names alone can reach: the gold is one of the entities carrying its name, picked at random
    test_gold = ds.mentions("test", columns=["entity_id"]).column("entity_id").to_pylist()
    name_only = float(np.mean([1 / len(same_name[names[g]]) for g in test_gold]))
    result = {"name_only_expected_test_H@1": name_only,
              "mean_jaccard_top4": float(np.mean(jac)), "mean_jaccard_random_pair": float(np.mean(rand)),
              "top4_share_same_name": float(np.mean(pool_same_name)),
              "entities_with_namesake": len(has_namesake),
              "namesake_in_top8_pool": float(np.mean(namesake_in_pool)) if namesake_in_pool else None,
              "errors": {}}
    arms = ("in_batch", "base", "proc_in_batch", "proc", "ft_proc_in_batch", "ft_proc")
    for arm in [a for a in arms if any(r["arm"] == a for r in records)]:
        wrong = in_pool = named = 0
        for rec in (r for r in records if r["arm"] == arm):
            table = pq.read_table(out / "eval" / f"{arm}-s{rec['seed']}" / "predictions_test.parquet").to_pylist()
            for row in table:
                top, gold = row["top_entity_ids"][0], row["gold_entity_id"]
                if top == gold:
                    continue
                wrong += 1
                in_pool += int(top in set(pools[gold].tolist()))
                named += int(names[top] == names[gold])
        result["errors"][arm] = {"wrong_top1": wrong, "top1_in_gold_pool": in_pool / max(1, wrong),
                                 "top1_same_name": named / max(1, wrong)}
    return result


def cvacpt_effect(inputs: dict, records: list[dict]) -> dict:
    """How much CVaCPT moves the mention image features (||out - in|| / ||in||) in the trained models, and the
    gradient its parameters receive on one training batch at the trained weights."""
    import torch

    from mel_ray.checkpoints import build_model, load_checkpoint
    from mel_ray.feature_store import EntityStore, load_pools, mention_tensors
    from mel_ray.model.losses import build_columns, contrastive_loss

    out = {}
    for arm in ("base", "proc"):
        rows = []
        for rec in (r for r in records if r["arm"] == arm):
            model = build_model(load_checkpoint(rec["checkpoint"]))
            test = mention_tensors(rec["features"], inputs["dataset"], "test")
            batch = {k: v for k, v in test.items() if isinstance(v, torch.Tensor)}
            with torch.no_grad():
                on = model.mention_features(batch)
                model.cvacpt.weight, w = 0.0, model.cvacpt.weight
                off = model.mention_features(batch)
                model.cvacpt.weight = w
            rel = (on.image_global - off.image_global).norm(dim=1) / off.image_global.norm(dim=1).clamp_min(1e-9)
            has = torch.from_numpy(_mention_has_image(rec["features"], "test"))
            train = mention_tensors(rec["features"], inputs["dataset"], "train", rows=slice(0, 32))
            store = EntityStore(rec["features"])
            pools = load_pools(str(Path(inputs["dataset"]) / "negatives" / f"k{POOL_K}.parquet"), store.num_entities)
            gold = train.pop("gold").numpy()
            cols = build_columns(gold, [pools[g] for g in gold], k=4, mode="jaccard")
            mentions = {k: v for k, v in train.items() if isinstance(v, torch.Tensor)}
            model.train()
            loss, _ = contrastive_loss(model(mentions, store.gather(cols.entity_ids)), cols.targets, cols.mask)
            loss.backward()
            grads = {name: float(torch.sqrt(sum((p.grad ** 2).sum() for p in mod.parameters() if p.grad is not None)))
                     for name, mod in (("cvacpt", model.cvacpt), ("vdlu", model.vdlu), ("tglu", model.tglu))}
            rows.append({"seed": rec["seed"], "rel_change_with_image": float(rel[has].mean()),
                         "rel_change_without_image": float(rel[~has].mean()) if (~has).any() else None,
                         "grad_norm": grads})
        out[arm] = rows
    return out


# ------------------------------------------------------------------------------------------------ report


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def summary_rows(records: list[dict]) -> list[dict]:
    rows = []
    for arm in ARMS:
        recs = [r for r in records if r["arm"] == arm]
        if not recs:
            continue
        src, n_s = ARMS[arm][0]
        cfg = dict(o.split("=", 1) for o in ARMS[arm][1])
        rows.append({
            "arm": arm, "encoder": cfg.get("model.encoder", "frozen"),
            "negatives": cfg.get("train.negatives", "jaccard"),
            "k": "–" if cfg.get("train.negatives") == "in_batch" else cfg.get("train.k", "4"),
            "w": cfg.get("model.cvacpt_weight", "1.0"), "views": "–" if cfg.get("model.cvacpt_weight") == "0.0"
            else f"{src} × {n_s}", "seeds": len(recs),
            **{f"{split}_{m}": _mean_std([r[split][m] for r in recs])
               for split in ("test", "dev") for m in ("H@1", "MRR")},
            "train_s": statistics.mean(r["train_seconds"] for r in recs)})
    return rows


def frozen_vs_finetuned(records: list[dict]) -> list[str]:
    lines = ["| arm | frozen seeds | frozen H@1 | frozen MRR | fine-tuned seeds | fine-tuned H@1 | fine-tuned MRR |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm in MATCHER_ARMS:
        cells = []
        for name in (arm, f"ft_{arm}"):
            recs = [r for r in records if r["arm"] == name]
            cells += [str(len(recs)), _mean_std([r["test"]["H@1"] for r in recs]),
                      _mean_std([r["test"]["MRR"] for r in recs])]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def comparisons(records: list[dict]) -> list[str]:
    """Per-seed paired differences (same seed, same data), with the paired t-test the paper reports."""
    from mel_ray.tune.stats import paired_test

    by = {(r["arm"], r["seed"]): r for r in records}
    pairs = [(f"fine-tuned − frozen CLIP: {a}", f"ft_{a}", a) for a in MATCHER_ARMS]
    pairs += [(f"fine-tuned {label}", f"ft_{a}", f"ft_{b}") for label, a, b in (
        ("(a) jaccard − in_batch", "proc", "proc_in_batch"), ("(a) both − in_batch", "proc_both", "proc_in_batch"),
        ("(a) both − jaccard", "proc_both", "proc"), ("(b) w=1 − w=0", "proc", "proc_w0"),
        ("(c) k=4 − k=2", "proc", "proc_k2"), ("(c) k=6 − k=4", "proc_k6", "proc"))]
    pairs += [("(a) jaccard − in_batch", "proc", "proc_in_batch"),
              ("(a) both − in_batch", "proc_both", "proc_in_batch"),
             ("(a) both − jaccard", "proc_both", "proc"), ("(b) procedural views: w=1 − w=0", "proc", "proc_w0"),
             ("(c) k=4 − k=2", "proc", "proc_k2"), ("(c) k=6 − k=4", "proc_k6", "proc"),
             ("(a, SD) jaccard − in_batch", "base", "in_batch"), ("(a, SD) both − in_batch", "both", "in_batch"),
             ("(b) SD views: w=1 − w=0", "base", "w0"),
             ("(c, SD) k=4 − k=2", "base", "k2"),
             ("(c, SD) k=6 − k=4", "k6", "base"), ("(d) SD n_s=3 − n_s=1", "base", "sd_ns1"),
             ("(d) SD n_s=2 − n_s=1", "sd_ns2", "sd_ns1"), ("(d) procedural n_s=3 − n_s=1", "proc", "proc_ns1"),
             ("(d) procedural n_s=2 − n_s=1", "proc_ns2", "proc_ns1"),
             ("procedural − SD views (n_s=3)", "proc", "base")]
    lines = [("| comparison | seeds | Δ test H@1 (mean ± std) | Δ test MRR (mean ± std) | seeds where better (MRR) | "
              "paired t-test p (H@1) | paired t-test p (MRR) |"), "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    seeds = sorted({r["seed"] for r in records})
    for label, a, b in pairs:
        both = [s for s in seeds if (a, s) in by and (b, s) in by]
        if not both:
            continue
        dh = [by[(a, s)]["test"]["H@1"] - by[(b, s)]["test"]["H@1"] for s in both]
        dm = [by[(a, s)]["test"]["MRR"] - by[(b, s)]["test"]["MRR"] for s in both]
        wins = sum(d > 0 for d in dm)
        ps = []
        for m in ("H@1", "MRR"):
            test = paired_test({s: by[(b, s)]["test"][m] for s in both}, {s: by[(a, s)]["test"][m] for s in both})
            ps.append(test["p"] if isinstance(test["p"], str) else f"{test['p']:.3f}" if test["p"] >= 1e-3
                      else f"{test['p']:.1e}")
        lines.append(f"| {label} | {len(both)} | {_mean_std(dh)} | {_mean_std(dm)} | {wins}/{len(both)} | "
                     f"{ps[0]} | {ps[1]} |")
    return lines


def unit_losses(records: list[dict]) -> list[str]:
    """Per-unit training losses (first and last epoch, mean over seeds) next to chance for the arm's softmax."""
    lines = ["| arm | seeds | overall first → last | text (TGLU) | image (VDLU) | cross (CMFU) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for arm in ARMS:
        recs = [r for r in records if r["arm"] == arm and "train_loss_first" in r]
        if not recs:
            continue
        cells = []
        for unit in ("overall", "text", "image", "cross"):
            first = statistics.mean(r["train_loss_first"][f"loss_{unit}"] for r in recs)
            last = statistics.mean(r["train_loss_last"][f"loss_{unit}"] for r in recs)
            cells.append(f"{first:.3f} → {last:.3f}")
        lines.append(f"| {arm} | {len(recs)} | " + " | ".join(cells) + " |")
    return lines


def render(records: list[dict], inputs: dict, meta: dict, diag: dict) -> str:
    rows = summary_rows(records)
    lines = [BEGIN, "", "### Setup (generated)", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "### Results: test and dev, mean ± sample std over seeds (generated)", "",
              ("| arm | CLIP | negatives | k | CVaCPT w | views × n_s | seeds | test H@1 | test MRR | dev H@1 | "
               "dev MRR | train s |"),
              "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['encoder']} | {r['negatives']} | {r['k']} | {r['w']} | {r['views']} | "
                     f"{r['seeds']} | "
                     f"{r['test_H@1']} | {r['test_MRR']} | {r['dev_H@1']} | {r['dev_MRR']} | {r['train_s']:.0f} |")
    lines += ["", "Frozen vs fine-tuned tiny CLIP, test, mean ± sample std over seeds (– : not run):", ""]
    lines += frozen_vs_finetuned(records)
    lines += ["", "Paired per seed (same data, same training seed; positive = the first arm is better):", ""]
    lines += comparisons(records)
    lines += ["", "Per-unit training losses, mean over seeds (epoch 1 → last epoch):", ""]
    lines += unit_losses(records)
    lines += ["", "Per run (test H@1 / MRR, best dev epoch of the epochs trained):", ""]
    for arm in ARMS:
        recs = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        if recs:
            lines.append(f"- {arm}: " + "; ".join(f"s{r['seed']} {r['test']['H@1']:.4f} / {r['test']['MRR']:.4f} "
                                                 f"(ep {r['best_epoch']}/{r['epochs']})" for r in recs))
    lines += ["", "### Diagnostics (generated)", "", "```json", json.dumps(diag, indent=1), "```", "", END]
    return "\n".join(lines)


def write_doc(path: Path, generated: str) -> None:
    """Replace the generated block, keep the hand-written text around it."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + generated + tail
    else:
        text = "# Experiments: do JD-CCL and CVaCPT help? (issue 5)\n\n" + generated + "\n" + text
    path.write_text(text, encoding="utf-8")


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (f"{platform.node() or 'vm'}, {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GB, "
            f"Python {platform.python_version()}, no GPU, shared with another user's benchmarks (run at nice 19)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default="/tmp/mel-ray-experiments", help="work folder (kept for resuming)")
    p.add_argument("--entities", type=int, default=800)
    p.add_argument("--mentions", type=int, default=2000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4)
    # the tiny CLIP's features are 32-wide: the paper's 512 / 96 matcher sizes only cost time here
    p.add_argument("--hidden", type=int, default=32, help="model.hidden (MIMIC's h; the paper's 96 only costs time)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=FINETUNE_ARMS + MATCHER_ARMS, choices=list(ARMS) + list(ARM_GROUPS),
                   help="arms, or a group: 'finetune' (the six ft_* arms), 'matcher' (their frozen twins)")
    p.add_argument("--until", choices=["features", "arms", "all"], default="all")
    p.add_argument("--report-only", action="store_true",
                   help="run no arm: diagnostics and the doc from the result JSONs already written")
    p.add_argument("--doc", default=str(ROOT / "docs" / "experiments.md"))
    args = p.parse_args(argv)
    args.arms = list(dict.fromkeys(a for name in args.arms for a in ARM_GROUPS.get(name, [name])))
    out = Path(args.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    start_ray(out / ("ray-report" if args.report_only else "ray"))   # a report may run beside the arms
    inputs = build_inputs(out, args)
    if args.until == "features":
        return
    if args.report_only:
        records = [json.loads((out / "results" / f"{a}-s{s}.json").read_text())
                   for a, s in run_order(args.arms, args.seeds) if (out / "results" / f"{a}-s{s}.json").exists()]
    else:
        records = run_arms(inputs, out, args)
    if args.until == "arms":
        return
    log("diagnostics")
    diag = {"negatives": negative_confusability(inputs, records, out), "views": view_information(inputs),
            "procedural_views": procedural_look_agreement(inputs), "encoder_probes": encoder_probes(inputs, records),
            "cvacpt": cvacpt_effect(inputs, records)}
    storage.write_json(str(out / "diagnostics.json"), diag)
    meta = {
        "command": ("nice -n 19 .venv/bin/python benchmarks/experiments.py "
                    + shlex.join(sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "data": (f"make_demo_data(n_entities={args.entities}, n_mentions={args.mentions}, seed={args.data_seed}): "
                 f"{json.dumps(inputs['data_stats']['mentions'])} mentions, name collision rate "
                 f"{inputs['data_stats']['name_collision_rate']}, "
                 f"no-image rate {inputs['data_stats']['no_image_rate']}"),
        "negatives": f"pool k={POOL_K}: {inputs['negatives']}",
        "views": f"{VIEWS} per mention from each of: " + "; ".join(SOURCES[src] for src in inputs["views"]),
        "training": ("train() with configs/demo.yaml + 2 workers x 0.5 CPU, global batch 64 (32 per worker), lr 1e-3 "
                     f"(project optimiser defaults: eps 1e-8, weight decay 0.01, clipping 1.0), {args.epochs} epochs, "
                     f"model.hidden={args.hidden} "
                     "(no early stop), best dev-MRR checkpoint evaluated on test with evaluate() over the full KB"),
        "CLIP": ("frozen arms: model.encoder=frozen, the cached features of the release's tiny random-weight CLIP; "
                 "ft_* arms: model.encoder=finetune, CLIP's towers train with the matcher on the images' and the "
                 "views' pixels (train.encoder_lr 1e-3, the heads' rate), evaluated on the fine-tuned encoder's "
                 "own feature set (train()'s features_uri)"),
        "seeds": f"train.seed in {args.seeds}; data, mining and synthesis seeds fixed at 0",
        "wall time of this invocation": f"{(time.perf_counter() - t0) / 60:.1f} min (arms already done were skipped)",
    }
    write_doc(Path(args.doc), render(records, inputs, meta, diag))
    log(f"wrote {args.doc} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
