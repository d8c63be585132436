"""Train the MiniCanvas judges and diffusion model on CPU.

Usage::

    python -m sae_core.minicanvas.train judges              # object + style judges (~10 min, 1 core)
    python -m sae_core.minicanvas.train diffusion           # text encoder + UNet (~60 min, 2 cores)
    python -m sae_core.minicanvas.train diffusion --resume  # continue from the last checkpoint
    python -m sae_core.minicanvas.train export              # checkpoint -> package weights (EMA, fp16)

Everything is deterministic under ``--seed`` (data, initialisation, batches, noise), and a
resumed run continues exactly where the checkpoint left it. The diffusion recipe (see
:class:`DiffusionTrainConfig`): epsilon prediction with the loss weighted
min(1 / abar_t, 30) (clamped v-prediction MSE), 10% empty prompts for classifier-free
guidance, from step 598 on a training-only linear probe that makes every text token after
the object word carry the object, AdamW with warm-up and a cosine decay to 10% at step
1300 (constant after; ``--late-lr-from`` raises it to a constant fraction of the peak again
while the shapes are still improving), EMA of the weights. The run writes a resumable checkpoint
(safetensors + JSON, under ``--run-dir``) every ``--checkpoint-every`` seconds and exports
the EMA weights to ``--out`` at each checkpoint and at the end, so a partial model can be
evaluated while training goes on.
"""

from __future__ import annotations

import os

# Spinning OpenMP workers collapse throughput when other processes share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import files
from .data import OBJECTS, STYLES, make_dataset, prompt_for
from .diffusion import NoiseSchedule, ScheduleConfig, diffusion_loss
from .judges import JudgeCNN, JudgeConfig, augment
from .text_encoder import TextEncoderConfig, build_text_encoder
from .tokenizer import WordTokenizer
from .unet import MiniUNet, UNetConfig


@dataclass
class JudgeTrainConfig:
    """Judge training run."""

    seed: int = 0
    """Seed of data, initialisation and batches."""
    per_combo: int = 150
    """Training images per (object, style) pair."""
    heldout_per_combo: int = 25
    """Held-out images per pair (drawn from seed + 1000)."""
    epochs: int = 8
    """Passes over the training images for the object judge."""
    style_epochs: int = 2
    """Passes for the style judge (colour and texture are learnt fast)."""
    batch_size: int = 128
    """Images per step."""
    lr: float = 2e-3
    """AdamW learning rate (cosine decay to zero)."""


@dataclass
class DiffusionTrainConfig:
    """Diffusion training run."""

    seed: int = 0
    """Seed of data, initialisation, batches and noise."""
    per_combo: int = 300
    """Training images per (object, style) pair, generated once at start."""
    steps: int = 1900
    """Optimizer steps."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    warmup: int = 100
    """Linear warm-up steps; then cosine decay to lr * final_lr_frac at lr_decay_steps."""
    lr_decay_steps: int = 1300
    """End of the cosine decay; later steps keep lr * final_lr_frac."""
    final_lr_frac: float = 0.1
    """Learning rate at and after lr_decay_steps, as a fraction of the peak."""
    late_lr_from: int | None = None
    """From this step on the learning rate is the constant lr * late_lr_frac (None: never).
    The cosine decay to 10% at step 1300 starves the object shapes, which are still being
    learnt long after the colours and textures have converged; the shipped run raises the
    rate again at step 1979."""
    late_lr_frac: float = 0.3
    """Learning rate from ``late_lr_from`` on, as a fraction of the peak."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    ema_decay: float = 0.999
    """EMA decay cap; the effective decay is min(cap, (1 + step) / (10 + step))."""
    p_uncond: float = 0.1
    """Probability that a sample is trained with the empty prompt "" (for CFG)."""
    p_unstyled: float = 0.25
    """Probability (of the rest) that a sample gets the prompt without its style."""
    min_snr_gamma: float = 5.0
    """Min-SNR loss weighting (0 disables) before ``shape_phase_from``."""
    shape_phase_from: int = 0
    """From this step on the loss is weighted min(1 / abar_t, shape_weight_max) (clamped
    v-prediction MSE). Min-SNR weighting learns colours and textures quickly but leaves the
    noisy steps, where the object's silhouette is decided, nearly unweighted; the default
    uses the clamped v weighting from the start."""
    shape_weight_max: float = 30.0
    """Clamp of the 1 / abar_t weight in the shape phase."""
    probe_from: int = 598
    """From this step on, linear probes on the text encoder's output ask every token from the
    object word on to tell the object (and from the style word on, the style); discarded
    after training. Without it the jointly trained encoder keeps the object only in two
    of sixteen tokens and the UNet learns styles long before objects."""
    probe_weight: float = 0.05
    """Weight of the probe cross-entropy added to the diffusion loss."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    """UNet shape."""
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Text-encoder shape."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Noise schedule."""
    max_length: int = 16
    """Tokenizer padded length."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet"] = self.unet.to_dict()
        return d


# ----------------------------------------------------------------------------- judges


def train_judges(cfg: JudgeTrainConfig, out_dir: Path, threads: int = 2) -> dict[str, float]:
    """Train object and style judges; save them to ``out_dir``; return held-out accuracies."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    print(f"generating {cfg.per_combo} + {cfg.heldout_per_combo} images per pair ...", flush=True)
    train = make_dataset(cfg.per_combo, cfg.seed)
    held = make_dataset(cfg.heldout_per_combo, cfg.seed + 1000)
    x = torch.from_numpy(train.images).permute(0, 3, 1, 2).float() / 255.0
    xh = torch.from_numpy(held.images).permute(0, 3, 1, 2).float() / 255.0
    results, tensors, configs = {}, {}, {}
    for kind, labels, hlabels, n in (
        ("object", train.objects, held.objects, len(OBJECTS)),
        ("style", train.styles, held.styles, len(STYLES)),
    ):
        g = torch.Generator().manual_seed(cfg.seed + (1 if kind == "object" else 2))
        jc = JudgeConfig(num_classes=n)
        torch.manual_seed(cfg.seed + (11 if kind == "object" else 12))
        model = JudgeCNN(jc)
        model.train()
        y = torch.from_numpy(labels)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
        steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
        epochs = cfg.epochs if kind == "object" else cfg.style_epochs
        total = epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        bar = tqdm(total=total, desc=f"{kind} judge")
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(steps_per_epoch):
                idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                loss = torch.nn.functional.cross_entropy(model(augment(x[idx], g)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        model.eval()
        acc = (model.predict(xh) == torch.from_numpy(hlabels)).float().mean().item()
        print(f"{kind} judge held-out accuracy: {100 * acc:.2f}%", flush=True)
        results[kind] = acc
        tensors.update(files.prefixed(model.state_dict(), f"{kind}.", torch.float16))
        configs[kind] = jc.to_dict()
    out_dir = Path(out_dir)
    files.save_tensors(out_dir / files.JUDGES_FILE, tensors)
    files.update_json(out_dir / files.CONFIG_FILE, "judges", {**configs, "train": asdict(cfg),
                                                              "heldout_accuracy": results})
    print(f"saved judges to {out_dir / files.JUDGES_FILE}")
    return results


# -------------------------------------------------------------------------- diffusion


class _Joint(torch.nn.Module):
    """Text encoder + UNet as one module (for one optimizer / one EMA)."""

    def __init__(self, text_encoder: torch.nn.Module, unet: MiniUNet):
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet


class _TextProbe(torch.nn.Module):
    """Training-only linear probes: object from every token from the object word on, style
    from every token from the style word on (prompt layout ``<bos> an image of a OBJ in STY style``)."""

    OBJECT_POS, STYLE_POS = 5, 7

    def __init__(self, hidden: int, n_objects: int, n_styles: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.object_head = torch.nn.Linear(hidden, n_objects)
        self.style_head = torch.nn.Linear(hidden, n_styles)
        with torch.no_grad():
            for lin in (self.object_head, self.style_head):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * hidden ** -0.5)
                lin.bias.zero_()

    def forward(self, h: torch.Tensor, objects: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy
        loss = h.new_zeros(())
        has_obj = objects >= 0
        if has_obj.any():
            ho = h[has_obj, self.OBJECT_POS:]
            loss = loss + ce(self.object_head(ho).flatten(0, 1),
                             objects[has_obj].repeat_interleave(ho.shape[1]))
        has_sty = styles >= 0
        if has_sty.any():
            hs = h[has_sty, self.STYLE_POS:]
            loss = loss + ce(self.style_head(hs).flatten(0, 1), styles[has_sty].repeat_interleave(hs.shape[1]))
        return loss


def _lr_factor(step: int, cfg: DiffusionTrainConfig) -> float:
    if cfg.late_lr_from is not None and step >= cfg.late_lr_from:
        return cfg.late_lr_frac
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.lr_decay_steps - cfg.warmup)
    return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def _opt_tensors(opt, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in enumerate(opt.state_dict()["state"].values()):
        for k, v in st.items():
            out[f"{prefix}.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_opt(opt, t: dict[str, torch.Tensor], prefix: str) -> None:
    sd = opt.state_dict()
    n = len([p for g in sd["param_groups"] for p in g["params"]])
    ids = [p for g in sd["param_groups"] for p in g["params"]]
    for i in range(n):
        st = {k[len(f"{prefix}.{i}."):]: v for k, v in t.items() if k.startswith(f"{prefix}.{i}.")}
        if st:
            sd["state"][ids[i]] = st
    opt.load_state_dict(sd)


def _save_checkpoint(run_dir: Path, step: int, joint, ema, opt, gen: torch.Generator, cfg, elapsed: float,
                     probe=None, probe_opt=None) -> None:
    tensors = files.prefixed(joint.state_dict(), "model.")
    tensors.update(files.prefixed(ema.state_dict(), "ema."))
    tensors.update(_opt_tensors(opt, "opt"))
    if probe is not None:
        tensors.update(files.prefixed(probe.state_dict(), "probe."))
        tensors.update(_opt_tensors(probe_opt, "probe_opt"))
    tensors["rng"] = gen.get_state()
    files.save_tensors(run_dir / "checkpoint.safetensors", tensors)
    files.save_json(run_dir / "checkpoint.json", {"step": step, "elapsed_s": elapsed, "config": cfg.to_dict()})


def _load_checkpoint(run_dir: Path, joint, ema, opt, gen: torch.Generator, probe=None,
                     probe_opt=None) -> tuple[int, float]:
    meta = files.load_json(run_dir / "checkpoint.json")
    t = files.load_tensors(run_dir / "checkpoint.safetensors")
    joint.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
    _load_opt(opt, t, "opt")
    if probe is not None and any(k.startswith("probe.") for k in t):
        probe.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("probe.")})
        _load_opt(probe_opt, t, "probe_opt")
    gen.set_state(t["rng"])
    return int(meta["step"]), float(meta.get("elapsed_s", 0.0))


def export_weights(ema: _Joint, cfg: DiffusionTrainConfig, tokenizer: WordTokenizer, out_dir: Path,
                   step: int, elapsed: float) -> None:
    """Write the EMA text encoder + UNet (fp16) and the model sections of config.json."""
    out_dir = Path(out_dir)
    tensors = files.prefixed(ema.unet.state_dict(), "unet.", torch.float16)
    tensors.update(files.prefixed(ema.text_encoder.state_dict(), "text_encoder.", torch.float16))
    files.save_tensors(out_dir / files.MODEL_FILE, tensors, metadata={"step": str(step)})
    path = out_dir / files.CONFIG_FILE
    obj = files.load_json(path) if path.is_file() else {}
    obj.update(
        unet=cfg.unet.to_dict(),
        text_encoder=cfg.text_encoder.to_dict(),
        tokenizer=tokenizer.to_dict(),
        schedule=asdict(cfg.schedule),
        objects=list(OBJECTS),
        styles=list(STYLES),
        diffusion_train={"config": cfg.to_dict(), "step": step, "elapsed_s": round(elapsed, 1)},
    )
    obj.setdefault("sampling", {"steps": 20, "cfg": 7.0})
    files.save_json(path, obj)


def train_diffusion(cfg: DiffusionTrainConfig, run_dir: Path, out_dir: Path, resume: bool = False,
                    threads: int = 2, checkpoint_every: float = 300.0, log_every: int = 25) -> None:
    """Train the text encoder and UNet jointly (epsilon loss, CFG text dropout, EMA)."""
    torch.set_num_threads(threads)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = WordTokenizer.default(cfg.max_length)
    torch.manual_seed(cfg.seed)
    text_encoder = build_text_encoder(cfg.text_encoder, tokenizer)
    cfg.unet.context_dim = cfg.text_encoder.hidden_size
    unet = MiniUNet(cfg.unet)
    joint = _Joint(text_encoder, unet)
    ema = copy.deepcopy(joint).requires_grad_(False)
    schedule = NoiseSchedule(cfg.schedule)
    decay, no_decay = [], []
    for n, p in joint.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    probe = _TextProbe(cfg.text_encoder.hidden_size, len(OBJECTS), len(STYLES), cfg.seed + 13)
    probe_opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr)
    start, elapsed0 = 0, 0.0
    if resume and (run_dir / "checkpoint.json").is_file():
        start, elapsed0 = _load_checkpoint(run_dir, joint, ema, opt, gen, probe, probe_opt)
        print(f"resumed from step {start}", flush=True)

    print(f"generating {cfg.per_combo} images per pair ({cfg.per_combo * 64} total) ...", flush=True)
    data = make_dataset(cfg.per_combo, cfg.seed)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()  # uint8
    objects = torch.from_numpy(data.objects)
    styles = torch.from_numpy(data.styles)
    # prompt table: row o * (S + 1) + s for styled (s < S), s == S for unstyled; last row ""
    S = len(STYLES)
    prompts = [prompt_for(o, s if s < S else None) for o in range(len(OBJECTS)) for s in range(S + 1)] + [""]
    prompt_ids = tokenizer(prompts).input_ids
    empty_row = len(prompts) - 1
    row_object = torch.tensor([o for o in range(len(OBJECTS)) for _ in range(S + 1)] + [-1])
    row_style = torch.tensor([s if s < S else -1 for _ in range(len(OBJECTS)) for s in range(S + 1)] + [-1])
    n_params = sum(p.numel() for p in joint.parameters())
    print(f"params: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
          f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, total {n_params / 1e6:.2f}M",
          flush=True)

    joint.train()
    t0 = time.time()
    last_ckpt = t0
    run_loss, run_mse, run_probe, n_avg = 0.0, 0.0, 0.0, 0
    bar = tqdm(total=cfg.steps, initial=start, desc="diffusion", mininterval=10)
    for step in range(start, cfg.steps):
        idx = torch.randint(0, len(objects), (cfg.batch_size,), generator=gen)
        u = torch.rand(cfg.batch_size, generator=gen)
        v = torch.rand(cfg.batch_size, generator=gen)
        rows = objects[idx] * (S + 1) + torch.where(v < cfg.p_unstyled, torch.full_like(idx, S), styles[idx])
        rows = torch.where(u < cfg.p_uncond, torch.full_like(rows, empty_row), rows)
        x0 = images[idx].float() / 127.5 - 1.0
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg)
        context = joint.text_encoder(prompt_ids[rows]).last_hidden_state
        probe_loss = probe(context, row_object[rows], row_style[rows]) if step >= cfg.probe_from else None
        if step >= cfg.shape_phase_from:
            weighting, wval = "v_clamped", cfg.shape_weight_max
        else:
            weighting, wval = ("min_snr", cfg.min_snr_gamma) if cfg.min_snr_gamma else ("none", 0.0)
        out = diffusion_loss(joint.unet, schedule, x0, context, generator=gen,
                             weighting=weighting, weighting_value=wval)
        opt.zero_grad(set_to_none=True)
        total = out.loss
        if probe_loss is not None:
            probe_opt.zero_grad(set_to_none=True)
            total = total + cfg.probe_weight * probe_loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(joint.parameters(), cfg.grad_clip)
        opt.step()
        if probe_loss is not None:
            probe_opt.step()
            run_probe += probe_loss.item()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), joint.parameters()):
                pe.lerp_(pm, 1.0 - d)
        run_loss += out.loss.item()
        run_mse += out.mse.item()
        n_avg += 1
        bar.update(1)
        done = step + 1
        if done % log_every == 0 or done == cfg.steps:
            el = time.time() - t0
            rate = el / (done - start)
            print(f"step {done}/{cfg.steps} loss {run_loss / n_avg:.4f} mse {run_mse / n_avg:.4f} "
                  f"probe {run_probe / n_avg:.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {rate:.2f}s/step eta {rate * (cfg.steps - done) / 60:.1f}min",
                  flush=True)
            run_loss, run_mse, run_probe, n_avg = 0.0, 0.0, 0.0, 0
        if time.time() - last_ckpt > checkpoint_every or done == cfg.steps:
            el = elapsed0 + time.time() - t0
            _save_checkpoint(run_dir, done, joint, ema, opt, gen, cfg, el, probe, probe_opt)
            export_weights(ema, cfg, tokenizer, out_dir, done, el)
            last_ckpt = time.time()
            print(f"checkpoint at step {done} ({el / 60:.1f} min)", flush=True)
    bar.close()
    print(f"done: {cfg.steps} steps in {(elapsed0 + time.time() - t0) / 60:.1f} min; weights in {out_dir}")


def export_from_checkpoint(run_dir: Path, out_dir: Path) -> None:
    """Rebuild the models from a run's checkpoint and export its EMA weights."""
    meta = files.load_json(Path(run_dir) / "checkpoint.json")
    c = meta["config"]
    cfg = DiffusionTrainConfig(**{k: v for k, v in c.items() if k not in ("unet", "text_encoder", "schedule")},
                               unet=UNetConfig.from_dict(c["unet"]), text_encoder=TextEncoderConfig(**c["text_encoder"]),
                               schedule=ScheduleConfig(**c["schedule"]))
    tokenizer = WordTokenizer.default(cfg.max_length)
    ema = _Joint(build_text_encoder(cfg.text_encoder, tokenizer), MiniUNet(cfg.unet))
    t = files.load_tensors(Path(run_dir) / "checkpoint.safetensors")
    ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
    export_weights(ema, cfg, tokenizer, out_dir, int(meta["step"]), float(meta.get("elapsed_s", 0.0)))
    print(f"exported step {meta['step']} to {out_dir}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sae_core.minicanvas.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pj = sub.add_parser("judges", help="train the object and style judges")
    pd = sub.add_parser("diffusion", help="train the text encoder + UNet")
    pe = sub.add_parser("export", help="export EMA weights from a run checkpoint")
    for p in (pj, pd, pe):
        p.add_argument("--out", type=Path, default=files.WEIGHTS_DIR, help="weights folder (default: package weights)")
    for p in (pj, pd):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    pj.add_argument("--epochs", type=int, default=JudgeTrainConfig.epochs)
    pj.add_argument("--per-combo", type=int, default=JudgeTrainConfig.per_combo)
    pd.add_argument("--steps", type=int, default=DiffusionTrainConfig.steps)
    pd.add_argument("--batch-size", type=int, default=DiffusionTrainConfig.batch_size)
    pd.add_argument("--lr", type=float, default=DiffusionTrainConfig.lr)
    pd.add_argument("--late-lr-from", type=int, default=DiffusionTrainConfig.late_lr_from,
                    help="step from which the learning rate is the constant lr * --late-lr-frac")
    pd.add_argument("--late-lr-frac", type=float, default=DiffusionTrainConfig.late_lr_frac)
    pd.add_argument("--per-combo", type=int, default=DiffusionTrainConfig.per_combo)
    pd.add_argument("--model-channels", type=int, default=UNetConfig.model_channels)
    pd.add_argument("--resume", action="store_true", help="continue from --run-dir's checkpoint")
    pd.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints")
    for p in (pd, pe):
        p.add_argument("--run-dir", type=Path, default=Path("runs/minicanvas"), help="checkpoint folder")
    a = ap.parse_args(argv)
    if a.cmd == "judges":
        train_judges(JudgeTrainConfig(seed=a.seed, epochs=a.epochs, per_combo=a.per_combo), a.out, a.threads)
    elif a.cmd == "diffusion":
        cfg = DiffusionTrainConfig(seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                                   per_combo=a.per_combo, late_lr_from=a.late_lr_from,
                                   late_lr_frac=a.late_lr_frac, unet=UNetConfig(model_channels=a.model_channels))
        train_diffusion(cfg, a.run_dir, a.out, resume=a.resume, threads=a.threads,
                        checkpoint_every=a.checkpoint_every)
    else:
        export_from_checkpoint(a.run_dir, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
