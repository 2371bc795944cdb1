"""The Ray executor on a real local Ray instance, with a worker killed mid-pack, and on a real
two-node cluster whose worker node has neither the driver's environment nor its working folder.

Ray binds to the machine's outward address even when asked for 127.0.0.1, so the sweeps run in
a network namespace each test makes, with only the loopback interface up: nothing they start can
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
pack_size: 4
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
            # once the pack (one task, on one worker) has a checkpoint, kill its worker. One pack,
            # not two: two packs on two workers need not overlap in time (one can finish before
            # the other's worker has started), and a worker killed before its pack's first
            # checkpoint would start over rather than resume.
            packs = {p.parent for p in out.glob("checkpoints/*/step-*.ckpt")}
            pids = subprocess.run(["pgrep", "-f", "ray::_train"], capture_output=True, text=True).stdout.split()
            if len(packs) == 1 and len(pids) == 1:
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


# Sweeps for the two-node cluster, run from a folder holding the same rows as GLUE's TSVs
# (glue/SST-2/) and as CSV files (data/). Each reads them through what the worker node lacks: the
# GLUE task through a data_dir relative to that folder and through $LORAINIT_DATA; the declared
# task through paths relative to the sweep file, which the driver resolves. Both tokenise once,
# into the driver's $LORAINIT_CACHE.
CLUSTER_SWEEPS = {
    "glue": """\
name: two-nodes
base:
  model: minilm
  task: sst2
  max_steps: 3
  max_train_samples: 12
  max_eval_samples: 8
  batch_size: 4
grid:
  data_dir: [glue, null]   # relative to the folder the sweep is run from; null: $LORAINIT_DATA/glue
  lr: [1.0e-4, 2.0e-3]
pack_size: 2
""",
    "declared": """\
name: two-nodes
base:
  model: minilm
  task: {type: classification, train: data/train.csv, eval: data/test.csv, text: sentence, label: label}
  max_steps: 3
  max_train_samples: 12
  max_eval_samples: 8
  batch_size: 4
grid:
  lr: [1.0e-4, 2.0e-3, 1.0e-3, 3.0e-3]
pack_size: 2
""",
}
PORT = 6379  # the head's; the namespace is the test's own, so nothing else holds it


def _write_rows(folder: Path, rows: int = 16) -> None:
    """The first `rows` rows of SST-2's train and dev sets, as GLUE's TSVs and as CSV files."""
    source = Path(os.environ["LORAINIT_DATA"]) / "glue" / "SST-2"
    (folder / "glue" / "SST-2").mkdir(parents=True)
    (folder / "data").mkdir()
    for split, csv_name in (("train", "train"), ("dev", "test")):
        lines = (source / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[:rows + 1]
        (folder / "glue" / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        with open(folder / "data" / f"{csv_name}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(line.split("\t") for line in lines)


def _start(command: list[str], env: dict, cwd: Path | str) -> subprocess.Popen:
    """A process in a session (and process group) of its own, so that it and all it starts can be killed."""
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _ray_node(netns: str, args: list[str], env: dict, cwd: Path | str, temp_dir: str) -> subprocess.Popen:
    """`ray start` in the namespace, returned once the node runs; its processes stay in its group."""
    ray = str(Path(sys.executable).parent / "ray")
    proc = _start(["ip", "netns", "exec", netns, ray, "start", *args, "--node-ip-address", "127.0.0.1",
                   "--temp-dir", temp_dir, "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"],
                  env, cwd)
    said, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, said[-3000:]
    return proc


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tasks_ran(temp_dir: str) -> set[str]:
    """The Ray task functions whose workers logged under `temp_dir` (a node's own): Ray marks each
    task's start in its worker's log with a `:task_name:` line."""
    names = set()
    for log in Path(temp_dir).glob("session_*/logs/worker-*.out"):
        names |= {line.split(":task_name:", 1)[1].strip() for line in log.read_text(errors="replace").splitlines()
                  if line.startswith(":task_name:")}
    return names


@pytest.mark.parametrize("sweep", CLUSTER_SWEEPS.values(), ids=CLUSTER_SWEEPS.keys())
def test_a_cluster_node_trains_in_the_drivers_environment(tmp_path, netns, sweep):
    """Packs run only on a second node (the head declares no CPU) whose `ray start` had none of
    the driver's variables and another working folder; they read the rows the driver would."""
    from lorainit.sweeps.ray_executor import DRIVER_ENV

    here = tmp_path / "driver"  # the folder the sweep is run from, holding the data
    _write_rows(here)
    (here / "sweep.yaml").write_text(sweep)
    node_home = tmp_path / "node-home"  # where the worker node's own lorainit cache would be
    bare = {k: v for k, v in os.environ.items() if k not in DRIVER_ENV} | {"RAY_AUTH_MODE": "disabled",
                                                                           "PYTHONUNBUFFERED": "1"}
    driver = bare | {"LORAINIT_DATA": str(here), "LORAINIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    bare["HOME"] = str(node_home)
    head_tmp, node_tmp = (tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("lh", "ln"))  # short: socket paths
    started = []
    try:
        started.append(_ray_node(netns, ["--head", "--port", str(PORT), "--num-cpus", "0", "--num-gpus", "0",
                                         "--include-dashboard", "false"], driver, here, head_tmp))
        started.append(_ray_node(netns, ["--address", f"127.0.0.1:{PORT}", "--num-cpus", "2", "--num-gpus", "0"],
                                 bare, "/", node_tmp))
        started.append(_start(["ip", "netns", "exec", netns, sys.executable, "-m", "lorainit.cli", "sweep",
                               "sweep.yaml", "--out", "out", "--executor", "ray", "--ray-address",
                               f"127.0.0.1:{PORT}", "--quiet"], driver, here))
        said, _ = started[-1].communicate(timeout=300)
        assert started[-1].returncode == 0, said[-3000:]
        rows = _rows(here / "out")
        assert len(rows) == 4 and {r["status"] for r in rows} == {"done"} and {r["steps"] for r in rows} == {"3"}
        for r in rows:
            assert (here / "out" / "adapters" / r["run_id"] / "adapter_config.json").exists()
        # every pack, and the probe of the workers' device, ran on the second node
        assert _tasks_ran(node_tmp) == {"_train", "_free_memory"}
        assert _tasks_ran(head_tmp) == set()
        # ... and read the tokenised rows from the driver's cache, making none of the node's own
        assert (tmp_path / "cache" / "data").is_dir() and not (node_home / ".cache").exists()
    finally:
        for proc in reversed(started):
            _kill_group(proc)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(node_tmp, ignore_errors=True)


def test_a_cluster_gets_the_drivers_settings_with_paths_absolute(tmp_path, monkeypatch):
    """What `ray.init` passes every worker: the variables set here, paths made absolute, the
    unset and the empty left out (a worker keeps its own)."""
    from lorainit.sweeps.ray_executor import driver_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAINIT_DATA", "data")
    monkeypatch.setenv("LORAINIT_CACHE", "/shared/cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("LORAINIT_UNRELATED", "x")
    assert driver_env() == {"LORAINIT_DATA": str(tmp_path / "data"), "LORAINIT_CACHE": "/shared/cache",
                            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_a_node_without_the_sweep_folder_fails_its_runs_saying_why(tmp_path):
    """A pack's task on a node that does not see the sweep folder, or the folder the sweep was run
    from, trains nothing and fails its runs with a message that says what every node must see."""
    from lorainit.config import RunConfig
    from lorainit.sweeps.ray_executor import _train

    runs = [RunConfig.from_dict(dict(model="minilm", task="sst2", max_steps=2, lr=lr)).to_dict() for lr in (1e-4, 1e-3)]
    outcome = _train(runs, str(tmp_path / "out"), "cpu", str(tmp_path / "gone"))
    assert [r["status"] for r in outcome["results"]] == ["failed", "failed"]
    error = outcome["results"][0]["error"]
    assert f"the sweep folder {tmp_path / 'out'} or the folder the sweep was run from, {tmp_path / 'gone'}" in error
    assert error.endswith("must be on a filesystem every node sees")
    assert not (tmp_path / "out").exists()


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

        def remote(self, runs, out, device, cwd):
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
