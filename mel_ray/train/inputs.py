"""Pixels and token ids for end-to-end training (`model.encoder: finetune`), streamed by Ray Data.

The driver builds three small Arrow tables of *references* (docs/data-contract.md, "Fine-tuning inputs"):

* `train` / `dev` rows: one per mention: its token ids (MIMIC's mention template, tokenised once here), its image
  URI, its synthetic views (view, URI, sha256), its gold entity id and its candidate entities (`cand_ids`: the
  gold first, then the head of its mined JD-CCL pool, which the step samples its k negatives from) with their
  token ids and the one image each candidate shows in this row;
* `kb` rows: every entity with its token ids and first image (evaluation).

Ray Data then decodes and preprocesses the images on CPU tasks (`decode_rows`, no torch import: the same
`preprocess_image` as extract-features, so a finetune step at its first weights sees the frozen features' pixels)
and the training workers receive float32 pixel tensors batch by batch; nothing holds a split's pixels at once.

Images, as MIMIC feeds them: an entity with several images shows a random one in training (drawn per (mention,
entity) pair from train.seed, so reruns see the same pixels and different mentions of one entity see different
images) and its first in evaluation; an absent, missing or undecodable image is an all-zero pixel tensor (MIMIC's
`torch.zeros`; frozen features use the paper's blank white instead), counted per batch (`blank_images`).
Synthetic views that are missing or do not match their sha256 are left out (n_views counts those used).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mel_ray.features.inputs import decode_image, pack, preprocess_image, tokenize, unpack

DECODE_CPUS = 0.25          # per Ray Data decode task: they run next to the training workers
ROWS_PER_BLOCK = 64         # reference rows per Ray Data input block


@dataclass
class FinetuneInputs:
    tables: dict[str, pa.Table]      # "train", "dev", "kb"
    image_cfg: dict
    image_size: tuple[int, int]
    text_length: int
    n_views: int                     # S: synthetic view slots per mention (0: none)
    synthetic_key: str | None
    images: dict[str, int]           # rows with an image, per table ("kb", "train", "dev")

    def decode_kwargs(self) -> dict:
        return {"image_cfg": self.image_cfg, "image_size": list(self.image_size), "text_length": self.text_length,
                "n_views": self.n_views}


def image_pick(seed: int, mention_id: str, entity_id: int, n_images: int) -> int:
    """Which of an entity's images a training row shows: fixed by (seed, mention, entity), uniform over them."""
    if n_images <= 1:
        return 0
    return zlib.crc32(f"{seed}\0{mention_id}\0{entity_id}".encode()) % n_images


def build_inputs(dataset_uri: str, clip: str, *, text_length: int, synthetic_key: str | None, views: int | None,
                 pools: list[np.ndarray], pool_head: int, seed: int, cache_dir: str,
                 text_encoder: str | None = None) -> FinetuneInputs:
    """The train / dev / kb reference tables (tokenised here, on the driver). pool_head: how many of each gold's
    mined negatives travel with its rows (k, or sample_top when negatives are sampled from a longer head).
    text_encoder: models.text_encoder, whose tokenizer then makes the token ids (None: CLIP's)."""
    from mel_ray.dataset import load_dataset
    from mel_ray.features.plan import make_plan

    plan = make_plan(dataset_uri, clip, synthetic_key=synthetic_key, views=views, text_length=text_length,
                     dtype=None, splits=("train", "dev"), micro_batch=1, shard_rows=1, features_root=None,
                     cache_dir=cache_dir, text_encoder=text_encoder)
    ds = load_dataset(dataset_uri)
    kb = plan.tables["entities"]
    kb_ids, kb_mask = tokenize(plan.tokenizer, kb.texts, text_length)
    all_images = [[ds.resolve_uri(u) for u in uris]
                  for uris in ds.entities(columns=["image_uris"]).column("image_uris").to_pylist()]
    tables = {"kb": pa.table({
        "entity_id": pa.array(kb.ids, pa.int64()),
        "input_ids": pa.array([pack(r) for r in kb_ids], pa.binary()),
        "attention_mask": pa.array([pack(r) for r in kb_mask], pa.binary()),
        "image": pa.array(kb.images, pa.string()),
    })}
    images = {"kb": sum(1 for u in kb.images if u)}
    for split in ("train", "dev"):
        t = plan.tables[f"mentions/{split}"]
        gold = ds.mentions(split, columns=["entity_id"]).column("entity_id").to_numpy()
        ids, mask = tokenize(plan.tokenizer, t.texts, text_length)
        cands, cand_ids, cand_mask, cand_images = [], [], [], []
        for mid, g in zip(t.ids, gold):
            head = pools[int(g)][:pool_head] if split == "train" else np.zeros(0, np.int64)
            row = [int(g), *(int(e) for e in head)]
            cands.append(row)
            cand_ids.append(pack(kb_ids[row]))
            cand_mask.append(pack(kb_mask[row]))
            if split == "train":
                cand_images.append([all_images[e][image_pick(seed, mid, e, len(all_images[e]))]
                                    if all_images[e] else None for e in row])
            else:
                cand_images.append([kb.images[e] for e in row])
        views_json = [json.dumps([list(v) for v in (t.views[i] if t.views else [])]) for i in range(t.rows)]
        tables[split] = pa.table({
            "mention_id": pa.array(t.ids, pa.string()),
            "gold": pa.array(gold, pa.int64()),
            "input_ids": pa.array([pack(r) for r in ids], pa.binary()),
            "attention_mask": pa.array([pack(r) for r in mask], pa.binary()),
            "image": pa.array(t.images, pa.string()),
            "views": pa.array(views_json, pa.string()),
            "cand_ids": pa.array(cands, pa.list_(pa.int64())),
            "cand_input_ids": pa.array(cand_ids, pa.binary()),
            "cand_attention_mask": pa.array(cand_mask, pa.binary()),
            "cand_images": pa.array(cand_images, pa.list_(pa.string())),
        })
        images[split] = sum(1 for u in t.images if u)
    return FinetuneInputs(tables=tables, image_cfg=plan.image_cfg, image_size=plan.image_size,
                          text_length=text_length, n_views=plan.n_views, synthetic_key=synthetic_key, images=images)


# ------------------------------------------------------------------------------ Ray Data: the CPU stage


def _pixels(uri: str | None, image_cfg: dict, size: tuple[int, int], want_sha: str = "") -> tuple[np.ndarray, bool]:
    """(float32 [3, H, W], decoded?): an absent, missing or undecodable image is all zeros (MIMIC)."""
    if uri:
        image, _ = decode_image(uri, size, want_sha)
        if image is not None:
            return preprocess_image(image, image_cfg), True
    return np.zeros((3, *size), np.float32), False


def decode_rows(batch: dict[str, np.ndarray], *, image_cfg: dict, image_size: list[int], text_length: int,
                n_views: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches (numpy format, CPU tasks): image references -> packed float32 pixels.

    kb rows get `pixels`; mention rows also `view_pixels` [S, 3, H, W] (zero rows past `n_views`) and
    `cand_pixels` [C, 3, H, W]. `blank_images` counts, per row, the referenced images that were zeroed
    (missing or undecodable), so the worker can report them."""
    size = (int(image_size[0]), int(image_size[1]))
    out: dict[str, Any] = {k: v for k, v in batch.items() if k not in ("image", "views", "cand_images")}
    pixels, blanks, view_pixels, used_views, cand_pixels = [], [], [], [], []
    for i, uri in enumerate(batch["image"]):
        arr, ok = _pixels(uri, image_cfg, size)
        pixels.append(pack(arr))
        blank = int(bool(uri) and not ok)
        if "views" in batch:
            slots = np.zeros((n_views, 3, *size), np.float32)
            used = 0
            for _view, view_uri, sha in json.loads(batch["views"][i])[:n_views]:
                arr, ok = _pixels(view_uri, image_cfg, size, sha)
                if ok:
                    slots[used] = arr
                    used += 1
            view_pixels.append(pack(slots))
            used_views.append(used)
        if "cand_images" in batch:
            stack = []
            for cand_uri in batch["cand_images"][i]:
                arr, ok = _pixels(cand_uri, image_cfg, size)
                stack.append(arr)
                blank += int(bool(cand_uri) and not ok)
            cand_pixels.append(pack(np.stack(stack)))
        blanks.append(blank)
    out["pixels"] = np.array(pixels, dtype=object)
    out["blank_images"] = np.array(blanks, dtype=np.int64)
    if "views" in batch:
        out["view_pixels"] = np.array(view_pixels, dtype=object)
        out["n_views"] = np.array(used_views, dtype=np.int64)
    if "cand_images" in batch:
        out["cand_pixels"] = np.array(cand_pixels, dtype=object)
    return out


def decoded(table: pa.Table, inputs: FinetuneInputs | dict):
    """A Ray Dataset of `table`'s rows with their pixels (decode_rows on CPU tasks, streamed)."""
    import ray

    kwargs = inputs.decode_kwargs() if isinstance(inputs, FinetuneInputs) else inputs
    # many small input blocks, so decoding spreads over as many CPU tasks as the cluster gives (one block would
    # be one task, however big the split)
    blocks = [table.slice(a, ROWS_PER_BLOCK) for a in range(0, table.num_rows, ROWS_PER_BLOCK)] or [table]
    return ray.data.from_arrow(blocks).map_batches(decode_rows, fn_kwargs=kwargs, batch_format="numpy",
                                                   batch_size=16, num_cpus=DECODE_CPUS)


# ------------------------------------------------------------------------------ the worker: tensors


def to_tensors(batch: dict[str, np.ndarray], decode: dict) -> tuple[dict, dict | None]:
    """A decoded batch -> (the encoder's batch of these rows, their candidates or None).

    Candidates: {"ids": list of [C_i] id arrays (gold first), "by_id": entity id -> (input_ids, attention_mask,
    pixels) tensors}; `entities(ids)` stacks the rows of given ids."""
    import torch

    h, w = decode["image_size"]
    length, s = decode["text_length"], decode["n_views"]
    n = len(batch["input_ids"])

    def stack(column: str, dtype, shape: tuple) -> torch.Tensor:
        return torch.from_numpy(np.stack([unpack(b, dtype, shape) for b in batch[column]]) if n else
                                np.zeros((0, *shape), dtype))

    out = {"input_ids": stack("input_ids", np.int32, (length,)).long(),
           "attention_mask": stack("attention_mask", np.int8, (length,)).long(),
           "pixels": stack("pixels", np.float32, (3, h, w))}
    for key in ("gold", "entity_id"):
        if key in batch:
            out[key] = torch.from_numpy(np.array(batch[key], dtype=np.int64))   # a copy: Ray's arrays are read-only
    if "view_pixels" in batch and s > 0:
        out["view_pixels"] = stack("view_pixels", np.float32, (s, 3, h, w))
        out["n_views"] = torch.from_numpy(np.array(batch["n_views"], dtype=np.int64))
    if "cand_ids" not in batch:
        return out, None
    by_id: dict[int, tuple] = {}
    ids = []
    for i in range(n):
        row = np.asarray(batch["cand_ids"][i], dtype=np.int64)
        c = len(row)
        tokens = unpack(batch["cand_input_ids"][i], np.int32, (c, length))
        mask = unpack(batch["cand_attention_mask"][i], np.int8, (c, length))
        pixels = unpack(batch["cand_pixels"][i], np.float32, (c, 3, h, w))
        for j, eid in enumerate(row):
            by_id.setdefault(int(eid), (tokens[j], mask[j], pixels[j]))
        ids.append(row)
    return out, {"ids": ids, "by_id": by_id, "shapes": (length, (3, h, w))}


def entities(candidates: dict, ids: np.ndarray) -> dict:
    """The encoder's batch for these entity ids (each must be one of the batch's candidates)."""
    import torch

    rows = [candidates["by_id"][int(e)] for e in ids]
    if not rows:            # a rank that adds no entity to a global-batch step (they all came from other ranks)
        length, pixels = candidates["shapes"]
        return {"input_ids": torch.zeros(0, length, dtype=torch.long),
                "attention_mask": torch.zeros(0, length, dtype=torch.long),
                "pixels": torch.zeros(0, *pixels)}
    return {"input_ids": torch.from_numpy(np.stack([r[0] for r in rows])).long(),
            "attention_mask": torch.from_numpy(np.stack([r[1] for r in rows])).long(),
            "pixels": torch.from_numpy(np.stack([r[2] for r in rows]))}
