"""UCE closed form and RECE's adversarial-embedding map (float64, small shapes)."""

from __future__ import annotations

import pytest
import torch

from sae_core.rece.closed_form import (
    EMBEDDING_VARIANTS,
    adversarial_map,
    adversarial_map_from_grams,
    adversarial_rows_from_grams,
    cross_gram,
    erase_system,
    gram,
    uce_edit,
    uce_solve_reference,
)

F64 = torch.float64
CTX = 24
OUTS = (16, 32, 32, 48)


def _weights(seed: int = 0, outs=OUTS, ctx: int = CTX, dtype=F64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"block{i}.to_{'kv'[i % 2]}": torch.randn(o, ctx, generator=gen, dtype=F64).to(dtype)
            for i, o in enumerate(outs)}


def _rows(n: int, seed: int, ctx: int = CTX, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, ctx, generator=gen, dtype=F64) * scale


def _uce_objective(w, w0, ce, v, cp, s_e, s_p, lam):
    loss = s_e * ((w @ ce.T - v.T) ** 2).sum() + lam * ((w - w0) ** 2).sum()
    if cp is not None:
        loss = loss + s_p * (((w - w0) @ cp.T) ** 2).sum()
    return loss


def _grad_ratio(w_new, w0, ce, v, cp, s_e, s_p, lam) -> float:
    """|grad at the solution| / |grad at the old weights|, by autograd."""
    grads = []
    for w in (w_new, w0):
        w = w.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_uce_objective(w, w0, ce, v, cp, s_e, s_p, lam), w)
        grads.append(g.norm())
    return float(grads[0] / grads[1])


@pytest.mark.parametrize("target_kind", ["anchor", "values"])
@pytest.mark.parametrize("scales", [(1.0, 1.0, 0.5), (2.0, 0.1, 0.1), (1.0, 3.0, 1e-3)])
def test_closed_form_zeroes_objective_gradient(target_kind, scales):
    s_e, s_p, lam = scales
    weights = _weights()
    ce, ca, cp = _rows(6, 1), _rows(6, 2), _rows(9, 3)
    if target_kind == "anchor":
        targets = ca
        values = {n: ca @ w.T for n, w in weights.items()}
    else:
        values = {n: _rows(6, 10 + i, ctx=w.shape[0]) for i, (n, w) in enumerate(weights.items())}
        targets = values
    res = uce_edit(weights, ce, targets, cp, erase_scale=s_e, preserve_scale=s_p, lam=lam)
    for name, w0 in weights.items():
        ratio = _grad_ratio(w0 + res.deltas[name], w0, ce, values[name], cp, s_e, s_p, lam)
        assert ratio <= 1e-6, (name, ratio)


@pytest.mark.parametrize("n", [1, 5, 30])
def test_delta_rank_and_exact_factorisation(n):
    weights = _weights(1)
    ce, ca, cp = _rows(n, 4), _rows(n, 5), _rows(7, 6)
    res = uce_edit(weights, ce, ca, cp)
    for name, w in weights.items():
        delta = res.deltas[name]
        up, down = res.factors[name]
        r = min(n, CTX)
        assert up.shape == (w.shape[0], r) and down.shape == (r, CTX)
        assert res.rank(name) == r
        assert int(torch.linalg.matrix_rank(delta)) <= n
        assert float((up @ down - delta).norm() / delta.norm()) <= 1e-10
        assert delta.dtype == F64


def test_delta_vanishes_orthogonal_to_erase_and_preserve_rows():
    weights = _weights(2)
    ce, ca, cp = _rows(4, 7), _rows(4, 8), _rows(5, 9)
    res = uce_edit(weights, ce, ca, cp)
    basis = torch.linalg.qr(torch.cat([ce, cp]).T).Q  # span of every row used
    ortho = torch.randn(3, CTX, dtype=F64)
    ortho = ortho - (ortho @ basis) @ basis.T
    for name in weights:
        assert float((res.deltas[name] @ ortho.T).norm()) <= 1e-10 * float(res.deltas[name].norm())


def test_preserve_rows_keep_their_values_with_large_preserve_scale():
    weights = _weights(3)
    ce, ca, cp = _rows(5, 10), _rows(5, 11), _rows(8, 12)
    res = uce_edit(weights, ce, ca, cp, preserve_scale=1e7, lam=0.1)
    weak = uce_edit(weights, ce, ca, cp, preserve_scale=1e-3, lam=0.1)
    for name, w in weights.items():
        old = cp @ w.T
        err = float((cp @ (w + res.deltas[name]).T - old).norm() / old.norm())
        err_weak = float((cp @ (w + weak.deltas[name]).T - old).norm() / old.norm())
        assert err <= 1e-5, (name, err)
        assert err_weak > 100 * err  # the preserve term is what holds them


def test_erase_rows_reach_targets_with_small_lambda():
    weights = _weights(4)
    ce, ca, cp = _rows(6, 13), _rows(6, 14), _rows(4, 15)  # 6 + 4 rows <= ctx: both can be met exactly
    res = uce_edit(weights, ce, ca, cp, lam=1e-9)
    for name, w in weights.items():
        target = ca @ w.T
        err = float((ce @ (w + res.deltas[name]).T - target).norm() / target.norm())
        assert err <= 1e-6, (name, err)
    big = uce_edit(weights, ce, ca, cp, lam=100.0)
    name, w = next(iter(weights.items()))
    assert float((ce @ (w + big.deltas[name]).T - ca @ w.T).norm()) > 1e-3


@pytest.mark.parametrize("with_preserve", [True, False])
def test_batched_solve_equals_per_layer_solve(with_preserve):
    weights = _weights(5)
    ce, ca = _rows(7, 16), _rows(7, 17)
    cp = _rows(10, 18) if with_preserve else None
    kw = dict(erase_scale=1.5, preserve_scale=0.3, lam=0.2)
    batched = uce_edit(weights, ce, ca, cp, **kw)
    for name, w in weights.items():
        # the plain mat1 @ mat2^-1 form, one matrix at a time
        direct = uce_solve_reference(w, ce, ca @ w.T, cp, **kw) - w
        alone = uce_edit({name: w}, ce, ca, cp, **kw).deltas[name]
        scale = float(direct.norm())
        assert float((batched.deltas[name] - direct).norm()) <= 1e-10 * scale
        assert float((batched.deltas[name] - alone).norm()) <= 1e-12 * scale
    # explicit target values give the same edit as the anchor rows they come from
    values = {n: ca @ w.T for n, w in weights.items()}
    by_values = uce_edit(weights, ce, values, cp, **kw)
    for name in weights:
        assert torch.allclose(by_values.deltas[name], batched.deltas[name], rtol=1e-10, atol=1e-12)


def test_more_erase_rows_than_context_width():
    weights = _weights(6)
    ce, ca = _rows(CTX + 10, 19), _rows(CTX + 10, 20)
    res = uce_edit(weights, ce, ca, None, lam=0.1)
    for name, w in weights.items():
        up, down = res.factors[name]
        assert down.shape == (CTX, CTX)
        assert float((up @ down - res.deltas[name]).norm() / res.deltas[name].norm()) <= 1e-10
        direct = uce_solve_reference(w, ce, ca @ w.T, None, lam=0.1) - w
        assert float((res.deltas[name] - direct).norm() / direct.norm()) <= 1e-10


def test_low_precision_weights_are_solved_in_float64():
    w64 = _weights(7)
    w32 = {n: w.float() for n, w in w64.items()}
    w16 = {n: w.to(torch.bfloat16) for n, w in w64.items()}
    ce, ca, cp = _rows(5, 21), _rows(5, 22), _rows(3, 23)
    ref = uce_edit({n: w.double() for n, w in w32.items()}, ce, ca, cp)
    res32 = uce_edit(w32, ce.float(), ca.float(), cp.float())
    for name in w64:
        assert res32.deltas[name].dtype == torch.float32
        assert res32.factors[name][0].dtype == torch.float32
        # the only loss is the final cast (the float32 rows are exact copies of the float64 ones here)
        exact = ref.deltas[name].float()
        assert torch.equal(res32.deltas[name], exact) or float(
            (res32.deltas[name] - exact).abs().max()) <= 1e-6 * float(exact.abs().max())
    res16 = uce_edit(w16, ce, ca, cp)
    assert all(d.dtype == torch.bfloat16 for d in res16.deltas.values())
    keep64 = uce_edit(w16, ce, ca, cp, dtype=F64)
    assert all(d.dtype == F64 for d in keep64.deltas.values())


def test_erase_system_down_factor():
    ce, cp = _rows(5, 24), _rows(6, 25)
    sys = erase_system(ce, cp, erase_scale=2.0, preserve_scale=0.5, lam=0.3)
    g = 0.3 * torch.eye(CTX, dtype=F64) + 2.0 * ce.T @ ce + 0.5 * cp.T @ cp
    assert torch.allclose(sys.down @ g, ce, atol=1e-10)
    assert torch.allclose(sys.cholesky @ sys.cholesky.T, g, atol=1e-10)


def test_uce_input_errors():
    weights = _weights(8)
    ce, ca = _rows(4, 26), _rows(4, 27)
    with pytest.raises(ValueError, match="erase"):
        uce_edit(weights, _rows(4, 0, ctx=CTX + 1), ca)
    with pytest.raises(ValueError, match="position-aligned"):
        uce_edit(weights, ce, _rows(3, 28))
    bad = ce.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        uce_edit(weights, bad, ca)
    with pytest.raises(ValueError, match="context width"):
        uce_edit({**weights, "odd": torch.randn(8, CTX + 2, dtype=F64)}, ce, ca)
    with pytest.raises(ValueError, match="positive definite"):
        uce_edit(weights, ce, ca, None, lam=0.0)  # 4 rows cannot span 24 dimensions
    with pytest.raises(ValueError, match="no target values"):
        uce_edit(weights, ce, {"block0.to_k": torch.zeros(4, 16, dtype=F64)})
    with pytest.raises(ValueError, match="lam"):
        uce_edit(weights, ce, ca, lam=-1.0)
    with pytest.raises(ValueError, match="non-empty"):
        uce_edit({}, ce, ca)


# ---------------------------------------------------------------------------------------------------------------
# adversarial embedding


def _edited(weights, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: w + 0.3 * torch.randn(w.shape, generator=gen, dtype=F64) for n, w in weights.items()}


def _embedding_objective(x, c, t, current, original, lr, variant):
    pen = EMBEDDING_VARIANTS[variant]
    loss = sum(((x @ current[n].T - c @ original[n].T) ** 2).sum() for n in current)
    loss = loss + lr * pen.ridge * (x ** 2).sum() + lr * pen.toward_reference * ((x - t) ** 2).sum()
    loss = loss + lr * pen.output_surrogate * sum(((x @ w.T - c @ w.T) ** 2).sum() for w in current.values())
    return loss + lr * pen.input_surrogate * ((x - c) ** 2).sum()


@pytest.mark.parametrize("variant", sorted(EMBEDDING_VARIANTS))
def test_adversarial_embedding_zeroes_its_objective_gradient(variant):
    original = _weights(9)
    current = _edited(original, 10)
    c, t = _rows(7, 29), _rows(7, 30)
    lr = 0.37
    amap = adversarial_map(current, original, lr, variant)
    adv = amap.apply(c, t if amap.reference is not None else None)
    grads = []
    for x in (adv, c):
        x = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_embedding_objective(x, c, t, current, original, lr, variant), x)
        grads.append(float(g.norm()))
    assert grads[0] <= 1e-6 * grads[1], grads


def test_adversarial_map_is_identity_without_edit_as_lambda_vanishes():
    original = _weights(11)  # stacked [128, 24]: full column rank
    c = _rows(9, 31)
    exact = adversarial_map(original, original, 0.0)
    assert torch.allclose(exact.matrix, torch.eye(CTX, dtype=F64), atol=1e-10)
    errs = [float((adversarial_map(original, original, lr).apply(c) - c).norm() / c.norm())
            for lr in (1e-1, 1e-3, 1e-6)]
    assert errs[0] > errs[1] > errs[2] and errs[2] <= 1e-7
    # the ridge shrinks the embedding
    assert float(adversarial_map(original, original, 10.0).apply(c).norm()) < float(c.norm())


def test_regularized_and_reference_variants_differ_only_by_the_reference_term():
    original = _weights(12)
    current = _edited(original, 13)
    c, t = _rows(6, 32), _rows(6, 33)
    lr = 0.2
    reg = adversarial_map(current, original, lr, "regularized")
    ref = adversarial_map(current, original, lr, "reference")
    # same system matrix (lr I + sum W'^T W') and the same map of the concept rows ...
    assert torch.allclose(reg.matrix, ref.matrix, rtol=0, atol=1e-12)
    assert reg.reference is None
    # ... and the reference variant adds exactly lr (lr I + sum W'^T W')^-1 t
    h = lr * torch.eye(CTX, dtype=F64) + gram(current.values())
    extra = lr * torch.linalg.solve(h, t.T).T
    assert torch.allclose(ref.apply(c, t) - reg.apply(c), extra, atol=1e-10)
    # with t = 0 they coincide
    assert torch.allclose(ref.apply(c, torch.zeros_like(t)), reg.apply(c), atol=1e-12)
    with pytest.raises(ValueError, match="reference_rows"):
        ref.apply(c)


def test_grams_and_map_from_grams():
    original = _weights(14)
    current = _edited(original, 15)
    stacked_c = torch.cat(list(current.values()))
    stacked_o = torch.cat(list(original.values()))
    assert torch.allclose(gram(current.values()), stacked_c.T @ stacked_c, atol=1e-10)
    assert torch.allclose(cross_gram(current.values(), original.values()), stacked_c.T @ stacked_o, atol=1e-10)
    big = {"w": torch.randn(300, 520, dtype=F64)}  # wide enough for the blocked product
    assert torch.allclose(gram(big.values()), big["w"].T @ big["w"], atol=1e-9)
    amap = adversarial_map_from_grams(stacked_c.T @ stacked_c, stacked_c.T @ stacked_o, 0.1)
    direct = torch.linalg.solve(0.1 * torch.eye(CTX, dtype=F64) + stacked_c.T @ stacked_c, stacked_c.T @ stacked_o)
    assert torch.allclose(amap.matrix, direct, atol=1e-10)
    with pytest.raises(ValueError, match="variant"):
        adversarial_map_from_grams(stacked_c.T @ stacked_c, stacked_c.T @ stacked_o, 0.1, "nope")
    with pytest.raises(ValueError, match="same names"):
        adversarial_map(current, {"x": original["block0.to_k"]}, 0.1)


@pytest.mark.parametrize("variant", sorted(EMBEDDING_VARIANTS))
def test_stacked_row_solve_equals_explicit_map(variant):
    original = _weights(16)
    current = _edited(original, 17)
    a, b = gram(current.values()), cross_gram(current.values(), original.values())
    c, t = _rows(11, 34), _rows(11, 35)
    amap = adversarial_map_from_grams(a, b, 0.05, variant)
    expect = amap.apply(c, t if amap.reference is not None else None)
    got = adversarial_rows_from_grams(a, b, c, 0.05, variant, t)
    assert torch.allclose(got, expect, atol=1e-10)
