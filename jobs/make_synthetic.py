"""Writes the built-in synthetic set (coloured shapes + template captions) as raw Parquet shards.

    python jobs/make_synthetic.py --config configs/tiny.yaml                 # -> paths.raw
    python jobs/make_synthetic.py --config configs/tiny.yaml --output s3://bucket/raw --num-samples 100000

Training pairs go to <output>/part-*.parquet, held-out (color, shape) pairs to <output>/holdout/.
"""

from __future__ import annotations

import json
import sys
import time

from pipelines.cli import job_entry, job_parser, load_job_config
from pipelines.data.synthetic import write_synthetic


@job_entry("make_synthetic")
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, uses_ray=False)
    parser.add_argument("--output", default=None, help="raw shard folder, local or s3:// (paths.raw)")
    parser.add_argument("--num-samples", type=int, default=None, help="synthetic.num_samples")
    parser.add_argument("--seed", type=int, default=None, help="synthetic.seed")
    parser.add_argument("--image-size", type=int, default=None, help="synthetic.image_size")
    args = parser.parse_args(argv)
    flags = {"synthetic.num_samples": args.num_samples, "synthetic.seed": args.seed,
             "synthetic.image_size": args.image_size}
    config = load_job_config(args.config, flags)
    output = args.output or config.paths.resolved().raw
    start = time.perf_counter()
    counts = write_synthetic(config.synthetic, output)
    print(json.dumps({"output": output, **counts, "seconds": round(time.perf_counter() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
