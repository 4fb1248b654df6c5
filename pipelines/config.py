"""The whole chain's configuration: one YAML file, one section per concern, loaded into :class:`Config`.

The model sections (``tokenizer``, ``vae``, ``dalle``, ``clip``, ``sampling``) are :mod:`dalle_core.config`'s.
Everything about running them lives here: where artifacts go (``paths``), and per stage the Ray side. The three
trainers (``train_vae``, ``train``, ``train_clip``) share one :class:`TrainerConfig`: workers and placement,
failures, the step loop, checkpoint cadence and logging, as the one runner in ``pipelines/train`` reads them;
each adds only what its model needs. ``dalle``'s and ``clip``'s vocabulary and sequence fields derive from
``tokenizer`` and ``vae``; setting them to something else is an error naming both fields.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dalle_core.config import (
    PRECISIONS,
    CLIPConfig,
    ConfigError,
    DALLEConfig,
    OptimConfig,
    SamplingConfig,
    Section,
    TokenizerConfig,
    VAEConfig,
    bound,
    check,
    from_dict,
    load_yaml,
)


class InputError(ValueError):
    """The user's input (data, model files, flags) cannot be used as given; jobs exit with code 2."""

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"  # the embedded default preset
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
INGEST_SOURCES = ("urls", "folder", "webdataset")
IMG2DATASET_RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
PROMPT_SOURCES = ("synthetic", "text", "parquet")


@dataclass
class PathsConfig(Section):
    """Where each stage reads and writes; empty values derive from ``root``. ``vae``, ``dalle`` and ``clip``
    are where each trainer publishes its final model (the file the next stage loads)."""

    root: str = bound("outputs/tiny", nonempty=True)
    raw: str = ""
    tokenizer: str = ""
    vae: str = ""
    shards: str = ""
    runs: str = ""
    dalle: str = ""
    clip: str = ""
    evaluation: str = ""

    def resolved(self) -> PathsConfig:
        """A copy with every empty path filled in under ``root``."""
        # Local paths become absolute: Ray workers do not run in the driver's working directory.
        root = self.root.rstrip("/") if "://" in self.root else os.path.abspath(self.root)
        defaults = {
            "raw": f"{root}/raw",
            "tokenizer": f"{root}/tokenizer/bpe.model",
            "vae": f"{root}/vae/vae.safetensors",
            "shards": f"{root}/shards",
            "runs": f"{root}/runs",
            "dalle": f"{root}/dalle/dalle.safetensors",
            "clip": f"{root}/clip/clip.safetensors",
            "evaluation": f"{root}/evaluation",
        }
        return dataclasses.replace(self, **{k: getattr(self, k) or v for k, v in defaults.items()})


@dataclass
class TrainerConfig(Section):
    """What every Ray Train stage shares, in the order the runner uses it: the workers and where they go,
    how often a failure is retried, the data loop, checkpoints and metrics. ``batch_size`` is per worker."""

    num_workers: int = bound(1, ge=1)
    # Elastic training (Ray Train V2): > 0 lets the run start, and go on after losing a node, with as few as this
    # many workers, growing back to num_workers as the cluster does; 0 runs exactly num_workers. A resize resumes the
    # last checkpoint on the new number of workers (DALLE's ZeRO state is re-cut through a universal checkpoint).
    min_workers: int = bound(0, ge=0)
    cpus_per_worker: float = bound(1.0, gt=0)
    use_gpu: bool = False
    # Extra custom resources per worker (e.g. {"worker_node": 1}) and the placement group strategy ("PACK" fills
    # a node first, "SPREAD" puts workers on different nodes).
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    placement_strategy: str = bound("PACK", choices=PLACEMENT_STRATEGIES)
    max_failures: int = bound(0, ge=-1)  # -1 retries forever
    run_name: str = bound("run", nonempty=True)
    # A fine-tune: a published model (.safetensors or .pt, local or s3://) whose weights replace the seeded init at
    # step 0; optimiser, LR schedule and step count start fresh. A run that has a checkpoint resumes from it instead.
    init_from: str = ""
    seed: int = 0
    precision: str = bound("auto", choices=PRECISIONS)
    batch_size: int = bound(32, ge=1)
    max_steps: int = bound(500, ge=1)
    shuffle_buffer: int = bound(0, ge=0)  # rows in each worker's local shuffle buffer; 0 keeps the stream order
    materialize: bool = False  # keep the decoded rows in the object store (sets that fit): epochs restart at once
    log_every: int = bound(10, ge=1)
    checkpoint_every: int = bound(100, ge=1)
    keep_checkpoints: int = bound(2, ge=1)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self, name: str) -> None:
        check(self.min_workers <= self.num_workers, f"{name}.min_workers",
              f"must be <= {name}.num_workers={self.num_workers} (0: a fixed number of workers), "
              f"got {self.min_workers}")
        check(self.precision != "fp16" or self.use_gpu, f"{name}.precision",
              "fp16 needs use_gpu: true (CPUs have no fp16 compute; use bf16, fp32 or auto)")
        for key, value in self.resources_per_worker.items():
            check(value >= 0, f"{name}.resources_per_worker.{key}", f"must be a number >= 0, got {value!r}")


@dataclass
class TrainConfig(TrainerConfig):
    """Stage two: DALLE on token shards, DeepSpeed ZeRO inside each worker."""

    max_failures: int = 2
    run_name: str = "dalle"
    shuffle_buffer: int = 256
    grad_accum: int = bound(1, ge=1)
    zero_stage: int = bound(0, choices=(0, 1, 2, 3))
    peak_flops_per_worker: float = bound(0.0, ge=0)  # for MFU; 0 measures a matmul on each worker at start
    zero3_persistence_threshold: int = bound(100_000, ge=0)  # params smaller than this stay whole at ZeRO-3
    # torch.compile the DALLE inside the DeepSpeed engine: one fused graph (1.22-1.36x a step at the paper shape on
    # a 2-core CPU), paid for by ~15-25 s of compiling on each worker before its first step
    compile: bool = False


@dataclass
class TrainVAEConfig(TrainerConfig):
    """Stage one: the dVAE on raw shards (DDP). The Gumbel-softmax temperature anneals from ``vae.temperature``
    by ``exp(-anneal_rate * step)`` down to ``temperature_min``; ``vae.kl_div_loss_weight`` weighs the KL term."""

    max_failures: int = 1
    run_name: str = "vae"
    log_every: int = 20
    sample_every: int = bound(100, ge=1)  # reconstruction PNG grid (originals over reconstructions)
    temperature_min: float = bound(0.5, gt=0)
    anneal_rate: float = bound(1e-3, ge=0)  # 0 keeps vae.temperature
    # The last N of max_steps train the decoder and codebook on the frozen encoder's argmax codes, the codes
    # decode(encode(x)) gives them after training, instead of gumbel-softmax mixtures of codes
    decoder_finetune_steps: int = bound(0, ge=0)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=20,
                                                                    grad_clip=0.0))

    def check(self, name: str) -> None:
        check(self.precision != "fp16", f"{name}.precision",
              f"must be fp32 or bf16 (or auto), got {self.precision!r}")
        check(self.decoder_finetune_steps < self.max_steps, f"{name}.decoder_finetune_steps",
              f"must be less than max_steps ({self.max_steps}): the encoder has to learn its codes first, "
              f"got {self.decoder_finetune_steps}")
        super().check(name)


@dataclass
class TrainCLIPConfig(TrainerConfig):
    """CLIP for reranking, trained contrastively on the raw shards (DDP)."""

    run_name: str = "clip"
    batch_size: int = bound(64, ge=2)  # every other row of the batch is a negative
    max_steps: int = 300
    shuffle_buffer: int = 256
    log_every: int = 20
    eval_fraction: float = bound(0.1, gt=0, lt=1)  # rows held out (by key hash) for retrieval accuracy
    eval_max_rows: int = bound(512, ge=1)  # retrieval is measured among this many held-out pairs at most
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=20))


@dataclass
class SyntheticConfig(Section):
    """The built-in synthetic set: one coloured shape per picture, captions from templates."""

    num_samples: int = bound(4000, ge=1)
    image_size: int = bound(32, ge=16)
    seed: int = 0
    samples_per_shard: int = bound(1000, ge=1)
    holdout_pairs: list[list[str]] = field(default_factory=lambda: [["red", "square"], ["blue", "circle"]])

    def check(self, name: str) -> None:
        for i, pair in enumerate(self.holdout_pairs):
            check(len(pair) == 2, f"{name}.holdout_pairs[{i}]", f"must be [color, shape], got {pair}")


@dataclass
class IngestConfig(Section):
    """Real data into raw shards: a URL list through img2dataset, a folder of image + .txt pairs, or WebDataset
    tars. The URL-list fields are passed to img2dataset as they are."""

    source: str = bound("urls", choices=INGEST_SOURCES)
    samples_per_shard: int = bound(1000, ge=1)
    caption_seed: int = 0  # picks the caption line of a multi-line .txt per sample, by key
    url_col: str = "url"
    caption_col: str = "caption"
    input_format: str = ""  # txt | csv | tsv | parquet | json...; empty = from the file extension
    output_format: str = bound("parquet", choices=("parquet", "webdataset"))
    image_size: int = bound(256, ge=1)
    resize_mode: str = bound("keep_ratio", choices=IMG2DATASET_RESIZE_MODES)  # pretokenize crops later
    processes_count: int = bound(1, ge=1)
    thread_count: int = bound(16, ge=1)
    timeout: int = bound(10, ge=1)
    retries: int = bound(0, ge=0)


@dataclass
class PretokenizeConfig(Section):
    """Raw shards -> token shards with Ray Data: CPU tasks decode and tokenize, a pool of dVAE actors encodes."""

    batch_size: int = bound(256, ge=1)  # rows per batch through both stages
    concurrency: int = bound(1, ge=1)  # dVAE encoder actors (one per GPU on a GPU cluster)
    num_cpus_per_actor: float = bound(1.0, gt=0)
    num_gpus_per_actor: float = bound(0.0, ge=0)  # 1 on a GPU cluster: each actor takes a GPU
    min_image_size: int = bound(16, ge=1)  # pictures whose shorter side is smaller are rejected as too small
    overwrite: bool = False  # redo finished output shards instead of leaving them as they are


@dataclass
class EvaluateConfig(Section):
    """The evaluation Serve application (Generator + Scorer deployments) and the batch driver that feeds it."""

    app_name: str = bound("dalle", nonempty=True)
    route_prefix: str = "/"
    http_host: str = "127.0.0.1"
    http_port: int = bound(8000, gt=0, lt=65536)
    generator_replicas: int = bound(1, ge=1)
    generator_num_cpus: float = bound(1.0, ge=0)
    generator_num_gpus: float = bound(0.0, ge=0)  # > 0 puts each Generator replica on a GPU (1 on a GPU cluster)
    scorer_replicas: int = bound(1, ge=1)
    scorer_num_cpus: float = bound(0.5, ge=0)
    scorer_num_gpus: float = bound(0.0, ge=0)
    max_batch_size: int = bound(8, ge=1)  # prompts grouped by @serve.batch into one sampling pass
    scorer_max_batch_size: int = bound(16, ge=1)  # prompts grouped into one CLIP pass
    batch_wait_timeout_s: float = bound(0.05, ge=0)
    max_ongoing_requests: int = bound(64, ge=1)  # per replica, of every deployment (HTTP ingress included)
    max_queued_requests: int = bound(64, ge=1)  # HTTP requests waiting for the ingress; more answer 503
    retry_after_s: int = bound(1, ge=1)  # the Retry-After header of that 503
    max_candidates: int = bound(64, ge=1)  # the largest "n" an HTTP request may ask for
    max_prompt_chars: int = bound(2000, ge=1)  # longer HTTP prompts are refused before any tokenizing
    prompt_source: str = bound("synthetic", choices=PROMPT_SOURCES)  # held-out captions | text file | parquet
    prompts_path: str = ""
    prompt_column: str = bound("caption", nonempty=True)
    num_prompts: int = bound(16, ge=0)  # 0 = every prompt of the source
    driver_concurrency: int = bound(2, ge=1)  # Ray Data actors calling the deployment handles
    driver_batch_size: int = bound(8, ge=1)  # prompts per Ray Data batch (all sent to Serve at once)
    grid_max_prompts: int = bound(32, ge=1)  # rows of grid.png / report.html

    def check(self, name: str) -> None:
        check(self.route_prefix.startswith("/"), f"{name}.route_prefix",
              f"must start with /, got {self.route_prefix!r}")
        check(self.prompt_source == "synthetic" or bool(self.prompts_path), f"{name}.prompts_path",
              f"must be set for prompt_source={self.prompt_source!r}")


@dataclass
class Config:
    """Everything one run of the chain needs, one field per YAML section."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    train_vae: TrainVAEConfig = field(default_factory=TrainVAEConfig)
    pretokenize: PretokenizeConfig = field(default_factory=PretokenizeConfig)
    dalle: DALLEConfig = field(default_factory=DALLEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    train_clip: TrainCLIPConfig = field(default_factory=TrainCLIPConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
        """The YAML file at ``path`` (None: every default) with dotted ``overrides`` applied."""
        data = load_yaml(path) if path else {}
        for dotted, value in (overrides or {}).items():
            *parents, leaf = dotted.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
                check(isinstance(node, dict), dotted, "cannot override inside a non-mapping value")
            node[leaf] = value
        for section, value in data.items():
            check(value is None or isinstance(value, dict), section,
                  f"must be a mapping of fields, got {type(value).__name__}")
        tok = from_dict(TokenizerConfig, data.get("tokenizer"), "tokenizer")
        vae = from_dict(VAEConfig, data.get("vae"), "vae")
        derived = {
            "dalle": {"num_text_tokens": ("tokenizer.vocab_size", tok.vocab_size),
                      "text_seq_len": ("tokenizer.text_seq_len", tok.text_seq_len),
                      "num_image_tokens": ("vae.num_tokens", vae.num_tokens),
                      "image_fmap_size": ("vae.image_size / 2**vae.num_layers", vae.fmap_size)},
            "clip": {"num_text_tokens": ("tokenizer.vocab_size", tok.vocab_size),
                     "text_seq_len": ("tokenizer.text_seq_len", tok.text_seq_len),
                     "image_size": ("vae.image_size", vae.image_size),
                     "channels": ("vae.channels", vae.channels)},
        }
        for section, fields_ in derived.items():
            given = data.get(section) or {}
            data[section] = given
            for key, (source, value) in fields_.items():
                if key in given:
                    check(given[key] == value, f"{section}.{key}", f"is {given[key]} but {source} is {value}; "
                          "leave it out to derive it")
                given[key] = value
        return from_dict(cls, data)


__all__ = ["Config", "ConfigError", "DEFAULT_CONFIG", "EvaluateConfig", "IngestConfig", "InputError", "PathsConfig",
           "PretokenizeConfig", "SyntheticConfig", "TrainCLIPConfig", "TrainConfig", "TrainVAEConfig",
           "TrainerConfig"]
