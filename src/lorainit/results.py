"""Run results as files a person (or a spreadsheet) can open: results.csv and metrics.csv.

`results.csv` has one row per run with the columns of DESIGN.md: `run_id`, every run field,
`status`, `diverged_step`, `final_<metric>`, `best_<metric>`, `final_eval_loss`, `steps`,
`seconds`. Files are written atomically (`files.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorainit.config import RunConfig
from lorainit.files import csv_text, write_text_atomic
from lorainit.train import RunResult


def result_row(res: RunResult, metric: str = "accuracy") -> dict:
    row = {"run_id": res.config.run_id()}
    for name, value in res.config.to_dict().items():
        row[name] = ",".join(value) if isinstance(value, list) else value
    row |= {"status": res.status, "diverged_step": res.diverged_step,
            f"final_{metric}": res.final.get(metric), f"best_{metric}": res.best.get(metric),
            "final_eval_loss": res.final.get("eval_loss"), "steps": res.steps, "seconds": round(res.seconds, 2)}
    return row


def results_csv(results: list[RunResult], metric: str = "accuracy") -> str:
    columns = ["run_id", *RunConfig.field_names(), "status", "diverged_step", f"final_{metric}",
               f"best_{metric}", "final_eval_loss", "steps", "seconds"]
    return csv_text([result_row(r, metric) for r in results], columns)


def metrics_csv(results: list[RunResult]) -> str:
    rows = [{"run_id": res.config.run_id(), "step": m["step"], "name": m["name"], "value": m["value"]}
            for res in results for m in res.metrics]
    return csv_text(rows, ("run_id", "step", "name", "value"))


def write_run_files(out: Path, results: list[RunResult]) -> None:
    """results.csv, metrics.csv and each run's resolved config under runs/<run_id>/config.json."""
    for res in results:
        write_text_atomic(out / "runs" / res.config.run_id() / "config.json",
                     json.dumps(res.config.to_dict(), indent=2) + "\n")
    write_text_atomic(out / "metrics.csv", metrics_csv(results))
    write_text_atomic(out / "results.csv", results_csv(results))
