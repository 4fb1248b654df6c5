"""How jobs end when something is wrong, as a user meets it: one line and exit code 2 for their mistake (before
Ray starts where the mistake can be seen without it), one line and 1 for a failed run, 130 for Ctrl-C, and word
of what a job waits for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from conftest import JOBS, job_main
from test_train import tiny_config, write_token_shards

from dalle_core.config import to_dict
from pipelines.cli import LOCAL_MIN_CPUS, connect_ray, job_entry, one_line
from pipelines.cluster import report_resource_waits, require_resources
from pipelines.config import InputError
from pipelines.resources import plan_resources


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """Token shards (96 rows) and a config file that fits them."""
    root = tmp_path_factory.mktemp("cli")
    write_token_shards(root / "shards", tiny_config())
    (root / "cfg.yaml").write_text(json.dumps(to_dict(tiny_config())))
    return root / "cfg.yaml", root / "shards"


def run_train(capsys, train_inputs, tmp_path, *flags: str) -> tuple[int, str]:
    config, shards = train_inputs
    code = job_main("train")(["--config", str(config), "--shards", str(shards), "--storage-path",
                              str(tmp_path / "runs"), *flags])
    return code, capsys.readouterr().err


def test_more_workers_than_the_machine_has_is_refused_before_ray(capsys, train_inputs, tmp_path):
    """The old hang: as many one-CPU workers as the local Ray has CPUs leave none to the Ray Data tasks that
    feed them, and the job waited forever without a word."""
    workers = max(LOCAL_MIN_CPUS, os.cpu_count() or 1)
    code, err = run_train(capsys, train_inputs, tmp_path, "--num-workers", str(workers), "--batch-size", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"train: needs {workers + 1} CPU (with 1 CPU left for the Ray Data tasks"), err
    assert f"the cluster has {workers} CPU on this machine" in err and "lower train.num_workers" in err, err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


def test_fewer_rows_than_one_step_is_refused_before_ray(capsys, train_inputs, tmp_path):
    _, shards = train_inputs
    big = to_dict(tiny_config(**{"train.batch_size": 32}))  # 32 x 4 workers = 128 rows > 96
    (tmp_path / "big.yaml").write_text(json.dumps(big))
    code = job_main("train")(["--config", str(tmp_path / "big.yaml"), "--shards", str(shards),
                              "--num-workers", "4", "--storage-path", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "train.batch_size=32 x train.num_workers=4 needs at least 128 training rows" in err
    assert "has 96" in err and not ray.is_initialized()


def test_without_an_address_a_job_starts_a_ray_of_its_own(monkeypatch):
    """Not the cluster a `ray start` left on this machine, which plain ray.init() would join and then refuse."""
    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    connect_ray()
    connect_ray("10.0.0.1:6379")
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] >= LOCAL_MIN_CPUS
    assert calls[1] == {"address": "10.0.0.1:6379"}


def test_generate_with_a_missing_checkpoint_is_one_line(capsys, tmp_path):
    code = job_main("generate")(["--prompt", "a red circle", "--checkpoint", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"generate: no such file: {tmp_path / 'none.pt'}"


def test_a_failed_run_is_one_line_exit_1_and_debug_adds_the_traceback(capsys):
    class WorkerGroupError(RuntimeError):  # the shape of Ray Train's: a remote traceback per failed rank
        worker_failures = {1: RuntimeError("Traceback (most recent call last):\n  File x\nValueError: bad step")}

    @job_entry("demo_job")
    def main(argv: list[str] | None = None) -> int:
        raise WorkerGroupError("Training failed:\n" + "  long remote traceback\n" * 20)

    assert main([]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "demo_job: failed: worker 1: ValueError: bad step (--debug shows the traceback)"
    assert main(["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("worker 1: ValueError: bad step")
    assert one_line(InputError("x")) == "x"


def test_ctrl_c_stops_training_and_names_the_checkpoint_to_resume_from(train_inputs, tmp_path):
    """A real run, as a user starts it (its own local Ray): SIGINT mid-run ends it in seconds with exit 130, a
    line saying where a rerun resumes, and no model published as if the run had finished."""
    config, shards = train_inputs
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen([sys.executable, str(JOBS / "train.py"), "--config", str(config), "--shards", str(shards),
                            "--storage-path", str(tmp_path / "runs"), "--output", str(tmp_path / "dalle.pt"),
                            "--max-steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, start_new_session=True)
    try:
        for line in job.stdout:  # the workers' step lines, streamed through the driver
            if "[train] step 6/" in line:
                break
        else:
            pytest.fail(f"the run ended before step 6: {job.stderr.read()[-2000:]}")
        os.kill(job.pid, signal.SIGINT)
        start = time.monotonic()
        _, err = job.communicate(timeout=120)
        stopped_in = time.monotonic() - start
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("train: ")]  # Ray's own log lines interleave
    assert len(ours) == 1 and ours[0].startswith("train: interrupted: ") and "checkpoint_step_0000" in ours[0], ours
    assert stopped_in < 60 and not (tmp_path / "dalle.pt").exists()


def test_a_connected_cluster_too_small_is_refused_and_a_pending_request_is_reported(ray_cluster, capfd):
    plan = plan_resources("train", tiny_config(**{"train.num_workers": 6}))
    with pytest.raises(InputError, match=r"needs 7 CPU .* but the cluster has 4 CPU in all: lower train\.num_workers"):
        require_resources(plan)
    group = ray.util.placement_group([{"CPU": 1.0}] * 6)  # can never be placed on 4 CPUs: stays pending
    try:
        with report_resource_waits("train", every_s=0.5):
            time.sleep(2.0)
    finally:
        ray.util.remove_placement_group(group)
    err = capfd.readouterr().err
    assert "[train] waiting for resources: 6 worker slot(s) of 1 CPU pending; the cluster has 4 CPU" in err, err
