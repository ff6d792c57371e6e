"""MIMIC's matcher written straight from ../shared/papers/mimic-matcher.md, one (mention, entity) pair at a time.

Deliberately naive: no entity/mention split, no batching over pairs, no algebraic shortcut. It borrows only the
learned weights of a MELModel (every Linear / LayerNorm is called as the page writes it) so that production
scoring (mel_ray/model/matcher.py) can be checked against it unit by unit.
"""

from __future__ import annotations

import math

import torch

from mel_ray.model import MELModel


def inputs(model: MELModel, batch: dict, mention: bool) -> list[dict]:
    """Per row: t_G, T_L, v_G, V_L after the input LayerNorms (CVaCPT first, mention side only)."""
    side = model._project(batch)
    if mention and "synthetic_global" in batch:
        views = model.w_ic(batch["synthetic_global"])
        side.image_global, side.image_local = model.cvacpt(side.image_global, side.image_local, views,
                                                           model.n_views(batch), side.text_global)
    n = model.norms
    return [{"t_G": n.tc(side.text_global[i]), "T_L": n.tt(side.text_local[i]),
             "v_G": n.ic(side.image_global[i]), "V_L": n.it(side.image_local[i])} for i in range(len(side.text_global))]


def tglu(model: MELModel, m: dict, e: dict) -> torch.Tensor:
    u = model.tglu
    h = u.w_q.out_features
    q, k, v = u.w_q(e["T_L"]), u.w_k(m["T_L"]), u.w_v(m["T_L"])          # 40 x h each
    a = torch.softmax(q @ k.T / math.sqrt(h), dim=-1)                     # over the mention's tokens
    c = u.ln_t((a @ v).mean(dim=0))                                       # mean over the entity positions
    g2l = torch.dot(u.w_c(e["t_G"]), c)
    g2g = torch.dot(m["t_G"], e["t_G"])
    return (g2l + g2g) / 2


def dual(unit, a: torch.Tensor, b: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    a1, b1 = unit.w_cls(a), unit.w_cls(b)
    p = unit.w_tok(tokens).mean(dim=0)
    x = unit.w_f(unit.ln_add(p + a1))
    g = torch.tanh(torch.dot(unit.w_g.weight[0], x) + unit.w_g.bias[0])
    y = unit.ln_out(g * x + b1)
    return torch.dot(y, unit.ln_out(a1))


def vdlu(model: MELModel, m: dict, e: dict) -> torch.Tensor:
    u = model.vdlu
    return (dual(u.dual_1, e["v_G"], m["v_G"], m["V_L"]) + dual(u.dual_2, m["v_G"], e["v_G"], e["V_L"])) / 2


def cmfu_fused(model: MELModel, s: dict) -> torch.Tensor:
    u = model.cmfu
    t = u.w_t(s["t_G"])
    p = u.w_i(s["V_L"])
    alpha = torch.softmax(p @ t, dim=0)                                   # over the 50 tokens, no scaling
    ctx = alpha @ p
    g = torch.tanh(torch.dot(u.w_g.weight[0], t) + u.w_g.bias[0])
    return u.ln_f(g * t + ctx)


def cmfu(model: MELModel, m: dict, e: dict) -> torch.Tensor:
    return torch.dot(cmfu_fused(model, m), cmfu_fused(model, e))


@torch.no_grad()
def scores(model: MELModel, mentions: dict, entities: dict) -> dict[str, torch.Tensor]:
    """{'text', 'image', 'cross', 'overall'}: [Nm, Ne] built one pair at a time."""
    ms, es = inputs(model, mentions, True), inputs(model, entities, False)
    out = {}
    for name, unit in (("text", tglu), ("image", vdlu), ("cross", cmfu)):
        out[name] = torch.stack([torch.stack([unit(model, m, e) for e in es]) for m in ms])
    out["overall"] = (out["text"] + out["image"] + out["cross"]) / 3
    return out
