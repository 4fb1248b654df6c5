"""Shared fixtures: a real S3-compatible server on loopback (moto's server mode, as s3fs's own tests use), a
module-scoped Ray cluster, and tiny tokenizer/dVAE files for the data-pipeline tests."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[1] / "jobs"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1; the AWS_* variables point s3fs (and pipelines.storage) at it.

    Yields ``{"endpoint_url": ...}`` plus the credentials, usable as s3fs ``client_kwargs``/``key``/``secret``."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    try:
        yield {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: dict[str, str]) -> str:
    """A fresh empty bucket on the loopback server, as an ``s3://name`` URL."""
    from pipelines import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.filesystem(f"s3://{name}")
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray per test module (4 logical CPUs so actor pools and tasks fit on a 2-core machine)."""
    import ray

    # address="local": always a fresh cluster, never one another process on this machine left running
    ray.init(address="local", num_cpus=4, object_store_memory=200 * 1024**2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def write_tiny_models(folder: Path, captions: list[str], seed: int = 0) -> tuple[str, str]:
    """A BPE model trained on ``captions`` and an untrained (seeded) default-size dVAE; returns their paths."""
    import torch

    from dalle_core.checkpoint import save_model
    from dalle_core.config import VAEConfig
    from dalle_core.tokenizer import BPETokenizer
    from dalle_core.vae import DiscreteVAE

    tokenizer_path, vae_path = str(folder / "bpe.model"), str(folder / "vae.pt")
    BPETokenizer.train(captions, tokenizer_path, vocab_size=128, text_seq_len=16)
    torch.manual_seed(seed)
    save_model(DiscreteVAE(VAEConfig(image_size=32, num_layers=2, num_tokens=64)), vae_path)
    return tokenizer_path, vae_path


def job_main(name: str) -> Callable[[list[str] | None], int]:
    """``jobs/<name>.py``'s ``main``, imported once into this process (a subprocess would cost a torch import)."""
    module_name = f"job_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, JOBS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[module_name] = module
    return sys.modules[module_name].main


def start_ray_with_state_api(**kwargs: object) -> None:
    """A local Ray whose dashboard serves the state API (``ray.util.state``), on a free port."""
    import ray

    ray.init(address="local", num_cpus=4, object_store_memory=200 * 1024**2, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=free_port(), **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False


def train_worker_pids() -> set[int]:
    """The pids of the live Ray Train workers, as Ray's state API lists them."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return {actor.pid for actor in actors}


@contextlib.contextmanager
def sigkill_paused_worker(marker: Path, settle_s: float = 3.0, timeout_s: float = 300) -> Iterator[dict[str, int]]:
    """While the body trains with ``PAUSE_ENV`` pointing at ``marker``: waits for the paused worker to write its
    pid there, checks that the state API lists that pid as a live Train worker, and SIGKILLs it from outside
    ``settle_s`` later (time for Ray Train to register the checkpoint reported just before; a real crash rarely
    lands within one controller poll of it). Yields ``{"pid": ...}``, filled once killed."""
    killed: dict[str, int] = {}
    errors: list[BaseException] = []

    def kill() -> None:
        try:
            deadline = time.time() + timeout_s
            while not marker.exists():
                if time.time() > deadline:
                    raise TimeoutError(f"no worker paused at {marker}")
                time.sleep(0.2)
            pid = int(marker.read_text())
            assert pid in train_worker_pids(), "the paused process is not a live Train worker"
            time.sleep(settle_s)
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(exc)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    yield killed
    thread.join(timeout=timeout_s)
    if errors:
        raise errors[0]
    assert killed, "no worker was killed"


class RunsCodeWhenUnpickled:
    """A pickle that writes ``marker`` when loaded by a plain unpickler: what a restricted one must refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)
