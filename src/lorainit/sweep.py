"""A sweep file -> runs -> packs.

A sweep file (YAML) holds a base run and a grid; its runs are the grid's cross product laid over
the base, each validated and identified by the hash of its resolved config (`RunConfig.run_id`).
The planner groups runs that can share a model copy (equal `RunConfig.pack_key`), same seeds
together first, into packs of at most `pack_size` runs. Everything is checked before anything
is written: a bad file raises `BadInput` naming the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

from lorainit import models
from lorainit.config import RunConfig
from lorainit.errors import BadInput

TOP_KEYS = ("name", "base", "grid", "pack_size")
TRAINABLE_TASKS = ("sst2", "qnli", "mnli")  # the task families the trainer has today
MAX_PACK = 64  # the planner's ceiling on a default pack size
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Sweep:
    name: str
    base: dict              # the base run's fields as given
    grid: dict              # axis -> list of values, as given
    pack_size: int | None   # None: chosen from memory
    runs: list[RunConfig]   # the cross product, in grid order (last axis fastest)
    text: str               # the file as read


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


def check_model(spec: str, where: str) -> None:
    """Accept an alias, an existing model folder, or a well-formed hub id; nothing is loaded."""
    if spec in models.ALIASES:
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        return
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise BadInput(f"{where}: model {spec!r} is not an alias ({', '.join(models.ALIASES)}), an existing "
                       "model folder, or a hub id such as FacebookAI/roberta-large")


def load(path: str | Path) -> Sweep:
    """Read and check a sweep file; every run is built and validated."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: sweep file not found")
    text = path.read_text(encoding="utf-8")
    return parse(text, str(path), default_name=path.stem)


def parse(text: str, where: str = "sweep", default_name: str = "sweep") -> Sweep:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInput(f"{where}: not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    if not isinstance(doc, dict):
        raise BadInput(f"{where}: a sweep file is a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise BadInput(f"{where}: unknown key {unknown[0]!r}; a sweep file has keys {', '.join(TOP_KEYS)}")
    name = doc.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise BadInput(f"{where}: name must be a non-empty string, got {name!r}")
    base = doc.get("base") or {}
    if not isinstance(base, dict):
        raise BadInput(f"{where}: base must be a mapping of run fields, got {type(base).__name__}")
    grid = doc.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise BadInput(f"{where}: grid is empty; give at least one axis, e.g. grid: {{lr: [1.0e-4, 4.0e-4]}}")
    fields = RunConfig.field_names()
    for axis, values in grid.items():
        if str(axis).replace("-", "_") not in fields:
            raise BadInput(f"{where}: grid: unknown run field {axis!r}; run fields are: {', '.join(fields)}")
        if not isinstance(values, list) or not values:
            raise BadInput(f"{where}: grid: {axis} must be a non-empty list of values, got {values!r}")
        seen = [json.dumps(v, sort_keys=True) for v in values]
        dup = next((v for v, s in zip(values, seen) if seen.count(s) > 1), None)
        if dup is not None:
            raise BadInput(f"{where}: grid: {axis} lists {dup!r} more than once")
        if str(axis).replace("-", "_") in {k.replace("-", "_") for k in base}:
            raise BadInput(f"{where}: {axis} is both in base and a grid axis; keep it in one place")
    pack_size = doc.get("pack_size")
    if pack_size is not None and (isinstance(pack_size, bool) or not isinstance(pack_size, int) or pack_size < 1):
        raise BadInput(f"{where}: pack_size must be a whole number >= 1, got {pack_size!r}")
    RunConfig.from_dict(_base_with_first_axis_values(base, grid), where=f"{where}: base")
    runs = []
    axes = list(grid)
    for values in itertools.product(*(grid[a] for a in axes)):
        point = dict(zip(axes, values))
        label = ", ".join(f"{a}={v}" for a, v in point.items())
        run = RunConfig.from_dict(base | point, where=f"{where}: grid point ({label})")
        if run.task not in TRAINABLE_TASKS:
            raise BadInput(f"{where}: task {run.task!r} cannot be trained yet; available: "
                           f"{', '.join(TRAINABLE_TASKS)}")
        check_model(run.model, f"{where}: grid point ({label})" if "model" in point else f"{where}: base")
        runs.append(run)
    return Sweep(name.strip(), base, grid, pack_size, runs, text)


def _base_with_first_axis_values(base: dict, grid: dict) -> dict:
    """The base run completed by each axis's first value, so that its own fields are checked
    (with their key named) before any grid point is."""
    return base | {a: v[0] for a, v in grid.items()}


# -- the planner -----------------------------------------------------------------------------

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


# -- estimates for --dry-run and for the default pack size -----------------------------------

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
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inner = getattr(config, "intermediate_size", 4 * hidden)
    vocab = getattr(config, "vocab_size", 0)
    matmul = layers * (4 * hidden * hidden + 2 * hidden * inner)
    return Shape(matmul + vocab * hidden, matmul, hidden, layers, config.num_attention_heads)


def available_memory(device: str) -> int:
    """Bytes free for a pack: free GPU memory on CUDA, else MemAvailable from /proc/meminfo."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    meminfo = Path("/proc/meminfo")
    for line in meminfo.read_text().splitlines() if meminfo.is_file() else ():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))  # free pages, without /proc


def memory_per_pack(run: RunConfig, shape: Shape, runs: int) -> int:
    """Estimated peak bytes of a pack of `runs` runs like `run`: the base model in fp32, each
    run's LoRA factors with gradients and AdamW moments, and each run's activations (about
    34 h + 5 heads T bytes per token per layer at 16 bits, twice that in fp32)."""
    width = 4 if run.precision == "fp32" else 2
    base = 4 * shape.params
    lora = 4 * 4 * run.rank * 2 * shape.hidden * shape.layers * len(run.targets)  # A and B, x4 states
    tokens = run.batch_size * run.max_seq_len
    activations = tokens * shape.layers * (34 * shape.hidden + 5 * shape.heads * run.max_seq_len) * width // 2
    return base + runs * (lora + activations)


def default_pack_size(run: RunConfig, device: str, shape: Shape | None) -> int:
    """The most runs that fit in 60% of the available memory, at most MAX_PACK (8 when unknown)."""
    if shape is None:
        return 8
    budget = 0.6 * available_memory(device)
    one = memory_per_pack(run, shape, 1) - 4 * shape.params
    return max(1, min(MAX_PACK, int((budget - 4 * shape.params) // max(one, 1))))


def data_sample(run: RunConfig, split: str, sample: int = 200) -> tuple[int, float] | None:
    """(rows, mean tokens per row) of a split in a local data folder, the tokens guessed from the
    first rows' characters (about 4 per token, plus 2 special tokens); None without local files."""
    from lorainit.tasks import glue

    root = glue.glue_root(run.data_dir)
    if root is None:  # the hub: a dry run downloads nothing
        return None
    spec = glue.TASKS[run.task]
    path = root / spec.folder / f"{'train' if split == 'train' else spec.eval_split}.tsv"
    try:
        texts = glue.read(run.task, split, run.data_dir, max_rows=sample).texts
        with open(path, "rb") as f:
            rows = sum(1 for _ in f) - 1
    except (BadInput, OSError):
        return None
    limit = run.max_train_samples if split == "train" else run.max_eval_samples
    tokens = min(run.max_seq_len, sum(len(" ".join(t)) for t in texts) / len(texts) / 4 + 2)
    return min(rows, limit or rows), tokens


def seconds_per_pack(pack: Pack, shape: Shape | None, flops_per_s: float) -> float | None:
    """A rough time: the layers' matmul work (4 x params x tokens in training: the frozen weights
    need no gradient of their own; 2 x params x tokens per evaluation) at `flops_per_s`; None
    without the model's shape or local data."""
    from lorainit.data import total_steps

    run = pack.runs[0]
    train, evaluation = data_sample(run, "train"), data_sample(run, "eval")
    if shape is None or train is None or evaluation is None:
        return None
    steps = total_steps(run, train[0])
    evals = steps // run.eval_every + (steps % run.eval_every > 0) if run.eval_every else 1
    work = 4 * shape.matmul_params * train[1] * run.batch_size * steps
    work += 2 * shape.matmul_params * evaluation[1] * evaluation[0] * evals
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
