"""Intervals, significance, the paper beside us, the sanity-check and deletion/insertion figures,
and the self-contained ``report.html`` (report.py calls these).

Intervals (stats.py): ROAR AUC and KAR AOC get the 95 % t-interval over the networks trained per
point (one area per repeat); per-image metrics (patch, background, total variation, deletion,
insertion, the sanity check's correlations) the 95 % percentile-bootstrap interval of the mean.
Significance of a difference between two methods is a paired test at the 5 % level: for ROAR/KAR
the t-interval of the per-repeat differences (repeat ``k`` of both methods shares its seed), for
per-image metrics the bootstrap interval of the per-image differences (the same images for both);
significant when the interval excludes 0.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import numpy as np

from . import stats

# Table 1's columns: key, title; lower is better for every one
METRICS = (("roar_auc", "ROAR AUC"), ("kar_aoc", "KAR AOC"), ("patch_share", "patch attribution"),
           ("background_share", "background attribution"), ("total_variation", "total variation"))
PAPER_OTHER = "paper: lowest in its box plots, Fig. 7 and 8, which give no values"


def samples(results: dict, key: str) -> tuple[dict, str]:
    """``({method: values}, kind)``: per-repeat areas (kind "repeats") or per-image values
    (kind "images") of a Table-1 metric."""
    if key in ("roar_auc", "kar_aoc"):
        summary = (results.get("roar_kar") or {}).get("summary", {})
        return {m: v[f"{key}_repeats"] for m, v in summary.items()
                if v.get(f"{key}_repeats")}, "repeats"
    source = {"patch_share": ("occlusion", "patch_share"),
              "background_share": ("noise", "background_share"),
              "total_variation": ("noise", "total_variation")}[key]
    return dict((results.get(source[0]) or {}).get(source[1]) or {}), "images"


def interval(values, kind: str, rng, resamples: int) -> dict:
    return stats.t_interval(values) if kind == "repeats" else \
        stats.bootstrap_interval(values, rng, resamples)


def difference(a, b, kind: str, rng, resamples: int) -> dict:
    return stats.paired_t(a, b) if kind == "repeats" else \
        stats.paired_difference(a, b, rng, resamples)


def ranking(results: dict) -> dict:
    """Per Table-1 metric: the methods best first with mean, interval, rank, and whether each
    differs significantly from the method ranked just above it (``tied_with_above``)."""
    config = results["config"]
    seed, resamples = config.get("seed", 0), config.get("bootstrap", stats.RESAMPLES)
    out = {}
    for k, (key, _) in enumerate(METRICS):
        values, kind = samples(results, key)
        if not values:
            continue
        rows = []
        for i, (method, v) in enumerate(values.items()):
            rows.append({"method": method, **interval(v, kind, stats.seeded(seed, 10, k, i),
                                                      resamples)})
        rows.sort(key=lambda r: r["mean"])
        for i, row in enumerate(rows):
            row["rank"] = i + 1
            if i:
                test = difference(values[row["method"]], values[rows[i - 1]["method"]], kind,
                                  stats.seeded(seed, 11, k, i), resamples)
                row["tied_with_above"] = not test["significant"]
        out[key] = {"kind": kind, "rows": rows}
    return out


def versus(results: dict, method: str = "RectGrad") -> dict:
    """Per metric: which methods are significantly better than, worse than or not different
    from ``method`` (paired tests)."""
    config = results["config"]
    seed, resamples = config.get("seed", 0), config.get("bootstrap", stats.RESAMPLES)
    out = {}
    for k, (key, _) in enumerate(METRICS):
        values, kind = samples(results, key)
        if method not in values:
            continue
        verdict = {"better": [], "worse": [], "tied": []}
        for i, (other, v) in enumerate(values.items()):
            if other == method:
                continue
            test = difference(v, values[method], kind, stats.seeded(seed, 12, k, i), resamples)
            if not test["significant"]:
                verdict["tied"].append(other)
            elif test["mean"] < 0:
                verdict["better"].append(other)   # lower is better: the other is lower
            else:
                verdict["worse"].append(other)
        out[key] = verdict
    return out


def paper_ranks() -> dict:
    from .report import PAPER_TABLE1

    out = {}
    for index, key in enumerate(("roar_auc", "kar_aoc")):
        ordered = sorted(PAPER_TABLE1, key=lambda m: PAPER_TABLE1[m][index])
        out[key] = {m: (PAPER_TABLE1[m][index], ordered.index(m) + 1) for m in ordered}
    return out


def _cell(row: dict | None, digits: int = 4) -> str:
    if row is None or row.get("mean") is None:
        return "-"
    if row.get("low") is None:
        return f"{row['mean']:.{digits}f}"
    return f"{row['mean']:.{digits}f} [{row['low']:.{digits}f}, {row['high']:.{digits}f}]"


def table1_lines(results: dict) -> list[str]:
    """The Table-1 layout with 95 % intervals and ranks (``=k``: not significantly different
    from the method ranked above)."""
    ranked = ranking(results)
    if not ranked:
        return []
    keys = [k for k, _ in METRICS if k in ranked]
    titles = dict(METRICS)
    lines = ["", "## Table 1 with 95 % intervals and ranks", "",
             "| method | " + " | ".join(f"{titles[k]} | rank" for k in keys) + " |",
             "|---|" + "---|---|" * len(keys)]
    by_key = {k: {r["method"]: r for r in ranked[k]["rows"]} for k in keys}
    for spec in results["methods"]:
        m = spec["label"]
        cells = []
        for k in keys:
            row = by_key[k].get(m)
            rank = "-" if row is None else ("=" if row.get("tied_with_above") else "") + \
                str(row["rank"])
            digits = 2 if k == "total_variation" else 4
            cells.append(f"{_cell(row, digits)} | {rank}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Lower is better in every column. Intervals: ROAR AUC and KAR AOC the 95 % "
              "t-interval over the networks per point (seeds in `results.json`); the others the "
              "95 % percentile-bootstrap interval of the mean over the images. A rank written "
              "`=k` is **not** significantly different from the method ranked just above "
              "(paired test at 5 %: t-interval of per-seed differences for ROAR/KAR, bootstrap "
              "interval of per-image differences otherwise); a plain rank is significantly "
              "worse than the one above."]
    return lines


def paper_lines(results: dict, method: str = "RectGrad") -> list[str]:
    """The paper's Table 1 beside ours, metric by metric, and plain words about RectGrad."""
    ranked = ranking(results)
    if not ranked:
        return []
    paper = paper_ranks()
    verdicts = versus(results, method)
    lines = ["", "## The paper beside us", "",
             "The paper's Table 1 (CIFAR-10, ROAR AUC and KAR AOC; values and ranks among its "
             "eight methods) next to this run's means and ranks:", "",
             "| method | ROAR AUC (ours) | rank | ROAR AUC (paper) | rank | KAR AOC (ours) | "
             "rank | KAR AOC (paper) | rank |", "|---|---|---|---|---|---|---|---|---|"]
    ours = {k: {r["method"]: r for r in ranked[k]["rows"]} for k in ranked}
    for spec in results["methods"]:
        m = spec["label"]
        cells = []
        for k in ("roar_auc", "kar_aoc"):
            row = ours.get(k, {}).get(m)
            value, rank = paper.get(k, {}).get(m, (None, None))
            cells += ["-" if row is None else f"{row['mean']:.4f}",
                      "-" if row is None else ("=" if row.get("tied_with_above") else "")
                      + str(row["rank"]),
                      "-" if value is None else f"{value:.4f}", "-" if rank is None else
                      str(rank)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"In plain words, metric by metric ({method}; paired tests at 5 %):", ""]
    for key, title in METRICS:
        if key not in ours or method not in ours[key]:
            continue
        row = ours[key][method]
        n = len(ours[key])
        paper_rank = paper.get(key, {}).get(method, (None, None))[1]
        where = f"paper: {paper_rank} of 8" if paper_rank else PAPER_OTHER
        verdict = verdicts.get(key, {})
        if row["rank"] == 1 and not verdict.get("tied"):
            standing = "leads, significantly ahead of every other method"
        elif not verdict.get("better"):
            standing = ("leads or ties for the lead: no method is significantly better; "
                        f"not significantly different from {', '.join(verdict['tied'])}")
        else:
            standing = ("trails: significantly worse than "
                        f"{', '.join(verdict['better'])}")
            if verdict.get("tied"):
                standing += f"; not significantly different from {', '.join(verdict['tied'])}"
        if verdict.get("worse"):
            standing += f"; significantly better than {', '.join(verdict['worse'])}"
        same = paper_rank is not None and paper_rank == row["rank"]
        differs = "" if paper_rank is None else (
            " The rank is the paper's." if same else
            f" It ranks higher here than in the paper ({row['rank']} vs {paper_rank})."
            if row["rank"] < paper_rank else
            f" The rank differs from the paper's ({row['rank']} vs {paper_rank})"
            + (", and the gap to the better-ranked methods is significant." if
               verdict.get("better") else ", but not significantly: the methods ranked above "
               "are within the noise."))
        lines.append(f"* **{title}**: {method} ranks {row['rank']} of {n} ({where}); it "
                     f"{standing}.{differs}")
    return lines


def sanity_lines(s: dict) -> list[str]:
    lines = ["", "## Sanity check: cascading randomization (Adebayo et al. 2018)", "",
             f"{s['images']} test images; layers randomized from the logits down, cumulatively "
             f"({', '.join(s['layers'])}); the baselines' raw maps (no final threshold, as "
             "Adebayo et al.), RectGrad with q = 98. Mean Spearman rank correlation of |map| "
             "with the "
             "trained network's map [95 % bootstrap interval], then SSIM; a method that passes "
             "falls towards 0 (`sanity_randomization.png`, maps in `sanity_maps.png`):", "",
             "| method | " + " | ".join(f"{layer}" for layer in s["layers"]) + " |",
             "|---|" + "---|" * len(s["layers"])]
    for label, per in s["summary"].items():
        lines.append(f"| {label} (Spearman) | " + " | ".join(_cell(r, 2) for r in
                                                             per["spearman"]) + " |")
        lines.append(f"| {label} (SSIM) | " + " | ".join(_cell(r, 2) for r in per["ssim"]) +
                     " |")
    return lines


def deletion_lines(d: dict) -> list[str]:
    lines = ["", "## Deletion and insertion (no retraining)", "",
             f"{d['images']} test images, {len(d['fractions']) - 1} steps; area under the "
             "network's probability of the predicted class as the top-ranked pixels are "
             "replaced by the training mean (deletion: lower is better) or kept on a mean image "
             "(insertion: higher is better); mean [95 % bootstrap interval] "
             "(`deletion_insertion.png`):", "", "| method | deletion AUC | insertion AUC |",
             "|---|---|---|"]
    for label, per in d["summary"].items():
        lines.append(f"| {label} | {_cell(per['deletion'])} | {_cell(per['insertion'])} |")
    return lines


# ---------------------------------------------------------------------------------------------
# figures
def sanity_plot(path: Path, s: dict) -> Path:
    from .report import _pyplot_figure

    figure = _pyplot_figure(11, 4.2)
    x = np.arange(len(s["layers"]) + 1)
    for i, (key, title) in enumerate((("spearman", "Spearman rank correlation of |map|"),
                                      ("ssim", "SSIM of |map|"))):
        axis = figure.add_subplot(1, 2, i + 1)
        for label, per in s["summary"].items():
            mean = [1.0] + [r["mean"] for r in per[key]]
            low = [1.0] + [r["low"] if r["low"] is not None else r["mean"] for r in per[key]]
            high = [1.0] + [r["high"] if r["high"] is not None else r["mean"] for r in per[key]]
            width = 2.5 if label.startswith("RectGrad") else 1.3
            axis.plot(x, mean, marker="o", ms=3, lw=width, label=label)
            axis.fill_between(x, low, high, alpha=0.15)
        axis.set_xticks(x, ["original"] + list(s["layers"]), rotation=30, fontsize=8)
        axis.set_ylim(-0.2, 1.05)
        axis.axhline(0, color="grey", lw=0.8, ls=":")
        axis.set_xlabel("randomized down to (cumulative, from the logits)")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    return path


def sanity_maps(path: Path, image: np.ndarray, titles: list[str], maps: dict) -> Path:
    """Adebayo et al.'s Fig. 2 layout: rows methods, columns original then each depth."""
    from ..datasets import to_uint8
    from .report import _pyplot_figure

    columns = len(titles) + 2
    figure = _pyplot_figure(1.3 * columns, 1.3 * len(maps) + 0.6)
    for r, (label, stack) in enumerate(maps.items()):
        axis = figure.add_subplot(len(maps), columns, r * columns + 1)
        axis.imshow(to_uint8(image)[0])
        axis.set_axis_off()
        if r == 0:
            axis.set_title("image", fontsize=7)
        axis.text(-4, 16, label, fontsize=7, ha="right", va="center")
        for c in range(len(stack)):
            m = np.abs(np.asarray(stack[c], np.float64).sum(axis=0))
            axis = figure.add_subplot(len(maps), columns, r * columns + c + 2)
            axis.imshow(m / m.max() if m.max() > 0 else m, cmap="gray", vmin=0, vmax=1)
            axis.set_axis_off()
            if r == 0:
                axis.set_title("original" if c == 0 else titles[c - 1], fontsize=7)
    figure.subplots_adjust(left=0.12, right=0.99, top=0.9, bottom=0.02, wspace=0.05,
                           hspace=0.1)
    figure.savefig(path)
    return path


def deletion_plot(path: Path, d: dict) -> Path:
    from .report import _pyplot_figure

    figure = _pyplot_figure(11, 4.2)
    for i, mode in enumerate(("deletion", "insertion")):
        axis = figure.add_subplot(1, 2, i + 1)
        for label, curves in d["curves"].items():
            style = "--" if label == "Random" else "-"
            width = 2.5 if label.startswith("RectGrad") else 1.3
            area = d["summary"][label][mode]
            axis.plot(d["fractions"], curves[mode], style, lw=width,
                      label=f"{label} ({area['mean']:.3f})")
        axis.set_xlabel("fraction of pixels " + ("removed" if mode == "deletion" else
                                                 "inserted"))
        axis.set_ylabel("probability of the predicted class")
        axis.set_title(f"{mode.capitalize()} (area in the legend; "
                       f"{'lower' if mode == 'deletion' else 'higher'} is better)", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    return path


def plots(out: Path, results: dict, figures: dict) -> list[Path]:
    written = []
    if "sanity" in results:
        written.append(sanity_plot(out / "sanity_randomization.png", results["sanity"]))
        if "sanity" in figures:
            written.append(sanity_maps(out / "sanity_maps.png", *figures["sanity"]))
    if "deletion" in results:
        written.append(deletion_plot(out / "deletion_insertion.png", results["deletion"]))
    return written


# ---------------------------------------------------------------------------------------------
# report.html
def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return text


def markdown_to_html(markdown: str) -> str:
    """The subset summary.md uses: headings, tables, bullets, block quotes, paragraphs."""
    out, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c) <= set("-:") for c in cells):
                    rows.append(cells)
                i += 1
            head, body = rows[0], rows[1:]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head)
                       + "</tr></thead><tbody>" + "".join(
                           "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                           for row in body) + "</tbody></table>")
            continue
        elif line.startswith("* "):
            items = []
            while i < len(lines) and lines[i].startswith("* "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.startswith("> "):
            out.append(f"<blockquote>{_inline(line[2:])}</blockquote>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _key_value_table(title: str, values: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in values.items())
    return f"<h2>{html.escape(title)}</h2><table class='kv'><tbody>{rows}</tbody></table>"


CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images', String(images.length));
  document.body.setAttribute('data-images-loaded', String(loaded.length));
  document.body.setAttribute('data-tables', String(document.querySelectorAll('table').length));
  document.body.setAttribute('data-checked', 'yes');
});
</script>"""


def write_html(path: Path, summary_markdown: str, results: dict, pictures: list[str]) -> Path:
    """``report.html``: summary.md as HTML, every PNG embedded as base64, the settings, the
    network, the timings and the versions; a script marks on ``<body>`` how many images
    loaded (the browser test reads it)."""
    out = path.parent
    figures = []
    for name in pictures:
        file = out / name
        if file.suffix.lower() != ".png" or not file.is_file():
            continue
        data = base64.b64encode(file.read_bytes()).decode("ascii")
        figures.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
                       f"{data}'><figcaption>{html.escape(name)}</figcaption></figure>")
    config = {k: v for k, v in results["config"].items()}
    network = results.get("network") or {}
    timings = {k: f"{v:.1f} s" for k, v in (results.get("timings_s") or {}).items()}
    body = [markdown_to_html(summary_markdown), "<h2>Figures</h2>", *figures,
            _key_value_table("Settings", config),
            _key_value_table("Network", network) if network else "",
            _key_value_table("Timings", timings),
            _key_value_table("Versions", results.get("versions") or {})]
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<title>rectonnx evaluate</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
            "table{border-collapse:collapse;margin:0.5em 0;font-size:0.85em}"
            "td,th{border:1px solid #bbb;padding:2px 6px;text-align:left}"
            "figure{margin:1em 0}img{max-width:100%}blockquote{color:#a40}"
            "</style></head><body>" + "\n".join(body) + CHECK_SCRIPT + "</body></html>")
    path.write_text(page)
    return path
