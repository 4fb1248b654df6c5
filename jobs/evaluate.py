"""Evaluation: Ray Serve Generator + CLIP Scorer, driven by a Ray Data batch job over a prompt set.

    python jobs/evaluate.py --config configs/tiny.yaml [--checkpoint ... --vae ... --tokenizer ... --clip ...]
        [--prompts FILE.txt | --prompts FILE.parquet --column caption] [--num-prompts N] [--output DIR|s3://...]

Writes top-k PNGs, grid.png, results.parquet, metrics.json and report.html to the output (default
``paths.evaluation``); prints the metrics as JSON. See docs/evaluate.md.
"""

from __future__ import annotations

import argparse
import json
import sys

import ray

from dalle_core.config import DEFAULT_CONFIG, Config
from pipelines.evaluation import load_prompts, resolve_model_paths, run_evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--checkpoint", help="DALLE model file; default: newest under paths.runs")
    parser.add_argument("--vae")
    parser.add_argument("--tokenizer")
    parser.add_argument("--clip")
    parser.add_argument("--prompts", help="text file (one prompt per line) or .parquet; default: synthetic")
    parser.add_argument("--column", help="Parquet column holding the prompts (evaluate.prompt_column)")
    parser.add_argument("--num-prompts", type=int, help="0 = all (evaluate.num_prompts)")
    parser.add_argument("--output", help="output folder, local or s3:// (paths.evaluation)")
    parser.add_argument("--http-port", type=int, help="evaluate.http_port")
    args = parser.parse_args(argv)

    overrides = {}
    if args.prompts:
        overrides["evaluate.prompt_source"] = "parquet" if args.prompts.endswith(".parquet") else "text"
        overrides["evaluate.prompts_path"] = args.prompts
    if args.column:
        overrides["evaluate.prompt_column"] = args.column
    if args.num_prompts is not None:
        overrides["evaluate.num_prompts"] = args.num_prompts
    if args.http_port:
        overrides["evaluate.http_port"] = args.http_port
    config = Config.load(args.config, overrides)
    paths = resolve_model_paths(config, args.checkpoint, args.vae, args.tokenizer, args.clip)
    prompts = load_prompts(config)
    ray.init(ignore_reinit_error=True)  # joins the cluster under `ray job submit`, else starts a local one
    metrics = run_evaluation(config, paths, args.output or config.paths.resolved().evaluation, prompts)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
