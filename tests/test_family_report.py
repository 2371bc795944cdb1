"""Init families in sweeps and reports: per-init lr grids, ratios to Init[A] in octaves, the claims
for every family against Init[A] and for the pairs a sweep file or `--pair` names.

The fixture sweeps are real sweep files, parsed by `sweeps.file`, written through the real `Store`
with known final accuracies, and read back through `lorainit report`'s loader.
"""

import math
import re

import pytest

from lorainit import cli, report
from lorainit.report import families, figures
from lorainit.report import findings as F
from lorainit.report.sweep import Group, Run, load
from lorainit.sweeps import file
from lorainit.sweeps.store import Store
from lorainit.train import RunResult

LN2 = math.log(2)
SWEEP = """\
name: families
base: {task: sst2-slice, max_steps: 30, max_train_samples: 400, max_eval_samples: 200}
grid:
  init: [a, b, pissa, olora]
  seed: [0, 1, 2]
  lr:
    a: [1.0e-4, 4.0e-4, 1.6e-3, 6.4e-3]
    b: [2.5e-5, 1.0e-4, 4.0e-4, 1.6e-3]
    pissa: [6.25e-6, 2.5e-5, 1.0e-4, 4.0e-4]
    olora: [1.0e-4, 4.0e-4, 1.6e-3, 6.4e-3]
compare: [[pissa, olora]]
"""
# mean accuracy per lr (in each init's own lr list), each seed jittered by -0.002, 0, +0.002
CURVES = {"a": (0.80, 0.85, 0.90, 0.88), "b": (0.80, 0.84, 0.86, 0.82), "pissa": (0.85, 0.90, 0.93, 0.91)}
# OLoRA's seeds by hand: seed 0 is best at 4e-4, seeds 1 and 2 at 1.6e-3, where its seeds spread over A's
OLORA = {1e-4: (0.80, 0.80, 0.80), 4e-4: (0.905, 0.88, 0.88), 1.6e-3: (0.89, 0.91, 0.905), 6.4e-3: (0.85, 0.85, 0.85)}


def _accuracy(init: str, lr: float, seed: int, lrs: dict) -> float:
    if init == "olora":
        return OLORA[lr][seed]
    return CURVES[init][lrs[init].index(lr)] + 0.002 * (seed - 1)


def _write(folder, text: str, accuracy):
    """The sweep file's runs, each finished with `accuracy(run)` (eval loss 1 - accuracy: learned)."""
    sweep = file.parse(text)
    results = []
    for run in sweep.runs:
        value = accuracy(run)
        res = RunResult(run, steps=30, final={"accuracy": value, "eval_loss": 1 - value})
        res.metrics = [{"step": 0, "name": "trivial_loss", "value": LN2},
                       {"step": 30, "name": "eval_loss", "value": 1 - value}]
        results.append(res)
    store = Store(folder)
    store.add_sweep(sweep.name, sweep.base, sweep.grid, sweep.text, sweep.runs)
    store.record(results)
    store.close()
    return folder


def _families(folder):
    lrs = {init: list(v) for init, v in file.parse(SWEEP).grid["lr"].items()}
    return _write(folder, SWEEP, lambda run: _accuracy(run.init, run.lr, run.seed, lrs))


def _judged(folder, pairs=()):
    (accuracy,) = [f for f in report.analyse(load(folder), pairs) if f.metric.name == "accuracy"]
    return accuracy


def _verdicts(f) -> dict[str, str]:
    return {c.text: c.verdict for c in f.claims}


# --- per-init lr grids -----------------------------------------------------------------------------

def test_each_init_takes_its_own_lr_list_in_grid_order():
    sweep = file.parse(SWEEP)
    points = [(r.init, r.seed, r.lr) for r in sweep.runs]
    want = [(init, seed, lr) for init, lrs in sweep.grid["lr"].items() for seed in (0, 1, 2) for lr in lrs]
    assert points == want  # init slowest, then seed, then the init's own lrs: the last axis fastest
    assert len(points) == 4 * 3 * 4 and ("pissa", 0, 6.25e-6) in points and ("a", 0, 6.25e-6) not in points
    assert sweep.compare == [("pissa", "olora")]


def test_an_init_family_keyed_axis_other_than_lr_expands_too():
    text = SWEEP.replace("  seed: [0, 1, 2]\n", "  rank:\n    a: [4]\n    b: [4, 8]\n    pissa: [8]\n    olora: [8]\n")
    runs = file.parse(text).runs
    assert sorted({(r.init, r.rank) for r in runs}) == [("a", 4), ("b", 4), ("b", 8), ("olora", 8), ("pissa", 8)]
    assert len(runs) == 5 * 4


BAD_MAPPINGS = {
    "a missing init": (SWEEP.replace("    olora: [1.0e-4, 4.0e-4, 1.6e-3, 6.4e-3]\n", ""),
                       r"grid: lr is keyed by init and must give a list for exactly each of init's values "
                       r"\(a, b, pissa, olora\): it has no list for olora$"),
    "an extra init": (SWEEP.replace("    olora:", "    olora: [1.0e-4]\n    gaussian:"),
                      r"it has a list for gaussian, which the init axis does not hold$"),
    "both": (SWEEP.replace("    olora:", "    orthogonal:"),
             r"it has no list for olora and a list for orthogonal, which the init axis does not hold"),
    "no init axis": (SWEEP.replace("  init: [a, b, pissa, olora]\n", "")
                     .replace("task: sst2-slice,", "task: sst2-slice, init: a,"),
                     r"grid: lr is keyed by init, but init is not a grid axis"),
    "init after it": (SWEEP.replace("  init: [a, b, pissa, olora]\n", "")
                      .replace("compare:", "  init: [a, b, pissa, olora]\ncompare:"),
                      r"grid: lr is keyed by init, so init must come before it"),
    "an empty list": (SWEEP.replace("pissa: [6.25e-6, 2.5e-5, 1.0e-4, 4.0e-4]", "pissa: []"),
                      r"grid: lr.pissa must be a non-empty list of values, got \[\]"),
    "a repeated lr": (SWEEP.replace("pissa: [6.25e-6, 2.5e-5,", "pissa: [2.5e-5, 2.5e-5,"),
                      r"grid: lr.pissa lists 2.5e-05 more than once"),
    "a compare family not in the sweep": (
        SWEEP.replace("[[pissa, olora]]", "[[pissa, gaussian]]"),
        r"compare: gaussian is not an init family of this sweep; its families: a, b, pissa, olora"),
    "a family compared with itself": (SWEEP.replace("[[pissa, olora]]", "[[pissa, pissa]]"),
                                      r"compare: pissa is compared with itself"),
    "a compare entry that is not a pair": (SWEEP.replace("[[pissa, olora]]", "[[pissa, olora, b]]"),
                                           r"compare: \['pissa', 'olora', 'b'\] is not a pair of families"),
}


@pytest.mark.parametrize("kind", list(BAD_MAPPINGS))
def test_bad_per_init_lists_and_compare_pairs_exit_2_naming_the_key_and_write_nothing(kind, tmp_path, capsys):
    text, message = BAD_MAPPINGS[kind]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lorainit: error: {path}: ") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


# --- findings per family ---------------------------------------------------------------------------

def test_each_family_has_its_optimal_lr_as_a_ratio_to_init_a_in_octaves(tmp_path):
    f = _judged(_families(tmp_path))
    assert list(f.inits) == ["a", "b", "pissa", "olora"]
    assert f.inits["pissa"].best_lr == 1e-4 and f.inits["a"].best_lr == 1.6e-3
    assert math.isclose(f.ratios["pissa"], 1 / 16) and math.isclose(f.ratios["b"], 1 / 4)
    assert math.isclose(f.ratios["olora"], 1.0) and math.isclose(f.lr_ratio, 4.0)  # A / B, as before
    lines = F.summary_lines(f)
    assert lines[2] == ("PiSSA: best lr 0.0001, accuracy 0.93 (seeds 0.928–0.932, 3 seeds); largest lr at which "
                        "every seed learned: 0.0004; optimal lr 0.0625x Init[A]'s (-4.0 octaves)")
    assert lines[1].endswith("optimal lr 0.25x Init[A]'s (-2.0 octaves)")
    assert "Optimal lr against Init[A]'s: PiSSA 0.0625x (-4.0 octaves), OLoRA 1x (+0.0 octaves)" in F.headline(f)


def test_init_a_is_judged_against_every_family_and_the_sweep_files_pair(tmp_path):
    f = _judged(_families(tmp_path))
    assert _verdicts(f) == {
        "Init[A]'s optimal lr > Init[B]'s": F.HOLDS,
        "Init[A]'s best accuracy > Init[B]'s": F.HOLDS,
        "Init[A]'s optimal lr > PiSSA's": F.HOLDS,          # 1.6e-3 against 1e-4, every seed
        "Init[A]'s best accuracy > PiSSA's": F.FAILS,       # the mirror case: every PiSSA seed beats every A seed
        "Init[A]'s optimal lr > OLoRA's": F.NOISE,          # OLoRA's seed 0 is best at 4e-4, the others at 1.6e-3
        "Init[A]'s best accuracy > OLoRA's": F.NOISE,       # 0.898-0.902 inside OLoRA's 0.89-0.91
        "PiSSA's optimal lr > OLoRA's": F.FAILS,            # compare: [[pissa, olora]]
        "PiSSA's best accuracy > OLoRA's": F.HOLDS,
    }
    (lr_claim,) = [c for c in f.claims if c.text == "Init[A]'s optimal lr > PiSSA's"]
    assert lr_claim.families == ("a", "pissa")
    assert lr_claim.detail == ("0.0016 against 0.0001 (+4.0 octaves); the seeds' own optima: A 0.0016, 0.0016, "
                               "0.0016, PiSSA 0.0001, 0.0001, 0.0001")
    (metric_claim,) = [c for c in f.claims if c.text == "Init[A]'s best accuracy > PiSSA's"]
    assert "(PiSSA better by 0.03)" in metric_claim.detail


def test_a_pair_from_the_command_line_is_judged_and_shown_in_the_table(tmp_path, capsys):
    folder = _families(tmp_path)
    assert cli.main(["report", str(folder), "--pair", "b:olora"]) == 0
    out = capsys.readouterr().out
    assert "Init[B]'s optimal lr > OLoRA's: WITHIN SEED NOISE" in out
    assert "Init[B]'s best accuracy > OLoRA's: DOES NOT HOLD" in out
    summary = (folder / "report" / "summary.md").read_text()
    assert "| PiSSA | 0.0001 | 0.93 (0.928–0.932) | 0.0004 | 0.0625x | -4.0 |" in summary
    assert "| Init[A] | 0.0016 | 0.9 (0.898–0.902) | 0.0064 | 1x | +0.0 |" in summary
    page = (folder / "report" / "index.html").read_text()
    assert "<th>lr / Init[A]&#x27;s</th>" in page and "<td>0.0625x</td>" in page


def test_a_pair_naming_a_family_the_sweep_lacks_exits_2(tmp_path, capsys):
    folder = _families(tmp_path)
    assert cli.main(["report", str(folder), "--pair", "pissa:gaussian"]) == 2
    err = capsys.readouterr().err
    assert "--pair pissa:gaussian: Gaussian (PEFT) not in the sweep" in err
    assert "its families: a, b, pissa, olora" in err
    assert cli.main(["report", str(folder), "--pair", "pissa"]) == 2
    assert "write X:Y" in capsys.readouterr().err
    assert not (folder / "report").exists()


def test_without_init_a_there_is_no_ratio_and_only_named_pairs_are_judged(tmp_path):
    text = (SWEEP.replace("init: [a, b, pissa, olora]", "init: [b, pissa]")
            .replace("    a: [1.0e-4, 4.0e-4, 1.6e-3, 6.4e-3]\n", "")
            .replace("    olora: [1.0e-4, 4.0e-4, 1.6e-3, 6.4e-3]\n", "").replace("[[pissa, olora]]", "[[pissa, b]]"))
    lrs = {init: list(v) for init, v in file.parse(text).grid["lr"].items()}
    f = _judged(_write(tmp_path, text, lambda run: _accuracy(run.init, run.lr, run.seed, lrs)))
    assert f.ratios == {} and f.lr_ratio is None
    assert any(n.startswith("the sweep holds no Init[A]: no family's optimal lr is given as a ratio") for n in f.notes)
    assert _verdicts(f) == {"PiSSA's optimal lr > Init[B]'s": F.FAILS, "PiSSA's best accuracy > Init[B]'s": F.HOLDS}
    assert not any("x Init[A]'s" in line for line in F.summary_lines(f))  # no family line gives a ratio


def test_a_named_pair_a_group_lacks_is_said_in_its_notes(tmp_path):
    # rank keyed by init: Init[A] trains at rank 4 only, PiSSA and OLoRA at rank 8 only
    text = SWEEP.replace("  seed: [0, 1, 2]\n", "  seed: [0, 1, 2]\n  rank:\n    a: [4]\n    b: [4, 8]\n"
                                                 "    pissa: [8]\n    olora: [8]\n")
    lrs = {init: list(v) for init, v in file.parse(text).grid["lr"].items()}
    sweep = load(_write(tmp_path, text, lambda run: _accuracy(run.init, run.lr, run.seed, lrs)))
    four, eight = [[f for f in report.analyse(sweep) if f.group is g and f.metric.name == "accuracy"][0]
                   for g in sweep.groups]
    assert (four.group.axes, eight.group.axes) == ({"rank": 4}, {"rank": 8})
    assert "this group does not hold both families, so not judged: PiSSA against OLoRA" in four.notes
    assert "PiSSA's optimal lr > OLoRA's" in _verdicts(eight)  # compare: [[pissa, olora]], judged where both are
    assert any(n.startswith("the sweep holds no Init[A]") for n in eight.notes) and eight.ratios == {}


INIT_ARGS = """\
name: ab
base: {task: sst2-slice, max_steps: 30, max_train_samples: 400, max_eval_samples: 200}
grid:
  init: [a, ab]
  init_args:
    a: [null]
    ab: [null, {reset: false}]
  lr: [1.0e-4, 4.0e-4, 1.6e-3]
  seed: [0, 1]
"""


def test_an_init_with_arguments_is_a_family_of_its_own(tmp_path):
    best = {"a": 1.6e-3, "ab": 4.0e-4, 'ab{"reset":false}': 1.0e-4}  # where each family peaks

    def accuracy(run):
        family = families.key(run.to_dict())
        return 0.9 - 0.05 * abs(math.log2(run.lr / best[family])) / 2 + 0.001 * run.seed

    sweep = load(_write(tmp_path, INIT_ARGS, accuracy))
    assert len(sweep.groups) == 1  # init_args places a run in the picture, not in a group of its own
    f = _judged(tmp_path)
    assert list(f.inits) == ["a", "ab", 'ab{"reset":false}']
    assert math.isclose(f.ratios['ab{"reset":false}'], 1 / 16) and math.isclose(f.ratios["ab"], 1 / 4)
    lines = F.summary_lines(f)
    assert lines[1].startswith("Init[AB]: best lr 0.0004") and lines[1].endswith("(-2.0 octaves)")
    assert lines[2].startswith("Init[AB] (reset: false): best lr 0.0001")
    assert _verdicts(f)["Init[A]'s optimal lr > Init[AB] (reset: false)'s"] == F.HOLDS


def test_families_are_named_ordered_and_paired_as_written():
    assert [families.name(k) for k in ("a", "b", "pissa_niter_4", "gaussian", "olora", "someinit")] == [
        "Init[A]", "Init[B]", "PiSSA (niter 4)", "Gaussian (PEFT)", "OLoRA", "someinit"]
    assert families.key({"init": "ab", "init_args": '{"reset": false}'}) == 'ab{"reset":false}'
    assert families.key({"init": "ab"}) == families.key({"init": "ab", "init_args": None}) == "ab"
    assert families.parse_pair('ab:ab{"reset": false}', "--pair") == ("ab", 'ab{"reset":false}')
    keys = ["olora", "someinit", "pissa_niter_16", "b", "pissa_niter_4", 'ab{"reset":false}', "pissa", "ab", "a"]
    assert sorted(keys, key=families.order) == [
        "a", "b", "ab", 'ab{"reset":false}', "pissa", "pissa_niter_4", "pissa_niter_16", "olora", "someinit"]


# --- figures ---------------------------------------------------------------------------------------

EIGHT = ["a", "b", 'ab{"reset":false}', "gaussian", "orthogonal", "pissa", "pissa_niter_4", "olora"]


def _group_of(keys) -> Group:
    runs = []
    for family in keys:
        init, args = families.split(family)
        for lr in (1e-4, 1e-3):
            config = {"task": "sst2", "init": init, "init_args": families.canonical(args), "lr": lr, "seed": 0}
            series = {"train_loss": [(s, 1.0 / s) for s in range(1, 11)]}
            runs.append(Run(f"{family}-{lr}", config, "done", 10, None, {"accuracy": 0.8}, None, series))
    return Group("sst2", {}, runs, "sst2")


def test_eight_families_get_eight_colours_and_the_paper_inits_keep_theirs():
    style = figures.styles(_group_of(EIGHT))
    colours = [c for c, _ in style.values()]
    assert len(set(colours)) == 8 and "red" not in colours and "tab:red" not in colours
    assert style["a"][0] == "tab:blue" and style["b"][0] == "tab:orange"


def test_training_curves_of_eight_families_wrap_into_rows(tmp_path):
    from PIL import Image

    (png, _) = figures.curves(_group_of(EIGHT), ["accuracy"], tmp_path, "curves")
    width, height = Image.open(png).size
    # four families a row, two rows: not one strip of eight panels (which would be ~13:1)
    assert 2.5 < width / height < 4


def test_an_optimum_at_the_edge_of_a_familys_grid_is_named(tmp_path):
    """PiSSA is best at 1e-4 of its list, inside; a curve rising to its last lr is named."""
    text = SWEEP.replace("pissa: [6.25e-6, 2.5e-5, 1.0e-4, 4.0e-4]", "pissa: [6.25e-6, 2.5e-5, 1.0e-4]")
    lrs = {init: list(v) for init, v in file.parse(text).grid["lr"].items()}
    f = _judged(_write(tmp_path / "edge", text, lambda run: _accuracy(run.init, run.lr, run.seed, lrs)))
    assert "PiSSA's best lr 0.0001 is the largest it was run at: its optimum may lie above its grid" in f.notes
    assert not any(n.startswith(("Init[A]'s best lr", "OLoRA's best lr", "Init[B]'s best lr")) for n in f.notes)
