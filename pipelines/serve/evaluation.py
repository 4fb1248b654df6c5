"""The evaluation batch driver: prompts stream through Ray Data into the Serve application's handles, and the
ranked candidates land in an output folder (local or s3://):

    images/<key>/rank<r>_cand<c>.png   top ``sampling.top_images`` candidates of every accepted prompt
    grid.png                          one row per prompt (first ``evaluate.grid_max_prompts``), best first
    results.parquet                   one row per candidate (one per rejected prompt, with its status)
    metrics.json                      CLIP top-1 vs random candidate; synthetic attribute accuracy
    report.html                       grid, per-prompt scores and the metrics

Serve is started here and shut down when the job ends, whether it succeeds or fails. What the rows mean
(metrics, quality bar, grid and HTML report) is :mod:`pipelines.serve.report`'s.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import torch

from dalle_core.checkpoint import load_model
from dalle_core.images import png_bytes
from dalle_core.io import read_bytes, write_bytes
from dalle_core.sampling import STATUS_ERROR, derive_seed, rank_order
from pipelines import storage
from pipelines.artifacts import ModelPaths, run_dir
from pipelines.config import Config
from pipelines.data import checker, synthetic
from pipelines.resources import client_actor_options, prompts_in_flight
from pipelines.serve.app import GENERATOR, SCORER, build_app
from pipelines.serve.report import ATTRIBUTES, PROMPT_SETS, compute_metrics, quality_bar, write_report

# ---------------------------------------------------------------------------------------------------------
# Inputs


def synthetic_prompts(config: Config, num_prompts: int) -> list[dict[str, Any]]:
    """Captions of the synthetic set with ground truth, a third from each prompt set of
    :data:`pipelines.serve.report.PROMPT_SETS`: seen (color, shape) pairs and held-out pairs, both worded in
    training sentence shapes, and seen pairs in held-out sentence shapes (``pair_split`` and ``wording`` say
    which). Held-out pairs cycle through their combinations, each time in new words. Fixed for a seed."""
    num_prompts = num_prompts or 64
    syn = config.synthetic
    held_pairs = synthetic.holdout_set(syn)
    combos = {split: [(c, s, z, p) for c in synthetic.COLORS for s in synthetic.SHAPES
                      if ((c, s) in held_pairs) == (split == "heldout")
                      for z in synthetic.SIZES for p in synthetic.POSITIONS] for split in ("seen", "heldout")}
    counts = {"heldout": num_prompts // 3 if combos["heldout"] else 0, "heldout_wording": num_prompts // 3}
    counts["seen"] = num_prompts - sum(counts.values())
    rng = np.random.default_rng([syn.seed, 2])
    records = []
    for name, (pair_split, wording) in PROMPT_SETS.items():
        pool = combos[pair_split]
        order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-counts[name] // len(pool)))])
        for index in order[: counts[name]]:
            attrs = synthetic.Attributes(*pool[index])
            records.append({"prompt": synthetic.caption_for(attrs, rng, wording), "pair_split": pair_split,
                            "wording": wording, **{f"truth_{a}": getattr(attrs, a) for a in ATTRIBUTES}})
    return records


def load_prompts(config: Config, source: str | None = None, path: str | None = None,
                 column: str | None = None, num_prompts: int | None = None) -> list[dict[str, Any]]:
    """Prompt records ``{"key", "prompt", ...}`` from a text file (one per line, blank lines kept: they are
    prompts too and get a status), a Parquet column, or the synthetic held-out captions."""
    ev = config.evaluate
    source, path, column = source or ev.prompt_source, path or ev.prompts_path, column or ev.prompt_column
    limit = ev.num_prompts if num_prompts is None else num_prompts
    if source == "synthetic":
        records = synthetic_prompts(config, limit)
    elif source == "text":
        lines = read_bytes(path).decode("utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the file's final newline ends the last prompt; it is not one more prompt
        records = [{"prompt": line} for line in lines]
    elif source == "parquet":
        values = storage.read_parquet(path, columns=[column]).column(column).to_pylist()
        records = [{"prompt": "" if v is None else str(v)} for v in values]
    else:
        raise ValueError(f"unknown prompt source {source!r}; expected synthetic, text or parquet")
    records = records[:limit] if limit else records
    if not records:
        raise ValueError(f"no prompts in {source} source {path or ''}".strip())
    return [dict(r, key=f"p{i:06d}") for i, r in enumerate(records)]


# ---------------------------------------------------------------------------------------------------------
# The Ray Data stage that talks to Serve


def check_attributes(image: np.ndarray) -> dict[str, str]:
    """The synthetic set's checker on one uint8 picture; "none" for every attribute when it finds no shape."""
    found = checker.check_picture(image)
    return asdict(found) if found is not None else {a: "none" for a in ATTRIBUTES}


class ServeClient:
    """Ray Data actor: sends a batch of prompts to the Generator handle at once (they meet other actors'
    prompts in Serve's batches), scores the candidates through the Scorer handle, writes the top PNGs and
    returns one row per candidate (one per rejected prompt)."""

    def __init__(self, app_name: str, output: str, num_candidates: int, top_images: int, seed: int,
                 settings: dict[str, Any]) -> None:
        from ray import serve

        self.generator = serve.get_deployment_handle(GENERATOR, app_name)
        self.scorer = serve.get_deployment_handle(SCORER, app_name)
        self.output, self.n, self.top, self.seed, self.settings = output.rstrip("/"), num_candidates, top_images, \
            seed, settings

    def _rows(self, rec: dict[str, Any], gen: dict[str, Any], scores: list[float] | None) -> list[dict[str, Any]]:
        base = {"key": rec["key"], "prompt": rec["prompt"], "status": gen["status"], "detail": gen["detail"],
                "seed": -1 if gen.get("seed") is None else int(gen["seed"]), **self.settings,
                "pair_split": rec.get("pair_split", ""), "wording": rec.get("wording", ""),
                **{f"truth_{a}": rec.get(f"truth_{a}", "") for a in ATTRIBUTES}}
        blank = {"candidate": -1, "score": float("nan"), "rank": -1, "random_pick": False, "image_path": "",
                 **{f"pred_{a}": "" for a in ATTRIBUTES}}
        if scores is None:
            return [dict(base, **blank)]
        images = gen["images"]
        order = rank_order(torch.tensor([scores]))[0].tolist()
        pick = derive_seed(self.seed, [rec["key"], "random"]) % len(scores)
        check = rec.get("truth_color", "") != ""
        rows = []
        for rank, cand in enumerate(order):
            path = ""
            if rank < self.top:
                path = f"images/{rec['key']}/rank{rank}_cand{cand}.png"
                write_bytes(f"{self.output}/{path}", png_bytes(images[cand]))
            pred = check_attributes(images[cand]) if check else {}
            rows.append(dict(base, candidate=cand, score=float(scores[cand]), rank=rank,
                             random_pick=cand == pick, image_path=path,
                             **{f"pred_{a}": str(pred.get(a, "")) for a in ATTRIBUTES}))
        return rows

    def _candidates(self, records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[float] | None]]:
        """Each prompt's generation result and its candidates' scores (None for a rejected prompt). Every prompt
        of the batch is in flight at once, so Serve groups them with other actors' prompts, and each scoring
        call is chained on its generation inside Serve: the Scorer takes the pictures straight from the
        Generator's result, and no client sits between the two while they work."""
        calls = []
        for r in records:
            gen = self.generator.generate.remote({"prompt": r["prompt"], "key": r["key"], "num_candidates": self.n})
            calls.append((gen, self.scorer.score.remote(gen)))
        out: list[tuple[dict[str, Any], list[float] | None]] = []
        for gen_call, score_call in calls:
            try:
                gen = gen_call.result()
            except Exception as exc:  # a failed replica call costs its prompts, not the job
                out.append(({"status": STATUS_ERROR, "detail": f"generator call failed: {exc!r}", "images": None},
                            None))
                continue
            try:
                out.append((gen, score_call.result()))
            except Exception as exc:
                out.append((dict(gen, status=STATUS_ERROR, detail=f"scorer call failed: {exc!r}"), None))
        return out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        records = batch.to_dict("records")
        rows = []
        for rec, (gen, scores) in zip(records, self._candidates(records), strict=True):
            rows.extend(self._rows(rec, gen, scores))
        return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------
# The job


def client_kwargs(config: Config, output: str) -> dict[str, Any]:
    """Constructor arguments of :class:`ServeClient` (and of any client with the same row contract)."""
    sampling = config.sampling
    settings = {"temperature": sampling.temperature, "top_k": sampling.top_k, "cond_scale": sampling.cond_scale,
                "num_candidates": sampling.num_candidates}
    return {"app_name": config.evaluate.app_name, "output": output.rstrip("/"),
            "num_candidates": sampling.num_candidates, "top_images": sampling.top_images, "seed": sampling.seed,
            "settings": settings}


def stream_prompts(prompts: list[dict[str, Any]], client: type, kwargs: dict[str, Any], batch_size: int,
                   concurrency: int, **resources: float) -> pd.DataFrame:
    """Runs the prompt records through a Ray Data actor pool of ``client`` and gathers the result rows."""
    fields = ["key", "prompt", "pair_split", "wording", *[f"truth_{a}" for a in ATTRIBUTES]]
    rows = [{f: "" if r.get(f) is None else str(r[f]) for f in fields} for r in prompts]
    # Blocks are made here, not by tasks: the replicas may hold every CPU, and a read task waiting for one
    # would stall the job. One block per batch lets every actor of the pool take work.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
    ds = ds.map_batches(client, batch_format="pandas", batch_size=batch_size, concurrency=concurrency,
                        fn_constructor_kwargs=kwargs, **resources)
    results = pd.concat(list(ds.iter_batches(batch_format="pandas", batch_size=None)), ignore_index=True)
    return results.sort_values(["key", "rank"], kind="stable").reset_index(drop=True)


def _nullable(results: pd.DataFrame) -> pd.DataFrame:
    """Sentinels used while rows travel through Ray Data (-1, "", NaN) become real nulls on disk."""
    out = results.copy()
    for col in ("candidate", "rank", "seed"):
        out[col] = out[col].astype("Int64").mask(out[col] < 0)
    labels = [f"{p}_{a}" for p in ("truth", "pred") for a in ATTRIBUTES]
    for col in ["image_path", "detail", "pair_split", "wording", *labels]:
        out[col] = out[col].mask(out[col] == "")
    return out


def training_curves(config: Config) -> dict[str, list[dict[str, Any]]]:
    """The ``metrics.jsonl`` records of the dVAE, DALLE and CLIP runs under ``paths.runs``, where they exist
    (the report draws their loss curves)."""
    runs = config.paths.resolved().runs
    curves = {}
    for model, section in (("dVAE", config.train_vae), ("DALLE", config.train), ("CLIP", config.train_clip)):
        path = storage.join(run_dir(runs, section.run_name), "metrics.jsonl")
        if storage.exists(path):
            curves[model] = [json.loads(line) for line in read_bytes(path).decode().splitlines() if line.strip()]
    return curves


def write_outputs(config: Config, paths: ModelPaths, output: str, results: pd.DataFrame,
                  timing: dict[str, float], sampling: dict[str, Any]) -> dict[str, Any]:
    """results.parquet, metrics.json, grid.png and report.html; returns the metrics. ``sampling`` is what the
    generator ran with (its ``settings()``: the config's section, precision resolved)."""
    out = output.rstrip("/")
    metrics = compute_metrics(results)
    if config.evaluate.prompt_source == "synthetic":
        metrics["vae_reconstruction"] = checker.dvae_reconstruction(load_model(paths.vae), config.synthetic)
        metrics["quality_bar"] = quality_bar(metrics)
    metrics.update(sampling=sampling, models=asdict(paths), output=out, **timing)
    storage.write_parquet(pa.Table.from_pandas(_nullable(results), preserve_index=False), f"{out}/results.parquet")
    storage.write_json(f"{out}/metrics.json", metrics)
    write_report(out, results, metrics, config.evaluate.grid_max_prompts, training_curves(config))
    return metrics


def run_evaluation(config: Config, paths: ModelPaths, output: str, prompts: list[dict[str, Any]]) -> dict[str, Any]:
    """Starts the Serve application, streams ``prompts`` through it with Ray Data, writes every output and
    returns the metrics. Serve is shut down at the end, also on failure. A missing model file raises
    FileNotFoundError (naming every one) before anything starts."""
    from ray import serve

    paths.require()
    ev = config.evaluate
    in_flight, needed = prompts_in_flight(ev)
    if in_flight < needed:
        print(f"[evaluate] warning: evaluate.driver_concurrency x driver_batch_size = {in_flight} prompts in flight; "
              f"{needed} (2 x generator_replicas x max_batch_size) keep every Generator busy", flush=True)
    start = time.perf_counter()
    serve.start(http_options={"host": ev.http_host, "port": ev.http_port})
    try:
        serve.run(build_app(config, paths), name=ev.app_name, route_prefix=ev.route_prefix, blocking=False)
        sampling = serve.get_deployment_handle("Generator", ev.app_name).settings.remote().result()
        ready = time.perf_counter()
        # The client actors only wait on handles, so they take no CPU from the replicas.
        results = stream_prompts(prompts, ServeClient, client_kwargs(config, output), ev.driver_batch_size,
                                 **client_actor_options(ev))
        elapsed = time.perf_counter() - ready
    finally:
        serve.shutdown()
    return write_outputs(config, paths, output, results, {
        "prompts_per_s": len(prompts) / elapsed, "serve_startup_s": ready - start, "generation_s": elapsed},
        sampling)
