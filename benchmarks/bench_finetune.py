"""End-to-end fine-tuning (`model.encoder: finetune`) on CPU: Ray's overhead against plain PyTorch, side by side.

Run by hand (not a test); each part writes its own markdown file under benchmarks/results/ (docs/benchmarks.md,
"End-to-end fine-tuning", has the numbers):

    .venv/bin/python benchmarks/bench_finetune.py --only step        # ~3-4 min on 2 cores: finetune-step.md
    .venv/bin/python benchmarks/bench_finetune.py --only workers     # ~5-10 min: finetune-workers.md
    .venv/bin/python benchmarks/bench_finetune.py --only reencode    # ~5-9 min: finetune-reencode.md
    .venv/bin/python benchmarks/bench_finetune.py --epochs 1 --reps 1 --entities 300 --mentions 200   # smoke run

The first run builds the model and the data under --workdir (kept; later runs reuse them). The three parts:

- `step`: one finetune training step, Ray Train with 1 worker against a plain single-process loop. Both build
  the same model (seed 0: a MELModel with `encoder=finetune` over the benchmark CLIP, its pretrained weights
  loaded, `make_optimizer`), run the same `mel_ray.train.loop.train_step` (GlobalBatchStep, in_batch negatives)
  on the same batches (consecutive rows of the train reference table, no shuffle; checked: the same mention ids
  per step and bit-identical losses) with 1 torch thread. The Ray side is a real `TorchTrainer` (1 worker,
  gloo), whose loop iterates its Ray Data shard of `mel_ray.train.inputs.decoded(table)` (images decoded by
  Ray Data CPU tasks while the worker trains, as in `mel-ray train`, but in order). The plain loop runs in this
  process and decodes every row with `decode_rows` BEFORE its steps (that time is in its end-to-end time, not
  in its steps). Both are alive at once and take turns of `--block` steps (A B, B A, ...; `Turns`), so a
  change of the machine's load hits both alike. Step time, both sides = from the end of one step to the end
  of the next, so it holds `to_tensors` and (Ray) any wait for data; the first `--warmup` steps of each epoch
  are left out. End to end: plain = model build + decode + steps; Ray = the whole `trainer.fit()` less the
  time its worker waited for the plain loop's turns.
- `workers`: the same finetune steps with the same global batch, Ray Train as 2 workers x 1 torch thread
  (DDP over gloo; the in_batch softmax covers the global batch, mel_ray.train.global_batch) against 1 worker x
  2 threads, and 1 worker x 1 thread as the reference; the three runs take turns the same way (so the Ray
  instance declares 5 logical CPUs; the torch threads share the physical cores). mentions/s from the median
  step time (the slower rank's) and over all steps.
- `reencode`: re-encoding the KB with a fine-tuned encoder. (1) `extract_features(..., checkpoint=...)`,
  entities only, engine "ray" (Ray Data decode tasks + 1 encoder actor) against engine "local" (one process),
  1 torch thread each, calls alternating; outputs checked byte-identical. (2) the in-training dev evaluation,
  `mel_ray.train.finetune.dev_statistics` on 1 rank (Ray Data decodes the KB chunks), against the same
  arithmetic as a plain in-process loop (decode_rows, to_tensors, the encoder, rank_counts); statistics
  checked identical. The checkpoint is the benchmark CLIP + matcher after one finetune step (so its encoder
  is not the base CLIP's).

The CLIP is random (seeded), built from a config big enough that compute dominates (default: hidden 128,
4 layers, 96 px images, patch 16 -> 36 patches + CLS, 40 text tokens: ~0.3-0.6 s per step of 16 mentions on
one core); the data are the generated demo release (64 px PNG/JPEG images), no synthetic views by default.
Ray runs a local instance on a temp dir per part (never `ray stop`), without the dashboard (as the tests'
Ray; on a loaded 2-core machine a Ray with the dashboard often missed its own 30 s start-up deadline).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

# Ray reads these when it is imported: set before anything imports it
os.environ.setdefault("RAY_AUTH_MODE", "token")
if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pyarrow as pa
import torch

RESULTS = HERE / "results"


# ------------------------------------------------------------------------------ shared: model, batches, step


def numpy_batch(table: pa.Table) -> dict:
    """A reference table as the numpy batch Ray Data hands `decode_rows` (object columns for bytes and lists)."""
    out = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        out[name] = np.array(values, dtype=np.int64) if name in ("gold", "entity_id") else \
            np.array([*values, None], dtype=object)[:-1]
    return out


def build_model(config: dict):
    """The finetune MELModel both sides train (seed 0, the benchmark CLIP's weights) and its optimizer."""
    from mel_ray.model import MELModel, ModelDims
    from mel_ray.train.loop import make_optimizer

    torch.manual_seed(0)
    model = MELModel(ModelDims(**config["dims"]))
    model.encoder.load_pretrained(config["clip"], config["cache_dir"])
    return model, make_optimizer(model, config["train"])


def one_step(model, optimizer, batch: dict, config: dict, rng, device) -> dict:
    """What train_loop_per_worker does with one decoded batch: to_tensors, the candidates, train_step."""
    from mel_ray.train import inputs as ft
    from mel_ray.train.finetune import CandidateStore, pools_of
    from mel_ray.train.loop import train_step

    decode = config["decode"]
    mentions, candidates = ft.to_tensors(batch, decode)
    parts, _ = train_step(model, optimizer, mentions, CandidateStore(candidates),
                          pools_of(mentions["gold"].numpy(), candidates), config["train"], rng, device, False)
    return parts


class Turns:
    """Side by side in one run: the parties (the Ray Train workers of a run, or the plain loop in this process)
    take turns of `block` steps, in the order the driver gives. Turns pass through files in a folder (the
    workers are other processes); the waits are outside every timed region."""

    def __init__(self, folder: Path):
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    def give(self, mode: str, block: int, ranks: int, alive) -> None:
        """Hand block `block` to `mode` and wait until each of its `ranks` says it is done (alive(): its fit()
        thread still runs; if it ended, its error is raised by the caller's join)."""
        tmp = self.folder / "turn.tmp"
        tmp.write_text(f"{mode} {block}")
        os.replace(tmp, self.folder / "turn")
        done = [self.folder / f"done-{mode}-{block}-{r}" for r in range(ranks)]
        while not all(d.exists() for d in done):
            if not alive():
                raise RuntimeError(f"the {mode} run ended before finishing block {block}")
            time.sleep(0.002)

    @staticmethod
    def wait(folder: str, mode: str, block: int) -> float:
        """(worker) Wait for this block's turn; returns the seconds waited."""
        t0 = time.perf_counter()
        turn = Path(folder, "turn")
        while not (turn.exists() and turn.read_text() == f"{mode} {block}"):
            time.sleep(0.002)
        return time.perf_counter() - t0

    @staticmethod
    def done(folder: str, mode: str, block: int, rank: int) -> None:
        Path(folder, f"done-{mode}-{block}-{rank}").write_text("")


def blocks_of(total: int, block: int) -> list[int]:
    """Steps per turn: `block` each, the last one what is left."""
    return [min(block, total - a) for a in range(0, total, block)]


def worker_loop(config: dict) -> None:
    """The Ray Train side (runs in every worker): `epochs` passes over the worker's Ray Data shard, one
    train_step per batch, in the turns the driver gives."""
    import ray.train
    import ray.train.torch

    from mel_ray.train.global_batch import GlobalBatchStep

    entered = time.perf_counter()
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, optimizer = build_model(config)
    # as train_loop_per_worker: CVaCPT gets no gradient without views, so DDP must look for unused parameters
    ddp = {"find_unused_parameters": config["decode"]["n_views"] == 0}
    step_model = ray.train.torch.prepare_model(GlobalBatchStep(model), parallel_strategy_kwargs=ddp)
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    rng = np.random.default_rng([config["train"]["seed"], 0, rank])
    step_model.train()
    setup = time.perf_counter() - entered

    def batches():
        for epoch in range(config["epochs"]):
            for i, batch in enumerate(shard.iter_batches(batch_size=config["train"]["batch_size"] // world,
                                                         batch_format="numpy")):
                yield epoch, i, batch

    feed = batches()
    steps, waited = [], 0.0
    for block, n in enumerate(config["blocks"]):
        waited += Turns.wait(config["turns"], config["mode"], block)
        last = time.perf_counter()
        for _ in range(n):
            epoch, i, batch = next(feed)
            parts = one_step(step_model, optimizer, batch, config, rng, device)
            now = time.perf_counter()
            steps.append({"epoch": epoch, "i": i, "seconds": now - last, "block": block,
                          "loss": parts["loss_overall"], "ids": [str(m) for m in batch["mention_id"]]})
            last = now
        Turns.done(config["turns"], config["mode"], block, rank)
    # a file, not ray.train.report: Train V2 keeps metrics only with checkpoints
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({
        "steps": steps, "setup": setup, "waited": waited, "threads": torch.get_num_threads(), "world": world,
        "worker_seconds": time.perf_counter() - entered}))


class PlainLoop:
    """The plain side: this process, no Ray. Every row is decoded first (decode_rows, timed apart), then the same
    steps on the same batches, in the same turns."""

    def __init__(self, config: dict, table: pa.Table, epochs: int):
        from mel_ray.train import inputs as ft
        from mel_ray.train.global_batch import GlobalBatchStep

        self.config = config
        saved = torch.get_num_threads()
        torch.set_num_threads(config["threads"])
        t0 = time.perf_counter()
        model, self.optimizer = build_model(config)
        self.model = GlobalBatchStep(model)
        self.model.train()
        built = time.perf_counter()
        bs = config["train"]["batch_size"]
        decoded = [ft.decode_rows(numpy_batch(table.slice(a, bs)), **config["decode"])
                   for a in range(0, table.num_rows, bs)]
        self.build, self.decode = built - t0, time.perf_counter() - built
        torch.set_num_threads(saved)
        self.feed = iter([(epoch, i, batch) for epoch in range(epochs) for i, batch in enumerate(decoded)])
        self.rng = np.random.default_rng([config["train"]["seed"], 0, 0])
        self.steps: list[dict] = []

    def run(self, block: int, n: int) -> None:
        saved = torch.get_num_threads()
        torch.set_num_threads(self.config["threads"])
        try:
            last = time.perf_counter()
            for _ in range(n):
                epoch, i, batch = next(self.feed)
                parts = one_step(self.model, self.optimizer, batch, self.config, self.rng, torch.device("cpu"))
                now = time.perf_counter()
                self.steps.append({"epoch": epoch, "i": i, "seconds": now - last, "block": block,
                                   "loss": parts["loss_overall"], "ids": [str(m) for m in batch["mention_id"]]})
                last = now
        finally:
            torch.set_num_threads(saved)


# ------------------------------------------------------------------------------ setup


def prepare(work: Path, args) -> dict:
    """The benchmark CLIP, the demo release and its fine-tuning reference tables (in_batch: no pools)."""
    from bench_features import build_clip, build_data

    from mel_ray.config import load_config
    from mel_ray.dataset import load_dataset
    from mel_ray.model.encoder import clip_config_of, encoder_sizes
    from mel_ray.train import inputs as ft

    clip = build_clip(work / f"clip-{args.hidden}-{args.layers}-{args.image}-{args.patch}", args.hidden,
                      args.layers, args.image, args.patch)
    ds_uri = build_data(work / f"data-{args.entities}-{args.mentions}-{args.views}", args.entities, args.mentions,
                        args.views)
    cache = str(work / "cache")
    n = load_dataset(ds_uri).num_entities
    key = "bench" if args.views else None
    inputs = ft.build_inputs(ds_uri, clip, text_length=40, synthetic_key=key, views=args.views or None,
                             pools=[np.zeros(0, np.int64)] * n, pool_head=0, seed=0, cache_dir=cache)
    clip_config = clip_config_of(clip, cache)
    train = load_config(None, ["train.negatives=in_batch", f"train.batch_size={args.batch_size}",
                               "train.num_workers=1", "train.lr=1e-4", "train.encoder_lr=1e-5"]).train.model_dump()
    dims = {**encoder_sizes(clip_config), "hidden": 96, "encoder": "finetune", "encoder_config": clip_config}
    return {"clip": clip, "dataset": ds_uri, "cache_dir": cache, "inputs": inputs, "train": train, "dims": dims,
            "decode": inputs.decode_kwargs()}


def start_ray(work: Path, num_cpus: int) -> None:
    import ray
    from ray.data import DataContext

    for attempt in range(5):        # on a loaded machine the raylet may miss Ray's 30 s start-up deadline
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     _temp_dir=str(work / "ray"))
            break
        except Exception as err:    # Ray raises a bare Exception on that timeout
            ray.shutdown()
            if attempt == 4:
                raise
            print(f"ray.init failed ({err}); again in 20 s", flush=True)
            time.sleep(20)
    DataContext.get_current().enable_progress_bars = False


class Fit:
    """One TorchTrainer run of `worker_loop` in a background thread (its fit() blocks); `result()` joins it and
    returns (wall seconds of fit(), every rank's record)."""

    def __init__(self, setup: dict, table: pa.Table, work: Path, name: str, mode: str, workers: int, threads: int,
                 cpus_per_worker: float, epochs: int, blocks: list[int], turns: Turns):
        import threading

        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        from mel_ray.train.inputs import decoded
        from mel_ray.train.run import ingest_options

        self.out, self.workers = work / "out" / name, workers
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        config = {k: setup[k] for k in ("clip", "cache_dir", "train", "dims", "decode")}
        config.update(threads=threads, out=str(self.out), epochs=epochs, blocks=blocks, turns=str(turns.folder),
                      mode=mode)
        options = ingest_options()          # mel-ray train's, but ordered: the plain loop's batches, in its order
        options.preserve_order = True
        self.trainer = TorchTrainer(
            worker_loop, train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                   resources_per_worker={"CPU": cpus_per_worker}),
            run_config=ray.train.RunConfig(name=name, storage_path=str(work / "runs")),
            torch_config=TorchConfig(backend="gloo"),
            datasets={"train": decoded(table, setup["inputs"])},
            dataset_config=ray.train.DataConfig(execution_options=options),
        )
        self.outcome: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.outcome["result"] = self.trainer.fit()
        except BaseException as err:  # noqa: BLE001 - raised again in result()
            self.outcome["error"] = err
        self.outcome["wall"] = time.perf_counter() - t0

    def alive(self) -> bool:
        return self.thread.is_alive()

    def result(self) -> tuple[float, list[dict]]:
        self.thread.join()
        if "error" in self.outcome:
            raise self.outcome["error"]
        if self.outcome["result"].error:
            raise self.outcome["result"].error
        ranks = [json.loads((self.out / f"rank{r}.json").read_text()) for r in range(self.workers)]
        return self.outcome["wall"], ranks


def order(sides: tuple, block: int) -> tuple:
    """The sides rotated by one each block (A B, B A, ... / A B C, B C A, ...): a load drift during a round of
    turns hits every side alike."""
    k = block % len(sides)
    return sides[k:] + sides[:k]


def steady_steps(steps: list[dict], warmup: int) -> list[float]:
    """Step seconds without the first `warmup` steps of each epoch (model warm-up; Ray: the pipeline's start)."""
    return [s["seconds"] for s in steps if s["i"] >= warmup]


def pair_ratios(a: list[dict], b: list[dict], warmup: int) -> list[float]:
    """Per pair of turns (same block index): median steady step of a / of b."""
    out = []
    for block in sorted({s["block"] for s in a}):
        x = [s["seconds"] for s in a if s["block"] == block and s["i"] >= warmup]
        y = [s["seconds"] for s in b if s["block"] == block and s["i"] >= warmup]
        if x and y:
            out.append(statistics.median(x) / statistics.median(y))
    return out


def header(title: str, args, started: datetime.datetime, load_start: tuple) -> list[str]:
    from bench_features import machine

    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_finetune.py", *sys.argv[1:]])
    return [
        f"# {title}",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} (local time)",
        (f"- machine: {machine()}; Python {sys.version.split()[0]}, torch {torch.__version__}, no GPU; "
         f"load average (1 min) at start / end {load_start[0]:.1f} / {os.getloadavg()[0]:.1f} (shared machine)"),
        f"- command: `{cmd}`",
        (f"- model: MELModel, encoder=finetune, matcher h 96, over a random CLIP (hidden {args.hidden}, "
         f"{args.layers} layers text and vision, {max(1, args.hidden // 64)} heads, image {args.image} px, "
         f"patch {args.patch} = {(args.image // args.patch) ** 2} patches + CLS, 40 text tokens, projection "
         f"{args.hidden}); float32"),
        (f"- data: demo release, {args.entities} entities / {args.mentions} mentions (64 px images), "
         f"{args.views} synthetic views per mention"),
    ]


def train_table(setup: dict, bs: int) -> pa.Table:
    """The train rows, cut to whole batches."""
    table = setup["inputs"].tables["train"]
    return table.slice(0, table.num_rows // bs * bs)


# ------------------------------------------------------------------------------ part 1: Ray Train vs plain loop


def bench_step(setup: dict, work: Path, args) -> list[str]:
    bs = args.batch_size
    table = train_table(setup, bs)
    per_epoch = table.num_rows // bs
    blocks = blocks_of(per_epoch * args.epochs, args.block)
    config = {k: setup[k] for k in ("clip", "cache_dir", "train", "dims", "decode")}
    config["threads"] = 1
    turns = Turns(work / "turns-step")
    t0 = time.perf_counter()
    plain = PlainLoop(config, table, args.epochs)
    plain_prep = time.perf_counter() - t0
    run = Fit(setup, table, work, "step", "ray", workers=1, threads=1, cpus_per_worker=1.0, epochs=args.epochs,
              blocks=blocks, turns=turns)
    for block, n in enumerate(blocks):
        for side in order(("ray", "plain"), block):
            if side == "ray":
                turns.give("ray", block, 1, run.alive)
            else:
                plain.run(block, n)
        if block % 8 == 7:
            print(f"block {block + 1}/{len(blocks)}, load {os.getloadavg()[0]:.1f}", flush=True)
    wall, (worker,) = run.result()
    ray_steps, plain_steps = worker["steps"], plain.steps
    same_batches = [s["ids"] for s in ray_steps] == [s["ids"] for s in plain_steps]
    same_losses = [s["loss"] for s in ray_steps] == [s["loss"] for s in plain_steps]
    ray_step = statistics.median(steady_steps(ray_steps, args.warmup))
    plain_step = statistics.median(steady_steps(plain_steps, args.warmup))
    pairs = pair_ratios(ray_steps, plain_steps, args.warmup)
    ray_e2e = wall - worker["waited"]
    plain_e2e = plain_prep + sum(s["seconds"] for s in plain_steps)
    firsts = {name: [s["seconds"] for s in steps if s["i"] == 0] for name, steps in
              (("ray", ray_steps), ("plain", plain_steps))}
    ratio = ray_step / plain_step
    lines = [
        (f"- work: {args.epochs} epochs x {per_epoch} steps of {bs} mentions (in_batch negatives: each mention's "
         f"gold entity is encoded too), 1 torch thread each side; the two sides take turns of {args.block} steps "
         f"(A B, B A, ...: {len(blocks)} pairs of turns) in one run; steady step = median over the steps after "
         f"the first {args.warmup} of each epoch"),
        (f"- same batches (mention ids per step) on both sides: {'yes' if same_batches else 'NO'}; "
         f"bit-identical losses at every step: {'yes' if same_losses else 'NO'}"),
        "",
        "| side | median steady step (s) | first step of each epoch (s) | steps, total (s) | end to end (s) |",
        "| --- | ---: | --- | ---: | ---: |",
        (f"| plain loop (1 process, rows decoded before the steps) | {plain_step:.3f} | "
         + ", ".join(f"{x:.2f}" for x in firsts["plain"])
         + f" | {sum(s['seconds'] for s in plain_steps):.1f} | {plain_e2e:.1f} |"),
        (f"| Ray Train, 1 worker (Ray Data decodes while it trains) | {ray_step:.3f} | "
         + ", ".join(f"{x:.2f}" for x in firsts["ray"])
         + f" | {sum(s['seconds'] for s in ray_steps):.1f} | {ray_e2e:.1f} |"),
        "",
        (f"**Ray / plain, steady-state step: {ratio:.3f}x** (target <= 1.15x: {'met' if ratio <= 1.15 else 'missed'}); "
         f"median of the {len(pairs)} per-pair ratios {statistics.median(pairs):.3f}x (quartiles "
         f"{np.percentile(pairs, 25):.3f} / {np.percentile(pairs, 75):.3f}). "
         f"**End to end: {ray_e2e / plain_e2e:.2f}x** ({ray_e2e:.1f} s vs {plain_e2e:.1f} s)."),
        "",
        (f"End to end, plain = build the model ({plain.build:.1f} s) + decode every row in this process "
         f"({plain.decode:.1f} s) + its steps; Ray = the whole `trainer.fit()` ({wall:.1f} s) less the time its "
         f"worker waited for the plain loop's turns ({worker['waited']:.1f} s): controller and worker start, "
         f"the worker's imports and model build ({worker['setup']:.1f} s after its loop function started; the "
         f"function ran {worker['worker_seconds']:.1f} s of the fit), the Ray Data pipeline and the steps."),
    ]
    return lines


# ------------------------------------------------------------------------------ part 2: 2 x 1 vs 1 x 2


def bench_workers(setup: dict, work: Path, args) -> list[str]:
    bs = args.batch_size
    table = train_table(setup, bs)
    per_epoch = table.num_rows // bs
    blocks = blocks_of(per_epoch * args.epochs, args.block)
    modes = {"2x1": (2, 1, 0.75), "1x2": (1, 2, 1.5), "1x1": (1, 1, 1.0)}
    titles = {"2x1": "2 workers x 1 thread", "1x2": "1 worker x 2 threads", "1x1": "1 worker x 1 thread (reference)"}
    turns = Turns(work / "turns-workers")
    runs = {mode: Fit(setup, table, work, f"workers-{mode}", mode, workers=w, threads=t, cpus_per_worker=c,
                      epochs=args.epochs, blocks=blocks, turns=turns) for mode, (w, t, c) in modes.items()}
    for block in range(len(blocks)):
        for mode in order(tuple(modes), block):
            turns.give(mode, block, modes[mode][0], runs[mode].alive)
        if block % 8 == 7:
            print(f"block {block + 1}/{len(blocks)}, load {os.getloadavg()[0]:.1f}", flush=True)
    steps, threads = {}, {}
    for mode, run in runs.items():
        _, ranks = run.result()
        # the ranks synchronise every step (gather, all-reduce): a step lasts as long as the slowest rank's
        steps[mode] = [{**s, "seconds": max(r["steps"][j]["seconds"] for r in ranks)}
                       for j, s in enumerate(ranks[0]["steps"])]
        threads[mode] = [r["threads"] for r in ranks]
    step = {m: statistics.median(steady_steps(v, args.warmup)) for m, v in steps.items()}
    rate = {m: bs / step[m] for m in modes}
    loop = {m: len(v) * bs / sum(s["seconds"] for s in v) for m, v in steps.items()}
    pairs = pair_ratios(steps["1x2"], steps["2x1"], args.warmup)      # step time 1x2 / 2x1 = throughput 2x1 / 1x2
    lines = [
        (f"- work: {args.epochs} epochs x {per_epoch} steps of a global batch of {bs} mentions (in_batch "
         f"negatives), Ray Train in every mode (gloo); the three runs are alive at once and take turns of "
         f"{args.block} steps (A B C, B C A, ...: {len(blocks)} rounds), so the Ray instance has 5 logical CPUs "
         f"(2 x 0.75, 1 x 1.5 and 1 x 1 for the workers, the rest for Ray Data's decode tasks); only the torch "
         f"threads divide the 2 cores, and only one run computes at a time"),
        "- torch threads seen in the workers: " + ", ".join(f"{m} {threads[m]}" for m in modes),
        ("- same math both ways: the in_batch softmax runs over the global batch's entities on every rank "
         "(mel_ray.train.global_batch; tests/test_global_batch.py checks 2 x B/2 == 1 x B); which rows make up "
         "a global batch differs (Ray Data's streaming split hands each rank its rows)"),
        f"- step = the slower rank's; steady = median over the steps after the first {args.warmup} of each epoch",
        "",
        "| mode | median steady step (s) | mentions/s (steady) | mentions/s (all steps) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for mode in modes:
        lines.append(f"| {titles[mode]} | {step[mode]:.3f} | {rate[mode]:.1f} | {loop[mode]:.1f} |")
    lines += ["", (f"**2 x 1 / 1 x 2 throughput: {rate['2x1'] / rate['1x2']:.2f}x steady** (median of the "
                   f"{len(pairs)} per-round ratios {statistics.median(pairs):.2f}x, quartiles "
                   f"{np.percentile(pairs, 25):.2f} / {np.percentile(pairs, 75):.2f}); "
                   f"{loop['2x1'] / loop['1x2']:.2f}x over all steps. Against 1 worker x 1 thread (steady): "
                   f"2 x 1 {rate['2x1'] / rate['1x1']:.2f}x, 1 x 2 {rate['1x2'] / rate['1x1']:.2f}x.")]
    return lines


# ------------------------------------------------------------------------------ part 3: KB re-encoding


def fine_tuned_checkpoint(setup: dict, work: Path) -> str:
    """A finetune checkpoint: the benchmark CLIP + matcher after one step (state.pt form, as Ray Train writes)."""
    from mel_ray.train.global_batch import GlobalBatchStep

    path = work / "finetuned" / "state.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: setup[k] for k in ("clip", "cache_dir", "train", "dims", "decode")}
    model, optimizer = build_model(config)
    table = setup["inputs"].tables["train"].slice(0, setup["train"]["batch_size"])
    from mel_ray.train import inputs as ft

    batch = ft.decode_rows(numpy_batch(table), **setup["decode"])
    one_step(GlobalBatchStep(model), optimizer, batch, config, np.random.default_rng(0), torch.device("cpu"))
    torch.save({"model": model.state_dict(), "dims": setup["dims"]}, path)
    return str(path)


def plain_dev_statistics(core, dev: pa.Table, kb: pa.Table, decode: dict, cfg: dict, n_stats: int) -> torch.Tensor:
    """dev_statistics' arithmetic on one rank without Ray: decode_rows in this process, chunk after chunk."""
    from mel_ray.scoring import HITS_AT, rank_counts
    from mel_ray.train import inputs as ft
    from mel_ray.train.finetune import _encode

    device = torch.device("cpu")
    core.eval()
    encoder = core.encoder              # captured now: inside on_features() core.encoder is the identity
    mention_parts, gold_parts, gold_ids = [], [], []
    step = cfg["eval_mention_batch"]
    for a in range(0, dev.num_rows, step):
        rows, candidates = ft.to_tensors(ft.decode_rows(numpy_batch(dev.slice(a, step)), **decode), decode)
        mention_parts.append(_encode(encoder, rows, device))
        gold_parts.append(_encode(encoder, ft.entities(candidates, rows["gold"].numpy()), device))
        gold_ids.append(rows["gold"])
    mentions = {k: torch.cat([p[k] for p in mention_parts]) for k in mention_parts[0]}
    gold = {k: torch.cat([p[k] for p in gold_parts]) for k in gold_parts[0]}
    mentions["gold"] = torch.cat(gold_ids)

    def chunks():
        chunk = cfg["eval_entity_chunk"]
        for a in range(0, kb.num_rows, chunk):
            rows, _ = ft.to_tensors(ft.decode_rows(numpy_batch(kb.slice(a, chunk)), **decode), decode)
            yield rows["entity_id"].numpy(), _encode(encoder, rows, device)

    with core.on_features():
        counts, _, _ = rank_counts(core, mentions, gold, chunks(), mention_batch=cfg["eval_mention_batch"])
    ranks = counts.astype(np.float64) + 1
    stats = torch.zeros(n_stats, dtype=torch.float64)
    stats[:-1] = torch.tensor([len(ranks), (1 / ranks).sum(), ranks.sum(), *[(ranks <= k).sum() for k in HITS_AT]],
                              dtype=torch.float64)
    return stats


class ChunkClock:
    """Records when each KB chunk reaches `to_tensors` (both dev evaluations call it through mel_ray.train.inputs),
    so the evaluation's start-up (datasets, the dev mentions) can be told apart from its KB rate."""

    def __init__(self):
        from mel_ray.train import inputs as ft

        self.arrivals: list[tuple[float, int]] = []
        original = ft.to_tensors
        clock = self

        def to_tensors(batch, decode):
            if "entity_id" in batch:
                clock.arrivals.append((time.perf_counter(), len(batch["entity_id"])))
            return original(batch, decode)
        ft.to_tensors = to_tensors

    def reset(self):
        self.arrivals = []


def bench_reencode(setup: dict, work: Path, args) -> list[str]:
    from bench_features import FirstResult

    from mel_ray import storage
    from mel_ray.checkpoints import load_checkpoint
    from mel_ray.config import FeaturesConfig
    from mel_ray.features import extract_features
    from mel_ray.model import MELModel, ModelDims
    from mel_ray.scoring import HITS_AT
    from mel_ray.train.finetune import dev_statistics

    checkpoint = fine_tuned_checkpoint(setup, work)
    kb, dev = setup["inputs"].tables["kb"], setup["inputs"].tables["dev"]
    first = FirstResult()
    modes = {"local": "local", "ray": "ray"}
    times: dict[str, list[float]] = {m: [] for m in modes}
    startup: dict[str, list[float]] = {m: [] for m in modes}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    reference, identical, images = None, True, 0
    saved = torch.get_num_threads()
    for rep in range(args.reps):
        for mode in order(tuple(modes), rep):
            engine = modes[mode]
            root = work / "features" / f"{mode}-{rep}"
            shutil.rmtree(root, ignore_errors=True)
            first.reset()
            t = time.perf_counter()
            manifest = extract_features(setup["dataset"], setup["clip"],
                                        FeaturesConfig(batch_size=32, concurrency=1, num_gpus=0), splits=(),
                                        micro_batch=16, shard_rows=256, features_root=str(root), quiet=True,
                                        cache_dir=setup["cache_dir"], engine=engine, checkpoint=checkpoint)
            end = time.perf_counter()
            images = sum(c["rows"] for c in manifest["counters"].values())
            times[mode].append(end - t)
            startup[mode].append(first.at - t)
            rates[mode].append((images - first.images) / (end - first.at))
            files = {rel: storage.read_bytes(storage.join(manifest["uri"], rel))
                     for rel in storage.list_files(manifest["uri"])}
            reference = reference or files
            identical &= files == reference
            print(f"rep {rep} extract-features {mode}: {end - t:.1f}s, start-up {startup[mode][-1]:.1f}s, then "
                  f"{rates[mode][-1]:.1f} images/s, load {os.getloadavg()[0]:.1f}", flush=True)
            shutil.rmtree(root, ignore_errors=True)
    torch.set_num_threads(saved)

    # the in-training dev evaluation (one rank): Ray Data decodes the KB chunks vs the plain in-process loop
    state = load_checkpoint(checkpoint)
    core = MELModel(ModelDims(**state["dims"]))
    core.load_state_dict(state["model"])
    cfg = setup["train"]
    n_stats = 4 + len(HITS_AT)
    dev_times: dict[str, list[float]] = {"plain": [], "ray": []}
    dev_startup: dict[str, list[float]] = {"plain": [], "ray": []}
    dev_rates: dict[str, list[float]] = {"plain": [], "ray": []}
    stats: dict[str, torch.Tensor] = {}
    clock = ChunkClock()
    cfg = {**cfg, "eval_entity_chunk": args.entity_chunk}
    torch.set_num_threads(1)
    try:
        for rep in range(args.reps):
            for mode in order(tuple(dev_times), rep):
                runs = dev_times[mode]
                clock.reset()
                t = time.perf_counter()
                if mode == "ray":
                    stats[mode] = dev_statistics(core, dev, kb, setup["decode"], 0, 1, cfg, torch.device("cpu"),
                                                 n_stats)
                else:
                    stats[mode] = plain_dev_statistics(core, dev, kb, setup["decode"], cfg, n_stats)
                end = time.perf_counter()
                runs.append(end - t)
                (at, rows), *_ = clock.arrivals
                dev_startup[mode].append(at - t)
                dev_rates[mode].append((kb.num_rows - rows) / (end - at))
                print(f"rep {rep} dev evaluation {mode}: {runs[-1]:.1f}s ({kb.num_rows / runs[-1]:.1f} KB "
                      f"entities/s), first KB chunk after {at - t:.1f}s, then {dev_rates[mode][-1]:.1f} entities/s, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        torch.set_num_threads(saved)
    same_stats = torch.equal(stats["plain"], stats["ray"])

    med = {m: statistics.median(v) for m, v in times.items()}
    up = {m: statistics.median(v) for m, v in startup.items()}
    st = {m: statistics.median(v) for m, v in rates.items()}
    dev_med = {m: statistics.median(v) for m, v in dev_times.items()}
    dev_up = {m: statistics.median(v) for m, v in dev_startup.items()}
    dev_st = {m: statistics.median(v) for m, v in dev_rates.items()}
    steady_ratio = st["ray"] / st["local"]
    lines = [
        (f"- checkpoint: the benchmark CLIP + matcher after one finetune step (state.pt, encoder=finetune), "
         f"so extract-features loads fine-tuned weights (`--checkpoint`); {args.reps} reps, modes alternating"),
        (f"- extract-features: entities only (`splits=()`), {images} KB images + texts, micro_batch 16, batch_size "
         "32, 1 encoder actor / 1 process, 1 torch thread each; outputs byte-identical across engines and reps: "
         f"{'yes' if identical else 'NO'}"),
        "",
        ("| extract-features --checkpoint | runs (s) | median (s) | start-up (s) | steady images/s | "
         "vs plain loop (steady) | vs plain loop (whole call) |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    titles = {"local": "plain loop (engine=local, 1 process)", "ray": "Ray Data (decode tasks + 1 encoder actor)"}
    for mode, title in titles.items():
        lines.append(f"| {title} | " + ", ".join(f"{t:.1f}" for t in times[mode])
                     + f" | {med[mode]:.1f} | {up[mode]:.1f} | {st[mode]:.1f} | {st[mode] / st['local']:.2f}x | "
                     f"{med['local'] / med[mode]:.2f}x |")
    lines += [
        "",
        (f"**Ray / plain, steady-state images/s: {steady_ratio:.2f}x** (target >= 0.8x: "
         + ("met" if steady_ratio >= 0.8 else "missed") + f"); whole call {med['local'] / med['ray']:.2f}x. "
         "Start-up = until the driver holds the first encoded unit (checkpoint and model load, Ray Data and actor "
         "start, first decode); steady = images/s from then to the end (Parquet writes and manifest included)."),
        "",
        (f"In-training dev evaluation (`mel_ray.train.finetune.dev_statistics`, 1 rank, 1 torch thread): "
         f"{dev.num_rows} dev mentions (and their gold entities) encoded, then the {kb.num_rows}-entity KB "
         f"re-encoded in chunks of {cfg['eval_entity_chunk']} (train.eval_entity_chunk) and ranked; "
         "statistics identical on both sides: "
         f"{'yes' if same_stats else 'NO'}"),
        "",
        ("| dev evaluation | runs (s) | median (s) | KB entities/s (whole call) | until the first KB chunk (s) | "
         "KB entities/s after it |"),
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for mode, title in (("plain", "plain loop (decode_rows in this process)"),
                        ("ray", "dev_statistics (Ray Data decodes the chunks)")):
        lines.append(f"| {title} | " + ", ".join(f"{t:.1f}" for t in dev_times[mode])
                     + f" | {dev_med[mode]:.1f} | {kb.num_rows / dev_med[mode]:.1f} | {dev_up[mode]:.1f} | "
                     f"{dev_st[mode]:.1f} |")
    lines += [
        "",
        (f"**dev_statistics / plain loop: {dev_st['ray'] / dev_st['plain']:.2f}x the KB rate after the first chunk, "
         f"{dev_med['plain'] / dev_med['ray']:.2f}x over the whole evaluation.** Until the first KB chunk: the dev "
         "mentions and their gold entities decoded and encoded (Ray: a Ray Data execution for them, then one for "
         "the KB slice)."),
    ]
    return lines


# ------------------------------------------------------------------------------ main


PARTS = {"step": ("Fine-tuning step: Ray Train (1 worker) vs a plain PyTorch loop", "finetune-step.md", bench_step),
         "workers": ("Fine-tuning throughput: 2 workers x 1 thread vs 1 worker x 2 threads", "finetune-workers.md",
                     bench_workers),
         "reencode": ("KB re-encoding with a fine-tuned encoder: Ray Data vs a plain loop", "finetune-reencode.md",
                      bench_reencode)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--entities", type=int, default=1500)
    ap.add_argument("--mentions", type=int, default=600)
    ap.add_argument("--views", type=int, default=0, help="synthetic views per mention (0: none, as MIMIC)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--image", type=int, default=96)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="the global batch")
    ap.add_argument("--epochs", type=int, default=2, help="passes over the train rows (step, workers)")
    ap.add_argument("--block", type=int, default=2, help="steps per turn (step, workers)")
    ap.add_argument("--warmup", type=int, default=2, help="steps of each epoch left out of the steady-state median")
    ap.add_argument("--reps", type=int, default=4, help="runs per mode (reencode)")
    ap.add_argument("--entity-chunk", type=int, default=256, help="train.eval_entity_chunk of the dev evaluation")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--workdir", default="/tmp/mel-ray-bench-finetune", help="kept: model and data are reused")
    ap.add_argument("--suffix", default="", help="added to the result file names (finetune-step<suffix>.md)")
    args = ap.parse_args()

    import ray

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup = prepare(work, args)
    print(f"prepared in {time.perf_counter() - t0:.0f}s: " + ", ".join(
        f"{k} {v.num_rows} rows" for k, v in setup["inputs"].tables.items()), flush=True)
    torch.set_num_threads(1)
    for part in args.only:
        title, filename, run = PARTS[part]
        started, load_start = datetime.datetime.now(), os.getloadavg()
        t = time.perf_counter()
        start_ray(work, 5 if part == "workers" else args.num_cpus)
        try:
            body = run(setup, work, args)
        finally:
            ray.shutdown()
        lines = [*header(title, args, started, load_start), *body, "", f"(this part: {time.perf_counter() - t:.0f} s)"]
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        out = RESULTS / filename.replace(".md", f"{args.suffix}.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
