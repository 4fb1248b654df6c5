"""Prints, as JSON, what a job would ask Ray for under a config, without starting Ray or touching data.

    python jobs/dry_run.py --job train --config configs/large.yaml
    python jobs/dry_run.py --job train_vae --config configs/base.yaml     # any job of the chain

Use it before submitting to a cluster: the totals say how many GPUs and CPUs the job occupies, and for
training the memory per GPU and tokens per step, so an oversize config fails here rather than after the
cluster has scaled up. Exit status 2 means the config is missing, not YAML, or wrong (the message names the
field).
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from pipelines.config import DEFAULT_CONFIG, Config, ConfigError
from pipelines.resources import JOBS, plan_resources


def load_config(path: str) -> Config:
    """The config at ``path``; every way it can fail to load is a ConfigError with a one-line message."""
    try:
        return Config.load(path)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not YAML: {' '.join(str(err).split())}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, choices=JOBS)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/tiny.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"dry_run: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan_resources(args.job, cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
