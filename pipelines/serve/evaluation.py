"""The evaluation batch driver: prompts stream through Ray Data into the Serve application's handles, and the
ranked candidates land in an output folder (local or s3://):

    images/<key>/rank<r>_cand<c>.png   top ``sampling.top_images`` candidates of every accepted prompt
    grid.png                          one row per prompt (first ``evaluate.grid_max_prompts``), best first
    results.parquet                   one row per candidate (one per rejected prompt, with its status)
    metrics.json                      CLIP top-1 vs random candidate; synthetic attribute accuracy
    report.html                       grid, per-prompt scores and the metrics

Serve is started here and shut down when the job ends, whether it succeeds or fails.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import ray
import torch
from PIL import Image

from dalle_core.sampling import STATUS_ERROR, batch_seed, latest_checkpoint, make_grid, png_bytes, rank_order
from pipelines.config import Config
from pipelines.data import synthetic
from pipelines.serve.app import GENERATOR, SCORER, ModelPaths, build_app

ATTRIBUTES = ("color", "shape", "size", "position")


# ---------------------------------------------------------------------------------------------------------
# Inputs


def resolve_model_paths(config: Config, checkpoint: str | None = None, vae: str | None = None,
                        tokenizer: str | None = None, clip: str | None = None) -> ModelPaths:
    """Explicit paths win; the rest default from ``config.paths`` (so flags alone can point at s3://)."""
    paths = config.paths.resolved()
    return ModelPaths(checkpoint=checkpoint or latest_checkpoint(paths.runs, config.train.run_name),
                      vae=vae or paths.vae, tokenizer=tokenizer or paths.tokenizer, clip=clip or paths.clip)


def synthetic_prompts(config: Config, num_prompts: int) -> list[dict[str, Any]]:
    """Captions of the synthetic set with ground truth, half from held-out (color, shape) pairs (never seen in
    training) and half from seen pairs; ``pair_split`` says which. Fixed for a seed."""
    num_prompts = num_prompts or 64
    held = synthetic.holdout_examples(config.synthetic)
    held_pairs = synthetic.holdout_set(config.synthetic)
    rng = np.random.default_rng(config.synthetic.seed + 1)
    seen = []
    combos = [(c, s, z, p) for c in synthetic.COLORS for s in synthetic.SHAPES if (c, s) not in held_pairs
              for z in synthetic.SIZES for p in synthetic.POSITIONS]
    for j, index in enumerate(rng.permutation(len(combos))[: num_prompts]):
        attrs = synthetic.Attributes(*combos[index])
        seen.append({"caption": synthetic.caption_for(attrs, j), **asdict(attrs)})
    held = [held[i] for i in rng.permutation(len(held))]
    n_held = min(len(held), num_prompts // 2) if seen else min(len(held), num_prompts)
    chosen = [(r, "heldout") for r in held[:n_held]] + [(r, "seen") for r in seen[: num_prompts - n_held]]
    return [{"prompt": r["caption"], "pair_split": split, **{f"truth_{a}": r[a] for a in ATTRIBUTES}}
            for r, split in chosen]


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
        with fsspec.open(path, "r", encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the file's final newline ends the last prompt; it is not one more prompt
        records = [{"prompt": line} for line in lines]
    elif source == "parquet":
        table = pd.read_parquet(path, columns=[column], filesystem=fsspec.core.url_to_fs(path)[0])
        records = [{"prompt": "" if v is None else str(v)} for v in table[column].tolist()]
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
    found = synthetic.check_picture(image)
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
                "pair_split": rec.get("pair_split", ""),
                **{f"truth_{a}": rec.get(f"truth_{a}", "") for a in ATTRIBUTES}}
        blank = {"candidate": -1, "score": float("nan"), "rank": -1, "random_pick": False, "image_path": "",
                 **{f"pred_{a}": "" for a in ATTRIBUTES}}
        if scores is None:
            return [dict(base, **blank)]
        images = gen["images"]
        order = rank_order(torch.tensor([scores]))[0].tolist()
        pick = batch_seed(self.seed, [rec["key"], "random"]) % len(scores)
        check = rec.get("truth_color", "") != ""
        rows = []
        for rank, cand in enumerate(order):
            path = ""
            if rank < self.top:
                path = f"images/{rec['key']}/rank{rank}_cand{cand}.png"
                with fsspec.open(f"{self.output}/{path}", "wb") as f:
                    f.write(png_bytes(images[cand]))
            pred = check_attributes(images[cand]) if check else {}
            rows.append(dict(base, candidate=cand, score=float(scores[cand]), rank=rank,
                             random_pick=cand == pick, image_path=path,
                             **{f"pred_{a}": str(pred.get(a, "")) for a in ATTRIBUTES}))
        return rows

    def _generate(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All prompts of the batch are in flight at once, so Serve can group them with other actors'."""
        futures = [self.generator.generate.remote({"prompt": r["prompt"], "key": r["key"],
                                                   "num_candidates": self.n}) for r in records]
        gens = []
        for fut in futures:
            try:
                gens.append(fut.result())
            except Exception as exc:  # a failed replica call costs its prompts, not the job
                gens.append({"status": STATUS_ERROR, "detail": f"generator call failed: {exc!r}", "images": None})
        return gens

    def _score(self, gens: list[dict[str, Any]]) -> list[list[float] | Exception | None]:
        futures = [self.scorer.score.remote({"text_ids": g["text_ids"], "images": g["images"]})
                   if g["images"] is not None else None for g in gens]
        out: list[list[float] | Exception | None] = []
        for fut in futures:
            try:
                out.append(fut.result() if fut is not None else None)
            except Exception as exc:
                out.append(exc)
        return out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        records = batch.to_dict("records")
        gens = self._generate(records)
        rows = []
        for rec, gen, scores in zip(records, gens, self._score(gens), strict=True):
            if isinstance(scores, Exception):
                gen, scores = dict(gen, status=STATUS_ERROR, detail=f"scorer call failed: {scores!r}"), None
            rows.extend(self._rows(rec, gen, scores))
        return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------
# Outputs


def compute_metrics(results: pd.DataFrame) -> dict[str, Any]:
    """CLIP score of the top-1 against a random candidate, and per (color, shape) split the attribute
    accuracy of both (only where ground truth exists)."""
    per_prompt = results.drop_duplicates("key")
    metrics: dict[str, Any] = {
        "num_prompts": int(len(per_prompt)),
        "status_counts": {k: int(v) for k, v in per_prompt["status"].value_counts().items()},
    }
    ok = results[results["status"] == "ok"]
    top1, rand = ok[ok["rank"] == 0], ok[ok["random_pick"]]
    metrics["clip_score"] = {
        "top1_mean": float(top1["score"].mean()) if len(top1) else None,
        "random_mean": float(rand["score"].mean()) if len(rand) else None,
        "all_mean": float(ok["score"].mean()) if len(ok) else None,
    }
    accuracy: dict[str, Any] = {}
    for split in ("seen", "heldout"):
        for name, rows in (("top1", top1), ("random", rand)):
            rows = rows[(rows["pair_split"] == split) & (rows["truth_color"] != "")]
            if not len(rows):
                continue
            hits = {a: rows[f"pred_{a}"] == rows[f"truth_{a}"] for a in ATTRIBUTES}
            entry = {a: float(h.mean()) for a, h in hits.items()}
            entry["all"] = float(np.logical_and.reduce([h.to_numpy() for h in hits.values()]).mean())
            entry["n"] = int(len(rows))
            accuracy.setdefault(split, {})[name] = entry
    metrics["attribute_accuracy"] = accuracy
    return metrics


# The demo's quality bar on the synthetic set: (what, where in metrics.json, minimum). A minimum given as a path
# is another metric the value must exceed (reranking must beat a random candidate).
QUALITY_BAR: tuple[tuple[str, str, float | str], ...] = (
    ("top-1 colour, seen (color, shape) pairs", "attribute_accuracy.seen.top1.color", 0.90),
    ("top-1 shape, seen (color, shape) pairs", "attribute_accuracy.seen.top1.shape", 0.75),
    ("top-1 colour, held-out (color, shape) pairs", "attribute_accuracy.heldout.top1.color", 0.70),
    ("reranking beats a random candidate (all four, seen)", "attribute_accuracy.seen.top1.all",
     "attribute_accuracy.seen.random.all"),
    ("dVAE keeps colour and shape (fresh pictures)", "vae_reconstruction.all.both", 0.98),
)


def _lookup(metrics: dict[str, Any], path: str) -> float | None:
    value: Any = metrics
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def quality_bar(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Each check of :data:`QUALITY_BAR` with its value, minimum and verdict; checks whose metrics are absent
    (real-data prompts, no dVAE score) are left out."""
    checks = []
    for name, path, minimum in QUALITY_BAR:
        value = _lookup(metrics, path)
        bound = _lookup(metrics, minimum) if isinstance(minimum, str) else minimum
        if value is not None and bound is not None:
            checks.append({"check": name, "value": value, "minimum": bound,
                           "strict": isinstance(minimum, str),
                           "passed": value > bound if isinstance(minimum, str) else value >= bound})
    return checks


def describe_check(check: dict[str, Any]) -> tuple[str, str]:
    """A quality-bar check's bar (``>= 90.0%``, or ``> 77.6%`` against another metric) and verdict."""
    return f"{'>' if check['strict'] else '>='} {check['minimum']:.1%}", "pass" if check["passed"] else "MISSED"


def format_metrics(metrics: dict[str, Any]) -> str:
    """metrics.json as plain-text tables: attribute accuracy, CLIP scores, dVAE reconstruction, quality bar
    (what the demo prints last)."""
    clip = metrics["clip_score"]
    lines = [f"prompts {metrics['num_prompts']} {json.dumps(metrics['status_counts'])}; mean CLIP score top-1 "
             f"{_fmt(clip['top1_mean'])}, random candidate {_fmt(clip['random_mean'])}"]
    accuracy = metrics.get("attribute_accuracy", {})
    if accuracy:
        lines += ["", f"{'pairs':<8} {'pick':<7}" + "".join(f"{a:>9}" for a in (*ATTRIBUTES, "all")) + f"{'n':>5}"]
        for split, picks in accuracy.items():
            for pick, entry in picks.items():
                lines.append(f"{split:<8} {pick:<7}" + "".join(f"{entry[a]:>9.1%}" for a in (*ATTRIBUTES, "all"))
                             + f"{entry['n']:>5}")
    if "vae_reconstruction" in metrics:
        lines += ["", f"{'dVAE decode(encode(x))':<23}{'color':>9}{'shape':>9}{'both':>9}{'n':>6}"]
        lines += [f"{split + ' pairs':<23}{e['color']:>9.1%}{e['shape']:>9.1%}{e['both']:>9.1%}{e['n']:>6}"
                  for split, e in metrics["vae_reconstruction"].items()]
    if metrics.get("quality_bar"):
        lines += ["", f"{'quality bar':<54} {'value':>7} {'bar':>9}  verdict"]
        for c in metrics["quality_bar"]:
            bar, verdict = describe_check(c)
            lines.append(f"{c['check']:<54} {c['value']:>7.1%} {bar:>9}  {verdict}")
    return "\n".join(lines)


def _nullable(results: pd.DataFrame) -> pd.DataFrame:
    """Sentinels used while rows travel through Ray Data (-1, "", NaN) become real nulls on disk."""
    out = results.copy()
    for col in ("candidate", "rank", "seed"):
        out[col] = out[col].astype("Int64").mask(out[col] < 0)
    for col in ["image_path", "detail", "pair_split", *[f"{p}_{a}" for p in ("truth", "pred") for a in ATTRIBUTES]]:
        out[col] = out[col].mask(out[col] == "")
    return out


def _read_png(url: str) -> np.ndarray:
    with fsspec.open(url, "rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def write_report(output: str, results: pd.DataFrame, metrics: dict[str, Any], grid_rows: int) -> None:
    """grid.png (prompts as rows, best first) and report.html around it with scores and metrics."""
    out = output.rstrip("/")
    ok = results[(results["status"] == "ok") & (results["image_path"] != "")].sort_values(["key", "rank"])
    keys = list(dict.fromkeys(ok["key"]))[:grid_rows]
    rows = [[_read_png(f"{out}/{p}") for p in ok[ok["key"] == k]["image_path"]] for k in keys]
    if rows:
        scale = max(1, 64 // rows[0][0].shape[0])
        with fsspec.open(f"{out}/grid.png", "wb") as f:
            f.write(png_bytes(make_grid(rows, scale=scale)))
    table = []
    for _key, group in results.sort_values(["key", "rank"]).groupby("key", sort=True):
        first = group.iloc[0]
        if first["status"] != "ok":
            table.append(f"<tr class='bad'><td>{html.escape(first['prompt']) or '<i>(empty)</i>'}</td>"
                         f"<td colspan=2><b>{html.escape(first['status'])}</b>: {html.escape(first['detail'])}"
                         "</td></tr>")
            continue
        shown = group[group["image_path"] != ""]
        cells = "".join(f"<figure><img src='{html.escape(p)}'><figcaption>{s:.3f}</figcaption></figure>"
                        for p, s in zip(shown["image_path"], shown["score"], strict=True))
        scores = ", ".join(f"{s:.3f}" for s in group["score"])
        table.append(f"<tr><td>{html.escape(first['prompt'])}</td><td class='imgs'>{cells}</td>"
                     f"<td class='scores'>{scores}</td></tr>")
    bar = "".join(f"<tr class='{'' if c['passed'] else 'bad'}'><td>{html.escape(c['check'])}</td>"
                  f"<td>{c['value']:.1%}</td>" + "".join(f"<td>{html.escape(t)}</td>" for t in describe_check(c))
                  + "</tr>" for c in metrics.get("quality_bar", []))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>DALL-E evaluation</title><style>
body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:6px 10px;vertical-align:middle;text-align:left}}
img{{image-rendering:pixelated;width:64px;height:64px}} figure{{display:inline-block;margin:0 6px 0 0}}
figcaption{{font-size:11px;text-align:center}} .scores{{font-size:11px;color:#666;max-width:260px}}
tr.bad td{{color:#a00}} pre{{background:#f6f6f6;padding:12px;font-size:12px}} .grid{{image-rendering:pixelated}}
</style></head><body>
<h1>DALL-E evaluation</h1>
<p>{metrics['num_prompts']} prompts, status: {html.escape(json.dumps(metrics['status_counts']))};
mean CLIP score top-1 {_fmt(metrics['clip_score']['top1_mean'])} vs random candidate
{_fmt(metrics['clip_score']['random_mean'])}.</p>
{"<h2>Quality bar</h2><table><tr><th>check</th><th>value</th><th>bar</th><th>verdict</th></tr>" + bar + "</table>"
 if bar else ""}
<h2>Grid (prompts as rows, best candidate first)</h2>
{"<img class='grid' src='grid.png' style='width:auto;height:auto'>" if rows else "<p>no accepted prompts</p>"}
<h2>Per prompt (top candidates with CLIP score; all scores, best first)</h2>
<table><tr><th>prompt</th><th>top candidates</th><th>all scores</th></tr>{''.join(table)}</table>
<h2>Metrics</h2><pre>{html.escape(json.dumps(metrics, indent=2))}</pre></body></html>"""
    with fsspec.open(f"{out}/report.html", "w", encoding="utf-8") as f:
        f.write(page)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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
    fields = ["key", "prompt", "pair_split", *[f"truth_{a}" for a in ATTRIBUTES]]
    rows = [{f: "" if r.get(f) is None else str(r[f]) for f in fields} for r in prompts]
    # Blocks are made here, not by tasks: the replicas may hold every CPU, and a read task waiting for one
    # would stall the job. One block per batch lets every actor of the pool take work.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
    ds = ds.map_batches(client, batch_format="pandas", batch_size=batch_size, concurrency=concurrency,
                        fn_constructor_kwargs=kwargs, **resources)
    results = pd.concat(list(ds.iter_batches(batch_format="pandas", batch_size=None)), ignore_index=True)
    return results.sort_values(["key", "rank"], kind="stable").reset_index(drop=True)


def write_outputs(config: Config, paths: ModelPaths, output: str, results: pd.DataFrame,
                  timing: dict[str, float]) -> dict[str, Any]:
    """results.parquet, metrics.json, grid.png and report.html; returns the metrics."""
    out = output.rstrip("/")
    metrics = compute_metrics(results)
    if config.evaluate.prompt_source == "synthetic":
        metrics["vae_reconstruction"] = synthetic.dvae_reconstruction(paths.vae, config.synthetic)
        metrics["quality_bar"] = quality_bar(metrics)
    metrics.update(sampling=asdict(config.sampling), models=asdict(paths), output=out, **timing)
    with fsspec.open(f"{out}/results.parquet", "wb") as f:
        _nullable(results).to_parquet(f, index=False)
    with fsspec.open(f"{out}/metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    write_report(out, results, metrics, config.evaluate.grid_max_prompts)
    return metrics


def run_evaluation(config: Config, paths: ModelPaths, output: str, prompts: list[dict[str, Any]]) -> dict[str, Any]:
    """Starts the Serve application, streams ``prompts`` through it with Ray Data, writes every output and
    returns the metrics. Serve is shut down at the end, also on failure."""
    from ray import serve

    ev = config.evaluate
    start = time.perf_counter()
    serve.start(http_options={"host": ev.http_host, "port": ev.http_port})
    try:
        serve.run(build_app(config, paths), name=ev.app_name, route_prefix=ev.route_prefix, blocking=False)
        ready = time.perf_counter()
        # The client actors only wait on handles, so they take no CPU from the replicas.
        results = stream_prompts(prompts, ServeClient, client_kwargs(config, output), ev.driver_batch_size,
                                 ev.driver_concurrency, num_cpus=0)
        elapsed = time.perf_counter() - ready
    finally:
        serve.shutdown()
    return write_outputs(config, paths, output, results, {
        "prompts_per_s": len(prompts) / elapsed, "serve_startup_s": ready - start, "generation_s": elapsed})
