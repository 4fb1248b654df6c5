"""Throughput of jobs/pretokenize on the synthetic set against the raw image-tokenizer encoder (the limit), as JSON.

    python benchmarks/bench_pretokenize.py                   # 10k pairs, tiny config's dVAE shape
    python benchmarks/bench_pretokenize.py --num-pairs 2000 --config configs/tiny.yaml
    python benchmarks/bench_pretokenize.py --kinds all --image-size 256 --num-pairs 64 --samples-per-shard 8 \
        --batch-size 8 --concurrency 2 --num-cpus-per-actor 0.5   # every kind at 256 px, both cores encoding

``--kinds`` runs each image tokenizer at the released shape (random weights: speed does not depend on them):
``DiscreteVAE`` as the config's ``vae`` section (``--image-size`` overrides its side), ``OpenAIDVAE`` as OpenAI's
8192-code model (256 px -> 32x32), ``VQGAN`` as the f16/16384 model dalle-mini uses (256 px -> 16x16).

``job_pairs_per_s`` is the whole job (list, read, decode, tokenize, encode, write shards, rejects and
manifest; Ray already up, the actors not) over its wall time; ``encoder_images_per_s`` is
``get_codebook_indices`` alone on pre-decoded tensors in this process with every core. Target ratio >= 0.7.
``job_warm_*`` reruns the job (``--overwrite``) once Ray's workers exist, and ``job_marginal_pairs_per_s`` is
the extra pairs over the extra seconds between a warm run on a quarter of the pairs and the warm full run: the
rate a long job settles at, with ``job_fixed_seconds`` the start-up that remains (listing, actors, models).
``host_ms_per_picture`` says where the job's time goes besides the encoder, on one core: decoding (+ RGB,
resize and centre crop) and the Arrow round trip the pixels make from the decode tasks to the encoder actors.
The machine's load average is printed because other work on the same cores skews every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import ray
import torch
from torch import nn

from dalle_core.checkpoint import save_model
from dalle_core.config import IMAGE_TOKENIZER_KINDS
from dalle_core.image_tokenizer import ImageTokenizer
from dalle_core.images import from_uint8
from dalle_core.openai_dvae import OpenAIDVAE, OpenAIDVAEConfig
from dalle_core.tokenizer import BPETokenizer
from dalle_core.vae import DiscreteVAE
from dalle_core.vqgan import VQGAN, VQGANConfig
from pipelines.config import Config
from pipelines.data.images import load_picture
from pipelines.data.pretokenize import run_pretokenize
from pipelines.data.synthetic import iter_samples, write_synthetic


def encoder_rate(vae: ImageTokenizer, pictures: np.ndarray, batch_size: int) -> float:
    images = torch.from_numpy(pictures).permute(0, 3, 1, 2).float().div_(255)
    vae.get_codebook_indices(images[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        vae.get_codebook_indices(images[i:i + batch_size])
    return len(images) / (time.perf_counter() - start)


def host_ms_per_picture(jpgs: list[bytes], size: int) -> tuple[dict[str, float], np.ndarray]:
    """Milliseconds per picture of the job's host-side steps on one core, and the decoded pictures."""
    start = time.perf_counter()
    pictures = np.stack([load_picture(jpg, size, 1)[0] for jpg in jpgs])
    decode = time.perf_counter() - start
    start = time.perf_counter()
    flat = pictures.reshape(len(pictures), -1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    from_uint8(column.flatten().to_numpy().reshape(pictures.shape))
    arrow = time.perf_counter() - start
    n = len(jpgs) / 1000
    return {"decode_rgb_resize_crop": round(decode / n, 3), "arrow_round_trip_to_float": round(arrow / n, 3)}, pictures


def build_tokenizer(kind: str, config: Config) -> nn.Module:
    """A random-weight tokenizer of ``kind`` at the released shape, at ``config.vae.image_size``."""
    torch.manual_seed(0)
    size = config.vae.image_size
    if kind == "OpenAIDVAE":
        return OpenAIDVAE(OpenAIDVAEConfig(image_size=size)).eval()
    if kind == "VQGAN":
        return VQGAN(VQGANConfig(resolution=size)).eval()
    return DiscreteVAE(config.vae).eval()


def bench_kind(kind: str, config: Config, raws: tuple[str, str], tmp: str, tokenizer_path: str,
               pictures: np.ndarray) -> dict:
    """``raws``: the full raw set, then a quarter of it (for the marginal rate)."""
    vae = build_tokenizer(kind, config)
    vae_path, out = f"{tmp}/{kind}.safetensors", f"{tmp}/shards-{kind}"
    save_model(vae, vae_path)
    encoder = encoder_rate(vae, pictures, config.pretokenize.batch_size)

    def job(raw: str, overwrite: bool) -> dict:
        config.pretokenize.overwrite = overwrite
        return run_pretokenize(raw, out, tokenizer_path, vae_path, config.tokenizer.text_seq_len, config.pretokenize)

    summary = job(raws[0], False)
    # The same job again with Ray's worker processes already started: what the fixed start-up costs.
    warm, quarter = job(raws[0], True), job(raws[1], True)
    config.pretokenize.overwrite = False
    job_rate = summary["pairs_out"] / summary["seconds"]
    marginal = (warm["pairs_out"] - quarter["pairs_out"]) / (warm["seconds"] - quarter["seconds"])
    return {
        "kind": kind, "image_seq_len": vae.image_seq_len, "num_tokens": vae.num_tokens,
        "params": sum(p.numel() for p in vae.parameters()),
        "job_seconds": summary["seconds"], "job_pairs_per_s": round(job_rate, 2),
        "job_warm_seconds": warm["seconds"], "job_warm_pairs_per_s": round(warm["pairs_out"] / warm["seconds"], 2),
        "job_marginal_pairs_per_s": round(marginal, 2),
        "job_fixed_seconds": round(warm["seconds"] - warm["pairs_out"] / marginal, 2),
        "encoder_images_per_s": round(encoder, 2), "encoder_ms_per_picture": round(1000 / encoder, 3),
        "job_over_encoder": round(job_rate / encoder, 3),
        "job_warm_over_encoder": round(warm["pairs_out"] / warm["seconds"] / encoder, 3),
        "job_marginal_over_encoder": round(marginal / encoder, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="vae, tokenizer and pretokenize sections")
    parser.add_argument("--num-pairs", type=int, default=10_000)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--kinds", default="DiscreteVAE",
                        help=f"comma-separated image tokenizer kinds, or 'all' ({', '.join(IMAGE_TOKENIZER_KINDS)})")
    parser.add_argument("--image-size", type=int, default=None, help="picture side (default: the config's vae)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    for flag, kind in (("batch-size", int), ("concurrency", int), ("num-cpus-per-actor", float)):
        parser.add_argument(f"--{flag}", type=kind, default=None, help=f"pretokenize.{flag.replace('-', '_')}")
    args = parser.parse_args(argv)
    kinds = list(IMAGE_TOKENIZER_KINDS) if args.kinds == "all" else args.kinds.split(",")
    unknown = sorted(set(kinds) - set(IMAGE_TOKENIZER_KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; expected some of {list(IMAGE_TOKENIZER_KINDS)} or 'all'")
    overrides = {"synthetic.num_samples": args.num_pairs, "synthetic.samples_per_shard": args.samples_per_shard,
                 "synthetic.holdout_pairs": [], "synthetic.image_size": 32}
    if args.image_size:
        overrides["vae.image_size"] = args.image_size
    if not torch.cuda.is_available():  # a GPU preset's encoder actors would wait for a GPU forever
        overrides["pretokenize.num_gpus_per_actor"] = 0.0
    for name in ("batch_size", "concurrency", "num_cpus_per_actor"):
        if getattr(args, name) is not None:
            overrides[f"pretokenize.{name}"] = getattr(args, name)
    config = Config.load(args.config if os.path.exists(args.config) else None, overrides)
    config.synthetic.image_size = size = config.vae.image_size
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        raws = (f"{tmp}/raw", f"{tmp}/raw_quarter")
        write_synthetic(config.synthetic, raws[0])
        write_synthetic(dataclasses.replace(config.synthetic, num_samples=config.synthetic.num_samples // 4), raws[1])
        rows = list(iter_samples(config.synthetic))
        tokenizer_path = f"{tmp}/bpe.model"
        BPETokenizer.train((r["caption"] for r in rows), tokenizer_path, config.tokenizer.vocab_size,
                           config.tokenizer.text_seq_len)
        host, pictures = host_ms_per_picture([r["jpg"] for r in rows], size)
        ray.init(include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for kind in kinds:
            print(f"{kind}: {len(rows)} pairs at {size} px", file=sys.stderr, flush=True)
            results.append(bench_kind(kind, config, raws, tmp, tokenizer_path, pictures))
        ray.shutdown()
    report = {
        "num_pairs": len(rows), "image_size": size, "batch_size": config.pretokenize.batch_size,
        "actors": config.pretokenize.concurrency, "cpus_per_actor": config.pretokenize.num_cpus_per_actor,
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "dtype": "float32",
        "host_ms_per_picture": host, "kinds": results, "load_average_1m": round(os.getloadavg()[0], 2),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
