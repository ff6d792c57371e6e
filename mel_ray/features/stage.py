"""`extract_features`: frozen CLIP features for KB entities, mentions and synthetic views (MIMIC's inputs);
what is written and why each value is what it is: docs/data-contract.md, "CLIP features".

Pipeline (Ray Data, streaming): work is cut into *units* of `micro_batch` consecutive rows of one shard
(plan.py); the driver tokenises their texts. Stage 1 (`map_batches` with the plain function
`inputs.prepare_batch`, `decode_num_cpus` each, no torch or transformers import) reads, decodes and
preprocesses the images (a row without one carries no pixels: each encoder shares one blank); stage 2
(`map_batches` with the callable `encoder.Encoder`, an actor pool of `concurrency` actors with `num_gpus` each)
runs CLIP, one forward per unit; the driver collects units per shard and writes each finished shard atomically
(shards.py; background threads, so encoding does not wait on S3). Shards already present are skipped; the
manifest is written last.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import math
import sys
import time
from collections import Counter

import numpy as np

from mel_ray import storage
from mel_ray.config import FeaturesConfig
from mel_ray.dataset import SPLITS
from mel_ray.errors import UsageError
from mel_ray.feature_store import MANIFEST
from mel_ray.features import shards
from mel_ray.features.encoder import Encoder
from mel_ray.features.inputs import prepare_batch
from mel_ray.features.plan import (
    DEFAULT_MICRO_BATCH,
    DEFAULT_SHARD_ROWS,
    Plan,
    check_text_encoder,
    make_plan,
    make_units,
)
from mel_ray.models import DEFAULT_CACHE, pin_model, resolve_text_pooling
from mel_ray.verify import require_dataset


def _stored(uri: str) -> object:
    """The JSON at `uri`, or None when it does not parse (then it is written again)."""
    from mel_ray.errors import DataError

    try:
        return storage.read_json(uri)
    except DataError:
        return None


def _log(quiet: bool, msg: str) -> None:
    """Progress: on the terminal when a person watches it (or no log file is set up), else in the log file."""
    from mel_ray import console

    if quiet:
        return
    if console.log_file() is None or console.interactive():
        print(f"extract-features: {msg}", file=sys.stderr, flush=True)
    else:
        logging.getLogger("mel_ray.features").info("extract-features: %s", msg)


class Collector:
    """Gathers unit outputs per shard; a completed shard is assembled and written in a background thread."""

    def __init__(self, plan: Plan, units: list[dict], quiet: bool, writers: int = 2):
        self.plan, self.quiet = plan, quiet
        self.units = {u["unit"]: u for u in units}
        self.expected = Counter((u["table"], u["shard"]) for u in units)
        self.buffers: dict[tuple[str, int], list[dict]] = {}
        self.pool = cf.ThreadPoolExecutor(max_workers=writers, thread_name_prefix="features-writer")
        self.futures: list[cf.Future] = []
        self.max_pending = 2 * writers
        self.total_shards = len(self.expected)
        self.done_shards = 0
        self.rows = self.images = self.blanks = 0
        self.t0 = time.perf_counter()

    def add(self, out: dict) -> None:
        unit = self.units[out["unit"]]
        meta = json.loads(out.pop("meta"))
        out.update(table=unit["table"], shard=unit["shard"], start=unit["start"], n=unit["n"],
                   view_ids=meta["view_ids"], stats=meta["stats"])
        self.rows += unit["n"]
        stats = meta["stats"]          # images really encoded: rows with one and views, not the shared blank
        self.images += stats.get("with_image", 0) + stats.get("synthetic", {}).get("used", 0)
        self.blanks += stats.get("blank_shared", 0)
        key = (unit["table"], unit["shard"])
        buf = self.buffers.setdefault(key, [])
        buf.append(out)
        if len(buf) == self.expected[key]:
            del self.buffers[key]
            self._reap(block=len(self.futures) >= self.max_pending)
            self.futures.append(self.pool.submit(self._write, key, buf))

    def _write(self, key: tuple[str, int], units: list[dict]) -> None:
        table = self.plan.tables[key[0]]
        shard_table = shards.shard_table(self.plan, table, key[1], units)
        shards.write_shard(storage.join(self.plan.uri, table.shard_name(key[1])), shard_table)

    def _reap(self, block: bool) -> None:
        if block and self.futures:
            cf.wait(self.futures, return_when=cf.FIRST_COMPLETED)
        still = []
        for f in self.futures:
            if f.done():
                f.result()                      # re-raise a failed write here
                self.done_shards += 1
                elapsed = time.perf_counter() - self.t0
                _log(self.quiet, f"{self.done_shards}/{self.total_shards} shards written, {self.rows} rows "
                     f"({self.rows / max(elapsed, 1e-9):.1f} rows/s), {self.images} images encoded, "
                     f"{self.blanks} rows given the shared blank, in {elapsed:.1f}s")
            else:
                still.append(f)
        self.futures = still

    def finish(self) -> None:
        """Wait for the writes; every shard must be complete."""
        try:
            for f in cf.as_completed(list(self.futures)):
                f.result()
            self._reap(block=False)
            if self.buffers:
                raise RuntimeError(f"extract-features: units missing for shards {sorted(self.buffers)}")
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """After a failure: let shards already handed to the writers land (a rerun keeps them), drop the rest."""
        cf.wait(self.futures)
        self.pool.shutdown(wait=True, cancel_futures=True)


def _consume(collector: Collector, rows) -> None:
    try:
        for row in rows:
            collector.add(row)
    except BaseException:
        collector.abort()
        raise
    collector.finish()


def _rows_of(batch: dict[str, np.ndarray]):
    for i in range(len(batch["unit"])):
        yield {k: (int(v[i]) if k == "unit" else v[i]) for k, v in batch.items()}


def _run_ray(plan: Plan, units: list[dict], *, batch_size: int, concurrency: int, num_gpus: float,
             num_cpus: float | None, decode_num_cpus: float, quiet: bool) -> None:
    import ray

    from mel_ray.runtime import check_gpus, init_ray

    init_ray()
    check_gpus("extract-features", num_gpus, "features.num_gpus")
    if num_cpus is None:
        if num_gpus > 0:
            num_cpus = 1.0
        else:   # leave room for one decode task next to the actors, or a small cluster deadlocks
            total = float(ray.cluster_resources().get("CPU", 1.0))
            num_cpus = max(0.05, min(1.0, (total - decode_num_cpus) / concurrency))
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(prepare_batch, batch_size=1, num_cpus=decode_num_cpus,
                        fn_kwargs={"image_cfg": plan.image_cfg, "image_size": list(plan.image_size)})
    ds = ds.map_batches(Encoder, batch_size=max(1, math.ceil(batch_size / plan.micro_batch)),
                        compute=ray.data.ActorPoolStrategy(size=concurrency), num_gpus=num_gpus, num_cpus=num_cpus,
                        fn_constructor_kwargs={"model": plan.model, "cache_dir": plan.cache_dir, "dtype": plan.dtype,
                                               "use_gpu": num_gpus > 0, "image_size": list(plan.image_size),
                                               "text_length": plan.text_length,
                                               "weights": None if plan.weights is None else ray.put(plan.weights),
                                               "text_encoder": plan.text_encoder,
                                               "text_pooling": plan.text_pooling or "cls",
                                               "text_weights": None if plan.text_weights is None
                                               else ray.put(plan.text_weights),
                                               "image_cfg": plan.image_cfg})
    batches = ds.iter_batches(batch_size=None, batch_format="numpy")
    _consume(Collector(plan, units, quiet), (row for batch in batches for row in _rows_of(batch)))


def _run_local(plan: Plan, units: list[dict], *, use_gpu: bool, quiet: bool) -> None:
    """The same work in this process, one unit after another (debugging; the benchmark's baseline)."""
    import torch

    threads = torch.get_num_threads()
    try:
        encoder = Encoder(plan.model, plan.cache_dir, plan.dtype, use_gpu, plan.image_size, plan.text_length,
                          plan.weights, plan.text_encoder, plan.text_weights, plan.text_pooling or "cls",
                          plan.image_cfg)

        def rows():
            for unit in units:
                batch = {k: np.array([unit[k]], dtype=np.int64 if k == "unit" else object)
                         for k in ("unit", "input_ids", "attention_mask", "payload")}
                prepared = prepare_batch(batch, image_cfg=plan.image_cfg, image_size=plan.image_size)
                yield from _rows_of(encoder(prepared))
        _consume(Collector(plan, units, quiet), rows())
    finally:
        torch.set_num_threads(threads)


def fine_tuned_encoder(checkpoint: str, model: str, cache_dir: str, text_encoder: str | None = None,
                       text_pooling: str | None = None) -> tuple[dict, dict | None, str]:
    """(CLIP weights, text encoder weights or None, their fingerprint) of a finetune checkpoint, refused (one line)
    when it is a frozen-mode checkpoint, its CLIP architecture is not `model`'s, its text encoder is not
    `text_encoder`'s architecture (CLIP's text tower when None), or it pooled t_G otherwise than `text_pooling`
    (resolved models.text_pooling: the features must be what the fine-tuned model read)."""
    from mel_ray.checkpoints import load_checkpoint
    from mel_ray.model.encoder import (
        clip_config_of,
        encoder_state,
        fine_tuned_fingerprint,
        text_config_of,
        text_encoder_state,
    )
    from mel_ray.models import TEXT_ENCODER_SETTING, TEXT_POOLING_SETTING

    state = load_checkpoint(checkpoint)
    if state["dims"].get("encoder", "frozen") != "finetune":
        raise UsageError(f"{checkpoint}: trained with model.encoder=frozen, so its encoder is {model} itself; "
                         "extract features without --checkpoint")
    def architecture(config: dict | None) -> dict | None:       # where the folder lives is not the architecture
        return None if config is None else {k: v for k, v in config.items() if k != "_name_or_path"}

    if architecture(state["dims"].get("encoder_config")) != architecture(clip_config_of(model, cache_dir)):
        raise UsageError(f"{checkpoint}: its fine-tuned CLIP has another architecture than models.clip={model}; "
                         "set models.clip to the CLIP it was trained from")
    trained_text = state["dims"].get("text_encoder_config")
    if trained_text and not text_encoder:
        raise UsageError(f"{checkpoint}: its texts were encoded by a fine-tuned {trained_text.get('model_type')} "
                         f"(from {state['dims'].get('text_encoder')}), but {TEXT_ENCODER_SETTING} is unset; set it "
                         f"to the text encoder it was trained from (--set {TEXT_ENCODER_SETTING}=...)")
    if text_encoder and not trained_text:
        raise UsageError(f"{checkpoint}: its texts were encoded by CLIP's text tower, but "
                         f"{TEXT_ENCODER_SETTING}={text_encoder}; unset it (--set {TEXT_ENCODER_SETTING}=null)")
    if text_encoder and trained_text != text_config_of(text_encoder, cache_dir):
        raise UsageError(f"{checkpoint}: its fine-tuned text encoder has another architecture than "
                         f"{TEXT_ENCODER_SETTING}={text_encoder}; set it to the text encoder it was trained from")
    trained_pooling = state["dims"].get("text_pooling") or "cls"        # checkpoints before the setting: [CLS]
    if text_encoder and text_pooling and text_pooling != trained_pooling:
        raise UsageError(f"{checkpoint}: its text encoder was fine-tuned with {TEXT_POOLING_SETTING}="
                         f"{trained_pooling}, but it resolves to {text_pooling} here; set "
                         f"{TEXT_POOLING_SETTING}={trained_pooling}")
    weights = encoder_state(state["model"])
    text_weights = text_encoder_state(state["model"]) if trained_text else None
    return weights, text_weights, fine_tuned_fingerprint(weights, text_weights)


def extract_features(dataset_uri: str, model: str, cfg: FeaturesConfig, *, synthetic_key: str | None = None,
                     views: int | None = None, dtype: str | None = None, splits: tuple[str, ...] | list[str] = SPLITS,
                     micro_batch: int = DEFAULT_MICRO_BATCH, shard_rows: int = DEFAULT_SHARD_ROWS,
                     num_cpus: float | None = None, decode_num_cpus: float = 0.5, features_root: str | None = None,
                     cache_dir: str = DEFAULT_CACHE, engine: str = "ray", quiet: bool = False,
                     checkpoint: str | None = None, text_encoder: str | None = None,
                     text_pooling: str = "auto") -> dict:
    """Write CLIP features of the dataset's entities and mentions (and synthetic views) under
    DATASET/features/<key>/ (or features_root/<key>/); returns the manifest plus `uri` and `run`.

    cfg: the `features` config section (text_length is part of the key; batch_size, concurrency and num_gpus
    are the encoder pool's and change no byte).

    synthetic_key: DATASET/synthetic/<key> (synthesize's output); views: use only synthetic views < views
    (n_s; default: every view in its manifest). dtype: float32 / float16 / bfloat16 for the model (default:
    as saved); features are stored as float16 either way. batch_size: rows handed to an encoder actor per
    call (rounded up to whole micro-batches); it does not change the output. micro_batch: rows per forward
    pass (part of the key). shard_rows: rows per Parquet shard (part of the key). concurrency / num_gpus /
    num_cpus: the encoder actor pool; num_cpus None = 1 per actor with GPUs, else what fits next to one
    decode task. decode_num_cpus: CPUs per decode task. engine "local" runs everything in this process
    (debugging, the benchmark's baseline; same bytes). quiet: no progress lines on stderr.
    checkpoint: a model trained with model.encoder=finetune (model.pt, a checkpoint folder or an MLflow run): its
    fine-tuned CLIP weights encode everything (`model` gives the processor and the architecture); the set's key
    and manifest carry the encoder's fingerprint, which evaluate and link check against their checkpoint.
    text_encoder: models.text_encoder: a BERT-family model (id, local or s3:// folder) encodes the texts instead
    of CLIP's text tower (text_global = its pooled final states, text_local = its final states; its tokenizer);
    with `checkpoint`, that checkpoint's fine-tuned copy of it. None: CLIP's text tower, keys as they always were.
    text_pooling: models.text_pooling (auto / cls / mean): how t_G is pooled from the text encoder's states; in the
    key only when it resolves to something else than cls.
    """
    from mel_ray.runtime import resolve_num_gpus

    require_dataset(str(dataset_uri))   # before Ray, any model or actor: a damaged dataset is one line, exit 2
    text_length, batch_size, concurrency, num_gpus = cfg.text_length, cfg.batch_size, cfg.concurrency, cfg.num_gpus
    if text_encoder:                    # so is a text encoder that is no BERT or too short for text_length
        check_text_encoder(str(text_encoder), text_length, cache_dir)
    if num_gpus == "auto" and engine == "local":     # without Ray: this machine's GPU
        import torch

        num_gpus = 1.0 if torch.cuda.is_available() else 0.0
    if isinstance(num_gpus, str):   # "auto": 1 GPU per encoder where the cluster has GPUs, else CPU
        num_gpus = resolve_num_gpus("extract-features", num_gpus, "features.num_gpus")
    if batch_size < 1 or concurrency < 1 or num_gpus < 0:
        raise UsageError("batch_size and concurrency must be >= 1 and num_gpus >= 0")
    if engine not in ("ray", "local"):
        raise UsageError(f"engine {engine!r}: expected 'ray' or 'local'")
    t0 = time.perf_counter()
    model = pin_model(str(model))         # a hub id: the commit the key names and every encoder loads
    text_encoder = pin_model(str(text_encoder)) if text_encoder else None
    pooling = resolve_text_pooling(text_encoder, text_pooling, cache_dir)
    weights, text_weights, fingerprint = (None, None, None) if checkpoint is None else \
        fine_tuned_encoder(checkpoint, model, cache_dir, text_encoder, pooling)
    plan = make_plan(str(dataset_uri), model, synthetic_key=synthetic_key, views=views, text_length=text_length,
                 dtype=dtype, splits=tuple(splits), micro_batch=micro_batch, shard_rows=shard_rows,
                 features_root=features_root, cache_dir=cache_dir, encoder_checkpoint=fingerprint,
                 text_encoder=text_encoder, text_pooling=pooling or "auto")
    plan.weights, plan.text_weights = weights, text_weights
    existing = set(storage.list_files(plan.uri))
    for table in plan.tables.values():
        table.pending = [s for s in range(table.n_shards(shard_rows)) if table.shard_name(s) not in existing]
    units = make_units(plan)
    total = sum(t.n_shards(shard_rows) for t in plan.tables.values())
    pending = sum(len(t.pending) for t in plan.tables.values())
    _log(quiet, f"{plan.uri}: {', '.join(f'{t.name} {t.rows} rows' for t in plan.tables.values())}; "
         f"{total - pending}/{total} shards already written, {len(units)} units of <= {micro_batch} rows to encode")
    if units:
        if engine == "local":
            _run_local(plan, units, use_gpu=num_gpus > 0, quiet=quiet)
        else:
            _run_ray(plan, units, batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus,
                     num_cpus=num_cpus, decode_num_cpus=decode_num_cpus, quiet=quiet)
        existing = set(storage.list_files(plan.uri))
    manifest = shards.build_manifest(plan, existing)
    missing = [t for t in plan.tables if t not in manifest["tables"]]
    if missing:
        raise RuntimeError(f"extract-features: shards missing for {missing} after the run")
    manifest_uri = storage.join(plan.uri, MANIFEST)
    if not storage.exists(manifest_uri) or _stored(manifest_uri) != manifest:
        storage.write_json(manifest_uri, manifest)
    elapsed = time.perf_counter() - t0
    _log(quiet, f"done: {plan.uri} ({pending} shards written, {total - pending} skipped, {elapsed:.1f}s)")
    return {**manifest, "uri": plan.uri,
            "run": {"shards_written": pending, "shards_skipped": total - pending, "units": len(units),
                    "seconds": round(elapsed, 3), "num_gpus": float(num_gpus)}}
