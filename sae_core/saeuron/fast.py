"""SAeUron's conventional edit over all tokens at once, with no host synchronisation (for GPUs).

Same result as :func:`sae_core.saeuron.intervention.intervene_tokens` (``error_mode=
"conventional"``) up to float rounding, but shaped for a GPU: a fixed sequence of tensor
operations on every token (no ``nonzero``, no boolean indexing, no ``.item()``), so that a call
can be queued without waiting for the device and replayed as one CUDA graph.

How the per-token decision stays exact while the big product is cheap
----------------------------------------------------------------------
The edit needs, per token and selected latent ``i``, the exact code value ``z_i`` (a few
float32 dot products, computed exactly as the reference path does) and whether ``i`` is among
the token's ``k`` largest pre-activations. Only that membership needs all ``n`` latents. It is
decided from a float16 product on the matrix units (one pass, float32 accumulation):

1. Each centred token ``c`` is scaled by a power of two (exact) to a norm near ``2**12``, the
   encoder rows and bias by one global power of two to norms at most 1, and both are rounded to
   float16; the bias rides along as an extra input column, so the product gives the scaled
   pre-activation ``v_j`` of every latent.
2. ``|v_j - exact_j| <= D`` for every latent of the token, with
   ``D = ||dc|| (N_w + Q) + ||c~|| Q``, ``Q = E_w + K 2**-23 (N_w + E_w)``: ``dc`` is the token's
   rounding error (measured), ``N_w`` / ``E_w`` the largest row norm and row rounding error of the
   encoder (measured once), ``K 2**-23`` a worst-case bound on float32 accumulation over the ``K``
   product terms. Rounding the result to float16 keeps the order of the values and moves each
   by at most ``2**-11`` of itself.
3. ``i`` is in the top ``k`` iff fewer than ``k`` other latents have an exact pre-activation
   above ``z_i``. Float16 rounding is monotone, so a float16 value above ``fp16(z_i + D)`` comes
   from an exact value above ``z_i`` and one below ``fp16(z_i - D)`` from an exact value below it.
   Counting both (one pass over the product per selected latent, on GPUs while a step selects at
   most ``COUNT_LIMIT`` latents) makes the decision certain unless the two counts straddle ``k``.
   Otherwise (a CPU, or many latents) the decision comes from a top-``k + 1`` of every token:
   ``z_i`` against ``tau_i``, the ``k``-th largest pre-activation of the other latents, which the
   float16 values give within ``D + 2**-10 |tau'_i|``. Pairs left on the edge (rare) are
   recomputed in float32 from the token's ``L`` best float16 candidates and counted exactly,
   provided the ``L``-th candidate is certainly below ``z_i`` (so nothing outside the list can
   beat it). At most ``budget`` tokens per call are recomputed; a pair that cannot be settled
   keeps the float16 decision and is counted in ``unresolved`` (the hook sums it in
   ``SAeUronHook.fast_unresolved``; it is 0 unless that many tokens sit on the edge at once).

The edit itself is the reference formula: ``y = x + sum_i (z_i * scale_i - z_i) W_dec[i]`` on
tokens where a selected latent fired, ``y = x`` bit for bit elsewhere, in the input dtype.

On CUDA the whole call runs as one captured CUDA graph per (token count, dtype, mask) shape, and
optionally through ``torch.compile`` (``compile=True``; fuses the small element-wise steps).

Measured (``benchmarks/saeuron_hook.py --device cuda``, one H200, SD1.5's ``[2, 1280, 16, 16]``
float16 block output, SAE 1280 -> 20480, k 32, 3 latents), deciding by top-k: 0.48 ms per call
(0.39 ms with ``compile=True``) against 1.69 ms for the screened path; of that, the float16
product takes 0.07 ms, the top-49 0.17 ms and the ~70 small kernels the rest. (A float32 encode
alone takes 0.66 ms.) Counting replaces the top-49 of all 512 tokens by three comparison passes
and a top-49 of at most ``budget`` tokens; ``benchmarks/gpu_hook.sh`` times both decisions.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .selection import SelectionTable

__all__ = ["FastEdit", "FastResult", "fast_edit_tokens"]

SCALE_BITS = 12
"""Tokens are scaled to a norm in ``[2**11, 2**12)`` before the float16 product."""

COUNT_LIMIT = 8
"""Most latents a step may select for membership to be decided by counting (one pass over the
``[N, n]`` float16 product each) rather than by a top-k of every token."""


class FastResult(NamedTuple):
    """Output of :func:`fast_edit_tokens`."""

    output: Tensor
    """``[N, d]`` edited tokens in the input dtype (a new tensor, also when nothing fired)."""
    fired: Tensor
    """``[N]`` bool: tokens where at least one selected latent was scaled."""
    counts: Tensor
    """int64 ``[3]``: fired tokens, (token, latent) pairs on the edge, pairs left unresolved."""


class _Tables(NamedTuple):
    """Everything a call needs on one device (see :class:`FastEdit`)."""

    k: int
    d: int
    w_enc: Tensor       # [n, d] fp32
    b_enc: Tensor       # [n] fp32
    b_dec: Tensor       # [d] fp32
    w16: Tensor         # [n, K] fp16: scaled [W_enc | b_enc | 0-pad]
    w16_t32: Tensor | None  # [K, n] fp32 copy of w16.T (CPU product), else None
    pad: Tensor         # [1, K - d] fp32: [1, 0, ...] (the bias column and padding)
    w_scale: float      # power of two applied to the encoder rows
    nwq: float          # N_w + Q (slightly inflated)
    q: float            # Q (slightly inflated)
    sel_idx: Tensor     # [T, M] int64
    sel_f: Tensor       # [T, M, 2d + 3] fp32: W_enc rows | W_dec rows | b_enc | scale | threshold


def _prepare(weights: Any, table: SelectionTable, device: torch.device) -> _Tables:
    w, b = weights.W_enc, weights.b_enc
    n, d = w.shape
    k_cols = -(-(d + 1) // 8) * 8  # bias column, then zero padding to a multiple of 8
    aug = torch.cat([w, b[:, None]], 1).double()
    top = float(aug.norm(dim=1).max())
    w_scale = 2.0 ** -math.ceil(math.log2(top)) if top > 0 else 1.0
    aug = aug * w_scale
    w16 = torch.zeros(n, k_cols, dtype=torch.float16, device=device)
    w16[:, : d + 1] = aug.float().half()
    err = float((aug - w16[:, : d + 1].double()).norm(dim=1).max())
    norm = float(aug.norm(dim=1).max())
    q = err + k_cols * 2.0**-23 * (norm + err)
    slack = 1.0 + 2.0**-10  # covers float32 rounding of the token norms computed per call
    pad = torch.zeros(1, k_cols - d, device=device)
    pad[0, 0] = 1.0
    idx = table.indices.to(device)
    sel_f = torch.cat([
        w[idx], weights.W_dec[idx], b[idx][..., None],
        table.scales.to(device)[..., None], table.thresholds.to(device)[..., None],
    ], -1).contiguous()
    return _Tables(
        k=int(weights.k), d=d, w_enc=w, b_enc=b, b_dec=weights.b_dec, w16=w16,
        w16_t32=w16.t().float().contiguous() if device.type != "cuda" else None, pad=pad,
        w_scale=w_scale, nwq=(norm + q) * slack, q=q * slack, sel_idx=idx, sel_f=sel_f,
    )


def fast_edit_tokens(tokens: Tensor, tabs: _Tables, sel_idx: Tensor, sel_f: Tensor,
                     row_mask: Tensor | None = None, *, extra: int = 16, budget: int = 32,
                     count: bool = True) -> FastResult:
    """One step's edit of ``tokens [N, d]`` (see the module docstring).

    ``sel_idx [M]`` / ``sel_f [M, 2d + 3]`` are one row of the prepared step tables; padding
    entries have a threshold of ``+inf`` and never fire. ``row_mask [N]`` (bool) limits the edit
    to some tokens. ``extra``: float16 candidates kept beyond the ``k + 1`` needed (the list the
    edge cases are recomputed from); ``budget``: tokens recomputed per call at most. ``count``:
    decide membership by counting the latents surely / possibly above each selected code (one
    pass over the product per selected latent) instead of a top-k of every token.
    """
    k, d = tabs.k, tabs.d
    n_tok = tokens.shape[0]
    w_sel, dec_sel = sel_f[:, :d], sel_f[:, d: 2 * d]
    b_sel, scale, thr = sel_f[:, 2 * d], sel_f[:, 2 * d + 1], sel_f[:, 2 * d + 2]

    # centred tokens and their exact codes on the selected latents (float32, as the reference)
    c = torch.sub(tokens, tabs.b_dec)
    z = torch.addmm(b_sel, c, w_sel.t()).relu_()                                   # [N, M]
    # power-of-two scale per token: ||c * s|| in [2**11, 2**12)
    expo = torch.frexp(torch.linalg.vector_norm(c, dim=1)).exponent
    s = ((127 + SCALE_BITS - expo).clamp_(127 - 14, 127 + 15) << 23).view(torch.float32)
    a = torch.cat((c, tabs.pad.expand(n_tok, -1)), 1) * s[:, None]                 # [N, K]
    a16 = a.half()
    err = torch.linalg.vector_norm(a - a16, dim=1)
    bound = torch.add(err * tabs.nwq, torch.linalg.vector_norm(a, dim=1), alpha=tabs.q).add_(2.0**-24)
    if tabs.w16_t32 is None:
        v = torch.mm(a16, tabs.w16.t())                                             # fp16 [N, n]
    else:  # CPU: the same float16 operands, float32 accumulation, float16 result
        v = torch.mm(a16.float(), tabs.w16_t32).half()
    zs = z * (s * tabs.w_scale)[:, None]
    want = z > thr
    if row_mask is not None:
        want &= row_mask[:, None]
    # float16 of values surely at or above / below every accumulated product within ``bound`` of zs:
    # rounding to float16 is monotone, so v_j > hi16 means the exact value j is above z, v_j < lo16 below
    slack = torch.add(zs.abs(), bound[:, None]).mul_(2.0**-20)
    hi16 = torch.add(zs, bound[:, None]).add_(slack).half()
    lo16 = torch.sub(zs, bound[:, None]).sub_(slack).half()
    n_cand = k + 1 + extra
    if count:
        above = (v[:, None, :] > hi16[..., None]).sum(2)                            # surely above z_i
        maybe = (v[:, None, :] >= lo16[..., None]).sum(2) - 1                       # possibly, itself excluded
        sure_in, sure_out = maybe < k, above >= k
        inside = sure_in | (~sure_out & (above + maybe < 2 * k))                    # edge pairs: the midpoint
        edge = ~sure_in & ~sure_out & want
        rows = edge.any(1).half().topk(min(budget, n_tok), sorted=False).indices
        vals, cand = v[rows].topk(n_cand, dim=1)                                    # [U, L], sorted
    else:
        vals_all, idx_all = v.topk(n_cand, dim=1)                                   # sorted
        # k-th largest of the other latents, and how far the exact one can be from it
        mine = (idx_all[:, :k, None] == sel_idx).any(1)
        tau = torch.where(mine, vals_all[:, k, None], vals_all[:, k - 1, None])
        gap = zs - tau
        inside = gap > 0
        edge = (gap.abs() <= torch.add(bound[:, None], tau.abs(), alpha=2.0**-10)) & want
        rows = edge.any(1).half().topk(min(budget, n_tok), sorted=False).indices
        vals, cand = vals_all[rows], idx_all[rows]
    # settle edge pairs exactly from the candidate list, if its last entry is surely below z
    settled = edge[rows] & (vals[:, -1:] < lo16[rows])
    exact = torch.baddbmm(tabs.b_enc[cand][..., None], tabs.w_enc[cand], c[rows][..., None])[..., 0]
    beaten = ((exact[..., None] > z[rows][:, None, :]) & (cand[..., None] != sel_idx)).sum(1) < k
    inside = inside.index_put((rows,), torch.where(settled, beaten, inside[rows]))
    fire = inside & want
    zf = z * fire
    delta = torch.addcmul(-zf, zf, scale) @ dec_sel                                 # [N, d]
    fired = fire.any(1)
    out = torch.where(fired[:, None], torch.add(tokens, delta).to(tokens.dtype), tokens)
    n_edge = edge.sum()
    counts = torch.stack((fired.sum(), n_edge, n_edge - settled.sum()))
    return FastResult(out, fired, counts)


@contextlib.contextmanager
def _fp32_sums() -> Iterator[None]:
    """float32 sums in cuBLAS for the float16 product (the bound assumes them) and plain float32
    (no TF32) for the exact codes and recounts, whatever the process-wide settings are."""
    matmul = torch.backends.cuda.matmul
    wanted = [("allow_fp16_reduced_precision_reduction", False),
              ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)]
    saved = []
    for name, value in wanted:
        try:
            before = getattr(matmul, name)
            setattr(matmul, name, value)
        except (AttributeError, RuntimeError, ValueError):
            continue
        saved.append((name, before))
    try:
        yield
    finally:
        for name, before in reversed(saved):
            setattr(matmul, name, before)


class _Graph:
    """One captured call: static inputs, the graph, static outputs."""

    def __init__(self, fn: Callable[..., FastResult], tokens: Tensor, step: Tensor, mask: Tensor | None) -> None:
        self.tokens = tokens.clone()
        self.step = step.clone()
        self.mask = None if mask is None else mask.clone()
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(self.tokens, self.step, self.mask)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.tokens, self.step, self.mask)

    def __call__(self, tokens: Tensor, step_index: int, mask: Tensor | None) -> FastResult:
        self.tokens.copy_(tokens)
        self.step.fill_(step_index)
        if mask is not None:
            self.mask.copy_(mask)
        self.graph.replay()
        return self.out


class FastEdit:
    """The fast edit of one hook on one device: prepared tables, plus CUDA graphs when on CUDA.

    Args:
        weights: :class:`~sae_core.saeuron.intervention.SaeWeights32` on ``device``.
        table: the hook's :class:`SelectionTable`.
        graphs: capture a CUDA graph per input shape (CUDA only; default on).
        compile: run the step through ``torch.compile`` (needs a working Triton; default off).
        extra, budget: see :func:`fast_edit_tokens`.
        count: decide top-k membership by counting (see :func:`fast_edit_tokens`); by default on
            CUDA when a step selects at most ``COUNT_LIMIT`` latents (each costs one pass over the
            product), else by a top-k of every token.

    Calling it returns a :class:`FastResult` whose tensors may be reused by the next call on the
    same shape (graph outputs): copy what must outlive it.
    """

    def __init__(self, weights: Any, table: SelectionTable, device: torch.device, *, graphs: bool = True,
                 compile: bool = False, extra: int = 16, budget: int = 32, count: bool | None = None) -> None:
        self.device = torch.device(device)
        self.tabs = _prepare(weights, table, self.device)
        self.extra, self.budget = int(extra), int(budget)
        if count is None:  # counting pays on a GPU (a few fused passes); a CPU sorts faster than it compares
            count = self.device.type == "cuda" and self.tabs.sel_idx.shape[1] <= COUNT_LIMIT
        self.count = bool(count)
        n_lat = self.tabs.w16.shape[0]
        if self.tabs.k + 1 + self.extra > n_lat:
            self.extra = max(0, n_lat - self.tabs.k - 1)
        if self.tabs.k + 1 > n_lat:
            raise ValueError(f"fast SAeUron edit needs more than k={self.tabs.k} latents, the SAE has {n_lat}")
        self.graphs = bool(graphs) and self.device.type == "cuda"
        self.compiled = bool(compile)
        self._fn: Callable[..., FastResult] = torch.compile(self._step, fullgraph=True) if compile else self._step
        self._captured: dict[tuple, _Graph] = {}

    @property
    def mode(self) -> str:
        """How calls run now: ``"graph"``/``"eager"``, with ``"+compile"`` when compiled."""
        return ("graph" if self.graphs else "eager") + ("+compile" if self.compiled else "")

    def _step(self, tokens: Tensor, step: Tensor, mask: Tensor | None) -> FastResult:
        tabs = self.tabs
        sel_idx = tabs.sel_idx.index_select(0, step)[0]
        sel_f = tabs.sel_f.index_select(0, step)[0]
        return fast_edit_tokens(tokens, tabs, sel_idx, sel_f, mask, extra=self.extra, budget=self.budget,
                                count=self.count)

    def __call__(self, tokens: Tensor, step_index: int, row_mask: Tensor | None = None) -> FastResult:
        step_index = int(step_index)
        if tokens.dim() != 2 or tokens.shape[1] != self.tabs.d:
            raise ValueError(f"SAeUron: tokens must be [N, {self.tabs.d}] (the SAE's d_in), got {tuple(tokens.shape)}")
        with _fp32_sums():
            if not self.graphs:
                step = torch.full((1,), step_index, dtype=torch.int64, device=self.device)
                return self._run(tokens, step, row_mask)
            key = (tuple(tokens.shape), tokens.dtype, row_mask is None)
            graph = self._captured.get(key)
            if graph is None:
                step = torch.full((1,), step_index, dtype=torch.int64, device=self.device)
                try:
                    graph = _Graph(self._run, tokens, step, row_mask)
                except Exception as exc:  # a build whose graphs cannot capture this: run eagerly
                    warnings.warn(f"SAeUron fast path: CUDA graph capture failed ({exc}); running eagerly",
                                  stacklevel=3)
                    self.graphs = False
                    return self._run(tokens, step, row_mask)
                self._captured[key] = graph
            return graph(tokens, step_index, row_mask)

    def _run(self, tokens: Tensor, step: Tensor, mask: Tensor | None) -> FastResult:
        if not self.compiled:
            return self._step(tokens, step, mask)
        try:
            return self._fn(tokens, step, mask)
        except Exception as exc:  # no working compiler (e.g. no Triton): the same code, eagerly
            warnings.warn(f"SAeUron fast path: torch.compile failed ({type(exc).__name__}: {exc}); "
                          f"running without it", stacklevel=3)
            self.compiled = False
            return self._step(tokens, step, mask)
