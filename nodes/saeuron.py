"""SAeUron nodes: collect block activations, train an SAE, gather concept features, erase with them,
and download published SAEs.

* **Collect SAE Activations** samples the wired model on a list of prompts (ComfyUI's own sampler)
  and streams the output of one SpatialTransformer block into an activation store
  (``sae_core.store``) under ``output/sae_activations/<name>/``; every row records the step index,
  the model timestep and sigma, cond/uncond and the prompt index.
* **Train SAE** trains a TopK SAE on such a store (``sae_core.trainer``) and saves it in
  ``models/sae/<name>/`` (``cfg.json`` + ``sae.safetensors``). Cancel keeps a checkpoint in
  ``output/sae_training/<name>/`` that the next run continues.
* **SAeUron Concept Features** samples concept prompts and other prompts and gathers SAeUron's
  per-step mean SAE codes ``M[concept, step, latent]`` (``sae_core.saeuron.gather_concept_stats``),
  saved to ``models/sae_features/<name>.safetensors``.
* **SAeUron Concept Block** returns a clone of the model that edits the block's output at sampling
  time: per step the concept's most specific latents are scaled by ``gamma * mu_c`` where they exceed
  the all-concept mean (``sae_core.saeuron.SAeUronHook``).
* **Download SAE** fetches a published SAeUron checkpoint folder from the Hugging Face Hub into
  ``models/sae/`` (``sae_core.hub``).

How the model is hooked. Every node works on a ``clone()`` of the MODEL with a DIFFUSION_MODEL
wrapper (``add_wrapper_with_key``): collection and feature gathering record the sampler's state
(``transformer_options``: ``sigmas``, ``sample_sigmas``, ``cond_or_uncond``) and the block is hooked
only while the node samples (the hook is removed in ``finally``); the Concept Block wrapper registers
a forward hook on the block for the duration of each UNet call and removes it afterwards. This works
for every SpatialTransformer, including ``output_blocks.5.1`` which an Upsample follows. The step
index always comes from the sampler's sigma / timestep, never from counting calls. Nothing is left
on the input MODEL, and the SAE is held by the wrapper (never deep-copied with ``model_options``).

Blocks are named as in ComfyUI's UNet (``output_blocks.4.1``); diffusers names as used by published
SAEs (``unet.up_blocks.1.attentions.1``) are accepted and mapped with ComfyUI's own key map.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

import folder_paths
from sae_core.capture import get_submodule
from sae_core.config import TrainConfig
from sae_core.artefacts import save_json
from sae_core.formats import save_sae
from sae_core.hub import download_sae
from sae_core.prompts import parse_names, parse_prompts
from sae_core.saeuron import (
    ERROR_MODES,
    ConceptStats,
    SAeUronHook,
    collect_block_activations,
    gather_concept_stats,
    map_step_index,
    step_index_from_timestep,
)
from sae_core.store import ActivationReader, ActivationWriter, IncompleteStoreError
from sae_core.trainer import SaeTrainer

from .common import (
    DTYPE_CHOICES,
    SAE_FOLDER,
    SAE_TYPE,
    Progress,
    category,
    comfy_device,
    inp,
    interrupt_requested,
    node_id,
    register_sae_folder,
    sampler_choices,
    throw_if_interrupted,
    torch_dtype,
)
from .sae_nodes import load_sae_cached

log = logging.getLogger("concept_erasure")

FEATURES_TYPE = "SAEURON_FEATURES"
"""Socket type of SAeUron concept statistics (a ``sae_core.saeuron.ConceptStats``)."""

FEATURES_FOLDER = "sae_features"
"""Model folder of concept feature tables: ``ComfyUI/models/sae_features`` (and ``output/sae_features``)."""

ACTIVATIONS_FOLDER = "sae_activations"
"""Sub-folder of ComfyUI's output folder holding collected activation stores."""

TRAINING_FOLDER = "sae_training"
"""Sub-folder of ComfyUI's output folder holding SAE training checkpoints (resume after Cancel)."""

WRAPPER_KEY = "concept_erasure.saeuron"
"""Key of our DIFFUSION_MODEL wrappers on a ModelPatcher."""

DEFAULT_BLOCK = "output_blocks.4.1"
"""SAeUron's object block (diffusers ``up_blocks.1.attentions.1``); styles use ``output_blocks.5.1``."""

OTHER_CONCEPT = "other"
"""Concept name the ``other_prompts`` of Concept Features are gathered under."""

BRANCHES = ("cond", "both")
"""Which classifier-free-guidance rows are used: the prompted rows (SAeUron) or both halves."""

SELECTION_RULES = ("top_n", "percentile")
"""``top_n``: N latents per step; ``percentile``: SAeUron's rule (99.999 ~ 1 latent at 20480 latents)."""

DEVICE_CHOICES = ("auto", "cpu")

NO_FILE = "none"
"""Choice of the feature-file combo meaning 'use the features input'."""

LATENT_DOWNSCALE = 8
"""Pixels per latent cell of the SD-family VAEs."""

_COLLECT_COLUMNS = {"step": "int32", "timestep": "float32", "sigma": "float32", "cond": "uint8",
                    "prompt_index": "int32", "position": "int32"}
"""Metadata columns of a collected store and their dtypes."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-/]*$")


# ---------------------------------------------------------------------------------------------
# folders and names
# ---------------------------------------------------------------------------------------------


def register_features_folder() -> list[str]:
    """Register ``models/sae_features`` and ``output/sae_features`` (``.safetensors``); idempotent."""
    defaults = [os.path.join(folder_paths.models_dir, FEATURES_FOLDER),
                os.path.join(folder_paths.get_output_directory(), FEATURES_FOLDER)]
    table = folder_paths.folder_names_and_paths
    paths, exts = table.get(FEATURES_FOLDER, ([], set()))
    new_paths = list(paths) + [p for p in defaults if p not in paths]
    new_exts = set(exts) | {".safetensors"}
    if FEATURES_FOLDER not in table or new_paths != list(paths) or new_exts != set(exts):
        table[FEATURES_FOLDER] = (new_paths, new_exts)
        _forget_file_list(FEATURES_FOLDER)
    return new_paths


def _forget_file_list(folder_name: str) -> None:
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(folder_name, None)


def feature_filenames() -> list[str]:
    """``none`` plus the feature tables ComfyUI can see."""
    register_features_folder()
    return [NO_FILE] + folder_paths.get_filename_list(FEATURES_FOLDER)


def safe_name(name: str, what: str) -> str:
    """A relative name (sub-folders allowed) without traversal; ValueError naming the input otherwise."""
    name = (name or "").strip().replace("\\", "/")
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    parts = [p for p in name.split("/") if p]
    if not parts or not _NAME_RE.match(name) or any(p in (".", "..") for p in parts):
        raise ValueError(f"{what}: {name!r} is not a usable name (letters, digits, space, _ . - and / for sub-folders)")
    return "/".join(parts)


def dataset_folder(name: str) -> Path:
    """``output/sae_activations/<name>``."""
    return Path(folder_paths.get_output_directory()) / ACTIVATIONS_FOLDER / safe_name(name, "dataset_name")


def resolve_dataset(path_or_name: str) -> Path:
    """An activation store folder from an absolute path or a name under ``output/sae_activations``."""
    text = (path_or_name or "").strip()
    if not text:
        raise ValueError("dataset_path is empty: wire the output of Collect SAE Activations (or type its folder)")
    p = Path(text)
    folder = p if p.is_absolute() else dataset_folder(text)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset_path: no activation store at {folder}")
    return folder


def sae_output_folder(name: str) -> Path:
    """``models/sae/<name>`` (the folder layout: ``cfg.json`` + ``sae.safetensors``)."""
    return Path(folder_paths.models_dir) / SAE_FOLDER / safe_name(name, "filename")


def features_path_for(name: str) -> Path:
    """``models/sae_features/<name>.safetensors``."""
    return Path(folder_paths.models_dir) / FEATURES_FOLDER / f"{safe_name(name, 'filename')}.safetensors"


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------


def _unet(model: Any) -> torch.nn.Module:
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is None:
        raise ValueError(f"model: {type(getattr(model, 'model', model)).__name__} has no diffusion_model; "
                         "SAeUron needs a UNet with SpatialTransformer blocks (SD1.x, SD2.x, SDXL)")
    return unet


def spatial_transformer_blocks(model: Any) -> dict[str, torch.nn.Module]:
    """Every SpatialTransformer of the model's UNet, by its ComfyUI name (``output_blocks.4.1``)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    return {name: m for name, m in _unet(model).named_modules() if isinstance(m, SpatialTransformer)}


def _diffusers_to_ldm(model: Any, name: str) -> Optional[str]:
    """ComfyUI name of a diffusers module path (``up_blocks.1.attentions.1``) via ComfyUI's key map."""
    import comfy.utils

    config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    if not config:
        return None
    prefix = name + "."
    for key, ldm in comfy.utils.unet_to_diffusers(config).items():
        if key.startswith(prefix):
            suffix = key[len(prefix):]
            if ldm.endswith("." + suffix):
                return ldm[: -len(suffix) - 1]
    return None


def resolve_block(model: Any, block: str) -> tuple[str, torch.nn.Module]:
    """``(ComfyUI name, module)`` of a SpatialTransformer block named ``block``.

    Accepts ComfyUI names (``output_blocks.4.1``, optionally prefixed ``diffusion_model.``) and
    diffusers names (``unet.up_blocks.1.attentions.1``). An unknown name raises a ValueError listing
    the valid ones.
    """
    blocks = spatial_transformer_blocks(model)
    family = type(getattr(model.model, "model_config", model.model)).__name__
    if not blocks:
        raise ValueError(f"model: this {family} model has no SpatialTransformer blocks; SAeUron supports "
                         "SD1.x, SD2.x and SDXL UNets")
    text = (block or "").strip()
    for prefix in ("diffusion_model.", "unet."):
        if text.startswith(prefix):
            text = text[len(prefix):]
    name = text
    if text.split(".")[0] in ("up_blocks", "down_blocks", "mid_block"):
        name = _diffusers_to_ldm(model, text) or text
    if name not in blocks:
        raise ValueError(f"block: '{block}' is not a SpatialTransformer block of this {family} UNet; "
                         f"valid blocks: {', '.join(blocks)}")
    return name, blocks[name]


def block_width(module: torch.nn.Module) -> int:
    """Channels of a SpatialTransformer's output (equal to its input channels)."""
    return int(module.in_channels)


def check_sae_width(sae: Any, block: str, width: int) -> None:
    """ValueError naming both widths and the block when the SAE cannot read the block's output."""
    d_in = int(sae.cfg.d_in)
    if d_in != width:
        trained = f" (it was trained on {sae.cfg.hookpoint})" if getattr(sae.cfg, "hookpoint", None) else ""
        raise ValueError(f"sae: the SAE reads {d_in}-wide activations{trained} but block '{block}' outputs "
                         f"{width} channels; pick the block the SAE was trained on or an SAE for this block")


def _warn_hookpoint(model: Any, sae: Any, block: str) -> None:
    hook = getattr(sae.cfg, "hookpoint", None)
    if not hook:
        return
    try:
        trained, _ = resolve_block(model, hook)
    except ValueError:
        return
    if trained != block:
        log.warning("SAeUron: the SAE was trained on %s (%s) but is applied to %s", trained, hook, block)


def _check_sae(sae: Any) -> None:
    if sae is None or not hasattr(sae, "cfg") or not hasattr(sae, "W_dec"):
        raise ValueError(f"sae: expected an SAE from Load SAE / Train SAE, got {type(sae).__name__}")


# ---------------------------------------------------------------------------------------------
# sampler state
# ---------------------------------------------------------------------------------------------


def _unet_call(args: tuple, kwargs: dict) -> tuple[Tensor, Any, dict]:
    """``(x, timesteps, transformer_options)`` of a UNetModel call as a DIFFUSION_MODEL wrapper sees it
    (``executor(x, timesteps, context, y, control, transformer_options, **kwargs)``)."""
    x = args[0] if args else kwargs["x"]
    timesteps = args[1] if len(args) > 1 else kwargs.get("timesteps")
    options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
    return x, timesteps, options if isinstance(options, dict) else {}


def cond_mask(options: dict, batch: int) -> Optional[Tensor]:
    """``[batch]`` bool, True on conditional rows, from ``cond_or_uncond`` (None when it is absent).

    The batch is ``len(cond_or_uncond)`` consecutive chunks in that order (0 = positive, 1 = negative).
    """
    order = options.get("cond_or_uncond")
    if not order:
        return None
    if batch % len(order):
        raise ValueError(f"SAeUron: a batch of {batch} rows does not split into the {len(order)} "
                         f"cond/uncond chunks {list(order)}")
    return torch.tensor([c == 0 for c in order], dtype=torch.bool).repeat_interleave(batch // len(order))


def _first(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.reshape(-1)[0])
    return float(value)


def nearest_step(sigma: float, sample_sigmas: Any) -> int:
    """Position of the run's evaluation sigma (``sample_sigmas`` without its final entry) closest to ``sigma``."""
    sched = torch.as_tensor(sample_sigmas, dtype=torch.float64).reshape(-1).cpu()
    if sched.numel() > 1:
        sched = sched[:-1]
    return int(torch.argmin((sched - sigma).abs()))


class SamplerState:
    """Where the sampler is during the current UNet call, recorded by a DIFFUSION_MODEL wrapper."""

    def __init__(self, model_sampling: Any) -> None:
        self.model_sampling = model_sampling
        self.options: Optional[dict] = None
        self.timesteps: Any = None
        self.batch = 0
        self._schedule_key: Any = None
        self._schedule_t: Optional[Tensor] = None

    def wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        x, timesteps, options = _unet_call(args, kwargs)
        saved = (self.options, self.timesteps, self.batch)
        self.options, self.timesteps, self.batch = options, timesteps, int(x.shape[0])
        try:
            return executor(*args, **kwargs)
        finally:
            self.options, self.timesteps, self.batch = saved

    def _require(self) -> dict:
        if self.options is None:
            raise ValueError("SAeUron: the block ran outside of a sampling call of this node")
        return self.options

    def sigma(self) -> float:
        options = self._require()
        if "sigmas" not in options:
            raise ValueError("SAeUron: the sampler passed no sigmas in transformer_options")
        return _first(options["sigmas"])

    def sample_sigmas(self) -> Tensor:
        options = self._require()
        sigmas = options.get("sample_sigmas")
        if sigmas is None:
            raise ValueError("SAeUron: the sampler passed no sample_sigmas in transformer_options")
        return torch.as_tensor(sigmas).detach().reshape(-1).to("cpu", torch.float32)

    def step_index(self) -> int:
        return nearest_step(self.sigma(), self.sample_sigmas())

    def timestep(self) -> float:
        if self.timesteps is not None:
            return _first(self.timesteps)
        return _first(self.model_sampling.timestep(torch.tensor([self.sigma()])))

    def schedule_timesteps(self) -> Tensor:
        """Model timestep of every evaluation sigma of the current run."""
        sigmas = self.sample_sigmas()
        key = tuple(sigmas.tolist())
        if key != self._schedule_key:
            evals = sigmas[:-1] if sigmas.numel() > 1 else sigmas
            self._schedule_t = self.model_sampling.timestep(evals).float().cpu()
            self._schedule_key = key
        return self._schedule_t  # type: ignore[return-value]

    def cond_mask(self, batch: int) -> Optional[Tensor]:
        return cond_mask(self._require(), batch)


class _WithSigma:
    """Adds the current sigma to each row ``collect_block_activations`` writes (it fills the others)."""

    def __init__(self, writer: ActivationWriter, state: SamplerState) -> None:
        self.writer = writer
        self.state = state
        self.columns = tuple(c for c in writer.columns if c != "sigma")

    def add(self, rows: Tensor, **meta: Any) -> None:
        self.writer.add(rows, sigma=self.state.sigma(), **meta)


class ComfySampling:
    """Samples one prompt at a time through ComfyUI on a clone of ``model`` that records its state.

    Each prompt ``i`` gets the noise of ``seed + i``; the negative prompt is ``negative``.
    """

    def __init__(self, model: Any, clip: Any, steps: int, cfg: float, sampler_name: str, scheduler: str,
                 width: int, height: int, seed: int, negative: str = "",
                 on_step: Optional[Callable[[int], None]] = None) -> None:
        if clip is None:
            raise ValueError("clip: no CLIP is wired; the prompts must be encoded for sampling")
        self.state = SamplerState(model.get_model_object("model_sampling"))
        self.patcher = model.clone()
        self.patcher.add_wrapper_with_key(_wrapper_type(), WRAPPER_KEY + ".state", self.state.wrapper)
        self.clip = clip
        self.steps, self.cfg = int(steps), float(cfg)
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.seed = int(seed)
        channels = model.get_model_object("latent_format").latent_channels
        self.shape = (1, channels, int(height) // LATENT_DOWNSCALE, int(width) // LATENT_DOWNSCALE)
        self.negative = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
        self.on_step = on_step
        self.done = 0

    def sample(self, prompt: str, index: int) -> Tensor:
        import comfy.sample

        cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(prompt))
        latent = comfy.sample.fix_empty_latent_channels(self.patcher, torch.zeros(self.shape))
        seed = self.seed + int(index)
        noise = comfy.sample.prepare_noise(latent, seed)

        def callback(step: int, *_args: Any) -> None:
            throw_if_interrupted()
            if self.on_step is not None:
                self.on_step(self.done * self.steps + step + 1)

        out = comfy.sample.sample(self.patcher, noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                  cond, self.negative, latent, callback=callback, disable_pbar=True, seed=seed)
        self.done += 1
        return out

    def run_schedule(self) -> tuple[list[float], list[float]]:
        """``(sigmas, timesteps)`` of one sampling run with these settings (evaluation sigmas only), as
        ComfyUI's KSampler computes them (including samplers that drop the penultimate sigma)."""
        import comfy.samplers

        sampler = comfy.samplers.KSampler(self.patcher, steps=self.steps, device=self.patcher.load_device,
                                          sampler=self.sampler_name, scheduler=self.scheduler, denoise=1.0,
                                          model_options=self.patcher.model_options)
        sigmas = sampler.sigmas.detach().float().cpu()
        evals = sigmas[:-1] if sigmas.numel() > 1 else sigmas
        ms = self.patcher.get_model_object("model_sampling")
        return evals.tolist(), ms.timestep(evals).float().cpu().tolist()


def _wrapper_type() -> str:
    import comfy.patcher_extension

    return comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL


_CONCEPT_LINE = re.compile(r"^([^:()\[\]{}]+?)\s*:\s+(.+)$")


def parse_concepts(text: str) -> dict[str, list[str]]:
    """``concept: prompt`` lines -> ``{concept: [prompts]}`` (a line without ``name: `` is its own concept).

    Blank lines and lines starting with ``#`` are skipped; a prompt weight such as ``(cat:1.2)`` is
    not mistaken for a name (a name is followed by a colon *and a space* and has no brackets).
    """
    out: dict[str, list[str]] = {}
    for line in parse_prompts(text):
        m = _CONCEPT_LINE.match(line)
        name, prompt = (m.group(1).strip(), m.group(2).strip()) if m else (line, line)
        bucket = out.setdefault(name, [])
        if prompt not in bucket:
            bucket.append(prompt)
    return out


def _model_family(model: Any) -> str:
    return type(getattr(model.model, "model_config", model.model)).__name__


def _sampler_inputs(steps: int = 20, cfg: float = 7.5) -> dict[str, tuple]:
    samplers, schedulers = sampler_choices()
    return {
        "steps": inp("INT", "Sampling steps of every generation; the step index recorded with each activation "
                            "is a position in this schedule.", default=steps, min=1, max=1000),
        "cfg": inp("FLOAT", "Classifier-free guidance scale (SAeUron uses 9.0). At 1.0 ComfyUI skips the "
                            "unconditional half.", default=cfg, min=0.0, max=30.0, step=0.1, round=0.01),
        "seed": inp("INT", "Noise seed of the first prompt; prompt i uses seed + i.", default=0, min=0,
                    max=0xFFFFFFFF, control_after_generate=False),
        "sampler_name": inp(samplers, "Sampler used to generate.", default="euler"),
        "scheduler": inp(schedulers, "Noise schedule used to generate.", default="normal"),
        "width": inp("INT", "Image width in pixels.", default=512, min=64, max=4096, step=8),
        "height": inp("INT", "Image height in pixels.", default=512, min=64, max=4096, step=8),
    }


# ---------------------------------------------------------------------------------------------
# Collect SAE Activations
# ---------------------------------------------------------------------------------------------


class CollectSAEActivations:
    """Sample prompts and store one block's output tokens as SAE training data."""

    DESCRIPTION = (
        "Samples the model on each prompt and records the output of one SpatialTransformer block at every step "
        "(every spatial position is one row) into an activation store in output/sae_activations/<name>, the "
        "training data of Train SAE. Each row records the step index, timestep, sigma, cond/uncond and prompt "
        "index. The input model is not modified. A complete store with the same settings is reused."
    )
    CATEGORY = category("saeuron")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("dataset_path",)
    OUTPUT_TOOLTIPS = ("Folder of the activation store; wire it into Train SAE.",)
    FUNCTION = "collect"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": inp("MODEL", "The diffusion model whose block activations are recorded (not modified)."),
                "clip": inp("CLIP", "Text encoder of the same checkpoint, used to encode the prompts."),
                "prompts": inp("STRING", "Prompts to sample, one per line (one image each). Use many varied "
                                         "prompts: the SAE learns only what it sees here.", multiline=True,
                               default="a photo of a dog\na painting of a house\na portrait of a woman"),
                "block": inp("STRING", "SpatialTransformer block to record: output_blocks.4.1 (SAeUron's object "
                                       "block), output_blocks.5.1 (style block) or any other; diffusers names "
                                       "like unet.up_blocks.1.attentions.1 work too.", default=DEFAULT_BLOCK),
                **_sampler_inputs(),
                "branch": inp(list(BRANCHES), "Which guidance rows to record: cond = the prompted half only (as "
                                              "SAeUron), both = the unconditional half too.", default="cond"),
                "dataset_name": inp("STRING", "Name of the store folder in output/sae_activations.",
                                    default="saeuron/activations"),
                "store_dtype": inp(["float16", "float32"], "Precision of the stored activations (float16 halves "
                                                           "the disk space).", default="float16"),
                "overwrite": inp("BOOLEAN", "Replace an existing complete store of this name that was collected "
                                            "with other settings (otherwise that is an error).", default=False),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def collect(self, model: Any, clip: Any, prompts: str, block: str, steps: int, cfg: float, seed: int,
                sampler_name: str, scheduler: str, width: int, height: int, branch: str = "cond",
                dataset_name: str = "saeuron/activations", store_dtype: str = "float16", overwrite: bool = False,
                unique_id: Optional[str] = None) -> tuple[str]:
        prompt_list = parse_prompts(prompts)
        if not prompt_list:
            raise ValueError("prompts: give at least one prompt (one per line)")
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
        name, module = resolve_block(model, block)
        width_c = block_width(module)
        folder = dataset_folder(dataset_name)
        sampling = ComfySampling(model, clip, steps, cfg, sampler_name, scheduler, width, height, seed)
        sigmas, timesteps = sampling.run_schedule()
        settings = {"prompts": prompt_list, "block": name, "steps": int(steps), "cfg": float(cfg), "seed": int(seed),
                    "sampler": sampler_name, "scheduler": scheduler, "width": int(width), "height": int(height),
                    "branch": branch, "store_dtype": store_dtype, "model_family": _model_family(model),
                    "sigmas": sigmas}
        if (folder / "manifest.json").is_file():
            try:
                existing = ActivationReader(folder)
            except (IncompleteStoreError, ValueError, FileNotFoundError):
                existing = None  # unfinished or broken: the writer replaces it
            if existing is not None:
                if existing.attrs.get("settings") == settings:
                    log.info("Collect SAE Activations: %s already holds these activations; reusing it", folder)
                    return (str(folder),)
                if not overwrite:
                    raise ValueError(f"dataset_name: {folder} already holds activations collected with other "
                                     "settings; choose another name or enable overwrite")
        attrs = {"hookpoint": name, "d": width_c, "model_family": _model_family(model), "settings": settings,
                 "prompts": prompt_list, "sigmas": sigmas, "timesteps": timesteps,
                 "origin": node_id("CollectSAEActivations")}
        unet = _unet(sampling.patcher)
        cond_only = branch == "cond"

        def state() -> dict[str, Any]:
            s = sampling.state
            return {"step_index": min(s.step_index(), int(steps) - 1), "timestep": s.timestep(),
                    "cond_mask": s.cond_mask(s.batch)}

        def sample_fn(batch: list[str]) -> None:
            throw_if_interrupted()
            for p in batch:
                sampling.sample(p, sampling.done)  # prompts run in order: prompt i gets seed + i

        with Progress(len(prompt_list) * int(steps), desc="collect activations", node_id=unique_id) as bar:
            sampling.on_step = bar.update_absolute
            tokens_per_shard = max(1024, (256 << 20) // (width_c * (2 if store_dtype == "float16" else 4)))
            with ActivationWriter(folder, d=width_c, dtype=store_dtype, shard_tokens=tokens_per_shard,
                                  metadata_columns=_COLLECT_COLUMNS, attrs=attrs, overwrite=True) as writer:
                rows = collect_block_activations(sample_fn, unet, name, prompt_list, int(steps),
                                                 _WithSigma(writer, sampling.state), cond_only=cond_only,
                                                 state=state, batch_size=1, progress=False)
        log.info("Collect SAE Activations: %d rows of %s (%d wide) from %d prompts x %d steps -> %s",
                 rows, name, width_c, len(prompt_list), steps, folder)
        return (str(folder),)


# ---------------------------------------------------------------------------------------------
# Train SAE
# ---------------------------------------------------------------------------------------------


class TrainSAE:
    """Train a TopK SAE on a collected activation store."""

    DESCRIPTION = (
        "Trains a TopK sparse autoencoder (SAeUron's recipe: BatchTopK, AuxK for dead latents, Adam with a "
        "linearly decaying learning rate) on an activation store from Collect SAE Activations and saves it in "
        "models/sae/<filename>/ (cfg.json + sae.safetensors, the SAeUron layout). Cancel keeps a checkpoint "
        "(also a usable SAE) in output/sae_training/<filename>; queueing again with the same settings continues it."
    )
    CATEGORY = category("sae")
    RETURN_TYPES = (SAE_TYPE, "STRING")
    RETURN_NAMES = ("sae", "sae_path")
    OUTPUT_TOOLTIPS = (
        "The trained SAE (per-token TopK, ready for the SAeUron nodes).",
        "Folder the SAE was saved to (Load SAE lists it as <filename>/sae.safetensors).",
    )
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "dataset_path": inp("STRING", "Activation store from Collect SAE Activations (its output, an "
                                              "absolute folder, or a name in output/sae_activations).",
                                    default=""),
                "expansion_factor": inp("INT", "Latents per activation channel when num_latents is 0 "
                                               "(SAeUron: 16).", default=16, min=1, max=256),
                "num_latents": inp("INT", "Number of SAE latents; 0 = channels x expansion_factor.", default=0,
                                   min=0, max=1 << 20),
                "k": inp("INT", "Active latents per token (SAeUron: 32).", default=32, min=1, max=4096),
                "steps": inp("INT", "Optimiser steps.", default=1000, min=1, max=10_000_000),
                "lr": inp("FLOAT", "Peak Adam learning rate, decayed linearly to 0 (SAeUron: 4e-4).", default=4e-4,
                          min=1e-7, max=1.0, step=1e-5, round=1e-7),
                "batch_size": inp("INT", "Tokens (activation rows) per optimiser step (SAeUron: 4096).",
                                  default=4096, min=1, max=1 << 20),
                "seed": inp("INT", "Seed of the initialisation and of the data order.", default=0, min=0,
                            max=0xFFFFFFFF, control_after_generate=False),
                "filename": inp("STRING", "Folder name in models/sae for the trained SAE.",
                                default="saeuron/my_sae"),
                "overwrite": inp("BOOLEAN", "Replace an SAE that already exists under this name.", default=False),
            },
            "optional": {
                "dead_feature_threshold": inp("INT", "Advanced: tokens without firing after which a latent counts "
                                                     "as dead and gets the AuxK loss (SAeUron: 10M; lower it for "
                                                     "small datasets).", default=10_000_000, min=1, max=1 << 40),
                "device": inp(list(DEVICE_CHOICES), "Where to train: auto = ComfyUI's device; cpu = system memory.",
                              default="auto"),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, dataset_path: str, expansion_factor: int, num_latents: int, k: int, steps: int, lr: float,
              batch_size: int, seed: int, filename: str, overwrite: bool = False,
              dead_feature_threshold: int = 10_000_000, device: str = "auto",
              unique_id: Optional[str] = None) -> tuple[Any, str]:
        folder = resolve_dataset(dataset_path)
        try:
            reader = ActivationReader(folder)
        except ValueError as err:
            raise ValueError(f"dataset_path: {err}") from err
        if len(reader) < int(batch_size):
            raise ValueError(f"batch_size: the store {folder} has only {len(reader)} rows, fewer than one batch of "
                             f"{batch_size}; collect more activations or lower batch_size")
        out = sae_output_folder(filename)
        if (out / "sae.safetensors").exists() or (out / "cfg.json").exists():
            if not overwrite:
                raise ValueError(f"filename: an SAE already exists at {out}; choose another name or enable overwrite")
        d = int(reader.d)
        n_lat = int(num_latents) or d * int(expansion_factor)
        if not 1 <= int(k) <= n_lat:
            raise ValueError(f"k: must be between 1 and the number of latents ({n_lat}), got {k}")
        cfg = TrainConfig(batch_size=int(batch_size), lr=float(lr), k=int(k), num_latents=n_lat,
                          expansion_factor=int(expansion_factor), seed=int(seed),
                          dead_feature_threshold=int(dead_feature_threshold),
                          checkpoint_every=max(10, int(steps) // 20), device=str(comfy_device(device)),
                          hookpoint=reader.attrs.get("hookpoint"), model_family=reader.attrs.get("model_family"))
        ckpt = Path(folder_paths.get_output_directory()) / TRAINING_FOLDER / safe_name(filename, "filename")
        settings = {"dataset": str(folder), "tokens": len(reader), "steps": int(steps),
                    "train_config": {k_: v for k_, v in cfg.to_dict().items() if k_ != "device"}}
        marker = ckpt / "settings.json"
        if ckpt.is_dir():
            try:
                same = json.loads(marker.read_text(encoding="utf-8")) == json.loads(json.dumps(settings))
            except (OSError, ValueError):
                same = False
            if not same:
                log.info("Train SAE: %s holds a checkpoint of other settings; starting over", ckpt)
                for name in ("trainer_state.safetensors", "settings.json"):
                    (ckpt / name).unlink(missing_ok=True)
        save_json(marker, settings)

        trainer = SaeTrainer(cfg, d)
        epochs = reader.iter_epochs(int(batch_size), drop_last=True, seed=int(seed))
        with Progress(int(steps), desc="Train SAE", node_id=unique_id) as bar:
            sae = trainer.train((batch for _, batch in epochs), int(steps), checkpoint_dir=ckpt, resume=True,
                                progress=False, should_stop=interrupt_requested,
                                on_step=lambda s, n, m: bar.update_absolute(s))
        if trainer.interrupted:
            throw_if_interrupted()
            raise RuntimeError(f"SAE training stopped at step {trainer.step}; the checkpoint in {ckpt} continues "
                               "when the node is queued again")
        sae.requires_grad_(False)
        save_sae(sae, out, layout="folder")
        register_sae_folder()
        _forget_file_list(SAE_FOLDER)
        last = trainer.history[-1] if trainer.history else {}
        log.info("Train SAE: %d steps on %s, fvu %.4g, dead %.3g -> %s", trainer.step, folder,
                 last.get("fvu", math.nan), last.get("dead_frac", math.nan), out)
        return (sae, str(out))


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
                "sae": inp(SAE_TYPE, "The SAE trained on the block's output."),
                "block": inp("STRING", "SpatialTransformer block the SAE reads (output_blocks.4.1 for objects, "
                                       "output_blocks.5.1 for styles, or any other).", default=DEFAULT_BLOCK),
                "concept_prompts": inp("STRING", "One 'concept: prompt' per line; several lines per concept and "
                                                 "several concepts allowed (e.g. 'Van Gogh: a house in Van Gogh "
                                                 "style'). A line without 'name: ' is its own concept.",
                                       multiline=True,
                                       default="dog: a photo of a dog\ndog: a dog on the grass\n"
                                               "cat: a photo of a cat\ncat: a cat on a sofa"),
                "other_prompts": inp("STRING", "Prompts of everything else, one per line, gathered as the concept "
                                               f"'{OTHER_CONCEPT}' (the contrast that makes features specific).",
                                     multiline=True, default="a photo of a house\na landscape painting\na bowl of fruit"),
                **_sampler_inputs(),
                "branch": inp(list(BRANCHES), "Guidance rows averaged: cond = the prompted half (SAeUron), both = "
                                              "both halves.", default="cond"),
                "filename": inp("STRING", "File name in models/sae_features (without .safetensors); replaced "
                                          "if it exists.", default="saeuron/features"),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def gather(self, model: Any, clip: Any, sae: Any, block: str, concept_prompts: str, other_prompts: str,
               steps: int, cfg: float, seed: int, sampler_name: str, scheduler: str, width: int, height: int,
               branch: str = "cond", filename: str = "saeuron/features",
               unique_id: Optional[str] = None) -> tuple[ConceptStats, str]:
        _check_sae(sae)
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
        name, module = resolve_block(model, block)
        check_sae_width(sae, name, block_width(module))
        _warn_hookpoint(model, sae, name)
        out_path = features_path_for(filename)

        sampling = ComfySampling(model, clip, steps, cfg, sampler_name, scheduler, width, height, seed)
        sigmas, _ = sampling.run_schedule()
        flat = [p for ps in concepts.values() for p in ps]

        def state() -> dict[str, Any]:
            s = sampling.state
            step = min(s.step_index(), int(steps) - 1)
            return {"step_index": step, "timestep": float(s.schedule_timesteps()[step]),
                    "cond_mask": s.cond_mask(s.batch)}

        def sample_fn(batch: list[str]) -> None:
            throw_if_interrupted()
            for p in batch:
                sampling.sample(p, sampling.done)

        attrs = {"concept_prompts": concepts, "block": name, "steps": int(steps), "cfg": float(cfg),
                 "seed": int(seed), "sampler": sampler_name, "scheduler": scheduler, "width": int(width),
                 "height": int(height), "branch": branch, "model_family": _model_family(model), "sigmas": sigmas,
                 "origin": node_id("SAeUronConceptFeatures")}
        with Progress(len(flat) * int(steps), desc="concept features", node_id=unique_id) as bar:
            sampling.on_step = bar.update_absolute
            stats = gather_concept_stats(sample_fn, _unet(sampling.patcher), name, sae, concepts, int(steps),
                                         state=state, schedule_kind="timestep", cond_only=branch == "cond",
                                         batch_size=1, progress=False, attrs=attrs)
        stats.save(out_path)
        register_features_folder()
        _forget_file_list(FEATURES_FOLDER)
        log.info("SAeUron Concept Features: %s at %s (%d steps) -> %s", list(concepts), name, steps, out_path)
        return (stats, str(out_path))


# ---------------------------------------------------------------------------------------------
# SAeUron Concept Block
# ---------------------------------------------------------------------------------------------


class SAeUronPatch:
    """A DIFFUSION_MODEL wrapper that edits one block's output with an :class:`SAeUronHook`.

    For the duration of each UNet call a forward hook sits on the block; it maps the sampler's
    timestep (or sigma) to the features' step index and applies the hook to every row (or, with
    ``cond_only``, to the conditional rows given by ``cond_or_uncond``). The hook is removed when the
    call returns or raises.

    Attributes:
        last_step: step index of the most recent call (diagnostics).
    """

    def __init__(self, hook: SAeUronHook, block: str, model_sampling: Any, cond_only: bool = False) -> None:
        self.hook = hook
        self.block = block
        self.model_sampling = model_sampling
        self.cond_only = cond_only
        self.last_step: Optional[int] = None

    def step_index(self, timesteps: Any, options: dict) -> int:
        """The features' step index of the current call, from the sampler's timestep or sigma."""
        table = self.hook.table
        sigmas = options.get("sigmas")
        if table.schedule is not None:
            if table.schedule_kind == "sigma":
                if sigmas is None:
                    raise ValueError("SAeUron: the sampler passed no sigmas in transformer_options")
                return step_index_from_timestep(sigmas, table.schedule)
            if timesteps is None:
                if sigmas is None:
                    raise ValueError("SAeUron: the UNet call carries neither timesteps nor sigmas")
                timesteps = self.model_sampling.timestep(torch.as_tensor(sigmas))
            return step_index_from_timestep(timesteps, table.schedule)
        sample_sigmas = options.get("sample_sigmas")
        if sample_sigmas is None or sigmas is None:
            raise ValueError("SAeUron: these features record no sampling schedule and the sampler passed no "
                             "sample_sigmas, so the step cannot be determined")
        n = max(1, int(torch.as_tensor(sample_sigmas).numel()) - 1)
        return map_step_index(min(nearest_step(_first(sigmas), sample_sigmas), n - 1), n, table.num_steps)

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        _, timesteps, options = _unet_call(args, kwargs)
        module = get_submodule(executor.class_obj, self.block)
        step = self.step_index(timesteps, options)
        self.last_step = step

        def forward_hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
            y = output[0] if isinstance(output, tuple) else output
            mask = cond_mask(options, y.shape[0]) if self.cond_only else None
            if self.cond_only and mask is None:
                mask = torch.ones(y.shape[0], dtype=torch.bool)  # no CFG batch layout given: every row is prompted
            edited = self.hook(y, step, mask)
            return (edited,) + tuple(output[1:]) if isinstance(output, tuple) else edited

        handle = module.register_forward_hook(forward_hook)
        try:
            return executor(*args, **kwargs)
        finally:
            handle.remove()


def load_features(features: Any = None, features_file: str = NO_FILE) -> ConceptStats:
    """The feature table from the socket or, when that is not wired, from ``models/sae_features``."""
    if features is not None:
        if not isinstance(features, ConceptStats):
            raise ValueError(f"features: expected SAeUron Concept Features output, got {type(features).__name__}")
        return features
    if not features_file or features_file == NO_FILE:
        raise ValueError("features: wire SAeUron Concept Features into 'features' or pick a features_file")
    register_features_folder()
    path = folder_paths.get_full_path(FEATURES_FOLDER, features_file)
    if path is None:
        raise FileNotFoundError(f"features_file: '{features_file}' was not found in "
                                f"{', '.join(folder_paths.get_folder_paths(FEATURES_FOLDER))}")
    try:
        return ConceptStats.load(path)
    except ValueError as err:
        raise ValueError(f"features_file: {err}") from err


def build_patch(model: Any, sae: Any, stats: ConceptStats, block: str, concepts: list[str], gamma: float,
                selection: str, top_n: int, percentile: float, error_mode: str, cond_only: bool) -> tuple[Any, SAeUronPatch]:
    """A clone of ``model`` carrying the SAeUron edit, and the wrapper (for inspection)."""
    _check_sae(sae)
    if selection not in SELECTION_RULES:
        raise ValueError(f"selection must be one of {', '.join(SELECTION_RULES)}, got {selection!r}")
    if error_mode not in ERROR_MODES:
        raise ValueError(f"error_mode must be one of {', '.join(ERROR_MODES)}, got {error_mode!r}")
    block = (block or "").strip() or stats.hookpoint or getattr(sae.cfg, "hookpoint", None) or ""
    name, module = resolve_block(model, block)
    check_sae_width(sae, name, block_width(module))
    if stats.hookpoint:
        try:
            measured, _ = resolve_block(model, stats.hookpoint)
        except ValueError:
            measured = None
            log.warning("SAeUron: the features were measured at %s, which this model does not have", stats.hookpoint)
        if measured is not None and measured != name:
            raise ValueError(f"block: the features were measured at '{measured}' but the edit is asked for "
                             f"'{name}'; use the same block (or gather features at '{name}')")
    _warn_hookpoint(model, sae, name)
    names = concepts or [c for c in stats.concepts if c != OTHER_CONCEPT]
    if not names:
        raise ValueError(f"concepts: the feature table holds no concept besides '{OTHER_CONCEPT}'")
    for c in names:
        try:
            stats.index(c)
        except ValueError as err:
            raise ValueError(f"concepts: {err}") from None
    try:
        hook = SAeUronHook(sae, stats, names, gamma=float(gamma),
                           top_n=int(top_n) if selection == "top_n" else None,
                           percentile=float(percentile) if selection == "percentile" else None,
                           error_mode=error_mode, cond_only=bool(cond_only))
    except ValueError as err:
        raise ValueError(f"features: {err}") from err
    patch = SAeUronPatch(hook, name, model.get_model_object("model_sampling"), cond_only=bool(cond_only))
    patched = model.clone()
    patched.add_wrapper_with_key(_wrapper_type(), WRAPPER_KEY, patch)
    return patched, patch


class SAeUronConceptBlock:
    """Erase concepts by editing one UNet block's output with an SAE at sampling time."""

    DESCRIPTION = (
        "Returns a copy of the model that erases concepts with SAeUron: at each sampling step the block's output "
        "is encoded by the SAE, the concept's most specific latents for that step are scaled by gamma x their "
        "concept mean wherever they exceed the all-concept mean, and the change is added back. No weights "
        "change; the input model is not modified. Needs the SAE of the block and a feature table from SAeUron "
        "Concept Features (wired or picked from models/sae_features)."
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
                "sae": inp(SAE_TYPE, "The SAE trained on the block's output."),
                "block": inp("STRING", "SpatialTransformer block to edit; must be the block the SAE and the "
                                       "features belong to (output_blocks.4.1 objects, output_blocks.5.1 styles). "
                                       "Empty = the block recorded in the features.", default=DEFAULT_BLOCK),
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
            },
        }

    def patch(self, model: Any, sae: Any, block: str, concepts: str, gamma: float, selection: str, top_n: int,
              percentile: float, error_mode: str, cond_only: bool, features: Any = None,
              features_file: str = NO_FILE) -> tuple[Any]:
        stats = load_features(features, features_file)
        patched, patch = build_patch(model, sae, stats, block, parse_names(concepts), gamma, selection, top_n,
                                     percentile, error_mode, cond_only)
        table = patch.hook.table
        log.info("SAeUron Concept Block: %s at %s, %d steps, %.2f latents/step, gamma %s, %s",
                 table.concepts, patch.block, table.num_steps, float(table.count.float().mean()), gamma, error_mode)
        return (patched,)


# ---------------------------------------------------------------------------------------------
# Download SAE
# ---------------------------------------------------------------------------------------------


class DownloadSAE:
    """Download a published SAE folder from the Hugging Face Hub into models/sae."""

    DESCRIPTION = (
        "Downloads one SAE folder (cfg.json + sae.safetensors) of a Hugging Face repo, e.g. SAeUron's "
        "bcywinski/SAeUron with hookpoint unet.up_blocks.1.attentions.1 (objects, ComfyUI block output_blocks.4.1) "
        "or unet.up_blocks.1.attentions.2 (styles, output_blocks.5.1), into models/sae/<owner>__<repo>/<hookpoint>/ "
        "and loads it. A complete local copy is reused without contacting the Hub."
    )
    CATEGORY = category("sae")
    RETURN_TYPES = (SAE_TYPE, "STRING")
    RETURN_NAMES = ("sae", "sae_path")
    OUTPUT_TOOLTIPS = ("The downloaded SAE.", "Local folder of the SAE (Load SAE lists its sae.safetensors).")
    FUNCTION = "download"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "repo_id": inp("STRING", "Hugging Face model repo (owner/name).", default="bcywinski/SAeUron"),
                "hookpoint": inp("STRING", "Folder of the SAE inside the repo (its hook point), e.g. "
                                           "unet.up_blocks.1.attentions.1 or coco/unet.up_blocks.1.attentions.1.",
                                 default="unet.up_blocks.1.attentions.1"),
                "revision": inp("STRING", "Branch, tag or commit; empty = the default branch.", default=""),
                "device": inp(list(DEVICE_CHOICES), "Where the SAE lives: auto = ComfyUI's device; cpu = system "
                                                    "memory.", default="auto"),
                "dtype": inp(list(DTYPE_CHOICES), "Precision of the SAE weights.", default=DTYPE_CHOICES[0]),
            }
        }

    def download(self, repo_id: str, hookpoint: str, revision: str = "", device: str = "auto",
                 dtype: str = DTYPE_CHOICES[0]) -> tuple[Any, str]:
        root = Path(folder_paths.models_dir) / SAE_FOLDER
        got = download_sae(repo_id, hookpoint, root, revision or None)
        register_sae_folder()
        _forget_file_list(SAE_FOLDER)
        weights = got.folder / "sae.safetensors"
        label = f"{got.repo_id}/{got.hookpoint}"
        sae = load_sae_cached(str(weights), comfy_device(device), torch_dtype(dtype), label=label)
        if not getattr(sae.cfg, "hookpoint", None):  # SAeUron's cfg.json does not name its hook point
            sae.cfg.hookpoint = got.hookpoint.split("/")[-1]
        log.info("Download SAE: %s %s -> %s", label, "downloaded" if got.downloaded else "already present", got.folder)
        return (sae, str(got.folder))


register_features_folder()

NODE_CLASS_MAPPINGS = {
    node_id("CollectSAEActivations"): CollectSAEActivations,
    node_id("TrainSAE"): TrainSAE,
    node_id("SAeUronConceptFeatures"): SAeUronConceptFeatures,
    node_id("SAeUronConceptBlock"): SAeUronConceptBlock,
    node_id("DownloadSAE"): DownloadSAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("CollectSAEActivations"): "Collect SAE Activations",
    node_id("TrainSAE"): "Train SAE",
    node_id("SAeUronConceptFeatures"): "SAeUron Concept Features",
    node_id("SAeUronConceptBlock"): "SAeUron Concept Block",
    node_id("DownloadSAE"): "Download SAE (Hugging Face)",
}
