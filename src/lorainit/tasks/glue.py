"""GLUE sentence(-pair) classification: SST-2, QNLI, MNLI, read from the official TSV layout.

The data folder is the GLUE root holding `SST-2/`, `QNLI/`, `MNLI/`. Columns are found by their
header names, so both the official files and trimmed copies with fewer columns load. Label ids
follow the Hugging Face `glue` dataset, so a model trained here reads the same ids there.

With no folder given (neither `data_dir` nor $LORAINIT_DATA), the rows come from the hub's
`nyu-mll/glue` parquet files instead (downloaded once into the hub cache; needs pyarrow, the
`hub` extra). The same rows, in the same order, as the official TSVs.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from lorainit import slices
from lorainit.errors import BadInput


@dataclass(frozen=True)
class GlueTask:
    name: str               # the task key used in run configs
    folder: str             # the task's folder under the GLUE root
    text_columns: tuple     # one column (single sentence) or two (a pair)
    label_column: str
    labels: tuple           # label strings in id order; for SST-2 the ids are the strings
    eval_split: str         # the validation file the paper reports
    hub_columns: tuple      # the text columns' names in the hub's parquet files
    hub_eval_split: str     # the hub's name for `eval_split`


TASKS = {
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), "label", ("0", "1"), "dev",
                     ("sentence",), "validation"),
    "qnli": GlueTask("qnli", "QNLI", ("question", "sentence"), "label",
                     ("entailment", "not_entailment"), "dev",
                     ("question", "sentence"), "validation"),
    "mnli": GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"), "dev_matched",
                     ("premise", "hypothesis"), "validation_matched"),
}


class DataError(BadInput):
    """A missing or malformed data file; the message names the file, row and column."""


@dataclass
class Examples:
    texts: list[tuple[str, ...]]  # one tuple of 1 or 2 strings per row
    labels: list[int]


HUB_DATASET = "nyu-mll/glue"


def glue_root(data_dir: str | None = None) -> Path | None:
    """The GLUE root: `data_dir`, else $LORAINIT_DATA/glue, else None (read from the hub)."""
    if data_dir:
        return Path(data_dir)
    env = os.environ.get("LORAINIT_DATA")
    if env:
        return Path(env) / "glue"
    return None


def hub_file(task: str, split: str) -> Path:
    """The hub's parquet file of `split` ('train' or 'eval'), downloaded once into the hub cache."""
    from huggingface_hub import hf_hub_download

    spec = TASKS[task]
    name = f"{task}/{'train' if split == 'train' else spec.hub_eval_split}-00000-of-00001.parquet"
    try:
        return Path(hf_hub_download(HUB_DATASET, name, repo_type="dataset"))
    except Exception as err:  # offline, unreachable, or not in the cache: all mean "give a folder"
        raise DataError(f"no data folder was given and {HUB_DATASET}:{name} could not be fetched from the hub "
                        f"({type(err).__name__}); pass data_dir (the GLUE root holding {spec.folder}/) or set "
                        "LORAINIT_DATA to a root holding glue/") from None


def files(task: str, data_dir: str | None = None) -> dict[str, Path]:
    """role ('train', 'eval') -> the file a GLUE task (or a slice of one) reads: the official TSV
    in its data folder, or the hub's parquet file (fetched into the hub cache)."""
    spec = spec_of(task)
    root = glue_root(slices.data_dir(task, data_dir))
    if root is None:
        return {split: hub_file(spec.name, split) for split in ("train", "eval")}
    return {"train": root / spec.folder / "train.tsv", "eval": root / spec.folder / f"{spec.eval_split}.tsv"}


def read_parquet(path: Path, task: str, max_rows: int | None = None) -> Examples:
    """The first `max_rows` rows of one of the hub's GLUE parquet files."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading GLUE from the hub needs pyarrow: pip install 'lorainit[hub]', "
                        "or pass data_dir (a GLUE folder of TSV files)") from None
    spec = TASKS[task]
    try:
        table = pq.read_table(path)
    except Exception as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    for col in (*spec.hub_columns, "label"):
        if col not in table.column_names:
            raise DataError(f"{path}: no column {col!r} (found {', '.join(table.column_names)})")
    if max_rows is not None:
        table = table.slice(0, max_rows)
    columns = [table.column(c).to_pylist() for c in spec.hub_columns]
    labels = table.column("label").to_pylist()
    for row_no, value in enumerate(labels, start=1):
        if not isinstance(value, int) or not 0 <= value < len(spec.labels):
            raise DataError(f"{path}: row {row_no}, column 'label': {value!r} is not a label id "
                            f"0..{len(spec.labels) - 1}")
    if not labels:
        raise DataError(f"{path}: no data rows")
    return Examples([tuple(t.strip() for t in row) for row in zip(*columns)], labels)


def spec_of(task: str) -> GlueTask:
    """The GLUE task `task` is, or is a shipped slice of (`sst2-slice` -> SST-2)."""
    if slices.base(task) not in TASKS:
        raise DataError(f"unknown GLUE task {task!r}; expected one of {', '.join(TASKS)}")
    return TASKS[slices.base(task)]


def read(task: str, split: str, data_dir: str | None = None, max_rows: int | None = None) -> Examples:
    """Read the first `max_rows` rows (file order) of `split` ('train' or 'eval') of a GLUE task
    (or of a slice of one shipped with lorainit, e.g. `sst2-slice`, from its own folder)."""
    spec = spec_of(task)
    root = glue_root(slices.data_dir(task, data_dir))
    if root is None:
        return read_parquet(hub_file(task, split), task, max_rows)
    fname = "train" if split == "train" else spec.eval_split
    path = root / spec.folder / f"{fname}.tsv"
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected the GLUE layout <root>/{spec.folder}/{fname}.tsv)")
    label_ids = {s: i for i, s in enumerate(spec.labels)}
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        # GLUE's TSVs are not quoted: a stray '"' is text, not a field delimiter.
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: file is empty")
        header = [h.strip() for h in header]
        for col in (*spec.text_columns, spec.label_column):
            if col not in header:
                raise DataError(f"{path}: header has no column {col!r} (found {', '.join(header)})")
        cols = [header.index(c) for c in spec.text_columns]
        lab = header.index(spec.label_column)
        for row_no, row in enumerate(reader, start=2):  # row 1 is the header
            if max_rows is not None and len(labels) >= max_rows:
                break
            if len(row) < len(header):
                raise DataError(f"{path}: row {row_no} has {len(row)} columns, the header has {len(header)}")
            value = row[lab].strip()
            if value not in label_ids:
                raise DataError(f"{path}: row {row_no}, column {spec.label_column!r}: label {value!r} "
                                f"is not one of {', '.join(spec.labels)}")
            texts.append(tuple(row[c].strip() for c in cols))
            labels.append(label_ids[value])
    if not labels:
        raise DataError(f"{path}: no data rows")
    return Examples(texts, labels)


def encode(examples: Examples, tokenizer, max_seq_len: int) -> tuple[list[list[int]], list[list[int]] | None]:
    """(input_ids, token_type_ids or None) per row, truncated to `max_seq_len`.

    Pairs truncate the longer side first."""
    if examples.texts and len(examples.texts[0]) == 2:
        firsts, seconds = zip(*examples.texts)
        enc = tokenizer(list(firsts), list(seconds), truncation=True, max_length=max_seq_len)
    else:
        enc = tokenizer([t[0] for t in examples.texts], truncation=True, max_length=max_seq_len)
    return enc["input_ids"], enc.get("token_type_ids")
