"""Raw picture bytes -> model-sized pixels: decode (complete JPEGs through OpenCV, the rest through PIL), RGB,
resize and centre-crop. Pretokenize and the dVAE and CLIP trainers all read pictures through
:func:`load_picture`, so a picture looks the same to every model; failures come back as a reason, never an
exception.

Sizes are checked on the header before anything is decoded: a decompression bomb (a few bytes claiming
100 000 x 100 000 pixels) is rejected without allocating it, and so is a picture below the minimum size.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

JPEG_END = b"\xff\xd9"


def open_header(data: bytes) -> Image.Image:
    """The picture with only its header read (PIL decodes lazily). Raises ``Image.DecompressionBombError`` past
    ``Image.MAX_IMAGE_PIXELS`` (PIL itself only warns up to twice that, then decodes it in full)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombWarning as exc:
            raise Image.DecompressionBombError(str(exc)) from None


def picture_size(data: bytes | None) -> tuple[int, int] | None:
    """``(width, height)`` from the header, or None when there is no readable (or no sane) header."""
    if not data:
        return None
    try:
        return open_header(data).size
    except Exception:  # any header PIL cannot read means "size unknown"; pretokenize says why
        return None


def _decode_jpeg(data: bytes) -> np.ndarray | None:
    """A complete JPEG through OpenCV (libjpeg-turbo): ~2.5x faster than PIL on small pictures, applies the EXIF
    orientation, turns greyscale and CMYK into colour. None when OpenCV cannot read it (PIL then tries). A
    truncated JPEG (no end marker) goes to PIL instead, which refuses it where OpenCV would pad it with grey."""
    if not data.rstrip(b"\x00").endswith(JPEG_END):
        return None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Every other picture through PIL: EXIF orientation, transparency composited over white (as img2dataset
    does), 16-bit grey scaled to 8 bits (PIL's own conversion clips it to white), grey/palette/CMYK to RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint32).clip(0, 65535) >> 8).astype(np.uint8))
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


def _decode(data: bytes, min_image_size: int) -> tuple[np.ndarray | None, str | None, str | None]:
    try:
        img = open_header(data)
    except Image.DecompressionBombError as exc:
        return None, "image_too_large", str(exc)[:300]
    except Exception as exc:  # whatever PIL raises on one bad file is that file's reject
        return None, "undecodable_image", f"{type(exc).__name__}: {exc}"[:300]
    width, height = img.size
    if min(width, height) < min_image_size:
        return None, "image_too_small", f"{width}x{height} < {min_image_size}"
    try:
        pixels = _decode_jpeg(data) if img.format == "JPEG" else None
        return (_to_rgb(img) if pixels is None else pixels), None, None
    except Exception as exc:  # as above: a decoder failure never stops the job
        return None, "undecodable_image", f"{type(exc).__name__}: {exc}"[:300]


def load_picture(data: bytes | None, image_size: int, min_image_size: int, channels: int = 3,
                 ) -> tuple[np.ndarray | None, str | None, str | None]:
    """``(pixels [S, S, C] uint8, None, None)`` or ``(None, reason, detail)`` for one raw picture: decoded,
    converted to RGB (or grey for 1-channel dVAEs), shorter side resized to ``image_size``, centre cropped.
    Reasons: ``missing_image`` (no bytes), ``empty_image`` (zero bytes), ``undecodable_image``,
    ``image_too_small`` (shorter side < ``min_image_size``), ``image_too_large`` (> ``Image.MAX_IMAGE_PIXELS``)."""
    if data is None:
        return None, "missing_image", "no image bytes"
    if not data:
        return None, "empty_image", "the image is 0 bytes"
    pixels, reason, detail = _decode(data, min_image_size)
    if pixels is None:
        return None, reason, detail
    pixels = resize_center_crop(pixels, image_size)
    if channels == 1:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)[..., None]
    return pixels, None, None
