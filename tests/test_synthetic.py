"""The synthetic set: exact palette, determinism per seed, held-out split, and the attribute checker."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError, SyntheticConfig
from pipelines.data.checker import check_picture, decode_jpeg, reconstruction_accuracy
from pipelines.data.synthetic import (
    COLORS,
    POSITIONS,
    SENTENCE_SHAPES,
    SHAPES,
    SIZES,
    WORDING_SPLITS,
    Attributes,
    caption_for,
    heldout_wording,
    holdout_examples,
    make_sample,
    parse_caption,
    render,
    sample_attributes,
    sentence_shape,
    write_synthetic,
)

HOLDOUT = [["red", "square"], ["blue", "circle"]]


def _read(folder) -> dict:
    tables = [pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]
    rows = [r for t in tables for r in t.to_pylist()]
    return {r["key"]: r for r in rows}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    config = SyntheticConfig(num_samples=120, samples_per_shard=50, seed=3, holdout_pairs=HOLDOUT)
    counts = write_synthetic(config, str(tmp_path / "a"))
    write_synthetic(config, str(tmp_path / "b"))
    write_synthetic(SyntheticConfig(num_samples=120, samples_per_shard=50, seed=4, holdout_pairs=HOLDOUT),
                    str(tmp_path / "c"))
    a, b, c = _read(tmp_path / "a"), _read(tmp_path / "b"), _read(tmp_path / "c")
    assert counts["train"] == len(a) and counts["train"] + counts["holdout"] == 120
    assert sorted(p.name for p in (tmp_path / "a").glob("*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert a == b
    assert any(a[k]["jpg"] != c[k]["jpg"] for k in a.keys() & c.keys())
    # img2dataset's layout plus ground truth
    first = next(iter(a.values()))
    assert {"key", "caption", "jpg", "width", "height", "status"} <= first.keys()
    assert {"color", "shape", "size", "position"} <= first.keys()
    assert first["status"] == "success" and first["width"] == first["height"] == 32
    # a sample depends on (seed, index) only, not on the shard size or the samples before it
    key = sorted(a)[57]
    assert make_sample(3, int(key.removeprefix("syn")), 32) == a[key]


def test_holdout_pairs_never_in_training_split(tmp_path):
    config = SyntheticConfig(num_samples=300, samples_per_shard=100, holdout_pairs=HOLDOUT)
    write_synthetic(config, str(tmp_path))
    train, holdout = _read(tmp_path), _read(tmp_path / "holdout")
    pairs = {tuple(p) for p in HOLDOUT}
    assert holdout and all((r["color"], r["shape"]) in pairs for r in holdout.values())
    assert not any((r["color"], r["shape"]) in pairs for r in train.values())
    assert not train.keys() & holdout.keys()
    examples = holdout_examples(config)
    assert len(examples) == len(HOLDOUT) * len(SIZES) * len(POSITIONS)
    for ex in examples:
        assert (ex["color"], ex["shape"]) in pairs
        assert parse_caption(ex["caption"]) == Attributes(ex["color"], ex["shape"], ex["size"], ex["position"])
    assert len(holdout_examples(config, per_pair=3)) == 6
    with pytest.raises(ConfigError, match=r"synthetic.holdout_pairs\[0\]"):
        holdout_examples(SyntheticConfig(holdout_pairs=[["magenta", "square"]]))


def test_exact_palette_and_dark_background():
    for color, rgb in COLORS.items():
        attrs = Attributes(color, "square", "large", "center")
        pixels = render(attrs, 32, np.random.default_rng(0))
        assert tuple(pixels[16, 16]) == rgb
        assert pixels[0:3, 0:3].max() <= 30  # corner: background only


def test_grammar_names_every_attribute_in_many_sentence_shapes():
    attrs = Attributes("cyan", "diamond", "small", "right")
    rng = np.random.default_rng(0)
    for wording in WORDING_SPLITS:
        captions = {caption_for(attrs, rng, wording) for _ in range(300)}
        assert len(captions) > 100
        assert all(parse_caption(c) == attrs for c in captions)
        assert {sentence_shape(c) for c in captions} == set(SENTENCE_SHAPES[wording])
    assert len(SENTENCE_SHAPES["train"]) >= 10 and SENTENCE_SHAPES["heldout"]


def test_heldout_wordings_share_no_sentence_shape_with_training_captions(tmp_path):
    """Every training caption is in a training sentence shape, every held-out-wording prompt in a held-out one,
    over the same words: the held-out wordings test word order, not vocabulary."""
    config = SyntheticConfig(num_samples=400, samples_per_shard=200, holdout_pairs=HOLDOUT)
    write_synthetic(config, str(tmp_path))
    rows = [*_read(tmp_path).values(), *_read(tmp_path / "holdout").values()]
    train_shapes = {sentence_shape(r["caption"]) for r in rows}
    assert train_shapes <= set(SENTENCE_SHAPES["train"])
    train_words = {w for r in rows for w in r["caption"].replace(",", " ").split()}
    rng = np.random.default_rng(1)
    for i in range(200):
        attrs, _ = sample_attributes(5, i)
        caption = caption_for(attrs, rng, "heldout")
        assert sentence_shape(caption) not in train_shapes and heldout_wording(sentence_shape(caption))
        assert set(caption.replace(",", " ").split()) <= train_words, caption


@pytest.mark.parametrize("size,count", [(32, 400), (64, 100)])
def test_checker_reads_back_generated_pictures(size, count):
    wrong = []
    for i in range(count):
        row = make_sample(11, i, size)
        truth = Attributes(row["color"], row["shape"], row["size"], row["position"])
        got = check_picture(decode_jpeg(row["jpg"]))  # after the JPEG round trip, as stored
        if got != truth:
            wrong.append((truth, got))
    assert len(wrong) <= 0.01 * count, wrong[:5]


def test_checker_accepts_float_chw_and_reports_blank_pictures():
    attrs, rng = sample_attributes(0, 5)
    pixels = render(attrs, 32, rng)
    assert check_picture(pixels.transpose(2, 0, 1).astype(np.float32) / 255) == attrs
    assert check_picture(np.full((32, 32, 3), 10, dtype=np.uint8)) is None
    assert {a.shape for a in [check_picture(render(Attributes("white", s, "large", "left"),
                                                   32, np.random.default_rng(1))) for s in SHAPES]} == set(SHAPES)


def test_reconstruction_accuracy_scores_fresh_pictures_per_split():
    config = SyntheticConfig(num_samples=50, image_size=32, holdout_pairs=HOLDOUT)
    seen_inputs = []

    def identity(pixels):
        seen_inputs.append(pixels.copy())
        return pixels

    perfect = reconstruction_accuracy(identity, config, num_samples=200, batch_size=64)
    assert perfect["all"]["n"] == 200 and perfect["seen"]["n"] + perfect["heldout"]["n"] == 200
    assert perfect["heldout"]["n"] > 0 and perfect["all"]["both"] >= 0.99
    # fresh pictures: sample indices after the generated set's (none of them was trained on)
    assert np.array_equal(seen_inputs[0][0], decode_jpeg(make_sample(config.seed, 50, 32)["jpg"]))

    def blank(pixels):
        return np.zeros_like(pixels)

    def swap_red_for_blue(pixels):
        out = pixels.copy()
        red = np.all(np.abs(pixels.astype(int) - COLORS["red"]) < 40, axis=-1)
        out[red] = COLORS["blue"]
        return out

    assert reconstruction_accuracy(blank, config, num_samples=40)["all"]["both"] == 0.0
    swapped = reconstruction_accuracy(swap_red_for_blue, config, num_samples=200)["all"]
    assert swapped["shape"] >= 0.95 and swapped["color"] < 0.95
