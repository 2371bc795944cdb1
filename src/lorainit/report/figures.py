"""The report's figures, each written as PNG and SVG: the metric against lr per init family (the
paper's main figure), a heatmap of (family, lr) -> metric, the LoRA features' norms, and training
curves.

Each family keeps one colour and marker in every figure of a group: Init[A] and Init[B] the
paper's blue and orange, the other inits their own, and a family with arguments (or an init not
listed) one of the spare colours. Red is left to the crosses of diverged and failed runs.

Diverged and failed runs are drawn, never dropped: a red x at the edge of the axis where the
metric has no value, and a labelled cell in the heatmap.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lorainit.report import families
from lorainit.report.findings import FAILED_TO_LEARN, Finding
from lorainit.report.sweep import Group, finite
from lorainit.sweeps import outcome
from lorainit.theory.toy_figures import _plt

COLORS = {"a": "tab:blue", "b": "tab:orange", "ab": "tab:green", "gaussian": "tab:purple",
          "orthogonal": "tab:brown", "pissa": "tab:pink", "olora": "tab:cyan"}
SPARE_COLORS = ("tab:olive", "tab:gray", "navy", "darkgoldenrod", "teal", "black", "yellowgreen", "sienna")
MARKERS = ("s", "^", "D", "v", "P", "X", "*", "h", "p", "<", ">")  # the paper's two inits keep "o"
MANY = 3  # more families than this: legends go beside the panels, curves wrap into rows
PROBES = (("z_a_rms", "RMS of Z_A = A x"),
          ("lora_out_rms", "RMS of the LoRA output's change s (B A - B0 A0) x"))


def _probe(run, probe: str) -> str:
    """The probe a run is plotted by: a run whose family rewrote the base (PiSSA, OLoRA) starts its
    LoRA output at the part of W it took out, so its output panel shows the net change it recorded
    (`net_out_rms`); for every other run B0 A0 = 0 and the two are one."""
    return "net_out_rms" if probe == "lora_out_rms" and "net_out_rms" in run.probes else probe


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        path = out / f"{stem}.{ext}"
        fig.savefig(path, dpi=110)
        paths.append(path)
    _plt().close(fig)
    return paths


def styles(group: Group) -> dict[str, tuple[str, str]]:
    """family -> (colour, marker) for every family of the group, the same in each of its figures."""
    out, spare = {}, iter(SPARE_COLORS * 4)
    others = 0
    for family in sorted({r.family for r in group.runs}, key=families.order):
        color = COLORS.get(family) or next(spare)
        if family in ("a", "b"):
            marker = "o"
        else:
            marker, others = MARKERS[others % len(MARKERS)], others + 1
        out[family] = (color, marker)
    return out


def _legend(ax, many: bool, fontsize: int = 7) -> None:
    """Inside the panel for a few lines; beside it, out of the data's way, for many; none for none."""
    if not ax.get_legend_handles_labels()[0]:
        return
    if many:
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=fontsize)


def metric_vs_lr(findings: list[Finding], out: Path, stem: str) -> list[Path]:
    """One panel per metric: each seed's final value (dots), the seeds' mean (line), per family."""
    plt = _plt()
    style = styles(findings[0].group)
    many = len(style) > MANY
    fig, axes = plt.subplots(1, len(findings), figsize=((5.2 + 2.4 * many) * len(findings), 3.9 + 0.8 * many),
                             squeeze=False)
    for ax, f in zip(axes[0], findings):
        failed_x, unlearned = [], False
        for init, cells in f.cells.items():
            (color, marker), name = style[init], families.name(init)
            lrs = [c.lr for c in cells if c.complete]
            ax.plot(lrs, [c.mean for c in cells if c.complete], "-", marker=marker, color=color, ms=4,
                    label=name if many else f"{name}, mean over seeds")
            for c in cells:
                vals = c.values
                ax.scatter([c.lr] * len(vals), vals, color=color, s=12, alpha=0.5)
                flat = [r.final[f.metric.name] for r in c.runs if r.status in outcome.NOT_LEARNED
                        and finite(r.final.get(f.metric.name))]
                if flat:  # trained to the end without learning: shown, hollow, never on the line
                    ax.scatter([c.lr] * len(flat), flat, facecolors="none", edgecolors=color, s=28, lw=1,
                               label=None if unlearned else "did not learn or collapsed (a seed)")
                    unlearned = True
                if c.diverged or c.failed:
                    failed_x.append(c.lr)
            best = f.inits[init].best_lr
            if best is not None:
                ax.axvline(best, color=color, ls=":", lw=1)
        if failed_x:
            edge = ax.get_ylim()[0 if f.metric.higher_is_better else 1]
            ax.scatter(failed_x, [edge] * len(failed_x), marker="x", color="red", s=40, zorder=5,
                       label="diverged or failed (any seed)", clip_on=False)
        if any(len(line.get_xdata()) for line in ax.lines) or failed_x:
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, f"no run recorded {f.metric.name}", ha="center", transform=ax.transAxes)
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel(f"final {f.metric.label}")
        ax.set_title(f.group.title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            _legend(ax, many)
    fig.suptitle("Final metric against learning rate; line: lrs where every seed learned"
                 + (" (mean over seeds)" if many else "") + "; dotted: each init's best lr", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, stem)


def heatmap(finding: Finding, out: Path, stem: str) -> list[Path]:
    """(family, lr) -> mean final metric where every seed learned; cells where a seed did not learn,
    collapsed, diverged or failed say so (with the mean of the seeds that trained to the end), and
    an lr outside a family's own lr list is left white."""
    plt = _plt()
    f = finding
    lrs = sorted({c.lr for cells in f.cells.values() for c in cells})
    inits = list(f.cells)
    grid = np.full((len(inits), len(lrs)), np.nan)
    labels = [["" for _ in lrs] for _ in inits]
    for i, init in enumerate(inits):
        for c in f.cells[init]:
            j = lrs.index(c.lr)
            if c.complete:
                grid[i, j] = c.mean
                labels[i][j] = f"{c.mean:.3g}"
            elif c.label():
                values = c.trained_values
                counted = [f"{said}:\n{c.count(status)}/{len(c.runs)}" for status, said in FAILED_TO_LEARN.items()
                           if c.count(status)]
                labels[i][j] = "\n".join(counted) + (f"\n({sum(values) / len(values):.3g})" if values else "")
            else:
                labels[i][j] = "running" if c.unfinished else "-"
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(lrs) + 2), 0.8 * len(inits) + 1.8))
    cmap = "viridis" if f.metric.higher_is_better else "viridis_r"  # bright = better either way
    shown = np.ma.masked_invalid(grid)
    im = ax.imshow(shown, aspect="auto", cmap=cmap)
    ax.set_facecolor("#f2d0d0")  # cells without a value
    for i, init in enumerate(inits):
        own = {c.lr for c in f.cells[init]}
        for j, lr in enumerate(lrs):
            if lr not in own:  # not in this family's grid: no run, not a failure
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color="white"))
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7,
                    color="black" if not np.isfinite(grid[i, j]) else "white")
    ax.set_xticks(range(len(lrs)), [f"{lr:.2g}" for lr in lrs], rotation=45, fontsize=8)
    ax.set_yticks(range(len(inits)), [families.name(i) for i in inits])
    ax.set_xlabel("learning rate")
    ax.set_title(f"{f.group.title}: mean final {f.metric.label}", fontsize=10)
    fig.colorbar(im, ax=ax, label=f.metric.label)
    fig.tight_layout()
    return _save(fig, out, stem)


def dynamics(group: Group, best: dict[str, float | None], out: Path, stem: str) -> list[Path] | None:
    """Probes, mean over LoRA layers: at the end of training against lr (top two panels), and over
    training for the best-lr run of each family (bottom two); `best` is keyed by family. None when
    the store has no probes."""
    runs = [r for r in group.runs if r.probes]
    if not runs:
        return None
    plt = _plt()
    style = styles(group)
    many = len(style) > MANY
    fig, grid = plt.subplots(2, 2, figsize=(11 + 4 * many, 7.5))
    axes = [grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]]
    for p, (probe, title) in enumerate(PROBES):
        ax = axes[p]
        for init in sorted({r.family for r in runs}, key=families.order):
            mine = [r for r in runs if r.family == init and r.probe_at_end(_probe(r, probe)) is not None]
            by_lr: dict[float, list[float]] = {}
            for r in mine:
                by_lr.setdefault(r.lr, []).append(r.probe_at_end(_probe(r, probe)))
            lrs = sorted(lr for lr in by_lr if np.mean(by_lr[lr]) > 0)
            color, marker = style[init]
            ax.plot(lrs, [float(np.mean(by_lr[lr])) for lr in lrs], "-", marker=marker, ms=4, color=color,
                    label=families.name(init))
            for r in mine:
                if r.status != "done":
                    ax.scatter([r.lr], [r.probe_at_end(_probe(r, probe))], marker="x", color="red", s=30)
        ax.set_xscale("log")
        if any(len(line.get_xdata()) for line in ax.lines):
            ax.set_yscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel(f"{probe} at the end (log scale)")
        ax.set_title(title + ", end of training", fontsize=9)
        ax.grid(alpha=0.3)
        _legend(ax, many)
        ax = axes[2 + p]
        for init, lr in best.items():
            for r in [r for r in runs if r.family == init and r.lr == lr][:1]:
                steps = sorted(r.probes.get(_probe(r, probe), {}))
                color, marker = style[init]
                ax.plot(steps, [r.probes[_probe(r, probe)][s] for s in steps], "-", marker=marker, ms=3, color=color,
                        label=f"{families.name(init)}, lr {lr:.2g} (seed {r.seed})")
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_xlabel("step")
        ax.set_ylabel(probe)
        ax.set_title(title + ", best run of each init", fontsize=9)
        ax.grid(alpha=0.3)
        _legend(ax, many)
    fig.suptitle(f"{group.title}: LoRA features, mean over layers", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, stem)


def curves(group: Group, metric_names: list[str], out: Path, stem: str) -> list[Path] | None:
    """Training loss (and each evaluation metric over steps, when evaluated more than once), one
    column of panels per family, one line per run coloured by lr; more than four families wrap into
    further rows. None when no run has recorded a curve."""
    if not any(r.series.get("train_loss") for r in group.runs):
        return None
    plt = _plt()
    import matplotlib.colors as mcolors

    inits = sorted({r.family for r in group.runs}, key=families.order)
    evaluated = [m for m in metric_names if any(len(r.series.get(m, [])) > 1 for r in group.runs)]
    rows = 1 + len(evaluated)                           # panels per family, one above the other
    columns = min(len(inits), 4)                        # families side by side
    blocks = math.ceil(len(inits) / columns)            # rows of families
    width, height = (5.5, 3.3) if len(inits) <= 2 else (4.4, 2.9)
    fig, axes = plt.subplots(rows * blocks, columns, figsize=(width * columns + 1, height * rows * blocks),
                             squeeze=False, layout="constrained")
    lrs = [r.lr for r in group.runs]
    norm = mcolors.LogNorm(min(lrs), max(lrs) if max(lrs) > min(lrs) else min(lrs) * 10)
    cmap = plt.get_cmap("plasma")
    used = []
    for k, init in enumerate(inits):
        block, j = divmod(k, columns)
        for i, name in enumerate(["train_loss", *evaluated]):
            ax = axes[block * rows + i, j]
            used.append(ax)
            positive = True
            for r in (r for r in group.runs if r.family == init):
                pts = [(s, v) for s, v in r.series.get(name, []) if finite(v)]
                if not pts:
                    continue
                positive &= all(v > 0 for _, v in pts)
                style = "-" if r.status == "done" else "--"
                steps, values = np.array(pts).T
                if name == "train_loss" and len(values) >= 20:  # a running mean: per-batch losses are noisy
                    window = max(2, len(values) // 20)
                    values = np.convolve(values, np.ones(window) / window, mode="valid")
                    steps = steps[window - 1:]
                ax.plot(steps, values, style, color=cmap(norm(r.lr)), lw=1, alpha=0.85)
                if r.status in ("diverged", "failed"):
                    ax.scatter([pts[-1][0]], [pts[-1][1]], marker="x", color="red", s=25, zorder=5)
            ax.set_xlabel("step")
            smoothed = " (running mean)" if name == "train_loss" else ""
            ax.set_ylabel(name.replace("_", " ") + (" ↓" if name in ("train_loss", "eval_loss", "perplexity") else "")
                          + smoothed)
            if name == "train_loss" and positive and ax.lines:
                ax.set_yscale("log")
            ax.set_title(f"{families.name(init)}: {name}", fontsize=9)
            ax.grid(alpha=0.3)
    for ax in axes.ravel():
        if ax not in used:  # the last row of families, when it is not full
            ax.remove()
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=used, label="learning rate")
    fig.suptitle(f"{group.title}: per run, dashed = did not learn, collapsed, diverged or failed "
                 "(x: where a diverged or failed run stopped)", fontsize=10)
    return _save(fig, out, stem)
