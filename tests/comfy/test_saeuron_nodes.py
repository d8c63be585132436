"""SAeUron nodes in a real ComfyUI, on a tiny SD1.x-structured model built with ComfyUI's own classes.

The pipeline runs end to end: Collect SAE Activations (2 prompts x 3 steps) -> Train SAE (tiny) ->
SAeUron Concept Features -> SAeUron Concept Block -> sampling. The hooked block is
``output_blocks.1.1`` (64 channels, 4x4 tokens at 64x64 pixels), which an Upsample follows, as
``output_blocks.5.1`` is followed in SD1.5. Models are built inside ``torch.inference_mode()``, as a
checkpoint loader node builds them.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

COLLECT_ID = "CE_CollectSAEActivations"
TRAIN_ID = "CE_TrainSAE"
FEATURES_ID = "CE_SAeUronConceptFeatures"
BLOCK_ID = "CE_SAeUronConceptBlock"
DOWNLOAD_ID = "CE_DownloadSAE"

BLOCK = "output_blocks.1.1"
WIDTH = 64
SIZE = 64
STEPS = 3
TOKENS = (SIZE // 8 // 2) ** 2  # the block works at half the latent resolution
PROMPTS = "a photo of a cat\na photo of a dog"
CONCEPTS = "cat: a photo of a cat\ndog: a photo of a dog"
OTHERS = "a photo of a house"
SAMPLING = dict(steps=STEPS, cfg=5.0, seed=7, sampler_name="euler", scheduler="normal", width=SIZE, height=SIZE)

torch.set_num_threads(1)


def _node(comfy, node_id):
    return comfy.nodes.NODE_CLASS_MAPPINGS[node_id]()


def _collect(comfy, model, clip, name="saeuron_test/acts", **kw):
    args = dict(prompts=PROMPTS, block=BLOCK, **SAMPLING, branch="cond", dataset_name=name, store_dtype="float32",
                overwrite=False)
    args.update(kw)
    with torch.inference_mode():
        return _node(comfy, COLLECT_ID).collect(model, clip, **args)[0]


def _train(comfy, dataset, name="saeuron_test/sae", **kw):
    args = dict(expansion_factor=2, num_latents=0, k=4, steps=40, lr=1e-2, batch_size=32, seed=0, filename=name,
                overwrite=False, dead_feature_threshold=10_000, device="cpu")
    args.update(kw)
    with torch.inference_mode():
        return _node(comfy, TRAIN_ID).train(dataset, **args)


def _features(comfy, model, clip, sae, name="saeuron_test/features", **kw):
    args = dict(block=BLOCK, concept_prompts=CONCEPTS, other_prompts=OTHERS, **SAMPLING, branch="cond", filename=name)
    args.update(kw)
    with torch.inference_mode():
        return _node(comfy, FEATURES_ID).gather(model, clip, sae, **args)


def _block(comfy, model, sae, features=None, **kw):
    args = dict(block=BLOCK, concepts="", gamma=-1.0, selection="top_n", top_n=1, percentile=99.999,
                error_mode="conventional", cond_only=False, features=features)
    args.update(kw)
    with torch.inference_mode():
        return _node(comfy, BLOCK_ID).patch(model, sae, **args)[0]


def _patch_of(patched):
    import comfy.patcher_extension as pe

    (patch,) = patched.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, "concept_erasure.saeuron")
    return patch


def _forward(model, x, sigma, ctx, sample_sigmas=None, order=(1, 0)):
    """x0 prediction of ``model`` as a sampler calls it (its wrappers and CFG layout in transformer_options)."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device  # the GPU under COMFYUI_DEVICE=gpu
    sig = torch.full((x.shape[0],), float(sigma), device=device)
    options = {"wrappers": pe.copy_nested_dicts(model.wrappers), "cond_or_uncond": list(order), "sigmas": sig}
    if sample_sigmas is not None:
        options["sample_sigmas"] = sample_sigmas.to(device)
    with torch.no_grad():
        out = model.model.apply_model(x.to(device), sig, c_crossattn=ctx.to(device), transformer_options=options)
    return out.to("cpu").clone()


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=g), torch.randn(2, 77, 32, generator=g)


def _sample(model, clip, prompt="a photo of a cat", seed=11, cfg=5.0):
    import comfy.sample

    pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "normal", pos, neg, latent,
                                   disable_pbar=True, seed=seed)


def _schedule(model):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).float()


def _no_hooks_left(model) -> bool:
    modules = list(model.model.modules())
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in modules) and not model.wrappers


@pytest.fixture(scope="module")
def pipeline(comfy, tiny):
    model, clip = tiny
    dataset = _collect(comfy, model, clip)
    sae, sae_path = _train(comfy, dataset)
    stats, stats_path = _features(comfy, model, clip, sae)
    return SimpleNamespace(model=model, clip=clip, dataset=dataset, sae=sae, sae_path=sae_path, stats=stats,
                           stats_path=stats_path)


# ---------------------------------------------------------------------------------------------
# collection
# ---------------------------------------------------------------------------------------------


def test_collect_writes_a_store_with_step_sigma_cond_and_prompt(comfy, pipeline):
    from sae_core.store import ActivationReader

    reader = ActivationReader(pipeline.dataset)
    assert Path(pipeline.dataset) == comfy.base / "output" / "sae_activations" / "saeuron_test" / "acts"
    assert reader.d == WIDTH and reader.attrs["hookpoint"] == BLOCK
    assert len(reader) == 2 * STEPS * TOKENS  # conditional rows only
    batch = reader.read_all(columns=("step", "timestep", "sigma", "cond", "prompt_index", "position"))
    meta = batch.meta
    assert sorted(meta["step"].unique().tolist()) == list(range(STEPS))
    assert meta["cond"].eq(1).all() and sorted(meta["prompt_index"].unique().tolist()) == [0, 1]
    assert sorted(meta["position"].unique().tolist()) == list(range(TOKENS))
    # every (prompt, step) holds exactly one image's tokens
    cells = (meta["prompt_index"].long() * STEPS + meta["step"].long()).bincount(minlength=2 * STEPS)
    assert cells.tolist() == [TOKENS] * (2 * STEPS)
    # the step index, sigma and timestep agree with the run's schedule (euler evaluates at the schedule)
    sigmas = torch.tensor(reader.attrs["sigmas"])
    timesteps = torch.tensor(reader.attrs["timesteps"])
    torch.testing.assert_close(sigmas, _schedule(pipeline.model)[:-1])
    torch.testing.assert_close(meta["sigma"], sigmas[meta["step"].long()])
    torch.testing.assert_close(meta["timestep"], timesteps[meta["step"].long()])
    assert torch.isfinite(batch.activations).all() and batch.activations.std() > 0
    assert _no_hooks_left(pipeline.model)


def test_collected_rows_are_the_block_output(comfy, pipeline):
    """Prompt 0's first-step rows equal the block output of a forward at the first sigma with that prompt."""
    import comfy.sample as comfy_sample
    from sae_core.capture import capture
    from sae_core.store import ActivationReader

    model, clip = pipeline.model, pipeline.clip
    batch = ActivationReader(pipeline.dataset).read_all(columns=("step", "prompt_index", "position"))
    keep = (batch.meta["step"] == 0) & (batch.meta["prompt_index"] == 0)
    rows = batch.activations[keep][batch.meta["position"][keep].argsort()]

    sigma = _schedule(model)[0]
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    noise = comfy_sample.prepare_noise(latent, SAMPLING["seed"])  # prompt 0 uses the node's seed
    x = model.get_model_object("model_sampling").noise_scaling(sigma, noise, latent, max_denoise=True)
    ctx = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))[0][0]
    with capture(model.model.diffusion_model, BLOCK) as probe:
        _forward(model, x, sigma, ctx, order=(0,))
    want = probe.tensors[0][0].permute(1, 2, 0).reshape(-1, WIDTH)
    torch.testing.assert_close(rows, want, rtol=1e-4, atol=1e-5)


def test_collect_reuses_refuses_and_records_both_halves(comfy, pipeline):
    from sae_core.store import ActivationReader

    model, clip = pipeline.model, pipeline.clip
    manifest = Path(pipeline.dataset) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert _collect(comfy, model, clip) == pipeline.dataset and manifest.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other inputs.*seed: 7 there, 8 now.*overwrite"):
        _collect(comfy, model, clip, seed=8)
    both = _collect(comfy, model, clip, name="saeuron_test/both", branch="both", prompts="a photo of a cat")
    reader = ActivationReader(both)
    meta = reader.read_all(columns=("cond", "prompt_index")).meta
    assert len(reader) == 2 * STEPS * TOKENS and int(meta["cond"].sum()) == STEPS * TOKENS
    assert meta["prompt_index"].eq(0).all()
    assert _no_hooks_left(model)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def _fvu(sae, rows: torch.Tensor) -> float:
    with torch.no_grad():
        out = sae(rows)
    return float(out.fvu)


def test_train_saves_a_loadable_sae_that_reconstructs(comfy, pipeline):
    from sae_core.formats import load_sae
    from sae_core.store import ActivationReader

    sae, path = pipeline.sae, Path(pipeline.sae_path)
    assert path == comfy.base / "models" / "sae" / "saeuron_test" / "sae"
    assert (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file()
    assert sae.cfg.d_in == WIDTH and sae.cfg.num_latents == 2 * WIDTH and sae.cfg.k == 4
    assert sae.cfg.hookpoint == BLOCK and not sae.cfg.batch_topk
    assert "saeuron_test/sae/sae.safetensors" in comfy.nodes_pkg.common.sae_filenames()
    loaded = load_sae(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sae.state_dict().values()))
    rows = ActivationReader(pipeline.dataset).read_all()
    untrained = type(sae)(sae.cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        untrained.b_dec.copy_(rows.mean(0))
    assert _fvu(sae, rows) < 0.8 * _fvu(untrained, rows)
    with pytest.raises(ValueError, match="already exists.*overwrite"):
        _train(comfy, pipeline.dataset)
    with pytest.raises(ValueError, match="batch_size.*fewer than one batch"):
        _train(comfy, pipeline.dataset, name="saeuron_test/big", batch_size=10_000)
    with pytest.raises(FileNotFoundError, match="no activation store"):
        _train(comfy, "saeuron_test/missing", name="saeuron_test/x")


def _cancel_after(n: int):
    """An ``interrupt_requested`` stand-in: Cancel is pressed after ``n`` training steps."""
    polls = {"n": 0}

    def requested() -> bool:
        polls["n"] += 1
        return polls["n"] > n

    return requested


def test_train_interrupt_leaves_a_checkpoint_that_resumes(comfy, pipeline, monkeypatch):
    from sae_core.formats import load_sae

    sae_tools = comfy.nodes_pkg.sae_tools
    monkeypatch.setattr(sae_tools, "interrupt_requested", _cancel_after(5))
    with pytest.raises(RuntimeError, match="stopped at step 5"):
        _train(comfy, pipeline.dataset, name="saeuron_test/resumed", steps=12)
    (ckpt,) = (comfy.base / "output" / "sae_training" / "saeuron_test" / "resumed").iterdir()  # one per run identity
    partial = load_sae(ckpt / "sae")  # the checkpoint is a usable SAE
    assert partial.cfg.d_in == WIDTH
    assert not (comfy.base / "models" / "sae" / "saeuron_test" / "resumed").exists()

    monkeypatch.setattr(sae_tools, "interrupt_requested", lambda: False)
    resumed, _ = _train(comfy, pipeline.dataset, name="saeuron_test/resumed", steps=12)
    straight, _ = _train(comfy, pipeline.dataset, name="saeuron_test/straight", steps=12)
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_raising_steps_continues_the_cancelled_run(comfy, pipeline, monkeypatch):
    sae_tools = comfy.nodes_pkg.sae_tools
    monkeypatch.setattr(sae_tools, "interrupt_requested", _cancel_after(4))
    with pytest.raises(RuntimeError, match="stopped at step 4"):
        _train(comfy, pipeline.dataset, name="saeuron_test/raised", steps=8)
    monkeypatch.setattr(sae_tools, "interrupt_requested", lambda: False)
    from sae_core.trainer import SaeTrainer

    calls = []
    real_step = SaeTrainer._train_step

    def counting(self, *args, **kwargs):
        calls.append(self.step)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(SaeTrainer, "_train_step", counting)
    _train(comfy, pipeline.dataset, name="saeuron_test/raised", steps=12)  # more steps: the checkpoint continues
    assert calls == list(range(4, 12))  # steps 4..11 only: the cancelled run's 4 steps were kept


def test_train_names_a_damaged_checkpoint_and_how_to_start_over(comfy, pipeline, monkeypatch):
    """A checkpoint damaged on disk stops every later run of the same data and settings: the error says which run
    folder to delete, and after that the run trains from the start."""
    import shutil

    sae_tools = comfy.nodes_pkg.sae_tools
    monkeypatch.setattr(sae_tools, "interrupt_requested", _cancel_after(2))
    with pytest.raises(RuntimeError, match="stopped at step 2"):
        _train(comfy, pipeline.dataset, name="saeuron_test/damaged", steps=6)
    (run,) = (comfy.base / "output" / "sae_training" / "saeuron_test" / "damaged").iterdir()
    state = run / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:64])
    monkeypatch.setattr(sae_tools, "interrupt_requested", lambda: False)
    with pytest.raises(ValueError, match=f"checkpoint of this run is damaged .*delete the folder {run}"):
        _train(comfy, pipeline.dataset, name="saeuron_test/damaged", steps=6)
    shutil.rmtree(run)
    sae, _ = _train(comfy, pipeline.dataset, name="saeuron_test/damaged", steps=6)
    assert sae.cfg.d_in == WIDTH


def test_train_does_not_resume_a_checkpoint_of_other_data(comfy, pipeline, monkeypatch, tmp_path):
    """A store collected again (same name, same row count) is other data: its run starts afresh, and the
    checkpoint of the first data stays."""
    import shutil

    from sae_core.store import ActivationReader, ActivationWriter

    sae_tools = comfy.nodes_pkg.sae_tools
    monkeypatch.setattr(sae_tools, "interrupt_requested", lambda: False)
    copy = comfy.base / "output" / "sae_activations" / "saeuron_test" / "recollected"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(pipeline.dataset, copy)
    _train(comfy, str(copy), name="saeuron_test/other_data", steps=4)
    rows = ActivationReader(copy).read_all()
    w = ActivationWriter(copy, d=rows.shape[1], overwrite=True)  # the same number of rows, other values
    w.add(torch.randn_like(rows.float()))
    w.close()
    runs = comfy.base / "output" / "sae_training" / "saeuron_test" / "other_data"
    with pytest.raises(ValueError, match="already exists"):
        _train(comfy, str(copy), name="saeuron_test/other_data", steps=4)  # the output SAE is not replaced
    _train(comfy, str(copy), name="saeuron_test/other_data", steps=4, overwrite=True)
    assert len(list(runs.iterdir())) == 2  # the first data's checkpoint is kept beside the new run's


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------


def test_features_table(comfy, pipeline):
    from sae_core.saeuron import ConceptStats, sae_fingerprint

    stats = pipeline.stats
    assert stats.concepts == ["cat", "dog", "other"]
    assert (stats.num_steps, stats.num_latents) == (STEPS, 2 * WIDTH)
    assert stats.hookpoint == BLOCK and stats.sae_fingerprint == sae_fingerprint(pipeline.sae)
    assert stats.counts.eq(1).all()
    assert (stats.means >= 0).all() and (stats.means.sum(-1) > 0).all()
    # the schedule is the model timestep of each evaluation sigma
    ms = pipeline.model.get_model_object("model_sampling")
    torch.testing.assert_close(stats.schedule, ms.timestep(_schedule(pipeline.model)[:-1]).float())
    path = Path(pipeline.stats_path)
    assert path == comfy.base / "models" / "sae_features" / "saeuron_test" / "features.safetensors"
    again = ConceptStats.load(path)
    assert torch.equal(again.means, stats.means) and again.concepts == stats.concepts
    assert "saeuron_test/features.safetensors" in comfy.nodes_pkg.saeuron.feature_filenames()
    # each concept's mean code per step is the spatial mean of the SAE code of its image's block output
    from sae_core.store import ActivationReader
    from sae_core.saeuron import encode_topk_fp32

    batch = ActivationReader(pipeline.dataset).read_all(columns=("step", "prompt_index"))  # same prompts and seed
    for concept, prompt_index in (("cat", 0), ("dog", 1)):
        for t in range(STEPS):
            keep = (batch.meta["step"] == t) & (batch.meta["prompt_index"] == prompt_index)
            acts, idx = encode_topk_fp32(pipeline.sae, batch.activations[keep])
            dense = torch.zeros(acts.shape[0], stats.num_latents).scatter_(1, idx, acts)
            torch.testing.assert_close(stats.mu(concept)[t], dense.mean(0), rtol=1e-4, atol=1e-6)
    assert _no_hooks_left(pipeline.model)


def test_features_keep_an_existing_table_unless_overwrite(comfy, pipeline):
    path = Path(pipeline.stats_path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="turn on overwrite"):
        _features(comfy, pipeline.model, pipeline.clip, pipeline.sae)  # the same name as the pipeline's table
    assert path.read_bytes() == before
    stats, again = _features(comfy, pipeline.model, pipeline.clip, pipeline.sae, overwrite=True)
    assert again == pipeline.stats_path and torch.equal(stats.means, pipeline.stats.means)


def test_features_need_a_contrast(comfy, pipeline):
    with pytest.raises(ValueError, match="second concept or some other_prompts"):
        _features(comfy, pipeline.model, pipeline.clip, pipeline.sae, concept_prompts="cat: a cat", other_prompts="")
    with pytest.raises(ValueError, match="reserved"):
        _features(comfy, pipeline.model, pipeline.clip, pipeline.sae, concept_prompts="other: a cat")


def test_concept_lines_parse(comfy):
    parse = comfy.nodes_pkg.saeuron.parse_concepts
    got = parse("Van Gogh: a house in Van Gogh style\n# comment\n\nVan Gogh: a tree\n(cat:1.2) on a mat\ndog")
    assert got == {"Van Gogh": ["a house in Van Gogh style", "a tree"], "(cat:1.2) on a mat": ["(cat:1.2) on a mat"],
                   "dog": ["dog"]}
    with pytest.raises(ValueError, match="concept_prompts: the line 'cat:' names no prompt"):
        parse("cat:\ndog: a dog")  # a name without its prompt is not a concept named 'cat:' sampling "cat:"


def test_features_refuse_an_sae_of_another_block_or_source(comfy, pipeline):
    """An SAE read at a block it was not trained on, on the quantity (output / update) it was not trained on, or a
    text-encoder SAE gives codes that mean nothing: an error, and no table is written."""
    from sae_core.config import SaeConfig
    from sae_core.sae import SparseAutoencoder

    folder = comfy.base / "models" / "sae_features" / "saeuron_test"
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError, match=r"block: the SAE was trained on 'output_blocks.1.1'.*'output_blocks.0.1'"):
        _features(comfy, pipeline.model, pipeline.clip, pipeline.sae, block="output_blocks.0.1",
                  filename="saeuron_test/other_block")
    with pytest.raises(ValueError, match="source: the SAE was trained on the block's output, so it cannot read its "
                                         "update"):
        _features(comfy, pipeline.model, pipeline.clip, pipeline.sae, source="diff", filename="saeuron_test/diff")
    # an ItD SAE of the text encoder (as Train SAE makes it of a Collect Text Activations store), as wide as a block
    text_sae = SparseAutoencoder(SaeConfig(d_in=32, num_latents=64, k=4, model_family="SD1",
                                           hookpoint="transformer.text_model.encoder.layers.0"))
    with pytest.raises(ValueError, match="sae: the SAE was trained on the text-encoder layer"):
        _features(comfy, pipeline.model, pipeline.clip, text_sae, block="input_blocks.1.1",
                  filename="saeuron_test/text_sae")
    assert sorted(p.name for p in folder.iterdir()) == before
    # the name of a shipped table: the features_file list would give the shipped one, never this one
    with pytest.raises(ValueError, match="filename: 'minicanvas/saeuron_style' is the name of a feature table that "
                                         "ships with MiniCanvas"):
        _features(comfy, pipeline.model, pipeline.clip, pipeline.sae, filename="minicanvas/saeuron_style")
    assert not (comfy.base / "models" / "sae_features" / "minicanvas").exists()


# ---------------------------------------------------------------------------------------------
# the block
# ---------------------------------------------------------------------------------------------


def _silent_stats(pipeline):
    """Features whose thresholds lie above every activation: the edit never fires."""
    from sae_core.saeuron import ConceptStats

    s = pipeline.stats
    means = s.means.clone()
    means[s.index("other")] = 1e6
    return ConceptStats(s.concepts, means, s.counts, schedule=s.schedule, schedule_kind=s.schedule_kind,
                        hookpoint=s.hookpoint, sae_fingerprint=s.sae_fingerprint)


def test_block_is_bit_exact_when_nothing_fires(comfy, pipeline):
    model, clip = pipeline.model, pipeline.clip
    patched = _block(comfy, model, pipeline.sae, _silent_stats(pipeline), concepts="cat, dog", top_n=8)
    patch = _patch_of(patched)
    base = _sample(model, clip)
    edited = _sample(patched, clip)
    assert patch.hook.calls > 0 and int(patch.hook.fired_tokens) == 0
    assert torch.equal(edited, base)


def test_block_edits_both_cfg_halves_and_leaves_the_input_alone(comfy, pipeline):
    model, clip, sae = pipeline.model, pipeline.clip, pipeline.sae
    x, ctx = _inputs()
    sched = _schedule(model)
    sigma = sched[0]
    before = _forward(model, x, sigma, ctx)
    state = {k: v.clone() for k, v in model.model.state_dict().items()}

    patched = _block(comfy, model, sae, pipeline.stats, concepts="cat", top_n=2 * WIDTH, gamma=-5.0)
    assert patched is not model and not model.wrappers and not model.patches
    out = _forward(patched, x, sigma, ctx, sched)
    assert int(_patch_of(patched).hook.fired_tokens) > 0
    changed = [(out[i] - before[i]).abs().max().item() for i in range(2)]
    assert all(c > 0 for c in changed), changed  # uncond (row 0) and cond (row 1) both edited

    only_cond = _block(comfy, model, sae, pipeline.stats, concepts="cat", top_n=2 * WIDTH, gamma=-5.0, cond_only=True)
    out_c = _forward(only_cond, x, sigma, ctx, sched)
    assert torch.equal(out_c[0], before[0]) and not torch.equal(out_c[1], before[1])
    torch.testing.assert_close(out_c[1], out[1])  # the cond row gets the same edit either way

    # sampling with the patched clone differs, and the input MODEL is unchanged afterwards
    assert not torch.equal(_sample(patched, clip), _sample(model, clip))
    assert torch.equal(_forward(model, x, sigma, ctx), before)
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())
    assert _no_hooks_left(model)


def test_step_index_comes_from_sigma(comfy, pipeline):
    import comfy.samplers as comfy_samplers

    model, sae = pipeline.model, pipeline.sae
    patched = _block(comfy, model, sae, pipeline.stats)
    patch = _patch_of(patched)
    x, ctx = _inputs()
    sched = _schedule(model)
    for i in (2, 0, 1, 1):  # any order, repeated calls: the step is where the sigma is
        _forward(patched, x, sched[i], ctx, sched)
        assert patch.last_step == i
    # a 6-step run maps onto the 3 feature steps by nearest timestep: first -> 0, last -> 2, monotone
    longer = comfy_samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6).float()
    seen = []
    for s in longer[:-1]:
        _forward(patched, x, s, ctx, longer)
        seen.append(patch.last_step)
    assert seen[0] == 0 and seen[-1] == STEPS - 1 and seen == sorted(seen)
    # features without a schedule fall back to the sampler's sample_sigmas, mapped proportionally
    from sae_core.saeuron import ConceptStats

    s = pipeline.stats
    bare = ConceptStats(s.concepts, s.means, s.counts, hookpoint=s.hookpoint, sae_fingerprint=s.sae_fingerprint)
    bare_model = _block(comfy, model, sae, bare)
    patch2 = _patch_of(bare_model)
    seen2 = []
    for s_ in longer[:-1]:
        _forward(bare_model, x, s_, ctx, longer)
        seen2.append(patch2.last_step)
    assert seen2 == [0, 0, 1, 1, 2, 2]


def test_block_errors_are_clear(comfy, pipeline):
    from sae_core.config import SaeConfig
    from sae_core.sae import SparseAutoencoder

    model, sae = pipeline.model, pipeline.sae
    narrow = SparseAutoencoder(SaeConfig(d_in=32, num_latents=64, k=4))
    with pytest.raises(ValueError, match=r"32-wide.*'output_blocks.1.1' outputs 64 channels"):
        _block(comfy, model, narrow, pipeline.stats)
    with pytest.raises(ValueError, match=r"'output_blocks.4.1' is not a SpatialTransformer.*valid blocks \(channels\): "
                                         r"input_blocks.1.1 \(32\), input_blocks.3.1 \(64\), middle_block.1 \(64\), "
                                         r"output_blocks.0.1 \(64\)"):
        _block(comfy, model, sae, pipeline.stats, block="output_blocks.4.1")
    with pytest.raises(ValueError, match="unknown concept 'horse'"):
        _block(comfy, model, sae, pipeline.stats, concepts="horse")
    other = SparseAutoencoder(sae.cfg, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="gathered with SAE"):
        _block(comfy, model, other, pipeline.stats)
    with pytest.raises(ValueError, match="measured at 'output_blocks.1.1'.*'output_blocks.0.1'"):
        _block(comfy, model, sae, pipeline.stats, block="output_blocks.0.1")
    with pytest.raises(ValueError, match="wire SAeUron Concept Features"):
        _block(comfy, model, sae, None)
    for bad in (float("nan"), float("inf")):  # ComfyUI's range check lets "nan" through a FLOAT input
        with pytest.raises(ValueError, match="gamma must be a finite number"):
            _block(comfy, model, sae, pipeline.stats, gamma=bad)
    with pytest.raises(ValueError, match="32-wide.*'output_blocks.1.1'"):
        _features(comfy, model, pipeline.clip, narrow)
    assert not model.wrappers


def test_block_names_and_saved_features(comfy, pipeline):
    blocks = comfy.nodes_pkg.unet_blocks
    model = pipeline.model
    # a diffusers name maps to the ComfyUI block through ComfyUI's key map
    assert blocks.resolve_block(model, "unet.up_blocks.0.attentions.1")[0] == BLOCK
    assert blocks.resolve_block(model, "diffusion_model.output_blocks.1.1")[0] == BLOCK
    # the features file can replace the socket; an empty block takes the features' block
    patched = _block(comfy, model, pipeline.sae, None, features_file="saeuron_test/features.safetensors", block="")
    assert _patch_of(patched).block == BLOCK
    with pytest.raises(FileNotFoundError, match="features_file"):
        _block(comfy, model, pipeline.sae, None, features_file="nope.safetensors")


def test_node_and_plugin_apply_the_same_pipeline_edit(comfy, pipeline, monkeypatch):
    """The Concept Block node builds its edit with the SAeUron pipeline function the MiniCanvas plug-in
    calls, from settings named as its inputs; mounted the plug-in's way on the same block, an edit from
    the same SAE, features and settings changes the UNet output exactly as the node's patch does."""
    from sae_core.capture import get_submodule
    from sae_core.minicanvas.diffusion import SamplingContext
    from sae_core.minicanvas.plugins import saeuron as plugin
    from sae_core.saeuron import BlockRef, ConceptBlockSettings, pipeline as saeuron_pipeline

    node_module = comfy.nodes_pkg.saeuron
    assert node_module.build_concept_edit is saeuron_pipeline.build_concept_edit is plugin.build_concept_edit
    seen = []

    def spy(host, sae, stats, settings):
        seen.append(settings)
        return saeuron_pipeline.build_concept_edit(host, sae, stats, settings)

    monkeypatch.setattr(node_module, "build_concept_edit", spy)
    model, sae = pipeline.model, pipeline.sae
    patched = _block(comfy, model, sae, pipeline.stats, concepts="cat", top_n=3, gamma=-5.0, cond_only=True)
    (settings,) = seen
    assert settings == ConceptBlockSettings(block=BLOCK, concepts=("cat",), gamma=-5.0, selection="top_n", top_n=3,
                                            percentile=99.999, error_mode="conventional", cond_only=True)

    module = get_submodule(model.model.diffusion_model, BLOCK)
    host = SimpleNamespace(find_block=lambda name: BlockRef(BLOCK, module, WIDTH))
    edit = saeuron_pipeline.build_concept_edit(host, sae, pipeline.stats, settings)
    hook = plugin.canvas_block_hook(edit)
    x, ctx = _inputs()
    sched = _schedule(model)
    ms = model.get_model_object("model_sampling")
    for i in range(STEPS):
        sigma = sched[i]
        canvas_ctx = SamplingContext(step_index=i, timestep=float(ms.timestep(sigma)), num_steps=STEPS, batch_size=1,
                                     cfg_order=("uncond", "cond"))  # _forward's cond_or_uncond (1, 0)
        handle = module.register_forward_hook(lambda m, inputs, output: hook(m, inputs, output, canvas_ctx))
        try:
            want = _forward(model, x, sigma, ctx, sched)
        finally:
            handle.remove()
        got = _forward(patched, x, sigma, ctx, sched)
        assert torch.equal(got, want)
        assert _patch_of(patched).last_step == edit.last_step == i
    assert int(edit.hook.fired_tokens) > 0 and int(_patch_of(patched).hook.fired_tokens) == int(edit.hook.fired_tokens)
    assert _no_hooks_left(model)


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------


def _fake_snapshot_download(repo: Path, calls: list):
    """Stands in for huggingface_hub.snapshot_download: copies the matching files of a local folder."""

    def download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        for f in repo.rglob("*"):
            rel = f.relative_to(repo).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in kwargs["allow_patterns"]):
                dst = Path(kwargs["local_dir"]) / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
        return kwargs["local_dir"]

    return download


def test_download_node_with_a_fake_hub(comfy, pipeline, tmp_path, monkeypatch):
    import huggingface_hub

    from sae_core.formats import save_sae

    repo = tmp_path / "repo"
    save_sae(pipeline.sae, repo / "unet.up_blocks.1.attentions.1", layout="folder")
    (repo / "README.md").write_text("card")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot_download(repo, calls))
    node = _node(comfy, DOWNLOAD_ID)
    with torch.inference_mode():
        sae, path = node.download("someone/SAeUron", "unet.up_blocks.1.attentions.1", "", "cpu", "float32")
    assert calls == [("someone/SAeUron", {"allow_patterns": ["unet.up_blocks.1.attentions.1/*"],
                                           "local_dir": str(comfy.base / "models" / "sae" / "someone__SAeUron")})]
    assert Path(path) == comfy.base / "models" / "sae" / "someone__SAeUron" / "unet.up_blocks.1.attentions.1"
    assert not (Path(path).parent / "README.md").exists()
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), pipeline.sae.state_dict().values()))
    assert "someone__SAeUron/unet.up_blocks.1.attentions.1/sae.safetensors" in comfy.nodes_pkg.common.sae_filenames()
    with torch.inference_mode():
        node.download("someone/SAeUron", "unet.up_blocks.1.attentions.1", "", "cpu", "float32")
    assert len(calls) == 1  # the local copy is reused
    with pytest.raises(FileNotFoundError, match="no SAE under 'unet.up_blocks.1.attentions.2/'"):
        node.download("someone/SAeUron", "unet.up_blocks.1.attentions.2", "", "cpu", "float32")


def test_download_reads_the_sae_once(comfy, pipeline, tmp_path, monkeypatch):
    """The check of a fresh download loads into the node's SAE cache: one read per download, none on reuse."""
    import huggingface_hub

    import sae_core.hub
    from sae_core.formats import save_sae

    save_sae(pipeline.sae, tmp_path / "repo3" / "unet.up_blocks.1.attentions.0", layout="folder")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot_download(tmp_path / "repo3", []))
    reads = []
    for module in (comfy.nodes_pkg.sae_nodes, sae_core.hub):
        original = module.load_sae
        monkeypatch.setattr(module, "load_sae", lambda *a, _f=original, **k: reads.append(a[0]) or _f(*a, **k))
    node = _node(comfy, DOWNLOAD_ID)
    with torch.inference_mode():
        sae, _ = node.download("third/SAeUron", "unet.up_blocks.1.attentions.0", "", "cpu", "float32")
        assert len(reads) == 1, reads
        again, _ = node.download("third/SAeUron", "unet.up_blocks.1.attentions.0", "", "cpu", "float32")
    assert len(reads) == 1, reads
    assert again.W_dec.data_ptr() == sae.W_dec.data_ptr()


def test_download_does_not_change_the_sae_other_nodes_hold(comfy, pipeline, tmp_path, monkeypatch):
    """The hook point Download SAE fills in goes on its own copy, not on the cached SAE Load SAE handed out."""
    import dataclasses

    import huggingface_hub

    from sae_core.formats import save_sae

    repo = tmp_path / "repo2"
    bare = type(pipeline.sae)(dataclasses.replace(pipeline.sae.cfg, hookpoint=None))
    bare.load_state_dict(pipeline.sae.state_dict())
    save_sae(bare, repo / "unet.up_blocks.1.attentions.2", layout="folder")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot_download(repo, []))
    with torch.inference_mode():
        _, path = _node(comfy, DOWNLOAD_ID).download("other/SAeUron", "unet.up_blocks.1.attentions.2", "", "cpu", "float32")
        name = "other__SAeUron/unet.up_blocks.1.attentions.2/sae.safetensors"
        (held,) = _node(comfy, "CE_LoadSAE").load(name, device="cpu", dtype="float32")
        downloaded, _ = _node(comfy, DOWNLOAD_ID).download("other/SAeUron", "unet.up_blocks.1.attentions.2", "", "cpu",
                                                           "float32")
    assert downloaded.cfg.hookpoint == "unet.up_blocks.1.attentions.2"
    assert held.cfg.hookpoint is None
    assert downloaded.W_dec.data_ptr() == held.W_dec.data_ptr()  # same weights in memory, not a second load
