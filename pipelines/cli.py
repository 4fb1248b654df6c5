"""What every ``jobs/`` entry point shares: the ``--config``, ``--address`` and ``--debug`` flags, flags that
override config fields, config mistakes reported (naming the field) before any cluster resource is taken, one
line and an exit code for every way a job ends badly, and joining Ray."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import yaml

from pipelines.config import DEFAULT_CONFIG, Config, ConfigError, InputError

# Logical CPUs of a Ray started here: Train workers take whole CPUs, and on a small machine they would leave
# none to the Ray Data tasks that feed them (the job would wait forever). Logical CPUs only schedule work.
LOCAL_MIN_CPUS = 8


def job_parser(doc: str | None, uses_ray: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the job's docstring as help, ``--config``, and for Ray jobs ``--address``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--debug", action="store_true", help="print the traceback when the job fails")
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
    parser.add_argument("--batch-size", type=int, help=f"{section}.batch_size (per worker)")
    parser.add_argument("--init-from", help=f"fine-tune: start from this published model ({section}.init_from)")
    parser.add_argument("--lr", type=float, help=f"peak learning rate ({section}.optim.lr)")


def trainer_overrides(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The config overrides of :func:`add_trainer_flags`' flags."""
    return {f"{section}.run_name": args.run_name, f"{section}.num_workers": args.num_workers,
            f"{section}.max_steps": args.max_steps, f"{section}.batch_size": args.batch_size,
            f"{section}.init_from": args.init_from, f"{section}.optim.lr": args.lr}


def load_job_config(path: str, flags: dict[str, Any]) -> Config:
    """The config at ``path`` with the flags given on the command line applied (``{"train.max_steps": 10}``;
    None means not given). Every way it can fail to load is a :class:`ConfigError` with a one-line message."""
    try:
        return Config.load(path, {key: value for key, value in flags.items() if value is not None})
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc


# The user's own input is wrong (config, flags, paths, data that does not fit the model): exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, InputError, FileNotFoundError, NotADirectoryError)
EXIT_USER_ERROR, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def one_line(exc: BaseException) -> str:
    """The gist of ``exc`` on one line: for an error raised inside a Ray worker (whose message carries the remote
    traceback) the remote exception's own last line, e.g. ``ValueError: ...``."""
    failures = getattr(exc, "worker_failures", None)  # Ray Train: {rank: exception}
    if failures:
        rank, first = next(iter(sorted(failures.items())))
        return f"worker {rank}: {one_line(first)}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def job_entry(job: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Wraps a job's ``main``: a user's mistake ends in ``<job>: <what is wrong>`` and exit code 2, a failed run
    in ``<job>: failed: <why>`` and 1, Ctrl-C in 130; ``--debug`` also prints the traceback."""

    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            debug = "--debug" in (sys.argv[1:] if argv is None else argv)
            try:
                return main(argv)
            except KeyboardInterrupt as exc:  # Ctrl-C; the training runner says where a rerun resumes
                print(f"\n{job}: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
                return EXIT_INTERRUPTED
            except Exception as exc:
                user = isinstance(exc, USER_ERRORS)
                if debug:
                    traceback.print_exc()
                what = str(exc) if user else f"failed: {one_line(exc)}"
                hint = "" if debug else " (--debug shows the traceback)"
                print(f"{job}: {what}{'' if user else hint}", file=sys.stderr)
                return EXIT_USER_ERROR if user else EXIT_FAILED

        return run

    return wrap


def connect_ray(address: str | None = None, plan: dict[str, Any] | None = None, **init_kwargs: Any) -> None:
    """Joins ``address`` (or ``RAY_ADDRESS``, as under ``ray job submit``), else starts a local Ray with at least
    :data:`LOCAL_MIN_CPUS` logical CPUs; does nothing when tests or notebooks have connected already. With the
    job's resource ``plan``, refuses (:class:`InputError`) one the cluster can never run, before anything waits:
    for a local Ray before it is even started."""
    import ray

    from pipelines.cluster import require_resources

    if ray.is_initialized():
        if plan is not None:
            require_resources(plan)
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # "local": a Ray of its own even when `ray start` left a cluster on this machine, which plain ray.init()
        # would join and then refuse the CPU count.
        address = "local"
        init_kwargs.setdefault("num_cpus", max(LOCAL_MIN_CPUS, os.cpu_count() or 1))
        if plan is not None:
            import torch

            local = {"CPU": float(init_kwargs["num_cpus"]), "GPU": float(torch.cuda.device_count())}
            require_resources(plan, local, "on this machine (a local Ray)")
    ray.init(address=address, **init_kwargs)
    if plan is not None and address != "local":
        require_resources(plan)
