"""What a run's `precision` means: the dtype the frozen base is stored in, and the autocast its
forward runs under. Neither touches what is trained.

- `fp32` (the default): the base in fp32, no autocast.
- `bf16` / `fp16`: the base stored in that dtype (half the memory of fp32) and the forward under
  autocast to it, so that matmuls run in it and reductions (softmax, norms, the loss) in fp32 as
  autocast decides. `fp16` adds per-run loss scaling (`optim.PackedGradScaler`).

Whatever the precision, and whatever dtype the checkpoint declares (`torch_dtype` or `dtype` in
its config.json), the LoRA factors, trained heads, per-run frozen draws and every optimiser state
are fp32 (`lora.train_dtype`): the checkpoint's declared dtype decides nothing.
"""

from __future__ import annotations

import contextlib

import torch

from lorainit.errors import BadInput

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_dtype(precision: str) -> torch.dtype:
    """The dtype the frozen base model is loaded in."""
    return DTYPES[precision]


def autocast(precision: str, device: torch.device):
    """The context a forward runs under: none for fp32, else autocast to the precision's dtype."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def unsupported(precision: str, device: torch.device | str) -> str | None:
    """Why `device` cannot run `precision`, or None when it can.

    A CPU runs both half dtypes (natively where it has the instructions, else emulated, slowly). A
    CUDA device runs fp16, and bf16 only where it has bf16 units (compute capability 8.0 on, as
    `torch.cuda.is_bf16_supported` reports without emulation). Any other device is asked with a
    one-element matmul."""
    device = torch.device(device)
    if precision == "fp32" or device.type == "cpu":
        return None
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            return f"{torch.cuda.get_device_name(device)} has no bf16 units"
        return None
    try:
        one = torch.ones(1, 1, dtype=DTYPES[precision], device=device)
        (one @ one).cpu()
    except (RuntimeError, TypeError) as err:
        return f"{device.type} cannot compute in {precision}: {err}".splitlines()[0]
    return None


def check(precision: str, device: torch.device | str) -> None:
    """BadInput when `device` cannot run `precision`, naming what to use instead."""
    why = unsupported(precision, device)
    if why is not None:
        other = "fp16 or fp32" if precision == "bf16" else "fp32"
        raise BadInput(f"precision {precision} cannot run on {torch.device(device)}: {why}; use {other}")
