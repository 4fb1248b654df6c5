"""DiscreteVAE: shapes, gumbel/straight-through, loss parts, a tiny trained round trip, codebook usage."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from dalle_core.config import VAEConfig
from dalle_core.vae import DiscreteVAE, codebook_usage

PALETTE = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1], [0, 0, 0]],
                       dtype=torch.float)


def flat_squares(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 images made of four flat 8x8 squares, each one of the 8 palette colours; returns (images,
    colour index per square [n, 2, 2])."""
    colours = torch.randint(0, len(PALETTE), (n, 2, 2), generator=generator)
    images = PALETTE[colours].permute(0, 3, 1, 2).repeat_interleave(8, 2).repeat_interleave(8, 3)
    return images, colours


def tiny_config(**overrides) -> VAEConfig:
    base = dict(image_size=16, num_tokens=32, codebook_dim=16, num_layers=2, num_resnet_blocks=0, hidden_dim=32)
    return VAEConfig(**{**base, **overrides})


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Other processes share the two cores; one intra-op thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained() -> DiscreteVAE:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # one stride-2 layer: 8x8 codes of 2x2 pixels; robust across seeds in ~1 s (checked on seeds 0-4)
    model = DiscreteVAE(tiny_config(num_layers=1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(0)
    steps = 200
    for step in range(steps):
        images, _ = flat_squares(16, data)
        loss = model(images, return_loss=True, temp=0.05 ** (step / steps))  # anneal 1 -> 0.05
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(before)
    return model


@pytest.mark.parametrize("resblocks", [0, 2])
def test_shapes_and_ranges(resblocks: int) -> None:
    model = DiscreteVAE(tiny_config(num_resnet_blocks=resblocks, num_layers=2, image_size=32))
    images = torch.rand(3, 3, 32, 32)
    recons = model(images)
    assert recons.shape == images.shape and recons.min() >= 0 and recons.max() <= 1
    assert model.logits(images).shape == (3, 32, 8, 8)
    codes = model.get_codebook_indices(images)
    assert codes.shape == (3, model.image_seq_len) == (3, 64) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 32
    decoded = model.decode(codes)
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1
    loss, recons = model(images, return_loss=True, return_recons=True)
    assert loss.dim() == 0 and recons.shape == images.shape


def test_get_codebook_indices_is_deterministic_and_restores_mode() -> None:
    model = DiscreteVAE(tiny_config()).train()
    images = torch.rand(2, 3, 16, 16)
    first = model.get_codebook_indices(images)
    assert model.training
    assert torch.equal(first, model.get_codebook_indices(images))
    assert torch.equal(first, model.logits(images).argmax(1).flatten(1))


def _decoder_input(model: DiscreteVAE, images: torch.Tensor, temp: float) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.decoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        model(images, return_loss=True, temp=temp).backward()
    finally:
        handle.remove()
    return seen[0].permute(0, 2, 3, 1).reshape(-1, model.config.codebook_dim)


def _distance_to_codebook(model: DiscreteVAE, vectors: torch.Tensor) -> torch.Tensor:
    return (vectors[:, None] - model.codebook.weight.detach()[None]).norm(dim=-1).min(dim=1).values


@pytest.mark.parametrize("straight_through", [True, False])
def test_gumbel_softmax_and_straight_through(straight_through: bool) -> None:
    torch.manual_seed(0)
    model = DiscreteVAE(tiny_config(straight_through=straight_through))
    images = torch.rand(4, 3, 16, 16)
    vectors = _decoder_input(model, images, temp=5.0)
    distance = _distance_to_codebook(model, vectors)
    if straight_through:  # hard one-hot forward: every cell carries exactly one codebook vector...
        assert distance.max() < 1e-5
    else:  # ...while the soft relaxation at a high temperature mixes many of them
        assert distance.min() > 0.1
    # either way gradients reach the encoder through the relaxation
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_low_temperature_soft_samples_approach_one_hot() -> None:
    torch.manual_seed(0)
    model = DiscreteVAE(tiny_config())
    images = torch.rand(4, 3, 16, 16)
    hot = _distance_to_codebook(model, _decoder_input(model, images, temp=5.0)).mean()
    cold = _distance_to_codebook(model, _decoder_input(model, images, temp=0.01)).mean()
    assert cold < hot / 10


@pytest.mark.parametrize("smooth_l1", [False, True])
def test_loss_parts_and_kl_weight(smooth_l1: bool) -> None:
    images = torch.rand(2, 3, 16, 16)
    torch.manual_seed(0)
    plain = DiscreteVAE(tiny_config(smooth_l1_loss=smooth_l1))
    weighted = DiscreteVAE(tiny_config(smooth_l1_loss=smooth_l1, kl_div_loss_weight=2.0))
    weighted.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    a = plain.compute_loss(images)
    torch.manual_seed(1)
    b = weighted.compute_loss(images)
    loss_fn = F.smooth_l1_loss if smooth_l1 else F.mse_loss
    assert torch.allclose(a.recon_loss, loss_fn(a.recons * 2 - 1, images * 2 - 1))
    assert torch.allclose(a.loss, a.recon_loss)
    assert a.kl_div > 0
    assert torch.allclose(b.loss, a.loss + 2.0 * a.kl_div)
    torch.manual_seed(1)
    assert torch.allclose(weighted(images, return_loss=True), b.loss)


def test_kl_is_zero_for_uniform_code_distribution() -> None:
    model = DiscreteVAE(tiny_config())
    last = model.encoder[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    assert model.compute_loss(torch.rand(2, 3, 16, 16)).kl_div.abs() < 1e-5


def test_bad_shapes_raise_clear_errors() -> None:
    model = DiscreteVAE(tiny_config())
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 16, 16\]"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"codes must be \[B, 16\]"):
        model.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        model.decode(torch.full((1, 16), 32))


def test_trained_round_trip_keeps_colours(trained: DiscreteVAE, one_thread: None) -> None:
    images, colours = flat_squares(64, torch.Generator().manual_seed(123))
    codes = trained.get_codebook_indices(images)
    decoded = trained.decode(codes)
    mse = F.mse_loss(decoded, images).item()
    assert mse < 0.01, mse
    # the dominant colour of every 8x8 square survives encode -> decode
    means = F.avg_pool2d(decoded, 8).permute(0, 2, 3, 1)  # [n, 2, 2, 3]
    nearest = torch.cdist(means.reshape(-1, 3), PALETTE).argmin(dim=1).view(64, 2, 2)
    assert torch.equal(nearest, colours)
    # 8 colours need at least 8 distinct codes
    usage = codebook_usage(codes, trained.num_tokens)
    assert usage["perplexity"] > 6 and usage["dead_codes"] <= 32 - 8


def test_codebook_usage_known_inputs() -> None:
    uniform = codebook_usage(torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]), num_tokens=8)
    assert uniform["perplexity"] == pytest.approx(4.0)
    assert uniform["dead_codes"] == 4
    assert uniform["histogram"] == [2, 2, 2, 2, 0, 0, 0, 0]
    collapsed = codebook_usage(torch.full((10,), 5), num_tokens=6)
    assert collapsed["perplexity"] == pytest.approx(1.0) and collapsed["dead_codes"] == 5
    skewed = codebook_usage(torch.tensor([0, 0, 0, 1]), num_tokens=2)
    assert skewed["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        codebook_usage(torch.tensor([0, 4]), num_tokens=4)
    with pytest.raises(ValueError, match="at least one code"):
        codebook_usage(torch.tensor([], dtype=torch.long), num_tokens=4)


def test_diversity_term_is_zero_for_even_use_and_weighted_into_the_loss() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    plain = DiscreteVAE(tiny_config())
    even = plain.compute_loss(images)
    assert 0 <= float(even.diversity.detach()) < math.log(plain.num_tokens)
    weighted = DiscreteVAE(tiny_config(diversity_loss_weight=0.5))
    weighted.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    a = plain.compute_loss(images)
    torch.manual_seed(1)
    b = weighted.compute_loss(images)
    assert torch.allclose(b.loss, a.loss + 0.5 * a.diversity)
    with torch.no_grad():  # every cell certain of code 0: the batch uses one code, the most collapsed case
        last = plain.encoder[-1]
        last.weight.zero_()
        last.bias.copy_(torch.where(torch.arange(plain.num_tokens) == 0, 50.0, -50.0))
    assert float(plain.compute_loss(images).diversity.detach()) == pytest.approx(math.log(plain.num_tokens), abs=1e-3)


def test_loss_pass_reports_the_codes_get_codebook_indices_gives() -> None:
    torch.manual_seed(0)
    model = DiscreteVAE(tiny_config())
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(model.compute_loss(images).codes, model.get_codebook_indices(images))


def test_argmax_code_pass_trains_the_decoder_on_what_decode_encode_gives() -> None:
    """The last training phase: the decoder sees the codes inference gives it, and the encoder learns nothing."""
    torch.manual_seed(0)
    model = DiscreteVAE(tiny_config(num_resnet_blocks=1))
    images = torch.rand(3, 3, 16, 16)
    parts = model.compute_loss(images, argmax_codes=True)
    expected = model.decode(model.get_codebook_indices(images))
    torch.testing.assert_close(parts.recons.clamp(0, 1), expected, rtol=0, atol=1e-6)
    parts.loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    used = parts.codes.unique()
    assert model.codebook.weight.grad[used].abs().sum(dim=1).min() > 0  # the codes it was given learn
    model.zero_grad()
    model.compute_loss(images).loss.backward()  # the gumbel pass still trains the encoder
    assert all(p.grad is not None for p in model.encoder.parameters())
