"""What the connected Ray cluster can give a job: checked before the job takes anything, and said aloud while
the job waits for it.

A request that no node can ever satisfy makes Ray wait forever without a word (a placement group stays
pending), so every Ray job compares its plan (:func:`pipelines.resources.plan_resources`) with the cluster
first and refuses, naming the config fields that size it. On an autoscaling cluster the ceiling is the
autoscaler's configured maximum. The v1 autoscaler (the VM cluster launcher's default) publishes none: there
``DALLE_AUTOSCALING=1`` (set by ``infra/cluster.yaml``) says nodes come on demand, nothing is refused, and
:func:`report_resource_waits` tells the user what the job is waiting for instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import ray

from pipelines.config import InputError

AUTOSCALING_ENV = "DALLE_AUTOSCALING"  # "1": the cluster adds nodes on demand, up to a maximum Ray does not know


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{value:g} {key}" for key, value in sorted(resources.items())) or "nothing"


def cluster_ceiling() -> tuple[dict[str, float] | None, str]:
    """The most of each resource the cluster can ever offer, and where that figure comes from; None when the
    cluster autoscales to a maximum nobody published (then no request can be judged impossible up front)."""
    try:  # private, but the very call Ray Train makes for its own (autoscaler-only) version of this check
        from ray._private.state import state

        maximum = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a changed private API must not stop a job; the wait report still speaks
        return None, "unknown"
    if maximum:
        return {key: float(value) for key, value in maximum.items()}, "at most, by its autoscaler's config"
    if os.environ.get(AUTOSCALING_ENV) == "1":
        return None, f"autoscaling ({AUTOSCALING_ENV}=1)"
    return {key: float(value) for key, value in ray.cluster_resources().items()}, "in all"


def require_resources(plan: dict[str, Any], have: dict[str, float] | None = None, source: str = "in all") -> None:
    """Raises :class:`InputError` when ``plan`` (a job's resource plan) needs more CPUs or GPUs than the cluster
    (``have``, default: the connected one's :func:`cluster_ceiling`) can ever offer, counting the CPU its Ray Data
    tasks need beside the workers that hold theirs."""
    need = {key: value for key, value in plan["total"].items() if value > 0}
    if plan.get("data_tasks_cpu"):
        need["CPU"] = need.get("CPU", 0.0) + plan["data_tasks_cpu"]
    if have is None:
        have, source = cluster_ceiling()
        if have is None:
            return
    if any(value > have.get(key, 0.0) + 1e-9 for key, value in need.items()):
        data = f" (with {plan['data_tasks_cpu']:g} CPU left for the Ray Data tasks that feed it)" \
            if plan.get("data_tasks_cpu") else ""
        offered = {key: have.get(key, 0.0) for key in need}
        raise InputError(f"needs {_fmt(need)}{data}, but the cluster has {_fmt(offered)} {source}: lower "
                         f"{plan['sized_by']}, or add nodes")


def _pending_groups() -> list[dict[str, Any]]:
    return [group for group in ray.util.placement_group_table().values() if group.get("state") == "PENDING"]


@contextlib.contextmanager
def report_resource_waits(job: str, every_s: float = 20.0) -> Iterator[None]:
    """While the body runs, says every ``every_s`` seconds what placement groups wait for and what the cluster
    has free, so a job that cannot start yet (the resources are busy, or nodes are still coming) is not silent."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            pending = _pending_groups()
            if pending:
                bundles = [bundle for group in pending for bundle in group["bundles"].values()]
                keys = {key for bundle in bundles for key in bundle}

                def of(resources: dict[str, float], keys: set[str] = keys) -> str:
                    return _fmt({key: resources.get(key, 0.0) for key in keys})

                print(f"[{job}] waiting for resources: {len(bundles)} worker slot(s) of {_fmt(bundles[0])} pending; "
                      f"the cluster has {of(ray.available_resources())} free of {of(ray.cluster_resources())}",
                      file=sys.stderr, flush=True)

    thread = threading.Thread(target=watch, name=f"{job}-resource-waits", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
