"""Speed at the paper's shape: text 256 + a 32x32 grid (1280 positions), 8192 codes, every attention pattern.

    python benchmarks/bench_paper_shape.py [--out benchmarks/results/bench_paper_shape.json]

Per pattern: training tokens/s (forward, backward, AdamW) of ours and of DALLE-pytorch 1.6.6 in this process
(``make bench`` installs it), alternating, best of several rounds, then ours compiled (``train.compile``); the
share of the matmul peak measured here at the model's own matmul shapes; cached image tokens/s at batch 1, 8
and 32, plain and guided, eager and through the compiled step (``sampling.compile``), with our weights in the
sampler's dtype (the reference under autocast: it has no such setting); and the peak memory one training step
takes with and without activation checkpointing (each in a fresh process, so the high-water mark is its own).
Everything runs in the dtype this machine computes natively (``precision: auto``), on the CPU or, with
``--device cuda``, on one GPU (there the memory figures are the allocator's peak, not the resident set).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from model_timing import (
    checked_mfu,
    generation_seconds,
    import_peer,
    machine_info,
    matmul_peak,
    peer_generation_seconds,
    peer_params,
    train_step_seconds,
    write_report,
)

from dalle_core.config import ATTN_TYPES, DALLEConfig
from dalle_core.dalle import DALLE
from dalle_core.train_utils import DTYPES, clock, peak_memory_bytes, resolve_precision

SHAPE = {"text_seq_len": 256, "image_fmap_size": 32, "num_image_tokens": 8192, "num_text_tokens": 16384,
         "dim": 512, "depth": 2, "heads": 8, "dim_head": 64}


def our_model(kind: str, **overrides: object) -> DALLE:
    return DALLE(DALLEConfig(**{**SHAPE, "attn_types": [kind], **overrides}))


def peer_model(kind: str) -> torch.nn.Module | None:
    """DALLE-pytorch 1.6.6 with the same transformer (its dVAE is only there for its code grid)."""
    classes = import_peer()
    if classes is None:
        return None
    peer_dalle, peer_vae = classes
    vae = peer_vae(image_size=SHAPE["image_fmap_size"] * 8, num_layers=3, num_tokens=SHAPE["num_image_tokens"],
                   codebook_dim=64, hidden_dim=16)
    return peer_dalle(dim=SHAPE["dim"], vae=vae, num_text_tokens=SHAPE["num_text_tokens"],
                      text_seq_len=SHAPE["text_seq_len"], depth=SHAPE["depth"], heads=SHAPE["heads"],
                      dim_head=SHAPE["dim_head"], attn_types=(kind,), rotary_emb=True, shift_tokens=True)


def captions(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random captions (a quarter of each padded) and image codes, the same for every model."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, SHAPE["num_text_tokens"], (batch, SHAPE["text_seq_len"]), generator=g)
    text[:, SHAPE["text_seq_len"] * 3 // 4:] = 0
    codes = torch.randint(0, SHAPE["num_image_tokens"], (batch, SHAPE["image_fmap_size"] ** 2), generator=g)
    return text.to(device), codes.to(device)


def attention_seconds(kind: str, dtype: torch.dtype, device: torch.device, sparse_path: str,
                      repeats: int = 5) -> float:
    """Median seconds of one layer's attention, forward and backward, at the paper shape: what a pattern saves
    where attention is the cost (deep, wide models), apart from the matmuls around it."""
    model = our_model(kind, sparse_attention=sparse_path).to(device)
    block, tables = model.blocks[0], model._tables()
    q, k, v = (torch.randn(1, SHAPE["heads"], model.seq_len, SHAPE["dim_head"], dtype=dtype, device=device,
                           requires_grad=True) for _ in range(3))
    times = []
    for _ in range(repeats + 1):
        start = clock(device)
        block._attend(q, k, v, 0, tables).sum().backward()
        times.append(clock(device) - start)
    return sorted(times[1:])[repeats // 2]


def memory_probe(checkpointing: bool, dtype: torch.dtype, device: torch.device, batch: int) -> dict:
    """Peak memory of one training step at the paper shape, run in this (fresh) process: the resident set's
    high-water mark on a CPU, the allocator's peak on a GPU."""
    model = our_model("full", activation_checkpointing=checkpointing).to(device)
    data = captions(batch, device)
    before = peak_memory_bytes(device)
    train_step_seconds(model, False, dtype, steps=1, data=data, warmup=0)
    what = memory_measure(device)
    return {f"peak_{what}_bytes": peak_memory_bytes(device), f"{what}_before_step_bytes": before}


def memory_measure(device: torch.device) -> str:
    return "allocated" if device.type == "cuda" else "rss"


def probe_in_subprocess(checkpointing: bool, precision: str, device: torch.device, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", str(int(checkpointing)), "--precision", precision,
           "--device", device.type, "--memory-batch", str(batch)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best round counts")
    parser.add_argument("--patterns", nargs="+", default=list(ATTN_TYPES), choices=ATTN_TYPES)
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--memory-batch", type=int, default=8, help="sequences in the memory probe's step")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile figures of training and sampling (about 25 s of compiling each)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--memory-probe", type=int, choices=(0, 1), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    dtype = DTYPES[precision]
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(bool(args.memory_probe), dtype, device, args.memory_batch)))
        return

    torch.manual_seed(0)
    data = captions(1, device)
    report: dict = {
        "shape": {**SHAPE, "batch": 1, "seq_len": SHAPE["text_seq_len"] + SHAPE["image_fmap_size"] ** 2},
        "machine": machine_info(device),
        "dtype": precision, "train": {}, "generate": {}, "memory": {},
    }
    for kind in args.patterns:
        ours, peer = our_model(kind).to(device), peer_model(kind)
        peer = peer if peer is None else peer.to(device)
        tokens = ours.seq_len
        print(f"[train] {kind}", file=sys.stderr, flush=True)
        best_ours = best_peer = float("inf")
        peak = 0.0
        for _ in range(args.rounds):
            peak = max(peak, matmul_peak(dtype, ours, tokens))
            best_ours = min(best_ours, train_step_seconds(ours, False, dtype, args.steps, data))
            if peer is not None:
                best_peer = min(best_peer, train_step_seconds(peer, True, dtype, args.steps, data))
        tps = tokens / best_ours
        share = checked_mfu(kind, tps, ours, peak)
        entry = {"tokens_per_s": tps, "step_s": best_ours, "flops_per_token": ours.flops_per_token(),
                 "matmul_peak_gflops": peak / 1e9, "mfu": share, "params": ours.num_params()}
        if peer is not None:
            entry.update(reference_tokens_per_s=tokens / best_peer, speedup_vs_reference=best_peer / best_ours,
                         reference_params=peer_params(peer))
        if args.compile:  # as `train.compile: true` runs it: the whole model one graph, after compiling on step 1
            print(f"[train] {kind} compiled", file=sys.stderr, flush=True)
            ours.compile()
            first = train_step_seconds(ours, False, dtype, steps=1, data=data, warmup=0)  # compiles, then steps
            compiled = min(train_step_seconds(ours, False, dtype, args.steps, data) for _ in range(args.rounds))
            entry.update(compile_s=first - compiled, compiled_step_s=compiled,
                         compiled_tokens_per_s=tokens / compiled, compiled_speedup_vs_eager=best_ours / compiled,
                         compiled_mfu=checked_mfu(kind, tokens / compiled, ours, peak))
            if peer is not None:
                entry["compiled_speedup_vs_reference"] = best_peer / compiled
        report["train"][kind] = entry

        gen: dict = {}
        image_tokens = SHAPE["image_fmap_size"] ** 2
        ours = ours.to(dtype)  # as the sampler runs it (sampling.precision): weights, and so the KV cache, in dtype
        step = None
        if args.compile:  # as `sampling.compile` runs it: one graph for 1 row, one for more; the first pass compiles
            step = ours.compiled_sampling_step()
            gen["compiled_first_pass_s"] = {f"batch_{b}": generation_seconds(ours, captions(b, device)[0], 1.0,
                                                                             dtype, step=step) for b in (1, 2)}
        for batch in args.gen_batches:
            print(f"[generate] {kind} batch {batch}", file=sys.stderr, flush=True)
            text = captions(batch, device)[0]
            plain, guided = (generation_seconds(ours, text, scale, dtype) for scale in (1.0, 3.0))
            entry = gen[f"batch_{batch}"] = {"image_tokens_per_s": batch * image_tokens / plain,
                                             "guided_image_tokens_per_s": batch * image_tokens / guided,
                                             "guidance_cost": guided / plain}
            if step is not None:
                plain, guided = (generation_seconds(ours, text, scale, dtype, step=step) for scale in (1.0, 3.0))
                entry.update(compiled_image_tokens_per_s=batch * image_tokens / plain,
                             compiled_guided_image_tokens_per_s=batch * image_tokens / guided,
                             compiled_guidance_cost=guided / plain)
        if peer is not None:
            text = captions(1, device)[0]
            peer_guided = peer_generation_seconds(peer, text, 3.0, dtype)
            gen["reference_batch_1_guided_image_tokens_per_s"] = image_tokens / peer_guided
            # ours again, right beside the reference's pass: this machine's speed drifts over a run
            gen["guided_speedup_vs_reference"] = peer_guided / generation_seconds(ours, text, 3.0, dtype)
            if step is not None:
                gen["compiled_guided_speedup_vs_reference"] = peer_guided / generation_seconds(ours, text, 3.0, dtype,
                                                                                               step=step)
        report["generate"][kind] = gen
        print(json.dumps({kind: {"train": report["train"][kind], "generate": gen}}), file=sys.stderr, flush=True)

    full = report["train"].get("full")
    if full:
        for entry in report["train"].values():
            entry["step_cost_vs_full"] = entry["step_s"] / full["step_s"]
            if "compiled_step_s" in entry:
                entry["compiled_step_cost_vs_full"] = entry["compiled_step_s"] / full["compiled_step_s"]
    attention: dict = {"full_ms": attention_seconds("full", dtype, device, "structured") * 1e3}
    for kind in set(args.patterns) - {"full"}:
        for path in ("structured", "mask"):
            attention[f"{kind}_{path}_ms"] = attention_seconds(kind, dtype, device, path) * 1e3
        attention[f"{kind}_cost_vs_full"] = attention[f"{kind}_structured_ms"] / attention["full_ms"]
    report["attention_one_layer"] = attention

    print(f"[memory] batch {args.memory_batch}", file=sys.stderr, flush=True)
    probes = {name: probe_in_subprocess(on, precision, device, args.memory_batch)
              for name, on in (("stored", False), ("checkpointed", True))}
    peak = f"peak_{memory_measure(device)}_bytes"
    report["memory"] = {"batch": args.memory_batch, **probes,
                        "saved_bytes": probes["stored"][peak] - probes["checkpointed"][peak]}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
