"""Model-agnostic training maths shared by the Ray Train jobs and the bare benchmark loop (pure torch).

Kept apart from the Ray glue so the LR schedule, optimiser grouping, batch collation and MFU arithmetic
are the same numbers whether a step runs under DeepSpeed in a Ray worker or in a plain loop.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from dalle_core.config import OptimConfig
from dalle_core.tokenizer import pad_text_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the precision names' dtypes


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps`` (held there after).

    ``step`` counts optimiser steps already taken, so step 0 (the first update) gets a small non-zero
    LR instead of wasting a step at LR 0.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable LR lambda (LambdaLR stores callable objects' ``__dict__`` in its state_dict)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW with weight decay on matrices only: decaying biases, norms and 1-D gains hurts. Fused (one
    kernel over every tensor) where the parameters allow: on CPU the per-tensor loop took 0.34 s a step for a
    34 M-parameter DALLE, the fused kernel 0.016 s."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas),
                             fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine as a LambdaLR, stepped once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(optim.warmup_steps, total_steps, optim.min_lr_ratio))


def collate_tokens(text_ids: Sequence[Sequence[int]], image_codes: Sequence[Sequence[int]] | np.ndarray,
                   text_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-shard rows -> (text [B, text_seq_len] long with 0 = pad, codes [B, image_seq_len] long).

    Text is stored unpadded with variable length, so it is truncated and right-padded here; codes are a
    fixed-size list column (uint16 on disk) and only need stacking and widening.
    """
    codes = np.stack([np.asarray(c, dtype=np.int64) for c in image_codes]) if len(image_codes) else \
        np.zeros((0, 0), dtype=np.int64)
    return pad_text_ids(text_ids, text_seq_len, truncate=True), torch.from_numpy(codes)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak of the workers used."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else 0.0


def clock(device: torch.device | str) -> float:
    """The wall clock once ``device`` has run the work queued on it (CUDA kernels return before they finish)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure_peak_flops(device: torch.device | str = "cpu", size: int = 512, seconds: float = 0.3,
                       dtype: torch.dtype = torch.float32, shape: tuple[int, int, int] | None = None,
                       readings: int = 3) -> float:
    """Dense-matmul FLOP/s this process reaches now: the practical peak when no spec-sheet number is given.

    Measured rather than assumed because CPU peaks depend on cores, SIMD width and what else is running. A busy
    moment reads low (and an MFU against it high), so the best of ``readings`` counts; ``shape`` ``(m, k, n)``
    times the model's own matmul instead of a ``size`` square. On a GPU each reading is a batch of products
    launched back to back between two CUDA events with one synchronisation at the end: a sync after every
    product added its launch latency to each, so the peak read low and the MFU high.
    """
    m, k, n = shape or (size, size, size)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    cuda = torch.device(device).type == "cuda"

    def timed(count: int) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        for _ in range(count):
            torch.matmul(a, b, out=out)
        if not cuda:
            return time.perf_counter() - began
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    timed(2)  # warm-up: thread pool, kernel selection, clocks
    count, elapsed = 1, timed(1)
    while elapsed < seconds / 8 and count < 1 << 20:
        count *= 4
        elapsed = timed(count)
    count = max(1, round(count * seconds / max(elapsed, 1e-9)))
    return max(2.0 * m * k * n * count / timed(count) for _ in range(readings))


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak memory of this worker: allocator peak on GPU, resident set high-water mark on CPU. On Linux that is
    ``VmHWM`` of this address space: ``ru_maxrss`` survives ``exec``, so a fresh worker or probe process would
    report its parent's peak (seen: a probe child read its 3 GB parent's figure, with and without checkpointing)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if sys.platform.startswith("linux"):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def annealed_temperature(step: int, start: float, rate: float, minimum: float) -> float:
    """Gumbel-softmax temperature for the dVAE: ``start * exp(-rate * step)``, floored at ``minimum``
    (high early so every code gets gradient, low late so samples approach the hard argmax)."""
    return max(start * math.exp(-rate * step), minimum)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively. On CPUs without AVX512-BF16/AMX, bf16 matmuls run an order of
    magnitude slower than fp32 (seen: 1.3 vs 41.5 GFLOP/s per thread on an AVX2-only EPYC)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``bf16`` where the device computes it natively, else ``fp32``; other values stay."""
    return precision_choice(precision, device)[0]


def precision_choice(precision: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """The precision a run uses and why, for its log: ``auto`` resolved by :func:`native_bf16`, and a warning
    when ``bf16`` is asked for on a device that would emulate it."""
    device = torch.device(device)
    native = native_bf16(device)
    what = f"native bf16 ({'CUDA' if device.type == 'cuda' else 'mkldnn: AVX512-BF16/AMX'})"
    if precision == "auto":
        return ("bf16", f"auto: this {device.type} has {what}") if native else \
            ("fp32", f"auto: this {device.type} has no {what}")
    if precision == "bf16" and not native:
        return "bf16", (f"WARNING: bf16 set, but this {device.type} has no {what}; expect it many times slower "
                        "than fp32 (precision: auto would pick fp32)")
    return precision, "set in the config"


def gather_floats(values: Sequence[float], device: torch.device | str) -> list[list[float]]:
    """Every rank's ``values`` (same length on each), on every rank; one collective. The tensor lives on the
    worker's ``device``: NCCL, the process group Ray Train sets up on GPU workers, takes CUDA tensors only
    (a CPU tensor here raised at the first checkpoint of every GPU run). Without a process group: ``[values]``."""
    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [local.tolist()]
    gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, local)
    return [t.tolist() for t in gathered]
