"""Nodes that bring sparse autoencoders into a graph: Load SAE."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import torch

from sae_core.formats import load_sae
from sae_core.sae import SparseAutoencoder

from .common import (
    DTYPE_CHOICES,
    ITD_CONFIG,
    ITD_WEIGHTS,
    SAE_TYPE,
    category,
    comfy_device,
    file_fingerprint,
    inp,
    node_id,
    sae_filenames,
    sae_full_path,
    torch_dtype,
)

log = logging.getLogger("concept_erasure")

DEVICE_CHOICES = ("auto", "cpu")
"""``auto``: the device ComfyUI runs models on; ``cpu``: keep the SAE in system memory."""

CACHE_SIZE = 4
"""How many loaded SAEs (file x device x dtype) stay in memory for reuse."""


_FOLDER_WEIGHT_NAMES = ("sae.safetensors", "sae_weights.safetensors")
"""Weight files whose config is the ``cfg.json`` beside them (our folder layout, SAELens)."""


def _companions(path: str) -> list[str]:
    """Files besides ``path`` that define the SAE: the ``cfg.json`` of a folder layout, ItD's ``config.json``."""
    if os.path.basename(path) in _FOLDER_WEIGHT_NAMES:
        return [os.path.join(os.path.dirname(path), "cfg.json")]
    if os.path.basename(path) == ITD_WEIGHTS:
        return [os.path.join(os.path.dirname(path), ITD_CONFIG)]
    return []


def sae_fingerprint(path: str) -> str:
    """Identity of an SAE file's content (path, size, mtime; its ``cfg.json`` too when it has one)."""
    return file_fingerprint(path, _companions(path))


class _SaeCache:
    """A small LRU of loaded SAEs keyed by (path, device, dtype), invalidated by file fingerprint."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str, str], tuple[str, SparseAutoencoder]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str], fingerprint: str) -> SparseAutoencoder | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None or hit[0] != fingerprint:
                return None
            self._items.move_to_end(key)
            return hit[1]

    def put(self, key: tuple[str, str, str], fingerprint: str, sae: SparseAutoencoder) -> None:
        with self._lock:
            self._items[key] = (fingerprint, sae)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


SAE_CACHE = _SaeCache(CACHE_SIZE)


def load_sae_cached(path: str, device: torch.device, dtype: torch.dtype, label: str | None = None, *,
                    wrap_errors: bool = True) -> SparseAutoencoder:
    """Load the SAE at ``path`` (any layout ``sae_core.formats.load_sae`` reads), reusing a
    previously loaded module while the file is unchanged.

    The returned module is shared between callers: it is in eval mode with gradients off,
    and consumers must not modify it. Any failure is re-raised as ``ValueError`` naming
    the file (``label``, the dropdown name, when given) and the problem (``wrap_errors=False``:
    the reader's own error, e.g. ``ArtefactError`` for a corrupt file).
    """
    label = label or path
    key = (os.path.abspath(path), str(device), str(dtype))
    fingerprint = sae_fingerprint(path)
    cached = SAE_CACHE.get(key, fingerprint)
    if cached is not None:
        return cached
    try:
        # Nodes run under torch.inference_mode(); parameters made there would be inference
        # tensors that later autograd use (e.g. under inference_mode(False)) rejects.
        with torch.inference_mode(False):
            sae = load_sae(path, device=device, dtype=dtype)
    except Exception as err:  # any reader failure becomes one clear message
        if not wrap_errors:
            raise
        raise ValueError(f"Load SAE: could not load '{label}' ({path}): {err}") from err
    if not isinstance(sae, torch.nn.Module) or not hasattr(sae, "cfg"):
        raise ValueError(f"Load SAE: '{label}' ({path}) did not load as a sparse autoencoder (got {type(sae).__name__})")
    sae.eval().requires_grad_(False)
    cfg = sae.cfg
    log.info(
        "Loaded SAE %s: d_in=%s num_latents=%s k=%s hookpoint=%s model_family=%s (%s, %s)",
        label, cfg.d_in, cfg.num_latents, cfg.k, cfg.hookpoint, cfg.model_family, device, dtype,
    )
    SAE_CACHE.put(key, fingerprint, sae)
    return sae


class LoadSAE:
    """Load a sparse autoencoder from ``models/sae`` for the concept-erasure nodes."""

    DESCRIPTION = (
        "Loads a sparse autoencoder (SAE) from the models/sae folder. Reads single-file SAEs "
        "(config in the safetensors header) and folder SAEs (sae.safetensors beside cfg.json). "
        "The SAE is shared with other nodes and never modified by them."
    )
    CATEGORY = category("sae")
    RETURN_TYPES = (SAE_TYPE,)
    RETURN_NAMES = ("sae",)
    OUTPUT_TOOLTIPS = (
        "The sparse autoencoder, with its config (input width, number of latents, k, and the "
        "hook point and model family it was trained on when the file records them).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "sae_name": inp(
                    sae_filenames(),
                    "SAE file in ComfyUI/models/sae (or output/sae). A folder SAE appears as "
                    "<name>/sae.safetensors (SAELens: sae_weights.safetensors) and needs its cfg.json beside it; "
                    "a published ItD SAE appears as <name>/state_dict.pth beside its config.json.",
                ),
                "device": inp(
                    list(DEVICE_CHOICES),
                    "Where the SAE lives: auto = the device ComfyUI runs models on; "
                    "cpu = system memory (saves GPU memory, slower).",
                    default="auto",
                ),
                "dtype": inp(
                    list(DTYPE_CHOICES),
                    "Precision of the SAE weights. float32 is exact; float16/bfloat16 halve the memory.",
                    default=DTYPE_CHOICES[0],
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, sae_name: str, **_other_inputs) -> str:
        """Re-run only when the file (or its cfg.json) changed on disk (ComfyUI compares the
        returned fingerprint with the previous run's; device/dtype changes re-run anyway)."""
        try:
            path = sae_full_path(sae_name)
        except FileNotFoundError:
            return f"missing:{sae_name}"
        return sae_fingerprint(path)

    def load(self, sae_name: str, device: str = "auto", dtype: str = DTYPE_CHOICES[0]) -> tuple[SparseAutoencoder]:
        path = sae_full_path(sae_name)
        sae = load_sae_cached(path, comfy_device(device), torch_dtype(dtype), label=sae_name)
        return (sae,)


NODE_CLASS_MAPPINGS = {node_id("LoadSAE"): LoadSAE}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("LoadSAE"): "Load SAE"}
