"""Every bad input the data jobs meet, as one data set through ingest (a folder) and img2dataset-style raw shards,
then pretokenize: each input ends as exactly one token row or one reject with its own reason, keys stay unique,
nothing crashes, and a decompression bomb is rejected from its header without being decoded."""

from __future__ import annotations

import io
import resource
import struct
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_tiny_models
from PIL import Image

from pipelines.config import IngestConfig, PretokenizeConfig
from pipelines.data.images import load_picture, picture_size
from pipelines.data.ingest import ingest_folder
from pipelines.data.manifest import read_manifest
from pipelines.data.pretokenize import run_pretokenize
from pipelines.data.raw import raw_table
from pipelines.data.synthetic import make_sample

RNG = np.random.default_rng(17)
NOISE = RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)
CAPTION = "a red circle"
TEXT_SEQ_LEN = 16


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    return _encode(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)), "JPEG")


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width x height`` pixels, with almost no data behind it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _jpeg_claiming(size: int) -> bytes:
    """A real small JPEG whose frame header is patched to ``size x size``: OpenCV would allocate and decode it."""
    data = bytearray(_encode(Image.fromarray(NOISE), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", size, size)
    return bytes(data)


def _halves() -> Image.Image:
    """Stored 48 wide x 32 high: left half red, right half blue."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:, :24] = (255, 0, 0)
    pixels[:, 24:] = (0, 0, 255)
    return Image.fromarray(pixels)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned 90 degrees clockwise, so the left half is on top
    return _encode(_halves(), "JPEG", exif=exif.tobytes(), quality=95)


def _palette_with_transparency() -> bytes:
    img = Image.fromarray(NOISE).convert("P")
    return _encode(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(np.roll(NOISE, i, axis=1)).convert("P") for i in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


GREY16 = (NOISE[..., 0].astype(np.uint16) * 257)
JPEG_OK = _encode(Image.fromarray(NOISE), "JPEG")

# stem: (file extension, bytes, the reject reason pretokenize must give, or None for a token row)
PICTURES = {
    "good": (".jpg", JPEG_OK, None),
    "truncated": (".jpg", JPEG_OK[: len(JPEG_OK) // 2], "undecodable_image"),
    "random": (".jpg", RNG.integers(0, 256, 3000, dtype=np.uint8).tobytes(), "undecodable_image"),
    "text": (".jpg", b"this is a caption, not a picture\n" * 20, "undecodable_image"),
    "zero": (".png", b"", "empty_image"),
    "one": (".png", _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "image_too_small"),
    "eight": (".png", _encode(Image.fromarray(NOISE[:8, :8]), "PNG"), "image_too_small"),
    "bomb_png": (".png", _png_claiming(100_000, 100_000), "image_too_large"),
    "bomb_jpg": (".jpg", _jpeg_claiming(20_000), "image_too_large"),
    "grey16": (".png", _encode(Image.fromarray(GREY16), "PNG"), None),
    "rgb16": (".png", cv2.imencode(".png", NOISE[..., ::-1].astype(np.uint16) * 257)[1].tobytes(), None),  # BGR
    "palette": (".png", _palette_with_transparency(), None),
    "cmyk": (".jpg", _encode(Image.fromarray(NOISE).convert("CMYK"), "JPEG"), None),
    "exif": (".jpg", _exif_rotated(), None),
    "animated": (".gif", _animated_gif(), None),
    "grey": (".png", _encode(Image.fromarray(NOISE[..., 1].copy()), "PNG"), None),
    "rgba": (".png", _encode(Image.fromarray(np.dstack([NOISE, NOISE[..., :1]])), "PNG"), None),
}
LONG_CAPTION = ("a red circle on the left " * 500)[:10_000]
# stem: (caption, reason or None), each beside a good picture
CAPTIONS = {
    "cap_empty": ("", "empty_caption"),
    "cap_space": ("  \n\t  \n", "empty_caption"),
    "cap_emoji": ("\U0001f388\U0001f389 \U0001f388", "caption_unknown_tokens"),
    "cap_script": ("\u6771\u4eac \u30bf\u30ef\u30fc", "caption_unknown_tokens"),
    "cap_long": (LONG_CAPTION, None),
}
NOT_UTF8 = "caf\u00e9 au lait, a red circle".encode("latin-1")


def _folder(src: Path) -> dict[tuple[str, str], str | None]:
    """Writes the folder data set; returns ``{(key, file name of its source): expected reason}`` per input."""
    src.mkdir()
    expected: dict[tuple[str, str], str | None] = {}
    files = {f"{stem}{ext}": data for stem, (ext, data, _) in PICTURES.items()}
    files.update({f"{stem}.txt": CAPTION.encode() for stem in PICTURES})
    expected.update({(stem, f"{stem}{ext}"): reason for stem, (ext, _, reason) in PICTURES.items()})
    for i, (stem, (text, reason)) in enumerate(CAPTIONS.items()):
        files.update({f"{stem}.jpg": _jpeg(i), f"{stem}.txt": text.encode()})
        expected[stem, f"{stem}.jpg"] = reason
    files.update({"latin1.jpg": _jpeg(10), "latin1.txt": NOT_UTF8, "lonely.jpg": _jpeg(11), "orphan.txt": b"lost",
                  "twin.jpg": _jpeg(12), "twin.png": _encode(Image.new("RGB", (32, 32)), "PNG"), "twin.txt": b"twin"})
    expected.update({("latin1", "latin1.jpg"): "caption_not_utf8", ("lonely", "lonely.jpg"): "failed_missing_caption",
                     ("orphan", "orphan.txt"): "failed_missing_image", ("twin", "twin.jpg"): None,
                     ("twin.png", "twin.png"): "duplicate_key"})
    for name, data in files.items():
        (src / name).write_bytes(data)
    return expected


def _img2dataset_shards(raw: Path) -> dict[tuple[str, str], str | None]:
    """Raw shards as img2dataset writes them (numbered keys, ``url``, no source), with one key in two shards
    and one key twice in a shard; returns the expected reason per ``(key, url file name)``."""
    rows, expected = [], {}
    cases = [(f"{stem}{ext}", data, CAPTION, reason) for stem, (ext, data, reason) in PICTURES.items()]
    cases += [(f"{stem}.jpg", _jpeg(i), text, reason) for i, (stem, (text, reason)) in enumerate(CAPTIONS.items())]
    cases += [("no-caption.jpg", _jpeg(20), None, "empty_caption")]
    for i, (name, data, caption, reason) in enumerate(cases):
        rows.append({"key": f"{i:09d}", "caption": caption, "url": f"http://127.0.0.1:9/{name}", "jpg": data,
                     "status": "success"})
        expected[f"{i:09d}", name] = reason
    second = [("000000000", "again.jpg", "success", "duplicate_key"),  # the key of shard 00000's first row
              ("000100001", "repeat-a.jpg", "success", None), ("000100001", "repeat-b.jpg", "success", "duplicate_key"),
              ("000100002", "gone.jpg", "failed_to_download", "failed_to_download")]
    more = [{"key": key, "caption": CAPTION, "url": f"http://127.0.0.1:9/{name}", "status": status,
             "jpg": _jpeg(30 + i) if status == "success" else None,
             "error_message": None if status == "success" else "HTTP Error 404"}
            for i, (key, name, status, _) in enumerate(second)]
    expected.update({(key, name): reason for key, name, _, reason in second})
    pq.write_table(raw_table(rows), raw / "00000.parquet")  # source stays null: pretokenize falls back on url
    pq.write_table(raw_table(more), raw / "00001.parquet")
    return expected


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("bad")
    expected = _folder(root / "pics")
    counts = ingest_folder(str(root / "pics"), str(root / "raw"), IngestConfig(samples_per_shard=10))
    expected.update(_img2dataset_shards(root / "raw"))
    captions = [make_sample(0, i, 32)["caption"] for i in range(200)] + [CAPTION, LONG_CAPTION[:100]]
    tokenizer, vae = write_tiny_models(root, captions)
    summary = run_pretokenize(str(root / "raw"), str(root / "shards"), tokenizer, vae, TEXT_SEQ_LEN,
                              PretokenizeConfig(batch_size=16, min_image_size=16))
    return {"root": root, "expected": expected, "ingest_counts": counts, "summary": summary}


def _read(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_every_input_is_one_row_or_one_reject_with_its_reason(run):
    root, expected = run["root"], run["expected"]
    assert run["ingest_counts"] == {"success": len(PICTURES) + len(CAPTIONS) + 1, "failed_missing_caption": 1,
                                    "failed_missing_image": 1, "duplicate_key": 1, "caption_not_utf8": 1}
    raw_rows = sum(pq.read_metadata(p).num_rows for p in (root / "raw").glob("*.parquet"))
    rows, rejects = _read(root / "shards" / "data"), _read(root / "shards" / "rejects")
    got = [((r["key"], r["source"].rsplit("/", 1)[-1]), None) for r in rows]
    got += [((r["key"], r["source"].rsplit("/", 1)[-1]), r["reason"]) for r in rejects]
    assert len(got) == len(dict(got))  # no input counted twice
    assert dict(got) == expected
    manifest = read_manifest(str(root / "shards"))
    assert raw_rows == len(expected) == manifest["pairs_in"] == len(rows) + len(rejects)
    assert manifest["num_rows"] == len(rows)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))
    assert run["summary"]["rejects_by_reason"] == dict(Counter(r for r in expected.values() if r))
    assert all(r["detail"] for r in rejects)


def test_long_caption_is_truncated_not_rejected(run):
    rows = {r["key"]: r for r in _read(run["root"] / "shards" / "data")}
    assert len(rows["cap_long"]["text_ids"]) == TEXT_SEQ_LEN
    assert rows["cap_long"]["caption"].startswith("a red circle on the left a red")


def test_bomb_is_never_decoded_and_odd_pictures_load_right():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for stem, (_, data, reason) in PICTURES.items():
        picture_size(data)
        pixels, got, _ = load_picture(data, 32, 16)
        assert got == reason, stem
        assert (pixels is None) == (reason is not None)
    assert picture_size(PICTURES["bomb_png"][1]) is None
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) < 200 * 1024  # 20000^2 RGB would be 1.2 GB

    exif, _, _ = load_picture(PICTURES["exif"][1], 32, 16)  # orientation applied: red on top, blue below
    assert exif[0, -1, 0] > 200 and exif[0, -1, 2] < 60
    assert exif[-1, 0, 2] > 200 and exif[-1, 0, 0] < 60
    grey16, _, _ = load_picture(PICTURES["grey16"][1], 32, 16)  # scaled to 8 bits, not clipped to white
    grey8, _, _ = load_picture(_encode(Image.fromarray(NOISE[..., 0].copy()), "PNG"), 32, 16)
    assert np.abs(grey16.astype(int) - grey8.astype(int)).max() <= 1
    rgb16, _, _ = load_picture(PICTURES["rgb16"][1], 32, 16)
    rgb8, _, _ = load_picture(_encode(Image.fromarray(NOISE), "PNG"), 32, 16)
    assert np.abs(rgb16.astype(int) - rgb8.astype(int)).max() <= 1
