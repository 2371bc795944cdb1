"""The teacher-student toy of the paper's §3, vectorised over its whole (init, lr, seed) grid.

Model, for an input x in R^d and width n (one LoRA-adapted n x n layer):

    f(x) = phi((W + s B A) phi(W_in x)),   phi = ReLU,  s = 1,
    W_in ~ N(0, 1/d) (n, d),  W ~ N(0, 1/n) (n, n),  A (r, n),  B (n, r).

The read-out is the identity: f(x) is the vector phi(h) in R^n and the loss is the squared error
averaged over the n output coordinates and the data points. This is the design choice that makes
the toy match the theory's assumptions (paper §3, LoRA+ §4): the LoRA features Z_B = s B A z
enter the loss with Theta(1) sensitivity to aligned Theta(1) changes. A scalar read-out
w ~ N(0, 1/n) instead turns a Theta(1) aligned change of the features into a sqrt(n) change of the
output (Adam's update of B aligns with w), which moves the optimal rates away from the features'
own stability limits. A muP-style read-out (w/n) would also fit; the vector output needs no extra
scale and gives the teacher a natural size.

Teacher: the same network with W + Delta W*, Delta W* = U V^T of rank `teacher_rank`, scaled so
that the teacher's output differs from the base's by an RMS of exactly 1 on the training points.
Only A and B train, with Adam on batches of `batch_size` points at one learning rate, from Init[A] or Init[B] with the
theory's `gaussian` variances (A ~ N(0, 1/n) or B ~ N(0, 1/r)).

Vectorised: for one width, all (seed, init, lr) configurations are one stack of tensors, with
closed-form gradients and one Adam over the stack. The frozen part (phi(W_in x) and W phi(W_in x))
depends on neither the configuration nor the step, so it is computed once per seed and width for
all training points, and each step gathers its batch's columns.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from lorainit.engine import rng
from lorainit.engine.inits import get_init
from lorainit.errors import BadInput

PRESETS = {
    # a few minutes on 2 CPU cores
    "default": {},
    # the paper's range of widths, full batch: meant for a GPU
    "paper": {"widths": tuple(2 ** k for k in range(6, 14)), "batch_size": 1000,
              "lrs": tuple(2.0 ** (k / 2) for k in range(-32, 1))},
}


def lr_grid(low_exp2: float, high_exp2: float) -> tuple[float, ...]:
    """Half-octave grid 2^low .. 2^high."""
    steps = int(round((high_exp2 - low_exp2) * 2))
    return tuple(2.0 ** (low_exp2 + i / 2) for i in range(steps + 1))


@dataclass(frozen=True)
class ToyConfig:
    # hidden widths n: 256 and up, where the width exponents show (at 64-512 Init[B]'s stability
    # edge falls more slowly than n^-1: the small-width regime, docs/theory-and-toy.md)
    widths: tuple[int, ...] = (256, 512, 1024, 2048)
    lrs: tuple[float, ...] = field(default_factory=lambda: lr_grid(-12, 0))  # Adam learning rates, held
                                 # ascending without duplicates, whatever order they are given in
    seeds: int = 5               # seeds 0..seeds-1: each its own data, base, teacher and LoRA init
    steps: int = 500             # Adam steps
    batch_size: int = 100        # training points per step (>= n_train: full batch); all configs
                                 # of a seed see the same batches (common random numbers)
    rank: int = 4                # LoRA rank r
    inits: tuple[str, ...] = ("a", "b")
    input_dim: int = 5           # d
    n_train: int = 1000          # N training points
    n_test: int = 100            # test points
    teacher_rank: int = 2        # rank of the teacher's perturbation (<= rank: learnable)
    divergence_factor: float = 1e3  # diverged: loss non-finite or above this x the initial loss
    stable_factor: float = 10.0  # stable: never diverged and peak RMS(Z_B) <= this x the teacher's
    device: str = "cpu"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        # The grid is read in order: the largest stable lr is the last before the first unstable
        # one, and the optimum is refined between neighbours. A grid typed from the top down
        # (2^-3,...,2^-8) would read its first, unstable lr as the bottom, so it is sorted here.
        try:
            lrs = tuple(sorted(set(self.lrs)))
        except TypeError:
            raise BadInput(f"--lrs must be positive numbers, got {list(self.lrs)}") from None
        object.__setattr__(self, "lrs", lrs)

    def validate(self) -> None:
        """Raise BadInput naming the first impossible option."""
        if not self.widths:
            raise BadInput("--widths is empty: give at least one width, e.g. 64,128,256")
        if any(int(w) != w or w <= 0 for w in self.widths):
            raise BadInput(f"--widths must be positive integers, got {list(self.widths)}")
        if not self.lrs:
            raise BadInput("--lrs is empty: give at least one learning rate")
        if any(not math.isfinite(lr) or lr <= 0 for lr in self.lrs):
            raise BadInput(f"--lrs must be positive numbers, got {list(self.lrs)}")
        for name in ("seeds", "steps", "rank", "batch_size", "input_dim", "n_train", "n_test", "teacher_rank"):
            if getattr(self, name) < 1:
                raise BadInput(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.inits:
            raise BadInput("no inits given: use a, b or both")
        for init in self.inits:
            get_init(init)  # raises BadInput naming the allowed inits
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise BadInput(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class Problem:
    """One seed's data, frozen network and teacher at one width (features-major layout)."""

    z: torch.Tensor        # (n, N) phi(W_in x): the LoRA layer's input
    h: torch.Tensor        # (n, N) W z: the frozen pre-activation
    y: torch.Tensor        # (n, N) the teacher's outputs
    z_test: torch.Tensor   # (n, Nt)
    h_test: torch.Tensor
    y_test: torch.Tensor
    teacher_zb_rms: float  # RMS of the teacher's own Delta W* z: the feature size to learn


def make_problem(width: int, seed: int, cfg: ToyConfig) -> Problem:
    """Draw data, base network and teacher for (width, seed); the data depend on the seed only."""
    n, d = width, cfg.input_dim
    g_data = rng.generator(seed, "data")
    x = torch.randn(cfg.n_train + cfg.n_test, d, generator=g_data, dtype=torch.float64)
    g = rng.generator(seed, "base", width)
    w_in = torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    w = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    u = torch.randn(n, cfg.teacher_rank, generator=g, dtype=torch.float64)
    v = torch.randn(n, cfg.teacher_rank, generator=g, dtype=torch.float64) / math.sqrt(n)
    z = torch.relu(w_in @ x.T)  # (n, N + Nt)
    h = w @ z
    dz = u @ (v.T @ z)  # Delta W* z before scaling, (n, N + Nt)
    tr = slice(0, cfg.n_train)

    def out_rms(c: float) -> float:
        return (torch.relu(h[:, tr] + c * dz[:, tr]) - torch.relu(h[:, tr])).pow(2).mean().sqrt().item()

    lo, hi = 0.0, 1.0
    while out_rms(hi) < 1.0:
        hi *= 2
    for _ in range(60):  # bisection: the teacher's output moves by RMS 1 exactly
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if out_rms(mid) < 1.0 else (lo, mid)
    c = (lo + hi) / 2
    y = torch.relu(h + c * dz)
    te = slice(cfg.n_train, None)
    f32 = lambda t: t.to(torch.float32).contiguous().to(cfg.device)  # noqa: E731
    return Problem(f32(z[:, tr]), f32(h[:, tr]), f32(y[:, tr]), f32(z[:, te]), f32(h[:, te]), f32(y[:, te]),
                   (c * dz[:, tr]).pow(2).mean().sqrt().item())


def batch_plan(seed: int, cfg: ToyConfig) -> torch.Tensor | None:
    """Row indices (steps, b) of each step's batch: epochs of a seeded shuffle; None = full batch."""
    if cfg.batch_size >= cfg.n_train:
        return None
    g = rng.generator(seed, "data", 1)
    epochs = -(-cfg.steps * cfg.batch_size // cfg.n_train)
    order = torch.cat([torch.randperm(cfg.n_train, generator=g) for _ in range(epochs)])
    return order[:cfg.steps * cfg.batch_size].view(cfg.steps, cfg.batch_size)


def _init_factors(width: int, cfg: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A (S, I, r, n) and B (S, I, n, r) at init, one draw per (seed, init) from the seed's stream."""
    S, I, r = cfg.seeds, len(cfg.inits), cfg.rank
    A = torch.zeros(S, I, r, width)
    B = torch.zeros(S, I, width, r)
    for s in range(S):
        for i, init in enumerate(cfg.inits):
            get_init(init)(A[s, i], B[s, i], "gaussian", rng.generator(s, "init"))
    return A, B


class _Workspace:
    """Two reused (S, M, n, N) buffers: allocating them afresh each step costs more than the math."""

    def __init__(self):
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, shape: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
        if shape not in self.buffers:
            self.buffers[shape] = (torch.empty(shape, device=device), torch.empty(shape, device=device))
        return self.buffers[shape]


def _forward(A, B, z, h, y, need_grad: bool, work: _Workspace | None = None):
    """Loss per config, feature RMS, and (optionally) closed-form gradients.

    A (S, M, r, n), B (S, M, n, r); z, h, y (S, n, N). Returns loss (S, M), rms_za, rms_zb (S, M),
    and grads of A and B (None when need_grad is False). Every (S, M, n, N) step is in place:
    these passes over memory are the cost of the whole toy.
    """
    S, M, r, n = A.shape
    N = z.shape[-1]
    p, q = (work or _Workspace()).get((S, M, n, N), A.device)
    za = (A.reshape(S, M * r, n) @ z).reshape(S, M, r, N)  # (S, M, r, N): Z_A = A z
    torch.matmul(B, za, out=p)                              # (S, M, n, N): Z_B = s B Z_A, s = 1
    rms_za = za.pow(2).mean((-2, -1)).sqrt()
    rms_zb = torch.linalg.vector_norm(p, dim=(-2, -1)) / math.sqrt(n * N)
    p += h.unsqueeze(1)                                     # pre-activation h + Z_B
    torch.clamp(p, min=0, out=q).sub_(y.unsqueeze(1))      # residual phi(h + Z_B) - y
    loss = torch.linalg.vector_norm(q, dim=(-2, -1)).pow(2) / (n * N)
    if not need_grad:
        return loss, rms_za, rms_zb, None, None
    q.mul_(p.gt_(0))             # times phi'(pre) as 0/1 floats (a bool mask is 10x slower here)
    scale = 2.0 / (n * N)        # dL/dpre = scale * q
    g_b = (q @ za.transpose(-1, -2)) * scale                 # (S, M, n, r)
    g_za = B.transpose(-1, -2) @ q                           # (S, M, r, N)
    g_a = (g_za.reshape(S, M * r, N) @ z.transpose(-1, -2)).reshape(S, M, r, n) * scale
    return loss, rms_za, rms_zb, g_a, g_b


@dataclass
class WidthResult:
    width: int
    train_loss: torch.Tensor   # (S, I, L): mean batch loss over the last 10% of steps (inf if diverged)
    test_loss: torch.Tensor    # (S, I, L)
    diverged_step: torch.Tensor  # (S, I, L): step of divergence, -1 if none
    z_a_rms: torch.Tensor      # (S, I, L) at the end
    z_b_rms: torch.Tensor      # (S, I, L) at the end
    z_b_peak: torch.Tensor     # (S, I, L) largest RMS of Z_B over training
    teacher_zb_rms: torch.Tensor  # (S,)
    trace_za: torch.Tensor     # (steps, S, I, L) RMS of Z_A per step
    trace_zb: torch.Tensor     # (steps, S, I, L)
    losses: torch.Tensor       # (steps, S, I, L) training loss per step


def train_width(width: int, cfg: ToyConfig, progress=None, problems: list[Problem] | None = None,
                lrs: torch.Tensor | None = None) -> WidthResult:
    """Train every (seed, init, lr) configuration at one width together.

    `problems` (one per seed) may be passed in when they are already built. `lrs` (S, I, L), if
    given, replaces the grid: each (seed, init) trains at its own L learning rates (a bisection's
    midpoints); the grid's results are then indexed by slot, not by `cfg.lrs`.
    """
    S, I = cfg.seeds, len(cfg.inits)
    L = len(cfg.lrs) if lrs is None else lrs.shape[2]
    M = I * L
    probs = problems if problems is not None else [make_problem(width, s, cfg) for s in range(S)]
    stack = lambda name: torch.stack([getattr(p, name) for p in probs])  # noqa: E731
    z, h, y = stack("z"), stack("h"), stack("y")
    zt, ht, yt = stack("z_test"), stack("h_test"), stack("y_test")
    A0, B0 = _init_factors(width, cfg)
    # (S, I, ...) -> (S, I*L, ...): every lr of an (init, seed) starts from the same draw
    A = A0.unsqueeze(2).expand(-1, -1, L, -1, -1).reshape(S, M, cfg.rank, width).clone().to(cfg.device)
    B = B0.unsqueeze(2).expand(-1, -1, L, -1, -1).reshape(S, M, width, cfg.rank).clone().to(cfg.device)
    if lrs is None:
        lr = torch.tensor(cfg.lrs, dtype=torch.float32, device=cfg.device).repeat(I).view(1, M, 1, 1)
    else:
        lr = lrs.to(device=cfg.device, dtype=torch.float32).reshape(S, M, 1, 1)
    alive = torch.ones(S, M, dtype=torch.bool, device=cfg.device)
    mA, vA, mB, vB = (torch.zeros_like(t) for t in (A, A, B, B))
    b1, b2 = cfg.betas
    tail = max(1, cfg.steps // 10)
    plans = [batch_plan(s, cfg) for s in range(S)]
    plan = None if plans[0] is None else torch.stack(plans).to(cfg.device)  # (S, steps, b)
    losses, tr_za, tr_zb, test_tail = [], [], [], []
    diverged_step = torch.full((S, M), -1, dtype=torch.long, device=cfg.device)
    loss0 = None
    work = _Workspace()
    for step in range(1, cfg.steps + 1):
        if plan is None:
            zb, hb, yb = z, h, y
        else:
            idx = plan[:, step - 1].unsqueeze(1).expand(-1, width, -1)  # (S, n, b)
            zb, hb, yb = (torch.take_along_dim(t, idx, dim=2) for t in (z, h, y))
        loss, rza, rzb, gA, gB = _forward(A, B, zb, hb, yb, need_grad=True, work=work)
        if loss0 is None:
            loss0 = loss.clone()
        bad = alive & (~torch.isfinite(loss) | (loss > cfg.divergence_factor * loss0))
        if bad.any():
            diverged_step[bad] = step
            alive &= ~bad
            for t in (A, B, mA, vA, mB, vB, gA, gB):
                t[bad] = 0.0  # a diverged config stops: zero factors, zero updates from now on
        losses.append(torch.where(alive, loss, torch.inf))
        tr_za.append(torch.where(alive, rza, torch.nan))
        tr_zb.append(torch.where(alive, rzb, torch.nan))
        if step > cfg.steps - tail:
            tl = _forward(A, B, zt, ht, yt, need_grad=False, work=work)[0]
            test_tail.append(torch.where(alive, tl, torch.inf))
        # Adam, elementwise over the whole stack, one lr per configuration
        c1, c2 = 1 - b1 ** step, 1 - b2 ** step
        for p, g, m, v in ((A, gA, mA, vA), (B, gB, mB, vB)):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + cfg.eps))
        if progress is not None:
            progress(1)
    # the features at the end (after the last update)
    _, rza, rzb, _, _ = _forward(A, B, z, h, y, need_grad=False)
    losses_t, zb_trace = torch.stack(losses), torch.stack(tr_zb)
    grid = lambda t: t.to("cpu").reshape(S, I, L)  # noqa: E731
    trace = lambda t: t.to("cpu").reshape(cfg.steps, S, I, L)  # noqa: E731
    return WidthResult(
        width=width,
        train_loss=grid(losses_t[-tail:].mean(0)),
        test_loss=grid(torch.stack(test_tail).mean(0)),
        diverged_step=grid(diverged_step),
        z_a_rms=grid(torch.where(alive, rza, torch.nan)),
        z_b_rms=grid(torch.where(alive, rzb, torch.nan)),
        z_b_peak=grid(torch.where(alive, torch.nan_to_num(zb_trace, nan=-1.0).amax(0), torch.inf)),
        teacher_zb_rms=torch.tensor([p.teacher_zb_rms for p in probs]),
        trace_za=trace(torch.stack(tr_za)),
        trace_zb=trace(zb_trace),
        losses=trace(losses_t),
    )


def train_one(width: int, cfg: ToyConfig, seed: int, init: str, lr: float,
              problem: Problem | None = None) -> torch.Tensor:
    """Reference: one configuration with autograd and `torch.optim.Adam`; per-step losses (steps,)."""
    p = problem if problem is not None else make_problem(width, seed, cfg)
    plan = batch_plan(seed, cfg)
    A = torch.zeros(cfg.rank, width)
    B = torch.zeros(width, cfg.rank)
    get_init(init)(A, B, "gaussian", rng.generator(seed, "init"))
    A, B = A.to(cfg.device).requires_grad_(), B.to(cfg.device).requires_grad_()
    opt = torch.optim.Adam([A, B], lr=lr, betas=cfg.betas, eps=cfg.eps)
    losses, loss0 = [], None
    for step in range(cfg.steps):
        cols = slice(None) if plan is None else plan[step].to(cfg.device)
        z, h, y = p.z[:, cols], p.h[:, cols], p.y[:, cols]
        loss = (torch.relu(h + B @ (A @ z)) - y).pow(2).mean()
        value = loss.item()
        loss0 = value if loss0 is None else loss0
        if not math.isfinite(value) or value > cfg.divergence_factor * loss0:
            losses.append(math.inf)
            break
        losses.append(value)
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses += [math.inf] * (cfg.steps - len(losses))
    return torch.tensor(losses)
