"""LoRA with K adapters on one frozen linear layer, and packs of them on a Hugging Face model.

A *pack* trains K runs on one copy of a frozen model. Every input batch is stacked
adapter-major: rows [k*b, (k+1)*b) belong to run k. The frozen layers see one big batch; each
LoRA layer applies adapter k to run k's rows only, by batched matmul:

    y = W x + bias + s * B_k (A_k dropout_k(x)),   s = alpha / r  (alpha / sqrt(r) with rsLoRA)

and, for a run whose init family rewrites the base to W - s B0_k A0_k (PiSSA, OLoRA, Init[AB]
with reset; `families.py`), minus s * B0_k (A0_k x) on the undropped x: the same function of
(A_k, B_k) as the rewritten base, while W stays shared.

with A of shape (K, r, in) and B of shape (K, out, r). The task head (the classifier's final
projection) is packed the same way: K full copies of its weight. So is every other linear layer
whose weights the pretrained checkpoint lacks (RoBERTa's `classifier.dense`): frozen, but drawn
from each run's own seed, as each run alone would draw it. Nothing here knows about training; the
init schemes live in `inits.py` and `families.py`.

Every trained tensor (A, B, the head) and every per-run frozen draw is kept in fp32 whatever dtype
the base model is stored in, as PEFT keeps its adapters: in bf16, the spacing near a B entry of
0.35 is 2e-3, so an Adam step of lr 1e-4 would round to no change at all. A base stored in fp64
(reference tests) keeps fp64 adapters. The forward casts them to the input's dtype, as autocast
would.

A frozen layer is an `nn.Linear`, or a `transformers` `Conv1D` (GPT-2), whose weight is stored
transposed, (in, out): its adapters have the same shapes as a linear layer's, and PEFT loads them
with `fan_in_fan_out`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from lorainit.engine import families, rng
from lorainit.engine.inits import VARIANCES, get_init
from lorainit.errors import BadInput

# Where a Hugging Face model keeps its task head's final projection, most specific first:
# RoBERTa's `classifier.out_proj` (its `classifier.dense` stays frozen, as in the paper's code),
# BERT's `classifier`, and the decoders' `score`.
HEAD_NAMES = ("classifier.out_proj", "classifier", "score")


def train_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of adapters, heads and optimiser state for a base stored in `dtype`: fp32, or
    fp64 for an fp64 base."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_conv1d(module: nn.Module) -> bool:
    """A `transformers` `Conv1D`: a linear layer whose weight is stored as (in, out) (GPT-2)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_adaptable(module: nn.Module) -> bool:
    """A layer LoRA can adapt: `nn.Linear`, or GPT-2's `Conv1D`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an adaptable layer."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class DropoutStreams:
    """Per-run dropout masks, drawn from each run's own 'dropout' stream.

    Runs that share a seed share their stream, and the mask is drawn once per distinct seed,
    so that a pack of same-seed runs sees the masks each run would see alone. When a batch is
    padded to a longer length than a run's own batch would be, `lengths` gives each active run's
    own length and its mask is drawn at that length (then padded), as the run alone would draw it.
    """

    def __init__(self, seeds: list[int], salt: tuple[int, ...] = ()):
        """`salt`: draw from each seed's 'dropout' stream salted with it (a pass apart from training's)."""
        self.seeds = [int(s) for s in seeds]
        self.salt = tuple(salt)
        self.distinct = sorted(set(self.seeds))
        self.group = torch.tensor([self.distinct.index(s) for s in self.seeds])  # (K,)
        self._generators: dict[torch.device, list[torch.Generator]] = {}
        self.lengths: list[int] | None = None  # own padded length per active run, stacking order
        self._active: tuple[torch.Tensor | None, list[int]] = (None, self.group.tolist())
        self.active_runs: list[int] | None = None  # the active runs on the host (None: all)

    def set_active(self, active: torch.Tensor | None, runs: list[int] | None) -> None:
        """The active runs' index tensor (on the model's device) and the same runs on the host, so
        that every layer's masks find their streams without reading the device."""
        self._active = (active, self.group.tolist() if runs is None else self.group[runs].tolist())
        self.active_runs = None if runs is None else list(runs)

    def _groups(self, active: torch.Tensor | None) -> list[int]:
        """The stream of each active run, in stacking order."""
        if active is self._active[0]:
            return self._active[1]
        return (self.group if active is None else self.group[active.cpu()]).tolist()

    def _streams(self, device: torch.device) -> list[torch.Generator]:
        if device not in self._generators:
            self._generators[device] = [rng.generator(s, "dropout", *self.salt, device=device) for s in self.distinct]
        return self._generators[device]

    def get_state(self) -> dict[torch.device, list[torch.Tensor]]:
        """Every stream's position, to replay its draws (a checkpointed layer's recompute)."""
        return {device: [g.get_state() for g in gens] for device, gens in self._generators.items()}

    def set_state(self, state: dict[torch.device, list[torch.Tensor]]) -> None:
        """Put the streams back where `get_state` found them; streams made since start afresh."""
        for device in list(self._generators):
            if device not in state:
                del self._generators[device]
        for device, states in state.items():
            for g, s in zip(self._streams(device), states):
                g.set_state(s)

    def mask(self, p: float, shape: tuple[int, ...], active: torch.Tensor | None,
             device: torch.device, dtype: torch.dtype, seq_dims: tuple[int, ...] = ()) -> torch.Tensor:
        """Scaled keep-masks (n_active, *shape): one draw per distinct seed among active runs.

        `seq_dims` are the dims of `shape` that run along the sequence; with `lengths` set, each
        run's mask is drawn with those dims at its own length.
        """
        groups = self._groups(active)
        lengths = self.lengths if (self.lengths is not None and seq_dims) else [None] * len(groups)
        streams = self._streams(device)
        drawn = {}
        for gi, length in zip(groups, lengths):
            if gi in drawn:
                continue
            own = [length if (d in seq_dims and length is not None) else size for d, size in enumerate(shape)]
            keep = torch.empty(own, device=device, dtype=torch.float32).bernoulli_(1.0 - p, generator=streams[gi])
            pad = []
            for d in reversed(range(len(shape))):
                pad += [0, shape[d] - own[d]]
            drawn[gi] = nn.functional.pad(keep, pad, value=1.0) if any(pad) else keep
        scaled = {gi: (keep / (1.0 - p)).to(dtype) for gi, keep in drawn.items()}
        if len(scaled) == 1:  # one seed in the batch: a broadcast view, no copy per run
            return next(iter(scaled.values())).unsqueeze(0).expand(len(groups), *shape)
        return torch.stack([scaled[gi] for gi in groups])  # (n_active, *shape)

    @staticmethod
    def apply(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (n*b, ...) times per-run masks keep (n, b, ...), without materialising an expanded mask."""
        return (x.reshape(keep.shape) * keep).view(x.shape)


    def drop_ragged(self, x: torch.Tensor, p: float, counts: list[int], active: torch.Tensor | None,
                    subset: "RowSubset | None" = None) -> torch.Tensor:
        """Dropout on rows laid run after run, run j owning `counts[j]` rows of x (sum, features).

        With `subset`, x holds only some of each run's rows: each run's mask is drawn at its full
        row count and the subset's rows are taken from it, so that those rows are dropped exactly
        as they would be with every row present.
        """
        groups = self._groups(active)
        streams = self._streams(x.device)
        drawn = {}
        for j, (gi, count) in enumerate(zip(groups, counts)):
            if gi not in drawn:
                full = count if subset is None else subset.full_counts[j]
                keep = torch.empty(full, x.shape[-1], device=x.device).bernoulli_(1.0 - p, generator=streams[gi])
                if subset is not None:
                    keep = keep.index_select(0, subset.rows[j].to(x.device))
                drawn[gi] = (keep / (1.0 - p)).to(x.dtype)
        if len(drawn) == 1 and len(set(counts)) == 1:  # one seed: broadcast, no copy per run
            return (x.view(len(counts), counts[0], -1) * drawn[groups[0]]).view(x.shape)
        return x * torch.cat([drawn[gi] for gi in groups])


@dataclass
class RowSubset:
    """Which of each run's rows a 2-d input holds, when only some are computed (see `unpadded.py`).

    full_counts[j]: run j's rows had all been present; rows[j]: the local indices of those present.
    """
    full_counts: list[int]
    rows: list[torch.Tensor]


class PackedLoRALinear(nn.Module):
    """K LoRA adapters (A: (K, r, in), B: (K, out, r)) on one frozen `nn.Linear` or `Conv1D`."""

    def __init__(self, base: nn.Module, num_runs: int, rank: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if num_runs < 1 or rank < 1:
            raise ValueError(f"num_runs and rank must be >= 1, got {num_runs} and {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        base.requires_grad_(False)
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.rslora = rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = dropout
        w = base.weight
        fan_in, fan_out = features(base)
        self.fan_in_fan_out = is_conv1d(base)  # the base weight is (in, out)
        dtype = train_dtype(w.dtype)  # fp32 whatever the base's dtype (see the module's doc)
        # Both factors start at zero; `inits.init_a` / `init_b` fill one run at a time.
        self.lora_A = nn.Parameter(torch.zeros(num_runs, rank, fan_in, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(num_runs, fan_out, rank, dtype=dtype, device=w.device))
        # Which adapters the current batch holds, in stacking order; None means all K.
        self.active: torch.Tensor | None = None
        # Rows of each active run when the input lays runs' tokens end to end, (N, in) or
        # (1, N, in) (unpadded training); None: every run has the same number of rows.
        self.row_counts: list[int] | None = None
        self.row_subset: RowSubset | None = None  # with row_counts: the rows present of each run's
        self.streams: DropoutStreams | None = None
        # Frozen initial factors of the runs whose family rewrites the base (`families.py`), made on
        # the first such run: run k subtracts s B0_k (A0_k x) on the undropped input x.
        self.register_buffer("lora_A0", None, persistent=False)  # (K, r, in)
        self.register_buffer("lora_B0", None, persistent=False)  # (K, out, r)
        self.corrected: list[bool] = [False] * num_runs
        # the corrected runs among the active ones: (positions in the stack, runs) on the device
        # and on the host; None when no active run is corrected (`LoRAPack.set_active` sets it)
        self.correct: tuple[torch.Tensor, torch.Tensor, list[int], list[int]] | None = None

    @classmethod
    def from_linear(cls, base: nn.Module, num_runs: int, rank: int, alpha: float,
                    dropout: float = 0.0, rslora: bool = False) -> "PackedLoRALinear":
        """Wrap `base` (frozen from then on) with `num_runs` zero adapters of rank `rank`."""
        return cls(base, num_runs, rank, alpha, dropout, rslora)

    @property
    def num_runs(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n*b, ..., in), adapter-major over the n active runs -> (n*b, ..., out)."""
        y = self.base(x)
        A, B = self.lora_A, self.lora_B
        if self.active is not None:
            A, B = A[self.active], B[self.active]
        n = A.shape[0]
        if self.row_counts is not None:  # tokens laid end to end: (N, in) or (1, N, in)
            return y + self.scaling * self._ragged(x.reshape(-1, x.shape[-1]), A, B).view(y.shape).to(y.dtype)
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split evenly over {n} runs")
        clean = x
        if self.training and self.dropout > 0:
            if self.streams is not None:
                per_run = (x.shape[0] // n, *x.shape[1:])  # (b, T, in): dim 1 runs along the sequence
                keep = self.streams.mask(self.dropout, per_run, self.active, x.device, x.dtype,
                                         seq_dims=(1,) if x.dim() >= 3 else ())
                x = self.streams.apply(x, keep)
            else:
                x = nn.functional.dropout(x, self.dropout, training=True)
        xs = x.reshape(n, -1, x.shape[-1])  # (n, rows, in)
        z = torch.bmm(xs, A.transpose(1, 2).to(xs.dtype))  # (n, rows, r): Z_A = A x
        d = torch.bmm(z, B.transpose(1, 2).to(z.dtype))    # (n, rows, out)
        if self.correct is not None:
            d = self._subtract_initial(d, clean.reshape(n, -1, clean.shape[-1]))
        return y + self.scaling * d.reshape(*y.shape[:-1], d.shape[-1]).to(y.dtype)

    def set_initial(self, k: int, A0: torch.Tensor | None, B0: torch.Tensor | None) -> None:
        """Make run k subtract s B0 A0 x (its family rewrote the base to W - s B0 A0), or stop
        doing so (None)."""
        if A0 is None:
            if self.lora_A0 is not None:
                self.lora_A0[k].zero_()
                self.lora_B0[k].zero_()
            self.corrected[k] = False
            return
        if self.lora_A0 is None:
            self.lora_A0 = torch.zeros_like(self.lora_A, requires_grad=False)
            self.lora_B0 = torch.zeros_like(self.lora_B, requires_grad=False)
        with torch.no_grad():
            self.lora_A0[k].copy_(A0)
            self.lora_B0[k].copy_(B0)
        self.corrected[k] = True

    def _subtract_initial(self, d: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """d (n, rows, out) with B0_k (A0_k x) taken from each corrected active run's rows, x the
        undropped input xs (n, rows, in). With every active run corrected, the products run on the
        same shapes as the adapters', so a run still at its initial factors gets exactly zero."""
        pos, runs, pos_host, _ = self.correct
        every = len(pos_host) == d.shape[0]
        A0, B0, xc = self.lora_A0[runs], self.lora_B0[runs], xs if every else xs[pos]
        c = torch.bmm(torch.bmm(xc, A0.transpose(1, 2).to(xc.dtype)), B0.transpose(1, 2).to(xc.dtype))
        return d - c if every else d.index_add(0, pos, c.to(d.dtype), alpha=-1)

    def forward_shared(self, x0: torch.Tensor, n: int) -> torch.Tensor:
        """The layer on rows x0 (N0, in) that all n active runs hold alike, under one dropout stream:
        the frozen matmul runs once, each adapter on x0 -> (n * N0, out), run-major. Equal to
        `forward(x0.repeat(n, 1))` with the same row counts."""
        y0 = self.base(x0)                                     # (N0, out)
        A, B = self.lora_A, self.lora_B
        if self.active is not None:
            A, B = A[self.active], B[self.active]
        if A.shape[0] != n:
            raise ValueError(f"{n} runs share the rows but {A.shape[0]} adapters are active")
        clean = x0
        if self.training and self.dropout > 0:
            first = self.active[:1] if self.active is not None else torch.zeros(1, dtype=torch.long)
            if self.streams is not None:  # the runs' one mask, drawn as `forward` draws it
                x0 = self.streams.drop_ragged(x0, self.dropout, [x0.shape[0]], first)
            else:
                raise ValueError("shared rows need the pack's dropout streams")
        z = (x0 @ A.reshape(-1, A.shape[-1]).T.to(x0.dtype)).view(x0.shape[0], n, -1).transpose(0, 1)  # (n, N0, r)
        d = torch.bmm(z, B.transpose(1, 2).to(z.dtype))       # (n, N0, out)
        if self.correct is not None:
            d = self._subtract_initial(d, clean.unsqueeze(0).expand(n, *clean.shape))
        return (y0.unsqueeze(0) + self.scaling * d.to(y0.dtype)).reshape(-1, y0.shape[-1])

    def _ragged(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The LoRA path for rows laid run after run in unequal numbers: (sum of counts, out)."""
        counts, clean = self.row_counts, x
        if self.training and self.dropout > 0:
            if self.streams is not None:
                x = self.streams.drop_ragged(x, self.dropout, counts, self.active, self.row_subset)
            else:
                x = nn.functional.dropout(x, self.dropout, training=True)
        if len(set(counts)) == 1:  # equal shares: one batched matmul
            xs = x.view(len(counts), counts[0], -1)  # (n, rows, in)
            z = torch.bmm(xs, A.transpose(1, 2).to(xs.dtype))
            d = torch.bmm(z, B.transpose(1, 2).to(z.dtype))
            if self.correct is not None:
                d = self._subtract_initial(d, clean.view(xs.shape))
            return d.reshape(x.shape[0], -1)
        parts = [xk @ A[j].T.to(xk.dtype) @ B[j].T.to(xk.dtype) for j, xk in enumerate(x.split(counts))]
        if self.correct is not None:
            rows = clean.split(counts)
            for j, k in zip(self.correct[2], self.correct[3]):
                parts[j] = parts[j] - rows[j] @ self.lora_A0[k].T.to(rows[j].dtype) @ self.lora_B0[k].T.to(rows[j].dtype)
        return torch.cat(parts)

    @torch.no_grad()
    def merged_weight(self, k: int) -> torch.Tensor:
        """W + s * (B_k A_k - B0_k A0_k) in the base's layout: (out, in), or (in, out) for a `Conv1D`
        (B0_k A0_k = 0 for a run whose family keeps the base)."""
        delta = self.scaling * (self.lora_B[k] @ self.lora_A[k])  # (out, in)
        if self.corrected[k]:
            delta = delta - self.scaling * (self.lora_B0[k] @ self.lora_A0[k])
        return self.base.weight + (delta.T if self.fan_in_fan_out else delta).to(self.base.weight.dtype)

    def merge(self, k: int) -> nn.Module:
        """A plain copy of the base layer equal to this layer with adapter k (dropout off)."""
        out = copy.deepcopy(self.base)
        with torch.no_grad():
            out.weight.copy_(self.merged_weight(k))
        return out

    def extra_repr(self) -> str:
        corrected = f", corrected={sum(self.corrected)}" if any(self.corrected) else ""
        return (f"runs={self.num_runs}, rank={self.rank}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:g}, dropout={self.dropout:g}{corrected}")


class PackedHead(nn.Module):
    """K copies of a linear layer, applied run by run: the task head's final projection (trained),
    or a layer the checkpoint lacks (`trainable=False`: frozen, but each run has its own draw)."""

    def __init__(self, base: nn.Linear, num_runs: int, trainable: bool = True):
        super().__init__()
        w = base.weight.detach().to(train_dtype(base.weight.dtype))  # fp32 (see the module's doc)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_dtype = base.weight.dtype  # what `unpack` gives back
        self.weight = nn.Parameter(w.unsqueeze(0).repeat(num_runs, 1, 1), requires_grad=trainable)  # (K, out, in)
        b = base.bias.detach().to(w.dtype) if base.bias is not None else None
        self.bias = (nn.Parameter(b.unsqueeze(0).repeat(num_runs, 1), requires_grad=trainable)
                     if b is not None else None)  # (K, out)
        self.active: torch.Tensor | None = None

    @property
    def num_runs(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n*b, ..., in), adapter-major over the n active runs -> (n*b, ..., out)."""
        W, b = self.weight, self.bias
        if self.active is not None:
            W = W[self.active]
            b = b[self.active] if b is not None else None
        n = W.shape[0]
        xs = x.reshape(n, -1, x.shape[-1])  # (n, rows, in)
        y = torch.bmm(xs, W.transpose(1, 2).to(xs.dtype))  # (n, rows, out)
        if b is not None:
            y = y + b.unsqueeze(1).to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def unpack(self, k: int) -> nn.Linear:
        """Run k's head as a plain `nn.Linear`."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.base_dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight[k])
            if self.bias is not None:
                out.bias.copy_(self.bias[k])
        return out


@dataclass(frozen=True)
class LoRAConfig:
    """The adapter shape shared by every run of a pack."""

    rank: int = 8                 # r, the LoRA rank
    alpha: float = 16.0           # scaling numerator: s = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0          # LoRA dropout on the LoRA input
    rslora: bool = False          # rank-stabilised scaling alpha / sqrt(r)
    targets: tuple[str, ...] = ("query", "value")  # module names to adapt (suffix match)


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_head(model: nn.Module) -> str | None:
    """Name of the model's task-head projection (see HEAD_NAMES), or None if it has none."""
    names = dict(model.named_modules())
    for head in HEAD_NAMES:
        if isinstance(names.get(head), nn.Linear):
            return head
    return None


def adaptable_names(model: nn.Module) -> list[str]:
    """Full names of every layer LoRA can adapt (`nn.Linear`, GPT-2's `Conv1D`), in module order."""
    return [n for n, m in model.named_modules() if is_adaptable(m)]


def check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """BadInput naming every target that matches no linear layer of `model` (a skeleton on the
    meta device serves: only module names and types are read)."""
    linears = adaptable_names(model)
    missing = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if missing:
        leaves = sorted({n.rpartition(".")[2] for n in linears})
        raise BadInput(
            f"target module(s) {', '.join(map(repr, missing))} match no linear layer of "
            f"{type(model).__name__}; its linear module names are: {', '.join(leaves)}")


class LoRAPack:
    """K LoRA runs on one frozen Hugging Face model: the injected layers, the packed head, inits."""

    def __init__(self, model: nn.Module, config: LoRAConfig, num_runs: int, train_head: bool = True,
                 fresh: tuple[str, ...] = ()):
        """`fresh`: the model's parameter names that its checkpoint lacks (drawn at load). Linear
        layers among them other than the head become per-run frozen copies (`self.fresh`); any
        other fresh parameter is refused, since a pack could not draw it per run."""
        self.model = model
        self.config = config
        self.num_runs = num_runs
        if any(isinstance(m, (PackedLoRALinear, PackedHead)) for m in model.modules()):
            raise BadInput(f"this {type(model).__name__} already holds a LoRA pack; inject into a fresh model")
        linears = adaptable_names(model)
        self.head_name = find_head(model) if train_head else None
        check_targets(model, config.targets)
        model.requires_grad_(False)
        fresh_modules = sorted({name.rpartition(".")[0] for name in fresh} - {self.head_name})
        modules = dict(model.named_modules())
        odd = [n for n in fresh_modules if not isinstance(modules.get(n), nn.Linear)]
        if odd:
            raise BadInput(f"{type(model).__name__}: the checkpoint lacks {', '.join(odd)}, which "
                           "is not a linear layer; a pack draws only linear layers per run")
        fresh_modules = [n for n in linears if n in fresh_modules]  # module order: the draw order
        self.layer_names = [n for n in linears if n != self.head_name and n not in fresh_modules
                            and any(_matches(n, t) for t in config.targets)]
        self.layers: dict[str, PackedLoRALinear] = {}
        for name in self.layer_names:
            layer = PackedLoRALinear.from_linear(_get(model, name), num_runs, config.rank, config.alpha,
                                                 config.dropout, config.rslora)
            _set(model, name, layer)
            self.layers[name] = layer
        self.head: PackedHead | None = None
        if self.head_name is not None:
            self.head = PackedHead(_get(model, self.head_name), num_runs)
            _set(model, self.head_name, self.head)
        self._active_host: list[int] | None = None  # the active runs in stacking order (None: all)
        self._targets: list[families.Target] | None = None  # the frozen weights' CPU copies, made on demand
        self.fresh: dict[str, PackedHead] = {}
        for name in fresh_modules:
            self.fresh[name] = PackedHead(_get(model, name), num_runs, trainable=False)
            _set(model, name, self.fresh[name])
        model.train(model.training)  # new modules follow the model's train/eval mode

    # -- parameters -------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable tensor of the pack; each has the run index as its leading dim."""
        params = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        if self.head is not None:
            params += [p for p in (self.head.weight, self.head.bias) if p is not None]
        return params

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable tensors by their model path (`...query.lora_A`, `classifier.weight`)."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_A"] = layer.lora_A
            out[f"{name}.lora_B"] = layer.lora_B
        if self.head is not None:
            out[f"{self.head_name}.weight"] = self.head.weight
            if self.head.bias is not None:
                out[f"{self.head_name}.bias"] = self.head.bias
        return out

    def fresh_tensors(self) -> dict[str, torch.Tensor]:
        """The per-run frozen copies of the layers the checkpoint lacks, by model path, (K, ...) each."""
        out = {}
        for name, layer in self.fresh.items():
            out[f"{name}.weight"] = layer.weight
            if layer.bias is not None:
                out[f"{name}.bias"] = layer.bias
        return out

    def trainable_per_run(self) -> int:
        """Number of trainable parameters of one run (LoRA factors plus head)."""
        return sum(p[0].numel() for p in self.parameters())

    # -- init -------------------------------------------------------------------------------

    def init_run(self, k: int, init: str, variance: str = "kaiming", seed: int = 0, args: dict | None = None,
                 cache: "families.FactorCache | None" = None) -> None:
        """Initialise run k's adapters with family `init` (`families.py`; `args` its options), its
        head and its fresh layers, from `seed`.

        LoRA factors are drawn layer by layer in module order from the run's 'init' stream (`a`
        and `b` by `inits.py`, the others as their reference draws them); a family that rewrites
        the base keeps its initial factors as run k's correction. Factors from a decomposition
        come from `cache` when it holds them. A family computed from the run's rows (LoRA-GA,
        LoRA-One, EVA, CorDA) leaves the factors at zero here: the trainer sets them from
        statistics gathered with the pack built (`statistics.initialise`). The head is drawn from the run's 'head' stream, as
        the model itself initialises a fresh head (N(0, initializer_range), bias 0); the i-th
        fresh layer (module order) the same way from the 'head' stream salted with i + 1. Every
        draw is made on the CPU and then copied, so a seed gives the same starting point on every
        device.
        """
        if not 0 <= k < self.num_runs:
            raise IndexError(f"run {k} is outside this pack of {self.num_runs}")
        if variance not in VARIANCES:
            raise BadInput(f"unknown init_variance {variance!r}; expected one of {', '.join(VARIANCES)}")
        with torch.no_grad():
            if init in ("a", "b"):
                fill = get_init(init)
                g = rng.generator(seed, "init")
                for layer in self.layers.values():
                    a, b = layer.lora_A[k].cpu().clone(), layer.lora_B[k].cpu().clone()
                    fill(a, b, variance, g)
                    layer.lora_A[k].copy_(a)
                    layer.lora_B[k].copy_(b)
                    layer.set_initial(k, None, None)
                self._route(self._active_host)
            elif families.get(init).needs:  # computed from the run's rows once the pack runs (`statistics.py`)
                self.set_factors(k, None)
            else:
                cfg = self.config
                device = next(iter(self.layers.values())).lora_A.device if self.layers else "cpu"
                self.set_factors(k, families.factors(init, args or {}, self.targets(), cfg.rank, cfg.alpha, cfg.rslora,
                                                     seed, cache, device))
            std = float(getattr(getattr(self.model, "config", None), "initializer_range", 0.02))
            drawn = ([(self.head, rng.generator(seed, "head"))] if self.head is not None else [])
            drawn += [(layer, rng.generator(seed, "head", i + 1)) for i, layer in enumerate(self.fresh.values())]
            for layer, gh in drawn:
                w = torch.empty(layer.weight.shape[1:], dtype=layer.weight.dtype)
                layer.weight[k].copy_(w.normal_(0.0, std, generator=gh))
                if layer.bias is not None:
                    layer.bias[k].zero_()

    def set_factors(self, k: int, drawn: "families.Factors | None") -> None:
        """Run k's adapters set to `drawn` (kept as its correction where they are one), or to zero."""
        with torch.no_grad():
            for i, layer in enumerate(self.layers.values()):
                if drawn is None:
                    layer.lora_A[k].zero_()
                    layer.lora_B[k].zero_()
                    layer.set_initial(k, None, None)
                    continue
                a, b = drawn.A[i], drawn.B[i]
                layer.lora_A[k].copy_(a)
                layer.lora_B[k].copy_(b)
                layer.set_initial(k, *((a, b) if drawn.corrected else (None, None)))
        self._route(self._active_host)

    def targets(self) -> list[families.Target]:
        """The adapted layers' frozen weights as the families read them: (out, in), fp32, CPU. Copied
        once per pack (the weights are frozen), and each hashed once for the decomposition cache."""
        if self._targets is None:
            self._targets = [families.Target.of(name, layer.base.weight, layer.fan_in_fan_out)
                             for name, layer in self.layers.items()]
        return self._targets

    def release_targets(self) -> None:
        """Free the CPU copies `targets()` made (once every run is initialised)."""
        self._targets = None

    @property
    def corrected(self) -> list[bool]:
        """Per run: whether it keeps its initial factors as a correction of the shared base."""
        first = next(iter(self.layers.values()), None)
        return list(first.corrected) if first is not None else [False] * self.num_runs

    def initial_factors(self) -> dict[str, torch.Tensor]:
        """The corrected runs' frozen initial factors by model path (`...query.lora_A0`), (K, ...)
        each (zero for runs without a correction); empty when no run has one."""
        out = {}
        for name, layer in self.layers.items():
            if layer.lora_A0 is not None:
                out[f"{name}.lora_A0"], out[f"{name}.lora_B0"] = layer.lora_A0, layer.lora_B0
        return out

    def set_initial_factors(self, tensors: dict[str, torch.Tensor], corrected: list[bool]) -> None:
        """Put back `initial_factors()` as saved (a checkpoint), with the runs they apply to."""
        for name, layer in self.layers.items():
            for k in range(self.num_runs):
                if corrected[k]:
                    layer.set_initial(k, tensors[f"{name}.lora_A0"][k], tensors[f"{name}.lora_B0"][k])
                else:
                    layer.set_initial(k, None, None)
        self._route(self._active_host)

    def _route(self, runs: list[int] | None) -> None:
        """Tell every layer which of the active runs (`runs` in stacking order; None: all) are corrected."""
        corrected = self.corrected
        active = list(range(self.num_runs)) if runs is None else list(runs)
        pos = [j for j, k in enumerate(active) if corrected[k]]
        route = None
        if pos:
            device = self.parameters()[0].device
            own = [active[j] for j in pos]
            route = (torch.tensor(pos, device=device), torch.tensor(own, device=device), pos, own)
        for layer in self.layers.values():
            layer.correct = route

    # -- batches ----------------------------------------------------------------------------

    def set_active(self, runs: list[int] | torch.Tensor | None) -> None:
        """Declare which runs the next batches hold, in stacking order (None: all K). Every run in
        order is the same as None: the layers then use their parameters whole, with no gather in
        the forward and no scatter of the gradients in the backward."""
        idx = None
        host = None if runs is None else torch.as_tensor(runs, dtype=torch.long)
        if host is not None and host.tolist() == list(range(self.num_runs)):
            host = None
        if host is not None:
            if host.numel() == 0 or int(host.min()) < 0 or int(host.max()) >= self.num_runs:
                raise ValueError(f"active runs {host.tolist()} must be a non-empty subset of 0..{self.num_runs - 1}")
            idx = host.to(self.parameters()[0].device, non_blocking=True)
        for m in [*self.layers.values(), *([self.head] if self.head is not None else []), *self.fresh.values()]:
            m.active = idx
        self._active_host = None if host is None else host.tolist()
        self._route(self._active_host)
        streams = {id(layer.streams): layer.streams for layer in self.layers.values() if layer.streams is not None}
        for s in streams.values():
            s.set_active(idx, None if host is None else host.tolist())

    def set_dropout_seeds(self, seeds: list[int] | None) -> None:
        """Draw LoRA dropout masks from each run's own seed (None: torch's global generator)."""
        if seeds is not None and len(seeds) != self.num_runs:
            raise ValueError(f"need {self.num_runs} seeds, got {len(seeds)}")
        streams = DropoutStreams(seeds) if seeds is not None else None
        for layer in self.layers.values():
            layer.streams = streams

    # -- unpacking --------------------------------------------------------------------------

    def merged_model(self, k: int) -> nn.Module:
        """A plain copy of the model with run k's adapters merged in and run k's head."""
        model = copy.deepcopy(self.model)
        for name in self.layer_names:
            _set(model, name, _get(model, name).merge(k))
        for name in [*([self.head_name] if self.head_name is not None else []), *self.fresh]:
            _set(model, name, _get(model, name).unpack(k))
        return model


def stack_runs(batch: dict[str, torch.Tensor], num_runs: int) -> dict[str, torch.Tensor]:
    """The same batch for each of `num_runs` runs, stacked adapter-major along dim 0."""
    return {k: v.repeat(num_runs, *([1] * (v.dim() - 1))) for k, v in batch.items()}
