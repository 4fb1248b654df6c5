"""What every ``jobs/`` entry point shares: the ``--config`` flag, flags that override config fields, and config
mistakes reported (naming the field) before any cluster resource is taken."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pipelines.config import DEFAULT_CONFIG, Config, ConfigError


def job_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the job's docstring as help and the ``--config`` flag every job takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/tiny.yaml)")
    return parser


def load_job_config(job: str, path: str, flags: dict[str, Any]) -> Config | None:
    """The config at ``path`` with the flags given on the command line applied (``{"train.max_steps": 10}``;
    None means not given). On a mistake, prints ``<job>: <field>: <what is wrong>`` and returns None."""
    try:
        return Config.load(path, {key: value for key, value in flags.items() if value is not None})
    except ConfigError as exc:
        print(f"{job}: {exc}", file=sys.stderr)
        return None


# Logical CPUs of a Ray started here: Train workers take whole CPUs, and on a small machine they would leave
# none to the Ray Data tasks that feed them (the job would wait forever). Logical CPUs only schedule work.
LOCAL_MIN_CPUS = 8


def connect_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Joins ``address`` (or ``RAY_ADDRESS``, as under ``ray job submit``), else starts a local Ray with at least
    :data:`LOCAL_MIN_CPUS` logical CPUs; does nothing when tests or notebooks have connected already."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        init_kwargs.setdefault("num_cpus", max(LOCAL_MIN_CPUS, os.cpu_count() or 1))
    ray.init(address=address, **init_kwargs)
