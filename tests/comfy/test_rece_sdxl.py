"""RECE Edit Model on SDXL and SD2.x in a real ComfyUI: SDXL's pooled text input, SD2.x's v-prediction.

The models are the tiny pairs of ``tiny_models`` (ComfyUI's own SDXL / SD2.x classes with random weights). SDXL reads
clip_g's pooled vector ``p`` through the ADM input ``y = [p, size embeddings]`` and ``label_emb``; a cross-attention
edit leaves that path alone. These tests measure how much of the concept goes through it, and check the pooled
edit (``edit_pooled``): UCE's closed form on the pooled columns of ``label_emb.0.0``, saved in the LoRA and reloaded
by the stock loaders.

Run ``pytest -s`` to see the measured figures (printed, not asserted exactly).
"""

from __future__ import annotations

import logging

import pytest
import tiny_models
import torch
from plot_pixels import as_array, bar_lengths

from sae_core.plots import SERIES_COLOURS

EDIT_ID = "CE_RECEEditModel"
SAVE_ID = "CE_SaveEditAsLoRA"
ADM_KEY = "diffusion_model.label_emb.0.0.weight"
CONCEPT = "a castle"
PRESERVE = "a house\na tree"
P = 16
"""clip_g's pooled width in the tiny SDXL pair (the ADM input is P + 6 * 256 wide)."""

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sdxl(comfy):
    with torch.inference_mode():
        return tiny_models.tiny_sdxl(clip_l=16, clip_g=P), tiny_models.tiny_sdxl_clip(16, P)


@pytest.fixture(scope="module")
def sd2(comfy):
    with torch.inference_mode():
        return tiny_models.tiny_sd20(context=32), tiny_models.tiny_sd2_clip(32)


def _edit(comfy, model, clip, method="uce", epochs=0, preserve=PRESERVE, **advanced):
    node = comfy.nodes.NODE_CLASS_MAPPINGS[EDIT_ID]()
    with torch.inference_mode():
        return node.edit(model, clip, CONCEPT, "", preserve, method, epochs, 1e-3, device="cpu", **advanced)


def _encode(clip, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token states [1, 77, ctx], pooled [1, P])`` as CLIPTextEncode conditions on them."""
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.clone(), pooled.clone()


def _loaded_weights(model) -> dict[str, torch.Tensor]:
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def _eps(model, context: torch.Tensor, pooled: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """The model's output at a fixed noisy input for token states ``context`` and pooled vector ``pooled``; the ADM
    input is built by the model's own ``encode_adm`` (as sampling builds it)."""
    import comfy.model_management as mm

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = model.model.encode_adm(pooled_output=pooled, width=64, height=64, device=torch.device("cpu"))
    mm.load_models_gpu([model], force_full_load=True)
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([2.0, 6.0]), c_crossattn=context.expand(2, -1, -1),
                                       y=y.expand(2, -1)).clone()


def _n(t: torch.Tensor) -> float:
    return float(t.double().norm())


def test_concept_leaks_through_the_pooled_path_unless_it_is_edited(comfy, sdxl):
    """The concept's pooled vector moves the UNet's output as much after a cross-attention-only edit as before it;
    with the pooled edit it hardly moves it any more. Figures printed with -s."""
    model, clip = sdxl
    (cc, pc), (ca, pa) = _encode(clip, CONCEPT), _encode(clip, "")
    base_pooled = _n(_eps(model, cc, pc) - _eps(model, cc, pa))  # the concept's pooled vector against the anchor's
    base_all = _n(_eps(model, cc, pc) - _eps(model, ca, pa))  # the whole concept against the anchor
    assert base_pooled > 1e-3 * base_all > 0  # the pooled path matters at all
    print(f"\nSDXL tiny pair: the concept's pooled vector moves the output by {base_pooled / base_all:.3f} of the "
          f"whole concept's effect")
    leaks = {}
    for method, epochs in (("uce", 0), ("rece", 1)):
        for edit_pooled in (False, True):
            patched, edit = _edit(comfy, model, clip, method, epochs, edit_pooled=edit_pooled)
            assert (ADM_KEY in edit.deltas) is edit_pooled
            leak = _n(_eps(patched, cc, pc) - _eps(patched, cc, pa)) / base_pooled
            left = _n(_eps(patched, cc, pc) - _eps(patched, ca, pa)) / base_all
            leaks[method, edit_pooled] = leak
            print(f"{method} (epochs {epochs}), edit_pooled={edit_pooled}: pooled path keeps {leak:.3f} of its "
                  f"effect; the whole concept keeps {left:.3f}")
    for method in ("uce", "rece"):
        # the cross-attention edit leaves label_emb alone: the pooled vector's effect is nearly whole
        assert leaks[method, False] > 0.9
        # the pooled edit maps it to the anchor's: most of that effect is gone
        assert leaks[method, True] < 0.25 and leaks[method, True] < leaks[method, False] / 4
    assert not model.patches


def test_pooled_edit_is_uces_closed_form_on_the_pooled_columns(comfy, sdxl):
    """The pooled delta zeroes the gradient of UCE's objective on the pooled columns, maps the concept's pooled
    vector to the anchor's, keeps the preserve prompts' and never touches the size columns; the input MODEL stays
    as it was."""
    model, clip = sdxl
    state = _loaded_weights(model)  # the live module holds whichever clone was loaded last
    patched, edit = _edit(comfy, model, clip)
    meta = edit.metadata
    assert meta["pooled"]["key"] == ADM_KEY and meta["pooled"]["columns"] == P and meta["pooled_note"] == ""
    assert not model.patches and all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())

    delta = edit.deltas[ADM_KEY].double()
    assert delta.shape == state[ADM_KEY].shape == (128, P + tiny_models.SDXL_SIZE_EMBEDDINGS)
    assert torch.count_nonzero(delta[:, P:]) == 0 and torch.count_nonzero(delta[:, :P]) > 0
    w0 = state[ADM_KEY][:, :P].double()
    d = delta[:, :P]
    w = w0 + d
    pc, pa = (_encode(clip, t)[1][0].double() for t in (CONCEPT, ""))
    preserve = [_encode(clip, t)[1][0].double() for t in meta["preserve"]]
    assert meta["preserve"] == ["", "a house", "a tree"]
    s_e, s_p = 1.0, meta["uce_preserve_scale"]
    every = torch.stack([pc, pa, *preserve])
    ridge = meta["pooled_lambda"] * float(every.pow(2).sum(1).mean())
    assert meta["pooled"]["ridge"] == pytest.approx(ridge, rel=1e-5)

    # d/dW of s_e ||W p_c - W0 p_a||^2 + s_p sum_j ||(W - W0) p_j||^2 + lam ||W - W0||^2, halved
    grad = s_e * torch.outer(w @ pc - w0 @ pa, pc) + ridge * d
    for p in preserve:
        grad += s_p * torch.outer(d @ p, p)
    at_start = s_e * torch.outer(w0 @ pc - w0 @ pa, pc)
    assert _n(grad) <= 1e-4 * _n(at_start), (_n(grad), _n(at_start))

    # the concept's pooled vector now reads (nearly) like the anchor's; the preserve prompts' as before
    assert _n(w @ pc - w0 @ pa) < 0.1 * _n(w0 @ pc - w0 @ pa)
    for text, p in zip(meta["preserve"], preserve):
        assert _n(d @ p) < 0.05 * _n(w0 @ p), text

    # one concept: a rank-one edit that moves any other prompt only along the concept's own move; a prompt that is
    # in neither list moves with it, and stays put once it is preserved too
    assert int(torch.linalg.matrix_rank(d, rtol=1e-6)) == 1
    other = _encode(clip, "a red car")[1][0].double()
    moved = d @ other
    along = d @ pc
    assert _n(moved - (moved @ along) / (along @ along) * along) <= 1e-5 * _n(moved)
    print(f"\n'a red car' (not preserved): pooled contribution moves {_n(moved) / _n(w0 @ other):.3f}; "
          f"the concept's: {_n(along) / _n(w0 @ pc):.3f} (the tiny random CLIP's pooled vectors all have cosine > 0.9)")
    _, kept = _edit(comfy, model, clip, preserve=PRESERVE + "\na red car")
    d2 = kept.deltas[ADM_KEY].double()[:, :P]
    assert _n(d2 @ other) < 0.05 * _n(w0 @ other)
    assert _n((w0 + d2) @ pc - w0 @ pa) < 0.2 * _n(w0 @ pc - w0 @ pa)

    # the patched clone computes W + delta for label_emb too
    loaded = _loaded_weights(patched)
    torch.testing.assert_close(loaded[ADM_KEY], state[ADM_KEY] + edit.deltas[ADM_KEY], rtol=1e-6, atol=1e-7)
    _loaded_weights(model)


def test_rece_epochs_leave_the_pooled_edit_at_uce_and_the_probe_carries_the_pooled_leak(comfy, sdxl):
    """``rece`` changes the cross-attention's edit, not the pooled one (UCE only there); the node's leak probe
    carries RECE's adversarial token rows and the adversarial pooled vector against the edited layer, and
    ``edit_pooled`` off leaves label_emb alone and says so."""
    from sae_core.rece import leak_probe

    model, clip = sdxl
    state = _loaded_weights(model)  # the live module holds whichever clone was loaded last
    _, uce = _edit(comfy, model, clip, "uce", 0)
    node = comfy.nodes.NODE_CLASS_MAPPINGS[EDIT_ID]()
    with torch.inference_mode():
        out = node.run(model, clip, CONCEPT, "", PRESERVE, "rece", 2, 1e-3, device="cpu")
        _patched, rece, probe, concept, chart = out["result"]
        (encoded,) = comfy.nodes.CLIPTextEncode().encode(clip, CONCEPT)
    kv = [k for k in rece.deltas if k != ADM_KEY]
    assert any(not torch.allclose(rece.deltas[k], uce.deltas[k]) for k in kv)
    torch.testing.assert_close(rece.deltas[ADM_KEY], uce.deltas[ADM_KEY], rtol=0, atol=0)

    # the concept's own conditioning is CLIPTextEncode's, pooled output included
    assert torch.equal(concept[0][0], encoded[0][0])
    assert torch.equal(concept[0][1]["pooled_output"], encoded[0][1]["pooled_output"])
    # token rows: leak_probe of the first chunk against the cross-attention edit
    weights = {k: state[k].float() for k in kv}
    expected = leak_probe(weights, {k: rece.deltas[k] for k in kv}, encoded[0][0][:, :77], 1e-3)
    torch.testing.assert_close(probe[0][0].double(), expected, rtol=1e-4, atol=1e-5)
    # pooled: q' = argmin ||W' q - W p_c||^2 + lambda_reg ||q||^2 against the edited pooled columns
    w0 = state[ADM_KEY][:, :P].double()
    w1 = w0 + rece.deltas[ADM_KEY].double()[:, :P]
    pc = encoded[0][1]["pooled_output"][0].double()
    q = torch.linalg.solve(1e-3 * torch.eye(P, dtype=torch.float64) + w1.T @ w1, w1.T @ (w0 @ pc))
    got = probe[0][1]["pooled_output"]
    assert got.shape == (1, P)
    torch.testing.assert_close(got[0].double(), q, rtol=1e-4, atol=1e-5)
    # it brings back more of the concept's old pooled contribution than the concept's own vector does now
    assert _n(w1 @ got[0].double() - w0 @ pc) < 0.8 * _n(w1 @ pc - w0 @ pc)
    table = out["ui"]["text"][0]
    assert table.splitlines()[-1].startswith(f"pooled text input label_emb.0.0 (first {P} columns)")
    # the chart: a to_k and a to_v bar per attn2 layer and the pooled text input's own row, lengths to scale
    img = as_array(chart)
    changes = rece.metadata["layer_changes"]
    _, *k_bars = bar_lengths(img, SERIES_COLOURS["to_k"])
    _, *v_bars = bar_lengths(img, SERIES_COLOURS["to_v"])
    _, *pooled_bar = bar_lengths(img, SERIES_COLOURS["pooled"])
    assert len(k_bars) == len(v_bars) == len(kv) // 2 and len(pooled_bar) == 1
    values = [changes[k] for k in kv if ".to_k." in k] + [changes[k] for k in kv if ".to_v." in k] + [changes[ADM_KEY]]
    bars = k_bars + v_bars + pooled_bar
    scale = max(bars) / max(values)
    assert all(abs(b - v * scale) <= 2 for b, v in zip(bars, values)), (bars, values)

    _, off = _edit(comfy, model, clip, edit_pooled=False)
    assert ADM_KEY not in off.deltas and off.metadata["pooled"] is None
    assert "edit_pooled is off" in off.metadata["pooled_note"]
    for k in kv:
        torch.testing.assert_close(off.deltas[k], uce.deltas[k], rtol=0, atol=0)
    assert not model.patches


def test_why_the_pooled_path_takes_no_rece_epochs(comfy, sdxl):
    """RECE's epochs run on the pooled block alone (the same driver, settings and ridge) keep re-erasing an exact
    preimage of the concept's old pooled output and drag every prompt's pooled output with them, the preserved ones
    included; the UCE edit alone keeps those. Figures printed with -s."""
    from sae_core.rece import RECEConfig, UCEStart, rece_edit

    model, clip = sdxl
    state = _loaded_weights(model)
    _, edit = _edit(comfy, model, clip)
    meta = edit.metadata
    w0 = state[ADM_KEY][:, :P].double()
    pc, pa = (_encode(clip, t)[1].double() for t in (CONCEPT, ""))
    pp = torch.cat([_encode(clip, t)[1].double() for t in meta["preserve"]])
    start = UCEStart(pc, pa, pp, 1.0, meta["uce_preserve_scale"], meta["pooled"]["ridge"])
    moved = {}
    for epochs in (0, 1, 3):
        res = rece_edit({ADM_KEY: w0}, [pc], pa, pp, RECEConfig(epochs=epochs, lambda_reg=1e-3), start=start)
        d = res.deltas[ADM_KEY]
        if epochs == 0:  # the driver reproduces the node's pooled edit
            torch.testing.assert_close(d, edit.deltas[ADM_KEY].double()[:, :P], rtol=1e-5, atol=1e-8)
        moved[epochs] = {t: _n(d @ _encode(clip, t)[1][0].double()) / _n(w0 @ _encode(clip, t)[1][0].double())
                         for t in ("a house", "a tree", "a red car")}
        print(f"\npooled block, UCE + {epochs} epochs: pooled contribution moved by "
              + ", ".join(f"{t!r} {v:.3f}" for t, v in moved[epochs].items()))
    for t in ("a house", "a tree"):  # preserved
        assert moved[3][t] > 3 * moved[0][t] and moved[0][t] < 0.05


def test_saved_lora_carries_the_pooled_edit_and_stock_loaders_reproduce_it(comfy, sdxl, caplog):
    import comfy.lora as comfy_lora
    import safetensors.torch
    from comfy_extras import nodes_train

    model, clip = sdxl
    state = _loaded_weights(model)  # the live module holds whichever clone was loaded last
    patched, edit = _edit(comfy, model, clip, "rece", 1)
    node = comfy.nodes.NODE_CLASS_MAPPINGS[SAVE_ID]()
    with torch.inference_mode():
        lora, name = node.save(edit, "rece_sdxl/erased")["result"]
    on_disk = safetensors.torch.load_file(str(comfy.base / "models" / "loras" / name))
    assert set(on_disk) == set(lora)
    module = ADM_KEY.removesuffix(".weight")
    # ComfyUI maps the module name of every UNet weight, label_emb's included
    assert comfy_lora.model_lora_keys_unet(model.model, {})[module] == ADM_KEY
    down = on_disk[f"{module}.lora_down.weight"]
    assert down.shape == (1, P + tiny_models.SDXL_SIZE_EMBEDDINGS) and torch.count_nonzero(down[:, P:]) == 0
    assert on_disk[f"{module}.alpha"].item() == 1.0

    want = _loaded_weights(patched)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        via_loader, _ = comfy.nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)
        (via_lml,) = nodes_train.LoraModelLoader().load_lora_model(model, lora, 1.0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    for label, loaded_model in (("LoraLoader", via_loader), ("LoraModelLoader", via_lml)):
        assert set(loaded_model.patches) == set(edit.deltas), label
        got = _loaded_weights(loaded_model)
        for k in edit.deltas:
            # the node's patched clone and the reloaded LoRA compute the same weights: base + delta
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
            torch.testing.assert_close(got[k], state[k] + edit.deltas[k], rtol=1e-6, atol=1e-7)
    _loaded_weights(model)
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())


def _sample(comfy, model, clip, text: str) -> torch.Tensor:
    """Two KSampler steps from a fixed seed with stock nodes (SDXL's ADM conditioning built by ComfyUI)."""
    with torch.inference_mode():
        (pos,) = comfy.nodes.CLIPTextEncode().encode(clip, text)
        (neg,) = comfy.nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = comfy.nodes.EmptyLatentImage().generate(64, 64, 1)
        (out,) = comfy.nodes.KSampler().sample(model, 7, 2, 3.0, "euler", "normal", pos, neg, latent)
    return out["samples"].clone()


@pytest.mark.parametrize("family", ["SDXL", "SD20"])
def test_patched_models_sample_with_stock_nodes(comfy, sdxl, sd2, family):
    from comfy import model_sampling

    model, clip = sdxl if family == "SDXL" else sd2
    if family == "SD20":
        assert isinstance(model.model.model_sampling, model_sampling.V_PREDICTION)
    before = _sample(comfy, model, clip, CONCEPT)
    patched, edit = _edit(comfy, model, clip, "rece", 1)
    assert edit.metadata["model_family"] == family
    if family == "SD20":
        assert edit.metadata["pooled"] is None and "no pooled text vector" in edit.metadata["pooled_note"]
        assert all(".attn2.to_" in k for k in edit.deltas)
    after = _sample(comfy, patched, clip, CONCEPT)
    assert torch.isfinite(after).all() and not torch.allclose(after, before)
    assert torch.equal(_sample(comfy, model, clip, CONCEPT), before)  # the input model samples as before


def test_pooled_errors(comfy, sdxl):
    model, clip = sdxl
    with torch.inference_mode():
        wrong = tiny_models.tiny_sdxl_clip(8, 24)  # same 32-wide context, 24-wide pooled output
    with pytest.raises(ValueError, match="pooled output is 24 wide.*label_emb reads 1552"):
        _edit(comfy, model, wrong)
    _, ok = _edit(comfy, model, wrong, edit_pooled=False)  # without the pooled edit the context fits
    assert ADM_KEY not in ok.deltas
    with pytest.raises(ValueError, match="pooled_lambda must be > 0"):
        _edit(comfy, model, clip, pooled_lambda=0.0)
    assert not model.patches
