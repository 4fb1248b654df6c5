"""The token-shard contract: Arrow schemas, ``manifest.json``, and the check training runs before it starts.

Output of pretokenize (``<out>`` local or fsspec URL)::

    <out>/manifest.json
    <out>/data/<input-stem>.parquet      key, caption, text_ids list<int32>, image_codes
                                         fixed_size_list<uint16>[image_seq_len], source
    <out>/rejects/<input-stem>.parquet   key, source, reason, detail

Manifest shard paths are relative to ``<out>``. The manifest is built from the finished files alone (their
footers and reject reasons), so a resumed run counts the shards an earlier run wrote exactly like its own. Each
data file's footer also records the models that made it (:data:`MODELS_KEY`), so a rerun with other models can
tell, even before any manifest exists, that it would mix two codebooks under one label.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dalle_core.config import ConfigError, DALLEConfig
from dalle_core.vae import codebook_usage
from pipelines import storage

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
REJECTS_DIR = "rejects"
HISTOGRAM_KEY = b"dalle.codebook_histogram"  # per-shard code counts, in each data file's footer
MODELS_KEY = b"dalle.models"  # the models (hashes, sizes) that made a data file, in its footer

REJECT_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("source", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
])


def token_schema(image_seq_len: int) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("text_ids", pa.list_(pa.int32())),
        pa.field("image_codes", pa.list_(pa.uint16(), image_seq_len)),
        pa.field("source", pa.string()),
    ])


def shard_outputs(output: str, stem: str) -> tuple[str, str]:
    """The data file and the rejects file that one raw shard ``stem`` becomes."""
    return (storage.join(output, DATA_DIR, f"{stem}.parquet"), storage.join(output, REJECTS_DIR, f"{stem}.parquet"))


def shard_paths(manifest: dict[str, Any], shards_dir: str) -> list[str]:
    """Absolute shard URLs from the manifest (entries are relative to the manifest's folder)."""
    paths = [entry["path"] for entry in manifest["shards"]]
    return [p if "://" in p or p.startswith("/") else storage.join(shards_dir, p) for p in paths]


def build_manifest(output: str, stems: list[str], *, tokenizer: dict[str, Any], vae: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the finished shards ``stems`` under ``output``; ``tokenizer`` and ``vae`` describe the
    models that made them (``vae`` holds ``num_tokens``, ``image_seq_len``; ``tokenizer`` ``text_seq_len``)."""
    num_tokens = vae["num_tokens"]
    histogram = np.zeros(num_tokens, dtype=np.int64)
    shards, reasons = [], Counter()
    for stem in stems:
        data_path, rejects_path = shard_outputs(output, stem)
        meta = storage.parquet_metadata(data_path)
        shards.append({"path": f"{DATA_DIR}/{stem}.parquet", "rows": meta.num_rows, "input": stem})
        histogram += np.asarray(json.loads(meta.metadata[HISTOGRAM_KEY]), dtype=np.int64)
        reasons.update(storage.read_parquet(rejects_path, ["reason"]).column("reason").to_pylist())
    num_rows = sum(s["rows"] for s in shards)
    usage = (codebook_usage(torch.repeat_interleave(torch.arange(num_tokens), torch.from_numpy(histogram)),
                            num_tokens) if num_rows else {"histogram": histogram.tolist()})
    return {
        "schema_version": SCHEMA_VERSION,
        "num_rows": num_rows,
        "pairs_in": num_rows + sum(reasons.values()),
        "image_seq_len": vae["image_seq_len"],
        "text_seq_len": tokenizer["text_seq_len"],
        "codebook_size": num_tokens,
        "tokenizer": tokenizer,
        "vae": vae,
        "shards": shards,
        "rejects": {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items())), "dir": REJECTS_DIR},
        "codebook_usage": usage,
    }


def read_manifest(path: str) -> dict[str, Any]:
    """Reads ``manifest.json`` (give the file or the folder holding it)."""
    if not path.rstrip("/").endswith(".json"):
        path = storage.join(path, MANIFEST_NAME)
    if not storage.exists(path):
        raise FileNotFoundError(f"no token-shard manifest at {path}: run jobs/pretokenize.py first")
    return storage.read_json(path)


def check_manifest(manifest: dict[str, Any], dalle_config: DALLEConfig, *, tokenizer_hash: str | None = None,
                   vae_hash: str | None = None, vae_kind: str | None = None) -> None:
    """Raises ConfigError naming the first field where the shards and the model disagree.

    Sequence lengths and the codebook size must match exactly; the tokenizer's real vocabulary may be smaller
    than ``dalle.num_text_tokens`` (a small corpus runs out of merges) but never larger. The hashes, when
    given, pin the exact tokenizer model and dVAE checkpoint the shards were made with; ``vae_kind`` the kind of
    image tokenizer (manifests from before kinds existed were all made by a DiscreteVAE)."""
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConfigError(f"manifest.schema_version={version} but this code reads version {SCHEMA_VERSION}; "
                          "rerun jobs/pretokenize.py --overwrite")
    exact = (
        ("image_seq_len", manifest["image_seq_len"], "image_seq_len", dalle_config.image_seq_len),
        ("text_seq_len", manifest["text_seq_len"], "text_seq_len", dalle_config.text_seq_len),
        ("codebook_size", manifest["codebook_size"], "num_image_tokens", dalle_config.num_image_tokens),
    )
    for field, have, model_field, want in exact:
        if have != want:
            raise ConfigError(f"manifest.{field}={have} but dalle.{model_field}={want}")
    made_by = manifest["vae"].get("kind", "DiscreteVAE")
    if vae_kind is not None and made_by != vae_kind:
        raise ConfigError(f"manifest.vae.kind={made_by} but vae.kind={vae_kind}: the codes came from another image "
                          "tokenizer")
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab > dalle_config.num_text_tokens:
        raise ConfigError(f"manifest.tokenizer.vocab_size={vocab} but dalle.num_text_tokens="
                          f"{dalle_config.num_text_tokens}: text ids would fall outside the embedding")
    for field, have, want in (("tokenizer.model_hash", manifest["tokenizer"]["model_hash"], tokenizer_hash),
                              ("vae.checkpoint_hash", manifest["vae"]["checkpoint_hash"], vae_hash)):
        if want is not None and have != want:
            raise ConfigError(f"manifest.{field}={have[:12]}... but the model file has {want[:12]}...")
