"""Timing helpers the model benchmarks share: one training step, one sampling pass, ours and the reference's,
in the same process, thread count, dtype and device (the device of the data handed in: CPU or CUDA)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from dalle_core.dalle import DALLE
from dalle_core.train_utils import clock, measure_peak_flops, mfu

PEER_STUBS = Path(__file__).resolve().parents[1].parent / "shared" / "peer" / "stubs"


def import_peer() -> tuple[type, type] | None:
    """DALLE-pytorch 1.6.6's ``DALLE`` and ``DiscreteVAE`` where ``make bench`` installed it, else None."""
    sys.path.insert(0, str(PEER_STUBS))
    try:
        from dalle_pytorch import DALLE as PeerDALLE
        from dalle_pytorch import DiscreteVAE as PeerVAE
    except ImportError:
        return None
    return PeerDALLE, PeerVAE


def peer_params(peer: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in peer.named_parameters() if not n.startswith("vae."))


def autocast(dtype: torch.dtype, device: torch.device) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def train_step_seconds(model: torch.nn.Module, peer: bool, dtype: torch.dtype, steps: int,
                       data: tuple[torch.Tensor, torch.Tensor], warmup: int = 2) -> float:
    """Median seconds of one forward+backward+AdamW step (after ``warmup`` steps: allocator, kernel choice).
    Both models get the fused AdamW our trainers use, so the ratio compares the models, not the optimizers."""
    text, codes = data
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    times = []
    for i in range(steps + warmup):
        start = clock(text.device)
        with autocast(dtype, text.device):
            out = model(text, codes, return_loss=True)
        (out if peer else out[0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(clock(text.device) - start)
    return sorted(times)[len(times) // 2]


def generation_seconds(model: DALLE, text: torch.Tensor, cond_scale: float, dtype: torch.dtype,
                       use_cache: bool = True, step: Callable | None = None) -> float:
    """Seconds of one ``generate_image_codes`` pass (``step``: a compiled sampling step)."""
    start = clock(text.device)
    with autocast(dtype, text.device):
        model.generate_image_codes(text, use_cache=use_cache, cond_scale=cond_scale, step=step,
                                   generator=torch.Generator(text.device).manual_seed(0))
    return clock(text.device) - start


def peer_generation_seconds(peer: torch.nn.Module, text: torch.Tensor, cond_scale: float, dtype: torch.dtype) -> float:
    """The reference's ``generate_images`` (codes plus its small dVAE's decode); it only uses its key/value
    cache when guided (its bug 2), so compare guided with guided."""
    start = clock(text.device)
    with autocast(dtype, text.device):
        peer.generate_images(text, use_cache=True, cond_scale=cond_scale)
    return clock(text.device) - start


def device_seconds(work: Callable[[], object], device: torch.device | str) -> float:
    """Seconds ``work`` keeps ``device`` busy. On a GPU: two CUDA events around the work it queues and one
    synchronisation at the end, so the launches overlap the products as in a training step (a sync after each
    product adds its launch latency to every one, and a peak read that way is low, the MFU against it high).
    On a CPU the work has finished when ``work`` returns, and the wall clock is right."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


def matmul_peak(dtype: torch.dtype, model: DALLE, tokens: int) -> float:
    """Best of several readings of the model's two largest matmuls (feed-forward in, image logits), in its
    dtype; the ceiling an MFU is a share of."""
    cfg, device = model.config, next(model.parameters()).device
    shapes = [(tokens, cfg.dim, 2 * cfg.ff_mult * cfg.dim), (tokens, cfg.dim, cfg.num_image_tokens)]
    return max(measure_peak_flops(device, dtype=dtype, shape=shape, seconds=0.5, readings=4) for shape in shapes)


def checked_mfu(name: str, tokens_per_s: float, model: DALLE, peak: float) -> float:
    """The share of ``peak`` a training rate reaches; above 1 the peak was read wrong, so nothing is reported."""
    share = mfu(tokens_per_s, model.flops_per_token(), peak)
    if share > 1:
        raise SystemExit(f"{name}: MFU {share:.2f} > 1 means the matmul peak was read low; not reporting it")
    return share


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What a figure depends on: on a CPU its SIMD level, native bf16 and threads; on a GPU its name, compute
    capability and native bf16."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
                "cuda_bf16": torch.cuda.is_bf16_supported(), "torch": torch.__version__}
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "threads": torch.get_num_threads()}


def write_report(report: dict, out: str) -> None:
    """Prints the report as JSON, and writes it to ``out`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text)
