"""One-off generation without Ray: ``python jobs/generate.py --prompt "a small red circle on the left" -n 8``.

Writes ``<out>/rank<r>_cand<c>.png`` for every candidate (ranked by CLIP when a CLIP checkpoint is found or
given, else in sampling order) and ``<out>/grid.png``, then prints a JSON summary. Model paths default from
the config's ``paths`` section (the published ``paths.dalle``, else the newest checkpoint under ``paths.runs``);
flags override them.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from dalle_core.checkpoint import load_model
from dalle_core.config import PRECISIONS
from dalle_core.images import png_bytes
from dalle_core.io import exists, write_bytes
from dalle_core.sampling import generate_prompt, load_generator
from dalle_core.tokenizer import BPETokenizer
from pipelines.artifacts import model_paths
from pipelines.cli import job_entry, job_parser, load_job_config
from pipelines.serve.report import grid_png


@job_entry("generate")
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, uses_ray=False)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("-n", "--num-candidates", type=int, help="default: sampling.num_candidates")
    parser.add_argument("--checkpoint", help="DALLE model file; default: paths.dalle, else newest under paths.runs")
    parser.add_argument("--vae", help="default: paths.vae")
    parser.add_argument("--tokenizer", help="default: paths.tokenizer")
    parser.add_argument("--clip", help="CLIP model file for reranking; default: paths.clip if it exists")
    parser.add_argument("--no-rerank", action="store_true", help="keep sampling order, load no CLIP")
    parser.add_argument("--output", help="output folder (local or s3://); default: <paths.evaluation>/generate")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=float)
    parser.add_argument("--cond-scale", type=float)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, help="sampling.precision (auto: bf16 where native)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="sampling.compile: compile the sampling step (pays over many prompts, not one)")
    args = parser.parse_args(argv)

    config = load_job_config(args.config, {
        "sampling.seed": args.seed, "sampling.temperature": args.temperature, "sampling.top_k": args.top_k,
        "sampling.cond_scale": args.cond_scale, "sampling.num_candidates": args.num_candidates,
        "sampling.precision": args.precision, "sampling.compile": args.compile,
        # any n >= 1 is valid here; every candidate is written anyway
        "sampling.top_images": 1 if args.num_candidates is not None else None})
    models = model_paths(config, args.checkpoint, args.vae, args.tokenizer, args.clip)
    generator = load_generator(models.checkpoint, models.vae, args.device, config.sampling.precision,
                               config.sampling.compile, config.sampling.cuda_graphs)
    print(f"precision={generator.precision} ({generator.precision_reason})", file=sys.stderr)
    # The checkpoint says how many text ids the model reads, whatever the config beside it says.
    tokenizer = BPETokenizer.load(models.tokenizer, generator.text_seq_len)
    generator.check_tokenizer(tokenizer)
    clip_path = None if args.no_rerank else models.clip
    if clip_path and not args.clip and not exists(clip_path):
        clip_path = None  # the default CLIP is optional; an explicit --clip that is missing is an error
    scorer = load_model(clip_path, map_location=args.device) if clip_path else None

    sampling = config.sampling
    result = generate_prompt(generator, tokenizer, args.prompt, sampling.num_candidates, sampling, scorer)
    if not result.check.ok:
        print(json.dumps({"prompt": args.prompt, "status": result.check.status, "detail": result.check.detail}))
        return 2
    out = (args.output or f"{config.paths.resolved().evaluation}/generate").rstrip("/")
    files = []
    for rank, cand in enumerate(result.order):
        files.append(f"{out}/rank{rank}_cand{cand}.png")
        write_bytes(files[-1], png_bytes(result.images[cand]))
    write_bytes(f"{out}/grid.png", grid_png([[result.images[c] for c in result.order]]))
    settings = dict(dataclasses.asdict(sampling), precision=generator.precision,
                    precision_reason=generator.precision_reason)
    print(json.dumps({"prompt": args.prompt, "status": "ok", "checkpoint": models.checkpoint, "files": files,
                      "grid": f"{out}/grid.png", "scores": [result.scores[c] for c in result.order]
                      if result.scores else None, "sampling": settings}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
