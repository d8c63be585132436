"""SAeUron: statistics, selection, the intervention and its hook, against plain eager references."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from sae_core.capture import to_tokens
from sae_core.config import SaeConfig
from sae_core.sae import SparseAutoencoder
from sae_core.saeuron import (
    BlockRef,
    ConceptBlockSettings,
    ConceptParams,
    ConceptStats,
    ConceptStatsBuilder,
    SAeUronHook,
    SelectionTable,
    StepSelection,
    build_concept_edit,
    build_selection,
    collect_block_activations,
    concept_scores,
    concept_stats_from_store,
    format_concept_params,
    gather_concept_stats,
    map_step_index,
    parse_concept_params,
    percentile_feature_count,
    sae_fingerprint,
    select_features,
    step_index_from_timestep,
)
from sae_core.store import ActivationReader, ActivationWriter

D, N_LAT, K = 16, 96, 6
C, H, W = D, 3, 5  # non-square feature map on purpose


def make_sae(seed: int = 0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=D, num_latents=N_LAT, k=K), generator=g)
    with torch.no_grad():
        sae.encoder.bias.normal_(0.0, 0.1, generator=g)
        sae.b_dec.normal_(0.0, 0.1, generator=g)
    return sae


def make_stats(sae: SparseAutoencoder, concepts=("a", "b", "c"), steps: int = 4, seed: int = 1) -> ConceptStats:
    g = torch.Generator().manual_seed(seed)
    builder = ConceptStatsBuilder(list(concepts), steps, N_LAT)
    for ci, _ in enumerate(concepts):
        for t in range(steps):
            x = torch.randn(3, C, H, W, generator=g) + 0.5 * ci
            builder.add_block_output(ci, t, x, sae, timestep=900.0 - 250.0 * t)
    return builder.finalize(sae_fingerprint=sae_fingerprint(sae), hookpoint="blk")


def dense_reference(sae, x4: torch.Tensor, sel: StepSelection, mode: str) -> torch.Tensor:
    """Plain eager SAeUron on every token: dense codes, a full decode of both codes."""
    tokens = to_tokens(x4).double()
    w_enc, b_enc = sae.encoder.weight.double(), sae.encoder.bias.double()
    w_dec, b_dec = sae.W_dec.double(), sae.b_dec.double()
    pre = torch.relu((tokens - b_dec) @ w_enc.T + b_enc)
    top = pre.topk(K, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    z_new = z.clone()
    for i, s, thr in zip(sel.indices.tolist(), sel.scales.tolist(), sel.thresholds.tolist()):
        on = z[:, i] > thr
        z_new[on, i] = s * z[on, i]
    x_hat = z @ w_dec + b_dec
    x_hat_new = z_new @ w_dec + b_dec
    y = tokens + (x_hat_new - x_hat) if mode == "conventional" else x_hat_new + (x_hat - tokens)
    b, c, h, w = x4.shape
    return y.reshape(b, h, w, c).permute(0, 3, 1, 2).to(x4.dtype)


# ---------------------------------------------------------------------------------------------
# intervention
# ---------------------------------------------------------------------------------------------


def test_matches_dense_reference_when_features_fire():
    sae = make_sae()
    stats = make_stats(sae)
    x = torch.randn(4, C, H, W, generator=torch.Generator().manual_seed(5))
    for mode in ("conventional", "reference"):
        hook = SAeUronHook(sae, stats, ["a"], gamma=-2.0, top_n=3, error_mode=mode)
        for t in range(stats.num_steps):
            y = hook(x, t)
            assert hook.last_fired.any() and not hook.last_fired.all(), "want a mix of edited and kept tokens"
            ref = dense_reference(sae, x, hook.table.step(t), mode)
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
            if mode == "conventional":
                # tokens where nothing fired are untouched, bit for bit
                kept = ~hook.last_fired
                assert torch.equal(to_tokens(y)[kept], to_tokens(x)[kept])


def test_latent_above_threshold_but_outside_top_k_is_not_edited():
    sae = make_sae()
    x = torch.randn(6, C, H, W, generator=torch.Generator().manual_seed(21))
    latents = torch.tensor([3, 40, 77])
    step = StepSelection(latents, torch.tensor([-1.5, -0.5, 2.0]), torch.zeros(3), torch.zeros(3, dtype=torch.int64))
    table = SelectionTable(["a"], [step], num_latents=N_LAT)
    with torch.no_grad():
        pre = sae.pre_acts(to_tokens(x))
        in_top = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, pre.topk(K, dim=-1).indices, True)
    positive_but_out = ((pre[:, latents] > 0) & ~in_top[:, latents]).any(1)
    assert positive_but_out.any(), "the case under test must occur"
    for mode in ("conventional", "reference"):
        hook = SAeUronHook(sae, table, error_mode=mode)
        y = hook(x, 0)
        torch.testing.assert_close(y, dense_reference(sae, x, step, mode), rtol=1e-4, atol=1e-5)
        fires = (in_top[:, latents] & (pre[:, latents] > 0)).any(1)
        assert torch.equal(hook.last_fired, fires)


def test_bit_exact_when_nothing_fires():
    sae = make_sae()
    stats = make_stats(sae)
    # make every latent's all-concept mean enormous: no activation can exceed the threshold
    huge = ConceptStats(stats.concepts, stats.means * 0 + 1e6 + stats.means, stats.counts,
                        sae_fingerprint=stats.sae_fingerprint)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(3))).to(dtype)
        x_before = x.clone()
        hook = SAeUronHook(sae, huge, "b", gamma=-5.0, top_n=4)
        y = hook(x, 1)
        assert not hook.last_fired.any()
        assert y.dtype == x.dtype and y.shape == x.shape
        assert torch.equal(y.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           x_before.view(torch.int16 if dtype != torch.float32 else torch.int32))
        assert torch.equal(x, x_before)  # the input was not modified in place


def test_update_mode_edits_the_block_update():
    """SAeUron on a block's update d = out - x_in: the block returns x_in + edit(d)."""
    sae = make_sae()
    stats = make_stats(sae)
    g = torch.Generator().manual_seed(8)
    x_in = torch.randn(4, C, H, W, generator=g)
    d = torch.randn(4, C, H, W, generator=g)
    out = x_in + d
    hook = SAeUronHook(sae, stats, ["a"], gamma=-2.0, top_n=3)
    for t in range(stats.num_steps):
        y = hook.on_update(x_in, out, t)
        assert hook.last_fired.any()
        torch.testing.assert_close(y, x_in + dense_reference(sae, out - x_in, hook.table.step(t), "conventional"),
                                   rtol=1e-4, atol=1e-5)
    # nothing fires: the block's own output object comes back
    huge = ConceptStats(stats.concepts, stats.means + 1e6, stats.counts, sae_fingerprint=stats.sae_fingerprint)
    quiet = SAeUronHook(sae, huge, ["a"], gamma=-2.0, top_n=3)
    assert quiet.on_update(x_in, out, 0) is out
    # the timestep form maps to the same step
    t_val = float(stats.schedule[2])
    torch.testing.assert_close(hook.update_at_timestep(x_in, out, t_val), hook.on_update(x_in, out, 2))


def test_conventional_and_reference_differ_by_twice_the_error_where_nothing_fires():
    sae = make_sae()
    stats = make_stats(sae)
    x = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(9))
    conv = SAeUronHook(sae, stats, "c", gamma=-1.0, top_n=2)
    ref = SAeUronHook(sae, stats, "c", gamma=-1.0, top_n=2, error_mode="reference")
    y_conv, y_ref = conv(x, 2), ref(x, 2)
    kept = ~conv.last_fired
    assert kept.any()
    with torch.no_grad():
        x_hat = sae(to_tokens(x)).sae_out
    diff = to_tokens(y_conv) - to_tokens(y_ref)
    torch.testing.assert_close(diff[kept], 2 * (to_tokens(x) - x_hat)[kept], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(diff[kept], torch.zeros_like(diff[kept]), atol=1e-4)


def test_both_cfg_halves_and_cond_only():
    sae = make_sae()
    stats = make_stats(sae)
    half = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(4))
    x = torch.cat([half, half])  # [uncond; cond] with identical content
    cond_mask = torch.tensor([False, False, True, True])

    hook = SAeUronHook(sae, stats, "a", gamma=-3.0, top_n=3)
    y = hook(x, 0, cond_mask)  # the mask is ignored unless cond_only
    assert hook.last_fired.any()
    assert torch.equal(y[:2], y[2:]), "both CFG halves get the same edit"
    assert not torch.equal(y[:2], x[:2])

    only = SAeUronHook(sae, stats, "a", gamma=-3.0, top_n=3, cond_only=True)
    y_c = only(x, 0, cond_mask)
    assert torch.equal(y_c[:2], x[:2]), "uncond rows untouched"
    assert torch.equal(y_c[2:], y[2:]), "cond rows edited as in the all-rows mode"
    with pytest.raises(ValueError, match="cond_mask"):
        only(x, 0)


def test_forward_hook_on_a_module_and_tuple_outputs():
    sae = make_sae()
    stats = make_stats(sae)
    hook = SAeUronHook(sae, stats, "b", gamma=-1.0, top_n=2)
    conv = nn.Conv2d(C, C, 1)
    x = torch.randn(2, C, H, W)
    state = {"step_index": 3}
    handle = hook.attach(conv, lambda: state)
    try:
        with torch.no_grad():
            out = conv(x)
    finally:
        handle.remove()
    with torch.no_grad():
        plain = conv(x)
    assert torch.equal(out, hook(plain, 3))

    class TupleBlock(nn.Module):
        def forward(self, x):
            return (x * 2.0, "extra")

    tb = TupleBlock()
    handle = tb.register_forward_hook(hook.forward_hook(lambda: {"timestep": 400.0}))
    try:
        out, extra = tb(x)
    finally:
        handle.remove()
    assert extra == "extra"
    # timestep 400 -> nearest of the stats' schedule [900, 650, 400, 150] is step 2
    assert torch.equal(out, hook(x * 2.0, 2))


def test_refuses_mismatched_sae_and_bad_steps():
    sae = make_sae()
    stats = make_stats(sae)
    with pytest.raises(ValueError, match="different|not with this SAE"):
        SAeUronHook(make_sae(seed=7), stats, "a")
    hook = SAeUronHook(sae, stats, "a")
    with pytest.raises(ValueError, match="outside"):
        hook(torch.randn(1, C, H, W), stats.num_steps)
    with pytest.raises(ValueError, match="unknown concept"):
        SAeUronHook(sae, stats, "zebra")


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [20480, 1000, 257])
def test_percentile_rule_matches_top_n(n):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(5, n, generator=g)
    for p in (99.999, 99.995, 99.99, 99.9, 99.0, 95.0, 50.0):
        count = percentile_feature_count(n, p)
        if count < 1:
            continue
        by_p = select_features(scores, percentile=p)
        by_n = select_features(scores, top_n=count)
        for a, b in zip(by_p, by_n):
            assert a.numel() == count
            assert sorted(a.tolist()) == sorted(b.tolist())
    if n == 20480:  # the reference's settings: 1, 2, 3 features per step
        assert [percentile_feature_count(n, p) for p in (99.999, 99.995, 99.99)] == [1, 2, 3]


def test_score_and_selection_follow_the_definition():
    sae = make_sae()
    stats = make_stats(sae, concepts=("a", "b", "c", "d"))
    eps = 1e-8
    for name in stats.concepts:
        i = stats.index(name)
        mu_c = stats.means[i]
        others = torch.stack([stats.means[j] for j in range(4) if j != i]).mean(0)
        ref = mu_c / (mu_c.sum(-1, keepdim=True) + eps) - others / (others.sum(-1, keepdim=True) + eps)
        torch.testing.assert_close(concept_scores(stats, name), ref)
    table = build_selection(stats, "b", gamma=-4.0, top_n=2)
    mu_all = stats.means.mean(0)
    for t in range(stats.num_steps):
        s = table.step(t)
        assert s.indices.numel() == 2
        torch.testing.assert_close(s.scales, -4.0 * stats.means[1, t, s.indices])
        torch.testing.assert_close(s.thresholds, mu_all[t, s.indices])


def test_multi_concept_deduplicates_with_strongest_scaling():
    means = torch.zeros(3, 2, 8)
    means[0, :, 5] = 2.0   # concept a likes latent 5
    means[1, :, 5] = 3.0   # concept b likes latent 5 more (stronger scaling)
    means[1, :, 6] = 1.0
    means[2, :, 1] = 1.0
    means += 0.01
    stats = ConceptStats(["a", "b", "c"], means)
    table = build_selection(stats, ["a", "b"], gamma=-1.0, top_n=2)
    for t in range(2):
        s = table.step(t)
        assert s.indices.tolist().count(5) == 1
        k = s.indices.tolist().index(5)
        assert s.scales[k].item() == pytest.approx(-1.0 * means[1, t, 5].item())
        assert table.concepts[int(s.concept[k])] == "b"


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def test_streaming_stats_equal_batch_computation(tmp_path):
    g = torch.Generator().manual_seed(11)
    concepts, steps, p_tokens = ["x", "y", "z"], 3, 6
    n_prompts = {"x": 4, "y": 7, "z": 2}
    acts, idx, label = [], [], []
    for ci, c in enumerate(concepts):
        for _ in range(n_prompts[c]):
            a = torch.rand(steps, p_tokens, K, generator=g)
            i = torch.stack([torch.stack([torch.randperm(N_LAT, generator=g)[:K] for _ in range(p_tokens)])
                             for _ in range(steps)])
            acts.append(a)
            idx.append(i)
            label.append(ci)
    acts, idx, label = torch.stack(acts), torch.stack(idx), torch.tensor(label)

    # batch computation: dense codes of every prompt, then plain means
    dense = torch.zeros(len(label), steps, p_tokens, N_LAT, dtype=torch.float64)
    dense.scatter_(-1, idx, acts.double())
    per_prompt = dense.mean(2)  # spatial mean, zeros included
    expected = torch.stack([per_prompt[label == ci].mean(0) for ci in range(3)]).float()

    # streaming: shuffled prompts, mixed-concept batches, steps interleaved
    builder = ConceptStatsBuilder(concepts, steps, N_LAT)
    order = torch.randperm(len(label), generator=g)
    for chunk in order.split(3):
        for t in reversed(range(steps)):
            builder.add_codes(label[chunk], t, acts[chunk, t], idx[chunk, t], timestep=10.0 * (steps - t))
    stats = builder.finalize(hookpoint="h", attrs={"note": "test"})
    torch.testing.assert_close(stats.means, expected, rtol=1e-6, atol=1e-7)
    assert stats.counts[:, 0].tolist() == [4, 7, 2]

    # mu_notc is the mean over all other prompts (count-weighted)
    pooled = per_prompt[label != 0].mean(0).float()
    torch.testing.assert_close(stats.mu_not("x"), pooled, rtol=1e-5, atol=1e-7)

    path = stats.save(tmp_path / "stats.safetensors")
    back = ConceptStats.load(path)
    assert back.concepts == concepts and back.hookpoint == "h" and back.attrs == {"note": "test"}
    assert torch.equal(back.means, stats.means) and torch.equal(back.counts, stats.counts)
    assert torch.equal(back.schedule, stats.schedule)
    with pytest.raises(FileNotFoundError):
        ConceptStats.load(tmp_path / "missing.safetensors")


def test_builder_reports_empty_cells():
    b = ConceptStatsBuilder(["a", "b"], 2, N_LAT)
    b.add_mean_codes("a", 0, torch.rand(1, N_LAT))
    with pytest.raises(ValueError, match="no prompts"):
        b.finalize()


# ---------------------------------------------------------------------------------------------
# step mapping
# ---------------------------------------------------------------------------------------------


def ddim_timesteps(n: int, train_steps: int = 1000) -> torch.Tensor:
    stride = train_steps // n
    return torch.arange(n - 1, -1, -1) * stride


@pytest.mark.parametrize("stats_steps,run_steps", [(100, 100), (100, 50), (50, 100), (100, 25), (30, 7)])
def test_step_index_from_timestep(stats_steps, run_steps):
    schedule = ddim_timesteps(stats_steps).float()
    run = ddim_timesteps(run_steps).float()
    got = [step_index_from_timestep(t, schedule) for t in run]
    for t, i in zip(run.tolist(), got):
        dist = (schedule - t).abs()
        assert dist[i] == dist.min()
        assert i == int((dist == dist.min()).nonzero()[0])  # ties: the earlier step
    assert got == sorted(got), "monotonic in the sampling order"
    if stats_steps == run_steps:
        assert got == list(range(run_steps))
    # a batch of identical timesteps is fine, mixed ones are refused
    assert step_index_from_timestep(torch.full((4,), float(run[0])), schedule) == got[0]
    with pytest.raises(ValueError, match="mixes"):
        step_index_from_timestep(torch.tensor([float(run[0]), float(run[-1])]), schedule)


@pytest.mark.parametrize("stats_steps,run_steps", [(100, 100), (100, 50), (50, 100), (100, 1), (7, 30)])
def test_map_step_index_proportional(stats_steps, run_steps):
    got = [map_step_index(s, run_steps, stats_steps) for s in range(run_steps)]
    assert got[0] == 0
    if run_steps > 1:
        assert got[-1] == stats_steps - 1
    assert got == sorted(got) and all(0 <= g < stats_steps for g in got)
    for s, g in enumerate(got):
        exact = s * (stats_steps - 1) / max(run_steps - 1, 1)
        assert abs(g - exact) <= 0.5
    if stats_steps == run_steps:
        assert got == list(range(run_steps))


# ---------------------------------------------------------------------------------------------
# collection through a sampler
# ---------------------------------------------------------------------------------------------


class ToyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, C, 1)
        self.blocks = nn.ModuleList([nn.Conv2d(C, C, 3, padding=1)])
        self.out = nn.Conv2d(C, 3, 1)

    def forward(self, x, t, cond):
        h = self.inp(x) + cond[:, :, None, None] + 0.001 * t[:, None, None, None]
        return self.out(self.blocks[0](h))


class ToySampler:
    """CFG sampler with a state object, in [uncond; cond] order."""

    def __init__(self, model, steps):
        self.model, self.steps = model, steps
        self.schedule = ddim_timesteps(steps).float()
        self.state = None

    def embed(self, prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(map(ord, prompt)))
        return torch.randn(C, generator=g)

    def __call__(self, prompts):
        b = len(prompts)
        x = torch.randn(b, 3, H, W, generator=torch.Generator().manual_seed(b))
        cond = torch.stack([self.embed(p) for p in prompts])
        ctx = torch.cat([torch.zeros_like(cond), cond])
        for i, t in enumerate(self.schedule.tolist()):
            self.state = {"step_index": i, "timestep": t, "cond_mask": torch.arange(2 * b) >= b}
            eps = self.model(torch.cat([x, x]), torch.full((2 * b,), t), ctx)
            x = x - 0.05 * (eps[b:] + 2.0 * (eps[b:] - eps[:b]))
        self.state = None
        return x


def test_collect_block_activations_records_step_cond_and_prompt(tmp_path):
    torch.manual_seed(0)
    model = ToyDenoiser()
    sampler = ToySampler(model, steps=3)
    prompts = [f"p{i}" for i in range(5)]
    with ActivationWriter(tmp_path / "acts", d=C, dtype="float32", shard_tokens=64,
                          metadata_columns=("step", "timestep", "cond", "prompt_index", "position")) as w:
        n = collect_block_activations(sampler, model, "blocks.0", prompts, 3, w, state=lambda: sampler.state,
                                      batch_size=2, progress=False)
    assert n == len(prompts) * 3 * H * W
    data = ActivationReader(tmp_path / "acts").read_all(columns=("step", "timestep", "cond", "prompt_index",
                                                                 "position"))
    m = data.meta
    assert (m["cond"] == 1).all()
    assert sorted(m["step"].unique().tolist()) == [0, 1, 2]
    torch.testing.assert_close(m["timestep"], sampler.schedule[m["step"]])
    for p in range(len(prompts)):
        for s in range(3):
            sel = (m["prompt_index"] == p) & (m["step"] == s)
            assert sel.sum() == H * W
            assert sorted(m["position"][sel].tolist()) == list(range(H * W))

    # the rows of prompt 3 at step 1 are the block's output on that prompt's cond row
    captured = {}
    sampler2 = ToySampler(model, steps=3)
    handle = model.blocks[0].register_forward_hook(
        lambda mod, i, o: captured.setdefault(sampler2.state["step_index"], o.detach().clone()))
    sampler2(prompts[2:4])  # prompt 3 is the second prompt of this batch, as in the collection run
    handle.remove()
    sel = (m["prompt_index"] == 3) & (m["step"] == 1)
    rows = data.activations[sel][m["position"][sel].argsort()]
    torch.testing.assert_close(rows, to_tokens(captured[1][3:4]))


def test_gather_concept_stats_matches_direct_builder(tmp_path):
    torch.manual_seed(0)
    model = ToyDenoiser()
    sampler = ToySampler(model, steps=4)
    sae = make_sae()
    concept_prompts = {"red": ["a red", "b red", "c red"], "blue": ["a blue", "b blue"], "green": ["x green"]}
    stats = gather_concept_stats(sampler, model, "blocks.0", sae, concept_prompts, 4,
                                 state=lambda: sampler.state, batch_size=4, progress=False)
    assert stats.hookpoint == "blocks.0" and stats.sae_fingerprint == sae_fingerprint(sae)
    torch.testing.assert_close(stats.schedule, sampler.schedule)

    # direct: one prompt at a time, cond rows only
    builder = ConceptStatsBuilder(list(concept_prompts), 4, N_LAT)
    flat = [(p, c) for c, ps in concept_prompts.items() for p in ps]
    for lo in range(0, len(flat), 4):
        batch = flat[lo:lo + 4]
        seen = {}
        h = model.blocks[0].register_forward_hook(
            lambda mod, i, o: seen.setdefault(sampler.state["step_index"], o.detach().clone()))
        sampler([p for p, _ in batch])
        h.remove()
        b = len(batch)
        for step, out in seen.items():
            for j, (_, c) in enumerate(batch):
                builder.add_block_output(c, step, out[b + j:b + j + 1], sae)
    direct = builder.finalize()
    torch.testing.assert_close(stats.means, direct.means, rtol=1e-5, atol=1e-7)
    assert torch.equal(stats.counts, direct.counts)

    # the same statistics from stored activations (one collection pass serves SAE data and stats)
    with ActivationWriter(tmp_path / "acts", d=C, dtype="float32", shard_tokens=50,
                          metadata_columns=("step", "cond", "prompt_index", "position")) as w:
        collect_block_activations(sampler, model, "blocks.0", [p for p, _ in flat], 4, w,
                                  state=lambda: sampler.state, batch_size=4, progress=False)
    names = list(concept_prompts)
    from_store = concept_stats_from_store(ActivationReader(tmp_path / "acts"), sae, names,
                                          [names.index(c) for _, c in flat], 4, H * W,
                                          schedule=sampler.schedule, batch_size=37, progress=False)
    torch.testing.assert_close(from_store.means, stats.means, rtol=1e-5, atol=1e-7)
    assert torch.equal(from_store.counts, stats.counts)
    torch.testing.assert_close(from_store.schedule, stats.schedule)


# ---------------------------------------------------------------------------------------------
# the MiniCanvas plug-in (needs the shipped model and SAeUron files)
# ---------------------------------------------------------------------------------------------


def test_minicanvas_method_hooks_the_block_during_sampling():
    from sae_core.minicanvas import files
    from sae_core.minicanvas.canvas import MiniCanvas
    from sae_core.minicanvas.methods import registered_methods

    method = pytest.importorskip("sae_core.minicanvas.plugins.saeuron")
    weights = files.WEIGHTS_DIR
    if not (weights / files.MODEL_FILE).is_file():
        pytest.skip("MiniCanvas weights are not shipped")
    canvas = MiniCanvas.load(judges=False)
    # the shipped SAEs match the shipped model (a mismatch raises), each on its kind's block
    for kind in ("style", "object"):
        assets = method.load_assets(canvas, kind, weights, progress=False)
        assert assets.block == method.RECIPE.blocks[kind]
        assert assets.sae.cfg.d_in == canvas.get_block(assets.block).proj_out.out_features
    assert "saeuron" in registered_methods()

    edited = method.saeuron_factory(canvas, "style", ["striped"])
    assert canvas.hooks == [] and len(edited.hooks) == 1, "the input canvas is left untouched"
    prompt = ["an image of a star in striped style"]
    before = canvas.sample(prompt, [0], steps=6)
    after = edited.sample(prompt, [0], steps=6)
    hook = edited.saeuron_hook
    assert hook.calls == 6, "one application per DDIM step (both CFG halves at once)"
    assert int(hook.fired_tokens) > 0
    assert not torch.equal(before, after)
    with pytest.raises(ValueError, match="unknown style"):
        method.saeuron_factory(canvas, "style", ["baroque"])


# ---------------------------------------------------------------------------------------------
# the pipeline both hosts call
# ---------------------------------------------------------------------------------------------


class _Host:
    """A bare SAeUron host: one block of a toy denoiser."""

    def __init__(self, model):
        self.model = model

    def find_block(self, block):
        if block not in ("blk", "blocks.0"):
            raise ValueError(f"block: unknown block {block!r}")
        return BlockRef("blocks.0", self.model.blocks[0], C)


class _Pos:
    def __init__(self, timestep=None, sigma=None, run_step=None, cond_mask=None):
        self._t, self._s, self._r, self._m = timestep, sigma, run_step, cond_mask

    def timestep(self):
        return self._t

    def sigma(self):
        return self._s

    def run_step(self):
        return self._r

    def cond_mask(self):
        return self._m


def test_settings_are_validated_once_at_construction():
    assert ConceptBlockSettings(concepts=["a", "b"], top_n=2.0).concepts == ("a", "b")
    for bad in (dict(selection="top_k"), dict(error_mode="loose"), dict(source="input"), dict(top_n=0),
                dict(selection="percentile", percentile=100.0), dict(gamma=float("nan")), dict(concepts="a")):
        with pytest.raises(ValueError, match=list(bad)[-1]):
            ConceptBlockSettings(**bad)


def test_pipeline_edit_equals_the_hook_and_follows_the_position():
    sae = make_sae()
    stats = make_stats(sae)
    settings = ConceptBlockSettings(concepts=("a",), gamma=-3.0, top_n=3, cond_only=True)
    edit = build_concept_edit(_Host(ToyDenoiser()), sae, stats, settings)
    assert edit.block == "blocks.0" and edit.source == "output"  # the empty block is the features' block
    direct = SAeUronHook(sae, stats, ["a"], gamma=-3.0, top_n=3, cond_only=True)
    x = torch.randn(4, C, H, W, generator=torch.Generator().manual_seed(5)) * 3
    mask = torch.tensor([False, False, True, True])
    for t, want in ((900.0, 0), (160.0, 3), (610.0, 1)):  # the features' step nearest to the timestep
        got = edit((x,), x, _Pos(timestep=t, cond_mask=mask))
        assert edit.last_step == want
        assert torch.equal(got, direct(x, want, mask))
    # no CFG layout given: every row is prompted
    torch.testing.assert_close(edit((x,), x, _Pos(timestep=900.0)), direct(x, 0, torch.ones(4, dtype=torch.bool)))
    # the update source edits output - input
    diff = build_concept_edit(_Host(ToyDenoiser()), sae, stats, ConceptBlockSettings(
        concepts=("a",), gamma=-3.0, top_n=3, source="diff"))
    x_in = torch.randn_like(x)
    torch.testing.assert_close(diff((x_in,), x + x_in, _Pos(timestep=900.0)),
                               direct.on_update(x_in, x + x_in, 0, torch.ones(4, dtype=torch.bool)))
    # features without a schedule: the run's step, mapped proportionally
    bare = ConceptStats(stats.concepts, stats.means, stats.counts, hookpoint="blk",
                        sae_fingerprint=stats.sae_fingerprint)
    edit2 = build_concept_edit(_Host(ToyDenoiser()), sae, bare, settings)
    assert [edit2.step_index(_Pos(run_step=(s, 8))) for s in range(8)] == [map_step_index(s, 8, 4) for s in range(8)]
    with pytest.raises(ValueError, match="no sampling schedule"):
        edit2.step_index(_Pos(timestep=900.0))


def test_pipeline_refuses_what_does_not_fit():
    sae = make_sae()
    stats = make_stats(sae)
    host = _Host(ToyDenoiser())
    with pytest.raises(ValueError, match="unknown concept"):
        build_concept_edit(host, sae, stats, ConceptBlockSettings(concepts=("z",)))
    with pytest.raises(ValueError, match="gathered with SAE"):
        build_concept_edit(host, make_sae(seed=3), stats, ConceptBlockSettings())
    narrow = SparseAutoencoder(SaeConfig(d_in=D // 2, num_latents=N_LAT, k=K))
    with pytest.raises(ValueError, match=f"{D // 2}-wide.*outputs {C} channels"):
        build_concept_edit(host, narrow, stats, ConceptBlockSettings())
    with pytest.raises(ValueError, match="unknown block"):
        build_concept_edit(host, sae, stats, ConceptBlockSettings(block="nowhere"))


def test_concept_params_give_each_concept_its_own_gamma_and_rule():
    """Per-concept lines: each concept's part of the table is the one a single-concept table with its own
    gamma and rule gives; concepts without a line take the block's values."""
    sae = make_sae()
    stats = make_stats(sae, concepts=("a", "b", "c", "d"))
    host = _Host(ToyDenoiser())
    settings = ConceptBlockSettings(concepts=("a", "b", "c"), gamma=-1.0, selection="percentile", percentile=99.0,
                                    concept_params="a: -5, top_n=3\nb: -2, 90  # a bare value: the block's rule")
    assert settings.concept_params == (ConceptParams("a", -5.0, 3, None), ConceptParams("b", -2.0, None, 90.0))
    table = build_concept_edit(host, sae, stats, settings).hook.table
    alone = {"a": build_selection(stats, "a", gamma=-5.0, top_n=3),
             "b": build_selection(stats, "b", gamma=-2.0, percentile=90.0),
             "c": build_selection(stats, "c", gamma=-1.0, percentile=99.0)}
    for t in range(stats.num_steps):
        got = table.step(t)
        for ci, name in enumerate(table.concepts):
            want = alone[name].step(t)
            mine = got.concept == ci
            kept = set(got.indices[mine].tolist())
            assert kept <= set(want.indices.tolist())  # a latent two concepts share goes to the stronger one
            for i, scale in zip(got.indices[mine].tolist(), got.scales[mine].tolist()):
                assert scale == pytest.approx(float(want.scales[want.indices == i][0]))
        assert got.indices.numel() == len(set().union(*(set(alone[n].step(t).indices.tolist()) for n in alone)))
    # the same text through a mapping (the reference's per-class table: multiplier + percentile)
    as_map = ConceptBlockSettings(concepts=("a", "b", "c"), gamma=-1.0, selection="percentile", percentile=99.0,
                                  concept_params={"a": {"gamma": -5, "top_n": 3},
                                                  "b": {"multiplier": -2, "percentile": 90}})
    assert as_map.concept_params == settings.concept_params
    assert parse_concept_params(format_concept_params(settings.concept_params)) == settings.concept_params
    # a line for a concept of the table that is not erased is ignored; one the table lacks is an error
    only_c = build_concept_edit(host, sae, stats, ConceptBlockSettings(concepts=("c",), concept_params="d: -9"))
    assert only_c.hook.table.concepts == ["c"]
    with pytest.raises(ValueError, match="concept_params: 'zebra' is not a concept of the feature table"):
        build_concept_edit(host, sae, stats, ConceptBlockSettings(concept_params="zebra: -3"))


@pytest.mark.parametrize("text, match", [
    ("dog -1", "line 1.*no ':'"), ("dog: x", "cannot read 'x'"), ("dog: -1, top_n=0", "top_n must be"),
    ("dog: -1, top_n=2, percentile=99", "either top_n or percentile"), ("dog: -1\ndog: -2", "given twice"),
    ("dog: -1, 2, 3", "plain number"), ("dog: -1, foo=3", "unknown key 'foo'"), (": -1", "name is empty"),
    ("a: -1\ndog: percentile=100", "line 2.*percentile must be"), ("dog: 1e999", "gamma must be a finite"),
])
def test_concept_params_errors_name_the_input_and_line(text, match):
    with pytest.raises(ValueError, match="concept_params") as err:
        ConceptBlockSettings(concept_params=text)
    assert err.match(match)


def test_mixed_selection_rules_and_their_errors():
    sae = make_sae()
    stats = make_stats(sae)
    mixed = build_selection(stats, ["a", "b"], gamma={"a": -1.0, "b": -2.0}, top_n={"a": 2},
                            percentile={"b": 95.0})
    ref = {"a": build_selection(stats, "a", gamma=-1.0, top_n=2),
           "b": build_selection(stats, "b", gamma=-2.0, percentile=95.0)}
    for t in range(stats.num_steps):
        assert set(mixed.step(t).indices.tolist()) == set(ref["a"].step(t).indices.tolist()) | set(
            ref["b"].step(t).indices.tolist())
    # a mapping beside a plain value: the concepts it does not name take the plain value
    half = build_selection(stats, ["a", "b"], top_n=3, percentile={"b": 95.0})
    assert set(half.step(0).indices.tolist()) == set(build_selection(stats, "a", top_n=3).step(0).indices.tolist()) | \
        set(ref["b"].step(0).indices.tolist())
    with pytest.raises(ValueError, match="both a top_n"):
        build_selection(stats, "a", top_n={"a": 2}, percentile={"a": 95.0})
    with pytest.raises(ValueError, match="no selection rule for concept 'b'"):
        build_selection(stats, ["a", "b"], top_n={"a": 2}, percentile={"c": 95.0})
    with pytest.raises(ValueError, match="top_n has no entry for concept 'b'"):
        build_selection(stats, ["a", "b"], top_n={"a": 2})
    with pytest.raises(ValueError, match="exactly one"):
        build_selection(stats, "a", top_n=2, percentile=95.0)


def test_update_statistics_record_their_source_and_must_match_the_edit():
    """Statistics gathered on the block's update are the codes of output - input, say so, and an edit that
    reads the block's output refuses them (and the other way round)."""
    torch.manual_seed(0)
    model = ToyDenoiser()
    sampler = ToySampler(model, steps=2)
    sae = make_sae()
    prompts = {"red": ["a red", "b red"], "blue": ["a blue"]}
    upd = gather_concept_stats(sampler, model, "blocks.0", sae, prompts, 2, state=lambda: sampler.state,
                               batch_size=3, progress=False, which="diff")
    out = gather_concept_stats(sampler, model, "blocks.0", sae, prompts, 2, state=lambda: sampler.state,
                               batch_size=3, progress=False)
    assert upd.attrs["source"] == "diff" and out.attrs["source"] == "output"
    builder = ConceptStatsBuilder(list(prompts), 2, N_LAT)
    seen = {}

    def record(_mod, args, output):  # returns None: the block's output is left as it is
        seen[sampler.state["step_index"]] = (output - args[0]).detach().clone()

    handle = model.blocks[0].register_forward_hook(record)
    sampler(["a red", "b red", "a blue"])
    handle.remove()
    for step, d in seen.items():
        builder.add_block_output(torch.tensor([0, 0, 1]), step, d[3:], sae)
    torch.testing.assert_close(upd.means, builder.finalize().means, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(upd.means, out.means)
    host = _Host(model)
    with pytest.raises(ValueError, match="source: the features were measured on the block's update"):
        build_concept_edit(host, sae, upd, ConceptBlockSettings(concepts=("red",)))
    with pytest.raises(ValueError, match="source: the features were measured on the block's output"):
        build_concept_edit(host, sae, out, ConceptBlockSettings(concepts=("red",), source="diff"))
    assert build_concept_edit(host, sae, upd, ConceptBlockSettings(concepts=("red",), source="diff")).source == "diff"
    with pytest.raises(ValueError, match="which must be"):
        gather_concept_stats(sampler, model, "blocks.0", sae, prompts, 2, state=lambda: sampler.state, which="input")


def test_minicanvas_plugin_builds_its_edit_through_the_pipeline(monkeypatch):
    """The plug-in reaches build_concept_edit with the settings the Concept Block node makes of equal
    inputs, and its canvas hook edits a block output exactly as that edit does."""
    from sae_core.minicanvas import files
    from sae_core.minicanvas.canvas import MiniCanvas
    from sae_core.minicanvas.diffusion import SamplingContext
    from sae_core.prompts import parse_names
    from sae_core.saeuron import pipeline

    method = pytest.importorskip("sae_core.minicanvas.plugins.saeuron")
    if not (files.WEIGHTS_DIR / files.MODEL_FILE).is_file():
        pytest.skip("MiniCanvas weights are not shipped")
    canvas = MiniCanvas.load(judges=False)
    assert method.build_concept_edit is pipeline.build_concept_edit
    seen = []

    def spy(host, sae, stats, settings):
        edit = pipeline.build_concept_edit(host, sae, stats, settings)
        seen.append((sae, stats, settings, edit))
        return edit

    monkeypatch.setattr(method, "build_concept_edit", spy)
    edited = method.saeuron_factory(canvas, "style", ["striped"], gamma=-2.0, top_n=2, cond_only=True)
    ((sae, stats, settings, edit),) = seen
    assets = method.load_assets(canvas, "style", progress=False)
    # the Concept Block node's settings for the same inputs (its widgets, parsed as the node parses them)
    node_settings = ConceptBlockSettings(block=assets.block, concepts=tuple(parse_names("striped")), gamma=-2.0,
                                         selection="top_n", top_n=2, percentile=99.999, error_mode="conventional",
                                         cond_only=True)
    assert settings == dataclasses.replace(node_settings, source=assets.source)
    node_edit = pipeline.build_concept_edit(method.CanvasHost(canvas), sae, stats, node_settings)
    assert node_edit.source == edit.source and node_edit.block == edit.block == assets.block
    assert edited.saeuron_edit is edit

    ctx = SamplingContext(step_index=3, timestep=int(canvas.schedule.ddim_timesteps(20)[3]), num_steps=20,
                          batch_size=2, cfg_order=("uncond", "cond"))
    width = canvas.get_block(edit.block).proj_out.out_features
    y = torch.randn(4, width, 16, 16, generator=torch.Generator().manual_seed(0)) * 4
    got = method.canvas_block_hook(edit)(None, (y,), y, ctx)
    want = node_edit((y,), y, method.CanvasPosition(ctx))
    assert torch.equal(got, want) and edit.last_step == node_edit.last_step
    assert torch.equal(got[:2], y[:2]) and not torch.equal(got[2:], y[2:])  # cond_only: only the cond half

    # per-concept parameters reach the pipeline as the node's concept_params input does
    seen.clear()
    method.saeuron_factory(canvas, "style", ["striped", "dotted"], concept_params="striped: -3, top_n=3\nneon: -9")
    ((_, _, settings, edit),) = seen
    node_settings = ConceptBlockSettings(block=assets.block, concepts=("striped", "dotted"), gamma=-2.0, top_n=2,
                                         concept_params="striped: -3, top_n=3\nneon: -9", source=assets.source)
    assert settings == node_settings
    assert settings.rules(["striped", "dotted"]) == ({"striped": -3.0, "dotted": -2.0}, {"striped": 3, "dotted": 2}, {})


class _TwoBlockHost(_Host):
    """A host with two blocks of equal width and a model family (as the ComfyUI host answers)."""

    def find_block(self, block):
        if block == "other":
            return BlockRef("inp", self.model.inp, C)
        return super().find_block(block)

    def family(self):
        return "SD15"

    def family_matches(self, name):
        return {"sd15": True, "sdxl": False}.get(name.lower())


def test_pipeline_refuses_an_sae_of_another_block_family_or_source():
    """Codes of an SAE read where it was not trained mean nothing: another block of the same width, another model
    family, or the other quantity (output / update) than the one it records are errors, not a warning."""
    from sae_core.saeuron.pipeline import resolve_source

    sae = make_sae()
    stats = make_stats(sae)
    host = _TwoBlockHost(ToyDenoiser())
    settings = ConceptBlockSettings(concepts=("a",))
    assert build_concept_edit(host, sae, stats, settings).block == "blocks.0"

    def variant(**cfg):
        other = SparseAutoencoder(dataclasses.replace(sae.cfg, **cfg))
        other.load_state_dict(sae.state_dict())
        return other

    with pytest.raises(ValueError, match=r"block: the SAE was trained on 'inp' \(other\) but is asked to read "
                                         r"'blocks.0'"):
        build_concept_edit(host, variant(hookpoint="other"), stats, settings)
    with pytest.raises(ValueError, match="sae: the SAE was trained on the text-encoder layer 'text_model.encoder"):
        build_concept_edit(host, variant(hookpoint="text_model.encoder.layers.2"), stats, settings)
    assert build_concept_edit(host, variant(hookpoint="elsewhere.3"), stats, settings).block == "blocks.0"  # logged
    with pytest.raises(ValueError, match="sae: made on a SDXL model, but this model is SD15"):
        build_concept_edit(host, variant(model_family="SDXL"), stats, settings)
    # a family the host does not know (a third-party label) and the host's own family pass
    for family in ("sd15", "my-finetune"):
        assert build_concept_edit(host, variant(model_family=family), stats, settings).block == "blocks.0"
    sdxl_stats = ConceptStats(stats.concepts, stats.means, stats.counts, schedule=stats.schedule,
                              schedule_kind=stats.schedule_kind, hookpoint=stats.hookpoint,
                              sae_fingerprint=stats.sae_fingerprint, attrs={"model_family": "SDXL"})
    with pytest.raises(ValueError, match="features: made on a SDXL model"):
        build_concept_edit(host, sae, sdxl_stats, settings)

    update_sae = variant(extra={"source": "diff"})
    assert resolve_source(update_sae) == "diff" and resolve_source(update_sae, "diff") == "diff"
    assert resolve_source(sae, "diff") == "diff"  # an SAE that records nothing reads what it is told
    with pytest.raises(ValueError, match="source: the SAE was trained on the block's update .* cannot read its "
                                         "output; set source to auto or 'diff'"):
        resolve_source(update_sae, "output")
