"""Noise schedule, training loss and the DDIM sampler (eta = 0) with classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch

from tqdm.auto import tqdm


@dataclass
class ScheduleConfig:
    """DDPM noise schedule."""

    num_train_timesteps: int = 1000
    """T: number of discrete training timesteps."""
    beta_start: float = 1e-4
    """beta_1 of the linear schedule."""
    beta_end: float = 0.02
    """beta_T of the linear schedule."""


class NoiseSchedule:
    """Linear-beta DDPM schedule; ``alphas_cumprod[t]`` is abar_t for t in [0, T)."""

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config or ScheduleConfig()
        c = self.config
        betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1.0 - a)

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` decreasing timesteps with trailing spacing (the first is T - 1)."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        return [int(t) for t in ts]


@dataclass
class SamplingContext:
    """State of the sampler that hooks may read during a UNet call (never count calls).

    The sampler updates it before every denoiser evaluation. With CFG, the UNet input is
    the batch ``[uncond; cond]`` (``cfg_order``), each half ``batch_size`` rows.
    """

    step_index: int = -1
    """Index of the current DDIM step (0 = first, most noisy); -1 outside sampling."""
    timestep: int = -1
    """Training timestep t of the current step (0..T-1)."""
    num_steps: int = 0
    """Total DDIM steps of this run."""
    batch_size: int = 0
    """Images per half-batch."""
    cfg_order: tuple[str, ...] = ("uncond", "cond")
    """Order of the halves in the UNet batch; just ("cond",) when guidance is off."""
    extra: dict = field(default_factory=dict)
    """Free slot for methods that need to pass state to their hooks."""


def ddim_sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    noise: torch.Tensor,
    steps: int,
    cfg: float,
    context: SamplingContext | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    progress: bool = False,
    clip_x0: bool = True,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``noise`` [B, C, H, W]; returns x_0 in model range.

    ``clip_x0`` clips each step's predicted x_0 to the data range [-1, 1] and re-derives
    epsilon from it, the usual practice for pixel-space models (at t near T the epsilon
    error is amplified by 1/sqrt(abar_t) in x_0).

    ``cond``/``uncond`` are text encodings [B, L, d] (uncond may be [1, L, d]). With
    ``cfg == 1`` or ``uncond is None`` only the conditional branch runs; otherwise
    eps = eps_u + cfg * (eps_c - eps_u). ``callback(step_index, t, x_t)`` runs after each step.
    """
    ctx = context if context is not None else SamplingContext()
    B = noise.shape[0]
    if cond.shape[0] != B:
        raise ValueError(f"cond batch {cond.shape[0]} != noise batch {B}")
    guided = uncond is not None and cfg != 1.0
    if guided:
        if uncond.shape[0] == 1:
            uncond = uncond.expand(B, -1, -1)
        both = torch.cat([uncond, cond], 0)
    abar = schedule.alphas_cumprod.to(noise.device)
    ts = schedule.ddim_timesteps(steps)
    x = noise
    ctx.num_steps, ctx.batch_size = steps, B
    ctx.cfg_order = ("uncond", "cond") if guided else ("cond",)
    try:
        for i, t in enumerate(tqdm(ts, desc="DDIM", disable=not progress, leave=False)):
            ctx.step_index, ctx.timestep = i, t
            tt = torch.full((B * (2 if guided else 1),), t, device=noise.device, dtype=torch.long)
            if guided:
                eps_u, eps_c = denoiser(torch.cat([x, x], 0), tt, both).chunk(2)
                eps = eps_u + cfg * (eps_c - eps_u)
            else:
                eps = denoiser(x, tt, cond)
            a_t = abar[t]
            a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=noise.device)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            if callback is not None:
                callback(i, t, x)
    finally:
        ctx.step_index, ctx.timestep = -1, -1
    return x


class LossOutput(NamedTuple):
    """Diffusion training loss and its pieces."""

    loss: torch.Tensor
    """Weighted mean squared error (scalar)."""
    mse: torch.Tensor
    """Unweighted epsilon MSE (scalar, for logging)."""


def loss_weights(schedule: NoiseSchedule, t: torch.Tensor, weighting: str, value: float) -> torch.Tensor:
    """Per-sample weights of the epsilon MSE.

    * ``"none"``: 1.
    * ``"min_snr"``: min(SNR, value) / SNR (Min-SNR-gamma, gamma = value); de-emphasises
      nearly clean inputs.
    * ``"v_clamped"``: min(1 / abar_t, value). For an epsilon model, eps-MSE / abar_t is the
      v-prediction MSE; it puts weight on the noisy steps where the global shape is decided
      (their plain eps-MSE is tiny, since eps ~ x_t there).
    """
    if weighting == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if weighting == "min_snr":
        snr = schedule.snr(t)
        return torch.clamp(snr, max=value) / snr
    if weighting == "v_clamped":
        abar = schedule.alphas_cumprod.to(t.device)[t]
        return torch.clamp(1.0 / abar, max=value)
    raise ValueError(f"unknown loss weighting {weighting!r}; expected none, min_snr or v_clamped")


def diffusion_loss(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator | None = None,
    weighting: str = "min_snr",
    weighting_value: float = 5.0,
) -> LossOutput:
    """Epsilon-prediction loss at uniformly drawn t, weighted per :func:`loss_weights`."""
    B = x0.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    xt = schedule.add_noise(x0, noise, t)
    per = (model(xt, t, context) - noise).pow(2).mean(dim=(1, 2, 3))
    w = loss_weights(schedule, t, weighting, weighting_value)
    return LossOutput((w * per).mean(), per.mean().detach())
