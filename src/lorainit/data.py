"""A task's rows, tokenised once, and each run's own order over them.

Each run draws its data order from its own 'data' stream (one shuffle per epoch), so runs that
share a seed see the same batches, in a pack or alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorainit import rng
from lorainit.config import RunConfig
from lorainit.errors import BadInput
from lorainit.tasks import glue


@dataclass
class Split:
    ids: list[list[int]]                 # token ids per row
    type_ids: list[list[int]] | None     # token type ids per row (BERT pairs), or None
    labels: torch.Tensor                 # (rows,)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Rows collated and right-padded to their own longest row."""
        return glue.collate([self.ids[i] for i in rows], pad_id,
                            [self.type_ids[i] for i in rows] if self.type_ids is not None else None)


@dataclass
class TaskData:
    train: Split
    eval: Split
    num_labels: int
    metric: str  # the task's metric name, e.g. "accuracy"


def load_task(run: RunConfig, tokenizer) -> TaskData:
    """Read and tokenise the task's training and evaluation rows for `run`."""
    if run.task not in glue.TASKS:
        raise BadInput(f"task {run.task!r} is not a classification task this trainer runs yet "
                       f"(supported: {', '.join(glue.TASKS)})")
    splits = []
    for split, limit in (("train", run.max_train_samples), ("eval", run.max_eval_samples)):
        ex = glue.read(run.task, split, run.data_dir, max_rows=limit)
        ids, type_ids = glue.encode(ex, tokenizer, run.max_seq_len)
        splits.append(Split(ids, type_ids, torch.tensor(ex.labels)))
    return TaskData(splits[0], splits[1], len(glue.TASKS[run.task].labels), "accuracy")


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Batches per pass over the rows; the last one may be short (as a DataLoader keeps it)."""
    return math.ceil(rows / batch_size)


def total_steps(run: RunConfig, rows: int) -> int:
    """max_steps when given, else epochs x batches per epoch (rounded up)."""
    if run.max_steps is not None:
        return run.max_steps
    return math.ceil(run.epochs * steps_per_epoch(rows, run.batch_size))


class DataOrder:
    """A run's batches: row indices per step, reshuffled every epoch from its seed."""

    def __init__(self, seed: int, rows: int, batch_size: int):
        self.seed, self.rows, self.batch_size = seed, rows, batch_size
        self.per_epoch = steps_per_epoch(rows, batch_size)
        self._epoch, self._order = -1, None

    def rows_at(self, step: int) -> list[int]:
        """Row indices of 0-based optimiser step `step`."""
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._order = torch.randperm(self.rows, generator=rng.generator(self.seed, "data", epoch))
            self._epoch = epoch
        return self._order[k * self.batch_size:(k + 1) * self.batch_size].tolist()
