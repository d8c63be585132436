"""Text-encoder activations for SAE training: encode a prompt corpus, stream one layer into a store, train.

One path for every host: :func:`collect_text_store` encodes prompts through a :class:`TextLayerSource`
(the host's own tokenisation and padding, the layer the classifier reads) and writes the layer's output
into an activation store (:mod:`sae_core.store`), one row per token position kept, each with its prompt
index and position. :func:`train_text_sae` is that collection followed by
:func:`sae_core.store_training.train_sae_on_store`, the training the Train SAE node runs on such a store;
the ComfyUI nodes (Collect Text Activations, then Train SAE), the ``python -m sae_core.itd.text_sae``
command line and the MiniCanvas ItD plug-in therefore all make their text SAE the same way.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..sae import SparseAutoencoder
from ..store import ActivationReader, ActivationWriter
from ..store_training import StoreTraining, train_sae_on_store
from .text import TextLayerSource

__all__ = ["TEXT_COLUMNS", "TEXT_SAE_PRESETS", "POSITIONS", "collect_text_activations", "collect_text_store", "prompts_fingerprint",
           "train_text_sae"]

TEXT_COLUMNS = {"prompt_index": "int32", "position": "int32"}
"""Metadata columns of a text-activation store: the prompt's index in the corpus and the token position."""

TEXT_SAE_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"expansion_factor": 32, "num_latents": 0, "k": 64, "steps": 2000, "batch_size": 4096, "lr": 4e-4,
                "topk": "token", "whiten": True},
    "full": {"expansion_factor": 0, "num_latents": 524_288, "k": 64, "steps": 6000, "batch_size": 4096, "lr": 1e-4,
             "lr_warmup_steps": 1000, "topk": "token", "whiten": True},
    "minicanvas": {"expansion_factor": 0, "num_latents": 1024, "k": 8, "steps": 1000, "batch_size": 512, "lr": 1e-3,
                   "topk": "token", "whiten": True},
}
"""Text-SAE training settings. ``default``: minutes on a GPU for CLIP-L (24,576 latents, k 64, 2,000 steps of 4,096
tokens, per-token TopK, whitened). ``full``: the reference's shape (524,288 latents, k 64, lr 1e-4 after 1,000
warm-up steps; the released ItD SAE is its step 6,000 of ~1.5k tokens, here 6,000 steps of 4,096). ``minicanvas``:
the MiniCanvas plug-in's recipe. The ComfyUI workflow ``itd_train_text_sae.json`` sets Train SAE to ``default``."""

POSITIONS = ("all", "content")
"""Token positions stored: ``all`` (every padded position, as the classifier scores them and the reference
trains) or ``content`` (BOS, the words and EOS: no padding)."""


def prompts_fingerprint(prompts: Sequence[str]) -> str:
    """Short hash of a prompt list (order included)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


@torch.no_grad()
def collect_text_activations(
    source: TextLayerSource,
    prompts: Sequence[str],
    writer: Any,
    *,
    positions: str = "all",
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Encode ``prompts`` (``source.batch_size`` at a time) and ``writer.add`` the kept rows of the hooked layer.

    Returns the number of rows written; stops early (returning what was written) when ``should_stop()``
    turns true; ``on_progress(done, total)`` follows the prompts.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: the prompt list is empty")
    rows = done = 0
    for res in source.residual_batches(prompts):
        if should_stop is not None and should_stop():
            break
        n, length, d = res.hidden.shape
        keep = res.content_mask if positions == "content" else torch.ones_like(res.content_mask)
        index = torch.arange(done, done + n, dtype=torch.int32, device=keep.device)[:, None].expand(n, length)
        pos = torch.arange(length, dtype=torch.int32, device=keep.device)[None, :].expand(n, length)
        writer.add(res.hidden[keep].cpu(), prompt_index=index[keep].cpu(), position=pos[keep].cpu())
        rows += int(keep.sum())
        done += n
        if on_progress is not None:
            on_progress(done, len(prompts))
    return rows


def collect_text_store(
    source: TextLayerSource,
    prompts: Sequence[str],
    folder: str | Path,
    *,
    positions: str = "all",
    dtype: str = "float16",
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path | None:
    """Collect ``prompts``' activations at ``source``'s layer into a store in ``folder``.

    The store's attrs record the hookpoint (the layer path), width, padding, positions, the prompt count and
    fingerprint, plus ``attrs``. Returns the folder, or ``None`` when ``should_stop`` interrupted the
    collection (the store is then left marked incomplete; a complete store it was replacing stays).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: the prompt list is empty")
    probe = source.residual(prompts[:1])
    d = int(probe.hidden.shape[-1])
    meta = {"hookpoint": source.layer_path, "layer": source.layer_index, "d": d, "pad_to": source.pad_to,
            "positions": positions, "n_prompts": len(prompts), "prompts_fingerprint": prompts_fingerprint(prompts),
            "kind": "text", **dict(attrs or {})}
    width = 2 if dtype in ("float16", "bfloat16") else 4
    shard = max(1024, (256 << 20) // (d * width))
    writer = ActivationWriter(folder, d=d, dtype=dtype, shard_tokens=shard, metadata_columns=TEXT_COLUMNS,
                              attrs=meta, overwrite=overwrite)
    with writer:
        collect_text_activations(source, prompts, writer, positions=positions, should_stop=should_stop,
                                 on_progress=on_progress)
        if should_stop is not None and should_stop():
            writer.abort("interrupted")
            return None
    return Path(folder)


def train_text_sae(
    source: TextLayerSource,
    prompts: Sequence[str],
    cfg: TrainConfig,
    total_steps: int,
    *,
    positions: str = "all",
    whiten: bool = False,
    whiten_eps: float = 1e-2,
    store_dir: str | Path | None = None,
    store_dtype: str = "float32",
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> SparseAutoencoder:
    """Train a TopK SAE on ``source``'s layer from ``prompts``: :func:`collect_text_store` into ``store_dir``
    (a temporary folder when ``None``), then :func:`~sae_core.store_training.train_sae_on_store`.

    The SAE records the layer path as its hookpoint. ``whiten`` trains in ZCA-whitened coordinates and folds
    the map into the weights (see :mod:`sae_core.whitening`).
    """
    if cfg.hookpoint is None:
        cfg = replace(cfg, hookpoint=source.layer_path)
    with tempfile.TemporaryDirectory(prefix="text-sae-") as tmp:
        folder = Path(store_dir) if store_dir is not None else Path(tmp) / "store"
        collect_text_store(source, prompts, folder, positions=positions, dtype=store_dtype, overwrite=True)
        run: StoreTraining = train_sae_on_store(ActivationReader(folder), cfg, total_steps, whiten=whiten,
                                                whiten_eps=whiten_eps, checkpoint_dir=checkpoint_dir,
                                                progress=progress)
    return run.sae
