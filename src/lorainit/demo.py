"""`lorainit demo`: a short real LoRA finetune of MiniLM on SST-2, Init[A] and Init[B] in one pack.

Both runs share the seed, so they see the same batches (common random numbers) and differ only
in which factor starts random. They also share the learning rate, so one `torch.optim.AdamW` over
the stacked (K, ...) tensors is exactly AdamW run by run: Adam's update is elementwise and, with
no weight decay, nothing couples run k's slice to another's. The demo ends by exporting each run
as a PEFT adapter and reloading it with PEFT to show the outputs agree.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from lorainit import models, rng
from lorainit.lora import LoRAConfig, LoRAPack
from lorainit.peft_io import export_run
from lorainit.tasks import glue

INITS = ("a", "b")


def _batches(ids, type_ids, order, batch_size, pad_id):
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = order[start:start + batch_size].tolist()
        yield rows, glue.collate([ids[i] for i in rows], pad_id,
                                 [type_ids[i] for i in rows] if type_ids else None)


@torch.no_grad()
def evaluate(pack: LoRAPack, ids, type_ids, labels, pad_id, chunk: int = 64) -> list[float]:
    """Accuracy of each run on the rows given; rows are sorted by length to cut padding."""
    pack.model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    correct = torch.zeros(pack.num_runs)
    for start in range(0, len(order), chunk):
        rows = order[start:start + chunk]
        batch = glue.collate([ids[i] for i in rows], pad_id, [type_ids[i] for i in rows] if type_ids else None)
        stacked = {k: v.repeat(pack.num_runs, 1) for k, v in batch.items()}
        logits = pack.model(**stacked).logits.view(pack.num_runs, len(rows), -1)  # (K, b, C)
        y = torch.tensor([labels[i] for i in rows])
        correct += (logits.argmax(-1) == y).sum(1).float()
    return (correct / len(ids)).tolist()


def run_demo(out: str, steps: int = 150, batch_size: int = 16, lr: float = 5e-4, seed: int = 0,
             train_rows: int = 4000, eval_rows: int | None = None, data_dir: str | None = None) -> dict:
    """Finetune Init[A] and Init[B] side by side; write results and PEFT adapters to `out`."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the base model's own dropout layers draw from the global stream
    model, tokenizer = models.load("minilm", "classification", num_labels=2)
    config = LoRAConfig(rank=8, alpha=16, dropout=0.1, targets=("query", "value"))
    pack = LoRAPack(model, config, num_runs=len(INITS))
    for k, init in enumerate(INITS):
        pack.init_run(k, init, "kaiming", seed)
    pack.set_dropout_seeds([seed] * len(INITS))

    train = glue.read("sst2", "train", data_dir, max_rows=train_rows)
    dev = glue.read("sst2", "eval", data_dir, max_rows=eval_rows)
    train_ids, train_tt = glue.encode(train, tokenizer, 128)
    dev_ids, dev_tt = glue.encode(dev, tokenizer, 128)
    pad = tokenizer.pad_token_id
    acc_before = evaluate(pack, dev_ids, dev_tt, dev.labels, pad)

    optimizer = torch.optim.AdamW(pack.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, int(0.06 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    order = torch.randperm(len(train_ids), generator=rng.generator(seed, "data"))
    losses = []
    pack.model.train()
    bar = tqdm(total=steps, desc="demo: MiniLM SST-2, Init[A] + Init[B]", unit="step")
    batches = _batches(train_ids, train_tt, order, batch_size, pad)
    for step in range(steps):
        try:
            rows, batch = next(batches)
        except StopIteration:
            order = torch.randperm(len(train_ids), generator=rng.generator(seed, "data", step))
            batches = _batches(train_ids, train_tt, order, batch_size, pad)
            rows, batch = next(batches)
        stacked = {k: v.repeat(pack.num_runs, 1) for k, v in batch.items()}
        y = torch.tensor([train.labels[i] for i in rows]).repeat(pack.num_runs)
        logits = pack.model(**stacked).logits
        per_run = F.cross_entropy(logits, y, reduction="none").view(pack.num_runs, -1).mean(1)  # (K,)
        optimizer.zero_grad(set_to_none=True)
        per_run.sum().backward()  # each run's gradient is exactly its own loss's gradient
        optimizer.step()
        schedule.step()
        losses.append(per_run.detach().tolist())
        bar.set_postfix({f"loss_{i}": f"{l:.3f}" for i, l in zip(INITS, losses[-1])})
        bar.update()
    bar.close()
    acc_after = evaluate(pack, dev_ids, dev_tt, dev.labels, pad)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    check = _peft_reload_check(pack, out_dir, dev_ids[:32], dev_tt[:32] if dev_tt else None, pad)
    tail = max(1, steps // 10)
    result = {
        "model": "minilm", "task": "sst2", "steps": steps, "batch_size": batch_size, "lr": lr,
        "seed": seed, "rank": config.rank, "alpha": config.alpha, "dropout": config.dropout,
        "runs": [{"init": init, "accuracy_before": acc_before[k], "accuracy_after": acc_after[k],
                  "train_loss_last10pct": sum(l[k] for l in losses[-tail:]) / tail,
                  "adapter": str(out_dir / "adapters" / f"init_{init}"),
                  "peft_reload_max_abs_diff": check[k]}
                 for k, init in enumerate(INITS)],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out_dir / "demo_results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


@torch.no_grad()
def _peft_reload_check(pack: LoRAPack, out_dir: Path, ids, type_ids, pad) -> list[float]:
    """Export each run, reload it with PEFT on a fresh base, return max |logit diff| per run."""
    from peft import PeftModel

    batch = glue.collate(ids, pad, type_ids)
    pack.model.eval()
    packed = pack.model(**{k: v.repeat(pack.num_runs, 1) for k, v in batch.items()}).logits
    packed = packed.view(pack.num_runs, len(ids), -1)
    diffs = []
    for k, init in enumerate(INITS):
        folder = export_run(pack, k, out_dir / "adapters" / f"init_{init}", base_model="minilm")
        base, _ = models.load("minilm", "classification", num_labels=2)
        peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
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
