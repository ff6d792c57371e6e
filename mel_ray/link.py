"""`mel-ray link`: link NEW mentions against a KB with a trained model, end to end as one Ray Data job.

    mentions file ──read──▶ views (diffusion actor pool) ──▶ CLIP features (encoder actor pool)
                                                          ──▶ scores against EVERY KB entity (scorer actor pool)
                                                          ──▶ OUTPUT/links.parquet + OUTPUT/link_report.json

Inputs: a model (exported `model.pt`, an MLflow run id / `runs:/<id>` holding one, or a Ray Train checkpoint
folder plus a config), a KB (a mel-ray dataset whose features/<key> was made with the model's CLIP), and a
Parquet or JSONL file of mentions: `text` (the sentence), `mention`, optional `image` (path or URI; relative
paths are taken beside the file) and optional `mention_id` (default `row<N>`). The model's own config gives
the diffusion model, the synthesis settings and n_s, so new mentions get views drawn exactly as in training; a
model that reads no view (model.cvacpt_weight 0 or model.views 0) gets none drawn and needs no diffusion model.

Contract (docs/data-contract.md, "Batch linking"): OUTPUT/links.parquet, one row per (mention, rank):
mention_id, mention, text, rank (1..top_k), entity_id, qid, name, score; OUTPUT/synthetic/<key>/ the PNG views
(a person can look at them); OUTPUT/link_report.json the counts and the inputs' identity. A rerun with the same
inputs is skipped; an interrupted one draws only the views that are missing.

Mentions are prepared and encoded by the features stage's own functions (`prepare_unit`, `Encoder`), one
mention per unit (one CLIP forward per mention, so its features do not depend on batching) and with its
failure policy: an image that is missing (or a folder) or undecodable is counted and the mention is linked with a
blank image (has_image false), never replaced by noise; a view that cannot be read is left out and counted. Image
URIs are checked on the driver before any work: one the storage layer cannot read (a scheme other than a local
path, file:// or s3://, credentials inside the URI) is one line naming the file and record, without the
credentials.
Scorers rank whole mention batches against the KB in entity chunks with the evaluation's kernel
(mel_ray.scoring.rank_counts): memory is bounded by batch x chunk, never mentions x KB; the entity side is
recomputed per mention batch (use large `batch_size` for large KBs). Mentions whose scores are NaN or inf are
counted over all batches and the command stops with one line (NonFiniteError: model, file, how many); nothing
is written. A model file is validated (mel_ray.checkpoints) before any actor starts.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mel_ray import storage
from mel_ray.errors import DataError, NonFiniteError, UsageError
from mel_ray.keys import settings_key

log = logging.getLogger(__name__)
LINKS, REPORT = "links.parquet", "link_report.json"
LINKS_SCHEMA = pa.schema([("mention_id", pa.string()), ("mention", pa.string()), ("text", pa.string()),
                          ("rank", pa.int32()), ("entity_id", pa.int64()), ("qid", pa.string()),
                          ("name", pa.string()), ("score", pa.float32())])


# ------------------------------------------------------------------------------------------------ inputs


def read_mentions(path: str) -> pa.Table:
    """The mentions file as a table (mention_id, text, mention, image); errors name the file, record and field.

    JSONL is read by ingest's reader (mel_ray.ingest.common.iter_jsonl): UTF-8 (a BOM is tolerated), lines split
    on "\\n" only (so "\\r\\n" endings, a last line without a newline and U+2028 inside strings are fine), blank
    lines skipped; records are named by their line number. Parquet records are named by their row (from 0)."""
    from mel_ray.ingest.common import iter_jsonl, valid_unicode

    if path.endswith(".parquet"):
        records = [(f"row {i}", row) for i, row in enumerate(storage.read_table(path).to_pylist())]
    elif path.endswith((".jsonl", ".json")):
        records = [(f"line {n}", row) for n, row in iter_jsonl(path)]
    else:
        raise UsageError(f"{path}: mentions must be a .parquet or .jsonl file")
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    out: dict[str, list] = {"mention_id": [], "text": [], "mention": [], "image": []}
    seen: dict[str, str] = {}
    for i, (record, row) in enumerate(records):
        if not isinstance(row, dict):
            raise DataError(path, "expected a JSON object with 'text' and 'mention'", record=record)
        for field in ("text", "mention"):
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                raise DataError(path, f"must be a non-empty string (got {_excerpt(value)})", record=record,
                                field=field)
            valid_unicode(value, path, record, field)
        image = row.get("image")
        if image is not None and not isinstance(image, str):
            raise DataError(path, f"must be a path, a URI or null (got {_excerpt(image)})", record=record,
                            field="image")
        if image:
            valid_unicode(image, path, record, "image")
            _check_image_uri(image, path, record)
        if image and "://" not in image and not Path(image).is_absolute():
            image = storage.join(base, image)
        mention_id = row.get("mention_id")
        mention_id = f"row{i}" if mention_id is None else str(mention_id)
        valid_unicode(mention_id, path, record, "mention_id")
        if mention_id in seen:
            raise DataError(path, f"{_excerpt(mention_id)} is not unique (also {seen[mention_id]})", record=record,
                            field="mention_id")
        seen[mention_id] = record
        for name, value in (("mention_id", mention_id), ("text", row["text"]), ("mention", row["mention"]),
                            ("image", image or None)):
            out[name].append(value)
    if not records:
        raise DataError(path, "no mentions")
    return pa.table(out, schema=pa.schema([(k, pa.string()) for k in out]))


def _check_image_uri(image: str, path: str, record: str) -> None:
    """An image URI the actors could not read (a scheme storage does not read, credentials inside the URI) is
    refused here, on the driver, before any view is drawn; storage's message shows it without its credentials."""
    try:
        storage.check_uri(image)
    except storage.URIError as err:
        raise DataError(path, str(err), record=record, field="image") from None


def _folder_images(mentions: pa.Table) -> set[str]:
    """The image URIs of `mentions` that name a folder. A folder is a missing image (docs/data-contract.md), but
    storage cannot tell so when the encoder reads it (it fails its actor), hence one look per image here, on the
    driver, before any work; threads, as on S3 each look is a request."""
    from concurrent.futures import ThreadPoolExecutor

    uris = sorted({uri for uri in mentions.column("image").to_pylist() if uri})
    with ThreadPoolExecutor(max_workers=16) as pool:
        return {uri for uri, is_dir in zip(uris, pool.map(storage.is_dir, uris)) if is_dir}


def _without_folder_images(mentions: pa.Table, folders: set[str]) -> tuple[pa.Table, int]:
    """`mentions` with the folder images nulled (the encoder then gives them its blank image), and how many
    mentions that concerns: the driver moves them from the report's no_image to missing."""
    images = mentions.column("image").to_pylist()
    n = sum(1 for uri in images if uri in folders)
    if not n:
        return mentions, 0
    log.warning("link: %d mention image(s) are folders, not files: counted as missing, linked without an image "
                "(e.g. %s)", n, min(folders))
    column = pa.array([None if uri in folders else uri for uri in images], pa.string())
    return mentions.set_column(mentions.schema.get_field_index("image"), "image", column), n


def _excerpt(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_linker(model: str, config: dict | None = None, tracking_uri: str | None = None) -> dict:
    """{'model': state_dict, 'dims', 'config'} from anything mel_ray.checkpoints.load_checkpoint takes; a Ray
    Train checkpoint folder (state.pt) holds no config: `config` (the training config) is then required."""
    from mel_ray.checkpoints import load_checkpoint

    state = load_checkpoint(model, tracking_uri)
    state["config"] = state["config"] or config
    if not state["config"]:
        raise UsageError(f"{model}: a training checkpoint holds no config; pass --config (the training config)")
    return state


# ------------------------------------------------------------------------------------------ Ray Data actors

FLOAT_COLUMNS = ("text_global", "text_local", "image_global", "image_local", "synthetic_global")


class MentionEncoder:
    """CLIP features of one mention at a time (one unit of extract-features: its text, its image, its views),
    prepared and encoded by the features stage's own functions, so bad images are counted and blanked alike."""

    def __init__(self, clip: str, cache_dir: str, text_length: int, use_gpu: bool, views: int, output: str,
                 view_key: str, weights=None, text_encoder: str | None = None, text_weights=None,
                 text_pooling: str = "cls"):
        from mel_ray.features import Encoder, load_processor, output_size

        self.tokenizer, self.image_cfg = load_processor(clip, cache_dir)
        if text_encoder:                # models.text_encoder: its tokenizer and its (fine-tuned) weights
            from mel_ray.models import load_text_tokenizer

            self.tokenizer = load_text_tokenizer(text_encoder, cache_dir)
        self.size = output_size(self.image_cfg)
        # weights: a fine-tuned model's CLIP (the KB's features were made by it too)
        self.encoder = Encoder(clip, cache_dir, None, use_gpu, self.size, text_length, weights, text_encoder,
                               text_weights, text_pooling, self.image_cfg)
        self.text_length, self.views, self.output, self.view_key = text_length, views, output, view_key

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mel_ray.features import mention_text, prepare_unit, tokenize
        from mel_ray.synthesize import image_relpath

        rows: dict[str, list] = {k: [] for k in ("mention_id", *FLOAT_COLUMNS, "text_mask", "n_views", "has_image",
                                                 "stats")}
        for i, mention_id in enumerate(batch["mention_id"]):
            ids, mask = tokenize(self.tokenizer, [mention_text(batch["mention"][i], batch["text"][i])],
                                 self.text_length)
            payload: dict[str, Any] = {"i": [batch["image"][i] or None]}
            if self.views:
                payload["v"] = [[(view, storage.join(self.output, image_relpath(self.view_key, mention_id, view)),
                                  "") for view in range(self.views)]]
            unit = prepare_unit(payload, image_cfg=self.image_cfg, image_size=self.size)
            f = self.encoder.encode(ids.astype(np.int64), mask, unit["pixels"], 1, unit["has_image"])
            synthetic = np.zeros((self.views, f["image_global"].shape[1]), dtype=f["image_global"].dtype)
            synthetic[:len(f["image_global"]) - 1] = f["image_global"][1:]
            rows["mention_id"].append(mention_id)
            for name in ("text_global", "text_local", "image_global", "image_local"):
                rows[name].append(f[name][0])
            rows["synthetic_global"].append(synthetic)
            rows["text_mask"].append(mask[0].astype(bool))
            rows["n_views"].append(int(unit["n_views"][0]) if self.views else 0)
            rows["has_image"].append(bool(unit["has_image"][0]))
            rows["stats"].append(json.dumps(unit["stats"]))
        return {k: np.array(v, dtype=object) if k in ("mention_id", "stats") else np.array(v)
                for k, v in rows.items()}


class KBScorer:
    """The trained model and the KB's memory-mapped entity features; a mention batch -> its top-k entities,
    with the evaluation's kernel (mel_ray.scoring.rank_counts, no gold). The entity sides are computed at the
    first batch and kept for the next ones up to `cache_bytes` (eval.cache_gb; mel_ray.scoring.EntitySides),
    the rest recomputed per batch."""

    def __init__(self, features_uri: str, state: dict, top_k: int, entity_chunk: int, threads: int,
                 use_gpu: bool = False, cache_bytes: int = 0):
        import torch

        from mel_ray.checkpoints import build_model
        from mel_ray.feature_store import EntityStore
        from mel_ray.scoring import EntitySides

        torch.set_num_threads(threads)
        if use_gpu:
            torch.set_float32_matmul_precision("highest")      # fp32 scores, as evaluate's shards
        device = torch.device("cuda" if use_gpu else "cpu")
        self.torch, self.store = torch, EntityStore(features_uri)
        self.model = build_model(state).to(device).eval()
        self.top_k = top_k
        self.sides = EntitySides(self.store.chunk, 0, self.store.num_entities, entity_chunk, cache_bytes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mel_ray.scoring import NonFiniteScores, rank_counts

        torch = self.torch
        mentions = {k: torch.from_numpy(np.asarray(batch[k], dtype=np.float32)) for k in FLOAT_COLUMNS}
        mentions["text_mask"] = torch.from_numpy(np.asarray(batch["text_mask"], dtype=bool))
        mentions["n_views"] = torch.from_numpy(np.asarray(batch["n_views"], dtype=np.int64))
        if mentions["synthetic_global"].shape[1] == 0:   # no view drawn (the model reads none): CVaCPT is the identity
            del mentions["synthetic_global"]             # for every mention, so it is left out, as for such features
        n = len(batch["mention_id"])
        try:
            _, ids, scores = rank_counts(self.model, mentions, None, self.sides.chunks(self.model),
                                         mention_batch=max(1, n), topk=self.top_k)
            nonfinite = np.zeros(n, dtype=bool)
        except NonFiniteScores as err:      # marked, not raised: the driver counts every batch's, then stops
            k = min(self.top_k, self.store.num_entities)
            ids, scores, nonfinite = np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=np.float32), err.mask
        return {"mention_id": batch["mention_id"], "entity_ids": ids, "scores": scores, "stats": batch["stats"],
                "nonfinite": nonfinite}


# ------------------------------------------------------------------------------------------------- stage


def _draw_views(mentions: pa.Table, cfg: dict, views: int, output: str, use_gpu: bool, concurrency: int,
                cache_dir: str) -> tuple[str, int]:
    """Synthetic views under OUTPUT/synthetic/<key>/ through the synthesize stage's own plan and actor pool
    (the same pinned model, settings and key as in training); only missing ones are drawn."""
    from mel_ray.config import SynthesizeConfig
    from mel_ray.synthesize import draw_views, existing_images, image_relpath, plan_synthesis, todo_table

    section = SynthesizeConfig.model_validate({**cfg["synthesize"], "num_gpus": 1 if use_gpu else 0})
    plan = plan_synthesis(cfg["models"]["diffusion"], section, cache_dir)
    existing = existing_images(output, plan.key)
    done = {(m, v) for m in mentions.column("mention_id").to_pylist() for v in range(views)
            if image_relpath(plan.key, m, v) in existing}
    todo = todo_table(mentions.rename_columns({"text": "sentence"}).select(["mention_id", "mention", "sentence"]),
                      views, section.seed, done)
    if todo.num_rows:
        log.info("link: drawing %d synthetic views (%d actors)", todo.num_rows, concurrency)
        draw_views(todo, plan, output, batch_size=1, concurrency=concurrency, num_gpus=section.num_gpus,
                   write_parts=False, gpu_setting="link.use_gpu")
    return plan.key, todo.num_rows


def inputs_key(model_state: dict, kb_features_uri: str, mentions: pa.Table, top_k: int,
               candidates: int | None = None) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(model_state["model"]):
        digest.update(model_state["model"][name].numpy().tobytes())
    sink = pa.BufferOutputStream()
    pq.write_table(mentions, sink)
    settings = {"model": digest.hexdigest(), "kb": kb_features_uri, "top_k": top_k,
                "mentions": hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()}
    if candidates is not None:          # exact links keep their key; approximate ones get their own
        settings["candidates"] = candidates
    return settings_key(settings)


def link(model: str, kb: str, mentions_path: str, output: str, *, top_k: int = 10, config: dict | None = None,
         tracking_uri: str | None = None, batch_size: int = 64, entity_chunk: int = 1024, concurrency: int = 1,
         use_gpu: bool = False, cache_dir: str | None = None, scorer_gpus: float | str = "auto",
         candidates: int | None = None, cache_gb: float = 1.0) -> dict[str, Any]:
    """use_gpu (link.use_gpu): the diffusion and CLIP actors; scorer_gpus (eval.num_gpus, "auto" = 1 where the
    cluster has GPUs): the KB scorer actors, as evaluate's shards; cache_gb (eval.cache_gb): entity sides each
    exact scorer keeps between mention batches (0: recompute). candidates: None = exact (every KB entity scored
    by the matcher); C = retrieve, then rerank (mel_ray/eval/candidates.py): approximate, and the report says
    so."""
    import ray

    from mel_ray.dataset import load_dataset
    from mel_ray.feature_store import find_features, read_manifest, text_pooling_of
    from mel_ray.features.shards import merge_stats
    from mel_ray.models import DEFAULT_CACHE, pin_model
    from mel_ray.runtime import init_ray, resolve_num_gpus
    from mel_ray.synthesize import views_unused
    from mel_ray.verify import require_dataset, require_features

    t0 = time.perf_counter()
    cache_dir = cache_dir or DEFAULT_CACHE
    state = load_linker(model, config, tracking_uri)
    cfg = state["config"]
    mentions = read_mentions(mentions_path)
    encoded, folders = _without_folder_images(mentions, _folder_images(mentions))
    require_dataset(kb)                          # the KB's manifest, footers, schemas, counts: one line, exit 2
    if candidates is not None:                   # retrieve, then rerank: a count the KB can give, >= top_k
        from mel_ray.eval.candidates import check_link_candidates

        check_link_candidates(candidates, top_k, load_dataset(kb).num_entities)
    clip = pin_model(cfg["models"]["clip"])      # a hub id: the commit the KB's features must have been made with
    text_encoder = cfg["models"].get("text_encoder")         # None: CLIP's text tower
    text_encoder = pin_model(text_encoder) if text_encoder else None
    from mel_ray.checkpoints import encoder_fingerprint_of, require_matching_features
    from mel_ray.eval.candidates import approximate_fields
    from mel_ray.model.encoder import encoder_state, text_encoder_state

    fine_tuned = encoder_fingerprint_of(state)   # a finetune model: KB features and mentions by its own CLIP
    features = find_features(kb, model=clip, cache_dir=cache_dir, several="first", encoder=fine_tuned,
                             text_encoder=text_encoder)
    require_features(features, kb)               # every shard's footer and schema, before any actor reads one
    key = inputs_key(state, features, mentions, top_k, candidates)
    report_uri = storage.join(output, REPORT)
    if storage.exists(report_uri) and storage.read_json_object(report_uri).get("inputs_key") == key:
        print(f"[link] already linked: {storage.join(output, LINKS)}")
        return {**storage.read_json_object(report_uri), "skipped": True}

    manifest = read_manifest(features)
    require_matching_features(state, manifest, features, model)
    cache_bytes = 0
    if candidates is None and cache_gb > 0:      # a budget below one chunk: one line, before Ray starts
        from mel_ray.eval.evaluate import cache_budget, side_bytes_per_entity

        cache_bytes = cache_budget(cache_gb, entity_chunk, side_bytes_per_entity(state, features), "link")
    weights = ray.put(encoder_state(state["model"])) if fine_tuned else None
    text_weights = text_encoder_state(state["model"]) if fine_tuned else None
    text_weights = ray.put(text_weights) if text_weights else None
    dims_views = state["dims"].get("views")
    views = int(cfg["synthesize"]["views"] if dims_views is None else dims_views)
    if views_unused(state["dims"].get("cvacpt_weight", 1.0), dims_views):
        views = 0                                          # the model never looks at views: draw none
    init_ray()
    scorer_gpus = resolve_num_gpus("link", scorer_gpus, "eval.num_gpus")
    view_key, drawn = (_draw_views(mentions, cfg, views, output, use_gpu, concurrency, cache_dir)
                       if views else ("", 0))
    print(f"[link] {mentions.num_rows} mentions: {drawn} synthetic views drawn "
          f"({mentions.num_rows * views - drawn} already there) ({time.perf_counter() - t0:.1f}s)", flush=True)
    text_length = int(manifest.get("settings", {}).get("text_length", cfg["features"]["text_length"]))
    # half a CPU per actor on CPU: the encoder and scorer pools then leave a whole CPU for Ray Data's own tasks
    # even on a 2-CPU machine (they would otherwise wait for each other forever)
    actor_cpus = 1 if use_gpu else 0.5
    blocks = [encoded.slice(a, batch_size) for a in range(0, encoded.num_rows, batch_size)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(MentionEncoder, batch_size=batch_size, concurrency=concurrency,
                        num_gpus=1 if use_gpu else 0, num_cpus=actor_cpus,
                        fn_constructor_kwargs={"clip": clip, "cache_dir": cache_dir,
                                               "text_length": text_length, "use_gpu": use_gpu, "views": views,
                                               "output": output, "view_key": view_key, "weights": weights,
                                               "text_encoder": text_encoder, "text_weights": text_weights,
                                               # new mentions' t_G pooled as the KB's was (models.text_pooling)
                                               "text_pooling": text_pooling_of(manifest)})
    scorer, scorer_kwargs = KBScorer, {"use_gpu": scorer_gpus > 0, "cache_bytes": cache_bytes}
    if candidates is not None:                   # retrieve, then rerank (mel_ray/eval/candidates.py)
        from mel_ray.eval.candidates import CandidateScorer

        scorer, scorer_kwargs = CandidateScorer, {"candidates": candidates}
        scorer_gpus = 0.0                        # the candidate path runs on CPUs (not wired for GPUs yet)
    ds = ds.map_batches(scorer, batch_size=batch_size, concurrency=concurrency,
                        num_cpus=1 if scorer_gpus else 0.5, num_gpus=scorer_gpus,
                        fn_constructor_kwargs={"features_uri": features, "state": state, "top_k": top_k,
                                               "entity_chunk": entity_chunk, "threads": 1, **scorer_kwargs})
    results = {}
    for row in ds.iter_rows():
        results[row["mention_id"]] = row
        if len(results) % max(1, batch_size) == 0:
            print(f"[link] scored {len(results)}/{mentions.num_rows} mentions against the whole KB", flush=True)

    nonfinite = sum(bool(row["nonfinite"]) for row in results.values())
    if nonfinite:
        raise NonFiniteError(model, f"{nonfinite} of {len(results)} mentions of {mentions_path} got non-finite "
                             f"scores (NaN or inf) against the KB {kb}; no links written", rows=nonfinite)
    entities = load_dataset(kb).entities(columns=["qid", "name"])
    qids, names = entities.column("qid").to_pylist(), entities.column("name").to_pylist()
    out: dict[str, list] = {f.name: [] for f in LINKS_SCHEMA}
    stats = merge_stats([json.loads(row["stats"]) for row in results.values()])
    if folders:                                        # sent as "no image" (see _without_folder_images)
        stats["no_image"] = stats.get("no_image", 0) - folders
        stats["missing"] = stats.get("missing", 0) + folders
    for m, mention, text in zip(mentions.column("mention_id").to_pylist(), mentions.column("mention").to_pylist(),
                                mentions.column("text").to_pylist()):
        row = results[m]
        for rank, (eid, score) in enumerate(zip(row["entity_ids"], row["scores"]), start=1):
            for name, value in (("mention_id", m), ("mention", mention), ("text", text), ("rank", rank),
                                ("entity_id", int(eid)), ("qid", qids[int(eid)]), ("name", names[int(eid)]),
                                ("score", float(score))):
                out[name].append(value)
    storage.write_table(storage.join(output, LINKS), pa.table(out, schema=LINKS_SCHEMA))
    report = {"inputs_key": key, "model": model, "kb": kb, "kb_features": features, "mentions_file": mentions_path,
              "mentions": mentions.num_rows, "linked": len(results), "top_k": top_k, "views_per_mention": views,
              "views_drawn": drawn,
              "images": {"ok": stats.get("with_image", 0),
                         **{k: stats.get(k, 0) for k in ("no_image", "missing", "undecodable")}},
              "views": {k: stats.get("synthetic", {}).get(k, 0) for k in ("used", "missing", "undecodable")},
              "seconds": round(time.perf_counter() - t0, 2), "skipped": False,
              "cache_gb_per_scorer": cache_bytes / 2**30, **approximate_fields(candidates)}
    storage.write_json(report_uri, report)              # last: its presence means links.parquet is complete
    how = "" if candidates is None else f" (APPROXIMATE: top-{candidates} first-stage candidates reranked)"
    print(f"[link] wrote {storage.join(output, LINKS)}{how}: {len(results)} mentions x top-{top_k}; images "
          f"{report['images']} ({report['seconds']}s)", flush=True)
    return report
