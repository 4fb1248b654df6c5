"""jobs/generate.py, the shared prompt -> image helpers in dalle_core.sampling and the default model paths
(no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _eval_artifacts import build_artifacts, tiny_config
from PIL import Image

from dalle_core.checkpoint import load_model
from dalle_core.config import SamplingConfig
from dalle_core.images import make_grid
from dalle_core.sampling import PromptChecker, generate_prompt, load_generator
from dalle_core.tokenizer import BPETokenizer
from dalle_core.train_utils import native_bf16
from pipelines.artifacts import latest_checkpoint, model_paths

ROOT = Path(__file__).resolve().parents[1]


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/generate.py", "--config", "", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return build_artifacts(tmp_path_factory.mktemp("gen"))


def test_generate_job_writes_ranked_pngs_of_the_model_size(config, tmp_path):
    out, paths = tmp_path / "gen", config.paths.resolved()
    proc = run_job("--prompt", "a small red circle on the left", "-n", "5", "--output", str(out), "--tokenizer",
                   paths.tokenizer, "--vae", paths.vae, "--clip", paths.clip, "--checkpoint",
                   latest_checkpoint(paths.runs, "dalle"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert len(summary["files"]) == 5 and summary["scores"] == sorted(summary["scores"], reverse=True)
    size = config.vae.image_size
    for path in summary["files"]:
        assert Image.open(path).size == (size, size) and Image.open(path).mode == "RGB"
    grid = Image.open(out / "grid.png")
    scale = 64 // size
    assert grid.size == (5 * (size * scale + 2) + 2, size * scale + 4)


def test_generate_job_rejects_a_bad_prompt_with_its_status(config, tmp_path):
    paths = config.paths.resolved()
    proc = run_job("--prompt", "", "--output", str(tmp_path), "--tokenizer", paths.tokenizer, "--vae", paths.vae,
                   "--checkpoint", latest_checkpoint(paths.runs, "dalle"))
    assert proc.returncode == 2 and json.loads(proc.stdout)["status"] == "empty"
    assert not any(tmp_path.iterdir())


def test_same_seed_same_pictures_and_scores_rank_candidates(config):
    paths = config.paths.resolved()
    gen = load_generator(latest_checkpoint(paths.runs, "dalle"), paths.vae)
    tok = BPETokenizer.load(paths.tokenizer, config.tokenizer.text_seq_len)
    clip = load_model(paths.clip)
    sampling = SamplingConfig(cond_scale=3.0, num_candidates=4, top_images=1, seed=7)
    first = generate_prompt(gen, tok, "a large blue square at the top", 4, sampling, clip)
    again = generate_prompt(gen, tok, "a large blue square at the top", 4, sampling, clip)
    assert (first.images == again.images).all() and first.images.shape == (4, 16, 16, 3)
    assert [first.scores[i] for i in first.order] == sorted(first.scores, reverse=True)


def test_sampler_precision_sets_weights_and_cache_and_stays_near_fp32(config):
    paths = config.paths.resolved()
    ckpt = latest_checkpoint(paths.runs, "dalle")
    full, half = load_generator(ckpt, paths.vae, precision="fp32"), load_generator(ckpt, paths.vae, precision="bf16")
    assert (full.precision, half.precision) == ("fp32", "bf16")
    assert full.dalle.new_cache(2)[0].k.dtype == torch.float32 and half.dalle.new_cache(2)[0].k.dtype == torch.bfloat16
    assert next(half.vae.parameters()).dtype == torch.float32  # the decoder stays fp32
    auto = load_generator(ckpt, paths.vae)
    assert auto.precision == ("bf16" if native_bf16() else "fp32") and auto.precision_reason.startswith("auto:")
    text = torch.randint(1, config.tokenizer.vocab_size, (2, config.tokenizer.text_seq_len))
    codes = torch.randint(0, config.vae.num_tokens, (2, config.vae.image_seq_len))
    with torch.no_grad():
        want, got = full.dalle(text, codes).float(), half.dalle(text, codes).float()
    finite = want > -1e30  # the masked entries
    assert torch.allclose(got[finite], want[finite], atol=0.1, rtol=0.05)
    sampling = SamplingConfig(cond_scale=2.0, num_candidates=2, top_images=1, seed=3)
    pictures = half.generate(text[:1], 2, sampling, [3])
    assert pictures.dtype == torch.float32 and pictures.shape[:2] == (1, 2)
    with pytest.raises(ValueError, match="sampling.precision: fp16 needs a CUDA device"):
        load_generator(ckpt, paths.vae, precision="fp16")


def test_latest_checkpoint_picks_the_highest_step(config, tmp_path):
    newest = latest_checkpoint(config.paths.resolved().runs, "dalle")
    assert newest.endswith("checkpoint_step_00000002/model.safetensors")
    with pytest.raises(FileNotFoundError, match="pass --checkpoint"):
        latest_checkpoint(str(tmp_path), "dalle")


def test_model_paths_prefer_the_published_dalle_then_the_newest_checkpoint(config, tmp_path):
    paths = config.paths.resolved()
    assert Path(paths.dalle).is_file()
    assert model_paths(config).checkpoint == paths.dalle
    unpublished = tiny_config(Path(paths.root), **{"paths.dalle": str(tmp_path / "not_published.pt")})
    newest = model_paths(unpublished)
    assert newest.checkpoint == latest_checkpoint(paths.runs, "dalle")
    assert newest.checkpoint.endswith("checkpoint_step_00000002/model.safetensors")
    assert (newest.vae, newest.tokenizer, newest.clip) == (paths.vae, paths.tokenizer, paths.clip)
    assert model_paths(config, checkpoint="explicit.pt").checkpoint == "explicit.pt"  # a flag always wins


def test_prompt_checker_statuses(config):
    tok = BPETokenizer.load(config.paths.resolved().tokenizer, config.tokenizer.text_seq_len)
    checks = PromptChecker(tok).check(["A Small  RED circle", "", "  \n", "a red circle ☃ 7",
                                       " ".join(["a small red circle on the left"] * 4)])
    assert [c.status for c in checks] == ["ok", "empty", "empty", "unknown_chars", "too_long"]
    assert checks[0].text_ids == tok.encode(["a small red circle"])[0]
    assert "☃" in checks[3].detail and "7" in checks[3].detail
    assert f"text_seq_len={config.tokenizer.text_seq_len}" in checks[4].detail


def test_grid_layout():
    red = torch.zeros(3, 4, 4)
    red[0] = 1
    tile = (red.permute(1, 2, 0).numpy() * 255).astype("uint8")
    grid = make_grid([[tile, tile], [tile]], pad=1, scale=2)
    assert grid.shape == (2 * 9 + 1, 2 * 9 + 1, 3)
    assert (grid[1:9, 1:9] == [255, 0, 0]).all() and (grid[10:18, 10:18] == 255).all()  # short row stays blank
