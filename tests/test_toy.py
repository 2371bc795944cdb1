"""The teacher-student toy: the vectorised trainer equals a plain Adam loop; outputs and errors."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lorainit.theory import toy


@pytest.mark.parametrize("batch_size", [1000, 50])
def test_vectorised_equals_adam_loop(batch_size):
    cfg = toy.ToyConfig(widths=(24,), lrs=(1e-3, 2e-2, 3e-1), seeds=2, steps=25, batch_size=batch_size,
                        n_train=200, n_test=20)
    result = toy.train_width(24, cfg)
    for s in range(cfg.seeds):
        for i, init in enumerate(cfg.inits):
            for l, lr in enumerate(cfg.lrs):
                ref = toy.train_one(24, cfg, s, init, lr)
                diff = (result.losses[:, s, i, l] - ref).abs().max().item()
                # below the optimum float rounding stays small; near the edge of stability the
                # dynamics amplify it (about 1e-4 after 25 steps at lr 0.3), so the bound is looser
                assert diff <= (1e-5 if lr < 0.1 else 1e-3), (s, init, lr, diff)
    # the runs learned something: the best final loss is well below the initial one
    assert result.losses[-1].min() < 0.5 * result.losses[0].min()


def test_teacher_moves_the_output_by_rms_one():
    cfg = toy.ToyConfig()
    p = toy.make_problem(48, 3, cfg)
    base_out = torch.relu(p.h)
    assert (p.y - base_out).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-5)
    assert p.z.shape == (48, cfg.n_train) and p.z_test.shape == (48, cfg.n_test)


def test_a_diverging_lr_leaves_the_others_untouched(measured):
    small = toy.ToyConfig(widths=(32,), lrs=(1e-3, 1e-2), seeds=2, steps=30)
    big = toy.ToyConfig(widths=(32,), lrs=(1e-3, 1e-2, 1e4), seeds=2, steps=30)
    a, b = toy.train_width(32, small), toy.train_width(32, big)
    # the same configurations as slices of a stack of 2 lrs and of 3: batched matmuls over the
    # stack, fp32 rounding per slice (eps 1.2e-7) over 30 steps
    assert measured("toy_stack", a.losses, b.losses[..., :2]) <= 1e-5
    assert (b.diverged_step[..., 2] > 0).all() and (b.diverged_step[..., :2] == -1).all()
    assert torch.isinf(b.train_loss[..., 2]).all()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lorainit.cli", "toy", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--widths", "0,64"], "--widths must be positive integers"),
    (["--widths", ","], "--widths is empty"),
    (["--lrs", "1e-3,0"], "--lrs must be positive numbers"),
    (["--lrs", "fast"], "--lrs: 'fast' is not a number"),
    (["--inits", "a,c"], "unknown init 'c'"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, args, needle):
    proc = _cli(*args, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_small_run_writes_results_slopes_and_figures(tmp_path):
    proc = _cli("--widths", "16,32,64", "--lrs", "2^-8,2^-6,2^-4,2^-2", "--seeds", "2", "--steps", "40",
                "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "toy_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 4 * 2  # inits x widths x lrs x seeds
    for column in ("init", "width", "lr", "seed", "train_loss", "test_loss", "diverged", "stable",
                   "z_a_rms", "z_b_rms", "z_b_peak"):
        assert column in rows[0]
    slopes = json.loads((tmp_path / "slopes.json").read_text())["slopes"]
    for init in ("a", "b"):
        for key in ("optimal_lr", "largest_stable_lr", "z_a_at_optimum"):
            assert len(slopes[init][key]["ci95"]) == 2
    assert slopes["a"]["largest_stable_lr"]["predicted"] == -0.5
    assert slopes["b"]["largest_stable_lr"]["predicted"] == -1.0
    with open(tmp_path / "optimal_lr.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 3
    for name in ("loss_heatmaps.png", "lr_vs_width.png", "features.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "z_a_at_optimum" in proc.stdout
    # the same folder through `lorainit report`: the slopes as findings, the figures on one page
    report = subprocess.run([sys.executable, "-m", "lorainit.cli", "report", str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("<img") == 3
    s = slopes["a"]["largest_stable_lr"]
    assert f"Init[A] largest stable lr: slope {s['slope']:+.2f} [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}]" in report.stdout
    assert "theory -0.50" in report.stdout


def test_bisected_stability_edge_is_stable_and_an_eighth_octave_above_is_not():
    from lorainit.theory import toy_edge

    cfg = toy.ToyConfig(widths=(16, 32), lrs=tuple(2.0 ** (k / 2) for k in range(-12, 1)), seeds=2, steps=60)
    results = [toy.train_width(w, cfg) for w in cfg.widths]
    horizons = (10, 60)
    edges = toy_edge.bisect(results, cfg, horizons, rounds=2)
    log_lrs = np.log2(np.array(cfg.lrs))
    for r, edge in zip(results, edges["log2_edge"]):
        assert np.isfinite(edge).sum() >= edge.size // 2  # most edges lie inside the grid
        # the edge is on the 1/8-octave lattice between two grid points
        found = edge[np.isfinite(edge)]
        assert np.allclose(found * 8, np.round(found * 8)) and found.min() >= log_lrs[0]
        # retrained alone: stable at the edge, unstable an eighth of an octave above it
        for shift, expect in ((0.0, True), (0.125, False)):
            lrs = torch.tensor(2.0 ** np.where(np.isfinite(edge), edge + shift, log_lrs[0]))
            again = toy.train_width(r.width, cfg, lrs=lrs)
            for h, t in enumerate(horizons):
                ok = toy_edge.stable_at(again, cfg, t)[:, :, h]
                assert (ok[np.isfinite(edge[:, :, h])] == expect).all(), (r.width, t, shift)
    slopes = toy_edge.slopes(edges, cfg, bootstrap=50)
    assert set(slopes["a"]) == {"10", "60"} and slopes["b"]["60"]["predicted"] == -1.0


def test_lrs_given_from_the_top_down_are_the_same_grid_and_find_every_edge():
    import warnings

    from lorainit.cli import _numbers
    from lorainit.theory import toy_edge, toy_report

    typed = "2^2,2^1.5,2^1,2^0.5,2^0,2^-0.5,2^-1,2^-1.5,2^-2,2^-3,2^-3.5,2^-4,2^-4,2^-6"  # as a person types it
    down = _numbers(typed, float, "--lrs")
    assert down[10] == 2.0 ** -3.5  # half-octave exponents parse
    up = tuple(sorted(set(down)))
    cfg = toy.ToyConfig(widths=(8, 16), lrs=down, seeds=2, steps=20)
    assert cfg.lrs == up and cfg == toy.ToyConfig(widths=(8, 16), lrs=up, seeds=2, steps=20)  # sorted, 2^-4 once
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no all-NaN slices, no empty means
        results = [toy.train_width(w, cfg) for w in cfg.widths]
        summary = toy_report.summarize(results, cfg, bootstrap=50)
        edges = toy_edge.bisect(results, cfg, toy_edge.horizons_for(cfg), rounds=1)
        slopes = toy_edge.slopes(edges, cfg, bootstrap=50)
    # read from the bottom, the grid brackets every stability edge: none censored, every slope a number
    for init in cfg.inits:
        assert np.isfinite(summary["slopes"][init]["largest_stable_lr"]["slope"])
        for s in slopes[init].values():
            assert s["censored"] == 0 and np.isfinite(s["slope"])
