"""UnlearnCanvas metrics (UA, IRA, CRA) as pure functions over a table of labels and predictions.

Definitions (accuracies are judged by the object / style classifiers; "mean over
concepts" means the accuracy is computed per concept and then averaged, as UnlearnCanvas'
scripts do; with balanced prompt sets this equals the pooled accuracy):

Style erasure of target style(s) T:
    UA  = 1 - style accuracy on images of T's prompts (all objects)
    IRA = mean over the other styles of style accuracy on their prompts
    CRA = mean over objects of object accuracy on the *unstyled* prompts

Object erasure of target object(s) T:
    UA  = 1 - object accuracy on T's images (styled and unstyled prompts pooled)
    IRA = mean over the other objects of object accuracy (styled + unstyled pooled)
    CRA = mean over styles of style accuracy on the styled prompts. By default the target
          object's styled images are included (UnlearnCanvas averages style accuracy over
          all styled images); ``cra_include_target=False`` leaves them out.

All values are fractions in [0, 1]; the command line prints them as percentages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np

UNSTYLED = -1
"""Style label of rows generated from an unstyled prompt."""


@dataclass
class EvalTable:
    """One row per generated image: what was asked for and what the judges saw."""

    object_labels: np.ndarray
    """int [N]: object index of the prompt."""
    style_labels: np.ndarray
    """int [N]: style index of the prompt, or UNSTYLED (-1) for an unstyled prompt."""
    object_preds: np.ndarray
    """int [N]: object judge's prediction."""
    style_preds: np.ndarray
    """int [N]: style judge's prediction."""

    def __post_init__(self) -> None:
        arrays = [np.asarray(a, dtype=np.int64).reshape(-1) for a in
                  (self.object_labels, self.style_labels, self.object_preds, self.style_preds)]
        n = {a.shape[0] for a in arrays}
        if len(n) != 1:
            raise ValueError(f"EvalTable columns must have equal length, got {[a.shape[0] for a in arrays]}")
        self.object_labels, self.style_labels, self.object_preds, self.style_preds = arrays

    def __len__(self) -> int:
        return int(self.object_labels.shape[0])

    def subset(self, mask: np.ndarray) -> "EvalTable":
        m = np.asarray(mask, dtype=bool)
        return EvalTable(self.object_labels[m], self.style_labels[m], self.object_preds[m], self.style_preds[m])


class ErasureMetrics(NamedTuple):
    """UnlearnCanvas scores of one erasure, as fractions."""

    ua: float
    """Unlearning accuracy: 1 - accuracy on the erased concept(s)."""
    ira: float
    """In-domain retain accuracy: accuracy on the other concepts of the same kind."""
    cra: float
    """Cross-domain retain accuracy: accuracy of the other kind."""


def _targets(t: int | Iterable[int]) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(list(t) if not isinstance(t, (int, np.integer)) else [t], dtype=np.int64))
    if arr.size == 0:
        raise ValueError("at least one target concept is required")
    return arr


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of equal entries; NaN for an empty selection."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"preds {preds.shape} and labels {labels.shape} differ in shape")
    return float(np.mean(preds == labels)) if preds.size else float("nan")


def mean_class_accuracy(preds: np.ndarray, labels: np.ndarray, classes: Iterable[int] | None = None) -> float:
    """Mean over ``classes`` (default: those present) of the accuracy on that class's rows.

    Classes with no rows are skipped; NaN if none has rows.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = np.unique(labels) if classes is None else np.asarray(list(classes))
    accs = [accuracy(preds[labels == c], labels[labels == c]) for c in classes if np.any(labels == c)]
    return float(np.mean(accs)) if accs else float("nan")


def style_erasure_metrics(table: EvalTable, target: int | Iterable[int]) -> ErasureMetrics:
    """UA/IRA/CRA for erasing style(s) ``target`` (style indices)."""
    tg = _targets(target)
    styled = table.style_labels != UNSTYLED
    is_t = np.isin(table.style_labels, tg) & styled
    others = styled & ~is_t
    ua = 1.0 - mean_class_accuracy(table.style_preds[is_t], table.style_labels[is_t])
    ira = mean_class_accuracy(table.style_preds[others], table.style_labels[others])
    un = ~styled
    cra = mean_class_accuracy(table.object_preds[un], table.object_labels[un])
    return ErasureMetrics(ua, ira, cra)


def object_erasure_metrics(table: EvalTable, target: int | Iterable[int], cra_include_target: bool = True) -> ErasureMetrics:
    """UA/IRA/CRA for erasing object(s) ``target`` (object indices)."""
    tg = _targets(target)
    is_t = np.isin(table.object_labels, tg)
    ua = 1.0 - mean_class_accuracy(table.object_preds[is_t], table.object_labels[is_t])
    ira = mean_class_accuracy(table.object_preds[~is_t], table.object_labels[~is_t])
    styled = table.style_labels != UNSTYLED
    sel = styled if cra_include_target else styled & ~is_t
    cra = mean_class_accuracy(table.style_preds[sel], table.style_labels[sel])
    return ErasureMetrics(ua, ira, cra)


def erasure_metrics(table: EvalTable, kind: str, target: int | Iterable[int], **kw) -> ErasureMetrics:
    """Dispatch on ``kind`` ("style" or "object")."""
    if kind == "style":
        return style_erasure_metrics(table, target)
    if kind == "object":
        return object_erasure_metrics(table, target, **kw)
    raise ValueError(f"kind must be 'style' or 'object', got {kind!r}")


def base_accuracy(table: EvalTable) -> tuple[float, float]:
    """(object accuracy over all rows, style accuracy over styled rows), pooled."""
    styled = table.style_labels != UNSTYLED
    return (accuracy(table.object_preds, table.object_labels),
            accuracy(table.style_preds[styled], table.style_labels[styled]))


def mean_metrics(results: Sequence[ErasureMetrics]) -> ErasureMetrics:
    """Component-wise mean of several runs."""
    if not results:
        raise ValueError("mean_metrics needs at least one result")
    arr = np.asarray([tuple(r) for r in results], dtype=np.float64)
    return ErasureMetrics(*[float(v) for v in arr.mean(axis=0)])
