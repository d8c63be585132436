"""Small numerical helpers for SAE training."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

__all__ = ["geometric_median", "rechunk"]


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5, eps: float = 1e-8) -> Tensor:
    """Geometric median of the rows of ``points [N, d]`` by Weiszfeld's algorithm.

    Starts from the mean and iterates ``y <- sum_i w_i p_i / sum_i w_i`` with
    ``w_i = 1 / max(||p_i - y||, eps)`` until the estimate moves less than ``tol`` (absolute)
    or ``max_iter`` iterations have run. Computed in float64; returned in ``points.dtype``.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median expects a non-empty [N, d] tensor, got shape {tuple(points.shape)}")
    p = points.to(torch.float64)
    if not torch.isfinite(p).all():
        raise ValueError("geometric_median: the points contain NaN or Inf")
    guess = p.mean(dim=0)
    for _ in range(max_iter):
        dist = (p - guess).norm(dim=1).clamp_min(eps)
        weights = dist.reciprocal()
        new = (weights[:, None] * p).sum(dim=0) / weights.sum()
        moved = float((new - guess).norm())
        guess = new
        if moved < tol:
            break
    return guess.to(points.dtype)


def rechunk(batches: Iterable[Tensor], batch_size: int, skip_tokens: int = 0) -> Iterator[Tensor]:
    """Re-cut a stream of ``[B_i, d]`` tensors into ``[batch_size, d]`` batches.

    The first ``skip_tokens`` rows of the stream are discarded (used to fast-forward on resume);
    a final partial batch is dropped. Leading dims other than the last are flattened.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pending: list[Tensor] = []
    have = 0
    for chunk in batches:
        chunk = chunk.reshape(-1, chunk.shape[-1])
        if skip_tokens:
            drop = min(skip_tokens, chunk.shape[0])
            chunk = chunk[drop:]
            skip_tokens -= drop
            if chunk.shape[0] == 0:
                continue
        pending.append(chunk)
        have += chunk.shape[0]
        while have >= batch_size:
            joined = pending[0] if len(pending) == 1 else torch.cat(pending, dim=0)
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending = [rest] if rest.shape[0] else []
            have = rest.shape[0]
