"""Converts a released model (an image tokenizer or a CLIP reranker), once, into this project's checkpoint.

    python jobs/import_model.py openai --encoder dvae/encoder.pkl --decoder dvae/decoder.pkl \\
        --output models/openai_dvae.safetensors
    python jobs/import_model.py vqgan --checkpoint vqgan_f16_16384/last.ckpt \\
        --model-yaml vqgan_f16_16384/model.yaml --output models/vqgan_f16_16384.safetensors [--pixel-range 0_1]
    python jobs/import_model.py open_clip --model ViT-B-32 --checkpoint open_clip_vit_b_32.safetensors \
        --output models/clip_vit_b_32.safetensors

The downloaded files are read without running any code from them (see ``dalle_core/pickles.py``): OpenAI's
files are whole pickled modules, a taming ``.ckpt`` pickles OmegaConf and Lightning objects; open_clip weights
(``.safetensors``, or a ``.pt``/``.bin`` state_dict) are read as tensors only. Every path may be local or
``s3://``. Point ``paths.vae`` at a tokenizer's output (the JSON printed names the ``dalle`` fields the
transformer needs and the sha256 that manifests record) and ``paths.clip`` (or ``--clip``) at a CLIP's.
"""

from __future__ import annotations

import json
import pickle
import sys

from dalle_core.checkpoint import save_model, tensors_from_bytes
from dalle_core.io import read_bytes
from pipelines.cli import job_entry, job_parser
from pipelines.config import InputError


@job_entry("import_model")
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, uses_ray=False)
    kinds = parser.add_subparsers(dest="kind", required=True)
    openai = kinds.add_parser("openai", help="OpenAI's released dVAE (encoder.pkl + decoder.pkl)")
    openai.add_argument("--encoder", required=True, help="encoder.pkl as the dall-e package saves it")
    openai.add_argument("--decoder", required=True, help="decoder.pkl as the dall-e package saves it")
    openai.add_argument("--image-size", type=int, default=256, help="picture side the codes are made at")
    vqgan = kinds.add_parser("vqgan", help="a VQGAN in the taming-transformers format (.ckpt + model.yaml)")
    vqgan.add_argument("--checkpoint", required=True, help="the Lightning .ckpt holding state_dict")
    vqgan.add_argument("--model-yaml", required=True, help="taming's model.yaml beside it")
    vqgan.add_argument("--pixel-range", choices=["minus1_1", "0_1"], default="minus1_1",
                       help="what the model was trained on: taming 2x-1 (minus1_1) or dalle-mini's [0, 1] (0_1)")
    clip = kinds.add_parser("open_clip", help="an open_clip CLIP (any architecture open_clip knows) as reranker")
    clip.add_argument("--model", required=True, help="open_clip architecture name, e.g. ViT-B-32")
    clip.add_argument("--checkpoint", required=True, help="its weights: .safetensors, or a torch state_dict file")
    for sub in (openai, vqgan, clip):
        sub.add_argument("--output", required=True, help="the converted checkpoint, local or s3://")
    args = parser.parse_args(argv)
    try:
        if args.kind == "openai":
            from dalle_core.openai_dvae import convert_openai_dvae

            model = convert_openai_dvae(read_bytes(args.encoder), read_bytes(args.decoder), where=args.encoder,
                                        image_size=args.image_size)
        elif args.kind == "vqgan":
            from dalle_core.vqgan import convert_vqgan

            model = convert_vqgan(read_bytes(args.checkpoint), read_bytes(args.model_yaml).decode(),
                                  where=args.checkpoint, pixel_range=args.pixel_range)
        else:
            from dalle_core.openclip import convert_open_clip

            model = convert_open_clip(tensors_from_bytes(read_bytes(args.checkpoint), args.checkpoint), args.model,
                                      where=args.checkpoint)
    except (ValueError, pickle.UnpicklingError) as exc:  # a file that is not what it claims: the user's input
        raise InputError(str(exc)) from exc
    digest = save_model(model, args.output, extra={"imported_from": args.kind})
    cfg = model.config
    summary = {"output": args.output, "kind": type(model).__name__, "sha256": digest, "image_size": cfg.image_size}
    if args.kind == "open_clip":
        summary.update(model_name=cfg.model_name, context_length=cfg.context_length)
    else:
        summary.update(num_tokens=cfg.num_tokens, image_seq_len=cfg.image_seq_len,
                       dalle={"num_image_tokens": cfg.num_tokens, "image_fmap_size": cfg.fmap_size})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
