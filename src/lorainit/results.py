"""Run results as files a person (or a spreadsheet) can open: results.csv and metrics.csv.

`results.csv` has one row per run with the columns of DESIGN.md: `run_id`, every run field,
`status`, `diverged_step`, `final_<metric>`, `best_<metric>`, `final_eval_loss`, `steps`,
`seconds`. Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from lorainit.config import RunConfig
from lorainit.train import RunResult


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def result_row(res: RunResult, metric: str = "accuracy") -> dict:
    row = {"run_id": res.config.run_id()}
    for name, value in res.config.to_dict().items():
        row[name] = ",".join(value) if isinstance(value, list) else value
    row |= {"status": res.status, "diverged_step": res.diverged_step,
            f"final_{metric}": res.final.get(metric), f"best_{metric}": res.best.get(metric),
            "final_eval_loss": res.final.get("eval_loss"), "steps": res.steps, "seconds": round(res.seconds, 2)}
    return row


def results_csv(results: list[RunResult], metric: str = "accuracy") -> str:
    rows = [result_row(r, metric) for r in results]
    columns = ["run_id", *RunConfig.field_names(), "status", "diverged_step", f"final_{metric}",
               f"best_{metric}", "final_eval_loss", "steps", "seconds"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def metrics_csv(results: list[RunResult]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run_id", "step", "name", "value"])
    for res in results:
        rid = res.config.run_id()
        for row in res.metrics:
            writer.writerow([rid, row["step"], row["name"], row["value"]])
    return buf.getvalue()


def write_run_files(out: Path, results: list[RunResult]) -> None:
    """results.csv, metrics.csv and each run's resolved config under runs/<run_id>/config.json."""
    for res in results:
        write_atomic(out / "runs" / res.config.run_id() / "config.json",
                     json.dumps(res.config.to_dict(), indent=2) + "\n")
    write_atomic(out / "metrics.csv", metrics_csv(results))
    write_atomic(out / "results.csv", results_csv(results))
