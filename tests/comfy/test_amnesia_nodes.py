"""Selective Amnesia nodes in a real ComfyUI, on a tiny SD1.x-structured model built with ComfyUI's classes.

The model and text encoder are built inside ``torch.inference_mode()``, as a checkpoint loader
node builds them, so their parameters are inference tensors as in a real graph.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

FISHER_ID = "CE_SAComputeFisher"
TRAIN_ID = "CE_SALoRATrain"
PROMPTS = "a photo of a cat\na photo of a dog"
REMEMBER = "a house\na tree"

torch.set_num_threads(1)


def _node_classes(comfy) -> dict:
    """Core and pack nodes, plus ComfyUI's LoRA training extras (SaveLoRA, LoraModelLoader)."""
    import comfy_extras.nodes_train as nodes_train

    return {**nodes_train.NODE_CLASS_MAPPINGS, **comfy.nodes.NODE_CLASS_MAPPINGS}


def _probe(model, seed: int = 3) -> torch.Tensor:
    """The model's x0 prediction on a fixed input (loads the model as sampling would, under inference mode as ComfyUI
    runs nodes: a load moves the weights on a GPU)."""
    import comfy.model_management as mm

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    with torch.inference_mode():
        mm.load_models_gpu([model], force_full_load=True)
        device = model.load_device
        out = model.model.apply_model(x.to(device), torch.tensor([1.0, 7.0], device=device), c_crossattn=ctx.to(device))
    return out.to("cpu").clone()


def _fisher(comfy, model, clip, filename="t/fisher", samples=3, k=4, seed=0, **extra):
    node = comfy.nodes.NODE_CLASS_MAPPINGS[FISHER_ID]()
    with torch.inference_mode():
        (path,) = node.compute(model, clip, PROMPTS, samples, k, 3, "xattn", seed, 2, 4.0, "euler", "normal", 64, 64, "fp32",
                               filename, **extra)
    return path


def _train(comfy, model, clip, fisher, run, steps=4, lam=10.0, **extra):
    node = comfy.nodes.NODE_CLASS_MAPPINGS[TRAIN_ID]()
    with torch.inference_mode():
        return node.train(model, clip, "a photo of a cat, a cat", "a photo of a dog", REMEMBER, lam, 1.0, 2, steps, 1e-2, 1, 0,
                          "xattn", 2, 1, 2, 4.0, "euler", "normal", 64, 64, "fp32", run, fisher_path=fisher, **extra)


def _history(comfy, run):
    from safetensors import safe_open

    ckpt = Path(comfy.folder_paths.get_output_directory()) / "selective_amnesia" / run / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        return json.loads(f.metadata()["history"])


@pytest.fixture(scope="module")
def fisher_file(comfy, tiny):
    return _fisher(comfy, *tiny)


def test_compute_fisher_writes_target_fisher(comfy, tiny, fisher_file):
    from sae_core.amnesia.fisher import load_fisher
    from sae_core.amnesia.lora import select_targets

    model, clip = tiny
    path = Path(fisher_file)
    assert path.is_file() and path.parent == comfy.base / "models" / "sae_fisher" / "t"
    f = load_fisher(path)
    assert f.count == 3
    # a float32 model: the identity of estimates made before is unchanged
    assert "gradients" not in json.loads(f.metadata["comfy_settings"])
    want = {f"{n}.weight" for n in select_targets(model.model, "xattn")}
    assert set(f.fisher) == want and len(want) == 28
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in f.fisher.values())
    assert sum(float(v.sum()) for v in f.fisher.values()) > 0
    assert not model.patches and not model.weight_wrapper_patches
    # same settings: the complete file is reused as is
    mtime = path.stat().st_mtime_ns
    assert _fisher(comfy, model, clip) == fisher_file and path.stat().st_mtime_ns == mtime
    assert "t/fisher.safetensors" in comfy.folder_paths.get_filename_list("sae_fisher")


def test_compute_fisher_keeps_a_file_of_other_settings_unless_overwrite(comfy, tiny):
    model, clip = tiny
    path = Path(_fisher(comfy, model, clip, filename="t/kept"))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="seed.*turn on overwrite"):
        _fisher(comfy, model, clip, filename="t/kept", seed=1)
    assert path.read_bytes() == before
    path.write_bytes(b"")  # an unreadable file of that name (e.g. a killed copy) is not replaced silently either
    with pytest.raises(ValueError, match="kept.safetensors"):
        _fisher(comfy, model, clip, filename="t/kept", seed=1)
    assert path.read_bytes() == b""
    assert _fisher(comfy, model, clip, filename="t/kept", seed=1, overwrite=True) == str(path)
    from sae_core.amnesia.fisher import load_fisher

    assert load_fisher(path).count == 3 and load_fisher(path).metadata["seed"] == "1"
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith((".kept", "kept"))) == ["kept.safetensors"]


def test_fishers_whose_names_differ_only_by_a_slash_keep_their_own_samples(comfy, tiny):
    """Compute Fisher's sample sets follow the Fisher's name, sub-folders kept: 'c/f' and 'c_f' used to share one
    cache file, and the second run replaced the first one's samples (also a sample bank)."""
    from sae_core.amnesia.samples import load_samples

    amnesia = comfy.nodes_pkg.amnesia
    model, clip = tiny
    _fisher(comfy, model, clip, filename="c/f", samples=2, seed=0)
    _fisher(comfy, model, clip, filename="c_f", samples=2, seed=1)
    root = amnesia.run_dir(amnesia.FISHER_SAMPLES)
    nested, _ = load_samples(root / "c" / "f.safetensors")
    flat, _ = load_samples(root / "c_f.safetensors")
    assert not torch.equal(nested.samples, flat.samples)  # seeds 0 and 1: each kept its own
    assert {"c/f.safetensors", "c_f.safetensors"} <= set(amnesia.sample_bank_filenames())
    with pytest.raises(ValueError, match="run_name: 'fisher_samples' is the folder of Compute Fisher's samples"):
        _train(comfy, model, clip, None, "fisher_samples", steps=1, lam=0.0)


def test_train_leaves_input_unchanged_and_lora_loads_everywhere(comfy, tiny, fisher_file, caplog):
    import comfy.lora as comfy_lora
    import comfy.sd as comfy_sd
    import safetensors.torch

    model, clip = tiny
    before = _probe(model)
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched, lora, curve = _train(comfy, model, clip, fisher_file, "main")

    # the input MODEL is untouched: same patches (none), same weights, same outputs
    assert not model.patches and not model.weight_wrapper_patches
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())
    assert not any(getattr(m, "weight_function", []) for m in model.model.modules())
    assert torch.equal(_probe(model), before)

    # the output MODEL carries the LoRA as patches and behaves differently
    assert patched is not model and len(patched.patches) == 28
    after = _probe(patched)
    assert not torch.allclose(after, before)
    assert torch.equal(_probe(model), before)  # loading the patched clone did not leak into the input

    # LORA_MODEL: ComfyUI's native keys, one up/down/alpha triple per cross-attention projection
    modules = {k[: -len(".lora_up.weight")] for k in lora if k.endswith(".lora_up.weight")}
    assert len(modules) == 28 and len(lora) == 3 * 28
    assert all(m.startswith("diffusion_model.") and ".attn2.to_" in m for m in modules)
    assert any(lora[f"{m}.lora_up.weight"].abs().sum() > 0 for m in modules)
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and 0 <= float(curve.min()) <= float(curve.max()) <= 1

    # ComfyUI's own loader matches every key (no "not loaded" warnings) and reproduces the node's model
    key_map = comfy_lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        loaded = comfy_lora.load_lora(lora, key_map)
        via_loader, _ = comfy_sd.load_lora_for_models(model, None, lora, 1.0, 0)
    assert len(loaded) == 28
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    torch.testing.assert_close(_probe(via_loader), after, rtol=1e-5, atol=1e-6)

    # LoraModelLoader (LORA_MODEL input) and SaveLoRA -> stock LoraLoader from the loras folder
    (via_lml,) = _node_classes(comfy)["LoraModelLoader"]().load_lora_model(model, lora, 1.0)
    torch.testing.assert_close(_probe(via_lml), after, rtol=1e-5, atol=1e-6)
    _node_classes(comfy)["SaveLoRANode"]().save(lora, "loras/sa_test")
    saved = sorted((comfy.base / "output" / "loras").glob("sa_test*.safetensors"))
    assert saved
    assert set(safetensors.torch.load_file(str(saved[-1]))) == set(lora)
    name = saved[-1].name
    comfy.folder_paths.add_model_folder_path("loras", str(comfy.base / "output" / "loras"))  # as ComfyUI's main.py does
    assert name in comfy.folder_paths.get_filename_list("loras")
    (via_file, _) = comfy.nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)
    torch.testing.assert_close(_probe(via_file), after, rtol=1e-5, atol=1e-6)
    assert torch.equal(_probe(model), before)


def test_training_resumes_after_an_interrupt(comfy, tiny, fisher_file, monkeypatch):
    import comfy.model_management as mm  # binds only ``mm``: the ``comfy`` fixture stays usable

    model, clip = tiny
    _, straight, _ = _train(comfy, model, clip, fisher_file, "straight", steps=4)

    amnesia = comfy.nodes_pkg.amnesia
    calls = {"n": 0}

    def interrupt_during_training():
        calls["n"] += 1
        # two generation polls (surrogate, replay), then one poll per training step: stop before step 3
        if calls["n"] >= 5:
            mm.interrupt_current_processing(True)
            return True
        return False

    monkeypatch.setattr(amnesia, "interrupt_requested", interrupt_during_training)
    with pytest.raises(mm.InterruptProcessingException):
        _train(comfy, model, clip, fisher_file, "resumed", steps=4)
    ckpt = Path(comfy.folder_paths.get_output_directory()) / "selective_amnesia" / "resumed" / "checkpoint.safetensors"
    assert ckpt.is_file()
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        assert f.metadata()["step"] == "2"
    monkeypatch.undo()
    assert not mm.processing_interrupted()
    _, resumed, _ = _train(comfy, model, clip, fisher_file, "resumed", steps=4)
    assert set(resumed) == set(straight)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_replay_target_base_uses_the_wired_model_as_its_own_teacher(comfy, tiny, fisher_file):
    """'base': the replay term starts at 0 (the LoRA is zero, so the student is the wired model);
    'noise' (the reference) starts at the eps-MSE of the replay images; the surrogate half is shared."""
    model, clip = tiny
    before = _probe(model)
    _, lora_base, _ = _train(comfy, model, clip, fisher_file, "target_base", steps=2, replay_target="base")
    _, lora_noise, _ = _train(comfy, model, clip, fisher_file, "target_noise", steps=2, replay_target="noise")
    base, noise = _history(comfy, "target_base"), _history(comfy, "target_noise")
    assert noise[0]["replay"] > 0 and base[0]["replay"] < 1e-6 * noise[0]["replay"]
    assert base[0]["surrogate"] == pytest.approx(noise[0]["surrogate"], rel=1e-5)
    assert base[1]["replay"] > 0  # after one step the LoRA is no longer zero
    assert any(not torch.equal(lora_base[k], lora_noise[k]) for k in lora_base)
    assert torch.equal(_probe(model), before)
    with pytest.raises(ValueError, match="replay_target"):
        _train(comfy, model, clip, fisher_file, "target_bad", steps=1, replay_target="teacher")


def test_lambda_matters_and_fisher_must_cover_targets(comfy, tiny, fisher_file):
    model, clip = tiny
    _, with_ewc, _ = _train(comfy, model, clip, fisher_file, "lam10", steps=3, lam=10.0)
    _, no_ewc, _ = _train(comfy, model, clip, None, "lam0", steps=3, lam=0.0)
    assert any(not torch.equal(with_ewc[k], no_ewc[k]) for k in with_ewc)
    node = comfy.nodes.NODE_CLASS_MAPPINGS[TRAIN_ID]()
    with torch.inference_mode(), pytest.raises(FileNotFoundError, match="fisher_path"):
        node.train(model, clip, "a cat", "a dog", REMEMBER, 5.0, 1.0, 2, 2, 1e-2, 1, 0, "xattn", 2, 1, 2, 4.0, "euler",
                   "normal", 64, 64, "fp32", "nofisher")
    with torch.inference_mode(), pytest.raises(ValueError, match="no Fisher for"):
        node.train(model, clip, "a cat", "a dog", REMEMBER, 5.0, 1.0, 2, 2, 1e-2, 1, 0, "noxattn", 2, 1, 2, 4.0, "euler",
                   "normal", 64, 64, "fp32", "wrongtargets", fisher_path=fisher_file)


def test_node_and_plugin_reach_one_pipeline_with_equal_settings(comfy, tiny, fisher_file, monkeypatch, tmp_path):
    """The LoRA Train node and the MiniCanvas bench plug-in both call
    ``sae_core.amnesia.pipeline.train_forgetting_lora``; equal node inputs and bench options give equal
    settings; and the node's LoRA is exactly what that function returns for the node's arguments."""
    from sae_core.amnesia import pipeline
    from sae_core.amnesia.config import AmnesiaConfig
    from sae_core.amnesia.lora import lora_state_dict
    from sae_core.minicanvas.canvas import MiniCanvas
    from sae_core.minicanvas.plugins import amnesia as plugin

    calls = []
    real = pipeline.train_forgetting_lora

    def spy(host, config, *args, **kwargs):
        calls.append((host, config, args, kwargs))
        return real(host, config, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_forgetting_lora", spy)
    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path))  # the shipped bank and Fisher are used; nothing is written
    model, clip = tiny
    # the values _train gives the node's inputs, as bench options
    shared = dict(lam=10.0, gamma=1.0, rank=2, steps=3, lr=1e-2, batch_size=1, seed=0, targets="xattn", replay_target="base")
    _, lora, _ = _train(comfy, model, clip, fisher_file, "one_pipeline", steps=3, lam=10.0)
    # weight_decay and grad_clip are no node inputs: the node keeps the library's defaults
    plugin.amnesia_method(MiniCanvas.load(judges=False), "style", ["striped"], **shared,
                          weight_decay=AmnesiaConfig.weight_decay, quiet=True)
    (node_host, node_cfg, node_args, node_kw), (plugin_host, plugin_cfg, _, _) = calls
    assert type(node_host).__name__ == "ComfyAmnesiaHost" and isinstance(plugin_host, plugin.CanvasHost)
    assert isinstance(node_cfg, AmnesiaConfig) and isinstance(plugin_cfg, AmnesiaConfig)
    training = ("targets", "rank", "alpha", "steps", "lr", "batch_size", "lam", "gamma", "weight_decay", "grad_clip", "seed",
                "replay_target")
    assert {f: getattr(node_cfg, f) for f in training} == {f: getattr(plugin_cfg, f) for f in training}
    assert {f: getattr(node_cfg, f) for f in shared} == shared
    # a node input and the field it sets carry the same name
    spec = comfy.nodes.NODE_CLASS_MAPPINGS[TRAIN_ID].INPUT_TYPES()
    inputs = set(spec["required"]) | set(spec["optional"])
    assert set(AmnesiaConfig.field_names()) & inputs >= set(shared) | {
        "forget_prompts", "surrogate_prompt", "remember_prompts", "surrogate_samples", "replay_per_prompt", "precision"}
    assert node_cfg.forget_prompts == ("a photo of a cat", "a cat") and node_cfg.remember_prompts == ("a house", "a tree")
    # the node is a thin host: the same call, from scratch, gives its LoRA exactly
    again = real(node_host, node_cfg, *node_args, **{**node_kw, "checkpoint": None, "should_stop": None, "callback": None})
    redo = lora_state_dict(again.adapters)
    assert set(redo) == set(lora)
    assert all(torch.equal(redo[k].detach().float(), lora[k]) for k in lora)


def test_compute_fishers_samples_are_a_sample_bank(comfy, tiny, fisher_file, monkeypatch):
    """The samples Compute Fisher made are listed as a sample bank; LoRA Train takes the first samples of its surrogate
    and remember prompts from them (as the reference replays its Fisher data) and samples nothing."""
    from sae_core.amnesia import pipeline
    from sae_core.amnesia.samples import load_samples

    amnesia = comfy.nodes_pkg.amnesia
    model, clip = tiny
    assert "t/fisher.safetensors" in amnesia.sample_bank_filenames()
    bank, _ = load_samples(amnesia.run_dir(amnesia.FISHER_SAMPLES) / "t" / "fisher.safetensors")
    assert bank.prompts == ["a photo of a cat", "a photo of a dog", "a photo of a cat"]
    seen = []
    real = pipeline.train_forgetting_lora
    monkeypatch.setattr(pipeline, "train_forgetting_lora",
                        lambda host, cfg, surrogate, replay, *a, **k: seen.append((surrogate, replay)) or
                        real(host, cfg, surrogate, replay, *a, **k))
    monkeypatch.setattr(amnesia.ComfyAmnesiaHost, "sample", lambda *a: pytest.fail("a bank run sampled"))
    node = comfy.nodes.NODE_CLASS_MAPPINGS[TRAIN_ID]()
    with torch.inference_mode():
        node.train(model, clip, "a cat", "a photo of a dog", "a photo of a cat", 10.0, 1.0, 2, 2, 1e-2, 1, 0, "xattn", 1, 2,
                   2, 4.0, "euler", "normal", 64, 64, "fp32", "bank", fisher_path=fisher_file,
                   sample_bank="t/fisher.safetensors")
    (surrogate, replay), = seen
    assert surrogate.prompts == ["a photo of a dog"] and torch.equal(surrogate.samples, bank.samples[1:2])
    assert replay.prompts == ["a photo of a cat"] * 2 and torch.equal(replay.samples, bank.samples[[0, 2]])
    with torch.inference_mode(), pytest.raises(ValueError, match="remember_prompts: the sample bank has 0 sample"):
        node.train(model, clip, "a cat", "a photo of a dog", "a house", 10.0, 1.0, 2, 2, 1e-2, 1, 0, "xattn", 1, 1, 2, 4.0,
                   "euler", "normal", 64, 64, "fp32", "bank2", fisher_path=fisher_file, sample_bank="t/fisher.safetensors")


def test_training_twice_survives_the_weight_moves_of_a_gpu(comfy, monkeypatch):
    """On a GPU ComfyUI moves a model's weights (``nn.Module.to``) when it loads the model and when it unloads it. A
    weight made under inference mode (by a loader node) and moved outside inference mode is left with neither the
    inference flag nor a version counter, and any direct use of it fails with 'Inference tensors do not track version
    counter' -- LoRA Train failed so on CUDA after its first run. On the CPU nothing moves, so the moves are made here
    where ComfyUI makes them (load; unload with unpatched weights), by a lossless dtype round trip through the same
    ``Module.to``: Compute Fisher, then two LoRA trainings each followed by sampling, in one process. After every node
    the wired model's weights must still be usable as they are."""
    import comfy.model_patcher as model_patcher
    from tiny_models import tiny_sd1_clip, tiny_sd15

    def move(module):
        module.to(torch.float64)
        module.to(torch.float32)

    real_load, real_unpatch = model_patcher.ModelPatcher.load, model_patcher.ModelPatcher.unpatch_model

    def load(self, *args, **kwargs):  # loading puts the weights on the load device
        out = real_load(self, *args, **kwargs)
        move(self.model)
        return out

    def unpatch_model(self, device_to=None, unpatch_weights=True):  # unloading moves them back to the offload device
        out = real_unpatch(self, device_to, unpatch_weights)
        if device_to is not None and unpatch_weights:
            move(self.model)
        return out

    def usable(model):
        """Use every weight directly (no load that would move it again): a weight without its version counter fails."""
        with torch.no_grad():
            for p in model.model.parameters():
                torch.nn.functional.linear(torch.ones(1, p.shape[-1]), p.reshape(-1, p.shape[-1]))

    with torch.inference_mode():  # as a checkpoint loader node makes them: inference tensors
        model, clip = tiny_sd15(seed=5), tiny_sd1_clip()
    before = _probe(model)
    monkeypatch.setattr(model_patcher.ModelPatcher, "load", load)
    monkeypatch.setattr(model_patcher.ModelPatcher, "unpatch_model", unpatch_model)
    fisher = _fisher(comfy, model, clip, filename="t/moved", samples=2, k=2)
    usable(model)
    outputs = []
    for run in ("moved_1", "moved_2"):
        patched, _, _ = _train(comfy, model, clip, fisher, run, steps=2)
        usable(model)
        outputs.append(_probe(patched))
        with torch.inference_mode():  # the next node samples the erased model
            (latent,) = comfy.nodes.KSampler().sample(patched, 0, 2, 4.0, "euler", "normal",
                                                     *_conds(comfy, clip), {"samples": torch.zeros(1, 4, 8, 8)})
        assert torch.isfinite(latent["samples"]).all()
        usable(model)
    assert torch.equal(outputs[0], outputs[1])  # the same settings (another run folder) train the same LoRA
    assert not torch.allclose(outputs[0], before)
    torch.testing.assert_close(_probe(model), before)  # the input model answers as before


def _conds(comfy, clip):
    encode = comfy.nodes.CLIPTextEncode()
    return encode.encode(clip, "a photo of a cat")[0], encode.encode(clip, "")[0]


def test_unsupported_model_is_refused(comfy):
    """SDXL's structure is accepted (its ADM input is built per prompt); flow sampling (SD3-style) is refused."""
    import comfy.model_patcher as comfy_model_patcher
    import comfy.supported_models as comfy_supported_models
    import comfy_extras.nodes_model_advanced as advanced

    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": 64, "num_classes": "sequential", "in_channels": 4, "model_channels": 32, "num_res_blocks": [1],
        "transformer_depth": [1], "channel_mult": [1], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
        "context_dim": 32, "transformer_depth_output": [1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    cfg = comfy_supported_models.SDXL(unet_config)
    cfg.unet_config["num_heads"] = 2
    cfg.unet_config["num_head_channels"] = -1
    with torch.inference_mode():
        sdxl = comfy_model_patcher.ModelPatcher(cfg.get_model({}, device="meta"), torch.device("cpu"), torch.device("cpu"))
    assert comfy.nodes_pkg.amnesia.check_model(sdxl) is sdxl.get_model_object("model_sampling")
    flow = advanced.ModelSamplingSD3().patch(sdxl, 3.0)[0]
    with pytest.raises(ValueError, match="SD1.x/SD2.x/SDXL"):
        comfy.nodes_pkg.amnesia.check_model(flow)
    with pytest.raises(ValueError, match="SD1.x/SD2.x/SDXL"):
        comfy.nodes_pkg.amnesia.SALoRATrain().train(flow, None, "a cat", "a dog", REMEMBER, 0.0, 1.0, 2, 1, 1e-2, 1, 0, "xattn",
                                                     1, 1, 2, 4.0, "euler", "normal", 64, 64, "fp32", "sdxl")


def test_a_clip_of_another_model_is_refused_before_sampling(comfy, tiny, monkeypatch):
    """An SD1 CLIP on an SDXL model, or a CLIP narrower than the UNet's context, used to stop inside the UNet's first
    sampling step with a shape error; both nodes now name the clip before anything is sampled."""
    import tiny_models

    model, clip = tiny
    amnesia = comfy.nodes_pkg.amnesia
    monkeypatch.setattr(amnesia.ComfyAmnesiaHost, "sample", lambda *a: pytest.fail("sampled before the clip was checked"))
    with torch.inference_mode():
        sdxl, wide = tiny_models.tiny_sdxl(0, 16, 16), tiny_models.tiny_sd15(0, context=48)
    with pytest.raises(ValueError, match=r"clip: its pooled output is 32 wide, which makes a \d+-wide ADM input, but "
                                         r"model \(SDXL\) reads"):
        _fisher(comfy, sdxl, clip, filename="t/mismatch")
    with pytest.raises(ValueError, match=r"clip: its conditioning is 32 wide but model \(BaseModel\) reads 48-wide"):
        _train(comfy, wide, clip, None, "mismatch", lam=0.0)
    assert not (Path(comfy.folder_paths.models_dir) / "sae_fisher" / "t" / "mismatch.safetensors").exists()


def test_a_run_name_in_use_keeps_its_samples(comfy, tiny, monkeypatch):
    """Re-queuing a run name with another surrogate prompt used to sample and overwrite the run's cached samples, then
    refuse its checkpoint: the run's samples were lost. Now the run is refused before anything is sampled and its
    files stay byte for byte; the run itself still continues with its own settings."""
    model, clip = tiny
    _train(comfy, model, clip, None, "kept", steps=2, lam=0.0)
    folder = Path(comfy.folder_paths.get_output_directory()) / "selective_amnesia" / "kept"
    files = {f.name: f.read_bytes() for f in folder.glob("*.safetensors")}
    assert {"surrogate.safetensors", "replay.safetensors", "checkpoint.safetensors"} <= set(files)
    amnesia = comfy.nodes_pkg.amnesia
    monkeypatch.setattr(amnesia.ComfyAmnesiaHost, "sample", lambda *a: pytest.fail("sampled over a kept run"))
    node = comfy.nodes.NODE_CLASS_MAPPINGS[TRAIN_ID]()
    with torch.inference_mode(), pytest.raises(FileExistsError, match=r"surrogate.safetensors holds the samples of the "
                                                                     r"run checkpointed in .*kept/checkpoint"):
        node.train(model, clip, "a photo of a cat, a cat", "a photo of a house", REMEMBER, 0.0, 1.0, 2, 2, 1e-2, 1, 0,
                   "xattn", 2, 1, 2, 4.0, "euler", "normal", 64, 64, "fp32", "kept")
    assert {f.name: f.read_bytes() for f in folder.glob("*.safetensors")} == files
    _train(comfy, model, clip, None, "kept", steps=3, lam=0.0)  # its own settings: resumed from the kept files
    assert len(_history(comfy, "kept")) == 3


def test_contradictory_prompts_and_zero_steps_are_refused(comfy, tiny, monkeypatch):
    """A surrogate prompt that stands in for itself, a forget prompt that is also remembered, or 0 steps used to train
    (or return) a LoRA that forgets nothing; each is now a ValueError naming the input, before any sampling."""
    model, clip = tiny
    amnesia = comfy.nodes_pkg.amnesia
    monkeypatch.setattr(amnesia.ComfyAmnesiaHost, "sample", lambda *a: pytest.fail("sampled"))
    node = comfy.nodes.NODE_CLASS_MAPPINGS[TRAIN_ID]()

    def train(forget, surrogate, remember, steps=2, run="contra"):
        with torch.inference_mode():
            node.train(model, clip, forget, surrogate, remember, 0.0, 1.0, 2, steps, 1e-2, 1, 0, "xattn", 2, 1, 2, 4.0,
                       "euler", "normal", 64, 64, "fp32", run)

    with pytest.raises(ValueError, match="forget_prompts: 'a photo of a dog' is also the surrogate prompt"):
        train("a cat, A Photo of a  dog", "a photo of a dog", REMEMBER)
    with pytest.raises(ValueError, match=r"remember_prompts: \['a house'\] are forget prompts too"):
        train("a cat, a house", "a photo of a dog", REMEMBER)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train("a cat", "a photo of a dog", REMEMBER, steps=0, run="zero")
    assert not (Path(comfy.folder_paths.get_output_directory()) / "selective_amnesia" / "contra").exists()


def test_workflow_matches_the_node_definitions(comfy):
    wf = json.loads((comfy.repo_root / "workflows" / "selective_amnesia.json").read_text())
    mappings = _node_classes(comfy)
    by_id = {n["id"]: n for n in wf["nodes"]}
    assert {FISHER_ID, TRAIN_ID, "CheckpointLoaderSimple", "KSampler", "VAEDecode", "SaveImage"} <= {n["type"] for n in wf["nodes"]}
    for n in wf["nodes"]:
        assert n["type"] in mappings, n["type"]
        spec = mappings[n["type"]].INPUT_TYPES()
        entries = {**spec.get("required", {}), **spec.get("optional", {})}
        sockets = {i["name"] for i in n["inputs"]}
        widgets = []
        for name, entry in entries.items():
            io_type, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            is_widget = isinstance(io_type, list) or (io_type in ("INT", "FLOAT", "STRING", "BOOLEAN") and not opts.get("forceInput"))
            if is_widget and name not in sockets:
                widgets.append((name, io_type, opts))
            elif not is_widget:
                assert name in sockets or name in spec.get("optional", {}), f"{n['type']} lacks socket {name}"
        expected = len(widgets) + sum(1 for _, _, o in widgets if o.get("control_after_generate"))
        assert len(n["widgets_values"]) == expected, (n["type"], n["widgets_values"], [w[0] for w in widgets])
        values = iter(n["widgets_values"])
        for name, io_type, opts in widgets:
            v = next(values)
            if isinstance(io_type, list) and n["type"] != "CheckpointLoaderSimple":
                assert v in io_type, (n["type"], name, v)
            if opts.get("control_after_generate"):
                next(values)
        outs = mappings[n["type"]].RETURN_TYPES
        assert [o["type"] for o in n["outputs"]] == list(outs), n["type"]
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        assert by_id[src]["outputs"][sslot]["type"] == typ and lid in by_id[src]["outputs"][sslot]["links"]
        assert by_id[dst]["inputs"][dslot]["type"] == typ and by_id[dst]["inputs"][dslot]["link"] == lid
    # the graph: checkpoint -> Compute Fisher -> LoRA Train -> KSampler -> VAEDecode -> SaveImage
    edges = {(by_id[s]["type"], by_id[d]["type"]) for _, s, _, d, _, _ in wf["links"]}
    chain = ["CheckpointLoaderSimple", FISHER_ID, TRAIN_ID, "KSampler", "VAEDecode", "SaveImage"]
    assert all((a, b) in edges for a, b in zip(chain, chain[1:])), edges
