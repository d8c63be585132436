"""Cost of Selective Amnesia's replay target, measured in one run.

Times :meth:`sae_core.amnesia.AmnesiaTrainer.train_step` (surrogate + replay + EWC, LoRA on the
cross-attention) with ``replay_target="noise"`` (the reference: regress onto the drawn eps) and
``replay_target="base"`` (regress onto the frozen model's prediction: one extra forward pass
without gradients over the replay half), and prints both and their ratio.

Presets:

* ``sd15``: an SD1.5-shaped UNet (320 channels, multipliers 1/2/4/4, two ResBlocks per level,
  attention on the first three levels, 8 heads, 768-wide context, 77 tokens) on 64x64 latents
  (512x512 images), random weights. The default on CUDA.
* ``minicanvas``: the shipped MiniCanvas UNet's shape on 32x32 images. The default on CPU.

    python benchmarks/amnesia_step.py [--preset sd15|minicanvas] [--device cuda|cpu] [--batch N] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from sae_core.amnesia import AmnesiaConfig, AmnesiaTrainer, SampleSet
from sae_core.amnesia.ewc import fisher_key
from sae_core.amnesia.lora import inject_lora
from sae_core.minicanvas.diffusion import NoiseSchedule
from sae_core.minicanvas.unet import MiniUNet, UNetConfig

PRESETS = {
    # (UNet config, sample shape, context tokens)
    "sd15": (UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                        attention_levels=(0, 1, 2), num_heads=8, context_dim=768, groups=32, ff_mult=4), (4, 64, 64), 77),
    "minicanvas": (UNetConfig(), (3, 32, 32), 16),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model shape (default: sd15 on cuda, minicanvas on cpu)")
    ap.add_argument("--batch", type=int, default=None, help="surrogate examples per step (as many replay; default 2 sd15, 8 minicanvas)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per target (after one warm-up step)")
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()

    device = torch.device(args.device)
    preset = args.preset or ("sd15" if device.type == "cuda" else "minicanvas")
    config, shape, tokens = PRESETS[preset]
    batch = args.batch or (2 if preset == "sd15" else 8)
    torch.manual_seed(0)
    base = MiniUNet(config).to(device).eval().requires_grad_(False)
    n = 4 * batch
    surrogate = SampleSet(torch.rand(n, *shape) * 2 - 1, ["surrogate"] * n)
    replay = SampleSet(torch.rand(n, *shape) * 2 - 1, [f"remember {i % 4}" for i in range(n)])
    table: dict[str, torch.Tensor] = {}

    def encode(prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            table.setdefault(p, torch.randn(tokens, config.context_dim, generator=torch.Generator().manual_seed(len(table))))
        return torch.stack([table[p] for p in prompts]).to(device)

    schedule = NoiseSchedule()
    times: dict[str, float] = {}
    peak: dict[str, float] = {}
    params = 0
    for target in ("noise", "base"):
        unet = copy.deepcopy(base)
        loras = inject_lora(unet, "xattn", args.rank, generator=torch.Generator().manual_seed(0))
        params = sum(p.numel() for a in loras.values() for p in (a.up, a.down))
        fisher = {fisher_key(name): torch.rand(a.base.weight.shape, device=device) for name, a in loras.items()}
        cfg = AmnesiaConfig(steps=args.repeats + 1, lr=1e-4, batch_size=batch, lam=1.0, seed=0, replay_target=target)
        trainer = AmnesiaTrainer(cfg, unet, schedule.alphas_cumprod, encode, loras, surrogate, "forget", replay=replay,
                                 fisher=fisher, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train_step()  # warm-up
        samples = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        samples.sort()
        times[target] = samples[len(samples) // 2]
        if device.type == "cuda":
            peak[target] = torch.cuda.max_memory_allocated(device) / 2**30
        del trainer, unet, loras, fisher

    unet_params = sum(p.numel() for p in base.parameters())
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"threads {torch.get_num_threads()}, preset {preset}: UNet {unet_params / 1e6:.1f} M parameters, "
          f"samples {list(shape)}, LoRA rank {args.rank} on the cross-attention ({params / 1e6:.2f} M), "
          f"batch {batch} surrogate + {batch} replay, median of {args.repeats} steps")
    print(f"replay_target=noise  {times['noise'] * 1e3:9.1f} ms/step")
    print(f"replay_target=base   {times['base'] * 1e3:9.1f} ms/step   base/noise = {times['base'] / times['noise']:.2f}x")
    if peak:
        print(f"peak GPU memory: noise {peak['noise']:.2f} GiB, base {peak['base']:.2f} GiB "
              f"(base/noise = {peak['base'] / peak['noise']:.2f}x)")


if __name__ == "__main__":
    main()
