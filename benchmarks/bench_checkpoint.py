"""What one DALLE checkpoint costs a run: how long every rank stalls while it is saved, the bytes each rank
writes, and the bytes publishing and a resume read, before and after issue 32, measured in the same run.

    python benchmarks/bench_checkpoint.py [--dim 2048 --depth 6] [--out benchmarks/results/bench_checkpoint_cpu.json]

Two ranks on one gloo group, ZeRO-2, without Ray (the checkpoint path is the Task's; Ray only merges the rank
folders). Sequences are short: a save's cost depends on the parameters, not the batch. bf16 where the CPU has it
natively, else fp32 (the model file is then fp32 in both).

* before: what the code did until issue 32: rank 0 gathers fp32 weights, builds a second, randomly initialised
  DALLE on the CPU, loads them into it and serialises it; publishing and every resuming rank download the whole
  checkpoint (Ray's ``as_directory``).
* after: :meth:`DalleTask.save` (the model file from the gathered weights, in the training dtype), publishing the
  model file alone (server-side on one object store: 0 bytes through the driver), a resume that reads each rank's
  own shards (:class:`CheckpointReader`).

The projection for ``configs/large.yaml`` multiplies the rates measured here (bytes/s gathered, bytes/s written,
parameters/s of random init) by large's sizes; the disk and CPU of a GPU node differ, so it shows the shape of the
change, not a prediction of seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ["DS_ACCELERATOR"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.multiprocessing as mp

from benchmarks.model_timing import machine_info, write_report
from dalle_core.checkpoint import save_model, save_weights
from dalle_core.dalle import DALLE
from pipelines.config import Config
from pipelines.train.runner import CheckpointReader, Progress, WorkerContext

LARGE = {"params": 7.40e9, "world": 64, "zero_stage": 3}
REPEATS = 2


def bench_config(dim: int, depth: int, precision: str) -> Config:
    return Config.load(None, {
        "tokenizer.vocab_size": 1024, "tokenizer.text_seq_len": 8, "vae.image_size": 32, "vae.num_layers": 3,
        "vae.num_tokens": 1024, "dalle.dim": dim, "dalle.depth": depth, "dalle.heads": dim // 64, "dalle.dim_head": 64,
        "train.batch_size": 1, "train.zero_stage": 2, "train.precision": precision,
        "train.peak_flops_per_worker": 1.0e10})


def _timed(fn, *args, **kwargs) -> float:
    torch.distributed.barrier()
    start = time.perf_counter()
    fn(*args, **kwargs)
    torch.distributed.barrier()  # every rank waits for the slowest: that is the stall
    return time.perf_counter() - start


def legacy_save(task, folder: str, rank: int, progress: Progress) -> None:
    """The save path before issue 32, on the same engine: fp32 gather, a second random model, fp32 file."""
    from pipelines.train.dalle import consolidated_state_dict

    engine = task.engine
    engine.save_checkpoint(f"{folder}/deepspeed", tag="state")
    weights = consolidated_state_dict(engine, keep=rank == 0)
    with torch.no_grad():
        logits = engine.module(*task.probe)
    memory = torch.tensor([0.0], dtype=torch.float64)
    torch.distributed.all_gather([torch.zeros_like(memory) for _ in range(task.worker.world)], memory)
    if rank == 0:
        with torch.random.fork_rng(devices=[]):
            model = DALLE(task.config.dalle)
        model.load_state_dict(weights)
        save_model(model, f"{folder}/model.safetensors", extra={"step": progress.step})
        torch.save({"logits": logits.float()}, f"{folder}/probe.pt")


def _rank(rank: int, port: int, config: Config, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from deepspeed.utils import safe_get_full_fp32_param

    from pipelines.train.dalle import DalleTask

    torch.manual_seed(0)
    worker = WorkerContext(rank, 2, torch.device("cpu"), config.train.precision, node=str(rank))
    task = DalleTask(config, worker, trained_on={}, init=None)
    d = config.dalle
    batch = {"text_ids": [list(range(4, 4 + d.text_seq_len))], "image_codes": [list(range(d.image_seq_len))]}
    task.train_step(batch, Progress())
    progress = Progress(step=1)
    report: dict = {"params": task.num_params}
    saves = {"before": lambda folder: legacy_save(task, folder, rank, progress),
             "after": lambda folder: task.save(folder, rank, progress, False)}
    for _ in range(REPEATS):  # alternated, best of each: the first save also warms the page cache
        for side, save in saves.items():
            if rank == 0:
                shutil.rmtree(f"{root}/{side}", ignore_errors=True)
            stall = _timed(save, f"{root}/{side}")
            report[f"{side}_stall_s"] = min(stall, report.get(f"{side}_stall_s", stall))
    gather = [safe_get_full_fp32_param(p) for p in task.engine.module.parameters()]  # warm
    report["gather_s"] = _timed(lambda: [safe_get_full_fp32_param(p) for p in task.engine.module.parameters()])
    if rank == 0:
        weights = {name: g for (name, _), g in zip(task.engine.module.named_parameters(), gather, strict=True)}
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            model = DALLE(config.dalle)
        report["random_init_s"] = time.perf_counter() - start
        start = time.perf_counter()
        model.load_state_dict(weights)
        save_model(model, f"{root}/model_fp32.safetensors")
        report["fp32_file_s"] = time.perf_counter() - start
        start = time.perf_counter()
        dtype = task.model_file_dtype(final=False)
        save_weights("DALLE", config.dalle, {k: v.to(dtype) for k, v in weights.items()},
                     f"{root}/model_after.safetensors")
        report["after_file_s"] = time.perf_counter() - start
    reader = CheckpointReader(f"{root}/after")
    task.load(reader, rank, progress)
    report["after_resume_read_bytes"] = reader.bytes_read
    reports = [None, None]
    torch.distributed.all_gather_object(reports, report)
    if rank == 0:
        torch.save(reports, out)
    torch.distributed.destroy_process_group()


def _folder_bytes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _written_by(files: dict[str, int], rank: int) -> int:
    """Bytes rank ``rank`` wrote: its own DeepSpeed shard files, and for rank 0 everything shared."""
    own = f"zero_pp_rank_{rank}_"
    return sum(size for name, size in files.items()
               if own in name or (rank == 0 and "zero_pp_rank_" not in name))


def project_large(measured: dict, bytes_per_param_file: dict[str, int]) -> dict:
    """Large's checkpoint from this machine's rates: the gather, the random init, the file write and the resume."""
    n, world = LARGE["params"], LARGE["world"]
    state_per_rank = 14 * n / world  # ZeRO-3 bf16: bf16 weights 2 + fp32 master 4 + Adam moments 8 bytes a param
    gather_rate = measured["gather_bytes_per_s"]
    write_rate = measured["file_bytes_per_s"]
    before = {"gather_s": 4 * n / gather_rate, "random_init_s": n / measured["init_params_per_s"],
              "file_s": 4 * n / write_rate, "model_file_bytes": 4 * n,
              "resume_read_bytes_per_rank": 14 * n + 4 * n, "publish_read_bytes": 14 * n + 4 * n}
    after = {"gather_s": 4 * n / gather_rate, "random_init_s": 0.0,  # the fp32 master is gathered, then cast
             "file_s": bytes_per_param_file["after"] * n / write_rate,
             "model_file_bytes": bytes_per_param_file["after"] * n,
             "resume_read_bytes_per_rank": state_per_rank, "publish_read_bytes": 0}
    for side in (before, after):
        side["stall_s"] = side["gather_s"] + side["random_init_s"] + side["file_s"]
    return {"assumptions": {**LARGE, "shard_bytes_per_rank": state_per_rank,
                            "rates": "this machine's gather, init and local-disk write rates; the DeepSpeed shard "
                                     "writes run in parallel on every rank and are left out of both"},
            "before": before, "after": after, "stall_ratio_after_over_before": after["stall_s"] / before["stall_s"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    config = bench_config(args.dim, args.depth, precision)
    root = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_rank, args=(port, config, str(root), str(root / "report.pt")), nprocs=2)
        ranks = torch.load(root / "report.pt", weights_only=False)
        before, after = _folder_bytes(root / "before"), _folder_bytes(root / "after")
        zero = ranks[0]
        n = zero["params"]
        file_bytes = {"before": (root / "model_fp32.safetensors").stat().st_size,
                      "after": (root / "model_after.safetensors").stat().st_size}
        measured = {"gather_bytes_per_s": 4 * n / zero["gather_s"], "init_params_per_s": n / zero["random_init_s"],
                    "file_bytes_per_s": file_bytes["before"] / zero["fp32_file_s"]}
        report = {
            "machine": machine_info(), "precision": precision, "shape": {"dim": args.dim, "depth": args.depth},
            "params": n, "world": 2, "zero_stage": 2,
            "before": {"stall_s": zero["before_stall_s"], "model_file_bytes": before["model.safetensors"],
                       "written_bytes_per_rank": [_written_by(before, r) for r in (0, 1)],
                       "resume_read_bytes_per_rank": [sum(before.values())] * 2,
                       "publish_read_bytes": sum(before.values()),
                       "model_file_s": zero["random_init_s"] + zero["fp32_file_s"]},
            "after": {"stall_s": zero["after_stall_s"], "model_file_bytes": after["model.safetensors"],
                      "written_bytes_per_rank": [_written_by(after, r) for r in (0, 1)],
                      "resume_read_bytes_per_rank": [r["after_resume_read_bytes"] for r in ranks],
                      "publish_read_bytes_local": after["model.safetensors"], "publish_read_bytes_same_store": 0,
                      "model_file_s": zero["after_file_s"]},
            "gather_s": zero["gather_s"],
            "projection_large": project_large(measured, {k: v / n for k, v in file_bytes.items()}),
        }
        report["stall_ratio_after_over_before"] = report["after"]["stall_s"] / report["before"]["stall_s"]
        write_report(report, args.out)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
