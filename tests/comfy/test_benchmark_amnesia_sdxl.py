"""benchmarks/amnesia_step_sdxl.py's smallest configuration runs through LoRA Train's host and pipeline (a wiring
check before GPU minutes are spent on it; about 15 s on one CPU thread)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.environ.get("COMFYUI_DEVICE", "cpu").strip().lower() == "gpu",
                    reason="on a GPU, step 6 of benchmarks/gpu_checks.sh runs this benchmark at full size")
def test_smallest_configuration_trains_the_lora_and_reports_it():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "amnesia_step_sdxl.py"), "--device", "cpu", "--size", "32",
           "--max-depth", "1", "--repeats", "1", "--threads", "1", "--precision", "bf16", "--replay-target", "base"]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    text = out.stdout
    params, attn2 = _meta_sdxl(1)
    assert "REDUCED layout (transformer depth capped at 1: NOT SDXL base" in text
    assert f"{params / 1e9:.3f} B params" in text, text
    assert f"targets xattn ({attn2} modules" in text, text
    line = re.search(r"precision bf16 replay_target base :\s+([\d.]+) ms/step", text)
    assert line and float(line.group(1)) > 0, text
    assert f"sanity OK: the steps changed {attn2}/{attn2} LoRA modules" in text and "losses finite" in text


def _meta_sdxl(depth):
    """(UNet parameters, cross-attention projections) of the benchmark's SDXL layout capped at ``depth``."""
    import comfy.supported_models
    import torch

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from sdxl_unet import sdxl_layout
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    unet = comfy.supported_models.SDXL(sdxl_layout(depth)).get_model({}, device="meta").diffusion_model
    attn2 = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attn2." in n]
    return sum(p.numel() for p in unet.parameters()), len(attn2)
