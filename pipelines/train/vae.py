"""Stage one on Ray Train: the DiscreteVAE with DDP over raw shards (img2dataset layout).

Ray-side glue: decoding pictures in Ray Data, the DDP worker loop, sample grids, checkpoints and resume. The
maths (loss, temperature schedule, LR schedule, grid layout, codebook usage) lives in ``dalle_core``.

Pictures that fail to decode stay in the stream flagged ``ok=False`` so every rank keeps the same number of
batches (DDP steps in lockstep); a step replaces them with the batch's good pictures and counts them in the
``rejected`` metric, so bad input is visible and never crashes the run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from PIL import Image
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dalle_core.checkpoint import load_model, save_model
from dalle_core.train_utils import annealed_temperature, image_grid, make_optimizer, make_scheduler
from dalle_core.vae import DiscreteVAE, codebook_usage
from pipelines import storage
from pipelines.config import Config
from pipelines.data.pretokenize import load_picture
from pipelines.data.raw import SUCCESS, list_raw_shards
from pipelines.train.dalle import MetricsWriter, run_dir

SAMPLE_IMAGES = 8


def decode_batch(batch: dict[str, np.ndarray], image_size: int, channels: int) -> dict[str, np.ndarray]:
    """Raw rows -> ``pixels`` uint8 [B, S, S, C] and ``ok``; failed upstream or undecodable rows get ok=False."""
    pixels = np.zeros((len(batch["jpg"]), image_size, image_size, channels), dtype=np.uint8)
    ok = np.zeros(len(batch["jpg"]), dtype=bool)
    for i, (data, status) in enumerate(zip(batch["jpg"], batch["status"], strict=True)):
        if status == SUCCESS:
            picture, _, _ = load_picture(data, image_size, min_image_size=1, channels=channels)
            if picture is not None:
                pixels[i], ok[i] = picture, True
    return {"pixels": pixels, "ok": ok}


def build_vae_trainer(config: Config, *, raw: str, storage_path: str, run_name: str) -> TorchTrainer:
    """TorchTrainer (DDP) over the raw shards under ``raw``; same name + storage resumes."""
    tv, vae = config.train_vae, config.vae
    shards = list_raw_shards(raw)
    filesystem = storage.arrow_filesystem(shards[0])[0]
    ds = ray.data.read_parquet([storage.arrow_filesystem(s)[1] for s in shards], filesystem=filesystem)
    ds = ds.select_columns(["jpg", "status"]).map_batches(
        decode_batch, fn_kwargs={"image_size": vae.image_size, "channels": vae.channels}, batch_format="numpy")
    if tv.materialize:  # otherwise every epoch re-reads and re-decodes the pictures
        ds = ds.materialize()
    store_fs, store_path = storage.arrow_filesystem(storage_path)
    resources = {"CPU": tv.cpus_per_worker, **({"GPU": 1} if tv.use_gpu else {})}
    return TorchTrainer(
        train_vae_per_worker,
        train_loop_config={"config": config, "run_dir": run_dir(storage_path, run_name)},
        scaling_config=ScalingConfig(num_workers=tv.num_workers, use_gpu=tv.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=store_path if store_fs else os.path.abspath(store_path),
            storage_filesystem=store_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=tv.keep_checkpoints),
            failure_config=FailureConfig(max_failures=tv.max_failures),
        ),
        datasets={"train": ds},
        dataset_config=DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )


class LossParts(torch.nn.Module):
    """Routes ``compute_loss`` through ``forward`` so DDP's gradient sync sees it (DDP only hooks forward)."""

    def __init__(self, vae: DiscreteVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, temp: float) -> tuple[torch.Tensor, ...]:
        parts = self.vae.compute_loss(images, temp)
        return parts.loss, parts.recon_loss, parts.kl_div, parts.codes


def _good_rows(pixels: np.ndarray, ok: np.ndarray, device: torch.device) -> tuple[torch.Tensor, float]:
    """Images in [0, 1] with rejected rows replaced by good ones of the same batch; weight 0 if none is good."""
    images = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255.0
    good = np.flatnonzero(ok)
    if len(good) == 0:
        return images, 0.0
    return images[torch.from_numpy(good[np.arange(len(ok)) % len(good)]).to(device)], 1.0


def _save_samples(model: DiscreteVAE, images: torch.Tensor, path: str) -> None:
    """Originals over their hard-code reconstructions, as one PNG."""
    images = images[:SAMPLE_IMAGES]
    grid = image_grid([images, model.reconstruct(images)])
    buffer = io.BytesIO()
    Image.fromarray(grid if grid.shape[2] == 3 else grid[..., 0]).save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())


def train_vae_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP rank: anneal the temperature, log losses and codebook usage, sample and checkpoint."""
    config: Config = loop_config["config"]
    tv = config.train_vae
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tv.seed)
    vae = DiscreteVAE(config.vae)
    step, epoch, skip = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            vae.load_state_dict(load_model(f"{ckpt_dir}/vae.pt").state_dict())
            state = torch.load(f"{ckpt_dir}/train_state.pt", weights_only=False)
        step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
    model = ray.train.torch.prepare_model(LossParts(vae))  # DDP when world > 1; moves to the worker's device
    optimizer = make_optimizer(model, tv.optim)
    scheduler = make_scheduler(optimizer, tv.optim, tv.max_steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    torch.manual_seed(tv.seed + 1 + rank + step)  # Gumbel noise differs per rank and per resumed segment
    writer = MetricsWriter(loop_config["run_dir"]) if rank == 0 else None
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, recon, kl, rejected rows, steps
    codes_seen: list[torch.Tensor] = []
    interval_start = time.perf_counter()
    shard = ray.train.get_dataset_shard("train")
    batches_in_epoch = skip
    while step < tv.max_steps:
        consumed_any = False
        for batch in shard.iter_batches(batch_size=tv.batch_size, batch_format="numpy", drop_last=True):
            consumed_any = True
            if skip > 0:
                skip -= 1
                continue
            images, weight = _good_rows(batch["pixels"], batch["ok"], device)
            temp = annealed_temperature(step, config.vae.temperature, tv.anneal_rate, tv.temperature_min)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tv.precision == "bf16"):
                loss, recon_loss, kl_div, codes = model(images, temp)
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            if tv.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tv.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step, batches_in_epoch = step + 1, batches_in_epoch + 1
            rejected = float((~batch["ok"]).sum())
            sums += torch.tensor([loss.item(), recon_loss.item(), kl_div.item(), rejected, 1.0],
                                 dtype=torch.float64, device=device)
            if rank == 0:
                codes_seen.append(codes.cpu())
            if step % tv.log_every == 0 or step == tv.max_steps:
                if world > 1:
                    torch.distributed.all_reduce(sums)
                n = sums[4].item()
                if writer is not None:
                    usage = codebook_usage(torch.cat(codes_seen), config.vae.num_tokens)
                    record = {"step": step, "epoch": epoch, "loss": sums[0].item() / n,
                              "recon_loss": sums[1].item() / n, "kl_div": sums[2].item() / n,
                              "rejected": int(sums[3].item()), "temperature": temp,
                              "lr": scheduler.get_last_lr()[0], "codebook_perplexity": usage["perplexity"],
                              "dead_codes": usage["dead_codes"],
                              "images_per_s": n * tv.batch_size / (time.perf_counter() - interval_start)}
                    writer.write(record)
                    print(f"[train_vae] step {step}/{tv.max_steps} loss {record['loss']:.4f} temp {temp:.3f} "
                          f"perplexity {usage['perplexity']:.1f} dead {usage['dead_codes']}", flush=True)
                sums.zero_()
                codes_seen.clear()
                interval_start = time.perf_counter()
            if rank == 0 and (step % tv.sample_every == 0 or step == tv.max_steps):
                _save_samples(vae, images, f"{loop_config['run_dir']}/samples/step_{step:08d}.png")
            if step % tv.checkpoint_every == 0 or step == tv.max_steps:
                _report_checkpoint(vae, optimizer, scheduler, writer, rank, temp,
                                   {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch})
            if step >= tv.max_steps:
                break
        else:
            if not consumed_any:
                raise RuntimeError(f"rank {rank}: raw shard stream is empty; need at least batch_size="
                                   f"{tv.batch_size} pictures per worker")
            epoch, batches_in_epoch = epoch + 1, 0
            continue
        break
    if writer is not None:
        writer.close()


def _report_checkpoint(vae: DiscreteVAE, optimizer: torch.optim.Optimizer, scheduler: Any,
                       writer: MetricsWriter | None, rank: int, temp: float, state: dict[str, int]) -> None:
    """Rank 0 writes the self-describing dVAE plus the optimizer/schedule/data position; all ranks report."""
    if rank != 0:
        ray.train.report(state)
        return
    tmp = tempfile.mkdtemp(prefix="vae-ckpt-")
    try:
        save_model(vae, f"{tmp}/vae.pt", extra=dict(state, temperature=temp))
        torch.save(dict(state, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict()),
                   f"{tmp}/train_state.pt")
        with open(f"{tmp}/train_state.json", "w") as f:
            json.dump(state, f)
        if writer is not None:
            writer.sync()
        ray.train.report(state, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step_{state['step']:08d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
