"""The Ray executor: one Ray task per pack, one GPU per pack where the cluster has GPUs.

`lorainit sweep FILE --executor ray [--ray-address auto|HOST:PORT]`. Without an address a local
Ray instance is started (and stopped at the end). A task whose worker dies is retried by Ray, and
the retry resumes the pack from its last checkpoint. Workers write checkpoints and adapters into
the sweep folder, which every node must see (a shared filesystem); they hand their results back,
and the driver alone writes the store (through `record`). A task's entry point is
`sweeps.worker.train_pack`, which imports nothing of the driver.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorainit.errors import BadInput
from lorainit.sweeps import worker
from lorainit.sweeps.store import Store

RETRIES = 3  # attempts after a worker dies, each resuming from the pack's checkpoint


def _train(run_dicts: list[dict], out: str, device: str) -> dict:
    return worker.train_pack(run_dicts, out, device)


def run_packs(packs, out: Path, device: str, store: Store, progress, record, ray_address: str | None = None) -> None:
    """Train `packs` as Ray tasks; `record(pack, outcome)` is called in the driver as each one ends."""
    try:
        import ray
    except ImportError:
        raise BadInput("--executor ray needs Ray: pip install 'lorainit[ray]'") from None
    if not packs:
        return
    started_here = not ray.is_initialized()
    if started_here:
        # workers' stderr reaches the driver's: resumes and failures are reported there
        options = dict(include_dashboard=False, log_to_driver=True)
        try:
            if ray_address:
                ray.init(address=ray_address, **options)
            else:
                ray.init(num_cpus=os.cpu_count(), **options)
        except ConnectionError as err:
            raise BadInput(f"could not reach a Ray cluster at {ray_address!r}: {err}") from None
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=RETRIES)(_train)
        pending = {}
        for pack in packs:
            store.start_pack(pack.id, pack.run_ids)
            pending[task.remote([r.to_dict() for r in pack.runs], str(out.resolve()),
                                "cuda" if gpus else "cpu")] = pack
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pack = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died more often than RETRIES
                    from lorainit.train import RunResult

                    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    outcome = {"results": [RunResult(r, status="failed", error=reason).to_dict() for r in pack.runs]}
                record(pack, outcome)
    finally:
        if started_here:
            ray.shutdown()
