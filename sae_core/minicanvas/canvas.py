"""MiniCanvas: the shipped text-to-image model, its judges and the interfaces methods use.

``MiniCanvas.load()`` reads the package weights. A canvas offers:

* ``tokenizer`` / ``tokenize(prompts)`` (ids + mask), ``text_encoder`` (CLIP architecture,
  layers at ``text_encoder.text_model.encoder.layers``), ``encode_text(prompts) -> [B, L, d]``;
* ``unet`` and ``denoiser(x, t, context) -> eps``;
* ``cross_attention_projections()`` -> ``[(name, to_k, to_v)]`` for every ``attn2``;
* ``hook_points()`` (SpatialTransformer block names) and ``get_block(name)``;
* ``sample(prompts, seeds, steps, cfg)`` -> images [N, 3, 32, 32] in [0, 1] (DDIM + CFG);
* ``judge(images)`` -> (object predictions, style predictions).

Erasure methods return an edited canvas made by ``replace(...)`` (a shallow copy):
it may carry another UNet or text encoder (e.g. a deepcopy with edited weights), a
replacement text-encoding function (``encode_fn``), or extra block hooks (``add_hook``)
that are registered on the named UNet blocks only while ``sample`` runs. A hook is
``fn(module, inputs, output, ctx) -> new output or None`` where ``ctx`` is the canvas'
``SamplingContext`` (current step index, timestep, CFG layout), updated by the sampler
before every UNet call.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from . import files
from .data import OBJECTS, STYLES, prompt_for
from .diffusion import NoiseSchedule, SamplingContext, ScheduleConfig, ddim_sample
from .judges import JudgeCNN, JudgeConfig
from .metrics import UNSTYLED, EvalTable
from .text_encoder import MiniTextEncoder, TextEncoderConfig, build_text_encoder
from .tokenizer import TokenizedPrompts, WordTokenizer
from .unet import MiniUNet, UNetConfig

BlockHook = Callable[[nn.Module, tuple, torch.Tensor, SamplingContext], "torch.Tensor | None"]
"""Forward hook with the sampling context: ``fn(module, inputs, output, ctx)``."""


class JudgeOutput(NamedTuple):
    """Judge predictions for a batch of images."""

    objects: torch.Tensor
    """int64 [N] predicted object index."""
    styles: torch.Tensor
    """int64 [N] predicted style index."""


@dataclass(frozen=True)
class PromptSpec:
    """One evaluation prompt with its labels."""

    text: str
    """The prompt."""
    object_idx: int
    """Object index."""
    style_idx: int
    """Style index, or UNSTYLED (-1)."""


def evaluation_prompts(objects: Sequence[int] | None = None, styles: Sequence[int] | None = None,
                       unstyled: bool = True) -> list[PromptSpec]:
    """Every styled prompt over ``objects`` x ``styles`` (default all) plus the unstyled ones."""
    objects = range(len(OBJECTS)) if objects is None else objects
    styles = range(len(STYLES)) if styles is None else styles
    specs = [PromptSpec(prompt_for(o, s), o, s) for o in objects for s in styles]
    if unstyled:
        specs += [PromptSpec(prompt_for(o, None), o, UNSTYLED) for o in objects]
    return specs


def spec_for_prompt(text: str, objects: Sequence[str] = OBJECTS, styles: Sequence[str] = STYLES) -> PromptSpec | None:
    """The labels of a free-form prompt: the first object name among its words and the first style name
    (UNSTYLED if none). ``None`` when no object is named (the judges' tables need an object label)."""
    words = WordTokenizer.split(text)
    obj = next((objects.index(w) for w in words if w in objects), None)
    if obj is None:
        return None
    style = next((styles.index(w) for w in words if w in styles), UNSTYLED)
    return PromptSpec(text, obj, style)


def judged_table(specs: Sequence[PromptSpec], judged: JudgeOutput) -> EvalTable:
    """The :class:`EvalTable` of one image per spec (``specs[i]`` made image ``i``) and its judge output."""
    if len(specs) != len(judged.objects):
        raise ValueError(f"{len(specs)} prompt labels for {len(judged.objects)} judged images")
    return EvalTable(np.array([s.object_idx for s in specs]), np.array([s.style_idx for s in specs]),
                     judged.objects.numpy(), judged.styles.numpy())


class MiniCanvas:
    """The MiniCanvas model bundle; see the module docstring for the interface."""

    def __init__(self, unet: MiniUNet, text_encoder: MiniTextEncoder, tokenizer: WordTokenizer,
                 schedule: NoiseSchedule, object_judge: JudgeCNN | None = None,
                 style_judge: JudgeCNN | None = None, config: dict | None = None,
                 device: str | torch.device = "cpu"):
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.object_judge = object_judge
        self.style_judge = style_judge
        self.config = dict(config or {})
        self.device = torch.device(device)
        self.objects: tuple[str, ...] = tuple(self.config.get("objects", OBJECTS))
        self.styles: tuple[str, ...] = tuple(self.config.get("styles", STYLES))
        sampling = self.config.get("sampling", {})
        self.default_steps: int = int(sampling.get("steps", 20))
        self.default_cfg: float = float(sampling.get("cfg", 7.0))
        self.context = SamplingContext()
        self.hooks: list[tuple[str, BlockHook]] = []
        self.encode_fn: Callable[[list[str]], torch.Tensor] | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, weights_dir: str | Path | None = None, device: str | torch.device = "cpu",
             judges: bool = True) -> "MiniCanvas":
        """Load the shipped (or ``weights_dir``'s) model, text encoder, tokenizer and judges."""
        wdir = Path(weights_dir) if weights_dir is not None else files.WEIGHTS_DIR
        cfg = files.load_json(wdir / files.CONFIG_FILE)
        for key in ("unet", "text_encoder", "tokenizer", "schedule"):
            if key not in cfg:
                raise ValueError(f"{wdir / files.CONFIG_FILE} lacks the '{key}' section; retrain or re-export")
        tokenizer = WordTokenizer.from_dict(cfg["tokenizer"])
        text_encoder = build_text_encoder(TextEncoderConfig(**cfg["text_encoder"]), tokenizer)
        unet = MiniUNet(UNetConfig.from_dict(cfg["unet"]))
        state = files.load_tensors(wdir / files.MODEL_FILE)
        unet.load_state_dict(files.strip_prefix(state, "unet."))
        _load_text_encoder(text_encoder, files.strip_prefix(state, "text_encoder."))
        object_judge = style_judge = None
        if judges:
            if "judges" not in cfg:
                raise ValueError(f"{wdir / files.CONFIG_FILE} lacks the 'judges' section; run the judge training")
            jstate = files.load_tensors(wdir / files.JUDGES_FILE)
            object_judge = JudgeCNN(JudgeConfig(**cfg["judges"]["object"]))
            object_judge.load_state_dict(files.strip_prefix(jstate, "object."))
            style_judge = JudgeCNN(JudgeConfig(**cfg["judges"]["style"]))
            style_judge.load_state_dict(files.strip_prefix(jstate, "style."))
        canvas = cls(unet, text_encoder, tokenizer, NoiseSchedule(ScheduleConfig(**cfg["schedule"])),
                     object_judge, style_judge, cfg, device)
        for m in canvas._modules():
            m.to(canvas.device).eval().requires_grad_(False)
        return canvas

    def _modules(self) -> list[nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.object_judge, self.style_judge) if m is not None]

    # ------------------------------------------------------------------ editing

    def replace(self, **changes) -> "MiniCanvas":
        """A shallow copy with some attributes replaced (``unet=``, ``text_encoder=``, ``encode_fn=``...).

        The copy gets its own hook list (a copy of this one) and its own SamplingContext;
        modules are shared unless replaced, so never edit a shared module in place.
        """
        new = copy.copy(self)
        new.hooks = list(self.hooks)
        new.context = SamplingContext()
        new.config = dict(self.config)
        for k, v in changes.items():
            if not hasattr(new, k):
                raise AttributeError(f"MiniCanvas has no attribute {k!r} to replace")
            setattr(new, k, v)
        return new

    def add_hook(self, block_name: str, fn: BlockHook) -> "MiniCanvas":
        """Register ``fn`` on UNet block ``block_name`` for sampling (on this canvas); returns self."""
        self.get_block(block_name)  # validates the name
        self.hooks.append((block_name, fn))
        return self

    def with_hook(self, block_name: str, fn: BlockHook) -> "MiniCanvas":
        """A copy of this canvas with one more block hook."""
        return self.replace().add_hook(block_name, fn)

    @contextlib.contextmanager
    def hooks_active(self) -> Iterator[None]:
        """Register this canvas' block hooks for the duration of the ``with`` body."""
        handles = []
        try:
            for name, fn in self.hooks:
                block = self.get_block(name)
                handles.append(block.register_forward_hook(
                    lambda m, i, o, _fn=fn: _fn(m, i, o, self.context)))
            yield
        finally:
            for h in handles:
                h.remove()

    # --------------------------------------------------------------- interfaces

    def tokenize(self, prompts: str | Sequence[str]) -> TokenizedPrompts:
        """Token ids [B, L] and attention mask [B, L] (1 for BOS, words, EOS)."""
        return self.tokenizer(prompts)

    def encode_text_default(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``last_hidden_state`` of the text encoder, [B, L, d] (no replacement applied)."""
        ids = self.tokenize(prompts).input_ids.to(self.device)
        with torch.no_grad():
            return self.text_encoder(ids).last_hidden_state

    def encode_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Text conditioning [B, L, d]: ``encode_fn`` if a method set one, else the text encoder."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.encode_fn is not None:
            return self.encode_fn(list(prompts))
        return self.encode_text_default(prompts)

    def denoiser(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """epsilon = UNet(x_t, t, context). Block hooks apply only inside ``hooks_active()``/``sample``."""
        return self.unet(x, t, context)

    def cross_attention_projections(self) -> list[tuple[str, nn.Linear, nn.Linear]]:
        """``(name, to_k, to_v)`` of every cross-attention (``...attn2``), in forward order."""
        out = []
        for name, mod in self.unet.named_modules():
            if name.endswith("attn2"):
                out.append((name, mod.to_k, mod.to_v))
        return out

    def hook_points(self) -> list[str]:
        """Names of the UNet's SpatialTransformer blocks (e.g. ``output_blocks.3.1``)."""
        return self.unet.transformer_names()

    def get_block(self, name: str) -> nn.Module:
        """UNet sub-module by qualified name, with a clear error for unknown names."""
        modules = dict(self.unet.named_modules())
        if name not in modules or name == "":
            raise KeyError(f"unknown UNet block {name!r}; SpatialTransformer blocks are {self.hook_points()}")
        return modules[name]

    @staticmethod
    def initial_noise(seed: int, shape: tuple[int, ...] = (3, 32, 32)) -> torch.Tensor:
        """The starting noise of one image: depends only on ``seed``."""
        return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))

    @torch.no_grad()
    def sample(self, prompts: str | Sequence[str], seeds: int | Sequence[int] = 0, steps: int | None = None,
               cfg: float | None = None, callback: Callable[[int, int, torch.Tensor], None] | None = None,
               batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Images for every (prompt, seed), prompt-major: row ``i * len(seeds) + j``.

        Returns float [N, 3, 32, 32] in [0, 1]. DDIM (eta 0) with ``steps`` steps and
        classifier-free guidance weight ``cfg`` (uncond = encoding of ""); defaults from
        the shipped config. ``callback(step_index, t, x_t)`` runs after every step of
        every chunk. The same seed gives the same starting noise for any prompt.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        seeds = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
        if not prompts or not seeds:
            raise ValueError("sample needs at least one prompt and one seed")
        steps = self.default_steps if steps is None else int(steps)
        cfg = self.default_cfg if cfg is None else float(cfg)
        pairs = [(p, s) for p in prompts for s in seeds]
        uncond = self.encode_text([""])
        out = []
        chunks = range(0, len(pairs), batch_size)
        from tqdm.auto import tqdm

        with self.hooks_active():
            for c0 in tqdm(chunks, desc="sampling", disable=not progress or len(chunks) < 2, leave=False):
                chunk = pairs[c0 : c0 + batch_size]
                cond = self.encode_text([p for p, _ in chunk])
                noise = torch.stack([self.initial_noise(s) for _, s in chunk]).to(self.device)
                x = ddim_sample(self.denoiser, self.schedule, cond, uncond, noise, steps, cfg,
                                context=self.context, callback=callback,
                                progress=progress and len(chunks) < 2)
                out.append(((x.clamp(-1, 1) + 1) / 2).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def judge(self, images: torch.Tensor) -> JudgeOutput:
        """Object and style predictions for images [N, 3, H, W] in [0, 1]."""
        if self.object_judge is None or self.style_judge is None:
            raise RuntimeError("this MiniCanvas was loaded without judges (judges=False)")
        images = images.to(self.device, torch.float32)
        return JudgeOutput(self.object_judge.predict(images).cpu(), self.style_judge.predict(images).cpu())

    def evaluate(self, specs: Sequence[PromptSpec], seeds: Sequence[int], steps: int | None = None,
                 cfg: float | None = None, progress: bool = False, batch_size: int = 64) -> tuple[EvalTable, torch.Tensor]:
        """Generate every (spec, seed) image, judge it, and return the table and the images."""
        images = self.sample([s.text for s in specs], seeds, steps, cfg, progress=progress, batch_size=batch_size)
        pred = self.judge(images)
        reps = len(seeds)
        table = EvalTable(
            np.repeat([s.object_idx for s in specs], reps),
            np.repeat([s.style_idx for s in specs], reps),
            pred.objects.numpy(),
            pred.styles.numpy(),
        )
        return table, images


def _load_text_encoder(model: MiniTextEncoder, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    # position_ids is a non-persistent buffer on some transformers versions
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"text encoder weights do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
