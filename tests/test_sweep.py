"""Sweeps: files are checked before anything is written; a killed sweep resumes to the same numbers."""

import csv
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorainit import cli
from lorainit.sweeps import file, plan
from lorainit.sweeps.store import Store

TINY = """\
name: tiny
base:
  model: minilm
  task: sst2
  max_steps: 12
  max_train_samples: 64
  max_eval_samples: 32
  eval_every: 6
  checkpoint_every: 2
  batch_size: 4
grid:
  init: [a, b]
  lr: [1.0e-4, 2.0e-3]
pack_size: 3
"""


def _sweep_file(folder: Path, text: str = TINY, name: str = "tiny.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _command(file: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lorainit.cli", "sweep", str(file), "--out", str(out), "--quiet"]


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _metrics(out: Path) -> list[tuple]:
    db = sqlite3.connect(out / "store.sqlite")
    try:
        return db.execute("SELECT run_id, step, name, value FROM metrics ORDER BY run_id, step, name").fetchall()
    finally:
        db.close()


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, glue_data):
    """The tiny sweep run through without interruption, in a subprocess like the killed ones."""
    folder = tmp_path_factory.mktemp("reference")
    file = _sweep_file(folder)
    subprocess.run(_command(file, folder / "out"), check=True, capture_output=True)
    return folder / "out"


def _run_until(file: Path, out: Path, ready, timeout: float = 300) -> None:
    """Start the sweep, and SIGKILL it as soon as `ready()` holds."""
    proc = subprocess.Popen(_command(file, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _run_until_checkpoint(file: Path, out: Path, count: int, timeout: float = 300) -> None:
    """Start the sweep, and SIGKILL it once `count` checkpoint files have been written so far."""
    seen: set[str] = set()

    def ready() -> bool:
        seen.update(str(p) for p in out.glob("checkpoints/*/step-*.ckpt"))
        return len(seen) >= count

    _run_until(file, out, ready, timeout)


def test_the_plan_keeps_same_seed_runs_together_and_respects_pack_size(tmp_path):
    text = TINY.replace("lr: [1.0e-4, 2.0e-3]", "lr: [1.0e-4, 2.0e-3]\n  seed: [0, 1]")
    runs = file.parse(text).runs
    assert len(runs) == 8 and len({r.run_id() for r in runs}) == 8
    packs = plan.plan(runs, 3)
    assert [len(p.runs) for p in packs] == [3, 3, 2]
    assert [r.seed for p in packs for r in p.runs] == [0, 0, 0, 0, 1, 1, 1, 1]
    # a pack begun earlier keeps its runs, whatever the pack size is now
    begun = {packs[1].id: packs[1].run_ids}
    again = plan.plan(runs, 8, begun)
    assert again[0].run_ids == packs[1].run_ids and sum(len(p.runs) for p in again) == 8
    # runs that cannot share a model copy never share a pack
    mixed = file.parse(TINY.replace("lr: [1.0e-4, 2.0e-3]", "rank: [4, 8]")).runs
    assert all(len({r.rank for r in p.runs}) == 1 for p in plan.plan(mixed, 8))


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    file = _sweep_file(tmp_path)
    assert cli.main(["sweep", str(file), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "4 runs (0 finished), 4 to train in 2 packs of at most 3" in text
    assert "pack 1" in text and "pack 2" in text and "GiB" in text
    assert not (tmp_path / "out").exists()


def test_paper_config_dry_run_lists_66_runs_in_packs(capsys):
    root = Path(__file__).resolve().parents[1]
    assert cli.main(["sweep", str(root / "configs/paper/glue-sst2-roberta-large.yaml"), "--out",
                     "/nonexistent/never-written", "--dry-run", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "66 runs (0 finished), 66 to train in 3 packs" in text
    assert text.count("seed 0:") == 1 and text.count("seed 2:") == 1


def test_kill_at_any_moment_and_resume_gives_identical_results(tmp_path, reference):
    """SIGKILL three times (as the store appears, in the first pack, in the second), resume each time."""
    file = _sweep_file(tmp_path)
    out = tmp_path / "out"
    _run_until(file, out, lambda: (out / "store.sqlite").exists())  # the store made, no step trained
    _run_until_checkpoint(file, out, count=2)  # first pack, after its second checkpoint
    assert (out / "store.sqlite").exists() and not _rows_or_empty(out)
    _run_until_checkpoint(file, out, count=8)  # resumed; killed again further on
    subprocess.run(_command(file, out), check=True, capture_output=True)
    assert _without_seconds(_rows(out)) == _without_seconds(_rows(reference))
    # every loss, evaluation and probe value, bit for bit: the same computation on the same machine,
    # resumed from tensors saved whole, repeats its roundings exactly
    assert _metrics(out) == _metrics(reference)
    assert not (out / "checkpoints").exists()


def _rows_or_empty(out: Path) -> list[dict]:
    return _rows(out) if (out / "results.csv").exists() else []


def test_corrupt_checkpoint_falls_back_with_a_warning(tmp_path, reference):
    file = _sweep_file(tmp_path)
    out = tmp_path / "out"
    _run_until_checkpoint(file, out, count=3)
    files = sorted((out / "checkpoints").glob("*/step-*.ckpt"))
    # the newest two are kept, or three where the kill landed between a write and the pruning
    assert len(files) in (2, 3)
    newest = files[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    done = subprocess.run(_command(file, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"checkpoint {newest} is unusable (checksum mismatch" in done.stderr
    assert "using step" in done.stderr
    assert _without_seconds(_rows(out)) == _without_seconds(_rows(reference))
    assert _metrics(out) == _metrics(reference)

    # every checkpoint corrupt: the pack starts over, with the same result
    out2 = tmp_path / "out2"
    _run_until_checkpoint(file, out2, count=3)
    for path in (out2 / "checkpoints").glob("*/step-*.ckpt"):
        path.write_bytes(b"garbage")
    done = subprocess.run(_command(file, out2), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "starting the pack over" in done.stderr
    assert _metrics(out2) == _metrics(reference)


def test_running_twice_repeats_no_work_and_adds_new_grid_points(tmp_path, reference):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("store.sqlite", "results.csv"):
        (out / name).write_bytes((reference / name).read_bytes())
    file = _sweep_file(tmp_path)
    before = _metrics(out)
    assert cli.main(["sweep", str(file), "--out", str(out), "--quiet"]) == 0
    assert _metrics(out) == before and len(_rows(out)) == 4  # nothing trained, nothing doubled
    # a new learning rate adds two runs; the four finished ones are not trained again
    bigger = _sweep_file(tmp_path, TINY.replace("lr: [1.0e-4, 2.0e-3]", "lr: [1.0e-4, 2.0e-3, 5.0e-4]"))
    seconds = {r["run_id"]: r["seconds"] for r in _rows(out)}
    assert cli.main(["sweep", str(bigger), "--out", str(out), "--quiet"]) == 0
    rows = _rows(out)
    assert len(rows) == 6 and len({r["run_id"] for r in rows}) == 6
    assert all(r["seconds"] == seconds[r["run_id"]] for r in rows if r["run_id"] in seconds)
    assert {r["lr"] for r in rows} == {"0.0001", "0.002", "0.0005"}


def test_a_run_field_added_with_its_default_retrains_nothing(tmp_path, reference, monkeypatch, capsys):
    """A store written with today's fields; then a field is added with a default (here, by the test):
    the sweep resumes with every run id unchanged and nothing trained, and a grid over the new field
    plans only the runs that move it off its default."""
    import dataclasses

    from lorainit.config import RunConfig
    from lorainit.sweeps import worker

    Extended = dataclasses.make_dataclass("RunConfig", [("new_knob", "float", dataclasses.field(default=0.5))],
                                          bases=(RunConfig,), frozen=True)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("lorainit") and getattr(module, "RunConfig", None) is RunConfig:
            monkeypatch.setattr(module, "RunConfig", Extended)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(worker, "train_pack", no_training)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("store.sqlite", "results.csv"):
        (out / name).write_bytes((reference / name).read_bytes())
    assert cli.main(["sweep", str(_sweep_file(tmp_path)), "--out", str(out), "--quiet"]) == 0
    assert "4 runs already finished, 0 new" in capsys.readouterr().err
    rows = _rows(out)
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in _rows(reference)]
    assert {r["new_knob"] for r in rows} == {"0.5"}  # the new field's column, at its default
    assert _metrics(out) == _metrics(reference)
    grown = _sweep_file(tmp_path, TINY.replace("lr: [1.0e-4, 2.0e-3]", "lr: [1.0e-4, 2.0e-3]\n  new_knob: [0.5, 0.75]"),
                        "grown.yaml")
    assert cli.main(["sweep", str(grown), "--out", str(out), "--dry-run"]) == 0
    assert "8 runs (4 finished), 4 to train" in capsys.readouterr().out


BAD_FILES = {
    "not yaml": ("base: [unclosed", r"not valid YAML at line 1"),
    "not a mapping": ("- 1\n- 2\n", r"a sweep file is a mapping"),
    "unknown top-level key": (TINY + "epochs: 3\n", r"unknown key 'epochs'; a sweep file has keys name, base, grid"),
    "unknown run field": (TINY.replace("  task: sst2", "  task: sst2\n  learning_rate: 0.1"),
                          r"base: unknown key 'learning_rate'; run fields are: model, task"),
    "wrong type": (TINY.replace("max_steps: 12", "max_steps: twelve"), r"max_steps"),
    "empty grid": (TINY.split("grid:")[0] + "grid: {}\n", r"grid is empty"),
    "empty grid axis": (TINY.replace("init: [a, b]", "init: []"), r"grid: init must be a non-empty list"),
    "unknown grid axis": (TINY.replace("init: [a, b]", "inits: [a, b]"), r"grid: unknown run field 'inits'"),
    "unknown task": (TINY.replace("task: sst2", "task: cola"), r"task is 'cola'; allowed: sst2, qnli, mnli"),
    "unknown model": (TINY.replace("model: minilm", "model: ./no/such/model"),
                      r"model './no/such/model' is not an alias \(minilm, smollm2-135m\)"),
    "unknown init": (TINY.replace("init: [a, b]", "init: [a, c]"), r"init is 'c'; expected one of a, b, ab, "),
    "impossible value": (TINY.replace("batch_size: 4", "batch_size: 4\n  dropout: 1.5"),
                         r"dropout must be in \[0, 1\), got 1.5"),
    "negative learning rate": (TINY.replace("lr: [1.0e-4, 2.0e-3]", "lr: [1.0e-4, -1.0]"),
                               r"lr must be a positive number, got -1.0"),
    "repeated grid value": (TINY.replace("lr: [1.0e-4, 2.0e-3]", "lr: [1.0e-4, 1.0e-4]"),
                            r"grid: lr lists 0.0001 more than once"),
    "bad pack size": (TINY.replace("pack_size: 3", "pack_size: 0"), r"pack_size must be a whole number >= 1"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_sweep_files_exit_2_and_leave_the_store_untouched(kind, tmp_path, reference, capsys):
    import re

    text, message = BAD_FILES[kind]
    file = _sweep_file(tmp_path, text)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("store.sqlite", "results.csv"):
        (out / name).write_bytes((reference / name).read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["sweep", str(file), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorainit: error: ") and "\n" not in err and "Traceback" not in err
    assert re.search(message, err), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # into a fresh folder, nothing is created
    assert cli.main(["sweep", str(file), "--out", str(tmp_path / "fresh"), "--quiet"]) == 2
    assert not (tmp_path / "fresh").exists()


def test_a_changed_base_is_refused_and_another_sweep_name_too(tmp_path, reference, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "store.sqlite").write_bytes((reference / "store.sqlite").read_bytes())
    before = (out / "store.sqlite").read_bytes()
    changed = _sweep_file(tmp_path, TINY.replace("max_steps: 12", "max_steps: 20"))
    assert cli.main(["sweep", str(changed), "--out", str(out), "--quiet"]) == 2
    assert "the sweep's base changed (max_steps: 12 -> 20)" in capsys.readouterr().err
    renamed = _sweep_file(tmp_path, TINY.replace("name: tiny", "name: other"))
    assert cli.main(["sweep", str(renamed), "--out", str(out), "--quiet"]) == 2
    assert "holds sweep 'tiny', not 'other'" in capsys.readouterr().err
    assert (out / "store.sqlite").read_bytes() == before


def test_results_csv_has_one_row_per_run_and_the_store_its_tables(reference):
    rows = _rows(reference)
    assert len(rows) == 4 and len({r["run_id"] for r in rows}) == 4
    assert {r["status"] for r in rows} == {"done"}
    for r in rows:
        assert 0.0 <= float(r["final_accuracy"]) <= 1.0 and r["steps"] == "12"
        assert (reference / "adapters" / r["run_id"] / "adapter_config.json").exists()
    store = Store(reference, create=False)
    try:
        names = {n for _, n, _ in store.metrics(rows[0]["run_id"])}
        assert {"train_loss", "accuracy", "eval_loss"} <= names
        assert any(n.startswith("probe/") and n.endswith("/z_a_rms") for n in names)
        tables = {t for (t,) in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"sweeps", "runs", "metrics", "artifacts", "packs"} <= tables
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0] == 4
    finally:
        store.close()


def test_train_is_a_sweep_of_one_run(tmp_path, glue_data):
    out = tmp_path / "one"
    args = ["train", "--out", str(out), "--max_steps", "3", "--max-train-samples", "16",
            "--max_eval_samples", "8", "--init", "b", "--quiet"]
    assert cli.main(args) == 0
    rows = _rows(out)
    assert len(rows) == 1 and rows[0]["init"] == "b" and rows[0]["status"] == "done"
    assert (out / "store.sqlite").exists() and (out / "adapters" / rows[0]["run_id"]).is_dir()
    assert cli.main(args) == 0 and len(_rows(out)) == 1  # again: nothing new
    assert cli.main([*args[:-1], "--lr", "3e-4", "--quiet"]) == 2  # other fields, same folder: refused


def _bad_labels(tmp_path: Path) -> str:
    """A GLUE folder whose SST-2 training rows hold a label outside 0..1, on row 6."""
    import os

    real = Path(os.environ["LORAINIT_DATA"]) / "glue" / "SST-2"
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "dev.tsv").write_bytes((real / "dev.tsv").read_bytes())
    head = (real / "train.tsv").read_text().splitlines()[:5]
    (folder / "train.tsv").write_text("\n".join(head + ["a row with a stray label\t7"]) + "\n")
    return str(tmp_path / "glue")


# inputs that only the model, the data or the device can refuse: each is found before anything is written
BAD_INPUTS = {
    "target matching no module": (lambda tmp: TINY.replace("  task: sst2", "  task: sst2\n  targets: [qery]"),
                                  r"target module\(s\) 'qery' match no linear layer of BertForSequenceClassification"),
    "data file missing": (lambda tmp: TINY.replace("  task: sst2", f"  task: sst2\n  data_dir: {tmp / 'none'}"),
                          r"SST-2/train.tsv: file not found"),
    "label out of range": (lambda tmp: TINY.replace("  task: sst2", f"  task: sst2\n  data_dir: {_bad_labels(tmp)}"),
                           r"row 6, column 'label': label '7' is not one of 0, 1"),
    "hub id not available offline": (lambda tmp: TINY.replace("model: minilm", "model: no-such-org/no-such-model"),
                                     r"not in the local hub cache while HF_HUB_OFFLINE is set"),
    "a run that cannot fit": (lambda tmp: TINY.replace("batch_size: 4", "batch_size: 1000000"),
                              r"needs about \d+\.\d GiB, and cpu has \d+\.\d GiB free"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_models_data_and_devices_exit_2_before_any_write(kind, tmp_path, reference, capsys):
    import re

    make, message = BAD_INPUTS[kind]
    file = _sweep_file(tmp_path, make(tmp_path))
    fresh = tmp_path / "fresh"
    assert cli.main(["sweep", str(file), "--out", str(fresh), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorainit: error: ") and "\n" not in err and "Traceback" not in err
    assert re.search(message, err), err
    assert not fresh.exists()  # no folder, no store


def _wait_for(ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ready():
        time.sleep(0.02)
    assert ready(), "timed out"


def test_a_second_driver_on_the_folder_exits_2_naming_the_first(tmp_path, reference, capsys):
    file = _sweep_file(tmp_path)
    out = tmp_path / "out"
    first = subprocess.Popen(_command(file, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (out / "driver.lock").exists() and list(out.glob("checkpoints/*/step-*.ckpt")))
        assert cli.main(["sweep", str(file), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"in use by another sweep driver (pid {first.pid} on " in err and ", since 20" in err
        assert first.poll() is None  # the first goes on, undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed driver's lock went with it: the folder resumes at once
    done = subprocess.run(_command(file, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from its checkpoint" in done.stderr
    assert _metrics(out) == _metrics(reference)


def test_a_failed_pack_keeps_its_checkpoints_and_the_rerun_resumes_it(tmp_path, reference, monkeypatch, capsys):
    from lorainit.train import PackTrainer

    file = _sweep_file(tmp_path)
    out = tmp_path / "out"
    real_step = PackTrainer.train_step

    def failing(self, log):
        if self.step == 7:  # after the checkpoint of step 6
            raise RuntimeError("CUDA out of memory (as a long run might meet it)")
        return real_step(self, log)

    monkeypatch.setattr(PackTrainer, "train_step", failing)
    assert cli.main(["sweep", str(file), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "failed: RuntimeError: CUDA out of memory" in err
    kept = sorted(p.name for p in out.glob("checkpoints/*/step-*.ckpt"))  # two packs, the newest two each
    assert kept == ["step-000000004.ckpt"] * 2 + ["step-000000006.ckpt"] * 2
    # the failed runs' rows up to the failure are kept, for a look at what happened
    assert {s for _, s, n, _ in _metrics(out) if n == "train_loss"} == set(range(1, 8))
    monkeypatch.setattr(PackTrainer, "train_step", real_step)
    assert cli.main(["sweep", str(file), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("resumed from its checkpoint at step 6") == 2
    assert _without_seconds(_rows(out)) == _without_seconds(_rows(reference))
    assert _metrics(out) == _metrics(reference)
    assert not (out / "checkpoints").exists()


def test_a_checkpoint_that_passes_its_checksum_but_cannot_be_read_stops_the_pack(tmp_path, reference, capsys):
    import hashlib

    from lorainit.engine import checkpoint

    file = _sweep_file(tmp_path)
    out = tmp_path / "out"
    _run_until_checkpoint(file, out, count=2)
    newest = sorted(out.glob("checkpoints/*/step-*.ckpt"))[-1]
    payload = b"not a torch file, written whole"
    newest.write_bytes(checkpoint.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    assert cli.main(["sweep", str(file), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {newest} passed its checksum but could not be read" in err
    assert newest.exists()  # kept, for a person to look at; never silently restarted from step 0


def test_where_a_folder_cannot_be_locked_a_file_in_it_is(tmp_path, monkeypatch):
    """NFS refuses `flock` on a folder opened for reading (EBADF): the lock falls back to a file."""
    import errno
    import fcntl
    import os
    import stat as st

    from lorainit.errors import BadInput
    from lorainit.sweeps.folder import DriverLock

    real = fcntl.flock

    def like_nfs(fd, operation):
        if st.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", like_nfs)
    first = DriverLock(tmp_path)
    assert (tmp_path / DriverLock.FALLBACK).is_file()
    with pytest.raises(BadInput, match="in use by another sweep driver"):
        DriverLock(tmp_path)
    first.release()
    DriverLock(tmp_path).release()  # free again once released


def test_a_row_file_ignores_a_line_cut_short_and_truncates_to_a_resume(tmp_path):
    from lorainit.sweeps.store import RowFile

    rows = RowFile(tmp_path)
    rows.write([("a", 1, "train_loss", 0.5), ("a", 2, "train_loss", float("nan")), ("b", 2, "accuracy", 1 / 3)])
    with open(rows.path, "a") as f:
        f.write("a\t3\ttrain_lo")  # a kill in the middle of a write
    assert RowFile.read(rows.path)[2] == ("b", 2, "accuracy", 1 / 3)  # values round-trip exactly
    assert len(RowFile.read(rows.path)) == 3
    rows.truncate(["a"], after_step=1)  # run a resumes from step 1; run b is not in this pack
    assert RowFile.read(rows.path) == [("a", 1, "train_loss", 0.5), ("b", 2, "accuracy", 1 / 3)]


def test_a_pack_resumed_under_the_other_executor_finds_its_history_where_it_appends(tmp_path):
    """A Ray worker appends its rows to the pack's row file, the in-process executor to the store:
    a pack killed under one and resumed under the other gets its history moved across first."""
    from lorainit.config import RunConfig
    from lorainit.sweeps import driver, folder
    from lorainit.sweeps.plan import Pack
    from lorainit.sweeps.store import RowFile, Store

    pack = Pack([RunConfig.from_dict({"lr": lr, "max_steps": 4}) for lr in (1e-3, 2e-3)])
    a, b = pack.run_ids
    store = Store(tmp_path)
    row_file = folder.checkpoints(tmp_path, pack.id) / RowFile.NAME
    history = [(a, 1, "train_loss", 0.5), (b, 1, "train_loss", 0.25), (a, 2, "train_loss", 0.125)]
    written = RowFile(row_file.parent)  # killed under Ray: the rows are in its file only
    written.write(history)
    written.close()
    driver._rows_where_the_executor_writes(store, tmp_path, [pack], "local")
    assert store.metrics(a) == [(1, "train_loss", 0.5), (2, "train_loss", 0.125)]
    assert store.metrics(b) == [(1, "train_loss", 0.25)]
    assert not row_file.exists()  # never read again over the store's newer rows
    driver._rows_where_the_executor_writes(store, tmp_path, [pack], "ray")  # killed in-process; now Ray
    assert sorted(RowFile.read(row_file)) == sorted(history)
    driver._rows_where_the_executor_writes(store, tmp_path, [pack], "ray")  # its own file: left alone
    assert sorted(RowFile.read(row_file)) == sorted(history)
    other = Pack([RunConfig.from_dict({"lr": 3e-3, "max_steps": 4})])  # no checkpoint folder: nothing to resume
    driver._rows_where_the_executor_writes(store, tmp_path, [other], "ray")
    assert not folder.checkpoints(tmp_path, other.id).exists()
    store.close()


def test_a_checkpoint_of_another_format_is_skipped_not_misread(tmp_path):
    import hashlib
    import warnings

    from lorainit.engine import checkpoint

    payload = b"whatever an older version wrote"
    old = tmp_path / "step-000000002.ckpt"
    old.write_bytes(b"LORAINIT-CHECKPOINT 1 " + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert checkpoint.load_latest(tmp_path) is None
    assert "written by another version of lorainit" in str(caught[0].message)
    assert "starting the pack over" in str(caught[0].message)
