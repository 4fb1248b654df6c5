"""Trains the reranking CLIP on raw shards with Ray Train (DDP) and reports held-out retrieval accuracy.

    python jobs/train_clip.py --config configs/tiny.yaml [--input DIR|s3://...] [--tokenizer ...]
        [--output clip.safetensors] [--storage-path RUNS_DIR] [--run-name NAME] [--max-steps N] [--num-workers N]
        [--init-from CLIP.safetensors --lr LR]

Checkpoints and metrics.jsonl go to <storage-path>/<run-name> (rerunning resumes). The final self-describing
checkpoint is published to ``--output`` (default ``paths.clip``) with ``<out stem>_metrics.json`` beside it
(text->image and image->text top-1/top-5).
"""

from __future__ import annotations

import json
import sys

from pipelines.cli import add_trainer_flags, connect_ray, job_entry, job_parser, load_job_config, trainer_overrides
from pipelines.resources import plan_resources
from pipelines.train.clip import train_clip
from pipelines.train.finetune import check_init_from


@job_entry("train_clip")
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--input", help="raw shards (paths.raw)")
    parser.add_argument("--tokenizer", help="BPE model (paths.tokenizer)")
    add_trainer_flags(parser, "train_clip", "clip")
    args = parser.parse_args(argv)
    config = load_job_config(args.config, trainer_overrides(args, "train_clip"))
    paths = config.paths.resolved()
    storage_path, name = args.storage_path or paths.runs, config.train_clip.run_name
    check_init_from(config, config.train_clip, storage_path=storage_path, run_name=name)
    connect_ray(args.address, plan_resources("train_clip", config))
    metrics = train_clip(config, raw=args.input or paths.raw, tokenizer_path=args.tokenizer or paths.tokenizer,
                         storage_path=storage_path, run_name=name, output=args.output or paths.clip)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
