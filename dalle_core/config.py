"""Typed configuration for every model and job, loaded from YAML.

One YAML file drives the whole chain (see ``configs/tiny.yaml``). Each section maps onto one dataclass
below; unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the dotted
field (``dalle.depth``), so a typo fails before any cluster resource is taken.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"  # the embedded default preset
ATTN_TYPES = ("full", "axial_row", "axial_col", "conv_like")
PRECISIONS = ("fp32", "bf16", "fp16")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or out of range; the message names the field."""


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


@dataclass
class TokenizerConfig:
    """youtokentome BPE over normalised captions."""

    vocab_size: int = 256
    text_seq_len: int = 16
    bpe_dropout: float = 0.0
    model_path: str = ""

    def validate(self, name: str = "tokenizer") -> None:
        _check(self.vocab_size >= 8, f"{name}.vocab_size", f"must be >= 8, got {self.vocab_size}")
        _check(self.text_seq_len >= 1, f"{name}.text_seq_len", f"must be >= 1, got {self.text_seq_len}")
        _check(0.0 <= self.bpe_dropout < 1.0, f"{name}.bpe_dropout", f"must be in [0, 1), got {self.bpe_dropout}")


@dataclass
class VAEConfig:
    """Discrete VAE (stage one): ``image_size / 2**num_layers`` codes per side."""

    image_size: int = 32
    num_tokens: int = 64
    codebook_dim: int = 64
    num_layers: int = 2
    num_resnet_blocks: int = 1
    hidden_dim: int = 64
    channels: int = 3
    temperature: float = 0.9
    straight_through: bool = False
    kl_div_loss_weight: float = 0.0
    diversity_loss_weight: float = 0.0
    smooth_l1_loss: bool = False

    @property
    def fmap_size(self) -> int:
        return self.image_size // 2**self.num_layers

    @property
    def image_seq_len(self) -> int:
        return self.fmap_size**2

    def validate(self, name: str = "vae") -> None:
        size = self.image_size
        _check(size >= 8 and size & (size - 1) == 0, f"{name}.image_size", f"must be a power of 2 >= 8, got {size}")
        _check(self.num_layers >= 1, f"{name}.num_layers", f"must be >= 1, got {self.num_layers}")
        _check(self.fmap_size >= 1, f"{name}.num_layers", f"too many for image_size {size}")
        _check(2 <= self.num_tokens <= 65535, f"{name}.num_tokens", f"must be in [2, 65535], got {self.num_tokens}")
        for key in ("codebook_dim", "hidden_dim", "channels"):
            _check(getattr(self, key) >= 1, f"{name}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.num_resnet_blocks >= 0, f"{name}.num_resnet_blocks", "must be >= 0")
        _check(self.temperature > 0, f"{name}.temperature", f"must be > 0, got {self.temperature}")
        _check(self.kl_div_loss_weight >= 0, f"{name}.kl_div_loss_weight", "must be >= 0")
        _check(self.diversity_loss_weight >= 0, f"{name}.diversity_loss_weight", "must be >= 0")


@dataclass
class DALLEConfig:
    """The DALLE transformer. Vocabulary and sequence sizes must agree with the tokenizer and dVAE."""

    num_text_tokens: int = 256
    text_seq_len: int = 16
    num_image_tokens: int = 64
    image_fmap_size: int = 8
    dim: int = 256
    depth: int = 4
    heads: int = 4
    dim_head: int = 64
    ff_mult: int = 4
    attn_types: list[str] = field(default_factory=lambda: ["full"])
    conv_kernel_size: int = 5
    rotary_emb: bool = True
    shift_tokens: bool = True
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    loss_img_weight: float = 7.0
    null_cond_prob: float = 0.0

    @property
    def image_seq_len(self) -> int:
        return self.image_fmap_size**2

    @property
    def seq_len(self) -> int:
        return self.text_seq_len + self.image_seq_len

    def validate(self, name: str = "dalle") -> None:
        for key in ("num_text_tokens", "text_seq_len", "num_image_tokens", "image_fmap_size", "dim", "depth",
                    "heads", "dim_head", "ff_mult"):
            _check(getattr(self, key) >= 1, f"{name}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(len(self.attn_types) >= 1, f"{name}.attn_types", "must name at least one pattern")
        for kind in self.attn_types:
            _check(kind in ATTN_TYPES, f"{name}.attn_types", f"unknown pattern {kind!r}, expected one of {ATTN_TYPES}")
        _check(self.conv_kernel_size >= 1 and self.conv_kernel_size % 2 == 1, f"{name}.conv_kernel_size",
               f"must be odd and >= 1, got {self.conv_kernel_size}")
        _check(not self.rotary_emb or self.dim_head % 8 == 0, f"{name}.dim_head",
               f"must be divisible by 8 with rotary_emb, got {self.dim_head}")
        _check(not self.shift_tokens or self.dim % 4 == 0, f"{name}.dim",
               f"must be divisible by 4 with shift_tokens, got {self.dim}")
        for key in ("attn_dropout", "ff_dropout", "null_cond_prob"):
            _check(0.0 <= getattr(self, key) < 1.0, f"{name}.{key}", f"must be in [0, 1), got {getattr(self, key)}")
        _check(self.loss_img_weight >= 0, f"{name}.loss_img_weight", "must be >= 0")


@dataclass
class CLIPConfig:
    """Small contrastive text/image model used to rerank candidates."""

    num_text_tokens: int = 256
    text_seq_len: int = 16
    image_size: int = 32
    channels: int = 3
    patch_size: int = 8
    dim_text: int = 128
    dim_image: int = 128
    dim_latent: int = 128
    text_depth: int = 2
    image_depth: int = 2
    heads: int = 4

    def validate(self, name: str = "clip") -> None:
        for key in ("num_text_tokens", "text_seq_len", "image_size", "channels", "patch_size", "dim_text",
                    "dim_image", "dim_latent", "text_depth", "image_depth", "heads"):
            _check(getattr(self, key) >= 1, f"{name}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.image_size % self.patch_size == 0, f"{name}.patch_size",
               f"must divide image_size {self.image_size}, got {self.patch_size}")
        for key in ("dim_text", "dim_image"):
            _check(getattr(self, key) % self.heads == 0, f"{name}.{key}", f"must be divisible by heads {self.heads}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def validate(self, name: str = "optim") -> None:
        _check(self.lr > 0, f"{name}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{name}.weight_decay", "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{name}.betas",
               f"must be two values in [0, 1), got {self.betas}")
        _check(self.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{name}.min_lr_ratio", "must be in [0, 1]")
        _check(self.grad_clip >= 0, f"{name}.grad_clip", "must be >= 0 (0 disables clipping)")


@dataclass
class SamplingConfig:
    """Generation settings; every value is recorded beside the outputs."""

    temperature: float = 1.0
    top_k: float = 0.9
    cond_scale: float = 1.0
    num_candidates: int = 8
    top_images: int = 2
    seed: int = 0

    def validate(self, name: str = "sampling") -> None:
        _check(self.temperature > 0, f"{name}.temperature", f"must be > 0, got {self.temperature}")
        _check(self.top_k > 0, f"{name}.top_k", "must be > 0: a fraction of the vocabulary kept (< 1) or a count")
        _check(self.num_candidates >= 1, f"{name}.num_candidates", "must be >= 1")
        _check(1 <= self.top_images <= self.num_candidates, f"{name}.top_images",
               f"must be in [1, num_candidates={self.num_candidates}], got {self.top_images}")


def _convert(value: Any, hint: Any, name: str) -> Any:
    """Checks ``value`` against a type hint, converting only what YAML cannot express (int -> float)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        _check(isinstance(value, dict), name, f"must be a mapping, got {type(value).__name__}")
        return from_dict(hint, value, name)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), name)
    if origin is list:
        _check(isinstance(value, list), name, f"must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), name, f"must be a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name,
               f"must be a number, got {value!r}")
        return float(value)
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
        return value
    if hint is bool:
        _check(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        return value
    if hint is str:
        _check(isinstance(value, str), name, f"must be a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict[str, Any], name: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        _check(key in fields, f"{name}.{key}" if name else key,
               f"unknown field; expected one of {sorted(fields)}")
    kwargs = {key: _convert(value, hints[key], f"{name}.{key}" if name else key) for key, value in data.items()}
    return cls(**kwargs)


def from_dict(cls: type, data: dict[str, Any] | None, name: str = "") -> Any:
    """Builds dataclass ``cls`` from a plain mapping, validating types and (if defined) values."""
    obj = _from_dict(cls, data or {}, name)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(name) if name else validate()
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


# ---------------------------------------------------------------------------------------------------------
# The whole chain: one file, one section per stage. Paths are local or any fsspec URL (s3://...).


@dataclass
class PathsConfig:
    """Where each stage reads and writes; empty values derive from ``root``."""

    root: str = "outputs/tiny"
    raw: str = ""
    tokenizer: str = ""
    vae: str = ""
    shards: str = ""
    runs: str = ""
    clip: str = ""
    evaluation: str = ""

    def resolved(self) -> PathsConfig:
        """A copy with every empty path filled in under ``root``."""
        # Local paths become absolute: Ray workers do not run in the driver's working directory.
        root = self.root.rstrip("/") if "://" in self.root else os.path.abspath(self.root)
        defaults = {
            "raw": f"{root}/raw",
            "tokenizer": f"{root}/tokenizer/bpe.model",
            "vae": f"{root}/vae/vae.pt",
            "shards": f"{root}/shards",
            "runs": f"{root}/runs",
            "clip": f"{root}/clip/clip.pt",
            "evaluation": f"{root}/evaluation",
        }
        return dataclasses.replace(self, **{k: getattr(self, k) or v for k, v in defaults.items()})

    def validate(self, name: str = "paths") -> None:
        _check(bool(self.root), f"{name}.root", "must not be empty")


@dataclass
class SyntheticConfig:
    """The built-in synthetic set: one coloured shape per picture, captions from templates."""

    num_samples: int = 4000
    image_size: int = 32
    seed: int = 0
    samples_per_shard: int = 1000
    holdout_pairs: list[list[str]] = field(default_factory=lambda: [["red", "square"], ["blue", "circle"]])

    def validate(self, name: str = "synthetic") -> None:
        _check(self.num_samples >= 1, f"{name}.num_samples", "must be >= 1")
        _check(self.image_size >= 16, f"{name}.image_size", f"must be >= 16, got {self.image_size}")
        _check(self.samples_per_shard >= 1, f"{name}.samples_per_shard", "must be >= 1")
        for i, pair in enumerate(self.holdout_pairs):
            _check(len(pair) == 2, f"{name}.holdout_pairs[{i}]", f"must be [color, shape], got {pair}")


@dataclass
class TrainConfig:
    """Stage two: DALLE on token shards with Ray Train + DeepSpeed."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    zero_stage: int = 0
    precision: str = "fp32"
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 500
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    max_failures: int = 2
    run_name: str = "dalle"
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Ray placement: extra custom resources per worker (e.g. {"worker_node": 1}) and the placement group
    # strategy ("PACK" fills a node first, "SPREAD" puts workers on different nodes).
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    placement_strategy: str = "PACK"
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer; 0 keeps the shard order
    materialize: bool = False  # keep the token rows in the object store (sets that fit): epochs restart at once
    peak_flops_per_worker: float = 0.0  # for MFU; 0 measures a matmul on each worker at start
    zero3_persistence_threshold: int = 100_000  # params smaller than this stay unpartitioned at ZeRO-3

    def validate(self, name: str = "train") -> None:
        for key in ("num_workers", "batch_size", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints",
                    "log_every"):
            _check(getattr(self, key) >= 1, f"{name}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.cpus_per_worker > 0, f"{name}.cpus_per_worker", "must be > 0")
        _check(self.zero_stage in (0, 1, 2, 3), f"{name}.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.precision in PRECISIONS, f"{name}.precision",
               f"must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.max_failures >= -1, f"{name}.max_failures", "must be >= -1 (-1 retries forever)")
        _check(bool(self.run_name), f"{name}.run_name", "must not be empty")
        _check(self.precision != "fp16" or self.use_gpu, f"{name}.precision",
               "fp16 needs use_gpu: true (DeepSpeed's CPU accelerator has no fp16; use bf16 or fp32)")
        _check(self.placement_strategy in PLACEMENT_STRATEGIES, f"{name}.placement_strategy",
               f"must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}")
        for key, value in self.resources_per_worker.items():
            _check(isinstance(value, (int, float)) and value >= 0, f"{name}.resources_per_worker.{key}",
                   f"must be a number >= 0, got {value!r}")
        _check(self.shuffle_buffer >= 0, f"{name}.shuffle_buffer", "must be >= 0")
        _check(self.peak_flops_per_worker >= 0, f"{name}.peak_flops_per_worker", "must be >= 0 (0 measures)")
        _check(self.zero3_persistence_threshold >= 0, f"{name}.zero3_persistence_threshold", "must be >= 0")


INGEST_SOURCES = ("urls", "folder", "webdataset")
IMG2DATASET_RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")


@dataclass
class IngestConfig:
    """Real data into raw shards: a URL list through img2dataset, a folder of image + .txt pairs, or WebDataset
    tars. The URL-list fields are passed to img2dataset as they are."""

    source: str = "urls"
    samples_per_shard: int = 1000
    caption_seed: int = 0  # picks the caption line of a multi-line .txt per sample, by key
    url_col: str = "url"
    caption_col: str = "caption"
    input_format: str = ""  # txt | csv | tsv | parquet | json...; empty = from the file extension
    output_format: str = "parquet"  # parquet | webdataset
    image_size: int = 256
    resize_mode: str = "keep_ratio"  # smaller side to image_size; pretokenize crops to the dVAE's size later
    processes_count: int = 1
    thread_count: int = 16
    timeout: int = 10
    retries: int = 0

    def validate(self, name: str = "ingest") -> None:
        _check(self.source in INGEST_SOURCES, f"{name}.source", f"must be one of {INGEST_SOURCES}, got {self.source!r}")
        _check(self.output_format in ("parquet", "webdataset"), f"{name}.output_format",
               f"must be parquet or webdataset, got {self.output_format!r}")
        _check(self.resize_mode in IMG2DATASET_RESIZE_MODES, f"{name}.resize_mode",
               f"must be one of {IMG2DATASET_RESIZE_MODES}, got {self.resize_mode!r}")
        for key in ("samples_per_shard", "image_size", "processes_count", "thread_count", "timeout"):
            _check(getattr(self, key) >= 1, f"{name}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.retries >= 0, f"{name}.retries", "must be >= 0")


@dataclass
class PretokenizeConfig:
    """Raw shards -> token shards with Ray Data: CPU tasks decode and tokenize, a pool of dVAE actors encodes."""

    batch_size: int = 256  # rows per batch through both stages
    concurrency: int = 1  # dVAE encoder actors (one per GPU on a GPU cluster)
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0  # 1 on a GPU cluster: each actor takes a GPU
    min_image_size: int = 16  # pictures whose shorter side is smaller are rejected as too small
    overwrite: bool = False  # redo finished output shards instead of leaving them as they are

    def validate(self, name: str = "pretokenize") -> None:
        for key in ("batch_size", "concurrency", "min_image_size"):
            _check(getattr(self, key) >= 1, f"{name}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.num_cpus_per_actor > 0, f"{name}.num_cpus_per_actor", "must be > 0")
        _check(self.num_gpus_per_actor >= 0, f"{name}.num_gpus_per_actor", "must be >= 0")


PROMPT_SOURCES = ("synthetic", "text", "parquet")


@dataclass
class EvaluateConfig:
    """The evaluation Serve application (Generator + Scorer deployments) and the batch driver that feeds it."""

    app_name: str = "dalle"
    route_prefix: str = "/"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    generator_replicas: int = 1
    generator_num_cpus: float = 1.0
    generator_num_gpus: float = 0.0  # > 0 puts each Generator replica on a GPU (1 on a GPU cluster)
    scorer_replicas: int = 1
    scorer_num_cpus: float = 0.5
    scorer_num_gpus: float = 0.0
    max_batch_size: int = 8  # prompts grouped by @serve.batch into one sampling pass (x num_candidates rows)
    scorer_max_batch_size: int = 16  # prompts grouped into one CLIP pass
    batch_wait_timeout_s: float = 0.05
    max_ongoing_requests: int = 64
    prompt_source: str = "synthetic"  # synthetic held-out captions | text file (one per line) | parquet column
    prompts_path: str = ""
    prompt_column: str = "caption"
    num_prompts: int = 16  # 0 = every prompt of the source
    driver_concurrency: int = 2  # Ray Data actors calling the deployment handles
    driver_batch_size: int = 4  # prompts per Ray Data batch (all sent to Serve at once)
    grid_max_prompts: int = 32  # rows of grid.png / report.html

    def validate(self, name: str = "evaluate") -> None:
        _check(bool(self.app_name), f"{name}.app_name", "must not be empty")
        _check(self.route_prefix.startswith("/"), f"{name}.route_prefix",
               f"must start with /, got {self.route_prefix!r}")
        _check(0 < self.http_port < 65536, f"{name}.http_port", f"must be a TCP port, got {self.http_port}")
        for key in ("generator_replicas", "scorer_replicas", "max_batch_size", "scorer_max_batch_size",
                    "max_ongoing_requests", "driver_concurrency", "driver_batch_size", "grid_max_prompts"):
            _check(getattr(self, key) >= 1, f"{name}.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("generator_num_cpus", "generator_num_gpus", "scorer_num_cpus", "scorer_num_gpus",
                    "batch_wait_timeout_s"):
            _check(getattr(self, key) >= 0, f"{name}.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(self.prompt_source in PROMPT_SOURCES, f"{name}.prompt_source",
               f"must be one of {PROMPT_SOURCES}, got {self.prompt_source!r}")
        _check(self.prompt_source == "synthetic" or bool(self.prompts_path), f"{name}.prompts_path",
               f"must be set for prompt_source={self.prompt_source!r}")
        _check(bool(self.prompt_column), f"{name}.prompt_column", "must not be empty")
        _check(self.num_prompts >= 0, f"{name}.num_prompts", "must be >= 0 (0 = all)")


@dataclass
class TrainCLIPConfig:
    """CLIP for reranking, trained contrastively on the raw shards with Ray Train (DDP)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    batch_size: int = 64  # per worker; every other row of the batch is a negative
    max_steps: int = 300
    log_every: int = 20
    eval_fraction: float = 0.1  # rows held out (by key hash) for retrieval accuracy
    eval_max_rows: int = 512  # retrieval is measured among this many held-out pairs at most
    seed: int = 0
    max_failures: int = 0
    run_name: str = "clip"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=20))

    def validate(self, name: str = "train_clip") -> None:
        for key in ("num_workers", "batch_size", "max_steps", "log_every", "eval_max_rows"):
            _check(getattr(self, key) >= 1, f"{name}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.batch_size >= 2, f"{name}.batch_size", "must be >= 2: a contrastive batch needs negatives")
        _check(self.cpus_per_worker > 0, f"{name}.cpus_per_worker", "must be > 0")
        _check(0 < self.eval_fraction < 1, f"{name}.eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        _check(self.max_failures >= -1, f"{name}.max_failures", "must be >= -1 (-1 retries forever)")
        _check(bool(self.run_name), f"{name}.run_name", "must not be empty")


@dataclass
class TrainVAEConfig:
    """Stage one: the dVAE on raw shards with Ray Train (DDP). The Gumbel-softmax temperature anneals from
    ``vae.temperature`` by ``exp(-anneal_rate * step)`` down to ``temperature_min``; ``vae.kl_div_loss_weight``
    weighs the KL term."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    batch_size: int = 32  # per worker
    max_steps: int = 500
    precision: str = "fp32"  # bf16 = autocast (the weights and optimiser stay fp32)
    materialize: bool = False  # decode once, keep the pictures in the object store (sets that fit)
    log_every: int = 20
    sample_every: int = 100  # reconstruction PNG grid (originals over reconstructions)
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    temperature_min: float = 0.5
    anneal_rate: float = 1e-3
    seed: int = 0
    max_failures: int = 1
    run_name: str = "vae"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=20,
                                                                    grad_clip=0.0))

    def validate(self, name: str = "train_vae") -> None:
        for key in ("num_workers", "batch_size", "max_steps", "log_every", "sample_every", "checkpoint_every",
                    "keep_checkpoints"):
            _check(getattr(self, key) >= 1, f"{name}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.cpus_per_worker > 0, f"{name}.cpus_per_worker", "must be > 0")
        _check(self.precision in ("fp32", "bf16"), f"{name}.precision",
               f"must be fp32 or bf16, got {self.precision!r}")
        _check(self.temperature_min > 0, f"{name}.temperature_min", f"must be > 0, got {self.temperature_min}")
        _check(self.anneal_rate >= 0, f"{name}.anneal_rate", "must be >= 0 (0 keeps vae.temperature)")
        _check(self.max_failures >= -1, f"{name}.max_failures", "must be >= -1 (-1 retries forever)")
        _check(bool(self.run_name), f"{name}.run_name", "must not be empty")


@dataclass
class Config:
    """Everything one run of the chain needs. ``dalle``'s vocabulary and sequence fields derive from
    ``tokenizer`` and ``vae``; setting them to something else is an error naming both fields."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    dalle: DALLEConfig = field(default_factory=DALLEConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    train_clip: TrainCLIPConfig = field(default_factory=TrainCLIPConfig)
    train_vae: TrainVAEConfig = field(default_factory=TrainVAEConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    pretokenize: PretokenizeConfig = field(default_factory=PretokenizeConfig)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
        data = load_yaml(path) if path else {}
        for dotted, value in (overrides or {}).items():
            *parents, leaf = dotted.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
                _check(isinstance(node, dict), dotted, "cannot override inside a non-mapping value")
            node[leaf] = value
        tok = from_dict(TokenizerConfig, data.get("tokenizer"), "tokenizer")
        vae = from_dict(VAEConfig, data.get("vae"), "vae")
        derived = {
            "num_text_tokens": ("tokenizer.vocab_size", tok.vocab_size),
            "text_seq_len": ("tokenizer.text_seq_len", tok.text_seq_len),
            "num_image_tokens": ("vae.num_tokens", vae.num_tokens),
            "image_fmap_size": ("vae.image_size / 2**vae.num_layers", vae.fmap_size),
        }
        derived_clip = {
            "num_text_tokens": ("tokenizer.vocab_size", tok.vocab_size),
            "text_seq_len": ("tokenizer.text_seq_len", tok.text_seq_len),
            "image_size": ("vae.image_size", vae.image_size),
            "channels": ("vae.channels", vae.channels),
        }
        for section, fields_ in (("dalle", derived), ("clip", derived_clip)):
            given = data.setdefault(section, {}) or {}
            data[section] = given
            for key, (source, value) in fields_.items():
                if key in given:
                    _check(given[key] == value, f"{section}.{key}", f"is {given[key]} but {source} is {value}; "
                           "leave it out to derive it")
                given[key] = value
        return from_dict(cls, data)
