"""What the two data-declared families share: reading a spec's splits, and tokenising them once.

`splits` reads a spec's training and evaluation tables (local files or a hub dataset): the
evaluation split is its own file, or a held-out share of the training file cut by `split_seed`,
never by a run's seed, so that runs of every seed share one evaluation set (and a pack). An
evaluation file identical to the training file is refused; evaluation rows that also occur in
training are counted in a warning.

`encoded` tokenises a run's rows once per (data contents, spec, tokenizer, max_seq_len, row
limits) and keeps them under `$LORAINIT_CACHE/data/<key>.json`, written atomically: the sweep's
checks build it before anything is written, and every pack, resume and worker then reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from lorainit import models
from lorainit.tasks import readers, spec as specs, userdata
from lorainit.tasks.glue import DataError

CACHE_FORMAT = 1  # bump when what `encoded` stores changes


def table(spec: dict, role: str, max_rows: int | None = None) -> readers.Table:
    """The `role` ('train' or 'eval') table a spec names: a local file, or a hub dataset's split."""
    if "hub" in spec:
        return readers.hub_table(spec["hub"], spec[role], spec.get("config"), spec.get("revision"), max_rows=max_rows)
    return readers.read_table(spec[role], spec.get("file_type"), max_rows=max_rows)


def subset(t: readers.Table, index: list[int]) -> readers.Table:
    """The rows `index` of a table (its file's name and hash kept)."""
    return dataclasses.replace(t, rows=[t.rows[i] for i in index], lines=[t.lines[i] for i in index])


def splits(spec: dict, max_train: int | None, max_eval: int | None) -> tuple[readers.Table, readers.Table]:
    """(training, evaluation) tables of a spec, each cut to its first `max_*` rows (file order; the
    held-out cut is made on the whole file first, so it does not move with the limits)."""
    if "eval_fraction" in spec:
        whole = table(spec, "train")
        try:
            kept, held = userdata.held_out(len(whole.rows), spec["eval_fraction"], spec.get("split_seed", 0))
        except DataError as err:
            raise DataError(f"{whole.where}: {err}") from None
        train, evaluation = subset(whole, kept), subset(whole, held)
    else:
        train, evaluation = table(spec, "train"), table(spec, "eval")
        if userdata.identical(train, evaluation):
            raise DataError(f"{evaluation.where}: the evaluation file is identical to the training file "
                            f"{train.where}; give a held-out file, or eval_fraction")
    if max_train is not None:
        train = subset(train, list(range(min(max_train, len(train.rows)))))
    if max_eval is not None:
        evaluation = subset(evaluation, list(range(min(max_eval, len(evaluation.rows)))))
    return train, evaluation


def warn_overlap(train_keys: list[str], eval_keys: list[str], where: str) -> None:
    """The warning when evaluation rows also occur in training (same content)."""
    shared = userdata.overlap(train_keys, eval_keys)
    if shared:
        note(f"warning: {where}: {shared} of {len(eval_keys)} evaluation rows ({shared / len(eval_keys):.1%}) also "
             "occur in the training rows; evaluation metrics will read high. Deduplicate them")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides a tokenizer's ids: its serialised state, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.all_special_tokens, tokenizer.pad_token, tokenizer.eos_token,
                        getattr(tokenizer, "chat_template", None), type(tokenizer).__name__], default=str)
    return hashlib.sha256((state + extra).encode()).hexdigest()[:16]


def data_record(run) -> dict[str, dict[str, str]]:
    """role -> {path, sha256} of each file the run reads (a hub dataset's split as `hub:` its id):
    what a sweep stores of a run's data, and compares on every resume."""
    from lorainit import tasks

    if run.data is not None and "hub" in specs.loads(run.data):
        spec = specs.loads(run.data)
        roles = [r for r in specs.PATH_KEYS if r in spec]
        return {r: {"path": f"hub:{spec['hub']}/{spec.get('config', 'default')}/{spec[r]}",
                    "sha256": table(spec, r).sha256} for r in roles}
    record = {}
    for role, path in tasks.family(run.task).data_files(run).items():
        if not Path(path).is_file():
            raise DataError(f"{path}: file not found (the {role} data of task {run.task})")
        record[role] = {"path": str(path), "sha256": specs.sha256_file(path)}
    return record


def cache_key(run, tokenizer, family: str) -> str:
    """The key of a run's tokenised rows: everything they depend on, and nothing else."""
    fields = {"format": CACHE_FORMAT, "family": family, "task": run.task, "data_dir": run.data_dir,
              "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_len": run.max_seq_len,
              "max_train_samples": run.max_train_samples, "max_eval_samples": run.max_eval_samples}
    if run.data is not None:  # the files' contents, not where they are
        fields["data"] = specs.dumps(specs.identity(specs.loads(run.data)))
        fields["data_sha"] = run.data_sha
    else:
        fields["files"] = {role: f["sha256"] for role, f in data_record(run).items()}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


_NOTES: list[str] = []  # what the build being made has to say (drops, cuts, overlaps)


def note(message: str) -> None:
    """A line for the user about the rows being encoded, kept with them and shown by `encoded(say=True)`."""
    _NOTES.append(message)


def cache_folder() -> Path:
    """Where tokenised rows are kept: `data/` in the model cache ($LORAINIT_CACHE)."""
    return models.cache_dir() / "data"


def encoded(run, tokenizer, family: str, build, say: bool = False) -> dict:
    """The run's tokenised rows: read from the cache, else `build()` (a JSON-able dict) stored there.
    With `say`, the notes made while building them (rows dropped or cut, evaluation rows also in
    training) are printed, from the cache too: every check of the data shows them."""
    path = cache_folder() / f"{cache_key(run, tokenizer, family)}.json"
    rows = None
    if path.is_file():
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            rows = None  # a damaged entry is rebuilt
    if rows is None:
        _NOTES.clear()
        try:
            rows = build() | {"notes": list(_NOTES)}
        finally:
            _NOTES.clear()
        _store(path, rows)
    if say:
        for line in rows.get("notes", []):
            print(line, file=sys.stderr)
    return rows


def _store(path: Path, rows: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(rows, f, separators=(",", ":"))
        os.replace(tmp, path)  # atomic: a reader sees the whole entry or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_unchanged(run) -> None:
    """Refuse to train a declared task on files whose contents changed since the run was keyed."""
    if run.data is None or run.data_sha is None:
        return
    spec = specs.loads(run.data)
    now = specs.fingerprint(spec)
    if now != run.data_sha:
        files = ", ".join(specs.files(spec).values()) or spec.get("hub", "")
        raise DataError(f"{files}: the data changed since this run was declared (fingerprint {run.data_sha} -> "
                        f"{now}); restore it, or declare the sweep again in a new folder")


def check(run, encode) -> None:
    """A family's `check_data`: the data unchanged since the run was keyed, every row read, checked and
    tokenised by `encode(run, tokenizer, say=True)` into the cache, its notes shown."""
    check_unchanged(run)
    encode(run, models.tokenizer(run.model), say=True)


def files_of(run, preset) -> dict[str, str]:
    """A family's `data_files`: a declared spec's files, else those `preset()` names (role -> path)."""
    if run.data is not None:
        return specs.files(specs.loads(run.data))
    return {role: str(path) for role, path in preset().items()}


def split_for_estimate(run, split: str) -> readers.Table | None:
    """The declared table a run reads for `split` ('train' or 'eval'), for the dry run's estimates;
    None where it cannot be read (an estimate is never an error)."""
    try:
        found = splits(specs.loads(run.data), run.max_train_samples, run.max_eval_samples)
    except DataError:
        return None
    return found[0 if split == "train" else 1]
