"""SAeUron's firing record (sae_core.saeuron.firing): heat map, summary, mask and overlay."""

from __future__ import annotations

import pytest
import torch

from sae_core.saeuron.firing import FiringRecord, overlay, upsample_mask


def test_heatmap_is_the_fraction_of_steps_each_position_was_edited():
    rec = FiringRecord((2, 3))
    a = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    b = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    rec.add(0, a, [7, 9])
    rec.add(1, b, [7])
    rec.add(1, b, [7])  # a second call at the same step (e.g. a split CFG batch): averaged, not double
    heat = rec.heatmap()
    assert heat.shape == (2, 2, 3)
    assert heat[0].flatten().tolist() == [1.0, 0.5, 0.0, 0.5, 0.0, 0.0]
    assert heat[1].flatten().tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.5]
    text = rec.summary()
    assert "2 prompted row(s) of 2x3 positions, 2 steps" in text
    assert "step   0:     3 tokens edited; selected latents: 7, 9" in text
    assert "step   1:     2 tokens edited; selected latents: 7" in text


def test_bad_records_are_refused():
    rec = FiringRecord((2, 2))
    with pytest.raises(ValueError, match="no SAeUron call"):
        rec.heatmap()
    with pytest.raises(ValueError, match=r"\[rows, 4\]"):
        rec.add(0, torch.zeros(1, 5, dtype=torch.bool))
    rec.add(0, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="saw 2 rows"):
        rec.add(0, torch.zeros(1, 4, dtype=torch.bool))


def test_mask_covers_each_positions_patch_and_overlay_marks_it():
    heat = torch.tensor([[[1.0, 0.0], [0.0, 0.5]]])
    mask = upsample_mask(heat, 4, 6)
    assert mask.shape == (1, 4, 6)
    assert mask[0, :2, :3].eq(1).all() and mask[0, :2, 3:].eq(0).all() and mask[0, 2:, 3:].eq(0.5).all()
    images = torch.full((1, 4, 6, 3), 0.5)
    out = overlay(images, heat)
    assert out.shape == images.shape
    assert out[0, 0, 0, 0] > out[0, 0, 0, 1] and out[0, 0, 5, 0] == out[0, 0, 5, 1]  # red where it acted only
