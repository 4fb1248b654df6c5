"""Caption normalisation and a youtokentome BPE wrapper.

Every caption goes through :func:`normalize_caption` before training or encoding, so the tokenizer, the
shards and the prompts all see the same text. Ids: 0 = pad, 1 = unk, 2 = bos, 3 = eos (youtokentome's
defaults); :meth:`BPETokenizer.encode` never emits 0, so 0 can mark padding. The DALLE transformer maps pad
positions to per-position ids ``>= vocab_size``, which :meth:`BPETokenizer.decode` skips as well.

youtokentome only reads and writes local files, so models are copied through a temporary file; the model
path itself may be local or any fsspec URL (``s3://...``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence

import ftfy
import torch
import youtokentome as yttm

from dalle_core.io import read_bytes, write_bytes


def normalize_caption(text: str) -> str:
    """Fixes mojibake and unicode oddities (ftfy), lower-cases and collapses all whitespace to single spaces."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    return " ".join(ftfy.fix_text(text).lower().split())


def pad_text_ids(ids: Sequence[Sequence[int]], text_seq_len: int, truncate: bool = False) -> torch.LongTensor:
    """Right-pads unpadded id lists with 0 into ``[B, text_seq_len]``: the one text-padding function. A longer
    row is an error unless ``truncate`` (training on shards cuts captions to the model's length)."""
    out = torch.zeros(len(ids), text_seq_len, dtype=torch.long)
    for i, row in enumerate(ids):
        row = list(row)
        if len(row) > text_seq_len:
            if not truncate:
                raise ValueError(f"text ids row {i} has {len(row)} tokens, more than text_seq_len={text_seq_len}")
            row = row[:text_seq_len]
        if row:
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _check_model_bytes(data: bytes) -> None:
    """youtokentome happily "loads" any file into a nonsense vocabulary, so check the layout first: a header
    ``n_chars n_merges``, then that many char and merge lines, then the special-ids line."""
    try:
        lines = data.decode("utf-8").splitlines()
        n_chars, n_merges = (int(v) for v in lines[0].split())
        ok = len(lines) == n_chars + n_merges + 2 and len(lines[-1].split()) == 4
    except (UnicodeDecodeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise ValueError("not a youtokentome BPE model file")


class BPETokenizer:
    """A trained youtokentome BPE model plus the sequence length it truncates to."""

    PAD_ID = 0
    UNK_ID = 1
    BOS_ID = 2
    EOS_ID = 3
    SPECIAL_IDS = frozenset({PAD_ID, UNK_ID, BOS_ID, EOS_ID})

    def __init__(self, model_bytes: bytes, text_seq_len: int) -> None:
        if text_seq_len < 1:
            raise ValueError(f"text_seq_len must be >= 1, got {text_seq_len}")
        _check_model_bytes(model_bytes)
        self._model_bytes = model_bytes
        self.text_seq_len = text_seq_len
        self.model_hash = hashlib.sha256(model_bytes).hexdigest()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bpe.model")
            with open(path, "wb") as f:
                f.write(model_bytes)
            self._bpe = yttm.BPE(model=path)
        # The real vocabulary: smaller than the requested size when the corpus ran out of pairs to merge.
        self.vocab_size: int = self._bpe.vocab_size()

    @classmethod
    def train(cls, captions: Iterable[str], path: str, vocab_size: int, text_seq_len: int) -> BPETokenizer:
        """Trains BPE on the normalised captions and saves the model to ``path`` (local or fsspec URL).

        ``vocab_size`` counts the four special ids and is an upper bound: a small corpus may yield fewer
        tokens (see :attr:`vocab_size` on the result)."""
        if vocab_size < 8:
            raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
        with tempfile.TemporaryDirectory() as tmp:
            data_path = os.path.join(tmp, "captions.txt")
            count = 0
            with open(data_path, "w", encoding="utf-8") as f:
                for caption in captions:
                    text = normalize_caption(caption)
                    if text:
                        f.write(text + "\n")
                        count += 1
            if count == 0:
                raise ValueError("cannot train a tokenizer: no non-empty captions")
            model_path = os.path.join(tmp, "bpe.model")
            yttm.BPE.train(data=data_path, model=model_path, vocab_size=vocab_size,
                           pad_id=cls.PAD_ID, unk_id=cls.UNK_ID, bos_id=cls.BOS_ID, eos_id=cls.EOS_ID)
            with open(model_path, "rb") as f:
                model_bytes = f.read()
        write_bytes(path, model_bytes)
        return cls(model_bytes, text_seq_len)

    @classmethod
    def load(cls, path: str, text_seq_len: int) -> BPETokenizer:
        """Loads a model written by :meth:`train` from a local path or fsspec URL."""
        return cls(read_bytes(path), text_seq_len)

    def __getstate__(self) -> dict:
        # The native BPE object does not pickle; shipping the model bytes lets Ray send tokenizers to workers.
        return {"model_bytes": self._model_bytes, "text_seq_len": self.text_seq_len}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_bytes"], state["text_seq_len"])

    def encode(self, texts: list[str], dropout: float = 0.0) -> list[list[int]]:
        """Normalises and encodes captions: unpadded id lists truncated to ``text_seq_len``, all ids >= 1.

        ``dropout`` > 0 is BPE-dropout: merges are skipped at random, so one caption gets varied
        segmentations across epochs (a regulariser); it decodes to the same text."""
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if isinstance(texts, str):
            raise TypeError("encode takes a list of captions, got a single str")
        normalised = [normalize_caption(t) for t in texts]
        ids = self._bpe.encode(normalised, output_type=yttm.OutputType.ID, dropout_prob=dropout)
        return [row[: self.text_seq_len] for row in ids]

    def encode_padded(self, texts: list[str], dropout: float = 0.0) -> torch.LongTensor:
        """:meth:`encode` then right-pad with 0 into a ``[B, text_seq_len]`` tensor."""
        return pad_text_ids(self.encode(texts, dropout), self.text_seq_len)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decodes one id sequence, skipping pad, special ids and ids >= ``vocab_size`` (per-position pads)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (1-D), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        kept = [int(i) for i in ids if int(i) not in self.SPECIAL_IDS and 0 <= int(i) < self.vocab_size]
        return self._bpe.decode([kept])[0] if kept else ""
