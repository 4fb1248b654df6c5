"""Stage one: train the DiscreteVAE on raw shards with Ray Train (DDP).

    python jobs/train_vae.py --config configs/tiny.yaml                   # paths.raw -> paths.vae
    ray job submit --working-dir . -- python jobs/train_vae.py --config configs/tiny.yaml

Checkpoints, metrics.jsonl, TensorBoard and reconstruction grids (samples/*.png) go to
<storage-path>/<run-name>; the final self-describing dVAE is copied to --output (paths.vae). Rerunning with
the same run name resumes. On the synthetic set, reconstruction.json in the run directory says how often
decode(encode(x)) keeps colour and shape (the checker, on fresh pictures).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from pipelines import storage  # noqa: E402
from pipelines.cli import connect_ray, job_parser, load_job_config  # noqa: E402
from pipelines.data.raw import list_raw_shards  # noqa: E402
from pipelines.data.synthetic import dvae_reconstruction, has_ground_truth  # noqa: E402
from pipelines.train.dalle import run_dir  # noqa: E402
from pipelines.train.vae import build_vae_trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--input", default=None, help="raw shard folder, local or s3:// (paths.raw)")
    parser.add_argument("--output", default=None, help="final dVAE checkpoint (paths.vae)")
    parser.add_argument("--storage-path", default=None, help="run storage (paths.runs)")
    parser.add_argument("--run-name", default=None, help="run name; the same name resumes (train_vae.run_name)")
    parser.add_argument("--num-workers", type=int, default=None, help="train_vae.num_workers")
    parser.add_argument("--max-steps", type=int, default=None, help="train_vae.max_steps")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    args = parser.parse_args(argv)
    flags = {"train_vae.num_workers": args.num_workers, "train_vae.max_steps": args.max_steps}
    config = load_job_config("train_vae", args.config, flags)
    if config is None:
        return 2
    paths = config.paths.resolved()
    raw = args.input or paths.raw
    try:
        shards = list_raw_shards(raw)  # fail before Ray starts when there is nothing to train on
    except FileNotFoundError as exc:
        print(f"train_vae: {exc}", file=sys.stderr)
        return 2
    output = args.output or paths.vae
    storage_path = args.storage_path or paths.runs
    name = args.run_name or config.train_vae.run_name

    connect_ray(args.address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    result = build_vae_trainer(config, raw=raw, storage_path=storage_path, run_name=name).fit()
    with result.checkpoint.as_directory() as ckpt:
        storage.write_bytes(output, Path(ckpt, "vae.pt").read_bytes())
    where = run_dir(storage_path, name)
    print(f"run directory:  {where} (metrics.jsonl, tensorboard/, samples/*.png)")
    print(f"checkpoint:     {where}/{os.path.basename(result.checkpoint.path)}")
    print(f"dVAE:           {output}")
    print(f"final metrics:  {result.metrics}")
    if has_ground_truth(shards[0]):  # the synthetic set: score what the codes keep
        reconstruction = dvae_reconstruction(output, config.synthetic)
        storage.write_json(f"{where}/reconstruction.json", reconstruction)
        print(f"reconstruction: {json.dumps(reconstruction)} ({where}/reconstruction.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
