"""What an evaluation's result rows mean to people: the metrics, the demo's quality bar, and their renderings
(plain text for the terminal, ``grid.png`` and ``report.html`` beside ``results.parquet``).

Apart from the batch driver (:mod:`pipelines.serve.evaluation`) so that the demo and the tests can judge and
print a finished run's ``metrics.json`` without Ray or Serve.
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import fields
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from dalle_core.images import make_grid, png_bytes
from dalle_core.io import read_bytes, write_bytes, write_text
from pipelines.data.synthetic import Attributes

# What the synthetic checker reads back; results carry a truth_<a> and a pred_<a> column for each.
ATTRIBUTES: tuple[str, ...] = tuple(f.name for f in fields(Attributes))
GRID_TILE_PX = 64  # tiny pictures are enlarged to about this size in grids so a 16 px model stays readable


# ---------------------------------------------------------------------------------------------------------
# Metrics and the quality bar


def compute_metrics(results: pd.DataFrame) -> dict[str, Any]:
    """CLIP score of the top-1 against a random candidate, and per (color, shape) split the attribute
    accuracy of both (only where ground truth exists): whether reranking picks better pictures than chance."""
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
    (real-data prompts, no dVAE score) are left out rather than failed."""
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
    """A quality-bar check's bar (``>= 90.0%``, or ``> 77.6%`` against another metric) and verdict: one
    wording for the text table and the HTML report."""
    return f"{'>' if check['strict'] else '>='} {check['minimum']:.1%}", "pass" if check["passed"] else "MISSED"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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


# ---------------------------------------------------------------------------------------------------------
# grid.png


def grid_png(rows: list[list[np.ndarray]]) -> bytes:
    """PNG of :func:`dalle_core.images.make_grid` with tiny pictures enlarged to about :data:`GRID_TILE_PX`."""
    return png_bytes(make_grid(rows, scale=max(1, GRID_TILE_PX // rows[0][0].shape[0])))


def _read_png(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(read_bytes(url))).convert("RGB"))


def write_grid(output: str, results: pd.DataFrame, max_prompts: int) -> bool:
    """``grid.png`` from the written top candidates, one row per accepted prompt (the first ``max_prompts``),
    best first; False when no prompt was accepted (nothing to show)."""
    out = output.rstrip("/")
    ok = results[(results["status"] == "ok") & (results["image_path"] != "")].sort_values(["key", "rank"])
    keys = list(dict.fromkeys(ok["key"]))[:max_prompts]
    rows = [[_read_png(f"{out}/{p}") for p in ok[ok["key"] == k]["image_path"]] for k in keys]
    if rows:
        write_bytes(f"{out}/grid.png", grid_png(rows))
    return bool(rows)


# ---------------------------------------------------------------------------------------------------------
# report.html, one function per section

STYLE = """body{font-family:sans-serif;margin:24px;color:#222} table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:6px 10px;vertical-align:middle;text-align:left}
img{image-rendering:pixelated;width:64px;height:64px} figure{display:inline-block;margin:0 6px 0 0}
figcaption{font-size:11px;text-align:center} .scores{font-size:11px;color:#666;max-width:260px}
tr.bad td{color:#a00} pre{background:#f6f6f6;padding:12px;font-size:12px} .grid{image-rendering:pixelated}"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: tuple[str, ...], rows: list[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _summary_section(metrics: dict[str, Any]) -> str:
    clip = metrics["clip_score"]
    return (f"<h1>DALL-E evaluation</h1>\n<p>{_e(metrics['num_prompts'])} prompts, status: "
            f"{_e(json.dumps(metrics['status_counts']))};\nmean CLIP score top-1 {_e(_fmt(clip['top1_mean']))} "
            f"vs random candidate\n{_e(_fmt(clip['random_mean']))}.</p>")


def _check_row(check: dict[str, Any]) -> str:
    bar, verdict = describe_check(check)
    return (f"<tr class='{'' if check['passed'] else 'bad'}'><td>{_e(check['check'])}</td>"
            f"<td>{check['value']:.1%}</td><td>{_e(bar)}</td><td>{_e(verdict)}</td></tr>")


def _quality_section(checks: list[dict[str, Any]]) -> str:
    """The bar's checks, missed ones in red; nothing when no check applies (real-data prompts)."""
    if not checks:
        return ""
    return "<h2>Quality bar</h2>" + _table(("check", "value", "bar", "verdict"), [_check_row(c) for c in checks])


def _grid_section(has_grid: bool) -> str:
    picture = ("<img class='grid' src='grid.png' style='width:auto;height:auto'>" if has_grid
               else "<p>no accepted prompts</p>")
    return f"<h2>Grid (prompts as rows, best candidate first)</h2>\n{picture}"


def _prompt_row(group: pd.DataFrame) -> str:
    """One prompt: its top candidates with their scores and every score, or its status when rejected."""
    first = group.iloc[0]
    prompt = _e(first["prompt"]) or "<i>(empty)</i>"
    if first["status"] != "ok":
        return (f"<tr class='bad'><td>{prompt}</td><td colspan=2><b>{_e(first['status'])}</b>: "
                f"{_e(first['detail'])}</td></tr>")
    shown = group[group["image_path"] != ""]
    cells = "".join(f"<figure><img src='{_e(p)}'><figcaption>{s:.3f}</figcaption></figure>"
                    for p, s in zip(shown["image_path"], shown["score"], strict=True))
    scores = ", ".join(f"{s:.3f}" for s in group["score"])
    return f"<tr><td>{prompt}</td><td class='imgs'>{cells}</td><td class='scores'>{_e(scores)}</td></tr>"


def _prompts_section(results: pd.DataFrame) -> str:
    groups = results.sort_values(["key", "rank"]).groupby("key", sort=True)
    rows = [_prompt_row(group) for _key, group in groups]
    return ("<h2>Per prompt (top candidates with CLIP score; all scores, best first)</h2>\n"
            + _table(("prompt", "top candidates", "all scores"), rows))


def _metrics_section(metrics: dict[str, Any]) -> str:
    return f"<h2>Metrics</h2><pre>{_e(json.dumps(metrics, indent=2))}</pre>"


def report_html(results: pd.DataFrame, metrics: dict[str, Any], has_grid: bool) -> str:
    """The whole page: summary, quality bar, grid, per-prompt table, then metrics.json verbatim."""
    sections = [_summary_section(metrics), _quality_section(metrics.get("quality_bar", [])),
                _grid_section(has_grid), _prompts_section(results), _metrics_section(metrics)]
    body = "\n".join(s for s in sections if s)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>DALL-E evaluation</title>'
            f"<style>\n{STYLE}\n</style></head><body>\n{body}</body></html>")


def write_report(output: str, results: pd.DataFrame, metrics: dict[str, Any], grid_rows: int) -> None:
    """``grid.png`` (the first ``grid_rows`` prompts) and ``report.html`` around it, both written atomically;
    ``results`` are the driver's rows (``""`` for missing values), with the top PNGs already under ``output``."""
    has_grid = write_grid(output, results, grid_rows)
    write_text(f"{output.rstrip('/')}/report.html", report_html(results, metrics, has_grid))
