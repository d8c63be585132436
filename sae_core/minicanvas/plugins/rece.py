"""UCE and RECE on MiniCanvas: the ``uce`` and ``rece`` methods of ``python -m sae_core bench``.

Listed as ``uce`` and ``rece`` in :data:`sae_core.minicanvas.methods.PLUGINS`.

Both edit a deepcopy of the UNet: every cross-attention ``attn2.to_k`` / ``attn2.to_v`` weight gets a
closed-form delta (:mod:`sae_core.closed_form`, :mod:`sae_core.rece`); nothing else changes and the input
canvas is left untouched. The texts are encoded by the canvas' own text encoder (``canvas.encode_text``, the
conditioning the UNet sees), with the canvas tokenizer's attention mask giving the real-token counts.

Texts (``methods/rece.md`` sections 1.3-1.5, 2.2), built from how MiniCanvas prompts read
("an image of a star in striped style", "an image of a star"):

* **concept**: ``concept_template`` filled with the erased name, e.g. ``"{concept} style"`` for a style and
  ``"an image of a {concept}"`` for an object (several templates may be given, separated by ``|``;
  ``rece`` uses the object's prompt in every style too, see :func:`object_templates`);
* **anchor**: the empty prompt (UCE's and RECE's "towards uncond" target); any text can be set (``rece``
  maps objects to "an image of a", see :data:`RECE_OBJECT_ANCHOR`);
* **preserve**: the empty prompt (the unconditional branch of classifier-free guidance) plus the same
  template filled with every other concept of the erased kind (``preserve="others"``), optionally also the
  other kind's texts (``"all"``), only the empty prompt (``"empty"``) or nothing (``"none"``).

``uce`` is the UCE edit RECE starts from (last-word-token alignment, ridge ``uce_lam``, preserve scale
``max(0.1, 1 / #preserve)`` unless ``uce_preserve_scale`` is set). ``rece`` runs that edit and then
``epochs`` RECE epochs (adversarial embedding with ``lambda_reg``, all token positions, ridge ``lam``,
preserve scale ``preserve_scale``). Options (``--option key=value`` on the bench command line) are the
fields of :class:`RECERecipe`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..data import styled_prompt, unstyled_prompt
from ..methods import validate_concepts
from ...rece import RECEResult, rece_edit, uce_preserve_scale, uce_start

__all__ = [
    "DEFAULT_TEMPLATES",
    "PRESERVE_MODES",
    "RECERecipe",
    "RECEReport",
    "RECE_RECIPE",
    "RECE_OBJECT_ANCHOR",
    "RECE_STYLE_DEFAULTS",
    "object_templates",
    "UCE_RECIPE",
    "apply_deltas",
    "canvas_projection_weights",
    "edit_texts",
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
    """Settings of the MiniCanvas ``uce`` / ``rece`` methods (every field is a factory option)."""

    epochs: int = 1
    """RECE epochs after the UCE edit (0 gives plain UCE)."""
    lambda_reg: float = 1e-3
    """Ridge of the adversarial embedding (1e-3 for styles and hard objects, 0.1 for easy objects)."""
    variant: str = "regularized"
    """Adversarial-embedding objective (a key of ``sae_core.closed_form.EMBEDDING_VARIANTS``)."""
    erase_scale: float = 1.0
    """``s_e`` of every edit (UCE start and RECE epochs)."""
    preserve_scale: float = 0.1
    """``s_p`` of the RECE epochs."""
    lam: float = 0.1
    """Ridge of each RECE epoch towards the weights at the start of that epoch."""
    uce: bool = True
    """Start from the UCE edit (as RECE does); False runs the epochs on the unedited weights."""
    uce_lam: float = 0.5
    """Ridge of the UCE edit towards the original weights (UCE's 0.5)."""
    uce_preserve_scale: Optional[float] = None
    """``s_p`` of the UCE edit; None: UCE's ``max(0.1, 1 / number of preserve prompts)``."""
    concept_template: str = ""
    """Concept text(s) with ``{concept}``, several separated by ``|``; empty: :data:`DEFAULT_TEMPLATES`."""
    anchor: str = ""
    """Anchor text the concept is mapped to (the empty prompt)."""
    preserve: str = "others"
    """Preserve set, one of :data:`PRESERVE_MODES`."""
    uce_tokens: str = "last"
    """UCE start alignment: ``"last"`` (from the last word token, UCE 2023) or ``"all"`` (every position)."""
    quiet: bool = True
    """No progress bar / summary line."""


RECE_RECIPE = RECERecipe()
"""Default recipe of ``rece``."""

UCE_RECIPE = replace(RECE_RECIPE, epochs=0)
"""Default recipe of ``uce``."""

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
    recipe: dict
    """The recipe used."""


# ---------------------------------------------------------------------------------------------
# pieces
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


def _templates(recipe: RECERecipe, kind: str) -> list[str]:
    raw = recipe.concept_template or DEFAULT_TEMPLATES[kind]
    templates = [t.strip() for t in raw.split("|") if t.strip()]
    if not templates or any("{concept}" not in t for t in templates):
        raise ValueError(f"concept_template must contain '{{concept}}' (several separated by '|'), got {raw!r}")
    return templates


def edit_texts(canvas: Any, kind: str, concepts: list[str], recipe: RECERecipe) -> tuple[list[str], list[str]]:
    """``(concept texts, preserve texts)`` of an erasure; see the module docstring."""
    if recipe.preserve not in PRESERVE_MODES:
        raise ValueError(f"preserve must be one of {PRESERVE_MODES}, got {recipe.preserve!r}")
    templates = _templates(recipe, kind)
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


def _encode(canvas: Any, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Encodings ``[B, L, d]`` (float32, CPU) and attention masks ``[B, L]`` of ``texts``."""
    enc = canvas.encode_text(texts).detach().float().cpu()
    mask = canvas.tokenize(texts).attention_mask.cpu()
    return enc, mask


def rece_canvas_edit(canvas: Any, kind: str, concepts: list[str], recipe: RECERecipe) -> tuple[RECEResult, list[str], list[str]]:
    """The closed-form edit of ``canvas``' cross-attention projections (deltas, not applied).

    Returns the :class:`sae_core.rece.RECEResult` (keys: UNet parameter names) and the concept and preserve
    texts used.
    """
    concept_texts, preserve_texts = edit_texts(canvas, kind, concepts, recipe)
    weights = canvas_projection_weights(canvas.unet)
    c_enc, c_mask = _encode(canvas, concept_texts)
    a_enc, a_mask = _encode(canvas, [recipe.anchor])
    p_enc = _encode(canvas, preserve_texts)[0] if preserve_texts else None
    ctx = next(iter(weights.values())).shape[1]
    if c_enc.shape[-1] != ctx:
        raise ValueError(f"text encodings are {c_enc.shape[-1]} wide but the cross-attention reads {ctx}")
    device = next(iter(weights.values())).device
    preserve_rows = p_enc.reshape(-1, ctx).to(device) if p_enc is not None else None
    start = None
    if recipe.uce:
        s_p = recipe.uce_preserve_scale
        if s_p is None:
            s_p = uce_preserve_scale(len(preserve_texts))
        if recipe.uce_tokens == "last":
            start = uce_start(list(c_enc.to(device)), list(c_mask), a_enc[0].to(device), a_mask[0],
                              list(p_enc.to(device)) if p_enc is not None else [],
                              erase_scale=recipe.erase_scale, preserve_scale=s_p, lam=recipe.uce_lam)
        elif recipe.uce_tokens == "all":
            from ...rece import UCEStart

            start = UCEStart(c_enc.reshape(-1, ctx).to(device), a_enc[0].repeat(len(concept_texts), 1).to(device),
                             preserve_rows, recipe.erase_scale, s_p, recipe.uce_lam)
        else:
            raise ValueError(f"uce_tokens must be 'last' or 'all', got {recipe.uce_tokens!r}")
    result = rece_edit(weights, list(c_enc.to(device)), a_enc[0].to(device), preserve_rows, start=start,
                       epochs=recipe.epochs, lambda_reg=recipe.lambda_reg, variant=recipe.variant,
                       erase_scale=recipe.erase_scale, preserve_scale=recipe.preserve_scale, lam=recipe.lam,
                       progress=not recipe.quiet)
    return result, concept_texts, preserve_texts


def _recipe(base: RECERecipe, options: dict[str, Any], method: str) -> RECERecipe:
    known = {f.name for f in fields(RECERecipe)}
    bad = sorted(set(options) - known)
    if bad:
        raise ValueError(f"unknown {method} option(s) {bad}; known: {', '.join(sorted(known))}")
    recipe = replace(base, **options)
    if isinstance(recipe.epochs, bool) or not isinstance(recipe.epochs, int) or recipe.epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {recipe.epochs!r}")
    return recipe


def _run(canvas: Any, kind: str, concepts: list[str], recipe: RECERecipe, method: str) -> Any:
    concepts = validate_concepts(canvas, kind, concepts)
    t0 = time.perf_counter()
    result, concept_texts, preserve_texts = rece_canvas_edit(canvas, kind, concepts, recipe)
    unet = copy.deepcopy(canvas.unet).eval().requires_grad_(False)
    apply_deltas(unet, result.deltas)
    seconds = time.perf_counter() - t0
    weights = canvas_projection_weights(canvas.unet)
    num = sum(float(d.double().pow(2).sum()) for d in result.deltas.values())
    den = sum(float(w.double().pow(2).sum()) for w in weights.values())
    report = RECEReport(concept_texts, recipe.anchor, preserve_texts,
                        {k: int(f[1].shape[0]) for k, f in result.factors.items()},
                        (num / den) ** 0.5 if den > 0 else float("nan"), seconds, asdict(recipe))
    if not recipe.quiet:
        print(f"{method} {kind}:{','.join(concepts)}: {len(result.deltas)} projections, relative change "
              f"{report.relative_change:.3g}, {seconds:.2f}s", flush=True)
    edited = canvas.replace(unet=unet)
    edited.rece_report = report
    return edited


def rece_method(canvas: Any, kind: str, concepts: list[str], **options: Any) -> Any:
    """Erase ``concepts`` (styles or objects) with RECE (UCE start + ``epochs`` RECE epochs).

    Returns a copy of the canvas with an edited deepcopy of the UNet and a :class:`RECEReport` as
    ``rece_report``; ``options`` are :class:`RECERecipe` fields.
    """
    if kind == "style":
        options = {**RECE_STYLE_DEFAULTS, **options}
    elif kind == "object":
        options = {"concept_template": object_templates(canvas), "anchor": RECE_OBJECT_ANCHOR, **options}
    return _run(canvas, kind, concepts, _recipe(RECE_RECIPE, options, "rece"), "rece")


def uce_method(canvas: Any, kind: str, concepts: list[str], **options: Any) -> Any:
    """Erase ``concepts`` with UCE alone (the edit RECE starts from; ``epochs`` defaults to 0)."""
    return _run(canvas, kind, concepts, _recipe(UCE_RECIPE, options, "uce"), "uce")


