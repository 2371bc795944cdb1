"""The `lorainit` command: help, exit codes, one-line errors."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lorainit.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_help_lists_commands():
    proc = _run("--help")
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "model" in proc.stdout


def test_bad_model_spec_exits_2_with_one_line():
    proc = _run("model", "no-such-org/no-such-model")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorainit: error: model 'no-such-org/no-such-model'")
    assert "Traceback" not in proc.stderr


def test_model_command_counts_trainable_parameters_like_peft():
    proc = _run("model", "minilm", "--targets", "query,value", "--rank", "8")
    assert proc.returncode == 0, proc.stderr
    assert "linear module names" in proc.stdout and "query" in proc.stdout
    # 12 layers x 8 x (384 + 384) LoRA weights + the 384x2+2 classifier: PEFT's count for this config
    assert "trainable parameters per run: 74,498" in proc.stdout


def test_unknown_target_exits_2():
    proc = _run("model", "minilm", "--targets", "q_proj")
    assert proc.returncode == 2
    assert "'q_proj' match no linear layer" in proc.stderr and "query" in proc.stderr


def test_model_command_names_the_head_it_draws_without_the_librarys_load_report():
    proc = _run("model", "minilm")
    assert proc.returncode == 0, proc.stderr
    assert "not in the checkpoint, drawn per run from its seed: classifier.bias, classifier.weight" in proc.stdout
    assert proc.stderr == ""  # no "LOAD REPORT ... MISSING" table, no "Loading weights" bar
