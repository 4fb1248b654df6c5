"""What every image tokenizer (our DiscreteVAE, OpenAI's dVAE, a taming VQGAN) shares: pictures in [0, 1] <->
``image_seq_len`` codes in ``[0, num_tokens)``, row-major over a ``fmap_size`` x ``fmap_size`` grid.

Pretokenize, generation and evaluation only use this interface, so any kind can sit at ``paths.vae``. A subclass
supplies ``config`` (with ``num_tokens``, ``image_size``, ``channels``, ``fmap_size``, ``image_seq_len``),
``pixel_range`` and the two maps between a checked batch and the code grid.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ImageTokenizer(nn.Module):
    """Checks shapes and ranges once for all kinds and runs encoding in eval mode without gradients."""

    config: object

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def image_seq_len(self) -> int:
        return self.config.image_seq_len

    @property
    def pixel_range(self) -> str:
        """What the network sees inside (pictures enter and leave in [0, 1]); manifests record it."""
        return self.config.pixel_range

    def _check_images(self, images: Tensor) -> None:
        c, size = self.config.channels, self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, size, size):
            raise ValueError(f"images must be [B, {c}, {size}, {size}], got {tuple(images.shape)}")

    def encode_grid(self, images: Tensor) -> Tensor:
        """Codes ``[B, fmap, fmap]`` (or already flat, row-major) for checked pictures in [0, 1]."""
        raise NotImplementedError

    def decode_grid(self, codes: Tensor) -> Tensor:
        """Pictures ``[B, C, H, W]`` in about [0, 1] (unclamped) from checked codes ``[B, fmap, fmap]``."""
        raise NotImplementedError

    @torch.no_grad()
    def get_codebook_indices(self, images: Tensor) -> torch.LongTensor:
        """Codes ``[B, image_seq_len]`` (row-major) for pictures in [0, 1], computed in eval mode."""
        self._check_images(images)
        was_training = self.training
        self.eval()
        try:
            return self.encode_grid(images).flatten(1)
        finally:
            self.train(was_training)

    def decode(self, codes: Tensor) -> Tensor:
        """Pictures ``[B, C, H, W]`` in [0, 1] (clamped) from codes ``[B, image_seq_len]``."""
        n, fmap = self.config.image_seq_len, self.config.fmap_size
        if codes.dim() != 2 or codes.shape[1] != n:
            raise ValueError(f"codes must be [B, {n}], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_tokens):
            raise ValueError(f"codes must lie in [0, {self.num_tokens}), got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        return self.decode_grid(codes.long().view(-1, fmap, fmap)).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """``decode(get_codebook_indices(images))``: exactly what DALLE's image tokens can express."""
        return self.decode(self.get_codebook_indices(images))
