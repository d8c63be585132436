"""Registry of erasure methods runnable on MiniCanvas.

A method is a factory::

    factory(canvas: MiniCanvas, kind: str, concepts: list[str], **options) -> MiniCanvas

``kind`` is ``"style"`` or ``"object"``; ``concepts`` are names from ``canvas.styles`` /
``canvas.objects``. The factory returns an *edited* canvas and must leave the input canvas
untouched. Typical edits, all through ``canvas.replace(...)`` (a shallow copy):

* ``canvas.replace(unet=edited_unet)`` with a deepcopy of the UNet whose weights changed
  (closed-form edits, LoRA merges);
* ``canvas.with_hook("output_blocks.3.1", fn)``: ``fn(module, inputs, output, ctx)`` runs on
  that block during sampling; ``ctx.step_index`` / ``ctx.timestep`` / ``ctx.cfg_order`` say
  where the sampler is;
* ``canvas.replace(encode_fn=fn)`` (or overriding ``encode_text`` on the copy): a
  replacement text encoding ``fn(prompts) -> [B, L, d]``.

The bench times the factory call and then generates and judges images with the result.
The plug-ins live in :mod:`sae_core.minicanvas.plugins`, one module per method; :data:`PLUGINS`
names each method's module and function, and :func:`get_method` imports only the module asked
for (one method's dependencies never load with another's). :func:`register_method` adds a
method from elsewhere (e.g. a test or an experiment).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

MethodFactory = Callable[..., Any]
"""``factory(canvas, kind, concepts, **options) -> edited canvas``."""

KINDS = ("style", "object")
"""What a MiniCanvas method erases: styles or objects."""

PLUGINS: dict[str, tuple[str, str]] = {
    "amnesia": ("amnesia", "amnesia_method"),
    "itd": ("itd", "itd_method"),
    "rece": ("rece", "rece_method"),
    "saeuron": ("saeuron", "saeuron_factory"),
    "uce": ("rece", "uce_method"),
}
"""Method name -> (module in :mod:`sae_core.minicanvas.plugins`, factory function)."""

_REGISTRY: dict[str, MethodFactory] = {}


def register_method(name: str, factory: MethodFactory) -> None:
    """Register ``factory`` under ``name`` (it takes precedence over a plug-in of that name)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for method {name!r} must be callable, got {type(factory).__name__}")
    _REGISTRY[name.strip()] = factory


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (no error if absent)."""
    _REGISTRY.pop(name, None)


def registered_methods() -> list[str]:
    """Names of every method: the plug-ins and the registered ones, sorted."""
    return sorted(set(PLUGINS) | set(_REGISTRY))


def get_method(name: str) -> MethodFactory:
    """The factory of ``name``; KeyError naming the known methods otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in PLUGINS:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(registered_methods())}")
    module, function = PLUGINS[name]
    return getattr(importlib.import_module(f"{__package__}.plugins.{module}"), function)


def validate_concepts(canvas: Any, kind: str, concepts: list[str]) -> list[str]:
    """Check ``kind`` and that every concept exists on ``canvas``; returns the concept list."""
    if kind not in KINDS:
        raise ValueError(f"kind must be 'style' or 'object', got {kind!r}")
    names = canvas.styles if kind == "style" else canvas.objects
    if not concepts:
        raise ValueError(f"no {kind} to erase was given")
    bad = [c for c in concepts if c not in names]
    if bad:
        raise ValueError(f"unknown {kind}(s) {bad}; expected one of {list(names)}")
    return list(concepts)
