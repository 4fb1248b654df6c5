"""Parquet shards (raw or token, local or s3://) opened as one Ray dataset: the reader every stage shares."""

from __future__ import annotations

from typing import Any

import ray

from pipelines import storage


def read_shards(paths: list[str], columns: list[str] | None = None, **read_kwargs: Any) -> ray.data.Dataset:
    """One Ray dataset over ``paths`` (all on one filesystem), reading only ``columns`` when given."""
    if not paths:
        raise FileNotFoundError("no Parquet shards to read")
    filesystem = storage.arrow_filesystem(paths[0])[0]
    dataset = ray.data.read_parquet([storage.arrow_filesystem(p)[1] for p in paths], filesystem=filesystem,
                                    **read_kwargs)
    return dataset.select_columns(columns) if columns else dataset
