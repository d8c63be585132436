"""Fidelity of MiniCanvas inside ComfyUI: judged accuracy of ComfyUI's sampling vs MiniCanvas' own sampler.

Generates the 72 evaluation prompts of ``python -m sae_core bench`` (8 objects x 8 styles, plus the 8
unstyled prompts; one seed) twice: through ComfyUI's stock nodes (CLIPTextEncode, KSampler, VAEDecode) on
the MODEL / CLIP / VAE of the MiniCanvas Checkpoint node, and with MiniCanvas' own DDIM sampler. The
MiniCanvas judges score both; the script prints object and style accuracy of each, how many prompts the two
agree on, and the largest pixel difference.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/comfy_minicanvas.py \\
        [--steps 20] [--cfg 7] [--seed 0] [--sampler ddim] [--scheduler simple] [--no-clip-denoised]

ComfyUI is configured as tests/comfy does (``--cpu``, a temporary base directory) and loads the pack with
its own loader. ``judged_prompts(model, clip, vae, ...)`` takes any MODEL / CLIP, so an erasure node's
output can be measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


class PromptResult(NamedTuple):
    """One generated image: what the prompt asked for and what the judges saw."""

    text: str
    object_idx: int
    style_idx: int
    """-1 for an unstyled prompt."""
    object_pred: int
    style_pred: int


def configure_comfyui(comfy_root: Path, base: Path) -> Any:
    """ComfyUI on ``sys.path`` with ``--cpu`` and ``base`` as base directory; returns the pack's minicanvas module."""
    if not (comfy_root / "nodes.py").is_file():
        raise SystemExit(f"COMFYUI_PATH={comfy_root} is not a ComfyUI checkout (no nodes.py)")
    sys.path.insert(0, str(comfy_root))
    import comfy.cli_args

    for sub in ("models", "output", "input", "temp", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    args = comfy.cli_args.args
    args.cpu = True
    args.base_directory = str(base)
    args.disable_api_nodes = True
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(REPO_ROOT))):
        raise SystemExit("ComfyUI could not load the pack (see the log above)")
    return sys.modules[str(REPO_ROOT).replace(".", "_x_") + ".nodes.minicanvas"]


def judge(canvas: Any, specs: Sequence[Any], images: torch.Tensor) -> list[PromptResult]:
    """Judge images ``[N, 3, 32, 32]`` in [0, 1] made from ``specs`` (one image per spec)."""
    pred = canvas.judge(images)
    return [PromptResult(s.text, s.object_idx, s.style_idx, int(o), int(st))
            for s, o, st in zip(specs, pred.objects.tolist(), pred.styles.tolist())]


def judged_prompts(helpers: Any, model: Any, clip: Any, vae: Any, canvas: Any, specs: Sequence[Any], seed: int,
                   steps: int, cfg: float, sampler: str, scheduler: str) -> tuple[list[PromptResult], torch.Tensor]:
    """Each spec's prompt sampled through ComfyUI's nodes on ``model`` / ``clip`` / ``vae``, then judged."""
    with torch.inference_mode():
        images = helpers.sample_prompts(model, clip, vae, [s.text for s in specs], seed, steps, cfg, sampler,
                                        scheduler).movedim(-1, 1)
    return judge(canvas, specs, images), images


def accuracy(results: Sequence[PromptResult]) -> tuple[float, float]:
    """(object accuracy over every prompt, style accuracy over the styled prompts), as the bench reports them."""
    from sae_core.minicanvas.metrics import EvalTable, base_accuracy

    cols = np.array([(r.object_idx, r.style_idx, r.object_pred, r.style_pred) for r in results]).T
    return base_accuracy(EvalTable(*cols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="ddim", help="ComfyUI sampler name (default ddim)")
    parser.add_argument("--scheduler", default="simple", help="ComfyUI scheduler name (default simple)")
    parser.add_argument("--no-clip-denoised", action="store_true",
                        help="load the model without the per-step clamp of the predicted image")
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH", "").strip()
    if not comfy_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (and run with its venv)")
    torch.set_num_threads(a.threads)
    base = Path(tempfile.mkdtemp(prefix="ce-comfy-bench-"))
    try:
        helpers = configure_comfyui(Path(comfy_path).resolve(), base)
        import comfy.utils

        comfy.utils.PROGRESS_BAR_ENABLED = False
        from sae_core.minicanvas import MiniCanvas, evaluation_prompts

        canvas = MiniCanvas.load()
        specs = evaluation_prompts()
        with torch.inference_mode():
            model, clip, vae = helpers.load_minicanvas(clip_denoised=not a.no_clip_denoised)

        t0 = time.perf_counter()
        ours, ours_images = judged_prompts(helpers, model, clip, vae, canvas, specs, a.seed, a.steps, a.cfg,
                                           a.sampler, a.scheduler)
        t_comfy = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref_images = canvas.sample([s.text for s in specs], a.seed, a.steps, a.cfg)
        t_canvas = time.perf_counter() - t0
        ref = judge(canvas, specs, ref_images)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    same = sum(r.object_pred == q.object_pred and r.style_pred == q.style_pred for r, q in zip(ours, ref))
    print(f"{len(specs)} prompts, seed {a.seed}, {a.steps} steps, cfg {a.cfg}; ComfyUI sampler {a.sampler} / "
          f"{a.scheduler}, clip_denoised {not a.no_clip_denoised}")
    print(f"{'sampler':<28}{'object acc':>11}{'style acc':>11}{'time s':>9}")
    for name, results, t in (("ComfyUI (stock nodes)", ours, t_comfy), ("MiniCanvas canvas.sample", ref, t_canvas)):
        obj, sty = accuracy(results)
        print(f"{name:<28}{100 * obj:>10.1f}%{100 * sty:>10.1f}%{t:>9.1f}")
    print(f"judges agree on {same}/{len(specs)} prompts; max |pixel difference| "
          f"{(ours_images - ref_images).abs().max().item():.2e} (images in [0, 1])")


if __name__ == "__main__":
    main()
