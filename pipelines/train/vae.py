"""Stage one: the DiscreteVAE with DDP over raw shards (img2dataset layout), trained by the runner.

What is particular to the dVAE: decoding pictures in Ray Data, the annealed Gumbel temperature, a last phase of
``decoder_finetune_steps`` that trains the decoder on the frozen encoder's argmax codes, codebook usage in the
metrics and reconstruction grids every ``sample_every`` steps. Pictures that fail to decode stay in the
stream flagged ``ok=False`` so every rank keeps the same number of batches (DDP steps in lockstep); a step
replaces them with the batch's good pictures and counts them in the ``rejected`` metric, so bad input is visible
and never crashes the run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.train import Result

from dalle_core.checkpoint import load_model
from dalle_core.images import make_grid, png_bytes, to_uint8, uint8_to_device
from dalle_core.train_utils import annealed_temperature
from dalle_core.vae import DiscreteVAE, histogram_usage
from pipelines import artifacts, storage
from pipelines.config import Config
from pipelines.data.checker import dvae_reconstruction, has_ground_truth
from pipelines.data.images import load_picture
from pipelines.data.raw import SUCCESS, list_raw_shards
from pipelines.data.shards import read_shards
from pipelines.train.runner import DDPTask, Progress, WorkerContext, build_trainer, fit_and_publish

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


class LossParts(torch.nn.Module):
    """Routes ``compute_loss`` through ``forward`` so DDP's gradient sync sees it (DDP only hooks forward)."""

    def __init__(self, vae: DiscreteVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, temp: float, argmax_codes: bool) -> tuple[torch.Tensor, ...]:
        parts = self.vae.compute_loss(images, temp, argmax_codes)
        return parts.loss, parts.recon_loss, parts.kl_div, parts.codes


def _good_rows(pixels: np.ndarray, ok: np.ndarray, device: torch.device) -> tuple[torch.Tensor, float]:
    """Images in [0, 1] on ``device`` with rejected rows replaced by good ones of the same batch (picked on the
    host, in uint8); weight 0 if none is good."""
    good = np.flatnonzero(ok)
    if len(good) == 0:
        return uint8_to_device(pixels, device), 0.0
    return uint8_to_device(pixels[good[np.arange(len(ok)) % len(good)]], device), 1.0


class VAETask(DDPTask):
    """The dVAE on one DDP rank."""

    name = "train_vae"
    log_keys = ("loss", "temperature", "codebook_perplexity", "dead_codes")

    def __init__(self, config: Config, worker: WorkerContext, run_dir: str, init: dict[str, torch.Tensor] | None
                 ) -> None:
        self.vae = DiscreteVAE(config.vae)
        super().__init__(self.vae, LossParts(self.vae), config.train_vae, worker, init,
                         find_unused_parameters=config.train_vae.decoder_finetune_steps > 0)  # the frozen encoder
        self.config, self.run_dir = config, run_dir
        # rank 0's codes of the log interval, counted on the device: read on the host once per interval
        self.code_counts = torch.zeros(config.vae.num_tokens, dtype=torch.long, device=worker.device)
        self.images: torch.Tensor | None = None
        self.temperature = config.vae.temperature

    def train_step(self, batch: dict[str, np.ndarray], progress: Progress) -> tuple[dict[str, torch.Tensor], bool]:
        self.images, weight = _good_rows(batch["pixels"], batch["ok"], self.worker.device)
        self.temperature = annealed_temperature(progress.step, self.config.vae.temperature, self.section.anneal_rate,
                                                self.section.temperature_min)
        argmax_codes = progress.step >= self.section.max_steps - self.section.decoder_finetune_steps
        with self.worker.autocast():
            loss, recon_loss, kl_div, codes = self.ddp(self.images, self.temperature, argmax_codes)
        self.optimizer_step(loss * weight)
        if self.worker.rank == 0:  # index_add_, not bincount: bincount reads the codes' max on the host
            codes = codes.flatten()
            self.code_counts.index_add_(0, codes, torch.ones_like(codes))
        rejected = torch.full((), float((~batch["ok"]).sum()), device=self.worker.device)  # a fill, not a copy
        return {"loss": loss, "recon_loss": recon_loss, "kl_div": kl_div, "rejected": rejected}, True

    def after_step(self, progress: Progress) -> None:
        if self.worker.rank == 0 and (progress.step % self.section.sample_every == 0
                                      or progress.step == self.section.max_steps):
            originals = self.images[:SAMPLE_IMAGES]
            rows = [list(to_uint8(originals)), list(to_uint8(self.vae.reconstruct(originals)))]
            storage.write_bytes(f"{self.run_dir}/samples/step_{progress.step:08d}.png",
                                png_bytes(make_grid(rows, pad=0)))

    def interval_record(self, sums: dict[str, float], steps: int, seconds: float) -> dict[str, Any]:
        n = sums["batches"]
        record = {"loss": sums["loss"] / n, "recon_loss": sums["recon_loss"] / n, "kl_div": sums["kl_div"] / n,
                  "rejected": int(sums["rejected"]), "temperature": self.temperature,
                  "lr": self.scheduler.get_last_lr()[0], "images_per_s": n * self.section.batch_size / seconds}
        if self.worker.rank == 0:  # rank 0 counts the interval's codes
            usage = histogram_usage(self.code_counts)
            record.update(codebook_perplexity=usage["perplexity"], dead_codes=usage["dead_codes"])
            self.code_counts.zero_()
        return record

    def save(self, folder: str, rank: int, progress: Progress, final: bool) -> dict[str, Any]:
        if rank == 0:
            self.save_state(folder, {"step": progress.step, "epoch": progress.epoch, "temperature": self.temperature})
        return {}


def train_vae(config: Config, *, raw: str, storage_path: str, run_name: str, output: str) -> tuple[Result, dict]:
    """Trains (or resumes) the dVAE on the raw shards under ``raw`` and publishes it to ``output``
    (``paths.vae``). On the synthetic set also scores what its codes keep (``reconstruction.json`` in the run
    folder); returns the result and that score (empty on other data)."""
    vae = config.vae
    shards = list_raw_shards(raw)
    dataset = read_shards(shards, columns=["jpg", "status"]).map_batches(
        decode_batch, fn_kwargs={"image_size": vae.image_size, "channels": vae.channels}, batch_format="numpy")
    where = artifacts.run_dir(storage_path, run_name)
    rows = read_shards(shards, columns=["status"]).count()  # from the Parquet footers; rejects come off later
    trainer = build_trainer(config, config.train_vae, VAETask, dataset=dataset, storage_path=storage_path,
                            run_name=run_name, rows=rows, task_kwargs={"run_dir": where})
    result = fit_and_publish(trainer, output)
    reconstruction: dict = {}
    if has_ground_truth(shards[0]):  # the synthetic set: score what the codes keep
        reconstruction = dvae_reconstruction(load_model(output), config.synthetic)
        storage.write_json(f"{where}/reconstruction.json", reconstruction)
    return result, reconstruction
