"""MiniCanvas Checkpoint: the shipped MiniCanvas model as ComfyUI's MODEL, CLIP and VAE.

MiniCanvas (``sae_core.minicanvas``) is a 32x32 pixel-space text-to-image model with Stable Diffusion's
layout. ComfyUI cannot detect a checkpoint this small, and its own UNet hard-codes 32 GroupNorm groups, so
the loader builds ComfyUI's objects around the MiniCanvas modules instead of converting them:

* **MODEL**: a ``comfy.model_base.BaseModel`` whose model config class is called ``MiniCanvas`` (the model
  family a node sees in ``type(model.model.model_config).__name__``) and whose ``diffusion_model`` is the
  MiniCanvas UNet under its own module names (``input_blocks.3.1.transformer_blocks.0.attn2.to_k`` ...), so
  weight patches and LoRA keys ``diffusion_model.<name>`` (or kohya's ``lora_unet_<name>``) reach it. Its
  layers (and the text encoder's) are turned into ComfyUI's op classes, so weight wrappers work too.
  Sampling is ComfyUI's discrete EPS sampling with MiniCanvas' own linear-beta schedule (1000 steps,
  beta 1e-4 .. 0.02, epsilon prediction): same alphas_cumprod, same timesteps. ComfyUI's ``ddim`` sampler
  with the ``simple`` scheduler takes exactly MiniCanvas' DDIM steps (trailing spacing: t = 999, 949, ...)
  when the step count divides 1000 (otherwise some timesteps differ by one, by rounding).
  ``clip_denoised`` clamps the guided prediction of the clean image to [-1, 1] at every step, as MiniCanvas'
  sampler does (a ``sampler_post_cfg_function`` on the patcher).
* **CLIP**: a ``comfy.sd.CLIP`` around the MiniCanvas text encoder (a transformers ``CLIPTextModel``) and its
  word tokenizer: 16 tokens (``<bos>`` words ``<eos>`` padding; longer prompts are cut to 14 words, as
  MiniCanvas does), conditioning = the encoder's last hidden state ``[1, 16, 128]``. ComfyUI's prompt
  weights ``(word:1.2)`` work as for SD1 (interpolation from the empty prompt's encoding); CLIP Set Last
  Layer picks an earlier layer (followed by the final layer norm).
* **VAE**: ComfyUI's pixel-space VAE (the one Chroma Radiance uses): latents are images in [-1, 1],
  ``[B, 3, H, W]``. An empty 32x32 latent comes from ``EmptyChromaRadianceLatentImage`` (width = height = 32).

Nothing here is retrained or converted; the library side (``sae_core``) never imports ComfyUI.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch
from torch import nn

from sae_core.minicanvas.canvas import MiniCanvas
from sae_core.minicanvas.tokenizer import WordTokenizer
from sae_core.minicanvas.unet import MiniUNet, UNetConfig

from .common import category, inp, node_id
from .families import MINICANVAS, is_minicanvas  # noqa: F401  (is_minicanvas: re-exported for callers of this module)

log = logging.getLogger("concept_erasure")

FAMILY = MINICANVAS
"""Model family name: the class name of the MODEL's model config (``model.model.model_config``); nodes ask
:mod:`.families` (``model_family``, ``is_minicanvas``) rather than comparing it themselves."""

TOKEN_KEY = "minicanvas"
"""Key of the MiniCanvas token rows in ``clip.tokenize(text)`` and name of the text encoder inside the
CLIP's ``cond_stage_model`` (LoRA keys ``text_encoders.minicanvas.text_model.…``)."""

IMAGE_SIZE = 32
"""Width and height of MiniCanvas images (and latents: the model works in pixel space)."""

EXACT_SAMPLER = ("ddim", "simple")
"""ComfyUI sampler and scheduler that reproduce MiniCanvas' own DDIM sampling step for step."""


# -- the UNet as ComfyUI calls it --------------------------------------------------------------------------


class ComfyMiniUNet(MiniUNet):
    """The MiniCanvas UNet with the call signature of ComfyUI's diffusion models.

    ``BaseModel`` calls ``diffusion_model(x, timesteps, context=..., control=..., transformer_options=...)``;
    this runs the DIFFUSION_MODEL wrappers of ``transformer_options`` (as ComfyUI's own UNet does, with its
    positional arguments ``x, timesteps, context, y, control, transformer_options``, so block hooks installed
    that way apply and read the sampler's options where they do on SD) around the plain MiniCanvas forward. Module names and weights are
    MiniCanvas'; only the signature differs.
    """

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None,  # type: ignore[override]
                context: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None, control: Any = None,
                transformer_options: Optional[dict] = None, **kwargs: Any) -> torch.Tensor:
        import comfy.patcher_extension as ext

        options = transformer_options if transformer_options is not None else {}
        wrappers = ext.get_all_wrappers(ext.WrappersMP.DIFFUSION_MODEL, options)
        # the positional layout of ComfyUI's UNetModel, which DIFFUSION_MODEL wrappers read
        return ext.WrapperExecutor.new_class_executor(self._eps, self, wrappers).execute(
            x, timesteps, context, y, control, options, **kwargs)

    def _eps(self, x: torch.Tensor, timesteps: Optional[torch.Tensor], context: Optional[torch.Tensor],
             y: Optional[torch.Tensor] = None, control: Any = None, transformer_options: Optional[dict] = None,
             **kwargs: Any) -> torch.Tensor:
        if timesteps is None or context is None:
            raise ValueError("MiniCanvas UNet needs timesteps and a text conditioning (context); "
                             "encode the prompt with the MiniCanvas CLIP")
        if control is not None:
            raise ValueError("MiniCanvas does not support ControlNet / T2I adapters (control)")
        if y is not None:
            raise ValueError("MiniCanvas has no class or size conditioning (y)")
        return MiniUNet.forward(self, x, timesteps, context)

    @classmethod
    def from_unet(cls, unet: MiniUNet) -> "ComfyMiniUNet":
        """A copy of ``unet`` (its own parameters) with ComfyUI's signature and layers, in eval mode, frozen."""
        new = cls(unet.config)
        new.load_state_dict(unet.state_dict())
        return use_comfy_ops(new).eval().requires_grad_(False)


def use_comfy_ops(module: nn.Module) -> nn.Module:
    """Turn ``module``'s Linear, Conv2d, GroupNorm and LayerNorm layers into ComfyUI's op classes, in place.

    ``comfy.ops.disable_weight_init`` layers are subclasses of the torch ones with no state of their own: they
    compute the same thing, and in addition honour the patcher's weight wrappers (``add_weight_wrapper``, used
    by LoRA training), low-VRAM weight casting and compute-dtype overrides, as the layers of ComfyUI's own
    models do. Returns ``module``.
    """
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    swap = {nn.Linear: ops.Linear, nn.Conv2d: ops.Conv2d, nn.GroupNorm: ops.GroupNorm, nn.LayerNorm: ops.LayerNorm}
    for m in module.modules():
        if type(m) in swap:
            m.__class__ = swap[type(m)]
    return module


def unet_layout(cfg: UNetConfig) -> dict[str, Any]:
    """The MiniCanvas UNet described with the keys of ComfyUI's ``unet_config`` for LDM UNets.

    ComfyUI derives its diffusers / kohya-diffusers LoRA key names (``comfy.utils.unet_to_diffusers``) from
    these; MiniCanvas' block numbering is the LDM one, so those names land on the right modules. Nothing is
    built from this dict (``disable_unet_model_creation``).
    """
    levels = len(cfg.channel_mult)
    depth = [1 if level in cfg.attention_levels else 0 for level in range(levels)]
    return {
        "disable_unet_model_creation": True,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "model_channels": cfg.model_channels,
        "context_dim": cfg.context_dim,
        "channel_mult": list(cfg.channel_mult),
        "num_res_blocks": [cfg.num_res_blocks] * levels,
        "transformer_depth": [d for d in depth for _ in range(cfg.num_res_blocks)],
        "transformer_depth_output": [d for d in depth for _ in range(cfg.num_res_blocks + 1)],
        "transformer_depth_middle": 1,
        "num_heads": cfg.num_heads,
        "adm_in_channels": None,
        "use_linear_in_transformer": True,
        "use_temporal_attention": False,
        "image_size": IMAGE_SIZE,
    }


def clamp_denoised(args: dict) -> torch.Tensor:
    """``sampler_post_cfg_function``: the guided x0 prediction clamped to the pixel range [-1, 1]."""
    return args["denoised"].clamp(-1.0, 1.0)


# -- text: tokenizer and encoder ---------------------------------------------------------------------------


class MiniCanvasTokenizer:
    """ComfyUI tokenizer over the MiniCanvas word vocabulary: ``{"minicanvas": [[(id, weight), ...]]}``.

    One row of ``max_length`` tokens (``<bos>`` words ``<eos>`` ``<pad>``...). Words past ``max_length - 2``
    are dropped, as MiniCanvas' own tokenizer does (the model was trained on that length). Prompt weights
    use ComfyUI's syntax (``(star:1.3)``, ``(striped)`` = 1.1).
    """

    def __init__(self, embedding_directory: Any = None, tokenizer_data: Optional[dict] = None):
        data = tokenizer_data or {}
        tok = data.get("minicanvas_tokenizer")
        if tok is None:
            raise ValueError("MiniCanvasTokenizer needs tokenizer_data['minicanvas_tokenizer'] (a WordTokenizer)")
        self.tokenizer: WordTokenizer = tok
        # the attributes of ComfyUI's per-encoder tokenizers (``SDTokenizer``) that nodes read
        self.start_token: int = tok.bos_token_id
        self.end_token: int = tok.eos_token_id
        self.pad_token: int = tok.pad_token_id
        self.pad_with_end = False
        self.max_length: int = tok.max_length
        self.inv_vocab: dict[int, str] = dict(enumerate(tok.vocab))
        self.end_of_word = ""
        """Every token is a whole word (CLIP's BPE marks a word's last piece with ``</w>``)."""

    @property
    def minicanvas(self) -> "MiniCanvasTokenizer":
        """The tokenizer of the ``"minicanvas"`` token rows: this one (ComfyUI's ``SD1Tokenizer`` keeps its
        ``"l"`` rows' tokenizer as ``clip_l``), so ``getattr(clip.tokenizer, key)`` finds it."""
        return self

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict:
        import comfy.sd1_clip as sd1

        tok = self.tokenizer
        words: list[tuple[int, float, int]] = []
        for segment, weight in sd1.token_weights(sd1.escape_important(text), 1.0):
            for word in tok.split(sd1.unescape_important(segment)):
                words.append((tok.index.get(word, tok.unk_token_id), float(weight), len(words) + 1))
        room = tok.max_length - 2
        if len(words) > room:
            log.warning("MiniCanvas: prompt %r has %d words; only the first %d are used", text, len(words), room)
            words = words[:room]
        row = [(tok.bos_token_id, 1.0, 0), *words, (tok.eos_token_id, 1.0, 0)]
        row += [(tok.pad_token_id, 1.0, 0)] * (tok.max_length - len(row))
        if not return_word_ids:
            row = [(t, w) for t, w, _ in row]
        return {TOKEN_KEY: [row]}

    def untokenize(self, token_weight_pair: dict) -> list:
        return [(item, self.tokenizer.vocab[item[0]]) for item in token_weight_pair[TOKEN_KEY][0]]

    def state_dict(self) -> dict:
        return {}


class MiniCanvasTextModel(nn.Module):
    """``cond_stage_model`` of the MiniCanvas CLIP: the text encoder under the attribute ``minicanvas``.

    ``encode_token_weights`` returns ``(cond [1, rows * L, d], pooled [1, d], {})``: the last hidden state
    (or, after CLIP Set Last Layer, that layer's output through the final layer norm) for the token rows of
    ``MiniCanvasTokenizer``; with prompt weights != 1 each token's encoding is moved away from the empty
    prompt's by its weight.
    """

    def __init__(self, text_encoder: nn.Module, empty_ids: Sequence[int], device: Any = None,
                 dtype: Any = None, model_options: Optional[dict] = None):
        super().__init__()
        self.minicanvas = use_comfy_ops(text_encoder)
        self.empty_ids = [int(t) for t in empty_ids]
        self.layer_idx: Optional[int] = None
        self.dtypes = {torch.float32}
        self.to(device=device, dtype=torch.float32)

    @property
    def num_layers(self) -> int:
        return len(self.minicanvas.text_model.encoder.layers)

    def set_clip_options(self, options: dict) -> None:
        layer = options.get("layer", None)
        if layer is not None:
            self.layer_idx = None if abs(int(layer)) > self.num_layers else int(layer)

    def reset_clip_options(self) -> None:
        self.layer_idx = None

    def _run(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text_model = self.minicanvas.text_model
        if self.layer_idx is None:
            out = text_model(input_ids=ids)
            return out.last_hidden_state, out.pooler_output
        out = text_model(input_ids=ids, output_hidden_states=True)
        # hidden_states[0] is the embedding; layer i's output is hidden_states[i + 1]
        index = self.layer_idx if self.layer_idx < 0 else self.layer_idx + 1
        return text_model.final_layer_norm(out.hidden_states[index]), out.pooler_output

    def encode_token_weights(self, token_weight_pairs: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        import comfy.model_management

        rows = token_weight_pairs[TOKEN_KEY]
        ids = [[int(item[0]) for item in row] for row in rows]
        weights = torch.tensor([[float(item[1]) for item in row] for row in rows], dtype=torch.float32)
        weighted = bool((weights != 1.0).any())
        if weighted:
            ids.append(self.empty_ids)
        device = next(self.parameters()).device
        z, pooled = self._run(torch.tensor(ids, dtype=torch.long, device=device))
        z = z.float()
        if weighted:
            empty, z = z[-1:], z[:-1]
            z = empty + (z - empty) * weights.to(z.device).unsqueeze(-1)
        out = comfy.model_management.intermediate_device()
        cond = z.reshape(1, -1, z.shape[-1]).to(out)
        return cond, pooled[:1].float().to(out), {}

    def load_sd(self, sd: dict) -> Any:
        return self.minicanvas.load_state_dict(sd, strict=False)


# -- ComfyUI classes that must subclass ComfyUI's own (built on first use) ---------------------------------


@functools.lru_cache(maxsize=None)
def comfy_classes() -> SimpleNamespace:
    """``latent_format`` and ``config`` classes of the MiniCanvas family (ComfyUI imported on first call)."""
    import comfy.latent_formats
    import comfy.supported_models_base

    class MiniCanvasPixels(comfy.latent_formats.LatentFormat):
        """Pixel space: the latent is the RGB image in [-1, 1] (previews show it as is)."""

        latent_channels = 3
        latent_dimensions = 2
        scale_factor = 1.0
        spacial_downscale_ratio = 1  # pixels per latent cell (ComfyUI's attribute name)

        def __init__(self) -> None:
            self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
            self.latent_rgb_factors_bias = None

    class MiniCanvasConfig(comfy.supported_models_base.BASE):
        """Model config of the MiniCanvas family (fp32, epsilon prediction, pixel latents)."""

        unet_extra_config: dict = {}
        latent_format = MiniCanvasPixels
        supported_inference_dtypes = [torch.float32]
        memory_usage_factor = 1.0

        def __init__(self, unet_config: dict, schedule: Any):
            super().__init__(unet_config)
            self.sampling_settings = {
                "beta_schedule": "sqrt_linear",  # ComfyUI's name for betas linear in beta (not in sqrt(beta))
                "linear_start": float(schedule.beta_start),
                "linear_end": float(schedule.beta_end),
                "timesteps": int(schedule.num_train_timesteps),
            }

    MiniCanvasConfig.__name__ = MiniCanvasConfig.__qualname__ = FAMILY
    return SimpleNamespace(latent_format=MiniCanvasPixels, config=MiniCanvasConfig)


# -- building MODEL, CLIP and VAE --------------------------------------------------------------------------


def build_model(canvas: MiniCanvas, clip_denoised: bool = True) -> Any:
    """A ModelPatcher around a BaseModel whose diffusion_model is a copy of ``canvas.unet``."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    config = comfy_classes().config(unet_layout(canvas.unet.config), canvas.schedule.config)
    config.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)
    base.diffusion_model = ComfyMiniUNet.from_unet(canvas.unet)
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    if clip_denoised:
        patcher.set_model_sampler_post_cfg_function(clamp_denoised)
    return patcher


def build_clip(canvas: MiniCanvas) -> Any:
    """A ``comfy.sd.CLIP`` around ``canvas.text_encoder`` and ``canvas.tokenizer``."""
    import comfy.sd
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(MiniCanvasTokenizer, MiniCanvasTextModel)
    target.params = {"text_encoder": canvas.text_encoder,
                     "empty_ids": canvas.tokenizer("").input_ids[0].tolist()}
    return comfy.sd.CLIP(target, tokenizer_data={"minicanvas_tokenizer": canvas.tokenizer},
                         model_options={"dtype": torch.float32})


def build_vae() -> Any:
    """ComfyUI's pixel-space VAE in fp32: decode maps [-1, 1] to [0, 1], encode the reverse."""
    import comfy.sd

    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)}, dtype=torch.float32)


def load_minicanvas(clip_denoised: bool = True, weights_dir: Any = None) -> tuple[Any, Any, Any]:
    """``(MODEL, CLIP, VAE)`` of the shipped MiniCanvas weights (or ``weights_dir``'s), fresh modules each call."""
    canvas = MiniCanvas.load(weights_dir, judges=False)
    return build_model(canvas, clip_denoised), build_clip(canvas), build_vae()


# -- sampling through ComfyUI's own nodes ------------------------------------------------------------------


def empty_latent(batch_size: int = 1) -> dict:
    """An all-zero MiniCanvas latent ``{"samples": [B, 3, 32, 32]}`` (what KSampler starts from)."""
    import comfy.model_management

    return {"samples": torch.zeros((batch_size, 3, IMAGE_SIZE, IMAGE_SIZE),
                                   device=comfy.model_management.intermediate_device())}


def sample_prompts(model: Any, clip: Any, vae: Any, prompts: Sequence[str], seed: int = 0, steps: int = 20,
                   cfg: float = 7.0, sampler_name: str = EXACT_SAMPLER[0], scheduler: str = EXACT_SAMPLER[1],
                   negative: str = "") -> torch.Tensor:
    """IMAGE ``[N, 32, 32, 3]`` in [0, 1]: each prompt through ComfyUI's CLIPTextEncode, KSampler and VAEDecode.

    Every prompt starts from the noise of ``seed`` (batch 1), which is the starting noise MiniCanvas' own
    sampler gives that seed, so the two samplers can be compared image for image.
    """
    import nodes as comfy_nodes  # ComfyUI's top-level nodes module (this package is imported relatively)

    encode, ksampler, decode = comfy_nodes.CLIPTextEncode(), comfy_nodes.KSampler(), comfy_nodes.VAEDecode()
    (neg,) = encode.encode(clip, negative)
    images = []
    for prompt in prompts:
        (pos,) = encode.encode(clip, prompt)
        (latent,) = ksampler.sample(model, seed, steps, cfg, sampler_name, scheduler, pos, neg, empty_latent(1))
        (image,) = decode.decode(vae, latent)
        images.append(image)
    return torch.cat(images)


# -- the node ----------------------------------------------------------------------------------------------


class MiniCanvasCheckpoint:
    """Loader of the MiniCanvas model that ships with the pack."""

    DESCRIPTION = (
        "Loads MiniCanvas, the tiny text-to-image model shipped with this pack (32x32 pixels, 8 objects x 8 "
        "styles, e.g. 'an image of a star in striped style'), as MODEL, CLIP and VAE for the stock nodes: "
        "CLIP Text Encode, KSampler, VAE Decode, LoRA loaders. Nothing to download. Start from an empty 32x32 "
        "latent (EmptyChromaRadianceLatentImage, width = height = 32: the model works in pixel space); the "
        "'ddim' sampler with the 'simple' scheduler reproduces MiniCanvas' own sampling (20 steps, cfg 7)."
    )
    CATEGORY = category("minicanvas")
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = (
        "The MiniCanvas UNet (model family 'MiniCanvas', epsilon prediction, 1000-step linear-beta schedule).",
        "The MiniCanvas text encoder and its 16-token word tokenizer.",
        "Pixel-space VAE: the latent is the image itself, [-1, 1].",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip_denoised": inp(
                    "BOOLEAN",
                    "Clamp each step's guided prediction of the clean image to the pixel range, as MiniCanvas' "
                    "own sampler does. Off: ComfyUI's plain sampling (images may wash out at high cfg).",
                    default=True),
            }
        }

    def load(self, clip_denoised: bool = True) -> tuple[Any, Any, Any]:
        return load_minicanvas(bool(clip_denoised))


NODE_CLASS_MAPPINGS = {node_id("MiniCanvasCheckpoint"): MiniCanvasCheckpoint}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("MiniCanvasCheckpoint"): "MiniCanvas Checkpoint"}
