"""The data-driven inits' statistics pass in a pack, against the same passes run one by one.

LoRA-GA, LoRA-One, EVA and CorDA read statistics of the run's own rows before training
(`engine/statistics.py`). A sweep's pack holds many such runs that share a seed (one family at
several learning rates, several families): they read the same rows through the same head, so the
pack makes one pass per seed and kind of pass, where the runs alone make one each. This times the
pass (`PackTrainer.statistics_seconds`, the gathering alone, not the model's load nor the factors'
SVDs) for one pack of every family x seed x lr, and for each of those runs trained alone, in one
process, round after round; it prints the medians, their ratio and the batches each forwards.

    .venv/bin/python benchmarks/statistics_pass.py [--lrs 3] [--seeds 2] [--rounds 3]

MiniLM on SST-2 (the shipped slice), batch 8, rank 8, alpha 8, query and value, fp32 on the CPU,
every family at its defaults (LoRA-GA and LoRA-One 8 batches, CorDA 32, EVA until it settles).
"""

from __future__ import annotations

import argparse
import statistics as stats
import time

import torch
from _common import cpu_model, set_environment

FAMILIES = ("lora_ga", "lora_one", "eva", "corda")


def runs(lrs: int, seeds: int):
    from lorainit.config import RunConfig

    return [RunConfig.from_dict(dict(task="sst2-slice", init=init, seed=seed, lr=1e-4 * 2 ** j, rank=8, alpha=8,
                                     dropout=0.1, batch_size=8, max_steps=1, max_seq_len=64, save_adapters=False))
            for init in FAMILIES for seed in range(seeds) for j in range(lrs)]


def timed(configs) -> tuple[float, int]:
    """The statistics pass's seconds and batches when `configs` are one pack."""
    from lorainit.engine import families
    from lorainit.train import PackTrainer

    trainer = PackTrainer(configs, show_progress=False, factor_cache=families.FactorCache(None))
    return trainer.statistics_seconds, trainer.statistics_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=int, default=3, help="learning rates per family and seed")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per family")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, pack then runs alone")
    args = parser.parse_args()
    set_environment()
    configs = runs(args.lrs, args.seeds)
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; {len(configs)} runs "
          f"({len(FAMILIES)} families x {args.seeds} seeds x {args.lrs} lrs), {args.rounds} rounds")
    packed, alone = [], []
    for r in range(args.rounds):
        start = time.perf_counter()
        seconds, pack_batches = timed(configs)
        packed.append(seconds)
        each = [timed([c]) for c in configs]
        alone.append(sum(s for s, _ in each))
        alone_batches = sum(b for _, b in each)
        print(f"round {r + 1}: pack {packed[-1]:.2f} s, one by one {alone[-1]:.2f} s "
              f"({time.perf_counter() - start:.0f} s with loading)")
    p, a = stats.median(packed), stats.median(alone)
    print(f"\n| statistics pass | batches forwarded | median s | ratio |")
    print(f"|---|---|---|---|")
    print(f"| one pack of {len(configs)} runs | {pack_batches} | {p:.2f} | 1.00 |")
    print(f"| the {len(configs)} runs one by one | {alone_batches} | {a:.2f} | {a / p:.2f} |")


if __name__ == "__main__":
    main()
