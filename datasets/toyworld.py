"""Toy world: generated images of simple scenes, with captions, for a CLIP trained here.

No pretrained CLIP weights or real datasets exist on the development machines, and a
random CLIP makes every accuracy meaningless. This module draws scenes of one coloured
shape (shape, colour, size, fill pattern, background, style) and writes natural captions
for them; ``benchmark/toy_pretrain.py`` pre-trains a small CLIP on them contrastively, and
the toy classification datasets are rendered from the same :func:`render`.

Pre-training never sees the (shape, colour) pairs in :data:`HELD_OUT`, neither as image
nor as caption, so zero-shot accuracy on them measures generalisation to novel
compositions of seen attributes. Styles: pre-training uses mostly "photo", with small
shares of "painting" and "sketch" (:data:`PRETRAIN_STYLE_SHARES`) so that those domains
are familiar but rare; "noisy", "inverted" and "pixelated" are never seen in
pre-training and serve as the unseen domain shifts of the ImageNet-variant-like test sets.

The API (vocabularies, :class:`Scene`, :func:`render`, :func:`caption`,
:data:`HELD_OUT`, :func:`sample_scene`) is stable: datasets on disk are written from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT",
    "PATTERNS",
    "PRETRAIN_STYLE_SHARES",
    "SHAPES",
    "SIZES",
    "STYLES",
    "Scene",
    "caption",
    "render",
    "sample_scene",
]

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon", "ring", "arrow",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 220, 20),
    "green": (30, 160, 40),
    "cyan": (0, 200, 215),
    "blue": (30, 70, 230),
    "purple": (130, 40, 180),
    "pink": (255, 110, 190),
    "brown": (125, 75, 30),
    "gray": (128, 128, 128),
}
SIZES: tuple[str, ...] = ("small", "large")
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
# smooth or fine-grained textures only, so that none looks like a shape's fill pattern
BACKGROUNDS: tuple[str, ...] = ("white", "black", "grass", "sky", "sand", "wood")
STYLES: tuple[str, ...] = ("photo", "sketch", "painting", "noisy", "inverted", "pixelated")

# what pre-training draws; the other styles are test-only domain shifts
PRETRAIN_STYLE_SHARES: dict[str, float] = {"photo": 0.85, "painting": 0.08, "sketch": 0.07}


def _held_out_pairs() -> frozenset[tuple[str, str]]:
    # two diagonals of the shape x colour grid: every shape and every colour keeps most of
    # its pairs seen, and the two diagonals meet twice, so 18 of the 100 pairs are held out
    n = len(COLOURS)
    names = list(COLOURS)
    pairs = set()
    for i, shape in enumerate(SHAPES):
        pairs.add((shape, names[(i + 3) % n]))
        pairs.add((shape, names[(3 * i + 7) % n]))
    return frozenset(pairs)


HELD_OUT: frozenset[tuple[str, str]] = _held_out_pairs()


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str = "large"
    pattern: str = "plain"
    background: str = "white"
    style: str = "photo"

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("shape", self.shape, SHAPES), ("colour", self.colour, tuple(COLOURS)), ("size", self.size, SIZES),
            ("pattern", self.pattern, PATTERNS), ("background", self.background, BACKGROUNDS),
            ("style", self.style, STYLES),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {field} {value!r}; expected one of {', '.join(allowed)}.")


def sample_scene(rng: np.random.Generator, *, held_out_ok: bool = False, styles: tuple[str, ...] = ("photo",)) -> Scene:
    """A uniformly drawn scene; (shape, colour) pairs in HELD_OUT only when held_out_ok."""
    colours = tuple(COLOURS)
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = colours[rng.integers(len(colours))]
        if held_out_ok or (shape, colour) not in HELD_OUT:
            break
    return Scene(
        shape=shape,
        colour=colour,
        size=SIZES[rng.integers(len(SIZES))],
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        style=styles[rng.integers(len(styles))],
    )


# --------------------------------------------------------------------------- shapes

def _regular(n: int, phase: float = -math.pi / 2, r: float = 1.0) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


@lru_cache(maxsize=None)
def _outline(shape: str) -> tuple[tuple[tuple[float, float], ...], float]:
    """Unit polygon (y down, inside the unit disc) and, for the ring, the inner radius."""
    if shape in ("circle", "ring"):
        pts = _regular(48)
    elif shape == "square":
        pts = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif shape == "triangle":
        pts = [(0.0, -0.95), (0.9, 0.7), (-0.9, 0.7)]
    elif shape == "star":
        pts = [p for k in range(5) for p in (_regular(5, r=1.0)[k], _regular(5, -math.pi / 2 + math.pi / 5, 0.42)[k])]
    elif shape == "cross":
        a, b = 0.3, 0.9
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        pts = list(zip((x / 17).tolist(), ((y + 2.5) / 17).tolist()))
    elif shape == "diamond":  # a tall rhombus, so it never equals a rotated square
        pts = [(0.0, -0.98), (0.6, 0.0), (0.0, 0.98), (-0.6, 0.0)]
    elif shape == "hexagon":
        pts = _regular(6, phase=0.0, r=0.95)
    elif shape == "arrow":  # pointing right
        pts = [(-0.9, -0.25), (0.15, -0.25), (0.15, -0.65), (0.95, 0.0), (0.15, 0.65), (0.15, 0.25), (-0.9, 0.25)]
    else:  # pragma: no cover - Scene validates shapes
        raise ValueError(shape)
    return tuple((float(x), float(y)) for x, y in pts), (0.55 if shape == "ring" else 0.0)


def _place(points, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + radius * (c * x - s * y), cy + radius * (s * x + c * y)) for x, y in points]


# --------------------------------------------------------------------------- textures

def _pattern_mask(pattern: str, n: int, period: float, angle: float, rng: np.random.Generator) -> np.ndarray | None:
    """Boolean n x n mask of the second tone of a fill pattern (None for plain)."""
    if pattern == "plain":
        return None
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    u = (c * xx + s * yy) / period + rng.random()
    v = (-s * xx + c * yy) / period + rng.random()
    if pattern == "striped":
        return (u % 1.0) < 0.5
    if pattern == "checkered":
        return ((np.floor(u) + np.floor(v)) % 2) == 1
    # dotted: round dots on a square lattice
    return ((u % 1.0 - 0.5) ** 2 + (v % 1.0 - 0.5) ** 2) < 0.09


def _background(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """float32 n x n x 3 background in 0..255."""
    j = rng.normal(0, 6, 3).astype(np.float32)  # slight tint jitter
    if name == "white":
        img = np.full((n, n, 3), 242, np.float32) + j
    elif name == "black":
        img = np.full((n, n, 3), 18, np.float32) + j * 0.5
    elif name == "grass":
        # vertical blade streaks: noise stretched along y
        rows = max(2, n // 6)
        streak = rng.normal(0, 1, (rows, n)).astype(np.float32)
        streak = np.repeat(streak, -(-n // rows), axis=0)[:n]
        img = np.array([60, 135, 45], np.float32) + j + streak[..., None] * np.array([10, 25, 8], np.float32)
        img = img + rng.normal(0, 6, (n, n, 1)).astype(np.float32)
    elif name == "sky":
        t = np.linspace(0, 1, n, dtype=np.float32)[:, None, None]
        top, bottom = np.array([70, 130, 215], np.float32), np.array([175, 215, 245], np.float32)
        img = top * (1 - t) + bottom * t + j + np.zeros((1, n, 1), np.float32)
    elif name == "sand":
        img = np.array([222, 196, 140], np.float32) + j + rng.normal(0, 10, (n, n, 1)).astype(np.float32)
    elif name == "wood":
        yy = np.arange(n, dtype=np.float32)[:, None]
        xx = np.arange(n, dtype=np.float32)[None, :]
        grain = np.sin(2 * math.pi * (yy / max(3.0, n / 10) + 0.15 * np.sin(xx / n * 3 + rng.random() * 6)) + rng.random() * 6)
        img = np.array([170, 120, 70], np.float32) + j + grain[..., None] * np.array([18, 14, 9], np.float32)
    else:  # pragma: no cover - Scene validates backgrounds
        raise ValueError(name)
    return img


# --------------------------------------------------------------------------- rendering

def _shape_layers(scene: Scene, n: int, rng: np.random.Generator):
    """Hi-res masks (float 0..1): the shape, its outline band, and the pattern mask, plus the geometry."""
    base = (0.40 if scene.size == "large" else 0.20) * n
    radius = base * rng.uniform(0.9, 1.1)
    # near the centre, as objects are in photos of objects: a shape anywhere in the frame
    # is far harder for a small ViT to learn from scratch than colour or background
    slack = min(n / 2 - radius * 1.02, 0.12 * n)
    cx = n / 2 + rng.uniform(-slack, slack)
    cy = n / 2 + rng.uniform(-slack, slack)
    angle = math.radians(rng.uniform(-15, 15))  # limited: a square turned 45 degrees is not a diamond
    points, inner = _outline(scene.shape)
    poly = _place(points, cx, cy, radius, angle)
    line = max(1, round(n / 40))

    mask_img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask_img)
    draw.polygon(poly, fill=255)
    edge_img = Image.new("L", (n, n), 0)
    edraw = ImageDraw.Draw(edge_img)
    edraw.polygon(poly, outline=255, width=line)
    if inner:
        hole = _place(_outline("circle")[0], cx, cy, radius * inner, angle)
        draw.polygon(hole, fill=0)
        edraw.polygon(hole, outline=255, width=line)
    mask = np.asarray(mask_img, np.float32) / 255.0
    edge = np.asarray(edge_img, np.float32) / 255.0
    # pattern scale follows the shape, so a small dotted star still shows dots
    period = max(3.0, radius * rng.uniform(0.38, 0.48))
    pattern_angle = angle + math.radians(float(rng.choice([0, 45, 90, 135])))
    pmask = _pattern_mask(scene.pattern, n, period, pattern_angle, rng)
    return mask, edge, pmask


def _reduce(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    h, w = a.shape[:2]
    return a.reshape(h // f, f, w // f, f, *a.shape[2:]).mean(axis=(1, 3))


def _render_photo(scene: Scene, size: int, rng: np.random.Generator, f: int) -> np.ndarray:
    n = size * f
    mask, edge, pmask = _shape_layers(scene, n, rng)
    colour = np.array(COLOURS[scene.colour], np.float32) * rng.uniform(0.9, 1.08) + rng.normal(0, 7, 3)
    colour = np.clip(colour, 0, 255).astype(np.float32)
    dark = colour * 0.25
    fill = np.broadcast_to(colour, (n, n, 3))
    if pmask is not None:
        fill = np.where(pmask[..., None], dark, colour)
    fill = np.where(edge[..., None] > 0, colour * 0.55, fill)  # a darker rim keeps the shape visible on any background
    alpha = np.maximum(mask, edge)[..., None]
    premult = _reduce(fill * alpha, f)
    alpha = _reduce(alpha, f)
    bg = _background(scene.background, size, rng)
    img = bg * (1 - alpha) + premult
    return img + rng.normal(0, 4, img.shape).astype(np.float32)


def _render_sketch(scene: Scene, size: int, rng: np.random.Generator, f: int) -> np.ndarray:
    n = size * f
    mask, edge, pmask = _shape_layers(scene, n, rng)
    paper = rng.uniform(232, 250)
    ink = rng.uniform(25, 80)
    shade = np.zeros((n, n), np.float32)
    if pmask is not None:  # the fill pattern drawn as light pencil marks
        shade = 0.45 * (pmask & (mask > 0.5))
    stroke = np.maximum(edge, shade)
    grey = paper * (1 - stroke) + ink * stroke
    grey = _reduce(grey, f) + rng.normal(0, 3, (size, size)).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=2)


def _to_image(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB size x size image of the scene; deterministic for the rng's state.

    Position, rotation (within +-15 degrees), scale, colour and noise vary from draw to
    draw. Drawn at 2x (below 128 px) and box-downsampled, so edges and patterns are
    antialiased.
    """
    f = 2 if size < 128 else 1
    if scene.style == "sketch":
        return _to_image(_render_sketch(scene, size, rng, f))
    img = _render_photo(scene, size, rng, f)
    if scene.style == "photo":
        return _to_image(img)
    if scene.style == "noisy":
        return _to_image(img + rng.normal(0, 55, img.shape).astype(np.float32))
    if scene.style == "inverted":
        return _to_image(255.0 - img)
    if scene.style == "pixelated":
        blocks = max(4, size // 4)
        small = _to_image(img).resize((blocks, blocks), Image.BOX)
        return small.resize((size, size), Image.NEAREST)
    # painting: soft brush-like blur, stronger colours, low-frequency colour smears
    cells = max(2, size // 8)
    smear = rng.normal(0, 9, (cells, cells, 3)).astype(np.float32)
    smear = np.asarray(Image.fromarray(np.clip(smear + 128, 0, 255).astype(np.uint8), "RGB").resize((size, size), Image.BICUBIC), np.float32) - 128
    out = _to_image(img + smear).filter(ImageFilter.GaussianBlur(radius=size * rng.uniform(0.02, 0.035)))
    return ImageEnhance.Color(out).enhance(rng.uniform(1.4, 1.7))


# --------------------------------------------------------------------------- captions

_STYLE_PREFIXES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of", "a picture of", "an image of", "a photo of", "a rendering of"),
    "sketch": ("a sketch of", "a drawing of", "a pencil sketch of"),
    "painting": ("a painting of", "an oil painting of", "a painting of"),
    "noisy": ("a noisy photo of",),
    "inverted": ("an inverted photo of",),
    "pixelated": ("a pixelated photo of",),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A varied natural caption of the scene, often leaving attributes out.

    Every attribute word it contains is the scene's own. Sketch captions never name a
    colour or background (a sketch shows neither).
    """
    drawn = scene.style == "sketch"
    # a third of the captions name the shape alone: colour, size and background are easy
    # to see and would otherwise tell most pairs in a batch apart, so the shape, the
    # hardest attribute to see, would get little training signal
    shape_only = rng.random() < 0.35
    use_size = not shape_only and rng.random() < 0.45
    use_colour = not shape_only and not drawn and rng.random() < 0.65
    use_pattern = not shape_only and rng.random() < 0.45
    use_bg = not shape_only and not drawn and rng.random() < 0.3
    generic = rng.random() < 0.15 and (use_size or use_colour or use_pattern or use_bg)
    words = []
    if use_size:
        words.append(scene.size)
    if use_colour:
        words.append(scene.colour)
    if use_pattern:
        words.append(scene.pattern)
    words.append(("object", "shape")[rng.integers(2)] if generic else scene.shape)
    # a quarter of the captions say "a" before every word, as fixed prompt templates do
    article = "a" if rng.random() < 0.25 else _article(words[0])
    phrase = f"{article} {' '.join(words)}"
    if use_bg:
        phrase += f" on a {scene.background} background"
    prefixes = _STYLE_PREFIXES[scene.style]
    form = rng.random()
    if scene.style == "photo" and form < 0.3:
        text = phrase
    elif scene.style == "photo" and form < 0.38:
        text = f"there is {phrase}"
    else:
        text = f"{prefixes[rng.integers(len(prefixes))]} {phrase}"
    return text + ("." if rng.random() < 0.75 else "")
