"""End-to-end ItD: train the text SAE, interpret concepts, calibrate the classifier, evaluate it.

:func:`run_itd` is the one orchestration both hosts run (the ComfyUI node ``nodes/itd.py`` and the
MiniCanvas plug-in ``sae_core/minicanvas/plugins/itd.py``): one :class:`ItDSettings` (validated at
construction) and an :class:`ItDTextHost` (the text encoder, its deployment tokenisation and how it is
run) in, the calibrated :class:`ItDConcepts` out.

``build_concepts`` runs interpretation and calibration for any number of concepts at once:
each concept's features are its target prompts' top features minus the retain prompts' top
features, the concept sets are unioned, and one threshold ``tau = margin * min target score`` is
fitted on all target prompts (no retraining per concept). The retain prompts are scored as well,
so the calibration reports how far the two score populations are apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..sae import SparseAutoencoder
from ..whitening import Whitening, fit_whitening, fold_whitening
from .concepts import Calibration, ItDConcepts, sae_fingerprint
from .interpret import ConceptFeatures, prompt_top_features, select_features, union
from .collect import train_text_sae
from .steering import ERROR_MODES, ItDGate, SaeMath
from .text import PromptBatch, TextLayerSource, choose_layer, layer_count

__all__ = [
    "PLACEHOLDER",
    "REFERENCE_TEMPLATES",
    "ClassifierReport",
    "ItDRun",
    "ItDSettings",
    "ItDTextHost",
    "Whitening",
    "build_concepts",
    "calibrate",
    "classifier_report",
    "fit_whitening",
    "fold_whitening",
    "interpret",
    "prompt_tops",
    "templated",
    "run_itd",
    "score_prompts",
    "train_text_sae",
]


def _check_source(math: SaeMath, source: TextLayerSource) -> None:
    if source.width is not None:
        math.check_width(source.width, f"text-encoder layer '{source.layer_path}'")


def _unique(prompts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def scored_retain_prompts(targets: Sequence[str], retain: Sequence[str] | Mapping[str, Sequence[str]]) -> list[str]:
    """The retain prompts calibration scores, in the order of its ``retain_scores``: every retain prompt once (a shared
    list or per concept), without the target prompts."""
    pool = [p for r in (retain.values() if isinstance(retain, Mapping) else [retain]) for p in r]
    target_set = set(targets)
    return [p for p in _unique(pool) if p not in target_set]


def _as_math(sae: SparseAutoencoder | SaeMath) -> SaeMath:
    return sae if isinstance(sae, SaeMath) else SaeMath(sae)


@torch.no_grad()
def prompt_tops(
    sae: SparseAutoencoder | SaeMath,
    source: TextLayerSource,
    prompts: Sequence[str],
    top_n: int,
    *,
    positions: str = "all",
    skip_positions: int = 1,
    progress: bool = False,
) -> dict[str, Tensor]:
    """``Top_n(p)`` (positive activations only) for every distinct prompt.

    ``positions="content"`` takes the maximum over positions ``skip_positions..EOS``;
    ``"all"`` also counts the padding positions.
    """
    if positions not in ("content", "all"):
        raise ValueError(f"positions must be 'content' or 'all', got {positions!r}")
    math = _as_math(sae)
    _check_source(math, source)
    prompts = _unique(prompts)
    out: dict[str, Tensor] = {}
    bar = tqdm(total=len(prompts), disable=not progress, desc="ItD interpret", unit="prompt")
    done = 0
    for res in source.residual_batches(prompts):
        math.check_width(res.hidden.shape[-1], f"text-encoder layer '{source.layer_path}'")
        mask = res.content_mask if positions == "content" else None
        tops = prompt_top_features(math, res.hidden, mask, top_n, skip_positions)
        for prompt, top in zip(prompts[done : done + len(tops)], tops):
            out[prompt] = top
        done += len(tops)
        bar.update(len(tops))
    bar.close()
    return out


def interpret(
    sae: SparseAutoencoder | SaeMath,
    source: TextLayerSource,
    targets: Mapping[str, Sequence[str]],
    retain: Sequence[str] | Mapping[str, Sequence[str]],
    top_n: int,
    *,
    positions: str = "all",
    skip_positions: int = 1,
    progress: bool = False,
) -> list[ConceptFeatures]:
    """Feature sets of each concept: ``union_e Top_n(e) minus union_r Top_n(r)``.

    ``targets`` maps a concept name to its prompts. ``retain`` is one prompt list shared by all
    concepts, or a mapping giving each concept its own retain prompts.
    """
    if not targets:
        raise ValueError("interpret: no concepts given (targets is empty)")
    for name, prompts in targets.items():
        if not list(prompts):
            raise ValueError(f"interpret: concept '{name}' has no target prompts")
    if isinstance(retain, Mapping):
        missing = [name for name in targets if name not in retain]
        if missing:
            raise ValueError(f"interpret: no retain prompts given for concepts {missing}")
        retain_of = {name: list(retain[name]) for name in targets}
    else:
        retain_of = {name: list(retain) for name in targets}
    everything = [p for prompts in targets.values() for p in prompts] + [p for r in retain_of.values() for p in r]
    tops = prompt_tops(sae, source, everything, top_n, positions=positions, skip_positions=skip_positions, progress=progress)
    out = []
    for name, prompts in targets.items():
        target_tops = [tops[p] for p in prompts]
        g = union(tops[p] for p in retain_of[name])
        features = select_features(target_tops, g)
        removed = int(union(target_tops).numel() - features.numel())
        out.append(ConceptFeatures(str(name), features, target_tops, removed))
    return out


@torch.no_grad()
def score_prompts(gate: ItDGate, source: TextLayerSource, prompts: Sequence[str]) -> Tensor:
    """Classifier scores ``[len(prompts)]`` (fp32, CPU) in the source's padding convention."""
    _check_source(gate.math, source)
    prompts = list(prompts)
    if not prompts:
        return torch.zeros(0)
    return torch.cat([gate.scores(res.hidden) for res in source.residual_batches(prompts)])


def calibrate(target_scores: Tensor, retain_scores: Tensor | None = None, margin: float = 0.99) -> Calibration:
    """``tau = margin * min(target_scores)``, reported with the largest retain score."""
    if target_scores.numel() == 0:
        raise ValueError("calibrate: no target scores (at least one target prompt is needed)")
    if not 0 < margin <= 1:
        raise ValueError(f"calibrate: margin must be in (0, 1], got {margin}")
    target_min = float(target_scores.min())
    retain_max = float(retain_scores.max()) if retain_scores is not None and retain_scores.numel() else None
    return Calibration(
        tau=margin * target_min,
        margin=float(margin),
        target_min=target_min,
        retain_max=retain_max,
        n_targets=int(target_scores.numel()),
        n_retain=0 if retain_scores is None else int(retain_scores.numel()),
    )


def build_concepts(
    sae: SparseAutoencoder,
    source: TextLayerSource,
    targets: Mapping[str, Sequence[str]],
    retain: Sequence[str] | Mapping[str, Sequence[str]],
    *,
    top_n: int = 128,
    scale: float = -8.0,
    margin: float = 0.99,
    error_mode: str = "reconstruct",
    positions: str = "all",
    skip_positions: int = 1,
    score_retain: bool = True,
    pad_token: str | None = None,
    progress: bool = False,
) -> ItDConcepts:
    """Interpret and calibrate one or more concepts (multi-concept: union of the feature sets, one tau).

    Args:
        sae: the SAE of ``source``'s layer.
        source: the text encoder, layer and deployment tokenisation (see :class:`TextLayerSource`).
        targets: concept name -> prompts showing the concept (also the calibration prompts).
        retain: prompts to keep (shared list, or per concept); their top features are excluded.
        top_n: ``n`` of ``Top_n`` (128 for celebrities, 256 for styles in the reference).
        scale: the strength ``s`` (``-8`` in the reference).
        margin: ``tau = margin * min target score`` (0.99 in the reference).
        error_mode: ``"reconstruct"`` (reference) or ``"preserve"``.
        positions: ``"content"`` (max over 1..EOS) or ``"all"`` (also padding) for ``a(p)``.
        skip_positions: leading positions never edited nor counted (1 = BOS).
        score_retain: also score the retain prompts and report their maximum.
        pad_token: description of the padding (e.g. ``"eos"``) stored with the concepts.
    """
    math = SaeMath(sae)
    _check_source(math, source)
    found = interpret(math, source, targets, retain, top_n, positions=positions, skip_positions=skip_positions, progress=progress)
    empty = [c.name for c in found if c.features.numel() == 0]
    features = union(c.features for c in found)
    if features.numel() == 0:
        raise ValueError(
            f"ItD found no concept-specific features for {[c.name for c in found]}: every top-{top_n} feature of the "
            f"target prompts also fires on a retain prompt. Use a smaller retain set or a larger top_n."
        )
    gate = ItDGate(math, features, None, scale, error_mode, skip_positions)
    target_prompts = _unique([p for prompts in targets.values() for p in prompts])
    target_scores = score_prompts(gate, source, target_prompts)
    retain_prompts: list[str] = []
    if score_retain:
        retain_prompts = scored_retain_prompts(target_prompts, retain)
    retain_scores = score_prompts(gate, source, retain_prompts) if retain_prompts else None
    calibration = calibrate(target_scores, retain_scores, margin)
    return ItDConcepts(
        features=features,
        tau=calibration.tau,
        scale=scale,
        error_mode=error_mode,
        layer=source.layer_index,
        hookpoint=source.layer_path,
        pad_to=source.pad_to,
        pad_token=pad_token,
        sae_fingerprint=sae_fingerprint(sae),
        sae_d_in=math.d_in,
        sae_num_latents=math.num_latents,
        concept_names=[c.name for c in found],
        concept_features={c.name: c.features for c in found},
        top_n=int(top_n),
        skip_positions=skip_positions,
        calibration=calibration,
        target_scores=target_scores,
        retain_scores=retain_scores,
        extra={"positions": positions, "concepts_without_features": empty, "n_retain_prompts": len(retain_prompts)},
    )


POSITIONS = ("content", "all")

PLACEHOLDER = "{}"
"""Where a calibration template puts the concept (or retain) name."""

REFERENCE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "artist": ("Image in the style of {}", "Art inspired by {}", "Painting in the style of {}",
               "A reproduction of art by {}", "A famous artwork by {}"),
    "celebrity": ("A portrait of {}", "A sketch of {}", "An oil painting of {}", "{} in an official photo",
                  "An image capturing {} at a public event"),
}
"""The reference's five calibration templates per artist and per celebrity."""


def templated(names: Sequence[str], templates: Sequence[str]) -> dict[str, list[str]]:
    """``name -> [each template with the name put in place of {}]`` (the reference's calibration prompts).

    Every template must hold ``{}`` exactly once; an empty template list means each name as it is.
    """
    templates = list(templates) or [PLACEHOLDER]
    bad = [t for t in templates if t.count(PLACEHOLDER) != 1]
    if bad:
        raise ValueError(f"templates: each line needs exactly one {PLACEHOLDER} where the concept goes; {bad} "
                         f"do not (e.g. 'Painting in the style of {PLACEHOLDER}')")
    return {name: list(dict.fromkeys(t.replace(PLACEHOLDER, name) for t in templates)) for name in names}


@dataclass(frozen=True)
class ItDSettings:
    """Everything that decides an ItD classifier, validated once at construction.

    The ComfyUI node's inputs carry these names (``concepts`` there is a list of names, each its own
    calibration prompt); the MiniCanvas plug-in's options are these fields too.
    """

    concepts: Mapping[str, Sequence[str]]
    """Concept name -> its target prompts (also the calibration prompts). A list of texts is read as
    ``{text: [text]}``: each concept is its own prompt."""
    retain_prompts: Sequence[str] | Mapping[str, Sequence[str]] = ()
    """Prompts to keep (one shared list, or one per concept); a retain prompt that is also a target
    prompt is dropped (see :attr:`retain`)."""
    layer: int = -1
    """Encoder layer the SAE reads (0-based); -1: the SAE's hookpoint, else 2/3 of the way up."""
    scale: float = -8.0
    """Factor ``s`` on the concept features of flagged prompts (``-8`` in the reference)."""
    threshold_margin: float = 0.99
    """``tau = threshold_margin * min target score`` (0.99 in the reference)."""
    top_n: int = 128
    """``n`` of ``Top_n`` (128 for people, 256 for styles in the reference)."""
    error_mode: str = "reconstruct"
    """``"reconstruct"`` (the reference: the full SAE reconstruction) or ``"preserve"``."""
    positions: str = "content"
    """Positions of ``a(p)``: ``"content"`` (1..EOS, as the reference's unpadded prompts) or ``"all"``
    (also the padding)."""
    skip_positions: int = 1
    """Leading positions never edited nor counted (1 = BOS)."""

    def __post_init__(self) -> None:
        concepts = self.concepts
        if not isinstance(concepts, Mapping):
            if isinstance(concepts, str) or not all(isinstance(c, str) for c in concepts):
                raise ValueError(f"concepts: expected a list of texts or a mapping name -> prompts, got {concepts!r}")
            concepts = {c: [c] for c in concepts}
        concepts = {str(name): tuple(prompts) for name, prompts in concepts.items()}
        if not concepts:
            raise ValueError("concepts: the concept list is empty (write one concept per line or comma-separated)")
        empty = [name for name, prompts in concepts.items() if not prompts]
        if empty:
            raise ValueError(f"concepts: {empty} have no target prompts")
        object.__setattr__(self, "concepts", concepts)
        retain = self.retain_prompts
        if isinstance(retain, Mapping):
            missing = [name for name in concepts if name not in retain]
            if missing:
                raise ValueError(f"retain_prompts: no retain prompts given for concepts {missing}")
            retain = {name: tuple(retain[name]) for name in concepts}
        elif isinstance(retain, str):
            raise ValueError("retain_prompts: expected a list of prompts, got one string")
        else:
            retain = tuple(retain)
        object.__setattr__(self, "retain_prompts", retain)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < -1:
            raise ValueError(f"layer: expected a layer index >= 0, or -1 for the SAE's own, got {self.layer!r}")
        if float(self.scale) == 1.0:
            raise ValueError("scale: 1 leaves the concept features unchanged; use a negative strength such as -8")
        if not 0 < float(self.threshold_margin) <= 1:
            raise ValueError(f"threshold_margin: must be in (0, 1], got {self.threshold_margin}")
        if isinstance(self.top_n, bool) or not isinstance(self.top_n, int) or self.top_n < 1:
            raise ValueError(f"top_n: must be an integer >= 1, got {self.top_n!r}")
        if self.error_mode not in ERROR_MODES:
            raise ValueError(f"error_mode must be one of {ERROR_MODES}, got {self.error_mode!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if isinstance(self.skip_positions, bool) or not isinstance(self.skip_positions, int) or self.skip_positions < 0:
            raise ValueError(f"skip_positions must be an integer >= 0, got {self.skip_positions!r}")

    @property
    def target_prompts(self) -> list[str]:
        """Every concept's target prompts, without duplicates."""
        return _unique([p for prompts in self.concepts.values() for p in prompts])

    @property
    def retain(self) -> list[str] | dict[str, list[str]]:
        """``retain_prompts`` without the target prompts (a prompt cannot be both erased and kept)."""
        targets = set(self.target_prompts)
        if isinstance(self.retain_prompts, Mapping):
            return {name: [p for p in prompts if p not in targets] for name, prompts in self.retain_prompts.items()}
        return [p for p in self.retain_prompts if p not in targets]

    @property
    def scored_retain(self) -> list[str]:
        """The retain prompts calibration scores, in the order of its scores (:func:`scored_retain_prompts`)."""
        return scored_retain_prompts(self.target_prompts, self.retain_prompts)


@dataclass(frozen=True)
class ItDTextHost:
    """What ItD needs from a host: the text encoder and how the host feeds it prompts."""

    model: Any
    """The text encoder (its encoder layers are found by :func:`~sae_core.itd.text.resolve_layer`)."""
    tokenize: Callable[[Sequence[str]], PromptBatch]
    """The deployment tokenisation (the padding the host encodes with)."""
    run: Callable[[Any, PromptBatch], Any] | None = None
    """``run(model, batch)``; ``None``: ``model(input_ids=...)`` without an attention mask."""
    pad_to: int | None = None
    """Fixed padded length of ``tokenize`` (``None``: pads to the longest prompt)."""
    pad_token: str | None = None
    """Description of the padding, stored with the concepts (e.g. ``"eos"``)."""
    batch_size: int = 64
    """Prompts per encoder call."""

    def source(self, layer: int) -> TextLayerSource:
        """The host's text encoder read at ``layer``."""
        return TextLayerSource(self.model, layer, self.tokenize, run=self.run, pad_to=self.pad_to,
                               batch_size=self.batch_size)


class ItDRun(NamedTuple):
    """What :func:`run_itd` built."""

    concepts: ItDConcepts
    """Features, threshold and calibration scores (``extra["layer_origin"]`` says where the layer came from)."""
    source: TextLayerSource
    """The text encoder read at the chosen layer (to score more prompts the same way)."""
    layer_origin: str
    """Where the layer index came from (as set, the SAE's hookpoint, the default)."""


def run_itd(host: ItDTextHost, sae: SparseAutoencoder, settings: ItDSettings, *, progress: bool = False) -> ItDRun:
    """Interpret and calibrate ``settings.concepts`` on ``host``'s text encoder (the one ItD pipeline)."""
    layer, origin = choose_layer(settings.layer, getattr(sae.cfg, "hookpoint", None), layer_count(host.model))
    source = host.source(layer)
    found = build_concepts(
        sae, source, settings.concepts, settings.retain, top_n=settings.top_n, scale=float(settings.scale),
        margin=float(settings.threshold_margin), error_mode=settings.error_mode, positions=settings.positions,
        skip_positions=settings.skip_positions, score_retain=True, pad_token=host.pad_token, progress=progress,
    )
    found.extra["layer_origin"] = origin
    return ItDRun(found, source, origin)


class ClassifierReport(NamedTuple):
    """Detection quality of the zero-shot classifier on labelled prompts."""

    tp: int
    fp: int
    fn: int
    tn: int
    precision: float
    """``tp / (tp + fp)`` (1.0 when nothing was detected)."""
    recall: float
    """``tp / (tp + fn)``: fraction of concept prompts detected."""
    false_positive_rate: float
    """``fp / (fp + tn)``: fraction of other prompts wrongly edited."""
    concept_scores: Tensor
    """Scores of the concept prompts."""
    other_scores: Tensor
    """Scores of the other prompts."""


def classifier_report(concept_scores: Tensor, other_scores: Tensor, tau: float | None) -> ClassifierReport:
    """Precision / recall / false-positive rate of ``score >= tau`` on concept vs other prompts."""
    pos = concept_scores >= tau if tau is not None else torch.ones_like(concept_scores, dtype=torch.bool)
    neg = other_scores >= tau if tau is not None else torch.ones_like(other_scores, dtype=torch.bool)
    tp, fn = int(pos.sum()), int((~pos).sum())
    fp, tn = int(neg.sum()), int((~neg).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    return ClassifierReport(tp, fp, fn, tn, precision, recall, fpr, concept_scores, other_scores)
