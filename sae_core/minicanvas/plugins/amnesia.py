"""Selective Amnesia on MiniCanvas: the ``amnesia`` method of ``python -m sae_core bench``.

Listed as ``amnesia`` in :data:`sae_core.minicanvas.methods.PLUGINS`.

What a run does (``methods/selective_amnesia.md``, scaled down to MiniCanvas):

1. **Data bank** (once per model): the base model samples every MiniCanvas prompt (64 styled,
   8 unstyled) with a few seeds disjoint from the bench's evaluation seeds. Cached as
   safetensors + JSON in ``$SAE_CORE_CACHE/amnesia_minicanvas/<unet fingerprint>/``
   (default ``~/.cache/sae_core``).
2. **Fisher** (once per model and target preset): :func:`sae_core.amnesia.pipeline.estimate_fisher`,
   the reference estimator (per-sample gradient of the eps-MSE summed over stratified timesteps,
   scaled by T/K, squared per sample) over the whole bank, for the base weights of the LoRA
   targets, with seed 0 whatever the erasure's seed (one Fisher per model). Cached beside the bank.
3. **Training** (per erasure): :func:`sae_core.amnesia.pipeline.train_forgetting_lora`, the
   function the ComfyUI node calls, with a LoRA injected into a deepcopy of the UNet:

   * forget prompts: every prompt naming the erased concept(s);
   * surrogate: for a style, the base model's images of the *same object in the other styles*
     (``surrogate=other``, default), of the unstyled prompt (``unstyled``) or uniform noise
     (``noise``); for an object, *another object in the same style* (``other``: objects are
     paired with a fixed partner, ``partner_offset`` positions further in the object list) or
     noise. Each surrogate image is paired with the forget prompt it stands in for;
   * replay: bank images of every prompt that names none of the erased concepts, regressed onto
     the frozen model's own prediction (``replay_target=base``; ``noise`` is the reference's target);
   * EWC with the Fisher above.

   The LoRA is merged into the copy, which the edited canvas carries (``canvas.replace(unet=...)``);
   the input canvas is untouched.

Factory options (``--option key=value`` on the bench command line) are the fields of
:class:`sae_core.amnesia.AmnesiaConfig` (the names the ComfyUI node's inputs carry; defaults in
:data:`RECIPE`) and of :class:`CanvasOptions` (what only MiniCanvas has), e.g. ``--option lam=0``
to switch EWC off or ``--option steps=200``.

The bank and Fisher of the default recipe may ship in ``sae_core/minicanvas/weights/``
(``python -m sae_core.minicanvas.plugins.amnesia prepare --out sae_core/minicanvas/weights``); they are
used only when their recorded UNet fingerprint matches the loaded model, otherwise they are
rebuilt into the cache (about two minutes on two CPU cores, once per model).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from ...amnesia import pipeline
from ...amnesia.config import AmnesiaConfig
from ...amnesia.fisher import fisher_params
from ...amnesia.lora import TARGET_PRESETS, inject_lora, merge_lora
from ...amnesia.pipeline import FisherTraining, LoRATraining
from ...amnesia.samples import SampleSet, cached_samples, load_samples, noise_samples
from .. import files as mc_files
from ..files import unet_fingerprint
from ..data import styled_prompt, unstyled_prompt
from ..methods import validate_concepts

__all__ = [
    "CanvasOptions",
    "Recipe",
    "CanvasHost",
    "AmnesiaReport",
    "KIND_DEFAULTS",
    "RECIPE",
    "kind_recipe",
    "unet_fingerprint",
    "cache_dir",
    "prompt_table",
    "data_bank",
    "minicanvas_fisher",
    "erasure_data",
    "amnesia_method",
]


@dataclass(frozen=True)
class CanvasOptions:
    """Settings only the MiniCanvas method has (factory options besides the :class:`AmnesiaConfig` fields)."""

    surrogate: str = "partner"
    """What the forget prompts learn to produce: ``partner`` (style S: the same object in the fixed
    partner style; object O: the partner object in the same style), ``mixed`` (all the other
    styles / objects), ``unstyled`` (styles only: the unstyled prompt's images) or ``noise``
    (uniform noise, the reference's DDPM surrogate)."""
    partner_offset: int = 1
    """``partner``: concept i stands in for concept i - offset, i.e. i is replaced by i + offset (mod 8)."""
    bank_seeds: tuple[int, ...] = (1000, 1001)
    """Sampling seeds of the data bank (disjoint from the bench's evaluation seeds)."""
    bank_steps: Optional[int] = None
    """DDIM steps of the data bank (None: the model's default)."""
    threads: int = 0
    """torch CPU threads during the run (0: leave torch's setting alone)."""
    quiet: bool = False
    """No progress bars or summary line."""


class Recipe(NamedTuple):
    """A MiniCanvas run's settings: the pipeline's and the canvas's."""

    settings: AmnesiaConfig
    """What the pipeline gets (the forget prompts are filled in per erasure)."""
    canvas: CanvasOptions
    """How the bank and the surrogates are made."""


RECIPE = Recipe(
    AmnesiaConfig(targets="xattn", rank=4, alpha=None, steps=100, lr=1e-2, batch_size=8, lam=0.1, gamma=1.0,
                  replay_target="base", weight_decay=0.0, grad_clip=1.0, seed=0, checkpoint_every=20,
                  timesteps_per_sample=16),
    CanvasOptions(),
)
"""Defaults of the factory. ``lam`` is not the reference's 50: with the same Fisher scale, the
per-element mean eps-MSE of 3x32x32 pixel images calls for a much smaller weight here (lambda is
not portable between setups); see :data:`KIND_DEFAULTS` for what it trades. ``replay_target``
``base`` regresses replay onto the frozen model's prediction (``noise`` is the reference's target).
``checkpoint_every`` applies to the Fisher only (erasures are not checkpointed)."""

KIND_DEFAULTS: dict[str, dict[str, Any]] = {"style": {"lam": 0.03}, "object": {"lam": 0.3}}
"""Per-kind changes to :data:`RECIPE` (before the caller's options), measured over all eight
concepts of the kind (72 prompts, seed 0).

With the reference's replay target (``replay_target=noise``) no lambda met the bars for styles:
0.1 gave UA 81%, IRA 93%, CRA 91% (checkered and neon resist), 0.03 gave UA 92% but CRA 77%
(the unstyled objects drift), 0 gave UA 100%, CRA 70%. Objects reached UA 93%, IRA 85%, CRA 98%
at 0.3. Regressing replay onto the frozen model's prediction (``base``) holds the remembered
prompts tightly enough for a small lambda on styles: 0.03 gives UA 100%, IRA 99%, CRA 95%;
objects at 0.3 give UA 92%, IRA 90%, CRA 99%."""


class AmnesiaReport(NamedTuple):
    """What an erasure did (attached to the edited canvas as ``amnesia_report``)."""

    history: list[dict[str, float]]
    """Per-step loss terms."""
    train_seconds: float
    """Wall time of the LoRA training."""
    prepare_seconds: float
    """Wall time of data bank + Fisher (near 0 when both came from the cache)."""
    forget_prompts: list[str]
    """The forget prompts."""
    surrogate_count: int
    """Surrogate samples."""
    replay_count: int
    """Replay samples."""
    recipe: dict[str, Any]
    """The settings used (:data:`RECIPE`, the kind's :data:`KIND_DEFAULTS`, the caller's options),
    flat, as the factory options name them (the per-erasure forget prompts left out)."""


# ---------------------------------------------------------------------------------------------
# caching helpers
# ---------------------------------------------------------------------------------------------


def cache_dir(canvas: Any) -> Path:
    """``$SAE_CORE_CACHE/amnesia_minicanvas/<fingerprint>`` (default root ``~/.cache/sae_core``)."""
    root = Path(os.environ.get("SAE_CORE_CACHE", Path.home() / ".cache" / "sae_core"))
    return root / "amnesia_minicanvas" / unet_fingerprint(canvas.unet)


def _search_dirs(canvas: Any) -> list[Path]:
    """Where bank and Fisher files are looked for: the shipped weights, then the cache."""
    return [mc_files.WEIGHTS_DIR, cache_dir(canvas)]


def prompt_table(canvas: Any) -> list[tuple[str, int, int]]:
    """``(prompt, object index, style index or -1)`` for every MiniCanvas prompt."""
    rows = [(styled_prompt(o, s), oi, si) for oi, o in enumerate(canvas.objects) for si, s in enumerate(canvas.styles)]
    rows += [(unstyled_prompt(o), oi, -1) for oi, o in enumerate(canvas.objects)]
    return rows


def _canvas_sampler(canvas: Any, steps: Optional[int]):
    """``sampler(prompts, seeds)`` over ``canvas.sample``; images mapped back to [-1, 1]."""

    def sampler(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        out = torch.empty(len(prompts), 3, 32, 32)
        by_seed: dict[int, list[int]] = {}
        for i, s in enumerate(seeds):
            by_seed.setdefault(int(s), []).append(i)
        for s, rows in by_seed.items():
            imgs = canvas.sample([prompts[i] for i in rows], [s], steps=steps)
            out[rows] = imgs * 2.0 - 1.0
        return out

    return sampler


class CanvasHost:
    """A MiniCanvas as the pipeline's :class:`~sae_core.amnesia.pipeline.AmnesiaHost`.

    Training works on a deepcopy of the UNet with LoRA layers injected (kept as :attr:`unet`, so
    the plug-in can merge it); the Fisher on another deepcopy whose target weights take gradients.
    The canvas is never modified. Everything runs in fp32 (``precision`` does not apply).
    """

    def __init__(self, canvas: Any, sample_steps: Optional[int] = None) -> None:
        self.canvas = canvas
        self.device = canvas.device
        self.alphas_cumprod = canvas.schedule.alphas_cumprod
        self.sample_steps = sample_steps
        self.unet: Optional[torch.nn.Module] = None
        """The UNet copy of the last :meth:`lora_training`, its LoRA layers still injected."""

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.canvas.encode_text_default(prompts)

    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        base = self.canvas.replace(hooks=[], encode_fn=None)
        return _canvas_sampler(base, self.sample_steps)(prompts, seeds)

    @contextmanager
    def lora_training(self, config: AmnesiaConfig, generator: torch.Generator) -> Iterator[LoRATraining]:
        unet = copy.deepcopy(self.canvas.unet).eval()
        adapters = inject_lora(unet, config.targets, config.rank, config.alpha, generator=generator)
        self.unet = unet
        yield LoRATraining(unet, adapters)

    @contextmanager
    def fisher_training(self, config: AmnesiaConfig) -> Iterator[FisherTraining]:
        unet = copy.deepcopy(self.canvas.unet).eval()
        unet.requires_grad_(False)
        yield FisherTraining(unet, fisher_params(unet, config.targets))


def _bank_settings(canvas: Any, recipe: Recipe) -> dict[str, Any]:
    opts = recipe.canvas
    return {"unet": unet_fingerprint(canvas.unet), "prompts": [p for p, _, _ in prompt_table(canvas)],
            "seeds": [int(s) for s in opts.bank_seeds], "steps": int(opts.bank_steps or canvas.default_steps),
            "cfg": float(canvas.default_cfg)}


def _bank_name(settings: dict[str, Any]) -> str:
    return f"amnesia_bank_{'-'.join(map(str, settings['seeds']))}_{settings['steps']}.safetensors"


def data_bank(canvas: Any, recipe: Recipe = RECIPE, progress: bool = True,
              out_dir: Optional[Path] = None) -> SampleSet:
    """Base-model samples of every MiniCanvas prompt x ``recipe.canvas.bank_seeds``.

    Read from the shipped weights or the cache when a file made with the same settings (model
    fingerprint included) exists; otherwise generated and written to ``out_dir`` (default: the cache).
    """
    settings = _bank_settings(canvas, recipe)
    name = _bank_name(settings)
    if out_dir is None:
        for folder in _search_dirs(canvas):
            try:
                found, meta = load_samples(folder / name)
            except (FileNotFoundError, ValueError):
                continue
            if meta.get("settings") == json.loads(json.dumps(settings)):
                return found
    host = CanvasHost(canvas, settings["steps"])

    def make() -> SampleSet:
        # one sampler call per seed covers every prompt; rows are prompt-major
        pairs = [(p, s) for p in settings["prompts"] for s in settings["seeds"]]
        x = host.sample([p for p, _ in pairs], [s for _, s in pairs])
        return SampleSet(x, [p for p, _ in pairs])

    # fp16 halves the file; pixel values in [-1, 1] lose nothing that matters at 8-bit colour depth
    return cached_samples(Path(out_dir or cache_dir(canvas)) / name, settings, make, dtype=torch.float16)


def minicanvas_fisher(canvas: Any, bank: SampleSet, recipe: Recipe = RECIPE, progress: bool = True,
                      out_dir: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the base weights of ``recipe.settings.targets`` over ``bank`` (seed 0).

    Reused from the shipped weights or the cache when a complete file for this model, bank, K and
    targets exists; otherwise computed (resumable) into ``out_dir`` (default: the cache).
    """
    settings = replace(recipe.settings, seed=0)  # one Fisher per model, whatever the erasure's seed
    # keyed by the bank's settings (not its bytes, which may differ in the last bits across machines)
    bank_digest = hashlib.sha256(json.dumps(_bank_settings(canvas, recipe), sort_keys=True).encode()).hexdigest()[:16]
    name = f"amnesia_fisher_{settings.targets}_k{settings.timesteps_per_sample}_{bank_digest}.safetensors"
    search = [] if out_dir is not None else [folder / name for folder in _search_dirs(canvas)]
    est = pipeline.estimate_fisher(
        CanvasHost(canvas), settings, lambda: bank, len(bank), Path(out_dir or cache_dir(canvas)) / name,
        identity={"unet": unet_fingerprint(canvas.unet), "bank": bank_digest, "targets_preset": settings.targets},
        search=search, progress=progress)
    return {n: v.detach().cpu() for n, v in est.items()}


def _split(canvas: Any, prompt: str) -> tuple[int, int]:
    """(object index, style index or -1) of a MiniCanvas prompt."""
    for p, o, s in prompt_table(canvas):
        if p == prompt:
            return o, s
    raise ValueError(f"not a MiniCanvas prompt: {prompt!r}")


def erasure_data(canvas: Any, kind: str, concepts: list[str], bank: SampleSet,
                 recipe: Recipe = RECIPE) -> tuple[SampleSet, Any, SampleSet]:
    """``(surrogate, forget_prompts, replay)`` for erasing ``concepts`` of ``kind``.

    ``forget_prompts`` is a mapping ``{surrogate prompt: [forget prompts]}`` for the image
    surrogates and a flat list for ``noise``.
    """
    names = list(canvas.styles if kind == "style" else canvas.objects)
    target = {names.index(c) for c in concepts}
    labels = [_split(canvas, p) for p in bank.prompts]

    def involves_target(o: int, s: int) -> bool:
        return (s in target) if kind == "style" else (o in target)

    replay = bank.select([i for i, (o, s) in enumerate(labels) if not involves_target(o, s)])
    forget_all = sorted({p for p, o, s in prompt_table(canvas) if involves_target(o, s)})
    mode = recipe.canvas.surrogate
    if mode == "noise":
        n = max(len(forget_all), 2 * recipe.settings.batch_size)
        return noise_samples(n, tuple(bank.samples.shape[1:]), "noise", seed=recipe.settings.seed), forget_all, replay

    mapping: dict[str, list[str]] = {}
    keep: list[int] = []
    n = len(names)

    def partner_of(t: int) -> int:
        p = (t + recipe.canvas.partner_offset) % n
        while p in target:  # never stand in with another erased concept
            p = (p + 1) % n
        return p

    def forget_prompt(o: int, s: int) -> str:
        return styled_prompt(canvas.objects[o], canvas.styles[s]) if s >= 0 else unstyled_prompt(canvas.objects[o])

    if mode == "unstyled" and kind != "style":
        raise ValueError("surrogate 'unstyled' is for styles; use 'partner', 'mixed' or 'noise' for objects")
    if mode not in ("partner", "mixed", "unstyled"):
        raise ValueError(f"surrogate must be 'partner', 'mixed', 'unstyled' (styles) or 'noise', got {mode!r}")
    for i, (o, s) in enumerate(labels):
        if kind == "style":
            if s in target or (s == -1) != (mode == "unstyled"):
                continue
            stands_for = [t for t in sorted(target) if mode != "partner" or partner_of(t) == s]
            forget = [forget_prompt(o, t) for t in stands_for]
        else:
            if o in target:
                continue
            stands_for = [t for t in sorted(target) if mode != "partner" or partner_of(t) == o]
            forget = [forget_prompt(t, s) for t in stands_for]
        if forget:
            keep.append(i)
            mapping[bank.prompts[i]] = forget
    return bank.select(keep), mapping, replay


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------


NOT_OPTIONS = ("forget_prompts", "surrogate_prompt", "remember_prompts", "surrogate_samples", "replay_per_prompt",
               "precision")
""":class:`AmnesiaConfig` fields that are no factory options: the bank supplies the data, per erasure,
and MiniCanvas runs in fp32."""


def _recipe(options: dict[str, Any]) -> Recipe:
    setting_names = set(AmnesiaConfig.field_names()) - set(NOT_OPTIONS)
    canvas_names = {f.name for f in fields(CanvasOptions)}
    bad = sorted(set(options) - setting_names - canvas_names)
    if bad:
        raise ValueError(f"unknown amnesia option(s) {bad}; known: {', '.join(sorted(setting_names | canvas_names))}")
    opts = dict(options)
    if "bank_seeds" in opts:
        v = opts["bank_seeds"]
        opts["bank_seeds"] = tuple(int(s) for s in (v if isinstance(v, (list, tuple)) else str(v).split(",")))
    return Recipe(replace(RECIPE.settings, **{k: v for k, v in opts.items() if k in setting_names}),
                  replace(RECIPE.canvas, **{k: v for k, v in opts.items() if k in canvas_names}))


def kind_recipe(kind: str, **options: Any) -> Recipe:
    """The recipe of an erasure of ``kind``: :data:`RECIPE`, then the kind's :data:`KIND_DEFAULTS`, then ``options``
    (:class:`AmnesiaConfig` fields less :data:`NOT_OPTIONS`, and :class:`CanvasOptions` fields)."""
    return _recipe({**KIND_DEFAULTS.get(kind, {}), **options})


def amnesia_method(canvas: Any, kind: str, concepts: list[str], **options: Any) -> Any:
    """Erase ``concepts`` (styles or objects) from ``canvas`` with Selective Amnesia.

    Returns a copy of the canvas whose UNet is a deepcopy with the trained LoRA merged in, and
    an :class:`AmnesiaReport` as ``amnesia_report``. ``options`` are :class:`AmnesiaConfig` fields
    (less :data:`NOT_OPTIONS`) and :class:`CanvasOptions` fields.
    """
    concepts = validate_concepts(canvas, kind, concepts)
    recipe = kind_recipe(kind, **options)
    settings, opts = recipe
    old_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    try:
        progress = not opts.quiet
        t0 = time.perf_counter()
        bank = data_bank(canvas, recipe, progress=progress)
        fisher = minicanvas_fisher(canvas, bank, recipe, progress=progress) if settings.lam > 0 else None
        surrogate, forget, replay = erasure_data(canvas, kind, concepts, bank, recipe)
        t1 = time.perf_counter()

        host = CanvasHost(canvas)
        run = pipeline.train_forgetting_lora(host, replace(settings, forget_prompts=forget), surrogate, replay, fisher,
                                             progress=progress)
        result = run.result
        unet = host.unet
        assert unet is not None
        merge_lora(unet)
        unet.requires_grad_(False)
        t2 = time.perf_counter()
    finally:
        if opts.threads:
            torch.set_num_threads(old_threads)
    flat_forget = sorted({p for v in forget.values() for p in v}) if isinstance(forget, dict) else list(forget)
    used = {k: v for k, v in asdict(settings).items() if k not in NOT_OPTIONS}
    report = AmnesiaReport(result.history, t2 - t1, t1 - t0, flat_forget, len(surrogate), len(replay), {**used, **asdict(opts)})
    if not opts.quiet:
        last = result.history[-1] if result.history else {}
        print(f"amnesia {kind}:{','.join(concepts)}: {result.steps} steps in {t2 - t1:.1f}s "
              f"(bank+Fisher {t1 - t0:.1f}s); final surrogate {last.get('surrogate', float('nan')):.4f} "
              f"replay {last.get('replay', float('nan')):.4f} ewc {last.get('ewc', float('nan')):.3g}",
              file=sys.stderr, flush=True)
    edited = canvas.replace(unet=unet)
    edited.amnesia_report = report
    return edited


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    """``prepare``: build the data bank and Fisher for the shipped model (into the cache, or ``--out``)."""
    from ..canvas import MiniCanvas

    ap = argparse.ArgumentParser(prog="python -m sae_core.minicanvas.plugins.amnesia", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the data bank and Fisher of the default recipe")
    p.add_argument("--targets", default=RECIPE.settings.targets, choices=TARGET_PRESETS)
    p.add_argument("--out", type=Path, default=None,
                   help=f"write the files here (e.g. {mc_files.WEIGHTS_DIR} to ship them); default: the cache")
    p.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    canvas = MiniCanvas.load(judges=False)
    recipe = Recipe(replace(RECIPE.settings, targets=a.targets), RECIPE.canvas)
    t0 = time.perf_counter()
    bank = data_bank(canvas, recipe, out_dir=a.out)
    t1 = time.perf_counter()
    fisher = minicanvas_fisher(canvas, bank, recipe, out_dir=a.out)
    t2 = time.perf_counter()
    total = sum(v.numel() for v in fisher.values())
    mean = sum(float(v.sum()) for v in fisher.values()) / max(total, 1)
    print(f"bank: {len(bank)} samples ({t1 - t0:.1f}s); Fisher {recipe.settings.targets}: {len(fisher)} tensors, {total} values, "
          f"mean {mean:.3g} ({t2 - t1:.1f}s) -> {a.out or cache_dir(canvas)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
