"""Prints, as JSON, what a job would ask Ray for under a config, without starting Ray or touching data.

    python jobs/dry_run.py --job train --config configs/large.yaml
    python jobs/dry_run.py --job train_vae --config configs/base.yaml     # any job of the chain

Use it before submitting to a cluster: the totals say how many GPUs and CPUs the job occupies, and for
training the memory per GPU and tokens per step, so an oversize config fails here rather than after the
cluster has scaled up. Exit status 2 means the config is missing, not YAML, or wrong (the message names the
field).
"""

from __future__ import annotations

import json
import sys

from pipelines.cli import job_entry, job_parser, load_job_config
from pipelines.resources import JOBS, plan_resources


@job_entry("dry_run")
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, uses_ray=False)
    parser.add_argument("--job", required=True, choices=JOBS)
    args = parser.parse_args(argv)
    print(json.dumps(plan_resources(args.job, load_job_config(args.config, {})), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
