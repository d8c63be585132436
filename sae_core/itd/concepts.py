"""``ItDConcepts``: everything an ItD edit needs besides the SAE, saved as one safetensors file.

The file holds the feature indices as tensors (``features``: the union; ``concept_features`` +
``concept_offsets``: each concept's own set; ``target_scores`` / ``retain_scores``: the calibration
scores) and a JSON description under the header metadata key ``itd_concepts`` (threshold, strength,
layer, padding convention, SAE fingerprint, calibration summary, concept names). Files are written
atomically.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from ..artefacts import sae_fingerprint, sae_fingerprint_hint, save_tensors
from ..sae import SparseAutoencoder
from .steering import ERROR_MODES

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "Calibration", "ItDConcepts", "sae_fingerprint"]

FORMAT_VERSION = 1
METADATA_KEY = "itd_concepts"


@dataclass
class Calibration:
    """How the classifier threshold was chosen, and how well it separates."""

    tau: float
    """The threshold: ``margin * target_min``."""

    margin: float
    """Factor applied to the smallest target score (0.99 in the reference)."""

    target_min: float
    """Smallest score over the calibration (target) prompts."""

    retain_max: float | None = None
    """Largest score over the retain prompts (``None`` if none were scored)."""

    n_targets: int = 0
    """Number of target prompts scored."""

    n_retain: int = 0
    """Number of retain prompts scored."""

    @property
    def gap(self) -> float | None:
        """``tau - retain_max``: positive when every retain prompt passes untouched."""
        return None if self.retain_max is None else self.tau - self.retain_max

    @property
    def ratio(self) -> float | None:
        """``target_min / retain_max``: how far apart the two score populations are (> 1 is separable)."""
        if self.retain_max is None or self.retain_max <= 0:
            return None
        return self.target_min / self.retain_max

    def summary(self) -> str:
        """One line for logs and UIs."""
        text = f"tau={self.tau:.4g} (= {self.margin} x min target score {self.target_min:.4g}, {self.n_targets} prompts)"
        if self.retain_max is not None:
            text += f"; max retain score {self.retain_max:.4g} ({self.n_retain} prompts), gap {self.gap:.4g}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "margin": self.margin,
            "target_min": self.target_min,
            "retain_max": self.retain_max,
            "n_targets": self.n_targets,
            "n_retain": self.n_retain,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        return cls(**{key: data[key] for key in ("tau", "margin", "target_min", "retain_max", "n_targets", "n_retain") if key in data})


@dataclass
class ItDConcepts:
    """A calibrated ItD edit: concept features, threshold and how they were obtained."""

    features: Tensor
    """Sorted int64 union of the concepts' feature indices."""

    tau: float | None
    """Classifier threshold; prompts scoring ``>= tau`` are edited. ``None`` edits every prompt."""

    scale: float = -8.0
    """Factor applied to the concept features (``-8``: sign flip and amplify, as the reference)."""

    error_mode: str = "reconstruct"
    """``"reconstruct"`` (full SAE reconstruction, the reference) or ``"preserve"`` (residual + delta)."""

    layer: int | None = None
    """Index of the hooked encoder layer, if known."""

    hookpoint: str | None = None
    """Dotted path of the hooked layer inside the text encoder the concepts were built on."""

    pad_to: int | None = None
    """Padded sequence length the concepts were calibrated at (``None``: pad to the longest)."""

    pad_token: str | None = None
    """How padding is filled, e.g. ``"eos"`` (ComfyUI/SD1) or a model-specific name."""

    sae_fingerprint: str | None = None
    """:func:`sae_fingerprint` of the SAE the features index into."""

    sae_d_in: int | None = None
    """Width of that SAE."""

    sae_num_latents: int | None = None
    """Number of latents of that SAE."""

    concept_names: list[str] = field(default_factory=list)
    """The concepts, in order."""

    concept_features: dict[str, Tensor] = field(default_factory=dict)
    """Each concept's own feature set (sorted int64)."""

    top_n: int | None = None
    """``n`` of the ``Top_n`` selection."""

    skip_positions: int = 1
    """Leading positions never edited (1 = BOS)."""

    calibration: Calibration | None = None
    """How ``tau`` was chosen."""

    target_scores: Tensor | None = None
    """Scores of the calibration (target) prompts, fp32."""

    retain_scores: Tensor | None = None
    """Scores of the retain prompts, fp32."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-serialisable notes (model name, prompt counts, ...)."""

    def __post_init__(self) -> None:
        self.features = torch.as_tensor(self.features, dtype=torch.int64).flatten().unique().cpu()
        if self.error_mode not in ERROR_MODES:
            raise ValueError(f"ItDConcepts.error_mode must be one of {ERROR_MODES}, got {self.error_mode!r}")
        if self.tau is not None:
            self.tau = float(self.tau)
            if not math.isfinite(self.tau):
                raise ValueError(f"ItDConcepts.tau must be finite, got {self.tau}")
        self.concept_features = {
            str(k): torch.as_tensor(v, dtype=torch.int64).flatten().unique().cpu() for k, v in self.concept_features.items()
        }
        if not self.concept_names:
            self.concept_names = list(self.concept_features)

    def __repr__(self) -> str:
        return (
            f"ItDConcepts(concepts={self.concept_names}, features={self.features.numel()}, tau={self.tau}, "
            f"scale={self.scale}, layer={self.hookpoint or self.layer}, pad_to={self.pad_to})"
        )

    # -- checks -------------------------------------------------------------------------------
    def check_sae(self, sae: SparseAutoencoder, strict: bool = True) -> None:
        """Raise a ValueError if ``sae`` is not the SAE these concepts were built with."""
        n, d = sae.W_dec.shape
        if self.sae_d_in is not None and int(d) != self.sae_d_in:
            raise ValueError(f"these ItD concepts need an SAE with d_in={self.sae_d_in}, the given SAE has d_in={int(d)}")
        if self.sae_num_latents is not None and int(n) != self.sae_num_latents:
            raise ValueError(
                f"these ItD concepts index an SAE with {self.sae_num_latents} latents, the given SAE has {int(n)}"
            )
        if self.features.numel() and int(self.features.max()) >= int(n):
            raise ValueError(f"feature index {int(self.features.max())} is out of range for an SAE with {int(n)} latents")
        if strict and self.sae_fingerprint is not None:
            found = sae_fingerprint(sae)
            if found != self.sae_fingerprint:
                raise ValueError(
                    f"these ItD concepts were built with a different SAE (fingerprint {self.sae_fingerprint}, "
                    f"given SAE {found}); re-run interpretation with this SAE{sae_fingerprint_hint(sae)}"
                )

    # -- files --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The JSON part of the file."""
        return {
            "format_version": FORMAT_VERSION,
            "tau": self.tau,
            "scale": self.scale,
            "error_mode": self.error_mode,
            "layer": self.layer,
            "hookpoint": self.hookpoint,
            "pad_to": self.pad_to,
            "pad_token": self.pad_token,
            "sae_fingerprint": self.sae_fingerprint,
            "sae_d_in": self.sae_d_in,
            "sae_num_latents": self.sae_num_latents,
            "concept_names": list(self.concept_names),
            "top_n": self.top_n,
            "skip_positions": self.skip_positions,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.safetensors`` file (tensors + JSON header metadata), atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"ItD concepts are saved as a .safetensors file, got '{path}'")
        path.parent.mkdir(parents=True, exist_ok=True)
        names = list(self.concept_names)
        per = [self.concept_features.get(name, torch.zeros(0, dtype=torch.int64)) for name in names]
        offsets = torch.tensor([0] + [int(t.numel()) for t in per], dtype=torch.int64).cumsum(0)
        tensors = {
            "features": self.features.contiguous(),
            "concept_features": (torch.cat(per) if per else torch.zeros(0, dtype=torch.int64)).contiguous(),
            "concept_offsets": offsets.contiguous(),
        }
        if self.target_scores is not None:
            tensors["target_scores"] = self.target_scores.detach().float().cpu().contiguous()
        if self.retain_scores is not None:
            tensors["retain_scores"] = self.retain_scores.detach().float().cpu().contiguous()
        meta = {METADATA_KEY: json.dumps(self.to_json())}
        save_tensors(path, tensors, meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ItDConcepts":
        """Read a file written by :meth:`save`; clear errors for a missing, corrupt or foreign file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ItD concepts file not found: '{path}'")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"'{path}' is not a readable safetensors file: {exc}") from exc
        if METADATA_KEY not in meta:
            raise ValueError(f"'{path}' is not an ItD concepts file (no '{METADATA_KEY}' metadata)")
        try:
            info = json.loads(meta[METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise ValueError(f"'{path}': the '{METADATA_KEY}' metadata is not valid JSON: {exc}") from exc
        if int(info.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"'{path}' has ItD concepts format {info.get('format_version')}; this version reads <= {FORMAT_VERSION}")
        for key in ("features", "concept_features", "concept_offsets"):
            if key not in tensors:
                raise ValueError(f"'{path}' is missing the tensor '{key}'")
        names = list(info.get("concept_names") or [])
        offsets = tensors["concept_offsets"].tolist()
        if len(offsets) != len(names) + 1 or offsets[-1] != tensors["concept_features"].numel():
            raise ValueError(f"'{path}': concept_offsets does not match the {len(names)} concept names")
        per = {name: tensors["concept_features"][offsets[i] : offsets[i + 1]] for i, name in enumerate(names)}
        calibration = info.get("calibration")
        return cls(
            features=tensors["features"],
            tau=info.get("tau"),
            scale=float(info.get("scale", -8.0)),
            error_mode=info.get("error_mode", "reconstruct"),
            layer=info.get("layer"),
            hookpoint=info.get("hookpoint"),
            pad_to=info.get("pad_to"),
            pad_token=info.get("pad_token"),
            sae_fingerprint=info.get("sae_fingerprint"),
            sae_d_in=info.get("sae_d_in"),
            sae_num_latents=info.get("sae_num_latents"),
            concept_names=names,
            concept_features=per,
            top_n=info.get("top_n"),
            skip_positions=int(info.get("skip_positions", 1)),
            calibration=None if calibration is None else Calibration.from_dict(calibration),
            target_scores=tensors.get("target_scores"),
            retain_scores=tensors.get("retain_scores"),
            extra=dict(info.get("extra") or {}),
        )

    # -- combining ----------------------------------------------------------------------------
    @classmethod
    def combine(cls, parts: list["ItDConcepts"]) -> "ItDConcepts":
        """Union of several calibrated concept sets built with the same SAE, layer and padding.

        Uses the smallest of their thresholds (every part's calibration prompts keep scoring
        above their own tau with more features flipped only approximately; re-calibrating the
        combined set on all target prompts is the exact procedure and what
        :func:`sae_core.itd.build_concepts` does).
        """
        if not parts:
            raise ValueError("ItDConcepts.combine: nothing to combine")
        first = parts[0]
        for p in parts[1:]:
            for attr in ("sae_fingerprint", "hookpoint", "layer", "pad_to", "scale", "error_mode", "skip_positions"):
                if getattr(p, attr) != getattr(first, attr):
                    raise ValueError(
                        f"cannot combine ItD concepts with different {attr}: {getattr(first, attr)!r} vs {getattr(p, attr)!r}"
                    )
        names: list[str] = []
        per: dict[str, Tensor] = {}
        for p in parts:
            for name in p.concept_names:
                if name not in per:
                    names.append(name)
                per[name] = torch.cat([per.get(name, torch.zeros(0, dtype=torch.int64)), p.concept_features.get(name, p.features)])
        taus = [p.tau for p in parts]
        return cls(
            features=torch.cat([p.features for p in parts]),
            tau=None if any(t is None for t in taus) else min(taus),
            scale=first.scale,
            error_mode=first.error_mode,
            layer=first.layer,
            hookpoint=first.hookpoint,
            pad_to=first.pad_to,
            pad_token=first.pad_token,
            sae_fingerprint=first.sae_fingerprint,
            sae_d_in=first.sae_d_in,
            sae_num_latents=first.sae_num_latents,
            concept_names=names,
            concept_features=per,
            top_n=first.top_n,
            skip_positions=first.skip_positions,
            extra={"combined_from": len(parts)},
        )
