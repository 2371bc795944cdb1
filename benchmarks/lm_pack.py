"""Decoder LLMs: one pack of K SmolLM2-135M runs against one run alone (peak memory) and against the
same K runs done one by one with PEFT and a plain `torch.optim.AdamW` loop (time); and the chunked
loss's peak memory against the plain one (full logits).

The runs: WikiText-2 blocks of 256 tokens (the shared copy: trained on valid.txt), or with
`--task gsm8k` GSM8K rows cut at 256 tokens (uneven: the loss counts the answers only); batch 2,
rank 8, alpha 16, LoRA dropout 0.1 on q_proj and v_proj, lrs spread over 1e-4..3e-3, both inits,
fp32 on the CPU; runs alternate seeds 0 and 1, so that a pack's runs hold different rows. Each
variant runs in its own subprocess of this script, so that its peak RSS is its own:

- `pack`: K runs in one `PackTrainer`, `--steps` training steps, padding-free (the default);
- `pack_padded`: the same with right-padded rows (`causal_lm.PADDING_FREE` off);
- `pack_checkpointed`: the pack with `gradient_checkpointing` on (its peak, and its time);
- `one`: one run in a `PackTrainer` (its peak, and its RSS once loaded, before any step);
- `peft`: the K runs one after another, each a fresh model + PEFT + AdamW over the same rows;
- `loss_chunked`, `loss_plain`: the pack's first batch forward and backward with the chunked
  projection + cross-entropy, and with full logits and `F.cross_entropy` (memory only).

The memory target: pack peak <= 1.1 x (one run's peak + K x (one run's peak - its loaded RSS)),
the per-run term being that run's adapter, optimiser state and activations.

    .venv/bin/python benchmarks/lm_pack.py [--runs 8] [--steps 4] [--only VARIANT --json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from _common import cpu_model, matmul_peak_flops, peak_rss_mib, set_environment

SEQ, BATCH, RANK = 256, 2, 8
VARIANTS = ("one", "pack", "pack_padded", "pack_checkpointed", "peft", "loss_chunked", "loss_plain")
TASK = "wikitext2"


def runs(k: int, **extra):
    from lorainit.config import RunConfig

    lrs = [1e-4 * (30 ** (i / max(1, (k + 1) // 2 - 1))) for i in range((k + 1) // 2)]
    fields = dict(model="smollm2-135m", task=TASK, batch_size=BATCH, max_seq_len=SEQ, rank=RANK, alpha=16,
                  dropout=0.1, max_steps=1000, max_eval_samples=8, save_adapters=False)
    grid = [{"lr": lr, "init": init} for lr in lrs for init in "ab"][:k]
    return [RunConfig.from_dict(fields | g | {"seed": i % 2} | extra) for i, g in enumerate(grid)]


def bench_trainer(k: int, steps: int, **extra) -> dict:
    from lorainit.train import PackTrainer

    start = time.perf_counter()
    trainer = PackTrainer(runs(k, **extra), show_progress=False)
    loaded = peak_rss_mib()
    step_s = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step(log=False)
        step_s.append(time.perf_counter() - t)
    return dict(wall_s=time.perf_counter() - start, step_s=step_s, loaded_rss_mib=loaded, peak_rss_mib=peak_rss_mib())


def bench_peft(k: int, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from torch.nn import functional as F

    from lorainit import models
    from lorainit.engine.order import DataOrder
    from lorainit.tasks.causal_lm import IGNORE, CausalLM

    start = time.perf_counter()
    step_s = []
    task = None
    for run in runs(k):
        model, _ = models.load(run.model, "causal_lm")
        if task is None:
            task = CausalLM(run)  # the rows, read once, as the pack reads them
        model = get_peft_model(model, LoraConfig(r=run.rank, lora_alpha=run.alpha, lora_dropout=run.dropout,
                                                 target_modules=list(run.targets), task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0)
        order = DataOrder(run.seed, task.train_size, run.batch_size)
        model.train()
        for step in range(steps):
            t = time.perf_counter()
            batch = task.batch(order.rows_at(step))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            counted = batch["labels"] != IGNORE
            F.cross_entropy(logits[counted], batch["labels"][counted]).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            step_s.append(time.perf_counter() - t)
    return dict(wall_s=time.perf_counter() - start, step_s=step_s, peak_rss_mib=peak_rss_mib())


def bench_loss(k: int, chunked: bool) -> dict:
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
        return bench_trainer(1, args.steps)
    if name in ("pack", "pack_padded"):
        from lorainit.tasks import causal_lm

        causal_lm.PADDING_FREE = name == "pack"
        return bench_trainer(args.runs, args.steps)
    if name == "pack_checkpointed":
        return bench_trainer(args.runs, args.steps, gradient_checkpointing=True)
    if name == "peft":
        return bench_peft(args.runs, args.steps)
    return bench_loss(args.runs, chunked=name == "loss_chunked")


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
    parser.add_argument("--steps", type=int, default=4)
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
    print(f"{args.runs} runs, SmolLM2-135M on {args.task}, batch {BATCH} rows of up to {SEQ} tokens, {args.steps} steps")
    r = {name: in_subprocess(name, args) for name in VARIANTS}
    per_run = r["one"]["peak_rss_mib"] - r["one"]["loaded_rss_mib"]
    bound = 1.1 * (r["one"]["peak_rss_mib"] + args.runs * per_run)
    print(f"peak RSS: one run {r['one']['peak_rss_mib']:.0f} MiB (loaded {r['one']['loaded_rss_mib']:.0f}, "
          f"so {per_run:.0f} MiB per run); pack of {args.runs} {r['pack']['peak_rss_mib']:.0f} MiB; "
          f"target <= {bound:.0f} MiB: {'met' if r['pack']['peak_rss_mib'] <= bound else 'NOT met'}")
    print(f"loss peak RSS over the loaded model: chunked {r['loss_chunked']['peak_rss_mib'] - r['loss_chunked']['loaded_rss_mib']:.0f} MiB, "
          f"plain (full logits) {r['loss_plain']['peak_rss_mib'] - r['loss_plain']['loaded_rss_mib']:.0f} MiB")
    # the first step of each warms up allocator and thread pools: medians of the rest
    pack_step = sorted(r["pack"]["step_s"][1:])[len(r["pack"]["step_s"][1:]) // 2]
    peft_steps = r["peft"]["step_s"]
    peft_total = sum(peft_steps)
    print(f"time: pack {sum(r['pack']['step_s']):.1f} s of steps ({pack_step:.2f} s median step of {args.runs} runs, "
          f"wall {r['pack']['wall_s']:.1f} s with loading); PEFT one by one {peft_total:.1f} s of steps "
          f"(wall {r['peft']['wall_s']:.1f} s with {args.runs} model loads)")
    print(f"pack vs PEFT + AdamW run by run: {peft_total / sum(r['pack']['step_s']):.2f}x in steps, "
          f"{r['peft']['wall_s'] / r['pack']['wall_s']:.2f}x wall; target >= 1.3x")
    ck = r["pack_checkpointed"]
    print(f"gradient checkpointing: pack peak {ck['peak_rss_mib']:.0f} MiB against {r['pack']['peak_rss_mib']:.0f}, "
          f"steps {sum(ck['step_s']) / sum(r['pack']['step_s']):.2f}x the time")
    print(f"padding-free pack vs right-padded pack: {sum(r['pack_padded']['step_s']) / sum(r['pack']['step_s']):.2f}x "
          f"in steps ({sum(r['pack_padded']['step_s']):.1f} s padded)")


if __name__ == "__main__":
    main()
