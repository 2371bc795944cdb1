"""What a sweep's numbers say about Init[A] against Init[B] and the other init families, computed,
never assumed.

For each group (task and further grid axes) and each of the task's metrics, a cell is one
(init family, lr), a family being an init and its arguments (`report.families`): its runs are its
seeds, its value their final metric. A cell is a candidate for the optimum only when every one of
its seeds learned (status done, `lorainit.sweeps.outcome`): a cell where any seed diverged,
failed, collapsed or did not learn does not work at that lr, and cells still pending or running
are unknown.

Per family: the best lr (best mean over seeds, with min-max), each seed's own best lr, the
largest lr at which every seed learned, and the best lr as a ratio to Init[A]'s (in octaves,
log2 of the ratio). Across families, the paper's two claims, each judged against the seeds:

- "Init[A]'s optimal lr > Init[B]'s" HOLDS when every seed's own Init[A] optimum is above every
  seed's own Init[B] optimum; is EQUAL when every seed's optimum is one and the same lr for both
  inits; DOES NOT HOLD in the mirror case (every A optimum below every B optimum); and is WITHIN
  SEED NOISE otherwise. With one seed the same rules apply (so HOLDS needs a strict >), and the
  verdict says that the spread is unknown.
- "Init[A]'s best <metric> > Init[B]'s" compares the seeds' values in each init's best cell: it
  HOLDS when every A seed beats every B seed, DOES NOT HOLD in the mirror case, is EQUAL when every
  value is the same, and is WITHIN SEED NOISE when the two ranges overlap. With one seed a gap is
  no evidence either way: SPREAD UNKNOWN.

A tie, a gap inside the seeds' spread, or any metric gap with one seed is never HOLDS.

The same two claims, by the same rules, are judged for Init[A] against every other family in the
group ("Init[A]'s optimal lr > PiSSA's"), and for any further pair a sweep file's `compare:` or
`lorainit report --pair X:Y` names.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from lorainit.report import families
from lorainit.report.families import INIT_NAMES  # noqa: F401  (re-exported: how each init is named)
from lorainit.report.sweep import Group, Run, finite
from lorainit.sweeps import outcome
from lorainit.tasks import Metric

HOLDS, FAILS, EQUAL, NOISE, UNKNOWN = "holds", "does not hold", "equal", "within seed noise", "spread unknown"
PAPER = ("a", "b")  # the paper's two inits: their claims and ratio are said as they always were
# each way a seed can fail to learn, by its status, as notes and cells say it
FAILED_TO_LEARN = {"diverged": "diverged", "failed": "failed", "collapsed": "collapsed", "did_not_learn": "did not learn"}


@dataclass
class Cell:
    init: str                               # the family key (`report.families`): "a", "ab{\"reset\":false}"
    lr: float
    runs: list[Run]
    metric: str = ""

    @property
    def values(self) -> list[float]:
        return [r.final[self.metric] for r in self.runs if r.status == "done" and finite(r.final.get(self.metric))]

    @property
    def trained_values(self) -> list[float]:
        """The metric of every seed that trained to the end, whether or not it learned."""
        return [r.final[self.metric] for r in self.runs
                if r.status in ("done", *outcome.NOT_LEARNED) and finite(r.final.get(self.metric))]

    @property
    def complete(self) -> bool:
        """Every seed learned, with a finite metric."""
        return bool(self.runs) and all(r.status == "done" for r in self.runs) and len(self.values) == len(self.runs)

    def count(self, *statuses: str) -> int:
        return sum(r.status in statuses for r in self.runs)

    @property
    def diverged(self) -> int:
        return self.count("diverged")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def unlearned(self) -> int:
        """Seeds that trained to the end and did not learn, or learned and fell back."""
        return self.count("did_not_learn", "collapsed")

    @property
    def unfinished(self) -> int:
        return sum(r.status not in outcome.SHOWN for r in self.runs)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    def label(self) -> str | None:
        """How a cell that does not work says so, each way its seeds failed to learn counted, e.g.
        '1 collapsed, 2 did not learn (of 3)'; None when every seed learned or is unfinished."""
        parts = [f"{self.count(status)} {said}" for status, said in FAILED_TO_LEARN.items() if self.count(status)]
        return f"{', '.join(parts)} (of {len(self.runs)})" if parts else None


@dataclass
class InitFinding:
    init: str                               # the family key
    best_lr: float | None
    best_mean: float | None
    best_min: float | None
    best_max: float | None
    seeds: int
    largest_learned_lr: float | None        # every seed learned at this lr (none diverged, failed or did not learn)
    seed_optima: list[float] = field(default_factory=list)  # each seed's own best lr
    best_values: list[float] = field(default_factory=list)  # the seeds' values at the best lr
    tie: float | None = None                # every lr gave this same value: there is no optimum


@dataclass
class Claim:
    text: str
    verdict: str                            # HOLDS, EQUAL, FAILS, NOISE or UNKNOWN
    detail: str
    families: tuple[str, str] = ("a", "b")  # the claim is that the first beats the second


@dataclass
class Finding:
    group: Group
    metric: Metric
    cells: dict[str, list[Cell]]            # family -> cells by lr, families in `families.order`
    inits: dict[str, InitFinding]           # family -> its finding
    lr_ratio: float | None                  # optimal lr of A / of B
    claims: list[Claim]
    notes: list[str]
    ratios: dict[str, float] = field(default_factory=dict)  # family -> its optimal lr / Init[A]'s


def cells_of(group: Group, metric: str) -> dict[str, list[Cell]]:
    out: dict[str, dict[float, Cell]] = {}
    for run in group.runs:
        out.setdefault(run.family, {}).setdefault(run.lr, Cell(run.family, run.lr, [], metric)).runs.append(run)
    return {family: [out[family][lr] for lr in sorted(out[family])] for family in sorted(out, key=families.order)}


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
    learned = [c.lr for c in cells if c.complete]
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
                       len(seeds), max(learned) if learned else None, optima, cell.values if cell else [],
                       candidates[0][1] if tie else None)


def judge(group: Group, metric: Metric, pairs: list[tuple[str, str]] = ()) -> Finding:
    """The group's finding for one metric: Init[A] against every other family, then `pairs`
    (family keys, e.g. from a sweep file's `compare:`)."""
    cells = cells_of(group, metric.name)
    inits = {family: _init_finding(family, c, metric) for family, c in cells.items()}
    notes = []
    unfinished = sum(c.unfinished for cs in cells.values() for c in cs)
    if unfinished:
        notes.append(f"{unfinished} of {len(group.runs)} runs are not finished: these findings may change")
    for family, cs in cells.items():
        bad = [(c, c.label()) for c in cs if c.label()]
        if bad:
            notes.append(f"{families.name(family)} " + "; ".join(f"at lr {_lr(c.lr)}: {label}" for c, label in bad)
                         + ": not candidates for its optimum")
    if any(c.unlearned for cs in cells.values() for c in cs):
        notes.append(f"a run did not learn when its final eval loss is not more than {outcome.MARGIN:.0%} below "
                     "the trivial predictor's (the label prior's for classification, its own step-0 loss for a "
                     "decoder); it collapsed when it ended so although an earlier evaluation was below that line")
    a, b = inits.get("a"), inits.get("b")
    ratio = a.best_lr / b.best_lr if a and b and a.best_lr and b.best_lr else None
    ratios = {family: i.best_lr / a.best_lr for family, i in inits.items() if a and a.best_lr and i.best_lr}
    notes += _no_optimum(inits, metric)
    notes += _at_the_edge(cells, inits)
    defaults = [("a", family) for family in inits if family != "a"] if a else []
    claims, not_judged = _claims(inits, [*defaults, *pairs], metric)
    return Finding(group, metric, cells, inits, ratio, claims, notes + not_judged, ratios)


def _at_the_edge(cells: dict[str, list[Cell]], inits: dict[str, InitFinding]) -> list[str]:
    """A note for each family whose best lr is the smallest or the largest it was run at: its
    optimum may lie beyond, and so may its ratio to Init[A]'s."""
    notes = []
    for family, cs in cells.items():
        best, lrs = inits[family].best_lr, [c.lr for c in cs]
        if best is None or len(lrs) < 2 or min(lrs) < best < max(lrs):
            continue
        side = "smallest" if best == min(lrs) else "largest"
        notes.append(f"{families.name(family)}'s best lr {_lr(best)} is the {side} it was run at: its optimum may "
                     f"lie {'below' if side == 'smallest' else 'above'} its grid")
    return notes


def _no_optimum(inits: dict[str, InitFinding], metric: Metric) -> list[str]:
    """Notes on what cannot be compared for want of Init[A], Init[B] or their optima."""
    a, b = inits.get("a"), inits.get("b")
    paper_only = set(inits) <= set(PAPER)
    if a is None and not paper_only:
        return ["the sweep holds no Init[A]: no family's optimal lr is given as a ratio to Init[A]'s, "
                "and no claim is judged against it"]
    notes = []
    if a is None or b is None:
        if paper_only:
            notes.append("the sweep does not hold both inits: nothing to compare")
    elif not (a.best_lr and b.best_lr):
        if a.tie is not None or b.tie is not None:
            notes.append(f"every lr gives one init the same {metric.name}: no optimum, so nothing to compare")
        else:
            notes.append("an init has no learning rate at which every seed learned: no optimum to compare")
    if a is not None and not a.best_lr and not paper_only:
        notes.append("Init[A] has no optimum: no family's optimal lr is given as a ratio to Init[A]'s")
    return notes


def _claims(inits: dict[str, InitFinding], pairs: list[tuple[str, str]], metric: Metric
            ) -> tuple[list[Claim], list[str]]:
    """The two claims for each pair (once per pair, whichever way round it is named), and notes on
    the pairs that could not be judged."""
    claims, judged, unjudged, absent = [], set(), [], []
    for x, y in pairs:
        if frozenset((x, y)) in judged:
            continue
        judged.add(frozenset((x, y)))
        said = f"{families.name(x)} against {families.name(y)}"
        if x not in inits or y not in inits:
            absent.append(said)
        elif inits[x].best_lr and inits[y].best_lr:
            one_seed = max(inits[x].seeds, inits[y].seeds) < 2
            claims.append(_claim_lr(inits[x], inits[y], one_seed))
            claims.append(_claim_metric(inits[x], inits[y], metric, one_seed))
        elif (x, y) != PAPER:  # the paper's pair has its own notes (`_no_optimum`)
            unjudged.append(said)
    notes = []
    if unjudged:
        notes.append("no optimum on one side (every lr alike, or no lr at which every seed learned), so not "
                     "judged: " + "; ".join(unjudged))
    if absent:
        notes.append("this group does not hold both families, so not judged: " + "; ".join(absent))
    return claims, notes


def _order(above: list[float], below: list[float]) -> str:
    """HOLDS when every value of `above` is above every value of `below`, FAILS in the mirror case,
    EQUAL when every value is one and the same, else NOISE."""
    if min(above) > max(below):
        return HOLDS
    if max(above) < min(below):
        return FAILS
    if len(set(above) | set(below)) == 1:
        return EQUAL
    return NOISE


def _short(family: str) -> str:
    """A family as a claim's detail names it: the paper's inits by their letter."""
    return family.upper() if family in PAPER else families.name(family)


def _claim_lr(a: InitFinding, b: InitFinding, one_seed: bool) -> Claim:
    """'a's optimal lr > b's', for any two families (the paper's claim when they are Init[A] and Init[B])."""
    pair = (a.init, b.init)
    text = f"{families.name(a.init)}'s optimal lr > {families.name(b.init)}'s"
    octaves = math.log2(a.best_lr / b.best_lr)
    detail = f"{_lr(a.best_lr)} against {_lr(b.best_lr)} ({octaves:+.1f} octaves)"
    if not (a.seed_optima and b.seed_optima):
        return Claim(text, NOISE, detail + "; no seed has an optimum of its own for both inits", pair)
    verdict = _order(a.seed_optima, b.seed_optima)
    if one_seed:
        return Claim(text, verdict, detail + "; one seed, so the spread is unknown", pair)
    detail += (f"; the seeds' own optima: {_short(a.init)} {', '.join(map(_lr, sorted(a.seed_optima)))}, "
               f"{_short(b.init)} {', '.join(map(_lr, sorted(b.seed_optima)))}")
    return Claim(text, verdict, detail, pair)


def _claim_metric(a: InitFinding, b: InitFinding, metric: Metric, one_seed: bool) -> Claim:
    """'a's best metric > b's', for any two families, by the metric's direction."""
    pair = (a.init, b.init)
    text = f"{families.name(a.init)}'s best {metric.name} > {families.name(b.init)}'s"
    sign = 1 if metric.higher_is_better else -1
    gain = (a.best_mean - b.best_mean) * sign  # > 0: a is better
    winner = _short(a.init) if gain > 0 else _short(b.init) if gain < 0 else "neither"
    detail = f"{_num(a.best_mean)} against {_num(b.best_mean)} ({winner} better by {_num(abs(gain))})"
    if one_seed:
        return Claim(text, EQUAL if gain == 0 else UNKNOWN,
                     detail + "; one seed, so the spread is unknown and a gap is no evidence either way", pair)
    detail += (f"; the seeds at the best lrs: {_short(a.init)} {_range(a.best_values)}, "
               f"{_short(b.init)} {_range(b.best_values)}")
    return Claim(text, _order([v * sign for v in a.best_values], [v * sign for v in b.best_values]), detail, pair)


def _lr(value: float) -> str:
    return f"{value:.3g}"


def _range(values: list[float]) -> str:
    return f"{_num(min(values))}–{_num(max(values))}" if values else "-"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def beyond_paper(f: Finding) -> bool:
    """Whether the finding holds a family other than Init[A] and Init[B] (then ratios to Init[A] are said)."""
    return any(family not in PAPER for family in f.inits)


def ratio_text(ratio: float) -> str:
    """An optimal lr against Init[A]'s, as a factor and in octaves: '0.125x Init[A]'s (-3.0 octaves)'."""
    return f"{ratio:.3g}x Init[A]'s ({math.log2(ratio):+.1f} octaves)"


def headline(f: Finding) -> str:
    """One sentence: each family's best lr and metric, the ratios of the optima, and the verdicts."""
    parts = []
    for family, i in f.inits.items():
        if i.best_lr is not None:
            parts.append(f"{families.name(family)} is best at lr {_lr(i.best_lr)} "
                         f"({f.metric.name} {_num(i.best_mean)})")
    text = "; ".join(parts) or "no init has an lr at which every seed learned"
    if f.lr_ratio is not None:
        text += f". Init[A]'s optimal lr is {f.lr_ratio:.3g}x Init[B]'s"
    others = [f"{families.name(family)} {ratio:.3g}x ({math.log2(ratio):+.1f} octaves)"
              for family, ratio in f.ratios.items() if family not in PAPER]
    if others:
        text += ". Optimal lr against Init[A]'s: " + ", ".join(others)
    if f.claims:
        text += ". " + "; ".join(f"{c.text}: {c.verdict}" for c in f.claims)
    return text + "."


def summary_lines(f: Finding) -> list[str]:
    """The finding as plain sentences, for the page, summary.md and the terminal."""
    lines = []
    for family, i in f.inits.items():
        name = families.name(family)
        if i.tie is not None:
            lines.append(f"{name}: every lr gives {f.metric.name} {_num(i.tie)}: no optimum")
            continue
        if i.best_lr is None:
            lines.append(f"{name}: no lr at which every seed learned")
            continue
        spread = (f" (seeds {_num(i.best_min)}–{_num(i.best_max)}, {i.seeds} seeds)" if i.seeds > 1
                  else " (one seed)")
        learned = _lr(i.largest_learned_lr) if i.largest_learned_lr is not None else "none"
        line = (f"{name}: best lr {_lr(i.best_lr)}, {f.metric.name} {_num(i.best_mean)}{spread}; "
                f"largest lr at which every seed learned: {learned}")
        if beyond_paper(f) and family != "a" and family in f.ratios:
            line += f"; optimal lr {ratio_text(f.ratios[family])}"
        lines.append(line)
    if f.lr_ratio is not None:
        lines.append(f"optimal lr ratio Init[A] / Init[B]: {f.lr_ratio:.3g}")
    for c in f.claims:
        lines.append(f"{c.text}: {c.verdict.upper()} — {c.detail}")
    return lines + f.notes
