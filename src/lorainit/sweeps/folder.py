"""A sweep folder's layout: where the store, the tables, checkpoints and adapters live.

    DIR/store.sqlite                  the store (SQLite, WAL): runs, metrics, artifacts, packs
    DIR/results.csv, DIR/metrics.csv  tables written from the store after each pack
    DIR/checkpoints/<pack_id>/        a pack's checkpoints (removed once its runs are done or diverged)
    DIR/adapters/<run_id>/            each finished run's PEFT adapter
    DIR/inits/<key>.safetensors       decompositions of the init families (PiSSA, OLoRA), computed once
    DIR/driver.lock                   names the driver holding the folder's lock (see `DriverLock`)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from lorainit.errors import BadInput
from lorainit.files import write_text_atomic


def checkpoints(out: str | Path, pack_id: str) -> Path:
    return Path(out) / "checkpoints" / pack_id


def adapters(out: str | Path) -> Path:
    return Path(out) / "adapters"


def inits(out: str | Path) -> Path:
    """Where the sweep keeps its runs' init decompositions (`engine.families.FactorCache`)."""
    return Path(out) / "inits"


class DriverLock:
    """One driver per sweep folder: the folder itself is locked with `fcntl.flock` while a driver runs.

    Taking the lock writes nothing, so a driver refused for bad input leaves an existing folder
    as it was; once every check has passed, `announce()` writes `DIR/driver.lock`, naming the
    holder (pid, host, since when) for any driver turned away. The kernel frees the lock when its
    holder exits, however it exits, so a killed driver's folder can be resumed at once.

    Where a folder cannot be locked (NFS emulates `flock` with write locks, which a folder opened
    for reading cannot take), an empty `DIR/.driver-lock` file is locked instead; where nothing can
    be locked, the driver warns and goes on unguarded.
    """

    FILE = "driver.lock"
    FALLBACK = ".driver-lock"

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.fd: int | None = None
        try:
            self.fd = self._lock()
        except BlockingIOError:
            try:
                holder = json.loads((self.out / self.FILE).read_text())
                who = f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
            except (OSError, ValueError, KeyError, TypeError):
                who = "it is still starting"
            raise BadInput(f"{out} is in use by another sweep driver ({who}); wait for it to finish "
                           "or stop it, then run again") from None
        except OSError as err:
            warnings.warn(f"{out}: cannot lock this folder ({err}); nothing stops a second driver here",
                          stacklevel=2)

    def _lock(self) -> int:
        """A descriptor holding the lock: on the folder, or where the filesystem cannot lock a
        folder, on the fallback file in it. BlockingIOError if another process holds it."""
        fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
            raise
        except OSError:
            os.close(fd)  # this filesystem cannot lock a folder (NFS): lock a file in it
        fd = os.open(self.out / self.FALLBACK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        return fd

    def announce(self) -> None:
        """Name this driver as the holder, in `DIR/driver.lock`."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
        write_text_atomic(self.out / self.FILE, json.dumps(holder) + "\n")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None
