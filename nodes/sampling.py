"""ComfyUI sampling for the nodes: sampling prompts through ComfyUI's own sampler, and the one
answer to "where is the sampler during this UNet call?".

* :class:`SamplerState` records, in a DIFFUSION_MODEL wrapper, the sampler's ``transformer_options``
  of the current UNet call (``sigmas``, ``sample_sigmas``, ``cond_or_uncond``) and its timesteps,
  and answers from them: the call's sigma and timestep, its step in the run (:func:`nearest_step`
  of the sigma in ``sample_sigmas``), and which rows are prompted (:func:`cond_mask`). It is the
  ``CallPosition`` of :mod:`sae_core.saeuron.pipeline`. The step never comes from counting calls.
* :class:`ComfySampling` samples one prompt at a time on a clone of a MODEL that carries a
  :class:`SamplerState`, with ComfyUI's sampler and scheduler.
* :func:`sampler_inputs` are the node inputs of such a sampling run.
* :class:`ComfyHost` is a MODEL (and a :class:`ComfySampling`) as the SAeUron pipeline's host.
* For methods that train on the wired model's own samples (Selective Amnesia):
  :func:`discrete_eps_sampling` checks the model has a discrete eps/v schedule,
  :func:`alphas_cumprod` reads that schedule, :func:`eps_denoiser` is the model's eps prediction in
  DDPM form, and :func:`comfy_sampler` samples ``(prompt, seed)`` rows to model-space latents.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from .common import inp, sampler_choices, throw_if_interrupted
from .families import latent_downscale

__all__ = [
    "ComfyHost",
    "ComfySampling",
    "SamplerState",
    "adm_rows",
    "adm_vector",
    "adm_width",
    "alphas_cumprod",
    "check_conditioning_fits",
    "comfy_sampler",
    "cond_mask",
    "diffusion_model_wrapper",
    "discrete_eps_sampling",
    "eps_denoiser",
    "first_value",
    "latent_shape",
    "model_conditioning",
    "nearest_step",
    "sampler_inputs",
    "unet_call",
]

STATE_WRAPPER_KEY = "concept_erasure.sampler_state"
"""Key of the DIFFUSION_MODEL wrapper :class:`ComfySampling` puts on its clone."""


def diffusion_model_wrapper() -> str:
    """ComfyUI's DIFFUSION_MODEL wrapper type (wrappers see every UNet call with its arguments)."""
    import comfy.patcher_extension

    return comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL


def latent_shape(model: Any, width: int, height: int) -> tuple[int, int, int, int]:
    """``(1, channels, h, w)`` of one empty latent of ``width`` x ``height`` pixels for ``model``: its latent
    format's channels, and pixels per latent cell from its family (8 for SD, 1 for MiniCanvas)."""
    channels = model.get_model_object("latent_format").latent_channels
    scale = latent_downscale(model)
    if int(width) < scale or int(height) < scale:
        raise ValueError(f"width/height: {width}x{height} pixels is smaller than one latent cell ({scale} pixels)")
    return (1, channels, int(height) // scale, int(width) // scale)


def unet_call(args: tuple, kwargs: dict) -> tuple[Tensor, Any, dict]:
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


def first_value(value: Any) -> float:
    """The first entry of a tensor (a batch of equal sigmas or timesteps), or the number itself."""
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
    """Where the sampler is during the current UNet call, recorded by a DIFFUSION_MODEL wrapper.

    Use :meth:`wrapper` as the wrapper, or :meth:`recording` inside one. Outside a call every
    reading raises.
    """

    def __init__(self, model_sampling: Any) -> None:
        self.model_sampling = model_sampling
        self.options: Optional[dict] = None
        self.timesteps: Any = None
        self.batch = 0
        self._schedule_key: Any = None
        self._schedule_t: Optional[Tensor] = None

    @contextlib.contextmanager
    def recording(self, args: tuple, kwargs: dict) -> Iterator[None]:
        """Record the UNet call ``(args, kwargs)`` for the duration of the ``with`` body (nesting restores)."""
        x, timesteps, options = unet_call(args, kwargs)
        saved = (self.options, self.timesteps, self.batch)
        self.options, self.timesteps, self.batch = options, timesteps, int(x.shape[0])
        try:
            yield
        finally:
            self.options, self.timesteps, self.batch = saved

    def wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        with self.recording(args, kwargs):
            return executor(*args, **kwargs)

    def _require(self) -> dict:
        if self.options is None:
            raise ValueError("SAeUron: the block ran outside of a sampling call of this node")
        return self.options

    # -- the CallPosition of sae_core.saeuron.pipeline -------------------------------------------

    def sigma(self) -> Optional[Any]:
        """The call's ``sigmas`` as the sampler passed them, or None."""
        return self._require().get("sigmas")

    def timestep(self) -> Optional[Any]:
        """The call's model timesteps (from its sigma when the call carries none), or None."""
        if self.timesteps is not None:
            return self.timesteps
        sigmas = self.sigma()
        return None if sigmas is None else self.model_sampling.timestep(torch.as_tensor(sigmas))

    def run_step(self) -> Optional[tuple[int, int]]:
        """``(step in the run, steps of the run)`` from the sigma's place in ``sample_sigmas``, or None."""
        options = self._require()
        sigmas, sample_sigmas = options.get("sigmas"), options.get("sample_sigmas")
        if sigmas is None or sample_sigmas is None:
            return None
        n = max(1, int(torch.as_tensor(sample_sigmas).numel()) - 1)
        return nearest_step(first_value(sigmas), sample_sigmas), n

    def cond_mask(self) -> Optional[Tensor]:
        return cond_mask(self._require(), self.batch)

    # -- readings that must be there (collection) ------------------------------------------------

    def sigma_value(self) -> float:
        sigmas = self.sigma()
        if sigmas is None:
            raise ValueError("SAeUron: the sampler passed no sigmas in transformer_options")
        return first_value(sigmas)

    def sample_sigmas(self) -> Tensor:
        sigmas = self._require().get("sample_sigmas")
        if sigmas is None:
            raise ValueError("SAeUron: the sampler passed no sample_sigmas in transformer_options")
        return torch.as_tensor(sigmas).detach().reshape(-1).to("cpu", torch.float32)

    def step_index(self) -> int:
        return nearest_step(self.sigma_value(), self.sample_sigmas())

    def schedule_timesteps(self) -> Tensor:
        """Model timestep of every evaluation sigma of the current run."""
        sigmas = self.sample_sigmas()
        key = tuple(sigmas.tolist())
        if key != self._schedule_key:
            evals = sigmas[:-1] if sigmas.numel() > 1 else sigmas
            self._schedule_t = self.model_sampling.timestep(evals).float().cpu()
            self._schedule_key = key
        return self._schedule_t  # type: ignore[return-value]


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
        self.patcher.add_wrapper_with_key(diffusion_model_wrapper(), STATE_WRAPPER_KEY, self.state.wrapper)
        self.clip = clip
        self.steps, self.cfg = int(steps), float(cfg)
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.seed = int(seed)
        self.shape = latent_shape(model, width, height)
        self.negative = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
        check_conditioning_fits(model, self.negative)
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

    def sample_in_order(self, batch: list[str]) -> None:
        """Sample each prompt of ``batch`` after the ones sampled before (prompt i gets seed + i)."""
        throw_if_interrupted()
        for p in batch:
            self.sample(p, self.done)

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


def sampler_inputs(steps: int = 20, cfg: float = 7.5) -> dict[str, tuple]:
    """Node inputs of a :class:`ComfySampling` run (steps, cfg, seed, sampler, scheduler, size)."""
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
        "width": inp("INT", "Image width in pixels (SD1.x: 512, SDXL: 1024, MiniCanvas: 32).", default=512, min=8,
                     max=4096, step=8),
        "height": inp("INT", "Image height in pixels (SD1.x: 512, SDXL: 1024, MiniCanvas: 32).", default=512, min=8,
                      max=4096, step=8),
    }


class ComfyHost:
    """A ComfyUI MODEL as the host of :mod:`sae_core.saeuron.pipeline`: blocks by ComfyUI (or diffusers)
    name, and, with a :class:`ComfySampling`, sampling of prompts in order and the sampler's position."""

    def __init__(self, model: Any, sampling: Optional[ComfySampling] = None) -> None:
        self.model = model
        self.sampling = sampling

    def find_block(self, block: str) -> Any:
        from .unet_blocks import find_block

        return find_block(self.model, block)

    def family(self) -> str:
        from .families import model_family

        return model_family(self.model)

    def family_matches(self, name: str) -> bool | None:
        from .families import family_matches

        return family_matches(self.model, name)

    def _sampling(self) -> ComfySampling:
        if self.sampling is None:
            raise RuntimeError("internal: this host has no sampling run")
        return self.sampling

    def denoiser(self) -> torch.nn.Module:
        from .unet_blocks import unet_of

        return unet_of(self._sampling().patcher)

    def sample(self, batch: list[str]) -> None:
        self._sampling().sample_in_order(batch)

    def position(self) -> SamplerState:
        return self._sampling().state


def discrete_eps_sampling(model: Any, method: str, allow_adm: bool = False) -> Any:
    """The MODEL's ``model_sampling`` if it is a discrete-timestep eps/v schedule without extra conditioning
    (SD1.x/SD2.x-style UNets; with ``allow_adm`` also UNets conditioned on an ADM vector ``y``, such as SDXL's
    pooled text + size embeddings, which :func:`model_conditioning` builds); ValueError naming the model and
    ``method`` otherwise."""
    import comfy.model_sampling

    base = model.model
    ms = model.get_model_object("model_sampling")
    kind = type(base).__name__
    if not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(ms, comfy.model_sampling.EPS):
        raise ValueError(f"model: {method} needs a discrete-timestep eps/v model (SD1.x/SD2.x/SDXL); "
                         f"{kind} with {type(ms).__name__} is not supported")
    for bad in (comfy.model_sampling.EDM, comfy.model_sampling.X0):
        if isinstance(ms, bad):
            raise ValueError(f"model: {kind} uses {bad.__name__} sampling, which {method} does not support")
    if getattr(base, "concat_keys", ()):
        raise ValueError(f"model: {kind} needs concat channels (inpainting, ...); {method} supports text-conditioned "
                         "UNets (SD1.x/SD2.x" + ("/SDXL)" if allow_adm else ")"))
    if getattr(base, "adm_channels", 0) and not allow_adm:
        raise ValueError(f"model: {kind} needs extra conditioning (pooled text: SDXL, ...); "
                         f"{method} supports SD1.x/SD2.x UNets")
    if not hasattr(base, "diffusion_model"):
        raise ValueError(f"model: {kind} has no diffusion_model")
    return ms


def adm_width(model: Any) -> int:
    """Width of the model's ADM input ``y`` (SDXL: pooled clip_g + 6 * 256 size embeddings); 0 when it has none."""
    return int(getattr(model.model, "adm_channels", 0) or 0)


def check_conditioning_fits(model: Any, cond: Any, what: str = "clip", model_name: str = "model") -> None:
    """ValueError naming ``what`` when a CONDITIONING (``cond``) or, given a CLIP, its encoding of the empty prompt does
    not fit ``model``: the token width against the cross-attention's context width and, for a model with an ADM input
    (SDXL), the ``y`` ComfyUI makes from the pooled output against that input's width. Cheap: run it before sampling,
    which otherwise stops deep inside the UNet with a shape error."""
    if cond is None:
        raise ValueError(f"{what}: nothing is wired")
    if hasattr(cond, "tokenize"):
        with torch.inference_mode():
            cond = cond.encode_from_tokens_scheduled(cond.tokenize(""))
    try:
        tokens, extra = cond[0][0], cond[0][1]
        width = int(tokens.shape[-1])
    except (IndexError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{what}: expected a CONDITIONING (as CLIP Text Encode makes it), got "
                         f"{type(cond).__name__}") from None
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    context = config.get("context_dim")
    if isinstance(context, int) and width != context:
        raise ValueError(f"{what}: its conditioning is {width} wide but {model_name} ({type(model.model).__name__}) "
                         f"reads {context}-wide text conditioning; use the text encoder of that checkpoint")
    if not bool(torch.isfinite(tokens).all()):
        raise ValueError(f"{what}: its conditioning holds NaN or Inf values")
    adm = adm_width(model)
    pooled = extra.get("pooled_output") if isinstance(extra, dict) else None
    if not adm:
        return
    if not isinstance(pooled, Tensor):
        raise ValueError(f"{what}: {model_name} ({type(model.model).__name__}) needs the pooled text output for its "
                         "ADM input, and this conditioning has none; use the text encoder of that checkpoint")
    try:
        with torch.inference_mode():
            y = model.model.encode_adm(pooled_output=pooled.reshape(1, -1).to("cpu", torch.float32), width=1024,
                                       height=1024, device=torch.device("cpu"), prompt_type="positive")
    except (KeyError, TypeError, AttributeError, RuntimeError):
        return  # an ADM input made from something else (unCLIP's image embedding): not the CLIP's to check
    if isinstance(y, Tensor) and y.dim() == 2 and y.shape[1] != adm:
        raise ValueError(f"{what}: its pooled output is {pooled.shape[-1]} wide, which makes a {y.shape[1]}-wide ADM "
                         f"input, but {model_name} ({type(model.model).__name__}) reads {adm}; use the text encoder "
                         "of that checkpoint")


def adm_rows(adm: int, width: int) -> int:
    """Rows of ``width`` values that carry an ADM vector of ``adm`` values packed after the token conditioning."""
    return -(-int(adm) // int(width)) if adm else 0


def adm_vector(model: Any, cond: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """``[1, adm]`` (float32, CPU): the ADM input ``y`` ComfyUI's ``BaseModel.extra_conds`` makes of a CLIP
    conditioning ``cond`` (``[[tokens, {"pooled_output": ...}]]``) for a positive prompt and a latent of ``shape``;
    a ValueError naming the clip when the CLIP gives no pooled output or one that does not fit the model."""
    adm = adm_width(model)
    ctx, extra = cond[0][0], cond[0][1]
    pooled = extra.get("pooled_output")
    if pooled is None:
        raise ValueError(f"clip: {type(model.model).__name__} needs the pooled text output for its ADM input, and "
                         "this CLIP gives none (wire the checkpoint's own CLIP)")
    conds = model.model.extra_conds(pooled_output=pooled, width=shape[3] * 8, height=shape[2] * 8,
                                    prompt_type="positive", device=torch.device("cpu"),
                                    noise=torch.zeros(shape), cross_attn=ctx)
    if "y" not in conds:
        raise ValueError(f"model: {type(model.model).__name__} declares an ADM input but made none for a prompt")
    y = conds["y"].cond.detach().to("cpu", torch.float32).reshape(1, -1)
    if y.shape[1] != adm:
        raise ValueError(f"clip: ComfyUI made a y of width {y.shape[1]} from this CLIP's pooled output for "
                         f"{type(model.model).__name__}, whose ADM input takes {adm}; wire the CLIP of the model's "
                         "own checkpoint")
    return y


def model_conditioning(model: Any, clip: Any, prompts: list[str], width: int, height: int) -> torch.Tensor:
    """The conditioning of each prompt as one tensor row ``[N, L + r, D]`` (float32, CPU).

    ``L x D`` is the prompt's token conditioning as CLIPTextEncode makes it. A model with an ADM input (SDXL)
    also gets its ``y``, made by ComfyUI's own ``BaseModel.extra_conds`` from the prompt's pooled output and the
    size of a ``width`` x ``height`` image exactly as the sampler makes it for a positive prompt (size from the
    latent: ``8 *`` its cells); ``y`` is packed, zero-padded, into ``r = ceil(adm / D)`` extra rows, which
    :func:`eps_denoiser` unpacks. Without an ADM input nothing is added (``r = 0``).
    """
    from .clip_text import encode_prompts

    adm = adm_width(model)
    if not adm:
        return encode_prompts(clip, list(prompts))
    shape = latent_shape(model, width, height)
    rows = []
    for p in prompts:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(p))
        ctx = cond[0][0]
        y = adm_vector(model, cond, shape)
        ctx = ctx.detach().to("cpu", torch.float32)
        d = ctx.shape[-1]
        packed = torch.zeros(1, adm_rows(adm, d) * d)
        packed[:, :adm] = y
        rows.append(torch.cat([ctx, packed.view(1, -1, d)], dim=1)[0].clone())
    if len({tuple(r.shape) for r in rows}) > 1:
        raise ValueError("clip: the prompts encoded to different lengths; keep each prompt within one 77-token chunk")
    return torch.stack(rows)


def alphas_cumprod(ms: Any) -> torch.Tensor:
    """abar_t of the model's own schedule (``sigma_t^2 = (1 - abar_t) / abar_t``), fp32 on the CPU."""
    sigmas = ms.sigmas.detach().to("cpu", torch.float32)
    return 1.0 / (1.0 + sigmas * sigmas)


def eps_denoiser(patcher: Any, ms: Any, adm: int = 0) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``eps(x_t, t, context)`` in DDPM form through ``BaseModel.apply_model`` (works for eps and v models).

    ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` becomes ComfyUI's ``x_sigma = x_t / sqrt(abar)``
    at ``sigma_t``; the model's x0 prediction gives back ``eps = (x_sigma - x0) / sigma``.
    With ``adm`` > 0 (a model with an ADM input), ``context`` holds :func:`model_conditioning`'s rows: the
    token conditioning, then ``y`` packed in its last rows; ``y`` goes to the model as ComfyUI's sampler passes it.
    """
    abar = alphas_cumprod(ms)

    def eps(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        a = abar.to(x_t.device)[t.to(x_t.device)].view(-1, *([1] * (x_t.dim() - 1)))
        sigma = ((1.0 - a) / a).sqrt()
        x_sigma = x_t.float() / a.sqrt()
        extra = {}
        if adm:
            r = adm_rows(adm, context.shape[-1])
            extra["y"] = context[:, -r:].reshape(context.shape[0], -1)[:, :adm]
            context = context[:, :-r]
        x0 = patcher.model.apply_model(x_sigma, sigma.view(-1), c_crossattn=context, transformer_options={}, **extra)
        return (x_sigma - x0.float()) / sigma

    return eps


def comfy_sampler(model: Any, clip: Any, steps: int, cfg: float, sampler_name: str, scheduler: str,
                  width: int, height: int, negative: str = "") -> Callable[[list[str], list[int]], torch.Tensor]:
    """``sampler(prompts, seeds) -> [B, C, h, w]`` model-space latents (``process_latent_in`` applied).

    Each row's noise comes from its own seed, so rows do not depend on how they are batched.
    """
    import comfy.sample

    neg = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    conds: dict[str, Any] = {}
    shape = latent_shape(model, width, height)

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
