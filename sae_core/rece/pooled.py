"""The pooled text input of SDXL-type UNets: the UCE / RECE closed form on the ADM layer's pooled columns.

SDXL reads a prompt twice. The token states go through every cross-attention (the ``attn2.to_k`` / ``to_v`` that
UCE and RECE edit); clip_g's pooled vector ``p`` (width ``P``) goes into the ADM input ``y = [p, s]`` (``s``: the
size and crop embeddings), whose first layer (``label_emb.0.0``, weight ``W1 [d_emb, P + |s|]``) feeds the time
embedding added in every residual block::

    W1 y = W1[:, :P] p + W1[:, P:] s

An edit of the cross-attention leaves ``W_p = W1[:, :P]`` as it is, so the concept still reaches the UNet through
``p``. The same closed form applies to ``W_p`` with one row per prompt (its pooled vector): the UCE objective
``s_e ||W_p p_c - W_p0 p_a||^2 + s_p sum_j ||(W_p - W_p0) p_j||^2 + lam ||W_p - W_p0||_F^2`` (concept pooled vectors
``p_c`` to the anchor's ``p_a``, preserve prompts' ``p_j`` kept), solved by
:func:`~sae_core.rece.epochs.rece_edit` on the one weight ``W_p``. The size columns are never changed.

The ridge. UCE's ``lam`` is absolute, so its strength depends on the rows' norms; a pooled vector has its own scale
(one row per prompt, not 77), so the pooled edit's ridge is ``pooled_lambda`` times the mean squared norm of the
pooled vectors involved (concepts, anchor, preserve prompts): the same setting edits as strongly whatever the text
encoder's scale. At ``pooled_lambda -> 0`` a concept with no preserve vector in its way maps exactly to the anchor.

RECE's epochs do not run on the pooled path: UCE only. Their adversarial objective over the whole conditioning
splits into a token part and a pooled part (no layer reads both), so they could: ``q' = argmin ||W_p' q - W_p p_c||^2 +
lambda_reg ||q||^2``. But ``W_p`` is one layer at least as tall as it is wide (SDXL: 1280 x 1280), so ``q'`` is an
exact preimage of the concept's old output, pushed further along ``p_c - p_a`` after every edit, and erasing it moves
every other prompt's pooled output with it: on the tiny SDXL pair of the tests
(``tests/comfy/test_rece_sdxl.py::test_why_the_pooled_path_takes_no_rece_epochs``) the preserve prompts' pooled
contribution moved by 0.4-1.4 % with the UCE edit alone, 12-13 % after one epoch and 45-49 % after three. The
adversarial pooled vector is still computed, as the leak probe's pooled part (``PooledEdit.result.probe``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .closed_form import COMPUTE_DTYPE, LowRankDeltas, _check_scale
from .epochs import RECEConfig, RECEResult, UCEStart, rece_edit

__all__ = ["PooledEdit", "PooledInput", "edit_pooled_input", "pooled_rows"]


class PooledInput(NamedTuple):
    """Where a model reads the pooled text vector: the first ADM layer and how many of its input columns."""

    key: str
    """Name of the weight (ComfyUI: ``diffusion_model.label_emb.0.0.weight``)."""
    weight: Tensor
    """The whole weight ``W1 [d_emb, adm_in]`` (not modified)."""
    columns: int
    """The first ``columns`` inputs of ``W1`` are the pooled text vector (SDXL: clip_g's projection width)."""


class PooledEdit(NamedTuple):
    """The UCE edit of the pooled columns, as a delta of the whole weight (zero outside the pooled columns)."""

    key: str
    """The edited weight's name."""
    columns: int
    """Width ``P`` of the pooled vector."""
    result: RECEResult
    """Deltas and factors of the whole weight ``[d_emb, adm_in]`` (``down`` zero outside the first ``P`` columns);
    ``probe[concept]`` (with ``probe=True``) is each concept's adversarial pooled vector ``[1, P]`` against the
    edited weight: what would still bring the concept back through the pooled path."""
    relative_change: float
    """``||dW_p||_F / ||W_p||_F`` over the pooled columns."""
    ridge: float
    """The absolute ridge used: ``pooled_lambda`` times the mean squared norm of the pooled vectors."""


def pooled_rows(name: str, vectors: Tensor, width: int) -> Tensor:
    """Validate pooled vectors ``[n, width]`` (``[width]`` is one vector) and return them as float64."""
    if isinstance(vectors, Tensor) and vectors.dim() == 1:
        vectors = vectors[None]
    if not isinstance(vectors, Tensor) or vectors.dim() != 2 or vectors.shape[1] != width:
        shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        raise ValueError(f"{name}: expected pooled text vectors [n, {width}] (the width the model's ADM input reads "
                         f"as pooled text), got {shape}; use the text encoder that belongs to this model")
    out = vectors.detach().to(COMPUTE_DTYPE)
    if not torch.isfinite(out).all():
        raise ValueError(f"{name}: the pooled vectors contain NaN or Inf")
    return out


def _pad_columns(result: RECEResult, width: int, total: int) -> RECEResult:
    """The factors of the pooled block as factors of the whole weight: ``down`` gets zero columns ``width..total``.

    A block stored whole as ``(dW_p, I)`` becomes ``(dW_p, [I 0])``: still exact, and narrower than the weight.
    """
    factors = {}
    for name, (up, down) in result.factors.items():
        pad = torch.zeros(down.shape[0], total - width, dtype=down.dtype, device=down.device)
        factors[name] = (up, torch.cat([down, pad], dim=1))
    return RECEResult(LowRankDeltas(factors), factors, result.adversarial, result.probe)


@torch.no_grad()
def edit_pooled_input(
    pooled: PooledInput,
    concepts: Tensor,
    anchor: Tensor,
    preserve: Optional[Tensor],
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    pooled_lambda: float = 1e-3,
    lambda_reg: float = 1e-3,
    variant: str = "regularized",
    probe: bool = False,
) -> PooledEdit:
    """The UCE edit of ``pooled``'s columns (module docstring).

    Args:
        pooled: the ADM weight and its pooled width ``P``.
        concepts: the concepts' pooled vectors ``[k, P]``, each mapped to the anchor's.
        anchor: the anchor's pooled vector ``[P]`` or ``[1, P]``.
        preserve: the preserve prompts' pooled vectors ``[m, P]``, or ``None``.
        erase_scale, preserve_scale: ``s_e`` and ``s_p`` (the UCE edit's).
        pooled_lambda: the ridge as a fraction of the mean squared norm of all the given pooled vectors.
        lambda_reg, variant: the adversarial pooled vector's objective (only with ``probe``).
        probe: also compute each concept's adversarial pooled vector against the edited weight.
    """
    weight = pooled.weight
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"pooled input {pooled.key!r}: expected a 2-D weight, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    width, total = int(pooled.columns), int(weight.shape[1])
    if not 0 < width <= total:
        raise ValueError(f"pooled input {pooled.key!r}: {width} pooled columns of a weight with {total} inputs")
    lam_rel = _check_scale("pooled_lambda", pooled_lambda)
    device = weight.device
    pc = pooled_rows("concept pooled vectors", concepts, width).to(device)
    pa = pooled_rows("anchor pooled vector", anchor, width).to(device)
    if pa.shape[0] != 1:
        raise ValueError(f"anchor pooled vector: expected one vector, got {pa.shape[0]}")
    pp = pooled_rows("preserve pooled vectors", preserve, width).to(device) if preserve is not None else None
    every = torch.cat([pc, pa] + ([pp] if pp is not None else []))
    ridge = lam_rel * float(every.pow(2).sum(dim=1).mean())
    block = {pooled.key: weight.detach()[:, :width]}
    start = UCEStart(pc, pa.expand(pc.shape[0], -1), pp, erase_scale, preserve_scale, ridge)
    config = RECEConfig(epochs=0, lambda_reg=lambda_reg, variant=variant)
    result = rece_edit(block, list(pc[:, None, :]), pa, pp, config, start=start, probe=probe)
    deltas = result.deltas
    num = deltas.norm_sq(pooled.key) if isinstance(deltas, LowRankDeltas) else float(
        deltas[pooled.key].double().pow(2).sum())
    den = float(block[pooled.key].double().pow(2).sum())
    change = (num / den) ** 0.5 if den > 0 else 0.0
    return PooledEdit(pooled.key, width, _pad_columns(result, width, total), change, ridge)
