"""A sweep folder's store, read once and read-only, as the report needs it.

The store is opened read-only (`mode=ro`), so a report can be built while the sweep runs (the
store is in WAL mode: the reader sees the last committed transaction) and never changes it.
Runs not finished yet are kept, marked by their status. A run that trained to the end is shown as
done, did_not_learn or collapsed, judged from its stored numbers (`lorainit.sweeps.outcome`).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lorainit import tasks
from lorainit.errors import BadInput
from lorainit.report import families
from lorainit.sweeps import outcome
from lorainit.sweeps.store import Store

STORE = Store.FILE
# fields that place a run in the lr x init-family picture, not in a group of its own
PICTURE = ("init", "init_args", "lr", "seed")


@dataclass
class Run:
    run_id: str
    config: dict
    status: str
    steps: int | None
    diverged_step: int | None
    final: dict
    error: str | None
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # train_loss, eval metrics
    trivial_loss: float | None = None      # the eval loss it had to beat to have learned (sweeps.outcome)
    probes: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> step -> mean over layers

    @property
    def init(self) -> str:
        return self.config["init"]

    @property
    def family(self) -> str:
        """Its init and the init's arguments (`report.families`): what the findings compare."""
        return families.key(self.config)

    @property
    def lr(self) -> float:
        return float(self.config["lr"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def probe_at_end(self, name: str) -> float | None:
        values = self.probes.get(name)
        return values[max(values)] if values else None


@dataclass
class Group:
    """The runs of one task at one setting of every grid axis other than init, lr and seed."""

    task: str
    axes: dict            # e.g. {"rank": 8}; empty when init, lr and seed are the only axes
    runs: list[Run]
    name: str = ""        # what the task is called: its name, or a declared task's data and type

    @property
    def title(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.axes.items())
        return f"{self.name or self.task}" + (f" ({extra})" if extra else "")

    @property
    def slug(self) -> str:
        extra = "_".join(f"{k}-{v}" for k, v in self.axes.items())
        name = (self.name or self.task).replace(" (", "-").rstrip(")")
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in name + ("_" + extra if extra else ""))

    @property
    def metrics(self) -> tuple[tasks.Metric, ...]:
        return tasks.metrics(self.task) if self.task in tasks.names() else recorded_metrics(self.runs)


def recorded_metrics(runs: list[Run]) -> tuple[tasks.Metric, ...]:
    """The metrics of runs of a task the registry does not know (runs a Trainer recorded through
    `lorainit.hf.ProbeCallback`): each metric some run recorded whose direction is known, from the
    runs' own `metrics` field (name -> higher is better) or else from a registered task's metric of
    that name, in the order the runs give them. A metric of unknown direction is in no finding."""
    directions: dict[str, bool] = {}
    for run in runs:
        declared = run.config.get("metrics")
        for name, higher in declared.items() if isinstance(declared, dict) else ():
            directions.setdefault(name, bool(higher))
    for task in tasks.names():
        for metric in tasks.metrics(task):
            directions.setdefault(metric.name, metric.higher_is_better)
    recorded = {name for run in runs for name in (*run.final, *run.series)}
    names = [name for name in directions if name in recorded]
    return tuple(tasks.Metric(name, directions[name]) for name in names)


@dataclass
class Sweep:
    folder: Path
    name: str
    runs: list[Run]
    groups: list[Group]
    compare: list[tuple[str, str]] = field(default_factory=list)  # the sweep file's extra family pairs

    def count(self, *statuses: str) -> int:
        return sum(r.status in statuses for r in self.runs)


def finished(group: "Group") -> bool:
    """Whether any run of the group has finished (done, did_not_learn, collapsed, diverged or failed)."""
    return any(r.status in outcome.SHOWN for r in group.runs)


def load(folder: str | Path) -> Sweep:
    """Read a sweep folder's store; BadInput if the folder has none or it cannot be read.

    A folder without a store of its own whose subfolders hold stores (run folders that
    `lorainit.hf.ProbeCallback` wrote, one per Trainer run, or several sweeps) is read as one
    sweep: every store below it, its runs grouped together as one sweep's are."""
    folder = Path(folder)
    path = folder / STORE
    if not path.is_file():
        below = sorted(p.parent for p in folder.rglob(STORE)) if folder.is_dir() else []
        if not below:
            raise BadInput(f"{folder}: no sweep store here ({STORE} not found, nor in any folder below it); give a "
                           "folder made by `lorainit sweep`, `lorainit train --out` or lorainit.hf.ProbeCallback")
        return _merged(folder, [_load_one(f) for f in below])
    return _load_one(folder)


def _merged(folder: Path, sweeps: list[Sweep]) -> Sweep:
    """Several stores' runs as one sweep named for `folder` (no grid: the axes are the fields that vary)."""
    runs = [run for sweep in sweeps for run in sweep.runs]
    compare = list(dict.fromkeys(pair for sweep in sweeps for pair in sweep.compare))
    return Sweep(folder, folder.name, runs, _groups(runs, None), compare)


def _load_one(folder: Path) -> Sweep:
    path = folder / STORE
    try:
        db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=30)
        try:
            return _read(db, folder)
        finally:
            db.close()
    except sqlite3.DatabaseError as err:
        raise BadInput(f"{path}: not a readable sweep store ({err})") from None


def _read(db: sqlite3.Connection, folder: Path) -> Sweep:
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "runs" not in tables:
        return Sweep(folder, folder.name, [], [])
    row = db.execute("SELECT name, grid, file FROM sweeps").fetchone() if "sweeps" in tables else None
    name, grid = (row[0], json.loads(row[1])) if row else (folder.name, None)
    compare = _compare(row[2]) if row else []
    runs = []
    for run_id, config, status, steps, dstep, final, error in db.execute(
            "SELECT run_id, config, status, steps, diverged_step, final, error FROM runs ORDER BY position"):
        runs.append(Run(run_id, _resolved(json.loads(config)), status, steps, dstep, json.loads(final or "{}"), error))
    by_id = {r.run_id: r for r in runs}
    layers: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for run_id, step, metric, value in db.execute("SELECT run_id, step, name, value FROM metrics ORDER BY step"):
        run = by_id.get(run_id)
        if run is None or value is None:
            continue
        if metric.startswith("probe/"):
            layers[(run_id, metric.rsplit("/", 1)[1], step)].append(value)
        else:
            run.series.setdefault(metric, []).append((step, value))
    for (run_id, probe, step), values in layers.items():
        by_id[run_id].probes.setdefault(probe, {})[step] = sum(values) / len(values)
    judge = outcome.Judge()
    for run in runs:  # a run trained to the end: did it learn?
        stored = run.series.pop("trivial_loss", None)
        losses = [v for _, v in run.series.get("eval_loss", [])]
        run.status, run.trivial_loss = judge(run.config, run.status, run.final.get("eval_loss"),
                                             min(losses) if losses else None, stored[0][1] if stored else None)
    return Sweep(folder, name, runs, _groups(runs, grid), compare)


def _compare(text: str) -> list[tuple[str, str]]:
    """The family pairs named by the stored sweep file's `compare:` (checked when the sweep was
    run, `sweeps.file`); none in a file without it or a store of `lorainit train`."""
    import yaml

    try:
        doc = yaml.safe_load(text or "")
    except yaml.YAMLError:
        return []
    pairs = doc.get("compare") if isinstance(doc, dict) else None
    return [families.check_pair(p, "the sweep file's compare") for p in pairs or []]


TASK_FIELDS = ("task", "data", "data_sha")  # together, what a group's runs were trained on


def task_name(config: dict) -> str:
    """A task as a reader knows it: its name, or a declared task's data and type ('trec (classification)')."""
    from lorainit.tasks import spec

    return spec.task_name(config["task"], config.get("data"))


def _groups(runs: list[Run], grid) -> list[Group]:
    """Runs grouped by task and by every other field that varies (the grid's axes, if recorded)."""
    if not runs:
        return []
    fields = sorted({k for r in runs for k in r.config})
    varying = [f for f in fields if f not in PICTURE and f not in TASK_FIELDS
               and len({json.dumps(r.config.get(f), sort_keys=True) for r in runs}) > 1]
    if grid is not None and isinstance(grid, dict):  # keep the grid's own order of axes first
        varying = [f for f in grid if f in varying] + [f for f in varying if f not in grid]
    out: dict[tuple, Group] = {}
    for run in runs:
        key = (*(json.dumps(run.config.get(f)) for f in TASK_FIELDS),
               *(json.dumps(run.config.get(f), sort_keys=True) for f in varying))
        if key not in out:
            out[key] = Group(run.config["task"], {f: _plain(run.config.get(f)) for f in varying}, [],
                             task_name(run.config))
        out[key].runs.append(run)
    return list(out.values())


def _resolved(config: dict) -> dict:
    """The config with fields added since it was stored at their defaults, as results.csv shows it
    (so that a store spanning versions does not split on a field one run lacks)."""
    from lorainit.config import RunConfig

    try:
        return RunConfig.from_dict(config).to_dict()
    except BadInput:  # a field this version does not know: the config as stored
        return config


def _plain(value):
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
