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

Converter
---------
:func:`convert_fisher_pickle` turns a pickled ``{name: tensor}`` Fisher into our safetensors
format, keeping only the LoRA targets. It never unpickles without restriction:

* a ``torch.save`` file is read with ``torch.load(weights_only=True)``;
* a plain ``pickle.dump`` file (how the reference's ``combine_fisher_dict.py`` writes the
  published SD v1.4 Fisher) pickles each tensor as a call to ``torch.storage._load_from_bytes``,
  which would run ``torch.load(weights_only=False)`` on the embedded bytes, so weights-only
  loading refuses the file. :func:`load_plain_tensor_pickle` reads it with an allow-list
  unpickler instead: dicts, ``OrderedDict``, the tensor rebuild function and storages, each
  storage's bytes read with ``torch.load(weights_only=True)``. Any other global is refused.

Command line: ``python -m sae_core.fisher convert SRC DST --targets xattn``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import math
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from .ewc import fisher_key
from .artefacts import save_tensors
from .lora import TARGET_PRESETS, UNET_PREFIX, LoRALayer, preset_matches, select_targets

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
    "save_fisher",
    "load_fisher",
    "convert_fisher_pickle",
    "load_plain_tensor_pickle",
    "main",
]

#: Value of the ``format`` metadata field in our Fisher files.
FISHER_FORMAT = "sae_core.fisher"

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
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Fisher file not found: {path}")
    if dtype == torch.float16:
        raise ValueError("Fisher dtype float16 is refused: small Fisher values underflow; use float32 or bfloat16")
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FISHER_FORMAT:
        raise ValueError(f"{path}: not a Fisher file (metadata format={meta.get('format')!r}, expected {FISHER_FORMAT!r})")
    tensors = load_file(path, device="cpu")
    fisher = {k: v.to(device or "cpu", dtype) for k, v in tensors.items()}
    count = int(meta["count"]) if meta.get("count", "").isdigit() else None
    return FisherFile(fisher, count, meta)


# --------------------------------------------------------------------------- estimator


def _check_resume(path: str, meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor], expected: Mapping[str, str],
                  params: Mapping[str, nn.Parameter]) -> None:
    for field, value in expected.items():
        if meta.get(field) != value:
            raise ValueError(
                f"cannot resume from {path}: {field} is {meta.get(field)!r} in the file but {value!r} in this run "
                "(delete the file or pass resume=False to start over)"
            )
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"cannot resume from {path}: its tensors differ from the requested targets (missing {missing[:3]}, extra {extra[:3]})")
    for k, p in params.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise ValueError(f"cannot resume from {path}: {k} has shape {tuple(tensors[k].shape)} in the file, {tuple(p.shape)} in the model")


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
        resume: continue from ``out_path`` if it exists (its K, T, seed and targets must match).
        progress: show a tqdm bar.
        should_stop: polled before every sample; True saves the partial estimate and returns
            (``stopped=True``), e.g. ComfyUI's interrupt flag.
        seed: seeds every sample's timestep/noise generator together with its index.
        max_samples: stop after this many samples in total (default: all of ``samples``).
        save_every: samples between intermediate saves.
        callback: ``callback(count, total)`` after every sample (e.g. a ComfyUI ProgressBar).
        metadata: extra metadata written to the file.
        chunk_size: timesteps per backward pass (memory bound); ``loss_fn`` is called once per
            chunk (drawing that chunk's noise from the same generator) and the gradients of the
            chunks are summed, which is the gradient of the sum. None: all K at once.

    Returns:
        ``{key: F}`` in fp32 on the parameters' devices (a :class:`FisherEstimate`).

    Run it with autograd available (inside a ComfyUI node: under ``torch.inference_mode(False)``,
    on parameters that are not inference tensors).
    """
    from tqdm.auto import tqdm

    if not params:
        raise ValueError("compute_fisher: params is empty; pass the base weights of the LoRA targets (see fisher_params)")
    k, big_t = int(timesteps_per_sample), int(total_timesteps)
    if big_t < 1:
        raise ValueError(f"total_timesteps must be >= 1, got {big_t}")
    if not (1 <= k <= big_t):
        raise ValueError(f"timesteps_per_sample must be in [1, {big_t}], got {k}")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    names = list(params)
    plist = [params[n] for n in names]
    expected = {"format": FISHER_FORMAT, "timesteps_per_sample": str(k), "total_timesteps": str(big_t), "seed": str(int(seed))}

    running = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    count = 0
    path = os.fspath(out_path) if out_path is not None else None
    if path is not None and resume and os.path.exists(path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(path, device="cpu")
        _check_resume(path, meta, tensors, expected, params)
        if not meta.get("count", "").isdigit():
            raise ValueError(f"cannot resume from {path}: metadata 'count' is missing or invalid ({meta.get('count')!r})")
        count = int(meta["count"])
        running = {n: tensors[n].to(params[n].device, torch.float32) for n in names}

    total: Optional[int] = None
    if isinstance(samples, Sequence) or hasattr(samples, "__len__"):
        total = len(samples)  # type: ignore[arg-type]
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)

    def save() -> None:
        if path is None:
            return
        meta = dict(expected)
        meta.update({"count": str(count), "targets": names,
                     "estimator": "mean over samples of ((T/K) * grad of the sum over K stratified timesteps)^2"})
        meta.update(metadata or {})
        save_tensors(path, running, meta, dtype=torch.float32)

    if total is not None and count >= total and count > 0:
        return FisherEstimate(running, count, stopped=False)

    if isinstance(samples, Sequence):
        stream: Iterable[object] = (samples[i] for i in range(count, len(samples)))
    else:
        stream = islice(iter(samples), count, None)

    flags = [p.requires_grad for p in plist]
    scale = big_t / k
    bar = tqdm(total=total, initial=count, desc="Fisher", unit="sample", disable=not progress)
    stopped = False
    last_saved = count
    try:
        for p in plist:
            p.requires_grad_(True)
        with torch.enable_grad():
            for sample in stream:
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                gen = sample_generator(seed, count)
                t = stratified_timesteps(k, big_t, gen)
                grads = None
                step = k if not chunk_size else int(chunk_size)
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
                bar.update(1)
                if callback is not None:
                    callback(count, total)
                if count - last_saved >= save_every:
                    save()
                    last_saved = count
                if total is not None and count >= total:
                    break
    finally:
        for p, f in zip(plist, flags):
            p.requires_grad_(f)
        bar.close()
    if count == 0 and not stopped:
        raise ValueError("compute_fisher: no samples were processed (samples is empty)")
    if path is not None and (count != last_saved or not os.path.exists(path)):
        save()
    return FisherEstimate(running, count, stopped)


# --------------------------------------------------------------------------- converter


def _storage_from_bytes(data: bytes) -> object:
    """A storage pickled by ``torch.save`` inside a plain pickle, read weights-only."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"storage payload must be bytes, got {type(data).__name__}")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _encode(obj: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (text codecs only)."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(obj).__name__}, {encoding!r})")
    return obj.encode(encoding, errors)


_PLAIN_PICKLE_GLOBALS: dict[tuple[str, str], Callable[..., object]] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("_codecs", "encode"): _encode,
}


class _TensorDictUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled ``{name: tensor}`` dict needs; anything else is refused."""

    def find_class(self, module: str, name: str) -> Callable[..., object]:
        try:
            return _PLAIN_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a tensor pickle") from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not allowed in a plain tensor pickle")


def load_plain_tensor_pickle(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a ``{name: tensor}`` dict written with plain ``pickle.dump``, without running code.

    Only dicts, ``OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and storages are
    accepted; every storage's embedded ``torch.save`` bytes are read with
    ``torch.load(weights_only=True)``. Raises ``ValueError`` for anything else.
    """
    src = os.fspath(path)
    try:
        with open(src, "rb") as f:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                obj = _TensorDictUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{src}: not a plain pickle of tensors ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"{src}: expected a dict of name -> tensor, got {type(obj).__name__}")
    return dict(obj)


_REFUSAL_ADVICE = (
    "This converter never falls back to unrestricted unpickling, which can run arbitrary code. "
    "Re-save the dict with torch.save() in an isolated environment if you trust its source, "
    "or compute the Fisher for your model with compute_fisher()."
)


def _raw_pickle_protocol(path: str) -> Optional[int]:
    """Protocol of a file that starts like a plain ``pickle.dump`` (not a torch.save zip)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) == 2 and head[0] == 0x80:
        return head[1]
    return None


def _selected_keys(fisher: Mapping[str, torch.Tensor], targets: Union[str, Iterable[str]], prefix: str, src: str) -> list[str]:
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(f"unknown target preset {targets!r}; expected one of {', '.join(TARGET_PRESETS)} or module names")
        keys = []
        for key, v in fisher.items():
            if not (key.startswith(prefix) and key.endswith(".weight")):
                continue
            kind = {2: "linear", 4: "conv2d"}.get(v.dim())
            if kind and preset_matches(targets, key[len(prefix):-len(".weight")], kind):
                keys.append(key)
        if not keys:
            raise ValueError(f"{src}: target preset {targets!r} selects no weight (keys look like {sorted(fisher)[:3]})")
        return keys
    keys = [fisher_key(n, prefix) for n in targets]
    if not keys:
        raise ValueError("convert_fisher_pickle: the list of target module names is empty")
    missing = [k for k in keys if k not in fisher]
    if missing:
        raise ValueError(f"{src}: no Fisher entry for {len(missing)} target(s), e.g. {missing[:3]}")
    return keys


def convert_fisher_pickle(
    src: PathLike,
    dst: PathLike,
    targets: Union[str, Iterable[str]] = "xattn",
    *,
    prefix: str = UNET_PREFIX,
    metadata: Optional[Mapping[str, object]] = None,
) -> dict[str, tuple[int, ...]]:
    """Convert a pickled ``{name: tensor}`` Fisher (e.g. the SD v1.4 one) to our safetensors format.

    A ``torch.save`` file is read with ``torch.load(weights_only=True, map_location="cpu")``; a
    plain ``pickle.dump`` file (the published SD v1.4 Fisher) with :func:`load_plain_tensor_pickle`.
    Nothing else is tried; if both fail, a ValueError explains why and nothing is written.
    Keys ``model.diffusion_model.*`` are renamed ``diffusion_model.*``; a file whose keys have
    no ``diffusion_model.`` prefix is taken to be UNet-relative. Only the weights of
    ``targets`` (a preset, matched by name and by tensor rank: 2-D Linear, 4-D Conv2d, or a
    list of module names) are kept, as fp32.

    Returns:
        ``{kept key: shape}``.
    """
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    if not os.path.isfile(src_s):
        raise FileNotFoundError(f"Fisher pickle not found: {src_s}")
    is_zip = zipfile.is_zipfile(src_s)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # protocol notices; failures raise below
            obj = torch.load(src_s, weights_only=True, map_location="cpu", mmap=is_zip)
    except Exception as exc:  # noqa: BLE001 - any failure means "not safely loadable this way"
        reason = str(exc).strip().splitlines()
        reason_s = next((ln for ln in reversed(reason) if "WeightsUnpickler error" in ln or "Unsupported" in ln), reason[0] if reason else type(exc).__name__)
        proto = None if is_zip else _raw_pickle_protocol(src_s)
        if proto is None:
            raise ValueError(
                f"{src_s}: cannot be loaded with torch.load(weights_only=True) ({type(exc).__name__}: {reason_s}). " + _REFUSAL_ADVICE
            ) from exc
        try:
            obj = load_plain_tensor_pickle(src_s)
        except ValueError as exc2:
            raise ValueError(
                f"{src_s}: cannot be loaded with torch.load(weights_only=True) ({type(exc).__name__}: {reason_s}), "
                f"nor as a plain pickle.dump() file of tensors (protocol {proto}): {exc2}. " + _REFUSAL_ADVICE
            ) from exc2
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{src_s}: expected a non-empty dict of name -> tensor, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{src_s}: expected a dict of name -> tensor; offending entries: {bad[:3]}")

    fisher: dict[str, torch.Tensor] = {}
    has_prefix = any(k.startswith(prefix) or k.startswith("model." + prefix) for k in obj)
    for k, v in obj.items():
        if k.startswith("model." + prefix):
            k = k[len("model."):]
        elif not has_prefix:
            k = prefix + k
        fisher[k] = v
    keys = _selected_keys(fisher, targets, prefix, src_s)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        v = fisher[key].to(torch.float32)
        if not torch.isfinite(v).all():
            raise ValueError(f"{src_s}: Fisher entry {key} has non-finite values")
        if (v < 0).any():
            raise ValueError(f"{src_s}: Fisher entry {key} has negative values (a Fisher diagonal is >= 0); is this a Fisher file?")
        out[key] = v
    meta: dict[str, object] = {
        "source": os.path.basename(src_s),
        "origin": "converted",
        "targets": json.dumps(keys),
        "target_spec": targets if isinstance(targets, str) else json.dumps(list(targets)),
    }
    meta.update(metadata or {})
    save_fisher(dst_s, out, meta)
    return {k: tuple(v.shape) for k, v in out.items()}


# --------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sae_core.fisher convert SRC DST --targets xattn``."""
    parser = argparse.ArgumentParser(prog="python -m sae_core.fisher", description="Fisher information files for Selective Amnesia.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a pickled {name: tensor} Fisher (torch.save or plain pickle) to safetensors")
    conv.add_argument("src", help="source .pkl/.pt file (never unpickled without restriction)")
    conv.add_argument("dst", help="destination .safetensors file")
    conv.add_argument("--targets", default="xattn",
                      help=f"a preset ({', '.join(TARGET_PRESETS)}) or comma-separated module names (default: xattn)")
    args = parser.parse_args(argv)

    targets: Union[str, list[str]] = args.targets
    if args.targets not in TARGET_PRESETS:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        kept = convert_fisher_pickle(args.src, args.dst, targets)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = sum(math.prod(s) for s in kept.values())
    print(f"wrote {args.dst}: {len(kept)} tensors, {n:,} values ({n * 4 / 2**20:.1f} MiB fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
