"""Diagonal Fisher information for Selective Amnesia, its files, and the SD v1.4 converter.

Estimator (the reference's, with an optional timestep subsample)
-----------------------------------------------------------------
For each sample x (a generated image/latent with its own prompt), with T = ``total_timesteps``
and K = ``timesteps_per_sample``:

1. draw K stratified timesteps ``t_k`` (one uniform draw inside each of K equal strata of
   ``[0, T)``; K = T gives exactly ``0..T-1``) and one fresh noise draw per timestep;
2. ``g = (T / K) * grad_theta sum_k loss(x, t_k, eps_k)`` where ``loss`` is the
   mean-over-elements eps-MSE of one timestep. With K = T this is the reference's gradient
   of the SUM over all 1000 timesteps; with K < T the T/K factor keeps F on the same scale,
   so the reference lam = 50 keeps its meaning;
3. ``F += g * g`` PER SAMPLE (never square a batch-averaged gradient: that is about B times
   too small), averaged over samples.

theta are the BASE weights of the LoRA targets only (``fisher_params``); biases and norms
are not adapted and need no Fisher.

The estimate is kept as a running mean in fp32 with its sample count. Files are safetensors
(``diffusion_model.<module>.weight`` keys, fp32) with metadata ``format``, ``count``,
``timesteps_per_sample``, ``total_timesteps``, ``seed`` and ``targets``. Every sample's
timesteps and noise come from a generator seeded by (seed, sample index), so a run that is
stopped and resumed from its file gives the same result as an uninterrupted run.

Loss contract
-------------
``loss_fn(sample, t, generator) -> Tensor[K]``: ``sample`` is one item of ``samples``;
``t`` is a CPU ``LongTensor[K]``; ``generator`` is a CPU ``torch.Generator`` private to the
sample, from which the loss draws its K noise tensors (``torch.randn(..., generator=generator)``,
then moved to the model's device). It returns the K per-timestep, mean-reduced losses.
:func:`eps_mse_loss_fn` builds one for an epsilon-prediction denoiser; :func:`eps_mse_loss`
is the underlying loss.

A stopped run resumes from its file (:mod:`sae_core.amnesia.resumable`: the same loop shape
and the same reuse / resume / refuse rule as the LoRA trainer). Hosts reach the estimator through
:func:`sae_core.amnesia.pipeline.estimate_fisher`; a pickled Fisher (the published SD v1.4 one)
is converted by :mod:`sae_core.amnesia.convert`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from ..artefacts import Action, ArtefactError, load_tensors, read_metadata, save_tensors
from .ewc import fisher_key
from .lora import UNET_PREFIX, LoRALayer, select_targets
from .resumable import decide_checkpoint, run_units

__all__ = [
    "FISHER_FORMAT",
    "FisherFile",
    "FisherEstimate",
    "stratified_timesteps",
    "sample_generator",
    "fisher_params",
    "eps_mse_loss",
    "eps_mse_loss_fn",
    "compute_fisher",
    "fisher_file_identity",
    "save_fisher",
    "load_fisher",
]

#: Value of the ``format`` metadata field in our Fisher files.
FISHER_FORMAT = "sae_core.fisher"

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
LossFn = Callable[[object, torch.Tensor, torch.Generator], torch.Tensor]


class FisherFile(NamedTuple):
    """A Fisher file's content."""

    fisher: dict[str, torch.Tensor]
    """``{key: F}``, fp32, same shapes as the weights."""
    count: Optional[int]
    """Number of samples averaged (None if the file does not say, e.g. a converted file)."""
    metadata: dict[str, str]
    """All safetensors metadata fields."""


class FisherEstimate(dict):
    """``{key: F}`` returned by :func:`compute_fisher`, plus how it was obtained.

    Attributes:
        count: number of samples averaged.
        stopped: True when ``should_stop`` ended the run early (the file holds the partial
            estimate; call again with ``resume=True`` to continue).
    """

    def __init__(self, data: Mapping[str, torch.Tensor], count: int, stopped: bool) -> None:
        super().__init__(data)
        self.count = count
        self.stopped = stopped


# --------------------------------------------------------------------------- building blocks


def stratified_timesteps(k: int, total_timesteps: int = 1000, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """K timesteps, one uniformly drawn inside each of K equal strata of ``[0, total_timesteps)``.

    K = ``total_timesteps`` returns ``arange(total_timesteps)``.
    """
    if not (1 <= k <= total_timesteps):
        raise ValueError(f"timesteps_per_sample must be in [1, {total_timesteps}], got {k}")
    edges = (torch.arange(k + 1, dtype=torch.float64) * total_timesteps / k).floor().long()
    width = (edges[1:] - edges[:-1]).double()
    u = torch.rand(k, generator=generator, dtype=torch.float64)
    return edges[:-1] + (u * width).floor().long().clamp_max((width - 1).long())


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator private to sample ``index`` of a run seeded with ``seed``.

    (seed, index) is hashed to the generator seed: torch's CPU generator keeps only the low
    32 bits of its seed, so packing the run seed into the high bits would ignore it.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def fisher_params(root: nn.Module, targets: Union[str, Iterable[str]], prefix: str = UNET_PREFIX) -> dict[str, nn.Parameter]:
    """Base weights of the LoRA target layers, keyed ``diffusion_model.<module>.weight``.

    Works before or after ``inject_lora`` (a LoRA layer contributes its base weight).
    """
    out: dict[str, nn.Parameter] = {}
    for name in select_targets(root, targets):
        mod = root.get_submodule(name)
        if isinstance(mod, LoRALayer):
            mod = mod.base
        out[fisher_key(name, prefix)] = mod.weight
    return out


def eps_mse_loss(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    context: Optional[torch.Tensor],
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    target_fn: Optional[Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Per-timestep eps-prediction MSE, mean over all elements of each row: ``Tensor[K]``.

    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; loss_k = mean((denoiser(x_t, t, context) - eps)^2).

    Args:
        denoiser: ``eps(x, t, context)`` (e.g. an LDM UNet called as ``unet(x, t, context)``).
        x0: clean sample, ``[C, H, W]``, ``[1, C, H, W]`` or ``[K, C, H, W]``; expanded to K rows.
        context: conditioning, ``[L, D]``, ``[1, L, D]`` or ``[K, L, D]`` (or None); expanded likewise.
        t: ``LongTensor[K]`` timesteps.
        noise: ``[K, C, H, W]``, one draw per timestep.
        alphas_cumprod: ``[T]`` cumulative products of (1 - beta).
        target_fn: ``target_fn(x_t, t, context, noise) -> [K, C, H, W]`` replaces the target
            ``eps`` (e.g. a frozen teacher's prediction for some rows); called without gradients.
    """
    k = t.shape[0]
    if x0.dim() == noise.dim() - 1:
        x0 = x0.unsqueeze(0)
    if x0.shape[0] == 1 and k != 1:
        x0 = x0.expand(k, *x0.shape[1:])
    if x0.shape != noise.shape:
        raise ValueError(f"eps_mse_loss: x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} do not match for K={k}")
    dev = x0.device
    t_dev = t.to(dev)
    abar = alphas_cumprod.to(dev, torch.float32)[t_dev].view(k, *([1] * (x0.dim() - 1)))
    noise = noise.to(dev)
    x_t = (abar.sqrt() * x0.float() + (1.0 - abar).sqrt() * noise.float()).to(x0.dtype)
    if context is not None:
        if context.dim() == 2:
            context = context.unsqueeze(0)
        if context.shape[0] == 1 and k != 1:
            context = context.expand(k, *context.shape[1:])
    target = noise
    if target_fn is not None:
        with torch.no_grad():
            target = target_fn(x_t, t_dev, context, noise).detach()
        if target.shape != noise.shape:
            raise ValueError(f"eps_mse_loss: target_fn returned {tuple(target.shape)}, expected {tuple(noise.shape)}")
    eps = denoiser(x_t, t_dev, context)
    return (eps.float() - target.float()).square().flatten(1).mean(1)


def eps_mse_loss_fn(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    alphas_cumprod: torch.Tensor,
    device: Optional[Union[str, torch.device]] = None,
) -> LossFn:
    """A ``loss_fn`` for :func:`compute_fisher` from an eps-prediction denoiser.

    Each sample is ``(x0, context)`` (or a mapping with keys ``"x0"`` and ``"context"``),
    with x0 ``[C, H, W]`` or ``[1, C, H, W]``. Noise is drawn on the CPU from the sample's
    generator (device-independent) and moved to ``device`` (default: x0's device).
    """

    def loss_fn(sample: object, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if isinstance(sample, Mapping):
            x0, context = sample["x0"], sample.get("context")
        else:
            x0, context = sample  # type: ignore[misc]
        dev = device if device is not None else x0.device
        x0 = x0.to(dev)
        if context is not None:
            context = context.to(dev)
        shape = x0.shape[1:] if x0.dim() == 4 else x0.shape
        noise = torch.randn((t.shape[0], *shape), generator=generator, dtype=torch.float32).to(dev)
        return eps_mse_loss(denoiser, x0, context, t, noise, alphas_cumprod)

    return loss_fn


# --------------------------------------------------------------------------- files


def save_fisher(path: PathLike, fisher: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, object]] = None) -> None:
    """Write a Fisher dict as fp32 safetensors, atomically. Non-string metadata is stored as JSON."""
    meta = {"format": FISHER_FORMAT}
    meta.update(metadata or {})
    meta.setdefault("targets", sorted(fisher))
    save_tensors(path, fisher, meta, dtype=torch.float32)


def load_fisher(
    path: PathLike,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> FisherFile:
    """Read a Fisher safetensors file (ours or a converted one).

    Args:
        dtype: fp32 (default) or bf16; fp16 is refused (small values underflow).
    """
    if dtype == torch.float16:
        raise ValueError("Fisher dtype float16 is refused: small Fisher values underflow; use float32 or bfloat16")
    meta = read_metadata(path, "Fisher file")
    if meta.get("format") != FISHER_FORMAT:
        raise ArtefactError(path, f"not a Fisher file (metadata format={meta.get('format')!r}, expected {FISHER_FORMAT!r})")
    tensors = load_tensors(path, what="Fisher file")
    for key, value in tensors.items():
        # a Fisher is a mean of squared gradients: a negative entry would turn the EWC penalty into a reward
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise ArtefactError(path, f"Fisher tensor {key!r} must hold finite values >= 0 (squared gradients)")
    fisher = {k: v.to(device or "cpu", dtype) for k, v in tensors.items()}
    count = int(meta["count"]) if meta.get("count", "").isdigit() else None
    return FisherFile(fisher, count, meta)


# --------------------------------------------------------------------------- estimator


def fisher_file_identity(path: PathLike, fields: Iterable[str]) -> tuple[dict[str, object], Optional[int]]:
    """``(identity, count)`` recorded in a Fisher file: the metadata ``fields`` plus its tensor layout
    (``layout``: ``{key: shape}``) and the number of samples averaged (None if it does not say)."""
    from safetensors import safe_open

    meta = read_metadata(path, "Fisher file")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            layout = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors' own error type for a damaged file
        raise ArtefactError(path, f"Fisher file is not a readable safetensors file ({err})") from err
    found: dict[str, object] = {k: meta.get(k) for k in fields}
    found["layout"] = layout
    count = int(meta["count"]) if meta.get("count", "").isdigit() else None
    return found, count


def compute_fisher(
    loss_fn: LossFn,
    params: Mapping[str, nn.Parameter],
    samples: Iterable[object],
    timesteps_per_sample: int,
    total_timesteps: int = 1000,
    out_path: Optional[PathLike] = None,
    resume: bool = True,
    progress: bool = True,
    should_stop: Optional[Callable[[], bool]] = None,
    *,
    seed: int = 0,
    max_samples: Optional[int] = None,
    save_every: int = 20,
    callback: Optional[Callable[[int, Optional[int]], None]] = None,
    metadata: Optional[Mapping[str, object]] = None,
    identity: Optional[Mapping[str, str]] = None,
    redo_different: bool = False,
    chunk_size: Optional[int] = None,
) -> FisherEstimate:
    """Diagonal Fisher of ``params`` (see the module docstring for the estimator).

    Args:
        loss_fn: ``loss_fn(sample, t: LongTensor[K], generator) -> Tensor[K]`` (module docstring).
        params: ``{key: base weight}``, e.g. from :func:`fisher_params`. Their ``requires_grad``
            is switched on for the run and restored afterwards; for speed, freeze the rest of
            the model (only these gradients are computed either way).
        samples: the samples, in a fixed order (resuming skips the first ``count``; a
            ``Sequence`` is indexed directly, any other iterable is advanced past them).
        timesteps_per_sample: K, timesteps per sample (1000 = the reference's full sum).
        total_timesteps: T of the diffusion schedule; the summed gradient is scaled by T/K.
        out_path: safetensors file for the estimate, saved every ``save_every`` samples, on
            stop and at the end (atomically).
        resume: continue from ``out_path`` if it holds this run: its K, T, seed, ``identity`` and tensor
            layout match (:mod:`sae_core.amnesia.resumable`; another run's file is refused with
            ``FileExistsError`` naming what differs, unless ``redo_different``).
        progress: show a tqdm bar.
        should_stop: polled before every sample; True saves the partial estimate and returns
            (``stopped=True``), e.g. ComfyUI's interrupt flag.
        seed: seeds every sample's timestep/noise generator together with its index.
        max_samples: stop after this many samples in total (default: all of ``samples``).
        save_every: samples between intermediate saves (0: only when stopped or done).
        callback: ``callback(count, total)`` after every sample (e.g. a ComfyUI ProgressBar).
        metadata: extra metadata written to the file.
        identity: extra metadata fields written to the file that a resumed file must carry too
            (e.g. the fingerprint of the model and of the data).
        redo_different: start over, instead of refusing, when ``out_path`` holds another run.
        chunk_size: timesteps per backward pass (memory bound); ``loss_fn`` is called once per
            chunk (drawing that chunk's noise from the same generator) and the gradients of the
            chunks are summed, which is the gradient of the sum. None: all K at once.

    Returns:
        ``{key: F}`` in fp32 on the parameters' devices (a :class:`FisherEstimate`).

    Run it with autograd available (inside a ComfyUI node: under ``torch.inference_mode(False)``,
    on parameters that are not inference tensors).
    """
    if not params:
        raise ValueError("compute_fisher: params is empty; pass the base weights of the LoRA targets (see fisher_params)")
    k, big_t = int(timesteps_per_sample), int(total_timesteps)
    if big_t < 1:
        raise ValueError(f"total_timesteps must be >= 1, got {big_t}")
    if not (1 <= k <= big_t):
        raise ValueError(f"timesteps_per_sample must be in [1, {big_t}], got {k}")
    if save_every < 0:
        raise ValueError(f"save_every must be >= 0, got {save_every}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    names = list(params)
    plist = [params[n] for n in names]
    expected = {"format": FISHER_FORMAT, "timesteps_per_sample": str(k), "total_timesteps": str(big_t), "seed": str(int(seed))}

    expected.update({str(key): str(v) for key, v in (identity or {}).items()})
    wanted = {**expected, "layout": {n: list(p.shape) for n, p in params.items()}}

    running = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    count = 0
    path = os.fspath(out_path) if out_path is not None else None
    total: Optional[int] = None
    if isinstance(samples, Sequence) or hasattr(samples, "__len__"):
        total = len(samples)  # type: ignore[arg-type]
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)

    def resume_from(file: str, found_count: int) -> None:
        nonlocal count, running
        tensors = load_tensors(file, what="Fisher file")
        count = found_count
        running = {n: tensors[n].to(params[n].device, torch.float32) for n in names}

    work = path  # where checkpoints go; a redo works beside the old file and replaces it only when complete
    if path is not None and resume and os.path.exists(path):
        try:
            found, found_count = fisher_file_identity(path, expected)
        except ArtefactError:
            if not redo_different:
                raise
            found, found_count = {"unreadable": path}, 0
        if found_count is None:
            raise ArtefactError(path, "cannot resume: metadata 'count' is missing or invalid")
        decision = decide_checkpoint("Fisher estimate", path, wanted, found, redo_different=redo_different,
                                     complete=total is not None and found_count >= total)
        if decision.action is Action.REDO:
            log.warning("%s; %s is kept until the new estimate is complete", decision.message, path)
            work = staging_path(path)
        else:
            resume_from(path, found_count)
    if work is not None and work != path and os.path.exists(work):  # a redo that was stopped: continue it
        try:
            found, found_count = fisher_file_identity(work, expected)
        except ArtefactError:
            found, found_count = None, None
        if found == wanted and found_count is not None:
            resume_from(work, found_count)

    def save() -> None:
        assert work is not None
        meta = dict(expected)
        meta.update({"count": str(count), "targets": names,
                     "estimator": "mean over samples of ((T/K) * grad of the sum over K stratified timesteps)^2"})
        meta.update(metadata or {})
        save_tensors(work, running, meta, dtype=torch.float32)

    def finish(estimate: FisherEstimate) -> FisherEstimate:
        if work is not None and work != path and not estimate.stopped and os.path.exists(work):
            os.replace(work, path)  # the new estimate is complete: only now does it replace the old file
        return estimate

    if total is not None and count >= total and count > 0:
        return finish(FisherEstimate(running, count, stopped=False))

    if isinstance(samples, Sequence):
        stream: Iterable[object] = (samples[i] for i in range(count, len(samples)))
    else:
        stream = islice(iter(samples), count, None)

    scale = big_t / k
    step = k if not chunk_size else int(chunk_size)

    def add_sample(sample: object) -> None:
        nonlocal count
        gen = sample_generator(seed, count)
        t = stratified_timesteps(k, big_t, gen)
        grads = None
        for c0 in range(0, k, step):  # the gradient of the sum, accumulated chunk by chunk
            t_chunk = t[c0 : c0 + step]
            losses = loss_fn(sample, t_chunk, gen)
            if not isinstance(losses, torch.Tensor) or losses.reshape(-1).shape[0] != t_chunk.shape[0]:
                got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ValueError(f"loss_fn must return a Tensor of {t_chunk.shape[0]} per-timestep losses, got {got}")
            if not torch.isfinite(losses).all():
                raise ValueError(f"loss_fn returned a non-finite loss for sample {count}")
            part = torch.autograd.grad(losses.sum() * scale, plist, allow_unused=True)
            grads = part if grads is None else tuple(
                a if b is None else (b if a is None else a + b) for a, b in zip(grads, part))
        assert grads is not None
        unused = [n for n, g in zip(names, grads) if g is None]
        if unused:
            raise ValueError(f"these Fisher parameters do not influence the loss (wrong model or targets?): {unused[:5]}")
        finite = [torch.isfinite(g).all() for g in grads]
        if not bool(torch.stack([f.to(finite[0].device) for f in finite]).all()):  # one sync per sample
            bad = [n for n, f in zip(names, finite) if not bool(f)]
            raise ValueError(f"non-finite gradient at sample {count} for {bad[:5]}")
        n_new = count + 1
        for n, g in zip(names, grads):
            r = running[n]
            r.add_(g.detach().float().square().sub_(r).div_(n_new))  # running mean: r += (g^2 - r) / n
        count = n_new

    flags = [p.requires_grad for p in plist]
    try:
        for p in plist:
            p.requires_grad_(True)
        with torch.enable_grad():
            end = run_units(stream, add_sample, done=count, total=total,
                            save=save if work is not None else None, saved=lambda: work is not None and os.path.exists(work),
                            save_every=save_every, should_stop=should_stop, desc="Fisher", unit="sample",
                            progress=progress, leave=True,
                            on_unit=(lambda c, _: callback(c, total)) if callback is not None else None)
    finally:
        for p, f in zip(plist, flags):
            p.requires_grad_(f)
    if end.done == 0 and not end.stopped:
        raise ValueError("compute_fisher: no samples were processed (samples is empty)")
    return finish(FisherEstimate(running, end.done, end.stopped))


def staging_path(path: PathLike) -> str:
    """Where a recomputation of the Fisher file ``path`` checkpoints until it replaces ``path`` (hidden)."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}.next")

