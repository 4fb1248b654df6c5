"""The DALL-E transformer: one causal stream of ``<bos>`` + text + image tokens, and its sampler.

Read top to bottom: position tables (attention patterns, token shift, rotary), the block, the model,
then generation. Sequence layout for a ``text_seq_len`` T and ``image_seq_len`` I::

    position   0      1 .. T        T+1 .. T+I-1
    token      <bos>  text (padded)  image codes 0 .. I-2     (the last image code is only ever a label)

Position ``p`` predicts token ``p + 1``: positions ``< T`` predict text, positions ``>= T`` predict image codes.
Every padded text slot gets its own pad id (``num_text_tokens + slot``) so the model can tell where a short
caption ended. Each attention pattern is defined once, as a boolean matrix over the whole sequence. ``full``
goes to PyTorch's ``scaled_dot_product_attention`` as causal attention. Over a whole sequence (training) the
sparse patterns are computed by :func:`sparse_attention` on the image grid's rows, columns or windows, so only
the keys a pattern allows are ever scored; anything else (a cached sampling step, and ``sparse_attention:
mask``) hands the pattern's rows of the matrix to SDPA, the reference the tests hold the fast paths to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dalle_core.config import DALLEConfig

# ----------------------------------------------------------------------------------------------------------
# Position tables


def attention_mask(kind: str, text_len: int, fmap: int, kernel_size: int = 5) -> Tensor:
    """Boolean ``[seq, seq]`` matrix, True where query ``i`` may attend key ``j``.

    ``text_len`` counts ``<bos>`` + text. Text queries always attend causally over text. Image queries
    attend all text plus, among earlier image tokens: everything (``full``), the same grid row
    (``axial_row``), the same grid column (``axial_col``) or a ``kernel_size`` window (``conv_like``).
    Image token ``k`` sits at position ``text_len + k`` on grid cell ``(k // fmap, k % fmap)``.
    """
    seq = text_len + fmap * fmap - 1
    pos = torch.arange(seq)
    causal = pos[:, None] >= pos[None, :]
    if kind == "full":
        return causal
    img = (pos - text_len).clamp(min=0)
    row, col = img // fmap, img % fmap
    if kind == "axial_row":
        near = row[:, None] == row[None, :]
    elif kind == "axial_col":
        near = col[:, None] == col[None, :]
    elif kind == "conv_like":
        half = kernel_size // 2
        near = ((row[:, None] - row[None, :]).abs() <= half) & ((col[:, None] - col[None, :]).abs() <= half)
    else:
        raise ValueError(f"unknown attention pattern {kind!r}")
    key_is_text = pos[None, :] < text_len
    query_is_text = pos[:, None] < text_len
    return causal & (key_is_text | query_is_text | near)


def sparse_attention(kind: str, q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, kernel_size: int,
                     dropout: float = 0.0) -> Tensor:
    """``attention_mask(kind)`` attention over a whole sequence (``q, k, v [B, H, seq, D]``), scoring only the
    allowed keys: text queries attend causally over text; each image query scores every text key plus the
    earlier image keys of its grid row (``axial_row``), column (``axial_col``) or ``kernel_size`` window
    (``conv_like``), all in one softmax. Attention costs ``image x (text + fmap)`` score entries instead of
    ``seq^2 / 2``, with autograd, on any device, without a ``seq x seq`` matrix.
    """
    b, h, seq, d = q.shape
    scale = d**-0.5
    out_text = F.scaled_dot_product_attention(q[:, :, :text_len], k[:, :, :text_len], v[:, :, :text_len],
                                              is_causal=True, dropout_p=dropout)
    # The image part as a full fmap x fmap grid: the one padded cell is last in raster, row and column order,
    # so only its own (discarded) query could see it.
    pad = text_len + fmap * fmap - seq
    qi, ki, vi = (F.pad(x[:, :, text_len:], (0, 0, 0, pad)).view(b, h, fmap, fmap, d) for x in (q, k, v))
    kt, vt = k[:, :, :text_len], v[:, :, :text_len]
    if kind == "axial_col":  # columns become lines; back to rows at the end
        qi, ki, vi = (x.transpose(2, 3) for x in (qi, ki, vi))
    # Every image query against the text keys as one [cells, text] matmul per head: broadcasting the text keys
    # over the lines instead made a copy per line and 32 small matmuls (the path then cost what `full` does).
    scores_text = (qi.reshape(b, h, fmap * fmap, d) @ kt.transpose(-1, -2)).view(b, h, fmap, fmap, text_len) * scale
    if kind in ("axial_row", "axial_col"):
        scores_local = (qi @ ki.transpose(-1, -2)) * scale  # [B, H, line, query cell, key cell]
        allowed = torch.ones(fmap, fmap, dtype=torch.bool, device=q.device).tril()
    elif kind == "conv_like":  # the window's rows: this one and kernel_size // 2 above it, as one band of keys
        half = kernel_size // 2
        ki, vi = (torch.cat([F.pad(x, (0, 0, 0, 0, half, 0))[:, :, i:i + fmap] for i in range(half + 1)], dim=3)
                  for x in (ki, vi))  # [B, H, row, (half + 1) * fmap, D], the highest row first
        scores_local = (qi @ ki.transpose(-1, -2)) * scale  # [B, H, row, col, band]
        allowed = _band_allowed(fmap, half, q.device)
    else:
        raise ValueError(f"no structured path for attention pattern {kind!r}")
    scores_local = scores_local.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(torch.cat([scores_text, scores_local], dim=-1).float(), dim=-1).to(v.dtype)
    probs = F.dropout(probs, dropout) if dropout > 0 else probs
    p_text, p_local = probs.split([text_len, probs.shape[-1] - text_len], dim=-1)
    out = (p_text.reshape(b, h, fmap * fmap, text_len) @ vt).view(b, h, fmap, fmap, d) + p_local @ vi
    if kind == "axial_col":
        out = out.transpose(2, 3)
    out_image = out.reshape(b, h, fmap * fmap, d)[:, :, : seq - text_len]
    return torch.cat([out_text, out_image], dim=2)


def _band_allowed(fmap: int, half: int, device: torch.device) -> Tensor:
    """``[row, col, (half + 1) * fmap]``: which keys of a cell's band (rows ``row - half .. row``) are in its
    window: inside the grid, within ``half`` columns, and at or before the cell in raster order."""
    cells = torch.arange(fmap, device=device)
    dr = torch.arange(-half, 1, device=device).repeat_interleave(fmap)  # band entry -> row offset, key column
    key_col = cells.repeat(half + 1)
    rows, cols = cells[:, None, None], cells[None, :, None]
    inside = (rows + dr >= 0) & ((key_col - cols).abs() <= half)
    return inside & ((dr < 0) | (key_col <= cols))


def shift_offsets(text_len: int, fmap: int) -> Tensor:
    """``[2, seq]`` look-back distances for token shift (0 = take nothing).

    Text tokens take the first half of their features from the previous token. Image tokens take the first
    quarter from the token above and the second quarter from the token to the left (none across a row edge).
    """
    seq = text_len + fmap * fmap - 1
    pos = torch.arange(seq)
    img = pos - text_len
    is_text = img < 0
    above = torch.where(img >= fmap, fmap, 0)
    left = torch.where((img >= 0) & (img % fmap != 0), 1, 0)
    prev = torch.where(pos >= 1, 1, 0)
    return torch.stack([torch.where(is_text, prev, above), torch.where(is_text, prev, left)])


def rotary_angles(text_len: int, fmap: int, dim_head: int) -> Tensor:
    """``[seq, dim_head // 2]`` rotation angles: half the pairs rotate with the sequence position, a quarter
    with the image row and a quarter with the image column (zero for text), so image tokens know their 2D
    neighbourhood without a learned table."""
    seq = text_len + fmap * fmap - 1
    pos = torch.arange(seq, dtype=torch.float64)
    img = (pos - text_len).clamp(min=-1)
    row = torch.where(img >= 0, torch.div(img, fmap, rounding_mode="floor") + 1, 0)
    col = torch.where(img >= 0, img % fmap + 1, 0)

    def freqs(n: int) -> Tensor:
        return 1.0 / (10000 ** (torch.arange(n, dtype=torch.float64) / n))

    quarter, eighth = dim_head // 4, dim_head // 8
    angles = torch.cat(
        [pos[:, None] * freqs(quarter), row[:, None] * freqs(eighth), col[:, None] * freqs(eighth)], dim=-1
    )
    return angles.float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates feature pairs ``(x[i], x[i + d/2])`` of ``x [..., n, d]`` by the given angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# The block


@dataclass
class LayerCache:
    """Keys and values of every past position, plus the last ``window`` normalised inputs that token shift
    looks back into (one window per sub-layer)."""

    k: Tensor
    v: Tensor
    attn_hist: Tensor
    ff_hist: Tensor


class Block(nn.Module):
    """Pre-norm attention + GEGLU feed-forward, with optional token shift before each sub-layer."""

    def __init__(self, cfg: DALLEConfig, attn_type: str):
        super().__init__()
        inner = cfg.heads * cfg.dim_head
        self.attn_type, self.heads, self.dim_head = attn_type, cfg.heads, cfg.dim_head
        self.attn_dropout, self.shift = cfg.attn_dropout, cfg.shift_tokens
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.to_qkv = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ff_in = nn.Linear(cfg.dim, 2 * cfg.ff_mult * cfg.dim)
        self.ff_out = nn.Linear(cfg.ff_mult * cfg.dim, cfg.dim)
        self.ff_dropout = nn.Dropout(cfg.ff_dropout)

    def _shift(self, x: Tensor, hist: Tensor | None, offsets: Tensor, window: int) -> Tensor:
        """Replaces the first two feature quarters of ``x [B, n, d]`` by those of earlier tokens; ``offsets
        [2, n]`` are the look-back distances. ``hist`` (a cache's) holds the ``window`` normalised inputs before
        ``x`` and is moved on in place to end with ``x`` (the same tensor every step, for a compiled step)."""
        cached = hist is not None
        buf = torch.cat([hist if cached else x.new_zeros(x.shape[0], window, x.shape[-1]), x], dim=1)
        q = x.shape[-1] // 4
        here = torch.arange(x.shape[1], device=x.device) + window
        parts = []
        for i in range(2):
            taken = buf[:, here - offsets[i], i * q:(i + 1) * q]
            parts.append(taken * (offsets[i] > 0)[None, :, None].to(x.dtype))
        out = torch.cat([*parts, x[..., 2 * q:]], dim=-1)
        if cached:
            hist.copy_(buf[:, -window:])
        return out

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, start: int | Tensor, tables: dict[str, Any]) -> Tensor:
        """Attention of queries at positions ``start ..`` over keys ``0 .. start + n - 1`` under this layer's
        pattern, by the cheapest path that computes the same thing. A tensor ``start`` (a static step, see
        :meth:`DALLE.static_step`) reads every key ``k`` holds under that position's row of ``step_masks``."""
        if isinstance(start, Tensor):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=tables["step_masks"][self.attn_type])
        n = q.shape[2]
        dropout = self.attn_dropout if self.training else 0.0
        kind = self.attn_type
        if kind == "full":  # from 0: causal; a cached step: every stored key is in the past
            return F.scaled_dot_product_attention(q, k, v, is_causal=n > 1 and start == 0, dropout_p=dropout)
        if tables["structured"] and start == 0 and n == tables[kind].shape[0]:
            text_len, fmap, kernel_size = tables["grid"]
            return sparse_attention(kind, q, k, v, text_len, fmap, kernel_size, dropout)
        # A cached step (and any other part of a sequence): SDPA over the stored keys under the pattern's rows of
        # the mask. Gathering only the allowed keys first cost more than this on a CPU: index_select over the
        # cache's key dimension ran at ~3 GB/s, 1.7x the masked kernel at 64 rows.
        mask = tables[kind][start:start + n, :start + n]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)

    def forward(self, x: Tensor, start: int | Tensor, tables: dict[str, Any], cache: LayerCache | None) -> Tensor:
        """``x [B, n, dim]`` holds positions ``start .. start + n - 1``: a Python int, so the block compiles
        into one graph (positions index the tables by slicing), or, for one token with a cache, a one-element
        device tensor (:meth:`DALLE.static_step`): every shape is then the same at every position, so one
        captured CUDA graph serves them all."""
        b, n, _ = x.shape
        static = isinstance(start, Tensor)
        if static and (n != 1 or cache is None):
            raise ValueError("a tensor position takes one token and a cache")
        at = start if static else slice(start, start + n)
        offsets = tables["shift"].index_select(1, at) if static else tables["shift"][:, at]
        h = self.norm1(x)
        if self.shift:
            h = self._shift(h, None if cache is None else cache.attn_hist, offsets, tables["window"])
        q, k, v = self.to_qkv(h).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        if "cos" in tables:
            cos, sin = ((t.index_select(0, at) if static else t[at]).to(q.dtype)  # bf16/fp16 engines
                        for t in (tables["cos"], tables["sin"]))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if static:  # in place at the position; attention then reads the keys the step's masks let it
            cache.k.index_copy_(2, at, k)
            cache.v.index_copy_(2, at, v)
            k, v = cache.k[:, :, :tables["keys"]], cache.v[:, :, :tables["keys"]]
        elif cache is not None:
            cache.k[:, :, at] = k
            cache.v[:, :, at] = v
            k, v = cache.k[:, :, :start + n], cache.v[:, :, :start + n]
        x = x + self.to_out(self._attend(q, k, v, start, tables).transpose(1, 2).reshape(b, n, -1))

        h = self.norm2(x)
        if self.shift:
            h = self._shift(h, None if cache is None else cache.ff_hist, offsets, tables["window"])
        a, gate = self.ff_in(h).chunk(2, dim=-1)
        return x + self.ff_out(self.ff_dropout(a * F.gelu(gate)))


# ----------------------------------------------------------------------------------------------------------
# The model


class DALLE(nn.Module):
    """Causal transformer over text and image tokens (codes from a frozen dVAE, computed outside)."""

    def __init__(self, config: DALLEConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.text_len = cfg.text_seq_len + 1  # <bos> + text
        self.seq_len = cfg.seq_len
        self.num_text_vocab = cfg.num_text_tokens + cfg.text_seq_len  # + one pad id per text slot
        self.total_tokens = self.num_text_vocab + cfg.num_image_tokens
        fmap = cfg.image_fmap_size

        self.text_emb = nn.Embedding(self.num_text_vocab, cfg.dim)
        self.image_emb = nn.Embedding(cfg.num_image_tokens, cfg.dim)
        if not cfg.rotary_emb:
            self.text_pos_emb = nn.Embedding(self.text_len, cfg.dim)
            self.image_row_emb = nn.Embedding(fmap, cfg.dim)
            self.image_col_emb = nn.Embedding(fmap, cfg.dim)
        kinds = [cfg.attn_types[i % len(cfg.attn_types)] for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in kinds)
        self.norm = nn.LayerNorm(cfg.dim)
        # Two output heads rather than one masked layer: text positions only ever score the text vocabulary and
        # image positions the codebook, so the loss computes just the unmasked block (and ZeRO-3 can gather
        # each head through its own forward).
        self.to_text_logits = nn.Linear(cfg.dim, self.num_text_vocab)
        self.to_image_logits = nn.Linear(cfg.dim, cfg.num_image_tokens)

        self.sparse_kinds = sorted(set(kinds) - {"full"})
        for kind in self.sparse_kinds:
            mask = attention_mask(kind, self.text_len, fmap, cfg.conv_kernel_size)
            self.register_buffer(f"mask_{kind}", mask, persistent=False)
        self.register_buffer("shift_table", shift_offsets(self.text_len, fmap), persistent=False)
        if cfg.rotary_emb:
            angles = rotary_angles(self.text_len, fmap, cfg.dim_head)
            self.register_buffer("rot_cos", angles.cos(), persistent=False)
            self.register_buffer("rot_sin", angles.sin(), persistent=False)
        pos = torch.arange(self.seq_len)
        vocab = torch.arange(self.total_tokens)
        is_text_vocab = vocab < self.num_text_vocab
        self.register_buffer(  # True where a position must NOT predict a token
            "logits_mask", (pos[:, None] < cfg.text_seq_len) != is_text_vocab[None, :], persistent=False
        )
        self.register_buffer("pad_ids", cfg.num_text_tokens + torch.arange(cfg.text_seq_len), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- sizes ----------------------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.text_emb.weight.numel() + self.image_emb.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per sequence position (forward + backward = 3x forward, 2 per multiply-add): the
        block matmuls, attention scores over the average causal context, and the logits that the loss really
        computes (text positions over the text vocabulary, image positions over the codebook)."""
        cfg = self.config
        inner = cfg.heads * cfg.dim_head
        block = 4 * cfg.dim * inner + 3 * cfg.ff_mult * cfg.dim * cfg.dim
        context = {"full": (self.seq_len + 1) / 2}  # mean keys per query; the sparse paths compute only these
        context.update({kind: getattr(self, f"mask_{kind}").sum().item() / self.seq_len
                        for kind in self.sparse_kinds})
        attention = sum(2 * inner * context[layer.attn_type] for layer in self.blocks)
        logits = cfg.dim * (cfg.text_seq_len * self.num_text_vocab + cfg.image_seq_len * cfg.num_image_tokens)
        return 6.0 * (cfg.depth * block + attention + logits / self.seq_len)

    # -- forward --------------------------------------------------------------------------------------------

    def _tables(self) -> dict[str, Any]:
        cfg = self.config
        tables: dict[str, Any] = {"shift": self.shift_table, "window": cfg.image_fmap_size,
                                  "structured": cfg.sparse_attention == "structured",
                                  "grid": (self.text_len, cfg.image_fmap_size, cfg.conv_kernel_size)}
        for kind in self.sparse_kinds:
            tables[kind] = getattr(self, f"mask_{kind}")
        if self.config.rotary_emb:
            tables["cos"], tables["sin"] = self.rot_cos, self.rot_sin
        return tables

    def text_tokens(self, text: Tensor, null: Tensor | None = None) -> Tensor:
        """``<bos>`` + text with per-slot pad ids; rows where ``null`` is True lose their caption. Never
        writes into ``text``."""
        cfg = self.config
        if text.shape[-1] != cfg.text_seq_len:
            raise ValueError(f"text has {text.shape[-1]} tokens, expected text_seq_len={cfg.text_seq_len}")
        if null is not None:
            text = text.masked_fill(null[:, None], 0)
        text = torch.where(text == 0, self.pad_ids, text)
        return F.pad(text, (1, 0), value=0)

    def _embed(self, ids: Tensor, start: int) -> Tensor:
        """Embeds stream tokens ``ids [B, n]`` that sit at positions ``start .. start + n - 1``."""
        n_text = max(0, min(self.text_len - start, ids.shape[1]))
        parts = []
        if n_text:
            x = self.text_emb(ids[:, :n_text])
            if not self.config.rotary_emb:
                x = x + self.text_pos_emb(torch.arange(start, start + n_text, device=ids.device))
            parts.append(x)
        if n_text < ids.shape[1]:
            x = self.image_emb(ids[:, n_text:])
            if not self.config.rotary_emb:
                k = torch.arange(start + n_text, start + ids.shape[1], device=ids.device) - self.text_len
                fmap = self.config.image_fmap_size
                x = x + self.image_row_emb(k // fmap) + self.image_col_emb(k % fmap)
            parts.append(x)
        return torch.cat(parts, dim=1)

    def _hidden(self, ids: Tensor, start: int = 0, caches: list[LayerCache] | None = None) -> Tensor:
        x = self._embed(ids, start)
        tables = self._tables()
        recompute = self.config.activation_checkpointing and torch.is_grad_enabled() and caches is None
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, start, tables, None, use_reentrant=False)
            else:
                x = block(x, start, tables, caches[i] if caches is not None else None)
        return self.norm(x)

    def caption_dropout(self, text: Tensor) -> Tensor | None:
        """Which rows of ``text`` lose their caption in a training step (``null_cond_prob`` of them), so the same
        model also learns the unconditional distribution that classifier-free guidance needs; None outside
        training. Trainers draw it before the forward: a compiled graph would draw from its own generator."""
        if not self.training or self.config.null_cond_prob == 0:
            return None
        return torch.rand(text.shape[0], device=text.device) < self.config.null_cond_prob

    def forward(
        self, text: Tensor, image_codes: Tensor | None = None, return_loss: bool = False, null: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Masked logits ``[B, n, total_tokens]``, or with ``return_loss`` the tuple
        ``(loss, loss_text, loss_img)`` with ``loss = (loss_text + w * loss_img) / (w + 1)``.

        ``null [B]`` marks the rows that lose their caption; by default :meth:`caption_dropout` draws it.
        """
        cfg = self.config
        null = self.caption_dropout(text) if null is None else null
        stream = self.text_tokens(text, null)
        if image_codes is not None:
            if image_codes.shape[-1] != cfg.image_seq_len:
                raise ValueError(f"image_codes has {image_codes.shape[-1]} codes, expected {cfg.image_seq_len}")
            stream = torch.cat([stream, image_codes], dim=1)
        ids = stream[:, : self.seq_len]
        h = self._hidden(ids)
        if not return_loss:
            logits = torch.cat([self.to_text_logits(h), self.to_image_logits(h)], dim=-1)
            return logits.masked_fill(self.logits_mask[: h.shape[1]], -torch.finfo(logits.dtype).max)
        if image_codes is None:
            raise ValueError("return_loss needs image_codes")
        # Identical to cross-entropy over the masked logits (masked entries carry zero probability).
        t = cfg.text_seq_len
        text_logits, image_logits = self.to_text_logits(h[:, :t]), self.to_image_logits(h[:, t:])
        loss_text = F.cross_entropy(text_logits.flatten(0, 1).float(), stream[:, 1: t + 1].flatten())
        loss_img = F.cross_entropy(image_logits.flatten(0, 1).float(), image_codes.flatten())
        loss = (loss_text + cfg.loss_img_weight * loss_img) / (cfg.loss_img_weight + 1)
        return loss, loss_text, loss_img

    # -- generation -----------------------------------------------------------------------------------------

    def new_cache(self, batch: int) -> list[LayerCache]:
        """Empty per-layer caches for ``batch`` rows, preallocated to the full sequence length and one spare slot:
        the keys read at the last position are then a slice like every other step's, not the whole (contiguous)
        tensor, which a compiled step would be recompiled for."""
        cfg = self.config
        p = next(self.parameters())
        shape = (batch, cfg.heads, self.seq_len + 1, cfg.dim_head)
        window = (batch, cfg.image_fmap_size, cfg.dim)
        return [
            LayerCache(p.new_zeros(shape), p.new_zeros(shape), p.new_zeros(window), p.new_zeros(window))
            for _ in self.blocks
        ]

    def _next_logits(self, ids: Tensor, caches: list[LayerCache] | None, done: int, image: bool,
                     step: Callable | None = None) -> Tensor:
        """Logits (codebook or text vocabulary) for the token after ``ids``; with caches, only positions from
        ``done`` on are computed, by ``step`` where given (else :meth:`cached_step`)."""
        if caches is None:
            return self._head(self._hidden(ids)[:, -1], image)
        return (step or self.cached_step)(ids[:, done:], done, caches, image)

    def _head(self, h: Tensor, image: bool) -> Tensor:
        return (self.to_image_logits if image else self.to_text_logits)(h).float()

    def cached_step(self, ids: Tensor, start: int, caches: list[LayerCache], image: bool) -> Tensor:
        """Runs tokens ``ids [B, n]`` at positions ``start ..`` through the caches (filling them) and returns
        fp32 logits for the token after the last one."""
        return self._head(self._hidden(ids, start, caches)[:, -1], image)

    def static_step(self, ids: Tensor, pos: Tensor, caches: list[LayerCache], image: bool,
                    keys: int | None = None) -> Tensor:
        """:meth:`cached_step` for one token ``ids [B, 1]`` at the position held in ``pos`` (a one-element long
        tensor on the model's device), reading the first ``keys`` cache slots (default: all; more than the
        position) under a mask. No shape and no Python value depends on the position, so one CUDA graph captured
        at any position replays at every other (:class:`StaticSamplingStep`). ``image``: the token is an image
        code and the logits are the codebook's (else a text id and the text vocabulary's)."""
        cfg = self.config
        keys = self.seq_len + 1 if keys is None else keys
        if image:
            x = self.image_emb(ids)
            if not cfg.rotary_emb:
                k = pos - self.text_len
                x = x + self.image_row_emb(k // cfg.image_fmap_size) + self.image_col_emb(k % cfg.image_fmap_size)
        else:
            x = self.text_emb(ids)
            if not cfg.rotary_emb:
                x = x + self.text_pos_emb(pos)
        tables = self._tables()
        tables["keys"] = keys
        slots = torch.arange(keys, device=pos.device)
        masks = {"full": (slots <= pos)[None, :]}  # [1, keys]: the past, and this position's own key
        for kind in self.sparse_kinds:  # the pattern's row, one slot longer: the cache's spare slot
            masks[kind] = F.pad(tables[kind].index_select(0, pos), (0, 1))[:, :keys]
        tables["step_masks"] = masks
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block(x, pos, tables, cache)
        return self._head(self.norm(x)[:, -1], image)

    def static_sampling_step(self, cuda_graphs: bool = True, key_bucket: int = 256) -> StaticSamplingStep:
        """A sampling ``step`` (see :meth:`generate_image_codes`) that runs :meth:`static_step` and, with
        ``cuda_graphs``, replays it as one captured CUDA graph per batch size and key bucket (``sampling.
        cuda_graphs``): a cached step is a few hundred small kernels, whose launches bound it on a GPU."""
        return StaticSamplingStep(self, cuda_graphs=cuda_graphs, key_bucket=key_bucket)

    def compiled_sampling_step(self) -> Callable[[Tensor, int, list[LayerCache], bool], Tensor]:
        """:meth:`cached_step` compiled for one-token steps at any position and batch (``dynamic=True``: one
        graph, not one per position) with the weights frozen into it, so inductor fuses the small ops and
        prepacks the weights for the CPU's matmul kernels. Only for a model whose weights stay as they are
        (an inference copy): a later change to them does not reach the compiled step."""
        compiled = torch.compile(self.cached_step, dynamic=True)

        def step(ids: Tensor, start: int, caches: list[LayerCache], image: bool) -> Tensor:
            # Both flags are read as TorchDynamo traces, so they are set around each call, not for the process
            # (there freezing would freeze the graphs of a model being trained too). Freezing: ``options=`` reaches
            # inductor only after the trace, and froze nothing. Duck shaping gives equal sizes one symbol: a first
            # batch of as many rows as heads (or dim_head, ...) was pinned when the heads were, and the next batch
            # compiled a second graph.
            with torch._inductor.config.patch(freezing=True), \
                    torch.fx.experimental._config.patch(use_duck_shape=False):
                return compiled(ids, start, caches, image)

        return step

    @torch.no_grad()
    def _sample_stream(
        self, prefix: Tensor, steps: int, image: bool, *, temperature: float, top_k: float,
        cond_scale: float, use_cache: bool, generator: Generators, step: Callable | None = None,
    ) -> Tensor:
        """Extends ``prefix [B or 2B, n]`` by ``steps`` image codes (or text ids). With guidance, the second
        half of the rows is the null-caption copy of the first; both halves run in the same batched pass and
        each keeps its own cache rows, and the same sampled token is appended to both. ``step`` stands in for
        :meth:`cached_step` after the prefix has filled the caches (see :meth:`compiled_sampling_step`)."""
        was_training = self.training
        self.eval()
        guided = cond_scale != 1.0
        # A static step owns its caches: its CUDA graphs read and write those tensors' memory.
        new_cache = getattr(step, "new_cache", self.new_cache)
        caches = new_cache(prefix.shape[0]) if use_cache else None
        sampled_rows = prefix.shape[0] // 2 if guided else prefix.shape[0]
        uniforms = draw_uniforms(generator, sampled_rows, steps, prefix.device)
        ids, done = prefix, 0
        for i in range(steps):
            logits = self._next_logits(ids, caches, done, image, step if i > 0 else None)  # prefix: eager
            done = ids.shape[1]
            if guided:
                cond, null = logits.chunk(2)
                logits = null + (cond - null) * cond_scale
            token = sample_logits(logits, uniforms[:, i], temperature=temperature, top_k=top_k)
            if guided:
                token = torch.cat([token, token])
            ids = torch.cat([ids, token[:, None]], dim=1)
        self.train(was_training)
        return ids[: ids.shape[0] // 2] if guided else ids

    @torch.no_grad()
    def generate_image_codes(
        self, text: Tensor, *, temperature: float = 1.0, top_k: float = 0.9, cond_scale: float = 1.0,
        prime_codes: Tensor | None = None, use_cache: bool = True, generator: Generators = None,
        step: Callable | None = None,
    ) -> Tensor:
        """Samples ``[B, image_seq_len]`` image codes for captions ``text [B, text_seq_len]`` (0 = pad).

        ``top_k`` below 1 keeps that fraction of the codebook, from 1 up keeps that many codes.
        ``cond_scale != 1`` applies classifier-free guidance against a null caption in one batched pass.
        ``prime_codes [B, P]`` fixes the first ``P`` codes (image priming). ``step`` replaces the cached
        one-token step (a :meth:`compiled_sampling_step`). ``generator``: one for the batch, or one per row of
        ``text`` (see :func:`draw_uniforms`). Inputs are never modified.
        """
        if step is not None and not use_cache:
            raise ValueError("a sampling step needs use_cache=True")
        cfg = self.config
        prefix = self.text_tokens(text)
        if prime_codes is not None:
            if prime_codes.shape[1] >= cfg.image_seq_len:
                raise ValueError(f"prime_codes has {prime_codes.shape[1]} codes; must be < {cfg.image_seq_len}")
            prefix = torch.cat([prefix, prime_codes], dim=1)
        if cond_scale != 1.0:
            null_text = self.text_tokens(torch.zeros_like(text))
            null_prefix = torch.cat([null_text, prefix[:, self.text_len:]], dim=1)
            prefix = torch.cat([prefix, null_prefix])
        steps = self.text_len + cfg.image_seq_len - prefix.shape[1]
        ids = self._sample_stream(prefix, steps, True, temperature=temperature, top_k=top_k, cond_scale=cond_scale,
                                  use_cache=use_cache, generator=generator, step=step)
        return ids[:, self.text_len:]

    @torch.no_grad()
    def generate_texts(
        self, prompt: Tensor | None = None, *, batch: int = 1, temperature: float = 1.0, top_k: float = 0.9,
        use_cache: bool = True, generator: Generators = None,
    ) -> Tensor:
        """Continues caption ids ``prompt [B, n]`` (or starts from ``<bos>``) to ``text_seq_len`` ids.
        Sampled per-slot pad ids come back as 0, so the tokenizer's decode skips them."""
        device = self.pad_ids.device
        if prompt is None:
            prompt = torch.zeros(batch, 0, dtype=torch.long, device=device)
        prefix = F.pad(prompt[:, : self.config.text_seq_len], (1, 0), value=0)
        steps = self.text_len - prefix.shape[1]
        ids = self._sample_stream(prefix, steps, False, temperature=temperature,
                                  top_k=top_k, cond_scale=1.0, use_cache=use_cache, generator=generator)
        text = ids[:, 1:]
        return text.masked_fill(text >= self.config.num_text_tokens, 0)


Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class _Captured:
    """One captured step: its graph and the tensors it reads (``ids``, ``pos``) and writes (``logits``)."""

    graph: torch.cuda.CUDAGraph
    ids: Tensor
    pos: Tensor
    logits: Tensor


class StaticSamplingStep:
    """The one-token sampling step at static shapes (:meth:`DALLE.static_step`), replayed from CUDA graphs.

    Eager cached sampling on a GPU is bound by kernel launches (about 75 small kernels a block a token), so the
    step is captured once and replayed: one graph per (batch rows, image or text, key bucket), the position
    passed in a device tensor so one graph serves every position of its bucket. The key bucket (``key_bucket``
    slots, rounded up) keeps early tokens from reading the whole preallocated cache. The caches come from
    :meth:`new_cache` (the graphs hold their addresses); the logits returned are the graph's output buffer,
    overwritten by the next call. Weights are read where they are at each replay: an in-place update reaches the
    graphs, moving the model (``.to``) does not. Without ``cuda_graphs`` (or on a CPU) the same static step runs
    eagerly: what the tests compare against the eager cached step."""

    def __init__(self, model: DALLE, cuda_graphs: bool = True, key_bucket: int = 256, warmup: int = 2) -> None:
        if key_bucket < 1:
            raise ValueError(f"key_bucket must be >= 1, got {key_bucket}")
        self.model, self.cuda_graphs, self.key_bucket, self.warmup = model, cuda_graphs, key_bucket, warmup
        self._caches: dict[int, list[LayerCache]] = {}
        self._graphs: dict[tuple[int, bool, int], _Captured] = {}

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def new_cache(self, batch: int) -> list[LayerCache]:
        """This batch size's caches, allocated once and zeroed for each pass (as a fresh eager cache is)."""
        caches = self._caches.get(batch)
        if caches is None:
            caches = self._caches[batch] = self.model.new_cache(batch)
        else:
            for cache in caches:
                for t in (cache.k, cache.v, cache.attn_hist, cache.ff_hist):
                    t.zero_()
        return caches

    def keys_for(self, start: int) -> int:
        """Cache slots a step at position ``start`` reads: its own and every earlier one, in whole buckets."""
        total = self.model.seq_len + 1
        return min(total, -(-(start + 1) // self.key_bucket) * self.key_bucket)

    def __call__(self, ids: Tensor, start: int, caches: list[LayerCache], image: bool) -> Tensor:
        if ids.shape[1] != 1:
            raise ValueError(f"a static step takes one token a row, got {ids.shape[1]}")
        batch = ids.shape[0]
        if caches is not self._caches.get(batch):
            raise ValueError("a static step runs on the caches its new_cache returned")
        keys = self.keys_for(start)
        if not (self.cuda_graphs and ids.device.type == "cuda"):
            return self.model.static_step(ids, torch.tensor([start], device=ids.device), caches, image, keys)
        captured = self._graphs.get((batch, image, keys))
        if captured is None:
            captured = self._graphs[(batch, image, keys)] = self._capture(ids, start, caches, image, keys)
        captured.ids.copy_(ids)
        captured.pos.fill_(start)
        captured.graph.replay()
        return captured.logits

    def _capture(self, ids: Tensor, start: int, caches: list[LayerCache], image: bool, keys: int) -> _Captured:
        """Warms the step up on a side stream (as CUDA graph capture needs) with this call's own inputs, puts
        back the token-shift history the warm-up moved on (the keys and values it wrote at ``start`` are the
        ones the replay writes), and captures it."""
        static_ids, pos = ids.clone(), torch.tensor([start], device=ids.device)
        hist = [(c.attn_hist.clone(), c.ff_hist.clone()) for c in caches]
        side = torch.cuda.Stream(ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model.static_step(static_ids, pos, caches, image, keys)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        for cache, (attn, ff) in zip(caches, hist, strict=True):
            cache.attn_hist.copy_(attn)
            cache.ff_hist.copy_(ff)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.model.static_step(static_ids, pos, caches, image, keys)
        return _Captured(graph, static_ids, pos, logits)


def draw_uniforms(generator: Generators, rows: int, steps: int, device: torch.device) -> Tensor:
    """``[rows, steps]`` uniforms, one per token a sampling pass draws. One generator (or None: torch's global
    one) serves the whole batch; a sequence of them, one per row, gives each row a stream of its own, so a row
    draws the same tokens whichever batch it is sampled in (the Serve evaluation's batches are formed as
    prompts arrive)."""
    if generator is None or isinstance(generator, torch.Generator):
        on = generator.device if generator is not None else device
        return torch.rand(rows, steps, generator=generator, device=on).to(device)
    if len(generator) != rows:
        raise ValueError(f"{len(generator)} generators for {rows} rows: pass one per row (or one for the batch)")
    return torch.stack([torch.rand(steps, generator=g, device=g.device) for g in generator]).to(device)


def sample_logits(logits: Tensor, uniform: Tensor, *, temperature: float, top_k: float) -> Tensor:
    """Draws one index per row of ``logits [B, V]`` after top-k filtering (a fraction below 1, a count from 1;
    ties with the k-th value are kept) and temperature, by inverting the row's cumulative distribution at its
    ``uniform [B]`` in [0, 1).

    The k-th value comes from a selection (``kthvalue``), not a sort, and one uniform a row replaces ``multinomial``:
    ``topk`` of 90% of an 8192-code book and ``multinomial``'s exponential per entry took 0.37 + 0.15 ms a row on a
    CPU, more than the rest of a guided step at batch 32."""
    vocab = logits.shape[-1]
    k = max(1, math.ceil(top_k * vocab)) if top_k < 1 else min(vocab, int(top_k))
    scaled = logits.float() / temperature
    if k < vocab:
        kth = scaled.kthvalue(vocab - k + 1, dim=-1, keepdim=True).values
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
    total = cdf[..., -1:]
    u = uniform.to(cdf)[:, None] * total
    # u < total, so the first cdf entry above u rose there: that code has probability > 0 (never a filtered one)
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)
