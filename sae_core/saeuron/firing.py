"""Where and with which features SAeUron acted during one sampling run.

Each call of the hook on the prompted (conditional) rows adds the tokens it edited (``[B, P]`` bool, ``P`` the
block's ``H x W`` positions) and the latents selected at that step. From these:

- :meth:`FiringRecord.heatmap`: per image, the fraction of the run's steps in which SAeUron edited each position
  of the block (``[B, H, W]`` in [0, 1]); :func:`upsample_mask` brings it to the image's size (a ComfyUI MASK);
- :meth:`FiringRecord.summary`: per step, the edited tokens and the selected latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["FiringRecord", "overlay", "upsample_mask"]


class FiringRecord:
    """What one sampling run's hook calls edited (see the module doc). ``grid``: the block's ``(H, W)``."""

    def __init__(self, grid: tuple[int, int]) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.steps: dict[int, Tensor] = {}
        """step -> ``[B, H, W]`` float: edited positions (1) of each prompted row, summed over the step's calls."""
        self.calls: dict[int, int] = {}
        self.selected: dict[int, list[int]] = {}
        """step -> the latents the step's selection scales."""

    def add(self, step: int, fired: Tensor, selected: Sequence[int] = ()) -> None:
        """Record one call: ``fired [B, H*W]`` (the prompted rows) and the step's ``selected`` latents."""
        h, w = self.grid
        if fired.dim() != 2 or fired.shape[1] != h * w:
            raise ValueError(f"firing record: expected [rows, {h * w}] for a {h}x{w} block, got {tuple(fired.shape)}")
        step = int(step)
        maps = fired.detach().to("cpu", torch.float32).reshape(-1, h, w)
        prev = self.steps.get(step)
        if prev is not None and prev.shape != maps.shape:
            raise ValueError(f"firing record: step {step} saw {prev.shape[0]} rows, then {maps.shape[0]}")
        self.steps[step] = maps if prev is None else prev + maps
        self.calls[step] = self.calls.get(step, 0) + 1
        self.selected[step] = [int(i) for i in selected]

    @property
    def rows(self) -> int:
        return next(iter(self.steps.values())).shape[0] if self.steps else 0

    def heatmap(self) -> Tensor:
        """``[B, H, W]``: the fraction of recorded steps in which each position of each row was edited."""
        if not self.steps:
            raise ValueError("firing record: no SAeUron call was recorded (sample with this MODEL first)")
        total = sum(m / self.calls[s] for s, m in self.steps.items())
        return (total / len(self.steps)).clamp(0, 1)

    def summary(self, top: int = 8) -> str:
        """One line per step: edited tokens over the prompted rows and (up to ``top``) selected latents."""
        if not self.steps:
            return "SAeUron edited nothing: no call was recorded"
        h, w = self.grid
        lines = [f"SAeUron firing, {self.rows} prompted row(s) of {h}x{w} positions, {len(self.steps)} steps:"]
        for s in sorted(self.steps):
            edited = int((self.steps[s] > 0).sum())
            sel = self.selected.get(s, [])
            names = ", ".join(map(str, sel[:top])) + (f" (+{len(sel) - top})" if len(sel) > top else "")
            lines.append(f"  step {s:>3}: {edited:>5} tokens edited; selected latents: {names or '-'}")
        return "\n".join(lines)


def upsample_mask(heat: Tensor, height: int, width: int) -> Tensor:
    """``[B, h, w]`` -> ``[B, height, width]`` (nearest: each block position covers its patch of the image)."""
    if heat.dim() != 3:
        raise ValueError(f"heat map must be [B, h, w], got {tuple(heat.shape)}")
    return torch.nn.functional.interpolate(heat[:, None].float(), size=(int(height), int(width)),
                                           mode="nearest")[:, 0]


def overlay(images: Tensor, mask: Tensor, strength: float = 0.6) -> Tensor:
    """IMAGE ``[B, H, W, 3]`` with ``mask [B or 1, H, W]`` drawn in red over a darkened copy of the image."""
    if images.dim() != 4 or images.shape[-1] < 3:
        raise ValueError(f"images must be [B, H, W, 3], got {tuple(images.shape)}")
    if mask.shape[-2:] != images.shape[1:3]:
        mask = upsample_mask(mask, images.shape[1], images.shape[2])
    m = mask.to(images.device, torch.float32)[..., None].expand(images.shape[0], *mask.shape[-2:], 1)
    base = images[..., :3].float() * (1 - 0.5 * strength)
    red = torch.tensor([1.0, 0.1, 0.1], device=images.device)
    return (base * (1 - strength * m) + strength * m * red).clamp(0, 1)
