"""`mel-ray link`: link NEW mentions against a KB with a trained model, end to end as one Ray Data job.

    mentions file ──read──▶ views (diffusion actor pool) ──▶ CLIP features (encoder actor pool)
                                                          ──▶ scores against EVERY KB entity (scorer actor pool)
                                                          ──▶ OUTPUT/links.parquet + OUTPUT/link_report.json

Inputs: a model (exported `model.pt`, an MLflow run id / `runs:/<id>` holding one, or a Ray Train checkpoint
folder plus a config), a KB (a mel-ray dataset whose features/<key> was made with the model's CLIP), and a
Parquet or JSONL file of mentions: `text` (the sentence), `mention`, optional `image` (path or URI; relative
paths are taken beside the file) and optional `mention_id` (default `row<N>`). The model's own config gives
the diffusion model, the synthesis settings and n_s, so new mentions get views drawn exactly as in training.

Contract (docs/data-contract.md, "Batch linking"): OUTPUT/links.parquet, one row per (mention, rank):
mention_id, mention, text, rank (1..top_k), entity_id, qid, name, score; OUTPUT/synthetic/<key>/ the PNG views
(a person can look at them); OUTPUT/link_report.json the counts and the inputs' identity. A rerun with the same
inputs is skipped; an interrupted one draws only the views that are missing. A mention's image that is missing
or undecodable is counted and the mention is linked without it (blank image, has_image false, as in
extract-features), never replaced by noise.

Each mention is encoded on its own (one CLIP forward per mention) so its features do not depend on batching.
Scorers run whole mention batches against the KB in entity chunks: memory is bounded by batch x chunk, never
mentions x KB; the entity side is recomputed per mention batch (use large `batch_size` for large KBs).
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mel_ray import storage
from mel_ray.errors import DataError, UsageError
from mel_ray.keys import settings_key

log = logging.getLogger(__name__)
LINKS, REPORT = "links.parquet", "link_report.json"
LINKS_SCHEMA = pa.schema([("mention_id", pa.string()), ("mention", pa.string()), ("text", pa.string()),
                          ("rank", pa.int32()), ("entity_id", pa.int64()), ("qid", pa.string()),
                          ("name", pa.string()), ("score", pa.float32())])


# ------------------------------------------------------------------------------------------------ inputs


def read_mentions(path: str) -> pa.Table:
    """The mentions file as a table (mention_id, text, mention, image); errors name the file, row and field."""
    if path.endswith(".parquet"):
        rows = storage.read_table(path).to_pylist()
    elif path.endswith((".jsonl", ".json")):
        rows = []
        for i, line in enumerate(storage.read_bytes(path).decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(path, f"invalid JSON: {err.msg}", record=f"line {i}") from None
            if not isinstance(rows[-1], dict):
                raise DataError(path, "expected a JSON object with 'text' and 'mention'", record=f"line {i}")
    else:
        raise UsageError(f"{path}: mentions must be a .parquet or .jsonl file")
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    out: dict[str, list] = {"mention_id": [], "text": [], "mention": [], "image": []}
    seen: set[str] = set()
    for i, row in enumerate(rows):
        for field in ("text", "mention"):
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                raise DataError(path, f"must be a non-empty string (got {value!r})", record=i, field=field)
        image = row.get("image")
        if image is not None and not isinstance(image, str):
            raise DataError(path, f"must be a path, a URI or null (got {image!r})", record=i, field="image")
        if image and "://" not in image and not Path(image).is_absolute():
            image = storage.join(base, image)
        mention_id = row.get("mention_id")
        mention_id = f"row{i}" if mention_id is None else str(mention_id)
        if mention_id in seen:
            raise DataError(path, f"{mention_id!r} is not unique", record=i, field="mention_id")
        seen.add(mention_id)
        for name, value in (("mention_id", mention_id), ("text", row["text"]), ("mention", row["mention"]),
                            ("image", image or None)):
            out[name].append(value)
    if not rows:
        raise DataError(path, "no mentions")
    return pa.table(out, schema=pa.schema([(k, pa.string()) for k in out]))


def load_linker(model: str, config: dict | None = None, tracking_uri: str | None = None) -> dict:
    """{'model': state_dict, 'dims', 'config'} from model.pt, an MLflow run (id or runs:/<id>) holding
    model.pt, or a Ray Train checkpoint folder (state.pt, which has no config: `config` is then required)."""
    import torch

    uri = model
    if model.startswith("runs:/") or (len(model) == 32 and all(c in "0123456789abcdef" for c in model)):
        from mlflow.tracking import MlflowClient

        run_id = model.removeprefix("runs:/").split("/")[0]
        with tempfile.TemporaryDirectory() as tmp:
            local = MlflowClient(tracking_uri).download_artifacts(run_id, "model.pt", tmp)
            saved = torch.load(local, weights_only=True)
    else:
        if not uri.endswith(".pt"):
            uri = storage.join(uri, "model.pt") if storage.exists(storage.join(uri, "model.pt")) \
                else storage.join(uri, "state.pt")
        if not storage.exists(uri):
            raise UsageError(f"{model}: no model.pt or state.pt there (give an exported model, a checkpoint "
                             "folder or an MLflow run id)")
        saved = torch.load(io.BytesIO(storage.read_bytes(uri)), weights_only=True)
    cfg = saved.get("config") or config
    if not cfg:
        raise UsageError(f"{model}: a training checkpoint holds no config; pass --config (the training config)")
    return {"model": saved.get("state_dict", saved.get("model")), "dims": saved["dims"], "config": cfg}


def kb_features(kb: str, clip: str, cache_dir: str) -> str:
    """The KB's complete features/<key> made with this CLIP (same fingerprint); a clear error otherwise."""
    from mel_ray.features import model_fingerprint

    want = model_fingerprint(clip, cache_dir)
    root = storage.join(kb, "features")
    keys = sorted({p.split("/")[0] for p in storage.list_files(root) if p.endswith("manifest.json")}) \
        if storage.exists(root) else []
    found = []
    for key in keys:
        uri = storage.join(root, key)
        manifest = storage.read_json(storage.join(uri, "manifest.json"))
        found.append(manifest.get("model", {}).get("fingerprint"))
        if found[-1] == want:
            return uri
    raise UsageError(f"{kb}: no complete feature set made with {clip} (found {len(found)} with other models); "
                     f"run: mel-ray extract-features --dataset {kb} --model {clip}")


# ------------------------------------------------------------------------------------------ Ray Data actors


class MentionEncoder:
    """CLIP features of one mention at a time: text, its image (blank if none), its synthetic views."""

    def __init__(self, clip: str, cache_dir: str, text_length: int, use_gpu: bool, views: int, output: str,
                 view_key: str):
        from mel_ray.features import _Encoder, _output_size, image_config
        from mel_ray.models import load_clip

        _, processor = load_clip(clip, "cpu", None, cache_dir)    # tokenizer and image settings only
        self.tokenizer, self.image_cfg = processor.tokenizer, image_config(processor.image_processor)
        self.size = _output_size(self.image_cfg)
        self.encoder = _Encoder(clip, cache_dir, None, use_gpu, self.size, text_length)
        self.text_length, self.views, self.output, self.view_key = text_length, views, output, view_key

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from mel_ray.features import BLANK_COLOR, _decode, mention_text, preprocess_image, tokenize
        from mel_ray.synthesize import image_relpath

        rows: dict[str, list] = {k: [] for k in ("mention_id", "text_global", "text_local", "text_mask",
                                                 "image_global", "image_local", "synthetic_global", "n_views",
                                                 "has_image", "image_status")}
        for i, mention_id in enumerate(batch["mention_id"]):
            ids, mask = tokenize(self.tokenizer, [mention_text(batch["mention"][i], batch["text"][i])],
                                 self.text_length)
            uri = batch["image"][i]
            img, status = (None, "no_image") if not uri else _decode(uri, self.size)
            if img is None:
                img = Image.new("RGB", (self.size[1], self.size[0]), BLANK_COLOR)
            images = [img]
            for view in range(self.views):
                view_uri = storage.join(self.output, image_relpath(self.view_key, mention_id, view))
                view_img, view_status = _decode(view_uri, self.size)
                if view_img is None:
                    raise RuntimeError(f"link: view {view} of {mention_id} is {view_status}")
                images.append(view_img)
            pixels = np.stack([preprocess_image(im, self.image_cfg) for im in images])
            f = self.encoder.encode(ids.astype(np.int64), mask, pixels, 1)
            rows["mention_id"].append(mention_id)
            for name in ("text_global", "text_local", "image_local"):
                rows[name].append(f[name][0])
            rows["image_global"].append(f["image_global"][0])
            rows["synthetic_global"].append(f["image_global"][1:])
            rows["text_mask"].append(mask[0].astype(bool))
            rows["n_views"].append(self.views)
            rows["has_image"].append(status == "ok")
            rows["image_status"].append(status)
        return {k: np.array(v) if k not in ("mention_id", "image_status") else np.array(v, dtype=object)
                for k, v in rows.items()}


class KBScorer:
    """The trained model and the KB's memory-mapped entity features; a mention batch -> its top-k entities."""

    def __init__(self, features_uri: str, state: dict, top_k: int, entity_chunk: int, threads: int):
        import torch

        from mel_ray.eval.evaluate import build_model
        from mel_ray.train.data import EntityStore

        torch.set_num_threads(threads)
        self.torch, self.store, self.model = torch, EntityStore(features_uri), build_model(state)
        self.top_k, self.entity_chunk = top_k, entity_chunk

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mel_ray.eval.ranking import local_topk, merge_topk
        from mel_ray.eval.scoring import chunks_of

        torch = self.torch
        names = ("text_global", "text_local", "image_global", "image_local", "synthetic_global")
        mentions = {k: torch.from_numpy(np.asarray(batch[k], dtype=np.float32)) for k in names}
        mentions["text_mask"] = torch.from_numpy(np.asarray(batch["text_mask"], dtype=bool))
        mentions["n_views"] = torch.from_numpy(np.asarray(batch["n_views"], dtype=np.int64))
        k = min(self.top_k, self.store.num_entities)
        top: list = []
        with torch.no_grad():
            side = self.model.mention_side(self.model.mention_features(mentions))
            for first, chunk in chunks_of(self.store.chunk, 0, self.store.num_entities, self.entity_chunk):
                n = chunk["text_global"].shape[0]
                scores = self.model.pair_logits(side, self.model.entity_side(self.model.entity_features(chunk)))
                top = [merge_topk(top + [local_topk(scores["overall"], torch.arange(first, first + n), k)], k)]
        ids, scores = top[0]
        return {"mention_id": batch["mention_id"], "entity_ids": ids, "scores": scores,
                "image_status": batch["image_status"]}


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


def inputs_key(model_state: dict, kb_features_uri: str, mentions: pa.Table, top_k: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(model_state["model"]):
        digest.update(model_state["model"][name].numpy().tobytes())
    sink = pa.BufferOutputStream()
    pq.write_table(mentions, sink)
    return settings_key({"model": digest.hexdigest(), "kb": kb_features_uri, "top_k": top_k,
                         "mentions": hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()})


def link(model: str, kb: str, mentions_path: str, output: str, *, top_k: int = 10, config: dict | None = None,
         tracking_uri: str | None = None, batch_size: int = 64, entity_chunk: int = 1024, concurrency: int = 1,
         use_gpu: bool = False, cache_dir: str | None = None) -> dict[str, Any]:
    import ray

    from mel_ray.dataset import load_dataset
    from mel_ray.models import DEFAULT_CACHE, pin_model
    from mel_ray.runtime import init_ray

    t0 = time.perf_counter()
    cache_dir = cache_dir or DEFAULT_CACHE
    state = load_linker(model, config, tracking_uri)
    cfg = state["config"]
    mentions = read_mentions(mentions_path)
    clip = pin_model(cfg["models"]["clip"])      # a hub id: the commit the KB's features must have been made with
    features = kb_features(kb, clip, cache_dir)
    key = inputs_key(state, features, mentions, top_k)
    report_uri = storage.join(output, REPORT)
    if storage.exists(report_uri) and storage.read_json(report_uri).get("inputs_key") == key:
        print(f"[link] already linked: {storage.join(output, LINKS)}")
        return {**storage.read_json(report_uri), "skipped": True}

    manifest = storage.read_json(storage.join(features, "manifest.json"))
    views = int(state["dims"].get("views") or cfg["synthesize"]["views"])
    if state["dims"].get("cvacpt_weight", 1.0) == 0.0:
        views = 0                                          # the model never looks at views: draw none
    init_ray()
    view_key, drawn = (_draw_views(mentions, cfg, views, output, use_gpu, concurrency, cache_dir)
                       if views else ("", 0))
    print(f"[link] {mentions.num_rows} mentions: {drawn} synthetic views drawn "
          f"({mentions.num_rows * views - drawn} already there) ({time.perf_counter() - t0:.1f}s)", flush=True)
    text_length = int(manifest.get("settings", {}).get("text_length", cfg["features"]["text_length"]))
    # half a CPU per actor on CPU: the encoder and scorer pools then leave a whole CPU for Ray Data's own tasks
    # even on a 2-CPU machine (they would otherwise wait for each other forever)
    actor_cpus = 1 if use_gpu else 0.5
    blocks = [mentions.slice(a, batch_size) for a in range(0, mentions.num_rows, batch_size)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(MentionEncoder, batch_size=batch_size, concurrency=concurrency,
                        num_gpus=1 if use_gpu else 0, num_cpus=actor_cpus,
                        fn_constructor_kwargs={"clip": clip, "cache_dir": cache_dir,
                                               "text_length": text_length, "use_gpu": use_gpu, "views": views,
                                               "output": output, "view_key": view_key})
    ds = ds.map_batches(KBScorer, batch_size=batch_size, concurrency=concurrency, num_cpus=actor_cpus,
                        fn_constructor_kwargs={"features_uri": features, "state": state, "top_k": top_k,
                                               "entity_chunk": entity_chunk, "threads": 1})
    results = {}
    for row in ds.iter_rows():
        results[row["mention_id"]] = row
        if len(results) % max(1, batch_size) == 0:
            print(f"[link] scored {len(results)}/{mentions.num_rows} mentions against the whole KB", flush=True)

    entities = load_dataset(kb).entities(columns=["qid", "name"])
    qids, names = entities.column("qid").to_pylist(), entities.column("name").to_pylist()
    out: dict[str, list] = {f.name: [] for f in LINKS_SCHEMA}
    status: dict[str, int] = {}
    for m, mention, text in zip(mentions.column("mention_id").to_pylist(), mentions.column("mention").to_pylist(),
                                mentions.column("text").to_pylist()):
        row = results[m]
        status[row["image_status"]] = status.get(row["image_status"], 0) + 1
        for rank, (eid, score) in enumerate(zip(row["entity_ids"], row["scores"]), start=1):
            for name, value in (("mention_id", m), ("mention", mention), ("text", text), ("rank", rank),
                                ("entity_id", int(eid)), ("qid", qids[int(eid)]), ("name", names[int(eid)]),
                                ("score", float(score))):
                out[name].append(value)
    storage.write_table(storage.join(output, LINKS), pa.table(out, schema=LINKS_SCHEMA))
    report = {"inputs_key": key, "model": model, "kb": kb, "kb_features": features, "mentions_file": mentions_path,
              "mentions": mentions.num_rows, "linked": len(results), "top_k": top_k, "views_per_mention": views,
              "views_drawn": drawn, "images": {"ok": status.get("ok", 0), "no_image": status.get("no_image", 0),
                                                "missing": status.get("missing", 0),
                                                "undecodable": status.get("undecodable", 0)},
              "seconds": round(time.perf_counter() - t0, 2), "skipped": False}
    storage.write_json(report_uri, report)              # last: its presence means links.parquet is complete
    print(f"[link] wrote {storage.join(output, LINKS)}: {len(results)} mentions x top-{top_k}; images "
          f"{report['images']} ({report['seconds']}s)", flush=True)
    return report
