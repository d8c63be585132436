"""ZCA whitening of activation rows, and folding it into a trained SAE.

An SAE trained on whitened rows weighs every direction of the activation space equally in its
loss, so concept directions of small variance (next to a few dominant ones, as in a text encoder's
residual stream) get latents of their own. :func:`fold_whitening` turns such an SAE back into one
that reads raw rows, computing exactly the same codes and reconstructions, so nothing downstream
needs to know it was trained whitened.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Whitening", "WhiteningStats", "fit_whitening", "fold_whitening"]


class Whitening(NamedTuple):
    """An affine map ``x' = (x - mean) @ forward`` with its inverse ``x = x' @ inverse + mean``."""

    mean: Tensor
    forward: Tensor
    inverse: Tensor

    def apply(self, rows: Tensor) -> Tensor:
        """``(rows - mean) @ forward`` on the rows' device and dtype."""
        return (rows - self.mean.to(rows)) @ self.forward.to(rows)

    def tensors(self) -> dict[str, Tensor]:
        """The map as named tensors (for a checkpoint file)."""
        return {"mean": self.mean, "forward": self.forward, "inverse": self.inverse}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "Whitening":
        return cls(tensors["mean"].float(), tensors["forward"].float(), tensors["inverse"].float())


class WhiteningStats:
    """Running float64 sums of rows and their outer products (mean and covariance of a stream)."""

    def __init__(self) -> None:
        self.n = 0
        self.total: Tensor | None = None
        self.outer: Tensor | None = None

    @torch.no_grad()
    def add(self, rows: Tensor) -> None:
        x = rows.reshape(-1, rows.shape[-1]).to("cpu", torch.float64)
        if x.shape[0] == 0:
            return
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x

    def fit(self, eps: float = 1e-2) -> Whitening:
        if self.n < 2 or self.total is None or self.outer is None:
            raise ValueError(f"whitening needs at least two activation rows, got {self.n}")
        mean = self.total / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return _zca(mean, cov, eps)


def _zca(mean: Tensor, cov: Tensor, eps: float) -> Whitening:
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    floor = eps * float(evals.clamp_min(0).mean())
    if floor <= 0:
        raise ValueError("whitening: the activations have no variance (every row is the same)")
    scale = (evals.clamp_min(0) + floor).rsqrt()
    fwd = (evecs * scale) @ evecs.T
    inv = (evecs / scale) @ evecs.T
    return Whitening(mean.float(), fwd.float(), inv.float())


@torch.no_grad()
def fit_whitening(rows: Tensor | Iterable[Tensor], eps: float = 1e-2) -> Whitening:
    """ZCA whitening of ``rows [N, d]`` (or of a stream of such batches); ``eps`` (relative to the mean
    variance) regularises near-constant directions so they are not blown up."""
    stats = WhiteningStats()
    for batch in [rows] if isinstance(rows, Tensor) else rows:
        stats.add(batch)
    return stats.fit(eps)


@torch.no_grad()
def fold_whitening(sae, w: Whitening):
    """Turn an SAE trained on whitened rows into one that reads raw rows (the same function).

    With ``x' = (x - m) @ A`` and ``x = x' @ A^-1 + m`` (``A`` symmetric), the raw-space SAE has
    ``W_enc = W_enc' @ A``, ``b_dec = m + b_dec' @ A^-1``, ``W_dec = W_dec' @ A^-1`` and the
    same ``b_enc``, so codes and reconstructions are exactly those of the whitened SAE.
    Decoder rows are no longer unit norm; nothing at inference needs them to be.
    """
    folded = copy.deepcopy(sae)
    a, a_inv, m = w.forward.to(sae.W_dec), w.inverse.to(sae.W_dec), w.mean.to(sae.W_dec)
    folded.encoder.weight.copy_(sae.encoder.weight @ a)
    folded.W_dec.copy_(sae.W_dec @ a_inv)
    folded.b_dec.copy_(m + sae.b_dec @ a_inv)
    folded.cfg = replace(sae.cfg, normalize_decoder=False, extra=dict(sae.cfg.extra, whitened=True))
    return folded
