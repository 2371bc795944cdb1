"""What the per-run correction of a base-rewriting init family costs in a pack.

A run of PiSSA, OLoRA or Init[AB] (with reset) keeps its initial factors (A0, B0) frozen and
subtracts s B0 A0 x in every adapted layer: one more rank-r path, for the corrected runs only.
This trains the same pack three ways, in one process, interleaved round by round: every run
Init[A] (no correction), half the runs PiSSA, every run PiSSA. It prints the median time of a
training step (forward, backward, AdamW) for each, their ratios to the uncorrected pack, and the
memory the corrections hold against the pack's trainable state (factors, gradients, AdamW's two
moments).

    .venv/bin/python benchmarks/correction_cost.py [--runs 14] [--steps 12] [--rounds 3]

MiniLM on SST-2 (the shipped slice), batch 8 per run, rank 8, alpha 8, LoRA dropout 0.1 on query
and value, fp32 on the CPU. The first step of each pack is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import cpu_model, set_environment

MIXES = {"no correction": ("a", "a"), "half corrected": ("a", "pissa"), "all corrected": ("pissa", "pissa")}


def pack(runs: int, inits: tuple[str, str], steps: int):
    from lorainit.config import RunConfig
    from lorainit.train import PackTrainer

    configs = [RunConfig.from_dict(dict(task="sst2-slice", init=inits[k % 2], seed=k % 2, lr=1e-4, rank=8, alpha=8,
                                        dropout=0.1, batch_size=8, max_steps=steps + 1, max_seq_len=64,
                                        save_adapters=False)) for k in range(runs)]
    return PackTrainer(configs, show_progress=False)


def step_times(trainer, steps: int) -> list[float]:
    trainer.train_step(log=False)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(log=False)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=14, help="runs per pack")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per pack and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the three packs interleaved")
    args = parser.parse_args()
    set_environment()
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; {args.runs} runs per pack, "
          f"{args.steps} steps x {args.rounds} rounds")
    times = {name: [] for name in MIXES}
    memory = {}
    for _ in range(args.rounds):
        for name, inits in MIXES.items():
            trainer = pack(args.runs, inits, args.steps)
            times[name] += step_times(trainer, args.steps)
            trainable = sum(p.numel() * p.element_size() for p in trainer.pack.parameters())
            corrections = sum(t.numel() * t.element_size() for t in trainer.pack.initial_factors().values())
            memory[name] = (trainable, corrections, sum(trainer.pack.corrected))
            del trainer
    base = statistics.median(times["no correction"])
    print(f"{'pack':16} {'corrected':>9} {'step ms':>8} {'vs none':>8} {'corrections MiB':>16} {'of LoRA state':>14}")
    for name in MIXES:
        trainable, corrections, count = memory[name]
        state = 4 * trainable  # parameters, gradients and AdamW's two moments
        median = statistics.median(times[name])
        print(f"{name:16} {count:>9} {1000 * median:8.1f} {median / base:8.3f} {corrections / 2**20:16.2f} "
              f"{corrections / state:14.1%}")
    print("(corrections: the A0, B0 buffers of the pack, allocated for all runs once one run is corrected; "
          "LoRA state: factors, head, gradients and AdamW moments of every run)")


if __name__ == "__main__":
    main()
