"""The time a sweep loses to a SIGKILL at mid-sweep, and the check that it loses nothing else.

Runs the sweep file twice into fresh folders, each `lorainit sweep` in its own process:
  1. straight through;
  2. killed with SIGKILL half a checkpoint interval after the checkpoint at `--kill-at` of its
     steps (the interval's time taken from run 1), then resumed to the end.
Prints both wall times, their difference (the overhead: a second start-up, the steps since the last
checkpoint done again, and the checkpoints written), and whether the two results.csv agree in every
column but `seconds`.

    .venv/bin/python benchmarks/resume_overhead.py configs/cpu/glue-sst2-minilm.yaml [--kill-at 0.5]
        [--max-steps N]  # to shorten the sweep, as a copy of the file with this base max_steps
"""

from __future__ import annotations

import argparse
import csv
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def _command(file: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lorainit.cli", "sweep", str(file), "--out", str(out), "--quiet"]


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _newest_step(out: Path) -> int:
    steps = [int(m.group(1)) for p in (out / "checkpoints").glob("*/step-*.ckpt")
             if (m := re.match(r"step-(\d+)\.ckpt", p.name))] if (out / "checkpoints").is_dir() else []
    return max(steps, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="a sweep file with checkpoint_every > 0")
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of the steps at which to kill")
    parser.add_argument("--max-steps", type=int, default=None, help="run a copy of the file with this max_steps")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="resume-overhead-"))
    doc = yaml.safe_load(args.file.read_text())
    if args.max_steps:
        doc["base"]["max_steps"] = args.max_steps
    file = work / args.file.name
    file.write_text(yaml.safe_dump(doc, sort_keys=False))
    steps = doc["base"]["max_steps"]
    every = doc["base"].get("checkpoint_every", 0)
    if not every:
        parser.error("the sweep needs checkpoint_every > 0 to resume")

    t = time.perf_counter()
    subprocess.run(_command(file, work / "straight"), check=True)
    straight = time.perf_counter() - t

    out = work / "killed"
    kill_step = int(args.kill_at * steps)
    t = time.perf_counter()
    proc = subprocess.Popen(_command(file, out))
    while proc.poll() is None and _newest_step(out) < kill_step:
        time.sleep(0.05)
    time.sleep(straight / steps * every / 2)  # a kill between checkpoints loses half an interval
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = time.perf_counter() - t
    at = _newest_step(out)
    subprocess.run(_command(file, out), check=True)
    interrupted = time.perf_counter() - t

    same = _rows(work / "straight") == _rows(out)
    print(f"sweep {doc.get('name')}: {steps} steps, checkpoint every {every}")
    print(f"straight through:       {straight:7.1f} s")
    print(f"killed at step {at:>5} ({killed_after:6.1f} s in), then resumed: {interrupted:7.1f} s")
    print(f"overhead of the kill:   {interrupted - straight:7.1f} s ({(interrupted - straight) / straight:+.1%})")
    print(f"results.csv identical but for seconds: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
