"""LoRA init families: what each draws for A_0 and B_0, and whether it rewrites the frozen base.

A family is named by the run's `init` field; its options are the run's `init_args` (a mapping,
checked per family, each option with its reference's default):

| init | A_0 (r, in) | B_0 (out, r) | base | reference |
|---|---|---|---|---|
| `a` (PEFT's `true`) | kaiming U(±1/sqrt(in)) | 0 | W | PEFT's default |
| `b` | 0 | kaiming U(±1/sqrt(r)) | W | Hayou, Ghosh, Yu (2024) |
| `gaussian` | N(0, 1/r²), std 1/r | 0 | W | PEFT `gaussian` |
| `orthogonal` | (G_1 Q_odd)ᵀ / 10 | G_2ᵀ Q_even / 10 | W | PEFT `orthogonal` (r even) |
| `pissa` | sqrt(S_r/s) V_rᵀ | U_r sqrt(S_r/s) | W - s B_0 A_0 | PEFT `pissa` (full SVD) |
| `pissa_niter_<K>` | as pissa | as pissa | W - s B_0 A_0 | PEFT, randomised SVD, K iterations |
| `olora` | R[:r] | Q[:, :r] | W - s B_0 A_0 | PEFT `olora` (QR of W) |
| `ab` | U(±scale_a/sqrt(in)) | U(±scale_b/sqrt(in)) | W - s B_0 A_0 (reset) or W | "Learning Rate Matters" (2026), `AB_1_1_RESET` |

(W = U S Vᵀ; s = alpha/r, or alpha/sqrt(r) with rsLoRA.)

`a` and `b` draw as they always have (`inits.py`): nothing before the random factor. Every other
family draws exactly what its reference draws, from the run's 'init' stream put in place of
torch's global generator: for PEFT's families, PEFT's own layer (`peft.tuners.lora.layer.Linear`)
is built on a CPU fp32 copy of each adapted layer, in module order, so its constructor draws and
its family's draws come in PEFT's order; then `torch.manual_seed(purpose_seed(seed, "init"))`
followed by `peft.get_peft_model` gives the same factors bit for bit. `ab` follows its reference:
every layer's PEFT default draws first, then U(±scale_a/sqrt(in)) for A and U(±scale_b/sqrt(in))
for B, layer by layer.

A family that rewrites the base (W <- W - s B_0 A_0) cannot do so in a pack, whose runs share one
W. Its run keeps (A_0, B_0) as a frozen correction instead (`lora.PackedLoRALinear`), and computes
W x + s B A drop(x) - s B_0 A_0 x: the same function as PEFT's rewritten base, so the same
training. After PEFT's layer is built, its rewritten base is checked to be W - s B_0 A_0 bit for
bit, which is what the correction assumes.

On a pack whose model is on an accelerator, PiSSA's and OLoRA's decompositions run there, as PEFT
runs them for a model on that device (`pissa_niter_<K>` then draws from the run's 'init' stream on
that device, as PEFT draws from the device's generator). Factors from a decomposition (SVD, QR)
are cached (`FactorCache`) under a key of everything that
determines them: the family, its options, r, alpha, rsLoRA, the bytes of every adapted weight, the
seed where the family also draws, and PEFT's version. Every pack, resume and machine that shares
the cache folder then starts from the same bits, although SVDs differ in their last bits between
CPUs and thread counts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorainit.engine import rng
from lorainit.errors import BadInput
from lorainit.files import write_atomic


@dataclass(frozen=True)
class Family:
    name: str                      # the `init` value (pissa_niter_<K> for each K)
    label: str                     # how reports name it
    args: dict = field(default_factory=dict)  # option -> default
    peft: str | bool | None = None  # PEFT's `init_lora_weights` for it; None: PEFT lacks it
    decomposes: bool = False       # its factors come from an SVD or QR of W (cached)
    draws: bool = True             # it draws from the run's 'init' stream
    variance: bool = False         # `init_variance` applies (a, b)
    needs: str | None = None       # statistics of the run's rows it reads: "grad" or "acts" (`statistics.py`)
    choices: dict = field(default_factory=dict)  # option -> the values a text option takes
    rewrites: bool | None = None   # whether it rewrites W (None: when it decomposes W)

    def rewrites_base(self, args: dict | None = None) -> bool:
        """Whether PEFT's (or the reference's) init replaces W by W - s B_0 A_0."""
        if self.name == "ab":
            return bool({**self.args, **(args or {})}["reset"])
        return self.decomposes if self.rewrites is None else self.rewrites


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("a", "Init[A]", peft=True, variance=True),
    Family("b", "Init[B]", variance=True),
    Family("ab", "Init[AB]", args={"scale_a": 1.0, "scale_b": 1.0, "reset": True}),
    Family("gaussian", "Gaussian", peft="gaussian"),
    Family("orthogonal", "Orthogonal", peft="orthogonal"),
    Family("pissa", "PiSSA", peft="pissa", decomposes=True, draws=False),
    Family("olora", "OLoRA", peft="olora", decomposes=True, draws=False),
    Family("lora_ga", "LoRA-GA", peft="lora_ga", needs="grad", rewrites=True,
           args={"batches": 8, "direction": "ArB2r", "scale": "stable", "gamma": 16.0, "reuse": True},
           choices={"direction": ("ArB2r", "ArBr", "A2rBr", "random"),
                    "scale": ("stable", "weight_svd", "gd_scale", "unit", "original")}),
    Family("lora_one", "LoRA-One", needs="grad", draws=False, rewrites=False,
           args={"batches": 8, "gamma": 128.0, "reuse": True}),
    Family("eva", "EVA", peft="eva", needs="acts", draws=False, rewrites=False,
           args={"max_batches": 64, "tau": 0.99, "whiten": False, "label_mask": True, "rho": 1.0, "reuse": True}),
    Family("corda", "CorDA", peft="corda", needs="acts", draws=False, rewrites=True,
           args={"batches": 32, "mode": "ipm", "reuse": True}, choices={"mode": ("ipm", "kpm")}),
)}
DATA = tuple(name for name, f in FAMILIES.items() if f.needs)  # the families computed from the run's rows
_NITER = re.compile(r"^pissa_niter_([1-9][0-9]*)$")

# PEFT's `init_lora_weights` strings for lorainit's families (true is Init[A])
PEFT_NAMES = {"true": "a", "gaussian": "gaussian", "orthogonal": "orthogonal", "pissa": "pissa", "olora": "olora",
              "lora_ga": "lora_ga", "eva": "eva", "corda": "corda"}

# families the `init` field names but refuses, each with its one-line reason
REFUSED = {
    "false": "PEFT's init_lora_weights=false draws both A and B from nn.Linear's default, so the model's "
             "output moves at step 0; use a (PEFT's true), b, or ab",
    "loftq": "LoftQ replaces the frozen base by its quantised copy, a full-rank change that runs sharing one "
             "base cannot carry; train it with PEFT alone",
    "dora": "DoRA rescales every row of the base weight, a full-rank change that runs sharing one base "
            "cannot carry",
    "mica": "MiCA freezes B, which changes training, not only the init",
}
RHO = ("EVA's rank redistribution (rho > 1) gives each layer its own rank, 0 to rho x r, and drops the "
       "layers it gives 0; a pack's runs share one rank per layer, so only rho 1 (every layer rank r) is built")


def names() -> list[str]:
    """The `init` values a run accepts, as documented (pissa_niter_<K> stands for every K >= 1)."""
    return [*FAMILIES, "pissa_niter_<K>"]


def canonical(init) -> str:
    """`init` as a family name: PEFT's strings (true, gaussian, orthogonal, pissa, pissa_niter_K,
    olora; YAML's boolean true) map to lorainit's; a refused or unknown value raises BadInput."""
    if isinstance(init, bool):
        init = "true" if init else "false"
    if not isinstance(init, str):
        raise BadInput(f"init must be a family name, got {init!r}; expected one of {', '.join(names())}")
    key = init.strip().lower()
    if key in FAMILIES or _NITER.match(key):
        return key
    if key in PEFT_NAMES:
        return PEFT_NAMES[key]
    base = key.split("_")[0] if key.startswith("loftq") else key
    if base in REFUSED:
        return _refuse(init, REFUSED[base])
    raise BadInput(f"init is {init!r}; expected one of {', '.join(names())} (or PEFT's true)")


def _refuse(init: str, reason: str):
    raise BadInput(f"init {init!r} is refused: {reason}")


def get(init: str) -> Family:
    """The family of a canonical `init` name."""
    if (m := _NITER.match(init)) is not None:
        return Family(init, f"PiSSA (niter {m.group(1)})", peft=init, decomposes=True)
    if init not in FAMILIES:
        canonical(init)  # raises, naming why
        raise BadInput(f"init {init!r} is not a canonical family name; use {canonical(init)!r}")
    return FAMILIES[init]


def check_args(init: str, args: dict | None, rank: int, where: str = "run") -> dict:
    """`args` checked against the family's options; returns the options that differ from their
    defaults (empty when all are defaults). Raises BadInput naming an unknown option, a bad
    value, or a rank the family cannot take."""
    family = get(init)
    args = dict(args or {})
    unknown = [k for k in args if k not in family.args]
    if unknown:
        takes = ", ".join(family.args) if family.args else "none"
        raise BadInput(f"{where}: init_args has {unknown[0]!r}, which init {init} does not take; its options: {takes}")
    out = {}
    for key, value in args.items():
        default = family.args[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise BadInput(f"{where}: init_args.{key} must be true or false, got {value!r}")
        elif isinstance(default, str):
            if value not in family.choices[key]:
                raise BadInput(f"{where}: init_args.{key} is {value!r}; init {init} takes "
                               f"{', '.join(family.choices[key])}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadInput(f"{where}: init_args.{key} must be a whole number of at least 1, got {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise BadInput(f"{where}: init_args.{key} must be a positive number, got {value!r}")
            value = float(value)
        if value != default:
            out[key] = value
    if init == "eva" and "rho" in out:
        raise BadInput(f"{where}: init_args.rho is {out['rho']:g}; {RHO}")
    if init == "eva" and not 0 < out.get("tau", 0.5) <= 1:
        raise BadInput(f"{where}: init_args.tau must be in (0, 1], got {out['tau']!r}")
    if init == "orthogonal" and rank % 2:
        raise BadInput(f"{where}: init orthogonal needs an even rank (it pairs the rows of an r x r rotation), "
                       f"got rank {rank}")
    return out


def starts_at_base(init: str, args: dict | None = None) -> bool:
    """Whether a run of the family computes the base model at step 0: s B_0 A_0 = 0 (a, b, gaussian,
    eva), or carried as its correction (a family that rewrites the base). Not LoRA-One (one gradient
    step away by design), Init[AB] without reset, nor orthogonal (B_0 A_0 = 0 up to rounding)."""
    family = get(init)
    return family.rewrites_base(args) or family.name in ("a", "b", "gaussian", "eva")


def args_of(init: str, init_args: str | None) -> dict:
    """Every option of the family, the run's `init_args` (JSON) over the defaults."""
    return {**get(init).args, **(json.loads(init_args) if init_args else {})}


# -- drawing ----------------------------------------------------------------------------------


@dataclass
class Target:
    """One adapted layer, as the families read it: its frozen weight W (out, in) in fp32 on the CPU
    and whether the layer stores it transposed (GPT-2's Conv1D)."""
    name: str
    weight: torch.Tensor  # (out, in), fp32, CPU
    fan_in_fan_out: bool = False
    _digest: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, name: str, weight: torch.Tensor, fan_in_fan_out: bool) -> "Target":
        """The target of a layer's frozen weight as stored: (out, in), or (in, out) with
        `fan_in_fan_out` (GPT-2's Conv1D); copied to the CPU in fp32."""
        w = weight.detach().to("cpu", torch.float32)
        return cls(name, w.T.contiguous() if fan_in_fan_out else w.clone(), fan_in_fan_out)

    @property
    def digest(self) -> str:
        """sha256 of the weight's bytes (computed once: the weight is frozen)."""
        if self._digest is None:
            self._digest = hashlib.sha256(self.weight.contiguous().numpy().tobytes()).hexdigest()
        return self._digest


@dataclass
class Factors:
    """One run's initial factors, layer by layer: A_0 (r, in), B_0 (out, r), fp32 on the CPU, and
    whether the run keeps them as a correction of the shared base."""
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    corrected: bool


def _peft_layer(target: Target, rank: int, alpha: float, rslora: bool, how, generator: torch.Generator,
                device_generator: torch.Generator | None = None, attach: dict | None = None,
                config: dict | None = None):
    """PEFT's own LoRA layer built on an fp32 copy of `target` (on the CPU, or on the device of
    `device_generator`), drawing from `generator` as if it were torch's global CPU generator, and
    from `device_generator` as if it were the device's (PEFT's randomised SVD draws on the weight's
    device); the global generators are left as they were, and the given ones advance past the draws.
    `attach`: attributes set on the base layer first, as PEFT's preprocessing leaves them there (a
    data family's statistics); `config`: more `LoraConfig` fields (its family's sub-config)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    W = target.weight if device_generator is None else target.weight.to(device_generator.device)
    if target.fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D
        base = Conv1D(W.shape[0], W.shape[1])
        base.weight = nn.Parameter(W.T.contiguous().clone(), requires_grad=False)
    else:
        base = nn.Linear(W.shape[1], W.shape[0], bias=False)
        base.weight = nn.Parameter(W.clone(), requires_grad=False)
    for name, value in (attach or {}).items():
        setattr(base, name, value)
    import warnings
    with warnings.catch_warnings():  # PEFT warns that a data family needs its preprocessing: done here
        warnings.simplefilter("ignore", UserWarning)
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=how, use_rslora=rslora, lora_dropout=0.0,
                            fan_in_fan_out=target.fan_in_fan_out, **(config or {}))
    devices = [] if device_generator is None else [device_generator.device]
    with torch.random.fork_rng(devices=devices, device_type=devices[0].type if devices else None):
        torch.set_rng_state(generator.get_state())
        if device_generator is not None:
            module = torch.get_device_module(device_generator.device)
            module.set_rng_state(device_generator.get_state(), device_generator.device)
        layer = Linear(base, "default", config=config, r=rank, lora_alpha=alpha,
                       is_target_conv_1d_layer=False)
        generator.set_state(torch.get_rng_state())
        if device_generator is not None:
            device_generator.set_state(module.get_rng_state(device_generator.device))
    return layer


def _check_base(target: Target, layer, family: Family, scaling: float) -> None:
    """PEFT's base after its init is W (a family that keeps it) or W - s B_0 A_0, bit for bit as
    PEFT computes it (a family that rewrites it); anything else is a base change a pack cannot
    carry."""
    A = layer.lora_A["default"].weight.detach()
    B = layer.lora_B["default"].weight.detach()
    got = layer.get_base_layer().weight.detach()
    got = got.T if target.fan_in_fan_out else got
    W = target.weight.to(got.device)
    # PEFT rounds the offset as (s B) A for most families, as s (B A) for LoRA-GA: either is W - s B_0 A_0
    wants = [W - scaling * B @ A, W - scaling * (B @ A)] if family.rewrites_base() else [W]
    if not any(got.shape == want.shape and torch.equal(got, want) for want in wants):
        raise RuntimeError(f"{target.name}: PEFT's {family.name} init changed the base weight by more than "
                           f"s * B_0 A_0, which a pack cannot carry as a rank-{A.shape[0]} correction")
    if A.shape != (layer.r["default"], target.weight.shape[1]) or B.shape != (target.weight.shape[0], A.shape[0]):
        raise RuntimeError(f"{target.name}: PEFT's {family.name} init gave factors of shapes {tuple(A.shape)} "
                           f"and {tuple(B.shape)}")


def draw(init: str, args: dict, targets: list[Target], rank: int, alpha: float, rslora: bool,
         generator: torch.Generator, device_generator: torch.Generator | None = None) -> Factors:
    """Run the family's draws over `targets` (module order) from `generator` (the run's 'init'
    stream): A_0 and B_0 per layer, fp32 on the CPU. Not for `a` and `b`, which `inits.py` draws.
    With `device_generator` (the run's 'init' stream on an accelerator), a family that decomposes W
    does so there, as PEFT does for a model on that device."""
    family = get(init)
    args = {**family.args, **args}
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    A, B = [], []
    if family.name == "ab":
        for t in targets:  # the reference's get_peft_model: every layer's default draws first
            _peft_layer(t, rank, alpha, rslora, True, generator)
        for t in targets:
            fan_in = t.weight.shape[1]
            a = torch.empty(rank, fan_in).uniform_(-args["scale_a"] / math.sqrt(fan_in),
                                                   args["scale_a"] / math.sqrt(fan_in), generator=generator)
            b = torch.empty(t.weight.shape[0], rank).uniform_(-args["scale_b"] / math.sqrt(fan_in),
                                                              args["scale_b"] / math.sqrt(fan_in), generator=generator)
            A.append(a)
            B.append(b)
        return Factors(A, B, family.rewrites_base(args))
    if family.peft is None or family.name in ("a", "b"):
        raise ValueError(f"init {init} is drawn by lorainit.engine.inits, not here")
    on_device = device_generator if family.decomposes else None
    for t in targets:
        layer = _peft_layer(t, rank, alpha, rslora, family.peft, generator, on_device)
        _check_base(t, layer, family, scaling)
        A.append(layer.lora_A["default"].weight.detach().to("cpu", torch.float32).clone())
        B.append(layer.lora_B["default"].weight.detach().to("cpu", torch.float32).clone())
    return Factors(A, B, family.rewrites_base(args))


# -- from the run's own rows ------------------------------------------------------------------


def _drawing(generator: torch.Generator, fn):
    """fn() drawing from `generator` as if it were torch's global CPU generator."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        out = fn()
        generator.set_state(torch.get_rng_state())
    return out


def _pick(U: torch.Tensor, Vh: torch.Tensor, rank: int, direction: str, generator: torch.Generator):
    """LoRA-GA's split of the top 2r singular pairs between B (columns of U) and A (rows of Vh)."""
    if direction == "ArBr":
        return U[:, 0:2 * rank:2], Vh[1:2 * rank:2]
    if direction == "A2rBr":
        return U[:, :rank], Vh[rank:2 * rank]
    if direction == "ArB2r":
        return U[:, rank:2 * rank], Vh[:rank]
    perm = torch.randperm(2 * rank, generator=generator)
    return U[:, perm[rank:2 * rank]], Vh[perm[:rank]]


def _lora_ga_original(grad: torch.Tensor, rank: int, args: dict, generator: torch.Generator):
    """The LoRA-GA paper's code (its `stable` scale): the singular vectors of the gradient estimate,
    both factors times out^(1/4) / sqrt(gamma), no singular values: (A_0, B_0)."""
    U, _, V = _drawing(generator, lambda: torch.svd_lowrank(grad, q=min(4 * rank, min(grad.shape)), niter=4))
    B, A = _pick(U, V.T, rank, args["direction"], generator)
    scale = grad.shape[0] ** 0.25 / math.sqrt(args["gamma"])
    return (A * scale).contiguous(), (B * scale).contiguous()


def _lora_one(name: str, grad: torch.Tensor, rank: int, gamma: float):
    """LoRA-One's factors from the averaged gradient G: with -G = U S Vᵀ, B_0 = U_r sqrt(S_r) and
    A_0 = sqrt(S_r) V_rᵀ, both over sqrt(S_1 gamma); so s B_0 A_0 = -(s / (gamma S_1)) [G]_r."""
    U, S, Vh = torch.linalg.svd(-grad, full_matrices=False)
    if not S[0] > 0:
        raise RuntimeError(f"{name}: the gradient LoRA-One reads is zero on the rows it read, so it gives no direction")
    root = S[:rank].sqrt() / math.sqrt(float(S[0]) * gamma)
    return (root[:, None] * Vh[:rank]).contiguous(), (U[:, :rank] * root).contiguous()


def _corda_eigens(target: Target, covariance: torch.Tensor, rank: int, mode: str):
    """PEFT's CorDA eigens of W C (its own `collect_eigens_for_layer`), the top r (ipm) or bottom r (kpm)."""
    from peft import LoraConfig
    from peft.tuners.lora.corda import CordaEigens, collect_eigens_for_layer

    linear = nn.Linear(target.weight.shape[1], target.weight.shape[0], bias=False)
    linear.weight = nn.Parameter(target.weight.clone(), requires_grad=False)
    linear.covariance_matrix = covariance
    found = collect_eigens_for_layer(linear, LoraConfig(r=rank))
    part = slice(None, rank) if mode == "ipm" else slice(-rank, None)
    return CordaEigens(S_WC=found.S_WC[part].clone(), U_WC=found.U_WC[:, part].clone(),
                       V_WC=found.V_WC[:, part].clone())


def from_statistics(init: str, args: dict, targets: list[Target], rank: int, alpha: float, rslora: bool,
                    generator: torch.Generator, stats: list) -> Factors:
    """A data family's factors over `targets` (module order) from each one's statistics
    (`statistics.py`: the gradient estimate G (out, in), EVA's components, CorDA's covariance),
    drawing from `generator` (the run's 'init' stream) where the family draws. PEFT's families are
    built by PEFT's own layer with the statistics attached as its preprocessing attaches them."""
    from peft.tuners.lora.config import CordaConfig, LoraGAConfig

    family = get(init)
    args = {**family.args, **args}
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    A, B = [], []
    for t, st in zip(targets, stats):
        layer = None
        if init == "lora_ga" and args["scale"] != "original":
            gamma = int(args["gamma"]) if float(args["gamma"]).is_integer() else args["gamma"]
            grad = st.grad.T.contiguous() if t.fan_in_fan_out else st.grad  # as W.grad is stored
            layer = _peft_layer(t, rank, alpha, rslora, "lora_ga", generator, attach={"_peft_loraga_grad": grad},
                                config={"lora_ga_config": LoraGAConfig(direction=args["direction"], scale=args["scale"],
                                                                       stable_gamma=gamma)})
        elif init == "lora_ga":
            a, b = _lora_ga_original(st.grad, rank, args, generator)
        elif init == "lora_one":
            a, b = _lora_one(t.name, st.grad, rank, args["gamma"])
        elif init == "eva":
            a = st.components[:rank].clone()
            if args["whiten"]:
                a /= st.singular_values[:rank].sqrt().reshape(-1, 1)
            b = torch.zeros(t.weight.shape[0], rank)
        elif init == "corda":
            eigens = _corda_eigens(t, st.covariance, rank, args["mode"])
            layer = _peft_layer(t, rank, alpha, rslora, "corda", generator, attach={"eigens": eigens},
                                config={"corda_config": CordaConfig(corda_method=args["mode"])})
        else:
            raise ValueError(f"init {init} is not computed from statistics")
        if layer is not None:
            _check_base(t, layer, family, scaling)
            a = layer.lora_A["default"].weight.detach().to("cpu", torch.float32).clone()
            b = layer.lora_B["default"].weight.detach().to("cpu", torch.float32).clone()
        A.append(a.to("cpu", torch.float32))
        B.append(b.to("cpu", torch.float32))
    return Factors(A, B, family.rewrites_base(args))


# -- the cache of decompositions --------------------------------------------------------------


class FactorCache:
    """Factors of the families that decompose W or read the run's rows, kept by key in a folder
    (None: in this process only). A file is written once: a second writer of the same key finds it there and uses it, so
    every reader sees the first bits written."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[str, Factors] = {}

    @staticmethod
    def key(init: str, args: dict, targets: list[Target], rank: int, alpha: float, rslora: bool,
            seed: int, data: str | None = None) -> str:
        """`data`: for a family computed from the run's rows, a digest of everything its statistics
        read besides the weights (the rows' tensors, the model, precision; `statistics.py`)."""
        import peft
        family = get(init)
        h = hashlib.sha256()
        fields = {"init": init, "args": {**family.args, **args}, "rank": rank, "alpha": float(alpha),
                  "rslora": rslora, "seed": seed if family.draws or family.needs else None, "peft": peft.__version__}
        if data is not None:
            fields["data"] = data
        h.update(json.dumps(fields, sort_keys=True).encode())
        for t in targets:
            h.update(f"{t.name}:{tuple(t.weight.shape)}:{t.fan_in_fan_out}:{t.digest}".encode())
        return h.hexdigest()[:32]

    def path(self, key: str) -> Path | None:
        return self.folder / f"{key}.safetensors" if self.folder is not None else None

    def get(self, key: str) -> Factors | None:
        if key in self._memory:
            return self._memory[key]
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open
        from safetensors.torch import load_file
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        n = len(tensors) // 2
        factors = Factors([tensors[f"{i}.A"] for i in range(n)], [tensors[f"{i}.B"] for i in range(n)],
                          corrected=meta.get("corrected", "1") == "1")
        self._memory[key] = factors
        return factors

    def put(self, key: str, factors: Factors) -> Factors:
        """Keep `factors` under `key`; if another writer got there first, its factors win."""
        path = self.path(key)
        if path is not None:
            from safetensors.torch import save_file
            tensors = {f"{i}.A": a.contiguous() for i, a in enumerate(factors.A)}
            tensors |= {f"{i}.B": b.contiguous() for i, b in enumerate(factors.B)}
            staged = path.with_name(f".{path.name}.{os.getpid()}")
            meta = {"corrected": "1" if factors.corrected else "0"}
            write_atomic(staged, lambda tmp: save_file(tensors, tmp, metadata=meta))
            try:
                os.link(staged, path)  # fails if the key exists: the first bits written are kept
            except FileExistsError:
                self._memory.pop(key, None)
                staged.unlink(missing_ok=True)
                return self.get(key)
            staged.unlink(missing_ok=True)
        self._memory[key] = factors
        return factors


def factors(init: str, args: dict, targets: list[Target], rank: int, alpha: float, rslora: bool, seed: int,
            cache: FactorCache | None = None, device: str | torch.device = "cpu") -> Factors:
    """A run's initial factors for family `init` from `seed`'s 'init' stream; those of a family that
    decomposes W come from `cache` when it holds them, else are computed on `device` (a 7B model's
    full SVDs take hours on 2 CPU cores, minutes on a GPU) in fp32."""
    family = get(init)
    key = None
    if family.decomposes and cache is not None:
        key = FactorCache.key(init, args, targets, rank, alpha, rslora, seed)
        if (hit := cache.get(key)) is not None:
            return hit
    device = torch.device(device)
    on_device = rng.generator(seed, "init", device=device) if device.type != "cpu" else None
    found = draw(init, args, targets, rank, alpha, rslora, rng.generator(seed, "init"), on_device)
    return cache.put(key, found) if key is not None else found
