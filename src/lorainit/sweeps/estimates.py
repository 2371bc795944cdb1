"""Estimates for `--dry-run` and for the default pack size: a model's shape, a pack's memory and
time, this device's matmul rate. Rough by design; nothing here loads weights or downloads data."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from lorainit import decoders, models, slices, tasks
from lorainit.config import RunConfig
from lorainit.engine.order import total_steps
from lorainit.sweeps.plan import Pack

MAX_PACK = 64  # the planner's ceiling on a default pack size

# Shapes of common models, for estimates when their config cannot be read offline:
# (parameters, parameters in the layers' matmuls, hidden size, layers, attention heads)
KNOWN_SHAPES = {
    "roberta-large": (355_000_000, 302_000_000, 1024, 24, 16),
    "FacebookAI/roberta-large": (355_000_000, 302_000_000, 1024, 24, 16),
    "roberta-base": (125_000_000, 85_000_000, 768, 12, 12),
    "FacebookAI/roberta-base": (125_000_000, 85_000_000, 768, 12, 12),
}


@dataclass
class Shape:
    params: int         # all of them: the memory of the base model
    matmul_params: int  # the layers' weights, whose matmuls are the work per token
    hidden: int
    layers: int
    heads: int


def model_shape(spec: str) -> Shape | None:
    """The model's size from its config, read without loading weights; None if unavailable."""
    if spec in KNOWN_SHAPES:
        return Shape(*KNOWN_SHAPES[spec])
    try:
        from transformers import AutoConfig

        if spec in models.ALIASES or Path(spec).expanduser().is_dir():
            folder = models.resolve(spec).path
        else:
            folder = spec
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception:  # offline and not cached, or not a transformers model: no estimate
        return None
    hidden, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    inner = getattr(config, "intermediate_size", 4 * hidden)
    vocab = getattr(config, "vocab_size", 0)
    # attention: Q and O full, K and V at the key/value heads' width (grouped-query attention)
    kv = hidden * getattr(config, "num_key_value_heads", heads) // heads
    decoder = decoders.DECODERS.get(config.model_type)
    # a gated MLP (gate, up, down), as the served decoders' table says, else as Llama-style activations suggest
    gated = decoder.gated_mlp if decoder else getattr(config, "hidden_act", "") in ("silu", "swiglu")
    matmul = layers * (2 * hidden * hidden + 2 * hidden * kv + (3 if gated else 2) * hidden * inner)
    embeddings = vocab * hidden
    if decoder is not None:
        matmul += vocab * hidden  # a decoder's output projection runs per counted token
        if getattr(config, "tie_word_embeddings", False):
            embeddings = 0  # the projection is the embedding table
    return Shape(matmul + embeddings, matmul, hidden, layers, heads)


def available_memory(device: str) -> int:
    """Bytes free for a pack: free GPU memory on CUDA, else MemAvailable from /proc/meminfo."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    meminfo = Path("/proc/meminfo")
    for line in meminfo.read_text().splitlines() if meminfo.is_file() else ():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))  # free pages, without /proc


def base_bytes(run: RunConfig) -> int:
    """Bytes per parameter of the frozen base and of activations: 4 in fp32, 2 in bf16 or fp16."""
    return 4 if run.precision == "fp32" else 2


def memory_per_pack(run: RunConfig, shape: Shape, runs: int, scores: bool = True) -> int:
    """Estimated peak bytes of a pack of `runs` runs like `run`: the base model in the dtype its
    precision stores it in (4 bytes a parameter in fp32, 2 in bf16 or fp16), each run's LoRA
    factors with gradients and AdamW moments (fp32 whatever the precision), and each run's activations (about
    34 h + 5 heads T bytes per token per layer at 16 bits, twice that in fp32; with
    gradient_checkpointing, each layer's input and one layer's activations). `scores=False` leaves
    out the attention scores (5 heads T), which a fused attention kernel never stores: a lower
    bound, for refusing only runs that surely cannot fit."""
    width = base_bytes(run)
    base = width * shape.params
    lora = 4 * 4 * run.rank * 2 * shape.hidden * shape.layers * len(run.targets)  # A and B, x4 states
    tokens = run.batch_size * run.max_seq_len
    per_layer = tokens * (34 * shape.hidden + (5 * shape.heads * run.max_seq_len if scores else 0)) * width // 2
    if run.gradient_checkpointing:  # each layer's input is kept; one layer's activations at a time
        activations = tokens * shape.layers * shape.hidden * width + per_layer
    else:
        activations = shape.layers * per_layer
    return base + runs * (lora + activations)


def default_pack_size(run: RunConfig, device: str, shape: Shape | None, free: int | None = None) -> int:
    """The most runs that fit in 60% of the memory free (`free` bytes, else what `device` has
    here), at most MAX_PACK (8 when the shape is unknown)."""
    if shape is None:
        return 8
    budget = 0.6 * (available_memory(device) if free is None else free)
    base = base_bytes(run) * shape.params
    one = memory_per_pack(run, shape, 1) - base
    return max(1, min(MAX_PACK, int((budget - base) // max(one, 1))))


def data_sample(run: RunConfig, split: str) -> tuple[int, float] | None:
    """(rows, mean tokens per row) of 'train' or 'eval', from the run's task family; None if unknown."""
    return tasks.family(run.task).data_size(run, split)


def generates(run: RunConfig) -> bool:
    """Whether the run's evaluation generates (exact_match): gsm8k, or declared rows naming references."""
    return slices.base(run.task) == "gsm8k" or (run.data is not None and '"reference"' in run.data)


def seconds_per_pack(pack: Pack, shape: Shape | None, flops_per_s: float) -> float | None:
    """A rough time: the layers' matmul work (4 x params x tokens in training: the frozen weights
    need no gradient of their own; 2 x params x tokens per evaluation) at `flops_per_s`; None
    without the model's shape or local data."""
    run = pack.runs[0]
    train, evaluation = data_sample(run, "train"), data_sample(run, "eval")
    if shape is None or train is None or evaluation is None:
        return None
    steps = total_steps(train[0], run.batch_size, run.epochs, run.max_steps)
    evals = steps // run.eval_every + (steps % run.eval_every > 0) if run.eval_every else 1
    work = 4 * shape.matmul_params * train[1] * run.batch_size * steps
    work += 2 * shape.matmul_params * evaluation[1] * evaluation[0] * evals
    if generates(run):  # greedy generation: up to max_new_tokens one-token forwards per question
        work += 2 * shape.matmul_params * run.max_new_tokens * evaluation[0] * evals
    return work * len(pack.runs) / flops_per_s


def matmul_flops(device: str, n: int = 1024) -> float:
    """This device's fp32 matmul rate, measured briefly (best of five, after a warm-up)."""
    import time

    import torch

    a = torch.randn(n, n, device=device)
    a @ a  # warm-up: thread pools, kernels
    best = math.inf
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ a
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
