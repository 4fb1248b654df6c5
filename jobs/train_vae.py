"""Stage one: train the DiscreteVAE on raw shards with Ray Train (DDP).

    python jobs/train_vae.py --config configs/tiny.yaml                   # paths.raw -> paths.vae
    ray job submit --working-dir . -- python jobs/train_vae.py --config configs/tiny.yaml

Checkpoints, metrics.jsonl, TensorBoard and reconstruction grids (samples/*.png) go to
<storage-path>/<run-name>; the final self-describing dVAE is published to --output (paths.vae). Rerunning with
the same run name resumes; ``--init-from VAE.safetensors`` with a new run name fine-tunes a published dVAE. On the
synthetic set, reconstruction.json in the run directory says how often decode(encode(x)) keeps colour and shape
(the checker, on fresh pictures).
"""

from __future__ import annotations

import json
import sys

from pipelines import artifacts
from pipelines.cli import add_trainer_flags, connect_ray, job_entry, job_parser, load_job_config, trainer_overrides
from pipelines.data.raw import list_raw_shards
from pipelines.resources import plan_resources
from pipelines.train.finetune import check_init_from
from pipelines.train.vae import train_vae


@job_entry("train_vae")
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--input", help="raw shard folder, local or s3:// (paths.raw)")
    add_trainer_flags(parser, "train_vae", "vae")
    args = parser.parse_args(argv)
    config = load_job_config(args.config, trainer_overrides(args, "train_vae"))
    paths = config.paths.resolved()
    raw = args.input or paths.raw
    storage_path, name, output = args.storage_path or paths.runs, config.train_vae.run_name, args.output or paths.vae
    check_init_from(config, config.train_vae, storage_path=storage_path, run_name=name)
    list_raw_shards(raw)  # fail before Ray starts when there is nothing to train on

    connect_ray(args.address, plan_resources("train_vae", config))
    result, reconstruction = train_vae(config, raw=raw, storage_path=storage_path, run_name=name, output=output)
    where = artifacts.run_dir(storage_path, name)
    print(f"run directory:  {where} (metrics.jsonl, tensorboard/, samples/*.png)")
    print(f"dVAE:           {output}")
    print(f"final step:     {result.metrics['step']}")
    if reconstruction:
        print(f"reconstruction: {json.dumps(reconstruction)} ({where}/reconstruction.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
