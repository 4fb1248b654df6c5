"""Retrieval accuracy of a contrastive model (how often the matching partner ranks in the top k), and the
uncertainty of a rate measured on few prompts (pure torch and maths)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def retrieval_accuracy(text_latents: Tensor, image_latents: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Row ``i`` of each ``[N, D]`` latent matrix is a matching pair. Returns text->image and image->text
    top-k accuracy over the whole set (the harder, batch-size independent version of in-batch accuracy).
    Ties count against the model: the true partner must score strictly above every wrong one it beats."""
    sim = text_latents.float() @ image_latents.float().t()
    out = {"num_pairs": float(sim.shape[0])}
    for name, matrix in (("text_to_image", sim), ("image_to_text", sim.t())):
        true = matrix.diagonal()[:, None]
        rank = (matrix >= true).sum(dim=1) - 1  # others scoring at least as high as the true partner
        for k in ks:
            out[f"{name}_top{k}"] = float((rank < k).float().mean())
    return out


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for ``z`` 1.96) of a rate of ``hits`` in ``n`` trials: on 64 prompts a
    measured 84.4% spans 73.6-91.3%, which says how far two runs may differ by chance alone. Unlike the normal
    approximation it stays inside [0, 1] at 0% and 100%."""
    if n <= 0:
        return 0.0, 1.0
    rate, spread = hits / n, z * z / n
    centre = (rate + spread / 2) / (1 + spread)
    half = z * math.sqrt(rate * (1 - rate) / n + spread / (4 * n)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)


def chance_accuracy(num_pairs: int, k: int) -> float:
    """Top-k accuracy of random scores, to read the numbers above against."""
    return min(1.0, k / max(1, num_pairs))


@torch.no_grad()
def encode_pairs(model: torch.nn.Module, text_ids: Tensor, images: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """Text and image latents of a (CLIP-like) model in eval mode, in chunks to bound memory."""
    was_training = model.training
    model.eval()
    texts, imgs = [], []
    for start in range(0, text_ids.shape[0], batch):
        texts.append(model.encode_text(text_ids[start:start + batch]))
        imgs.append(model.encode_image(images[start:start + batch]))
    model.train(was_training)
    return torch.cat(texts), torch.cat(imgs)
