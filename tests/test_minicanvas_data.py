"""MiniCanvas data, tokenizer, text encoder, UNet naming and sampler sanity."""

import numpy as np
import pytest
import torch

from sae_core.minicanvas.data import OBJECTS, STYLES, make_dataset, prompt_for, render
from sae_core.minicanvas.diffusion import NoiseSchedule, SamplingContext, ddim_sample
from sae_core.minicanvas.text_encoder import TextEncoderConfig, build_text_encoder
from sae_core.minicanvas.tokenizer import WordTokenizer
from sae_core.minicanvas.unet import MiniUNet, SpatialTransformer, UNetConfig


def test_at_least_eight_by_eight():
    assert len(OBJECTS) >= 8 and len(STYLES) >= 8
    assert len(set(OBJECTS)) == len(OBJECTS) and len(set(STYLES)) == len(STYLES)
    assert all(" " not in s for s in STYLES)


def test_dataset_deterministic_and_seed_dependent():
    a = make_dataset(2, seed=5)
    b = make_dataset(2, seed=5)
    c = make_dataset(2, seed=6)
    assert a.images.dtype == np.uint8 and a.images.shape == (len(OBJECTS) * len(STYLES) * 2, 32, 32, 3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.objects, b.objects)
    assert not np.array_equal(a.images, c.images)


def test_labels_cover_every_pair_and_match_prompts():
    d = make_dataset(1, seed=0)
    pairs = set(zip(d.objects.tolist(), d.styles.tolist()))
    assert pairs == {(o, s) for o in range(len(OBJECTS)) for s in range(len(STYLES))}
    for o, s in list(pairs)[:10]:
        p = prompt_for(o, s)
        assert p == f"an image of a {OBJECTS[o]} in {STYLES[s]} style"
    assert prompt_for(3, None) == f"an image of a {OBJECTS[3]}" == prompt_for(3, -1)


def test_object_stands_out_from_background():
    # the object region must differ from the background: images of one style differ per object
    rng = np.random.default_rng(0)
    for s in range(len(STYLES)):
        imgs = np.stack([render(o, s, rng).astype(np.float32) for o in range(len(OBJECTS))])
        assert imgs.std(axis=(1, 2)).mean() > 10.0


def test_render_rejects_bad_labels():
    with pytest.raises(ValueError, match="object_idx"):
        render(len(OBJECTS), 0, np.random.default_rng(0))


def test_tokenizer_bos_eos_padding_and_unknown():
    tok = WordTokenizer.default()
    out = tok(["an image of a star in striped style", "An image of a STAR.", "zebra"])
    ids, mask = out.input_ids, out.attention_mask
    assert ids.shape == (3, tok.max_length)
    assert (ids[:, 0] == tok.bos_token_id).all()
    n = mask.sum(1)
    assert n.tolist() == [10, 7, 3]
    for i in range(3):
        assert ids[i, n[i] - 1] == tok.eos_token_id
        assert (ids[i, n[i]:] == tok.pad_token_id).all()
    assert ids[2, 1] == tok.unk_token_id
    assert torch.equal(tok("an image of a star").input_ids[0], ids[1])
    long = tok(" ".join(["star"] * 40)).input_ids[0]
    assert long[-1] == tok.eos_token_id
    assert tok.decode(ids[0].tolist()) == "an image of a star in striped style"


def test_text_encoder_is_clip_with_causal_mask():
    tok = WordTokenizer.default()
    torch.manual_seed(0)
    te = build_text_encoder(TextEncoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64), tok).eval()
    assert len(te.text_model.encoder.layers) == 2
    assert any(k.startswith("text_model.encoder.layers.0.") for k in te.state_dict())
    a = tok(["an image of a star in striped style"]).input_ids
    b = a.clone()
    b[0, 7] = tok.index["dotted"]
    with torch.no_grad():
        ha, hb = te(a).last_hidden_state, te(b).last_hidden_state
    # causal: positions before the change are identical, the changed one differs
    torch.testing.assert_close(ha[:, :7], hb[:, :7])
    assert not torch.allclose(ha[:, 7:], hb[:, 7:])


def _small_unet():
    torch.manual_seed(0)
    return MiniUNet(UNetConfig(model_channels=16, context_dim=32)).eval()


def test_unet_sd_names_and_cross_attention_shapes():
    unet = _small_unet()
    names = dict(unet.named_modules())
    assert isinstance(names["time_embed"], torch.nn.Sequential)
    assert "input_blocks.0.0" in names and "middle_block.1" in names and "out" in names
    transformers = unet.transformer_names()
    res = {16: 0, 8: 0}
    x = torch.randn(1, 3, 32, 32)
    shapes = {}
    hooks = [names[n].register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape[-1])) for n in transformers]
    unet(x, torch.tensor([10]), torch.randn(1, 16, 32))
    for h in hooks:
        h.remove()
    for n in transformers:
        res[shapes[n]] = res.get(shapes[n], 0) + 1
        st = names[n]
        assert isinstance(st, SpatialTransformer)
        for sub in ("norm", "proj_in", "proj_out", "transformer_blocks.0.norm1", "transformer_blocks.0.attn1",
                    "transformer_blocks.0.norm2", "transformer_blocks.0.attn2", "transformer_blocks.0.norm3",
                    "transformer_blocks.0.ff"):
            assert f"{n}.{sub}" in names, f"{n}.{sub}"
        attn2 = names[f"{n}.transformer_blocks.0.attn2"]
        for lin in ("to_q", "to_k", "to_v"):
            assert isinstance(getattr(attn2, lin), torch.nn.Linear)
        assert isinstance(attn2.to_out[0], torch.nn.Linear)
        assert attn2.to_k.in_features == 32 and attn2.to_v.in_features == 32
        assert attn2.to_k.out_features == attn2.to_q.out_features
    # transformers at two resolutions on both paths
    down = {shapes[n] for n in transformers if n.startswith("input_blocks")}
    up = {shapes[n] for n in transformers if n.startswith("output_blocks")}
    assert down == up == {16, 8}


def test_ddim_cfg_weight_one_equals_conditional_only():
    unet = _small_unet()
    with torch.no_grad():
        for p in unet.out.parameters():
            p.normal_(0, 0.1)
    sched = NoiseSchedule()
    cond, uncond = torch.randn(2, 16, 32), torch.randn(1, 16, 32)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ddim_sample(unet, sched, cond, uncond, noise, steps=4, cfg=1.0)
        b = ddim_sample(unet, sched, cond, None, noise, steps=4, cfg=7.0)
        # same cond and uncond: guidance has nothing to amplify
        c = ddim_sample(unet, sched, cond, cond, noise, steps=4, cfg=5.0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_ddim_with_oracle_eps_recovers_x0_and_context_tracks_steps():
    sched = NoiseSchedule()
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    noise = torch.randn(2, 3, 8, 8)
    xT = sched.add_noise(x0, noise, torch.tensor([999, 999]))
    seen = []
    ctx = SamplingContext()

    def oracle(x, t, c):  # the exact eps that maps x_t back to x0
        seen.append((ctx.step_index, ctx.timestep, int(t[0])))
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = ddim_sample(oracle, sched, torch.zeros(2, 1, 1), None, xT, steps=5, cfg=1.0, context=ctx)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    ts = sched.ddim_timesteps(5)
    assert ts[0] == 999 and ts == sorted(ts, reverse=True) and len(set(ts)) == 5
    assert seen == [(i, t, t) for i, t in enumerate(ts)]
    assert ctx.step_index == -1


def test_loss_weightings():
    from sae_core.minicanvas.diffusion import loss_weights

    sched = NoiseSchedule()
    t = torch.arange(0, 1000, 7)
    ms = loss_weights(sched, t, "min_snr", 5.0)
    snr = sched.snr(t)
    assert torch.all(ms <= 1 + 1e-6) and torch.all(ms[snr <= 5] == 1)
    v = loss_weights(sched, t, "v_clamped", 30.0)
    assert torch.all(v >= 1) and torch.all(v <= 30) and torch.all(v[1:] >= v[:-1])
    torch.testing.assert_close(v[:5], 1 / sched.alphas_cumprod[t[:5]])
    assert torch.all(loss_weights(sched, t, "none", 0.0) == 1)
    with pytest.raises(ValueError, match="weighting"):
        loss_weights(sched, t, "bogus", 1.0)
