"""Folders, listings, JSON and Parquet on a local disk or any fsspec URL (``s3://bucket/prefix``), for every job.

Whole-file reads and writes are :mod:`dalle_core.io`'s (atomic local writes, S3 settings from the environment);
this module adds what the Ray side needs on top: Arrow filesystems for Ray Data, listings, Parquet and JSON.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dalle_core.io import TMP_PREFIX, exists, filesystem, read_bytes, write_bytes

__all__ = ["arrow_filesystem", "basename", "exists", "filesystem", "join", "list_files", "parquet_columns",
           "parquet_metadata", "read_bytes", "read_json", "read_parquet", "remove_stale_temporaries", "stem",
           "write_bytes", "write_json", "write_parquet"]


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def arrow_filesystem(path: str) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """What Ray Data's readers want: ``(None, local path)`` or a pyarrow wrapper of the fsspec filesystem."""
    fs, inner = filesystem(path)
    if isinstance(fs, LocalFileSystem):
        return None, inner
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), inner


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def stem(path: str) -> str:
    """File name without its last extension: ``s3://b/raw/00003.parquet`` -> ``00003``."""
    return basename(path).rsplit(".", 1)[0]


def _with_protocol(fs: fsspec.AbstractFileSystem, inner: str, like: str) -> str:
    return inner if is_local(like) else fs.unstrip_protocol(inner)


def list_files(path: str, suffixes: tuple[str, ...], recursive: bool = False) -> list[str]:
    """Sorted files under a folder (or the file itself) whose names end with one of ``suffixes``; names
    starting with ``.`` or ``_`` (temporaries, img2dataset's ``_tmp``) are skipped."""
    fs, inner = filesystem(path)
    if fs.isfile(inner):
        return [path]
    if not fs.isdir(inner):
        raise FileNotFoundError(f"no such file or folder: {path}")
    found = fs.find(inner) if recursive else [p for p in fs.ls(inner, detail=False) if fs.isfile(p)]
    keep = []
    for p in found:
        rel = p[len(inner.rstrip("/")) + 1:] if p.startswith(inner.rstrip("/")) else basename(p)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if p.lower().endswith(suffixes):
            keep.append(_with_protocol(fs, p, path))
    return sorted(keep)


def write_parquet(table: pa.Table, path: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(path, buf.getvalue())


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def parquet_metadata(path: str) -> pq.FileMetaData | None:
    """The footer of a complete Parquet file, or None when the file is missing or unreadable (truncated)."""
    fs, inner = filesystem(path)
    try:
        with fs.open(inner, "rb") as f:
            return pq.read_metadata(f)
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None


def parquet_columns(path: str) -> list[str]:
    fs, inner = filesystem(path)
    with fs.open(inner, "rb") as f:
        return pq.read_schema(f).names


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, inner = filesystem(path)
    with fs.open(inner, "rb") as f:
        return pq.read_table(f, columns=columns)


def remove_stale_temporaries(folder: str) -> int:
    """Deletes temporaries a killed writer left in a local folder; returns how many."""
    fs, inner = filesystem(folder)
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(inner):
        return 0
    stale = [n for n in os.listdir(inner) if n.startswith(TMP_PREFIX)]
    for name in stale:
        os.remove(os.path.join(inner, name))
    return len(stale)

