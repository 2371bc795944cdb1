"""The run store of one sweep folder: SQLite (`store.sqlite`, WAL mode) and `results.csv`.

The sweep's driver writes the sweep, its runs and their statuses; it records a pack's results in
one transaction, so a kill leaves either all of a pack's results or none of them. A pack's worker
(a Ray task, the in-process loop) writes one table only: it appends its runs' metric rows as they
are made, through its own `MetricWriter` connection, so that a long run's history lives on disk,
not in memory or in its checkpoints. A Ray worker, which may run on another host, appends them
to a file in its pack's checkpoint folder instead (`RowFile`: SQLite's WAL needs every writer on
one host), and the driver moves them into the store when it records the pack.

Tables:
  sweeps     name, the base run and grid as given, the file's text, created/updated times
  runs       run_id (hash of the resolved config), its config, status (pending, running, done,
             diverged, failed: how training ended; whether a done run learned is worked out on
             reading, see `outcome`), pack, diverged_step, steps, seconds, final and best metrics, error
  metrics    (run_id, step, name) -> value: evaluations, training losses and probe rows
             (`probe/<layer>/<z_a_rms|lora_out_rms|a_norm|b_norm|net_out_rms>`)
  artifacts  (run_id, kind) -> path, e.g. the PEFT adapter folder
  packs      pack_id -> the ordered run ids trained together (a resumed pack keeps its runs)
  data       a data key (task, data_dir, declared spec without paths) -> the files its runs read,
             each with its sha256: a resume over changed files is refused (`driver`)
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from lorainit import tasks
from lorainit.config import RunConfig
from lorainit.errors import BadInput
from lorainit.files import csv_text, write_text_atomic
from lorainit.sweeps import outcome

FINISHED = ("done", "diverged", "failed")
STATUSES = ("pending", "running", *FINISHED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    name TEXT PRIMARY KEY, base TEXT NOT NULL, grid TEXT NOT NULL, file TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, sweep TEXT NOT NULL, position INTEGER NOT NULL, config TEXT NOT NULL,
    status TEXT NOT NULL, pack TEXT, diverged_step INTEGER, steps INTEGER, seconds REAL,
    final TEXT, best TEXT, error TEXT, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
    PRIMARY KEY (run_id, step, name));
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, PRIMARY KEY (run_id, kind));
CREATE TABLE IF NOT EXISTS packs (
    pack_id TEXT PRIMARY KEY, run_ids TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS data (
    key TEXT PRIMARY KEY, files TEXT NOT NULL);
"""


class Store:
    """The sweep folder's `store.sqlite`; `open()` creates it, `existing()` only reads one."""

    FILE = "store.sqlite"

    def __init__(self, folder: str | Path, create: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / self.FILE
        if not create and not self.path.is_file():
            raise BadInput(f"{self.folder}: no sweep store here ({self.FILE} not found)")
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise BadInput(f"{self.path}: not a usable sweep store ({err})") from None

    @classmethod
    def peek(cls, folder: str | Path) -> "Store | None":
        """The folder's store if it has one, else None; creates nothing."""
        return cls(folder, create=False) if (Path(folder) / cls.FILE).is_file() else None

    def close(self) -> None:
        self.db.close()

    def _tx(self):
        return _Transaction(self.db)

    # -- the sweep ------------------------------------------------------------------------------

    def sweep(self) -> dict | None:
        """The recorded sweep (name, base, grid, file), or None in a fresh store."""
        row = self.db.execute("SELECT name, base, grid, file FROM sweeps").fetchone()
        if row is None:
            return None
        return {"name": row[0], "base": json.loads(row[1]), "grid": json.loads(row[2]), "file": row[3]}

    def add_sweep(self, name: str, base: dict, grid: dict, text: str, runs: list[RunConfig]) -> int:
        """Record the sweep (or its new grid) and add its runs not yet here; return how many were new."""
        now = time.time()
        with self._tx():
            self.db.execute("INSERT INTO sweeps VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                            "grid = excluded.grid, file = excluded.file, updated = excluded.updated",
                            (name, json.dumps(base, sort_keys=True), json.dumps(grid), text, now, now))
            known = {r for (r,) in self.db.execute("SELECT run_id FROM runs")}
            position = self.db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM runs").fetchone()[0]
            new = 0
            for run in runs:
                if run.run_id() in known:
                    continue
                self.db.execute("INSERT INTO runs (run_id, sweep, position, config, status, updated) "
                                "VALUES (?, ?, ?, ?, 'pending', ?)",
                                (run.run_id(), name, position, json.dumps(run.to_dict()), now))
                known.add(run.run_id())
                position += 1
                new += 1
        return new

    def data(self) -> dict[str, dict]:
        """data key -> {role: {path, sha256}} of the files the sweep's runs read."""
        return {key: json.loads(files) for key, files in self.db.execute("SELECT key, files FROM data")}

    def record_data(self, records: dict[str, dict]) -> None:
        """Record (or, for files moved with their contents unchanged, update) the runs' data files."""
        with self._tx():
            self.db.executemany("INSERT OR REPLACE INTO data VALUES (?, ?)",
                                [(key, json.dumps(files, sort_keys=True)) for key, files in records.items()])

    # -- runs -----------------------------------------------------------------------------------

    def statuses(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT run_id, status FROM runs"))

    def runs(self, status: tuple[str, ...] | None = None) -> list[RunConfig]:
        """Runs in the order they were added, optionally only those with one of `status`."""
        rows = self.db.execute("SELECT config, status FROM runs ORDER BY position").fetchall()
        return [RunConfig.from_dict(json.loads(c)) for c, s in rows if status is None or s in status]

    def packs(self) -> dict[str, list[str]]:
        """Packs already started: pack_id -> its run ids, in stacking order."""
        return {p: json.loads(ids) for p, ids in self.db.execute("SELECT pack_id, run_ids FROM packs")}

    def start_pack(self, pack_id: str, run_ids: list[str]) -> None:
        """Mark a pack's runs running; remember the pack so that a resume trains them together again."""
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO packs VALUES (?, ?)", (pack_id, json.dumps(run_ids)))
            self.db.executemany("UPDATE runs SET status = 'running', pack = ?, updated = ? WHERE run_id = ?",
                                [(pack_id, time.time(), r) for r in run_ids])

    def record(self, results: list, rows: list[tuple[str, int, str, float]] | None = None) -> None:
        """Store finished runs (`lorainit.train.RunResult`s): status, metrics, artifacts. Replaces, never
        duplicates. `rows`: the runs' whole metric history from a `RowFile`, replacing what the store held."""
        now = time.time()
        with self._tx():
            if rows is not None:
                self._replace_metrics([r.config.run_id() for r in results], rows)
            for res in results:
                run_id = res.config.run_id()
                self.db.execute(
                    "UPDATE runs SET status = ?, diverged_step = ?, steps = ?, seconds = ?, final = ?, best = ?, "
                    "error = ?, updated = ? WHERE run_id = ?",
                    (res.status, res.diverged_step, res.steps, res.seconds, json.dumps(res.final),
                     json.dumps(res.best), res.error, now, run_id))
                if res.metrics:  # rows held on the result; a pack's worker streams its rows instead
                    self.db.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
                    self.db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
                                        [(run_id, m["step"], m["name"], m["value"]) for m in res.metrics])
                if res.adapter:
                    self.db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, 'adapter', ?)",
                                    (run_id, res.adapter))

    def replace_metrics(self, run_ids: list[str], rows: list[tuple[str, int, str, float]]) -> None:
        """Replace these runs' whole metric history with `rows`, in one transaction."""
        with self._tx():
            self._replace_metrics(run_ids, rows)

    def _replace_metrics(self, run_ids: list[str], rows: list[tuple[str, int, str, float]]) -> None:
        self.db.executemany("DELETE FROM metrics WHERE run_id = ?", [(r,) for r in run_ids])
        self.db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)", rows)

    def metrics(self, run_id: str) -> list[tuple[int, str, float]]:
        return self.db.execute("SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY step, name",
                               (run_id,)).fetchall()

    # -- results.csv ----------------------------------------------------------------------------

    def _tasks(self) -> list[str]:
        """The tasks of the store's runs, in the order runs were added."""
        seen: list[str] = []
        for (config,) in self.db.execute("SELECT config FROM runs ORDER BY position"):
            task = json.loads(config)["task"]
            if task not in seen:
                seen.append(task)
        return seen

    def result_columns(self) -> list[str]:
        """results.csv's columns: run_id, every run field, status, diverged_step, final_ and best_ of
        each metric of the runs' tasks (from the task registry), steps, seconds."""
        return ["run_id", *RunConfig.field_names(), "status", "diverged_step",
                *tasks.metric_columns(self._tasks()), "trivial_loss", "steps", "seconds"]

    def result_rows(self) -> list[dict]:
        """One row per finished run, in the order runs were added (see `result_columns`). A run
        that trained to the end shows whether it learned (`outcome`): done, did_not_learn or collapsed."""
        rows = []
        judge = outcome.Judge()
        query = ("SELECT run_id, config, status, diverged_step, final, best, steps, seconds FROM runs "
                 f"WHERE status IN ({', '.join('?' * len(FINISHED))}) ORDER BY position")
        for run_id, config, status, diverged_step, final, best, steps, seconds in self.db.execute(query, FINISHED):
            final, best = json.loads(final or "{}"), json.loads(best or "{}")
            config = RunConfig.from_dict(json.loads(config)).to_dict()  # fields added since: their defaults
            row = {"run_id": run_id}
            for name, value in config.items():
                row[name] = ",".join(value) if isinstance(value, list) else value
            stored = self.db.execute("SELECT value FROM metrics WHERE run_id = ? AND step = 0 AND name = ?",
                                     (run_id, "trivial_loss")).fetchone()
            shown, trivial_loss = judge(config, status, final.get("eval_loss"), best.get("eval_loss"),
                                        stored[0] if stored else None)
            row |= {"status": shown, "diverged_step": diverged_step}
            for metric in tasks.metrics(config["task"]) if config["task"] in tasks.names() else ():
                row |= {f"final_{metric.name}": final.get(metric.name), f"best_{metric.name}": best.get(metric.name)}
            row |= {"trivial_loss": trivial_loss, "steps": steps, "seconds": round(seconds or 0.0, 2)}
            rows.append(row)
        return rows

    def write_results_csv(self) -> list[dict]:
        """Write results.csv; returns its rows."""
        rows = self.result_rows()
        write_text_atomic(self.folder / "results.csv", csv_text(rows, self.result_columns()))
        return rows


class MetricWriter:
    """A pack's metric rows, written into the folder's store as they are made (a
    `lorainit.train.MetricSink`). Its own connection: the driver may read the store meanwhile."""

    def __init__(self, folder: str | Path):
        path = (Path(folder) / Store.FILE).resolve()
        # mode=rw: a wrong folder is an error, never a new empty store
        self.db = sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA synchronous=FULL")

    def write(self, rows: list[tuple[str, int, str, float]]) -> None:
        with _Transaction(self.db):
            self.db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)", rows)

    def truncate(self, run_ids: list[str], after_step: int) -> None:
        with _Transaction(self.db):
            self.db.executemany("DELETE FROM metrics WHERE run_id = ? AND step > ?",
                                [(r, after_step) for r in run_ids])

    def close(self) -> None:
        self.db.close()


class RowFile:
    """A pack's metric rows appended to `metrics.tsv` in its checkpoint folder (a
    `lorainit.train.MetricSink`), for a worker that may not share the driver's host. Each write is
    synced; a line cut short by a kill is ignored on reading, and a resume truncates the file to
    its checkpoint's step, so the file holds the pack's whole history exactly once."""

    NAME = "metrics.tsv"

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / self.NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None  # opened for appending at the first write

    @staticmethod
    def _lines(rows) -> str:
        return "".join(f"{run_id}\t{step}\t{name}\t{value!r}\n" for run_id, step, name, value in rows)

    def write(self, rows: list[tuple[str, int, str, float]]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(self._lines(rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def truncate(self, run_ids: list[str], after_step: int) -> None:
        self.close()  # the file is replaced: later writes append to the new one
        if self.path.exists():
            ids = set(run_ids)
            kept = [r for r in self.read(self.path) if not (r[0] in ids and r[1] > after_step)]
            write_text_atomic(self.path, self._lines(kept))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def read(path: str | Path) -> list[tuple[str, int, str, float]]:
        rows = []
        for line in Path(path).read_text(encoding="utf-8").splitlines(keepends=True):
            parts = line.rstrip("\n").split("\t")
            if not line.endswith("\n") or len(parts) != 4:
                continue  # the last line of a write a kill cut short
            rows.append((parts[0], int(parts[1]), parts[2], float(parts[3])))
        return rows


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on an exception: all of a change or none of it."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, tb):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
