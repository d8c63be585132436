"""ItD (sae_core.itd): interpretation, the gated edit, the CLIPTextModel patch and the concepts file.

The text encoder is a tiny random transformers ``CLIPTextModel`` whose token embeddings are
scaled up so that, as in a trained CLIP, token identity is visible in the residual stream. The
SAE is constructed from that model's own residuals: one latent per vocabulary word whose
encoder/decoder direction is the word's mean (centred) residual, k = 1, plus latents that never
fire. That is a valid TopK SAE with word features, so concept detection can be
checked exactly without a long training run.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from sae_core.config import SaeConfig, TrainConfig
from sae_core.itd import (
    ItDConcepts,
    ItDGate,
    SaeMath,
    TextLayerSource,
    build_concepts,
    classifier_report,
    clip_tokenize_fn,
    max_latent_activations,
    patch_text_encoder,
    prompt_tops,
    residual_token_batches,
    sae_fingerprint,
    score_prompts,
    train_text_sae,
)
from sae_core.sae import SparseAutoencoder

torch.set_num_threads(1)

CONCEPTS = ["cat", "dog", "horse", "tiger", "eagle", "shark", "robot", "castle", "dragon", "violin"]
OTHERS = ["car", "tree", "house", "boat", "chair", "lamp", "flower", "river", "mountain", "cup"]
TEMPLATES = ["a photo of a {}", "a painting of a {}", "a {} on the table", "an image with a {}", "{}"]
PAD_TO = 12
LAYER = 1


class ToyTokenizer:
    """Word-level stand-in for an HF CLIP tokenizer (BOS=1, EOS=2)."""

    bos_token_id = 1
    eos_token_id = 2

    def __init__(self) -> None:
        words = sorted({w for t in TEMPLATES for w in t.replace("{}", "").split()} | set(CONCEPTS) | set(OTHERS))
        self.vocab = ["<pad>", "<bos>", "<eos>", *words]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __call__(self, prompts, add_special_tokens=True, truncation=True, max_length=None):
        out = []
        for prompt in prompts:
            ids = [self.index[w] for w in prompt.split()]
            if max_length is not None:
                ids = ids[: max_length - 2]
            out.append([self.bos_token_id, *ids, self.eos_token_id])
        return {"input_ids": out}


def concept_prompts(words):
    return {w: [t.format(w) for t in TEMPLATES] for w in words}


RETAIN = [t.format(w) for w in OTHERS for t in TEMPLATES]


@pytest.fixture(scope="module")
def tokenizer():
    return ToyTokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(tokenizer)


def build_model(tokenizer):
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer.vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=PAD_TO,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = CLIPTextModel(cfg).eval()
    with torch.no_grad():
        emb = m.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(1)))
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def source(model, tokenizer):
    return TextLayerSource(model, LAYER, clip_tokenize_fn(tokenizer, pad_to=PAD_TO), pad_to=PAD_TO)


def make_word_sae(source, tokenizer, extra_latents=24, k=1):
    """A TopK SAE with one latent per vocabulary word (direction = the word's mean centred residual);
    the extra latents have a large negative bias and never fire."""
    prompts = [p for v in concept_prompts(CONCEPTS).values() for p in v] + RETAIN
    res = source.residual(prompts)
    ids = source.tokenize(prompts).input_ids
    h = res.hidden.reshape(-1, res.hidden.shape[-1])
    mu = h.mean(0)
    flat_ids = ids.reshape(-1)
    vocab = len(tokenizer.vocab)
    d = h.shape[-1]
    dirs = torch.randn(vocab + extra_latents, d, generator=torch.Generator().manual_seed(2))
    bias = torch.full((vocab + extra_latents,), -1e3)  # unused latents never fire
    for tok in range(vocab):
        rows = h[flat_ids == tok]
        if rows.shape[0] == 0:
            continue
        u = rows.mean(0) - mu
        dirs[tok] = u
        bias[tok] = 0.0
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=vocab + extra_latents, k=k, hookpoint=source.layer_path))
    with torch.no_grad():
        sae.encoder.weight.copy_(dirs)
        sae.encoder.bias.copy_(bias)
        sae.W_dec.copy_(dirs)
        sae.b_dec.copy_(mu)
    return sae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def sae(source, tokenizer):
    return make_word_sae(source, tokenizer)


@pytest.fixture(scope="module")
def concepts(sae, source):
    return build_concepts(sae, source, concept_prompts(CONCEPTS), RETAIN, top_n=32, pad_token="eos")


def encode(model, tokenizer, prompts):
    ids = clip_tokenize_fn(tokenizer, pad_to=PAD_TO)(prompts).input_ids
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------
# the gated edit against a plain eager reference
# ---------------------------------------------------------------------------------------------


def eager_steer(sae, h, features, scale, mode):
    """Dense reference: z~ = z with z~[:, t>=1, F] *= s; reconstruct or residual + delta."""
    z = sae.encode_dense(h.float(), batch_topk=False)
    z_new = z.clone()
    z_new[:, 1:, features] = scale * z[:, 1:, features]
    if mode == "reconstruct":
        return sae.decode_dense(z_new)
    return h.float() + (z_new - z) @ sae.W_dec


@pytest.mark.parametrize("mode", ["reconstruct", "preserve"])
def test_gate_matches_dense_reference(sae, source, concepts, mode):
    prompts = [concept_prompts(CONCEPTS)["cat"][0], RETAIN[0], RETAIN[7], concept_prompts(CONCEPTS)["violin"][2]]
    h = source.residual(prompts).hidden
    h0 = h.clone()
    gate = ItDGate(sae, concepts.features, concepts.tau, scale=-8.0, error_mode=mode)
    out = gate(h)
    ref = eager_steer(sae, h, concepts.features, -8.0, mode)
    torch.testing.assert_close(out.steered, ref, rtol=1e-5, atol=1e-5)
    ref_scores = (ref - h).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(out.scores, ref_scores, rtol=1e-5, atol=1e-7)
    expected = ref_scores >= concepts.tau
    assert expected.tolist() == [True, False, False, True]
    assert torch.equal(out.detected, expected)
    for b in range(len(prompts)):
        if expected[b]:
            torch.testing.assert_close(out.hidden[b], ref[b], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(out.hidden[b], h[b])
    assert torch.equal(h, h0)  # the input tensor itself is never modified


def test_fp32_math_agrees_with_sae_and_chunking(sae, source):
    h = source.residual(RETAIN[:6]).hidden
    acts, idx = SaeMath(sae).encode(h)
    dense = torch.zeros(*h.shape[:2], sae.num_latents).scatter(-1, idx, acts)
    torch.testing.assert_close(dense, sae.encode_dense(h, batch_topk=False), rtol=1e-6, atol=1e-6)
    acts_c, idx_c = SaeMath(sae, latent_chunk=7).encode(h)
    dense_c = torch.zeros_like(dense).scatter(-1, idx_c, acts_c)
    torch.testing.assert_close(dense_c, dense, rtol=1e-6, atol=1e-6)
    # a half-precision copy of the SAE is still evaluated in fp32 (same code up to fp16 weight rounding)
    half = make_word_sae(source, ToyTokenizer()).half()
    out32 = ItDGate(sae, [3, 4], None)(h).steered
    out16 = ItDGate(half, [3, 4], None)(h).steered
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, out32, rtol=2e-2, atol=2e-2)


def test_half_precision_residual_passes_through_bit_exact(sae, source, concepts):
    prompts = [RETAIN[1], concept_prompts(CONCEPTS)["dog"][1]]
    h = source.residual(prompts).hidden.half()
    out = ItDGate(sae, concepts.features, concepts.tau)(h)
    assert out.hidden.dtype == torch.float16
    assert out.detected.tolist() == [False, True]
    assert torch.equal(out.hidden[0], h[0])
    assert not torch.equal(out.hidden[1], h[1])


# ---------------------------------------------------------------------------------------------
# interpretation
# ---------------------------------------------------------------------------------------------


def test_junk_feature_filter_on_one_word_prompt(sae, source):
    prompt = ["cat"]
    res = source.residual(prompt)
    a = max_latent_activations(SaeMath(sae), res.hidden)[0]
    n = sae.num_latents  # far more than the one-word prompt activates
    plain = a.topk(n).indices
    assert (a[plain] == 0).any(), "the trap is real: a plain top-n returns zero-activation latents"
    tops = prompt_tops(sae, source, prompt, n)["cat"]
    assert 0 < tops.numel() < n
    assert bool((a[tops] > 0).all()), "every selected feature must be active on the prompt"
    assert set(tops.tolist()) == set(torch.nonzero(a > 0).flatten().tolist())


def test_concept_features_are_the_concept_words(sae, concepts, tokenizer):
    # the constructed SAE has latent i = vocabulary word i; each concept must be found as its own word
    for name in CONCEPTS:
        assert tokenizer.index[name] in concepts.concept_features[name].tolist()
    retained_words = {tokenizer.index[w] for w in OTHERS}
    assert not retained_words & set(concepts.features.tolist())
    assert torch.equal(concepts.features, torch.cat(list(concepts.concept_features.values())).unique())


def test_threshold_is_reproducible(sae, source, concepts):
    again = build_concepts(sae, source, concept_prompts(CONCEPTS), RETAIN, top_n=32, pad_token="eos")
    assert again.tau == concepts.tau
    assert torch.equal(again.features, concepts.features)
    assert torch.equal(again.target_scores, concepts.target_scores)
    cal = concepts.calibration
    assert cal.tau == pytest.approx(0.99 * float(concepts.target_scores.min()), rel=1e-12)
    assert cal.retain_max == pytest.approx(float(concepts.retain_scores.max()))
    assert cal.gap == pytest.approx(cal.tau - cal.retain_max)
    assert cal.gap > 0, cal.summary()


# ---------------------------------------------------------------------------------------------
# the patch on a transformers CLIPTextModel
# ---------------------------------------------------------------------------------------------


def test_patch_edits_concepts_and_keeps_others_bit_exact(model, tokenizer, sae, concepts):
    targets = [p for v in concept_prompts(CONCEPTS).values() for p in v[:2]]
    prompts = [val for pair in zip(targets, RETAIN) for val in pair]  # interleaved batch
    is_target = torch.tensor([p in targets for p in prompts])
    before = encode(model, tokenizer, prompts)
    with patch_text_encoder(model, sae, concepts) as patch:
        after = encode(model, tokenizer, prompts)
    for b in range(len(prompts)):
        if is_target[b]:
            assert not torch.allclose(after[b], before[b], atol=1e-3), prompts[b]
        else:
            assert torch.equal(after[b], before[b]), prompts[b]
    assert torch.equal(patch.last.detected, is_target)
    assert patch.last.scores.shape == (len(prompts),)
    assert patch.last.tau == concepts.tau and patch.last.length == PAD_TO
    # a batch without any concept prompt is the unpatched output, bit for bit
    plain = encode(model, tokenizer, RETAIN)
    with patch_text_encoder(model, sae, concepts) as patch:
        assert torch.equal(encode(model, tokenizer, RETAIN), plain)
    assert not bool(patch.last.detected.any())


def test_model_unchanged_after_patch(model, tokenizer, sae, concepts):
    prompts = RETAIN[:4] + concept_prompts(CONCEPTS)["shark"]
    weights = state(model)
    before = encode(model, tokenizer, prompts)
    patch = patch_text_encoder(model, sae, concepts)
    assert patch.installed and not no_hooks(model)
    encode(model, tokenizer, prompts)
    patch.remove()
    assert not patch.installed and no_hooks(model)
    assert torch.equal(encode(model, tokenizer, prompts), before)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_hook_removed_after_exception(model, tokenizer, sae, concepts):
    prompts = RETAIN[:3] + concept_prompts(CONCEPTS)["cat"][:2]
    before = encode(model, tokenizer, prompts)
    with pytest.raises(RuntimeError, match="boom"):
        with patch_text_encoder(model, sae, concepts):
            encode(model, tokenizer, prompts)
            raise RuntimeError("boom")
    assert no_hooks(model)
    # an error raised inside the hook during the forward (another padding length, strict mode)
    with pytest.raises(ValueError, match="calibrated at"):
        with patch_text_encoder(model, sae, concepts, on_length_mismatch="error"):
            ids = clip_tokenize_fn(tokenizer, pad_to=PAD_TO - 2)(prompts).input_ids
            model(input_ids=ids)
    assert no_hooks(model)
    assert torch.equal(encode(model, tokenizer, prompts), before)


def test_length_mismatch_warns(model, tokenizer, sae, concepts):
    with patch_text_encoder(model, sae, concepts) as patch, pytest.warns(UserWarning, match="calibrated at"):
        model(input_ids=clip_tokenize_fn(tokenizer, pad_to=PAD_TO - 2)(RETAIN[:2]).input_ids)
    assert patch.last.length == PAD_TO - 2


def test_width_mismatch_is_a_clear_error(model, source, concepts):
    narrow = SparseAutoencoder(SaeConfig(d_in=16, num_latents=64, k=4))
    fake = ItDConcepts(features=[1, 2], tau=1.0, layer=LAYER)
    with pytest.raises(ValueError, match=r"d_in=16.*width 32"):
        patch_text_encoder(model, narrow, fake)
    with pytest.raises(ValueError, match=r"d_in=16.*width 32"):
        build_concepts(narrow, source, {"cat": ["cat"]}, ["car"], top_n=4)
    assert no_hooks(model)
    # concepts recorded for another SAE are refused too
    other = SparseAutoencoder(SaeConfig(d_in=32, num_latents=concepts.sae_num_latents, k=2))
    with pytest.raises(ValueError, match="different SAE"):
        patch_text_encoder(model, other, concepts)


def test_tuple_output_layers_are_supported(sae, source, concepts):
    """transformers 4.x layers return ``(hidden,)``: the hook replaces element 0 and keeps the rest."""

    class TupleLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer_norm1 = torch.nn.LayerNorm(32)

        def forward(self, x):
            return (x * 1.0, "extra")

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([TupleLayer(), TupleLayer()])

    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()

    root = Root()
    h = source.residual([RETAIN[3], concept_prompts(CONCEPTS)["eagle"][0], RETAIN[4]]).hidden
    plain = root.encoder.layers[1](h)
    with patch_text_encoder(root, sae, concepts, layer=1, check_fingerprint=True) as patch:
        out = root.encoder.layers[1](h)
    assert isinstance(out, tuple) and out[1] == "extra"
    assert patch.last.detected.tolist() == [False, True, False]
    for b in range(3):
        if patch.last.detected[b]:
            assert not torch.equal(out[0][b], plain[0][b])
        else:
            assert torch.equal(out[0][b], plain[0][b])


# ---------------------------------------------------------------------------------------------
# multi-concept
# ---------------------------------------------------------------------------------------------


def test_eight_plus_concepts_at_once(model, tokenizer, sae, source, concepts):
    assert len(concepts.concept_names) >= 8
    assert all(concepts.concept_features[name].numel() > 0 for name in CONCEPTS)
    targets = concept_prompts(CONCEPTS)
    all_targets = [p for v in targets.values() for p in v]
    with patch_text_encoder(model, sae, concepts) as patch:
        encode(model, tokenizer, all_targets + RETAIN)
    detected = patch.last.detected
    assert bool(detected[: len(all_targets)].all()), "every prompt of every concept is detected"
    assert not bool(detected[len(all_targets) :].any()), "no retain prompt is detected"
    # per concept, the classifier report agrees
    gate = ItDGate(sae, concepts.features, concepts.tau)
    report = classifier_report(score_prompts(gate, source, all_targets), score_prompts(gate, source, RETAIN), concepts.tau)
    assert report.recall == 1.0 and report.false_positive_rate == 0.0 and report.precision == 1.0
    # a subset of the concepts still edits only its own prompts (one threshold, no retraining)
    few = build_concepts(sae, source, {c: targets[c] for c in CONCEPTS[:3]}, RETAIN, top_n=32)
    g = ItDGate(sae, few.features, few.tau)
    scores = score_prompts(g, source, targets["cat"] + targets["violin"])
    assert bool((scores[:5] >= few.tau).all())


def test_combine_concept_sets(sae, source):
    targets = concept_prompts(CONCEPTS)
    a = build_concepts(sae, source, {"cat": targets["cat"]}, RETAIN, top_n=32)
    b = build_concepts(sae, source, {"dog": targets["dog"]}, RETAIN, top_n=32)
    both = ItDConcepts.combine([a, b])
    assert both.concept_names == ["cat", "dog"]
    assert torch.equal(both.features, torch.cat([a.features, b.features]).unique())
    assert both.tau == min(a.tau, b.tau)


# ---------------------------------------------------------------------------------------------
# the concepts file
# ---------------------------------------------------------------------------------------------


def test_concepts_file_round_trip(tmp_path, sae, concepts):
    path = concepts.save(tmp_path / "animals.safetensors")
    loaded = ItDConcepts.load(path)
    assert torch.equal(loaded.features, concepts.features)
    assert loaded.tau == concepts.tau and loaded.scale == concepts.scale
    assert loaded.layer == LAYER and loaded.hookpoint == concepts.hookpoint and loaded.pad_to == PAD_TO
    assert loaded.sae_fingerprint == sae_fingerprint(sae)
    assert loaded.concept_names == concepts.concept_names
    for name in CONCEPTS:
        assert torch.equal(loaded.concept_features[name], concepts.concept_features[name])
    assert loaded.calibration.to_dict() == concepts.calibration.to_dict()
    assert torch.equal(loaded.target_scores, concepts.target_scores)
    assert [p.name for p in tmp_path.iterdir()] == ["animals.safetensors"]  # no temp files left
    loaded.check_sae(sae)
    # the fingerprint does not depend on the dtype the SAE was loaded in
    assert sae_fingerprint(make_word_sae_copy(sae).half()) == sae_fingerprint(sae)


def make_word_sae_copy(sae):
    copy = SparseAutoencoder(sae.cfg)
    copy.load_state_dict(sae.state_dict())
    return copy


def test_concepts_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ItDConcepts.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        ItDConcepts.load(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an ItD concepts file"):
        ItDConcepts.load(foreign)
    with pytest.raises(ValueError, match=".safetensors"):
        ItDConcepts(features=[1], tau=1.0).save(tmp_path / "x.json")


# ---------------------------------------------------------------------------------------------
# SAE training from a text-activation store
# ---------------------------------------------------------------------------------------------


def test_training_stream_and_short_training(source):
    prompts = RETAIN[:20]
    stream = residual_token_batches(source, prompts, prompts_per_step=8, seed=3, epochs=1)
    batches = list(stream)
    assert sum(b.shape[0] for b in batches) == len(prompts) * PAD_TO  # every position of every prompt
    again = list(residual_token_batches(source, prompts, prompts_per_step=8, seed=3, epochs=1))
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    full = source.residual(prompts).hidden.reshape(-1, 32)
    assert torch.equal(torch.cat(batches).sort(0).values, full.sort(0).values)  # same rows, shuffled
    cfg = TrainConfig(batch_size=64, k=4, num_latents=64, lr=1e-3, batch_topk=False, log_every=5)
    sae = train_text_sae(source, prompts, cfg, total_steps=10, progress=False)
    assert sae.d_in == 32 and sae.cfg.hookpoint == source.layer_path and not sae.cfg.batch_topk
    assert torch.isfinite(sae.W_dec).all()


def test_whitened_training_folds_back_exactly():
    from sae_core.itd import fit_whitening, fold_whitening

    g = torch.Generator().manual_seed(5)
    mix = torch.randn(16, 16, generator=g) * torch.logspace(-1, 1, 16)[:, None]
    rows = torch.randn(400, 16, generator=g) @ mix + 3.0
    exact = fit_whitening(rows, eps=1e-9)
    torch.testing.assert_close(torch.cov(((rows - exact.mean) @ exact.forward).T), torch.eye(16), rtol=0, atol=1e-3)
    torch.testing.assert_close(exact.forward @ exact.inverse, torch.eye(16), rtol=0, atol=1e-4)
    w = fit_whitening(rows)  # default floor: near-constant directions are damped, not blown up
    white = (rows - w.mean) @ w.forward
    assert float(torch.cov(white.T).diagonal().max()) <= 1.0 + 1e-4
    sae = SparseAutoencoder(SaeConfig(d_in=16, num_latents=64, k=4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.normal_(generator=g)
        sae.encoder.bias.normal_(generator=g)
    folded = fold_whitening(sae, w)
    a, i = SaeMath(sae).encode(white)
    fa, fi = SaeMath(folded).encode(rows)
    dense = torch.zeros(400, 64).scatter(-1, i, a)
    torch.testing.assert_close(torch.zeros(400, 64).scatter(-1, fi, fa), dense, rtol=1e-4, atol=1e-4)
    recon_white = SaeMath(sae).decode(a, i)
    torch.testing.assert_close(SaeMath(folded).decode(fa, fi), recon_white @ w.inverse + w.mean, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the MiniCanvas plug-in
# ---------------------------------------------------------------------------------------------


def _minicanvas():
    from sae_core.minicanvas import files

    if not (files.WEIGHTS_DIR / files.MODEL_FILE).is_file():
        pytest.skip("the MiniCanvas weights are not built yet (python -m sae_core.minicanvas.train)")
    from sae_core.minicanvas.canvas import MiniCanvas

    return MiniCanvas.load(judges=False)


def test_minicanvas_prompt_sets():
    from sae_core.minicanvas.plugins.itd import canvas_prompts, concept_prompt_sets

    sets = concept_prompt_sets("style", ["striped", "neon"])
    assert sorted(sets.targets) == ["neon", "striped"] and all(len(v) == 8 for v in sets.targets.values())
    assert "" in sets.retain and not set(sets.retain) & {p for v in sets.targets.values() for p in v}
    assert len(sets.retain) + 16 == len(canvas_prompts(variations=False))
    obj = concept_prompt_sets("object", ["star"])
    assert len(obj.targets["star"]) == 9 and all("star" in p for p in obj.targets["star"])
    with pytest.raises(ValueError, match="unknown MiniCanvas style"):
        concept_prompt_sets("style", ["baroque"])


def test_minicanvas_itd_method(tmp_path, monkeypatch):
    canvas = _minicanvas()
    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path))
    from sae_core.minicanvas.plugins.itd import DEFAULT_SCALE as plugin_defaults
    from sae_core.minicanvas.plugins.itd import concept_prompt_sets, itd_method
    from sae_core.minicanvas.methods import get_method

    assert get_method("itd") is itd_method
    weights = state(canvas.text_encoder)
    sets = concept_prompt_sets("style", ["dotted"])
    edited = itd_method(canvas, "style", ["dotted"], train_steps=40, quiet=True)
    assert canvas.encode_fn is None and edited.encode_fn is not None
    prompts = sets.targets["dotted"] + sets.retain
    before = canvas.encode_text(prompts)
    after = edited.encode_text(prompts)
    report = edited.itd_report.classifier
    assert report.tp + report.fn == 8 and report.recall == 1.0  # calibration prompts are always detected
    assert edited.itd_report.concepts.scale == plugin_defaults["style"]
    flagged = torch.cat([report.concept_scores, report.other_scores]) >= edited.itd_report.concepts.tau
    for b in range(len(prompts)):
        if flagged[b]:
            assert not torch.equal(after[b], before[b]), prompts[b]
        else:
            assert torch.equal(after[b], before[b]), prompts[b]
    assert torch.equal(edited.encode_text([""]), canvas.encode_text([""]))  # the unconditional prompt
    assert all(torch.equal(v, weights[k]) for k, v in canvas.text_encoder.state_dict().items())
    assert no_hooks(canvas.text_encoder)
    # the trained SAE was cached and is reused (no second training)
    import sae_core.minicanvas.plugins.itd as plugin

    assert list(tmp_path.rglob("*.safetensors"))
    monkeypatch.setattr(plugin, "train_canvas_sae", lambda *a, **k: pytest.fail("the cached SAE was not reused"))
    again = plugin.load_or_train_sae(canvas, plugin.MiniCanvasItDConfig(train_steps=40), progress=False)
    assert sae_fingerprint(again) == edited.itd_report.concepts.sae_fingerprint
    # the kind's default strength, unless given
    assert itd_method(canvas, "object", ["star"], train_steps=40, quiet=True).itd_report.concepts.scale == plugin_defaults["object"]
    assert itd_method(canvas, "object", ["star"], train_steps=40, scale=-4.0, quiet=True).itd_report.concepts.scale == -4.0
    with pytest.raises(ValueError, match="unknown"):
        itd_method(canvas, "style", ["baroque"], quiet=True)
    with pytest.raises(ValueError, match="unknown itd option"):
        itd_method(canvas, "style", ["dotted"], topn=3, quiet=True)


def test_settings_are_validated_once_at_construction():
    from sae_core.itd import ItDSettings

    s = ItDSettings(concepts=["cat", "dog"], retain_prompts=["a house", "cat", "a tree"])
    assert s.concepts == {"cat": ("cat",), "dog": ("dog",)} and s.target_prompts == ["cat", "dog"]
    assert s.retain == ["a house", "a tree"]  # a prompt cannot be both erased and kept
    per = ItDSettings(concepts={"cat": ["a cat", "cat"]}, retain_prompts={"cat": ["cat", "a dog"]})
    assert per.retain == {"cat": ["a dog"]}
    for bad, match in [({"concepts": []}, "concept list is empty"), ({"concepts": "cat"}, "list of texts"),
                       ({"concepts": {"cat": []}}, "no target prompts"), ({"retain_prompts": "a dog"}, "one string"),
                       ({"retain_prompts": {"x": ["a"]}}, "no retain prompts given"), ({"layer": -2}, "layer"),
                       ({"scale": 1.0}, "scale"), ({"threshold_margin": 0.0}, "threshold_margin"),
                       ({"threshold_margin": 1.5}, "threshold_margin"), ({"top_n": 0}, "top_n"),
                       ({"error_mode": "zero"}, "error_mode"), ({"positions": "bos"}, "positions"),
                       ({"skip_positions": -1}, "skip_positions")]:
        with pytest.raises(ValueError, match=match):
            ItDSettings(**{"concepts": ["cat"], **bad})


def test_gate_steers_like_the_checked_entry_point(sae, source, concepts):
    """ItDGate validates its settings once and then steers without re-checking; same values as ``steer``."""
    from sae_core.itd import ERROR_MODES, steer

    h = source.residual(RETAIN[:3]).hidden
    for mode in ERROR_MODES:
        gate = ItDGate(sae, concepts.features, None, -4.0, mode)
        torch.testing.assert_close(gate.steer(h), steer(gate.math, h, gate.table, -4.0, mode), rtol=0, atol=0)
    with pytest.raises(ValueError, match="error_mode"):
        ItDGate(sae, concepts.features, None, -4.0, "zero")
    with pytest.raises(ValueError, match="error_mode"):
        steer(gate.math, h, gate.table, -4.0, "zero")
