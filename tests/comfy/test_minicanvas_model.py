"""MiniCanvas Checkpoint in a real ComfyUI: its MODEL / CLIP / VAE through stock nodes.

The loader is the pack's registered node class; sampling, LoRA loading and decoding use ComfyUI's own node
classes (CLIPTextEncode, KSampler, SamplerCustomAdvanced, LoraLoader, LoraModelLoader, VAEDecode). The
reference is MiniCanvas' own sampler (``sae_core.minicanvas``) on the same prompts and seed.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

PROMPTS = ("an image of a star in striped style", "an image of a heart in ocean style",
           "an image of a ring in checkered style", "an image of a crescent")
"""Four evaluation prompts (three styled, one unstyled) for the reduced fidelity check."""
STEPS = 10
"""Divides the 1000 training steps: then the simple scheduler hits exactly MiniCanvas' DDIM timesteps."""

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def helpers(comfy):
    return comfy.nodes_pkg.minicanvas


def _sample(comfy, model, clip, vae, prompt: str, seed: int = 0, steps: int = STEPS, batch: int = 1,
            sampler: str = "ddim", scheduler: str = "simple") -> torch.Tensor:
    n = comfy.nodes
    with torch.inference_mode():
        (pos,) = n.CLIPTextEncode().encode(clip, prompt)
        (neg,) = n.CLIPTextEncode().encode(clip, "")
        latent = {"samples": torch.zeros(batch, 3, 32, 32)}
        (out,) = n.KSampler().sample(model, seed, steps, 7.0, sampler, scheduler, pos, neg, latent)
        (image,) = n.VAEDecode().decode(vae, out)
    return image


def test_loader_outputs_make_images_with_stock_nodes(comfy, mc):
    model, clip, vae = mc
    image = _sample(comfy, model, clip, vae, PROMPTS[0], batch=2)
    assert image.shape == (2, 32, 32, 3)
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.05, "the images are flat"
    assert (image[0] - image[1]).abs().mean() > 0.01, "two noise draws gave the same image"


def test_model_reports_family_and_minicanvas_schedule(comfy, mc, canvas, helpers):
    import comfy.model_base

    model, _clip, vae = mc
    assert type(model.model.model_config).__name__ == "MiniCanvas"
    assert helpers.is_minicanvas(model) and helpers.is_minicanvas(model.clone())
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert model.get_model_object("latent_format").latent_channels == 3
    abar = canvas.schedule.alphas_cumprod.double()
    sigmas = model.get_model_object("model_sampling").sigmas.double()
    assert sigmas.shape == abar.shape
    torch.testing.assert_close(1 / (1 + sigmas ** 2), abar, rtol=1e-6, atol=1e-7)  # the same alphas_cumprod
    assert vae.latent_channels == 3 and vae.downscale_ratio == 1


def test_clip_conditioning_is_the_canvas_text_encoding(comfy, mc, canvas):
    _model, clip, _vae = mc
    with torch.inference_mode():
        (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, PROMPTS[0])
        expected = canvas.encode_text([PROMPTS[0]])
        assert cond[0][0].shape == expected.shape == (1, 16, 128)
        torch.testing.assert_close(cond[0][0], expected, rtol=0, atol=1e-6)
        (same,) = comfy.nodes.CLIPTextEncode().encode(clip, "an image of a (star:1.0) in striped style")
        torch.testing.assert_close(same[0][0], expected, rtol=0, atol=1e-6)
        (heavier,) = comfy.nodes.CLIPTextEncode().encode(clip, "an image of a (star:1.5) in striped style")
        assert (heavier[0][0] - expected).abs().max() > 1e-3
        (short,) = comfy.nodes.CLIPSetLastLayer().set_last_layer(clip, -2)
        (penultimate,) = comfy.nodes.CLIPTextEncode().encode(short, PROMPTS[0])
        assert (penultimate[0][0] - expected).abs().max() > 1e-3
        (again,) = comfy.nodes.CLIPTextEncode().encode(clip, PROMPTS[0])
        torch.testing.assert_close(again[0][0], expected, rtol=0, atol=1e-6)


def _hits(canvas, images: torch.Tensor, prompts) -> tuple[int, int]:
    """(object hits, style hits) of the judges on IMAGE rows [N, 32, 32, 3] made from ``prompts``."""
    from sae_core.minicanvas import evaluation_prompts

    specs = {s.text: s for s in evaluation_prompts()}
    labels = [specs[p] for p in prompts]
    pred = canvas.judge(images.movedim(-1, 1))
    objects = sum(int(pred.objects[i]) == s.object_idx for i, s in enumerate(labels))
    styles = sum(int(pred.styles[i]) == s.style_idx for i, s in enumerate(labels) if s.style_idx >= 0)
    return objects, styles


def test_comfy_sampling_reproduces_the_canvas_sampler(comfy, mc, canvas):
    """ddim + simple is MiniCanvas' DDIM step for step; the judges see the prompted concepts as often."""
    model, clip, vae = mc
    ours = torch.cat([_sample(comfy, model, clip, vae, p) for p in PROMPTS])
    ref = canvas.sample(list(PROMPTS), 0, STEPS, 7.0).movedim(1, -1)
    assert (ours - ref).abs().max() < 1e-3
    assert _hits(canvas, ours, PROMPTS) == _hits(canvas, ref, PROMPTS)
    objects, styles = _hits(canvas, ours, PROMPTS)
    assert objects >= 3 and styles >= 2, f"object / style hits {objects}/4, {styles}/3"


def test_other_stock_samplers_and_sampler_custom_advanced(comfy, mc, canvas):
    """Other stock samplers and schedulers (KSampler and the SamplerCustomAdvanced chain) draw the prompts too."""
    import comfy_extras.nodes_custom_sampler as cs

    model, clip, vae = mc
    custom = []
    with torch.inference_mode():
        (neg,) = comfy.nodes.CLIPTextEncode().encode(clip, "")
        (sampler,) = cs.KSamplerSelect().get_sampler("dpmpp_2m")
        (sigmas,) = cs.BasicScheduler().get_sigmas(model, "karras", STEPS, 1.0)
        for prompt in PROMPTS:
            (pos,) = comfy.nodes.CLIPTextEncode().encode(clip, prompt)
            (noise,) = cs.RandomNoise().get_noise(0)
            (guider,) = cs.CFGGuider().get_guider(model, pos, neg, 7.0)
            out, _denoised = cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas,
                                                                {"samples": torch.zeros(1, 3, 32, 32)})
            custom.append(comfy.nodes.VAEDecode().decode(vae, out)[0])
    euler = [_sample(comfy, model, clip, vae, p, sampler="euler", scheduler="normal") for p in PROMPTS]
    for images in (torch.cat(custom), torch.cat(euler)):
        assert images.shape == (4, 32, 32, 3)
        objects, styles = _hits(canvas, images, PROMPTS)
        assert objects >= 3 and styles >= 2, f"object / style hits {objects}/4, {styles}/3"


def _lora_file(comfy, name: str) -> dict:
    """A LoRA on two cross-attention projections, one key in ComfyUI's own naming and one in kohya's."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, (out_f, in_f) in {"diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k": (48, 128),
                               "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_v": (48, 128)}.items():
        sd[f"{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g)
        sd[f"{key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.2
        sd[f"{key}.alpha"] = torch.tensor(4.0)
    folder = comfy.folder_paths.get_folder_paths("loras")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, name))
    comfy.folder_paths.filename_list_cache.pop("loras", None)
    return sd


def test_lora_loader_patches_the_unet_and_leaves_the_input_alone(comfy, mc):
    model, clip, vae = mc
    _lora_file(comfy, "minicanvas_test_lora.safetensors")
    before = _sample(comfy, model, clip, vae, PROMPTS[1])
    loader = comfy.nodes.LoraLoader()
    with torch.inference_mode():
        lora_model, lora_clip = loader.load_lora(model, clip, "minicanvas_test_lora.safetensors", 1.0, 1.0)
        zero_model, zero_clip = loader.load_lora(model, clip, "minicanvas_test_lora.safetensors", 0.0, 0.0)
    assert set(lora_model.patches) == {
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.output_blocks.2.1.transformer_blocks.0.attn2.to_v.weight",
    }
    assert lora_model is not model and not model.patches, "the input MODEL got patches"
    after = _sample(comfy, lora_model, lora_clip, vae, PROMPTS[1])
    assert (after - before).abs().mean() > 0.01, "the LoRA did not change the image"
    torch.testing.assert_close(_sample(comfy, zero_model, zero_clip, vae, PROMPTS[1]), before, rtol=0, atol=1e-6)
    torch.testing.assert_close(_sample(comfy, model, clip, vae, PROMPTS[1]), before, rtol=0, atol=1e-6)


def test_lora_model_loader_takes_comfy_native_keys(comfy, mc):
    from comfy_extras.nodes_train import LoraModelLoader

    model, _clip, _vae = mc
    key = "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k"
    lora = {f"{key}.lora_up.weight": torch.ones(48, 2), f"{key}.lora_down.weight": torch.ones(2, 128),
            f"{key}.alpha": torch.tensor(2.0)}
    with torch.inference_mode():
        (patched,) = LoraModelLoader().load_lora_model(model, lora, 1.0)
    assert set(patched.patches) == {f"{key}.weight"}
    assert not model.patches


def test_layers_are_comfy_ops_and_take_weight_wrappers(comfy, mc):
    """The UNet's and text encoder's layers are ComfyUI's op classes, so weight wrappers (LoRA training) apply."""
    model, clip, vae = mc
    for module in (model.model.diffusion_model, clip.cond_stage_model):
        layers = [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm))]
        assert layers and all(hasattr(m, "weight_function") for m in layers)
    before = _sample(comfy, model, clip, vae, PROMPTS[2])
    wrapped = model.clone()
    wrapped.add_weight_wrapper("diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight",
                               lambda w: -3.0 * w)
    assert (_sample(comfy, wrapped, clip, vae, PROMPTS[2]) - before).abs().mean() > 0.01
    torch.testing.assert_close(_sample(comfy, model, clip, vae, PROMPTS[2]), before, rtol=0, atol=1e-6)
