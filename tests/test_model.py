"""The model reads like the paper; these tests pin the properties the paper and the issue state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mel_ray.model import MELModel, ModelDims
from mel_ray.model.cvacpt import CVaCPT
from mel_ray.model.losses import build_columns, contrastive_loss
from mel_ray.model.mel_model import slice_side
from tests import mimic_reference

DIMS = {"text_global": 12, "text_local": 10, "image_global": 12, "image_local": 14, "hidden": 8}
L, P, S = 6, 10, 3          # P: CLS + a 3 x 3 patch grid


def batch(n: int, seed: int, views: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, L, dtype=torch.bool)
    mask[:, 4:] = torch.rand(n, 2, generator=g) > 0.5          # some padded tokens
    out = {
        "text_global": torch.randn(n, DIMS["text_global"], generator=g),
        "text_local": torch.randn(n, L, DIMS["text_local"], generator=g),
        "text_mask": mask,
        "image_global": torch.randn(n, DIMS["image_global"], generator=g),
        "image_local": torch.randn(n, P, DIMS["image_local"], generator=g),
    }
    if views:
        out["synthetic_global"] = torch.randn(n, S, DIMS["image_global"], generator=g)
        out["n_views"] = torch.randint(0, S + 1, (n,), generator=g)
    return out


def model(weight: float = 1.0, seed: int = 0) -> MELModel:
    torch.manual_seed(seed)
    return MELModel(ModelDims(**DIMS, cvacpt_weight=weight)).eval()


def test_cvacpt_with_w_zero_is_an_exact_identity():
    torch.manual_seed(0)
    module = CVaCPT(dv=8, dt=16, weight=0.0)
    g, loc = torch.randn(4, 8), torch.randn(4, 10, 8)
    out_g, out_l = module(g, loc, torch.randn(4, 3, 8), torch.tensor([3, 1, 0, 2]), torch.randn(4, 16))
    assert torch.equal(out_g, g) and torch.equal(out_l, loc)
    m = batch(5, 1)
    plain = model(0.0).entity_features(m)           # the same features without CVaCPT
    side = model(0.0).mention_features(m)
    assert torch.equal(side.image_global, plain.image_global) and torch.equal(side.image_local, plain.image_local)


def _conv_3x3_on_grid(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 3x3 'same' convolution written out: x [side, side, C_in] -> [side, side, C_out], zero outside the grid."""
    side = x.shape[0]
    out = conv.bias.expand(side, side, -1).clone()
    for i in range(side):
        for j in range(side):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < side and 0 <= j + dj < side:
                        out[i, j] = out[i, j] + conv.weight[:, :, di + 1, dj + 1] @ x[i + di, j + dj]
    return out


def _a_local(module: CVaCPT, tokens: torch.Tensor) -> torch.Tensor:
    """A^L on one mention's [P, C] tokens: convs over the sqrt(P-1)^2 patch grid (row-major, as CLIP numbers
    patches); CLS alone, so only the kernels' centre taps see it."""
    first, act, second = module.affine_local
    side = round((tokens.shape[0] - 1) ** 0.5)
    grid = tokens[1:].reshape(side, side, -1)
    patches = _conv_3x3_on_grid(second, act(_conv_3x3_on_grid(first, grid))).reshape(side * side, -1)
    cls = second.weight[:, :, 1, 1] @ act(first.weight[:, :, 1, 1] @ tokens[0] + first.bias) + second.bias
    return torch.cat([cls[None], patches])


def _paper_cvacpt(module: CVaCPT, ve_g, ve_l, ves_g, n_views, te_g, w: float):
    """Paper Sec. 4.3, eq. 5-12, one mention at a time; only CE, A^G and A^L (the learned networks) are the
    module's. VE^G [B, dv], VE^L [B, P, dv], VEs^G [B, S, dv], TE^G [B, dt]."""
    out_g, out_l = ve_g.clone(), ve_l.clone()
    for j in range(ve_g.shape[0]):
        n = int(n_views[j])
        if n == 0:                   # no synthetic view: nothing to condition on, the mention stays as it is
            continue
        vtes = torch.stack([module.context.net(torch.cat([ves_g[j, h], te_g[j]])) for h in range(n)])  # eq. 10-11
        ctx = vtes.max(dim=0).values                                                   # eq. 12, real views only
        alpha_g, beta_g = module.affine_global(torch.cat([ve_g[j], ctx])).chunk(2)        # eq. 7
        patches = torch.cat([ve_l[j], ctx.expand(ve_l.shape[1], -1)], dim=-1)           # [P, dv + dc]
        alpha_l, beta_l = _a_local(module, patches).chunk(2, dim=-1)                    # eq. 8
        out_g[j] = ve_g[j] + w * (alpha_g * ve_g[j] + beta_g)                           # eq. 5
        out_l[j] = ve_l[j] + w * (alpha_l * ve_l[j] + beta_l)                           # eq. 6
    return out_g, out_l


@pytest.mark.parametrize("w", [1.0, 0.3])
def test_cvacpt_with_w_positive_is_the_papers_affine_modulation(w):
    net = model(w)
    m = batch(6, 1)
    m["n_views"] = torch.tensor([0, 1, 2, 3, 3, 1])
    with torch.no_grad():
        plain = net._project(m)
        side = net._project(m)
        side.image_global, side.image_local = net.cvacpt(plain.image_global, plain.image_local,
                                                         net.w_ic(m["synthetic_global"]), m["n_views"],
                                                         plain.text_global)
        views = net.w_ic(m["synthetic_global"])                      # VEs^G: the projection VE^G goes through
        want_g, want_l = _paper_cvacpt(net.cvacpt, plain.image_global, plain.image_local, views, m["n_views"],
                                       plain.text_global, w)
        normed = net.mention_features(m)                              # then the matcher's input LayerNorms
    torch.testing.assert_close(side.image_global, want_g)
    torch.testing.assert_close(side.image_local, want_l)
    torch.testing.assert_close(normed.image_local, net.norms.it(want_l))
    # a real change (the randomly initialised A^G / A^L predict nonzero scale and shift), only where views are
    moved = (side.image_local - plain.image_local).abs().amax(dim=(1, 2))
    assert (moved[m["n_views"] > 0] > 1e-3).all() and (moved[m["n_views"] == 0] == 0).all()
    assert torch.equal(side.text_global, plain.text_global)          # only the mention image is transformed


def test_cvacpt_identity_init_starts_as_the_identity_and_still_learns():
    torch.manual_seed(0)
    module = CVaCPT(dv=8, dt=16, weight=1.0, init="identity")
    g, loc = torch.randn(4, 8), torch.randn(4, 10, 8)
    views, n, text = torch.randn(4, 3, 8), torch.tensor([3, 1, 0, 2]), torch.randn(4, 16)
    out_g, out_l = module(g, loc, views, n, text)
    assert torch.equal(out_g, g) and torch.equal(out_l, loc)
    (out_g.square().sum() + out_l.square().sum()).backward()
    # the zeroed output layers get gradient (so alpha, beta move away from 0 with the first step)
    assert module.affine_global[-1].weight.grad.abs().sum() > 0
    assert module.affine_local[-1].weight.grad.abs().sum() > 0
    random_init = CVaCPT(dv=8, dt=16, weight=1.0)
    assert not torch.allclose(random_init(g, loc, views, n, text)[0], g)
    with pytest.raises(ValueError, match="identity"):
        CVaCPT(dv=8, dt=16, init="zeros")


def test_views_beyond_the_available_count_are_masked_not_zero_padded():
    net = model(1.0)
    m = batch(4, 2)
    m["n_views"] = torch.tensor([1, 2, 3, 2])
    ref = net.mention_features(m)
    garbage = dict(m)
    garbage["synthetic_global"] = m["synthetic_global"].clone()
    garbage["synthetic_global"][0, 1:] = 1e3
    garbage["synthetic_global"][1, 2:] = -1e3
    garbage["synthetic_global"][3, 2:] = 0.0
    out = net.mention_features(garbage)
    assert torch.equal(out.image_local, ref.image_local)
    # zero-padding would have been a different (wrong) answer for mentions whose contexts are all negative
    views = net.w_ic(m["synthetic_global"])
    ctx_all, _ = net.cvacpt.pooled_context(views, torch.full((4,), S), m["text_global"])
    ctx_1, _ = net.cvacpt.pooled_context(views, torch.ones(4, dtype=torch.long), m["text_global"])
    per_view = net.cvacpt.context(views, m["text_global"])
    assert torch.allclose(ctx_all, per_view.amax(dim=1)) and torch.allclose(ctx_1, per_view[:, 0])


def test_n_s_cap_equals_features_holding_only_the_first_n_s_views():
    """model.views = n_s lets one feature set (S views) serve every n_s: same as keeping views < n_s only."""
    m, e = batch(6, 13), batch(5, 14, views=False)
    m["n_views"] = torch.tensor([0, 1, 2, 3, 3, 2])
    for n_s in (0, 1, 2):
        capped = model(1.0)
        capped.dims.views = n_s
        fewer = {**m, "synthetic_global": m["synthetic_global"][:, :max(n_s, 1)],
                 "n_views": m["n_views"].clamp(max=n_s)}
        with torch.no_grad():
            a, b = capped(m, e)["overall"], model(1.0)(fewer, e)["overall"]
        assert torch.allclose(a, b, atol=1e-6), n_s
    with torch.no_grad():       # and the cap changes something when a mention has more views than n_s
        capped.dims.views = 1
        assert not torch.allclose(capped(m, e)["overall"], model(1.0)(m, e)["overall"])


def test_mention_without_views_is_left_unchanged():
    net = model(1.0)
    m = batch(3, 3)
    m["n_views"] = torch.tensor([0, 0, 0])
    assert torch.equal(net.mention_features(m).image_local, net.norms.it(net._project(m).image_local))


def test_forward_equals_precomputed_entity_side_in_chunks():
    net = model(1.0)
    m, e = batch(4, 4), batch(9, 5, views=False)
    with torch.no_grad():
        full = net(m, e)
        es = net.entity_side(net.entity_features(e))
        ms = net.mention_side(net.mention_features(m))
        parts = [net.pair_logits(ms, slice_side(es, a, a + 4)) for a in range(0, 9, 4)]
    assert set(full) == {"overall", "text", "image", "cross"}
    for name, value in full.items():
        assert value.shape == (4, 9)
        assert torch.allclose(torch.cat([p[name] for p in parts], dim=1), value, atol=1e-6)
    assert torch.allclose(full["overall"], (full["text"] + full["image"] + full["cross"]) / 3)


def _perturbed_model(seed: int, dtype=torch.float32) -> MELModel:
    """A model whose LayerNorms have non-trivial scale and shift (at init they are 1 and 0, which would hide a
    misplaced LayerNorm from the reference comparison)."""
    net = model(1.0, seed).to(dtype)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.3)
    return net


def _as(batch_: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch_.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_unit_equals_the_papers_equations_pair_by_pair(seed):
    """Production scoring (entity/mention split, mean moved inside TGLU, one GEMM) against tests/mimic_reference.py,
    written one (mention, entity) pair at a time from ../shared/papers/mimic-matcher.md: same scores to fp32
    tolerance and the same ranks, unit by unit and in total."""
    net = _perturbed_model(seed)
    m, e = batch(7, 100 + seed), batch(11, 200 + seed, views=False)
    with torch.no_grad():
        got = net(m, e)
    want = mimic_reference.scores(net, m, e)
    assert set(got) == set(want) == {"text", "image", "cross", "overall"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-4, msg=name)
        assert torch.equal(got[name].argsort(dim=1, descending=True, stable=True),
                           want[name].argsort(dim=1, descending=True, stable=True)), name
        assert want[name].std() > 0.1, name            # not a degenerate (constant) unit


@pytest.mark.parametrize("entities_per_block", [1, 4])
def test_tglu_entity_blocks_give_the_same_scores(monkeypatch, entities_per_block):
    """TGLU scores entities a cache-sized block at a time; blocks that split the KB chunk change nothing."""
    from mel_ray.model import matcher

    net = _perturbed_model(5)
    m, e = batch(7, 300), batch(11, 301, views=False)
    with torch.no_grad():
        whole = net(m, e)["text"]
        monkeypatch.setattr(matcher, "ATTENTION_BLOCK_FLOATS", entities_per_block * L * 7 * L)
        blocked = net(m, e)["text"]
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(blocked, mimic_reference.scores(net, m, e)["text"], rtol=1e-5, atol=1e-4)


def test_production_gradients_equal_the_references():
    """Training back-propagates through the production form: its gradients must be the equations' too."""
    net = _perturbed_model(3, torch.float64)
    m, e = _as(batch(4, 11), torch.float64), _as(batch(5, 12, views=False), torch.float64)
    weights = torch.linspace(-1, 1, 20, dtype=torch.float64).view(4, 5)
    grads = []
    for scores in (lambda: net(m, e), lambda: mimic_reference.scores.__wrapped__(net, m, e)):
        net.zero_grad()
        out = scores()
        sum((out[name] * weights).sum() for name in ("text", "image", "cross")).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    production, reference = grads
    assert production.keys() == reference.keys()
    for unit in ("norms.tc", "norms.it", "tglu.ln_t", "vdlu.dual_1.w_f", "vdlu.dual_2.ln_out", "cmfu.ln_f", "cvacpt"):
        assert any(name.startswith(unit) for name in production), unit
    for name in production:
        torch.testing.assert_close(production[name], reference[name], rtol=1e-9, atol=1e-10, msg=name)


def test_text_mask_is_not_read_and_padded_positions_count_as_in_mimic():
    net = model(1.0)
    m, e = batch(3, 6), batch(5, 7, views=False)
    with torch.no_grad():
        base = net(m, e)["text"]
        unmasked = net({**m, "text_mask": torch.ones_like(m["text_mask"])}, e)["text"]
        m2 = {k: v.clone() for k, v in m.items()}
        m2["text_local"][~m["text_mask"]] = 5.0
        moved = net(m2, e)["text"]
    assert torch.equal(base, unmasked)
    assert not torch.allclose(base, moved)


def _latent_task(n: int, seed: int) -> tuple[dict, dict]:
    """Entities and mentions are different random linear maps of one latent vector per entity (plus noise), so a
    unit links them only by learning the maps; at initialisation every unit is near chance."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    shapes = {"text_global": (DIMS["text_global"],), "text_local": (L, DIMS["text_local"]),
              "image_global": (DIMS["image_global"],), "image_local": (P, DIMS["image_local"])}

    def side() -> dict:
        out = {}
        for name, shape in shapes.items():
            tokens = shape[0] if len(shape) == 2 else 1
            maps = torch.randn(tokens, 8, shape[-1], generator=g)
            x = torch.einsum("nz,tzd->ntd", z, maps) + 0.3 * torch.randn(n, tokens, shape[-1], generator=g)
            out[name] = x if len(shape) == 2 else x[:, 0]
        out["text_mask"] = torch.ones(n, L, dtype=torch.bool)
        return out

    entities, mentions = side(), side()
    mentions["synthetic_global"] = torch.randn(n, S, DIMS["image_global"], generator=g)
    mentions["n_views"] = torch.full((n,), S)
    return mentions, entities


@pytest.mark.parametrize("unit", ["text", "image", "cross"])
def test_each_unit_alone_learns_well_below_chance(unit):
    """Trained on its own cross-entropy only, each unit must leave chance far behind (a unit that cannot learn,
    as the pre-MIMIC VDLU could not, fails here). Chance is log(n) for n in-batch candidates."""
    n = 32
    m, e = _latent_task(n, 7)
    net = model(1.0, seed=1).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    targets = torch.arange(n)
    chance = float(np.log(n))
    with torch.no_grad():
        start = float(torch.nn.functional.cross_entropy(net(m, e)[unit], targets))
    for _ in range(250):
        loss = torch.nn.functional.cross_entropy(net(m, e)[unit], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(torch.nn.functional.cross_entropy(net.eval()(m, e)[unit], targets))
    assert start > 0.5 * chance, (unit, start)        # the task is not solved at initialisation
    assert end < 0.25 * chance, (unit, start, end)   # measured: text 0.35, image 0.11, cross 0.16


def test_entity_order_only_permutes_columns():
    net = model(1.0)
    m, e = batch(3, 8), batch(6, 9, views=False)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        a = net(m, e)["overall"]
        b = net(m, {k: v[perm] for k, v in e.items()})["overall"]
    assert torch.allclose(a[:, perm], b, atol=1e-6)


def test_columns_per_negative_mode():
    gold = np.array([5, 7, 5])
    pools = [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([1, 2, 3])]
    c = build_columns(gold, pools, k=2, mode="jaccard")
    assert c.entity_ids.tolist() == [5, 7, 1, 2]
    assert c.targets.tolist() == [0, 1, 0]
    assert c.mask.tolist() == [[True, False, True, True],      # own gold + its 2 negatives
                               [True, True, False, False],     # no mined negatives: in-batch fallback
                               [True, False, True, True]]
    assert c.fallbacks == 1
    c = build_columns(gold, pools, k=2, mode="in_batch")
    assert c.entity_ids.tolist() == [5, 7] and c.mask.all()
    c = build_columns(gold, pools, k=2, mode="both")
    assert c.entity_ids.tolist() == [5, 7, 1, 2] and c.mask.all()
    rng = np.random.default_rng(0)
    picks = {tuple(build_columns(gold[:1], pools[:1], k=1, mode="jaccard", rng=rng, sample_top=3).entity_ids)
             for _ in range(30)}
    assert picks == {(5, 1), (5, 2), (5, 3)}
    with pytest.raises(ValueError):
        build_columns(gold, pools, k=2, mode="random")


def test_masked_columns_do_not_enter_the_loss():
    logits = {n: torch.tensor([[2.0, 0.0, 9.0]]) for n in ("overall", "text", "image", "cross")}
    mask = torch.tensor([[True, True, False]])
    loss, parts = contrastive_loss(logits, torch.tensor([0]), mask)
    expected = -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
    assert torch.isclose(loss, 4 * expected)
    assert set(parts) == {"loss_overall", "loss_text", "loss_image", "loss_cross"}


def test_training_steps_learn_to_link():
    """Mentions are a hidden linear map of their entities (so raw dot products fail): training must learn it."""
    torch.manual_seed(0)
    n = 16
    e = batch(n, 10, views=False)
    m = {}
    for k, v in e.items():
        if v.is_floating_point():
            mix = torch.randn(v.shape[-1], v.shape[-1]) / v.shape[-1] ** 0.5
            m[k] = v @ mix + 0.05 * torch.randn_like(v)
        else:
            m[k] = v.clone()
    m["synthetic_global"] = torch.randn(n, S, DIMS["image_global"])
    m["n_views"] = torch.full((n,), S)
    net = model(1.0).train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    targets, mask = torch.arange(n), torch.ones(n, n, dtype=torch.bool)
    with torch.no_grad():
        before = (net(m, e)["overall"].argmax(1) == targets).float().mean()
        first, _ = contrastive_loss(net(m, e), targets, mask)
    for _ in range(120):
        loss, _ = contrastive_loss(net(m, e), targets, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = (net.eval()(m, e)["overall"].argmax(1) == targets).float().mean()
    assert before < 0.5
    assert after >= 0.9 and loss < 0.5 * first
