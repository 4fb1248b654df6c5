"""Evaluation: Ray Serve Generator + CLIP Scorer, driven by a Ray Data batch job over a prompt set.

    python jobs/evaluate.py --config configs/tiny.yaml [--checkpoint ... --vae ... --tokenizer ... --clip ...]
        [--prompts FILE.txt | --prompts FILE.parquet --column caption] [--num-prompts N] [--output DIR|s3://...]
        [--address ray://head:10001]

Writes top-k PNGs, grid.png, results.parquet, metrics.json and report.html to the output (default
``paths.evaluation``); prints the metrics as JSON. See docs/evaluate.md.
"""

from __future__ import annotations

import json
import sys

from pipelines.artifacts import model_paths
from pipelines.cli import connect_ray, job_entry, job_parser, load_job_config
from pipelines.resources import plan_resources
from pipelines.serve.evaluation import load_prompts, run_evaluation


@job_entry("evaluate")
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--checkpoint", help="DALLE model file; default: paths.dalle, else newest under paths.runs")
    parser.add_argument("--vae")
    parser.add_argument("--tokenizer")
    parser.add_argument("--clip")
    parser.add_argument("--prompts", help="text file (one prompt per line) or .parquet; default: synthetic")
    parser.add_argument("--column", help="Parquet column holding the prompts (evaluate.prompt_column)")
    parser.add_argument("--num-prompts", type=int, help="0 = all (evaluate.num_prompts)")
    parser.add_argument("--output", help="output folder, local or s3:// (paths.evaluation)")
    parser.add_argument("--http-port", type=int, help="evaluate.http_port")
    args = parser.parse_args(argv)

    source = None if not args.prompts else "parquet" if args.prompts.endswith(".parquet") else "text"
    config = load_job_config(args.config, {
        "evaluate.prompt_source": source, "evaluate.prompts_path": args.prompts,
        "evaluate.prompt_column": args.column, "evaluate.num_prompts": args.num_prompts,
        "evaluate.http_port": args.http_port})
    paths = model_paths(config, args.checkpoint, args.vae, args.tokenizer, args.clip)
    paths.require()  # before Ray: a missing model costs no cluster resources
    prompts = load_prompts(config)
    connect_ray(args.address, plan_resources("evaluate", config))
    metrics = run_evaluation(config, paths, args.output or config.paths.resolved().evaluation, prompts)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
