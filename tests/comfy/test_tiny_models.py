"""The tiny SD1.x / SD2.x / SDXL pairs of ``tiny_models`` are what ComfyUI's stock nodes expect of a checkpoint:
CLIPTextEncode's conditioning fits the UNet (SDXL's pooled output and size conditions included) and KSampler runs."""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_sd1_clip, tiny_sd2_clip, tiny_sd15, tiny_sd20, tiny_sdxl, tiny_sdxl_clip

torch.set_num_threads(1)

PAIRS = {
    "SD15": lambda: (tiny_sd15(), tiny_sd1_clip()),
    "SD20": lambda: (tiny_sd20(), tiny_sd2_clip()),
    "SDXL": lambda: (tiny_sdxl(), tiny_sdxl_clip()),
}


@pytest.mark.parametrize("family", sorted(PAIRS))
def test_stock_nodes_sample_each_tiny_pair(comfy, family):
    n = comfy.nodes
    from comfy.model_base import ModelType
    model, clip = PAIRS[family]()
    assert type(model.model.model_config).__name__ == family
    if family == "SD20":
        assert model.model.model_type == ModelType.V_PREDICTION
    with torch.inference_mode():
        (pos,) = n.CLIPTextEncode().encode(clip, "a photo of a cat")
        (neg,) = n.CLIPTextEncode().encode(clip, "")
        assert pos[0][0].shape[-1] == model.model.model_config.unet_config["context_dim"]
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        (out,) = n.KSampler().sample(model, 0, 2, 5.0, "euler", "normal", pos, neg, latent)
    samples = out["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all() and samples.abs().sum() > 0
