"""CLIP training on Ray Train over synthetic raw shards, and the retrieval metric."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from _eval_artifacts import build_artifacts, tiny_config
from conftest import sigkill_paused_worker, start_ray_with_state_api

from dalle_core.checkpoint import load_model_with_extra
from dalle_core.clip import CLIP
from dalle_core.metrics import retrieval_accuracy
from dalle_core.tokenizer import BPETokenizer
from pipelines import storage
from pipelines.config import InputError
from pipelines.data import synthetic
from pipelines.data.raw import list_raw_shards, raw_table
from pipelines.train import clip as clip_job
from pipelines.train.clip import is_heldout, load_pairs, metrics_path, train_clip
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


def bad_rows(fraction: float) -> list[dict]:
    """One undecodable picture, one upstream failure and one empty caption in each split."""
    keys = [f"bad{i}" for i in range(200)]
    held = [k for k in keys if is_heldout(k, fraction)][:3]
    kept = [k for k in keys if not is_heldout(k, fraction)][:3]
    rows = []
    for trio in (held, kept):
        rows += [{"key": trio[0], "caption": "a red square", "jpg": b"not a picture", "status": "success"},
                 {"key": trio[1], "caption": "a red square", "jpg": None, "status": "failed_to_download"},
                 {"key": trio[2], "caption": "", "jpg": None, "status": "success"}]
    return [{**row, "source": "test"} for row in rows]


def test_decode_pairs_decodes_only_its_split_and_flags_rejects(workspace, monkeypatch):
    """No Ray: the UDF picks its split by key before decoding a picture, and keeps unusable rows flagged."""
    root, config = workspace
    paths = config.paths.resolved()
    good = storage.read_parquet(list_raw_shards(paths.raw)[0]).slice(0, 40)
    table = pa.concat_tables([good.select(clip_job.RAW_COLUMNS),
                              raw_table(bad_rows(0.2)).select(clip_job.RAW_COLUMNS).cast(
                                  good.select(clip_job.RAW_COLUMNS).schema)])
    decoded = []
    real = clip_job.load_picture
    monkeypatch.setattr(clip_job, "load_picture", lambda data, *a, **k: decoded.append(data) or real(data, *a, **k))
    tokenizer = BPETokenizer.load(paths.tokenizer, config.tokenizer.text_seq_len)
    kwargs = {"tokenizer": tokenizer, "image_size": 16, "channels": 3, "eval_fraction": 0.2}
    for heldout in (True, False):
        decoded.clear()
        out = clip_job.decode_pairs(table, heldout=heldout, **kwargs)
        want = [k for k in table.column("key").to_pylist() if is_heldout(k, 0.2) == heldout]
        assert list(out["key"]) == want and out["pixels"].shape == (len(want), 16, 16, 3)
        assert len(decoded) == sum(1 for k in want if not k.startswith("bad")) + 1  # + the undecodable one
        assert [k for k, ok in zip(out["key"], out["ok"], strict=True) if not ok] == [k for k in want
                                                                                      if k.startswith("bad")]
        assert not out["pixels"][~out["ok"]].any() and not out["text_ids"][~out["ok"]].any()


def plan_chain(dataset) -> list[str]:
    """The operators of a dataset's plan back to its source: a Parquet read when it streams from the shards, a
    block list when it was materialised."""
    op, names = dataset._logical_plan.dag, []
    while True:
        names.append(op.name)
        if not op.input_dependencies:
            return names
        op = op.input_dependencies[0]


def test_load_pairs_streams_training_and_holds_only_the_capped_heldout_rows(workspace, ray_cluster, tmp_path):
    """load_pairs decodes no training picture: the stream starts at the Parquet files (today's decoded and
    materialised set starts at blocks); the eval set holds only held-out rows, at most eval_max_rows; rejects
    stay countable in both splits."""
    root, config = workspace
    paths = config.paths.resolved()
    raw = tmp_path / "raw"
    raw.mkdir()
    for shard in list_raw_shards(paths.raw):
        (raw / storage.basename(shard)).write_bytes(open(shard, "rb").read())
    # read first (the held-out pass keeps the files' order), so the capped pass meets the held-out rejects
    storage.write_parquet(raw_table(bad_rows(0.2)), str(raw / "part-00000-bad.parquet"))
    assert list_raw_shards(str(raw))[0].endswith("part-00000-bad.parquet")
    tokenizer = BPETokenizer.load(paths.tokenizer, config.tokenizer.text_seq_len)
    keys = [k for shard in list_raw_shards(str(raw)) for k in storage.read_parquet(shard).column("key").to_pylist()]
    bad = [r["key"] for r in bad_rows(0.2)]
    capped = tiny_config(root, **CLIP_RUN, **{"train_clip.eval_max_rows": 8})
    train, heldout, counts = load_pairs(capped, str(raw), tokenizer)
    chain = plan_chain(train)
    assert any("Parquet" in name for name in chain) and not any("InputData" in name for name in chain), chain
    assert len(heldout["key"]) == counts["heldout_pairs"] == 8 == len(heldout["pixels"])
    assert all(is_heldout(k, 0.2) and k not in bad for k in heldout["key"])
    assert np.all(heldout["pixels"].reshape(8, -1).any(axis=1)) and counts["heldout_rejected"] == 3
    flags = train.select_columns(["key", "ok"]).to_pandas()  # the stream, decoded now: every training row, once
    assert counts["train_pairs"] == sum(not is_heldout(k, 0.2) for k in keys) == len(flags) == flags.key.nunique()
    assert sorted(flags.key[~flags.ok]) == sorted(k for k in bad if not is_heldout(k, 0.2))
