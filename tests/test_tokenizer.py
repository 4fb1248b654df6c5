"""BPE tokenizer: normalisation, round trip, truncation, padding, BPE-dropout, save/load."""

from __future__ import annotations

import pickle

import pytest
import torch

from dalle_core.io import file_sha256
from dalle_core.tokenizer import BPETokenizer, normalize_caption, pad_text_ids

COLORS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["square", "circle", "triangle"]
CAPTIONS = [f"A {c} {s} on a {b} background" for c in COLORS for s in SHAPES for b in ("white", "black")]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tok") / "nested" / "bpe.model"
    BPETokenizer.train(CAPTIONS * 3, str(path), vocab_size=64, text_seq_len=32)
    return str(path)


@pytest.fixture(scope="module")
def tok(model_path: str) -> BPETokenizer:
    return BPETokenizer.load(model_path, text_seq_len=32)


@pytest.mark.parametrize("raw, expected", [
    ("  A  Red\tSquare\n ", "a red square"),
    ("CAFÃ© au lait", "café au lait"),  # mojibake repaired by ftfy
    ("\u201cHello\u201d   World", '"hello" world'),  # curly quotes straightened
    ("", ""),
])
def test_normalize_caption(raw: str, expected: str) -> None:
    assert normalize_caption(raw) == expected


def test_normalize_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="caption must be a str"):
        normalize_caption(None)  # type: ignore[arg-type]


def test_round_trip_returns_normalised_caption(tok: BPETokenizer) -> None:
    texts = ["A  GREEN Circle on a black background", "a purple triangle"]
    ids = tok.encode(texts)
    assert all(i >= 1 for row in ids for i in row)
    assert [tok.decode(row) for row in ids] == [normalize_caption(t) for t in texts]
    assert tok.decode(torch.tensor(ids[1])) == "a purple triangle"


def test_decode_skips_pad_special_and_per_position_pad_ids(tok: BPETokenizer) -> None:
    ids = tok.encode(["a red square"])[0]
    noisy = [BPETokenizer.BOS_ID, *ids, BPETokenizer.EOS_ID, 0, 0, tok.vocab_size, tok.vocab_size + 7]
    assert tok.decode(noisy) == "a red square"
    assert tok.decode([0, 0, tok.vocab_size]) == ""


def test_unknown_characters_map_to_unk_not_pad(tok: BPETokenizer) -> None:
    ids = tok.encode(["a red zzz square"])[0]
    assert BPETokenizer.UNK_ID in ids and BPETokenizer.PAD_ID not in ids


def test_truncation_keeps_a_prefix(model_path: str, tok: BPETokenizer) -> None:
    short = BPETokenizer.load(model_path, text_seq_len=4)
    text = "a yellow triangle on a white background a blue square"
    full = tok.encode([text])[0]
    assert len(full) > 4
    assert short.encode([text])[0] == full[:4]


def test_padding(tok: BPETokenizer) -> None:
    texts = ["a red square", "", "a blue circle on a black background"]
    padded = tok.encode_padded(texts)
    assert padded.shape == (3, tok.text_seq_len) and padded.dtype == torch.long
    for row, ids in zip(padded, tok.encode(texts), strict=True):
        assert row[: len(ids)].tolist() == ids
        assert (row[len(ids):] == 0).all()
    assert (padded[1] == 0).all()


def test_pad_text_ids_rejects_rows_longer_than_text_seq_len() -> None:
    assert pad_text_ids([[5, 6], []], 3).tolist() == [[5, 6, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="row 0 has 4 tokens"):
        pad_text_ids([[1, 2, 3, 4]], 3)


def test_bpe_dropout_varies_segmentation_but_not_text(model_path: str) -> None:
    text = "a purple square on a white background"
    # Room for the finest segmentation (one id per character and word start): with the fixture's 32 slots an
    # unlucky dropout draw (it is not seedable) was truncated and decoded to "...backgroun".
    tok = BPETokenizer.load(model_path, text_seq_len=2 * len(text))
    plain = tok.encode([text])[0]
    dropped = tok.encode([text] * 30, dropout=0.3)
    assert any(row != plain for row in dropped)
    assert all(len(row) >= len(plain) for row in dropped)  # skipped merges only split tokens further
    assert {tok.decode(row) for row in dropped} == {text}
    with pytest.raises(ValueError, match="dropout"):
        tok.encode([text], dropout=1.0)


def test_save_load_and_pickle_preserve_the_model(model_path: str, tok: BPETokenizer) -> None:
    assert tok.model_hash == file_sha256(model_path)
    assert 8 <= tok.vocab_size <= 64
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.model_hash == tok.model_hash and clone.text_seq_len == tok.text_seq_len
    assert clone.encode(CAPTIONS) == tok.encode(CAPTIONS)


def test_bad_inputs_raise_clear_errors(tmp_path, tok: BPETokenizer) -> None:
    with pytest.raises(ValueError, match="no non-empty captions"):
        BPETokenizer.train(["", "   "], str(tmp_path / "m"), vocab_size=32, text_seq_len=8)
    with pytest.raises(FileNotFoundError, match="no such file"):
        BPETokenizer.load(str(tmp_path / "missing.model"), text_seq_len=8)
    (tmp_path / "junk.model").write_text("this is not a model\n")
    with pytest.raises(ValueError, match="not a youtokentome BPE model"):
        BPETokenizer.load(str(tmp_path / "junk.model"), text_seq_len=8)
    with pytest.raises(TypeError, match="list of captions"):
        tok.encode("a red square")  # type: ignore[arg-type]
