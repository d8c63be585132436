"""ItD Prompt Classifier in a real ComfyUI, on small CLIP-L-structured encoders built with ComfyUI's own classes.

The text encoders are ComfyUI's ``SD1ClipModel`` / ``SDXLClipModel`` with small configs (64 wide, 4 layers),
random weights and the shipped SD1 tokenizer. The token embeddings are drawn larger than the other weights so
that, as in a trained CLIP, token identity is visible in the residual stream. The SAE is built from that
encoder's own residuals at the hooked layer, read through the normal ComfyUI encode path: one latent per token
that occurs in a small prompt set (direction = the token's mean centred residual, firing threshold = half its
mean activation), k = 1, plus latents that never fire. It is a valid TopK SAE with one feature per word, so the
node's interpretation, calibration and gating can be checked exactly without training.
"""

from __future__ import annotations

import json
from pathlib import Path
import logging
import re

import pytest
import torch

from sae_core.config import SaeConfig
from sae_core.sae import SparseAutoencoder

NODE_ID = "CE_ItDPromptClassifier"
WIDTH = 64
LAYERS = 4
LAYER = 2
CONCEPTS = "cat, dragon"
RETAIN = "a photo of a house\na painting of a tree\nhouse"
OTHERS = ["a photo of a boat", "a dog on the table", "a cup", "a painting of a house at night"]
"""Prompts without a concept word that calibration never saw."""
VOCAB_PROMPTS = ["cat", "dragon", "a photo of a cat", "a painting of a dragon", "a photo of a house",
                 "a painting of a tree", "house", *OTHERS]
"""Prompts whose tokens get a latent of the test SAE."""

torch.set_num_threads(1)


def split(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"[,\n]", text) if p.strip()]


def _init_(named_params, seed: int) -> None:
    """Random weights (comfy.ops layers skip initialisation); token embeddings at unit scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "token_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02
                        + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


def _config(width: int = WIDTH, layers: int = LAYERS, **extra) -> dict:
    return {"hidden_size": width, "num_hidden_layers": layers, "intermediate_size": 2 * width,
            "num_attention_heads": 2, **extra}


def _clip(tokenizer, model, options: dict, seed: int = 1):
    import comfy.sd
    import comfy.supported_models_base

    with torch.inference_mode():
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, model), model_options=options)
        _init_(clip.cond_stage_model.named_parameters(), seed)
    return clip


def sd1_clip():
    import comfy.sd1_clip

    return _clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, {"clip_l_model_config": _config()})


def sdxl_clip():
    import comfy.sdxl_clip

    return _clip(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel,
                 {"clip_l_model_config": _config(),
                  "clip_g_model_config": _config(32, 3, projection_dim=32)})


@torch.no_grad()
def word_sae(clip, layer: int = LAYER, hookpoint: str | None = "default", extra: int = 8) -> SparseAutoencoder:
    """A k=1 TopK SAE with one latent per token of VOCAB_PROMPTS, read at clip_l ``layer`` via the encode path."""
    module = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[layer]
    rows, ids = [], []
    handle = module.register_forward_hook(lambda _m, _a, out: rows.append(out.detach().clone()))
    try:
        with torch.inference_mode():
            for prompt in VOCAB_PROMPTS:
                tokens = clip.tokenize(prompt)
                clip.encode_from_tokens(tokens)
                ids.append(torch.tensor([t[0] for t in tokens["l"][0]]))
    finally:
        handle.remove()
    h = torch.cat(rows).reshape(-1, WIDTH).float()
    flat = torch.cat(ids)
    mu = h.mean(0)
    tokens = flat.unique().tolist()
    n = len(tokens) + extra
    dirs = torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(5))
    bias = torch.full((n,), -1e3)  # latents without a token never fire
    for j, tok in enumerate(tokens):
        centred = h[flat == tok] - mu
        d = centred.mean(0)
        dirs[j] = d / d.norm()
        bias[j] = -0.5 * float((centred @ dirs[j]).mean())
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    hook = f"text_model.encoder.layers.{layer}" if hookpoint == "default" else hookpoint
    sae = SparseAutoencoder(SaeConfig(d_in=WIDTH, num_latents=n, k=1, hookpoint=hook))
    sae.encoder.weight.copy_(dirs)
    sae.encoder.bias.copy_(bias)
    sae.W_dec.copy_(dirs)
    sae.b_dec.copy_(mu)
    return sae.eval().requires_grad_(False)


def run_node(comfy, clip, sae, concepts=CONCEPTS, retain=RETAIN, layer=LAYER, scale=-8.0, **optional):
    node = comfy.nodes.NODE_CLASS_MAPPINGS[NODE_ID]()
    with torch.inference_mode():
        out = node.classify(clip, sae, concepts, retain, layer, scale, **optional)
    assert out["ui"]["text"] == [out["result"][1]]  # the report is shown on the node
    return out["result"]


def encode(clip, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return cond.clone(), pooled.clone()


def the_patch(comfy, clip, layer: int = LAYER):
    itd = comfy.nodes_pkg.itd
    patch = clip.patcher.object_patches[itd.layer_key(layer)]
    assert isinstance(patch, itd.ItDClipPatch)
    return patch


def report_scores(report: str) -> dict[str, tuple[float, str]]:
    """``prompt -> (score, EDIT/keep)`` from the report's per-prompt lines."""
    out = {}
    for line in report.splitlines():
        m = re.match(r"^\s+(\S+)\s+(EDIT|keep)\s+(.+)$", line)
        if m:
            out[m.group(3)] = (float(m.group(1)), m.group(2))
    return out


@pytest.fixture(scope="module")
def tiny():
    clip = sd1_clip()
    return clip, word_sae(clip)


def test_concepts_edited_others_bit_exact(comfy, tiny, caplog):
    clip, sae = tiny
    prompts = split(CONCEPTS) + split(RETAIN.replace("\n", ",")) + OTHERS + ["a photo of a cat"]
    before = {p: encode(clip, p) for p in prompts}
    with caplog.at_level(logging.INFO, logger="concept_erasure"):
        patched, report = run_node(comfy, clip, sae)
        patch = the_patch(comfy, patched)
        after = {}
        for p in prompts:
            after[p] = encode(patched, p)
            rec = patch.last
            assert rec is not None and rec.prompts == [p] and rec.scores.shape == (1,) and rec.tau == patch.tau
            assert bool(rec.detected[0]) == bool(rec.scores[0] >= patch.tau)
            assert patch.last_scores is rec.scores
    assert patched is not clip and isinstance(report, str)
    for p in prompts:
        (c0, p0), (c1, p1) = before[p], after[p]
        assert c0.shape == c1.shape == (1, 77, WIDTH) and p0.shape == p1.shape == (1, WIDTH)
        detected = bool(next(r for r in reversed(patch.history) if r.prompts == [p]).detected[0])
        if p in split(CONCEPTS) or p == "a photo of a cat":
            assert detected, p
            assert not torch.equal(c0, c1) and not torch.equal(p0, p1), p
        else:
            assert not detected, p
            assert torch.equal(c0, c1) and torch.equal(p0, p1), p  # bit-exact, cond and pooled
    # every encoded chunk's score is logged
    logged = [r.getMessage() for r in caplog.records if "score" in r.getMessage() and "tau" in r.getMessage()]
    for p in prompts:
        assert any(f"{p!r} score" in m for m in logged), p
    assert any("deactivated at clip_l layer 2" in m for m in logged)
    assert any("passed through unchanged" in m for m in logged)


def test_calibration_scores_equal_encode_scores(comfy, tiny):
    """Calibration tokenizes through ComfyUI's tokenizer at 77 tokens: a prompt scores the same in both."""
    clip, sae = tiny
    patched, report = run_node(comfy, clip, sae)
    patch = the_patch(comfy, patched)
    concepts = patch.concepts
    calibrated = dict(zip(split(CONCEPTS), concepts.target_scores.tolist()))
    calibrated.update(zip(RETAIN.splitlines(), concepts.retain_scores.tolist()))
    listed = report_scores(report)
    assert set(listed) == set(calibrated)
    for prompt, score in calibrated.items():
        encode(patched, prompt)
        assert float(patch.last.scores[0]) == score, prompt
        assert listed[prompt][1] == ("EDIT" if score >= patch.tau else "keep")
        assert abs(listed[prompt][0] - score) <= 1e-5 * max(1.0, abs(score))
    # the threshold: margin x smallest concept score, above every retain score here
    assert patch.tau == pytest.approx(0.99 * min(concepts.target_scores.tolist()), rel=1e-12)
    assert max(concepts.retain_scores.tolist()) < patch.tau
    assert concepts.pad_to == 77 and concepts.layer == LAYER and concepts.scale == -8.0
    assert f"tau = {patch.tau:.6g}" in report and "all 3 retain prompts stay below tau" in report
    # the selected features are exactly the concept words' own latents (the retain words' are excluded)
    cat_id = clip.tokenizer.clip_l.tokenizer("cat")["input_ids"][1]
    assert concepts.features.numel() == 2 and concepts.concept_features["cat"].numel() == 1
    with torch.no_grad():
        direction = sae.W_dec[concepts.concept_features["cat"][0]]
        word = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight[cat_id].float()
        others = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight[:1000].float()
    cos = torch.nn.functional.cosine_similarity(others, direction[None], dim=1)
    assert torch.nn.functional.cosine_similarity(word, direction, dim=0) > cos.max()


def test_input_clip_unchanged(comfy, tiny):
    clip, sae = tiny
    probes = ["cat", "a photo of a boat"]
    before = {p: encode(clip, p) for p in probes}
    object_patches = dict(clip.patcher.object_patches)
    state = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    patched, _ = run_node(comfy, clip, sae)
    assert clip.patcher.object_patches == object_patches == {}
    assert len(patched.patcher.object_patches) == 2
    encode(patched, "cat")  # loads the patched clone: its object patches go onto the shared module
    for p in probes:  # loading the input again restores the original forward
        c, pooled = encode(clip, p)
        assert torch.equal(c, before[p][0]) and torch.equal(pooled, before[p][1]), p
    assert all(torch.equal(v, state[k]) for k, v in clip.cond_stage_model.state_dict().items())
    assert set(clip.cond_stage_model.state_dict()) == set(state)  # the patch never joins the module tree
    # and the patched clone keeps its edit after the input was used in between
    assert not torch.equal(encode(patched, "cat")[0], before["cat"][0])


def test_threshold_is_reproducible(comfy, tiny):
    clip, sae = tiny
    first_clip, first = run_node(comfy, clip, sae)
    second_clip, second = run_node(comfy, clip, sae)
    assert first == second
    a, b = the_patch(comfy, first_clip), the_patch(comfy, second_clip)
    assert a.tau == b.tau and torch.equal(a.concepts.features, b.concepts.features)


def test_weighted_and_long_prompts(comfy, tiny):
    """A weighted prompt adds an empty row (never classified); a long prompt is gated chunk by chunk."""
    clip, sae = tiny
    patched, _ = run_node(comfy, clip, sae)
    patch = the_patch(comfy, patched)
    c0, _ = encode(clip, "(a photo:1.2) of a boat")
    c1, _ = encode(patched, "(a photo:1.2) of a boat")
    assert patch.last.prompts == ["a photo of a boat"] and not bool(patch.last.detected.any())
    assert torch.equal(c0, c1)
    c1, _ = encode(patched, "(cat:1.1) on a boat")
    assert patch.last.detected.tolist() == [True]
    assert not torch.equal(c1, encode(clip, "(cat:1.1) on a boat")[0])

    long_prompt = " ".join(["a photo of a house"] * 20) + " cat"
    c0, _ = encode(clip, long_prompt)
    c1, _ = encode(patched, long_prompt)
    assert c0.shape == c1.shape and c0.shape[1] == 77 * len(patch.last.prompts) > 77
    rows = patch.last.detected.tolist()
    assert rows[-1] and not any(rows[:-1]) and patch.last.prompts[-1].endswith(f"[chunk {len(rows)}/{len(rows)}]")
    assert torch.equal(c0[:, : 77 * (len(rows) - 1)], c1[:, : 77 * (len(rows) - 1)])
    assert not torch.equal(c0[:, -77:], c1[:, -77:])


def test_layer_choice(comfy, tiny):
    itd = comfy.nodes_pkg.itd
    assert itd.hookpoint_layer("text_model.encoder.layers.8") == 8
    assert itd.hookpoint_layer("transformer.text_model.encoder.layers.11") == 11
    assert itd.hookpoint_layer("blocks.7.hook_resid_post") == 7
    assert itd.hookpoint_layer("unet.up_blocks.1.attentions.1") is None and itd.hookpoint_layer(None) is None
    assert itd.default_layer(12) == 8

    clip, sae = tiny
    patched, report = run_node(comfy, clip, sae, layer=-1)  # from the SAE's hookpoint
    assert the_patch(comfy, patched).layer == LAYER and "the SAE's hookpoint" in report
    with pytest.raises(ValueError, match=r"layer 9 .* out of range.*4 layers"):
        run_node(comfy, clip, sae, layer=9)
    no_hook = word_sae(clip, hookpoint=None)
    patched, report = run_node(comfy, clip, no_hook, layer=-1)  # ItD's default: 2/3 up
    assert the_patch(comfy, patched, itd.default_layer(LAYERS)).layer == itd.default_layer(LAYERS)
    assert "default" in report


def test_clear_errors(comfy, tiny):
    clip, sae = tiny
    narrow = SparseAutoencoder(SaeConfig(d_in=32, num_latents=64, k=4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"width mismatch.*d_in=32.*width 64"):
        run_node(comfy, clip, narrow)
    with pytest.raises(ValueError, match="concept list is empty"):
        run_node(comfy, clip, sae, concepts=" ,\n ")
    with pytest.raises(ValueError, match="no concept-specific features"):
        run_node(comfy, clip, sae, concepts="house", retain="a photo of a house")
    with pytest.raises(ValueError, match="needs a CLIP"):
        run_node(comfy, None, sae)
    assert clip.patcher.object_patches == {}


def test_unsupported_encoders_are_refused(comfy):
    import comfy.sd1_clip as sd1
    import comfy.sdxl_clip as sdxl
    import comfy.text_encoders.sa_t5 as sa_t5
    import comfy.text_encoders.sd2_clip as sd2

    class RefinerTokenizer(sd1.SD1Tokenizer):
        """The SDXL refiner's tokenizer: clip_g alone."""

        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, clip_name="g",
                             tokenizer=sdxl.SDXLClipGTokenizer)

    sae = SparseAutoencoder(SaeConfig(d_in=WIDTH, num_latents=128, k=4), generator=torch.Generator().manual_seed(0))
    cases = [
        (_clip(sd2.SD2Tokenizer, sd2.SD2ClipModel, {"clip_h_model_config": _config(96, 3, projection_dim=96)}),
         r"SD2ClipModel with clip_h \(width 96\)"),
        (_clip(RefinerTokenizer, sdxl.SDXLRefinerClipModel,
               {"clip_g_model_config": _config(WIDTH, 3, projection_dim=WIDTH)}),
         r"SDXLRefinerClipModel with clip_g \(width 64\)"),
        (_clip(sa_t5.SAT5Tokenizer, sa_t5.SAT5Model,
               {"t5base_model_config": {"d_model": WIDTH, "d_ff": 2 * WIDTH, "d_kv": 16, "num_heads": 2,
                                        "num_layers": 2}}),
         r"SAT5Model with t5base \(width 64\)"),
    ]
    for clip, message in cases:
        with pytest.raises(ValueError, match=r"CLIP-L text encoder .*" + message + ", which is not supported"):
            run_node(comfy, clip, sae, layer=0)
        assert clip.patcher.object_patches == {}


def test_sdxl_edits_clip_l_only(comfy):
    clip = sdxl_clip()
    sae = word_sae(clip)
    prompts = ["cat", "a photo of a boat", "house"]
    before = {p: encode(clip, p) for p in prompts}
    patched, report = run_node(comfy, clip, sae)
    assert "SDXL clip_l layer 2" in report
    patch = the_patch(comfy, patched)
    for p in prompts:
        (c0, p0), (c1, p1) = before[p], encode(patched, p)
        assert c0.shape == c1.shape == (1, 77, WIDTH + 32) and p0.shape == (1, 32)
        assert torch.equal(c0[..., WIDTH:], c1[..., WIDTH:]) and torch.equal(p0, p1), p  # clip_g untouched
        if p == "cat":
            assert bool(patch.last.detected[0]) and not torch.equal(c0[..., :WIDTH], c1[..., :WIDTH])
        else:
            assert not bool(patch.last.detected[0]) and torch.equal(c0, c1), p
    # SDXL conditions on clip_l's penultimate layer (index 2 of 4): the last layer cannot matter
    late = word_sae(clip, layer=3)
    with pytest.raises(ValueError, match=r"layer 3 .*comes after layer 2"):
        run_node(comfy, clip, late, layer=3)


# ---------------------------------------------------------------------------------------------
# the example workflow
# ---------------------------------------------------------------------------------------------


def test_node_and_plugin_reach_the_same_pipeline(comfy, tiny, monkeypatch):
    """ItD Prompt Classifier and the MiniCanvas plug-in's path (its canvas host over the same clip_l) call the
    one ``run_itd`` with equal settings and select the same features and threshold."""
    from types import SimpleNamespace

    from sae_core.itd import ItDSettings
    from sae_core.minicanvas.plugins import itd as plugin

    itd, clip_text, clip_patch = comfy.nodes_pkg.itd, comfy.nodes_pkg.clip_text, comfy.nodes_pkg.clip_patch
    clip, sae = tiny
    seen = []
    real = itd.run_itd
    assert real is plugin.run_itd

    def spy(host, sae_, settings, **kwargs):
        run = real(host, sae_, settings, **kwargs)
        seen.append((host, settings, run))
        return run

    monkeypatch.setattr(itd, "run_itd", spy)
    monkeypatch.setattr(plugin, "run_itd", spy)
    run_node(comfy, clip, sae, threshold_margin=0.9, top_n=4)

    encoder = clip.cond_stage_model.clip_l
    tokenize, length = clip_text.first_chunk_tokenizer(clip, "l", "test")

    class TextEncoder(torch.nn.Module):
        """clip_l fed token ids as a MiniCanvas text encoder is."""

        def __init__(self):
            super().__init__()
            self.transformer = encoder.transformer

        def forward(self, ids):
            return clip_patch.run_encoder(encoder, ids)

    def tokenizer(prompts):
        ids, counts = tokenize(prompts)
        return SimpleNamespace(input_ids=ids, attention_mask=torch.arange(length)[None] < torch.tensor(counts)[:, None])

    tokenizer.max_length = length
    canvas = SimpleNamespace(text_encoder=TextEncoder(), tokenizer=tokenizer)
    names = split(CONCEPTS)
    settings = ItDSettings(concepts={c: [c] for c in names}, retain_prompts=split(RETAIN), layer=LAYER,
                           threshold_margin=0.9, top_n=4)
    with torch.inference_mode():
        plugin.build_canvas_concepts(canvas, sae, "object", settings)
    (node_host, node_settings, node_run), (plugin_host, plugin_settings, plugin_run) = seen
    assert node_settings == plugin_settings == settings
    assert node_run.concepts.layer == plugin_run.concepts.layer == LAYER
    assert (node_host.pad_to, node_host.batch_size, plugin_host.batch_size) == (77, 1, 128)
    a, b = node_run.concepts, plugin_run.concepts
    assert a.features.numel() > 0 and torch.equal(a.features, b.features)
    assert all(torch.equal(a.concept_features[n], b.concept_features[n]) for n in names)
    assert a.tau == pytest.approx(b.tau, rel=1e-5) and a.calibration.margin == b.calibration.margin == 0.9
    torch.testing.assert_close(a.target_scores, b.target_scores, rtol=1e-5, atol=0)


def test_workflow_wiring():
    """The classifier feeds the positive prompt only (tests/comfy/test_workflows.py checks every
    workflow against the node definitions)."""
    wf = json.loads((Path(__file__).resolve().parents[2] / "workflows" / "itd_prompt_classifier.json").read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}

    def source_of(node, socket):
        link = next(i["link"] for i in node["inputs"] if i["name"] == socket)
        return next(by_id[src] for lid, src, *_ in wf["links"] if lid == link)

    (sampler,) = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    positive, negative = source_of(sampler, "positive"), source_of(sampler, "negative")
    assert positive["type"] == negative["type"] == "CLIPTextEncode"
    assert source_of(positive, "clip")["type"] == NODE_ID  # the classifier feeds the positive prompt only
    assert source_of(negative, "clip")["type"] == "CheckpointLoaderSimple"
    itd = next(n for n in wf["nodes"] if n["type"] == NODE_ID)
    assert source_of(itd, "clip")["type"] == "CheckpointLoaderSimple" and source_of(itd, "sae")["type"] == "CE_LoadSAE"
    edges = {(by_id[s]["type"], by_id[d]["type"]) for _, s, _, d, _, _ in wf["links"]}
    chain = ["KSampler", "VAEDecode", "SaveImage"]
    assert all((a, b) in edges for a, b in zip(chain, chain[1:])), edges


# ---------------------------------------------------------------------------------------------
# calibration templates and ItD Prompt Gate
# ---------------------------------------------------------------------------------------------

GATE_ID = "CE_ItDPromptGate"


def test_templates_put_each_concept_and_retain_line_into_every_phrasing(comfy, tiny):
    clip, sae = tiny
    patched, report = run_node(comfy, clip, sae, templates="{}\na photo of a {}\n# a comment")
    scores = report_scores(report)
    for word in split(CONCEPTS):
        assert scores[word][1] == scores[f"a photo of a {word}"][1] == "EDIT"
    assert "a photo of a a photo of a house" in scores and scores["house"][1] == "keep"
    concepts = the_patch(comfy, patched).concepts
    assert concepts.calibration.n_targets == 4  # 2 concepts x 2 templates
    with pytest.raises(ValueError, match="exactly one"):
        run_node(comfy, clip, sae, templates="a photo of a cat")


def gate(comfy, clip, text="", conditioning=None):
    node = comfy.nodes.NODE_CLASS_MAPPINGS[GATE_ID]()
    with torch.inference_mode():
        out = node.gate(clip, text, conditioning)
    return out["result"], out["ui"]["text"][0]


def test_gate_flags_concept_prompts_from_text_or_conditioning(comfy, tiny):
    clip, sae = tiny
    patched, _ = run_node(comfy, clip, sae)
    patch = the_patch(comfy, patched)
    for prompt, expected in [("a painting of a dragon", True), ("a photo of a cat", True), ("a photo of a boat", False),
                             ("(dragon:1.2) on a hill", True), ("house", False)]:
        (flagged, score, tau), shown = gate(comfy, patched, prompt)
        assert flagged is expected and isinstance(score, float) and tau == pytest.approx(patch.tau)
        assert (score >= tau) is expected
        assert shown.startswith("FLAGGED" if expected else "passed") and ("EDIT" in shown) is expected
        # the same decision travels in the conditioning the ItD CLIP encodes (SD1)
        (cond,) = comfy.nodes.CLIPTextEncode().encode(patched, prompt)
        (c_flagged, c_score, c_tau), _ = gate(comfy, patched, "ignored when a conditioning is wired", cond)
        assert (c_flagged, c_tau) == (flagged, tau) and c_score == pytest.approx(score, rel=1e-6)
    long = " ".join(["a photo of a boat"] * 20) + " dragon"  # two chunks, the concept in the second
    (flagged, score, tau), shown = gate(comfy, patched, long)
    assert flagged and "[chunk 2/2]" in shown and shown.count("\n") == 2


def test_gate_errors_are_clear(comfy, tiny):
    clip, sae = tiny
    with pytest.raises(ValueError, match="CLIP output of the ItD Prompt Classifier"):
        gate(comfy, clip, "a cat")
    patched, _ = run_node(comfy, clip, sae)
    with pytest.raises(ValueError, match="needs a prompt"):
        gate(comfy, patched, "  ")
    (plain,) = comfy.nodes.CLIPTextEncode().encode(clip, "a cat")  # encoded without the classifier
    with pytest.raises(ValueError, match="carries no ItD decision"):
        gate(comfy, patched, "", plain)
