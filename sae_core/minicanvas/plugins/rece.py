"""UCE and RECE on MiniCanvas: the ``uce`` and ``rece`` methods of ``python -m sae_core bench``.

Listed as ``uce`` and ``rece`` in :data:`sae_core.minicanvas.methods.PLUGINS`.

Both edit a deepcopy of the UNet: every cross-attention ``attn2.to_k`` / ``attn2.to_v`` weight gets the
closed-form delta of :func:`sae_core.rece.run_rece`, the pipeline the ComfyUI node runs too; nothing else
changes and the input canvas is left untouched. :class:`CanvasRECEHost` adapts the canvas to that pipeline:
the texts are encoded by the canvas' own text encoder (``canvas.encode_text``, the conditioning the UNet
sees), with the canvas tokenizer's attention mask giving the real-token counts.

Options (``--option key=value`` on the bench command line) are the fields of
:class:`sae_core.rece.RECESettings` (``epochs``, ``lambda_reg``, ``variant``, ``erase_scale``,
``uce_preserve_scale``, ``uce_lambda``, ``preserve_scale``, ``lam``, ``uce_tokens``, ``start_from_uce``,
``anchor``), except its texts, which this plug-in builds from the canvas with the fields of
:class:`RECERecipe` (``methods/rece.md`` sections 1.3-1.5, 2.2), from how MiniCanvas prompts read
("an image of a star in striped style", "an image of a star"):

* **concept**: ``concept_template`` filled with the erased name, e.g. ``"{concept} style"`` for a style and
  ``"an image of a {concept}"`` for an object (several templates may be given, separated by ``|``;
  ``rece`` uses the object's prompt in every style too, see :func:`object_templates`);
* **anchor**: the empty prompt (UCE's and RECE's "towards uncond" target); any text can be set (``rece``
  maps objects to "an image of a", see :data:`RECE_OBJECT_ANCHOR`);
* **preserve**: the empty prompt (the unconditional branch of classifier-free guidance) plus the same
  template filled with every other concept of the erased kind (``preserve="others"``), optionally also the
  other kind's texts (``"all"``), only the empty prompt (``"empty"``) or nothing (``"none"``).

``uce`` is the UCE edit RECE starts from (last-word-token alignment, ridge ``uce_lambda``, preserve scale
``max(0.1, 1 / #preserve)`` unless ``uce_preserve_scale`` is set). ``rece`` runs that edit and then
``epochs`` RECE epochs (adversarial embedding with ``lambda_reg``, all token positions, ridge ``lam``,
preserve scale ``preserve_scale``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..data import styled_prompt, unstyled_prompt
from ..methods import validate_concepts
from ...rece import RECERun, RECESettings, run_rece
from ...rece.pipeline import settings_fields

__all__ = [
    "CanvasRECEHost",
    "DEFAULT_TEMPLATES",
    "PRESERVE_MODES",
    "RECERecipe",
    "RECEReport",
    "RECE_OBJECT_ANCHOR",
    "RECE_STYLE_DEFAULTS",
    "apply_deltas",
    "canvas_projection_weights",
    "canvas_settings",
    "edit_texts",
    "method_options",
    "object_templates",
    "rece_canvas_edit",
    "rece_method",
    "uce_method",
]

DEFAULT_TEMPLATES: dict[str, str] = {"style": "{concept} style", "object": "an image of a {concept}"}
"""Concept text per kind: MiniCanvas prompts name a style as "... in {style} style" and start with
"an image of a {object}"."""

PRESERVE_MODES = ("others", "all", "empty", "none")
"""Preserve sets: other concepts of the kind + "", that plus the other kind's texts, "" only, nothing."""


@dataclass(frozen=True)
class RECERecipe:
    """How the plug-in writes a MiniCanvas erasure as texts (the options that are not
    :class:`~sae_core.rece.RECESettings` fields)."""

    concept_template: str = ""
    """Concept text(s) with ``{concept}``, several separated by ``|``; empty: :data:`DEFAULT_TEMPLATES`."""
    preserve: str = "others"
    """Preserve set, one of :data:`PRESERVE_MODES`."""
    quiet: bool = True
    """No progress bar / summary line."""

    def __post_init__(self) -> None:
        if self.preserve not in PRESERVE_MODES:
            raise ValueError(f"preserve must be one of {PRESERVE_MODES}, got {self.preserve!r}")
        raw = self.concept_template
        if raw and (not self.templates() or any("{concept}" not in t for t in self.templates())):
            raise ValueError(f"concept_template must contain '{{concept}}' (several separated by '|'), got {raw!r}")

    def templates(self, kind: str = "") -> list[str]:
        """The concept templates (``kind``'s default when ``concept_template`` is empty)."""
        raw = self.concept_template or DEFAULT_TEMPLATES[kind]
        return [t.strip() for t in raw.split("|") if t.strip()]


_RECIPE_FIELDS = tuple(f.name for f in fields(RECERecipe))
_SETTING_OPTIONS = tuple(n for n in settings_fields() if n not in ("concepts", "preserve", "method"))
"""Settings a bench option may set (the texts come from the canvas, the method from the method name)."""

RECE_STYLE_DEFAULTS: dict[str, Any] = {"epochs": 3, "preserve": "all"}
"""``rece`` defaults for styles (before the caller's options). MiniCanvas' text encoder carries the
object in every token after the object word, the style tokens included, so an edit that preserves
only the other styles also damages the object of the erased style's prompts (object accuracy on
them 67% with 1 epoch); preserving the object texts too and running RECE's 3 epochs keeps it at 98%
and erases more (UA 92% against 86%, all eight styles)."""


def object_templates(canvas: Any) -> str:
    """``rece``'s default concept texts for objects (``|``-separated templates): the object's unstyled
    prompt and its prompt in every style of ``canvas``; the preserve texts are then the same phrasings
    of the other objects. See :data:`RECE_OBJECT_ANCHOR` for the results."""
    return "|".join([unstyled_prompt("{concept}")] + [styled_prompt("{concept}", style) for style in canvas.styles])


RECE_OBJECT_ANCHOR = "an image of a"
"""``rece``'s default anchor for objects: the prompts' shared prefix, i.e. an object left unnamed (as
Concept Ablation maps an instance to its superclass). Over the eight objects (72 prompts, seed 0):
with the unstyled phrase as the only concept text and the empty anchor, UA 81%, IRA 91%, CRA 96%; with
every phrasing (:func:`object_templates`), UA 88%, IRA 94%, CRA 88%, but ``square`` survives (UA 11%)
because the empty prompt itself tends to draw a square; with this anchor as well, UA 90%, IRA 92%,
CRA 88%. The CRA cost: the erased object's own images also lose some of their style, since the later
tokens of its styled prompts carry the object and are edited with it."""


class RECEReport(NamedTuple):
    """What an edit did (attached to the edited canvas as ``rece_report``)."""

    concept_texts: list[str]
    """Texts whose encodings were erased."""
    anchor: str
    """Anchor text."""
    preserve_texts: list[str]
    """Texts whose values were preserved."""
    ranks: dict[str, int]
    """Inner dimension of each weight's low-rank delta."""
    relative_change: float
    """``||dW||_F / ||W||_F`` over all edited weights."""
    seconds: float
    """Wall time of the closed-form part (encoding + solves + applying the deltas)."""
    settings: RECESettings
    """The pipeline settings used."""
    recipe: dict
    """The plug-in's text options used."""


# ---------------------------------------------------------------------------------------------
# the host adapter
# ---------------------------------------------------------------------------------------------


def canvas_projection_weights(unet: nn.Module) -> dict[str, Tensor]:
    """``{"<attn2 name>.to_k.weight": W, "<attn2 name>.to_v.weight": W}`` for every cross-attention of ``unet``.

    The tensors are the live parameters (not copies); callers must not modify them.
    """
    out: dict[str, Tensor] = {}
    for name, mod in unet.named_modules():
        if name.endswith("attn2") and hasattr(mod, "to_k") and hasattr(mod, "to_v"):
            out[f"{name}.to_k.weight"] = mod.to_k.weight
            out[f"{name}.to_v.weight"] = mod.to_v.weight
    if not out:
        raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) with to_k/to_v to edit")
    return out


class CanvasRECEHost:
    """A MiniCanvas as a :class:`sae_core.rece.RECEHost`: its text encoder and its UNet's projections."""

    def __init__(self, canvas: Any) -> None:
        self.canvas = canvas

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
        """Encodings ``[B, L, d]`` (float32, CPU) and attention masks (one ``[L]`` per text)."""
        enc = self.canvas.encode_text(list(texts)).detach().float().cpu()
        mask = self.canvas.tokenize(list(texts)).attention_mask.cpu()
        return enc, list(mask)

    def projection_weights(self) -> dict[str, Tensor]:
        return canvas_projection_weights(self.canvas.unet)


@torch.no_grad()
def apply_deltas(unet: nn.Module, deltas: dict[str, Tensor]) -> None:
    """Add ``deltas`` (parameter name -> tensor) to the parameters of ``unet`` in place."""
    params = dict(unet.named_parameters())
    for key, delta in deltas.items():
        if key not in params:
            raise KeyError(f"no parameter {key!r} in {type(unet).__name__}")
        p = params[key]
        if p.shape != delta.shape:
            raise ValueError(f"delta for {key!r} has shape {tuple(delta.shape)}, the weight {tuple(p.shape)}")
        p.add_(delta.to(device=p.device, dtype=p.dtype))


# ---------------------------------------------------------------------------------------------
# texts and settings
# ---------------------------------------------------------------------------------------------


def edit_texts(canvas: Any, kind: str, concepts: list[str], recipe: RECERecipe) -> tuple[list[str], list[str]]:
    """``(concept texts, preserve texts)`` of an erasure; see the module docstring."""
    templates = recipe.templates(kind)
    concept_texts = [t.format(concept=c) for c in concepts for t in templates]
    preserve: list[str] = []
    if recipe.preserve != "none":
        preserve.append("")
    if recipe.preserve in ("others", "all"):
        names = canvas.styles if kind == "style" else canvas.objects
        preserve += [t.format(concept=n) for n in names if n not in concepts for t in templates]
    if recipe.preserve == "all":
        other = "object" if kind == "style" else "style"
        names = canvas.objects if other == "object" else canvas.styles
        preserve += [DEFAULT_TEMPLATES[other].format(concept=n) for n in names]
    preserve = [p for p in dict.fromkeys(preserve) if p not in concept_texts]
    return concept_texts, preserve


def canvas_settings(canvas: Any, kind: str, concepts: list[str], method: str = "rece",
                    **options: Any) -> tuple[RECESettings, RECERecipe]:
    """The pipeline settings (and the plug-in's text options) of a MiniCanvas erasure.

    ``options`` are :class:`~sae_core.rece.RECESettings` fields (not the texts) and :class:`RECERecipe` fields.
    """
    bad = sorted(set(options) - set(_SETTING_OPTIONS) - set(_RECIPE_FIELDS))
    if bad:
        known = ", ".join(sorted(_SETTING_OPTIONS + _RECIPE_FIELDS))
        raise ValueError(f"unknown {method} option(s) {bad}; known: {known}")
    recipe = RECERecipe(**{k: v for k, v in options.items() if k in _RECIPE_FIELDS})
    concept_texts, preserve_texts = edit_texts(canvas, kind, concepts, recipe)
    knobs = {k: v for k, v in options.items() if k in _SETTING_OPTIONS}
    return RECESettings(concepts=concept_texts, preserve=preserve_texts, method=method, **knobs), recipe


def rece_canvas_edit(canvas: Any, settings: RECESettings, progress: bool = False) -> RECERun:
    """The closed-form edit of ``canvas``' cross-attention projections (deltas keyed by UNet parameter names,
    not applied): :func:`sae_core.rece.run_rece` on :class:`CanvasRECEHost`."""
    return run_rece(CanvasRECEHost(canvas), settings, progress=progress)


# ---------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------


def _run(canvas: Any, kind: str, concepts: list[str], method: str, options: dict[str, Any]) -> Any:
    concepts = validate_concepts(canvas, kind, concepts)
    settings, recipe = canvas_settings(canvas, kind, concepts, method, **options)
    t0 = time.perf_counter()
    run = rece_canvas_edit(canvas, settings, progress=not recipe.quiet)
    unet = copy.deepcopy(canvas.unet).eval().requires_grad_(False)
    apply_deltas(unet, run.result.deltas)
    seconds = time.perf_counter() - t0
    report = RECEReport(run.concept_texts, run.anchor, run.preserve_texts,
                        {k: int(f[1].shape[0]) for k, f in run.result.factors.items()},
                        run.relative_change, seconds, settings, asdict(recipe))
    if not recipe.quiet:
        print(f"{method} {kind}:{','.join(concepts)}: {len(run.result.deltas)} projections, relative change "
              f"{report.relative_change:.3g}, {seconds:.2f}s", flush=True)
    edited = canvas.replace(unet=unet)
    edited.rece_report = report
    return edited


def method_options(canvas: Any, kind: str, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``method``'s MiniCanvas defaults for ``kind`` filled in: ``rece`` styles
    :data:`RECE_STYLE_DEFAULTS`, ``rece`` objects :func:`object_templates` and :data:`RECE_OBJECT_ANCHOR`;
    ``uce`` has none. What the bench runs, and what the node path fills the RECE node's inputs with."""
    if method == "rece" and kind == "style":
        return {**RECE_STYLE_DEFAULTS, **options}
    if method == "rece" and kind == "object":
        return {"concept_template": object_templates(canvas), "anchor": RECE_OBJECT_ANCHOR, **options}
    return dict(options)


def rece_method(canvas: Any, kind: str, concepts: list[str], **options: Any) -> Any:
    """Erase ``concepts`` (styles or objects) with RECE (UCE start + ``epochs`` RECE epochs).

    Returns a copy of the canvas with an edited deepcopy of the UNet and a :class:`RECEReport` as
    ``rece_report``; ``options``: see :func:`canvas_settings` (defaults: :func:`method_options`).
    """
    return _run(canvas, kind, concepts, "rece", method_options(canvas, kind, "rece", options))


def uce_method(canvas: Any, kind: str, concepts: list[str], **options: Any) -> Any:
    """Erase ``concepts`` with UCE alone (the edit RECE starts from; RECE's options are accepted and unused)."""
    return _run(canvas, kind, concepts, "uce", options)
