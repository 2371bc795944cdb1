"""The Ray executor: one Ray task per pack, one GPU per pack where the cluster has GPUs.

`lorainit sweep FILE --executor ray [--ray-address auto|HOST:PORT]`. Without an address a local
Ray instance is started (and stopped at the end). A task whose worker dies is retried by Ray, and
the retry resumes the pack from its last checkpoint. Workers write checkpoints and adapters into
the sweep folder, which every node must see (a shared filesystem), append their runs' metric rows
to a file in their pack's checkpoint folder (`store.RowFile`: a store's SQLite WAL needs every
writer on one host), and hand their results back; the driver records them with the rows (through
`record`). A task's
entry point is `sweeps.worker.train_pack`, which imports nothing of the driver.

Each pack's task declares the memory its pack needs (Ray's `memory` resource, from the planner's
estimate), so that Ray never puts more packs on a node than fit. The default pack size and the
checks before any write use the device a task gets and the memory free there, read on a worker
(`worker_device`), not the driver's.

On a cluster (`--ray-address`), workers started by `ray start` on other nodes have their own
environment and working folder, so a task gets the driver's: the variables of `DRIVER_ENV` set
where the driver runs (paths made absolute) reach every worker through Ray's runtime environment,
and each pack trains in the driver's working folder, so that a relative `data_dir` or model folder
means there what it means on the driver. That folder, the sweep folder (passed absolute) and the
data (a run's `data_dir`, $LORAINIT_DATA, a declared task's files) must be on a filesystem every
node sees; a pack whose node lacks the sweep folder or the working folder fails its runs saying
so. $LORAINIT_CACHE had best be shared too; a node that does not see it builds what it lacks in its
own (smollm2-135m converted from its package on first use, the tokenised rows). See docs/cluster.md.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from lorainit.config import RunConfig
from lorainit.errors import BadInput
from lorainit.sweeps import estimates, worker
from lorainit.sweeps.plan import Pack
from lorainit.sweeps.store import Store

RETRIES = 3  # attempts after a worker dies, each resuming from the pack's checkpoint
# The driver's settings a worker on another node must share, passed where set: where the data and
# the converted models are, the hub's cache and whether the hub may be reached, and whether the
# tokenizers spawn threads of their own.
DRIVER_ENV = ("LORAINIT_DATA", "LORAINIT_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE",
              "TOKENIZERS_PARALLELISM")
PATH_ENV = ("LORAINIT_DATA", "LORAINIT_CACHE", "HF_HOME", "HF_HUB_CACHE")  # made absolute on the driver
_started: list[bool] = []  # whether this process started the Ray instance it is connected to


def driver_env() -> dict[str, str]:
    """The variables of DRIVER_ENV set (non-empty) here, paths made absolute against this folder:
    what every worker of a cluster gets (`ray.init(runtime_env={"env_vars": ...})`)."""
    env = {name: os.environ[name] for name in DRIVER_ENV if os.environ.get(name)}
    return {name: os.path.abspath(os.path.expanduser(v)) if name in PATH_ENV else v for name, v in env.items()}


def _train(run_dicts: list[dict], out: str, device: str, cwd: str) -> dict:
    """One pack's task: `worker.train_pack` in the driver's working folder `cwd`, writing its rows to a
    file (a worker may be on another host). Its runs fail, saying why, where this node does not see
    the sweep folder or `cwd`."""
    missing = []
    if not (Path(out) / Store.FILE).exists():  # the driver made the store before any task started
        missing.append(f"the sweep folder {out}")
    if not Path(cwd).is_dir():
        missing.append(f"the folder the sweep was run from, {cwd}")
    if missing:
        return _failed([RunConfig.from_dict(d) for d in run_dicts],
                       f"node {socket.gethostname()} does not see {' or '.join(missing)}: the sweep folder, the "
                       "folder the sweep is run from and the data must be on a filesystem every node sees")
    here = os.getcwd()
    os.chdir(cwd)  # relative paths in the runs (a data_dir, a model folder) mean what they mean on the driver
    try:
        return worker.train_pack(run_dicts, out, device, rows="file")
    finally:
        os.chdir(here)


def _failed(runs: list[RunConfig], reason: str) -> dict:
    """A pack's outcome, as `worker.train_pack` returns it, when its runs failed before training."""
    from lorainit.train import RunResult

    return {"results": [RunResult(r, status="failed", error=reason).to_dict() for r in runs], "resumed_at": None}


def _connect(ray_address: str | None):
    """Ray, connected (a local instance started when no address is given)."""
    try:
        import ray
    except ImportError:
        raise BadInput("--executor ray needs Ray: pip install 'lorainit[ray]'") from None
    if not ray.is_initialized():
        # workers' stderr reaches the driver's: resumes and failures are reported there
        options = dict(include_dashboard=False, log_to_driver=True)
        try:
            if ray_address:  # workers on other nodes: the driver's environment, not their own
                ray.init(address=ray_address, runtime_env={"env_vars": driver_env()}, **options)
            else:
                ray.init(num_cpus=os.cpu_count(), **options)
        except ConnectionError as err:
            raise BadInput(f"could not reach a Ray cluster at {ray_address!r}: {err}") from None
        _started.append(True)
    return ray


def _free_memory(device: str) -> tuple[str, int]:
    return device, estimates.available_memory(device)


def worker_device(ray_address: str | None) -> tuple[str, int]:
    """The device a pack's task gets (cuda where the cluster has GPUs) and the bytes free there,
    read by a task on a worker."""
    ray = _connect(ray_address)
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    # max_calls=1: the probe's worker exits once it has answered, so it holds no torch (or CUDA
    # context) of its own, and every pack starts on a worker like every other's
    probe = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_calls=1)(_free_memory)
    return ray.get(probe.remote("cuda" if gpus else "cpu"))


def pack_memory(pack: Pack, device: str) -> int:
    """Host bytes a pack's task declares: the whole pack's estimate on a CPU worker; on a GPU
    worker (a whole GPU per pack) the base model's host copy while it loads. 0 when unknown."""
    run = pack.runs[0]
    shape = estimates.model_shape(run.model)
    if shape is None:
        return 0
    if device.startswith("cuda"):
        return 4 * shape.params
    return estimates.memory_per_pack(run, shape, len(pack.runs))


def run_packs(packs, out: Path, device: str, store: Store, progress, record, ray_address: str | None = None) -> None:
    """Train `packs` as Ray tasks; `record(pack, outcome)` is called in the driver as each one ends."""
    if not packs:
        disconnect()
        return
    ray = _connect(ray_address)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        device = "cuda" if gpus else "cpu"
        task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=RETRIES)(_train)
        largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        pending = {}
        for pack in packs:
            store.start_pack(pack.id, pack.run_ids)
            memory = pack_memory(pack, device)
            if largest and memory > largest:
                print(f"pack {pack.id} needs about {memory / 2**30:.1f} GiB, more than any node declares "
                      f"({largest / 2**30:.1f} GiB); it asks for a whole node", file=sys.stderr)
                memory = int(largest)
            options = {"memory": memory} if memory else {}
            pending[task.options(**options).remote([r.to_dict() for r in pack.runs], str(out.resolve()),
                                                   device, os.getcwd())] = pack
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pack = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died more often than RETRIES
                    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    outcome = _failed(pack.runs, reason)
                record(pack, outcome)
    finally:
        disconnect()


def disconnect() -> None:
    """Stop the Ray instance if this process started it."""
    if _started:
        import ray

        ray.shutdown()
        _started.clear()
