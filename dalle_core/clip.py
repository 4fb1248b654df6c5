"""A small CLIP for reranking generated candidates, and the :class:`Scorer` interface reranking uses.

Text: token + learned position embeddings, a pre-norm transformer whose attention ignores pad tokens, then
the mean over non-pad tokens. Image: ViT-style patches plus a class token. Both are projected to
``dim_latent`` and L2-normalised; a learned temperature scales the cosine similarities, and the loss is the
symmetric cross-entropy over the similarity matrix of the global batch: under torch.distributed every rank's
rows are scored against the latents of all ranks (:func:`contrastive_loss`), as CLIP and open_clip train,
since the negatives a row sees are what the contrastive loss learns from.

Anything with ``score(text_ids, images, captions) -> Tensor[B]`` is a :class:`Scorer`: callers pass our BPE ids
and the same texts as strings, so a pretrained CLIP with a tokenizer of its own (``dalle_core.openclip``) reads
the strings.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core.config import CLIPConfig


@runtime_checkable
class Scorer(Protocol):
    """Reranking interface: higher score = caption and image agree better, one score per row."""

    def score(self, text_ids: Tensor, images: Tensor, captions: list[str] | None = None) -> Tensor:
        """``text_ids`` [B, T] long with 0 = pad, ``images`` [B, C, H, W] in [0, 1] -> scores [B]. ``captions``
        are the same texts as strings, for a scorer with its own tokenizer (``dalle_core.openclip``)."""
        ...


class Block(nn.Module):
    """Pre-norm transformer block; attention runs through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, d))
        return x + self.ff(self.norm2(x))


class CLIP(nn.Module):
    """Contrastive text/image model; ``config.text_seq_len`` tokens, ``config.image_size`` square images."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.token_emb = nn.Embedding(c.num_text_tokens, c.dim_text)
        self.text_pos_emb = nn.Parameter(torch.randn(c.text_seq_len, c.dim_text) * 0.02)
        self.text_blocks = nn.ModuleList(Block(c.dim_text, c.heads) for _ in range(c.text_depth))
        self.text_norm = nn.LayerNorm(c.dim_text)
        self.to_text_latent = nn.Linear(c.dim_text, c.dim_latent, bias=False)

        num_patches = (c.image_size // c.patch_size) ** 2
        self.patch_emb = nn.Conv2d(c.channels, c.dim_image, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.randn(c.dim_image) * 0.02)
        self.image_pos_emb = nn.Parameter(torch.randn(num_patches + 1, c.dim_image) * 0.02)
        self.image_blocks = nn.ModuleList(Block(c.dim_image, c.heads) for _ in range(c.image_depth))
        self.image_norm = nn.LayerNorm(c.dim_image)
        self.to_image_latent = nn.Linear(c.dim_image, c.dim_latent, bias=False)

        # log of the inverse temperature, CLIP's initial 1/0.07; clamped at 100 when used.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, text_ids: Tensor) -> Tensor:
        """L2-normalised text latents ``[B, dim_latent]`` from ids ``[B, T]`` (T <= text_seq_len, 0 = pad).

        Attention and pooling ignore pads; an all-pad row (empty caption) pools nothing and maps to zeros."""
        c = self.config
        if text_ids.dim() != 2 or text_ids.shape[1] > c.text_seq_len:
            raise ValueError(f"text_ids must be [B, <= {c.text_seq_len}], got {tuple(text_ids.shape)}")
        if text_ids.numel() and (text_ids.min() < 0 or text_ids.max() >= c.num_text_tokens):
            raise ValueError(f"text ids must lie in [0, {c.num_text_tokens})")
        keep = text_ids != 0
        # A row of pads would give attention nothing to look at (NaN); let it attend to itself instead.
        attend = keep | ~keep.any(dim=1, keepdim=True)
        x = self.token_emb(text_ids) + self.text_pos_emb[: text_ids.shape[1]]
        for block in self.text_blocks:
            x = block(x, attend)
        x = self.text_norm(x)
        weights = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)
        return F.normalize(self.to_text_latent(pooled), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image latents ``[B, dim_latent]`` from images ``[B, C, H, W]`` in [0, 1]."""
        c = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"images must be [B, {c.channels}, {c.image_size}, {c.image_size}], "
                             f"got {tuple(images.shape)}")
        patches = self.patch_emb(images * 2 - 1).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.image_pos_emb
        for block in self.image_blocks:
            x = block(x)
        return F.normalize(self.to_image_latent(self.image_norm(x[:, 0])), dim=-1)

    def temperature_scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def forward(self, text_ids: Tensor, images: Tensor, return_loss: bool = False, valid: Tensor | None = None
                ) -> Tensor:
        """Scaled cosine similarity per (text, image) row pair ``[B]``; with ``return_loss`` the symmetric
        contrastive loss over the global batch (:func:`contrastive_loss`; rows where ``valid`` is False take no
        part). Under torch.distributed every rank must call it with the same ``B``: it gathers collectively."""
        text, image = self.encode_text(text_ids), self.encode_image(images)
        scale = self.temperature_scale()
        if not return_loss:
            return scale * (text * image).sum(-1)
        return contrastive_loss(text, image, scale, valid)

    @torch.no_grad()
    def score(self, text_ids: Tensor, images: Tensor, captions: list[str] | None = None) -> Tensor:
        """Cosine similarity per row pair in [-1, 1] (the :class:`Scorer` interface), computed in eval mode;
        reads ``text_ids`` (our BPE), not ``captions``."""
        was_training = self.training
        self.eval()
        try:
            return (self.encode_text(text_ids) * self.encode_image(images)).sum(-1)
        finally:
            self.train(was_training)


def _gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` stacked in rank order; gradients flow back to each rank's own rows."""
    return torch.cat(dist_nn.all_gather(x))


def contrastive_loss(text: Tensor, image: Tensor, scale: Tensor, valid: Tensor | None = None) -> Tensor:
    """Symmetric cross-entropy of text and image latents ``[B, D]`` (row i's text matches row i's image, every
    other pair of the global batch is a negative); rows with ``valid`` False (pictures that failed to decode,
    kept so every rank has the same ``B``) are neither scored nor negatives.

    With torch.distributed initialised and world > 1 this is open_clip's "local loss": this rank's rows against
    the latents gathered from every rank (labels offset by ``rank * B``), gathered with gradients. The value is
    this rank's share of the global loss, scaled by ``world`` so that the mean over ranks (what the metrics
    report) is the loss of one worker with the whole global batch, and DDP's averaging of the gradients gives
    that worker's gradient. Needs no host sync."""
    n = text.shape[0]
    valid = torch.ones(n, dtype=torch.bool, device=text.device) if valid is None else valid.bool()
    world, offset, all_text, all_image, all_valid = 1, 0, text, image, valid
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world, offset = dist.get_world_size(), dist.get_rank() * n
        all_text, all_image = _gather(text), _gather(image)
        all_valid = _gather(valid.to(text.dtype)) > 0  # the mask needs no gradient; gathered as floats
    labels = torch.where(valid, torch.arange(n, device=text.device) + offset, -100)  # -100: ignored rows
    text_logits, image_logits = scale * text @ all_image.t(), scale * image @ all_text.t()
    floor = torch.finfo(text_logits.dtype).min
    text_logits = text_logits.masked_fill(~all_valid, floor)
    image_logits = image_logits.masked_fill(~all_valid, floor)
    summed = F.cross_entropy(text_logits, labels, reduction="sum") + F.cross_entropy(image_logits, labels,
                                                                                     reduction="sum")
    return summed / 2 * world / all_valid.sum().clamp(min=1)
