"""`lorainit advise`: the plan within a budget, refusals before anything is written, and one real
staged run on TREC (MiniLM) whose survivors, choices, confirm file, page and resume are checked
against its own stores."""

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import needs_data

from lorainit import advise, cli, tasks
from lorainit.config import RunConfig
from lorainit.engine.order import tokens_read
from lorainit.errors import BadInput
from lorainit.sweeps import file as sweep_file


def _settings(**given) -> advise.Settings:
    values = dict(base={"model": "minilm", "task": "sst2-slice"}, target_steps=300, budget=10 ** 6) | given
    return advise.Settings(**values)


def test_stage_counts_keep_a_third_and_never_fewer_than_three():
    assert advise.stage_counts(14) == [14, 5, 3]
    assert advise.stage_counts(10) == [10, 4, 3]
    assert advise.stage_counts(3) == [3]


def test_plan_reaches_the_target_when_the_budget_allows_and_stays_within_it():
    s = _settings(families=("a", "b"), target_steps=270)
    stages = advise.plan(s)
    assert [(st.steps, st.lrs) for st in stages] == [(30, 14), (90, 5), (270, 3)]
    tight = _settings(families=("a", "b"), target_steps=270, budget=_settings(families=("a", "b"),
                                                                              target_steps=270).full_grid // 3)
    stages = advise.plan(tight)
    cost = sum(st.run_steps(2, 2) for st in stages)
    assert len(stages) == 3 and cost <= tight.budget
    assert stages[-1].steps < 270  # a third of the grid's compute cannot carry three lrs to the target
    assert stages[1].steps == 3 * stages[0].steps


def test_stages_that_would_cost_the_full_grid_give_way_to_it():
    s = _settings(families=("a", "b"), lrs=(1e-4, 2e-4, 4e-4, 8e-4), target_steps=30, budget=600)
    assert [(st.steps, st.lrs) for st in advise.plan(s)] == [(30, 4)]  # 4 then 3 lrs would cost 520 > 480
    s.budget = 479
    assert sum(st.run_steps(2, 2) for st in advise.plan(s)) <= 479


def test_a_small_budget_takes_fewer_stages_then_is_refused_with_what_fits():
    s = _settings(families=("a",), seeds=(0,), target_steps=300, budget=14 * 12)
    assert [(st.steps, st.lrs) for st in advise.plan(s)] == [(12, 14)]  # one stage only
    with pytest.raises(BadInput, match=r"too small for even one stage: .* needs 140 run-steps"):
        advise.plan(_settings(families=("a",), seeds=(0,), target_steps=300, budget=139))
    # a budget given in minutes is named as the user gave it
    with pytest.raises(BadInput, match=r"--minutes 0.5 \(139 run-steps at the estimated rate\) is too small .* "
                                       r"give more --minutes"):
        advise.plan(_settings(families=("a",), seeds=(0,), target_steps=300, budget=139, minutes=0.5))


def test_what_a_stage_let_go_is_said_once_per_reason():
    choice = advise.Choice("a", 30, dropped=[(1, "behind the best 5", 2.0 ** -10), (1, "behind the best 5", 2.0 ** -12),
                                             (2, "2 did not learn (of 2)", 1e-3)])
    assert choice.dropped_text() == ("stage 1: behind the best 5: 0.000244, 0.000977; "
                                     "stage 2: 2 did not learn (of 2): 0.001")


def test_cli_refuses_a_budget_too_small_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "advice"
    code = cli.main(["advise", "--out", str(out), "--task", "sst2-slice", "--target-steps", "200",
                     "--budget", "500"])
    err = capsys.readouterr().err
    assert code == 2 and "too small for even one stage" in err and "1,960 run-steps" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, said", [
    (["--lr", "1e-3"], "lr is set by advise"),
    (["--metric", "f1"], "--metric 'f1' is not one of the task's metrics: accuracy, eval_loss"),
    (["--lrs", "1e-3"], "at least two positive learning rates"),
    (["--families", "a,a"], "named twice"),
    (["--families", "a,dora"], "dora"),
    (["--seeds", "0"], "--seeds is 0"),
    (["--budget", "1000", "--minutes", "5"], "not both"),
])
def test_cli_refuses_bad_settings_naming_them(tmp_path, capsys, argv, said):
    out = tmp_path / "advice"
    base = ["advise", "--out", str(out), "--task", "sst2-slice", "--target-steps", "200"]
    if "--minutes" not in argv:
        base += ["--budget", "100000"]
    code = cli.main(base + argv)
    assert code == 2 and said in capsys.readouterr().err
    assert not out.exists()


def test_exact_match_is_refused_for_a_declared_task_without_references(tmp_path, capsys):
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"}) + "\n" for i in range(8)))
    out = tmp_path / "advice"
    code = cli.main(["advise", "--out", str(out), "--model", "smollm2-135m", "--task",
                     f"{{type: sft, train: {rows}, eval_fraction: 0.25}}", "--target-steps", "200",
                     "--budget", "100000", "--metric", "exact_match"])
    assert code == 2 and "task.reference" in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "advice"
    code = cli.main(["advise", "--out", str(out), "--task", "sst2-slice", "--target-steps", "270",
                     "--families", "a,b", "--budget", "100000", "--dry-run"])
    assert code == 0 and not out.exists()
    err = capsys.readouterr().err
    assert "3 stages at 30, 90, 270 steps (lrs per family 14, 5, 3)" in err and "full grid is 15,120" in err


def test_a_budget_in_minutes_becomes_run_steps(tmp_path, capsys, monkeypatch):
    from lorainit.sweeps import estimates

    monkeypatch.setattr(estimates, "matmul_flops", lambda device, n=1024: 1e11)  # the estimate's measured rate, fixed
    s = _settings(families=("a", "b"), minutes=10.0, budget=0, target_steps=270)
    advise.advise(s, tmp_path / "advice", device="cpu", dry_run=True)
    assert s.budget > 0 and f"the budget {s.budget:,} (10 min)" in capsys.readouterr().err
    half = advise.budget_from_minutes(_settings(families=("a", "b"), minutes=5.0, target_steps=270), "cpu")
    assert abs(half - s.budget / 2) <= 1
    monkeypatch.setattr(estimates, "matmul_flops", lambda device, n=1024: 2e11)
    assert abs(advise.budget_from_minutes(s, "cpu") - 2 * s.budget) <= 2  # twice the rate, twice the steps


def _trec(root: Path) -> dict:
    return {"model": "minilm", "task": {"type": "classification", "train": str(root / "byo/trec/train.csv"),
                                        "eval": str(root / "byo/trec/test.csv")},
            "max_seq_len": 16, "max_train_samples": 160, "max_eval_samples": 16, "batch_size": 8,
            "save_adapters": False}


@pytest.mark.parametrize("fields", [
    {"model": "minilm", "task": "sst2-slice", "max_seq_len": 32, "batch_size": 3, "max_train_samples": 12},
    {"model": "smollm2-135m", "task": "gsm8k-slice", "max_seq_len": 160, "batch_size": 2, "max_train_samples": 12},
], ids=["classification", "causal_lm"])
def test_the_tokens_advise_counts_are_the_tokens_the_trainer_trains_on(fields):
    """A run's training tokens from its rows' lengths and its data order, without training, equal the
    real tokens a pack of two seeds reads step by step (into a second epoch)."""
    from lorainit.train import PackTrainer

    runs = [RunConfig.from_dict(fields | {"seed": seed, "max_steps": 30}) for seed in (0, 1)]
    lengths = tasks.family(runs[0].task).train_lengths(runs[0])
    trainer = PackTrainer(runs, show_progress=False)
    assert trainer.task.train_size == len(lengths) and len(set(lengths)) > 1
    steps = -(-len(lengths) // runs[0].batch_size) + 2  # into the second epoch, reshuffled
    seen = 0
    for step in range(1, steps + 1):
        seen += trainer.train_step(log=False)[1]
        assert seen == sum(tokens_read(lengths, r.seed, r.batch_size, step) for r in runs), step


def _rows(folder: Path) -> list[dict]:
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


def _survivors(rows: list[dict], family: str, keep: int) -> list[float]:
    """The lrs a stage passes on, worked out again from its results.csv."""
    cells: dict[float, list[dict]] = {}
    for row in rows:
        if row["init"] == family:
            cells.setdefault(float(row["lr"]), []).append(row)
    learned, trained = [], []
    for lr, runs in cells.items():
        loss = statistics.fmean(float(r["final_eval_loss"]) for r in runs) if all(
            r["final_eval_loss"] for r in runs) else None
        if all(r["status"] == "done" for r in runs):
            learned.append((-statistics.fmean(float(r["final_accuracy"]) for r in runs), loss, lr))
        elif all(r["status"] in ("done", "did_not_learn", "collapsed") for r in runs):
            trained.append((loss, lr))
    going = [lr for *_, lr in sorted(learned)[:keep]]
    going += [lr for _, lr in sorted(trained)[:max(0, keep - len(going))]]
    return sorted(going)


def test_advise_narrows_each_family_in_stages_and_resumes(tmp_path, capsys):
    root = needs_data("byo/trec")
    out = tmp_path / "advice"
    lrs = tuple(2.0 ** e for e in range(-9, -3))
    settings = advise.Settings(base=_trec(root), families=("a", "b"), lrs=lrs, seeds=(0, 1), target_steps=30,
                               budget=650, name="trec")
    result = advise.advise(settings, out, device="cpu", show_progress=False)
    assert [(st.steps, st.lrs) for st in result.stages] == [(10, 6), (30, 3)]
    first, second = _rows(out / "stage-1"), _rows(out / "stage-2")
    assert {int(r["max_steps"]) for r in first} == {10} and {int(r["max_steps"]) for r in second} == {30}
    assert len(first) == 24
    for family in ("a", "b"):
        went = sorted({float(r["lr"]) for r in second if r["init"] == family})
        assert went == _survivors(first, family, 3) == result.kept[1][family]
    assert result.spent == 10 * len(first) + 30 * len(second)
    assert result.spent <= settings.budget

    # each family's choice is its best cell at the last stage, with the grid's neighbours as its bracket
    for family, choice in result.choices.items():
        done = {}
        for r in second:
            if r["init"] == family:
                done.setdefault(float(r["lr"]), []).append(r)
        learned = {lr: statistics.fmean(float(r["final_accuracy"]) for r in runs)
                   for lr, runs in done.items() if all(r["status"] == "done" for r in runs)}
        if learned:
            assert choice.steps == 30 and max(learned.values()) == pytest.approx(choice.mean)
            i = lrs.index(choice.lr)
            assert choice.low == (lrs[i - 1] if i else None) and choice.high == (lrs[i + 1] if i < 5 else None)
    text = "\n".join(result.lines())
    assert "stage 1: 10 steps, 24 runs" in text and "stage 2: 30 steps" in text
    assert f"of the full grid's {2 * 6 * 2 * 30:,}" in text

    saved = json.loads((out / "advice.json").read_text())
    assert saved["run_steps"] == result.spent and saved["full_grid_run_steps"] == 720
    # training tokens: each stage run's rows over its own steps; the full grid's at the target length
    run = RunConfig.from_dict(settings.base | {"max_steps": 30})
    lengths = tasks.family(run.task).train_lengths(run)
    assert saved["train_tokens"] == sum(tokens_read(lengths, int(r["seed"]), 8, int(r["max_steps"]))
                                        for r in first + second)
    assert saved["full_grid_train_tokens"] == 2 * 6 * sum(tokens_read(lengths, seed, 8, 30) for seed in (0, 1))
    assert f"{saved['train_tokens']:,} training tokens" in text
    # a stage's store may hold runs an earlier plan asked for (resumed after the stage before it
    # changed): a stage is judged on the runs it planned, and only those
    metric = tasks.metrics(run.task)[0]
    planned = {r["run_id"] for r in second if r["init"] == "a" and float(r["lr"]) == result.kept[1]["a"][0]}
    cells = advise._stage_cells(out / "stage-2", metric, planned)
    assert list(cells) == ["a"] and [c.lr for c in cells["a"][0]] == [result.kept[1]["a"][0]]
    assert {r.run_id for c in cells["a"][0] for r in c.runs} == planned
    page = (out / "report" / "index.html").read_text()
    assert "Stage 1: 10 steps" in page and "Stage 2: 30 steps" in page and "data:image/png;base64" in page
    assert (out / "stage-2" / "report" / "index.html").is_file()
    if result.best is not None:
        assert f"recommended: {result.best.name} at lr" in text
        assert (result.verdict is not None) == (result.runner_up is not None)
        confirm = sweep_file.load(out / "confirm.yaml")
        assert {r.max_steps for r in confirm.runs} == {30}
        assert result.best.lr in {r.lr for r in confirm.runs if r.init == result.best.family}
        assert {r.seed for r in confirm.runs} == {0, 1}

    # run again: every stage is finished, nothing trains, the advice is the same
    before = [(out / f"stage-{i}" / "results.csv").read_text() for i in (1, 2)]
    figure = next((out / "stage-2" / "report").glob("metric_vs_lr_*.png"))
    drawn_at = figure.stat().st_mtime_ns
    capsys.readouterr()
    again = advise.advise(settings, out, device="cpu", show_progress=False)
    err = capsys.readouterr().err
    assert "24 runs already finished, 0 new" in err and "runs already finished, 0 new" in err.split("stage 2")[1]
    assert [(out / f"stage-{i}" / "results.csv").read_text() for i in (1, 2)] == before
    assert again.lines() == result.lines()
    assert figure.stat().st_mtime_ns == drawn_at  # finished stages are not drawn again
    assert "Stage 2: 30 steps" in (out / "report" / "index.html").read_text()

    # other settings in the same folder are refused, naming what differs, and change nothing
    stored = (out / advise.SETTINGS).read_text()
    other = advise.Settings(base=_trec(root), families=("a", "b"), lrs=lrs, seeds=(0, 1), target_steps=30,
                            budget=700, name="trec")
    with pytest.raises(BadInput, match=r"other settings \(budget differ"):
        advise.advise(other, out, device="cpu", show_progress=False)
    assert (out / advise.SETTINGS).read_text() == stored
