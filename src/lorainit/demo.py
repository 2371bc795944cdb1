"""`lorainit demo`: a short real LoRA finetune of MiniLM on SST-2, Init[A] and Init[B] in one pack.

Both runs share the seed, so they see the same batches and dropout masks (common random numbers)
and differ only in which factor starts random. The demo ends by reloading each exported adapter
with PEFT on a fresh base model, to show that its outputs equal the pack's.
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


def run_demo(out: str, steps: int = 150, batch_size: int = 16, lr: float = 5e-4, seed: int = 0,
             train_rows: int = 4000, eval_rows: int | None = None, data_dir: str | None = None) -> dict:
    """Finetune Init[A] and Init[B] side by side; write results and PEFT adapters to `out`."""
    t0 = time.perf_counter()
    runs = [RunConfig.from_dict(dict(model="minilm", task="sst2", init=init, lr=lr, seed=seed, max_steps=steps,
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
        "model": "minilm", "task": "sst2", "steps": steps, "batch_size": batch_size, "lr": lr,
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
    lines = [f"MiniLM on SST-2: {result['steps']} steps of batch {result['batch_size']}, lr {result['lr']:g}, "
             f"rank {result['rank']}, seed {result['seed']} ({result['seconds']} s)",
             f"{'init':<8}{'dev acc before':>16}{'dev acc after':>15}{'train loss':>12}{'PEFT reload diff':>18}"]
    for run in result["runs"]:
        lines.append(f"Init[{run['init'].upper()}]  {run['accuracy_before']:>14.3f}{run['accuracy_after']:>15.3f}"
                     f"{run['train_loss_last10pct']:>12.4f}{run['peft_reload_max_abs_diff']:>18.2e}")
    lines.append("adapters (PEFT format): " + ", ".join(run["adapter"] for run in result["runs"]))
    return "\n".join(lines)
