"""ItD Prompt Classifier in a real ComfyUI, on small CLIP-structured encoders built with ComfyUI's own classes.

The text encoders are ComfyUI's ``SD1ClipModel`` / ``SDXLClipModel`` with small configs (64 wide, 4 layers),
random weights and the shipped SD1 tokenizer; SD2.x (``SD2ClipModel``, clip_h), SDXL (clip_l and clip_g) and the
SDXL refiner (clip_g) come from ``tiny_models``. The token embeddings are drawn larger than the other weights so
that, as in a trained CLIP, token identity is visible in the residual stream. The SAE is built from that
encoder's own residuals at the hooked layer, read through the normal ComfyUI encode path: one latent per token
that occurs in a small prompt set (direction = the token's mean centred residual, firing threshold = half its
mean activation), k = 1, plus latents that never fire; one such SAE per encoder (``word_sae(clip, encoder=...)``). It is a valid TopK SAE with one feature per word, so the
node's interpretation, calibration and gating can be checked exactly without training.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import tiny_models
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


def _config(width: int = WIDTH, layers: int = LAYERS, **extra) -> dict:
    return {"hidden_size": width, "num_hidden_layers": layers, "intermediate_size": 2 * width,
            "num_attention_heads": 2, **extra}


def _clip(tokenizer, model, options: dict, seed: int = 1):
    import comfy.sd
    import comfy.supported_models_base

    with torch.inference_mode():
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, model), model_options=options)
        tiny_models.init_random(clip.cond_stage_model.named_parameters(), seed)
    return clip


def sd1_clip():
    import comfy.sd1_clip

    return _clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, {"clip_l_model_config": _config()})


def sdxl_clip():
    import comfy.sdxl_clip

    return _clip(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel,
                 {"clip_l_model_config": _config(),
                  "clip_g_model_config": _config(32, 3, projection_dim=32)})


def layers_of(clip, encoder: str = "clip_l"):
    """The encoder layers of ``encoder`` (``clip_l``, ``clip_g``, ``clip_h``) of a ComfyUI CLIP."""
    return getattr(clip.cond_stage_model, encoder).transformer.text_model.encoder.layers


@torch.no_grad()
def word_sae(clip, layer: int = LAYER, hookpoint: str | None = "default", extra: int = 8,
             encoder: str = "clip_l") -> SparseAutoencoder:
    """A k=1 TopK SAE with one latent per token of VOCAB_PROMPTS (padding included), read at ``encoder``'s
    ``layer`` via the encode path."""
    module = layers_of(clip, encoder)[layer]
    width = int(module.layer_norm1.normalized_shape[0])
    rows, ids = [], []
    handle = module.register_forward_hook(lambda _m, _a, out: rows.append(out.detach().clone()))
    try:
        with torch.inference_mode():
            for prompt in VOCAB_PROMPTS:
                tokens = clip.tokenize(prompt)
                clip.encode_from_tokens(tokens)
                ids.append(torch.tensor([t[0] for t in tokens[encoder.split("_")[1]][0]]))
    finally:
        handle.remove()
    h = torch.cat(rows).reshape(-1, width).float()
    flat = torch.cat(ids)
    mu = h.mean(0)
    tokens = flat.unique().tolist()
    n = len(tokens) + extra
    dirs = torch.randn(n, width, generator=torch.Generator().manual_seed(5))
    bias = torch.full((n,), -1e3)  # latents without a token never fire
    for j, tok in enumerate(tokens):
        centred = h[flat == tok] - mu
        d = centred.mean(0)
        dirs[j] = d / d.norm()
        bias[j] = -0.5 * float((centred @ dirs[j]).mean())
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    hook = f"text_model.encoder.layers.{layer}" if hookpoint == "default" else hookpoint
    sae = SparseAutoencoder(SaeConfig(d_in=width, num_latents=n, k=1, hookpoint=hook))
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
    return out["result"][:2]  # clip, report (the calibration plot: test_calibration_plot_draws_the_reports_scores)


def encode(clip, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return cond.clone(), pooled.clone()


def the_patch(comfy, clip, layer: int = LAYER, encoder: str = "clip_l"):
    itd = comfy.nodes_pkg.itd
    key = itd.layer_key(layer) if encoder == "clip_l" else f"{encoder}.transformer.text_model.encoder.layers.{layer}.forward"
    patch = clip.patcher.object_patches[key]
    assert isinstance(patch, itd.ItDClipPatch) and patch.encoder_name == encoder
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


def test_report_pairs_each_retain_prompt_with_its_own_score(comfy, tiny):
    """Calibration scores each retain prompt once, without the concept prompts; the report and the plot used to pair
    the raw list (a repeated line, a concept prompt listed as retain) with those scores, shifting every later one."""
    clip, sae = tiny
    # two phrasings of each line: 'a photo of house' comes from both lines, and both phrasings of 'cat' are concept
    # prompts
    patched, report = run_node(comfy, clip, sae, retain="house\na photo of house\ncat", templates="{}\na photo of {}")
    patch = the_patch(comfy, patched)
    listed = report_scores(report)
    kept = ["house", "a photo of house", "a photo of a photo of house"]
    assert len(patch.concepts.retain_scores) == len(kept)
    assert sum(line.endswith("  a photo of house") for line in report.splitlines()) == 1
    for prompt in kept:
        encode(patched, prompt)
        score = float(patch.last.scores[0])
        assert abs(listed[prompt][0] - score) <= 1e-5 * max(1.0, abs(score)), prompt
    assert "of 3 retain prompts" in report or "all 3 retain prompts" in report


def test_calibration_plot_draws_the_reports_scores(comfy, tiny):
    """The IMAGE output appended after clip and report (saved workflows link outputs by index): the calibration's
    scores as dots, tau as a line just left of the smallest concept score (tau = 0.99 x it), every retain prompt
    left of it; with a margin that puts tau under the retain scores, exactly those are highlighted."""
    from plot_pixels import as_array, dots, threshold_column

    from sae_core.plots import CONCEPT_COLOUR, RETAIN_COLOUR, WRONG_COLOUR

    clip, sae = tiny
    node = comfy.nodes.NODE_CLASS_MAPPINGS[NODE_ID]()
    assert node.RETURN_TYPES == ("CLIP", "STRING", "IMAGE") and node.RETURN_NAMES[2] == "calibration_plot"
    assert len(node.OUTPUT_TOOLTIPS) == 3
    images = {}
    for margin in (0.99, 0.001):
        with torch.inference_mode():
            patched, report, plot = node.classify(clip, sae, CONCEPTS, RETAIN, LAYER, -8.0,
                                                  threshold_margin=margin)["result"]
        assert plot.dtype == torch.float32 and plot.shape[0] == 1 and plot.shape[2:] == (768, 3)
        assert 200 <= plot.shape[1] <= 360 and 0.0 <= float(plot.min()) <= float(plot.max()) <= 1.0
        images[margin] = (as_array(plot), report, the_patch(comfy, patched))
    img, report, patch = images[0.99]
    x_tau = threshold_column(img)[0]
    concept_x, retain_x = dots(img, CONCEPT_COLOUR), dots(img, RETAIN_COLOUR)
    assert "all 3 retain prompts stay below tau" in report and not dots(img, WRONG_COLOUR)
    assert len(concept_x) == 2 and retain_x and max(retain_x) < x_tau < min(concept_x)  # cat and dragon apart
    # these scores span less than 30x: a linear axis, on which tau lies where it does between the two concept scores
    (s1, s2), (c1, c2) = sorted(patch.concepts.target_scores.tolist()), concept_x
    assert max(s1, s2) / min(patch.concepts.retain_scores.tolist()) < 30
    assert x_tau == pytest.approx(c1 + (patch.tau - s1) / (s2 - s1) * (c2 - c1), abs=1.5)
    img, report, patch = images[0.001]
    assert "3 of 3 retain prompts reach tau" in report
    # every retain dot is red (0.054 and 0.058 overlap: one column run), none blue; the concept dots keep their colour
    assert dots(img, RETAIN_COLOUR) == [] and len(dots(img, WRONG_COLOUR)) >= 2
    assert len(dots(img, CONCEPT_COLOUR)) == 2 and threshold_column(img)[0] < min(dots(img, WRONG_COLOUR))
    assert max(dots(img, WRONG_COLOUR)) < min(dots(img, CONCEPT_COLOUR))


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
    import comfy.sdxl_clip as sdxl
    import comfy.text_encoders.sa_t5 as sa_t5

    sae = SparseAutoencoder(SaeConfig(d_in=WIDTH, num_latents=128, k=4), generator=torch.Generator().manual_seed(0))
    cases = [
        (_clip(sdxl.StableCascadeTokenizer, sdxl.StableCascadeClipModel,
               {"clip_g_model_config": _config(WIDTH, 3, projection_dim=WIDTH)}),
         r"StableCascadeClipModel with clip_g \(width 64\)"),
        (_clip(sa_t5.SAT5Tokenizer, sa_t5.SAT5Model,
               {"t5base_model_config": {"d_model": WIDTH, "d_ff": 2 * WIDTH, "d_kv": 16, "num_heads": 2,
                                        "num_layers": 2}}),
         r"SAT5Model with t5base \(width 64\)"),
    ]
    for clip, message in cases:
        with pytest.raises(ValueError, match=r"SD1\.x \(clip_l\), SD2\.x \(clip_h\), SDXL \(clip_l, clip_g\), the "
                                             r"SDXL refiner \(clip_g\) .*" + message + ", which is not supported"):
            run_node(comfy, clip, sae, layer=0)
        assert clip.patcher.object_patches == {}


def test_encoder_choice_errors_name_the_encoders(comfy, tiny):
    clip, sae = tiny
    with pytest.raises(ValueError, match=r"encoder: this SD1 CLIP has no clip_g; its text encoder is clip_l"):
        run_node(comfy, clip, sae, encoder="clip_g")
    with pytest.raises(ValueError, match=r"encoder: expected one of auto, clip_l, clip_g, clip_h, got 'clip_t5'"):
        run_node(comfy, clip, sae, encoder="clip_t5")
    sd2 = tiny_models.tiny_sd2_clip(width=48, layers=4)
    with pytest.raises(ValueError, match=r"this SD2 CLIP has no clip_l; its text encoder is clip_h"):
        run_node(comfy, sd2, sae, encoder="clip_l")
    assert clip.patcher.object_patches == {} and sd2.patcher.object_patches == {}


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
    # the report compares the checkpoint's CLIP with the ItD CLIP on the same UNet
    report = next(n for n in wf["nodes"] if n["type"] == "CE_ErasureReport")
    assert source_of(report, "erased_clip")["type"] == NODE_ID
    assert source_of(report, "clip")["type"] == source_of(report, "model")["type"] == "CheckpointLoaderSimple"
    assert source_of(report, "erased_model")["type"] == "CheckpointLoaderSimple"
    assert ("CE_ErasureReport", "SaveImage") in edges


def test_sdxl_workflows_chain_one_classifier_per_encoder():
    """workflows/sdxl: the checkpoint's CLIP -> ItD on clip_l -> ItD on clip_g -> positive prompt only; each
    classifier's SAE is the one of its encoder (the training template writes them); the gate gets the prompt text,
    since SDXL's conditioning carries no decision."""
    folder = Path(__file__).resolve().parents[2] / "workflows" / "sdxl"
    for name in ("itd_prompt_classifier.json", "itd_train_text_sae.json"):
        wf = json.loads((folder / name).read_text())
        by_id = {n["id"]: n for n in wf["nodes"]}

        def source_of(node, socket, wf=wf, by_id=by_id):
            link = next(i["link"] for i in node["inputs"] if i["name"] == socket)
            return next(by_id[src] for lid, src, *_ in wf["links"] if lid == link)

        (sampler,) = [n for n in wf["nodes"] if n["type"] == "KSampler"]
        positive, negative = source_of(sampler, "positive"), source_of(sampler, "negative")
        loader = source_of(negative, "clip")
        assert loader["type"] == "CheckpointLoaderSimple" and "xl" in loader["widgets_values"][0]
        g_node = source_of(positive, "clip")
        l_node = source_of(g_node, "clip")
        assert g_node["type"] == l_node["type"] == NODE_ID and source_of(l_node, "clip") is loader
        assert (l_node["widgets_values"][-1], g_node["widgets_values"][-1]) == ("clip_l", "clip_g")
        saes = {}
        for node, encoder in ((l_node, "clip_l"), (g_node, "clip_g")):
            src = source_of(node, "sae")
            if src["type"] == "CE_LoadSAE":
                saes[encoder] = src["widgets_values"][0].rsplit("/", 1)[0]
            else:  # Train SAE on that encoder's store
                assert src["type"] == "CE_TrainSAE"
                assert source_of(src, "dataset_path")["widgets_values"][-1] == encoder
                saes[encoder] = src["widgets_values"][8]
        assert all(encoder in sae for encoder, sae in saes.items()), saes
        if name == "itd_train_text_sae.json":
            trained = saes
            (gate_node,) = [n for n in wf["nodes"] if n["type"] == GATE_ID]
            assert source_of(gate_node, "clip") is g_node and "conditioning" not in {i["name"] for i in gate_node["inputs"]}
            assert gate_node["widgets_values"] == positive["widgets_values"]
        else:
            loaded = saes
    assert loaded == trained


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


def test_an_sae_of_another_layer_or_of_the_unet_is_refused(comfy, tiny):
    """An SAE read at a layer other than the one it was trained on, or an SAeUron SAE (a UNet block's; SD1.5's is 1280
    wide like SDXL's clip_g) of the encoder's width, used to calibrate and patch silently; the errors name the input."""
    clip, sae = tiny
    with pytest.raises(ValueError, match=r"layer: 1 is set, but the SAE was trained on layer 2 .* set layer to 2 or -1"):
        run_node(comfy, clip, sae, layer=1)
    for block in ("unet.up_blocks.1.attentions.1", "output_blocks.4.1"):
        unet_sae = word_sae(clip, hookpoint=block)
        for layer in (-1, LAYER):
            with pytest.raises(ValueError, match=rf"sae: it was trained on '{block}', a UNet block"):
                run_node(comfy, clip, unet_sae, layer=layer)
    assert clip.patcher.object_patches == {}
    patched, _ = run_node(comfy, clip, sae, layer=LAYER)  # its own layer, set explicitly
    assert the_patch(comfy, patched).layer == LAYER


def test_gate_refuses_a_conditioning_of_another_classifier(comfy, tiny):
    """A conditioning encoded by another ItD classifier's CLIP (other concepts, another threshold) used to be gated by
    that classifier's recorded decision whatever CLIP was wired; now the gate names the mismatch."""
    clip, sae = tiny
    mine, _ = run_node(comfy, clip, sae)
    other, _ = run_node(comfy, clip, sae, concepts="house", retain="a photo of a cat")
    with torch.inference_mode():
        (cond,) = comfy.nodes.CLIPTextEncode().encode(other, "house")
    with pytest.raises(ValueError, match=r"conditioning: it was encoded by the CLIP of another ItD Prompt Classifier "
                                         r"\(concepts \['house'\]\) than the one wired to clip \(concepts \['cat', 'dragon'\]\)"):
        gate(comfy, mine, "", cond)
    (flagged, _, _), _ = gate(comfy, other, "", cond)  # its own CLIP reads it
    assert flagged


# ---------------------------------------------------------------------------------------------
# SD2.x (clip_h), SDXL (clip_l and clip_g) and the SDXL refiner (clip_g)
# ---------------------------------------------------------------------------------------------

FLAGGED = ("cat", "a painting of a dragon")
FAMILY_PROMPTS = [*FLAGGED, "a photo of a boat", "house", "a cup"]


@torch.no_grad()
def itd_reference(sae, features, scale: float, hidden):
    """ItD's edit written out: the SAE code (ReLU, top k), the concept features times ``scale`` at every position
    but BOS, the full reconstruction."""
    h = hidden.float()
    pre = torch.relu((h - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    values, indices = pre.topk(sae.cfg.k, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, indices, values)
    z[:, 1:, features] *= scale
    return (z @ sae.W_dec + sae.b_dec).to(hidden.dtype)


def encode_with_layer_edit(clip, prompt: str, encoder: str, layer: int, edit):
    """``(cond, pooled)`` of the input ``clip`` (no ItD patch) with ``encoder``'s layer ``layer`` output replaced by
    ``edit(output)``: the stock encoder running the rest of its stack on an edited residual."""
    handle = layers_of(clip, encoder)[layer].register_forward_hook(lambda _m, _a, out: edit(out))
    try:
        return encode(clip, prompt)
    finally:
        handle.remove()


def assert_edited_run(clip, patch, sae, prompt: str, cond, pooled, columns: slice) -> None:
    """A flagged prompt's token states (``columns`` of the conditioning) and pooled output are those of the stock
    encoder whose layer output is replaced by the independently computed ItD edit."""
    features = patch.concepts.features
    ref_cond, ref_pooled = encode_with_layer_edit(
        clip, prompt, patch.encoder_name, patch.layer, lambda out: itd_reference(sae, features, -8.0, out))
    torch.testing.assert_close(cond[..., columns], ref_cond[..., columns], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-4, atol=1e-5)


def refiner_clip():
    """The SDXL refiner's CLIP as ComfyUI builds it: SDXL's tokenizer, ``SDXLRefinerClipModel`` (clip_g alone)."""
    import comfy.sdxl_clip as sdxl

    return tiny_models.clip_object(sdxl.SDXLTokenizer, sdxl.SDXLRefinerClipModel,
                                   {"clip_g_model_config": tiny_models.small_config(WIDTH, LAYERS, projection_dim=WIDTH)})


@pytest.mark.parametrize("family", ["SD2", "SDXLRefiner"])
def test_single_encoder_families(comfy, family):
    """SD2.x's clip_h and the SDXL refiner's clip_g: the only encoder (``auto``), penultimate layer; flagged prompts
    get token states and pooled output from the edited run, the others are bit-exact in both; the input CLIP is
    unchanged; the decision travels in the conditioning (SD1ClipModel hands it on)."""
    clip = tiny_models.tiny_sd2_clip(width=WIDTH, layers=LAYERS) if family == "SD2" else refiner_clip()
    encoder = "clip_h" if family == "SD2" else "clip_g"
    sae = word_sae(clip, encoder=encoder)
    before = {p: encode(clip, p) for p in FAMILY_PROMPTS}
    state = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    patched, report = run_node(comfy, clip, sae)
    assert f"{family} {encoder} layer {LAYER}" in report
    patch = the_patch(comfy, patched, encoder=encoder)
    for p in FAMILY_PROMPTS:
        (c0, p0), (c1, p1) = before[p], encode(patched, p)
        assert c0.shape == c1.shape == (1, 77, WIDTH) and p0.shape == p1.shape == (1, WIDTH)
        assert bool(patch.last.detected[0]) == (p in FLAGGED), p
        if p in FLAGGED:
            assert not torch.equal(c0, c1) and not torch.equal(p0, p1), p
            assert_edited_run(clip, patch, sae, p, c1, p1, slice(None))
        else:
            assert torch.equal(c0, c1) and torch.equal(p0, p1), p  # bit-exact, token states and pooled
    assert clip.patcher.object_patches == {}
    for p in FAMILY_PROMPTS:
        c0, p0 = encode(clip, p)
        assert torch.equal(c0, before[p][0]) and torch.equal(p0, before[p][1]), p
    assert all(torch.equal(v, state[k]) for k, v in clip.cond_stage_model.state_dict().items())
    for prompt in ("a painting of a dragon", "a photo of a boat"):
        (cond,) = comfy.nodes.CLIPTextEncode().encode(patched, prompt)
        (flagged, score, tau), _ = gate(comfy, patched, "", cond)
        assert flagged is (prompt in FLAGGED) is (score >= tau) and tau == pytest.approx(patch.tau)
        assert cond[0][1]["itd_classifier"]["encoder"] == encoder
    # the conditioning is read from the penultimate layer: the last one is refused
    with pytest.raises(ValueError, match=rf"{encoder} layer 3 .*comes after layer 2.*only the pooled output"):
        run_node(comfy, clip, word_sae(clip, layer=3, encoder=encoder), layer=3)


def test_sdxl_clip_g_alone_and_both_encoders(comfy):
    """SDXL: an ItD node on clip_g edits clip_g's token states and the pooled output (the ADM input) of flagged
    prompts, clip_l stays bit-exact; chained after a clip_l node, both encoders are edited, each by its own SAE and
    threshold; unflagged prompts stay bit-exact throughout; no node changes its input CLIP."""
    g_width = 48
    clip = tiny_models.tiny_sdxl_clip(clip_l=WIDTH, clip_g=g_width, layers=LAYERS)
    sae_l, sae_g = word_sae(clip, encoder="clip_l"), word_sae(clip, encoder="clip_g")
    before = {p: encode(clip, p) for p in FAMILY_PROMPTS}
    l_cols, g_cols = slice(0, WIDTH), slice(WIDTH, WIDTH + g_width)

    g_only, report = run_node(comfy, clip, sae_g, encoder="clip_g")
    assert "SDXL clip_g layer 2" in report and "pooled output: from the edited clip_g run" in report
    assert "clip_l: not edited; chain another ItD Prompt Classifier with encoder clip_l" in report
    patch_g = the_patch(comfy, g_only, encoder="clip_g")
    g_after = {}
    for p in FAMILY_PROMPTS:
        (c0, p0), (c1, p1) = before[p], encode(g_only, p)
        g_after[p] = (c1, p1)
        assert c0.shape == c1.shape == (1, 77, WIDTH + g_width) and p0.shape == p1.shape == (1, g_width)
        assert torch.equal(c0[..., l_cols], c1[..., l_cols]), p  # clip_l untouched
        assert bool(patch_g.last.detected[0]) == (p in FLAGGED), p
        if p in FLAGGED:
            assert not torch.equal(c0[..., g_cols], c1[..., g_cols]) and not torch.equal(p0, p1), p
            assert_edited_run(clip, patch_g, sae_g, p, c1, p1, g_cols)
        else:
            assert torch.equal(c0, c1) and torch.equal(p0, p1), p

    l_only, report = run_node(comfy, clip, sae_l)  # auto = clip_l, as before
    assert "clip_g and the pooled output it gives the UNet: not edited" in report
    l_after = {p: encode(l_only, p) for p in FAMILY_PROMPTS}
    l_patches = dict(l_only.patcher.object_patches)
    both, report = run_node(comfy, l_only, sae_g, encoder="clip_g")
    assert "clip_l: classified by the ItD node upstream of this one" in report
    assert l_only.patcher.object_patches == l_patches and len(both.patcher.object_patches) == 4
    for p in FAMILY_PROMPTS:
        (c0, p0), (cb, pb) = before[p], encode(both, p)
        if p in FLAGGED:
            assert torch.equal(cb[..., l_cols], l_after[p][0][..., l_cols]), p  # the clip_l node's edit
            assert torch.equal(cb[..., g_cols], g_after[p][0][..., g_cols]) and torch.equal(pb, g_after[p][1]), p
            assert not torch.equal(cb[..., l_cols], c0[..., l_cols]) and not torch.equal(pb, p0), p
        else:
            assert torch.equal(cb, c0) and torch.equal(pb, p0), p
    for p in FAMILY_PROMPTS:  # the inputs of both nodes are unchanged
        assert all(torch.equal(a, b) for a, b in zip(encode(l_only, p), l_after[p])), p
        assert all(torch.equal(a, b) for a, b in zip(encode(clip, p), before[p])), p
    assert clip.patcher.object_patches == {}

    # ItD Prompt Gate asks both classifiers; SDXL's conditioning keeps no decision
    (flagged, score, tau), shown = gate(comfy, both, "a painting of a dragon")
    assert flagged and score >= tau and "clip_l: a painting of a dragon" in shown and "clip_g: a painting" in shown
    (flagged, score, tau), shown = gate(comfy, both, "a photo of a boat")
    assert not flagged and score < tau and shown.count("keep") == 2
    (cond,) = comfy.nodes.CLIPTextEncode().encode(both, "cat")
    with pytest.raises(ValueError, match="carries no ItD decision"):
        gate(comfy, both, "", cond)
    # a second node on an encoder that is already edited says so (auto is clip_l again)
    _, report = run_node(comfy, l_only, sae_l)
    assert "clip_l: already edited by an ItD node upstream" in report and "set encoder to clip_g" in report
    # a clip_g SAE on auto (clip_l): the width error names the encoder that fits it
    with pytest.raises(ValueError, match=r"width mismatch.*d_in=48.*This CLIP's clip_g is 48 wide: set encoder to "
                                         r"clip_g"):
        run_node(comfy, clip, sae_g)


def test_sdxl_pooled_edit_reaches_the_unet(comfy):
    """Stock CLIPTextEncode + KSampler on a tiny SDXL with both encoders classified: a flagged prompt samples
    differently, also when only its pooled output (the ADM input ``y``) comes from the ItD CLIP; an unflagged prompt
    samples bit-exactly as with the original CLIP."""
    g_width = 48
    model = tiny_models.tiny_sdxl(clip_l=WIDTH, clip_g=g_width)
    clip = tiny_models.tiny_sdxl_clip(clip_l=WIDTH, clip_g=g_width, layers=LAYERS)
    patched, _ = run_node(comfy, clip, word_sae(clip, encoder="clip_l"), encoder="clip_l")
    patched, _ = run_node(comfy, patched, word_sae(clip, encoder="clip_g"), encoder="clip_g")
    n = comfy.nodes
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def sample(positive):
        with torch.inference_mode():
            (negative,) = n.CLIPTextEncode().encode(clip, "")
            (out,) = n.KSampler().sample(model, 0, 2, 5.0, "euler", "normal", positive, negative, latent)
        return out["samples"]

    with torch.inference_mode():
        (flagged,) = n.CLIPTextEncode().encode(patched, "a painting of a dragon")
        (original,) = n.CLIPTextEncode().encode(clip, "a painting of a dragon")
        (boat_itd,) = n.CLIPTextEncode().encode(patched, "a photo of a boat")
        (boat,) = n.CLIPTextEncode().encode(clip, "a photo of a boat")
    assert the_patch(comfy, patched, encoder="clip_g").last.detected.tolist() == [False]  # the boat, last encoded
    pooled_only = [[original[0][0], {**original[0][1], "pooled_output": flagged[0][1]["pooled_output"]}]]
    reference = sample(original)
    assert not torch.equal(sample(flagged), reference)
    assert not torch.equal(sample(pooled_only), reference)  # the edited pooled output alone moves the sample
    assert torch.equal(sample(boat_itd), sample(boat))
