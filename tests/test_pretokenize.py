"""pretokenize on the synthetic set: codes equal the dVAE's, ids decode to the captions, bad rows become
counted rejects, an interrupted run resumes to exactly the clean run's keys, a rerun with other models is refused,
the manifest guards training."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import write_tiny_models
from PIL import Image

from dalle_core.checkpoint import load_model
from dalle_core.config import DALLEConfig
from dalle_core.tokenizer import BPETokenizer, normalize_caption
from pipelines.config import ConfigError, PretokenizeConfig, SyntheticConfig
from pipelines.data.manifest import MODELS_KEY, check_manifest, read_manifest
from pipelines.data.pretokenize import PretokenizeError, run_pretokenize
from pipelines.data.raw import raw_table
from pipelines.data.synthetic import iter_samples, write_synthetic

REPO = Path(__file__).resolve().parents[1]
CONFIG = PretokenizeConfig(batch_size=64, concurrency=1, min_image_size=16)


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


BAD_ROWS = [
    {"key": "bad-corrupt", "caption": "a red circle", "jpg": b"\xff\xd8\xffnot a jpeg", "status": "success"},
    {"key": "bad-tiny", "caption": "a red circle", "jpg": _png((8, 8)), "status": "success"},
    {"key": "bad-empty-caption", "caption": "   ", "jpg": _png((32, 32)), "status": "success"},
    {"key": "bad-no-caption", "caption": None, "jpg": _png((32, 32)), "status": "success"},
    {"key": "bad-no-image", "caption": "a red circle", "jpg": None, "status": "success"},
    {"key": "bad-download", "caption": "x", "jpg": None, "status": "failed_to_download",
     "error_message": "HTTP Error 404"},
]
TEXT_SEQ_LEN = 48  # the tiny tokenizer (vocab 128) splits a grammar caption into up to ~40 ids: none is cut
EXPECTED_REJECTS = {"undecodable_image": 1, "image_too_small": 1, "empty_caption": 2, "missing_image": 1,
                    "failed_to_download": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("pretok")
    synthetic = SyntheticConfig(num_samples=240, samples_per_shard=40, seed=1)
    write_synthetic(synthetic, str(root / "raw"))
    pq.write_table(raw_table([{**r, "source": "test"} for r in BAD_ROWS]), root / "raw" / "part-bad.parquet")
    train = list(iter_samples(synthetic))
    tokenizer, vae = write_tiny_models(root, [r["caption"] for r in train])
    summary = run_pretokenize(str(root / "raw"), str(root / "clean"), tokenizer, vae, TEXT_SEQ_LEN, CONFIG)
    return {"root": root, "tokenizer": tokenizer, "vae": vae, "train": train, "summary": summary}


def _token_rows(folder: Path) -> list[dict]:
    return [r for p in sorted((folder / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_codes_and_ids_match_the_models(data):
    rows = {r["key"]: r for r in _token_rows(data["root"] / "clean")}
    raw = {r["key"]: r for r in data["train"]}
    assert rows.keys() == raw.keys()
    vae = load_model(data["vae"])
    tokenizer = BPETokenizer.load(data["tokenizer"], TEXT_SEQ_LEN)
    keys = sorted(raw)
    pictures = np.stack([np.asarray(Image.open(io.BytesIO(raw[k]["jpg"])).convert("RGB")) for k in keys])
    expected = vae.get_codebook_indices(torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255)
    got = torch.tensor([rows[k]["image_codes"] for k in keys])
    assert torch.equal(got, expected)
    for k in keys:
        assert rows[k]["caption"] == normalize_caption(raw[k]["caption"])
        assert tokenizer.decode(rows[k]["text_ids"]) == rows[k]["caption"]
        assert rows[k]["source"] == "synthetic"
    schema = pq.read_schema(next((data["root"] / "clean" / "data").glob("*.parquet")))
    assert schema.field("image_codes").type == pa.list_(pa.uint16(), 64)
    assert schema.field("text_ids").type == pa.list_(pa.int32())


def test_rejects_and_manifest(data):
    clean = data["root"] / "clean"
    manifest = read_manifest(str(clean))
    n = len(data["train"])
    assert manifest["num_rows"] == n and manifest["pairs_in"] == n + len(BAD_ROWS)
    assert manifest["rejects"]["by_reason"] == EXPECTED_REJECTS
    assert data["summary"]["rejects_by_reason"] == EXPECTED_REJECTS
    assert data["summary"]["pairs_out"] == n
    rejects = pq.read_table(clean / "rejects" / "part-bad.parquet").to_pylist()
    assert {r["key"] for r in rejects} == {r["key"] for r in BAD_ROWS}
    assert all(r["reason"] and r["source"] == "test" for r in rejects)
    assert sum(s["rows"] for s in manifest["shards"]) == n
    assert all((clean / s["path"]).exists() for s in manifest["shards"])
    assert (manifest["image_seq_len"], manifest["text_seq_len"], manifest["codebook_size"]) == (64, TEXT_SEQ_LEN, 64)
    assert sum(manifest["codebook_usage"]["histogram"]) == n * 64
    assert manifest["tokenizer"]["model_hash"] == BPETokenizer.load(data["tokenizer"], TEXT_SEQ_LEN).model_hash
    assert len(manifest["vae"]["checkpoint_hash"]) == 64
    assert (manifest["vae"]["kind"], manifest["vae"]["pixel_range"]) == ("DiscreteVAE", "minus1_1")


def test_manifest_mismatch_names_the_field(data):
    manifest = read_manifest(str(data["root"] / "clean"))
    good = DALLEConfig(num_text_tokens=128, text_seq_len=TEXT_SEQ_LEN, num_image_tokens=64, image_fmap_size=8)
    check_manifest(manifest, good)
    with pytest.raises(ConfigError, match=r"manifest.image_seq_len=64 but dalle.image_seq_len=16"):
        check_manifest(manifest, DALLEConfig(num_text_tokens=128, text_seq_len=TEXT_SEQ_LEN, num_image_tokens=64,
                                             image_fmap_size=4))
    with pytest.raises(ConfigError, match=r"manifest.codebook_size=64 but dalle.num_image_tokens=512"):
        check_manifest(manifest, DALLEConfig(num_text_tokens=128, text_seq_len=TEXT_SEQ_LEN, num_image_tokens=512,
                                             image_fmap_size=8))
    with pytest.raises(ConfigError, match=r"manifest.tokenizer.vocab_size"):
        check_manifest(manifest, DALLEConfig(num_text_tokens=8, text_seq_len=TEXT_SEQ_LEN, num_image_tokens=64,
                                             image_fmap_size=8))
    with pytest.raises(ConfigError, match=r"manifest.vae.checkpoint_hash"):
        check_manifest(manifest, good, vae_hash="0" * 64)
    with pytest.raises(ConfigError, match=r"manifest.vae.kind=DiscreteVAE but vae.kind=VQGAN"):
        check_manifest(manifest, good, vae_kind="VQGAN")


def test_interrupted_run_resumes_to_the_clean_key_set(data, tmp_path):
    root, out = data["root"], tmp_path / "resumed"
    config = tmp_path / "config.yaml"
    config.write_text(f"tokenizer: {{vocab_size: 128, text_seq_len: {TEXT_SEQ_LEN}}}\n")
    cmd = [sys.executable, str(REPO / "jobs" / "pretokenize.py"), "--config", str(config),
           "--input", str(root / "raw"), "--output", str(out),
           "--tokenizer", data["tokenizer"], "--vae", data["vae"], "--batch-size", "16",
           "--address", ray.get_runtime_context().gcs_address]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "data").glob("*.parquet")) and job.poll() is None:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the job and nothing else: its own session
    job.wait()
    done = sorted((out / "data").glob("*.parquet"))
    assert done, "the job wrote nothing before it was killed"
    assert not (out / "manifest.json").exists() or len(done) == 7
    # Make sure there is work left however far it got: one finished shard lost, one truncated mid-write.
    done[0].unlink()
    if len(done) > 1:
        done[-1].write_bytes(done[-1].read_bytes()[:100])
    (out / "data" / ".tmp-leftover").write_bytes(b"partial")
    untouched = {p.name: p.stat().st_mtime_ns for p in done[1:-1]}

    summary = run_pretokenize(str(root / "raw"), str(out), data["tokenizer"], data["vae"], TEXT_SEQ_LEN, CONFIG)
    keys = [r["key"] for r in _token_rows(out)]
    clean_keys = [r["key"] for r in _token_rows(root / "clean")]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(clean_keys)
    assert summary["shards_written"] >= 1 and summary["pairs_out"] == len(clean_keys)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet") if p.name in untouched} == untouched
    assert not list((out / "data").glob(".tmp-*"))
    assert read_manifest(str(out))["rejects"]["by_reason"] == EXPECTED_REJECTS

    again = run_pretokenize(str(root / "raw"), str(out), data["tokenizer"], data["vae"], TEXT_SEQ_LEN, CONFIG)
    assert again["shards_skipped"] == 7 and again["pairs_processed_this_run"] == 0
    redo = run_pretokenize(str(root / "raw"), str(out), data["tokenizer"], data["vae"], TEXT_SEQ_LEN,
                           PretokenizeConfig(batch_size=64, overwrite=True))
    assert redo["shards_written"] == 7 and sorted(r["key"] for r in _token_rows(out)) == sorted(clean_keys)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_rerun_with_other_models_is_refused_unless_overwrite(data, tmp_path):
    root, out = data["root"], tmp_path / "out"
    shutil.copytree(root / "clean", out)
    _, other_vae = write_tiny_models(tmp_path, [r["caption"] for r in data["train"]], seed=1)
    old_hash = read_manifest(str(out))["vae"]["checkpoint_hash"]
    new_hash = hashlib.sha256(Path(other_vae).read_bytes()).hexdigest()
    assert old_hash != new_hash
    before = _files(out)

    def rerun(vae: str, text_seq_len: int = TEXT_SEQ_LEN, config: PretokenizeConfig = CONFIG) -> dict:
        return run_pretokenize(str(root / "raw"), str(out), data["tokenizer"], vae, text_seq_len, config)

    with pytest.raises(PretokenizeError, match=f"vae.checkpoint_hash={old_hash} there, {new_hash} now"):
        rerun(other_vae)
    with pytest.raises(PretokenizeError, match=f"tokenizer.text_seq_len={TEXT_SEQ_LEN} there, 12 now"):
        rerun(data["vae"], text_seq_len=12)
    assert _files(out) == before  # refused before anything was written
    # A half-finished old run: no manifest yet and a shard still to do; the finished shards' footers tell.
    (out / "manifest.json").unlink()
    sorted((out / "data").glob("*.parquet"))[0].unlink()
    with pytest.raises(PretokenizeError, match=f"{old_hash} there, {new_hash} now"):
        rerun(other_vae)

    summary = rerun(other_vae, config=PretokenizeConfig(batch_size=64, overwrite=True))
    assert summary["shards_written"] == 7 and summary["shards_skipped"] == 0
    assert read_manifest(str(out))["vae"]["checkpoint_hash"] == new_hash
    for path in (out / "data").glob("*.parquet"):
        assert json.loads(pq.read_schema(path).metadata[MODELS_KEY])["vae"]["checkpoint_hash"] == new_hash
    new_codes = {r["key"]: r["image_codes"] for r in _token_rows(out)}
    old_codes = {r["key"]: r["image_codes"] for r in _token_rows(root / "clean")}
    assert new_codes.keys() == old_codes.keys() and new_codes != old_codes  # really re-encoded by the new dVAE


def test_entirely_bad_input_exits_non_zero(data, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(raw_table([{**r, "source": "test"} for r in BAD_ROWS]), raw / "00000.parquet")
    sys.path.insert(0, str(REPO / "jobs"))
    import pretokenize as job

    code = job.main(["--input", str(raw), "--output", str(tmp_path / "out2"), "--tokenizer", data["tokenizer"],
                     "--vae", data["vae"]])
    assert code == 2  # the input is at fault, not the run
    assert "all 6 input pairs were rejected" in capsys.readouterr().err
    assert pq.read_table(tmp_path / "out2" / "rejects" / "00000.parquet").num_rows == len(BAD_ROWS)
