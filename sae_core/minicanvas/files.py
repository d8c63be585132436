"""The package weights folder, the MiniCanvas readers (clear errors for missing files), and the UNet
fingerprint that ties files built from a model (SAEs, data banks, Fisher estimates) to that model.
Writes go through :mod:`sae_core.artefacts` (``save_tensors`` and ``save_json`` are re-exported)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..artefacts import load_json as _load_json
from ..artefacts import load_tensors as _load_tensors
from ..artefacts import save_json, save_tensors, tensor_fingerprint

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""Folder of the shipped MiniCanvas weights (package data)."""

__all__ = ["WEIGHTS_DIR", "MODEL_FILE", "JUDGES_FILE", "CONFIG_FILE", "unet_fingerprint", "load_tensors", "load_json",
           "update_json", "save_tensors", "save_json", "prefixed", "strip_prefix"]

MODEL_FILE = "minicanvas.safetensors"
JUDGES_FILE = "judges.safetensors"
CONFIG_FILE = "config.json"


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """16 hex digits of a SHA-256 over the UNet's state dict (names and fp32 values, sorted by name)."""
    return tensor_fingerprint(sorted(unet.state_dict().items()))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a shipped or cached MiniCanvas tensor file, with a clear error when it is missing."""
    return _load_tensors(path, what="MiniCanvas weights")


def load_json(path: Path) -> dict:
    """Read a shipped or cached MiniCanvas JSON file, with a clear error when it is missing."""
    return _load_json(path, what="MiniCanvas config")


def update_json(path: Path, section: str, value) -> None:
    """Set one top-level key of a JSON file (created if missing), atomically."""
    path = Path(path)
    obj = load_json(path) if path.is_file() else {}
    obj[section] = value
    save_json(path, obj)


def prefixed(state: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``{prefix + key: tensor}`` optionally cast (floating tensors only)."""
    out = {}
    for k, v in state.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[prefix + k] = v
    return out


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed, as float32 where floating."""
    return {
        k[len(prefix):]: (v.float() if v.is_floating_point() else v)
        for k, v in state.items()
        if k.startswith(prefix)
    }
