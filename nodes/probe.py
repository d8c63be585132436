"""Concept Inversion Probe: search for a conditioning that brings an erased concept back (``sae_core.probe``).

The original MODEL samples images of the concept (``samples`` seeds, the node's sampler settings); then a
conditioning, started from the concept prompt's own, is optimised so that the erased MODEL denoises those images
(textual inversion's objective against the erased weights). The erased model is called through ComfyUI's own
``calc_cond_batch`` with the sampling schedule in ``transformer_options``, so sampling-time edits (SAeUron's hook,
other patches and wrappers) act during the search as they do when the probe is sampled. Wire the output to the
Erasure Report's ``probe``: the concept coming back in the erased model's probe images is a leak.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sae_core.probe import InversionSettings, invert_concept

from .common import category, inp, node_id, sampler_choices, throw_if_interrupted
from .minicanvas import EXACT_SAMPLER
from .report import check_models
from .sampling import comfy_sampler
from .training import TrainingClone

log = logging.getLogger("concept_erasure")

MAX_SAMPLES = 64


def schedule_sigmas(model: Any, scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas ComfyUI's KSampler samples ``model`` at (``steps`` + 1 entries, the last zero)."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def comfy_denoiser(patcher: Any, cond: list, sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> Any:
    """``D(x_t, sigma_index, context) -> x0_hat`` of ``patcher`` through ``comfy.samplers.calc_cond_batch``; ``cond``
    is a CONDITIONING whose extra entries (pooled output, ...) are kept, its tokens replaced by ``context``."""
    import comfy.patcher_extension
    import comfy.sampler_helpers
    import comfy.samplers

    device = patcher.load_device
    options = patcher.model_options.copy()
    topts = dict(options.get("transformer_options", {}))
    # as a sampler prepares a run: the patcher's wrappers and callbacks (e.g. SAeUron's) join transformer_options
    for kind in ("wrappers", "callbacks"):
        topts[kind] = comfy.patcher_extension.merge_nested_dicts(topts.get(kind, {}), getattr(patcher, kind))
    topts["sample_sigmas"] = sigmas.to(device)
    options["transformer_options"] = topts
    noise = torch.zeros(latent_shape, device=device)

    def denoise(x_t: torch.Tensor, index: int, context: torch.Tensor) -> torch.Tensor:
        entries = comfy.sampler_helpers.convert_cond([[context.to(device), dict(cond[0][1])]])
        entries = comfy.samplers.encode_model_conds(patcher.model.extra_conds, entries, noise, device, "positive",
                                                    latent_image=noise)
        sigma = sigmas[index].to(device, torch.float32).expand(x_t.shape[0])
        (x0,) = comfy.samplers.calc_cond_batch(patcher.model, [entries], x_t.to(device), sigma, options)
        return x0

    return denoise


class ConceptInversionProbe:
    """A soft prompt that brings an erased concept back, when the erasure let it."""

    DESCRIPTION = (
        "Samples images of the concept with the original model, then optimises a conditioning (started from the "
        "concept prompt's) so that the erased model denoises those images: the concept-inversion attack of the "
        "erasure literature. Wire probe to the Erasure Report's probe to see whether the concept comes back. "
        "Neither model is modified."
    )
    CATEGORY = category("report")
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("probe", "report")
    OUTPUT_TOOLTIPS = ("The optimised conditioning (the concept prompt's pooled output and extras kept).",
                       "The search's denoising loss before and after, on fixed draws.")
    FUNCTION = "probe"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        samplers, schedulers = sampler_choices()
        return {
            "required": {
                "model": inp("MODEL", "The original model: it makes the images of the concept. Not modified."),
                "clip": inp("CLIP", "The original text encoder: the search starts from the concept prompt's "
                                    "conditioning."),
                "erased_model": inp("MODEL", "The erased model the probe is searched against. Not modified."),
                "concept_prompt": inp("STRING", "A prompt that shows the erased concept.",
                                      default="an image of a star in checkered style"),
                "samples": inp("INT", "Images of the concept the original model makes (seeds seed, seed+1, ...).",
                               default=4, min=1, max=MAX_SAMPLES),
                "steps": inp("INT", "Optimisation steps of the search.", default=200, min=1, max=100000),
                "lr": inp("FLOAT", "Adam step size, relative to the conditioning's scale.", default=0.02,
                          min=0.0001, max=10.0, step=0.001, round=0.0001),
                "batch_size": inp("INT", "Images per step.", default=4, min=1, max=256),
                "seed": inp("INT", "Seed of the images and of the search's noise.", default=0, min=0,
                            max=0xFFFFFFFFFFFFFFFF),
                "sample_steps": inp("INT", "Sampling steps of the images; the search draws its noise levels from "
                                           "this schedule.", default=20, min=1, max=1000),
                "cfg": inp("FLOAT", "Guidance scale of the images.", default=7.0, min=0.0, max=30.0, step=0.1,
                           round=0.01),
                "sampler_name": inp(samplers, "Sampler of the images.", default=EXACT_SAMPLER[0]),
                "scheduler": inp(schedulers, "Schedule of the images and of the search.", default=EXACT_SAMPLER[1]),
                "width": inp("INT", "Image width (ignored by MiniCanvas: 32).", default=512, min=8, max=4096, step=8),
                "height": inp("INT", "Image height (ignored by MiniCanvas: 32).", default=512, min=8, max=4096,
                              step=8),
            },
        }

    def probe(self, model: Any, clip: Any, erased_model: Any, concept_prompt: str, samples: int, steps: int,
              lr: float, batch_size: int, seed: int, sample_steps: int, cfg: float, sampler_name: str,
              scheduler: str, width: int, height: int) -> dict:
        cond, text = run_probe(model, clip, erased_model, concept_prompt, samples, steps, lr, batch_size, seed,
                               sample_steps, cfg, sampler_name, scheduler, width, height)
        return {"ui": {"text": [text]}, "result": (cond, text)}


def run_probe(model: Any, clip: Any, erased_model: Any, concept_prompt: str, samples: int, steps: int, lr: float,
              batch_size: int, seed: int, sample_steps: int, cfg: float, sampler_name: str, scheduler: str,
              width: int, height: int) -> tuple[list, str]:
    """What the node computes: ``(probe CONDITIONING, report text)``."""
    import comfy.utils

    prompt = (concept_prompt or "").strip()
    if not prompt:
        raise ValueError("concept_prompt: give a prompt that shows the erased concept")
    if not 1 <= int(samples) <= MAX_SAMPLES:
        raise ValueError(f"samples must be from 1 to {MAX_SAMPLES}, got {samples}")
    settings = InversionSettings(steps=int(steps), lr=float(lr), batch=int(batch_size), seed=int(seed))
    check_models(model, clip, erased_model, clip)  # the images of one model are denoised by the other
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        sampler = comfy_sampler(model, clip, int(sample_steps), float(cfg), sampler_name, scheduler, int(width),
                                int(height))
        images = sampler([prompt] * int(samples), [int(seed) + i for i in range(int(samples))]).clone()
        start = cond[0][0][:1].detach().float().cpu().clone()
        sigmas = schedule_sigmas(erased_model, scheduler, int(sample_steps)).clone()
    throw_if_interrupted()
    bar = comfy.utils.ProgressBar(settings.steps)

    def progress(step: int, loss: float) -> None:
        bar.update_absolute(step, settings.steps)
        throw_if_interrupted()

    with torch.inference_mode(False), TrainingClone(erased_model, {}) as patcher:
        device = patcher.load_device
        denoise = comfy_denoiser(patcher, cond, sigmas, (1, *images.shape[1:]))
        patcher.pre_run()  # as a sampler starts a run: the model knows its patcher (hooks, callbacks)
        try:
            result = invert_concept(denoise, images.to(device), sigmas, start.to(device), settings, progress)
        finally:
            patcher.cleanup()
    probe = [[result.context.cpu(), dict(cond[0][1])]]
    text = (f"Concept Inversion Probe: '{prompt}', {samples} images of the original model, {settings.steps} steps "
            f"(lr {settings.lr:g}, batch {settings.batch}); denoising loss of the erased model on those images: "
            f"{result.start_loss:.4g} from the prompt's conditioning, {result.end_loss:.4g} from the probe")
    log.info("%s", text)
    return probe, text


NODE_CLASS_MAPPINGS = {node_id("ConceptInversionProbe"): ConceptInversionProbe}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("ConceptInversionProbe"): "Concept Inversion Probe"}
