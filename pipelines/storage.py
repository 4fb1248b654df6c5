"""Paths that are a local folder or any fsspec URL (``s3://bucket/prefix``), the same way for every job.

S3 settings come from the usual environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for S3-compatible stores). :func:`filesystem` copies them into the s3fs object itself,
so the filesystem that Ray pickles to its workers carries them even where a worker's environment lacks them.

Outputs are written whole or not at all: local files go through a temporary name renamed into place, object
stores publish an object only when its single upload completes. A rerun can therefore trust every file it
finds under a final name.
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

from dalle_core.checkpoint import TMP_PREFIX, write_local_atomically


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _s3_options_from_env() -> dict[str, Any]:
    options: dict[str, Any] = {}
    if os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret"] = os.environ["AWS_SECRET_ACCESS_KEY"]
    return options


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path inside it (no scheme)."""
    if path.startswith(("s3://", "s3a://")):
        return fsspec.core.url_to_fs(path, **_s3_options_from_env())
    return fsspec.core.url_to_fs(path)


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


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


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


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    with fs.open(inner, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file atomically (see the module docstring), creating local parent folders."""
    fs, inner = filesystem(path)
    if isinstance(fs, LocalFileSystem):
        write_local_atomically(inner, data)
        return
    fs.pipe_file(inner, data)


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

