"""MiniCanvas inside ComfyUI: sampling fidelity, and each erasure method measured through its nodes.

**Methods through the nodes** (``--method NAME --erase style[:NAME]|object[:NAME]``): for each erasure, an
API-format prompt graph is built -- MiniCanvas Checkpoint -> the method's nodes (:data:`METHODS`) -> for every
bench prompt CLIPTextEncode / KSampler (seed 0, ddim / simple, 20 steps, cfg 7, as MiniCanvas' own sampler)
/ VAEDecode -- validated with ComfyUI's ``execution.validate_prompt`` and run by its ``PromptExecutor``, as a
queued prompt is. The MiniCanvas judges score the images and the UnlearnCanvas metrics
(``sae_core.minicanvas.metrics``) are printed in the format of ``python -m sae_core bench``; the 72 prompts
are the bench's (8 objects x 8 styles, plus the 8 unstyled prompts). ``seconds`` is the time the method's own
nodes took in the executor::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/comfy_minicanvas.py \\
        --method saeuron --erase style [--baseline] [--option gamma=-2] [--seeds 0]

A method joins by adding a function to :data:`METHODS` that inserts its nodes into the graph (see
:func:`saeuron_nodes`). Each takes its settings from the method's MiniCanvas plug-in, so the nodes run what the
bench runs:

* ``saeuron``: Load SAE -> SAeUron Concept Block (the shipped SAE and statistics of the kind);
* ``uce`` / ``rece``: RECE Edit Model on the MODEL, with the plug-in's texts (:func:`rece_inputs`): for a style
  the concept ``"<style> style"`` with the other styles' (and for ``rece`` the objects') texts preserved and 3
  RECE epochs; for an ``rece`` object every phrasing of the object's prompts, the anchor ``"an image of a"`` and
  the other objects' phrasings preserved;
* ``itd``: Load SAE (the shipped ``minicanvas/itd_text.safetensors``) -> ItD Prompt Classifier on the CLIP
  (:func:`itd_inputs`): the concept's MiniCanvas prompts as concepts (each its own calibration prompt: the
  features and threshold of the plug-in's one concept with all of them), every other MiniCanvas prompt and the
  empty prompt retained, layer 2, ``top_n`` 32, positions ``all``, strength -8 for styles and -1 for objects.
* ``amnesia``: Selective Amnesia LoRA Train on the MODEL and CLIP (:func:`amnesia_inputs`) with the plug-in's
  recipe (rank 4, lr 1e-2, no weight decay, 100 steps of 8 + 8 examples, replay onto the base model, lambda 0.03
  for styles and 0.3 for objects), the shipped Fisher (``fisher_file``) and the shipped sample bank
  (``sample_bank``): the surrogate prompts are the bank's images of the concept's partner (for a style, every
  object in the next style; for an object, the next object in every style and unstyled), each paired with the
  forget prompt it stands in for, and every prompt without the concept is replayed -- the data the plug-in takes
  from the same bank.

**Sampling fidelity** (no ``--method``): generates the 72 prompts twice, through ComfyUI's stock nodes on the
MiniCanvas Checkpoint and with MiniCanvas' own DDIM sampler, and prints the judged object and style accuracy of
each, how many prompts the two agree on, and the largest pixel difference::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/comfy_minicanvas.py \\
        [--steps 20] [--cfg 7] [--seed 0] [--sampler ddim] [--scheduler simple] [--no-clip-denoised]

ComfyUI is configured as tests/comfy does (``--cpu``, a temporary base directory) and loads the pack with
its own loader. ``judged_prompts(model, clip, vae, ...)`` takes any MODEL / CLIP; :class:`NodeBench` runs
graphs for tests (tests/comfy/test_minicanvas_erasure.py).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


class PromptResult(NamedTuple):
    """One generated image: what the prompt asked for and what the judges saw."""

    text: str
    object_idx: int
    style_idx: int
    """-1 for an unstyled prompt."""
    object_pred: int
    style_pred: int


def configure_comfyui(comfy_root: Path, base: Path) -> Any:
    """ComfyUI on ``sys.path`` with ``--cpu`` (unless ``COMFYUI_DEVICE=gpu``) and ``base`` as base directory; returns
    the pack's minicanvas module."""
    if not (comfy_root / "nodes.py").is_file():
        raise SystemExit(f"COMFYUI_PATH={comfy_root} is not a ComfyUI checkout (no nodes.py)")
    sys.path.insert(0, str(comfy_root))
    # this checkout's sae_core (not an installed copy) right after ComfyUI, whose ``nodes`` must win
    sys.path.insert(1, str(REPO_ROOT))
    import comfy.cli_args

    for sub in ("models", "output", "input", "temp", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    args = comfy.cli_args.args
    args.cpu = os.environ.get("COMFYUI_DEVICE", "cpu").strip().lower() != "gpu"  # COMFYUI_DEVICE=gpu: ComfyUI's GPU
    args.base_directory = str(base)
    args.disable_api_nodes = True
    # ComfyUI's ``utils`` package first, as main.py does: nodes.py puts comfy/ (with a utils.py) on sys.path[0]
    import utils.install_util  # noqa: F401
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(REPO_ROOT))):
        raise SystemExit("ComfyUI could not load the pack (see the log above)")
    return sys.modules[str(REPO_ROOT).replace(".", "_x_") + ".nodes.minicanvas"]


def judge(canvas: Any, specs: Sequence[Any], images: torch.Tensor) -> list[PromptResult]:
    """Judge images ``[N, 3, 32, 32]`` in [0, 1] made from ``specs`` (one image per spec)."""
    pred = canvas.judge(images)
    return [PromptResult(s.text, s.object_idx, s.style_idx, int(o), int(st))
            for s, o, st in zip(specs, pred.objects.tolist(), pred.styles.tolist())]


def judged_prompts(helpers: Any, model: Any, clip: Any, vae: Any, canvas: Any, specs: Sequence[Any], seed: int,
                   steps: int, cfg: float, sampler: str, scheduler: str) -> tuple[list[PromptResult], torch.Tensor]:
    """Each spec's prompt sampled through ComfyUI's nodes on ``model`` / ``clip`` / ``vae``, then judged."""
    with torch.inference_mode():
        images = helpers.sample_prompts(model, clip, vae, [s.text for s in specs], seed, steps, cfg, sampler,
                                        scheduler).movedim(-1, 1)
    return judge(canvas, specs, images), images


def eval_table(results: Sequence[PromptResult]) -> Any:
    """The bench's :class:`~sae_core.minicanvas.metrics.EvalTable` of judged prompts."""
    from sae_core.minicanvas.metrics import EvalTable

    cols = np.array([(r.object_idx, r.style_idx, r.object_pred, r.style_pred) for r in results]).reshape(-1, 4).T
    return EvalTable(*cols)


def accuracy(results: Sequence[PromptResult]) -> tuple[float, float]:
    """(object accuracy over every prompt, style accuracy over the styled prompts), as the bench reports them."""
    from sae_core.minicanvas.metrics import base_accuracy

    return base_accuracy(eval_table(results))


# -- prompt graphs -----------------------------------------------------------------------------------------

Ref = list
"""An API-format link to a node output: ``[node id, output slot]``."""


class Graph:
    """An API-format prompt under construction: ``{node id: {"class_type": ..., "inputs": {...}}}``."""

    def __init__(self) -> None:
        self.prompt: dict[str, dict] = {}

    def add(self, class_type: str, **inputs: Any) -> str:
        """Add a node; inputs are widget values or :data:`Ref` links. Returns the node id."""
        node = str(len(self.prompt) + 1)
        self.prompt[node] = {"class_type": class_type, "inputs": inputs}
        return node

    @staticmethod
    def out(node: str, slot: int = 0) -> Ref:
        return [node, slot]


MethodNodes = Callable[..., tuple[Ref, Ref]]
"""``insert(graph, kind, concepts, model, clip, **options) -> (model, clip)``: adds a method's nodes for erasing
``concepts`` (names of ``kind`` "style" or "object") between the MiniCanvas Checkpoint's ``model`` / ``clip``
outputs and the sampling nodes, and returns the links the sampling nodes use. ``options`` are the
``--option key=value`` pairs (the MiniCanvas plug-in's factory options of the same name)."""


def saeuron_nodes(graph: Graph, kind: str, concepts: Sequence[str], model: Ref, clip: Ref,
                  **options: Any) -> tuple[Ref, Ref]:
    """Load SAE (the shipped SAE of ``kind``) -> SAeUron Concept Block (the shipped statistics), with the
    MiniCanvas plug-in's block and default settings of ``kind`` (``gamma``, ``top_n``; ``percentile`` replaces
    ``top_n``; ``error_mode``, ``cond_only``), as ``python -m sae_core bench --method saeuron`` applies them."""
    from sae_core.minicanvas.plugins.saeuron import RECIPE

    known = {"gamma", "top_n", "percentile", "error_mode", "cond_only", "concept_params"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"saeuron: unknown option(s) {unknown}; known: {sorted(known)}")
    settings = {**(RECIPE.style if kind == "style" else RECIPE.object), **options}
    percentile = settings.get("percentile")
    sae = graph.add("CE_LoadSAE", sae_name=f"minicanvas/saeuron_{kind}.safetensors", device="cpu", dtype="float32")
    block = graph.add(
        "CE_SAeUronConceptBlock", model=model, sae=graph.out(sae), block=RECIPE.blocks[kind],
        concepts=", ".join(concepts), gamma=float(settings["gamma"]),
        selection="top_n" if percentile is None else "percentile", top_n=int(settings["top_n"]),
        percentile=99.999 if percentile is None else float(percentile),
        error_mode=str(settings.get("error_mode", "conventional")), cond_only=bool(settings.get("cond_only", False)),
        features_file=f"minicanvas/saeuron_{kind}.safetensors",
        concept_params=_concept_params_text(settings.get("concept_params")))
    return graph.out(block), clip


ITD_SAE = "minicanvas/itd_text.safetensors"
"""Load SAE's name of the ItD SAE shipped with MiniCanvas (``sae_core/minicanvas/weights/itd_text_sae.safetensors``)."""

_RECE_NODE_FIELDS = ("method", "epochs", "lambda_reg", "erase_scale", "uce_lambda", "preserve_scale", "lam")
"""RECESettings fields the RECE Edit Model node takes under the same name (besides the texts and
``uce_preserve_scale``, whose "default" is -1 on the node)."""


def _concept_params_text(params: Any) -> str:
    """The Concept Block's ``concept_params`` text of a plug-in option (text lines or a mapping)."""
    from sae_core.saeuron import format_concept_params, parse_concept_params

    return format_concept_params(parse_concept_params(params)) if params else ""


def _canvas_names() -> Any:
    from sae_core.minicanvas.data import OBJECTS, STYLES

    return SimpleNamespace(styles=list(STYLES), objects=list(OBJECTS))


def _lines(texts: Sequence[str]) -> str:
    return "\n".join(texts)


def rece_inputs(kind: str, concepts: Sequence[str], method: str = "rece", **options: Any) -> dict[str, Any]:
    """The RECE Edit Model inputs (without ``model`` / ``clip``) of the MiniCanvas plug-in's ``method`` erasure."""
    from sae_core.minicanvas.methods import validate_concepts
    from sae_core.minicanvas.plugins.rece import canvas_settings, method_options
    from sae_core.rece import RECESettings

    canvas = _canvas_names()
    concepts = validate_concepts(canvas, kind, list(concepts))
    options = method_options(canvas, kind, method, dict(options))
    options.pop("quiet", None)
    settings, _recipe = canvas_settings(canvas, kind, concepts, method, **options)
    defaults = RECESettings(concepts=("x",))
    fixed = [f for f in ("variant", "uce_tokens", "start_from_uce") if getattr(settings, f) != getattr(defaults, f)]
    if fixed:
        raise ValueError(f"{method}: option(s) {fixed} are not inputs of RECE Edit Model")
    if "" not in settings.preserve:
        raise ValueError(f"{method}: RECE Edit Model always preserves the empty prompt (preserve='none' cannot be "
                         "expressed)")
    texts = [t for t in settings.concepts + settings.preserve + (settings.anchor,) if "," in t]
    if texts:
        raise ValueError(f"{method}: texts with commas cannot be node inputs (one per line or comma-separated): "
                         f"{texts[:3]}")
    inputs = {
        "concepts": _lines(settings.concepts),
        "anchor": settings.anchor,
        "preserve": _lines([p for p in settings.preserve if p]),
        "uce_preserve_scale": -1.0 if settings.uce_preserve_scale is None else float(settings.uce_preserve_scale),
        "device": "cpu",
    }
    inputs.update({f: getattr(settings, f) for f in _RECE_NODE_FIELDS})
    return inputs


def itd_inputs(kind: str, concepts: Sequence[str], **options: Any) -> dict[str, Any]:
    """The ItD Prompt Classifier inputs (without ``clip`` / ``sae``) of the MiniCanvas plug-in's ``itd`` erasure
    with the shipped SAE."""
    from sae_core.minicanvas.methods import validate_concepts
    from sae_core.minicanvas.plugins.itd import MiniCanvasItDConfig, canvas_settings

    concepts = validate_concepts(_canvas_names(), kind, list(concepts))
    options = dict(options)
    options.pop("quiet", None)
    layer = int(options.pop("layer", MiniCanvasItDConfig().layer))
    settings = canvas_settings(kind, concepts, layer, **options)
    if settings.error_mode != "reconstruct" or settings.skip_positions != 1:
        raise ValueError("itd: error_mode and skip_positions are not inputs of ItD Prompt Classifier")
    retain = list(settings.retain_prompts)
    return {
        "concepts": _lines(settings.target_prompts),
        "retain_prompts": _lines([p for p in retain if p]),
        "layer": settings.layer,
        "scale": float(settings.scale),
        "threshold_margin": float(settings.threshold_margin),
        "top_n": int(settings.top_n),
        "templates": "{}",
        "positions": settings.positions,
        "retain_empty_prompt": "" in retain,
    }


AMNESIA_FISHER = "minicanvas/amnesia_fisher_xattn.safetensors"
"""LoRA Train's ``fisher_file`` choice of the Fisher shipped with MiniCanvas (the plug-in's, for ``xattn``)."""

AMNESIA_BANK = "minicanvas/amnesia_bank.safetensors"
"""LoRA Train's ``sample_bank`` choice of the sample bank shipped with MiniCanvas (the plug-in's)."""

_AMNESIA_NODE_FIELDS = ("lam", "gamma", "rank", "steps", "lr", "batch_size", "seed", "targets", "replay_target",
                        "weight_decay")
"""AmnesiaConfig fields that LoRA Train takes under the same name (besides the prompts and counts)."""


def _per_prompt(samples: Any, what: str) -> tuple[list[str], int]:
    """``(prompts in order of appearance, samples per prompt)`` of a sample set drawn prompt-major from a bank."""
    prompts = list(dict.fromkeys(samples.prompts))
    per = len(samples.prompts) // max(len(prompts), 1)
    if samples.prompts != [p for p in prompts for _ in range(per)]:
        raise ValueError(f"amnesia: the plug-in's {what} set is not the same number of samples of each prompt, "
                         "prompt after prompt; LoRA Train cannot express it")
    return prompts, per


def amnesia_inputs(kind: str, concepts: Sequence[str], **options: Any) -> dict[str, Any]:
    """The Selective Amnesia LoRA Train inputs (without ``model`` / ``clip``) of the MiniCanvas plug-in's ``amnesia``
    erasure: its recipe's settings, the shipped Fisher and sample bank, and the plug-in's surrogate, forget and
    replay prompts as node text (one surrogate prompt per line, its forget prompts on the same line of
    ``forget_prompts``)."""
    from sae_core.amnesia.config import AmnesiaConfig
    from sae_core.minicanvas.methods import validate_concepts
    from sae_core.minicanvas.plugins import amnesia as plugin

    concepts = validate_concepts(_canvas_names(), kind, list(concepts))
    options = dict(options)
    options.pop("quiet", None)
    recipe = plugin.kind_recipe(kind, **options)
    settings, canvas_options = recipe
    shipped = plugin.RECIPE.canvas
    if (canvas_options.bank_seeds, canvas_options.bank_steps) != (shipped.bank_seeds, shipped.bank_steps):
        raise ValueError("amnesia: bank_seeds / bank_steps other than the shipped bank's are no node inputs")
    if canvas_options.surrogate == "noise":
        raise ValueError("amnesia: the 'noise' surrogate is no LoRA Train input (its surrogates are samples)")
    defaults = AmnesiaConfig()
    fixed = [f for f in ("alpha", "grad_clip") if getattr(settings, f) != getattr(defaults, f)]
    if fixed:
        raise ValueError(f"amnesia: option(s) {fixed} are not inputs of LoRA Train")
    canvas = _amnesia_canvas()
    bank = plugin.data_bank(canvas, recipe, progress=False)
    surrogate, forget, replay = plugin.erasure_data(canvas, kind, concepts, bank, recipe)
    surrogate_prompts, per_surrogate = _per_prompt(surrogate, "surrogate")
    replay_prompts, per_replay = _per_prompt(replay, "replay")
    texts = [t for t in surrogate_prompts + replay_prompts + [f for v in forget.values() for f in v] if "," in t]
    if texts:
        raise ValueError(f"amnesia: prompts with commas cannot be node text: {texts[:3]}")
    inputs = {
        "forget_prompts": _lines([", ".join(forget[p]) for p in surrogate_prompts]),
        "surrogate_prompt": _lines(surrogate_prompts),
        "remember_prompts": _lines(replay_prompts),
        "surrogate_samples": per_surrogate,
        "replay_per_prompt": per_replay,
        # unused with a sample bank; the bank's own sampling, for the record
        "sample_steps": int(canvas.default_steps), "cfg": float(canvas.default_cfg), "sampler_name": "ddim",
        "scheduler": "simple", "width": 32, "height": 32,
        "precision": "fp32",
        "run_name": f"minicanvas_{kind}_{'_'.join(concepts)}",
        "fisher_file": AMNESIA_FISHER if settings.lam > 0 else "none",
        "sample_bank": AMNESIA_BANK,
    }
    inputs.update({f: getattr(settings, f) for f in _AMNESIA_NODE_FIELDS})
    return inputs


@functools.lru_cache(maxsize=1)
def _amnesia_canvas() -> Any:
    """The shipped MiniCanvas (no judges): the plug-in finds its bank and Fisher by the model's fingerprint."""
    from sae_core.minicanvas import MiniCanvas

    return MiniCanvas.load(judges=False)


def _rece_graph(method: str, graph: Graph, kind: str, concepts: Sequence[str], model: Ref, clip: Ref,
                **options: Any) -> tuple[Ref, Ref]:
    edit = graph.add("CE_RECEEditModel", model=model, clip=clip, **rece_inputs(kind, concepts, method, **options))
    return graph.out(edit, 0), clip


def rece_nodes(graph: Graph, kind: str, concepts: Sequence[str], model: Ref, clip: Ref,
               **options: Any) -> tuple[Ref, Ref]:
    """RECE Edit Model (method rece) with the bench's ``rece`` settings; returns ``(edited model, clip)``."""
    return _rece_graph("rece", graph, kind, concepts, model, clip, **options)


def uce_nodes(graph: Graph, kind: str, concepts: Sequence[str], model: Ref, clip: Ref,
              **options: Any) -> tuple[Ref, Ref]:
    """RECE Edit Model (method uce) with the bench's ``uce`` settings; returns ``(edited model, clip)``."""
    return _rece_graph("uce", graph, kind, concepts, model, clip, **options)


def itd_nodes(graph: Graph, kind: str, concepts: Sequence[str], model: Ref, clip: Ref,
              **options: Any) -> tuple[Ref, Ref]:
    """Load SAE (the shipped ItD SAE) -> ItD Prompt Classifier with the bench's ``itd`` settings; returns
    ``(model, classifying clip)``. The empty prompt is retained, so the negative prompt passes unchanged."""
    sae = graph.add("CE_LoadSAE", sae_name=ITD_SAE, device="cpu", dtype="float32")
    itd = graph.add("CE_ItDPromptClassifier", clip=clip, sae=graph.out(sae), **itd_inputs(kind, concepts, **options))
    return model, graph.out(itd, 0)


def amnesia_nodes(graph: Graph, kind: str, concepts: Sequence[str], model: Ref, clip: Ref,
                  **options: Any) -> tuple[Ref, Ref]:
    """Selective Amnesia LoRA Train with the bench's ``amnesia`` settings and data; returns ``(model with the LoRA,
    clip)``."""
    train = graph.add("CE_SALoRATrain", model=model, clip=clip, **amnesia_inputs(kind, concepts, **options))
    return graph.out(train, 0), clip


METHODS: dict[str, MethodNodes] = {
    "saeuron": saeuron_nodes,
    "uce": uce_nodes,
    "rece": rece_nodes,
    "itd": itd_nodes,
    "amnesia": amnesia_nodes,
}
"""Method name (as in ``python -m sae_core bench --method``) -> the function that inserts its nodes."""


KEEP_NODE = "CEBench_KeepImage"
"""Output node of the benchmark graphs (registered by :class:`NodeBench`, not part of the pack): keeps the
decoded image tensor under a key, so the judges see exactly what VAEDecode returned."""

KEPT: dict[str, torch.Tensor] = {}


class KeepImage:
    """Benchmark output node: stores ``images`` in :data:`KEPT` under ``key``."""

    CATEGORY = "benchmark"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "keep"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE", {"tooltip": "Decoded images."}),
                             "key": ("STRING", {"tooltip": "Where to keep them.", "default": ""})}}

    @classmethod
    def IS_CHANGED(cls, **_kwargs: Any) -> float:
        return float("nan")  # always runs, so every graph refills its keys

    def keep(self, images: torch.Tensor, key: str) -> dict:
        KEPT[key] = images.detach().clone()
        return {"ui": {}}


class EventLog:
    """The few PromptServer members the executor touches; records every event with the time it arrived."""

    def __init__(self) -> None:
        self.client_id: Optional[str] = None
        self.last_node_id: Optional[str] = None
        self.sockets_metadata: dict = {}
        self.events: list[tuple[float, str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.events.append((time.perf_counter(), event, data))

    def queue_updated(self) -> None:
        pass

    def node_seconds(self, nodes: Sequence[str]) -> float:
        """Seconds the executor spent in ``nodes`` (from each node's "executing" event to the next event)."""
        wanted, total = set(nodes), 0.0
        for (t, event, data), (t_next, _, _) in zip(self.events, self.events[1:]):
            if event == "executing" and isinstance(data, dict) and data.get("node") in wanted:
                total += t_next - t
        return total


class NodeBench:
    """Runs bench prompts through ComfyUI's executor on the MiniCanvas Checkpoint, optionally with a method's
    nodes inserted, and judges the images with the MiniCanvas judges.

    ComfyUI must be configured and the pack loaded (``configure_comfyui`` or tests/comfy's ``comfy`` fixture).
    One executor serves every run, so nodes whose inputs did not change (the checkpoint, the base model's
    images) come from ComfyUI's cache, as in a running ComfyUI.
    """

    def __init__(self, canvas: Any, steps: int = 20, cfg: float = 7.0, sampler: str = "ddim",
                 scheduler: str = "simple", clip_denoised: bool = True) -> None:
        import execution
        import nodes

        if "EmptyChromaRadianceLatentImage" not in nodes.NODE_CLASS_MAPPINGS:  # comfy_extras, as at server start
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        nodes.NODE_CLASS_MAPPINGS.setdefault(KEEP_NODE, KeepImage)
        self.canvas = canvas
        self.steps, self.cfg, self.sampler, self.scheduler = int(steps), float(cfg), sampler, scheduler
        self.clip_denoised = bool(clip_denoised)
        self.log = EventLog()
        self.executor = execution.PromptExecutor(self.log)
        self.runs = 0

    def graph(self, specs: Sequence[Any], seeds: Sequence[int], method: Optional[str] = None, kind: str = "",
              concepts: Sequence[str] = (), options: Optional[dict] = None) -> tuple[Graph, list[str], list[str]]:
        """``(graph, keep keys in prompt-major order, the method's node ids)`` for ``specs`` x ``seeds``."""
        g = Graph()
        ckpt = g.add("CE_MiniCanvasCheckpoint", clip_denoised=self.clip_denoised)
        model, clip, vae = g.out(ckpt, 0), g.out(ckpt, 1), g.out(ckpt, 2)
        first = len(g.prompt)
        if method is not None:
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; methods with nodes: {', '.join(METHODS)}")
            model, clip = METHODS[method](g, kind, list(concepts), model, clip, **(options or {}))
        method_nodes = list(g.prompt)[first:]
        negative = g.add("CLIPTextEncode", text="", clip=clip)
        latent = g.add("EmptyChromaRadianceLatentImage", width=32, height=32, batch_size=1)
        keys = []
        self.runs += 1
        for i, spec in enumerate(specs):
            positive = g.add("CLIPTextEncode", text=spec.text, clip=clip)
            for seed in seeds:
                sampled = g.add("KSampler", model=model, seed=int(seed), steps=self.steps, cfg=self.cfg,
                                sampler_name=self.sampler, scheduler=self.scheduler, positive=g.out(positive),
                                negative=g.out(negative), latent_image=g.out(latent), denoise=1.0)
                image = g.add("VAEDecode", samples=g.out(sampled), vae=vae)
                key = f"run{self.runs}/{i}/{seed}"
                g.add(KEEP_NODE, images=g.out(image), key=key)
                keys.append(key)
        return g, keys, method_nodes

    def execute(self, g: Graph) -> None:
        """Validate ``g`` as ComfyUI validates a queued prompt, then run it with the executor."""
        import execution

        prompt_id = f"ce-bench-{self.runs}"
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, g.prompt, None))
        if not valid:
            raise RuntimeError(f"ComfyUI rejected the graph: {error} {node_errors}")
        self.log.events.clear()
        self.executor.execute(g.prompt, prompt_id, {"client_id": "ce-bench"}, outputs)
        if not self.executor.success:
            errors = [m for m in self.executor.status_messages if m[0] == "execution_error"]
            raise RuntimeError(f"ComfyUI could not run the graph: {errors}")

    def images(self, specs: Sequence[Any], seeds: Sequence[int] = (0,), method: Optional[str] = None,
               kind: str = "", concepts: Sequence[str] = (), options: Optional[dict] = None
               ) -> tuple[torch.Tensor, list[Any], float]:
        """``(images [N, 3, 32, 32] in [0, 1], the spec of each image, seconds in the method's nodes)``."""
        g, keys, method_nodes = self.graph(specs, seeds, method, kind, concepts, options)
        self.execute(g)
        images = torch.cat([KEPT.pop(k) for k in keys]).movedim(-1, 1)
        rows = [spec for spec in specs for _ in seeds]
        return images, rows, self.log.node_seconds(method_nodes)

    def evaluate(self, specs: Sequence[Any], seeds: Sequence[int] = (0,), method: Optional[str] = None,
                 kind: str = "", concepts: Sequence[str] = (), options: Optional[dict] = None
                 ) -> tuple[Any, float]:
        """``(EvalTable of the judged images, seconds in the method's nodes)``."""
        images, rows, seconds = self.images(specs, seeds, method, kind, concepts, options)
        return eval_table(judge(self.canvas, rows, images)), seconds

    def erasure(self, method: str, kind: str, concepts: Sequence[str], specs: Sequence[Any],
                seeds: Sequence[int] = (0,), options: Optional[dict] = None) -> tuple[Any, float]:
        """``(ErasureMetrics, seconds)`` of erasing ``concepts`` with ``method``'s nodes, as the bench scores it."""
        from sae_core.minicanvas.metrics import erasure_metrics

        table, seconds = self.evaluate(specs, seeds, method, kind, concepts, options)
        return erasure_metrics(table, kind, self.concept_indices(kind, concepts)), seconds

    def concept_indices(self, kind: str, concepts: Sequence[str]) -> list[int]:
        names = list(self.canvas.styles if kind == "style" else self.canvas.objects)
        return [names.index(c) for c in concepts]


# -- command line ------------------------------------------------------------------------------------------


def run_methods(a: argparse.Namespace, canvas: Any) -> None:
    """``--method``: the bench's erasure runs through the method's nodes, printed as the bench prints them."""
    from sae_core.minicanvas import evaluation_prompts
    from sae_core.minicanvas.cli import format_metrics, parse_erase
    from sae_core.minicanvas.metrics import erasure_metrics, mean_metrics

    kind, runs = parse_erase(a.erase, canvas)
    specs = evaluation_prompts()
    bench = NodeBench(canvas, a.steps, a.cfg, a.sampler, a.scheduler, not a.no_clip_denoised)
    options = dict(a.option)
    print(f"method={a.method} erase={kind} runs={len(runs)} prompts={len(specs)} seeds={a.seeds} steps={a.steps} "
          f"cfg={a.cfg} (ComfyUI nodes, {a.sampler}/{a.scheduler})", flush=True)
    if a.baseline:
        table, _ = bench.evaluate(specs, a.seeds)
        base = [erasure_metrics(table, kind, bench.concept_indices(kind, run)) for run in runs]
        print(f"baseline {format_metrics(mean_metrics(base), 0.0)}", flush=True)
    results, times = [], []
    for run in runs:
        m, seconds = bench.erasure(a.method, kind, run, specs, a.seeds, options)
        results.append(m)
        times.append(seconds)
        print(f"{kind}:{','.join(run)} {format_metrics(m, seconds)}", flush=True)
    if len(runs) > 1:
        print(f"mean {format_metrics(mean_metrics(results), sum(times) / len(times))}", flush=True)


def run_fidelity(a: argparse.Namespace, helpers: Any, canvas: Any) -> None:
    """No ``--method``: ComfyUI's stock sampling vs MiniCanvas' own sampler on the bench prompts."""
    from sae_core.minicanvas import evaluation_prompts

    specs = evaluation_prompts()
    seed = a.seeds[0]
    with torch.inference_mode():
        model, clip, vae = helpers.load_minicanvas(clip_denoised=not a.no_clip_denoised)

    t0 = time.perf_counter()
    ours, ours_images = judged_prompts(helpers, model, clip, vae, canvas, specs, seed, a.steps, a.cfg,
                                       a.sampler, a.scheduler)
    t_comfy = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_images = canvas.sample([s.text for s in specs], seed, a.steps, a.cfg)
    t_canvas = time.perf_counter() - t0
    ref = judge(canvas, specs, ref_images)

    same = sum(r.object_pred == q.object_pred and r.style_pred == q.style_pred for r, q in zip(ours, ref))
    print(f"{len(specs)} prompts, seed {seed}, {a.steps} steps, cfg {a.cfg}; ComfyUI sampler {a.sampler} / "
          f"{a.scheduler}, clip_denoised {not a.no_clip_denoised}")
    print(f"{'sampler':<28}{'object acc':>11}{'style acc':>11}{'time s':>9}")
    for name, results, t in (("ComfyUI (stock nodes)", ours, t_comfy), ("MiniCanvas canvas.sample", ref, t_canvas)):
        obj, sty = accuracy(results)
        print(f"{name:<28}{100 * obj:>10.1f}%{100 * sty:>10.1f}%{t:>9.1f}")
    print(f"judges agree on {same}/{len(specs)} prompts; max |pixel difference| "
          f"{(ours_images - ref_images).abs().max().item():.2e} (images in [0, 1])")


def main() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # for the argument parsers; ComfyUI goes in front of it later
    from sae_core.minicanvas.cli import parse_option, parse_seeds

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default=None,
                        help=f"erase with this method's nodes ({', '.join(METHODS)}); omit to measure plain sampling")
    parser.add_argument("--erase", default=None, metavar="KIND[:NAME[,NAME..]]",
                        help="with --method: style | object | style:NAME | object:NAME, as in python -m sae_core bench")
    parser.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                        help="with --method: a setting of the method's nodes (the bench option of the same name)")
    parser.add_argument("--baseline", action="store_true", help="with --method: also score the unedited model")
    parser.add_argument("--seeds", type=parse_seeds, default=[0], help="comma-separated seeds (default 0)")
    parser.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--sampler", default="ddim", help="ComfyUI sampler name (default ddim)")
    parser.add_argument("--scheduler", default="simple", help="ComfyUI scheduler name (default simple)")
    parser.add_argument("--no-clip-denoised", action="store_true",
                        help="load the model without the per-step clamp of the predicted image")
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    if a.seed is not None:
        a.seeds = [a.seed]
    if (a.method is None) != (a.erase is None):
        parser.error("--method and --erase go together")
    if a.method is not None and a.method not in METHODS:
        parser.error(f"no nodes registered for method {a.method!r}; methods: {', '.join(METHODS)}")
    comfy_path = os.environ.get("COMFYUI_PATH", "").strip()
    if not comfy_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (and run with its venv)")
    torch.set_num_threads(a.threads)
    base = Path(tempfile.mkdtemp(prefix="ce-comfy-bench-"))
    try:
        helpers = configure_comfyui(Path(comfy_path).resolve(), base)
        import comfy.utils

        comfy.utils.PROGRESS_BAR_ENABLED = False
        from sae_core.minicanvas import MiniCanvas

        canvas = MiniCanvas.load()
        if a.method is not None:
            try:
                run_methods(a, canvas)
            except ValueError as err:
                raise SystemExit(f"error: {err}") from None
        else:
            run_fidelity(a, helpers, canvas)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
