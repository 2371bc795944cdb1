"""`ProbeCallback`: a pack's probes at each logging step of a Trainer run, in its logs and a run folder.

The callback decides, at each step's `on_step_begin`, whether the Trainer will log at the end of
that step (as `DefaultFlowCallback` decides it), and if so arms the probes (`hf.probes`) for the
step's forwards; `on_pre_optimizer_step` (after the step's last backward, before clipping and the
update) reads them. `on_log` adds their means over layers to the step's training log entry, in
place, and to the entry `Trainer.log` already copied into `state.log_history`; so that the
reporting integrations, which transformers puts ahead of a user's callbacks, see them too, the
callback moves itself ahead of them at train begin (`_place`), or `add_probes` puts it there.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from lorainit.engine import families
from lorainit.engine.probes import NAMES, NET
from lorainit.errors import BadInput
from lorainit.hf import record
from lorainit.hf.probes import PeftProbes, initial_factors, lora_layers

# metric rows are held until an evaluation, a checkpoint, the end, or this many rows or seconds: a
# write to the store (synced to disk) costs about 20 ms, more than a small model's probes do
FLUSH_ROWS, FLUSH_SECONDS = 10000, 60.0


class ProbeCallback(TrainerCallback):
    """Records lorainit's probes (z_a_rms, lora_out_rms, a_norm, b_norm, net_out_rms) per PEFT LoRA
    layer at each logging step of a `transformers.Trainer` (or TRL `SFTTrainer`) run, logs their
    means over layers as `probe/<name>`, and writes the run into a folder `lorainit report` reads.

    Measured where a pack measures them: on the training forwards of a step that will log, before
    its optimiser update (hooks registered in `on_step_begin`, removed in `on_pre_optimizer_step`),
    pooling every micro-batch of the step under gradient accumulation, over the real tokens of the
    batch's `attention_mask` (every token of a padding-free batch without one). No hook exists
    outside logging steps. See `lorainit.hf` for the folder and how the values reach the logs.
    """

    def __init__(self, out: str | Path | None = None, task: str = "trainer", init: str | None = None,
                 init_args: dict | None = None, adapter_name: str | None = None,
                 metrics: dict[str, bool] | None = None, log_layers: bool = False):
        """`out`: the run folder (default the Trainer's `output_dir`); `task`: the name the report
        groups runs by (runs on the same data and task should share it); `init`, `init_args`: the
        run's init family as lorainit names it (default: what `lorainit.peft.apply_init` recorded
        on the model, else PEFT's `init_lora_weights` mapped by `families.canonical`);
        `adapter_name`: default the model's active adapter; `metrics`: evaluation metric name ->
        higher is better, for metrics whose direction lorainit does not know; `log_layers`: also
        log each layer's values as `probe/<layer>/<name>`."""
        if init is not None:
            families.canonical(init)  # an unknown family is refused now, not at train begin
        self.out = Path(out) if out is not None else None
        self.task, self.init, self.init_args, self.adapter_name = task, init, init_args, adapter_name
        self.metrics, self.log_layers = dict(metrics or {}), log_layers
        self.run: record.TrainerRun | None = None  # the run being recorded (set at train begin)
        self.folder: record.RunFolder | None = None  # where: written by process zero only
        self.probes: PeftProbes | None = None
        self._placed = False                    # ahead of the reporting callbacks
        self._per_epoch: int | None = None      # optimiser steps per epoch (the epoch logging strategy)
        self._values: dict[str, dict[str, float]] = {}  # layer -> name -> value at step `_values_step`
        self._values_step = -1
        self._rows: list[tuple[int, str, float]] = []  # (step, name, value) not yet written
        self._flushed = 0.0                     # when rows were last written (time.perf_counter())
        self._evaluations: list[tuple[int, dict[str, float]]] = []  # (step, metric -> value)
        self._diverged_step: int | None = None
        self._causal_lm = False                 # PEFT's task type CAUSAL_LM: a step-0 eval loss is its trivial loss
        self._started = 0.0                     # train begin (time.perf_counter())
        self._ended = False
        self._steps, self._seconds = 0, 0.0     # at train end

    def _adapter(self, model: nn.Module) -> str:
        if self.adapter_name is not None:
            return self.adapter_name
        active = getattr(model, "active_adapter", "default")
        active = active() if callable(active) else active
        return active[0] if isinstance(active, (list, tuple)) else str(active)

    # -- placement ahead of the reporting callbacks -------------------------------------------

    def _trainer_callbacks(self) -> list | None:
        """The Trainer's callback list holding this callback (a `CallbackHandler`'s `callbacks`),
        found among the objects that refer to it: transformers hands a callback no handle on it."""
        for ref in gc.get_referrers(self):
            if not (isinstance(ref, list) and any(isinstance(c, DefaultFlowCallback) for c in ref)):
                continue
            if any((isinstance(o, CallbackHandler) and o.callbacks is ref) or
                   (isinstance(o, dict) and o.get("callbacks") is ref) for o in gc.get_referrers(ref)):
                return ref
        return None

    def _place(self, callbacks: list) -> None:
        """Move this callback right after DefaultFlowCallback, ahead of the reporting integrations,
        so that its `on_log` adds the probes to the logs before they see them. Safe while the
        handler iterates the list: the callback moves only towards the front, so no other callback
        is skipped or called twice."""
        flow = next((i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)), -1)
        if callbacks.index(self) > flow + 1:
            callbacks.remove(self)
            callbacks.insert(flow + 1, self)
        self._placed = True

    # -- events -------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:  # a model without LoRA layers is refused when the Trainer is built
            lora_layers(model, self._adapter(model))

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not self._placed:
            callbacks = self._trainer_callbacks()
            if callbacks is None:
                warnings.warn("ProbeCallback could not find the Trainer's callback list, so the reporting "
                              "callbacks (TensorBoard, W&B, ...) run before it and miss the probe values; "
                              "register it with lorainit.hf.add_probes(trainer)", stacklevel=2)
                self._placed = True
            else:
                self._place(callbacks)
        adapter = self._adapter(model)
        layers = lora_layers(model, adapter)
        configs = getattr(model, "peft_config", None)
        if not isinstance(configs, dict) or adapter not in configs:
            raise BadInput(f"ProbeCallback: the model, a {type(model).__name__}, has LoRA layers but no PEFT config "
                           f"for adapter {adapter!r}; wrap it with peft.get_peft_model")
        config = configs[adapter]
        initial = initial_factors(model, adapter, layers, config.init_lora_weights, state.global_step)
        self.probes = PeftProbes(model, adapter, layers, initial)
        self._causal_lm = str(getattr(config, "task_type", "")).rpartition(".")[2] == "CAUSAL_LM"
        length = len(train_dataloader) if hasattr(train_dataloader, "__len__") else None
        self._per_epoch = max(math.ceil(length / args.gradient_accumulation_steps), 1) if length else None
        self._values, self._values_step, self._rows, self._evaluations = {}, -1, [], []
        for entry in state.log_history:  # resumed from a checkpoint: the evaluations it had made
            if isinstance(entry.get("step"), int) and entry["step"] <= state.global_step:
                self._evaluated(entry["step"], _evaluation(entry))
        self._diverged_step, self._ended = None, False
        self._started = self._flushed = time.perf_counter()
        applied = getattr(model, "lorainit_init", None)
        applied = applied.get(adapter) if isinstance(applied, dict) else None
        init = record.family(self.init, self.init_args, applied, config.init_lora_weights)
        self.run = record.TrainerRun(record.run_fields(args, state, model, config, self.task, init,
                                                       record.directions(args, self.metrics)))
        self.folder = None
        if state.is_world_process_zero:
            self.folder = record.RunFolder(self.out if self.out is not None else Path(args.output_dir), self.run)
            self.folder.begin(state.global_step)

    def _logs_at(self, args, state, step: int) -> bool:
        """Whether the Trainer logs at optimiser step `step` (1-based), as DefaultFlowCallback decides."""
        if step == 1 and args.logging_first_step:
            return True
        if args.logging_strategy == "steps":
            return state.logging_steps > 0 and step % state.logging_steps == 0
        if args.logging_strategy == "epoch":
            return step == state.max_steps or (self._per_epoch is not None and step % self._per_epoch == 0)
        return False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.probes is not None and self._logs_at(args, state, state.global_step + 1):
            self.probes.arm()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.probes is not None and self.probes.armed:  # the step's backwards are done; the update is next
            self._read(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if self.probes is not None and self.probes.armed:  # a trainer without on_pre_optimizer_step: after the update
            self._read(state.global_step)

    def _read(self, step: int) -> None:
        self._values, self._values_step = self.probes.finish(), step
        self._rows += [(step, f"probe/{layer}/{name}", value) for layer, values in self._values.items()
                       for name, value in values.items()]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.run is None:
            return
        step = state.global_step
        if "loss" in logs and self._values_step == step and self._values:
            extra = {f"probe/{name}": sum(vs) / len(vs) for name in (*NAMES, NET)
                     if (vs := [v[name] for v in self._values.values() if name in v])}
            if self.log_layers:
                extra |= {f"probe/{layer}/{name}": value for layer, values in self._values.items()
                          for name, value in values.items()}
            logs.update(extra)
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == step and last.get("loss") == logs["loss"]:
                last.update(extra)  # Trainer.log copied the logs into log_history before on_log
            self._values = {}
        if "loss" in logs:
            self._rows.append((step, "train_loss", float(logs["loss"])))
        if self._diverged_step is None and any(not math.isfinite(float(logs[key]))
                                               for key in ("loss", "grad_norm") if key in logs):
            self._diverged_step = step
        evaluated = _evaluation(logs)
        if evaluated:
            self._evaluated(step, evaluated)
            self._rows += [(step, name, value) for name, value in evaluated.items()]
            if step == 0 and self._causal_lm and "eval_loss" in evaluated:
                # the run's own eval loss before any update: what lorainit judges a decoder against
                self._rows.append((0, "trivial_loss", evaluated["eval_loss"]))
        due = len(self._rows) >= FLUSH_ROWS or time.perf_counter() - self._flushed >= FLUSH_SECONDS
        if evaluated or self._ended or due:
            self._flush()
        if evaluated and self._ended:  # trainer.evaluate() after training: the final metrics move
            self._record()

    def _evaluated(self, step: int, values: dict[str, float]) -> None:
        """An evaluation's metrics at `step`; those of several evaluation sets logged at one step
        (an `eval_dataset` dict) are one evaluation."""
        if values:
            if self._evaluations and self._evaluations[-1][0] == step:
                self._evaluations[-1][1].update(values)
            else:
                self._evaluations.append((step, dict(values)))

    def on_save(self, args, state, control, **kwargs):
        self._flush()  # the folder holds what the checkpoint holds

    def on_train_end(self, args, state, control, **kwargs):
        if self.probes is not None and self.probes.armed:
            self.probes.disarm()
        self._ended = True
        self._steps, self._seconds = state.global_step, time.perf_counter() - self._started
        if self._diverged_step is None and self.probes is not None and any(
                not torch.isfinite(p).all() for layer in self.probes.layers for p in self.probes.factors(layer)):
            self._diverged_step = state.global_step
        self._flush()
        self._record()

    # -- the folder ---------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flushed = time.perf_counter()
        if self.folder is not None and self._rows:
            self.folder.write(self._rows)
        self._rows = []

    def _record(self) -> None:
        if self.folder is not None:
            self.folder.record("diverged" if self._diverged_step is not None else "done", self._diverged_step,
                               self._steps, self._seconds, [values for step, values in self._evaluations if step > 0])


def _evaluation(logs: dict) -> dict[str, float]:
    """The evaluation metrics in one log entry, as lorainit names them (`record.metric_name`)."""
    return {name: float(v) for key, v in logs.items()
            if (name := record.metric_name(key)) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def add_probes(trainer: "transformers.Trainer", **options) -> ProbeCallback:
    """A `ProbeCallback(**options)` registered on `trainer` right after its DefaultFlowCallback,
    ahead of its reporting callbacks; returns it. The same as passing the callback in `callbacks=`,
    without the callback having to find the Trainer's list itself."""
    callback = ProbeCallback(**options)
    callback.on_init_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
    callbacks = trainer.callback_handler.callbacks
    callbacks.append(callback)
    callback._place(callbacks)
    return callback
