"""Stage two: the DALLE transformer under DeepSpeed ZeRO, streaming token shards, trained by the runner.

What is particular to DALLE (the loop, resume, metrics and checkpoint cadence are :mod:`pipelines.train.runner`'s):

* the DeepSpeed config built from ``TrainConfig`` (ZeRO 0-3, fp32/bf16/fp16, accumulation, clipping) with a
  torch AdamW passed in, so DeepSpeed never JIT-builds FusedAdam;
* the step, explicit: ``engine(text, codes) -> engine.backward(loss) -> engine.step()``;
* checkpoints: every rank writes its DeepSpeed shards; rank 0 adds the consolidated weights (``model.safetensors``,
  loadable by ``dalle_core.checkpoint.load_model`` without DeepSpeed, at any ZeRO stage: fp32 in the final
  checkpoint, the training dtype in the others) and a probe batch with the engine's logits so consolidation can be
  verified offline;
* resume: each rank fetches its own shards only; on another number of workers (an elastic resize) rank 0 turns the
  ZeRO shards into a DeepSpeed universal checkpoint, which every rank re-cuts for the new world.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ray.train import Result
from ray.train.torch import TorchTrainer

from dalle_core.checkpoint import save_weights
from dalle_core.dalle import DALLE
from dalle_core.train_utils import (
    DTYPES,
    collate_tokens,
    gather_floats,
    make_optimizer,
    make_scheduler,
    measure_peak_flops,
    mfu,
    peak_memory_bytes,
)
from pipelines import artifacts
from pipelines.config import Config, TrainConfig
from pipelines.data.manifest import check_manifest, read_manifest, shard_paths
from pipelines.data.shards import read_shards
from pipelines.train.finetune import trained_on
from pipelines.train.runner import (
    CheckpointReader,
    Progress,
    WorkerContext,
    build_trainer,
    fit_and_publish,
    lineage,
    require_rows,
)

TOKEN_COLUMNS = ["text_ids", "image_codes"]  # string columns (key, caption, source) never reach the workers
DS_DIR, DS_TAG, UNIVERSAL_TAG = "deepspeed", "state", "state_universal"
RANK_SHARD = "zero_pp_rank_"  # DeepSpeed's per-rank files: zero_pp_rank_{r}_mp_rank_00_{optim,model}_states.pt


def deepspeed_config(train: TrainConfig, world_size: int, precision: str, load_universal: bool = False
                     ) -> dict[str, Any]:
    """The DeepSpeed JSON for one run (``precision`` resolved). The optimizer is a client torch AdamW (hence
    ``zero_allow_untested_optimizer``); scheduler stepping and checkpointing stay with DeepSpeed. Gradients are
    reduced in fp32 whatever the compute dtype (bf16 sums over many ranks lose the small gradients);
    ``load_universal``: the checkpoint to resume is a universal one (written by another number of workers)."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = train.zero3_persistence_threshold
    extra: dict[str, Any] = {"checkpoint": {"load_universal": True}} if load_universal else {}
    if precision != "fp32":
        extra["communication_data_type"] = "fp32"
    return {**extra,
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def consolidated_state_dict(engine: Any, keep: bool = True, dtype: torch.dtype = torch.float32
                            ) -> dict[str, torch.Tensor]:
    """Full weights whatever the ZeRO stage, in ``dtype`` (cast on the device, so a bf16 copy also halves what
    crosses to the host): gathered from the fp32 master partitions (ZeRO 1-3, bf16 optimizer), else the module's own
    parameters (stage 0 fp32/fp16). Collective: every rank must call it; ranks with ``keep=False`` take part in the
    gathers but hold nothing."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters(remove_duplicate=False):
        full = safe_get_full_fp32_param(param)
        if keep:
            state[name] = (full if full is not None else param.detach()).to(dtype).cpu()
    return state


def keeps_rank_file(rank: int) -> Callable[[str], bool]:
    """Which checkpoint files ``rank`` needs to resume on the world that wrote them: the shared ones and its own
    shards, not the other ranks' (the bulk of a checkpoint: every rank's slice of the optimiser state)."""
    own = f"{RANK_SHARD}{rank}_"
    return lambda name: RANK_SHARD not in os.path.basename(name) or own in os.path.basename(name)


def to_universal(folder: str) -> str:
    """Turns the ZeRO checkpoint under ``folder`` (``DS_DIR``, every rank's shards present) into a DeepSpeed
    universal checkpoint beside it (tag ``UNIVERSAL_TAG``): per parameter, the full fp32 weights and Adam moments,
    which any number of ranks re-cut into their partitions when they load it."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    output = os.path.join(folder, UNIVERSAL_TAG)
    shutil.rmtree(output, ignore_errors=True)  # a conversion of an earlier attempt: made again, whole
    ds_to_universal.main(argparse.Namespace(
        input_folder=os.path.join(folder, DS_TAG), output_folder=output, num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True))
    return output


def load_partitioned(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads ``state`` into ``model``, one parameter at a time under ZeRO-3 (gathered, set by rank 0, partitioned
    again), so no GPU holds more than one whole parameter; a plain ``load_state_dict`` elsewhere."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        model.load_state_dict(state)
        return
    import deepspeed

    missing = sorted(set(dict(model.named_parameters())) - set(state))
    if missing:
        raise KeyError(f"init weights lack {missing[:5]}")
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                param.data.copy_(state[name])


class DalleTask:
    """DALLE on one worker: a DeepSpeed engine over the shared process group."""

    name = "train"
    log_keys = ("loss", "lr", "tokens_per_s", "mfu")

    def __init__(self, config: Config, worker: WorkerContext, trained_on: dict[str, str],
                 init: dict[str, torch.Tensor] | None) -> None:
        # The worker's own device decides, over whatever the launching shell exported (the Makefile's cpu)
        os.environ["DS_ACCELERATOR"] = "cuda" if worker.device.type == "cuda" else "cpu"
        import deepspeed  # after DS_ACCELERATOR: DeepSpeed picks its accelerator at first use

        self.config, self.train, self.worker, self.trained_on = config, config.train, worker, trained_on
        # ZeRO 1-3 and the bf16 optimiser cut the state into per-rank shards, which another world must re-cut
        self.reshard = worker.resharding and (self.train.zero_stage > 0 or worker.precision == "bf16")
        ds_config = deepspeed_config(self.train, worker.world, worker.precision, load_universal=self.reshard)
        # ZeRO-3: each parameter is partitioned as it is created (its init applied gathered, one module at a time,
        # by zero.Init's wrapped Module.apply), so no GPU ever holds the whole fp32 model
        partitioned = contextlib.nullcontext()
        if self.train.zero_stage == 3:
            deepspeed.init_distributed(dist_init_required=False)  # over the group Ray Train set up
            partitioned = deepspeed.zero.Init(config_dict_or_path=ds_config)
        with partitioned:
            model = DALLE(config.dalle)
        if init is not None:  # before the optimiser and ZeRO copy (or partition) the weights
            load_partitioned(model, init)
        model = model.to(worker.device)  # the buffers; ZeRO-3's partitions are on the device already
        self.num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.flops_per_token = model.flops_per_token()
        optimizer = make_optimizer(model, self.train.optim)
        scheduler = make_scheduler(optimizer, self.train.optim, self.train.max_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
        if self.train.compile:  # in place: parameter names, checkpoints and ZeRO's hooks stay as they are
            self.engine.compile()
        self.peak = self.train.peak_flops_per_worker or measure_peak_flops(worker.device,
                                                                           dtype=DTYPES[worker.precision])
        self.samples_per_step = self.train.batch_size * self.train.grad_accum * worker.world
        self.grad_norm: float | None = None
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None

    def describe(self) -> str:
        return f"zero={self.train.zero_stage} params={self.num_params} compiled={self.train.compile}"

    def load(self, checkpoint: CheckpointReader, rank: int, progress: Progress) -> None:
        """The same world reads its own shards; another world (``worker.resharding``) reads the universal form, which
        rank 0 makes from every rank's shards and adds to the checkpoint first."""
        tag, universal = DS_TAG, f"{DS_DIR}/{UNIVERSAL_TAG}"
        if self.reshard:
            tag = UNIVERSAL_TAG
            if rank == 0:
                to_universal(checkpoint.folder(DS_DIR, keep=lambda name: f"/{DS_TAG}/" in name))
                checkpoint.add_folder(os.path.join(checkpoint.local, universal), universal)
            torch.distributed.barrier()
            checkpoint.refresh()  # what rank 0 just added (a listing from before could hold its temporary files)
            folder = checkpoint.folder(universal)
        else:  # the world that wrote it (or ZeRO-0 in fp32/fp16, whose one state file any world reads)
            folder = checkpoint.folder(f"{DS_DIR}/{DS_TAG}", keep=keeps_rank_file(rank))
        self.engine.load_checkpoint(os.path.dirname(folder), tag=tag, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        if self.engine.global_steps != progress.step:
            raise RuntimeError(f"checkpoint says step {progress.step}, DeepSpeed state says {self.engine.global_steps}")

    def train_step(self, batch: dict[str, np.ndarray], progress: Progress) -> tuple[dict[str, torch.Tensor], bool]:
        text, codes = collate_tokens(batch["text_ids"], batch["image_codes"], self.config.dalle.text_seq_len)
        text, codes = text.to(self.worker.device), codes.to(self.worker.device)
        self.probe = (text, codes)
        null = self.engine.module.caption_dropout(text)  # eager: compiled or not, a run draws the same rows
        loss, loss_text, loss_img = self.engine(text, codes, return_loss=True, null=null)
        self.engine.backward(loss)
        next_step = progress.step + 1
        if self.engine.is_gradient_accumulation_boundary() and (next_step % self.train.log_every == 0
                                                                or next_step == self.train.max_steps):
            self.grad_norm = self._plain_grad_norm()  # before step() clears the gradients
        before = self.engine.global_steps
        self.engine.step()
        return {"loss": loss, "loss_text": loss_text, "loss_img": loss_img}, self.engine.global_steps != before

    def _plain_grad_norm(self) -> float | None:
        """Global gradient norm where DeepSpeed keeps none (ZeRO-0 with a client optimizer): there the gradients
        are whole and already averaged across ranks after backward. ZeRO 1-3 report their own norm."""
        if self.engine.zero_optimization_stage() != 0:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def after_step(self, progress: Progress) -> None:
        pass

    def interval_record(self, sums: dict[str, float], steps: int, seconds: float) -> dict[str, Any]:
        n, seq_len = sums["batches"], self.config.dalle.seq_len
        tokens_per_s = steps * self.samples_per_step * seq_len / seconds if steps else 0.0
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = grad_norm if grad_norm is not None else self.grad_norm
        return {
            "loss": sums["loss"] / n, "loss_text": sums["loss_text"] / n, "loss_img": sums["loss_img"] / n,
            "lr": self.engine.get_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_s, "samples_per_s": tokens_per_s / seq_len,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak * self.worker.world),
        }

    def save(self, folder: str, rank: int, progress: Progress, final: bool) -> dict[str, Any]:
        """All ranks: DeepSpeed shards and a probe forward; rank 0 also the consolidated weights."""
        engine, world = self.engine, self.worker.world
        engine.save_checkpoint(f"{folder}/{DS_DIR}", tag=DS_TAG)
        weights = consolidated_state_dict(engine, keep=rank == 0, dtype=self.model_file_dtype(final))
        engine.module.eval()
        # every rank forwards: under ZeRO-3 parameters are gathered collectively; eager, so that a compiled model
        # does not compile an inference graph for one probe
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            logits = engine.module(*self.probe)
        engine.module.train()
        memory = gather_floats([peak_memory_bytes(self.worker.device)], self.worker.device)
        nodes: list[str | None] = [None] * world  # where each rank ran: placement is visible in the results
        torch.distributed.all_gather_object(nodes, self.worker.node)
        if rank == 0:  # from the gathered weights: no second model is built to hold them
            extra = dict(step=progress.step, epoch=progress.epoch, zero_stage=self.train.zero_stage,
                         precision=self.worker.precision, compiled=self.engine.is_compiled, **self.trained_on)
            save_weights("DALLE", self.config.dalle, weights, f"{folder}/{artifacts.MODEL_FILE}",
                         extra=lineage(self.train, extra))
            torch.save({"text": self.probe[0].cpu(), "image_codes": self.probe[1].cpu(),
                        "logits": logits.float().cpu()}, f"{folder}/probe.pt")
        return {"peak_memory_bytes_per_worker": [int(m) for (m,) in memory], "worker_nodes": nodes}

    def model_file_dtype(self, final: bool) -> torch.dtype:
        """A checkpoint's model file holds the weights as the forward pass saw them: bf16 when training in bf16
        (the forward used exactly these, so sampling or evaluating that checkpoint loses nothing, and it is half the
        bytes to write), fp32 when training in fp32 or fp16 (fp16 weights could overflow). The final one, which is
        published, holds the fp32 master weights; a resume reads DeepSpeed's fp32 state, never this file."""
        return torch.bfloat16 if self.worker.precision == "bf16" and not final else torch.float32


def load_checked_manifest(config: Config, shards_dir: str, manifest_path: str | None = None) -> dict[str, Any]:
    """Reads the token shards' manifest and checks it against ``config.dalle`` and the size of one step
    (errors name the field). Needs no Ray, so jobs call it before ``ray.init`` and a mismatch costs no cluster
    resources."""
    manifest = read_manifest(manifest_path or shards_dir)
    check_manifest(manifest, config.dalle, vae_kind=config.vae.kind)
    require_rows(config, config.train, manifest["num_rows"])
    return manifest


def build_dalle_trainer(config: Config, manifest: dict[str, Any], *, shards_dir: str, storage_path: str,
                        run_name: str, job_start: float | None = None) -> TorchTrainer:
    """The runner's TorchTrainer over the shards a checked manifest lists."""
    dataset = read_shards(shard_paths(manifest, shards_dir)).select_columns(TOKEN_COLUMNS)
    return build_trainer(config, config.train, DalleTask, dataset=dataset, storage_path=storage_path,
                         run_name=run_name, rows=manifest["num_rows"], task_kwargs={"trained_on": trained_on(manifest)},
                         job_start=job_start or time.time())


def train_dalle(config: Config, manifest: dict[str, Any], *, shards_dir: str, storage_path: str, run_name: str,
                output: str, job_start: float | None = None) -> Result:
    """Trains (or resumes) DALLE and publishes its final weights to ``output`` (``paths.dalle``)."""
    trainer = build_dalle_trainer(config, manifest, shards_dir=shards_dir, storage_path=storage_path,
                                  run_name=run_name, job_start=job_start)
    return fit_and_publish(trainer, output)
