"""benchmarks/gpu_check.py, the one-GPU check, run on the CPU with tiny shapes; and the matmul peak's timer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import model_timing  # noqa: E402

from dalle_core.train_utils import measure_peak_flops  # noqa: E402

# What the GPU machine lacks: the check must not import Ray or DeepSpeed, and it stubs the rest (hidden here).
RUN_WITHOUT = """
import runpy, sys
for name in ("ray", "deepspeed"):
    sys.modules[name] = None  # importing it now raises ImportError
sys.argv = ["gpu_check.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0].replace("gpu_check.py", "{script}"), run_name="__main__")
"""


def positive_numbers(tree: object) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in positive_numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_gpu_check_quick_cpu_run_reports_every_section(tmp_path):
    """The whole check on the CPU (``--quick``): every section present with positive figures, the collectives
    ok under a one-rank gloo group, and only torch needed (Ray and DeepSpeed unimportable, PyYAML, fsspec,
    ftfy, youtokentome and Pillow stubbed)."""
    out = tmp_path / "tmp.json"
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    began = time.monotonic()
    subprocess.run([sys.executable, "-c", RUN_WITHOUT.format(script=script), "--device", "cpu", "--quick",
                    "--out", str(out), "--hide-modules", "yaml,fsspec,ftfy,youtokentome,PIL"],
                   check=True, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    elapsed = time.monotonic() - began
    report = json.loads(out.read_text())
    assert report["stubbed_modules"] == ["PIL", "fsspec", "ftfy", "yaml", "youtokentome"]
    assert report["machine"]["threads"] >= 1
    sections = report["sections"]
    assert set(sections) == {"train", "sampling", "encoders", "collectives"}
    assert not [name for name, s in sections.items() if "error" in s], sections
    for name in ("paper_shape", "base"):
        entry = sections["train"][name]
        assert entry["tokens_per_s"] > 0 and 0 < entry["mfu"] and entry["matmul_peak_tflops"] > 0, entry
    sampling = sections["sampling"]
    for key in ("eager", "static", "eager_guided", "static_guided"):
        assert sampling["batch_1"][f"{key}_image_tokens_per_s"] > 0
    for batch in (8, 32):
        entry = sampling[f"batch_{batch}"]
        assert all(f"{k}_image_tokens_per_s" in entry or entry[k] == {"skipped": "time budget"}
                   for k in ("eager", "static", "eager_guided", "static_guided"))
    assert sampling["tokens_match"]["float32"]["static_equals_eager"] is True
    for name in ("dvae_encoder", "vqgan_encoder", "clip_score"):
        assert sections["encoders"][name]["pictures_per_s"] > 0
    collectives = sections["collectives"]
    assert collectives["backend"] == "gloo" and collectives["all_ok"] is True
    assert collectives["gather_floats_all_gather_float64"] == "ok" and collectives["barrier"] == "ok"
    assert all(x >= 0 for x in positive_numbers(sections))
    assert report["total_s"] < elapsed


class FakeEvent:
    """torch.cuda.Event for a machine without a GPU: records the wall clock; counts the waits."""

    syncs = 0

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self, stream: object = None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        FakeEvent.syncs += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.t - self.t) * 1e3


def fake_cuda(monkeypatch) -> dict[str, int]:
    """Makes ``device="cuda"`` run on the CPU, and counts every synchronisation a GPU timer would make."""
    counts = {"synchronize": 0}
    FakeEvent.syncs = 0
    for fn in ("randn", "empty"):
        real = getattr(torch, fn)
        monkeypatch.setattr(torch, fn, lambda *a, _real=real, device=None, **k: _real(*a, **k))

    def synchronize(device: object = None) -> None:
        counts["synchronize"] += 1

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    return counts


def test_matmul_peak_times_back_to_back_products_with_one_sync_per_batch(monkeypatch):
    """Item 10: a GPU's matmul peak read with a synchronisation after every product pays the launch latency
    each time, so it reads low and the MFU against it high. The timer launches a batch of products between two
    CUDA events and waits once: a handful of waits for thousands of 32^3 products (the old timer waited after
    every product)."""
    counts = fake_cuda(monkeypatch)
    real_matmul = torch.matmul

    def matmul(*args, **kwargs):
        counts["products"] = counts.get("products", 0) + 1
        return real_matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", matmul)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded 2-core machine a product handed to the thread pool waited ~20 ms
    try:
        assert measure_peak_flops("cuda", dtype=torch.float32, shape=(32, 32, 32), seconds=0.1, readings=3) > 0
    finally:
        torch.set_num_threads(threads)
    waits = counts["synchronize"] + FakeEvent.syncs
    assert counts.get("products", 0) > 50 * waits and waits <= 40, counts  # the old timer: one wait a product

    calls = []
    monkeypatch.setattr(model_timing, "measure_peak_flops", lambda *a, **k: calls.append(k["shape"]) or 1.0)
    from dalle_core.config import DALLEConfig
    from dalle_core.dalle import DALLE

    model = DALLE(DALLEConfig(dim=32, depth=1, heads=2, dim_head=16))
    assert model_timing.matmul_peak(torch.float32, model, 10) == 1.0
    assert calls == [(10, 32, 256), (10, 32, model.config.num_image_tokens)]


def test_device_seconds_on_a_cpu_is_the_wall_clock():
    assert 0.01 <= model_timing.device_seconds(lambda: time.sleep(0.02), "cpu") < 1.0
