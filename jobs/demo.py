"""The whole chain, one stage after another, on one Ray cluster: data -> BPE -> dVAE -> pretokenize -> DALLE
-> CLIP -> evaluation. Each stage is the job of the same name in jobs/, run as its own process.

    python jobs/demo.py --config configs/tiny.yaml                        # built-in synthetic set, local
    python jobs/demo.py --source folder --input data/pictures --root s3://bucket/dalle-run

``--root`` moves every artifact (local folder or s3://); ``--source``/``--input`` replace the synthetic set
by real data ingested through jobs/ingest.py. Without ``RAY_ADDRESS`` a local Ray is started for the chain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from dalle_core.config import load_yaml
from pipelines import storage
from pipelines.cli import LOCAL_MIN_CPUS, job_entry, job_parser, load_job_config
from pipelines.config import INGEST_SOURCES
from pipelines.serve.report import format_metrics

JOBS = Path(__file__).resolve().parent
SEEDED = ("synthetic", "train_vae", "train", "train_clip", "sampling")  # the config sections with a seed field
STAGES = ("data", "tokenizer", "dvae", "pretokenize", "dalle", "clip", "evaluate")  # the chain, in order


def stages(args: argparse.Namespace, config_path: str) -> list[tuple[str, list[str]]]:
    """(name, command) for every stage, in order."""
    cfg = ["--config", config_path]
    if args.input:
        data = ["ingest.py", *cfg, "--source", args.source, "--input", args.input]
    else:
        data = ["make_synthetic.py", *cfg]
    scripts = [data, ["train_tokenizer.py", *cfg], ["train_vae.py", *cfg], ["pretokenize.py", *cfg],
               ["train.py", *cfg], ["train_clip.py", *cfg], ["evaluate.py", *cfg]]
    return [(name, [sys.executable, str(JOBS / cmd[0]), *cmd[1:]]) for name, cmd in zip(STAGES, scripts, strict=True)]


@job_entry("demo")
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--root", help="where every artifact goes, local or s3:// (paths.root)")
    parser.add_argument("--source", choices=INGEST_SOURCES, default="folder", help="kind of --input")
    parser.add_argument("--input", help="real data instead of the synthetic set (URL list, folder or tars)")
    parser.add_argument("--seed", type=int, help="one seed for every stage that draws randomness: the synthetic "
                        "set, the three trainers and sampling (" + ", ".join(SEEDED) + ")")
    parser.add_argument("--from-stage", choices=STAGES,
                        help="skip the stages before this one (their outputs must exist)")
    parser.add_argument("--num-cpus", type=int, default=LOCAL_MIN_CPUS,
                        help="logical CPUs of the local Ray (more than cores, so Train workers leave room for "
                             "Ray Data)")
    args = parser.parse_args(argv)

    flags = {"paths.root": args.root, **{f"{section}.seed": args.seed for section in SEEDED}}
    config = load_job_config(args.config, flags)  # every mistake before a stage starts
    data = load_yaml(args.config)
    for dotted, value in flags.items():  # the stages read the same config, flags included
        if value is not None:
            section, key = dotted.split(".")
            data.setdefault(section, {})[key] = value
    workdir = Path(tempfile.mkdtemp(prefix="dalle-demo-"))
    config_path = str(workdir / "config.yaml")
    Path(config_path).write_text(yaml.safe_dump(data, sort_keys=False))
    chain = stages(args, config_path)
    if args.from_stage:
        chain = chain[STAGES.index(args.from_stage):]

    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), NO_ALBUMENTATIONS_UPDATE="1")
    address = args.address or os.environ.get("RAY_ADDRESS")
    cluster = None
    if address:
        env["RAY_ADDRESS"] = address
    else:
        import ray

        os.environ.update({k: env[k] for k in ("DS_ACCELERATOR", "NO_ALBUMENTATIONS_UPDATE")})
        # The stages are drivers of their own; this one only keeps the cluster up, without echoing their logs.
        cluster = ray.init(address="local", num_cpus=args.num_cpus, log_to_driver=False)
        env["RAY_ADDRESS"] = cluster.address_info["gcs_address"]
    timings = {}
    try:
        for name, command in chain:
            print(f"\n=== [{len(timings) + 1}/{len(chain)}] {name}: {' '.join(command[1:])}", flush=True)
            start = time.perf_counter()
            code = subprocess.call(command, env=env, cwd=JOBS.parent)
            timings[name] = round(time.perf_counter() - start, 1)
            if code != 0:
                print(f"demo: stage {name!r} failed with exit code {code}", file=sys.stderr)
                return code
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if cluster is not None:
            import ray

            ray.shutdown()
    paths = config.paths.resolved()
    print("\n=== artifacts")
    for key in ("raw", "tokenizer", "vae", "shards", "runs", "dalle", "clip", "evaluation"):
        print(f"{key:>12}: {getattr(paths, key)}")
    print(f"\n=== seconds per stage: {json.dumps(timings)} (total {sum(timings.values()):.0f})")
    metrics_path = storage.join(paths.evaluation, "metrics.json")
    if storage.exists(metrics_path):
        print(f"\n=== metrics ({metrics_path}; report.html beside it)")
        print(format_metrics(storage.read_json(metrics_path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
