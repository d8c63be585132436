"""UnlearnCanvas metrics on small tables computed by hand."""

import math

import numpy as np
import pytest

from sae_core.minicanvas.metrics import (
    UNSTYLED,
    ErasureMetrics,
    EvalTable,
    accuracy,
    base_accuracy,
    mean_class_accuracy,
    mean_metrics,
    object_erasure_metrics,
    style_erasure_metrics,
)

U = UNSTYLED

# 2 objects x 2 styles, plus unstyled rows.  Columns: object label, style label, object pred, style pred
ROWS = [
    # object 0
    (0, 0, 0, 1),  # style 0 image judged style 1 (erased), object right
    (0, 0, 0, 1),
    (0, 1, 1, 1),  # object wrong, style right
    (0, U, 0, 0),
    # object 1
    (1, 0, 1, 0),  # style 0 kept
    (1, 1, 1, 1),
    (1, 1, 1, 0),  # style wrong
    (1, U, 0, 1),  # unstyled: object wrong
    (1, U, 1, 1),
]


def table():
    a = np.array(ROWS)
    return EvalTable(a[:, 0], a[:, 1], a[:, 2], a[:, 3])


def test_accuracy_helpers():
    assert accuracy(np.array([1, 2, 3]), np.array([1, 0, 3])) == pytest.approx(2 / 3)
    assert math.isnan(accuracy(np.array([]), np.array([])))
    # per-class mean differs from pooled when classes are unbalanced
    preds, labels = np.array([0, 1, 1, 1]), np.array([0, 0, 0, 1])
    assert accuracy(preds, labels) == pytest.approx(2 / 4)
    assert mean_class_accuracy(preds, labels) == pytest.approx((1 / 3 + 1) / 2)
    assert mean_class_accuracy(preds, labels, classes=[1, 5]) == 1.0
    with pytest.raises(ValueError):
        accuracy(np.array([1]), np.array([1, 2]))


def test_style_erasure_by_hand():
    m = style_erasure_metrics(table(), target=0)
    # style-0 rows: (0,0)->1, (0,0)->1, (1,0)->0  => style acc 1/3, UA = 2/3
    assert m.ua == pytest.approx(2 / 3)
    # other style (1) rows: preds 1,1,0 -> 2/3
    assert m.ira == pytest.approx(2 / 3)
    # unstyled rows: object 0: 1/1; object 1: 1/2  -> mean 0.75
    assert m.cra == pytest.approx(0.75)


def test_object_erasure_by_hand():
    m = object_erasure_metrics(table(), target=1)
    # object-1 rows (styled + unstyled): preds 1,1,1,0,1 -> 4/5, UA = 1/5
    assert m.ua == pytest.approx(1 / 5)
    # object-0 rows: preds 0,0,1,0 -> 3/4
    assert m.ira == pytest.approx(3 / 4)
    # style acc per style over all styled rows: style 0: [1,1,0] vs 0 -> 1/3; style 1: [1,1,0] -> 2/3
    assert m.cra == pytest.approx(0.5)
    m2 = object_erasure_metrics(table(), target=1, cra_include_target=False)
    # only object-0 styled rows: style 0: preds 1,1 -> 0; style 1: pred 1 -> 1
    assert m2.cra == pytest.approx(0.5)
    m3 = object_erasure_metrics(table(), target=0, cra_include_target=False)
    # only object-1 styled rows: style 0: pred 0 -> 1; style 1: preds 1,0 -> 1/2
    assert m3.cra == pytest.approx(0.75)


def test_multi_target_and_means():
    t = table()
    both = style_erasure_metrics(t, [0, 1])
    assert both.ua == pytest.approx(1 - (1 / 3 + 2 / 3) / 2)
    assert math.isnan(both.ira)
    with pytest.raises(ValueError):
        style_erasure_metrics(t, [])
    mm = mean_metrics([ErasureMetrics(1.0, 0.5, 0.0), ErasureMetrics(0.0, 0.5, 1.0)])
    assert mm == pytest.approx((0.5, 0.5, 0.5))


def test_base_accuracy_and_perfect_model():
    obj, sty = base_accuracy(table())
    assert obj == pytest.approx(7 / 9)
    assert sty == pytest.approx(3 / 6)
    a = np.array(ROWS)
    perfect = EvalTable(a[:, 0], a[:, 1], a[:, 0], np.where(a[:, 1] < 0, 0, a[:, 1]))
    for target in (0, 1):
        s = style_erasure_metrics(perfect, target)
        o = object_erasure_metrics(perfect, target)
        assert s == pytest.approx((0.0, 1.0, 1.0)) and o == pytest.approx((0.0, 1.0, 1.0))


def test_table_rejects_ragged_columns():
    with pytest.raises(ValueError, match="equal length"):
        EvalTable([0, 1], [0], [0, 1], [0, 1])
