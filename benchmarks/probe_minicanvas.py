"""Does a soft prompt bring an erased MiniCanvas concept back? Concept Inversion Probe against each method's
erased MODEL, scored by the Erasure Report's MiniCanvas judges, inside ComfyUI.

For each method (the node path of ``benchmarks/comfy_minicanvas.py``, the bench's settings) and concept: the
original model samples ``--samples`` images of ``an image of a <object> in <style> style`` (objects star, heart,
...), Concept Inversion Probe searches ``--steps`` steps against the erased model, and the report samples the
probe and the concept prompts at ``--seeds`` on both models. Printed: how many images show the concept (the
judge's verdict), for the concept's own prompts and for the probe.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/probe_minicanvas.py \\
        --method rece --erase style:striped --steps 200
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import comfy_minicanvas as bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="rece", help=f"one of {', '.join(bench.METHODS)}")
    ap.add_argument("--erase", default="style:striped", metavar="KIND:NAME")
    ap.add_argument("--steps", type=int, default=200, help="probe search steps")
    ap.add_argument("--samples", type=int, default=4, help="images of the concept the search fits")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--seeds", default="100,101,102,103,104,105,106,107",
                    help="seeds of the report's images (not the search's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", default=None, help="save the report's before/after grid (PNG) here")
    a = ap.parse_args()
    kind, _, name = a.erase.partition(":")
    if kind not in ("style", "object") or not name:
        ap.error("--erase is style:NAME or object:NAME")
    comfy_path = os.environ.get("COMFYUI_PATH", "").strip()
    if not comfy_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (and run with its venv)")
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    base = Path(tempfile.mkdtemp(prefix="ce-probe-bench-"))
    try:
        bench.configure_comfyui(Path(comfy_path).resolve(), base)
        import comfy.utils
        import nodes

        comfy.utils.PROGRESS_BAR_ENABLED = False
        from sae_core.minicanvas import MiniCanvas
        from sae_core.minicanvas.data import OBJECTS, STYLES

        canvas = MiniCanvas.load()
        runner = bench.NodeBench(canvas)
        g = bench.Graph()
        ckpt = g.add("CE_MiniCanvasCheckpoint", clip_denoised=True)
        model, clip = g.out(ckpt, 0), g.out(ckpt, 1)
        erased, erased_clip = bench.METHODS[a.method](g, kind, [name], model, clip)
        # the report is what we read; the graph's other outputs only feed it
        concept_prompts = ([f"an image of a {o} in {name} style" for o in OBJECTS[:2]] if kind == "style" else
                           [f"an image of a {name} in {s} style" for s in STYLES[:2]])
        probe = g.add("CE_ConceptInversionProbe", model=model, clip=clip, erased_model=erased,
                      concept_prompt=concept_prompts[0], samples=a.samples, steps=a.steps, lr=a.lr,
                      batch_size=min(4, a.samples), seed=0, sample_steps=20, cfg=7.0, sampler_name="ddim",
                      scheduler="simple", width=32, height=32)
        report = g.add("CE_ErasureReport", model=model, clip=clip, erased_model=erased, vae=g.out(ckpt, 2),
                       concept_prompts="\n".join(concept_prompts), retain_prompts="",
                       seeds=", ".join(map(str, seeds)), concept_kind=kind, concept=name, steps=20, cfg=7.0,
                       sampler_name="ddim", scheduler="simple", erased_clip=erased_clip, probe=g.out(probe, 0))
        nodes.NODE_CLASS_MAPPINGS.setdefault(bench.KEEP_NODE, bench.KeepImage)
        g.add(bench.KEEP_NODE, images=g.out(report, 0), key="grid")
        start = time.perf_counter()
        runner.execute(g)
        seconds = time.perf_counter() - start
        outputs = runner.executor.history_result["outputs"]
        texts = [t for out in outputs.values() for t in out.get("text", [])]
        print(f"{a.method} erasing {kind} '{name}': probe searched {a.steps} steps on {a.samples} images "
              f"(graph {seconds:.0f} s)")
        for t in texts:
            print(t)
        grid = bench.KEPT.pop("grid")
        if a.grid:
            from PIL import Image

            Image.fromarray((grid[0].clamp(0, 1) * 255).round().byte().numpy()).save(a.grid)
            print(f"grid saved to {a.grid}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
