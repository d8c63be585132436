"""SAE tooling nodes: collect a block's activations, train an SAE on them, download a published SAE.

* **Collect SAE Activations** samples the wired model on a list of prompts (ComfyUI's own sampler,
  :mod:`.sampling`) and streams the output of one SpatialTransformer block into an activation store
  (``sae_core.store``) under ``output/sae_activations/<name>/`` through the SAeUron pipeline's
  collection step (``sae_core.saeuron.collect_activations``, the same as the MiniCanvas plug-in's);
  every row records the step index, the model timestep and sigma, cond/uncond and the prompt index.
  The hook sits on a clone of the MODEL only while the node samples.
* **Train SAE** trains a TopK SAE on such a store, or on a text-encoder store from Collect Text Activations
  (``nodes/text_sae.py``), through ``sae_core.store_training.train_sae_on_store`` and saves it in
  ``models/sae/<name>/`` (``cfg.json`` + ``sae.safetensors``). Cancel keeps a checkpoint in
  ``output/sae_training/<name>/<run>/`` (one per data and settings) that the next run continues.
* **Download SAE** fetches a published SAeUron checkpoint folder from the Hugging Face Hub into
  ``models/sae/`` (``sae_core.hub``).

Whether a store or checkpoint is reused, resumed or redone is decided by ``sae_core.artefacts.decide_artefact``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import folder_paths
from sae_core.artefacts import Action, ArtefactError, decide_artefact, load_json, save_json
from sae_core.config import TrainConfig
from sae_core.formats import WEIGHTS_NAME, save_sae
from sae_core.hub import check_hookpoint, check_repo_id, download_sae
from sae_core.prompts import parse_prompts
from sae_core.saeuron import BRANCHES, SOURCES, collect_activations
from sae_core.store import ActivationReader, ActivationWriter
from sae_core.store_training import train_sae_on_store

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
    throw_if_interrupted,
    torch_dtype,
)
from .families import model_family
from .folders import (dataset_folder, decide_store, forget_file_list, resolve_dataset, sae_output_folder,
                      training_folder)
from .sae_nodes import DEVICE_CHOICES, load_sae_cached
from .sampling import ComfyHost, ComfySampling, SamplerState, sampler_inputs
from .unet_blocks import find_block

log = logging.getLogger("concept_erasure")

DEFAULT_BLOCK = "output_blocks.4.1"
"""SAeUron's object block (diffusers ``up_blocks.1.attentions.1``); styles use ``output_blocks.5.1``."""

TOPK_CHOICES = ("batch", "token")
"""Train SAE's ``topk`` choices: BatchTopK during training (SAeUron) or per-token TopK (ItD)."""

_COLLECT_COLUMNS = {"step": "int32", "timestep": "float32", "sigma": "float32", "cond": "uint8",
                    "prompt_index": "int32", "position": "int32"}
"""Metadata columns of a collected store and their dtypes."""


class _WithSigma:
    """Adds the current sigma to each row the collection writes (it fills the other columns)."""

    def __init__(self, writer: ActivationWriter, state: SamplerState) -> None:
        self.writer = writer
        self.state = state
        self.columns = tuple(c for c in writer.columns if c != "sigma")

    def add(self, rows: Any, **meta: Any) -> None:
        self.writer.add(rows, sigma=self.state.sigma_value(), **meta)


def _rounded(sigmas: Any) -> list[float]:
    """Sigmas to 6 significant digits: the schedule computed on a GPU and on the CPU differs in the last bits."""
    return [float(f"{float(x):.6g}") for x in sigmas]


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), to compare with what a file records."""
    return json.loads(json.dumps(obj))


def _checkpoint_settings(marker: Path) -> Optional[dict]:
    """The settings a training checkpoint records; an unreadable marker counts as other settings."""
    try:
        return dict(load_json(marker, "training checkpoint settings"))
    except (OSError, ValueError, TypeError):
        return {"unreadable": str(marker)}


# ---------------------------------------------------------------------------------------------
# Collect SAE Activations
# ---------------------------------------------------------------------------------------------


class CollectSAEActivations:
    """Sample prompts and store one block's output tokens as SAE training data."""

    DESCRIPTION = (
        "Samples the model on each prompt and records the output (or, with source diff, the update: output minus "
        "input) of one SpatialTransformer block at every step "
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
                                       "block on SD1.x), output_blocks.5.1 (style block) or any other; on SDXL the "
                                       "published SAEs use input_blocks.8.1, middle_block.1, output_blocks.0.1 and "
                                       "output_blocks.1.1. Diffusers names (unet.up_blocks.1.attentions.1) and short "
                                       "names (up.1.1, mid.0) work too.", default=DEFAULT_BLOCK),
                **sampler_inputs(),
                "branch": inp(list(BRANCHES), "Which guidance rows to record: cond = the prompted half only (as "
                                              "SAeUron), both = the unconditional half too.", default="cond"),
                "dataset_name": inp("STRING", "Name of the store folder in output/sae_activations.",
                                    default="saeuron/activations"),
                "store_dtype": inp(["float16", "float32"], "Precision of the stored activations (float16 halves "
                                                           "the disk space).", default="float16"),
                "overwrite": inp("BOOLEAN", "Replace an existing complete store of this name that was collected "
                                            "with other settings (otherwise that is an error).", default=False),
            },
            "optional": {
                "source": inp(list(SOURCES), "What is recorded: output = the block's output (SAeUron); diff = its "
                                             "update, output minus input (the SDXL SAEs of sdxl-unbox). An SAE "
                                             "trained on the store remembers it.", default="output"),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def collect(self, model: Any, clip: Any, prompts: str, block: str, steps: int, cfg: float, seed: int,
                sampler_name: str, scheduler: str, width: int, height: int, branch: str = "cond",
                dataset_name: str = "saeuron/activations", store_dtype: str = "float16", overwrite: bool = False,
                source: str = "output", unique_id: Optional[str] = None) -> tuple[str]:
        prompt_list = parse_prompts(prompts)
        if not prompt_list:
            raise ValueError("prompts: give at least one prompt (one per line)")
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        ref = find_block(model, block)
        folder = dataset_folder(dataset_name)
        sampling = ComfySampling(model, clip, steps, cfg, sampler_name, scheduler, width, height, seed)
        sigmas, timesteps = sampling.run_schedule()
        family = model_family(model)
        settings = {"prompts": prompt_list, "block": ref.name, "steps": int(steps), "cfg": float(cfg),
                    "seed": int(seed), "sampler": sampler_name, "scheduler": scheduler, "width": int(width),
                    "height": int(height), "branch": branch, "store_dtype": store_dtype, "model_family": family,
                    "sigmas": _rounded(sigmas), "source": source}

        def normalise(found: dict) -> dict:  # stores written before the sigmas were rounded or the source recorded
            found = {"source": "output", **found}
            return {**found, "sigmas": _rounded(found["sigmas"])} if isinstance(found.get("sigmas"), list) else found

        decision = decide_store("Collect SAE Activations", folder, settings, overwrite, normalise)
        if decision.action is Action.REUSE:
            log.info("%s", decision.message)
            return (str(folder),)
        log.info("Collect SAE Activations: %s", "replacing the store at %s (overwrite is on)" % folder
                 if decision.action is Action.REDO else "collecting into %s" % folder)
        attrs = {"hookpoint": ref.name, "d": ref.width, "model_family": family, "settings": settings,
                 "prompts": prompt_list, "sigmas": sigmas, "timesteps": timesteps, "source": source,
                 "origin": node_id("CollectSAEActivations")}
        with Progress(len(prompt_list) * int(steps), desc="collect activations", node_id=unique_id) as bar:
            sampling.on_step = bar.update_absolute
            tokens_per_shard = max(1024, (256 << 20) // (ref.width * (2 if store_dtype == "float16" else 4)))
            with ActivationWriter(folder, d=ref.width, dtype=store_dtype, shard_tokens=tokens_per_shard,
                                  metadata_columns=_COLLECT_COLUMNS, attrs=attrs, overwrite=True) as writer:
                rows = collect_activations(ComfyHost(model, sampling), ref.name, prompt_list, int(steps),
                                           _WithSigma(writer, sampling.state), branch=branch, source=source,
                                           batch_size=1)
        log.info("Collect SAE Activations: %d rows of %s %s (%d wide) from %d prompts x %d steps -> %s",
                 rows, ref.name, "updates" if source == "diff" else "outputs", ref.width, len(prompt_list), steps,
                 folder)
        return (str(folder),)


# ---------------------------------------------------------------------------------------------
# Train SAE
# ---------------------------------------------------------------------------------------------


class TrainSAE:
    """Train a TopK SAE on a collected activation store."""

    DESCRIPTION = (
        "Trains a TopK sparse autoencoder (SAeUron's recipe: BatchTopK, AuxK for dead latents, Adam with a "
        "linearly decaying learning rate) on an activation store from Collect SAE Activations (a UNet block) or "
        "Collect Text Activations (a text-encoder layer, for ItD: set topk to token and whiten on) and saves it in "
        "models/sae/<filename>/ (cfg.json + sae.safetensors, the SAeUron layout). Cancel keeps a checkpoint "
        "(also a usable SAE) in output/sae_training/<filename>/<run>; queueing again with the same data and settings "
        "continues it (a higher steps value trains on from there); other data or settings start a new run beside it."
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
                "dataset_path": inp("STRING", "Activation store from Collect SAE Activations or Collect Text "
                                              "Activations (its output, an absolute folder, or a name in "
                                              "output/sae_activations).",
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
                "topk": inp(list(TOPK_CHOICES), "batch = BatchTopK over each training batch (SAeUron); token = "
                                                "k latents per token (ItD's text SAE). The saved SAE always uses "
                                                "per-token TopK.", default="batch"),
                "whiten": inp("BOOLEAN", "Train in whitened coordinates (fitted on the store) and fold the map into "
                                         "the saved SAE, which then reads raw activations. Gives every direction "
                                         "of the activations equal weight in the loss; helps text-encoder SAEs, "
                                         "whose residual stream has a few dominant directions.", default=False),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, dataset_path: str, expansion_factor: int, num_latents: int, k: int, steps: int, lr: float,
              batch_size: int, seed: int, filename: str, overwrite: bool = False,
              dead_feature_threshold: int = 10_000_000, device: str = "auto", topk: str = "batch",
              whiten: bool = False, unique_id: Optional[str] = None) -> tuple[Any, str]:
        folder = resolve_dataset(dataset_path)
        try:
            reader = ActivationReader(folder)
        except ValueError as err:
            raise ValueError(f"dataset_path: {err}") from err
        if len(reader) < int(batch_size):
            raise ValueError(f"batch_size: the store {folder} has only {len(reader)} rows, fewer than one batch of "
                             f"{batch_size}; collect more activations or lower batch_size")
        if topk not in TOPK_CHOICES:
            raise ValueError(f"topk must be one of {', '.join(TOPK_CHOICES)}, got {topk!r}")
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
                          dead_feature_threshold=int(dead_feature_threshold), batch_topk=topk == "batch",
                          checkpoint_every=max(10, int(steps) // 20), device=str(comfy_device(device)),
                          hookpoint=reader.attrs.get("hookpoint"), model_family=reader.attrs.get("model_family"))
        # The run's identity: the data (content fingerprint of the store, so a store collected again under the
        # same name is other data) and every training setting except the step count, so raising `steps`
        # continues the run. Each identity has its own checkpoint folder: nothing of another run is deleted.
        identity = _as_json({"dataset": str(folder), "dataset_fingerprint": reader.fingerprint, "tokens": len(reader),
                             "train_config": {k_: v for k_, v in cfg.to_dict().items()
                                              if k_ not in ("device", "checkpoint_every")},
                             **({"whiten": True} if whiten else {})})
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        runs = training_folder(filename)
        ckpt = runs / digest
        marker = ckpt / "settings.json"
        found = _checkpoint_settings(marker) if marker.is_file() else None
        decision = decide_artefact("Train SAE checkpoint", ckpt, identity, found, complete=False, resumable=True)
        others = sorted(p.parent.name for p in runs.glob("*/settings.json") if p.parent != ckpt)
        if decision.action is Action.RESUME:
            log.info("%s", decision.message)
        elif others:
            log.info("Train SAE: %s holds checkpoints of other data or settings (%s); they are kept, this run starts "
                     "in %s", runs, ", ".join(others), ckpt)
        save_json(marker, identity)

        with Progress(int(steps), desc="Train SAE", node_id=unique_id) as bar:
            try:
                sae, trainer, _ = train_sae_on_store(reader, cfg, int(steps), whiten=bool(whiten),
                                                     checkpoint_dir=ckpt, resume=True, should_stop=interrupt_requested,
                                                     on_step=lambda s, n, m: bar.update_absolute(s))
            except ArtefactError as err:
                if ckpt.resolve() not in Path(err.path).resolve().parents:
                    raise
                raise ValueError(f"Train SAE: the checkpoint of this run is damaged ({err}); delete the folder {ckpt} "
                                 "to train this run from the start") from err
        if trainer.interrupted:
            throw_if_interrupted()
            raise RuntimeError(f"SAE training stopped at step {trainer.step}; the checkpoint in {ckpt} continues "
                               "when the node is queued again")
        sae.requires_grad_(False)
        if reader.attrs.get("source") is not None:  # a UNet block's store: what the SAE reads (output or update)
            sae.cfg.extra["source"] = str(reader.attrs["source"])
        save_sae(sae, out, layout="folder")
        register_sae_folder()
        forget_file_list(SAE_FOLDER)
        last = trainer.history[-1] if trainer.history else {}
        log.info("Train SAE: %d steps on %s, fvu %.4g, dead %.3g -> %s", trainer.step, folder,
                 last.get("fvu", math.nan), last.get("dead_frac", math.nan), out)
        return (sae, str(out))


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
        label = f"{check_repo_id(repo_id)}/{check_hookpoint(hookpoint)}"
        target, precision = comfy_device(device), torch_dtype(dtype)

        def verify(folder: Path) -> Any:  # the check loads into the SAE cache, so the SAE is read once
            return load_sae_cached(str(folder / WEIGHTS_NAME), target, precision, label=label, wrap_errors=False)

        got = download_sae(repo_id, hookpoint, root, revision or None, verify=verify)
        register_sae_folder()
        forget_file_list(SAE_FOLDER)
        sae = load_sae_cached(str(got.folder / WEIGHTS_NAME), target, precision, label=label)
        if not getattr(sae.cfg, "hookpoint", None):  # SAeUron's cfg.json does not name its hook point
            # a shallow copy with its own config: the cached module (shared with Load SAE's outputs) is not touched
            sae = copy.copy(sae)
            sae.cfg = dataclasses.replace(sae.cfg, hookpoint=got.hookpoint.split("/")[-1])
        log.info("Download SAE: %s %s -> %s", label, "downloaded" if got.downloaded else "already present", got.folder)
        return (sae, str(got.folder))


NODE_CLASS_MAPPINGS = {
    node_id("CollectSAEActivations"): CollectSAEActivations,
    node_id("TrainSAE"): TrainSAE,
    node_id("DownloadSAE"): DownloadSAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("CollectSAEActivations"): "Collect SAE Activations",
    node_id("TrainSAE"): "Train SAE",
    node_id("DownloadSAE"): "Download SAE (Hugging Face)",
}
