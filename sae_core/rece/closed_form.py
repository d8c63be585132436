"""Closed-form edits of cross-attention projections: the UCE solve and RECE's adversarial embedding map.

Notation. Token vectors are rows, the way a prompt encoding ``[L, ctx]`` is laid out.

- ``W``: one projection weight ``[out, ctx]`` (an ``attn2.to_k`` or ``attn2.to_v``); ``W0`` its value before the edit.
- ``C_e``: erase rows ``[n, ctx]``; ``C_a``: anchor rows ``[n, ctx]``, position-aligned with ``C_e``;
  ``C_p``: preserve rows ``[m, ctx]``; ``V``: target values ``[n, out]`` for the erase rows.

**UCE.** Per matrix the edit minimises::

    s_e ||W C_e^T - V^T||^2 + s_p ||(W - W0) C_p^T||^2 + lam ||W - W0||_F^2

whose minimiser is ``W = (lam W0 + s_e V^T C_e + s_p W0 C_p^T C_p) G^-1`` with
``G = lam I + s_e C_e^T C_e + s_p C_p^T C_p`` (``[ctx, ctx]``, symmetric positive definite for ``lam > 0``).
The preserve and ``lam`` terms both pull towards ``W0``, so they cancel in the difference::

    dW = s_e (V^T - W0 C_e^T) (C_e G^-1) = up @ down,    up [out, n],  down = C_e G^-1 [n, ctx]

``down`` does not depend on the matrix: one Cholesky factorisation of ``G`` and one triangular solve with the
``n`` erase rows as right-hand sides serve every projection that reads the same context rows, and the
factorisation is exact with rank ``<= n``. With anchor targets (``V = C_a W0^T``, UCE's "replace" technique)
``up = s_e W0 (C_a - C_e)^T``, so the whole edit is a right multiplication ``W = W0 (I + s_e (C_a - C_e)^T down)``
by one ``[ctx, ctx]`` matrix shared by all layers; :mod:`sae_core.rece.epochs` chains edits through that matrix.

**RECE embedding.** With ``W'_l`` the current (edited) and ``W_l`` the original projections, the adversarial
embedding of a concept encoding ``c`` is ``c' = argmin_x sum_l ||W'_l x - W_l c||^2 + penalty(x)``, solved for
all token rows at once as ``c' = c M^T (+ t N^T)``; see :data:`EMBEDDING_VARIANTS`.

Everything is computed in float64 (Gram sums, Cholesky factorisations, triangular solves; no explicit
inverse); results are cast back to the weights' dtype unless another dtype is asked for. An edit keeps its deltas
as their exact low-rank factors; :class:`LowRankDeltas` forms a dense ``dW = up @ down`` only when it is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "COMPUTE_DTYPE",
    "EMBEDDING_VARIANTS",
    "AdversarialMap",
    "EditResult",
    "EmbeddingPenalty",
    "EraseSystem",
    "LowRankDeltas",
    "adversarial_map",
    "adversarial_map_from_grams",
    "adversarial_rows_from_grams",
    "cross_gram",
    "edit_from_factors",
    "erase_system",
    "gram",
    "uce_edit",
    "uce_solve_reference",
]

COMPUTE_DTYPE = torch.float64
"""dtype of every Gram sum and solve in this module."""


class LowRankDeltas(Mapping):
    """``name -> dW [out, ctx]``: each delta formed from its factors ``(up, down)`` when it is read.

    A dense delta of every projection is as large as the weights themselves (SDXL: 341 M numbers), while the factors
    of an edit of a few prompts are a small fraction of that; so the deltas are never stored. Reading one costs
    one product ``up @ down``, computed in float32 or wider and returned in the factors' dtype; a weight whose
    factorisation is ``(dW, I)`` (inner dimension = ``ctx``) returns its stored ``dW``. Hold what you read if you
    need it more than once. :meth:`norm_sq` gives ``||dW||_F^2`` from the factors alone.
    """

    def __init__(self, factors: Mapping[str, tuple[Tensor, Tensor]], dense: Iterable[str] = ()) -> None:
        self._factors = dict(factors)
        self._dense = frozenset(dense)
        unknown = self._dense - set(self._factors)
        if unknown:
            raise ValueError(f"dense: no factors for {sorted(unknown)}")

    def __getitem__(self, name: str) -> Tensor:
        up, down = self._factors[name]
        if name in self._dense:
            return up
        wide = torch.promote_types(torch.promote_types(up.dtype, down.dtype), torch.float32)
        return (up.to(wide) @ down.to(wide)).to(up.dtype)

    def __iter__(self):
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)

    def factors_of(self, name: str) -> tuple[Tensor, Tensor]:
        """The stored ``(up, down)`` of ``name`` (``(dW, I)`` when :meth:`is_dense`)."""
        return self._factors[name]

    def is_dense(self, name: str) -> bool:
        """True when ``name`` is stored whole, as ``(dW, I)``."""
        if name not in self._factors:
            raise KeyError(name)
        return name in self._dense

    def norm_sq(self, name: str) -> float:
        """``||dW||_F^2`` in float64, from the factors: ``sum((up^T up) * (down down^T))``."""
        up, down = self._factors[name]
        if name in self._dense:
            return float(up.detach().to(COMPUTE_DTYPE).pow(2).sum())
        u = up.detach().to(COMPUTE_DTYPE)
        d = down.detach().to(COMPUTE_DTYPE)
        return float(((u.T @ u) * (d @ d.T)).sum().clamp_min(0.0))

    def __repr__(self) -> str:
        return f"LowRankDeltas({len(self)} weights, {len(self._dense)} stored whole)"


def _is_identity(m: Tensor) -> bool:
    return m.dim() == 2 and m.shape[0] == m.shape[1] and torch.equal(m, torch.eye(m.shape[0], dtype=m.dtype,
                                                                                     device=m.device))


class EditResult(NamedTuple):
    """A weight edit: its exact low-rank factorisation, and the deltas those factors make."""

    deltas: Mapping[str, Tensor]
    """``name -> dW [out, ctx]`` to add to the weight (ComfyUI ``("diff", (dW,))`` patch); a
    :class:`LowRankDeltas`, formed from ``factors`` when read."""
    factors: dict[str, tuple[Tensor, Tensor]]
    """``name -> (up [out, r], down [r, ctx])`` with ``up @ down == dW`` (a LoRA with alpha = r)."""

    def rank(self, name: str) -> int:
        """Inner dimension ``r`` of the factorisation of ``name`` (an upper bound on the rank of its delta)."""
        return int(self.factors[name][1].shape[0])


class EraseSystem(NamedTuple):
    """The matrix-independent part of a UCE edit."""

    cholesky: Tensor
    """Lower Cholesky factor of ``G = lam I + s_e C_e^T C_e + s_p C_p^T C_p`` ``[ctx, ctx]`` (float64)."""
    down: Tensor
    """``C_e G^-1`` ``[n, ctx]`` (float64): the shared ``down`` factor of every layer's delta."""


class EmbeddingPenalty(NamedTuple):
    """Weights (multiples of ``lambda_reg``) of the terms added to ``sum_l ||W'_l x - W_l c||^2``."""

    ridge: float
    """``||x||^2``: the ridge towards zero."""
    toward_reference: float
    """``||x - t||^2``: a ridge towards reference rows ``t`` (the old UCE target, e.g. the empty prompt)."""
    output_surrogate: float
    """``sum_l ||W'_l x - W'_l c||^2``: stay close to what the edited model makes of ``c``."""
    input_surrogate: float
    """``||x - c||^2``: stay close to ``c`` itself."""


EMBEDDING_VARIANTS: dict[str, EmbeddingPenalty] = {
    # RECE's published setting (close_form_emb_regzero, used by every script): c' = (lr I + A)^-1 B c.
    "regularized": EmbeddingPenalty(1.0, 0.0, 0.0, 0.0),
    # Ridge towards the reference rows t (close_standardreg): c' = (lr I + A)^-1 (B c + lr t).
    "reference": EmbeddingPenalty(0.0, 1.0, 0.0, 0.0),
    # close_surrogatereg '1st': c' = ((1 + lr) A)^-1 (B + lr A) c (no ridge).
    "surrogate_output": EmbeddingPenalty(0.0, 0.0, 1.0, 0.0),
    # close_surrogatereg '2nd': c' = (lr I + A)^-1 (B + lr I) c.
    "surrogate_input": EmbeddingPenalty(0.0, 0.0, 0.0, 1.0),
    # close_surrogatereg 'both'.
    "surrogate_both": EmbeddingPenalty(0.0, 0.0, 1.0, 1.0),
}
"""Penalties of the adversarial-embedding objective, with ``A = sum W'^T W'`` and ``B = sum W'^T W``."""


class AdversarialMap(NamedTuple):
    """The affine map from concept rows to adversarial rows: ``c' = c @ matrix^T + t @ reference^T``."""

    matrix: Tensor
    """``M [ctx, ctx]`` (float64), applied to every token row of the concept."""
    reference: Optional[Tensor]
    """``N [ctx, ctx]`` (float64) applied to the reference rows ``t``; ``None`` when the variant has no such term."""

    def apply(self, rows: Tensor, reference_rows: Optional[Tensor] = None) -> Tensor:
        """Adversarial rows ``[n, ctx]`` (float64) for concept rows ``[n, ctx]``.

        ``reference_rows`` (position-aligned with ``rows``) is required exactly when ``reference`` is set.
        """
        out = rows.to(self.matrix) @ self.matrix.T
        if self.reference is not None:
            if reference_rows is None:
                raise ValueError("this adversarial map regularises towards reference rows; pass reference_rows")
            if reference_rows.shape != rows.shape:
                raise ValueError(
                    f"reference_rows must be position-aligned with the concept rows: got {tuple(reference_rows.shape)}"
                    f" for concept rows {tuple(rows.shape)}"
                )
            out = out + reference_rows.to(self.matrix) @ self.reference.T
        return out


# ---------------------------------------------------------------------------------------------------------------
# input checks


def _check_weights(weights: Mapping[str, Tensor], what: str = "weights") -> tuple[int, torch.device]:
    """Validate ``name -> [out, ctx]`` weights; returns the shared ``ctx`` and device."""
    if not isinstance(weights, Mapping) or len(weights) == 0:
        raise ValueError(f"{what}: expected a non-empty mapping name -> weight [out, ctx]")
    ctx: Optional[int] = None
    device: Optional[torch.device] = None
    for name, w in weights.items():
        if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"{what}[{name!r}]: expected a 2-D floating-point weight [out, ctx], got {shape}")
        if ctx is None:
            ctx, device = int(w.shape[1]), w.device
        elif w.shape[1] != ctx:
            raise ValueError(
                f"{what}[{name!r}]: context width {w.shape[1]} differs from {ctx} of the other weights; "
                "edit projections of one context width together"
            )
        elif w.device != device:
            raise ValueError(f"{what}[{name!r}]: on {w.device}, the other weights are on {device}")
    assert ctx is not None and device is not None
    return ctx, device


def _rows(
    name: str, rows: Optional[Tensor], ctx: int, device: torch.device, allow_none: bool = False
) -> Optional[Tensor]:
    """Validate token rows ``[n, ctx]`` and return them in float64 on ``device``."""
    if rows is None:
        if allow_none:
            return None
        raise ValueError(f"{name}: rows [n, {ctx}] are required")
    if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[1] != ctx:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"{name}: expected token rows [n, {ctx}] (ctx = the weights' input width), got {shape}")
    if rows.shape[0] == 0:
        if allow_none:
            return None
        raise ValueError(f"{name}: no rows given")
    out = rows.detach().to(device=device, dtype=COMPUTE_DTYPE)
    if not torch.isfinite(out).all():
        raise ValueError(f"{name}: the rows contain NaN or Inf")
    return out


def _check_scale(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _cholesky(matrix: Tensor, what: str) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ValueError(
            f"{what} is not positive definite (Cholesky failed at column {int(info)}); "
            "use a positive regulariser (lam / lambda_reg > 0)"
        )
    return chol


# ---------------------------------------------------------------------------------------------------------------
# Gram sums


@torch.no_grad()
def gram(weights: Iterable[Tensor]) -> Tensor:
    """``sum_l W_l^T W_l`` ``[ctx, ctx]`` in float64 over projections ``W_l [out_l, ctx]``.

    The product is computed one layer at a time (no float64 copy of the whole stack is held), and only the
    upper block triangle is multiplied: the result is symmetric.
    """
    total: Optional[Tensor] = None
    for w in weights:
        w64 = w.detach().to(COMPUTE_DTYPE)
        total = _syrk_into(total, w64)
    if total is None:
        raise ValueError("gram: no weights given")
    return _symmetrize_from_upper(total)


def _syrk_into(total: Optional[Tensor], w: Tensor, blocks: Optional[int] = None) -> Tensor:
    """Accumulate the upper block triangle of ``w^T w`` into ``total`` (allocated on first use).

    ``blocks`` column blocks (default ``ctx // 96``, at most 8) cut the work to ``(blocks + 1) / (2 blocks)``
    of a full product while keeping each product large enough for BLAS.
    """
    ctx = w.shape[1]
    if total is None:
        total = torch.zeros(ctx, ctx, dtype=w.dtype, device=w.device)
    if blocks is None:
        blocks = min(8, max(1, ctx // 96))
    edges = [ctx * i // blocks for i in range(blocks + 1)]
    for i in range(blocks):
        lo, hi = edges[i], edges[i + 1]
        left = w[:, lo:hi].T
        # one product covers the diagonal block and everything right of it
        total[lo:hi, lo:].addmm_(left, w[:, lo:])
    return total


def _symmetrize_from_upper(total: Tensor) -> Tensor:
    return torch.triu(total) + torch.triu(total, diagonal=1).T


@torch.no_grad()
def cross_gram(current: Iterable[Tensor], original: Iterable[Tensor]) -> Tensor:
    """``sum_l W'_l^T W_l`` ``[ctx, ctx]`` in float64 over paired current / original projections."""
    total: Optional[Tensor] = None
    for wc, wo in zip(current, original, strict=True):
        prod = wc.detach().to(COMPUTE_DTYPE).T @ wo.detach().to(COMPUTE_DTYPE)
        total = prod if total is None else total.add_(prod)
    if total is None:
        raise ValueError("cross_gram: no weights given")
    return total


# ---------------------------------------------------------------------------------------------------------------
# UCE


@torch.no_grad()
def erase_system(
    erase: Tensor,
    preserve: Optional[Tensor] = None,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lam: float = 0.5,
) -> EraseSystem:
    """Factorise ``G = lam I + s_e C_e^T C_e + s_p C_p^T C_p`` and solve for the shared factor ``C_e G^-1``.

    ``erase [n, ctx]`` and ``preserve [m, ctx]`` are token rows (any float dtype; computed in float64 on
    ``erase``'s device). Raises ``ValueError`` when ``G`` is singular (``lam == 0`` and the rows do not span
    the context space).
    """
    if not isinstance(erase, Tensor) or erase.dim() != 2:
        raise ValueError(f"erase: expected token rows [n, ctx], got {getattr(erase, 'shape', type(erase).__name__)}")
    ctx, device = int(erase.shape[1]), erase.device
    ce = _rows("erase", erase, ctx, device)
    cp = _rows("preserve", preserve, ctx, device, allow_none=True)
    return _erase_system64(ce, cp, _check_scale("erase_scale", erase_scale),
                           _check_scale("preserve_scale", preserve_scale),
                           _check_scale("lam", lam))


def _erase_system64(ce: Tensor, cp: Optional[Tensor], s_e: float, s_p: float, lam: float,
                    preserve_gram: Optional[Tensor] = None) -> EraseSystem:
    """:func:`erase_system` on validated float64 rows; ``preserve_gram`` may pass a precomputed ``C_p^T C_p``."""
    ctx = ce.shape[1]
    g = torch.eye(ctx, dtype=COMPUTE_DTYPE, device=ce.device).mul_(lam)
    g.addmm_(ce.T, ce, alpha=s_e)
    if preserve_gram is not None:
        g.add_(preserve_gram, alpha=s_p)
    elif cp is not None and s_p != 0.0:
        g.addmm_(cp.T, cp, alpha=s_p)
    chol = _cholesky(g, "the UCE system matrix lam*I + s_e*C_e^T C_e + s_p*C_p^T C_p")
    down = torch.cholesky_solve(ce.T, chol).T  # G symmetric: (G^-1 C_e^T)^T = C_e G^-1
    return EraseSystem(chol, down.contiguous())


def edit_from_factors(
    ups: Mapping[str, Tensor],
    down: Union[Tensor, Mapping[str, Tensor]],
    dtypes: Mapping[str, torch.dtype],
    extra: Optional[EditResult] = None,
) -> EditResult:
    """Assemble an :class:`EditResult` from factors (``up [out, r]``, ``down [r, ctx]``; ``down`` float64).

    Each factor is cast to ``dtypes[name]``; the deltas are formed from them when read (:class:`LowRankDeltas`).
    One ``down`` shared by every weight stays one tensor per dtype (the weights of one edit share their ``down``).
    ``extra`` (a prior edit of the same weights) is added: its factors are concatenated with the new ones.
    When the inner dimension reaches ``ctx`` the factorisation is stored as ``(dW, I)`` instead, ``dW``
    computed in float64 (still exact, and never wider than ``ctx``).
    """
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    dense: list[str] = []
    shared: dict[torch.dtype, Tensor] = {}
    for name, up in ups.items():
        dn = down[name] if isinstance(down, Mapping) else down
        dtype = dtypes[name]
        if extra is not None:
            eu, ed = extra.factors[name]
            up = torch.cat([eu.to(up), up], dim=1)
            dn = torch.cat([ed.to(dn), dn], dim=0)
        ctx = dn.shape[1]
        if dn.shape[0] >= ctx:
            delta = up if _is_identity(dn) else up.to(COMPUTE_DTYPE) @ dn.to(COMPUTE_DTYPE)
            factors[name] = (delta.to(dtype), torch.eye(ctx, dtype=dtype, device=dn.device))
            dense.append(name)
            continue
        if extra is None and not isinstance(down, Mapping):
            if dtype not in shared:
                shared[dtype] = dn.to(dtype)
            dn_cast = shared[dtype]
        else:
            dn_cast = dn.to(dtype)
        factors[name] = (up.to(dtype), dn_cast)
    return EditResult(LowRankDeltas(factors, dense), factors)


@torch.no_grad()
def uce_edit(
    weights: Mapping[str, Tensor],
    erase: Tensor,
    targets: Union[Tensor, Mapping[str, Tensor]],
    preserve: Optional[Tensor] = None,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lam: float = 0.5,
    dtype: Optional[torch.dtype] = None,
) -> EditResult:
    """The UCE closed-form edit of several projections that read the same context.

    Args:
        weights: ``name -> W [out, ctx]``, the weights before the edit (any float dtype, one device).
        erase: erase token rows ``C_e [n, ctx]``.
        targets: either anchor rows ``C_a [n, ctx]`` position-aligned with ``erase`` (targets ``V = C_a W^T``
            through each layer's own pre-edit weight: UCE's "replace" technique), or ``name -> V [n, out]``.
        preserve: preserve token rows ``C_p [m, ctx]`` (mapped to their pre-edit values), or ``None``.
        erase_scale, preserve_scale, lam: ``s_e``, ``s_p`` and the ridge towards the pre-edit weight. UCE's
            original settings are ``lam = 0.5``, ``s_e = 1`` and ``s_p = max(0.1, 1 / number of preserve
            prompts)`` (see :func:`sae_core.rece.uce_preserve_scale`).
        dtype: dtype of the returned tensors; default: each weight's own dtype.

    Returns:
        :class:`EditResult`; every factorisation has inner dimension ``min(n, ctx)``.
    """
    ctx, device = _check_weights(weights)
    ce = _rows("erase", erase, ctx, device)
    cp = _rows("preserve", preserve, ctx, device, allow_none=True)
    s_e = _check_scale("erase_scale", erase_scale)
    s_p = _check_scale("preserve_scale", preserve_scale)
    lam = _check_scale("lam", lam)
    n = ce.shape[0]
    system = _erase_system64(ce, cp, s_e, s_p, lam)

    ups: dict[str, Tensor] = {}
    if isinstance(targets, Mapping):
        missing = set(weights) - set(targets)
        if missing:
            raise ValueError(f"targets: no target values for {sorted(missing)}")
        for name, w in weights.items():
            v = targets[name]
            if not isinstance(v, Tensor) or tuple(v.shape) != (n, w.shape[0]):
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"targets[{name!r}]: expected values [{n}, {w.shape[0]}], got {shape}")
            v64 = v.detach().to(device=device, dtype=COMPUTE_DTYPE)
            if not torch.isfinite(v64).all():
                raise ValueError(f"targets[{name!r}]: the values contain NaN or Inf")
            w64 = w.detach().to(COMPUTE_DTYPE)
            ups[name] = torch.addmm(v64.T, w64, ce.T, alpha=-1.0).mul_(s_e)
    else:
        ca = _rows("targets (anchor rows)", targets, ctx, device)
        if ca.shape[0] != n:
            raise ValueError(f"targets: {ca.shape[0]} anchor rows for {n} erase rows; they must be position-aligned")
        mix = (ca - ce).T.mul_(s_e).contiguous()  # [ctx, n]
        for name, w in weights.items():
            ups[name] = w.detach().to(COMPUTE_DTYPE) @ mix
    dtypes = {name: (dtype or w.dtype) for name, w in weights.items()}
    return edit_from_factors(ups, system.down, dtypes)


@torch.no_grad()
def uce_solve_reference(
    weight: Tensor,
    erase: Tensor,
    values: Tensor,
    preserve: Optional[Tensor] = None,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lam: float = 0.5,
) -> Tensor:
    """Plain per-matrix UCE solve ``W_new = mat1 @ mat2^-1`` (float64), written directly from the objective.

    ``mat1 = lam W0 + s_e V^T C_e + s_p W0 C_p^T C_p`` and ``mat2 = G`` (see the module docstring); solved as
    ``W_new^T = solve(G, mat1^T)``. Returns the new weight, not the delta. This is the straightforward
    reference that :func:`uce_edit` (shared factorisation, low-rank delta) is checked against.
    """
    w0 = weight.detach().to(COMPUTE_DTYPE)
    ctx = w0.shape[1]
    ce = _rows("erase", erase, ctx, w0.device)
    cp = _rows("preserve", preserve, ctx, w0.device, allow_none=True)
    v = values.detach().to(device=w0.device, dtype=COMPUTE_DTYPE)
    mat1 = lam * w0 + erase_scale * (v.T @ ce)
    mat2 = lam * torch.eye(ctx, dtype=COMPUTE_DTYPE, device=w0.device) + erase_scale * (ce.T @ ce)
    if cp is not None:
        mat1 = mat1 + preserve_scale * (w0 @ cp.T @ cp)
        mat2 = mat2 + preserve_scale * (cp.T @ cp)
    return torch.linalg.solve(mat2, mat1.T).T


# ---------------------------------------------------------------------------------------------------------------
# RECE adversarial embedding


def _penalty(variant: str) -> EmbeddingPenalty:
    try:
        return EMBEDDING_VARIANTS[variant]
    except KeyError:
        raise ValueError(f"variant: unknown adversarial-embedding variant {variant!r}; "
                         f"choose one of {sorted(EMBEDDING_VARIANTS)}") from None


def _embedding_cholesky(a: Tensor, lr: float, pen: EmbeddingPenalty, variant: str) -> Tensor:
    """Cholesky factor of ``H = (1 + lr o) A + lr (r + t + i) I``."""
    h = a * (1.0 + lr * pen.output_surrogate)
    h.diagonal().add_(lr * (pen.ridge + pen.toward_reference + pen.input_surrogate))
    return _cholesky(h, f"the adversarial-embedding system ({variant}, lambda_reg={lr}) sum W'^T W' + penalty")


@torch.no_grad()
def adversarial_map_from_grams(
    current_gram: Tensor, cross: Tensor, lambda_reg: float, variant: str = "regularized"
) -> AdversarialMap:
    """The adversarial-embedding map from ``A = sum W'^T W'`` and ``B = sum W'^T W`` (both ``[ctx, ctx]``).

    With penalty weights ``(r, t, o, i)`` of :data:`EMBEDDING_VARIANTS` and ``lr = lambda_reg`` the normal
    equations are ``H x = (B + lr o A + lr i I) c + lr t t_ref`` with ``H = (1 + lr o) A + lr (r + t + i) I``,
    solved with one Cholesky factorisation of ``H`` for all ``ctx`` right-hand sides:
    ``M = H^-1 (B + lr o A + lr i I)``, ``N = lr t H^-1``.
    """
    pen = _penalty(variant)
    lr = _check_scale("lambda_reg", lambda_reg)
    a = current_gram.to(COMPUTE_DTYPE)
    rhs = cross.to(COMPUTE_DTYPE).clone()
    if pen.output_surrogate:
        rhs.add_(a, alpha=lr * pen.output_surrogate)
    if pen.input_surrogate:
        rhs.diagonal().add_(lr * pen.input_surrogate)
    chol = _embedding_cholesky(a, lr, pen, variant)
    matrix = torch.cholesky_solve(rhs, chol)
    reference = torch.cholesky_inverse(chol).mul_(lr * pen.toward_reference) if pen.toward_reference else None
    return AdversarialMap(matrix, reference)


@torch.no_grad()
def adversarial_rows_from_grams(
    current_gram: Tensor,
    cross: Tensor,
    rows: Tensor,
    lambda_reg: float,
    variant: str = "regularized",
    reference_rows: Optional[Tensor] = None,
) -> Tensor:
    """``rows @ M^T (+ reference_rows @ N^T)`` without forming ``M``: one factorisation, one solve.

    Equal to ``adversarial_map_from_grams(...).apply(rows, reference_rows)``; cheaper when there are fewer
    token rows (all concepts stacked) than ``ctx``. ``rows`` and ``reference_rows`` are float64 ``[N, ctx]``.
    """
    pen = _penalty(variant)
    lr = _check_scale("lambda_reg", lambda_reg)
    a = current_gram.to(COMPUTE_DTYPE)
    rhs = cross.to(COMPUTE_DTYPE) @ rows.T  # [ctx, N]
    if pen.output_surrogate:
        rhs.add_(a @ rows.T, alpha=lr * pen.output_surrogate)
    if pen.input_surrogate:
        rhs.add_(rows.T, alpha=lr * pen.input_surrogate)
    if pen.toward_reference:
        if reference_rows is None or reference_rows.shape != rows.shape:
            raise ValueError("the 'reference' variant needs reference_rows position-aligned with the concept rows")
        rhs.add_(reference_rows.T, alpha=lr * pen.toward_reference)
    chol = _embedding_cholesky(a, lr, pen, variant)
    return torch.cholesky_solve(rhs, chol).T


@torch.no_grad()
def adversarial_map(
    current: Mapping[str, Tensor],
    original: Mapping[str, Tensor],
    lambda_reg: float,
    variant: str = "regularized",
) -> AdversarialMap:
    """RECE's adversarial-embedding map over all given projections (to_k and to_v together).

    ``current`` holds the edited weights ``W'``, ``original`` the unedited ``W`` under the same names. The
    embedding ``c' = c M^T`` (``+ t N^T`` for the ``"reference"`` variant) minimises
    ``sum_l ||W'_l x - W_l c||^2`` plus the variant's penalty, for every token row at once.
    """
    _check_weights(current, "current")
    _check_weights(original, "original")
    if set(current) != set(original):
        raise ValueError(f"current and original weights must have the same names; differ in "
                         f"{sorted(set(current) ^ set(original))}")
    names = list(current)
    for name in names:
        if current[name].shape != original[name].shape:
            raise ValueError(f"{name!r}: current {tuple(current[name].shape)} vs "
                             f"original {tuple(original[name].shape)}")
    a = gram(current[n] for n in names)
    b = cross_gram((current[n] for n in names), (original[n] for n in names))
    return adversarial_map_from_grams(a, b, lambda_reg, variant)
