"""The synthetic set's attribute checker: colour, shape, size and position read back from a picture (numpy),
and what it says of an image tokenizer's round trip on fresh pictures of the set.

Generation is :mod:`pipelines.data.synthetic`; this module only judges pictures, so evaluation and the dVAE
trainer can score what they make without knowing how the set is drawn beyond its geometry.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from dalle_core.images import from_uint8, to_uint8
from pipelines import storage
from pipelines.config import SyntheticConfig
from pipelines.data.synthetic import (
    ANCHORS,
    COLORS,
    GROUND_TRUTH_FIELDS,
    NOISE_CUT,
    SHAPES,
    SIZE_THRESHOLD,
    Attributes,
    coverage,
    holdout_set,
    make_sample,
)


def _as_hwc_uint8_range(image: np.ndarray) -> np.ndarray:
    """float32 ``[H, W, 3]`` on the 0-255 scale from HWC uint8 or CHW/HWC floats in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"expected one picture [H, W, 3] or [3, H, W], got shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    arr = arr.astype(np.float32)
    if np.issubdtype(np.asarray(image).dtype, np.floating) and arr.max() <= 1.0:
        arr = arr * 255.0
    return arr


def _suppress_noise(alpha: np.ndarray) -> np.ndarray:
    """Zeroes faint coverage: background noise projects to a few percent everywhere, which summed over the
    picture would outweigh a small shape. Templates go through the same cut, so the comparison stays fair."""
    return np.where(alpha < NOISE_CUT, 0.0, alpha)


def check_picture(image: np.ndarray) -> Attributes | None:
    """Reads colour, shape, size and position back from a picture; None when there is no shape at all.

    Colour: the palette colour nearest to most strongly non-background pixels. The background is the
    per-channel median (a shape covers at most ~20% of the picture). Per pixel, coverage ``alpha`` is the
    projection of ``pixel - background`` onto ``colour - background``; its sum and centroid give the area and
    centre. Shape: the template (rendered exactly as the generator renders it, sized to the measured area)
    closest to the coverage map. Size and position follow from the fitted template."""
    img = _as_hwc_uint8_range(image)
    side, width = img.shape[:2]
    if side != width:
        raise ValueError(f"the checker reads square pictures, got {side}x{width}")
    background = np.median(img.reshape(-1, 3), axis=0)
    diff = img - background
    strength = np.linalg.norm(diff, axis=-1)
    strong = strength > max(60.0, 0.5 * float(strength.max()))
    if strong.sum() < 2:
        return None
    palette = np.asarray(list(COLORS.values()), dtype=np.float32)
    nearest = np.linalg.norm(img[strong][:, None, :] - palette[None], axis=-1).argmin(axis=1)
    color_index = int(np.bincount(nearest, minlength=len(palette)).argmax())
    direction = palette[color_index] - background
    alpha = _suppress_noise(np.clip(diff @ direction / float(direction @ direction), 0.0, 1.0))
    area = float(alpha.sum())
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)

    best = None
    for shape in SHAPES:
        h = {"circle": np.sqrt(area / np.pi), "square": np.sqrt(area / 4)}.get(shape, np.sqrt(area / 2))
        box_cy = cy - h / 3 if shape == "triangle" else cy  # a triangle's centroid sits h/3 below its box centre
        template = _suppress_noise(coverage(shape, cx, box_cy, float(h), side))
        error = float(((template - alpha) ** 2).sum())
        if best is None or error < best[0]:
            best = (error, shape, float(h), box_cy)
    _, shape, h, box_cy = best
    position = min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx / side) ** 2 + (ANCHORS[p][1] - box_cy / side) ** 2)
    size = "large" if h / side > SIZE_THRESHOLD else "small"
    return Attributes(list(COLORS)[color_index], shape, size, position)


def decode_jpeg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def has_ground_truth(raw_shard: str) -> bool:
    """Whether a raw shard carries the synthetic set's ground-truth columns (so the checker can score it)."""
    return {f.name for f in GROUND_TRUTH_FIELDS} <= set(storage.parquet_columns(raw_shard))


def reconstruction_accuracy(reconstruct: Callable[[np.ndarray], np.ndarray], config: SyntheticConfig,
                            num_samples: int = 1000, batch_size: int = 250) -> dict[str, dict[str, float]]:
    """How often a picture round trip (the dVAE's encode -> decode) keeps colour and shape, per the checker.

    Scored on fresh samples, indices after the generated set's, so no picture was trained on; split by whether
    the (color, shape) pair was held out of training, and over ``all`` at the set's natural mix.
    ``reconstruct`` maps uint8 ``[N, S, S, 3]`` to uint8 ``[N, S, S, 3]``."""
    held_out = holdout_set(config)
    hits = {split: np.zeros(4, dtype=np.int64) for split in ("seen", "heldout")}  # n, color, shape, both
    start = config.num_samples
    for lo in range(start, start + num_samples, batch_size):
        rows = [make_sample(config.seed, i, config.image_size)
                for i in range(lo, min(lo + batch_size, start + num_samples))]
        pictures = np.stack([decode_jpeg(r["jpg"]) for r in rows])
        for row, picture in zip(rows, reconstruct(pictures), strict=True):
            found = check_picture(picture)
            color = found is not None and found.color == row["color"]
            shape = found is not None and found.shape == row["shape"]
            split = "heldout" if (row["color"], row["shape"]) in held_out else "seen"
            hits[split] += (1, color, shape, color and shape)
    hits["all"] = hits["seen"] + hits["heldout"]
    return {split: {"n": int(h[0]), "color": float(h[1] / h[0]), "shape": float(h[2] / h[0]),
                    "both": float(h[3] / h[0])}
            for split, h in hits.items() if h[0]}


def dvae_reconstruction(vae: torch.nn.Module, config: SyntheticConfig,
                        num_samples: int = 1000) -> dict[str, dict[str, float]]:
    """:func:`reconstruction_accuracy` of a dVAE (anything with ``reconstruct`` on float pictures)."""
    return reconstruction_accuracy(lambda pixels: to_uint8(vae.reconstruct(from_uint8(pixels))), config,
                                   num_samples)
