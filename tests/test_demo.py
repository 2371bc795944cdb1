"""The demo's finetune: a real (short) run whose adapters reload in PEFT unchanged."""

import json

import pytest

from lorainit.demo import run_demo

pytestmark = pytest.mark.usefixtures("glue_data")


def test_short_demo_run(tmp_path):
    result = run_demo(str(tmp_path), steps=6, batch_size=4, lr=1e-3, train_rows=64, eval_rows=48)
    runs = {r["init"]: r for r in result["runs"]}
    # both inits start from the same function: B A = 0 and the heads share the seed; as two slots
    # of one batched matmul their logits agree to fp32 rounding, so one of 48 rows may flip at most
    assert abs(runs["a"]["accuracy_before"] - runs["b"]["accuracy_before"]) <= 1 / 48 + 1e-9
    for run in runs.values():
        assert run["peft_reload_max_abs_diff"] <= 1e-5  # logits of order 1: fp32 rounding between kernels
        assert (tmp_path / "adapters" / run["run_id"] / "adapter_model.safetensors").is_file()
    # training changed the runs' functions, and differently for the two inits
    assert runs["a"]["train_loss_last10pct"] != runs["b"]["train_loss_last10pct"]
    assert json.loads((tmp_path / "demo_results.json").read_text())["steps"] == 6
