"""Selective Amnesia: LoRA training with a surrogate objective, generative replay and EWC.

The objective minimised at every step (``methods/selective_amnesia.md`` §1.2, the reference
code's form, no 1/2 on the penalty):

    L = L_surrogate + gamma * L_replay + lam * sum_layers sum_ij F_ij * (s * B A)_ij ** 2

* ``L_surrogate``: eps-prediction MSE (mean over elements, then over the batch) of surrogate
  samples -- images of a harmless stand-in, e.g. "a middle aged man" for a celebrity or uniform
  noise -- conditioned on a *forget* prompt. It is MINIMISED: the forget prompt learns to
  produce the surrogate. (Gradient ascent on the forget concept, the paper's "naive" variant,
  is unstable and is not offered.)
* ``L_replay``: the same loss on samples the frozen base model generated for *remember*
  prompts, each conditioned on its own prompt (generative replay).
* EWC: the exact penalty on LoRA deltas (:mod:`sae_core.ewc`), F the diagonal Fisher of the
  base weights (:mod:`sae_core.fisher`).

The surrogate and replay halves draw their timesteps and noise independently; forget prompts
are drawn uniformly per example (``"sexual, nudity, naked"`` -> one of the three). There is no
text dropout. Everything random in step ``i`` comes from a CPU generator seeded by
``(seed, i)``, so runs are deterministic for a seed and a resumed run continues exactly as an
uninterrupted one would.

The trainer is generic: it needs an eps-prediction denoiser ``eps(x_t, t, context)`` (a UNet
called as ``unet(x, t, context)``), the ``alphas_cumprod`` of its schedule, a text encoder
``encode(prompts) -> [B, L, D]`` and LoRA factors (:func:`sae_core.lora.inject_lora` layers on a
model copy, or :class:`sae_core.lora.LoRADelta` weight functions).

Data
----
:class:`SampleSet` holds samples (images or latents in the denoiser's space, ``[N, ...]``) and
the prompt of each. :func:`generate_samples` draws them from the base model through a
caller-provided sampler ``sampler(prompts, seeds) -> [B, ...]`` (row ``i`` for
``(prompts[i], seeds[i])``); :func:`noise_samples` makes uniform-noise surrogates;
:func:`save_samples` / :func:`load_samples` / :func:`cached_samples` store them as safetensors
plus a JSON sidecar (prompts and the settings they were made with).

Checkpoints
-----------
One safetensors file: the LoRA factors (``lora.<module>.up`` / ``.down``), the AdamW state
(``optim.<i>.<field>``) and metadata (step, config, loss history, a digest of the data). Resuming
checks that everything that shapes the run (config except ``steps``/``checkpoint_every``, LoRA
shapes, data digest) matches, so ``steps`` can be raised to continue a finished run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from .ewc import ewc_penalty, prepare_fisher
from .fisher import eps_mse_loss, sample_generator
from .artefacts import save_json, save_tensors
from .prompts import parse_names

__all__ = [
    "SAMPLES_FORMAT",
    "CHECKPOINT_FORMAT",
    "LOSS_TERMS",
    "REPLAY_TARGETS",
    "SampleSet",
    "AmnesiaConfig",
    "AmnesiaResult",
    "AmnesiaTrainer",
    "step_generator",
    "generate_samples",
    "noise_samples",
    "save_samples",
    "load_samples",
    "cached_samples",
    "loss_curve_image",
]

SAMPLES_FORMAT = "sae_core.amnesia.samples"
"""``format`` field of a sample set's JSON sidecar."""

CHECKPOINT_FORMAT = "sae_core.amnesia.checkpoint"
"""``format`` metadata field of a training checkpoint."""

LOSS_TERMS = ("loss", "surrogate", "replay", "ewc")
"""Logged loss terms: the total and its three parts (``replay`` is unweighted, ``ewc`` includes lam)."""

PathLike = Union[str, os.PathLike]
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Encoder = Callable[[list[str]], torch.Tensor]
Sampler = Callable[[list[str], list[int]], torch.Tensor]


# --------------------------------------------------------------------------- data


class SampleSet(NamedTuple):
    """Training samples and the prompt each was generated from."""

    samples: torch.Tensor
    """``[N, ...]`` in the denoiser's input space (pixels in [-1, 1], or scaled latents)."""
    prompts: list[str]
    """``N`` prompts; a replay sample is trained with its own prompt."""

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.samples.shape[0])

    def select(self, index: Sequence[int]) -> "SampleSet":
        """The rows ``index``, in that order."""
        idx = list(index)
        return SampleSet(self.samples[torch.as_tensor(idx, dtype=torch.long)], [self.prompts[i] for i in idx])

    def where(self, keep: Callable[[str], bool]) -> "SampleSet":
        """The rows whose prompt satisfies ``keep``."""
        return self.select([i for i, p in enumerate(self.prompts) if keep(p)])

    @staticmethod
    def concat(sets: Sequence["SampleSet"]) -> "SampleSet":
        """All rows of ``sets``, in order."""
        sets = [s for s in sets if len(s)]
        if not sets:
            raise ValueError("SampleSet.concat: nothing to concatenate")
        return SampleSet(torch.cat([s.samples for s in sets]), [p for s in sets for p in s.prompts])


def step_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of step ``index`` of a run seeded with ``seed`` (a hash of both)."""
    return sample_generator(seed, index)


def generate_samples(
    sampler: Sampler,
    prompts: Sequence[str],
    per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    should_stop: Optional[Callable[[], bool]] = None,
    callback: Optional[Callable[[int, int], None]] = None,
) -> SampleSet:
    """``per_prompt`` samples of every prompt from the base model, prompt-major.

    Sample ``j`` of prompt ``i`` uses seed ``seed + i * per_prompt + j``, so the set does not
    depend on ``batch_size``. ``sampler(prompts, seeds)`` returns one row per (prompt, seed) pair.

    Raises:
        ValueError: no prompt, a bad count, or a sampler returning the wrong number of rows.
        InterruptedError: ``should_stop()`` became true (nothing is returned half-made).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate_samples: the prompt list is empty")
    if per_prompt < 1 or batch_size < 1:
        raise ValueError(f"generate_samples: per_prompt and batch_size must be >= 1, got {per_prompt}, {batch_size}")
    pairs = [(p, int(seed) + i * per_prompt + j) for i, p in enumerate(prompts) for j in range(per_prompt)]
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad(), tqdm(total=len(pairs), desc="samples", unit="sample", disable=not progress, leave=False) as bar:
        for b0 in range(0, len(pairs), batch_size):
            if should_stop is not None and should_stop():
                raise InterruptedError("sample generation was stopped")
            chunk = pairs[b0 : b0 + batch_size]
            x = sampler([p for p, _ in chunk], [s for _, s in chunk])
            if not isinstance(x, torch.Tensor) or x.shape[0] != len(chunk):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"the sampler returned {got} for {len(chunk)} (prompt, seed) pairs; expected one row each")
            out.append(x.detach().to("cpu", torch.float32).clone())
            bar.update(len(chunk))
            if callback is not None:
                callback(b0 + len(chunk), len(pairs))
    return SampleSet(torch.cat(out), [p for p, _ in pairs])


def noise_samples(n: int, shape: Sequence[int], prompt: str = "", seed: int = 0,
                  low: float = -1.0, high: float = 1.0) -> SampleSet:
    """``n`` uniform-noise samples in ``[low, high)`` (the reference's DDPM/VAE surrogate)."""
    if n < 1:
        raise ValueError(f"noise_samples: n must be >= 1, got {n}")
    if not high > low:
        raise ValueError(f"noise_samples: need high > low, got [{low}, {high})")
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.rand((n, *[int(d) for d in shape]), generator=gen) * (high - low) + low
    return SampleSet(x, [prompt] * n)


def _sidecar(path: PathLike) -> Path:
    return Path(path).with_suffix(".json")


def _normalise(obj: Any) -> Any:
    """JSON round trip, so settings compare equal whether they came from a file or not."""
    return json.loads(json.dumps(obj, sort_keys=True))


def save_samples(path: PathLike, samples: SampleSet, metadata: Optional[Mapping[str, Any]] = None,
                 dtype: torch.dtype = torch.float32) -> None:
    """Write ``samples`` to ``path`` (safetensors in ``dtype``) and prompts + metadata to ``path``'s ``.json``.

    Both files are written atomically, the JSON last: a set is complete when its JSON exists.
    :func:`load_samples` returns fp32 whatever was stored (fp16 halves the size of image sets).
    """
    path = Path(path)
    if len(samples.prompts) != samples.samples.shape[0]:
        raise ValueError(f"save_samples: {samples.samples.shape[0]} samples but {len(samples.prompts)} prompts")
    path.parent.mkdir(parents=True, exist_ok=True)
    side = _sidecar(path)
    if side.exists():
        side.unlink()  # the pair is incomplete until the new JSON lands
    tensors = {"samples": samples.samples.detach().to("cpu", dtype).contiguous()}
    save_tensors(path, tensors, {"format": SAMPLES_FORMAT})
    doc = {"format": SAMPLES_FORMAT, "count": len(samples.prompts), "shape": list(samples.samples.shape[1:]),
           "prompts": list(samples.prompts), "metadata": _normalise(dict(metadata or {}))}
    save_json(side, doc, sort_keys=False)


def load_samples(path: PathLike) -> tuple[SampleSet, dict[str, Any]]:
    """Read a sample set written by :func:`save_samples`; returns ``(samples, metadata)``."""
    from safetensors.torch import load_file

    path = Path(path)
    side = _sidecar(path)
    if not path.is_file() or not side.is_file():
        raise FileNotFoundError(f"sample set not found or incomplete: {path} (needs {path.name} and {side.name})")
    with open(side, encoding="utf-8") as fh:
        doc = json.load(fh)
    if doc.get("format") != SAMPLES_FORMAT:
        raise ValueError(f"{side}: not a sample set (format {doc.get('format')!r}, expected {SAMPLES_FORMAT!r})")
    x = load_file(str(path), device="cpu").get("samples")
    prompts = doc.get("prompts")
    if x is None or not isinstance(prompts, list) or len(prompts) != x.shape[0]:
        raise ValueError(f"{path}: samples and prompts do not match ({None if x is None else x.shape[0]} vs "
                         f"{len(prompts) if isinstance(prompts, list) else prompts!r})")
    return SampleSet(x.float(), [str(p) for p in prompts]), dict(doc.get("metadata") or {})


def cached_samples(path: PathLike, settings: Mapping[str, Any], make: Callable[[], SampleSet],
                   dtype: torch.dtype = torch.float32) -> SampleSet:
    """The sample set at ``path`` if it was made with ``settings``; otherwise ``make()``, saved there.

    ``settings`` must describe everything the samples depend on (model identity, prompts, counts,
    seeds, sampler settings); it is stored under the metadata key ``settings``. A new set is
    stored in ``dtype`` and returned as read back, so a fresh set and a cached one are identical.
    """
    want = _normalise(dict(settings))
    try:
        samples, meta = load_samples(path)
        if meta.get("settings") == want:
            return samples
    except (FileNotFoundError, ValueError):
        pass
    samples = make()
    save_samples(path, samples, {"settings": want}, dtype=dtype)
    return load_samples(path)[0] if dtype != torch.float32 else samples


# --------------------------------------------------------------------------- training


REPLAY_TARGETS = ("noise", "base")
"""Regression targets of the replay term (:attr:`AmnesiaConfig.replay_target`)."""


@dataclass
class AmnesiaConfig:
    """Hyper-parameters of a Selective Amnesia run."""

    steps: int = 500
    """Optimiser steps in total (a resumed run continues up to this)."""
    lr: float = 1e-4
    """AdamW learning rate (constant)."""
    batch_size: int = 4
    """Surrogate examples per step; as many replay examples are drawn besides (the reference pairs them)."""
    lam: float = 50.0
    """EWC weight lambda (reference: 50 with its Fisher estimator; 0 disables the penalty)."""
    gamma: float = 1.0
    """Weight of the replay term (reference: 1; 0 disables replay)."""
    weight_decay: float = 0.01
    """AdamW weight decay on the LoRA factors (pulls the delta towards 0, i.e. towards the base)."""
    grad_clip: Optional[float] = 1.0
    """Clip the global gradient norm of the LoRA factors to this (None: no clipping)."""
    seed: int = 0
    """Seeds every step's draws (examples, forget prompts, timesteps, noise)."""
    checkpoint_every: int = 50
    """Steps between checkpoint saves (when a checkpoint path is given); 0 = only at the end/stop."""
    replay_target: str = "noise"
    """What the replay term regresses onto: ``noise`` (the drawn eps, the reference) or ``base`` (the
    frozen base model's prediction at the same noisy input: the LoRA switched off, no gradient).
    With unlimited replay samples from the base model both targets are minimised by the base model.
    With a finite replay set the ``noise`` target is minimised by the denoiser of those particular
    images and is noisy besides, so it lets the remembered prompts drift; under ``base`` the base
    model stays the exact minimiser for every remembered prompt. Costs one extra forward pass (no
    gradient) over the replay half of each batch."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("lam", "gamma", "weight_decay"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.replay_target not in REPLAY_TARGETS:
            raise ValueError(f"replay_target must be one of {', '.join(REPLAY_TARGETS)}, got {self.replay_target!r}")


class AmnesiaResult(NamedTuple):
    """Outcome of :meth:`AmnesiaTrainer.train`."""

    history: list[dict[str, float]]
    """One record per step done so far (including steps restored from a checkpoint):
    ``step``, ``loss``, ``surrogate``, ``replay``, ``ewc``, ``grad_norm``."""
    steps: int
    """Steps done."""
    stopped: bool
    """True when ``should_stop`` ended the run before ``config.steps``."""


ForgetPrompts = Union[str, Sequence[str], Mapping[str, Union[str, Sequence[str]]]]


class AmnesiaTrainer:
    """Trains LoRA factors with the Selective Amnesia objective (see the module docstring).

    Args:
        config: hyper-parameters.
        denoiser: ``eps(x_t, t, context)``; ``x_t`` ``[B, ...]``, ``t`` int64 ``[B]``, context ``[B, L, D]``.
            It must run through the LoRA factors (a model with injected layers, or one whose
            weights are patched by :class:`~sae_core.lora.LoRADelta` functions).
        alphas_cumprod: ``[T]`` cumulative products of (1 - beta) of the denoiser's schedule.
        encode: ``encode(prompts) -> [B, L, D]``, called once per distinct prompt at construction.
        adapters: ``{module name: LoRA layer or LoRADelta}``; their ``up``/``down`` are trained.
        surrogate: surrogate samples; each is trained with a forget prompt.
        forget_prompts: the forget prompt(s): a comma-separated string or a list (one drawn
            uniformly per example), or a mapping ``{surrogate sample's prompt: forget prompt(s)}``
            that pairs each surrogate sample with forget prompts of its own (e.g. the styled prompt
            of the object the surrogate image shows).
        replay: remember samples, each trained with its own prompt (may be None when gamma = 0).
        fisher: ``{key: F}`` covering every adapter (see :func:`sae_core.ewc.prepare_fisher`);
            may be None when lam = 0.
        device: where samples, contexts and the Fisher live (default: the adapters' device).
    """

    def __init__(
        self,
        config: AmnesiaConfig,
        denoiser: Denoiser,
        alphas_cumprod: torch.Tensor,
        encode: Encoder,
        adapters: Mapping[str, nn.Module],
        surrogate: SampleSet,
        forget_prompts: ForgetPrompts,
        replay: Optional[SampleSet] = None,
        fisher: Optional[Mapping[str, torch.Tensor]] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        config.validate()
        self.config = config
        self.denoiser = denoiser
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().float().cpu()
        if self.alphas_cumprod.dim() != 1 or self.alphas_cumprod.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D schedule, got shape {tuple(self.alphas_cumprod.shape)}")
        self.num_timesteps = int(self.alphas_cumprod.numel())
        if not adapters:
            raise ValueError("AmnesiaTrainer: no LoRA adapters were given (inject_lora first)")
        self.names = sorted(adapters)
        self.adapters = {n: adapters[n] for n in self.names}
        first = self.adapters[self.names[0]]
        self.device = torch.device(device) if device is not None else first.down.device

        if surrogate is None or len(surrogate) == 0:
            raise ValueError("AmnesiaTrainer: the surrogate set is empty")
        self.use_replay = config.gamma > 0
        if self.use_replay and (replay is None or len(replay) == 0):
            raise ValueError("AmnesiaTrainer: gamma > 0 needs replay samples (remember prompts); pass gamma=0 to train without replay")
        if config.lam > 0 and fisher is None:
            raise ValueError("AmnesiaTrainer: lam > 0 needs a Fisher estimate; pass lam=0 to train without EWC")

        # Forget prompts: one list per surrogate sample (shared list, or per surrogate prompt).
        per_sample: list[list[str]]
        if isinstance(forget_prompts, Mapping):
            table = {k: parse_names(v) for k, v in forget_prompts.items()}
            missing = sorted({p for p in surrogate.prompts if not table.get(p)})
            if missing:
                raise ValueError(f"forget_prompts has no forget prompt for the surrogate prompt(s) {missing[:3]}")
            per_sample = [table[p] for p in surrogate.prompts]
        else:
            shared = parse_names(forget_prompts)
            if not shared:
                raise ValueError("AmnesiaTrainer: no forget prompt was given")
            per_sample = [shared] * len(surrogate)

        # Encode every distinct prompt once (the text encoder is frozen).
        replay_prompts = list(replay.prompts) if (self.use_replay and replay is not None) else []
        unique = sorted({p for lst in per_sample for p in lst} | set(replay_prompts))
        self.prompt_index = {p: i for i, p in enumerate(unique)}
        with torch.no_grad():
            ctx = encode(unique)
        if not isinstance(ctx, torch.Tensor) or ctx.shape[0] != len(unique):
            got = tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else type(ctx).__name__
            raise ValueError(f"encode returned {got} for {len(unique)} prompts; expected one row per prompt")
        self.contexts = ctx.detach().clone().to(self.device)
        self.forget_choices = [torch.tensor([self.prompt_index[p] for p in lst]) for lst in per_sample]

        self.surrogate = surrogate.samples.detach().clone().to(self.device)
        self.surrogate_prompts = list(surrogate.prompts)
        if self.use_replay:
            assert replay is not None
            self.replay = replay.samples.detach().clone().to(self.device)
            self.replay_ctx_index = torch.tensor([self.prompt_index[p] for p in replay.prompts])
            if tuple(self.replay.shape[1:]) != tuple(self.surrogate.shape[1:]):
                raise ValueError(f"surrogate samples {tuple(self.surrogate.shape[1:])} and replay samples "
                                 f"{tuple(self.replay.shape[1:])} have different shapes")
        else:
            self.replay = None
            self.replay_ctx_index = None

        self.fisher: Optional[dict[str, torch.Tensor]] = None
        if config.lam > 0:
            prepared = prepare_fisher(self.adapters, fisher, self.device)  # type: ignore[arg-type]
            # tensors made under torch.inference_mode() (e.g. read by a ComfyUI node) cannot enter autograd
            self.fisher = {k: (v.clone() if v.is_inference() else v) for k, v in prepared.items()}
        self.params: list[nn.Parameter] = []
        for n in self.names:
            for p in (self.adapters[n].up, self.adapters[n].down):
                p.requires_grad_(True)
                self.params.append(p)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._digest = self._data_digest(surrogate, replay if self.use_replay else None, per_sample)

    # ----------------------------------------------------------------- one step

    def _draws(self, step: int) -> dict[str, torch.Tensor]:
        """Everything random in ``step``, from its own generator (fixed order)."""
        gen = step_generator(self.config.seed, step)
        b, big_t = self.config.batch_size, self.num_timesteps
        shape = tuple(self.surrogate.shape[1:])
        d: dict[str, torch.Tensor] = {}
        d["s_idx"] = torch.randint(len(self.surrogate_prompts), (b,), generator=gen)
        u = torch.rand(b, generator=gen, dtype=torch.float64)
        d["s_ctx"] = torch.stack([
            self.forget_choices[i][min(int(ui * len(self.forget_choices[i])), len(self.forget_choices[i]) - 1)]
            for i, ui in zip(d["s_idx"].tolist(), u.tolist())
        ])
        d["s_t"] = torch.randint(big_t, (b,), generator=gen)
        d["s_noise"] = torch.randn((b, *shape), generator=gen)
        if self.use_replay:
            assert self.replay is not None and self.replay_ctx_index is not None
            d["r_idx"] = torch.randint(self.replay.shape[0], (b,), generator=gen)
            d["r_ctx"] = self.replay_ctx_index[d["r_idx"]]
            d["r_t"] = torch.randint(big_t, (b,), generator=gen)
            d["r_noise"] = torch.randn((b, *shape), generator=gen)
        return d

    def _base_target(self, x_t: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor],
                     noise: torch.Tensor) -> torch.Tensor:
        """Targets of a step's rows: eps for the surrogate half, the base model's eps for the replay half."""
        b = self.config.batch_size
        saved = [(a, a.strength) for a in self.adapters.values()]
        try:
            for a, _ in saved:
                a.strength = 0.0
            ctx = context[b:] if context is not None else None
            base = self.denoiser(x_t[b:], t[b:], ctx)
        finally:
            for a, s in saved:
                a.strength = s
        return torch.cat([noise[:b], base.to(noise.dtype)])

    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns its log record."""
        cfg = self.config
        d = self._draws(self.step)
        b = cfg.batch_size
        x0 = [self.surrogate[d["s_idx"].to(self.device)]]
        ctx = [self.contexts[d["s_ctx"].to(self.device)]]
        t, noise = [d["s_t"]], [d["s_noise"]]
        if self.use_replay:
            assert self.replay is not None
            x0.append(self.replay[d["r_idx"].to(self.device)])
            ctx.append(self.contexts[d["r_ctx"].to(self.device)])
            t.append(d["r_t"])
            noise.append(d["r_noise"])
        target_fn = self._base_target if (self.use_replay and cfg.replay_target == "base") else None
        # One forward over both halves; every row has its own t and noise, so the terms stay separate.
        with torch.enable_grad():
            per_row = eps_mse_loss(self.denoiser, torch.cat(x0), torch.cat(ctx), torch.cat(t), torch.cat(noise),
                                   self.alphas_cumprod, target_fn=target_fn)
            surrogate = per_row[:b].mean()
            replay = per_row[b:].mean() if self.use_replay else torch.zeros((), device=surrogate.device)
            if self.fisher is not None:
                ewc = ewc_penalty(self.adapters, self.fisher, cfg.lam).to(surrogate.device)
            else:
                ewc = torch.zeros((), device=surrogate.device)
            total = surrogate + cfg.gamma * replay + ewc
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"Selective Amnesia step {self.step + 1}: non-finite loss (surrogate {surrogate.item()}, "
                    f"replay {replay.item()}, ewc {ewc.item()}); lower lr or lam")
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
        clip = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.step += 1
        record = {"step": float(self.step), "loss": float(total.detach()), "surrogate": float(surrogate.detach()),
                  "replay": float(replay.detach()), "ewc": float(ewc.detach()), "grad_norm": float(grad_norm)}
        self.history.append(record)
        return record

    # ----------------------------------------------------------------- the loop

    def train(
        self,
        checkpoint: Optional[PathLike] = None,
        resume: bool = True,
        should_stop: Optional[Callable[[], bool]] = None,
        callback: Optional[Callable[[int, int, dict[str, float]], None]] = None,
        progress: bool = True,
    ) -> AmnesiaResult:
        """Train up to ``config.steps``.

        Args:
            checkpoint: file for checkpoints (every ``checkpoint_every`` steps, on stop, at the end).
            resume: continue from ``checkpoint`` if it exists (it must come from a compatible run).
            should_stop: polled before every step; True saves a checkpoint and returns (``stopped``).
            callback: ``callback(step, total, record)`` after every step (progress bars, logging).
            progress: show a tqdm bar with the loss terms.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        if checkpoint is not None and resume and Path(checkpoint).is_file():
            self.load_checkpoint(checkpoint)
        stopped = False
        last_saved = self.step
        bar = tqdm(total=cfg.steps, initial=min(self.step, cfg.steps), desc="Selective Amnesia", unit="step",
                   disable=not progress, leave=False)
        try:
            while self.step < cfg.steps:
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                rec = self.train_step()
                bar.update(1)
                bar.set_postfix(surr=f"{rec['surrogate']:.4f}", repl=f"{rec['replay']:.4f}", ewc=f"{rec['ewc']:.2e}")
                if callback is not None:
                    callback(self.step, cfg.steps, rec)
                if checkpoint is not None and cfg.checkpoint_every and self.step - last_saved >= cfg.checkpoint_every:
                    self.save_checkpoint(checkpoint)
                    last_saved = self.step
        finally:
            bar.close()
        if checkpoint is not None and (self.step != last_saved or not Path(checkpoint).is_file()):
            self.save_checkpoint(checkpoint)
        return AmnesiaResult(list(self.history), self.step, stopped)

    # ----------------------------------------------------------------- checkpoints

    @staticmethod
    def _data_digest(surrogate: SampleSet, replay: Optional[SampleSet], forget: list[list[str]]) -> str:
        h = hashlib.sha256()
        for s in (surrogate, replay):
            if s is None:
                h.update(b"none")
                continue
            x = s.samples.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(x.shape)).encode())
            h.update(x.numpy().tobytes())
            h.update(json.dumps(list(s.prompts)).encode())
        h.update(json.dumps(forget).encode())
        return h.hexdigest()[:32]

    def _identity(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        for k in ("steps", "checkpoint_every"):
            cfg.pop(k)
        shapes = {n: [list(a.up.shape), list(a.down.shape), float(a.alpha)] for n, a in self.adapters.items()}
        return _normalise({"config": cfg, "adapters": shapes, "data": self._digest,
                           "num_timesteps": self.num_timesteps})

    def save_checkpoint(self, path: PathLike) -> None:
        """Write the LoRA factors, optimiser state, step and history to ``path`` (atomically)."""
        tensors: dict[str, torch.Tensor] = {}
        for n in self.names:
            a = self.adapters[n]
            tensors[f"lora.{n}.up"] = a.up.detach().to("cpu").contiguous()
            tensors[f"lora.{n}.down"] = a.down.detach().to("cpu").contiguous()
        state = self.optimizer.state_dict()
        for i, st in state["state"].items():
            for field, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.{i}.{field}"] = v.detach().to("cpu").reshape(-1).contiguous() if v.dim() == 0 \
                        else v.detach().to("cpu").contiguous()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": str(self.step),
            "identity": json.dumps(self._identity(), sort_keys=True),
            "config": json.dumps(asdict(self.config)),
            "param_groups": json.dumps(state["param_groups"]),
            "scalar_fields": json.dumps(sorted({f"{i}.{f}" for i, st in state["state"].items()
                                                for f, v in st.items() if isinstance(v, torch.Tensor) and v.dim() == 0})),
            "history": json.dumps(self.history),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, tensors, meta)

    def load_checkpoint(self, path: PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` of a compatible run.

        Raises:
            ValueError: not a checkpoint, or made with another config / data / LoRA layout
                (the message names what differs).
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Selective Amnesia checkpoint not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a Selective Amnesia checkpoint (format {meta.get('format')!r})")
        theirs, ours = json.loads(meta.get("identity", "{}")), self._identity()
        if theirs != ours:
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            detail = ""
            if "config" in diff:
                tc, oc = theirs.get("config", {}), ours["config"]
                detail = " (config fields: " + ", ".join(
                    f"{k}={tc.get(k)!r} in the file vs {oc.get(k)!r} now" for k in sorted(set(tc) | set(oc)) if tc.get(k) != oc.get(k)) + ")"
            raise ValueError(f"cannot resume from {path}: it was made by a different run; differing: {', '.join(diff)}{detail}. "
                             "Delete it (or use another run name) to start over.")
        tensors = load_file(str(path), device="cpu")
        with torch.no_grad():
            for n in self.names:
                a = self.adapters[n]
                a.up.copy_(tensors[f"lora.{n}.up"].to(a.up.device, a.up.dtype))
                a.down.copy_(tensors[f"lora.{n}.down"].to(a.down.device, a.down.dtype))
        scalar = set(json.loads(meta.get("scalar_fields", "[]")))
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if not key.startswith("optim."):
                continue
            _, i, field = key.split(".", 2)
            opt_state.setdefault(int(i), {})[field] = v.reshape(()) if f"{i}.{field}" in scalar else v
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
        self.step = int(meta["step"])
        self.history = [dict(r) for r in json.loads(meta.get("history", "[]"))]


# --------------------------------------------------------------------------- plotting


_COLOURS = {"loss": (30, 30, 30), "surrogate": (214, 39, 40), "replay": (31, 119, 180), "ewc": (44, 160, 44)}


def loss_curve_image(history: Sequence[Mapping[str, float]], width: int = 640, height: int = 360,
                     terms: Sequence[str] = LOSS_TERMS, title: str = "Selective Amnesia loss") -> np.ndarray:
    """The loss terms against the step on a log axis, as an RGB ``uint8`` array ``[H, W, 3]``.

    Zero values (EWC before the delta grows, replay with gamma = 0) are left out of the log axis.
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 28, height - 30
    draw.text((left, 6), title, fill=(0, 0, 0))
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    steps = [float(r.get("step", i + 1)) for i, r in enumerate(history)]
    values = {k: [float(r.get(k, float("nan"))) for r in history] for k in terms}
    positive = [v for vs in values.values() for v in vs if v > 0 and math.isfinite(v)]
    if not steps or not positive:
        draw.text((left + 10, (top + bottom) // 2), "no positive loss values to plot", fill=(0, 0, 0))
        return np.asarray(img, dtype=np.uint8)
    lo, hi = math.log10(min(positive)), math.log10(max(positive))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = min(steps), max(steps)
    s1 = s1 if s1 > s0 else s0 + 1

    def xy(s: float, v: float) -> tuple[float, float]:
        x = left + (s - s0) / (s1 - s0) * (right - left)
        y = bottom - (math.log10(v) - lo) / (hi - lo) * (bottom - top)
        return x, y

    for e in range(math.floor(lo), math.ceil(hi) + 1):  # decade grid lines
        if lo <= e <= hi:
            _, y = xy(s0, 10.0 ** e)
            draw.line([left, y, right, y], fill=(225, 225, 225))
            draw.text((4, y - 6), f"1e{e}", fill=(90, 90, 90))
    draw.text((left, bottom + 6), f"step {int(s0)}", fill=(90, 90, 90))
    draw.text((right - 70, bottom + 6), f"step {int(max(steps))}", fill=(90, 90, 90))
    lx = left + 8
    for k in terms:
        pts = [xy(s, v) for s, v in zip(steps, values[k]) if v > 0 and math.isfinite(v)]
        colour = _COLOURS.get(k, (120, 60, 160))
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            x, y = pts[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        last = next((v for v in reversed(values[k]) if math.isfinite(v)), float("nan"))
        label = f"{k} {last:.3g}"
        draw.line([lx, top + 10, lx + 14, top + 10], fill=colour, width=2)
        draw.text((lx + 18, top + 4), label, fill=colour)
        lx += 22 + 7 * len(label)
    return np.asarray(img, dtype=np.uint8)
