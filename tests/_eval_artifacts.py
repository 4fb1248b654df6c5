"""Tiny evaluation artifacts built in seconds: a BPE model on synthetic captions and untrained (seeded) DALLE,
dVAE and CLIP saved with save_model, plus a Config whose paths point at them. The DALLE is laid out as the trainer
leaves it: checkpoints under the run folder and the last one published to ``paths.dalle``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dalle_core.checkpoint import save_model
from dalle_core.clip import CLIP
from dalle_core.dalle import DALLE
from dalle_core.tokenizer import BPETokenizer
from dalle_core.vae import DiscreteVAE
from pipelines import artifacts, storage
from pipelines.config import Config
from pipelines.data import synthetic

TINY = {
    "synthetic.image_size": 16,
    "tokenizer.vocab_size": 256, "tokenizer.text_seq_len": 24,
    "vae.image_size": 16, "vae.num_layers": 2, "vae.num_tokens": 32, "vae.codebook_dim": 16, "vae.hidden_dim": 16,
    "dalle.dim": 32, "dalle.depth": 2, "dalle.heads": 2, "dalle.dim_head": 16,
    "clip.patch_size": 8, "clip.dim_text": 32, "clip.dim_image": 32, "clip.dim_latent": 32, "clip.heads": 2,
    "clip.text_depth": 1, "clip.image_depth": 1,
    "sampling.num_candidates": 4, "sampling.top_images": 2, "sampling.cond_scale": 2.0,
}


def tiny_config(root: Path, **overrides: Any) -> Config:
    return Config.load(None, {"paths.root": str(root), **TINY, **overrides})


def build_artifacts(root: Path, **overrides: Any) -> Config:
    """Writes tokenizer, dVAE, CLIP, two DALLE checkpoints and the published DALLE where ``config.paths``
    expects them."""
    config = tiny_config(root, **overrides)
    paths = config.paths.resolved()
    tok = BPETokenizer.train(synthetic.every_combination_captions(), paths.tokenizer,
                             config.tokenizer.vocab_size, config.tokenizer.text_seq_len)
    assert tok.vocab_size <= config.tokenizer.vocab_size
    torch.manual_seed(0)
    save_model(DiscreteVAE(config.vae), paths.vae)
    save_model(CLIP(config.clip), paths.clip)
    run = artifacts.run_dir(paths.runs, config.train.run_name)
    save_model(DALLE(config.dalle), storage.join(run, artifacts.checkpoint_name(1), artifacts.MODEL_FILE))
    last = storage.join(run, artifacts.checkpoint_name(2))
    save_model(DALLE(config.dalle), storage.join(last, artifacts.MODEL_FILE), extra={"step": 2})
    artifacts.publish(last, paths.dalle)
    return config
