"""CLIP training on Ray Train over synthetic raw shards, and the retrieval metric."""

from __future__ import annotations

import json

import pytest
import torch
from _eval_artifacts import build_artifacts

from dalle_core.checkpoint import load_model_with_extra
from dalle_core.clip import CLIP
from dalle_core.metrics import retrieval_accuracy
from pipelines.data import synthetic
from pipelines.train.clip import is_heldout, metrics_path, run_train_clip


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


def test_train_clip_writes_a_loadable_checkpoint_and_retrieval_metrics(tmp_path, ray_cluster):
    config = build_artifacts(tmp_path, **{"synthetic.num_samples": 300, "train_clip.batch_size": 16,
                                          "train_clip.max_steps": 12, "train_clip.log_every": 4,
                                          "train_clip.eval_fraction": 0.2})
    paths = config.paths.resolved()
    synthetic.write_synthetic(config.synthetic, paths.raw)
    out = str(tmp_path / "clip_out" / "clip.pt")
    metrics = run_train_clip(config, paths.raw, paths.tokenizer, out, str(tmp_path / "runs"))

    model, extra = load_model_with_extra(out)
    assert isinstance(model, CLIP) and extra["step"] == 12
    on_disk = json.loads(open(metrics_path(out)).read())
    assert on_disk["step"] == 12 and [h["step"] for h in on_disk["history"]] == [4, 8, 12]
    retrieval = on_disk["retrieval"]
    for way in ("text_to_image", "image_to_text"):
        assert 0.0 <= retrieval[f"{way}_top1"] <= retrieval[f"{way}_top5"] <= 1.0
    assert retrieval["num_pairs"] == metrics["heldout_pairs"] > 20
    # every pair of the training split is used once: trained on or held out for retrieval
    assert metrics["train_pairs"] + metrics["heldout_pairs"] == sum(1 for _ in synthetic.iter_samples(config.synthetic))


def test_train_clip_rejects_a_tokenizer_larger_than_the_model(tmp_path, ray_cluster):
    config = build_artifacts(tmp_path)
    small = config.__class__.load(None, {"paths.root": str(tmp_path), "tokenizer.vocab_size": 16})
    with pytest.raises(ValueError, match="clip.num_text_tokens"):
        run_train_clip(small, str(tmp_path), config.paths.resolved().tokenizer, str(tmp_path / "c.pt"),
                       str(tmp_path / "runs"))
