"""The whole chain end to end at a toy size, as `make demo` runs it: every artifact and every metrics field."""

import html
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from pipelines.data.synthetic import make_sample
from pipelines.serve.report import QUALITY_BAR

ROOT = Path(__file__).resolve().parents[1]

TOY = {
    "synthetic": {"num_samples": 240, "image_size": 16, "samples_per_shard": 120},
    "tokenizer": {"vocab_size": 256, "text_seq_len": 24},
    "vae": {"image_size": 16, "num_layers": 2, "num_tokens": 16, "codebook_dim": 16, "hidden_dim": 16},
    "dalle": {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16},
    "clip": {"patch_size": 8, "dim_text": 32, "dim_image": 32, "dim_latent": 32, "text_depth": 1, "image_depth": 1},
    "train_vae": {"batch_size": 16, "max_steps": 6, "log_every": 3, "sample_every": 6, "checkpoint_every": 6,
                  "precision": "auto", "materialize": True},
    "train": {"num_workers": 1, "zero_stage": 1, "batch_size": 16, "max_steps": 4, "checkpoint_every": 4,
              "log_every": 2, "materialize": True},
    "train_clip": {"batch_size": 16, "max_steps": 4, "log_every": 2},
    "sampling": {"num_candidates": 2, "top_images": 1},
    "evaluate": {"num_prompts": 6, "max_batch_size": 2},
}


def test_demo_runs_the_whole_chain_and_writes_every_artifact(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({**TOY, "paths": {"root": str(tmp_path / "out")}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    workdirs = set(Path(tempfile.gettempdir()).glob("dalle-demo-*"))
    proc = subprocess.run([sys.executable, "jobs/demo.py", "--config", str(config), "--num-cpus", "4", "--seed", "3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert set(Path(tempfile.gettempdir()).glob("dalle-demo-*")) == workdirs  # its config copy is cleaned up
    assert "=== seconds per stage" in proc.stdout
    assert "quality bar" in proc.stdout.split("=== metrics")[-1]  # it ends with the metrics table

    out = tmp_path / "out"
    assert sorted((out / "raw").glob("part-*.parquet")) and sorted((out / "raw" / "holdout").glob("*.parquet"))
    assert (out / "tokenizer" / "bpe.model").exists()
    assert (out / "vae" / "vae.safetensors").exists()
    reconstruction = json.loads((out / "runs" / "vae" / "reconstruction.json").read_text())
    assert reconstruction["all"]["n"] == reconstruction["seen"]["n"] + reconstruction["heldout"]["n"]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    rows = sum(shard["rows"] for shard in manifest["shards"])
    assert rows == sum(pq.read_metadata(p).num_rows for p in (out / "raw").glob("part-*.parquet"))
    run = out / "runs" / "dalle"
    assert (run / "metrics.jsonl").exists()
    assert (run / "checkpoint_step_00000004" / "model.safetensors").exists()
    assert (out / "clip" / "clip.safetensors").exists()

    evaluation = out / "evaluation"
    for name in ("grid.png", "results.parquet", "metrics.json", "report.html"):
        assert (evaluation / name).exists(), name
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert {"num_prompts", "status_counts", "clip_score", "attribute_accuracy", "vae_reconstruction", "quality_bar",
            "sampling", "models"} <= set(metrics)
    assert {c["check"] for c in metrics["quality_bar"]} == {check for check, _, _ in QUALITY_BAR}
    assert metrics["num_prompts"] == 6 and metrics["sampling"]["seed"] == 3  # --seed reaches every stage
    assert {"top1_mean", "random_mean"} <= set(metrics["clip_score"])
    for split in ("seen", "heldout", "heldout_wording"):
        for pick in ("top1", "random"):
            assert {"color", "shape", "size", "position"} <= set(metrics["attribute_accuracy"][split][pick])
    results = pq.read_table(evaluation / "results.parquet").to_pandas()
    images = [p for p in results["image_path"].fillna("") if p]
    accepted = results.loc[results["status"] == "ok", "key"].nunique()
    assert accepted == 6 and len(images) == accepted  # top_images=1 for each accepted prompt
    assert all((evaluation / p).exists() for p in images)
    report = (evaluation / "report.html").read_text()
    assert all(html.escape(prompt) in report for prompt in results["prompt"])
    assert report.count("<svg") == 3  # a loss curve for each trained model
    first = pq.read_table(sorted((out / "raw").glob("part-*.parquet"))[0]).slice(0, 1).to_pylist()[0]
    assert first["caption"] == make_sample(3, int(first["key"].removeprefix("syn")), 16)["caption"]
