"""Figures of the toy run: loss heatmaps, learning rates against width, feature norms over training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorainit.theory.toy import ToyConfig, WidthResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def heatmaps(results: list[WidthResult], cfg: ToyConfig, summary: dict, path: Path) -> Path:
    """log10 of the seed-mean train loss over (width, lr), one panel per init; x marks diverged cells."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(cfg.inits), figsize=(6 * len(cfg.inits), 3.8), squeeze=False)
    log_lrs = np.log2(np.array(cfg.lrs))
    for i, init in enumerate(cfg.inits):
        ax = axes[0, i]
        grid = np.array([r.train_loss.numpy()[:, i].mean(0) for r in results])  # (W, L)
        shown = np.log10(np.where(np.isfinite(grid), grid, np.nan))
        im = ax.imshow(shown, aspect="auto", origin="lower", cmap="viridis",
                       extent=(log_lrs[0] - 0.25, log_lrs[-1] + 0.25, -0.5, len(results) - 0.5))
        bad = ~np.isfinite(grid)
        wi, li = np.nonzero(bad)
        ax.scatter(log_lrs[li], wi, marker="x", color="red", s=12, label="diverged (any seed)")
        opt = summary["per_width"][init]["log2_opt_lr"]
        ax.plot(opt, range(len(results)), "w-o", ms=4, label="optimal lr")
        ax.set_yticks(range(len(results)), [str(r.width) for r in results])
        ax.set_xlabel("log2 learning rate")
        ax.set_ylabel("width n")
        ax.set_title(f"Init[{init.upper()}]: log10 train loss (mean over {cfg.seeds} seeds)")
        fig.colorbar(im, ax=ax)
        if bad.any():
            ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def lr_vs_width(summary: dict, cfg: ToyConfig, path: Path) -> Path:
    """Optimal and largest stable lr against width, with n^-1/2 and n^-1 reference lines."""
    plt = _plt()
    widths = np.array(summary["widths"], dtype=float)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = {"a": "tab:blue", "b": "tab:orange"}
    for init in cfg.inits:
        per, sl = summary["per_width"][init], summary["slopes"][init]
        c = colors.get(init)
        ax.plot(widths, 2.0 ** np.array(per["log2_opt_lr"]), "-o", color=c,
                label=f"Init[{init.upper()}] optimal (slope {sl['optimal_lr']['slope']:+.2f})")
        ax.plot(widths, 2.0 ** np.array(per["log2_stable_lr"]), "--s", color=c, alpha=0.7,
                label=f"Init[{init.upper()}] largest stable (slope {sl['largest_stable_lr']['slope']:+.2f})")
    top = max(2.0 ** np.nanmax(summary["per_width"][i]["log2_stable_lr"]) for i in cfg.inits)
    for power, style in ((-0.5, ":"), (-1.0, "-.")):
        ax.plot(widths, top * 2 * (widths / widths[0]) ** power, "k" + style, lw=1,
                label=f"n^{power:g} (reference)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("width n")
    ax.set_ylabel("learning rate")
    ax.set_title("Toy: learning rates against width")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def features(results: list[WidthResult], cfg: ToyConfig, summary: dict, path: Path) -> Path:
    """RMS of Z_A and Z_B over training at the smallest and largest width, at each init's optimum."""
    plt = _plt()
    log_lrs = np.log2(np.array(cfg.lrs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    picks = [(0, results[0]), (len(results) - 1, results[-1])] if len(results) > 1 else [(0, results[0])]
    for q, name in enumerate(("Z_A", "Z_B")):
        ax = axes[q]
        for i, init in enumerate(cfg.inits):
            for j, r in picks:
                k = int(np.argmin(np.abs(log_lrs - summary["per_width"][init]["log2_opt_lr_grid"][j])))
                trace = (r.trace_za if name == "Z_A" else r.trace_zb).numpy()[:, :, i, k]  # (steps, S)
                style = "-" if j == picks[-1][0] else ":"
                ax.plot(np.arange(1, cfg.steps + 1), np.nanmean(trace, axis=1), style,
                        color={"a": "tab:blue", "b": "tab:orange"}.get(init),
                        label=f"Init[{init.upper()}] n={r.width} lr=2^{log_lrs[k]:.1f}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"RMS of {name}")
        ax.set_title(f"{name} over training at each init's optimal lr")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_all(results: list[WidthResult], cfg: ToyConfig, summary: dict, out: Path) -> list[Path]:
    return [heatmaps(results, cfg, summary, out / "loss_heatmaps.png"),
            lr_vs_width(summary, cfg, out / "lr_vs_width.png"),
            features(results, cfg, summary, out / "features.png")]
