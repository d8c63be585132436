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
   ``lambda_reg``, all positions, ``s_p = preserve_scale``, ridge ``lam``);
5. with ``edit_pooled``, on a host whose model reads a pooled text vector (SDXL: clip_g's pooled output in the
   ADM input), the UCE edit of the pooled columns of the ADM input's first layer (concepts' pooled vectors to the
   anchor's, preserve prompts' kept, ``s_e``, the UCE edit's ``s_p``, ridge ``pooled_lambda`` relative to the
   vectors' scale; no RECE epochs there, see :mod:`sae_core.rece.pooled`); on other models there is nothing to
   edit and :attr:`RECERun.pooled_note` says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol, Union

import torch
from torch import Tensor

from .closed_form import (
    COMPUTE_DTYPE,
    EMBEDDING_VARIANTS,
    LowRankDeltas,
    _check_scale,
    _symmetrize_from_upper,
    _syrk_into,
    adversarial_map_from_grams,
)
from .epochs import (
    RECEConfig,
    RECEResult,
    UCEStart,
    rece_edit,
    uce_preserve_scale,
    uce_start,
)
from .pooled import PooledEdit, PooledInput, edit_pooled_input

__all__ = [
    "METHODS",
    "UCE_TOKENS",
    "PooledRECEHost",
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
    edit_pooled: bool = True
    """Also edit the pooled text input where the model has one (SDXL: clip_g's pooled vector, read by the first
    layer of the ADM input ``label_emb``): the UCE edit of that layer's pooled columns, for ``uce`` and ``rece``
    alike (RECE's epochs act on the cross-attention only; :mod:`sae_core.rece.pooled`). Models without one
    (SD1.x, SD2.x, MiniCanvas) have nothing to edit there."""
    pooled_lambda: float = 1e-3
    """Ridge of the pooled edit as a fraction of the mean squared norm of the pooled vectors (scale-free; smaller
    maps the concept's pooled vector closer to the anchor's and moves other prompts' more)."""

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
        for name in ("lambda_reg", "erase_scale", "uce_lambda", "preserve_scale", "lam", "pooled_lambda"):
            _check_scale(name, getattr(self, name))
        if not self.erase_scale > 0:
            raise ValueError(f"erase_scale must be > 0 (at 0 every edit is zero: nothing is erased), got {self.erase_scale}")
        if self.uce_preserve_scale is not None:
            _check_scale("uce_preserve_scale", self.uce_preserve_scale)
        if self.uce_tokens not in UCE_TOKENS:
            raise ValueError(f"uce_tokens must be one of {UCE_TOKENS}, got {self.uce_tokens!r}")
        if not self.pooled_lambda > 0:
            raise ValueError(f"pooled_lambda must be > 0 (the pooled edit's ridge; one vector per prompt cannot span "
                             f"the pooled width without it), got {self.pooled_lambda}")
        if not isinstance(self.edit_pooled, bool):
            raise ValueError(f"edit_pooled must be True or False, got {self.edit_pooled!r}")
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


class PooledRECEHost(RECEHost, Protocol):
    """A host whose model may also read a pooled text vector (SDXL). Both methods are optional: a host without
    ``pooled_input`` has no pooled path."""

    def pooled_input(self) -> Optional[PooledInput]:
        """The ADM weight and its pooled columns, or ``None`` when this model reads no pooled text vector."""

    def encode_pooled(self, texts: Sequence[str]) -> Tensor:
        """The pooled text vectors ``[B, P]`` the model reads for ``texts`` (as for sampling)."""


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
    """``||dW||_F / ||W||_F`` over all edited cross-attention weights."""
    changes: dict[str, float]
    """``name -> ||dW||_F / ||W||_F`` of every edited cross-attention weight (:func:`layer_changes`)."""
    pooled: Optional[PooledEdit] = None
    """The edit of the pooled text input, when the settings ask for it and the model has one."""
    pooled_note: str = ""
    """Why the pooled text input was not edited (empty when it was)."""
    probe: Optional[list[Tensor]] = None
    """With ``probe=True``: :attr:`RECEResult.probe` (each concept's adversarial rows against the edit)."""


def _norm_sq(deltas: Mapping[str, Tensor], key: str) -> float:
    if isinstance(deltas, LowRankDeltas):
        return deltas.norm_sq(key)
    return float(deltas[key].detach().double().pow(2).sum())


def _weight_norm_sq(w: Tensor) -> float:
    return float(torch.linalg.vector_norm(w.detach(), dtype=COMPUTE_DTYPE)) ** 2


def _changes(deltas: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> tuple[dict[str, float], float]:
    """``(layer_changes, relative_change)`` from one pass over the weights."""
    per, num, den = {}, 0.0, 0.0
    for k in deltas:
        d, w = _norm_sq(deltas, k), _weight_norm_sq(weights[k])
        per[k] = (d / w) ** 0.5 if w > 0 else 0.0
        num, den = num + d, den + w
    return per, ((num / den) ** 0.5 if den > 0 else 0.0)


def relative_change(deltas: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> float:
    """``||dW||_F / ||W||_F`` over all weights (float64 sums; 0 for all-zero weights). Low-rank deltas
    (:class:`~sae_core.rece.closed_form.LowRankDeltas`) are measured from their factors."""
    return _changes(deltas, weights)[1]


def layer_changes(deltas: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> dict[str, float]:
    """``name -> ||dW||_F / ||W||_F`` of every edited weight, in ``deltas``' order (what each layer changed)."""
    return _changes(deltas, weights)[0]


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

    The sums ``sum (W + dW)^T (W + dW)`` and ``sum (W + dW)^T W`` are built one weight at a time. Low-rank deltas
    (``dW = U D``, :class:`~sae_core.rece.closed_form.LowRankDeltas`) add only ``W^T U`` and ``U^T U`` per weight
    to ``sum W^T W``, and weights that share one ``D`` (every weight of one edit) are summed before ``D`` is
    applied; other deltas are added densely.
    """
    if not deltas:
        raise ValueError("leak_probe: no deltas given")
    low_rank = isinstance(deltas, LowRankDeltas)
    s_up: Optional[Tensor] = None  # upper triangle of sum W^T W over the low-rank weights
    a_up: Optional[Tensor] = None  # upper triangle of sum (W+dW)^T (W+dW) over the dense ones
    b_dense: Optional[Tensor] = None  # sum (W+dW)^T W over the dense ones
    groups: dict[int, list] = {}  # id(D) -> [D, sum W^T U, sum U^T U]
    for k in deltas:
        w = weights[k].detach().to(COMPUTE_DTYPE)
        if low_rank and not deltas.is_dense(k):
            up, down = deltas.factors_of(k)
            u = up.detach().to(w.device, COMPUTE_DTYPE)
            s_up = _syrk_into(s_up, w)
            group = groups.setdefault(id(down), [down, None, None])
            wu, uu = w.T @ u, u.T @ u
            group[1] = wu if group[1] is None else group[1].add_(wu)
            group[2] = uu if group[2] is None else group[2].add_(uu)
        else:
            current = w + deltas[k].detach().to(w.device, COMPUTE_DTYPE)
            a_up = _syrk_into(a_up, current)
            prod = current.T @ w
            b_dense = prod if b_dense is None else b_dense.add_(prod)
    parts_a, parts_b = [], []
    if s_up is not None:
        s = _symmetrize_from_upper(s_up)
        parts_a.append(s)
        parts_b.append(s)
    if a_up is not None:
        parts_a.append(_symmetrize_from_upper(a_up))
        parts_b.append(b_dense)
    a = torch.stack(parts_a).sum(0) if len(parts_a) > 1 else parts_a[0].clone()
    b = torch.stack(parts_b).sum(0) if len(parts_b) > 1 else parts_b[0].clone()
    for down, wu, uu in groups.values():
        d = down.detach().to(a.device, COMPUTE_DTYPE)
        cross = wu @ d  # sum W^T U D
        a.add_(cross).add_(cross.T).add_(d.T @ uu @ d)
        b.add_(cross.T)
    a = (a + a.T).mul_(0.5)
    amap = adversarial_map_from_grams(a, b, lambda_reg, variant)
    rows = concepts.to(amap.matrix.device, torch.float64)
    ref = reference.to(rows).reshape(-1, rows.shape[-1]) if reference is not None else None
    return amap.apply(rows.reshape(-1, rows.shape[-1]), ref).reshape(rows.shape)


@torch.no_grad()
def run_rece(host: RECEHost, settings: RECESettings, *, progress: bool = False, probe: bool = False) -> RECERun:
    """The UCE / RECE edit of ``host``'s cross-attention projections for ``settings`` (see the module doc), and of
    its pooled text input when ``settings.edit_pooled`` and the host has one (:class:`PooledRECEHost`).

    ``probe``: also compute each concept's adversarial rows against the edit (:attr:`RECERun.probe`, and the
    pooled vectors' in :attr:`RECERun.pooled`), what one more epoch would erase.
    """
    concept_texts = list(settings.concepts)
    preserve_texts = settings.preserve_texts
    c_enc, c_tokens = host.encode(concept_texts)
    a_enc, a_tokens = host.encode([settings.anchor])
    _check_anchor(concept_texts, c_enc, settings.anchor, a_enc[0])
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
    config = RECEConfig(epochs=settings.rece_epochs, lambda_reg=settings.lambda_reg, variant=settings.variant,
                        erase_scale=settings.erase_scale, preserve_scale=settings.preserve_scale, lam=settings.lam)
    result = rece_edit(weights, concepts, anchor, preserve_rows, config, start=start, progress=progress, probe=probe)
    changes, overall = _changes(result.deltas, weights)
    pooled, note = _pooled_edit(host, settings, concept_texts, preserve_texts, probe)
    return RECERun(result, concept_texts, settings.anchor, preserve_texts, s_p, config.epochs, ctx,
                   overall, changes, pooled, note, result.probe)


def _check_anchor(concept_texts: list[str], c_enc: Tensor, anchor: str, a_enc: Tensor) -> None:
    """ValueError when the anchor encodes like one of the concepts (the same prompt, maybe in other case or spacing):
    UCE would map that concept onto itself and erase nothing, and RECE's epochs next to nothing."""
    a = a_enc.detach().double()
    for text, c in zip(concept_texts, c_enc):
        if c.shape == a.shape and float((c.detach().double() - a).norm()) <= 1e-6 * max(float(a.norm()), 1e-30):
            raise ValueError(f"anchor: {anchor!r} encodes like the concept {text!r}; a concept mapped onto itself is "
                             "not erased. Choose another anchor (empty = the unconditional prompt; 'art' for a style)")


def _pooled_edit(host: RECEHost, settings: RECESettings, concept_texts: list[str], preserve_texts: list[str],
                 probe: bool) -> tuple[Optional[PooledEdit], str]:
    """Step 5 of the module doc: the pooled text input's edit, or ``None`` and the reason there is none."""
    if not settings.edit_pooled:
        return None, "edit_pooled is off: the pooled text input (if the model has one) is not edited"
    find = getattr(host, "pooled_input", None)
    target = find() if find is not None else None
    if target is None:
        return None, "the model reads no pooled text vector: only the cross-attention is edited"
    encode = getattr(host, "encode_pooled", None)
    if encode is None:
        raise ValueError(f"{type(host).__name__} names a pooled input but cannot encode pooled vectors "
                         "(encode_pooled)")
    pc = encode(concept_texts)
    pa = encode([settings.anchor])
    pp = encode(preserve_texts) if preserve_texts else None
    edit = edit_pooled_input(target, pc, pa, pp, erase_scale=settings.erase_scale,
                             preserve_scale=settings.resolved_uce_preserve_scale, pooled_lambda=settings.pooled_lambda,
                             lambda_reg=settings.lambda_reg, variant=settings.variant, probe=probe)
    return edit, ""


def settings_fields() -> tuple[str, ...]:
    """Names of the :class:`RECESettings` fields (a host's options are checked against them)."""
    return tuple(f.name for f in dataclasses.fields(RECESettings))
