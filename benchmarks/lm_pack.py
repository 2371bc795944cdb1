"""Decoder LLMs: one pack of K SmolLM2-135M runs against one run alone (peak memory) and against the
same K runs done one by one with PEFT and a plain `torch.optim.AdamW` loop (time); the chunked
loss's peak memory against the plain one (full logits); padding-free against right-padded rows;
gradient checkpointing's memory and time.

The runs: WikiText-2 blocks of 256 tokens (the shared copy: trained on valid.txt), or with
`--task gsm8k` GSM8K rows cut at 256 tokens (uneven: the loss counts the answers only); batch 2,
rank 8, alpha 16, LoRA dropout 0.1 on q_proj and v_proj, lrs spread over 1e-4..3e-3, both inits,
fp32 on the CPU; runs alternate seeds 0 and 1, so that a pack's runs hold different rows.

Memory: each variant in its own subprocess of this script, so that its peak RSS is its own:
`one` (one run in a `PackTrainer`: its peak, and its RSS once loaded), `pack`, `pack_checkpointed`
(`gradient_checkpointing` on), `loss_chunked` and `loss_plain` (the pack's first batch forward and
backward with the chunked projection + cross-entropy, and with full logits and `F.cross_entropy`).
The target: pack peak <= 1.1 x (one run's peak + K x (one run's peak - its loaded RSS)), the
per-run term being that run's adapter, optimiser state and activations.

Time: one subprocess holds every contender at once and runs them in rounds: a step of the pack
(padding-free where the task's rows are uneven), of the right-padded pack, of the checkpointed
pack, then one step of each of the K PEFT runs. Each round's ratios are taken inside the round,
so that the machine's noise hits all of them alike; the medians over rounds (the first, warm-up,
left out) are reported.

    .venv/bin/python benchmarks/lm_pack.py [--task gsm8k] [--runs 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from statistics import median

import torch
from _common import cpu_model, matmul_peak_flops, peak_rss_mib, set_environment

SEQ, BATCH, RANK = 256, 2, 8
VARIANTS = ("one", "pack", "pack_checkpointed", "loss_chunked", "loss_plain", "speed")
TASK = "wikitext2"


def runs(k: int, **extra):
    from lorainit.config import RunConfig

    lrs = [1e-4 * (30 ** (i / max(1, (k + 1) // 2 - 1))) for i in range((k + 1) // 2)]
    fields = dict(model="smollm2-135m", task=TASK, batch_size=BATCH, max_seq_len=SEQ, rank=RANK, alpha=16,
                  dropout=0.1, max_steps=1000, max_eval_samples=8, save_adapters=False)
    grid = [{"lr": lr, "init": init} for lr in lrs for init in "ab"][:k]
    return [RunConfig.from_dict(fields | g | {"seed": i % 2} | extra) for i, g in enumerate(grid)]


def memory(k: int, **extra) -> dict:
    """A pack's RSS once loaded and its peak over two training steps."""
    from lorainit.train import PackTrainer

    trainer = PackTrainer(runs(k, **extra), show_progress=False)
    loaded = peak_rss_mib()
    for _ in range(2):
        trainer.train_step(log=False)
    return dict(loaded_rss_mib=loaded, peak_rss_mib=peak_rss_mib())


class PeftRuns:
    """The K runs as a user would train them one by one: a fresh model + PEFT + AdamW each."""

    def __init__(self, k: int):
        from peft import LoraConfig, get_peft_model

        from lorainit import models
        from lorainit.engine.order import DataOrder
        from lorainit.tasks.causal_lm import CausalLM

        self.runs = runs(k)
        self.task = CausalLM(self.runs[0])  # the rows, read as the pack reads them
        self.models, self.opts, self.orders = [], [], []
        for run in self.runs:
            model, _ = models.load(run.model, "causal_lm")
            model = get_peft_model(model, LoraConfig(r=run.rank, lora_alpha=run.alpha, lora_dropout=run.dropout,
                                                     target_modules=list(run.targets), task_type="CAUSAL_LM"))
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            self.models.append((model, params))
            self.opts.append(torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0))
            self.orders.append(DataOrder(run.seed, self.task.train_size, run.batch_size))

    def step(self, j: int, step: int) -> None:
        from torch.nn import functional as F

        from lorainit.tasks.causal_lm import IGNORE

        (model, params), opt = self.models[j], self.opts[j]
        batch = self.task.batch(self.orders[j].rows_at(step))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        counted = batch["labels"] != IGNORE
        F.cross_entropy(logits[counted], batch["labels"][counted]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()


def speed(k: int, steps: int) -> dict:
    from lorainit.tasks import causal_lm
    from lorainit.train import PackTrainer

    packs = {"pack": PackTrainer(runs(k), show_progress=False)}
    if packs["pack"].task.padding_free:  # else a right-padded pack is this same pack
        causal_lm.PADDING_FREE = False
        packs["pack_padded"] = PackTrainer(runs(k), show_progress=False)
        causal_lm.PADDING_FREE = True
    packs["pack_checkpointed"] = PackTrainer(runs(k, gradient_checkpointing=True), show_progress=False)
    peft = PeftRuns(k)
    rounds = []
    for step in range(steps):
        times = {}
        for name, trainer in packs.items():
            t = time.perf_counter()
            trainer.train_step(log=False)
            times[name] = time.perf_counter() - t
        t = time.perf_counter()
        for j in range(k):
            peft.step(j, step)
        times["peft"] = time.perf_counter() - t
        rounds.append(times)
    return dict(rounds=rounds, padding_free=packs["pack"].task.padding_free)


def loss_memory(k: int, chunked: bool) -> dict:
    from torch.nn import functional as F

    from lorainit.tasks.causal_lm import IGNORE
    from lorainit.train import PackTrainer

    trainer = PackTrainer(runs(k), show_progress=False)
    active = list(range(k))
    batch, lengths = trainer._batch(active)
    trainer.state.set_batch(active, lengths)
    trainer.model.train()
    before = peak_rss_mib()
    if chunked:
        from lorainit.tasks.base import Forward

        trainer.task.loss(trainer.state, batch, Forward(active, False, False)).means().sum().backward()
    else:
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        counted = batch["labels"] != IGNORE
        F.cross_entropy(logits[counted], batch["labels"][counted]).backward()
    return dict(loaded_rss_mib=before, peak_rss_mib=peak_rss_mib())


def measure(name: str, args) -> dict:
    if name == "one":
        return memory(1)
    if name == "pack":
        return memory(args.runs)
    if name == "pack_checkpointed":
        return memory(args.runs, gradient_checkpointing=True)
    if name == "speed":
        return speed(args.runs, args.steps)
    return loss_memory(args.runs, chunked=name == "loss_chunked")


def in_subprocess(name: str, args) -> dict:
    done = subprocess.run([sys.executable, __file__, "--only", name, "--json", "--runs", str(args.runs),
                           "--steps", str(args.steps), "--task", args.task], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"variant {name} failed (exit code {done.returncode})")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", choices=VARIANTS)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--task", choices=("wikitext2", "gsm8k"), default="wikitext2")
    args = parser.parse_args()
    global TASK
    TASK = args.task
    set_environment()
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads; "
          f"fp32 matmul peak {matmul_peak_flops() / 1e9:.0f} GFLOP/s")
    print(f"{args.runs} runs, SmolLM2-135M on {args.task}, batch {BATCH} rows of up to {SEQ} tokens")
    r = {name: in_subprocess(name, args) for name in VARIANTS}
    one, pack, ck = r["one"], r["pack"], r["pack_checkpointed"]
    per_run = one["peak_rss_mib"] - one["loaded_rss_mib"]
    bound = 1.1 * (one["peak_rss_mib"] + args.runs * per_run)
    print(f"peak RSS: one run {one['peak_rss_mib']:.0f} MiB (loaded {one['loaded_rss_mib']:.0f}, so {per_run:.0f} MiB "
          f"per run); pack of {args.runs} {pack['peak_rss_mib']:.0f} MiB; target <= {bound:.0f} MiB: "
          f"{'met' if pack['peak_rss_mib'] <= bound else 'NOT met'}; with gradient checkpointing "
          f"{ck['peak_rss_mib']:.0f} MiB")
    print(f"loss peak RSS over the loaded model: chunked "
          f"{r['loss_chunked']['peak_rss_mib'] - r['loss_chunked']['loaded_rss_mib']:.0f} MiB, plain (full logits) "
          f"{r['loss_plain']['peak_rss_mib'] - r['loss_plain']['loaded_rss_mib']:.0f} MiB")
    rounds = r["speed"]["rounds"][1:]  # the first round warms allocator and thread pools
    print(f"time, {len(rounds)} rounds of one step of every contender (medians of in-round ratios); "
          f"the pack {'is' if r['speed']['padding_free'] else 'is not'} padding-free on this task:")
    print(f"  median step: pack of {args.runs} {median([t['pack'] for t in rounds]):.2f} s, "
          f"{args.runs} PEFT runs {median([t['peft'] for t in rounds]):.2f} s")
    print(f"  pack vs PEFT + AdamW run by run: {median([t['peft'] / t['pack'] for t in rounds]):.2f}x "
          f"(rounds {min(t['peft'] / t['pack'] for t in rounds):.2f}-{max(t['peft'] / t['pack'] for t in rounds):.2f}); "
          f"target >= 1.3x")
    if "pack_padded" in rounds[0]:
        print(f"  padding-free vs right-padded pack: {median([t['pack_padded'] / t['pack'] for t in rounds]):.2f}x")
    print(f"  gradient checkpointing: {median([t['pack_checkpointed'] / t['pack'] for t in rounds]):.2f}x the "
          f"pack's step time")


if __name__ == "__main__":
    main()
