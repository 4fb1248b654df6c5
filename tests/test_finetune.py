"""Fine-tuning (``init_from``): a new run starting from a published model's weights with a fresh optimiser, LR
schedule and step count; a rerun of it resumes; files that do not fit the job are refused before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import job_main
from test_train import tiny_config, write_token_shards

from dalle_core.checkpoint import load_model_with_extra, save_model
from dalle_core.clip import CLIP
from dalle_core.config import to_dict
from dalle_core.dalle import DALLE
from dalle_core.train_utils import collate_tokens, lr_multiplier
from dalle_core.vae import DiscreteVAE
from pipelines.config import Config, InputError
from pipelines.train.finetune import check_init_from
from pipelines.train.runner import WorkerContext
from pipelines.train.vae import VAETask

HASHES = {"tokenizer_hash": "0" * 64, "vae_hash": "0" * 64}  # what write_token_shards' manifest records
FINETUNE = {"train.num_workers": 1, "train.zero_stage": 2, "train.max_steps": 3, "train.checkpoint_every": 2,
            "train.optim.warmup_steps": 4}


def token_batches(shards: Path, config: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    table = pq.read_table(sorted(shards.glob("*.parquet")), columns=["text_ids", "image_codes"]).to_pydict()
    text, codes = collate_tokens(table["text_ids"], np.array(table["image_codes"]), config.dalle.text_seq_len)
    return list(zip(text.split(8), codes.split(8), strict=True))


def mean_loss(model: DALLE, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        return float(np.mean([model(t, c, return_loss=True)[0].item() for t, c in batches]))


def write_config(path: Path, config: Config) -> Path:
    path.write_text(json.dumps({k: v for k, v in to_dict(config).items()
                                if k in ("tokenizer", "vae", "dalle", "train")}))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """Token shards and a DALLE trained on them in this process (pure torch, seconds), saved as a trainer
    publishes it; with the losses of that model and of a fresh seeded one over the whole set."""
    root = tmp_path_factory.mktemp("finetune")
    config = tiny_config(**FINETUNE)
    write_token_shards(root / "shards", config)
    batches = token_batches(root / "shards", config)
    torch.manual_seed(config.train.seed)
    model = DALLE(config.dalle)
    fresh = mean_loss(DALLE(config.dalle), batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        text, codes = batches[step % len(batches)]
        loss = model(text, codes, return_loss=True)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_model(model, str(root / "source" / "dalle.pt"), extra={"step": 60, **HASHES})
    return {"root": root, "config": config, "path": str(root / "source" / "dalle.pt"), "fresh": fresh,
            "trained": mean_loss(model, batches), "weights": model.state_dict()}


def train_job(source: dict, *args: str) -> int:
    root = source["root"]
    return job_main("train")(["--config", str(write_config(root / "cfg.yaml", source["config"])),
                              "--shards", str(root / "shards"), "--storage-path", str(root / "runs"), *args])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dalle_finetune_starts_from_the_weights_fresh_optimizer_and_a_rerun_resumes(source, ray_cluster):
    assert source["trained"] < source["fresh"] - 1.0, source  # the source learnt something worth keeping
    out = source["root"] / "ft.pt"
    assert train_job(source, "--init-from", source["path"], "--run-name", "ft", "--lr", "1e-3",
                     "--output", str(out)) == 0
    run = source["root"] / "runs" / "ft"
    first = records(run)
    assert [(r["step"], r["start_step"]) for r in first] == [(1, 0), (2, 0), (3, 0)]  # a new step count
    # The first step's loss is the source's, not a fresh model's: the engine started from the file's weights.
    gap = source["fresh"] - source["trained"]
    assert first[0]["loss"] < source["trained"] + 0.25 * gap, (first[0]["loss"], source)
    # A fresh schedule at the new peak rate: after one step, the second of four warmup steps to lr=1e-3.
    optim = source["config"].train.optim
    assert first[0]["lr"] == pytest.approx(1e-3 * lr_multiplier(1, optim.warmup_steps, 3, optim.min_lr_ratio))
    model, extra = load_model_with_extra(str(out))
    assert extra["step"] == 3 and extra["init_from"] == source["path"] and extra["vae_hash"] == HASHES["vae_hash"]
    moved = max((model.state_dict()[k] - v).abs().max().item() for k, v in source["weights"].items())
    assert 0 < moved < 0.1  # three small steps away from the source, nowhere near a fresh init

    # The same run again (init_from still set): it resumes from its step-3 checkpoint, not from the init weights.
    assert train_job(source, "--init-from", source["path"], "--run-name", "ft", "--lr", "1e-3", "--max-steps", "5",
                     "--output", str(out)) == 0
    resumed = records(run)[len(first):]
    assert [(r["step"], r["start_step"]) for r in resumed] == [(4, 3), (5, 3)]
    assert load_model_with_extra(str(out))[1]["step"] == 5


def test_mismatched_dalle_config_exits_2_naming_the_field_before_ray(source, tmp_path, monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the init_from check")

    monkeypatch.setattr(ray, "init", no_ray)
    wide = tiny_config(**{"dalle.dim": 64})
    save_model(DALLE(wide.dalle), str(tmp_path / "wide.pt"))
    assert train_job(source, "--init-from", str(tmp_path / "wide.pt"), "--run-name", "wide") == 2
    err = capsys.readouterr().err
    assert f"train.init_from {tmp_path / 'wide.pt'}: dalle.dim is 64 in the file, 32 in the config" in err, err
    assert not (source["root"] / "runs" / "wide").exists()

    save_model(DiscreteVAE(source["config"].vae), str(tmp_path / "vae.pt"))
    assert train_job(source, "--init-from", str(tmp_path / "vae.pt"), "--run-name", "kind") == 2
    assert "holds a DiscreteVAE, train trains a DALLE" in capsys.readouterr().err


def test_dalle_refusals_and_what_may_differ(source, tmp_path):
    config, runs = tiny_config(**FINETUNE), str(tmp_path / "runs")
    inside = tmp_path / "runs" / "dalle" / "checkpoint_step_00000004" / "model.pt"
    save_model(DALLE(config.dalle), str(inside))
    cases = {  # init_from -> what the refusal says
        str(inside): "is inside .* a fine-tune needs a run name of its own",
        str(tmp_path / "missing.pt"): r"train.init_from .*missing.pt: no such file",
    }
    other_vae = tmp_path / "other_vae.pt"
    save_model(DALLE(config.dalle), str(other_vae), extra={**HASHES, "vae_hash": "1" * 64})
    cases[str(other_vae)] = r"trained on shards of vae.checkpoint_hash=111111111111\.\.\., these shards have 0000"
    manifest = json.loads((source["root"] / "shards" / "manifest.json").read_text())
    for path, message in cases.items():
        config.train.init_from = path
        with pytest.raises(InputError, match=message):
            check_init_from(config, config.train, storage_path=runs, run_name="dalle", manifest=manifest)
    # Dropout and loss weights only change the training, never the parameters: a fine-tune may change them.
    regularised = tiny_config(**FINETUNE, **{"dalle.ff_dropout": 0.1, "dalle.loss_img_weight": 3.0,
                                             "train.init_from": source["path"]})
    check_init_from(regularised, regularised.train, storage_path=runs, run_name="dalle", manifest=manifest)


def test_vae_and_clip_init_from_refusals(tmp_path, monkeypatch, capsys):
    config = Config.load(None, {"train_vae.init_from": str(tmp_path / "vae.pt"),
                                "train_clip.init_from": str(tmp_path / "clip.pt")})
    save_model(DiscreteVAE(Config.load(None, {"vae.hidden_dim": 32}).vae), str(tmp_path / "vae.pt"))
    with pytest.raises(InputError, match=r"train_vae.init_from .*: vae.hidden_dim is 32 in the file, 64 in the co"):
        check_init_from(config, config.train_vae, storage_path=str(tmp_path), run_name="vae")
    save_model(DiscreteVAE(Config.load(None, {"vae.kl_div_loss_weight": 0.1}).vae), str(tmp_path / "vae.pt"))
    check_init_from(config, config.train_vae, storage_path=str(tmp_path), run_name="vae")  # a training-only field
    save_model(CLIP(Config.load(None, {"clip.dim_latent": 64}).clip), str(tmp_path / "clip.pt"))
    with pytest.raises(InputError, match=r"train_clip.init_from .*: clip.dim_latent is 64 in the file, 128 in"):
        check_init_from(config, config.train_clip, storage_path=str(tmp_path), run_name="clip")

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started before the init_from check"))
    for job in ("train_vae", "train_clip"):  # the jobs refuse a model of another kind with exit code 2
        (tmp_path / "raw").mkdir(exist_ok=True)
        code = job_main(job)(["--input", str(tmp_path / "raw"), "--storage-path", str(tmp_path / "runs"),
                              "--init-from", str(tmp_path / "clip.pt" if job == "train_vae" else tmp_path / "vae.pt")])
        assert code == 2
        assert "holds a " in capsys.readouterr().err


def test_ddp_task_loads_the_init_weights_before_the_optimizer(tmp_path, monkeypatch):
    """The dVAE (and CLIP, through the same DDPTask) starts from ``init``; the optimiser holds those tensors."""
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda module, **_: module)  # no Train session here
    config = Config.load(None, {"vae.hidden_dim": 16, "vae.codebook_dim": 16})
    torch.manual_seed(1)
    init = DiscreteVAE(config.vae).state_dict()
    task = VAETask(config, WorkerContext(0, 1, torch.device("cpu"), "fp32"), str(tmp_path), init=init)
    for key, value in task.vae.state_dict().items():
        torch.testing.assert_close(value, init[key], rtol=0, atol=0)
    params = {id(p) for group in task.optimizer.param_groups for p in group["params"]}
    assert params == {id(p) for p in task.vae.parameters()} and task.scheduler.last_epoch == 0
