"""A long run's history stays bounded: checkpoint size, checkpoint write time and RSS early and late.

A tiny BERT classifier (2 layers, hidden 32, random weights, built from a config into a temporary
folder) trains a pack of 2 runs on SST-2 rows for `--steps` steps, batch 4, with a checkpoint every
`--checkpoint-every` steps, its metric rows streamed into a sweep store as a sweep's worker does.
At each checkpoint the script records the file's size, the time its state takes to serialise
(the part that grows with what a checkpoint holds), the time `checkpoint.save` took in all (that
includes syncing the file and its folder to disk: noisy on a shared machine) and the process's
current RSS, then prints them at the first checkpoint after step 1,000 and at the last, with
their ratios, and the store's size. With `--no-sink` the rows stay on the runs' results and in
every checkpoint, as they did before they were streamed: the growth that streaming removes.

    .venv/bin/python benchmarks/history.py [--steps 50000] [--checkpoint-every 1000] [--no-sink]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_model, set_environment

set_environment()

import torch  # noqa: E402


def rss_mib() -> float:
    """This process's current resident set size in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tiny_bert(folder: Path) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    from lorainit import models

    _, tokenizer = models.load("minilm", "classification")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--checkpoint-every", type=int, default=1_000)
    parser.add_argument("--no-sink", action="store_true", help="keep rows in memory and checkpoints (the old way)")
    args = parser.parse_args()

    from lorainit.config import RunConfig
    from lorainit.engine import checkpoint
    from lorainit.sweeps.store import MetricWriter, Store
    from lorainit.train import PackTrainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_bert(tmp / "model")
        runs = [RunConfig.from_dict(dict(model=model, task="sst2", max_steps=args.steps, max_train_samples=2000,
                                         max_eval_samples=64, max_seq_len=32, init=init, lr=1e-3,
                                         checkpoint_every=args.checkpoint_every, log_every=1))
                for init in "ab"]
        Store(tmp / "sweep").close()
        sink = None if args.no_sink else MetricWriter(tmp / "sweep")
        trainer = PackTrainer(runs, show_progress=False)
        samples: list[tuple[int, int, float, float, float]] = []  # step, bytes, seconds, RSS MiB, serialise s
        save = checkpoint.save

        def timed_save(folder, step, state):
            start = time.perf_counter()
            torch.save(state, io.BytesIO())  # the part that grows with what a checkpoint holds
            serialise = time.perf_counter() - start
            start = time.perf_counter()
            path = save(folder, step, state)
            samples.append((step, path.stat().st_size, time.perf_counter() - start, rss_mib(), serialise))
            return path

        checkpoint.save = timed_save
        start = time.perf_counter()
        trainer.run(checkpoint_dir=tmp / "ckpt", sink=sink)
        wall = time.perf_counter() - start
        if sink is not None:
            sink.close()
        store_mib = (tmp / "sweep" / Store.FILE).stat().st_size / 2**20
        wal = tmp / "sweep" / (Store.FILE + "-wal")
        store_mib += wal.stat().st_size / 2**20 if wal.exists() else 0.0

    print(f"CPU: {cpu_model()}; torch {torch.__version__}, 1 thread")
    print(f"{args.steps} steps of a 2-run pack, a checkpoint every {args.checkpoint_every}, "
          f"{'rows streamed to the store' if sink is not None else 'rows kept in memory and checkpoints'}; "
          f"{wall:.0f} s, {args.steps / wall:.0f} steps/s")
    # the write time is mostly the disk's fsync, noisy on a shared machine: the median of the five
    # checkpoints from step 1,000 on, against the median of the last five periodic ones
    periodic = samples[:-1] if len(samples) > 1 else samples  # the final one is written once, at the end
    first = next(i for i, s in enumerate(periodic) if s[0] >= 1_000)
    early, late = periodic[first:first + 5], periodic[-5:]
    rows = []
    for label, group in (("early", early), ("late", late)):
        rows.append((label, f"{group[0][0]}-{group[-1][0]}", *(statistics.median(s[i] for s in group)
                                                                for i in (1, 4, 2, 3))))
    print(f"{'':>14} {'steps':>13} {'checkpoint KiB':>15} {'serialise ms':>13} {'write ms':>9} {'RSS MiB':>8}"
          "   (medians of 5)")
    for label, steps, size, serialise, seconds, rss in rows:
        print(f"{label:>14} {steps:>13} {size / 1024:>15.1f} {serialise * 1e3:>13.2f} {seconds * 1e3:>9.2f} "
              f"{rss:>8.1f}")
    (_, _, *a), (_, _, *b) = rows
    print(f"{'late / early':>14} {'':>13} " + " ".join(f"{y / x:>{w}.3f}" for x, y, w in zip(a, b, (15, 13, 9, 8))))
    print(f"store: {store_mib:.1f} MiB for {2 * args.steps} training-loss rows and the evaluations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
