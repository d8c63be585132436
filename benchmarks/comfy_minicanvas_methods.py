"""UCE, RECE and ItD as node graphs on the MiniCanvas Checkpoint, with the settings of ``python -m sae_core bench``.

Each ``*_nodes`` function inserts one method's nodes between the MiniCanvas Checkpoint's ``model`` / ``clip``
outputs and the sampling nodes of a prompt graph (``benchmarks/comfy_minicanvas.py`` builds and runs those
graphs through ComfyUI's executor); each ``*_inputs`` function gives the node's inputs that reproduce the
MiniCanvas plug-in's erasure, so tests can call the node classes with exactly what the graphs carry:

* ``uce`` / ``rece`` -> **RECE Edit Model** on the MODEL. Its texts are the plug-in's
  (:func:`sae_core.minicanvas.plugins.rece.canvas_settings` with :func:`~sae_core.minicanvas.plugins.rece.method_options`):
  for a style the concept ``"<style> style"``, the other styles' and (``rece``) the objects' texts as
  preserve prompts, 3 epochs for ``rece``; for an ``rece`` object every phrasing of the object's prompts as
  concepts, the anchor ``"an image of a"`` and the other objects' phrasings as preserve prompts.
* ``itd`` -> **Load SAE** (the shipped ``minicanvas/itd_text.safetensors``) -> **ItD Prompt Classifier** on
  the CLIP, with the plug-in's settings (:func:`sae_core.minicanvas.plugins.itd.canvas_settings`): the
  concept's MiniCanvas prompts as concepts (each its own calibration prompt; features and threshold are those
  of the plug-in's one concept with all of them), every other MiniCanvas prompt plus the empty prompt as
  retain prompts, layer 2, ``top_n`` 32, positions ``all``, strength -8 for styles and -1 for objects.

``options`` are the bench's ``--option key=value`` pairs for the same method; those that are no node input
are refused rather than ignored.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

__all__ = [
    "ITD_SAE",
    "METHODS",
    "itd_inputs",
    "itd_nodes",
    "rece_inputs",
    "rece_nodes",
    "uce_nodes",
]

ITD_SAE = "minicanvas/itd_text.safetensors"
"""Load SAE's name of the ItD SAE shipped with MiniCanvas (``sae_core/minicanvas/weights/itd_text_sae.safetensors``)."""

_RECE_NODE_FIELDS = ("method", "epochs", "lambda_reg", "erase_scale", "uce_lambda", "preserve_scale", "lam")
"""RECESettings fields the RECE Edit Model node takes under the same name (besides the texts and
``uce_preserve_scale``, whose "default" is -1 on the node)."""


def _canvas_names() -> Any:
    from sae_core.minicanvas.data import OBJECTS, STYLES

    return SimpleNamespace(styles=list(STYLES), objects=list(OBJECTS))


def _lines(texts: Sequence[str]) -> str:
    return "\n".join(texts)


def rece_inputs(kind: str, concepts: Sequence[str], method: str = "rece", **options: Any) -> dict[str, Any]:
    """The RECE Edit Model inputs (without ``model`` / ``clip``) of the MiniCanvas plug-in's ``method`` erasure."""
    from sae_core.minicanvas.methods import validate_concepts
    from sae_core.minicanvas.plugins.rece import canvas_settings, method_options
    from sae_core.rece import RECESettings

    canvas = _canvas_names()
    concepts = validate_concepts(canvas, kind, list(concepts))
    options = method_options(canvas, kind, method, dict(options))
    options.pop("quiet", None)
    settings, _recipe = canvas_settings(canvas, kind, concepts, method, **options)
    defaults = RECESettings(concepts=("x",))
    fixed = [f for f in ("variant", "uce_tokens", "start_from_uce") if getattr(settings, f) != getattr(defaults, f)]
    if fixed:
        raise ValueError(f"{method}: option(s) {fixed} are not inputs of RECE Edit Model")
    if "" not in settings.preserve:
        raise ValueError(f"{method}: RECE Edit Model always preserves the empty prompt (preserve='none' cannot be "
                         "expressed)")
    texts = [t for t in settings.concepts + settings.preserve + (settings.anchor,) if "," in t]
    if texts:
        raise ValueError(f"{method}: texts with commas cannot be node inputs (one per line or comma-separated): "
                         f"{texts[:3]}")
    inputs = {
        "concepts": _lines(settings.concepts),
        "anchor": settings.anchor,
        "preserve": _lines([p for p in settings.preserve if p]),
        "uce_preserve_scale": -1.0 if settings.uce_preserve_scale is None else float(settings.uce_preserve_scale),
        "device": "cpu",
    }
    inputs.update({f: getattr(settings, f) for f in _RECE_NODE_FIELDS})
    return inputs


def itd_inputs(kind: str, concepts: Sequence[str], **options: Any) -> dict[str, Any]:
    """The ItD Prompt Classifier inputs (without ``clip`` / ``sae``) of the MiniCanvas plug-in's ``itd`` erasure
    with the shipped SAE."""
    from sae_core.minicanvas.methods import validate_concepts
    from sae_core.minicanvas.plugins.itd import MiniCanvasItDConfig, canvas_settings

    concepts = validate_concepts(_canvas_names(), kind, list(concepts))
    options = dict(options)
    options.pop("quiet", None)
    layer = int(options.pop("layer", MiniCanvasItDConfig().layer))
    settings = canvas_settings(kind, concepts, layer, **options)
    if settings.error_mode != "reconstruct" or settings.skip_positions != 1:
        raise ValueError("itd: error_mode and skip_positions are not inputs of ItD Prompt Classifier")
    retain = list(settings.retain_prompts)
    return {
        "concepts": _lines(settings.target_prompts),
        "retain_prompts": _lines([p for p in retain if p]),
        "layer": settings.layer,
        "scale": float(settings.scale),
        "threshold_margin": float(settings.threshold_margin),
        "top_n": int(settings.top_n),
        "templates": "{}",
        "positions": settings.positions,
        "retain_empty_prompt": "" in retain,
    }


def _rece_graph(method: str, graph: Any, kind: str, concepts: Sequence[str], model: list, clip: list,
                **options: Any) -> tuple[list, list]:
    edit = graph.add("CE_RECEEditModel", model=model, clip=clip, **rece_inputs(kind, concepts, method, **options))
    return graph.out(edit, 0), clip


def rece_nodes(graph: Any, kind: str, concepts: Sequence[str], model: list, clip: list,
               **options: Any) -> tuple[list, list]:
    """RECE Edit Model (method rece) with the bench's ``rece`` settings; returns ``(edited model, clip)``."""
    return _rece_graph("rece", graph, kind, concepts, model, clip, **options)


def uce_nodes(graph: Any, kind: str, concepts: Sequence[str], model: list, clip: list,
              **options: Any) -> tuple[list, list]:
    """RECE Edit Model (method uce) with the bench's ``uce`` settings; returns ``(edited model, clip)``."""
    return _rece_graph("uce", graph, kind, concepts, model, clip, **options)


def itd_nodes(graph: Any, kind: str, concepts: Sequence[str], model: list, clip: list,
              **options: Any) -> tuple[list, list]:
    """Load SAE (the shipped ItD SAE) -> ItD Prompt Classifier with the bench's ``itd`` settings; returns
    ``(model, classifying clip)``. The empty prompt is retained, so the negative prompt passes unchanged."""
    sae = graph.add("CE_LoadSAE", sae_name=ITD_SAE, device="cpu", dtype="float32")
    itd = graph.add("CE_ItDPromptClassifier", clip=clip, sae=graph.out(sae), **itd_inputs(kind, concepts, **options))
    return model, graph.out(itd, 0)


METHODS = {"uce": uce_nodes, "rece": rece_nodes, "itd": itd_nodes}
"""Method name (as ``python -m sae_core bench --method``) -> the function inserting its nodes."""
