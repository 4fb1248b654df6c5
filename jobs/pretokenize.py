"""Raw shards -> token shards + manifest.json + rejects/ with Ray Data and the frozen image tokenizer (paths.vae).

    python jobs/pretokenize.py --config configs/tiny.yaml       # paths.raw -> paths.shards
    ray job submit --working-dir . -- python jobs/pretokenize.py --config configs/large.yaml \\
        --input s3://bucket/raw --output s3://bucket/shards --concurrency 8 --num-gpus-per-actor 1

A rerun after an interruption finishes only the missing shards; a rerun into an output that other models (or
another text_seq_len or image size) made is refused, naming both hashes; --overwrite starts over. Exits 2 when
every input pair was rejected (the reasons are printed and kept in <output>/rejects/).
"""

from __future__ import annotations

import json
import sys

from pipelines.cli import connect_ray, job_entry, job_parser, load_job_config
from pipelines.data.pretokenize import run_pretokenize
from pipelines.resources import plan_resources


@job_entry("pretokenize")
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--input", default=None, help="raw shard folder, local or s3:// (paths.raw)")
    parser.add_argument("--output", default=None, help="token shard folder, local or s3:// (paths.shards)")
    parser.add_argument("--tokenizer", default=None, help="BPE model (paths.tokenizer)")
    parser.add_argument("--vae", default=None, help="image tokenizer checkpoint (paths.vae): ours or imported")
    parser.add_argument("--batch-size", type=int, default=None, help="pretokenize.batch_size")
    parser.add_argument("--concurrency", type=int, default=None, help="pretokenize.concurrency (dVAE actors)")
    parser.add_argument("--num-gpus-per-actor", type=float, default=None, help="pretokenize.num_gpus_per_actor")
    parser.add_argument("--overwrite", action="store_true", default=None, help="redo finished shards")
    args = parser.parse_args(argv)
    flags = {"pretokenize.batch_size": args.batch_size, "pretokenize.concurrency": args.concurrency,
             "pretokenize.num_gpus_per_actor": args.num_gpus_per_actor, "pretokenize.overwrite": args.overwrite}
    config = load_job_config(args.config, flags)
    paths = config.paths.resolved()
    connect_ray(args.address, plan_resources("pretokenize", config))
    summary = run_pretokenize(args.input or paths.raw, args.output or paths.shards,
                              args.tokenizer or paths.tokenizer, args.vae or paths.vae,
                              config.tokenizer.text_seq_len, config.pretokenize, config.vae)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
