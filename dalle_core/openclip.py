"""An ``open_clip`` model as a reranker: any architecture open_clip knows, its weights from a local file.

open_clip brings its own tokenizer and picture size, so this scorer reads the caption strings (not our BPE ids)
and resizes the candidates itself: shorter side to the model's ``image_size`` (bicubic, antialiased), centre
crop, then the model's mean/std. The score is the cosine similarity of the two normalised embeddings, as for our
own CLIP. Only models whose tokenizer open_clip ships (the OpenAI BPE, e.g. ``ViT-B-32``, ``RN50``,
``convnext_base``) are accepted: the others fetch theirs from the Hugging Face hub, which nothing here may do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core.config import ConfigError, Section, bound, check


def _open_clip():
    import open_clip  # imported on use: only this scorer needs it (and, through it, torchvision)

    return open_clip


@dataclass
class OpenCLIPConfig(Section):
    """Which open_clip architecture, and how its pictures are prepared (read from open_clip when imported)."""

    model_name: str = bound("ViT-B-32", nonempty=True)
    image_size: int = bound(224, ge=8)
    context_length: int = bound(77, ge=1)
    mean: list[float] = bound(factory=lambda: [0.48145466, 0.4578275, 0.40821073], nonempty=True)
    std: list[float] = bound(factory=lambda: [0.26862954, 0.26130258, 0.27577711], nonempty=True)

    def check(self, name: str) -> None:
        check(len(self.mean) == len(self.std) == 3, f"{name}.mean", "mean and std need one value per RGB channel")
        config = _open_clip().get_model_config(self.model_name)
        check(config is not None, f"{name}.model_name",
              f"open_clip knows no model {self.model_name!r} (open_clip.list_models() names them)")
        text = config.get("text_cfg", {})
        check(not text.get("hf_tokenizer_name") and not text.get("hf_model_name"), f"{name}.model_name",
              f"{self.model_name} takes its tokenizer from the Hugging Face hub; only models with open_clip's "
              "bundled tokenizer can load offline")


class OpenCLIP(nn.Module):
    """``open_clip.create_model(model_name)`` (random init, no download) behind the ``Scorer`` interface."""

    def __init__(self, config: OpenCLIPConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        open_clip = _open_clip()
        self.model = open_clip.create_model(config.model_name, pretrained=None, pretrained_image=False,
                                            pretrained_text=False, force_context_length=config.context_length)
        self.tokenizer = open_clip.get_tokenizer(config.model_name, context_length=config.context_length)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Pictures ``[B, 3, H, W]`` in [0, 1] -> the model's input: shorter side to ``image_size``, centre crop,
        normalised."""
        size = self.config.image_size
        h, w = images.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            new = (max(size, round(h * scale)), max(size, round(w * scale)))
            images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            images = images[..., top:top + size, left:left + size].clamp(0, 1)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def score(self, text_ids: Tensor, images: Tensor, captions: list[str] | None = None) -> Tensor:
        """Cosine similarity per (caption, picture) row; ``text_ids`` are ignored (open_clip has its own BPE)."""
        if captions is None or len(captions) != len(images):
            raise ValueError(f"OpenCLIP scores caption strings: give one per picture ({len(images)}), got "
                             f"{None if captions is None else len(captions)}")
        was_training = self.training
        self.eval()
        try:
            device = self.mean.device
            text = self.tokenizer(list(captions)).to(device)
            image_features = self.model.encode_image(self.preprocess(images.to(device).float()), normalize=True)
            return (self.model.encode_text(text, normalize=True) * image_features).sum(-1)
        finally:
            self.train(was_training)


def convert_open_clip(state: dict[str, Tensor], model_name: str, where: str = "the checkpoint") -> OpenCLIP:
    """An OpenCLIP (eval mode) of ``model_name`` holding ``state``: an open_clip checkpoint's tensors (the bare
    state_dict or one under ``state_dict``, DDP's ``module.`` prefix allowed); every key and shape must match."""
    from dalle_core.pickles import load_exactly

    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    open_clip = _open_clip()
    try:
        probe = OpenCLIPConfig(model_name=model_name)
        probe.validate()
    except ConfigError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    built = open_clip.create_model(model_name, pretrained=None, pretrained_image=False, pretrained_text=False)
    preprocess = built.visual.preprocess_cfg
    size = preprocess.get("size", built.visual.image_size)
    size = size if isinstance(size, int) else size[0]
    positions = state.get("positional_embedding")
    context = positions.shape[0] if isinstance(positions, Tensor) else built.context_length
    model = OpenCLIP(OpenCLIPConfig(model_name=model_name, image_size=int(size), context_length=int(context),
                                    mean=list(preprocess.get("mean")), std=list(preprocess.get("std"))))
    load_exactly(model.model, state, where, f"; is this a {model_name} checkpoint?")
    return model.eval()
