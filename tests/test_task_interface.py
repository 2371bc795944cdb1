"""The trainer trains any task a family describes: a stand-in family, written here and registered
at run time, trained through the registry by the trainer and by a sweep that never heard of it."""

import csv

import pytest
import torch
from torch import nn

from lorainit import cli, tasks
from lorainit.config import RunConfig
from lorainit.tasks.base import Forward, Losses, Task
from lorainit.train import train_pack

FEATURES = 8


class TinyNet(nn.Module):
    """A token-wise regressor: (rows, T, 8) features -> (rows, T) predictions."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.proj = nn.Linear(FEATURES, 16)
        self.drop = nn.Dropout(0.1)  # the base model's own dropout: drawn per run by the pack
        self.out = nn.Linear(16, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.proj(x)))).squeeze(-1)


class TokenRegression(Task):
    """Rows of 1 to 6 tokens; each token's target is tanh(w . x). The loss is the squared error
    summed over a run's real tokens, counted in tokens, so runs with more tokens weigh no more."""

    def __init__(self, run, model_overrides=None):
        super().__init__(run, model_overrides)
        self.model, self.tokenizer = TinyNet(), None
        g = torch.Generator().manual_seed(2)
        w = torch.randn(FEATURES, generator=g)

        def rows(n):
            xs = [torch.randn(int(t), FEATURES, generator=g) for t in torch.randint(1, 7, (n,), generator=g)]
            return [(x, torch.tanh(x @ w)) for x in xs]

        self.train_rows, self.eval_rows = rows(48), rows(24)

    @property
    def train_size(self):
        return len(self.train_rows)

    @property
    def eval_size(self):
        return len(self.eval_rows)

    @staticmethod
    def _collate(rows):
        width = max(len(x) for x, _ in rows)
        x = torch.zeros(len(rows), width, FEATURES)
        y = torch.zeros(len(rows), width)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (xi, yi) in enumerate(rows):
            x[i, :len(xi)], y[i, :len(yi)], mask[i, :len(xi)] = xi, yi, True
        return {"x": x, "y": y, "mask": mask}

    def batch(self, rows):
        return self._collate([self.train_rows[i] for i in rows])

    def stack(self, batches, device):
        lengths = [b["x"].shape[1] for b in batches]
        width = max(lengths)

        def pad(t):
            return nn.functional.pad(t, (0, 0, 0, width - t.shape[1]) if t.dim() == 3 else (0, width - t.shape[1]))

        return {k: torch.cat([pad(b[k]) for b in batches]).to(device) for k in batches[0]}, lengths

    def token_mask(self, batch):
        return batch["mask"]

    def _errors(self, state, batch, n):
        err = (state.pack.model(batch["x"]) - batch["y"]).square() * batch["mask"]  # (n*b, T)
        return err.view(n, -1), batch["mask"].view(n, -1)

    def loss(self, state, batch, forward: Forward) -> Losses:
        err, mask = self._errors(state, batch, len(forward.runs))
        return Losses(err.sum(1), mask.sum(1))

    def evaluate(self, state, runs):
        n = len(runs)
        batch = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self._collate(self.eval_rows).items()}
        err, mask = self._errors(state, batch, n)
        tokens = mask.sum(1)
        hits = ((err.sqrt() < 0.5) & mask).sum(1)
        return [{"mse": float(err[j].sum() / tokens[j]), "hit_rate": float(hits[j] / tokens[j])} for j in range(n)]


MSE, HIT_RATE = tasks.Metric("mse", higher_is_better=False), tasks.Metric("hit_rate", higher_is_better=True)


@pytest.fixture
def stand_in():
    tasks.register("token_regression", TokenRegression, (MSE, HIT_RATE))
    try:
        yield "token_regression"
    finally:
        tasks.unregister("token_regression")


def _run(**fields):
    base = dict(task="token_regression", targets="proj", rank=2, dropout=0.1, batch_size=3, max_steps=12,
                eval_every=4)
    return RunConfig.from_dict(base | fields)


def _losses(result):
    return [m["value"] for m in result.metrics if m["name"] == "train_loss"]


def test_a_task_the_trainer_never_heard_of_trains_in_a_pack_as_alone(stand_in):
    runs = [_run(init="a", lr=3e-2, seed=0), _run(init="b", lr=1e-2, seed=1), _run(init="a", lr=1e-2, seed=0)]
    packed = train_pack(runs, show_progress=False)
    for run, res in zip(runs, packed):
        (alone,) = train_pack([run], show_progress=False)
        assert res.status == alone.status == "done" and res.steps == 12
        # fp32 (eps 1.2e-7): the same arithmetic in a batched matmul of 3 slots or of 1; 1e-5 of
        # the value leaves ~100 roundings of headroom on sums over a few dozen tokens
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(_losses(res), _losses(alone)))
        assert abs(res.final["mse"] - alone.final["mse"]) <= 1e-5 * alone.final["mse"]
        assert res.final["hit_rate"] == pytest.approx(alone.final["hit_rate"], abs=1 / 93)  # one token of 93
    # the seeds' batches hold different numbers of tokens, so a pooled mean would have differed
    task = TokenRegression(runs[0])
    assert task.token_mask(task.batch([0, 1, 2])).sum() != task.token_mask(task.batch([3, 4, 5])).sum()
    # training moved the runs, and differently: each one's evaluation loss fell
    assert len({round(_losses(r)[-1], 6) for r in packed}) == 3
    for res in packed:
        mse = [m["value"] for m in res.metrics if m["name"] == "mse"]
        assert mse[-1] < mse[0]


def test_best_values_follow_each_metrics_direction(stand_in):
    (res,) = train_pack([_run(init="a", lr=3e-2)], show_progress=False)
    evaluations = {name: [m["value"] for m in res.metrics if m["name"] == name] for name in ("mse", "hit_rate")}
    assert len(evaluations["mse"]) == 3  # steps 4, 8, 12
    assert res.best["mse"] == min(evaluations["mse"]) and res.best["hit_rate"] == max(evaluations["hit_rate"])
    assert res.final == {"mse": evaluations["mse"][-1], "hit_rate": evaluations["hit_rate"][-1]}


def test_a_sweep_of_the_stand_in_task_writes_its_metric_columns(stand_in, tmp_path):
    file = tmp_path / "sweep.yaml"
    file.write_text("name: stand-in\nbase:\n  task: token_regression\n  targets: proj\n  rank: 2\n  batch_size: 3\n"
                    "  max_steps: 4\n  save_adapters: false\ngrid:\n  init: [a, b]\n")
    assert cli.main(["sweep", str(file), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert [c for c in reader.fieldnames if c.startswith(("final_", "best_"))] == [
        "final_mse", "best_mse", "final_hit_rate", "best_hit_rate"]
    assert len(rows) == 2 and all(r["status"] == "done" and float(r["final_mse"]) > 0 for r in rows)


def test_an_unregistered_task_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"task is 'token_regression'; allowed: sst2, qnli, mnli"):
        _run()
