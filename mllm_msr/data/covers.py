"""Cover images for the synthetic benchmark: visual attributes drawn with PIL, plus their captions.

The visual attributes (colour, shape, pattern) are never written into titles, so a model only
learns them from pixels. The same renderer makes the alignment stage's image→caption pairs.
"""
from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "purple": (140, 50, 190),
    "brown": (120, 75, 35),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted")
VISUAL_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "pattern": PATTERNS,
}


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.9), (cx - r, cy + r * 0.9)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


def draw_cover(colour: str, shape: str, pattern: str, *, size: int = 128,
               rng: random.Random | None = None) -> Image.Image:
    """A cover: one large shape in ``colour`` with ``pattern`` on a light, jittered background.

    Small random jitter (position, size, background tint) keeps covers of the same attributes
    distinct, so models must learn the attributes rather than memorise pixels.
    """
    if colour not in COLOURS or shape not in SHAPES or pattern not in PATTERNS:
        raise ValueError(f"unknown visual attributes {(colour, shape, pattern)}")
    rng = rng or random.Random(0)
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    rgb = COLOURS[colour]
    r = size * rng.uniform(0.30, 0.38)
    cx = size / 2 + rng.uniform(-0.06, 0.06) * size
    cy = size / 2 + rng.uniform(-0.06, 0.06) * size

    # Draw the filled shape into a mask, then paint the pattern through it.
    mask = Image.new("L", (size, size), 0)
    mdraw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        mdraw.ellipse(box, fill=255)
    elif shape == "ring":
        mdraw.ellipse(box, fill=255)
        inner = r * 0.55
        mdraw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        mdraw.polygon(_shape_polygon(shape, cx, cy, r), fill=255)

    fill = Image.new("RGB", (size, size), rgb)
    if pattern != "solid":
        light = tuple(min(255, c + (255 - c) * 3 // 4) for c in rgb)
        pdraw = ImageDraw.Draw(fill)
        step = max(6, size // 12)
        if pattern == "striped":
            for x in range(-size, 2 * size, step):
                pdraw.line([(x, 0), (x + size, size)], fill=light, width=max(2, step // 3))
        else:  # dotted
            d = max(2, step // 4)
            for y in range(step // 2, size, step):
                for x in range(step // 2, size, step):
                    pdraw.ellipse((x - d, y - d, x + d, y + d), fill=light)
    img.paste(fill, (0, 0), mask)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(200, 200, 200))
    return img


def caption(colour: str, shape: str, pattern: str) -> str:
    """The ground-truth caption the alignment stage trains on (one fixed phrasing per attribute set)."""
    pat = {"solid": "solid", "striped": "striped", "dotted": "dotted"}[pattern]
    return f"A {pat} {colour} {shape} on a light background."


def parse_caption(text: str) -> dict[str, str | None]:
    """Read the visual attributes a model's caption mentions (first match per attribute)."""
    low = text.lower()
    out: dict[str, str | None] = {}
    for attr, values in VISUAL_ATTRIBUTES.items():
        hits = [(low.find(v), v) for v in values if v in low]
        out[attr] = min(hits)[1] if hits else None
    return out
