"""A VQGAN (taming-transformers' ``VQModel``) as an image tokenizer, loadable from its released files.

Architecture as in taming: a GroupNorm/swish ResNet encoder with attention at chosen resolutions, a 1x1
``quant_conv`` into the codebook space, the nearest codebook entry per cell (squared distance), then
``post_quant_conv`` and the mirrored decoder. Module names equal VQModel's state_dict keys (minus ``loss.*``), so a
Lightning ``.ckpt`` loads directly; :func:`convert_vqgan` reads one without running code from it.
Images enter and leave in [0, 1]; ``pixel_range`` says what the model saw inside (taming 2x-1, dalle-mini [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from dalle_core.config import ConfigError, Section, bound, check, from_dict
from dalle_core.image_tokenizer import ImageTokenizer
from dalle_core.pickles import load_exactly, load_untrusted

PIXEL_RANGES = ("minus1_1", "0_1")
# What a Lightning .ckpt pickles besides tensors: OmegaConf hyper-parameters (whose metadata name typing.Any),
# and Lightning's own classes (PL 1.x keys ``callbacks`` by the ModelCheckpoint class; 2.x AttributeDicts live in
# lightning_fabric / lightning). They come back as inert records; we only read ``state_dict``.
CKPT_INERT = ("omegaconf", "typing", "pytorch_lightning", "lightning", "lightning_fabric")
_TAMING_DDCONFIG_DEFAULTS = {"ch_mult": [1, 2, 4, 8], "dropout": 0.0, "double_z": True}  # taming's kwarg defaults
_IGNORED_PARAMS = {"lossconfig", "ckpt_path", "ignore_keys", "image_key", "monitor", "sane_index_shape"}


@dataclass
class VQGANConfig(Section):
    """taming's ``ddconfig`` plus the codebook; defaults are the f16 16384-code ImageNet model."""

    ch: int = bound(128, ge=32)
    out_ch: int = bound(3, ge=1)
    ch_mult: list[int] = bound(factory=lambda: [1, 1, 2, 2, 4], nonempty=True)
    num_res_blocks: int = bound(2, ge=1)
    attn_resolutions: list[int] = bound(factory=lambda: [16])
    resolution: int = bound(256, ge=8)
    in_channels: int = bound(3, ge=1)
    z_channels: int = bound(256, ge=1)
    dropout: float = bound(0.0, ge=0.0, lt=1.0)
    n_embed: int = bound(16384, ge=2)
    embed_dim: int = bound(256, ge=1)
    pixel_range: str = bound("minus1_1", choices=PIXEL_RANGES)

    @property
    def num_tokens(self) -> int:
        return self.n_embed

    @property
    def image_size(self) -> int:
        return self.resolution

    @property
    def channels(self) -> int:
        return self.in_channels

    @property
    def fmap_size(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def image_seq_len(self) -> int:
        return self.fmap_size**2

    def check(self, name: str) -> None:
        check(self.ch % 32 == 0, f"{name}.ch", f"must be a multiple of 32 (GroupNorm has 32 groups), got {self.ch}")
        check(all(m >= 1 for m in self.ch_mult), f"{name}.ch_mult", f"entries must be >= 1, got {self.ch_mult}")
        check(all(r >= 1 for r in self.attn_resolutions), f"{name}.attn_resolutions",
              f"entries must be >= 1, got {self.attn_resolutions}")
        step = 2 ** (len(self.ch_mult) - 1)
        check(self.resolution % step == 0, f"{name}.resolution",
              f"must be divisible by {step} (len(ch_mult)-1 downsamplings), got {self.resolution}")
        check(self.out_ch == self.in_channels, f"{name}.out_ch",
              f"must equal in_channels {self.in_channels} to decode images, got {self.out_ch}")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus the input (1x1 ``nin_shortcut`` when the width changes)."""

    def __init__(self, c_in: int, c_out: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all cells, with 1x1 convs as projections."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [B, hw, c]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Resample(nn.Module):
    """taming's Downsample (pad right/bottom, stride-2 conv3x3) or Upsample (nearest x2, conv3x3)."""

    def __init__(self, c: int, up: bool) -> None:
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Level(nn.Module):
    """One resolution: res blocks, each followed by attention when the resolution asks for it."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attn: bool, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, dropout) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks if attn else 0))

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Middle(nn.Module):
    def __init__(self, c: int, dropout: float) -> None:
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Pixels -> ``z_channels`` features at ``fmap_size``."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, c_in = cfg.resolution, cfg.ch
        for i, c_out in enumerate(widths):
            level = Level(c_in, c_out, cfg.num_res_blocks, res in cfg.attn_resolutions, cfg.dropout)
            if i != len(widths) - 1:
                level.downsample = Resample(c_out, up=False)
                res //= 2
            self.down.append(level)
            c_in = c_out
        self.mid = Middle(c_in, cfg.dropout)
        self.norm_out, self.conv_out = _norm(c_in), nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """``z_channels`` features -> pixels; ``up[i]`` is level ``i`` (0 = full resolution), run from the last."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c_in, res = widths[-1], cfg.fmap_size
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = Middle(c_in, cfg.dropout)
        levels = []
        for i in reversed(range(len(widths))):
            level = Level(c_in, widths[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions, cfg.dropout)
            if i != 0:
                level.upsample = Resample(widths[i], up=True)
                res *= 2
            levels.insert(0, level)
            c_in = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _norm(c_in), nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Codebook(nn.Module):
    """taming's quantizer at inference: nearest entry by ``|z|^2 + |e|^2 - 2 z.e`` (its formula, so ties agree)."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest(self, z: Tensor) -> Tensor:
        """Codes ``[B, h*w]`` (row-major) for features ``[B, embed_dim, h, w]``."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(1).view(z.shape[0], -1)


class VQGAN(ImageTokenizer):
    """Stage-one image tokenizer with DiscreteVAE's interface; ``config.image_seq_len`` codes per image."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = Codebook(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode_grid(self, images: Tensor) -> Tensor:
        x = images * 2 - 1 if self.config.pixel_range == "minus1_1" else images
        return self.quantize.nearest(self.quant_conv(self.encoder(x)))

    @torch.no_grad()
    def decode_grid(self, codes: Tensor) -> Tensor:
        z = self.quantize.embedding(codes).permute(0, 3, 1, 2)
        out = self.decoder(self.post_quant_conv(z))
        return (out + 1) / 2 if self.config.pixel_range == "minus1_1" else out


def _config_from_yaml(model_yaml: str, pixel_range: str) -> VQGANConfig:
    """taming's ``model: {target, params: {embed_dim, n_embed, ddconfig}}`` -> config, refusing what we'd misread."""
    try:
        doc = yaml.safe_load(model_yaml)
    except yaml.YAMLError as exc:
        raise ConfigError(f"model.yaml: not YAML ({exc})") from exc
    model = doc.get("model") if isinstance(doc, dict) else None
    check(isinstance(model, dict), "model", "model.yaml must hold a `model:` mapping")
    target = model.get("target")
    check(target == "taming.models.vqgan.VQModel", "model.target",
          f"must be taming.models.vqgan.VQModel (other taming models quantize differently), got {target!r}")
    params = model.get("params")
    check(isinstance(params, dict), "model.params", "must be a mapping")
    for key, value in params.items():
        check(key in {"embed_dim", "n_embed", "ddconfig"} | _IGNORED_PARAMS or value is None, f"model.params.{key}",
              "not supported (it changes the codes or the weights)")
    for key in ("embed_dim", "n_embed", "ddconfig"):
        check(key in params, f"model.params.{key}", "missing")
    ddconfig = params["ddconfig"]
    check(isinstance(ddconfig, dict), "model.params.ddconfig", "must be a mapping")
    known = set(VQGANConfig.__dataclass_fields__) - {"n_embed", "embed_dim", "pixel_range"} | {"double_z"}
    for key in ddconfig:
        check(key in known, f"model.params.ddconfig.{key}", f"unknown key; expected one of {sorted(known)}")
    dd = {**_TAMING_DDCONFIG_DEFAULTS, **ddconfig}
    check(dd.pop("double_z") is False, "model.params.ddconfig.double_z",
          "must be false: a VQGAN encoder outputs z_channels, not a mean and a variance")
    for key in known - {"double_z"} - set(dd):
        raise ConfigError(f"model.params.ddconfig.{key}: missing (taming has no default for it)")
    return from_dict(VQGANConfig, {**dd, "n_embed": params["n_embed"], "embed_dim": params["embed_dim"],
                                   "pixel_range": pixel_range}, "VQGAN")


def convert_vqgan(ckpt_data: bytes, model_yaml: str, where: str = "vqgan.ckpt",
                  pixel_range: str = "minus1_1") -> VQGAN:
    """A VQGAN (eval mode) from a taming Lightning ``.ckpt``'s bytes and its ``model.yaml`` text, read without
    running code from the file; keys and shapes must match exactly (ValueError names the first that does not)."""
    config = _config_from_yaml(model_yaml, pixel_range)
    ckpt = load_untrusted(ckpt_data, where, CKPT_INERT)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{where}: no state_dict (not a Lightning .ckpt?)")
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    model = VQGAN(config)
    load_exactly(model, state, where, "; does model.yaml describe this checkpoint?")
    return model.eval()
