"""The one read / atomic write / sha256 helper for every artifact, local or any fsspec URL (``s3://``).

Outputs are written whole or not at all: local files go through a temporary name renamed into place (with the
mode a plain write would give, so other users of a shared volume can read them), object stores publish an
object only when its single upload completes. A rerun can therefore trust every file it finds under a final
name. S3 settings come from the usual environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for S3-compatible stores) and are copied into the filesystem object itself, so a
filesystem pickled to a Ray worker carries them even where that worker's environment lacks them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_PREFIX = ".tmp-"  # files being written; never a finished output


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def local_file_atomically(path: str) -> Iterator[BinaryIO]:
    """A file to write ``path`` through: created beside it (parent folders made) and renamed into place when the
    block ends, so a crash never leaves a truncated file under the final name."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would respect the umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_local_atomically(path: str, data: bytes) -> None:
    """Writes a whole local file atomically (:func:`local_file_atomically`)."""
    with local_file_atomically(path) as f:
        f.write(data)


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file: atomically on a local disk, as one upload to an object store."""
    fs, inner = filesystem(path)
    if isinstance(fs, LocalFileSystem):
        write_local_atomically(inner, data)
        return
    fs.pipe_file(inner, data)


def copy_file(source: str, destination: str, chunk_bytes: int = 16 << 20) -> int:
    """Copies one file and returns the bytes that passed through this process: none where both ends are on one
    object store (S3's server-side CopyObject), else the file streamed in chunks (never whole in memory); a local
    destination appears atomically, as :func:`write_bytes` writes."""
    src_fs, src = filesystem(source)
    dst_fs, dst = filesystem(destination)
    if not src_fs.exists(src):
        raise FileNotFoundError(f"no such file: {source}")
    if src_fs is dst_fs and not isinstance(dst_fs, LocalFileSystem):
        dst_fs.copy(src, dst)
        return 0
    copied = 0
    # local: renamed into place at the end; an object store: a multipart upload, published when it closes
    writing = local_file_atomically(dst) if isinstance(dst_fs, LocalFileSystem) else dst_fs.open(dst, "wb")
    with src_fs.open(src, "rb") as reader, writing as writer:
        while block := reader.read(chunk_bytes):
            writer.write(block)
            copied += len(block)
    return copied


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_bytes(path: str) -> bytes:
    """Reads a whole local file or fsspec URL; a missing file raises FileNotFoundError naming ``path``."""
    fs, inner = filesystem(path)
    if not fs.exists(inner):
        raise FileNotFoundError(f"no such file: {path}")
    with fs.open(inner, "rb") as f:
        return f.read()


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


def file_sha256(path: str) -> str:
    """sha256 hex digest of a local file or fsspec URL, streamed (manifests record it to pin model files)."""
    digest = hashlib.sha256()
    fs, inner = filesystem(path)
    with fs.open(inner, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
