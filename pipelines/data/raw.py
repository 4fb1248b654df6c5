"""The raw-shard layout every source is turned into: img2dataset's Parquet columns, one row per pair.

``key, caption, url, jpg (image bytes, any format PIL reads), width, height, status, error_message, source``
plus whatever a source adds (the synthetic set adds its ground truth). img2dataset's own output has no
``source`` column; readers fall back on ``url``. Rows that failed upstream stay in the shard with
``status != "success"`` and an ``error_message``, so pretokenize can count them as rejects instead of losing
them.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipelines import storage

SUCCESS = "success"
DUPLICATE_KEY = "duplicate_key"  # a status (folder ingest) and a reject reason (pretokenize): the key is used already

RAW_FIELDS = [
    pa.field("key", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("url", pa.string()),
    pa.field("jpg", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("status", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("source", pa.string()),
]


def raw_table(rows: list[dict[str, Any]], extra: list[pa.Field] | None = None) -> pa.Table:
    """Rows as a table with the raw schema (missing values become nulls); ``extra`` adds typed columns."""
    schema = pa.schema(RAW_FIELDS + list(extra or []))
    return pa.Table.from_pylist(rows, schema=schema)


def list_raw_shards(path: str) -> list[str]:
    """The raw Parquet shards directly under ``path`` (not in sub-folders such as the synthetic ``holdout/``),
    or ``path`` itself when it is one file."""
    shards = storage.list_files(path, (".parquet",))
    if not shards:
        raise FileNotFoundError(f"no raw Parquet shards (*.parquet) in {path}")
    return shards
