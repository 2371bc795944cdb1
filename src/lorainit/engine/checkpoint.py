"""Checkpoint files of one pack: written atomically, checked by checksum, the last two kept.

A checkpoint is `step-<step>.ckpt` in the pack's folder: a header line holding the format and the
sha256 of the payload, then the payload (`torch.save` of plain dicts, lists and tensors, read back
with `weights_only=True`). A file whose checksum does not match (truncated, corrupt, or not a
checkpoint at all) is skipped with a warning, and the previous one is used; with none left, the
pack starts over. A file that passes its checksum and still cannot be read is an error that
stops the pack: its bytes are what was written, so starting over would hide a real fault.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import warnings
from pathlib import Path

import torch

from lorainit.files import write_atomic

MAGIC = b"LORAINIT-CHECKPOINT 2 "  # 2: per-run fresh layers, divergence and logging state; no rows
KEEP = 2  # a corrupt newest file falls back to the one before it
_NAME = re.compile(r"^step-(\d+)\.ckpt$")


class CheckpointWarning(UserWarning):
    """A checkpoint could not be used; the pack falls back to an earlier one or starts over."""


class CorruptCheckpoint(ValueError):
    """A checkpoint file whose bytes are not what was written: skipped, never trusted."""


def _files(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the folder's checkpoints, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def save(folder: str | Path, step: int, state: dict) -> Path:
    """Write `state` as the checkpoint of `step`, atomically; drop all but the newest KEEP."""
    folder = Path(folder)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    path = folder / f"step-{step:09d}.ckpt"
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(MAGIC + digest + b"\n" + payload))
    for _, old in _files(folder)[KEEP:]:
        old.unlink(missing_ok=True)
    return path


def read(path: str | Path) -> dict:
    """The state in one checkpoint file; CorruptCheckpoint if it is truncated, corrupt or not one."""
    blob = Path(path).read_bytes()
    header, _, payload = blob.partition(b"\n")
    if not header.startswith(MAGIC):
        older = header.startswith(MAGIC[:-2])  # the same name, another format number
        raise CorruptCheckpoint("written by another version of lorainit, in another format" if older
                                else "not a lorainit checkpoint")
    if hashlib.sha256(payload).hexdigest().encode() != header[len(MAGIC):]:
        raise CorruptCheckpoint("checksum mismatch (truncated or corrupt)")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as err:
        raise RuntimeError(f"checkpoint {path} passed its checksum but could not be read: "
                           f"{type(err).__name__}: {err}") from err


def load_latest(folder: str | Path) -> dict | None:
    """The newest intact checkpoint's state, or None; warns about every corrupt one it skipped."""
    files = _files(Path(folder))
    for i, (step, path) in enumerate(files):
        try:
            return read(path)
        except CorruptCheckpoint as err:  # its bytes are not what was written: fall back
            fallback = f"using step {files[i + 1][0]}" if i + 1 < len(files) else "starting the pack over"
            warnings.warn(f"checkpoint {path} is unusable ({err}); {fallback}", CheckpointWarning, stacklevel=2)
    return None


def clear(folder: str | Path) -> None:
    """Remove a finished pack's checkpoint folder (with any temporary file a kill left mid-write),
    and the checkpoints folder above it if that leaves it empty."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.is_dir() and not any(folder.parent.iterdir()):
        folder.parent.rmdir()
