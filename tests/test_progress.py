"""One progress display per job: a redrawn bar on a terminal, whole plain lines anywhere else."""

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from lorainit.display import ProgressDisplay

TOY = ["toy", "--widths", "8,16", "--lrs", "2^-6,2^-4,2^-2", "--seeds", "1", "--steps", "10", "--edge-rounds", "0"]
TOY_TOTAL = 10 * (8 + 16)  # the toy counts its work in steps x width
PLAIN = re.compile(r"^toy: step\*n (\d+)/(\d+) \((\d+)%\), \d+ s elapsed")


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "lorainit.cli", *args], text=True, timeout=300, **kwargs)


def test_the_toy_to_a_pipe_prints_whole_lines_of_the_work_done(tmp_path):
    proc = _cli(*TOY, "--out", str(tmp_path / "toy"), capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    lines = proc.stderr.splitlines()
    counts = [PLAIN.match(line) for line in lines]
    assert all(counts), lines  # every line on stderr is a progress line, whole
    # from nothing to all of it, one line as each width is trained
    assert [(int(m[1]), int(m[2])) for m in counts] == [(0, TOY_TOTAL), (10 * 8, TOY_TOTAL), (TOY_TOTAL, TOY_TOTAL)]
    assert lines[1].endswith("| width 8 (1/2) trained") and lines[2].endswith("| width 16 (2/2) trained")
    assert "slope" in proc.stdout  # the results still go to stdout


def test_the_toy_quiet_prints_no_progress(tmp_path):
    proc = _cli(*TOY, "--quiet", "--out", str(tmp_path / "toy"), capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""


def test_the_toy_on_a_terminal_redraws_one_bar(tmp_path):
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    proc = subprocess.Popen([sys.executable, "-m", "lorainit.cli", *TOY, "--out", str(tmp_path / "toy")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=child)
    os.close(child)
    seen = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(parent)
    assert proc.wait(timeout=300) == 0
    proc.stdout.close()
    text = seen.decode()
    assert text.count("\r") > 2  # redrawn in place
    assert f"| {TOY_TOTAL}/{TOY_TOTAL} [" in text  # tqdm's bar, run to its end
    assert not any(PLAIN.match(line) for line in text.replace("\r", "\n").splitlines())  # and no plain lines


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_come_at_milestones_and_at_most_one_a_minute():
    out, clock = io.StringIO(), Clock()
    display = ProgressDisplay("sweep", 100, "step", status="runs 0 done", stream=out, clock=clock)
    for _ in range(10):  # 10 steps in 50 s: no line
        clock.now += 5
        display.update(1, "pack 1/2")
    assert out.getvalue().splitlines() == ["sweep: step 0/100 (0%), 0 s elapsed | runs 0 done"]
    clock.now = 61
    display.update(1, "pack 1/2 step 11/50")  # a minute since the last line: one more
    clock.now = 62
    display.update(1)  # and then none, a second later
    display.mark("pack 1/2 finished", 38)  # a milestone: a line now
    clock.now = 70
    display.close()  # nothing changed since the milestone: no last line
    lines = out.getvalue().splitlines()
    assert lines[1:] == ["sweep: step 11/100 (11%), 1 min 1 s elapsed, about 8 min 14 s left | pack 1/2 step 11/50",
                         "sweep: step 50/100 (50%), 1 min 2 s elapsed, about 1 min 2 s left | pack 1/2 finished"]
    assert "\r" not in out.getvalue()


def test_a_disabled_display_writes_nothing():
    out = io.StringIO()
    with ProgressDisplay("sweep", 10, enabled=False, stream=out) as display:
        display.update(5, "half")
        display.mark("done", 5)
    assert out.getvalue() == ""


def test_train_to_a_pipe_shows_the_sweep_display_as_lines_and_no_bar_of_the_pack(tmp_path, glue_data):
    proc = _cli("train", "--out", str(tmp_path / "one"), "--max_steps", "2", "--max-train-samples", "8",
                "--max_eval_samples", "8", "--init", "b", capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "sweep: step 0/2 (0%), 0 s elapsed | runs 0 trained, 0 diverged, 1 left"
    finished = r"sweep: step 2/2 \(100%\), \d+ s elapsed \| runs 1 trained, 0 diverged, 0 left \| pack 1/1 finished"
    assert re.fullmatch(finished, lines[1]), lines
    # the run's status as results.csv shows it; no "pack of 1" display, no load report
    assert re.match(r"sweep 'train': (1 done|0 done, 1 did not learn)", lines[2]) and len(lines) == 3, lines
