"""Each run's order over its training rows, and how many steps a schedule has.

Each run draws its data order from its own 'data' stream (one shuffle per epoch), so runs that
share a seed see the same batches, in a pack or alone. The rows themselves belong to the task.
"""

from __future__ import annotations

import math

import torch

from lorainit.engine import rng


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Batches per pass over the rows; the last one may be short (as a DataLoader keeps it)."""
    return math.ceil(rows / batch_size)


def total_steps(rows: int, batch_size: int, epochs: float | None = None, max_steps: int | None = None) -> int:
    """max_steps when given, else epochs x batches per epoch (rounded up)."""
    if max_steps is not None:
        return max_steps
    if epochs is None:
        raise ValueError("give epochs or max_steps")
    return math.ceil(epochs * steps_per_epoch(rows, batch_size))


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


def tokens_read(lengths: list[int], seed: int, batch_size: int, steps: int) -> int:
    """The real tokens a run of `seed` trains on in its first `steps` steps, given each training
    row's token count: the rows its data order gives, step by step, their lengths summed. Runs of
    one seed read the same rows, so they read the same tokens."""
    order = DataOrder(seed, len(lengths), batch_size)
    return sum(lengths[i] for step in range(steps) for i in order.rows_at(step))
