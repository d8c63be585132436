"""RECE on top of UCE: a few closed-form epochs that erase the concept's adversarial embedding.

The driver works on a list of cross-attention projections (every ``attn2.to_k`` and ``attn2.to_v`` of a UNet,
one context width) and already-encoded prompts; it never loads a model or a text encoder.

Algorithm (``W`` the original weights, never modified)::

    W' <- W, or W + (a prior edit), or UCE(W)                    (``start``)
    for each of ``epochs`` epochs:
        M  <- argmin_x sum_l ||W'_l x - W_l c||^2 + penalty(x)   (one solve per epoch, all concepts)
        c' <- c M^T for every concept's token rows c (all L positions)
        W' <- UCE edit of W' mapping c' -> W' c_anchor, preserving W' c_p, ridge lam towards W' (this epoch's W')
    return W' - W  (dense deltas and an exact low-rank factorisation)

Implementation. Every UCE edit with anchor targets is a right multiplication ``W'_l <- W'_l (I + a D)`` by a
``[ctx, ctx]`` matrix shared by all layers (see :mod:`sae_core.rece.closed_form`), so the driver tracks one matrix
``K = I + A B`` (``A [ctx, R]``, ``B [R, ctx]``, ``R`` = erase rows so far) instead of the layers. The sums
RECE needs become ``sum W'^T W' = K^T S K`` and ``sum W'^T W = K^T S`` with ``S = sum W^T W`` computed once;
only ``S`` and the final factors ``up_l = W_l A`` touch the weights. All of it is float64.

Token positions (method brief section 1.4):

- UCE (the start): the concept and anchor encodings are aligned from their last word token; see
  :func:`uce_token_rows`. Preserve prompts use all positions.
- RECE epochs: all ``L`` positions of the bare concept encoding (BOS, words, EOS and padding), index-aligned
  with all ``L`` positions of the anchor encoding; see :func:`rece_token_rows`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .closed_form import (
    COMPUTE_DTYPE,
    EMBEDDING_VARIANTS,
    EditResult,
    _check_scale,
    _check_weights,
    _erase_system64,
    _rows,
    adversarial_rows_from_grams,
    cross_gram,
    edit_from_factors,
    gram,
)

__all__ = [
    "RECE_PRESETS",
    "RECEConfig",
    "RECEResult",
    "UCEStart",
    "last_token_row",
    "rece_edit",
    "rece_token_rows",
    "token_count",
    "uce_preserve_scale",
    "uce_start",
    "uce_token_rows",
]

Rows = Union[Tensor, Sequence[Tensor]]


@dataclass(frozen=True)
class RECEConfig:
    """Settings of the RECE epochs. Defaults: the nudity setting of the reference scripts."""

    epochs: int = 3
    """Number of closed-form epochs (fixed; the method has no convergence test)."""
    lambda_reg: float = 0.1
    """Regulariser of the adversarial embedding: 0.1 for nudity, unsafe and easy objects; 1e-3 for artists
    and difficult objects."""
    variant: str = "regularized"
    """Adversarial-embedding objective, a key of :data:`sae_core.rece.closed_form.EMBEDDING_VARIANTS`:
    ``"regularized"`` (ridge towards zero, as every published script) or ``"reference"`` (ridge towards
    reference rows, by default the anchor encoding); the ``"surrogate_*"`` variants are the unused alternatives."""
    erase_scale: float = 1.0
    """``s_e`` of each epoch's edit."""
    preserve_scale: float = 0.1
    """``s_p`` of each epoch's edit."""
    lam: float = 0.1
    """Ridge of each epoch's edit towards the weights at the start of that epoch."""
    repeat_preserve_per_concept: bool = False
    """Reference-code behaviour: its preserve list is the empty prompt once per concept, so the preserve rows
    count once per concept (for the 11 I2P concepts, an effective ``s_p`` of 1.1). Off by default: the
    preserve rows count once."""


RECE_PRESETS: dict[str, RECEConfig] = {
    "nudity": RECEConfig(epochs=3, lambda_reg=0.1),
    "unsafe": RECEConfig(epochs=2, lambda_reg=0.1),
    "artist": RECEConfig(epochs=1, lambda_reg=1e-3),
    "object_easy": RECEConfig(epochs=1, lambda_reg=0.1),
    "object_hard": RECEConfig(epochs=1, lambda_reg=1e-3),
}
"""The settings of the reference scripts per task (anchor: the empty prompt, or ``"art"`` for artists)."""


def uce_preserve_scale(num_preserve_prompts: int) -> float:
    """UCE's preserve scale for a preserve list of that many prompts: ``max(0.1, 1 / n)`` (1.0 for ``[""]``)."""
    if num_preserve_prompts <= 0:
        return 0.0
    return max(0.1, 1.0 / num_preserve_prompts)


class UCEStart(NamedTuple):
    """A UCE edit run before the RECE epochs, from already-selected token rows (see :func:`uce_start`)."""

    erase_rows: Tensor
    """Erase rows ``[n, ctx]`` (for UCE: last-token-aligned slices of the concept encodings)."""
    anchor_rows: Tensor
    """Anchor rows ``[n, ctx]`` position-aligned with ``erase_rows``; targets are ``W c_anchor``."""
    preserve_rows: Optional[Tensor] = None
    """Preserve rows ``[m, ctx]`` (all positions of each preserve prompt), or ``None``."""
    erase_scale: float = 1.0
    """``s_e``."""
    preserve_scale: float = 1.0
    """``s_p``; UCE uses ``max(0.1, 1 / number of preserve prompts)``."""
    lam: float = 0.5
    """Ridge towards the original weights (UCE's hard-coded 0.5)."""


class RECEResult(NamedTuple):
    """Output of :func:`rece_edit`."""

    deltas: Mapping[str, Tensor]
    """``name -> W_final - W`` (the start edit and every epoch), formed from ``factors`` when read
    (:class:`~sae_core.rece.closed_form.LowRankDeltas`)."""
    factors: dict[str, tuple[Tensor, Tensor]]
    """``name -> (up, down)`` with ``up @ down == delta``; inner dimension = all erase rows used (or ``ctx``)."""
    adversarial: list[list[Tensor]]
    """``adversarial[epoch][concept]``: the adversarial rows ``c'`` ``[L, ctx]`` (float64) erased in that epoch."""
    probe: Optional[list[Tensor]] = None
    """With ``probe=True``: each concept's adversarial rows ``[L, ctx]`` (float64) against the final weights, what
    one more epoch would erase (:func:`sae_core.rece.leak_probe` of the result, from the driver's own sums)."""

    def as_edit(self) -> EditResult:
        """The deltas and factors as an :class:`EditResult` (e.g. the ``start`` of a further run)."""
        return EditResult(self.deltas, self.factors)


# ---------------------------------------------------------------------------------------------------------------
# token positions


def _encoding(name: str, enc: Tensor) -> Tensor:
    if isinstance(enc, Tensor) and enc.dim() == 3 and enc.shape[0] == 1:
        enc = enc[0]
    if not isinstance(enc, Tensor) or enc.dim() != 2:
        shape = tuple(enc.shape) if isinstance(enc, Tensor) else type(enc).__name__
        raise ValueError(f"{name}: expected one prompt encoding [L, ctx] (or [1, L, ctx]), got {shape}")
    return enc


def token_count(tokens: Union[int, Tensor], length: Optional[int] = None) -> int:
    """Number of real tokens (BOS, words, EOS) from a count or an attention mask ``[L]`` / ``[1, L]``."""
    if isinstance(tokens, Tensor):
        mask = tokens.reshape(-1)
        if length is not None and mask.numel() != length:
            raise ValueError(f"attention mask has {mask.numel()} positions, the encoding has {length}")
        count = int((mask != 0).sum())
    else:
        count = int(tokens)
    if count < 2 or (length is not None and count > length):
        raise ValueError(f"token count {count} is not a valid prompt length (BOS + words + EOS, at most {length})")
    return count


def uce_token_rows(
    concept: Tensor, concept_tokens: Union[int, Tensor], anchor: Tensor, anchor_tokens: Union[int, Tensor]
) -> tuple[Tensor, Tensor]:
    """UCE's (2023) erase/anchor rows: both encodings sliced from their last word token, equal length.

    With ``final = tokens - 2`` (the last word token; 0, the BOS, for an empty prompt), the concept keeps
    positions ``final_c .. final_c + k - 1`` and the anchor ``final_a .. final_a + k - 1`` with
    ``k = L - max(final_c, final_a)``: last word to last word, EOS to EOS, padding to padding.

    Args:
        concept, anchor: full prompt encodings ``[L, ctx]`` of the same ``L``.
        concept_tokens, anchor_tokens: real-token counts or attention masks.

    Returns:
        ``(erase_rows [k, ctx], anchor_rows [k, ctx])``.
    """
    concept = _encoding("concept", concept)
    anchor = _encoding("anchor", anchor)
    if concept.shape != anchor.shape:
        raise ValueError(f"concept {tuple(concept.shape)} and anchor {tuple(anchor.shape)} encodings differ in shape")
    length = concept.shape[0]
    fc = token_count(concept_tokens, length) - 2
    fa = token_count(anchor_tokens, length) - 2
    k = length - max(fc, fa)
    return concept[fc:fc + k], anchor[fa:fa + k]


def rece_token_rows(encoding: Tensor) -> Tensor:
    """RECE's rows: every position of the prompt encoding ``[L, ctx]`` (BOS, words, EOS and padding)."""
    return _encoding("encoding", encoding)


def last_token_row(encoding: Tensor, tokens: Union[int, Tensor]) -> Tensor:
    """The single last-word-token row ``[1, ctx]`` (the 2025 UCE rewrite's choice; not what RECE builds on)."""
    enc = _encoding("encoding", encoding)
    final = token_count(tokens, enc.shape[0]) - 2
    return enc[final:final + 1]


def uce_start(
    concepts: Sequence[Tensor],
    concept_tokens: Sequence[Union[int, Tensor]],
    anchor: Tensor,
    anchor_tokens: Union[int, Tensor],
    preserve: Sequence[Tensor] = (),
    *,
    erase_scale: float = 1.0,
    preserve_scale: Optional[float] = None,
    lam: float = 0.5,
) -> UCEStart:
    """The UCE edit RECE starts from, built from full prompt encodings.

    Each concept is aligned with the anchor by :func:`uce_token_rows`; preserve prompts contribute all their
    positions; ``preserve_scale`` defaults to :func:`uce_preserve_scale` of the number of preserve prompts.
    """
    if len(concepts) == 0:
        raise ValueError("uce_start: the concept list is empty")
    if len(concept_tokens) != len(concepts):
        raise ValueError(f"uce_start: {len(concept_tokens)} token counts for {len(concepts)} concepts")
    erase, anchors = [], []
    for enc, tok in zip(concepts, concept_tokens):
        e, a = uce_token_rows(enc, tok, anchor, anchor_tokens)
        erase.append(e)
        anchors.append(a)
    pres = torch.cat([_encoding("preserve", p) for p in preserve], dim=0) if len(preserve) else None
    scale = uce_preserve_scale(len(preserve)) if preserve_scale is None else float(preserve_scale)
    return UCEStart(torch.cat(erase), torch.cat(anchors), pres, erase_scale, scale, lam)


# ---------------------------------------------------------------------------------------------------------------
# the driver


class _EditChain:
    """Current weights ``W_cur_l = W'_l K`` with ``K = I + A B`` shared by all layers (float64).

    ``S = sum W'^T W'`` (and ``X = sum W'^T W`` after a prior edit) are computed on first use: a UCE edit alone
    never reads them, and they are the one cost that grows with ``ctx^2`` times the number of weight rows.
    """

    def __init__(self, weights: Mapping[str, Tensor], prior: Optional[EditResult], ctx: int, device: torch.device):
        self.weights = weights
        self.prior = prior
        self.ctx = ctx
        self._s: Optional[Tensor] = None
        self._x: Optional[Tensor] = None  # sum W'^T W after a prior edit; without one it equals s
        self.a = torch.zeros(ctx, 0, dtype=COMPUTE_DTYPE, device=device)
        self.b = torch.zeros(0, ctx, dtype=COMPUTE_DTYPE, device=device)

    def _start_weight(self, name: str) -> Tensor:
        w = self.weights[name].detach().to(COMPUTE_DTYPE)
        if self.prior is not None:
            w = w + self.prior.deltas[name].to(w)
        return w

    @property
    def s(self) -> Tensor:
        if self._s is None:
            names = list(self.weights)
            if self.prior is None:
                self._s = gram(self.weights[n] for n in names)
            else:
                self._s = gram(self._start_weight(n) for n in names)
                self._x = cross_gram((self._start_weight(n) for n in names), (self.weights[n] for n in names))
        return self._s

    def grams(self) -> tuple[Tensor, Tensor]:
        """``(sum W_cur^T W_cur, sum W_cur^T W)`` = ``(K^T S K, K^T X)``."""
        s, a, b = self.s, self.a, self.b
        x = self._x
        rank = a.shape[1]
        if rank == 0:
            return s, (s if x is None else x)
        if 2 * rank < self.ctx:  # low-rank products: 8 ctx^2 R flops instead of 4 ctx^3
            sk = torch.addmm(s, s @ a, b)
            ktsk = torch.addmm(sk, b.T, a.T @ sk)
            ktx = sk.T if x is None else torch.addmm(x, b.T, a.T @ x)
        else:
            k = torch.addmm(torch.eye(self.ctx, dtype=s.dtype, device=s.device), a, b)
            sk = s @ k
            ktsk = k.T @ sk
            ktx = sk.T if x is None else k.T @ x
        ktsk = (ktsk + ktsk.T).mul_(0.5)
        return ktsk, ktx

    def edit(self, erase: Tensor, anchor: Tensor, preserve_gram: Optional[Tensor], s_e: float, s_p: float,
             lam: float) -> None:
        """UCE edit of the current weights: ``erase -> W_cur anchor``, preserve rows kept, ridge ``lam``."""
        system = _erase_system64(erase, None, s_e, s_p, lam, preserve_gram=preserve_gram)
        mix = (anchor - erase).T.mul(s_e)  # [ctx, n]
        ka = torch.addmm(mix, self.a, self.b @ mix)  # K mix
        self.a = torch.cat([self.a, ka], dim=1)
        self.b = torch.cat([self.b, system.down], dim=0)
        if self.a.shape[1] > self.ctx:  # keep the factorisation no wider than ctx
            self.a = self.a @ self.b
            self.b = torch.eye(self.ctx, dtype=COMPUTE_DTYPE, device=self.a.device)

    def _up(self, name: str) -> Tensor:
        """``W'_l A``: the one product with each weight, at the weight's precision (float32 at least).

        ``A`` is a plain difference of prompt encodings (times ``s_e``, chained through earlier edits); the solves
        that need float64 are all in ``B``. A prior edit enters through its factors: ``(W + U D) A = W A + U (D A)``.
        """
        w = self.weights[name].detach()
        wide = torch.promote_types(w.dtype, torch.float32)
        up = w.to(wide) @ self.a.to(wide)
        if self.prior is not None:
            pu, pd = self.prior.factors[name]
            up = up.add_(pu.to(wide) @ (pd.to(COMPUTE_DTYPE) @ self.a).to(wide))
        return up

    def result(self, dtypes: Mapping[str, torch.dtype]) -> EditResult:
        """``W_cur - W = prior + W' A B`` as an :class:`EditResult`."""
        if self.a.shape[1] == 0:
            ups = {n: torch.zeros(w.shape[0], 0, dtype=COMPUTE_DTYPE, device=self.a.device)
                   for n, w in self.weights.items()}
        else:
            ups = {n: self._up(n) for n in self.weights}
        return edit_from_factors(ups, self.b, dtypes, extra=self.prior)


def _concept_list(name: str, rows: Rows, ctx: int, device: torch.device) -> list[Tensor]:
    if isinstance(rows, Tensor):
        items = [rows] if rows.dim() == 2 else list(rows.unbind(0)) if rows.dim() == 3 else None
        if items is None:
            raise ValueError(f"{name}: expected [L, ctx], [k, L, ctx] or a list of [L_i, ctx], got {tuple(rows.shape)}")
    else:
        items = list(rows)
    if not items:
        raise ValueError(f"{name}: no concepts given")
    out = [_rows(f"{name}[{i}]", r, ctx, device) for i, r in enumerate(items)]
    return out  # type: ignore[return-value]


def _aligned_list(name: str, rows: Rows, concepts: list[Tensor], ctx: int, device: torch.device) -> list[Tensor]:
    """One ``[L_i, ctx]`` block per concept: a single encoding is shared by every concept."""
    if isinstance(rows, Tensor) and rows.dim() == 2:
        shared = _rows(name, rows, ctx, device)
        items = [shared] * len(concepts)
    else:
        items = _concept_list(name, rows, ctx, device)
        if len(items) != len(concepts):
            raise ValueError(f"{name}: {len(items)} encodings for {len(concepts)} concepts")
    for i, (r, c) in enumerate(zip(items, concepts)):
        if r.shape != c.shape:
            raise ValueError(f"{name}: encoding {i} has shape {tuple(r.shape)}, its concept has {tuple(c.shape)}; "
                             "RECE aligns all positions, so they must match")
    return items


def _resolve_config(config: Optional[RECEConfig], overrides: dict) -> RECEConfig:
    cfg = config if config is not None else RECEConfig()
    if overrides:
        known = {f.name for f in dataclasses.fields(RECEConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"rece_edit: unknown setting(s) {unknown}; RECEConfig has {sorted(known)}")
        cfg = dataclasses.replace(cfg, **overrides)
    if isinstance(cfg.epochs, bool) or not isinstance(cfg.epochs, int) or cfg.epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {cfg.epochs!r}")
    if cfg.variant not in EMBEDDING_VARIANTS:
        raise ValueError(f"variant: unknown adversarial-embedding variant {cfg.variant!r}; "
                         f"choose one of {sorted(EMBEDDING_VARIANTS)}")
    for field in ("lambda_reg", "erase_scale", "preserve_scale", "lam"):
        _check_scale(field, getattr(cfg, field))
    return cfg


@torch.no_grad()
def rece_edit(
    weights: Mapping[str, Tensor],
    concept_rows: Rows,
    anchor_rows: Rows,
    preserve_rows: Optional[Tensor] = None,
    config: Optional[RECEConfig] = None,
    *,
    start: Union[UCEStart, EditResult, None] = None,
    reference_rows: Optional[Rows] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    probe: bool = False,
    **overrides,
) -> RECEResult:
    """RECE: ``config.epochs`` closed-form epochs that erase each concept's adversarial embedding.

    Args:
        weights: ``name -> W [out, ctx]``, the original projections (all ``attn2.to_k`` and ``attn2.to_v``;
            one context width, one device, any float dtype). They are not modified.
        concept_rows: the bare concept prompt's full encoding ``[L, ctx]`` (all positions), or one per concept
            (``[k, L, ctx]`` or a list). All concepts are erased together in each epoch's single edit.
        anchor_rows: the anchor prompt's encoding (``" "``, or ``"art"`` for artists), one shared ``[L, ctx]``
            or one per concept, position-aligned with the concept rows.
        preserve_rows: preserve token rows ``[m, ctx]`` (all positions of each preserve prompt), or ``None``.
        config: :class:`RECEConfig` (default: the nudity setting); keyword ``overrides`` replace its fields,
            e.g. ``rece_edit(..., epochs=1, lambda_reg=1e-3)``.
        start: what the epochs start from: ``None`` (the original weights), a :class:`UCEStart` (run that UCE
            edit first), or an :class:`EditResult` of an edit already made to ``weights``.
        reference_rows: the ``t`` rows of the ``"reference"`` variant (default: the anchor rows).
        dtype: dtype of the returned deltas and factors (default: each weight's dtype).
        progress: show a progress bar over the epochs.
        probe: also compute :attr:`RECEResult.probe` (costs the ``sum W^T W`` of the weights when no epoch ran).

    Returns:
        :class:`RECEResult` with the total edit relative to ``weights`` (start included).
    """
    cfg = _resolve_config(config, overrides)
    ctx, device = _check_weights(weights)
    concepts = _concept_list("concept_rows", concept_rows, ctx, device)
    anchors = _aligned_list("anchor_rows", anchor_rows, concepts, ctx, device)
    uses_reference = EMBEDDING_VARIANTS[cfg.variant].toward_reference != 0.0
    if reference_rows is not None and not uses_reference:
        raise ValueError(f"reference_rows is only used by the 'reference' variant, not {cfg.variant!r}")
    refs = _aligned_list("reference_rows", reference_rows, concepts, ctx, device) if reference_rows is not None \
        else anchors
    preserve = _rows("preserve_rows", preserve_rows, ctx, device, allow_none=True)
    preserve_gram = preserve.T @ preserve if preserve is not None else None
    s_p = cfg.preserve_scale * (len(concepts) if cfg.repeat_preserve_per_concept else 1)

    prior: Optional[EditResult] = None
    if isinstance(start, EditResult):
        missing = set(weights) - set(start.deltas)
        if missing:
            raise ValueError(f"start: the prior edit has no delta for {sorted(missing)}")
        prior = start
    elif start is not None and not isinstance(start, UCEStart):
        raise ValueError(f"start: expected None, a UCEStart or an EditResult, got {type(start).__name__}")
    chain = _EditChain(weights, prior, ctx, device)
    if isinstance(start, UCEStart):
        ue = _rows("start.erase_rows", start.erase_rows, ctx, device)
        ua = _rows("start.anchor_rows", start.anchor_rows, ctx, device)
        if ua.shape != ue.shape:
            raise ValueError(f"start: {ua.shape[0]} anchor rows for {ue.shape[0]} erase rows; they must be aligned")
        up = _rows("start.preserve_rows", start.preserve_rows, ctx, device, allow_none=True)
        chain.edit(ue, ua, up.T @ up if up is not None else None, _check_scale("start.erase_scale", start.erase_scale),
                   _check_scale("start.preserve_scale", start.preserve_scale), _check_scale("start.lam", start.lam))

    anchor_all = torch.cat(anchors, dim=0)
    concept_all = torch.cat(concepts, dim=0)
    reference_all = torch.cat(refs, dim=0) if uses_reference else None
    sizes = [c.shape[0] for c in concepts]
    adversarial: list[list[Tensor]] = []
    for _ in tqdm(range(cfg.epochs), desc="RECE epochs", disable=not progress):
        # one factorisation per epoch, applied to every concept's rows in one solve
        adv_all = adversarial_rows_from_grams(*chain.grams(), concept_all, cfg.lambda_reg, cfg.variant,
                                              reference_all)
        adversarial.append(list(adv_all.split(sizes, dim=0)))
        chain.edit(adv_all, anchor_all, preserve_gram, cfg.erase_scale, s_p, cfg.lam)

    probe_rows: Optional[list[Tensor]] = None
    if probe:
        rows = adversarial_rows_from_grams(*chain.grams(), concept_all, cfg.lambda_reg, cfg.variant, reference_all)
        probe_rows = list(rows.split(sizes, dim=0))
    dtypes = {name: (dtype or w.dtype) for name, w in weights.items()}
    edit = chain.result(dtypes)
    return RECEResult(edit.deltas, edit.factors, adversarial, probe_rows)
