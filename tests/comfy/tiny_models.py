"""Tiny SD1.x / SD2.x / SDXL models built through ComfyUI's own classes, for the tests of every method.

Each UNet is a ``comfy.supported_models`` config at toy size with seeded random weights (comfy.ops layers skip
initialisation); each text encoder is ComfyUI's CLIP class with a small config and the shipped tokenizer. The pairs
fit each other: the UNet's context width is the CLIP's token width, and the SDXL UNet's ADM input is the clip_g
pooled width plus ComfyUI's six 256-wide size/crop embeddings, so ``encode_adm`` of a real conditioning runs.

- SD1.x: context = clip_l width.
- SD2.x: context = clip_h width (penultimate layer, as SD2 conditions), v-prediction by default (SD2.x 768).
- SDXL: context = clip_l + clip_g widths, ADM = clip_g projection + 6 * 256; the layout keeps SDXL's shape at small
  size: no attention at the first level, transformer depth 2 at the second level and in the middle block.
"""

from __future__ import annotations

import torch

SDXL_SIZE_EMBEDDINGS = 6 * 256
"""Width of SDXL's size and crop conditioning (six 256-wide timestep embeddings, ``comfy.model_base.SDXL``)."""

BASE_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 32, "transformer_depth_output": [1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def init_random(named_params, seed: int) -> None:
    """Seeded random weights at a scale that keeps activations O(1); norms start near one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "token_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02
                        + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


def patcher(cfg, seed: int = 0, device: str = "cpu", model_type=None, load_device=None):
    """A ModelPatcher around ``cfg``'s model (fp32, two heads), seeded unless built on the meta device; it loads to
    ``load_device`` (default the CPU) and offloads to the CPU."""
    import comfy.model_base
    import comfy.model_patcher

    cfg.unet_config["num_heads"] = 2
    cfg.unet_config["num_head_channels"] = -1
    cfg.set_inference_dtype(torch.float32, None)
    if model_type is None:
        model = cfg.get_model({}, device=device)
    else:
        kind = comfy.model_base.SDXL if isinstance(cfg, _sdxl_class()) else comfy.model_base.BaseModel
        model = kind(cfg, model_type=model_type, device=device)
    if device != "meta":
        init_random(model.named_parameters(), seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device or cpu, offload_device=cpu)


def _sdxl_class():
    import comfy.supported_models

    return comfy.supported_models.SDXL


def tiny_sd15(seed: int = 0, context: int = 32, channels: int = 32, device: str = "cpu", load_device=None):
    """SD1.5's UNet class, two levels of one block, context ``context`` (pair with ``tiny_sd1_clip(context)``)."""
    import comfy.supported_models

    unet = {**BASE_UNET, "model_channels": channels, "context_dim": context}
    return patcher(comfy.supported_models.SD15(unet), seed, device, load_device=load_device)


def tiny_sd20(seed: int = 0, context: int = 32, v_prediction: bool = True, device: str = "cpu"):
    """SD2.x's UNet class (linear projections in the transformers), v-prediction unless asked otherwise."""
    import comfy.model_base
    import comfy.supported_models

    kind = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    unet = {**BASE_UNET, "use_linear_in_transformer": True, "context_dim": context}
    return patcher(comfy.supported_models.SD20(unet), seed, device, model_type=kind)


def tiny_sdxl(seed: int = 0, clip_l: int = 16, clip_g: int = 16, device: str = "cpu"):
    """SDXL's UNet class: context clip_l + clip_g, ADM input clip_g's pooled projection + the size embeddings;
    levels [no attention, depth 2], middle depth 2 (SDXL's layout at toy size)."""
    import comfy.supported_models

    unet = {**BASE_UNET, "adm_in_channels": clip_g + SDXL_SIZE_EMBEDDINGS, "num_classes": "sequential",
            "transformer_depth": [0, 2], "transformer_depth_middle": 2, "transformer_depth_output": [0, 0, 2, 2],
            "use_linear_in_transformer": True, "context_dim": clip_l + clip_g}
    return patcher(comfy.supported_models.SDXL(unet), seed, device)


def clip_object(tokenizer, model, options: dict, seed: int = 1):
    """A ``comfy.sd.CLIP`` of ``model`` with ``options`` and seeded weights, built under inference mode as a
    checkpoint loader builds it."""
    import comfy.sd
    import comfy.supported_models_base

    with torch.inference_mode():
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, model), model_options=options)
        init_random(clip.cond_stage_model.named_parameters(), seed)
    return clip


def small_config(width: int, layers: int = 1, **extra) -> dict:
    """A transformers-style CLIP text config of ``width`` and ``layers``."""
    return {"hidden_size": width, "num_hidden_layers": layers, "intermediate_size": 2 * width,
            "num_attention_heads": 2, **extra}


def tiny_sd1_clip(width: int = 32, layers: int = 1, seed: int = 1):
    import comfy.sd1_clip

    return clip_object(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel,
                       {"clip_l_model_config": small_config(width, layers)}, seed)


def tiny_sd2_clip(width: int = 32, layers: int = 3, seed: int = 1):
    """SD2's OpenCLIP-H text encoder class (clip_h, penultimate layer) at ``width``."""
    import comfy.text_encoders.sd2_clip as sd2

    return clip_object(sd2.SD2Tokenizer, sd2.SD2ClipModel,
                       {"clip_h_model_config": small_config(width, layers, projection_dim=width)}, seed)


def tiny_sdxl_clip(clip_l: int = 16, clip_g: int = 16, layers: int = 3, seed: int = 1):
    """SDXL's clip_l + clip_g text encoders; clip_g's pooled projection is ``clip_g`` wide."""
    import comfy.sdxl_clip

    return clip_object(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel,
                       {"clip_l_model_config": small_config(clip_l, layers),
                        "clip_g_model_config": small_config(clip_g, layers, projection_dim=clip_g)}, seed)


def tiny_vae(seed: int = 2):
    """ComfyUI's VAE class around a TAESD (the small SD autoencoder it ships) with seeded random weights:
    4 latent channels, 8x downscale, as the SD VAE."""
    import comfy.sd
    import comfy.taesd.taesd

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in comfy.taesd.taesd.TAESD(latent_channels=4).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if len(shape) > 1:  # variance-keeping convolutions: the decoded images vary across the picture
            sd[key] = torch.randn(shape, generator=g) * (2.0 / torch.Size(shape)[1:].numel()) ** 0.5
        elif len(shape) == 1:
            sd[key] = torch.randn(shape, generator=g) * 0.1
        else:  # the latent scale and shift
            sd[key] = torch.tensor(1.0 if key.endswith("scale") else 0.0)
    return comfy.sd.VAE(sd=sd)


def tiny_clip_vision(tmp_dir, projection: int = 16, seed: int = 3):
    """ComfyUI's CLIP vision model class (Load CLIP Vision's output) at toy size: 32 wide, two layers, 32 px
    images in 16 px patches, image embeddings ``projection`` wide; seeded random weights."""
    import json
    from pathlib import Path

    import comfy.clip_vision

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
              "image_size": 32, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
              "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2,
              "num_channels": 3, "num_hidden_layers": 2, "patch_size": 16, "projection_dim": projection}
    path = Path(tmp_dir) / "tiny_clip_vision.json"
    path.write_text(json.dumps(config))
    vision = comfy.clip_vision.ClipVisionModel(str(path))
    init_random(vision.model.named_parameters(), seed)
    return vision


# -- half precision, as ComfyUI runs these families on GPUs ----------------------------------------------------

HALF_DTYPES = (torch.float16, torch.bfloat16)
"""The UNet weight dtypes ComfyUI picks for SD1.x / SD2.x / SDXL on GPUs (``model_management.unet_dtype``)."""


def half_patcher(cfg, dtype: torch.dtype, manual_cast=None, seed: int = 0, model_type=None):
    """:func:`patcher` with the UNet's weights in ``dtype`` and ``manual_cast`` as ComfyUI's checkpoint loader sets
    them (``model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)``). On a GPU that computes in the weight
    dtype (fp16 and bf16 on recent cards) ``manual_cast`` is None: the layers are ``comfy.ops.disable_weight_init``
    and ``apply_model`` casts the input and context to ``dtype``. A ``manual_cast`` dtype (fp16 weights on a card
    without fast fp16: float32; bf16 weights on a card without bf16: float16) gives ``comfy.ops.manual_cast``
    layers that cast each weight to the compute dtype. Same random weights as the float32 builders (same seed),
    rounded to ``dtype``."""
    import comfy.model_base
    import comfy.model_patcher

    cfg.unet_config["num_heads"] = 2
    cfg.unet_config["num_head_channels"] = -1
    cfg.set_inference_dtype(dtype, manual_cast)
    if model_type is None:
        model = cfg.get_model({}, device="cpu")
    else:
        kind = comfy.model_base.SDXL if isinstance(cfg, _sdxl_class()) else comfy.model_base.BaseModel
        model = kind(cfg, model_type=model_type, device="cpu")
    init_random(model.named_parameters(), seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def tiny_half_unet(family: str, dtype: torch.dtype = torch.float16, manual_cast=None, seed: int = 0,
                   context: int = 32, channels: int = 32):
    """The tiny UNet of ``family`` ("SD15", "SD20" (v-prediction), "SDXL") in ``dtype`` (see :func:`half_patcher`);
    ``context`` is the CLIP width it reads (SDXL: clip_l + clip_g, halves of it), ``channels`` SD1.5's width."""
    import comfy.model_base
    import comfy.supported_models as sm

    if family == "SD15":
        cfg = sm.SD15({**BASE_UNET, "model_channels": channels, "context_dim": context})
        return half_patcher(cfg, dtype, manual_cast, seed)
    if family == "SD20":
        cfg = sm.SD20({**BASE_UNET, "use_linear_in_transformer": True, "context_dim": context})
        return half_patcher(cfg, dtype, manual_cast, seed, model_type=comfy.model_base.ModelType.V_PREDICTION)
    if family == "SDXL":
        half = context // 2
        cfg = sm.SDXL({**BASE_UNET, "adm_in_channels": half + SDXL_SIZE_EMBEDDINGS, "num_classes": "sequential",
                       "transformer_depth": [0, 2], "transformer_depth_middle": 2,
                       "transformer_depth_output": [0, 0, 2, 2], "use_linear_in_transformer": True,
                       "context_dim": context})
        return half_patcher(cfg, dtype, manual_cast, seed)
    raise ValueError(f"family: {family!r} is none of SD15, SD20, SDXL")


def tiny_half_clip(family: str, width: int = 32, dtype: torch.dtype = torch.float16, seed: int = 1,
                   layers: int | None = None):
    """The tiny CLIP of ``family`` with its weights in ``dtype`` through ComfyUI's ``dtype`` CLIP model option (the
    text encoders' default on GPUs is float16, ``model_management.text_encoder_dtype``; they compute in float32
    through ``comfy.ops.manual_cast``). ``width``: SD1 clip_l / SD2 clip_h width, SDXL clip_l + clip_g; ``layers``
    per encoder (default: SD1 one, the others three)."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd2_clip as sd2

    n = layers if layers is not None else (1 if family == "SD15" else 3)
    if family == "SD15":
        return clip_object(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel,
                           {"clip_l_model_config": small_config(width, n), "dtype": dtype}, seed)
    if family == "SD20":
        return clip_object(sd2.SD2Tokenizer, sd2.SD2ClipModel,
                           {"clip_h_model_config": small_config(width, n, projection_dim=width), "dtype": dtype}, seed)
    if family == "SDXL":
        half = width // 2
        return clip_object(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel,
                           {"clip_l_model_config": small_config(half, n),
                            "clip_g_model_config": small_config(half, n, projection_dim=half), "dtype": dtype}, seed)
    raise ValueError(f"family: {family!r} is none of SD15, SD20, SDXL")
