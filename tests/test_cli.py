"""Command line: bench/demo argument handling, method registry, output format."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.minicanvas import cli
from sae_core.minicanvas import methods as registry
from sae_core.minicanvas.canvas import MiniCanvas
from sae_core.minicanvas.metrics import EvalTable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def empty_registry(monkeypatch):
    """No plug-ins and an empty registry for the duration of a test."""
    saved = dict(registry._REGISTRY)
    registry._REGISTRY.clear()
    monkeypatch.setattr(registry, "PLUGINS", {})
    yield registry
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.fixture
def perfect_judging(monkeypatch):
    """Replace generation + judging by a perfect table (no sampling cost)."""

    def evaluate(self, specs, seeds, steps=None, cfg=None, progress=False, batch_size=64):
        reps = len(seeds)
        obj = np.repeat([s.object_idx for s in specs], reps)
        sty = np.repeat([s.style_idx for s in specs], reps)
        return EvalTable(obj, sty, obj, np.where(sty < 0, 0, sty)), torch.zeros(len(obj), 3, 32, 32)

    monkeypatch.setattr(MiniCanvas, "evaluate", evaluate)
    monkeypatch.setattr(MiniCanvas, "sample",
                        lambda self, prompts, seeds=0, *a, **k: torch.rand(len(prompts) * len(np.atleast_1d(seeds)), 3, 32, 32))


def test_bench_without_methods_fails_with_message(empty_registry, capsys):
    rc = cli.main(["bench", "--method", "saeuron", "--erase", "style:striped"])
    assert rc != 0
    assert "no erasure method is implemented yet" in capsys.readouterr().err


def test_bench_unknown_method_lists_registered(empty_registry, capsys):
    registry.register_method("identity", lambda canvas, kind, concepts, **o: canvas)
    rc = cli.main(["bench", "--method", "nope", "--erase", "style"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "identity" in err


def test_bench_output_format_single_and_all(empty_registry, perfect_judging, capsys):
    calls = []

    def identity(canvas, kind, concepts, **options):
        calls.append((kind, tuple(concepts), options))
        return canvas.replace()

    registry.register_method("identity", identity)
    line = re.compile(r"UA=\d+\.\d IRA=\d+\.\d CRA=\d+\.\d seconds=\d+\.\d$")
    assert cli.main(["bench", "--method", "identity", "--erase", "style:dotted", "--option", "gamma=-2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert line.search(out[-1]) and "UA=0.0 IRA=100.0 CRA=100.0" in out[-1]
    assert calls == [("style", ("dotted",), {"gamma": -2})]
    calls.clear()
    assert cli.main(["bench", "--method", "identity", "--erase", "object"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    runs = [l for l in out if line.search(l) and not l.startswith("mean")]
    assert len(runs) == 8 and len(calls) == 8
    assert out[-1].startswith("mean UA=") and line.search(out[-1])


def test_bench_rejects_bad_erase(empty_registry, capsys):
    registry.register_method("identity", lambda canvas, kind, concepts, **o: canvas)
    assert cli.main(["bench", "--method", "identity", "--erase", "style:plaid"]) != 0
    assert "plaid" in capsys.readouterr().err
    assert cli.main(["bench", "--method", "identity", "--erase", "colour"]) != 0


def test_demo_without_methods_writes_png(empty_registry, perfect_judging, tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--out", str(out), "--seeds", "0,1"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and out.stat().st_size > 0
    assert "object accuracy 100.0%" in text and "no erasure method is registered" in text
    from PIL import Image

    with Image.open(out) as im:
        assert im.width > 64 and im.height >= 10 * 64


def test_registry_contract():
    with pytest.raises(ValueError):
        registry.register_method("", lambda *a: None)
    with pytest.raises(TypeError):
        registry.register_method("x", 3)
    with pytest.raises(KeyError, match="known methods"):
        registry.get_method("definitely-not-registered")


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "sae_core", "bench", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--erase" in r.stdout and "--seeds" in r.stdout


def test_demo_with_a_method_prints_table_and_before_after(empty_registry, perfect_judging, tmp_path, capsys):
    registry.register_method("identity", lambda canvas, kind, concepts, **o: canvas.replace())
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--out", str(out), "--seeds", "0", "--style", "ocean", "--object", "heart",
                     "--methods", "identity"]) == 0
    text = capsys.readouterr().out
    rows = [l.split() for l in text.splitlines() if l.startswith("identity")]
    assert [r[1] for r in rows] == ["style:ocean", "object:heart"]
    assert all(r[2:5] == ["0.0", "100.0", "100.0"] for r in rows)
    assert (tmp_path / "demo_erasure.png").is_file()
    # by default the demo runs only its fast methods, so a method outside that list is left out
    assert "identity" not in cli.DEMO_METHODS
    assert cli.main(["demo", "--out", str(out), "--seeds", "0", "--steps", "2"]) == 0
    assert "none of the default demo methods" in capsys.readouterr().out
