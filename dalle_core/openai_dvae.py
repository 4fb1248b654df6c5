"""OpenAI's released DALL-E dVAE (the ``dall-e`` package, 2021) as an image tokenizer, loadable from its files.

Architecture as in ``dall_e``: four groups of bottleneck ResNet blocks (ReLU + convs, the residual scaled by
``1 / n_layers**2``), max-pool between encoder groups and nearest x2 upsampling between decoder groups, so 256 px
-> a 32x32 grid. Encoding is the argmax of the encoder's logits; decoding feeds one-hot codes to the decoder and
reads the sigmoid of its first ``output_channels`` maps (the means of its logit-Laplace output). Pixels are
mapped to ``(1 - 2 eps) x + eps`` before encoding and back after decoding. Parameter names equal ``dall_e``'s
(``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``, ...), so the released modules' tensors load as
they are; :func:`convert_openai_dvae` reads ``encoder.pkl``/``decoder.pkl`` without running code from them.

Unlike ``dall_e`` on CUDA, the convolutions here run in the module's dtype rather than always in fp16.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core.config import ConfigError, Section, bound, check, from_dict
from dalle_core.image_tokenizer import ImageTokenizer
from dalle_core.pickles import Inert, load_exactly, load_untrusted, module_tensors

GROUPS = 4  # dall_e's group_count: three down/up-samplings, so the grid is image_size / 8
# What the released files pickle: dall_e's module classes and torch's own layers (ReLU, MaxPool2d, Upsample, ...).
PKL_INERT = ("dall_e", "torch.nn.modules")


@dataclass
class OpenAIDVAEConfig(Section):
    """``dall_e``'s Encoder/Decoder arguments; defaults are the released 8192-code model."""

    n_hid: int = bound(256, ge=64)
    n_blk_per_group: int = bound(2, ge=1)
    input_channels: int = bound(3, ge=1)
    output_channels: int = bound(3, ge=1)
    vocab_size: int = bound(8192, ge=512, le=65535)
    n_init: int = bound(128, ge=8)
    image_size: int = bound(256, ge=8)
    pixel_eps: float = bound(0.1, ge=0.0, lt=0.5)

    @property
    def num_tokens(self) -> int:
        return self.vocab_size

    @property
    def channels(self) -> int:
        return self.input_channels

    @property
    def fmap_size(self) -> int:
        return self.image_size // 2 ** (GROUPS - 1)

    @property
    def image_seq_len(self) -> int:
        return self.fmap_size**2

    @property
    def pixel_range(self) -> str:
        return f"openai_eps_{self.pixel_eps:g}"

    def check(self, name: str) -> None:
        step = 2 ** (GROUPS - 1)
        check(self.image_size % step == 0, f"{name}.image_size", f"must be divisible by {step}, got {self.image_size}")
        check(self.n_hid % 4 == 0, f"{name}.n_hid", f"must be a multiple of 4 (blocks narrow by 4), got {self.n_hid}")
        check(self.output_channels == self.input_channels, f"{name}.output_channels",
              f"must equal input_channels {self.input_channels} to decode images, got {self.output_channels}")


class Conv(nn.Module):
    """``dall_e.utils.Conv2d``: a same-padded convolution whose parameters are called ``w`` and ``b``."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw**2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class Block(nn.Module):
    """Identity (or 1x1 projection) plus ``post_gain`` times four ReLU+conv layers at a quarter of the width."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, hid, hid, hid, n_out]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, kw in enumerate(kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = Conv(widths[i], widths[i + 1], kw)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(widths: list[int], n_layers: int, kernels: tuple[int, ...], resample: tuple[str, nn.Module] | None
           ) -> nn.Sequential:
    """``len(widths) - 1`` blocks from ``widths[0]`` to ``widths[-1]``, then the optional resampling layer."""
    layers = OrderedDict((f"block_{i + 1}", Block(widths[i], widths[i + 1], n_layers, kernels))
                         for i in range(len(widths) - 1))
    if resample:
        layers[resample[0]] = resample[1]
    return nn.Sequential(layers)


def _stack(cfg: OpenAIDVAEConfig, n_in: int, head: Conv, widths: list[int], kernels: tuple[int, ...],
           resample: tuple[str, type[nn.Module], dict], out: Conv) -> nn.Sequential:
    """``input`` conv, four groups of ``n_blk_per_group`` blocks narrowing/widening through ``widths``
    (resampling after all but the last), then ReLU + the ``output`` conv."""
    n_layers, n = GROUPS * cfg.n_blk_per_group, cfg.n_blk_per_group
    groups, c = OrderedDict([("input", head)]), n_in
    for g, width in enumerate(widths):
        name, cls, kwargs = resample
        groups[f"group_{g + 1}"] = _group([c] + [width] * n, n_layers, kernels,
                                          (name, cls(**kwargs)) if g < GROUPS - 1 else None)
        c = width
    groups["output"] = nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", out)]))
    return nn.Sequential(groups)


class Encoder(nn.Module):
    def __init__(self, cfg: OpenAIDVAEConfig) -> None:
        super().__init__()
        h = cfg.n_hid
        self.blocks = _stack(cfg, h, Conv(cfg.input_channels, h, 7), [h, 2 * h, 4 * h, 8 * h], (3, 3, 3, 1),
                             ("pool", nn.MaxPool2d, {"kernel_size": 2}), Conv(8 * h, cfg.vocab_size, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    def __init__(self, cfg: OpenAIDVAEConfig) -> None:
        super().__init__()
        h = cfg.n_hid
        self.blocks = _stack(cfg, cfg.n_init, Conv(cfg.vocab_size, cfg.n_init, 1), [8 * h, 4 * h, 2 * h, h],
                             (1, 3, 3, 3), ("upsample", nn.Upsample, {"scale_factor": 2, "mode": "nearest"}),
                             Conv(h, 2 * cfg.output_channels, 1))

    def forward(self, z: Tensor) -> Tensor:
        return self.blocks(z)


class OpenAIDVAE(ImageTokenizer):
    """The released dVAE behind the shared tokenizer interface; ``config.image_seq_len`` codes per image."""

    def __init__(self, config: OpenAIDVAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)

    def encode_grid(self, images: Tensor) -> Tensor:
        eps = self.config.pixel_eps
        return self.encoder((1 - 2 * eps) * images + eps).argmax(1)

    @torch.no_grad()
    def decode_grid(self, codes: Tensor) -> Tensor:
        one_hot = F.one_hot(codes, self.config.vocab_size).permute(0, 3, 1, 2).to(self.encoder.blocks.input.w.dtype)
        means = torch.sigmoid(self.decoder(one_hot)[:, : self.config.output_channels])
        eps = self.config.pixel_eps
        return (means - eps) / (1 - 2 * eps)


def _attrs(record: object, where: str, names: tuple[str, ...]) -> dict[str, int]:
    """The named constructor arguments of a pickled ``dall_e`` module (attrs keeps them in ``__dict__``)."""
    state = record.state if isinstance(record, Inert) else None
    if not isinstance(state, dict) or not all(isinstance(state.get(n), int) for n in names):
        raise ValueError(f"{where}: not a pickled dall_e module with {', '.join(names)} ({record!r})")
    if state.get("group_count", GROUPS) != GROUPS:
        raise ValueError(f"{where}: group_count={state['group_count']}, only {GROUPS} is supported")
    return {n: state[n] for n in names}


def convert_openai_dvae(encoder_data: bytes, decoder_data: bytes, where: str = "encoder.pkl",
                        image_size: int = 256, pixel_eps: float = 0.1) -> OpenAIDVAE:
    """An OpenAIDVAE (eval mode) from the bytes of ``encoder.pkl`` and ``decoder.pkl`` (whole pickled
    ``dall_e`` modules), read without running code from them; the two must describe one model."""
    dec_where = where.replace("encoder", "decoder") if "encoder" in where else "decoder.pkl"
    enc = load_untrusted(encoder_data, where, PKL_INERT)
    dec = load_untrusted(decoder_data, dec_where, PKL_INERT)
    if getattr(enc, "cls", "") != "dall_e.encoder.Encoder" or getattr(dec, "cls", "") != "dall_e.decoder.Decoder":
        raise ValueError(f"{where}, {dec_where}: expected dall_e.encoder.Encoder and dall_e.decoder.Decoder, got "
                         f"{getattr(enc, 'cls', type(enc).__name__)} and {getattr(dec, 'cls', type(dec).__name__)}")
    enc_args = _attrs(enc, where, ("n_hid", "n_blk_per_group", "input_channels", "vocab_size"))
    dec_args = _attrs(dec, dec_where, ("n_hid", "n_blk_per_group", "output_channels", "vocab_size", "n_init"))
    for name in ("n_hid", "n_blk_per_group", "vocab_size"):
        if enc_args[name] != dec_args[name]:
            raise ValueError(f"{where}, {dec_where}: encoder {name}={enc_args[name]} but decoder "
                             f"{name}={dec_args[name]}; they are not one model")
    try:
        config = from_dict(OpenAIDVAEConfig, {**enc_args, **dec_args, "image_size": image_size,
                                              "pixel_eps": pixel_eps}, "OpenAIDVAE")
    except ConfigError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    model = OpenAIDVAE(config)
    load_exactly(model.encoder, module_tensors(enc), where)
    load_exactly(model.decoder, module_tensors(dec), dec_where)
    return model.eval()
