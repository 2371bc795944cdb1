"""The sweep driver: the store, the plan, the executor, and one progress display.

`run_sweep` checks everything before writing anything, records the sweep's runs in the folder's
store, plans the unfinished ones into packs (packs begun by an interrupted invocation keep their
runs, so their checkpoints apply), hands the packs to an executor and records each pack's results
as it finishes. The driver is the store's only writer. Running a finished sweep again does no work.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from lorainit import models, tasks
from lorainit.config import RunConfig
from lorainit.engine import checkpoint, families, precision, statistics
from lorainit.errors import BadInput
from lorainit.files import csv_text, write_text_atomic
from lorainit.sweeps import estimates, folder, worker
from lorainit.sweeps.file import Sweep
from lorainit.sweeps.plan import Pack, plan
from lorainit.sweeps.progress import Progress
from lorainit.sweeps.outcome import tally
from lorainit.sweeps.store import RowFile, Store
from lorainit.tasks import spec

EXECUTORS = ("local", "ray")


def _check_same_sweep(store: Store, sweep: Sweep) -> None:
    """Refuse a folder holding another sweep, or this sweep with a changed base."""
    recorded = store.sweep()
    if recorded is None:
        return
    if recorded["name"] != sweep.name:
        raise BadInput(f"{store.folder} holds sweep {recorded['name']!r}, not {sweep.name!r}; "
                       "use another --out folder")
    old, new = ({k.replace("-", "_"): v for k, v in base.items()} for base in (recorded["base"], sweep.base))
    changed = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    if changed:
        detail = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed)
        raise BadInput(f"{store.folder}: the sweep's base changed ({detail}); finished runs would no longer "
                       "match it. Restore the base, or start the changed sweep in another --out folder")


def data_key(run: RunConfig) -> str:
    """What selects a run's data: its task, data folder and declared spec (without paths)."""
    declared_spec = spec.identity(spec.loads(run.data)) if run.data is not None else None
    return json.dumps([run.task, run.data_dir, declared_spec], sort_keys=True)


def _data_records(runs: list[RunConfig], todo: list[RunConfig]) -> dict[str, dict]:
    """data key -> the files its runs read now, with their sha256 (`declared.data_record`). Data
    no unfinished run needs and that can no longer be read is left out (nothing will read it)."""
    from lorainit.tasks import declared

    needed = {data_key(r) for r in todo}
    records: dict[str, dict] = {}
    for run in runs:
        key = data_key(run)
        if key in records:
            continue
        try:
            records[key] = declared.data_record(run)
        except BadInput:
            if key in needed:
                raise
    return records


def _check_data_unchanged(store: Store, records: dict[str, dict]) -> None:
    """Refuse to continue a sweep whose runs would now read other data than its finished runs did:
    a file whose contents changed, or a task that now reads another file (a WikiText-2 folder that
    gained train.txt). A file moved with its contents unchanged is fine."""
    for key, before in store.data().items():
        now = records.get(key)
        if now is None:
            continue
        for role, old in before.items():
            new = now.get(role)
            if new is None:
                continue
            if new["sha256"] == old["sha256"]:
                continue
            if new["path"] != old["path"] and Path(old["path"]).name != Path(new["path"]).name:
                raise BadInput(f"{new['path']}: this sweep's {role} data was {old['path']} when it started; "
                               "its finished runs did not train on this file. Restore the folder as it was, or "
                               "start the sweep in another --out folder")
            raise BadInput(f"{new['path']}: changed since this sweep started (sha256 {old['sha256'][:12]}... -> "
                           f"{new['sha256'][:12]}...); restore it, or start the sweep in another --out folder")


def _preflight(runs: list[RunConfig], device: str, free: int | None = None) -> None:
    """Fail before writing anything: a model that cannot be found offline, a precision this device
    cannot run, a tokenizer with more tokens than the model's embeddings, a model the task cannot
    use (no head for it, or a decoder a pack does not serve exactly), a task's data missing or
    holding a label out of range, a target that matches no module of the model (checked on its
    skeleton, no weights loaded), a data init whose held-out rows training would reach, a single
    run that cannot fit."""
    from lorainit.engine.lora import check_targets

    for name in sorted({r.precision for r in runs}):
        precision.check(name, device)
    for spec in sorted({r.model for r in runs}):
        models.resolve(spec)
        models.check_vocabulary(spec)
    checked, built = set(), {}
    for run in runs:
        key = (run.model, run.task, run.data, run.data_sha)  # a classifier's outputs follow its labels
        if key not in built:
            built[key] = tasks.family(run.task).skeleton(run)
            tasks.family(run.task).check_model(run, built[key])
        if built[key] is not None:
            check_targets(built[key], run.targets)
        rows = (run.model, run.task, run.data_dir, run.data, run.data_sha, run.max_seq_len, run.max_train_samples,
                run.max_eval_samples)
        if rows not in checked:  # read, checked and tokenised into the cache
            checked.add(rows)
            tasks.family(run.task).check_data(run)
        if families.get(run.init).needs:  # rows held out of training for the init, where it asks
            statistics.check_rows(run, tasks.family(run.task).train_rows(run))
    _check_fits(runs, device, estimates.available_memory(device) if free is None else free)


def _check_fits(runs: list[RunConfig], device: str, free: int) -> None:
    """Refuse a run that alone would need more memory than the device has free (estimated at
    every row's full max_seq_len, without attention scores a fused kernel never stores: a
    refusal is sure, while a pass is no promise)."""
    shapes: dict[str, estimates.Shape | None] = {}
    for run in runs:
        shape = shapes.setdefault(run.model, estimates.model_shape(run.model))
        if shape is None:
            continue
        need = estimates.memory_per_pack(run, shape, 1, scores=False)
        if need > free:
            raise BadInput(f"run {run.run_id()} ({run.model}, batch_size {run.batch_size}, max_seq_len "
                           f"{run.max_seq_len}) needs about {need / 2**30:.1f} GiB, and {device} has "
                           f"{free / 2**30:.1f} GiB free; lower batch_size or max_seq_len, or set "
                           "gradient_checkpointing: true")


def describe_plan(sweep: Sweep, packs: list[Pack], pack_size: int, device: str,
                  finished: int) -> str:
    """The dry run's text: the runs, the packs, memory and time estimates per pack."""
    lines = [f"sweep {sweep.name!r}: {len(sweep.runs)} runs ({finished} finished), "
             f"{sum(len(p.runs) for p in packs)} to train in {len(packs)} pack{'s' if len(packs) != 1 else ''} "
             f"of at most {pack_size}", ""]
    axes = list(sweep.grid)
    lines.append("runs:")
    lines.append("  " + "  ".join(["run_id".ljust(12), *(a.ljust(10) for a in axes)]))
    for run in sweep.runs:
        lines.append("  " + "  ".join([run.run_id(), *(str(getattr(run, a.replace('-', '_'))).ljust(10)
                                                        for a in axes)]))
    lines += ["", "packs:"]
    flops = estimates.matmul_flops(device) if packs else 0.0
    efficiency = 0.6  # the share of the matmul peak a pack reaches (measured 0.6-0.75 on CPU)
    shapes: dict[str, estimates.Shape | None] = {}
    for i, pack in enumerate(packs, 1):
        run = pack.runs[0]
        shape = shapes.setdefault(run.model, estimates.model_shape(run.model))
        memory = estimates.memory_per_pack(run, shape, len(pack.runs)) if shape else None
        seconds = estimates.seconds_per_pack(pack, shape, flops * efficiency)
        mem = f"{memory / 2**30:.1f} GiB" if memory else "memory unknown (no model config offline)"
        eta = _duration(seconds) if seconds is not None else "time unknown (no local data)"
        seeds = sorted({r.seed for r in pack.runs})
        lines.append(f"  pack {i} ({pack.id}): {len(pack.runs)} run{'s' if len(pack.runs) > 1 else ''}, {run.model} on {spec.task_name(run.task, run.data)}, "
                     f"seed {','.join(map(str, seeds))}: ~{mem}, ~{eta} on {device}")
    lines.append("")
    lines.append(f"estimates: fp32 base + per-run LoRA, AdamW state and activations at max_seq_len; time at "
                 f"{efficiency:.0%} of this device's measured fp32 matmul rate ({flops / 1e9:.0f} GFLOP/s), "
                 "~4 characters per token")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"device {device} asked for, but CUDA is not available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise BadInput(f"device must be cpu or cuda[:N], got {device!r}")
    return device


def run_sweep(sweep: Sweep, out: str | Path, executor: str = "local", ray_address: str | None = None,
              device: str | None = None, dry_run: bool = False, show_progress: bool = True) -> int:
    """Run (or continue) `sweep` in folder `out`; return the CLI's exit code (1 if a run failed)."""
    out = Path(out)
    if executor not in EXECUTORS:
        raise BadInput(f"executor {executor!r}; allowed: {', '.join(EXECUTORS)}")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} exists and is not a folder")
    device = _device(device)
    # an existing folder is locked before its store is read; a new one once every check has passed
    locks = [folder.DriverLock(out)] if out.is_dir() and not dry_run else []
    try:
        return _run_sweep(sweep, out, executor, ray_address, device, dry_run, show_progress, locks)
    finally:
        for lock in locks:
            lock.release()
        if executor == "ray":
            from lorainit.sweeps import ray_executor  # imports Ray only to connect

            ray_executor.disconnect()  # a Ray instance started for this sweep


def _run_sweep(sweep: Sweep, out: Path, executor: str, ray_address: str | None, device: str, dry_run: bool,
               show_progress: bool, locks: list) -> int:
    existing = Store.peek(out)
    statuses: dict[str, str] = {}
    started: dict[str, list[str]] = {}
    if existing is not None:
        try:
            _check_same_sweep(existing, sweep)
            statuses, started = existing.statuses(), existing.packs()
        finally:
            existing.close()
    todo = [r for r in sweep.runs if statuses.get(r.run_id()) not in ("done", "diverged")]
    first = todo[0] if todo else sweep.runs[0]
    free = None  # bytes free where packs train: here, or on a Ray worker
    if executor == "ray" and todo and not dry_run:
        from lorainit.sweeps import ray_executor

        device, free = ray_executor.worker_device(ray_address)
    pack_size = sweep.pack_size or estimates.default_pack_size(first, device, estimates.model_shape(first.model),
                                                               free)
    packs = plan(todo, pack_size, started)
    finished = len(sweep.runs) - len(todo)
    if dry_run:
        print(describe_plan(sweep, packs, pack_size, device, finished))
        return 0
    records = _data_records(sweep.runs, todo)
    if existing is not None:
        existing = Store.peek(out)
        try:
            _check_data_unchanged(existing, records)
        finally:
            existing.close()
    if todo:
        _preflight(todo, device, free)

    out.mkdir(parents=True, exist_ok=True)
    if not locks:
        locks.append(folder.DriverLock(out))
        if existing is None and (made := Store.peek(out)) is not None:
            # another driver made this folder's store while this one checked: start again, locked
            made.close()
            return _run_sweep(sweep, out, executor, ray_address, device, dry_run, show_progress, locks)
    locks[0].announce()
    store = Store(out)
    try:
        new = store.add_sweep(sweep.name, sweep.base, sweep.grid, sweep.text, sweep.runs)
        store.record_data(records)
        kept = len(statuses) - len({r.run_id() for r in sweep.runs} & set(statuses))
        retried = sum(statuses.get(r.run_id()) == "failed" for r in todo)
        if existing is not None:
            notes = [f"{finished} runs already finished", f"{new} new"]
            if retried:
                notes.append(f"{retried} failed runs tried again")
            if kept:
                notes.append(f"{kept} runs no longer in the file are kept")
            print(f"continuing sweep {sweep.name!r} in {out}: " + ", ".join(notes), file=sys.stderr)
        _clear_finished_checkpoints(store, out)
        _rows_where_the_executor_writes(store, out, packs, executor)
        progress = Progress(len(todo), enabled=show_progress)
        if packs:
            progress.start(packs)
        try:
            def record(pack: Pack, outcome: dict) -> None:
                record_pack(store, out, pack, outcome, progress)

            if executor == "ray":
                from lorainit.sweeps.ray_executor import run_packs
            else:
                run_packs = _run_packs_here
            run_packs(packs, out, device, store, progress, record, ray_address=ray_address)
        finally:
            progress.close()
        shown = [row["status"] for row in _write_tables(store, out)]  # as results.csv has them: did each learn?
        print(f"sweep {sweep.name!r}: {tally(shown)} of {len(sweep.runs)}; wrote {out / 'results.csv'}",
              file=sys.stderr)
        return 1 if "failed" in shown else 0
    finally:
        store.close()


def record_pack(store: Store, out: Path, pack: Pack, outcome: dict, progress: Progress) -> None:
    """Store a finished pack's results (one transaction), refresh results.csv and metrics.csv, drop
    its checkpoints unless a run failed (a rerun resumes a failed pack from them). `outcome` is
    what `worker.train_pack` returned."""
    from lorainit.train import RunResult

    results = [RunResult.from_dict(d) for d in outcome["results"]]
    if outcome.get("resumed_at") is not None:
        print(f"pack {pack.id} resumed from its checkpoint at step {outcome['resumed_at']}", file=sys.stderr)
    row_file = folder.checkpoints(out, pack.id) / RowFile.NAME  # a Ray worker's rows
    store.record(results, RowFile.read(row_file) if row_file.exists() else None)
    _write_tables(store, out)
    if not any(res.status == "failed" for res in results):
        checkpoint.clear(folder.checkpoints(out, pack.id))
    for res in results:
        if res.status == "failed":
            print(f"run {res.config.run_id()} failed: {res.error}", file=sys.stderr)
    progress.finished(pack.id, [r.status for r in results])


def _rows_where_the_executor_writes(store: Store, out: Path, packs: list[Pack], executor: str) -> None:
    """Put each pack's metric history where this sweep's executor appends to it: a Ray worker to
    its pack's `RowFile`, the in-process executor to the store. A pack killed under one executor
    and resumed under the other has its rows on the other side; the worker then truncates them to
    its checkpoint's step and appends, as it would have under one executor."""
    for pack in packs:
        path = folder.checkpoints(out, pack.id) / RowFile.NAME
        if executor == "ray" and path.parent.is_dir() and not path.exists():
            rows = [(run_id, *row) for run_id in pack.run_ids for row in store.metrics(run_id)]
            if rows:
                sink = RowFile(path.parent)
                sink.write(rows)
                sink.close()
        elif executor != "ray" and path.exists():
            store.replace_metrics(pack.run_ids, RowFile.read(path))
            path.unlink()


def _run_packs_here(packs: list[Pack], out: Path, device: str, store: Store, progress: Progress, record,
                    **_) -> None:
    """The in-process executor: one pack after another."""
    for i, pack in enumerate(packs, 1):
        store.start_pack(pack.id, pack.run_ids)

        def on_step(trainer, losses, tok_s, pack=pack, i=i):
            finite = [v for v in losses.values() if math.isfinite(v)]  # the live runs' mean loss
            progress.step(pack.id, i, len(packs), trainer.step, trainer.total, tok_s,
                          sum(finite) / len(finite) if finite else None)

        def on_eval(trainer, i=i):
            progress.evaluating(i, len(packs), sum(trainer.alive), trainer.task.eval_size)

        record(pack, worker.train_pack([r.to_dict() for r in pack.runs], str(out), device, on_step, on_eval))


def _clear_finished_checkpoints(store: Store, out: Path) -> None:
    """Checkpoint folders of packs whose runs are all recorded done or diverged (a kill between the
    two steps); a pack with a failed run keeps its checkpoints, for the rerun to resume."""
    statuses = store.statuses()
    for pack_id, run_ids in store.packs().items():
        if all(statuses.get(r) in ("done", "diverged") for r in run_ids) and folder.checkpoints(out, pack_id).is_dir():
            shutil.rmtree(folder.checkpoints(out, pack_id), ignore_errors=True)


def _write_tables(store: Store, out: Path) -> list[dict]:
    """results.csv and metrics.csv from the store, each written atomically; returns results.csv's rows."""
    rows = store.write_results_csv()
    write_text_atomic(out / "metrics.csv", _metrics_csv(store))
    return rows


def _metrics_csv(store: Store) -> str:
    rows = [{"run_id": r, "step": s, "name": n, "value": v}
            for r, s, n, v in store.db.execute("SELECT run_id, step, name, value FROM metrics "
                                               "ORDER BY run_id, step, name")]
    return csv_text(rows, ("run_id", "step", "name", "value"))


def sweep_of_one(run: RunConfig, given: dict) -> Sweep:
    """`lorainit train`: a sweep of one run, its fields as the base."""
    import yaml

    text = yaml.safe_dump({"name": "train", "base": given, "grid": {}}, sort_keys=True)
    return Sweep("train", dict(given), {}, 1, [run], text)
