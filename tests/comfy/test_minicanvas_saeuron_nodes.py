"""SAeUron and SAE nodes on the MiniCanvas MODEL / CLIP in a real ComfyUI.

* the model family helper (``nodes/families.py``) names MiniCanvas and the SD families and sizes latents;
* Load SAE lists the SAEs that ship with MiniCanvas, and the SAeUron features dropdown their statistics;
* Collect SAE Activations -> Train SAE -> SAeUron Concept Features -> SAeUron Concept Block run on MiniCanvas'
  blocks at 32x32 pixels;
* the Concept Block with the shipped SAE and statistics and the plug-in's settings makes the images the
  MiniCanvas plug-in (``python -m sae_core bench --method saeuron``) makes.

``mc`` (the MiniCanvas Checkpoint's outputs) and ``canvas`` (MiniCanvas itself) come from conftest.py.
"""

from __future__ import annotations

import pytest
import torch

STYLE_BLOCK = "output_blocks.3.1"
SAMPLING = dict(steps=3, cfg=7.0, seed=0, sampler_name="ddim", scheduler="simple", width=32, height=32)

torch.set_num_threads(1)


def _node(comfy, node_id):
    return comfy.nodes.NODE_CLASS_MAPPINGS[node_id]()


def _sample(comfy, model, clip, vae, prompt: str, steps: int = 20) -> torch.Tensor:
    n = comfy.nodes
    with torch.inference_mode():
        (pos,) = n.CLIPTextEncode().encode(clip, prompt)
        (neg,) = n.CLIPTextEncode().encode(clip, "")
        (out,) = n.KSampler().sample(model, 0, steps, 7.0, "ddim", "simple", pos, neg,
                                     {"samples": torch.zeros(1, 3, 32, 32)})
        (image,) = n.VAEDecode().decode(vae, out)
    return image


def test_family_helper_names_minicanvas_and_sd(comfy, mc, tiny):
    families = comfy.nodes_pkg.families
    model, _clip, _vae = mc
    sd, _ = tiny
    assert families.model_family(model) == families.MINICANVAS == "MiniCanvas"
    assert families.model_family(sd) == "SD15"
    assert families.is_minicanvas(model) and families.is_minicanvas(model.clone()) and not families.is_minicanvas(sd)
    assert families.latent_downscale(model) == 1 and families.latent_downscale(sd) == 8
    assert families.in_family(sd, families.SD_FAMILIES) and not families.in_family(model, families.SD_FAMILIES)
    assert families.require_family(model, ("SD15", "MiniCanvas"), "X works on") == "MiniCanvas"
    with pytest.raises(ValueError, match=r"X works on SD15 or SDXL models; this model is MiniCanvas"):
        families.require_family(model, ("SD15", "SDXL"), "X works on")


def test_subclass_of_a_supported_config_counts(comfy, tiny):
    """An SD1.5 fine-tune's own config class (a subclass of SD15) is in the SD15 family."""
    families = comfy.nodes_pkg.families
    sd, _ = tiny
    clone = sd.clone()
    config = clone.model.model_config
    derived = type("MyFinetune", (type(config),), {})
    original = config.__class__
    try:
        config.__class__ = derived
        assert families.model_family(clone) == "MyFinetune"
        assert families.in_family(clone, ("SD15",)) and not families.in_family(clone, ("SDXL",))
    finally:
        config.__class__ = original


def test_blocks_are_found_by_family(comfy, mc, canvas):
    """MiniCanvas' transformer blocks under their UNet names, the ones the MiniCanvas plug-ins hook."""
    blocks = comfy.nodes_pkg.unet_blocks
    model, _clip, _vae = mc
    assert list(blocks.spatial_transformer_blocks(model)) == canvas.hook_points()
    ref = blocks.find_block(model, "diffusion_model." + STYLE_BLOCK)
    assert ref.name == STYLE_BLOCK and ref.width == 48
    with pytest.raises(ValueError, match="not a SpatialTransformer block of this MiniCanvas UNet"):
        blocks.find_block(model, "output_blocks.3.0")


def test_load_sae_lists_the_shipped_saes_and_features(comfy):
    common, folders = comfy.nodes_pkg.common, comfy.nodes_pkg.folders
    names = common.sae_filenames()
    shipped = ["minicanvas/saeuron_style.safetensors", "minicanvas/saeuron_object.safetensors",
               "minicanvas/itd_text.safetensors"]
    assert names[:3] == shipped
    assert not [n for n in names if n.startswith("minicanvas/") and n not in shipped], names
    spec = _node(comfy, "CE_LoadSAE").INPUT_TYPES()["required"]["sae_name"][0]
    assert spec[:3] == shipped
    features = folders.feature_filenames()
    assert features[:3] == ["none", "minicanvas/saeuron_style.safetensors", "minicanvas/saeuron_object.safetensors"]
    block_spec = _node(comfy, "CE_SAeUronConceptBlock").INPUT_TYPES()["optional"]["features_file"][0]
    assert block_spec == features
    with pytest.raises(FileNotFoundError, match="minicanvas/minicanvas.safetensors"):
        common.sae_full_path("minicanvas/minicanvas.safetensors")

    with torch.inference_mode():
        (style,) = _node(comfy, "CE_LoadSAE").load("minicanvas/saeuron_style.safetensors", "cpu", "float32")
        (obj,) = _node(comfy, "CE_LoadSAE").load("minicanvas/saeuron_object.safetensors", "cpu", "float32")
        (text,) = _node(comfy, "CE_LoadSAE").load("minicanvas/itd_text.safetensors", "cpu", "float32")
    assert (style.cfg.hookpoint, obj.cfg.hookpoint) == (STYLE_BLOCK, "output_blocks.2.1")
    assert style.cfg.d_in == obj.cfg.d_in == 48 and text.cfg.d_in == 128
    stats = comfy.nodes_pkg.saeuron.load_features(None, "minicanvas/saeuron_object.safetensors")
    assert stats.hookpoint == "output_blocks.2.1" and "star" in stats.concepts


def test_sae_pipeline_runs_on_minicanvas(comfy, mc):
    """Collect -> Train -> Concept Features -> Concept Block on MiniCanvas' style block, at 32x32 pixels."""
    from sae_core.store import ActivationReader

    model, clip, vae = mc
    prompts = "an image of a star in striped style\nan image of a ring in ocean style"
    with torch.inference_mode():
        (folder,) = _node(comfy, "CE_CollectSAEActivations").collect(
            model, clip, prompts=prompts, block=STYLE_BLOCK, **SAMPLING, branch="cond",
            dataset_name="mc_test/acts", store_dtype="float32", overwrite=False)
    reader = ActivationReader(folder)
    assert reader.d == 48 and len(reader) == 2 * SAMPLING["steps"] * 16 * 16  # 16x16 tokens at that block
    assert reader.attrs["model_family"] == "MiniCanvas" and reader.attrs["hookpoint"] == STYLE_BLOCK

    with torch.inference_mode():
        sae, _path = _node(comfy, "CE_TrainSAE").train(
            folder, expansion_factor=2, num_latents=0, k=4, steps=20, lr=1e-2, batch_size=64, seed=0,
            filename="mc_test/sae", overwrite=False, dead_feature_threshold=10_000, device="cpu")
    assert sae.cfg.d_in == 48 and sae.cfg.model_family == "MiniCanvas"

    with torch.inference_mode():
        stats, _ = _node(comfy, "CE_SAeUronConceptFeatures").gather(
            model, clip, sae, block=STYLE_BLOCK,
            concept_prompts="striped: an image of a star in striped style\nocean: an image of a ring in ocean style",
            other_prompts="an image of a heart", **SAMPLING, branch="cond", filename="mc_test/features")
        (patched,) = _node(comfy, "CE_SAeUronConceptBlock").patch(
            model, sae, block=STYLE_BLOCK, concepts="striped", gamma=-8.0, selection="top_n", top_n=4,
            percentile=99.999, error_mode="conventional", cond_only=False, features=stats)
    assert stats.concepts == ["striped", "ocean", "other"] and stats.num_steps == SAMPLING["steps"]
    before = _sample(comfy, model, clip, vae, "an image of a star in striped style", steps=SAMPLING["steps"])
    after = _sample(comfy, patched, clip, vae, "an image of a star in striped style", steps=SAMPLING["steps"])
    again = _sample(comfy, model, clip, vae, "an image of a star in striped style", steps=SAMPLING["steps"])
    assert (after - before).abs().max() > 1e-2, "the Concept Block did not change the image"
    torch.testing.assert_close(again, before, rtol=0, atol=0)  # the input MODEL is untouched


@pytest.mark.parametrize("kind,concept,prompt", [
    ("style", "striped", "an image of a heart in striped style"),
    ("object", "star", "an image of a star in pastel style"),
])
def test_concept_block_makes_the_plugin_images(comfy, mc, canvas, kind, concept, prompt):
    """Shipped SAE + statistics with the plug-in's defaults: the node path and the bench's plug-in draw the same
    image (ComfyUI's ddim/simple at 20 steps is MiniCanvas' DDIM sampler step for step)."""
    from sae_core.minicanvas.plugins.saeuron import RECIPE, saeuron_factory

    model, clip, vae = mc
    settings = RECIPE.style if kind == "style" else RECIPE.object
    with torch.inference_mode():
        (sae,) = _node(comfy, "CE_LoadSAE").load(f"minicanvas/saeuron_{kind}.safetensors", "cpu", "float32")
        (patched,) = _node(comfy, "CE_SAeUronConceptBlock").patch(
            model, sae, block=RECIPE.blocks[kind], concepts=concept, gamma=settings["gamma"], selection="top_n",
            top_n=settings["top_n"], percentile=99.999, error_mode="conventional", cond_only=False,
            features_file=f"minicanvas/saeuron_{kind}.safetensors")
    ours = _sample(comfy, patched, clip, vae, prompt)
    ref = saeuron_factory(canvas, kind, [concept]).sample([prompt], 0, 20, 7.0).movedim(1, -1)
    base = canvas.sample([prompt], 0, 20, 7.0).movedim(1, -1)
    assert (ref - base).abs().max() > 0.1, "the plug-in's edit should change this image"
    assert (ours - ref).abs().max() < 1e-3


def test_sizes_and_clips_that_do_not_fit_are_clear_errors(comfy, mc, tiny):
    """MiniCanvas halves the image twice: a size that is no multiple of 4 is refused by name (it failed deep inside
    the UNet's skip concatenation); a CLIP of another model is refused before sampling (a matrix shape error)."""
    model, clip, _vae = mc
    sd, sd_clip = tiny
    collect = _node(comfy, "CE_CollectSAEActivations").collect
    args = dict(prompts="an image of a star", block=STYLE_BLOCK, **SAMPLING, branch="cond", store_dtype="float32",
                overwrite=False)
    with torch.inference_mode():
        for size in (30, 9):
            with pytest.raises(ValueError, match=f"MiniUNet: height and width must be multiples of 4 pixels.*got "
                                                 f"{size}x{size}"):
                collect(model, clip, **{**args, "width": size, "height": size}, dataset_name=f"mc_sizes/{size}")
        with pytest.raises(ValueError, match=r"clip: its conditioning is 32 wide but model \(\w+\) reads 128-wide"):
            collect(model, sd_clip, **args, dataset_name="mc_sizes/sd_clip")
        with pytest.raises(ValueError, match=r"clip: its conditioning is 128 wide but model \(\w+\) reads 32-wide"):
            collect(sd, clip, **{**args, "block": "output_blocks.1.1", "width": 64, "height": 64},
                    dataset_name="mc_sizes/mc_clip")
    assert not (comfy.base / "output" / "sae_activations" / "mc_sizes" / "sd_clip").exists()
