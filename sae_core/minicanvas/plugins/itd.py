"""ItD on MiniCanvas: the text-encoder SAE, concept interpretation and the ``itd`` bench method.

Listed as ``itd`` in :data:`sae_core.minicanvas.methods.PLUGINS`.

The SAE reads the residual stream after a middle layer of the MiniCanvas text encoder
(``text_model.encoder.layers.2`` of 4, as ItD reads layer 8 of CLIP-L's 12). It is trained on
every MiniCanvas prompt (all object x style prompts, the unstyled prompts, the empty prompt used
for classifier-free guidance, and a few rephrasings made of words the tokenizer knows) in the
deployment padding convention (MiniCanvas pads to its fixed length with ``<pad>`` and passes no
attention mask) by :func:`sae_core.itd.train_text_sae`: the prompts' activations are collected
into an activation store and the SAE is trained on that store, the same two steps (and the same
code) as the ComfyUI nodes Collect Text Activations and Train SAE. A shipped copy lives in ``sae_core/minicanvas/weights/``; it is
used only when it was trained for the exact text encoder that is loaded (a fingerprint of the
text-encoder weights is stored with it), otherwise a copy is trained (well under a minute on a
CPU) and cached in ``$SAE_CORE_CACHE`` (default ``~/.cache/sae_core``).

Erasing a style (or an object): the concept's prompts are the target prompts; the retain
prompts are every other MiniCanvas prompt (other styles' / objects' prompts, the unstyled
prompts for a style, and the empty prompt). Several concepts at once use the union of their
feature sets and one threshold. The edited canvas encodes text with the ItD hook installed on
its text encoder; prompts the classifier does not flag, including the empty unconditional
prompt, get bit-exact embeddings.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ...artefacts import tensor_fingerprint
from ...config import TrainConfig
from ...formats import load_sae, save_sae
from ...itd import (
    ClassifierReport,
    ItDConcepts,
    ItDGate,
    ItDPatch,
    ItDSettings,
    ItDTextHost,
    PromptBatch,
    TextLayerSource,
    classifier_report,
    run_itd,
    score_prompts,
    train_text_sae,
)
from ..files import WEIGHTS_DIR
from ..data import OBJECTS, STYLES, styled_prompt, unstyled_prompt
from ..methods import KINDS, validate_concepts
from ...sae import SparseAutoencoder

__all__ = [
    "CANVAS_SETTINGS",
    "DEFAULT_SCALE",
    "MiniCanvasItDConfig",
    "ItDCanvasReport",
    "build_canvas_concepts",
    "canvas_host",
    "canvas_prompts",
    "canvas_settings",
    "concept_prompt_sets",
    "itd_method",
    "load_or_train_sae",
    "text_encoder_fingerprint",
    "text_source",
]

SHIPPED_SAE = "itd_text_sae.safetensors"
"""File name of the shipped SAE inside ``sae_core/minicanvas/weights/``."""

CANVAS_SETTINGS: dict[str, Any] = {"top_n": 32, "positions": "all"}
"""The :class:`~sae_core.itd.ItDSettings` values MiniCanvas uses where they differ from the node's
defaults: ``top_n`` 32 (4k; the reference uses 2k-4k) and ``a(p)`` over every non-BOS position of the
padded sequence (the SAE was trained on those too)."""

DEFAULT_SCALE: dict[str, float] = {"style": -8.0, "object": -1.0}
"""Strength ``s`` per kind. Styles use the reference's -8 (UA, IRA and CRA 100% over the eight
styles). For objects -8 erases (UA 99%) but also changes the style of the erased object's styled
images: MiniCanvas' text encoder is causal, so the object's features fire at the style tokens that
follow it (CRA 88%, -2: 89%); -1 flips the features just enough to erase the object (UA 96%, IRA
97%) and keeps those styles (CRA 91%); the classifier stays exact (recall 100%, no false positives)."""


@dataclass
class MiniCanvasItDConfig:
    """The MiniCanvas text SAE: its layer, shape and training (the classifier's settings are
    :class:`sae_core.itd.ItDSettings` fields, see :data:`CANVAS_SETTINGS`)."""

    layer: int = 2
    """Text-encoder layer whose output the SAE reads (0-based; the encoder has 4); also the
    ``layer`` of the :class:`~sae_core.itd.ItDSettings`."""

    num_latents: int = 1024
    """SAE width (8x the 128-wide residual)."""

    k: int = 8
    """Active latents per token."""

    train_steps: int = 1000
    """SAE optimiser steps."""

    batch_tokens: int = 512
    """Tokens per SAE training step."""

    lr: float = 1e-3
    """Peak SAE learning rate (linear decay to 0)."""

    whiten: bool = True
    """Train the SAE in whitened coordinates and fold the map into its weights (see
    :func:`sae_core.itd.train_text_sae`)."""

    whiten_eps: float = 1e-2
    """Whitening floor relative to the mean variance (larger: closer to raw coordinates)."""

    train_positions: str = "all"
    """Token positions the SAE trains on: ``"all"`` (as the reference) or ``"content"`` (BOS..EOS)."""

    seed: int = 0
    """SAE initialisation / prompt-shuffle seed."""

    def train_key(self) -> dict[str, Any]:
        """The fields that determine the trained SAE (with the text encoder's fingerprint)."""
        keys = ("layer", "num_latents", "k", "train_steps", "batch_tokens", "lr", "whiten", "whiten_eps", "train_positions",
                "seed")
        return {key: getattr(self, key) for key in keys}


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------

_VARIATIONS_STYLED = ("a picture of a {o} in {s} style", "a {s} {o}", "a drawing of a {o} in {s} style")
_VARIATIONS_PLAIN = ("a picture of a {o}", "a {o}", "{o}")
_VARIATIONS_STYLE_ONLY = ("an image in {s} style", "{s} style")


def canvas_prompts(variations: bool = True) -> list[str]:
    """Every MiniCanvas prompt: object x style, unstyled, the empty prompt, plus rephrasings."""
    prompts = [styled_prompt(o, s) for o in OBJECTS for s in STYLES] + [unstyled_prompt(o) for o in OBJECTS] + [""]
    if variations:
        prompts += [t.format(o=o, s=s) for t in _VARIATIONS_STYLED for o in OBJECTS for s in STYLES]
        prompts += [t.format(o=o) for t in _VARIATIONS_PLAIN for o in OBJECTS]
        prompts += [t.format(s=s) for t in _VARIATIONS_STYLE_ONLY for s in STYLES]
    return list(dict.fromkeys(prompts))


class PromptSets(NamedTuple):
    """Prompts of an erasure task."""

    targets: dict[str, list[str]]
    """Concept name -> the MiniCanvas prompts showing it."""

    retain: list[str]
    """Every other MiniCanvas prompt (including the empty prompt)."""


def concept_prompt_sets(kind: str, concepts: Sequence[str]) -> PromptSets:
    """Target prompts of ``concepts`` (styles or objects) and the retain prompts (all others)."""
    if kind not in KINDS:
        raise ValueError(f"ItD on MiniCanvas erases a 'style' or an 'object', got kind={kind!r}")
    names = STYLES if kind == "style" else OBJECTS
    if not concepts:
        raise ValueError("ItD: the concept list is empty")
    unknown = [c for c in concepts if c not in names]
    if unknown:
        raise ValueError(f"unknown MiniCanvas {kind}(s) {unknown}; expected some of {list(names)}")
    targets: dict[str, list[str]] = {}
    for c in concepts:
        if kind == "style":
            targets[c] = [styled_prompt(o, c) for o in OBJECTS]
        else:
            targets[c] = [styled_prompt(c, s) for s in STYLES] + [unstyled_prompt(c)]
    taken = {p for ps in targets.values() for p in ps}
    retain = [p for p in canvas_prompts(variations=False) if p not in taken]
    return PromptSets(targets, retain)


# ---------------------------------------------------------------------------------------------
# the canvas's text encoder
# ---------------------------------------------------------------------------------------------


def _text_parts(canvas: Any) -> tuple[nn.Module, Any]:
    """(text encoder module, tokenizer) of a MiniCanvas."""
    encoder = getattr(canvas, "text_encoder", None)
    tokenizer = getattr(canvas, "tokenizer", None)
    if not isinstance(encoder, nn.Module) or tokenizer is None:
        raise TypeError(f"ItD needs a MiniCanvas with .text_encoder and .tokenizer, got {type(canvas).__name__}")
    return encoder, tokenizer


def _tokenize_fn(tokenizer: Any):
    def tokenize(prompts: Sequence[str]) -> PromptBatch:
        out = tokenizer(list(prompts))
        return PromptBatch(out.input_ids, out.attention_mask.bool())

    return tokenize


def _run(model: nn.Module, batch: PromptBatch) -> Any:
    device = next(model.parameters()).device
    return model(batch.input_ids.to(device))  # no attention mask, as MiniCanvas encodes


def canvas_host(canvas: Any, batch_size: int = 128) -> ItDTextHost:
    """The ItD view of a canvas's text encoder: its fixed ``<pad>`` padding and no attention mask."""
    encoder, tokenizer = _text_parts(canvas)
    return ItDTextHost(encoder, _tokenize_fn(tokenizer), run=_run, pad_to=int(tokenizer.max_length),
                       pad_token="<pad>", batch_size=batch_size)


def text_source(canvas: Any, layer: int = 2, batch_size: int = 128) -> TextLayerSource:
    """The canvas's text encoder read at ``layer`` (see :func:`canvas_host`)."""
    return canvas_host(canvas, batch_size).source(layer)


def text_encoder_fingerprint(text_encoder: nn.Module) -> str:
    """Hash of the text encoder's weights (names, shapes, values rounded to fp16, so fp16/fp32 copies agree)."""
    return tensor_fingerprint(sorted(text_encoder.state_dict().items()), dtype=torch.float16, shapes=True)


def _cache_dir() -> Path:
    return Path(os.environ.get("SAE_CORE_CACHE", Path.home() / ".cache" / "sae_core")) / "minicanvas"


def _weights_dir() -> Path:
    return WEIGHTS_DIR


def _matches(sae: SparseAutoencoder, key: dict[str, Any]) -> bool:
    return sae.cfg.extra.get("itd_train_key") == key


def load_or_train_sae(
    canvas: Any,
    cfg: MiniCanvasItDConfig | None = None,
    *,
    cache: bool = True,
    progress: bool = True,
) -> SparseAutoencoder:
    """The MiniCanvas text SAE: the shipped file or the cache when they match this text encoder
    and ``cfg``, otherwise trained now (and cached)."""
    cfg = cfg or MiniCanvasItDConfig()
    encoder, _ = _text_parts(canvas)
    key = dict(cfg.train_key(), text_encoder=text_encoder_fingerprint(encoder))
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:12]
    cached = _cache_dir() / f"itd_text_sae_{digest}.safetensors"
    device = next(encoder.parameters()).device
    for path in (_weights_dir() / SHIPPED_SAE, cached):
        if path.is_file():
            sae = load_sae(path, device=device)
            if _matches(sae, key):
                return sae.eval().requires_grad_(False)
    sae = train_canvas_sae(canvas, cfg, progress=progress)
    sae.cfg.extra["itd_train_key"] = key
    if cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_sae(sae, cached, layout="file")
        except OSError as exc:  # a read-only home is not fatal
            print(f"ItD: could not cache the MiniCanvas SAE at {cached}: {exc}", file=sys.stderr)
    return sae


def train_canvas_sae(canvas: Any, cfg: MiniCanvasItDConfig | None = None, *, progress: bool = True) -> SparseAutoencoder:
    """Train the MiniCanvas text SAE (an activation store of :func:`canvas_prompts`, then the store's training)."""
    cfg = cfg or MiniCanvasItDConfig()
    source = text_source(canvas, cfg.layer)
    train_cfg = TrainConfig(
        batch_size=cfg.batch_tokens,
        lr=cfg.lr,
        k=cfg.k,
        num_latents=cfg.num_latents,
        batch_topk=False,
        seed=cfg.seed,
        log_every=100,
        checkpoint_every=0,
        device=str(next(source.model.parameters()).device),
        hookpoint=source.layer_path,
        model_family="minicanvas",
    )
    with torch.random.fork_rng(devices=[]):
        sae = train_text_sae(
            source,
            canvas_prompts(),
            train_cfg,
            cfg.train_steps,
            positions=cfg.train_positions,
            store_dtype="float32",
            whiten=cfg.whiten,
            whiten_eps=cfg.whiten_eps,
            progress=progress,
        )
    return sae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# interpretation + the edited canvas
# ---------------------------------------------------------------------------------------------


class ItDCanvasReport(NamedTuple):
    """What the ``itd`` method built for one erasure, for logs and the bench."""

    concepts: ItDConcepts
    classifier: ClassifierReport
    """Precision / recall / false-positive rate on the concept prompts vs every other MiniCanvas prompt."""

    def summary(self) -> str:
        c = self.classifier
        return (
            f"ItD classifier: precision={100 * c.precision:.1f}% recall={100 * c.recall:.1f}% "
            f"fpr={100 * c.false_positive_rate:.1f}% ({c.tp}/{c.tp + c.fn} concept prompts, "
            f"{c.fp}/{c.fp + c.tn} others flagged); features={self.concepts.features.numel()}; "
            f"{self.concepts.calibration.summary()}"
        )


def canvas_settings(kind: str, concepts: Sequence[str], layer: int = 2, **options: Any) -> ItDSettings:
    """The :class:`~sae_core.itd.ItDSettings` of a MiniCanvas erasure: the concepts' prompts as targets,
    every other MiniCanvas prompt as retain prompts, :data:`CANVAS_SETTINGS` and the kind's
    :data:`DEFAULT_SCALE` unless ``options`` (settings fields) say otherwise."""
    sets = concept_prompt_sets(kind, list(concepts))
    options = {**CANVAS_SETTINGS, "scale": DEFAULT_SCALE[kind], **options}
    return ItDSettings(concepts=sets.targets, retain_prompts=sets.retain, layer=layer, **options)


def build_canvas_concepts(canvas: Any, sae: SparseAutoencoder, kind: str, settings: ItDSettings) -> ItDCanvasReport:
    """Interpret + calibrate (:func:`sae_core.itd.run_itd`) on the canvas and score every MiniCanvas prompt."""
    run = run_itd(canvas_host(canvas), sae, settings)
    found = run.concepts
    found.extra.update(kind=kind, model="minicanvas")
    gate = ItDGate(sae, found.features, found.tau, found.scale, found.error_mode, found.skip_positions)
    positives = [p for ps in settings.concepts.values() for p in ps]
    retain = settings.retain
    report = classifier_report(score_prompts(gate, run.source, positives), score_prompts(gate, run.source, retain),
                               found.tau)
    return ItDCanvasReport(found, report)


_TRAIN_FIELDS = {f.name for f in fields(MiniCanvasItDConfig)}
_SETTING_FIELDS = {f.name for f in fields(ItDSettings)} - {"concepts", "retain_prompts", "layer"}


def itd_method(canvas: Any, kind: str, concepts: list[str], **options: Any) -> Any:
    """The ``itd`` MiniCanvas method: returns a canvas whose text encoding runs the ItD edit.

    Options are :class:`MiniCanvasItDConfig` fields (the SAE; ``layer`` is also the settings') and
    :class:`~sae_core.itd.ItDSettings` fields (e.g. ``top_n=8``, ``scale=-4``, ``error_mode="preserve"``,
    ``threshold_margin=0.9``), plus ``quiet=True`` to skip the classifier summary line and ``sae=PATH`` to use
    an SAE file or folder (e.g. one the Train SAE node wrote) instead of the shipped / cached one.
    """
    quiet = bool(options.pop("quiet", False))
    sae_path = options.pop("sae", None)
    validate_concepts(canvas, kind, list(concepts))
    unknown = sorted(set(options) - _TRAIN_FIELDS - _SETTING_FIELDS)
    if unknown:
        raise ValueError(f"unknown itd option(s) {unknown}; known: {sorted(_TRAIN_FIELDS | _SETTING_FIELDS)}")
    cfg = replace(MiniCanvasItDConfig(), **{k: v for k, v in options.items() if k in _TRAIN_FIELDS})
    settings = canvas_settings(kind, concepts, cfg.layer, **{k: v for k, v in options.items() if k in _SETTING_FIELDS})
    if sae_path is not None:
        sae = load_sae(Path(str(sae_path)).expanduser(), device=next(canvas.text_encoder.parameters()).device)
        sae = sae.eval().requires_grad_(False)
    else:
        sae = load_or_train_sae(canvas, cfg, progress=not quiet)
    report = build_canvas_concepts(canvas, sae, kind, settings)
    if not quiet:
        print(report.summary())
    return _edited_canvas(canvas, sae, report)


def _edited_canvas(canvas: Any, sae: SparseAutoencoder, report: ItDCanvasReport) -> Any:
    """A copy of ``canvas`` whose text encoding runs under the ItD patch (the input canvas is untouched).

    The patch is built (and the SAE checked against the concepts) once; each encode only installs its
    hook for the duration of the call.
    """
    encoder, _ = _text_parts(canvas)
    patch = ItDPatch(encoder, sae, report.concepts, on_length_mismatch="error")
    encode_default = canvas.encode_text_default

    def encode_fn(prompts: list[str]) -> torch.Tensor:
        with patch:
            return encode_default(prompts)

    edited = canvas.replace(encode_fn=encode_fn)
    edited.itd_report = report
    edited.itd_patch = patch
    edited.extra_metrics = {
        "precision": report.classifier.precision,
        "recall": report.classifier.recall,
        "fpr": report.classifier.false_positive_rate,
    }
    return edited
