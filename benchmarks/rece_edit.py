"""Wall time of a UCE + RECE edit at SD1.5 shapes (random weights and embeddings).

Shapes: the 16 ``attn2`` blocks of SD1.5 (channels 320, 320, 640, 640, 1280, 1280 down; 1280 mid;
1280 x3, 640 x3, 320 x3 up), each with ``to_k`` and ``to_v`` of ``[C, 768]``: 32 matrices. Prompts are 77
random token rows of CLIP-like norm. Settings: the nudity task (UCE start with the empty prompt preserved,
then 3 RECE epochs, lambda_reg 0.1, one preserve prompt).

    python benchmarks/rece_edit.py [--threads 2] [--repeats 5] [--dtype float32] [--device cpu]

Prints the median and best wall time of the whole edit (UCE start + epochs + dense deltas and factors), the
process CPU time (robust when other jobs share the cores), and a breakdown of the phases that touch the
weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_core.rece.closed_form import edit_from_factors, gram
from sae_core.rece import RECE_PRESETS, rece_edit, uce_start

SD15_CHANNELS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
SD15_BLOCKS = [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"] + [
    f"output_blocks.{i}.1" for i in range(3, 12)
]


def sd15_weights(dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``to_k`` / ``to_v`` weights of SD1.5's 16 cross-attention blocks (ComfyUI key names)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for block, ch in zip(SD15_BLOCKS, SD15_CHANNELS):
        for proj in ("to_k", "to_v"):
            name = f"diffusion_model.{block}.transformer_blocks.0.attn2.{proj}.weight"
            w = torch.randn(ch, 768, generator=gen) / 768 ** 0.5
            weights[name] = w.to(device=device, dtype=dtype)
    return weights


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (after one warm-up run)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = args.device

    weights = sd15_weights(dtype, device)
    gen = torch.Generator().manual_seed(1)
    concept = torch.randn(77, 768, generator=gen).to(device)  # "nudity": BOS, word, EOS, 74 x pad
    anchor = torch.randn(77, 768, generator=gen).to(device)  # " " (== ""): BOS, EOS, 75 x pad
    cfg = RECE_PRESETS["nudity"]

    def run():
        start = uce_start([concept], [3], anchor, 2, preserve=[anchor])  # UCE: lam 0.5, s_p = 1.0
        return rece_edit(weights, concept, anchor, anchor, cfg, start=start)  # preserve [" "]

    run()  # warm-up
    times, cpu = [], []
    for _ in range(args.repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        result = run()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    ranks = sorted({result.factors[n][1].shape[0] for n in result.factors})
    n_params = sum(w.numel() for w in weights.values())
    print(f"device={device} threads={torch.get_num_threads()} dtype={args.dtype} matrices={len(weights)} "
          f"params={n_params / 1e6:.2f}M factor rank={ranks}")
    print(f"UCE + {cfg.epochs} RECE epochs (nudity settings), whole edit incl. dense deltas and factors: "
          f"wall median {statistics.median(times):.3f} s, best {min(times):.3f} s; "
          f"process CPU time median {statistics.median(cpu):.3f} s ({args.repeats} runs)")

    # breakdown: the two phases that touch the weights, timed alone (best of the repeats)
    def best(fn) -> float:
        out = []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
        return min(out)

    rank = ranks[-1]
    gen64 = torch.Generator().manual_seed(2)
    a = torch.randn(768, rank, generator=gen64, dtype=torch.float64).to(device)
    b = torch.randn(rank, 768, generator=gen64, dtype=torch.float64).to(device)
    dtypes = {n: w.dtype for n, w in weights.items()}
    t_gram = best(lambda: gram(weights.values()))
    t_final = best(lambda: edit_from_factors({n: w.to(torch.float64) @ a for n, w in weights.items()}, b, dtypes))
    t_total = min(times)
    print(f"breakdown (best): Gram sum W^T W {t_gram:.3f} s; factors W A + dense deltas at rank {rank} "
          f"{t_final:.3f} s; everything else (7 Cholesky factorisations, solves, [ctx, ctx] products) "
          f"~{max(t_total - t_gram - t_final, 0.0):.3f} s")


if __name__ == "__main__":
    main()
