"""OpenAI's dVAE: equal to the dall-e package's own modules saved as the released files, refusals, round trip."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import RunsCodeWhenUnpickled, job_main
from dall_e.decoder import Decoder
from dall_e.encoder import Encoder
from dall_e.utils import map_pixels, unmap_pixels

from dalle_core.checkpoint import load_model, save_model
from dalle_core.openai_dvae import OpenAIDVAE, convert_openai_dvae

# dall_e's smallest valid model; at 64 px the grid is 8x8.
SIZES = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)


def pictures() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    ramp = torch.linspace(0, 1, 64).expand(3, 64, 64)
    checker = ((torch.arange(64)[:, None] // 8 + torch.arange(64) // 8) % 2).float().expand(3, 64, 64)
    return torch.cat([torch.rand(3, 3, 64, 64, generator=g), torch.stack([ramp, checker, ramp.transpose(1, 2)])])


def released_bytes(module: torch.nn.Module) -> bytes:
    """``torch.save(module)``, as OpenAI saved the released files."""
    buf = io.BytesIO()
    torch.save(module, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    enc, dec = Encoder(**SIZES), Decoder(n_init=8, **SIZES)
    with torch.no_grad():
        for m in (enc, dec):
            for name, p in m.named_parameters():
                if name.endswith(".b"):
                    p.add_(0.1 * torch.randn_like(p))  # biases away from their zero init
    return enc.eval(), dec.eval()


@torch.no_grad()
def test_matches_dall_e(reference) -> None:
    enc, dec = reference
    model = convert_openai_dvae(released_bytes(enc), released_bytes(dec), image_size=64)
    assert not model.training and model.num_tokens == 512 and model.image_seq_len == 64
    assert model.pixel_range == "openai_eps_0.1"
    images = pictures()
    want = enc(map_pixels(images)).argmax(1).flatten(1)
    codes = model.get_codebook_indices(images)
    assert codes.dtype == torch.long and codes.unique().numel() > 8
    assert torch.equal(codes, want)
    one_hot = F.one_hot(codes.view(-1, 8, 8), 512).permute(0, 3, 1, 2).float()
    want_pixels = unmap_pixels(torch.sigmoid(dec(one_hot)[:, :3]))
    torch.testing.assert_close(model.decode(codes), want_pixels, atol=1e-5, rtol=1e-5)


def test_round_trip(reference, tmp_path) -> None:
    model = convert_openai_dvae(released_bytes(reference[0]), released_bytes(reference[1]), image_size=64)
    save_model(model, str(tmp_path / "dvae.pt"))
    loaded = load_model(str(tmp_path / "dvae.pt"))
    assert isinstance(loaded, OpenAIDVAE) and loaded.config == model.config
    assert torch.equal(loaded.get_codebook_indices(pictures()), model.get_codebook_indices(pictures()))


def test_refusals(reference, tmp_path) -> None:
    enc, dec = (released_bytes(m) for m in reference)
    marker = tmp_path / "ran"
    evil = io.BytesIO()
    torch.save({"model": RunsCodeWhenUnpickled(str(marker))}, evil)
    with pytest.raises(pickle.UnpicklingError, match="builtins.exec"):
        convert_openai_dvae(evil.getvalue(), dec)
    assert not marker.exists()
    with pytest.raises(ValueError, match="expected dall_e.encoder.Encoder"):
        convert_openai_dvae(dec, enc)
    other = released_bytes(Decoder(n_init=8, n_hid=128, n_blk_per_group=1, vocab_size=512))
    with pytest.raises(ValueError, match="encoder n_hid=64 but decoder n_hid=128"):
        convert_openai_dvae(enc, other)
    with pytest.raises(ValueError, match="OpenAIDVAE.image_size"):
        convert_openai_dvae(enc, dec, image_size=60)
    with pytest.raises(ValueError, match="not a readable torch file"):
        convert_openai_dvae(b"not a pickle", dec)


def test_import_job(reference, tmp_path, capsys) -> None:
    enc, dec = tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"
    enc.write_bytes(released_bytes(reference[0]))
    dec.write_bytes(released_bytes(reference[1]))
    out = tmp_path / "models" / "openai_dvae.pt"
    run = job_main("import_model")
    assert run(["openai", "--encoder", str(enc), "--decoder", str(dec), "--image-size", "64",
                "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["kind"] == "OpenAIDVAE" and printed["dalle"] == {"num_image_tokens": 512, "image_fmap_size": 8}
    assert printed["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert isinstance(load_model(str(out)), OpenAIDVAE)
    assert run(["openai", "--encoder", str(dec), "--decoder", str(enc), "--output", str(tmp_path / "x.pt")]) == 2
    assert "expected dall_e.encoder.Encoder" in capsys.readouterr().err
