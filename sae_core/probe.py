"""Leak probe by concept inversion: a soft prompt that brings an erased concept back, if the erasure let it.

The attack evaluations of the erasure references ask whether a concept is gone from the weights or only from the
words that used to reach it: optimise a conditioning (a "soft prompt" in the text encoder's output space, the
space RECE's adversarial embedding lives in) so that the *erased* model denoises images of the concept well,
then sample the erased model with it. Images of the concept come from the original model.

The objective is the denoising loss of textual inversion, in noise space:
``E_{sigma, eps} || (D(x0 + sigma eps, sigma, c) - x0) / sigma ||^2`` with ``D`` the erased model's denoised
estimate, ``x0`` the concept images (latents), ``sigma`` drawn from the sampling schedule the probe will be
sampled with. Only ``c`` is trained (Adam); the model is untouched.

Host-neutral: the host gives a denoiser ``D(x_t, sigma_index, context) -> x0_hat``, the schedule and the images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["InversionResult", "InversionSettings", "denoising_loss", "invert_concept"]


@dataclass(frozen=True)
class InversionSettings:
    """How long and how hard the probe searches."""

    steps: int = 200
    """Optimisation steps."""
    lr: float = 1e-2
    """Adam step size, relative to the conditioning's scale (the step is ``lr * rms(c)``)."""
    batch: int = 4
    """Images per step (drawn from the concept images, each with its own sigma and noise)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and 1 <= self.steps <= 100_000):
            raise ValueError(f"steps must be a whole number from 1 to 100000, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and 0 < self.lr <= 10):
            raise ValueError(f"lr must be in (0, 10], got {self.lr!r}")
        if not (isinstance(self.batch, int) and 1 <= self.batch <= 256):
            raise ValueError(f"batch must be a whole number from 1 to 256, got {self.batch!r}")


class InversionResult(NamedTuple):
    context: Tensor
    """The probe conditioning, ``[1, L, D]``, detached."""
    losses: list[float]
    """The loss of each step."""
    start_loss: float
    """Mean loss of the starting conditioning over the fixed evaluation draws."""
    end_loss: float
    """... of the probe, over the same draws."""


Denoiser = Callable[[Tensor, int, Tensor], Tensor]
"""``D(x_t [B, ...], sigma_index, context [B, L, D]) -> x0_hat [B, ...]`` at ``sigmas[sigma_index]``."""


def denoising_loss(denoise: Denoiser, x0: Tensor, sigmas: Tensor, context: Tensor, index: int,
                   noise: Tensor) -> Tensor:
    """Noise-space denoising error of ``x0`` at ``sigmas[index]`` with ``noise``, mean over elements."""
    sigma = float(sigmas[index])
    x_t = x0 + sigma * noise
    x0_hat = denoise(x_t, index, context.expand(x0.shape[0], *context.shape[1:]))
    return ((x0_hat.float() - x0.float()) / sigma).pow(2).mean()


def invert_concept(denoise: Denoiser, images: Tensor, sigmas: Tensor, start: Tensor,
                   settings: InversionSettings = InversionSettings(),
                   progress: Callable[[int, float], None] | None = None) -> InversionResult:
    """Optimise a conditioning from ``start [1, L, D]`` so that ``denoise`` reconstructs ``images [N, ...]``.

    ``sigmas`` are the schedule's positive sigmas (the last, zero, entry of a sampling schedule excluded). The
    start and end losses are measured on the same fixed draws (one per image and sigma index, seeded), so that
    they compare. ``progress(step, loss)`` is called after each step and may raise to stop.
    """
    if start.dim() != 3 or start.shape[0] != 1:
        raise ValueError(f"probe: the starting conditioning must be [1, tokens, width], got {tuple(start.shape)}")
    if images.shape[0] < 1:
        raise ValueError("probe: needs at least one image of the concept")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
    sigmas = sigmas[sigmas > 0]
    if sigmas.numel() == 0 or not torch.isfinite(sigmas).all():
        raise ValueError("probe: the schedule has no positive, finite sigma")
    gen = torch.Generator().manual_seed(settings.seed)
    scale = float(start.float().pow(2).mean().sqrt()) or 1.0
    context = torch.nn.Parameter(start.detach().float().clone())
    opt = torch.optim.Adam([context], lr=settings.lr * scale)
    n, n_sig = images.shape[0], sigmas.numel()

    def evaluate(ctx: Tensor) -> float:
        g = torch.Generator().manual_seed(settings.seed + 1)
        total = 0.0
        picks = torch.linspace(0, n_sig - 1, steps=min(n_sig, 4)).round().long().tolist()
        with torch.no_grad():
            for i in picks:
                noise = torch.randn(images.shape, generator=g).to(images)
                total += float(denoising_loss(denoise, images, sigmas, ctx.to(images.dtype), i, noise))
        return total / len(picks)

    start_loss = evaluate(context.detach())
    losses: list[float] = []
    for step in range(settings.steps):
        pick = torch.randint(0, n, (min(settings.batch, n),), generator=gen)
        index = int(torch.randint(0, n_sig, (1,), generator=gen))
        noise = torch.randn((pick.numel(), *images.shape[1:]), generator=gen).to(images)
        opt.zero_grad(set_to_none=True)
        loss = denoising_loss(denoise, images[pick], sigmas, context.to(images.dtype), index, noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"probe: the loss is not finite at step {step + 1}")
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, losses[-1])
    return InversionResult(context.detach().clone(), losses, start_loss, evaluate(context.detach()))
