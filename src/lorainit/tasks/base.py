"""What a task family gives the pack trainer.

The trainer (`lorainit.train`) holds what every task shares: the pack, the active runs,
divergence, the optimiser and loss scaling, probes, checkpoints and metric rows. A family holds
everything that depends on the task: which model it needs, how its rows are read and encoded, how
a run's micro-batch is built and how the runs' batches are stacked, each run's loss, and how a pack
is evaluated. A pack's batch is stacked adapter-major: rows [k*b, (k+1)*b) belong to the k-th
active run.

The loss is returned per run as a *sum* over the rows or tokens that count, with their *count*.
The trainer divides, so that each run's mean (and gradient) is exactly what it would be alone,
whatever its pack-mates hold: a run's count never includes another run's rows, or its padding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from lorainit import models, tasks
from lorainit.errors import BadInput
from lorainit.tasks import Metric


@dataclass
class Losses:
    """One forward's loss, per active run in stacking order."""

    sums: torch.Tensor    # (n,) loss summed over the rows or tokens that count
    counts: torch.Tensor  # (n,) how many rows or tokens counted

    def means(self) -> torch.Tensor:
        return self.sums / self.counts.to(self.sums.dtype)


@dataclass(frozen=True)
class Forward:
    """What the trainer tells a task about one training forward."""

    runs: list[int]        # the active runs, in stacking order
    probing: bool          # probes record at this step: every token's features must be computed
    shared_rows: bool      # every active run holds the same rows under one dropout stream


class Task(ABC):
    """One task family's side of a pack. A subclass is registered in `lorainit.tasks`.

    Built once per pack from the pack's shared run fields (`run`: any run of the pack), it loads
    the model and tokenizer (`self.model`, `self.tokenizer`) and reads the rows.
    """

    metrics: tuple[Metric, ...]  # set from the registry entry of the pack's task
    # parameter names the pretrained checkpoint lacks (drawn at load): the pack draws them per run
    fresh_weights: tuple[str, ...] = ()

    def __init__(self, run, model_overrides: dict | None = None):
        self.run = run
        self.metrics = tasks.metrics(run.task)

    @staticmethod
    def load_model(run, kind: str, model_overrides: dict | None = None, **kwargs):
        """(model, tokenizer, fresh parameter names) for the run: the frozen base in the dtype its
        `precision` asks for (`engine.precision`), whatever the checkpoint declares; a `dtype`
        among `model_overrides` (reference tests) wins."""
        from lorainit.engine import precision

        overrides = dict(model_overrides or {})
        dtype = overrides.pop("dtype", precision.base_dtype(run.precision))
        return models.load_with_fresh(run.model, kind, dtype=dtype, **kwargs, **overrides)

    # -- data --------------------------------------------------------------------------------

    @property
    def train_size(self) -> int:
        """Training examples: a run's data order shuffles these indices (by default `len(self.train)`)."""
        return len(self.train)

    @property
    def eval_size(self) -> int:
        """Evaluation examples, for progress and reports (by default `len(self.eval)`)."""
        return len(self.eval)

    @abstractmethod
    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """One run's micro-batch of training rows (indices into the training examples)."""

    @abstractmethod
    def stack(self, batches: list[dict[str, torch.Tensor]], device) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The active runs' batches stacked adapter-major on `device`, and each one's own length
        (the padded length it would have alone, along which its dropout masks are drawn)."""

    @abstractmethod
    def token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rows, T) bool: the real tokens of a stacked batch (probes read them; throughput counts them)."""

    def label_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rows, T) bool: the tokens whose labels count (EVA's `label_mask` reads the layer inputs
        there). By default the real tokens: a family whose labels are per token says which count."""
        return self.token_mask(batch)

    # -- training and evaluation -------------------------------------------------------------

    @abstractmethod
    def loss(self, state, batch: dict[str, torch.Tensor], forward: Forward) -> Losses:
        """Each active run's summed loss and count on a stacked batch; `state` is the pack's
        `engine.packing.PackState` (its `.pack.model` the packed model), set to this batch."""

    @abstractmethod
    def evaluate(self, state, runs: list[int]) -> list[dict[str, float]]:
        """Every metric of each of `runs` (stacking order) on the evaluation rows. The trainer has
        set the model to eval mode and the pack's active runs; the task forwards as it needs."""

    def trivial_losses(self, state, runs: list[int]) -> list[float | None]:
        """Each of `runs`' trivial loss, the eval loss a run must beat to have learned
        (`lorainit.sweeps.outcome`), taken at step 0. By default the run's own eval loss as its model
        is now, before any update; a family that can say it without a model (classification: the
        label prior's) overrides this. The trainer has set the model to eval mode and the runs.
        None for each run of a task that reports no `eval_loss`: whether its runs learned is then
        not judged."""
        if "eval_loss" not in {m.name for m in self.metrics}:
            return [None] * len(runs)
        return [m["eval_loss"] for m in self.evaluate(state, runs)]

    @classmethod
    def trivial_loss_of(cls, run) -> float | None:
        """The trivial loss of `run` from its data alone, for a store written before it was
        recorded; None where it needs the model (a decoder's step-0 loss) or the data is not here."""
        return None

    def checkpoint_base(self, state) -> None:
        """Recompute the frozen base's layers in the backward instead of keeping their activations
        (the run field `gradient_checkpointing`). Every dropout draw is replayed in the recompute,
        so the numbers do not change. By default, transformers' own layer checkpointing."""
        model = state.pack.model
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise BadInput(f"gradient_checkpointing: {type(model).__name__} does not support it")
        kwargs = {"use_reentrant": False, "context_fn": state.checkpoint_contexts}
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        state.checkpointing = True

    # -- checks before anything is written, and estimates ------------------------------------

    @classmethod
    def check_data(cls, run) -> None:
        """Raise BadInput if the run's data cannot be read (called before a sweep writes anything)."""

    @classmethod
    def train_rows(cls, run) -> int | None:
        """How many training rows the run reads, after `check_data` (from its cache); None where the
        family cannot say without loading the model."""
        lengths = cls.train_lengths(run)
        return None if lengths is None else len(lengths)

    @classmethod
    def train_lengths(cls, run) -> list[int] | None:
        """Each training row's real tokens (what `token_mask` counts of it in a batch), after
        `check_data` (from its cache); None where the family cannot say without loading the model."""
        return None

    @classmethod
    def data_files(cls, run) -> dict[str, str]:
        """role ('train', 'eval') -> each file the run reads, for its data fingerprint
        (`tasks.declared.data_record`); a family that reads files says which."""
        return {}

    @classmethod
    def check_model(cls, run, skeleton) -> None:
        """Raise BadInput if the family cannot serve the run's model (its skeleton, or None where
        none could be built); called before a sweep writes anything."""

    @classmethod
    def skeleton(cls, run):
        """The run's model built without weights (on the meta device), for checks of its module
        names before anything is loaded or written; None when the family cannot build one
        cheaply (then targets are checked when the pack loads the model)."""
        return None

    @classmethod
    def data_size(cls, run, split: str) -> tuple[int, float] | None:
        """(rows, mean tokens per row) of 'train' or 'eval' for estimates, or None if unknown
        without reading much (the hub, say)."""
        return None


CUDA_EVAL_SCALE = 16  # a GPU's evaluation forwards hold this many times a CPU's tokens


def eval_budget(cpu_tokens: int, device) -> int:
    """Tokens per evaluation forward on `device`: `cpu_tokens` on a CPU, where a few thousand keep
    the matmuls efficient and in cache; CUDA_EVAL_SCALE times that on a GPU, which needs large
    forwards to be busy (4,096 tokens over a 22-run pack would be one row of each run)."""
    return cpu_tokens * (CUDA_EVAL_SCALE if torch.device(device).type == "cuda" else 1)


def token_chunks(order: list[int], lengths, runs: int, budget: int) -> list[list[int]]:
    """Consecutive indices of `order` (sorted by length, shortest first) grouped so that runs x rows
    x the chunk's longest row stays near `budget` tokens: large matmuls, bounded memory."""
    chunks, current = [], []
    for i in order:
        if current and runs * (len(current) + 1) * lengths[i] > budget:
            chunks.append(current)
            current = []
        current.append(i)
    return chunks + ([current] if current else [])


class OnDevice(dict):
    """A batch's tensors on the device, keeping the host tensors they were copied from (`host`),
    so that a forward works out its token layout (which slots are real, which count) on the host
    and never waits on the device for it.

    On CUDA the host tensors are pinned and copied asynchronously: a blocking copy would wait for
    every kernel queued before it (the previous step's backward), where this one is queued behind
    them. The pinned tensors stay alive in `host` until the batch is dropped."""

    def __init__(self, host: dict[str, torch.Tensor], device):
        if torch.device(device).type == "cuda":
            host = {key: t.pin_memory() for key, t in host.items()}
        super().__init__({key: t.to(device, non_blocking=True) for key, t in host.items()})
        self.host = host


def host_tensor(batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """batch[key] on the host: the copy an `OnDevice` batch keeps, else read from the device."""
    host = getattr(batch, "host", None)
    return host[key] if host is not None and key in host else batch[key].to("cpu")


def stack_padded(batches: list[dict[str, torch.Tensor]], pad_values: dict[str, int], device
                 ) -> tuple[OnDevice, list[int]]:
    """Right-pad every (rows, T) tensor of each batch to the longest T, with `pad_values[key]`
    (0 for keys not named), and concatenate; (rows,) tensors are concatenated as they are.
    Returns the stacked batch on `device` and each batch's own T (its `input_ids` width)."""
    lengths = [b["input_ids"].shape[1] for b in batches]
    width = max(lengths)
    out = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if parts[0].dim() >= 2:
            value = pad_values.get(key, 0)
            parts = [F.pad(p, (0, width - p.shape[1]), value=value) for p in parts]
        out[key] = torch.cat(parts)
    return OnDevice(out, device), lengths
