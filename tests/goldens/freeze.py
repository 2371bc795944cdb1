"""Freeze the built-in tasks' encodings and a few training steps as golden data.

The built-in `sst2` and `gsm8k` tasks are to become presets of the data-declared task families.
Before that refactor, this script records what the code as it stood computes on the shipped
slices: every training and evaluation row's token ids (with SST-2's labels, GSM8K's first counted
position), and a short run's training losses and final metrics, once with every dropout off and
once with the defaults (LoRA and the base model's own dropout on, drawn from the run's seed).
`tests/test_goldens.py` holds today's and tomorrow's code to these files.

    .venv/bin/python tests/goldens/freeze.py     # rewrites tests/goldens/{sst2,gsm8k}.json

Run it only to freeze on purpose: the point of the files is that they do not follow the code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lorainit.config import RunConfig  # noqa: E402
from lorainit.train import PackTrainer  # noqa: E402

HERE = Path(__file__).parent
# (task, model, the run's fields, the base model's dropout settings for "dropout off")
# GSM8K at 256 tokens: some rows are cut, the rest are uneven (the padding-free layout)
CASES = {
    "sst2": ("sst2-slice", "minilm", dict(batch_size=4, max_seq_len=64, max_train_samples=16, max_eval_samples=8),
             {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}),
    "gsm8k": ("gsm8k-slice", "smollm2-135m", dict(batch_size=2, max_seq_len=256, max_train_samples=8,
                                                  max_eval_samples=2, max_new_tokens=8),
              {"attention_dropout": 0.0}),
}
STEPS = 3


def run_fields(name: str, dropout: bool) -> dict:
    task, model, fields, _ = CASES[name]
    return dict(model=model, task=task, init="a", lr=2e-3, seed=0, max_steps=STEPS, log_every=1,
                warmup_ratio=0.0, eval_every=0, save_adapters=False, dropout=0.1 if dropout else 0.0) | fields


def rows(trainer) -> dict:
    """Every training and evaluation row as the task encodes it."""
    task = trainer.task
    out = {}
    for split in ("train", "eval"):
        data = getattr(task, split)
        out[split] = {"ids": [list(map(int, r)) for r in data.ids]}
        if hasattr(data, "labels"):
            out[split]["labels"] = [int(y) for y in data.labels.tolist()]
        if getattr(data, "type_ids", None) is not None:
            out[split]["type_ids"] = [list(map(int, r)) for r in data.type_ids]
        if hasattr(data, "start"):
            out[split]["start"] = [int(s) for s in data.start]
    return out


def train(fields: dict, base_overrides: dict | None) -> dict:
    """A run's training losses, step by step, and its final metrics."""
    trainer = PackTrainer([RunConfig.from_dict(fields)], show_progress=False, model_overrides=base_overrides)
    (result,) = trainer.run()
    losses = [m["value"] for m in result.metrics if m["name"] == "train_loss"]
    return {"train_loss": losses, "final": result.final}


def freeze(name: str) -> dict:
    off, defaults, base_off = run_fields(name, False), run_fields(name, True), CASES[name][3]
    trainer = PackTrainer([RunConfig.from_dict(off)], show_progress=False, model_overrides=base_off)
    return {"fields": {"dropout_off": off, "defaults": defaults}, "base_dropout_off": base_off,
            "rows": rows(trainer), "runs": {"dropout_off": train(off, base_off), "defaults": train(defaults, None)}}


if __name__ == "__main__":
    for case in CASES:
        path = HERE / f"{case}.json"
        path.write_text(json.dumps(freeze(case), indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
