"""Selective Amnesia nodes: Compute Fisher and LoRA Train.

* **Selective Amnesia Compute Fisher** samples the wired model (ComfyUI's own sampler) on a set
  of prompts and estimates the diagonal Fisher information of the base weights of the LoRA
  targets (``sae_core.fisher``: per-sample gradient of the eps-MSE summed over stratified
  timesteps, scaled by T/K, squared per sample) with the model's own noise schedule. Written
  to ``models/sae_fisher/<name>.safetensors``; the node returns the file's path.
* **Selective Amnesia LoRA Train** generates surrogate samples (surrogate prompt) and replay
  samples (remember prompts) with the wired model, then trains a LoRA with the Selective
  Amnesia objective (``sae_core.amnesia``): surrogate eps-MSE under the forget prompts +
  gamma * replay MSE + lambda * EWC, where the replay term regresses onto the wired model's own
  prediction (``replay_target`` ``base``, the default) or onto the drawn noise (``noise``, the
  reference). It returns the model with the LoRA applied as regular
  weight patches, the LoRA in ComfyUI's ``LORA_MODEL`` format (save it with "Save LoRA
  Weights"; the stock LoraLoader then loads it from ``output/loras``) and the loss curves.

How the model is handled: the input MODEL is never modified. Training runs on a ``clone()``
whose target weights get weight wrappers (``add_weight_wrapper``) holding the LoRA factors (or,
for the Fisher, a zero "probe" whose gradient equals the gradient of the base weight); every
other weight gets an identity wrapper so ComfyUI hands the layers a fresh copy of their weight
(weights loaded by a node are inference tensors, which autograd cannot save for backward).
Everything runs under ``torch.inference_mode(False)``; the wrappers are removed and the
training clone unloaded afterwards.

Long work reports progress on the node, stops on Cancel and resumes: generated samples are
cached in ``output/selective_amnesia/<run>/`` and the LoRA trainer checkpoints there; the Fisher
file holds its running estimate and continues where it stopped.

Supported: SD1.x/SD2.x-style UNets with a discrete eps or v schedule and no extra conditioning
(SDXL's pooled-text vector, inpainting channels, ...); anything else is refused with a message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

import folder_paths
from sae_core.amnesia import REPLAY_TARGETS, AmnesiaConfig, AmnesiaTrainer, SampleSet, cached_samples, generate_samples, loss_curve_image
from sae_core.fisher import compute_fisher, eps_mse_loss_fn, load_fisher
from sae_core.artefacts import save_json
from sae_core.prompts import parse_names, parse_prompts
from sae_core.lora import TARGET_PRESETS, LoRADelta, lora_state_dict, select_targets

from .common import Progress, category, inp, interrupt_requested, node_id, sampler_choices, throw_if_interrupted

log = logging.getLogger("concept_erasure")

FISHER_FOLDER = "sae_fisher"
"""Model folder of Fisher files: ``ComfyUI/models/sae_fisher``."""

RUN_FOLDER = "selective_amnesia"
"""Sub-folder of ComfyUI's output folder for sample caches and training checkpoints."""

PRECISIONS = ("fp32", "bf16")
"""Compute precision of the UNet while computing gradients."""

_FISHER_SETTINGS_KEY = "comfy_settings"


# ---------------------------------------------------------------------------------------------
# folders and names
# ---------------------------------------------------------------------------------------------


def register_fisher_folder() -> list[str]:
    """Register ``models/sae_fisher`` (``.safetensors`` files) with ``folder_paths``; idempotent."""
    default = os.path.join(folder_paths.models_dir, FISHER_FOLDER)
    table = folder_paths.folder_names_and_paths
    paths, exts = table.get(FISHER_FOLDER, ([], set()))
    new_paths = list(paths) + ([default] if default not in paths else [])
    new_exts = set(exts) | {".safetensors"}
    if FISHER_FOLDER not in table or new_paths != list(paths) or new_exts != set(exts):
        table[FISHER_FOLDER] = (new_paths, new_exts)
        cache = getattr(folder_paths, "filename_list_cache", None)
        if isinstance(cache, dict):
            cache.pop(FISHER_FOLDER, None)
    return new_paths


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-/]*$")


def _safe_name(name: str, what: str) -> str:
    """A relative file/folder name without traversal; ValueError naming the input otherwise."""
    name = (name or "").strip().replace("\\", "/")
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    parts = [p for p in name.split("/") if p]
    if not parts or not _NAME_RE.match(name) or any(p in (".", "..") for p in parts):
        raise ValueError(f"{what}: {name!r} is not a usable name (letters, digits, space, _ . - and / for sub-folders)")
    return "/".join(parts)


def fisher_path_for(name: str) -> Path:
    """``models/sae_fisher/<name>.safetensors`` for the Fisher node's ``filename`` input."""
    folder = Path(folder_paths.models_dir) / FISHER_FOLDER
    return folder / f"{_safe_name(name, 'filename')}.safetensors"


def resolve_fisher(path_or_name: str) -> Path:
    """An absolute Fisher path, or a name in the ``sae_fisher`` folders; FileNotFoundError otherwise."""
    text = (path_or_name or "").strip()
    if not text:
        raise FileNotFoundError("fisher_path is empty: wire the Compute Fisher node's output (or set lam to 0)")
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
    return Path(folder_paths.get_output_directory()) / RUN_FOLDER / _safe_name(run_name, "run_name")


# ---------------------------------------------------------------------------------------------
# the model as an eps denoiser
# ---------------------------------------------------------------------------------------------


def check_model(model: Any) -> Any:
    """The model's ``model_sampling`` if Selective Amnesia supports it; ValueError naming the model otherwise."""
    import comfy.model_sampling

    base = model.model
    ms = model.get_model_object("model_sampling")
    kind = type(base).__name__
    if not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(ms, comfy.model_sampling.EPS):
        raise ValueError(f"model: Selective Amnesia needs a discrete-timestep eps/v model (SD1.x/SD2.x); "
                         f"{kind} with {type(ms).__name__} is not supported")
    for bad in (comfy.model_sampling.EDM, comfy.model_sampling.X0):
        if isinstance(ms, bad):
            raise ValueError(f"model: {kind} uses {bad.__name__} sampling, which Selective Amnesia does not support")
    if getattr(base, "adm_channels", 0) or getattr(base, "concat_keys", ()):
        raise ValueError(f"model: {kind} needs extra conditioning (pooled text / concat channels: SDXL, inpainting, ...); "
                         "Selective Amnesia supports SD1.x/SD2.x UNets")
    if not hasattr(base, "diffusion_model"):
        raise ValueError(f"model: {kind} has no diffusion_model")
    return ms


def alphas_cumprod(ms: Any) -> torch.Tensor:
    """abar_t of the model's own schedule (``sigma_t^2 = (1 - abar_t) / abar_t``), fp32 on the CPU."""
    sigmas = ms.sigmas.detach().to("cpu", torch.float32)
    return 1.0 / (1.0 + sigmas * sigmas)


def eps_denoiser(patcher: Any, ms: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``eps(x_t, t, context)`` in DDPM form through ``BaseModel.apply_model`` (works for eps and v models).

    ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` becomes ComfyUI's ``x_sigma = x_t / sqrt(abar)``
    at ``sigma_t``; the model's x0 prediction gives back ``eps = (x_sigma - x0) / sigma``.
    """
    abar = alphas_cumprod(ms)

    def eps(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        a = abar.to(x_t.device)[t.to(x_t.device)].view(-1, *([1] * (x_t.dim() - 1)))
        sigma = ((1.0 - a) / a).sqrt()
        x_sigma = x_t.float() / a.sqrt()
        x0 = patcher.model.apply_model(x_sigma, sigma.view(-1), c_crossattn=context, transformer_options={})
        return (x_sigma - x0.float()) / sigma

    return eps


def encode_prompts(clip: Any, prompts: list[str]) -> torch.Tensor:
    """CLIP conditioning ``[N, L, D]`` of each prompt (ValueError if lengths differ)."""
    rows = []
    for p in prompts:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(p))
        rows.append(cond[0][0].detach().to("cpu", torch.float32).clone())
    shapes = {tuple(r.shape[1:]) for r in rows}
    if len(shapes) > 1:
        raise ValueError(f"prompts encode to different lengths {sorted(shapes)}; keep every prompt under 75 tokens")
    return torch.cat(rows) if rows else torch.zeros(0)


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


# ---------------------------------------------------------------------------------------------
# sampling with ComfyUI
# ---------------------------------------------------------------------------------------------


def comfy_sampler(model: Any, clip: Any, steps: int, cfg: float, sampler_name: str, scheduler: str,
                  width: int, height: int, negative: str = "") -> Callable[[list[str], list[int]], torch.Tensor]:
    """``sampler(prompts, seeds) -> [B, C, h, w]`` model-space latents (``process_latent_in`` applied).

    Each row's noise comes from its own seed, so rows do not depend on how they are batched.
    """
    import comfy.sample

    neg = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    conds: dict[str, Any] = {}
    channels = model.get_model_object("latent_format").latent_channels
    shape = (1, channels, height // 8, width // 8)

    def sampler(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        out: list[Optional[torch.Tensor]] = [None] * len(prompts)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        for p, rows in groups.items():
            if p not in conds:
                conds[p] = clip.encode_from_tokens_scheduled(clip.tokenize(p))
            latent = torch.zeros((len(rows), *shape[1:]))
            noise = torch.cat([comfy.sample.prepare_noise(torch.zeros(shape), int(seeds[i])) for i in rows])
            x = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, conds[p], neg, latent,
                                    disable_pbar=True, seed=int(seeds[rows[0]]))
            x = model.model.process_latent_in(x.to(torch.float32))
            for j, i in enumerate(rows):
                out[i] = x[j].detach().to("cpu", torch.float32).clone()
        return torch.stack(out)  # type: ignore[arg-type]

    return sampler


# ---------------------------------------------------------------------------------------------
# training clones
# ---------------------------------------------------------------------------------------------


class _CopyWeight:
    """Identity weight wrapper: makes ComfyUI pass the layer a fresh copy of its weight."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class _Probe(torch.nn.Module):
    """``w -> w + 0``: the gradient w.r.t. the zero delta is the gradient w.r.t. the base weight."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        super().__init__()
        self.delta = torch.nn.Parameter(torch.zeros(shape, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype)

    def move_to(self, device: Any = None) -> int:
        self.to(device=device)
        return self.delta.numel() * self.delta.element_size()


class _ComfyLoRA(LoRADelta):
    """A :class:`LoRADelta` with the memory hooks ComfyUI calls on weight functions."""

    def move_to(self, device: Any = None) -> int:
        self.to(device=device)
        return self.passive_memory_usage()

    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


class TrainingClone:
    """A clone of ``model`` whose ``targets`` carry given weight wrappers (identity wrappers elsewhere).

    Use as a context manager inside ``torch.inference_mode(False)``: on entry the clone is
    loaded (full load); on exit the wrappers are removed from the shared modules, the clone is
    unloaded and the base parameters' ``requires_grad`` flags are restored.
    """

    def __init__(self, model: Any, wrappers: dict[str, torch.nn.Module], precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.patcher = model.clone()
        if precision == "bf16":
            self.patcher.set_model_compute_dtype(torch.bfloat16)
        self.functions: list[Any] = []
        copy_fn = _CopyWeight()
        for name, module in self.patcher.model.named_modules():
            if not hasattr(module, "weight_function") or getattr(module, "weight", None) is None:
                continue
            key = f"{name}.weight"
            fn = wrappers.get(name, copy_fn)
            self.patcher.add_weight_wrapper(key, fn)
            if getattr(module, "bias", None) is not None:
                self.patcher.add_weight_wrapper(f"{name}.bias", copy_fn)
        self.functions = list(wrappers.values()) + [copy_fn]
        self._flags: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self) -> Any:
        import comfy.model_management as mm

        self._flags = [(p, p.requires_grad) for p in self.patcher.model.parameters()]
        for p, _ in self._flags:
            p.requires_grad_(False)
        mm.load_models_gpu([self.patcher], memory_required=0, force_full_load=True)
        return self.patcher

    def __exit__(self, *exc: Any) -> None:
        import comfy.model_management as mm

        mine = {id(f) for f in self.functions}
        for module in self.patcher.model.modules():
            for attr in ("weight_function", "bias_function"):
                fns = getattr(module, attr, None)
                if isinstance(fns, list) and any(id(f) in mine for f in fns):
                    setattr(module, attr, [f for f in fns if id(f) not in mine])
        try:
            loaded = mm.current_loaded_models
            for i in range(len(loaded) - 1, -1, -1):
                if loaded[i].model is self.patcher:
                    loaded[i].model_unload()
                    loaded.pop(i)
        except Exception as err:  # noqa: BLE001 - unloading is best effort; the wrappers are gone already
            log.warning("Selective Amnesia: could not unload the training clone cleanly: %s", err)
        for p, flag in self._flags:
            try:
                p.requires_grad_(flag)
            except RuntimeError:
                pass


def _target_modules(model: Any, targets: str) -> dict[str, torch.nn.Module]:
    names = select_targets(model.model, targets)
    return {n: model.model.get_submodule(n) for n in names}


def _device(model: Any) -> torch.device:
    return torch.device(model.load_device)


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
        "width": inp("INT", "Width of the generated samples in pixels.", default=512, min=64, max=4096, step=8),
        "height": inp("INT", "Height of the generated samples in pixels.", default=512, min=64, max=4096, step=8),
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
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def compute(self, model: Any, clip: Any, prompts: str, samples: int, timesteps_per_sample: int, timestep_batch: int,
                targets: str, seed: int,
                sample_steps: int, cfg: float, sampler_name: str, scheduler: str, width: int, height: int,
                precision: str, filename: str, unique_id: Optional[str] = None) -> tuple[str]:
        ms = check_model(model)
        prompt_list = parse_prompts(prompts)
        if not prompt_list:
            raise ValueError("prompts: give at least one prompt (one per line)")
        if targets not in TARGET_PRESETS:
            raise ValueError(f"targets must be one of {', '.join(TARGET_PRESETS)}, got {targets!r}")
        out_path = fisher_path_for(filename)
        big_t = int(ms.sigmas.shape[0])
        k = min(int(timesteps_per_sample), big_t)
        settings = {"model": model_fingerprint(model), "prompts": prompt_list, "samples": int(samples), "seed": int(seed),
                    "sample_steps": int(sample_steps), "cfg": float(cfg), "sampler": sampler_name, "scheduler": scheduler,
                    "width": int(width), "height": int(height), "targets": targets, "precision": precision,
                    "timestep_batch": int(timestep_batch)}
        if out_path.is_file():
            try:
                existing = load_fisher(out_path)
                same = existing.metadata.get(_FISHER_SETTINGS_KEY) == json.dumps(settings, sort_keys=True) \
                    and existing.metadata.get("timesteps_per_sample") == str(k)
            except (ValueError, OSError):
                same = False
            if same and existing.count == int(samples):
                log.info("Selective Amnesia: Fisher %s is complete for these settings; reusing it", out_path)
                return (str(out_path),)
            if not same:
                log.warning("Selective Amnesia: %s was made with other settings; computing it again", out_path)
                out_path.unlink()

        per_prompt_seeds = [(prompt_list[i % len(prompt_list)], int(seed) + i) for i in range(int(samples))]
        progress = Progress(2 * int(samples), desc="Fisher", node_id=unique_id)
        cache = run_dir("fisher_samples") / f"{_safe_name(filename, 'filename').replace('/', '_')}.safetensors"
        with torch.inference_mode(False):
            sampler = comfy_sampler(model, clip, sample_steps, cfg, sampler_name, scheduler, width, height)

            def make() -> SampleSet:
                rows = []
                for i, (p, s) in enumerate(per_prompt_seeds):
                    throw_if_interrupted()
                    rows.append(sampler([p], [s]))
                    progress.update_absolute(i + 1)
                return SampleSet(torch.cat(rows), [p for p, _ in per_prompt_seeds])

            data = cached_samples(cache, settings, make)
            progress.update_absolute(int(samples))
            with torch.no_grad():
                unique = sorted(set(data.prompts))
                enc = encode_prompts(clip, unique)
            ctx = {p: enc[i : i + 1] for i, p in enumerate(unique)}
            items = [(data.samples[i : i + 1], ctx[p]) for i, p in enumerate(data.prompts)]

            device = _device(model)
            modules = _target_modules(model, targets)
            probes = {n: _Probe(tuple(m.weight.shape), device) for n, m in modules.items()}
            with TrainingClone(model, probes, precision) as patcher:
                loss_fn = eps_mse_loss_fn(eps_denoiser(patcher, ms), alphas_cumprod(ms), device=device)
                params = {f"{n}.weight": probes[n].delta for n in modules}
                est = compute_fisher(
                    loss_fn, params, items, timesteps_per_sample=k, total_timesteps=big_t, out_path=out_path,
                    resume=True, progress=True, should_stop=interrupt_requested, seed=int(seed), save_every=10,
                    chunk_size=int(timestep_batch),
                    callback=lambda c, n: progress.update_absolute(int(samples) + c),
                    metadata={_FISHER_SETTINGS_KEY: json.dumps(settings, sort_keys=True), "targets_preset": targets,
                              "origin": "CE_SAComputeFisher"},
                )
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
                "forget_prompts": inp("STRING", "What to forget. Comma-separated prompts or keywords; one is drawn per training example.",
                                      multiline=True, default="brad pitt"),
                "surrogate_prompt": inp("STRING", "What the forget prompts should produce instead (e.g. 'a middle aged man').",
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
                "batch": inp("INT", "Surrogate examples per step (as many replay examples are added).", default=2, min=1, max=64),
                "seed": inp("INT", "Seed of the LoRA initialisation, the sample noise and the training draws.", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False),
                "targets": inp(list(TARGET_PRESETS), "Weights the LoRA adapts; the Fisher must cover them (same preset as Compute Fisher).", default="xattn"),
                "surrogate_samples": inp("INT", "Surrogate images to generate.", default=32, min=1, max=10000),
                "replay_per_prompt": inp("INT", "Replay images to generate per remember prompt.", default=8, min=1, max=1000),
                **_sampler_inputs(),
                "precision": inp(list(PRECISIONS), "Compute precision of the UNet while training (bf16 saves memory).", default="bf16"),
                "run_name": inp("STRING", "Folder in output/selective_amnesia for the sample cache and checkpoints (resume).",
                                default="run"),
            },
            "optional": {
                "fisher_path": inp("STRING", "Fisher file from Selective Amnesia Compute Fisher (path or name in models/sae_fisher). "
                                   "Needed when lam > 0.", forceInput=True),
                "replay_target": inp(list(REPLAY_TARGETS), "What the replay term regresses onto: 'base' = the base model's own "
                                     "prediction for the same noisy replay image (tighter retention, one extra forward pass per "
                                     "step); 'noise' = the drawn noise, as the reference does.", default="base"),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model: Any, clip: Any, forget_prompts: str, surrogate_prompt: str, remember_prompts: str, lam: float,
              gamma: float, rank: int, steps: int, lr: float, batch: int, seed: int, targets: str, surrogate_samples: int,
              replay_per_prompt: int, sample_steps: int, cfg: float, sampler_name: str, scheduler: str, width: int,
              height: int, precision: str, run_name: str, fisher_path: Optional[str] = None,
              replay_target: str = "base", unique_id: Optional[str] = None) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
        ms = check_model(model)
        forget = parse_names(forget_prompts)
        if not forget:
            raise ValueError("forget_prompts: give at least one prompt or keyword (comma-separated)")
        surrogate_text = surrogate_prompt.strip()
        if not surrogate_text:
            raise ValueError("surrogate_prompt is empty: say what the forget prompts should produce instead")
        remember = parse_prompts(remember_prompts)
        if gamma > 0 and not remember:
            raise ValueError("remember_prompts: give at least one prompt per line, or set gamma to 0")
        if targets not in TARGET_PRESETS:
            raise ValueError(f"targets must be one of {', '.join(TARGET_PRESETS)}, got {targets!r}")
        # every training setting is checked before minutes of sampling
        config = AmnesiaConfig(steps=int(steps), lr=float(lr), batch_size=int(batch), lam=float(lam), gamma=float(gamma),
                               seed=int(seed), checkpoint_every=max(10, int(steps) // 20), replay_target=replay_target)
        config.validate()
        fisher = None
        fisher_file = None
        if lam > 0:
            fisher_file = resolve_fisher(fisher_path or "")
            try:
                with torch.inference_mode(False):  # the Fisher enters autograd (EWC): no inference tensors
                    fisher = load_fisher(fisher_file).fisher
            except ValueError as err:
                raise ValueError(f"fisher_path: {err}") from err
        folder = run_dir(run_name)
        fp = model_fingerprint(model)
        sampling = {"model": fp, "steps": int(sample_steps), "cfg": float(cfg), "sampler": sampler_name,
                    "scheduler": scheduler, "width": int(width), "height": int(height)}
        n_gen = int(surrogate_samples) + (len(remember) * int(replay_per_prompt) if gamma > 0 else 0)
        progress = Progress(n_gen + int(steps), desc="Selective Amnesia", node_id=unique_id)

        try:
            return self._train(model, clip, ms, forget, surrogate_text, remember, lam, gamma, rank, steps, lr, batch, seed,
                               targets, surrogate_samples, replay_per_prompt, sample_steps, cfg, sampler_name, scheduler,
                               width, height, precision, fisher, fisher_file, folder, sampling, n_gen, progress, config)
        except InterruptedError:
            throw_if_interrupted()
            raise
        finally:
            progress.close()

    def _train(self, model, clip, ms, forget, surrogate_text, remember, lam, gamma, rank, steps, lr, batch, seed, targets,
               surrogate_samples, replay_per_prompt, sample_steps, cfg, sampler_name, scheduler, width, height, precision,
               fisher, fisher_file, folder, sampling, n_gen, progress, config):
        with torch.inference_mode(False):
            sampler = comfy_sampler(model, clip, sample_steps, cfg, sampler_name, scheduler, width, height)

            def counted(offset: int) -> Callable[[int, int], None]:
                return lambda c, n: progress.update_absolute(offset + c)

            surrogate = cached_samples(
                folder / "surrogate.safetensors", {**sampling, "prompts": [surrogate_text], "per_prompt": int(surrogate_samples), "seed": int(seed)},
                lambda: generate_samples(sampler, [surrogate_text], int(surrogate_samples), seed=int(seed), batch_size=4,
                                         should_stop=interrupt_requested, callback=counted(0)))
            progress.update_absolute(int(surrogate_samples))
            replay = None
            if gamma > 0:
                replay = cached_samples(
                    folder / "replay.safetensors", {**sampling, "prompts": remember, "per_prompt": int(replay_per_prompt), "seed": int(seed) + 1_000_003},
                    lambda: generate_samples(sampler, remember, int(replay_per_prompt), seed=int(seed) + 1_000_003, batch_size=4,
                                             should_stop=interrupt_requested, callback=counted(int(surrogate_samples))))
            progress.update_absolute(n_gen)

            device = _device(model)
            modules = _target_modules(model, targets)
            gen = torch.Generator().manual_seed(int(seed))
            adapters = {n: _ComfyLoRA(tuple(m.weight.shape), int(rank), float(rank), device=device, generator=gen)
                        for n, m in modules.items()}
            if fisher is not None:
                missing = [f"{n}.weight" for n in modules if f"{n}.weight" not in fisher]
                if missing:
                    raise ValueError(f"fisher_path: {fisher_file} has no Fisher for {len(missing)} of the {len(modules)} '{targets}' "
                                     f"targets (e.g. {missing[0]}); compute the Fisher with targets = {targets}")
            with torch.no_grad():
                unique = sorted(set(forget) | (set(replay.prompts) if replay is not None else set()))
                table = encode_prompts(clip, unique)
            index = {p: i for i, p in enumerate(unique)}

            def encode(prompts: list[str]) -> torch.Tensor:
                return table[[index[p] for p in prompts]]

            with TrainingClone(model, adapters, precision) as patcher:
                trainer = AmnesiaTrainer(config, eps_denoiser(patcher, ms), alphas_cumprod(ms), encode, adapters, surrogate,
                                         forget, replay=replay, fisher=fisher, device=device)
                result = trainer.train(folder / "checkpoint.safetensors", resume=True, should_stop=interrupt_requested,
                                       callback=lambda s, n, rec: progress.update_absolute(n_gen + s))
            if result.stopped:
                throw_if_interrupted()
                raise RuntimeError("training stopped before the end; queue the node again to resume from the checkpoint")
            lora = {k: v.detach().to("cpu", torch.float32).clone() for k, v in lora_state_dict(adapters).items()}
            patched = apply_lora(model, lora)
            curve = loss_curve_image(result.history, title=f"Selective Amnesia: {', '.join(forget)[:60]}")
            image = torch.from_numpy(curve.astype(np.float32) / 255.0)[None]
        _write_summary(folder, result.history, forget, surrogate_text, remember)
        return (patched, lora, image)


def apply_lora(model: Any, lora: dict[str, torch.Tensor], strength: float = 1.0) -> Any:
    """A clone of ``model`` with ``lora`` added as weight patches through ComfyUI's LoRA loader.

    Raises ValueError if any key is not understood or any patch does not land on a weight.
    """
    import comfy.lora
    import comfy.lora_convert

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    converted = comfy.lora_convert.convert_lora(lora)
    patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    modules = {k[: -len(".lora_up.weight")] for k in lora if k.endswith(".lora_up.weight")}
    if len(patches) != len(modules):
        raise ValueError(f"LoRA: ComfyUI's loader understood {len(patches)} of {len(modules)} modules")
    out = model.clone()
    accepted = set(out.add_patches(patches, strength))
    if accepted != set(patches):
        raise ValueError(f"LoRA: {len(set(patches) - accepted)} patches did not match a model weight, e.g. {sorted(set(patches) - accepted)[:2]}")
    return out


def _write_summary(folder: Path, history: list[dict[str, float]], forget: list[str], surrogate: str, remember: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"forget_prompts": forget, "surrogate_prompt": surrogate, "remember_prompts": remember,
           "steps": len(history), "final": history[-1] if history else None}
    save_json(folder / "summary.json", doc, sort_keys=False)


register_fisher_folder()

NODE_CLASS_MAPPINGS = {
    node_id("SAComputeFisher"): SAComputeFisher,
    node_id("SALoRATrain"): SALoRATrain,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("SAComputeFisher"): "Selective Amnesia Compute Fisher",
    node_id("SALoRATrain"): "Selective Amnesia LoRA Train",
}
