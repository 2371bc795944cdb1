"""A run's configuration: every field a sweep file or the command line may set, typed and checked.

The field names are an interface: sweep files use them as written, the command line as
`--max_steps` or `--max-steps`, and `results.csv` has a column for each. `RunConfig.from_dict`
refuses unknown keys and bad values with a message that names the key and what is allowed.

A run's identity (`run_id`) is a hash of its resolved fields. It is stable across versions: the
fields of id schema 1 (`ID_FIELDS`) are always hashed; a field added later joins the hash only
when its value differs from its default, so adding a field never changes the id of a run that
leaves it at its default, and a sweep folder made before the field existed resumes as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import yaml

from lorainit import decoders, slices, tasks
from lorainit.engine import families
from lorainit.tasks import spec
from lorainit.errors import BadInput

VARIANCES = ("kaiming", "gaussian")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class RunConfig:
    """One LoRA finetuning run. Fields that must agree for runs to share a pack are marked (pack)."""

    model: str = "minilm"                 # (pack) model spec: alias, local folder or hub id
    task: str = "sst2"                    # (pack) a registered task: sst2 | qnli | mnli | gsm8k | wikitext2,
    #                                       a slice shipped with lorainit: sst2-slice | gsm8k-slice | wikitext2-slice,
    #                                       or a family whose data the run declares: classification | sft
    data_dir: str | None = None           # (pack) the task's data folder; default $LORAINIT_DATA or hub
    data: str | None = None               # (pack) classification | sft: the data spec, canonical JSON (`tasks.spec`);
    #                                       set from a sweep file's `task: {type: ..., train: ..., ...}`
    data_sha: str | None = None           # (pack) a hash of that data's contents (`tasks.spec.fingerprint`)
    init_args: str | None = None          # the family's options that differ from their defaults, canonical JSON
    #                                       (given as a mapping, e.g. {reset: false} for ab); None: all defaults
    init: str = "a"                       # the init family: a (Init[A]: A random, B = 0), b (Init[B]: B random,
    #                                       A = 0), ab, gaussian, orthogonal, pissa, pissa_niter_<K>, olora,
    #                                       and from the run's rows lora_ga, lora_one, eva, corda
    #                                       (`engine.families`); PEFT's strings are accepted (true = a)
    init_variance: str = "kaiming"        # a and b: kaiming (PEFT's) | gaussian (the theory's, N(0, 1/fan_in))
    lr: float = 1e-4                      # AdamW learning rate of A (and of the head)
    lr_b_ratio: float = 1.0               # B's learning rate is lr x this (LoRA+); 1 is plain LoRA
    seed: int = 0                         # draws init, head init, data order and dropout masks
    rank: int = 8                         # (pack) LoRA rank r
    alpha: float = 16.0                   # (pack) scaling s = alpha / r (alpha / sqrt(r) with rslora)
    rslora: bool = False                  # (pack) rank-stabilised scaling
    dropout: float = 0.1                  # (pack) LoRA dropout on the LoRA input
    targets: tuple[str, ...] = ("query", "value")  # (pack) module names to adapt (default: the task's, or
    #                                       the decoder's own: q_proj,v_proj; qkv_proj for Phi-3; c_attn for GPT-2)
    batch_size: int = 4                   # (pack) rows per step for this run
    epochs: float | None = None           # (pack) passes over the training rows; or max_steps
    max_steps: int | None = None          # (pack) optimiser steps; wins over epochs when both given
    warmup_ratio: float = 0.06            # linear warmup over this fraction of steps, then linear decay
    weight_decay: float = 0.0             # AdamW decoupled weight decay
    max_grad_norm: float = 1.0            # clip this run's global gradient norm (0: no clipping)
    max_seq_len: int = 128                # (pack) tokens per row after truncation
    max_train_samples: int | None = None  # (pack) the first N training rows, in file order
    max_eval_samples: int | None = None   # (pack) the first N evaluation rows, in file order
    eval_every: int = 0                   # (pack) evaluate every N steps (0: only at the end)
    precision: str = "fp32"               # (pack) fp32 | bf16 | fp16: the frozen base's dtype and autocast
    #                                       (adapters, heads, optimiser state: always fp32)
    divergence_factor: float = 10.0       # diverged: loss non-finite or above this x its initial loss
    checkpoint_every: int = 0             # (pack) write a checkpoint every N steps (0: never)
    save_adapters: bool = True            # write the run's PEFT adapter when it finishes
    max_new_tokens: int = 256             # (pack) GSM8K: greedy tokens generated per question at most
    gradient_checkpointing: bool = False  # (pack) recompute the frozen base's layers in the backward (less memory)
    log_every: int = 0                    # (pack) log the training loss as its mean over every N steps
    #                                       (0: N = ceil(steps / 1000), at most about 1,000 points per run)

    PACK_FIELDS = ("model", "task", "data_dir", "data", "data_sha", "rank", "alpha", "rslora", "dropout", "targets", "batch_size",
                   "epochs", "max_steps", "max_seq_len", "max_train_samples", "max_eval_samples",
                   "eval_every", "precision", "checkpoint_every", "max_new_tokens",
                   "gradient_checkpointing", "log_every")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict, where: str = "run", relative_to: str | None = None) -> "RunConfig":
        """Build and check a run from plain values (a YAML mapping, parsed options). A `task` given as
        a mapping declares its data (`tasks.spec`): its relative paths resolve against `relative_to`
        (default: the working folder), and its contents are fingerprinted unless `data_sha` is given."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        values = _declared_data(dict(values), where, relative_to)
        values = _init_family(values, where)
        task = str(values.get("task", cls.task))
        if "targets" not in values and task in tasks.names():
            # the model's own where it is a decoder lorainit knows (qkv_proj for Phi-3), else the task's
            targets = decoders.default_targets(str(values.get("model", cls.model)),
                                               tasks.get(task).default_targets or cls.targets)
            if targets != cls.targets:
                values = values | {"targets": targets}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise BadInput(f"{where}: unknown key {key!r}; run fields are: {', '.join(known)}")
            kwargs[name] = _coerce(name, value, known[name].type, where)
        run = cls(**kwargs)
        run.validate(where)
        return run

    def validate(self, where: str = "run") -> None:
        """Raise BadInput naming the first impossible value."""
        choices = {"task": tasks.names(), "init_variance": VARIANCES, "precision": PRECISIONS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise BadInput(f"{where}: {key} is {getattr(self, key)!r}; allowed: {', '.join(allowed)}")
        if families.canonical(self.init) != self.init:
            raise BadInput(f"{where}: init {self.init!r} is spelled {families.canonical(self.init)!r} in a run")
        family = families.get(self.init)
        args = json.loads(self.init_args) if self.init_args else {}
        if families.check_args(self.init, args, self.rank, where) != args:
            raise BadInput(f"{where}: init_args must hold only options that differ from their defaults")
        if self.init_variance != "kaiming" and not family.variance:
            clash = (" (PEFT's gaussian init is A ~ N(0, 1/r^2); init_variance gaussian is the theory's "
                     "N(0, 1/fan_in) for a and b)" if self.init == "gaussian" else "")
            raise BadInput(f"{where}: init_variance applies to inits a and b only, not {self.init}; its "
                           f"distribution is its reference's{clash}")
        positive = ("lr", "lr_b_ratio", "rank", "alpha", "batch_size", "max_seq_len", "divergence_factor",
                    "max_new_tokens")
        for key in positive:
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise BadInput(f"{where}: {key} must be a positive number, got {value!r}")
        for key in ("weight_decay", "max_grad_norm", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, key) < 0:
                raise BadInput(f"{where}: {key} must be >= 0, got {getattr(self, key)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise BadInput(f"{where}: dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise BadInput(f"{where}: warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.epochs is None and self.max_steps is None:
            raise BadInput(f"{where}: give epochs or max_steps")
        if self.epochs is not None and not self.epochs > 0:
            raise BadInput(f"{where}: epochs must be > 0, got {self.epochs!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise BadInput(f"{where}: max_steps must be >= 1, got {self.max_steps!r}")
        for key in ("max_train_samples", "max_eval_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise BadInput(f"{where}: {key} must be >= 1, got {getattr(self, key)!r}")
        if not self.targets:
            raise BadInput(f"{where}: targets is empty; name at least one module, e.g. query")
        if tasks.get(self.task).takes_data and self.data is None:
            raise BadInput(f"{where}: task {self.task} reads data the run declares: give task as a mapping, "
                           f"e.g. task: {{type: {self.task}, train: train.csv, eval: test.csv}}")
        if self.data is not None and not tasks.get(self.task).takes_data:
            raise BadInput(f"{where}: task {self.task} reads its own data; declared data needs a task type "
                           f"of {', '.join(n for n in tasks.names() if tasks.get(n).takes_data)}")
        if self.data is not None and self.data_dir is not None:
            raise BadInput(f"{where}: data_dir is not used by a task declared as data; give its files as "
                           "task.train and task.eval")
        if self.data_dir is not None and slices.folder(self.task) is not None:
            raise BadInput(f"{where}: task {self.task} reads the rows shipped with lorainit, so data_dir is not "
                           f"used; for a folder of your own use task {slices.base(self.task)}")

    def to_dict(self) -> dict:
        return {f: _plain(v) for f, v in dataclasses.asdict(self).items()}

    def run_id(self) -> str:
        """A short hash of the resolved config: the run's identity in a store (see the module's doc)."""
        values = self.to_dict()
        keyed = {name: values[name] for name in ID_FIELDS}
        for f in dataclasses.fields(self):
            if f.name not in ID_FIELDS and values[f.name] != _plain(f.default):
                keyed[f.name] = values[f.name]
        if self.data is not None:  # the spec without its paths: data_sha keys its files' contents
            keyed["data"] = spec.dumps(spec.identity(spec.loads(self.data)))
        if ID_SCHEMA != 1:  # schema 1's blob carries no version, so that its ids stay as they were
            keyed["__id_schema__"] = ID_SCHEMA
        blob = json.dumps(keyed, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def pack_key(self) -> tuple:
        """Runs with equal keys can train in one pack."""
        return tuple((name, json.dumps(getattr(self, name))) for name in self.PACK_FIELDS)


# Run ids: change ID_SCHEMA only on purpose (it changes every id); never edit ID_FIELDS.
ID_SCHEMA = 1
ID_FIELDS = ("model", "task", "data_dir", "init", "init_variance", "lr", "lr_b_ratio", "seed", "rank", "alpha",
             "rslora", "dropout", "targets", "batch_size", "epochs", "max_steps", "warmup_ratio", "weight_decay",
             "max_grad_norm", "max_seq_len", "max_train_samples", "max_eval_samples", "eval_every", "precision",
             "divergence_factor", "checkpoint_every", "save_adapters")


def _declared_data(values: dict, where: str, relative_to: str | None) -> dict:
    """`values` with a `task` mapping split into its type (`task`) and its spec (`data`, canonical
    JSON, paths absolute), and the data's fingerprint (`data_sha`) unless given."""
    task, data = values.get("task"), values.get("data")
    if isinstance(task, dict):
        given = dict(task)
        kind = given.pop("type", None)
        if kind is None:
            raise BadInput(f"{where}: task is a mapping without a type; give type: classification or type: sft")
        if not isinstance(kind, str) or kind not in tasks.names() or not tasks.get(kind).takes_data:
            takes = [n for n in tasks.names() if tasks.get(n).takes_data]
            raise BadInput(f"{where}: task.type is {kind!r}; a task declared as data has type {' or '.join(takes)}")
        if data is not None:
            raise BadInput(f"{where}: give the data once, as the task mapping (not also as data)")
        values["task"], data = kind, spec.normalise(kind, given, relative_to)
    if data is None:
        return values
    kind = str(values.get("task", RunConfig.task))
    if kind not in tasks.names() or not tasks.get(kind).takes_data:
        return values | {"data": spec.dumps(spec.loads(data)) if isinstance(data, dict) else data}  # validate says why
    try:
        parsed = spec.loads(data)
    except (TypeError, ValueError):
        raise BadInput(f"{where}: data must be a data spec (a mapping), got {data!r}") from None
    parsed = spec.normalise(kind, parsed, relative_to)
    values["data"] = spec.dumps(parsed)
    if values.get("data_sha") is None:
        values["data_sha"] = spec.fingerprint(parsed)
    return values


def _init_family(values: dict, where: str) -> dict:
    """`values` with `init` as its family's name (PEFT's strings mapped, refused ones refused with
    their reason) and `init_args` as canonical JSON of the options that differ from their defaults."""
    if "init" in values:
        try:
            values["init"] = families.canonical(values["init"])
        except BadInput as err:
            raise BadInput(f"{where}: {err}") from None
    given = values.get("init_args", values.get("init-args"))
    values.pop("init-args", None)
    if given is None:
        return values
    if isinstance(given, str):
        try:
            given = yaml.safe_load(given)
        except yaml.YAMLError:
            raise BadInput(f"{where}: init_args must be a mapping, e.g. {{reset: false}}, got {given!r}") from None
    if not isinstance(given, dict):
        raise BadInput(f"{where}: init_args must be a mapping, e.g. {{reset: false}}, got {given!r}")
    init = values.get("init", RunConfig.init)
    rank = values.get("rank", RunConfig.rank)
    rank = rank if isinstance(rank, int) else RunConfig.rank  # a bad rank is named by its own check
    changed = families.check_args(init, given, rank, where)
    values["init_args"] = json.dumps(changed, sort_keys=True, separators=(",", ":")) if changed else None
    return values


def _plain(value):
    """A field value as `to_dict` writes it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def _to_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(value)


def _to_int(value) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


def _to_float(value) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


def _to_names(value) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(t, str) for t in items):
        raise ValueError(value)
    return tuple(t.strip() for t in items if t.strip())


def _to_str(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(value)
    return str(value)


# one converter per field type used by RunConfig
_CONVERT = {"bool": _to_bool, "int": _to_int, "float": _to_float, "tuple[str, ...]": _to_names, "str": _to_str}


def _coerce(name: str, value, annotation: str, where: str):
    """Turn a YAML or command-line value into the field's type, or raise BadInput naming the key."""
    kind = annotation.replace(" | None", "")
    if value is None and "None" in annotation:
        return None
    try:
        return _CONVERT[kind](value)
    except (TypeError, ValueError):
        raise BadInput(f"{where}: {name} must be {_describe(kind)}, got {value!r}") from None


def _describe(kind: str) -> str:
    return {"bool": "true or false", "int": "an integer", "float": "a number",
            "tuple[str, ...]": "a list of module names", "str": "a string"}.get(kind, kind)


def default_run(**overrides) -> RunConfig:
    """A run with defaults and `overrides` (checked)."""
    return RunConfig.from_dict(overrides)

