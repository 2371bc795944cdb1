"""One lorainit pack against the same runs done one by one, with HF Trainer + PEFT (the way the
paper's own code runs them) and with PEFT and a plain `torch.optim.AdamW` loop.

The runs: learning rates 2^k x 1e-5 (k = 0..10, the paper's GLUE grid) x Init[A]/Init[B], MiniLM
on SST-2, batch 4, seed 0, rank 8, alpha 16, LoRA dropout 0.1 on query and value, warmup ratio
0.06, clipping at 1.0, fp32 on the CPU (or on one GPU with `--device cuda`), the first 2000
training rows; each evaluated once, at the end, on the first 200 dev rows. `--runs K` keeps K of
the 22, at evenly spaced learning rates.

`--inits a,b,gaussian,orthogonal,ab,pissa,olora` trains those init families instead of Init[A] and
Init[B], each at `--runs / families` evenly spaced lrs; `--alpha 8` sets alpha = r. Run by run,
each run's init is PEFT's own (`init_lora_weights`, drawn from the run's init seed) where PEFT has
the family, and `lorainit.peft.apply_init` where it lacks it (Init[B], Init[AB]).

Each variant runs in a fresh subprocess of this script (`--only NAME --json`), so that its peak
memory is its own: RSS on the CPU, `torch.cuda.max_memory_allocated()` on CUDA. The parent first
measures the device's fp32 matmul peak (on CUDA with torch's TF32 setting as it stands, which it
prints), then prints one row per variant and the ratios. On CUDA every clock read waits for the
GPU's queued work. Wall time covers the whole variant: loading and tokenising, every model
load, training and evaluation; not the import of transformers' model code, which every variant
does before its clock starts (the Trainer variant's import of `Trainer` pulls it in anyway).
Training time covers the training steps only. Achieved FLOP/s is 4 x (frozen non-embedding
parameters) x (non-padding training tokens) / training time: the frozen weights' forward plus
backward-to-the-input multiply-adds, with neither attention's T^2 work nor the LoRA factors
counted. Tokens are counted from the attention masks actually fed.
For the pack the figure is the rate of the work a full forward would do, not of the arithmetic
done: its last layer computes only each row's first token (the one the classifier reads), about
an eighth of this count on SST-2 batches, and runs that hold the same rows (one seed here)
compute the embeddings and the first layer's frozen projections once, not once per run.

    .venv/bin/python benchmarks/pack_vs_sequential.py [--device cpu|cuda] [--steps 40] [--runs 22]
        [--eval-rows 200] [--train-rows 2000] [--only pack|trainer|loop] [--json] [--rounds 1]

With `--rounds R` every variant is measured R times, the three interleaved round by round, and
the ratios' medians are given with their range: on a shared machine one variant's time can move
by a fifth between rounds minutes apart.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

import torch
from _common import (
    TokenCounter,
    clock,
    cpu_model,
    cuda_matmul_tf32,
    frozen_flop_params,
    import_model_code,
    matmul_peak_flops,
    peak_cuda_mib,
    peak_rss_mib,
    peft_lora,
    set_environment,
)

LR_EXPONENTS = 11          # lr = 2^k x 1e-5 for k = 0..10 (the paper's GLUE setting)
INITS = ("a", "b")         # default: Init[A]: A random, B = 0; Init[B]: B random, A = 0
SEED = 0
BATCH_SIZE = 4
RANK, LORA_DROPOUT = 8, 0.1
TARGETS = ("query", "value")
WARMUP_RATIO = 0.06
MAX_GRAD_NORM = 1.0
MAX_SEQ_LEN = 128
EVAL_BATCH = 64            # rows per forward in the plain loop's evaluation
VARIANTS = ("pack", "trainer", "loop")
DEVICES = ("cpu", "cuda")
# the matmul peak's size: on a GPU a 2048^3 product takes a fraction of a millisecond, where the
# launch and the synchronisation would weigh in the time
MATMUL_N = {"cpu": 2048, "cuda": 4096}


def grid(num_runs: int, inits: tuple[str, ...] = INITS) -> list[tuple[float, str]]:
    """(lr, init) of `num_runs` runs: evenly spaced exponents of the 11-point grid, every init each."""
    num_lrs = math.ceil(num_runs / len(inits))
    ks = [round(i * (LR_EXPONENTS - 1) / max(1, num_lrs - 1)) for i in range(num_lrs)]
    return [(2.0**k * 1e-5, init) for k in ks for init in inits][:num_runs]


def run_fields(args: argparse.Namespace) -> dict:
    """The run fields every run of the benchmark shares (lr and init are the grid's)."""
    return dict(model="minilm", task="sst2", seed=SEED, rank=RANK, alpha=args.alpha, dropout=LORA_DROPOUT,
                targets=list(TARGETS), batch_size=BATCH_SIZE, max_steps=args.steps, warmup_ratio=WARMUP_RATIO,
                weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, max_seq_len=MAX_SEQ_LEN,
                max_train_samples=args.train_rows, max_eval_samples=args.eval_rows, precision="fp32",
                save_adapters=False)


# -- the three variants: each returns its timings, token counts and accuracies -------------------

def bench_pack(args: argparse.Namespace) -> dict:
    """All runs as one pack: `PackTrainer.run`'s loop, with training steps timed apart from evaluation."""
    from lorainit.config import RunConfig
    from lorainit.train import PackTrainer

    runs = [RunConfig.from_dict(run_fields(args) | {"lr": lr, "init": init}) for lr, init in grid(args.runs, args.inits)]
    import_model_code()
    start = clock(args.device)
    trainer = PackTrainer(runs, device=args.device, show_progress=False)  # loads the model and the data
    load_s = clock(args.device) - start
    # The pack bypasses the body's own forward (real tokens only; runs holding the same rows embed
    # them once), so the padded positions are counted from the stacked batches it is given, and
    # the real tokens are the attention-mask sums that `train_step` reports.
    positions = _PackPositions(trainer)
    train_s, tokens = 0.0, 0
    while trainer.step < trainer.total and any(trainer.alive):
        t = clock(args.device)
        _, seen = trainer.train_step(log=trainer.step == 0)  # run() captures probes on the first step
        train_s += clock(args.device) - t
        tokens += seen
    t = clock(args.device)
    trainer.evaluate()
    eval_s = clock(args.device) - t
    wall_s = clock(args.device) - start
    positions.remove()
    return dict(wall_s=wall_s, load_s=load_s, train_s=train_s, eval_s=eval_s, tokens=tokens,
                tokens_fed=positions.fed, frozen_params=frozen_flop_params(trainer.model),
                accuracies=[r.final.get("accuracy") for r in trainer.results],
                diverged=sum(r.status == "diverged" for r in trainer.results),
                unpadded_body=bool(getattr(trainer.task, "unpadded", False)))


class _PackPositions:
    """Counts the token positions (padding included) of the stacked batches a pack trains on."""

    def __init__(self, trainer):
        self.fed = 0
        self._trainer, self._task = trainer, trainer.task
        self._logits = trainer.task.logits
        trainer.task.logits = self._count

    def _count(self, state, batch, *args, **kwargs):
        if self._trainer.model.training:
            self.fed += batch["input_ids"].numel()
        return self._logits(state, batch, *args, **kwargs)

    def remove(self) -> None:
        del self._task.logits  # the instance attribute; the class's method shows through again


def _peft_model(model, init: str, alpha: float):
    """PEFT LoRA on query/value with the head trainable, initialised by PEFT or by `apply_init`."""
    return peft_lora(model, RANK, alpha, LORA_DROPOUT, TARGETS, "SEQ_CLS", init, SEED)


class _Rows:
    """The benchmark's training and dev rows, read once and tokenised with the first tokenizer."""

    def __init__(self, args: argparse.Namespace):
        from lorainit.tasks import glue

        self.train_ex = glue.read("sst2", "train", max_rows=args.train_rows)
        self.dev_ex = glue.read("sst2", "eval", max_rows=args.eval_rows)
        self.train = self.dev = None  # (input_ids, token_type_ids) per split, once tokenised

    def tokenise(self, tokenizer) -> None:
        from lorainit.tasks import glue

        if self.train is None:
            self.train = glue.encode(self.train_ex, tokenizer, MAX_SEQ_LEN)
            self.dev = glue.encode(self.dev_ex, tokenizer, MAX_SEQ_LEN)


class _Encoded(torch.utils.data.Dataset):
    """Tokenised rows as dicts of lists, for a `DataCollatorWithPadding`."""

    def __init__(self, encoded: tuple[list[list[int]], list[list[int]] | None], labels: list[int]):
        self.ids, self.type_ids = encoded
        self.labels = labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        row = {"input_ids": self.ids[i], "attention_mask": [1] * len(self.ids[i]), "labels": self.labels[i]}
        if self.type_ids is not None:
            row["token_type_ids"] = self.type_ids[i]
        return row


def _accuracy(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def bench_trainer(args: argparse.Namespace) -> dict:
    """Run by run: a fresh model, PEFT, `transformers.Trainer` to max_steps, `trainer.evaluate()`.

    On CUDA the Trainer moves the model to the GPU itself, as it does in the paper's scripts."""
    import transformers
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from lorainit import models

    transformers.logging.set_verbosity_error()
    import_model_code()
    start = clock(args.device)
    rows = _Rows(args)
    train_s = eval_s = 0.0
    tokens = tokens_fed = 0
    accuracies = []
    with tempfile.TemporaryDirectory() as out_dir:  # Trainer wants one; nothing is saved
        for lr, init in grid(args.runs, args.inits):
            torch.manual_seed(SEED)  # the fresh head's init, as a seeded script would draw it
            model, tokenizer = models.load("minilm", "classification", num_labels=2)
            rows.tokenise(tokenizer)
            frozen_params = frozen_flop_params(model)
            model = _peft_model(model, init, args.alpha)
            counter = TokenCounter(model.get_base_model().base_model)
            training_args = TrainingArguments(
                output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=BATCH_SIZE,
                learning_rate=lr, warmup_steps=WARMUP_RATIO,  # a float below 1 is a ratio in transformers 5
                lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, seed=SEED,
                report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no",
                use_cpu=args.device == "cpu", disable_tqdm=True)
            trainer = Trainer(model=model, args=training_args,
                              train_dataset=_Encoded(rows.train, rows.train_ex.labels),
                              eval_dataset=_Encoded(rows.dev, rows.dev_ex.labels),
                              data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=_accuracy)
            t = clock(args.device)
            trainer.train()
            train_s += clock(args.device) - t
            t = clock(args.device)
            accuracies.append(trainer.evaluate()["eval_accuracy"])
            eval_s += clock(args.device) - t
            counter.remove()
            tokens, tokens_fed = tokens + counter.real, tokens_fed + counter.fed
            del trainer, model
            gc.collect()
    return dict(wall_s=clock(args.device) - start, train_s=train_s, eval_s=eval_s, tokens=tokens,
                tokens_fed=tokens_fed, frozen_params=frozen_params, accuracies=accuracies, diverged=0)


@torch.no_grad()
def _evaluate(model, rows: _Rows, pad_id: int, device: str) -> float:
    """Accuracy on the dev rows, EVAL_BATCH rows per forward in file order, on `device`."""
    from lorainit.tasks.classification import collate

    model.eval()
    ids, type_ids = rows.dev
    labels = torch.tensor(rows.dev_ex.labels)
    correct = 0
    for lo in range(0, len(ids), EVAL_BATCH):
        hi = lo + EVAL_BATCH
        batch = collate(ids[lo:hi], pad_id, type_ids[lo:hi] if type_ids is not None else None)
        batch = {key: v.to(device) for key, v in batch.items()}
        correct += int((model(**batch).logits.argmax(-1).cpu() == labels[lo:hi]).sum())
    return correct / len(ids)


def bench_loop(args: argparse.Namespace) -> dict:
    """Run by run: a fresh model, PEFT, and a hand-written AdamW loop on the pack's own batches."""
    from transformers import get_linear_schedule_with_warmup

    from lorainit import models
    from lorainit.engine.order import DataOrder
    from lorainit.tasks.classification import collate

    import_model_code()
    start = clock(args.device)
    rows = _Rows(args)
    train_labels = torch.tensor(rows.train_ex.labels)
    train_s = eval_s = 0.0
    tokens = tokens_fed = 0
    accuracies = []
    for lr, init in grid(args.runs, args.inits):
        torch.manual_seed(SEED)
        model, tokenizer = models.load("minilm", "classification", num_labels=2)
        rows.tokenise(tokenizer)
        frozen_params = frozen_flop_params(model)
        model = _peft_model(model, init, args.alpha).to(args.device)
        counter = TokenCounter(model.get_base_model().base_model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(WARMUP_RATIO * args.steps), args.steps)
        order = DataOrder(SEED, len(train_labels), BATCH_SIZE)  # the batches a pack run with this seed sees
        ids, type_ids = rows.train
        model.train()
        t = clock(args.device)
        for step in range(args.steps):
            idx = order.rows_at(step)
            batch = collate([ids[i] for i in idx], tokenizer.pad_token_id,
                                 [type_ids[i] for i in idx] if type_ids is not None else None)
            batch = {key: v.to(args.device) for key, v in batch.items()}
            loss = model(**batch, labels=train_labels[idx].to(args.device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        train_s += clock(args.device) - t
        t = clock(args.device)
        accuracies.append(_evaluate(model, rows, tokenizer.pad_token_id, args.device))
        eval_s += clock(args.device) - t
        counter.remove()
        tokens, tokens_fed = tokens + counter.real, tokens_fed + counter.fed
        del model, optimizer, schedule
        gc.collect()
    return dict(wall_s=clock(args.device) - start, train_s=train_s, eval_s=eval_s, tokens=tokens,
                tokens_fed=tokens_fed, frozen_params=frozen_params, accuracies=accuracies, diverged=0)


BENCHES = {"pack": bench_pack, "trainer": bench_trainer, "loop": bench_loop}


# -- measuring and reporting --------------------------------------------------------------------

def measure(name: str, args: argparse.Namespace) -> dict:
    """Run one variant in this process and add its derived figures (on CUDA, its peak GPU memory too)."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # forget the matmul peak's operands
    res = BENCHES[name](args)
    if args.device == "cuda":
        res["peak_cuda_mib"] = peak_cuda_mib()
    finished = [a for a in res["accuracies"] if a is not None]
    res.update(variant=name, runs=len(res["accuracies"]), steps=args.steps, peak_rss_mib=peak_rss_mib(),
               tokens_per_s=res["tokens"] / res["train_s"],
               flops_per_s=4 * res["frozen_params"] * res["tokens"] / res["train_s"],
               padding=1 - res["tokens"] / res["tokens_fed"],
               mean_accuracy=sum(finished) / len(finished) if finished else None)
    return res


def measure_in_subprocess(name: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh process of this script, so that its peak memory is its own."""
    command = [sys.executable, __file__, "--only", name, "--json", "--device", args.device, "--steps", str(args.steps),
               "--runs", str(args.runs), "--eval-rows", str(args.eval_rows), "--train-rows", str(args.train_rows),
               "--inits", ",".join(args.inits), "--alpha", str(args.alpha)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"variant {name} failed (exit code {done.returncode})")
    return json.loads(lines[-1])["variants"][name]


def print_table(results: dict[str, dict], peak_flops: float, device: str) -> None:
    n = MATMUL_N[device]
    if device == "cuda":
        tf32 = "TF32 on" if cuda_matmul_tf32() else "TF32 off"
        print(f"fp32 matmul peak ({n}^3, {torch.cuda.get_device_name(0)}, {tf32}): {peak_flops / 1e9:.1f} GFLOP/s")
    else:
        print(f"fp32 matmul peak ({n}^3, {torch.get_num_threads()} threads): {peak_flops / 1e9:.1f} GFLOP/s")
    memory_label, memory_key = ("GPU MiB", "peak_cuda_mib") if device == "cuda" else ("RSS MiB", "peak_rss_mib")
    header = (f"{'variant':8} {'runs':>4} {'wall s':>8} {'train s':>8} {'eval s':>7} {'tok/s':>7} "
              f"{'GFLOP/s':>8} {'of peak':>7} {'pad':>5} {memory_label:>8} {'mean acc':>8} {'diverged':>8}")
    print(header)
    for name, r in results.items():
        acc = f"{r['mean_accuracy']:.4f}" if r["mean_accuracy"] is not None else "-"
        print(f"{name:8} {r['runs']:>4} {r['wall_s']:8.1f} {r['train_s']:8.1f} {r['eval_s']:7.1f} "
              f"{r['tokens_per_s']:7.0f} {r['flops_per_s'] / 1e9:8.1f} {r['flops_per_s'] / peak_flops:7.1%} "
              f"{r['padding']:5.1%} {r[memory_key]:8.0f} {acc:>8} {r['diverged']:>8}")
    if device == "cuda":
        print("(GPU MiB: torch.cuda.max_memory_allocated() of the variant's own process)")
    if results.get("pack", {}).get("unpadded_body"):
        print("(the pack runs its body's token-wise ops on real tokens only; its pad column is the "
              "padded share of the batches it stacks)")


def ratios(results: dict[str, dict], peak_flops: float) -> dict:
    out = {}
    pack = results.get("pack")
    if pack is None:
        return out
    for other in ("trainer", "loop"):
        if other in results:
            out[f"wall_{other}_over_pack"] = results[other]["wall_s"] / pack["wall_s"]
            out[f"train_{other}_over_pack"] = results[other]["train_s"] / pack["train_s"]
    out["pack_flops_of_peak"] = pack["flops_per_s"] / peak_flops
    return out


def print_ratios(r: dict) -> None:
    if "wall_trainer_over_pack" in r:
        print(f"pack vs Trainer+PEFT: {r['wall_trainer_over_pack']:.2f}x wall "
              f"({r['train_trainer_over_pack']:.2f}x training time); target >= 3.5x")
    if "wall_loop_over_pack" in r:
        print(f"pack vs plain loop:   {r['wall_loop_over_pack']:.2f}x wall "
              f"({r['train_loop_over_pack']:.2f}x training time)")
    if "pack_flops_of_peak" in r:
        print(f"pack training FLOP/s: {r['pack_flops_of_peak']:.1%} of the matmul peak; target >= 55%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where every variant trains and evaluates")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per run")
    parser.add_argument("--runs", type=int, default=2 * LR_EXPONENTS,
                        help="runs to train (at most 22): evenly spaced learning rates, both inits each")
    parser.add_argument("--eval-rows", type=int, default=200, help="the first N SST-2 dev rows")
    parser.add_argument("--train-rows", type=int, default=2000, help="the first N SST-2 training rows")
    parser.add_argument("--inits", default=",".join(INITS),
                        help="init families to train, comma-separated (default a,b)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (s = alpha / 8)")
    parser.add_argument("--only", choices=VARIANTS, help="measure one variant, in this process")
    parser.add_argument("--json", action="store_true",
                        help="with --only, print one JSON line of its results instead of the table; "
                             "without, add a JSON line of each round's ratios after the tables")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every variant this many times, interleaved, and give the medians")
    args = parser.parse_args()
    args.inits = tuple(i.strip() for i in args.inits.split(",") if i.strip())
    if not 1 <= args.runs <= len(args.inits) * LR_EXPONENTS:
        parser.error(f"--runs must be between 1 and {len(args.inits) * LR_EXPONENTS}")
    if args.only and args.rounds != 1:
        parser.error("--rounds needs every variant (no --only)")
    for name in ("steps", "eval_rows", "train_rows", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        parser.exit(2, f"{parser.prog}: error: --device cuda, but torch {torch.__version__} ({build}) "
                       "sees no CUDA device\n")
    set_environment()

    # torch's threads spin at every op's barrier: another busy process on these cores can slow
    # small ops many times over, so the load at the start is printed beside the timings
    load = os.getloadavg()[0]
    peak_flops = matmul_peak_flops(MATMUL_N[args.device], device=args.device)  # before any variant, in this process
    if args.only:
        results = {args.only: measure(args.only, args)}
        info = {"peak_flops": peak_flops, "threads": torch.get_num_threads(), "load_average": load}
        if args.device == "cuda":
            info.update(device=torch.cuda.get_device_name(0), tf32=cuda_matmul_tf32())
        print(json.dumps(info | {"variants": results, "ratios": ratios(results, peak_flops)}))
        return
    print(f"{len(grid(args.runs))} runs x {args.steps} steps of batch {BATCH_SIZE}, MiniLM on SST-2 "
          f"({args.train_rows} training rows), eval on {args.eval_rows} dev rows")
    if args.device == "cpu":
        print(f"CPU: {cpu_model()}")
    summaries = []
    for r in range(args.rounds):
        if r:  # each round's peak beside its own timings: the machine's speed drifts
            load, peak_flops = os.getloadavg()[0], matmul_peak_flops(MATMUL_N[args.device], device=args.device)
        results = {name: measure_in_subprocess(name, args) for name in VARIANTS}
        summaries.append(ratios(results, peak_flops))
        if args.rounds > 1:
            print(f"\nround {r + 1} of {args.rounds}")
        print(f"load average at the start: {load:.2f} on {os.cpu_count()} cores")
        print_table(results, peak_flops, args.device)
        print_ratios(summaries[-1])
    if args.json:
        print(json.dumps({"rounds": summaries}))
    if args.rounds > 1:
        print(f"\nmedians over {args.rounds} rounds (lowest-highest):")
        for key in summaries[0]:
            values = [s[key] for s in summaries]
            fmt = "{:.1%}" if key.endswith("of_peak") else "{:.2f}x"
            print(f"  {key}: {fmt.format(statistics.median(values))} "
                  f"({fmt.format(min(values))}-{fmt.format(max(values))})")


if __name__ == "__main__":
    main()
