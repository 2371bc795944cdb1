"""Per-purpose random streams drawn from a run's seed.

A run's randomness is split by purpose (init, head init, data order, dropout), each its own
`torch.Generator` seeded from (seed, purpose). Two runs with the same seed therefore draw the same
numbers for the same purpose, whatever else happens in the process, and whatever pack they are in:
this is what makes a pack of runs equal to the same runs done one by one.
"""

from __future__ import annotations

import hashlib

import torch

PURPOSES = ("init", "head", "data", "dropout", "base")  # base: a synthetic frozen network


def purpose_seed(seed: int, purpose: str, *salt: int) -> int:
    """A 63-bit seed for one purpose of one run (and optional integer salt, e.g. a width).

    Stable across processes and versions."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random purpose {purpose!r}; expected one of {', '.join(PURPOSES)}")
    key = ":".join(["lorainit", str(int(seed)), purpose, *(str(int(x)) for x in salt)])
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, purpose: str, *salt: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator for (seed, purpose, *salt) on `device`."""
    g = torch.Generator(device=device)
    g.manual_seed(purpose_seed(seed, purpose, *salt))
    return g
