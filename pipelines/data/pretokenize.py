"""Raw shards -> token shards: decode, RGB, resize + centre-crop, BPE ids, frozen image-tokenizer codes (Ray Data).

Stages: ``read_parquet`` -> :func:`preprocess_batch` (CPU tasks: image decode and caption tokenization) ->
:class:`DVAEEncoder` (an actor pool, each actor holding the dVAE once; on a GPU cluster each takes a GPU) ->
the driver, which groups rows by the raw shard they came from and writes one token shard and one reject file
per raw shard as soon as all its rows are in.

Why per raw shard: output names follow input names, every file is written whole (see :mod:`pipelines.storage`),
and the data file goes last, so it marks its input as done. A rerun skips inputs whose data file is complete and
redoes the rest: it finishes only the missing output and cannot duplicate a key. ``overwrite`` starts over. Each
data file records the models that made it; a rerun with other models (or another ``text_seq_len``) is refused
rather than mixing two codebooks under the new manifest's label.

Nothing is silently lost: a row either becomes a token row or a reject with a reason (upstream img2dataset
failures keep their status as the reason: ``failed_to_download``, ``failed_to_resize``...). Keys are unique in
the output: a key found in several raw shards belongs to the first (by name), a key repeated within one shard to
its first usable row (then by source and caption); every other copy is a ``duplicate_key`` reject.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from torch import nn

from dalle_core.checkpoint import model_from_bytes
from dalle_core.config import IMAGE_TOKENIZER_KINDS, ConfigError, VAEConfig
from dalle_core.images import uint8_to_device
from dalle_core.tokenizer import BPETokenizer, normalize_caption
from pipelines import storage
from pipelines.config import InputError, PretokenizeConfig
from pipelines.data import manifest as mf
from pipelines.data.images import load_picture
from pipelines.data.raw import DUPLICATE_KEY, SUCCESS, list_raw_shards
from pipelines.data.shards import read_shards
from pipelines.resources import encoder_actor_options

REASONS = ("missing_image", "empty_image", "undecodable_image", "image_too_small", "image_too_large",
           "empty_caption", "caption_unknown_tokens", DUPLICATE_KEY,
           "missing_codes", "codes_wrong_length", "code_out_of_range")  # besides upstream statuses
ENCODING_COLUMN = "encoding"  # a pre-encoded input's image codes (dalle-mini's encoded datasets), list<int>
_SHARD_COL = "__input__"  # which raw shard a row came from (the stem of its file name)
_PIXELS_COL = "__pixels__"
_REASON_COL = "__reason__"
_DETAIL_COL = "__detail__"


class PretokenizeError(InputError):
    """The input cannot be made into token shards (e.g. every input pair was rejected, a corrupt raw shard)."""


def _column(batch: pa.Table, name: str) -> list[Any]:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


@dataclass
class _Rows:
    """What every input row becomes besides its image codes: key, caption, source, and a reject reason so far."""

    inputs: list[str]
    keys: list[str]
    captions: list[str]
    sources: list[str]
    reasons: list[str | None]
    details: list[str | None]

    @classmethod
    def read(cls, batch: pa.Table, payload: str, duplicates: dict[str, dict[str, str]] | None) -> _Rows:
        """Upstream failures and keys an earlier input keeps become rejects here. A row without a key gets one
        from its content (input, caption and ``payload`` column), the same in every run and every batch."""
        n = batch.num_rows
        status, error = _column(batch, "status"), _column(batch, "error_message")
        sources = [s or u for s, u in zip(_column(batch, "source"), _column(batch, "url"), strict=True)]
        inputs = [storage.stem(p) for p in batch.column("path").to_pylist()]
        raw_captions = _column(batch, "caption")
        keys = _column(batch, "key")
        if any(k is None for k in keys):
            payloads = _column(batch, payload)
            keys = [k if k is not None else _content_key(inputs[i], raw_captions[i], payloads[i])
                    for i, k in enumerate(keys)]
        rows = cls(inputs, [str(k) for k in keys],
                   [normalize_caption(c) if isinstance(c, str) else "" for c in raw_captions],
                   [s or inp for s, inp in zip(sources, inputs, strict=True)], [None] * n, [None] * n)
        for i in range(n):
            owner = (duplicates or {}).get(inputs[i], {}).get(rows.keys[i])
            if status[i] is not None and status[i] != SUCCESS:
                rows.reasons[i], rows.details[i] = status[i], error[i]
            elif owner is not None:
                rows.reasons[i], rows.details[i] = DUPLICATE_KEY, f"the key is also in {owner}, which keeps it"
        return rows

    def tokenize(self, tokenizer: BPETokenizer) -> list[list[int]]:
        """BPE ids of every caption; usable rows whose caption gives none become rejects."""
        ids = tokenizer.encode(self.captions)
        for i, row_ids in enumerate(ids):
            if self.reasons[i] is not None:
                continue
            if not row_ids:
                self.reasons[i], self.details[i] = "empty_caption", "caption empty after normalisation"
            elif not tokenizer.decode(row_ids).strip():  # decode drops the unknown-token id
                self.reasons[i], self.details[i] = ("caption_unknown_tokens",
                                                    "no character of the caption is in the vocabulary")
        return ids

    def table(self, ids: list[list[int]], last_name: str, last: pa.Array) -> pa.Table:
        return pa.table({
            "key": pa.array(self.keys, pa.string()),
            "caption": pa.array(self.captions, pa.string()),
            "text_ids": pa.array(ids, pa.list_(pa.int32())),
            "source": pa.array(self.sources, pa.string()),
            _SHARD_COL: pa.array(self.inputs, pa.string()),
            _REASON_COL: pa.array(self.reasons, pa.string()),
            _DETAIL_COL: pa.array(self.details, pa.string()),
            last_name: last,
        })


def _content_key(stem: str, caption: Any, payload: Any) -> str:
    digest = hashlib.sha1(repr(caption).encode())
    digest.update(payload if isinstance(payload, bytes) else repr(payload).encode())
    return f"{stem}:{digest.hexdigest()[:16]}"


def preprocess_batch(batch: pa.Table, *, tokenizer: BPETokenizer, image_size: int, min_image_size: int,
                     channels: int, duplicates: dict[str, dict[str, str]] | None = None) -> pa.Table:
    """Raw rows -> normalised caption, BPE ids, pixels (zeros for rejects) and a reject reason (or null).

    ``duplicates`` is :func:`cross_input_duplicates`' answer: the keys each input must leave to an earlier one."""
    rows = _Rows.read(batch, "jpg", duplicates)
    pixels = np.zeros((batch.num_rows, image_size * image_size * channels), dtype=np.uint8)
    for i, data in enumerate(_column(batch, "jpg")):
        if rows.reasons[i] is None:
            picture, rows.reasons[i], rows.details[i] = load_picture(data, image_size, min_image_size, channels)
            if picture is not None:
                pixels[i] = picture.reshape(-1)
    ids = rows.tokenize(tokenizer)
    return rows.table(ids, _PIXELS_COL, pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)),
                                                                          pixels.shape[1]))


def encoded_batch(batch: pa.Table, *, tokenizer: BPETokenizer, image_seq_len: int, num_tokens: int,
                  duplicates: dict[str, dict[str, str]] | None = None) -> pa.Table:
    """Pre-encoded rows (``caption`` + ``encoding``, dalle-mini's layout) -> the same rows :class:`DVAEEncoder`
    gives: the codes are kept as they are, checked for length and range (zeros for rejects)."""
    rows = _Rows.read(batch, ENCODING_COLUMN, duplicates)
    codes = np.zeros((batch.num_rows, image_seq_len), dtype=np.uint16)
    for i, row in enumerate(_column(batch, ENCODING_COLUMN)):
        if rows.reasons[i] is not None:
            continue
        values = np.asarray(row if row is not None else [], dtype=np.int64)
        if row is None or not len(values):
            rows.reasons[i], rows.details[i] = "missing_codes", "no encoding on this row"
        elif len(values) != image_seq_len:
            rows.reasons[i], rows.details[i] = ("codes_wrong_length",
                                                f"{len(values)} codes, the tokenizer's grid has {image_seq_len}")
        elif values.min() < 0 or values.max() >= num_tokens:
            rows.reasons[i], rows.details[i] = ("code_out_of_range", f"codes span [{values.min()}, {values.max()}], "
                                                f"the tokenizer has {num_tokens}")
        else:
            codes[i] = values
    ids = rows.tokenize(tokenizer)
    return rows.table(ids, "image_codes", pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1)),
                                                                            image_seq_len))


def image_tokenizer_from_bytes(data: bytes, expected: VAEConfig | None = None) -> nn.Module:
    """The image tokenizer a checkpoint holds (any of ``IMAGE_TOKENIZER_KINDS``). With ``expected`` (the config's
    ``vae`` section, from which the transformer's codebook size and grid derive) the file must be what it says."""
    model = model_from_bytes(data, where="the image tokenizer checkpoint (paths.vae)")[0]
    kind = type(model).__name__
    if kind not in IMAGE_TOKENIZER_KINDS:
        raise PretokenizeError(f"paths.vae holds a {kind}, not an image tokenizer (one of {IMAGE_TOKENIZER_KINDS})")
    if expected is not None:
        cfg = model.config
        for name, have, want in (("kind", kind, expected.kind), ("num_tokens", cfg.num_tokens, expected.num_tokens),
                                 ("image_size", cfg.image_size, expected.image_size),
                                 ("channels", cfg.channels, expected.channels),
                                 ("num_layers", cfg.fmap_size, expected.fmap_size)):
            if have != want:
                shown = (f"a {cfg.fmap_size}x{cfg.fmap_size} grid, config {expected.fmap_size}x{expected.fmap_size}"
                         if name == "num_layers" else f"{name}={have}, config {want}")
                raise ConfigError(f"vae.{name}: paths.vae holds a {kind} with {shown}")
    return model


class DVAEEncoder:
    """Actor UDF: holds the frozen dVAE and turns pixel rows into code rows (rejects get zeros, dropped later).
    The checkpoint comes as an object reference: the bytes the driver hashed, stored once, not pickled into the
    UDF (hundreds of MB for the released tokenizers)."""

    def __init__(self, vae_ref: ray.ObjectRef, num_threads: int) -> None:
        self.model = image_tokenizer_from_bytes(ray.get(vae_ref))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, num_threads))
        cfg = self.model.config
        self.shape = (cfg.image_size, cfg.image_size, cfg.channels)
        self.seq_len = cfg.image_seq_len

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        ok = pc.is_null(batch.column(_REASON_COL)).to_numpy(zero_copy_only=False)
        codes = np.zeros((n, self.seq_len), dtype=np.uint16)
        if ok.any():
            flat = batch.column(_PIXELS_COL).combine_chunks().flatten().to_numpy()
            images = uint8_to_device(flat.reshape(n, *self.shape)[ok], self.device)  # converted there
            codes[ok] = self.model.get_codebook_indices(images).cpu().numpy().astype(np.uint16)
        batch = batch.drop_columns([_PIXELS_COL])
        return batch.append_column("image_codes",
                                   pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1)), self.seq_len))


@dataclass
class _Models:
    tokenizer: BPETokenizer
    vae_bytes: bytes
    vae: nn.Module  # any image tokenizer: config.num_tokens, image_size, fmap_size, image_seq_len
    tokenizer_path: str
    vae_path: str
    vae_hash: str = field(init=False)

    def __post_init__(self) -> None:
        self.vae_hash = hashlib.sha256(self.vae_bytes).hexdigest()

    def records(self) -> dict[str, dict[str, Any]]:
        """What the manifest says of the two models (``build_manifest``'s keyword arguments)."""
        identity = self.identity()
        return {"tokenizer": {"path": self.tokenizer_path, **identity["tokenizer"]},
                "vae": {"path": self.vae_path, "kind": type(self.vae).__name__,
                        "pixel_range": self.vae.pixel_range, **identity["vae"]}}

    def identity(self) -> dict[str, dict[str, Any]]:
        """What decides a shard's content, whatever path the models were read from: each data file records it."""
        cfg, tok = self.vae.config, self.tokenizer
        return {"tokenizer": {"model_hash": tok.model_hash, "vocab_size": tok.vocab_size,
                              "text_seq_len": tok.text_seq_len},
                "vae": {"checkpoint_hash": self.vae_hash, "num_tokens": cfg.num_tokens, "image_size": cfg.image_size,
                        "fmap_size": cfg.fmap_size, "image_seq_len": cfg.image_seq_len}}


def load_models(tokenizer_path: str, vae_path: str, text_seq_len: int, vae_config: VAEConfig | None = None
                ) -> _Models:
    vae_bytes = storage.read_bytes(vae_path)
    return _Models(BPETokenizer.load(tokenizer_path, text_seq_len), vae_bytes,
                   image_tokenizer_from_bytes(vae_bytes, vae_config), tokenizer_path, vae_path)


def _flat(identity: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{model}.{name}": value for model, fields in identity.items() for name, value in fields.items()}


def _check_identity(path: str, meta: Any, models: _Models) -> None:
    """Refuses a finished data file that other models made: resuming over it would put its codes under this
    run's manifest, which names other models."""
    recorded = (meta.metadata or {}).get(mf.MODELS_KEY)
    have = _flat(json.loads(recorded)) if recorded else {}
    changed = [f"{name}={have.get(name, 'unrecorded')} there, {want} now"
               for name, want in _flat(models.identity()).items() if have.get(name) != want]
    if changed:
        raise PretokenizeError(f"{path} was made with other models ({'; '.join(changed)}); finishing this output "
                               "would mix their codes under one label: rerun with --overwrite (redoes every shard) "
                               "or write to another --output")


def _finished(output: str, stems: set[str], models: _Models) -> set[str]:
    """The inputs whose data and rejects files are complete, after checking that every complete data file under
    ``output`` (finished by any earlier run, with or without a manifest) was made by these models."""
    data_dir = storage.join(output, mf.DATA_DIR)
    done = set()
    for path in storage.list_files(data_dir, (".parquet",)) if storage.exists(data_dir) else []:
        meta = storage.parquet_metadata(path)
        if meta is None:  # truncated: redone below
            continue
        _check_identity(path, meta, models)
        stem = storage.stem(path)
        if stem in stems and storage.parquet_metadata(mf.shard_outputs(output, stem)[1]) is not None:
            done.add(stem)
    return done


def cross_input_duplicates(by_stem: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{input: {key: earlier input}}`` for the keys held by more than one raw shard: such a key belongs to the
    first input (by name) and is a ``duplicate_key`` reject in the others. Reads only the key columns, with Arrow
    on the driver (a few bytes per row), so every run decides the same way whichever shards it redoes."""
    stems = sorted(by_stem)
    parts = []
    for index, stem in enumerate(stems):
        if "key" in storage.parquet_columns(by_stem[stem]):
            keys = storage.read_parquet(by_stem[stem], ["key"]).column("key").cast(pa.string())
            parts.append(pa.table({"key": keys, "input": pa.array(np.full(len(keys), index, np.int32))}))
    if not parts:
        return {}
    table = pa.concat_tables(parts)
    pairs = table.filter(pc.is_valid(table.column("key"))).group_by(["key", "input"]).aggregate([])
    later = pairs.join(pairs.group_by("key").aggregate([("input", "min")]), "key").filter(
        pc.field("input") != pc.field("input_min"))
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for key, index, owner in zip(*(later.column(c).to_pylist() for c in ("key", "input", "input_min")), strict=True):
        found[stems[index]][key] = stems[owner]
    return dict(found)


def _mark_repeats(table: pa.Table) -> pa.Table:
    """Sorts one input's rows by key (usable rows first, then by source and caption) and makes every later row
    of a repeated key a ``duplicate_key`` reject, so the key stays unique and the choice is the same every run."""
    table = table.sort_by([("key", "ascending", "at_end"), (_REASON_COL, "ascending", "at_start"),
                           ("source", "ascending", "at_end"), ("caption", "ascending", "at_end")])
    keys = table.column("key").to_pylist()
    reasons, details = table.column(_REASON_COL).to_pylist(), table.column(_DETAIL_COL).to_pylist()
    for i in range(1, len(keys)):
        if reasons[i] is None and keys[i] == keys[i - 1]:
            reasons[i], details[i] = DUPLICATE_KEY, "the key is on an earlier row of the same input, which keeps it"
    for name, values in ((_REASON_COL, reasons), (_DETAIL_COL, details)):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return table


def _write_shard(output: str, stem: str, parts: list[pa.Table], models: _Models) -> None:
    """Writes one input's rejects, then its token rows (the completion marker, recording the models), by key."""
    table = _mark_repeats(pa.concat_tables(parts))
    bad = pc.is_valid(table.column(_REASON_COL))
    rejects = table.filter(bad)
    good = table.filter(pc.invert(bad))
    data_path, rejects_path = mf.shard_outputs(output, stem)
    storage.write_parquet(pa.table({
        "key": rejects.column("key"), "source": rejects.column("source"),
        "reason": rejects.column(_REASON_COL), "detail": rejects.column(_DETAIL_COL),
    }, schema=mf.REJECT_SCHEMA), rejects_path)
    cfg = models.vae.config
    schema = mf.token_schema(cfg.image_seq_len)
    codes = good.column("image_codes").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    histogram = np.bincount(codes.astype(np.int64), minlength=cfg.num_tokens).tolist()
    tokens = pa.table({name: good.column(name) for name in schema.names}, schema=schema)
    tokens = tokens.replace_schema_metadata({mf.HISTOGRAM_KEY: json.dumps(histogram).encode(),
                                             mf.MODELS_KEY: json.dumps(models.identity()).encode()})
    storage.write_parquet(tokens, data_path)


def _num_rows(path: str) -> int:
    meta = storage.parquet_metadata(path)
    if meta is None:
        raise PretokenizeError(f"{path}: not a readable Parquet file (truncated or corrupt raw shard)")
    return meta.num_rows


def _clear(output: str) -> None:
    fs, inner = storage.filesystem(output)
    for sub in (mf.DATA_DIR, mf.REJECTS_DIR, mf.MANIFEST_NAME):
        path = storage.join(inner, sub)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def run_pretokenize(raw: str, output: str, tokenizer_path: str, vae_path: str, text_seq_len: int,
                    config: PretokenizeConfig, vae_config: VAEConfig | None = None) -> dict[str, Any]:
    """Runs the job (Ray must be reachable; ``ray.init`` is the caller's) and returns the end summary.
    ``vae_config``, when given, is checked against the tokenizer file (:func:`image_tokenizer_from_bytes`).

    Raises :class:`PretokenizeError` when ``output`` holds shards other models made (unless
    ``config.overwrite``, which clears ``output`` first) or when every pair is rejected."""
    start = time.perf_counter()
    inputs = list_raw_shards(raw)
    by_stem = {storage.stem(p): p for p in inputs}
    if len(by_stem) != len(inputs):
        raise PretokenizeError(f"raw shards in {raw} share file names; each needs its own name")
    if config.overwrite:
        _clear(output)
    for sub in (mf.DATA_DIR, mf.REJECTS_DIR):
        storage.remove_stale_temporaries(storage.join(output, sub))
    payload = _payload_column(by_stem)
    models = load_models(tokenizer_path, vae_path, text_seq_len, vae_config)
    done = _finished(output, set(by_stem), models)
    todo = [s for s in by_stem if s not in done]
    expected = {s: _num_rows(by_stem[s]) for s in todo}
    new_rows = 0
    if todo:
        duplicates = cross_input_duplicates(by_stem)
        new_rows = _process(by_stem, todo, expected, output, models, config,
                            {s: keys for s, keys in duplicates.items() if s in expected}, payload)
    records = models.records()
    records["vae"]["codes"] = "input" if payload == ENCODING_COLUMN else "computed"  # who made the codes
    manifest = mf.build_manifest(output, sorted(by_stem), **records)
    elapsed = time.perf_counter() - start
    summary = {
        "pairs_in": manifest["pairs_in"], "pairs_out": manifest["num_rows"],
        "rejects_by_reason": manifest["rejects"]["by_reason"],
        "input_shards": len(by_stem), "shards_skipped": len(by_stem) - len(todo), "shards_written": len(todo),
        "pairs_processed_this_run": new_rows, "seconds": round(elapsed, 3),
        "images_per_s": round(new_rows / elapsed, 1) if elapsed > 0 else 0.0,
    }
    if manifest["num_rows"] == 0:
        raise PretokenizeError(f"all {manifest['pairs_in']} input pairs were rejected "
                               f"({manifest['rejects']['by_reason']}); see {storage.join(output, mf.REJECTS_DIR)}")
    storage.write_json(storage.join(output, mf.MANIFEST_NAME), manifest)
    return summary


def _payload_column(by_stem: dict[str, str]) -> str:
    """``jpg`` when the inputs are raw shards, ``encoding`` when they are a pre-encoded set; never a mix."""
    kinds = {}
    for path in by_stem.values():
        meta = storage.parquet_metadata(path)
        if meta is None:
            raise PretokenizeError(f"{path}: not a readable Parquet file (truncated or corrupt raw shard)")
        present = set(meta.schema.to_arrow_schema().names)
        kind = "jpg" if "jpg" in present else ENCODING_COLUMN if ENCODING_COLUMN in present else None
        if kind is None:
            raise PretokenizeError(f"{path} has neither a 'jpg' column (a raw shard) nor an '{ENCODING_COLUMN}' "
                                   f"column (a pre-encoded set); columns {sorted(present)}")
        kinds.setdefault(kind, path)
    if len(kinds) > 1:
        raise PretokenizeError(f"the input mixes raw shards ({kinds['jpg']}) and pre-encoded files "
                               f"({kinds[ENCODING_COLUMN]}); give each its own --input")
    return next(iter(kinds))


def _process(by_stem: dict[str, str], todo: list[str], expected: dict[str, int], output: str, models: _Models,
             config: PretokenizeConfig, duplicates: dict[str, dict[str, str]], payload: str) -> int:
    """Streams the unfinished inputs through Ray Data, writing each input's output once all its rows are in."""
    present = set(storage.parquet_columns(by_stem[todo[0]]))
    cfg = models.vae.config
    wanted = ["key", "caption", "url", payload, "status", "error_message", "source"]
    ds = read_shards([by_stem[s] for s in todo], include_paths=True)
    # Blocks of one batch each, streamed: Ray's Parquet reader packs small files into one block (up to 1 MiB at
    # least, 128 MiB at most), and a block is one decode task and one encoder call sequence, so without this a
    # few blocks kept every encoder actor but one idle (seen: 1 of 2, the job at 0.36x the bare encoder).
    ds = ds.select_columns([c for c in wanted if c in present] + ["path"]).repartition(
        target_num_rows_per_block=config.batch_size)
    if payload == ENCODING_COLUMN:  # the codes are the input's own: no image tokenizer runs
        ds = ds.map_batches(encoded_batch, batch_size=config.batch_size, batch_format="pyarrow", fn_kwargs={
            "tokenizer": models.tokenizer, "image_seq_len": cfg.image_seq_len, "num_tokens": cfg.num_tokens,
            "duplicates": duplicates})
    else:
        ds = ds.map_batches(preprocess_batch, batch_size=config.batch_size, batch_format="pyarrow", fn_kwargs={
            "tokenizer": models.tokenizer, "image_size": cfg.image_size,
            "min_image_size": config.min_image_size, "channels": cfg.channels, "duplicates": duplicates})
        ds = ds.map_batches(
            DVAEEncoder, batch_size=config.batch_size, batch_format="pyarrow",
            **encoder_actor_options(config), fn_constructor_kwargs={"vae_ref": ray.put(models.vae_bytes),
                                   "num_threads": int(config.num_cpus_per_actor)})
    pending: dict[str, list[pa.Table]] = defaultdict(list)
    counts: Counter[str] = Counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for stem in set(batch.column(_SHARD_COL).to_pylist()):
            part = batch.filter(pc.equal(batch.column(_SHARD_COL), stem))
            pending[stem].append(part)
            counts[stem] += part.num_rows
            if counts[stem] == expected[stem]:
                _write_shard(output, stem, pending.pop(stem), models)
    # An input with no rows at all never shows up in the stream; a short one means rows went missing.
    for stem in todo:
        if counts[stem] != expected[stem]:
            raise PretokenizeError(f"{by_stem[stem]}: {expected[stem]} rows expected, {counts[stem]} seen")
        if expected[stem] == 0:
            _write_shard(output, stem, [_empty_rows(cfg.image_seq_len)], models)
    return sum(counts.values())


def _empty_rows(image_seq_len: int) -> pa.Table:
    schema = mf.token_schema(image_seq_len)
    return schema.empty_table().append_column(_REASON_COL, pa.array([], pa.string())).append_column(
        _DETAIL_COL, pa.array([], pa.string()))
