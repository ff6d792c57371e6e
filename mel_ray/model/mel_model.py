"""MELModel = W_ic / W_it projections + CVaCPT (mention image only) + MIMIC's matcher (input LayerNorms, TGLU,
VDLU, CMFU); ../shared/papers/mimic-matcher.md and the paper's Sec. 4.

Inputs are cached CLIP features (mel_ray/features/): a batch is a dict of tensors with keys
text_global [N, Dtg] (text_embeds), text_local [N, L, Dtl] (text last hidden state), text_mask [N, L] (not read:
MIMIC does not mask padding), image_global [N, Dig] (image_embeds), image_local [N, P, Dil] (vision last hidden
state, CLS + patches), and for mentions also synthetic_global [N, S, Dig] and n_views [N]. With
`encoder="frozen"` those are cached CLIP features and `encoder` is the identity; with `encoder="finetune"` it is
CLIP itself (mel_ray/model/encoder.py), the batch holds token ids and pixels, and CLIP trains with the rest.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mel_ray.model.cvacpt import CVaCPT
from mel_ray.model.encoder import ENCODER_MODES, ClipEncoder
from mel_ray.model.matcher import CMFU, TGLU, VDLU, InputNorms, Side

UNITS = ("text", "image", "cross")   # TGLU, VDLU, CMFU logits; "overall" is their mean


@dataclass
class ModelDims:
    text_global: int          # CLIP projection size (512 for ViT-B/32): t_G (models.text_encoder: its hidden size)
    text_local: int           # CLIP text hidden size (512): T_L (models.text_encoder: its hidden size)
    image_global: int         # CLIP projection size (512): image_embeds, W_ic's input
    image_local: int          # CLIP vision hidden size (768): W_it's input
    hidden: int = 96          # h: MIMIC's size for every unit and for v_G / V_L
    cvacpt_weight: float = 1.0
    views: int | None = None  # n_s: use at most this many synthetic views per mention (None: all available)
    cvacpt_init: str = "random"   # "identity": A^G / A^L output layers start at zero (see CVaCPT)
    encoder: str = "frozen"       # "finetune": CLIP is part of the model (encoder_config: its CLIPConfig dict)
    encoder_config: dict | None = None
    # "finetune" with models.text_encoder: the BERT-family model that replaces CLIP's text tower (its config dict;
    # None: CLIP's text tower) and where its pretrained weights were loaded from (its pinned id or folder)
    text_encoder_config: dict | None = None
    text_encoder: str | None = None
    text_pooling: str = "cls"     # how that text encoder's t_G is pooled (models.text_pooling, resolved: cls / mean)

    def to_dict(self) -> dict:
        return asdict(self)


class MELModel(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims
        h = dims.hidden
        if dims.encoder not in ENCODER_MODES:
            raise ValueError(f"encoder must be one of {ENCODER_MODES}, got {dims.encoder!r}")
        if dims.encoder == "finetune":
            if not dims.encoder_config:
                raise ValueError("encoder 'finetune' needs encoder_config (the CLIP config)")
            self.encoder = ClipEncoder(dims.encoder_config, dims.text_encoder_config, dims.text_encoder,
                                       dims.text_pooling)
        else:
            self.encoder = nn.Identity()   # frozen CLIP features are the inputs
        # t_G and T_L enter at the text encoder's own widths (CLIP's 512, or a BERT's 768 with models.text_encoder):
        # MIMIC has no text projection; the first layers that read them (TGLU's W_q/W_k/W_v/W_c, CMFU's W_t, CVaCPT's
        # context encoder) are sized from dims.text_global / text_local and map them to h
        self.w_ic = nn.Linear(dims.image_global, h)      # v_G = W_ic(image_embeds)      512 -> 96
        self.w_it = nn.Linear(dims.image_local, h)       # V_L = W_it(vision hidden)     768 -> 96
        self.cvacpt = CVaCPT(h, dims.text_global, weight=dims.cvacpt_weight, init=dims.cvacpt_init)
        self.norms = InputNorms(dims.text_global, dims.text_local, h)
        self.tglu = TGLU(dims.text_global, dims.text_local, h)
        self.vdlu = VDLU(h)
        self.cmfu = CMFU(dims.text_global, h)

    def _project(self, batch: dict) -> Side:
        """CLIP features -> the matcher's inputs before its LayerNorms (CVaCPT works here)."""
        return Side(text_global=batch["text_global"], text_local=batch["text_local"],
                    image_global=self.w_ic(batch["image_global"]), image_local=self.w_it(batch["image_local"]))

    def entity_features(self, batch: dict) -> Side:
        return self.norms(self._project(self.encoder(batch)))

    def mention_features(self, batch: dict) -> Side:
        features = self.encoder(batch)
        side = self._project(features)
        if "synthetic_global" in features:           # features extracted without synthetic views: no CVaCPT
            views = self.w_ic(features["synthetic_global"])                # VEs^G, same projection as VE^G
            side.image_global, side.image_local = self.cvacpt(
                side.image_global, side.image_local, views, self.n_views(features), side.text_global)
        return self.norms(side)

    def n_views(self, batch: dict) -> torch.Tensor:
        """Views each mention may use: what it has, capped at n_s (one feature set serves every n_s)."""
        n = batch["n_views"]
        return n if self.dims.views is None else n.clamp(max=self.dims.views)

    def cvacpt_maps(self, batch: dict) -> dict:
        """alpha/beta of the mention patches (paper Fig. 6), for plots."""
        batch = self.encoder(batch)
        side = self._project(batch)
        views = self.w_ic(batch["synthetic_global"])
        _, _, alpha_l, beta_l, has_view = self.cvacpt.affine(side.image_global, side.image_local, views,
                                                            self.n_views(batch), side.text_global)
        return {"alpha": alpha_l, "beta": beta_l, "has_view": has_view}

    @contextlib.contextmanager
    def on_features(self):
        """Inside: the model reads CLIP features, as in frozen mode (the encoder is bypassed). A fine-tuned model's
        evaluation encodes KB chunks and mentions once with `self.encoder`, then scores those features with the
        evaluation kernel (mel_ray.scoring), which calls entity_features / mention_features."""
        encoder = self.encoder
        self.encoder = nn.Identity()
        try:
            yield self
        finally:
            self.encoder = encoder

    def entity_side(self, entities: Side) -> dict:
        """Entity-side work of every unit: computed once per KB shard during evaluation."""
        return {"text": self.tglu.entity_side(entities), "image": self.vdlu.entity_side(entities),
                "cross": self.cmfu.entity_side(entities)}

    def mention_side(self, mentions: Side) -> dict:
        return {"text": self.tglu.mention_side(mentions), "image": self.vdlu.mention_side(mentions),
                "cross": self.cmfu.mention_side(mentions)}

    def pair_logits(self, ms: dict, es: dict) -> dict[str, torch.Tensor]:
        logits = {"text": self.tglu.pair_scores(ms["text"], es["text"]),
                  "image": self.vdlu.pair_scores(ms["image"], es["image"]),
                  "cross": self.cmfu.pair_scores(ms["cross"], es["cross"])}
        logits["overall"] = (logits["text"] + logits["image"] + logits["cross"]) / 3
        return logits

    def forward(self, mentions: dict, entities: dict) -> dict[str, torch.Tensor]:
        """Logits [N_mentions, N_entities] for 'overall' and each unit."""
        return self.pair_logits(self.mention_side(self.mention_features(mentions)),
                                self.entity_side(self.entity_features(entities)))


def slice_side(side_dict: dict, start: int, stop: int) -> dict:
    """Rows start:stop of an entity_side() result (every tensor's first axis is the entity axis)."""
    return {unit: {k: v[start:stop] for k, v in parts.items()} for unit, parts in side_dict.items()}
