"""Training throughput: Ray Train + DeepSpeed (1 and 2 workers, ZeRO 0-3) against the bare dalle_core loop.

    python benchmarks/bench_train.py [--config configs/tiny.yaml] [--steps 30] [--rows 2048]

Prints one JSON object: tokens/s, MFU, peak memory per worker and time from job start to first step for each
(workers, ZeRO stage), the bare single-process loop's tokens/s at the same model and per-worker batch, and the
ratio of the 1-worker Ray+DeepSpeed step to it (target >= 0.8). Each Ray worker gets one CPU (Ray sets one
intra-op thread), so the bare loop runs with one thread too. Token shards are random, written to a temp dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import pyarrow as pa
import ray
import torch

from dalle_core.dalle import DALLE
from dalle_core.train_utils import (
    collate_tokens,
    make_optimizer,
    make_scheduler,
    measure_peak_flops,
    mfu,
)
from pipelines import storage
from pipelines.config import Config
from pipelines.data.manifest import SCHEMA_VERSION, token_schema
from pipelines.train.dalle import build_dalle_trainer


def write_random_shards(folder: str, config: Config, rows: int) -> dict:
    """Random token shards + manifest at the config's sizes (throughput does not depend on the values)."""
    d = config.dalle
    rng = np.random.default_rng(0)
    text = [rng.integers(4, d.num_text_tokens, size=rng.integers(4, d.text_seq_len + 1)).tolist()
            for _ in range(rows)]
    codes = rng.integers(0, d.num_image_tokens, size=(rows, d.image_seq_len)).tolist()
    table = pa.table({"key": [str(i) for i in range(rows)], "caption": ["x"] * rows, "text_ids": text,
                      "image_codes": codes, "source": ["bench"] * rows}, schema=token_schema(d.image_seq_len))
    storage.write_parquet(table, f"{folder}/data/bench.parquet")
    return {"schema_version": SCHEMA_VERSION, "num_rows": rows, "image_seq_len": d.image_seq_len,
            "text_seq_len": d.text_seq_len, "codebook_size": d.num_image_tokens,
            "tokenizer": {"vocab_size": d.num_text_tokens, "model_hash": ""}, "vae": {"checkpoint_hash": ""},
            "shards": [{"path": "data/bench.parquet", "rows": rows}]}


def bare_tokens_per_s(config: Config, steps: int) -> float:
    """The same step (forward, backward, clip, AdamW, schedule) in one plain process, one thread."""
    d, train = config.dalle, config.train
    torch.manual_seed(0)
    model = DALLE(d)
    optimizer = make_optimizer(model, train.optim)
    scheduler = make_scheduler(optimizer, train.optim, steps + 2)
    rng = np.random.default_rng(0)
    text, codes = collate_tokens([rng.integers(4, d.num_text_tokens, size=d.text_seq_len)
                                  for _ in range(train.batch_size)],
                                 rng.integers(0, d.num_image_tokens, size=(train.batch_size, d.image_seq_len)),
                                 d.text_seq_len)

    def step() -> None:
        loss, _, _ = model(text, codes, return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.optim.grad_clip)
        optimizer.step()
        scheduler.step()

    step()  # warm-up, like the Ray path excludes its first step
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * train.batch_size * d.seq_len / (time.perf_counter() - start)


def ray_run(config: Config, manifest: dict, shards: str, storage_path: str, workers: int, zero: int,
            steps: int, peak: float) -> dict:
    train = dataclasses.replace(config.train, num_workers=workers, zero_stage=zero, max_steps=steps,
                                checkpoint_every=steps, log_every=max(1, steps // 3), peak_flops_per_worker=peak,
                                cpus_per_worker=1.0)
    cfg = dataclasses.replace(config, train=train)
    name = f"w{workers}-z{zero}"
    start = time.time()
    result = build_dalle_trainer(cfg, manifest, shards_dir=shards, storage_path=storage_path, run_name=name,
                                 job_start=start).fit()
    records = [json.loads(line) for line in Path(storage_path, name, "metrics.jsonl").read_text().splitlines()]
    tokens = float(np.mean([r["tokens_per_s"] for r in records]))
    return {"workers": workers, "zero_stage": zero, "tokens_per_s": round(tokens, 1),
            "tokens_per_s_per_worker": round(tokens / workers, 1),
            "mfu": round(float(np.mean([r["mfu"] for r in records])), 4),
            "peak_memory_mib_per_worker": [round(b / 2**20) for b in result.metrics["peak_memory_bytes_per_worker"]],
            "job_start_to_first_step_s": round(records[0]["first_step_after_s"], 1),
            "wall_s": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    config = Config.load(args.config, {"train.precision": "fp32", "train.grad_accum": 1})
    torch.set_num_threads(1)
    peak = measure_peak_flops(seconds=1.0)
    bare_before = bare = bare_tokens_per_s(config, args.steps)

    ray.init(num_cpus=3, include_dashboard=False, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_random_shards(f"{tmp}/shards", config, args.rows)
        for workers in (int(w) for w in args.workers.split(",")):
            for zero in (int(z) for z in args.stages.split(",")):
                runs.append(ray_run(config, manifest, f"{tmp}/shards", f"{tmp}/runs", workers, zero, args.steps,
                                    peak))
    ray.shutdown()
    # Measured before and after the Ray runs: on a shared machine the load can change in between.
    bare_after = bare_tokens_per_s(config, args.steps)
    bare = (bare + bare_after) / 2
    one = [r for r in runs if r["workers"] == 1]
    flops_per_token = DALLE(config.dalle).flops_per_token()
    print(json.dumps({
        "config": args.config, "params": DALLE(config.dalle).num_params(), "seq_len": config.dalle.seq_len,
        "batch_size_per_worker": config.train.batch_size, "steps": args.steps, "cpu_cores": os.cpu_count(),
        "peak_flops_per_worker_measured": round(peak),
        "bare": {"tokens_per_s": round(bare, 1), "before_after": [round(bare_before), round(bare_after)],
                 "mfu": round(mfu(bare, flops_per_token, peak), 4)},
        "ray_deepspeed": runs,
        "one_worker_vs_bare": {f"zero{r['zero_stage']}": round(r["tokens_per_s"] / bare, 3) for r in one},
        "target_ratio": 0.8,
    }, indent=2))


if __name__ == "__main__":
    main()
