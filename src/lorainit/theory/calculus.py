"""The γ-exponent calculus of one LoRA module, and a width sweep that checks it.

Hayou, Ghosh, Yu (NeurIPS 2024), "The Impact of Initialization on LoRA Finetuning Dynamics", §3,
in the framework of LoRA+ (Hayou, Ghosh, Yu 2024, §4). One LoRA module of width n and fixed rank r
reads a fixed input z ∈ R^n with Θ(1) entries:

    Z_A = A z ∈ R^r,   Z_B = B Z_A ∈ R^n,   A: (r, n),   B: (n, r)

and is trained with a scale-invariant optimiser (SignSGD or Adam: every update entry is Θ(η)) at
learning rate η = Θ(n^-c). γ[v] is the exponent with v = Θ(n^γ[v]) entrywise, -inf when v is
exactly zero. One step changes Z_B by δ¹ + δ² + δ³ with

    δ¹ = B ΔZ_A,   δ² = ΔB Z_A,   δ³ = ΔB ΔZ_A   (each a sum over r terms only)

The inits are the ones in `engine/inits.py` with the theory's `gaussian` variances:

- Init[A] ("a"): A ~ N(0, 1/n), B = 0.
- Init[B] ("b"): B ~ N(0, 1/r), A = 0.

Verdicts (§3): output-stable iff γ[Z_B] <= 0; internally stable iff also γ[Z_A] <= 0; efficient
feature learning iff γ[δ¹] = γ[δ²] = 0 (both factors move the features by Θ(1)). The maximal
stable rate is the smallest c that is output-stable; it is solved here from the calculus, exactly.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import torch

from lorainit.engine import rng
from lorainit.engine.inits import get_init
from lorainit.errors import BadInput

NEG_INF = float("-inf")  # γ of an exactly-zero quantity
QUANTITIES = ("Z_A", "Z_B", "delta1", "delta2", "delta3")  # the exponents every row reports
VERDICTS = ("output_stable", "internally_stable", "efficient")
GRID = (0, 0.25, 0.5, 0.75, 1, 1.25, 1.5)  # the c values of the default table
OPTIMIZERS = ("adam", "signsgd")
WIDTHS = tuple(2**k for k in range(8, 15))  # 2^8 .. 2^14
TOLERANCE = 0.1  # how far a measured slope may sit from the predicted one before it is flagged


# --------------------------------------------------------------------------------------------
# The calculus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exponent:
    """γ as a function of c: the largest of some affine pieces const + slope·c (none: -inf).

    Every exponent of the model is built from n (γ = 1), η (γ = -c) and the init's exponents by
    sums (products of quantities) and maxima (sums of quantities), so it stays in this form, and
    "for which c is γ <= 0" has an exact answer.
    """

    # (const, slope) pairs; the empty set is an exactly-zero quantity (γ = -inf)
    pieces: frozenset[tuple[Fraction, Fraction]] = frozenset()

    @staticmethod
    def affine(const: int, slope: int = 0) -> Exponent:
        """The exponent const + slope·c."""
        return Exponent(frozenset({(Fraction(const), Fraction(slope))}))

    def __add__(self, other: Exponent) -> Exponent:
        # γ[x·y] = γ[x] + γ[y] for a product summed over Θ(1) terms (r is fixed); -inf absorbs
        return Exponent(frozenset((k1 + k2, s1 + s2) for k1, s1 in self.pieces for k2, s2 in other.pieces))

    def __or__(self, other: Exponent) -> Exponent:
        # γ[x + y] = max(γ[x], γ[y]): generic terms of different origin do not cancel
        return Exponent(self.pieces | other.pieces)

    def at(self, c: Fraction) -> Fraction | float:
        """The exponent's value at c: an exact Fraction, or -inf."""
        return max((const + slope * c for const, slope in self.pieces), default=NEG_INF)


ZERO = Exponent()  # an exactly-zero quantity
ONE = Exponent.affine(0)  # a Θ(1) quantity
WIDTH = Exponent.affine(1)  # n itself
ETA = Exponent.affine(0, -1)  # η = Θ(n^-c); with SignSGD/Adam every update entry is Θ(η)

# init -> (γ[Z_A], γ[B]) at step 0 (§3). Init[A]: Z_A = A z sums n terms of random sign and size
# n^-1/2, so Θ(1); B = 0. Init[B]: A = 0 so Z_A = 0; B's entries are N(0, 1/r), Θ(1) for fixed r.
AT_INIT: dict[str, tuple[Exponent, Exponent]] = {"a": (ONE, ZERO), "b": (ZERO, ONE)}


def _check_init(init: str) -> str:
    if not isinstance(init, str) or init not in AT_INIT:
        raise BadInput(f"unknown init {init!r}; expected one of {', '.join(AT_INIT)}")
    return init


def _as_fraction(c: float) -> Fraction:
    """c as an exact Fraction; BadInput unless it is a finite real number."""
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
        raise BadInput(f"c must be a finite number (the learning rate is Θ(n^-c), e.g. 0.5); got {c!r}")
    if isinstance(c, numbers.Rational):
        return Fraction(int(c.numerator), int(c.denominator))
    # through str so that 0.1 means 1/10 rather than the binary float nearest to it
    return Fraction(str(float(c)))


def derive(init: str) -> dict[str, Exponent]:
    """Each quantity's exponent, as a function of c, after a fixed number t >= 2 of steps (§3).

    t >= 2 because under Init[A] B = 0 at step 0, so A's first gradient is exactly zero; from the
    second step on every factor has moved.
    """
    za0, b0 = AT_INIT[_check_init(init)]
    # ∇A = (Bᵀ g) zᵀ: every row of ΔA has signs aligned with z, so ΔZ_A = ΔA z adds n aligned
    # Θ(η) terms: γ = 1 - c (the "n·η" of LoRA+ §4).
    dza = WIDTH + ETA
    za = za0 | dza
    b = b0 | ETA
    return {
        "Z_A": za,
        "Z_B": b + za,
        "delta1": b + dza,  # B ΔZ_A
        "delta2": ETA + za,  # ΔB Z_A
        "delta3": ETA + dza,  # ΔB ΔZ_A
    }


def _verdicts(g: dict[str, Fraction | float]) -> dict[str, bool]:
    output_stable = g["Z_B"] <= 0
    return {
        "output_stable": output_stable,
        "internally_stable": output_stable and g["Z_A"] <= 0,
        "efficient": g["delta1"] == 0 and g["delta2"] == 0,
    }


def exponents(init: str, c: float) -> dict:
    """γ of Z_A, Z_B, δ¹, δ², δ³ (floats, -inf for exact zeros) and the verdicts at η = Θ(n^-c).

    Keys: init, c, lr_exponent (= -c), Z_A, Z_B, delta1, delta2, delta3, output_stable,
    internally_stable, efficient. The verdicts are decided on exact fractions.
    """
    exact_c = _as_fraction(c)
    g = {name: e.at(exact_c) for name, e in derive(init).items()}
    return {"init": init, "c": float(exact_c), "lr_exponent": float(-exact_c),
            **{name: float(v) for name, v in g.items()}, **_verdicts(g)}


def max_stable_c(init: str) -> Fraction:
    """The smallest c (largest rate η = n^-c) at which γ[Z_B] <= 0, solved exactly.

    γ[Z_B] <= 0 iff every affine piece const + slope·c <= 0; a piece with slope < 0 asks for
    c >= const / -slope, so c* is the largest of those thresholds. Init[A]: 1/2; Init[B]: 1.
    """
    lower: list[Fraction] = []
    for const, slope in derive(init)["Z_B"].pieces:
        if slope < 0:
            lower.append(const / -slope)
        elif const > 0 or slope > 0:  # never met by the two inits: a rate that cannot be bounded
            raise ValueError(f"γ[Z_B] has a piece {const} + {slope}·c with no smallest stable c")
    if not lower:
        raise ValueError(f"Init[{init.upper()}] is output-stable at every rate; no maximal one")
    return max(lower)


def table(inits: tuple[str, ...] = ("a", "b"), cs: tuple[float, ...] = GRID) -> list[dict]:
    """One `exponents` row per (init, c), inits outermost."""
    return [exponents(init, c) for init in inits for c in cs]


def _json_gamma(row: dict) -> dict:
    # JSON has no -inf; null means an exactly-zero quantity
    return {k: (None if isinstance(v, float) and v == NEG_INF else v) for k, v in row.items()}


def to_json(cs: tuple[float, ...] = GRID) -> dict:
    """Per init ("a", "b"): the maximal stable rate, the exponents there, and the table over cs.

    `max_stable_lr_exponent` is -c* (-0.5 for Init[A], -1.0 for Init[B]); a null exponent means the
    quantity is exactly zero.
    """
    out = {}
    for init in AT_INIT:
        c_star = max_stable_c(init)
        out[init] = {
            "max_stable_c": float(c_star),
            "max_stable_lr_exponent": float(-c_star),
            "at_max_stable": _json_gamma(exponents(init, c_star)),
            "table": [_json_gamma(row) for row in table((init,), cs)],
        }
    return out


def _num(v: float, spec: str = "g") -> str:
    return "-inf" if v == NEG_INF else format(v, spec)


def format_table(rows: list[dict] | None = None) -> str:
    """The rows of `table` (default: both inits over GRID) as aligned text; -inf is an exact zero."""
    rows = table() if rows is None else rows
    header = ("init", "c", "lr exp", "γ[Z_A]", "γ[Z_B]", "γ[δ¹]", "γ[δ²]", "γ[δ³]",
              "out-stable", "int-stable", "efficient")
    body = [(r["init"], _num(r["c"]), _num(r["lr_exponent"]), *(_num(r[q]) for q in QUANTITIES),
             *("yes" if r[v] else "no" for v in VERDICTS)) for r in rows]
    return _align([header, *body])


def _align(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


# --------------------------------------------------------------------------------------------
# The numerical check
# --------------------------------------------------------------------------------------------

# Adam's ε: it must stay far below the gradients' size at every width, or the update shrinks
# below η and Adam stops being scale-invariant. The loss is a mean over n coordinates, so the
# smallest gradients are Θ(1/n) (∇B = g Z_Aᵀ with g = (Z_B - y)/n); 1e-16 sits > 10 orders below
# that at n = 2^14 in float64; torch's default 1e-8 is only ~3 orders below there, and the gap
# shrinks as n grows.
ADAM_EPS = 1e-16


@contextmanager
def _one_thread():
    """Run torch on one intra-op thread inside the block, then restore the caller's setting.

    The sweep's tensors are small (at most seeds·r·n = 2e5 entries), so splitting an op across
    threads costs more than it saves; on 2 busy cores it made the default sweep 10-50x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """(S, m) -> (S,): root mean square over the coordinates."""
    return x.pow(2).mean(-1).sqrt()


def _simulate(init: str, optimizer: str, n: int, steps: int, seeds: int, rank: int,
              lr: float) -> dict[str, torch.Tensor]:
    """RMS of each quantity after each step: {quantity: (steps, seeds)}, all seeds at once."""
    A = torch.empty(seeds, rank, n, dtype=torch.float64)  # (S, r, n)
    B = torch.empty(seeds, n, rank, dtype=torch.float64)  # (S, n, r)
    z = torch.empty(seeds, n, 1, dtype=torch.float64)  # (S, n, 1): the fixed input, N(0, 1)
    y = torch.empty(seeds, n, dtype=torch.float64)  # (S, n): the fixed target, N(0, 1)
    for s in range(seeds):
        get_init(init)(A[s], B[s], "gaussian", rng.generator(s, "init"))
        data = rng.generator(s, "data")
        z[s].normal_(generator=data)
        y[s].normal_(generator=data)
    A.requires_grad_(True)
    B.requires_grad_(True)
    adam = torch.optim.Adam([A, B], lr=lr, betas=(0.9, 0.999), eps=ADAM_EPS) if optimizer == "adam" else None

    out = {q: torch.empty(steps, seeds, dtype=torch.float64) for q in QUANTITIES}
    for t in range(steps):
        A_old, B_old = A.detach().clone(), B.detach().clone()
        A.grad = B.grad = None
        # seeds are independent: the summed loss gives each seed's slice its own gradient
        loss = 0.5 * (torch.bmm(B, torch.bmm(A, z)).squeeze(-1) - y).pow(2).mean(-1).sum()
        loss.backward()
        with torch.no_grad():
            if adam is not None:
                adam.step()
            else:
                A -= lr * A.grad.sign()
                B -= lr * B.grad.sign()
            dA, dB = A - A_old, B - B_old  # this step's updates, (S, r, n) and (S, n, r)
            za = torch.bmm(A, z)  # (S, r, 1)
            dza = torch.bmm(dA, z)  # (S, r, 1)
            out["Z_A"][t] = _rms(za.squeeze(-1))
            out["Z_B"][t] = _rms(torch.bmm(B, za).squeeze(-1))
            out["delta1"][t] = _rms(torch.bmm(B_old, dza).squeeze(-1))
            out["delta2"][t] = _rms(torch.bmm(dB, torch.bmm(A_old, z)).squeeze(-1))
            out["delta3"][t] = _rms(torch.bmm(dB, dza).squeeze(-1))
    return out


def _slope(widths: tuple[int, ...], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(n); -inf if a value is exactly zero."""
    if min(values) <= 0:
        # e.g. SignSGD under Init[B] with steps=2: Z_A steps back onto exactly 0 at step 2
        return NEG_INF
    xs = [math.log(n) for n in widths]
    ys = [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _check_args(optimizer: str, widths: tuple[int, ...], steps: int, seeds: int, rank: int,
                lr_scale: float) -> None:
    if optimizer not in OPTIMIZERS:
        raise BadInput(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if len(set(widths)) < 2 or any(not isinstance(n, int) or n < 1 for n in widths):
        raise BadInput(f"widths must be at least two distinct positive integers; got {widths!r}")
    for name, value, least in (("steps", steps, 2), ("seeds", seeds, 1), ("rank", rank, 1)):
        if not isinstance(value, int) or value < least:
            raise BadInput(f"{name} must be an integer >= {least}; got {value!r}")
    if isinstance(lr_scale, bool) or not isinstance(lr_scale, numbers.Real) or not lr_scale > 0 \
            or not math.isfinite(lr_scale):
        raise BadInput(f"lr_scale must be a finite number > 0; got {lr_scale!r}")


def check(optimizer: str = "adam", widths: tuple[int, ...] = WIDTHS, steps: int = 10, seeds: int = 3,
          rank: int = 4, lr_scale: float = 1.0) -> dict:
    """Simulate both inits at their maximal stable rate η = lr_scale · n^-c*; compare slopes.

    Each quantity is summarised per width as its mean over the last half of the steps (the first
    steps are excluded: under Init[A] A cannot move before B has, see `derive`), then the geometric
    mean over seeds; its measured exponent is the least-squares slope of log(value) vs log(n).

    lr_scale = 1 is the natural unit: at c* the per-step feature change is then about E|z_j| = 0.8
    times the Θ(1) target (e.g. Init[B]: ΔZ_A ≈ η Σ_j |z_j| ≈ 0.8), neither negligible against the
    init nor a blow-up.

    Returns {"settings": {...}, "rows": per (init, width, seed, step, quantity) RMS values,
    "summary": per (init, width, quantity) values, "slopes": per (init, quantity) predicted and
    measured slopes}. Quantities predicted exactly zero (γ = -inf) get no slope row. Torch runs
    on one thread during the simulation (see `_one_thread`); the caller's setting is restored.
    """
    widths = tuple(widths)
    _check_args(optimizer, widths, steps, seeds, rank, lr_scale)
    settings = {"optimizer": optimizer, "widths": list(widths), "steps": steps, "seeds": seeds,
                "rank": rank, "lr_scale": float(lr_scale)}
    rows, summary, slopes = [], [], []
    last_half = slice(steps - steps // 2, steps)
    for init in AT_INIT:
        c_star = max_stable_c(init)
        predicted = exponents(init, c_star)
        per_quantity: dict[str, list[float]] = {q: [] for q in QUANTITIES}
        for n in widths:
            with _one_thread():
                traj = _simulate(init, optimizer, n, steps, seeds, rank, lr_scale * n ** -float(c_star))
            for q in QUANTITIES:
                for t in range(steps):
                    rows += [{"init": init, "width": n, "seed": s, "step": t + 1, "quantity": q,
                              "value": traj[q][t, s].item()} for s in range(seeds)]
                per_seed = traj[q][last_half].mean(0)  # (S,)
                value = per_seed.log().mean().exp().item()  # geometric mean over seeds
                per_quantity[q].append(value)
                summary.append({"init": init, "width": n, "quantity": q, "value": value})
        for q in QUANTITIES:
            if predicted[q] == NEG_INF:
                continue
            measured = _slope(widths, per_quantity[q])
            slopes.append({"init": init, "c": float(c_star), "lr_exponent": float(-c_star), "quantity": q,
                           "predicted": predicted[q], "measured": measured,
                           "diff": measured - predicted[q]})
    return {"settings": settings, "rows": rows, "summary": summary, "slopes": slopes}


def format_check(result: dict) -> str:
    """The slopes of a `check` result side by side, with a flag where they differ by > TOLERANCE."""
    s = result["settings"]
    widths = s["widths"]
    head = (f"optimizer {s['optimizer']}, widths {min(widths)}..{max(widths)} ({len(widths)}), "
            f"{s['steps']} steps, {s['seeds']} seeds, rank {s['rank']}, lr = {s['lr_scale']:g} * n^-c*")
    lines = [("init", "lr exp", "quantity", "predicted", "measured", "diff", "")]
    for r in result["slopes"]:
        flag = f"off by > {TOLERANCE:g}" if abs(r["diff"]) > TOLERANCE else ""
        lines.append((r["init"], _num(r["lr_exponent"]), r["quantity"], _num(r["predicted"]),
                      _num(r["measured"], ".3f"), _num(r["diff"], "+.3f"), flag))
    return head + "\n" + _align(lines)
