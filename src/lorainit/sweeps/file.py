"""A sweep file -> runs.

A sweep file (YAML) holds a base run and a grid; its runs are the grid's cross product laid over
the base, each validated and identified by the hash of its resolved config (`RunConfig.run_id`).
An axis other than `init` may instead map each value of the `init` axis to its own list (init
families' optimal lrs lie octaves apart, so each gets its own lr list): a run then takes its
init's list. Everything is checked before anything is written: a bad file raises `BadInput` naming
the key and what is allowed.

`compare:` names further pairs of init families for the report to judge, besides Init[A] against
every other family (`lorainit.report.families` says how a family is written).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lorainit import models
from lorainit.config import RunConfig
from lorainit.errors import BadInput
from lorainit.report import families

TOP_KEYS = ("name", "base", "grid", "pack_size", "compare")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Sweep:
    name: str
    base: dict              # the base run's fields as given
    grid: dict              # axis -> list of values, or init -> list of values, as given
    pack_size: int | None   # None: chosen from memory
    runs: list[RunConfig]   # the cross product, in grid order (last axis fastest)
    text: str               # the file as read
    compare: list[tuple[str, str]] = field(default_factory=list)  # extra family pairs for the report


def check_model(spec: str, where: str) -> None:
    """Accept an alias, an existing model folder, or a well-formed hub id; nothing is loaded."""
    if spec in models.ALIASES:
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        return
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise BadInput(f"{where}: model {spec!r} is not an alias ({', '.join(models.ALIASES)}), an existing "
                       "model folder, or a hub id such as FacebookAI/roberta-large")


def load(path: str | Path) -> Sweep:
    """Read and check a sweep file; every run is built and validated."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: sweep file not found")
    text = path.read_text(encoding="utf-8")
    return parse(text, str(path), default_name=path.stem, relative_to=path.resolve().parent)


def parse(text: str, where: str = "sweep", default_name: str = "sweep", relative_to: str | Path | None = None
          ) -> Sweep:
    """A sweep from its file's text; a task declared as data names its files relative to
    `relative_to` (the sweep file's folder; default the working folder)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInput(f"{where}: not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    if not isinstance(doc, dict):
        raise BadInput(f"{where}: a sweep file is a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise BadInput(f"{where}: unknown key {unknown[0]!r}; a sweep file has keys {', '.join(TOP_KEYS)}")
    name = doc.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise BadInput(f"{where}: name must be a non-empty string, got {name!r}")
    base = doc.get("base") or {}
    if not isinstance(base, dict):
        raise BadInput(f"{where}: base must be a mapping of run fields, got {type(base).__name__}")
    grid = doc.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise BadInput(f"{where}: grid is empty; give at least one axis, e.g. grid: {{lr: [1.0e-4, 4.0e-4]}}")
    fields = RunConfig.field_names()
    inits = _init_axis(grid)
    for axis, values in grid.items():
        if str(axis).replace("-", "_") not in fields:
            raise BadInput(f"{where}: grid: unknown run field {axis!r}; run fields are: {', '.join(fields)}")
        if isinstance(values, dict) and axis != inits:
            _check_per_init(axis, values, grid, inits, where)
            for init, own in values.items():
                _check_axis(f"{axis}.{init}", own, where)
        else:
            _check_axis(axis, values, where)
        if str(axis).replace("-", "_") in {k.replace("-", "_") for k in base}:
            raise BadInput(f"{where}: {axis} is both in base and a grid axis; keep it in one place")
    pack_size = doc.get("pack_size")
    if pack_size is not None and (isinstance(pack_size, bool) or not isinstance(pack_size, int) or pack_size < 1):
        raise BadInput(f"{where}: pack_size must be a whole number >= 1, got {pack_size!r}")
    RunConfig.from_dict(_base_with_first_axis_values(base, grid), where=f"{where}: base", relative_to=relative_to)
    runs = []
    for point in points(grid):
        label = ", ".join(f"{a}={v}" for a, v in point.items())
        run = RunConfig.from_dict(base | point, where=f"{where}: grid point ({label})", relative_to=relative_to)
        check_model(run.model, f"{where}: grid point ({label})" if "model" in point else f"{where}: base")
        runs.append(run)
    compare = doc.get("compare") or []
    if not isinstance(compare, list):
        raise BadInput(f"{where}: compare must be a list of pairs of init families, e.g. [[pissa, olora]]")
    pairs = [families.check_pair(pair, f"{where}: compare") for pair in compare]
    present = {families.key(run.to_dict()) for run in runs}
    for pair in pairs:
        missing = [x for x in pair if x not in present]
        if missing:
            said = (f"{missing[0]} is not an init family" if len(missing) == 1
                    else f"{' and '.join(missing)} are not init families")
            raise BadInput(f"{where}: compare: {said} of this sweep; its families: "
                           f"{', '.join(sorted(present, key=families.order))}")
    return Sweep(name.strip(), base, grid, pack_size, runs, text, pairs)


def points(grid: dict) -> list[dict]:
    """The grid's cross product in grid order, last axis fastest; an axis keyed by init takes, at
    each point, the list of that point's init."""
    inits = _init_axis(grid)
    out: list[dict] = [{}]
    for axis, values in grid.items():
        if isinstance(values, dict) and axis != inits:
            own = {str(init): v for init, v in values.items()}
            out = [point | {axis: v} for point in out for v in own[str(point[inits])]]
        else:
            out = [point | {axis: v} for point in out for v in values]
    return out


def _init_axis(grid: dict) -> str | None:
    """The grid's init axis as written (`init`), or None when init is not a grid axis."""
    return next((a for a in grid if str(a).replace("-", "_") == "init"), None)


def _check_axis(axis: str, values, where: str) -> None:
    if not isinstance(values, list) or not values:
        raise BadInput(f"{where}: grid: {axis} must be a non-empty list of values, got {values!r}")
    seen = [json.dumps(v, sort_keys=True) for v in values]
    dup = next((v for v, s in zip(values, seen) if seen.count(s) > 1), None)
    if dup is not None:
        raise BadInput(f"{where}: grid: {axis} lists {dup!r} more than once")


def _check_per_init(axis: str, values: dict, grid: dict, inits: str | None, where: str) -> None:
    """An axis keyed by init: after the init axis, with a list for exactly each of its values."""
    if inits is None:
        raise BadInput(f"{where}: grid: {axis} is keyed by init, but init is not a grid axis; make init one, "
                       f"e.g. init: [{', '.join(map(str, values))}], or give {axis} one list")
    if list(grid).index(axis) < list(grid).index(inits):
        raise BadInput(f"{where}: grid: {axis} is keyed by init, so init must come before it in the grid")
    given = [str(k) for k in values]
    wanted = [str(v) for v in grid[inits]]  # the init axis, already checked to be a list
    missing = [v for v in wanted if v not in given]
    extra = [k for k in given if k not in wanted]
    if missing or extra:
        said = [f"no list for {', '.join(missing)}"] if missing else []
        said += [f"a list for {', '.join(extra)}, which the init axis does not hold"] if extra else []
        raise BadInput(f"{where}: grid: {axis} is keyed by init and must give a list for exactly each of "
                       f"init's values ({', '.join(wanted)}): it has {' and '.join(said)}")


def _base_with_first_axis_values(base: dict, grid: dict) -> dict:
    """The base run completed by each axis's first value, so that its own fields are checked
    (with their key named) before any grid point is."""
    return base | points(grid)[0]
