"""The CLIP encoder of extract-features (and of `mel-ray link`'s new mentions); docs/data-contract.md, "CLIP
features", says what each output is.

Determinism: on CPU, CLIP outputs depend in the last bits on the batch they are computed in (the projection
of a batch of 1 takes a GEMV path, larger batches a GEMM with other blocking; more torch threads change the
vision encoder's reduction order) and those differences survive float16 rounding now and then. So the encoder
never batches across units: each unit (rows ``[k*micro_batch, (k+1)*micro_batch)`` of a shard) is one forward
pass, whatever Ray's batch size or actor count is. CPU actors use `mel_ray.runtime.cpu_threads_per_worker()`
torch threads; the thread count and device are recorded (`name`, the manifest's `encoders`), since a different
count or device changes the last bits.

Rows without a usable image (has_image false) carry no pixels: each encoder encodes the blank white image once,
alone (a batch of one, on its device and dtype; `blank`), and copies its image_global / image_local into every
such row. On text-only data that removes a vision forward (and the CPU stage's preprocessing and transfer) per
row. A blank encoded alone differs in the last bits from one encoded inside a unit's batch, and a unit's row
images are now batched without the blanks, so the feature settings carry ENCODING_VERSION (docs/data-contract.md,
"CLIP features"): sets made the old way (no `encoding_version` in their settings: version 1) keep their keys and
stay valid, and a resumed run never mixes shards of the two ways.
"""

from __future__ import annotations

import numpy as np

from mel_ray.features.inputs import blank_pixels, load_processor, pack, unpack

# 1 (sets without the setting): every image-less row's blank encoded inside its unit's batch;
# 2: row images batched without blanks, the blank encoded once per encoder, alone, and shared
ENCODING_VERSION = 2


class Encoder:
    """CLIP on one device: a Ray Data callable class (extract-features' actor pool, `__call__` on prepared units)
    and a plain object (`encode`: the local engine, `mel-ray link`). One forward pass per unit, never across
    units."""

    def __init__(self, model: str, cache_dir: str, dtype: str | None, use_gpu: bool, image_size: tuple[int, int],
                 text_length: int, weights=None, text_encoder: str | None = None, text_weights=None,
                 text_pooling: str = "cls", image_cfg: dict | None = None):
        """image_cfg: the CLIP processor's image settings (inputs.image_config), to preprocess the shared blank;
        None: read from `model`'s processor when the blank is first needed.

        weights: a fine-tuned encoder's CLIP state dict (or a Ray object ref to one), loaded over `model`'s
        (extract-features --checkpoint); `model` then only gives the architecture and the processor.

        text_encoder: models.text_encoder, a BERT-family model that encodes the texts (t_G = its final states pooled
        as `text_pooling` says, mel_ray.model.encoder.pool_text: "cls" or "mean"; T_L = its final states) instead of
        CLIP's text tower; text_weights: its fine-tuned weights (or a ref)."""
        import torch

        from mel_ray.models import load_clip
        from mel_ray.runtime import cpu_threads_per_worker

        self.torch = torch
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("extract-features: num_gpus > 0 but this actor sees no CUDA device")
            self.device = "cuda"
            self.name = f"cuda/{torch.cuda.get_device_name()}"
        else:
            torch.set_num_threads(cpu_threads_per_worker())
            self.device = "cpu"
            self.name = f"cpu/threads={torch.get_num_threads()}"
        self.model, _ = load_clip(model, self.device, dtype, cache_dir)
        self.text_model, self.text_pooling = None, text_pooling
        if text_encoder:
            from mel_ray.models import load_text_encoder

            self.text_model, _ = load_text_encoder(text_encoder, self.device, dtype, cache_dir)
        if weights is not None:
            import ray

            if isinstance(weights, ray.ObjectRef):
                weights = ray.get(weights)
            if self.text_model is None:
                self.model.load_state_dict(weights)
            else:                       # a fine-tuned encoder with a text encoder has no CLIP text tower
                missing, unexpected = self.model.load_state_dict(weights, strict=False)
                unused = [k for k in missing if not k.startswith(("text_model.", "text_projection."))]
                if unused or unexpected:
                    raise RuntimeError(f"fine-tuned CLIP weights do not fit {model}: missing {unused[:3]}, "
                                       f"unexpected {unexpected[:3]}")
            self.name += "/fine-tuned"
        if text_weights is not None:
            import ray

            if isinstance(text_weights, ray.ObjectRef):
                text_weights = ray.get(text_weights)
            self.text_model.load_state_dict(text_weights)
        self.dtype = self.model.dtype
        self.image_size = tuple(image_size)
        self.text_length = text_length
        self.model_id, self.cache_dir, self.image_cfg = model, cache_dir, image_cfg
        self._blank: tuple[np.ndarray, np.ndarray] | None = None

    def blank(self) -> tuple[np.ndarray, np.ndarray]:
        """(image_global [dv], image_local [P+1, dv]) float16 of the blank white image, encoded alone on first use
        and kept: what every row without a usable image gets."""
        if self._blank is None:
            if self.image_cfg is None:
                self.image_cfg = load_processor(self.model_id, self.cache_dir)[1]
            g, local = self._images(blank_pixels(self.image_cfg, self.image_size))
            self._blank = (g[0], local[0])
        return self._blank

    def _images(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One vision forward: (L2-normalised projected CLS, last hidden states), float16 on the CPU."""
        torch = self.torch
        half = torch.float16
        with torch.inference_mode():
            vision = self.model.get_image_features(pixel_values=torch.from_numpy(pixels).to(self.device,
                                                                                            dtype=self.dtype))
            ig = vision.pooler_output
            return ((ig / _vector_norm(torch, ig)).to(half).cpu().numpy(),
                    vision.last_hidden_state.to(half).cpu().numpy())

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixels: np.ndarray, n: int,
               has_image: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """float16 features of one unit of n rows: texts, row images, synthetic views.
        has_image: per row, whether `pixels` holds its image (None: all n do); pixels = the images of those rows
        (in row order), then the synthetic views. The other rows get the shared blank's features (`blank`).
        Up to three forward passes: texts, the row images, the synthetic views; so a row's own features do not
        depend on how many views its unit has (and are the same with or without a synthetic key).
        image_global holds the n rows, then the views; image_local the n rows."""
        torch = self.torch
        half = torch.float16
        has_image = np.ones(n, dtype=bool) if has_image is None else np.asarray(has_image, dtype=bool)
        k = int(has_image.sum())
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask.astype(np.int64)).to(self.device)
            if self.text_model is not None:         # BERT-family: pooled (cls / mean) and every final state
                from mel_ray.model.encoder import pool_text

                text = self.text_model(input_ids=ids, attention_mask=mask)
                tg = pool_text(text.last_hidden_state, mask, self.text_pooling)
            else:
                text = self.model.get_text_features(input_ids=ids, attention_mask=mask)
                tg = text.pooler_output
                tg = tg / _vector_norm(torch, tg)
            out = {"text_global": tg.to(half).cpu().numpy(),
                   "text_local": text.last_hidden_state.to(half).cpu().numpy()}
        rows = self._images(pixels[:k]) if k else None
        blank = self.blank() if k < n else None
        like_global, like_local = (rows[0][0], rows[1][0]) if rows is not None else blank
        row_global = np.empty((n, *like_global.shape), np.float16)
        row_local = np.empty((n, *like_local.shape), np.float16)
        if rows is not None:
            row_global[has_image], row_local[has_image] = rows
        if blank is not None:
            row_global[~has_image], row_local[~has_image] = blank
        views = self._images(pixels[k:])[0] if len(pixels) > k else row_global[:0]
        return {**out, "image_global": np.concatenate([row_global, views]), "image_local": row_local}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {k: [] for k in ("unit", "text_global", "text_local", "image_global", "image_local",
                                                "text_mask", "has_image", "n_views", "meta", "encoder")}
        h, w = self.image_size
        for i, unit in enumerate(batch["unit"]):
            n, k = int(batch["n"][i]), int(batch["n_images"][i])
            ids = unpack(batch["input_ids"][i], np.int32, (n, self.text_length)).astype(np.int64)
            mask = unpack(batch["attention_mask"][i], np.int8, (n, self.text_length))
            pixels = unpack(batch["pixels"][i], np.float32, (k, 3, h, w))
            has_image = np.frombuffer(batch["has_image"][i], dtype=np.bool_)
            feats = self.encode(ids, mask, pixels, n, has_image)
            out["unit"].append(int(unit))
            for name, arr in feats.items():
                out[name].append(pack(arr))
            out["text_mask"].append(pack(mask))
            for name in ("has_image", "n_views", "meta"):
                out[name].append(batch[name][i])
            out["encoder"].append(self.name)
        return {k: np.array(v, dtype=np.int64 if k == "unit" else object) for k, v in out.items()}


def _vector_norm(torch, t):
    """`transformers.models.clip.modeling_clip._get_vector_norm`, so globals equal CLIPModel's embeds."""
    return torch.pow(torch.sum(torch.pow(t, 2), dim=-1, keepdim=True), 0.5)
