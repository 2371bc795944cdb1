"""One epoch over the first 5,000 SST-2 training rows, Init[A] and Init[B] in one pack, on MiniLM.

Prints each run's dev accuracy (all 872 rows of the GLUE validation set) and the wall time.

    .venv/bin/python benchmarks/sst2_one_epoch.py [--lrs 3.2e-4,6.4e-4] [--rows 5000]
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LORAINIT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

from lorainit.config import RunConfig  # noqa: E402
from lorainit.train import train_pack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="3.2e-4,6.4e-4")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs = [RunConfig.from_dict(dict(model="minilm", task="sst2", init=init, lr=float(lr), seed=args.seed, epochs=1,
                                     batch_size=4, max_train_samples=args.rows, dropout=0.1, rank=8, alpha=16))
            for lr in args.lrs.split(",") for init in ("a", "b")]
    start = time.perf_counter()
    results = train_pack(runs)
    print(f"{len(runs)} runs, 1 epoch of {args.rows} rows, batch 4, one pack: {time.perf_counter() - start:.0f} s")
    print(f"{'init':<6}{'lr':>10}{'steps':>7}{'dev accuracy':>14}{'best':>8}{'status':>10}")
    for r in results:
        print(f"{r.config.init:<6}{r.config.lr:>10.2e}{r.steps:>7}{r.final.get('accuracy', float('nan')):>14.4f}"
              f"{r.best.get('accuracy', float('nan')):>8.4f}{r.status:>10}")


if __name__ == "__main__":
    main()
