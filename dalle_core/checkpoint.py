"""Self-describing model checkpoints: one file holds the model kind, its config and its weights.

The reference saved bare state dicts (or pickled hyper-parameters beside them), so loading needed the
constructor arguments from somewhere else. Here a checkpoint is ``{"kind", "config", "state_dict", "extra"}``
and :func:`load_model` rebuilds the model from the file alone. Files are read with ``weights_only=True``,
so ``extra`` must be plain data (numbers, strings, lists, dicts, tensors). Paths are local or any fsspec
URL (``s3://bucket/key``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import os
import tempfile
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from dalle_core.config import from_dict, to_dict

# kind -> (module, class name, config class name in dalle_core.config). Modules are imported lazily so that
# loading a dVAE never imports the transformer and vice versa.
MODEL_REGISTRY: dict[str, tuple[str, str, str]] = {
    "DiscreteVAE": ("dalle_core.vae", "DiscreteVAE", "VAEConfig"),
    "CLIP": ("dalle_core.clip", "CLIP", "CLIPConfig"),
    "DALLE": ("dalle_core.dalle", "DALLE", "DALLEConfig"),
}

_PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor)


TMP_PREFIX = ".tmp-"  # files being written; never a finished output


def write_local_atomically(path: str, data: bytes) -> None:
    """Creates parent folders and writes through a temporary file renamed into place, so a crash never leaves
    a truncated file under the final name."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to a local path (atomically) or an fsspec URL."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        write_local_atomically(fs_path, data)
        return
    with fs.open(fs_path, "wb") as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    """Reads a whole local file or fsspec URL; a missing file raises FileNotFoundError naming ``path``."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise FileNotFoundError(f"no such file: {path}")
    with fs.open(fs_path, "rb") as f:
        return f.read()


def file_sha256(path: str) -> str:
    """sha256 hex digest of a local file or fsspec URL, streamed (manifests record it to pin model files)."""
    digest = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_plain(value: Any, where: str) -> None:
    """Rejects objects that ``torch.load(weights_only=True)`` could not read back, at save time."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: keys must be str or int, got {type(key).__name__}")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN_TYPES):
        raise TypeError(f"{where}: {type(value).__name__} is not plain data (numbers, strings, lists, dicts, "
                        "tensors); convert it before saving")


def _unwrap(model: nn.Module) -> nn.Module:
    """DDP and DeepSpeed engines hold the real model in ``.module``; save that, not the wrapper."""
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def save_model(model: nn.Module, path: str, extra: dict | None = None) -> str:
    """Saves ``model`` (a registered kind with a dataclass ``.config``) to ``path``; returns the sha256 of the
    bytes written, so callers can record it without reading the file back."""
    model = _unwrap(model)
    kind = type(model).__name__
    if kind not in MODEL_REGISTRY:
        raise ValueError(f"cannot save {kind}: not a registered model kind ({sorted(MODEL_REGISTRY)})")
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"cannot save {kind}: its .config must be a config dataclass, got {type(config).__name__}")
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    payload = {
        "kind": kind,
        "config": to_dict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_model_with_extra(path: str, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuilds the model saved at ``path`` (in eval mode) and returns it with the saved ``extra`` dict."""
    data = read_bytes(path)
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from exc
    missing = {"kind", "config", "state_dict"} - set(payload if isinstance(payload, dict) else ())
    if missing:
        raise ValueError(f"{path}: not a self-describing checkpoint, missing {sorted(missing)}")
    kind = payload["kind"]
    if kind not in MODEL_REGISTRY:
        raise ValueError(f"{path}: unknown model kind {kind!r}, expected one of {sorted(MODEL_REGISTRY)}")
    module_name, class_name, config_name = MODEL_REGISTRY[kind]
    config_cls = getattr(importlib.import_module("dalle_core.config"), config_name)
    model_cls = getattr(importlib.import_module(module_name), class_name)
    config = from_dict(config_cls, payload["config"], kind)
    model = model_cls(config)
    model.load_state_dict(payload["state_dict"])
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return model.eval(), payload.get("extra") or {}


def load_model(path: str, map_location: Any = "cpu") -> nn.Module:
    """Rebuilds the model saved at ``path`` without needing its constructor arguments (eval mode)."""
    return load_model_with_extra(path, map_location)[0]
