"""ComfyUI's own SDXL UNet at SDXL base's layout with seeded random weights, and the timing helpers of the SDXL
benchmarks (``saeuron_hook_sdxl.py``, ``amnesia_step_sdxl.py``).

Not a benchmark itself. The scripts import it by name (``benchmarks/`` is the script's folder, first on
``sys.path``); ComfyUI's ``comfy`` package must be importable and configured (``comfy.cli_args.args.cpu``) before
:func:`build_sdxl` is called.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
"""SDXL base's UNet layout, as ComfyUI detects it from sd_xl_base_1.0."""

SDXL_CONTEXT, SDXL_TOKENS, SDXL_ADM = 2048, 77, 2816
"""Context width (clip_l 768 + clip_g 1280), tokens per prompt, ADM input width (clip_g pooled 1280 + 6 x 256)."""


def sdxl_layout(max_depth: int | None = None) -> dict[str, Any]:
    """:data:`SDXL_UNET`, or with every transformer depth capped at ``max_depth`` (>= 1; a reduced model for smoke
    runs: same widths, context and ADM input, fewer transformer layers per block)."""
    layout = dict(SDXL_UNET)
    if max_depth is None:
        return layout
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1 (SDXL base has 2 and 10), got {max_depth}")
    for key in ("transformer_depth", "transformer_depth_output"):
        layout[key] = [min(d, max_depth) for d in layout[key]]
    layout["transformer_depth_middle"] = min(layout["transformer_depth_middle"], max_depth)
    return layout


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: bool = True) -> float:
    """Median seconds per ``fn()`` over ``repeats`` runs (after one warm-up run unless ``warmup`` is off)."""
    if warmup:
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def random_init(module: torch.nn.Module, seed: int) -> None:
    """Seeded weights at a scale that keeps activations O(1) (ComfyUI's layers skip initialisation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                w = torch.randn(p.shape, generator=g).mul_(0.5 / p[0].numel() ** 0.5)
            else:
                w = torch.randn(p.shape, generator=g).mul_(0.02)
                if "norm" in name and name.endswith("weight"):
                    w += 1.0
            p.copy_(w)


def build_sdxl(device: torch.device, dtype: torch.dtype, max_depth: int | None = None, seed: int = 0) -> Any:
    """ComfyUI's SDXL model (``comfy.model_base.SDXL`` from ``comfy.supported_models.SDXL``) at SDXL base's layout
    (:func:`sdxl_layout`), weights in ``dtype`` computed in ``dtype`` (no manual cast, as ComfyUI loads SDXL on a GPU
    with fast fp16/bf16), made on ``device`` with seeded random weights. Its UNet is ``.diffusion_model``."""
    import comfy.supported_models

    cfg = comfy.supported_models.SDXL(sdxl_layout(max_depth))
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, device=device)
    random_init(model.diffusion_model, seed)
    return model
