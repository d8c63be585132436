"""Erasure Report on the MiniCanvas Checkpoint inside ComfyUI: its UA/IRA/CRA equal the bench's for the same
prompts and seeds, its grid has one row per prompt and seed and shows the erasure, and a leak probe is sampled.

The bench figure is computed through sae_core's MiniCanvas code (``MiniCanvas.evaluate`` + ``erasure_metrics``,
what ``python -m sae_core bench`` runs) on a reduced prompt set; the report gets the same prompts as text.
Erasers are pluggable (``ERASERS``): each returns the erased MODEL for the report and the erased canvas the
bench evaluates.
"""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")

from sae_core.minicanvas.canvas import spec_for_prompt  # noqa: E402
from sae_core.minicanvas.data import OBJECTS, STYLES, prompt_for  # noqa: E402
from sae_core.minicanvas.metrics import erasure_metrics  # noqa: E402

REPORT_ID = "CE_ErasureReport"
SEEDS = (0, 1)
STEPS = 20
CFG = 7.0


def prompt_set(kind: str, name: str) -> tuple[list[str], list[str]]:
    """Concept prompts (the concept on three objects / in three styles) and retain prompts (two others of the
    same kind, two unstyled): enough rows for UA, IRA and CRA."""
    if kind == "style":
        s = STYLES.index(name)
        concept = [prompt_for(o, s) for o in (0, 3, 6)]
        retain = [prompt_for(1, (s + 1) % 8), prompt_for(4, (s + 3) % 8), prompt_for(2, None), prompt_for(5, None)]
    else:
        o = OBJECTS.index(name)
        concept = [prompt_for(o, s) for s in (0, 2)] + [prompt_for(o, None)]
        retain = [prompt_for((o + 1) % 8, 1), prompt_for((o + 4) % 8, 5), prompt_for((o + 2) % 8, None)]
    return concept, retain


def bench_metrics(canvas, prompts: list[str], kind: str, name: str):
    specs = [spec_for_prompt(p) for p in prompts]
    table, images = canvas.evaluate(specs, list(SEEDS), STEPS, CFG)
    target = (STYLES if kind == "style" else OBJECTS).index(name)
    return erasure_metrics(table, kind, target), images


def rece_plugin_unet(comfy, mc, canvas, kind: str, name: str):
    """RECE through the MiniCanvas plug-in (the bench's method), its erased UNet wrapped as a ComfyUI MODEL."""
    from sae_core.minicanvas.methods import get_method

    edited = get_method("rece")(canvas, kind, [name], quiet=True)
    with torch.inference_mode():
        model = comfy.nodes_pkg.minicanvas.build_model(edited)
    return model, edited


def rece_node(comfy, mc, canvas, kind: str, name: str):
    """RECE Edit Model on the MiniCanvas Checkpoint with the plug-in's settings (the node-path benchmark's inputs);
    the bench evaluates the plug-in's erasure."""
    from sae_core.minicanvas.methods import get_method

    bench_mod = sys.modules["ce_comfy_minicanvas_bench"]  # loaded by the bench_module fixture
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CE_RECEEditModel"]()
    with torch.inference_mode():
        model, _edit = node.edit(mc[0], mc[1], **bench_mod.rece_inputs(kind, [name]))
    return model, get_method("rece")(canvas, kind, [name], quiet=True)


ERASERS = {"rece_plugin": rece_plugin_unet, "rece_node": rece_node}


KEEP_TEXT = "CEReportTest_KeepText"
KEPT_TEXT: dict[str, str] = {}


class KeepText:
    """Test output node: keeps a STRING under a key."""

    CATEGORY = "tests"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "keep"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"tooltip": "text", "forceInput": True}),
                             "key": ("STRING", {"tooltip": "key", "default": ""})}}

    @classmethod
    def IS_CHANGED(cls, **_kwargs):
        return float("nan")

    def keep(self, text, key):
        KEPT_TEXT[key] = text
        return {"ui": {}}


@pytest.mark.parametrize("kind,name", [("style", "checkered"), ("object", "square")])
def test_report_node_in_a_graph_prints_the_bench_figures_for_saeuron(comfy, canvas, bench_module, kind, name):
    """MiniCanvas Checkpoint -> Load SAE -> SAeUron Concept Block -> Erasure Report, run by ComfyUI's executor:
    the report's UA/IRA/CRA lines are the figures the plug-in's erasure gets from MiniCanvas' own sampler and
    judges (``MiniCanvas.evaluate`` + ``erasure_metrics``, what the bench runs) on the same prompts and seeds,
    printed as the bench prints them (percent, one decimal)."""
    from sae_core.minicanvas.cli import format_metrics
    from sae_core.minicanvas.methods import get_method

    bench_mod = bench_module
    bench = bench_mod.NodeBench(canvas)
    comfy.nodes.NODE_CLASS_MAPPINGS.setdefault(KEEP_TEXT, KeepText)
    concept, retain = prompt_set(kind, name)
    g = bench_mod.Graph()
    ckpt = g.add("CE_MiniCanvasCheckpoint", clip_denoised=True)
    erased, clip = bench_mod.saeuron_nodes(g, kind, [name], g.out(ckpt, 0), g.out(ckpt, 1))
    report = g.add(REPORT_ID, model=g.out(ckpt, 0), clip=g.out(ckpt, 1), erased_model=erased, vae=g.out(ckpt, 2),
                   concept_prompts="\n".join(concept), retain_prompts="\n".join(retain),
                   seeds=", ".join(map(str, SEEDS)), concept_kind=kind, concept=name, steps=STEPS, cfg=CFG,
                   sampler_name="ddim", scheduler="simple", erased_clip=clip)
    g.add(KEEP_TEXT, text=g.out(report, 1), key=f"{kind}:{name}")
    g.add(bench_mod.KEEP_NODE, images=g.out(report, 0), key=f"grid {kind}:{name}")
    bench.execute(g)
    text = KEPT_TEXT.pop(f"{kind}:{name}")
    grid = bench_mod.KEPT.pop(f"grid {kind}:{name}")
    assert grid.shape[1] == 14 + len(concept + retain) * len(SEEDS) * 130 + 2

    erased_canvas = get_method("saeuron")(canvas, kind, [name])
    bench_before, _ = bench_metrics(canvas, concept + retain, kind, name)
    bench_after, _ = bench_metrics(erased_canvas, concept + retain, kind, name)
    print(f"saeuron {kind}:{name} bench before {format_metrics(bench_before, 0)} after {format_metrics(bench_after, 0)}")
    print(text)
    lines = {line.split()[0]: line.split()[1:3] for line in text.splitlines() if line.split()[:1] in (["UA"], ["IRA"], ["CRA"])}
    for k, label in enumerate(("UA", "IRA", "CRA")):
        assert lines[label] == [f"{100 * bench_before[k]:.1f}", f"{100 * bench_after[k]:.1f}"], (label, text)
    assert bench_after.ua > bench_before.ua


def run_report(comfy, mc, model, kind, name, concept, retain, probe=None):
    node = comfy.nodes.NODE_CLASS_MAPPINGS[REPORT_ID]()
    out = node.report(mc[0], mc[1], model, mc[2], "\n".join(concept), "\n".join(retain),
                      ", ".join(map(str, SEEDS)), kind, name, STEPS, CFG, "ddim", "simple", probe=probe)
    return out


@pytest.mark.parametrize("eraser", sorted(ERASERS))
@pytest.mark.parametrize("kind,name", [("style", "checkered"), ("object", "star")])
def test_report_scores_equal_the_bench(comfy, mc, canvas, bench_module, eraser, kind, name):
    concept, retain = prompt_set(kind, name)
    erased_model, erased_canvas = ERASERS[eraser](comfy, mc, canvas, kind, name)
    report = comfy.nodes_pkg.report.run_report(mc[0], mc[1], erased_model, mc[2], concept, retain, list(SEEDS),
                                               kind, name, STEPS, CFG, "ddim", "simple")
    bench_before, _ = bench_metrics(canvas, concept + retain, kind, name)
    bench_after, bench_images = bench_metrics(erased_canvas, concept + retain, kind, name)
    print(f"{eraser} {kind}:{name} report before {report.scores['before']} after {report.scores['after']}; "
          f"bench before {bench_before} after {bench_after}")
    assert tuple(report.scores["before"]) == pytest.approx(tuple(bench_before), abs=1e-12)
    assert tuple(report.scores["after"]) == pytest.approx(tuple(bench_after), abs=1e-12)
    assert report.scores["after"].ua > report.scores["before"].ua + 0.5, "the erasure did not show in UA"
    # same images as the canvas sampler (prompt-major, seed-minor in both)
    assert (report.after.movedim(-1, 1) - bench_images).abs().max() < 2e-3

    # grid: one row per prompt and seed, two columns of 32 px tiles at 4x, labels on top and left
    rows = len(concept + retain) * len(SEEDS)
    grid = report.grid
    assert grid.shape[0] == 1 and grid.shape[-1] == 3
    assert grid.shape[1] == 14 + rows * (128 + 2) + 2
    assert grid.shape[2] > 2 * (128 + 2) + 2 + 100  # the tiles and a label column
    n_concept = len(concept) * len(SEEDS)
    diff = (report.before - report.after).abs().flatten(1).mean(1)
    assert diff[:n_concept].mean() > 2 * diff[n_concept:].mean(), diff
    # the grid's tiles are the images: the original's first tile sits at the top-left of the tile area
    left = grid.shape[2] - 2 * (128 + 2) - 2
    tile = grid[0, 14 + 2:14 + 2 + 128:4, left + 2:left + 2 + 128:4]
    assert (tile - report.before[0]).abs().max() < 1 / 255 + 1e-6


def test_report_node_returns_grid_text_and_ui(comfy, mc, canvas):
    concept, retain = prompt_set("style", "checkered")
    erased_model, _ = rece_plugin_unet(comfy, mc, canvas, "style", "checkered")
    out = run_report(comfy, mc, erased_model, "style", "checkered", concept[:1], retain[:1])
    grid, text = out["result"]
    assert out["ui"]["text"] == [text]
    assert grid.shape == (1, 14 + 2 * len(SEEDS) * 130 + 2, grid.shape[2], 3)
    assert "UA" in text and "IRA" in text and "CRA" in text and concept[0] in text
    with pytest.raises(ValueError, match="not a MiniCanvas style"):
        run_report(comfy, mc, erased_model, "style", "van gogh", concept[:1], [])


def test_probe_rows_are_sampled_and_counted(comfy, mc, canvas):
    """A probe conditioning (here the concept's own prompt, encoded) adds one row per seed on both models."""
    concept, _ = prompt_set("style", "checkered")
    erased_model, _ = rece_plugin_unet(comfy, mc, canvas, "style", "checkered")
    with torch.inference_mode():
        (probe,) = comfy.nodes.CLIPTextEncode().encode(mc[1], concept[0])
    report = comfy.nodes_pkg.report.run_report(mc[0], mc[1], erased_model, mc[2], concept[:1], [], list(SEEDS),
                                               "style", "checkered", STEPS, CFG, "ddim", "simple", probe=probe)
    assert [r.group for r in report.rows] == ["concept"] * len(SEEDS) + ["probe"] * len(SEEDS)
    # the probe is the concept prompt's conditioning: same images as the concept rows, on both models
    n = len(SEEDS)
    assert torch.equal(report.before[:n], report.before[n:])
    assert torch.equal(report.after[:n], report.after[n:])
    assert report.scores["probe"]["images"] == n
    assert 0.0 <= report.scores["probe"]["erased"] <= report.scores["probe"]["original"]


def test_rece_node_outputs_leak_probe_concept_conditioning_and_layer_table(comfy, tiny):
    """RECE Edit Model's appended outputs: the leak probe (RECE's c' of the first concept against the edited
    weights, in CONDITIONING form), the concept's own conditioning (= CLIP Text Encode), and a per-layer table."""
    from sae_core.rece import leak_probe

    model, clip = tiny
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CE_RECEEditModel"]()
    assert node.RETURN_TYPES == ("MODEL", "CE_EDIT", "CONDITIONING", "CONDITIONING", "IMAGE")  # appended: links keep indices
    with torch.inference_mode():
        out = getattr(node, node.FUNCTION)(model, clip, "a cat, a dog", "", "a house", "rece", 1, 1e-3, device="cpu")
        patched, edit, probe, concept, _chart = out["result"]
        (encoded,) = comfy.nodes.CLIPTextEncode().encode(clip, "a cat")
    assert torch.equal(concept[0][0], encoded[0][0])
    assert len(probe) == 1 and probe[0][0].shape == (1, 77, 32) and "pooled_output" in probe[0][1]
    # the probe is leak_probe of the first concept's first chunk against the model's weights + the edit
    weights = {k: v.float() for k, v in model.model.state_dict().items() if k in edit.deltas}
    expected = leak_probe(weights, edit.deltas, encoded[0][0][:, :77], 1e-3)
    torch.testing.assert_close(probe[0][0].double(), expected.to(probe[0][0].device), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(probe[0][0], encoded[0][0])
    # the table: a header, a column line and one row per cross-attention layer with its to_k / to_v change
    (table,) = out["ui"]["text"]
    lines = table.splitlines()
    assert len(lines) == 2 + len(edit.deltas) // 2 and "to_k" in lines[1]
    first = lines[2].split()
    key = f"diffusion_model.{first[0]}.to_k.weight"
    assert key in edit.deltas
    assert float(first[1]) == pytest.approx(float(edit.deltas[key].norm() / weights[key].norm()), rel=1e-3)


def plugin_leak_probe(comfy, mc, canvas, edited):
    """The leak probe of a plug-in RECE erasure, built as RECE Edit Model builds it: the first concept text's
    conditioning from the MiniCanvas CLIP with its token rows replaced by ``leak_probe`` against the edit."""
    from sae_core.minicanvas.plugins.rece import canvas_projection_weights
    from sae_core.rece import leak_probe

    rep = edited.rece_report
    weights = {k: w.detach().float() for k, w in canvas_projection_weights(canvas.unet).items()}
    after = canvas_projection_weights(edited.unet)
    deltas = {k: after[k].detach().float() - w for k, w in weights.items()}
    with torch.inference_mode():
        (cond,) = comfy.nodes.CLIPTextEncode().encode(mc[1], rep.concept_texts[0])
    rows = leak_probe(weights, deltas, cond[0][0], rep.settings.lambda_reg).float()
    return [[rows, dict(cond[0][1])]], rep.concept_texts[0]


LEAK_SEEDS = [0, 1, 2, 3, 4, 5, 6, 7]


def test_rece_leak_probe_brings_the_erased_style_back(comfy, mc, canvas):
    """RECE erases 'striped' (its prompts lose the style); sampling the erased model with the leak probe brings
    the style back in more images than the concept's own prompt does: UA's complement rises."""
    erased_model, edited = rece_plugin_unet(comfy, mc, canvas, "style", "striped")
    probe, text = plugin_leak_probe(comfy, mc, canvas, edited)
    report = comfy.nodes_pkg.report.run_report(mc[0], mc[1], erased_model, mc[2], [text], [], LEAK_SEEDS, "style",
                                               "striped", STEPS, CFG, "ddim", "simple", probe=probe)
    n = len(LEAK_SEEDS)
    target = STYLES.index("striped")
    kept = int((canvas.judge(report.after[:n].movedim(-1, 1)).styles == target).sum())
    leaked = round(report.scores["probe"]["erased"] * n)
    print(f"leak probe of RECE -striped: concept text {text!r} judged striped in {kept}/{n} erased images, "
          f"probe in {leaked}/{n} (original model: text {int((canvas.judge(report.before[:n].movedim(-1, 1)).styles == target).sum())}/{n}, "
          f"probe {round(report.scores['probe']['original'] * n)}/{n})")
    assert leaked >= kept + 3
    assert "leak probe: striped judged in" in report.text


@pytest.mark.parametrize("kind,name", [("style", "striped"), ("object", "star")])
def test_rece_node_leak_probe_on_minicanvas(comfy, mc, canvas, bench_module, kind, name):
    """RECE Edit Model on MiniCanvas (the bench's settings) -> its leak_probe output -> Erasure Report's probe: the
    probe is judged to show the erased concept in more of the erased model's images than the concept's own text."""
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CE_RECEEditModel"]()
    inputs = bench_module.rece_inputs(kind, [name])
    with torch.inference_mode():
        out = getattr(node, node.FUNCTION)(mc[0], mc[1], **inputs)
    erased, edit, probe, _concept, _chart = out["result"]
    text = edit.metadata["concepts"][0]
    report = comfy.nodes_pkg.report.run_report(mc[0], mc[1], erased, mc[2], [text], [], LEAK_SEEDS, kind, name,
                                               STEPS, CFG, "ddim", "simple", probe=probe)
    n = len(LEAK_SEEDS)
    target = (STYLES if kind == "style" else OBJECTS).index(name)
    judged = canvas.judge(report.after[:n].movedim(-1, 1))
    kept = int(((judged.styles if kind == "style" else judged.objects) == target).sum())
    leaked = round(report.scores["probe"]["erased"] * n)
    print(f"RECE Edit Model -{name}: text {text!r} judged {name} in {kept}/{n} erased images, leak probe in {leaked}/{n}")
    assert leaked >= kept + 2
