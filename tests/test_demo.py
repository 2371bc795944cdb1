"""The demo's finetune: a real (short) run whose adapters reload in PEFT unchanged."""

import json

import pytest

from lorainit.demo import run_demo


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
base:
  model: minilm
  task: sst2-slice
  max_steps: 4
  batch_size: 4
  max_train_samples: 32
  max_eval_samples: 16
  save_adapters: false
grid: {init: [a, b], lr: [1.0e-3, 1.0e-2], seed: [0, 1]}
pack_size: 8
"""
TINY_TOY = dict(widths=(16, 32), seeds=2)


def test_the_story_runs_theory_toy_sweep_and_report_on_the_shipped_slice(tmp_path):
    from lorainit.demo import run_story

    said = []
    done = run_story(tmp_path, sweep_text=TINY_SWEEP, toy=TINY_TOY, toy_steps=20, say=said.append)
    text = "\n".join(said)
    for part in ("1/4 theory", "2/4 the teacher-student toy", "3/4 a learning-rate sweep on MiniLM / sst2-slice",
                 "4/4 the report"):
        assert part in text
    assert "largest stable learning rate Theta(n^-0.5)" in text
    assert "sst2-slice, final accuracy ↑:" in text and "Init[A]:" in text  # the findings, printed
    assert (tmp_path / "sst2" / "report" / "index.html").is_file() and done["report"].endswith("index.html")
    assert (tmp_path / "toy" / "report" / "index.html").is_file()
    assert (tmp_path / "sst2-sweep.yaml").read_text() == TINY_SWEEP


def test_the_demos_own_sweep_and_toy_are_the_documented_ones():
    from lorainit.demo import SWEEP, TOY
    from lorainit.sweeps import file

    sweep = file.parse(SWEEP)
    assert {r.task for r in sweep.runs} == {"sst2-slice"} and len(sweep.runs) == 30  # 5 lrs x 2 inits x 3 seeds
    assert {r.init for r in sweep.runs} == {"a", "b"} and len({r.lr for r in sweep.runs}) == 5
    assert {r.seed for r in sweep.runs} == {0, 1, 2} and sweep.runs[0].eval_every > 0  # collapse is visible
    assert TOY["widths"][0] >= 256 and list(TOY["lrs"]) == sorted(TOY["lrs"])


def test_with_a_data_folder_the_sweep_is_the_full_task_there(tmp_path):
    from lorainit import slices
    from lorainit.demo import run_story

    glue_root = str(slices.ROOT / "glue")  # a GLUE root holding SST-2/, as a user's would
    done = run_story(tmp_path, data_dir=glue_root, sweep_text=TINY_SWEEP, toy=TINY_TOY, toy_steps=20,
                     say=lambda line: None)
    written = (tmp_path / "sst2-sweep.yaml").read_text()
    assert "  task: sst2\n" in written and f"data_dir: \"{glue_root}\"" in written
    assert "sst2, final accuracy ↑:" in done["findings"]


def test_a_data_folder_without_rows_stops_the_demo_before_anything_runs(tmp_path):
    from lorainit.demo import run_story
    from lorainit.errors import BadInput

    said = []
    with pytest.raises(BadInput, match=r"SST-2/train.tsv: file not found"):
        run_story(tmp_path / "out", data_dir=str(tmp_path / "nothing"), sweep_text=TINY_SWEEP, toy=TINY_TOY,
                  toy_steps=20, say=said.append)
    assert said == [] and not (tmp_path / "out").exists()
