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
from typing import Any

import torch
from torch import nn

from dalle_core.config import from_dict, to_dict
from dalle_core.io import read_bytes, write_bytes

# kind -> (module, class name, config class name in dalle_core.config). Modules are imported lazily so that
# loading a dVAE never imports the transformer and vice versa.
MODEL_REGISTRY: dict[str, tuple[str, str, str]] = {
    "DiscreteVAE": ("dalle_core.vae", "DiscreteVAE", "VAEConfig"),
    "CLIP": ("dalle_core.clip", "CLIP", "CLIPConfig"),
    "DALLE": ("dalle_core.dalle", "DALLE", "DALLEConfig"),
}

_PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor)


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
    return model_from_bytes(read_bytes(path), map_location, where=path)


def model_from_bytes(data: bytes, map_location: Any = "cpu", where: str = "checkpoint") -> tuple[nn.Module, dict]:
    """What :func:`load_model_with_extra` does, from the file's bytes (a model shipped to Ray actors)."""
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{where}: not a readable checkpoint ({exc})") from exc
    missing = {"kind", "config", "state_dict"} - set(payload if isinstance(payload, dict) else ())
    if missing:
        raise ValueError(f"{where}: not a self-describing checkpoint, missing {sorted(missing)}")
    kind = payload["kind"]
    if kind not in MODEL_REGISTRY:
        raise ValueError(f"{where}: unknown model kind {kind!r}, expected one of {sorted(MODEL_REGISTRY)}")
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
