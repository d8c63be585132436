"""Configuration dataclasses for the TopK sparse autoencoder and its trainer.

``SaeConfig`` describes a trained SAE; its serialisable fields are exactly the keys of the
SAeUron/EleutherAI ``cfg.json`` plus our optional ``hookpoint`` and ``model_family``.
``TrainConfig`` describes one training run of :class:`sae_core.trainer.SaeTrainer`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field, fields
from typing import Any

import torch

__all__ = ["SaeConfig", "TrainConfig", "resolve_dtype"]


@dataclass
class SaeConfig:
    """Shape and behaviour of a TopK sparse autoencoder."""

    d_in: int
    """Width of the activations the SAE reads and reconstructs (1280 for SAeUron's UNet blocks)."""

    num_latents: int = 0
    """Number of dictionary latents. ``0`` means ``d_in * expansion_factor`` (resolved on construction)."""

    k: int = 32
    """Number of active latents per token (per-token TopK), or the average per token under BatchTopK."""

    expansion_factor: int = 16
    """Used only when ``num_latents`` is 0; kept so ``cfg.json`` files round-trip."""

    normalize_decoder: bool = True
    """Keep decoder rows at unit norm during training."""

    batch_topk: bool = False
    """Select the top ``k * N`` activations over a whole ``[N, num_latents]`` batch (training only).
    Always ``False`` after loading a file: inference uses per-token TopK."""

    sample_topk: bool = False
    """Reference-file flag, unsupported; kept for round trips. Forced ``False`` on load."""

    input_unit_norm: bool = False
    """Reference-file flag for input normalisation. We do not normalise inputs; files with ``true`` are refused."""

    multi_topk: bool = False
    """Reference-file flag for the Multi-TopK auxiliary loss (training only, not implemented); kept for round trips."""

    hookpoint: str | None = None
    """Module path the SAE was trained on, e.g. ``unet.up_blocks.1.attentions.1``, if known."""

    model_family: str | None = None
    """Model family the activations came from, e.g. ``sd1``, if known."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Any other JSON key found in a config file; written back on save."""

    def __post_init__(self) -> None:
        self.d_in = int(self.d_in)
        if self.d_in <= 0:
            raise ValueError(f"SaeConfig.d_in must be positive, got {self.d_in}")
        if not self.num_latents:
            if self.expansion_factor <= 0:
                raise ValueError("SaeConfig needs num_latents > 0 or expansion_factor > 0")
            self.num_latents = self.d_in * int(self.expansion_factor)
        self.num_latents = int(self.num_latents)
        self.k = int(self.k)
        if not 1 <= self.k <= self.num_latents:
            raise ValueError(f"SaeConfig.k must be in [1, num_latents={self.num_latents}], got {self.k}")

    # -- JSON helpers -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict: the cfg.json keys, our optional keys when set, then ``extra``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in ("hookpoint", "model_family") and value is None:
                continue
            out[f.name] = value
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SaeConfig":
        """Build from a flat dict; unknown keys go to ``extra``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {key: value for key, value in data.items() if key in known}
        extra = dict(data.get("extra") or {})
        extra.update({key: value for key, value in data.items() if key not in known and key != "extra"})
        return cls(**kwargs, extra=extra)


@dataclass
class TrainConfig:
    """One training run of a TopK SAE (defaults follow SAeUron's training recipe)."""

    batch_size: int = 4096
    """Tokens per optimiser step. Incoming batches are re-chunked to exactly this many rows
    (a trailing remainder is dropped). ``0`` trains on each incoming batch as given."""

    lr: float = 4e-4
    """Peak Adam learning rate."""

    lr_warmup_steps: int = 0
    """Linear warm-up steps from 0 to ``lr``; afterwards the rate decays linearly to 0 at ``total_steps``."""

    adam_eps: float = 6.25e-10
    """Adam epsilon."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""

    grad_clip: float = 1.0
    """Max global gradient norm; ``0`` disables clipping."""

    auxk_alpha: float = 1 / 32
    """Weight of the AuxK dead-latent loss."""

    k_aux: int | None = None
    """Dead latents used by AuxK per token; ``None`` means ``d_in // 2``."""

    dead_feature_threshold: int = 10_000_000
    """A latent is dead once it has not fired for more than this many tokens."""

    k: int = 32
    """Active latents per token."""

    num_latents: int = 0
    """Dictionary size; ``0`` means ``d_in * expansion_factor``."""

    expansion_factor: int = 16
    """Used when ``num_latents`` is 0."""

    batch_topk: bool = True
    """Train with BatchTopK (top ``k * N`` over the batch), as SAeUron does. The saved SAE uses per-token TopK."""

    normalize_decoder: bool = True
    """Renormalise decoder rows before every forward and project their gradients."""

    geometric_median_iters: int = 100
    """Weiszfeld iterations for the initial ``b_dec``."""

    geometric_median_tol: float = 1e-5
    """Weiszfeld stopping tolerance (change of the estimate, absolute)."""

    seed: int = 0
    """Seeds the parameter initialisation (a private generator; global RNG untouched)."""

    checkpoint_every: int = 1000
    """Steps between checkpoints when a checkpoint folder is given; ``0`` saves only at the end."""

    log_every: int = 50
    """Steps per history entry (metrics are averaged over the window)."""

    device: str = "cpu"
    """Training device, e.g. ``cpu`` or ``cuda``."""

    dtype: str = "float32"
    """Compute dtype of the forward pass (``float32``, ``bfloat16`` or ``float16`` via autocast).
    Parameters and Adam state are always fp32."""

    hookpoint: str | None = None
    """Stored in the trained SAE's config."""

    model_family: str | None = None
    """Stored in the trained SAE's config."""

    def __post_init__(self) -> None:
        def number(name: str, low: float, low_open: bool = False, high: float = math.inf) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (low_open and value == low) or value > high:
                bound = f"> {low}" if low_open else f">= {low}"
                raise ValueError(f"TrainConfig.{name} must be a finite number {bound}"
                                 + (f" and <= {high}" if math.isfinite(high) else "") + f", got {value!r}")

        number("lr", 0.0)
        number("adam_eps", 0.0, low_open=True)
        number("grad_clip", 0.0)
        number("auxk_alpha", 0.0)
        number("geometric_median_tol", 0.0)
        if len(self.adam_betas) != 2:
            raise ValueError(f"TrainConfig.adam_betas must be two numbers, got {self.adam_betas!r}")
        for beta in self.adam_betas:
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                raise ValueError(f"TrainConfig.adam_betas must lie in [0, 1), got {self.adam_betas!r}")
        if self.k_aux is not None and (isinstance(self.k_aux, bool) or not isinstance(self.k_aux, int) or self.k_aux < 1):
            raise ValueError(f"TrainConfig.k_aux must be None or an integer >= 1, got {self.k_aux!r}")
        for name in ("lr_warmup_steps", "dead_feature_threshold", "checkpoint_every", "log_every", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")

    def sae_config(self, d_in: int) -> SaeConfig:
        """The :class:`SaeConfig` of the SAE this run trains."""
        return SaeConfig(
            d_in=d_in,
            num_latents=self.num_latents,
            k=self.k,
            expansion_factor=self.expansion_factor,
            normalize_decoder=self.normalize_decoder,
            batch_topk=self.batch_topk,
            hookpoint=self.hookpoint,
            model_family=self.model_family,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["adam_betas"] = list(self.adam_betas)
        return out


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``"float32"``, ``"bf16"``, ...) or a ``torch.dtype`` to a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(set(_DTYPES))}") from None
