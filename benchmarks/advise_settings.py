"""The three settings `benchmarks/advise_vs_grid.py` runs `lorainit advise` and the full grid on.

Fixed before any comparison was made; `sst2` is the held-out set, never run while `advise` was
being built. Each setting is the base run, the families, the lr grid (octaves), the seeds and the
target length; the full grid is every family x lr x seed at the target length.
"""

from __future__ import annotations


def octaves(low: int, high: int) -> list[float]:
    """2^low .. 2^high, one octave apart."""
    return [2.0 ** e for e in range(low, high + 1)]


def settings(data: str) -> dict[str, dict]:
    """The settings, their data read from the root `data` (laid out like LORAINIT_DATA, with byo/)."""
    trec = {"type": "classification", "train": f"{data}/byo/trec/train.csv", "eval": f"{data}/byo/trec/test.csv"}
    code = {"type": "sft", "style": "instruction", "train": f"{data}/byo/gpteacher_codegen/train.jsonl",
            "eval": f"{data}/byo/gpteacher_codegen/test.jsonl", "columns": {"output": "response"},
            "too_long": "truncate"}
    encoder = {"model": "minilm", "rank": 8, "alpha": 8, "dropout": 0.1, "batch_size": 8, "warmup_ratio": 0.06,
               "save_adapters": False}
    return {
        "trec": {"base": encoder | {"task": trec, "max_seq_len": 32},
                 "families": ["a", "b", "orthogonal", "pissa"], "lrs": octaves(-18, -5), "seeds": [0, 1],
                 "steps": 160},
        "code": {"base": {"model": "smollm2-135m", "task": code, "rank": 8, "alpha": 8, "dropout": 0.0,
                          "batch_size": 2, "max_seq_len": 96, "max_train_samples": 400, "max_eval_samples": 16,
                          "warmup_ratio": 0.06, "save_adapters": False},
                 "families": ["a", "b"], "lrs": octaves(-13, -8), "seeds": [0, 1], "steps": 30},
        "sst2": {"base": encoder | {"task": "sst2", "max_seq_len": 64, "max_train_samples": 4000,
                                    "max_eval_samples": 400},
                 "families": ["a", "b", "pissa"], "lrs": octaves(-17, -6), "seeds": [0, 1], "steps": 120},
    }


def grid_file(name: str, setting: dict) -> str:
    """The full grid's sweep file (YAML)."""
    import yaml

    doc = {"name": f"{name}-grid", "base": setting["base"] | {"max_steps": setting["steps"]},
           "grid": {"init": setting["families"], "seed": setting["seeds"], "lr": setting["lrs"]}}
    return yaml.safe_dump(doc, sort_keys=False)
