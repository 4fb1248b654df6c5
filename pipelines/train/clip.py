"""CLIP for reranking on Ray Train (DDP): raw shards -> (BPE ids, pixels) -> contrastive training -> retrieval.

Pairs are read with Ray Data from the raw shards (any source's img2dataset layout), decoded and centre-cropped
like pretokenize does (:func:`pipelines.data.pretokenize.load_picture`), and split by a hash of their key: the
held-out part never trains and measures text->image and image->text top-1/top-5 retrieval at the end. Rank 0
saves the weights with ``save_model`` (self-describing) plus ``retrieval.json`` into the Ray Train checkpoint;
the driver copies both to ``paths.clip`` and ``<clip stem>_metrics.json`` beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dalle_core.checkpoint import read_bytes, write_bytes
from dalle_core.tokenizer import BPETokenizer
from pipelines import storage
from pipelines.config import Config
from pipelines.data.pretokenize import load_picture
from pipelines.data.raw import SUCCESS, list_raw_shards

RAW_COLUMNS = ["key", "caption", "jpg", "status"]


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
        n, seq = len(ids), self.tokenizer.text_seq_len
        padded = np.zeros((n, seq), dtype=np.int32)
        for i, row in enumerate(ids):
            padded[i, : len(row)] = row
        shape = (self.size, self.size, self.channels)
        return {"text_ids": padded, "pixels": np.stack(pixels) if n else np.zeros((0, *shape), np.uint8),
                "heldout": np.asarray(heldout, dtype=bool)}


def _to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.as_tensor(np.asarray(batch["text_ids"]), dtype=torch.long, device=device)
    pixels = torch.as_tensor(np.asarray(batch["pixels"]), device=device)
    return text, pixels.permute(0, 3, 1, 2).float() / 255


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP worker: contrastive steps on its shard; rank 0 measures retrieval and saves the checkpoint."""
    from dalle_core.checkpoint import save_model
    from dalle_core.clip import CLIP
    from dalle_core.metrics import chance_accuracy, encode_pairs, retrieval_accuracy
    from dalle_core.train_utils import make_optimizer, make_scheduler

    config: Config = loop_config["config"]
    tc = config.train_clip
    torch.manual_seed(tc.seed)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")
    model = CLIP(config.clip)
    optimizer = make_optimizer(model, tc.optim)
    scheduler = make_scheduler(optimizer, tc.optim, tc.max_steps)
    ddp = ray.train.torch.prepare_model(model)
    shard = ray.train.get_dataset_shard("train")
    step, epoch, history = 0, 0, []
    while step < tc.max_steps:
        seen = 0
        for batch in shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=4 * tc.batch_size, local_shuffle_seed=epoch):
            seen += 1
            loss = ddp(*_to_tensors(batch, device), return_loss=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), tc.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % tc.log_every == 0 or step == tc.max_steps:
                history.append({"step": step, "loss": float(loss.item()), "lr": scheduler.get_last_lr()[0]})
                if rank == 0:
                    print(f"[train_clip] step {step}/{tc.max_steps} loss {loss.item():.4f}", flush=True)
            if step >= tc.max_steps:
                break
        if seen == 0:
            raise RuntimeError(f"rank {rank}: no training batch; need >= batch_size={tc.batch_size} pairs per worker")
        epoch += 1

    metrics: dict[str, Any] = {"step": step, "epochs": epoch, "final_loss": history[-1]["loss"]}
    tmp = tempfile.mkdtemp(prefix="clip-ckpt-")
    try:
        if rank == 0:
            text, images = _to_tensors(loop_config["eval"], device)
            retrieval = retrieval_accuracy(*encode_pairs(model, text, images))
            n = int(retrieval["num_pairs"])
            retrieval.update(chance_top1=chance_accuracy(n, 1), chance_top5=chance_accuracy(n, 5))
            metrics.update(retrieval=retrieval, history=history)
            save_model(model, f"{tmp}/model.pt", extra={"step": step, "retrieval": retrieval})
            with open(f"{tmp}/retrieval.json", "w") as f:
                json.dump(metrics, f, indent=2)
        ray.train.report({k: v for k, v in metrics.items() if k != "history"},
                         checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_pairs(config: Config, raw: str, tokenizer: BPETokenizer) -> tuple[ray.data.Dataset, dict[str, np.ndarray]]:
    """The training dataset (streamed) and the held-out pairs (materialised, at most ``eval_max_rows``)."""
    tc = config.train_clip
    shards = list_raw_shards(raw)
    fs = storage.arrow_filesystem(shards[0])[0]
    ds = ray.data.read_parquet([storage.arrow_filesystem(p)[1] for p in shards], columns=RAW_COLUMNS, filesystem=fs)
    ds = ds.map_batches(PairDecoder, fn_constructor_kwargs={
        "tokenizer": tokenizer, "image_size": config.clip.image_size, "channels": config.clip.channels,
        "eval_fraction": tc.eval_fraction}, batch_format="pyarrow", concurrency=1).materialize()
    heldout = ds.filter(lambda row: bool(row["heldout"]))
    rows = heldout.take_batch(tc.eval_max_rows, batch_format="numpy") if heldout.count() else None
    if rows is None or len(rows["text_ids"]) < 2:
        raise ValueError(f"train_clip.eval_fraction={tc.eval_fraction} leaves fewer than 2 held-out pairs in {raw}")
    train = ds.filter(lambda row: not row["heldout"]).drop_columns(["heldout"])
    return train, {"text_ids": rows["text_ids"], "pixels": rows["pixels"]}


def run_train_clip(config: Config, raw: str, tokenizer_path: str, output: str, storage_path: str) -> dict[str, Any]:
    """Trains, then copies the model to ``output`` and its metrics to ``<output stem>_metrics.json``."""
    tc = config.train_clip
    tokenizer = BPETokenizer.load(tokenizer_path, config.tokenizer.text_seq_len)
    if tokenizer.vocab_size > config.clip.num_text_tokens:
        raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} > clip.num_text_tokens="
                         f"{config.clip.num_text_tokens}")
    train, heldout = load_pairs(config, raw, tokenizer)
    fs, bare = storage.arrow_filesystem(storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "eval": heldout},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=tc.run_name, storage_path=os.path.abspath(bare) if fs is None else bare,
                             storage_filesystem=fs, failure_config=FailureConfig(max_failures=tc.max_failures)),
        datasets={"train": train},
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        write_bytes(output, read_bytes(f"{ckpt}/model.pt"))
        metrics = json.loads(read_bytes(f"{ckpt}/retrieval.json"))
    metrics.update(checkpoint=output, ray_checkpoint=result.checkpoint.path,
                   train_pairs=train.count(), heldout_pairs=len(heldout["text_ids"]))
    write_bytes(metrics_path(output), json.dumps(metrics, indent=2).encode())
    return metrics


def metrics_path(clip_path: str) -> str:
    """``.../clip.pt`` -> ``.../clip_metrics.json``."""
    stem = clip_path[: -len(".pt")] if clip_path.endswith(".pt") else clip_path
    return f"{stem}_metrics.json"
