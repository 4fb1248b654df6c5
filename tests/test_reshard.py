"""DALLE's DeepSpeed state across worker counts, without Ray: each world is a set of processes on one gloo group.

A ZeRO-2 run of 2 workers saves; resumed with 2 each rank reads only its own shards, and resumed with 1 and with
3 workers (an elastic resize) it goes on from its step with the same fp32 weights and Adam moments, through a
universal checkpoint rank 0 makes. ZeRO-3 builds its parameters partitioned (no rank holds the whole model) and
loads init weights one parameter at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from pipelines.config import Config
from pipelines.train.runner import CheckpointReader, Progress, WorkerContext

OVERRIDES = {
    "tokenizer.vocab_size": 64, "tokenizer.text_seq_len": 8, "vae.num_tokens": 32, "vae.image_size": 16,
    "vae.num_layers": 2, "dalle.dim": 32, "dalle.depth": 2, "dalle.heads": 2, "dalle.dim_head": 16,
    "train.batch_size": 4, "train.max_steps": 10, "train.zero_stage": 2, "train.precision": "fp32",
    "train.peak_flops_per_worker": 1.0e10, "train.zero3_persistence_threshold": 0,
}
SAVED_STEP = 3


def batch(config: Config, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, n = config.dalle, config.train.batch_size
    return {"text_ids": [rng.integers(4, d.num_text_tokens, d.text_seq_len) for _ in range(n)],
            "image_codes": rng.integers(0, d.num_image_tokens, (n, d.image_seq_len))}


def full_state(task, moments: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master weights and, after a step, its Adam moments, gathered (collective). ZeRO 1-2:
    the moments of each parameter group as one flat vector (the ranks' partitions concatenated, the padding cut
    off: DeepSpeed's per-parameter view of them is not linked for every group there)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    named = list(task.engine.module.named_parameters())
    state = {name: safe_get_full_fp32_param(param).clone() for name, param in named}
    if moments and task.train.zero_stage == 3:
        for name, param in named:
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{name}.{key}"] = safe_get_full_optimizer_state(param, key).clone()
        return state
    optimizer = task.engine.optimizer
    for i, flat in enumerate(optimizer.single_partition_of_fp32_groups if moments else ()):
        numel = sum(p.numel() for p in optimizer.bit16_groups[i])
        for key in ("exp_avg", "exp_avg_sq"):
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, optimizer.optimizer.state[flat][key])
            state[f"group{i}.{key}"] = torch.cat(parts)[:numel]
    return state


def _world(rank: int, world: int, port: int, config: Config, folder: str, resume_world: int, out: str,
           saved_step: int = SAVED_STEP) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # as Ray Train sets them
    os.environ["DS_ACCELERATOR"] = "cuda"  # leaked from a shell: the CPU worker must not take it
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from pipelines.train.dalle import DalleTask, keeps_rank_file

    torch.manual_seed(0)
    worker = WorkerContext(rank, world, torch.device("cpu"), "fp32", resume_world=resume_world, node=f"n{rank}")
    task = DalleTask(config, worker, trained_on={}, init=None)
    result: dict = {"accelerator": os.environ["DS_ACCELERATOR"]}
    if resume_world == 0:  # the run that saves
        for step in range(SAVED_STEP):
            task.train_step(batch(config, 10 * step + rank), Progress(step=step))
        task.save(folder, rank, Progress(step=SAVED_STEP), final=False)
        result["saved"] = full_state(task)
        worker = WorkerContext(rank, world, torch.device("cpu"), "fp32", resume_world=world)  # same world again
        task = DalleTask(config, worker, trained_on={}, init=None)
    reader = CheckpointReader(folder)
    task.load(reader, rank, Progress(step=saved_step, world=resume_world or world))
    result.update(loaded=full_state(task), steps=task.engine.global_steps, read=reader.bytes_read,
                  expected_read=sum(os.path.getsize(f"{folder}/{n}") for n in reader.names
                                    if n.startswith("deepspeed/state/") and keeps_rank_file(rank)(n)))
    loss, _ = task.train_step(batch(config, 99 + rank), Progress(step=saved_step))
    result["loss_after"] = float(loss["loss"])
    if resume_world == 0:  # ZeRO-3 on the same group: built partitioned, init loaded one parameter at a time
        from dalle_core.dalle import DALLE

        torch.manual_seed(1)
        init = DALLE(config.dalle).state_dict()
        zero3 = DalleTask(Config.load(None, {**OVERRIDES, "train.zero_stage": 3}),
                          WorkerContext(rank, world, worker.device, "fp32"), trained_on={}, init=init)
        params = list(zero3.engine.module.parameters())
        result["zero3_local"] = sum(p.ds_tensor.numel() for p in params)
        result["zero3_total"], result["num_params"] = sum(p.ds_numel for p in params), zero3.num_params
        gathered = full_state(zero3, moments=False)
        result["zero3_init_equal"] = all(torch.equal(gathered[k], init[k]) for k in gathered)
        zero3.train_step(batch(config, 50 + rank), Progress(step=0))  # saved for the ZeRO-3 resize below
        zero3.save(f"{folder}/zero3", rank, Progress(step=1), final=False)
        result["zero3_saved"] = full_state(zero3)
    if rank == 0:
        torch.save(result, out)
    torch.distributed.destroy_process_group()


def run_world(world: int, config: Config, folder: Path, resume_world: int, out: Path, saved_step: int = SAVED_STEP
              ) -> dict:
    mp.spawn(_world, args=(world, free_port(), config, str(folder), resume_world, str(out), saved_step), nprocs=world)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Config, Path, dict]:
    config = Config.load(None, OVERRIDES)
    folder = tmp_path_factory.mktemp("checkpoint")
    return config, folder, run_world(2, config, folder, 0, folder.parent / "saved.pt")


def _assert_same_state(loaded: dict, saved: dict) -> None:
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_same_world_reads_its_own_shards_and_zero3_is_partitioned(saved):
    _, folder, result = saved
    assert result["accelerator"] == "cpu"
    assert result["steps"] == SAVED_STEP and np.isfinite(result["loss_after"])
    _assert_same_state(result["loaded"], result["saved"])
    shards = sorted(p.name for p in (folder / "deepspeed" / "state").glob("zero_pp_rank_*"))
    assert len(shards) == 2
    assert 0 < result["read"] == result["expected_read"]  # the shared files and rank 0's shard, not rank 1's
    assert result["read"] < sum(p.stat().st_size for p in (folder / "deepspeed" / "state").iterdir())
    assert result["zero3_total"] == result["num_params"] > 0
    assert result["zero3_local"] <= result["zero3_total"] // 2 + 64  # rank 0 holds its half, not the whole model
    assert result["zero3_init_equal"]


@pytest.mark.parametrize("world", [1, 3])
def test_resume_on_another_number_of_workers_keeps_step_and_optimizer_state(saved, world, tmp_path):
    config, folder, reference = saved
    result = run_world(world, config, folder, 2, tmp_path / "resumed.pt")
    assert result["accelerator"] == "cpu"
    assert result["steps"] == SAVED_STEP and np.isfinite(result["loss_after"])
    _assert_same_state(result["loaded"], reference["saved"])
    assert (folder / "deepspeed" / "state_universal").is_dir()


def test_zero3_resumes_on_fewer_workers_with_its_optimizer_state(saved, tmp_path):
    """large.yaml's case: ZeRO-3 (each rank holds a slice of every parameter) written by 2 workers, resumed on 1
    through DeepSpeed's stage-3 universal conversion."""
    _, folder, reference = saved
    config = Config.load(None, {**OVERRIDES, "train.zero_stage": 3})
    result = run_world(1, config, folder / "zero3", 2, tmp_path / "zero3.pt", saved_step=1)
    assert result["steps"] == 1 and np.isfinite(result["loss_after"])
    _assert_same_state(result["loaded"], reference["zero3_saved"])
