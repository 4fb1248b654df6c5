"""Config loading: presets parse, derived fields stay consistent, and every mistake names its field."""

from pathlib import Path

import pytest
import yaml
from conftest import job_main

from pipelines.config import Config, ConfigError

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_loads(path):
    cfg = Config.load(path)
    assert cfg.dalle.num_text_tokens == cfg.tokenizer.vocab_size
    assert cfg.dalle.image_seq_len == cfg.vae.image_seq_len
    assert cfg.clip.image_size == cfg.vae.image_size


def test_overrides_are_dotted_and_validated():
    cfg = Config.load(overrides={"dalle.depth": 2, "train.optim.lr": 1})
    assert cfg.dalle.depth == 2 and cfg.train.optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"^dalle\.depth: must be >= 1"):
        Config.load(overrides={"dalle.depth": 0})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dalle": {"dpeth": 4}}, r"dalle\.dpeth: unknown field"),
        ({"vae": {"image_size": 30}}, r"vae\.image_size: must be a power of 2"),
        ({"train": {"zero_stage": 4}}, r"train\.zero_stage: must be one of \(0, 1, 2, 3\), got 4"),
        ({"train": {"precision": "fp8"}}, r"train\.precision: must be one of"),
        ({"train_vae": {"precision": "fp16"}}, r"train_vae\.precision: must be fp32 or bf16"),
        ({"train_vae": {"max_steps": 100, "decoder_finetune_steps": 100}},
         r"train_vae\.decoder_finetune_steps: must be less than max_steps \(100\)"),
        ({"train": {"batch_size": "32"}}, r"train\.batch_size: must be an integer"),
        ({"train": {"optim": {"lr": -1}}}, r"train\.optim\.lr: must be > 0"),
        ({"dalle": {"attn_types": "full"}}, r"dalle\.attn_types: must be a list"),
        ({"dalle": {"text_seq_len": 99}}, r"dalle\.text_seq_len: is 99 but tokenizer\.text_seq_len is"),
        ({"dalle": {"num_image_tokens": 3}}, r"dalle\.num_image_tokens: is 3 but vae\.num_tokens is"),
        ({"sampling": {"top_images": 99}}, r"sampling\.top_images: must be in"),
        ({"train": {"num_workers": 4, "min_workers": 8}}, r"train\.min_workers: must be <= train\.num_workers=4"),
    ],
)
def test_mistakes_name_the_field(tmp_path, data, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        Config.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [(None, "cannot read: No such file or directory"), ("a: [\n", "not valid YAML"),
     ("dalle: [1]\n", "dalle: must be a mapping"), ("dalle: 3\n", "dalle: must be a mapping"),
     ("- 1\n", "top level must be a mapping"), ("dalle:\n  dpeth: 2\n", "dalle.dpeth: unknown field")],
)
def test_config_file_mistakes_are_one_line_and_exit_2(tmp_path, capsys, text, message):
    """As a user meets them: ``jobs/train.py --config <bad>`` answers in one line, exit code 2, no Ray."""
    import ray

    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    assert job_main("train")(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not ray.is_initialized()
