"""The toy grid trained vectorised (one stack, closed-form gradients, one Adam) against a plain
`torch.optim.Adam` loop over the same configurations one at a time.

Prints both wall times and their ratio, and the largest per-step loss difference between the two
at learning rates below each (init, width)'s optimum. Both sides get the same prebuilt problems
(data, frozen network, teacher), so only training is timed.

    .venv/bin/python benchmarks/toy_vectorised.py [--widths 64,256] [--steps 200] [--seeds 5]
"""

import argparse
import time

import numpy as np
import torch

from lorainit.theory import toy, toy_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="64,256")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lrs", default="-12:0", help="half-octave grid between these log2 values")
    args = parser.parse_args()
    lo, hi = (float(x) for x in args.lrs.split(":"))
    cfg = toy.ToyConfig(widths=tuple(int(w) for w in args.widths.split(",")), lrs=toy.lr_grid(lo, hi),
                        seeds=args.seeds, steps=args.steps)
    n_configs = cfg.seeds * len(cfg.inits) * len(cfg.lrs)
    print(f"grid: widths {list(cfg.widths)}, {len(cfg.lrs)} lrs x {len(cfg.inits)} inits x {cfg.seeds} seeds "
          f"= {n_configs} configurations per width, {cfg.steps} steps of batch {cfg.batch_size}; "
          f"torch threads {torch.get_num_threads()}")
    problems = {w: [toy.make_problem(w, s, cfg) for s in range(cfg.seeds)] for w in cfg.widths}

    t = time.perf_counter()
    results = [toy.train_width(w, cfg, problems=problems[w]) for w in cfg.widths]
    t_vec = time.perf_counter() - t
    summary = toy_report.summarize(results, cfg, bootstrap=0)

    t = time.perf_counter()
    loop = {}
    for w in cfg.widths:
        for s in range(cfg.seeds):
            for i, init in enumerate(cfg.inits):
                for l, lr in enumerate(cfg.lrs):
                    loop[w, s, i, l] = toy.train_one(w, cfg, s, init, lr, problem=problems[w][s])
    t_loop = time.perf_counter() - t

    log_lrs = np.log2(np.array(cfg.lrs))
    worst, compared = 0.0, 0
    for r in results:
        j = cfg.widths.index(r.width)
        for i, init in enumerate(cfg.inits):
            below = np.nonzero(log_lrs < summary["per_width"][init]["log2_opt_lr_grid"][j])[0]
            for l in below:
                for s in range(cfg.seeds):
                    diff = (r.losses[:, s, i, l] - loop[r.width, s, i, l]).abs().max().item()
                    worst, compared = max(worst, diff), compared + 1
    print(f"vectorised: {t_vec:8.2f} s")
    print(f"Adam loop:  {t_loop:8.2f} s   ({n_configs * len(cfg.widths)} runs one by one)")
    print(f"speed-up:   {t_loop / t_vec:8.1f}x")
    print(f"max |loss difference| per step, {compared} configurations below the optimum: {worst:.2e}")


if __name__ == "__main__":
    main()
