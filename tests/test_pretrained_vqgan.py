"""VQGAN: equal to taming's own modules on a Lightning-style .ckpt, save/load round trip, refusals."""

from __future__ import annotations

import io
import pickle
import sys
import types

import pytest
import torch
import yaml
from conftest import RunsCodeWhenUnpickled
from omegaconf import OmegaConf
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2

from dalle_core.checkpoint import load_model, save_model
from dalle_core.config import from_dict, to_dict
from dalle_core.vqgan import VQGAN, VQGANConfig, convert_vqgan

DDCONFIG = dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
PARAMS = dict(embed_dim=16, n_embed=64, ddconfig=DDCONFIG, lossconfig={"target": "x.Loss", "params": {}})


def model_yaml(**dd) -> str:
    params = {**PARAMS, "ddconfig": {**DDCONFIG, **dd}}
    return yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": params}})


def pictures() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ramp = torch.linspace(0, 1, 32).expand(3, 32, 32)
    checker = ((torch.arange(32)[:, None] // 4 + torch.arange(32) // 4) % 2).float().expand(3, 32, 32)
    return torch.cat([torch.rand(3, 3, 32, 32, generator=g), torch.stack([ramp, checker, ramp.transpose(1, 2)])])


class ModelCheckpoint:  # what PL 1.x keys ``callbacks`` by; pickled under its real module name
    __module__ = "pytorch_lightning.callbacks.model_checkpoint"


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = dict(encoder=Encoder(**DDCONFIG), decoder=Decoder(**DDCONFIG), quantize=VectorQuantizer2(64, 16, beta=0.25),
               quant_conv=torch.nn.Conv2d(8, 16, 1), post_quant_conv=torch.nn.Conv2d(16, 8, 1))
    with torch.no_grad():
        for m in ref.values():
            m.eval()
            for p in m.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))  # norms and biases away from their init
        z = ref["quant_conv"](ref["encoder"](torch.rand(4, 3, 32, 32) * 2 - 1)).permute(0, 2, 3, 1).reshape(-1, 16)
        ref["quantize"].embedding.weight.copy_(z[torch.randperm(len(z))[:64]] + 0.01 * torch.randn(64, 16))
    state = {f"{name}.{k}": v for name, m in ref.items() for k, v in m.state_dict().items()}
    state |= {"loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4), "loss.logvar": torch.zeros(())}
    return ref, state


def ckpt_bytes(state: dict, **extra) -> bytes:
    pl = {n: types.ModuleType(n) for n in ("pytorch_lightning", "pytorch_lightning.callbacks",
                                           "pytorch_lightning.callbacks.model_checkpoint")}
    pl["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    buf = io.BytesIO()
    saved = {n: sys.modules.get(n) for n in pl}
    sys.modules.update(pl)
    try:
        torch.save({"epoch": 3, "global_step": 100, "pytorch-lightning_version": "1.0.8", "state_dict": state,
                    "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
                    "hyper_parameters": OmegaConf.create(PARAMS), **extra}, buf)
    finally:
        for n, m in saved.items():
            sys.modules.pop(n) if m is None else sys.modules.__setitem__(n, m)
    return buf.getvalue()


@torch.no_grad()
def ref_codes_and_pixels(ref: dict, images: torch.Tensor, minus1_1: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = images * 2 - 1 if minus1_1 else images
    _, _, (_, _, idx) = ref["quantize"](ref["quant_conv"](ref["encoder"](x)))
    codes = idx.view(len(images), -1)
    zq = ref["quantize"].get_codebook_entry(idx.flatten(), (len(images), 16, 16, 16))
    out = ref["decoder"](ref["post_quant_conv"](zq))
    return codes, ((out + 1) / 2 if minus1_1 else out).clamp(0, 1)


@pytest.mark.parametrize("pixel_range", ["minus1_1", "0_1"])
def test_matches_taming(reference, pixel_range: str) -> None:
    ref, state = reference
    model = convert_vqgan(ckpt_bytes(state), model_yaml(), pixel_range=pixel_range)
    assert not model.training and model.image_seq_len == 256 and model.num_tokens == 64
    images = pictures()
    want_codes, want_pixels = ref_codes_and_pixels(ref, images, pixel_range == "minus1_1")
    codes = model.get_codebook_indices(images)
    assert codes.dtype == torch.long and codes.unique().numel() > 8
    assert torch.equal(codes, want_codes)
    torch.testing.assert_close(model.decode(codes), want_pixels, atol=1e-5, rtol=1e-5)


def test_round_trip_and_config(reference, tmp_path) -> None:
    model = convert_vqgan(ckpt_bytes(reference[1]), model_yaml())
    assert from_dict(VQGANConfig, to_dict(model.config), "VQGAN") == model.config
    save_model(model, str(tmp_path / "vqgan.pt"))
    loaded = load_model(str(tmp_path / "vqgan.pt"))
    assert isinstance(loaded, VQGAN) and loaded.config == model.config
    assert torch.equal(loaded.get_codebook_indices(pictures()), model.get_codebook_indices(pictures()))
    with pytest.raises(ValueError, match="VQGAN.ch"):
        from_dict(VQGANConfig, {"ch": 48}, "VQGAN")


def test_refusals(reference, tmp_path) -> None:
    state = reference[1]
    marker = tmp_path / "ran"
    with pytest.raises(pickle.UnpicklingError, match="builtins.exec"):
        convert_vqgan(ckpt_bytes(state, evil=RunsCodeWhenUnpickled(str(marker))), model_yaml())
    assert not marker.exists()
    partial = {k: v for k, v in state.items() if k != "encoder.conv_in.bias"}
    with pytest.raises(ValueError, match="encoder.conv_in.bias"):
        convert_vqgan(ckpt_bytes(partial), model_yaml())
    with pytest.raises(ValueError, match="ddconfig.double_z"):
        convert_vqgan(b"", model_yaml(double_z=True))
    with pytest.raises(ValueError, match="ddconfig.give_pre_end"):
        convert_vqgan(b"", model_yaml(give_pre_end=True))
    model = convert_vqgan(ckpt_bytes(state), model_yaml())
    with pytest.raises(ValueError, match="lie in"):
        model.decode(torch.full((1, 256), 64))
    with pytest.raises(ValueError, match="codes must be"):
        model.decode(torch.zeros(1, 255, dtype=torch.long))
    with pytest.raises(ValueError, match="images must be"):
        model.get_codebook_indices(torch.rand(1, 3, 16, 16))
