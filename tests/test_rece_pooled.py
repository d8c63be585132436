"""The pooled text input's edit (sae_core.rece.pooled), the low-rank deltas and the factor-aware leak probe.

Float64, small random shapes; the pipeline runs on a plain host object (no ComfyUI).
"""

from __future__ import annotations

import pytest
import torch

from sae_core.rece import (
    LowRankDeltas,
    PooledInput,
    RECESettings,
    edit_pooled_input,
    leak_probe,
    rece_edit,
    run_rece,
    uce_start,
)

F64 = torch.float64
P, SIZE, EMB = 12, 20, 30
"""Pooled width, size-embedding columns, ADM layer output width."""


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _pooled(seed: int = 0) -> PooledInput:
    return PooledInput("label_emb.0.0.weight", _rand(EMB, P + SIZE, seed=seed) / P ** 0.5, P)


def _uce_gradient(w0, d, pc, pa, pp, s_e, s_p, lam):
    """Half the gradient of s_e sum ||W p_c - W0 p_a||^2 + s_p sum ||(W - W0) p_j||^2 + lam ||W - W0||^2."""
    w = w0 + d
    grad = s_e * (w @ pc.T - (w0 @ pa.T).expand(-1, pc.shape[0])) @ pc + lam * d
    return grad + s_p * (d @ pp.T) @ pp


@pytest.mark.parametrize("concepts", [1, 2])
def test_pooled_edit_zeroes_uces_gradient_and_keeps_the_size_columns(concepts):
    target = _pooled()
    pc, pa, pp = _rand(concepts, P, seed=1), _rand(1, P, seed=2), _rand(3, P, seed=3)
    edit = edit_pooled_input(target, pc, pa, pp, erase_scale=1.0, preserve_scale=0.5, pooled_lambda=0.02)
    delta = edit.result.deltas[target.key]
    assert delta.shape == target.weight.shape and torch.count_nonzero(delta[:, P:]) == 0
    every = torch.cat([pc, pa, pp])
    assert edit.ridge == pytest.approx(0.02 * float(every.pow(2).sum(1).mean()))
    w0 = target.weight[:, :P]
    grad = _uce_gradient(w0, delta[:, :P], pc, pa, pp, 1.0, 0.5, edit.ridge)
    scale = float(((w0 @ (pc - pa).T) @ pc).norm())
    assert float(grad.norm()) <= 1e-10 * scale
    # rank <= number of concepts, the factors exact, and the relative change is that of the pooled block
    up, down = edit.result.factors[target.key]
    assert down.shape == (concepts, P + SIZE) and torch.allclose(up @ down, delta, rtol=0, atol=1e-14)
    assert edit.relative_change == pytest.approx(float(delta.norm() / w0.norm()), rel=1e-9)


def test_pooled_edit_does_not_depend_on_the_pooled_vectors_scale():
    """The ridge follows the vectors' mean squared norm, so scaling every pooled vector by a scales the whole objective
    by a^2: the same minimiser, the same delta."""
    target = _pooled(4)
    pc, pa, pp = _rand(1, P, seed=5), _rand(1, P, seed=6), _rand(2, P, seed=7)
    one = edit_pooled_input(target, pc, pa, pp).result.deltas[target.key]
    ten = edit_pooled_input(target, 10 * pc, 10 * pa, 10 * pp).result.deltas[target.key]
    torch.testing.assert_close(ten, one, rtol=1e-9, atol=1e-12)
    # an absolute ridge would not: the same ridge with 10x vectors edits harder
    fixed = edit_pooled_input(target, pc, pa, pp).ridge
    harder = edit_pooled_input(target, 10 * pc, 10 * pa, 10 * pp, pooled_lambda=1e-3 / 100)
    assert harder.ridge == pytest.approx(fixed)
    assert not torch.allclose(harder.result.deltas[target.key], one, rtol=1e-3)


def test_small_ridge_maps_the_concept_to_the_anchor_and_keeps_the_preserved():
    target = _pooled(8)
    pc, pa, pp = _rand(1, P, seed=9), _rand(1, P, seed=10), _rand(3, P, seed=11)
    edit = edit_pooled_input(target, pc, pa, pp, pooled_lambda=1e-6, preserve_scale=1.0)
    w0 = target.weight[:, :P]
    w = w0 + edit.result.deltas[target.key][:, :P]
    assert float((w @ pc[0] - w0 @ pa[0]).norm()) < 1e-4 * float((w0 @ (pc - pa)[0]).norm())
    assert float(((w - w0) @ pp.T).norm()) < 1e-4 * float((w0 @ pp.T).norm())


def test_pooled_probe_is_the_adversarial_pooled_vector():
    target = _pooled(12)
    pc, pa = _rand(2, P, seed=13), _rand(1, P, seed=14)
    edit = edit_pooled_input(target, pc, pa, None, lambda_reg=0.05, probe=True)
    w0 = target.weight[:, :P]
    w1 = w0 + edit.result.deltas[target.key][:, :P]
    for i, row in enumerate(edit.result.probe):
        want = torch.linalg.solve(0.05 * torch.eye(P, dtype=F64) + w1.T @ w1, w1.T @ w0 @ pc[i])
        torch.testing.assert_close(row[0], want, rtol=1e-9, atol=1e-12)


def test_pooled_input_errors():
    target = _pooled()
    with pytest.raises(ValueError, match=r"expected pooled text vectors \[n, 12\]"):
        edit_pooled_input(target, _rand(1, P + 1, seed=1), _rand(1, P, seed=2), None)
    with pytest.raises(ValueError, match="expected one vector"):
        edit_pooled_input(target, _rand(1, P, seed=1), _rand(2, P, seed=2), None)
    with pytest.raises(ValueError, match="pooled columns"):
        edit_pooled_input(PooledInput("w", _rand(4, 8, seed=0), 9), _rand(1, 9, seed=1), _rand(1, 9, seed=2), None)
    with pytest.raises(ValueError, match="NaN"):
        edit_pooled_input(target, torch.full((1, P), float("nan"), dtype=F64), _rand(1, P, seed=2), None)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="pooled_lambda must be"):
            RECESettings(concepts=["a"], pooled_lambda=bad)


def _kv_weights(seed: int, ctx: int = 16) -> dict[str, torch.Tensor]:
    return {f"b{i}.to_{'kv'[i % 2]}": _rand(o, ctx, seed=seed + i) for i, o in enumerate((8, 8, 24, 24))}


def test_low_rank_deltas_and_the_factor_aware_leak_probe():
    """LowRankDeltas reads up @ down and measures ||dW|| from the factors; leak_probe on them (weights sharing one
    down factor, summed before it is applied) equals leak_probe on the same deltas held densely."""
    weights = _kv_weights(20)
    concept, anchor = _rand(5, 16, seed=30), _rand(5, 16, seed=31)
    start = uce_start([concept], [3], anchor, 2, preserve=[anchor])
    for epochs, rows in ((0, 3), (1, 8), (3, 18)):  # 18 rows >= ctx 16: stored whole as (dW, I)
        res = rece_edit(weights, concept, anchor, anchor, start=start, epochs=epochs, lambda_reg=1e-2)
        deltas = res.deltas
        assert isinstance(deltas, LowRankDeltas) and set(deltas) == set(weights)
        for k in weights:
            up, down = res.factors[k]
            assert deltas.is_dense(k) is (rows >= 16)
            dense = up if deltas.is_dense(k) else up @ down
            assert torch.equal(deltas[k], dense)
            assert deltas.norm_sq(k) == pytest.approx(float(dense.pow(2).sum()), rel=1e-10)
        enc = torch.stack([concept, anchor])
        fast = leak_probe(weights, deltas, enc, 1e-2)
        plain = leak_probe(weights, {k: deltas[k] for k in weights}, enc, 1e-2)
        torch.testing.assert_close(fast, plain, rtol=1e-9, atol=1e-10)
        if epochs:
            probe = rece_edit(weights, concept, anchor, anchor, start=start, epochs=epochs, lambda_reg=1e-2,
                              probe=True).probe
            torch.testing.assert_close(probe[0], fast[0], rtol=1e-8, atol=1e-9)


class _Host:
    """A plain RECE host: random token encodings per text, optionally a pooled input."""

    def __init__(self, pooled: PooledInput | None) -> None:
        self.weights = _kv_weights(40)
        self.pooled = pooled
        self.asked: list[list[str]] = []

    @staticmethod
    def _seed(text: str) -> int:
        return sum(map(ord, text)) + 7 * len(text)

    def encode(self, texts):
        return torch.stack([_rand(5, 16, seed=self._seed(t)) for t in texts]), [3] * len(texts)

    def projection_weights(self):
        return self.weights

    def encode_pooled(self, texts):
        self.asked.append(list(texts))
        return torch.cat([_rand(1, P, seed=1000 + self._seed(t)) for t in texts])

    def pooled_input(self):
        return self.pooled


def test_run_rece_edits_the_pooled_input_only_where_there_is_one():
    settings = RECESettings(concepts=["a cat"], preserve=["", "a dog"], method="rece", epochs=2, lambda_reg=1e-2)
    with_pooled = _Host(_pooled(50))
    run = run_rece(with_pooled, settings, probe=True)
    assert run.pooled is not None and run.pooled_note == ""
    assert with_pooled.asked == [["a cat"], [""], ["", "a dog"]]
    # UCE only on the pooled path: the same as the method 'uce' run, whatever the epochs
    uce = run_rece(_Host(_pooled(50)), RECESettings(concepts=["a cat"], preserve=["", "a dog"], method="uce"))
    key = run.pooled.key
    torch.testing.assert_close(run.pooled.result.deltas[key], uce.pooled.result.deltas[key], rtol=0, atol=0)
    assert run.pooled.result.probe is not None and len(run.probe) == 1
    assert set(run.changes) == set(with_pooled.weights)

    none = run_rece(_Host(None), settings)
    assert none.pooled is None and "no pooled text vector" in none.pooled_note
    off = run_rece(_Host(_pooled(50)), RECESettings(concepts=["a cat"], edit_pooled=False))
    assert off.pooled is None and "edit_pooled is off" in off.pooled_note
    for k in settings_keys(none):
        torch.testing.assert_close(none.result.deltas[k], run.result.deltas[k], rtol=0, atol=0)


def settings_keys(run) -> list[str]:
    return list(run.result.deltas)
