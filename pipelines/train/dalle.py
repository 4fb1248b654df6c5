"""Stage two on Ray Train: each TorchTrainer worker runs DALLE under DeepSpeed ZeRO, streaming token shards.

Ray-side glue only (the model is :class:`dalle_core.dalle.DALLE`, the LR schedule / collate / MFU maths live
in :mod:`dalle_core.train_utils`). What this module adds:

* the DeepSpeed config built from ``TrainConfig`` (ZeRO 0-3, fp32/bf16/fp16, accumulation, clipping) with a
  torch AdamW passed in, so DeepSpeed never JIT-builds FusedAdam;
* checkpoints through ``ray.train.report``: every rank writes its DeepSpeed shards into its own directory and
  Ray Train merges them into one checkpoint folder; rank 0 adds consolidated fp32 weights (``model.pt``,
  loadable by ``dalle_core.checkpoint.load_model`` without DeepSpeed, at any ZeRO stage), the data position
  and a probe batch with the engine's logits so consolidation can be verified offline;
* resume from ``ray.train.get_checkpoint()``: optimizer, LR schedule, step and the data epoch plus the number
  of batches already consumed in it, so a restarted run sees the same samples an uninterrupted one would;
* metrics (JSONL + TensorBoard) in the run directory, written by rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

import ray
import ray.train
import torch
from fsspec.implementations.local import LocalFileSystem
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import pipelines
from dalle_core.checkpoint import save_model
from dalle_core.dalle import DALLE
from dalle_core.train_utils import (
    collate_tokens,
    make_optimizer,
    make_scheduler,
    measure_peak_flops,
    mfu,
    peak_memory_bytes,
)
from pipelines import storage
from pipelines.config import Config, TrainConfig
from pipelines.resources import train_worker_resources

TOKEN_COLUMNS = ["text_ids", "image_codes"]  # string columns (key, caption, source) never reach the workers
DS_TAG = "state"
FAIL_ENV = "DALLE_TRAIN_FAIL_AT"  # test hook "STEP:RANK:MARKER": that rank exits once at STEP (marker guards)


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for one run. The optimizer is a client torch AdamW (hence
    ``zero_allow_untested_optimizer``); scheduler stepping and checkpointing stay with DeepSpeed."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = train.zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def shard_paths(manifest: dict[str, Any], shards_dir: str) -> list[str]:
    """Absolute shard URLs from the manifest (entries are relative to the manifest's folder)."""
    base = shards_dir.rstrip("/")
    paths = [entry["path"] for entry in manifest["shards"]]
    return [p if "://" in p or p.startswith("/") else f"{base}/{p}" for p in paths]


def load_checked_manifest(config: Config, shards_dir: str, manifest_path: str | None = None) -> dict[str, Any]:
    """Reads the token shards' manifest and checks it against ``config.dalle`` (ConfigError naming the
    field). Needs no Ray, so jobs call it before ``ray.init`` and a mismatch costs no cluster resources."""
    manifest = pipelines.read_manifest(manifest_path or shards_dir)
    pipelines.check_manifest(manifest, config.dalle)
    return manifest


def build_trainer(config: Config, manifest: dict[str, Any], *, shards_dir: str, storage_path: str, run_name: str,
                  job_start: float | None = None) -> TorchTrainer:
    """The TorchTrainer for one run over the shards a checked manifest lists; rerunning with the same
    ``storage_path`` and ``run_name`` resumes from the run's latest checkpoint."""
    paths = shard_paths(manifest, shards_dir)
    train = config.train
    filesystem = storage.arrow_filesystem(paths[0])[0]
    ds = ray.data.read_parquet([storage.arrow_filesystem(p)[1] for p in paths], filesystem=filesystem)
    ds = ds.select_columns(TOKEN_COLUMNS)
    if train.materialize:  # otherwise every epoch re-reads the shards (new read tasks, seconds on a small machine)
        ds = ds.materialize()
    loop_config = {
        "config": config,
        "run_dir": run_dir(storage_path, run_name),
        "job_start": job_start or time.time(),
        "fail_at": os.environ.get(FAIL_ENV, ""),
    }
    # preserve_order keeps each worker's slice of the stream the same on every run, which is what lets a
    # resumed run skip exactly the batches it already trained on.
    store_fs, store_path = storage.arrow_filesystem(storage_path)
    data_config = DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=train_worker_resources(train),
                                     placement_strategy=train.placement_strategy),
        run_config=RunConfig(
            name=run_name,
            storage_path=store_path if store_fs else os.path.abspath(store_path),
            storage_filesystem=store_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
        datasets={"train": ds},
        dataset_config=data_config,
    )


def run_dir(storage_path: str, run_name: str) -> str:
    """Where Ray Train puts the run's checkpoints, and where the metrics go beside them."""
    return f"{storage_path.rstrip('/')}/{run_name}"


# ---------------------------------------------------------------------------------------------------------
# Worker side.


class MetricsWriter:
    """JSONL + TensorBoard under ``run_dir`` (rank 0). Remote run dirs are staged locally and uploaded at
    every checkpoint, since appending to an object store is not possible."""

    def __init__(self, run_dir: str) -> None:
        self.fs, self.remote = storage.filesystem(run_dir)
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
                self.tb.add_scalar(f"train/{key}", value, record["step"])

    def sync(self) -> None:
        self.tb.flush()
        if not self.is_local:
            self.fs.put(f"{self.local}/", self.remote, recursive=True)

    def close(self) -> None:
        self.sync()
        self.tb.close()
        self.jsonl.close()


def consolidated_state_dict(engine: Any, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full fp32 weights whatever the ZeRO stage: gathered from the fp32 master partitions (ZeRO 1-3, bf16
    optimizer), else the module's own parameters (stage 0 fp32/fp16). Collective: every rank must call it;
    ranks with ``keep=False`` take part in the gathers but hold nothing."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters(remove_duplicate=False):
        full = safe_get_full_fp32_param(param)
        if keep:
            state[name] = (full if full is not None else param.detach()).float().cpu().clone()
    return state


def _plain_grad_norm(engine: Any) -> float | None:
    """Global gradient norm where DeepSpeed keeps none (ZeRO-0 with a client optimizer): there the gradients
    are whole and already averaged across ranks after backward. ZeRO 1-3 report their own norm."""
    if engine.zero_optimization_stage() != 0:
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def _fail_hook(spec: str, step: int, rank: int) -> None:
    """Test hook: simulates a worker crash once (the marker file makes the retried attempt survive)."""
    if not spec:
        return
    at_step, at_rank, marker = spec.split(":", 2)
    if step == int(at_step) and rank == int(at_rank) and not os.path.exists(marker):
        open(marker, "w").close()
        # A real crash rarely lands within one controller poll of the last checkpoint; without this pause the
        # dying rank's queued checkpoint report is lost with it and the run would resume from an older one.
        time.sleep(3.0)
        print(f"[train] rank {rank}: simulated crash at step {step}", flush=True)
        os._exit(1)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine over the shared process group, streaming its dataset shard."""
    config: Config = loop_config["config"]
    train = config.train
    if not train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR: DeepSpeed picks its accelerator at first use

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if train.use_gpu else torch.device("cpu")
    torch.manual_seed(train.seed)
    model = DALLE(config.dalle).to(device)
    num_params = model.num_params()  # before ZeRO-3 partitions the parameters away
    flops_per_token = model.flops_per_token()
    torch.manual_seed(train.seed + 1 + rank)  # same init everywhere, but each rank its own caption dropout
    optimizer = make_optimizer(model, train.optim)
    scheduler = make_scheduler(optimizer, train.optim, train.max_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(train, world), dist_init_required=False)

    compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[train.precision]
    epoch, skip_batches, start_step = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(f"{ckpt_dir}/deepspeed", tag=DS_TAG, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
            with open(f"{ckpt_dir}/train_state.json") as f:
                state = json.load(f)
            rng_path = f"{ckpt_dir}/rng/rank_{rank}.pt"
            if os.path.exists(rng_path):  # absent when resuming with more workers than saved
                torch.set_rng_state(torch.load(rng_path))
        epoch, skip_batches, start_step = state["epoch"], state["batches_in_epoch"], state["step"]
        if engine.global_steps != start_step:
            raise RuntimeError(f"checkpoint says step {start_step}, DeepSpeed state says {engine.global_steps}")

    cfg_d = config.dalle
    seq_len = cfg_d.seq_len
    samples_per_step = train.batch_size * train.grad_accum * world
    peak = train.peak_flops_per_worker or measure_peak_flops(device, dtype=compute_dtype)
    writer = MetricsWriter(loop_config["run_dir"]) if rank == 0 else None
    if rank == 0:
        print(f"[train] world={world} zero={train.zero_stage} precision={train.precision} "
              f"params={num_params} start_step={start_step} epoch={epoch}",
              flush=True)

    # loss, loss_text, loss_img, micro-batches in this interval; kept on the device: no sync per step
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    one = torch.ones((), dtype=torch.float64, device=device)
    interval_start, interval_steps, first_step_after = time.perf_counter(), 0, None
    shard = ray.train.get_dataset_shard("train")
    step, batches_in_epoch, last_batch, grad_norm = start_step, skip_batches, None, None
    while step < train.max_steps:
        consumed_any = False
        iterator = shard.iter_batches(batch_size=train.batch_size, batch_format="numpy", drop_last=True,
                                      local_shuffle_buffer_size=train.shuffle_buffer or None,
                                      local_shuffle_seed=train.seed + epoch if train.shuffle_buffer else None)
        for batch in iterator:
            consumed_any = True
            if skip_batches > 0:  # resumed mid-epoch: these samples are already in the weights
                skip_batches -= 1
                continue
            text, codes = collate_tokens(batch["text_ids"], batch["image_codes"], cfg_d.text_seq_len)
            text, codes = text.to(device), codes.to(device)
            last_batch = (text, codes)
            loss, loss_text, loss_img = engine(text, codes, return_loss=True)
            engine.backward(loss)
            next_step = step + 1
            if engine.is_gradient_accumulation_boundary() and (next_step % train.log_every == 0
                                                               or next_step == train.max_steps):
                grad_norm = _plain_grad_norm(engine)  # before step() clears the gradients
            engine.step()
            batches_in_epoch += 1
            sums += torch.stack([loss.detach().double(), loss_text.detach().double(), loss_img.detach().double(), one])
            if engine.global_steps == step:  # still accumulating
                continue
            step, interval_steps = engine.global_steps, interval_steps + 1
            _fail_hook(loop_config["fail_at"], step, rank)
            if first_step_after is None:  # throughput excludes start-up (data pipeline, first-call overheads)
                first_step_after, interval_start, interval_steps = time.time() - loop_config["job_start"], \
                    time.perf_counter(), 0
                if rank == 0:
                    print(f"[train] first step {first_step_after:.1f}s after job start", flush=True)
            if step % train.log_every == 0 or step == train.max_steps:
                torch.distributed.all_reduce(sums)
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = interval_steps * samples_per_step * seq_len / elapsed if interval_steps else 0.0
                if engine.get_global_grad_norm() is not None:
                    grad_norm = engine.get_global_grad_norm()
                record = {
                    "step": step, "epoch": epoch, "start_step": start_step,
                    "loss": sums[0].item() / sums[3].item(), "loss_text": sums[1].item() / sums[3].item(),
                    "loss_img": sums[2].item() / sums[3].item(), "lr": engine.get_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "tokens_per_s": tokens_per_s, "samples_per_s": tokens_per_s / seq_len,
                    "mfu": mfu(tokens_per_s, flops_per_token, peak * world),
                    "first_step_after_s": first_step_after,
                }
                if writer is not None:
                    writer.write(record)
                    print(f"[train] step {step}/{train.max_steps} loss {record['loss']:.4f} "
                          f"lr {record['lr']:.2e} {tokens_per_s:.0f} tok/s mfu {record['mfu']:.3f}", flush=True)
                sums.zero_()
                interval_start, interval_steps = time.perf_counter(), 0
            if step % train.checkpoint_every == 0 or step == train.max_steps:
                state = {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch}
                _save_checkpoint(engine, config, state, last_batch, writer, rank, world)
            if step >= train.max_steps:
                break
        else:
            if not consumed_any:
                raise RuntimeError(f"rank {rank}: dataset shard is empty; need at least batch_size="
                                   f"{train.batch_size} rows per worker")
            epoch, batches_in_epoch = epoch + 1, 0
            continue
        break
    if writer is not None:
        writer.close()


def _save_checkpoint(engine: Any, config: Config, state: dict[str, int], probe: tuple[torch.Tensor, torch.Tensor],
                     writer: MetricsWriter | None, rank: int, world: int) -> None:
    """All ranks: DeepSpeed shards + a probe forward; rank 0 also the consolidated weights; then report."""
    tmp = tempfile.mkdtemp(prefix=f"dalle-ckpt-{rank}-")
    try:
        engine.save_checkpoint(f"{tmp}/deepspeed", tag=DS_TAG)
        os.makedirs(f"{tmp}/rng")  # per rank, so a resumed run draws the same caption dropout
        torch.save(torch.get_rng_state(), f"{tmp}/rng/rank_{rank}.pt")
        weights = consolidated_state_dict(engine, keep=rank == 0)
        engine.module.eval()
        with torch.no_grad():  # every rank forwards: under ZeRO-3 parameters are gathered collectively
            logits = engine.module(*probe)
        engine.module.train()
        memory = torch.tensor([peak_memory_bytes(probe[0].device)], dtype=torch.float64)
        gathered = [torch.zeros_like(memory) for _ in range(world)]
        torch.distributed.all_gather(gathered, memory)
        nodes: list[str | None] = [None] * world  # where each rank ran: placement is visible in the results
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        metrics = dict(state, peak_memory_bytes_per_worker=[int(m.item()) for m in gathered], worker_nodes=nodes)
        if rank == 0:
            with torch.random.fork_rng(devices=[]):  # init draws must not shift the training RNG stream
                model = DALLE(config.dalle)
            model.load_state_dict(weights)
            extra = dict(state, zero_stage=config.train.zero_stage, precision=config.train.precision)
            save_model(model, f"{tmp}/model.pt", extra=extra)
            torch.save({"text": probe[0].cpu(), "image_codes": probe[1].cpu(), "logits": logits.float().cpu()},
                       f"{tmp}/probe.pt")
            with open(f"{tmp}/train_state.json", "w") as f:
                json.dump(state, f)
            if writer is not None:
                writer.sync()
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step_{state['step']:08d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
