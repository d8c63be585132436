"""Every node of the pack on models in half precision, as ComfyUI runs SD1.x / SD2.x / SDXL on GPUs.

ComfyUI's checkpoint loader puts a UNet's weights in float16 or bfloat16 on a GPU (``model_management.unet_dtype``;
no manual cast where the card computes in that dtype) and a text encoder's in float16 (which computes in float32
through ``comfy.ops.manual_cast``); ``tiny_models.tiny_half_unet`` / ``tiny_half_clip`` build the tiny models so.
The CPU runs float16 and bfloat16 matmuls, convolutions and attention, so the dtype faults a GPU run would hit
show here: each test runs a node on those models and checks what matters in half precision (it runs, the outputs
are finite, the input MODEL/CLIP is unchanged, pass-through stays bit-exact, float32 maths stay float32, saved
files load with the stock loaders).
"""

from __future__ import annotations

import json
import math
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_half_clip, tiny_half_unet, tiny_vae

torch.set_num_threads(1)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SIZE = 64
"""Pixel size of the sampled images (8x8 latents)."""


def node(comfy, node_id: str):
    return comfy.nodes.NODE_CLASS_MAPPINGS[node_id]()


def snapshot(model) -> SimpleNamespace:
    """What a node must leave unchanged on a MODEL or CLIP's patcher: its weights as ComfyUI loads them (the shared
    module holds the weights of the clone loaded last), patches and wrappers."""
    import comfy.model_management as mm

    patcher = getattr(model, "patcher", model)
    with torch.inference_mode():
        mm.load_models_gpu([patcher], force_full_load=True)
    return SimpleNamespace(state={k: v.detach().clone() for k, v in patcher.model.state_dict().items()},
                           patches={k: len(v) for k, v in patcher.patches.items()},
                           wrappers=repr(patcher.wrappers), objects=sorted(patcher.object_patches))


def assert_unchanged(model, before: SimpleNamespace) -> None:
    after = snapshot(model)
    assert after.patches == before.patches and after.wrappers == before.wrappers and after.objects == before.objects
    assert after.state.keys() == before.state.keys()
    changed = [k for k, v in after.state.items() if v.dtype != before.state[k].dtype or not torch.equal(v, before.state[k])]
    assert not changed, changed[:5]


def sample(comfy, model, clip, prompt: str = "a photo of a cat", seed: int = 0, steps: int = 2) -> torch.Tensor:
    n = comfy.nodes
    with torch.inference_mode():
        (pos,) = n.CLIPTextEncode().encode(clip, prompt)
        (neg,) = n.CLIPTextEncode().encode(clip, "")
        latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
        (out,) = n.KSampler().sample(model, seed, steps, 5.0, "euler", "normal", pos, neg, latent)
    return out["samples"]


def x0(model, x: torch.Tensor, sigma: float, ctx: torch.Tensor) -> torch.Tensor:
    """The model's x0 prediction (patches applied as sampling applies them)."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)
    with torch.inference_mode():
        return model.model.apply_model(x, torch.full((x.shape[0],), sigma), c_crossattn=ctx).clone()


VARIANTS = {"fp16": (torch.float16, None), "bf16": (torch.bfloat16, None),
            "fp8-cast16": (torch.float8_e4m3fn, torch.float16)}
"""UNet weight and manual-cast dtypes: fp16 / bf16 as recent GPUs run them; fp8 weights computed in fp16 as
ComfyUI runs ``--fp8_e4m3fn-unet`` (or an fp8 checkpoint) on cards without fp8 compute."""


@pytest.fixture(scope="module", params=list(VARIANTS))
def half(request, comfy):
    """(weight dtype, compute dtype, SD1.5 UNet in them, its float16 CLIP)."""
    dtype, cast = VARIANTS[request.param]
    with torch.inference_mode():
        return SimpleNamespace(dtype=dtype, compute=cast or dtype, tag=request.param,
                               model=tiny_half_unet("SD15", dtype, cast), clip=tiny_half_clip("SD15"))


# ---------------------------------------------------------------------------------------------
# the stock nodes on the half-precision tiny models
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("manual_cast", [None, torch.float32], ids=["native", "cast32"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("family", ["SD15", "SD20", "SDXL"])
def test_stock_nodes_sample_each_family_in_half_precision(comfy, family, dtype, manual_cast):
    with torch.inference_mode():
        model, clip = tiny_half_unet(family, DTYPES[dtype], manual_cast), tiny_half_clip(family)
    assert {p.dtype for p in model.model.diffusion_model.parameters()} == {DTYPES[dtype]}
    assert torch.float16 in clip.cond_stage_model.dtypes
    samples = sample(comfy, model, clip)
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all() and samples.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# RECE
# ---------------------------------------------------------------------------------------------

def upcast(model):
    """A float32 copy of a half-precision tiny UNet: the same (rounded) weights in float32."""
    family = type(model.model.model_config).__name__
    copy = tiny_half_unet(family, torch.float32, None, context=model.model.model_config.unet_config["context_dim"])
    copy.model.load_state_dict({k: v.float() for k, v in model.model.state_dict().items()})
    return copy


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp8-cast16"])
@pytest.mark.parametrize("family", ["SD15", "SD20", "SDXL"])
def test_rece_on_a_half_model(comfy, family, dtype):
    with torch.inference_mode():
        model, clip = tiny_half_unet(family, *VARIANTS[dtype]), tiny_half_clip(family)
    before_m, before_c = snapshot(model), snapshot(clip)
    rece = node(comfy, "CE_RECEEditModel")
    with torch.inference_mode():
        out = rece.run(model, clip, "a cat", "", "a house", "rece", 1, 1e-3, device="cpu")
        _, edit32 = rece.edit(upcast(model), clip, "a cat", "", "a house", "rece", 1, 1e-3, device="cpu")
    patched, edit, probe, concept, _ = out["result"]
    assert_unchanged(model, before_m)
    assert_unchanged(clip, before_c)
    if family == "SDXL":
        assert edit.metadata["pooled"] is not None  # the pooled text input was edited too
    # the closed form runs in float32 on the model's weights: the edit of the half model is that of its float32 copy
    assert edit.factors.keys() == edit32.factors.keys()
    for key, (u, d) in edit.factors.items():
        assert u.dtype == d.dtype == torch.float32 and torch.isfinite(u).all() and torch.isfinite(d).all()
        torch.testing.assert_close((u, d), edit32.factors[key], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(probe[0][0]).all() and torch.isfinite(concept[0][0]).all()

    # the saved LoRA, reloaded with the stock LoraLoader, computes the node's patched model
    with torch.inference_mode():
        _, name = node(comfy, "CE_SaveEditAsLoRA").save(edit, f"half_test/rece_{family}_{dtype}")["result"]
        comfy.folder_paths.filename_list_cache.clear()
        reloaded, _ = comfy.nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)
    mine = sample(comfy, patched, clip)
    assert torch.isfinite(mine).all() and not torch.equal(mine, sample(comfy, model, clip))
    assert torch.equal(sample(comfy, reloaded, clip), mine)
    assert_unchanged(model, before_m)


# ---------------------------------------------------------------------------------------------
# Selective Amnesia
# ---------------------------------------------------------------------------------------------

def test_selective_amnesia_on_a_half_model(comfy, half, tmp_path):
    from safetensors.torch import load_file

    model, clip = half.model, half.clip
    before = snapshot(model)
    tag = half.tag
    with torch.inference_mode():
        (fisher,) = node(comfy, "CE_SAComputeFisher").compute(
            model, clip, "a photo of a dog\na photo of a house", 2, 2, 2, "xattn", 0, 2, 4.0, "euler", "normal",
            SIZE, SIZE, "fp32", f"half_test/fisher_{tag}")
    assert_unchanged(model, before)
    f = load_file(fisher)
    assert f and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in f.values())
    assert any(v.abs().sum() > 0 for v in f.values())
    with torch.inference_mode():
        trained, lora, images = node(comfy, "CE_SALoRATrain").train(
            model, clip, "a photo of a cat", "a photo of a dog", "a photo of a house", 10.0, 1.0, 2, 3, 1e-2, 1, 0,
            "xattn", 1, 1, 2, 4.0, "euler", "normal", SIZE, SIZE, "fp32", f"half_test_sa_{tag}", fisher_path=fisher)
    assert_unchanged(model, before)
    assert all(v.dtype in (torch.float32, torch.float16, torch.bfloat16) for v in lora.values())
    assert all(torch.isfinite(v).all() for v in lora.values())
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert ups and any(v.abs().sum() > 0 for v in ups), "the LoRA did not train"
    assert torch.isfinite(images).all()
    summary = json.loads((Path(comfy.folder_paths.get_output_directory()) / "selective_amnesia" /
                          f"half_test_sa_{tag}" / "summary.json").read_text())
    assert summary["steps"] == 3 and all(math.isfinite(v) for v in summary["final"].values() if isinstance(v, float))
    samples = sample(comfy, trained, clip)
    assert torch.isfinite(samples).all()


# ---------------------------------------------------------------------------------------------
# SAeUron and its SAE tooling
# ---------------------------------------------------------------------------------------------

BLOCK = "output_blocks.1.1"
"""The tiny SD1.5's block an Upsample follows (as SD1.5's output_blocks.5.1)."""
SAMPLING = {"steps": 2, "cfg": 5.0, "seed": 7, "sampler_name": "euler", "scheduler": "normal", "width": SIZE,
            "height": SIZE}


def block_output(model, x: torch.Tensor, sigma: float, ctx: torch.Tensor) -> torch.Tensor:
    """BLOCK's output (after any SAeUron edit) in a forward of ``model`` at ``sigma``, as the sampler calls it."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe
    import comfy.samplers

    mm.load_models_gpu([model], force_full_load=True)
    sched = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2).float()
    seen = []
    upsample = model.model.diffusion_model.output_blocks[1][2]
    handle = upsample.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    sig = torch.full((x.shape[0],), float(sched[0]) if sigma is None else sigma)
    options = {"wrappers": pe.copy_nested_dicts(model.wrappers), "cond_or_uncond": [1, 0], "sigmas": sig,
               "sample_sigmas": sched}
    try:
        with torch.inference_mode():
            model.model.apply_model(x, sig, c_crossattn=ctx, transformer_options=options)
    finally:
        handle.remove()
    return seen[0]


def test_saeuron_pipeline_on_a_half_model(comfy, half):
    model, clip = half.model, half.clip
    before_m, before_c = snapshot(model), snapshot(clip)
    tag = half.tag
    with torch.inference_mode():
        (dataset,) = node(comfy, "CE_CollectSAEActivations").collect(
            model, clip, "a photo of a cat\na photo of a dog", BLOCK, **SAMPLING, branch="cond",
            dataset_name=f"half_test/acts_{tag}", store_dtype="float16")
        sae, _ = node(comfy, "CE_TrainSAE").train(dataset, 2, 0, 4, 20, 1e-2, 16, 0, f"half_test/sae_{tag}",
                                                  dead_feature_threshold=10_000, device="cpu")
        stats, _ = node(comfy, "CE_SAeUronConceptFeatures").gather(
            model, clip, sae, BLOCK, "cat: a photo of a cat\ndog: a photo of a dog", "a photo of a house",
            **SAMPLING, branch="cond", filename=f"half_test/features_{tag}")
        (patched,) = node(comfy, "CE_SAeUronConceptBlock").patch(
            model, sae, BLOCK, "cat", -5.0, "top_n", 8, 99.999, "conventional", False, features=stats)[:1]
    assert_unchanged(model, before_m)
    assert_unchanged(clip, before_c)
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert torch.isfinite(stats.means).all()

    # the edit changes the fired tokens and leaves every other token bit-exact, in the block's own dtype; an SAE
    # that Load SAE loaded in half precision edits the same tokens
    import comfy.patcher_extension as pe

    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    base = block_output(model, x, None, ctx)
    assert base.dtype == half.compute
    b = base.flatten(2).transpose(1, 2)  # [batch, tokens, channels]
    for sae_dtype in (torch.float32, torch.float16, torch.bfloat16):
        copy = deepcopy(sae).to(sae_dtype)
        features = stats
        if sae_dtype == torch.bfloat16:
            # a bfloat16 copy is not the SAE of the float32 table: refused, saying how to load it; its own table works
            with pytest.raises(ValueError, match="held in bfloat16.*load it as float32 or float16"), \
                    torch.inference_mode():
                node(comfy, "CE_SAeUronConceptBlock").patch(model, copy, BLOCK, "cat", -5.0, "top_n", 8, 99.999,
                                                            "conventional", False, features=stats)
            with torch.inference_mode():
                features, _ = node(comfy, "CE_SAeUronConceptFeatures").gather(
                    model, clip, copy, BLOCK, "cat: a photo of a cat\ndog: a photo of a dog", "a photo of a house",
                    **SAMPLING, branch="cond", filename=f"half_test/features_bf16_{tag}")
        with torch.inference_mode():
            (other,) = node(comfy, "CE_SAeUronConceptBlock").patch(
                model, copy, BLOCK, "cat", -5.0, "top_n", 8, 99.999, "conventional", False, features=features)[:1]
        (patch,) = other.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, "concept_erasure.saeuron")
        edited = block_output(other, x, None, ctx)
        assert edited.dtype == half.compute and torch.isfinite(edited).all()
        fired = patch.hook.last_fired.reshape(2, -1)
        assert fired.any() and not fired.all(), (sae_dtype, fired)
        e = edited.flatten(2).transpose(1, 2)
        assert torch.equal(e[~fired], b[~fired]), sae_dtype
        assert not torch.equal(e[fired], b[fired]), sae_dtype
    assert sae.dtype == torch.float32

    # sampling and the firing map
    with torch.inference_mode():
        vae = tiny_vae()
        latent = sample(comfy, patched, clip)
        (images,) = comfy.nodes.VAEDecode().decode(vae, {"samples": latent})
        mask, over, _ = node(comfy, "CE_SAeUronFiringMap").firing_map(patched, images)["result"]
    assert torch.isfinite(latent).all() and torch.isfinite(mask).all() and torch.isfinite(over).all()
    assert mask.shape == (1, SIZE, SIZE)
    assert_unchanged(model, before_m)


# ---------------------------------------------------------------------------------------------
# ItD and Collect Text Activations (text encoders in float16, SAEs as Load SAE's dtype choice loads them)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def itd_clip(comfy):
    """A float16 SD1 CLIP of ItD's test shape (64 wide, 4 layers) and its word SAE (``test_itd_node.word_sae``)."""
    from test_itd_node import LAYERS, WIDTH, word_sae

    with torch.inference_mode():
        clip = tiny_half_clip("SD15", WIDTH, torch.float16, layers=LAYERS)
    return clip, word_sae(clip)


def encode(clip, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return cond.clone(), pooled.clone()


@pytest.mark.parametrize("sae_dtype", ["float32", "float16", "bfloat16"])
def test_itd_on_a_half_clip(comfy, itd_clip, sae_dtype):
    from test_itd_node import LAYER, OTHERS

    clip, sae32 = itd_clip
    sae = sae32.to(comfy.nodes_pkg.common.torch_dtype(sae_dtype))
    before = snapshot(clip)
    with torch.inference_mode():
        patched, report, _ = node(comfy, "CE_ItDPromptClassifier").classify(
            clip, sae, "cat, dragon", "a photo of a house\nhouse", LAYER, -8.0, top_n=8)["result"]
    assert_unchanged(clip, before)
    assert "nan" not in report.lower()
    for prompt in OTHERS:  # unflagged prompts: bit-exact, pooled output included
        a, b = encode(patched, prompt), encode(clip, prompt)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), prompt
    flagged, plain = encode(patched, "a photo of a cat"), encode(clip, "a photo of a cat")
    assert torch.isfinite(flagged[0]).all() and not torch.equal(flagged[0], plain[0])
    with torch.inference_mode():
        decision, score, tau = node(comfy, "CE_ItDPromptGate").gate(patched, "a photo of a cat")["result"]
        passed, *_ = node(comfy, "CE_ItDPromptGate").gate(patched, OTHERS[0])["result"]
    assert decision and not passed and torch.isfinite(torch.tensor([score, tau])).all()
    assert_unchanged(clip, before)


def test_collect_text_activations_on_a_half_clip(comfy, itd_clip):
    from sae_core.store import ActivationReader

    clip, _ = itd_clip
    before = snapshot(clip)
    with torch.inference_mode():
        (path,) = node(comfy, "CE_CollectTextActivations").collect(
            clip, comfy.nodes_pkg.text_sae.NO_CORPUS, "a photo of a cat\na painting of a house", 2, "all", 0,
            "half_test/text_acts", "float32", False)
    assert_unchanged(clip, before)
    reader = ActivationReader(path)
    acts = reader.read_all(dtype=None)
    assert len(reader) > 0 and acts.dtype == torch.float32 and torch.isfinite(acts).all()


# ---------------------------------------------------------------------------------------------
# Erasure Report and Concept Inversion Probe
# ---------------------------------------------------------------------------------------------

def test_report_and_probe_on_half_models(comfy, half, tmp_path):
    from tiny_models import tiny_clip_vision

    model, clip = half.model, half.clip
    with torch.inference_mode():
        (erased,) = comfy.nodes.LoraLoader().load_lora(model, clip, _rece_lora(comfy, model, clip), 1.0, 0.0)[:1]
        vision = tiny_clip_vision(tmp_path, projection=32)
        vae = tiny_vae()
    before_m, before_e, before_c = snapshot(model), snapshot(erased), snapshot(clip)
    with torch.inference_mode():
        grid, text = node(comfy, "CE_ErasureReport").report(
            model, clip, erased, vae, "a photo of a cat", "a photo of a house", "0", "object", "a cat", 2, 4.0,
            "euler", "normal", judge="clip_vision", width=SIZE, height=SIZE, clip_vision=vision,
            judge_labels="a photo\na painting")["result"]
    assert torch.isfinite(grid).all() and "nan" not in text.lower()
    probe, ptext = node(comfy, "CE_ConceptInversionProbe").probe(
        model, clip, erased, "a photo of a cat", 1, 3, 0.02, 1, 0, 2, 4.0, "euler", "normal", SIZE, SIZE)["result"]
    assert torch.isfinite(probe[0][0]).all() and "nan" not in ptext.lower()
    assert probe[0][0].dtype == torch.float32
    for m, b in ((model, before_m), (erased, before_e), (clip, before_c)):
        assert_unchanged(m, b)


def _rece_lora(comfy, model, clip) -> str:
    with torch.inference_mode():
        _, edit = node(comfy, "CE_RECEEditModel").edit(model, clip, "a cat", "", "a house", "uce", 0, 1e-3,
                                                       device="cpu")
        name = node(comfy, "CE_SaveEditAsLoRA").save(edit, "half_test/report")["result"][1]
    comfy.folder_paths.filename_list_cache.clear()
    return name


# ---------------------------------------------------------------------------------------------
# gradients in float32: Selective Amnesia's "fp32" precision and the probe's search
# ---------------------------------------------------------------------------------------------

class GradDtypes:
    """Records the dtype each attn2.to_k layer of a UNet computes in while autograd records (training)."""

    def __init__(self, model) -> None:
        self.seen: set[torch.dtype] = set()
        mods = [m for n, m in model.model.diffusion_model.named_modules() if n.endswith("attn2.to_k")]
        self.handles = [m.register_forward_pre_hook(self._hook) for m in mods]

    def _hook(self, _module, args) -> None:
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            self.seen.add(args[0].dtype)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def test_training_in_fp32_precision_computes_in_float32_on_half_models(comfy, half):
    """precision fp32 (Fisher, LoRA Train) and the probe's search take their gradients through a float32 UNet, as
    ComfyUI's own LoRA training sets its compute dtype: through an fp16 UNet, gradients below 6e-8 flush to zero and
    the LoRA's small update rounds away in the fp16 weight; bf16 keeps 8 bits of the weight."""
    model, clip = half.model, half.clip
    tag = half.tag
    with GradDtypes(model) as fisher_seen, torch.inference_mode():
        (fisher,) = node(comfy, "CE_SAComputeFisher").compute(
            model, clip, "a photo of a dog", 1, 1, 1, "xattn", 0, 1, 4.0, "euler", "normal", SIZE, SIZE, "fp32",
            f"half_test/fisher32_{tag}")
    with GradDtypes(model) as train_seen, torch.inference_mode():
        node(comfy, "CE_SALoRATrain").train(
            model, clip, "a photo of a cat", "a photo of a dog", "a photo of a house", 10.0, 1.0, 2, 1, 1e-2, 1, 0,
            "xattn", 1, 1, 1, 4.0, "euler", "normal", SIZE, SIZE, "fp32", f"half_test_sa32_{tag}", fisher_path=fisher)
    with GradDtypes(model) as bf16_seen, torch.inference_mode():
        node(comfy, "CE_SALoRATrain").train(
            model, clip, "a photo of a cat", "a photo of a dog", "a photo of a house", 10.0, 1.0, 2, 1, 1e-2, 1, 0,
            "xattn", 1, 1, 1, 4.0, "euler", "normal", SIZE, SIZE, "bf16", f"half_test_sa16_{tag}", fisher_path=fisher)
    with GradDtypes(model) as probe_seen:
        node(comfy, "CE_ConceptInversionProbe").probe(model, clip, model, "a photo of a cat", 1, 1, 0.02, 1, 0, 1,
                                                      4.0, "euler", "normal", SIZE, SIZE)
    assert fisher_seen.seen == {torch.float32}
    # the estimate records its float32 gradients, so one made with half-precision gradients (same settings, before
    # the fix) is not reused as it
    import json

    from sae_core.amnesia.fisher import load_fisher

    assert json.loads(load_fisher(fisher).metadata["comfy_settings"]).get("gradients") == "float32"
    assert train_seen.seen == {torch.float32}
    assert bf16_seen.seen == {torch.bfloat16}
    assert probe_seen.seen == {torch.float32}
