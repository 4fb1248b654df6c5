"""Stage two on Ray Train + DeepSpeed (CPU, gloo): ZeRO-2/3, consolidation, resume, placement, job submit.

One module-scoped local Ray cluster serves the runs; the two-node test starts its own cluster last. Shards are
written directly here in the token-shard schema so the tests do not depend on the pretokenize job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import sigkill_paused_worker, start_ray_with_state_api
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.train import Checkpoint
from ray.train.v2.api.exceptions import TrainingFailedError

from dalle_core.checkpoint import load_model_with_extra
from dalle_core.config import to_dict
from dalle_core.dalle import DALLE
from dalle_core.images import make_grid
from dalle_core.io import copy_file
from dalle_core.train_utils import (
    annealed_temperature,
    collate_tokens,
    lr_multiplier,
    mfu,
    peak_memory_bytes,
    precision_choice,
)
from pipelines import artifacts, storage
from pipelines.config import Config
from pipelines.data.manifest import SCHEMA_VERSION, token_schema
from pipelines.train.dalle import build_dalle_trainer, deepspeed_config, keeps_rank_file, load_checked_manifest
from pipelines.train.runner import PAUSE_ENV, fit_and_publish, rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_SHARD = 48  # 96 rows / 2 workers / batch 8 = 6 batches per epoch: 12 steps cross an epoch boundary
OVERRIDES = {
    "tokenizer.vocab_size": 64, "tokenizer.text_seq_len": 8,
    "vae.image_size": 16, "vae.num_layers": 2, "vae.num_tokens": 32,
    "dalle.dim": 32, "dalle.depth": 2, "dalle.heads": 2, "dalle.dim_head": 16, "dalle.null_cond_prob": 0.1,
    "train.num_workers": 2, "train.cpus_per_worker": 1, "train.batch_size": 8, "train.max_steps": 12,
    "train.checkpoint_every": 4, "train.keep_checkpoints": 2, "train.log_every": 1, "train.shuffle_buffer": 16,
    "train.zero3_persistence_threshold": 0, "train.peak_flops_per_worker": 1.0e10,
    "train.optim.lr": 3.0e-3, "train.optim.warmup_steps": 2, "train.max_failures": 0,
    # fp32 on every machine: these tests compare weights and logits to 1e-5 (auto would be bf16 where native)
    "train.precision": "fp32",
}


def tiny_config(**overrides: object) -> Config:
    return Config.load(None, {**OVERRIDES, **overrides})


def write_token_shards(folder: Path, config: Config, num_shards: int = 2) -> None:
    """Shards in the pretokenize schema plus a manifest. Codes are a function of the caption, so the
    image loss has something to learn."""
    d = config.dalle
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(num_shards):
        text = [rng.integers(4, d.num_text_tokens, size=rng.integers(2, d.text_seq_len + 4)).astype(np.int32)
                for _ in range(ROWS_PER_SHARD)]  # some longer than text_seq_len: the collate truncates
        codes = np.stack([(np.arange(d.image_seq_len) * (t[0] % 3 + 1) + t[0]) % d.num_image_tokens for t in text])
        table = pa.table({
            "key": [f"{s:03d}-{i:04d}" for i in range(ROWS_PER_SHARD)],
            "caption": ["a caption"] * ROWS_PER_SHARD,
            "text_ids": [t.tolist() for t in text],
            "image_codes": [c.tolist() for c in codes],
            "source": ["test"] * ROWS_PER_SHARD,
        }, schema=token_schema(d.image_seq_len))
        name = f"shard-{s:05d}.parquet"
        pq.write_table(table, folder / name)
        shards.append({"path": name, "rows": ROWS_PER_SHARD})
    manifest = {
        "schema_version": SCHEMA_VERSION, "num_rows": ROWS_PER_SHARD * num_shards,
        "image_seq_len": d.image_seq_len, "text_seq_len": d.text_seq_len, "codebook_size": d.num_image_tokens,
        "tokenizer": {"vocab_size": config.tokenizer.vocab_size, "model_hash": "0" * 64},
        "vae": {"num_tokens": d.num_image_tokens, "checkpoint_hash": "0" * 64},
        "shards": shards, "rejects": {"total": 0, "by_reason": {}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def fit(config: Config, shards: Path, runs: Path | str, name: str):
    manifest = load_checked_manifest(config, str(shards))
    return build_dalle_trainer(config, manifest, shards_dir=str(shards), storage_path=str(runs),
                               run_name=name).fit()


def check_run_outputs(run: Path, config: Config, workers: int) -> dict[str, torch.Tensor]:
    """Loss fell, K checkpoints kept with every rank's DeepSpeed shards, and the consolidated weights load into
    a plain DALLE that reproduces the engine's logits on the probe batch."""
    metrics = read_metrics(run)
    losses = [m["loss"] for m in metrics]
    assert np.mean(losses[-3:]) < losses[0] - 0.1, losses
    for key in ("loss_text", "loss_img", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu"):
        assert all(np.isfinite(m[key]) for m in metrics), key
    assert all(m["mfu"] > 0 for m in metrics if m["step"] > m["start_step"] + 1)  # first step is start-up
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    checkpoints = sorted(run.glob("checkpoint_step_*"))
    assert [c.name for c in checkpoints] == ["checkpoint_step_00000008", "checkpoint_step_00000012"]
    last = checkpoints[-1]
    files = {p.name for p in (last / "deepspeed" / "state").iterdir()}
    owners = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(workers)}
    assert owners <= files, files  # each rank's shard made it into the merged checkpoint folder
    model, extra = load_model_with_extra(str(last / "model.safetensors"))
    assert isinstance(model, DALLE) and extra["step"] == 12 and extra["zero_stage"] == config.train.zero_stage
    probe = torch.load(last / "probe.pt")
    with torch.no_grad():
        logits = model(probe["text"], probe["image_codes"])
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)
    return model.state_dict()


@pytest.fixture(scope="module")
def cluster(s3_server):
    """The module's Ray, started after the loopback S3 settings so that its workers inherit them."""
    # the dashboard serves the state API, through which the kill tests find the workers
    start_ray_with_state_api(runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_token_shards(folder, tiny_config())
    return folder


@pytest.fixture(scope="module")
def reference(cluster, shards, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The uninterrupted ZeRO-2 run the resume tests compare against."""
    runs = tmp_path_factory.mktemp("runs")
    config = tiny_config(**{"train.zero_stage": 2})
    result = fit(config, shards, runs, "reference")
    assert result.metrics["step"] == 12
    return runs / "reference", check_run_outputs(runs / "reference", config, workers=2)


def test_lr_schedule_collate_grid_and_mfu():
    mult = [lr_multiplier(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(24)]
    assert mult[:4] == [0.25, 0.5, 0.75, 1.0] and mult[4] == 1.0
    assert all(a >= b for a, b in zip(mult[4:], mult[5:], strict=False)) and mult[20:] == [pytest.approx(0.1)] * 4
    text, codes = collate_tokens([[5, 6, 7], [9] * 12], np.array([[1, 2], [3, 4]], dtype=np.uint16), 8)
    assert text.tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [9] * 8] and codes.dtype == torch.long
    grid = make_grid([[np.zeros((4, 5, 3), np.uint8)] * 3, [np.full((4, 5, 3), 255, np.uint8)] * 3], pad=0)
    assert grid.shape == (8, 15, 3) and grid[:4].max() == 0 and grid[4:].min() == 255
    assert mfu(1000.0, 6.0e6, 1.2e10) == pytest.approx(0.5)
    assert annealed_temperature(0, 1.0, 0.1, 0.5) == 1.0 and annealed_temperature(100, 1.0, 0.1, 0.5) == 0.5


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_follows_native_bf16_and_explicit_bf16_warns(native, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    chosen, why = precision_choice("auto")
    assert chosen == ("bf16" if native else "fp32") and why.startswith("auto:") and ("no native" in why) != native
    chosen, why = precision_choice("bf16")
    assert chosen == "bf16" and ("WARNING" in why) != native
    assert precision_choice("fp32") == ("fp32", "set in the config")


def test_peak_memory_of_a_fresh_process_is_its_own():
    """A probe or worker process started from a big parent reports its own peak, not the parent's (ru_maxrss
    survives exec; the memory benchmark once read its 3 GB parent's figure in both of its probes)."""
    ballast = np.ones(1024**3, dtype=np.uint8)  # 1 GiB touched: this process's peak is at least that
    code = "from dalle_core.train_utils import peak_memory_bytes; print(peak_memory_bytes())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[1])
    assert peak_memory_bytes() >= ballast.nbytes > int(child.stdout) > 0


def test_rng_state_saves_and_restores_the_device_generator_too(monkeypatch):
    """Caption dropout and the dVAE's Gumbel noise draw on the worker's device: an exact resume on a GPU needs its
    generator's state beside the CPU's (the CUDA module is faked here; its API is the one torch gives every
    accelerator). A checkpoint from before (a bare CPU state) still restores."""
    class FakeCuda:
        state = torch.tensor([1, 2, 3], dtype=torch.uint8)

        def get_rng_state(self, device):
            return self.state.clone()

        def set_rng_state(self, state, device):
            self.state = state.clone()

    fake = FakeCuda()
    monkeypatch.setattr(torch, "get_device_module", lambda kind: fake if kind == "cuda" else pytest.fail(kind))
    device = torch.device("cuda", 0)
    saved = rng_state(device)
    expected = torch.rand(3)
    fake.state = torch.tensor([9, 9, 9], dtype=torch.uint8)
    set_rng_state(saved, device)
    assert torch.equal(torch.rand(3), expected) and fake.state.tolist() == [1, 2, 3]
    set_rng_state(saved["cpu"], torch.device("cpu"))  # the old format
    assert torch.equal(torch.rand(3), expected) and set(rng_state(torch.device("cpu"))) == {"cpu"}


def test_manifest_mismatch_fails_before_ray_starts(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "jobs"))
    import train as train_job

    write_token_shards(tmp_path / "shards", tiny_config(**{"vae.num_tokens": 48}))
    (tmp_path / "cfg.yaml").write_text(json.dumps({k: v for k, v in to_dict(tiny_config()).items()
                                                   if k in ("tokenizer", "vae", "dalle")}))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the manifest check")

    monkeypatch.setattr(ray, "init", no_ray)
    start = time.perf_counter()
    code = train_job.main(["--config", str(tmp_path / "cfg.yaml"), "--shards", str(tmp_path / "shards"),
                           "--storage-path", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert "manifest.codebook_size=48 but dalle.num_image_tokens=32" in err, err
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "runs").exists()


def test_zero2_two_workers_consolidated_weights(reference):
    run, _ = reference
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert metrics[-1]["epoch"] == 1  # 6 batches per worker per epoch: the run crossed into epoch 1


def test_stop_and_rerun_on_s3_continues_and_matches_uninterrupted(reference, shards, s3_bucket, tmp_path,
                                                                  monkeypatch):
    """The run lives on s3:// (the loopback S3 server): checkpoints, metrics and the resume from them. Each
    resuming rank reads the shared files and its own shards only; publishing copies the model file alone, on the
    store (CopyObject), and the driver downloads nothing of the checkpoint."""
    config, runs = tiny_config(**{"train.zero_stage": 2}), f"{s3_bucket}/runs"
    monkeypatch.setenv(PAUSE_ENV, f"10:1:{tmp_path / 'paused'}")  # mid-epoch 1; last checkpoint at step 8
    with sigkill_paused_worker(tmp_path / "paused"), pytest.raises(TrainingFailedError):
        fit(config, shards, runs, "stopped")  # no retries: the kill fails the run
    monkeypatch.setattr(Checkpoint, "as_directory", lambda self: pytest.fail("the driver downloaded a checkpoint"))
    copied: list[int] = []
    monkeypatch.setattr(artifacts, "copy_file", lambda src, dst: copied.append(copy_file(src, dst)) or copied[-1])
    trainer = build_dalle_trainer(config, load_checked_manifest(config, str(shards)), shards_dir=str(shards),
                                  storage_path=runs, run_name="stopped")
    result = fit_and_publish(trainer, f"{s3_bucket}/published/dalle.safetensors")
    assert result.metrics["step"] == 12 and result.checkpoint.path.startswith(s3_bucket[len("s3://"):])
    fs, path = storage.filesystem(f"{runs}/stopped")
    fs.get(path, str(tmp_path / "stopped"), recursive=True)
    assert copied == [0] and fs.cat(f"{s3_bucket}/published/dalle.safetensors") == (
        tmp_path / "stopped" / "checkpoint_step_00000012" / "model.safetensors").read_bytes()
    metrics = read_metrics(tmp_path / "stopped")
    resumed = [m for m in metrics if m["start_step"] > 0]
    assert {m["start_step"] for m in resumed} == {8} and [m["step"] for m in resumed] == [9, 10, 11, 12]
    step8 = tmp_path / "stopped" / "checkpoint_step_00000008"
    files = {str(p.relative_to(step8)): p.stat().st_size for p in step8.rglob("*") if p.is_file()}
    expected = [sum(size for name, size in files.items() if name in ("progress.json", f"rng/rank_{rank}.pt")
                    or name.startswith("deepspeed/state/") and keeps_rank_file(rank)(name)) for rank in (0, 1)]
    assert resumed[0]["resume_read_bytes_per_worker"] == expected and resumed[0]["resume_world"] == 2
    assert all(0 < read < 0.75 * sum(files.values()) for read in expected)  # not the other rank's shard
    weights = check_run_outputs(tmp_path / "stopped", config, workers=2)
    # Same data position (epoch 1, two batches in), optimizer, LR schedule and RNG: the same model at fp32.
    for key, value in reference[1].items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)


def test_resume_on_fewer_workers_goes_on_from_the_checkpoint(reference, shards, tmp_path):
    """A 2-worker ZeRO-2 run resumed on 1 worker (a node lost, an elastic resize): rank 0 makes a universal
    checkpoint of the ZeRO shards, the run goes on from step 12 with the loss where it was (not restarted), and its
    new checkpoints are cut for one worker. That the weights and Adam moments come through exactly, for 1 and 3
    workers, is test_reshard.py's."""
    shutil.copytree(reference[0], tmp_path / "resized")
    config = tiny_config(**{"train.zero_stage": 2, "train.num_workers": 1, "train.max_steps": 16})
    assert fit(config, shards, tmp_path, "resized").metrics["step"] == 16
    metrics = read_metrics(tmp_path / "resized")
    before, resumed = metrics[:12], [m for m in metrics if m["start_step"] == 12]
    assert [m["step"] for m in resumed] == [13, 14, 15, 16] and resumed[0]["resume_world"] == 2
    assert len(resumed[0]["resume_read_bytes_per_worker"]) == 1
    assert resumed[0]["loss"] < before[0]["loss"] - 0.1 and abs(resumed[0]["loss"] - before[-1]["loss"]) < 0.3
    assert (tmp_path / "resized" / "checkpoint_step_00000012" / "deepspeed" / "state_universal").is_dir()
    files = {p.name for p in (tmp_path / "resized" / "checkpoint_step_00000016" / "deepspeed" / "state").iterdir()}
    assert {f for f in files if f.startswith("zero_pp_rank_")} == {"zero_pp_rank_0_mp_rank_00_optim_states.pt"}


def test_gpu_runs_route_cpu_tensors_to_gloo_and_can_be_elastic(cluster, shards, tmp_path):
    """On GPUs the process group is NCCL for CUDA tensors and gloo for CPU ones (a CPU tensor handed to NCCL
    killed every GPU run at its first checkpoint); ``min_workers`` makes the worker count elastic."""
    config = tiny_config(**{"train.use_gpu": True, "train.precision": "bf16", "train.min_workers": 1})
    trainer = build_dalle_trainer(config, load_checked_manifest(config, str(shards)), shards_dir=str(shards),
                                  storage_path=str(tmp_path), run_name="gpu")
    assert trainer.backend_config.backend == "cpu:gloo,cuda:nccl"
    assert trainer.scaling_config.num_workers == (1, 2) and trainer.scaling_config.use_gpu
    cpu = build_dalle_trainer(tiny_config(), load_checked_manifest(tiny_config(), str(shards)),
                              shards_dir=str(shards), storage_path=str(tmp_path), run_name="cpu")
    assert cpu.backend_config.backend == "gloo" and cpu.scaling_config.num_workers == 2
    ds = deepspeed_config(config.train, 2, "bf16")
    assert ds["communication_data_type"] == "fp32" and ds["bf16"]["enabled"]  # bf16 compute, fp32 gradient sums


def test_zero3_killed_worker_resumes_from_last_checkpoint(reference, shards, tmp_path, monkeypatch):
    config = tiny_config(**{"train.zero_stage": 3, "train.max_failures": 1})
    monkeypatch.setenv(PAUSE_ENV, f"6:1:{tmp_path / 'paused'}")
    with sigkill_paused_worker(tmp_path / "paused"):
        result = fit(config, shards, tmp_path, "killed")
    assert result.metrics["step"] == 12
    steps = [m["step"] for m in read_metrics(tmp_path / "killed")]
    # steps 1-5 ran, rank 1 was killed at 6; the retry resumed from the step-4 checkpoint: step 5 runs twice.
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11, 12]
    weights = check_run_outputs(tmp_path / "killed", config, workers=2)
    # ZeRO-3 with a crash lands where ZeRO-2 without one did, to fp32 rounding: ZeRO-3 partitions each parameter
    # as it is built (zero.Init), so its reductions sum in another order (one weight in 2,304 moved by 1.9e-5)
    for key, value in reference[1].items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=3e-5)


def test_compiled_engine_trains_like_the_eager_one(reference, shards, tmp_path):
    """``train.compile``: DeepSpeed's engine runs the DALLE through torch.compile (ZeRO-2, two workers), and the
    run ends where the eager reference did: same losses step by step, same consolidated weights."""
    config = tiny_config(**{"train.zero_stage": 2, "train.compile": True})
    fit(config, shards, tmp_path, "compiled")
    weights = check_run_outputs(tmp_path / "compiled", config, workers=2)
    compiled, eager = read_metrics(tmp_path / "compiled"), read_metrics(reference[0])
    assert load_model_with_extra(str(tmp_path / "compiled" / "checkpoint_step_00000012" / "model.safetensors")
                                 )[1]["compiled"] is True
    np.testing.assert_allclose([m["loss"] for m in compiled], [m["loss"] for m in eager], rtol=1e-5)
    for key, value in reference[1].items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited early"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {url}")


def test_ray_job_submit_against_head(shards, tmp_path, monkeypatch):
    ray.shutdown()  # the module's cluster is done with; one Ray on the machine starts the head's agent faster
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the client side of the job API, as the CLI below
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    port, dash = _free_port(), _free_port()
    url = f"http://127.0.0.1:{dash}"
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps({"tokenizer": {"vocab_size": 64, "text_seq_len": 8},
                                  "vae": {"image_size": 16, "num_layers": 2, "num_tokens": 32},
                                  "dalle": {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16},
                                  "train": {"num_workers": 2, "batch_size": 8, "max_steps": 4,
                                            "checkpoint_every": 2, "log_every": 2, "zero_stage": 1,
                                            "peak_flops_per_worker": 1.0e10}}))
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # --block keeps the head's processes under this one process group, so the test stops exactly those
    # (``ray stop`` would stop every Ray on the machine).
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=3", "--include-dashboard=true",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        _wait_for_dashboard(url, head)
        runtime_env = json.dumps({"excludes": [".venv", ".git", "outputs", "*.egg-info"]})
        submit = [ray_bin, "job", "submit", f"--address={url}", f"--working-dir={REPO}",
                  f"--runtime-env-json={runtime_env}", "--", sys.executable, "jobs/train.py", "--config",
                  str(config), "--shards", str(shards), "--storage-path", str(tmp_path / "runs"), "--run-name",
                  "submitted"]
        deadline = time.monotonic() + 600  # the dashboard answers before the head's job agent has registered
        while True:
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in job.stderr or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "run directory:" in job.stdout
        jobs = JobSubmissionClient(url).list_jobs()
        assert [j.status for j in jobs] == [JobStatus.SUCCEEDED]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
    run = tmp_path / "runs" / "submitted"
    assert [m["step"] for m in read_metrics(run)] == [2, 4]
    assert (run / "checkpoint_step_00000004" / "model.safetensors").exists()


def test_two_nodes_one_worker_each(shards, tmp_path):
    """Runs last: it replaces the module's single-node Ray with a two-node cluster on this machine."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    two = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                         "object_store_memory": 150 * 1024**2})
    two.add_node(num_cpus=2, object_store_memory=150 * 1024**2)
    try:
        ray.init(address=two.address, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        config = tiny_config(**{"train.zero_stage": 2, "train.max_steps": 4, "train.placement_strategy":
                                "STRICT_SPREAD"})
        result = fit(config, shards, tmp_path, "two-nodes")
        nodes = result.metrics["worker_nodes"]
        assert len(set(nodes)) == 2 and set(nodes) <= {n["NodeID"] for n in ray.nodes()}
        assert (tmp_path / "two-nodes" / "checkpoint_step_00000004" / "model.safetensors").exists()
    finally:
        ray.shutdown()
        two.shutdown()
        shutil.rmtree(tmp_path / "two-nodes", ignore_errors=True)
