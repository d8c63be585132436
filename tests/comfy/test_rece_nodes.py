"""RECE Edit Model and Save Edit as LoRA in a real ComfyUI, on tiny models built with ComfyUI's own classes.

The UNets are SD1.x / SD2.x / SDXL-structured (``comfy.supported_models`` configs with tiny channel counts; the
shared builders of ``tiny_models``) with random weights; the text encoders are ComfyUI's CLIP classes with small
configs and the shipped tokenizers. Models are built inside ``torch.inference_mode()`` as a checkpoint loader
builds them. SDXL's pooled text input and SD2.x's v-prediction have their own tests in ``test_rece_sdxl.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import tiny_models
import torch
from plot_pixels import mask

EDIT_ID = "CE_RECEEditModel"
SAVE_ID = "CE_SaveEditAsLoRA"
CONCEPTS = "a cat, a dog"
PRESERVE = "a house\na tree"
CTX = 32
"""Context width of the SD2 / SDXL test models."""
WIDE = 256
"""Context width of the SD1 test model: wide enough for a one-concept UCE edit (75 token rows) to be stored as
low-rank LoRA factors rather than as a whole weight difference."""

torch.set_num_threads(1)


def tiny_sd15(seed: int = 0):
    """SD1.5's UNet class at 128 channels, reading the WIDE context."""
    return tiny_models.tiny_sd15(seed, context=WIDE, channels=128)


def tiny_sd1_clip(width: int = WIDE):
    return tiny_models.tiny_sd1_clip(width)


def tiny_sd20(seed: int = 0):
    """SD2.x's UNet class (linear transformer projections, v-prediction) reading the CTX context."""
    return tiny_models.tiny_sd20(seed, context=CTX)


def tiny_sd2_clip():
    return tiny_models.tiny_sd2_clip(CTX)


def tiny_sdxl(seed: int = 0):
    """SDXL's UNet class: context clip_l + clip_g = CTX, ADM input = clip_g's pooled width + the size embeddings."""
    return tiny_models.tiny_sdxl(seed, clip_l=CTX // 2, clip_g=CTX // 2)


def tiny_sdxl_clip():
    return tiny_models.tiny_sdxl_clip(CTX // 2, CTX // 2)


def _probe(model, seed: int = 3, width: int = WIDE) -> torch.Tensor:
    """The model's x0 prediction on a fixed input (loads the model as sampling does)."""
    import comfy.model_management as mm

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, width, generator=g)
    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device  # the GPU under COMFYUI_DEVICE=gpu
    with torch.no_grad():
        out = model.model.apply_model(x.to(device), torch.tensor([1.0, 7.0], device=device), c_crossattn=ctx.to(device))
    return out.to("cpu").clone()


def _loaded_weights(model) -> dict[str, torch.Tensor]:
    """The weights ComfyUI computes for ``model`` when it loads it (its patches applied)."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def _kv_keys(model) -> list[str]:
    return [k for k in model.model.state_dict() if ".attn2.to_k.weight" in k or ".attn2.to_v.weight" in k]


def _run(comfy, model, clip, concepts=CONCEPTS, method="rece", epochs=1, lambda_reg=1e-3, anchor="", **advanced):
    node = comfy.nodes.NODE_CLASS_MAPPINGS[EDIT_ID]()
    with torch.inference_mode():
        return node.edit(model, clip, concepts, anchor, PRESERVE, method, epochs, lambda_reg, device="cpu", **advanced)


def split(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]


def _save(comfy, edit, prefix="rece_test/erased"):
    node = comfy.nodes.NODE_CLASS_MAPPINGS[SAVE_ID]()
    with torch.inference_mode():
        return node.save(edit, prefix)


@pytest.fixture(scope="module")
def tiny(comfy):
    with torch.inference_mode():
        return tiny_sd15(), tiny_sd1_clip()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_edit_patches_a_clone_and_leaves_the_input_alone(comfy, tiny):
    model, clip = tiny
    before = _probe(model)
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched, edit = _run(comfy, model, clip)

    # the input MODEL is untouched: no patches, same weights, same outputs
    assert patched is not model and not model.patches
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())
    assert torch.equal(_probe(model), before)

    # the clone carries one patch per attn2 to_k/to_v (7 attention blocks here), nothing else: the patches
    # ComfyUI's LoRA loader makes of the edit's LoRA (304 erase rows >= the 256-wide context: whole differences)
    keys = _kv_keys(model)
    assert len(keys) == 14 and set(patched.patches) == set(keys) == set(edit.deltas)
    assert all(len(p) == 1 and p[0][1][0] == "diff" for p in patched.patches.values())
    assert all(edit.deltas[k].abs().max() > 0 for k in keys)
    assert edit.metadata["pooled"] is None and "no pooled text vector" in edit.metadata["pooled_note"]

    # its effective weights are base + delta, and it samples differently
    loaded = _loaded_weights(patched)
    for k, v in loaded.items():
        want = state[k] + edit.deltas[k] if k in edit.deltas else state[k]
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(_probe(patched), before)
    assert torch.equal(_probe(model), before)  # loading the clone did not leak into the input

    # the edit: exact low-rank factors (rank <= erase rows), description
    meta = edit.metadata
    assert meta["model_family"] == "SD15" and meta["context_dim"] == WIDE and meta["concepts"] == ["a cat", "a dog"]
    assert meta["preserve"] == ["", "a house", "a tree"] and meta["method"] == "rece" and meta["epochs"] == 1
    # UCE rows: 77 - (last word index) per concept ("a cat": 2 words -> 75); RECE: 77 per concept and epoch
    bound = 2 * 75 + 2 * 77
    for k in keys:
        up, down = edit.factors[k]
        assert down.shape[0] == min(bound, WIDE)
        assert _rel(up @ down, edit.deltas[k]) < 1e-5


def test_change_plot_has_a_bar_per_edited_weight(comfy, tiny):
    """The IMAGE output appended last (saved workflows link outputs by index): one to_k and one to_v bar per attn2
    layer, rows in UNet order, each bar as long as its layer's relative change; no pooled row on SD1.x."""
    from plot_pixels import as_array, bar_lengths

    from sae_core.plots import SERIES_COLOURS

    model, clip = tiny
    node = comfy.nodes.NODE_CLASS_MAPPINGS[EDIT_ID]()
    assert node.RETURN_TYPES[-1] == "IMAGE" and node.RETURN_NAMES[-1] == "change_plot"
    assert len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES) == 5
    with torch.inference_mode():
        out = node.run(model, clip, "a cat", "", PRESERVE, "uce", 0, 1e-3, device="cpu")
    edit, chart = out["result"][1], out["result"][4]
    assert chart.dtype == torch.float32 and chart.shape[0] == 1 and chart.shape[2:] == (768, 3)
    assert 0.0 <= float(chart.min()) <= float(chart.max()) <= 1.0
    img = as_array(chart)
    changes = edit.metadata["layer_changes"]
    keys = _kv_keys(model)  # model order: input blocks, middle block, output blocks
    bars, values = [], []
    for proj in ("k", "v"):
        _swatch, *drawn = bar_lengths(img, SERIES_COLOURS[f"to_{proj}"])
        bars += drawn
        values += [changes[k] for k in keys if f".to_{proj}." in k]
        assert len(drawn) == 7  # one row per edited layer
    assert len(values) == len(changes) == 14
    scale = max(bars) / max(values)  # pixels per unit, from the longest bar: every other length follows
    assert all(abs(b - v * scale) <= 2 for b, v in zip(bars, values)), (bars, values)
    assert not mask(img, SERIES_COLOURS["pooled"]).any()


def test_uce_and_rece_differ_and_are_deterministic(comfy, tiny):
    model, clip = tiny
    _, uce = _run(comfy, model, clip, method="uce")
    _, rece = _run(comfy, model, clip, method="rece", epochs=2)
    _, again = _run(comfy, model, clip, method="rece", epochs=2)
    assert uce.metadata["epochs"] == 0
    assert any(not torch.allclose(uce.deltas[k], rece.deltas[k]) for k in uce.deltas)
    assert all(torch.equal(rece.deltas[k], again.deltas[k]) for k in rece.deltas)


def test_reads_original_weights_not_the_live_module(comfy, tiny):
    """After another clone was loaded, the shared module holds that clone's weights; the node must not use them."""
    model, clip = tiny
    patched, first = _run(comfy, model, clip, concepts="a bird")
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    _loaded_weights(patched)  # now the live module holds patched weights
    k0 = _kv_keys(model)[0]
    assert not torch.equal(model.model.state_dict()[k0], state[k0])  # the hazard the node must avoid
    _, second = _run(comfy, model, clip, concepts="a bird")
    assert all(torch.equal(first.deltas[k], second.deltas[k]) for k in first.deltas)

    # an upstream LoRA-like patch counts: the edit is computed from W + R and both patches apply
    upstream = model.clone()
    g = torch.Generator().manual_seed(9)
    extra = {k0: torch.randn(state[k0].shape, generator=g) * 0.05}
    assert upstream.add_patches({k: ("diff", (v,)) for k, v in extra.items()}) == [k0]
    eff = comfy.nodes_pkg.rece.effective_weights(upstream, [k0, _kv_keys(model)[1]], torch.device("cpu"))
    torch.testing.assert_close(eff[k0], state[k0] + extra[k0])
    patched_up, on_upstream = _run(comfy, upstream, clip, concepts="a bird")
    assert not torch.allclose(on_upstream.deltas[k0], first.deltas[k0])
    assert len(patched_up.patches[k0]) == 2 and not model.patches
    torch.testing.assert_close(_loaded_weights(patched_up)[k0], state[k0] + extra[k0] + on_upstream.deltas[k0],
                               rtol=1e-6, atol=1e-7)
    _probe(model)  # reload the input: restores the module's original weights
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())


@pytest.mark.parametrize("method,concepts,low_rank", [
    ("uce", "a cat", True),  # 75 token rows: LoRA factors (up [out, 75], down [75, 256])
    ("rece", CONCEPTS, False),  # 304 rows >= the 256-wide context: whole weight differences (.diff)
])
def test_saved_lora_loads_everywhere_and_reproduces_the_edit(comfy, tiny, caplog, method, concepts, low_rank):
    import comfy.lora as comfy_lora
    import comfy.sd as comfy_sd
    import comfy_extras.nodes_train as nodes_train
    import safetensors.torch
    from safetensors import safe_open

    model, clip = tiny
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched, edit = _run(comfy, model, clip, concepts=concepts, method=method)
    node_weights = _loaded_weights(patched)
    out = _save(comfy, edit)
    lora, name = out["result"]
    assert name.startswith("rece_test/erased_") and name.endswith(".safetensors")
    path = comfy.base / "models" / "loras" / name
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    on_disk = safetensors.torch.load_file(str(path))
    assert set(on_disk) == set(lora) and all(v.dtype == torch.float32 for v in on_disk.values())
    keys = _kv_keys(model)
    modules = [k[: -len(".weight")] for k in keys]
    if low_rank:
        assert set(lora) == {f"{m}.{s}" for m in modules for s in ("lora_up.weight", "lora_down.weight", "alpha")}
        assert all(lora[f"{m}.lora_down.weight"].shape == (75, WIDE) for m in modules)
    else:
        assert set(lora) == {f"{m}.diff" for m in modules}
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["concept_erasure_edit"])["concepts"] == split(concepts)

    def check(loaded_model, label):
        assert set(loaded_model.patches) == set(keys), label
        weights = _loaded_weights(loaded_model)
        for k in keys:
            assert _rel(weights[k] - state[k], edit.deltas[k]) <= 1e-4, (label, k)
            # RECE Edit Model patches its clone with what the LoRA loads as: the same weights, bit for bit
            assert torch.equal(weights[k], node_weights[k]), (label, k)

    # ComfyUI's loader matches every key (no "lora key not loaded") and reproduces the deltas
    key_map = comfy_lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        assert len(comfy_lora.load_lora(on_disk, key_map)) == len(keys)
        via_sd, _ = comfy_sd.load_lora_for_models(model, None, on_disk, 1.0, 0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    check(via_sd, "load_lora_for_models")

    # the stock LoraLoader finds the file in models/loras
    assert name in comfy.folder_paths.get_filename_list("loras")
    with torch.inference_mode():
        via_loader, _ = comfy.nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)
    check(via_loader, "LoraLoader")

    # LORA_MODEL: ComfyUI's LoraModelLoader and SaveLoRA accept it
    with torch.inference_mode():
        (via_lml,) = nodes_train.LoraModelLoader().load_lora_model(model, lora, 1.0)
    check(via_lml, "LoraModelLoader")
    nodes_train.SaveLoRA().save(lora, "loras/rece_native")
    assert sorted((comfy.base / "output" / "loras").glob("rece_native*.safetensors"))
    _probe(model)
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())

    # a second save gets the next counter; a bad prefix is refused
    _, name2 = _save(comfy, edit)["result"]
    assert name2 != name and (comfy.base / "models" / "loras" / name).is_file()
    with pytest.raises(ValueError, match="filename_prefix"):
        _save(comfy, edit, prefix="../outside")


@pytest.mark.parametrize("family", ["SD20", "SDXL"])
def test_sd2_and_sdxl_every_attn2_layer(comfy, family):
    with torch.inference_mode():
        model, clip = (tiny_sd20(), tiny_sd2_clip()) if family == "SD20" else (tiny_sdxl(), tiny_sdxl_clip())
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched, edit = _run(comfy, model, clip, concepts="a castle")
    keys = _kv_keys(model)
    # SDXL: every attn2 to_k/to_v and the pooled text input's layer (label_emb.0.0, test_rece_sdxl.py)
    edited = set(keys) | ({"diffusion_model.label_emb.0.0.weight"} if family == "SDXL" else set())
    assert keys and set(patched.patches) == edited == set(edit.deltas)
    assert edit.metadata["model_family"] == family and edit.metadata["context_dim"] == CTX
    loaded = _loaded_weights(patched)
    for k in edited:
        torch.testing.assert_close(loaded[k], state[k] + edit.deltas[k], rtol=1e-6, atol=1e-7)
    assert not model.patches


def test_clear_errors(comfy, tiny):
    import comfy.model_patcher as comfy_model_patcher
    import comfy.supported_models as comfy_supported_models

    model, clip = tiny
    with pytest.raises(ValueError, match="concept list is empty"):
        _run(comfy, model, clip, concepts=" ,\n ,")
    with torch.inference_mode():
        narrow = tiny_sd1_clip(width=16)
    with pytest.raises(ValueError, match="16 wide.*256"):
        _run(comfy, model, narrow)
    with pytest.raises(ValueError, match="no CLIP"):
        _run(comfy, model, None)
    cfg = comfy_supported_models.Stable_Zero123({**tiny_models.BASE_UNET, "in_channels": 8, "context_dim": WIDE})
    cfg.unet_config["num_heads"] = 2
    with torch.no_grad():
        base = cfg.get_model({"cc_projection.weight": torch.zeros(WIDE, WIDE + 4), "cc_projection.bias": torch.zeros(WIDE)},
                             device="meta")
    other = comfy_model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="Stable_Zero123, which is not supported"):
        _run(comfy, other, clip)
    assert not model.patches


def test_inputs_that_would_erase_nothing_are_refused(comfy, tiny):
    """An anchor that encodes like a concept (the same prompt, other case or spacing) maps the concept onto itself,
    and erase_scale 0 zeroes every edit: both used to return a model edited by (nearly) nothing. A negative
    uce_preserve_scale other than -1 (automatic) or NaN used to be taken as automatic."""
    model, clip = tiny
    for method in ("uce", "rece"):
        with pytest.raises(ValueError, match="anchor: 'A  Cat' encodes like the concept 'a cat'"):
            _run(comfy, model, clip, concepts="a dog, a cat", method=method, anchor="A  Cat")
    with pytest.raises(ValueError, match="erase_scale must be > 0"):
        _run(comfy, model, clip, erase_scale=0.0)
    with pytest.raises(ValueError, match="uce_preserve_scale: -1 .* got -5"):
        _run(comfy, model, clip, uce_preserve_scale=-5.0)
    with pytest.raises(ValueError, match="uce_preserve_scale must be a finite number"):
        _run(comfy, model, clip, uce_preserve_scale=float("nan"))
    _, edit = _run(comfy, model, clip, concepts="a cat", anchor="a cats", method="uce")  # a different anchor edits
    assert edit.metadata["relative_change"] > 0
    assert not model.patches


def test_node_and_plugin_reach_the_same_pipeline(comfy, monkeypatch):
    """RECE Edit Model and the MiniCanvas plug-in's path (CanvasRECEHost over the same UNet and CLIP) call the
    one ``run_rece`` with equal settings and give the same deltas to 1e-6."""
    from types import SimpleNamespace

    from sae_core.minicanvas.plugins import rece as plugin
    from sae_core.rece import RECESettings

    rece_nodes, clip_text = comfy.nodes_pkg.rece, comfy.nodes_pkg.clip_text
    with torch.inference_mode():
        model, clip = tiny_sd15(seed=4), tiny_sd1_clip()
    seen = []
    real = rece_nodes.run_rece
    assert real is plugin.run_rece

    def spy(host, settings, **kwargs):
        seen.append((type(host).__name__, settings))
        return real(host, settings, **kwargs)

    monkeypatch.setattr(rece_nodes, "run_rece", spy)
    monkeypatch.setattr(plugin, "run_rece", spy)
    knobs = dict(method="rece", epochs=2, lambda_reg=0.01, erase_scale=1.5, uce_lambda=0.4, preserve_scale=0.2,
                 lam=0.3)
    _, edit = _run(comfy, model, clip, uce_preserve_scale=0.25, **knobs)

    class Canvas:
        """What CanvasRECEHost reads of a canvas, over the ComfyUI UNet module and CLIP."""

        unet = model.model.diffusion_model

        def encode_text(self, texts):
            return clip_text.encode_first_chunks(clip, texts, "test")[0]

        def tokenize(self, texts):
            counts = torch.tensor(clip_text.encode_first_chunks(clip, texts, "test")[1])
            return SimpleNamespace(attention_mask=(torch.arange(77) < counts[:, None]).long())

    settings = RECESettings(concepts=split(CONCEPTS), preserve=["", *split(PRESERVE)], uce_preserve_scale=0.25,
                            **knobs)
    with torch.inference_mode():
        run = plugin.rece_canvas_edit(Canvas(), settings)
    (node_host, node_settings), (plugin_host, plugin_settings) = seen
    assert (node_host, plugin_host) == ("ComfyRECEHost", "CanvasRECEHost")
    assert node_settings == plugin_settings == settings
    assert {f"diffusion_model.{k}" for k in run.result.deltas} == set(edit.deltas)
    for k, delta in run.result.deltas.items():
        want = edit.deltas[f"diffusion_model.{k}"]
        torch.testing.assert_close(delta.double(), want.double(), rtol=0, atol=1e-6)
        assert want.abs().max() > 1e-4
    assert edit.metadata["uce_preserve_scale"] == run.uce_preserve_scale == 0.25 and not model.patches


@pytest.mark.parametrize("name,checkpoint", [("rece_erase.json", "v1-5"), ("sdxl/rece_erase.json", "sd_xl")])
def test_workflow_wiring(name, checkpoint):
    """The example workflows (SD1.5, SDXL) edit the checkpoint's model, sample with it and save the edit
    (tests/comfy/test_workflows.py checks every workflow against the node definitions)."""
    wf = json.loads((Path(__file__).resolve().parents[2] / "workflows" / name).read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    edges = {(by_id[s]["type"], by_id[d]["type"]) for _, s, _, d, _, _ in wf["links"]}
    chain = ["CheckpointLoaderSimple", EDIT_ID, "KSampler", "VAEDecode", "SaveImage"]
    assert all((a, b) in edges for a, b in zip(chain, chain[1:])), edges
    assert (EDIT_ID, SAVE_ID) in edges
    (loader,) = [n for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    assert loader["widgets_values"][0].startswith(checkpoint)


def test_an_edit_on_an_edited_model_says_it_is_stacked_and_a_folder_prefix_is_kept(comfy, tiny, caplog):
    """A second edit is computed on the first one's weights: its metadata, table and log say its LoRA holds only the
    change on top of those patches. A prefix ending in '/' is a folder of models/loras, as ComfyUI's save nodes take
    it (it used to be dropped into the root as 'folder_00001_')."""
    model, clip = tiny
    first, edit1 = _run(comfy, model, clip, method="uce", epochs=0)
    assert edit1.metadata["stacked_on"] == 0
    assert "already patched" not in comfy.nodes_pkg.rece.change_table(edit1)
    with caplog.at_level(logging.WARNING):
        _, edit2 = _run(comfy, first, clip, concepts="a castle", method="uce", epochs=0)
    keys = _kv_keys(model)
    assert edit2.metadata["stacked_on"] == len(keys)
    assert f"already patched {len(keys)} of these weights" in comfy.nodes_pkg.rece.change_table(edit2)
    assert any("already carry patches" in r.getMessage() for r in caplog.records)
    _, name = _save(comfy, edit2, prefix="rece_folder/")["result"]
    assert name.startswith("rece_folder/erased_") and (comfy.base / "models" / "loras" / name).is_file()
