"""Runs -> packs.

The planner groups runs that can share a model copy (equal `RunConfig.pack_key`), same seeds
together first, into packs of at most `pack_size` runs. A pack is identified by the hash of its
ordered run ids, which names its checkpoint folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

from lorainit.config import RunConfig


@dataclass
class Pack:
    runs: list[RunConfig]

    @cached_property
    def run_ids(self) -> list[str]:
        return [r.run_id() for r in self.runs]

    @cached_property
    def id(self) -> str:
        """A hash of the ordered run ids: the pack's checkpoint folder name."""
        return hashlib.sha256(",".join(self.run_ids).encode()).hexdigest()[:12]


def plan(runs: list[RunConfig], pack_size: int, started: dict[str, list[str]] | None = None) -> list[Pack]:
    """Group `runs` into packs of at most `pack_size`.

    `started` maps packs already begun (in an earlier, interrupted invocation) to their ordered run
    ids: those runs train together again, in that order, so that their checkpoint still applies.
    The rest are grouped by pack key (in order of first appearance), same seed together first.
    """
    by_id = {r.run_id(): r for r in runs}
    packs, taken = [], set()
    for ids in (started or {}).values():
        if ids and all(i in by_id for i in ids):
            packs.append(Pack([by_id[i] for i in ids]))
            taken.update(ids)
    groups: dict[tuple, list[RunConfig]] = {}
    for run in runs:
        if run.run_id() not in taken:
            groups.setdefault(run.pack_key(), []).append(run)
    for group in groups.values():
        ordered = sorted(group, key=lambda r: r.seed)  # stable: grid order within a seed
        packs += [Pack(ordered[i:i + pack_size]) for i in range(0, len(ordered), pack_size)]
    return packs
