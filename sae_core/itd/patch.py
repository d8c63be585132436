"""Install an ItD edit on a text encoder: a forward hook on one encoder layer.

``with patch_text_encoder(model, sae, concepts) as patch: model(input_ids=ids)`` edits the hooked
layer's output for the prompts the classifier detects, and records every call's scores and
detections in ``patch.calls`` (for a UI: why a prompt was or was not changed). The hook returns a
new tensor (tuple outputs keep their other elements), never edits the model's tensors in place,
and is removed when the ``with`` block exits, also after an exception. The model's parameters
are never touched.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..sae import SparseAutoencoder
from .concepts import ItDConcepts
from .steering import GateOutput, ItDGate
from .text import module_width, resolve_layer

__all__ = ["ItDCall", "ItDPatch", "patch_text_encoder"]


class ItDCall(NamedTuple):
    """What the edit decided for one forward pass through the hooked layer."""

    scores: Tensor
    """``[B]`` fp32 classifier scores."""

    detected: Tensor
    """``[B]`` bool: which sequences were edited."""

    tau: float | None
    """The threshold in force."""

    length: int
    """Sequence length the layer saw."""


class ItDPatch:
    """A forward hook applying :class:`ItDGate` to one text-encoder layer.

    Args:
        model: the text encoder (transformers ``CLIPTextModel`` 4.x/5.x, or any module whose
            encoder layers :func:`~sae_core.itd.text.resolve_layer` can find).
        sae: the SAE the concepts were built with.
        concepts: the calibrated :class:`ItDConcepts`.
        layer: override of the hooked layer (index or dotted path); default ``concepts.hookpoint``,
            else ``concepts.layer``, else ``sae.cfg.hookpoint``.
        check_fingerprint: refuse an SAE whose fingerprint differs from the one recorded in the concepts.
        on_length_mismatch: what to do when the layer sees a sequence length other than the one
            the threshold was calibrated at (``concepts.pad_to``): ``"warn"`` (once), ``"error"``
            or ``"ignore"``.
        max_calls: how many past calls ``calls`` keeps (oldest dropped).
    """

    def __init__(
        self,
        model: nn.Module,
        sae: SparseAutoencoder,
        concepts: ItDConcepts,
        *,
        layer: int | str | None = None,
        check_fingerprint: bool = True,
        on_length_mismatch: str = "warn",
        max_calls: int = 64,
    ) -> None:
        if on_length_mismatch not in ("warn", "error", "ignore"):
            raise ValueError(f"on_length_mismatch must be 'warn', 'error' or 'ignore', got {on_length_mismatch!r}")
        concepts.check_sae(sae, strict=check_fingerprint)
        if layer is None:
            layer = _default_layer(model, concepts, sae)
        self.model = model
        self.layer_path, self.layer_module = resolve_layer(model, layer)
        width = module_width(self.layer_module, model)
        self.gate = ItDGate(sae, concepts.features, concepts.tau, concepts.scale, concepts.error_mode, concepts.skip_positions)
        if width is not None:
            self.gate.math.check_width(width, f"text-encoder layer '{self.layer_path}' of {type(model).__name__}")
        self.concepts = concepts
        self.on_length_mismatch = on_length_mismatch
        self.max_calls = max(1, int(max_calls))
        self.calls: list[ItDCall] = []
        self._warned = False
        self._handle: Any = None

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return self._handle is not None

    def install(self) -> "ItDPatch":
        """Register the hook (idempotent)."""
        if self._handle is None:
            self._handle = self.layer_module.register_forward_hook(self._hook)
        return self

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "ItDPatch":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @property
    def last(self) -> ItDCall | None:
        """The most recent call's decision, or ``None`` before the first call."""
        return self.calls[-1] if self.calls else None

    # -- the hook -----------------------------------------------------------------------------
    def _check_length(self, length: int) -> None:
        pad_to = self.concepts.pad_to
        if pad_to is None or length == pad_to or self.on_length_mismatch == "ignore":
            return
        message = (
            f"ItD: layer '{self.layer_path}' sees sequences of {length} tokens but the threshold was "
            f"calibrated at {pad_to}; scores are not comparable (re-calibrate with pad_to={length})"
        )
        if self.on_length_mismatch == "error":
            raise ValueError(message)
        if not self._warned:
            warnings.warn(message, stacklevel=3)
            self._warned = True

    def apply(self, hidden: Tensor) -> GateOutput:
        """Run the gate on one ``[B, L, d]`` residual and record the decision."""
        if hidden.dim() != 3:
            raise ValueError(f"ItD: layer '{self.layer_path}' output has shape {tuple(hidden.shape)}; expected [B, L, d]")
        self._check_length(int(hidden.shape[1]))
        result = self.gate(hidden)
        self.calls.append(ItDCall(result.scores, result.detected, self.gate.tau, int(hidden.shape[1])))
        del self.calls[: -self.max_calls]
        return result

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(hidden, Tensor):
            raise TypeError(f"ItD: layer '{self.layer_path}' returned {type(hidden).__name__}, expected a tensor")
        with torch.no_grad():
            result = self.apply(hidden)
        if result.hidden is hidden:
            return None  # nothing detected: the layer's own output continues, untouched
        if isinstance(output, tuple):
            return (result.hidden, *output[1:])
        if isinstance(output, list):
            return [result.hidden, *output[1:]]
        return result.hidden


def _default_layer(model: nn.Module, concepts: ItDConcepts, sae: SparseAutoencoder) -> int | str:
    for candidate in (concepts.hookpoint, concepts.layer, getattr(sae.cfg, "hookpoint", None)):
        if candidate is None:
            continue
        try:
            resolve_layer(model, candidate)
            return candidate
        except ValueError:
            continue
    if concepts.layer is not None:
        return concepts.layer
    raise ValueError(
        "ItD: cannot tell which text-encoder layer to hook (the concepts record no layer and the SAE no "
        "hookpoint); pass layer="
    )


def patch_text_encoder(
    model: nn.Module,
    sae: SparseAutoencoder,
    concepts: ItDConcepts,
    **kwargs: Any,
) -> ItDPatch:
    """Install the ItD edit on ``model`` and return the patch (also a context manager).

    ``with patch_text_encoder(model, sae, concepts) as patch: ...`` removes it on exit;
    otherwise call ``patch.remove()``. Keyword arguments go to :class:`ItDPatch`.
    """
    return ItDPatch(model, sae, concepts, **kwargs).install()
