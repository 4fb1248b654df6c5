"""Real data into raw Parquet shards: a URL list (img2dataset), a folder of image + .txt pairs, WebDataset tars.

    python jobs/ingest.py --config configs/tiny.yaml --source urls --input urls.parquet --output data/raw
    python jobs/ingest.py --source folder --input data/pictures --output data/raw
    ray job submit --working-dir . -- python jobs/ingest.py --source webdataset \\
        --input s3://bucket/wds --output s3://bucket/raw

Failed rows stay in the shards with their status; pretokenize turns them into rejects with a reason.
With --output-format webdataset img2dataset writes tars: ingest those with --source webdataset afterwards.
"""

from __future__ import annotations

import json
import sys
import time

from pipelines.cli import connect_ray, job_entry, job_parser, load_job_config
from pipelines.config import INGEST_SOURCES
from pipelines.data.ingest import ingest_folder, ingest_url_list, ingest_webdataset

RUNNERS = {"urls": ingest_url_list, "folder": ingest_folder, "webdataset": ingest_webdataset}


@job_entry("ingest")
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--source", choices=INGEST_SOURCES, default=None, help="ingest.source")
    parser.add_argument("--input", required=True, help="URL list file, image folder or tar folder (local or s3://)")
    parser.add_argument("--output", default=None, help="raw shard folder, local or s3:// (paths.raw)")
    parser.add_argument("--url-col", default=None, help="ingest.url_col")
    parser.add_argument("--caption-col", default=None, help="ingest.caption_col")
    parser.add_argument("--output-format", default=None, help="ingest.output_format (parquet | webdataset)")
    parser.add_argument("--samples-per-shard", type=int, default=None, help="ingest.samples_per_shard")
    args = parser.parse_args(argv)
    flags = {"ingest.source": args.source, "ingest.url_col": args.url_col, "ingest.caption_col": args.caption_col,
             "ingest.output_format": args.output_format, "ingest.samples_per_shard": args.samples_per_shard}
    config = load_job_config(args.config, flags)
    output = args.output or config.paths.resolved().raw
    if config.ingest.source != "urls":  # img2dataset runs its own processes
        connect_ray(args.address)
    start = time.perf_counter()
    counts = RUNNERS[config.ingest.source](args.input, output, config.ingest)
    print(json.dumps({"source": config.ingest.source, "output": output, "rows_by_status": counts,
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
