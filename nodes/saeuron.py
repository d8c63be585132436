"""SAeUron nodes: gather concept features with an SAE, and erase concepts with them at sampling time.

* **SAeUron Concept Features** samples concept prompts and other prompts and gathers SAeUron's
  per-step mean SAE codes ``M[concept, step, latent]`` (``sae_core.saeuron.gather_concept_stats``),
  saved to ``models/sae_features/<name>.safetensors``.
* **SAeUron Concept Block** returns a clone of the model that edits the block's output at sampling
  time: per step the concept's most specific latents are scaled by ``gamma * mu_c`` where they exceed
  the all-concept mean. The edit is built by the SAeUron pipeline (``sae_core.saeuron.build_concept_edit``
  from one ``ConceptBlockSettings``, the same function the MiniCanvas plug-in calls); this module only
  adapts ComfyUI to it.

The SAE tooling (Collect SAE Activations, Train SAE, Download SAE) is in :mod:`.sae_tools`; sampling and
the sampler's position in :mod:`.sampling`; block names in :mod:`.unet_blocks`; folders in :mod:`.folders`.

How the model is hooked. Every node works on a ``clone()`` of the MODEL with a DIFFUSION_MODEL
wrapper (``add_wrapper_with_key``): feature gathering records the sampler's state
(``transformer_options``: ``sigmas``, ``sample_sigmas``, ``cond_or_uncond``) and the block is hooked
only while the node samples (the hook is removed in ``finally``); the Concept Block wrapper registers
a forward hook on the block for the duration of each UNet call and removes it afterwards. This works
for every SpatialTransformer, including ``output_blocks.5.1`` which an Upsample follows. The step
index always comes from the sampler's sigma / timestep, never from counting calls. Nothing is left
on the input MODEL, and the SAE is held by the wrapper (never deep-copied with ``model_options``).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import torch

from sae_core.artefacts import decide_artefact
from sae_core.capture import get_submodule
from sae_core.prompts import parse_names, parse_prompts
from sae_core.saeuron import (
    BRANCHES,
    ERROR_MODES,
    OTHER_CONCEPT,
    SELECTION_RULES,
    SOURCES,
    ConceptBlockEdit,
    ConceptBlockSettings,
    ConceptStats,
    build_concept_edit,
    gather_concept_stats,
)
from sae_core.saeuron.firing import FiringRecord, overlay, upsample_mask
from sae_core.saeuron.pipeline import (
    check_sae,
    check_sae_fits,
    resolve_source,
)

from .common import SAE_TYPE, Progress, category, inp, node_id
from .families import model_family
from .folders import (
    FEATURES_FOLDER,
    NO_FILE,
    feature_filenames,
    features_full_path,
    features_path_for,
    forget_file_list,
    register_features_folder,
)
from .sae_tools import DEFAULT_BLOCK
from .sampling import (
    ComfyHost,
    ComfySampling,
    SamplerState,
    diffusion_model_wrapper,
    sampler_inputs,
)
from .unet_blocks import unet_of

log = logging.getLogger("concept_erasure")

FEATURES_TYPE = "SAEURON_FEATURES"
"""Socket type of SAeUron concept statistics (a ``sae_core.saeuron.ConceptStats``)."""

WRAPPER_KEY = "concept_erasure.saeuron"
"""Key of the Concept Block's DIFFUSION_MODEL wrapper on a ModelPatcher."""

SOURCE_CHOICES = ("auto",) + tuple(SOURCES)
"""``source`` input of Features and Concept Block: ``auto`` = what the SAE records, else one of SOURCES."""

SOURCE_TOOLTIP = ("What the SAE reads of the block: output (SAeUron) or diff = the block's update, output minus input "
                  "(the SDXL SAEs of sdxl-unbox). auto = what the SAE records (an SAE made by Train SAE remembers "
                  "its store; a published sdxl-unbox SAE reads updates; otherwise output).")


def source_input(source: str) -> Optional[str]:
    """The library's ``source`` of the node input: None for ``auto`` (what the SAE records)."""
    if source not in SOURCE_CHOICES:
        raise ValueError(f"source must be one of {', '.join(SOURCE_CHOICES)}, got {source!r}")
    return None if source == "auto" else source


_CONCEPT_LINE = re.compile(r"^([^:()\[\]{}]+?)\s*:\s+(.+)$")


def parse_concepts(text: str) -> dict[str, list[str]]:
    """``concept: prompt`` lines -> ``{concept: [prompts]}`` (a line without ``name: `` is its own concept).

    Blank lines and lines starting with ``#`` are skipped; a prompt weight such as ``(cat:1.2)`` is
    not mistaken for a name (a name is followed by a colon *and a space* and has no brackets). A line that
    ends with a colon (a name without its prompt) is a ValueError.
    """
    out: dict[str, list[str]] = {}
    for line in parse_prompts(text):
        if line.endswith(":"):
            raise ValueError(f"concept_prompts: the line {line!r} names no prompt; write 'concept: prompt' (a colon, "
                             "a space, then the prompt)")
        m = _CONCEPT_LINE.match(line)
        name, prompt = (m.group(1).strip(), m.group(2).strip()) if m else (line, line)
        bucket = out.setdefault(name, [])
        if prompt not in bucket:
            bucket.append(prompt)
    return out


# ---------------------------------------------------------------------------------------------
# SAeUron Concept Features
# ---------------------------------------------------------------------------------------------


class SAeUronConceptFeatures:
    """Gather SAeUron's per-step concept statistics with an SAE."""

    DESCRIPTION = (
        "Samples the prompts of each concept (and the other prompts, the contrast set) and averages the SAE's "
        "sparse code of the block output per concept and sampling step: SAeUron's feature table M[concept, step, "
        "latent]. Saved to models/sae_features/<filename>.safetensors; wire the output into SAeUron Concept Block."
    )
    CATEGORY = category("saeuron")
    RETURN_TYPES = (FEATURES_TYPE, "STRING")
    RETURN_NAMES = ("features", "features_path")
    OUTPUT_TOOLTIPS = (
        "The concept feature table (per concept and step, the mean SAE code), with the sampling schedule, block "
        "and SAE it belongs to.",
        "Path of the saved table (safetensors with a JSON description in its header).",
    )
    FUNCTION = "gather"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": inp("MODEL", "The diffusion model (not modified)."),
                "clip": inp("CLIP", "Text encoder of the same checkpoint."),
                "sae": inp(SAE_TYPE, "The SAE trained on the block's output (or update, see source)."),
                "block": inp("STRING", "SpatialTransformer block the SAE reads (SD1.x: output_blocks.4.1 for "
                                       "objects, output_blocks.5.1 for styles; SDXL: the block of the SAE, e.g. "
                                       "output_blocks.1.1 = up.0.1), or any other.", default=DEFAULT_BLOCK),
                "concept_prompts": inp("STRING", "One 'concept: prompt' per line; several lines per concept and "
                                                 "several concepts allowed (e.g. 'Van Gogh: a house in Van Gogh "
                                                 "style'). A line without 'name: ' is its own concept.",
                                       multiline=True,
                                       default="dog: a photo of a dog\ndog: a dog on the grass\n"
                                               "cat: a photo of a cat\ncat: a cat on a sofa"),
                "other_prompts": inp("STRING", "Prompts of everything else, one per line, gathered as the concept "
                                               f"'{OTHER_CONCEPT}' (the contrast that makes features specific).",
                                     multiline=True, default="a photo of a house\na landscape painting\na bowl of fruit"),
                **sampler_inputs(),
                "branch": inp(list(BRANCHES), "Guidance rows averaged: cond = the prompted half (SAeUron), both = "
                                              "both halves.", default="cond"),
                "filename": inp("STRING", "File name in models/sae_features (without .safetensors).",
                                default="saeuron/features"),
            },
            "optional": {
                "overwrite": inp("BOOLEAN", "Replace a table of that name that already exists (it stays until the "
                                            "new one is complete). Off: an existing table is kept and the node stops.",
                                 default=False),
                "source": inp(list(SOURCE_CHOICES), SOURCE_TOOLTIP, default="auto"),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def gather(self, model: Any, clip: Any, sae: Any, block: str, concept_prompts: str, other_prompts: str,
               steps: int, cfg: float, seed: int, sampler_name: str, scheduler: str, width: int, height: int,
               branch: str = "cond", filename: str = "saeuron/features", overwrite: bool = False,
               source: str = "auto", unique_id: Optional[str] = None) -> tuple[ConceptStats, str]:
        check_sae(sae)
        which = resolve_source(sae, source_input(source))
        concepts = parse_concepts(concept_prompts)
        others = parse_prompts(other_prompts)
        if OTHER_CONCEPT in concepts:
            raise ValueError(f"concept_prompts: the name '{OTHER_CONCEPT}' is reserved for other_prompts")
        if others:
            concepts[OTHER_CONCEPT] = list(dict.fromkeys(others))
        if not concepts:
            raise ValueError("concept_prompts: the concept list is empty (write 'concept: prompt' lines)")
        if len(concepts) < 2:
            raise ValueError("concept_prompts: SAeUron contrasts a concept with others; give a second concept "
                             "or some other_prompts")
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
        host = ComfyHost(model)
        ref = host.find_block(block)
        name = ref.name
        check_sae_fits(host, sae, ref)
        out_path = features_path_for(filename)
        # the table records no identity to compare: any existing file counts as another run's
        decision = decide_artefact("SAeUron Concept Features", out_path, {"file": "new"},
                                   {"file": "existing"} if out_path.exists() else None, overwrite=bool(overwrite))
        log.info("%s", decision.message)

        sampling = ComfySampling(model, clip, steps, cfg, sampler_name, scheduler, width, height, seed)
        sigmas, _ = sampling.run_schedule()
        flat = [p for ps in concepts.values() for p in ps]

        def state() -> dict[str, Any]:
            s = sampling.state
            step = min(s.step_index(), int(steps) - 1)
            return {"step_index": step, "timestep": float(s.schedule_timesteps()[step]), "cond_mask": s.cond_mask()}

        attrs = {"concept_prompts": concepts, "block": name, "steps": int(steps), "cfg": float(cfg), "source": which,
                 "seed": int(seed), "sampler": sampler_name, "scheduler": scheduler, "width": int(width),
                 "height": int(height), "branch": branch, "model_family": model_family(model), "sigmas": sigmas,
                 "origin": node_id("SAeUronConceptFeatures")}
        with Progress(len(flat) * int(steps), desc="concept features", node_id=unique_id) as bar:
            sampling.on_step = bar.update_absolute
            stats = gather_concept_stats(sampling.sample_in_order, unet_of(sampling.patcher), name, sae, concepts, int(steps),
                                         state=state, schedule_kind="timestep", cond_only=branch == "cond",
                                         batch_size=1, progress=False, attrs=attrs, which=which)
        stats.save(out_path)
        register_features_folder()
        forget_file_list(FEATURES_FOLDER)
        log.info("SAeUron Concept Features: %s at %s (%s, %d steps) -> %s", list(concepts), name, which, steps,
                 out_path)
        return (stats, str(out_path))


# ---------------------------------------------------------------------------------------------
# SAeUron Concept Block
# ---------------------------------------------------------------------------------------------


class SAeUronPatch:
    """A DIFFUSION_MODEL wrapper that applies a :class:`~sae_core.saeuron.ConceptBlockEdit` to one block.

    For the duration of each UNet call a forward hook sits on the block; the edit reads the call's
    position from a :class:`~.sampling.SamplerState` (timestep, sigma, ``cond_or_uncond``). The hook is
    removed when the call returns or raises.
    """

    def __init__(self, edit: ConceptBlockEdit, model_sampling: Any) -> None:
        self.edit = edit
        self.state = SamplerState(model_sampling)
        self.record: Optional[FiringRecord] = None
        """Where the edit acted in the most recent sampling run (SAeUron Firing Map reads it)."""

    @property
    def hook(self) -> Any:
        return self.edit.hook

    @property
    def block(self) -> str:
        return self.edit.block

    @property
    def last_step(self) -> Optional[int]:
        """Features step of the most recent call (diagnostics)."""
        return self.edit.last_step

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        module = get_submodule(executor.class_obj, self.edit.block)
        with self.state.recording(args, kwargs):
            shape: list[tuple[int, ...]] = []

            def hook(_m: Any, inputs: Any, output: Any) -> Any:
                y = output[0] if isinstance(output, tuple) else output
                shape.append(tuple(y.shape))
                return self.edit(inputs, output, self.state)

            self.edit.hook.last_fired = None
            handle = module.register_forward_hook(hook)
            try:
                out = executor(*args, **kwargs)
            finally:
                handle.remove()
            if shape:
                self._record(shape[-1])
            return out

    def _record(self, shape: tuple[int, ...]) -> None:
        """Add this call's edited tokens of the prompted rows to :attr:`record` (a new run starts it anew)."""
        run = self.state.run_step()
        if run is None or len(shape) != 4:
            return
        step, _n = run
        batch, grid = shape[0], (int(shape[2]), int(shape[3]))
        if self.record is None or self.record.grid != grid or (step == 0 and any(s > 0 for s in self.record.steps)):
            self.record = FiringRecord(grid)
        mask = self.state.cond_mask()
        cond = torch.ones(batch, dtype=torch.bool) if mask is None else mask.to("cpu", torch.bool)
        fired = self.edit.hook.last_fired
        positions = grid[0] * grid[1]
        if fired is None:  # nothing was edited in this call
            rows = torch.zeros(int(cond.sum()), positions, dtype=torch.bool)
        else:
            fired = fired.detach().to("cpu", torch.bool).reshape(-1, positions)
            rows = fired[cond] if fired.shape[0] == batch else fired  # cond-only calls report their rows alone
        if rows.shape[0] == 0:
            return
        table = self.edit.hook.table
        feat = self.edit.last_step if self.edit.last_step is not None else 0
        selected = table.indices[feat, : int(table.count[feat])].tolist()
        try:
            self.record.add(step, rows, selected)
        except ValueError:  # another batch layout within the run (e.g. a second sampler): start over
            self.record = FiringRecord(grid)
            self.record.add(step, rows, selected)


def load_features(features: Any = None, features_file: str = NO_FILE) -> ConceptStats:
    """The feature table from the socket or, when that is not wired, from ``models/sae_features``."""
    if features is not None:
        if not isinstance(features, ConceptStats):
            raise ValueError(f"features: expected SAeUron Concept Features output, got {type(features).__name__}")
        return features
    if not features_file or features_file == NO_FILE:
        raise ValueError("features: wire SAeUron Concept Features into 'features' or pick a features_file")
    path = features_full_path(features_file)
    try:
        return ConceptStats.load(path)
    except ValueError as err:
        raise ValueError(f"features_file: {err}") from err


def build_patch(model: Any, sae: Any, stats: ConceptStats, settings: ConceptBlockSettings) -> tuple[Any, SAeUronPatch]:
    """A clone of ``model`` carrying the SAeUron edit, and the wrapper (for inspection)."""
    edit = build_concept_edit(ComfyHost(model), sae, stats, settings)
    patch = SAeUronPatch(edit, model.get_model_object("model_sampling"))
    patched = model.clone()
    patched.add_wrapper_with_key(diffusion_model_wrapper(), WRAPPER_KEY, patch)
    return patched, patch


class SAeUronConceptBlock:
    """Erase concepts by editing one UNet block's output with an SAE at sampling time."""

    DESCRIPTION = (
        "Returns a copy of the model that erases concepts with SAeUron: at each sampling step the block's output "
        "is encoded by the SAE, the concept's most specific latents for that step are scaled by gamma x their "
        "concept mean wherever they exceed the all-concept mean, and the change is added back. No weights "
        "change; the input model is not modified. Needs the SAE of the block and a feature table from SAeUron "
        "Concept Features (wired or picked from models/sae_features). Works on SD1.x, SD2.x, SDXL and MiniCanvas "
        "UNets; an SAE of block updates (source diff, e.g. the SDXL SAEs of sdxl-unbox) edits the update."
    )
    CATEGORY = category("saeuron")
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model whose block output is edited during sampling.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": inp("MODEL", "The diffusion model (not modified)."),
                "sae": inp(SAE_TYPE, "The SAE trained on the block's output (or update, see source)."),
                "block": inp("STRING", "SpatialTransformer block to edit; must be the block the SAE and the "
                                       "features belong to (SD1.x: output_blocks.4.1 objects, output_blocks.5.1 "
                                       "styles; SDXL: e.g. output_blocks.1.1 = up.0.1). Empty = the block recorded "
                                       "in the features.", default=DEFAULT_BLOCK),
                "concepts": inp("STRING", "Concepts of the feature table to erase, comma-separated or one per line; "
                                          f"empty = every concept except '{OTHER_CONCEPT}'.", default=""),
                "gamma": inp("FLOAT", "Multiplier of the selected latents (x concept mean). SAeUron: -1 for styles, "
                                      "-1 to -30 for objects; more negative erases harder.", default=-1.0,
                             min=-1000.0, max=1000.0, step=0.1),
                "selection": inp(list(SELECTION_RULES), "How latents are chosen per step: top_n = the N most "
                                                        "concept-specific; percentile = SAeUron's rule.",
                                 default="top_n"),
                "top_n": inp("INT", "Latents per step with selection = top_n (SAeUron: 1-3).", default=1, min=1,
                             max=1 << 20),
                "percentile": inp("FLOAT", "Score percentile with selection = percentile (99.999 keeps 1 latent of "
                                           "20480, 99.99 keeps 3).", default=99.999, min=0.0, max=99.99999,
                                  step=0.001, round=False),
                "error_mode": inp(list(ERROR_MODES), "conventional: output = input + the change of the edited "
                                                     "latents (exact where nothing fires). reference: the published "
                                                     "code's sign, which reflects the SAE error everywhere (only to "
                                                     "reproduce published numbers).", default="conventional"),
                "cond_only": inp("BOOLEAN", "Edit only the prompted half of classifier-free guidance (SAeUron edits "
                                            "both halves).", default=False),
            },
            "optional": {
                "features": inp(FEATURES_TYPE, "Feature table from SAeUron Concept Features."),
                "features_file": inp(feature_filenames(), "Or a saved feature table in models/sae_features (used when "
                                                          "'features' is not wired).", default=NO_FILE),
                "source": inp(list(SOURCE_CHOICES), SOURCE_TOOLTIP, default="auto"),
                "concept_params": inp("STRING", "Per-concept gamma and selection, one 'concept: gamma, rule' line "
                                                "each, e.g. 'dog: -15, percentile=99.995' or 'cat: -5, top_n=3' (a "
                                                "bare second number is a value of 'selection'). Concepts without a "
                                                "line use gamma / selection above; lines of concepts not erased are "
                                                "ignored.", multiline=True, default=""),
            },
        }

    def patch(self, model: Any, sae: Any, block: str, concepts: str, gamma: float, selection: str, top_n: int,
              percentile: float, error_mode: str, cond_only: bool, features: Any = None,
              features_file: str = NO_FILE, source: str = "auto", concept_params: str = "") -> tuple[Any]:
        settings = ConceptBlockSettings(block=block, concepts=tuple(parse_names(concepts)), gamma=gamma,
                                        selection=selection, top_n=top_n, percentile=percentile,
                                        error_mode=error_mode, cond_only=cond_only,
                                        source=source_input(source), concept_params=concept_params)
        stats = load_features(features, features_file)
        patched, patch = build_patch(model, sae, stats, settings)
        table = patch.hook.table
        own = "; ".join(p.describe() for p in settings.concept_params if p.name in table.concepts)
        log.info("SAeUron Concept Block: %s at %s (%s), %d steps, %.2f latents/step, gamma %s, %s%s",
                 table.concepts, patch.block, patch.edit.source, table.num_steps, float(table.count.float().mean()),
                 gamma, error_mode, f"; per concept: {own}" if own else "")
        return (patched,)


register_features_folder()

def concept_patches(model: Any) -> list[SAeUronPatch]:
    """The SAeUron Concept Block wrappers a MODEL carries, in the order they were applied (ValueError when none)."""
    found = [fn for fn in getattr(model, "wrappers", {}).get(diffusion_model_wrapper(), {}).get(WRAPPER_KEY, [])
             if isinstance(fn, SAeUronPatch)]
    if not found:
        raise ValueError("model: this MODEL carries no SAeUron Concept Block edit; wire the Concept Block's output "
                         "MODEL (the one the sampler used)")
    return found


class SAeUronFiringMap:
    """Where SAeUron acted in the last sampling run of a Concept Block MODEL."""

    DESCRIPTION = (
        "After sampling with a SAeUron Concept Block MODEL, shows where the edit acted: the fraction of sampling "
        "steps in which each position of the block was edited, per image, as a MASK at the image's size and in red "
        "over the images; the text lists each step's edited tokens and selected SAE latents. Wire the images "
        "decoded from that sampler, so that this node runs after it."
    )
    CATEGORY = category("saeuron")
    RETURN_TYPES = ("MASK", "IMAGE", "STRING")
    RETURN_NAMES = ("mask", "overlay", "report")
    OUTPUT_TOOLTIPS = ("Per image: the fraction of steps in which SAeUron edited each position (0 to 1).",
                       "The images with the mask drawn in red.",
                       "Per step: how many tokens were edited and which SAE latents the step selects.")
    FUNCTION = "firing_map"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": inp("MODEL", "SAeUron Concept Block's MODEL, after a sampler used it."),
            "images": inp("IMAGE", "The images decoded from that sampler's output (one per prompted row)."),
        }}

    def firing_map(self, model: Any, images: Any) -> dict:
        # several Concept Blocks on one MODEL (e.g. a style block and an object block): a position counts as edited
        # as often as the block that edited it most, and the text has one part per block
        recorded = [p for p in concept_patches(model) if p.record is not None]
        if not recorded:
            raise ValueError("model: no sampling run with this SAeUron Concept Block MODEL was recorded yet; sample "
                             "with it first and wire the decoded images here")
        masks, parts = [], []
        for patch in recorded:
            heat = patch.record.heatmap()
            if heat.shape[0] != images.shape[0]:
                raise ValueError(f"images: {images.shape[0]} image(s), but the last run sampled {heat.shape[0]} "
                                 f"prompted row(s); wire the images of that run")
            masks.append(upsample_mask(heat, images.shape[1], images.shape[2]))
            parts.append(f"{patch.block}: " + patch.record.summary())
        mask = torch.stack(masks).amax(0)
        text = "\n".join(parts)
        return {"ui": {"text": [text]}, "result": (mask, overlay(images.float().cpu(), mask), text)}


NODE_CLASS_MAPPINGS = {
    node_id("SAeUronConceptFeatures"): SAeUronConceptFeatures,
    node_id("SAeUronConceptBlock"): SAeUronConceptBlock,
    node_id("SAeUronFiringMap"): SAeUronFiringMap,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("SAeUronConceptFeatures"): "SAeUron Concept Features",
    node_id("SAeUronConceptBlock"): "SAeUron Concept Block",
    node_id("SAeUronFiringMap"): "SAeUron Firing Map",
}
