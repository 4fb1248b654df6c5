"""s3:// end to end against moto's S3 server on loopback (no patched client): synthetic set, tokenizer,
pretokenize, and a folder ingest; and the atomic-write rules the resume logic relies on."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import write_tiny_models
from PIL import Image

from pipelines import storage
from pipelines.config import IngestConfig, PretokenizeConfig, SyntheticConfig
from pipelines.data.captions import iter_captions
from pipelines.data.ingest import ingest_folder
from pipelines.data.manifest import read_manifest
from pipelines.data.pretokenize import run_pretokenize
from pipelines.data.synthetic import iter_samples, write_synthetic

REPO = Path(__file__).resolve().parents[1]


def test_s3_round_trip(s3_bucket, ray_cluster, tmp_path):
    config = SyntheticConfig(num_samples=90, samples_per_shard=30, seed=2)
    raw, shards = f"{s3_bucket}/raw", f"{s3_bucket}/shards"
    counts = write_synthetic(config, raw)
    assert storage.list_files(raw, (".parquet",)) == [f"{raw}/part-0000{i}.parquet" for i in range(3)]
    assert storage.list_files(f"{raw}/holdout", (".parquet",))
    captions = sorted(iter_captions(raw))
    assert len(captions) == counts["train"]

    # tokenizer trained by the job, straight from and to s3://
    sys.path.insert(0, str(REPO / "jobs"))
    import train_tokenizer

    assert train_tokenizer.main(["--input", raw, "--output", f"{s3_bucket}/tok/bpe.model", "--vocab-size", "128"]) == 0
    _, vae = write_tiny_models(tmp_path, captions)
    storage.write_bytes(f"{s3_bucket}/vae/vae.pt", Path(vae).read_bytes())

    summary = run_pretokenize(raw, shards, f"{s3_bucket}/tok/bpe.model", f"{s3_bucket}/vae/vae.pt", 16,
                              PretokenizeConfig(batch_size=32))
    manifest = read_manifest(shards)
    assert summary["pairs_out"] == manifest["num_rows"] == counts["train"]
    keys = sorted(k for s in manifest["shards"]
                  for k in storage.read_parquet(f"{shards}/{s['path']}", ["key"]).column("key").to_pylist())
    assert keys == sorted(r["key"] for r in iter_samples(config))
    again = run_pretokenize(raw, shards, f"{s3_bucket}/tok/bpe.model", f"{s3_bucket}/vae/vae.pt", 16,
                            PretokenizeConfig(batch_size=32))
    assert again["shards_skipped"] == 3


def test_folder_ingest_to_s3(s3_bucket, ray_cluster, tmp_path):
    src = tmp_path / "pics"
    src.mkdir()
    Image.new("RGB", (24, 20), (10, 200, 30)).save(src / "a.png")
    (src / "a.txt").write_text("a green square")
    Image.new("RGB", (24, 20)).save(src / "b.jpg")  # no caption
    (src / "c.txt").write_bytes(b"no picture")
    raw = f"{s3_bucket}/raw"
    counts = ingest_folder(str(src), raw, IngestConfig(samples_per_shard=2))
    assert counts == {"success": 1, "failed_missing_caption": 1, "failed_missing_image": 1}
    shards = storage.list_files(raw, (".parquet",))
    assert shards == [f"{raw}/part-00000.parquet", f"{raw}/part-00001.parquet"]
    rows = {r["key"]: r for s in shards for r in storage.read_parquet(s).to_pylist()}
    assert rows["a"]["status"] == "success" and rows["a"]["caption"] == "a green square"
    assert rows["a"]["jpg"] == (src / "a.png").read_bytes() and (rows["a"]["width"], rows["a"]["height"]) == (24, 20)
    assert rows["b"]["status"] == "failed_missing_caption" and rows["b"]["jpg"] == (src / "b.jpg").read_bytes()
    assert rows["c"]["status"] == "failed_missing_image" and "c.txt" in rows["c"]["error_message"]


def test_local_writes_are_atomic_and_listing_skips_temporaries(tmp_path):
    target = tmp_path / "a" / "b.parquet"
    storage.write_parquet(pa.table({"x": [1, 2, 3]}), str(target))
    assert pq.read_table(target).column("x").to_pylist() == [1, 2, 3]
    assert [p.name for p in target.parent.iterdir()] == ["b.parquet"]  # no temporary left behind
    (target.parent / ".tmp-123").write_bytes(b"half")
    (target.parent / "_tmp").mkdir()
    (target.parent / "_tmp" / "0.parquet").write_bytes(b"")
    assert storage.list_files(str(target.parent), (".parquet",)) == [str(target)]
    assert storage.remove_stale_temporaries(str(target.parent)) == 1
    target.write_bytes(target.read_bytes()[:20])  # a truncated file is not a finished one
    assert storage.parquet_metadata(str(target)) is None
