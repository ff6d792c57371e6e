"""MIMIC's matcher (Luo et al., KDD 2023) as published: ../shared/papers/mimic-matcher.md, "Matcher".

Read side by side with that page. Notation kept: m = mention, e = entity, h = 96 (every unit), LN = LayerNorm.

    input LNs  t_G <- LN_tc(t_G), T_L <- LN_tt(T_L), v_G <- LN_ic(v_G), V_L <- LN_it(V_L)     (InputNorms)
    TGLU       A = softmax(W_q T_L,e (W_k T_L,m)^T / sqrt(h));  c = LN_T(mean_l (A W_v T_L,m))
               s_T = (<W_c t_G,e, c> + <t_G,m, t_G,e>) / 2
    DUAL(a,b,U) a' = W_cls a, b' = W_cls b, p = mean_tokens W_tok U, x = W_f LN_add(p + a'),
               g = tanh(<w_g, x> + b_g), y = LN_out(g x + b'), DUAL = <y, LN_out(a')>
    VDLU       s_V = (DUAL_1(v_G,e, v_G,m, V_L,m) + DUAL_2(v_G,m, v_G,e, V_L,e)) / 2
    CMFU       u = W_t t_G, P = W_i V_L, alpha = softmax(P u), f = LN_F(tanh(<w_g,u> + b_g) u + alpha^T P)
               s_C = <f_m, f_e>

No padding mask anywhere (MIMIC keeps the 40 padded positions; so do we: `text_mask` is in the features but the
matcher does not read it). There is no temperature: the input LayerNorms set the scores' scale.

Every unit is split into an entity side (computed once per entity, reused for every mention: what makes exact
full-KB evaluation affordable), a mention side, and `pair_scores` [Nm, Ne]. The splits are exact algebra, not
approximations; tests/mimic_reference.py computes the same scores pair by pair, straight from the equations:
- TGLU: mean_l (A V) = (mean_l A) V, so the [Nm, Ne, Le, h] context tensor is never formed;
- DUAL: x, g and y are linear in per-side vectors with per-pair scalar weights, so the pair part is five
  matrix products of width h plus scalar arithmetic (DUAL's docstring has the algebra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# TGLU's logits per entity block: 8 MB in fp32 on a CPU (cache-sized); a GPU wants few, large kernels instead
ATTENTION_BLOCK_FLOATS = 2_000_000
GPU_ATTENTION_BLOCK_FLOATS = 256_000_000


@dataclass
class Side:
    """A set of mentions or entities as the matcher sees them (after the input LayerNorms)."""

    text_global: torch.Tensor    # t_G [N, Dtg]   CLIP text_embeds
    text_local: torch.Tensor     # T_L [N, L, Dtl] CLIP text last hidden state (padded positions included)
    image_global: torch.Tensor   # v_G [N, h]     W_ic(image_embeds)
    image_local: torch.Tensor    # V_L [N, P, h]  W_it(vision last hidden state), CLS + patches


class InputNorms(nn.Module):
    """LN_tc, LN_tt, LN_ic, LN_it: shared by mentions and entities."""

    def __init__(self, text_global: int, text_local: int, h: int):
        super().__init__()
        self.tc, self.tt = nn.LayerNorm(text_global), nn.LayerNorm(text_local)
        self.ic, self.it = nn.LayerNorm(h), nn.LayerNorm(h)

    def forward(self, side: Side) -> Side:
        return Side(self.tc(side.text_global), self.tt(side.text_local),
                    self.ic(side.image_global), self.it(side.image_local))


class TGLU(nn.Module):
    """Text global-to-local unit."""

    def __init__(self, text_global: int, text_local: int, h: int):
        super().__init__()
        self.w_q, self.w_k, self.w_v = (nn.Linear(text_local, h) for _ in range(3))
        self.w_c = nn.Linear(text_global, h)
        self.ln_t = nn.LayerNorm(h)
        self.scale = 1.0 / math.sqrt(h)

    def entity_side(self, e: Side) -> dict:
        return {"q": self.w_q(e.text_local) * self.scale, "c_query": self.w_c(e.text_global), "t": e.text_global}

    def mention_side(self, m: Side) -> dict:
        return {"k": self.w_k(m.text_local), "v": self.w_v(m.text_local), "t": m.text_global}

    def pair_scores(self, ms: dict, es: dict) -> torch.Tensor:
        q, k = es["q"], ms["k"]                                           # [Ne, Le, h], [Nm, Lm, h]
        n_e, l_e, h = q.shape
        n_m, l_m, _ = k.shape
        keys = k.reshape(n_m * l_m, h).T
        # a few entities at a time, so that each block's [entities, Le, Nm, Lm] logits stay in cache: softmax and
        # mean are memory-bound, and blocks of ~8 MB run them ~2x faster than one tensor of hundreds of MB
        budget = ATTENTION_BLOCK_FLOATS if q.device.type == "cpu" else GPU_ATTENTION_BLOCK_FLOATS
        block = max(1, budget // (l_e * n_m * l_m))
        parts = []
        for a in range(0, n_e, block):
            q_block = q[a:a + block]
            # one GEMM for every (entity token, mention token) pair, laid out [e, Le, Nm, Lm]: the softmax (over
            # the mention's tokens) runs on the last axis and the big tensor is never permuted
            logits = (q_block.reshape(-1, h) @ keys).view(q_block.shape[0], l_e, n_m, l_m)
            parts.append(logits.softmax(dim=-1).mean(dim=1))                     # mean_l A: [e, Nm, Lm]
        mean_attention = torch.cat(parts).transpose(0, 1)                        # [Nm, Ne, Lm]
        c = self.ln_t(torch.bmm(mean_attention, ms["v"]))                      # LN_T((mean_l A) V): [Nm, Ne, h]
        g2l = (c * es["c_query"][None]).sum(-1)
        g2g = ms["t"] @ es["t"].T
        return (g2l + g2g) / 2


class DUAL(nn.Module):
    """One gated dual unit: query CLS a, key CLS b, key tokens U (all h wide).

    Written per pair, x, g and y are h-vectors for every (query, key) pair, with an h x h Linear each. They are
    linear in per-side vectors with per-pair scalar weights, so the pair part needs only dot products of per-side
    vectors (five query x key matrix products of width h) and scalar arithmetic. With c = centred (v - mean v):
        s = p + a'           LN_add(s) = gamma_a * (c(p) + c(a')) * r + beta_a,  r = 1 / sqrt(|c(p) + c(a')|^2/h + eps)
        x = r (P + A) + x0   P = W_f(gamma_a * c(p)) (key), A = W_f(gamma_a * c(a')) (query), x0 = W_f beta_a + b_f
        g = tanh(r (<w_g,P> + <w_g,A>) + <w_g,x0> + b_g)
        z = g x + b' = g r (P + A) + g x0 + b'
        DUAL = <LN_out(z), LN_out(a')> = <c(z), rho> / sqrt(|c(z)|^2/h + eps) + <beta_o, LN_out(a')>,
               rho = gamma_o * LN_out(a'),  c(z) = g r (c(P) + c(A)) + g c(x0) + c(b')
    and |c(z)|^2 expands into the same per-side norms and cross products. tests/mimic_reference.py computes the
    unit as written; tests/test_model.py checks the two agree (scores, ranks, gradients).
    """

    def __init__(self, h: int):
        super().__init__()
        self.w_cls, self.w_tok, self.w_f = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.ln_add, self.ln_out = nn.LayerNorm(h), nn.LayerNorm(h)
        self.w_g = nn.Linear(h, 1)                                         # <w_g, x> + b_g

    def _through_fuse(self, centred: torch.Tensor) -> torch.Tensor:
        """W_f(gamma_a * v) without W_f's bias (the bias is in x0)."""
        return (self.ln_add.weight * centred) @ self.w_f.weight.T

    def _x0(self) -> torch.Tensor:
        return self.w_f(self.ln_add.bias)

    def query_side(self, a: torch.Tensor) -> dict:
        a1 = self.w_cls(a)
        a_out = self.ln_out(a1)
        a_c = _centred(a1)
        big_a = self._through_fuse(a_c)
        big_a_c = _centred(big_a)
        x0_c = _centred(self._x0())
        rho = self.ln_out.weight * a_out
        return {"a_c": a_c, "a_sq": (a_c * a_c).sum(-1), "A_c": big_a_c, "A_sq": (big_a_c * big_a_c).sum(-1),
                "A_wg": big_a @ self.w_g.weight[0], "A_x0": big_a_c @ x0_c, "A_rho": (big_a_c * rho).sum(-1),
                "x0_rho": rho @ x0_c, "rho": rho, "beta_out": a_out @ self.ln_out.bias}

    def key_side(self, b: torch.Tensor, tokens: torch.Tensor) -> dict:
        b1 = self.w_cls(b)
        p_c = _centred(self.w_tok(tokens).mean(dim=1))
        big_p = self._through_fuse(p_c)
        big_p_c, b1_c, x0_c = _centred(big_p), _centred(b1), _centred(self._x0())
        return {"p_c": p_c, "p_sq": (p_c * p_c).sum(-1), "P_c": big_p_c, "P_sq": (big_p_c * big_p_c).sum(-1),
                "P_wg": big_p @ self.w_g.weight[0], "P_x0": big_p_c @ x0_c, "P_b": (big_p_c * b1_c).sum(-1),
                "b_c": b1_c, "b_sq": (b1_c * b1_c).sum(-1), "b_x0": b1_c @ x0_c}

    def pair_scores(self, query: dict, key: dict) -> torch.Tensor:
        """[N_query, N_key]."""
        q, k = query, key
        h = q["a_c"].shape[-1]
        x0 = self._x0()
        x0_c = _centred(x0)
        col, row = (lambda t: t[None, :]), (lambda t: t[:, None])       # per key / per query broadcast
        # the five query x key products
        pa = q["a_c"] @ k["p_c"].T
        big_pa = q["A_c"] @ k["P_c"].T
        p_rho = q["rho"] @ k["P_c"].T
        b_rho = q["rho"] @ k["b_c"].T
        a_b = q["A_c"] @ k["b_c"].T
        r = torch.rsqrt((col(k["p_sq"]) + row(q["a_sq"]) + 2 * pa) / h + self.ln_add.eps)
        g = torch.tanh(r * (col(k["P_wg"]) + row(q["A_wg"])) + x0 @ self.w_g.weight[0] + self.w_g.bias[0])
        alpha = g * r
        z_rho = alpha * (p_rho + row(q["A_rho"])) + g * row(q["x0_rho"]) + b_rho
        z_sq = (alpha * alpha * (col(k["P_sq"]) + row(q["A_sq"]) + 2 * big_pa) + g * g * (x0_c @ x0_c)
                + col(k["b_sq"]) + 2 * alpha * g * (col(k["P_x0"]) + row(q["A_x0"]))
                + 2 * alpha * (col(k["P_b"]) + a_b) + 2 * g * col(k["b_x0"]))
        return z_rho * torch.rsqrt(z_sq.clamp_min(0) / h + self.ln_out.eps) + row(q["beta_out"])


def _centred(v: torch.Tensor) -> torch.Tensor:
    return v - v.mean(dim=-1, keepdim=True)


class VDLU(nn.Module):
    """Visual dual unit: entity-to-mention (DUAL_1) and mention-to-entity (DUAL_2), separate weights."""

    def __init__(self, h: int):
        super().__init__()
        self.dual_1, self.dual_2 = DUAL(h), DUAL(h)

    # sides are flat {name: tensor} dicts (the scoring code slices and concatenates them row-wise)
    def entity_side(self, e: Side) -> dict:
        return {**_prefixed("q1_", self.dual_1.query_side(e.image_global)),
                **_prefixed("k2_", self.dual_2.key_side(e.image_global, e.image_local))}

    def mention_side(self, m: Side) -> dict:
        return {**_prefixed("k1_", self.dual_1.key_side(m.image_global, m.image_local)),
                **_prefixed("q2_", self.dual_2.query_side(m.image_global))}

    def pair_scores(self, ms: dict, es: dict) -> torch.Tensor:
        e_to_m = self.dual_1.pair_scores(_unprefixed("q1_", es), _unprefixed("k1_", ms)).T   # [Ne, Nm] -> [Nm, Ne]
        m_to_e = self.dual_2.pair_scores(_unprefixed("q2_", ms), _unprefixed("k2_", es))
        return (e_to_m + m_to_e) / 2


def _prefixed(prefix: str, d: dict) -> dict:
    return {prefix + k: v for k, v in d.items()}


def _unprefixed(prefix: str, d: dict) -> dict:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


class CMFU(nn.Module):
    """Cross-modal fusion unit: each side is fused on its own; the pair is one dot product."""

    def __init__(self, text_global: int, h: int):
        super().__init__()
        self.w_t, self.w_i = nn.Linear(text_global, h), nn.Linear(h, h)
        self.w_g = nn.Linear(h, 1)
        self.ln_f = nn.LayerNorm(h)

    def fuse(self, s: Side) -> torch.Tensor:
        u = self.w_t(s.text_global)                                        # [N, h]
        p = self.w_i(s.image_local)                                        # [N, P, h]
        alpha = torch.einsum("npd,nd->np", p, u).softmax(dim=-1)          # no scaling, as published
        ctx = torch.einsum("np,npd->nd", alpha, p)
        g = torch.tanh(self.w_g(u))                                        # [N, 1]
        return self.ln_f(g * u + ctx)

    def entity_side(self, e: Side) -> dict:
        return {"f": self.fuse(e)}

    def mention_side(self, m: Side) -> dict:
        return {"f": self.fuse(m)}

    def pair_scores(self, ms: dict, es: dict) -> torch.Tensor:
        return ms["f"] @ es["f"].T
