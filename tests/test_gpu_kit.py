"""The GPU check kit (benchmarks/gpu_check.sh) at its tiny size on the CPU: every section reports,
a pack equals its runs alone within the stated fp32 bound, the timings measure something, and the
wrapper finds a Python and lorainit without an install."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "benchmarks" / "gpu_check.sh"
SECTIONS = {"setup", "pack_fp32", "pack_bf16", "pack_fp16", "fp16_overflow", "encoder_22", "encoder_66", "decoder"}
TIMED = {"encoder_22", "encoder_66", "decoder"}


def _kit(out: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    env = os.environ | {"PY": sys.executable, "OUT": str(out)}
    env.pop("LORAINIT_DATA", None)  # the kit carries its own rows
    done = subprocess.run(["bash", str(KIT), "--tiny", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads((out / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done, report = _kit(out)
    return out, done, report


def test_every_section_reports(tiny):
    out, done, report = tiny
    assert set(report["sections"]) == SECTIONS
    assert report["sections"]["setup"]["status"] == "ok"
    assert report["sections"]["setup"]["peak"]["tflops"] > 0
    assert {r["section"] for r in report["rows"]} == SECTIONS  # every section has a row in the table
    table = (out / "gpu_check.txt").read_text()
    assert table.splitlines()[0].split()[:3] == ["section", "variant", "status"]
    assert table in done.stdout


def test_pack_equals_runs_alone_within_the_stated_bound(tiny):
    _, _, report = tiny
    check = report["sections"]["pack_fp32"]
    assert check["status"] == "pass", check
    assert check["bounds"]["loss"] == 1e-4  # the tests' bound for a pack against its runs alone
    for key, bound in check["bounds"].items():
        assert 0 <= check["measured"][key] <= bound, (key, check["measured"])
    assert check["runs"] == 4 and check["distinct_final_losses"] == 4


def test_low_precision_checks_say_they_need_cuda(tiny):
    _, _, report = tiny
    for name in ("pack_bf16", "pack_fp16", "fp16_overflow"):
        section = report["sections"][name]
        assert section["status"] == "skipped" and section["error"] == "needs CUDA", section
        assert [r["note"] for r in section["rows"]] == ["skipped: needs CUDA"]


def test_timings_measure_the_pack_and_the_runs_one_by_one(tiny):
    _, _, report = tiny
    for name in TIMED:
        section = report["sections"][name]
        assert section["status"] == "ok", section
        timed = [r for r in section["rows"] if r.get("steps_per_s") is not None]
        assert timed and all(r["steps_per_s"] > 0 and r["run_steps_per_s"] > 0 for r in timed), section["rows"]
        assert section["pack"]["tokens"] > 0 and section["pack"]["tflops"] > 0
    assert report["sections"]["encoder_22"]["pack"]["runs"] == 22
    assert report["sections"]["encoder_66"]["pack"]["runs"] == 66
    for name in ("encoder_22", "decoder"):
        variants = {r["variant"] for r in report["sections"][name]["rows"]}
        assert {"PEFT + AdamW loop", "Trainer + PEFT"} <= variants
        loop = report["sections"][name]["loop"]
        assert loop["timed_runs"] < report["sections"][name]["pack"]["runs"]  # a few timed, and said so
        assert any("timed" in r["note"] for r in report["sections"][name]["rows"])


def test_overflowing_run_leaves_its_pack_mates_alone_under_cpu_autocast(tmp_path):
    """The fp16 section's own logic, run through CPU autocast (the numbers are not a GPU's)."""
    _, report = _kit(tmp_path, "--cpu-autocast", "--only", "fp16_overflow")
    section = report["sections"]["fp16_overflow"]
    assert section["status"] == "pass", section
    assert all(section["checks"].values())
    assert section["bit_identical_to_same_pack"]
    assert section["scale_after"][1] == 2.0 ** (100 - section["steps"])


def _fake_python(path: Path) -> Path:
    """An executable that prints how it was called: its name, arguments and the kit's environment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\necho "$0 $* PYTHONPATH=$PYTHONPATH HF_HUB_OFFLINE=$HF_HUB_OFFLINE OUT=$OUT"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.mark.parametrize("where", ["PY", ".venv", "python3"])
def test_wrapper_picks_its_python(tmp_path, where):
    """$PY if set, else .venv/bin/python if present, else python3 on the PATH; always with src on
    PYTHONPATH and the hub offline."""
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks").mkdir(parents=True)
    (checkout / "benchmarks" / "gpu_check.sh").write_text(KIT.read_text())
    bin_dir = tmp_path / "bin"
    expected = _fake_python(bin_dir / "python3")
    env = {k: v for k, v in os.environ.items() if k not in ("PY", "OUT", "PYTHONPATH")}
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    if where == "PY":
        expected = _fake_python(tmp_path / "mine" / "python")
        env["PY"] = str(expected)
    elif where == ".venv":
        expected = _fake_python(checkout / ".venv" / "bin" / "python")
    done = subprocess.run(["bash", str(checkout / "benchmarks" / "gpu_check.sh"), "--tiny"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    called, *rest = done.stdout.split()
    assert (checkout / called).resolve() == expected.resolve()  # a relative path is the checkout's
    assert rest[:4] == ["benchmarks/gpu_check.py", "--out", "runs/gpu_check", "--tiny"]
    (pythonpath,) = [Path(word.split("=", 1)[1]) for word in rest if word.startswith("PYTHONPATH=")]
    assert pythonpath.resolve() == (checkout / "src").resolve()
    assert "HF_HUB_OFFLINE=1" in rest and "OUT=runs/gpu_check" in rest
