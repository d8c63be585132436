"""Selective Amnesia training: loss terms, determinism, resume, EWC, data caching, the MiniCanvas plug-in."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import replace

import numpy as np
import pytest

from sae_core.prompts import parse_names
import torch

from sae_core.amnesia import (
    AmnesiaConfig,
    AmnesiaTrainer,
    SampleSet,
    cached_samples,
    generate_samples,
    load_samples,
    loss_curve_image,
    noise_samples,
    save_samples,
)
from sae_core.amnesia import pipeline
from sae_core.amnesia.ewc import ewc_penalty, fisher_key
from sae_core.amnesia.fisher import eps_mse_loss
from sae_core.amnesia.lora import LoRADelta, LoRALinear, inject_lora, merge_lora, select_targets
from sae_core.minicanvas.canvas import MiniCanvas
from sae_core.minicanvas.diffusion import NoiseSchedule
from sae_core.minicanvas.text_encoder import TextEncoderConfig, build_text_encoder
from sae_core.minicanvas.tokenizer import WordTokenizer
from sae_core.minicanvas.unet import MiniUNet, UNetConfig

torch.set_num_threads(1)

FORGET = "an image of a star in striped style, an image of a heart in striped style"


def tiny_canvas(seed: int = 0) -> MiniCanvas:
    """A randomly initialised, very small MiniCanvas (no judges)."""
    torch.manual_seed(seed)
    tok = WordTokenizer.default()
    te = build_text_encoder(TextEncoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=32), tok)
    unet = MiniUNet(UNetConfig(model_channels=8, channel_mult=(1, 2), attention_levels=(1,), num_heads=2,
                               context_dim=16, groups=4))
    torch.nn.init.normal_(unet.out[-1].weight, std=0.05)  # MiniUNet zero-inits its head; a random model needs one
    canvas = MiniCanvas(unet, te, tok, NoiseSchedule(), config={"sampling": {"steps": 4, "cfg": 2.0}})
    for m in (unet, te):
        m.eval().requires_grad_(False)
    return canvas


def data(canvas: MiniCanvas, n: int = 6, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    surrogate = SampleSet(torch.rand(n, 3, size, size, generator=g) * 2 - 1, ["noise"] * n)
    prompts = ["an image of a circle in dotted style", "an image of a square", "an image of a ring in neon style"]
    replay = SampleSet(torch.randn(n, 3, size, size, generator=g).clamp(-1, 1), [prompts[i % 3] for i in range(n)])
    return surrogate, replay


def random_fisher(unet, names, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return {fisher_key(n): torch.rand(unet.get_submodule(n).weight.shape, generator=g) * 50 for n in names}


def make_trainer(canvas, config, surrogate=None, replay=None, fisher_seed=2, lora_seed=0, forget=FORGET,
                 targets="xattn"):
    """A trainer on a fresh deepcopy of the canvas UNet (LoRA on ``targets``, default the cross-attention)."""
    if surrogate is None or replay is None:
        s, r = data(canvas)
        surrogate = s if surrogate is None else surrogate
        replay = r if replay is None else replay
    unet = copy.deepcopy(canvas.unet)
    names_before = {n for n, _ in unet.named_modules()}
    loras = inject_lora(unet, targets, rank=2, generator=torch.Generator().manual_seed(lora_seed))
    assert set(loras) <= names_before
    fisher = random_fisher(canvas.unet, list(loras), fisher_seed)
    return AmnesiaTrainer(config, unet, canvas.schedule.alphas_cumprod, canvas.encode_text_default, loras,
                          surrogate, forget, replay=replay if config.gamma > 0 else None,
                          fisher=fisher if config.lam > 0 else None), unet, loras


def factors(loras) -> list[torch.Tensor]:
    return [t.detach().clone() for n in sorted(loras) for t in (loras[n].up, loras[n].down)]


def forward(unet, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    ctx = torch.randn(2, 16, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), ctx)


# --------------------------------------------------------------------------- data


def test_generate_samples_seeds_do_not_depend_on_batching():
    calls = []

    def sampler(prompts, seeds):
        calls.append(len(prompts))
        return torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(s)) + len(p) for p, s in zip(prompts, seeds)])

    a = generate_samples(sampler, ["a", "bb"], per_prompt=3, seed=7, batch_size=4, progress=False)
    b = generate_samples(sampler, ["a", "bb"], per_prompt=3, seed=7, batch_size=1, progress=False)
    assert a.prompts == ["a"] * 3 + ["bb"] * 3 and torch.equal(a.samples, b.samples)
    assert calls == [4, 2] + [1] * 6
    c = generate_samples(sampler, ["a", "bb"], per_prompt=3, seed=8, progress=False)
    assert not torch.equal(a.samples, c.samples)
    with pytest.raises(ValueError, match="one row each"):
        generate_samples(lambda p, s: torch.zeros(1, 2), ["a", "b"], batch_size=2, progress=False)
    with pytest.raises(InterruptedError):
        generate_samples(sampler, ["a"], should_stop=lambda: True, progress=False)


def test_samples_round_trip_and_cache(tmp_path):
    s = noise_samples(5, (3, 4, 4), "x", seed=3)
    assert s.samples.min() >= -1 and s.samples.max() < 1 and len(s) == 5
    path = tmp_path / "set.safetensors"
    save_samples(path, s, {"settings": {"a": 1}})
    back, meta = load_samples(path)
    assert torch.equal(back.samples, s.samples) and back.prompts == s.prompts and meta == {"settings": {"a": 1}}

    made = []

    def make():
        made.append(1)
        return noise_samples(3, (2,), "y", seed=len(made))

    first = cached_samples(tmp_path / "c.safetensors", {"k": [1, 2]}, make)
    again = cached_samples(tmp_path / "c.safetensors", {"k": [1, 2]}, make)
    assert len(made) == 1 and torch.equal(first.samples, again.samples)
    other = cached_samples(tmp_path / "c.safetensors", {"k": [1, 3]}, make)
    assert len(made) == 2 and not torch.equal(first.samples, other.samples)
    (tmp_path / "c.json").unlink()  # an incomplete pair is remade
    cached_samples(tmp_path / "c.safetensors", {"k": [1, 3]}, make)
    assert len(made) == 3
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "missing.safetensors")
    half = cached_samples(tmp_path / "h.safetensors", {"k": 0}, lambda: s, dtype=torch.float16)
    assert half.samples.dtype == torch.float32 and torch.equal(half.samples, s.samples.half().float())
    assert torch.equal(cached_samples(tmp_path / "h.safetensors", {"k": 0}, make).samples, half.samples)


# --------------------------------------------------------------------------- the weight-function adapter


def test_lora_delta_matches_the_module_wrapper_and_the_penalty():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    wrapped = LoRALinear(copy.deepcopy(lin), rank=3, alpha=1.5)
    delta = LoRADelta(lin.weight.shape, rank=3, alpha=1.5)
    with torch.no_grad():
        wrapped.up.normal_()
        delta.up.copy_(wrapped.up)
        delta.down.copy_(wrapped.down)
    x = torch.randn(4, 6)
    via_function = torch.nn.functional.linear(x, delta(lin.weight), lin.bias)
    torch.testing.assert_close(via_function, wrapped(x), rtol=1e-5, atol=1e-6)
    fisher = {fisher_key("m"): torch.rand(5, 6)}
    torch.testing.assert_close(ewc_penalty({"m": delta}, fisher, 50.0), ewc_penalty({"m": wrapped}, fisher, 50.0))
    conv = LoRADelta((4, 3, 3, 3), rank=2)
    assert conv.up.shape == (4, 2, 1, 1) and conv.down.shape == (2, 3, 3, 3)
    assert torch.equal(conv(torch.ones(4, 3, 3, 3)), torch.ones(4, 3, 3, 3))  # B = 0 at start
    with pytest.raises(ValueError, match="shape"):
        conv(torch.ones(4, 3))


def test_chunked_fisher_equals_one_backward_pass():
    """compute_fisher(chunk_size=c) sums the chunks' gradients: the gradient of the sum over all K."""
    from sae_core.amnesia.fisher import compute_fisher

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    xs = [torch.randn(3) for _ in range(5)]

    def loss_fn(x, t, gen):  # deterministic in t, so chunking cannot change the draws
        return torch.stack([(lin(x * (1 + ti.item() / 10)) ** 2).sum() for ti in t])

    kw = dict(timesteps_per_sample=7, total_timesteps=20, progress=False, seed=1)
    whole = compute_fisher(loss_fn, {"w": lin.weight}, xs, **kw)
    chunked = compute_fisher(loss_fn, {"w": lin.weight}, xs, chunk_size=3, **kw)
    torch.testing.assert_close(chunked["w"], whole["w"], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- training


def test_input_model_unchanged_and_terms_logged_separately():
    canvas = tiny_canvas()
    base_state = {k: v.clone() for k, v in canvas.unet.state_dict().items()}
    before = forward(canvas.unet)
    cfg = AmnesiaConfig(steps=4, lr=5e-3, batch_size=3, lam=2.0, gamma=0.5, seed=1)
    trainer, unet, loras = make_trainer(canvas, cfg)
    result = trainer.train(progress=False)
    assert result.steps == 4 and not result.stopped and len(result.history) == 4
    assert torch.equal(forward(canvas.unet), before)
    assert all(torch.equal(v, base_state[k]) for k, v in canvas.unet.state_dict().items())
    assert not torch.equal(forward(unet), before)  # the trained copy did change
    for rec in result.history:
        assert set(rec) >= {"step", "loss", "surrogate", "replay", "ewc", "grad_norm"}
        assert rec["loss"] == pytest.approx(rec["surrogate"] + 0.5 * rec["replay"] + rec["ewc"], rel=1e-5)
    assert result.history[0]["ewc"] == 0.0  # B = 0: no delta yet
    assert result.history[-1]["ewc"] > 0.0
    # the ewc term is the penalty of the factors as they were at that step
    trainer2, _, loras2 = make_trainer(canvas, cfg)
    trainer2.train_step()
    trainer2.train_step()
    expected = ewc_penalty(loras2, trainer2.fisher, cfg.lam).item()
    assert trainer2.train_step()["ewc"] == pytest.approx(expected, rel=1e-5)


def test_surrogate_term_is_an_independent_eager_reference():
    """The logged surrogate term equals a plain per-example eps-MSE of the drawn examples."""
    canvas = tiny_canvas()
    cfg = AmnesiaConfig(steps=1, batch_size=4, lam=0.0, gamma=1.0, seed=3)
    trainer, unet, _ = make_trainer(canvas, cfg)
    draws = trainer._draws(0)
    rec = trainer.train_step()
    # recompute at the initial weights (B = 0: the LoRA model equals the base)
    forget = parse_names(FORGET)
    inv = {i: p for p, i in trainer.prompt_index.items()}
    ref_s, ref_r = [], []
    for i in range(4):
        prompt = inv[int(draws["s_ctx"][i])]
        assert prompt in forget
        ctx = canvas.encode_text_default([prompt])
        x0 = trainer.surrogate[draws["s_idx"][i]][None]
        ref_s.append(eps_mse_loss(canvas.unet, x0, ctx, draws["s_t"][i : i + 1], draws["s_noise"][i : i + 1],
                                  canvas.schedule.alphas_cumprod))
        j = int(draws["r_idx"][i])
        ctx_r = canvas.encode_text_default([inv[int(draws["r_ctx"][i])]])
        ref_r.append(eps_mse_loss(canvas.unet, trainer.replay[j][None], ctx_r, draws["r_t"][i : i + 1],
                                  draws["r_noise"][i : i + 1], canvas.schedule.alphas_cumprod))
    assert rec["surrogate"] == pytest.approx(torch.cat(ref_s).mean().item(), rel=1e-4)
    assert rec["replay"] == pytest.approx(torch.cat(ref_r).mean().item(), rel=1e-4)
    # surrogate and replay halves draw t and noise independently
    assert not torch.equal(draws["s_noise"], draws["r_noise"])


def test_base_replay_target_regresses_onto_the_frozen_model():
    """replay_target='base': the replay term is the student's distance to the untouched model's eps."""
    canvas = tiny_canvas()
    cfg = AmnesiaConfig(steps=3, lr=2e-2, batch_size=3, lam=0.0, gamma=1.0, seed=5, replay_target="base")
    trainer, unet, loras = make_trainer(canvas, cfg)
    noisy, _, _ = make_trainer(canvas, AmnesiaConfig(**{**cfg.__dict__, "replay_target": "noise"}))
    first, first_noisy = trainer.train_step(), noisy.train_step()
    # B = 0: the student is the base model (up to the batch size's float reordering)
    assert first["replay"] < 1e-9 * first_noisy["replay"]
    assert first["surrogate"] == pytest.approx(first_noisy["surrogate"], rel=1e-6)  # the surrogate half is untouched
    trainer.train_step()
    assert all(a.strength == 1.0 for a in loras.values())  # the switch-off is undone
    # an eager recomputation at the current factors, with the input canvas' UNet as the teacher
    draws = trainer._draws(trainer.step)
    inv = {i: p for p, i in trainer.prompt_index.items()}
    ref = []
    abar = canvas.schedule.alphas_cumprod
    for i in range(3):
        x0 = trainer.replay[int(draws["r_idx"][i])][None]
        ctx = canvas.encode_text_default([inv[int(draws["r_ctx"][i])]])
        t = draws["r_t"][i : i + 1]
        a = abar[t].view(1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * draws["r_noise"][i : i + 1]
        with torch.no_grad():
            ref.append((unet(x_t, t, ctx) - canvas.unet(x_t, t, ctx)).square().mean())
    rec = trainer.train_step()
    assert rec["replay"] > 0.0
    assert rec["replay"] == pytest.approx(torch.stack(ref).mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="replay_target"):
        AmnesiaConfig(replay_target="teacher")


def test_replay_data_does_not_leak_into_the_surrogate_term():
    canvas = tiny_canvas()
    cfg = AmnesiaConfig(steps=1, batch_size=3, lam=0.0, seed=4)
    s, r = data(canvas)
    a, _, _ = make_trainer(canvas, cfg, s, r)
    b, _, _ = make_trainer(canvas, cfg, s, SampleSet(r.samples * 0.5, r.prompts))
    ra, rb = a.train_step(), b.train_step()
    assert ra["surrogate"] == pytest.approx(rb["surrogate"], rel=1e-6)
    assert ra["replay"] != rb["replay"]


def test_deterministic_under_seed():
    canvas = tiny_canvas()
    cfg = AmnesiaConfig(steps=3, lr=1e-2, batch_size=2, lam=1.0, seed=11)
    t1, _, l1 = make_trainer(canvas, cfg)
    t2, _, l2 = make_trainer(canvas, cfg)
    h1, h2 = t1.train(progress=False).history, t2.train(progress=False).history
    assert h1 == h2
    assert all(torch.equal(a, b) for a, b in zip(factors(l1), factors(l2)))
    t3, _, l3 = make_trainer(canvas, AmnesiaConfig(steps=3, lr=1e-2, batch_size=2, lam=1.0, seed=12))
    t3.train(progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(factors(l1), factors(l3)))


def test_resume_equals_uninterrupted_run(tmp_path):
    canvas = tiny_canvas()
    cfg = AmnesiaConfig(steps=6, lr=1e-2, batch_size=2, lam=1.0, seed=5, checkpoint_every=2)
    straight, _, l_straight = make_trainer(canvas, cfg)
    full = straight.train(progress=False)

    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    first, _, _ = make_trainer(canvas, cfg)
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] > 3

    part = first.train(ckpt, should_stop=stop_after_three, progress=False)
    assert part.stopped and part.steps == 3 and ckpt.is_file()

    second, _, l_second = make_trainer(canvas, cfg, lora_seed=99)  # different init: the checkpoint must win
    seen = []
    rest = second.train(ckpt, callback=lambda s, n, rec: seen.append(s), progress=False)
    assert seen == [4, 5, 6] and not rest.stopped
    assert rest.history == full.history
    assert all(torch.equal(a, b) for a, b in zip(factors(l_straight), factors(l_second)))

    # a finished run resumes as a no-op; raising steps continues it
    third, _, l_third = make_trainer(canvas, cfg)
    assert third.train(ckpt, progress=False).steps == 6
    assert all(torch.equal(a, b) for a, b in zip(factors(l_straight), factors(l_third)))
    more, _, _ = make_trainer(canvas, AmnesiaConfig(steps=7, lr=1e-2, batch_size=2, lam=1.0, seed=5))
    assert len(more.train(ckpt, progress=False).history) == 7

    # a checkpoint of another run is refused with the differing field named
    other, _, _ = make_trainer(canvas, AmnesiaConfig(steps=6, lr=2e-2, batch_size=2, lam=1.0, seed=5))
    with pytest.raises(FileExistsError,
                       match=r"lr: 0.01 there, 0.02 now\); it is kept: train these settings under another run name"):
        other.train(ckpt, progress=False)


def test_lambda_changes_the_result_and_shrinks_the_weighted_delta():
    canvas = tiny_canvas()
    runs = {}
    for lam in (0.0, 20.0):
        cfg = AmnesiaConfig(steps=8, lr=2e-2, batch_size=3, lam=lam, seed=2)
        trainer, _, loras = make_trainer(canvas, cfg)
        trainer.train(progress=False)
        fisher = random_fisher(canvas.unet, list(loras))
        runs[lam] = (factors(loras), ewc_penalty(loras, fisher, 1.0).item())
    assert not all(torch.equal(a, b) for a, b in zip(runs[0.0][0], runs[20.0][0]))
    assert runs[20.0][1] < runs[0.0][1]  # EWC keeps the Fisher-weighted delta smaller


def _one_backward_step(trainer) -> None:
    """An optimiser step whose gradient comes from one backward pass of the whole loss, EWC penalty included (how
    the trainer computed it before it back-propagated the penalty layer by layer)."""
    from sae_core.amnesia.fisher import eps_mse_loss as loss_rows

    cfg, d, b = trainer.config, trainer._draws(trainer.step), trainer.config.batch_size
    x0 = torch.cat([trainer.surrogate[d["s_idx"]], trainer.replay[d["r_idx"]]])
    ctx = torch.cat([trainer.contexts[d["s_ctx"]], trainer.contexts[d["r_ctx"]]])
    with torch.enable_grad():
        rows = loss_rows(trainer.denoiser, x0, ctx, torch.cat([d["s_t"], d["r_t"]]),
                         torch.cat([d["s_noise"], d["r_noise"]]), trainer.alphas_cumprod)
        total = rows[:b].mean() + cfg.gamma * rows[b:].mean() + ewc_penalty(trainer.adapters, trainer.fisher, cfg.lam)
        trainer.optimizer.zero_grad(set_to_none=True)
        total.backward()
    torch.nn.utils.clip_grad_norm_(trainer.params, cfg.grad_clip if cfg.grad_clip is not None else float("inf"))
    trainer.optimizer.step()
    trainer.step += 1


def test_layer_by_layer_ewc_backward_takes_the_whole_losss_gradient():
    """The trainer back-propagates the data terms, then the EWC penalty one layer at a time (one dW alive at a time):
    its steps equal those of one backward pass of the summed loss."""
    canvas = tiny_canvas()
    cfg = AmnesiaConfig(steps=4, lr=2e-2, batch_size=3, lam=50.0, gamma=1.0, seed=4)
    ours, _, ours_loras = make_trainer(canvas, cfg)
    ref, _, ref_loras = make_trainer(canvas, cfg)
    for _ in range(3):  # from the second step on the LoRA is non-zero and the penalty has a gradient
        rec = ours.train_step()
        _one_backward_step(ref)
    assert rec["ewc"] > 0
    for a, b in zip(factors(ours_loras), factors(ref_loras)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_tiny_run_on_random_minicanvas_reduces_the_surrogate_loss():
    canvas = tiny_canvas(seed=3)
    s, r = data(canvas, n=8)
    cfg = AmnesiaConfig(steps=30, lr=1e-2, batch_size=4, lam=0.1, gamma=1.0, seed=0)
    trainer, unet, _ = make_trainer(canvas, cfg, s, r, targets="full")

    def surrogate_loss(model) -> float:
        g = torch.Generator().manual_seed(123)
        t = torch.randint(0, 1000, (64,), generator=g)
        noise = torch.randn(64, 3, 8, 8, generator=g)
        idx = torch.randint(0, len(s), (64,), generator=g)
        prompts = parse_names(FORGET)
        ctx = canvas.encode_text_default([prompts[i % 2] for i in range(64)])
        with torch.no_grad():
            return eps_mse_loss(model, s.samples[idx], ctx, t, noise, canvas.schedule.alphas_cumprod).mean().item()

    before = surrogate_loss(unet)
    trainer.train(progress=False)
    assert surrogate_loss(unet) < 0.9 * before


def test_forget_prompt_mapping_pairs_surrogates_with_their_prompts():
    canvas = tiny_canvas()
    s = SampleSet(torch.zeros(4, 3, 8, 8), ["a", "a", "b", "b"])
    _, r = data(canvas)
    cfg = AmnesiaConfig(steps=1, batch_size=16, lam=0.0, seed=0)
    mapping = {"a": "an image of a star in striped style", "b": "an image of a heart in striped style, an image of a heart"}
    trainer, _, _ = make_trainer(canvas, cfg, s, r, forget=mapping)
    d = trainer._draws(0)
    inv = {i: p for p, i in trainer.prompt_index.items()}
    for i, c in zip(d["s_idx"].tolist(), d["s_ctx"].tolist()):
        assert inv[c] in parse_names(mapping[s.prompts[i]])
    with pytest.raises(ValueError, match="no forget prompt"):
        make_trainer(canvas, cfg, s, r, forget={"a": "x"})


def test_clear_errors():
    canvas = tiny_canvas()
    with pytest.raises(ValueError, match="needs a Fisher"):
        s, r = data(canvas)
        unet = copy.deepcopy(canvas.unet)
        loras = inject_lora(unet, "xattn", 2)
        AmnesiaTrainer(AmnesiaConfig(lam=1.0), unet, canvas.schedule.alphas_cumprod, canvas.encode_text_default,
                       loras, s, FORGET, replay=r, fisher=None)
    with pytest.raises(ValueError, match="needs replay"):
        AmnesiaTrainer(AmnesiaConfig(lam=0.0, gamma=1.0), unet, canvas.schedule.alphas_cumprod,
                       canvas.encode_text_default, loras, s, FORGET, replay=None)
    with pytest.raises(ValueError, match="batch_size"):
        AmnesiaConfig(batch_size=0)
    with pytest.raises(KeyError, match="no Fisher information"):
        AmnesiaTrainer(AmnesiaConfig(lam=1.0), unet, canvas.schedule.alphas_cumprod, canvas.encode_text_default,
                       loras, s, FORGET, replay=r, fisher={"x": torch.zeros(1)})


def test_loss_curve_image():
    hist = [{"step": i + 1, "loss": 1.0 / (i + 1), "surrogate": 0.5 / (i + 1), "replay": 0.3, "ewc": 0.0 if i == 0 else 1e-3 * i}
            for i in range(20)]
    img = loss_curve_image(hist, width=320, height=200)
    assert img.shape == (200, 320, 3) and img.dtype == np.uint8
    assert (img != 255).any(axis=-1).sum() > 500  # something was drawn
    assert loss_curve_image([], 100, 80).shape == (80, 100, 3)


# --------------------------------------------------------------------------- the MiniCanvas plug-in


def test_minicanvas_plugin_on_a_random_canvas(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path))
    from sae_core.minicanvas.plugins import amnesia as plugin
    from sae_core.minicanvas.methods import get_method

    assert get_method("amnesia") is plugin.amnesia_method
    canvas = tiny_canvas()
    before = forward(canvas.unet)
    opts = dict(steps=3, batch_size=2, bank_seeds=(7,), bank_steps=2, timesteps_per_sample=2, quiet=True)
    edited = plugin.amnesia_method(canvas, "style", ["striped"], **opts)
    assert edited.unet is not canvas.unet and torch.equal(forward(canvas.unet), before)
    assert not torch.equal(forward(edited.unet), before)
    assert not any("lora" in n for n, _ in edited.unet.named_parameters())  # merged
    rep = edited.amnesia_report
    assert len(rep.history) == 3 and rep.surrogate_count == 8 and rep.replay_count == 64
    assert all("striped" in p for p in rep.forget_prompts) and len(rep.forget_prompts) == 8
    assert rep.recipe["lam"] == plugin.KIND_DEFAULTS["style"]["lam"] and rep.recipe["steps"] == 3
    # per-kind defaults apply under the caller's options
    obj = plugin.amnesia_method(canvas, "object", ["star"], **opts).amnesia_report
    assert obj.recipe["lam"] == plugin.KIND_DEFAULTS["object"]["lam"]
    assert plugin.amnesia_method(canvas, "object", ["star"], **opts, lam=0.0).amnesia_report.recipe["lam"] == 0.0
    # bank and Fisher were cached and are reused
    files = sorted(p.name for p in plugin.cache_dir(canvas).iterdir())
    assert any(f.startswith("amnesia_bank_") for f in files) and any(f.startswith("amnesia_fisher_xattn") for f in files)
    again = plugin.amnesia_method(canvas, "style", ["striped"], **opts)
    assert again.amnesia_report.prepare_seconds < rep.prepare_seconds + 5
    assert torch.equal(forward(again.unet), forward(edited.unet))  # deterministic

    recipe = plugin._recipe(opts)
    bank = plugin.data_bank(canvas, recipe, progress=False)
    sur, forget, rep_set = plugin.erasure_data(canvas, "object", ["star"], bank, recipe)
    assert all("cross" in p for p in sur.prompts) and all("star" not in p for p in rep_set.prompts)
    assert forget["an image of a cross in neon style"] == ["an image of a star in neon style"]
    assert forget["an image of a cross"] == ["an image of a star"] and len(sur) == 9
    sur, forget, _ = plugin.erasure_data(canvas, "style", ["striped", "dotted"], bank, recipe)
    assert set(sur.prompts) == {f"an image of a {o} in checkered style" for o in canvas.objects}
    assert forget["an image of a ring in checkered style"] == ["an image of a ring in striped style", "an image of a ring in dotted style"]
    sur, forget, _ = plugin.erasure_data(canvas, "style", ["striped"], bank, plugin._recipe({**opts, "surrogate": "mixed"}))
    assert len(sur) == 56 and forget["an image of a ring in mono style"] == ["an image of a ring in striped style"]
    sur, forget, _ = plugin.erasure_data(canvas, "style", ["striped"], bank, plugin._recipe({**opts, "surrogate": "unstyled"}))
    assert len(sur) == 8 and forget["an image of a ring"] == ["an image of a ring in striped style"]
    sur, forget, _ = plugin.erasure_data(canvas, "object", ["star"], bank, plugin._recipe({**opts, "surrogate": "noise"}))
    assert sur.prompts[0] == "noise" and len(forget) == 9 and float(sur.samples.abs().max()) <= 1
    with pytest.raises(ValueError, match="unknown amnesia option"):
        plugin.amnesia_method(canvas, "style", ["striped"], lamda=1)
    with pytest.raises(ValueError, match="unknown style"):
        plugin.amnesia_method(canvas, "style", ["baroque"])


# --------------------------------------------------------------------------- one pipeline, two hosts


class WeightFunctionHost:
    """The ComfyUI node's training mechanism on a MiniCanvas: LoRA factors as weight functions
    (``LoRADelta``, what ``nodes/training.py`` hands ComfyUI's ``add_weight_wrapper``) on an untouched
    copy of the UNet, instead of the plug-in's injected LoRA layers."""

    def __init__(self, canvas):
        self.canvas = canvas
        self.device = canvas.device
        self.alphas_cumprod = canvas.schedule.alphas_cumprod

    def encode(self, prompts):
        return self.canvas.encode_text_default(prompts)

    def sample(self, prompts, seeds):
        raise AssertionError("not used")

    @contextlib.contextmanager
    def lora_training(self, config, generator):
        from torch.nn.utils import parametrize

        unet = copy.deepcopy(self.canvas.unet).eval()
        unet.requires_grad_(False)
        adapters = {}
        for name in select_targets(unet, config.targets):
            module = unet.get_submodule(name)
            adapters[name] = LoRADelta(module.weight.shape, config.rank, config.alpha, generator=generator)
            parametrize.register_parametrization(module, "weight", adapters[name], unsafe=True)
        yield pipeline.LoRATraining(unet, adapters)

    def fisher_training(self, config):
        raise AssertionError("not used")


def test_injected_layers_and_weight_functions_train_the_same_factors():
    """The pipeline gives the same LoRA whichever way a host applies it: the plug-in's injected layers
    and the node's weight functions reach equal factors after several steps from one seed and config."""
    canvas = tiny_canvas()
    surrogate, replay = data(canvas)
    names = select_targets(canvas.unet, "xattn")
    fisher = random_fisher(canvas.unet, names)
    cfg = AmnesiaConfig(forget_prompts=FORGET, targets="xattn", rank=2, steps=4, lr=1e-2, batch_size=3, lam=1.0,
                        gamma=1.0, seed=7, replay_target="base")
    layers = pipeline.train_forgetting_lora(plugin_host(canvas), cfg, surrogate, replay, fisher, progress=False)
    functions = pipeline.train_forgetting_lora(WeightFunctionHost(canvas), cfg, surrogate, replay, fisher, progress=False)
    assert sorted(layers.adapters) == sorted(functions.adapters) == sorted(names)
    assert len(layers.result.history) == 4
    for a, b in zip(layers.result.history, functions.result.history):
        assert a["surrogate"] == pytest.approx(b["surrogate"], rel=1e-4)
        assert a["ewc"] == pytest.approx(b["ewc"], rel=1e-4, abs=1e-9)
    for x, y in zip(factors(layers.adapters), factors(functions.adapters)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)  # float rounding differs between the two forms
    assert any(float(a.up.detach().abs().sum()) > 0 for a in layers.adapters.values())  # something was trained
    # another seed draws other factors: the comparison above is not vacuous
    other = pipeline.train_forgetting_lora(plugin_host(canvas), replace(cfg, seed=8), surrogate, replay, fisher, progress=False)
    assert not all(torch.equal(x, y) for x, y in zip(factors(layers.adapters), factors(other.adapters)))


def plugin_host(canvas):
    from sae_core.minicanvas.plugins.amnesia import CanvasHost

    return CanvasHost(canvas)


def test_plugin_is_a_thin_host_of_the_pipeline(tmp_path, monkeypatch):
    """The bench's erasure is exactly ``pipeline.train_forgetting_lora`` with the config its options build."""
    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path))
    from sae_core.minicanvas.plugins import amnesia as plugin

    calls = []
    real = pipeline.train_forgetting_lora

    def spy(host, config, *args, **kwargs):
        calls.append((config, args))
        return real(host, config, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_forgetting_lora", spy)
    canvas = tiny_canvas()
    opts = dict(steps=3, batch_size=2, bank_seeds=(7,), bank_steps=2, timesteps_per_sample=2, quiet=True, rank=3, lr=2e-2)
    edited = plugin.amnesia_method(canvas, "object", ["star"], **opts)
    (config, (surrogate, replay, fisher)), = calls
    assert isinstance(config, AmnesiaConfig)
    assert (config.steps, config.batch_size, config.rank, config.lr, config.lam) == (3, 2, 3, 2e-2, plugin.KIND_DEFAULTS["object"]["lam"])
    assert config.forget_prompts["an image of a cross"] == ("an image of a star",)
    host = plugin.CanvasHost(canvas)
    again = real(host, config, surrogate, replay, fisher, progress=False)
    assert again.result.history == edited.amnesia_report.history
    merge_lora(host.unet)
    assert torch.equal(forward(host.unet), forward(edited.unet))


def test_config_is_validated_once_and_parses_prompt_lists():
    cfg = AmnesiaConfig(forget_prompts="brad pitt, a man\n# note\nbrad pitt", remember_prompts="a dog\n\na cat\na dog",
                        surrogate_prompt="  a middle aged man ")
    assert cfg.forget_prompts == ("brad pitt", "a man") and cfg.remember_prompts == ("a dog", "a cat")
    assert cfg.surrogate_prompt == "a middle aged man"
    assert AmnesiaConfig(forget_prompts={"x": "a, b"}).forget_prompts == {"x": ("a", "b")}
    assert replace(cfg, lam=0.0).forget_prompts == cfg.forget_prompts  # re-validation keeps parsed values
    for bad in (dict(targets="attn"), dict(rank=0), dict(precision="fp16"), dict(timestep_batch=0), dict(alpha=-1.0),
                dict(steps=-1), dict(lr=0.0), dict(lam=float("nan")), dict(surrogate_samples=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AmnesiaConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lam = 1.0  # type: ignore[misc]


def test_several_surrogate_prompts_pair_with_one_forget_line_each():
    cfg = AmnesiaConfig(surrogate_prompt="a star in dotted style\n# comment\n\na heart in dotted style",
                        forget_prompts="a star in striped style, striped star\na heart in striped style")
    assert cfg.surrogate_prompts == ("a star in dotted style", "a heart in dotted style")
    assert cfg.forget_prompts == {"a star in dotted style": ("a star in striped style", "striped star"),
                                  "a heart in dotted style": ("a heart in striped style",)}
    assert replace(cfg, lam=0.0).forget_prompts == cfg.forget_prompts
    # one line of forget prompts is shared by every surrogate prompt, as with a single surrogate prompt
    shared = AmnesiaConfig(surrogate_prompt="a\nb", forget_prompts="x, y")
    assert shared.forget_prompts == ("x", "y")
    # a single surrogate prompt keeps every line of forget prompts as alternatives (unchanged)
    assert AmnesiaConfig(surrogate_prompt="a", forget_prompts="x\ny").forget_prompts == ("x", "y")
    assert AmnesiaConfig().surrogate_prompts == ()
    with pytest.raises(ValueError, match="forget_prompts: with 2 surrogate prompts.*got 3 lines"):
        AmnesiaConfig(surrogate_prompt="a\nb", forget_prompts="x\ny\nz")
    with pytest.raises(ValueError, match="surrogate_prompt: 'a' is given more than once"):
        AmnesiaConfig(surrogate_prompt="a\nb\na", forget_prompts="x")
    with pytest.raises(ValueError, match="no forget prompt for the surrogate prompt"):
        AmnesiaConfig(surrogate_prompt="a\nb", forget_prompts={"a": "x"})


class _CountingHost:
    """A host whose sampler returns each row's seed and prompt length, and counts its calls."""

    device = torch.device("cpu")
    alphas_cumprod = torch.linspace(0.99, 0.01, 10)

    def __init__(self) -> None:
        self.calls = 0

    def sample(self, prompts, seeds):
        self.calls += 1
        return torch.tensor([[float(s), float(len(p))] for p, s in zip(prompts, seeds)])


def test_training_samples_of_several_surrogate_prompts_and_from_a_bank():
    cfg = AmnesiaConfig(surrogate_prompt="aa\nbbb", forget_prompts="x\ny", remember_prompts="c\ndddd",
                        surrogate_samples=2, replay_per_prompt=1, seed=10)
    host = _CountingHost()
    drawn = pipeline.training_samples(host, cfg)
    assert drawn.surrogate.prompts == ["aa", "aa", "bbb", "bbb"]
    assert drawn.surrogate.samples[:, 0].tolist() == [10, 11, 12, 13]  # seed + i * surrogate_samples + j
    off = 10 + pipeline.REPLAY_SEED_OFFSET
    assert drawn.replay.prompts == ["c", "dddd"] and drawn.replay.samples[:, 0].tolist() == [off, off + 1]

    # a bank: the first rows of each prompt, in the bank's order; nothing is sampled
    prompts = ["bbb", "c", "aa", "bbb", "aa", "dddd", "aa", "c"]
    bank = SampleSet(torch.arange(8.0)[:, None], prompts)
    calls = host.calls
    taken = pipeline.training_samples(host, cfg, bank=bank)
    assert host.calls == calls
    assert taken.surrogate.prompts == ["aa", "aa", "bbb", "bbb"] and taken.surrogate.samples[:, 0].tolist() == [2, 4, 0, 3]
    assert taken.replay.prompts == ["c", "dddd"] and taken.replay.samples[:, 0].tolist() == [1, 5]
    assert pipeline.training_samples(host, replace(cfg, gamma=0.0), bank=bank).replay is None
    with pytest.raises(ValueError, match="surrogate_prompt: the sample bank has 2 sample.*'bbb', 3 wanted"):
        pipeline.training_samples(host, replace(cfg, surrogate_samples=3), bank=bank)
    with pytest.raises(ValueError, match="remember_prompts: the sample bank has 0 sample.*'e'"):
        pipeline.training_samples(host, replace(cfg, remember_prompts="c\ne"), bank=bank)
