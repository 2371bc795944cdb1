"""What `lorainit.hf.ProbeCallback` costs a `transformers.Trainer` run: the same run with and without it.

One PEFT LoRA run of MiniLM on the SST-2 slice (rank 8, alpha 16, LoRA dropout 0.1 on query and
value, batch `--batch-size` rows of at most 64 tokens, AdamW, linear decay, fp32), trained by
`Trainer` for `--steps` steps, logging every `--logging-steps`; with the callback it also probes
at those steps and writes its run folder. The two variants alternate in one process (without,
with, with, without, ...: neither always runs first), each repeat with a fresh PEFT model from
the same seed. A clock
callback reads the time at each `on_step_begin`, so a step's time covers its forwards, backward,
update and any logging after it (the callback's probes, their log entry and its folder rows). The
first step (a warm-up) is not timed, nor what the callback does once at train begin and end
(finding the Trainer's callback list and the LoRA layers, creating the store; writing the last
rows and the run's result: printed apart).

Printed: per variant, the median over repeats of the mean step time (the figure the overhead is
computed from: the callback's work falls on logging steps only, which a median over steps would
not see), the median step, and the mean logging step; then the overhead of the mean step, with the
ratio per repeat; and the time spent inside the callback itself (its events and its hooks, clocked
around each call), per logging step and as a share of the run's step time: a figure that other
processes' load does not blur as it blurs the difference of two step times.

    .venv/bin/python benchmarks/callback_overhead.py [--steps 100] [--logging-steps 10]
        [--batch-size 8] [--repeats 5] [--threads N] [--device cpu|cuda]

On a machine that other processes keep busy, measure with `--threads 1`: more torch threads than
free cores stall every parallel op, and the variants' step times then measure the contention.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import clock, cpu_model, set_environment

RANK, ALPHA, DROPOUT, TARGETS = 8, 16.0, 0.1, ["query", "value"]
MAX_LEN = 64


def run(with_probes: bool, args: argparse.Namespace, rows, out: Path) -> dict:
    """One Trainer run; its step times (s) and which steps logged, and the callback's set-up time."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lorainit import models
    from lorainit.hf import ProbeCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ticks: list[float] = []

        def on_step_begin(self, *_, **__):
            self.ticks.append(clock(args.device))

        def on_train_end(self, *_, **__):
            self.ticks.append(clock(args.device))

    class Timed(ProbeCallback):
        """The callback with a clock on its own work: once, at train begin and end (set-up, the
        folder's last rows and the run's result), and inside its other events and its forward hooks."""

        setup_s = 0.0
        inside_s = 0.0

        def on_train_begin(self, *a, **kw):
            start = time.perf_counter()
            super().on_train_begin(*a, **kw)
            self.setup_s = time.perf_counter() - start

        def _timed(self, method):
            def call(*a, **kw):
                start = clock(args.device)
                out = method(*a, **kw)
                self.inside_s += clock(args.device) - start
                return out
            return call

        def _layer_hook(self, layer):
            return self._timed(super()._layer_hook(layer))

        def on_step_begin(self, *a, **kw):
            return self._timed(super().on_step_begin)(*a, **kw)

        def on_pre_optimizer_step(self, *a, **kw):
            return self._timed(super().on_pre_optimizer_step)(*a, **kw)

        def on_step_end(self, *a, **kw):
            return self._timed(super().on_step_end)(*a, **kw)

        def on_log(self, *a, **kw):
            return self._timed(super().on_log)(*a, **kw)

        def on_train_end(self, *a, **kw):
            start = time.perf_counter()
            super().on_train_end(*a, **kw)
            self.setup_s += time.perf_counter() - start

    torch.manual_seed(0)
    base, _ = models.load("minilm", "classification", num_labels=2)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS,
                                            task_type="SEQ_CLS"))
    ticks, callbacks = Clock(), []
    if with_probes:
        callbacks.append(Timed(out=out, task="sst2-slice-bench"))
    config = TrainingArguments(
        output_dir=str(out), max_steps=args.steps + 1, per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
        logging_steps=args.logging_steps, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=args.device == "cpu", seed=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=config, train_dataset=rows, data_collator=rows.collate,
                      callbacks=[*callbacks, ticks])
    trainer.train()
    steps = [b - a for a, b in zip(ticks.ticks[1:], ticks.ticks[2:])]  # steps 2 .. N+1
    logged = [(s + 2) % args.logging_steps == 0 for s in range(len(steps))]
    return {"steps": steps, "logged": logged, "setup_s": callbacks[0].setup_s if callbacks else 0.0,
            "inside_s": callbacks[0].inside_s if callbacks else 0.0}


class Rows(list):
    """SST-2 slice rows as dicts of token ids and a label, with a collate that right-pads them."""

    def __init__(self, count: int):
        import torch  # noqa: F401

        from lorainit import models
        from lorainit.tasks import glue

        examples = glue.read("sst2-slice", "train", max_rows=count)
        _, tokenizer = models.load("minilm", "classification", num_labels=2)
        ids, type_ids = glue.encode(examples, tokenizer, MAX_LEN)
        super().__init__({"ids": i, "types": t, "label": y} for i, t, y in zip(ids, type_ids, examples.labels))
        self.pad = tokenizer.pad_token_id

    def collate(self, features: list[dict]) -> dict:
        import torch

        from lorainit.tasks.classification import collate

        batch = collate([f["ids"] for f in features], self.pad, [f["types"] for f in features])
        batch["labels"] = torch.tensor([f["label"] for f in features])
        return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant, alternated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    set_environment()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    print(f"{args.device}: {device}; torch threads {torch.get_num_threads()}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"MiniLM + PEFT LoRA (r {RANK}, query/value), batch {args.batch_size} x <= {MAX_LEN} tokens, "
          f"{args.steps} timed steps, logging every {args.logging_steps}; {args.repeats} alternated repeats")
    rows = Rows((args.steps + 1) * args.batch_size)
    measured = {False: [], True: []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for with_probes in (False, True) if repeat % 2 == 0 else (True, False):  # ABBA: neither always goes first
                out = Path(scratch) / f"{repeat}-{with_probes}"
                measured[with_probes].append(run(with_probes, args, rows, out))
                gc.collect()  # the run's model and Trainer, before the next one starts
                r = measured[with_probes][-1]
                print(f"  repeat {repeat + 1}, {'with' if with_probes else 'without'} the callback: mean step "
                      f"{1000 * statistics.fmean(r['steps']):.1f} ms", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")

    def summary(runs: list[dict]) -> tuple[float, float, float]:
        means = [statistics.fmean(r["steps"]) for r in runs]
        medians = [statistics.median(r["steps"]) for r in runs]
        logging = [statistics.fmean([t for t, log in zip(r["steps"], r["logged"]) if log]) for r in runs]
        return statistics.median(means), statistics.median(medians), statistics.median(logging)

    print(f"\n{'':16}{'mean step ms':>14}{'median step ms':>16}{'logging step ms':>17}")
    for with_probes in (False, True):
        mean, median, logging = summary(measured[with_probes])
        label = "with" if with_probes else "without"
        print(f"{label:16}{1000 * mean:>14.2f}{1000 * median:>16.2f}{1000 * logging:>17.2f}")
    without, with_ = summary(measured[False])[0], summary(measured[True])[0]
    per_repeat = [statistics.fmean(w["steps"]) / statistics.fmean(o["steps"]) - 1
                  for o, w in zip(measured[False], measured[True])]
    spread = max(per_repeat) - min(per_repeat)
    decided = ("the repeats' spread is wider than the 5% target, so this difference decides nothing"
               if spread > 0.05 else f"target under 5%: {'met' if with_ / without - 1 < 0.05 else 'NOT met'}")
    print(f"overhead of the mean step (medians over repeats): {with_ / without - 1:+.1%}; per repeat: "
          f"{', '.join(f'{p:+.1%}' for p in per_repeat)}; {decided}")
    inside = statistics.median(r["inside_s"] / sum(r["steps"]) for r in measured[True])
    per_log = statistics.median(r["inside_s"] / max(1, sum(r["logged"])) for r in measured[True])
    print(f"time inside the callback (its events and hooks, train begin and end aside): {1000 * per_log:.2f} ms "
          f"per logging step, {inside:.2%} of the run's step time (medians over repeats; what the load's noise "
          f"cannot blur); target under 5%: {'met' if inside < 0.05 else 'NOT met'}")
    print(f"the callback's work once per run, at train begin and end (median): "
          f"{1000 * statistics.median(r['setup_s'] for r in measured[True]):.0f} ms")


if __name__ == "__main__":
    main()
