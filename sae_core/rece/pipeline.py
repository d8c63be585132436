"""The UCE / RECE erasure as one host-neutral pipeline: texts in, cross-attention deltas out.

Both hosts run this function: the ComfyUI node (``nodes/rece.py``: a MODEL's patched weights and a CLIP)
and the MiniCanvas plug-in (``sae_core/minicanvas/plugins/rece.py``: the canvas' UNet and text encoder).
A host only adapts its objects to :class:`RECEHost`; every choice of texts, token positions, scales and
order lives here, behind one :class:`RECESettings`.

Order of work (method brief ``methods/rece.md`` sections 1.3-1.5):

1. encode the concept texts, the anchor and the preserve texts (in that order, one host call each);
2. read the projection weights to edit (every ``attn2.to_k`` / ``attn2.to_v``);
3. the UCE edit (:func:`~sae_core.rece.epochs.uce_start`: concept and anchor aligned from their last word
   token, preserve prompts at all positions, ``s_p = uce_preserve_scale``, ridge ``uce_lambda``);
4. for ``rece``, ``epochs`` RECE epochs (:func:`~sae_core.rece.epochs.rece_edit`: adversarial embedding with
   ``lambda_reg``, all positions, ``s_p = preserve_scale``, ridge ``lam``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol, Union

import torch
from torch import Tensor

from .closed_form import EMBEDDING_VARIANTS, _check_scale, adversarial_map
from .epochs import RECEResult, UCEStart, rece_edit, uce_preserve_scale, uce_start

__all__ = [
    "METHODS",
    "UCE_TOKENS",
    "RECEHost",
    "RECERun",
    "RECESettings",
    "layer_changes",
    "leak_probe",
    "relative_change",
    "run_rece",
    "settings_fields",
]

METHODS = ("rece", "uce")
"""``uce``: the UCE edit alone; ``rece``: the UCE edit followed by ``epochs`` RECE epochs."""

UCE_TOKENS = ("last", "all")
"""Token rows of the UCE edit: from the last word token on (UCE 2023, what RECE builds on) or every position."""


@dataclass(frozen=True)
class RECESettings:
    """Everything that decides a UCE / RECE edit, validated once at construction.

    The ComfyUI node's inputs carry these names; the MiniCanvas plug-in's options are these fields too
    (it derives ``concepts`` and ``preserve`` from the canvas). Lists given for ``concepts`` and
    ``preserve`` are stored as tuples.
    """

    concepts: tuple[str, ...]
    """Texts whose encodings are erased (all together, in one edit per step)."""
    anchor: str = ""
    """Text the concepts are mapped to; empty: the unconditional prompt (``"art"`` is usual for artists)."""
    preserve: tuple[str, ...] = ()
    """Texts whose values are kept (duplicates and concept texts are dropped, see :attr:`preserve_texts`)."""
    method: str = "rece"
    """One of :data:`METHODS`."""
    epochs: int = 1
    """RECE epochs after the UCE edit (ignored by ``uce``)."""
    lambda_reg: float = 1e-3
    """Ridge of RECE's adversarial embedding (1e-3 for styles and hard objects, 0.1 for nudity, easy objects)."""
    variant: str = "regularized"
    """Adversarial-embedding objective, a key of :data:`~sae_core.rece.closed_form.EMBEDDING_VARIANTS`."""
    erase_scale: float = 1.0
    """``s_e`` of every edit (the UCE edit and each epoch)."""
    uce_preserve_scale: Optional[float] = None
    """``s_p`` of the UCE edit; ``None``: UCE's ``max(0.1, 1 / number of preserve texts)``."""
    uce_lambda: float = 0.5
    """Ridge of the UCE edit towards the original weights (UCE's 0.5)."""
    preserve_scale: float = 0.1
    """``s_p`` of each RECE epoch."""
    lam: float = 0.1
    """Ridge of each RECE epoch towards the weights at the start of that epoch."""
    uce_tokens: str = "last"
    """Token rows of the UCE edit, one of :data:`UCE_TOKENS`."""
    start_from_uce: bool = True
    """Run the UCE edit first (as RECE does); False runs the epochs on the unedited weights."""

    def __post_init__(self) -> None:
        for name in ("concepts", "preserve"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(t, str) for t in value):
                raise ValueError(f"{name}: expected a list of texts, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.concepts:
            raise ValueError("concepts: the concept list is empty (write one concept per line or comma-separated)")
        if not isinstance(self.anchor, str):
            raise ValueError(f"anchor: expected a text, got {self.anchor!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if self.variant not in EMBEDDING_VARIANTS:
            raise ValueError(f"variant: unknown adversarial-embedding variant {self.variant!r}; "
                             f"choose one of {sorted(EMBEDDING_VARIANTS)}")
        for name in ("lambda_reg", "erase_scale", "uce_lambda", "preserve_scale", "lam"):
            _check_scale(name, getattr(self, name))
        if self.uce_preserve_scale is not None:
            _check_scale("uce_preserve_scale", self.uce_preserve_scale)
        if self.uce_tokens not in UCE_TOKENS:
            raise ValueError(f"uce_tokens must be one of {UCE_TOKENS}, got {self.uce_tokens!r}")
        if self.method == "uce" and not self.start_from_uce:
            raise ValueError("start_from_uce=False leaves method 'uce' nothing to do; use method 'rece'")

    @property
    def rece_epochs(self) -> int:
        """The epochs that run: ``epochs`` for ``rece``, 0 for ``uce``."""
        return self.epochs if self.method == "rece" else 0

    @property
    def preserve_texts(self) -> list[str]:
        """``preserve`` without duplicates and without the concept texts, in order."""
        concepts = set(self.concepts)
        return [p for p in dict.fromkeys(self.preserve) if p not in concepts]

    @property
    def resolved_uce_preserve_scale(self) -> float:
        """``uce_preserve_scale``, or UCE's default for the number of :attr:`preserve_texts`."""
        if self.uce_preserve_scale is not None:
            return float(self.uce_preserve_scale)
        return uce_preserve_scale(len(self.preserve_texts))


TokenCounts = Sequence[Union[int, Tensor]]
"""Per text: its real-token count (BOS, words, EOS) or its attention mask ``[L]``."""


class RECEHost(Protocol):
    """What the pipeline needs from a host (a ComfyUI MODEL + CLIP, a MiniCanvas)."""

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, TokenCounts]:
        """The conditioning the UNet sees for ``texts``: encodings ``[B, L, ctx]`` (one ``L`` for all texts)
        and each text's real-token count or attention mask."""

    def projection_weights(self) -> Mapping[str, Tensor]:
        """``name -> W [out, ctx]`` of every cross-attention ``to_k`` / ``to_v`` to edit (not modified)."""


class RECERun(NamedTuple):
    """What :func:`run_rece` computed (nothing is applied to the host)."""

    result: RECEResult
    """Deltas (the weights' dtype), their exact low-rank factors and the adversarial rows per epoch."""
    concept_texts: list[str]
    anchor: str
    preserve_texts: list[str]
    uce_preserve_scale: float
    """``s_p`` the UCE edit used (0 when it did not run)."""
    epochs: int
    """RECE epochs run."""
    context_dim: int
    relative_change: float
    """``||dW||_F / ||W||_F`` over all edited weights."""


def relative_change(deltas: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> float:
    """``||dW||_F / ||W||_F`` over all weights (float64 sums; 0 for all-zero weights)."""
    num = sum(float(d.double().pow(2).sum()) for d in deltas.values())
    den = sum(float(weights[k].double().pow(2).sum()) for k in deltas)
    return (num / den) ** 0.5 if den > 0 else 0.0


def layer_changes(deltas: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> dict[str, float]:
    """``name -> ||dW||_F / ||W||_F`` of every edited weight, in ``deltas``' order (what each layer changed)."""
    return {k: relative_change({k: d}, weights) for k, d in deltas.items()}


@torch.no_grad()
def leak_probe(weights: Mapping[str, Tensor], deltas: Mapping[str, Tensor], concepts: Tensor, lambda_reg: float,
               variant: str = "regularized", reference: Optional[Tensor] = None) -> Tensor:
    """RECE's adversarial embedding ``c'`` of each concept against the edited weights ``W + dW``: ``[B, L, ctx]``.

    ``c'`` minimises ``sum_l ||(W_l + dW_l) x - W_l c||^2`` plus ``lambda_reg`` times the variant's penalty, for
    every token row of the concept encodings ``concepts [B, L, ctx]``: the text-side embedding that makes the
    edited projections give what the original ones gave for the concept. It is what one more RECE epoch would
    erase (for ``uce``, the first epoch's ``c'``), so sampling the edited model with it shows how much of the
    concept is still reachable. ``reference [B, L, ctx]`` (the anchor rows) only for the ``"reference"`` variant.
    Float64 on the weights' device.
    """
    original = {k: weights[k].double() for k in deltas}
    current = {k: original[k] + deltas[k].to(original[k].device, torch.float64) for k in deltas}
    amap = adversarial_map(current, original, lambda_reg, variant)
    rows = concepts.to(amap.matrix.device, torch.float64)
    ref = reference.to(rows).reshape(-1, rows.shape[-1]) if reference is not None else None
    return amap.apply(rows.reshape(-1, rows.shape[-1]), ref).reshape(rows.shape)


@torch.no_grad()
def run_rece(host: RECEHost, settings: RECESettings, *, progress: bool = False) -> RECERun:
    """The UCE / RECE edit of ``host``'s cross-attention projections for ``settings`` (see the module doc)."""
    concept_texts = list(settings.concepts)
    preserve_texts = settings.preserve_texts
    c_enc, c_tokens = host.encode(concept_texts)
    a_enc, a_tokens = host.encode([settings.anchor])
    p_enc = host.encode(preserve_texts)[0] if preserve_texts else None
    weights = host.projection_weights()
    first = next(iter(weights.values()))
    ctx, device = int(first.shape[1]), first.device
    if c_enc.shape[-1] != ctx:
        raise ValueError(f"the text encoder's conditioning is {c_enc.shape[-1]} wide but the cross-attention reads "
                         f"{ctx}-wide context; use the text encoder that belongs to this model")

    concepts = list(c_enc.to(device))
    anchor = a_enc[0].to(device)
    preserve = list(p_enc.to(device)) if p_enc is not None else []
    preserve_rows = p_enc.reshape(-1, ctx).to(device) if p_enc is not None else None
    start: Optional[UCEStart] = None
    s_p = settings.resolved_uce_preserve_scale if settings.start_from_uce else 0.0
    if settings.start_from_uce and settings.uce_tokens == "last":
        start = uce_start(concepts, list(c_tokens), anchor, a_tokens[0], preserve, erase_scale=settings.erase_scale,
                          preserve_scale=s_p, lam=settings.uce_lambda)
    elif settings.start_from_uce:  # every position of each concept against every position of the anchor
        start = UCEStart(c_enc.reshape(-1, ctx).to(device), anchor.repeat(len(concepts), 1), preserve_rows,
                         settings.erase_scale, s_p, settings.uce_lambda)
    epochs = settings.rece_epochs
    result = rece_edit(weights, concepts, anchor, preserve_rows, start=start, epochs=epochs,
                       lambda_reg=settings.lambda_reg, variant=settings.variant, erase_scale=settings.erase_scale,
                       preserve_scale=settings.preserve_scale, lam=settings.lam, progress=progress)
    return RECERun(result, concept_texts, settings.anchor, preserve_texts, s_p, epochs, ctx,
                   relative_change(result.deltas, weights))


def settings_fields() -> tuple[str, ...]:
    """Names of the :class:`RECESettings` fields (a host's options are checked against them)."""
    return tuple(f.name for f in dataclasses.fields(RECESettings))
