"""Command line: ``python -m sae_core demo`` and ``python -m sae_core bench``.

demo   loads MiniCanvas, prints the base model's object/style accuracy on a small prompt
       subset, writes a labelled PNG grid (rows = prompts, columns = seeds) and, for every
       registered erasure method, erases one style and one object, prints a UA/IRA/CRA
       table and writes a before/after grid.
bench  runs one method on UnlearnCanvas-style metrics: ``--erase style:striped`` erases one
       style, ``--erase style`` every style in turn (then the mean); same for ``object``.
       Every run prints ``UA=.. IRA=.. CRA=.. seconds=..`` (percent, one decimal; seconds =
       wall time of the erasure step).
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_NO_METHOD = 1
EXIT_UNKNOWN_METHOD = 2


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return seeds


def parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option must look like key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def _add_sampling_args(p: argparse.ArgumentParser, seeds: str) -> None:
    p.add_argument("--seeds", type=parse_seeds, default=parse_seeds(seeds),
                   help=f"comma-separated seeds (default {seeds})")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance weight (default: the model's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--weights", type=Path, default=None, help="MiniCanvas weights folder (default: shipped)")


DEMO_METHODS = ("uce", "rece", "saeuron", "itd")
"""Methods the demo runs by default: the ones that erase in seconds from the shipped assets."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sae_core", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="MiniCanvas demo: accuracy, image grid, erasure table")
    d.add_argument("--out", type=Path, default=Path("out/minicanvas_demo.png"), help="PNG grid path")
    d.add_argument("--style", default="striped", help="style erased by each method (default striped)")
    d.add_argument("--object", default="star", help="object erased by each method (default star)")
    d.add_argument("--methods", default=None,
                   help=f"comma-separated registered methods, or 'all' (default: those of {','.join(DEMO_METHODS)} "
                        "that are registered; amnesia trains a LoRA per erasure and takes minutes)")
    _add_sampling_args(d, "0,1,2,3")
    b = sub.add_parser("bench", help="UA/IRA/CRA of one erasure method on MiniCanvas")
    b.add_argument("--method", required=True, help="registered method name")
    b.add_argument("--erase", required=True, metavar="KIND[:NAME[,NAME..]]",
                   help="style | object | style:NAME | object:NAME (several names: one joint erasure)")
    b.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="option passed to the method factory (repeatable)")
    b.add_argument("--baseline", action="store_true", help="also report the unedited model's metrics")
    _add_sampling_args(b, "0")
    return ap


def parse_erase(text: str, canvas) -> tuple[str, list[list[str]]]:
    """``kind`` and the list of runs (each run: the concepts erased together)."""
    kind, _, names = text.partition(":")
    kind = kind.strip()
    if kind not in ("style", "object"):
        raise ValueError(f"--erase must start with 'style' or 'object', got {text!r}")
    universe = list(canvas.styles if kind == "style" else canvas.objects)
    if not names.strip():
        return kind, [[c] for c in universe]
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in chosen if n not in universe]
    if bad:
        raise ValueError(f"unknown {kind}(s) {bad} in --erase; expected one of {universe}")
    return kind, [chosen]


def format_metrics(m, seconds: float) -> str:
    return f"UA={100 * m.ua:.1f} IRA={100 * m.ira:.1f} CRA={100 * m.cra:.1f} seconds={seconds:.1f}"


def _load_methods() -> list[str]:
    from .methods import registered_methods

    return registered_methods()


def cmd_bench(a: argparse.Namespace) -> int:
    import torch  # noqa: F401  (fail early with a clear message if torch is missing)

    from .canvas import MiniCanvas, evaluation_prompts
    from .methods import get_method
    from .metrics import erasure_metrics, mean_metrics

    methods = _load_methods()
    if not methods:
        print("no erasure method is implemented yet (sae_core.minicanvas.methods lists none)",
              file=sys.stderr)
        return EXIT_NO_METHOD
    if a.method not in methods:
        print(f"unknown method {a.method!r}; registered methods: {', '.join(methods)}", file=sys.stderr)
        return EXIT_UNKNOWN_METHOD
    factory = get_method(a.method)
    canvas = MiniCanvas.load(a.weights, device=a.device)
    try:
        kind, runs = parse_erase(a.erase, canvas)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = canvas.styles if kind == "style" else canvas.objects
    specs = evaluation_prompts()
    steps = a.steps or canvas.default_steps
    cfg = canvas.default_cfg if a.cfg is None else a.cfg
    print(f"method={a.method} erase={kind} runs={len(runs)} prompts={len(specs)} seeds={a.seeds} "
          f"steps={steps} cfg={cfg}", flush=True)
    options = dict(a.option)
    if a.baseline:
        table, _ = canvas.evaluate(specs, a.seeds, steps, cfg, progress=True)
        base = [erasure_metrics(table, kind, [names.index(c) for c in run]) for run in runs]
        print(f"baseline {format_metrics(mean_metrics(base), 0.0)}", flush=True)
    results, times = [], []
    for run in runs:
        t0 = time.perf_counter()
        edited = factory(canvas, kind, list(run), **options)
        seconds = time.perf_counter() - t0
        table, _ = edited.evaluate(specs, a.seeds, steps, cfg, progress=True)
        m = erasure_metrics(table, kind, [names.index(c) for c in run])
        results.append(m)
        times.append(seconds)
        print(f"{kind}:{','.join(run)} {format_metrics(m, seconds)}", flush=True)
    if len(runs) > 1:
        print(f"mean {format_metrics(mean_metrics(results), sum(times) / len(times))}", flush=True)
    return 0


def _demo_specs(kind: str, target: int):
    """Small UA/IRA/CRA prompt set: the target's prompts, one prompt per other concept, unstyled."""
    from .canvas import PromptSpec
    from .data import OBJECTS, STYLES, prompt_for

    n_obj, n_sty = len(OBJECTS), len(STYLES)
    specs = []
    if kind == "style":
        specs += [PromptSpec(prompt_for(o, target), o, target) for o in range(n_obj)]
        others = [s for s in range(n_sty) if s != target]
        specs += [PromptSpec(prompt_for(o, s), o, s) for o, s in zip(range(n_obj), others * 2)]
    else:
        specs += [PromptSpec(prompt_for(target, s), target, s) for s in range(n_sty)]
        others = [o for o in range(n_obj) if o != target]
        specs += [PromptSpec(prompt_for(o, s), o, s) for o, s in zip(others, range(n_sty))]
    specs += [PromptSpec(prompt_for(o, None), o, -1) for o in range(n_obj)]
    return specs


def cmd_demo(a: argparse.Namespace) -> int:
    import torch

    from .canvas import MiniCanvas, evaluation_prompts
    from .data import OBJECTS, STYLES, prompt_for
    from .grid import image_grid, save_png
    from .methods import get_method
    from .metrics import base_accuracy, erasure_metrics

    t_start = time.perf_counter()
    canvas = MiniCanvas.load(a.weights, device=a.device)
    steps = a.steps or canvas.default_steps
    cfg = canvas.default_cfg if a.cfg is None else a.cfg
    if a.style not in STYLES or a.object not in OBJECTS:
        print(f"error: --style must be one of {list(STYLES)} and --object one of {list(OBJECTS)}", file=sys.stderr)
        return 2

    # base accuracy: every object x style prompt and the unstyled prompts, one seed
    specs = evaluation_prompts()
    table, _ = canvas.evaluate(specs, a.seeds[:1], steps, cfg, progress=True)
    obj_acc, sty_acc = base_accuracy(table)
    print(f"MiniCanvas base model ({len(specs)} prompts x 1 seed, {steps} DDIM steps, cfg {cfg}): "
          f"object accuracy {100 * obj_acc:.1f}%, style accuracy {100 * sty_acc:.1f}%", flush=True)

    # image grid: each object in a different style, plus two unstyled prompts
    prompts = [prompt_for(o, o % len(STYLES)) for o in range(len(OBJECTS))]
    prompts += [prompt_for(o, None) for o in (0, 3)]
    images = canvas.sample(prompts, a.seeds, steps, cfg, progress=True)
    grid = image_grid(images, len(prompts), len(a.seeds), prompts, [f"seed {s}" for s in a.seeds])
    out = save_png(grid, a.out)
    print(f"wrote {out}", flush=True)

    registered = methods = _load_methods()
    if a.methods is None:
        methods = [m for m in DEMO_METHODS if m in registered]
    elif a.methods.strip() != "all":
        wanted = [m.strip() for m in a.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in methods]
        if unknown:
            print(f"unknown method(s) {unknown}; registered methods: {', '.join(methods) or 'none'}", file=sys.stderr)
            return EXIT_UNKNOWN_METHOD
        methods = wanted
    if not methods:
        why = ("no erasure method is registered yet" if not registered else
               f"none of the default demo methods ({', '.join(DEMO_METHODS)}) is registered; pick with --methods")
        print(f"{why}: skipping the erasure table", flush=True)
        print(f"demo finished in {time.perf_counter() - t_start:.1f}s")
        return 0

    jobs = [("style", a.style, STYLES.index(a.style)), ("object", a.object, OBJECTS.index(a.object))]
    rows, grid_rows, labels = [], [], []
    # before/after prompts: the erased style on two objects, the erased object in two styles, a control
    si, oi = STYLES.index(a.style), OBJECTS.index(a.object)
    ba_pairs = [(0 if oi != 0 else 1, si), (4 if oi != 4 else 5, si), (oi, (si + 5) % len(STYLES)),
                (oi, None), (2 if oi != 2 else 6, (si + 6) % len(STYLES))]
    ba_prompts = [prompt_for(o, s) for o, s in ba_pairs]
    ba_labels = [f"{OBJECTS[o]}/{STYLES[s] if s is not None else '-'}" for o, s in ba_pairs]
    seed = a.seeds[:1]
    grid_rows.append(canvas.sample(ba_prompts, seed, steps, cfg))
    labels.append("original")
    for name in methods:
        factory = get_method(name)
        for kind, concept, idx in jobs:
            t0 = time.perf_counter()
            try:
                edited = factory(canvas, kind, [concept])
            except Exception as e:  # noqa: BLE001 - report and keep going with the other methods
                print(f"{name} failed to erase {kind} {concept}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            seconds = time.perf_counter() - t0
            t_table, _ = edited.evaluate(_demo_specs(kind, idx), seed, steps, cfg)
            rows.append((name, f"{kind}:{concept}", erasure_metrics(t_table, kind, idx), seconds))
            grid_rows.append(edited.sample(ba_prompts, seed, steps, cfg))
            labels.append(f"{name} -{concept}")
    print(f"\n{'method':<20} {'erase':<18} {'UA':>6} {'IRA':>6} {'CRA':>6} {'seconds':>8}")
    for name, what, m, s in rows:
        print(f"{name:<20} {what:<18} {100 * m.ua:6.1f} {100 * m.ira:6.1f} {100 * m.cra:6.1f} {s:8.1f}")
    ba = image_grid(torch.cat(grid_rows), len(grid_rows), len(ba_prompts), labels, ba_labels, scale=3)
    ba_path = save_png(ba, Path(a.out).with_name(Path(a.out).stem + "_erasure.png"))
    print(f"wrote {ba_path}")
    print(f"demo finished in {time.perf_counter() - t_start:.1f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.command == "bench":
            return cmd_bench(a)
        return cmd_demo(a)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
