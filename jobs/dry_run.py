"""Prints, as JSON, what a job would ask Ray for under a config, without starting Ray or touching data.

    python jobs/dry_run.py --job train --config configs/large.yaml

Use it before submitting to a cluster: the totals say how many GPUs and CPUs the job occupies, and for
training the memory per GPU and tokens per step, so an oversize config fails here rather than after the
cluster has scaled up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any directory

from pipelines.config import DEFAULT_CONFIG, Config, ConfigError  # noqa: E402
from pipelines.resources import JOBS, plan_resources  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, choices=JOBS)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/tiny.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = Config.load(args.config)
    except (ConfigError, OSError) as err:
        print(f"dry_run: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan_resources(args.job, cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
