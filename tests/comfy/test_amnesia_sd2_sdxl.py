"""Selective Amnesia on SD2.x (v-prediction) and SDXL (ADM input ``y``) in a real ComfyUI, on tiny models built
with ComfyUI's own classes (``tiny_models``), under inference mode as a checkpoint loader builds them."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_sd2_clip, tiny_sd20, tiny_sdxl, tiny_sdxl_clip

FISHER_ID = "CE_SAComputeFisher"
TRAIN_ID = "CE_SALoRATrain"
PROMPTS = "a photo of a cat\na photo of a dog"
REMEMBER = "a house"
SIZE = 64

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd2(comfy):
    with torch.inference_mode():
        return tiny_sd20(), tiny_sd2_clip()


@pytest.fixture(scope="module")
def sdxl(comfy):
    with torch.inference_mode():
        return tiny_sdxl(), tiny_sdxl_clip()


def _conditioning(comfy, model, clip, prompts, width=SIZE, height=SIZE):
    with torch.inference_mode():
        return comfy.nodes_pkg.sampling.model_conditioning(model, clip, prompts, width, height).clone()


def _probe(comfy, model, context, seed=3):
    """eps of the model (through the node pack's denoiser) on a fixed noisy input, for the packed ``context`` rows."""
    import comfy.model_management as mm

    sampling = comfy.nodes_pkg.sampling
    ms = sampling.discrete_eps_sampling(model, "test", allow_adm=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(context.shape[0], 4, SIZE // 8, SIZE // 8, generator=g)
    t = torch.tensor([100, 700][: context.shape[0]])
    with torch.inference_mode():
        mm.load_models_gpu([model], force_full_load=True)
        dev = model.load_device
        out = sampling.eps_denoiser(model, ms, sampling.adm_width(model))(x.to(dev), t.to(dev), context.to(dev))
    return out.to("cpu").clone()


def _run_nodes(comfy, model, clip, name):
    """Compute Fisher then LoRA Train (tiny settings); returns (fisher path, patched model, lora)."""
    fisher_node = comfy.nodes.NODE_CLASS_MAPPINGS[FISHER_ID]()
    train_node = comfy.nodes.NODE_CLASS_MAPPINGS[TRAIN_ID]()
    with torch.inference_mode():
        (path,) = fisher_node.compute(model, clip, PROMPTS, 2, 2, 2, "xattn", 0, 1, 4.0, "euler", "normal", SIZE, SIZE,
                                      "fp32", f"{name}/fisher")
        patched, lora, _curve = train_node.train(model, clip, "a photo of a cat, a cat", "a photo of a dog", REMEMBER,
                                                 10.0, 1.0, 2, 2, 5e-2, 1, 0, "xattn", 1, 1, 1, 4.0, "euler", "normal",
                                                 SIZE, SIZE, "fp32", name, fisher_path=path)
    return path, patched, lora


@pytest.mark.parametrize("v_prediction", [False, True])
def test_eps_of_the_denoiser_is_the_unets_own_eps_or_v_converted(comfy, v_prediction):
    """The eps the trainer sees equals the raw UNet output (eps model) or sqrt(abar) v + sqrt(1 - abar) x_t (v model)."""
    sampling = comfy.nodes_pkg.sampling
    with torch.inference_mode():
        model = tiny_sd20(v_prediction=v_prediction)
        ms = sampling.discrete_eps_sampling(model, "test")
        abar = sampling.alphas_cumprod(ms)
        g = torch.Generator().manual_seed(0)
        x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        ctx = torch.randn(2, 77, 32, generator=g)
        t = torch.tensor([50, 800])
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps = sampling.eps_denoiser(model, ms)(x_t, t, ctx)
        raw = model.model.diffusion_model(x_t, t.float(), context=ctx)
    expected = a.sqrt() * raw + (1 - a).sqrt() * x_t if v_prediction else raw
    torch.testing.assert_close(eps, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(eps, raw, atol=1e-3) or not v_prediction  # the v conversion is not a no-op


def _check_nodes_run(comfy, model, clip, name):
    from sae_core.amnesia.fisher import load_fisher

    ctx = _conditioning(comfy, model, clip, ["a photo of a cat", "a house"])
    before = _probe(comfy, model, ctx)
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    path, patched, lora = _run_nodes(comfy, model, clip, name)
    fisher = load_fisher(path).fisher
    assert fisher and all(torch.isfinite(f).all() and (f >= 0).all() for f in fisher.values())
    assert any(float(f.sum()) > 0 for f in fisher.values())
    # the input MODEL is unchanged
    assert not model.patches and all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())
    assert torch.equal(_probe(comfy, model, ctx), before)
    # the LoRA is applied and changes the prediction
    modules = {k[: -len(".lora_up.weight")] for k in lora if k.endswith(".lora_up.weight")}
    assert modules and all(".attn2.to_" in m for m in modules)
    assert len(patched.patches) == len(modules)
    assert not torch.allclose(_probe(comfy, patched, ctx), before, atol=1e-6)
    assert torch.equal(_probe(comfy, model, ctx), before)


def test_sd2_v_prediction_nodes_run(comfy, sd2):
    model, clip = sd2
    assert comfy.nodes_pkg.sampling.adm_width(model) == 0
    _check_nodes_run(comfy, model, clip, "sd2")


def test_sdxl_nodes_run(comfy, sdxl):
    model, clip = sdxl
    assert comfy.nodes_pkg.sampling.adm_width(model) > 0
    _check_nodes_run(comfy, model, clip, "sdxl")


def test_sdxl_conditioning_is_what_the_sampler_gives_the_unet(comfy, sdxl):
    """The packed rows hold the token conditioning and the y that ComfyUI's own KSampler passes to the UNet for the
    same prompt and size; y differs between sizes and the denoiser's eps depends on it."""
    import comfy.sample as comfy_sample

    sampling = comfy.nodes_pkg.sampling
    model, clip = sdxl
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append((args[2].detach().clone(), args[3].detach().clone()))
        return executor(*args, **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(sampling.diffusion_model_wrapper(), "test.capture", wrapper)
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
        latent = torch.zeros(1, 4, 6, SIZE // 8)  # 64 wide, 48 high: width and height differ
        comfy_sample.sample(patched, torch.randn(latent.shape), 1, 1.0, "euler", "normal", pos, pos, latent,
                            disable_pbar=True, seed=0)
    context, y = seen[0]
    packed = _conditioning(comfy, model, clip, ["a photo of a cat"], width=SIZE, height=48)
    adm = sampling.adm_width(model)
    r = sampling.adm_rows(adm, packed.shape[-1])
    torch.testing.assert_close(packed[:, :-r], context[:1].float().cpu())
    torch.testing.assert_close(packed[:, -r:].reshape(1, -1)[:, :adm], y[:1].float().cpu())
    assert float(packed[:, -r:].reshape(1, -1)[:, adm:].abs().sum()) == 0
    square = _conditioning(comfy, model, clip, ["a photo of a cat"])
    assert not torch.equal(square, packed)
    two = torch.cat([square, packed])
    eps = _probe(comfy, model, two[[0, 0]])
    other = _probe(comfy, model, two[[0, 1]])
    assert torch.equal(eps[0], other[0]) and not torch.allclose(eps[1], other[1])


def test_models_with_concat_channels_are_refused(comfy):
    import comfy.model_base as comfy_model_base

    with torch.inference_mode():
        model = tiny_sd20(v_prediction=False)
    model.model.concat_keys = ("mask", "masked_image")
    try:
        with pytest.raises(ValueError, match="concat"):
            comfy.nodes_pkg.amnesia.check_model(model)
    finally:
        del model.model.concat_keys
    assert isinstance(model.model, comfy_model_base.BaseModel)


def test_sdxl_sample_bank_must_have_the_size_of_its_conditioning(comfy, sdxl):
    """Compute Fisher's samples serve SDXL's LoRA Train as a bank at their own size; at another width/height the size
    conditioning would not match them, so the node refuses."""
    model, clip = sdxl
    amnesia = comfy.nodes_pkg.amnesia
    fisher_node = comfy.nodes.NODE_CLASS_MAPPINGS[FISHER_ID]()
    with torch.inference_mode():
        fisher_node.compute(model, clip, PROMPTS, 2, 1, 1, "xattn", 0, 1, 4.0, "euler", "normal", SIZE, SIZE, "fp32",
                            "bank/sdxl")
    name = next(n for n in amnesia.sample_bank_filenames() if "bank/sdxl" in n)

    def train(width):
        with torch.inference_mode():
            return amnesia.SALoRATrain().train(model, clip, "a photo of a cat", "a photo of a dog", REMEMBER, 0.0, 0.0, 2,
                                               1, 1e-2, 1, 0, "xattn", 1, 1, 1, 4.0, "euler", "normal", width, SIZE,
                                               "fp32", f"bank_{width}", sample_bank=name)

    with pytest.raises(ValueError, match="sample_bank.*width/height"):
        train(2 * SIZE)
    patched, lora, _ = train(SIZE)
    assert lora and patched is not model
