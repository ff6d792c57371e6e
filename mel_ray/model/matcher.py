"""MIMIC's matcher (Luo et al. 2023): three interaction units, each scoring every mention against every entity.

Each unit splits its work into an entity side (computed once per entity and reused for every mention, which is
what makes full-KB evaluation affordable), a mention side, and the pairwise part:

- TGLU, text global-local: entity tokens attend to mention tokens; the entity's global feature reads the
  attended tokens (G2L, max over tokens) and is compared with the mention's global feature (G2G); averaged.
- VDLU, vision dual: entity->mention and mention->entity gated units over image patches, averaged.
- CMFU, cross-modal fusion: each side's text global feature attends to its own image patches; a gate fuses
  text and visual context; the score is the dot product of the two fused vectors.

Shapes: N* = number of mentions/entities, L = text tokens, P = image tokens (patches incl. CLS),
dt / dv = projected text / visual size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Side:
    """Projected features of a set of mentions or entities."""

    text_global: torch.Tensor    # [N, dt]
    text_local: torch.Tensor     # [N, L, dt]
    text_mask: torch.Tensor      # [N, L] bool, True for real tokens
    image_global: torch.Tensor   # [N, dv]
    image_local: torch.Tensor    # [N, P, dv]


class TGLU(nn.Module):
    def __init__(self, dt: int):
        super().__init__()
        self.query = nn.Linear(dt, dt)
        self.key = nn.Linear(dt, dt)
        self.value = nn.Linear(dt, dt)
        self.entity_global = nn.Linear(dt, dt)
        self.norm = nn.LayerNorm(dt)
        self.scale = 1.0 / math.sqrt(dt)

    def entity_side(self, e: Side) -> dict:
        g = self.entity_global(e.text_global)
        gamma_g = self.norm.weight * g                        # γ⊙g: LayerNorm's scale folded into g
        return {"q": self.query(e.text_local) * self.scale, "g": g, "gamma_g": gamma_g,
                "gamma_g_sum": gamma_g.sum(-1), "beta_g": g @ self.norm.bias, "mask": e.text_mask,
                "cls": e.text_global}

    def mention_side(self, m: Side) -> dict:
        v = self.value(m.text_local)
        return {"k": self.key(m.text_local), "v": v, "v_mean": v.mean(-1),
                "v_gram": v @ v.transpose(1, 2), "mask": m.text_mask, "cls": m.text_global}

    def _attention(self, ms: dict, es: dict) -> torch.Tensor:
        att = torch.einsum("eld,mkd->melk", es["q"], ms["k"])                           # [Nm, Ne, Le, Lm]
        return att.masked_fill(~ms["mask"][:, None, None, :], float("-inf")).softmax(dim=-1)

    def _g2l_and_g2g(self, g2l: torch.Tensor, ms: dict, es: dict) -> torch.Tensor:
        g2l = g2l.masked_fill(~es["mask"][None, :, :], float("-inf")).amax(dim=-1)       # [Nm, Ne]
        g2g = ms["cls"] @ es["cls"].T
        return (g2l + g2g) / 2

    def pair_scores_explicit(self, ms: dict, es: dict) -> torch.Tensor:
        """The unit as written: LayerNorm of every attended token, for every (mention, entity) pair.
        Holds an [Nm, Ne, Le, dt] tensor; kept as the reference that pair_scores is tested against."""
        ctx = self.norm(torch.einsum("melk,mkd->meld", self._attention(ms, es), ms["v"]))
        return self._g2l_and_g2g(torch.einsum("meld,ed->mel", ctx, es["g"]), ms, es)

    def pair_scores(self, ms: dict, es: dict) -> torch.Tensor:
        """Same scores without the [Nm, Ne, Le, dt] context tensor (LayerNorm decomposition).

        With x = sum_k a_k v_k (a = attention row, v = mention value tokens), LN(x) = γ⊙(x - μ)/σ + β and
            <LN(x), g> = (<x, γ⊙g> - μ·Σ(γ⊙g)) / σ + <β, g>
            <x, γ⊙g>   = sum_k a_k <v_k, γ⊙g>            (per mention token, not per pair token)
            μ          = sum_k a_k mean(v_k)
            E[x²]      = a^T (V V^T) a / dt,  σ = sqrt(E[x²] - μ² + eps)
        so each pair needs only Lm-sized vectors; the dt-sized work is per mention or per entity.
        """
        att = self._attention(ms, es)                                                   # [Nm, Ne, Le, Lm]
        v_gamma_g = torch.einsum("mkd,ed->mek", ms["v"], es["gamma_g"])                 # [Nm, Ne, Lm]
        x_gamma_g = torch.einsum("melk,mek->mel", att, v_gamma_g)
        mean = torch.einsum("melk,mk->mel", att, ms["v_mean"])
        second = torch.einsum("melk,mkj,melj->mel", att, ms["v_gram"], att) / ms["v"].shape[-1]
        inv_std = torch.rsqrt((second - mean * mean).clamp_min(0) + self.norm.eps)
        g2l = (x_gamma_g - mean * es["gamma_g_sum"][None, :, None]) * inv_std + es["beta_g"][None, :, None]
        return self._g2l_and_g2g(g2l, ms, es)


class VDLU(nn.Module):
    def __init__(self, dv: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(dv)
        # entity -> mention direction
        self.e_query, self.m_key = nn.Linear(dv, dv), nn.Linear(dv, dv)
        self.e2m_gate_ctx, self.e2m_gate_cls = nn.Linear(dv, dv), nn.Linear(dv, dv, bias=False)
        # mention -> entity direction
        self.m_query, self.e_key = nn.Linear(dv, dv), nn.Linear(dv, dv)
        self.m2e_gate_ctx, self.m2e_gate_cls = nn.Linear(dv, dv), nn.Linear(dv, dv, bias=False)

    def entity_side(self, e: Side) -> dict:
        return {"q": self.e_query(e.image_global) * self.scale, "k": self.e_key(e.image_local),
                "tok": e.image_local, "cls": e.image_global, "gate_cls": self.m2e_gate_cls(e.image_global)}

    def mention_side(self, m: Side) -> dict:
        return {"q": self.m_query(m.image_global) * self.scale, "k": self.m_key(m.image_local),
                "tok": m.image_local, "cls": m.image_global, "gate_cls": self.e2m_gate_cls(m.image_global)}

    @staticmethod
    def _gated(ctx: torch.Tensor, gate: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return gate * ctx + (1 - gate) * cls

    def pair_scores(self, ms: dict, es: dict) -> torch.Tensor:
        # entity global feature reads the mention's patches; gate mixes that context with the mention global
        a = torch.einsum("ed,mpd->mep", es["q"], ms["k"]).softmax(dim=-1)
        ctx = torch.einsum("mep,mpd->med", a, ms["tok"])
        gate = torch.sigmoid(self.e2m_gate_ctx(ctx) + ms["gate_cls"][:, None, :])
        e2m = (self._gated(ctx, gate, ms["cls"][:, None, :]) * es["cls"][None]).sum(-1)
        # and the other way round
        a = torch.einsum("md,epd->mep", ms["q"], es["k"]).softmax(dim=-1)
        ctx = torch.einsum("mep,epd->med", a, es["tok"])
        gate = torch.sigmoid(self.m2e_gate_ctx(ctx) + es["gate_cls"][None, :, :])
        m2e = (self._gated(ctx, gate, es["cls"][None, :, :]) * ms["cls"][:, None, :]).sum(-1)
        return (e2m + m2e) / 2


class CMFU(nn.Module):
    def __init__(self, dt: int, dv: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(dv)
        self.text_query = nn.Linear(dt, dv)
        self.image_key = nn.Linear(dv, dv)
        self.text_to_visual = nn.Linear(dt, dv)
        self.gate = nn.Linear(2 * dv, dv)
        self.norm = nn.LayerNorm(dv)

    def fuse(self, s: Side) -> torch.Tensor:
        """Per side (no pairing needed): text global attends to its own image patches, gated fusion."""
        q = self.text_query(s.text_global) * self.scale
        a = torch.einsum("nd,npd->np", q, self.image_key(s.image_local)).softmax(dim=-1)
        ctx = torch.einsum("np,npd->nd", a, s.image_local)
        text = self.text_to_visual(s.text_global)
        gate = torch.sigmoid(self.gate(torch.cat([text, ctx], dim=-1)))
        return self.norm(gate * text + (1 - gate) * ctx)

    def entity_side(self, e: Side) -> dict:
        return {"f": self.fuse(e)}

    def mention_side(self, m: Side) -> dict:
        return {"f": self.fuse(m)}

    def pair_scores(self, ms: dict, es: dict) -> torch.Tensor:
        return ms["f"] @ es["f"].T
