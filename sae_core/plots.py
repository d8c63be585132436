"""Small charts drawn with PIL, for the numbers a node would otherwise only print.

* :func:`calibration_strip`: a strip plot of scores against a threshold, one row per group of prompts (ItD's
  calibration: every concept and retain prompt's score and ``tau``); prompts on the wrong side of the threshold
  are highlighted.
* :func:`layer_change_chart`: horizontal bars of the relative weight change ``||dW|| / ||W||`` of each
  cross-attention layer's ``to_k`` and ``to_v``, in UNet order, plus SDXL's pooled text input as its own row
  (RECE / UCE).

Both return an RGB ``uint8`` array ``[H, W, 3]``; :func:`image_tensor` turns one into ComfyUI's IMAGE
(``[1, H, W, 3]`` float in ``[0, 1]``). The shared drawing helpers (:func:`font`, :func:`text_width`,
:data:`PALETTE`) also serve the image grids (:mod:`sae_core.minicanvas.grid`) and Selective Amnesia's loss curve.
Nothing here imports ComfyUI.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "PALETTE",
    "ScoreGroup",
    "calibration_strip",
    "fit_text",
    "font",
    "image_tensor",
    "layer_change_chart",
    "layer_label",
    "text_width",
    "wrap_text",
]

PALETTE: dict[str, tuple[int, int, int]] = {
    "blue": (31, 119, 180),
    "orange": (255, 127, 14),
    "green": (44, 160, 44),
    "red": (214, 39, 40),
    "purple": (148, 103, 189),
    "brown": (140, 86, 75),
    "grey": (127, 127, 127),
    "ink": (0, 0, 0),
    "dark": (30, 30, 30),
    "muted": (90, 90, 90),
    "frame": (120, 120, 120),
    "grid": (225, 225, 225),
    "band": (243, 243, 243),
    "white": (255, 255, 255),
}
"""Colours of every chart (the first six are matplotlib's tab10 ones)."""

CONCEPT_COLOUR = PALETTE["orange"]
"""Dots of the prompts that belong at or above the threshold (ItD: the concept prompts)."""
RETAIN_COLOUR = PALETTE["blue"]
"""Dots of the prompts that belong below it (ItD: the retain prompts)."""
WRONG_COLOUR = PALETTE["red"]
"""Dots on the wrong side of the threshold."""
THRESHOLD_COLOUR = PALETTE["purple"]
"""The threshold line."""
SERIES_COLOURS: dict[str, tuple[int, int, int]] = {"to_k": PALETTE["blue"], "to_v": PALETTE["orange"],
                                                    "pooled": PALETTE["green"]}
"""Bars of :func:`layer_change_chart`."""

TEXT_SIZE = 13
"""Font size of the charts' text (pixels); small text is one pixel smaller (the bundled font's spaces vanish
below 12)."""


@functools.lru_cache(maxsize=8)
def font(size: int | None = None) -> Any:
    """PIL's bundled font (``size`` in pixels; ``None``: its default size), or ``None`` (PIL's fallback) when PIL
    has none."""
    try:
        return ImageFont.load_default() if size is None else ImageFont.load_default(size=size)
    except OSError:  # pragma: no cover - PIL without its bundled font
        return None


_PROBE = ImageDraw.Draw(Image.new("RGB", (1, 1)))


def text_width(text: str, fnt: Any = None) -> int:
    """Width in pixels of ``text`` drawn with ``fnt``."""
    box = _PROBE.textbbox((0, 0), text, font=fnt)
    return int(box[2] - box[0])


def fit_text(text: str, width: int, fnt: Any = None) -> str:
    """``text``, cut and ended with an ellipsis where it would be wider than ``width`` pixels."""
    if text_width(text, fnt) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if text_width(text[:mid].rstrip() + "…", fnt) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


def wrap_text(text: str, width: int, fnt: Any = None, max_lines: int = 3) -> list[str]:
    """``text``'s lines broken at spaces to fit ``width`` pixels, at most ``max_lines`` (the last one cut with an
    ellipsis when more would follow)."""
    out: list[str] = []
    for paragraph in text.splitlines():
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and text_width(candidate, fnt) > width:
                out.append(line)
                line = word
            else:
                line = candidate
        if line:
            out.append(line)
    if len(out) > max_lines:
        out = out[:max_lines]
        out[-1] = fit_text(out[-1] + " …", width, fnt)
    return [fit_text(line, width, fnt) for line in out]


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """An RGB ``uint8`` array ``[H, W, 3]`` as ComfyUI's IMAGE: float32 ``[1, H, W, 3]`` in ``[0, 1]``."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image: expected an RGB uint8 array [H, W, 3], got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32) / 255.0).unsqueeze(0)


def _finite(values: Sequence[float], what: str) -> list[float]:
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: value {i} is {v!r}, not a number") from None
        if not math.isfinite(f):
            raise ValueError(f"{what}: value {i} is {f}; every value must be a finite number")
        out.append(f)
    return out


def _format(v: float) -> str:
    return f"{v:.4g}"


# ---------------------------------------------------------------------------------------------
# axes
# ---------------------------------------------------------------------------------------------


class _Heading(NamedTuple):
    """A chart's title and wrapped subtitle, and the y below them (where the legend goes)."""

    titles: list[str]
    subtitles: list[str]
    legend_y: int


def _heading(title: str, subtitle: str, width: int, small: Any, line_h: int) -> _Heading:
    titles = [t for t in (title,) if t]
    subtitles = wrap_text(subtitle, width - 20, small)
    return _Heading(titles, subtitles, 8 + len(titles) * (line_h + 3) + len(subtitles) * line_h + 2)


def _draw_heading(draw: ImageDraw.ImageDraw, heading: _Heading, width: int, bold: Any, small: Any,
                  line_h: int) -> None:
    y = 8
    for t in heading.titles:
        draw.text((10, y), fit_text(t, width - 20, bold), fill=PALETTE["ink"], font=bold)
        y += line_h + 3
    for t in heading.subtitles:
        draw.text((10, y), t, fill=PALETTE["muted"], font=small)
        y += line_h


class _Axis(NamedTuple):
    """A horizontal value axis from pixel ``x0`` to ``x1``."""

    log: bool
    lo: float
    """Linear: the value at ``x0``. Log: log10 of the value where the log part starts."""
    hi: float
    x0: int
    x1: int
    zero_x: int | None = None
    """Log axis with zeros: where 0 is drawn (left of a break); the log part then starts further right."""
    log_x0: int = 0

    def x(self, v: float) -> float:
        if not self.log:
            return self.x0 + (v - self.lo) / (self.hi - self.lo) * (self.x1 - self.x0)
        if v <= 0:
            return float(self.zero_x if self.zero_x is not None else self.log_x0)
        return self.log_x0 + (math.log10(v) - self.lo) / (self.hi - self.lo) * (self.x1 - self.log_x0)

    def ticks(self) -> list[tuple[float, str, bool]]:
        """``(value, label, major)`` of each tick."""
        if not self.log:
            return [(t, _tick_label(t, step), True) for t, step in _nice_ticks(self.lo, self.hi)]
        out: list[tuple[float, str, bool]] = [(0.0, "0", True)] if self.zero_x is not None else []
        for e in range(math.floor(self.lo), math.ceil(self.hi) + 1):
            for m in range(1, 10):
                v = m * 10.0 ** e
                if self.lo - 1e-9 <= math.log10(v) <= self.hi + 1e-9:
                    out.append((v, _decade_label(e) if m == 1 else "", m == 1))
        return out


def _nice_ticks(lo: float, hi: float, count: int = 7) -> list[tuple[float, float]]:
    """``(tick, step)`` at a 1/2/5 x 10^k step covering ``[lo, hi]`` with about ``count`` ticks."""
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + 1e-9 * step:
        ticks.append((k * step, step))
        k += 1
    return ticks


def _tick_label(v: float, step: float) -> str:
    if abs(v) < step * 1e-6:
        return "0"
    if 1e-3 <= step < 1e5:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        return f"{v:.{decimals}f}"
    return f"{v:.1e}"


def _decade_label(e: int) -> str:
    return f"{10.0 ** e:g}" if -3 <= e <= 4 else f"1e{e}"


def _value_axis(values: list[float], x0: int, x1: int, scale: str) -> _Axis:
    if scale not in ("auto", "log", "linear"):
        raise ValueError(f"scale: 'auto', 'log' or 'linear', got {scale!r}")
    positive = [v for v in values if v > 0]
    if scale == "log" and (not positive or min(values) < 0):
        raise ValueError("scale: a log axis needs values >= 0 with at least one above 0")
    log = scale == "log" or (scale == "auto" and positive and min(values) >= 0
                             and max(positive) / min(positive) >= 30.0)
    if log:
        lo, hi = math.log10(min(positive)), math.log10(max(positive))
        pad = max(0.08 * (hi - lo), 0.05)
        zeros = any(v == 0 for v in values)
        zero_x = x0 + 8 if zeros else None
        return _Axis(True, lo - pad, hi + pad, x0, x1, zero_x, x0 + 34 if zeros else x0)
    lo, hi = min(values), max(values)
    lo = min(lo, 0.0) if lo >= 0 else lo
    span = hi - lo
    if span <= 0:
        span = abs(hi) or 1.0
    lo = lo if lo == 0 else lo - 0.05 * span
    return _Axis(False, lo, hi + 0.06 * span, x0, x1, None, x0)


def _draw_axis(draw: ImageDraw.ImageDraw, axis: _Axis, y: int, top: int, bottom: int, fnt: Any, labels: bool = True,
               grid: bool = True, up: bool = False) -> None:
    """Tick marks (and labels) on the line at ``y``; light grid lines from ``top`` to ``bottom``."""
    draw.line([axis.x0, y, axis.x1, y], fill=PALETTE["frame"])
    last_right = -1e9
    for v, label, major in axis.ticks():
        x = round(axis.x(v))
        if grid and major:
            draw.line([x, top, x, bottom], fill=PALETTE["grid"])
        tick = 5 if major else 3
        draw.line([x, y - tick if up else y, x, y if up else y + tick], fill=PALETTE["frame"])
        if labels and label:
            w = text_width(label, fnt)
            lx = min(max(x - w // 2, 0), axis.x1 + 10 - w)
            if lx > last_right + 4:  # never two labels on top of each other
                draw.text((lx, y - 6 - TEXT_SIZE - 2 if up else y + 6), label, fill=PALETTE["muted"], font=fnt)
                last_right = lx + w
    if axis.zero_x is not None:  # the break between 0 and the log part
        bx = (axis.zero_x + axis.log_x0) // 2
        for dx in (-2, 2):
            draw.line([bx + dx - 2, y + 4, bx + dx + 2, y - 4], fill=PALETTE["frame"])


# ---------------------------------------------------------------------------------------------
# the calibration strip plot
# ---------------------------------------------------------------------------------------------


class ScoreGroup(NamedTuple):
    """One row of :func:`calibration_strip`."""

    label: str
    """Row name, e.g. ``"concept prompts"``."""
    scores: Sequence[float]
    above: bool
    """Whether this group's prompts belong at or above the threshold (ItD's concept prompts) rather than below it
    (its retain prompts)."""
    prompts: Sequence[str] = ()
    """Optional: each score's prompt (the highlighted ones are named on the plot)."""


def _wrong(score: float, tau: float, above: bool) -> bool:
    return score < tau if above else score >= tau


def calibration_strip(groups: Sequence[ScoreGroup], tau: float, title: str = "", subtitle: str = "",
                      axis_label: str = "score", width: int = 768, scale: str = "auto",
                      named: int = 3) -> np.ndarray:
    """A strip plot of scores against the threshold ``tau``: RGB ``uint8`` ``[H, W, 3]``.

    One row per group; each score is a dot at its place on one shared axis (``scale``: ``auto`` = a log axis when
    the scores are >= 0 and span 30x or more, zeros drawn left of a break; ``log``; ``linear``), with a little
    vertical spread so equal scores stay visible. ``tau`` is a vertical line labelled with its value. A dot on the
    wrong side of it (below ``tau`` in a group whose prompts belong at or above it, at or above ``tau`` in one
    whose prompts belong below it) is drawn larger in the highlight colour, and up to ``named`` of them per row are
    named by their prompt. The height follows from the number of rows (about 300 px for two at width 768).
    """
    if not groups:
        raise ValueError("calibration plot: no groups of scores to plot")
    if width < 320:
        raise ValueError(f"calibration plot: width must be at least 320 pixels, got {width}")
    (tau,) = _finite([tau], "calibration plot: tau")
    scores = [_finite(g.scores, f"calibration plot: scores of {g.label!r}") for g in groups]
    if not any(scores):
        raise ValueError("calibration plot: every group is empty; there is no score to plot")
    for g, s in zip(groups, scores):
        if g.prompts and len(g.prompts) != len(s):
            raise ValueError(f"calibration plot: {g.label!r} has {len(s)} scores but {len(g.prompts)} prompts")

    fnt, small, bold = font(TEXT_SIZE), font(TEXT_SIZE - 1), font(TEXT_SIZE + 2)
    line_h = TEXT_SIZE + 5
    label_w = max(text_width(g.label, fnt) for g in groups)
    summaries = []
    for g, s in zip(groups, scores):
        wrong = sum(_wrong(v, tau, g.above) for v in s)
        side = "at or above tau" if g.above else "below tau"
        if not s:
            summaries.append(("none", False))
        elif wrong:
            summaries.append((f"{wrong} of {len(s)} {'below' if g.above else 'reach'} tau", True))
        else:
            summaries.append((f"all {len(s)} {side}", False))
    label_w = max([label_w] + [text_width(t, small) for t, _ in summaries])
    left = min(label_w + 16, width // 3)
    right = width - 18
    heading = _heading(title, subtitle, width, small, line_h)
    legend_y = heading.legend_y
    top = legend_y + line_h + 20  # the threshold's label sits between the legend and the rows
    row_h = 72
    bottom = top + row_h * len(groups)
    height = bottom + 50

    img = Image.new("RGB", (width, height), PALETTE["white"])
    draw = ImageDraw.Draw(img)
    _draw_heading(draw, heading, width, bold, small, line_h)

    # legend
    x = left
    entries = [("should reach tau", CONCEPT_COLOUR, "dot") if any(g.above for g in groups) else None,
               ("should stay below tau", RETAIN_COLOUR, "dot") if any(not g.above for g in groups) else None,
               ("wrong side of tau", WRONG_COLOUR, "ring"), ("threshold tau", THRESHOLD_COLOUR, "line")]
    for entry in entries:
        if entry is None:
            continue
        text, colour, kind = entry
        cy = legend_y + line_h // 2
        if kind == "line":
            draw.line([x + 4, cy - 7, x + 4, cy + 7], fill=colour, width=3)
        elif kind == "ring":
            draw.ellipse([x, cy - 5, x + 10, cy + 5], fill=colour, outline=PALETTE["ink"])
        else:
            draw.ellipse([x + 1, cy - 4, x + 9, cy + 4], fill=colour)
        draw.text((x + 15, legend_y + 1), text, fill=PALETTE["dark"], font=small)
        x += 15 + text_width(text, small) + 18

    values = [v for s in scores for v in s] + [tau]
    axis = _value_axis(values, left + 10, right - 10, scale)
    for i in range(len(groups)):  # row bands
        if i % 2 == 0:
            draw.rectangle([left, top + i * row_h, right, top + (i + 1) * row_h - 1], fill=PALETTE["band"])
    _draw_axis(draw, axis, bottom, top, bottom - 1, fnt)
    draw.rectangle([left, top, right, bottom], outline=PALETTE["frame"])
    axis_text = f"{axis_label} ({'log' if axis.log else 'linear'} scale)"
    draw.text(((left + right - text_width(axis_text, small)) // 2, bottom + 24), axis_text, fill=PALETTE["muted"],
              font=small)

    # the threshold, under the dots
    tx = round(axis.x(tau))
    draw.line([tx, top - 4, tx, bottom], fill=THRESHOLD_COLOUR, width=3)
    label = f"tau = {_format(tau)}"
    lw = text_width(label, fnt)
    draw.text((min(max(tx - lw // 2, left), right - lw), top - 6 - TEXT_SIZE - 2), label, fill=THRESHOLD_COLOUR,
              font=fnt)

    for i, (g, s, (summary, alarming)) in enumerate(zip(groups, scores, summaries)):
        y0 = top + i * row_h
        cy = y0 + row_h // 2
        draw.text((8, cy - line_h + 1), fit_text(g.label, left - 12, fnt), fill=PALETTE["ink"], font=fnt)
        draw.text((8, cy + 2), fit_text(summary, left - 12, small),
                  fill=WRONG_COLOUR if alarming else PALETTE["muted"], font=small)
        colour = CONCEPT_COLOUR if g.above else RETAIN_COLOUR
        spread = row_h * 0.22
        points = [(axis.x(v), cy + ((j * 0.6180339887) % 1.0 - 0.5) * 2 * spread) for j, v in enumerate(s)]
        wrong = [j for j, v in enumerate(s) if _wrong(v, tau, g.above)]
        for j, (px, py) in enumerate(points):
            if j not in wrong:
                draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour, outline=PALETTE["white"])
        for j in wrong:  # on top, larger, ringed
            px, py = points[j]
            draw.ellipse([px - 6, py - 6, px + 6, py + 6], fill=WRONG_COLOUR, outline=PALETTE["ink"])
        names = [g.prompts[j] for j in wrong[:named]] if g.prompts else []
        if names:
            more = len(wrong) - len(names)
            text = "; ".join(repr(n) for n in names) + (f" (+{more} more)" if more else "")
            text = fit_text(text, right - left - 12, small)
            draw.rectangle([left + 4, y0 + 2, left + 8 + text_width(text, small), y0 + 3 + TEXT_SIZE],
                           fill=PALETTE["white"])
            draw.text((left + 6, y0 + 2), text, fill=WRONG_COLOUR, font=small)
    return np.array(img, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# the per-layer bar chart
# ---------------------------------------------------------------------------------------------

SECTIONS = ("input_blocks", "middle_block", "output_blocks")
_SECTION_TITLES = {"input_blocks": "input blocks (down)", "middle_block": "middle block",
                   "output_blocks": "output blocks (up)", "": "other layers", "pooled": "pooled text input (SDXL)"}
_LAYER_RE = re.compile(r"^(input_blocks|middle_block|output_blocks)((?:\.\d+)+)\.transformer_blocks\.(\d+)\.attn2$")
_KEY_RE = re.compile(r"^(?:diffusion_model\.)?(.+)\.to_([kv])(?:\.weight)?$")


class _Layer(NamedTuple):
    section: str
    block: str
    index: int
    order: tuple
    name: str


def layer_label(name: str) -> tuple[str, str, int]:
    """``(section, block, transformer index)`` of a cross-attention layer name such as
    ``input_blocks.4.1.transformer_blocks.0.attn2`` -> ``("input_blocks", "input_blocks.4.1", 0)``; a name of
    another form is ``("", name, 0)``."""
    m = _LAYER_RE.match(name)
    if not m:
        return "", name, 0
    return m.group(1), m.group(1) + m.group(2), int(m.group(3))


def _layers(changes: Mapping[str, float]) -> tuple[list[_Layer], dict[str, dict[str, float]]]:
    values: dict[str, dict[str, float]] = {}
    for key, value in changes.items():
        m = _KEY_RE.match(str(key))
        if not m:
            raise ValueError(f"layer chart: {key!r} is not a to_k / to_v weight name")
        (v,) = _finite([value], f"layer chart: {key}")
        if v < 0:
            raise ValueError(f"layer chart: {key} is {v}; a relative change is >= 0")
        values.setdefault(m.group(1), {})["to_" + m.group(2)] = v
    layers = []
    for position, name in enumerate(values):
        section, block, index = layer_label(name)
        if section:
            numbers = tuple(int(n) for n in block[len(section) + 1:].split("."))
            order = (SECTIONS.index(section), numbers, index)
        else:
            order = (len(SECTIONS), (position,), 0)
        layers.append(_Layer(section, block, index, order, name))
    layers.sort(key=lambda layer: layer.order)
    return layers, values


def layer_change_chart(changes: Mapping[str, float], pooled: tuple[str, float] | None = None, title: str = "",
                       subtitle: str = "", width: int = 768) -> np.ndarray:
    """The relative weight change of each cross-attention layer as horizontal bars: RGB ``uint8`` ``[H, W, 3]``.

    ``changes`` maps weight names (``[diffusion_model.]<layer>.to_k[.weight]`` / ``.to_v``) to ``||dW|| / ||W||``.
    Each layer is one row with a ``to_k`` and a ``to_v`` bar, rows in UNet order (input blocks by block number,
    the middle block, output blocks) under a heading per part, the rows of one block on one shaded band (SDXL's
    blocks hold 2 or 10 transformer blocks, numbered after the block's name). ``pooled`` = ``(label, change)`` adds
    the pooled text input (SDXL's ``label_emb.0.0``) as its own row. The value axis (linear, from 0) is drawn above
    and below the bars. The height grows with the number of layers (rows stay readable for SDXL's 70).
    """
    if not changes:
        raise ValueError("layer chart: no layer changes to plot")
    if width < 320:
        raise ValueError(f"layer chart: width must be at least 320 pixels, got {width}")
    layers, values = _layers(changes)
    if pooled is not None:
        (pooled_value,) = _finite([pooled[1]], f"layer chart: pooled {pooled[0]}")
        if pooled_value < 0:
            raise ValueError(f"layer chart: pooled {pooled[0]} is {pooled_value}; a relative change is >= 0")
        pooled = (str(pooled[0]), pooled_value)

    fnt, small, bold = font(TEXT_SIZE), font(TEXT_SIZE - 1), font(TEXT_SIZE + 2)
    line_h = TEXT_SIZE + 5
    many = len(layers) > 24
    bar_h = 6 if many else 11
    gap = 0 if many else 2  # between a layer's to_k and to_v bars
    row_h = 2 * bar_h + gap + (4 if many else 8)
    head_h = line_h + 6
    blocks = {}
    for layer in layers:
        blocks.setdefault(layer.block, []).append(layer)
    labels = {layer.name: (layer.block if len(blocks[layer.block]) == 1 else f"{layer.block} / {layer.index}")
              for layer in layers}
    if pooled is not None:
        labels["\0pooled"] = pooled[0]
    left = min(max(text_width(t, fnt) for t in labels.values()) + 28, width // 2)
    right = width - 64  # room for the longest bar's value
    sections = list(dict.fromkeys(layer.section for layer in layers)) + (["pooled"] if pooled is not None else [])

    heading = _heading(title, subtitle, width, small, line_h)
    legend_y = heading.legend_y
    top = legend_y + line_h + 8 + TEXT_SIZE + 10  # legend, then the upper axis' labels
    body = len(sections) * head_h + len(layers) * row_h + (row_h if pooled is not None else 0)
    bottom = top + body + 4
    height = bottom + 44

    img = Image.new("RGB", (width, height), PALETTE["white"])
    draw = ImageDraw.Draw(img)
    _draw_heading(draw, heading, width, bold, small, line_h)
    x = left
    legend = ["to_k", "to_v"] + (["pooled"] if pooled is not None else [])
    for name in legend:
        text = {"to_k": "to_k (keys)", "to_v": "to_v (values)", "pooled": "pooled text input"}[name]
        draw.rectangle([x, legend_y + 3, x + 14, legend_y + 3 + bar_h], fill=SERIES_COLOURS[name])
        draw.text((x + 19, legend_y + 1), text, fill=PALETTE["dark"], font=small)
        x += 19 + text_width(text, small) + 18

    # layout: (y, kind, payload) of each heading and row; the shaded band of each block of several rows
    items: list[tuple[int, str, Any]] = []
    bands: list[tuple[int, int]] = []
    y = top
    shade = False
    for section in sections:
        items.append((y, "head", section))
        y += head_h
        if section == "pooled":
            items.append((y, "pooled", pooled))
            y += row_h
            continue
        for layer in (layer for layer in layers if layer.section == section):
            first = blocks[layer.block][0] is layer
            if first:
                shade = not shade
                if shade and len(blocks[layer.block]) > 1:
                    bands.append((y, y + len(blocks[layer.block]) * row_h - 1))
            items.append((y, "layer", layer))
            y += row_h
    for y0, y1 in bands:
        draw.rectangle([8, y0, right, y1], fill=PALETTE["band"])

    every = [v for row in values.values() for v in row.values()] + ([pooled[1]] if pooled is not None else [])
    axis = _value_axis(every + [0.0], left + 2, right, "linear")
    _draw_axis(draw, axis, top - 2, top, bottom, fnt, up=True)
    _draw_axis(draw, axis, bottom, top, bottom, fnt)
    draw.text(((left + right - text_width("||dW|| / ||W||", small)) // 2, bottom + 24), "||dW|| / ||W||",
              fill=PALETTE["muted"], font=small)
    largest = max(every)

    def bar(y0: int, value: float, colour: tuple[int, int, int]) -> None:
        x1 = round(axis.x(value))
        if value > 0:
            draw.rectangle([axis.x0, y0, max(x1, axis.x0 + 1), y0 + bar_h - 1], fill=colour)
        if not many or value == largest or colour == SERIES_COLOURS["pooled"]:
            draw.text((x1 + 4, y0 + bar_h // 2 - TEXT_SIZE // 2 - 1), f"{value:.3g}", fill=PALETTE["muted"],
                      font=small)

    label_font = small if many else fnt

    def row_label(y0: int, text: str) -> None:
        draw.text((18, y0 + row_h // 2 - TEXT_SIZE // 2 - 2), fit_text(text, left - 22, label_font),
                  fill=PALETTE["ink"], font=label_font)

    for y0, kind, payload in items:
        if kind == "head":
            draw.text((8, y0 + 4), _SECTION_TITLES[payload], fill=PALETTE["ink"], font=bold)
            draw.line([8, y0 + head_h - 2, right, y0 + head_h - 2], fill=PALETTE["frame"])
        elif kind == "pooled":
            row_label(y0, payload[0])
            bar(y0 + (row_h - bar_h) // 2, payload[1], SERIES_COLOURS["pooled"])
        else:
            row_label(y0, labels[payload.name])
            row = values[payload.name]
            pad = (row_h - 2 * bar_h - gap) // 2
            for j, proj in enumerate(("to_k", "to_v")):
                if proj in row:
                    bar(y0 + pad + j * (bar_h + gap), row[proj], SERIES_COLOURS[proj])
    return np.array(img, dtype=np.uint8)
