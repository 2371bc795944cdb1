"""The task registry: every task name, the family that trains it, and its metrics.

This is the one list of task names. Run validation, the planner, the dry run's estimates, the
store and `results.csv` all read it. A family is a `tasks.base.Task` subclass, named here by
"module:Class" and imported only when a pack needs it, so that reading the registry stays cheap.

    tasks.names()          -> ('sst2', 'qnli', 'mnli', 'gsm8k', 'wikitext2', 'sst2-slice', ...)
    tasks.get('sst2')      -> TaskInfo(name='sst2', family='lorainit.tasks.classification:Classification', ...)
    tasks.family('sst2')   -> the Classification class
    tasks.register(...)    -> add a task (and its family) at run time

Two entries take their data from the run instead of naming it: `classification` and `sft`, the
families a sweep file declares as a mapping (`task: {type: classification, train: ..., ...}`, see
`tasks.spec`). The built-in tasks are presets of those two families: the same encoding, training
and evaluation, with rows read from their official layouts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from lorainit import slices
from lorainit.errors import BadInput
from lorainit.tasks import glue


@dataclass(frozen=True)
class Metric:
    """A number a task reports per run, and which way is better."""

    name: str                 # the column suffix in results.csv: final_<name>, best_<name>
    higher_is_better: bool

    @property
    def label(self) -> str:
        """The name with its direction, for axes and tables: 'accuracy ↑', 'eval_loss ↓'."""
        return f"{self.name} {'↑' if self.higher_is_better else '↓'}"

    def better(self, value: float, than: float | None) -> bool:
        """Whether `value` beats `than` (None: nothing to beat yet)."""
        if than is None:
            return True
        return value > than if self.higher_is_better else value < than


ACCURACY = Metric("accuracy", higher_is_better=True)
EVAL_LOSS = Metric("eval_loss", higher_is_better=False)
PERPLEXITY = Metric("perplexity", higher_is_better=False)
EXACT_MATCH = Metric("exact_match", higher_is_better=True)
MACRO_F1 = Metric("macro_f1", higher_is_better=True)


@dataclass(frozen=True)
class TaskInfo:
    name: str                      # the run field `task`
    family: str | type             # its Task family: a class, or "module:Class" imported when needed
    metrics: tuple[Metric, ...]    # what its evaluation reports per run; the first is the headline
    default_targets: tuple[str, ...] | None = None  # LoRA targets of a run that names none (None: the field's)
    takes_data: bool = False       # its rows are declared by the run (the `data` field), not named by it


_REGISTRY: dict[str, TaskInfo] = {}


def register(name: str, family: str | type, metrics: tuple[Metric, ...],
             default_targets: tuple[str, ...] | None = None, takes_data: bool = False) -> TaskInfo:
    """Add task `name`, trained by `family`, reporting `metrics`; returns its entry."""
    if not metrics:
        raise ValueError(f"task {name!r} needs at least one metric")
    info = TaskInfo(name, family, tuple(metrics), default_targets, takes_data)
    _REGISTRY[name] = info
    return info


def unregister(name: str) -> None:
    """Remove task `name` (a task registered at run time, e.g. by a test)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered task name, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> TaskInfo:
    """The registry entry of `name`; BadInput listing the known tasks if there is none."""
    if name not in _REGISTRY:
        raise BadInput(f"unknown task {name!r}; tasks are: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def family(name: str):
    """The Task class that trains `name` (its module imported on first use)."""
    found = get(name).family
    if isinstance(found, str):
        module, _, attr = found.partition(":")
        found = getattr(importlib.import_module(module), attr)
    return found


def metrics(name: str) -> tuple[Metric, ...]:
    return get(name).metrics


def metric_columns(task_names) -> list[str]:
    """results.csv's metric columns for runs of these tasks: final_ and best_ per metric, each once."""
    columns: list[str] = []
    for name in task_names:
        for metric in metrics(name) if name in _REGISTRY else ():
            for column in (f"final_{metric.name}", f"best_{metric.name}"):
                if column not in columns:
                    columns.append(column)
    return columns


# GLUE sentence(-pair) classification: accuracy on the validation split, and its loss.
for _name in glue.TASKS:
    register(_name, "lorainit.tasks.classification:Classification", (ACCURACY, EVAL_LOSS))
# Causal language modelling on decoder LLMs, whose attention projections are q_proj ... o_proj.
register("gsm8k", "lorainit.tasks.causal_lm:CausalLM", (EXACT_MATCH, EVAL_LOSS), ("q_proj", "v_proj"))
register("wikitext2", "lorainit.tasks.causal_lm:CausalLM", (PERPLEXITY, EVAL_LOSS), ("q_proj", "v_proj"))
# The slices lorainit ships (lorainit.slices): each a task of its own name, trained and scored as
# the task it is cut from, reading its rows from the package.
for _name in slices.SLICES:
    _full = get(slices.base(_name))
    register(_name, _full.family, _full.metrics, _full.default_targets)
# The two families a run declares its own data for (`tasks.spec`): any text classification, and
# supervised finetuning of a decoder on text, prompt/completion, instruction or chat rows.
register("classification", "lorainit.tasks.classification:Classification", (ACCURACY, MACRO_F1, EVAL_LOSS),
         takes_data=True)
register("sft", "lorainit.tasks.causal_lm:CausalLM", (EVAL_LOSS, PERPLEXITY, EXACT_MATCH), ("q_proj", "v_proj"),
         takes_data=True)
