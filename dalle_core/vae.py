"""The discrete VAE (stage one): images <-> grids of codebook ids.

Semantics follow DALLE-pytorch's ``DiscreteVAE``: a stride-2 conv encoder (optionally followed by residual
blocks) ends in a 1x1 conv giving ``num_tokens`` logits per cell; training relaxes the categorical choice
with gumbel-softmax at a temperature (hard one-hot with straight-through gradients if asked), mixes codebook
vectors with it and decodes with transposed convs. Loss = reconstruction (MSE or smooth-L1) +
``kl_div_loss_weight`` * KL(q || uniform) + ``diversity_loss_weight`` * (log N - entropy of the batch's mean
code distribution). The last term (wav2vec 2.0's diversity loss) counters codebook collapse, where every cell of
every picture picks among a handful of codes, without pushing any single cell towards a blurred choice as a
strong KL term does. At inference the code of a cell is the argmax of its logits.

Images enter and leave in [0, 1]; internally they live in [-1, 1].
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core.config import VAEConfig, check
from dalle_core.image_tokenizer import ImageTokenizer


class ResBlock(nn.Module):
    """conv3x3 -> relu -> conv3x3 -> relu -> conv1x1, plus the input."""

    def __init__(self, chan: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(chan, chan, 3, padding=1), nn.ReLU(),
            nn.Conv2d(chan, chan, 3, padding=1), nn.ReLU(),
            nn.Conv2d(chan, chan, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + x


class VAELoss(NamedTuple):
    """The parts of one training step, so jobs can log reconstruction and KL separately."""

    loss: Tensor
    recon_loss: Tensor
    kl_div: Tensor
    diversity: Tensor  # log N - entropy of the mean code distribution: 0 when codes are used evenly
    recons: Tensor  # [B, C, H, W] in [0, 1], not clamped (gradients flow through it)
    codes: Tensor  # [B, image_seq_len] argmax codes of this pass (what get_codebook_indices would return)


class DiscreteVAE(ImageTokenizer):
    """Stage-one image tokenizer; ``config.image_seq_len`` codes per image, ids in ``[0, num_tokens)``."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        config.validate()
        check(config.kind == "DiscreteVAE", "vae.kind", f"is {config.kind}: that tokenizer is imported with "
              "jobs/import_model.py and loaded from paths.vae, never built or trained here")
        self.config = config
        hidden, layers = config.hidden_dim, config.num_layers
        has_res = config.num_resnet_blocks > 0

        enc: list[nn.Module] = []
        dec: list[nn.Module] = []
        enc_in = config.channels
        for _ in range(layers):
            enc += [nn.Conv2d(enc_in, hidden, 4, stride=2, padding=1), nn.ReLU()]
            enc_in = hidden
        enc += [ResBlock(hidden) for _ in range(config.num_resnet_blocks)]
        enc.append(nn.Conv2d(hidden, config.num_tokens, 1))

        if has_res:
            dec.append(nn.Conv2d(config.codebook_dim, hidden, 1))
            dec += [ResBlock(hidden) for _ in range(config.num_resnet_blocks)]
        dec_in = hidden if has_res else config.codebook_dim
        for _ in range(layers):
            dec += [nn.ConvTranspose2d(dec_in, hidden, 4, stride=2, padding=1), nn.ReLU()]
            dec_in = hidden
        dec.append(nn.Conv2d(hidden, config.channels, 1))

        self.codebook = nn.Embedding(config.num_tokens, config.codebook_dim)
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    @property
    def pixel_range(self) -> str:
        return "minus1_1"

    def logits(self, images: Tensor) -> Tensor:
        """Per-cell code logits ``[B, num_tokens, fmap, fmap]`` for images in [0, 1]."""
        self._check_images(images)
        return self.encoder(images * 2 - 1)

    def encode_grid(self, images: Tensor) -> Tensor:
        return self.logits(images).argmax(dim=1)

    def _decode_embeds(self, embeds: Tensor) -> Tensor:
        """Decoder output mapped back from [-1, 1] to [0, 1] (unclamped)."""
        return (self.decoder(embeds) + 1) / 2

    def decode_grid(self, codes: Tensor) -> Tensor:
        return self._decode_embeds(self.codebook(codes).permute(0, 3, 1, 2))

    def compute_loss(self, images: Tensor, temp: float | None = None, argmax_codes: bool = False) -> VAELoss:
        """One training pass returning total, reconstruction and KL-to-uniform losses.

        By default the decoder sees gumbel-softmax mixtures of codebook vectors at ``temp``. With
        ``argmax_codes`` it sees the argmax codes of a frozen encoder (no gradient reaches it), which is the path
        ``decode(encode(x))`` takes after training: a last phase on it trains the decoder and codebook for the
        codes they will actually be given instead of noisy mixtures of them."""
        with torch.no_grad() if argmax_codes else contextlib.nullcontext():
            logits = self.logits(images)
        codes = logits.detach().argmax(dim=1)
        if argmax_codes:
            recons = self.decode_grid(codes)
        else:
            temp = self.config.temperature if temp is None else temp
            soft_one_hot = F.gumbel_softmax(logits, tau=temp, dim=1, hard=self.config.straight_through)
            recons = self._decode_embeds(torch.einsum("bnhw,nd->bdhw", soft_one_hot, self.codebook.weight))
        loss_fn = F.smooth_l1_loss if self.config.smooth_l1_loss else F.mse_loss
        recon_loss = loss_fn(recons * 2 - 1, images * 2 - 1)  # measured in [-1, 1], as the reference does
        # KL(q || uniform), summed over cells and codes, averaged over the batch ("batchmean").
        log_q = F.log_softmax(logits, dim=1)
        q = log_q.exp()
        kl_div = (q * (log_q + math.log(self.num_tokens))).sum() / images.shape[0]
        mean_q = q.mean(dim=(0, 2, 3))
        diversity = math.log(self.num_tokens) + (mean_q * mean_q.clamp_min(1e-12).log()).sum()
        cfg = self.config
        loss = recon_loss + cfg.kl_div_loss_weight * kl_div + cfg.diversity_loss_weight * diversity
        return VAELoss(loss, recon_loss, kl_div, diversity, recons, codes.flatten(1))

    def forward(self, images: Tensor, return_loss: bool = False, return_recons: bool = False,
                temp: float | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Reconstructions in [0, 1] (clamped); with ``return_loss`` the scalar loss, with both
        ``(loss, recons)``. :meth:`compute_loss` gives the loss parts."""
        parts = self.compute_loss(images, temp)
        if not return_loss:
            return parts.recons.clamp(0, 1)
        if return_recons:
            return parts.loss, parts.recons.clamp(0, 1)
        return parts.loss


def codebook_usage(codes: Tensor, num_tokens: int) -> dict:
    """How well the codebook is used: perplexity (exp of the code entropy; ``num_tokens`` when uniform, 1 when
    one code does everything), dead codes (never used) and the per-code histogram."""
    codes = torch.as_tensor(codes).flatten().long()
    if codes.numel() == 0:
        raise ValueError("codebook_usage needs at least one code")
    if codes.min() < 0 or codes.max() >= num_tokens:
        raise ValueError(f"codes must lie in [0, {num_tokens}), got [{int(codes.min())}, {int(codes.max())}]")
    return histogram_usage(torch.bincount(codes, minlength=num_tokens))


def histogram_usage(histogram: Tensor) -> dict:
    """:func:`codebook_usage` from the per-code counts ``[num_tokens]``: what a trainer keeps on the device
    (a running histogram, no per-step copy of the codes to the host) and reads once per log interval."""
    histogram = torch.as_tensor(histogram).detach().cpu().long()
    if histogram.sum() == 0:
        raise ValueError("codebook_usage needs at least one code")
    probs = histogram[histogram > 0].double() / histogram.sum()
    perplexity = float(torch.exp(-(probs * probs.log()).sum()))
    return {
        "perplexity": perplexity,
        "dead_codes": int((histogram == 0).sum()),
        "histogram": histogram.tolist(),
    }
