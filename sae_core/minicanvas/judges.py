"""Object and style judges: small CNN classifiers trained on the procedural data."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class JudgeConfig:
    """Shape of one judge CNN."""

    num_classes: int = 8
    """Number of output classes."""
    width: int = 24
    """Channels of the first stage (doubled at each of the three stages)."""

    def to_dict(self) -> dict:
        return asdict(self)


class JudgeCNN(nn.Module):
    """Three conv stages (32, 16, 8 px) with BatchNorm, then max pool and a linear head on 4x4 cells.

    Input: images [B, 3, H, W] in [0, 1]. Output: logits [B, num_classes].
    """

    def __init__(self, config: JudgeConfig | None = None):
        super().__init__()
        self.config = cfg = config or JudgeConfig()
        w = cfg.width

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
            )

        self.features = nn.Sequential(
            stage(3, w), nn.MaxPool2d(2), stage(w, 2 * w), nn.MaxPool2d(2), stage(2 * w, 4 * w),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w * 16, cfg.num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"JudgeCNN expects images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if images.shape[-2:] != (32, 32):
            raise ValueError(f"JudgeCNN expects 32x32 images, got {tuple(images.shape[-2:])}")
        return self.head(self.features(images * 2.0 - 1.0))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Argmax class per image, int64 [B] (always in eval mode)."""
        was_training = self.training
        self.eval()
        try:
            out = [self(images[i : i + batch_size]).argmax(-1) for i in range(0, images.shape[0], batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Judge training augmentation on [0, 1] images: flips, brightness, blur and pixel noise.

    Keeps labels valid (no class of MiniCanvas changes under a horizontal flip) and makes
    the judges tolerant of the softness and noise of sampled images.
    """
    B = images.shape[0]
    x = images
    flip = torch.rand(B, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    x = x * (0.9 + 0.2 * torch.rand(B, 1, 1, 1, generator=generator))
    blur = torch.rand(B, generator=generator) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16.0
        xb = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
        x = torch.where(blur[:, None, None, None], xb, x)
    sigma = 0.06 * torch.rand(B, 1, 1, 1, generator=generator)
    x = x + sigma * torch.randn(x.shape, generator=generator)
    return x.clamp(0.0, 1.0)
