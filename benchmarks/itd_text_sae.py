"""ItD text-SAE speed at CLIP-L shapes: text-activation collection (prompts/s) and SAE training (tokens/s), one run.

    python benchmarks/itd_text_sae.py                      # reduced for a CPU (see the NOTE lines it prints)
    python benchmarks/itd_text_sae.py --device cuda --full # 24576 and 524288 latents, 4096-token batches

Collection: a random-weight CLIP-L text encoder (transformers ``CLIPTextModel``: 12 layers, 768 wide, 77 tokens;
the weights do not change the cost) encodes synthetic prompts (random words, EOS padding to 77) in batches of
``--batch-prompts``; the plain encoder forward is timed against :func:`sae_core.itd.collect.collect_text_activations`
writing layer 8 at every position into a float16 activation store (the Collect Text Activations node's work).

Training: per-token TopK, k 64, d 768, for each ``--latents``: our trainer (sparse decode, fused sparse encoder
backward; the Train SAE node's trainer) against the plain dense trainer (dense decode, plain autograd), on random
rows; ``--warmup`` untimed then ``--steps`` timed full steps each, interleaved so background load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from sae_core.config import TrainConfig
from sae_core.itd.collect import TEXT_COLUMNS, collect_text_activations
from sae_core.itd.text import PromptBatch, TextLayerSource
from sae_core.store import ActivationWriter
from sae_core.trainer import SaeTrainer

D, TOKENS, LAYER, K = 768, 77, 8, 64


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clip_l(device: torch.device):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=D, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=TOKENS, bos_token_id=49406, eos_token_id=49407)
    torch.manual_seed(0)
    return CLIPTextModel(cfg).to(device).eval().requires_grad_(False)


def synthetic_tokenize(prompts):
    """Prompt i -> BOS, 8..20 pseudo-random word ids, EOS, EOS padding to 77 (no tokenizer needed)."""
    ids = torch.full((len(prompts), TOKENS), 49407, dtype=torch.int64)
    mask = torch.zeros((len(prompts), TOKENS), dtype=torch.bool)
    for row, p in enumerate(prompts):
        g = torch.Generator().manual_seed(int(p))
        n = int(torch.randint(8, 21, (1,), generator=g))
        ids[row, 0] = 49406
        ids[row, 1:n + 1] = torch.randint(0, 49406, (n,), generator=g)
        mask[row, : n + 2] = True
    return PromptBatch(ids, mask)


def bench_collection(device: torch.device, n_prompts: int, batch: int) -> None:
    model = clip_l(device)
    source = TextLayerSource(model, LAYER, synthetic_tokenize, pad_to=TOKENS, batch_size=batch)
    prompts = [str(i) for i in range(n_prompts)]
    source.residual(prompts[:batch])  # warm-up
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n_prompts, batch):
            model(input_ids=synthetic_tokenize(prompts[lo:lo + batch]).input_ids.to(device))
    sync(device)
    plain = n_prompts / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with ActivationWriter(f"{tmp}/store", d=D, dtype="float16", shard_tokens=1 << 18,
                              metadata_columns=TEXT_COLUMNS) as writer:
            rows = collect_text_activations(source, prompts, writer)
        sync(device)
        stored = n_prompts / (time.perf_counter() - start)
    print(f"collection: plain encoder {plain:9.1f} prompts/s | collect to store {stored:9.1f} prompts/s "
          f"({stored * TOKENS:,.0f} rows/s, {rows:,} rows) | store/plain = {stored / plain:.2f}x")


def bench_training(device: torch.device, latents: int, batch: int, steps: int, warmup: int) -> None:
    x = torch.randn(batch, D, generator=torch.Generator().manual_seed(0)).to(device)
    trainers = {}
    for name, (decode, encoder) in {"ours (sparse)": ("sparse", "fused"), "plain dense": ("dense", "eager")}.items():
        cfg = TrainConfig(batch_size=batch, k=K, num_latents=latents, batch_topk=False, device=str(device),
                          log_every=10**9)
        t = SaeTrainer(cfg, D)
        t.sae.decode_impl, t.sae.encoder_impl = decode, encoder
        trainers[name] = t
    total = warmup + steps
    for _ in range(warmup):
        for t in trainers.values():
            t._train_step(x, total)
    sync(device)
    times = {name: 0.0 for name in trainers}
    for _ in range(steps):
        for name, t in trainers.items():
            start = time.perf_counter()
            t._train_step(x, total)
            sync(device)
            times[name] += time.perf_counter() - start
    rate = {name: batch * steps / s for name, s in times.items()}
    print(f"training {latents:>7} latents: " + " | ".join(f"{n} {r:10.0f} tokens/s" for n, r in rate.items())
          + f" | ours/plain = {rate['ours (sparse)'] / rate['plain dense']:.2f}x")
    del trainers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="24576 and 524288 latents, 4096-token batches, 4096 prompts")
    ap.add_argument("--latents", default=None, help="comma-separated latent counts (cpu default 24576)")
    ap.add_argument("--batch", type=int, default=None, help="tokens per training step (cpu 1024, --full 4096)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts collected (cpu 256, --full 4096)")
    ap.add_argument("--batch-prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    cpu = device.type == "cpu"
    latents = [int(v) for v in (a.latents or ("24576,524288" if a.full else "24576")).split(",")]
    batch = a.batch or (4096 if a.full or not cpu else 1024)
    n_prompts = a.prompts or (4096 if a.full or not cpu else 256)
    steps = a.steps if a.steps is not None else (3 if cpu else 20)
    warmup = a.warmup if a.warmup is not None else (1 if cpu else 3)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} d={D} tokens={TOKENS} "
          f"layer={LAYER} k={K} latents={latents} batch={batch} prompts={n_prompts}")
    if cpu and hasattr(os, "getloadavg"):
        print(f"load average before start: {os.getloadavg()[0]:.2f}")
    if not a.full:
        print("NOTE: reduced run (the reference's 524288 latents and 4096-token batches need --full, on a GPU)")
    bench_collection(device, n_prompts, a.batch_prompts)
    for n in latents:
        bench_training(device, n, batch, steps, warmup)


if __name__ == "__main__":
    main()
