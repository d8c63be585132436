"""Wall time of a UCE / RECE edit at SD1.5 or SDXL shapes (random weights and embeddings).

Shapes (``--model``):

- ``sd15``: the 16 ``attn2`` blocks of SD1.5 (channels 320, 320, 640, 640, 1280, 1280 down; 1280 mid; 1280 x3,
  640 x3, 320 x3 up), each with ``to_k`` and ``to_v`` of ``[C, 768]``: 32 matrices, 19.2 M parameters.
- ``sdxl``: the 70 ``attn2`` blocks of SDXL (``input_blocks.4/5`` and ``output_blocks.3/4/5`` at 640 wide with 2
  transformer blocks each; ``input_blocks.7/8``, ``middle_block`` and ``output_blocks.0/1/2`` at 1280 wide with 10
  each), ``to_k`` and ``to_v`` of ``[C, 2048]``: 140 matrices, 340.8 M parameters; plus the pooled text input's
  layer ``label_emb.0.0`` ``[1280, 2816]`` (1280 pooled columns) for the pooled edit.

Prompts are 77 random token rows of CLIP-like norm (and one pooled vector per prompt). Settings: the nudity task
(UCE start with the empty prompt preserved, then RECE epochs with lambda_reg 0.1, one preserve prompt).

    python benchmarks/rece_edit.py [--model sdxl] [--threads 2] [--repeats 5] [--epochs 0 1 3] [--dtype float32]

For each number of epochs (0 = UCE alone) it prints the median and best wall time of the whole edit
(``rece_edit``: the UCE start, the epochs and the exact low-rank factors of every delta) and the process CPU time
(robust when other jobs share the cores); then, timed alone, the phases that touch every weight and the work that
follows the edit in RECE Edit Model: the relative change per weight (from the factors), the leak probe of a UCE
edit (its float64 sum of W^T W is also what the epochs cost beyond UCE), forming every dense delta (what ComfyUI's
LoRA patches do when the model is loaded, not part of the edit), and SDXL's pooled edit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_core.rece import (
    PooledInput,
    RECEConfig,
    edit_pooled_input,
    layer_changes,
    leak_probe,
    rece_edit,
    uce_start,
)

SD15_CHANNELS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
SD15_BLOCKS = [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"] + [
    f"output_blocks.{i}.1" for i in range(3, 12)
]
SDXL_BLOCKS = [("input_blocks.4.1", 640, 2), ("input_blocks.5.1", 640, 2), ("input_blocks.7.1", 1280, 10),
               ("input_blocks.8.1", 1280, 10), ("middle_block.1", 1280, 10), ("output_blocks.0.1", 1280, 10),
               ("output_blocks.1.1", 1280, 10), ("output_blocks.2.1", 1280, 10), ("output_blocks.3.1", 640, 2),
               ("output_blocks.4.1", 640, 2), ("output_blocks.5.1", 640, 2)]
"""SDXL's cross-attention blocks: (LDM prefix, width, transformer depth); 70 attn2 layers in all."""
SDXL_POOLED, SDXL_ADM, SDXL_TIME_EMBED = 1280, 2816, 1280
"""clip_g's pooled width, the ADM input width (pooled + 6 x 256 size embeddings) and label_emb's output width."""


def _randn(shape, gen, scale, dtype, device) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def model_weights(model: str, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``to_k`` / ``to_v`` weights of every cross-attention of ``model`` (ComfyUI key names)."""
    gen = torch.Generator().manual_seed(seed)
    if model == "sd15":
        layers = [(f"{b}.transformer_blocks.0", ch) for b, ch in zip(SD15_BLOCKS, SD15_CHANNELS)]
        ctx = 768
    else:
        layers = [(f"{b}.transformer_blocks.{i}", ch) for b, ch, depth in SDXL_BLOCKS for i in range(depth)]
        ctx = 2048
    weights = {}
    for layer, ch in layers:
        for proj in ("to_k", "to_v"):
            weights[f"diffusion_model.{layer}.attn2.{proj}.weight"] = _randn((ch, ctx), gen, ctx ** -0.5, dtype, device)
    return weights


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: str, warm_up: bool = True) -> tuple[list[float], list[float], object]:
    """Wall and process CPU times of ``repeats`` runs (after one warm-up run), and the last result."""
    if warm_up:
        fn()
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", choices=["sd15", "sdxl"], help="cross-attention shapes")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (after one warm-up run)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[0, 3], help="RECE epochs to time (0 = UCE alone)")
    parser.add_argument("--slow-repeats", type=int, default=None,
                        help="timed runs of the epochs and the leak probe (default: --repeats for sd15, 1 for sdxl, "
                             "where each sums W^T W over 341 M weights in float64), without a warm-up of their own")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = args.device

    weights = model_weights(args.model, dtype, device)
    ctx = next(iter(weights.values())).shape[1]
    gen = torch.Generator().manual_seed(1)
    concept = torch.randn(77, ctx, generator=gen).to(device)  # "nudity": BOS, word, EOS, 74 x pad
    anchor = torch.randn(77, ctx, generator=gen).to(device)  # " " (== ""): BOS, EOS, 75 x pad
    n_params = sum(w.numel() for w in weights.values())
    print(f"model={args.model} device={device} threads={torch.get_num_threads()} dtype={args.dtype} "
          f"matrices={len(weights)} params={n_params / 1e6:.1f}M context={ctx}")

    def edit(epochs: int):
        start = uce_start([concept], [3], anchor, 2, preserve=[anchor])  # UCE: lam 0.5, s_p = 1.0
        return rece_edit(weights, concept, anchor, anchor, RECEConfig(epochs=epochs, lambda_reg=0.1), start=start)

    slow = args.slow_repeats or (args.repeats if args.model == "sd15" else 1)
    edit(0)  # warm-up
    result = None
    for epochs in args.epochs:
        repeats = args.repeats if epochs == 0 else slow
        walls, cpus, result = timed(lambda e=epochs: edit(e), repeats, device, warm_up=False)
        ranks = sorted({result.factors[n][1].shape[0] for n in result.factors})
        what = "UCE alone" if epochs == 0 else f"UCE + {epochs} RECE epoch{'s' * (epochs > 1)}"
        print(f"{what} (nudity settings), the whole edit (exact low-rank factors, rank {ranks}): wall median "
              f"{statistics.median(walls):.3f} s, best {min(walls):.3f} s; process CPU median "
              f"{statistics.median(cpus):.3f} s ({repeats} run{'s' * (repeats > 1)})")

    # the phases that touch every weight, and what RECE Edit Model does after the edit, each timed alone
    def best(fn, repeats: int = args.repeats, warm_up: bool = True) -> float:
        return min(timed(fn, repeats, device, warm_up)[0])

    uce = edit(0)
    rank = uce.factors[next(iter(weights))][1].shape[0]
    a = torch.randn(ctx, rank, generator=gen, dtype=torch.float64).to(device)
    wide = torch.promote_types(dtype, torch.float32)
    t_up = best(lambda: [w.to(wide) @ a.to(wide) for w in weights.values()])
    t_probe = best(lambda: leak_probe(weights, uce.deltas, concept[None], 0.1), slow, warm_up=False)
    t_changes = best(lambda: layer_changes(uce.deltas, weights))
    t_dense = best(lambda: [uce.deltas[k] for k in weights], slow, warm_up=False)
    print(f"phase (best): W A for every weight at rank {rank} (the one product of a UCE edit with the weights): "
          f"{t_up:.3f} s")
    print(f"after the edit (best): relative change of every weight from the factors {t_changes:.3f} s; leak probe "
          f"of the UCE edit (sum W^T W in float64, which the epochs need too, + low-rank terms) {t_probe:.3f} s; "
          f"every dense delta up @ down (what ComfyUI's LoRA patches compute at model load, not part of the edit) "
          f"{t_dense:.3f} s")
    if args.model == "sdxl":
        g = torch.Generator().manual_seed(3)
        layer = PooledInput("diffusion_model.label_emb.0.0.weight",
                            _randn((SDXL_TIME_EMBED, SDXL_ADM), g, SDXL_ADM ** -0.5, dtype, device), SDXL_POOLED)
        pc, pa = torch.randn(1, SDXL_POOLED, generator=g), torch.randn(1, SDXL_POOLED, generator=g)
        t_pooled = best(lambda: edit_pooled_input(layer, pc, pa, pa, probe=True))
        print(f"SDXL pooled edit (label_emb.0.0 [{SDXL_TIME_EMBED}, {SDXL_ADM}], {SDXL_POOLED} pooled columns, "
              f"with its probe): {t_pooled:.3f} s")


if __name__ == "__main__":
    main()
