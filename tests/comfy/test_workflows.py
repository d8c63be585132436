"""Every workflow in workflows/ matches the node definitions ComfyUI loads (core, comfy_extras and this pack).

A UI-format workflow stores widget values by position (``widgets_values``), so a node whose inputs
changed silently shifts every value after the change. For each node of each workflow this checks:

* the node type exists;
* ``widgets_values`` has one entry per widget input in ``INPUT_TYPES`` order (required, then optional),
  plus the frontend's extra "control after generate" entry for seed inputs, and each value fits its
  widget (combo choice, number range, type);
* socket inputs exist with the right types, required sockets are linked, outputs match ``RETURN_TYPES``;
* links agree with both ends.

The MiniCanvas templates need no model file, so they are also converted to the API format and run through
ComfyUI's own validation (``execution.validate_prompt``) and executor (``execution.PromptExecutor``), and the
erasure ones must erase (MiniCanvas' style judge); so is the ItD text-SAE template, on a random-weight SD1.5
checkpoint (``conftest.random_sd15_checkpoint``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

# one thread, as the other tests/comfy modules: the Selective Amnesia template trains a LoRA, which took ten times
# longer with two threads on a busy two-core machine than with one
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json")) + sorted((REPO_ROOT / "workflows").glob("sdxl/*.json"))

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
"""Input types the frontend shows as widgets (a list of strings is a combo too)."""

SEED_NAMES = ("seed", "noise_seed")
"""INT inputs that get a control widget unless they say ``control_after_generate: False`` (frontend rule)."""

CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")

MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")
"""Combo values naming model files: their choices depend on what is installed, so membership is not checked."""


def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ holds no .json workflow"


@pytest.fixture(scope="module")
def node_classes(comfy) -> dict:
    """Core nodes, every comfy_extras node that imports here, and the pack's nodes."""
    asyncio.run(comfy.nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return dict(comfy.nodes.NODE_CLASS_MAPPINGS)


def _is_widget(entry) -> bool:
    io_type = entry[0]
    opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(io_type, (list, tuple)) or io_type in WIDGET_TYPES


def _has_control(name: str, entry) -> bool:
    opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if entry[0] != "INT":
        return False
    flag = opts.get("control_after_generate")
    return bool(flag) if flag is not None else name in SEED_NAMES


def check_widgets(node: dict, spec: dict) -> list[str]:
    """Problems with one node's ``widgets_values`` (empty when it matches ``spec``)."""
    entries = [(name, entry) for section in ("required", "optional") for name, entry in (spec.get(section) or {}).items()]
    widgets = [(name, entry) for name, entry in entries if _is_widget(entry)]
    expected = len(widgets) + sum(_has_control(name, entry) for name, entry in widgets)
    values = list(node.get("widgets_values") or [])
    label = f"node {node['id']} ({node['type']})"
    if len(values) != expected:
        names = [n + (" (+control)" if _has_control(n, e) else "") for n, e in widgets]
        return [f"{label}: {len(values)} widget values for {expected} widgets {names}: {values}"]
    problems = []
    it = iter(values)
    for name, entry in widgets:
        v = next(it)
        io_type, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
        where = f"{label}.{name} = {v!r}"
        if isinstance(io_type, (list, tuple)) or io_type == "COMBO":
            choices = list(io_type) if isinstance(io_type, (list, tuple)) else list(opts.get("options", []))
            if choices and v not in choices and not str(v).endswith(MODEL_FILE_SUFFIXES):
                problems.append(f"{where}: not one of {choices[:12]}")
        elif io_type == "INT":
            if isinstance(v, bool) or not isinstance(v, int):
                problems.append(f"{where}: not an int")
            elif not opts.get("min", v) <= v <= opts.get("max", v):
                problems.append(f"{where}: outside [{opts.get('min')}, {opts.get('max')}]")
        elif io_type == "FLOAT":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                problems.append(f"{where}: not a number")
            elif not opts.get("min", v) <= v <= opts.get("max", v):
                problems.append(f"{where}: outside [{opts.get('min')}, {opts.get('max')}]")
        elif io_type == "BOOLEAN" and not isinstance(v, bool):
            problems.append(f"{where}: not a boolean")
        elif io_type == "STRING" and not isinstance(v, str):
            problems.append(f"{where}: not a string")
        if _has_control(name, entry):
            c = next(it)
            if c not in CONTROL_VALUES:
                problems.append(f"{label}.{name}: control value {c!r} is not one of {CONTROL_VALUES}")
    return problems


def check_workflow(wf: dict, classes: dict) -> list[str]:
    """Every problem of a UI-format workflow against ``classes`` (node id -> class)."""
    problems: list[str] = []
    nodes = wf.get("nodes", [])
    by_id = {n["id"]: n for n in nodes}
    if len(by_id) != len(nodes):
        problems.append("duplicate node ids")
    if nodes and wf.get("last_node_id", 0) < max(by_id):
        problems.append(f"last_node_id {wf.get('last_node_id')} < largest node id {max(by_id)}")
    links = {link[0]: link for link in wf.get("links", [])}
    if links and wf.get("last_link_id", 0) < max(links):
        problems.append(f"last_link_id {wf.get('last_link_id')} < largest link id {max(links)}")

    for n in nodes:
        label = f"node {n['id']} ({n['type']})"
        cls = classes.get(n["type"])
        if cls is None:
            problems.append(f"{label}: unknown node type")
            continue
        spec = cls.INPUT_TYPES()
        problems += check_widgets(n, spec)
        required = spec.get("required") or {}
        sockets = {name: entry for section in ("required", "optional")
                   for name, entry in (spec.get(section) or {}).items() if not _is_widget(entry)}
        given = {i["name"]: i for i in n.get("inputs", [])}
        for name, inp in given.items():
            if "widget" in inp:  # a widget with a socket: its value stays in widgets_values
                continue
            if name not in sockets:
                problems.append(f"{label}: input '{name}' is not a socket of the node")
            elif inp.get("type") != sockets[name][0] and sockets[name][0] != "*":
                problems.append(f"{label}: input '{name}' has type {inp.get('type')}, the node wants {sockets[name][0]}")
            if inp.get("link") is not None and inp["link"] not in links:
                problems.append(f"{label}: input '{name}' refers to missing link {inp['link']}")
        for name, entry in sockets.items():
            if name in required and (name not in given or given[name].get("link") is None):
                problems.append(f"{label}: required input '{name}' ({entry[0]}) is not connected")
        outs = [o.get("type") for o in n.get("outputs", [])]
        if outs != list(cls.RETURN_TYPES):
            problems.append(f"{label}: outputs {outs} != RETURN_TYPES {list(cls.RETURN_TYPES)}")

    for lid, src, sslot, dst, dslot, typ in links.values():
        if src not in by_id or dst not in by_id:
            problems.append(f"link {lid}: missing end node")
            continue
        outs, ins = by_id[src].get("outputs", []), by_id[dst].get("inputs", [])
        if sslot >= len(outs) or outs[sslot].get("type") != typ or lid not in (outs[sslot].get("links") or []):
            problems.append(f"link {lid}: source slot {src}:{sslot} does not match ({typ})")
        if dslot >= len(ins) or ins[dslot].get("type") != typ or ins[dslot].get("link") != lid:
            problems.append(f"link {lid}: target slot {dst}:{dslot} does not match ({typ})")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=[str(p.relative_to(REPO_ROOT / "workflows")) for p in WORKFLOWS])
def test_workflow_matches_node_definitions(node_classes, path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    assert wf.get("version") is not None and isinstance(wf.get("nodes"), list), f"{path.name}: not a UI-format workflow"
    problems = check_workflow(wf, node_classes)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_checker_catches_shifted_widgets(node_classes):
    """The checker itself: a dropped widget value, a bad combo value and a wrong link type are reported."""
    wf = json.loads((REPO_ROOT / "workflows" / "saeuron_concept_block.json").read_text(encoding="utf-8"))
    block = next(n for n in wf["nodes"] if n["type"] == "CE_SAeUronConceptBlock")
    assert not check_workflow(wf, node_classes)
    block["widgets_values"] = block["widgets_values"][:-1]
    assert any("widget values" in p for p in check_workflow(wf, node_classes))
    block["widgets_values"] = ["output_blocks.5.1", "Van Gogh", -1.0, "best", 1, 99.999, "conventional", False, "none",
                               "auto", ""]
    assert any("selection" in p and "not one of" in p for p in check_workflow(wf, node_classes))
    wf["links"][0][5] = "CLIP"
    assert any(p.startswith("link 1:") for p in check_workflow(wf, node_classes))


def test_saeuron_workflow_chain(node_classes):
    wf = json.loads((REPO_ROOT / "workflows" / "saeuron_concept_block.json").read_text(encoding="utf-8"))
    by_id = {n["id"]: n for n in wf["nodes"]}
    edges = {(by_id[s]["type"], by_id[d]["type"]) for _, s, _, d, _, _ in wf["links"]}
    chain = ["CheckpointLoaderSimple", "CE_SAeUronConceptBlock", "KSampler", "VAEDecode", "SaveImage"]
    assert all((a, b) in edges for a, b in zip(chain, chain[1:])), edges
    assert ("CE_LoadSAE", "CE_SAeUronConceptBlock") in edges
    assert ("CE_SAeUronConceptFeatures", "CE_SAeUronConceptBlock") in edges


def ui_to_api(wf: dict, classes: dict) -> dict:
    """The API-format prompt of a UI-format workflow of plain, active nodes (the frontend's "Export (API)").

    Widget values are taken by position (skipping the frontend's "control after generate" entries); linked
    inputs become ``[source node id, output slot]``.
    """
    links = {link[0]: link for link in wf.get("links", [])}
    prompt = {}
    for n in wf["nodes"]:
        if n.get("mode", 0) != 0:
            raise ValueError(f"node {n['id']} ({n['type']}) is muted or bypassed; not supported here")
        spec = classes[n["type"]].INPUT_TYPES()
        values = iter(n.get("widgets_values") or [])
        inputs = {}
        for section in ("required", "optional"):
            for name, entry in (spec.get(section) or {}).items():
                if _is_widget(entry):
                    inputs[name] = next(values)
                    if _has_control(name, entry):
                        next(values)
        for i in n.get("inputs", []):
            if i.get("link") is not None:
                _lid, src, slot, *_ = links[i["link"]]
                inputs[i["name"]] = [str(src), slot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


class _QuietServer:
    """The few PromptServer members the executor touches, recording the events it sends."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.sockets_metadata: dict = {}
        self.events: list = []

    def send_sync(self, event, data, sid=None) -> None:
        self.events.append((event, data))

    def queue_updated(self) -> None:
        pass


def run_workflow(comfy, node_classes, name: str) -> tuple[dict, dict]:
    """Validate and execute ``workflows/<name>`` in ComfyUI; ``(API prompt, {SaveImage id: saved image paths})``."""
    import execution

    wf = json.loads((REPO_ROOT / "workflows" / name).read_text(encoding="utf-8"))
    prompt = ui_to_api(wf, node_classes)
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(f"ce-{name}", prompt, None))
    assert valid, (error, node_errors)
    save_ids = sorted(i for i, n in prompt.items() if n["class_type"] == "SaveImage")
    assert save_ids and set(save_ids) <= set(outputs)  # other output nodes (Save Edit as LoRA, Preview Any) run too

    executor = execution.PromptExecutor(_QuietServer())
    executor.execute(prompt, f"ce-{name}", {}, outputs)
    assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
    out_dir = Path(comfy.folder_paths.get_output_directory())
    saved = {i: [out_dir / item["subfolder"] / item["filename"] for item in executor.history_result["outputs"][i]["images"]]
             for i in save_ids}
    return prompt, saved


MINICANVAS_WORKFLOWS = sorted(p.name for p in (REPO_ROOT / "workflows").glob("minicanvas_*.json"))
"""Templates on the shipped MiniCanvas model: they need no download, so each one is run."""


@pytest.mark.parametrize("name", MINICANVAS_WORKFLOWS)
def test_minicanvas_workflow_runs_in_comfyui(comfy, node_classes, name):
    """Each MiniCanvas template validates and executes in ComfyUI and saves its images (32x32 PNGs)."""
    import numpy as np
    from PIL import Image

    prompt, saved = run_workflow(comfy, node_classes, name)
    latent = next((n for n in prompt.values() if n["class_type"] == "EmptyChromaRadianceLatentImage"), None)
    for save_id, paths in saved.items():
        source = prompt[prompt[save_id]["inputs"]["images"][0]]
        if source["class_type"] == "CE_ErasureReport":  # one before/after grid: 2 columns of 4x tiles, a row each
            rows = len(source["inputs"]["concept_prompts"].splitlines()) + len(source["inputs"]["retain_prompts"].splitlines())
            rows *= len(source["inputs"]["seeds"].split(","))
            assert len(paths) == 1
            with Image.open(paths[0]) as im:
                assert im.size[1] == 14 + rows * 130 + 2 and im.size[0] > 2 * 130
            continue
        assert len(paths) == latent["inputs"]["batch_size"]
        for path in paths:
            with Image.open(path) as im:
                assert im.size == (32, 32)
                assert len(np.unique(np.asarray(im.convert("L")))) > 8, "a flat image"
    preview = (REPO_ROOT / "workflows" / name).with_suffix(".jpg")
    assert preview.is_file(), f"{name} has no preview image"
    assert preview.stat().st_size < 100_000, f"{preview.name} is over 100 KB"


def test_itd_text_sae_workflow_runs_in_comfyui(comfy, node_classes, sd15_checkpoint):
    """collect -> train -> classify -> gate -> sample, from workflows/itd_train_text_sae.json, on a random-weight SD1.5
    checkpoint (smaller settings for a CPU test); the SAE it trains is the one itd_prompt_classifier.json loads."""
    import execution

    wf = json.loads((REPO_ROOT / "workflows" / "itd_train_text_sae.json").read_text(encoding="utf-8"))
    prompt = ui_to_api(wf, node_classes)
    small = {"CE_CollectTextActivations": {"max_prompts": 48}, "EmptyLatentImage": {"width": 64, "height": 64},
             "CE_TrainSAE": {"expansion_factor": 2, "k": 16, "steps": 20, "batch_size": 256},
             "CE_ItDPromptClassifier": {"top_n": 16}, "KSampler": {"steps": 2}}
    for node in prompt.values():
        node["inputs"].update(small.get(node["class_type"], {}))
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("ce-itd-sae", prompt, None))
    assert valid, (error, node_errors)
    executor = execution.PromptExecutor(_QuietServer())
    executor.execute(prompt, "ce-itd-sae", {}, outputs)
    assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]

    results = executor.history_result["outputs"]
    ids = {n["class_type"]: i for i, n in prompt.items()}
    assert len(results[ids["SaveImage"]]["images"]) == 1
    report = results[ids["CE_ItDPromptClassifier"]]["text"][0]  # shown on the node
    assert "threshold tau" in report and "Painting in the style of Van Gogh" in report
    gate = results[ids["CE_ItDPromptGate"]]["text"][0]
    assert gate.startswith(("FLAGGED", "passed")) and "van gogh" in gate.lower()

    store = comfy.base / "output" / "sae_activations" / "itd" / "clip_l_layer8_activations"
    from sae_core.store import ActivationReader

    reader = ActivationReader(store)
    assert len(reader) == 48 * 77 and reader.d == 768
    assert reader.attrs["hookpoint"] == "transformer.text_model.encoder.layers.8"
    sae_file = comfy.base / "models" / "sae" / "itd" / "clip_l_layer8" / "sae.safetensors"
    assert sae_file.is_file()
    # the classifier template names exactly that SAE, so it validates once the SAE exists
    classifier_wf = json.loads((REPO_ROOT / "workflows" / "itd_prompt_classifier.json").read_text(encoding="utf-8"))
    comfy.folder_paths.filename_list_cache.clear()
    valid, error, _, node_errors = asyncio.run(
        execution.validate_prompt("ce-itd", ui_to_api(classifier_wf, node_classes), None))
    assert valid, (error, node_errors)


ERASURE_WORKFLOWS = {"minicanvas_saeuron.json": ("saeuron", "checkered"), "minicanvas_rece.json": ("rece", "striped"),
                     "minicanvas_itd.json": ("itd", "striped"), "minicanvas_amnesia.json": ("amnesia", "striped")}
"""MiniCanvas erasure templates: the prefix of their SaveImage nodes (``minicanvas/<prefix>_original`` and
``_erased``) and the style they erase."""


@pytest.mark.parametrize("name", sorted(ERASURE_WORKFLOWS))
def test_minicanvas_erasure_workflow_erases_the_style(comfy, node_classes, name):
    """An erasure template's erased images lose the style that its original ones show."""
    import numpy as np
    import torch
    from PIL import Image

    from sae_core.minicanvas import MiniCanvas

    prefix, style = ERASURE_WORKFLOWS[name]
    prompt, saved = run_workflow(comfy, node_classes, name)
    by_prefix = {prompt[i]["inputs"]["filename_prefix"]: paths for i, paths in saved.items()}

    def styles(paths):
        images = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0)
                              for p in paths]).movedim(-1, 1)
        return MiniCanvas.load().judge(images).styles.tolist()

    target = MiniCanvas.load().styles.index(style)
    original = styles(by_prefix[f"minicanvas/{prefix}_original"])
    erased = styles(by_prefix[f"minicanvas/{prefix}_erased"])
    assert original.count(target) == len(original), original
    assert erased.count(target) == 0, erased


SDXL_WORKFLOWS = sorted(p.name for p in (REPO_ROOT / "workflows" / "sdxl").glob("*.json"))
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".txt", ".gz")


def _names_a_file(value) -> bool:
    return isinstance(value, str) and (value.lower().endswith(FILE_SUFFIXES) or "/" in value)


@pytest.mark.parametrize("name", SDXL_WORKFLOWS)
def test_sdxl_workflow_validates_in_comfyui(node_classes, monkeypatch, name):
    """ComfyUI's own ``validate_prompt`` accepts each SDXL workflow, with the files it names (checkpoint, SAEs,
    LoRAs) taken as present: those are the only combo values added to the node's lists; every other value (samplers,
    blocks, modes) must be one the node offers."""
    import execution

    wf = json.loads((REPO_ROOT / "workflows" / "sdxl" / name).read_text(encoding="utf-8"))
    assert any(n["type"] == "CheckpointLoaderSimple" for n in wf["nodes"]), "an SDXL workflow loads a checkpoint"
    prompt = ui_to_api(wf, node_classes)
    files: dict[str, dict[str, set]] = {}
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if _names_a_file(value):
                files.setdefault(node["class_type"], {}).setdefault(key, set()).add(value)
    for class_type, wanted in files.items():
        cls = node_classes[class_type]
        original = cls.INPUT_TYPES

        def with_files(_cls, original=original, wanted=wanted):
            spec = original()
            for section in spec.values():
                for key, entry in section.items() if isinstance(section, dict) else ():
                    if key in wanted and isinstance(entry, tuple) and isinstance(entry[0], list):
                        section[key] = (entry[0] + sorted(wanted[key] - set(entry[0])), *entry[1:])
            return spec

        monkeypatch.setattr(cls, "INPUT_TYPES", classmethod(with_files))
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(f"ce-sdxl-{name}", prompt, None))
    assert valid, (error, node_errors)
    assert outputs, "the workflow has an output node"


REPORT_WORKFLOWS = {"rece_erase.json": ("CE_RECEEditModel", "erased_model"),
                    "itd_prompt_classifier.json": ("CE_ItDPromptClassifier", "erased_clip"),
                    "selective_amnesia.json": ("CE_SALoRATrain", "erased_model"),
                    "saeuron_concept_block.json": ("CE_SAeUronConceptBlock", "erased_model")}
"""SD workflows that end in an Erasure Report: the method node whose output the report compares."""


@pytest.mark.parametrize("name", sorted(REPORT_WORKFLOWS))
def test_method_workflows_end_in_an_erasure_report(name):
    wf = json.loads((REPO_ROOT / "workflows" / name).read_text(encoding="utf-8"))
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = {lid: (src, slot) for lid, src, slot, *_ in wf["links"]}

    def source(node, socket):
        link = next((i.get("link") for i in node["inputs"] if i["name"] == socket), None)
        return None if link is None else by_id[links[link][0]]["type"]

    method, socket = REPORT_WORKFLOWS[name]
    (report,) = [n for n in wf["nodes"] if n["type"] == "CE_ErasureReport"]
    assert source(report, "model") == source(report, "clip") == source(report, "vae") == "CheckpointLoaderSimple"
    assert source(report, socket) == method
    if method == "CE_RECEEditModel":  # RECE's adversarial embedding is the report's leak probe
        assert source(report, "probe") == method
    saves = [n for n in wf["nodes"] if n["type"] == "SaveImage" and source(n, "images") == "CE_ErasureReport"]
    assert saves, "the report's grid is saved"
    if method == "CE_SAeUronConceptBlock":  # and where the edit acted, from the sampler's own images
        (firing,) = [n for n in wf["nodes"] if n["type"] == "CE_SAeUronFiringMap"]
        assert source(firing, "model") == method and source(firing, "images") == "VAEDecode"
