"""Atomic writes of safetensors and JSON files, the package weights folder, and the UNet fingerprint
that ties files built from a model (SAEs, data banks, Fisher estimates) to that model."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""Folder of the shipped MiniCanvas weights (package data)."""

MODEL_FILE = "minicanvas.safetensors"
JUDGES_FILE = "judges.safetensors"
CONFIG_FILE = "config.json"


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """16 hex digits of a SHA-256 over the UNet's state dict (names and fp32 values, sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as safetensors via a temp file in the same folder + ``os.replace``."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, with a clear error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MiniCanvas weights not found: {path}")
    return load_file(str(path))


def save_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (indented, sorted keys)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic(path, write)


def load_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MiniCanvas config not found: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
