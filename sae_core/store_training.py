"""Train a TopK SAE on an activation store: the one training path of the Train SAE node, the text-SAE
command line and the MiniCanvas ItD plug-in.

:func:`train_sae_on_store` streams shuffled batches from an :class:`~sae_core.store.ActivationReader`
into :class:`~sae_core.trainer.SaeTrainer` (resumable from its checkpoint folder; a resumed run starts
the store's stream at the first batch it has not trained on, without reading the earlier ones), and
optionally trains in ZCA-whitened coordinates (:mod:`sae_core.whitening`): the map is fitted on the
store, kept beside the checkpoint so a resumed run uses the very same one, and folded into the
returned SAE, which then reads raw activations like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .artefacts import load_tensors, save_tensors
from .config import TrainConfig
from .sae import SparseAutoencoder
from .store import ActivationReader
from .trainer import SaeTrainer
from .whitening import Whitening, WhiteningStats, fold_whitening

__all__ = ["WHITENING_NAME", "StoreTraining", "store_whitening", "train_sae_on_store"]

WHITENING_NAME = "whitening.safetensors"
"""File in a checkpoint folder holding the whitening map of a whitened run."""


class StoreTraining(NamedTuple):
    """What :func:`train_sae_on_store` returns."""

    sae: SparseAutoencoder
    """The SAE (whitening folded in, per-token TopK); the state at the stop when interrupted."""
    trainer: SaeTrainer
    """The trainer (``interrupted``, ``step``, ``history``)."""
    whitening: Whitening | None
    """The whitening map trained under (``None`` for a raw run)."""


@torch.no_grad()
def store_whitening(reader: ActivationReader, eps: float = 1e-2, max_rows: int = 2_000_000,
                    batch_rows: int = 65536) -> Whitening:
    """ZCA whitening fitted on the first ``max_rows`` rows of the store in store order (all of a small store)."""
    stats = WhiteningStats()
    for batch in reader.iter_batches(min(batch_rows, max(1, len(reader))), shuffle=False):
        stats.add(batch[: max_rows - stats.n])
        if stats.n >= max_rows:
            break
    return stats.fit(eps)


def _checkpoint_whitening(reader: ActivationReader, ckpt: Path | None, eps: float, max_rows: int,
                          resume: bool) -> Whitening:
    path = ckpt / WHITENING_NAME if ckpt is not None else None
    if path is not None and resume and path.is_file():
        return Whitening.from_tensors(load_tensors(path, what="whitening map"))
    w = store_whitening(reader, eps, max_rows)
    if path is not None:
        save_tensors(path, {k: v.contiguous() for k, v in w.tensors().items()}, {"eps": str(eps)})
    return w


def train_sae_on_store(
    reader: ActivationReader,
    cfg: TrainConfig,
    total_steps: int,
    *,
    whiten: bool = False,
    whiten_eps: float = 1e-2,
    whiten_rows: int = 2_000_000,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> StoreTraining:
    """Train a TopK SAE (``cfg``; ``cfg.batch_size`` rows a step, ``cfg.batch_topk`` for BatchTopK) on ``reader``.

    Batches are drawn without replacement, epoch after epoch, in an order fixed by ``cfg.seed``.
    ``whiten``: train on ZCA-whitened rows (fitted on up to ``whiten_rows`` rows, ``whiten_eps`` as in
    :func:`sae_core.whitening.fit_whitening`) and fold the map into the result. With ``checkpoint_dir`` the
    trainer checkpoints there (its ``sae/`` export of a whitened run reads whitened rows) and ``resume``
    continues a checkpoint found there. ``should_stop`` / ``on_step`` are the trainer's.
    """
    if cfg.batch_size <= 0:
        raise ValueError(f"batch_size must be positive to train from a store, got {cfg.batch_size}")
    if len(reader) < cfg.batch_size:
        raise ValueError(f"batch_size: the store {reader.folder} has only {len(reader)} rows, fewer than one batch "
                         f"of {cfg.batch_size}; collect more activations or lower batch_size")
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    whitening = _checkpoint_whitening(reader, ckpt, whiten_eps, whiten_rows, resume) if whiten else None
    per_epoch = reader.num_batches(cfg.batch_size, drop_last=True)
    trainer = SaeTrainer(cfg, int(reader.d))

    def stream(start_token: int) -> Iterator[Tensor]:
        done = start_token // cfg.batch_size
        for _, batch in reader.iter_epochs(cfg.batch_size, drop_last=True, seed=cfg.seed, device=cfg.device,
                                           start_epoch=done // per_epoch, start_batch=done % per_epoch):
            yield whitening.apply(batch) if whitening is not None else batch

    sae = trainer.train(stream, int(total_steps), checkpoint_dir=ckpt, resume=resume, progress=progress,
                        should_stop=should_stop, on_step=on_step)
    if whitening is not None:
        sae = fold_whitening(sae, whitening)
    return StoreTraining(sae, trainer, whitening)
