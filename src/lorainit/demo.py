"""`lorainit demo`: the paper's story on a laptop CPU, offline, in under ten minutes.

1. the theory: which learning-rate exponents keep each init stable and efficient (`theory`);
2. the teacher-student toy at widths 256-2048, where the width exponents show: the optimal and
   largest stable lr against width, the stability edge bisected, fitted slopes against the
   theory's;
3. a real learning-rate sweep, Init[A] against Init[B], on MiniLM / the SST-2 slice shipped with
   lorainit (`sst2-slice`: 4,000 training rows and the 872-row validation set), three seeds
   (`SWEEP` below, written to OUT/sst2-sweep.yaml), all its runs in one pack;
4. the report of both (`lorainit report`), whose findings it prints, with the page's path.

It needs no data beside the package. With `data_dir` (a GLUE root holding SST-2/), the sweep runs
on the full SST-2 there instead (`task: sst2`), checked before anything runs.

`run_demo` is the short version (`lorainit demo --quick`): one Init[A] and one Init[B] run in one
pack, sharing the seed (so the same batches and dropout masks), then each exported adapter
reloaded with PEFT on a fresh base model to show that its outputs equal the pack's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lorainit import models
from lorainit.config import RunConfig
from lorainit.train import PackTrainer

INITS = ("a", "b")
# The demo's sweep, also written to OUT/sst2-sweep.yaml: a starting point for a sweep of one's own.
SWEEP = """\
# The demo's learning-rate sweep (`make demo`): Init[A] against Init[B] on MiniLM / the SST-2 slice
# shipped with lorainit, 5 learning rates x 2 inits x 3 seeds (30 runs, one pack), fp32 on a laptop
# CPU: 200 steps of batch 8 from the slice's 4,000 training rows, evaluated on the first 400
# validation rows at steps 100 and 200 (so a run that learned and fell back shows as collapsed).
# Three seeds, so the report can tell a difference from seed noise. For the full SST-2, use
# task: sst2 (rows from data_dir, $LORAINIT_DATA or the hub).
name: demo-sst2-minilm
base:
  model: minilm
  task: sst2-slice
  max_steps: 200
  batch_size: 8
  rank: 8
  alpha: 16
  dropout: 0.1
  max_seq_len: 128
  warmup_ratio: 0.06
  max_eval_samples: 400
  eval_every: 100
  save_adapters: false
grid:
  init: [a, b]
  lr: [3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2]
  seed: [0, 1, 2]
pack_size: 30
"""
# The toy at widths where the theory's exponents show (at 64-512 Init[B]'s edge falls more slowly
# than n^-1: the small-width regime), 2 seeds, on the half-octave lrs 2^-10 .. 2^-1 that hold
# every edge at these widths: about 1.5 minutes on 2 cores.
TOY = dict(widths=(256, 512, 1024, 2048), seeds=2, lrs=tuple(2.0 ** (k / 2) for k in range(-20, -1)))


def run_story(out: str | Path, data_dir: str | None = None, sweep_text: str = SWEEP, toy: dict = TOY,
              toy_steps: int = 500, say=print) -> dict:
    """The four parts in order; returns the paths written and the findings printed."""
    from lorainit.report import build as build_report
    from lorainit.report import toy as toy_report_page
    from lorainit.sweeps import driver, file
    from lorainit.tasks import family
    from lorainit.theory import calculus, toy_edge, toy_report
    from lorainit.theory.toy import ToyConfig

    out = Path(out)
    t0 = time.perf_counter()
    if data_dir is not None:  # the full SST-2 from the user's folder, instead of the shipped slice
        sweep_text = sweep_text.replace("  task: sst2-slice\n", f"  task: sst2\n  data_dir: {json.dumps(data_dir)}\n")
    sweep = file.parse(sweep_text, where="the demo's sweep")
    family(sweep.runs[0].task).check_data(sweep.runs[0])  # bad data: an error before anything runs
    done: dict = {"out": str(out)}
    say("== 1/4 theory: the width exponents of one LoRA module (paper section 3)")
    say(calculus.format_table(calculus.table()))
    for init in INITS:
        say(f"Init[{init.upper()}]: largest stable learning rate Theta(n^{-float(calculus.max_stable_c(init)):g})")

    cfg = ToyConfig(steps=toy_steps, **toy)
    say(f"\n== 2/4 the teacher-student toy at widths {', '.join(map(str, cfg.widths))}, {cfg.seeds} seeds")
    summary, _ = toy_report.run(cfg, out / "toy", edge_rounds=2)
    toy_page, toy_lines = toy_report_page.build(out / "toy")
    say(toy_report.format_summary(summary, cfg.inits))
    say(toy_edge.format_slopes(summary["edge"], 2))
    done["toy_report"] = str(toy_page)
    say(f"({time.perf_counter() - t0:.0f} s so far)")

    run = sweep.runs[0]
    say(f"\n== 3/4 a learning-rate sweep on MiniLM / {run.task}: Init[A] against Init[B], 3 seeds")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sst2-sweep.yaml").write_text(sweep_text)
    sweep_dir = out / "sst2"
    driver.run_sweep(sweep, sweep_dir)

    say("\n== 4/4 the report")
    built = build_report(sweep_dir)
    say(built.text())
    done["report"] = str(built.index)
    done["findings"] = built.text()
    done["seconds"] = round(time.perf_counter() - t0, 1)
    say(f"\nthe toy's report: {toy_page}")
    say(f"the sweep's report (open it in a browser): {built.index}")
    say(f"demo done in {done['seconds']:.0f} s")
    return done


def run_demo(out: str, steps: int = 150, batch_size: int = 16, lr: float = 5e-4, seed: int = 0,
             train_rows: int = 4000, eval_rows: int | None = None, data_dir: str | None = None) -> dict:
    """Finetune Init[A] and Init[B] side by side; write results and PEFT adapters to `out`. The
    rows: the shipped SST-2 slice, or with `data_dir` the full SST-2 there."""
    t0 = time.perf_counter()
    task = "sst2" if data_dir is not None else "sst2-slice"
    runs = [RunConfig.from_dict(dict(model="minilm", task=task, init=init, lr=lr, seed=seed, max_steps=steps,
                                     batch_size=batch_size, max_train_samples=train_rows,
                                     max_eval_samples=eval_rows, data_dir=data_dir, rank=8, alpha=16,
                                     dropout=0.1))
            for init in INITS]
    trainer = PackTrainer(runs)
    before = trainer.evaluate(record=False)
    out_dir = Path(out)
    results = trainer.run(adapters_dir=out_dir / "adapters")
    diffs = _peft_reload_check(trainer, [r.adapter for r in results])
    result = {
        "model": "minilm", "task": task, "steps": steps, "batch_size": batch_size, "lr": lr,
        "seed": seed, "rank": 8, "alpha": 16, "dropout": 0.1,
        "runs": [{"init": r.config.init, "run_id": r.config.run_id(), "status": r.status,
                  "accuracy_before": before[k]["accuracy"], "accuracy_after": r.final.get("accuracy"),
                  "train_loss_last10pct": _tail_mean([m["value"] for m in r.metrics if m["name"] == "train_loss"]),
                  "adapter": r.adapter, "peft_reload_max_abs_diff": diffs[k]}
                 for k, r in enumerate(results)],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out_dir / "demo_results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _tail_mean(values: list[float]) -> float:
    tail = values[-max(1, len(values) // 10):]
    return sum(tail) / len(tail)


@torch.inference_mode()
def _peft_reload_check(trainer: PackTrainer, folders: list[str]) -> list[float]:
    """Reload each run's adapter with PEFT on a fresh base; max |logit diff| against the pack, per run."""
    from peft import PeftModel

    task = trainer.task  # the classification family: its eval rows and its packed logits
    rows = list(range(min(32, task.eval_size)))
    batch = task.rows_batch(task.eval, rows)
    batch.pop("labels")
    trainer.model.eval()
    trainer.state.set_batch(None, None)
    packed = task.logits(trainer.state, {k: v.repeat(trainer.K, 1) for k, v in batch.items()}).view(trainer.K, len(rows), -1)
    diffs = []
    for k, folder in enumerate(folders):
        base, _ = models.load("minilm", "classification", num_labels=2)
        peft_model = PeftModel.from_pretrained(base, folder).eval()
        diffs.append(float((peft_model(**batch).logits - packed[k]).abs().max()))
    return diffs


def format_result(result: dict) -> str:
    lines = [f"MiniLM on {result['task']}: {result['steps']} steps of batch {result['batch_size']}, lr {result['lr']:g}, "
             f"rank {result['rank']}, seed {result['seed']} ({result['seconds']} s)",
             f"{'init':<8}{'dev acc before':>16}{'dev acc after':>15}{'train loss':>12}{'PEFT reload diff':>18}"]
    for run in result["runs"]:
        lines.append(f"Init[{run['init'].upper()}]  {run['accuracy_before']:>14.3f}{run['accuracy_after']:>15.3f}"
                     f"{run['train_loss_last10pct']:>12.4f}{run['peft_reload_max_abs_diff']:>18.2e}")
    lines.append("adapters (PEFT format): " + ", ".join(run["adapter"] for run in result["runs"]))
    return "\n".join(lines)
