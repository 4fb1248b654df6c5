"""Captions of raw shards, read with Ray Data, for training the tokenizer."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from dalle_core.tokenizer import normalize_caption
from pipelines import storage
from pipelines.data.raw import SUCCESS, list_raw_shards
from pipelines.data.shards import read_shards


def _normalise(batch: pa.Table) -> pa.Table:
    ok = pc.fill_null(pc.equal(batch.column("status"), SUCCESS), False) if "status" in batch.column_names else None
    rows = batch.filter(ok) if ok is not None else batch
    captions = [normalize_caption(c) for c in rows.column("caption").to_pylist() if isinstance(c, str)]
    return pa.table({"caption": pa.array([c for c in captions if c], pa.string())})


def iter_captions(raw: str, batch_size: int = 4096) -> Iterator[str]:
    """Normalised, non-empty captions of the successful rows of every raw shard directly under ``raw``."""
    shards = list_raw_shards(raw)
    names = storage.parquet_columns(shards[0])
    columns = [c for c in ("caption", "status") if c in names]
    if "caption" not in columns:
        raise ValueError(f"{shards[0]} has no caption column (columns: {names})")
    ds = read_shards(shards, columns=columns).map_batches(_normalise, batch_format="pyarrow", batch_size=batch_size)
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        yield from batch.column("caption").to_pylist()
