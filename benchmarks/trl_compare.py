"""SFT on chat messages: 8 runs as one lorainit pack against the same 8 runs trained one by one
with TRL's `SFTTrainer` + PEFT LoRA, the tool a user would otherwise pick.

The runs: seeds 0 and 1 x learning rates 1e-4, 3e-4, 1e-3, 3e-3; Init[A] (PEFT's default: A
random, B = 0) with PEFT's kaiming draw; SmolLM2-135M-Instruct (`smollm2-135m`), rank 8, alpha
16, LoRA dropout 0.1 on q_proj and v_proj; batch 2, `--steps` optimiser steps, no warmup, linear
decay, AdamW without weight decay, clipping at 1.0, fp32; the loss counts the assistant turns'
tokens only (each turn's content and its end-of-turn text), as a mean over the batch's counted
tokens. Neither side evaluates while training; lorainit's `run()` does its step-0 and final
evaluations on 2 held-out rows, inside its wall time.

The rows: the first `--rows` conversations of the data file whose chat-template rendering fits
`--max-seq-len` tokens (longer ones are dropped, on both sides), written to a scratch folder with
the next 2 that fit as the evaluation file, so that both sides read exactly those rows. Run k of
either side sees the same rows at every step: the TRL side lays its dataset out in the order of
lorainit's `DataOrder` for the run's seed and trains with `train_sampling_strategy="sequential"`.
At the first step B = 0, so both sides compute the base model's loss on the same rows: the
first-step losses must agree, which checks that both count the same tokens.

The TRL side's assistant mask is built here, independently of lorainit: SmolLM2's chat template
has no `{% generation %}` markers, which TRL's `assistant_only_loss` needs. For each assistant
turn i, the characters between the rendering of `messages[:i]` with the generation prompt and
that of `messages[:i + 1]` are the turn's span; the whole conversation is tokenised once with
offsets, and a token counts where its first character lies in a span. TRL gets pre-tokenised
rows, `input_ids` and `assistant_masks`: in TRL 1.16 `SFTTrainer` recognises a dataset with an
`input_ids` column as already processed and folds its `assistant_masks` column into `labels`
(-100 outside the mask) while preparing the dataset, so preparation is left on
(`skip_prepare_dataset=True` would skip that step, and TRL refuses mask columns without labels
then) and `assistant_only_loss` stays False (it applies to conversational rows, not tokenised ones).

TRL's own defaults that differ from lorainit's are set to match: fp32 (TRL turns bf16 on),
gradient checkpointing off (TRL turns it on), no warmup. Everything else is TRL's default: its
AdamW, its fused LM head (log-probabilities in chunks, without the full logits), its per-step
entropy and token-accuracy metrics, each pair of rows right-padded to the longer.

Each side runs in a fresh subprocess of this script (`--side lorainit|trl`), so that its peak RSS
is its own; repeats alternate the two (lorainit, TRL, lorainit, TRL, ...) and the medians are
reported. Wall time runs from after the libraries' imports to the last run's end: reading and
tokenising the rows, every model load, training (and lorainit's evaluations); lorainit keeps the
tokenised rows in its data cache, so repeats after the first read them from there. Training time
covers the steps only: lorainit's `train_step` calls, and TRL's `train()` from `on_train_begin`
to `on_train_end`. A few steps weigh the fixed costs (TRL's 8 model loads and trainer set-ups)
more than a real run does; the training-time ratio is what the wall ratio tends to as runs grow.
On a machine that other processes keep busy, measure with `--threads 1`: more torch threads than
free cores stall every parallel op, which inflates the side with more, smaller ops (TRL's).

    .venv/bin/python benchmarks/trl_compare.py --data <shared data>/byo/sgd_messages/train.jsonl
        [--steps 6] [--rows 32] [--max-seq-len 192] [--repeats 3] [--threads N]

Needs the benchmark extra: `pip install -c constraints.txt -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from statistics import median

from _common import cpu_model, import_model_code, peak_rss_mib, set_environment

MODEL = "smollm2-135m"
SEEDS = (0, 1)
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
BATCH = 2
RANK, ALPHA, DROPOUT = 8, 16.0, 0.1
TARGETS = ("q_proj", "v_proj")
MAX_GRAD_NORM = 1.0
EVAL_ROWS = 2       # lorainit's run() evaluates at step 0 and at the end; these rows keep that small
LAST = 3            # the "final" training loss: the mean over the last LAST steps


def grid() -> list[tuple[int, float]]:
    """(seed, lr) of the 8 runs, in the pack's order."""
    return [(seed, lr) for seed in SEEDS for lr in LRS]


def encode(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the chat-template rendering and a 0/1 mask of the assistant turns' tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render a conversation as the sum of its turns")
        spans.append((len(before), len(through)))  # the turn's content and end-of-turn text
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in encoded["offset_mapping"]]
    return encoded["input_ids"], mask


def write_rows(data: Path, rows: int, max_seq_len: int, folder: Path) -> tuple[Path, Path]:
    """train.jsonl (the first `rows` conversations that fit) and eval.jsonl (the next EVAL_ROWS) in `folder`."""
    from transformers import AutoTokenizer

    from lorainit import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(MODEL).path)
    kept = []
    with open(data) as f:
        for line in f:
            if line.strip() and len(encode(json.loads(line)["messages"], tokenizer)[0]) <= max_seq_len:
                kept.append(line.rstrip("\n"))
                if len(kept) == rows + EVAL_ROWS:
                    break
    if len(kept) < rows + EVAL_ROWS:
        raise SystemExit(f"{data}: only {len(kept)} conversations fit {max_seq_len} tokens; "
                         f"{rows + EVAL_ROWS} needed")
    train, held = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("\n".join(kept[:rows]) + "\n")
    held.write_text("\n".join(kept[rows:]) + "\n")
    return train, held


# -- the two sides: each returns its times, peak RSS and every run's per-step training losses ----

def side_lorainit(args: argparse.Namespace) -> dict:
    """One pack of the 8 runs through `PackTrainer.run()`, its `train_step` calls timed."""
    import torch

    from lorainit.config import RunConfig
    from lorainit.train import PackTrainer

    import_model_code()
    start = time.perf_counter()
    task = {"type": "sft", "style": "messages", "train": str(args.train), "eval": str(args.eval)}
    runs = [RunConfig.from_dict(dict(model=MODEL, task=task, init="a", lr=lr, seed=seed, rank=RANK, alpha=ALPHA,
                                     dropout=DROPOUT, targets=list(TARGETS), batch_size=BATCH,
                                     max_steps=args.steps, max_seq_len=args.max_seq_len, warmup_ratio=0.0,
                                     weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, eval_every=0,
                                     save_adapters=False, log_every=1))
            for seed, lr in grid()]
    trainer = PackTrainer(runs, show_progress=False)
    if trainer.task.train_size != args.rows:
        raise SystemExit(f"lorainit trains on {trainer.task.train_size} rows, not the {args.rows} written")
    seconds = {"train_step": 0.0, "evaluate": 0.0, "record_trivial": 0.0}  # run() calls them through the instance

    def timed(name: str):
        method = getattr(trainer, name)

        def call(*args, **kwargs):
            t = time.perf_counter()
            out = method(*args, **kwargs)
            seconds[name] += time.perf_counter() - t
            return out
        return call

    for name in seconds:
        setattr(trainer, name, timed(name))
    results = trainer.run()
    wall_s = time.perf_counter() - start
    losses = [[m["value"] for m in sorted(r.metrics, key=lambda m: m["step"]) if m["name"] == "train_loss"]
              for r in results]
    return dict(wall_s=wall_s, train_s=seconds["train_step"], eval_s=seconds["evaluate"] + seconds["record_trivial"],
                peak_rss_mib=peak_rss_mib(),
                threads=torch.get_num_threads(), losses=losses, status=[r.status for r in results])


def side_trl(args: argparse.Namespace) -> dict:
    """The 8 runs one by one: `SFTTrainer(model=<folder>, peft_config=LoraConfig(...))`, each loading its model."""
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lorainit import models
    from lorainit.engine.order import DataOrder

    class Clock(TrainerCallback):
        def __init__(self):
            self.seconds = 0.0

        def on_train_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_train_end(self, *_, **__):
            self.seconds += time.perf_counter() - self.started
            self.threads = torch.get_num_threads()  # as the trainer left them

    transformers.logging.set_verbosity_error()
    import_model_code()
    start = time.perf_counter()
    folder = models.resolve(MODEL).path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [encode(json.loads(line)["messages"], tokenizer) for line in args.train.read_text().splitlines()
            if line.strip()]
    clock, losses = Clock(), []
    with tempfile.TemporaryDirectory() as out_dir:  # SFTTrainer wants one; nothing is saved
        for seed, lr in grid():
            order = DataOrder(seed, len(rows), BATCH)  # the batches the pack's run with this seed sees
            picked = [rows[i] for step in range(args.steps) for i in order.rows_at(step)]
            dataset = Dataset.from_dict({"input_ids": [ids for ids, _ in picked],
                                         "assistant_masks": [mask for _, mask in picked]})
            config = SFTConfig(
                output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=BATCH, learning_rate=lr,
                lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
                seed=seed, max_length=args.max_seq_len, train_sampling_strategy="sequential",
                bf16=False, gradient_checkpointing=False, use_cpu=True, logging_steps=1,
                save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)
            peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(TARGETS),
                                     task_type="CAUSAL_LM")
            trainer = SFTTrainer(model=folder, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[clock])
            trainer.train()
            losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
            del trainer
            gc.collect()
    return dict(wall_s=time.perf_counter() - start, train_s=clock.seconds, peak_rss_mib=peak_rss_mib(),
                threads=clock.threads, losses=losses, status=["done"] * len(losses))


SIDES = {"lorainit": side_lorainit, "trl": side_trl}


# -- measuring and reporting --------------------------------------------------------------------

def in_subprocess(side: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--side", side, "--data", str(args.data), "--train", str(args.train),
               "--eval", str(args.eval), "--steps", str(args.steps), "--rows", str(args.rows),
               "--max-seq-len", str(args.max_seq_len), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"the {side} side failed (exit code {done.returncode})")
    return json.loads(lines[-1])


def tail(losses: list[float]) -> float:
    """The mean training loss over the last LAST steps."""
    return sum(losses[-LAST:]) / len(losses[-LAST:])


def report(measured: dict[str, list[dict]]) -> None:
    pack, trl = measured["lorainit"], measured["trl"]
    for r in pack + trl:
        r["outside_s"] = r["wall_s"] - r["train_s"]
    rows = (("wall, median (s)", "wall_s", median, ".1f"), ("training, median (s)", "train_s", median, ".1f"),
            ("outside the steps, median (s)", "outside_s", median, ".1f"),
            ("peak RSS, largest (MiB)", "peak_rss_mib", max, ".0f"))
    print(f"\n{'':<30}{'lorainit pack':>14}{'TRL x 8':>10}{'TRL / lorainit':>16}")
    ratio = {}
    for label, key, pick, form in rows:
        ours, theirs = pick(r[key] for r in pack), pick(r[key] for r in trl)
        ratio[key] = theirs / ours
        print(f"{label:<30}{ours:>14{form}}{theirs:>10{form}}{ratio[key]:>15.2f}x")
    for label, key in (("wall", "wall_s"), ("training", "train_s")):
        print(f"{label} ratio per repeat: {', '.join(f'{t[key] / p[key]:.2f}x' for p, t in zip(pack, trl))}")
    print(f"outside the steps: lorainit's model load, pack set-up and its two evaluations (step 0 and end, "
          f"{median(r['eval_s'] for r in pack):.1f} s); TRL's 8 model loads, trainer set-ups and dataset preparation")
    print(f"torch threads while training: lorainit {pack[-1]['threads']}, TRL {trl[-1]['threads']}")
    print(f"target: lorainit >= 1.5x faster in wall time: {'met' if ratio['wall_s'] >= 1.5 else 'NOT met'}")
    print(f"\ntraining losses, last repeat: step 1 (B = 0: the base model's loss on the same rows) and the "
          f"mean of the last {LAST} steps")
    print(f"{'seed':>4}{'lr':>8}{'lorainit 1st':>14}{'TRL 1st':>10}{'lorainit last':>15}{'TRL last':>10}  status")
    gaps = []
    for (seed, lr), ours, theirs, status in zip(grid(), pack[-1]["losses"], trl[-1]["losses"], pack[-1]["status"]):
        gaps.append(abs(ours[0] - theirs[0]))
        print(f"{seed:>4}{lr:>8.0e}{ours[0]:>14.4f}{theirs[0]:>10.4f}{tail(ours):>15.4f}{tail(theirs):>10.4f}"
              f"  {status}")
    print(f"largest first-step gap: {max(gaps):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a jsonl of {messages: [{role, content}, ...]} rows")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=32, help="training conversations (the first that fit)")
    parser.add_argument("--max-seq-len", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    parser.add_argument("--side", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--eval", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_environment()
    import torch

    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(SIDES[args.side](args)))
        return
    print(f"CPU: {cpu_model()}; torch threads: {args.threads}")
    print(f"torch {torch.__version__}, transformers {version('transformers')}, peft {version('peft')}, "
          f"trl {version('trl')}")
    print(f"{len(grid())} runs (seeds {', '.join(map(str, SEEDS))} x lr {', '.join(f'{lr:.0e}' for lr in LRS)}), "
          f"SmolLM2-135M, {args.rows} conversations of <= {args.max_seq_len} tokens from {args.data.name}, "
          f"batch {BATCH}, {args.steps} steps, rank {RANK}, alpha {ALPHA:g}, dropout {DROPOUT} on "
          f"{', '.join(TARGETS)}; {args.repeats} alternated repeats")
    load_before = os.getloadavg()[0]
    if load_before > 0.5 and args.threads > 1:
        # With more runnable threads than cores, every parallel op of a side waits for its threads
        # to be scheduled (a small elementwise op: 16 ms with 2 threads, 0.3 ms with 1, seen on 2 busy
        # cores), a cost per op that hits the side with more, smaller ops (8 runs one by one) hardest.
        print(f"note: load average {load_before:.1f} on {os.cpu_count()} cores before starting: other processes "
              f"compete for the cores, and {args.threads} torch threads then stall on each other; compare "
              "timings from an idle machine, or with --threads 1")
    scratch = Path(tempfile.mkdtemp(prefix="trl_compare."))
    try:
        args.train, args.eval = write_rows(args.data, args.rows, args.max_seq_len, scratch)
        measured = {side: [] for side in SIDES}
        for repeat in range(args.repeats):
            for side in SIDES:
                measured[side].append(in_subprocess(side, args))
                r = measured[side][-1]
                print(f"  repeat {repeat + 1}, {side}: wall {r['wall_s']:.1f} s, training {r['train_s']:.1f} s, "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"load average (1 min) before and after: {load_before:.1f}, {os.getloadavg()[0]:.1f}")
    report(measured)


if __name__ == "__main__":
    main()
