"""The report directory: ``summary.md`` (Table-1 layout and the other tables), PNG plots (ROAR/KAR
curves, box plots like the paper's Figures 7-8, the q sweep, per-layer maps, method grids) and
the raw numbers (``results.json``, ``table1.csv``, ``roar_kar.csv``, ``per_image.csv``).
matplotlib draws with its Agg canvas (no display needed).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

# Table 1 of the paper (ROAR AUC, KAR AOC), CIFAR-10, lower is better.
PAPER_TABLE1 = {
    "Random": (0.5562, 0.4438), "RectGrad": (0.5385, 0.3382), "Saliency": (0.5568, 0.4455),
    "Guided BP": (0.5504, 0.4270), "SmoothGrad": (0.5536, 0.4444),
    "Grad * Input": (0.5408, 0.4176), "IntegGrad": (0.5428, 0.4185),
    "DeepLIFT": (0.5519, 0.3928),
}


def write(out: Path, results: dict, figures: dict) -> Path:
    """Write everything under ``out``; returns the path of ``summary.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_plain))
    rows = table1(results)
    _write_csv(out / "table1.csv", rows)
    if "roar_kar" in results:
        _write_csv(out / "roar_kar.csv", results["roar_kar"]["runs"])
    _write_csv(out / "per_image.csv", per_image_rows(results))
    from . import evidence

    pictures = plots(out, results, figures)
    pictures += [Path(p).name for p in evidence.plots(out, results, figures)]
    summary = out / "summary.md"
    text = markdown(results, rows, pictures)
    summary.write_text(text)
    evidence.write_html(out / "report.html", text, results, pictures)
    return summary


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)


def _mean(values) -> float | None:
    return float(np.mean(values)) if values else None


def table1(results: dict) -> list[dict]:
    """One row per method: ROAR AUC, KAR AOC, mean patch share, background share, TV."""
    rows = []
    for spec in results["methods"]:
        label = spec["label"]
        roar = (results.get("roar_kar") or {}).get("summary", {}).get(label, {})
        occlusion = (results.get("occlusion") or {}).get("patch_share", {})
        noise = results.get("noise") or {}
        rows.append({
            "method": label,
            "roar_auc": roar.get("roar_auc"),
            "kar_aoc": roar.get("kar_aoc"),
            "patch_share": _mean(occlusion.get(label)),
            "background_share": _mean((noise.get("background_share") or {}).get(label)),
            "total_variation": _mean((noise.get("total_variation") or {}).get(label)),
        })
    return rows


def per_image_rows(results: dict) -> list[dict]:
    rows = []
    for experiment, key in (("occlusion", "patch_share"), ("noise", "background_share"),
                            ("noise", "total_variation")):
        for label, values in ((results.get(experiment) or {}).get(key) or {}).items():
            rows += [{"metric": key, "method": label, "image": i, "value": v}
                     for i, v in enumerate(values)]
    for label, areas in ((results.get("deletion") or {}).get("areas") or {}).items():
        for mode, values in areas.items():  # deletion / insertion area per image
            rows += [{"metric": f"{mode}_auc", "method": label, "image": i, "value": v}
                     for i, v in enumerate(values)]
    return rows


# ---------------------------------------------------------------------------------------------
# Markdown
def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def ranks(rows: list[dict], key: str) -> dict[str, int]:
    """1 = best (lowest) among the rows that have ``key``."""
    scored = sorted((r[key], r["method"]) for r in rows if r[key] is not None)
    return {method: i + 1 for i, (_, method) in enumerate(scored)}


def markdown(results: dict, rows: list[dict], pictures: list[str]) -> str:
    config = results["config"]
    lines = ["# rectonnx evaluate: the paper's quantitative experiments", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    timings = results.get("timings_s", {})
    reused = (results.get("network") or {}).get("reused")
    trained = (f"reused from {results['network']['source']}, not retrained" if reused
               else f"trained {config['epochs']} epochs with Adam")
    lines += [f"Data: {results['data']}.", "",
              f"Network: the paper's CIFAR CNN (width {config['width']:g}), {trained}; test "
              f"accuracy **{results['accuracy']:.3f}**."
              f" Total time {timings.get('total', float('nan')):.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')}).",
              "", "Methods: " + "; ".join(f"{m['label']} = `{m['method'] or 'random'}` "
                                          f"{_options(m['options'])}" for m in results["methods"])
              + ".", ""]
    network = results.get("network") or {}
    if network:
        lines += [f"Network source: {network.get('source')} ({network.get('why')}).", ""]
    for warning in results.get("warnings") or []:
        lines += [f"> **Warning:** {warning}.", ""]
    lines += ["## Table 1 (lower is better everywhere)", "",
              "| method | ROAR AUC | KAR AOC | patch attribution | background attribution | "
              "total variation |", "|---|---|---|---|---|---|"]
    best = {key: min((r[key] for r in rows if r[key] is not None), default=None)
            for key in ("roar_auc", "kar_aoc", "patch_share", "background_share",
                        "total_variation")}
    for r in rows:
        cells = [_fmt(r[k]) if r[k] is None or r[k] != best[k] else f"**{_fmt(r[k])}**"
                 for k in ("roar_auc", "kar_aoc", "patch_share", "background_share",
                           "total_variation")]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    lines += ["", "Patch attribution: mean share of |attribution| in the inner 8x8 of the "
              "training-occlusion patch (random map: 0.0625). Background attribution: mean share "
              "outside the object mask. Total variation: of the channel-sum map scaled to max 1. "
              "ROAR AUC / KAR AOC: mean height of the accuracy curve over the fractions "
              "(AOC = 1 - that of the KAR curve)."]
    from . import evidence

    if "config" in results and "methods" in results:
        lines += evidence.table1_lines(results)
        lines += evidence.paper_lines(results)
    if "roar_kar" in results:
        lines += roar_kar_section(results, rows)
    if "occlusion" in results:
        o = results["occlusion"]
        lines += ["", "## Training-dataset occlusion", "",
                  f"Accuracy with the patch {o['accuracy_patched']:.3f} (without: "
                  f"{o['accuracy_clean']:.3f}; paper: 73.1 % vs 74.6 %), {o['images']} test "
                  "images; box plots in `occlusion_boxplot.png` (paper Fig. 7)."]
    if "noise" in results:
        n = results["noise"]
        share = n.get("background_pixel_share")
        lines += ["", "## Noise level", "",
                  f"{n['images']} correctly classified test images (balanced over classes)"
                  + (f"; the background is {share:.3f} of the pixels (a random map's share)"
                     if share is not None else "; no object masks, so no background share")
                  + ". Box plots in `noise_boxplots.png` (paper Fig. 8)."]
    if "sensitivity" in results:
        lines += sensitivity_section(results["sensitivity"])
    if "q_sweep" in results:
        q = results["q_sweep"]
        lines += ["", "## Effect of q (RectGrad, padding trick)", "",
                  "| q | " + " | ".join(q["nonzero_share"]) + " |",
                  "|---|" + "---|" * len(q["nonzero_share"]),
                  "| non-zero share | " + " | ".join(_fmt(v, 3) for v in
                                                      q["nonzero_share"].values()) + " |", "",
                  f"Mean over {q['images']} test images; maps in `q_sweep_maps.png`."]
    if "layers" in results:
        layer = results["layers"]
        names = layer["layers"]
        lines += ["", "## Noise accumulation (hidden-layer gradients)", "",
                  "Share of non-zero gradient at each layer, input first (`layers_*.png`, "
                  "paper Fig. 6):", "", "| method | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for label, values in layer["nonzero_share"].items():
            lines.append(f"| {label} | " + " | ".join(_fmt(values.get(n), 3) for n in names)
                         + " |")
    if "sanity" in results:
        lines += evidence.sanity_lines(results["sanity"])
    if "deletion" in results:
        lines += evidence.deletion_lines(results["deletion"])
    if pictures:
        lines += ["", "## Pictures", ""] + [f"* `{p}`" for p in pictures]
    lines += ["", "Raw numbers: `results.json`, `table1.csv`, `roar_kar.csv`, `per_image.csv`; "
              "everything in one page: `report.html`.", ""]
    return "\n".join(lines)


def _options(options: dict) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else ""


def roar_kar_section(results: dict, rows: list[dict]) -> list[str]:
    r = results["roar_kar"]
    how = (f"trained from scratch for {r['retrain_epochs']} epochs" if r["retrain"] == "scratch"
           else f"fine-tuned from the trained network for {r['retrain_epochs']} epochs")
    lines = ["", "## ROAR and KAR", "",
             f"Fractions {', '.join(f'{f:g}' for f in r['fractions'])}; {r['repeats']} network(s)"
             f" per point (training seeds {', '.join(str(k) for k in r.get('seeds', []))}), "
             f"{how}; pixels ranked by the maps of the "
             f"{'predicted class' if r['target'] == 'predicted' else 'true label'}; accuracy on "
             f"unmodified data {r['accuracy_unmodified']:.3f}. "
             "Curves in `roar_kar.png` (paper Fig. 9).", "",
             "| method | ROAR AUC | rank | KAR AOC | rank | paper ROAR AUC | rank | "
             "paper KAR AOC | rank |", "|---|---|---|---|---|---|---|---|---|"]
    ours_roar, ours_kar = ranks(rows, "roar_auc"), ranks(rows, "kar_aoc")
    present = [r_["method"] for r_ in rows if r_["method"] in PAPER_TABLE1]
    paper_rows = [{"method": m, "roar_auc": PAPER_TABLE1[m][0], "kar_aoc": PAPER_TABLE1[m][1]}
                  for m in present]
    paper_roar, paper_kar = ranks(paper_rows, "roar_auc"), ranks(paper_rows, "kar_aoc")
    for row in rows:
        m = row["method"]
        paper = PAPER_TABLE1.get(m, (None, None))
        spread = r["summary"].get(m, {})
        roar = _fmt(row["roar_auc"]) + (f" ± {spread['roar_auc_sd']:.4f}"
                                        if "roar_auc_sd" in spread else "")
        kar = _fmt(row["kar_aoc"]) + (f" ± {spread['kar_aoc_sd']:.4f}"
                                      if "kar_aoc_sd" in spread else "")
        lines.append(f"| {m} | {roar} | {ours_roar.get(m, '-')} | {kar} | "
                     f"{ours_kar.get(m, '-')} | {_fmt(paper[0])} | {paper_roar.get(m, '-')} | "
                     f"{_fmt(paper[1])} | {paper_kar.get(m, '-')} |")
    if r["repeats"] > 1:
        lines += ["", "± is the standard deviation over the networks trained per point (they "
                  "share the pixel ranking and, when fine-tuned, the starting network)."]
    if "RectGrad" in ours_kar:
        lines += ["", f"RectGrad ranks {ours_kar['RectGrad']} of {len(ours_kar)} on KAR here and "
                  f"{ours_roar['RectGrad']} of {len(ours_roar)} on ROAR (paper: first on both)."]
    return lines


def sensitivity_section(s: dict) -> list[str]:
    lines = ["", "## Class sensitivity (FGSM)", "",
             f"epsilon = {s['epsilon']:g}: the predicted class flipped for {s['flipped']} of "
             f"{s['images']} correctly classified test images. Mean map change (0 = same map, "
             "1 = disjoint; `sensitivity_maps.png`):", "",
             "| method | class flipped | class kept |", "|---|---|---|"]
    for label, change in s["map_change"].items():
        lines.append(f"| {label} | {_fmt(change['flipped'], 3)} | "
                     f"{_fmt(change['unflipped'], 3)} |")
    return lines


# ---------------------------------------------------------------------------------------------
# pictures
def plots(out: Path, results: dict, figures: dict) -> list[str]:
    """Write the PNGs; returns their file names."""
    written = []
    if "roar_kar" in results:
        written.append(roar_kar_plot(out / "roar_kar.png", results["roar_kar"]))
    if "occlusion" in results:
        written.append(box_plot(out / "occlusion_boxplot.png",
                                [("Attribution in the patch (inner 8x8), share of |A|",
                                  results["occlusion"]["patch_share"])]))
    noise = results.get("noise")
    if noise:
        panels = [("Attribution outside the object mask, share of |A|",
                   noise["background_share"])] if noise.get("background_share") else []
        panels.append(("Total variation of the map", noise["total_variation"]))
        written.append(box_plot(out / "noise_boxplots.png", panels))
    if "q_sweep" in results:
        written.append(q_plot(out / "q_sweep.png", results["q_sweep"]))
    written += picture_grids(out, figures)
    return [Path(p).name for p in written]


def _pyplot_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def roar_kar_plot(path: Path, r: dict) -> Path:
    figure = _pyplot_figure(11, 4.2)
    for i, (mode, title) in enumerate((("roar", "ROAR: most important pixels replaced"),
                                       ("kar", "KAR: least important pixels replaced"))):
        axis = figure.add_subplot(1, 2, i + 1)
        for label, curves in r["curves"].items():
            style = "--" if label == "Random" else "-"
            width = 2.5 if label.startswith("RectGrad") else 1.3
            bounds = (r.get("intervals") or {}).get(label, {}).get(mode)
            if bounds and all(b[0] is not None for b in bounds):  # 95 % t-interval per point
                error = [[m - b[0] for m, b in zip(curves[mode], bounds)],
                         [b[1] - m for m, b in zip(curves[mode], bounds)]]
                axis.errorbar(r["fractions"], curves[mode], yerr=error, fmt=style,
                              marker="o", lw=width, ms=3, capsize=2, label=label)
                continue
            axis.plot(r["fractions"], curves[mode], style, marker="o", lw=width, ms=3,
                      label=label)
        axis.axhline(r["accuracy_unmodified"], color="grey", lw=0.8, ls=":")
        axis.set_xlabel("fraction of pixels replaced")
        axis.set_ylabel("test accuracy")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    return path


def box_plot(path: Path, panels: list[tuple[str, dict]]) -> Path:
    figure = _pyplot_figure(max(6.0, 1.1 * max(len(p[1]) for p in panels)), 3.4 * len(panels))
    for i, (title, values) in enumerate(panels):
        axis = figure.add_subplot(len(panels), 1, i + 1)
        labels = list(values)
        axis.boxplot([values[k] for k in labels], showfliers=True, flierprops={"ms": 2})
        axis.set_xticks(range(1, len(labels) + 1), labels, rotation=20, fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


def q_plot(path: Path, q: dict) -> Path:
    figure = _pyplot_figure(5.5, 3.5)
    axis = figure.add_subplot(1, 1, 1)
    axis.plot([float(k) for k in q["nonzero_share"]], list(q["nonzero_share"].values()),
              marker="o")
    axis.set_xlabel("q (percentile threshold at every layer)")
    axis.set_ylabel("share of non-zero attribution")
    axis.set_title("RectGrad: sparsity against q", fontsize=10)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


def picture_grids(out: Path, figures: dict) -> list[Path]:
    from ..datasets import to_uint8
    from ..visualize import layer_maps_grid, method_grid_many

    def grid_rows(images, maps, labels=None):
        """One grid row per image: the image, each method's map of it, its row label."""
        return [(to_uint8(images[i:i + 1])[0], {k: v[i] for k, v in maps.items()},
                 None if labels is None else labels[i]) for i in range(len(images))]

    written = []
    if "methods" in figures:
        images, maps, labels = figures["methods"]
        rows = grid_rows(images, maps, [f"label {label}" for label in labels])
        written.append(method_grid_many(rows, out / "methods_grid.png",
                                        "Attribution maps of the compared methods (true class)"))
    if "occlusion" in figures:
        rows = grid_rows(*figures["occlusion"])
        written.append(method_grid_many(rows, out / "occlusion_maps.png",
                                        "Network trained with a random patch at the top left "
                                        "(rows/columns 0-9; look at the inner 8x8)"))
    if "sensitivity" in figures:
        images, adversarial, classes, maps = figures["sensitivity"]
        rows = []
        for i in range(len(images)):
            rows.append((to_uint8(images[i:i + 1])[0], {k: v[0][i] for k, v in maps.items()},
                         f"image: {classes[i][0]}"))
            rows.append((to_uint8(adversarial[i:i + 1])[0],
                         {k: v[1][i] for k, v in maps.items()}, f"FGSM: {classes[i][1]}"))
        if rows:
            written.append(method_grid_many(rows, out / "sensitivity_maps.png",
                                            "Maps before and after FGSM (each explains the "
                                            "predicted class)"))
    if "q_sweep" in figures:
        rows = grid_rows(*figures["q_sweep"])
        written.append(method_grid_many(rows, out / "q_sweep_maps.png",
                                        "RectGrad (padding trick) for each q"))
    if "layers" in figures:
        images, rows = figures["layers"]
        for i in range(len(images)):
            per_method = {}
            for label, maps in rows.items():
                per_method[label] = {name: np.asarray(value[i], np.float64).mean(axis=0)
                                     for name, value in maps.items()}
            written.append(layer_maps_grid(per_method, out / f"layers_{i}.png",
                                           "Channel-mean gradient at the input and each hidden "
                                           "ReLU output (left: input, right: output side)"))
    return written
