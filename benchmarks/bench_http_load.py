"""HTTP load on the live Serve application: many concurrent clients, good and bad requests, overload on purpose.

    python benchmarks/bench_http_load.py [--config configs/tiny.yaml] [--clients 64] [--seconds 60]
        [--bad-fraction 0.2] [--max-ongoing 16] [--max-queued 16] [--out benchmarks/results/bench_http_load.json]

Untrained models of the config's sizes (nothing is downloaded) behind ``pipelines.serve.app`` on 127.0.0.1.
Each client loops: a good request (a synthetic caption, ``n`` from 1 to ``sampling.num_candidates``) or, with
``--bad-fraction``, one of :data:`BAD` (malformed or refused prompts); after a 503 it waits for ``Retry-After``
as a well-behaved client does. The ingress limits are set low (``--max-ongoing``/``--max-queued``) so that the
clients overload it. Prints (and writes) JSON: requests served, served/s, p50/p99 latency, responses by status
and request kind, responses that were not what their kind allows (must be 0: good -> 200 or 503, bad -> its
4xx or 503; no 500s, no connection errors) and the resident memory of the Serve replicas and proxy before, at
the peak of and after the load. Exits 1 when anything unexpected came back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import ray
import torch
from bench_generate import _free_port, write_models

from dalle_core.io import write_text
from pipelines.config import Config
from pipelines.data import synthetic
from pipelines.serve.app import max_body_bytes

# name -> (body, the status the app must answer); a callable gets the evaluate section.
BAD: dict[str, tuple[Any, int]] = {
    "not_json": (b"{prompt", 400),
    "array": (b'["a red circle"]', 400),
    "n_zero": ({"prompt": "a red circle", "n": 0}, 400),
    "n_fraction": ({"prompt": "a red circle", "n": 2.7}, 400),
    "top_over_n": ({"prompt": "a red circle", "n": 1, "top": 2}, 400),
    "unknown_field": ({"prompt": "a red circle", "steps": 9}, 400),
    "prompt_not_string": ({"prompt": {"text": "a red circle"}}, 400),
    "prompt_too_long": (lambda ev: {"prompt": "a" * (ev.max_prompt_chars + 1)}, 400),
    "body_too_large": (lambda ev: {"prompt": "a" * max_body_bytes(ev.max_prompt_chars)}, 413),
    "empty_prompt": ({"prompt": "   "}, 422),
    "unknown_chars": ({"prompt": "a red circle \u2603"}, 422),
}
SERVE_PROCESSES = ("ServeReplica", "ProxyActor")  # process titles Ray gives Serve's actors: ray::<class>


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {"cpu_model": names[0] if names else platform.processor(), "cpu_cores": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()}


def serve_rss_mib() -> dict[str, float]:
    """Resident memory of this Ray's Serve replicas and proxy (our own descendants only: other Ray clusters on
    the machine have processes of the same names)."""
    out: dict[str, float] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = proc.cmdline()[0] if proc.cmdline() else ""
            if title.startswith("ray::") and any(name in title for name in SERVE_PROCESSES):
                # "ray::ServeReplica:dalle:Generator.handle_request" while busy: the actor is the part before "."
                name = title.removeprefix("ray::").split(".", 1)[0]
                out[name] = round(proc.memory_info().rss / 2**20, 1)
        except psutil.Error:
            continue
    return out


class RssSampler(threading.Thread):
    """The peak RSS of every Serve process while the load runs (sampled every half second)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for name, rss in serve_rss_mib().items():
                self.peak[name] = max(rss, self.peak.get(name, 0.0))


def _request_body(body: Any, ev: Any) -> bytes:
    body = body(ev) if callable(body) else body
    return body if isinstance(body, bytes) else json.dumps(body).encode()


async def client(index: int, url: str, deadline: float, config: Config, bad_fraction: float,
                 records: list[dict[str, Any]]) -> None:
    """One client's loop until ``deadline``; one record per response (or connection error)."""
    rng = random.Random(index)
    captions = [r["caption"] for r in synthetic.holdout_examples(config.synthetic)]
    bad = {name: (_request_body(body, config.evaluate), status) for name, (body, status) in BAD.items()}
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.perf_counter() < deadline:
            if rng.random() < bad_fraction:
                kind = rng.choice(sorted(bad))
                body, expected = bad[kind]
            else:
                kind, expected = "good", 200
                body = json.dumps({"prompt": rng.choice(captions),
                                   "n": rng.randint(1, config.sampling.num_candidates), "top": 1}).encode()
            start = time.perf_counter()
            retry_after = 0.0
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as reply:
                    await reply.read()
                    status = reply.status
                    retry_after = float(reply.headers.get("Retry-After", 0))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = f"error:{type(exc).__name__}"
            records.append({"kind": kind, "status": status, "expected": expected,
                            "latency_s": time.perf_counter() - start})
            if status == 503:
                await asyncio.sleep(retry_after)


async def run_clients(url: str, clients: int, seconds: float, config: Config, bad_fraction: float
                      ) -> tuple[list[dict[str, Any]], float]:
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    await asyncio.gather(*(client(i, url, start + seconds, config, bad_fraction, records) for i in range(clients)))
    return records, time.perf_counter() - start


def _percentiles(latencies: list[float]) -> dict[str, float] | None:
    if not latencies:
        return None
    ms = np.asarray(latencies) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p99": round(float(np.percentile(ms, 99)), 1),
            "max": round(float(ms.max()), 1), "n": len(latencies)}


def summarize(records: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    """Counts and latencies of the load; ``unexpected`` counts responses their request kind does not allow."""
    by_kind: dict[str, Counter] = {}
    for r in records:
        by_kind.setdefault(r["kind"], Counter())[str(r["status"])] += 1
    unexpected = [r for r in records if r["status"] not in (r["expected"], 503)]
    served = [r for r in records if r["kind"] == "good" and r["status"] == 200]
    return {
        "requests": len(records), "elapsed_s": round(elapsed, 1), "served": len(served),
        "served_per_s": round(len(served) / elapsed, 2),
        "latency_ms": {"served": _percentiles([r["latency_s"] for r in served]),
                       "refused_4xx": _percentiles([r["latency_s"] for r in records
                                                    if isinstance(r["status"], int) and 400 <= r["status"] < 500]),
                       "overloaded_503": _percentiles([r["latency_s"] for r in records if r["status"] == 503])},
        "status_counts": dict(sorted(Counter(str(r["status"]) for r in records).items())),
        "by_kind": {kind: dict(sorted(counts.items())) for kind, counts in sorted(by_kind.items())},
        "unexpected": len(unexpected), "unexpected_examples": unexpected[:5],
    }


def bench(config: Config, workdir: Path, clients: int, seconds: float, bad_fraction: float) -> dict[str, Any]:
    from ray import serve

    from pipelines.artifacts import model_paths
    from pipelines.serve.app import build_app

    config = write_models(config, workdir)
    ev = config.evaluate
    ray.init(address="local", num_cpus=4, object_store_memory=300 * 1024**2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": ev.http_port})
        serve.run(build_app(config, model_paths(config)), name=ev.app_name, route_prefix="/")
        url = f"http://127.0.0.1:{ev.http_port}/"
        # One request first: the replicas have loaded and warmed up before the clock starts.
        warm = urllib.request.Request(url, json.dumps({"prompt": "a red circle", "n": 1}).encode(), method="POST")
        with urllib.request.urlopen(warm, timeout=300) as reply:
            assert reply.status == 200, reply.status
        before = serve_rss_mib()
        sampler = RssSampler()
        sampler.start()
        records, elapsed = asyncio.run(run_clients(url, clients, seconds, config, bad_fraction))
        sampler.done.set()
        sampler.join()
        time.sleep(2)  # let the replicas settle before the last reading
        rss = {"before": before, "peak_during_load": sampler.peak, "after": serve_rss_mib()}
    finally:
        serve.shutdown()
        ray.shutdown()
    limits = {"max_ongoing_requests": ev.max_ongoing_requests, "max_queued_requests": ev.max_queued_requests,
              "retry_after_s": ev.retry_after_s, "max_batch_size": ev.max_batch_size,
              "generator_replicas": ev.generator_replicas, "num_candidates_max": config.sampling.num_candidates}
    return {"clients": clients, "seconds": seconds, "bad_fraction": bad_fraction, "serve": limits,
            **summarize(records, elapsed), "rss_mib": rss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--bad-fraction", type=float, default=0.2, help="share of requests that are malformed")
    parser.add_argument("--max-ongoing", type=int, default=16, help="evaluate.max_ongoing_requests")
    parser.add_argument("--max-queued", type=int, default=16, help="evaluate.max_queued_requests")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    overrides = {"evaluate.http_port": _free_port(), "evaluate.max_ongoing_requests": args.max_ongoing,
                 "evaluate.max_queued_requests": args.max_queued}
    config = Config.load(args.config, overrides)
    report: dict[str, Any] = {"machine": machine(), "dalle": {"dim": config.dalle.dim, "depth": config.dalle.depth,
                                                              "image_seq_len": config.dalle.image_seq_len}}
    with tempfile.TemporaryDirectory() as tmp:
        report.update(bench(config, Path(tmp), args.clients, args.seconds, args.bad_fraction))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    return 1 if report["unexpected"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
