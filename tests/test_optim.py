"""PackedAdamW and PackedGradScaler equal torch's AdamW, clip_grad_norm_, GradScaler and HF's schedule, run by run."""

import io
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments, get_linear_schedule_with_warmup

from lorainit.engine.optim import PackedAdamW, PackedGradScaler, linear_schedule, warmup_steps_for
from lorainit.errors import BadInput

# Stand-ins for a pack's trainable tensors, per run (the pack adds a leading K).
SHAPES = {"layer.lora_A": (4, 6), "layer.lora_B": (5, 4), "classifier.weight": (3, 6), "classifier.bias": (3,)}
TOTAL = 20
# Three runs that differ in every per-run hyperparameter; run 1's max_grad_norm clips at every step,
# run 2's 0 means no clipping, and runs 1 and 2 start at lr 0 (warmup).
HP = {"lr": [1e-3, 5e-3, 2e-2], "lr_b_ratio": [1.0, 4.0, 16.0], "weight_decay": [0.0, 0.01, 0.1],
      "max_grad_norm": [1.0, 0.05, 0.0], "warmup_ratio": [0.0, 0.1, 0.3]}


def _params(runs=(0, 1, 2)):
    """Seeded (K, ...) leaf tensors; `runs` picks slices of the same 3-run draw, for smaller packs."""
    g = torch.Generator().manual_seed(0)
    full = {n: torch.randn((3, *s), generator=g) for n, s in SHAPES.items()}
    return {n: t[list(runs)].clone().requires_grad_() for n, t in full.items()}


def _grads(step, runs=(0, 1, 2)):
    """Seeded (K, ...) gradients for a step; odd steps are small, so run 0 (max norm 1) is clipped only sometimes."""
    g = torch.Generator().manual_seed(1000 + step)
    scale = 0.05 if step % 2 else 1.0
    return {n: scale * torch.randn((3, *s), generator=g)[list(runs)] for n, s in SHAPES.items()}


def _hp(runs=(0, 1, 2)):
    return {k: [v[i] for i in runs] for k, v in HP.items()}


def _pack(params, runs=(0, 1, 2)):
    return PackedAdamW(params, **_hp(runs), total_steps=TOTAL)


def _set_grads(params, grads):
    for n, p in params.items():
        p.grad = grads[n].clone()


class _Reference:
    """Run k alone, as HF Trainer runs it: clip_grad_norm_, AdamW with an A/head group and a B group, LambdaLR."""

    def __init__(self, k, lr_b_ratio=None):
        self.p = {n: t[k].detach().clone().requires_grad_() for n, t in _params().items()}
        lr, ratio = HP["lr"][k], HP["lr_b_ratio"][k] if lr_b_ratio is None else lr_b_ratio
        b = [p for n, p in self.p.items() if n.endswith(".lora_B")]
        rest = [p for n, p in self.p.items() if not n.endswith(".lora_B")]
        self.opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": b, "lr": lr * ratio}],
                                     lr=lr, weight_decay=HP["weight_decay"][k], betas=(0.9, 0.999), eps=1e-8)
        warmup = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=HP["warmup_ratio"][k]), TOTAL)
        self.sched = get_linear_schedule_with_warmup(self.opt, warmup, TOTAL)
        self.max_norm = HP["max_grad_norm"][k]

    def clip(self):
        params = list(self.p.values())
        if self.max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])  # HF logs the norm unclipped

    def step(self, grads_k):
        for n, p in self.p.items():
            p.grad = grads_k[n].clone()
        norm = self.clip()
        self.opt.step()
        self.sched.step()
        return norm


def test_schedule_equals_transformers_linear_schedule_with_warmup():
    for total, warmup in [(20, 0), (20, 2), (20, 6), (7, 7), (10, 3), (1, 0)]:
        sgd = torch.optim.SGD([torch.zeros(1)], lr=1.0)
        sched = get_linear_schedule_with_warmup(sgd, warmup, total)
        for step in range(total + 3):
            assert linear_schedule(step, total, warmup) == sched.get_last_lr()[0], (total, warmup, step)
            sgd.step()
            sched.step()


def test_warmup_steps_round_up_as_training_arguments():
    for total in (1, 7, 20, 1000):
        for ratio in (0.0, 0.05, 0.1, 0.3, 0.999):
            hf = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)
            assert warmup_steps_for(total, ratio) == hf, (total, ratio)
    with pytest.raises(BadInput, match="warmup_ratio"):
        warmup_steps_for(20, 1.5)


def test_pack_equals_torch_adamw_clip_and_schedule_per_run():
    params = _params()
    opt = _pack(params)
    refs = [_Reference(k) for k in range(3)]
    run0_clipped = []
    for step in range(TOTAL):
        for k, ref in enumerate(refs):
            assert opt.current_lrs()[k].item() == ref.sched.get_last_lr()[0], (step, k)
        grads = _grads(step)
        _set_grads(params, grads)
        norms = opt.step()
        ref_norms = torch.stack([ref.step({n: g[k] for n, g in grads.items()}) for k, ref in enumerate(refs)])
        torch.testing.assert_close(norms, ref_norms, rtol=1e-6, atol=0)
        assert norms[1] > 0.05  # run 1 really is clipped at every step
        run0_clipped.append(norms[0].item() > 1.0)
        for k, ref in enumerate(refs):
            for n, p in params.items():
                torch.testing.assert_close(p[k], ref.p[n], rtol=0, atol=1e-6, msg=f"step {step} run {k} {n}")
                # Adam all but ignores a uniform gradient scale, so check the clipped grads themselves.
                torch.testing.assert_close(p.grad[k], ref.p[n].grad, rtol=1e-6, atol=0, msg=f"grad {step} {k} {n}")
    assert any(run0_clipped) and not all(run0_clipped)  # run 0 is clipped on some steps only
    assert not torch.equal(params["layer.lora_A"][2], _params()["layer.lora_A"][2])


def test_lr_b_ratio_reaches_only_b():
    """A wrong ratio must show: run 2 (ratio 16) differs from a reference with ratio 1 on B only."""
    params = _params()
    opt = _pack(params)
    ref = _Reference(2, lr_b_ratio=1.0)
    for step in range(5):
        grads = _grads(step)
        _set_grads(params, grads)
        opt.step()
        ref.step({n: g[2] for n, g in grads.items()})
    torch.testing.assert_close(params["layer.lora_A"][2], ref.p["layer.lora_A"], rtol=0, atol=1e-6)
    assert (params["layer.lora_B"][2] - ref.p["layer.lora_B"]).abs().max() > 1e-3


def test_inactive_run_is_untouched_and_does_not_affect_others(measured):
    params, small = _params(), _params(runs=(0, 2))
    opt, opt_small = _pack(params), _pack(small, runs=(0, 2))
    for step in range(10):
        if step == 4:  # run 1 diverges here: snapshot it
            frozen = {n: p[1].clone() for n, p in params.items()}
            frozen_state = {n: {k: v[1].clone() for k, v in s.items()} for n, s in opt.state.items()}
        grads = _grads(step)
        if step >= 4:
            grads["layer.lora_B"][1] = float("nan")  # a diverged run's grads must not leak
        _set_grads(params, grads)
        opt.step(active=torch.tensor([True, step < 4, True]))
        _set_grads(small, _grads(step, runs=(0, 2)))
        opt_small.step()
    for n, p in params.items():
        assert torch.equal(p[1], frozen[n]), n
        for k, v in opt.state[n].items():
            assert torch.equal(v[1], frozen_state[n][k]), (n, k)
        # runs 0 and 2 of a 3-run pack against a 2-run pack: the same per-run arithmetic on tensors
        # of another shape, whose per-run norms (reductions) may be vectorised otherwise: ten
        # Adam steps of fp32 rounding (eps 1.2e-7)
        assert measured("pack_of_2_params", p[[0, 2]], small[n]) <= 1e-6, n
        assert measured("pack_of_2_state", opt.state[n]["exp_avg_sq"][[0, 2]], opt_small.state[n]["exp_avg_sq"]) <= 1e-6, n
    assert opt.state["layer.lora_A"]["step"].tolist() == [10, 4, 10]
    assert opt.sched_step.tolist() == [10, 4, 10]


def test_state_dict_round_trip_resumes_bit_for_bit():
    def active(step):  # run 0 sits out two steps, so per-run step counts differ
        return torch.tensor([step not in (3, 4), True, True])

    straight = _params()
    opt = _pack(straight)
    for step in range(20):
        _set_grads(straight, _grads(step))
        opt.step(active(step))

    first = _params()
    opt_first = _pack(first)
    for step in range(10):
        _set_grads(first, _grads(step))
        opt_first.step(active(step))
    buf = io.BytesIO()
    torch.save(opt_first.state_dict(), buf)
    resumed = {n: p.detach().clone().requires_grad_() for n, p in first.items()}
    opt_resumed = _pack(resumed)
    opt_resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for step in range(10, 20):
        _set_grads(resumed, _grads(step))
        opt_resumed.step(active(step))

    for n in straight:
        assert torch.equal(resumed[n], straight[n]), n
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_resumed.state[n][k], opt.state[n][k]), (n, k)
    assert torch.equal(opt_resumed.sched_step, opt.sched_step)
    assert opt.state["layer.lora_A"]["step"].tolist() == [18, 20, 20]


def test_load_state_dict_refuses_other_hyperparameters():
    state = _pack(_params()).state_dict()
    other = PackedAdamW(_params(), **{**HP, "lr": [1e-3, 5e-3, 3e-2]}, total_steps=TOTAL)
    with pytest.raises(BadInput, match="hparams"):
        other.load_state_dict(state)


def test_bad_hyperparameters_name_the_key():
    with pytest.raises(BadInput, match="weight_decay: 2 values for K=3"):
        PackedAdamW(_params(), **{**HP, "weight_decay": [0.0, 0.1]}, total_steps=TOTAL)


def _run_losses(params, coeffs):
    """(K,) per-run losses, linear in the params, so each run's grad slices are exactly `coeffs`."""
    return sum((p * coeffs[n]).reshape(p.shape[0], -1).sum(1) for n, p in params.items())


def _scaler_coeffs(step, inf):
    c = _grads(step)
    if inf and step == 2:
        c["layer.lora_B"][1, 0, 0] = float("inf")  # run 1 overflows at step 2
    return c


def _train_scaled_pack(inf, steps=8):
    params = _params()
    opt, scaler = _pack(params), PackedGradScaler(3, growth_interval=3)
    history = []
    for step in range(steps):
        before = {n: p.detach().clone() for n, p in params.items()}
        scaler.scale_losses(_run_losses(params, _scaler_coeffs(step, inf))).sum().backward()
        found_inf = scaler.unscale_(params)
        opt.step(~found_inf)
        scaler.update(found_inf)
        grads = {n: p.grad.clone() for n, p in params.items()}  # unscaled, then clipped
        opt.zero_grad()
        history.append((before, {n: p.detach().clone() for n, p in params.items()}, found_inf, scaler.scale.clone(),
                        grads))
    return history


def test_grad_scaler_skips_only_the_overflowing_run():
    with_inf, clean = _train_scaled_pack(inf=True), _train_scaled_pack(inf=False)
    before, after, found_inf, scale, _ = with_inf[2]
    assert found_inf.tolist() == [False, True, False]
    assert scale.tolist() == [2.0**17, 2.0**15, 2.0**17]  # runs 0 and 2 grew after 3 clean steps
    for n in SHAPES:
        assert torch.equal(after[n][1], before[n][1]), n  # run 1 skipped its step
        for step in range(8):  # runs 0 and 2 are exactly as without the overflow
            assert torch.equal(with_inf[step][1][n][[0, 2]], clean[step][1][n][[0, 2]]), (step, n)
    assert with_inf[-1][3].tolist() == [2.0**18, 2.0**16, 2.0**18]
    assert clean[-1][3].tolist() == [2.0**18] * 3


def test_grad_scaler_equals_torch_grad_scaler_per_run():
    """Run by run: torch.amp.GradScaler, clip, AdamW, and the schedule advanced only after a real step (HF)."""
    history = _train_scaled_pack(inf=True)
    for k in range(3):
        ref, scaler = _Reference(k), torch.amp.GradScaler("cpu", growth_interval=3)
        for step, (_, after, found_inf, scale, grads) in enumerate(history):
            coeffs = {n: c[k] for n, c in _scaler_coeffs(step, inf=True).items()}
            scaler.scale(sum((p * coeffs[n]).sum() for n, p in ref.p.items())).backward()
            scaler.unscale_(ref.opt)
            ref.clip()
            if not found_inf[k]:  # Adam all but ignores a grad scale, so check the unscaled grads directly
                for n, p in ref.p.items():
                    torch.testing.assert_close(grads[n][k], p.grad, rtol=1e-6, atol=0, msg=f"grad {step} {k} {n}")
            scale_before = scaler.get_scale()
            scaler.step(ref.opt)
            scaler.update()
            if scaler.get_scale() >= scale_before:  # accelerate's optimizer_step_was_skipped
                ref.sched.step()
            ref.opt.zero_grad()
            assert scale[k].item() == scaler.get_scale(), (step, k)
            for n, p in ref.p.items():
                torch.testing.assert_close(after[n][k], p.detach(), rtol=0, atol=1e-6, msg=f"step {step} run {k} {n}")


def test_grad_scaler_leaves_inactive_runs_alone():
    scaler = PackedGradScaler(3, growth_interval=1)
    scaler.update(torch.tensor([False, True, True]), active=torch.tensor([True, True, False]))
    assert scaler.scale.tolist() == [2.0**17, 2.0**15, 2.0**16]
    assert scaler.growth_tracker.tolist() == [0, 0, 0]
    scaler = PackedGradScaler(3, growth_interval=2)
    scaler.update(torch.tensor([False, False, False]), active=torch.tensor([True, False, True]))
    assert scaler.growth_tracker.tolist() == [1, 0, 1]
