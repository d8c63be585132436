"""Procedural MiniCanvas images: objects x styles at 32x32 RGB, deterministic from a seed.

A *style* is a pair of two-colour palettes (object, background) plus a texture that is
painted on both the object and the background; the object keeps its own palette so it
stands out. Objects are drawn with a random position, scale and rotation. Nothing is
stored on disk: the same seed always reproduces the same arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
"""Side of every MiniCanvas image, in pixels."""

OBJECTS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent")
"""Object names, in label order."""

STYLES: tuple[str, ...] = ("striped", "dotted", "checkered", "neon", "pastel", "sunset", "ocean", "mono")
"""Style names, in label order."""

_SUPERSAMPLE = 4  # masks are drawn at 4x and box-filtered down (anti-aliasing)

MAX_JITTER = 2.5
"""Largest offset of the object centre from the image centre, in pixels (per axis)."""


@dataclass(frozen=True)
class StyleSpec:
    """How one style paints an image."""

    texture: str
    """Texture kind: stripes, dots, checker, glow, blobs, gradient, waves, noise."""
    object_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    """The two colours the texture mixes on the object."""
    background_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    """The two colours the texture mixes on the background."""


STYLE_SPECS: dict[str, StyleSpec] = {
    "striped": StyleSpec("stripes", ((230, 40, 40), (250, 250, 250)), ((20, 100, 60), (140, 210, 130))),
    "dotted": StyleSpec("dots", ((255, 215, 0), (40, 20, 20)), ((100, 40, 150), (200, 160, 240))),
    "checkered": StyleSpec("checker", ((250, 250, 250), (20, 20, 20)), ((200, 40, 120), (250, 170, 200))),
    "neon": StyleSpec("glow", ((255, 0, 255), (0, 255, 255)), ((5, 5, 15), (30, 10, 45))),
    "pastel": StyleSpec("blobs", ((245, 140, 185), (250, 200, 120)), ((175, 230, 205), (200, 210, 250))),
    "sunset": StyleSpec("gradient", ((60, 10, 45), (130, 20, 40)), ((255, 205, 60), (240, 90, 55))),
    "ocean": StyleSpec("waves", ((240, 250, 255), (110, 230, 230)), ((10, 40, 120), (45, 115, 205))),
    "mono": StyleSpec("noise", ((195, 195, 195), (245, 245, 245)), ((35, 35, 35), (95, 95, 95))),
}


def styled_prompt(obj: str, style: str) -> str:
    """``"an image of a {obj} in {style} style"``."""
    return f"an image of a {obj} in {style} style"


def unstyled_prompt(obj: str) -> str:
    """``"an image of a {obj}"`` (the style is left open)."""
    return f"an image of a {obj}"


def prompt_for(object_idx: int, style_idx: int | None) -> str:
    """Prompt for label indices; ``style_idx`` None or negative gives the unstyled prompt."""
    if style_idx is None or style_idx < 0:
        return unstyled_prompt(OBJECTS[object_idx])
    return styled_prompt(OBJECTS[object_idx], STYLES[style_idx])


def _object_points(name: str, rot: float, n_curve: int = 48) -> list[np.ndarray]:
    """Polygons (unit radius, centred at 0, y down) that are filled, then holes, per object.

    Returns a list whose first item is the outline to fill; a second item (ring, crescent)
    is cut out of the first.
    """

    def circle(r: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
        a = np.linspace(0, 2 * np.pi, n_curve, endpoint=False)
        return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)

    if name == "circle":
        polys = [circle(0.95)]
    elif name == "square":
        s = 0.78
        polys = [np.array([[-s, -s], [s, -s], [s, s], [-s, s]])]
    elif name == "triangle":
        a = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        polys = [np.stack([1.1 * np.cos(a), 1.1 * np.sin(a) + 0.12], 1)]
    elif name == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
        polys = [np.stack([r * np.cos(a), r * np.sin(a)], 1)]
    elif name == "cross":
        w, L = 0.32, 1.0
        polys = [np.array([[-w, -L], [w, -L], [w, -w], [L, -w], [L, w], [w, w], [w, L], [-w, L],
                           [-w, w], [-L, w], [-L, -w], [-w, -w]])]
    elif name == "ring":
        polys = [circle(1.0), circle(0.55)]
    elif name == "heart":
        t = np.linspace(0, 2 * np.pi, n_curve, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        polys = [np.stack([x, y + 2.5], 1) / 16.0]
    elif name == "crescent":
        polys = [circle(1.0), circle(0.85, 0.5, -0.1)]
    else:
        raise ValueError(f"unknown object {name!r}; expected one of {OBJECTS}")
    c, s = math.cos(rot), math.sin(rot)
    rmat = np.array([[c, -s], [s, c]])
    return [p @ rmat.T for p in polys]


def object_mask(name: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage mask in [0, 1], shape [size, size], with random pose."""
    radius = rng.uniform(0.27, 0.36) * size
    rot = rng.uniform(-25.0, 25.0) * math.pi / 180.0
    jitter = min(MAX_JITTER, max(size / 2 - radius - 1.0, 0.0))
    cx = size / 2 + rng.uniform(-1, 1) * jitter
    cy = size / 2 + rng.uniform(-1, 1) * jitter
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    polys = _object_points(name, rot)
    for i, poly in enumerate(polys):
        pts = [(float((cx + radius * x) * ss), float((cy + radius * y) * ss)) for x, y in poly]
        draw.polygon(pts, fill=255 if i == 0 else 0)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def texture_field(kind: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Mixing field in [0, 1] ([size, size]) for one texture, with a random phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "stripes":
        ang = math.radians(45.0 + rng.uniform(-10, 10))
        period = rng.uniform(5.5, 6.5)
        u = xx * math.cos(ang) + yy * math.sin(ang)
        f = np.clip(0.5 + 2.0 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)), 0, 1)
    elif kind == "dots":
        period = 6.0
        ox, oy = rng.uniform(0, period, 2)
        dx = (xx - ox) % period - period / 2
        dy = (yy - oy) % period - period / 2
        f = np.clip(2.0 - np.sqrt(dx * dx + dy * dy), 0, 1)
    elif kind == "checker":
        cell = 4
        ox, oy = rng.integers(0, 2 * cell, 2)
        f = (((xx + ox) // cell + (yy + oy) // cell) % 2).astype(np.float32)
    elif kind == "glow":
        ang = rng.uniform(0, 2 * np.pi)
        u = (xx - size / 2) * math.cos(ang) + (yy - size / 2) * math.sin(ang)
        f = np.clip(0.5 + u / size, 0, 1)
    elif kind == "blobs":
        f = np.zeros_like(xx)
        for _ in range(3):
            kx, ky = rng.uniform(-1, 1, 2) * 2 * np.pi / 14
            f += np.sin(kx * xx + ky * yy + rng.uniform(0, 2 * np.pi))
        f = np.clip(0.5 + f / 4.0, 0, 1)
    elif kind == "gradient":
        f = np.clip(yy / (size - 1) + rng.uniform(-0.1, 0.1), 0, 1)
    elif kind == "waves":
        ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
        f = 0.5 + 0.5 * np.sin(2 * np.pi * yy / 7.0 + 1.5 * np.sin(2 * np.pi * xx / 12.0 + ph1) + ph2)
    elif kind == "noise":
        f = rng.uniform(0, 1, (size, size)).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return f.astype(np.float32)


def _paint(field: np.ndarray, colors: tuple[tuple[int, int, int], tuple[int, int, int]]) -> np.ndarray:
    c0 = np.asarray(colors[0], np.float32)
    c1 = np.asarray(colors[1], np.float32)
    return c0 + field[..., None] * (c1 - c0)


def render(object_idx: int, style_idx: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image, uint8 [size, size, 3], of ``OBJECTS[object_idx]`` in ``STYLES[style_idx]``."""
    if not 0 <= object_idx < len(OBJECTS):
        raise ValueError(f"object_idx must be in [0, {len(OBJECTS)}), got {object_idx}")
    if not 0 <= style_idx < len(STYLES):
        raise ValueError(f"style_idx must be in [0, {len(STYLES)}), got {style_idx}")
    spec = STYLE_SPECS[STYLES[style_idx]]
    mask = object_mask(OBJECTS[object_idx], rng, size)[..., None]
    fg = _paint(texture_field(spec.texture, rng, size), spec.object_colors)
    bg = _paint(texture_field(spec.texture, rng, size), spec.background_colors)
    img = mask * fg + (1.0 - mask) * bg
    img = img * rng.uniform(0.92, 1.08) + rng.normal(0.0, 3.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass
class CanvasData:
    """A batch of procedural images with their labels."""

    images: np.ndarray
    """uint8 [N, 32, 32, 3]."""
    objects: np.ndarray
    """int64 [N] object labels (index into OBJECTS)."""
    styles: np.ndarray
    """int64 [N] style labels (index into STYLES)."""

    def __len__(self) -> int:
        return int(self.images.shape[0])


def make_dataset(per_combo: int, seed: int, size: int = IMAGE_SIZE) -> CanvasData:
    """``per_combo`` images of every (object, style) pair, deterministic from ``seed``.

    Rows are ordered object-major, then style, then repeat; shuffle downstream if needed.
    """
    if per_combo < 1:
        raise ValueError(f"per_combo must be >= 1, got {per_combo}")
    rng = np.random.default_rng(seed)
    n = len(OBJECTS) * len(STYLES) * per_combo
    images = np.empty((n, size, size, 3), np.uint8)
    objects = np.empty(n, np.int64)
    styles = np.empty(n, np.int64)
    i = 0
    for o in range(len(OBJECTS)):
        for s in range(len(STYLES)):
            for _ in range(per_combo):
                images[i] = render(o, s, rng, size)
                objects[i], styles[i] = o, s
                i += 1
    return CanvasData(images, objects, styles)


def to_tensor_range(images: np.ndarray):
    """uint8 [N, H, W, 3] -> float32 torch tensor [N, 3, H, W] in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
