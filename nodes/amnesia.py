"""Selective Amnesia nodes: Compute Fisher and LoRA Train.

Thin ComfyUI hosts of :mod:`sae_core.amnesia.pipeline` (the functions the MiniCanvas bench runs too):
each node reads its inputs into one :class:`~sae_core.amnesia.config.AmnesiaConfig` (an input and
the field it sets carry the same name), wraps the wired MODEL and CLIP in
:class:`ComfyAmnesiaHost`, calls the pipeline and wraps the result.

* **Selective Amnesia Compute Fisher** samples the wired model (ComfyUI's own sampler) on a set
  of prompts and estimates the diagonal Fisher information of the base weights of the LoRA
  targets (:func:`sae_core.amnesia.pipeline.estimate_fisher`) with the model's own noise
  schedule. Written to ``models/sae_fisher/<name>.safetensors``; the node returns the file's path.
* **Selective Amnesia LoRA Train** generates surrogate samples (surrogate prompts, one per line,
  each paired with the line of forget prompts it stands in for) and replay samples (remember
  prompts) with the wired model -- or takes them from a sample bank (``sample_bank``: a sample set
  in ``models/sae_samples``, Compute Fisher's samples, or the bank shipped for MiniCanvas) --
  then trains a LoRA with the Selective Amnesia objective (:func:`sae_core.amnesia.pipeline.train_forgetting_lora`): surrogate eps-MSE
  under the forget prompts + gamma * replay MSE + lambda * EWC, where the replay term regresses
  onto the wired model's own prediction (``replay_target`` ``base``, the default) or onto the
  drawn noise (``noise``, the reference). It returns the model with the LoRA applied through
  ComfyUI's LoRA loader, the LoRA in ComfyUI's ``LORA_MODEL`` format (save it with "Save LoRA
  Weights"; the stock LoraLoader then loads it from ``output/loras``) and the loss curves.

The input MODEL is never modified: training runs on a clone with weight wrappers
(``nodes/training.py``), sampling and the eps denoiser come from ``nodes/sampling.py``, prompts
are encoded by ``nodes/clip_text.py``.

Long work reports progress on the node, stops on Cancel and resumes: generated samples are
cached in ``output/selective_amnesia/<run>/`` and the LoRA trainer checkpoints there; the Fisher
file holds its running estimate and continues where it stopped. A Fisher file made with other
settings is computed again.

The Fisher comes from the ``fisher_path`` socket (Compute Fisher's output) or the ``fisher_file``
list (``models/sae_fisher``); the lists of both files include the ones shipped for MiniCanvas
(``minicanvas/...``, as Load SAE lists its SAEs), so the MiniCanvas Checkpoint's model trains on the
data of ``python -m sae_core bench --method amnesia``.

Supported: SD1.x/SD2.x/SDXL-style UNets with a discrete eps or v schedule (v-prediction models such as
SD2.x 768 are converted to eps), and the MiniCanvas family (32x32 pixel space). SDXL's ADM input ``y``
(pooled text + size/crop embeddings) is made by ComfyUI's own ``extra_conds`` from each prompt's pooled
output and the node's width/height, as the sampler makes it; it conditions the Fisher, the surrogate and
replay terms alike. Models with concat channels (inpainting) or other sampling (EDM, flow) are refused
with a message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

import folder_paths
from sae_core.amnesia import pipeline
from sae_core.amnesia.config import PRECISIONS, REPLAY_TARGETS, AmnesiaConfig
from sae_core.amnesia.fisher import load_fisher
from sae_core.amnesia.lora import TARGET_PRESETS, lora_state_dict
from sae_core.amnesia.pipeline import FisherTraining, LoRATraining
from sae_core.amnesia.samples import SampleSet, load_samples
from sae_core.amnesia.trainer import loss_curve_image
from sae_core.artefacts import save_json
from sae_core.plots import image_tensor
from sae_core.prompts import parse_prompts

from .clip_text import encode_prompts
from .common import (
    FISHER_FOLDER,
    SAMPLES_FOLDER,
    Progress,
    category,
    inp,
    interrupt_requested,
    node_id,
    register_model_folder,
    sampler_choices,
    shipped_path,
    throw_if_interrupted,
)
from .folders import NO_FILE, dropdown_names, safe_name
from .sampling import (
    adm_width,
    alphas_cumprod,
    check_conditioning_fits,
    comfy_sampler,
    discrete_eps_sampling,
    eps_denoiser,
    latent_shape,
    model_conditioning,
)
from .training import ComfyLoRA, GradientProbe, TrainingClone, compute_dtype, target_modules

log = logging.getLogger("concept_erasure")

RUN_FOLDER = "selective_amnesia"
"""Sub-folder of ComfyUI's output folder for sample caches and training checkpoints."""

FISHER_SAMPLES = "fisher_samples"
"""Run folder of Compute Fisher's samples (``output/selective_amnesia/fisher_samples``); a sample bank folder too."""

METHOD = "Selective Amnesia"

_FISHER_SETTINGS_KEY = "comfy_settings"


# ---------------------------------------------------------------------------------------------
# folders and names
# ---------------------------------------------------------------------------------------------


def register_fisher_folder() -> list[str]:
    """Register ``models/sae_fisher`` (``.safetensors`` files) with ``folder_paths``; idempotent."""
    return register_model_folder(FISHER_FOLDER, [os.path.join(folder_paths.models_dir, FISHER_FOLDER)], {".safetensors"})


def fisher_filenames() -> list[str]:
    """``none``, the Fisher shipped with MiniCanvas (``minicanvas/amnesia_fisher_xattn.safetensors``) and the files of
    the ``sae_fisher`` folders: the choices of LoRA Train's ``fisher_file``."""
    register_fisher_folder()
    return dropdown_names(FISHER_FOLDER)


def register_samples_folder() -> list[str]:
    """Register ``models/sae_samples`` and Compute Fisher's sample folder (``.safetensors``) with ``folder_paths``;
    idempotent."""
    return register_model_folder(SAMPLES_FOLDER, [os.path.join(folder_paths.models_dir, SAMPLES_FOLDER),
                                                  str(run_dir(FISHER_SAMPLES))], {".safetensors"})


def sample_bank_filenames() -> list[str]:
    """``none``, the sample bank shipped with MiniCanvas (``minicanvas/amnesia_bank.safetensors``) and the sample sets
    of the ``sae_samples`` folders (Compute Fisher's samples among them): the choices of LoRA Train's ``sample_bank``."""
    register_samples_folder()
    return dropdown_names(SAMPLES_FOLDER)


def load_sample_bank(name: str, model: Any) -> SampleSet:
    """The sample set ``name`` from :func:`sample_bank_filenames`, checked against the MODEL's latent channels.

    Raises FileNotFoundError naming the folders searched, ValueError (naming ``sample_bank``) for a file that is
    not a sample set or whose samples do not fit the model.
    """
    register_samples_folder()
    path = shipped_path(SAMPLES_FOLDER, name) or folder_paths.get_full_path(SAMPLES_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"sample_bank: {name!r} was not found in "
                                f"{', '.join(folder_paths.get_folder_paths(SAMPLES_FOLDER))}")
    try:
        with torch.inference_mode(False):  # the samples enter autograd: no inference tensors
            bank, _meta = load_samples(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"sample_bank: {err}") from err
    channels = model.get_model_object("latent_format").latent_channels
    if bank.samples.dim() != 4 or bank.samples.shape[1] != channels:
        raise ValueError(f"sample_bank: {name} holds samples of shape {tuple(bank.samples.shape[1:])}; this model's "
                         f"latents have {channels} channels (a bank holds samples of the model it trains, made by it)")
    return bank


def fisher_path_for(name: str) -> Path:
    """``models/sae_fisher/<name>.safetensors`` for the Fisher node's ``filename`` input."""
    folder = Path(folder_paths.models_dir) / FISHER_FOLDER
    return folder / f"{safe_name(name, 'filename')}.safetensors"


def resolve_fisher(path_or_name: str) -> Path:
    """An absolute Fisher path, a shipped name (``minicanvas/...``) or a name in the ``sae_fisher`` folders;
    FileNotFoundError otherwise."""
    text = (path_or_name or "").strip()
    if not text:
        raise FileNotFoundError("fisher_path is empty: wire the Compute Fisher node's output or pick a fisher_file "
                                "(or set lam to 0)")
    shipped = shipped_path(FISHER_FOLDER, text)
    if shipped is not None:
        return Path(shipped)
    p = Path(text)
    if p.is_absolute():
        if p.is_file():
            return p
        raise FileNotFoundError(f"fisher_path: file not found: {p}")
    register_fisher_folder()
    found = folder_paths.get_full_path(FISHER_FOLDER, text if text.endswith(".safetensors") else text + ".safetensors")
    if found is None:
        raise FileNotFoundError(f"fisher_path: {text!r} is neither an existing file nor a file in the "
                                f"{FISHER_FOLDER} folders ({', '.join(folder_paths.get_folder_paths(FISHER_FOLDER))})")
    return Path(found)


def run_dir(run_name: str) -> Path:
    """``output/selective_amnesia/<run_name>``."""
    return Path(folder_paths.get_output_directory()) / RUN_FOLDER / safe_name(run_name, "run_name")


# ---------------------------------------------------------------------------------------------
# the wired MODEL and CLIP as the pipeline's host
# ---------------------------------------------------------------------------------------------


def check_model(model: Any) -> Any:
    """The model's ``model_sampling`` if Selective Amnesia supports it; ValueError naming the model otherwise."""
    return discrete_eps_sampling(model, METHOD, allow_adm=True)


def model_fingerprint(model: Any) -> str:
    """Cheap identity of a MODEL: a few original weights plus its weight-patch layout."""
    keys = [k for k in model.model.state_dict() if k.startswith("diffusion_model.") and k.endswith(".weight")]
    pick = sorted(set(keys[:2] + keys[-2:] + [k for k in keys if "attn2.to_k" in k][:2]))
    h = hashlib.sha256(type(model.model).__name__.encode())
    patches = model.get_key_patches("diffusion_model.")
    for k in pick:
        w = patches[k][0][0]
        h.update(k.encode())
        h.update(w.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    for k in sorted(model.patches):
        h.update(f"{k}:{len(model.patches[k])}:{[p[0] for p in model.patches[k]]}".encode())
    return h.hexdigest()[:20]


class ComfyAmnesiaHost:
    """A ComfyUI MODEL + CLIP as :class:`sae_core.amnesia.pipeline.AmnesiaHost`.

    ``sampling`` holds :func:`nodes.sampling.comfy_sampler`'s settings (``steps``, ``cfg``,
    ``sampler_name``, ``scheduler``, ``width``, ``height``); the sampler is made on first use, so a
    run whose samples are cached never encodes its negative prompt. Training contexts load a
    :class:`~nodes.training.TrainingClone` of the model (fp32 or bf16 compute, ``precision``).
    """

    def __init__(self, model: Any, clip: Any, sampling: Optional[dict[str, Any]] = None) -> None:
        self.model = model
        self.clip = clip
        self.ms = check_model(model)
        check_conditioning_fits(model, clip, "clip")  # before minutes of sampling, not deep inside the UNet
        self.alphas_cumprod = alphas_cumprod(self.ms)
        self.device = torch.device(model.load_device)
        self.sampling = dict(sampling or {})
        self.adm = adm_width(model)
        self._sampler: Optional[Any] = None

    # Encoding and sampling need no gradients: they run as ComfyUI runs them, under inference mode (the weights of a
    # loaded checkpoint are inference tensors, which autograd must not see), and the results are cloned out of it so
    # that training may use them.
    # A model with an ADM input (SDXL) gets each prompt's y (pooled text + the size embeddings of the sampling's
    # width/height, made by ComfyUI's extra_conds) packed after its token conditioning: the pipeline carries one
    # tensor row per prompt, the denoiser unpacks it.
    def encode(self, prompts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            if self.adm:
                if "width" not in self.sampling or "height" not in self.sampling:
                    raise ValueError("width/height: the size conditioning of this model's ADM input needs them")
                out = model_conditioning(self.model, self.clip, list(prompts), self.sampling["width"],
                                         self.sampling["height"])
            else:
                out = encode_prompts(self.clip, list(prompts))
        return out.clone()

    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        with torch.inference_mode():  # the sampler encodes its negative prompt when it is made
            if self._sampler is None:
                self._sampler = comfy_sampler(self.model, self.clip, **self.sampling)
            out = self._sampler(prompts, seeds)
        return out.clone()

    # The training contexts run outside inference mode whatever their caller does: the trainable tensors are made
    # there, and ComfyUI's loads and unloads happen under inference mode inside TrainingClone (nodes/training.py).
    @contextmanager
    def lora_training(self, config: AmnesiaConfig, generator: torch.Generator) -> Iterator[LoRATraining]:
        with torch.inference_mode(False):
            adapters = {n: ComfyLoRA(tuple(m.weight.shape), config.rank, config.alpha, device=self.device,
                                     generator=generator)
                        for n, m in target_modules(self.model, config.targets).items()}
            with TrainingClone(self.model, adapters, config.precision) as patcher:
                yield LoRATraining(eps_denoiser(patcher, self.ms, self.adm), adapters)

    @contextmanager
    def fisher_training(self, config: AmnesiaConfig) -> Iterator[FisherTraining]:
        with torch.inference_mode(False):
            modules = target_modules(self.model, config.targets)
            probes = {n: GradientProbe(tuple(m.weight.shape), self.device) for n, m in modules.items()}
            with TrainingClone(self.model, probes, config.precision) as patcher:
                yield FisherTraining(eps_denoiser(patcher, self.ms, self.adm), {f"{n}.weight": probes[n].delta for n in modules})


def _sampling(sample_steps: int, cfg: float, sampler_name: str, scheduler: str, width: int, height: int) -> dict[str, Any]:
    return {"steps": int(sample_steps), "cfg": float(cfg), "sampler_name": sampler_name, "scheduler": scheduler,
            "width": int(width), "height": int(height)}


# ---------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------


def _sampler_inputs() -> dict[str, tuple]:
    samplers, schedulers = sampler_choices()
    return {
        "sample_steps": inp("INT", "Sampling steps used to generate the training samples.", default=20, min=1, max=200),
        "cfg": inp("FLOAT", "Classifier-free guidance scale of the generated samples (the reference uses 7.5).",
                   default=7.5, min=0.0, max=30.0, step=0.1, round=0.01),
        "sampler_name": inp(samplers, "Sampler used to generate the training samples.", default="euler"),
        "scheduler": inp(schedulers, "Scheduler used to generate the training samples.", default="normal"),
        "width": inp("INT", "Width of the generated samples in pixels (SD1.x: 512, MiniCanvas: 32).", default=512, min=8,
                     max=4096, step=8),
        "height": inp("INT", "Height of the generated samples in pixels (SD1.x: 512, MiniCanvas: 32).", default=512, min=8,
                      max=4096, step=8),
    }


class SAComputeFisher:
    """Selective Amnesia Compute Fisher (see the module docstring)."""

    DESCRIPTION = (
        "Estimates the diagonal Fisher information of the model's weights that a Selective Amnesia LoRA will "
        "adapt. Generates samples of the prompts with the model itself, then squares per-sample gradients of the "
        "noise-prediction loss summed over timesteps (scaled to the 1000-step reference, so lambda = 50 keeps its "
        "meaning). The file goes to models/sae_fisher; stopping and re-running continues where it stopped."
    )
    CATEGORY = category("selective_amnesia")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("fisher_path",)
    OUTPUT_TOOLTIPS = ("Absolute path of the Fisher file (safetensors); wire it into Selective Amnesia LoRA Train.",)
    FUNCTION = "compute"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": inp("MODEL", "The base model the LoRA will be trained on (the Fisher belongs to these exact weights)."),
                "clip": inp("CLIP", "Text encoder used to encode the prompts."),
                "prompts": inp("STRING", "Diverse prompts, one per line, describing what the model should keep doing well.",
                               multiline=True, default="a photo of a dog\na landscape painting\na portrait of a woman\na city street at night"),
                "samples": inp("INT", "How many samples to generate and average (prompts are cycled). The reference uses 5000; a few hundred is a usable estimate.",
                               default=100, min=1, max=100000),
                "timesteps_per_sample": inp("INT", "K stratified timesteps per sample (1000 = the reference's full sum; fewer is faster and scaled to the same level).",
                                            default=50, min=1, max=1000),
                "timestep_batch": inp("INT", "Timesteps per backward pass (lower it if memory runs out; the result is the same "
                                      "gradient of the sum).", default=10, min=1, max=1000),
                "targets": inp(list(TARGET_PRESETS), "Which weights the LoRA adapts: xattn = cross-attention (identities, objects), "
                               "noxattn = everything but cross-attention (nudity, styles), full = all layers.", default="xattn"),
                "seed": inp("INT", "Seed of the sample noise and of the timesteps/noise of the estimate.", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False),
                **_sampler_inputs(),
                "precision": inp(list(PRECISIONS), "Compute precision of the gradients (fp32 is exact; bf16 saves memory).", default="fp32"),
                "filename": inp("STRING", "File name in models/sae_fisher (without .safetensors). An existing file with the same settings is reused or continued.",
                                default="selective_amnesia/fisher"),
            },
            "optional": {
                "overwrite": inp("BOOLEAN", "Replace a file of that name computed with other settings (or unreadable). Off: "
                                 "such a file is kept and the node stops with what differs. On: the old file stays until "
                                 "the new estimate is complete, then is replaced.", default=False),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def compute(self, model: Any, clip: Any, prompts: str, samples: int, timesteps_per_sample: int, timestep_batch: int,
                targets: str, seed: int,
                sample_steps: int, cfg: float, sampler_name: str, scheduler: str, width: int, height: int,
                precision: str, filename: str, overwrite: bool = False, unique_id: Optional[str] = None) -> tuple[str]:
        host = ComfyAmnesiaHost(model, clip, _sampling(sample_steps, cfg, sampler_name, scheduler, width, height))
        k = min(int(timesteps_per_sample), int(host.alphas_cumprod.numel()))
        settings = AmnesiaConfig(targets=targets, seed=int(seed), precision=precision, timesteps_per_sample=k,
                                 timestep_batch=int(timestep_batch), checkpoint_every=10)
        prompt_list = parse_prompts(prompts)
        if not prompt_list:
            raise ValueError("prompts: give at least one prompt (one per line)")
        out_path = fisher_path_for(filename)
        identity = {"model": model_fingerprint(model), "prompts": prompt_list, "samples": int(samples), "seed": int(seed),
                    "sample_steps": int(sample_steps), "cfg": float(cfg), "sampler": sampler_name, "scheduler": scheduler,
                    "width": int(width), "height": int(height), "targets": targets, "precision": precision,
                    "timestep_batch": int(timestep_batch)}
        if precision == "fp32" and compute_dtype(model) != torch.float32:
            # a half-precision checkpoint: fp32 gradients since the precision fix; an estimate made before it (same
            # settings, fp16/bf16 gradients) must not be reused as this one
            identity["gradients"] = "float32"
        # the Fisher's own name (sub-folders kept): 'a/b' and 'a_b' are two Fishers with two sample sets
        cache = run_dir(FISHER_SAMPLES) / f"{safe_name(filename, 'filename')}.safetensors"
        progress = Progress(2 * int(samples), desc="Fisher", node_id=unique_id)

        def data() -> SampleSet:
            out = pipeline.fisher_samples(host, prompt_list, int(samples), int(seed), cache, identity,
                                          should_stop=interrupt_requested,
                                          callback=lambda c, n: progress.update_absolute(c))
            progress.update_absolute(int(samples))
            return out

        try:
            with torch.inference_mode(False):
                est = pipeline.estimate_fisher(
                    host, settings, data, int(samples), out_path,
                    identity={_FISHER_SETTINGS_KEY: json.dumps(identity, sort_keys=True)},
                    metadata={"targets_preset": targets, "origin": "CE_SAComputeFisher"}, redo_different=bool(overwrite),
                    should_stop=interrupt_requested, callback=lambda c, n: progress.update_absolute(int(samples) + c))
        except InterruptedError:
            throw_if_interrupted()
            raise
        finally:
            progress.close()
        if est.stopped:
            throw_if_interrupted()
            raise RuntimeError("Fisher computation stopped before the end; queue the node again to continue")
        return (str(out_path),)


class SALoRATrain:
    """Selective Amnesia LoRA Train (see the module docstring)."""

    DESCRIPTION = (
        "Trains a LoRA that makes the model forget a concept with Selective Amnesia: the forget prompts learn to "
        "produce surrogate images (generated from the surrogate prompt), generative replay on the remember prompts "
        "keeps other concepts, and an EWC penalty (the Fisher file) keeps important weights close to the base. "
        "The input model is not modified. Cancel and re-queue to resume from the last checkpoint."
    )
    CATEGORY = category("selective_amnesia")
    RETURN_TYPES = ("MODEL", "LORA_MODEL", "IMAGE")
    RETURN_NAMES = ("model", "lora", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The input model with the trained LoRA applied as weight patches (strength 1).",
        "The LoRA (ComfyUI's LORA_MODEL format; save it with Save LoRA Weights to use it with LoraLoader later).",
        "Loss curves of the training: total, surrogate, replay and EWC terms.",
    )
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": inp("MODEL", "The base model (the one the Fisher was computed for)."),
                "clip": inp("CLIP", "Text encoder for the prompts."),
                "forget_prompts": inp("STRING", "What to forget. Comma-separated prompts or keywords; one is drawn per training "
                                      "example. With several surrogate prompts, one line per surrogate prompt: line i is "
                                      "what surrogate prompt i stands in for (a single line is shared by all).",
                                      multiline=True, default="brad pitt"),
                "surrogate_prompt": inp("STRING", "What the forget prompts should produce instead (e.g. 'a middle aged man'); "
                                        "several prompts, one per line, pair with the lines of forget_prompts (e.g. 'a star "
                                        "in dotted style' standing in for 'a star in striped style').",
                                        multiline=True, default="a middle aged man"),
                "remember_prompts": inp("STRING", "Prompts to keep intact, one per line (generative replay).", multiline=True,
                                        default="a photo of a dog\na landscape painting\na portrait of a woman\na city street at night"),
                "lam": inp("FLOAT", "EWC weight lambda (reference: 50 with a Fisher on the reference scale, which Compute Fisher keeps; 0 disables "
                           "EWC). If the loss curve shows the surrogate term not falling, the penalty is too strong: lower it.",
                           default=50.0, min=0.0, max=1e9, step=0.1),
                "gamma": inp("FLOAT", "Weight of the replay term (reference: 1; 0 disables replay).", default=1.0, min=0.0, max=100.0, step=0.05),
                "rank": inp("INT", "LoRA rank.", default=8, min=1, max=256),
                "steps": inp("INT", "Optimiser steps (raise it and re-queue to continue a finished run).", default=500, min=1, max=1000000),
                "lr": inp("FLOAT", "AdamW learning rate.", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=1e-7),
                "batch_size": inp("INT", "Surrogate examples per step (as many replay examples are added).", default=2, min=1, max=64),
                "seed": inp("INT", "Seed of the LoRA initialisation, the sample noise and the training draws.", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False),
                "targets": inp(list(TARGET_PRESETS), "Weights the LoRA adapts; the Fisher must cover them (same preset as Compute Fisher).", default="xattn"),
                "surrogate_samples": inp("INT", "Surrogate images to generate (or take from the sample bank) per surrogate prompt.",
                                         default=32, min=1, max=10000),
                "replay_per_prompt": inp("INT", "Replay images to generate (or take from the sample bank) per remember prompt.",
                                         default=8, min=1, max=1000),
                **_sampler_inputs(),
                "precision": inp(list(PRECISIONS), "Compute precision of the UNet while training (bf16 saves memory).", default="bf16"),
                "run_name": inp("STRING", "Folder in output/selective_amnesia for the sample cache and checkpoints (resume).",
                                default="run"),
            },
            "optional": {
                "fisher_path": inp("STRING", "Fisher file from Selective Amnesia Compute Fisher (path or name in models/sae_fisher). "
                                   "Needed when lam > 0, unless fisher_file names one.", forceInput=True),
                "replay_target": inp(list(REPLAY_TARGETS), "What the replay term regresses onto: 'base' = the base model's own "
                                     "prediction for the same noisy replay image (tighter retention, one extra forward pass per "
                                     "step); 'noise' = the drawn noise, as the reference does.", default="base"),
                "weight_decay": inp("FLOAT", "AdamW weight decay of the LoRA factors (pulls the LoRA towards zero, i.e. the "
                                    "model towards the base; the reference's AdamW has 0.01).", default=0.01, min=0.0, max=10.0,
                                    step=0.001, round=1e-6),
                "fisher_file": inp(fisher_filenames(), "Fisher file to use instead of wiring fisher_path: a file in "
                                   "models/sae_fisher, or the one shipped for MiniCanvas (minicanvas/amnesia_fisher_xattn: "
                                   "its cross-attention, as the bench computes it). 'none': the fisher_path input.",
                                   default=NO_FILE),
                "sample_bank": inp(sample_bank_filenames(), "Take the surrogate and replay images from a bank of the model's own "
                                   "samples instead of generating them (every prompt must be in it): the bank shipped for "
                                   "MiniCanvas (minicanvas/amnesia_bank: every MiniCanvas prompt, seeds 1000-1001, the bench's "
                                   "data), a sample set in models/sae_samples, or the samples Compute Fisher made (the "
                                   "reference replays its Fisher data). 'none': generate them with the sampler settings.",
                                   default=NO_FILE),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model: Any, clip: Any, forget_prompts: str, surrogate_prompt: str, remember_prompts: str, lam: float,
              gamma: float, rank: int, steps: int, lr: float, batch_size: int, seed: int, targets: str, surrogate_samples: int,
              replay_per_prompt: int, sample_steps: int, cfg: float, sampler_name: str, scheduler: str, width: int,
              height: int, precision: str, run_name: str, fisher_path: Optional[str] = None,
              replay_target: str = "base", weight_decay: float = 0.01, fisher_file: str = NO_FILE,
              sample_bank: str = NO_FILE, unique_id: Optional[str] = None) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
        host = ComfyAmnesiaHost(model, clip, _sampling(sample_steps, cfg, sampler_name, scheduler, width, height))
        # every setting is checked here, before minutes of sampling
        settings = AmnesiaConfig(
            forget_prompts=forget_prompts, surrogate_prompt=surrogate_prompt, remember_prompts=remember_prompts,
            surrogate_samples=int(surrogate_samples), replay_per_prompt=int(replay_per_prompt), targets=targets,
            rank=int(rank), steps=int(steps), lr=float(lr), batch_size=int(batch_size), lam=float(lam), gamma=float(gamma),
            weight_decay=float(weight_decay), seed=int(seed), replay_target=replay_target, precision=precision,
            checkpoint_every=max(10, int(steps) // 20))
        fisher = _load_fisher(_fisher_choice(fisher_path, fisher_file)) if settings.lam > 0 else None
        bank = load_sample_bank(sample_bank, model) if (sample_bank or NO_FILE) != NO_FILE else None
        if bank is not None and host.adm:
            _check_bank_size(bank, model, width, height)
        folder = run_dir(run_name)
        if folder == run_dir(FISHER_SAMPLES) or run_dir(FISHER_SAMPLES) in folder.parents:
            raise ValueError(f"run_name: '{run_name}' is the folder of Compute Fisher's samples; choose another name")
        sampling = {"model": model_fingerprint(model), "steps": int(sample_steps), "cfg": float(cfg), "sampler": sampler_name,
                    "scheduler": scheduler, "width": int(width), "height": int(height)}
        n_gen = 0 if bank is not None else len(settings.surrogate_prompts) * settings.surrogate_samples + (
            len(settings.remember_prompts) * settings.replay_per_prompt if settings.gamma > 0 else 0)
        progress = Progress(n_gen + settings.steps, desc="Selective Amnesia", node_id=unique_id)
        forget = forget_prompt_list(settings.forget_prompts)
        try:
            with torch.inference_mode(False):
                data = pipeline.training_samples(host, settings, folder, sampling, bank=bank, should_stop=interrupt_requested,
                                                 callback=lambda c, n: progress.update_absolute(c),
                                                 checkpoint=folder / "checkpoint.safetensors")
                progress.update_absolute(n_gen)
                run = pipeline.train_forgetting_lora(
                    host, settings, data.surrogate, data.replay, fisher, checkpoint=folder / "checkpoint.safetensors",
                    should_stop=interrupt_requested, callback=lambda s, n, rec: progress.update_absolute(n_gen + s))
                if run.result.stopped:
                    throw_if_interrupted()
                    raise RuntimeError("training stopped before the end; queue the node again to resume from the checkpoint")
                lora = {k: v.detach().to("cpu", torch.float32).clone() for k, v in lora_state_dict(run.adapters).items()}
                patched = apply_lora(model, lora)
                curve = loss_curve_image(run.result.history, title=f"Selective Amnesia: {', '.join(forget)[:60]}")
                image = image_tensor(curve)
        except InterruptedError:
            throw_if_interrupted()
            raise
        finally:
            progress.close()
        _write_summary(folder, run.result.history, forget, settings.surrogate_prompt, list(settings.remember_prompts))
        return (patched, lora, image)


def _check_bank_size(bank: SampleSet, model: Any, width: int, height: int) -> None:
    """A model with size conditioning (SDXL) trains a bank's samples under ``width`` x ``height``: they must be that size."""
    shape = latent_shape(model, width, height)
    if tuple(bank.samples.shape[2:]) != tuple(shape[2:]):
        raise ValueError(f"sample_bank: its samples are {tuple(bank.samples.shape[2:])} latent cells, width/height "
                         f"{width}x{height} make {tuple(shape[2:])}; this model is conditioned on the image size, so set "
                         "width/height to the size the bank was sampled at")


def forget_prompt_list(forget: Any) -> list[str]:
    """Every forget prompt of a config's ``forget_prompts`` (a tuple, or a mapping from surrogate prompts), in order."""
    if isinstance(forget, dict):
        return list(dict.fromkeys(p for group in forget.values() for p in group))
    return list(forget)


def _fisher_choice(fisher_path: Optional[str], fisher_file: Optional[str]) -> str:
    """The Fisher named by the ``fisher_path`` socket or the ``fisher_file`` choice (not both)."""
    wired = (fisher_path or "").strip()
    chosen = fisher_file if fisher_file and fisher_file != NO_FILE else ""
    if wired and chosen:
        raise ValueError(f"fisher_path is wired and fisher_file is {chosen!r}: give the Fisher one way (set fisher_file "
                         "to 'none' to use the wired path)")
    return wired or chosen


def _load_fisher(fisher_path: Optional[str]) -> dict[str, torch.Tensor]:
    path = resolve_fisher(fisher_path or "")
    try:
        with torch.inference_mode(False):  # the Fisher enters autograd (EWC): no inference tensors
            return load_fisher(path).fisher
    except ValueError as err:
        raise ValueError(f"fisher_path: {err}") from err


def apply_lora(model: Any, lora: dict[str, torch.Tensor], strength: float = 1.0) -> Any:
    """A clone of ``model`` with ``lora`` applied by ComfyUI's own loader (``comfy.sd.load_lora_for_models``).

    Raises ValueError if the loader did not patch one weight per LoRA module (a key it did not understand).
    """
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    modules = {k[: -len(".lora_up.weight")] for k in lora if k.endswith(".lora_up.weight")}
    added = sum(len(v) - len(model.patches.get(k, ())) for k, v in patched.patches.items())
    if added != len(modules):
        raise ValueError(f"LoRA: ComfyUI's loader patched {added} weights for {len(modules)} LoRA modules")
    return patched


def _write_summary(folder: Path, history: list[dict[str, float]], forget: list[str], surrogate: str, remember: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"forget_prompts": forget, "surrogate_prompt": surrogate, "remember_prompts": remember,
           "steps": len(history), "final": history[-1] if history else None}
    save_json(folder / "summary.json", doc, sort_keys=False)


register_fisher_folder()
register_samples_folder()

NODE_CLASS_MAPPINGS = {
    node_id("SAComputeFisher"): SAComputeFisher,
    node_id("SALoRATrain"): SALoRATrain,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("SAComputeFisher"): "Selective Amnesia Compute Fisher",
    node_id("SALoRATrain"): "Selective Amnesia LoRA Train",
}
