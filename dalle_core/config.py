"""Typed configuration of the models, and the loader every config section uses.

A section is a dataclass whose fields declare their own bounds (:func:`bound`); :meth:`Section.validate` checks
them all generically and then the few rules that tie two fields together (:meth:`Section.check`). Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` naming the dotted field (``dalle.depth``), so a
typo fails before any cluster resource is taken. The whole-chain config (paths, workers, stages) composes these
sections in :mod:`pipelines.config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ATTN_TYPES = ("full", "axial_row", "axial_col", "conv_like")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 where the device computes it natively, else fp32


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or out of range; the message names the field."""


def check(ok: bool, name: str, message: str) -> None:
    """Raises ConfigError ``<name>: <message>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name}: {message}")


def bound(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A dataclass field with its bounds: ``ge``, ``gt``, ``le``, ``lt`` (numbers), ``choices``, ``nonempty``.
    A subclass that only changes a default may redeclare the field plainly: the bounds are inherited."""
    return field(default=default, default_factory=factory, metadata=rules)


def _rules(cls: type) -> dict[str, dict[str, Any]]:
    """Each field's bounds, the most derived declaration that has any winning."""
    found: dict[str, dict[str, Any]] = {}
    for klass in reversed(cls.__mro__):
        for f in getattr(klass, "__dataclass_fields__", {}).values():
            if f.metadata:
                found[f.name] = dict(f.metadata)
    return found


def _check_rules(value: Any, rules: dict[str, Any], name: str) -> None:
    if "choices" in rules:
        check(value in rules["choices"], name, f"must be one of {rules['choices']}, got {value!r}")
    if rules.get("nonempty"):
        check(len(value) > 0, name, "must not be empty")
    ge, gt, le, lt = (rules.get(k) for k in ("ge", "gt", "le", "lt"))
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    high = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
    ok = ((ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le)
          and (lt is None or value < lt))
    if low and high:
        check(ok, name, f"must be in {low}, {high}, got {value}")
    elif low:
        check(ok, name, f"must be {'>=' if ge is not None else '>'} {low[1:]}, got {value}")
    elif high:
        check(ok, name, f"must be {'<=' if le is not None else '<'} {high[:-1]}, got {value}")


class Section:
    """Base of every config dataclass: generic bound checks, then the section's own cross-field rules."""

    def validate(self, name: str = "") -> None:
        name = name or type(self).__name__
        for key, rules in _rules(type(self)).items():
            _check_rules(getattr(self, key), rules, f"{name}.{key}")
        self.check(name)

    def check(self, name: str) -> None:
        """Rules that involve more than one field (nothing by default)."""


@dataclass
class TokenizerConfig(Section):
    """youtokentome BPE over normalised captions."""

    vocab_size: int = bound(256, ge=8)
    text_seq_len: int = bound(16, ge=1)
    bpe_dropout: float = bound(0.0, ge=0.0, lt=1.0)
    model_path: str = ""


# The image tokenizers a checkpoint at ``paths.vae`` may hold: ours (trained by jobs/train_vae.py) and the two
# the field released, imported once with jobs/import_model.py.
IMAGE_TOKENIZER_KINDS = ("DiscreteVAE", "OpenAIDVAE", "VQGAN")


@dataclass
class VAEConfig(Section):
    """The image tokenizer (stage one): ``image_size / 2**num_layers`` codes per side.

    ``kind`` names what ``paths.vae`` holds. For ``DiscreteVAE`` every field describes the model jobs/train_vae.py
    trains; for an imported tokenizer only ``kind``, ``image_size``, ``num_tokens``, ``num_layers`` (its
    downsamplings: 3 for OpenAI's dVAE, 4 for a VQGAN f16) and ``channels`` matter, and pretokenize checks them
    against the file."""

    kind: str = bound("DiscreteVAE", choices=IMAGE_TOKENIZER_KINDS)
    image_size: int = 32
    num_tokens: int = bound(64, ge=2, le=65535)
    codebook_dim: int = bound(64, ge=1)
    num_layers: int = bound(2, ge=1)
    num_resnet_blocks: int = bound(1, ge=0)
    hidden_dim: int = bound(64, ge=1)
    channels: int = bound(3, ge=1)
    temperature: float = bound(0.9, gt=0)
    straight_through: bool = False
    kl_div_loss_weight: float = bound(0.0, ge=0)
    diversity_loss_weight: float = bound(0.0, ge=0)
    smooth_l1_loss: bool = False

    @property
    def fmap_size(self) -> int:
        return self.image_size // 2**self.num_layers

    @property
    def image_seq_len(self) -> int:
        return self.fmap_size**2

    def check(self, name: str) -> None:
        size = self.image_size
        check(size >= 8 and size & (size - 1) == 0, f"{name}.image_size", f"must be a power of 2 >= 8, got {size}")
        check(self.fmap_size >= 1, f"{name}.num_layers", f"too many for image_size {size}")


@dataclass
class DALLEConfig(Section):
    """The DALLE transformer. Vocabulary and sequence sizes must agree with the tokenizer and dVAE."""

    num_text_tokens: int = bound(256, ge=1)
    text_seq_len: int = bound(16, ge=1)
    num_image_tokens: int = bound(64, ge=1)
    image_fmap_size: int = bound(8, ge=1)
    dim: int = bound(256, ge=1)
    depth: int = bound(4, ge=1)
    heads: int = bound(4, ge=1)
    dim_head: int = bound(64, ge=1)
    ff_mult: int = bound(4, ge=1)
    attn_types: list[str] = bound(factory=lambda: ["full"], nonempty=True)
    conv_kernel_size: int = 5
    rotary_emb: bool = True
    shift_tokens: bool = True
    attn_dropout: float = bound(0.0, ge=0.0, lt=1.0)
    ff_dropout: float = bound(0.0, ge=0.0, lt=1.0)
    loss_img_weight: float = bound(7.0, ge=0)
    null_cond_prob: float = bound(0.0, ge=0.0, lt=1.0)
    # How axial_row / axial_col / conv_like layers attend over a whole sequence: "structured" scores only the
    # keys a pattern allows (grid rows, columns, windows); "mask" hands SDPA a dense boolean mask over every
    # position pair (the reference the tests compare against).
    sparse_attention: str = bound("structured", choices=("structured", "mask"))
    # Recompute each block's activations in the backward pass instead of storing them (less memory, ~1.3x FLOPs).
    activation_checkpointing: bool = False

    @property
    def image_seq_len(self) -> int:
        return self.image_fmap_size**2

    @property
    def seq_len(self) -> int:
        return self.text_seq_len + self.image_seq_len

    def check(self, name: str) -> None:
        for kind in self.attn_types:
            check(kind in ATTN_TYPES, f"{name}.attn_types", f"unknown pattern {kind!r}, expected one of {ATTN_TYPES}")
        check(self.conv_kernel_size >= 1 and self.conv_kernel_size % 2 == 1, f"{name}.conv_kernel_size",
              f"must be odd and >= 1, got {self.conv_kernel_size}")
        check(not self.rotary_emb or self.dim_head % 8 == 0, f"{name}.dim_head",
              f"must be divisible by 8 with rotary_emb, got {self.dim_head}")
        check(not self.shift_tokens or self.dim % 4 == 0, f"{name}.dim",
              f"must be divisible by 4 with shift_tokens, got {self.dim}")


@dataclass
class CLIPConfig(Section):
    """Small contrastive text/image model used to rerank candidates."""

    num_text_tokens: int = bound(256, ge=1)
    text_seq_len: int = bound(16, ge=1)
    image_size: int = bound(32, ge=1)
    channels: int = bound(3, ge=1)
    patch_size: int = bound(8, ge=1)
    dim_text: int = bound(128, ge=1)
    dim_image: int = bound(128, ge=1)
    dim_latent: int = bound(128, ge=1)
    text_depth: int = bound(2, ge=1)
    image_depth: int = bound(2, ge=1)
    heads: int = bound(4, ge=1)

    def check(self, name: str) -> None:
        check(self.image_size % self.patch_size == 0, f"{name}.patch_size",
              f"must divide image_size {self.image_size}, got {self.patch_size}")
        for key in ("dim_text", "dim_image"):
            check(getattr(self, key) % self.heads == 0, f"{name}.{key}", f"must be divisible by heads {self.heads}")


@dataclass
class OptimConfig(Section):
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = bound(3e-4, gt=0)
    weight_decay: float = bound(0.01, ge=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = bound(50, ge=0)
    min_lr_ratio: float = bound(0.1, ge=0, le=1)
    grad_clip: float = bound(1.0, ge=0)  # 0 disables clipping

    def check(self, name: str) -> None:
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{name}.betas",
              f"must be two values in [0, 1), got {self.betas}")


@dataclass
class SamplingConfig(Section):
    """Generation settings; every value is recorded beside the outputs."""

    temperature: float = bound(1.0, gt=0)
    top_k: float = bound(0.9, gt=0)  # a fraction of the vocabulary kept (< 1) or a count
    cond_scale: float = 1.0
    num_candidates: int = bound(8, ge=1)
    top_images: int = 2
    seed: int = 0
    precision: str = bound("auto", choices=PRECISIONS)  # of the DALLE weights and KV cache; fp16 on CUDA only
    compile: bool = False  # torch.compile the one-token step: faster steps after a compile on the first pass
    # Replay the one-token step from CUDA graphs (DALLE.static_sampling_step): a GPU's cached step is bound by
    # kernel launches. CUDA only; not together with compile.
    cuda_graphs: bool = False

    def check(self, name: str) -> None:
        check(1 <= self.top_images <= self.num_candidates, f"{name}.top_images",
              f"must be in [1, num_candidates={self.num_candidates}], got {self.top_images}")
        check(not (self.compile and self.cuda_graphs), f"{name}.cuda_graphs",
              "cannot be combined with compile (pick one sampling step)")


def _convert(value: Any, hint: Any, name: str) -> Any:
    """Checks ``value`` against a type hint, converting only what YAML cannot express (int -> float)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        check(isinstance(value, dict), name, f"must be a mapping, got {type(value).__name__}")
        return from_dict(hint, value, name)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), name)
    if origin is list:
        check(isinstance(value, list), name, f"must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), name, f"must be a mapping, got {type(value).__name__}")
        _, item = typing.get_args(hint)
        return {k: _convert(v, item, f"{name}.{k}") for k, v in value.items()}
    if hint is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), name, f"must be a number, got {value!r}")
        return float(value)
    if hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
        return value
    if hint is bool:
        check(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        return value
    if hint is str:
        check(isinstance(value, str), name, f"must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any] | None, name: str = "") -> Any:
    """Builds dataclass ``cls`` from a plain mapping, checking types, bounds and cross-field rules."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    data = data or {}
    for key in data:
        check(key in fields, f"{name}.{key}" if name else key, f"unknown field; expected one of {sorted(fields)}")
    obj = cls(**{key: _convert(value, hints[key], f"{name}.{key}" if name else key) for key, value in data.items()})
    if isinstance(obj, Section):
        obj.validate(name)
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping from a local path (configs are small and live beside the code)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
