"""Full-KB evaluation: mel-ray's scorer against a MIMIC-style reference, same model, same inputs.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_eval.py                          # 110K entities, ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_eval.py --entities 4096 --mentions 16   # smoke run

Paper sizes: 40 text tokens, 50 image tokens (49 patches + CLS), CLIP sizes 512 / 512 / 512 / 768, matcher
h = 96; random features and a random model with non-trivial LayerNorms (timing only). Both ways run in their own
process (peak RSS is per way), with the same number of torch threads:

- reference (what MIMIC's evaluation does): for every mention batch and every 6,000-entity chunk, MIMIC's units
  as written (`mimic_units` below: TGLU's [B, C, Le, Lm] attention and [B, C, Le, h] context, then the mean and
  LN; both DUALs with their per-pair Linear; CMFU), the unit weights applied to the chunk again for every mention
  batch, the [batch, KB] score matrix kept, then a double argsort for the ranks.
- mel-ray (mel_ray.scoring.rank_counts, the kernel each KBShard actor runs): entity-side work once per
  entity chunk, TGLU with the mean over entity positions taken before V (one GEMM for the attention logits,
  in cache-sized entity blocks), DUAL's pair part from per-side vectors, per-chunk counts and top-10 merged
  exactly; memory does not grow with mentions x KB.

The default sizes are what `mel-ray evaluate` sends a KB shard: 256 mentions per call, mention batch 64,
entity chunk 1024 (the reference keeps MIMIC's 6,000-entity chunks and the same mention batch).

Entity features: a pool of random rows, entity j = pool[j % pool] * (1 + j // pool * 1e-3), so no two entities
are equal and fetching a chunk costs the same small amount in both ways. Ranks must be identical, except where
a competitor's score is within float32 rounding of the gold score (the two TGLU forms round differently);
those are counted and their score gaps reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mel_ray.model import MELModel, ModelDims
from mel_ray.scoring import chunks_of, metrics_from_ranks, prepare_chunk, rank_counts

DIMS = ModelDims(text_global=512, text_local=512, image_global=512, image_local=768, hidden=96)
L, P, S = 40, 50, 3
MIMIC_CHUNK = 6000          # MIMIC ranks against the KB in chunks of 6,000 entities


def random_rows(n: int, seed: int, views: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, L, dtype=torch.bool)
    lengths = torch.randint(6, L + 1, (n,), generator=g)
    mask[torch.arange(L)[None, :] < lengths[:, None]] = True
    out = {"text_global": torch.randn(n, DIMS.text_global, generator=g),
           "text_local": torch.randn(n, L, DIMS.text_local, generator=g),
           "text_mask": mask,
           "image_global": torch.randn(n, DIMS.image_global, generator=g),
           "image_local": torch.randn(n, P, DIMS.image_local, generator=g)}
    if views:
        out["synthetic_global"] = torch.randn(n, S, DIMS.image_global, generator=g)
        out["n_views"] = torch.full((n,), S)
    return out


class EntityPool:
    def __init__(self, size: int):
        self.size = size
        self.rows = random_rows(size, 1, views=False)

    def fetch(self, a: int, b: int) -> dict:
        ids = torch.arange(a, b)
        idx, scale = ids % self.size, 1 + (ids // self.size).float() * 1e-3
        out = {}
        for k, v in self.rows.items():
            rows = v[idx]
            out[k] = rows * scale.view(-1, *([1] * (rows.dim() - 1))) if rows.is_floating_point() else rows
        return out

    def gather(self, ids: np.ndarray) -> dict:
        parts = [self.fetch(int(i), int(i) + 1) for i in ids]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def build(seed: int, entities: int, mentions: int, pool: int):
    torch.manual_seed(seed)
    model = MELModel(DIMS).eval()
    with torch.no_grad():   # a trained LayerNorm is not the identity
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    m = random_rows(mentions, 2, views=True)
    m["gold"] = torch.from_numpy(np.random.default_rng(3).choice(entities, mentions, replace=False))
    return model, m, EntityPool(pool)


def mimic_units(model: MELModel, m, e) -> torch.Tensor:
    """MIMIC's units as written, over a [B mentions] x [C entities] block (m, e: matcher inputs after the input
    LayerNorms); every Linear of the units applied here, as MIMIC's forward does per mention batch."""
    t, v, c = model.tglu, model.vdlu, model.cmfu
    h = t.w_q.out_features
    q, k, val = t.w_q(e.text_local), t.w_k(m.text_local), t.w_v(m.text_local)
    att = torch.softmax(torch.einsum("eld,bkd->belk", q, k) / h ** 0.5, dim=-1)      # [B, C, Le, Lm]
    ctx = t.ln_t(torch.einsum("belk,bkd->beld", att, val).mean(dim=2))              # [B, C, h]
    s_t = ((ctx * t.w_c(e.text_global)[None]).sum(-1) + m.text_global @ e.text_global.T) / 2

    def dual(unit, a, b, tokens):             # a: queries [Nq, h]; b, tokens: keys -> [Nq, Nk]
        a1, b1, p = unit.w_cls(a), unit.w_cls(b), unit.w_tok(tokens).mean(dim=1)
        x = unit.w_f(unit.ln_add(p[None] + a1[:, None]))
        g = torch.tanh(unit.w_g(x))
        y = unit.ln_out(g * x + b1[None])
        return (y * unit.ln_out(a1)[:, None]).sum(-1)

    s_v = (dual(v.dual_1, e.image_global, m.image_global, m.image_local).T
           + dual(v.dual_2, m.image_global, e.image_global, e.image_local)) / 2
    s_c = c.fuse(m) @ c.fuse(e).T
    return (s_t + s_v + s_c) / 3


@torch.no_grad()
def reference(model: MELModel, mentions: dict, pool: EntityPool, entities: int, mention_batch: int,
              entity_chunk: int) -> np.ndarray:
    ranks = []
    n = mentions["gold"].shape[0]
    for a in range(0, n, mention_batch):
        batch = {k: v[a:a + mention_batch] for k, v in mentions.items()}
        m = model.mention_features(batch)
        columns = []
        for c in range(0, entities, MIMIC_CHUNK):
            e = model.entity_features(pool.fetch(c, min(entities, c + MIMIC_CHUNK)))
            columns.append(mimic_units(model, m, e))
        scores = torch.cat(columns, dim=1).numpy()                          # [batch, KB]
        order = np.argsort(-scores, axis=1, kind="stable")                   # MIMIC: double argsort
        rank_of = np.argsort(order, axis=1, kind="stable")
        ranks.append(rank_of[np.arange(len(scores)), batch["gold"].numpy()] + 1)
    return np.concatenate(ranks)


def ours(model: MELModel, mentions: dict, pool: EntityPool, entities: int, mention_batch: int,
         entity_chunk: int) -> np.ndarray:
    gold = pool.gather(mentions["gold"].numpy())
    counts, _, _ = rank_counts(model, mentions, gold, chunks_of(pool.fetch, 0, entities, entity_chunk),
                               mention_batch=mention_batch)
    return counts + 1


def cached(model: MELModel, mentions: dict, pool: EntityPool, entities: int, mention_batch: int,
           entity_chunk: int) -> np.ndarray:
    """A KB shard whose entity sides are all in its cache (eval.cache_gb large enough): what every call after the
    first one costs. The one-off preparation is timed apart (printed), not in the pairs/s."""
    start = time.perf_counter()
    prepared = [(a, prepare_chunk(model, pool.fetch(a, min(entities, a + entity_chunk))))
                for a in range(0, entities, entity_chunk)]
    print(json.dumps({"prepare_s": time.perf_counter() - start,
                      "cache_gib": sum(p.nbytes for _, p in prepared) / 2**30}), flush=True)
    CLOCK["start"] = time.perf_counter()
    gold = pool.gather(mentions["gold"].numpy())
    counts, _, _ = rank_counts(model, mentions, gold, iter(prepared), mention_batch=mention_batch)
    return counts + 1


CLOCK: dict[str, float] = {}      # a way may restart the clock after its one-off work (cached: the preparation)


@torch.no_grad()
def gold_gaps(model: MELModel, mentions: dict, pool: EntityPool, rows: np.ndarray, entity_chunk: int,
              entities: int) -> list[float]:
    """For mentions whose ranks differ: the smallest |score - gold score| over the KB (explicit form)."""
    gaps = []
    for i in rows:
        batch = {k: v[i:i + 1] for k, v in mentions.items()}
        ms = model.mention_side(model.mention_features(batch))
        g = int(batch["gold"][0])
        es = model.entity_side(model.entity_features(pool.fetch(g, g + 1)))
        gold = model.pair_logits(ms, es)["overall"][0, 0]
        best = float("inf")
        for c in range(0, entities, entity_chunk):
            es = model.entity_side(model.entity_features(pool.fetch(c, min(entities, c + entity_chunk))))
            s = model.pair_logits(ms, es)["overall"][0]
            s[torch.arange(c, c + s.shape[0]) == g] = float("inf")
            best = min(best, float((s - gold).abs().min()))
        gaps.append(best)
    return gaps


def run_way(args) -> None:
    torch.set_num_threads(args.threads)
    model, mentions, pool = build(0, args.entities, args.mentions, args.pool)
    fn = {"reference": reference, "ours": ours, "cached": cached}[args.way]
    CLOCK["start"] = time.perf_counter()
    ranks = fn(model, mentions, pool, args.entities, args.mention_batch, args.entity_chunk)
    seconds = time.perf_counter() - CLOCK["start"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB -> GiB
    np.save(args.ranks_out, ranks)
    print(json.dumps({"way": args.way, "seconds": seconds, "peak_gib": peak,
                      "pairs_per_s": args.mentions * args.entities / seconds}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entities", type=int, default=110_000)
    ap.add_argument("--mentions", type=int, default=256)
    ap.add_argument("--mention-batch", type=int, default=64)
    ap.add_argument("--entity-chunk", type=int, default=1024)
    ap.add_argument("--pool", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ways", default="ours,reference",
                    help="which ways, in order: ours, reference, cached (ours with every entity side cached)")
    ap.add_argument("--way", choices=["reference", "ours", "cached"], help=argparse.SUPPRESS)
    ap.add_argument("--ranks-out", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "eval.md"))
    args = ap.parse_args()
    if args.way:
        run_way(args)
        return 0

    work = Path("/tmp/mel-ray-bench-eval")
    work.mkdir(parents=True, exist_ok=True)
    results, ranks = {}, {}
    load = []
    for way in args.ways.split(","):
        cmd = [sys.executable, __file__, "--way", way, "--ranks-out", str(work / f"{way}.npy")]
        for name in ("entities", "mentions", "mention_batch", "entity_chunk", "pool", "threads"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        print(f"running {way} ...", flush=True)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        printed = [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
        results[way] = {k: v for d in printed for k, v in d.items()}
        ranks[way] = np.load(work / f"{way}.npy")
        load.append(os.getloadavg()[0])
        print(results[way], flush=True)

    base = "reference" if "reference" in results else "ours"
    first = next(w for w in results if w != base) if len(results) > 1 else base
    differ = np.flatnonzero(ranks[first] != ranks[base])
    gaps = []
    if len(differ):
        torch.set_num_threads(args.threads)
        model, mentions, pool = build(0, args.entities, args.mentions, args.pool)
        gaps = gold_gaps(model, mentions, pool, differ, args.entity_chunk, args.entities)
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_eval.py", *sys.argv[1:]])
    metrics = metrics_from_ranks(ranks[first])
    lines = [
        "# Full-KB evaluation benchmark (CPU)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, no GPU; 1-minute load average after each way: "
        + ", ".join(f"{x:.1f}" for x in load),
        f"- command: `{cmd}`",
        (f"- sizes: {args.entities} entities x {args.mentions} mentions = {args.entities * args.mentions:,} pairs; "
         f"40 text tokens, 50 image tokens, h 96, 3 synthetic views; mention batch {args.mention_batch}, "
         f"entity chunk {args.entity_chunk} (reference: {MIMIC_CHUNK}); {args.threads} torch threads in every way"),
        "",
        f"| way | seconds | pairs/s | peak RSS (GiB) | x {base} |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    titles = {"reference": "MIMIC-style reference (its units as written, 6,000-entity chunks, double argsort)",
              "ours": "mel-ray rank_counts (entity side once per chunk, blocked TGLU, DUAL from per-side vectors)",
              "cached": "mel-ray rank_counts, every entity side already cached (a shard's later calls)"}
    for way, r in results.items():
        extra = (f" (+ {r['prepare_s']:.1f} s once to prepare {r['cache_gib']:.2f} GiB of entity sides)"
                 if way == "cached" else "")
        lines.append(f"| {titles[way]}{extra} | {r['seconds']:.1f} | {r['pairs_per_s']:,.0f} | "
                     f"{r['peak_gib']:.2f} | {r['pairs_per_s'] / results[base]['pairs_per_s']:.2f} |")
    lines += [
        "",
        f"Ranks of {first} vs {base}: identical for {len(ranks[first]) - len(differ)} of {len(ranks[first])} mentions"
        + (f"; the {len(differ)} others have a competitor within {max(gaps):.2e} of the gold score "
           f"(float32 rounding of the two forms)." if len(differ) else ".")
        + f" (Random model: MRR {metrics['MRR']:.4f}, MR {metrics['MR']:.0f}.)",
        "",
        ("Peak RSS includes the entity feature pool "
         f"({args.pool} rows, {args.pool * (L * 512 + P * 768 + 1024) * 4 / 2**30:.2f} GiB) in every way."),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
