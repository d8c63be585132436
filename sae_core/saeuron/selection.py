"""SAeUron's feature selection: the concept score, the per-step choice of latents, and the
table of (latent, scaling, threshold) the intervention applies at each step.

Score of latent ``i`` for concept ``c`` at step ``t`` (``eps = 1e-8``)::

    score_c(i, t) = mu_c(i, t) / (sum_j mu_c(j, t) + eps) - mu_notc(i, t) / (sum_j mu_notc(j, t) + eps)

Selection per step, either

* ``top_n``: the ``N`` latents with the highest score, or
* ``percentile``: the reference rule, ``{i : score > quantile(score, p / 100)}`` with
  ``torch.quantile``'s linear interpolation and a strict ``>``. Without ties this keeps exactly
  :func:`percentile_feature_count` latents (1, 2, 3 for p = 99.999, 99.995, 99.99 at 20480
  latents), i.e. it is a top-N rule in disguise.

A selected latent is scaled by ``gamma * mu_c(i, t)`` wherever its activation exceeds
``mu_all(i, t)`` (the mean over all concepts, target included).

Several concepts at once: each concept's latents are chosen independently. When two concepts
choose the same latent at the same step the threshold is the same (``mu_all`` does not depend
on the concept), so only the scaling differs; the **strongest** scaling (largest
``|gamma * mu_c|``, the first concept on a tie) is kept and the latent is edited once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .stats import ConceptStats

__all__ = [
    "SCORE_EPS",
    "SelectionTable",
    "StepSelection",
    "build_selection",
    "concept_scores",
    "percentile_feature_count",
    "select_features",
]

SCORE_EPS = 1e-8


def concept_scores(stats: ConceptStats, concept: str, eps: float = SCORE_EPS) -> Tensor:
    """``score_c [T, n]`` of the module docstring (float32)."""
    mu_c = stats.mu(concept)
    mu_n = stats.mu_not(concept)
    return mu_c / (mu_c.sum(-1, keepdim=True) + eps) - mu_n / (mu_n.sum(-1, keepdim=True) + eps)


def percentile_feature_count(num_latents: int, percentile: float) -> int:
    """How many latents the percentile rule keeps when the scores have no ties.

    ``torch.quantile`` places ``q = p / 100`` at position ``q * (n - 1)`` of the sorted scores;
    the strict ``>`` keeps the sorted positions above it: ``n - 1 - floor(q * (n - 1))``.
    """
    pos = (float(percentile) / 100.0) * (num_latents - 1)
    return int(num_latents - 1 - math.floor(pos))


def select_features(scores: Tensor, top_n: int | None = None, percentile: float | None = None) -> list[Tensor]:
    """Selected latent indices per step from ``scores [T, n]``, each sorted by descending score.

    Exactly one of ``top_n`` / ``percentile`` must be given (see the module docstring).
    """
    if (top_n is None) == (percentile is None):
        raise ValueError("give exactly one of top_n (features per step) or percentile")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [steps, latents], got {tuple(scores.shape)}")
    n = scores.shape[1]
    out: list[Tensor] = []
    if top_n is not None:
        top_n = int(top_n)
        if not 1 <= top_n <= n:
            raise ValueError(f"top_n must be in 1..{n}, got {top_n}")
        return list(scores.topk(top_n, dim=1).indices)
    p = float(percentile)
    if not 0.0 <= p < 100.0:
        raise ValueError(f"percentile must be in [0, 100), got {percentile}")
    for row in scores:
        threshold = torch.quantile(row, p / 100.0)  # linear interpolation (torch default)
        idx = (row > threshold).nonzero().flatten()
        order = row[idx].argsort(descending=True)
        out.append(idx[order])
    return out


class StepSelection(NamedTuple):
    """What the intervention applies at one step index."""

    indices: Tensor
    """``[m]`` int64 latent indices."""
    scales: Tensor
    """``[m]`` float32 multipliers ``gamma * mu_c(i, t)``."""
    thresholds: Tensor
    """``[m]`` float32 ``mu_all(i, t)``: the latent is scaled only where it is strictly above."""
    concept: Tensor
    """``[m]`` int64: which of the table's concepts each entry came from."""


class SelectionTable:
    """Per-step (latent, scaling, threshold) entries, padded to a common width.

    Tensors are ``[T, M]``; step ``t`` uses the first ``count[t]`` entries. Padding entries have
    index 0, scale 1 and threshold ``+inf``, so they never fire even if used.

    Attributes:
        concepts: the erased concepts, in the order the ``concept`` column refers to.
        indices, scales, thresholds, concept, count: see :class:`StepSelection`.
        schedule / schedule_kind: copied from the statistics (for timestep -> step mapping).
        hookpoint, sae_fingerprint: copied from the statistics.
    """

    def __init__(self, concepts: Sequence[str], steps: Sequence[StepSelection], *,
                 schedule: Tensor | None = None, schedule_kind: str = "timestep",
                 hookpoint: str | None = None, sae_fingerprint: str | None = None,
                 num_latents: int | None = None) -> None:
        if not steps:
            raise ValueError("SelectionTable needs at least one step")
        self.concepts = list(concepts)
        t = len(steps)
        m = max(1, max(int(s.indices.numel()) for s in steps))
        self.indices = torch.zeros(t, m, dtype=torch.int64)
        self.scales = torch.ones(t, m, dtype=torch.float32)
        self.thresholds = torch.full((t, m), math.inf, dtype=torch.float32)
        self.concept = torch.full((t, m), -1, dtype=torch.int64)
        self.count = torch.zeros(t, dtype=torch.int64)
        for i, s in enumerate(steps):
            c = int(s.indices.numel())
            self.count[i] = c
            self.indices[i, :c] = s.indices
            self.scales[i, :c] = s.scales.float()
            self.thresholds[i, :c] = s.thresholds.float()
            self.concept[i, :c] = s.concept
        self.schedule = schedule
        self.schedule_kind = schedule_kind
        self.hookpoint = hookpoint
        self.sae_fingerprint = sae_fingerprint
        self.num_latents = num_latents

    @property
    def num_steps(self) -> int:
        return self.indices.shape[0]

    def step(self, t: int) -> StepSelection:
        """The (unpadded) entries of step ``t``."""
        c = int(self.count[t])
        return StepSelection(self.indices[t, :c], self.scales[t, :c], self.thresholds[t, :c], self.concept[t, :c])

    def latents(self) -> Tensor:
        """Every latent used at some step (sorted, unique)."""
        mask = torch.arange(self.indices.shape[1])[None, :] < self.count[:, None]
        return self.indices[mask].unique()

    def __repr__(self) -> str:
        return (f"SelectionTable(concepts={self.concepts}, steps={self.num_steps}, "
                f"features/step={self.count.float().mean().item():.2f}, distinct latents={self.latents().numel()})")


def _per_concept(value: Any, concept: str, name: str) -> Any:
    if isinstance(value, Mapping):
        if concept not in value:
            raise ValueError(f"{name} has no entry for concept {concept!r} (keys: {list(value)})")
        return value[concept]
    return value


def _rule_of(concept: str, top_n: Any, percentile: Any) -> tuple[int | None, float | None]:
    """``(top_n, percentile)`` of one concept, exactly one of them set.

    A mapping gives the concepts it names their own rule; a concept a mapping does not name takes the
    other argument's plain value. Plain values alone: :func:`build_selection` has checked there is one.
    """
    def entry(value: Any) -> tuple[bool, Any]:  # (named in a mapping, value)
        if isinstance(value, Mapping):
            return (concept in value, value.get(concept))
        return (False, value)

    named_n, n = entry(top_n)
    named_p, p = entry(percentile)
    if named_n and named_p and n is not None and p is not None:
        raise ValueError(f"concept {concept!r} has both a top_n ({n}) and a percentile ({p}); give one rule")
    if named_n and n is not None:
        return int(n), None
    if named_p and p is not None:
        return None, float(p)
    if isinstance(top_n, Mapping) and isinstance(percentile, Mapping):
        raise ValueError(f"no selection rule for concept {concept!r}: neither top_n (keys: {list(top_n)}) nor "
                         f"percentile (keys: {list(percentile)}) names it")
    plain_n = None if isinstance(top_n, Mapping) else top_n
    plain_p = None if isinstance(percentile, Mapping) else percentile
    if plain_n is None and plain_p is None:
        missing = "top_n" if isinstance(top_n, Mapping) else "percentile"
        keys = list(top_n if isinstance(top_n, Mapping) else percentile)
        raise ValueError(f"{missing} has no entry for concept {concept!r} (keys: {keys})")
    return (None if plain_n is None else int(plain_n)), (None if plain_p is None else float(plain_p))


def build_selection(
    stats: ConceptStats,
    concepts: str | Sequence[str],
    gamma: float | Mapping[str, float] = -1.0,
    top_n: int | Mapping[str, int] | None = None,
    percentile: float | Mapping[str, float] | None = None,
    eps: float = SCORE_EPS,
) -> SelectionTable:
    """Build the intervention table for erasing ``concepts``.

    Args:
        stats: concept statistics holding (at least) the erased concepts and the others they are
            contrasted with.
        concepts: the concept(s) to erase.
        gamma: multiplier (SAeUron uses negative values, e.g. -1 for styles); a float or a
            mapping concept -> float.
        top_n / percentile: the selection rule (exactly one; a value or a mapping per concept).
            With neither, ``top_n = 1``. Rules may differ between concepts: with mappings, each
            concept takes the rule of the mapping that names it (one of the two), and a concept
            that no mapping names takes the other argument's plain value (as SAeUron's per-class
            ``(percentile, gamma)`` table beside a default).
        eps: the score's epsilon.

    Multi-concept de-duplication: see the module docstring (strongest scaling wins).
    """
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = list(dict.fromkeys(concepts))
    if not concepts:
        raise ValueError("build_selection: the concept list is empty")
    if top_n is None and percentile is None:
        top_n = 1
    if top_n is not None and percentile is not None and not (isinstance(top_n, Mapping)
                                                            or isinstance(percentile, Mapping)):
        raise ValueError("give exactly one of top_n or percentile")
    mu_all = stats.mu_all()  # [T, n]
    per_concept: list[tuple[list[Tensor], Tensor]] = []
    for name in concepts:
        g = float(_per_concept(gamma, name, "gamma"))
        scores = concept_scores(stats, name, eps)
        n_rule, p_rule = _rule_of(name, top_n, percentile)
        chosen = select_features(scores, top_n=n_rule, percentile=p_rule)
        per_concept.append((chosen, g * stats.mu(name)))

    steps: list[StepSelection] = []
    for t in range(stats.num_steps):
        best: dict[int, tuple[float, int]] = {}  # latent -> (scale, concept)
        order: list[int] = []
        for ci, (chosen, scale_table) in enumerate(per_concept):
            for i in chosen[t].tolist():
                s = float(scale_table[t, i])
                if i not in best:
                    best[i] = (s, ci)
                    order.append(i)
                elif abs(s) > abs(best[i][0]):
                    best[i] = (s, ci)
        idx = torch.tensor(order, dtype=torch.int64)
        steps.append(StepSelection(
            idx,
            torch.tensor([best[i][0] for i in order], dtype=torch.float32),
            mu_all[t, idx].float() if order else torch.zeros(0),
            torch.tensor([best[i][1] for i in order], dtype=torch.int64),
        ))
    return SelectionTable(concepts, steps, schedule=stats.schedule, schedule_kind=stats.schedule_kind,
                          hookpoint=stats.hookpoint, sae_fingerprint=stats.sae_fingerprint,
                          num_latents=stats.num_latents)
