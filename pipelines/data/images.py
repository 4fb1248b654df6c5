"""Raw picture bytes -> model-sized pixels: decode (JPEG through OpenCV, the rest through PIL), RGB, resize and
centre-crop. Pretokenize and the dVAE and CLIP trainers all read pictures through :func:`load_picture`, so a
picture looks the same to every model; failures come back as a reason, never an exception.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def _decode_jpeg(data: bytes) -> np.ndarray | None:
    """JPEG through OpenCV (libjpeg-turbo): ~2.5x faster than PIL on small pictures, applies the EXIF
    orientation, turns greyscale and CMYK into colour. None when OpenCV cannot read it (PIL then tries)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _decode_any(data: bytes) -> np.ndarray:
    """Every other format through PIL: EXIF orientation, transparency composited over white (as img2dataset
    does), greyscale/palette/CMYK converted to RGB."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(img.convert("RGB"))


def resize_center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (area averaging when shrinking, bicubic when enlarging), then the centre."""
    height, width = pixels.shape[:2]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        pixels = cv2.resize(pixels, (new_w, new_h), interpolation=interpolation)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        pixels = pixels[top:top + size, left:left + size]
    return np.ascontiguousarray(pixels)


def load_picture(data: bytes | None, image_size: int, min_image_size: int, channels: int = 3,
                 ) -> tuple[np.ndarray | None, str | None, str | None]:
    """``(pixels [S, S, C] uint8, None, None)`` or ``(None, reason, detail)`` for one raw picture: decoded,
    converted to RGB (or grey for 1-channel dVAEs), shorter side resized to ``image_size``, centre cropped."""
    if not data:
        return None, "missing_image", "no image bytes"
    try:
        pixels = _decode_jpeg(data) if data[:3] == b"\xff\xd8\xff" else None
        if pixels is None:
            pixels = _decode_any(data)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        return None, "undecodable_image", f"{type(exc).__name__}: {exc}"[:300]
    height, width = pixels.shape[:2]
    if min(height, width) < min_image_size:
        return None, "image_too_small", f"{width}x{height} < {min_image_size}"
    pixels = resize_center_crop(pixels, image_size)
    if channels == 1:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)[..., None]
    return pixels, None, None
