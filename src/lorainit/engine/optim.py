"""AdamW, gradient clipping, the linear LR schedule and fp16 loss scaling for a pack of K runs.

Every trainable tensor of a pack has the run index as its leading dim (K, ...), and slice [k] of
its gradient is run k's own gradient (the pack's loss is the sum of the runs' mean losses).
`PackedAdamW` does to each run's slices what HF Trainer does to one run -- `clip_grad_norm_` over
the run's parameters, `torch.optim.AdamW.step`, then a `get_linear_schedule_with_warmup` step --
with each run's own hyperparameters, vectorised over K. tests/test_optim.py checks it against
those references run by run.

One training step of a pack:

    losses = ...                                      # (K,) each run's mean loss
    scaler.scale_losses(losses).sum().backward()      # fp16 only; otherwise losses.sum()
    found_inf = scaler.unscale_(named_params)         # (K,) bool
    grad_norm = opt.step(active & ~found_inf)         # (K,) norms before clipping
    scaler.update(found_inf)
    opt.zero_grad()
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lorainit.errors import BadInput

HPARAMS = ("lr", "lr_b_ratio", "weight_decay", "max_grad_norm", "warmup_ratio")  # per-run, length K


def linear_schedule(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier at optimizer step `step` (0-based): 0 -> 1 over the warmup, then 1 -> 0 at the end.

    The formula of transformers' `_get_linear_schedule_with_warmup_lr_lambda`
    (transformers/optimization.py), which `get_linear_schedule_with_warmup` wraps in a LambdaLR."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup steps for a ratio of the total, rounded up as `TrainingArguments.get_warmup_steps` does."""
    if not 0.0 <= warmup_ratio < 1.0:
        # HF reads a value >= 1 as a number of steps, not a ratio; refuse the ambiguity.
        raise BadInput(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)


def _linear_schedule_k(step: Tensor, total_steps: int, warmup_steps: Tensor) -> Tensor:
    """`linear_schedule` for (K,) steps and warmups, in float64 so it equals the Python floats."""
    step, warmup = step.double(), warmup_steps.double()
    warm = step / warmup.clamp(min=1)
    decay = ((total_steps - step) / (total_steps - warmup).clamp(min=1)).clamp(min=0.0)
    return torch.where(step < warmup, warm, decay)


def _per_run(x: Tensor, like: Tensor) -> Tensor:
    """A (K,) tensor as (K, 1, ..., 1) in `like`'s dtype, to broadcast over a (K, ...) tensor."""
    return x.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _is_b(name: str) -> bool:
    """LoRA+ (Hayou et al. 2024) gives the B factors, and only them, lr * lr_b_ratio."""
    return name.rsplit(".", 1)[-1] == "lora_B"


class PackedAdamW:
    """Per-run AdamW + clip_grad_norm_ + linear warmup/decay over (K, ...) tensors.

    Equal, to float rounding, to running for each run k separately: `clip_grad_norm_(max_grad_norm[k])`
    (skipped when it is 0), then `torch.optim.AdamW` with two param groups (B factors at
    lr[k] * lr_b_ratio[k], everything else at lr[k]; weight_decay[k] on both), then a
    `get_linear_schedule_with_warmup` LambdaLR step. Betas and eps are shared by all runs.
    Every tensor is decayed, the head bias included (HF Trainer's default would exempt biases).

    A tensor whose `.grad` is None is skipped, as torch.optim skips it: no decay, no moment update,
    and its step count stays put; it also drops out of the clipping norm, as in `clip_grad_norm_`."""

    def __init__(self, named_params: dict[str, Tensor], lr: Sequence[float], lr_b_ratio: Sequence[float],
                 weight_decay: Sequence[float], max_grad_norm: Sequence[float], warmup_ratio: Sequence[float],
                 total_steps: int, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not named_params:
            raise BadInput("named_params is empty")
        self.params = dict(named_params)  # name -> (K, ...) trainable tensor
        first = next(iter(self.params.values()))
        self.K = first.shape[0]  # runs in the pack
        for name, p in self.params.items():
            if p.dim() == 0 or p.shape[0] != self.K:
                raise BadInput(f"{name}: leading dim must be K={self.K}, got shape {tuple(p.shape)}")
        values = dict(zip(HPARAMS, (lr, lr_b_ratio, weight_decay, max_grad_norm, warmup_ratio)))
        for key, v in values.items():
            if len(v) != self.K:
                raise BadInput(f"{key}: {len(v)} values for K={self.K} runs")
            if any(not math.isfinite(x) or x < 0 for x in v):
                raise BadInput(f"{key}: values must be finite and >= 0, got {list(v)}")
        if total_steps < 1:
            raise BadInput(f"total_steps must be >= 1, got {total_steps}")
        self.hparams = {k: [float(x) for x in v] for k, v in values.items()}  # per-run values, as given
        self.total_steps = int(total_steps)  # shared by every run: where the schedule reaches 0
        self.betas = (float(betas[0]), float(betas[1]))  # AdamW's (beta1, beta2), shared
        self.eps = float(eps)  # AdamW's eps, shared
        dev = first.device

        def f64(key: str) -> Tensor:
            return torch.tensor(self.hparams[key], dtype=torch.float64, device=dev)

        # Per-run hyperparameters as (K,) float64: products like lr * wd then round like Python floats.
        self.lr, self.weight_decay, self.max_grad_norm = f64("lr"), f64("weight_decay"), f64("max_grad_norm")
        # Base LR per tensor, as LambdaLR's base_lrs: lr * lr_b_ratio for B factors, lr otherwise.
        self.base_lr = {n: self.lr * f64("lr_b_ratio") if _is_b(n) else self.lr for n in self.params}
        self.warmup_steps = torch.tensor([warmup_steps_for(self.total_steps, r) for r in self.hparams["warmup_ratio"]],
                                         dtype=torch.int64, device=dev)  # (K,)
        # Optimizer steps each run has taken: LambdaLR's last_epoch (HF steps the scheduler
        # only after a step that was not skipped).
        self.sched_step = torch.zeros(self.K, dtype=torch.int64, device=dev)  # (K,)
        # AdamW state per tensor, as torch keeps it per parameter; "step" counts per run. (K,) / (K, ...)
        self.state = {n: {"step": torch.zeros(self.K, dtype=torch.int64, device=dev),
                          "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                      for n, p in self.params.items()}

    def current_lrs(self) -> Tensor:
        """(K,) float64: each run's LR for A factors and the head at its next step (B's is x lr_b_ratio)."""
        return self.lr * _linear_schedule_k(self.sched_step, self.total_steps, self.warmup_steps)

    @torch.no_grad()
    def step(self, active: Tensor | None = None) -> Tensor:
        """Clip each run's grads in place, apply AdamW, advance the schedule; return (K,) grad norms.

        The norms are taken before clipping, like `clip_grad_norm_`'s return value. Runs where
        `active` (K,) bool is False are not updated at all (params, moments, step counts and
        schedule keep their values, bit for bit) and, even with non-finite grads, cannot affect
        the others: every operation here works slice by slice, and inactive slices' results are dropped."""
        dev = self.lr.device
        live = torch.ones(self.K, dtype=torch.bool, device=dev) if active is None else active.to(dev, torch.bool)
        if live.shape != (self.K,):
            raise BadInput(f"active must have shape ({self.K},), got {tuple(live.shape)}")
        named = [(n, p) for n, p in self.params.items() if p.grad is not None]
        if not named:
            self.sched_step += live
            return torch.zeros(self.K, device=dev)
        grads = [p.grad for _, p in named]

        # clip_grad_norm_ (torch/nn/utils/clip_grad.py): the 2-norm of the per-tensor 2-norms, then
        # coef = max_norm / (norm + 1e-6) clamped to 1. `float / Tensor` is `reciprocal() * float`
        # in torch, so it is written that way here to round the same.
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(self.K, -1), 2, dim=1) for g in grads])  # (n, K)
        total_norm = torch.linalg.vector_norm(norms, 2, dim=0)  # (K,)
        coef = ((total_norm + 1e-6).reciprocal() * self.max_grad_norm.to(total_norm.dtype)).clamp(max=1.0)
        coef = torch.where(self.max_grad_norm > 0, coef, torch.ones_like(coef))  # HF: max_grad_norm 0 = no clip
        for g in grads:
            g.mul_(_per_run(coef, g))

        # AdamW as torch's _single_tensor_adam with decoupled_weight_decay (torch/optim/adam.py).
        b1, b2 = self.betas
        mult = _linear_schedule_k(self.sched_step, self.total_steps, self.warmup_steps)  # (K,)
        for (name, p), g in zip(named, grads):
            st = self.state[name]
            lr = self.base_lr[name] * mult  # (K,) float64, base_lr * lambda(step) as LambdaLR
            step = st["step"] + live  # (K,) this update's 1-based count for live runs
            t = step.clamp(min=1).double()  # clamp: a dead run's t=0 would give 0/0, discarded anyway
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            decay = _per_run(1 - lr * self.weight_decay, p)  # decoupled: p *= 1 - lr * wd, before moments
            exp_avg = st["exp_avg"].lerp(g, 1 - b1)
            exp_avg_sq = (st["exp_avg_sq"] * b2).addcmul_(g, g, value=1 - b2)
            denom = exp_avg_sq.sqrt() / _per_run(bc2.sqrt(), p) + self.eps  # sqrt(v)/sqrt(bc2) + eps
            # addcdiv_(m, denom, value=-lr/bc1) computes p + (value * m) / denom; same order here.
            new_p = p * decay + _per_run(-(lr / bc1), p) * exp_avg / denom
            mask = live.view(-1, *([1] * (p.dim() - 1)))  # (K, 1, ..., 1) bool
            p.copy_(torch.where(mask, new_p, p))
            st["exp_avg"].copy_(torch.where(mask, exp_avg, st["exp_avg"]))
            st["exp_avg_sq"].copy_(torch.where(mask, exp_avg_sq, st["exp_avg_sq"]))
            st["step"] = step
        self.sched_step += live
        return total_norm

    def zero_grad(self) -> None:
        """Drop every grad (set to None, as torch's default `set_to_none=True`)."""
        for p in self.params.values():
            p.grad = None

    def state_dict(self) -> dict:
        """Everything an exact resume needs: moments, per-run step counts, schedule position, hparams."""
        return {"hparams": {k: list(v) for k, v in self.hparams.items()}, "total_steps": self.total_steps,
                "betas": list(self.betas), "eps": self.eps, "sched_step": self.sched_step.clone(),
                "state": {n: {k: v.clone() for k, v in s.items()} for n, s in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output; the hyperparameters and tensor names must match this optimizer's."""
        mine = self.state_dict()
        for key in ("hparams", "total_steps", "betas", "eps"):
            if state[key] != mine[key]:
                raise BadInput(f"state_dict {key} {state[key]} differs from this optimizer's {mine[key]}")
        if set(state["state"]) != set(self.state):
            raise BadInput(f"state_dict tensors {sorted(state['state'])} differ from {sorted(self.state)}")
        self.sched_step.copy_(state["sched_step"])
        for n, s in self.state.items():
            for k, v in s.items():
                v.copy_(state["state"][n][k])


class PackedGradScaler:
    """fp16 loss scaling kept per run, so one run's overflow never skips another run's step.

    Each run k follows `torch.amp.GradScaler` (defaults: init 2**16, growth x2 after 2000 clean
    steps, backoff x0.5 on inf/nan) on its own (K,) slot of `scale` and `growth_tracker`."""

    def __init__(self, K: int, device: torch.device | str = "cpu", init_scale: float = 2.0**16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale = torch.full((K,), init_scale, dtype=torch.float32, device=device)  # (K,) loss multiplier
        self.growth_tracker = torch.zeros(K, dtype=torch.int32, device=device)  # (K,) clean steps in a row
        self.growth_factor = growth_factor  # scale *= this after growth_interval clean steps
        self.backoff_factor = backoff_factor  # scale *= this after a step with inf/nan grads
        self.growth_interval = growth_interval  # clean steps before the scale grows

    def scale_losses(self, per_run_loss: Tensor) -> Tensor:
        """(K,) losses times each run's scale; backward of their sum scales each run's grad slices."""
        if per_run_loss.shape != self.scale.shape:
            raise BadInput(f"per_run_loss must have shape {tuple(self.scale.shape)}, got {tuple(per_run_loss.shape)}")
        return per_run_loss * self.scale

    @torch.no_grad()
    def unscale_(self, named_params: dict[str, Tensor]) -> Tensor:
        """Divide each run's grad slices by its scale in place; return (K,) bool: run has inf/nan grads."""
        # As GradScaler.unscale_: the reciprocal in float64, since fp32 division can be imprecise.
        inv_scale = self.scale.double().reciprocal().float()  # (K,)
        found_inf = torch.zeros_like(self.scale, dtype=torch.bool)
        for p in named_params.values():
            if p.grad is not None:
                found_inf |= ~torch.isfinite(p.grad.reshape(len(self.scale), -1)).all(dim=1)
                p.grad.mul_(inv_scale.view(-1, *([1] * (p.grad.dim() - 1))))
        return found_inf

    def update(self, found_inf: Tensor, active: Tensor | None = None) -> None:
        """Back off the runs that overflowed; grow those with growth_interval clean steps in a row.

        torch's `_amp_update_scale_` per run; runs where `active` is False keep their state."""
        tracker = torch.where(found_inf, 0, self.growth_tracker + 1)
        grown = self.scale * self.growth_factor
        # torch never grows a scale to inf: it keeps the old one (but still resets the tracker).
        grow = ~found_inf & (tracker == self.growth_interval)
        scale = torch.where(found_inf, self.scale * self.backoff_factor,
                            torch.where(grow & torch.isfinite(grown), grown, self.scale))
        tracker = torch.where(grow, 0, tracker).to(self.growth_tracker.dtype)
        keep = torch.zeros_like(found_inf) if active is None else ~active.to(torch.bool)
        self.scale = torch.where(keep, self.scale, scale)
        self.growth_tracker = torch.where(keep, self.growth_tracker, tracker)

    def state_dict(self) -> dict:
        """Per-run scale and growth tracker, for an exact resume."""
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output."""
        self.scale = state["scale"].clone().to(self.scale.device)
        self.growth_tracker = state["growth_tracker"].clone().to(self.growth_tracker.device)
