"""Verdicts that never overstate, and runs judged on whether they learned, from fixture stores.

Each store is written through the real `Store` and read back through `lorainit report`'s loader,
so what is asserted is what a user reads: the claims' verdicts, the run statuses in results.csv,
and the largest lr at which every seed learned.
"""

import csv
import math

from lorainit import report
from lorainit.config import RunConfig
from lorainit.report import findings as F
from lorainit.report.sweep import load
from lorainit.sweeps import outcome
from lorainit.sweeps.store import Store
from lorainit.tasks.classification import prior_loss
from lorainit.train import RunResult

LN2 = math.log(2)
LRS = (1e-4, 3e-4, 1e-3, 3e-3)


def _write(folder, runs: dict, task="sst2-slice", trivial=LN2, extra=None):
    """A store of finished runs. `runs` maps (init, lr, seed) to a final accuracy (eval loss
    1 - accuracy, well below ln 2: a run that learned), or to a dict with `accuracy` and the eval
    losses it recorded in order (`evals`; the last is the final one). `trivial`: the recorded
    trivial loss (None: none recorded, as in a store written before it was)."""
    configs, results = [], []
    for (init, lr, seed), value in runs.items():
        run = RunConfig.from_dict({"task": task, "init": init, "lr": lr, "seed": seed, "max_steps": 30,
                                   "max_train_samples": 400, "max_eval_samples": 200} | (extra or {}))
        configs.append(run)
        value = value if isinstance(value, dict) else {"accuracy": value, "evals": [1.0 - value]}
        res = RunResult(run, steps=30, final={"accuracy": value["accuracy"], "eval_loss": value["evals"][-1]})
        res.best = {"accuracy": value["accuracy"], "eval_loss": min(value["evals"])}
        res.metrics = [{"step": 10 * (i + 1), "name": "eval_loss", "value": v} for i, v in enumerate(value["evals"])]
        if trivial is not None:
            res.metrics.append({"step": 0, "name": "trivial_loss", "value": trivial})
        results.append(res)
    store = Store(folder)
    store.add_sweep("fixture", {"task": task}, {"init": ["a", "b"], "lr": list(LRS)}, "", configs)
    store.record(results)
    store.write_results_csv()
    store.close()
    return folder


def _judged(folder):
    sweep = load(folder)
    (accuracy,) = [m for m in sweep.groups[0].metrics if m.name == "accuracy"]
    return F.judge(sweep.groups[0], accuracy)


def _statuses(folder) -> dict:
    with open(folder / "results.csv", newline="") as f:
        return {(r["init"], float(r["lr"]), int(r["seed"])): r["status"] for r in csv.DictReader(f)}


def _curve(a, b, seeds=(0, 1, 2), jitter=0.002):
    return {(init, lr, seed): acc + jitter * (i - 1)
            for init, curve in (("a", a), ("b", b)) for lr, acc in zip(LRS, curve) for i, seed in enumerate(seeds)}


def test_a_tie_in_the_optimal_lr_is_equal_not_holds(tmp_path):
    # every seed of both inits is best at 1e-3
    f = _judged(_write(tmp_path, _curve(a=(0.80, 0.85, 0.90, 0.88), b=(0.79, 0.84, 0.86, 0.85))))
    lr_claim, metric_claim = f.claims
    assert lr_claim.text == "Init[A]'s optimal lr > Init[B]'s"
    assert lr_claim.verdict == F.EQUAL and "+0.0 octaves" in lr_claim.detail
    assert metric_claim.verdict == F.HOLDS  # 0.898-0.902 against 0.858-0.862: every A seed beats every B seed


def test_seeds_whose_optima_disagree_are_within_seed_noise(tmp_path):
    runs = _curve(a=(0.80, 0.85, 0.90, 0.88), b=(0.79, 0.84, 0.86, 0.85))
    runs[("b", 3e-3, 2)] = 0.95  # one Init[B] seed is best at 3e-3, above every A seed's 1e-3
    f = _judged(_write(tmp_path, runs))
    assert sorted(f.inits["a"].seed_optima) == [1e-3] * 3 and sorted(f.inits["b"].seed_optima) == [1e-3, 1e-3, 3e-3]
    assert f.claims[0].verdict == F.NOISE


def test_one_seed_holds_only_on_a_strict_gap_and_never_on_a_metric_gap(tmp_path):
    tie = _judged(_write(tmp_path / "tie", _curve(a=(0.80, 0.85, 0.90, 0.88), b=(0.79, 0.84, 0.8975, 0.85),
                                                  seeds=(0,))))
    assert [c.verdict for c in tie.claims] == [F.EQUAL, F.UNKNOWN]  # 0.0075 apart with one seed: holds nothing
    assert all("spread is unknown" in c.detail for c in tie.claims)
    above = _judged(_write(tmp_path / "above", _curve(a=(0.80, 0.85, 0.90, 0.88), b=(0.82, 0.86, 0.84, 0.80),
                                                      seeds=(0,))))
    assert [c.verdict for c in above.claims] == [F.HOLDS, F.UNKNOWN]


def test_a_gap_swallowed_by_the_seed_spread_is_within_seed_noise(tmp_path):
    # A's best is 0.004 above B's, but each init's seeds spread over 0.02
    f = _judged(_write(tmp_path, _curve(a=(0.80, 0.85, 0.904, 0.88), b=(0.82, 0.86, 0.90, 0.80), jitter=0.01)))
    assert f.claims[1].verdict == F.NOISE
    assert "A 0.894–0.914, B 0.89–0.91" in f.claims[1].detail


def test_a_collapse_to_chance_is_named_and_bounds_the_learned_lr(tmp_path):
    runs = _curve(a=(0.80, 0.85, 0.90, 0.88), b=(0.79, 0.84, 0.86, 0.85))
    for seed in (0, 1, 2):
        # learned (eval loss 0.45 at step 10), then fell back to the label prior's loss: chance
        runs[("a", 3e-3, seed)] = {"accuracy": 0.52, "evals": [0.45, 0.60, LN2 + 1e-4]}
        # never went below the prior's loss
        runs[("b", 3e-3, seed)] = {"accuracy": 0.50, "evals": [0.70, 0.699, LN2]}
    folder = _write(tmp_path, runs)
    f = _judged(folder)
    statuses = _statuses(folder)
    assert {statuses[("a", 3e-3, s)] for s in (0, 1, 2)} == {"collapsed"}
    assert {statuses[("b", 3e-3, s)] for s in (0, 1, 2)} == {"did_not_learn"}
    assert statuses[("a", 1e-3, 0)] == "done"
    # 3e-3 neither diverged nor failed, yet it is not an lr at which every seed learned
    assert f.inits["a"].largest_learned_lr == 1e-3 and f.inits["b"].largest_learned_lr == 1e-3
    lines = F.summary_lines(f)
    assert "largest lr at which every seed learned: 0.001" in lines[0]
    assert any("Init[A] at lr 0.003: 3 collapsed (of 3)" in n for n in f.notes)
    assert any("Init[B] at lr 0.003: 3 did not learn (of 3)" in n for n in f.notes)
    # the rule, said whole
    assert any(n.endswith("; it collapsed when it ended so although an earlier evaluation was below that line")
               for n in f.notes)
    text = report.build(folder).text()
    assert "3 collapsed" in text and "3 did not learn" in text
    assert "did not learn" in (folder / "report" / "summary.md").read_text()


def test_a_run_that_learned_a_little_counts_as_learned(tmp_path):
    line = outcome.threshold(LN2)
    runs = _curve(a=(0.80, 0.85, 0.90, 0.88), b=(0.79, 0.84, 0.86, 0.85))
    runs[("b", 3e-3, 0)] = {"accuracy": 0.56, "evals": [line - 0.002]}  # just below the margin: learned
    runs[("b", 3e-3, 1)] = {"accuracy": 0.55, "evals": [line + 0.002]}  # just above it: did not learn
    statuses = _statuses(_write(tmp_path, runs))
    assert statuses[("b", 3e-3, 0)] == "done" and statuses[("b", 3e-3, 1)] == "did_not_learn"
    assert math.isclose(line, LN2 * (1 - outcome.MARGIN))


def test_a_store_without_the_trivial_loss_is_judged_from_the_label_prior(tmp_path):
    """A store written before the trivial loss was recorded: the prior comes from the run's own rows."""
    from lorainit.tasks import glue

    runs = _curve(a=(0.80, 0.85, 0.90, 0.88), b=(0.79, 0.84, 0.86, 0.85))
    runs[("b", 3e-3, 0)] = {"accuracy": 0.51, "evals": [0.70]}
    old = _write(tmp_path / "old", runs, trivial=None)
    train = glue.read("sst2-slice", "train", max_rows=400).labels
    evaluated = glue.read("sst2-slice", "eval", max_rows=200).labels
    prior = prior_loss(train, evaluated, 2)
    new = _write(tmp_path / "new", runs, trivial=prior)
    assert _statuses(old) == _statuses(new) and _statuses(old)[("b", 3e-3, 0)] == "did_not_learn"
    assert load(old).runs[0].trivial_loss == load(new).runs[0].trivial_loss == prior


def test_the_label_prior_loss_is_the_prior_entropy_where_the_splits_share_it():
    assert math.isclose(prior_loss([0, 1] * 50, [0, 1] * 10, 2), -math.log(51 / 102))
    # a 3:1 prior on both splits: its entropy, up to the add-one smoothing
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert abs(prior_loss([0, 0, 0, 1] * 250, [0, 0, 0, 1] * 25, 2) - h) < 1e-3
    assert math.isfinite(prior_loss([0] * 10, [1], 2))  # a label never seen in training: finite
