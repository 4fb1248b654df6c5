"""Self-describing checkpoints: load without constructor arguments, hashes, extra data, clear errors."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dalle_core.checkpoint import load_model, load_model_with_extra, save_model
from dalle_core.clip import CLIP
from dalle_core.config import CLIPConfig, VAEConfig
from dalle_core.io import file_sha256
from dalle_core.vae import DiscreteVAE

VAE_CONFIG = VAEConfig(image_size=16, num_tokens=24, codebook_dim=8, num_layers=2, num_resnet_blocks=1,
                       hidden_dim=16, straight_through=True, kl_div_loss_weight=0.5)
CLIP_CONFIG = CLIPConfig(num_text_tokens=40, text_seq_len=5, image_size=16, patch_size=4, dim_text=16,
                         dim_image=16, dim_latent=8, text_depth=1, image_depth=1, heads=2)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_dvae_round_trip_without_constructor_args(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    model = DiscreteVAE(VAE_CONFIG)
    path = tmp_path / "deep" / "dir" / f"vae{suffix}"  # parent folders are created
    digest = save_model(model, str(path), extra={"step": 7, "history": [0.5, 0.25], "note": "tiny"})
    assert digest == file_sha256(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()

    loaded, extra = load_model_with_extra(str(path))
    assert isinstance(loaded, DiscreteVAE) and not loaded.training
    assert loaded.config == VAE_CONFIG
    assert extra == {"step": 7, "history": [0.5, 0.25], "note": "tiny"}
    images = torch.rand(2, 3, 16, 16)
    codes = model.get_codebook_indices(images)
    assert torch.equal(loaded.get_codebook_indices(images), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert list(tmp_path.joinpath("deep", "dir").iterdir()) == [path]  # no temporary file left behind
    assert path.read_bytes()[:2] != b"PK" if suffix == ".safetensors" else path.read_bytes()[:2] == b"PK"


def test_safetensors_format(tmp_path: Path) -> None:
    """Config and extra live in the header (readable with safetensors alone); a renamed file still loads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = DiscreteVAE(VAE_CONFIG)
    path = tmp_path / "vae.safetensors"
    save_model(model, str(path), extra={"step": 3})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(model.state_dict())
    assert meta["kind"] == "DiscreteVAE" and json.loads(meta["config"])["num_tokens"] == 24
    renamed = tmp_path / "vae.pt"
    renamed.write_bytes(path.read_bytes())
    loaded, extra = load_model_with_extra(str(renamed))
    assert extra == {"step": 3} and torch.equal(loaded.codebook.weight, model.codebook.weight)
    with pytest.raises(TypeError, match="only JSON data"):
        save_model(model, str(tmp_path / "t.safetensors"), extra={"probe": torch.zeros(2)})
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not one of this project's self-describing checkpoints"):
        load_model(str(tmp_path / "foreign.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(str(tmp_path / "cut.safetensors"))


def test_clip_round_trip_and_wrapped_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CLIP(CLIP_CONFIG).eval()

    class Wrapper(nn.Module):  # stands in for DDP / a DeepSpeed engine holding the model in .module
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    path = str(tmp_path / "clip.pt")
    save_model(Wrapper(model), path)
    loaded = load_model(path)
    assert isinstance(loaded, CLIP) and loaded.config == CLIP_CONFIG
    text = torch.tensor([[3, 9, 0, 0, 0], [12, 1, 4, 0, 0]])
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded(text, images), model(text, images))
    assert torch.equal(loaded.score(text, images), model.score(text, images))


def test_save_rejects_what_cannot_be_loaded_back(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a registered model kind"):
        save_model(nn.Linear(2, 2), str(tmp_path / "x.pt"))
    with pytest.raises(TypeError, match=r"extra\.when: datetime is not plain data"):
        save_model(DiscreteVAE(VAE_CONFIG), str(tmp_path / "x.pt"), extra={"when": datetime.datetime.now()})
    assert not (tmp_path / "x.pt").exists()


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_model(str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="not a self-describing checkpoint"):
        load_model(str(tmp_path / "bare.pt"))
    torch.save({"kind": "GAN", "config": {}, "state_dict": {}}, tmp_path / "gan.pt")
    with pytest.raises(ValueError, match="unknown model kind 'GAN'"):
        load_model(str(tmp_path / "gan.pt"))
    torch.save({"kind": "DiscreteVAE", "config": {"num_tokens": 1}, "state_dict": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"DiscreteVAE\.num_tokens"):
        load_model(str(tmp_path / "bad.pt"))


def test_dalle_kind_round_trip(tmp_path: Path) -> None:
    from dalle_core.config import DALLEConfig
    from dalle_core.dalle import DALLE

    config = DALLEConfig(num_text_tokens=50, text_seq_len=6, num_image_tokens=20, image_fmap_size=3, dim=32,
                         depth=2, heads=2, dim_head=16, attn_types=["full", "axial_row"])
    torch.manual_seed(0)
    model = DALLE(config).eval()
    text = torch.tensor([[5, 7, 0, 0, 0, 0]])
    codes = torch.randint(0, 20, (1, 9))
    for name in ("dalle.pt", "dalle.safetensors"):
        path = str(tmp_path / name)
        save_model(model, path)
        loaded = load_model(path)
        assert isinstance(loaded, DALLE) and loaded.config == config
        assert torch.equal(loaded(text, codes), model(text, codes))


def test_fsspec_urls_take_the_remote_branch() -> None:
    """memory:// exercises the non-local write/read path that s3:// uses (s3 itself is tested with moto)."""
    from dalle_core.tokenizer import BPETokenizer

    torch.manual_seed(0)
    model = DiscreteVAE(VAE_CONFIG)
    for url in ("memory://ckpt/vae.pt", "memory://ckpt/vae.safetensors"):
        digest = save_model(model, url, extra={"step": 1})
        assert file_sha256(url) == digest
        loaded, extra = load_model_with_extra(url)
        assert extra == {"step": 1} and torch.equal(loaded.codebook.weight, model.codebook.weight)

    tok = BPETokenizer.train(["a red square", "a blue circle"] * 5, "memory://tok/bpe.model", 32, 8)
    again = BPETokenizer.load("memory://tok/bpe.model", text_seq_len=8)
    assert again.model_hash == tok.model_hash == file_sha256("memory://tok/bpe.model")
    assert again.decode(again.encode(["A Blue square"])[0]) == "a blue square"


def test_weights_in_hand_save_in_their_dtype_and_load_without_a_random_init(tmp_path: Path, monkeypatch) -> None:
    """What a trainer writes from gathered weights (no model built to hold them): a bf16 file is half the bytes
    and loads into the model's fp32 parameters; loading draws no random init and leaves the caller's RNG alone."""
    from dalle_core.checkpoint import save_weights
    from dalle_core.config import DALLEConfig
    from dalle_core.dalle import DALLE

    config = DALLEConfig(num_text_tokens=50, text_seq_len=6, num_image_tokens=20, image_fmap_size=3, dim=32,
                         depth=2, heads=2, dim_head=16)
    torch.manual_seed(0)
    state = DALLE(config).state_dict()
    fp32, bf16 = str(tmp_path / "fp32.safetensors"), str(tmp_path / "bf16.safetensors")
    save_weights("DALLE", config, state, fp32, extra={"step": 4})
    save_weights("DALLE", config, {k: v.bfloat16() for k, v in state.items()}, bf16, extra={"step": 4})
    assert 0.45 < Path(bf16).stat().st_size / Path(fp32).stat().st_size < 0.55

    draws = []
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *a, **k: draws.append(t.shape) or t)
    rng = torch.get_rng_state()
    exact, extra = load_model_with_extra(fp32)
    rounded = load_model(bf16)
    assert draws == [] and torch.equal(torch.get_rng_state(), rng) and extra == {"step": 4}
    for name, value in state.items():
        assert torch.equal(exact.state_dict()[name], value)
        assert rounded.state_dict()[name].dtype == torch.float32
        assert torch.equal(rounded.state_dict()[name], value.bfloat16().float())


def test_remote_model_is_streamed_not_read_whole(s3_bucket: str, monkeypatch) -> None:
    """An s3:// model goes through a local file (memory-mapped), never a whole-file read into memory."""
    import dalle_core.checkpoint as checkpoint

    torch.manual_seed(0)
    model = DiscreteVAE(VAE_CONFIG)
    url = f"{s3_bucket}/models/vae.safetensors"
    save_model(model, url)
    monkeypatch.setattr(checkpoint, "read_bytes", lambda path: pytest.fail(f"read whole: {path}"))
    assert torch.equal(load_model(url).codebook.weight, model.codebook.weight)


def test_copy_file_is_server_side_on_one_store_and_streams_elsewhere(s3_bucket: str, tmp_path: Path) -> None:
    from dalle_core.io import copy_file, read_bytes, write_bytes

    data = bytes(range(256)) * 4096  # 1 MiB, several chunks of 64 KiB
    write_bytes(f"{s3_bucket}/a/model.safetensors", data)
    assert copy_file(f"{s3_bucket}/a/model.safetensors", f"{s3_bucket}/b/model.safetensors") == 0  # CopyObject
    assert read_bytes(f"{s3_bucket}/b/model.safetensors") == data
    local = tmp_path / "down" / "model.safetensors"
    assert copy_file(f"{s3_bucket}/b/model.safetensors", str(local), chunk_bytes=1 << 16) == len(data)
    assert local.read_bytes() == data and [p.name for p in local.parent.iterdir()] == ["model.safetensors"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        copy_file(f"{s3_bucket}/missing", str(tmp_path / "x"))
