"""open_clip as reranker: a random-weight open_clip model saved as its checkpoints are, imported, scores equal to
open_clip's own preprocessing and forward; the Serve scorer's batch path; refusals."""

from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import job_main
from PIL import Image
from safetensors.torch import save_file

from dalle_core.checkpoint import load_model
from dalle_core.images import from_uint8
from dalle_core.openclip import OpenCLIP
from pipelines.serve.app import score_batch

NAME = "ViT-S-32-alt"  # the smallest ViT open_clip knows: 224 px, 77-token context
CAPTIONS = ["a red circle on a blue background", "a green square", "two yellow stars", "a small purple triangle"]


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, pretrained=None).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "ln" in name:
                p.add_(0.1 * torch.randn_like(p))  # norms away from their init
    g = np.random.default_rng(0)
    pictures = g.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    pictures[1, :112] = 255  # some structure besides noise
    return model, pictures


@pytest.fixture(scope="module")
def imported(reference, tmp_path_factory) -> dict:
    """The two layouts open_clip weights come in, each through jobs/import_model.py."""
    model, _ = reference
    root = tmp_path_factory.mktemp("openclip")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "open_clip_model.safetensors"))  # what the hub releases
    buf = io.BytesIO()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, buf)  # a training ckpt
    (root / "epoch_3.pt").write_bytes(buf.getvalue())
    out = {}
    for source in ("open_clip_model.safetensors", "epoch_3.pt"):
        target = root / f"{source.split('.')[0]}-imported.safetensors"
        rc = job_main("import_model")(["open_clip", "--model", NAME, "--checkpoint", str(root / source),
                                       "--output", str(target)])
        out[source] = (rc, str(target))
    return out


def open_clip_scores(model, pictures: np.ndarray, captions: list[str]) -> torch.Tensor:
    """open_clip end to end: its own preprocessing of PIL pictures, its tokenizer, its forward."""
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False,
                                           mean=model.visual.preprocess_cfg["mean"],
                                           std=model.visual.preprocess_cfg["std"])
    images = torch.stack([preprocess(Image.fromarray(p)) for p in pictures])
    with torch.no_grad():
        image_features, text_features, _ = model(images, open_clip.get_tokenizer(NAME)(captions))
    return (image_features * text_features).sum(-1)


def test_scores_equal_open_clips_own(reference, imported) -> None:
    model, pictures = reference
    want = open_clip_scores(model, pictures, CAPTIONS)
    assert want.std() > 1e-3  # the scores tell the pairs apart
    for rc, path in imported.values():
        assert rc == 0
        scorer = load_model(path)
        assert isinstance(scorer, OpenCLIP) and scorer.config.model_name == NAME
        assert scorer.config.image_size == 224 and scorer.config.context_length == 77
        got = scorer.score(torch.zeros(4, 8, dtype=torch.long), from_uint8(pictures), CAPTIONS)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_serve_scorer_batches_captions_and_smaller_pictures(reference, imported) -> None:
    _, pictures = reference
    scorer = load_model(imported["epoch_3.pt"][1])
    small = pictures[:, ::4, ::4]  # DALLE's pictures are smaller than CLIP's input: resized up inside
    requests = [{"text_ids": [5, 7], "caption": CAPTIONS[0], "images": small[:3]},
                {"text_ids": [9], "caption": CAPTIONS[1], "images": small[3:]}]
    scores = score_batch(scorer, requests)
    assert [len(s) for s in scores] == [3, 1]
    one = scorer.score(torch.zeros(1, 1, dtype=torch.long), from_uint8(small[3:]), [CAPTIONS[1]])
    assert scores[1][0] == pytest.approx(one.item(), abs=1e-5)
    with pytest.raises(ValueError, match="OpenCLIP scores caption strings"):
        scorer.score(torch.zeros(1, 1, dtype=torch.long), from_uint8(small[:1]))


def test_refusals(reference, imported, tmp_path, capsys) -> None:
    run = job_main("import_model")
    source = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in reference[0].state_dict().items()}, source)
    capsys.readouterr()
    assert run(["open_clip", "--model", "ViT-S-32", "--checkpoint", source, "--output", str(tmp_path / "x")]) == 2
    assert "is this a ViT-S-32 checkpoint?" in capsys.readouterr().err
    assert run(["open_clip", "--model", "ViT-Nope", "--checkpoint", source, "--output", str(tmp_path / "x")]) == 2
    assert "open_clip knows no model 'ViT-Nope'" in capsys.readouterr().err
    assert run(["open_clip", "--model", "ViT-B-16-SigLIP", "--checkpoint", source, "--output",
                str(tmp_path / "x")]) == 2
    assert "Hugging Face hub" in capsys.readouterr().err
    (tmp_path / "junk.bin").write_bytes(b"junk")
    assert run(["open_clip", "--model", NAME, "--checkpoint", str(tmp_path / "junk.bin"), "--output",
                str(tmp_path / "x")]) == 2
    assert "not a readable weights file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == []
