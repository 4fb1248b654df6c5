"""Stage one on Ray Train (DDP, CPU): losses, temperature annealing, sample grids, codebook usage, rejects,
self-describing checkpoint, and resume by rerunning with the same run name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import sigkill_paused_worker, start_ray_with_state_api
from PIL import Image

from dalle_core.checkpoint import load_model_with_extra
from dalle_core.images import from_uint8, uint8_to_device
from dalle_core.vae import DiscreteVAE, codebook_usage, histogram_usage
from pipelines import storage
from pipelines.config import Config
from pipelines.data.raw import raw_table
from pipelines.data.synthetic import write_synthetic
from pipelines.train.runner import PAUSE_ENV
from pipelines.train.vae import _good_rows

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
import train_vae as train_vae_job  # noqa: E402

CONFIG = {
    "synthetic": {"num_samples": 64, "image_size": 16, "samples_per_shard": 32, "holdout_pairs": []},
    "vae": {"image_size": 16, "num_layers": 2, "num_tokens": 32, "codebook_dim": 16, "hidden_dim": 16,
            "kl_div_loss_weight": 0.001, "temperature": 1.0},
    "train_vae": {"num_workers": 2, "batch_size": 8, "max_steps": 8, "log_every": 2, "sample_every": 4,
                  "checkpoint_every": 4, "anneal_rate": 0.05, "temperature_min": 0.6, "max_failures": 0,
                  "decoder_finetune_steps": 4,
                  "optim": {"lr": 3.0e-3, "warmup_steps": 1, "weight_decay": 0.0, "grad_clip": 1.0}},
}


@pytest.fixture(scope="module")
def cluster():
    start_ray_with_state_api()  # the kill test finds the worker through the state API
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae")
    config = Config.load(None, CONFIG)
    write_synthetic(config.synthetic, str(root / "raw"))
    # Two bad rows in their own shard: an undecodable picture and one that failed upstream.
    bad = [{"key": "bad-0", "caption": "x", "jpg": b"not a picture", "status": "success", "source": "test"},
           {"key": "bad-1", "caption": "x", "jpg": None, "status": "failed_to_download", "source": "test"}]
    storage.write_parquet(raw_table(bad), str(root / "raw" / "part-00000-bad.parquet"))
    (root / "cfg.yaml").write_text(json.dumps(CONFIG))
    return root


def run_job(root: Path, *extra: str) -> int:
    return train_vae_job.main(["--config", str(root / "cfg.yaml"), "--input", str(root / "raw"),
                               "--storage-path", str(root / "runs"), "--output", str(root / "vae.pt"), *extra])


def test_train_vae_ddp_samples_checkpoint_and_resume(cluster, workspace):
    assert run_job(workspace) == 0
    run = workspace / "runs" / "vae"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert records[-1]["recon_loss"] < records[0]["recon_loss"]
    temps = [r["temperature"] for r in records]
    assert temps == sorted(temps, reverse=True) and temps[0] < 1.0 and min(temps) >= 0.6
    assert all(1.0 <= r["codebook_perplexity"] <= 32 and 0 <= r["dead_codes"] < 32 for r in records)
    assert sum(r["rejected"] for r in records) > 0  # bad rows are counted, not silently dropped
    assert all(np.isfinite(r["loss"]) for r in records)
    grid = Image.open(run / "samples" / "step_00000004.png")
    assert grid.size == (8 * 16, 2 * 16)  # originals over reconstructions
    model, extra = load_model_with_extra(str(workspace / "vae.pt"))
    assert isinstance(model, DiscreteVAE) and extra["step"] == 8 and model.config.num_tokens == 32
    # Steps 5-8 trained only the decoder and codebook (on the argmax codes), under DDP with two ranks.
    at_4 = load_model_with_extra(str(run / "checkpoint_step_00000004" / "model.safetensors"))[0].state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, at_4[key]) == key.startswith("encoder."), key

    assert run_job(workspace, "--max-steps", "12") == 0  # same run name: continues from step 8
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]
    assert load_model_with_extra(str(workspace / "vae.pt"))[1]["step"] == 12
    assert sorted(p.name for p in run.glob("checkpoint_step_*")) == ["checkpoint_step_00000008",
                                                                    "checkpoint_step_00000012"]


def test_train_vae_killed_worker_resumes_to_the_same_model(cluster, workspace, tmp_path, monkeypatch):
    """Rank 1 is killed (SIGKILL, from outside) at step 5; the retried run resumes from the step-4 checkpoint and
    ends where the uninterrupted run above was at step 8 (same data position, optimiser, schedule, per-rank RNG)."""
    config = json.loads((workspace / "cfg.yaml").read_text())
    config["train_vae"]["max_failures"] = 1
    (tmp_path / "cfg.yaml").write_text(json.dumps(config))
    monkeypatch.setenv(PAUSE_ENV, f"5:1:{tmp_path / 'paused'}")
    with sigkill_paused_worker(tmp_path / "paused"):
        code = train_vae_job.main(["--config", str(tmp_path / "cfg.yaml"), "--input", str(workspace / "raw"),
                                   "--storage-path", str(tmp_path / "runs"), "--output", str(tmp_path / "vae.pt")])
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "runs" / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["start_step"]) for r in records] == [(2, 0), (4, 0), (6, 4), (8, 4)]
    resumed = load_model_with_extra(str(tmp_path / "vae.pt"))[0].state_dict()
    step_8 = workspace / "runs" / "vae" / "checkpoint_step_00000008" / "model.safetensors"
    reference = load_model_with_extra(str(step_8))[0]
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)


def test_missing_raw_shards_fail_before_ray(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_vae_job.main(["--input", str(tmp_path / "empty"), "--storage-path", str(tmp_path)]) == 2
    assert "no raw Parquet shards" in capsys.readouterr().err


def test_pixels_converted_on_the_device_match_the_host_path_exactly():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    readonly = pixels.copy()
    readonly.flags.writeable = False  # what Ray hands a step
    for images in (pixels, readonly, pixels[::2], pixels[0]):
        old = torch.from_numpy(np.require(images, requirements=["C", "W"])).movedim(-1, -3).float() / 255
        new = uint8_to_device(images, torch.device("cpu"))
        assert torch.equal(new, old) and new.stride() == old.stride() and new.dtype == old.dtype
        assert torch.equal(uint8_to_device(torch.from_numpy(images.copy()), torch.device("cpu")), old)
        assert torch.equal(from_uint8(images), old)
    ok = np.array([False, True, False, True, True])
    images, weight = _good_rows(pixels, ok, torch.device("cpu"))
    assert weight == 1.0 and torch.equal(images, from_uint8(pixels)[[1, 3, 4, 1, 3]])  # rejects -> good rows
    assert _good_rows(pixels, np.zeros(5, dtype=bool), torch.device("cpu"))[1] == 0.0


def test_codebook_usage_from_the_device_histogram_equals_the_codes_path():
    codes = [torch.randint(0, 12, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    counts = torch.zeros(32, dtype=torch.long)
    for step in codes:  # what VAETask.train_step accumulates each step
        flat = step.flatten()
        counts.index_add_(0, flat, torch.ones_like(flat))
    assert histogram_usage(counts) == codebook_usage(torch.cat(codes), 32)
    assert histogram_usage(counts)["dead_codes"] >= 20
    with pytest.raises(ValueError, match="at least one code"):
        histogram_usage(torch.zeros(32, dtype=torch.long))
