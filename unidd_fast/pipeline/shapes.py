"""Shapes: a small RGB dataset generated in-process (nothing shipped, nothing downloaded).

Ten classes of outline: disc, ring, square, square frame, triangle, diamond, plus, cross,
five-pointed star, bar pair. Everything else varies at random and carries no class
information: the shape's colour, texture (flat, stripes at any angle, checks), size,
position and a small rotation; the background's two-colour gradient and its own texture.
A teacher must therefore read the outline, which makes the dataset a CPU-sized stand-in
for natural images where colour, texture, position and background vary (the digits are
grey, centred and clean).

Every image is drawn at 4× the side with PIL and box-filtered down (antialiased edges).
The result is a pure function of (count, side, seed).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("disc", "ring", "square", "frame", "triangle", "diamond", "plus", "cross", "star", "bars")
SUPERSAMPLE = 4


def _polygon(sides_or_points, centre, radius, angle) -> list[tuple[float, float]]:
    """Vertices of points (unit-radius polar (r, θ) pairs) scaled, rotated, moved."""
    cx, cy = centre
    return [(cx + radius * r * math.cos(t + angle), cy + radius * r * math.sin(t + angle)) for r, t in sides_or_points]


def _regular(n: int, start: float, ratio: float = 1.0) -> list[tuple[float, float]]:
    """n vertices on the unit circle; with ratio < 1, 2n vertices alternating radius 1 and ratio (a star)."""
    if ratio == 1.0:
        return [(1.0, start + 2 * math.pi * k / n) for k in range(n)]
    return [((1.0, ratio)[k % 2], start + math.pi * k / n) for k in range(2 * n)]


def _rotated_rect(centre, half_w, half_h, angle) -> list[tuple[float, float]]:
    cx, cy = centre
    c, s = math.cos(angle), math.sin(angle)
    corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def _draw_mask(label: int, side: int, rng: np.random.Generator) -> Image.Image:
    """The class's outline as an 8-bit mask (side × side), at a random size, place and tilt."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    radius = side * rng.uniform(0.22, 0.36)
    margin = radius * 1.05
    centre = (rng.uniform(margin, side - margin), rng.uniform(margin, side - margin))
    angle = rng.uniform(-0.26, 0.26)  # ±15°: plus/cross and square/diamond stay apart
    cx, cy = centre
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    thick = radius * 0.38
    name = CLASSES[label]
    if name == "disc":
        draw.ellipse(box, fill=255)
    elif name == "ring":
        draw.ellipse(box, fill=255)
        inner = radius - thick
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif name in ("square", "frame"):
        half = radius * 0.8
        draw.polygon(_rotated_rect(centre, half, half, angle), fill=255)
        if name == "frame":
            draw.polygon(_rotated_rect(centre, half - thick, half - thick, angle), fill=0)
    elif name == "triangle":
        draw.polygon(_polygon(_regular(3, -math.pi / 2), centre, radius, angle), fill=255)
    elif name == "diamond":
        draw.polygon(_polygon([(1.0, 0), (0.7, math.pi / 2), (1.0, math.pi), (0.7, 3 * math.pi / 2)],
                              centre, radius, angle), fill=255)
    elif name in ("plus", "cross"):
        tilt = angle + (math.pi / 4 if name == "cross" else 0.0)
        draw.polygon(_rotated_rect(centre, radius, thick / 2, tilt), fill=255)
        draw.polygon(_rotated_rect(centre, thick / 2, radius, tilt), fill=255)
    elif name == "star":
        draw.polygon(_polygon(_regular(5, -math.pi / 2, 0.42), centre, radius, angle), fill=255)
    else:  # bars: two parallel bars
        gap = radius * 0.5
        for sign in (-1, 1):
            offset = (sign * gap * math.cos(angle), sign * gap * math.sin(angle))
            draw.polygon(_rotated_rect((cx + offset[0], cy + offset[1]), thick / 2, radius, angle), fill=255)
    return mask


def _texture(side: int, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(side, side, 3) float in [0, 1]: ``colour`` flat, striped at a random angle, or checked."""
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(colour, (side, side, 3)).copy()
    other = rng.uniform(0, 1, 3)
    mix = rng.uniform(0.3, 0.7)
    second = (1 - mix) * colour + mix * other
    yy, xx = np.mgrid[0:side, 0:side] / SUPERSAMPLE
    period = rng.uniform(2.5, 5.0)
    if kind == 1:
        theta = rng.uniform(0, math.pi)
        wave = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period) > 0
    else:
        wave = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
    return np.where(wave[..., None], colour, second)


def _background(side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side, 3) float: a gradient between two random colours at a random angle, times a
    random texture, plus a little pixel noise."""
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1)
    ramp = np.clip(0.5 + (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta), 0, 1)[..., None]
    base = (1 - ramp) * a + ramp * b
    strength = rng.uniform(0.0, 0.35)
    pattern = _texture(side, np.ones(3), rng).mean(-1, keepdims=True)
    return np.clip(base * (1 - strength + strength * pattern), 0, 1)


def _foreground_colour(background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour at least 0.35 (RGB Euclidean) from the background's mean colour."""
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(100):
        colour = rng.uniform(0, 1, 3)
        if np.linalg.norm(colour - mean) >= 0.35:
            return colour
    return 1.0 - mean


def render(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class ``label``: uint8 (size, size, 3)."""
    side = size * SUPERSAMPLE
    background = _background(side, rng)
    foreground = _texture(side, _foreground_colour(background, rng), rng)
    alpha = np.asarray(_draw_mask(label, side, rng), dtype=np.float64)[..., None] / 255
    image = (1 - alpha) * background + alpha * foreground
    image = image + rng.normal(0, 0.02, image.shape)
    big = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(big.resize((size, size), Image.Resampling.BOX))


def generate(per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (10·per_class, 3, size, size), labels int64 (10·per_class,)), class-interleaved;
    a pure function of its arguments."""
    if per_class < 1 or size < 8:
        raise ValueError(f"shapes needs per_class >= 1 and size >= 8, got {per_class} and {size}")
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(len(CLASSES)), per_class)
    images = np.stack([render(int(c), size, rng) for c in labels])
    return images.transpose(0, 3, 1, 2).copy(), labels.astype(np.int64)
