"""The pack trainer: K runs on one frozen model, each exactly as if it ran alone, for any task.

Every step stacks the active runs' micro-batches adapter-major (runs sharing a seed share their
batch and draw it once); the pack's task family (`lorainit.tasks`, found by the runs' `task`)
gives each run's loss as a sum with its count, and the trainer backpropagates the sum of the
runs' means, so that run k's gradient is its own mean loss's gradient. `PackedAdamW` then clips
and steps each run with its own hyperparameters.

Divergence: a run whose loss is non-finite stops at that step. Otherwise the test is on its
training loss smoothed over about `SMOOTHING` steps (an exponential moving average that starts at
the first loss), against `divergence_factor` x its first loss: one unlucky batch of 4 rows cannot
trigger it. A diverged run gets no update from that step on, its rows leave the batch, its final
metrics are empty and its best ones are those before it diverged.

History stays bounded: metric rows (training loss as the mean over every `log_every` steps,
evaluations, probes) go to a sink as they are made, in batches, when one is given (a sweep's
store), and a checkpoint holds only what continuing needs. Without a sink they collect on each
run's result. Evaluations record every metric the task reports, keeping each one's best by its
direction. The trainer knows nothing of sweeps nor of any one task: it takes runs and returns
their results.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from lorainit import models, tasks
from lorainit.config import RunConfig
from lorainit.engine import checkpoint, families, packing, precision, statistics
from lorainit.engine.lora import LoRAConfig, LoRAPack
from lorainit.engine.optim import PackedAdamW, PackedGradScaler
from lorainit.engine.order import DataOrder, total_steps
from lorainit.engine.peft_io import export_run
from lorainit.engine.probes import Probes
from lorainit.errors import BadInput
from lorainit.tasks.base import Forward, Task

SMOOTHING = 20      # steps: the divergence test's moving average gives each new loss weight 1/20
LOG_POINTS = 1000   # log_every 0: the training loss is logged at about this many points per run
FLUSH_ROWS = 10000  # metric rows held before they go to the sink (and always before a checkpoint)


class MetricSink(Protocol):
    """Where a pack's metric rows go as they are made (a sweep's store)."""

    def write(self, rows: list[tuple[str, int, str, float]]) -> None:
        """Add (run_id, step, name, value) rows, replacing any with the same (run_id, step, name)."""

    def truncate(self, run_ids: list[str], after_step: int) -> None:
        """Drop these runs' rows past `after_step`: a resumed pack writes them again."""


def log_interval(run: RunConfig, total: int) -> int:
    """Steps per logged training-loss point: `log_every`, or with 0 about LOG_POINTS points per run."""
    return run.log_every or max(1, math.ceil(total / LOG_POINTS))


@dataclass
class RunResult:
    config: RunConfig
    status: str = "done"                  # done | diverged | failed (whether it learned: sweeps.outcome)
    diverged_step: int | None = None      # 1-based step at which the run diverged
    steps: int = 0                        # optimiser steps taken
    final: dict = field(default_factory=dict)   # metric -> value at the end
    best: dict = field(default_factory=dict)    # metric -> best value over evaluations
    metrics: list[dict] = field(default_factory=list)  # rows: step, name, value (probes too)
    seconds: float = 0.0
    adapter: str | None = None
    error: str | None = None              # why a failed run failed
    trivial_loss: float | None = None     # the eval loss it must beat to have learned (sweeps.outcome)

    def to_dict(self) -> dict:
        """Plain values (the config as a dict): for checkpoints and for results crossing processes."""
        return {"config": self.config.to_dict(), "status": self.status, "diverged_step": self.diverged_step,
                "steps": self.steps, "final": dict(self.final), "best": dict(self.best),
                "metrics": [dict(m) for m in self.metrics], "seconds": self.seconds, "adapter": self.adapter,
                "error": self.error, "trivial_loss": self.trivial_loss}

    @classmethod
    def from_dict(cls, values: dict) -> "RunResult":
        return cls(**(values | {"config": RunConfig.from_dict(values["config"])}))


def _device(runs: list[RunConfig], device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    precision.check(runs[0].precision, device)
    return device


class PackTrainer:
    """Holds one pack's model, task, optimiser and state; `run()` trains it to the end."""

    def __init__(self, runs: list[RunConfig], device: str | None = None, show_progress: bool = True,
                 model_overrides: dict | None = None, factor_cache: families.FactorCache | None = None):
        """`factor_cache`: where the init families' decompositions are kept (a sweep keeps them in
        its folder); default `inits/` in lorainit's cache ($LORAINIT_CACHE)."""
        if not runs:
            raise BadInput("a pack needs at least one run")
        keys = {r.pack_key() for r in runs}
        if len(keys) > 1:
            differing = [f for f in RunConfig.PACK_FIELDS if len({repr(getattr(r, f)) for r in runs}) > 1]
            raise BadInput(f"these runs cannot share a pack: they differ in {', '.join(differing)}")
        self.runs, self.K = runs, len(runs)
        self.device = _device(runs, device)
        self.show_progress = show_progress
        first = runs[0]
        # the task family loads its model and rows; model_overrides set base-model config fields,
        # e.g. hidden_dropout_prob=0.0
        self.task: Task = tasks.family(first.task)(first, model_overrides)
        self.metrics = {m.name: m for m in self.task.metrics}
        self.model = self.task.model.to(self.device)
        self.pack = LoRAPack(self.model, LoRAConfig(rank=first.rank, alpha=first.alpha, dropout=first.dropout,
                                                    rslora=first.rslora, targets=first.targets), self.K,
                              fresh=self.task.fresh_weights)
        self.model_overrides = model_overrides
        self.total = total_steps(self.task.train_size, first.batch_size, first.epochs, first.max_steps)
        # one order per seed: runs sharing a seed share their batches
        self.orders = {r.seed: DataOrder(r.seed, self.task.train_size, first.batch_size) for r in runs}
        cache = factor_cache if factor_cache is not None else families.FactorCache(models.cache_dir() / "inits")
        for k, run in enumerate(runs):
            self.pack.init_run(k, run.init, run.init_variance, run.seed,
                               json.loads(run.init_args) if run.init_args else None, cache)
        self.state = packing.install(self.pack, [r.seed for r in runs])
        self.statistics_seconds = 0.0  # the data-driven inits' statistics pass, when it ran
        self.statistics_batches = 0    # the batches it forwarded
        data_runs = [k for k, run in enumerate(runs) if families.get(run.init).needs]
        unmade = statistics.initialise(self, data_runs, cache, show_progress) if data_runs else {}
        self.pack.release_targets()
        if first.gradient_checkpointing:
            self.task.checkpoint_base(self.state)
        self.probes = Probes(self.pack)
        self.optimizer = PackedAdamW(
            self.pack.named_parameters(), lr=[r.lr for r in runs], lr_b_ratio=[r.lr_b_ratio for r in runs],
            weight_decay=[r.weight_decay for r in runs], max_grad_norm=[r.max_grad_norm for r in runs],
            warmup_ratio=[r.warmup_ratio for r in runs], total_steps=self.total)
        self.scaler = PackedGradScaler(self.K, self.device) if first.precision == "fp16" else None
        self.alive = [True] * self.K
        self.first_loss: list[float | None] = [None] * self.K
        self.smoothed: list[float | None] = [None] * self.K  # the divergence test's moving average
        self.log_every = log_interval(first, self.total)
        self.interval = [[0.0, 0] for _ in range(self.K)]  # training-loss sum and count since the last point
        self.sink: MetricSink | None = None
        self.pending: list[tuple[int, int, str, float]] = []  # (run, step, name, value) not yet in the sink
        self.results = [RunResult(r) for r in runs]
        for k, why in unmade.items():  # its init could not be made: it fails, its pack-mates train
            self.alive[k] = False
            self.results[k].status, self.results[k].error = "failed", why
        self.step = 0  # optimiser steps done
        self.finished = False  # trained and evaluated to the end
        self.seconds = 0.0  # time spent in run(), across resumes
        self.resumed_at: int | None = None  # the step run() resumed from, if it found a checkpoint

    # -- one step ---------------------------------------------------------------------------

    def _batch(self, active: list[int]) -> tuple[dict, list[int]]:
        """The stacked batch of the active runs (same-seed runs draw theirs once) and each one's length."""
        drawn: dict[int, dict] = {}
        batches = []
        for k in active:
            seed = self.runs[k].seed
            if seed not in drawn:
                drawn[seed] = self.task.batch(self.orders[seed].rows_at(self.step))
            batches.append(drawn[seed])
        return self.task.stack(batches, self.device)

    def train_step(self, log: bool) -> tuple[dict[int, float], int]:
        """One optimiser step of every active run; returns their losses and the real tokens seen.

        The step reads the device once: every active run's loss and the token count, in one transfer.
        """
        active = [k for k in range(self.K) if self.alive[k]]
        batch, lengths = self._batch(active)
        self.state.set_batch(active, lengths)
        self.model.train()
        tokens = self.task.token_mask(batch)
        probe = self.probes.capture(self.step + 1, active, tokens) if log else contextlib.nullcontext()
        one_seed = len({self.runs[k].seed for k in active}) == 1  # then every run has these rows
        with probe, precision.autocast(self.runs[0].precision, self.device):
            losses = self.task.loss(self.state, batch, Forward(active, probing=log, shared_rows=one_seed and not log))
        per_run = losses.means()  # (n,) each run's mean over its own counted rows or tokens
        read = torch.cat([per_run.detach().double(), tokens.sum().double().reshape(1)]).cpu().tolist()
        values, seen = read[:-1], int(read[-1])
        ok = [self._check(k, value) for k, value in zip(active, values)]
        stepping = [k for k, passed in zip(active, ok) if passed]
        self.optimizer.zero_grad()
        if stepping:
            keep = [j for j, passed in enumerate(ok) if passed]
            kept = per_run if len(keep) == len(active) else per_run.index_select(
                0, torch.tensor(keep).to(per_run.device, non_blocking=True))  # (m,) losses of the runs that step
            mask = torch.zeros(self.K, dtype=torch.bool)
            mask[stepping] = True
            mask = mask.to(self.device, non_blocking=True)
            if self.scaler is None:
                kept.sum().backward()
                self.optimizer.step(mask)
            else:
                # each run's loss times its own scale: one run's overflow never skips another's step
                scaled = torch.zeros(self.K, device=kept.device).index_copy(
                    0, torch.tensor(stepping).to(kept.device, non_blocking=True), kept)
                self.scaler.scale_losses(scaled).sum().backward()
                found_inf = self.scaler.unscale_(self.pack.named_parameters())
                self.optimizer.step(mask & ~found_inf)
                self.scaler.update(found_inf, mask)
        self.step += 1
        for j, k in enumerate(active):
            if ok[j]:
                self.results[k].steps = self.step
                self.interval[k][0] += values[j]
                self.interval[k][1] += 1
                if self.step % self.log_every == 0 or self.step == self.total:
                    self._log_interval(k)
        if log:
            self._drain_probes()
        return {k: values[j] for j, k in enumerate(active)}, seen

    def _check(self, k: int, loss: float) -> bool:
        """Run k's divergence test on this step's loss; False (and the run marked diverged) if it fails."""
        if math.isfinite(loss):
            if self.first_loss[k] is None:
                self.first_loss[k] = loss
            previous = self.smoothed[k]
            self.smoothed[k] = loss if previous is None else previous + (loss - previous) / SMOOTHING
            if self.smoothed[k] <= self.runs[k].divergence_factor * self.first_loss[k]:
                return True
        res = self.results[k]
        self.alive[k] = False
        res.status, res.diverged_step, res.final = "diverged", self.step + 1, {}
        self._log_interval(k)  # the steps it took since its last point
        return False

    # -- metric rows ------------------------------------------------------------------------

    def _emit(self, k: int, step: int, name: str, value: float) -> None:
        if self.sink is None:
            self.results[k].metrics.append({"step": step, "name": name, "value": value})
        else:
            self.pending.append((k, step, name, value))
            if len(self.pending) >= FLUSH_ROWS:
                self.flush()

    def _log_interval(self, k: int) -> None:
        """Run k's mean training loss over the steps since its last point, at its last step."""
        total, count = self.interval[k]
        if count:
            self._emit(k, self.results[k].steps, "train_loss", total / count)
        self.interval[k] = [0.0, 0]

    def _drain_probes(self) -> None:
        for row in self.probes.rows:
            self._emit(row["run"], row["step"], f"probe/{row['layer']}/{row['name']}", row["value"])
        self.probes.rows = []

    def flush(self) -> None:
        """Hand the rows made so far to the sink."""
        if self.sink is not None and self.pending:
            self.sink.write([(self.runs[k].run_id(), step, name, value) for k, step, name, value in self.pending])
            self.pending = []

    # -- evaluation -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _evaluating(self, active: list[int]):
        """The model in eval mode with `active` set as the pack's runs, under the runs' precision."""
        self.state.set_batch(active, None)
        self.model.eval()
        try:
            with precision.autocast(self.runs[0].precision, self.device):
                yield
        finally:
            self.state.set_batch(None, None)

    @torch.inference_mode()
    def evaluate(self, record: bool = True) -> dict[int, dict[str, float]]:
        """Every metric of the task for every active run on the evaluation rows, by run.

        With `record`, they join each run's metrics and update its final and best values (best by
        each metric's direction).
        """
        active = [k for k in range(self.K) if self.alive[k]]
        if not active:
            return {}
        with self._evaluating(active):
            measured = dict(zip(active, self.task.evaluate(self.state, active)))
        for k, values in measured.items() if record else ():
            res = self.results[k]
            for name, value in values.items():
                self._emit(k, self.step, name, value)
                if self.metrics[name].better(value, res.best.get(name)):
                    res.best[name] = value
            res.final = dict(values)
        return measured

    @torch.inference_mode()
    def record_trivial(self) -> None:
        """Each run's trivial loss at step 0 (`Task.trivial_losses`), as its metric row
        `trivial_loss` and on its result. Runs that start at the base (s B0 A0 = 0, or carried as
        their correction) and share a seed compute one function at step 0 (the base with that
        seed's frozen draws), so one of them is evaluated for all: one evaluation per seed, without
        generation. A run that starts off the base (LoRA-One, Init[AB] without reset, orthogonal's
        rounding) is evaluated as it starts."""
        keys = [run.seed if families.starts_at_base(run.init, families.args_of(run.init, run.init_args))
                else ("own", k) for k, run in enumerate(self.runs)]
        first = {}
        for k, key in enumerate(keys):
            first.setdefault(key, k)
        active = sorted(first.values())
        with self._evaluating(active):
            values = dict(zip(active, self.task.trivial_losses(self.state, active)))
        for k, key in enumerate(keys):
            value = values[first[key]]
            self.results[k].trivial_loss = value
            if value is not None:  # a task with no eval loss: not judged
                self._emit(k, 0, "trivial_loss", value)

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything an exact resume needs: the trained tensors and the per-run frozen ones, the
        optimiser and loss-scale state, the dropout streams, each run's step, status, divergence
        state and logging interval. With a sink, metric rows are not here: they are in the sink,
        flushed before every checkpoint. Data orders are a function of (seed, step), so the step is
        their position."""
        streams = {str(device): [g.get_state() for g in gens]
                   for device, gens in self.state.streams._generators.items()}
        return {"run_ids": [r.run_id() for r in self.runs], "step": self.step, "finished": self.finished,
                "params": {n: p.detach().clone() for n, p in self.pack.named_parameters().items()},
                "fresh": {n: t.detach().clone() for n, t in self.pack.fresh_tensors().items()},
                "initial": {n: t.detach().clone() for n, t in self.pack.initial_factors().items()},
                "corrected": self.pack.corrected,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "streams": streams, "alive": list(self.alive), "first_loss": list(self.first_loss),
                "smoothed": list(self.smoothed), "interval": [list(i) for i in self.interval],
                "results": [r.to_dict() for r in self.results], "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output, taken from a pack of the same runs in the same order."""
        if state["run_ids"] != [r.run_id() for r in self.runs]:
            raise ValueError("the checkpoint belongs to another pack (its runs differ)")
        with torch.no_grad():
            for name, p in self.pack.named_parameters().items():
                p.copy_(state["params"][name])
            for name, t in self.pack.fresh_tensors().items():
                t.copy_(state["fresh"][name])
            if "initial" in state:  # the corrections as they were drawn, never recomputed
                self.pack.set_initial_factors(state["initial"], state["corrected"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        for device, saved in state["streams"].items():
            gens = self.state.streams._streams(torch.device(device))
            for g, s in zip(gens, saved):
                g.set_state(s)
        self.step, self.finished, self.seconds = state["step"], state["finished"], state["seconds"]
        self.alive, self.first_loss = list(state["alive"]), list(state["first_loss"])
        self.smoothed, self.interval = list(state["smoothed"]), [list(i) for i in state["interval"]]
        self.results = [RunResult.from_dict(r) for r in state["results"]]

    # -- the whole run ----------------------------------------------------------------------

    def run(self, adapters_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None,
            on_step: Callable[["PackTrainer", dict[int, float], float], None] | None = None,
            on_eval: Callable[["PackTrainer"], None] | None = None,
            sink: MetricSink | None = None) -> list[RunResult]:
        """Train to the end, evaluating every `eval_every` steps and at the end.

        With `checkpoint_dir`, start from its newest good checkpoint, write one every
        `checkpoint_every` steps and one when finished (so a finished pack is never trained
        again). With `sink`, metric rows go there (see `MetricSink`): first the runs' rows past
        the step it starts from are dropped, then rows are written in batches and before every
        checkpoint, so a resume neither loses nor repeats one. `on_step(trainer, losses,
        tokens_per_second)` is called after every step, and `on_eval(trainer)` before every
        evaluation.
        """
        self.sink = sink
        try:
            return self._run(adapters_dir, checkpoint_dir, on_step, on_eval)
        finally:
            self.flush()  # a pack that fails keeps the rows it made (a resume replaces those past its checkpoint)

    def _run(self, adapters_dir, checkpoint_dir, on_step, on_eval) -> list[RunResult]:
        from lorainit.display import ProgressDisplay

        first = self.runs[0]
        if checkpoint_dir is not None and (saved := checkpoint.load_latest(checkpoint_dir)) is not None:
            self.load_state_dict(saved)
            self.resumed_at = self.step
        if self.sink is not None:
            self.sink.truncate([r.run_id() for r in self.runs], self.step)
        if self.step == 0 and not self.finished:
            self.record_trivial()
        session = time.perf_counter()
        start = session - self.seconds  # seconds count across resumes
        tokens = 0  # real tokens trained in this session
        bar = ProgressDisplay(f"pack of {self.K}", self.total, "step", initial=self.step,
                              enabled=self.show_progress and not self.finished)
        while not self.finished and self.step < self.total and any(self.alive):
            log = first.eval_every > 0 and (self.step + 1) % first.eval_every == 0
            # probes at the first and last step and at every evaluation
            losses, seen = self.train_step(log=log or self.step == 0 or self.step + 1 == self.total)
            tokens += seen
            if log:
                if on_eval is not None:
                    on_eval(self)
                self.evaluate()
            rate = tokens / max(time.perf_counter() - session, 1e-9)
            bar.update(1, f"loss {sum(losses.values()) / max(1, len(losses)):.4f}, {rate:.0f} tok/s, "
                          f"{sum(self.alive)} alive")
            if on_step is not None:
                on_step(self, losses, rate)
            if (checkpoint_dir is not None and first.checkpoint_every > 0 and self.step < self.total
                    and self.step % first.checkpoint_every == 0):
                self.seconds = time.perf_counter() - start
                self.flush()
                checkpoint.save(checkpoint_dir, self.step, self.state_dict())
        bar.close()
        if not self.finished:
            if not (first.eval_every > 0 and self.step % first.eval_every == 0):
                if on_eval is not None:
                    on_eval(self)
                self.evaluate()
            self.seconds = time.perf_counter() - start
            for res in self.results:
                res.seconds = self.seconds
            self.finished = True
            if checkpoint_dir is not None:
                self.flush()
                checkpoint.save(checkpoint_dir, self.step, self.state_dict())
        for k, res in enumerate(self.results):
            if adapters_dir is not None and res.status == "done" and self.runs[k].save_adapters:
                folder = Path(adapters_dir) / res.config.run_id()
                base, note = models.peft_base(self.runs[k].model)
                run = self.runs[k]
                res.adapter = str(export_run(self.pack, k, folder, base_model=base, base_note=note, init=run.init,
                                             init_args=families.args_of(run.init, run.init_args),
                                             init_variance=run.init_variance, seed=run.seed))
        return self.results


def train_pack(runs: list[RunConfig], device: str | None = None, adapters_dir: str | Path | None = None,
               show_progress: bool = True, model_overrides: dict | None = None) -> list[RunResult]:
    """Train `runs` as one pack and return their results, in order."""
    return PackTrainer(runs, device, show_progress, model_overrides).run(adapters_dir)
