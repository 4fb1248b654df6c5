"""Throughput of jobs/pretokenize on the synthetic set against the raw dVAE encoder (the limit), as JSON.

    python benchmarks/bench_pretokenize.py                   # 10k pairs, tiny config's dVAE shape
    python benchmarks/bench_pretokenize.py --num-pairs 2000 --config configs/tiny.yaml

``job_pairs_per_s`` is the whole job (list, read, decode, tokenize, encode, write shards, rejects and
manifest; Ray already up, the actors not) over its wall time; ``encoder_images_per_s`` is
``get_codebook_indices`` alone on pre-decoded tensors in this process with every core. Target ratio >= 0.7.
``job_warm_*`` reruns the job (``--overwrite``) once Ray's workers exist, to separate the fixed start-up cost.
The machine's load average is printed because other work on the same cores skews every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import ray
import torch

from dalle_core.checkpoint import save_model
from dalle_core.tokenizer import BPETokenizer
from dalle_core.vae import DiscreteVAE
from pipelines.config import Config
from pipelines.data.images import load_picture
from pipelines.data.pretokenize import run_pretokenize
from pipelines.data.synthetic import iter_samples, write_synthetic


def encoder_rate(vae: DiscreteVAE, pictures: np.ndarray, batch_size: int) -> float:
    images = torch.from_numpy(pictures).permute(0, 3, 1, 2).float().div_(255)
    vae.get_codebook_indices(images[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        vae.get_codebook_indices(images[i:i + batch_size])
    return len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="vae, tokenizer and pretokenize sections")
    parser.add_argument("--num-pairs", type=int, default=10_000)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    config = Config.load(args.config if os.path.exists(args.config) else None, {
        "synthetic.num_samples": args.num_pairs, "synthetic.samples_per_shard": args.samples_per_shard,
        "synthetic.holdout_pairs": [], "synthetic.image_size": 32})
    config.synthetic.image_size = config.vae.image_size
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = f"{tmp}/raw", f"{tmp}/shards"
        write_synthetic(config.synthetic, raw)
        rows = list(iter_samples(config.synthetic))
        tokenizer_path, vae_path = f"{tmp}/bpe.model", f"{tmp}/vae.pt"
        BPETokenizer.train((r["caption"] for r in rows), tokenizer_path, config.tokenizer.vocab_size,
                           config.tokenizer.text_seq_len)
        torch.manual_seed(0)
        vae = DiscreteVAE(config.vae).eval()
        save_model(vae, vae_path)
        size = config.vae.image_size
        pictures = np.stack([load_picture(r["jpg"], size, 1)[0] for r in rows])
        encoder = encoder_rate(vae, pictures, config.pretokenize.batch_size)

        ray.init(include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        summary = run_pretokenize(raw, out, tokenizer_path, vae_path, config.tokenizer.text_seq_len,
                                  config.pretokenize)
        # The same job again with Ray's worker processes already started: what the fixed start-up costs.
        config.pretokenize.overwrite = True
        warm = run_pretokenize(raw, out, tokenizer_path, vae_path, config.tokenizer.text_seq_len,
                               config.pretokenize)
        ray.shutdown()
    job = summary["pairs_out"] / summary["seconds"]
    print(json.dumps({
        "num_pairs": summary["pairs_out"], "image_size": size, "image_seq_len": config.vae.image_seq_len,
        "batch_size": config.pretokenize.batch_size, "actors": config.pretokenize.concurrency,
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "job_seconds": summary["seconds"], "job_pairs_per_s": round(job, 1),
        "job_warm_seconds": warm["seconds"], "job_warm_pairs_per_s": round(warm["pairs_out"] / warm["seconds"], 1),
        "encoder_images_per_s": round(encoder, 1), "job_over_encoder": round(job / encoder, 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
