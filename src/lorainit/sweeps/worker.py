"""One pack, trained in whichever process an executor chose: the in-process loop or a Ray worker.

Takes and returns plain values (run configs and results as dicts), so that it runs the same in
this process or another. It imports nothing of the driver: it reads and writes only the pack's
checkpoint folder, its runs' adapter folders and their metric rows (into the folder's store, as
they are made), and hands its results back.
"""

from __future__ import annotations

from lorainit.config import RunConfig
from lorainit.engine.families import FactorCache
from lorainit.sweeps import folder
from lorainit.sweeps.plan import Pack
from lorainit.sweeps.store import MetricWriter, RowFile


def train_pack(run_dicts: list[dict], out: str, device: str | None, on_step=None, on_eval=None,
               rows: str = "store") -> dict:
    """Train one pack in sweep folder `out`: resume from its checkpoints, write its adapters, and
    its metric rows into the folder's store (`rows="store"`, on the driver's host) or into its
    checkpoint folder's `RowFile` (`rows="file"`, a worker that may be on another host).

    Returns {"results": [RunResult dicts], "resumed_at": the step it resumed from, or None}. A pack
    that raises marks its runs failed with the error, and the sweep goes on.
    """
    from lorainit.train import PackTrainer, RunResult

    runs = [RunConfig.from_dict(d) for d in run_dicts]
    pack_id = Pack(runs).id
    resumed_at = None
    sink = MetricWriter(out) if rows == "store" else RowFile(folder.checkpoints(out, pack_id))
    try:
        trainer = PackTrainer(runs, device=device, show_progress=False,
                              factor_cache=FactorCache(folder.inits(out)))
        results = trainer.run(adapters_dir=folder.adapters(out), checkpoint_dir=folder.checkpoints(out, pack_id),
                              on_step=on_step, on_eval=on_eval, sink=sink)
        resumed_at = trainer.resumed_at
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - recorded on the runs, shown at the end
        results = [RunResult(r, status="failed", error=f"{type(err).__name__}: {err}") for r in runs]
    finally:
        sink.close()
    return {"results": [r.to_dict() for r in results], "resumed_at": resumed_at}
