"""Real data into raw shards (:mod:`pipelines.data.raw`): URL lists through img2dataset, folders of ``name.jpg`` +
``name.txt`` pairs, and existing WebDataset tars.

Nothing is dropped on the way in: a pair that cannot be used yet is written with ``status != "success"`` and an
``error_message`` (img2dataset does the same for failed downloads), so pretokenize counts it as a reject with a
reason. In a folder every file is accounted for: when several pictures (``x.jpg``, ``x.png``) or caption files
share a key, the first picture in :data:`IMAGE_SUFFIXES` order (then by name) is paired and each other file
becomes a ``duplicate_key`` row keyed by its own relative path. Output shard names are fixed by the input
(shard index or tar name), so a rerun rewrites the same files.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections import Counter
from typing import Any

import ray

from pipelines import storage
from pipelines.config import IngestConfig
from pipelines.data.images import picture_size
from pipelines.data.raw import DUPLICATE_KEY, SUCCESS, raw_table

# Picture files a folder ingest pairs; also the order of preference among pictures that share a key.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MISSING_CAPTION = "failed_missing_caption"
MISSING_IMAGE = "failed_missing_image"
CAPTION_NOT_UTF8 = "caption_not_utf8"


def ingest_url_list(url_list: str, output: str, config: IngestConfig) -> dict[str, int]:
    """Downloads a csv/tsv/parquet/txt URL list with img2dataset into raw shards; returns counts by status.

    img2dataset keeps its own resume state (``*_stats.json`` per finished shard), so a rerun into the same
    ``output`` downloads only unfinished shards. Call it from a ``__main__``-guarded script: img2dataset starts
    helper processes with ``spawn``."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home at import otherwise
    from img2dataset import download

    input_format = config.input_format or url_list.rsplit(".", 1)[-1].lower()
    download(
        url_list=url_list, output_folder=output, input_format=input_format, url_col=config.url_col,
        caption_col=config.caption_col, output_format=config.output_format, image_size=config.image_size,
        resize_mode=config.resize_mode, resize_only_if_bigger=True, processes_count=config.processes_count,
        thread_count=config.thread_count, number_sample_per_shard=config.samples_per_shard,
        timeout=config.timeout, retries=config.retries, enable_wandb=False, encode_format="jpg",
        encode_quality=95, extract_exif=False,
    )
    counts: Counter[str] = Counter()
    for shard in storage.list_files(output, (".parquet",)):
        counts.update(storage.read_parquet(shard, ["status"]).column("status").to_pylist())
    return dict(counts)


def _row(key: str, caption: str | None, image: bytes | None, source: str, status: str = SUCCESS,
         error: str | None = None) -> dict[str, Any]:
    width, height = picture_size(image) or (None, None)  # header only; pretokenize decodes and judges
    return {"key": key, "caption": caption, "url": None, "jpg": image, "width": width, "height": height,
            "status": status, "error_message": error, "source": source}


def choose_caption(text: str, key: str, seed: int) -> str:
    """One of the non-empty lines of a caption file, chosen by a hash of (seed, key): stable across reruns
    and machines, different per sample (the reference picks one at random per epoch)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return lines[int.from_bytes(digest[:8], "big") % len(lines)]


def _pair_row(key: str, image: bytes, text: bytes, source: str, seed: int) -> dict[str, Any]:
    """The row of a picture and its caption file; a caption that is not UTF-8 is a ``caption_not_utf8`` row
    rather than text full of replacement characters."""
    try:
        caption = choose_caption(text.decode("utf-8-sig"), key, seed)
    except UnicodeDecodeError as exc:
        return _row(key, None, image, source, CAPTION_NOT_UTF8, f"caption is not UTF-8: {exc}")
    return _row(key, caption, image, source)


def _split_name(rel: str) -> tuple[str, str]:
    base, _, ext = rel.rpartition(".")
    return base, "." + ext.lower()


def _folder_items(folder: str, files: list[str]) -> list[tuple[str, str | None, str | None, str | None]]:
    """``(key, image_path, text_path, duplicate)`` per key, sorted by key, plus one item per file that lost its
    key to another (keyed by its relative path, ``duplicate`` saying which file kept the key)."""
    root = storage.filesystem(folder)[1].rstrip("/")
    groups: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for path in files:
        rel = storage.filesystem(path)[1][len(root) + 1:]
        key, ext = _split_name(rel)
        groups.setdefault(key, {"image": [], "text": []})["text" if ext == ".txt" else "image"].append((rel, path))
    items = []
    for key, found in groups.items():
        found["image"].sort(key=lambda f: (IMAGE_SUFFIXES.index(_split_name(f[0])[1]), f[0]))
        found["text"].sort()
        image, text = (found[kind][0] if found[kind] else (None, None) for kind in ("image", "text"))
        items.append((key, image[1], text[1], None))
        for kind, kept in (("image", image), ("text", text)):
            for rel, path in found[kind][1:]:
                note = f"{rel} shares the key {key!r} with {kept[0]}, which is used"
                items.append((rel, path, None, note) if kind == "image" else (rel, None, path, note))
    return sorted(items, key=lambda item: item[0])


def _folder_shard(spec: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map: writes one raw shard of a folder ingest from :func:`_folder_items` items."""
    rows = []
    for key, image_path, text_path, duplicate in spec["items"]:
        source = image_path or text_path
        if duplicate is not None:
            rows.append(_row(key, None, None, source, DUPLICATE_KEY, duplicate))
        elif image_path is None:
            rows.append(_row(key, None, None, source, MISSING_IMAGE, f"{text_path} has no image beside it"))
        elif text_path is None:
            rows.append(_row(key, None, storage.read_bytes(image_path), source, MISSING_CAPTION,
                             f"no {key}.txt beside {image_path}"))
        else:
            rows.append(_pair_row(key, storage.read_bytes(image_path), storage.read_bytes(text_path), source,
                                  spec["seed"]))
    storage.write_parquet(raw_table(rows), spec["path"])
    return {"path": spec["path"], "rows": len(rows)}


def _run_shards(specs: list[dict[str, Any]], fn: Any) -> list[dict[str, Any]]:
    """One Ray Data block per shard, so shards are written in parallel across the cluster."""
    if not specs:
        return []
    return ray.data.from_items(specs, override_num_blocks=len(specs)).map(fn).take_all()


def _status_counts(results: list[dict[str, Any]]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for result in results:
        counts.update(storage.read_parquet(result["path"], ["status"]).column("status").to_pylist())
    return dict(counts)


def ingest_folder(folder: str, output: str, config: IngestConfig) -> dict[str, int]:
    """A folder (searched recursively) of ``name.<image ext>`` + ``name.txt`` pairs into raw shards; keys are the
    paths relative to ``folder`` without extension. Returns counts by status."""
    files = storage.list_files(folder, IMAGE_SUFFIXES + (".txt",), recursive=True)
    if not files:
        raise FileNotFoundError(f"no images or captions under {folder}")
    items = _folder_items(folder, files)
    step = config.samples_per_shard
    specs = [{"items": items[i:i + step], "seed": config.caption_seed,
              "path": storage.join(output, f"part-{i // step:05d}.parquet")} for i in range(0, len(items), step)]
    return _status_counts(_run_shards(specs, _folder_shard))


def _tar_shard(spec: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map: one WebDataset tar -> one raw shard. Members group by key (the name up to its first dot,
    the WebDataset convention); the caption is ``.txt`` (or ``.caption``)."""
    samples: dict[str, dict[str, bytes]] = {}
    fs, inner = storage.filesystem(spec["tar"])
    with fs.open(inner, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, name = member.name.rpartition("/")
            base, _, ext = name.partition(".")
            key = f"{directory}/{base}" if directory else base
            samples.setdefault(key, {})["." + ext.lower()] = tar.extractfile(member).read()
    rows = []
    for key, parts in sorted(samples.items()):
        source = f"{spec['tar']}#{key}"
        image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
        text = parts.get(".txt", parts.get(".caption"))
        if image is None:
            rows.append(_row(key, None, None, source, MISSING_IMAGE, f"no image member for {key}"))
        elif text is None:
            rows.append(_row(key, None, image, source, MISSING_CAPTION, f"no .txt member for {key}"))
        else:
            rows.append(_pair_row(key, image, text, source, spec["seed"]))
    storage.write_parquet(raw_table(rows), spec["path"])
    return {"path": spec["path"], "rows": len(rows)}


def ingest_webdataset(tars: str, output: str, config: IngestConfig) -> dict[str, int]:
    """WebDataset ``.tar`` shards (a folder or one tar) into raw shards, one per tar, named after it."""
    paths = storage.list_files(tars, (".tar",))
    if not paths:
        raise FileNotFoundError(f"no .tar files in {tars}")
    specs = [{"tar": p, "seed": config.caption_seed, "path": storage.join(output, f"{storage.stem(p)}.parquet")}
             for p in paths]
    return _status_counts(_run_shards(specs, _tar_shard))
