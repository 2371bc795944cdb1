"""A sweep folder's layout: where the store, the tables, checkpoints and adapters live.

    DIR/store.sqlite                  the store (SQLite, WAL): runs, metrics, artifacts, packs
    DIR/results.csv, DIR/metrics.csv  tables written from the store after each pack
    DIR/checkpoints/<pack_id>/        a running pack's checkpoints (removed once it is recorded)
    DIR/adapters/<run_id>/            each finished run's PEFT adapter
"""

from __future__ import annotations

from pathlib import Path


def checkpoints(out: str | Path, pack_id: str) -> Path:
    return Path(out) / "checkpoints" / pack_id


def adapters(out: str | Path) -> Path:
    return Path(out) / "adapters"
