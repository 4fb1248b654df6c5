"""CLIP for reranking with DDP, trained by the runner: raw shards -> (BPE ids, pixels) -> contrastive steps.

Pairs are read with Ray Data from the raw shards (any source's img2dataset layout), split by a hash of their key
before any picture is decoded, then decoded and centre-cropped like pretokenize does
(:func:`pipelines.data.images.load_picture`) in parallel tasks: the training split as the workers stream it, the
held-out part (at most ``eval_max_rows``, the only pictures held in memory) up front. The held-out part never
trains and measures text->image and image->text top-1/top-5 retrieval at the end. Unusable training rows stay in
the stream flagged, take no part in the loss and are counted in the ``rejected`` metric. The final
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
from dalle_core.images import host_to_device, uint8_to_device
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


def decode_pairs(batch: pa.Table, *, tokenizer: BPETokenizer, image_size: int, channels: int,
                 eval_fraction: float, heldout: bool) -> dict[str, np.ndarray]:
    """Ray Data UDF: the raw rows of one split (``heldout`` or not, told apart by the key before any picture is
    decoded) -> keys, padded ids, uint8 pixels and ``ok``. Unusable rows (failed upstream, undecodable picture,
    empty caption) stay in, flagged ``ok=False`` with zeros, so every rank keeps the same batches and the step
    counts them in its ``rejected`` metric instead of dropping them unseen."""
    rows = batch.to_pydict()
    keys, ids, ok = [], [], []
    pixels = np.zeros((batch.num_rows, image_size, image_size, channels), dtype=np.uint8)
    for key, caption, data, status in zip(*(rows[c] for c in RAW_COLUMNS), strict=True):
        if is_heldout(str(key), eval_fraction) != heldout:
            continue
        text = tokenizer.encode([caption or ""])[0] if status in (None, SUCCESS) else []
        picture = load_picture(data, image_size, min_image_size=1, channels=channels)[0] if text else None
        good = picture is not None
        if good:
            pixels[len(keys)] = picture
        keys.append(str(key))
        ids.append(text if good else [])
        ok.append(good)
    return {"key": np.asarray(keys, dtype=object),
            "text_ids": pad_text_ids(ids, tokenizer.text_seq_len).numpy().astype(np.int32),
            "pixels": pixels[: len(keys)], "ok": np.asarray(ok, dtype=bool)}


def _split_sizes(batch: pa.Table, eval_fraction: float) -> dict[str, np.ndarray]:
    """Rows of each split in one batch of keys: the training row count without reading a picture."""
    held = sum(is_heldout(str(key), eval_fraction) for key in batch.column("key").to_pylist())
    return {"train": np.asarray([batch.num_rows - held])}


def _to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and pixels on ``device``, moved as int32/uint8 and widened there."""
    return host_to_device(batch["text_ids"], device).long(), uint8_to_device(batch["pixels"], device)


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
        device = self.worker.device
        ok = np.asarray(batch["ok"], dtype=bool)
        with self.worker.autocast():
            loss = self.ddp(*_to_tensors(batch, device), return_loss=True, valid=host_to_device(ok, device))
        self.optimizer_step(loss)
        return {"loss": loss, "rejected": torch.full((), float((~ok).sum()), device=device)}, True

    def interval_record(self, sums: dict[str, float], steps: int, seconds: float) -> dict[str, Any]:
        n = sums["batches"]
        return {"loss": sums["loss"] / n, "rejected": int(sums["rejected"]), "lr": self.scheduler.get_last_lr()[0],
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


def load_pairs(config: Config, raw: str, tokenizer: BPETokenizer
               ) -> tuple[ray.data.Dataset, dict[str, np.ndarray], dict[str, int]]:
    """The training stream, the held-out pairs and the split's counts.

    Nothing of the training split is decoded here: its stream decodes in parallel tasks as the workers read it,
    and its row count comes from the keys alone. The held-out pairs are the only pictures decoded up front (and
    held in memory): at most ``eval_max_rows`` good ones, read in a stable order; the held-out rows seen that
    were unusable are counted in ``heldout_rejected``."""
    tc = config.train_clip
    shards = list_raw_shards(raw)
    decode = {"tokenizer": tokenizer, "image_size": config.clip.image_size, "channels": config.clip.channels,
              "eval_fraction": tc.eval_fraction}
    sizes = read_shards(shards, columns=["key"]).map_batches(
        _split_sizes, fn_kwargs={"eval_fraction": tc.eval_fraction}, batch_format="pyarrow")
    train_rows = sum(int(batch["train"].sum()) for batch in sizes.iter_batches(batch_size=None))

    heldout = read_shards(shards, columns=RAW_COLUMNS)
    heldout.context.execution_options.preserve_order = True  # the same eval pairs on every rerun
    parts, good, rejected = [], 0, 0
    for batch in heldout.map_batches(decode_pairs, fn_kwargs={**decode, "heldout": True},
                                     batch_format="pyarrow").iter_batches(batch_size=None, batch_format="numpy"):
        keep = np.flatnonzero(batch["ok"])[: tc.eval_max_rows - good]
        rejected += int((~batch["ok"]).sum())
        parts.append({k: batch[k][keep] for k in ("key", "text_ids", "pixels")})
        good += len(keep)
        if good >= tc.eval_max_rows:  # leaving the loop stops the stream: no more pictures decoded
            break
    if good < 2:
        raise InputError(f"train_clip.eval_fraction={tc.eval_fraction} leaves fewer than 2 held-out pairs in {raw}")
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    train = read_shards(shards, columns=RAW_COLUMNS).map_batches(
        decode_pairs, fn_kwargs={**decode, "heldout": False}, batch_format="pyarrow")
    return train, rows, {"train_pairs": train_rows, "heldout_pairs": good, "heldout_rejected": rejected}


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
    train, heldout, counts = load_pairs(config, raw, tokenizer)
    trainer = build_trainer(config, config.train_clip, CLIPTask, dataset=train, storage_path=storage_path,
                            run_name=run_name, rows=counts["train_pairs"], task_kwargs={"heldout": heldout})
    result = fit_and_publish(trainer, output)
    metrics = read_checkpoint_json(result, RETRIEVAL_FILE)
    metrics.update(checkpoint=output, run_dir=artifacts.run_dir(storage_path, run_name), **counts)
    storage.write_json(metrics_path(output), metrics)
    return metrics
