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

from conftest import skip_or_fail

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
    if reason:
        skip_or_fail(reason)  # .ci/run runs as root with iproute2
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
    assert killed is not None, f"no Ray worker was caught running a pack; the sweep said: {stderr[-3000:]}"
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
    # the workers' rows (a file per pack, for a worker on another host) reached the store, each
    # step once, the killed pack's included
    import sqlite3

    db = sqlite3.connect(out / "store.sqlite")
    steps = db.execute("SELECT run_id, step FROM metrics WHERE name = 'train_loss' ORDER BY run_id, step").fetchall()
    db.close()
    assert sorted(steps) == sorted((r["run_id"], s) for r in rows for s in range(1, 17))


def test_each_pack_task_declares_the_memory_its_pack_needs(monkeypatch):
    """The tasks' `memory` option comes from the planner's estimate for that pack, capped at the
    largest node; recorded through a stand-in for Ray that keeps what it was asked."""
    import types

    from lorainit.config import RunConfig
    from lorainit.sweeps import estimates, ray_executor
    from lorainit.sweeps.plan import Pack

    asked = []

    class Task:
        def options(self, **options):
            asked.append(options)
            return self

        def remote(self, runs, out, device):
            return len(asked)

    fake = types.SimpleNamespace(
        is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 2},
        nodes=lambda: [{"Alive": True, "Resources": {"memory": 8 * 2**30}}],
        remote=lambda **kw: (lambda fn: Task()), wait=lambda refs, num_returns: (refs[:1], refs[1:]),
        get=lambda ref: {"results": []}, exceptions=types.SimpleNamespace(RayError=RuntimeError))
    monkeypatch.setitem(sys.modules, "ray", fake)
    small = Pack([RunConfig.from_dict(dict(model="minilm", max_steps=2, lr=lr)) for lr in (1e-4, 1e-3)])
    huge = Pack([RunConfig.from_dict(dict(model="minilm", max_steps=2, batch_size=4096))])
    store = types.SimpleNamespace(start_pack=lambda *a: None)
    recorded = []
    ray_executor.run_packs([small, huge], Path("."), "cpu", store, None, lambda p, o: recorded.append(p))
    shape = estimates.model_shape("minilm")
    assert asked[0] == {"memory": estimates.memory_per_pack(small.runs[0], shape, 2)}
    assert asked[1] == {"memory": 8 * 2**30}  # more than any node: a whole node
    assert recorded == [small, huge]
