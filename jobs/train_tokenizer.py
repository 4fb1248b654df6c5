"""Trains the youtokentome BPE tokenizer on the normalised captions of raw shards (read with Ray Data).

    python jobs/train_tokenizer.py --config configs/tiny.yaml          # paths.raw -> paths.tokenizer
    ray job submit --working-dir . -- python jobs/train_tokenizer.py --config configs/base.yaml \\
        --input s3://bucket/raw --output s3://bucket/tokenizer/bpe.model
"""

from __future__ import annotations

import json
import sys
import time

from dalle_core.tokenizer import BPETokenizer
from pipelines.cli import connect_ray, job_entry, job_parser, load_job_config
from pipelines.data.captions import iter_captions


@job_entry("train_tokenizer")
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--input", default=None, help="raw shard folder, local or s3:// (paths.raw)")
    parser.add_argument("--output", default=None, help="model file, local or s3:// (paths.tokenizer)")
    parser.add_argument("--vocab-size", type=int, default=None, help="tokenizer.vocab_size")
    args = parser.parse_args(argv)
    flags = {"tokenizer.vocab_size": args.vocab_size}
    config = load_job_config(args.config, flags)
    paths = config.paths.resolved()
    raw, output = args.input or paths.raw, args.output or paths.tokenizer
    connect_ray(args.address)
    start = time.perf_counter()
    captions = list(iter_captions(raw))
    tokenizer = BPETokenizer.train(captions, output, config.tokenizer.vocab_size, config.tokenizer.text_seq_len)
    print(json.dumps({"output": output, "captions": len(captions), "vocab_size": tokenizer.vocab_size,
                      "model_hash": tokenizer.model_hash, "seconds": round(time.perf_counter() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
