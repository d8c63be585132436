"""ItD's "interpret" step: which SAE features stand for a concept.

For one prompt ``p`` encoded on its own (in the deployment padding convention) the SAE code of the
hooked layer is reduced to ``a(p) = max over positions 1..EOS`` of every latent (position 0, the
BOS token, is the same vector for every prompt under the causal mask and carries no concept).
``Top_n(p)`` are the ``n`` latents with the largest ``a(p)``, keeping only latents with
``a(p) > 0``: a short prompt activates fewer than ``n`` latents, and a plain top-n would then
return zero-valued latents with arbitrary tie-broken indices (the reference's "junk features").

A concept's features are ``union_{p in targets} Top_n(p) minus union_{r in retain} Top_n(r)``;
several concepts are combined by the union of their feature sets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .steering import SaeMath

__all__ = [
    "ConceptFeatures",
    "max_latent_activations",
    "prompt_top_features",
    "select_features",
    "top_features",
    "union",
]


@torch.no_grad()
def max_latent_activations(
    math: SaeMath,
    hidden: Tensor,
    content_mask: Tensor | None = None,
    skip_positions: int = 1,
) -> Tensor:
    """``a(p)``: per prompt, the maximum of every latent over the counted positions, ``[B, n]`` fp32.

    Counted positions are ``skip_positions..`` (default: everything but BOS), restricted to
    ``content_mask`` (BOS..EOS) when it is given.
    """
    if hidden.dim() != 3:
        raise ValueError(f"expected a [batch, tokens, width] residual, got shape {tuple(hidden.shape)}")
    b, length, _ = hidden.shape
    acts, idx = math.encode(hidden)
    keep = torch.ones(b, length, dtype=torch.bool, device=acts.device)
    keep[:, :skip_positions] = False
    if content_mask is not None:
        keep &= content_mask.to(device=acts.device, dtype=torch.bool)
    acts = torch.where(keep[..., None], acts, torch.zeros_like(acts)).clamp_min(0.0)
    out = torch.zeros(b, math.num_latents, dtype=torch.float32, device=acts.device)
    return out.scatter_reduce(1, idx.reshape(b, -1), acts.reshape(b, -1), reduce="amax", include_self=True)


def top_features(activations: Tensor, n: int) -> Tensor:
    """The (at most) ``n`` latents with the largest activation in ``activations [num_latents]``,
    restricted to activations ``> 0``, ordered by decreasing activation (int64)."""
    if n <= 0:
        raise ValueError(f"top_n must be positive, got {n}")
    values, idx = activations.topk(min(int(n), activations.numel()))
    return idx[values > 0].cpu()


def prompt_top_features(
    math: SaeMath,
    hidden: Tensor,
    content_mask: Tensor | None,
    n: int,
    skip_positions: int = 1,
) -> list[Tensor]:
    """``Top_n(p)`` (positive activations only) for every prompt of a residual batch."""
    a = max_latent_activations(math, hidden, content_mask, skip_positions)
    return [top_features(row, n) for row in a]


def union(sets: Iterable[Tensor]) -> Tensor:
    """Sorted union of index tensors (int64, CPU)."""
    parts = [torch.as_tensor(s, dtype=torch.int64).flatten().cpu() for s in sets]
    if not parts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat(parts).unique()


def select_features(target_tops: Sequence[Tensor], retain_tops: Sequence[Tensor] | Tensor) -> Tensor:
    """``union_e (Top_n(e) minus G)`` with ``G = union_r Top_n(r)`` (sorted int64)."""
    retain = retain_tops if isinstance(retain_tops, Tensor) else union(retain_tops)
    targets = union(target_tops)
    if retain.numel() == 0:
        return targets
    return targets[~torch.isin(targets, retain)]


class ConceptFeatures(NamedTuple):
    """The interpretation of one concept."""

    name: str
    """Concept name."""

    features: Tensor
    """Sorted int64 feature indices of the concept."""

    target_tops: list[Tensor]
    """``Top_n`` of each target prompt (positive activations only)."""

    removed_by_retain: int
    """How many of the targets' top features were dropped because a retain prompt has them too."""
