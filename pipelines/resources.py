"""What each job asks Ray for, worked out from the config alone: no Ray, no cluster, no weights.

This module is the one place those requests are made. The job code passes what :func:`worker_resources`,
:func:`encoder_actor_options`, :func:`deployment_actor_options` and :func:`client_actor_options` return straight
to Ray, and :func:`plan_resources` (what ``jobs/dry_run.py --job <job>`` prints, for every job in :data:`JOBS`)
is built from the same functions, so the plan a user reads and the request Ray gets cannot drift apart. A plan
lists the workers, CPUs and GPUs per worker, placement, actor pools and replicas, plus the memory per GPU and
the FLOPs that size them, before a single GPU is reserved. Model sizes come from the real modules built on
PyTorch's ``meta`` device (shapes only, no memory), so the numbers follow the code.

Memory per training GPU follows the ZeRO paper (Rajbhandari et al. 2020): with mixed precision every parameter
costs 2 bytes of weights, 2 of gradients and 12 of optimizer state (fp32 master copy + Adam m and v); stage 1
partitions the optimizer state over the data-parallel workers, stage 2 also the gradients, stage 3 also the
weights. Activations are what autograd keeps for backward: ``ACTIVATION_ELEMENTS_PER_DIM`` elements per token,
per layer, per unit of model width (measured on ``DALLE`` with saved-tensor hooks, flash/causal attention, no
activation checkpointing; ``tests/test_infra.py`` re-measures it).

Imports no Ray and nothing of ``pipelines.train`` or ``pipelines.serve``: jobs plan before touching a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dalle_core.clip import CLIP
from dalle_core.dalle import DALLE
from dalle_core.vae import DiscreteVAE
from pipelines.config import Config, EvaluateConfig, PretokenizeConfig, TrainerConfig

GIB = 1024**3
ACTIVATION_ELEMENTS_PER_DIM = 27  # saved-for-backward elements per token and layer, divided by `dim`
ASSUMED_MFU = 0.4  # model-FLOPs utilisation that a tuned ZeRO data-parallel run reaches on A100/H100
# Runtime memory that scales with neither the model nor the batch: CUDA context, NCCL and DeepSpeed buckets.
OVERHEAD_GIB = 3.0
# What a Ray Data task asks for when the job does not say: one CPU. Such tasks (decoding, reading shards)
# come on top of a plan's ``total`` and run on whatever CPUs are free, as many at once as there are.
RAY_DATA_TASK: dict[str, float] = {"CPU": 1.0}


# ---------------------------------------------------------------------------------------------------------
# The requests themselves: the job code hands these to Ray as they are.


def worker_resources(section: TrainerConfig) -> dict[str, float]:
    """The ``resources_per_worker`` of the TorchTrainer of any trainer section (``train_vae``, ``train``,
    ``train_clip``): the custom resources first (an explicit ``CPU``/``GPU`` there wins, e.g. a fractional
    GPU), then ``cpus_per_worker`` CPUs, then one GPU when ``use_gpu`` (one worker = one data-parallel rank)."""
    resources = dict(section.resources_per_worker)
    resources.setdefault("CPU", section.cpus_per_worker)
    if section.use_gpu:
        resources.setdefault("GPU", 1.0)
    return resources


def encoder_actor_options(pre: PretokenizeConfig) -> dict[str, Any]:
    """``map_batches`` keyword arguments of pretokenize's dVAE encoder actor pool: a fixed pool of
    ``concurrency`` actors; ``num_gpus`` is None rather than 0 so CPU actors ask for no GPU at all."""
    return {"concurrency": pre.concurrency, "num_cpus": pre.num_cpus_per_actor,
            "num_gpus": pre.num_gpus_per_actor or None}


def deployment_actor_options(num_cpus: float, num_gpus: float) -> dict[str, float]:
    """Serve ``ray_actor_options`` of one replica; a fractional ``num_gpus`` lets replicas share a GPU."""
    return {"num_cpus": num_cpus, "num_gpus": num_gpus}


def client_actor_options(ev: EvaluateConfig) -> dict[str, Any]:
    """``map_batches`` keyword arguments of the evaluation driver's client actors. They only wait on
    deployment handles, so they take no CPU: every CPU stays with the replicas doing the work."""
    return {"concurrency": ev.driver_concurrency, "num_cpus": 0.0}


def prompts_in_flight(ev: EvaluateConfig) -> tuple[int, int]:
    """The prompts the evaluation driver keeps in flight (each client actor sends its whole batch at once), and
    how many keep every Generator busy: a replica's next batch waiting while it samples the current one, so
    ``2 x max_batch_size`` per replica. With fewer, replicas sample part-empty batches or wait on the clients."""
    return ev.driver_concurrency * ev.driver_batch_size, 2 * ev.generator_replicas * ev.max_batch_size


def sampler_bytes_per_value(sampling_precision: str, num_gpus: float) -> int:
    """Bytes per weight and per KV-cache value of a Generator replica (``sampling.precision``). The plan sees no
    device: ``auto`` on a GPU is taken as bf16 (every A100/H100 runs it), on a CPU as fp32, the safe side."""
    if sampling_precision == "auto":
        sampling_precision = "bf16" if num_gpus > 0 else "fp32"
    return element_bytes(sampling_precision)


def _as_resources(options: dict[str, Any]) -> dict[str, float]:
    """Ray's ``num_cpus``/``num_gpus`` options as the resource dict they reserve (no GPU key when none)."""
    resources = {"CPU": float(options.get("num_cpus") or 0.0)}
    if options.get("num_gpus"):
        resources["GPU"] = float(options["num_gpus"])
    return resources


def _totals(count: int, per_unit: dict[str, float]) -> dict[str, float]:
    return {key: round(count * value, 3) for key, value in per_unit.items()}


def _sum_totals(*groups: tuple[int, dict[str, float]]) -> dict[str, float]:
    """Resources of several pools together: ``(count, per unit)`` each."""
    total: dict[str, float] = {}
    for count, per_unit in groups:
        for key, value in _totals(count, per_unit).items():
            total[key] = round(total.get(key, 0.0) + value, 3)
    return total


def _gib(num_bytes: float) -> float:
    return round(num_bytes / GIB, 2)


# ---------------------------------------------------------------------------------------------------------
# Model sizes, from the real modules on the meta device.


def element_bytes(precision: str) -> int:
    """Bytes of one weight/activation element: bf16 and fp16 keep 2, fp32 keeps 4."""
    return 4 if precision == "fp32" else 2


def optimizer_bytes_per_param(precision: str) -> int:
    """AdamW's m and v in fp32, plus the fp32 master weights that mixed precision keeps."""
    return 8 if precision == "fp32" else 12


def dalle_sizes(cfg: Config) -> dict[str, float]:
    """Parameter count and training FLOPs per token of the configured DALLE, from the real module on ``meta``."""
    with torch.device("meta"):
        model = DALLE(cfg.dalle)
    layer = sum(p.numel() for p in model.blocks[0].parameters())
    return {
        "params": model.num_params(),
        "params_per_layer": layer,
        "flops_per_token": model.flops_per_token(),
        "seq_len": model.seq_len,
    }


def dvae_sizes(cfg: Config) -> dict[str, float]:
    """Parameters of the configured dVAE (all, and the encoder's) and the encoder's forward FLOPs for one
    image (what a pretokenize actor spends per pair), counted on the real module on ``meta``."""
    with torch.device("meta"):
        vae = DiscreteVAE(cfg.vae)
        image = torch.zeros(1, cfg.vae.channels, cfg.vae.image_size, cfg.vae.image_size)
        with FlopCounterMode(display=False) as counter:
            vae.encoder(image)
    return {
        "params": sum(p.numel() for p in vae.parameters()),
        "encoder_params": sum(p.numel() for p in vae.encoder.parameters()),
        "encoder_flops_per_image": float(counter.get_total_flops()),
    }


def clip_params(cfg: Config) -> int:
    """Parameters of the configured reranking CLIP."""
    with torch.device("meta"):
        return sum(p.numel() for p in CLIP(cfg.clip).parameters())


def train_memory_per_worker(cfg: Config, sizes: dict[str, float] | None = None) -> dict[str, float]:
    """GiB one training worker (one GPU) holds at its peak: model states under the ZeRO stage, activations of
    one micro batch, the loss's logits, ZeRO-3's gathered layers and, on GPUs, a fixed runtime overhead."""
    train, dalle = cfg.train, cfg.dalle
    sizes = sizes or dalle_sizes(cfg)
    params, n = sizes["params"], train.num_workers
    elem = element_bytes(train.precision)
    stage = train.zero_stage
    weights = elem * params / (n if stage >= 3 else 1)
    grads = elem * params / (n if stage >= 2 else 1)
    optimizer = optimizer_bytes_per_param(train.precision) * params / (n if stage >= 1 else 1)
    tokens = train.batch_size * sizes["seq_len"]
    layer_activations = tokens * dalle.dim * ACTIVATION_ELEMENTS_PER_DIM * elem
    if dalle.activation_checkpointing:  # each block's input is kept; one block's activations are recomputed
        activations = tokens * dalle.depth * dalle.dim * elem + layer_activations
    else:
        activations = dalle.depth * layer_activations
    # The loss scores text positions over the text vocabulary and image positions over the codebook; the
    # logits are kept in the model dtype and once more in fp32 by the cross-entropy.
    text_vocab = dalle.num_text_tokens + dalle.text_seq_len
    logit_elements = train.batch_size * (dalle.text_seq_len * text_vocab + dalle.image_seq_len * dalle.num_image_tokens)
    logits = logit_elements * (elem + 4)
    # ZeRO-3 all-gathers one layer for compute while prefetching the next.
    gathered = 2 * sizes["params_per_layer"] * elem if stage == 3 else 0
    parts = {
        "weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations,
        "logits": logits, "zero3_gathered": gathered,
    }
    out = {f"{key}_gib": _gib(value) for key, value in parts.items()}
    overhead = OVERHEAD_GIB if train.use_gpu else 0.0
    out["overhead_gib"] = overhead
    out["total_gib"] = round(sum(parts.values()) / GIB + overhead, 2)
    return out


# ---------------------------------------------------------------------------------------------------------
# One planner per job.


def _plan_trainer(name: str, section: TrainerConfig, parallelism: str, global_batch: int) -> dict[str, Any]:
    """What the one training runner builds for any trainer section: the TorchTrainer's workers, their
    placement and the run settings that decide how long it holds them and what a failure costs. Unless the
    data set is materialised first, Ray Data tasks stream it to the workers meanwhile: they need a CPU too."""
    per_worker = worker_resources(section)
    return {
        "ray": f"ray.train.torch.TorchTrainer ({parallelism})",
        "num_workers": section.num_workers,
        "min_workers": section.min_workers,  # > 0: elastic, the run goes on with as few as this many
        "resources_per_worker": per_worker,
        "placement_strategy": section.placement_strategy,
        "total": _totals(section.num_workers, per_worker),
        "data_tasks_cpu": 0.0 if section.materialize else RAY_DATA_TASK["CPU"],
        "sized_by": f"{name}.num_workers, {name}.cpus_per_worker, {name}.resources_per_worker, {name}.use_gpu",
        "global_batch": global_batch,
        "run": {
            "precision": section.precision,
            "batch_per_worker": section.batch_size,
            "max_steps": section.max_steps,
            "checkpoint_every": section.checkpoint_every,
            "keep_checkpoints": section.keep_checkpoints,
            "max_failures": section.max_failures,
        },
    }


def _plan_train(cfg: Config) -> dict[str, Any]:
    train = cfg.train
    sizes = dalle_sizes(cfg)
    sequences = train.batch_size * train.grad_accum * train.num_workers
    plan = _plan_trainer("train", train, f"DeepSpeed ZeRO-{train.zero_stage}", sequences)
    plan["deepspeed"] = {
        "zero_stage": train.zero_stage,
        "precision": train.precision,
        "micro_batch_per_worker": train.batch_size,
        "grad_accum": train.grad_accum,
        "sequences_per_step": sequences,
        "tokens_per_step": sequences * sizes["seq_len"],
    }
    plan["model"] = {key: sizes[key] for key in ("params", "seq_len", "flops_per_token")}
    plan["memory_per_worker"] = train_memory_per_worker(cfg, sizes)
    if train.peak_flops_per_worker > 0:
        ceiling = train.peak_flops_per_worker / sizes["flops_per_token"]
        plan["throughput_per_worker"] = {
            "peak_flops": train.peak_flops_per_worker,
            "tokens_per_s_at_100pct_mfu": round(ceiling),
            "assumed_mfu": ASSUMED_MFU,
            "tokens_per_s": round(ASSUMED_MFU * ceiling),
            "seconds_per_step": round(plan["deepspeed"]["tokens_per_step"]
                                      / (ASSUMED_MFU * ceiling * train.num_workers), 3),
        }
    return plan


def _plan_train_vae(cfg: Config) -> dict[str, Any]:
    tv = cfg.train_vae
    sizes = dvae_sizes(cfg)
    plan = _plan_trainer("train_vae", tv, "DDP", tv.batch_size * tv.num_workers)
    plan["pictures_per_run"] = plan["global_batch"] * tv.max_steps
    plan["model"] = {"params": sizes["params"], "encoder_params": sizes["encoder_params"],
                     "image_size": cfg.vae.image_size, "image_seq_len": cfg.vae.image_seq_len,
                     "encoder_flops_per_image": sizes["encoder_flops_per_image"]}
    plan["decode_tasks"] = {"resources_per_task": RAY_DATA_TASK, "note": "Ray Data decodes raw shards on free CPUs"}
    return plan


def _plan_train_clip(cfg: Config) -> dict[str, Any]:
    tc = cfg.train_clip
    plan = _plan_trainer("train_clip", tc, "DDP", tc.batch_size * tc.num_workers)
    plan["model"] = {"params": clip_params(cfg)}
    return plan


def _plan_pretokenize(cfg: Config) -> dict[str, Any]:
    pre = cfg.pretokenize
    options = encoder_actor_options(pre)
    per_actor = _as_resources(options)
    gpus = per_actor.get("GPU", 0.0)
    return {
        "ray": "ray.data map_batches(dVAE encoder class, concurrency=N actors)",
        "encode_actors": {
            "concurrency": options["concurrency"],
            "resources_per_actor": per_actor,
            "batch_size": pre.batch_size,
            "actors_per_gpu": round(1 / gpus, 2) if gpus > 0 else 0,
        },
        "decode_tasks": {"resources_per_task": RAY_DATA_TASK, "note": "stateless Ray Data tasks on every free CPU"},
        "total": _totals(options["concurrency"], per_actor),
        "data_tasks_cpu": RAY_DATA_TASK["CPU"],  # the decode tasks that feed the actors run beside them
        "sized_by": "pretokenize.concurrency, pretokenize.num_cpus_per_actor, pretokenize.num_gpus_per_actor",
        # An imported tokenizer's size is in its file, not in the config (see jobs/import_model.py's output).
        "dvae_encoder_flops_per_image": (dvae_sizes(cfg)["encoder_flops_per_image"]
                                         if cfg.vae.kind == "DiscreteVAE" else None),
        "image_tokenizer": cfg.vae.kind,
    }


def _plan_evaluate(cfg: Config) -> dict[str, Any]:
    ev, sampling, dalle = cfg.evaluate, cfg.sampling, cfg.dalle
    generator = _as_resources(deployment_actor_options(ev.generator_num_cpus, ev.generator_num_gpus))
    scorer = _as_resources(deployment_actor_options(ev.scorer_num_cpus, ev.scorer_num_gpus))
    ingress = _as_resources(deployment_actor_options(0.0, 0.0))  # DalleApp only routes requests
    client = client_actor_options(ev)
    driver = _as_resources(client)
    total = _sum_totals((ev.generator_replicas, generator), (ev.scorer_replicas, scorer), (1, ingress),
                        (client["concurrency"], driver))
    sizes = dalle_sizes(cfg)
    # One @serve.batch pass samples every candidate of every prompt in the batch, twice with guidance.
    rows = ev.max_batch_size * sampling.num_candidates * (2 if sampling.cond_scale != 1 else 1)
    inner = dalle.heads * dalle.dim_head
    value_bytes = sampler_bytes_per_value(sampling.precision, ev.generator_num_gpus)
    kv_cache = rows * sizes["seq_len"] * dalle.depth * 2 * inner * value_bytes  # keys + values
    weights = value_bytes * sizes["params"]
    in_flight, needed = prompts_in_flight(ev)
    return {
        "ray": "ray.serve application (Generator + Scorer) driven by ray.data",
        "generator": {"num_replicas": ev.generator_replicas, "resources_per_replica": generator,
                      "max_batch_size": ev.max_batch_size, "rows_per_pass": rows},
        "scorer": {"num_replicas": ev.scorer_replicas, "resources_per_replica": scorer,
                   "max_batch_size": ev.scorer_max_batch_size},
        "ingress": {"num_replicas": 1, "resources_per_replica": ingress},
        "driver": {"concurrency": client["concurrency"], "resources_per_actor": driver,
                   "batch_size": ev.driver_batch_size, "prompts_in_flight": in_flight,
                   "prompts_in_flight_to_keep_generators_busy": needed},
        "total": total,
        "sized_by": "evaluate.generator_replicas, evaluate.generator_num_cpus, evaluate.generator_num_gpus, "
                    "evaluate.scorer_replicas, evaluate.scorer_num_cpus, evaluate.scorer_num_gpus",
        "generator_memory_gib": {"bytes_per_value": value_bytes, "weights": _gib(weights),
                                 "kv_cache": _gib(kv_cache), "total": _gib(weights + kv_cache)},
    }


def _plan_make_synthetic(cfg: Config) -> dict[str, Any]:
    syn = cfg.synthetic
    return {
        "ray": "none: the driver renders and writes every shard itself",
        "driver": {"num_samples": syn.num_samples, "image_size": syn.image_size,
                   "samples_per_shard": syn.samples_per_shard,
                   "shards": math.ceil(syn.num_samples / syn.samples_per_shard)},
        "total": {},
    }


def _plan_ingest(cfg: Config) -> dict[str, Any]:
    ing = cfg.ingest
    if ing.source == "urls":
        return {
            "ray": "none: img2dataset downloads in its own processes on the driver machine",
            "source": ing.source,
            "img2dataset": {"processes": ing.processes_count, "threads_per_process": ing.thread_count,
                            "parallel_downloads": ing.processes_count * ing.thread_count,
                            "samples_per_shard": ing.samples_per_shard, "image_size": ing.image_size},
            "total": {},
        }
    unit = "input tar" if ing.source == "webdataset" else f"{ing.samples_per_shard} pairs"
    return {
        "ray": "ray.data from_items(one block per output shard).map(write one shard)",
        "source": ing.source,
        "shard_tasks": {"resources_per_task": RAY_DATA_TASK, "one_task_per": unit,
                        "note": "as many at once as CPUs are free"},
        "total": {},
    }


def _plan_train_tokenizer(cfg: Config) -> dict[str, Any]:
    tok = cfg.tokenizer
    return {
        "ray": "ray.data read_parquet + map_batches(normalise captions), then youtokentome on the driver",
        "read_tasks": {"resources_per_task": RAY_DATA_TASK, "note": "one read per raw shard, on free CPUs"},
        "driver": {"trainer": "youtokentome BPE on every core of the driver machine (n_threads=-1)",
                   "vocab_size": tok.vocab_size, "text_seq_len": tok.text_seq_len,
                   "memory": "every normalised caption is gathered on the driver"},
        "total": {},
    }


_PLANNERS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "make_synthetic": _plan_make_synthetic, "ingest": _plan_ingest, "train_tokenizer": _plan_train_tokenizer,
    "train_vae": _plan_train_vae, "pretokenize": _plan_pretokenize, "train": _plan_train,
    "train_clip": _plan_train_clip, "evaluate": _plan_evaluate,
}
JOBS = tuple(_PLANNERS)  # the chain in the order it runs


def plan_resources(job: str, cfg: Config) -> dict[str, Any]:
    """What ``job`` would ask Ray for under ``cfg``: a JSON-ready dict with the per-unit resources, the sizes
    behind them, and ``total``: the CPUs and GPUs its workers, actors and replicas hold for the whole run
    (``total["GPU"]`` is the number of GPUs the job occupies; Ray Data tasks come on top, on free CPUs)."""
    if job not in _PLANNERS:
        raise ValueError(f"unknown job {job!r}; expected one of {JOBS}")
    plan = _PLANNERS[job](cfg)
    plan["total"] = {"CPU": 0.0, "GPU": 0.0, **plan["total"]}
    return {"job": job, **plan}
