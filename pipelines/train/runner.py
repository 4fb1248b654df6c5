"""The one training runner: every model (dVAE, DALLE, CLIP) trains through it on Ray Train.

In the style of torchtitan's components, the runner owns what every training job shares, driven by one
:class:`~pipelines.config.TrainerConfig` section:

* building the ``TorchTrainer`` (workers, resources, placement, storage, failure retries, checkpoints kept);
* on each worker, the epoch/step loop over its dataset shard, with exact mid-epoch resume (step, epoch, batches
  already consumed, each rank's RNG), the interval metrics (summed on the device, all-reduced at log steps,
  written by rank 0 as JSONL + TensorBoard), the checkpoint cadence and ``ray.train.report``;
* after the run, publishing the last checkpoint's ``model.safetensors`` to the path the config names;
* for a fine-tune (``init_from``), the published weights the first attempt starts from: a run with a
  checkpoint resumes from it instead (:mod:`pipelines.train.finetune`).

A model supplies only a :class:`Task`: its step, its state to save and load, and its metrics. The runner never
looks inside a batch or a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from fsspec.implementations.local import LocalFileSystem
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from dalle_core.checkpoint import load_model, save_model
from dalle_core.train_utils import gather_floats, make_optimizer, make_scheduler, precision_choice
from pipelines import artifacts, storage
from pipelines.cluster import report_resource_waits
from pipelines.config import Config, InputError, TrainerConfig
from pipelines.resources import worker_resources

PROGRESS_FILE = "progress.json"
OPTIMIZER_FILE = "optimizer.pt"  # optimiser + LR schedule of the trainers without DeepSpeed
# Test hook "STEP:RANK:MARKER": that rank writes its pid to MARKER at STEP and stops there, for a test to kill it
# from outside (SIGKILL, found through Ray's state API) at a known point of the run.
PAUSE_ENV = "DALLE_TRAIN_PAUSE_AT"


@dataclass
class Progress:
    """Where a run is: optimiser steps taken, the data epoch, and batches of that epoch already trained on."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    world: int = 0  # workers of the run that saved it (0: not recorded, checkpoints older than elastic resume)


@dataclass
class WorkerContext:
    """What a task needs to know about the worker it runs on."""

    rank: int
    world: int
    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    resume_world: int = 0  # workers of the run whose checkpoint this one resumes (0: a fresh run or the same)
    node: str = ""  # the Ray node this worker runs on (placement is reported in the results)

    @property
    def resharding(self) -> bool:
        """Whether this run resumes a checkpoint written by another number of workers (an elastic resize, or a
        rerun with another ``num_workers``): state partitioned across the old workers must be re-cut."""
        return self.resume_world not in (0, self.world)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for trainers without DeepSpeed (weights and optimiser stay fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


class Task(Protocol):
    """What one model supplies to the runner; built once per worker, after ``torch.manual_seed(seed)`` so every
    rank starts from the same weights. Its builder takes ``init``: the state dict a fine-tune starts from
    (``init_from``, on a run without a checkpoint), to load before any optimiser or engine copies the weights,
    or None for the seeded init."""

    name: str  # prefix of its log lines
    log_keys: tuple[str, ...]  # record fields printed at each log step

    def describe(self) -> str:
        """One line for the start of the run (sizes, parallelism)."""

    def load(self, checkpoint: CheckpointReader, rank: int, progress: Progress) -> None:
        """Restores the state :meth:`save` wrote, fetching only the files this rank needs from ``checkpoint``."""

    def train_step(self, batch: dict[str, np.ndarray], progress: Progress) -> tuple[dict[str, torch.Tensor], bool]:
        """One micro-batch. Returns scalar sums to add to the interval metrics, kept on the device (no sync per
        step), and whether an optimiser step completed (False while accumulating gradients)."""

    def after_step(self, progress: Progress) -> None:
        """Anything due after an optimiser step (sample pictures); the runner checkpoints after it."""

    def interval_record(self, sums: dict[str, float], steps: int, seconds: float) -> dict[str, Any]:
        """The metrics of one log interval from the sums of every rank (``sums["batches"]`` counts micro-batches
        of all ranks) and the optimiser steps and seconds it took; called on every rank."""

    def save(self, folder: str, rank: int, progress: Progress, final: bool) -> dict[str, Any]:
        """Writes this rank's state into ``folder`` (rank 0 writes ``model.safetensors``); returns extra report metrics.
        Called on every rank at once, so it may run collectives."""


TaskBuilder = Callable[..., Task]


# ---------------------------------------------------------------------------------------------------------
# Driver side


def section_name(config: Config, section: TrainerConfig) -> str:
    """``train``, ``train_vae`` or ``train_clip``: the name the user's config gives ``section``."""
    return next(f.name for f in dataclasses.fields(config) if getattr(config, f.name) is section)


def require_rows(config: Config, section: TrainerConfig, rows: int) -> None:
    """Refuses a data set too small for one step: every worker takes an equal share of the rows and trains on
    full batches only, so a smaller set would fail inside every worker after the cluster was taken."""
    name, need = section_name(config, section), section.batch_size * section.num_workers
    if rows < need:
        raise InputError(f"{name}.batch_size={section.batch_size} x {name}.num_workers={section.num_workers} needs "
                         f"at least {need} training rows, but the data set has {rows}")


def process_group_backend(use_gpu: bool) -> str:
    """The torch.distributed backend of the workers' process group. On GPUs NCCL carries CUDA tensors and gloo any
    CPU tensor a collective is handed (an object gather, a counter), instead of NCCL raising on it: a CPU float in
    the first checkpoint's all_gather killed every GPU run, and every retry, at that step."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def worker_count(section: TrainerConfig) -> int | tuple[int, int]:
    """Ray Train's ``num_workers``: fixed, or elastic ``(min_workers, num_workers)``: the run starts with what the
    cluster has (at least ``min_workers``), grows as nodes join and, after losing a node, resumes its last checkpoint
    on fewer workers instead of waiting for a replacement (Ray Train V2)."""
    return (section.min_workers, section.num_workers) if section.min_workers else section.num_workers


def build_trainer(config: Config, section: TrainerConfig, build_task: TaskBuilder, *, dataset: ray.data.Dataset,
                  storage_path: str, run_name: str, rows: int | None = None,
                  task_kwargs: dict[str, Any] | None = None, job_start: float | None = None) -> TorchTrainer:
    """The TorchTrainer for one run of ``build_task`` over ``dataset`` (``rows`` rows, when known without
    reading it; counted here when the set is materialised); rerunning with the same ``storage_path`` and
    ``run_name`` resumes from the run's latest checkpoint."""
    dataset.context.enable_progress_bars = False  # the runner prints its own progress, one line per log step
    if section.materialize:  # otherwise every epoch re-reads (and re-decodes) the input: seconds per epoch
        dataset = dataset.materialize()
        rows = dataset.count()
    if rows is not None:
        require_rows(config, section, rows)
    store_fs, store_path = storage.arrow_filesystem(storage_path)
    loop_config = {
        "config": config, "section": section, "build_task": build_task, "task_kwargs": task_kwargs or {},
        "run_dir": artifacts.run_dir(storage_path, run_name), "job_start": job_start or time.time(),
        "pause_at": os.environ.get(PAUSE_ENV, ""),
    }
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=process_group_backend(section.use_gpu)),
        scaling_config=ScalingConfig(num_workers=worker_count(section), use_gpu=section.use_gpu,
                                     resources_per_worker=worker_resources(section),
                                     placement_strategy=section.placement_strategy),
        run_config=RunConfig(
            name=run_name,
            storage_path=store_path if store_fs else os.path.abspath(store_path),
            storage_filesystem=store_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=section.keep_checkpoints),
            failure_config=FailureConfig(max_failures=section.max_failures),
        ),
        datasets={"train": dataset},
        # preserve_order keeps each worker's slice of the stream the same on every run, which is what lets a
        # resumed run skip exactly the batches it already trained on.
        dataset_config=DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )


def fit_and_publish(trainer: TorchTrainer, destination: str) -> Result:
    """Runs the trainer to the end and publishes its last checkpoint's model file to ``destination``. Says what it
    waits for while workers cannot start; Ctrl-C aborts the run (Ray Train's own graceful abort) and ends in
    ``KeyboardInterrupt`` naming the checkpoint a rerun resumes from, never in a published half-trained model."""
    loop_config = trainer.train_loop_config
    max_steps = loop_config["section"].max_steps
    handler = signal.getsignal(signal.SIGINT)
    try:
        with report_resource_waits(section_name(loop_config["config"], loop_config["section"])):
            result = trainer.fit()
    except SystemExit as exc:  # Ray Train's SIGINT handler exits once the aborted controller is gone
        raise KeyboardInterrupt(f"rerun with the same run name to resume {_resumes_from(loop_config)}") from exc
    finally:
        signal.signal(signal.SIGINT, handler)  # Ray Train's handler would otherwise outlive the run
    step = result.metrics.get("step", 0) if result.checkpoint is not None else 0
    if step < max_steps:  # aborted without an exception: keep the checkpoint, publish nothing
        raise KeyboardInterrupt(f"stopped at step {step} of {max_steps}; rerun with the same run name to resume "
                                f"{_resumes_from(loop_config)}")
    artifacts.publish(checkpoint_url(result.checkpoint, loop_config["run_dir"]), destination)
    return result


def checkpoint_url(checkpoint: Checkpoint, run_dir: str) -> str:
    """Where ``checkpoint`` lives as a path or fsspec URL (Ray holds it as a pyarrow filesystem and a bare path)."""
    return storage.join(run_dir, storage.basename(checkpoint.path))


def _resumes_from(loop_config: dict[str, Any]) -> str:
    fs, root = storage.filesystem(loop_config["run_dir"])
    found = sorted(fs.glob(f"{root}/{artifacts.CHECKPOINT_PREFIX}*"))
    return f"from {os.path.basename(found[-1])}" if found else "from the start"


def read_checkpoint_json(result: Result, name: str) -> dict[str, Any]:
    """A JSON file a task wrote into the run's last checkpoint (that file alone is read)."""
    checkpoint = result.checkpoint
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as f:
        return json.loads(f.read())


class CheckpointReader:
    """One checkpoint as one rank reads it: a file is fetched when asked for (local storage is read in place),
    never the whole folder, and the bytes read are counted. A resuming rank of a sharded run thus reads the shared
    files and its own shards, not every rank's (Ray's ``as_directory`` downloads the whole checkpoint, DeepSpeed
    shards of every rank included, on every worker)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = storage.filesystem(url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.local = self.root if self.is_local else tempfile.mkdtemp(prefix="dalle-resume-")
        self.bytes_read = 0
        self.names: list[str] = []
        self.refresh()

    def refresh(self) -> None:
        """Lists every file of the checkpoint, relative to it (a listing reads no file): again after another rank
        added to it."""
        prefix = self.root.rstrip("/") + "/"
        self.names = sorted(p[len(prefix):] for p in self.fs.find(self.root) if p.startswith(prefix))

    def path(self, name: str) -> str:
        """The local path of file ``name`` (relative to the checkpoint), fetched first where the store is remote."""
        local = os.path.join(self.local, name)
        self.bytes_read += self.fs.size(f"{self.root}/{name}")
        if not self.is_local:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            self.fs.get_file(f"{self.root}/{name}", local)
        return local

    def folder(self, prefix: str, keep: Callable[[str], bool] = lambda name: True) -> str:
        """The local folder ``prefix`` with every file under it that ``keep`` accepts (its name relative to the
        checkpoint) fetched."""
        for name in self.names:
            if name.startswith(prefix.rstrip("/") + "/") and keep(name):
                self.path(name)
        return os.path.join(self.local, prefix)

    def add_folder(self, local_folder: str, prefix: str) -> None:
        """Writes a folder made on this worker into the checkpoint under ``prefix`` (a derived form of its state
        that other ranks, and later resumes, read instead of making it again)."""
        if self.is_local:
            if os.path.abspath(local_folder) != os.path.abspath(os.path.join(self.local, prefix)):
                shutil.copytree(local_folder, os.path.join(self.local, prefix), dirs_exist_ok=True)
        else:
            self.fs.put(local_folder.rstrip("/") + "/", f"{self.root}/{prefix}", recursive=True)
        self.refresh()

    def close(self) -> None:
        if not self.is_local:
            shutil.rmtree(self.local, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Worker side


class MetricsWriter:
    """JSONL + TensorBoard under ``run_dir`` (rank 0). Remote run dirs are staged locally and uploaded at
    every checkpoint, since appending to an object store is not possible."""

    def __init__(self, run_dir: str, prefix: str) -> None:
        self.fs, self.remote = storage.filesystem(run_dir)
        self.prefix = prefix
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.local = self.remote if self.is_local else tempfile.mkdtemp(prefix="dalle-metrics-")
        os.makedirs(self.local, exist_ok=True)
        jsonl = f"{self.remote}/metrics.jsonl"
        if not self.is_local and self.fs.exists(jsonl):  # resumed run: keep the history
            self.fs.get(jsonl, f"{self.local}/metrics.jsonl")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(f"{self.local}/tensorboard")
        self.jsonl = open(f"{self.local}/metrics.jsonl", "a")

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(f"{self.prefix}/{key}", value, record["step"])

    def sync(self) -> None:
        self.tb.flush()
        if not self.is_local:
            self.fs.put(f"{self.local}/", self.remote, recursive=True)

    def close(self) -> None:
        self.sync()
        self.tb.close()
        self.jsonl.close()
        if not self.is_local:  # the staging copy, now uploaded
            shutil.rmtree(self.local, ignore_errors=True)


class IntervalSums:
    """Per-interval metric sums on the device: added every micro-batch, all-reduced only at log steps."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.keys, self.sums = device, None, None

    def add(self, values: dict[str, torch.Tensor]) -> None:
        if self.keys is None:
            self.keys = [*values, "batches"]
            self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
        row = [torch.as_tensor(values[k], device=self.device).detach().double().reshape(()) for k in self.keys[:-1]]
        self.sums += torch.stack([*row, torch.ones((), dtype=torch.float64, device=self.device)])

    def reduce(self) -> dict[str, float]:
        """Sums over every rank (collective); resets the interval."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums)
        totals = dict(zip(self.keys, self.sums.tolist(), strict=True))
        self.sums.zero_()
        return totals


def epoch_batches(shard: Any, section: TrainerConfig, progress: Progress, rank: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of this worker's shard, epoch after epoch, skipping the ones a resumed run already trained on;
    keeps ``progress.epoch`` and ``progress.batches_in_epoch`` up to date."""
    skip = progress.batches_in_epoch
    while True:
        consumed = False
        shuffle = section.shuffle_buffer or None
        for batch in shard.iter_batches(batch_size=section.batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=shuffle,
                                        local_shuffle_seed=section.seed + progress.epoch if shuffle else None):
            consumed = True
            if skip > 0:  # resumed mid-epoch: these samples are already in the weights
                skip -= 1
                continue
            progress.batches_in_epoch += 1
            yield batch
        if not consumed:
            raise RuntimeError(f"rank {rank}: the dataset shard is empty; need at least batch_size="
                               f"{section.batch_size} rows per worker")
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0


class DDPTask:
    """Base of the tasks trained with plain torch DDP and AdamW (the dVAE, CLIP): the model, its optimiser and
    LR schedule, their state in a checkpoint, and the optimiser step. ``module`` is what is saved; ``wrapped``
    (``module`` itself, or a wrapper routing the loss through ``forward``) is what DDP runs."""

    def __init__(self, module: torch.nn.Module, wrapped: torch.nn.Module, section: TrainerConfig,
                 worker: WorkerContext, init: dict[str, torch.Tensor] | None,
                 find_unused_parameters: bool = False) -> None:
        self.module, self.section, self.worker = module, section, worker
        if init is not None:  # before DDP and the optimiser take the parameters
            module.load_state_dict(init)
        # DDP when world > 1; moved to the worker's device. A task whose steps leave some parameters out of the
        # graph asks DDP to look for them each step (their gradients then stay None, so AdamW leaves them be).
        self.ddp = ray.train.torch.prepare_model(
            wrapped, parallel_strategy_kwargs={"find_unused_parameters": True} if find_unused_parameters else None)
        self.optimizer = make_optimizer(self.ddp, section.optim)
        self.scheduler = make_scheduler(self.optimizer, section.optim, section.max_steps)

    def describe(self) -> str:
        return f"params={sum(p.numel() for p in self.module.parameters())}"

    def load(self, checkpoint: CheckpointReader, rank: int, progress: Progress) -> None:
        self.module.load_state_dict(load_model(checkpoint.path(artifacts.MODEL_FILE)).state_dict())
        state = torch.load(checkpoint.path(OPTIMIZER_FILE), weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def optimizer_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.section.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), self.section.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    def after_step(self, progress: Progress) -> None:
        pass

    def save_state(self, folder: str, extra: dict[str, Any]) -> None:
        """The self-describing model (``extra`` beside its weights) and the optimiser and LR schedule state, as
        plain tensors and numbers (read back with ``weights_only=True``). Rank 0 calls it: DDP keeps every rank's
        copy identical."""
        save_model(self.module, os.path.join(folder, artifacts.MODEL_FILE), extra=lineage(self.section, extra))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   os.path.join(folder, OPTIMIZER_FILE))


def lineage(section: TrainerConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` for a saved model, plus the file a fine-tune started from: where its weights came from."""
    return {**extra, "init_from": section.init_from} if section.init_from else extra


def _pause_hook(spec: str, step: int, rank: int) -> None:
    """Test hook (:data:`PAUSE_ENV`): at ``step`` this rank writes its pid into the marker file and waits to be
    killed from outside; a retried attempt finds the marker and runs on."""
    if not spec:
        return
    at_step, at_rank, marker = spec.split(":", 2)
    if step == int(at_step) and rank == int(at_rank) and not os.path.exists(marker):
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        log(f"rank {rank}: paused at step {step}, pid {os.getpid()}")
        time.sleep(600)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG streams: the CPU's and, on an accelerator, the device's (caption dropout and the dVAE's
    Gumbel noise draw on the device, so an exact resume on a GPU needs its generator too)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type != "cpu":
        state[device.type] = torch.get_device_module(device.type).get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor] | torch.Tensor, device: torch.device) -> None:
    """Restores :func:`rng_state` (a bare tensor: a checkpoint from before device streams were saved)."""
    state = state if isinstance(state, dict) else {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if device.type != "cpu" and device.type in state:
        torch.get_device_module(device.type).set_rng_state(state[device.type], device)


def read_progress(checkpoint: CheckpointReader) -> Progress:
    with open(checkpoint.path(PROGRESS_FILE)) as f:
        return Progress(**json.load(f))


def _load(checkpoint: CheckpointReader, task: Task, worker: WorkerContext, progress: Progress) -> Progress:
    task.load(checkpoint, worker.rank, progress)
    rng = f"rng/rank_{worker.rank}.pt"
    if rng in checkpoint.names and not worker.resharding:  # another world: another split of the data anyway
        set_rng_state(torch.load(checkpoint.path(rng), weights_only=True), worker.device)
    if worker.resharding:  # the same share of the epoch's samples skipped, cut into this world's batches
        progress.batches_in_epoch = progress.batches_in_epoch * progress.world // worker.world
    return progress


def _save(task: Task, progress: Progress, writer: MetricsWriter | None, worker: WorkerContext, final: bool) -> None:
    """Every rank writes its part into its own folder; Ray Train merges them into one checkpoint."""
    rank = worker.rank
    folder = tempfile.mkdtemp(prefix=f"{task.name}-ckpt-{rank}-")
    try:
        os.makedirs(os.path.join(folder, "rng"))
        torch.save(rng_state(worker.device), os.path.join(folder, "rng", f"rank_{rank}.pt"))
        metrics = task.save(folder, rank, progress, final)
        if rank == 0:
            with open(os.path.join(folder, PROGRESS_FILE), "w") as f:
                json.dump(asdict(progress), f)
            if writer is not None:
                writer.sync()
        ray.train.report({**asdict(progress), **metrics}, checkpoint=Checkpoint.from_directory(folder),
                         checkpoint_dir_name=artifacts.checkpoint_name(progress.step))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def log(line: str) -> None:
    """One line to the worker's stdout, which Ray streams to the driver. Not ``print``: Ray Train patches it to
    also go through the logging module, and the driver then shows every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _megabytes(values: list[int]) -> str:
    return "/".join(f"{v / 1e6:.1f}" for v in values)


def _format(record: dict[str, Any], keys: tuple[str, ...]) -> str:
    return " ".join(f"{k} {record[k]:.4g}" if isinstance(record[k], float) else f"{k} {record[k]}" for k in keys
                    if k in record)


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: builds the task, resumes it, and runs the step loop to ``max_steps``."""
    section: TrainerConfig = loop_config["section"]
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not every report's dict and checkpoint path
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if section.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL object collectives run on the current device
    precision, why = precision_choice(section.precision, device)
    found = ray.train.get_checkpoint()
    checkpoint = CheckpointReader(checkpoint_url(found, loop_config["run_dir"])) if found is not None else None
    progress = read_progress(checkpoint) if checkpoint is not None else Progress()
    worker = WorkerContext(rank, world, device, precision, resume_world=progress.world,
                           node=ray.get_runtime_context().get_node_id())
    # The run's own checkpoint wins over init_from: a killed fine-tune resumes, it never restarts from the init.
    init = load_model(section.init_from).state_dict() if section.init_from and checkpoint is None else None
    torch.manual_seed(section.seed)
    task = loop_config["build_task"](loop_config["config"], worker, init=init, **loop_config["task_kwargs"])
    torch.manual_seed(section.seed + 1 + rank)  # same weights everywhere, but each rank its own noise and dropout
    resumed: dict[str, Any] = {}
    if checkpoint is not None:
        _load(checkpoint, task, worker, progress)
        resumed = {"resume_read_bytes_per_worker": [int(b) for (b,) in gather_floats([checkpoint.bytes_read], device)],
                   "resume_world": worker.resume_world or world}
        checkpoint.close()
    progress.world = world
    start_step = progress.step
    writer = MetricsWriter(loop_config["run_dir"], task.name) if rank == 0 else None
    if rank == 0:
        log(f"[{task.name}] world={world} precision={worker.precision} ({why}) start_step={start_step} "
            f"epoch={progress.epoch} {task.describe()}{f' init_from={section.init_from}' if init is not None else ''}"
            + (f" resumed from {resumed['resume_world']} workers, read "
               f"{_megabytes(resumed['resume_read_bytes_per_worker'])} MB per worker" if resumed else ""))

    sums = IntervalSums(device)
    interval_start, interval_steps, first_step_after = time.perf_counter(), 0, None
    shard = ray.train.get_dataset_shard("train")
    batches = epoch_batches(shard, section, progress, rank)
    while progress.step < section.max_steps:
        values, stepped = task.train_step(next(batches), progress)
        sums.add(values)
        if not stepped:
            continue
        progress.step, interval_steps = progress.step + 1, interval_steps + 1
        _pause_hook(loop_config["pause_at"], progress.step, rank)
        if first_step_after is None:  # throughput excludes start-up (data pipeline, first-call overheads)
            first_step_after = time.time() - loop_config["job_start"]
            interval_start, interval_steps = time.perf_counter(), 0
        final = progress.step >= section.max_steps
        if progress.step % section.log_every == 0 or final:
            totals = sums.reduce()
            record = {"step": progress.step, "epoch": progress.epoch, "start_step": start_step,
                      **task.interval_record(totals, interval_steps, time.perf_counter() - interval_start),
                      "first_step_after_s": first_step_after, **resumed}
            resumed = {}  # the first record after a resume says what it read
            if writer is not None:
                writer.write(record)
                log(f"[{task.name}] step {progress.step}/{section.max_steps} {_format(record, task.log_keys)}")
            interval_start, interval_steps = time.perf_counter(), 0
        task.after_step(progress)
        if progress.step % section.checkpoint_every == 0 or final:
            _save(task, progress, writer, worker, final)
    if writer is not None:
        writer.close()
