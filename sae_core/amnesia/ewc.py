"""The exact EWC penalty of Selective Amnesia on LoRA deltas.

With a LoRA, theta - theta* = dW = s * B @ A exactly (the frozen base is theta*), so the
diagonal-Fisher EWC term is, without approximation,

    P = lam * sum_layers sum_ij F_ij * dW_ij ** 2

with no 1/2, as in the reference code (its lam = 50 goes with this form). Only the LoRA
target weights change, so F is needed only for them. Gradients (autograd gives these):

    dP/dB = 2 * lam * s * (F * dW) @ A^T        dP/dA = 2 * lam * s * B^T @ (F * dW)

(for LoCon, A and B flattened to [r, in*kh*kw] and [out, r]). The penalty assumes the
LoRA is applied at strength 1.

Fisher tensors are looked up for each LoRA module ``m`` under ``m``, ``m.weight``,
``diffusion_model.m.weight`` and ``diffusion_model.m``; the canonical key written by
``sae_core.fisher`` is ``diffusion_model.<module>.weight``. Call :func:`prepare_fisher`
once before training so F sits on the right device and is validated once, instead of
being matched and copied at every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import torch

from .lora import UNET_PREFIX, LoRALayer

__all__ = ["fisher_key", "fisher_candidates", "prepare_fisher", "ewc_penalty", "ewc_backward"]


def fisher_key(module_name: str, prefix: str = UNET_PREFIX) -> str:
    """Canonical Fisher key of a module: ``diffusion_model.<module>.weight``."""
    name = module_name if (not prefix or module_name.startswith(prefix)) else prefix + module_name
    return name + ".weight"


def fisher_candidates(module_name: str, prefix: str = UNET_PREFIX) -> list[str]:
    """Keys under which the Fisher of ``module_name`` may be stored, most specific first."""
    cands = [module_name, module_name + ".weight", fisher_key(module_name, prefix)]
    if prefix and not module_name.startswith(prefix):
        cands.append(prefix + module_name)
    if prefix and module_name.startswith(prefix):
        rel = module_name[len(prefix):]
        cands += [rel + ".weight", rel]
    seen: list[str] = []
    for c in cands:
        if c not in seen:
            seen.append(c)
    return seen


def _weight_shape(layer: LoRALayer) -> tuple[int, ...]:
    """Shape of the adapted base weight: a wrapper's ``base.weight``, or ``weight_shape`` for
    factors applied as a weight function (:class:`sae_core.lora.LoRADelta`)."""
    shape = getattr(layer, "weight_shape", None)
    return tuple(shape) if shape is not None else tuple(layer.base.weight.shape)


def _lookup(name: str, layer: LoRALayer, fisher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    for key in fisher_candidates(name):
        if key in fisher:
            f = fisher[key]
            break
    else:
        raise KeyError(
            f"no Fisher information for LoRA target {name!r} (looked for {fisher_candidates(name)}); "
            "the Fisher must cover every LoRA target -- compute it for these targets or pick targets it covers"
        )
    shape = _weight_shape(layer)
    if tuple(f.shape) != shape:
        raise ValueError(f"Fisher for LoRA target {name!r} has shape {tuple(f.shape)}, but the base weight has shape {shape}")
    return f


def prepare_fisher(
    loras: Mapping[str, LoRALayer],
    fisher: Mapping[str, torch.Tensor],
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Match, validate and place the Fisher once: ``{LoRA name: F}`` on ``device`` in ``dtype``.

    Args:
        device: default: the device of each LoRA's factors.
        dtype: fp32 (default) or bf16. fp16 is refused: small Fisher values underflow.

    Raises:
        KeyError: a LoRA target has no Fisher entry (the message names it).
        ValueError: a shape mismatch, or fp16.
    """
    if dtype == torch.float16:
        raise ValueError("Fisher dtype float16 is refused: small Fisher values underflow; use float32 or bfloat16")
    out = {}
    for name, layer in loras.items():
        f = _lookup(name, layer, fisher)
        out[name] = f.detach().to(device if device is not None else layer.down.device, dtype)
    return out


def _layer_term(name: str, layer: LoRALayer, fisher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    f = _lookup(name, layer, fisher)
    dw = layer.delta_weight(torch.float32)
    if f.device != dw.device:
        f = f.to(dw.device)
    return (f.float() * dw.square()).sum()


def ewc_penalty(
    loras: Mapping[str, LoRALayer],
    fisher: Mapping[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """``lam * sum_layers sum F * (s B A)^2`` as a differentiable fp32 scalar.

    Every materialised dW stays alive until backward; use :func:`ewc_backward` to
    back-propagate layer by layer when memory is tight.
    """
    total: Optional[torch.Tensor] = None
    for name, layer in loras.items():
        term = _layer_term(name, layer, fisher)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return lam * total


def ewc_backward(
    loras: Mapping[str, LoRALayer],
    fisher: Mapping[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """Accumulate the gradient of :func:`ewc_penalty` into ``.grad`` one layer at a time.

    Each layer's dW is built, back-propagated and freed before the next, so at most one
    dW is alive. The gradients equal those of ``ewc_penalty(...).backward()``.

    Returns:
        The penalty value (detached fp32 scalar), for logging.
    """
    total: Optional[torch.Tensor] = None
    for name, layer in loras.items():
        term = lam * _layer_term(name, layer, fisher)
        if term.requires_grad:
            term.backward()
        total = term.detach() if total is None else total + term.detach()
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return total
