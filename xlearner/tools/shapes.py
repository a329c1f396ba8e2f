"""The demo world's drawing primitives: shapes, colours and background patterns.

tools/demo.py composes these into images of its sources (docs/DESIGN.md §6
formats); this module only draws. Every random choice comes from the numpy
Generator the caller passes in, so an image is a pure function of its seed.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

UPSTREAM = ("circle", "cross", "diamond", "hexagon", "ring", "square", "star", "triangle")
NOVEL = ("arrow", "crescent", "heart", "pentagon")
PATTERNS = ("checker", "flat", "gradient", "noise", "stripes")
# Saturated colours; backgrounds are near-grey, so objects always stand out.
COLORS = {"blue": (40, 80, 225), "cyan": (30, 200, 210), "green": (40, 185, 60),
          "magenta": (215, 45, 200), "red": (225, 40, 40), "yellow": (235, 210, 30)}
COLOR_NAMES = tuple(COLORS)
SS = 4  # supersampling: draw at 4x, then a box filter gives each pixel its coverage


# ----------------------------------------------------------------------------
# shapes: each is a list of (polygon in unit coordinates, fill); fill 0 cuts a hole

def _ngon(n: int, r: float = 1.0, phase: float = -math.pi / 2, c=(0.0, 0.0)) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], 1)


def _star() -> np.ndarray:
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    t = -math.pi / 2 + math.pi * np.arange(10) / 5
    return np.stack([radii * np.cos(t), radii * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], 1)  # roughly centred; normalised below


def _build_shapes() -> dict[str, list[tuple[np.ndarray, int]]]:
    w = 0.34
    cross = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
             (-w, w), (-1, w), (-1, -w), (-w, -w)]
    arrow = [(-1, -0.28), (0.15, -0.28), (0.15, -0.72), (1, 0), (0.15, 0.72), (0.15, 0.28), (-1, 0.28)]
    raw = {
        "circle": [(_ngon(48), 255)],
        "cross": [(np.array(cross, float), 255)],
        "diamond": [(np.array([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], float), 255)],
        "hexagon": [(_ngon(6), 255)],
        "ring": [(_ngon(48), 255), (_ngon(48, 0.55), 0)],
        "square": [(_ngon(4, phase=math.pi / 4), 255)],
        "star": [(_star(), 255)],
        "triangle": [(_ngon(3), 255)],
        "arrow": [(np.array(arrow, float), 255)],
        "crescent": [(_ngon(48), 255), (_ngon(48, 0.8, c=(0.42, -0.1)), 0)],
        "heart": [(_heart(), 255)],
        "pentagon": [(_ngon(5), 255)],
    }
    # Normalise every shape to circumradius 1, so `radius` means the same for all.
    out = {}
    for name, parts in raw.items():
        scale = max(np.linalg.norm(p, axis=1).max() for p, fill in parts if fill)
        out[name] = [(p / scale, fill) for p, fill in parts]
    return out


SHAPES = _build_shapes()


def rasterise(shape: str, cx: float, cy: float, r: float, angle: float, width: int, height: int):
    """Antialiased coverage in [0, 1] of one shape, on its bounding box only (cheap)."""
    x0, y0 = max(0, int(cx - r) - 1), max(0, int(cy - r) - 1)
    x1, y1 = min(width, int(math.ceil(cx + r)) + 1), min(height, int(math.ceil(cy + r)) + 1)
    canvas = Image.new("L", ((x1 - x0) * SS, (y1 - y0) * SS), 0)
    draw = ImageDraw.Draw(canvas)
    c, s = math.cos(angle), math.sin(angle)
    for pts, fill in SHAPES[shape]:
        xs = (pts[:, 0] * c - pts[:, 1] * s) * r + cx - x0
        ys = (pts[:, 0] * s + pts[:, 1] * c) * r + cy - y0
        draw.polygon([(float(x) * SS, float(y) * SS) for x, y in zip(xs, ys)], fill=fill)
    small = canvas.resize((x1 - x0, y1 - y0), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0, (slice(y0, y1), slice(x0, x1))


def background(rng: np.random.Generator, pattern: str, width: int, height: int) -> np.ndarray:
    """A near-grey HxWx3 float background; two tones at least 45 levels apart."""
    lum = rng.uniform(50, 205)
    base = lum + rng.uniform(-10, 10, 3)  # a slight tint, never a saturated colour
    other = base + (-1 if lum > 128 else 1) * rng.uniform(45, 80)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    proj = xx * math.cos(theta) + yy * math.sin(theta)
    k = min(width, height) / 64  # pattern scale follows the image size
    if pattern == "flat":
        t = np.zeros_like(xx)
    elif pattern == "gradient":
        t = (proj - proj.min()) / (proj.max() - proj.min())
    elif pattern == "noise":
        t = np.clip(rng.normal(0.5, 0.3, (height, width)), 0, 1).astype(np.float32)
    elif pattern == "stripes":
        t = ((proj / rng.uniform(6 * k, 14 * k)) % 1.0 < 0.5).astype(np.float32)
    elif pattern == "checker":
        cell = rng.uniform(5 * k, 12 * k)
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown background pattern {pattern!r}")
    img = base[None, None, :] * (1 - t[..., None]) + other[None, None, :] * t[..., None]
    return np.clip(img, 0, 255).astype(np.float32)


def paint(rng: np.random.Generator, rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    """The colour layer of one object: solid, or with stripes or dots inside."""
    layer = np.empty((h, w, 3), np.float32)
    layer[:] = rgb
    texture = rng.choice(["solid", "solid", "stripes", "dots"])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if texture == "stripes":
        theta, period = rng.uniform(0, math.pi), rng.uniform(3, 6)
        band = ((xx * math.cos(theta) + yy * math.sin(theta)) / period) % 1.0 < 0.5
        layer[band] *= 0.55
    elif texture == "dots":
        sp = rng.uniform(4, 7)
        dot = np.hypot(xx % sp - sp / 2, yy % sp - sp / 2) < sp * 0.25
        layer[dot] = layer[dot] * 0.4 + 255 * 0.6
    return layer
