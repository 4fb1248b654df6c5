"""What an evaluation's result rows mean to people: the metrics, the demo's quality bar, and their renderings
(plain text for the terminal, ``grid.png`` and ``report.html`` beside ``results.parquet``).

Apart from the batch driver (:mod:`pipelines.serve.evaluation`) so that the demo and the tests can judge and
print a finished run's ``metrics.json`` without Ray or Serve.
"""

from __future__ import annotations

import html
import io
import json
import math
from dataclasses import fields
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from dalle_core.images import make_grid, png_bytes
from dalle_core.io import read_bytes, write_bytes, write_text
from dalle_core.metrics import wilson_interval
from pipelines.data.synthetic import Attributes

# What the synthetic checker reads back; results carry a truth_<a> and a pred_<a> column for each.
ATTRIBUTES: tuple[str, ...] = tuple(f.name for f in fields(Attributes))
# The synthetic prompt sets: name -> (pair_split, wording) of the prompts in it. Held-out pairs are (colour, shape)
# combinations no training picture has; held-out wordings are sentence shapes no training caption has.
PROMPT_SETS: dict[str, tuple[str, str]] = {"seen": ("seen", "train"), "heldout": ("heldout", "train"),
                                           "heldout_wording": ("seen", "heldout")}
PROMPT_SET_TITLES = {"seen": "seen pairs", "heldout": "held-out pairs", "heldout_wording": "held-out wordings",
                     "": "other prompts"}
GRID_TILE_PX = 64  # tiny pictures are enlarged to about this size in grids so a 16 px model stays readable
CAPTION_PX = 420  # width of the caption column of grid.png


# ---------------------------------------------------------------------------------------------------------
# Metrics and the quality bar


def prompt_set(results: pd.DataFrame) -> pd.Series:
    """Each row's :data:`PROMPT_SETS` name ("" for prompts in none, e.g. real data). Rows written before wordings
    were held out have no ``wording`` and count as training wordings."""
    wording = (results["wording"].replace("", "train").fillna("train") if "wording" in results
               else pd.Series("train", index=results.index))
    names = pd.Series("", index=results.index)
    for name, (pair_split, family) in PROMPT_SETS.items():
        names[(results["pair_split"] == pair_split) & (wording == family)] = name
    return names


def compute_metrics(results: pd.DataFrame) -> dict[str, Any]:
    """CLIP score of the top-1 against a random candidate, and per (color, shape) split the attribute
    accuracy of both (only where ground truth exists): whether reranking picks better pictures than chance.
    ``all_ci95`` is the 95% interval of ``all``: on 64 prompts a rate is known to about +-9 points."""
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
    for split in PROMPT_SETS:
        for name, rows in (("top1", top1), ("random", rand)):
            rows = rows[(prompt_set(rows) == split) & (rows["truth_color"] != "")]
            if not len(rows):
                continue
            hits = {a: rows[f"pred_{a}"] == rows[f"truth_{a}"] for a in ATTRIBUTES}
            entry = {a: float(h.mean()) for a, h in hits.items()}
            all_right = np.logical_and.reduce([h.to_numpy() for h in hits.values()])
            entry["all"], entry["n"] = float(all_right.mean()), int(len(rows))
            entry["all_ci95"] = list(wilson_interval(int(all_right.sum()), len(rows)))
            accuracy.setdefault(split, {})[name] = entry
    metrics["attribute_accuracy"] = accuracy
    return metrics


# The demo's quality bar on the synthetic set: (what, where in metrics.json, minimum). A minimum given as a path
# is another metric the value must exceed (reranking must beat a random candidate).
QUALITY_BAR: tuple[tuple[str, str, float | str], ...] = (
    ("top-1 colour, seen (color, shape) pairs", "attribute_accuracy.seen.top1.color", 0.90),
    ("top-1 shape, seen (color, shape) pairs", "attribute_accuracy.seen.top1.shape", 0.90),
    ("top-1 all four right, held-out (color, shape) pairs", "attribute_accuracy.heldout.top1.all", 0.85),
    ("top-1 all four right, held-out wordings", "attribute_accuracy.heldout_wording.top1.all", 0.70),
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


def _interval(entry: dict[str, Any]) -> str:
    """``all_ci95`` as ``73.6-91.3%`` (metrics.json files written before it was kept show nothing)."""
    low, high = entry.get("all_ci95") or (None, None)
    return "" if low is None else f"{low:.1%}-{high:.1%}".replace("%-", "-")


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
        lines += ["", f"{'prompt set':<18} {'pick':<7}" + "".join(f"{a:>9}" for a in (*ATTRIBUTES, "all"))
                  + f"{'n':>5}  all, 95% interval"]
        for split, picks in accuracy.items():
            for pick, entry in picks.items():
                values = "".join(f"{entry[a]:>9.1%}" for a in (*ATTRIBUTES, "all"))
                lines.append(f"{PROMPT_SET_TITLES.get(split, split):<18} {pick:<7}{values}{entry['n']:>5}  "
                             f"{_interval(entry)}")
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


def _caption_strip(text: str, height: int, width: int) -> np.ndarray:
    """A white uint8 ``[height, width, 3]`` tile with ``text`` in black, cut to fit (the grid's row labels)."""
    font = ImageFont.load_default(size=14)
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    while text and draw.textlength(text, font=font) > width - 8:
        text = text[:-2] + "…"
    draw.text((4, height // 2), text, fill="black", font=font, anchor="lm")
    return np.asarray(strip)


def grid_png(rows: list[list[np.ndarray]], captions: list[str] | None = None) -> bytes:
    """PNG of :func:`dalle_core.images.make_grid` with tiny pictures enlarged to about :data:`GRID_TILE_PX`;
    with ``captions``, each row starts with its caption."""
    scale = max(1, GRID_TILE_PX // rows[0][0].shape[0])
    grid = make_grid(rows, scale=scale)
    if captions is None:
        return png_bytes(grid)
    tile = rows[0][0].shape[0] * scale
    labels = make_grid([[_caption_strip(c, tile, CAPTION_PX)] for c in captions])
    return png_bytes(np.concatenate([labels, grid], axis=1))


def _read_png(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(read_bytes(url))).convert("RGB"))


def write_grid(output: str, results: pd.DataFrame, max_prompts: int) -> bool:
    """``grid.png`` from the written top candidates, one row per accepted prompt (the first ``max_prompts``),
    its caption first, best candidate next; False when no prompt was accepted (nothing to show)."""
    out = output.rstrip("/")
    ok = results[(results["status"] == "ok") & (results["image_path"] != "")].sort_values(["key", "rank"])
    keys = list(dict.fromkeys(ok["key"]))[:max_prompts]
    rows = [[_read_png(f"{out}/{p}") for p in ok[ok["key"] == k]["image_path"]] for k in keys]
    if rows:
        captions = [str(ok.loc[ok["key"] == k, "prompt"].iloc[0]) for k in keys]
        write_bytes(f"{out}/grid.png", grid_png(rows, captions))
    return bool(rows)


# ---------------------------------------------------------------------------------------------------------
# report.html, one function per section

STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px} table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:4px 10px;vertical-align:middle;text-align:left} th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums} tr.bad td{color:#a00}
.prompt{border-top:1px solid #ddd;padding:8px 0} .caption{font-size:15px} .caption b{font-weight:600}
.tag{display:inline-block;font-size:11px;padding:1px 6px;border-radius:8px;background:#e8e8f8;margin-left:6px}
.tag.wording{background:#f8ecd8} .tag.fail{background:#f8d8d8} .truth{font-size:12px;color:#555}
figure{display:inline-block;margin:4px 6px 0 0;min-width:72px;padding:3px;border:2px solid transparent;
vertical-align:top} figure.chosen{border-color:#2a7}
figure img,.blank{image-rendering:pixelated;width:64px;height:64px;display:block}
.blank{background:#eee} figcaption{font-size:10px;text-align:center;line-height:1.3}
.ok{color:#2a7} .no{color:#c00;font-weight:bold} details{margin:8px 0} summary{cursor:pointer;font-weight:600}
svg{background:#fafafa;margin:0 12px 12px 0} .grid{image-rendering:pixelated;max-width:100%}"""
ATTRIBUTE_MARKS = {"color": "c", "shape": "s", "size": "z", "position": "p"}  # a candidate's verdict, per letter


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: tuple[str, ...], rows: list[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _cells(values: list[Any]) -> str:
    """Table cells: floats as right-aligned percentages or numbers, everything else as text."""
    out = []
    for v in values:
        if isinstance(v, float):
            out.append(f"<td class='num'>{v:.1%}</td>" if 0 <= v <= 1 else f"<td class='num'>{v:.3g}</td>")
        else:
            out.append(f"<td>{_e(v)}</td>")
    return "".join(out)


def _summary_section(metrics: dict[str, Any]) -> str:
    clip = metrics["clip_score"]
    return (f"<h1>DALL-E evaluation</h1>\n<p>{_e(metrics['num_prompts'])} prompts, status: "
            f"{_e(json.dumps(metrics['status_counts']))};\nmean CLIP score top-1 {_e(_fmt(clip['top1_mean']))} "
            f"vs random candidate\n{_e(_fmt(clip['random_mean']))}. Every number here is also in "
            "<a href='metrics.json'>metrics.json</a>; every candidate in <a href='results.parquet'>results.parquet</a>."
            "</p>")


def _check_row(check: dict[str, Any]) -> str:
    bar, verdict = describe_check(check)
    return (f"<tr class='{'' if check['passed'] else 'bad'}'><td>{_e(check['check'])}</td>"
            f"<td class='num'>{check['value']:.1%}</td><td>{_e(bar)}</td><td>{_e(verdict)}</td></tr>")


def _quality_section(checks: list[dict[str, Any]]) -> str:
    """The bar's checks, missed ones in red; nothing when no check applies (real-data prompts)."""
    if not checks:
        return ""
    return "<h2>Quality bar</h2>" + _table(("check", "value", "bar", "verdict"), [_check_row(c) for c in checks])


def _metrics_section(metrics: dict[str, Any]) -> str:
    """Attribute accuracy per prompt set, the dVAE round trip, and how the run went, as tables."""
    parts = ["<h2>Metrics</h2>"]
    accuracy = metrics.get("attribute_accuracy", {})
    if accuracy:
        rows = [f"<tr>{_cells([PROMPT_SET_TITLES.get(split, split), pick, *[e[a] for a in (*ATTRIBUTES, 'all')]])}"
                f"<td class='num'>{_e(_interval(e))}</td><td class='num'>{e['n']}</td></tr>"
                for split, picks in accuracy.items() for pick, e in picks.items()]
        parts.append("<h3>Attributes the checker reads in the chosen (top-1) and a random candidate</h3>"
                     + _table(("prompt set", "candidate", *ATTRIBUTES, "all four", "all four, 95% interval",
                               "prompts"), rows))
    if "vae_reconstruction" in metrics:
        rows = [f"<tr>{_cells([f'{split} pairs', e['color'], e['shape'], e['both']])}<td class='num'>{e['n']}</td>"
                "</tr>" for split, e in metrics["vae_reconstruction"].items()]
        parts.append("<h3>dVAE round trip on fresh pictures: decode(encode(x)) keeps</h3>"
                     + _table(("pictures", "colour", "shape", "both", "n"), rows))
    clip, sampling = metrics["clip_score"], metrics.get("sampling", {})
    run = [("mean CLIP score, top-1", clip["top1_mean"]), ("mean CLIP score, random candidate", clip["random_mean"]),
           ("prompts per second", metrics.get("prompts_per_s")), ("Serve start-up (s)", metrics.get("serve_startup_s")),
           *[(f"sampling.{k}", v) for k, v in sampling.items()], *metrics.get("models", {}).items()]
    rows = [f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v) if isinstance(v, float) else v)}</td></tr>"
            for k, v in run if v is not None]
    parts.append("<h3>Run</h3>" + _table(("what", "value"), rows))
    return "\n".join(parts)


def _svg_curve(title: str, points: list[tuple[float, float]], width: int = 420, height: int = 200) -> str:
    """One metric against step as an inline SVG line chart, with its range on the axes. A positive metric that
    spans more than 10x is drawn on a log scale, so the first steps' drop does not flatten the rest."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    left, bottom, top = 48, 24, 22
    scale = math.log10 if y0 > 0 and y1 > 10 * y0 else float
    if scale is math.log10:
        title += " (log scale)"
    s0, s1 = scale(y0), scale(y1)

    def at(x: float, y: float) -> str:
        px = left + (x - x0) / ((x1 - x0) or 1) * (width - left - 10)
        py = top + (s1 - scale(y)) / ((s1 - s0) or 1) * (height - top - bottom)
        return f"{px:.1f},{py:.1f}"

    axis = f"stroke='#999' fill='none' points='{left},{top} {left},{height - bottom} {width - 10},{height - bottom}'"
    return (f"<svg width='{width}' height='{height}' role='img'><title>{_e(title)}</title>"
            f"<text x='{left}' y='14' font-size='12'>{_e(title)}</text><polyline {axis}/>"
            f"<polyline fill='none' stroke='#36c' stroke-width='1.5' points='{' '.join(at(x, y) for x, y in points)}'/>"
            f"<text x='{left - 4}' y='{top + 4}' font-size='10' text-anchor='end'>{y1:.3g}</text>"
            f"<text x='{left - 4}' y='{height - bottom}' font-size='10' text-anchor='end'>{y0:.3g}</text>"
            f"<text x='{left}' y='{height - 6}' font-size='10'>step {x0:g}</text>"
            f"<text x='{width - 10}' y='{height - 6}' font-size='10' text-anchor='end'>{x1:g}</text></svg>")


def _curves_section(curves: dict[str, list[dict[str, Any]]]) -> str:
    """A loss curve per trained model, from the ``metrics.jsonl`` records of its run."""
    charts = []
    for model, records in curves.items():
        points = [(float(r["step"]), float(r["loss"])) for r in records if "step" in r and "loss" in r]
        if len(points) >= 2:
            charts.append(_svg_curve(f"{model}: training loss", sorted(dict(points).items())))
    return "<h2>Training</h2>\n" + "".join(charts) if charts else ""


def _figure(row: pd.Series, check: bool) -> str:
    """One candidate: its picture (or a blank where it was not written), CLIP score, rank, and the checker's
    verdict per attribute (a wrong one with what the checker saw instead); the chosen (top-1) one is framed."""
    picture = f"<img src='{_e(row['image_path'])}' alt=''>" if row["image_path"] else "<div class='blank'></div>"
    marks = ""
    if check:
        marks = "<br>" + " ".join(
            f"<span class='ok' title='{a}: {_e(row[f'pred_{a}'])}'>{m}</span>" if row[f"pred_{a}"] == row[f"truth_{a}"]
            else f"<span class='no' title='{a}: {_e(row[f'pred_{a}'])}'>{m}:{_e(row[f'pred_{a}'])}</span>"
            for a, m in ATTRIBUTE_MARKS.items())
    chosen = " chosen" if row["rank"] == 0 else ""
    pick = " (random)" if row["random_pick"] else ""
    return (f"<figure class='cand{chosen}'>{picture}<figcaption>#{int(row['rank']) + 1} {row['score']:.3f}{pick}"
            f"{marks}</figcaption></figure>")


def _prompt_block(group: pd.DataFrame, failed: bool) -> str:
    """One prompt: caption with what was held out, its truth, then every candidate best first."""
    first = group.iloc[0]
    caption = _e(first["prompt"]) or "<i>(empty)</i>"
    if first["status"] != "ok":
        return (f"<div class='prompt'><span class='caption'>{caption}</span><span class='tag fail'>"
                f"{_e(first['status'])}</span><div class='truth'>{_e(first['detail'])}</div></div>")
    check = bool(first.get("truth_color", ""))
    tags = ""
    if first.get("pair_split") == "heldout":
        tags += "<span class='tag'>held-out pair</span>"
    if first.get("wording") == "heldout":
        tags += "<span class='tag wording'>held-out wording</span>"
    if failed:
        tags += "<span class='tag fail'>top-1 wrong</span>"
    truth = ""
    if check:
        truth = "<div class='truth'>asked for: " + ", ".join(
            f"{a} <b>{_e(first[f'truth_{a}'])}</b>" for a in ATTRIBUTES) + " &middot; checker marks: " + ", ".join(
            f"{m} = {a}" for a, m in ATTRIBUTE_MARKS.items()) + "</div>"
    figures = "".join(_figure(row, check) for _, row in group.iterrows())
    return f"<div class='prompt'><span class='caption'>{caption}</span>{tags}{truth}<div>{figures}</div></div>"


def _top1_wrong(group: pd.DataFrame) -> bool:
    """Whether a prompt failed: rejected, or its chosen candidate misses an attribute it asked for."""
    top = group.iloc[0]
    if top["status"] != "ok":
        return True
    return bool(top.get("truth_color", "")) and any(top[f"pred_{a}"] != top[f"truth_{a}"] for a in ATTRIBUTES)


def _prompts_section(results: pd.DataFrame) -> str:
    """Every prompt, by prompt set (held-out wordings, held-out pairs, seen pairs, then the rest); in each, the
    failures first and open, the rest folded."""
    frame = results.assign(_set=prompt_set(results))
    groups = {key: g for key, g in frame.sort_values(["key", "rank"]).groupby("key", sort=True)}
    order = ["heldout_wording", "heldout", "seen", ""]
    parts = ["<h2>Per prompt</h2><p>Candidates best first by CLIP score, the chosen one framed; under each, its "
             "score and the checker's verdict per attribute.</p>"]
    for name in order:
        members = [(k, g) for k, g in groups.items() if g["_set"].iloc[0] == name]
        if not members:
            continue
        wrong = {k: _top1_wrong(g) for k, g in members}
        failed = [(k, g) for k, g in members if wrong[k]]
        passed = [(k, g) for k, g in members if not wrong[k]]
        title = PROMPT_SET_TITLES.get(name, "prompts")
        parts.append(f"<h3>{_e(title)}: {len(failed)} of {len(members)} with the top-1 wrong</h3>")
        parts += [_prompt_block(g, True) for _, g in failed]
        if passed:
            parts.append(f"<details><summary>{len(passed)} right</summary>"
                         + "".join(_prompt_block(g, False) for _, g in passed) + "</details>")
    return "\n".join(parts)


def _grid_section(has_grid: bool) -> str:
    if not has_grid:
        return ""
    return ("<details><summary>Grid (the first prompts, best candidate first)</summary>"
            "<img class='grid' src='grid.png' alt='grid'></details>")


def report_html(results: pd.DataFrame, metrics: dict[str, Any], has_grid: bool,
                curves: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """The whole page: summary, quality bar, metrics tables, training curves, then every prompt."""
    sections = [_summary_section(metrics), _quality_section(metrics.get("quality_bar", [])),
                _metrics_section(metrics), _curves_section(curves or {}), _prompts_section(results),
                _grid_section(has_grid)]
    body = "\n".join(s for s in sections if s)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>DALL-E evaluation</title>'
            f"<style>\n{STYLE}\n</style></head><body>\n{body}</body></html>")


def write_report(output: str, results: pd.DataFrame, metrics: dict[str, Any], grid_rows: int,
                 curves: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """``grid.png`` (the first ``grid_rows`` prompts) and ``report.html`` around it, both written atomically;
    ``results`` are the driver's rows (``""`` for missing values), with the top PNGs already under ``output``;
    ``curves`` the ``metrics.jsonl`` records of each trained model's run."""
    has_grid = write_grid(output, results, grid_rows)
    write_text(f"{output.rstrip('/')}/report.html", report_html(results, metrics, has_grid, curves))
