"""RECE Edit Model, Save Edit as LoRA and ItD Prompt Classifier on the MiniCanvas Checkpoint, in a real ComfyUI.

The nodes get the inputs that reproduce ``python -m sae_core bench`` (``benchmarks/comfy_minicanvas.py`` builds
them from the MiniCanvas plug-ins' own settings: ``rece_inputs``, ``itd_inputs``). Checked here:

* the nodes compute what the plug-ins compute (RECE / UCE deltas, ItD features and threshold), with MiniCanvas'
  16-token prompts;
* Save Edit as LoRA writes a file the stock LoraLoader reloads onto the MiniCanvas MODEL with the edit's effect;
* ItD changes a flagged prompt's conditioning and leaves an unrelated prompt's (and the empty prompt's)
  bit-exact.

That the nodes erase (UA through ComfyUI's executor, judged) is tests/comfy/test_minicanvas_erasure.py's.
"""

from __future__ import annotations

import pytest
import torch

from sae_core.minicanvas.data import OBJECTS, prompt_for

torch.set_num_threads(1)

STYLE, OBJECT = "striped", "star"
"""The concepts erased here (one style, one object)."""


@pytest.fixture(scope="module")
def itd_sae():
    """The ItD SAE shipped with MiniCanvas, read directly (the file Load SAE lists as minicanvas/itd_text)."""
    from sae_core.formats import load_sae
    from sae_core.minicanvas.files import WEIGHTS_DIR

    return load_sae(WEIGHTS_DIR / "itd_text_sae.safetensors").eval().requires_grad_(False)


def sample(comfy, mc, model, clip, prompts) -> torch.Tensor:
    """Images ``[N, 3, 32, 32]`` of ``prompts`` through CLIPTextEncode / KSampler / VAEDecode (bench settings)."""
    with torch.inference_mode():
        return comfy.nodes_pkg.minicanvas.sample_prompts(model, clip, mc[2], list(prompts), seed=0, steps=20,
                                                         cfg=7.0).movedim(-1, 1)


def rece_edit(comfy, bench_module, mc, kind: str, name: str, method: str = "rece"):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CE_RECEEditModel"]()
    with torch.inference_mode():
        return node.edit(mc[0], mc[1], **bench_module.rece_inputs(kind, [name], method))


def itd_clip(comfy, bench_module, mc, sae, kind: str, name: str):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CE_ItDPromptClassifier"]()
    with torch.inference_mode():
        return node.classify(mc[1], sae, **bench_module.itd_inputs(kind, [name]))["result"][:2]  # clip, report


# ---------------------------------------------------------------------------------------------
# the nodes compute what the bench computes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,kind,name", [("rece", "style", STYLE), ("rece", "object", OBJECT),
                                              ("uce", "style", STYLE)])
def test_rece_node_gives_the_plugin_deltas(comfy, bench_module, mc, canvas, method, kind, name):
    """RECE Edit Model on the MiniCanvas MODEL / CLIP, with the inputs of the bench's settings, computes the
    plug-in's deltas (16-token prompts: UCE's last-word alignment needs each text's real-token count)."""
    from sae_core.minicanvas.plugins import rece as plugin

    settings, _ = plugin.canvas_settings(canvas, kind, [name], method,
                                         **plugin.method_options(canvas, kind, method, {}))
    ref = plugin.rece_canvas_edit(canvas, settings).result.deltas
    _patched, edit = rece_edit(comfy, bench_module, mc, kind, name, method)
    meta = edit.metadata
    assert meta["model_family"] == "MiniCanvas" and meta["context_dim"] == 128
    assert meta["concepts"] == list(settings.concepts) and meta["anchor"] == settings.anchor
    assert meta["preserve"] == settings.preserve_texts and meta["epochs"] == settings.rece_epochs
    assert sorted(edit.deltas) == sorted("diffusion_model." + k for k in ref)
    for key, delta in ref.items():
        ours = edit.deltas["diffusion_model." + key]
        assert float(delta.abs().max()) > 0
        torch.testing.assert_close(ours, delta.float(), rtol=0, atol=1e-4 * float(delta.abs().max()))


def test_clip_text_reads_the_chunk_length_from_the_tokenizer(comfy, mc, canvas):
    clip_text = comfy.nodes_pkg.clip_text
    texts = ["an image of a star in striped style", "", "an image of a"]
    with torch.inference_mode():
        enc, counts = clip_text.encode_first_chunks(mc[1], texts, "test")
    assert enc.shape == (3, 16, 128)
    assert counts == canvas.tokenize(texts).attention_mask.sum(1).tolist() == [10, 2, 6]
    torch.testing.assert_close(enc, canvas.encode_text(texts).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,name", [("style", STYLE), ("object", OBJECT)])
def test_itd_node_gives_the_plugin_classifier(comfy, bench_module, mc, canvas, itd_sae, kind, name):
    """ItD Prompt Classifier on the MiniCanvas CLIP selects the plug-in's features and threshold."""
    from sae_core.minicanvas.plugins import itd as plugin

    settings = plugin.canvas_settings(kind, [name], 2)
    ref = plugin.build_canvas_concepts(canvas, itd_sae, kind, settings).concepts
    patched, report = itd_clip(comfy, bench_module, mc, itd_sae, kind, name)
    patch = patched.patcher.object_patches["minicanvas.text_model.encoder.layers.2.forward"]
    found = patch.concepts
    assert "MiniCanvas minicanvas layer 2" in report and found.pad_to == 16
    assert torch.equal(found.features, ref.features) and found.features.numel() > 0
    assert found.tau == pytest.approx(ref.tau, rel=1e-5) and found.scale == ref.scale
    assert mc[1].patcher.object_patches == {}  # the input CLIP is not changed


# ---------------------------------------------------------------------------------------------
# ItD: flagged prompts only
# ---------------------------------------------------------------------------------------------


def test_itd_changes_flagged_prompts_only(comfy, bench_module, mc, itd_sae):
    clip = mc[1]
    patched, _ = itd_clip(comfy, bench_module, mc, itd_sae, "style", STYLE)
    patch = patched.patcher.object_patches["minicanvas.text_model.encoder.layers.2.forward"]

    def encode(clip, text):
        with torch.inference_mode():
            return clip.encode_from_tokens(clip.tokenize(text)).clone()

    flagged = "an image of a heart in striped style"
    assert not torch.equal(encode(clip, flagged), encode(patched, flagged))
    assert patch.last.prompts == [flagged] and bool(patch.last.detected[0])
    for text in ("an image of a heart in dotted style", "an image of a ring", ""):
        assert torch.equal(encode(clip, text), encode(patched, text)), text
        assert not bool(patch.last.detected[0]), text
    # a weighted prompt adds the empty row; only the prompt's own row is classified
    encode(patched, "an image of a (heart:1.2) in striped style")
    assert len(patch.last.prompts) == 1 and bool(patch.last.detected[0])


# ---------------------------------------------------------------------------------------------
# Save Edit as LoRA -> stock LoraLoader
# ---------------------------------------------------------------------------------------------


def test_saved_lora_reproduces_the_edit(comfy, bench_module, mc):
    model, clip, _vae = mc
    edited, edit = rece_edit(comfy, bench_module, mc, "object", OBJECT)
    saver = comfy.nodes.NODE_CLASS_MAPPINGS["CE_SaveEditAsLoRA"]()
    out = saver.save(edit, "minicanvas/rece_star")
    sd, name = out["result"]
    assert name in comfy.folder_paths.get_filename_list("loras")
    assert all(k.startswith("diffusion_model.") for k in sd)

    loader = comfy.nodes.NODE_CLASS_MAPPINGS["LoraLoader"]()
    with torch.inference_mode():
        lora_model, lora_clip = loader.load_lora(model, clip, name, 1.0, 1.0)
    assert sorted(lora_model.patches) == sorted(edit.deltas)  # every edited weight, nothing else
    assert not model.patches  # the stock loader patched a clone
    prompts = [prompt_for(OBJECTS.index(OBJECT), 2), prompt_for(OBJECTS.index(OBJECT), None), prompt_for(0, 3)]
    want, got = sample(comfy, mc, edited, clip, prompts), sample(comfy, mc, lora_model, lora_clip, prompts)
    base = sample(comfy, mc, model, clip, prompts[:1])
    assert (want - got).abs().max() < 2e-3
    assert (want[:1] - base).abs().max() > 0.1  # the edit changes the star's image
