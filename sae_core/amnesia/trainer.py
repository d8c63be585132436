"""Selective Amnesia: LoRA training with a surrogate objective, generative replay and EWC.

The objective minimised at every step (``methods/selective_amnesia.md`` §1.2, the reference
code's form, no 1/2 on the penalty):

    L = L_surrogate + gamma * L_replay + lam * sum_layers sum_ij F_ij * (s * B A)_ij ** 2

* ``L_surrogate``: eps-prediction MSE (mean over elements, then over the batch) of surrogate
  samples -- images of a harmless stand-in, e.g. "a middle aged man" for a celebrity or uniform
  noise -- conditioned on a *forget* prompt. It is MINIMISED: the forget prompt learns to
  produce the surrogate. (Gradient ascent on the forget concept, the paper's "naive" variant,
  is unstable and is not offered.)
* ``L_replay``: the same loss on samples the frozen base model generated for *remember*
  prompts, each conditioned on its own prompt (generative replay).
* EWC: the exact penalty on LoRA deltas (:mod:`sae_core.amnesia.ewc`), F the diagonal Fisher of
  the base weights (:mod:`sae_core.amnesia.fisher`).

The surrogate and replay halves draw their timesteps and noise independently; forget prompts
are drawn uniformly per example (``"sexual, nudity, naked"`` -> one of the three). There is no
text dropout. Everything random in step ``i`` comes from a CPU generator seeded by
``(seed, i)``, so runs are deterministic for a seed and a resumed run continues exactly as an
uninterrupted one would.

The trainer is generic: it needs an eps-prediction denoiser ``eps(x_t, t, context)`` (a UNet
called as ``unet(x, t, context)``), the ``alphas_cumprod`` of its schedule, a text encoder
``encode(prompts) -> [B, L, D]`` and LoRA factors (:func:`sae_core.amnesia.lora.inject_lora`
layers on a model copy, or :class:`sae_core.amnesia.lora.LoRADelta` weight functions). Hosts
reach it through :func:`sae_core.amnesia.pipeline.train_forgetting_lora`.

Checkpoints
-----------
One safetensors file: the LoRA factors (``lora.<module>.up`` / ``.down``), the AdamW state
(``optim.<i>.<field>``) and metadata (step, identity, config, loss history). The identity is
everything that shapes the run (config except ``steps``/``checkpoint_every`` and the Fisher-only
fields, LoRA shapes, a digest of the data); :mod:`sae_core.amnesia.resumable` decides from it
whether a file is resumed, reused (``steps`` reached; raise ``steps`` to continue) or refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from ..artefacts import Action, ArtefactError, load_tensors, read_metadata, save_tensors
from ..plots import PALETTE
from ..prompts import parse_names
from .config import FISHER_ONLY_FIELDS, AmnesiaConfig, ForgetPrompts
from .ewc import ewc_backward, prepare_fisher
from .fisher import eps_mse_loss, sample_generator
from .resumable import decide_checkpoint, run_units
from .samples import SampleSet, normalise

__all__ = [
    "CHECKPOINT_FORMAT",
    "LOSS_TERMS",
    "AmnesiaResult",
    "AmnesiaTrainer",
    "step_generator",
    "forget_lists",
    "prompts_to_encode",
    "loss_curve_image",
]

CHECKPOINT_FORMAT = "sae_core.amnesia.checkpoint"
"""``format`` metadata field of a training checkpoint."""

LOSS_TERMS = ("loss", "surrogate", "replay", "ewc")

CHECKPOINT_REMEDY = ("it is kept: train these settings under another run name (another checkpoint), re-queue with "
                     "that run's settings to continue it, or delete the checkpoint to start that run over")
"""What the refusal of a checkpoint from other settings advises (a training run has no overwrite switch)."""
"""Logged loss terms: the total and its three parts (``replay`` is unweighted, ``ewc`` includes lam)."""

PathLike = Union[str, os.PathLike]
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Encoder = Callable[[list[str]], torch.Tensor]


def step_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of step ``index`` of a run seeded with ``seed`` (a hash of both)."""
    return sample_generator(seed, index)


# --------------------------------------------------------------------------- training


class AmnesiaResult(NamedTuple):
    """Outcome of :meth:`AmnesiaTrainer.train`."""

    history: list[dict[str, float]]
    """One record per step done so far (including steps restored from a checkpoint):
    ``step``, ``loss``, ``surrogate``, ``replay``, ``ewc``, ``grad_norm``."""
    steps: int
    """Steps done."""
    stopped: bool
    """True when ``should_stop`` ended the run before ``config.steps``."""


def forget_lists(surrogate: SampleSet, forget_prompts: ForgetPrompts) -> list[list[str]]:
    """The forget prompts of every surrogate sample: a shared list, or the list of its surrogate prompt."""
    if isinstance(forget_prompts, Mapping):
        table = {k: parse_names(v) for k, v in forget_prompts.items()}
        missing = sorted({p for p in surrogate.prompts if not table.get(p)})
        if missing:
            raise ValueError(f"forget_prompts has no forget prompt for the surrogate prompt(s) {missing[:3]}")
        return [table[p] for p in surrogate.prompts]
    shared = parse_names(forget_prompts)
    if not shared:
        raise ValueError("forget_prompts: no forget prompt was given")
    return [shared] * len(surrogate)


def prompts_to_encode(per_sample: Sequence[Sequence[str]], replay: Optional[SampleSet]) -> list[str]:
    """Every distinct prompt a run conditions on, sorted: the order :class:`AmnesiaTrainer` encodes them in."""
    replay_prompts = list(replay.prompts) if replay is not None else []
    return sorted({p for lst in per_sample for p in lst} | set(replay_prompts))


class AmnesiaTrainer:
    """Trains LoRA factors with the Selective Amnesia objective (see the module docstring).

    Args:
        config: the run's settings (validated when it was built); the trainer reads the objective,
            optimiser and checkpoint fields.
        denoiser: ``eps(x_t, t, context)``; ``x_t`` ``[B, ...]``, ``t`` int64 ``[B]``, context ``[B, L, D]``.
            It must run through the LoRA factors (a model with injected layers, or one whose
            weights are patched by :class:`~sae_core.amnesia.lora.LoRADelta` functions).
        alphas_cumprod: ``[T]`` cumulative products of (1 - beta) of the denoiser's schedule.
        encode: ``encode(prompts) -> [B, L, D]``, called once per distinct prompt at construction.
        adapters: ``{module name: LoRA layer or LoRADelta}``; their ``up``/``down`` are trained.
        surrogate: surrogate samples; each is trained with a forget prompt.
        forget_prompts: the forget prompt(s): a comma-separated string or a list (one drawn
            uniformly per example), or a mapping ``{surrogate sample's prompt: forget prompt(s)}``
            that pairs each surrogate sample with forget prompts of its own (e.g. the styled prompt
            of the object the surrogate image shows).
        replay: remember samples, each trained with its own prompt (may be None when gamma = 0).
        fisher: ``{key: F}`` covering every adapter (see :func:`sae_core.amnesia.ewc.prepare_fisher`);
            may be None when lam = 0.
        device: where samples, contexts and the Fisher live (default: the adapters' device).
    """

    def __init__(
        self,
        config: AmnesiaConfig,
        denoiser: Denoiser,
        alphas_cumprod: torch.Tensor,
        encode: Encoder,
        adapters: Mapping[str, nn.Module],
        surrogate: SampleSet,
        forget_prompts: ForgetPrompts,
        replay: Optional[SampleSet] = None,
        fisher: Optional[Mapping[str, torch.Tensor]] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        self.config = config
        self.denoiser = denoiser
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().float().cpu()
        if self.alphas_cumprod.dim() != 1 or self.alphas_cumprod.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D schedule, got shape {tuple(self.alphas_cumprod.shape)}")
        self.num_timesteps = int(self.alphas_cumprod.numel())
        if not adapters:
            raise ValueError("AmnesiaTrainer: no LoRA adapters were given (inject_lora first)")
        self.names = sorted(adapters)
        self.adapters = {n: adapters[n] for n in self.names}
        first = self.adapters[self.names[0]]
        self.device = torch.device(device) if device is not None else first.down.device

        if surrogate is None or len(surrogate) == 0:
            raise ValueError("AmnesiaTrainer: the surrogate set is empty")
        self.use_replay = config.gamma > 0
        if self.use_replay and (replay is None or len(replay) == 0):
            raise ValueError("AmnesiaTrainer: gamma > 0 needs replay samples (remember prompts); pass gamma=0 to train without replay")
        if config.lam > 0 and fisher is None:
            raise ValueError("AmnesiaTrainer: lam > 0 needs a Fisher estimate; pass lam=0 to train without EWC")

        per_sample = forget_lists(surrogate, forget_prompts)
        unique = prompts_to_encode(per_sample, replay if self.use_replay else None)
        # Encode every distinct prompt once (the text encoder is frozen).
        self.prompt_index = {p: i for i, p in enumerate(unique)}
        with torch.no_grad():
            ctx = encode(unique)
        if not isinstance(ctx, torch.Tensor) or ctx.shape[0] != len(unique):
            got = tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else type(ctx).__name__
            raise ValueError(f"encode returned {got} for {len(unique)} prompts; expected one row per prompt")
        self.contexts = ctx.detach().clone().to(self.device)
        self.forget_choices = [torch.tensor([self.prompt_index[p] for p in lst]) for lst in per_sample]

        self.surrogate = surrogate.samples.detach().clone().to(self.device)
        self.surrogate_prompts = list(surrogate.prompts)
        if self.use_replay:
            assert replay is not None
            self.replay = replay.samples.detach().clone().to(self.device)
            self.replay_ctx_index = torch.tensor([self.prompt_index[p] for p in replay.prompts])
            if tuple(self.replay.shape[1:]) != tuple(self.surrogate.shape[1:]):
                raise ValueError(f"surrogate samples {tuple(self.surrogate.shape[1:])} and replay samples "
                                 f"{tuple(self.replay.shape[1:])} have different shapes")
        else:
            self.replay = None
            self.replay_ctx_index = None

        self.fisher: Optional[dict[str, torch.Tensor]] = None
        if config.lam > 0:
            prepared = prepare_fisher(self.adapters, fisher, self.device)  # type: ignore[arg-type]
            # tensors made under torch.inference_mode() (e.g. read by a ComfyUI node) cannot enter autograd
            self.fisher = {k: (v.clone() if v.is_inference() else v) for k, v in prepared.items()}
        self.params: list[nn.Parameter] = []
        for n in self.names:
            for p in (self.adapters[n].up, self.adapters[n].down):
                p.requires_grad_(True)
                self.params.append(p)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._digest = self._data_digest(surrogate, replay if self.use_replay else None, per_sample)

    # ----------------------------------------------------------------- one step

    def _draws(self, step: int) -> dict[str, torch.Tensor]:
        """Everything random in ``step``, from its own generator (fixed order)."""
        gen = step_generator(self.config.seed, step)
        b, big_t = self.config.batch_size, self.num_timesteps
        shape = tuple(self.surrogate.shape[1:])
        d: dict[str, torch.Tensor] = {}
        d["s_idx"] = torch.randint(len(self.surrogate_prompts), (b,), generator=gen)
        u = torch.rand(b, generator=gen, dtype=torch.float64)
        d["s_ctx"] = torch.stack([
            self.forget_choices[i][min(int(ui * len(self.forget_choices[i])), len(self.forget_choices[i]) - 1)]
            for i, ui in zip(d["s_idx"].tolist(), u.tolist())
        ])
        d["s_t"] = torch.randint(big_t, (b,), generator=gen)
        d["s_noise"] = torch.randn((b, *shape), generator=gen)
        if self.use_replay:
            assert self.replay is not None and self.replay_ctx_index is not None
            d["r_idx"] = torch.randint(self.replay.shape[0], (b,), generator=gen)
            d["r_ctx"] = self.replay_ctx_index[d["r_idx"]]
            d["r_t"] = torch.randint(big_t, (b,), generator=gen)
            d["r_noise"] = torch.randn((b, *shape), generator=gen)
        return d

    def _base_target(self, x_t: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor],
                     noise: torch.Tensor) -> torch.Tensor:
        """Targets of a step's rows: eps for the surrogate half, the base model's eps for the replay half."""
        b = self.config.batch_size
        saved = [(a, a.strength) for a in self.adapters.values()]
        try:
            for a, _ in saved:
                a.strength = 0.0
            ctx = context[b:] if context is not None else None
            base = self.denoiser(x_t[b:], t[b:], ctx)
        finally:
            for a, s in saved:
                a.strength = s
        return torch.cat([noise[:b], base.to(noise.dtype)])

    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns its log record."""
        cfg = self.config
        d = self._draws(self.step)
        b = cfg.batch_size
        x0 = [self.surrogate[d["s_idx"].to(self.device)]]
        ctx = [self.contexts[d["s_ctx"].to(self.device)]]
        t, noise = [d["s_t"]], [d["s_noise"]]
        if self.use_replay:
            assert self.replay is not None
            x0.append(self.replay[d["r_idx"].to(self.device)])
            ctx.append(self.contexts[d["r_ctx"].to(self.device)])
            t.append(d["r_t"])
            noise.append(d["r_noise"])
        target_fn = self._base_target if (self.use_replay and cfg.replay_target == "base") else None
        # One forward over both halves; every row has its own t and noise, so the terms stay separate.
        with torch.enable_grad():
            per_row = eps_mse_loss(self.denoiser, torch.cat(x0), torch.cat(ctx), torch.cat(t), torch.cat(noise),
                                   self.alphas_cumprod, target_fn=target_fn)
            surrogate = per_row[:b].mean()
            replay = per_row[b:].mean() if self.use_replay else torch.zeros((), device=surrogate.device)
            data = surrogate + cfg.gamma * replay
            self.optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(data):
                data.backward()  # frees the UNet's activations before the EWC term is built
            # then the EWC term, layer by layer: one weight-sized dW alive at a time instead of all of them (GBs at
            # SDXL) next to the activations; the summed gradients are those of (data + ewc).backward()
            if self.fisher is not None:
                ewc = ewc_backward(self.adapters, self.fisher, cfg.lam).to(surrogate.device)
            else:
                ewc = torch.zeros((), device=surrogate.device)
            total = data.detach() + ewc
            if not torch.isfinite(total):
                self.optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(
                    f"Selective Amnesia step {self.step + 1}: non-finite loss (surrogate {surrogate.item()}, "
                    f"replay {replay.item()}, ewc {ewc.item()}); lower lr or lam")
        clip = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.step += 1
        record = {"step": float(self.step), "loss": float(total.detach()), "surrogate": float(surrogate.detach()),
                  "replay": float(replay.detach()), "ewc": float(ewc.detach()), "grad_norm": float(grad_norm)}
        self.history.append(record)
        return record

    # ----------------------------------------------------------------- the loop

    def train(
        self,
        checkpoint: Optional[PathLike] = None,
        resume: bool = True,
        should_stop: Optional[Callable[[], bool]] = None,
        callback: Optional[Callable[[int, int, dict[str, float]], None]] = None,
        progress: bool = True,
    ) -> AmnesiaResult:
        """Train up to ``config.steps`` (the loop of :mod:`sae_core.amnesia.resumable`).

        Args:
            checkpoint: file for checkpoints (every ``checkpoint_every`` steps, on stop, at the end).
            resume: continue from ``checkpoint`` if it holds this run (a finished one is reused as it
                is; one of another run is refused with ``FileExistsError`` naming what differs).
            should_stop: polled before every step; True saves a checkpoint and returns (``stopped``).
            callback: ``callback(step, total, record)`` after every step (progress bars, logging).
            progress: show a tqdm bar with the loss terms.
        """
        cfg = self.config
        path = Path(checkpoint) if checkpoint is not None else None
        if path is not None and resume and path.is_file():
            found, step = self.read_checkpoint_identity(path)
            decision = decide_checkpoint("Selective Amnesia checkpoint", path, self._identity(), found,
                                         complete=step >= cfg.steps, remedy=CHECKPOINT_REMEDY)
            if decision.action in (Action.REUSE, Action.RESUME):
                self.load_checkpoint(path)
        end = run_units(
            range(self.step, cfg.steps), lambda _: self.train_step(), done=self.step, total=cfg.steps,
            save=(lambda: self.save_checkpoint(path)) if path is not None else None,
            saved=lambda: path is not None and path.is_file(), save_every=cfg.checkpoint_every,
            should_stop=should_stop, desc="Selective Amnesia", unit="step", progress=progress,
            on_unit=(lambda n, rec: callback(n, cfg.steps, rec)) if callback is not None else None,
            postfix=lambda rec: {"surr": f"{rec['surrogate']:.4f}", "repl": f"{rec['replay']:.4f}", "ewc": f"{rec['ewc']:.2e}"},
        )
        return AmnesiaResult(list(self.history), self.step, end.stopped)

    # ----------------------------------------------------------------- checkpoints

    @staticmethod
    def _data_digest(surrogate: SampleSet, replay: Optional[SampleSet], forget: list[list[str]]) -> str:
        h = hashlib.sha256()
        for s in (surrogate, replay):
            if s is None:
                h.update(b"none")
                continue
            x = s.samples.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(x.shape)).encode())
            h.update(x.numpy().tobytes())
            h.update(json.dumps(list(s.prompts)).encode())
        h.update(json.dumps(forget).encode())
        return h.hexdigest()[:32]

    def _identity(self) -> dict[str, Any]:
        """What shapes the run: the config (less ``steps``, ``checkpoint_every`` and Fisher-only
        fields), the LoRA layout, the data digest and the schedule length."""
        cfg = asdict(self.config)
        for k in ("steps", "checkpoint_every", *FISHER_ONLY_FIELDS):
            cfg.pop(k)
        shapes = {n: [list(a.up.shape), list(a.down.shape), float(a.alpha)] for n, a in self.adapters.items()}
        return normalise({**cfg, "adapters": shapes, "data": self._digest, "num_timesteps": self.num_timesteps})

    def save_checkpoint(self, path: PathLike) -> None:
        """Write the LoRA factors, optimiser state, step and history to ``path`` (atomically)."""
        tensors: dict[str, torch.Tensor] = {}
        for n in self.names:
            a = self.adapters[n]
            tensors[f"lora.{n}.up"] = a.up.detach().to("cpu").contiguous()
            tensors[f"lora.{n}.down"] = a.down.detach().to("cpu").contiguous()
        state = self.optimizer.state_dict()
        for i, st in state["state"].items():
            for field, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.{i}.{field}"] = v.detach().to("cpu").reshape(-1).contiguous() if v.dim() == 0 \
                        else v.detach().to("cpu").contiguous()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": str(self.step),
            "identity": json.dumps(self._identity(), sort_keys=True),
            "config": json.dumps(asdict(self.config)),
            "param_groups": json.dumps(state["param_groups"]),
            "scalar_fields": json.dumps(sorted({f"{i}.{f}" for i, st in state["state"].items()
                                                for f, v in st.items() if isinstance(v, torch.Tensor) and v.dim() == 0})),
            "history": json.dumps(self.history),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, tensors, meta)

    @staticmethod
    def read_checkpoint_identity(path: PathLike) -> tuple[dict[str, Any], int]:
        """``(identity, step)`` recorded in a checkpoint; ValueError if the file is not one."""
        meta = read_metadata(path, "Selective Amnesia checkpoint")
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ArtefactError(path, f"not a Selective Amnesia checkpoint (format {meta.get('format')!r})")
        try:
            identity, step = json.loads(meta.get("identity", "{}")), int(meta.get("step", "0"))
        except (ValueError, json.JSONDecodeError) as exc:
            raise ArtefactError(path, f"malformed Selective Amnesia checkpoint: {exc}") from exc
        if not isinstance(identity, dict):
            raise ArtefactError(path, "malformed Selective Amnesia checkpoint: its identity is not a JSON object")
        return identity, step

    def load_checkpoint(self, path: PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` of this run.

        Raises:
            ValueError: not a checkpoint.
            FileExistsError: made with another config / data / LoRA layout (the message names what differs).
        """
        path = Path(path)
        found, _ = self.read_checkpoint_identity(path)
        decide_checkpoint("Selective Amnesia checkpoint", path, self._identity(), found, complete=False,
                          remedy=CHECKPOINT_REMEDY)
        meta = read_metadata(path, "Selective Amnesia checkpoint")
        tensors = load_tensors(path, what="Selective Amnesia checkpoint")
        try:
            factors = {}
            for n in self.names:
                a = self.adapters[n]
                for part, param in (("up", a.up), ("down", a.down)):
                    t = tensors[f"lora.{n}.{part}"]
                    if tuple(t.shape) != tuple(param.shape) or not bool(torch.isfinite(t).all()):
                        raise ValueError(f"lora.{n}.{part} has shape {tuple(t.shape)} or NaN/Inf values")
                    factors[(n, part)] = t
            scalar = set(json.loads(meta.get("scalar_fields", "[]")))
            opt_state: dict[int, dict[str, torch.Tensor]] = {}
            for key, v in tensors.items():
                if not key.startswith("optim."):
                    continue
                _, i, field = key.split(".", 2)
                opt_state.setdefault(int(i), {})[field] = v.reshape(()) if f"{i}.{field}" in scalar else v
            groups = json.loads(meta["param_groups"])
            step = int(meta["step"])
            history = [dict(r) for r in json.loads(meta.get("history", "[]"))]
            saved_opt = self.optimizer.state_dict()
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
            if "saved_opt" in locals():
                self.optimizer.load_state_dict(saved_opt)
            what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ArtefactError(path, f"malformed Selective Amnesia checkpoint: {what}") from exc
        with torch.no_grad():
            for (n, part), t in factors.items():
                param = getattr(self.adapters[n], part)
                param.copy_(t.to(param.device, param.dtype))
        self.step = step
        self.history = history


# --------------------------------------------------------------------------- plotting


_COLOURS = {"loss": PALETTE["dark"], "surrogate": PALETTE["red"], "replay": PALETTE["blue"], "ewc": PALETTE["green"]}


def loss_curve_image(history: Sequence[Mapping[str, float]], width: int = 640, height: int = 360,
                     terms: Sequence[str] = LOSS_TERMS, title: str = "Selective Amnesia loss") -> np.ndarray:
    """The loss terms against the step on a log axis, as an RGB ``uint8`` array ``[H, W, 3]``.

    Zero values (EWC before the delta grows, replay with gamma = 0) are left out of the log axis.
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), PALETTE["white"])
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 28, height - 30
    draw.text((left, 6), title, fill=PALETTE["ink"])
    draw.rectangle([left, top, right, bottom], outline=PALETTE["frame"])
    steps = [float(r.get("step", i + 1)) for i, r in enumerate(history)]
    values = {k: [float(r.get(k, float("nan"))) for r in history] for k in terms}
    positive = [v for vs in values.values() for v in vs if v > 0 and math.isfinite(v)]
    if not steps or not positive:
        draw.text((left + 10, (top + bottom) // 2), "no positive loss values to plot", fill=PALETTE["ink"])
        return np.asarray(img, dtype=np.uint8)
    lo, hi = math.log10(min(positive)), math.log10(max(positive))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = min(steps), max(steps)
    s1 = s1 if s1 > s0 else s0 + 1

    def xy(s: float, v: float) -> tuple[float, float]:
        x = left + (s - s0) / (s1 - s0) * (right - left)
        y = bottom - (math.log10(v) - lo) / (hi - lo) * (bottom - top)
        return x, y

    for e in range(math.floor(lo), math.ceil(hi) + 1):  # decade grid lines
        if lo <= e <= hi:
            _, y = xy(s0, 10.0 ** e)
            draw.line([left, y, right, y], fill=PALETTE["grid"])
            draw.text((4, y - 6), f"1e{e}", fill=PALETTE["muted"])
    draw.text((left, bottom + 6), f"step {int(s0)}", fill=PALETTE["muted"])
    draw.text((right - 70, bottom + 6), f"step {int(max(steps))}", fill=PALETTE["muted"])
    lx = left + 8
    for k in terms:
        pts = [xy(s, v) for s, v in zip(steps, values[k]) if v > 0 and math.isfinite(v)]
        colour = _COLOURS.get(k, (120, 60, 160))
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            x, y = pts[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        last = next((v for v in reversed(values[k]) if math.isfinite(v)), float("nan"))
        label = f"{k} {last:.3g}"
        draw.line([lx, top + 10, lx + 14, top + 10], fill=colour, width=2)
        draw.text((lx + 18, top + 4), label, fill=colour)
        lx += 22 + 7 * len(label)
    return np.asarray(img, dtype=np.uint8)
