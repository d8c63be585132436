"""Training loop for the TopK sparse autoencoder (SAeUron's recipe).

Per step: renormalise decoder rows, forward (BatchTopK by default), loss ``FVU + auxk_alpha * AuxK``,
backward, clip the gradient norm, remove the gradient component parallel to each decoder row,
Adam step with a linearly decaying learning rate. ``b_dec`` starts at the geometric median of the
first batch. A latent is dead once it has not fired for ``dead_feature_threshold`` tokens.

Resuming
--------
A checkpoint folder holds ``trainer_state.safetensors`` (model, Adam moments, tokens-since-fired,
the trainer's RNG state and, as JSON metadata, step / tokens consumed / history / config) and
``sae/`` (the current SAE in our folder layout, for use outside training). ``train(..., resume=True)``
continues from it bit-exactly provided ``batches`` yields the same token stream as the first run:
pass either a fresh iterable over the whole stream (the trainer discards the tokens already
trained on), or a callable ``batches(start_token) -> Iterable`` that starts the stream at
``start_token`` itself (cheaper for large on-disk datasets).
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import SaeConfig, TrainConfig, resolve_dtype
from .artefacts import ArtefactError, load_tensors, read_metadata, save_tensors
from .formats import save_sae
from .sae import SparseAutoencoder
from .utils import geometric_median, rechunk

__all__ = ["SaeTrainer", "STATE_NAME", "EXPORT_DIR"]

STATE_NAME = "trainer_state.safetensors"
EXPORT_DIR = "sae"
_STATE_KEY = "trainer_state"
_STATE_VERSION = 1

Batches = Iterable[Tensor] | Callable[[int], Iterable[Tensor]]


def _skip_tokens(batches: Iterable[Tensor], skip: int) -> Iterator[Tensor]:
    """Yield batches as given after discarding whole batches worth ``skip`` tokens."""
    for batch in batches:
        n = batch.reshape(-1, batch.shape[-1]).shape[0]
        if skip > 0:
            if n > skip:
                raise ValueError(
                    "cannot resume: the incoming batches do not align with the checkpoint's token count "
                    "(set TrainConfig.batch_size so batches are re-chunked)"
                )
            skip -= n
            continue
        yield batch


def _make_adam(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    """Fused Adam where this torch build supports it (one pass over each tensor; ~7x faster than
    the per-tensor loop on CPU at SAeUron's size), otherwise the default implementation."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), **kwargs)


class SaeTrainer:
    """Trains one :class:`SparseAutoencoder` on a stream of ``[B, d_in]`` activation batches."""

    def __init__(self, cfg: TrainConfig, d_in: int) -> None:
        self.cfg = cfg
        self.d_in = int(d_in)
        self.device = torch.device(cfg.device)
        self.compute_dtype = resolve_dtype(cfg.dtype)
        self.generator = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
        with torch.inference_mode(False):  # ComfyUI runs nodes under inference_mode
            self.sae = SparseAutoencoder(cfg.sae_config(self.d_in), device=self.device, dtype=torch.float32, generator=self.generator)
            self.sae.train()
            self.param_names = [name for name, _ in self.sae.named_parameters()]
            self.optimizer = _make_adam(self.sae, cfg)
            self.tokens_since_fired = torch.zeros(self.sae.num_latents, dtype=torch.long, device=self.device)
        self.k_aux = int(cfg.k_aux) if cfg.k_aux else self.d_in // 2
        self.step = 0
        self.tokens_consumed = 0
        self.total_steps: int | None = None
        self.history: list[dict[str, float]] = []
        self.interrupted = False

    # -- schedule -----------------------------------------------------------------------------
    def lr_at(self, step: int, total_steps: int) -> float:
        """Linear warm-up over ``lr_warmup_steps``, then linear decay to 0 at ``total_steps``."""
        warm = self.cfg.lr_warmup_steps
        if step < warm:
            return self.cfg.lr * (step + 1) / warm
        return self.cfg.lr * max(total_steps - step, 0) / max(total_steps - warm, 1)

    # -- training -----------------------------------------------------------------------------
    def _stream(self, batches: Batches) -> Iterator[Tensor]:
        start = self.tokens_consumed
        if callable(batches):
            source, skip = batches(start), 0
        else:
            source, skip = batches, start
        if self.cfg.batch_size:
            return rechunk(source, self.cfg.batch_size, skip_tokens=skip)
        return _skip_tokens(source, skip)

    def train(
        self,
        batches: Batches,
        total_steps: int,
        checkpoint_dir: str | Path | None = None,
        resume: bool = True,
        progress: bool = True,
        callback: Callable[[dict[str, float]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    ) -> SparseAutoencoder:
        """Train until ``total_steps`` optimiser steps have run (counting resumed ones).

        ``batches``: an iterable of ``[B, d_in]`` tensors, or ``batches(start_token)`` (see module doc).
        ``checkpoint_dir``: where checkpoints go every ``checkpoint_every`` steps and at the end;
        with ``resume`` an existing checkpoint there is continued. ``callback(entry)`` receives each
        history entry; ``on_step(step, total_steps, metrics)`` runs after every step;
        ``should_stop()`` is polled before every step: when it returns True the trainer saves a
        checkpoint, sets ``self.interrupted`` and returns. Returns the SAE ready for inference
        (a copy with per-token TopK). Safe to call under ``torch.inference_mode()`` / ``no_grad``
        (as inside a ComfyUI node): training re-enables autograd itself.
        """
        with torch.inference_mode(False), torch.enable_grad():
            return self._train(batches, total_steps, checkpoint_dir, resume, progress, callback, should_stop, on_step)

    def _train(self, batches, total_steps, checkpoint_dir, resume, progress, callback, should_stop, on_step):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if ckpt is not None and resume and (ckpt / STATE_NAME).is_file():
            self.load_checkpoint(ckpt)
        self.total_steps = int(total_steps)
        self.interrupted = False
        cfg = self.cfg
        window: dict[str, float] = {}
        window_n = 0
        saved_at = self.step
        bar = tqdm(total=total_steps, initial=self.step, disable=not progress, desc="SAE training", unit="step")
        try:
            for batch in self._stream(batches) if self.step < total_steps else ():
                if should_stop is not None and should_stop():
                    self.interrupted = True
                    break
                metrics = self._train_step(batch, total_steps)
                for key, value in metrics.items():
                    window[key] = window.get(key, 0.0) + value
                window_n += 1
                if self.step % max(cfg.log_every, 1) == 0 or self.step == total_steps:
                    entry = {"step": self.step, "tokens": self.tokens_consumed}
                    entry.update({key: value / window_n for key, value in window.items()})
                    entry["dead_frac"] = metrics["dead_frac"]
                    self.history.append(entry)
                    window, window_n = {}, 0
                    bar.set_postfix(fvu=f"{entry['fvu']:.4f}", l0=f"{entry['l0']:.1f}", dead=f"{entry['dead_frac']:.3f}")
                    if callback is not None:
                        callback(entry)
                bar.update(1)
                if on_step is not None:
                    on_step(self.step, total_steps, metrics)
                if ckpt is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(ckpt)
                    saved_at = self.step
                if self.step >= total_steps:
                    break
        finally:
            bar.close()
        if self.step < total_steps and not self.interrupted:
            warnings.warn(
                f"activation stream ended after {self.step} of {total_steps} steps; the SAE is under-trained",
                stacklevel=2,
            )
        if ckpt is not None and saved_at != self.step:
            self.save_checkpoint(ckpt)
        return self.export()

    def _train_step(self, batch: Tensor, total_steps: int) -> dict[str, float]:
        cfg, sae = self.cfg, self.sae
        x = batch.reshape(-1, batch.shape[-1])
        if x.shape[-1] != self.d_in:
            raise ValueError(f"training batch has width {x.shape[-1]} but the SAE has d_in={self.d_in}")
        x = x.to(device=self.device, dtype=torch.float32)
        if x.is_inference():  # made under inference_mode: autograd needs a normal tensor
            x = x.clone()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"training batch at step {self.step} contains NaN/Inf activations")
        n_tok = x.shape[0]
        if self.step == 0:
            with torch.no_grad():
                sae.b_dec.copy_(geometric_median(x, cfg.geometric_median_iters, cfg.geometric_median_tol))
        if cfg.normalize_decoder:
            sae.set_decoder_norm_to_unit_norm()
        dead_mask = self.tokens_since_fired > cfg.dead_feature_threshold
        lr = self.lr_at(self.step, total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        use_autocast = self.compute_dtype != torch.float32
        with torch.autocast(device_type=self.device.type, dtype=self.compute_dtype, enabled=use_autocast):
            out = sae(x, dead_mask=dead_mask if bool(dead_mask.any()) else None, k_aux=self.k_aux)
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"SAE training diverged at step {self.step} (loss {float(loss.detach()):g}); lower lr "
                                     f"(now {cfg.lr:g}) or grad_clip; the last checkpoint, if any, is kept")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        if cfg.normalize_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()

        with torch.no_grad():
            active = out.latent_acts > 0
            fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=self.device)
            fired[out.latent_indices[active]] = True
            self.tokens_since_fired += n_tok
            self.tokens_since_fired[fired] = 0
        self.step += 1
        self.tokens_consumed += n_tok
        return {
            "loss": float(loss.detach()),
            "fvu": float(out.fvu.detach()),
            "auxk": float(out.auxk_loss.detach()),
            "l0": float(active.sum()) / n_tok,
            "dead_frac": float(dead_mask.float().mean()),
            "lr": lr,
        }

    # -- outputs ------------------------------------------------------------------------------
    def export(self) -> SparseAutoencoder:
        """A copy of the current SAE for inference: per-token TopK, eval mode, no gradients."""
        self._check_finite()
        sae = copy.deepcopy(self.sae)
        sae.cfg = replace(self.sae.cfg, batch_topk=False, extra=dict(self.sae.cfg.extra))
        for param in sae.parameters():
            param.requires_grad_(False)
        return sae.eval()

    # -- checkpoints --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for name, param in self.sae.named_parameters():
            tensors[f"model.{name}"] = param.detach().cpu().contiguous()
        opt_state = self.optimizer.state_dict()["state"]
        for index, name in enumerate(self.param_names):
            for key, value in opt_state.get(index, {}).items():
                value = value if isinstance(value, Tensor) else torch.tensor(value)
                tensors[f"optim.{name}.{key}"] = value.detach().cpu().contiguous()
        tensors["tokens_since_fired"] = self.tokens_since_fired.cpu()
        tensors["rng.generator"] = self.generator.get_state()
        return tensors

    def _state_json(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "tokens_consumed": self.tokens_consumed,
            "total_steps": self.total_steps,
            "d_in": self.d_in,
            "train_config": self.cfg.to_dict(),
            "sae_config": self.sae.cfg.to_dict(),
            "history": self.history,
        }

    def _check_finite(self) -> None:
        for name, p in self.sae.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise FloatingPointError(f"SAE training diverged by step {self.step}: {name} holds NaN/Inf; lower lr "
                                         f"(now {self.cfg.lr:g}) or grad_clip; nothing was saved")

    def save_checkpoint(self, checkpoint_dir: str | Path) -> Path:
        """Write ``trainer_state.safetensors`` (atomically) and export ``sae/``; returns the folder."""
        self._check_finite()
        folder = Path(checkpoint_dir)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = self._state_tensors()
        metadata = {_STATE_KEY: json.dumps(self._state_json())}
        save_tensors(folder / STATE_NAME, tensors, metadata)
        save_sae(self.export(), folder / EXPORT_DIR, layout="folder")
        return folder

    def load_checkpoint(self, checkpoint_dir: str | Path) -> None:
        """Restore model, optimiser, counters, RNG and history from ``checkpoint_dir``."""
        with torch.inference_mode(False):
            self._load_checkpoint(checkpoint_dir)

    def _load_checkpoint(self, checkpoint_dir: str | Path) -> None:
        path = Path(checkpoint_dir) / STATE_NAME
        tensors = load_tensors(path, what="trainer checkpoint")
        meta = read_metadata(path, what="trainer checkpoint")
        try:
            state = json.loads(meta[_STATE_KEY])
            saved_cfg = SaeConfig.from_dict(state["sae_config"])
            step, consumed = int(state["step"]), int(state["tokens_consumed"])
            model = {name: tensors[f"model.{name}"] for name, _ in self.sae.named_parameters()}
            since_fired, rng = tensors["tokens_since_fired"], tensors["rng.generator"]
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ArtefactError(path, f"malformed trainer checkpoint: {what}") from exc
        mine = self.sae.cfg
        for key in ("d_in", "num_latents", "k", "batch_topk"):
            if getattr(saved_cfg, key) != getattr(mine, key):
                raise ValueError(
                    f"{path}: checkpoint has {key}={getattr(saved_cfg, key)} but this run has {key}={getattr(mine, key)}; "
                    "use another checkpoint folder or resume=False"
                )
        for name, param in self.sae.named_parameters():
            if tuple(model[name].shape) != tuple(param.shape) or not bool(torch.isfinite(model[name]).all()):
                raise ArtefactError(path, f"trainer checkpoint tensor model.{name} has the wrong shape or NaN/Inf values")
        with torch.no_grad():
            for name, param in self.sae.named_parameters():
                param.copy_(model[name])
        opt = self.optimizer.state_dict()
        opt_state: dict[int, dict[str, Tensor]] = {}
        params = dict(self.sae.named_parameters())
        for index, name in enumerate(self.param_names):
            prefix = f"optim.{name}."
            entry = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            if not entry:
                continue
            if set(entry) != {"step", "exp_avg", "exp_avg_sq"} or any(
                    tuple(entry[k].shape) != tuple(params[name].shape) for k in ("exp_avg", "exp_avg_sq")):
                raise ArtefactError(path, f"malformed trainer checkpoint: optimiser state of {name} has "
                                          f"{sorted(entry)} with other shapes than the parameter")
            opt_state[index] = entry
        opt["state"] = opt_state
        self.optimizer.load_state_dict(opt)
        if tuple(since_fired.shape) != (self.sae.num_latents,):
            raise ArtefactError(path, f"malformed trainer checkpoint: tokens_since_fired has shape {tuple(since_fired.shape)}")
        try:
            self.generator.set_state(rng)
        except (RuntimeError, TypeError) as exc:
            raise ArtefactError(path, f"malformed trainer checkpoint: unusable random-generator state ({exc})") from exc
        self.tokens_since_fired = since_fired.to(self.device)
        self.step = step
        self.tokens_consumed = consumed
        self.history = list(state.get("history", []))
