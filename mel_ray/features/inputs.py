"""Model inputs (docs/data-contract.md, "CLIP features"): MIMIC's text templates and tokenising, image decoding
and a bit-exact copy of CLIP's image preprocessing, and the per-unit preparation that is extract-features'
CPU stage (and how `mel-ray link` prepares a new mention, so both count and blank bad images the same way).

Nothing here imports torch or transformers at module level: decode tasks stay light.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np

from mel_ray import storage
from mel_ray.errors import UsageError
from mel_ray.keys import sha256_hex

ENTITY_TEMPLATE = "{name} [SEP] {attributes}"
MENTION_TEMPLATE = "{mention} [SEP] {sentence}"
ATTRIBUTE_JOIN = ". "
ATTRIBUTE_END = "."
BLANK_COLOR = (255, 255, 255)             # paper §5.4: rows without an image get a blank white image
PREPROCESS_VERSION = 1                    # bump when preprocess_image / to_rgb change what they return


# ---------------------------------------------------------------------------------------------- text


def entity_text(name: str, attributes: list[str] | None) -> str:
    """MIMIC's entity input: the name, " [SEP] ", then the attribute statements ("a: b. c: d.")."""
    attrs = ATTRIBUTE_JOIN.join(attributes or [])
    return ENTITY_TEMPLATE.format(name=name, attributes=attrs + ATTRIBUTE_END if attrs else "")


def mention_text(mention: str, sentence: str) -> str:
    """MIMIC's mention input: the mention words, " [SEP] ", the sentence."""
    return MENTION_TEMPLATE.format(mention=mention, sentence=sentence)

def tokenize(tokenizer, texts: list[str], text_length: int) -> tuple[np.ndarray, np.ndarray]:
    """MIMIC's text input: (input_ids int32, attention_mask int8), padded / truncated to text_length."""
    if not texts:
        return np.zeros((0, text_length), np.int32), np.zeros((0, text_length), np.int8)
    enc = tokenizer(texts, padding="max_length", max_length=text_length, truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int8)


def load_processor(model: str, cache_dir: str) -> tuple[Any, dict]:
    """(tokenizer, image settings for `preprocess_image`) of a CLIP model, without loading its weights."""
    from transformers import CLIPProcessor

    from mel_ray.models import pretrained_args

    path, pinned = pretrained_args(model, cache_dir)
    processor = CLIPProcessor.from_pretrained(path, **pinned)
    return processor.tokenizer, image_config(processor.image_processor)


# --------------------------------------------------------------------------------------------- images


_IMAGE_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
               "do_normalize", "image_mean", "image_std")


def image_config(image_processor) -> dict:
    """The settings `preprocess_image` needs, from a transformers CLIP image processor, as plain JSON."""
    cfg = image_processor.to_dict()
    out = json.loads(json.dumps({k: cfg.get(k) for k in _IMAGE_KEYS}, default=int))
    if out["resample"] is None:
        out["resample"] = 2                 # transformers' default: BILINEAR
    return out


def output_size(cfg: dict) -> tuple[int, int]:
    """(height, width) of preprocessed images."""
    if cfg["do_center_crop"] and cfg.get("crop_size"):
        return int(cfg["crop_size"]["height"]), int(cfg["crop_size"]["width"])
    size = cfg["size"]
    if "height" in size:
        return int(size["height"]), int(size["width"])
    raise UsageError("image processors that resize the shortest edge without a center crop give images of "
                     "varying size; extract-features needs a fixed size (crop_size)")


def to_rgb(image):
    """RGB, transparency composited over white (as transformers' `convert_to_rgb`)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image, cfg: dict) -> np.ndarray:
    """CLIP's image preprocessing on an RGB PIL image -> float32 [3, H, W]: resize (shortest edge or fixed
    size, PIL with the configured filter), center crop (zero padding if too small), rescale, normalise.

    Bit for bit what transformers' CLIPImageProcessor does with its PIL/NumPy backend (the pipeline MIMIC
    ran; tests/test_features.py checks equality), implemented here so that decode workers import neither
    torch nor transformers, and so that the pixels do not change when torchvision is installed (transformers
    5 then switches CLIPImageProcessor to a torchvision backend that resizes differently)."""
    if cfg["do_resize"]:
        size, (w, h) = cfg["size"], image.size
        if size.get("shortest_edge"):
            edge = int(size["shortest_edge"])
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = edge, int(edge * long / short)
            new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
        else:
            new_h, new_w = int(size["height"]), int(size["width"])
        image = image.resize((new_w, new_h), resample=int(cfg["resample"]))
    arr = np.asarray(image).transpose(2, 0, 1)
    if cfg["do_center_crop"]:
        ch, cw = int(cfg["crop_size"]["height"]), int(cfg["crop_size"]["width"])
        h, w = arr.shape[1:]
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0:
            arr = arr[:, top:top + ch, left:left + cw]
        else:                               # too small: pad with zeros, centred, then crop
            nh, nw = max(ch, h), max(cw, w)
            padded = np.zeros((arr.shape[0], nh, nw), dtype=arr.dtype)
            tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
            padded[:, tp:tp + h, lp:lp + w] = arr
            top, left = (nh - ch) // 2, (nw - cw) // 2
            arr = padded[:, top:top + ch, left:left + cw]
    if cfg["do_rescale"]:
        arr = (arr.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
    if cfg["do_normalize"]:
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        mean = np.array(cfg["image_mean"], dtype=arr.dtype)
        std = np.array(cfg["image_std"], dtype=arr.dtype)
        arr = ((arr.T - mean) / std).T
    return np.ascontiguousarray(arr, dtype=np.float32)


def decode_image(uri: str, size: tuple[int, int], want_sha: str = "") -> tuple[Any, str]:
    """(RGB image resized to size with LANCZOS, "ok") or (None, "missing" | "undecodable" | "mismatched").
    Storage errors other than a missing file are raised: a flaky bucket must fail the run, not blank images."""
    from PIL import Image

    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError):     # a folder is no image: missing, as the contract says
        return None, "missing"
    if want_sha and sha256_hex(data) != want_sha:
        return None, "mismatched"
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = to_rgb(im)
        return rgb.resize((size[1], size[0]), Image.Resampling.LANCZOS), "ok"
    except Exception:            # noqa: BLE001 - PIL raises many types (OSError, ValueError, SyntaxError, ...)
        return None, "undecodable"


# ------------------------------------------------------------------------- a unit (the CPU stage)


def _note(stats: dict, reason: str, uri: str) -> None:
    stats[reason] = stats.get(reason, 0) + 1
    examples = stats.setdefault("examples", {}).setdefault(reason, [])
    if len(examples) < 5:
        examples.append(uri)


def prepare_unit(payload: dict, *, image_cfg: dict, image_size: tuple[int, int]) -> dict[str, Any]:
    """Decode and preprocess one unit's images: its rows' images, then the synthetic views that could be used;
    with per-unit counters (the CPU stage's work).

    payload: {"i": [image URI or None per row], "v" (optional): [[(view, uri, sha256 or ""), ...] per row]}.
    An image that is referenced but absent counts as `missing`, one PIL cannot decode as `undecodable`: the
    row has has_image false and carries no pixels; the encoder gives it the blank white image's features,
    encoded once per encoder (`blank_pixels`, Encoder.blank; counted as `blank_shared`), so thousands of
    image-less rows are neither preprocessed here nor shipped to the encoder nor run through the vision tower.
    Views that are absent, undecodable or whose bytes do not match their sha256 (`mismatched`) are left out and
    counted; n_views / view_ids say which were used.
    Returns pixels [rows with has_image + used views, 3, H, W] (those rows first, in row order), has_image,
    n_views, view_ids and stats."""
    images, has_image = [], []
    stats: dict[str, Any] = {"rows": len(payload["i"])}
    for uri in payload["i"]:
        img, status = (None, "no_image") if uri is None else decode_image(uri, image_size)
        if img is None:
            if status == "no_image":
                stats["no_image"] = stats.get("no_image", 0) + 1
            else:
                _note(stats, status, uri)
            stats["blank_shared"] = stats.get("blank_shared", 0) + 1
        else:
            stats["with_image"] = stats.get("with_image", 0) + 1
            images.append(img)
        has_image.append(status == "ok")
    n_views, view_ids = [], []
    if "v" in payload:
        synth: dict[str, Any] = {"listed": 0, "used": 0, "mentions_with_views": 0}
        for views in payload["v"]:
            used = []
            for view, uri, sha in views:
                synth["listed"] += 1
                img, status = decode_image(uri, image_size, sha)
                if img is None:
                    _note(synth, status, uri)
                    continue
                images.append(img)
                used.append(int(view))
            synth["used"] += len(used)
            synth["mentions_with_views"] += bool(used)
            n_views.append(len(used))
            view_ids.append(used)
        stats["synthetic"] = synth
    pixels = np.stack([preprocess_image(im, image_cfg) for im in images]) if images else \
        np.zeros((0, 3, *image_size), np.float32)
    return {"pixels": pixels, "has_image": np.array(has_image, dtype=bool),
            "n_views": np.array(n_views, dtype=np.int32), "view_ids": view_ids, "stats": stats}


def blank_pixels(image_cfg: dict, image_size: tuple[int, int]) -> np.ndarray:
    """The blank white image (paper §5.4) of a row without a usable image, preprocessed: float32 [1, 3, H, W]."""
    from PIL import Image

    blank = Image.new("RGB", (image_size[1], image_size[0]), BLANK_COLOR)
    return preprocess_image(blank, image_cfg)[None]


def pack(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr).tobytes()


def unpack(data: bytes, dtype, shape: tuple) -> np.ndarray:
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()     # writable, as torch.from_numpy wants


def prepare_batch(batch: dict[str, np.ndarray], *, image_cfg: dict,
                  image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Ray Data stage 1 (plain function, CPU tasks): units in, pixel tensors (raw float32 bytes) out;
    token ids pass through."""
    out: dict[str, list] = {k: [] for k in ("unit", "n", "n_images", "input_ids", "attention_mask", "pixels",
                                            "has_image", "n_views", "meta")}
    for i, (unit, payload) in enumerate(zip(batch["unit"], batch["payload"])):
        p = prepare_unit(json.loads(payload), image_cfg=image_cfg, image_size=tuple(image_size))
        out["unit"].append(int(unit))
        out["n"].append(len(p["has_image"]))
        out["n_images"].append(len(p["pixels"]))
        out["input_ids"].append(batch["input_ids"][i])
        out["attention_mask"].append(batch["attention_mask"][i])
        for k in ("pixels", "has_image", "n_views"):
            out[k].append(pack(p[k]))
        out["meta"].append(json.dumps({"view_ids": p["view_ids"], "stats": p["stats"]}))
    return {k: np.array(v, dtype=object if k not in ("unit", "n", "n_images") else np.int64)
            for k, v in out.items()}
