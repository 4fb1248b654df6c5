"""Pictures as tensors and as files: uint8 <-> float conversion, PNG bytes and grids (pure numpy/torch/PIL).

Every stage that turns stored pixels into model input (pretokenize, the trainers, Serve) or model output into
files (samples, grids, reports) goes through these, so the value range and layout conventions live once.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """Float ``[..., C, H, W]`` in [0, 1] -> uint8 ``[..., H, W, C]`` (what PNGs and transport want)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def from_uint8(images: np.ndarray) -> Tensor:
    """uint8 ``[..., H, W, C]`` -> float ``[..., C, H, W]`` in [0, 1]."""
    return uint8_to_device(images, torch.device("cpu"))


def host_to_device(data: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """``data`` on ``device``; to a GPU from pinned memory without blocking, so the copy overlaps the host's work
    on the next batch instead of stalling it (the CUDA caching host allocator keeps the pinned buffer alive until
    the copy is done). A read-only array (what Ray hands out) is copied first, as ``torch.from_numpy`` needs."""
    tensor = torch.from_numpy(np.require(data, requirements=["C", "W"])) if isinstance(data, np.ndarray) else data
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def uint8_to_device(images: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """:func:`from_uint8` on ``device``: the uint8 pixels cross to the device (a quarter of the float bytes) and
    are converted and permuted there, not on the host in lockstep with the accelerator. Same values and layout
    (strides) as :func:`from_uint8`."""
    return host_to_device(images, device).movedim(-1, -3).float() / 255


def png_bytes(image: np.ndarray) -> bytes:
    """One uint8 ``[H, W, C]`` picture as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def make_grid(rows: list[list[np.ndarray]], pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tiles uint8 ``[H, W, C]`` pictures, one list per grid row (short rows stay blank), with white gaps;
    ``scale`` enlarges tiny pictures by pixel repetition so a 32px grid is readable."""
    tiles = [img for row in rows for img in row]
    if not tiles:
        raise ValueError("make_grid needs at least one picture")
    h, w, c = tiles[0].shape
    h, w = h * scale, w * scale
    ncols = max(len(row) for row in rows)
    grid = np.full((len(rows) * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for col, img in enumerate(row):
            big = img.repeat(scale, 0).repeat(scale, 1)
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            grid[y:y + h, x:x + w] = big
    return grid
