"""The encoding layer trained end to end (`model.encoder: finetune`; paper Sec. 4.1 "we jointly train both the
encoding layer and the matcher", as MIMIC does): CLIP's text and vision towers turn token ids and pixels into the
features MELModel reads, the same features extract-features stores (docs/data-contract.md "CLIP features"):

    text_global  = TE^G = text_embeds / ||text_embeds||        (CLIP's pooled EOS state, projected)
    text_local   = TE^L = the text tower's last hidden state    [L, D_text]
    image_global = VE^G = image_embeds / ||image_embeds||      (CLS, post-LN, projected)
    image_local  = VE^L = the vision tower's last hidden state  [1 + patches, D_vision]
    synthetic_global = VEs^G of each synthetic view (Sec. 4.3: the views go through the same VIS_enc)

In `frozen` mode the features are read from a feature set and `MELModel.encoder` is the identity; here the same
arithmetic runs with gradients (tests/test_finetune.py checks the two agree on the same inputs).

With `models.text_encoder` set (a BERT-family model), that model replaces CLIP's text tower (which is then left
out of the module, so it neither trains nor sits in checkpoints): text_global = its final hidden states pooled as
models.text_pooling says (`pool_text`: the [CLS] state, or the attention-mask-weighted mean of the states; not
normalised, no pooler), text_local = its final hidden states [L, D_bert]; it trains with the rest
(part of MELModel.encoder, so at train.encoder_lr) and its weights are `encoder.text_model.*` in checkpoints.

A batch for this encoder holds `input_ids` [N, L], `attention_mask` [N, L] and `pixels` [N, 3, H, W]; mentions
also `view_pixels` [N, S, 3, H, W] with `n_views` [N] (rows past n_views are padding and are not encoded).
"""

from __future__ import annotations

import torch
from torch import nn

ENCODER_MODES = ("frozen", "finetune")


def pool_text(states: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """t_G of a text encoder's final states [N, L, D] (models.text_pooling): "cls" = state 0 (BERT's [CLS], the
    paper's); "mean" = the mean over the attended tokens (sentence-transformers' mean pooling: a sentence model's
    trained sentence embedding, before its optional normalisation). extract-features and fine-tuning both pool
    here, so frozen features and the fine-tuned module's output agree."""
    if pooling == "cls":
        return states[:, 0]
    if pooling != "mean":
        raise ValueError(f"text pooling {pooling!r}: expected 'cls' or 'mean'")
    weights = attention_mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    """CLIPModel's `_get_vector_norm` division, so TE^G / VE^G equal the frozen features' arithmetic."""
    return t / torch.pow(torch.sum(torch.pow(t, 2), dim=-1, keepdim=True), 0.5)


class ClipEncoder(nn.Module):
    """CLIP's towers as a trainable module. Built from a CLIP config (the checkpoint holds the weights); the
    pretrained weights are loaded once, at the start of training, by `load_pretrained`.

    text_config: a BERT-family text encoder's config dict (models.text_encoder) that replaces CLIP's text tower;
    text_source: where its pretrained weights come from (its pinned id or folder; read by `load_pretrained`);
    text_pooling: how its t_G is pooled (pool_text)."""

    def __init__(self, clip_config: dict, text_config: dict | None = None, text_source: str | None = None,
                 text_pooling: str = "cls"):
        super().__init__()
        self.text_pooling = text_pooling
        from transformers import CLIPConfig, CLIPModel

        self.clip = CLIPModel(CLIPConfig.from_dict(clip_config))
        self.clip.logit_scale.requires_grad_(False)     # CLIP's contrastive temperature: not used by MEL
        self.text_model, self.text_source = None, text_source
        if text_config is not None:
            from mel_ray.models import text_config_from_dict, text_model_from_config

            del self.clip.text_model, self.clip.text_projection      # BERT encodes the texts instead
            self.text_model = text_model_from_config(text_config_from_dict(text_config))

    def load_pretrained(self, id_or_path: str, cache_dir: str) -> None:
        from transformers import CLIPModel

        from mel_ray.models import load_text_encoder, pretrained_args

        path, pinned = pretrained_args(id_or_path, cache_dir)
        state = CLIPModel.from_pretrained(path, **pinned).state_dict()
        if self.text_model is None:
            self.clip.load_state_dict(state)
            return
        self.clip.load_state_dict({k: v for k, v in state.items() if k in self.clip.state_dict()})
        if not self.text_source:
            raise ValueError("a text encoder without text_source: nowhere to load its pretrained weights from")
        self.text_model.load_state_dict(load_text_encoder(self.text_source, cache_dir=cache_dir)[0].state_dict())

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_model is not None:     # BERT-family: pooled as extracted, and every final state
            states = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return pool_text(states, attention_mask, self.text_pooling), states
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return _normalize(out.pooler_output), out.last_hidden_state

    def image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = next(self.clip.vision_model.parameters()).dtype
        out = self.clip.get_image_features(pixel_values=pixels.to(dtype))
        return _normalize(out.pooler_output), out.last_hidden_state

    def _empty(self, batch: dict) -> dict:
        """Zero rows (a rank adding no entity to a global-batch step): CLIP's attention cannot reshape an empty
        batch, so the shapes are built from the config."""
        c = self.clip.config
        length = batch["input_ids"].shape[1]
        tokens = (c.vision_config.image_size // c.vision_config.patch_size) ** 2 + 1
        new = batch["pixels"].new_zeros
        return {"text_global": new(0, c.projection_dim), "text_local": new(0, length, c.text_config.hidden_size),
                "text_mask": batch["attention_mask"].bool(), "image_global": new(0, c.projection_dim),
                "image_local": new(0, tokens, c.vision_config.hidden_size)}

    def forward(self, batch: dict) -> dict:
        if batch["input_ids"].shape[0] == 0:
            return self._empty(batch)
        text_global, text_local = self.text(batch["input_ids"], batch["attention_mask"])
        image_global, image_local = self.image(batch["pixels"])
        out = {"text_global": text_global, "text_local": text_local, "text_mask": batch["attention_mask"].bool(),
               "image_global": image_global, "image_local": image_local}
        if "view_pixels" in batch:
            views, n_views = batch["view_pixels"], batch["n_views"]
            n, s = views.shape[:2]
            used = torch.arange(s, device=views.device)[None, :] < n_views[:, None]          # [N, S]
            synthetic = image_global.new_zeros(n, s, image_global.shape[-1])
            if bool(used.any()):
                synthetic[used] = self.image(views[used])[0].to(synthetic.dtype)
            out["synthetic_global"], out["n_views"] = synthetic, n_views
        return out


def encoder_sizes(clip_config: dict, text_config: dict | None = None) -> dict:
    """The feature widths ClipEncoder gives (ModelDims' text_global .. image_local) from a CLIP config dict (and a
    text encoder's: its hidden size is then t_G's and T_L's width)."""
    text, vision = clip_config["text_config"], clip_config["vision_config"]
    sizes = {"text_global": clip_config["projection_dim"], "text_local": text["hidden_size"],
             "image_global": clip_config["projection_dim"], "image_local": vision["hidden_size"]}
    if text_config is not None:
        from mel_ray.models import text_config_from_dict

        width = text_config_from_dict(text_config).hidden_size
        sizes.update(text_global=width, text_local=width)
    return sizes


def clip_config_of(id_or_path: str, cache_dir: str) -> dict:
    """A CLIP model's config as a plain dict (what a finetune checkpoint's dims carry)."""
    import json

    from transformers import CLIPConfig

    from mel_ray.models import pretrained_args

    path, pinned = pretrained_args(id_or_path, cache_dir)
    return json.loads(CLIPConfig.from_pretrained(path, **pinned).to_json_string(use_diff=False))


def text_config_of(id_or_path: str, cache_dir: str) -> dict:
    """models.text_encoder's config as a plain dict (what a finetune checkpoint's dims carry), checked to be a
    BERT-family encoder (mel_ray.models.text_encoder_config). Without where it was read from and the transformers
    version: the same model in another folder (a copy, an s3:// fetch) has the same architecture."""
    import json

    from mel_ray.models import text_encoder_config

    config = json.loads(text_encoder_config(id_or_path, cache_dir).to_json_string(use_diff=False))
    for provenance in ("_name_or_path", "transformers_version"):
        config.pop(provenance, None)
    return config


TEXT_PREFIX = "encoder.text_model."


def text_encoder_state(state_dict: dict) -> dict:
    """The text encoder's weights inside a finetune MELModel's state dict, under its own names ({} when its texts
    are CLIP's)."""
    return {k[len(TEXT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(TEXT_PREFIX)}


def fine_tuned_fingerprint(clip_weights: dict, text_weights: dict | None = None) -> str:
    """The identity of a fine-tuned encoder: encoder_fingerprint of its CLIP weights, and of its text encoder's
    too when it has one (its names prefixed with "encoder.text_model.", which no CLIPModel weight name starts with)."""
    if not text_weights:
        return encoder_fingerprint(clip_weights)
    return encoder_fingerprint({**clip_weights, **{f"{TEXT_PREFIX}{k}": v for k, v in text_weights.items()}})


def encoder_state(state_dict: dict) -> dict:
    """The CLIP weights inside a finetune MELModel's state dict, under CLIPModel's own names."""
    prefix = "encoder.clip."
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def encoder_fingerprint(state_dict: dict) -> str:
    """sha256 over the encoder's weights (names, shapes, dtypes, bytes): the identity of a fine-tuned encoder,
    stored in the feature sets made with it, so evaluation never pairs a checkpoint with another encoder's
    features."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()
