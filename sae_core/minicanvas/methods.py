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
Modules register methods at import time; :func:`load_method_modules` imports every module
of the ``sae_core.methods`` package (missing package or modules are skipped).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Any, Callable

MethodFactory = Callable[..., Any]
"""``factory(canvas, kind, concepts, **options) -> edited canvas``."""

KINDS = ("style", "object")
"""What a MiniCanvas method erases: styles or objects."""

METHOD_PACKAGE = "sae_core.methods"
"""Package whose modules register MiniCanvas methods when imported."""

_REGISTRY: dict[str, MethodFactory] = {}


def register_method(name: str, factory: MethodFactory) -> None:
    """Register ``factory`` under ``name`` (re-registering the same name replaces it)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for method {name!r} must be callable, got {type(factory).__name__}")
    _REGISTRY[name.strip()] = factory


def unregister_method(name: str) -> None:
    """Remove a method (no error if absent)."""
    _REGISTRY.pop(name, None)


def registered_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodFactory:
    """The factory registered as ``name``; KeyError naming the registered methods otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(registered_methods()) or "none"
        raise KeyError(f"unknown method {name!r}; registered methods: {known}") from None


def load_method_modules(package: str = METHOD_PACKAGE, verbose: bool = False) -> list[str]:
    """Import every module of ``package`` so that they register their methods.

    Returns the imported module names. A missing package gives ``[]``; a module that fails
    to import is reported on stderr (with ``verbose``) and skipped, so one broken plug-in does
    not disable the others.
    """
    try:
        pkg = importlib.import_module(package)
    except ModuleNotFoundError as e:
        if e.name and package.startswith(e.name):
            return []
        raise
    imported = []
    for info in sorted(pkgutil.iter_modules(getattr(pkg, "__path__", [])), key=lambda i: i.name):
        name = f"{package}.{info.name}"
        try:
            importlib.import_module(name)
            imported.append(name)
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not break the command line
            if verbose:
                print(f"warning: could not import method module {name}: {type(e).__name__}: {e}", file=sys.stderr)
    return imported


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
