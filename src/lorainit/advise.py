"""`lorainit advise`: each init family's learning rate, and the family to use, for a fraction of a
full sweep's compute, with the evidence and the horizon each choice was made at.

**Method: successive halving per family, in packs.** Stage 1 trains every family at every lr of a
wide grid (default 14 octaves) for every seed at a short horizon. After each stage, within each
family, the lrs at which a seed diverged, failed, collapsed or did not learn are dropped
(`sweeps.outcome`; a slow lr that has not learned yet fills a place left when too few learned), and
of the rest only the best third by the mean over seeds (at least `KEEP`, so
that the last stage still holds the best lr's rivals) go on to the next stage, at a horizon `ETA`
times longer; the last stage's horizon is at most the target length. Every stage is a sweep of its
own (`OUT/stage-<i>/`), run by the sweep driver in packs: it resumes after a kill like any sweep,
and advise, run again with the same settings, goes on where it stopped.

**The schedule across stages.** A stage's runs are fresh runs of that stage's length: warmup and
linear decay are laid over the stage's horizon, so every run compared has finished its decay, as the
run the user finally trains will. Nothing is continued from a shorter stage. A run continued under
a schedule laid over the target length would be compared mid-schedule, at its peak lr before any
decay, which favours small lrs (short-horizon bias); a schedule laid over the short horizon cannot be
continued at all (its lr has reached zero). Retraining costs at most 1/ETA more of each later stage
than continuing would, and is counted in the compute reported. What remains is the horizon itself:
the optimum at a short horizon can differ from the one at the target length, so the output says at
which horizon each family's lr was chosen, and writes a sweep file (`confirm.yaml`) that checks the
pick at the target length.

**The budget** is in run-steps (one optimiser step of one run; every run of a setting trains as many
rows per step, so run-steps measure training compute), or in minutes, converted through the dry run's
time estimate and recorded as run-steps. The compute spent is also given in training tokens, counted
from the rows each run's data order gives it (`engine.order.tokens_read`), against the full grid's.
The plan is fixed before any training: the most stages the grid allows, the first horizon as long as
the budget allows (never below `MIN_STEPS`), fewer stages only when the budget cannot give every
stage that; when the stages would cost as much as the full grid and the budget covers it, the full
grid is the one stage. A budget too small for even one stage is refused before anything is written,
with what would fit.

The answer is judged by the report's rules (`report.findings`): the recommended family's margin over
the runner-up HOLDS only when every seed of one beats every seed of the other, and is "within seed
noise" otherwise.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lorainit import tasks
from lorainit.config import RunConfig
from lorainit.engine import families as engine_families
from lorainit.engine.order import tokens_read
from lorainit.errors import BadInput
from lorainit.files import write_text_atomic
from lorainit.report import families
from lorainit.report import findings as judged
from lorainit.report.findings import _lr, _num, _range  # numbers as the report writes them
from lorainit.tasks import spec as specs
from lorainit.sweeps import file as sweep_file

DEFAULT_FAMILIES = ("a", "b", "ab", "gaussian", "orthogonal", "pissa", "olora")  # Init[A], Init[B], data-free
DEFAULT_LRS = tuple(2.0 ** e for e in range(-18, -4))  # 14 octaves, 3.8e-6 .. 3.1e-2
DEFAULT_SEEDS = (0, 1)
ETA = 3        # each stage keeps a third of a family's lrs, at three times the horizon
KEEP = 3       # lrs per family that go on at least: the best and two rivals
MIN_STEPS = 10  # the shortest horizon a stage trains
SET_BY_ADVISE = ("init", "init_args", "lr", "seed", "max_steps", "epochs")
SETTINGS = "advise.json"


@dataclass
class Stage:
    steps: int          # the horizon: every run of the stage trains this many steps, its schedule over them
    lrs: int            # lrs per family planned at this stage (at most)

    def run_steps(self, families_: int, seeds: int) -> int:
        return self.steps * self.lrs * families_ * seeds


@dataclass
class Settings:
    """What advise is asked: the base run (every run field but those advise sets), the families, the
    lr grid, the seeds, the target length and the budget."""

    base: dict
    families: tuple[str, ...] = DEFAULT_FAMILIES
    lrs: tuple[float, ...] = DEFAULT_LRS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    target_steps: int = 0
    budget: int = 0                 # run-steps
    minutes: float | None = None    # the budget as given in minutes, when it was
    metric: str | None = None       # default: the task's first metric
    pack_size: int | None = None
    name: str = "advise"

    def as_dict(self) -> dict:
        return {"base": self.base, "families": list(self.families), "lrs": list(self.lrs),
                "seeds": list(self.seeds), "target_steps": self.target_steps, "budget": self.budget,
                "minutes": self.minutes, "metric": self.metric, "pack_size": self.pack_size, "name": self.name}

    @property
    def full_grid(self) -> int:
        """The run-steps of the full grid: every family x lr x seed at the target length."""
        return len(self.families) * len(self.lrs) * len(self.seeds) * self.target_steps


def check(settings: Settings) -> RunConfig:
    """Refuse bad settings with BadInput naming the problem; returns the base run (first family, lr, seed)."""
    given = [k for k in settings.base if k.replace("-", "_") in SET_BY_ADVISE]
    if given:
        raise BadInput(f"advise: {given[0]} is set by advise (families, lrs, seeds, target steps); "
                       "give it through --families, --lrs, --seeds or --target-steps")
    if not settings.families:
        raise BadInput("advise: no families given")
    if len(set(settings.families)) != len(settings.families):
        raise BadInput("advise: a family is named twice in --families")
    if len(settings.lrs) < 2 or any(not (lr > 0 and math.isfinite(lr)) for lr in settings.lrs):
        raise BadInput(f"advise: --lrs needs at least two positive learning rates, got {list(settings.lrs)}")
    if list(settings.lrs) != sorted(set(settings.lrs)):
        raise BadInput("advise: --lrs must be increasing, without repeats")
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise BadInput(f"advise: --seeds must name distinct seeds, got {list(settings.seeds)}")
    if settings.target_steps < MIN_STEPS:
        raise BadInput(f"advise: --target-steps is {settings.target_steps}; give the length you will finally "
                       f"train, at least {MIN_STEPS} steps")
    if settings.budget <= 0 and settings.minutes is None:
        raise BadInput("advise: give a budget: --budget in run-steps (a positive whole number) or --minutes")
    run = RunConfig.from_dict(settings.base | {"init": settings.families[0], "lr": settings.lrs[0],
                                               "seed": settings.seeds[0], "max_steps": settings.target_steps},
                              where="advise")
    sweep_file.check_model(run.model, "advise")
    names = [m.name for m in tasks.metrics(run.task)]
    if settings.metric is not None and settings.metric not in names:
        raise BadInput(f"advise: --metric {settings.metric!r} is not one of the task's metrics: {', '.join(names)}")
    if settings.metric == "exact_match" and run.data is not None and "reference" not in specs.loads(run.data):
        raise BadInput("advise: --metric exact_match needs answers to match: a declared task generates them only "
                       "with task.reference (the column of reference answers), and this one has none")
    return run


def stage_counts(lrs: int) -> list[int]:
    """Lrs per family at each stage when no lr is dropped for not learning: a third kept each time,
    never fewer than KEEP (nor more than there are)."""
    counts = [lrs]
    while counts[-1] > KEEP:
        counts.append(max(KEEP, math.ceil(counts[-1] / ETA)))
    return counts


def plan(settings: Settings) -> list[Stage]:
    """The stages within the budget: the most stages the grid allows, the longest first horizon the
    budget gives (the last at most the target length); BadInput when not even one stage fits."""
    n_families, n_seeds, target = len(settings.families), len(settings.seeds), settings.target_steps
    counts = stage_counts(len(settings.lrs))
    for stages in range(len(counts), 0, -1):
        c = counts[:stages]
        per_step = sum(n * ETA ** i for i, n in enumerate(c)) * n_families * n_seeds  # run-steps per first-horizon step
        first = math.floor(min(target / ETA ** (stages - 1), settings.budget / per_step) + 1e-9)
        if first < MIN_STEPS:
            continue
        horizons = [first * ETA ** i for i in range(stages - 1)]
        # the last stage takes what the budget has left, up to the target length
        left = settings.budget - sum(h * n for h, n in zip(horizons, c)) * n_families * n_seeds
        horizons.append(min(target, left // (c[-1] * n_families * n_seeds)))
        staged = [Stage(h, n) for h, n in zip(horizons, c)]
        if settings.budget >= settings.full_grid and \
                sum(st.run_steps(n_families, n_seeds) for st in staged) >= settings.full_grid:
            return [Stage(target, len(settings.lrs))]  # the stages would cost the grid itself: run the grid
        return staged
    one = MIN_STEPS * len(settings.lrs) * n_families * n_seeds
    full = sum(n * ETA ** i for i, n in enumerate(counts)) * MIN_STEPS * n_families * n_seeds
    given = (f"--minutes {settings.minutes:g} ({settings.budget:,} run-steps at the estimated rate)"
             if settings.minutes is not None else f"a budget of {settings.budget:,} run-steps")
    raise BadInput(
        f"advise: {given} is too small for even one stage: one stage of "
        f"{n_families} families x {len(settings.lrs)} lrs x {n_seeds} seeds at the shortest horizon "
        f"({MIN_STEPS} steps) needs {one:,} run-steps, and the full plan ({len(counts)} stages) at least {full:,}; "
        f"give {'more --minutes' if settings.minutes is not None else 'a larger --budget'}, or fewer families, "
        "lrs or seeds")


def budget_from_minutes(settings: Settings, device: str) -> int:
    """Minutes as run-steps, through the dry run's time estimate of a pack of the first stage's runs at
    the target length."""
    from lorainit.sweeps import estimates, plan as packs

    runs = _runs(settings, settings.families, {f: settings.lrs for f in settings.families}, settings.target_steps)
    shape = estimates.model_shape(runs[0].model)
    size = settings.pack_size or estimates.default_pack_size(runs[0], device, shape)
    chunk = packs.plan(runs[:size], size)[0]
    seconds = estimates.seconds_per_pack(chunk, shape, estimates.matmul_flops(device))
    if not seconds:
        raise BadInput(f"advise: no time estimate for model {runs[0].model!r}; give --budget in run-steps")
    per_run_step = seconds / (len(chunk.runs) * settings.target_steps)
    return int(settings.minutes * 60 / per_run_step)


def _runs(settings: Settings, fams, lrs: dict[str, tuple[float, ...]], steps: int) -> list[RunConfig]:
    return [RunConfig.from_dict(settings.base | {"init": f, "lr": lr, "seed": s, "max_steps": steps}, where="advise")
            for f in fams for s in settings.seeds for lr in lrs[f]]


def sweep_text(settings: Settings, name: str, lrs: dict[str, list[float]], steps: int, comment: str = "") -> str:
    """A sweep file: the base at `steps`, each family over its own lrs, every seed."""
    fams = [f for f in settings.families if lrs.get(f)]
    doc = {"name": name, "base": settings.base | {"max_steps": steps},
           "grid": {"init": fams, "seed": list(settings.seeds), "lr": {f: list(lrs[f]) for f in fams}}}
    if settings.pack_size:
        doc["pack_size"] = settings.pack_size
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    return head + yaml.safe_dump(doc, sort_keys=False)


@dataclass
class Choice:
    """One family's answer: its best lr at the last horizon it reached, the bracket the optimum is
    known to lie in (grid neighbours; None on a side where the grid ends), and the seeds' values."""

    family: str
    steps: int | None                    # the horizon it was chosen at (None: no lr learned at any stage)
    lr: float | None = None
    low: float | None = None
    high: float | None = None
    mean: float | None = None
    values: list[float] = field(default_factory=list)
    dropped: list[tuple[int, str, float]] = field(default_factory=list)  # (stage, why, lr) each lr let go

    @property
    def name(self) -> str:
        return families.name(self.family)

    def dropped_text(self) -> str:
        """What each stage let go, and why: 'stage 1: behind the best 5: 3.81e-06, 7.63e-06; ...'."""
        said: dict[tuple[int, str], list[float]] = {}
        for stage, why, lr in self.dropped:
            said.setdefault((stage, why), []).append(lr)
        return "; ".join(f"stage {stage}: {why}: {', '.join(map(_lr, sorted(lrs)))}"
                         for (stage, why), lrs in sorted(said.items()))


@dataclass
class Advice:
    settings: Settings
    stages: list[Stage]
    metric: tasks.Metric
    kept: list[dict[str, list[float]]]   # per stage: family -> the lrs it ran
    choices: dict[str, Choice]
    best: Choice | None
    runner_up: Choice | None
    verdict: str | None                  # the best's metric against the runner-up's, by the report's rules
    spent: int                           # run-steps the stages scheduled (a diverged run stops sooner)
    seconds: float                       # the stages' training time, summed over packs
    out: Path
    notes: list[str] = field(default_factory=list)
    tokens: int | None = None            # real training tokens of those run-steps (None: the task cannot say)
    full_tokens: int | None = None       # and of the full grid's

    def lines(self) -> list[str]:
        """The advice as plain sentences, for the terminal and advice.md."""
        s, m = self.settings, self.metric
        out = []
        for i, (stage, kept) in enumerate(zip(self.stages, self.kept), 1):
            runs = sum(len(v) for v in kept.values()) * len(s.seeds)
            out.append(f"stage {i}: {stage.steps} steps, {runs} runs "
                       f"({', '.join(f'{families.name(f)} {len(v)}' for f, v in kept.items())} lrs x "
                       f"{len(s.seeds)} seeds), {runs * stage.steps:,} run-steps")
        for c in self.choices.values():
            if c.lr is None:
                out.append(f"{c.name}: no lr at which every seed learned at any stage")
                continue
            low = _lr(c.low) if c.low else "below the grid"
            high = _lr(c.high) if c.high else "above the grid"
            out.append(f"{c.name}: best lr {_lr(c.lr)} (the optimum lies between {low} and {high}), "
                       f"{m.name} {_num(c.mean)} (seeds {_range(c.values)}), chosen at {c.steps} of "
                       f"{s.target_steps} steps")
        if self.best is None:
            out.append("no family learned at every seed: no recommendation; try a longer --target-steps, more "
                       "budget or another lr grid")
        else:
            b = self.best
            line = f"recommended: {b.name} at lr {_lr(b.lr)} ({m.name} {_num(b.mean)}, at {b.steps} steps)"
            if self.runner_up is not None:
                r = self.runner_up
                gap = abs(b.mean - r.mean)
                line += (f"; runner-up {r.name} at lr {_lr(r.lr)} ({_num(r.mean)}): margin {_num(gap)}, "
                         f"{self.verdict}")
                if b.steps < s.target_steps:
                    line += f" (at {b.steps} steps; not judged at the target length)"
            out.append(line)
            if b.steps is not None and b.steps < s.target_steps:
                out.append(f"chosen at {b.steps} steps, short of the target {s.target_steps}: the optimum at the "
                           f"target can differ; run {self.out / 'confirm.yaml'} to check it")
        full = s.full_grid
        line = (f"compute: {self.spent:,} run-steps, {self.spent / full:.0%} of the full grid's {full:,} "
                f"({len(s.families)} families x {len(s.lrs)} lrs x {len(s.seeds)} seeds x {s.target_steps} steps)")
        if self.tokens is not None and self.full_tokens:
            line += (f"; {self.tokens:,} training tokens, {self.tokens / self.full_tokens:.0%} of the full "
                     f"grid's {self.full_tokens:,}")
        out.append(line + f"; training time {self.seconds / 60:.1f} min")
        return out + self.notes

    def as_dict(self) -> dict:
        return {"settings": self.settings.as_dict(), "metric": self.metric.name,
                "stages": [{"steps": st.steps, "lrs": k} for st, k in zip(self.stages, self.kept)],
                "choices": {f: vars(c) for f, c in self.choices.items()},
                "recommended": self.best.family if self.best else None,
                "runner_up": self.runner_up.family if self.runner_up else None, "verdict": self.verdict,
                "run_steps": self.spent, "full_grid_run_steps": self.settings.full_grid,
                "train_tokens": self.tokens, "full_grid_train_tokens": self.full_tokens,
                "seconds": self.seconds}


def _metric(settings: Settings, run: RunConfig) -> tasks.Metric:
    metrics = tasks.metrics(run.task)
    return next(m for m in metrics if m.name == settings.metric) if settings.metric else metrics[0]


def _ranked(cells: list, metric: tasks.Metric, loss_cells: dict[float, object]) -> tuple[list, list]:
    """(cells where every seed learned, cells where every seed trained to the end but some did not
    learn and none collapsed), each best first: the first by the mean metric over seeds, then (a tie) by the
    mean eval loss, then the smaller lr; the second by the mean eval loss (a metric such as accuracy
    sits at chance before a run learns: the loss still moves). A cell where a seed diverged or failed
    is in neither."""
    import statistics

    sign = -1 if metric.higher_is_better else 1

    def loss(cell) -> float:
        found = loss_cells.get(cell.lr)
        return statistics.fmean(found.trained_values) if found is not None and found.trained_values else math.inf

    learned = sorted((c for c in cells if c.complete), key=lambda c: (sign * c.mean, loss(c), c.lr))
    # a collapse (learned, then fell back) is a failure at any horizon; not having learned yet is not
    trained = [c for c in cells if not c.complete and len(c.trained_values) == len(c.runs) > 0
               and not c.count("collapsed")]
    return learned, sorted(trained, key=lambda c: (loss(c), c.lr))


def _stage_cells(folder: Path, metric: tasks.Metric, ids: set[str]) -> dict[str, tuple[list, dict]]:
    """family -> (its cells for the metric, its eval_loss cells by lr), from a stage's store: of the
    runs `ids` only. A store can hold others: a stage resumed after the one before it changed (a run
    that failed there, retried, then passed) planned other lrs the first time."""
    import dataclasses

    from lorainit.report.sweep import load

    sweep = load(folder)
    out = {}
    for group in sweep.groups:
        group = dataclasses.replace(group, runs=[r for r in group.runs if r.run_id in ids])
        cells = judged.cells_of(group, metric.name)
        losses = judged.cells_of(group, "eval_loss")
        for family, cs in cells.items():
            out[family] = (cs, {c.lr: c for c in losses.get(family, [])})
    return out


def _settings_match(out: Path, settings: Settings) -> None:
    """Refuse a folder holding an advise with other settings. A budget given in minutes keeps the
    run-steps it was converted to the first time (the estimate it came from varies between runs)."""
    path = out / SETTINGS
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    now = settings.as_dict()
    if settings.minutes is not None and before.get("minutes") == settings.minutes:
        now["budget"] = before.get("budget")
    changed = [k for k in now if before.get(k) != now[k]]
    if changed:
        raise BadInput(f"--out {out} holds an advise with other settings ({', '.join(changed)} differ); "
                       "give another folder, or the same settings to continue it")
    settings.budget = before["budget"]


def advise(settings: Settings, out: str | Path, device: str | None = None, show_progress: bool = True,
           dry_run: bool = False, executor: str = "local", ray_address: str | None = None) -> Advice | None:
    """Run (or continue) the staged probe sweep in `out` and return its advice; writes OUT/advice.md,
    OUT/advice.json, OUT/confirm.yaml and OUT/report/index.html. With `dry_run`, print the plan only.
    `executor`, `ray_address`: where each stage's packs train, as for a sweep."""
    from lorainit.sweeps import driver

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} exists and is not a folder")
    settings.families = tuple(engine_families.canonical(f) for f in settings.families)
    base_run = check(settings)
    if settings.minutes is not None:
        if not settings.minutes > 0:
            raise BadInput(f"advise: --minutes must be positive, got {settings.minutes:g}")
        settings.budget = budget_from_minutes(settings, driver._device(device))
    _settings_match(out, settings)
    stages = plan(settings)
    metric = _metric(settings, base_run)
    fams = settings.families
    planned = sum(st.run_steps(len(fams), len(settings.seeds)) for st in stages)
    said = (f"advise: {len(stages)} stages at {', '.join(str(st.steps) for st in stages)} steps "
            f"(lrs per family {', '.join(str(st.lrs) for st in stages)}), at most {planned:,} run-steps of the "
            f"budget {settings.budget:,}" + (f" ({settings.minutes:g} min)" if settings.minutes is not None else "")
            + f"; the full grid is {settings.full_grid:,}")
    print(said, file=sys.stderr)
    if dry_run:
        return None
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / SETTINGS, json.dumps(settings.as_dict(), indent=1))
    lrs = {f: list(settings.lrs) for f in fams}
    kept, seconds = [], 0.0
    scheduled: list[tuple[int, int]] = []  # (seed, steps) of every run the stages trained
    choices = {f: Choice(f, None) for f in fams}
    for i, stage in enumerate(stages, 1):
        lrs = {f: v for f, v in lrs.items() if v}
        if not lrs:
            break
        kept.append(lrs)
        folder = out / f"stage-{i}"
        text = sweep_text(settings, f"{settings.name}-stage-{i}", lrs, stage.steps,
                          f"lorainit advise, stage {i} of {len(stages)}: {stage.steps} steps")
        sweep = sweep_file.parse(text, f"advise stage {i}")
        print(f"advise: stage {i} of {len(stages)}: {len(sweep.runs)} runs at {stage.steps} steps", file=sys.stderr)
        driver.run_sweep(sweep, folder, executor=executor, ray_address=ray_address, device=device,
                         show_progress=show_progress)
        ids = {r.run_id() for r in sweep.runs}
        seconds += _seconds(folder, ids)
        scheduled += [(r.seed, stage.steps) for r in sweep.runs]
        cells = _stage_cells(folder, metric, ids)
        last = i == len(stages)
        nxt = {}
        for f in lrs:
            family_cells, losses = cells.get(f, ([], {}))
            learned, unlearned = _ranked(family_cells, metric, losses)
            if learned:
                _choose(choices[f], learned[0], stage.steps, settings.lrs)
            if last:
                continue
            keep = stages[i].lrs
            # what learned goes on first; at a short horizon a slow lr may not have learned yet, so the
            # best of the rest by eval loss fill the places left
            going = learned[:keep] + unlearned[:max(0, keep - len(learned))]
            nxt[f] = sorted(c.lr for c in going)
            for c in family_cells:
                if c not in going:
                    choices[f].dropped.append((i, c.label() or f"behind the best {keep}", c.lr))
        lrs = nxt
    spent = sum(steps for _, steps in scheduled)
    return _finish(settings, stages, metric, kept, choices, spent, seconds, out,
                   _counted(base_run, settings, scheduled))


def _seconds(folder: Path, ids: set[str] | None = None) -> float:
    """The stage's training time: each pack's seconds (its runs share them), summed over the packs
    that trained any of the runs `ids` (None: every pack)."""
    from lorainit.sweeps.store import Store

    store = Store.peek(folder)
    if store is None:
        return 0.0
    try:
        seconds = dict(store.db.execute("SELECT run_id, seconds FROM runs"))
        return sum(max((seconds.get(r) or 0.0) for r in pack) for pack in store.packs().values()
                   if ids is None or ids & set(pack))
    finally:
        store.close()


def _counted(run: RunConfig, settings: Settings, scheduled: list[tuple[int, int]]) -> tuple[int | None, ...]:
    """(real training tokens of the scheduled runs, (seed, steps) each, and of the full grid's), from
    the task's rows and each seed's data order (`engine.order.tokens_read`): what the trainer counts,
    without training; (None, None) where the task cannot say."""
    lengths = tasks.family(run.task).train_lengths(run)
    if lengths is None:
        return None, None

    @functools.cache
    def read(seed: int, steps: int) -> int:  # runs of one seed read the same rows
        return tokens_read(lengths, seed, run.batch_size, steps)

    cells = len(settings.families) * len(settings.lrs)
    return (sum(read(seed, steps) for seed, steps in scheduled),
            cells * sum(read(seed, settings.target_steps) for seed in settings.seeds))


def _choose(choice: Choice, cell, steps: int, grid: tuple[float, ...]) -> None:
    """The family's best cell at this stage, with its bracket: the grid's lrs either side."""
    i = grid.index(cell.lr) if cell.lr in grid else min(range(len(grid)), key=lambda j: abs(grid[j] - cell.lr))
    choice.steps, choice.lr, choice.mean, choice.values = steps, cell.lr, cell.mean, sorted(cell.values)
    choice.low = grid[i - 1] if i > 0 else None
    choice.high = grid[i + 1] if i + 1 < len(grid) else None


def _finish(settings: Settings, stages: list[Stage], metric: tasks.Metric, kept, choices: dict[str, Choice],
            spent: int, seconds: float, out: Path, tokens: tuple[int | None, ...] = (None, None)) -> Advice:
    final = max((c.steps for c in choices.values() if c.steps), default=None)
    contenders = [c for c in choices.values() if c.lr is not None and c.steps == final]
    sign = 1 if metric.higher_is_better else -1
    contenders.sort(key=lambda c: (-sign * c.mean, c.lr))
    best = contenders[0] if contenders else None
    runner = contenders[1] if len(contenders) > 1 else None
    verdict = None
    if best and runner:
        if len(settings.seeds) < 2:
            verdict = judged.UNKNOWN + " (one seed)"
        else:
            order = judged._order([v * sign for v in best.values], [v * sign for v in runner.values])
            verdict = {judged.HOLDS: "every seed of it beats every seed of the runner-up",
                       judged.EQUAL: "equal", judged.NOISE: judged.NOISE}.get(order, order)
    notes = [f"{c.name} learned at no lr at {final} steps: its choice was made at {c.steps} steps"
             for c in choices.values() if c.lr is not None and c.steps != final]
    for c in choices.values():
        if c.lr is not None and (c.low is None or c.high is None):
            side = "smallest" if c.low is None else "largest"
            notes.append(f"{c.name}'s best lr is the {side} of the grid: its optimum may lie beyond; widen --lrs")
    advice = Advice(settings, stages, metric, kept, choices, best, runner, verdict, spent, seconds, out, notes,
                    *tokens)
    if best is not None:
        write_text_atomic(out / "confirm.yaml", confirm_file(advice))
    elif (out / "confirm.yaml").exists():
        (out / "confirm.yaml").unlink()
    write_text_atomic(out / "advice.json", json.dumps(advice.as_dict(), indent=1))
    from lorainit.advise_page import write

    write(advice)
    return advice


def confirm_file(advice: Advice) -> str:
    """The sweep file that checks the pick at the target length: the recommended family and the
    runner-up, each at its best lr and the bracket's two ends, every seed."""
    picks = [c for c in (advice.best, advice.runner_up) if c is not None]
    lrs = {c.family: [x for x in (c.low, c.lr, c.high) if x is not None] for c in picks}
    s = advice.settings
    said = ", ".join(f"{c.name} at {_lr(c.lr)} (chosen at {c.steps} steps)" for c in picks)
    comment = (f"Confirms lorainit advise's pick at the target length ({s.target_steps} steps): {said}, each at its "
               f"best lr and the bracket's ends.\nRun: lorainit sweep confirm.yaml --out <folder>; "
               f"then lorainit report <folder>")
    return sweep_text(s, f"{s.name}-confirm", lrs, s.target_steps, comment)
