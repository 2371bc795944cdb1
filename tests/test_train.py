"""The pack trainer on real MiniLM weights and real SST-2 rows: a pack equals its runs done alone."""

import copy
import csv
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from lorainit import models
from lorainit.config import RunConfig
from lorainit.engine.lora import LoRAConfig, LoRAPack
from lorainit.engine.order import DataOrder
from lorainit.tasks.classification import Classification
from lorainit.train import train_pack

pytestmark = pytest.mark.usefixtures("glue_data")  # every test here trains on GLUE rows

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
BASE = dict(max_steps=20, max_train_samples=160, max_eval_samples=32)


def _losses(result):
    return [m["value"] for m in result.metrics if m["name"] == "train_loss"]


def _run(**fields):
    return RunConfig.from_dict(BASE | fields)


def test_pack_equals_runs_one_at_a_time(measured):
    """2 inits x 2 lrs, LoRA dropout 0, the base model's own dropout on (drawn per run)."""
    runs = [_run(init=init, lr=lr, dropout=0.0) for init in "ab" for lr in (2e-4, 2e-3)]
    packed = train_pack(runs, show_progress=False)
    for run, res in zip(runs, packed):
        (alone,) = train_pack([run], show_progress=False)
        assert res.status == alone.status == "done"
        assert len(_losses(res)) == 20
        # a slot of a 4-run batched matmul against a 1-run one, 20 steps: fp32 rounding (eps
        # 1.2e-7) that Adam carries on; relative to losses of order 0.7
        assert measured("pack_vs_alone_loss", _losses(res), _losses(alone)) <= 1e-4
        assert measured("pack_vs_alone_eval_loss", res.final["eval_loss"], alone.final["eval_loss"]) <= 1e-4
        assert abs(res.final["accuracy"] - alone.final["accuracy"]) <= 1 / 32 + 1e-9  # one row flips at most
    # the four runs really differ
    assert len({round(_losses(r)[-1], 6) for r in packed}) == 4


def test_mixed_seeds_with_all_dropout_equal_runs_alone(measured):
    """Seeds 0, 1, 0 with LoRA, hidden and attention dropout: masks are drawn per run, at its own length."""
    runs = [_run(seed=s, init=i, lr=1e-3, dropout=0.1, max_steps=8) for s, i in ((0, "a"), (1, "a"), (0, "b"))]
    packed = train_pack(runs, show_progress=False)
    for run, res in zip(runs, packed):
        (alone,) = train_pack([run], show_progress=False)
        # 8 steps of fp32 rounding between a 3-run and a 1-run batch, relative to losses of order 0.7
        assert measured("mixed_seeds_loss", _losses(res), _losses(alone)) <= 1e-5


def test_gradient_checkpointing_replays_every_dropout_draw(measured):
    """MiniLM with LoRA, hidden and attention dropout, seeds 0 and 1: recomputing each layer in the
    backward draws the masks its forward drew, so the runs train as without checkpointing."""
    runs = [_run(seed=s, init=i, lr=1e-3, dropout=0.1, max_steps=4) for s, i in ((0, "a"), (1, "b"))]
    plain = train_pack(runs, show_progress=False)
    checkpointed = train_pack([RunConfig.from_dict(r.to_dict() | {"gradient_checkpointing": True}) for r in runs],
                              show_progress=False)
    for res, ref in zip(checkpointed, plain):
        # the same kernels on the same numbers, in the same order: equal to rounding
        assert measured("checkpointed_loss", _losses(res), _losses(ref)) <= 1e-6
        assert measured("checkpointed_eval_loss", res.final["eval_loss"], ref.final["eval_loss"]) <= 1e-6


def test_single_run_matches_peft_and_torch_adamw(measured):
    """K = 1 against PEFT + torch.optim.AdamW with the same init, data order, schedule and clipping."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    run = _run(init="a", lr=1e-3, dropout=0.0, warmup_ratio=0.1, max_grad_norm=0.5)
    (ours,) = train_pack([run], show_progress=False, model_overrides=NO_DROPOUT)

    base, _ = models.load("minilm", "classification", num_labels=2, **NO_DROPOUT)
    donor = LoRAPack(copy.deepcopy(base), LoRAConfig(rank=run.rank, alpha=run.alpha, targets=run.targets), 1)
    donor.init_run(0, run.init, run.init_variance, run.seed)
    peft_model = get_peft_model(base, LoraConfig(r=run.rank, lora_alpha=run.alpha, lora_dropout=0.0,
                                                 target_modules=list(run.targets), task_type="SEQ_CLS"))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in donor.layers.items():
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A[0])
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B[0])
        params["base_model.model.classifier.modules_to_save.default.weight"].copy_(donor.head.weight[0])
        params["base_model.model.classifier.modules_to_save.default.bias"].copy_(donor.head.bias[0])
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=run.lr, weight_decay=run.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, 2, run.max_steps)  # ceil(0.1 * 20) warmup steps
    task = Classification(run)  # the same rows the trainer reads
    order = DataOrder(run.seed, task.train_size, run.batch_size)
    peft_model.train()
    reference = []
    for step in range(run.max_steps):
        rows = order.rows_at(step)
        batch = task.batch(rows)
        labels = batch.pop("labels")
        loss = F.cross_entropy(peft_model(**batch).logits, labels)
        reference.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, run.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
    # another model implementation (unpadded, batched adapters) and optimiser over 20 steps: fp32
    # rounding that training carries on, relative to losses of order 0.7
    assert measured("peft_adamw_loss", _losses(ours), reference) <= 1e-4
    assert reference[-1] != reference[0]


def test_a_diverging_run_leaves_the_others_unchanged(measured):
    runs = [_run(init="a", lr=1e-3), _run(init="b", lr=5e-4)]
    absurd = _run(init="a", lr=1e3)
    with_it = train_pack([runs[0], absurd, runs[1]], show_progress=False)
    without = train_pack(runs, show_progress=False)
    assert with_it[1].status == "diverged" and with_it[1].diverged_step is not None
    assert with_it[1].final == {} and with_it[1].steps < 20
    for res, ref in zip((with_it[0], with_it[2]), without):
        assert res.status == "done"
        # slots of a 3-run batch (then 2) against a 2-run one: fp32 rounding, relative to the losses
        assert measured("diverged_neighbours_loss", _losses(res), _losses(ref)) <= 1e-5
        assert abs(res.final["accuracy"] - ref.final["accuracy"]) <= 1 / 32 + 1e-9  # one row flips at most


def test_probes_see_which_factor_starts_at_zero():
    runs = [_run(init="a", max_steps=2), _run(init="b", max_steps=2)]
    res_a, res_b = train_pack(runs, show_progress=False)

    def probe(res, metric, step=1):
        return [m["value"] for m in res.metrics if m["name"].endswith("/" + metric) and m["step"] == step]

    layers = 12  # query and value in 6 layers
    assert len(probe(res_a, "z_a_rms")) == layers
    assert all(v > 0 for v in probe(res_a, "z_a_rms")) and all(v == 0 for v in probe(res_a, "lora_out_rms"))
    assert all(v == 0 for v in probe(res_b, "z_a_rms")) and all(v > 0 for v in probe(res_b, "b_norm"))


def test_train_command_writes_results_metrics_and_adapter(tmp_path):
    cmd = [sys.executable, "-m", "lorainit.cli", "train", "--out", str(tmp_path), "--quiet", "--max-steps", "3",
           "--max_train_samples", "24", "--max_eval_samples", "16", "--init", "b", "--lr", "1e-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "done" and row["init"] == "b" and row["steps"] == "3"
    assert 0.0 <= float(row["final_accuracy"]) <= 1.0 and float(row["final_eval_loss"]) > 0
    assert (tmp_path / "adapters" / row["run_id"] / "adapter_model.safetensors").is_file()
    with open(tmp_path / "metrics.csv") as f:
        names = {r["name"] for r in csv.DictReader(f)}
    assert {"train_loss", "accuracy", "eval_loss"} <= names


@pytest.mark.parametrize("args,needle", [
    (["--lr", "fast"], "lr must be a number"),
    (["--init", "c"], "init is 'c'; expected one of a, b, ab"),
    (["--lr_b_rato", "2"], "unrecognized arguments"),
])
def test_train_command_rejects_bad_options(tmp_path, args, needle):
    cmd = [sys.executable, "-m", "lorainit.cli", "train", "--out", str(tmp_path / "o"), "--max_steps", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and needle in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_run_close_to_fp32(precision):
    """The base stored in bf16 or fp16 and the forward under autocast (fp16 with per-run loss
    scaling), on the CPU as on a GPU; the adapters stay fp32."""
    from lorainit import train

    fields = dict(max_steps=6, max_train_samples=40, max_eval_samples=16, lr=1e-3)
    runs = [_run(**fields, init=i, precision=precision) for i in "ab"]
    low = train.train_pack(runs, show_progress=False)
    full = train.train_pack([_run(**fields, init=i) for i in "ab"], show_progress=False)
    for a, b in zip(low, full):
        assert a.status == "done" and a.steps == 6
        assert max(abs(x - y) for x, y in zip(_losses(a), _losses(b))) < 0.02


def test_divergence_needs_a_smoothed_loss_above_the_factor_or_a_non_finite_one():
    """One batch at 12x the first loss does not stop a run; a sustained rise does, and a
    non-finite loss stops it at once. The diverged run's final metrics are emptied, its best kept."""
    from lorainit.train import SMOOTHING, PackTrainer

    trainer = PackTrainer([_run(lr=1e-3), _run(lr=2e-3), _run(lr=4e-3)], show_progress=False)
    assert trainer._check(0, 0.7) and trainer._check(1, 0.7) and trainer._check(2, 0.7)
    assert trainer._check(0, 8.4)  # one unlucky batch: the average moves by (8.4 - 0.7) / 20 only
    assert trainer.smoothed[0] == pytest.approx(0.7 + 7.7 / SMOOTHING)
    for _ in range(5):
        assert trainer._check(0, 0.7)
    trainer.results[1].final, trainer.results[1].best = {"accuracy": 0.8}, {"accuracy": 0.85}
    assert not trainer._check(1, float("nan"))
    assert trainer.results[1].status == "diverged" and trainer.results[1].diverged_step == 1
    assert trainer.results[1].final == {} and trainer.results[1].best == {"accuracy": 0.85}
    steps = 0
    while trainer._check(2, 100.0):  # a sustained rise crosses 10 x 0.7 within a few steps
        steps += 1
    assert 0 < steps < SMOOTHING and trainer.results[2].status == "diverged"
    assert trainer.alive == [True, False, False]


def test_log_every_logs_the_mean_training_loss_of_each_interval():
    every = _run(lr=1e-3, max_steps=10, eval_every=0)
    (one,) = train_pack([every], show_progress=False)
    (grouped,) = train_pack([_run(lr=1e-3, max_steps=10, log_every=4)], show_progress=False)
    losses = _losses(one)
    assert len(losses) == 10  # 10 steps: log_every 0 logs every step up to 1,000 steps
    logged = [(m["step"], m["value"]) for m in grouped.metrics if m["name"] == "train_loss"]
    # steps 1-4, 5-8, then the last interval cut short at the run's end: 9-10
    expected = [(4, sum(losses[:4]) / 4), (8, sum(losses[4:8]) / 4), (10, sum(losses[8:]) / 2)]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6, abs=0)
    from lorainit.train import log_interval

    assert log_interval(every, 168_380) == 169  # the paper's SST-2 run: 997 points


def test_a_classifiers_trivial_loss_is_the_label_priors_and_is_recorded_at_step_0():
    from lorainit.tasks import glue
    from lorainit.tasks.classification import prior_loss

    runs = [RunConfig.from_dict({"task": "sst2-slice", "init": i, "seed": s, "max_steps": 1, "max_train_samples": 40,
                                 "max_eval_samples": 24, "batch_size": 4}) for i, s in (("a", 0), ("b", 1))]
    results = train_pack(runs, show_progress=False)
    expected = prior_loss(glue.read("sst2-slice", "train", max_rows=40).labels,
                          glue.read("sst2-slice", "eval", max_rows=24).labels, 2)
    for res in results:
        assert res.trivial_loss == expected
        assert {"step": 0, "name": "trivial_loss", "value": expected} in res.metrics
