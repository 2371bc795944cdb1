"""What a sweep's numbers say about Init[A] against Init[B], computed, never assumed.

For each group (task and further grid axes) and each of the task's metrics, a cell is one
(init, lr): its runs are its seeds, its value their final metric. A cell is a candidate for the
optimum only when every one of its seeds finished training (status done): a cell where any seed
diverged or failed is unstable at that lr, and cells still pending or running are unknown.

Per init: the best lr (best mean over seeds, with min-max), and the largest lr at which no seed
diverged. Across inits: the ratio of optimal lrs A / B, and the paper's two claims, each judged
against the seeds' spread:

- "Init[A]'s optimal lr >= Init[B]'s" holds when every seed's optimum for A is at or above every
  seed's optimum for B; it does not hold when every seed's A optimum is below every B optimum;
  otherwise the seeds disagree: within seed noise.
- "Init[A]'s best metric >= Init[B]'s" compares the two best means: the difference counts when it
  is larger than the seeds' spread there (the mean of the two cells' min-max widths).

With one seed the spread is unknown: the verdict is the comparison itself, and says so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from lorainit.report.sweep import Group, Run, finite
from lorainit.tasks import Metric

HOLDS, FAILS, NOISE = "holds", "does not hold", "within seed noise"
INIT_NAMES = {"a": "Init[A]", "b": "Init[B]"}


@dataclass
class Cell:
    init: str
    lr: float
    runs: list[Run]

    @property
    def values(self) -> list[float]:
        return [r.final[self.metric] for r in self.runs if r.status == "done" and finite(r.final.get(self.metric))]

    metric: str = ""

    @property
    def complete(self) -> bool:
        """Every seed trained to the end with a finite metric."""
        return bool(self.runs) and all(r.status == "done" for r in self.runs) and len(self.values) == len(self.runs)

    @property
    def diverged(self) -> int:
        return sum(r.status == "diverged" for r in self.runs)

    @property
    def failed(self) -> int:
        return sum(r.status == "failed" for r in self.runs)

    @property
    def unfinished(self) -> int:
        return sum(r.status not in ("done", "diverged", "failed") for r in self.runs)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None


@dataclass
class InitFinding:
    init: str
    best_lr: float | None
    best_mean: float | None
    best_min: float | None
    best_max: float | None
    seeds: int
    largest_stable_lr: float | None        # no seed diverged at this lr (nor failed)
    seed_optima: list[float] = field(default_factory=list)  # each seed's own best lr
    tie: float | None = None                # every lr gave this same value: there is no optimum


@dataclass
class Claim:
    text: str
    verdict: str                            # HOLDS, FAILS, NOISE, or "unknown"
    detail: str


@dataclass
class Finding:
    group: Group
    metric: Metric
    cells: dict[str, list[Cell]]            # init -> cells by lr
    inits: dict[str, InitFinding]
    lr_ratio: float | None                  # optimal lr of A / of B
    claims: list[Claim]
    notes: list[str]


def cells_of(group: Group, metric: str) -> dict[str, list[Cell]]:
    out: dict[str, dict[float, Cell]] = {}
    for run in group.runs:
        out.setdefault(run.init, {}).setdefault(run.lr, Cell(run.init, run.lr, [], metric)).runs.append(run)
    return {init: [cells[lr] for lr in sorted(cells)] for init, cells in sorted(out.items())}


def _best(metric: Metric, pairs: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(lr, value) with the best value; ties go to the smaller lr."""
    best = None
    for lr, value in pairs:
        if best is None or metric.better(value, best[1]):
            best = (lr, value)
    return best


def _init_finding(init: str, cells: list[Cell], metric: Metric) -> InitFinding:
    candidates = [(c.lr, c.mean) for c in cells if c.complete]
    tie = len(candidates) > 1 and len({v for _, v in candidates}) == 1
    best = None if tie else _best(metric, candidates)  # every lr alike (an exact match of 0): no optimum
    stable = [c.lr for c in cells if c.runs and c.diverged == 0 and c.failed == 0 and c.unfinished == 0]
    seeds = sorted({r.seed for c in cells for r in c.runs})
    optima = []
    for seed in seeds:
        own = [(c.lr, r.final[metric.name]) for c in cells if c.complete for r in c.runs
               if r.seed == seed and finite(r.final.get(metric.name))]
        if (b := _best(metric, own)) is not None:
            optima.append(b[0])
    cell = next((c for c in cells if best and c.lr == best[0]), None)
    return InitFinding(init, best[0] if best else None, best[1] if best else None,
                       min(cell.values) if cell else None, max(cell.values) if cell else None,
                       len(seeds), max(stable) if stable else None, optima,
                       candidates[0][1] if tie else None)


def judge(group: Group, metric: Metric) -> Finding:
    cells = cells_of(group, metric.name)
    inits = {init: _init_finding(init, c, metric) for init, c in cells.items()}
    notes = []
    unfinished = sum(c.unfinished for cs in cells.values() for c in cs)
    if unfinished:
        notes.append(f"{unfinished} of {len(group.runs)} runs are not finished: these findings may change")
    for init, cs in cells.items():
        bad = [c for c in cs if c.diverged or c.failed]
        if bad:
            parts = [f"{_lr(c.lr)} ({c.diverged + c.failed} of {len(c.runs)} seeds)" for c in bad]
            notes.append(f"{INIT_NAMES.get(init, init)} diverged or failed at lr {', '.join(parts)}; "
                         "those lrs are not candidates for its optimum")
    a, b = inits.get("a"), inits.get("b")
    claims, ratio = [], None
    if a and b and a.best_lr and b.best_lr:
        ratio = a.best_lr / b.best_lr
        one_seed = max(a.seeds, b.seeds) < 2
        claims.append(_claim_lr(a, b, one_seed))
        claims.append(_claim_metric(a, b, metric, one_seed))
    elif a is None or b is None:
        notes.append("the sweep does not hold both inits: nothing to compare")
    elif a.tie is not None or b.tie is not None:
        notes.append(f"every lr gives one init the same {metric.name}: no optimum, so nothing to compare")
    else:
        notes.append("an init has no learning rate at which every seed finished: no optimum to compare")
    return Finding(group, metric, cells, inits, ratio, claims, notes)


def _claim_lr(a: InitFinding, b: InitFinding, one_seed: bool) -> Claim:
    text = "Init[A]'s optimal lr >= Init[B]'s"
    octaves = math.log2(a.best_lr / b.best_lr)
    detail = f"{_lr(a.best_lr)} against {_lr(b.best_lr)} ({octaves:+.1f} octaves)"
    if one_seed:
        return Claim(text, HOLDS if a.best_lr >= b.best_lr else FAILS, detail + "; one seed, so the spread is unknown")
    detail += (f"; the seeds' own optima: A {', '.join(map(_lr, sorted(a.seed_optima)))}, "
               f"B {', '.join(map(_lr, sorted(b.seed_optima)))}")
    if a.seed_optima and b.seed_optima and min(a.seed_optima) >= max(b.seed_optima):
        return Claim(text, HOLDS, detail)
    if a.seed_optima and b.seed_optima and max(a.seed_optima) < min(b.seed_optima):
        return Claim(text, FAILS, detail)
    return Claim(text, NOISE, detail)


def _claim_metric(a: InitFinding, b: InitFinding, metric: Metric, one_seed: bool) -> Claim:
    text = f"Init[A]'s best {metric.name} >= Init[B]'s"
    gain = (a.best_mean - b.best_mean) * (1 if metric.higher_is_better else -1)  # > 0: A is better
    winner = "A" if gain > 0 else "B" if gain < 0 else "neither"
    detail = f"{_num(a.best_mean)} against {_num(b.best_mean)} ({winner} better by {_num(abs(gain))})"
    if one_seed:
        return Claim(text, HOLDS if gain >= 0 else FAILS, detail + "; one seed, so the spread is unknown")
    spread = ((a.best_max - a.best_min) + (b.best_max - b.best_min)) / 2
    detail += f"; seed spread {_num(spread)}"
    if abs(gain) <= spread:
        return Claim(text, NOISE, detail)
    return Claim(text, HOLDS if gain > 0 else FAILS, detail)


def _lr(value: float) -> str:
    return f"{value:.3g}"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def headline(f: Finding) -> str:
    """One sentence: each init's best lr and metric, and the two verdicts."""
    parts = []
    for init, i in f.inits.items():
        if i.best_lr is not None:
            parts.append(f"{INIT_NAMES.get(init, init)} is best at lr {_lr(i.best_lr)} ({f.metric.name} {_num(i.best_mean)})")
    text = "; ".join(parts) or "no init has an lr at which every seed finished"
    if f.lr_ratio is not None:
        text += f". Init[A]'s optimal lr is {f.lr_ratio:.3g}x Init[B]'s"
    if f.claims:
        text += ". " + "; ".join(f"{c.text}: {c.verdict}" for c in f.claims)
    return text + "."


def summary_lines(f: Finding) -> list[str]:
    """The finding as plain sentences, for the page, summary.md and the terminal."""
    lines = []
    for init, i in f.inits.items():
        name = INIT_NAMES.get(init, init)
        if i.tie is not None:
            lines.append(f"{name}: every lr gives {f.metric.name} {_num(i.tie)}: no optimum")
            continue
        if i.best_lr is None:
            lines.append(f"{name}: no lr at which every seed finished")
            continue
        spread = (f" (seeds {_num(i.best_min)}–{_num(i.best_max)}, {i.seeds} seeds)" if i.seeds > 1
                  else " (one seed)")
        stable = _lr(i.largest_stable_lr) if i.largest_stable_lr is not None else "none"
        lines.append(f"{name}: best lr {_lr(i.best_lr)}, {f.metric.name} {_num(i.best_mean)}{spread}; "
                     f"largest lr with no seed diverged: {stable}")
    if f.lr_ratio is not None:
        lines.append(f"optimal lr ratio Init[A] / Init[B]: {f.lr_ratio:.3g}")
    for c in f.claims:
        lines.append(f"{c.text}: {c.verdict.upper()} — {c.detail}")
    return lines + f.notes
