"""The built-in synthetic data set: one coloured shape on a near-black picture, captioned by a small grammar.

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
from itertools import permutations
from typing import Any

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

# Captions come from a small grammar, not a list of templates: the model must learn the words, not sentence
# shapes. A caption's *sentence shape* is the order in which it names shape, colour, size and position. Shapes in
# which the shape word comes before both its colour and its size ("a circle in red, small, on the left") form
# the held-out wording family: no training caption has one, and evaluation asks for seen pairs in them.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "to the left", "on the left side"),
    "right": ("on the right", "at the right", "to the right", "on the right side"),
    "top": ("at the top", "on top", "near the top", "along the top edge"),
    "bottom": ("at the bottom", "near the bottom", "along the bottom edge", "down at the bottom"),
    "center": ("in the center", "in the middle", "at the center", "in the very middle"),
}
OPENERS = ("", "", "a picture of", "an image of", "there is", "here is", "we see", "the picture shows")
CLOSERS = ("", "", "", "on a dark background", "against black", "in the picture")
POST_COLOR = ("in {}", "coloured {}", "that is {}", "{}")
POST_SIZE = ("of {} size", "that is {}", "{}", "quite {}")
POST_JOIN = (" ", ", ", " and ")
SLOTS = ("shape", "color", "size", "position")
WORDING_SPLITS = ("train", "heldout")
# Every word that names an attribute value (synonyms included) -> (attribute, value).
ATTRIBUTE_WORDS: dict[str, tuple[str, str]] = {
    **{c: ("color", c) for c in COLORS}, **{s: ("shape", s) for s in SHAPES},
    **{w: ("size", size) for size, words in SIZE_WORDS.items() for w in words},
    **{p: ("position", p) for p in POSITIONS}, "middle": ("position", "center"),
}


def heldout_wording(order: tuple[str, ...]) -> bool:
    """Whether a sentence shape (slot order) is in the held-out wording family: shape before colour and size."""
    return order.index("shape") < min(order.index("color"), order.index("size"))


def _valid_orders() -> list[tuple[str, ...]]:
    """The slot orders the grammar writes: a position phrase comes first or after the shape word (never between
    two adjectives), colour and size go before or after the shape word."""
    return [o for o in permutations(SLOTS)
            if o[0] == "position" or o.index("position") > o.index("shape")]


SENTENCE_SHAPES: dict[str, tuple[tuple[str, ...], ...]] = {
    split: tuple(o for o in _valid_orders() if heldout_wording(o) == (split == "heldout")) for split in WORDING_SPLITS}


def caption_for(attrs: Attributes, rng: np.random.Generator, wording: str = "train") -> str:
    """One caption of ``attrs`` in a sentence shape of the ``wording`` family, words and fillers drawn from
    ``rng``: the slots in the shape's order, colour and size as adjectives before the shape word and as
    modifiers after it."""
    def pick(options: tuple) -> Any:
        return options[int(rng.integers(len(options)))]

    order = pick(SENTENCE_SHAPES[wording])
    words = {"color": attrs.color, "size": pick(SIZE_WORDS[attrs.size])}
    noun = order.index("shape")
    if order[0] == "position":
        sentence = pick(POSITION_PHRASES[attrs.position]) + pick((", ", " ")) + pick(("", "there is ", "we see "))
    else:
        sentence = pick(OPENERS) + " "
    adjectives = pick(POST_JOIN).join(words[s] for s in order[:noun] if s != "position")
    sentence += " ".join(["a", adjectives, attrs.shape])
    previous = "shape"
    for slot in order[noun + 1:]:
        if slot == "position":
            sentence += pick((" ", ", ")) + pick(POSITION_PHRASES[attrs.position])
        else:
            joiner = pick(POST_JOIN) if previous in ("color", "size") else pick((" ", ", "))
            sentence += joiner + pick(POST_COLOR if slot == "color" else POST_SIZE).format(words[slot])
        previous = slot
    return " ".join(f"{sentence} {pick(CLOSERS)}".split())


def every_combination_captions(per_combination: int = 3, seed: int = 0) -> list[str]:
    """Captions of every (colour, shape, size, position), ``per_combination`` wordings each: a BPE model trained
    on them knows every word the grammar writes (for tests and benchmarks that need one in seconds)."""
    rng = np.random.default_rng(seed)
    return [caption_for(Attributes(c, s, z, p), rng) for c in COLORS for s in SHAPES for z in SIZES
            for p in POSITIONS for _ in range(per_combination)]


def sentence_shape(caption: str) -> tuple[str, ...] | None:
    """The order in which a caption first names each attribute, or None when one is missing."""
    first: dict[str, int] = {}
    for i, word in enumerate(caption.lower().replace(",", " ").split()):
        attribute = ATTRIBUTE_WORDS.get(word, ("", ""))[0]
        if attribute and attribute not in first:
            first[attribute] = i
    if len(first) != len(SLOTS):
        return None
    return tuple(sorted(first, key=first.get))


SOURCE = "synthetic"
GROUND_TRUTH_FIELDS = [pa.field(name, pa.string()) for name in ("color", "shape", "size", "position")]


@dataclass(frozen=True)
class Attributes:
    """What a caption says and what :func:`check_picture` reads back."""

    color: str
    shape: str
    size: str
    position: str


def parse_caption(caption: str) -> Attributes | None:
    """The attributes a caption names (any sentence shape, synonyms included), or None when one is missing."""
    found: dict[str, str] = {}
    for word in caption.lower().replace(",", " ").split():
        attribute, value = ATTRIBUTE_WORDS.get(word, ("", ""))
        if attribute:
            found.setdefault(attribute, value)
    return Attributes(**found) if len(found) == len(SLOTS) else None


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
    caption = caption_for(attrs, rng)
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
    size and position (``per_pair`` caps how many per pair), captions in training sentence shapes.

    Each item: ``{"caption", "color", "shape", "size", "position"}``; the order is fixed."""
    holdout_set(config)  # validates the pair names
    rng = np.random.default_rng([config.seed, 1])
    examples = []
    for color, shape in config.holdout_pairs:
        combos = [(size, pos) for size in SIZES for pos in POSITIONS][:per_pair]
        for size, pos in combos:
            attrs = Attributes(color, shape, size, pos)
            examples.append({"caption": caption_for(attrs, rng), **asdict(attrs)})
    return examples


def iter_samples(config: SyntheticConfig, split: str = "train") -> Iterator[dict]:
    """Raw rows of one split (``train`` or ``holdout``) in index order, without touching storage."""
    held_out = holdout_set(config)
    for i in range(config.num_samples):
        row = make_sample(config.seed, i, config.image_size)
        if ((row["color"], row["shape"]) in held_out) == (split == "holdout"):
            yield row
