"""Cover images for the synthetic benchmark: visual attributes drawn with PIL, plus their captions.

The visual attributes (colour, shape, pattern) are never written into titles, so a model only
learns them from pixels. The same renderer makes the alignment stage's image→caption pairs.

A :class:`Catalog` holds one benchmark vocabulary, written once: colour names with their RGB,
shapes, patterns (textures), genres, the words and templates titles are made of, the cover style
and the caption phrasing. Two are registered (:data:`CATALOGS`): ``"default"`` (the benchmark's
original vocabulary and pixels, also the module constants :data:`COLOURS`, :data:`SHAPES`,
:data:`PATTERNS`) and ``"alt"``, a disjoint vocabulary drawn in another style (a dark framed poster
with a smaller, off-centre shape), to check that the method is not tuned to one catalog.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product
from typing import Literal, get_args

from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
CatalogName = Literal["default", "alt"]
CoverStyle = Literal["light", "poster"]


@dataclass(frozen=True, eq=False)
class Catalog:
    """One vocabulary of the synthetic benchmark (attribute values, title words, cover style)."""

    name: str
    colours: Mapping[str, RGB]  # colour name → fill RGB
    shapes: tuple[str, ...]
    patterns: tuple[str, ...]  # textures painted through the shape
    genres: tuple[str, ...]  # written in titles (the textual attribute)
    adjectives: tuple[str, ...]  # title words (dropped when they contain a visual word: see title_words)
    nouns: tuple[str, ...]
    templates: tuple[str, ...]  # title templates: {adj} {adj2} {noun} {noun2} {genre}
    style: CoverStyle  # "light": one large centred shape on a light background; "poster": see draw_cover
    caption_template: str  # {pattern} {colour} {shape}

    def __post_init__(self) -> None:
        values = [*self.colours, *self.shapes, *self.patterns, *self.genres]
        if len(set(values)) != len(values):
            raise ValueError(f"catalog {self.name!r}: an attribute value occurs twice")
        scaffold = self.caption_template.format(pattern="", colour="", shape="").lower()
        for v in self.visual_words:
            others = [w for w in self.visual_words if w != v]
            if any(v in w for w in others) or v in scaffold:  # parse_caption matches substrings
                raise ValueError(f"catalog {self.name!r}: {v!r} is part of another caption word")
            if any(v in t.lower() for t in self.templates):
                raise ValueError(f"catalog {self.name!r}: a title template names {v!r}")

    @property
    def attributes(self) -> dict[str, tuple[str, ...]]:
        """The visual attributes (colour, shape, pattern) and their values."""
        return {"colour": tuple(self.colours), "shape": self.shapes, "pattern": self.patterns}

    @property
    def visual_words(self) -> tuple[str, ...]:
        return tuple(w for values in self.attributes.values() for w in values)

    def title_words(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(adjectives, nouns) without any word that contains a visual word, even as a substring."""
        def clean(words: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(w for w in words if not any(b in w.lower() for b in self.visual_words))
        return clean(self.adjectives), clean(self.nouns)

    def combinations(self) -> list[tuple[str, str, str]]:
        """Every (colour, shape, pattern), colours outermost."""
        return list(product(self.colours, self.shapes, self.patterns))

    def cycle(self, k: int) -> tuple[str, str, str]:
        """The k-th (colour, shape, pattern) of a simple cycle through each attribute's values."""
        colours = tuple(self.colours)
        return colours[k % len(colours)], self.shapes[k % len(self.shapes)], self.patterns[k % len(self.patterns)]


DEFAULT_CATALOG = Catalog(
    name="default",
    colours={
        "red": (220, 30, 30),
        "orange": (245, 140, 20),
        "yellow": (235, 215, 30),
        "green": (40, 170, 60),
        "blue": (30, 80, 220),
        "purple": (140, 50, 190),
        "brown": (120, 75, 35),
        "black": (20, 20, 20),
    },
    shapes=("circle", "square", "triangle", "star", "ring"),
    patterns=("solid", "striped", "dotted"),
    genres=("mystery", "romance", "comedy", "horror", "sci-fi", "fantasy", "documentary", "western"),
    adjectives=(
        "Silent", "Hidden", "Lost", "Broken", "Distant", "Frozen", "Quiet", "Wild", "Ancient",
        "Secret", "Fading", "Restless", "Gentle", "Crooked", "Hollow", "Burning", "Endless",
        "Forgotten", "Lonely", "Midnight", "Northern", "Velvet", "Iron", "Paper", "Glass", "Stone",
        "Winter", "Summer", "Autumn", "Electric", "Sleeping", "Wandering", "Last", "First", "Little",
        "Grand", "Bitter", "Sweet", "Savage", "Hungry",
    ),
    nouns=(
        "Harbor", "Garden", "Mountain", "River", "Letter", "Kingdom", "Machine", "Journey", "Island",
        "Bridge", "Forest", "Tower", "Valley", "Lantern", "Mirror", "Orchard", "Canyon", "Voyage",
        "Engine", "Castle", "Meadow", "Desert", "Village", "Lighthouse", "Compass", "Shadow",
        "Promise", "Secret", "Horizon", "Harvest", "Frontier", "Archive", "Planet", "Ocean", "Cabin",
        "Carnival", "Whisper", "Railway", "Empire", "Labyrinth",
    ),
    templates=(
        "The {adj} {noun}: a {genre} tale",
        "{adj} {noun}, a {genre} story",
        "The {noun} of {adj2} Days ({genre})",
        "{adj} {noun} - {genre}",
        "A {genre} film: The {adj} {noun}",
        "{noun} and the {adj} {noun2}: {genre}",
    ),
    style="light",
    caption_template="A {pattern} {colour} {shape} on a light background.",
)

ALT_CATALOG = Catalog(
    name="alt",
    colours={
        "teal": (0, 150, 145),
        "magenta": (225, 40, 175),
        "olive": (125, 130, 20),
        "navy": (35, 45, 150),
        "pink": (250, 165, 195),
        "grey": (150, 150, 150),
        "gold": (230, 180, 40),
        "maroon": (135, 20, 45),
    },
    shapes=("hexagon", "diamond", "cross", "heart", "crescent"),
    patterns=("checkerboard", "wavy", "gridded"),
    genres=("thriller", "drama", "musical", "animation", "war", "biography", "adventure", "crime"),
    adjectives=(
        "Gallant", "Final", "Open", "Narrow", "Rising", "Falling", "Early", "Late", "Brave", "Cold",
        "Bright", "Deep", "Empty", "Fragile", "Honest", "Humble", "Lucky", "Modern", "Noble", "Pale",
        "Proud", "Rapid", "Rough", "Solemn", "Shallow", "Sharp", "Simple", "Steady", "Strange",
        "Tender", "Urban", "Vast", "Weary", "Young", "Hopeful", "Patient", "Twelfth", "Coastal",
        "Eastern", "Soft",
    ),
    nouns=(
        "Station", "Street", "Window", "Cellar", "Market", "Factory", "Theatre", "Library",
        "Museum", "Hotel", "Plaza", "Avenue", "Season", "Crown", "Anthem", "Signal", "Border",
        "Chapter", "Witness", "Verdict", "Alibi", "Stranger", "Captain", "Soldier", "Dancer",
        "Painter", "Student", "Neighbour", "Daughter", "Father", "Sister", "Orphan", "Detective",
        "Summit", "Coast", "Quarry", "Airport", "Pilot", "Ballad", "Melody",
    ),
    templates=(
        "{adj} {noun} ({genre})",
        "{genre}: The {adj} {noun}",
        "The {noun} and the {noun2}, {genre}",
        "{adj} {noun}: {genre} picture",
        "Tales of the {adj2} {noun}, {genre}",
        "The {adj} {noun} | {genre}",
    ),
    style="poster",
    caption_template="A {pattern} {colour} {shape} on a dark poster.",
)

CATALOGS: dict[str, Catalog] = {c.name: c for c in (DEFAULT_CATALOG, ALT_CATALOG)}
assert set(CATALOGS) == set(get_args(CatalogName))


def get_catalog(name: str) -> Catalog:
    """The registered catalog called ``name`` ("default" or "alt")."""
    try:
        return CATALOGS[name]
    except KeyError:
        raise ValueError(f"unknown catalog {name!r}; one of {sorted(CATALOGS)}") from None


# The default catalog's vocabulary (the benchmark's original constants).
COLOURS: Mapping[str, RGB] = DEFAULT_CATALOG.colours
SHAPES: tuple[str, ...] = DEFAULT_CATALOG.shapes
PATTERNS: tuple[str, ...] = DEFAULT_CATALOG.patterns
VISUAL_ATTRIBUTES: dict[str, tuple[str, ...]] = DEFAULT_CATALOG.attributes


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
    if shape == "hexagon":
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "cross":
        w = r * 0.34
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "heart":  # the classic parametric heart, scaled to radius r
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 17, cy - r * (y + 2.5) / 17))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


def _paint_shape(mdraw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    """The filled shape (255) on a mask."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape in ("circle", "ring", "crescent"):
        mdraw.ellipse(box, fill=255)
        if shape == "ring":
            inner = r * 0.55
            mdraw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
        elif shape == "crescent":
            ox, cut = cx + r * 0.45, r * 0.85
            mdraw.ellipse((ox - cut, cy - cut, ox + cut, cy + cut), fill=0)
    else:
        mdraw.polygon(_shape_polygon(shape, cx, cy, r), fill=255)


def _paint_pattern(fill: Image.Image, pattern: str, rgb: RGB, size: int) -> None:
    """The pattern in a light tint of ``rgb`` over the whole ``fill`` image ("solid": nothing)."""
    if pattern == "solid":
        return
    light = tuple(min(255, c + (255 - c) * 3 // 4) for c in rgb)
    pdraw = ImageDraw.Draw(fill)
    step = max(6, size // 12)
    if pattern == "striped":
        for x in range(-size, 2 * size, step):
            pdraw.line([(x, 0), (x + size, size)], fill=light, width=max(2, step // 3))
    elif pattern == "dotted":
        d = max(2, step // 4)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                pdraw.ellipse((x - d, y - d, x + d, y + d), fill=light)
    elif pattern == "checkerboard":
        cell = max(3, step // 2)
        for y in range(0, size, cell):
            for x in range((y // cell) % 2 * cell, size, 2 * cell):
                pdraw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=light)
    elif pattern == "wavy":
        amp, period = max(1.5, step / 4), max(8.0, step * 1.5)
        for y0 in range(step // 2, size + step, step):
            pts = [(x, y0 + amp * math.sin(2 * math.pi * x / period)) for x in range(size + 1)]
            pdraw.line(pts, fill=light, width=max(2, step // 4))
    elif pattern == "gridded":
        for v in range(step // 2, size, step):
            pdraw.line([(v, 0), (v, size)], fill=light, width=1)
            pdraw.line([(0, v), (size, v)], fill=light, width=1)
    else:
        raise ValueError(f"no drawing for pattern {pattern!r}")


def draw_cover(colour: str, shape: str, pattern: str, *, size: int = 128,
               rng: random.Random | None = None, catalog: Catalog = DEFAULT_CATALOG) -> Image.Image:
    """A cover of ``catalog``'s style: one shape in ``colour`` with ``pattern``.

    * "light" (default catalog): a large shape near the centre on a light, jittered background;
    * "poster" (alt catalog): a dark jittered background inside a thin light frame, a darker band
      at the bottom (a title strip, no text), and a smaller shape off-centre above it.

    Small random jitter (position, size, background tint) keeps covers of the same attributes
    distinct, so models must learn the attributes rather than memorise pixels.
    """
    if colour not in catalog.colours or shape not in catalog.shapes or pattern not in catalog.patterns:
        raise ValueError(f"unknown visual attributes {(colour, shape, pattern)} for catalog {catalog.name!r}")
    rng = rng or random.Random(0)
    if catalog.style == "light":
        bg = tuple(rng.randint(225, 250) for _ in range(3))
        r = size * rng.uniform(0.30, 0.38)
        cx = size / 2 + rng.uniform(-0.06, 0.06) * size
        cy = size / 2 + rng.uniform(-0.06, 0.06) * size
    else:
        bg = tuple(rng.randint(28, 52) for _ in range(3))
        r = size * rng.uniform(0.20, 0.26)
        cx = size * rng.uniform(0.34, 0.66)
        cy = size * rng.uniform(0.32, 0.50)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    if catalog.style == "poster":
        m = round(size * 0.06)
        draw.rectangle((m, round(size * 0.80), size - 1 - m, size - 1 - m), fill=tuple(c // 2 for c in bg))
        draw.rectangle((m, m, size - 1 - m, size - 1 - m), outline=(215, 210, 195), width=max(1, size // 64))

    # Draw the filled shape into a mask, then paint the pattern through it.
    mask = Image.new("L", (size, size), 0)
    _paint_shape(ImageDraw.Draw(mask), shape, cx, cy, r)
    rgb = catalog.colours[colour]
    fill = Image.new("RGB", (size, size), rgb)
    _paint_pattern(fill, pattern, rgb, size)
    img.paste(fill, (0, 0), mask)
    if catalog.style == "light":
        draw.rectangle((0, 0, size - 1, size - 1), outline=(200, 200, 200))
    return img


def caption(colour: str, shape: str, pattern: str, catalog: Catalog = DEFAULT_CATALOG) -> str:
    """The ground-truth caption the alignment stage trains on (one fixed phrasing per attribute set)."""
    return catalog.caption_template.format(pattern=pattern, colour=colour, shape=shape)


def parse_caption(text: str, catalog: Catalog = DEFAULT_CATALOG) -> dict[str, str | None]:
    """Read the visual attributes a model's caption mentions (first match per attribute)."""
    low = text.lower()
    out: dict[str, str | None] = {}
    for attr, values in catalog.attributes.items():
        hits = [(low.find(v), v) for v in values if v in low]
        out[attr] = min(hits)[1] if hits else None
    return out
