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


TINY_SWEEP = """\
name: tiny
base: {model: minilm, task: sst2, max_steps: 4, batch_size: 4, max_train_samples: 32, max_eval_samples: 16,
       save_adapters: false}
grid: {init: [a, b], lr: [1.0e-3, 1.0e-2], seed: [0, 1]}
pack_size: 8
"""


def test_the_story_runs_theory_toy_sweep_and_report(tmp_path):
    from lorainit.demo import run_story

    said = []
    done = run_story(tmp_path, sweep_text=TINY_SWEEP, toy_widths=(16, 32), toy_steps=20, say=said.append)
    text = "\n".join(said)
    for part in ("1/4 theory", "2/4 the teacher-student toy", "3/4 a learning-rate sweep", "4/4 the report"):
        assert part in text
    assert "largest stable learning rate Theta(n^-0.5)" in text
    assert "Init[A]'s optimal lr >= Init[B]'s" in text  # the findings, printed
    assert (tmp_path / "sst2" / "report" / "index.html").is_file() and done["report"].endswith("index.html")
    assert (tmp_path / "toy" / "report" / "index.html").is_file()
    assert (tmp_path / "sst2-sweep.yaml").read_text() == TINY_SWEEP


def test_without_data_the_story_says_what_is_missing_and_runs_theory_and_toy(tmp_path):
    from lorainit.demo import run_story

    said = []
    done = run_story(tmp_path / "out", data_dir=str(tmp_path / "nothing"), sweep_text=TINY_SWEEP,
                     toy_widths=(16, 32), toy_steps=20, say=said.append)
    text = "\n".join(said)
    assert "no SST-2 rows, so no sweep" in text and "LORAINIT_DATA" in text
    assert (tmp_path / "out" / "toy" / "report" / "index.html").is_file()
    assert "report" not in done and not (tmp_path / "out" / "sst2").exists()
