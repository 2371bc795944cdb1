"""The Ray executor on a real local Ray instance, with a worker killed mid-pack.

Ray binds to the machine's outward address even when asked for 127.0.0.1, so the sweep runs in
a network namespace this test makes, with only the loopback interface up: nothing it starts can
reach or bind anything but 127.0.0.1. Making one needs root (CI runs as root) and iproute2.
"""

import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("glue_data")

SWEEP = """\
name: ray-small
base:
  model: minilm
  task: sst2
  max_steps: 16
  max_train_samples: 64
  max_eval_samples: 32
  checkpoint_every: 2
  batch_size: 4
grid:
  init: [a, b]
  lr: [1.0e-4, 2.0e-3]
pack_size: 2
"""


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip`"
    return None


@pytest.fixture
def netns():
    reason = _can_make_namespaces()
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI must run the Ray test, but {reason}")  # .ci/run runs as root with iproute2
    if reason:
        pytest.skip(reason)
    name = f"lorainit-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        links = subprocess.run(["ip", "netns", "exec", name, "ip", "-o", "link"], check=True,
                               capture_output=True, text=True).stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_ray_sweep_survives_a_killed_worker(tmp_path, netns):
    file = tmp_path / "ray.yaml"
    file.write_text(SWEEP)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="lr", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = os.environ | {"RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = ["ip", "netns", "exec", netns, sys.executable, "-m", "lorainit.cli", "sweep", str(file),
               "--out", str(out), "--executor", "ray", "--quiet"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            # once both packs (two tasks, on two workers) have a checkpoint, kill one of the workers
            packs = {p.parent for p in out.glob("checkpoints/*/step-*.ckpt")}
            pids = subprocess.run(["pgrep", "-f", "ray::_train"], capture_output=True, text=True).stdout.split()
            if len(packs) == 2 and len(pids) == 2:
                killed = int(pids[0])
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert killed is not None, "no Ray worker was caught running a pack"
    assert proc.returncode == 0, stderr[-3000:]
    assert "A worker died or was killed while executing a task" in stdout + stderr
    # the retried task picked its pack up from the checkpoint (workers' output reaches the driver's)
    assert "resumed from its checkpoint at step" in stdout + stderr
    rows = _rows(out)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"} and {r["steps"] for r in rows} == {"16"}
    assert len({r["run_id"] for r in rows}) == 4
    assert not (out / "checkpoints").exists()
    for r in rows:
        assert (out / "adapters" / r["run_id"] / "adapter_config.json").exists()
