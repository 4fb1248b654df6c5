"""Trains the reranking CLIP on raw shards with Ray Train (DDP) and reports held-out retrieval accuracy.

    python jobs/train_clip.py --config configs/tiny.yaml [--input DIR|s3://...] [--tokenizer ...] [--output clip.pt]
        [--storage-path RUNS_DIR] [--max-steps N] [--num-workers N]

Writes a self-describing checkpoint (``dalle_core.checkpoint.load_model`` reads it) to ``--output`` (default
``paths.clip``) and ``<out stem>_metrics.json`` beside it (text->image and image->text top-1/top-5).
"""

from __future__ import annotations

import json
import sys

from pipelines.cli import connect_ray, job_parser, load_job_config
from pipelines.train.clip import run_train_clip


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--input", help="raw shards (paths.raw)")
    parser.add_argument("--tokenizer", help="BPE model (paths.tokenizer)")
    parser.add_argument("--output", help="CLIP model file (paths.clip)")
    parser.add_argument("--storage-path", help="Ray Train storage path (paths.runs)")
    parser.add_argument("--max-steps", type=int, help="train_clip.max_steps")
    parser.add_argument("--num-workers", type=int, help="train_clip.num_workers")
    args = parser.parse_args(argv)

    config = load_job_config("train_clip", args.config, {"train_clip.max_steps": args.max_steps,
                                                        "train_clip.num_workers": args.num_workers})
    if config is None:
        return 2
    paths = config.paths.resolved()
    connect_ray()
    metrics = run_train_clip(config, args.input or paths.raw, args.tokenizer or paths.tokenizer,
                             args.output or paths.clip, args.storage_path or paths.runs)
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
