"""The LoRA init schemes: which factor starts random, and from which distribution.

Both schemes make B @ A = 0 at step 0, so the adapted model starts exactly at the base model
(Hayou, Ghosh, Yu 2024, §2):

- `init_a` (Init[A], PEFT's default): A random, B = 0.
- `init_b` (Init[B]): B random, A = 0.

The random factor's distribution follows one of two variance conventions:

- `kaiming` (PEFT and the paper's code): `nn.init.kaiming_uniform_(w, a=sqrt(5))`, i.e.
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with variance 1/(3 fan_in); fan_in is `in` for A (r, in)
  and `r` for B (out, r). Drawn through torch's own initialiser so that it is bit-exact with PEFT
  given the same generator state.
- `gaussian` (the theory's): N(0, 1/fan_in), i.e. A ~ N(0, 1/in), B ~ N(0, 1/r).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from lorainit.errors import BadInput

VARIANCES = ("kaiming", "gaussian")


def _draw(weight: torch.Tensor, variance: str, generator: torch.Generator) -> None:
    """Fill `weight` (fan_out, fan_in) in place with the random factor's distribution."""
    if variance == "kaiming":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    elif variance == "gaussian":
        weight.normal_(0.0, 1.0 / math.sqrt(weight.shape[1]), generator=generator)
    else:
        raise BadInput(f"unknown init_variance {variance!r}; expected one of {', '.join(VARIANCES)}")


@torch.no_grad()
def init_a(A: torch.Tensor, B: torch.Tensor, variance: str, generator: torch.Generator) -> None:
    """Init[A]: A (r, in) random, B (out, r) zero."""
    _draw(A, variance, generator)
    B.zero_()


@torch.no_grad()
def init_b(A: torch.Tensor, B: torch.Tensor, variance: str, generator: torch.Generator) -> None:
    """Init[B]: B (out, r) random, A (r, in) zero."""
    A.zero_()
    _draw(B, variance, generator)


InitFn = Callable[[torch.Tensor, torch.Tensor, str, torch.Generator], None]

INITS: dict[str, InitFn] = {"a": init_a, "b": init_b}


def get_init(name: str) -> InitFn:
    """The init function registered under `name` ('a' or 'b')."""
    if name not in INITS:
        raise BadInput(f"unknown init {name!r}; expected one of {', '.join(INITS)}")
    return INITS[name]
