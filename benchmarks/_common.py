"""Measurement helpers shared by the benchmarks: the environment they run in, this machine's fp32
matmul peak, a model's frozen compute per token, the tokens a model is fed, and peak memory."""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

# The embedding tables a token only indexes into: no multiply-adds, so no FLOPs.
EMBEDDING_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def set_environment() -> None:
    """Offline hub, and the data laid beside the checkout unless LORAINIT_DATA names another root.

    Call before importing transformers: the hub reads HF_HUB_OFFLINE when it is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LORAINIT_DATA", str((REPO / ".." / "shared" / "data").resolve()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def matmul_peak_flops(n: int = 2048, repeats: int = 7) -> float:
    """fp32 FLOP/s of one (n, n) @ (n, n) `torch.matmul` at torch's default threads: 2 n^3 / median time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm up: thread pool, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def frozen_flop_params(model: nn.Module) -> int:
    """Parameters of a transformers model's frozen body that do multiply-adds per token.

    The body is `model.base_model` (for BERT: `bert`, without the task head), less its embedding
    tables and any LoRA factors injected into it (named `lora_A`, `lora_B`). The pooler is counted although it sees only the first token of a row (for MiniLM
    148k of 10.8M parameters, so the figure overstates FLOPs by about 1.4%)."""
    return sum(p.numel() for name, p in model.base_model.named_parameters()
               if not any(part in name for part in (*EMBEDDING_TABLES, "lora_A", "lora_B")))


class TokenCounter:
    """Counts what a module is fed in training mode: token positions, and real tokens where it sees a mask.

    `fed` counts positions of `input_ids` (padding included); `real` counts the ones of the
    `attention_mask` keyword, when the module receives one. Hook the transformers body
    (`model.base_model`) or its `embeddings`: wrappers above the body may call `.forward`
    directly, which skips hooks."""

    def __init__(self, module: nn.Module):
        self.real = 0
        self.fed = 0
        self._handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        input_ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        self.fed += input_ids.numel()
        if kwargs.get("attention_mask") is not None:
            self.real += int(kwargs["attention_mask"].sum())

    def remove(self) -> None:
        self._handle.remove()


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
