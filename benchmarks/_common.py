"""Measurement helpers shared by the benchmarks: the environment they run in, a clock that waits
for the GPU, the CPU model, the fp32 matmul peak of the CPU or the GPU, a model's frozen compute per token, the
tokens a model is fed, and peak memory (host RSS, or what torch allocated on the GPU)."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

# The embedding tables a token only indexes into: no multiply-adds, so no FLOPs (BERT's, and a
# decoder's token embedding).
EMBEDDING_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings", "embed_tokens")


def set_environment() -> None:
    """Offline hub, and the data laid beside the checkout unless LORAINIT_DATA names another root.

    Call before importing transformers: the hub reads HF_HUB_OFFLINE when it is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LORAINIT_DATA", str((REPO / ".." / "shared" / "data").resolve()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def import_model_code() -> None:
    """Import transformers' model-building code (seconds on a CPU), so that a timed section that
    starts after it counts loading and work, not the library's import; each variant calls it
    before its clock starts, whether or not it imports `Trainer` (which pulls this code in too)."""
    import transformers.modeling_utils  # noqa: F401


def cpu_model() -> str:
    """The CPU's model name, family/model numbers and widest vector extension (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines()[:30] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}), {vector}")


def clock(device: str) -> float:
    """`time.perf_counter()`, read once the device has finished its queued work.

    CUDA kernels run asynchronously: without the wait, a timed section would end when its last
    kernel is queued, not when it is done. On the CPU this is `time.perf_counter()` alone."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def cuda_matmul_tf32() -> bool:
    """Whether fp32 matmuls on CUDA may run in TF32 in this process.

    torch's default is no, but some builds and containers turn it on, by the setting or by the
    cuBLAS override variable; the benchmarks keep whatever is set and report it."""
    if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") == "1":
        return True
    try:
        return torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # newer torch refuses the legacy flag once the `fp32_precision` API has set it
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def matmul_peak_flops(n: int = 2048, repeats: int = 7, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of one (n, n) @ (n, n) `torch.matmul` in `dtype` on `device`: 2 n^3 / median time.

    On the CPU at torch's default threads; on CUDA in fp32 with torch's TF32 setting as it stands
    (see `cuda_matmul_tf32`)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm up: thread pool or cuBLAS handle, allocator
    times = []
    for _ in range(repeats):
        start = clock(device)
        torch.matmul(a, b)
        times.append(clock(device) - start)
    return 2 * n**3 / statistics.median(times)


def frozen_flop_params(model: nn.Module) -> int:
    """Parameters of a transformers model's frozen body that do multiply-adds per token.

    The body is `model.base_model` (for BERT: `bert`, without the task head), less its embedding
    tables and any LoRA factors injected into it (named `lora_A`, `lora_B`). The pooler is counted
    although it sees only the first token of a row (for MiniLM 148k of 10.8M parameters, so the
    figure overstates FLOPs by about 1.4%)."""
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


def peft_lora(model, rank: int, alpha: float, dropout: float, targets, task_type: str, init: str, seed: int = 0):
    """`model` wrapped in PEFT LoRA, initialised as a user would: with PEFT's own `init_lora_weights`
    for the families PEFT has (Init[A] is its default), drawn from the run's init seed as lorainit
    draws them; with `lorainit.peft.apply_init` for those it lacks (Init[B], Init[AB])."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from lorainit.engine import families, rng
    from lorainit.peft import apply_init

    # raised inside transformers when PEFT wraps a model; nothing of the project's
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    family = families.get(families.canonical(init))
    how = family.peft if family.peft is not None else True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.purpose_seed(seed, "init"))
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                 target_modules=list(targets), task_type=task_type,
                                                 init_lora_weights=how))
    if family.peft is None:
        apply_init(model, init=family.name, seed=seed)
    return model


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_cuda_mib() -> float:
    """The most GPU memory torch has allocated to tensors in this process since the last
    `torch.cuda.reset_peak_memory_stats()`, in MiB (`torch.cuda.max_memory_allocated()`)."""
    return torch.cuda.max_memory_allocated() / 2**20
