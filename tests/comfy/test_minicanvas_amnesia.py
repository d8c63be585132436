"""Selective Amnesia LoRA Train on the MiniCanvas Checkpoint, in a real ComfyUI.

The node gets the inputs that reproduce ``python -m sae_core bench --method amnesia``
(``benchmarks/comfy_minicanvas.py`` builds them from the plug-in's recipe and data: ``amnesia_inputs``): the
shipped Fisher and sample bank from the node's own lists, the plug-in's surrogate prompts each paired with its
forget prompt, its replay prompts. Checked here:

* the node trains on exactly the plug-in's data: the same surrogate and replay samples in the same order, the same
  forget prompt for each surrogate sample, the same Fisher;
* a short training through the node follows the plug-in's step for step (loss terms and LoRA factors; the node's
  denoiser goes through ComfyUI's model sampling, so equal to float rounding, not bit for bit);
* 32x32 sampling settings, the shipped files in the lists, and clear errors for a bank without a prompt and for a
  Fisher given twice.

That the node erases (UA through ComfyUI's executor, judged) is tests/comfy/test_minicanvas_erasure.py's.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

TRAIN_ID = "CE_SALoRATrain"
CASES = [("style", "striped"), ("object", "star")]


def node_settings(comfy, mc, inputs):
    """The AmnesiaConfig, Fisher and training data the node makes of ``inputs`` (its own functions, no training)."""
    from sae_core.amnesia import pipeline
    from sae_core.amnesia.config import AmnesiaConfig

    amnesia = comfy.nodes_pkg.amnesia
    keys = ("forget_prompts", "surrogate_prompt", "remember_prompts", "surrogate_samples", "replay_per_prompt", "targets",
            "rank", "steps", "lr", "batch_size", "lam", "gamma", "weight_decay", "seed", "replay_target", "precision")
    settings = AmnesiaConfig(**{k: inputs[k] for k in keys})
    with torch.inference_mode():  # as ComfyUI runs the node
        fisher = amnesia._load_fisher(amnesia._fisher_choice(None, inputs["fisher_file"]))
        bank = amnesia.load_sample_bank(inputs["sample_bank"], mc[0])
    data = pipeline.training_samples(None, settings, bank=bank)
    return settings, fisher, data


@pytest.mark.parametrize("kind,name", CASES)
def test_node_inputs_give_the_plugins_data(comfy, bench_module, mc, kind, name):
    from sae_core.minicanvas import MiniCanvas
    from sae_core.minicanvas.plugins import amnesia as plugin

    inputs = bench_module.amnesia_inputs(kind, [name])
    assert inputs["fisher_file"] in comfy.nodes_pkg.amnesia.fisher_filenames()
    assert inputs["sample_bank"] in comfy.nodes_pkg.amnesia.sample_bank_filenames()
    assert (inputs["width"], inputs["height"]) == (32, 32)
    settings, fisher, data = node_settings(comfy, mc, inputs)

    canvas = MiniCanvas.load(judges=False)
    recipe = plugin.kind_recipe(kind)
    bank = plugin.data_bank(canvas, recipe, progress=False)
    surrogate, forget, replay = plugin.erasure_data(canvas, kind, [name], bank, recipe)
    assert data.surrogate.prompts == surrogate.prompts and torch.equal(data.surrogate.samples, surrogate.samples)
    assert data.replay.prompts == replay.prompts and torch.equal(data.replay.samples, replay.samples)
    assert settings.forget_prompts == {k: tuple(v) for k, v in forget.items()}
    for field in bench_module._AMNESIA_NODE_FIELDS:
        assert getattr(settings, field) == getattr(recipe.settings, field), field
    shipped = plugin.minicanvas_fisher(canvas, bank, recipe, progress=False)
    assert set(fisher) == set(shipped) and all(torch.equal(fisher[k], shipped[k]) for k in shipped)
    # two bank seeds of: the partner style on 8 objects / the partner object in 8 styles and unstyled; the other
    # 64 prompts (style) / 63 prompts (object)
    assert (len(data.surrogate), len(data.replay)) == ((16, 128) if kind == "style" else (18, 126))


def test_a_short_training_through_the_node_follows_the_plugin(comfy, bench_module, mc, monkeypatch, tmp_path):
    """Three steps of the style erasure through the node and through the plug-in: the same loss terms at every step
    and the same LoRA factors (to float rounding: the node's denoiser runs through ComfyUI's model sampling)."""
    from sae_core.amnesia import pipeline
    from sae_core.minicanvas import MiniCanvas
    from sae_core.minicanvas.plugins import amnesia as plugin

    runs = []
    real = pipeline.train_forgetting_lora

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        runs.append(out)
        return out

    monkeypatch.setattr(pipeline, "train_forgetting_lora", spy)
    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path))  # the shipped bank and Fisher are found; nothing is written
    inputs = {**bench_module.amnesia_inputs("style", ["striped"], steps=3), "run_name": "mc_follow"}
    node = comfy.nodes.NODE_CLASS_MAPPINGS[TRAIN_ID]()
    with torch.inference_mode():
        model, lora, _curve = node.train(mc[0], mc[1], **inputs)
    plugin.amnesia_method(MiniCanvas.load(judges=False), "style", ["striped"], steps=3, quiet=True)
    node_run, plugin_run = runs
    assert [r["step"] for r in node_run.result.history] == [1.0, 2.0, 3.0]
    for a, b in zip(node_run.result.history, plugin_run.result.history):
        for term in ("surrogate", "replay", "ewc", "loss"):
            assert a[term] == pytest.approx(b[term], rel=1e-4, abs=1e-9), (a["step"], term)
    prefix = "diffusion_model."
    assert {n[len(prefix):] for n in node_run.adapters} == set(plugin_run.adapters)
    for n, adapter in node_run.adapters.items():
        other = plugin_run.adapters[n[len(prefix):]]
        for part in ("up", "down"):
            a, b = getattr(adapter, part).detach(), getattr(other, part).detach()
            assert float((a - b).norm() / b.norm()) < 1e-3, (n, part)
        assert float(adapter.up.detach().abs().max()) > 1e-3  # trained (up starts at zero)
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))
    assert model is not mc[0] and not mc[0].patches


def test_lists_and_errors(comfy, bench_module, mc):
    amnesia = comfy.nodes_pkg.amnesia
    spec = amnesia.SALoRATrain.INPUT_TYPES()
    assert spec["required"]["width"][1]["min"] <= 32 and spec["required"]["height"][1]["min"] <= 32
    assert "minicanvas/amnesia_fisher_xattn.safetensors" in spec["optional"]["fisher_file"][0]
    assert "minicanvas/amnesia_bank.safetensors" in spec["optional"]["sample_bank"][0]
    assert spec["optional"]["fisher_file"][1]["default"] == "none"
    # the shipped Fisher is also reachable by name through the fisher_path socket
    assert amnesia.resolve_fisher("minicanvas/amnesia_fisher_xattn.safetensors").is_file()
    inputs = {**bench_module.amnesia_inputs("style", ["striped"], steps=1), "run_name": "mc_errors"}
    node = amnesia.SALoRATrain()
    with torch.inference_mode():
        with pytest.raises(ValueError, match="fisher_path is wired and fisher_file"):
            node.train(mc[0], mc[1], **inputs, fisher_path="minicanvas/amnesia_fisher_xattn.safetensors")
        bad = {**inputs, "remember_prompts": inputs["remember_prompts"] + "\nan image of a star in gold style"}
        with pytest.raises(ValueError, match="remember_prompts: the sample bank has 0 sample.*gold style"):
            node.train(mc[0], mc[1], **bad)
        with pytest.raises(ValueError, match="forget_prompts: with 8 surrogate prompts"):
            node.train(mc[0], mc[1], **{**inputs, "forget_prompts": "a\nb"})


def test_compute_fisher_on_minicanvas_covers_the_shipped_fishers_weights(comfy, mc):
    """Compute Fisher runs on the MiniCanvas Checkpoint at 32x32 (two samples, two timesteps: a smoke-sized estimate)
    and covers the weights of the shipped Fisher, shape for shape."""
    from sae_core.amnesia.fisher import load_fisher

    amnesia = comfy.nodes_pkg.amnesia
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CE_SAComputeFisher"]()
    with torch.inference_mode():
        (path,) = node.compute(mc[0], mc[1], "an image of a star in dotted style\nan image of a ring", 2, 2, 2, "xattn", 0,
                               4, 7.0, "ddim", "simple", 32, 32, "fp32", "mc/fisher_smoke")
    made = load_fisher(path).fisher
    shipped = load_fisher(amnesia.resolve_fisher("minicanvas/amnesia_fisher_xattn.safetensors")).fisher
    assert {k: tuple(v.shape) for k, v in made.items()} == {k: tuple(v.shape) for k, v in shipped.items()}
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in made.values())
    assert sum(float(v.sum()) for v in made.values()) > 0
    assert not mc[0].patches and not mc[0].weight_wrapper_patches
