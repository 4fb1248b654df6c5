"""Trains the reranking CLIP on raw shards with Ray Train (DDP) and reports held-out retrieval accuracy.

    python jobs/train_clip.py --config configs/tiny.yaml [--input DIR|s3://...] [--tokenizer ...] [--output clip.pt]
        [--storage-path RUNS_DIR] [--max-steps N] [--num-workers N]

Writes a self-describing checkpoint (``dalle_core.checkpoint.load_model`` reads it) to ``--output`` (default
``paths.clip``) and ``<out stem>_metrics.json`` beside it (text->image and image->text top-1/top-5).
"""

from __future__ import annotations

import argparse
import json
import sys

import ray

from dalle_core.config import DEFAULT_CONFIG, Config
from pipelines.clip_train import run_train_clip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--input", help="raw shards (paths.raw)")
    parser.add_argument("--tokenizer", help="BPE model (paths.tokenizer)")
    parser.add_argument("--output", help="CLIP model file (paths.clip)")
    parser.add_argument("--storage-path", help="Ray Train storage path (paths.runs)")
    parser.add_argument("--max-steps", type=int, help="train_clip.max_steps")
    parser.add_argument("--num-workers", type=int, help="train_clip.num_workers")
    args = parser.parse_args(argv)

    overrides = {f"train_clip.{k}": v for k, v in (("max_steps", args.max_steps), ("num_workers", args.num_workers))
                 if v is not None}
    config = Config.load(args.config, overrides)
    paths = config.paths.resolved()
    ray.init(ignore_reinit_error=True)  # joins the cluster under `ray job submit`, else starts a local one
    metrics = run_train_clip(config, args.input or paths.raw, args.tokenizer or paths.tokenizer,
                             args.output or paths.clip, args.storage_path or paths.runs)
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
