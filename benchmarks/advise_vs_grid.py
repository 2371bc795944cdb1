"""`lorainit advise` against the full grid it replaces, on the settings of `advise_settings.py`.

For each setting, the full grid (every family x lr x seed at the target length) is run as a sweep,
and `advise` is run on the same base, families, lr grid, seeds and target length with a budget of a
third of the full grid's run-steps. From the full grid, per family: the optimal bracket, the lrs
whose cell is within seed noise of the best cell by the report's rule (every seed learned, and not
every seed of the best beats every seed of it). Then:

- each family's lr from advise against that bracket, in grid steps (0: inside it);
- advise's recommended family against the full grid's best family (and those within seed noise of it);
- the compute of each: run-steps, training tokens, and training time as the packs' seconds summed.

advise's settings (ETA, KEEP, MIN_STEPS, the budget of a third) were fixed before any comparison;
`sst2` was run only for this table, after `advise` was built on the others.

    .venv/bin/python benchmarks/advise_vs_grid.py --out /tmp/advbench [--only trec,code,sst2]

Both sweeps resume: a second call with the same --out trains only what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _common import cpu_model, set_environment


def grid_cells(folder: Path, metric_name: str) -> dict[str, list]:
    from lorainit.report.findings import cells_of
    from lorainit.report.sweep import load

    sweep = load(folder)
    (group,) = sweep.groups
    return cells_of(group, metric_name)


def bracket(cells: list, higher: bool) -> tuple[float | None, list[float]]:
    """The best lr of a family's full-grid cells and its optimal bracket (within seed noise of it)."""
    sign = 1 if higher else -1
    learned = [c for c in cells if c.complete]
    if not learned:
        return None, []
    best = max(learned, key=lambda c: (sign * statistics.fmean(c.values), -c.lr))
    top = [sign * v for v in best.values]
    inside = [c.lr for c in learned if not min(top) > max(sign * v for v in c.values)]
    return best.lr, sorted(inside)


def steps_off(lr: float | None, inside: list[float], grid: list[float]) -> int | None:
    if lr is None or not inside:
        return None
    i = grid.index(lr)
    return min(abs(i - grid.index(x)) for x in inside)


def pack_seconds(folder: Path) -> float:
    from lorainit.advise import _seconds

    return _seconds(folder)


def compare(name: str, setting: dict, out: Path) -> dict:
    import yaml  # noqa: F401

    from lorainit import advise, tasks
    from lorainit.config import RunConfig
    from lorainit.sweeps import driver, file
    from advise_settings import grid_file

    grid_path = out / f"{name}-grid.yaml"
    grid_path.write_text(grid_file(name, setting))
    t0 = time.perf_counter()
    driver.run_sweep(file.load(grid_path), out / f"{name}-grid", show_progress=False)
    grid_wall = time.perf_counter() - t0
    settings = advise.Settings(base=dict(setting["base"]), families=tuple(setting["families"]),
                               lrs=tuple(setting["lrs"]), seeds=tuple(setting["seeds"]),
                               target_steps=setting["steps"], name=name)
    settings.budget = settings.full_grid // 3
    t0 = time.perf_counter()
    result = advise.advise(settings, out / f"{name}-advise", show_progress=False)
    advise_wall = time.perf_counter() - t0
    run = RunConfig.from_dict(setting["base"] | {"max_steps": setting["steps"]})
    metric = tasks.metrics(run.task)[0]
    cells = grid_cells(out / f"{name}-grid", metric.name)
    grid = list(setting["lrs"])
    rows, best_family, best_mean = [], None, None
    sign = 1 if metric.higher_is_better else -1
    for family in settings.families:
        best, inside = bracket(cells.get(family, []), metric.higher_is_better)
        choice = result.choices[family]
        off = steps_off(choice.lr, inside, grid)
        cell = next((c for c in cells.get(family, []) if c.lr == best), None)
        rows.append({"family": family, "grid_best": best, "bracket": inside, "advise": choice.lr,
                     "horizon": choice.steps, "steps_off": off,
                     "grid_values": cell.values if cell else [], "advise_values": choice.values})
        if cell is not None and (best_mean is None or sign * cell.mean > sign * best_mean):
            best_family, best_mean = family, cell.mean
    # families within seed noise of the full grid's best family, at their best cells
    top = next(r for r in rows if r["family"] == best_family) if best_family else None
    close = [r["family"] for r in rows if top and r["grid_values"]
             and not min(sign * v for v in top["grid_values"]) > max(sign * v for v in r["grid_values"])]
    return {"name": name, "metric": metric.name, "rows": rows, "grid_best_family": best_family,
            "grid_close_families": close, "advise_family": result.best.family if result.best else None,
            "advise_run_steps": result.spent, "grid_run_steps": settings.full_grid,
            "advise_tokens": result.tokens, "grid_tokens": result.full_tokens,
            "advise_seconds": sum(pack_seconds(out / f"{name}-advise" / f"stage-{i}")
                                  for i in range(1, len(result.kept) + 1)),
            "grid_seconds": pack_seconds(out / f"{name}-grid"), "advise_wall": advise_wall, "grid_wall": grid_wall,
            "stages": [s.steps for s in result.stages], "target": setting["steps"]}


def table(result: dict) -> str:
    def lr(x):
        return "-" if x is None else f"{x:.3g}"

    lines = [f"### {result['name']} ({result['metric']}; target {result['target']} steps; advise's stages at "
             f"{', '.join(map(str, result['stages']))} steps)", "",
             "| family | full grid: best lr | optimal bracket | advise: lr (at steps) | grid steps off |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        bracket_text = ", ".join(lr(x) for x in r["bracket"]) or "-"
        off = "-" if r["steps_off"] is None else str(r["steps_off"])
        lines.append(f"| {r['family']} | {lr(r['grid_best'])} | {bracket_text} | {lr(r['advise'])} "
                     f"(at {r['horizon']}) | {off} |")
    hit = result["advise_family"] in result["grid_close_families"]
    lines += ["", f"recommended family: advise {result['advise_family']}, full grid {result['grid_best_family']} "
                  f"(within seed noise of it: {', '.join(result['grid_close_families'])}): "
                  f"{'inside' if hit else 'outside'}",
              f"compute: advise {result['advise_run_steps']:,} run-steps, full grid {result['grid_run_steps']:,} "
              f"({result['advise_run_steps'] / result['grid_run_steps']:.1%}); training tokens "
              + (f"{result['advise_tokens']:,} against {result['grid_tokens']:,} "
                 f"({result['advise_tokens'] / result['grid_tokens']:.1%})" if result.get("grid_tokens")
                 else "not known for this task")
              + "; training time (packs' seconds) "
              f"{result['advise_seconds'] / 60:.1f} min against {result['grid_seconds'] / 60:.1f} min "
              f"({result['advise_seconds'] / max(result['grid_seconds'], 1e-9):.0%})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the sweeps (resumed when it exists)")
    parser.add_argument("--only", default=None, help="comma-separated settings (default: all)")
    args = parser.parse_args()
    set_environment()
    from advise_settings import settings

    chosen = settings(os.environ["LORAINIT_DATA"])
    names = args.only.split(",") if args.only else list(chosen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}", file=sys.stderr)
    results = [compare(name, chosen[name], out) for name in names]
    (out / f"advise_vs_grid_{'_'.join(names)}.json").write_text(json.dumps(results, indent=1))
    print(f"CPU: {cpu_model()}\n")
    for result in results:
        print(table(result))


if __name__ == "__main__":
    main()
