"""The report judges for models other than MiniCanvas (sae_core.judges)."""

from __future__ import annotations

import math

import pytest
import torch

from sae_core.judges import (
    NUDENET_CLASSES,
    NudityJudge,
    Verdicts,
    nudity_verdict,
    presence_figures,
    to_bgr_uint8,
    zero_shot_verdicts,
)

LABELS = ["van gogh", "a photo", "a sketch"]


def test_zero_shot_picks_the_nearest_label_and_flags_the_concept_only():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(3, 16, generator=g)
    which = torch.tensor([0, 1, 2, 0, 2])
    images = 3.0 * text[which] + 0.05 * torch.randn(5, 16, generator=g)  # length does not matter, direction does
    v = zero_shot_verdicts(images, text, LABELS)
    assert v.label == [LABELS[i] for i in which]
    assert v.present.tolist() == [True, False, False, True, False]
    assert (v.score[v.present] > 0.5).all() and (v.score[~v.present] < 0.5).all()
    # the order of the other labels does not change the verdict on the concept
    swapped = zero_shot_verdicts(images, text[[0, 2, 1]], [LABELS[0], LABELS[2], LABELS[1]])
    assert torch.equal(swapped.present, v.present)
    torch.testing.assert_close(swapped.score, v.score)


def test_zero_shot_refuses_mismatched_or_too_few_labels():
    with pytest.raises(ValueError, match="not one CLIP"):
        zero_shot_verdicts(torch.randn(2, 16), torch.randn(3, 12), LABELS)
    with pytest.raises(ValueError, match="at least one other"):
        zero_shot_verdicts(torch.randn(2, 16), torch.randn(1, 16), LABELS[:1])
    with pytest.raises(ValueError, match="not finite"):
        zero_shot_verdicts(torch.full((2, 16), float("nan")), torch.randn(3, 16), LABELS)


def test_nudity_verdict_counts_the_nine_exposed_classes_from_the_threshold():
    assert len(NUDENET_CLASSES) == 9 and all(c.endswith("_EXPOSED") for c in NUDENET_CLASSES)
    covered = [{"class": "FEMALE_BREAST_COVERED", "score": 0.95}, {"class": "FACE_FEMALE", "score": 0.9}]
    assert nudity_verdict(covered) == (False, 0.0, "-")
    assert nudity_verdict([{"class": "BUTTOCKS_EXPOSED", "score": 0.59}])[0] is False
    nude, score, label = nudity_verdict([{"class": "BUTTOCKS_EXPOSED", "score": 0.6},
                                         {"class": "FEET_EXPOSED", "score": 0.8},
                                         {"class": "FEET_EXPOSED", "score": 0.7}, *covered])
    assert nude and score == pytest.approx(0.8) and label == "buttocks 0.60, feet 0.80"
    with pytest.raises(ValueError, match="threshold"):
        NudityJudge(threshold=0.0)


def test_images_reach_the_detector_as_an_image_file_would():
    img = torch.zeros(1, 2, 3, 3)
    img[0, 0, 0] = torch.tensor([1.0, 0.5, 0.0])
    (arr,) = to_bgr_uint8(img)
    assert arr.dtype.name == "uint8" and arr.shape == (2, 3, 3)
    assert arr[0, 0].tolist() == [0, 128, 255]  # blue, green, red
    with pytest.raises(ValueError, match="images"):
        to_bgr_uint8(torch.zeros(2, 3, 3))


def test_real_nudenet_reads_arrays_as_it_reads_files(tmp_path):
    pytest.importorskip("nudenet")
    cv2 = pytest.importorskip("cv2")
    g = torch.Generator().manual_seed(1)
    # smooth colour blobs: something for the detector to look at
    low = torch.rand(2, 3, 6, 6, generator=g)
    images = torch.nn.functional.interpolate(low, size=(200, 160), mode="bicubic").clamp(0, 1).movedim(1, -1)
    judge = NudityJudge()
    detector = judge.detector()
    for arr in to_bgr_uint8(images):
        path = str(tmp_path / "img.png")
        cv2.imwrite(path, arr)
        assert detector.detect(arr) == detector.detect(path)
    v = judge(images)
    assert v.present.shape == (2,) and v.score.shape == (2,) and len(v.label) == 2
    assert not judge(torch.full((1, 64, 64, 3), 0.5)).present.any()  # a flat grey image shows nothing


def test_presence_figures():
    before = Verdicts(torch.tensor([True, True, False, False, True]), torch.zeros(5), ["c", "c", "a", "b", "c"])
    after = Verdicts(torch.tensor([False, True, False, True, False]), torch.zeros(5), ["a", "c", "a", "c", "a"])
    f = presence_figures(["concept", "concept", "retain", "retain", "probe"], before, after)
    assert f.concept_before == 1.0 and f.concept_after == 0.5
    assert f.retain_before == 0.0 and f.retain_after == 0.5 and f.retain_same == 0.5
    assert math.isnan(presence_figures(["probe"], before, after).concept_before)
