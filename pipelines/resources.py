"""What each job would ask Ray for, worked out from the config alone: no Ray, no cluster, no weights.

``plan_resources(job, cfg)`` is what ``jobs/dry_run.py`` (and each job's ``--dry-run``) prints, so a user sees
the workers, CPUs and GPUs per worker, placement, actor pools and replicas, plus the memory per GPU and the
FLOPs that size them, before a single GPU is reserved. The model sizes come from the real modules built on
PyTorch's ``meta`` device (shapes only, no memory), so the numbers cannot drift from the code.

Memory per training GPU follows the ZeRO paper (Rajbhandari et al. 2020): with mixed precision every parameter
costs 2 bytes of weights, 2 of gradients and 12 of optimizer state (fp32 master copy + Adam m and v); stage 1
partitions the optimizer state over the data-parallel workers, stage 2 also the gradients, stage 3 also the
weights. Activations are what autograd keeps for backward: ``ACTIVATION_ELEMENTS_PER_DIM`` elements per token,
per layer, per unit of model width (measured on ``DALLE`` with saved-tensor hooks, flash/causal attention, no
activation checkpointing; ``tests/test_infra.py`` re-measures it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dalle_core.dalle import DALLE
from dalle_core.vae import DiscreteVAE
from pipelines.config import Config, TrainConfig

GIB = 1024**3
ACTIVATION_ELEMENTS_PER_DIM = 27  # saved-for-backward elements per token and layer, divided by `dim`
ASSUMED_MFU = 0.4  # model-FLOPs utilisation that a tuned ZeRO data-parallel run reaches on A100/H100
# Runtime memory that scales with neither the model nor the batch: CUDA context, NCCL and DeepSpeed buckets.
OVERHEAD_GIB = 3.0


def element_bytes(precision: str) -> int:
    """Bytes of one weight/activation element: bf16 and fp16 keep 2, fp32 keeps 4."""
    return 4 if precision == "fp32" else 2


def optimizer_bytes_per_param(precision: str) -> int:
    """AdamW's m and v in fp32, plus the fp32 master weights that mixed precision keeps."""
    return 8 if precision == "fp32" else 12


def train_worker_resources(train: TrainConfig) -> dict[str, float]:
    """The ``resources_per_worker`` of the TorchTrainer: custom resources first, then CPUs, then one GPU
    per worker when ``use_gpu`` (one worker = one data-parallel rank = one GPU)."""
    resources = dict(train.resources_per_worker)
    resources.setdefault("CPU", train.cpus_per_worker)
    if train.use_gpu:
        resources.setdefault("GPU", 1)
    return resources


def _totals(count: int, per_unit: dict[str, float]) -> dict[str, float]:
    return {key: round(count * value, 3) for key, value in per_unit.items()}


def _gib(num_bytes: float) -> float:
    return round(num_bytes / GIB, 2)


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
    activations = tokens * dalle.depth * dalle.dim * ACTIVATION_ELEMENTS_PER_DIM * elem
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


def _plan_train(cfg: Config) -> dict[str, Any]:
    train = cfg.train
    per_worker = train_worker_resources(train)
    sizes = dalle_sizes(cfg)
    sequences = train.batch_size * train.grad_accum * train.num_workers
    plan: dict[str, Any] = {
        "ray": "ray.train.torch.TorchTrainer",
        "num_workers": train.num_workers,
        "resources_per_worker": per_worker,
        "placement_strategy": train.placement_strategy,
        "total": _totals(train.num_workers, per_worker),
        "deepspeed": {
            "zero_stage": train.zero_stage,
            "precision": train.precision,
            "micro_batch_per_worker": train.batch_size,
            "grad_accum": train.grad_accum,
            "sequences_per_step": sequences,
            "tokens_per_step": sequences * sizes["seq_len"],
        },
        "model": {
            "params": sizes["params"],
            "seq_len": sizes["seq_len"],
            "flops_per_token": sizes["flops_per_token"],
        },
        "memory_per_worker": train_memory_per_worker(cfg, sizes),
    }
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


def dvae_encoder_flops(cfg: Config) -> float:
    """Forward FLOPs of the dVAE encoder for one image (what a pretokenize actor spends per pair)."""
    with torch.device("meta"):
        vae = DiscreteVAE(cfg.vae)
        image = torch.zeros(1, cfg.vae.channels, cfg.vae.image_size, cfg.vae.image_size)
        with FlopCounterMode(display=False) as counter:
            vae.encoder(image)
    return float(counter.get_total_flops())


def _plan_pretokenize(cfg: Config) -> dict[str, Any]:
    pre = cfg.pretokenize
    per_actor = {"CPU": pre.num_cpus_per_actor}
    if pre.num_gpus_per_actor > 0:
        per_actor["GPU"] = pre.num_gpus_per_actor
    return {
        "ray": "ray.data map_batches(dVAE encoder class, concurrency=N actors)",
        "encode_actors": {
            "concurrency": pre.concurrency,
            "resources_per_actor": per_actor,
            "batch_size": pre.batch_size,
            "actors_per_gpu": round(1 / pre.num_gpus_per_actor, 2) if pre.num_gpus_per_actor > 0 else 0,
        },
        "decode_tasks": {"resources_per_task": {"CPU": 1}, "note": "stateless Ray Data tasks on every free CPU"},
        "total": _totals(pre.concurrency, per_actor),
        "dvae_encoder_flops_per_image": dvae_encoder_flops(cfg),
    }


def _plan_evaluate(cfg: Config) -> dict[str, Any]:
    ev, sampling, dalle = cfg.evaluate, cfg.sampling, cfg.dalle
    generator = {"CPU": ev.generator_num_cpus}
    scorer = {"CPU": ev.scorer_num_cpus}
    if ev.generator_num_gpus > 0:
        generator["GPU"] = ev.generator_num_gpus
    if ev.scorer_num_gpus > 0:
        scorer["GPU"] = ev.scorer_num_gpus
    driver = {"CPU": 1.0}
    total: dict[str, float] = {}
    for count, per in ((ev.generator_replicas, generator), (ev.scorer_replicas, scorer),
                       (ev.driver_concurrency, driver)):
        for key, value in _totals(count, per).items():
            total[key] = round(total.get(key, 0.0) + value, 3)
    sizes = dalle_sizes(cfg)
    # One @serve.batch pass samples every candidate of every prompt in the batch, twice with guidance.
    rows = ev.max_batch_size * sampling.num_candidates * (2 if sampling.cond_scale != 1 else 1)
    inner = dalle.heads * dalle.dim_head
    kv_cache = rows * sizes["seq_len"] * dalle.depth * 2 * inner * 4  # keys + values, fp32 checkpoint dtype
    return {
        "ray": "ray.serve application (Generator + Scorer) driven by ray.data",
        "generator": {"num_replicas": ev.generator_replicas, "resources_per_replica": generator,
                      "max_batch_size": ev.max_batch_size, "rows_per_pass": rows},
        "scorer": {"num_replicas": ev.scorer_replicas, "resources_per_replica": scorer,
                   "max_batch_size": ev.scorer_max_batch_size},
        "driver": {"concurrency": ev.driver_concurrency, "resources_per_actor": driver},
        "total": total,
        "generator_memory_gib": {"weights": _gib(4 * sizes["params"]), "kv_cache": _gib(kv_cache),
                                 "total": _gib(4 * sizes["params"] + kv_cache)},
    }


def _plan_train_clip(cfg: Config) -> dict[str, Any]:
    clip = cfg.train_clip
    per_worker: dict[str, float] = {"CPU": clip.cpus_per_worker}
    if clip.use_gpu:
        per_worker["GPU"] = 1
    return {
        "ray": "ray.train.torch.TorchTrainer (DDP)",
        "num_workers": clip.num_workers,
        "resources_per_worker": per_worker,
        "total": _totals(clip.num_workers, per_worker),
        "global_batch": clip.batch_size * clip.num_workers,
    }


_PLANNERS = {"pretokenize": _plan_pretokenize, "train": _plan_train, "evaluate": _plan_evaluate,
             "train_clip": _plan_train_clip}
JOBS = tuple(_PLANNERS)


def plan_resources(job: str, cfg: Config) -> dict[str, Any]:
    """What ``job`` would ask Ray for under ``cfg``: a JSON-ready dict with the per-unit resources, the
    totals (``total["GPU"]`` is the number of GPUs the job occupies) and the sizes behind them."""
    if job not in _PLANNERS:
        raise ValueError(f"unknown job {job!r}; expected one of {JOBS}")
    return {"job": job, **_PLANNERS[job](cfg)}
