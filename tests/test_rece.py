"""RECE driver: checked against a plain layer-by-layer loop (float64, small shapes)."""

from __future__ import annotations

import pytest
import torch

from sae_core.rece.closed_form import adversarial_map, uce_edit, uce_solve_reference
from sae_core.rece import (
    RECE_PRESETS,
    RECEConfig,
    UCEStart,
    last_token_row,
    rece_edit,
    rece_token_rows,
    token_count,
    uce_preserve_scale,
    uce_start,
    uce_token_rows,
)

F64 = torch.float64
CTX = 40
L = 9  # prompt length (77 for SD)
OUTS = (12, 12, 24, 24, 36, 36)  # stacked 144 rows: full column rank


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"b{i}.attn2.to_{'kv'[i % 2]}": torch.randn(o, CTX, generator=gen, dtype=F64) for i, o in enumerate(OUTS)}


def _enc(seed: int, n: int = L) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, CTX, generator=gen, dtype=F64)


def _plain_rece(weights, concepts, anchor, preserve, cfg: RECEConfig, start=None, refs=None):
    """Straightforward RECE: explicit weights, explicit map M per epoch, one plain solve per matrix."""
    current = dict(weights)
    if start is not None:
        current = {n: uce_solve_reference(w, start.erase_rows, start.anchor_rows @ w.T, start.preserve_rows,
                                          erase_scale=start.erase_scale, preserve_scale=start.preserve_scale,
                                          lam=start.lam) for n, w in current.items()}
    s_p = cfg.preserve_scale * (len(concepts) if cfg.repeat_preserve_per_concept else 1)
    history = []
    for _ in range(cfg.epochs):
        amap = adversarial_map(current, weights, cfg.lambda_reg, cfg.variant)
        adv = [amap.apply(c, None if amap.reference is None else (refs or [anchor] * len(concepts))[i])
               for i, c in enumerate(concepts)]
        history.append(adv)
        erase = torch.cat(adv)
        anchors = torch.cat([anchor] * len(concepts))
        current = {n: uce_solve_reference(w, erase, anchors @ w.T, preserve, erase_scale=cfg.erase_scale,
                                          preserve_scale=s_p, lam=cfg.lam) for n, w in current.items()}
    return {n: current[n] - weights[n] for n in weights}, history


def _close(a, b, rel=1e-9):
    return float((a - b).norm()) <= rel * max(float(b.norm()), 1e-300)


@pytest.mark.parametrize("variant", ["regularized", "reference", "surrogate_both"])
@pytest.mark.parametrize("num_concepts", [1, 2])
def test_rece_matches_plain_loop(variant, num_concepts):
    weights = _weights()
    concepts = [_enc(10 + i) for i in range(num_concepts)]
    anchor, preserve = _enc(20), torch.cat([_enc(21), _enc(22)])
    start = UCEStart(_enc(30, 6), _enc(31, 6), _enc(32), preserve_scale=1.0, lam=0.5)
    cfg = RECEConfig(epochs=3, lambda_reg=0.05, variant=variant)
    res = rece_edit(weights, concepts, anchor, preserve, cfg, start=start)
    expect, history = _plain_rece(weights, concepts, anchor, preserve, cfg, start=start)
    for name in weights:
        assert _close(res.deltas[name], expect[name]), name
        up, down = res.factors[name]
        assert down.shape[0] == min(6 + 3 * L * num_concepts, CTX)  # every erase row, no truncation
        assert int(torch.linalg.matrix_rank(res.deltas[name])) <= 6 + 3 * L * num_concepts
        assert _close(up @ down, res.deltas[name], 1e-10)
    for got, want in zip(res.adversarial, history):
        for g, w in zip(got, want):
            assert _close(g, w)


def test_rece_without_prior_edit_and_vanishing_lambda_keeps_concept_rows():
    weights = _weights(1)
    concept, anchor = _enc(40), _enc(41)
    for lr, tol in ((0.0, 1e-10), (1e-9, 1e-7)):
        res = rece_edit(weights, concept, anchor, None, epochs=1, lambda_reg=lr)
        assert _close(res.adversarial[0][0], concept, tol)
        # ... and the epoch is then a UCE erase of the concept rows themselves
        uce = uce_edit(weights, concept, anchor, None, erase_scale=1.0, lam=0.1)
        for name in weights:
            assert _close(res.deltas[name], uce.deltas[name], 1e-6)
    shrunk = rece_edit(weights, concept, anchor, None, epochs=1, lambda_reg=50.0).adversarial[0][0]
    assert float(shrunk.norm()) < float(concept.norm())


def test_regularized_and_reference_variants_differ_only_in_the_embedding_offset():
    weights = _weights(2)
    concept, anchor, preserve = _enc(50), _enc(51), _enc(52)
    start = UCEStart(_enc(53, 5), _enc(54, 5), _enc(55))
    reg = rece_edit(weights, concept, anchor, preserve, epochs=1, lambda_reg=0.3, start=start)
    ref = rece_edit(weights, concept, anchor, preserve, epochs=1, lambda_reg=0.3, start=start, variant="reference")
    # same starting weights, so c'_ref - c'_reg = lr (lr I + sum W'^T W')^-1 t with t = the anchor rows
    current = {n: w + uce_edit({n: w}, start.erase_rows, start.anchor_rows, start.preserve_rows).deltas[n]
               for n, w in weights.items()}
    stacked = torch.cat(list(current.values()))
    h = 0.3 * torch.eye(CTX, dtype=F64) + stacked.T @ stacked
    offset = 0.3 * torch.linalg.solve(h, anchor.T).T
    assert _close(ref.adversarial[0][0] - reg.adversarial[0][0], offset, 1e-8)
    assert any(not _close(ref.deltas[n], reg.deltas[n], 1e-6) for n in weights)
    # with zero reference rows the variants coincide
    zero = rece_edit(weights, concept, anchor, preserve, epochs=1, lambda_reg=0.3, start=start, variant="reference",
                     reference_rows=torch.zeros_like(anchor))
    for n in weights:
        assert _close(zero.deltas[n], reg.deltas[n], 1e-10)


def test_repeat_preserve_per_concept_scales_the_preserve_term():
    weights = _weights(3)
    concepts = [_enc(60), _enc(61), _enc(62)]
    anchor, preserve = _enc(63), _enc(64)
    quirk = rece_edit(weights, concepts, anchor, preserve, epochs=2, repeat_preserve_per_concept=True)
    scaled = rece_edit(weights, concepts, anchor, preserve, epochs=2, preserve_scale=0.3)
    plain = rece_edit(weights, concepts, anchor, preserve, epochs=2)
    for n in weights:
        assert _close(quirk.deltas[n], scaled.deltas[n], 1e-10)
        assert not _close(quirk.deltas[n], plain.deltas[n], 1e-4)
    single = [concepts[0]]
    a = rece_edit(weights, single, anchor, preserve, epochs=2, repeat_preserve_per_concept=True)
    b = rece_edit(weights, single, anchor, preserve, epochs=2)
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in weights)


def test_start_from_prior_edit_equals_inline_uce_start():
    weights = _weights(4)
    concept, anchor, preserve = _enc(70), _enc(71), _enc(72)
    start = UCEStart(_enc(73, 4), _enc(74, 4), _enc(75), preserve_scale=1.0, lam=0.5)
    inline = rece_edit(weights, concept, anchor, preserve, epochs=2, start=start)
    prior = uce_edit(weights, start.erase_rows, start.anchor_rows, start.preserve_rows, lam=0.5)
    chained = rece_edit(weights, concept, anchor, preserve, epochs=2, start=prior)
    for n in weights:
        assert _close(chained.deltas[n], inline.deltas[n], 1e-9)
        up, down = chained.factors[n]
        assert _close(up @ down, chained.deltas[n], 1e-10)
    # zero epochs: just the start
    only = rece_edit(weights, concept, anchor, preserve, epochs=0, start=start)
    for n in weights:
        assert _close(only.deltas[n], prior.deltas[n], 1e-10)
    assert only.adversarial == []


def test_factor_width_never_exceeds_context_width():
    weights = _weights(5)
    concept, anchor = _enc(80, 12), _enc(81, 12)
    res = rece_edit(weights, concept, anchor, None, epochs=5)  # 60 erase rows > ctx = 40
    expect, _ = _plain_rece(weights, [concept], anchor, None, RECEConfig(epochs=5))
    for n in weights:
        up, down = res.factors[n]
        assert down.shape[0] <= CTX
        assert _close(up @ down, res.deltas[n], 1e-10)
        assert _close(res.deltas[n], expect[n], 1e-9)


def test_output_dtype_follows_weights():
    weights = {n: w.float() for n, w in _weights(6).items()}
    res = rece_edit(weights, _enc(90).float(), _enc(91).float(), None, epochs=1)
    assert all(d.dtype == torch.float32 for d in res.deltas.values())
    assert all(u.dtype == torch.float32 and v.dtype == torch.float32 for u, v in res.factors.values())
    assert res.adversarial[0][0].dtype == F64


def test_token_position_helpers():
    concept, anchor = _enc(100), _enc(101)
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0])  # BOS, two words, EOS
    assert token_count(mask) == 4 and token_count(3) == 3
    erase, anchor_rows = uce_token_rows(concept, mask, anchor, 2)  # anchor " ": BOS, EOS
    # last word (position 2) <-> anchor BOS (position 0), then EOS <-> EOS, pad <-> pad
    assert erase.shape == anchor_rows.shape == (L - 2, CTX)
    assert torch.equal(erase, concept[2:]) and torch.equal(anchor_rows, anchor[0:L - 2])
    assert torch.equal(last_token_row(concept, mask), concept[2:3])
    assert torch.equal(rece_token_rows(concept[None]), concept)
    start = uce_start([concept, _enc(102)], [mask, 3], anchor, 2, preserve=[anchor])
    assert start.erase_rows.shape == ((L - 2) + (L - 1), CTX)  # concept 2 has one word: final index 1
    assert torch.equal(start.anchor_rows[L - 2:], anchor[:L - 1])
    assert start.preserve_rows.shape == (L, CTX) and start.preserve_scale == 1.0 and start.lam == 0.5
    assert uce_preserve_scale(1) == 1.0 and uce_preserve_scale(1734) == 0.1
    with pytest.raises(ValueError, match="token count"):
        token_count(1)
    with pytest.raises(ValueError, match="shape"):
        uce_token_rows(concept, 3, _enc(103, L + 1), 2)


def test_presets_and_input_errors():
    assert RECE_PRESETS["nudity"].epochs == 3 and RECE_PRESETS["nudity"].lambda_reg == 0.1
    assert RECE_PRESETS["artist"].lambda_reg == 1e-3
    weights = _weights(7)
    concept, anchor = _enc(110), _enc(111)
    with pytest.raises(ValueError, match="variant"):
        rece_edit(weights, concept, anchor, variant="nope")
    with pytest.raises(ValueError, match="unknown setting"):
        rece_edit(weights, concept, anchor, epoch=3)
    with pytest.raises(ValueError, match="reference_rows"):
        rece_edit(weights, concept, anchor, reference_rows=anchor)
    with pytest.raises(ValueError, match="anchor_rows"):
        rece_edit(weights, concept, _enc(112, L + 1))
    with pytest.raises(ValueError, match="epochs"):
        rece_edit(weights, concept, anchor, epochs=-1)
    with pytest.raises(ValueError, match="start"):
        rece_edit(weights, concept, anchor, start="uce")
    with pytest.raises(ValueError, match="concept_rows"):
        rece_edit(weights, torch.zeros(L, CTX + 1, dtype=F64), anchor)
