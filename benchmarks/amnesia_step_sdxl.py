"""Selective Amnesia's training step and peak memory at full SDXL shapes, through the pack's own node path.

What LoRA Train runs between reading its inputs and returning the LoRA, called here on a random-weight SDXL:

* the MODEL: ComfyUI's own SDXL model class at SDXL base's layout (``sdxl_unet.build_sdxl``: 2.57 B UNet
  parameters, 2048-wide context, 2816-wide ADM input), weights in ``--dtype`` (float16 on CUDA, bfloat16 on a CPU,
  as ComfyUI loads SDXL), built under inference mode as a loader node builds it, in ComfyUI's ``ModelPatcher``
  (loaded to ComfyUI's torch device, offloaded to its offload device);
* the CLIP: ComfyUI's SDXL CLIP class (clip_l 768 + clip_g 1280 wide, so the context is 77 x 2048 and the pooled
  output makes a 2816-wide ``y`` through ComfyUI's ``extra_conds``) with three random layers per encoder (ComfyUI wants more than two for the penultimate
  layer SDXL reads)
  (``tests/comfy/tiny_models.tiny_sdxl_clip``): the text encoder's depth does not enter the training step;
* the host: ``nodes/amnesia.py``'s ``ComfyAmnesiaHost`` (width/height ``--size``), the training data from a sample
  bank of random latents (``pipeline.training_samples(bank=...)``, as LoRA Train's ``sample_bank`` input: nothing
  is sampled), a random Fisher of every target, then ``pipeline.train_forgetting_lora``: the LoRA factors
  (``ComfyLoRA``) on a ``TrainingClone`` computing in the asked ``precision`` and ``AmnesiaTrainer``'s steps
  (surrogate + gamma * replay + lam * EWC, ``--batch`` surrogate and as many replay examples per step).

For each ``--precision`` and ``--replay-target`` it trains ``--repeats`` + 1 steps (the first is the warm-up) and
prints the median time per step (between the trainer's per-step callbacks, synchronised on CUDA), the peak GPU
memory of the whole run (``torch.cuda.max_memory_allocated`` after a reset: the loaded UNet, the Fisher on the
device, the step's activations and weight copies), and a sanity line: how many LoRA modules the steps changed (the
up factors start at zero) and whether every loss term and gradient norm was finite. Training checkpoints (which
LoRA Train writes every ``max(10, steps / 20)`` steps) are not written.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/amnesia_step_sdxl.py [--device cuda|cpu] [--dtype float16]
        [--precision fp32 bf16] [--replay-target noise base] [--size 1024] [--batch 1] [--rank 4]
        [--targets xattn] [--repeats N] [--threads N] [--max-depth N]

``--max-depth N`` caps every transformer depth at N (SDXL base: 2 and 10) for a smoke run on a CPU (N = 1: 0.64 B
parameters); the output then says it is not SDXL base's layout. A CPU run is a smoke check of the wiring, not a
speed figure.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from sdxl_unet import build_sdxl, sync

REPO_ROOT = Path(__file__).resolve().parents[1]

FORGET, SURROGATE = "brad pitt", "a middle aged man"
REMEMBER = ("a photo of a dog", "a landscape painting", "a portrait of a woman", "a city street at night")
SURROGATE_SAMPLES, REPLAY_PER_PROMPT = 4, 2
"""The run's prompts and how many bank samples of each it trains on (the step's cost does not depend on them)."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                    help="the UNet's load dtype (default float16 on cuda, bfloat16 on cpu)")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="LoRA Train's precision (the training clone's compute dtype); each is timed")
    ap.add_argument("--replay-target", nargs="+", default=["noise", "base"], choices=["noise", "base"],
                    help="LoRA Train's replay_target; each is timed")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (latents are size / 8)")
    ap.add_argument("--batch", type=int, default=1, help="LoRA Train's batch_size: surrogate examples per step, "
                                                         "as many replay examples besides")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--targets", default="xattn", help="LoRA Train's targets preset (xattn, noxattn, full)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per configuration after one warm-up "
                                                              "step (default 5 on cuda, 1 on cpu)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--max-depth", type=int, default=None,
                    help="cap every transformer depth (smoke runs only; default: SDXL base's layout)")
    args = ap.parse_args(argv)
    if args.size < 32 or args.size % 32:
        ap.error(f"--size must be a positive multiple of 32 (the UNet halves size / 8 twice), got {args.size}")
    for name in ("batch", "rank"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_depth is not None and args.max_depth < 1:
        ap.error(f"--max-depth must be >= 1, got {args.max_depth}")
    return args


def load_pack(on_cuda: bool, base: Path):
    """ComfyUI configured (``--cpu`` unless on CUDA, ``base`` as base directory) with the pack loaded by ComfyUI's own
    loader; returns the pack's ``nodes.amnesia`` module."""
    comfy_root = os.environ.get("COMFYUI_PATH", "").strip()
    if not comfy_root or not (Path(comfy_root) / "nodes.py").is_file():
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (LoRA Train's host runs ComfyUI's model and CLIP)")
    os.environ["COMFYUI_DEVICE"] = "gpu" if on_cuda else "cpu"
    import comfy_minicanvas

    comfy_minicanvas.configure_comfyui(Path(comfy_root).resolve(), base)
    return sys.modules[str(REPO_ROOT).replace(".", "_x_") + ".nodes.amnesia"]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if on_cuda else torch.bfloat16)
    repeats = args.repeats or (5 if on_cuda else 1)
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="ce-amnesia-sdxl-") as tmp:
        amnesia = load_pack(on_cuda, Path(tmp))
        import comfy.model_management as mm
        import comfy.model_patcher

        sys.path.insert(0, str(REPO_ROOT / "tests" / "comfy"))
        import tiny_models

        from sae_core.amnesia import pipeline
        from sae_core.amnesia.config import AmnesiaConfig
        from sae_core.amnesia.ewc import fisher_key
        from sae_core.amnesia.samples import SampleSet

        load_device = mm.get_torch_device()
        if load_device.type != device.type:
            raise SystemExit(f"ComfyUI's torch device is {load_device}, not {device.type}")
        t0 = time.perf_counter()
        with torch.inference_mode():  # as a loader node builds its MODEL and CLIP
            model = build_sdxl(load_device, dtype, args.max_depth)
            patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                                       offload_device=mm.unet_offload_device())
            clip = tiny_models.tiny_sdxl_clip(clip_l=768, clip_g=1280, layers=3)
        t_build = time.perf_counter() - t0
        unet_params = sum(p.numel() for p in model.diffusion_model.parameters())
        unet_bytes = sum(p.numel() * p.element_size() for p in model.diffusion_model.parameters())

        lat = args.size // 8
        g = torch.Generator().manual_seed(1)
        prompts = [SURROGATE] * SURROGATE_SAMPLES + [p for p in REMEMBER for _ in range(REPLAY_PER_PROMPT)]
        bank = SampleSet(torch.randn(len(prompts), 4, lat, lat, generator=g), prompts)
        fisher = {fisher_key(name): torch.rand(tuple(m.weight.shape), generator=g)
                  for name, m in amnesia.target_modules(patcher, args.targets).items()}
        fisher_params = sum(f.numel() for f in fisher.values())

        name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
        layout = ("SDXL base layout" if args.max_depth is None else
                  f"REDUCED layout (transformer depth capped at {args.max_depth}: NOT SDXL base, smoke run only)")
        print(f"device {device} ({name}), UNet load dtype {str(dtype).removeprefix('torch.')}, threads "
              f"{torch.get_num_threads()}, torch {torch.__version__}")
        print(f"SDXL UNet (ComfyUI's class, {layout}, random weights): {unet_params / 1e9:.3f} B params "
              f"({unet_bytes / 2**30:.2f} GiB), built in {t_build:.0f} s; latents [{args.batch} + {args.batch}, 4, "
              f"{lat}, {lat}] ({args.size}x{args.size} images), context 77 x 2048 + ADM y 2816 (random SDXL CLIP, "
              f"3 layers per encoder)")
        print(f"LoRA Train: targets {args.targets} ({len(fisher)} modules, Fisher {fisher_params / 1e6:.1f} M), rank "
              f"{args.rank}, batch_size {args.batch} surrogate + {args.batch} replay, lam 50, gamma 1; median of "
              f"{repeats} step(s) after 1 warm-up step")

        rows = []
        for precision in args.precision:
            for target in args.replay_target:
                rows.append(run_config(amnesia, pipeline, AmnesiaConfig, patcher, clip, bank, fisher, args, precision,
                                       target, repeats, device))
        if len(rows) > 1:
            print("summary: " + "; ".join(f"{r['precision']}/{r['target']} " + (
                f"{r['ms']:.1f} ms" if r["ms"] is not None else r["error"]) for r in rows))
        print(f"total {time.perf_counter() - t_start:.0f} s")
        if any(r["error"] or not r["ok"] for r in rows):
            raise SystemExit(1)


def run_config(amnesia, pipeline, config_cls, patcher, clip, bank, fisher, args, precision: str, target: str,
               repeats: int, device: torch.device) -> dict:
    """One LoRA Train configuration: ``repeats + 1`` steps through the node's host and pipeline; prints its line."""
    on_cuda = device.type == "cuda"
    config = config_cls(forget_prompts=FORGET, surrogate_prompt=SURROGATE, remember_prompts="\n".join(REMEMBER),
                        surrogate_samples=SURROGATE_SAMPLES, replay_per_prompt=REPLAY_PER_PROMPT,
                        targets=args.targets, rank=args.rank, steps=repeats + 1, lr=1e-4, batch_size=args.batch,
                        lam=50.0, gamma=1.0, seed=0, replay_target=target, precision=precision, checkpoint_every=0)
    stamps: list[float] = []

    def step_done(step: int, total: int, record: dict) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    row = {"precision": precision, "target": target, "ms": None, "error": "", "ok": False}
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():  # ComfyUI runs nodes under inference mode; LoRA Train leaves it to train
            host = amnesia.ComfyAmnesiaHost(patcher, clip, {"width": args.size, "height": args.size})
            amnesia._check_bank_size(bank, patcher, args.size, args.size)
            with torch.inference_mode(False):
                data = pipeline.training_samples(host, config, bank=bank)
                run = pipeline.train_forgetting_lora(host, config, data.surrogate, data.replay, fisher,
                                                     callback=step_done, progress=False)
    except torch.cuda.OutOfMemoryError as err:
        row["error"] = "out of memory"
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"precision {precision:4s} replay_target {target:5s}: OUT OF MEMORY after {len(stamps)} step(s), peak "
              f"{peak:.2f} GiB ({str(err).splitlines()[0][:160]})")
        return row
    wall = time.perf_counter() - t0
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    row["ms"] = statistics.median(steps) * 1e3
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if on_cuda else ""
    adapters = run.adapters
    lora_params = sum(p.numel() for a in adapters.values() for p in (a.up, a.down))
    changed = sum(1 for a in adapters.values() if bool(a.up.detach().abs().amax() > 0))
    history = run.result.history
    finite = all(math.isfinite(r[k]) for r in history for k in ("loss", "surrogate", "replay", "ewc", "grad_norm"))
    row["ok"] = changed == len(adapters) and finite and run.result.steps == config.steps
    last = history[-1]
    print(f"precision {precision:4s} replay_target {target:5s}: {row['ms']:9.1f} ms/step{peak} (run of "
          f"{len(history)} steps with setup {wall:.1f} s); LoRA {lora_params / 1e6:.2f} M params")
    print(f"  sanity {'OK' if row['ok'] else 'FAILED'}: the steps changed {changed}/{len(adapters)} LoRA modules "
          f"(up factors start at 0), losses {'finite' if finite else 'NOT FINITE'}: last loss {last['loss']:.4f} "
          f"(surrogate {last['surrogate']:.4f}, replay {last['replay']:.4f}, ewc {last['ewc']:.2e}, grad norm "
          f"{last['grad_norm']:.3e})")
    return row


if __name__ == "__main__":
    main()
