"""`lorainit report`: findings from small stores with known numbers, partial stores, the page."""

import math
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest

from conftest import skip_or_fail
from lorainit import report
from lorainit.config import RunConfig
from lorainit.report import findings as F
from lorainit.report.sweep import load
from lorainit.sweeps.store import Store
from lorainit.train import RunResult

LRS = (1e-4, 3e-4, 1e-3, 3e-3)


def _store(folder, cells, task="sst2", metric="accuracy", grid=None, extra=None):
    """A store of finished runs: cells maps (init, lr, seed) -> final metric, 'diverged', 'failed'
    or 'pending'. Each run gets a short training curve and probe rows at steps 1 and 10."""
    runs, results = [], []
    for (init, lr, seed), value in cells.items():
        run = RunConfig.from_dict({"task": task, "init": init, "lr": lr, "seed": seed, "max_steps": 10} | (extra or {}))
        runs.append(run)
        if value == "pending":
            continue
        res = RunResult(run, steps=10)
        res.metrics = [{"step": s, "name": "train_loss", "value": 1.0 / s} for s in range(1, 11)]
        for step in (1, 10):
            for layer in ("l0", "l1"):
                res.metrics += [{"step": step, "name": f"probe/{layer}/z_a_rms", "value": lr * step * (2 if init == "a" else 1)},
                                {"step": step, "name": f"probe/{layer}/lora_out_rms", "value": lr * step}]
        if value == "diverged":
            res.status, res.diverged_step = "diverged", 4
        elif value == "failed":
            res.status, res.error = "failed", "boom"
        else:
            res.final = {metric: value}
        results.append(res)
    store = Store(folder)
    store.add_sweep("fixture", {"task": task}, grid or {"init": ["a", "b"], "lr": list(LRS)}, "", runs)
    store.record(results)
    store.close()
    return folder


def _finding(folder, metric=None):
    sweep = load(folder)
    group = sweep.groups[0]
    metric = metric or group.metrics[0]
    return F.judge(group, metric)


def _grid(a, b, seeds=(0, 1, 2), jitter=0.002):
    """Accuracy per lr for each init, each seed jittered by +-jitter (so the spread is 2 x jitter)."""
    cells = {}
    for init, curve in (("a", a), ("b", b)):
        for lr, acc in zip(LRS, curve):
            for i, seed in enumerate(seeds):
                cells[(init, lr, seed)] = acc if isinstance(acc, str) else acc + jitter * (i - 1)
    return cells


def test_init_a_wins_both_claims(tmp_path):
    folder = _store(tmp_path, _grid(a=(0.80, 0.85, 0.90, 0.88), b=(0.82, 0.86, 0.84, 0.80)))
    f = _finding(folder)
    assert f.inits["a"].best_lr == 1e-3 and f.inits["b"].best_lr == 3e-4
    assert math.isclose(f.inits["a"].best_mean, 0.90) and math.isclose(f.inits["a"].best_min, 0.898)
    assert math.isclose(f.lr_ratio, 1e-3 / 3e-4)
    assert [c.verdict for c in f.claims] == [F.HOLDS, F.HOLDS]
    assert f.inits["a"].largest_learned_lr == 3e-3


def test_init_b_wins_and_the_report_says_so(tmp_path):
    folder = _store(tmp_path, _grid(a=(0.80, 0.84, 0.83, 0.80), b=(0.82, 0.86, 0.91, 0.85)))
    f = _finding(folder)
    assert f.inits["a"].best_lr == 3e-4 and f.inits["b"].best_lr == 1e-3
    assert [c.verdict for c in f.claims] == [F.FAILS, F.FAILS]
    assert any("does not hold".upper() in line for line in F.summary_lines(f))


def test_a_gap_smaller_than_the_seed_spread_is_within_noise(tmp_path):
    # A beats B by 0.004 at the best lr, but the seeds spread by 0.02
    folder = _store(tmp_path, _grid(a=(0.80, 0.85, 0.904, 0.88), b=(0.82, 0.86, 0.90, 0.80), jitter=0.01))
    f = _finding(folder)
    assert f.claims[1].verdict == F.NOISE


def test_diverged_runs_are_not_candidates_and_bound_the_learned_lr(tmp_path):
    # Init[B] would be best at 3e-3, but one of its seeds diverged there
    cells = _grid(a=(0.80, 0.85, 0.90, "diverged"), b=(0.82, 0.86, 0.84, 0.95))
    cells[("b", 3e-3, 1)] = "diverged"
    folder = _store(tmp_path, cells)
    f = _finding(folder)
    assert f.inits["a"].largest_learned_lr == 1e-3 and f.inits["b"].largest_learned_lr == 1e-3
    assert f.inits["b"].best_lr == 3e-4  # not 3e-3
    assert any("diverged" in n and "3e-3" in n.replace("0.003", "3e-3") for n in f.notes)
    built = report.build(folder)
    html = built.index.read_text()
    assert "diverged" in html and html.count("<img") >= 3


def test_a_single_seed_says_the_spread_is_unknown(tmp_path):
    folder = _store(tmp_path, _grid(a=(0.80, 0.85, 0.90, 0.88), b=(0.82, 0.86, 0.84, 0.80), seeds=(0,)))
    f = _finding(folder)
    # one seed: the lr claim holds on a strict >, the metric gap (0.04) is no evidence either way
    assert [c.verdict for c in f.claims] == [F.HOLDS, F.UNKNOWN]
    assert all("spread is unknown" in c.detail for c in f.claims)
    assert "(one seed)" in F.summary_lines(f)[0]


def test_lower_is_better_for_a_decoder_metric(tmp_path):
    ppl = {("a", lr, s): p + 0.1 * s for s in (0, 1) for lr, p in zip(LRS, (50.0, 30.0, 25.0, 40.0))}
    ppl |= {("b", lr, s): p + 0.1 * s for s in (0, 1) for lr, p in zip(LRS, (45.0, 28.0, 35.0, 60.0))}
    folder = _store(tmp_path, ppl, task="wikitext2", metric="perplexity")
    sweep = load(folder)
    (perplexity,) = [m for m in sweep.groups[0].metrics if m.name == "perplexity"]
    f = F.judge(sweep.groups[0], perplexity)
    assert f.inits["a"].best_lr == 1e-3 and math.isclose(f.inits["a"].best_mean, 25.05)
    assert f.inits["b"].best_lr == 3e-4
    assert [c.verdict for c in f.claims] == [F.HOLDS, F.HOLDS]  # 25.05 < 28.05: A is better


def test_a_metric_that_ties_at_every_lr_has_no_optimum(tmp_path):
    # a small model's GSM8K exact match: 0 everywhere for Init[A]
    cells = {("a", lr, 0): 0.0 for lr in LRS} | {("b", lr, 0): v for lr, v in zip(LRS, (0.0625, 0.0, 0.0, 0.0))}
    folder = _store(tmp_path, cells, task="gsm8k", metric="exact_match")
    sweep = load(folder)
    (em,) = [m for m in sweep.groups[0].metrics if m.name == "exact_match"]
    f = F.judge(sweep.groups[0], em)
    assert f.inits["a"].best_lr is None and f.inits["a"].tie == 0.0
    assert f.inits["b"].best_lr == 1e-4
    assert f.claims == [] and any("no optimum" in n for n in f.notes)
    assert "Init[A]: every lr gives exact_match 0: no optimum" in F.summary_lines(f)


def test_further_grid_axes_make_groups_and_heatmaps(tmp_path):
    cells = _grid(a=(0.80, 0.85, 0.90, 0.88), b=(0.82, 0.86, 0.84, 0.80), seeds=(0,))
    runs = {}
    for rank in (4, 8):
        runs |= {(k, rank): v for k, v in cells.items()}
    store = Store(tmp_path)
    configs, results = [], []
    for ((init, lr, seed), rank), value in runs.items():
        run = RunConfig.from_dict({"init": init, "lr": lr, "seed": seed, "rank": rank, "max_steps": 10})
        configs.append(run)
        results.append(RunResult(run, steps=10, final={"accuracy": value - (0.01 if rank == 4 else 0)}))
    store.add_sweep("ranks", {}, {"rank": [4, 8], "init": ["a", "b"], "lr": list(LRS)}, "", configs)
    store.record(results)
    store.close()
    sweep = load(tmp_path)
    assert [g.axes for g in sweep.groups] == [{"rank": 4}, {"rank": 8}]
    built = report.build(tmp_path)
    assert (tmp_path / "report" / "heatmap_sst2_rank-4_accuracy.png").is_file()
    assert (tmp_path / "report" / "heatmap_sst2_rank-8_accuracy.svg").is_file()
    assert "sst2 (rank=4)" in built.text()


def test_an_empty_store_reports_that_nothing_is_there(tmp_path):
    Store(tmp_path).close()
    done = subprocess.run([sys.executable, "-m", "lorainit.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "no runs yet" in done.stdout
    assert "no runs yet" in (tmp_path / "report" / "index.html").read_text()


def test_pending_and_failed_runs_are_counted_and_shown(tmp_path):
    cells = _grid(a=(0.80, 0.85, 0.90, 0.88), b=(0.82, 0.86, 0.84, "failed"), seeds=(0,))
    cells[("a", 3e-3, 0)] = "pending"
    folder = _store(tmp_path, cells)
    built = report.build(folder)
    text = built.text()
    assert "1 not finished" in text and "1 failed" in text
    f = built.findings[0]
    assert f.inits["a"].largest_learned_lr == 1e-3  # 3e-3 is unknown
    assert any("not finished" in n for n in f.notes)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "not finished" in summary and "failed" in summary


def test_the_report_reads_a_store_that_is_being_written(tmp_path):
    folder = _store(tmp_path, _grid(a=(0.80, 0.85, 0.90, 0.88), b=(0.82, 0.86, 0.84, 0.80), seeds=(0,)))
    writer = sqlite3.connect(folder / "store.sqlite")
    writer.execute("BEGIN IMMEDIATE")  # a sweep in the middle of recording a pack
    writer.execute("UPDATE runs SET status = 'running'")
    try:
        built = report.build(folder)
        assert built.sweep.count("done") == 8  # the last committed state
    finally:
        writer.rollback()
        writer.close()


def test_a_folder_without_a_store_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lorainit.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "no sweep store here" in done.stderr
    assert not (tmp_path / "report").exists()


def test_a_folder_of_run_folders_reports_as_the_sweep_they_make(tmp_path):
    """Each run in a store of its own (as lorainit.hf.ProbeCallback writes them), under one parent:
    the same runs, groups and findings as one store holding them all."""
    cells = _grid(a=(0.80, 0.85, 0.90, 0.88), b=(0.82, 0.86, 0.84, "diverged"), seeds=(0, 1))
    whole = load(_store(tmp_path / "whole", cells))
    for cell, value in cells.items():
        _store(tmp_path / "parts" / f"{cell[0]}-{cell[1]:g}" / f"seed{cell[2]}", {cell: value})
    parts = load(tmp_path / "parts")
    assert (parts.name, len(parts.runs), len(parts.groups)) == ("parts", 16, 1)
    assert sorted(r.run_id for r in parts.runs) == sorted(r.run_id for r in whole.runs)
    assert [F.summary_lines(f) for f in report.analyse(parts)] == [F.summary_lines(f) for f in report.analyse(whole)]
    assert report.analyse(parts)[0].claims[0].verdict == F.HOLDS


def test_compare_puts_two_sweeps_side_by_side(tmp_path):
    one = _store(tmp_path / "cpu", _grid(a=(0.80, 0.85, 0.90, 0.88), b=(0.82, 0.86, 0.84, 0.80), seeds=(0,)))
    two = _store(tmp_path / "full", _grid(a=(0.70, 0.75, 0.80, 0.78), b=(0.72, 0.79, 0.74, 0.70), seeds=(0,)))
    done = subprocess.run([sys.executable, "-m", "lorainit.cli", "report", str(one), "--compare", str(two),
                           "--out", str(tmp_path / "both")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "both" / "index.html").read_text()
    assert str(one) in page and str(two) in page and page.count("<img") == 2


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_page_renders_every_image_in_a_real_browser(tmp_path):
    """Headless Chromium opens the page (no network) and screenshots it; every image must have
    loaded with its real size and the screenshot must not be blank."""
    browser = _chromium()
    if browser is None:
        skip_or_fail("no Chromium found (Debian: apt-get install chromium)")
    cells = _grid(a=(0.80, 0.85, 0.90, "diverged"), b=(0.82, 0.86, 0.84, 0.80))
    folder = _store(tmp_path / "sweep", cells)
    built = report.build(folder)
    # a probe page: the report, plus a line that writes each image's loaded size into the title
    probe = tmp_path / "probe.html"
    # and where the first finding (the answer and its verdicts) ends, against the window's height
    probe.write_text(built.index.read_text().replace(
        "</body>", "<script>document.title = Array.from(document.images).map("
                   "i => i.complete + ':' + i.naturalWidth + 'x' + i.naturalHeight).join(' ') + ' finding:' + "
                   "Math.ceil(document.querySelector('.finding').getBoundingClientRect().bottom) + ':' + "
                   "window.innerHeight;</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--window-size=1280,800", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    *title, layout = re.search(r"<title>(.*?)</title>", dom.stdout, re.S).group(1).split()
    bottom, height = map(int, layout.removeprefix("finding:").split(":"))
    assert 500 < height <= 800 and 0 < bottom <= height  # a 1280x800 window's viewport shows the findings unscrolled
    assert len(title) == built.index.read_text().count("<img") >= 4
    for entry in title:
        loaded, size = entry.split(":")
        width, height = map(int, size.split("x"))
        assert loaded == "true" and width > 100 and height > 100, entry
    shot = tmp_path / "page.png"
    subprocess.run([browser, *flags, "--window-size=1280,4000", f"--screenshot={shot}", built.index.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    lo, hi = pixels.getextrema()
    assert hi - lo > 100  # text and plots, not a blank page
    histogram = pixels.histogram()
    assert sum(histogram[:200]) > 0.01 * sum(histogram)  # a real share of drawn pixels
