"""Throughput helpers shared by training metrics and benchmarks: measured matmul peak and MFU."""

from __future__ import annotations

import time

import torch


def measure_matmul_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", size: int = 1024,
                         seconds: float = 1.0) -> float:
    """Sustained FLOP/s of a square matmul on this device: the ceiling that model-FLOPs utilisation divides by
    on machines without a datasheet number (CPUs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model-FLOPs utilisation: the fraction of the peak that the model's own arithmetic uses."""
    return tokens_per_second * flops_per_token / peak_flops if peak_flops > 0 else 0.0
