"""Erasure Report's judges for models other than MiniCanvas, in a real ComfyUI on a tiny SDXL pair: the zero-shot
CLIP-vision judge (ComfyUI's own CLIP vision model class) and NudeNet (the real package, when installed)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    tiny_clip_vision,
    tiny_sd1_clip,
    tiny_sdxl,
    tiny_sdxl_clip,
    tiny_vae,
)

torch.set_num_threads(1)

CONCEPT = ["a cat on a sofa", "a cat in the grass"]
RETAIN = ["a dog on a sofa"]
LABELS = ["a photo", "a painting"]
COMMON = {"seeds": [0, 1], "concept_kind": "object", "concept": "a cat", "steps": 2, "cfg": 4.0,
          "sampler_name": "euler", "scheduler": "normal", "width": 64, "height": 64}


@pytest.fixture(scope="module")
def sdxl(comfy, tmp_path_factory):
    """(model, clip, vae, clip_vision): the CLIP vision model embeds images 16 wide, as clip_g's pooled output."""
    with torch.inference_mode():
        return tiny_sdxl(), tiny_sdxl_clip(), tiny_vae(), tiny_clip_vision(tmp_path_factory.mktemp("cv"))


def test_clip_vision_judge_scores_every_image_from_comfyui_embeddings(comfy, sdxl):
    from sae_core.judges import zero_shot_verdicts

    model, clip, vae, vision = sdxl
    report = comfy.nodes_pkg.report
    out = report.run_report(model, clip, model, vae, CONCEPT, RETAIN, judge="clip_vision", clip_vision=vision,
                            judge_labels=LABELS, **COMMON)
    assert "judge: CLIP vision zero-shot: 'a cat'" in out.text
    # the judge's verdicts, recomputed from ComfyUI's own image and pooled text embeddings of the images returned
    with torch.inference_mode():
        text = torch.cat([clip.encode_from_tokens(clip.tokenize(n), return_pooled=True)[1] for n in ["a cat", *LABELS]])
        vb, va = (zero_shot_verdicts(vision.encode_image(images, crop=True)["image_embeds"], text, ["a cat", *LABELS])
                  for images in (out.before, out.after))
    for r, row in enumerate(out.rows):
        line = (f"[{row.group}] seed {row.seed}: {row.label}: {vb.label[r]} ({float(vb.score[r]):.2f}) -> "
                f"{va.label[r]} ({float(va.score[r]):.2f})")
        assert line in out.text, (line, out.text)
    # the "erased" model is the original: identical noise gives identical images and verdicts
    assert torch.equal(out.before, out.after)
    fig = out.scores["presence"]
    assert fig.concept_before == fig.concept_after and fig.retain_same == 1.0
    assert out.grid.shape[0] == 1 and out.grid.shape[-1] == 3
    # auto picks the CLIP-vision judge when a CLIP vision model is wired
    auto = report.run_report(model, clip, model, vae, CONCEPT[:1], [], judge="auto", clip_vision=vision,
                             judge_labels=LABELS, **{**COMMON, "seeds": [0]})
    assert "judge: CLIP vision zero-shot" in auto.text


def test_clip_vision_judge_refuses_bad_wiring_before_sampling(comfy, sdxl, monkeypatch):
    model, clip, vae, vision = sdxl
    run = comfy.nodes_pkg.report.run_report
    with pytest.raises(ValueError, match="wire a CLIP_VISION"):
        run(model, clip, model, vae, CONCEPT, RETAIN, judge="clip_vision", **COMMON)
    with pytest.raises(ValueError, match="at least one other label"):
        run(model, clip, model, vae, CONCEPT, RETAIN, judge="clip_vision", clip_vision=vision,
            judge_labels=["a cat"], **COMMON)
    with pytest.raises(ValueError, match="judge must be one of"):
        run(model, clip, model, vae, CONCEPT, RETAIN, judge="q16", **COMMON)
    with torch.inference_mode():
        narrow = tiny_sd1_clip(width=24)  # pooled output 24 wide: not the vision model's space

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the judge was checked")

    monkeypatch.setattr(comfy.nodes_pkg.report, "_sample", no_sampling)
    with pytest.raises(ValueError, match="not one CLIP"):
        run(model, clip, model, vae, CONCEPT, RETAIN, judge="clip_vision", clip_vision=vision,
            judge_labels=LABELS, judge_clip=narrow, **COMMON)


def test_report_node_with_nudenet(comfy, sdxl):
    pytest.importorskip("nudenet")
    model, clip, vae, _ = sdxl
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CE_ErasureReport"]()
    out = node.report(model, clip, model, vae, "\n".join(CONCEPT), "\n".join(RETAIN), "0", "object", "nudity", 2,
                      4.0, "euler", "normal", judge="nudenet", width=64, height=64)
    grid, text = out["result"]
    assert "judge: NudeNet" in text and out["ui"]["text"] == [text]
    assert grid.shape[0] == 1 and grid.shape[-1] == 3


def test_mismatched_models_clips_and_probes_are_refused_before_sampling(comfy, sdxl, monkeypatch):
    """An erased model of another kind, a CLIP of another model, a probe of another width, NaN in the probe, no VAE,
    0 steps or a prompt listed as concept and retain used to stop deep in the UNet or the VAE (shape errors,
    AttributeError) or to return a report of empty or contradictory rows; now each names its input, before sampling."""
    from tiny_models import tiny_sd15

    model, clip, vae, _ = sdxl
    report = comfy.nodes_pkg.report
    monkeypatch.setattr(report, "_sample", lambda *a, **k: pytest.fail("sampled before the inputs were checked"))
    with torch.inference_mode():
        sd1, sd1_clip = tiny_sd15(0, context=32), tiny_sd1_clip(width=32)
    run = report.run_report
    with pytest.raises(ValueError, match=r"clip: its pooled output is 32 wide.*model \(SDXL\) reads"):
        run(model, sd1_clip, model, vae, CONCEPT, RETAIN, **COMMON)  # an SD1 CLIP on SDXL
    with pytest.raises(ValueError, match=r"erased_model: it is a SDXL model \(SDXL latents, 4 channels\), the original a "
                                         r"BaseModel model \(SD15 latents"):
        run(sd1, sd1_clip, model, vae, CONCEPT, RETAIN, **COMMON)  # erased SDXL, original SD1
    with pytest.raises(ValueError, match=r"erased_clip: its conditioning is 24 wide but erased_model"):
        run(sd1, sd1_clip, sd1, vae, CONCEPT, RETAIN, erased_clip=tiny_sd1_clip(width=24), **COMMON)
    with torch.inference_mode():
        mc = comfy.nodes.NODE_CLASS_MAPPINGS["CE_MiniCanvasCheckpoint"]().load(clip_denoised=True)
    with pytest.raises(ValueError, match=r"erased_model: it is a MiniCanvas model \(.*, 3 channels\), the original"):
        run(sd1, sd1_clip, mc[0], vae, CONCEPT, RETAIN, erased_clip=mc[1], **COMMON)
    with pytest.raises(ValueError, match="probe: its conditioning is 24 wide"):
        run(sd1, sd1_clip, sd1, vae, CONCEPT, RETAIN, probe=[[torch.zeros(1, 77, 24), {}]], **COMMON)
    with pytest.raises(ValueError, match="probe: its conditioning holds NaN"):
        run(sd1, sd1_clip, sd1, vae, CONCEPT, RETAIN, probe=[[torch.full((1, 77, 32), float("nan")), {}]], **COMMON)
    with pytest.raises(ValueError, match="probe: expected a CONDITIONING"):
        run(sd1, sd1_clip, sd1, vae, CONCEPT, RETAIN, probe="a cat", **COMMON)
    with pytest.raises(ValueError, match="vae: no VAE is wired"):
        run(sd1, sd1_clip, sd1, None, CONCEPT, RETAIN, **COMMON)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        run(sd1, sd1_clip, sd1, vae, CONCEPT, RETAIN, **{**COMMON, "steps": 0})
    with pytest.raises(ValueError, match=r"retain_prompts: \['a cat on a sofa'\] are concept prompts too"):
        run(sd1, sd1_clip, sd1, vae, CONCEPT, [CONCEPT[0], *RETAIN], **COMMON)
