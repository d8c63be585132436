"""The exact EWC penalty on LoRA deltas against dense and analytic references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sae_core.amnesia.ewc import ewc_backward, ewc_penalty, fisher_key, prepare_fisher
from sae_core.amnesia.lora import LoRAConv2d, LoRALinear

LAM = 50.0


def make_loras(seed: int = 0) -> dict:
    """A Linear and two Conv LoRAs with non-zero B, named like SD layers."""
    torch.manual_seed(seed)
    loras = {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k": LoRALinear(nn.Linear(6, 5), rank=3, alpha=1.5),
        "input_blocks.1.0.in_layers.2": LoRAConv2d(nn.Conv2d(4, 3, 3, padding=1), rank=2, alpha=4.0),
        "input_blocks.1.1.proj_in": LoRAConv2d(nn.Conv2d(4, 4, 1), rank=2, alpha=2.0),
    }
    with torch.no_grad():
        for layer in loras.values():
            layer.up.normal_()
    return loras


def make_fisher(loras: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {fisher_key(n): torch.rand(l.base.weight.shape, generator=g) * 3 for n, l in loras.items()}


def dense_delta(layer) -> torch.Tensor:
    """dW written out element-wise, independently of LoRALayer.delta_weight."""
    return layer.scale * torch.einsum("or,r...->o...", layer.up.flatten(1), layer.down)


def grads(loras: dict) -> list:
    return [t.grad.clone() for l in loras.values() for t in (l.up, l.down)]


def zero_grads(loras: dict) -> None:
    for l in loras.values():
        l.up.grad = None
        l.down.grad = None


def test_penalty_equals_brute_force_sum():
    loras = make_loras()
    fisher = make_fisher(loras)
    brute = 0.0
    for name, layer in loras.items():
        dw = dense_delta(layer).detach().double()
        f = fisher[fisher_key(name)].double()
        for idx in range(dw.numel()):  # literally sum_i F_i * dW_i^2
            brute += float(f.reshape(-1)[idx] * dw.reshape(-1)[idx] ** 2)
    p = ewc_penalty(loras, fisher, LAM)
    assert p.dtype == torch.float32 and p.dim() == 0
    assert p.item() == pytest.approx(LAM * brute, rel=1e-5)  # no 1/2 factor


def test_gradient_matches_dense_autograd_and_analytic_forms():
    loras = make_loras()
    fisher = make_fisher(loras)
    ewc_penalty(loras, fisher, LAM).backward()
    got = grads(loras)

    # (a) autograd through a dense delta built element-wise.
    zero_grads(loras)
    dense = sum((fisher[fisher_key(n)] * dense_delta(l) ** 2).sum() for n, l in loras.items())
    (LAM * dense).backward()
    for a, b in zip(got, grads(loras)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # (b) dP/dB = 2 lam s (F*dW) A^T and dP/dA = 2 lam s B^T (F*dW), with flattened factors.
    analytic = []
    for n, l in loras.items():
        with torch.no_grad():
            a2, b2 = l.down.flatten(1), l.up.flatten(1)
            fdw = (fisher[fisher_key(n)] * dense_delta(l)).flatten(1)
            analytic.append((2 * LAM * l.scale * fdw @ a2.T).reshape(l.up.shape))
            analytic.append((2 * LAM * l.scale * b2.T @ fdw).reshape(l.down.shape))
    for a, b in zip(got, analytic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layer_by_layer_backward_equals_one_backward():
    loras = make_loras()
    fisher = make_fisher(loras)
    p = ewc_penalty(loras, fisher, LAM)
    p.backward()
    one = grads(loras)
    zero_grads(loras)
    value = ewc_backward(loras, fisher, LAM)
    torch.testing.assert_close(value, p.detach(), rtol=1e-6, atol=0)
    for a, b in zip(one, grads(loras)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Grads accumulate like .backward(): a second call doubles them.
    ewc_backward(loras, fisher, LAM)
    for a, b in zip(one, grads(loras)):
        torch.testing.assert_close(2 * a, b, rtol=1e-6, atol=1e-7)


def test_zero_init_gives_zero_penalty_and_zero_grads():
    torch.manual_seed(0)
    loras = {"a.to_k": LoRALinear(nn.Linear(6, 5), rank=2), "b.conv": LoRAConv2d(nn.Conv2d(3, 4, 3), rank=2)}
    fisher = make_fisher(loras)
    p = ewc_penalty(loras, fisher, LAM)
    assert p.item() == 0.0
    p.backward()
    assert all(torch.count_nonzero(g) == 0 for g in grads(loras))


def test_fisher_lookup_errors_and_preparation():
    loras = make_loras()
    fisher = make_fisher(loras)
    # Other key spellings are accepted: module name, module.weight.
    name = next(iter(loras))
    alt = dict(fisher)
    alt[name + ".weight"] = alt.pop(fisher_key(name))
    assert ewc_penalty(loras, alt, LAM).item() == pytest.approx(ewc_penalty(loras, fisher, LAM).item(), rel=1e-6)

    missing = dict(fisher)
    del missing[fisher_key("input_blocks.1.0.in_layers.2")]
    with pytest.raises(KeyError, match="input_blocks.1.0.in_layers.2"):
        ewc_penalty(loras, missing, LAM)
    wrong = dict(fisher)
    wrong[fisher_key("input_blocks.1.1.proj_in")] = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"input_blocks\.1\.1\.proj_in.*shape"):
        ewc_backward(loras, wrong, LAM)

    prepared = prepare_fisher(loras, fisher)
    assert set(prepared) == set(loras)
    assert ewc_penalty(loras, prepared, LAM).item() == pytest.approx(ewc_penalty(loras, fisher, LAM).item(), rel=1e-6)
    bf16 = prepare_fisher(loras, fisher, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in bf16.values())
    assert ewc_penalty(loras, bf16, LAM).item() == pytest.approx(ewc_penalty(loras, fisher, LAM).item(), rel=2e-2)
    with pytest.raises(ValueError, match="float16"):
        prepare_fisher(loras, fisher, dtype=torch.float16)


def test_penalty_is_computed_in_fp32_for_bf16_factors():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), rank=4, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.up.normal_()
    f = torch.rand(8, 8)
    p = ewc_penalty({"x": layer}, {"x": f}, 1.0)
    assert p.dtype == torch.float32
    # Reference in fp32 from the same bf16 factors (einsum in bf16 would round).
    ref = (f * (layer.scale * layer.up.float() @ layer.down.float()) ** 2).sum()
    assert p.item() == pytest.approx(ref.item(), rel=1e-5)
