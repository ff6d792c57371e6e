"""Retrieve, then rerank (issue 16 item 4): recall and speed of `--candidates C` against exact full-KB scoring.

Run by hand (not a test), nice'd on a shared machine:

    nice -n 19 .venv/bin/python benchmarks/bench_candidates.py --out /tmp/bench-cand            # demo + 1M
    nice -n 19 .venv/bin/python benchmarks/bench_candidates.py --out /tmp/bench-cand --kb-size 100000

(a) Demo benchmark data (mel_ray.demo_data, tiny CLIP features through extract-features, no synthetic views) and
    a model trained on it by the library's train() (frozen features, in-batch negatives). On the test split: exact
    ranks (mel_ray.scoring.rank_counts, what `evaluate` runs) against the candidate path
    (mel_ray.eval.candidates.score_with_candidates, what `evaluate/link --candidates` run) for several C: the
    fraction of mentions whose exact top-1 is among the C candidates, the fraction whose gold is, and H@1 / MRR.
(b) A generated KB of --kb-size entities: the demo KB's real entities (ids 0..n-1, the gold ones) plus generated
    entities appended after them. Generated entities are the demo generator's own (mel_ray.demo_data._make_entity,
    entities of its "universe" that are not in the demo KB), their texts encoded by the real tiny CLIP
    (mel_ray.features.Encoder, the extract-features encoder, float16 as stored); their images are the demo KB's
    real image features, shared round-robin (a small image pool: rendering and encoding a million images would not
    fit the time). The test mentions are linked against it with the candidate path in this process (the kernel of
    link's CandidateScorer actor; the KB is held in memory here instead of memory-mapped); exact scoring, far too
    slow for every mention, runs on a sample of mentions for the recall.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from mel_ray.eval.candidates import entity_vector_table, score_with_candidates
from mel_ray.scoring import chunks_of, metrics_from_ranks, rank_counts

CANDIDATES = (10, 50, 100)


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


# ------------------------------------------------------------------------------------------- (a) inputs


def build_demo(out: Path, args) -> dict:
    """Tiny models, demo release, dataset, features (no views), a trained frozen model; each step resumes."""
    import ray

    from mel_ray import storage
    from mel_ray.config import FeaturesConfig, IngestConfig, load_config
    from mel_ray.demo_data import make_demo_data
    from mel_ray.features import extract_features
    from mel_ray.ingest import ingest
    from mel_ray.tiny_models import make_tiny_models
    from mel_ray.train.run import train

    models = make_tiny_models(str(out / "models"))
    make_demo_data(str(out / "raw"), n_entities=args.entities, n_mentions=args.mentions, seed=0)
    dataset = str(out / "dataset")
    if not storage.exists(storage.join(dataset, "manifest.json")):
        ingest("mimic", str(out / "raw"), dataset, name="bench-candidates", options=IngestConfig())
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(out / "ray"), object_store_memory=1024 ** 3)
    t0 = time.perf_counter()
    features = extract_features(dataset, models["clip"], FeaturesConfig(batch_size=64, num_gpus=0), quiet=True)["uri"]
    log(f"features {features} ({time.perf_counter() - t0:.0f}s)")
    model_pt = out / "model.txt"
    if not model_pt.exists():
        cfg = load_config(ROOT / "configs" / "demo.yaml", [
            "model.encoder=frozen", "model.cvacpt_weight=0.0", f"model.hidden={args.hidden}", "train.num_workers=2",
            "train.cpus_per_worker=0.5", "train.batch_size=64", f"train.epochs={args.epochs}", "train.lr=1e-3",
            "train.negatives=in_batch", f"train.patience={args.epochs}", f"models.clip={models['clip']}",
            "tracking.experiment=bench-candidates"])
        t0 = time.perf_counter()
        result = train(cfg, dataset, features_uri=features, storage_path=str(out / "runs"), run_name="bench",
                       tracking_dir=str(out))
        log(f"trained {args.epochs} epochs ({time.perf_counter() - t0:.0f}s): best dev {result['best']}")
        model_pt.write_text(result["checkpoint"])
    ray.shutdown()
    return {"dataset": dataset, "features": features, "checkpoint": model_pt.read_text(), "clip": models["clip"]}


def load_model(checkpoint: str):
    from mel_ray.checkpoints import build_model, load_checkpoint

    return build_model(load_checkpoint(checkpoint)).eval()


# ------------------------------------------------------------------------------------------- (a) recall


def exact_and_candidates(model, mentions: dict, gold: dict, chunks, vecs, fetch, cands: tuple[int, ...]) -> dict:
    t0 = time.perf_counter()
    counts, top_ids, _ = rank_counts(model, mentions, gold, chunks(), mention_batch=64, topk=10)
    exact_s = time.perf_counter() - t0
    n = len(counts)
    rows = {"exact": {**metrics_from_ranks(counts + 1), "seconds": exact_s, "mentions_per_second": n / exact_s}}
    for c in cands:
        t0 = time.perf_counter()
        got = score_with_candidates(model, mentions, vecs, fetch, c, 10, gold_features=gold, mention_batch=256)
        s = time.perf_counter() - t0
        rows[f"C={c}"] = {**metrics_from_ranks(got["ranks"]), "seconds": s, "mentions_per_second": n / s,
                          "gold_in_candidates": float(got["gold_in_candidates"].mean()),
                          "exact_top1_in_candidates": float((got["candidates"] == top_ids[:, :1]).any(1).mean()),
                          "top1_equals_exact": float((got["top_ids"][:, 0] == top_ids[:, 0]).mean())}
    return rows


def demo_recall(inputs: dict) -> dict:
    from mel_ray.feature_store import EntityStore, mention_tensors

    model = load_model(inputs["checkpoint"])
    store = EntityStore(inputs["features"])
    mentions = mention_tensors(inputs["features"], inputs["dataset"], "test")
    gold = store.gather(mentions["gold"].numpy())
    n_kb = store.num_entities

    def chunks():
        return chunks_of(store.chunk, 0, n_kb, 1024)

    vecs = entity_vector_table(model, chunks())
    rows = exact_and_candidates(model, mentions, gold, chunks, vecs, store.gather, CANDIDATES)
    return {"entities": n_kb, "mentions": len(mentions["mention_id"]), "rows": rows}


# --------------------------------------------------------------------------------------- (b) large KB


class GeneratedKB:
    """The demo KB's real entity features followed by generated entities (texts encoded by the tiny CLIP, images
    from the demo KB's pool), float16 in memory like the feature store; fetch/chunk give float32 tensors."""

    def __init__(self, base: dict, text_global: np.ndarray, text_local: np.ndarray, text_mask: np.ndarray):
        self.base = base                                   # the demo KB's features (numpy, float16)
        self.n_base = len(base["text_global"])
        self.text_global = np.concatenate([base["text_global"], text_global])
        self.text_local = np.concatenate([base["text_local"], text_local])
        self.text_mask = np.concatenate([base["text_mask"], text_mask])
        self.num_entities = len(self.text_global)

    def gather(self, ids: np.ndarray) -> dict:
        ids = np.asarray(ids, dtype=np.int64)
        image = ids % self.n_base                          # generated entities: the pool, round robin
        f32 = (lambda a: torch.from_numpy(a.astype(np.float32)))
        return {"text_global": f32(self.text_global[ids]), "text_local": f32(self.text_local[ids]),
                "text_mask": torch.from_numpy(self.text_mask[ids].astype(bool)),
                "image_global": f32(self.base["image_global"][image]),
                "image_local": f32(self.base["image_local"][image])}

    def chunk(self, a: int, b: int) -> dict:
        return self.gather(np.arange(a, b))


def generated_texts(n: int, pool: int = 20_000, start: int = 50_000_000) -> list[str]:
    """Entity texts as extract-features builds them (name [SEP] attribute statements) for n generated entities.

    The demo generator's own entities (mel_ray.demo_data._make_entity, of its "universe", numbers far from the
    demo KB's) take ~1 ms each, too slow for a million: `pool` of them are made and entity k takes the name of one
    and the attribute statements of another (k -> (k mod pool, (k div pool + k) mod pool)), all n pairs distinct
    while n <= pool^2."""
    from mel_ray.demo_data import TYPE_PATTERN, _make_entity, wiki_title
    from mel_ray.features.inputs import entity_text

    made = [_make_entity(u, TYPE_PATTERN[u % len(TYPE_PATTERN)]) for u in range(start, start + min(n, pool))]
    names = [wiki_title(e["name"]) for e in made]
    attrs = [[f"{p}: {v}" for p, v in e["attrs"]] for e in made]
    m = len(made)
    return [entity_text(names[k % m], attrs[(k // m + k) % m]) for k in range(n)]


def encode_texts(clip: str, texts: list[str], text_length: int, batch: int = 2048) -> tuple[np.ndarray, ...]:
    from mel_ray.features import Encoder, load_processor, output_size
    from mel_ray.features.inputs import tokenize
    from mel_ray.models import DEFAULT_CACHE

    tokenizer, image_cfg = load_processor(clip, DEFAULT_CACHE)
    encoder = Encoder(clip, DEFAULT_CACHE, None, False, output_size(image_cfg), text_length)
    tg, tl, tm = [], [], []
    # Encoder.encode encodes texts and images together: one blank image per call (its features are not used)
    blank = np.zeros((1, 3, *output_size(image_cfg)), dtype=np.float32)
    for a in range(0, len(texts), batch):
        ids, mask = tokenize(tokenizer, texts[a:a + batch], text_length)
        f = encoder.encode(ids.astype(np.int64), mask, blank, len(ids))
        tg.append(f["text_global"])
        tl.append(f["text_local"])
        tm.append(mask.astype(bool))
    return np.concatenate(tg), np.concatenate(tl), np.concatenate(tm)


def large_kb(inputs: dict, kb_size: int, sample: int, out: Path) -> dict:
    from mel_ray.feature_store import load_features, mention_tensors, read_manifest

    model = load_model(inputs["checkpoint"])
    base = load_features(inputs["features"], "entities")
    n_new = kb_size - len(base["text_global"])
    cache = out / f"generated-{n_new}.npz"
    t0 = time.perf_counter()
    if cache.exists():
        z = np.load(cache)
        tg, tl, tm = z["tg"], z["tl"], z["tm"]
    else:
        texts = generated_texts(n_new)
        log(f"generated {n_new} entity texts ({time.perf_counter() - t0:.0f}s)")
        text_length = int(read_manifest(inputs["features"])["settings"]["text_length"])
        tg, tl, tm = encode_texts(inputs["clip"], texts, text_length)
        np.savez(cache, tg=tg, tl=tl, tm=tm)
    gen_s = time.perf_counter() - t0
    log(f"{n_new} generated entities encoded by the tiny CLIP ({gen_s:.0f}s)")
    kb = GeneratedKB(base, tg, tl, tm)
    mentions = mention_tensors(inputs["features"], inputs["dataset"], "test")
    gold = kb.gather(mentions["gold"].numpy())

    def chunks():
        return chunks_of(kb.chunk, 0, kb.num_entities, 8192)

    t0 = time.perf_counter()
    vecs = entity_vector_table(model, chunks())
    vec_s = time.perf_counter() - t0
    log(f"first-stage vectors of {kb.num_entities} entities: {tuple(vecs.shape)} ({vec_s:.0f}s)")
    n = len(mentions["mention_id"])
    rows = {}
    for c in CANDIDATES:
        t0 = time.perf_counter()
        got = score_with_candidates(model, mentions, vecs, kb.gather, c, 10, gold_features=gold, mention_batch=256)
        s = time.perf_counter() - t0
        rows[f"C={c}"] = {**metrics_from_ranks(got["ranks"]), "seconds": s, "mentions_per_second": n / s,
                          "gold_in_candidates": float(got["gold_in_candidates"].mean()), "got": got}
        log(f"C={c}: {n} mentions in {s:.1f}s, gold in candidates {rows[f'C={c}']['gold_in_candidates']:.3f}")
    # exact full-KB scoring on a sample of mentions (every c-th): the recall of the candidates against it
    pick = np.linspace(0, n - 1, min(sample, n)).astype(int)
    sub = {k: v[pick] for k, v in mentions.items() if isinstance(v, torch.Tensor)}
    sub_gold = {k: v[pick] for k, v in gold.items()}
    t0 = time.perf_counter()
    counts, top_ids, _ = rank_counts(model, sub, sub_gold, chunks(), mention_batch=64, topk=10)
    exact_s = time.perf_counter() - t0
    log(f"exact on {len(pick)} mentions: {exact_s:.0f}s")
    for c in CANDIDATES:
        got = rows[f"C={c}"].pop("got")
        rows[f"C={c}"]["sample"] = {
            **metrics_from_ranks(got["ranks"][pick]),
            "exact_top1_in_candidates": float((got["candidates"][pick] == top_ids[:, :1]).any(1).mean()),
            "top1_equals_exact": float((got["top_ids"][pick, 0] == top_ids[:, 0]).mean())}
    rows["exact (sample)"] = {**metrics_from_ranks(counts + 1), "seconds": exact_s,
                              "mentions_per_second": len(pick) / exact_s}
    return {"entities": kb.num_entities, "generated": n_new, "mentions": n, "sample": len(pick),
            "generate_seconds": gen_s, "vector_seconds": vec_s, "vector_table_gb": vecs.numel() * 4 / 1024 ** 3,
            "rows": rows, "peak_rss_gb": peak_rss_gb()}


# ------------------------------------------------------------------------------------------------ report


def render(result: dict) -> str:
    lines = [(f"Machine: {result['machine']}; {result['date']}; load average (1, 5, 15 min) at start "
              f"{result['load_start']}, at end {result['load_end']}."), "", f"Command: `{result['command']}`", ""]
    d = result.get("demo")
    if d:
        lines.append(f"(a) Demo benchmark data: {d['entities']} entities, {d['mentions']} test mentions, trained "
                     "model (frozen tiny-CLIP features, in-batch negatives).")
        lines += ["", ("| ranking | H@1 | MRR | exact top-1 in candidates | gold in candidates | top-1 = exact top-1 "
                  "| mentions/s |"), "|---|---|---|---|---|---|---|"]
        for name, r in d["rows"].items():
            lines.append(f"| {name} | {100 * r['H@1']:.2f} | {100 * r['MRR']:.2f} | "
                         f"{_pct(r.get('exact_top1_in_candidates'))} | {_pct(r.get('gold_in_candidates'))} | "
                         f"{_pct(r.get('top1_equals_exact'))} | {r['mentions_per_second']:.0f} |")
        lines.append("")
    g = result.get("large")
    if g:
        lines.append(f"(b) Generated KB of {g['entities']:,} entities ({g['generated']:,} generated, texts encoded "
                     f"by the tiny CLIP in {g['generate_seconds']:.0f}s; first-stage vectors "
                     f"{g['vector_seconds']:.0f}s, {g['vector_table_gb']:.2f} GB), {g['mentions']} test mentions; "
                     f"peak RSS of the process {g['peak_rss_gb']:.1f} GB. Exact full-KB scoring on a sample of "
                     f"{g['sample']} mentions only.")
        lines += ["", ("| ranking | mentions/s | H@1 (all) | MRR (all) | gold in candidates (all) | sample: H@1 "
                  "| sample: MRR | sample: exact top-1 in candidates | sample: top-1 = exact |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in g["rows"].items():
            s = r.get("sample", r)
            h1, mrr = (f"{100 * r['H@1']:.2f}", f"{100 * r['MRR']:.2f}") if "sample" in r else ("", "")
            lines.append(f"| {name} | {r['mentions_per_second']:.1f} | {h1} | {mrr} | "
                         f"{_pct(r.get('gold_in_candidates'))} | {100 * s['H@1']:.2f} | {100 * s['MRR']:.2f} | "
                         f"{_pct(s.get('exact_top1_in_candidates'))} | {_pct(s.get('top1_equals_exact'))} |")
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--entities", type=int, default=2000)
    p.add_argument("--mentions", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--kb-size", type=int, default=1_000_000, help="0: skip the large KB")
    p.add_argument("--sample", type=int, default=32, help="mentions scored exactly against the large KB")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"torch threads {args.threads}",
              "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}", "load_start": os.getloadavg(),
              "command": " ".join(["benchmarks/bench_candidates.py", *(argv if argv is not None else sys.argv[1:])])}
    inputs = build_demo(out, args)
    previous = out / "result.json"       # a rerun for another KB size keeps part (a)'s numbers (same inputs)
    previous = json.loads(previous.read_text()) if previous.exists() else {}
    result["demo"] = previous.get("demo") or demo_recall(inputs)
    if "demo_date" in previous or previous.get("demo"):
        result["demo_date"] = previous.get("demo_date", previous["date"])
    log(json.dumps(result["demo"]["rows"]))
    (out / "result.json").write_text(json.dumps(result, indent=1, default=float))
    if args.kb_size:
        result["large"] = large_kb(inputs, args.kb_size, args.sample, out)
    result["load_end"] = os.getloadavg()
    (out / "result.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "result.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
