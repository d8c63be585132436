"""Command line for ItD's text SAE: the same two steps as the ComfyUI nodes Collect Text Activations and Train SAE.

    python -m sae_core.itd.text_sae collect --model MODEL --out STORE [--layer 8] [--corpus default|FILE]
        [--prompts-max N] [--positions all|content] [--dtype float16] [--device cuda]
    python -m sae_core.itd.text_sae train --store STORE --out SAE_FOLDER [--preset default|full|minicanvas]
        [--num-latents N] [--k K] [--steps S] [--batch-size B] [--lr LR] [--topk token|batch] [--no-whiten]

``MODEL`` is ``minicanvas`` (the shipped MiniCanvas text encoder) or a transformers CLIP text encoder: a local folder
or Hub id with a ``CLIPTextModel`` and its tokenizer (``--subfolder text_encoder`` and ``--tokenizer-subfolder
tokenizer`` for a diffusers Stable Diffusion folder). Prompts are padded to 77 tokens with EOS and no attention mask,
as ComfyUI encodes SD1.x. ``--layer -1`` (default) is two thirds of the way up (8 of CLIP-L's 12). Collection is
:func:`sae_core.itd.collect.collect_text_store`, training :func:`sae_core.store_training.train_sae_on_store` (Ctrl-C
keeps a checkpoint in ``SAE_FOLDER.ckpt/``; running the same command again continues it); the SAE is written in
the folder layout (``cfg.json`` + ``sae.safetensors``) that Load SAE lists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import TrainConfig
from ..prompts import read_prompt_file
from .collect import POSITIONS, TEXT_SAE_PRESETS, collect_text_store
from .corpus import CORPUS_PATH
from .text import TextLayerSource, clip_tokenize_fn, default_layer, layer_count

__all__ = ["build_parser", "main"]


def _source(a: argparse.Namespace) -> TextLayerSource:
    import torch

    if a.model == "minicanvas":
        from ..minicanvas.canvas import MiniCanvas
        from ..minicanvas.plugins.itd import canvas_host

        host = canvas_host(MiniCanvas.load(None, judges=False, device=a.device))
        layer = default_layer(layer_count(host.model)) if a.layer < 0 else a.layer
        return host.source(layer)
    from transformers import CLIPTextModel, CLIPTokenizer

    model = CLIPTextModel.from_pretrained(a.model, subfolder=a.subfolder or "").to(a.device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(a.model, subfolder=a.tokenizer_subfolder or "")
    model.requires_grad_(False)
    torch.set_grad_enabled(False)
    layer = default_layer(layer_count(model)) if a.layer < 0 else a.layer
    return TextLayerSource(model, layer, clip_tokenize_fn(tokenizer, pad_to=77), pad_to=77, batch_size=a.batch)


def cmd_collect(a: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    prompts = read_prompt_file(CORPUS_PATH if a.corpus == "default" else a.corpus)
    if a.prompts_max:
        prompts = prompts[: a.prompts_max]
    source = _source(a)
    bar = tqdm(total=len(prompts), desc="collect text activations", unit="prompt")
    collect_text_store(source, prompts, a.out, positions=a.positions, dtype=a.dtype, overwrite=a.overwrite,
                       attrs={"model": a.model, "origin": "sae_core.itd.text_sae"},
                       on_progress=lambda n, total: bar.update(n - bar.n))
    bar.close()
    print(f"wrote {a.out}: {len(prompts)} prompts at {source.layer_path}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from ..formats import save_sae
    from ..store import ActivationReader
    from ..store_training import train_sae_on_store

    reader = ActivationReader(a.store)
    preset = dict(TEXT_SAE_PRESETS[a.preset])
    for key in ("num_latents", "k", "steps", "batch_size", "lr", "topk"):
        value = getattr(a, key)
        if value is not None:
            preset[key] = value
    if a.no_whiten:
        preset["whiten"] = False
    num_latents = int(preset["num_latents"] or reader.d * int(preset["expansion_factor"]))
    cfg = TrainConfig(batch_size=int(preset["batch_size"]), lr=float(preset["lr"]), k=int(preset["k"]),
                      num_latents=num_latents, batch_topk=preset["topk"] == "batch",
                      lr_warmup_steps=int(preset.get("lr_warmup_steps", 0)), seed=a.seed, device=a.device,
                      checkpoint_every=max(10, int(preset["steps"]) // 20), hookpoint=reader.attrs.get("hookpoint"),
                      model_family=reader.attrs.get("model_family") or reader.attrs.get("model"))
    out = Path(a.out)
    run = train_sae_on_store(reader, cfg, int(preset["steps"]), whiten=bool(preset["whiten"]),
                             checkpoint_dir=out.with_name(out.name + ".ckpt"), progress=True)
    save_sae(run.sae, out, layout="folder")
    print(f"wrote {out}: {num_latents} latents, k {cfg.k}, {run.trainer.step} steps, hookpoint {cfg.hookpoint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sae_core.itd.text_sae", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="encode a prompt corpus and store one text-encoder layer")
    c.add_argument("--model", required=True, help="'minicanvas', or a CLIP text encoder folder / Hub id")
    c.add_argument("--subfolder", default="", help="subfolder of the text encoder (e.g. text_encoder)")
    c.add_argument("--tokenizer-subfolder", default="", help="subfolder of the tokenizer (e.g. tokenizer)")
    c.add_argument("--out", required=True, type=Path, help="store folder to write")
    c.add_argument("--layer", type=int, default=-1, help="encoder layer (default -1: two thirds up, 8 of CLIP-L)")
    c.add_argument("--corpus", default="default", help="'default' (the shipped corpus) or a prompt file")
    c.add_argument("--prompts-max", type=int, default=0, help="use the first N prompts (0: all)")
    c.add_argument("--positions", choices=POSITIONS, default="all")
    c.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    c.add_argument("--batch", type=int, default=64, help="prompts per encoder call")
    c.add_argument("--device", default="cpu")
    c.add_argument("--overwrite", action="store_true", help="replace a complete store in --out")
    t = sub.add_parser("train", help="train a TopK SAE on a text-activation store")
    t.add_argument("--store", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path, help="SAE folder to write (cfg.json + sae.safetensors)")
    t.add_argument("--preset", choices=sorted(TEXT_SAE_PRESETS), default="default")
    t.add_argument("--num-latents", type=int, default=None)
    t.add_argument("--k", type=int, default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--topk", choices=("token", "batch"), default=None)
    t.add_argument("--no-whiten", action="store_true", help="train on raw activations")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return cmd_collect(a) if a.command == "collect" else cmd_train(a)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
