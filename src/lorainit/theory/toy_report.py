"""The toy's results as data, fitted scaling laws, and figures.

Definitions (stated once, used everywhere):

- A configuration is **diverged** when its loss turns non-finite or exceeds `divergence_factor` x
  its initial loss; it is **stable** when it never diverged and the RMS of its LoRA features Z_B
  never exceeded `stable_factor` x the RMS of the teacher's own perturbation Delta W* z (the
  feature size there is to learn). This is the theory's output stability (Z_B = O(1)), measured.
- At each (init, width), the loss of a learning rate is the mean over seeds of the train loss
  (itself the mean over the last 10% of steps); the **optimal lr** is its argmin over the grid,
  refined by a parabola through log-loss at the argmin and its two neighbours (never moved by more
  than one grid step). The **largest stable lr** is the last grid lr before the first one at which
  most seeds are not stable.
- Slopes are least-squares fits of log2(quantity) on log2(width), with 95% intervals from a
  bootstrap over seeds (the seeds are resampled, everything above is recomputed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lorainit.display import ProgressDisplay
from lorainit.files import csv_text, write_text_atomic
from lorainit.theory import calculus, toy, toy_edge
from lorainit.theory.toy import ToyConfig, WidthResult

RESULT_COLUMNS = ("init", "width", "lr", "seed", "train_loss", "test_loss", "diverged", "diverged_step",
                  "stable", "z_a_rms", "z_b_rms", "z_b_peak")


def _stable(r: WidthResult, cfg: ToyConfig) -> np.ndarray:
    """(S, I, L) bool: never diverged and peak RMS(Z_B) <= stable_factor x the teacher's."""
    return toy_edge.stable_at(r, cfg, cfg.steps)


def result_rows(results: list[WidthResult], cfg: ToyConfig) -> list[dict]:
    """One row per (init, width, lr, seed), the columns of toy_results.csv."""
    rows = []
    for r in results:
        stable = _stable(r, cfg)
        for i, init in enumerate(cfg.inits):
            for l, lr in enumerate(cfg.lrs):
                for s in range(cfg.seeds):
                    rows.append({
                        "init": init, "width": r.width, "lr": lr, "seed": s,
                        "train_loss": float(r.train_loss[s, i, l]), "test_loss": float(r.test_loss[s, i, l]),
                        "diverged": bool(r.diverged_step[s, i, l] >= 0),
                        "diverged_step": int(r.diverged_step[s, i, l]),
                        "stable": bool(stable[s, i, l]),
                        "z_a_rms": float(r.z_a_rms[s, i, l]), "z_b_rms": float(r.z_b_rms[s, i, l]),
                        "z_b_peak": float(r.z_b_peak[s, i, l]),
                    })
    return rows


def _optimum(mean_loss: np.ndarray, log_lrs: np.ndarray) -> tuple[int, float]:
    """(grid index, refined log2 lr) of the smallest finite mean loss; (-1, nan) if none."""
    finite = np.isfinite(mean_loss)
    if not finite.any():
        return -1, math.nan
    k = int(np.argmin(np.where(finite, mean_loss, np.inf)))
    if 0 < k < len(log_lrs) - 1 and finite[k - 1] and finite[k + 1]:
        y0, y1, y2 = np.log(mean_loss[k - 1:k + 2])
        curvature = y0 - 2 * y1 + y2
        if curvature > 0:  # vertex of the parabola through the three points, in grid steps
            shift = float(np.clip(0.5 * (y0 - y2) / curvature, -1.0, 1.0))
            return k, log_lrs[k] + shift * (log_lrs[k + 1] - log_lrs[k])
    return k, float(log_lrs[k])


def _largest_stable(stable_frac: np.ndarray) -> int:
    """Index of the last lr before the first where most seeds are unstable; -1 if the first is."""
    unstable = np.nonzero(stable_frac <= 0.5)[0]
    return (int(unstable[0]) - 1) if len(unstable) else len(stable_frac) - 1


def _per_width(results: list[WidthResult], cfg: ToyConfig, seeds: np.ndarray) -> dict:
    """Per init: arrays over widths of log2 optimal lr, log2 largest stable lr, Z_A at the optimum."""
    log_lrs = np.log2(np.array(cfg.lrs))
    out = {init: {"log2_opt_lr": [], "log2_opt_lr_grid": [], "log2_stable_lr": [], "z_a_at_opt": [],
                  "loss_at_opt": []} for init in cfg.inits}
    for r in results:
        loss = r.train_loss.numpy()[seeds]  # (s, I, L)
        stable = _stable(r, cfg)[seeds]
        za = r.z_a_rms.numpy()[seeds]
        for i, init in enumerate(cfg.inits):
            mean = loss[:, i].mean(0)
            k, refined = _optimum(mean, log_lrs)
            ks = _largest_stable(stable[:, i].mean(0))
            o = out[init]
            o["log2_opt_lr"].append(refined)
            o["log2_opt_lr_grid"].append(log_lrs[k] if k >= 0 else math.nan)
            o["log2_stable_lr"].append(log_lrs[ks] if ks >= 0 else math.nan)
            o["z_a_at_opt"].append(float(np.exp(np.log(za[:, i, k]).mean())) if k >= 0 else math.nan)
            o["loss_at_opt"].append(float(mean[k]) if k >= 0 else math.nan)
    return out


def _slope(log2_widths: np.ndarray, log2_values: np.ndarray) -> float:
    ok = np.isfinite(log2_values)
    if ok.sum() < 2:
        return math.nan
    return float(np.polyfit(log2_widths[ok], log2_values[ok], 1)[0])


SLOPE_KEYS = {"optimal_lr": "log2_opt_lr", "largest_stable_lr": "log2_stable_lr", "z_a_at_optimum": "z_a_at_opt"}


def summarize(results: list[WidthResult], cfg: ToyConfig, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Per-width optima and the fitted slopes with bootstrap intervals, plus the theory's predictions."""
    lw = np.log2(np.array([r.width for r in results], dtype=float))
    all_seeds = np.arange(cfg.seeds)
    point = _per_width(results, cfg, all_seeds)

    def slopes_of(per):
        return {init: {key: _slope(lw, np.log2(np.array(per[init][field])) if field == "z_a_at_opt"
                                   else np.array(per[init][field]))
                       for key, field in SLOPE_KEYS.items()} for init in cfg.inits}

    fitted = slopes_of(point)
    draws = np.random.default_rng(seed)
    boot = {init: {key: [] for key in SLOPE_KEYS} for init in cfg.inits}
    for _ in range(bootstrap if cfg.seeds > 1 else 0):
        sample = draws.integers(0, cfg.seeds, cfg.seeds)
        b = slopes_of(_per_width(results, cfg, sample))
        for init in cfg.inits:
            for key in SLOPE_KEYS:
                boot[init][key].append(b[init][key])
    slopes = {}
    for init in cfg.inits:
        c_star = float(calculus.max_stable_c(init))
        predicted = {"largest_stable_lr": -c_star, "z_a_at_optimum": calculus.exponents(init, c_star)["Z_A"]}
        slopes[init] = {}
        for key in SLOPE_KEYS:
            values = np.array(boot[init][key], dtype=float)
            values = values[np.isfinite(values)]
            ci = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else None
            slopes[init][key] = {"slope": fitted[init][key], "ci95": ci, "predicted": predicted.get(key)}
    return {"widths": [r.width for r in results], "per_width": point, "slopes": slopes,
            "bootstrap": bootstrap, "seeds": cfg.seeds}


def run(cfg: ToyConfig, out: Path, edge_rounds: int = 2, show_progress: bool = True) -> tuple[dict, list[Path]]:
    """Train the grid at every width, bisect the stability edges (`edge_rounds`, 0: none), fit,
    and write every output to `out`. One progress display, in steps x width (the cost of a step
    grows with the width, so the time left follows the real cost); off with `show_progress=False`.
    Returns (summary, figure paths)."""
    horizons = toy_edge.horizons_for(cfg)
    # a bisection round trains one lr per horizon where the grid trains every lr: its share of the work
    round_share = len(horizons) / len(cfg.lrs)
    total = (1 + edge_rounds * round_share) * cfg.steps * sum(cfg.widths)
    first = f"width {cfg.widths[0]} (1/{len(cfg.widths)}): {cfg.steps} steps"
    with ProgressDisplay("toy", total, "step*n", status=first, enabled=show_progress, unit_scale=True) as bar:
        results = []
        for j, width in enumerate(cfg.widths, 1):
            bar.update(0, f"width {width} ({j}/{len(cfg.widths)}): {cfg.steps} steps")
            results.append(toy.train_width(width, cfg, progress=lambda k, w=width: bar.update(k * w)))
            bar.mark(f"width {width} ({j}/{len(cfg.widths)}) trained")
        summary = summarize(results, cfg)
        if edge_rounds:
            bar.update(0, f"stability edge: {edge_rounds} bisection rounds of {cfg.steps} steps per width")
            edges = toy_edge.bisect(results, cfg, horizons, rounds=edge_rounds,
                                    progress=lambda k: bar.update(k * round_share))
            summary["edge"], summary["edge_rounds"] = toy_edge.slopes(edges, cfg), edge_rounds
            # a width whose edges are all censored trains no bisection: the display ends at its total
            bar.mark("stability edge bisected", total - bar.n)
    return summary, write_outputs(results, cfg, summary, out)


def write_outputs(results: list[WidthResult], cfg: ToyConfig, summary: dict, out: Path) -> list[Path]:
    """toy_results.csv, optimal_lr.csv, slopes.json and the figures; returns the figure paths."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "toy_results.csv", csv_text(result_rows(results, cfg), RESULT_COLUMNS))
    opt_rows = []
    for init in cfg.inits:
        per = summary["per_width"][init]
        for j, width in enumerate(summary["widths"]):
            opt_rows.append({"init": init, "width": width,
                             "optimal_lr": 2 ** per["log2_opt_lr"][j],
                             "optimal_lr_grid": 2 ** per["log2_opt_lr_grid"][j],
                             "largest_stable_lr": 2 ** per["log2_stable_lr"][j],
                             "train_loss_at_optimum": per["loss_at_opt"][j],
                             "z_a_rms_at_optimum": per["z_a_at_opt"][j]})
    write_text_atomic(out / "optimal_lr.csv", csv_text(opt_rows, opt_rows[0].keys()))
    write_text_atomic(out / "slopes.json", json.dumps({
        "slopes": summary["slopes"], "widths": summary["widths"], "seeds": summary["seeds"],
        "bootstrap": summary["bootstrap"],
        **({"edge": summary["edge"], "edge_rounds": summary["edge_rounds"]} if "edge" in summary else {}),
        "definitions": __doc__.split("Definitions (stated once, used everywhere):")[1].strip(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
    }, indent=2) + "\n")
    from lorainit.theory.toy_figures import draw_all

    return draw_all(results, cfg, summary, out)


def format_summary(summary: dict, inits: tuple[str, ...]) -> str:
    """The fitted slopes next to the theory's predictions, as a printed table."""
    lines = [f"{'init':<6}{'quantity':<20}{'slope':>8}  {'95% interval':<18}{'theory':>8}"]
    for init in inits:
        for key, s in summary["slopes"][init].items():
            ci = f"[{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}]" if s["ci95"] else "-"
            pred = f"{s['predicted']:+.2f}" if s["predicted"] is not None else "-"
            lines.append(f"Init[{init.upper()}] {key:<20}{s['slope']:>+8.2f}  {ci:<18}{pred:>8}")
    a, b = (summary["per_width"].get(k) for k in ("a", "b"))
    if a and b:
        above = [f"{w}: {'yes' if oa > ob else 'NO'}" for w, oa, ob
                 in zip(summary["widths"], a["log2_opt_lr"], b["log2_opt_lr"])]
        lines.append("Init[A]'s optimal lr above Init[B]'s, by width: " + ", ".join(above))
    return "\n".join(lines)
