"""The toy's stability edge, bisected past the grid, at several training horizons.

The grid's largest stable lr is quantised to half an octave, which moves a fitted slope by about
+-0.1. Here each (init, width, seed) gets its own edge: from the grid, the last stable lr before
its first unstable one brackets it within half an octave; each bisection round then trains the
geometric midpoints of every bracket at once (one `train_width` call per width, every (seed,
init, horizon) its own lr) and keeps the half where stability changes. Two rounds give 1/8 octave.

Stable at horizon t: not diverged by step t, and the RMS of Z_B never above `stable_factor` x the
teacher's up to step t (the grid's definition, cut at t). The theory's claim is at fixed t as the
width grows, so the edge's slope against width is fitted at each horizon: it should tend to the
theory's -c* (Init[A] -1/2, Init[B] -1) whatever t, if the claim holds.

A bracket that does not exist (the grid's first lr already unstable, or its last still stable) is
censored: that (init, width, seed) is left out of the fit and counted.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lorainit.theory import calculus
from lorainit.theory.toy import ToyConfig, WidthResult, make_problem, train_width


def horizons_for(cfg: ToyConfig) -> tuple[int, ...]:
    """10, 100 and every step, those within the run."""
    return tuple(sorted({h for h in (10, 100, cfg.steps) if h <= cfg.steps}))


def stable_at(r: WidthResult, cfg: ToyConfig, horizon: int) -> np.ndarray:
    """(S, I, L) bool: stable over the first `horizon` steps."""
    div = r.diverged_step.numpy()
    alive = (div < 0) | (div > horizon)
    peak = np.nan_to_num(r.trace_zb[:horizon].numpy(), nan=-1.0).max(0)
    limit = cfg.stable_factor * r.teacher_zb_rms.numpy()[:, None, None]
    return alive & (peak <= limit)


def bisect(results: list[WidthResult], cfg: ToyConfig, horizons: tuple[int, ...], rounds: int = 2,
           progress=None) -> dict:
    """Per width: log2 edge (S, I, H), nan where censored. Returns {"widths", "horizons", "log2_edge"}.
    `progress(k)` is called with steps x width trained."""
    log_lrs = np.log2(np.array(cfg.lrs))
    H = len(horizons)
    edges = []
    for r in results:
        lo = np.full((cfg.seeds, len(cfg.inits), H), np.nan)
        hi = np.full_like(lo, np.nan)
        for h, t in enumerate(horizons):
            st = stable_at(r, cfg, t)                        # (S, I, L)
            for s in range(cfg.seeds):
                for i in range(len(cfg.inits)):
                    bad = np.nonzero(~st[s, i])[0]
                    if len(bad) and bad[0] > 0:              # a bracket inside the grid
                        lo[s, i, h], hi[s, i, h] = log_lrs[bad[0] - 1], log_lrs[bad[0]]
        known = np.isfinite(lo)
        if known.any() and rounds > 0:
            problems = [make_problem(r.width, s, cfg) for s in range(cfg.seeds)]
            for _ in range(rounds):
                mid = np.where(known, (lo + hi) / 2, log_lrs[0])  # censored slots train a harmless lr
                trained = train_width(r.width, cfg, problems=problems, lrs=torch.tensor(2.0 ** mid),
                                      progress=None if progress is None else (lambda k, w=r.width: progress(k * w)))
                ok = np.stack([stable_at(trained, cfg, t)[:, :, h] for h, t in enumerate(horizons)], axis=-1)
                lo = np.where(known & ok, mid, lo)
                hi = np.where(known & ~ok, mid, hi)
        edges.append(np.where(known, lo, np.nan))
    return {"widths": [r.width for r in results], "horizons": list(horizons), "log2_edge": edges}


def _fit(log2_widths: np.ndarray, log2_edge: np.ndarray) -> float:
    """Slope of the seed-mean log2 edge on log2 width; log2_edge (W, S)."""
    with np.errstate(invalid="ignore"):
        means = np.array([np.nanmean(e) if np.isfinite(e).any() else np.nan for e in log2_edge])
    ok = np.isfinite(means)
    if ok.sum() < 2:
        return math.nan
    return float(np.polyfit(log2_widths[ok], means[ok], 1)[0])


def slopes(edges: dict, cfg: ToyConfig, bootstrap: int = 1000, seed: int = 0) -> dict:
    """{init: {horizon: {slope, ci95, predicted, censored}}}, the interval from a bootstrap over seeds."""
    lw = np.log2(np.array(edges["widths"], dtype=float))
    stack = np.stack(edges["log2_edge"])                      # (W, S, I, H)
    draws = np.random.default_rng(seed)
    out = {}
    for i, init in enumerate(cfg.inits):
        predicted = -float(calculus.max_stable_c(init))
        out[init] = {}
        for h, t in enumerate(edges["horizons"]):
            e = stack[:, :, i, h]                             # (W, S)
            boot = []
            for _ in range(bootstrap if cfg.seeds > 1 else 0):
                boot.append(_fit(lw, e[:, draws.integers(0, cfg.seeds, cfg.seeds)]))
            boot = np.array([b for b in boot if np.isfinite(b)])
            ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if len(boot) else None
            out[init][str(t)] = {"slope": _fit(lw, e), "ci95": ci, "predicted": predicted,
                                 "censored": int((~np.isfinite(e)).sum()), "of": int(e.size)}
    return out


def format_slopes(edge_slopes: dict, rounds: int) -> str:
    lines = [f"stability edge bisected to 1/{2 ** (rounds + 1)} octave, slope against width by horizon:",
             f"{'init':<9}{'horizon':>8}{'slope':>8}  {'95% interval':<18}{'theory':>7}  censored"]
    for init, by in edge_slopes.items():
        for t, s in by.items():
            ci = f"[{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}]" if s["ci95"] else "-"
            lines.append(f"Init[{init.upper()}] {t:>8}{s['slope']:>+8.2f}  {ci:<18}{s['predicted']:>+7.2f}  "
                         f"{s['censored']}/{s['of']}")
    return "\n".join(lines)
