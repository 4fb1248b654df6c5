"""Self-describing model checkpoints: one file holds the model kind, its config and its weights.

The reference saved bare state dicts (or pickled hyper-parameters beside them), so loading needed the
constructor arguments from somewhere else. Here a checkpoint is ``{"kind", "config", "state_dict", "extra"}``
and :func:`load_model` rebuilds the model from the file alone, in one of two formats chosen by the file name:

* ``*.safetensors`` (what the trainers publish and import_model writes): the weights as safetensors, with
  kind, config and ``extra`` as JSON in its metadata. Loading runs no pickle at all and a local file is
  memory-mapped, so a model moved between machines is safe to open and cheap to load.
* anything else (``*.pt``, the format before safetensors): a ``torch.save`` of the dict, read with
  ``weights_only=True``.

Loading looks at the bytes, not the name, so a renamed file still loads. ``extra`` must be plain data (numbers,
strings, lists, dicts; tensors only in ``.pt`` files). Paths are local or any fsspec URL (``s3://bucket/key``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import safetensors.torch
import torch
from torch import nn

from dalle_core.config import from_dict, to_dict
from dalle_core.io import filesystem, read_bytes, write_bytes

# kind -> (module, class name, name of its config class in that module). Modules are imported lazily so that
# loading a dVAE never imports the transformer and vice versa. The image tokenizers (DiscreteVAE, OpenAIDVAE,
# VQGAN) share one interface: ``num_tokens``, ``image_size``, ``image_seq_len``, ``get_codebook_indices`` and
# ``decode`` on pictures in [0, 1], each mapping pixels to its own range inside.
MODEL_REGISTRY: dict[str, tuple[str, str, str]] = {
    "DiscreteVAE": ("dalle_core.vae", "DiscreteVAE", "VAEConfig"),
    "OpenAIDVAE": ("dalle_core.openai_dvae", "OpenAIDVAE", "OpenAIDVAEConfig"),
    "VQGAN": ("dalle_core.vqgan", "VQGAN", "VQGANConfig"),
    "CLIP": ("dalle_core.clip", "CLIP", "CLIPConfig"),
    "OpenCLIP": ("dalle_core.openclip", "OpenCLIP", "OpenCLIPConfig"),
    "DALLE": ("dalle_core.dalle", "DALLE", "DALLEConfig"),
}

_PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor)
SAFETENSORS_SUFFIX = ".safetensors"
_FORMAT = "dalle-ray/1"  # metadata["format"] of our safetensors files, to tell them from other safetensors


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
    return save_weights(type(model).__name__, getattr(model, "config", None), model.state_dict(), path, extra)


def save_weights(kind: str, config: Any, state: dict[str, torch.Tensor], path: str, extra: dict | None = None) -> str:
    """:func:`save_model` from weights already in hand: what a trainer writes from the weights it gathered out of
    ZeRO's partitions, without building a model to hold them. Tensors keep their dtype (bf16 weights make a file
    half the size, loaded into the model's fp32 parameters)."""
    if kind not in MODEL_REGISTRY:
        raise ValueError(f"cannot save {kind}: not a registered model kind ({sorted(MODEL_REGISTRY)})")
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"cannot save {kind}: its .config must be a config dataclass, got {type(config).__name__}")
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    state = _own_storage({k: v.detach().cpu() for k, v in state.items()})
    if path.endswith(SAFETENSORS_SUFFIX):
        try:
            metadata = {"format": _FORMAT, "kind": kind, "config": json.dumps(to_dict(config)),
                        "extra": json.dumps(extra)}
        except TypeError as exc:
            raise TypeError(f"extra: {exc}; a {SAFETENSORS_SUFFIX} file keeps only JSON data beside its "
                            "weights (use a .pt path for tensors)") from exc
        data = safetensors.torch.save(state, metadata=metadata)
    else:
        buffer = io.BytesIO()
        torch.save({"kind": kind, "config": to_dict(config), "state_dict": state, "extra": extra}, buffer)
        data = buffer.getvalue()
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights share storage, which safetensors refuses to write: later names get a copy (tying is the
    model's constructor's business; ``load_state_dict`` fills both)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        shared = ident in seen or not value.is_contiguous()
        out[key] = value.clone(memory_format=torch.contiguous_format) if shared else value
        seen.add(ident)
    return out


def _is_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header (torch files start ``PK`` or
    with a pickle opcode)."""
    return len(head) >= 9 and head[8:9] == b"{"


def _safetensors_payload(metadata: dict[str, str] | None, state: dict[str, torch.Tensor], where: str) -> dict:
    if not metadata or metadata.get("format") != _FORMAT:
        raise ValueError(f"{where}: a safetensors file, but not one of this project's self-describing "
                         f"checkpoints (metadata format {(metadata or {}).get('format')!r}, expected {_FORMAT!r})")
    try:
        return {"kind": metadata["kind"], "config": json.loads(metadata["config"]), "state_dict": state,
                "extra": json.loads(metadata.get("extra") or "{}")}
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: unreadable checkpoint metadata ({exc!r})") from exc


def load_model_with_extra(path: str, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuilds the model saved at ``path`` (in eval mode) and returns it with the saved ``extra`` dict. A local
    safetensors file is memory-mapped rather than read into memory first."""
    if "://" in path:  # streamed to a local file first: a remote model is never held whole in memory twice
        with tempfile.TemporaryDirectory(prefix="dalle-model-") as folder:
            local = os.path.join(folder, os.path.basename(path) or "model")
            fs, inner = filesystem(path)
            if not fs.exists(inner):
                raise FileNotFoundError(f"no such file: {path}")
            fs.get_file(inner, local)
            return _load_local(local, map_location, where=path)
    return _load_local(path, map_location, where=path)


def _load_local(path: str, map_location: Any, where: str) -> tuple[nn.Module, dict]:
    if os.path.isfile(path):
        with open(path, "rb") as f:
            local_safetensors = _is_safetensors(f.read(9))
        if local_safetensors:
            try:
                with safetensors.safe_open(path, framework="pt") as f:
                    metadata, state = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
            except Exception as exc:
                raise ValueError(f"{where}: not a readable safetensors file ({exc})") from exc
            return _model_from_payload(_safetensors_payload(metadata, state, where), map_location, where)
    return model_from_bytes(read_bytes(path), map_location, where=where)


def model_from_bytes(data: bytes, map_location: Any = "cpu", where: str = "checkpoint") -> tuple[nn.Module, dict]:
    """What :func:`load_model_with_extra` does, from the file's bytes (a model shipped to Ray actors)."""
    if _is_safetensors(data[:9]):
        try:
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            state = safetensors.torch.load(data)
        except Exception as exc:
            raise ValueError(f"{where}: not a readable safetensors file ({exc})") from exc
        return _model_from_payload(_safetensors_payload(header.get("__metadata__"), state, where), map_location,
                                   where)
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{where}: not a readable checkpoint ({exc})") from exc
    missing = {"kind", "config", "state_dict"} - set(payload if isinstance(payload, dict) else ())
    if missing:
        raise ValueError(f"{where}: not a self-describing checkpoint, missing {sorted(missing)}")
    return _model_from_payload(payload, map_location, where)


def _model_from_payload(payload: dict, map_location: Any, where: str) -> tuple[nn.Module, dict]:
    kind = payload["kind"]
    if kind not in MODEL_REGISTRY:
        raise ValueError(f"{where}: unknown model kind {kind!r}, expected one of {sorted(MODEL_REGISTRY)}")
    module_name, class_name, config_name = MODEL_REGISTRY[kind]
    module = importlib.import_module(module_name)
    config_cls, model_cls = getattr(module, config_name), getattr(module, class_name)
    config = from_dict(config_cls, payload["config"], kind)
    with without_random_init():
        model = model_cls(config)
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    # assign: the parameters become the loaded tensors, instead of a random init they are then copied into
    model.load_state_dict(payload["state_dict"], assign=True)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in dtypes and tensor.dtype != dtypes[name]:  # a bf16 file: the model computes in its own dtype
            tensor.data = tensor.data.to(dtypes[name])
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return model.eval(), payload.get("extra") or {}


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def without_random_init() -> Iterator[None]:
    """Builds modules without drawing their random init (``torch.nn.init`` does nothing inside): for a model whose
    every weight is loaded next, the init is wasted time (seconds to minutes at a billion parameters) and draws
    from the caller's RNG stream."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def tensors_from_bytes(data: bytes, where: str = "checkpoint") -> dict[str, Any]:
    """The tensors of a plain weights file from elsewhere: safetensors, or a torch file of tensors and plain
    containers (read with ``weights_only=True``, so no code in it runs)."""
    try:
        if _is_safetensors(data[:9]):
            return safetensors.torch.load(data)
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{where}: not a readable weights file ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"{where}: holds a {type(loaded).__name__}, not a dict of tensors")
    return loaded


def load_model(path: str, map_location: Any = "cpu") -> nn.Module:
    """Rebuilds the model saved at ``path`` without needing its constructor arguments (eval mode)."""
    return load_model_with_extra(path, map_location)[0]
