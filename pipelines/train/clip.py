"""CLIP for reranking with DDP, trained by the runner: raw shards -> (BPE ids, pixels) -> contrastive steps.

Pairs are read with Ray Data from the raw shards (any source's img2dataset layout), decoded and centre-cropped
like pretokenize does (:func:`pipelines.data.images.load_picture`), and split by a hash of their key: the
held-out part never trains and measures text->image and image->text top-1/top-5 retrieval at the end. The final
checkpoint holds the weights (``model.safetensors``) and ``retrieval.json``; the driver publishes the model to
``paths.clip`` and the metrics to ``<clip stem>_metrics.json`` beside it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from dalle_core.clip import CLIP
from dalle_core.images import from_uint8
from dalle_core.metrics import chance_accuracy, encode_pairs, retrieval_accuracy
from dalle_core.tokenizer import BPETokenizer, pad_text_ids
from pipelines import artifacts, storage
from pipelines.config import Config, InputError
from pipelines.data.images import load_picture
from pipelines.data.raw import SUCCESS, list_raw_shards
from pipelines.data.shards import read_shards
from pipelines.train.runner import (
    DDPTask,
    Progress,
    WorkerContext,
    build_trainer,
    fit_and_publish,
    read_checkpoint_json,
)

RAW_COLUMNS = ["key", "caption", "jpg", "status"]
RETRIEVAL_FILE = "retrieval.json"


def is_heldout(key: str, fraction: float) -> bool:
    """Stable split by key, the same on every rerun and every machine."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") / 2**32 < fraction


class PairDecoder:
    """Ray Data UDF: raw rows -> padded ids, uint8 pixels and the split; unusable rows are counted, not kept."""

    def __init__(self, tokenizer: BPETokenizer, image_size: int, channels: int, eval_fraction: float) -> None:
        self.tokenizer, self.size, self.channels, self.fraction = tokenizer, image_size, channels, eval_fraction

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = batch.to_pydict()
        ids, pixels, heldout, reasons = [], [], [], []
        for key, caption, data, status in zip(*(rows[c] for c in RAW_COLUMNS), strict=True):
            if status not in (None, SUCCESS):
                reasons.append(status)
                continue
            picture, reason, _ = load_picture(data, self.size, min_image_size=1, channels=self.channels)
            text = self.tokenizer.encode([caption or ""])[0]
            if picture is None or not text:
                reasons.append(reason or "empty_caption")
                continue
            ids.append(text)
            pixels.append(picture)
            heldout.append(is_heldout(str(key), self.fraction))
        shape = (self.size, self.size, self.channels)
        return {"text_ids": pad_text_ids(ids, self.tokenizer.text_seq_len).numpy().astype(np.int32),
                "pixels": np.stack(pixels) if ids else np.zeros((0, *shape), np.uint8),
                "heldout": np.asarray(heldout, dtype=bool)}


def _to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.tensor(batch["text_ids"], dtype=torch.long, device=device)
    return text, from_uint8(np.asarray(batch["pixels"])).to(device)


class CLIPTask(DDPTask):
    """CLIP on one DDP rank; rank 0 measures retrieval on the held-out pairs at the last step."""

    name = "train_clip"
    log_keys = ("loss", "lr", "pairs_per_s")

    def __init__(self, config: Config, worker: WorkerContext, heldout: dict[str, np.ndarray],
                 init: dict[str, torch.Tensor] | None) -> None:
        model = CLIP(config.clip)
        super().__init__(model, model, config.train_clip, worker, init)
        self.heldout = heldout

    def train_step(self, batch: dict[str, np.ndarray], progress: Progress) -> tuple[dict[str, torch.Tensor], bool]:
        with self.worker.autocast():
            loss = self.ddp(*_to_tensors(batch, self.worker.device), return_loss=True)
        self.optimizer_step(loss)
        return {"loss": loss}, True

    def interval_record(self, sums: dict[str, float], steps: int, seconds: float) -> dict[str, Any]:
        n = sums["batches"]
        return {"loss": sums["loss"] / n, "lr": self.scheduler.get_last_lr()[0],
                "pairs_per_s": n * self.section.batch_size / seconds}

    def save(self, folder: str, rank: int, progress: Progress, final: bool) -> dict[str, Any]:
        if rank != 0:
            return {}
        extra: dict[str, Any] = {"step": progress.step}
        if final:
            text, images = _to_tensors(self.heldout, self.worker.device)
            retrieval = retrieval_accuracy(*encode_pairs(self.module, text, images))
            n = int(retrieval["num_pairs"])
            retrieval.update(chance_top1=chance_accuracy(n, 1), chance_top5=chance_accuracy(n, 5))
            extra["retrieval"] = retrieval
            with open(f"{folder}/{RETRIEVAL_FILE}", "w") as f:
                json.dump({"step": progress.step, "epochs": progress.epoch, "retrieval": retrieval}, f, indent=2)
        self.save_state(folder, extra)
        return {}


def load_pairs(config: Config, raw: str, tokenizer: BPETokenizer) -> tuple[ray.data.Dataset, dict[str, np.ndarray]]:
    """The training dataset and the held-out pairs (materialised, at most ``eval_max_rows``)."""
    tc = config.train_clip
    ds = read_shards(list_raw_shards(raw), columns=RAW_COLUMNS)
    ds = ds.map_batches(PairDecoder, fn_constructor_kwargs={
        "tokenizer": tokenizer, "image_size": config.clip.image_size, "channels": config.clip.channels,
        "eval_fraction": tc.eval_fraction}, batch_format="pyarrow", concurrency=1).materialize()
    heldout = ds.filter(lambda row: bool(row["heldout"]))
    rows = heldout.take_batch(tc.eval_max_rows, batch_format="numpy") if heldout.count() else None
    if rows is None or len(rows["text_ids"]) < 2:
        raise InputError(f"train_clip.eval_fraction={tc.eval_fraction} leaves fewer than 2 held-out pairs in {raw}")
    train = ds.filter(lambda row: not row["heldout"]).drop_columns(["heldout"])
    return train, {"text_ids": rows["text_ids"], "pixels": rows["pixels"]}


def metrics_path(clip_path: str) -> str:
    """``.../clip.safetensors`` (or ``.pt``) -> ``.../clip_metrics.json``."""
    for suffix in (".safetensors", ".pt"):
        if clip_path.endswith(suffix):
            return f"{clip_path[: -len(suffix)]}_metrics.json"
    return f"{clip_path}_metrics.json"


def train_clip(config: Config, *, raw: str, tokenizer_path: str, storage_path: str, run_name: str,
               output: str) -> dict[str, Any]:
    """Trains (or resumes) CLIP, publishes it to ``output`` (``paths.clip``) and its retrieval metrics to
    ``<output stem>_metrics.json``; returns those metrics."""
    tokenizer = BPETokenizer.load(tokenizer_path, config.tokenizer.text_seq_len)
    if tokenizer.vocab_size > config.clip.num_text_tokens:
        raise InputError(f"tokenizer vocab_size={tokenizer.vocab_size} > clip.num_text_tokens="
                         f"{config.clip.num_text_tokens}")
    train, heldout = load_pairs(config, raw, tokenizer)
    train_pairs = train.count()
    trainer = build_trainer(config, config.train_clip, CLIPTask, dataset=train, storage_path=storage_path,
                            run_name=run_name, rows=train_pairs, task_kwargs={"heldout": heldout})
    result = fit_and_publish(trainer, output)
    metrics = read_checkpoint_json(result, RETRIEVAL_FILE)
    metrics.update(checkpoint=output, run_dir=artifacts.run_dir(storage_path, run_name),
                   train_pairs=train_pairs, heldout_pairs=len(heldout["text_ids"]))
    storage.write_json(metrics_path(output), metrics)
    return metrics
