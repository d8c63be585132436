"""SAeUron Firing Map in a real ComfyUI on the MiniCanvas Checkpoint: after a sampler ran the Concept Block MODEL,
the node gives, per image, where the edit acted (a MASK at the image's size), an overlay and the per-step text."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

STYLE = "checkered"
PROMPTS = ["an image of a star in checkered style", "an image of a heart"]


def call(comfy, node_id: str, **kwargs):
    node = comfy.nodes.NODE_CLASS_MAPPINGS[node_id]()
    out = getattr(node, node.FUNCTION)(**kwargs)
    return out if isinstance(out, dict) else {"result": out}


def concept_block(comfy, mc):
    """Load SAE -> SAeUron Concept Block on the MiniCanvas MODEL with the plug-in's style settings (the shipped
    SAE and statistics), erasing checkered."""
    from sae_core.minicanvas.plugins.saeuron import RECIPE

    settings = RECIPE.style
    percentile = settings.get("percentile")
    (sae,) = call(comfy, "CE_LoadSAE", sae_name="minicanvas/saeuron_style.safetensors", device="cpu",
                   dtype="float32")["result"][:1]
    (model,) = call(comfy, "CE_SAeUronConceptBlock", model=mc[0], sae=sae, block=RECIPE.blocks["style"],
                     concepts=STYLE, gamma=float(settings["gamma"]),
                     selection="top_n" if percentile is None else "percentile", top_n=int(settings["top_n"]),
                     percentile=99.999 if percentile is None else float(percentile),
                     error_mode=str(settings.get("error_mode", "conventional")),
                     cond_only=bool(settings.get("cond_only", False)),
                     features_file="minicanvas/saeuron_style.safetensors")["result"][:1]
    return model


def _sample(comfy, model, clip, vae, prompt: str, steps: int = 10):
    n = comfy.nodes
    with torch.inference_mode():
        (pos,) = n.CLIPTextEncode().encode(clip, prompt)
        (neg,) = n.CLIPTextEncode().encode(clip, "")
        latent = {"samples": torch.zeros(1, 3, 32, 32)}
        (out,) = n.KSampler().sample(model, 0, steps, 7.0, "ddim", "simple", pos, neg, latent)
        (image,) = n.VAEDecode().decode(vae, out)
    return image


def test_firing_map_shows_where_the_style_was_edited(comfy, mc):
    model = concept_block(comfy, mc)
    node = "CE_SAeUronFiringMap"
    with pytest.raises(ValueError, match="no sampling run"):
        call(comfy, node, model=model, images=torch.zeros(1, 32, 32, 3))
    with pytest.raises(ValueError, match="carries no SAeUron"):
        call(comfy, node, model=mc[0], images=torch.zeros(1, 32, 32, 3))
    maps = {}
    for prompt in PROMPTS:
        image = _sample(comfy, model, mc[1], mc[2], prompt)
        out = call(comfy, node, model=model, images=image)
        mask, over, text = out["result"]
        assert out["ui"]["text"] == [text] and "10 steps" in text and "selected latents" in text
        assert mask.shape == (1, 32, 32) and over.shape == image.shape
        assert float(mask.min()) >= 0 and float(mask.max()) <= 1
        maps[prompt] = mask
    # the checkered prompt is edited over much of the picture in most steps, the unstyled one far less
    assert maps[PROMPTS[0]].mean() > 0.3 and maps[PROMPTS[0]].mean() > 2 * maps[PROMPTS[1]].mean(), \
        {p: float(m.mean()) for p, m in maps.items()}
    with pytest.raises(ValueError, match="prompted row"):
        call(comfy, node, model=model, images=torch.zeros(2, 32, 32, 3))


def test_firing_map_of_stacked_blocks_covers_every_block(comfy, mc):
    """A style block and an object block on one MODEL: the map reports both blocks, and a position counts as edited
    as often as the block that edited it most (it used to show the last block applied only)."""
    from sae_core.minicanvas.plugins.saeuron import RECIPE
    from sae_core.saeuron.firing import upsample_mask

    styled = concept_block(comfy, mc)
    (sae,) = call(comfy, "CE_LoadSAE", sae_name="minicanvas/saeuron_object.safetensors", device="cpu",
                   dtype="float32")["result"][:1]
    (both,) = call(comfy, "CE_SAeUronConceptBlock", model=styled, sae=sae, block=RECIPE.blocks["object"],
                    concepts="star", gamma=float(RECIPE.object["gamma"]), selection="top_n",
                    top_n=int(RECIPE.object["top_n"]), percentile=99.999, error_mode="conventional", cond_only=False,
                    features_file="minicanvas/saeuron_object.safetensors")["result"][:1]
    image = _sample(comfy, both, mc[1], mc[2], PROMPTS[0])
    mask, _, text = call(comfy, "CE_SAeUronFiringMap", model=both, images=image)["result"]
    patches = comfy.nodes_pkg.saeuron.concept_patches(both)
    assert [p.block for p in patches] == [RECIPE.blocks["style"], RECIPE.blocks["object"]]
    assert all(f"{p.block}: " in text for p in patches)
    each = [upsample_mask(p.record.heatmap(), 32, 32) for p in patches]
    assert torch.equal(mask, torch.maximum(*each))
    assert not torch.equal(mask, each[-1])  # the style block's edits count too
