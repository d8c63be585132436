"""SAeUron's intervention on a block output, and the hook object that applies it during sampling.

Per token ``x`` of the hooked block output (channel-last, row-major tokens of a ``[B, C, H, W]``
map, real ``H`` and ``W``), at step index ``t`` with selected latents ``F(t)``:

1. ``z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))`` (per-token TopK, float32 math);
2. for ``i`` in ``F(t)`` with ``z_i > mu_all(i, t)`` (strict): ``z'_i = gamma * mu_c(i, t) * z_i``;
3. the output, by ``error_mode``:

   * ``"conventional"`` (default), the error-preserving form
     ``y = x_hat' + (x - x_hat) = x + sum_{i changed} (z'_i - z_i) W_dec[i]``. Only the changed
     latents' decoder rows are touched (no full decode), and a token where nothing fired is
     returned bit for bit; when nothing fires anywhere the input tensor itself is returned.
   * ``"reference"``, the sign used by the published code, ``y = x_hat' + (x_hat - x)``: every
     token becomes ``2 x_hat - x`` plus the edit, even where nothing fires (needed only to
     reproduce published numbers).

The edit is applied to every batch row (both classifier-free-guidance halves, as the reference
does) unless ``cond_only=True``, in which case the caller passes a ``cond_mask`` and only the
conditional rows are touched. The result is cast back to the input dtype.

Two implementations of the conventional mode give the same result up to float rounding:
``"screened"`` (:func:`intervene_tokens`; encodes only the tokens that pass a cheap screen, with
data-dependent shapes) and ``"fast"`` (:mod:`.fast`; every token at once with no host
synchronisation, the default on CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..artefacts import sae_fingerprint_hint
from ..capture import to_tokens
from ..sae import per_token_topk
from .fast import FastEdit
from .selection import SelectionTable, StepSelection, build_selection
from .stats import ConceptStats, sae_fingerprint

__all__ = [
    "ERROR_MODES",
    "PATHS",
    "InterventionResult",
    "SAeUronHook",
    "SaeWeights32",
    "intervene_tokens",
    "map_step_index",
    "step_index_from_timestep",
]

ERROR_MODES = ("conventional", "reference")
PATHS = ("auto", "fast", "screened")


# ---------------------------------------------------------------------------------------------
# Step index helpers
# ---------------------------------------------------------------------------------------------


def step_index_from_timestep(t: float | Tensor, schedule: Sequence[float] | Tensor) -> int:
    """Index of the entry of ``schedule`` closest to ``t``.

    ``schedule`` is the per-step timestep (or sigma) sequence of the sampling run the statistics
    were gathered with (``ConceptStats.schedule``); ``t`` is the current sampler's value, a
    number or a tensor whose entries are all equal (one step for the whole batch).

    A sampler with a different number of steps than the statistics lands on the statistics'
    step with the nearest noise level; for evenly spaced schedules that is the proportional
    mapping of :func:`map_step_index`. On an exact tie the earlier (noisier) step wins.
    """
    sched = torch.as_tensor(schedule, dtype=torch.float64).reshape(-1).cpu()
    if sched.numel() == 0:
        raise ValueError("step_index_from_timestep: the schedule is empty")
    if isinstance(t, Tensor):
        flat = t.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        if flat.numel() == 0:
            raise ValueError("step_index_from_timestep: empty timestep tensor")
        if not bool((flat == flat[0]).all()):
            raise ValueError(
                f"step_index_from_timestep: the batch mixes timesteps {flat.unique().tolist()}; "
                f"a block hook needs one step per call"
            )
        value = float(flat[0])
    else:
        value = float(t)
    if not math.isfinite(value):
        raise ValueError(f"step_index_from_timestep: timestep {value} is not finite")
    return int(torch.argmin((sched - value).abs()))


def map_step_index(step: int, num_steps: int, stats_steps: int) -> int:
    """Proportional map of step ``step`` of a ``num_steps`` run onto ``stats_steps`` indices.

    First maps to first and last to last: ``round(step * (stats_steps - 1) / (num_steps - 1))``
    (halves round up). Use it when only step counts are known; with timesteps prefer
    :func:`step_index_from_timestep`.
    """
    if num_steps <= 0 or stats_steps <= 0:
        raise ValueError(f"map_step_index: step counts must be positive, got {num_steps}, {stats_steps}")
    if not 0 <= step < num_steps:
        raise ValueError(f"map_step_index: step {step} out of range 0..{num_steps - 1}")
    if num_steps == 1:
        return 0
    return int(math.floor(step * (stats_steps - 1) / (num_steps - 1) + 0.5))


# ---------------------------------------------------------------------------------------------
# The maths
# ---------------------------------------------------------------------------------------------


class SaeWeights32:
    """Float32 copies of an SAE's tensors on one device (no copy when already fp32 there)."""

    def __init__(self, sae: Any, device: torch.device) -> None:
        def get(t: Tensor) -> Tensor:
            return t.detach().to(device=device, dtype=torch.float32)

        self.W_enc = get(sae.encoder.weight)
        self.b_enc = get(sae.encoder.bias)
        self.W_dec = get(sae.W_dec)
        self.b_dec = get(sae.b_dec)
        self.k = int(sae.cfg.k)
        self.d_in = int(sae.cfg.d_in)


class InterventionResult(NamedTuple):
    """Output of :func:`intervene_tokens`."""

    output: Tensor
    """``[N, d]`` edited tokens in the input dtype; the input object itself when nothing changed."""
    fired: Tensor
    """``[N]`` bool: tokens where at least one selected latent was scaled."""


def intervene_tokens(tokens: Tensor, weights: SaeWeights32, sel: StepSelection,
                     error_mode: str = "conventional") -> InterventionResult:
    """Apply one step's SAeUron edit to ``tokens [N, d]`` (see the module docstring).

    ``sel`` must be on the tokens' device.

    Conventional mode screens tokens first: a selected latent can only fire where its
    pre-activation exceeds the threshold, and that needs just ``m`` encoder rows. The full
    encoder and TopK (to know whether the latent is among the token's ``k`` winners) then run on
    the candidate tokens only; a small safety margin on the screen absorbs rounding differences
    between the two matrix products. Every other token passes through untouched.
    """
    if error_mode not in ERROR_MODES:
        raise ValueError(f"error_mode must be one of {ERROR_MODES}, got {error_mode!r}")
    return _intervene(tokens, weights, sel, error_mode)


def _intervene(tokens: Tensor, weights: SaeWeights32, sel: StepSelection, error_mode: str) -> InterventionResult:
    """:func:`intervene_tokens` for a caller that validated ``error_mode`` once (the hook, per call)."""
    if tokens.dim() != 2 or tokens.shape[1] != weights.d_in:
        raise ValueError(f"SAeUron: tokens must be [N, {weights.d_in}] (the SAE's d_in), got {tuple(tokens.shape)}")
    n, m = tokens.shape[0], sel.indices.numel()
    no_fire = torch.zeros(n, dtype=torch.bool, device=tokens.device)
    x32 = tokens.float()
    centred = x32 - weights.b_dec

    def edit(rows_centred: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Full TopK code of some tokens and the coefficient change of the selected latents."""
        pre = F.relu(F.linear(rows_centred, weights.W_enc, weights.b_enc))
        acts, idx = per_token_topk(pre, weights.k)
        match = idx[:, :, None] == sel.indices[None, None, :]          # [n', k, m]
        z = (acts[:, :, None] * match).sum(dim=1)                      # [n', m]; 0 outside the top-k
        fire = z > sel.thresholds[None, :]
        coef = torch.where(fire, z * sel.scales[None, :] - z, torch.zeros((), device=z.device))
        return acts, idx, coef, fire

    if error_mode == "conventional":
        if m == 0:
            return InterventionResult(tokens, no_fire)
        pre_sel = F.relu(F.linear(centred, weights.W_enc[sel.indices], weights.b_enc[sel.indices]))
        margin = sel.thresholds.abs() * 1e-4 + 1e-6
        cand = (pre_sel > (sel.thresholds - margin)[None, :]).any(dim=1)
        rows = cand.nonzero().flatten()
        if rows.numel() == 0:
            return InterventionResult(tokens, no_fire)
        _, _, coef, fire = edit(centred[rows])
        fired_rows = fire.any(dim=1)
        if not bool(fired_rows.any()):
            return InterventionResult(tokens, no_fire)
        delta = coef @ weights.W_dec[sel.indices]                      # [n', d]
        new_rows = torch.where(fired_rows[:, None], (x32[rows] + delta).to(tokens.dtype), tokens[rows])
        y = tokens.clone()
        y[rows] = new_rows
        fired = no_fire.clone()
        fired[rows] = fired_rows
        return InterventionResult(y, fired)

    # reference sign: y = x_hat' + (x_hat - x), on every token
    acts, idx, coef, fire = edit(centred)
    x_hat = F.embedding_bag(idx, weights.W_dec, per_sample_weights=acts, mode="sum") + weights.b_dec
    x_hat_edit = x_hat if m == 0 else x_hat + coef @ weights.W_dec[sel.indices]
    y = x_hat_edit + (x_hat - x32)
    return InterventionResult(y.to(tokens.dtype), fire.any(dim=1) if m else no_fire)


def _from_tokens(rows: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`sae_core.capture.to_tokens` for a 4-D or 3-D ``like``."""
    if like.dim() == 4:
        b, c, h, w = like.shape
        return rows.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
    return rows.reshape(like.shape)


# ---------------------------------------------------------------------------------------------
# The hook object
# ---------------------------------------------------------------------------------------------


class SAeUronHook:
    """SAeUron's block-output edit, ready to call once per denoiser evaluation.

    Args:
        sae: the SAE trained on the hooked block (``encoder``, ``W_dec``, ``b_dec``, ``cfg``).
        stats: :class:`ConceptStats` (a table is built from ``concepts``, ``gamma``, ``top_n`` /
            ``percentile``) or a ready :class:`SelectionTable` (those arguments are then ignored).
        concepts: concept name(s) to erase (with ``stats``).
        gamma: multiplier, a float or a mapping concept -> float (SAeUron: -1 for styles).
        top_n / percentile: selection rule (exactly one; ``top_n=1`` when neither is given).
        error_mode: ``"conventional"`` (default) or ``"reference"``; see the module docstring.
        cond_only: edit only the conditional rows (needs ``cond_mask`` at call time).
        check_sae: refuse statistics gathered with a different SAE (by fingerprint).
        path: conventional-mode implementation, ``"fast"`` (:mod:`.fast`), ``"screened"``
            (:func:`intervene_tokens`) or ``"auto"`` (fast on CUDA, screened elsewhere). The fast
            path always returns a new tensor (an unchanged block output is an equal copy).
        compile: run the fast path through ``torch.compile`` (needs Triton).

    Call ``hook(x, step_index, cond_mask=None) -> y`` with the block output ``x [B, C, H, W]``
    (or ``[B, P, d]``), or :meth:`at_timestep` with the sampler's timestep/sigma.
    :meth:`forward_hook` / :meth:`attach` adapt it to ``nn.Module.register_forward_hook``.

    Attributes:
        last_fired: ``[tokens]`` bool of the most recent call (diagnostics), or ``None``.
        calls, fired_tokens: running counters (``fired_tokens`` is a tensor, to avoid syncing).
        fast_unresolved: (token, latent) pairs the fast path could not settle exactly (see
            :mod:`.fast`; 0 in practice).
    """

    def __init__(
        self,
        sae: Any,
        stats: ConceptStats | SelectionTable,
        concepts: str | Sequence[str] | None = None,
        gamma: float | Mapping[str, float] = -1.0,
        top_n: int | Mapping[str, int] | None = None,
        percentile: float | Mapping[str, float] | None = None,
        error_mode: str = "conventional",
        *,
        cond_only: bool = False,
        check_sae: bool = True,
        path: str = "auto",
        compile: bool = False,
    ) -> None:
        if error_mode not in ERROR_MODES:
            raise ValueError(f"error_mode must be one of {ERROR_MODES}, got {error_mode!r}")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if path == "fast" and error_mode != "conventional":
            raise ValueError("the fast path implements error_mode='conventional' only")
        if isinstance(stats, ConceptStats):
            if concepts is None or (not isinstance(concepts, str) and len(concepts) == 0):
                raise ValueError("SAeUronHook: give the concept(s) to erase")
            if check_sae:
                stats.check_sae(sae)
            table = build_selection(stats, concepts, gamma=gamma, top_n=top_n, percentile=percentile)
        elif isinstance(stats, SelectionTable):
            table = stats
            if check_sae and table.sae_fingerprint is not None and table.sae_fingerprint != sae_fingerprint(sae):
                raise ValueError("SAeUronHook: the selection table was built for a different SAE"
                                 f"{sae_fingerprint_hint(sae)}")
        else:
            raise TypeError(f"SAeUronHook: stats must be ConceptStats or SelectionTable, got {type(stats).__name__}")
        if table.num_latents is not None and table.num_latents != sae.cfg.num_latents:
            raise ValueError(f"SAeUronHook: the table is for {table.num_latents} latents, "
                             f"the SAE has {sae.cfg.num_latents}")
        self.sae = sae
        self.table = table
        self.error_mode = error_mode
        self.cond_only = cond_only
        self.path = path
        self.compile = compile
        self._weights: dict[torch.device, SaeWeights32] = {}
        self._steps: dict[torch.device, list[StepSelection]] = {}
        self._fast: dict[torch.device, FastEdit] = {}
        self.last_fired: Tensor | None = None
        self.calls = 0
        self.fired_tokens: Tensor | int = 0
        self.fast_unresolved: Tensor | int = 0

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.table.num_steps

    def _on(self, device: torch.device) -> tuple[SaeWeights32, list[StepSelection]]:
        if device not in self._weights:
            self._weights[device] = SaeWeights32(self.sae, device)
            self._steps[device] = [
                StepSelection(*(v.to(device) for v in self.table.step(t))) for t in range(self.num_steps)
            ]
        return self._weights[device], self._steps[device]

    def uses_fast(self, device: torch.device) -> bool:
        """Whether calls on ``device`` take the fast path."""
        if self.error_mode != "conventional" or self.path == "screened":
            return False
        return self.path == "fast" or device.type == "cuda"

    def step_for(self, t: float | Tensor) -> int:
        """Step index of the statistics' schedule closest to timestep/sigma ``t``."""
        if self.table.schedule is None:
            raise ValueError("these statistics carry no sampling schedule; pass step indices instead")
        return step_index_from_timestep(t, self.table.schedule)

    # -- application ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: Tensor, step_index: int, cond_mask: Tensor | Sequence[bool] | None = None) -> Tensor:
        """Edited block output (same shape and dtype as ``x``); ``x`` itself when nothing changed."""
        step_index = int(step_index)
        if not 0 <= step_index < self.num_steps:
            raise ValueError(
                f"SAeUron: step index {step_index} is outside the statistics' 0..{self.num_steps - 1}; "
                f"map the sampler's step with step_index_from_timestep / map_step_index"
            )
        if x.dim() not in (3, 4):
            raise ValueError(f"SAeUron: block output must be [B, C, H, W] or [B, P, d], got {tuple(x.shape)}")
        mask: Tensor | None = None
        if self.cond_only:
            if cond_mask is None:
                raise ValueError("SAeUronHook(cond_only=True) needs cond_mask (True for conditional rows)")
            mask = torch.as_tensor(cond_mask, dtype=torch.bool).reshape(-1)
            if mask.device != x.device:  # no wait on the device for a host-side mask
                mask = (mask.pin_memory() if x.device.type == "cuda" else mask).to(x.device, non_blocking=True)
            if mask.shape[0] != x.shape[0]:
                raise ValueError(f"cond_mask has {mask.shape[0]} entries for a batch of {x.shape[0]}")
        if self.uses_fast(x.device):
            return self._fast_call(x, step_index, mask)
        rows: Tensor | None = None
        if mask is not None and not bool(mask.all()):
            rows = mask.nonzero().flatten()
            if rows.numel() == 0:
                return x
        weights, steps = self._on(x.device)
        part = x if rows is None else x.index_select(0, rows)
        tokens = to_tokens(part)
        result = _intervene(tokens, weights, steps[step_index], self.error_mode)
        self.calls += 1
        self.last_fired = result.fired
        self.fired_tokens = self.fired_tokens + result.fired.sum()
        if result.output is tokens:  # nothing fired: the block output passes through untouched
            return x
        y = _from_tokens(result.output, part)
        if rows is None:
            return y
        out = x.clone()
        out[rows] = y
        return out

    def _fast_call(self, x: Tensor, step_index: int, mask: Tensor | None) -> Tensor:
        fast = self._fast.get(x.device)
        if fast is None:
            fast = self._fast[x.device] = FastEdit(self._on(x.device)[0], self.table, x.device, compile=self.compile)
        tokens = to_tokens(x)
        if mask is not None:
            mask = mask[:, None].expand(x.shape[0], tokens.shape[0] // x.shape[0]).reshape(-1)
        result = fast(tokens, step_index, mask)
        self.calls += 1
        self.last_fired = result.fired.clone()
        self.fired_tokens = self.fired_tokens + result.counts[0]
        self.fast_unresolved = self.fast_unresolved + result.counts[2]
        y = _from_tokens(result.output, x)
        return y.clone() if y.data_ptr() == result.output.data_ptr() else y

    def at_timestep(self, x: Tensor, t: float | Tensor, cond_mask: Tensor | Sequence[bool] | None = None) -> Tensor:
        """Like calling the hook, with the step index found from the sampler's timestep/sigma."""
        return self(x, self.step_for(t), cond_mask)

    def on_update(self, x_in: Tensor, out: Tensor, step_index: int,
                  cond_mask: Tensor | Sequence[bool] | None = None) -> Tensor:
        """Edited output of a block whose SAE reads the block's *update* ``d = out - x_in``.

        SAeUron's ``output_or_diff="diff"`` hook point: ``d`` is edited like a block output and
        the block returns ``x_in + d'``, written as ``out + (d' - d)`` so that ``out`` itself comes
        back untouched when nothing fires.
        """
        d = out - x_in
        edited = self(d, step_index, cond_mask)
        if edited is d:
            return out
        return out + (edited - d)

    def update_at_timestep(self, x_in: Tensor, out: Tensor, t: float | Tensor,
                           cond_mask: Tensor | Sequence[bool] | None = None) -> Tensor:
        """:meth:`on_update` with the step index found from the sampler's timestep/sigma."""
        return self.on_update(x_in, out, self.step_for(t), cond_mask)

    def forward_hook(self, state: Callable[[], Any]) -> Callable[[nn.Module, Any, Any], Any]:
        """An ``nn.Module`` forward hook applying this edit.

        ``state()`` is called at each forward and returns the sampler's current position: an
        object (or mapping) with ``step_index`` (int) or ``timestep``/``sigma`` (mapped with
        :meth:`step_for`), and optionally ``cond_mask``. Tuple outputs are handled (the first
        element is edited and the tuple rebuilt).
        """

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            info = state()
            step, cond = _read_state(info)
            if step is None:
                t = _get(info, "timestep")
                if t is None:
                    t = _get(info, "sigma")
                if t is None:
                    raise ValueError("SAeUron hook: the sampler state has neither step_index nor timestep/sigma")
                step = self.step_for(t)
            if isinstance(output, tuple):
                return (self(output[0], step, cond),) + tuple(output[1:])
            return self(output, step, cond)

        return hook

    def attach(self, module: nn.Module, state: Callable[[], Any]) -> torch.utils.hooks.RemovableHandle:
        """Register :meth:`forward_hook` on ``module``; remove it with the returned handle."""
        return module.register_forward_hook(self.forward_hook(state))


def _get(info: Any, name: str) -> Any:
    if isinstance(info, Mapping):
        return info.get(name)
    return getattr(info, name, None)


def _read_state(info: Any) -> tuple[int | None, Any]:
    step = _get(info, "step_index")
    return (None if step is None else int(step)), _get(info, "cond_mask")
