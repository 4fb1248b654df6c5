"""What every ``jobs/`` entry point shares: the ``--config`` and ``--address`` flags, flags that override config
fields, config mistakes reported (naming the field) before any cluster resource is taken, and joining Ray."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml

from pipelines.config import DEFAULT_CONFIG, Config, ConfigError

# Logical CPUs of a Ray started here: Train workers take whole CPUs, and on a small machine they would leave
# none to the Ray Data tasks that feed them (the job would wait forever). Logical CPUs only schedule work.
LOCAL_MIN_CPUS = 8


def job_parser(doc: str | None, uses_ray: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the job's docstring as help, ``--config``, and for Ray jobs ``--address``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/tiny.yaml)")
    if uses_ray:
        parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    return parser


def add_trainer_flags(parser: argparse.ArgumentParser, section: str, publishes: str) -> None:
    """The flags every training job takes: where its run lives, where it publishes, and its size."""
    parser.add_argument("--storage-path", help="run storage, local or s3:// (paths.runs)")
    parser.add_argument("--run-name", help=f"run name; the same name resumes ({section}.run_name)")
    parser.add_argument("--output", help=f"where the final model is published (paths.{publishes})")
    parser.add_argument("--num-workers", type=int, help=f"{section}.num_workers")
    parser.add_argument("--max-steps", type=int, help=f"{section}.max_steps")


def trainer_overrides(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The config overrides of :func:`add_trainer_flags`' flags."""
    return {f"{section}.run_name": args.run_name, f"{section}.num_workers": args.num_workers,
            f"{section}.max_steps": args.max_steps}


def load_job_config(job: str, path: str, flags: dict[str, Any]) -> Config | None:
    """The config at ``path`` with the flags given on the command line applied (``{"train.max_steps": 10}``;
    None means not given). On a mistake, prints ``<job>: <what is wrong>`` and returns None."""
    try:
        return Config.load(path, {key: value for key, value in flags.items() if value is not None})
    except yaml.YAMLError as exc:
        print(f"{job}: {path}: not valid YAML ({str(exc).splitlines()[0]})", file=sys.stderr)
    except (ConfigError, OSError) as exc:
        print(f"{job}: {exc}", file=sys.stderr)
    return None


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
