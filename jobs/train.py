"""Stage two: train DALLE on token shards with Ray Train + DeepSpeed ZeRO.

    python jobs/train.py --config configs/tiny.yaml                       # starts Ray locally
    ray job submit --working-dir . -- python jobs/train.py --config configs/tiny.yaml

The manifest is checked against the model config before Ray is touched. Rerunning with the same
``--storage-path`` and ``--run-name`` resumes from the latest checkpoint. The final weights are published to
``--output`` (``paths.dalle``), which generation and evaluation load. ``--init-from DALLE.safetensors`` fine-tunes:
a new run name starting from a published DALLE's weights (fresh optimizer and schedule; ``--lr`` sets its rate).
"""

from __future__ import annotations

import sys
import time

from pipelines import artifacts
from pipelines.cli import add_trainer_flags, connect_ray, job_entry, job_parser, load_job_config, trainer_overrides
from pipelines.resources import plan_resources
from pipelines.train.dalle import load_checked_manifest, train_dalle
from pipelines.train.finetune import check_init_from


@job_entry("train")
def main(argv: list[str] | None = None) -> int:
    job_start = time.time()
    parser = job_parser(__doc__)
    parser.add_argument("--shards", help="token shard folder with manifest.json (paths.shards)")
    parser.add_argument("--manifest", help="manifest path (default: <shards>/manifest.json)")
    parser.add_argument("--zero-stage", type=int, help="train.zero_stage (0-3)")
    parser.add_argument("--precision", help="train.precision (auto, fp32, bf16, fp16)")
    parser.add_argument("--compile", action="store_true", default=None, help="train.compile: torch.compile the DALLE")
    add_trainer_flags(parser, "train", "dalle")
    args = parser.parse_args(argv)
    config = load_job_config(args.config, {
        **trainer_overrides(args, "train"), "train.zero_stage": args.zero_stage, "train.precision": args.precision,
        "train.compile": args.compile})
    paths = config.paths.resolved()
    shards = args.shards or paths.shards
    manifest = load_checked_manifest(config, shards, args.manifest)
    storage_path, name, output = args.storage_path or paths.runs, config.train.run_name, args.output or paths.dalle
    check_init_from(config, config.train, storage_path=storage_path, run_name=name, manifest=manifest)

    # workers set DS_ACCELERATOR themselves before importing DeepSpeed
    connect_ray(args.address, plan_resources("train", config))
    result = train_dalle(config, manifest, shards_dir=shards, storage_path=storage_path, run_name=name,
                         output=output, job_start=job_start)
    where = artifacts.run_dir(storage_path, name)
    print(f"run directory:  {where} (metrics.jsonl, tensorboard/, checkpoint_step_*/ with DeepSpeed state)")
    print(f"DALLE:          {output}")
    print(f"final step:     {result.metrics['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
