"""The small, licensed data slices lorainit ships, so that its demo and core tests need nothing else.

Each slice is a task of its own (`sst2-slice`, `gsm8k-slice`, `wikitext2-slice`): a run names the
slice, never the full set, so nobody trains on a subset believing it is the whole. Its rows are
read from this folder, laid out as a `LORAINIT_DATA` root (`glue/SST-2/`, `gsm8k/`,
`wikitext-2/`); `README.md` here gives each file's source, licence, rows and sha256.

    slices.base("sst2-slice")    -> 'sst2'     (the task whose rows, metrics and scoring it uses)
    slices.base("sst2")          -> 'sst2'
    slices.folder("gsm8k-slice") -> <this folder>/gsm8k
    slices.folder("gsm8k")       -> None      (the full task reads data_dir, LORAINIT_DATA or the hub)
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent  # a LORAINIT_DATA-style root holding the slices
# slice task -> (the full task it is a slice of, its folder under ROOT as data_dir expects it)
SLICES = {
    "sst2-slice": ("sst2", "glue"),
    "gsm8k-slice": ("gsm8k", "gsm8k"),
    "wikitext2-slice": ("wikitext2", "wikitext-2"),
}


def base(task: str) -> str:
    """The full task a slice is cut from; any other task is its own base."""
    return SLICES[task][0] if task in SLICES else task


def folder(task: str) -> Path | None:
    """The shipped folder a slice task reads (the layout `data_dir` takes); None for other tasks."""
    return ROOT / SLICES[task][1] if task in SLICES else None


def data_dir(task: str, given: str | None) -> str | None:
    """Where a run of `task` reads its rows: a slice's own folder, else the run's `data_dir`."""
    shipped = folder(task)
    return str(shipped) if shipped is not None else given
