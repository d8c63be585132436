"""Concept Inversion Probe in a real ComfyUI on the MiniCanvas Checkpoint: the search lowers the erased model's
denoising loss on images of the concept, leaves both models unchanged, runs through sampling-time edits (SAeUron's
hook), and its conditioning feeds the Erasure Report's probe rows."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from test_saeuron_firing_map import call, concept_block  # noqa: E402

PROBE_ID = "CE_ConceptInversionProbe"
STYLE = "checkered"
PROMPT = "an image of a star in checkered style"
ARGS = {"samples": 2, "steps": 12, "lr": 0.05, "batch_size": 2, "seed": 0, "sample_steps": 10, "cfg": 7.0,
        "sampler_name": "ddim", "scheduler": "simple", "width": 32, "height": 32}


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def _rece_erased(comfy, canvas):
    from sae_core.minicanvas.methods import get_method

    edited = get_method("rece")(canvas, "style", [STYLE], quiet=True)
    with torch.inference_mode():
        return comfy.nodes_pkg.minicanvas.build_model(edited)


def test_probe_lowers_the_erased_models_loss_and_changes_nothing(comfy, mc, canvas):
    erased = _rece_erased(comfy, canvas)
    before_o, before_e = _weights(mc[0]), _weights(erased)
    node = comfy.nodes.NODE_CLASS_MAPPINGS[PROBE_ID]()
    out = node.probe(mc[0], mc[1], erased, PROMPT, **ARGS)
    probe, text = out["result"]
    assert out["ui"]["text"] == [text]
    with torch.inference_mode():
        (concept,) = comfy.nodes.CLIPTextEncode().encode(mc[1], PROMPT)
    assert probe[0][0].shape == concept[0][0].shape and not torch.equal(probe[0][0], concept[0][0].cpu())
    start, end = (float(v) for v in text.rsplit(":", 1)[1].replace("from the prompt's conditioning,", "").split()[:2])
    assert end < start, text
    assert all(torch.equal(v, before_o[k]) for k, v in _weights(mc[0]).items())
    assert all(torch.equal(v, before_e[k]) for k, v in _weights(erased).items())
    # the report samples the probe on both models: one probe row per seed, counted by the judges
    report = comfy.nodes_pkg.report.run_report(mc[0], mc[1], erased, mc[2], [PROMPT], [], [0, 1], "style", STYLE,
                                               10, 7.0, "ddim", "simple", probe=probe)
    assert [r.group for r in report.rows].count("probe") == 2 and report.scores["probe"]["images"] == 2


def test_probe_runs_through_the_saeuron_hook(comfy, mc, canvas):
    """SAeUron edits at sampling time: the search calls the erased model with the sampling schedule, so the
    hook (which needs the schedule to know its step) acts during the search and changes what it finds."""
    erased = concept_block(comfy, mc)
    args = {**ARGS, "steps": 3}
    hooked, _ = call(comfy, PROBE_ID, model=mc[0], clip=mc[1], erased_model=erased, concept_prompt=PROMPT,
                     **args)["result"]
    plain, _ = call(comfy, PROBE_ID, model=mc[0], clip=mc[1], erased_model=mc[0], concept_prompt=PROMPT,
                    **args)["result"]
    assert not torch.equal(hooked[0][0], plain[0][0])  # same images and draws: only the hook differs


def test_bad_inputs_are_refused(comfy, mc):
    node = comfy.nodes.NODE_CLASS_MAPPINGS[PROBE_ID]()
    with pytest.raises(ValueError, match="concept_prompt"):
        node.probe(mc[0], mc[1], mc[0], "  ", **ARGS)
    with pytest.raises(ValueError, match="lr"):
        node.probe(mc[0], mc[1], mc[0], PROMPT, **{**ARGS, "lr": float("nan")})


def test_models_and_clip_of_other_kinds_are_refused_before_sampling(comfy, mc, monkeypatch):
    """The images of one model are denoised by the other with the CLIP's conditioning: an erased model of another
    kind or a CLIP of another model used to stop deep inside the UNet (shape errors); now the error names the input
    before any image is sampled."""
    from tiny_models import tiny_sd1_clip, tiny_sd15

    probe_nodes = comfy.nodes_pkg.probe
    monkeypatch.setattr(probe_nodes, "comfy_sampler", lambda *a, **k: pytest.fail("sampled before the inputs were checked"))
    node = comfy.nodes.NODE_CLASS_MAPPINGS[PROBE_ID]()
    with torch.inference_mode():
        sd1, narrow = tiny_sd15(0, context=32), tiny_sd1_clip(width=24)
    with pytest.raises(ValueError, match=r"erased_model: it is a BaseModel model \(SD15 latents, 4 channels\), the "
                                         r"original a MiniCanvas model"):
        node.probe(mc[0], mc[1], sd1, PROMPT, **ARGS)
    with pytest.raises(ValueError, match=r"clip: its conditioning is 24 wide but model \(BaseModel\) reads 32-wide"):
        node.probe(sd1, narrow, sd1, "a cat", **{**ARGS, "width": 64, "height": 64})
