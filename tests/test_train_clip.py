"""CLIP training on Ray Train over synthetic raw shards, and the retrieval metric."""

from __future__ import annotations

import json

import pytest
import torch
from _eval_artifacts import build_artifacts, tiny_config
from conftest import sigkill_paused_worker, start_ray_with_state_api

from dalle_core.checkpoint import load_model_with_extra
from dalle_core.clip import CLIP
from dalle_core.metrics import retrieval_accuracy
from pipelines.config import InputError
from pipelines.data import synthetic
from pipelines.train.clip import is_heldout, metrics_path, train_clip
from pipelines.train.runner import PAUSE_ENV


def test_retrieval_accuracy_counts_ranks_both_ways():
    latents = torch.eye(4)
    assert retrieval_accuracy(latents, latents)["text_to_image_top1"] == 1.0
    images = latents[[1, 0, 2, 3]]  # texts 0 and 1 point at each other's picture
    acc = retrieval_accuracy(latents, images, ks=(1, 2))
    assert acc["text_to_image_top1"] == 0.5 and acc["image_to_text_top1"] == 0.5
    assert acc["text_to_image_top2"] == 0.5  # a true partner with similarity 0 ties the other zeros: no credit
    assert retrieval_accuracy(torch.ones(3, 2), torch.ones(3, 2))["text_to_image_top1"] == 0.0


def test_split_is_stable_and_close_to_the_fraction():
    keys = [f"syn{i:09d}" for i in range(2000)]
    held = [k for k in keys if is_heldout(k, 0.1)]
    assert held == [k for k in keys if is_heldout(k, 0.1)] and 150 < len(held) < 250


CLIP_RUN = {"synthetic.num_samples": 300, "train_clip.batch_size": 16, "train_clip.max_steps": 12,
            "train_clip.log_every": 4, "train_clip.checkpoint_every": 4, "train_clip.eval_fraction": 0.2}


def run(config, tmp_path, name: str) -> dict:
    paths = config.paths.resolved()
    return train_clip(config, raw=paths.raw, tokenizer_path=paths.tokenizer, storage_path=str(tmp_path / "runs"),
                      run_name=name, output=str(tmp_path / name / "clip.pt"))


@pytest.fixture(scope="module")
def ray_cluster():
    """This module's Ray, with the dashboard: the kill test finds the worker through the state API."""
    import ray

    start_ray_with_state_api()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    config = build_artifacts(root, **CLIP_RUN)
    synthetic.write_synthetic(config.synthetic, config.paths.resolved().raw)
    return root, config


def read_records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_clip_writes_a_loadable_checkpoint_and_retrieval_metrics(workspace, ray_cluster):
    root, config = workspace
    metrics = run(config, root, "clip")
    out = str(root / "clip" / "clip.pt")
    model, extra = load_model_with_extra(out)
    assert isinstance(model, CLIP) and extra["step"] == 12
    on_disk = json.loads(open(metrics_path(out)).read())
    assert on_disk["step"] == 12
    records = read_records(root / "runs" / "clip")
    assert [r["step"] for r in records] == [4, 8, 12] and all(r["loss"] > 0 for r in records)
    assert sorted(p.name for p in (root / "runs" / "clip").glob("checkpoint_step_*")) == [
        "checkpoint_step_00000008", "checkpoint_step_00000012"]
    retrieval = on_disk["retrieval"]
    for way in ("text_to_image", "image_to_text"):
        assert 0.0 <= retrieval[f"{way}_top1"] <= retrieval[f"{way}_top5"] <= 1.0
    assert retrieval["num_pairs"] == metrics["heldout_pairs"] > 20
    # every pair of the training split is used once: trained on or held out for retrieval
    assert metrics["train_pairs"] + metrics["heldout_pairs"] == sum(1 for _ in synthetic.iter_samples(config.synthetic))


def test_train_clip_killed_worker_resumes_to_the_same_model(workspace, ray_cluster, monkeypatch):
    root, config = workspace
    killed = tiny_config(root, **CLIP_RUN, **{"train_clip.max_failures": 1})
    monkeypatch.setenv(PAUSE_ENV, f"6:0:{root / 'paused'}")  # after the step-4 checkpoint
    with sigkill_paused_worker(root / "paused"):
        run(killed, root, "clip-killed")
    records = read_records(root / "runs" / "clip-killed")
    assert [(r["step"], r["start_step"]) for r in records] == [(4, 0), (8, 4), (12, 4)]
    resumed = load_model_with_extra(str(root / "clip-killed" / "clip.pt"))[0].state_dict()
    for key, value in load_model_with_extra(str(root / "clip" / "clip.pt"))[0].state_dict().items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)  # same data, optimiser and RNG


def test_train_clip_rejects_a_tokenizer_larger_than_the_model(tmp_path, ray_cluster):
    config = build_artifacts(tmp_path)
    small = config.__class__.load(None, {"paths.root": str(tmp_path), "tokenizer.vocab_size": 16})
    with pytest.raises(InputError, match="clip.num_text_tokens"):
        train_clip(small, raw=str(tmp_path), tokenizer_path=config.paths.resolved().tokenizer,
                   storage_path=str(tmp_path / "runs"), run_name="clip", output=str(tmp_path / "c.pt"))
