"""SAeUron nodes on SD2.x and SDXL layouts in a real ComfyUI: block names, the update source, per-concept
parameters and the published sdxl-unbox SAE format.

The models are the tiny SD2.x (v-prediction, linear transformer projections, OpenCLIP-H text shape) and SDXL
(no attention at the first level, two transformer blocks per SpatialTransformer, ADM conditioning) pairs of
``tiny_models``, built through ComfyUI's own classes; block resolution is also checked on SDXL's and SD2.x's
full-size layouts, built on the meta device. Each family runs Collect SAE Activations (source ``diff``) ->
Train SAE -> SAeUron Concept Features -> SAeUron Concept Block -> sampling; the edited block is
``output_blocks.1.1`` (64 channels, 4x4 tokens at 64x64 pixels; SDXL's ``up.0.1``), which an Upsample follows.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tiny_models import (
    patcher,
    tiny_sd1_clip,
    tiny_sd2_clip,
    tiny_sd20,
    tiny_sdxl,
    tiny_sdxl_clip,
)

COLLECT_ID = "CE_CollectSAEActivations"
TRAIN_ID = "CE_TrainSAE"
FEATURES_ID = "CE_SAeUronConceptFeatures"
BLOCK_ID = "CE_SAeUronConceptBlock"
LOAD_ID = "CE_LoadSAE"

BLOCK = "output_blocks.1.1"
CONSUMER = "output_blocks.1.2"  # the Upsample that reads the edited block's output
WIDTH = 64
SIZE = 64
STEPS = 2
TOKENS = (SIZE // 8 // 2) ** 2
PROMPTS = "a photo of a cat\na photo of a dog"
CONCEPTS = "cat: a photo of a cat\ndog: a photo of a dog"
OTHERS = "a photo of a house"
SAMPLING = dict(steps=STEPS, cfg=5.0, seed=7, sampler_name="euler", scheduler="normal", width=SIZE, height=SIZE)
PAIRS = {"SD20": lambda: (tiny_sd20(), tiny_sd2_clip()), "SDXL": lambda: (tiny_sdxl(), tiny_sdxl_clip())}

SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
"""SDXL base's UNet layout (ComfyUI's unet_config of sd_xl_base_1.0)."""

SD21_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 1024, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1,
                                                                                          0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
"""SD2.x's UNet layout (768-v and 512-base share it)."""

torch.set_num_threads(1)


def _node(comfy, node_id):
    return comfy.nodes.NODE_CLASS_MAPPINGS[node_id]()


def _run(fn, *args, **kw):
    with torch.inference_mode():
        return fn(*args, **kw)


def _sample(model, clip, prompt="a photo of a cat", seed=11):
    import comfy.sample

    pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", pos, neg, latent, disable_pbar=True,
                                   seed=seed)


def _patch_of(patched):
    import comfy.patcher_extension as pe

    (patch,) = patched.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, "concept_erasure.saeuron")
    return patch


def _no_hooks_left(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.model.modules()) and not model.wrappers


def _block(comfy, model, sae, features, **kw):
    args = dict(block=BLOCK, concepts="", gamma=-1.0, selection="top_n", top_n=1, percentile=99.999,
                error_mode="conventional", cond_only=False, features=features)
    args.update(kw)
    return _run(_node(comfy, BLOCK_ID).patch, model, sae, **args)[0]


@pytest.fixture(scope="module", params=sorted(PAIRS))
def family(comfy, request):
    """One family's pipeline, made by the nodes: a store of the block's updates, an SAE trained on it, and
    concept features measured on the updates."""
    name = request.param
    with torch.inference_mode():
        model, clip = PAIRS[name]()
    tag = f"sd2_sdxl_{name}"
    dataset = _run(_node(comfy, COLLECT_ID).collect, model, clip, prompts=PROMPTS, block="up.0.1", **SAMPLING,
                   branch="cond", dataset_name=f"{tag}/acts", store_dtype="float32", overwrite=False, source="diff")[0]
    sae, sae_path = _run(_node(comfy, TRAIN_ID).train, dataset, expansion_factor=2, num_latents=0, k=4, steps=40,
                         lr=1e-2, batch_size=32, seed=0, filename=f"{tag}/sae", overwrite=False,
                         dead_feature_threshold=10_000, device="cpu")
    stats, _ = _run(_node(comfy, FEATURES_ID).gather, model, clip, sae, block=BLOCK, concept_prompts=CONCEPTS,
                    other_prompts=OTHERS, **SAMPLING, branch="cond", filename=f"{tag}/features")
    return SimpleNamespace(name=name, model=model, clip=clip, dataset=dataset, sae=sae, sae_path=sae_path,
                           stats=stats, tag=tag)


# ---------------------------------------------------------------------------------------------
# block names per layout
# ---------------------------------------------------------------------------------------------


def test_full_size_layouts_resolve_the_literature_blocks(comfy):
    """On SDXL base's layout (built on the meta device) the sdxl-unbox blocks are the 1280-wide, ten-deep
    transformers, the first level has none, and diffusers and short names agree; SD2.x resolves SAeUron's."""
    import comfy.supported_models as supported  # as: the name `comfy` is the fixture here

    blocks = comfy.nodes_pkg.unet_blocks
    sdxl = patcher(supported.SDXL(dict(SDXL_UNET)), device="meta")
    found = blocks.spatial_transformer_blocks(sdxl)
    assert not [n for n in found if n.startswith(("input_blocks.1.", "input_blocks.2.", "output_blocks.6.",
                                                  "output_blocks.7.", "output_blocks.8."))]
    assert len(found) == 2 + 2 + 1 + 3 + 3  # two levels with attention on the way down, the middle, three up
    published = {short: ldm for short, ldm, _ in blocks.literature_blocks(sdxl)}
    assert published == {"down.2.1": "input_blocks.8.1", "mid.0": "middle_block.1", "up.0.0": "output_blocks.0.1",
                         "up.0.1": "output_blocks.1.1"}
    for short, ldm in published.items():
        module = found[ldm]
        assert blocks.block_width(module) == 1280 and len(module.transformer_blocks) == 10
        diffusers = "unet." + blocks.short_to_diffusers(short)
        assert blocks.resolve_block(sdxl, diffusers)[0] == blocks.resolve_block(sdxl, short)[0] == ldm
    assert len(found["input_blocks.4.1"].transformer_blocks) == 2 and blocks.block_width(found["input_blocks.4.1"]) == 640
    with pytest.raises(ValueError, match=r"'up.2.0' is not a SpatialTransformer block of this SDXL UNet.*"
                                         r"published SAEs hook down.2.1 = input_blocks.8.1"):
        blocks.resolve_block(sdxl, "up.2.0")  # the last up level of SDXL has no attention

    sd2 = patcher(supported.SD20(dict(SD21_UNET)), device="meta")
    assert [c for _, c, _ in blocks.literature_blocks(sd2)] == ["output_blocks.4.1", "output_blocks.5.1"]
    assert blocks.resolve_block(sd2, "unet.up_blocks.1.attentions.2")[0] == "output_blocks.5.1"
    assert sd2.model.diffusion_model.output_blocks[5][1].use_linear  # SD2's linear projections


def test_tiny_layouts_and_names(comfy, family):
    blocks = comfy.nodes_pkg.unet_blocks
    model = family.model
    names = list(blocks.spatial_transformer_blocks(model))
    if family.name == "SDXL":
        assert names == ["input_blocks.3.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1"]
        assert all(len(m.transformer_blocks) == 2 for m in blocks.spatial_transformer_blocks(model).values())
        assert blocks.resolve_block(model, "mid.0")[0] == "middle_block.1"
        assert blocks.resolve_block(model, "down.1.0")[0] == "input_blocks.3.1"
    else:
        assert names == ["input_blocks.1.1", "input_blocks.3.1", "middle_block.1", "output_blocks.0.1",
                         "output_blocks.1.1", "output_blocks.2.1", "output_blocks.3.1"]
        assert blocks.resolve_block(model, "up.1.1")[0] == "output_blocks.3.1"
    assert blocks.resolve_block(model, "unet.up_blocks.0.attentions.1")[0] == BLOCK
    assert blocks.resolve_block(model, "diffusion_model." + BLOCK)[0] == BLOCK


# ---------------------------------------------------------------------------------------------
# collection and training on the update
# ---------------------------------------------------------------------------------------------


def test_collected_rows_are_the_block_update(comfy, family):
    """The store holds output minus input of the block (cond rows), equal to what a plain hook computes while
    the same prompt is sampled again with the same seed; the SAE trained on it records that it reads updates."""
    from sae_core.store import ActivationReader

    sampling_mod = comfy.nodes_pkg.sampling
    model, clip = family.model, family.clip
    reader = ActivationReader(family.dataset)
    assert reader.attrs["source"] == "diff" and reader.attrs["settings"]["source"] == "diff"
    assert reader.attrs["hookpoint"] == BLOCK and len(reader) == 2 * STEPS * TOKENS
    batch = reader.read_all(columns=("step", "prompt_index", "position"))
    sampling = sampling_mod.ComfySampling(model, clip, **{k: v for k, v in SAMPLING.items()})
    seen = {}

    def record(_module, args, output):  # returns None: the output is left as it is
        mask = sampling.state.cond_mask()
        update = (output - args[0]).detach()
        seen[sampling.state.step_index()] = update[mask] if mask is not None else update

    module = model.model.diffusion_model.get_submodule(BLOCK)
    handle = module.register_forward_hook(record)
    try:
        with torch.inference_mode():
            sampling.sample("a photo of a dog", 1)  # prompt 1 of the store: seed + 1
    finally:
        handle.remove()
    for step in range(STEPS):
        keep = (batch.meta["step"] == step) & (batch.meta["prompt_index"] == 1)
        rows = batch.activations[keep][batch.meta["position"][keep].argsort()]
        want = seen[step][0].permute(1, 2, 0).reshape(-1, WIDTH)
        torch.testing.assert_close(rows, want, rtol=1e-4, atol=1e-5)
    assert family.sae.cfg.extra["source"] == "diff"
    assert json.loads((comfy.base / "models" / "sae" / family.tag / "sae" / "cfg.json").read_text())["source"] == "diff"
    assert family.stats.attrs["source"] == "diff"  # Features' source auto = what the SAE records
    assert _no_hooks_left(model)


# ---------------------------------------------------------------------------------------------
# the block edit
# ---------------------------------------------------------------------------------------------


def _record_first_call(model, patched, clip):
    """Inputs of every SpatialTransformer, the block's own (input, output) before the edit, what the consumer
    reads, and the features step of each call, during one sampling of ``patched``."""
    unet = model.model.diffusion_model
    rec = SimpleNamespace(st_in={}, xy=[], consumed=[], steps=[])
    patch = _patch_of(patched) if patched is not model else None
    # every hook returns None: what the model computes is left as it is

    def block_input(name):
        def hook(_m, args):
            if name not in rec.st_in:  # the first UNet call
                rec.st_in[name] = args[0].detach().clone()
        return hook

    def block_io(_m, args, out):  # registered before sampling: runs before the Concept Block's own hook
        rec.xy.append((args[0].detach().clone(), out.detach().clone()))

    def consumer(_m, args):
        rec.consumed.append(args[0].detach().clone())
        if patch is not None:
            rec.steps.append(patch.last_step)

    handles = [module.register_forward_pre_hook(block_input(name)) for name, module in comfy_blocks(model).items()]
    handles.append(unet.get_submodule(BLOCK).register_forward_hook(block_io))

    handles.append(unet.get_submodule(CONSUMER).register_forward_pre_hook(consumer))
    try:
        out = _sample(patched, clip)
    finally:
        for h in handles:
            h.remove()
    return rec, out


def comfy_blocks(model):
    from comfy.ldm.modules import attention

    return {n: m for n, m in model.model.diffusion_model.named_modules() if isinstance(m, attention.SpatialTransformer)}


def test_block_edits_the_update_of_the_chosen_block_only(comfy, family):
    """The hook changes the chosen block and nothing before it; what the next module reads is the block's input
    plus the SAeUron edit of the update (output - input); the input MODEL is unchanged."""
    model, clip, sae = family.model, family.clip, family.sae
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_rec, base = _record_first_call(model, model, clip)
    patched = _block(comfy, model, sae, family.stats, concepts="cat", top_n=2 * WIDTH, gamma=-5.0)
    patch = _patch_of(patched)
    assert patch.block == BLOCK and patch.edit.source == "diff"
    rec, out = _record_first_call(model, patched, clip)
    assert int(patch.hook.fired_tokens) > 0 and not torch.equal(out, base)
    assert rec.steps == list(range(STEPS))  # the features step follows the sampler's sigma (v-prediction too)
    # first UNet call: every transformer up to the chosen one sees the same input, the consumer another
    order = list(comfy_blocks(model))
    for name in order[: order.index(BLOCK) + 1]:
        assert torch.equal(rec.st_in[name], base_rec.st_in[name]), name
    for name in order[order.index(BLOCK) + 1:]:
        assert not torch.equal(rec.st_in[name], base_rec.st_in[name]), name
    x, y = rec.xy[0]
    assert torch.equal(base_rec.consumed[0], y) and not torch.equal(rec.consumed[0], y)
    with torch.inference_mode():
        want = patch.hook(y - x, 0)  # the edit of the update, both CFG halves
    torch.testing.assert_close(rec.consumed[0] - x, want, rtol=1e-5, atol=1e-5)
    # the input MODEL: same weights, no wrapper or hook left, samples as before
    assert not model.wrappers and _no_hooks_left(model)
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())
    assert torch.equal(_sample(model, clip), base)


def test_block_is_bit_exact_when_nothing_fires(comfy, family):
    from sae_core.saeuron import ConceptStats

    s = family.stats
    means = s.means.clone()
    means[s.index("other")] = 1e6  # thresholds above every code
    silent = ConceptStats(s.concepts, means, s.counts, schedule=s.schedule, schedule_kind=s.schedule_kind,
                          hookpoint=s.hookpoint, sae_fingerprint=s.sae_fingerprint, attrs=s.attrs)
    patched = _block(comfy, family.model, family.sae, silent, concepts="cat, dog", top_n=8)
    out = _sample(patched, family.clip)
    assert _patch_of(patched).hook.calls > 0 and int(_patch_of(patched).hook.fired_tokens) == 0
    assert torch.equal(out, _sample(family.model, family.clip))


def test_source_and_concept_params_inputs(comfy, family):
    model, sae, stats = family.model, family.sae, family.stats
    # the source must be the one the features were measured on
    with pytest.raises(ValueError, match="source: the features were measured on the block's update"):
        _block(comfy, model, sae, stats, source="output")
    assert _patch_of(_block(comfy, model, sae, stats, source="diff")).edit.source == "diff"
    # per-concept gamma and rule: cat's line changes cat's part only, dog keeps the block's values
    plain = _patch_of(_block(comfy, model, sae, stats, concepts="cat, dog", top_n=2, gamma=-1.0)).hook.table
    own = _patch_of(_block(comfy, model, sae, stats, concepts="cat, dog", top_n=2, gamma=-1.0,
                           concept_params="cat: -7, top_n=4")
                    ).hook.table
    cat, dog = own.concepts.index("cat"), own.concepts.index("dog")
    for t in range(own.num_steps):
        step, ref = own.step(t), plain.step(t)
        assert int((step.concept == cat).sum()) >= int((ref.concept == cat).sum())
        dog_scales = {i: s for i, s, c in zip(step.indices.tolist(), step.scales.tolist(), step.concept.tolist())
                      if c == dog}
        for i, s in dog_scales.items():
            assert s == pytest.approx(float(-1.0 * stats.mu("dog")[t, i]))
        for i, s, c in zip(step.indices.tolist(), step.scales.tolist(), step.concept.tolist()):
            if c == cat:
                assert s == pytest.approx(float(-7.0 * stats.mu("cat")[t, i]))
    with pytest.raises(ValueError, match=r"concept_params line 2 \('dog: -1, top_n=0'\): top_n must be"):
        _block(comfy, model, sae, stats, concept_params="cat: -2\ndog: -1, top_n=0")
    with pytest.raises(ValueError, match="concept_params: 'horse' is not a concept of the feature table"):
        _block(comfy, model, sae, stats, concept_params="horse: -2")
    assert not model.wrappers


def test_a_clip_or_sae_of_another_model_is_refused(comfy, family):
    """A CLIP of another checkpoint, an SAE or a feature table made on another family, and an explicit source the
    SAE was not trained on are clear errors naming the input, before anything is sampled or written."""
    from sae_core.config import SaeConfig
    from sae_core.sae import SparseAutoencoder
    from sae_core.saeuron import ConceptStats

    model, sae, stats = family.model, family.sae, family.stats
    with torch.inference_mode():  # SD2.x: token width 24 for a 32-wide context; SDXL: an SD1 CLIP has no clip_g
        other_clip = tiny_sd1_clip(24 if family.name == "SD20" else 32)
    wanted = (r"clip: its conditioning is 24 wide but model \(\w+\) reads 32-wide" if family.name == "SD20" else
              r"clip: its pooled output is \d+ wide, which makes a 1568-wide ADM input, but model \(SDXL\) reads 1552")
    with pytest.raises(ValueError, match=wanted):
        _run(_node(comfy, COLLECT_ID).collect, model, other_clip, prompts=PROMPTS, block=BLOCK, **SAMPLING,
             branch="cond", dataset_name=f"{family.tag}/wrong_clip", store_dtype="float32", overwrite=False)
    assert not (comfy.base / "output" / "sae_activations" / family.tag / "wrong_clip").exists()

    sd1_sae = SparseAutoencoder(SaeConfig(d_in=WIDTH, num_latents=2 * WIDTH, k=4, model_family="SD15"))
    with pytest.raises(ValueError, match=f"sae: made on a SD15 model, but this model is {family.name}"):
        _run(_node(comfy, FEATURES_ID).gather, model, family.clip, sd1_sae, block=BLOCK, concept_prompts=CONCEPTS,
             other_prompts=OTHERS, **SAMPLING, branch="cond", filename=f"{family.tag}/sd1_features")
    with pytest.raises(ValueError, match="source: the SAE was trained on the block's update"):
        _run(_node(comfy, FEATURES_ID).gather, model, family.clip, sae, block=BLOCK, concept_prompts=CONCEPTS,
             other_prompts=OTHERS, **SAMPLING, branch="cond", filename=f"{family.tag}/output_features",
             source="output")
    assert not list((comfy.base / "models" / "sae_features" / family.tag).glob("*_features.safetensors"))
    sd1_stats = ConceptStats(stats.concepts, stats.means, stats.counts, schedule=stats.schedule,
                             schedule_kind=stats.schedule_kind, hookpoint=stats.hookpoint,
                             sae_fingerprint=stats.sae_fingerprint, attrs={**stats.attrs, "model_family": "SD15"})
    with pytest.raises(ValueError, match=f"features: made on a SD15 model, but this model is {family.name}"):
        _block(comfy, model, sae, sd1_stats)
    assert not model.wrappers


# ---------------------------------------------------------------------------------------------
# the published sdxl-unbox format
# ---------------------------------------------------------------------------------------------


def _write_unbox(folder, d: int, n: int, k: int, seed: int = 0) -> None:
    """An SAE folder in the published sdxl-unbox layout (config.json, a torch-saved state dict, per-latent
    mean/std files), with random weights and unit-norm decoder columns."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    enc = torch.randn(n, d, generator=g) / d ** 0.5
    dec = enc.t().clone()
    dec = dec / dec.norm(dim=0, keepdim=True)
    state = {"encoder.weight": enc, "decoder.weight": dec, "pre_bias": torch.randn(d, generator=g) * 0.01,
             "latent_bias": torch.zeros(n), "stats_last_nonzero": torch.zeros(n, dtype=torch.long)}
    torch.save({"state_dict": state}, folder / "state_dict.pth")
    (folder / "config.json").write_text(json.dumps({"n_dirs_local": n, "d_model": d, "k": k, "auxk": 16,
                                                    "dead_steps_threshold": 2441}))
    torch.save(torch.rand(n, generator=g) * 20, folder / "mean.pt")
    torch.save(torch.rand(n, generator=g) * 10, folder / "std.pt")


def test_sdxl_unbox_sae_through_load_sae_features_and_block(comfy):
    """A folder in the sdxl-unbox layout appears in Load SAE, loads as an SAE of updates of its diffusers block,
    and Concept Features / Concept Block use it on SDXL without being told the block's name or the source."""
    run = "unet.up_blocks.0.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001"
    _write_unbox(comfy.base / "models" / "sae" / "sdxl-unbox" / run / "final", d=WIDTH, n=256, k=10)
    load = _node(comfy, LOAD_ID)
    name = f"sdxl-unbox/{run}/final/state_dict.pth"
    assert name in load.INPUT_TYPES()["required"]["sae_name"][0]
    (sae,) = _run(load.load, name, "cpu", "float32")
    assert sae.cfg.extra["source_format"] == "sdxl_unbox" and sae.cfg.extra["source"] == "diff"
    assert (sae.cfg.d_in, sae.cfg.num_latents, sae.cfg.k) == (WIDTH, 256, 10)
    with torch.inference_mode():
        model, clip = tiny_sdxl(), tiny_sdxl_clip()
    stats, _ = _run(_node(comfy, FEATURES_ID).gather, model, clip, sae, block=sae.cfg.hookpoint,
                    concept_prompts=CONCEPTS, other_prompts=OTHERS, **SAMPLING, branch="cond",
                    filename="sd2_sdxl_unbox/features")
    assert stats.hookpoint == BLOCK and stats.attrs["source"] == "diff"
    patched = _block(comfy, model, sae, stats, block="", concepts="cat", top_n=16, gamma=-5.0)
    patch = _patch_of(patched)
    assert patch.block == BLOCK and patch.edit.source == "diff"
    out = _sample(patched, clip)
    assert int(patch.hook.fired_tokens) > 0 and torch.isfinite(out).all()
    assert not torch.equal(out, _sample(model, clip))
