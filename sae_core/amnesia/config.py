"""The one settings object of Selective Amnesia, shared by both hosts.

A ComfyUI node input and the field it sets carry the same name (``forget_prompts``, ``lam``,
``batch_size``, ``timesteps_per_sample``, ...); the MiniCanvas plug-in's ``--option key=value``
names are these fields too. Every range and choice is checked once, when the object is built;
the pipeline and the trainer rely on it afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Optional, Union

from ..prompts import COMMENT, parse_names, parse_prompts
from .lora import TARGET_PRESETS

__all__ = ["AmnesiaConfig", "REPLAY_TARGETS", "PRECISIONS", "FISHER_ONLY_FIELDS", "ForgetPrompts"]

REPLAY_TARGETS = ("noise", "base")
"""Regression targets of the replay term (:attr:`AmnesiaConfig.replay_target`)."""

PRECISIONS = ("fp32", "bf16")
"""Compute precisions of the denoiser while gradients are taken (:attr:`AmnesiaConfig.precision`)."""

FISHER_ONLY_FIELDS = ("timesteps_per_sample", "timestep_batch")
"""Fields that shape only the Fisher estimate, not the LoRA training."""

ForgetPrompts = Union[str, Sequence[str], Mapping[str, Union[str, Sequence[str]]]]


@dataclass(frozen=True)
class AmnesiaConfig:
    """Settings of a Selective Amnesia run (Fisher estimate and LoRA training)."""

    # -- what to forget, what stands in for it, what to keep
    forget_prompts: ForgetPrompts = ()
    """What to forget: comma-separated prompts or keywords (or a list), one drawn uniformly per
    training example; or a mapping ``{surrogate sample's prompt: forget prompts}`` that pairs each
    surrogate sample with forget prompts of its own. With several surrogate prompts, a text with one
    line per surrogate prompt is such a pairing: line ``i`` (comma-separated alternatives) is what
    surrogate prompt ``i`` stands in for (a single line is shared by all of them). Stored parsed (a
    tuple, or a dict of tuples)."""
    surrogate_prompt: str = ""
    """What the forget prompts should produce instead, one prompt per line (:attr:`surrogate_prompts`);
    the host samples each. Empty when the host supplies the surrogate samples itself. Stored with
    comments and blank lines dropped."""
    remember_prompts: Sequence[str] = ()
    """Prompts kept intact by generative replay, one per line; the host samples them (empty when
    the host supplies the replay samples itself). Stored parsed, as a tuple."""
    surrogate_samples: int = 32
    """Surrogate samples the host generates (or takes from a sample bank) per surrogate prompt."""
    replay_per_prompt: int = 8
    """Replay samples the host generates per remember prompt."""

    # -- the LoRA
    targets: str = "xattn"
    """Weights the LoRA adapts (and the Fisher covers): a preset of :data:`sae_core.amnesia.lora.TARGET_PRESETS`."""
    rank: int = 8
    """LoRA rank."""
    alpha: Optional[float] = None
    """LoRA alpha (None: equal to the rank, scale 1)."""

    # -- the objective and the optimiser
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
    """Seeds the LoRA initialisation, the generated samples and every step's draws (examples,
    forget prompts, timesteps, noise); for the Fisher, every sample's timesteps and noise."""
    replay_target: str = "noise"
    """What the replay term regresses onto: ``noise`` (the drawn eps, the reference) or ``base`` (the
    frozen base model's prediction at the same noisy input: the LoRA switched off, no gradient).
    With unlimited replay samples from the base model both targets are minimised by the base model.
    With a finite replay set the ``noise`` target is minimised by the denoiser of those particular
    images and is noisy besides, so it lets the remembered prompts drift; under ``base`` the base
    model stays the exact minimiser for every remembered prompt. Costs one extra forward pass (no
    gradient) over the replay half of each batch."""

    # -- compute and checkpoints
    precision: str = "fp32"
    """Compute precision of the denoiser while gradients are taken (a host without the choice runs fp32)."""
    checkpoint_every: int = 50
    """Units (training steps, Fisher samples) between checkpoint saves; 0 = only when stopped or done."""

    # -- the Fisher estimate
    timesteps_per_sample: int = 50
    """K stratified timesteps per Fisher sample (1000 = the reference's full sum; the T/K scaling keeps its scale)."""
    timestep_batch: Optional[int] = None
    """Timesteps per backward pass of the Fisher (memory bound; the gradient of the sum is the same). None: all K."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        surrogates = _surrogate_lines(self.surrogate_prompt)
        set_(self, "surrogate_prompt", "\n".join(surrogates))
        forget = self.forget_prompts
        if isinstance(forget, Mapping):
            table = {str(k): tuple(parse_names(v)) for k, v in forget.items()}
            missing = [p for p in surrogates if not table.get(p)]
            if len(surrogates) > 1 and missing:
                raise ValueError(f"forget_prompts has no forget prompt for the surrogate prompt(s) {missing[:3]}")
            set_(self, "forget_prompts", table)
        elif isinstance(forget, str) and len(surrogates) > 1:
            set_(self, "forget_prompts", _paired(forget, surrogates))
        else:
            set_(self, "forget_prompts", tuple(parse_names(forget)))
        set_(self, "remember_prompts", tuple(parse_prompts(self.remember_prompts)))
        _check_contradictions(self.forget_prompts, surrogates, self.remember_prompts)
        for name in ("surrogate_samples", "replay_per_prompt", "rank", "batch_size", "timesteps_per_sample"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("steps", "seed", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.targets not in TARGET_PRESETS:
            raise ValueError(f"targets must be one of {', '.join(TARGET_PRESETS)}, got {self.targets!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number or None, got {self.alpha}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        for name in ("lam", "gamma", "weight_decay"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.replay_target not in REPLAY_TARGETS:
            raise ValueError(f"replay_target must be one of {', '.join(REPLAY_TARGETS)}, got {self.replay_target!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.timestep_batch is not None and self.timestep_batch < 1:
            raise ValueError(f"timestep_batch must be >= 1 or None, got {self.timestep_batch}")

    @property
    def surrogate_prompts(self) -> tuple[str, ...]:
        """The surrogate prompts, one per line of :attr:`surrogate_prompt` (empty when there is none)."""
        return tuple(self.surrogate_prompt.splitlines()) if self.surrogate_prompt else ()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every field, in declaration order (the names node inputs and bench options use)."""
        return tuple(f.name for f in fields(cls))


def _same_prompt(text: str) -> str:
    """A prompt as a CLIP tokenizer reads it (case and runs of spaces do not count)."""
    return " ".join(text.lower().split())


def _check_contradictions(forget: Union[tuple[str, ...], dict[str, tuple[str, ...]]], surrogates: list[str],
                          remember: Sequence[str]) -> None:
    """ValueError when a surrogate prompt stands in for itself (the LoRA would learn the model's own images: nothing
    is forgotten) or a forget prompt is also a remember prompt (replay keeps what the surrogate term removes)."""
    groups = forget if isinstance(forget, dict) else {s: forget for s in surrogates}
    for surrogate, prompts in groups.items():
        if _same_prompt(surrogate) in {_same_prompt(p) for p in prompts}:
            raise ValueError(f"forget_prompts: {surrogate!r} is also the surrogate prompt that stands in for it; the "
                             "surrogate must show something else (e.g. 'a middle aged man' for a celebrity)")
    every = {_same_prompt(p): p for prompts in ([forget] if not isinstance(forget, dict) else forget.values())
             for p in prompts}
    both = [p for p in remember if _same_prompt(p) in every]
    if both:
        raise ValueError(f"remember_prompts: {both[:3]} are forget prompts too; a prompt is either forgotten or "
                         "remembered")


def _lines(text: str) -> list[str]:
    """The non-blank, non-comment lines of a text, stripped, duplicates kept."""
    lines = [line.strip() for line in (text or "").splitlines()]
    return [line for line in lines if line and not line.startswith(COMMENT)]


def _surrogate_lines(text: Optional[str]) -> list[str]:
    if text is not None and not isinstance(text, str):
        raise ValueError(f"surrogate_prompt must be text (one prompt per line), got {type(text).__name__}")
    lines = _lines(text or "")
    twice = sorted({p for p in lines if lines.count(p) > 1})
    if twice:
        raise ValueError(f"surrogate_prompt: {twice[0]!r} is given more than once (one line per surrogate prompt)")
    return lines


def _paired(forget: str, surrogates: list[str]) -> Union[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """Forget prompts for several surrogate prompts: one shared line, or one line per surrogate prompt."""
    lines = _lines(forget)
    if len(lines) <= 1:
        return tuple(parse_names(forget))
    if len(lines) != len(surrogates):
        raise ValueError(f"forget_prompts: with {len(surrogates)} surrogate prompts (one per line), give one line of "
                         f"forget prompts per surrogate prompt (line i is what surrogate prompt i stands in for) or one "
                         f"line shared by all; got {len(lines)} lines")
    table = {s: tuple(parse_names(line)) for s, line in zip(surrogates, lines)}
    empty = [s for s, v in table.items() if not v]
    if empty:
        raise ValueError(f"forget_prompts: no forget prompt on the line of surrogate prompt {empty[0]!r}")
    return table
