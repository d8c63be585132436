"""SAeUron hook cost at SD1.5 shapes, measured in one run.

A stand-in for SD1.5's ``output_blocks.5.1`` (a SpatialTransformer with 1280 channels, 8 heads,
768-wide text context, GEGLU feed-forward) runs on a ``[2, 1280, 16, 16]`` CFG batch (512x512
images), with and without the SAeUron hook (SAE 1280 -> 20480, k 32, random weights; 3 selected
latents per step, thresholds low enough that some tokens fire). Prints:

* the hook alone per call, for each implementation of the conventional mode: ``screened`` (the
  tokens passing a cheap screen are encoded; on this input most of them pass, so it is nearly a
  full encode) and ``fast`` (every token at once, no host sync; one CUDA graph on CUDA), plus the
  reference error mode and a concept that is absent from the image;
* that the two implementations agree on this input (edited tokens, largest difference);
* the block unhooked and hooked;
* the hook against one full forward of an SD1.5-shaped UNet (the repository's MiniUNet at SD1.5's
  widths: 320/640/1280/1280 channels, 2 ResBlocks per level, transformers on the first three
  levels, 4 latent channels, 64x64 latents, 77x768 context; about 860 M parameters), both as
  hook time / UNet time and as the measured UNet slowdown with the hook attached to
  ``output_blocks.5.1``.

    python benchmarks/saeuron_hook.py [--device cuda|cpu] [--repeats N] [--dtype float16] [--no-unet]
        [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_core.capture import to_tokens
from sae_core.config import SaeConfig
from sae_core.minicanvas.unet import MiniUNet, SpatialTransformer, UNetConfig
from sae_core.sae import SparseAutoencoder
from sae_core.saeuron import ConceptStats, SAeUronHook

SD15 = UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                  attention_levels=(0, 1, 2), num_heads=8, context_dim=768, groups=32, ff_mult=4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device, per_sync: int = 1) -> float:
    """Median seconds per ``fn()`` over ``repeats`` timings (after one warm-up); each timing runs
    ``fn`` ``per_sync`` times back to back and waits for the device once."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_sync):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / per_sync)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 50 on cuda, 3 on cpu)")
    ap.add_argument("--dtype", default=None, help="block/activation dtype (default float16 on cuda, float32 on cpu)")
    ap.add_argument("--latents", type=int, default=20480)
    ap.add_argument("--features", type=int, default=3, help="selected latents per step")
    ap.add_argument("--no-unet", action="store_true", help="skip the SD1.5-shaped UNet comparison")
    ap.add_argument("--compile", action="store_true", help="also time the fast path through torch.compile")
    ap.add_argument("--profile", action="store_true", help="CUDA kernels of 20 eager fast-path calls (cuda only)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    on_cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if on_cuda else torch.float32)
    repeats = args.repeats or (50 if on_cuda else 3)
    torch.manual_seed(0)

    block = SpatialTransformer(1280, heads=8, context_dim=768, groups=32, ff_mult=4).to(device, dtype).eval()
    x = torch.randn(2, 1280, 16, 16, device=device, dtype=dtype)
    context = torch.randn(2, 77, 768, device=device, dtype=dtype)

    sae = SparseAutoencoder(SaeConfig(d_in=1280, num_latents=args.latents, k=32), device=device,
                            generator=torch.Generator(device=device).manual_seed(0))
    # 4 concepts x 1 step; tiny means so that mu_all is low and selected latents fire somewhere
    means = torch.rand(4, 1, args.latents, generator=torch.Generator().manual_seed(1)) * 1e-3
    stats = ConceptStats(["a", "b", "c", "d"], means)

    def hook(path: str = "auto", mode: str = "conventional", concept_means=means, **kw) -> SAeUronHook:
        return SAeUronHook(sae, ConceptStats(stats.concepts, concept_means), "a", gamma=-1.0, top_n=args.features,
                           error_mode=mode, check_sae=False, path=path, **kw)

    hooks = {"screened": hook("screened"), "fast": hook("fast"), "fast, top-k decision": hook("fast"),
             "reference error mode": hook(mode="reference")}
    if on_cuda:
        hooks["fast, no CUDA graph"] = hook("fast")
    if args.compile:
        hooks["fast, torch.compile"] = hook("fast", compile=True)
        hooks["fast, top-k, torch.compile"] = hook("fast", compile=True)
    # the same latents with thresholds no token reaches: the concept is absent from the image
    absent = {path: hook(path, concept_means=means + 1e3) for path in ("screened", "fast")}

    with torch.no_grad():
        y = block(x, context)
        for name, h in hooks.items():
            h(y, 0)  # builds device tables (and the CUDA graph)
            if name == "fast, no CUDA graph":
                h._fast[y.device].graphs = False
            if "top-k" in name:  # membership by a top-k of every token instead of counting
                h._fast[y.device].count = False
                h._fast[y.device]._captured.clear()
        ref = hooks["screened"](y, 0)
        agree = {}  # every fast variant against the screened path: same edited tokens, largest difference
        for name, h in hooks.items():
            if name.startswith("fast"):
                out = h(y, 0)
                agree[name] = (torch.equal(h.last_fired, hooks["screened"].last_fired),
                               float((out.float() - ref.float()).abs().max()), h._fast[y.device].mode)
        engine = hooks["fast"]._fast[y.device]
        counts = engine(to_tokens(y), 0).counts.tolist()
        fired = int(hooks["screened"].last_fired.sum())
        w, sel = hooks["screened"]._on(device)[0], hooks["screened"]._on(device)[1][0]
        pre_sel = torch.relu((to_tokens(y).float() - w.b_dec) @ w.W_enc[sel.indices].T + w.b_enc[sel.indices])
        candidates = int((pre_sel > sel.thresholds).any(1).sum())

        t_hook = {name: timed(lambda h=h: h(y, 0), repeats, device) for name, h in hooks.items()}
        t_absent = {path: timed(lambda h=h: h(y, 0), repeats, device) for path, h in absent.items()}
        t_queued = timed(lambda: hooks["fast"](y, 0), max(3, repeats // 10), device, per_sync=20) if on_cuda else None
        t_block = timed(lambda: block(x, context), repeats, device)
        auto = hook()
        handle = block.register_forward_hook(auto.forward_hook(lambda: {"step_index": 0}))
        t_hooked = timed(lambda: block(x, context), repeats, device)
        handle.remove()
        parts = {}
        if on_cuda:  # the float16 product and the top-k alone, for reference
            a16 = torch.randn(512, engine.tabs.w16.shape[1], device=device, dtype=torch.float16)
            v = a16 @ engine.tabs.w16.t()
            parts["float16 product 512 x 1288 x 20480"] = timed(lambda: a16 @ engine.tabs.w16.t(), repeats, device)
            parts[f"top-{32 + 1 + engine.extra} of 512 x 20480"] = timed(lambda: v.topk(49, dim=1), repeats, device)
            hi = v[:, :args.features].float().half()
            parts[f"count above {args.features} thresholds, 512 x 20480"] = timed(
                lambda: (v[:, None, :] > hi[..., None]).sum(2), repeats, device)
            xf = to_tokens(y).float()
            parts["float32 encode 512 x 1280 x 20480"] = timed(lambda: xf @ w.W_enc.t(), repeats, device)

        t_unet = t_unet_hooked = None
        if args.profile and on_cuda:
            from torch.profiler import ProfilerActivity, profile

            fast_hook = hooks["fast"]
            for _ in range(3):
                fast_hook(y, 0)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    fast_hook._fast[y.device]._run(to_tokens(y), torch.zeros(1, dtype=torch.int64, device=device),
                                                   None)
                sync(device)
            profile_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)

        if not args.no_unet:
            del block
            unet = MiniUNet(SD15).to(device, dtype).eval()
            n_params = sum(p.numel() for p in unet.parameters())
            lat = torch.randn(2, 4, 64, 64, device=device, dtype=dtype)
            t = torch.full((2,), 500.0, device=device)
            t_unet = timed(lambda: unet(lat, t, context), repeats, device)
            handle = auto.attach(unet.output_blocks[5][1], lambda: {"step_index": 0})
            t_unet_hooked = timed(lambda: unet(lat, t, context), repeats, device)
            handle.remove()

    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    print(f"device {device} ({name}), dtype {str(dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}, "
          f"repeats {repeats}, torch {torch.__version__}")
    print(f"activation [2, 1280, 16, 16] (512 tokens), SAE 1280 -> {args.latents}, k 32, "
          f"{args.features} features/step, tokens passing the screen {candidates}/512, edited {fired}/512")
    print(f"fast path on this input: (token, latent) pairs on the edge {counts[1]}, left unresolved {counts[2]}")
    for label, (same, diff, mode) in agree.items():
        print(f"{label} ({mode}) vs screened: same edited tokens {same}, largest difference {diff:.3g}")
    for label, seconds in t_hook.items():
        print(f"hook alone, {label:<24} {seconds * 1e3:9.3f} ms per call")
    if t_queued is not None:
        print(f"hook alone, fast, 20 calls queued    {t_queued * 1e3:9.3f} ms per call (one wait per 20)")
    for path, seconds in t_absent.items():
        print(f"hook alone, concept absent, {path:<8} {seconds * 1e3:9.3f} ms per call")
    print(f"block unhooked                     {t_block * 1e3:9.3f} ms")
    print(f"block + hook ({auto.path} -> {'fast' if auto.uses_fast(device) else 'screened'})"
          f"{'':<{11 - len(auto.path)}}{t_hooked * 1e3:9.3f} ms   hooked/unhooked = {t_hooked / t_block:.2f}x")
    for label, seconds in parts.items():
        print(f"  {label:<40} {seconds * 1e3:9.3f} ms")
    if args.profile and on_cuda:
        print(profile_table)
    if t_unet is not None:
        used = "fast" if auto.uses_fast(device) else "screened"
        print(f"SD1.5-shaped UNet forward ({n_params / 1e6:.0f} M params, [2, 4, 64, 64]): {t_unet * 1e3:9.2f} ms")
        print(f"UNet + hook on output_blocks.5.1 ({used}):              {t_unet_hooked * 1e3:9.2f} ms   "
              f"slowdown {100 * (t_unet_hooked / t_unet - 1):+.1f}%")
        for label in ("screened", "fast"):
            print(f"hook alone ({label}) as a share of one UNet forward: {100 * t_hook[label] / t_unet:6.2f}%")


if __name__ == "__main__":
    main()
