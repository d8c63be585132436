"""SAeUron on MiniCanvas: the ``saeuron`` method of ``python -m sae_core bench``.

Like the reference, which hooks ``up.1.1`` for objects and ``up.1.2`` for styles, each kind has its
own SAE on its own up-path cross-attention block (:attr:`SAeUronRecipe.blocks`): styles on
``output_blocks.3.1`` (the last transformer of the 16x16 level, followed by the Upsample, as SD's
``output_blocks.5.1``), objects on ``output_blocks.2.1`` (as SD's ``output_blocks.4.1``). What ships
(package data under ``sae_core/minicanvas/weights/``), per kind:

* ``saeuron_sae_<kind>.safetensors``: a TopK SAE trained on the block's output (or its update, see
  :attr:`SAeUronRecipe.sources`), with activations
  from every DDIM step of every MiniCanvas prompt (conditional CFG branch), trained with
  :class:`sae_core.trainer.SaeTrainer`;
* ``saeuron_stats_<kind>.safetensors``: SAeUron's per-step concept statistics of every style (or
  object) in that SAE's latents.

The files record a fingerprint of the MiniCanvas UNet they were built for. If the model
weights change, the method rebuilds them (several minutes on two CPU cores) into a cache folder
(``$SAE_CORE_CACHE`` or ``~/.cache/sae_core``) and reuses that cache afterwards.

Rebuild the shipped files, or screen intervention settings::

    python -m sae_core.minicanvas.plugins.saeuron build            # writes into the package weights
    python -m sae_core.minicanvas.plugins.saeuron sweep --kind style --gamma=-1,-2 --top-n 1,2 --fast
    python -m sae_core.minicanvas.plugins.saeuron sweep --kind object --gamma=-1,-4 --top-n 1,4 --per-concept --fast

``--per-concept`` is the reference's per-class selection: for each concept the grid point with the best
``(UA + IRA) / 2`` on the selection seeds (``--select-seeds``, default 1,2), printed as ``concept_params``; that
table is then evaluated on all 72 prompts at ``--seeds`` (default 0, the bench's).

Factory options (``--option key=value`` on the bench command line): ``gamma``, ``top_n``,
``percentile``, ``error_mode`` (``conventional`` | ``reference``), ``cond_only``, ``concept_params``
(per-concept gamma and rule, the Concept Block node's input of that name).

This module only adapts MiniCanvas to the SAeUron pipeline (:mod:`sae_core.saeuron.pipeline`):
:class:`CanvasHost` and :class:`CanvasPosition` are its host and sampler position, the factory turns
its options into one ``ConceptBlockSettings`` and calls ``build_concept_edit`` (as the SAeUron Concept
Block node does), and the asset build collects activations with ``collect_activations`` (as the
Collect SAE Activations node does).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...capture import capture
from ...config import TrainConfig
from ...formats import load_sae, save_sae
from .. import files as mc_files
from ..files import unet_fingerprint
from ..data import OBJECTS, STYLES, prompt_for
from ..methods import KINDS, validate_concepts
from ...saeuron import (
    SOURCES,
    BlockRef,
    ConceptBlockEdit,
    ConceptBlockSettings,
    ConceptStats,
    build_concept_edit,
    collect_activations,
    concept_stats_from_store,
)
from ...store import ActivationReader, ActivationWriter
from ...trainer import SaeTrainer

__all__ = [
    "CanvasHost",
    "CanvasPosition",
    "SAeUronRecipe",
    "SAeUronAssets",
    "build_assets",
    "canvas_block_hook",
    "load_assets",
    "saeuron_factory",
    "unet_fingerprint",
]

SAE_FILES = {kind: f"saeuron_sae_{kind}.safetensors" for kind in KINDS}
STATS_FILES = {kind: f"saeuron_stats_{kind}.safetensors" for kind in KINDS}


@dataclass
class SAeUronRecipe:
    """How the MiniCanvas SAeUron assets are built and applied."""

    blocks: dict[str, str] = field(default_factory=lambda: {"style": "output_blocks.3.1",
                                                            "object": "output_blocks.2.1"})
    """Hooked UNet block per kind: the two up-path SpatialTransformers of the 16x16 grid."""
    sources: dict[str, str] = field(default_factory=lambda: {"style": "output", "object": "output"})
    """What the SAE of each kind reads: the block's ``output`` (SAeUron's default) or its update
    ``diff`` (output minus input, the reference's ``output_or_diff="diff"``)."""
    expansion_factor: int = 16
    """SAE latents per activation dimension (SAeUron: 16)."""
    k: int = 8
    """Active latents per token."""
    steps: int = 25
    """DDIM steps of the collection run (statistics are indexed by these steps)."""
    cfg: float | None = None
    """CFG weight of the collection run (None: the model's default)."""
    seeds: tuple[int, ...] = (1000, 1001, 1002, 1003)
    """Noise seeds of the collection run (disjoint from the bench's evaluation seeds)."""
    train_steps: int = 1500
    """SAE optimiser steps."""
    batch_tokens: int = 4096
    """Tokens per SAE optimiser step."""
    lr: float = 2e-3
    """SAE peak learning rate (linear decay to 0)."""
    dead_feature_threshold: int = 400_000
    """Tokens without firing after which a latent counts as dead (AuxK)."""
    seed: int = 0
    """SAE initialisation seed."""
    style: dict[str, Any] = field(default_factory=lambda: {"gamma": -2.0, "top_n": 2})
    """Default intervention options for styles (from ``sweep --kind style --fast`` over gamma -1, -2 x
    top_n 1, 2, 4, 8: -1/2 leaves a quarter of the styles' images intact, -2/2 erases 94% and keeps 96%
    of the others)."""
    object: dict[str, Any] = field(default_factory=lambda: {"gamma": -1.0, "top_n": 2})
    """Default intervention options for objects."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        return d


RECIPE = SAeUronRecipe()
"""The recipe of the shipped assets and the factory's defaults."""


@dataclass
class SAeUronAssets:
    """A trained SAE and its concept statistics for one kind (style or object) of one MiniCanvas model."""

    kind: str
    """``"style"`` or ``"object"``."""
    sae: Any
    """The SparseAutoencoder (per-token TopK)."""
    stats: ConceptStats
    """Per-step statistics of every concept of the kind."""
    block: str
    """Hooked block."""
    source: str
    """What the SAE reads: the block's ``output`` or its update ``diff``."""
    folder: Path
    """Where the files live."""


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------


class CanvasPosition:
    """The MiniCanvas sampler's position (its :class:`SamplingContext`) as SAeUron reads it."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def timestep(self) -> float:
        return float(self.ctx.timestep)

    def sigma(self) -> None:
        return None  # DDIM on MiniCanvas is indexed by timestep

    def run_step(self) -> tuple[int, int]:
        return int(self.ctx.step_index), int(self.ctx.num_steps)

    def cond_mask(self) -> torch.Tensor:
        """``[2B]`` (or ``[B]``) bool of the CFG batch layout the MiniCanvas sampler reports."""
        ctx = self.ctx
        return torch.tensor([half == "cond" for half in ctx.cfg_order]).repeat_interleave(int(ctx.batch_size))


class CanvasHost:
    """A MiniCanvas as an :class:`~sae_core.saeuron.SAeUronHost`: blocks by UNet name, sampling of
    ``(prompt, seed)`` items with one seed per batch."""

    def __init__(self, canvas: Any, steps: int | None = None, cfg: float | None = None) -> None:
        self.canvas = canvas
        self.steps = steps
        self.cfg = cfg

    def find_block(self, block: str) -> BlockRef:
        try:
            module = self.canvas.get_block(block)
        except KeyError as err:
            raise ValueError(f"block: {err.args[0]}") from None
        return BlockRef(block, module, int(module.proj_out.out_features))

    def denoiser(self) -> torch.nn.Module:
        return self.canvas.unet

    def sample(self, batch: list[tuple[str, int]]) -> None:
        seeds = {s for _, s in batch}
        if len(seeds) != 1:
            raise RuntimeError("internal: a collection batch mixes seeds")
        self.canvas.sample([p for p, _ in batch], sorted(seeds), self.steps, self.cfg, batch_size=len(batch))

    def position(self) -> CanvasPosition:
        return CanvasPosition(self.canvas.context)


def _prompt_table() -> list[tuple[str, int, int]]:
    """(prompt, object index, style index or -1) for every MiniCanvas prompt."""
    rows = [(prompt_for(o, s), o, s) for o in range(len(OBJECTS)) for s in range(len(STYLES))]
    rows += [(prompt_for(o, None), o, -1) for o in range(len(OBJECTS))]
    return rows


def _check_kinds(kinds: Any) -> tuple[str, ...]:
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be among {KINDS}, got {kinds}")
    return kinds


def build_assets(canvas: Any, out_dir: str | os.PathLike, recipe: SAeUronRecipe = RECIPE,
                 progress: bool = True, kinds: Any = KINDS) -> dict[str, SAeUronAssets]:
    """Collect activations, train an SAE per hooked block, compute the statistics, and save them.

    One sampling pass per block serves both the SAE's training data and the statistics: every
    prompt (64 styled + 8 unstyled) with every seed of the recipe, all DDIM steps, conditional rows.
    Kinds that share a block and source share its SAE (saved once per kind).
    """
    out_dir = Path(out_dir)
    kinds = _check_kinds(kinds)
    by_block: dict[tuple[str, str], list[str]] = {}
    for kind in kinds:
        block = recipe.blocks[kind]
        canvas.get_block(block)  # clear error for an unknown block name
        source = recipe.sources.get(kind, "output")
        if source not in SOURCES:
            raise ValueError(f"sources[{kind!r}] must be one of {SOURCES}, got {source!r}")
        by_block.setdefault((block, source), []).append(kind)
    fp = unet_fingerprint(canvas.unet)
    out_dir.mkdir(parents=True, exist_ok=True)
    for (block, source), block_kinds in by_block.items():
        sae, stats = _build_block(canvas, block, source, block_kinds, recipe, fp, progress)
        sae.cfg.extra["unet_fingerprint"] = fp
        sae.cfg.extra["source"] = source
        sae.cfg.extra["recipe"] = recipe.to_dict()
        for kind in block_kinds:
            save_sae(sae, out_dir / SAE_FILES[kind], layout="file")
            stats[kind].save(out_dir / STATS_FILES[kind], dtype=torch.float16)
    # reload what was written (fp16 statistics) so a fresh build behaves exactly like a later load
    return {kind: _read_assets(out_dir, kind, canvas.device) for kind in kinds}


def _build_block(canvas: Any, block: str, source: str, kinds: list[str], recipe: SAeUronRecipe, fp: str,
                 progress: bool) -> tuple[Any, dict[str, ConceptStats]]:
    table = _prompt_table()
    items = [(p, s) for s in recipe.seeds for p, _, _ in table]  # seed-major: one sampler call per seed
    cfg = canvas.default_cfg if recipe.cfg is None else recipe.cfg
    base = canvas.replace(hooks=[])
    host = CanvasHost(base, recipe.steps, cfg)
    timesteps = canvas.schedule.ddim_timesteps(recipe.steps)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="saeuron-acts-") as tmp:
        store = Path(tmp) / "acts"
        with capture(base.unet, block) as probe:  # the block's width, from one 1-step sample
            base.sample([table[0][0]], [0], 1, cfg)
        d = int(probe.tensors[0].shape[1])
        with ActivationWriter(store, d=d, dtype="float32", shard_tokens=1 << 17,
                              metadata_columns=("step", "timestep", "cond", "prompt_index", "position"),
                              attrs={"hookpoint": block}) as writer:
            collect_activations(host, block, items, recipe.steps, writer, branch="cond", source=source,
                                batch_size=len(table), progress=progress)
        reader = ActivationReader(store)
        t_collect = time.perf_counter() - t0

        train_cfg = TrainConfig(batch_size=recipe.batch_tokens, lr=recipe.lr, k=recipe.k,
                                expansion_factor=recipe.expansion_factor, batch_topk=True, seed=recipe.seed,
                                dead_feature_threshold=recipe.dead_feature_threshold, log_every=100,
                                device=str(canvas.device), hookpoint=block, model_family="minicanvas")
        trainer = SaeTrainer(train_cfg, d)
        epochs = reader.iter_epochs(recipe.batch_tokens, drop_last=True, seed=recipe.seed)
        sae = trainer.train((batch for _, batch in epochs), recipe.train_steps, progress=progress)
        fvu = trainer.history[-1]["fvu"] if trainer.history else float("nan")
        t_train = time.perf_counter() - t0 - t_collect

        hw = len(reader) // (len(items) * recipe.steps)
        stats = {}
        for kind in kinds:
            names, col = (STYLES, 2) if kind == "style" else (OBJECTS, 1)
            per_item = [row[col] for _ in recipe.seeds for row in table]
            stats[kind] = concept_stats_from_store(
                reader, sae, list(names), per_item, recipe.steps, hw, schedule=timesteps,
                progress=progress, attrs={"kind": kind, "recipe": recipe.to_dict(), "unet_fingerprint": fp})
    t_stats = time.perf_counter() - t0 - t_collect - t_train
    if progress:
        print(f"SAeUron assets for {block} {source} ({', '.join(kinds)}): {len(reader)} tokens (d={d}), SAE "
              f"{sae.cfg.num_latents} latents k={sae.cfg.k}, final FVU {fvu:.4f}; collect {t_collect:.0f}s, "
              f"train {t_train:.0f}s, stats {t_stats:.0f}s", flush=True)
    return sae, stats


def _has_files(folder: Path, kind: str) -> bool:
    return (folder / SAE_FILES[kind]).is_file() and (folder / STATS_FILES[kind]).is_file()


def _read_assets(folder: Path, kind: str, device: Any) -> SAeUronAssets:
    sae = load_sae(folder / SAE_FILES[kind], device=device)
    stats = ConceptStats.load(folder / STATS_FILES[kind])
    stats.check_sae(sae)
    source = str(sae.cfg.extra.get("source", "output"))
    return SAeUronAssets(kind, sae, stats, sae.cfg.hookpoint or RECIPE.blocks[kind], source, folder)


def _cache_dir(fingerprint: str) -> Path:
    root = Path(os.environ.get("SAE_CORE_CACHE", Path.home() / ".cache" / "sae_core"))
    return root / "saeuron_minicanvas" / fingerprint


_LOADED: dict[tuple[str, str, str], SAeUronAssets] = {}


def load_assets(canvas: Any, kind: str, folder: str | os.PathLike | None = None,
                progress: bool = True) -> SAeUronAssets:
    """The SAE and statistics of ``kind`` for ``canvas``: from ``folder`` (default: the package
    weights) when they match the canvas' UNet, else from (or built into) the cache folder."""
    (kind,) = _check_kinds([kind])
    fp = unet_fingerprint(canvas.unet)
    key = (str(folder), kind, fp)
    if key in _LOADED:
        return _LOADED[key]
    candidates = [Path(folder)] if folder is not None else [mc_files.WEIGHTS_DIR, _cache_dir(fp)]
    assets = None
    for where in candidates:
        if _has_files(where, kind):
            found = _read_assets(where, kind, canvas.device)
            if found.sae.cfg.extra.get("unet_fingerprint") == fp:
                assets = found
                break
    if assets is None:
        if folder is not None and (Path(folder) / SAE_FILES[kind]).is_file():
            raise ValueError(f"{folder}: the SAeUron {kind} files were built for another MiniCanvas model")
        target = Path(folder) if folder is not None else _cache_dir(fp)
        print(f"SAeUron: no {kind} SAE/statistics for this MiniCanvas model yet; building them in {target}",
              file=sys.stderr, flush=True)
        assets = build_assets(canvas, target, progress=progress, kinds=[kind])[kind]
    _LOADED[key] = assets
    return assets


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------


def canvas_block_hook(edit: ConceptBlockEdit) -> Any:
    """The MiniCanvas block hook ``(module, inputs, output, ctx) -> output`` applying ``edit``."""

    def block_hook(_module: Any, inputs: Any, output: torch.Tensor, ctx: Any) -> torch.Tensor:
        return edit(inputs, output, CanvasPosition(ctx))

    return block_hook


def saeuron_factory(canvas: Any, kind: str, concepts: list[str], *, gamma: float | None = None,
                    top_n: int | None = None, percentile: float | None = None,
                    error_mode: str = "conventional", cond_only: bool = False,
                    concept_params: Any = None, assets_dir: str | None = None) -> Any:
    """Erase ``concepts`` (styles or objects) from ``canvas`` with SAeUron.

    Returns a copy of the canvas with a hook on the kind's SAE block; the hook maps the sampler's
    timestep to the statistics' nearest step, so any ``--steps`` works. Defaults for ``gamma``
    and ``top_n`` come from :data:`RECIPE` (``percentile`` replaces ``top_n`` when given).
    ``concept_params`` gives concepts their own gamma and rule, as the Concept Block node's input of that
    name (text lines ``concept: gamma, top_n=N`` or a mapping; lines of concepts not erased are ignored),
    e.g. ``--option concept_params="star: -4, top_n=4"`` on the bench.
    """
    concepts = validate_concepts(canvas, kind, concepts)
    assets = load_assets(canvas, kind, assets_dir)
    defaults = RECIPE.style if kind == "style" else RECIPE.object
    gamma = float(defaults["gamma"] if gamma is None else gamma)
    settings = ConceptBlockSettings(block=assets.block, concepts=tuple(concepts), gamma=gamma,
                                    selection="top_n" if percentile is None else "percentile",
                                    top_n=int(defaults["top_n"] if top_n is None else top_n),
                                    percentile=99.999 if percentile is None else float(percentile),
                                    error_mode=error_mode, cond_only=bool(cond_only), source=assets.source,
                                    concept_params=concept_params or ())
    edit = build_concept_edit(CanvasHost(canvas), assets.sae, assets.stats, settings)
    edited = canvas.with_hook(edit.block, canvas_block_hook(edit))
    edited.saeuron_hook = edit.hook  # for inspection (fired-token counters)
    edited.saeuron_edit = edit
    return edited



# ---------------------------------------------------------------------------------------------
# command line: build and sweep
# ---------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _screen_specs(specs: list[Any], kind: str, target: int, n: int) -> list[Any]:
    """A small prompt set that still measures UA, IRA and CRA for one target."""
    if kind == "style":
        keep = [s for s in specs if s.style_idx == target or s.style_idx < 0
                or (s.style_idx >= 0 and s.style_idx == (target + 1 + s.object_idx % (n - 1)) % n
                    and s.style_idx != target)]
    else:
        keep = [s for s in specs if s.object_idx == target
                or (s.style_idx >= 0 and s.style_idx == (s.object_idx + target) % n)]
    return keep


def _per_concept_sweep(a: Any, canvas: Any, assets: SAeUronAssets, names: list[str], concepts: list[str],
                       specs: list[Any], steps: int) -> int:
    """The reference's per-class selection: each concept's best (gamma, top_n) by (UA + IRA) / 2 on the selection
    seeds, then the resulting ``concept_params`` table evaluated on every prompt at the evaluation seeds."""
    from ...saeuron import format_concept_params, parse_concept_params
    from ..metrics import erasure_metrics, mean_metrics

    overlap = sorted(set(a.select_seeds) & set(a.seeds))
    if overlap:
        raise SystemExit(f"--select-seeds and --seeds share {overlap}; select on other seeds than you evaluate on")
    chosen: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    for c in concepts:
        target = names.index(c)
        run_specs = _screen_specs(specs, a.kind, target, len(names)) if a.fast else specs
        best = None
        for g in a.gamma:
            for n in a.top_n:
                edited = saeuron_factory(canvas, a.kind, [c], gamma=g, top_n=n, error_mode=a.error_mode,
                                         assets_dir=str(assets.folder))
                table, _ = edited.evaluate(run_specs, a.select_seeds, steps)
                m = erasure_metrics(table, a.kind, [target])
                score = (m.ua + m.ira) / 2
                if best is None or score > best[0]:
                    best = (score, g, n, m)
        score, g, n, m = best
        chosen[c] = {"gamma": g, "top_n": n}
        print(f"select {c}: gamma={g} top_n={n} (UA+IRA)/2={100 * score:.1f} UA={100 * m.ua:.1f} "
              f"IRA={100 * m.ira:.1f} CRA={100 * m.cra:.1f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    text = format_concept_params(parse_concept_params(chosen))
    print("concept_params:\n" + text, flush=True)
    results = []
    for c in concepts:
        edited = saeuron_factory(canvas, a.kind, [c], concept_params=text, error_mode=a.error_mode,
                                 assets_dir=str(assets.folder))
        table, _ = edited.evaluate(specs, a.seeds, steps)
        results.append(erasure_metrics(table, a.kind, [names.index(c)]))
        r = results[-1]
        print(f"evaluate {c}: UA={100 * r.ua:.1f} IRA={100 * r.ira:.1f} CRA={100 * r.cra:.1f}", flush=True)
    m = mean_metrics(results)
    print(f"{a.kind} block={assets.block} per-concept UA={100 * m.ua:.1f} IRA={100 * m.ira:.1f} CRA={100 * m.cra:.1f} "
          f"mean={100 * (m.ua + m.ira + m.cra) / 3:.1f} (seeds {a.seeds}, {time.perf_counter() - t0:.0f}s)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..canvas import MiniCanvas, evaluation_prompts
    from ..metrics import erasure_metrics, mean_metrics

    ap = argparse.ArgumentParser(prog="python -m sae_core.minicanvas.plugins.saeuron", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the SAE and statistics")
    b.add_argument("--out", type=Path, default=mc_files.WEIGHTS_DIR)
    b.add_argument("--style-block", default=RECIPE.blocks["style"])
    b.add_argument("--object-block", default=RECIPE.blocks["object"])
    b.add_argument("--style-source", choices=SOURCES, default=RECIPE.sources["style"])
    b.add_argument("--object-source", choices=SOURCES, default=RECIPE.sources["object"])
    b.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds to build")
    b.add_argument("--train-steps", type=int, default=RECIPE.train_steps)
    b.add_argument("--k", type=int, default=RECIPE.k)
    b.add_argument("--expansion", type=int, default=RECIPE.expansion_factor)
    s = sub.add_parser("sweep", help="UA/IRA/CRA over a grid of gamma x top_n")
    s.add_argument("--assets", type=Path, default=None, help="folder of built assets (default: shipped)")
    s.add_argument("--kind", choices=KINDS, required=True)
    s.add_argument("--gamma", type=_floats, default=[-1.0])
    s.add_argument("--top-n", type=_ints, default=[1])
    s.add_argument("--concepts", default=None, help="comma-separated subset (default: all)")
    s.add_argument("--error-mode", default="conventional")
    s.add_argument("--fast", action="store_true",
                   help="screen on 24-25 prompts per run (the target's prompts, one per other concept, "
                        "the unstyled ones) instead of all 72")
    s.add_argument("--per-concept", action="store_true",
                   help="SAeUron's per-class selection: for each concept the grid point with the best (UA + IRA) / 2 "
                        "on --select-seeds, printed as concept_params, then that table evaluated on all 72 prompts "
                        "at --seeds")
    s.add_argument("--select-seeds", type=_ints, default=[1, 2],
                   help="seeds of the per-concept selection (disjoint from the evaluation --seeds)")
    for p in (b, s):
        p.add_argument("--seeds", type=_ints, default=[0])
        p.add_argument("--steps", type=int, default=None)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--weights", type=Path, default=None, help="MiniCanvas weights folder (default: shipped)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    canvas = MiniCanvas.load(a.weights)
    if a.command == "build":
        recipe = SAeUronRecipe(blocks={"style": a.style_block, "object": a.object_block},
                               sources={"style": a.style_source, "object": a.object_source},
                               train_steps=a.train_steps, k=a.k, expansion_factor=a.expansion)
        build_assets(canvas, a.out, recipe, kinds=a.kinds.split(","))
        return 0
    assets = load_assets(canvas, a.kind, a.assets)
    names = list(canvas.styles if a.kind == "style" else canvas.objects)
    concepts = names if a.concepts is None else a.concepts.split(",")
    specs = evaluation_prompts()
    steps = a.steps or canvas.default_steps
    if a.per_concept:
        return _per_concept_sweep(a, canvas, assets, names, concepts, specs, steps)
    for g in a.gamma:
        for n in a.top_n:
            results = []
            t0 = time.perf_counter()
            for c in concepts:
                edited = saeuron_factory(canvas, a.kind, [c], gamma=g, top_n=n, error_mode=a.error_mode,
                                         assets_dir=str(assets.folder))
                run_specs = _screen_specs(specs, a.kind, names.index(c), len(names)) if a.fast else specs
                table, _ = edited.evaluate(run_specs, a.seeds, steps)
                results.append(erasure_metrics(table, a.kind, [names.index(c)]))
            m = mean_metrics(results)
            per = " ".join(f"{c}:{100 * r.ua:.0f}/{100 * r.ira:.0f}/{100 * r.cra:.0f}" for c, r in zip(concepts, results))
            print(f"{a.kind} block={assets.block} gamma={g} top_n={n} UA={100 * m.ua:.1f} IRA={100 * m.ira:.1f} "
                  f"CRA={100 * m.cra:.1f} ({time.perf_counter() - t0:.0f}s) [{per}]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
