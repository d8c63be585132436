"""SAE training throughput at SAeUron's shape: dense vs sparse decode, measured in one run.

    python benchmarks/sae_train.py                 # cuda if available, else cpu
    python benchmarks/sae_train.py --device cpu --batch 1024 --steps 3
    python benchmarks/sae_train.py --dead 0        # no dead latents: AuxK never runs

Defaults: d_in 1280, 20480 latents, k 32, BatchTopK (as in training), batch 4096 tokens of random
data. Each decode path gets ``--warmup`` untimed steps, then ``--steps`` timed full training steps
(forward, FVU + AuxK loss, backward, clipping, gradient projection, Adam). Encoder and decoder
forward passes are also timed on their own. On CPU the default is 1 warm-up + 3 timed steps; a
smaller ``--batch`` is allowed there and is reported in the output.

A freshly initialised SAE has no dead latent (one is dead after ``dead_feature_threshold`` =
10 M tokens without firing), so a short run would never reach AuxK. ``--dead N`` (default 1000,
about what SAeUron's own training reports) marks ``N`` fixed latents dead before every step by
setting the trainer's tokens-since-fired counter past the threshold, so each timed step pays
for the AuxK selection, decode and loss; ``--dead 0`` times the step without it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sae_core.config import TrainConfig
from sae_core.sae import DECODE_IMPLS
from sae_core.trainer import SaeTrainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step (SAeUron: 4096)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per decode path (cpu 3, cuda 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per decode path (cpu 1, cuda 3)")
    parser.add_argument("--d-in", type=int, default=1280)
    parser.add_argument("--latents", type=int, default=20480)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--per-token", action="store_true", help="per-token TopK instead of BatchTopK")
    parser.add_argument("--dtype", default="float32", help="forward compute dtype (autocast)")
    parser.add_argument("--dead", type=int, default=1000,
                        help="latents kept dead before each step so that AuxK runs (0: none)")
    parser.add_argument(
        "--encoder", default="fused", choices=("fused", "eager"),
        help="encoder backward: fused sparse autograd Function (default) or plain dense autograd",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    steps = args.steps if args.steps is not None else (3 if on_cpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 3)
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"d_in={args.d_in} latents={args.latents} k={args.k} batch={args.batch} tokens "
        f"{'per-token TopK' if args.per_token else 'BatchTopK'} dtype={args.dtype} encoder={args.encoder} "
        f"dead latents={args.dead} ({'AuxK on' if args.dead else 'AuxK off'})"
    )
    if args.batch != 4096:
        print(f"NOTE: batch {args.batch} differs from SAeUron's 4096 tokens (smaller batch chosen for this device)")
    if on_cpu and hasattr(os, "getloadavg"):
        print(f"load average before start: {os.getloadavg()[0]:.2f}")

    repeats = 2 if on_cpu else 10  # forward-only timings (medians)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, args.d_in, generator=gen).to(device)

    # Both trainers are built up front and their timed steps interleaved, so background load
    # on a shared machine affects the two decode paths alike.
    trainers: dict[str, SaeTrainer] = {}
    for impl in DECODE_IMPLS:
        cfg = TrainConfig(
            batch_size=args.batch, k=args.k, num_latents=args.latents, batch_topk=not args.per_token,
            device=str(device), dtype=args.dtype, log_every=10**9,
        )
        trainer = SaeTrainer(cfg, args.d_in)
        trainer.sae.decode_impl = impl
        trainer.sae.encoder_impl = args.encoder
        trainers[impl] = trainer
    dead = torch.randperm(args.latents, generator=gen)[: args.dead].to(device)

    def step(trainer: SaeTrainer) -> dict[str, float]:
        with torch.no_grad():  # untimed: these latents count as not having fired for too long
            trainer.tokens_since_fired[dead] = trainer.cfg.dead_feature_threshold + 1
        sync(device)
        start = time.perf_counter()
        metrics = trainer._train_step(x, total)
        sync(device)
        metrics["seconds"] = time.perf_counter() - start
        return metrics

    total = warmup + steps
    for _ in range(warmup):
        for trainer in trainers.values():
            step(trainer)
    step_times: dict[str, list[float]] = {impl: [] for impl in trainers}
    last: dict[str, float] = {}
    for _ in range(steps):
        for impl, trainer in trainers.items():
            last = step(trainer)
            step_times[impl].append(last["seconds"])
    print(f"last step: dead fraction {last['dead_frac']:.4f}, AuxK loss {last['auxk']:.4g}, FVU {last['fvu']:.4g}")
    results: dict[str, float] = {}
    for impl, times in step_times.items():
        per_step = sum(times) / len(times)
        results[impl] = args.batch / per_step
        print(f"train step [{impl:>6} decode]: {per_step * 1e3:9.1f} ms/step  {results[impl]:10.0f} tokens/s")

    sae = trainers["sparse"].sae
    with torch.no_grad():
        enc_time = timed(lambda: sae.select_topk(sae.pre_acts(x)), device, repeats, 0 if on_cpu else 2)
        acts, idx = sae.select_topk(sae.pre_acts(x))
        fwd = {impl: timed(lambda: sae.decode(acts, idx, impl=impl), device, repeats, 1 if on_cpu else 2) for impl in DECODE_IMPLS}

    print(f"encoder forward (pre-acts + {'per-token' if args.per_token else 'Batch'}TopK, no grad): {enc_time * 1e3:9.1f} ms")
    for impl, seconds in fwd.items():
        print(f"decoder forward [{impl:>6}] (no grad):                 {seconds * 1e3:9.1f} ms")
    ratio = results["sparse"] / results["dense"]
    print(f"training throughput sparse/dense = {ratio:.2f}x  -> faster: {'sparse' if ratio > 1 else 'dense'}")
    print(f"decoder forward dense/sparse time = {fwd['dense'] / fwd['sparse']:.2f}x")


if __name__ == "__main__":
    main()
