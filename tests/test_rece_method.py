"""The ``uce`` / ``rece`` MiniCanvas plug-in on a randomly initialised MiniCanvas."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae_core.rece.closed_form import uce_solve_reference
from sae_core.minicanvas.plugins import rece as plugin
from sae_core.minicanvas.canvas import MiniCanvas
from sae_core.minicanvas.diffusion import NoiseSchedule
from sae_core.minicanvas.methods import get_method, registered_methods
from sae_core.minicanvas.text_encoder import TextEncoderConfig, build_text_encoder
from sae_core.minicanvas.tokenizer import WordTokenizer
from sae_core.minicanvas.unet import MiniUNet, UNetConfig
from sae_core.rece import uce_token_rows

torch.set_num_threads(1)


def tiny_canvas(seed: int = 0, width: int = 16) -> MiniCanvas:
    """A randomly initialised, very small MiniCanvas (no judges)."""
    torch.manual_seed(seed)
    tok = WordTokenizer.default()
    te = build_text_encoder(TextEncoderConfig(hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=2 * width), tok)
    unet = MiniUNet(UNetConfig(model_channels=8, channel_mult=(1, 2), attention_levels=(0, 1), num_heads=2,
                               context_dim=width, groups=4))
    torch.nn.init.normal_(unet.out[-1].weight, std=0.05)  # MiniUNet zero-inits its head
    canvas = MiniCanvas(unet, te, tok, NoiseSchedule(), config={"sampling": {"steps": 4, "cfg": 2.0}})
    for m in (unet, te):
        m.eval().requires_grad_(False)
    return canvas


def forward(canvas: MiniCanvas, prompts=("an image of a star in striped style", "an image of a ring")) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(len(prompts), 3, 8, 8, generator=g)
    with torch.no_grad():
        return canvas.unet(x, torch.tensor([10, 500]), canvas.encode_text(list(prompts)))


@pytest.fixture(scope="module")
def canvas() -> MiniCanvas:
    return tiny_canvas()


def test_listed_in_the_registry():
    assert {"uce", "rece"} <= set(registered_methods())
    assert get_method("rece") is plugin.rece_method and get_method("uce") is plugin.uce_method


@pytest.mark.parametrize("method,kind,concepts", [("rece", "style", ["striped"]), ("uce", "object", ["star"]),
                                                  ("rece", "object", ["star", "ring"])])
def test_edit_leaves_input_unchanged_and_touches_only_attn2_kv(canvas, method, kind, concepts):
    before_sd = {k: v.clone() for k, v in canvas.unet.state_dict().items()}
    before = forward(canvas)
    edited = get_method(method)(canvas, kind, concepts)

    # the input canvas is untouched
    assert edited.unet is not canvas.unet
    assert all(torch.equal(v, before_sd[k]) for k, v in canvas.unet.state_dict().items())
    assert torch.equal(forward(canvas), before)
    assert edited.text_encoder is canvas.text_encoder and not edited.hooks

    # only attn2 to_k/to_v changed, every one of them changed
    after_sd = edited.unet.state_dict()
    changed = {k for k, v in after_sd.items() if not torch.equal(v, before_sd[k])}
    kv = set(plugin.canvas_projection_weights(canvas.unet))
    assert kv and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in kv)
    assert changed == kv
    assert not torch.equal(forward(edited), before)

    # rank of every delta <= number of erase rows (UCE: the last-token slices; RECE: + L rows per concept and epoch)
    rep = edited.rece_report
    mask = canvas.tokenize(rep.concept_texts).attention_mask
    anchor_final = int(canvas.tokenize([rep.anchor]).attention_mask.sum()) - 2
    length = mask.shape[1]
    uce_rows = sum(length - max(int(m.sum()) - 2, anchor_final) for m in mask)
    epochs = rep.settings.rece_epochs
    bound = uce_rows + epochs * length * len(rep.concept_texts)
    for k in kv:
        delta = (after_sd[k].double() - before_sd[k].double())
        assert int(torch.linalg.matrix_rank(delta, rtol=1e-6)) <= bound
        assert rep.ranks[k] == min(bound, delta.shape[1])


def test_uce_matches_the_plain_per_matrix_solve(canvas):
    """epochs=0: every delta equals the textbook solve W_new = mat1 mat2^-1 (float64 reference)."""
    edited = plugin.uce_method(canvas, "style", ["dotted"])
    rep = edited.rece_report
    assert rep.concept_texts == ["dotted style"] and rep.anchor == ""
    assert rep.preserve_texts[0] == "" and "striped style" in rep.preserve_texts and len(rep.preserve_texts) == 8
    texts = rep.concept_texts + [rep.anchor] + rep.preserve_texts
    enc = canvas.encode_text(texts).double()
    mask = canvas.tokenize(texts).attention_mask
    erase, anchor = uce_token_rows(enc[0], mask[0], enc[1], mask[1])
    preserve = enc[2:].reshape(-1, enc.shape[-1])
    new_sd = edited.unet.state_dict()
    for k, w in plugin.canvas_projection_weights(canvas.unet).items():
        w64 = w.double()
        want = uce_solve_reference(w64, erase, anchor @ w64.T, preserve, erase_scale=1.0,
                                   preserve_scale=max(0.1, 1 / 8), lam=0.5)
        torch.testing.assert_close(new_sd[k].double(), want, rtol=1e-5, atol=1e-6)
        # the erased rows now read (nearly) like the anchor's: closer than before the edit
        assert (erase @ new_sd[k].double().T - anchor @ w64.T).norm() < (erase @ w64.T - anchor @ w64.T).norm()


def test_rece_epochs_add_to_the_uce_edit(canvas):
    uce = plugin.uce_method(canvas, "object", ["heart"])
    rece = plugin.rece_method(canvas, "object", ["heart"], epochs=2, lambda_reg=0.1)
    r1 = plugin.rece_method(canvas, "object", ["heart"], epochs=1, lambda_reg=0.1)
    kv = list(plugin.canvas_projection_weights(canvas.unet))
    sd_u, sd_r, sd_1 = uce.unet.state_dict(), rece.unet.state_dict(), r1.unet.state_dict()
    assert any(not torch.equal(sd_u[k], sd_r[k]) for k in kv)
    assert any(not torch.allclose(sd_1[k], sd_r[k]) for k in kv)
    # deterministic
    again = plugin.rece_method(canvas, "object", ["heart"], epochs=2, lambda_reg=0.1)
    assert all(torch.equal(again.unet.state_dict()[k], sd_r[k]) for k in kv)


def test_texts_and_options(canvas):
    recipe = plugin.RECERecipe(preserve="all")
    concepts, preserve = plugin.edit_texts(canvas, "object", ["star"], recipe)
    assert concepts == ["an image of a star"]
    assert "" in preserve and "an image of a ring" in preserve and "striped style" in preserve
    assert "an image of a star" not in preserve
    concepts, preserve = plugin.edit_texts(canvas, "style", ["neon"], plugin.RECERecipe(
        concept_template="{concept} style|an image in {concept} style", preserve="empty"))
    assert concepts == ["neon style", "an image in neon style"] and preserve == [""]
    with pytest.raises(ValueError, match="unknown rece option"):
        plugin.rece_method(canvas, "style", ["striped"], epoch=2)
    with pytest.raises(ValueError, match="unknown style"):
        plugin.rece_method(canvas, "style", ["baroque"])
    with pytest.raises(ValueError, match="concept_template"):
        plugin.rece_method(canvas, "style", ["striped"], concept_template="no placeholder")
    with pytest.raises(ValueError, match="preserve"):
        plugin.rece_method(canvas, "style", ["striped"], preserve="most")
    with pytest.raises(ValueError, match="epochs"):
        plugin.rece_method(canvas, "style", ["striped"], epochs=-1)
    edited = plugin.rece_method(canvas, "style", ["striped"], preserve="none", uce_tokens="all", epochs=0)
    assert edited.rece_report.preserve_texts == []


def test_rece_erases_an_object_in_every_phrasing_by_default(canvas):
    rep = plugin.rece_method(canvas, "object", ["star"], epochs=0).rece_report
    assert rep.concept_texts == ["an image of a star"] + [f"an image of a star in {s} style" for s in canvas.styles]
    assert "an image of a ring in neon style" in rep.preserve_texts
    assert not any("star" in t for t in rep.preserve_texts)
    assert rep.anchor == plugin.RECE_OBJECT_ANCHOR and plugin.rece_method(canvas, "style", ["neon"], epochs=0).rece_report.anchor == ""
    # a caller's template replaces the default; uce keeps the single unstyled phrase
    rep = plugin.rece_method(canvas, "object", ["star"], epochs=0, concept_template="an image of a {concept}",
                             anchor="").rece_report
    assert rep.concept_texts == ["an image of a star"] and rep.anchor == ""
    assert plugin.uce_method(canvas, "object", ["star"]).rece_report.concept_texts == ["an image of a star"]


class _CountsHost:
    """The node's side of the pipeline without ComfyUI: every text encoded on its own, real-token counts
    (ints, as ``nodes/clip_text.py`` counts them) instead of masks, and float32 copies of the weights."""

    def __init__(self, canvas):
        self.canvas = canvas
        self.calls = []

    def encode(self, texts):
        self.calls.append(list(texts))
        encs = [self.canvas.encode_text([t]).float()[0] for t in texts]
        counts = [int(self.canvas.tokenize([t]).attention_mask.sum()) for t in texts]
        return torch.stack(encs), counts

    def projection_weights(self):
        return {k: w.detach().clone().float() for k, w in plugin.canvas_projection_weights(self.canvas.unet).items()}


@pytest.mark.parametrize("method,kind,concepts,options", [
    ("rece", "style", ["striped"], {}),
    ("rece", "object", ["star", "ring"], {"epochs": 2, "lambda_reg": 0.1, "uce_preserve_scale": 0.3}),
    ("uce", "object", ["heart"], {"anchor": "an image of a"}),
])
def test_plugin_and_node_style_host_reach_the_same_pipeline(canvas, monkeypatch, method, kind, concepts, options):
    """The plug-in calls ``run_rece`` with the settings a node builds from the same texts and knobs, and a
    node-style host (texts one by one, token counts, weight copies) gives the same deltas to 1e-6."""
    from sae_core.rece import RECESettings, pipeline, run_rece

    seen = []
    monkeypatch.setattr(plugin, "run_rece", lambda host, settings, **kw: seen.append(settings) or run_rece(
        host, settings, **kw))
    edited = get_method(method)(canvas, kind, concepts, **options)
    rep = edited.rece_report
    (settings,) = seen
    assert settings is rep.settings and settings.method == method

    # what the node builds from its inputs: concepts, anchor, "" + preserve prompts, and the same knobs
    knobs = {f: getattr(settings, f) for f in pipeline.settings_fields()
             if f not in ("concepts", "anchor", "preserve", "method")}
    node_settings = RECESettings(concepts=rep.concept_texts, anchor=rep.anchor, preserve=[""] + rep.preserve_texts,
                                 method=method, **knobs)
    # equal settings: the node's "" + preserve list names the same texts as the plug-in's
    assert dataclasses.replace(node_settings, preserve=settings.preserve) == settings
    assert node_settings.preserve_texts == settings.preserve_texts == rep.preserve_texts

    host = _CountsHost(canvas)
    run = run_rece(host, node_settings)
    assert host.calls[0] == rep.concept_texts and host.calls[1] == [rep.anchor]
    assert run.epochs == settings.rece_epochs == (0 if method == "uce" else settings.epochs)
    before = dict(canvas.unet.state_dict())
    after = edited.unet.state_dict()
    assert set(run.result.deltas) == set(plugin.canvas_projection_weights(canvas.unet))
    for k, delta in run.result.deltas.items():
        torch.testing.assert_close(delta.double(), (after[k] - before[k]).double(), rtol=0, atol=1e-6)
        assert delta.abs().max() > 1e-4


def test_settings_are_validated_once_at_construction():
    from sae_core.rece import RECESettings

    ok = RECESettings(concepts=["a"], preserve=["", "b", "a", "b"])
    assert ok.concepts == ("a",) and ok.preserve_texts == ["", "b"]
    assert ok.resolved_uce_preserve_scale == 0.5
    assert RECESettings(("a",), uce_preserve_scale=0.0).resolved_uce_preserve_scale == 0.0
    for bad, match in [({"concepts": []}, "concept list is empty"), ({"concepts": "a"}, "list of texts"),
                       ({"method": "esd"}, "method"), ({"epochs": 1.5}, "epochs"), ({"epochs": True}, "epochs"),
                       ({"variant": "x"}, "variant"), ({"lam": -1.0}, "lam"),
                       ({"uce_preserve_scale": -0.5}, "uce_preserve_scale"),
                       ({"lambda_reg": float("inf")}, "lambda_reg"), ({"uce_tokens": "first"}, "uce_tokens"),
                       ({"method": "uce", "start_from_uce": False}, "start_from_uce")]:
        with pytest.raises(ValueError, match=match):
            RECESettings(**{"concepts": ["a"], **bad})


@pytest.mark.parametrize("texts", [["an image of a star in striped style"], ["an image of a star", "an image of a ring"]])
def test_leak_probe_is_the_next_epochs_adversarial_embedding(canvas, texts):
    """``leak_probe`` against the UCE edit is exactly the c' RECE's first epoch computes (and erases) from it;
    against the final RECE edit it is a new embedding; and the per-layer changes add up to the overall one."""
    from sae_core.rece import RECESettings, layer_changes, leak_probe, relative_change, run_rece

    host = _CountsHost(canvas)
    uce = run_rece(host, RECESettings(concepts=texts, preserve=["", "an image of a heart"], method="uce"))
    rece = run_rece(host, RECESettings(concepts=texts, preserve=["", "an image of a heart"], method="rece", epochs=1,
                                       lambda_reg=1e-3))
    weights = host.projection_weights()
    enc, _ = host.encode(texts)
    probe = leak_probe(weights, uce.result.deltas, enc, 1e-3)
    assert probe.shape == enc.shape and probe.dtype == torch.float64
    for i in range(len(texts)):
        # the deltas are float32 (the weights' dtype); RECE's own c' never left float64
        torch.testing.assert_close(probe[i], rece.result.adversarial[0][i].to(probe), rtol=1e-4, atol=2e-6)
    after = leak_probe(weights, rece.result.deltas, enc, 1e-3)
    assert (after - probe).abs().max() > 1e-3
    # no edit: the probe is the ridge-shrunk concept itself
    same = leak_probe(weights, {k: torch.zeros_like(w) for k, w in weights.items()}, enc, 1e-9)
    torch.testing.assert_close(same, enc.double(), rtol=1e-4, atol=1e-4)

    changes = layer_changes(rece.result.deltas, weights)
    assert list(changes) == list(rece.result.deltas) and all(v > 0 for v in changes.values())
    total = sum(changes[k] ** 2 * float(weights[k].double().pow(2).sum()) for k in changes)
    norm = sum(float(weights[k].double().pow(2).sum()) for k in changes)
    assert (total / norm) ** 0.5 == pytest.approx(relative_change(rece.result.deltas, weights), rel=1e-9)
