"""CLIP: pad masking, the Scorer interface, and a tiny model learning a toy colour-matching task."""

from __future__ import annotations

import pytest
import torch

from dalle_core.clip import CLIP, Scorer
from dalle_core.config import CLIPConfig

PALETTE = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1], [0, 0, 0]],
                       dtype=torch.float)


def tiny_config() -> CLIPConfig:
    return CLIPConfig(num_text_tokens=32, text_seq_len=6, image_size=16, patch_size=8, dim_text=32, dim_image=32,
                      dim_latent=32, text_depth=1, image_depth=1, heads=2)


def colour_batch(order: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions "<colour> <filler>" (ids 4+colour, 20+random) padded to 6; noisy flat images of that colour."""
    n = len(order)
    text = torch.zeros(n, 6, dtype=torch.long)
    text[:, 0] = 4 + order
    text[:, 1] = 20 + torch.randint(0, 4, (n,), generator=generator)
    noise = 0.1 * torch.randn(n, 3, 16, 16, generator=generator)
    images = (PALETTE[order][:, :, None, None] + noise).clamp(0, 1)
    return text, images


def test_encoders_are_normalised_and_ignore_padding() -> None:
    torch.manual_seed(0)
    model = CLIP(tiny_config()).eval()
    ids = torch.tensor([[5, 9, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    text = model.encode_text(ids)
    assert text.shape == (3, 32) and torch.isfinite(text).all()
    assert torch.allclose(text[:2].norm(dim=-1), torch.ones(2))
    # pads neither attend nor pool: a shorter tensor without the trailing pads encodes identically
    assert torch.allclose(model.encode_text(ids[:1, :2]), text[:1], atol=1e-6)
    image = model.encode_image(torch.rand(2, 3, 16, 16))
    assert image.shape == (2, 32) and torch.allclose(image.norm(dim=-1), torch.ones(2))


def test_forward_and_score_interfaces() -> None:
    model = CLIP(tiny_config()).train()
    text, images = colour_batch(torch.arange(4), torch.Generator().manual_seed(0))
    sims = model(text, images)
    assert sims.shape == (4,)
    loss = model(text, images, return_loss=True)
    assert loss.dim() == 0 and loss > 0
    scores = model.score(text, images)
    assert model.training and not scores.requires_grad
    assert scores.shape == (4,) and (scores.abs() <= 1 + 1e-6).all()
    assert isinstance(model, Scorer)

    class ConstantScorer:  # anything with score(text_ids, images, captions) satisfies the protocol
        def score(self, text_ids: torch.Tensor, images: torch.Tensor, captions: list[str] | None = None
                  ) -> torch.Tensor:
            return torch.zeros(len(text_ids))

    assert isinstance(ConstantScorer(), Scorer)


def test_rows_marked_invalid_count_as_if_they_were_not_in_the_batch() -> None:
    torch.manual_seed(0)
    model = CLIP(tiny_config())
    text, images = colour_batch(torch.arange(6), torch.Generator().manual_seed(0))
    valid = torch.tensor([True, False, True, True, False, True])
    masked = model(text, images, return_loss=True, valid=valid)
    torch.testing.assert_close(masked, model(text[valid], images[valid], return_loss=True))
    assert model(text, images, return_loss=True, valid=torch.zeros(6, dtype=torch.bool)) == 0  # nothing to learn


def test_bad_inputs_raise_clear_errors() -> None:
    model = CLIP(tiny_config())
    with pytest.raises(ValueError, match=r"text_ids must be \[B, <= 6\]"):
        model.encode_text(torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"text ids must lie in \[0, 32\)"):
        model.encode_text(torch.full((1, 3), 32))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 16, 16\]"):
        model.encode_image(torch.rand(1, 3, 32, 32))


def test_tiny_clip_learns_toy_pairs_and_ranks_the_match_first() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the two cores are shared; one thread avoids oversubscription stalls
    try:
        torch.manual_seed(0)
        model = CLIP(tiny_config())
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        data = torch.Generator().manual_seed(0)
        eval_text, eval_images = colour_batch(torch.arange(8), torch.Generator().manual_seed(99))
        with torch.no_grad():
            initial = model(eval_text, eval_images, return_loss=True).item()
        for _ in range(60):
            text, images = colour_batch(torch.randperm(8, generator=data), data)
            loss = model(text, images, return_loss=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            final = model(eval_text, eval_images, return_loss=True).item()
    finally:
        torch.set_num_threads(before)
    assert final < initial / 4, (initial, final)
    # rerank: for every caption, score it against all 8 images; its own image must come first
    for i in range(8):
        scores = model.score(eval_text[i : i + 1].expand(8, -1), eval_images)
        assert scores.argmax().item() == i


def _loss_and_grads(model: CLIP, text: torch.Tensor, images: torch.Tensor, valid: torch.Tensor | None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(text, images, return_loss=True, valid=valid)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _global_batch_worker(rank: int, world: int, port: int, batch: int) -> None:
    """One gloo rank: the references (one worker, the whole batch) before the process group exists, then DDP on
    this rank's rows; the mean of the ranks' losses and DDP's averaged gradients must match them."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CLIP(tiny_config())
    text, images = colour_batch(torch.arange(world * batch) % 8, torch.Generator().manual_seed(1))
    valid = torch.ones(world * batch, dtype=torch.bool)
    valid[[1, batch + 2]] = False  # a rejected picture on each rank: neither scored nor a negative
    masks = (None, valid)
    references = [_loss_and_grads(model, text, images, mask) for mask in masks]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ddp = DistributedDataParallel(model)
        rows = slice(rank * batch, (rank + 1) * batch)
        for mask, (want_loss, want_grads) in zip(masks, references, strict=True):
            ddp.zero_grad(set_to_none=True)
            loss = ddp(text[rows], images[rows], return_loss=True, valid=None if mask is None else mask[rows])
            loss.backward()  # DDP averages the gradients over the ranks
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            torch.testing.assert_close(mean_loss / world, want_loss, rtol=1e-4, atol=1e-6)
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


def test_loss_and_gradients_cover_the_global_batch_under_ddp() -> None:
    """Two gloo ranks of batch 4 give one worker's loss and gradients for batch 8 (today's per-rank loss would
    see only 3 negatives per row, not 7): CLIP learns from the negatives of the whole global batch."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_global_batch_worker, args=(2, port, 4), nprocs=2, join=True)
