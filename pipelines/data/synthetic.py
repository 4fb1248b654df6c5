"""The built-in synthetic data set: one coloured shape on a near-black picture, captioned from templates.

It is the embedded default of the whole chain (demo, tests, quality metric) because its captions are fully
checkable: :func:`pipelines.data.checker.check_picture` reads colour, shape, size and position back from a
picture, so evaluation can score whether a generated picture matches its prompt.

Determinism: sample ``i`` draws everything from ``numpy.random.default_rng([seed, i])``, so a sample does not
depend on the shard size or on the samples before it.

Layout written by :func:`write_synthetic` (img2dataset's Parquet columns plus ground truth ``color, shape,
size, position``)::

    <out>/part-00000.parquet ...          training pairs (what the tokenizer, dVAE, CLIP and DALLE read)
    <out>/holdout/part-00000.parquet ...  pairs whose (color, shape) is in ``synthetic.holdout_pairs``

Readers take only the Parquet files directly under a folder, so pointing any job at ``<out>`` never shows it
the held-out pairs; evaluation uses ``<out>/holdout`` or :func:`holdout_examples`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines import storage
from pipelines.config import ConfigError, SyntheticConfig
from pipelines.data.raw import SUCCESS, raw_table

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

# Geometry, as fractions of the picture side. A shape fits a square of half-side ``h`` centred on its anchor.
HALF_EXTENT = {"small": 0.11, "large": 0.21}
SIZE_THRESHOLD = 0.16  # between the two half-extents, with room for the +-8% jitter
ANCHORS = {"left": (0.26, 0.5), "right": (0.74, 0.5), "top": (0.5, 0.26), "bottom": (0.5, 0.74),
           "center": (0.5, 0.5)}
JITTER = 0.02  # anchor jitter per axis
SCALE_JITTER = 0.08
SUPERSAMPLE = 4  # anti-aliasing: coverage is measured on a 4x4 grid per pixel
JPEG_QUALITY = 95
NOISE_CUT = 0.15  # coverage below this is treated as background by the checker

_AT = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
       "center": "in the center"}
_SIDE = {"left": "left side", "right": "right side", "top": "top", "bottom": "bottom", "center": "center"}
TEMPLATES = (
    "a {size} {color} {shape} {at}",
    "{color} {shape}, {size}, {side}",
    "{at} there is a {size} {color} {shape}",
    "a {color} {shape} of {size} size {at}",
    "{size} {shape} in {color}, {side}",
)
SOURCE = "synthetic"
GROUND_TRUTH_FIELDS = [pa.field(name, pa.string()) for name in ("color", "shape", "size", "position")]


@dataclass(frozen=True)
class Attributes:
    """What a caption says and what :func:`check_picture` reads back."""

    color: str
    shape: str
    size: str
    position: str


def caption_for(attrs: Attributes, template: int) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(
        size=attrs.size, color=attrs.color, shape=attrs.shape, at=_AT[attrs.position], side=_SIDE[attrs.position])


def parse_caption(caption: str) -> Attributes | None:
    """The attributes a caption names (any template or word order), or None when one is missing."""
    words = caption.lower().replace(",", " ").split()
    found = {}
    for name, vocab in (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
        hits = [w for w in words if w in vocab]
        if not hits:
            return None
        found[name] = hits[0]
    return Attributes(**found)


def coverage(shape: str, cx: float, cy: float, h: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape (pixel units) on a ``size x size`` picture."""
    s = SUPERSAMPLE
    coords = (np.arange(size * s, dtype=np.float32) + 0.5) / s
    x, y = coords[None, :] - cx, coords[:, None] - cy
    if shape == "circle":
        inside = x * x + y * y <= h * h
    elif shape == "square":
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "diamond":
        inside = np.abs(x) + np.abs(y) <= h
    elif shape == "triangle":  # apex up, base at the bottom of the square
        inside = (y <= h) & (np.abs(x) <= (y + h) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, s, size, s).mean(axis=(1, 3))


def sample_attributes(seed: int, index: int) -> tuple[Attributes, np.random.Generator]:
    """Attributes of sample ``index`` and the generator that goes on to draw its picture and template."""
    rng = np.random.default_rng([seed, index])
    attrs = Attributes(
        color=list(COLORS)[rng.integers(len(COLORS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
    )
    return attrs, rng


def render(attrs: Attributes, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """The picture ``[S, S, 3] uint8``: the shape over a noisy near-black background (0-30 per channel)."""
    s = image_size
    ax, ay = ANCHORS[attrs.position]
    cx = (ax + rng.uniform(-JITTER, JITTER)) * s
    cy = (ay + rng.uniform(-JITTER, JITTER)) * s
    h = HALF_EXTENT[attrs.size] * (1 + rng.uniform(-SCALE_JITTER, SCALE_JITTER)) * s
    base = rng.integers(0, 21, size=3)
    background = np.clip(base + rng.integers(-6, 7, size=(s, s, 3)), 0, 30).astype(np.float32)
    alpha = coverage(attrs.shape, cx, cy, h, s)[..., None]
    color = np.asarray(COLORS[attrs.color], dtype=np.float32)
    return np.rint(background * (1 - alpha) + color * alpha).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """JPEG at quality 95 without chroma subsampling: small pictures keep their colour edges."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def make_sample(seed: int, index: int, image_size: int) -> dict:
    """One raw row (img2dataset columns + ground truth) for sample ``index``."""
    attrs, rng = sample_attributes(seed, index)
    pixels = render(attrs, image_size, rng)
    caption = caption_for(attrs, int(rng.integers(len(TEMPLATES))))
    return {"key": f"syn{index:09d}", "caption": caption, "url": None, "jpg": encode_jpeg(pixels),
            "width": image_size, "height": image_size, "status": SUCCESS, "error_message": None,
            "source": SOURCE, **asdict(attrs)}


def holdout_set(config: SyntheticConfig) -> frozenset[tuple[str, str]]:
    """The held-out (color, shape) pairs, checked against the palette (ConfigError naming the entry)."""
    pairs = set()
    for i, (color, shape) in enumerate(config.holdout_pairs):
        if color not in COLORS or shape not in SHAPES:
            raise ConfigError(f"synthetic.holdout_pairs[{i}]: unknown pair {[color, shape]}; colors are "
                              f"{list(COLORS)}, shapes {list(SHAPES)}")
        pairs.add((color, shape))
    return frozenset(pairs)


def write_synthetic(config: SyntheticConfig, output: str) -> dict[str, int]:
    """Writes the whole set (layout in the module docstring) and returns row counts per split.

    Shard ``k`` holds samples ``[k * samples_per_shard, (k+1) * samples_per_shard)``, routed to the training
    or the held-out folder by their (color, shape)."""
    held_out = holdout_set(config)
    counts = {"train": 0, "holdout": 0}
    extra = GROUND_TRUTH_FIELDS
    for shard, start in enumerate(range(0, config.num_samples, config.samples_per_shard)):
        stop = min(start + config.samples_per_shard, config.num_samples)
        rows = [make_sample(config.seed, i, config.image_size) for i in range(start, stop)]
        train = [r for r in rows if (r["color"], r["shape"]) not in held_out]
        holdout = [r for r in rows if (r["color"], r["shape"]) in held_out]
        name = f"part-{shard:05d}.parquet"
        if train:
            storage.write_parquet(raw_table(train, extra), storage.join(output, name))
        if holdout:
            storage.write_parquet(raw_table(holdout, extra), storage.join(output, "holdout", name))
        counts["train"] += len(train)
        counts["holdout"] += len(holdout)
    return counts


def holdout_examples(config: SyntheticConfig, per_pair: int | None = None) -> list[dict]:
    """Prompts + ground truth for compositional evaluation: every held-out (color, shape) pair with every
    size and position (``per_pair`` caps how many per pair), captions cycling through the templates.

    Each item: ``{"caption", "color", "shape", "size", "position"}``; the order is fixed."""
    examples = []
    for color, shape in config.holdout_pairs:
        combos = [(size, pos) for size in SIZES for pos in POSITIONS][:per_pair]
        for j, (size, pos) in enumerate(combos):
            attrs = Attributes(color, shape, size, pos)
            examples.append({"caption": caption_for(attrs, j), **asdict(attrs)})
    holdout_set(config)  # validates the pair names
    return examples


def iter_samples(config: SyntheticConfig, split: str = "train") -> Iterator[dict]:
    """Raw rows of one split (``train`` or ``holdout``) in index order, without touching storage."""
    held_out = holdout_set(config)
    for i in range(config.num_samples):
        row = make_sample(config.seed, i, config.image_size)
        if ((row["color"], row["shape"]) in held_out) == (split == "holdout"):
            yield row
