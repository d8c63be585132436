"""SAeUron hook cost at full SDXL shapes, as a fraction of one SDXL UNet step, measured in one run.

ComfyUI's own SDXL UNet (``comfy.supported_models.SDXL`` with SDXL base's layout: 320/640/1280 channels, no
attention at the first level, transformer depth 2 and 10, 2048-wide context, 2816-wide ADM input; about
2.6 B parameters) is built with seeded random weights and run on a CFG batch (``--batch 2``) of
``--size`` x ``--size`` images (1024: 128x128 latents, 77 tokens of context). The SAeUron edit is the one the
Concept Block node applies (``sae_core.saeuron.build_concept_edit``), on one of the blocks the sdxl-unbox SAEs
hook (``--block``, default ``output_blocks.1.1`` = up.0.1; 1280 channels, 32x32 tokens at 1024), reading the
block's update (source ``diff``) with an SAE of sdxl-unbox's shape (1280 -> 5120 latents, k 10, random
weights) and ``--features`` selected latents per step whose thresholds some tokens pass. Prints:

* the edit alone per call, on the block's real input and output (the concept's latents are the ones most
  often active on that update, so the edit fires on many tokens: the costly case);
* one UNet forward unhooked and hooked, the slowdown, and the edit as a share of the forward.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/saeuron_hook_sdxl.py [--device cuda|cpu] [--dtype bfloat16]
        [--size 1024] [--batch 2] [--block output_blocks.1.1] [--repeats N] [--threads N]

Only ComfyUI's model code is imported (no server, no pack). On a CPU the default dtype is bfloat16 (fp32 SDXL
weights take 10 GB and run about five times slower on CPUs with bf16 matrix units); the SAE math is float32
either way, as the node runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from sdxl_unet import build_sdxl, sync, timed

REPO_ROOT = Path(__file__).resolve().parents[1]

class Position:
    """A sampler position for the edit: one timestep, every row prompted (no cond mask: both CFG halves)."""

    def __init__(self, timestep: float) -> None:
        self.t = timestep

    def timestep(self) -> float:
        return self.t

    def sigma(self) -> None:
        return None

    def run_step(self) -> None:
        return None

    def cond_mask(self) -> None:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="UNet dtype (default float16 on cuda, bfloat16 on cpu)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (latents are size / 8)")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one CFG pair)")
    ap.add_argument("--block", default="output_blocks.1.1", help="hooked block (input_blocks.8.1, middle_block.1, "
                                                                 "output_blocks.0.1 or output_blocks.1.1)")
    ap.add_argument("--latents", type=int, default=5120)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--features", type=int, default=3, help="selected latents per step")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 20 on cuda, 1 on cpu, where the "
                                                              "first forward is the only warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()

    comfy_root = os.environ.get("COMFYUI_PATH", "").strip()
    if not comfy_root or not (Path(comfy_root) / "comfy").is_dir():
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (its SDXL model class is what is measured)")
    sys.path.insert(0, comfy_root)
    sys.path.insert(1, str(REPO_ROOT))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    import comfy.cli_args

    comfy.cli_args.args.cpu = not on_cuda

    from sae_core.capture import to_tokens
    from sae_core.config import SaeConfig
    from sae_core.sae import SparseAutoencoder
    from sae_core.saeuron import (
        BlockRef,
        ConceptBlockSettings,
        ConceptStats,
        build_concept_edit,
        encode_topk_fp32,
    )

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if on_cuda else torch.bfloat16)
    repeats = args.repeats or (20 if on_cuda else 1)

    t0 = time.perf_counter()
    unet = build_sdxl(device, dtype).diffusion_model.eval()
    n_params = sum(p.numel() for p in unet.parameters())
    t_build = time.perf_counter() - t0

    g = torch.Generator().manual_seed(1)
    b, lat = args.batch, args.size // 8
    x = torch.randn(b, 4, lat, lat, generator=g).to(device, dtype)
    t = torch.full((b,), 500.0, device=device)
    context = torch.randn(b, 77, 2048, generator=g).to(device, dtype)
    y = torch.randn(b, 2816, generator=g).to(device, dtype)

    block = unet.get_submodule(args.block)
    width = int(block.in_channels)
    sae = SparseAutoencoder(SaeConfig(d_in=width, num_latents=args.latents, k=args.k), device=device,
                            generator=torch.Generator(device=device).manual_seed(0))
    sae.cfg.extra["source"] = "diff"
    host = type("Host", (), {"find_block": lambda self, name: BlockRef(args.block, block, width)})()
    pos = Position(500.0)

    with torch.inference_mode():
        captured = {}

        def keep(_module, inputs, output):  # returns None: the output is left as it is
            captured.setdefault("io", (inputs[0], output))

        handle = block.register_forward_hook(keep)
        t0 = time.perf_counter()
        unet(x, t, context=context, y=y)  # also the warm-up of the timed forwards
        sync(device)
        t_first = time.perf_counter() - t0
        handle.remove()
        x_in, out = captured["io"]
        # the concept's latents: the ones most often among a token's top-k on this update, so the edit fires on
        # many tokens (the costly case); the other concepts' means are small, so the thresholds are low
        _, idx = encode_topk_fp32(sae, to_tokens(out - x_in))
        common = idx.flatten().bincount(minlength=args.latents).float().topk(args.features).indices.cpu()
        means = torch.rand(4, 1, args.latents, generator=torch.Generator().manual_seed(2)) * 1e-3
        means[0, 0, common] = 1e-2
        stats = ConceptStats(["a", "b", "c", "d"], means, schedule=torch.tensor([500.0]), hookpoint=args.block)
        edit = build_concept_edit(host, sae, stats, ConceptBlockSettings(concepts=("a",), gamma=-1.0,
                                                                         top_n=args.features))
        edited = edit((x_in,), out, pos)
        fired = int(edit.hook.last_fired.sum()) if edit.hook.last_fired is not None else 0
        tokens = out.shape[0] * out.shape[2] * out.shape[3]
        path = "fast" if edit.hook.uses_fast(out.device) else "screened"
        t_edit = timed(lambda: edit((x_in,), out, pos), max(repeats, 3), device)
        t_unet = timed(lambda: unet(x, t, context=context, y=y), repeats, device, warmup=on_cuda)
        handle = block.register_forward_hook(lambda _m, a, o: edit(a, o, pos))
        t_hooked = timed(lambda: unet(x, t, context=context, y=y), repeats, device, warmup=on_cuda)
        handle.remove()

    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    print(f"device {device} ({name}), UNet dtype {str(dtype).removeprefix('torch.')}, threads "
          f"{torch.get_num_threads()}, repeats {repeats}, torch {torch.__version__}")
    print(f"SDXL UNet (ComfyUI's class, SDXL base layout, random weights): {n_params / 1e9:.2f} B params, built in "
          f"{t_build:.0f} s; input [{b}, 4, {lat}, {lat}] ({args.size}x{args.size} images), context [{b}, 77, 2048]")
    print(f"hooked block {args.block}: {tuple(out.shape)} ({tokens} tokens), source diff, SAE {width} -> "
          f"{args.latents}, k {args.k}, {args.features} features/step, {path} path; edited {fired}/{tokens} tokens, "
          f"changed output: {not torch.equal(edited, out)}")
    print(f"first forward (warm-up)   {t_first * 1e3:10.1f} ms")
    print(f"edit alone                {t_edit * 1e3:10.1f} ms per call")
    print(f"UNet forward unhooked     {t_unet * 1e3:10.1f} ms")
    print(f"UNet forward hooked       {t_hooked * 1e3:10.1f} ms   slowdown {100 * (t_hooked / t_unet - 1):+.2f}%")
    print(f"edit / UNet forward       {100 * t_edit / t_unet:10.2f} %")


if __name__ == "__main__":
    main()
