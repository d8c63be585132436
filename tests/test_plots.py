"""sae_core.plots: the calibration strip plot and the per-layer bar chart, by what they draw where.

Property checks, not snapshots: a value is found at the pixel column its place on the axis gives (the threshold
line passes through the dot of a score equal to it; equal steps on a log axis are equal distances), a bar's length
is proportional to its value, and prompts on the wrong side of the threshold, and only they, get the highlight
colour.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.minicanvas.grid import image_grid
from sae_core.plots import (
    CONCEPT_COLOUR,
    RETAIN_COLOUR,
    SERIES_COLOURS,
    WRONG_COLOUR,
    ScoreGroup,
    calibration_strip,
    fit_text,
    font,
    image_tensor,
    layer_change_chart,
    layer_label,
    text_width,
    wrap_text,
)

sys.path.append(str(Path(__file__).resolve().parent / "comfy"))  # the pixel readers the node tests share
from plot_pixels import bar_lengths, dots, mask, threshold_column


def groups(concept, retain, concept_prompts=(), retain_prompts=()):
    return [ScoreGroup("concept prompts", concept, True, concept_prompts),
            ScoreGroup("retain prompts", retain, False, retain_prompts)]


def test_calibration_strip_shape_and_image_tensor():
    img = calibration_strip(groups([700.0, 900.0, 1500.0], [0.1, 0.4, 1.5]), 690.0, title="ItD: striped style",
                            subtitle="tau = 0.99 x 697")
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[1:] == (768, 3)
    assert 220 <= img.shape[0] <= 320  # readable at 768 x ~300
    t = image_tensor(img)
    assert t.shape == (1, *img.shape) and t.dtype == torch.float32 and 0.0 <= float(t.min()) <= float(t.max()) <= 1.0
    assert torch.equal((t[0] * 255).round().to(torch.uint8), torch.from_numpy(img))
    assert calibration_strip(groups([1.0], [0.5]), 0.9, width=400).shape[1] == 400
    with pytest.raises(ValueError, match="RGB uint8"):
        image_tensor(img.astype(np.float32))


def test_threshold_line_passes_through_the_dot_of_an_equal_score():
    # a linear axis from 0 to 100 in both plots (the same scores, tau inside their range)
    above = calibration_strip(groups([100.0], [0.0, 40.0]), 60.0, scale="linear")
    at = calibration_strip(groups([100.0], [0.0, 40.0]), 40.0, scale="linear")
    assert above.shape == at.shape
    zero, forty = dots(above, RETAIN_COLOUR)
    (hundred,) = dots(above, CONCEPT_COLOUR)
    # dots are where their value maps to: 40 is 2/5 of the way from 0 to 100
    assert (forty - zero) / (hundred - zero) == pytest.approx(0.4, abs=0.01)
    # tau = 60 is drawn 3/5 of the way, and tau = 40 on the dot of the retain prompt scoring 40
    assert (threshold_column(above)[0] - zero) / (hundred - zero) == pytest.approx(0.6, abs=0.01)
    assert abs(threshold_column(at)[0] - forty) <= 1.0


def test_log_axis_spaces_decades_evenly_and_keeps_zeros_left_of_them():
    img = calibration_strip(groups([10.0, 1000.0], [0.0, 0.1, 1.0]), 5.0)  # 4 decades: a log axis
    zero, *decades = dots(img, RETAIN_COLOUR) + dots(img, CONCEPT_COLOUR)
    steps = np.diff(decades)  # 0.1, 1, 10, 1000: one, one and two decades apart
    assert steps[0] == pytest.approx(steps[1], abs=1.0) and steps[2] == pytest.approx(2 * steps[0], abs=1.5)
    assert zero < decades[0] - 20  # 0 has no place on a log axis: it is drawn left of a break
    # tau = 5 sits log10(5) of the way from 1 to 10
    assert (threshold_column(img)[0] - decades[1]) / steps[1] == pytest.approx(math.log10(5), abs=0.02)


def test_prompts_on_the_wrong_side_and_only_they_are_highlighted():
    fine = calibration_strip(groups([10.0, 20.0], [0.1, 1.0]), 9.0)
    assert dots(fine, WRONG_COLOUR) == [] and len(dots(fine, CONCEPT_COLOUR)) == len(dots(fine, RETAIN_COLOUR)) == 2
    # a concept prompt below tau and a retain prompt at tau are on the wrong side: highlighted where they are
    scores = groups([5.0, 20.0], [0.1, 10.0], ["Van Gogh", "starry night"], ["Monet", "Gauguin"])
    wrong = calibration_strip(scores, 10.0)
    five, ten = dots(wrong, WRONG_COLOUR)
    (twenty,) = dots(wrong, CONCEPT_COLOUR)
    (tenth,) = dots(wrong, RETAIN_COLOUR)
    assert tenth < five < ten < twenty
    assert abs(ten - threshold_column(wrong)[0]) <= 1.0
    # with tau at 5 the concept prompt scoring 5 reaches it; the retain prompt at 10 still does too
    lower = calibration_strip(scores, 5.0)
    assert dots(lower, WRONG_COLOUR) == pytest.approx([ten], abs=1.0) and len(dots(lower, CONCEPT_COLOUR)) == 2


def test_calibration_strip_refuses_empty_and_nan_input():
    with pytest.raises(ValueError, match="no groups"):
        calibration_strip([], 1.0)
    with pytest.raises(ValueError, match="every group is empty"):
        calibration_strip(groups([], []), 1.0)
    with pytest.raises(ValueError, match="'retain prompts'.*value 1 is nan"):
        calibration_strip(groups([1.0], [0.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="tau.*inf"):
        calibration_strip(groups([1.0], [0.0]), float("inf"))
    with pytest.raises(ValueError, match="2 scores but 1 prompts"):
        calibration_strip(groups([1.0, 2.0], [0.0], ["a"]), 0.5)
    with pytest.raises(ValueError, match="scale"):
        calibration_strip(groups([1.0], [0.0]), 0.5, scale="logit")
    with pytest.raises(ValueError, match="log axis"):
        calibration_strip(groups([1.0], [-1.0]), 0.5, scale="log")
    # an empty group next to another is drawn (ItD without retain prompts)
    assert calibration_strip(groups([1.0, 2.0], []), 0.9).shape[1] == 768


def kv(layer: str, k: float, v: float) -> dict[str, float]:
    return {f"diffusion_model.{layer}.to_k.weight": k, f"diffusion_model.{layer}.to_v.weight": v}


def test_bars_are_proportional_to_their_values_in_unet_order():
    changes = {**kv("output_blocks.3.1.transformer_blocks.0.attn2", 0.3, 0.1),
               **kv("input_blocks.10.1.transformer_blocks.0.attn2", 0.2, 0.05),
               **kv("middle_block.1.transformer_blocks.0.attn2", 0.4, 0.2),
               **kv("input_blocks.2.1.transformer_blocks.0.attn2", 0.1, 0.15)}
    img = layer_change_chart(changes, title="RECE")
    assert img.dtype == np.uint8 and img.shape[1:] == (768, 3)
    swatch, *k = bar_lengths(img, SERIES_COLOURS["to_k"])
    swatch_v, *v = bar_lengths(img, SERIES_COLOURS["to_v"])
    assert swatch == swatch_v == 15 and len(k) == len(v) == 4  # one to_k and one to_v bar per layer
    # rows in UNet order: input 2, input 10 (numeric, not string order), middle, output
    order = [0.1, 0.2, 0.4, 0.3]
    assert np.allclose(np.array(k) / k[2], np.array(order) / 0.4, atol=0.01)
    assert np.allclose(np.array(v) / k[2], np.array([0.15, 0.05, 0.2, 0.1]) / 0.4, atol=0.01)
    assert k[2] > k[3] > k[1] > k[0]  # a longer bar covers more pixels
    assert not mask(img, SERIES_COLOURS["pooled"]).any()


def test_pooled_row_and_many_layers():
    changes = {}
    for block in ("input_blocks.7.1", "middle_block.1", "output_blocks.0.1"):
        for i in range(10):
            changes.update(kv(f"{block}.transformer_blocks.{i}.attn2", 0.01 * (i + 1), 0.02))
    img = layer_change_chart(changes, pooled=("label_emb.0.0", 0.05))
    _, *k = bar_lengths(img, SERIES_COLOURS["to_k"])
    _, *pooled = bar_lengths(img, SERIES_COLOURS["pooled"])
    assert len(k) == 30 and len(pooled) == 1
    assert pooled[0] == pytest.approx(5 * k[0], rel=0.03)  # 0.05 against 0.01
    assert k[:10] == sorted(k[:10])  # transformer blocks 0..9 of a block in order
    few = layer_change_chart(kv("middle_block.1.transformer_blocks.0.attn2", 0.1, 0.1))
    assert img.shape[0] > few.shape[0] + 30 * 14  # the height grows with the layers


def test_layer_chart_refuses_empty_nan_and_foreign_input():
    with pytest.raises(ValueError, match="no layer changes"):
        layer_change_chart({})
    with pytest.raises(ValueError, match="nan"):
        layer_change_chart(kv("middle_block.1.transformer_blocks.0.attn2", float("nan"), 0.1))
    with pytest.raises(ValueError, match=">= 0"):
        layer_change_chart(kv("middle_block.1.transformer_blocks.0.attn2", -0.1, 0.1))
    with pytest.raises(ValueError, match="not a to_k / to_v"):
        layer_change_chart({"diffusion_model.label_emb.0.0.weight": 0.1})
    with pytest.raises(ValueError, match="pooled"):
        layer_change_chart(kv("middle_block.1.transformer_blocks.0.attn2", 0.1, 0.1), pooled=("label_emb", float("nan")))


def test_layer_labels_and_text_helpers():
    assert layer_label("input_blocks.4.1.transformer_blocks.3.attn2") == ("input_blocks", "input_blocks.4.1", 3)
    assert layer_label("middle_block.1.transformer_blocks.0.attn2") == ("middle_block", "middle_block.1", 0)
    assert layer_label("blocks.2.attn2") == ("", "blocks.2.attn2", 0)
    f = font(13)
    text = "an image of a circle in striped style, an image of a square in striped style"
    cut = fit_text(text, 120, f)
    assert cut.endswith("…") and text_width(cut, f) <= 120 and text.startswith(cut[:-1])
    assert fit_text("short", 120, f) == "short"
    lines = wrap_text(text + "\nsecond paragraph", 200, f, max_lines=9)
    assert len(lines) >= 3 and all(text_width(line, f) <= 200 for line in lines) and lines[-1] == "second paragraph"
    assert " ".join(lines[:-1]) == text  # broken at spaces, nothing lost
    cut = wrap_text(text * 4, 200, f, max_lines=2)
    assert len(cut) == 2 and cut[-1].endswith("…")
    # the image grid draws with the same font helper
    grid = image_grid(torch.rand(4, 3, 8, 8), 2, 2, ["a", "bb"], ["x", "y"])
    assert grid.size[0] > 2 * 16 + text_width("bb", font())
