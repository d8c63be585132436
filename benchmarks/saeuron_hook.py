"""SAeUron hook overhead at SD1.5 shapes, measured in one run.

A stand-in for SD1.5's ``output_blocks.5.1`` (a SpatialTransformer with 1280 channels, 8 heads,
768-wide text context, GEGLU feed-forward) runs on a ``[2, 1280, 16, 16]`` CFG batch (512x512
images), with and without the SAeUron hook (SAE 1280 -> 20480, k 32, random weights; 3 selected
latents per step, thresholds low enough that some tokens fire). Prints the block time unhooked
and hooked, their ratio, and the hook alone in both error modes and when the concept is absent
(the conventional mode then only evaluates the selected latents' encoder rows).

    python benchmarks/saeuron_hook.py [--device cuda|cpu] [--repeats N] [--dtype float16]
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_core.config import SaeConfig
from sae_core.minicanvas.unet import SpatialTransformer
from sae_core.sae import SparseAutoencoder
from sae_core.saeuron import ConceptStats, SAeUronHook


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 20 on cuda, 3 on cpu)")
    ap.add_argument("--dtype", default=None, help="block/activation dtype (default float16 on cuda, float32 on cpu)")
    ap.add_argument("--latents", type=int, default=20480)
    ap.add_argument("--features", type=int, default=3, help="selected latents per step")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    torch.manual_seed(0)

    block = SpatialTransformer(1280, heads=8, context_dim=768, groups=32, ff_mult=4).to(device, dtype).eval()
    x = torch.randn(2, 1280, 16, 16, device=device, dtype=dtype)
    context = torch.randn(2, 77, 768, device=device, dtype=dtype)

    sae = SparseAutoencoder(SaeConfig(d_in=1280, num_latents=args.latents, k=32), device=device,
                            generator=torch.Generator(device=device).manual_seed(0))
    # 4 concepts x 1 step; tiny means so that mu_all is low and selected latents fire somewhere
    means = torch.rand(4, 1, args.latents, generator=torch.Generator().manual_seed(1)) * 1e-3
    stats = ConceptStats(["a", "b", "c", "d"], means)
    hooks = {mode: SAeUronHook(sae, stats, "a", gamma=-1.0, top_n=args.features, error_mode=mode, check_sae=False)
             for mode in ("conventional", "reference")}
    # the same latents with thresholds no token reaches: the concept is absent from the image
    absent = SAeUronHook(sae, ConceptStats(stats.concepts, means + 1e3), "a", gamma=-1.0, top_n=args.features,
                         check_sae=False)

    with torch.no_grad():
        y = block(x, context)
        hooks["conventional"](y, 0)
        fired = int(hooks["conventional"].last_fired.sum())

        t_block = timed(lambda: block(x, context), repeats, device)
        handle = block.register_forward_hook(hooks["conventional"].forward_hook(lambda: {"step_index": 0}))
        t_hooked = timed(lambda: block(x, context), repeats, device)
        handle.remove()
        t_hook = {mode: timed(lambda h=h: h(y, 0), repeats, device) for mode, h in hooks.items()}
        t_absent = timed(lambda: absent(y, 0), repeats, device)
        w = hooks["conventional"]._on(device)[0]
        sel = hooks["conventional"]._on(device)[1][0]
        pre_sel = torch.relu((y.permute(0, 2, 3, 1).reshape(-1, 1280).float() - w.b_dec) @ w.W_enc[sel.indices].T
                             + w.b_enc[sel.indices])
        candidates = int((pre_sel > sel.thresholds).any(1).sum())

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"dtype {str(dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}, repeats {repeats}")
    print(f"activation [2, 1280, 16, 16] (512 tokens), SAE 1280 -> {args.latents}, k 32, "
          f"{args.features} features/step, candidate tokens {candidates}/512, edited {fired}/512")
    print(f"block unhooked           {t_block * 1e3:9.2f} ms")
    print(f"block + SAeUron hook     {t_hooked * 1e3:9.2f} ms   hooked/unhooked = {t_hooked / t_block:.2f}x")
    print(f"hook alone, conventional {t_hook['conventional'] * 1e3:9.2f} ms")
    print(f"hook alone, reference    {t_hook['reference'] * 1e3:9.2f} ms   (full encode + decode + error term)")
    print(f"hook alone, concept absent {t_absent * 1e3:7.2f} ms   (conventional; no token passes the screen)")


if __name__ == "__main__":
    main()
