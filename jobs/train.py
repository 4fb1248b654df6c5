"""Stage two: train DALLE on token shards with Ray Train + DeepSpeed ZeRO.

    python jobs/train.py --config configs/tiny.yaml                       # starts Ray locally
    ray job submit --working-dir . -- python jobs/train.py --config configs/tiny.yaml

The manifest is checked against the model config before Ray is touched. Rerunning with the same
``--storage-path`` and ``--run-name`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from dalle_core.config import ConfigError  # noqa: E402
from pipelines.cli import connect_ray, job_parser, load_job_config  # noqa: E402
from pipelines.train.dalle import build_trainer, load_checked_manifest, run_dir  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = job_parser(__doc__)
    parser.add_argument("--shards", default=None, help="token shard folder with manifest.json (paths.shards)")
    parser.add_argument("--manifest", default=None, help="manifest path (default: <shards>/manifest.json)")
    parser.add_argument("--storage-path", default=None, help="run storage, local or s3:// (paths.runs)")
    parser.add_argument("--run-name", default=None, help="run name; the same name resumes (train.run_name)")
    parser.add_argument("--num-workers", type=int, default=None, help="train.num_workers")
    parser.add_argument("--zero-stage", type=int, default=None, help="train.zero_stage (0-3)")
    parser.add_argument("--precision", default=None, help="train.precision (fp32, bf16, fp16)")
    parser.add_argument("--max-steps", type=int, default=None, help="train.max_steps")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    job_start = time.time()
    args = parse_args(argv)
    flags = {"train.num_workers": args.num_workers, "train.zero_stage": args.zero_stage,
             "train.precision": args.precision, "train.max_steps": args.max_steps}
    config = load_job_config("train", args.config, flags)
    if config is None:
        return 2
    paths = config.paths.resolved()
    shards = args.shards or paths.shards
    try:
        manifest = load_checked_manifest(config, shards, args.manifest)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    storage = args.storage_path or paths.runs
    name = args.run_name or config.train.run_name

    if not config.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    connect_ray(args.address)  # workers set DS_ACCELERATOR themselves before importing DeepSpeed
    ray.data.DataContext.get_current().enable_progress_bars = False
    trainer = build_trainer(config, manifest, shards_dir=shards, storage_path=storage, run_name=name,
                            job_start=job_start)
    result = trainer.fit()
    where = run_dir(storage, name)
    print(f"run directory:  {where}")
    print(f"metrics:        {where}/metrics.jsonl (TensorBoard: {where}/tensorboard)")
    if result.checkpoint is not None:
        checkpoint = f"{where}/{os.path.basename(result.checkpoint.path)}"
        print(f"checkpoint:     {checkpoint} (DeepSpeed state in deepspeed/, weights in model.pt)")
    print(f"final metrics:  {result.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
