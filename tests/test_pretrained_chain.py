"""The chain on an imported tokenizer, run as a user runs it: a taming-format VQGAN (random weights, Lightning
``.ckpt`` + ``model.yaml``) -> jobs/import_model.py -> make_synthetic -> train_tokenizer -> pretokenize ->
10 DALLE steps -> generate, reranked by an imported open_clip model. The codes in the shards are the
imported model's own."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import job_main
from PIL import Image
from safetensors.torch import save_file
from test_pretrained_vqgan import ckpt_bytes

from dalle_core.checkpoint import load_model
from dalle_core.images import from_uint8
from pipelines.config import Config
from pipelines.data.images import load_picture

DDCONFIG = dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)  # two downsamplings: 32 px -> 8x8 codes
PARAMS = dict(embed_dim=16, n_embed=64, ddconfig=DDCONFIG, lossconfig={"target": "x.Loss", "params": {}})


def taming_files(folder: Path) -> tuple[Path, Path]:
    """What a taming training run leaves: ``last.ckpt`` (its VQModel's state_dict keys, loss weights beside
    them) and ``model.yaml``; weights random, the codebook spread over the encoder's outputs so codes vary."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    torch.manual_seed(0)
    parts = dict(encoder=Encoder(**DDCONFIG), decoder=Decoder(**DDCONFIG), quantize=VectorQuantizer2(64, 16, beta=0.25),
                 quant_conv=torch.nn.Conv2d(8, 16, 1), post_quant_conv=torch.nn.Conv2d(16, 8, 1))
    with torch.no_grad():
        z = parts["quant_conv"](parts["encoder"](torch.rand(8, 3, 32, 32) * 2 - 1)).permute(0, 2, 3, 1).reshape(-1, 16)
        parts["quantize"].embedding.weight.copy_(z[torch.randperm(len(z))[:64]])
    state = {f"{name}.{k}": v for name, m in parts.items() for k, v in m.state_dict().items()}
    state["loss.logvar"] = torch.zeros(())
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(ckpt_bytes(state))
    (folder / "model.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel",
                                                                 "params": PARAMS}}))
    return folder / "last.ckpt", folder / "model.yaml"


def write_config(root: Path, **vae: object) -> Path:
    config = {
        "paths": {"root": str(root / "out"), "vae": str(root / "out" / "vqgan.safetensors")},
        "synthetic": {"num_samples": 96, "image_size": 32, "samples_per_shard": 48},
        "tokenizer": {"vocab_size": 64, "text_seq_len": 16},
        "vae": {"kind": "VQGAN", "image_size": 32, "num_tokens": 64, "num_layers": 2, **vae},
        "dalle": {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16},
        "pretokenize": {"batch_size": 16, "concurrency": 1, "num_cpus_per_actor": 1, "min_image_size": 16},
        "train": {"num_workers": 1, "cpus_per_worker": 1, "batch_size": 8, "max_steps": 10, "checkpoint_every": 10,
                  "log_every": 1, "precision": "fp32", "optim": {"lr": 3.0e-3, "warmup_steps": 2}},
        "sampling": {"num_candidates": 3, "top_images": 1},
    }
    path = root / f"config-{len(vae)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory, ray_cluster) -> dict:
    root = tmp_path_factory.mktemp("pretrained")
    ckpt, model_yaml = taming_files(root / "taming")
    config_path = write_config(root)
    paths = Config.load(config_path).paths.resolved()
    run = {"root": root, "config": str(config_path), "paths": paths}
    run["import_rc"] = job_main("import_model")(["vqgan", "--checkpoint", str(ckpt), "--model-yaml",
                                                     str(model_yaml), "--output", paths.vae])
    for job in ("make_synthetic", "train_tokenizer", "pretokenize", "train"):
        run[f"{job}_rc"] = job_main(job)(["--config", str(config_path)])
    return run


def test_import_writes_a_self_describing_vqgan(chain):
    assert chain["import_rc"] == 0
    model = load_model(chain["paths"].vae)
    assert type(model).__name__ == "VQGAN" and model.image_seq_len == 64 and model.pixel_range == "minus1_1"


def test_shards_hold_the_imported_models_codes(chain):
    assert chain["make_synthetic_rc"] == chain["train_tokenizer_rc"] == chain["pretokenize_rc"] == 0
    paths = chain["paths"]
    manifest = json.loads(Path(paths.shards, "manifest.json").read_text())
    vae = manifest["vae"]
    assert (vae["kind"], vae["pixel_range"], vae["num_tokens"], vae["fmap_size"]) == ("VQGAN", "minus1_1", 64, 8)
    assert vae["checkpoint_hash"] == hashlib.sha256(Path(paths.vae).read_bytes()).hexdigest()
    raw_rows = pq.read_table(sorted(Path(paths.raw).glob("*.parquet")), columns=["key"]).num_rows
    assert (manifest["codebook_size"], manifest["image_seq_len"]) == (64, 64)
    assert manifest["num_rows"] == manifest["pairs_in"] == raw_rows > 80
    assert manifest["codebook_usage"]["dead_codes"] < 56  # the codes vary with the pictures

    tokens = pq.read_table(sorted(Path(paths.shards, "data").glob("*.parquet"))).to_pylist()[:8]
    raw = {r["key"]: r["jpg"] for r in pq.read_table(sorted(Path(paths.raw).glob("*.parquet")),
                                                     columns=["key", "jpg"]).to_pylist()}
    pixels = np.stack([load_picture(raw[t["key"]], 32, 16)[0] for t in tokens])
    codes = load_model(paths.vae).get_codebook_indices(from_uint8(pixels))
    assert codes.tolist() == [t["image_codes"] for t in tokens]


def test_ten_steps_then_generate_and_rerank(chain, tmp_path, capsys):
    assert chain["train_rc"] == 0
    paths = chain["paths"]
    dalle = load_model(paths.dalle)
    assert dalle.config.num_image_tokens == 64 and dalle.config.image_fmap_size == 8
    records = [json.loads(line) for line in Path(paths.runs, "dalle", "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))

    # The reranker is an open_clip model (random weights, saved as open_clip releases them), imported once.
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-S-32-alt", pretrained=None)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "open_clip.safetensors"))
    clip_path = str(tmp_path / "clip.safetensors")
    assert job_main("import_model")(["open_clip", "--model", "ViT-S-32-alt", "--checkpoint",
                                     str(tmp_path / "open_clip.safetensors"), "--output", clip_path]) == 0
    capsys.readouterr()
    assert job_main("generate")(["--config", chain["config"], "--prompt", "a small red circle", "--clip", clip_path,
                                 "--output", str(tmp_path / "gen")]) == 0
    summary = json.loads(capsys.readouterr().out)  # the job prints one indented JSON object
    assert len(summary["files"]) == 3 and summary["scores"] == sorted(summary["scores"], reverse=True)
    assert len(set(summary["scores"])) == 3  # open_clip told the candidates apart
    assert Image.open(summary["files"][0]).size == (32, 32)


def test_config_that_does_not_match_the_file_exits_2_naming_the_field(chain, capsys):
    capsys.readouterr()
    config = write_config(chain["root"], num_tokens=128)
    assert job_main("pretokenize")(["--config", str(config), "--output", str(chain["root"] / "other")]) == 2
    assert "vae.num_tokens: paths.vae holds a VQGAN with num_tokens=64, config 128" in capsys.readouterr().err


def test_a_dalle_mini_encoded_set_becomes_token_shards(chain, tmp_path, capsys):
    """Parquet files of ``caption`` + ``encoding`` (the VQGAN's own codes, as dalle-mini publishes them): captions
    through our BPE, codes kept, bad rows counted; training refuses the shards against another codebook or grid."""
    paths = chain["paths"]
    raw = pq.read_table(sorted(Path(paths.raw).glob("*.parquet")), columns=["caption", "jpg"]).to_pylist()[:40]
    pixels = np.stack([load_picture(r["jpg"], 32, 16)[0] for r in raw])
    codes = load_model(paths.vae).get_codebook_indices(from_uint8(pixels)).tolist()
    rows = [{"caption": r["caption"], "encoding": c} for r, c in zip(raw, codes, strict=True)]
    bad = [{"caption": "a red circle", "encoding": codes[0][:10]}, {"caption": "a blue square", "encoding": [64] * 64},
           {"caption": "   ", "encoding": codes[1]}, {"caption": "a green disc", "encoding": None}, rows[0]]
    encoded = tmp_path / "encoded"
    encoded.mkdir()
    schema = pa.schema([("caption", pa.string()), ("encoding", pa.list_(pa.int64()))])
    pq.write_table(pa.Table.from_pylist(rows[:20] + bad[:2] + bad[4:], schema=schema), encoded / "00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[20:] + bad[2:4], schema=schema), encoded / "00001.parquet")
    shards = tmp_path / "shards"
    capsys.readouterr()
    assert job_main("pretokenize")(["--config", chain["config"], "--input", str(encoded), "--output", str(shards)]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_rows"] == 40 and manifest["pairs_in"] == 45
    assert manifest["rejects"]["by_reason"] == {"code_out_of_range": 1, "codes_wrong_length": 1, "duplicate_key": 1,
                                                "empty_caption": 1, "missing_codes": 1}
    vae = manifest["vae"]
    assert (vae["kind"], vae["codes"], vae["num_tokens"], vae["fmap_size"]) == ("VQGAN", "input", 64, 8)
    assert vae["checkpoint_hash"] == hashlib.sha256(Path(paths.vae).read_bytes()).hexdigest()
    tokens = pq.read_table(sorted((shards / "data").glob("*.parquet"))).to_pylist()
    assert sorted(t["image_codes"] for t in tokens) == sorted(codes)
    assert all(t["text_ids"] and t["key"].startswith(("00000:", "00001:")) for t in tokens)

    other_codebook = write_config(chain["root"], num_tokens=128)
    assert job_main("train")(["--config", str(other_codebook), "--shards", str(shards)]) == 2
    assert "manifest.codebook_size=64 but dalle.num_image_tokens=128" in capsys.readouterr().err
