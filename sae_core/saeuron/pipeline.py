"""SAeUron's orchestration, written once for every host (the ComfyUI nodes and the MiniCanvas plug-in).

A host adapts its model and sampler to :class:`SAeUronHost` and its current sampler call to
:class:`CallPosition`; everything else happens here:

* :func:`build_concept_edit` turns an SAE, its :class:`~.stats.ConceptStats` and one
  :class:`ConceptBlockSettings` (validated once, at construction) into a :class:`ConceptBlockEdit`,
  the forward-hook body the host puts on the block for the duration of each denoiser call. It
  resolves the block, checks that the SAE, the features and the block agree, picks the concepts,
  builds the :class:`~.intervention.SAeUronHook`, and answers "which features step is this call?"
  (:func:`features_step`) from the sampler position.
* :func:`collect_activations` samples a host's prompts and streams the block's output (or update)
  into an activation store: the training data of an SAE (and, through
  :func:`~.collect.concept_stats_from_store`, of the concept statistics).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Protocol

import torch
from torch import Tensor, nn

from .collect import collect_block_activations
from .concept_params import ConceptParams, parse_concept_params
from .intervention import ERROR_MODES, SAeUronHook, map_step_index, step_index_from_timestep
from .stats import ConceptStats

__all__ = [
    "BRANCHES",
    "OTHER_CONCEPT",
    "SELECTION_RULES",
    "SOURCES",
    "BlockRef",
    "CallPosition",
    "ConceptBlockEdit",
    "ConceptBlockSettings",
    "ConceptParams",
    "SAeUronHost",
    "build_concept_edit",
    "check_family",
    "check_hookpoint",
    "check_sae",
    "check_sae_fits",
    "check_sae_width",
    "collect_activations",
    "features_step",
    "recorded_source",
    "resolve_source",
]

log = logging.getLogger(__name__)

SELECTION_RULES = ("top_n", "percentile")
"""``top_n``: N latents per step; ``percentile``: SAeUron's rule (99.999 ~ 1 latent at 20480 latents)."""

BRANCHES = ("cond", "both")
"""Which classifier-free-guidance rows are used: the prompted rows (SAeUron) or both halves."""

SOURCES = ("output", "diff")
"""What an SAE reads of its block: the output, or the update (output minus input)."""

TEXT_ENCODER_MARK = ".text_model."
"""Part of the module path of every CLIP text-encoder layer (transformers' ``CLIPTextModel`` naming, which ComfyUI's
CLIP, ItD and MiniCanvas share): an SAE whose hook point holds it was trained on a text encoder."""

OTHER_CONCEPT = "other"
"""Concept name of the contrast prompts in a feature table (never erased by default)."""


# ---------------------------------------------------------------------------------------------
# what a host provides
# ---------------------------------------------------------------------------------------------


class BlockRef(NamedTuple):
    """A hookable block of the host's denoiser."""

    name: str
    """The host's canonical name, a dotted path under :meth:`SAeUronHost.denoiser`."""
    module: nn.Module
    """The block itself."""
    width: int
    """Channels of the block's output."""


class CallPosition(Protocol):
    """Where the sampler is during the current denoiser call (read, never inferred by counting calls)."""

    def timestep(self) -> float | Tensor | None:
        """The model timestep of the call (a number or a tensor of equal entries), or None if unknown."""

    def sigma(self) -> float | Tensor | None:
        """The noise level of the call, or None if unknown."""

    def run_step(self) -> tuple[int, int] | None:
        """``(step index in the current run, steps of the run)``, or None if unknown."""

    def cond_mask(self) -> Tensor | None:
        """``[batch]`` bool, True on the prompted rows of the call's CFG batch; None: every row is prompted."""


class SAeUronHost(Protocol):
    """A model and sampler SAeUron runs on."""

    def find_block(self, block: str) -> BlockRef:
        """The named block; a ValueError naming the valid blocks when there is none."""

    def denoiser(self) -> nn.Module:
        """The module whose dotted paths :attr:`BlockRef.name` are (hooks go on it while sampling)."""

    def sample(self, batch: list[Any]) -> None:
        """One complete sampling run of a batch of prompt items (what an item is is the host's business)."""

    def position(self) -> CallPosition:
        """The sampler's position during a denoiser call of :meth:`sample`."""


# ---------------------------------------------------------------------------------------------
# checks shared by the steps
# ---------------------------------------------------------------------------------------------


def check_sae(sae: Any) -> None:
    """ValueError naming the ``sae`` input when it is not an SAE."""
    if sae is None or not hasattr(sae, "cfg") or not hasattr(sae, "W_dec"):
        raise ValueError(f"sae: expected an SAE from Load SAE / Train SAE, got {type(sae).__name__}")


def check_sae_width(sae: Any, block: str, width: int) -> None:
    """ValueError naming both widths and the block when the SAE cannot read the block's output."""
    d_in = int(sae.cfg.d_in)
    if d_in != width:
        trained = f" (it was trained on {sae.cfg.hookpoint})" if getattr(sae.cfg, "hookpoint", None) else ""
        raise ValueError(f"sae: the SAE reads {d_in}-wide activations{trained} but block '{block}' outputs "
                         f"{width} channels; pick the block the SAE was trained on or an SAE for this block")


def recorded_source(sae: Any) -> str | None:
    """What the SAE records it reads (``cfg.extra["source"]``), or None when it records nothing; a ValueError
    names an unknown value."""
    recorded = getattr(sae.cfg, "extra", {}).get("source")
    if recorded is None:
        return None
    if str(recorded) not in SOURCES:
        raise ValueError(f"sae: the SAE records source {recorded!r}; expected one of {', '.join(SOURCES)}")
    return str(recorded)


def resolve_source(sae: Any, source: Optional[str] = None) -> str:
    """What an SAE is applied to: ``source`` when given, else what the SAE records (``cfg.extra["source"]``:
    ``"diff"`` for SAEs of block updates such as the published sdxl-unbox ones), ``"output"`` when it records
    nothing. A ValueError names an unknown value, and a ``source`` other than the one the SAE records (its
    codes of the other quantity mean nothing)."""
    if source is not None and source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    recorded = recorded_source(sae)
    if source is not None and recorded is not None and source != recorded:
        raise ValueError(f"source: the SAE was trained on the block's {_SOURCE_WORDS[recorded]}, so it cannot read "
                         f"its {_SOURCE_WORDS[source]}; set source to auto or {recorded!r}")
    return source or recorded or "output"


def check_hookpoint(host: SAeUronHost, sae: Any, block: str) -> None:
    """ValueError when the SAE records a hook point that is another block of this model than ``block`` (its codes
    of a block it was not trained on mean nothing), or a text-encoder layer (:data:`TEXT_ENCODER_MARK`). Any other
    hook point this model does not have is only logged: it may name the block in a layout the host does not know."""
    hook = getattr(sae.cfg, "hookpoint", None)
    if not hook:
        return
    try:
        trained = host.find_block(hook).name
    except ValueError:
        if TEXT_ENCODER_MARK in f".{hook}":
            raise ValueError(f"sae: the SAE was trained on the text-encoder layer '{hook}' (an ItD SAE); SAeUron needs "
                             "an SAE trained on a UNet block (Train SAE on a store of Collect SAE Activations)") from None
        log.warning("SAeUron: the SAE records hook point %s, which is no block of this model; applied to %s",
                    hook, block)
        return
    if trained != block:
        raise ValueError(f"block: the SAE was trained on '{trained}' ({hook}) but is asked to read '{block}'; use "
                         f"block '{trained}' or an SAE trained on '{block}'")


def check_family(host: SAeUronHost, what: str, family: str | None) -> None:
    """ValueError naming ``what`` when ``family`` (the model family an SAE or a feature table was made on) is a
    known family other than the host model's. Hosts that cannot tell (no ``family_matches``) and names the host
    does not know are let through."""
    matches = getattr(host, "family_matches", None)
    if not family or matches is None:
        return
    if matches(str(family)) is False:
        raise ValueError(f"{what}: made on a {family} model, but this model is {host.family()}; an SAE and its "
                         f"features only fit the model family they were made on")


def check_sae_fits(host: SAeUronHost, sae: Any, ref: BlockRef) -> None:
    """The SAE can read ``ref``: its width, the hook point it records, and the model family it records."""
    check_sae_width(sae, ref.name, ref.width)
    check_family(host, "sae", getattr(sae.cfg, "model_family", None))
    check_hookpoint(host, sae, ref.name)


# ---------------------------------------------------------------------------------------------
# the concept block
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptBlockSettings:
    """How SAeUron edits a block; the field names are the SAeUron Concept Block node's input names."""

    block: str = ""
    """Block to edit; empty = the block recorded in the features (else the SAE's hook point)."""
    concepts: tuple[str, ...] = ()
    """Concepts of the feature table to erase; empty = every concept except :data:`OTHER_CONCEPT`."""
    gamma: float = -1.0
    """Multiplier of the selected latents (x the concept mean); more negative erases harder."""
    selection: str = "top_n"
    """One of :data:`SELECTION_RULES`."""
    top_n: int = 1
    """Latents per step with ``selection="top_n"``."""
    percentile: float = 99.999
    """Score percentile with ``selection="percentile"``."""
    error_mode: str = "conventional"
    """One of :data:`~.intervention.ERROR_MODES`."""
    cond_only: bool = False
    """Edit only the prompted half of classifier-free guidance (SAeUron edits both)."""
    source: Optional[str] = None
    """What the SAE reads, one of :data:`SOURCES`; None = what the SAE records (``cfg.extra["source"]``,
    ``"output"`` when it records nothing)."""
    concept_params: Any = ()
    """Per-concept ``gamma`` and selection rule (text lines ``concept: gamma, percentile=P`` or a mapping,
    see :mod:`.concept_params`); concepts not named use ``gamma`` / ``selection`` above. Parsed and checked
    at construction into a tuple of :class:`~.concept_params.ConceptParams`."""

    def __post_init__(self) -> None:
        if isinstance(self.concepts, str):
            raise ValueError("concepts: give a sequence of names, not one string")
        object.__setattr__(self, "concepts", tuple(str(c) for c in self.concepts))
        object.__setattr__(self, "block", (self.block or "").strip())
        if self.selection not in SELECTION_RULES:
            raise ValueError(f"selection must be one of {', '.join(SELECTION_RULES)}, got {self.selection!r}")
        if self.error_mode not in ERROR_MODES:
            raise ValueError(f"error_mode must be one of {', '.join(ERROR_MODES)}, got {self.error_mode!r}")
        if self.source is not None and self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not math.isfinite(float(self.gamma)):
            raise ValueError(f"gamma must be a finite number, got {self.gamma!r}")
        if self.selection == "top_n" and int(self.top_n) < 1:
            raise ValueError(f"top_n must be at least 1, got {self.top_n}")
        if self.selection == "percentile" and not 0.0 <= float(self.percentile) < 100.0:
            raise ValueError(f"percentile must be in [0, 100), got {self.percentile}")
        object.__setattr__(self, "gamma", float(self.gamma))
        object.__setattr__(self, "top_n", int(self.top_n))
        object.__setattr__(self, "percentile", float(self.percentile))
        object.__setattr__(self, "cond_only", bool(self.cond_only))
        object.__setattr__(self, "concept_params", parse_concept_params(self.concept_params, self.selection))

    def rules(self, concepts: Sequence[str]) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
        """``(gamma, top_n, percentile)`` per concept of ``concepts``: each concept's own line of
        :attr:`concept_params`, else the block's values. Every concept is in exactly one of the two rule maps."""
        own = {p.name: p for p in self.concept_params}
        gamma: dict[str, float] = {}
        top_n: dict[str, int] = {}
        percentile: dict[str, float] = {}
        for c in concepts:
            p = own.get(c)
            gamma[c] = self.gamma if p is None or p.gamma is None else p.gamma
            if p is not None and p.top_n is not None:
                top_n[c] = p.top_n
            elif p is not None and p.percentile is not None:
                percentile[c] = p.percentile
            elif self.selection == "top_n":
                top_n[c] = self.top_n
            else:
                percentile[c] = self.percentile
        return gamma, top_n, percentile


def features_step(stats_schedule: Optional[Tensor], schedule_kind: str, num_steps: int,
                  pos: CallPosition) -> int:
    """The features' step index of the current call: the one answer for every host.

    Features with a schedule: the entry nearest to the call's timestep (or sigma, for a sigma
    schedule). Features without one: the call's step in its own run, mapped proportionally onto
    the features' steps.
    """
    if stats_schedule is not None:
        if schedule_kind == "sigma":
            sigma = pos.sigma()
            if sigma is None:
                raise ValueError("SAeUron: the sampler passed no sigma for this call")
            return step_index_from_timestep(sigma, stats_schedule)
        t = pos.timestep()
        if t is None:
            raise ValueError("SAeUron: the sampler passed neither a timestep nor a sigma for this call")
        return step_index_from_timestep(t, stats_schedule)
    run = pos.run_step()
    if run is None:
        raise ValueError("SAeUron: these features record no sampling schedule and the sampler gives no step "
                         "position, so the step cannot be determined")
    step, steps = run
    return map_step_index(min(int(step), int(steps) - 1), int(steps), num_steps)


class ConceptBlockEdit:
    """The block edit a host applies at sampling time: call it as a forward hook with the position.

    ``edit(inputs, output, pos)`` returns the block's edited output (a tuple output keeps its
    tail); ``output`` itself comes back when nothing fires.

    Attributes:
        hook: the :class:`SAeUronHook` (its ``table``, ``calls`` and ``fired_tokens``).
        block: the host's name of the edited block.
        source: ``"output"`` or ``"diff"`` (the SAE reads the block's update).
        cond_only: only the prompted rows are edited.
        last_step: features step of the most recent call (diagnostics).
    """

    def __init__(self, hook: SAeUronHook, block: str, source: str, cond_only: bool) -> None:
        self.hook = hook
        self.block = block
        self.source = source
        self.cond_only = cond_only
        self.last_step: Optional[int] = None
        table = hook.table
        self._schedule = table.schedule
        self._schedule_kind = table.schedule_kind
        self._num_steps = table.num_steps

    def step_index(self, pos: CallPosition) -> int:
        """The features' step index of the current call (:func:`features_step`)."""
        return features_step(self._schedule, self._schedule_kind, self._num_steps, pos)

    def __call__(self, inputs: Any, output: Any, pos: CallPosition) -> Any:
        step = self.step_index(pos)
        self.last_step = step
        y = output[0] if isinstance(output, tuple) else output
        mask = None
        if self.cond_only:
            mask = pos.cond_mask()
            if mask is None:  # no CFG batch layout given: every row is prompted
                mask = torch.ones(y.shape[0], dtype=torch.bool)
        if self.source == "diff":
            edited = self.hook.on_update(inputs[0], y, step, mask)
        else:
            edited = self.hook(y, step, mask)
        if y.requires_grad and torch.is_grad_enabled():
            # the edit is computed without gradients; a search through the model (a leak probe) sees it as a
            # fixed offset of the block output, the straight-through gradient of attacks on such defences
            edited = y + (edited - y).detach()
        return (edited,) + tuple(output[1:]) if isinstance(output, tuple) else edited


def _concepts(stats: ConceptStats, wanted: Sequence[str]) -> list[str]:
    names = list(wanted) or [c for c in stats.concepts if c != OTHER_CONCEPT]
    if not names:
        raise ValueError(f"concepts: the feature table holds no concept besides '{OTHER_CONCEPT}'")
    for c in names:
        try:
            stats.index(c)
        except ValueError as err:
            raise ValueError(f"concepts: {err}") from None
    return names


def build_concept_edit(host: SAeUronHost, sae: Any, stats: ConceptStats,
                       settings: ConceptBlockSettings) -> ConceptBlockEdit:
    """SAeUron's block edit for ``settings`` (see the module docstring); every check happens here, once."""
    check_sae(sae)
    if not isinstance(stats, ConceptStats):
        raise ValueError(f"features: expected SAeUron concept features, got {type(stats).__name__}")
    block = settings.block or stats.hookpoint or getattr(sae.cfg, "hookpoint", None) or ""
    ref = host.find_block(block)
    check_sae_width(sae, ref.name, ref.width)
    check_family(host, "sae", getattr(sae.cfg, "model_family", None))
    check_family(host, "features", stats.attrs.get("model_family"))
    if stats.hookpoint:
        try:
            measured: Optional[str] = host.find_block(stats.hookpoint).name
        except ValueError:
            measured = None
            log.warning("SAeUron: the features were measured at %s, which this model does not have", stats.hookpoint)
        if measured is not None and measured != ref.name:
            raise ValueError(f"block: the features were measured at '{measured}' but the edit is asked for "
                             f"'{ref.name}'; use the same block (or gather features at '{ref.name}')")
    check_hookpoint(host, sae, ref.name)
    names = _concepts(stats, settings.concepts)
    source = settings.source or recorded_source(sae) or "output"
    measured_on = stats.attrs.get("source")
    if measured_on is not None and measured_on != source:
        raise ValueError(f"source: the features were measured on the block's {_SOURCE_WORDS.get(measured_on, measured_on)} "
                         f"but the edit reads its {_SOURCE_WORDS[source]}; use the same source for Concept Features "
                         "and Concept Block (the one the SAE was trained on)")
    source = resolve_source(sae, settings.source)
    if settings.concept_params:
        unknown = [p.name for p in settings.concept_params if p.name not in stats.concepts]
        if unknown:
            raise ValueError(f"concept_params: {', '.join(repr(u) for u in unknown)} is not a concept of the feature "
                             f"table (concepts: {', '.join(stats.concepts)})")
        idle = [p.name for p in settings.concept_params if p.name not in names]
        if idle:
            log.info("SAeUron: concept_params for %s are not used (not erased here)", ", ".join(idle))
        gamma, top_n, percentile = settings.rules(names)
        rule: dict[str, Any] = {"gamma": gamma, "top_n": top_n, "percentile": percentile}
    else:  # one rule for every concept
        rule = {"gamma": settings.gamma,
                "top_n": settings.top_n if settings.selection == "top_n" else None,
                "percentile": settings.percentile if settings.selection == "percentile" else None}
    try:
        hook = SAeUronHook(sae, stats, names, **rule, error_mode=settings.error_mode, cond_only=settings.cond_only)
    except ValueError as err:
        raise ValueError(f"features: {err}") from err
    return ConceptBlockEdit(hook, ref.name, source, settings.cond_only)


_SOURCE_WORDS = {"output": "output", "diff": "update (output minus input, source 'diff')"}


# ---------------------------------------------------------------------------------------------
# collection
# ---------------------------------------------------------------------------------------------


def collect_activations(host: SAeUronHost, block: str, items: Sequence[Any], steps: int, writer: Any, *,
                        branch: str = "cond", source: str = "output", batch_size: int = 1,
                        progress: bool = False) -> int:
    """Sample ``items`` with the host and stream the block's output (or update) rows to ``writer``.

    Each row records the step of the host's run, its timestep, cond/uncond, the item index and the
    spatial position (see :func:`~.collect.collect_block_activations`). Returns the rows written.
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    ref = host.find_block(block)
    steps = int(steps)

    def state() -> dict[str, Any]:
        pos = host.position()
        run = pos.run_step()
        if run is None:
            raise ValueError("SAeUron: the sampler gives no step position for this call")
        return {"step_index": min(int(run[0]), steps - 1), "timestep": pos.timestep(), "cond_mask": pos.cond_mask()}

    return collect_block_activations(host.sample, host.denoiser(), ref.name, list(items), steps, writer,
                                     cond_only=branch == "cond", state=state, batch_size=batch_size,
                                     progress=progress, which=source)
