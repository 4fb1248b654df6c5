"""Ingest: a URL list through img2dataset against a loopback HTTP server (every bad case counted, and turned
into rejects with a reason by pretokenize), a folder of image + .txt pairs, and WebDataset tars."""

from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import write_tiny_models
from PIL import Image

from pipelines.config import IngestConfig, PretokenizeConfig
from pipelines.data.images import load_picture
from pipelines.data.ingest import choose_caption, ingest_folder, ingest_url_list, ingest_webdataset
from pipelines.data.pretokenize import run_pretokenize
from pipelines.data.synthetic import make_sample

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


SERVED = {
    "good1.jpg": _encode(Image.fromarray(RGB), "JPEG"),
    "good2.png": _encode(Image.fromarray(RGB[::-1].copy()), "PNG"),
    "gray.png": _encode(Image.fromarray(RGB[..., 0].copy()), "PNG"),
    "rgba.png": _encode(Image.fromarray(np.dstack([RGB, np.full((40, 48), 255, np.uint8)])), "PNG"),
    "cmyk.jpg": _encode(Image.fromarray(RGB).convert("CMYK"), "JPEG"),
    "corrupt.jpg": b"\xff\xd8\xff\xe0" + b"this is not a picture" * 20,
}


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("www")
    for name, data in SERVED.items():
        (folder / name).write_bytes(data)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    captions = [make_sample(0, i, 32)["caption"] for i in range(200)] + ["a photo of noise", "grey noise"]
    return write_tiny_models(tmp_path_factory.mktemp("models"), captions)


def test_url_list_every_bad_case_counted(http_server, models, tmp_path, ray_cluster):
    names = [*SERVED, "missing.jpg"]
    pd.DataFrame({"url": [f"{http_server}/{n}" for n in names], "caption": [f"photo {n}" for n in names]}
                 ).to_parquet(tmp_path / "urls.parquet")
    config = IngestConfig(thread_count=4, timeout=5, image_size=64)
    counts = ingest_url_list(str(tmp_path / "urls.parquet"), str(tmp_path / "raw"), config)
    assert counts == {"success": 5, "failed_to_download": 1, "failed_to_resize": 1}
    table = pq.read_table(next((tmp_path / "raw").glob("*.parquet")))
    rows = {r["url"].rsplit("/", 1)[1]: r for r in table.to_pylist()}
    assert rows["missing.jpg"]["status"] == "failed_to_download" and "404" in rows["missing.jpg"]["error_message"]
    assert rows["corrupt.jpg"]["status"] == "failed_to_resize"
    # the tricky-but-valid pictures arrive as pictures of the right content, in RGB after load_picture
    for name in ("good1.jpg", "cmyk.jpg", "rgba.png"):
        pixels, reason, _ = load_picture(rows[name]["jpg"], 32, 16)
        assert reason is None and pixels.shape == (32, 32, 3)
        reference, _, _ = load_picture(SERVED["good1.jpg"], 32, 16)
        assert np.abs(pixels.astype(int) - reference.astype(int)).mean() < 12, name
    gray, _, _ = load_picture(rows["gray.png"]["jpg"], 32, 16)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()

    tokenizer, vae = models
    summary = run_pretokenize(str(tmp_path / "raw"), str(tmp_path / "shards"), tokenizer, vae, 16,
                              PretokenizeConfig(batch_size=8))
    assert summary["pairs_in"] == 7 and summary["pairs_out"] == 5
    assert summary["rejects_by_reason"] == {"failed_to_download": 1, "failed_to_resize": 1}
    rejects = pq.read_table(tmp_path / "shards" / "rejects" / "00000.parquet").to_pylist()
    assert {r["source"].rsplit("/", 1)[1]: r["reason"] for r in rejects} == {
        "missing.jpg": "failed_to_download", "corrupt.jpg": "failed_to_resize"}


def _jpeg(seed: int) -> bytes:
    return _encode(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                   "JPEG")


def test_folder_pairs(tmp_path: Path, models, ray_cluster):
    src = tmp_path / "pics"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(_jpeg(1))
    (src / "a.txt").write_text("first caption\nsecond caption\n\nthird caption\n")
    (src / "b.png").write_bytes(_encode(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG"))
    (src / "b.txt").write_text("only one")
    (src / "sub" / "e.JPG").write_bytes(_jpeg(2))
    (src / "sub" / "e.txt").write_text("nested caption")
    (src / "c.jpg").write_bytes(_jpeg(3))  # no caption file
    (src / "d.txt").write_text("no picture")  # no image
    (src / "f.jpg").write_bytes(_jpeg(4))
    (src / "f.txt").write_text("  \n")  # empty caption
    config = IngestConfig(samples_per_shard=4, caption_seed=0)
    counts = ingest_folder(str(src), str(tmp_path / "raw"), config)
    assert counts == {"success": 4, "failed_missing_caption": 1, "failed_missing_image": 1}
    shards = sorted((tmp_path / "raw").glob("*.parquet"))
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet"]
    rows = {r["key"]: r for p in shards for r in pq.read_table(p).to_pylist()}
    assert set(rows) == {"a", "b", "c", "d", "f", "sub/e"}
    assert rows["a"]["caption"] == choose_caption("first caption\nsecond caption\n\nthird caption", "a", 0)
    assert rows["a"]["caption"] in {"first caption", "second caption", "third caption"}
    assert rows["sub/e"]["caption"] == "nested caption" and rows["b"]["width"] == 32
    picks = {choose_caption("l1\nl2\nl3\nl4", f"k{i}", 0) for i in range(40)}
    assert picks == {"l1", "l2", "l3", "l4"}  # a line chosen per sample, not always the first
    again = tmp_path / "again"
    ingest_folder(str(src), str(again), config)
    assert pq.read_table(shards[0]).equals(pq.read_table(again / "part-00000.parquet"))

    tokenizer, vae = models
    summary = run_pretokenize(str(tmp_path / "raw"), str(tmp_path / "shards"), tokenizer, vae, 16,
                              PretokenizeConfig(batch_size=8))
    assert summary["pairs_out"] == 3
    assert summary["rejects_by_reason"] == {"empty_caption": 1, "failed_missing_caption": 1,
                                            "failed_missing_image": 1}


def test_webdataset_tars(tmp_path: Path, ray_cluster):
    tars = tmp_path / "wds"
    tars.mkdir()
    members = {"s1.jpg": _jpeg(5), "s1.txt": b"tar caption one", "s2.png": _encode(Image.new("RGB", (20, 20)), "PNG"),
               "s2.txt": b"tar caption two", "s3.jpg": _jpeg(6), "s3.json": b"{}", "s4.jpg": _jpeg(7),
               "s4.txt": "caf\u00e9".encode("latin-1")}
    with tarfile.open(tars / "shard-000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    counts = ingest_webdataset(str(tars), str(tmp_path / "raw"), IngestConfig())
    assert counts == {"success": 2, "failed_missing_caption": 1, "caption_not_utf8": 1}
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "raw" / "shard-000.parquet").to_pylist()}
    assert rows["s1"]["caption"] == "tar caption one" and rows["s1"]["jpg"] == members["s1.jpg"]
    assert rows["s2"]["width"] == 20 and rows["s3"]["status"] == "failed_missing_caption"
    assert rows["s1"]["source"].endswith("shard-000.tar#s1")
    assert rows["s4"]["caption"] is None and "not UTF-8" in rows["s4"]["error_message"]
