"""CVaCPT: Contextual Visual-aid Controllable Patch Transform (paper §4.3, eq. 5-12).

Symbols follow the paper. For mention j with n_s synthetic views h:

    VTEs_{j,h} = CE([VEs^G_{j,h} ; TE^G_j])                    (11)
    VTEs_j     = max_pool_h VTEs_{j,h}   (over available views) (12, 10)
    a^G, b^G   = A^G([VE^G_j ; VTEs_j])                         (7)
    a^L, b^L   = A^L([VE^L_j ; VTEs_j])   per patch             (8)
    ^VE^G_j    = VE^G_j + w (a^G * VE^G_j + b^G)                (5)
    ^VE^L_j    = VE^L_j + w (a^L * VE^L_j + b^L)                (6)

Only the MENTION image is transformed. Views beyond a mention's available count are masked out of the max
pool (a zero vector would be a fake view); a mention with no view at all is left unchanged.

Where the papers are silent (choices, and why):
- Where: on VE = the W_ic / W_it projections of CLIP's outputs (h = 96), before the matcher's input LayerNorms:
  Sec. 4.3 transforms "the information flow from the visual encoder ... before feeding it into the matcher", and
  Sec. 4.1 puts the fully connected layer in the visual encoding; the LayerNorms are MIMIC's matcher. Synthetic
  views go through the same W_ic (VEs^G); TE^G is CLIP's text_embeds as the encoder gives it.
- A^L is "a stack of convolutions" over patches (Fig. 6 shows a 2-D patch map): two 3x3 Conv2d over the
  sqrt(P-1) x sqrt(P-1) patch grid, not a 1-D conv over the flattened tokens, which would make the last patch of
  one row a neighbour of the first patch of the next. The CLS token is not on the grid: the same stack is applied
  to it as a 1x1 map (so only the kernels' centre taps act on it).
- A^G is a two-layer MLP (a "stack" on a single vector); CE is a two-layer MLP; GELU between layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ContextEncoder(nn.Module):
    """CE: one synthetic view's global feature plus the mention text, mapped to a context vector."""

    def __init__(self, dv: int, dt: int, dc: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dv + dt, dc), nn.GELU(), nn.Linear(dc, dc))

    def forward(self, view_global: torch.Tensor, text_global: torch.Tensor) -> torch.Tensor:
        # view_global [B, S, dv], text_global [B, dt] -> [B, S, dc]
        text = text_global.unsqueeze(1).expand(-1, view_global.shape[1], -1)
        return self.net(torch.cat([view_global, text], dim=-1))


class CVaCPT(nn.Module):
    def __init__(self, dv: int, dt: int, dc: int | None = None, kernel_size: int = 3, weight: float = 1.0,
                 init: str = "random"):
        super().__init__()
        dc = dc or dv
        self.weight = float(weight)          # w in eq. 5-6, from config (0 <= w <= 1)
        self.context = ContextEncoder(dv, dt, dc)
        self.affine_global = nn.Sequential(nn.Linear(dv + dc, dv), nn.GELU(), nn.Linear(dv, 2 * dv))   # A^G
        pad = kernel_size // 2
        self.affine_local = nn.Sequential(                                                                 # A^L
            nn.Conv2d(dv + dc, dv, kernel_size, padding=pad), nn.GELU(),
            nn.Conv2d(dv, 2 * dv, kernel_size, padding=pad),
        )
        if init == "identity":
            # alpha = beta = 0 at the start: eq. 5-6 return the feature unchanged until training moves them
            # (randomly initialised, the untrained module already shifts the global feature by ~70 % of its norm)
            for last in (self.affine_global[-1], self.affine_local[-1]):
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        elif init != "random":
            raise ValueError(f"CVaCPT init must be 'random' or 'identity', got {init!r}")

    def pooled_context(self, view_global: torch.Tensor, n_views: torch.Tensor, text_global: torch.Tensor):
        """eq. 10-12: per-view context, max-pooled over the views each mention really has."""
        ctx = self.context(view_global, text_global)                                   # [B, S, dc]
        available = torch.arange(ctx.shape[1], device=ctx.device)[None, :] < n_views[:, None]
        ctx = ctx.masked_fill(~available[..., None], float("-inf")).amax(dim=1)
        has_view = n_views > 0
        return torch.where(has_view[:, None], ctx, torch.zeros_like(ctx)), has_view

    def affine(self, image_global, image_local, view_global, n_views, text_global):
        """(alpha^G, beta^G, alpha^L, beta^L, has_view): the paper's Fig. 6 plots alpha^L / beta^L."""
        ctx, has_view = self.pooled_context(view_global, n_views, text_global)
        alpha_g, beta_g = self.affine_global(torch.cat([image_global, ctx], dim=-1)).chunk(2, dim=-1)
        tokens = torch.cat([image_local, ctx[:, None, :].expand(-1, image_local.shape[1], -1)], dim=-1)
        alpha_l, beta_l = self.patch_affine(tokens).chunk(2, dim=-1)
        return alpha_g, beta_g, alpha_l, beta_l, has_view

    def patch_affine(self, tokens: torch.Tensor) -> torch.Tensor:
        """A^L on [B, 1 + side*side, C] tokens (CLS first): 2-D convs over the patch grid, CLS as a 1x1 map."""
        b, n, c = tokens.shape
        side = math.isqrt(n - 1)
        if side * side != n - 1:
            raise ValueError(f"CVaCPT: image_local has {n} tokens; expected CLS + a square patch grid")
        grid = tokens[:, 1:].transpose(1, 2).reshape(b, c, side, side)
        patches = self.affine_local(grid).flatten(2).transpose(1, 2)               # [B, side*side, 2 dv]
        cls = self.affine_local(tokens[:, :1].transpose(1, 2)[..., None]).flatten(2).transpose(1, 2)
        return torch.cat([cls, patches], dim=1)

    def forward(self, image_global, image_local, view_global, n_views, text_global):
        """image_global [B, dv], image_local [B, P, dv], view_global [B, S, dv], n_views [B], text_global [B, dt]."""
        if self.weight == 0.0:
            return image_global, image_local        # exact identity, not merely "close"
        alpha_g, beta_g, alpha_l, beta_l, has_view = self.affine(image_global, image_local, view_global,
                                                                 n_views, text_global)
        w = self.weight * has_view.to(image_global.dtype)
        out_global = image_global + w[:, None] * (alpha_g * image_global + beta_g)         # eq. 5
        out_local = image_local + w[:, None, None] * (alpha_l * image_local + beta_l)      # eq. 6
        return out_global, out_local
