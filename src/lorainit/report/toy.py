"""A `lorainit toy` folder through the same report: its fitted scaling laws as findings, each
slope against the theory's prediction, and its figures on one self-contained page."""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

from lorainit.errors import BadInput
from lorainit.files import write_text_atomic

FIGURES = (("loss_heatmaps.png", "train loss over (width, lr), per init; x: diverged"),
           ("lr_vs_width.png", "optimal and largest stable lr against width, with the n^-1/2 and n^-1 lines"),
           ("features.png", "Z_A and Z_B over training"))
NAMES = {"optimal_lr": "optimal lr", "largest_stable_lr": "largest stable lr", "z_a_at_optimum": "Z_A at the optimum"}


def is_toy(folder: str | Path) -> bool:
    return (Path(folder) / "slopes.json").is_file() and (Path(folder) / "optimal_lr.csv").is_file()


def findings(folder: Path) -> list[str]:
    try:
        slopes = json.loads((folder / "slopes.json").read_text())
        with open(folder / "optimal_lr.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as err:
        raise BadInput(f"{folder}: unreadable toy results ({err})") from None
    lines = [f"widths {', '.join(map(str, slopes['widths']))}; {slopes['seeds']} seeds; slopes of log2(quantity) "
             f"on log2(width), 95% intervals from {slopes['bootstrap']} bootstrap resamples of the seeds"]
    for init, per in slopes["slopes"].items():
        for key, s in per.items():
            ci = s.get("ci95")
            text = f"Init[{init.upper()}] {NAMES.get(key, key)}: slope {s['slope']:+.2f}"
            text += f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (one seed: no interval)"
            if s.get("predicted") is not None and math.isfinite(s["slope"]):
                text += _against_theory(s)
            lines.append(text)
    if "edge" in slopes:
        lines.append(f"stability edge bisected per (init, width, seed) to 1/{2 ** (slopes['edge_rounds'] + 1)} "
                     "octave; its slope against width at each training horizon:")
        for init, by in slopes["edge"].items():
            for horizon, s in by.items():
                ci = s.get("ci95")
                lines.append(f"Init[{init.upper()}] edge after {horizon} steps: slope {s['slope']:+.2f}"
                             + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "") + _against_theory(s)
                             + (f" ({s['censored']} of {s['of']} edges outside the grid, left out)" if s["censored"] else ""))
    by_width: dict[str, dict[str, float]] = {}
    for row in rows:
        by_width.setdefault(row["width"], {})[row["init"]] = float(row["optimal_lr"])
    above = [f"{w}: {'yes' if v['a'] > v['b'] else 'no'}" for w, v in by_width.items() if {"a", "b"} <= set(v)]
    if above:
        lines.append("Init[A]'s optimal lr above Init[B]'s, by width: " + ", ".join(above))
    return lines


def _against_theory(s: dict) -> str:
    """'; theory -0.50: consistent with the theory' when the interval holds the prediction."""
    ci, p = s.get("ci95"), s["predicted"]
    if not ci:
        return f"; theory {p:+.2f}"
    return f"; theory {p:+.2f}: {'consistent with' if ci[0] <= p <= ci[1] else 'differs from'} the theory"


def build(folder: str | Path) -> tuple[Path, list[str]]:
    """Write FOLDER/report/index.html and summary.md for a toy folder; (page, findings)."""
    from lorainit.report.page import STYLE, image

    folder = Path(folder)
    lines = findings(folder)
    out = folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, caption in FIGURES:
        path = folder / name
        if path.is_file():
            figures.append(f"<figure>{image(path)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>lorainit toy report</title>'
            f"<style>{STYLE}</style></head><body><h1>lorainit toy report: {html.escape(folder.name)}</h1>"
            f"<h2>Findings</h2><ul>{items}</ul><h2>Figures</h2>{''.join(figures)}</body></html>\n")
    write_text_atomic(out / "index.html", page)
    write_text_atomic(out / "summary.md", "# lorainit toy report\n\n" + "\n".join(f"- {x}" for x in lines) + "\n")
    return out / "index.html", lines
