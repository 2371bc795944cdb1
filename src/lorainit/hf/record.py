"""A Trainer run as a lorainit store keeps a run, so that `lorainit report` reads it as a sweep's.

The run's fields are those the report groups and compares on, named as a `RunConfig`'s where one
exists (model, task, init, init_args, init_variance, lr, seed, rank, alpha, rslora, dropout,
targets, batch_size: rows per optimiser step, max_steps), then the Trainer's own (gradient
accumulation, warmup steps, scheduler, weight decay, clipping, optimiser, precision) and
`metrics`: the directions (name -> higher is better) of the metrics the task registry does not
give. Its id is a hash of them. `RunFolder` writes it into a folder's store through the store's
own methods (`sweeps.store`): the run, its metric rows, its result.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from lorainit import tasks
from lorainit.engine import families
from lorainit.errors import BadInput

# an evaluation's timings, logged beside its metrics: not metrics
TIMINGS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")
# metrics the Trainers log whose direction the task registry does not give (TRL's token accuracy)
DIRECTIONS = {"mean_token_accuracy": True}


def metric_name(key: str) -> str | None:
    """A logged evaluation key as lorainit names the metric ('eval_loss' stays, 'eval_accuracy' is
    'accuracy'); None for a key that is not an evaluation's metric."""
    if not key.startswith("eval_") or key.removeprefix("eval_") in TIMINGS:
        return None
    return key if key == "eval_loss" else key.removeprefix("eval_")


@dataclass(frozen=True)
class TrainerRun:
    """A Trainer run as a store keeps a run (`sweeps.store`): its fields, and an id hashed from them."""

    fields: dict  # plain JSON values (the module's doc lists them)

    def to_dict(self) -> dict:
        return dict(self.fields)

    def run_id(self) -> str:
        blob = json.dumps(self.fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def directions(self) -> dict[str, bool]:
        """Metric -> higher is better: the registry's metrics, then the run's own `metrics`."""
        known = {m.name: m.higher_is_better for task in tasks.names() for m in tasks.metrics(task)}
        return known | self.fields["metrics"]


def family(init: str | None, init_args: dict | None, applied, init_lora_weights) -> tuple[str, str | None, str]:
    """The run's (init, init_args as canonical JSON of the options off their defaults, init_variance):
    `init` as given, else what `lorainit.peft.apply_init` recorded (`applied`), else PEFT's
    `init_lora_weights` mapped to a family (PEFT's false and loftq, refused as families, as given)."""
    if init is not None:
        init, args, variance = families.canonical(init), init_args or {}, "kaiming"
        if applied is not None and families.canonical(applied.record.init) == init:  # the same init, applied
            args, variance = init_args or applied.record.init_args or {}, applied.record.init_variance or "kaiming"
    elif applied is not None:
        init, args, variance = applied.record.init, applied.record.init_args, applied.record.init_variance or "kaiming"
    else:
        try:
            init = families.canonical(init_lora_weights)
        except BadInput:
            init = str(init_lora_weights).lower()
        args, variance = {}, "kaiming"
    defaults = families.get(init).args if init in families.FAMILIES else {}
    changed = {k: v for k, v in args.items() if defaults.get(k, object()) != v}
    return init, json.dumps(changed, sort_keys=True, separators=(",", ":")) if changed else None, variance


def directions(args, given: dict[str, bool]) -> dict[str, bool]:
    """Metric -> higher is better, for the metrics the registry does not say: TRL's, the Trainer's
    `metric_for_best_model` (with its `greater_is_better`, whose default is: unless it is a loss),
    and `given`."""
    out = dict(DIRECTIONS)
    best = args.metric_for_best_model
    name = metric_name(best if best.startswith("eval_") else f"eval_{best}") if best else None
    if name:
        out[name] = bool(args.greater_is_better) if args.greater_is_better is not None else not best.endswith("loss")
    return out | given


def run_fields(args, state, model, config, task: str, init_family: tuple[str, str | None, str],
               metrics: dict[str, bool]) -> dict:
    """The fields of the run a Trainer (`args`, `state` at train begin) trains on `model`, whose
    adapter has PEFT config `config`."""
    init, init_args, variance = init_family
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets  # a regex stays a string
    name = (getattr(config, "base_model_name_or_path", None)
            or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__)

    def plain(value):  # the Trainer's enums as their strings
        return str(getattr(value, "value", value))

    return {
        "model": str(name), "task": task, "init": init, "init_args": init_args, "init_variance": variance,
        "lr": float(args.learning_rate), "seed": int(args.seed),
        "rank": int(config.r), "alpha": float(config.lora_alpha), "rslora": bool(config.use_rslora),
        "dropout": float(config.lora_dropout), "targets": targets,
        "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
        "max_steps": int(state.max_steps), "warmup_steps": int(args.get_warmup_steps(state.max_steps)),
        "lr_scheduler_type": plain(args.lr_scheduler_type), "weight_decay": float(args.weight_decay),
        "max_grad_norm": float(args.max_grad_norm), "optim": plain(args.optim),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "metrics": metrics,
    }


def best_of(evaluations: list[dict[str, float]], directions: dict[str, bool]) -> dict[str, float]:
    """Each metric's best value over the evaluations, by its direction (metrics of unknown direction left out)."""
    best: dict[str, float] = {}
    for values in evaluations:
        for name, value in values.items():
            if name in directions and math.isfinite(value) and (
                    name not in best or (value > best[name] if directions[name] else value < best[name])):
                best[name] = value
    return best


class RunFolder:
    """One folder's store, written for one run: each call opens it, writes and closes it."""

    def __init__(self, folder: Path, run: TrainerRun):
        self.folder, self.run = Path(folder), run

    def begin(self, resumed_at: int = 0) -> None:
        """The run in the store, running, with none of the rows an earlier run of the same fields
        left after step `resumed_at`: a run resumed from its checkpoint at that step keeps its own
        rows up to it; a run from the start keeps none."""
        from lorainit.sweeps.store import MetricWriter, Store

        store = Store(self.folder)
        try:
            store.add_sweep(self.folder.name, {}, {}, "", [self.run])
            store.start_pack(self.run.run_id(), [self.run.run_id()])
        finally:
            store.close()
        writer = MetricWriter(self.folder)
        try:
            writer.truncate([self.run.run_id()], resumed_at if resumed_at > 0 else -1)
        finally:
            writer.close()

    def write(self, rows: list[tuple[int, str, float]]) -> None:
        """Metric rows (step, name, value) of the run."""
        from lorainit.sweeps.store import MetricWriter

        writer = MetricWriter(self.folder)
        try:
            writer.write([(self.run.run_id(), step, name, value) for step, name, value in rows])
        finally:
            writer.close()

    def record(self, status: str, diverged_step: int | None, steps: int, seconds: float,
               evaluations: list[dict[str, float]]) -> None:
        """The run's status and result: its final metrics (the last evaluation, none when it diverged)
        and its best ones."""
        from lorainit.sweeps.store import Store
        from lorainit.train import RunResult

        final = dict(evaluations[-1]) if evaluations and status != "diverged" else {}
        result = RunResult(self.run, status=status, diverged_step=diverged_step, steps=steps, final=final,
                           best=best_of(evaluations, self.run.directions()), seconds=seconds)
        store = Store(self.folder)
        try:
            store.record([result])
        finally:
            store.close()
