"""ItD's text SAE made through the ComfyUI nodes on MiniCanvas, and the classifier it gives.

Runs, in ComfyUI (``--cpu``, a temporary base directory, the pack loaded by ComfyUI's own loader): MiniCanvas
Checkpoint -> Collect Text Activations (every MiniCanvas prompt typed into the node, all 16 positions, layer -1
= 2 of 4) -> Train SAE (the MiniCanvas recipe: 1024 latents, k 8, 1000 steps of 512 tokens, lr 1e-3, per-token
TopK, whitened). It then prints the ItD classifier's precision and recall for every style and object with that
SAE (the MiniCanvas plug-in's interpretation and calibration), copies the SAE to ``--out`` and prints the bench
commands that measure UA/IRA/CRA with it (``--option sae=...``) next to the shipped SAE.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/itd_text_sae_minicanvas.py \\
        [--out out/itd_node_sae] [--store-dtype float32|float16] [--steps 1000]
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
REPO_ROOT = HERE.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "itd_node_sae")
    ap.add_argument("--store-dtype", default="float32", choices=("float32", "float16"))
    ap.add_argument("--steps", type=int, default=1000)
    a = ap.parse_args(argv)
    root = os.environ.get("COMFYUI_PATH", "").strip()
    if not root:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (and run with its venv)")
    sys.path.insert(0, str(HERE))
    from comfy_minicanvas import configure_comfyui

    base = Path(tempfile.mkdtemp(prefix="ce-itd-sae-"))
    try:
        mc = configure_comfyui(Path(root).resolve(), base)
        pkg = mc.__name__.rsplit(".", 1)[0]
        text_sae, sae_tools = sys.modules[f"{pkg}.text_sae"], sys.modules[f"{pkg}.sae_tools"]
        from sae_core.minicanvas.canvas import MiniCanvas
        from sae_core.minicanvas.data import OBJECTS, STYLES
        from sae_core.minicanvas.plugins.itd import build_canvas_concepts, canvas_prompts, canvas_settings

        t0 = time.perf_counter()
        with torch.inference_mode():
            _, clip, _ = mc.MiniCanvasCheckpoint().load()
            (store,) = text_sae.CollectTextActivations().collect(
                clip, text_sae.NO_CORPUS, "\n".join(canvas_prompts()), -1, "all", 0, "itd/minicanvas", a.store_dtype,
                True)
            t1 = time.perf_counter()
            sae, sae_dir = sae_tools.TrainSAE().train(store, 8, 1024, 8, a.steps, 1e-3, 512, 0, "itd/minicanvas", True,
                                                      10_000_000, "cpu", "token", True)
        t2 = time.perf_counter()
        print(f"node path: collect {t1 - t0:.1f} s, train {t2 - t1:.1f} s; SAE {sae.cfg.hookpoint} "
              f"{sae.num_latents} latents k {sae.cfg.k}")
        canvas = MiniCanvas.load(None, judges=False)
        worst = 1.0
        for kind, names in (("style", STYLES), ("object", OBJECTS)):
            for name in names:
                report = build_canvas_concepts(canvas, sae, kind, canvas_settings(kind, [name])).classifier
                worst = min(worst, report.precision, report.recall)
                print(f"{kind}:{name} precision={100 * report.precision:.1f}% recall={100 * report.recall:.1f}% "
                      f"({report.tp}/{report.tp + report.fn} concept prompts, {report.fp}/{report.fp + report.tn} "
                      "others flagged)")
        print(f"lowest precision/recall over every style and object: {100 * worst:.1f}%")
        if a.out.exists():
            shutil.rmtree(a.out)
        shutil.copytree(sae_dir, a.out)
        for kind in ("style", "object"):
            print(f"python -m sae_core bench --method itd --erase {kind} --option sae={a.out}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
