"""The GPU check kit: on one CUDA GPU, does a pack train as its runs do alone (fp32, bf16, fp16),
does fp16 loss scaling keep one run's overflow to itself, and how much faster is a pack than the
same runs trained one by one?

It needs nothing but this repository: no network, no hub, no data folder. The rows come from the
data slices lorainit ships (`lorainit.slices`: 4,000 + 872 rows of SST-2, 320 + 32 of GSM8K),
copied to a temporary folder as the GLUE and GSM8K readers expect them. The models are built from their configs with
random weights: a RoBERTa-large-shaped classifier (hidden 1024, 24 layers, 16 heads) and a
TinyLlama-shaped decoder (hidden 2048, 22 layers, 32 query and 4 key/value heads), each saved
with `save_pretrained` together with a byte-level BPE tokenizer trained on the carried text
(about 14 tokens a SST-2 training row and 196 a GSM8K row, close to what pretrained tokenizers
make of the same rows), so that the runs load them as `model=<folder>`.

Sections, in order; each has its own time budget, and one that fails or runs out of time is
reported as failed with its error while the kit goes on to the next:

- `setup`: versions, the device, the carried data laid out, the tokenizers and the encoder built,
  the matmul peak of the timing precision measured (bf16 on CUDA, fp32 on a CPU).
- `pack_fp32`, `pack_bf16`, `pack_fp16`: four runs (both inits, three learning rates, seeds 0, 1
  and 2 mixed; LoRA, hidden and attention dropout on) trained 20 steps as one pack and each alone
  through the same trainer. Measured as the tests measure a pack against its runs alone:
  max |pack - alone| / max |alone| over each run's loss curve and over its final eval loss; each
  trained tensor (LoRA factors, head) as ||pack - alone|| / ||alone||. fp32 must hold the tests'
  bound (1e-4 on the losses) with TF32 off; bf16 and fp16 have looser bounds (`BOUNDS`), and each
  row also gives how far the same runs alone move from fp32 (the precision's own drift).
- `fp16_overflow`: three fp16 runs in a pack, the middle one's loss scale set to 2^100 so that
  every one of its steps overflows. It must never step (its tensors bit for bit as initialised,
  its scale halved at every step), and its pack-mates must train exactly as in the same pack
  without the overflow (bit for bit where that pack trained twice is bit for bit the same, else
  within `SPREAD` times its own spread), and as in a pack without the run, within the fp16 bounds.
- `encoder_22`: the paper's 22-run grid (11 learning rates x 2 inits, one seed) on the
  RoBERTa-large-shaped model, batch 4, SST-2 rows, max_seq_len 128, as one pack against the same
  runs one by one with PEFT and a plain `torch.optim.AdamW` loop, and with HF Trainer + PEFT where
  it imports. Only a few runs of each baseline are timed; their rate stands for all 22.
- `encoder_66`: the 66-run pack (the same grid x 3 seeds in one pack), or "did not fit".
- `decoder`: 8 runs on the TinyLlama-shaped model and GSM8K rows (batch 4, max_seq_len 512) as
  one pack against the same runs one by one, the same two ways.

Every timing trains `warmup` steps untimed, then times `steps` steps (each clock read waits for
the GPU), in bf16 autocast on CUDA (`--timing-precision`), and reports steps/s, run-steps/s (runs
x steps per second), how many times a baseline's run-steps/s the pack's are, and TFLOP/s: 4 x
(frozen body parameters, embeddings and output head left out) x real tokens per second, the
frozen weights' forward and backward-to-the-input work, against the matmul peak measured in
`setup`. Neither attention's T^2 work nor the adapters count. For the pack this is the rate of the
work a full forward would do: its classifier's last layer computes only the token the head reads,
and runs sharing rows share the first layer's frozen work. Timed runs train on through a large
loss (`NEVER_DIVERGED`), as the baselines do, so that no pack shrinks while it is timed.

The table is printed and written as JSON to `--out` (default $OUT, else runs/gpu_check), as
gpu_check.json and gpu_check.txt; the JSON is rewritten after every section. The exit status is 1
when a check failed or a section failed to run, else 0 (skipped sections and "did not fit" count
as run).

`--tiny` runs the same sections on the CPU with 2-layer, hidden-64 models and a few steps (well
under a minute, on one torch thread): fp32 only, so the bf16 and fp16 sections say "skipped: needs CUDA", while the
timing sections run at that size so that their code keeps working. `--cpu-autocast` runs the
bf16 and fp16 sections on the CPU through CPU autocast instead (their numbers are not a GPU's).

    bash benchmarks/gpu_check.sh [--tiny] [--only pack_fp32,decoder] [--budget 470] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

STARTED = time.perf_counter()  # the kit's budget counts from here, imports included
os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may fetch
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("lorainit") is None:  # a bare checkout: the package from its source tree
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from lorainit import slices  # noqa: E402
from _common import clock, cuda_matmul_tf32, frozen_flop_params, matmul_peak_flops, peak_cuda_mib, peft_lora  # noqa: E402

SECTIONS = ("setup", "pack_fp32", "pack_bf16", "pack_fp16", "fp16_overflow", "encoder_22", "encoder_66",
            "decoder")
# seconds per section on the GPU; with the imports, their sum stays under the kit's 8 minutes
BUDGETS = {"setup": 60, "pack_fp32": 55, "pack_bf16": 45, "pack_fp16": 45, "fp16_overflow": 45,
           "encoder_22": 80, "encoder_66": 40, "decoder": 100}
TINY_BUDGET = 120  # seconds per section with --tiny (it needs a few; the rest is room for a busy machine)

# Pack against alone: relative bounds on the loss curves, the final eval loss, and the trained
# tensors. fp32 is the tests' bound for 20 steps (fp32 rounding between a slot of a batched
# matmul and a batch of one, carried on by Adam); bf16 and fp16 round every matmul output to 8
# and 11 bits, so where two kernels accumulate in different orders, a last bit flips.
BOUNDS = {"fp32": {"loss": 1e-4, "eval_loss": 1e-4, "tensors": 1e-3},
          "bf16": {"loss": 3e-2, "eval_loss": 3e-2, "tensors": 1.5e-1},
          "fp16": {"loss": 1e-2, "eval_loss": 1e-2, "tensors": 5e-2}}
# the check's runs: both inits, three lrs, three seeds mixed (a seed shared by two runs, too)
CHECK_RUNS = ({"init": "a", "lr": 1e-3, "seed": 0}, {"init": "b", "lr": 3e-3, "seed": 1},
              {"init": "a", "lr": 3e-4, "seed": 2}, {"init": "b", "lr": 1e-3, "seed": 0, "lr_b_ratio": 4.0})
CHECK_FIELDS = {"max_steps": 20, "max_train_samples": 160, "max_eval_samples": 32, "dropout": 0.1}
OVERFLOW_SCALE = 2.0**100  # the overflowing run's loss scale: fp16 gradients overflow at any step
# The overflow may move its pack-mates no further from the same pack without it than this many
# times that pack trained twice differs from itself: not at all where the kernels are deterministic.
SPREAD = 10

LR_GRID = tuple(2.0**k * 1e-5 for k in range(11))  # the paper's GLUE grid, x Init[A] / Init[B]
# Timed runs keep training through a large loss, as the baselines do (a non-finite one still
# stops a run, and the table says so): a pack that shrank mid-timing would time less work.
NEVER_DIVERGED = 1e9
BPE_VOCAB = 8192
ENCODER_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's ids 0..4: pad is 1
DECODER_SPECIALS = ("<unk>", "<s>", "</s>")                      # Llama's ids 0..2, no pad token


@dataclass(frozen=True)
class Sizes:
    """Model shapes and run counts: the real ones on a GPU, tiny ones for `--tiny`."""

    encoder: dict
    decoder: dict
    warmup: int            # untimed steps before the timed ones
    steps: int             # timed steps
    loop_runs: int         # runs timed one by one with PEFT + AdamW
    trainer_runs: int      # runs timed one by one with HF Trainer + PEFT
    decoder_runs: int
    decoder_warmup: int
    decoder_steps: int
    decoder_seq_len: int
    peak_n: int            # matmul size of the peak measurement


FULL = Sizes(
    encoder=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
    decoder=dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
    warmup=3, steps=20, loop_runs=3, trainer_runs=2, decoder_runs=8, decoder_warmup=2, decoder_steps=10,
    decoder_seq_len=512, peak_n=8192)
TINY = Sizes(
    encoder=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=BPE_VOCAB, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
    decoder=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=BPE_VOCAB, max_position_embeddings=1024),
    warmup=1, steps=3, loop_runs=2, trainer_runs=1, decoder_runs=8, decoder_warmup=1, decoder_steps=2,
    decoder_seq_len=256, peak_n=512)


class OutOfTime(BaseException):
    """A section ran past its budget (a BaseException, so that no `except Exception` swallows it)."""


class Skipped(Exception):
    """A section that cannot run here; its message says why."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise OutOfTime in the main thread once `seconds` have passed."""
    def on_alarm(signum, frame):
        raise OutOfTime(f"ran past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def say(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


@dataclass
class Kit:
    """What the sections share: the options, the device, the temporary folder and what setup built."""

    args: argparse.Namespace
    sizes: Sizes
    device: str
    work: Path
    timing_precision: str
    notes: list[str] = field(default_factory=list)     # fallbacks and skips, for the JSON and the table
    encoder: str | None = None                         # the encoder's model folder
    decoder: str | None = None                         # the decoder's model folder
    flop_params: dict[str, int] = field(default_factory=dict)
    peak_flops: float | None = None
    alone_fp32: dict[int, dict] = field(default_factory=dict)   # check run -> its fp32 run alone
    baseline_rates: dict[str, float] = field(default_factory=dict)  # encoder baselines' run-steps/s

    @property
    def glue_dir(self) -> str:
        return str(self.work / "data" / "glue")

    @property
    def gsm8k_dir(self) -> str:
        return str(self.work / "data" / "gsm8k")

    def low_precision_device(self) -> None:
        """The bf16 and fp16 sections measure a GPU: on a CPU only with `--cpu-autocast`; else Skipped."""
        if self.device != "cuda" and not self.args.cpu_autocast:
            raise Skipped("needs CUDA")


# -- setup: data, tokenizers, models, peak ----------------------------------------------------

def lines_of(path: Path) -> list[str]:
    """The file's non-empty lines, split at newlines only (a sentence may hold other line breaks)."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def lay_out_data(root: Path) -> dict:
    """Copy the data slices lorainit ships (`lorainit.slices`) where the readers look:
    <root>/glue/SST-2/{train,dev}.tsv and <root>/gsm8k/{train,test}.jsonl. Returns the rows per file."""
    counts = {}
    for folder, names in (("glue/SST-2", ("train.tsv", "dev.tsv")), ("gsm8k", ("train.jsonl", "test.jsonl"))):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(slices.ROOT / folder / name, root / folder / name)
            rows = lines_of(root / folder / name)
            counts[f"{folder.removeprefix('glue/')}/{name}"] = len(rows) - name.endswith(".tsv")  # less the header
    return counts


def build_tokenizer(texts: list[str], specials: tuple[str, ...], encoder: bool):
    """A byte-level BPE trained on `texts`, as a transformers fast tokenizer.

    The encoder's frames a row as RoBERTa does (`<s> A </s>`, pairs `<s> A </s></s> B </s>`), pad
    id 1; the decoder's starts a row with `<s>` as Llama does, splits digits one by one as Llama
    does, and has no pad token."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    split = [] if encoder else [pre_tokenizers.Digits(individual_digits=True)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = {s: tok.token_to_id(s) for s in specials}
    if encoder:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>",
                                       model_input_names=["input_ids", "attention_mask"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", ids["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def build_encoder(kit: Kit) -> str:
    """The RoBERTa-shaped classifier with random weights and its tokenizer, saved to one folder."""
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    sst2 = kit.work / "data" / "glue" / "SST-2"
    texts = [line.split("\t")[0] for f in ("train.tsv", "dev.tsv")
             for line in lines_of(sst2 / f)[1:]]
    tokenizer = build_tokenizer(texts, ENCODER_SPECIALS, encoder=True)
    config = RobertaConfig(**kit.sizes.encoder, num_labels=2, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    kit.flop_params["encoder"] = frozen_flop_params(model)
    return save(model, tokenizer, kit.work / "models" / "encoder")


def save(model, tokenizer, folder: Path) -> str:
    """`save_pretrained` of both into `folder`, without progress bars."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        logging.enable_progress_bar()
    return str(folder)


def build_decoder(kit: Kit) -> str:
    """The Llama-shaped decoder with random weights and its tokenizer, saved to one folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    texts = [f"{r['question']}\n{r['answer']}" for f in ("train.jsonl", "test.jsonl")
             for r in map(json.loads, lines_of(Path(kit.gsm8k_dir) / f))]
    tokenizer = build_tokenizer(texts, DECODER_SPECIALS, encoder=False)
    config = LlamaConfig(**kit.sizes.decoder, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    kit.flop_params["decoder"] = frozen_flop_params(model)
    folder = save(model, tokenizer, kit.work / "models" / "decoder")
    del model
    gc.collect()
    return folder


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pinned_versions() -> dict[str, str]:
    """The project's pins (pyproject.toml `name==version`)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text))


def section_setup(kit: Kit, out: dict) -> None:
    versions = {name: _version(name) for name in ("torch", "transformers", "peft", "tokenizers", "safetensors",
                                                  "accelerate")}
    versions["python"] = platform.python_version()
    out["versions"] = versions
    pins = pinned_versions()
    for name in ("torch", "transformers", "peft"):
        have, want = versions.get(name), pins.get(name)
        if have and want and have.split("+")[0] != want:
            kit.notes.append(f"{name} {have} here; the project pins {want}")
    out["device"] = (torch.cuda.get_device_name(0) if kit.device == "cuda"
                     else f"CPU ({os.cpu_count()} cores, torch threads: {torch.get_num_threads()})")
    if kit.device == "cuda":
        out["cuda"] = torch.version.cuda
        out["tf32_matmul"] = cuda_matmul_tf32()
    out["data"] = lay_out_data(kit.work / "data")
    os.environ["LORAINIT_DATA"] = str(kit.work / "data")  # nothing reads the hub or a folder elsewhere
    start = time.perf_counter()
    kit.encoder = build_encoder(kit)
    out["encoder"] = {"config": kit.sizes.encoder, "flop_params": kit.flop_params["encoder"],
                      "seconds": round(time.perf_counter() - start, 1)}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kit.timing_precision]
    kit.peak_flops = matmul_peak_flops(kit.sizes.peak_n, repeats=10, device=kit.device, dtype=dtype)
    out["peak"] = {"dtype": kit.timing_precision, "n": kit.sizes.peak_n, "tflops": kit.peak_flops / 1e12}
    out["rows"].append(row("setup", f"{kit.timing_precision} matmul peak", "ok", tflops=kit.peak_flops / 1e12,
                           note=f"{out['device']}; {kit.sizes.peak_n}^3 matmul"))


# -- pack against alone -----------------------------------------------------------------------

def runs_from(kit: Kit, specs: list[dict], **shared):
    from lorainit.config import RunConfig

    return [RunConfig.from_dict({"model": kit.encoder, "task": "sst2", "data_dir": kit.glue_dir, "batch_size": 4,
                                 "max_seq_len": 128, "save_adapters": False} | shared | spec) for spec in specs]


def snapshot(trainer) -> list[dict[str, torch.Tensor]]:
    """Each run's trained tensors (LoRA factors, head), on the CPU in fp32: [run][name]."""
    named = trainer.pack.named_parameters()
    return [{n: p.detach()[k].float().cpu().clone() for n, p in named.items()} for k in range(trainer.K)]


def train(kit: Kit, runs, before=None, scale: dict[int, float] | None = None):
    """Train `runs` as one pack; returns (results, each run's tensors, the trainer). `scale`
    sets runs' fp16 loss scales before the first step; `before(trainer)` is called then too."""
    from lorainit.train import PackTrainer

    free(kit)  # the last pack's model and state (they hold reference cycles)
    trainer = PackTrainer(runs, device=kit.device, show_progress=False)
    if scale:
        if getattr(trainer, "scaler", None) is None:
            raise RuntimeError("the fp16 pack has no loss scaler (PackTrainer.scaler)")
        for k, value in scale.items():
            trainer.scaler.scale[k] = value
    if before is not None:
        before(trainer)
    results = trainer.run()
    return results, snapshot(trainer), trainer


def losses(result) -> list[float]:
    return [m["value"] for m in result.metrics if m["name"] == "train_loss"]


def relative(ours, reference) -> float:
    """max |ours - reference| / max |reference|: the tests' measure of two code paths' agreement."""
    ours = torch.as_tensor(ours, dtype=torch.float64)
    reference = torch.as_tensor(reference, dtype=torch.float64)
    if ours.shape != reference.shape:
        return math.inf
    if not reference.numel():
        return 0.0
    scale = reference.abs().max().item()
    return (ours - reference).abs().max().item() / (scale if scale > 0 else 1.0)


def tensor_distance(ours: dict, reference: dict) -> float:
    """max over tensors of ||ours - reference|| / ||reference||; inf if the names differ."""
    if ours.keys() != reference.keys():
        return math.inf
    worst = 0.0
    for name, ref in reference.items():
        norm = ref.norm().item()
        worst = max(worst, (ours[name] - ref).norm().item() / (norm if norm > 0 else 1.0))
    return worst


def compare(res_a, tensors_a, res_b, tensors_b) -> dict:
    """How far run a is from run b: loss curve, final eval loss, trained tensors."""
    a_eval, b_eval = res_a.final.get("eval_loss"), res_b.final.get("eval_loss")
    if a_eval is None or b_eval is None:  # a diverged run has no evaluation: both or neither
        eval_loss = 0.0 if a_eval is None and b_eval is None else math.inf
    else:
        eval_loss = relative(a_eval, b_eval)
    return {"loss": relative(losses(res_a), losses(res_b)), "eval_loss": eval_loss,
            "tensors": tensor_distance(tensors_a, tensors_b)}


def worst(diffs: list[dict]) -> dict:
    return {key: max(d[key] for d in diffs) for key in diffs[0]}


@contextlib.contextmanager
def ieee_fp32(kit: Kit):
    """fp32 matmuls in full fp32 for the fp32 check: TF32 turned off if this process has it on
    (torch's default is off), and restored after."""
    if kit.device != "cuda" or not cuda_matmul_tf32():
        yield
        return
    matmul = torch.backends.cuda.matmul
    kit.notes.append("TF32 was on for fp32 matmuls; the fp32 check turned it off")
    if hasattr(matmul, "fp32_precision"):
        before, matmul.fp32_precision = matmul.fp32_precision, "ieee"
    else:
        before, matmul.allow_tf32 = matmul.allow_tf32, False
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            if hasattr(matmul, "fp32_precision"):
                matmul.fp32_precision = before
            else:
                matmul.allow_tf32 = before


def section_pack(kit: Kit, out: dict, precision: str) -> None:
    if precision != "fp32":
        kit.low_precision_device()
    runs = runs_from(kit, list(CHECK_RUNS), **CHECK_FIELDS, precision=precision)
    bounds = BOUNDS[precision]
    per_run, drift = [], []
    out.update(precision=precision, bounds=bounds, per_run=per_run)  # filled as each run is compared
    with ieee_fp32(kit) if precision == "fp32" else contextlib.nullcontext():
        packed, packed_tensors, _ = train(kit, runs)
        for k, run in enumerate(runs):
            (alone,), (alone_tensors,), _ = train(kit, [run])
            if alone.status != packed[k].status or alone.steps != packed[k].steps:
                raise AssertionError(f"run {k}: the pack's run is {packed[k].status} after {packed[k].steps} steps, "
                                     f"alone {alone.status} after {alone.steps}")
            per_run.append(compare(packed[k], packed_tensors[k], alone, alone_tensors))
            if precision == "fp32":
                kit.alone_fp32[k] = {"result": alone, "tensors": alone_tensors}
            elif k in kit.alone_fp32:
                ref = kit.alone_fp32[k]
                drift.append(compare(alone, alone_tensors, ref["result"], ref["tensors"]))
    measured = worst(per_run)
    passed = all(measured[key] <= bounds[key] for key in bounds)
    distinct = len({round(losses(r)[-1], 6) for r in packed})
    out.update(runs=len(runs), steps=CHECK_FIELDS["max_steps"], measured=measured, distinct_final_losses=distinct,
               statuses=[r.status for r in packed])
    if drift:
        out["drift_from_fp32"] = worst(drift)
    if distinct < len(runs):
        passed = False
        out["problem"] = "the runs' final losses are not all different: the check compares too little"
    note = (f"eval loss {measured['eval_loss']:.1e} (<= {bounds['eval_loss']:.1e}), tensors "
            f"{measured['tensors']:.1e} (<= {bounds['tensors']:.1e})")
    if drift:
        note += f"; alone vs fp32: loss {out['drift_from_fp32']['loss']:.1e}"
    out["status"] = "pass" if passed else "fail"
    out["rows"].append(row(f"pack_{precision}", f"{len(runs)} runs, pack vs alone", out["status"], runs=len(runs),
                           diff=measured["loss"], bound=bounds["loss"], note=note))


def section_overflow(kit: Kit, out: dict) -> None:
    kit.low_precision_device()
    specs = [{"init": "a", "lr": 1e-3, "seed": 0}, {"init": "b", "lr": 1e-3, "seed": 1},
             {"init": "b", "lr": 3e-4, "seed": 2}]
    runs = runs_from(kit, specs, **CHECK_FIELDS, precision="fp16")
    initial = {}
    flooded, flooded_tensors, trainer = train(kit, runs, scale={1: OVERFLOW_SCALE},
                                              before=lambda t: initial.update(run=snapshot(t)[1]))
    steps = flooded[1].steps
    scale_after = trainer.scaler.scale.tolist()
    del trainer
    plain, plain_tensors, _ = train(kit, runs)
    again, again_tensors, _ = train(kit, runs)
    without, without_tensors, _ = train(kit, [runs[0], runs[2]])
    never_stepped = all(torch.equal(flooded_tensors[1][n], t) for n, t in initial["run"].items())
    expected_scale = OVERFLOW_SCALE * 0.5**steps
    mates = (0, 2)
    vs_plain = worst([compare(flooded[k], flooded_tensors[k], plain[k], plain_tensors[k]) for k in mates])
    floor = worst([compare(again[k], again_tensors[k], plain[k], plain_tensors[k]) for k in mates])
    vs_without = worst([compare(flooded[k], flooded_tensors[k], without[j], without_tensors[j])
                        for j, k in enumerate(mates)])
    bounds = BOUNDS["fp16"]
    checks = {
        "overflowing run never stepped (its tensors as initialised, bit for bit)": never_stepped,
        f"its loss scale halved at each of its {steps} steps": scale_after[1] == expected_scale,
        "its pack-mates as in the same pack without the overflow": all(vs_plain[k] <= SPREAD * floor[k]
                                                                      for k in vs_plain),
        "its pack-mates as in a pack without the run (fp16 bounds)": all(vs_without[k] <= bounds[k] for k in bounds),
        "its pack-mates trained": all(flooded[k].status == "done" and flooded[k].steps == steps for k in mates),
    }
    out.update(steps=steps, scale_after=scale_after, expected_scale=expected_scale, checks=checks,
               mates_vs_same_pack=vs_plain, same_pack_twice=floor, mates_vs_pack_without=vs_without, bounds=bounds,
               bit_identical_to_same_pack=all(v == 0 for v in vs_plain.values()))
    out["status"] = "pass" if all(checks.values()) else "fail"
    failed = [name for name, ok in checks.items() if not ok]
    note = (f"mates vs same pack {vs_plain['tensors']:.1e} (twice: {floor['tensors']:.1e}), vs pack without it "
            f"{vs_without['tensors']:.1e}; scale 2^100 -> 2^{math.log2(scale_after[1]):.0f}")
    if failed:
        note = "FAILED: " + "; ".join(failed) + " | " + note
    out["rows"].append(row("fp16_overflow", "1 of 3 runs overflows", out["status"], runs=3,
                           diff=vs_plain["loss"], bound=floor["loss"], note=note))


# -- timing -----------------------------------------------------------------------------------

def grid_runs(kit: Kit, seeds=(0,), **shared):
    specs = [{"lr": lr, "init": init, "seed": seed} for seed in seeds for lr in LR_GRID for init in "ab"]
    return runs_from(kit, specs, precision=kit.timing_precision, max_eval_samples=8,
                     max_steps=kit.sizes.warmup + kit.sizes.steps + PROFILED_STEPS + 1,
                     divergence_factor=NEVER_DIVERGED, **shared)


def spread(items: list, count: int) -> list:
    """`count` items of `items` at evenly spaced positions (the first and the last among them)."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def rates(kit: Kit, runs: int, steps: int, seconds: float, tokens: int, flop_params: int,
          one_by_one: bool = False) -> dict:
    """Rates of `steps` steps of `runs` runs in `seconds`: as one pack (a step steps every run), or
    `one_by_one` (the seconds add up the runs' own, and a step is one run's)."""
    flops = 4 * flop_params * tokens / seconds
    run_steps = runs * steps / seconds
    return {"steps_per_s": run_steps if one_by_one else steps / seconds, "run_steps_per_s": run_steps, "tokens": tokens,
            "tflops": flops / 1e12, "of_peak": flops / kit.peak_flops if kit.peak_flops else None}


def oom_errors() -> tuple:
    return tuple(e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                 if e is not None)


def reset_peak(kit: Kit) -> None:
    if kit.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(kit: Kit) -> float | None:
    return peak_cuda_mib() / 1024 if kit.device == "cuda" else None


PROFILED_STEPS = 3  # after the timed steps, on CUDA: the share of a step the GPU spends in kernels


def gpu_busy(profiler, seconds: float) -> float:
    """The GPU's kernel time over `seconds` of wall time, from a CUDA profile of those seconds:
    well under 1 means the GPU waits on the host (the step is launch-bound, and capturing it in a
    CUDA graph or `torch.compile` is worth measuring)."""
    cuda = torch.autograd.DeviceType.CUDA
    kernel_us = sum(e.time_range.elapsed_us() for e in profiler.events() if e.device_type == cuda)
    return kernel_us / 1e6 / seconds


def time_pack(kit: Kit, runs, warmup: int, steps: int, flop_params: int) -> dict:
    """A pack through `PackTrainer.run`: steps warmup+1 .. warmup+steps timed (the first and the
    last step record probes, and are outside), real tokens counted from the task's token masks."""
    from lorainit.train import PackTrainer

    reset_peak(kit)
    trainer = PackTrainer(runs, device=kit.device, show_progress=False)
    counts: list[torch.Tensor] = []  # each step's real tokens, left on the device until the end
    token_mask = trainer.task.token_mask

    def counting(batch):
        mask = token_mask(batch)
        counts.append(mask.sum())
        return mask

    trainer.task.token_mask = counting
    stamps: dict[int, float] = {}
    # On CUDA, torch's sync debug mode warns at every operation that makes the host wait for the
    # GPU: counted over the timed steps, that is the host reads per step (the trainer makes one)
    syncs: list[int] = []

    profiled = warmup + steps + PROFILED_STEPS
    profile: dict = {}

    def on_step(t, losses, rate):
        if t.step in (warmup, warmup + steps):  # the clock waits for the GPU: only at the two ends
            stamps[t.step] = clock(kit.device)
            if kit.device == "cuda":
                torch.cuda.set_sync_debug_mode("warn" if t.step == warmup else "default")
                syncs.append(len(seen))
        if kit.device == "cuda" and t.step in (warmup + steps, profiled):
            try:  # a diagnostic: its failure costs the column, not the timing
                if t.step == warmup + steps:
                    profile["p"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                    profile["p"].__enter__()
                    profile["start"] = clock(kit.device)
                elif "p" in profile:
                    seconds = clock(kit.device) - profile["start"]
                    done = profile.pop("p")
                    done.__exit__(None, None, None)
                    profile["busy"] = gpu_busy(done, seconds)
            except Exception as err:  # noqa: BLE001
                profile.pop("p", None)
                kit.notes.append(f"the GPU-busy profile failed: {type(err).__name__}: {err}")

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            trainer.run(on_step=on_step)
        finally:
            if kit.device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            if "p" in profile:  # the pack stopped inside the profiled steps
                profile.pop("p").__exit__(None, None, None)
    for w in seen:  # the others were the run's own: shown as they would have been
        if "synchroniz" not in str(w.message):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if warmup + steps not in stamps:
        raise RuntimeError(f"the pack stopped after {trainer.step} steps (all runs diverged?)")
    seconds = stamps[warmup + steps] - stamps[warmup]
    tokens = int(sum(c.item() for c in counts[warmup:warmup + steps]))
    if len(syncs) == 2:
        syncs = [sum("synchroniz" in str(w.message) for w in seen[:i]) for i in syncs]
    measured = rates(kit, len(runs), steps, seconds, tokens, flop_params)
    measured.update(runs=len(runs), timed_runs=len(runs), steps=steps, seconds=seconds, peak_gib=peak_gib(kit),
                    diverged=sum(r.status == "diverged" for r in trainer.results),
                    syncs_per_step=(syncs[1] - syncs[0]) / steps if len(syncs) == 2 else None,
                    gpu_busy=profile.get("busy"))
    del trainer
    free(kit)
    return measured


def free(kit: Kit) -> None:
    gc.collect()
    if kit.device == "cuda":
        torch.cuda.empty_cache()


def peft_wrap(model, run, task_type: str):
    """PEFT LoRA with the run's rank, alpha, dropout and targets; Init[B] redrawn by hand (PEFT's
    default is Init[A]), the head trainable for classifiers."""
    return peft_lora(model, run.rank, run.alpha, run.dropout, run.targets, task_type, run.init)


def autocast(kit: Kit):
    """The trainer's own autocast for the timing precision, for the runs done one by one."""
    from lorainit.engine import precision

    return precision.autocast(kit.timing_precision, torch.device(kit.device))


def time_loop(kit: Kit, base, runs, lengths: list[int], loss_of, task_type: str, warmup: int, steps: int,
              flop_params: int) -> dict:
    """Run by run: a copy of the base model, PEFT, `torch.optim.AdamW` with clipping and the linear
    schedule, on the batches the pack gives the run (`lengths`: each training row's tokens); steps
    warmup+1 .. warmup+steps timed, the clock read (which waits for the GPU) only at those two."""
    from transformers import get_linear_schedule_with_warmup

    from lorainit.engine.order import DataOrder

    total = warmup + steps + 1
    seconds, tokens = 0.0, 0
    reset_peak(kit)
    for run in runs:
        torch.manual_seed(run.seed)
        model = peft_wrap(copy.deepcopy(base), run, task_type).to(kit.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)
        schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(run.warmup_ratio * total), total)
        scaler = torch.amp.GradScaler(kit.device) if kit.timing_precision == "fp16" else None
        order = DataOrder(run.seed, len(lengths), run.batch_size)
        model.train()
        for step in range(warmup + steps):
            if step == warmup:
                start = clock(kit.device)
            rows = order.rows_at(step)
            if step >= warmup:
                tokens += sum(lengths[i] for i in rows)
            with autocast(kit):
                loss = loss_of(model, rows)
            if scaler is None:
                loss.backward()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, run.max_grad_norm)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            schedule.step()
            optimizer.zero_grad()
        seconds += clock(kit.device) - start
        del model, optimizer, schedule, params
        free(kit)
    measured = rates(kit, len(runs), steps, seconds, tokens, flop_params, one_by_one=True)
    measured.update(runs=len(runs), timed_runs=len(runs), steps=steps, seconds=seconds, peak_gib=peak_gib(kit))
    return measured


def trainer_missing() -> str | None:
    """None if HF Trainer can train here, else why not (it needs accelerate besides transformers)."""
    try:
        from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: F401
        from transformers.utils import is_accelerate_available
    except Exception as err:  # noqa: BLE001 - any failure means no Trainer baseline
        return f"transformers.Trainer does not import ({type(err).__name__}: {err})".splitlines()[0][:200]
    if not is_accelerate_available():
        return "transformers.Trainer needs accelerate, which is not installed"
    return None


def baseline(kit: Kit, out: dict, section: str, key: str, label: str, total_runs: int, pack: dict, measure) -> None:
    """Time one baseline with `measure()` into out[key] and a table row; a baseline that fails gets
    a failed row (and fails its section), without stopping the others."""
    why = "peft is not installed" if importlib.util.find_spec("peft") is None else None
    if why is None and key == "trainer":
        why = trainer_missing()
    if why is not None:
        kit.notes.append(f"{section}: {label} skipped: {why}")
        out["rows"].append(row(section, label, "skipped", note=why))
        return
    try:
        measured = measure()
    except oom_errors() as err:
        free(kit)
        out["rows"].append(row(section, label, "did not fit", note=str(err).splitlines()[0][:300]))
        return
    except Exception as err:  # noqa: BLE001 - reported in its row; the other variants go on
        free(kit)
        out.setdefault("failed_variants", {})[key] = f"{type(err).__name__}: {err}"[:500]
        out["rows"].append(row(section, label, "failed", note=f"{type(err).__name__}: {err}"[:300]))
        return
    out[key] = measured
    out["rows"].append(timing_row(section, label, measured, total_runs, pack))


def pad_rows(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad dict rows to their longest: input_ids with `pad_id`, attention_mask with 0, list
    labels with -100; int labels stacked."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.full((len(features), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(features), width), dtype=torch.long)}
    token_labels = isinstance(features[0]["labels"], list)
    labels = torch.full((len(features), width), -100, dtype=torch.long) if token_labels else None
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(f["input_ids"])
        batch["attention_mask"][i, :n] = 1
        if token_labels:
            labels[i, :n] = torch.tensor(f["labels"])
    batch["labels"] = labels if token_labels else torch.tensor([f["labels"] for f in features])
    return batch


def time_trainer(kit: Kit, base, runs, rows: list[dict], pad_id: int, warmup: int, steps: int,
                 flop_params: int) -> dict:
    """Run by run: a copy of the base model, PEFT, `transformers.Trainer` for warmup+steps steps,
    its own data order; steps warmup+1 .. warmup+steps timed from its step-end callbacks (the
    clock read, which waits for the GPU, only at those two), real tokens counted as it collates."""
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    transformers.logging.set_verbosity_error()
    total = warmup + steps
    seconds, tokens = 0.0, 0
    reset_peak(kit)

    class Stamps(TrainerCallback):
        def __init__(self):
            self.times: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, total):
                self.times[state.global_step] = clock(kit.device)

    task_type = "SEQ_CLS" if not isinstance(rows[0]["labels"], list) else "CAUSAL_LM"
    with tempfile.TemporaryDirectory(dir=kit.work) as out_dir:  # Trainer wants one; nothing is saved
        for run in runs:
            torch.manual_seed(run.seed)
            model = peft_wrap(copy.deepcopy(base), run, task_type)
            stamps, collated = Stamps(), []  # real tokens of each batch, in the order the steps take them

            def collate(features):
                collated.append(sum(len(f["input_ids"]) for f in features))
                return pad_rows(features, pad_id)

            args = TrainingArguments(
                output_dir=out_dir, max_steps=total, per_device_train_batch_size=run.batch_size,
                learning_rate=run.lr, warmup_steps=math.ceil(run.warmup_ratio * total), lr_scheduler_type="linear",
                weight_decay=run.weight_decay, max_grad_norm=run.max_grad_norm, seed=run.seed, report_to=[],
                save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
                use_cpu=kit.device == "cpu", bf16=kit.timing_precision == "bf16",
                fp16=kit.timing_precision == "fp16", dataloader_num_workers=0, remove_unused_columns=False)
            trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[stamps])
            with contextlib.redirect_stdout(io.StringIO()):  # its closing summary
                trainer.train()
            if len(stamps.times) < 2 or len(collated) < total:
                raise RuntimeError(f"Trainer stopped after {trainer.state.global_step} of {total} steps")
            seconds += stamps.times[total] - stamps.times[warmup]
            tokens += sum(collated[warmup:total])
            del trainer, model
            free(kit)
    measured = rates(kit, len(runs), steps, seconds, tokens, flop_params, one_by_one=True)
    measured.update(runs=len(runs), timed_runs=len(runs), steps=steps, seconds=seconds, peak_gib=peak_gib(kit))
    return measured


def timing_row(section: str, variant: str, measured: dict, total_runs: int, pack: dict | None) -> dict:
    note = ""
    if measured["timed_runs"] < total_runs:
        note = f"timed {measured['timed_runs']} of the {total_runs} runs one by one; their rate stands for all"
    if measured.get("diverged"):
        note = f"{measured['diverged']} runs diverged (a non-finite loss) and left the pack"
    speedup = pack["run_steps_per_s"] / measured["run_steps_per_s"] if pack and pack is not measured else None
    return row(section, variant, "ok", runs=total_runs, steps_per_s=measured["steps_per_s"],
               run_steps_per_s=measured["run_steps_per_s"], pack_x=speedup, tflops=measured["tflops"],
               of_peak=measured["of_peak"], peak_gib=measured.get("peak_gib"),
               syncs=measured.get("syncs_per_step"), busy=measured.get("gpu_busy"), note=note)


def encoder_baselines(kit: Kit, out: dict, section: str, runs, pack: dict) -> None:
    """PEFT + AdamW and Trainer + PEFT, a few of `runs` each, against the pack's rate."""
    from lorainit import models
    from lorainit.tasks.classification import collate, encode_run, read_split

    first = runs[0]
    base, tokenizer = models.load(kit.encoder, "classification", num_labels=2)
    base.to(kit.device)
    train_rows = read_split(encode_run(first, tokenizer), "train")
    ids, labels = train_rows.ids, train_rows.labels
    pad_id = tokenizer.pad_token_id

    def loss_of(model, idx):
        batch = {k: v.to(kit.device) for k, v in collate([ids[i] for i in idx], pad_id).items()}
        return model(**batch, labels=labels[idx].to(kit.device)).loss

    sizes, flop_params = kit.sizes, kit.flop_params["encoder"]
    baseline(kit, out, section, "loop", "PEFT + AdamW loop", len(runs), pack, lambda: time_loop(
        kit, base, spread(runs, sizes.loop_runs), [len(x) for x in ids], loss_of, "SEQ_CLS", sizes.warmup,
        sizes.steps, flop_params))
    rows = [{"input_ids": x, "labels": int(y)} for x, y in zip(ids, labels.tolist())]
    baseline(kit, out, section, "trainer", "Trainer + PEFT", len(runs), pack, lambda: time_trainer(
        kit, base, spread(runs, sizes.trainer_runs), rows, pad_id, sizes.warmup, sizes.steps, flop_params))
    kit.baseline_rates.update({key: out[key]["run_steps_per_s"] for key in ("loop", "trainer") if key in out})


def section_encoder_22(kit: Kit, out: dict) -> None:
    runs = grid_runs(kit)
    pack = time_pack(kit, runs, kit.sizes.warmup, kit.sizes.steps, kit.flop_params["encoder"])
    out["pack"] = pack
    out["rows"].append(timing_row("encoder_22", f"pack of {len(runs)}", pack, len(runs), None))
    encoder_baselines(kit, out, "encoder_22", runs, pack)
    finish_timing(out)


def section_encoder_66(kit: Kit, out: dict) -> None:
    runs = grid_runs(kit, seeds=(0, 1, 2))
    try:
        pack = time_pack(kit, runs, kit.sizes.warmup, kit.sizes.steps, kit.flop_params["encoder"])
    except oom_errors() as err:
        free(kit)
        out["status"] = "did not fit"
        out["error"] = str(err).splitlines()[0][:300]
        out["rows"].append(row("encoder_66", f"pack of {len(runs)}", "did not fit", runs=len(runs), note=out["error"]))
        return
    out["pack"] = pack
    out["rows"].append(timing_row("encoder_66", f"pack of {len(runs)} (3 seeds)", pack, len(runs), None))
    for name, label in (("loop", "PEFT + AdamW, encoder_22's"), ("trainer", "Trainer + PEFT, encoder_22's")):
        if name in kit.baseline_rates:
            rate = kit.baseline_rates[name]
            out["rows"].append(row("encoder_66", label, "ok", runs=len(runs),
                                   run_steps_per_s=rate, pack_x=pack["run_steps_per_s"] / rate,
                                   note="the one-by-one rate measured in encoder_22"))
    out["status"] = "ok"


def section_decoder(kit: Kit, out: dict) -> None:
    from lorainit import models
    from lorainit.config import RunConfig
    from lorainit.tasks import causal_lm

    start = time.perf_counter()
    kit.decoder = build_decoder(kit)
    out["build_seconds"] = round(time.perf_counter() - start, 1)
    sizes = kit.sizes
    k = sizes.decoder_runs
    lrs = [1e-4 * 30 ** (i / max(1, (k + 1) // 2 - 1)) for i in range((k + 1) // 2)]
    grid = [{"lr": lr, "init": init} for lr in lrs for init in "ab"][:k]
    total = sizes.decoder_warmup + sizes.decoder_steps + PROFILED_STEPS + 1
    runs = [RunConfig.from_dict({"model": kit.decoder, "task": "gsm8k", "data_dir": kit.gsm8k_dir, "batch_size": 4,
                                 "max_seq_len": sizes.decoder_seq_len, "max_steps": total, "max_eval_samples": 2,
                                 "max_new_tokens": 4, "precision": kit.timing_precision, "save_adapters": False,
                                 "seed": 0, "divergence_factor": NEVER_DIVERGED} | g) for g in grid]
    flop_params = kit.flop_params["decoder"]
    pack = time_pack(kit, runs, sizes.decoder_warmup, sizes.decoder_steps, flop_params)
    out["pack"] = pack
    out["rows"].append(timing_row("decoder", f"pack of {len(runs)}", pack, len(runs), None))

    base, tokenizer = models.load(kit.decoder, "causal_lm")
    base.to(kit.device)
    rows = causal_lm.Rows(**causal_lm.encode_run(runs[0], tokenizer)["train"])
    out["mean_tokens_per_row"] = sum(len(x) for x in rows.ids) / len(rows)
    pad_id = tokenizer.pad_token_id

    def loss_of(model, idx):
        batch = {key: v.to(kit.device) for key, v in causal_lm.collate(rows, idx, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        counted = batch["labels"] != causal_lm.IGNORE
        return torch.nn.functional.cross_entropy(logits[counted].float(), batch["labels"][counted])

    baseline(kit, out, "decoder", "loop", "PEFT + AdamW loop", len(runs), pack, lambda: time_loop(
        kit, base, spread(runs, sizes.loop_runs), [len(x) for x in rows.ids], loss_of, "CAUSAL_LM",
        sizes.decoder_warmup, sizes.decoder_steps, flop_params))
    # Trainer's models shift their labels themselves: the prompt's positions are -100
    hf_rows = [{"input_ids": x, "labels": [-100] * s + x[s:]} for x, s in zip(rows.ids, rows.start)]
    baseline(kit, out, "decoder", "trainer", "Trainer + PEFT", len(runs), pack, lambda: time_trainer(
        kit, base, spread(runs, sizes.trainer_runs), hf_rows, pad_id, sizes.decoder_warmup, sizes.decoder_steps,
        flop_params))
    finish_timing(out)


def finish_timing(out: dict) -> None:
    """A timing section is ok when every variant measured, or was skipped or did not fit."""
    failed = out.get("failed_variants")
    if failed:
        out["status"] = "failed"
        out["error"] = "; ".join(f"{key}: {why}" for key, why in failed.items())[:500]
    else:
        out["status"] = "ok"


RUNNERS = {"setup": section_setup,
           "pack_fp32": lambda kit, out: section_pack(kit, out, "fp32"),
           "pack_bf16": lambda kit, out: section_pack(kit, out, "bf16"),
           "pack_fp16": lambda kit, out: section_pack(kit, out, "fp16"),
           "fp16_overflow": section_overflow,
           "encoder_22": section_encoder_22,
           "encoder_66": section_encoder_66,
           "decoder": section_decoder}


# -- the table --------------------------------------------------------------------------------

COLUMNS = (("section", 14, "s"), ("variant", 29, "s"), ("status", 11, "s"), ("runs", 4, "d"),
           ("steps_per_s", 8, ".2f"), ("run_steps_per_s", 9, ".1f"), ("pack_x", 7, ".2f"), ("tflops", 8, ".3g"),
           ("of_peak", 7, ".1%"), ("peak_gib", 7, ".1f"), ("syncs", 5, ".1f"), ("busy", 5, ".0%"),
           ("diff", 8, ".1e"), ("bound", 8, ".1e"),
           ("seconds", 6, ".0f"), ("note", 0, "s"))
HEADERS = {"steps_per_s": "steps/s", "run_steps_per_s": "run-st/s", "pack_x": "pack x", "tflops": "TFLOP/s",
           "of_peak": "of peak", "peak_gib": "GPU GiB", "seconds": "s"}


def row(section: str, variant: str, status: str, **values) -> dict:
    return {"section": section, "variant": variant, "status": status} | values


def format_table(rows: list[dict]) -> str:
    lines = [" ".join(f"{HEADERS.get(name, name):>{width}}" if fmt != "s" else f"{HEADERS.get(name, name):{width}}"
                      for name, width, fmt in COLUMNS).rstrip()]
    for r in rows:
        cells = []
        for name, width, fmt in COLUMNS:
            value = r.get(name)
            if value is None or (isinstance(value, float) and not math.isfinite(value) and fmt != "s"):
                text = "-" if value is None else str(value)
                cells.append(f"{text:>{width}}" if fmt != "s" else f"{text:{width}}")
            elif fmt == "s":
                cells.append(f"{' '.join(str(value).split()):{width}}")  # one line per row
            else:
                cells.append(f"{value:{width}{fmt}}")
        lines.append(" ".join(cells).rstrip())
    return "\n".join(lines)


def legend(kit: Kit, report: dict) -> str:
    peak = report["sections"].get("setup", {}).get("peak")
    parts = ["steps/s: optimiser steps of the pack (or of one run) per second; run-st/s: runs x steps per second; "
             "pack x: the pack's run-st/s over the row's",
             "TFLOP/s: 4 x frozen body parameters x real tokens per second (no attention T^2, no adapters); "
             + (f"of peak: against the {peak['dtype']} {peak['n']}^3 matmul peak, {peak['tflops']:.3g} TFLOP/s"
                if peak else "no peak measured"),
             "diff / bound: pack vs alone, max |pack - alone| / max |alone| over the loss curves "
             "(fp16_overflow: its pack-mates against the same pack without the overflow, bound: that pack twice); "
             "syncs: on CUDA, the pack's operations per timed step that made the host wait for the GPU "
             "(torch's sync debug mode; the trainer reads the losses once a step); busy: on CUDA, the "
             f"GPU's kernel time over the wall time of {PROFILED_STEPS} profiled steps after the timed ones "
             "(well under 100%: launch-bound, where capturing the step is worth measuring)",
             "s: the section's seconds"]
    parts += [f"note: {n}" for n in kit.notes]
    return "\n".join(parts)


# -- the whole kit ----------------------------------------------------------------------------

def run_section(kit: Kit, name: str, deadline: float, report: dict) -> dict:
    """Run one section within its budget (and the kit's); whatever it raises becomes its status,
    error and a row of the table, and the rows it had already made are kept."""
    out: dict = {"status": None, "rows": []}

    def stop(status: str, error: str) -> None:
        out.update(status=status, error=error)
        out["rows"].append(row(name, "-", status, note=error if status == "failed" else f"{status}: {error}"))

    budget = (TINY_BUDGET if kit.args.tiny else BUDGETS[name]) * kit.args.budget_scale
    left = deadline - time.perf_counter()
    setup = report["sections"].get("setup")
    if name != "setup" and (setup is None or setup["status"] != "ok"):
        stop("failed", "setup did not finish")
    elif left < 5:
        stop("skipped", f"out of time, {left:.0f} s of the kit's budget left")
    else:
        say(f"{name} (budget {min(budget, left):.0f} s) ...")
        start = time.perf_counter()
        try:
            with time_limit(min(budget, left)):
                RUNNERS[name](kit, out)
            if out["status"] is None:
                out["status"] = "ok"
        except Skipped as why:
            stop("skipped", str(why))
        except OutOfTime as err:
            stop("failed", f"{err} (after {time.perf_counter() - start:.0f} s)")
        except Exception as err:  # noqa: BLE001 - a failing section is reported, and the kit goes on
            stop("failed", f"{type(err).__name__}: {err}".strip()[:500])
            out["traceback"] = traceback.format_exc()[-4000:]
        out["seconds"] = time.perf_counter() - start
        free(kit)
    for r in out["rows"]:
        r.setdefault("seconds", out.get("seconds"))
    say(f"{name}: {out['status']}" + (f" ({out['error']})" if out.get("error") else "")
        + (f" in {out['seconds']:.0f} s" if "seconds" in out else ""))
    return out


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str, allow_nan=True) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "gpu_check.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU, a few steps (well under a minute)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_check"),
                        help="folder for gpu_check.json and gpu_check.txt (default $OUT, else runs/gpu_check)")
    parser.add_argument("--only", help="comma-separated sections to run (setup always runs): "
                        + ", ".join(SECTIONS[1:]))
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole kit (default 470 on a GPU, 900 with --tiny)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's budget")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda, or cpu with --tiny")
    parser.add_argument("--timing-precision", choices=("bf16", "fp16", "fp32"),
                        help="precision of the timed runs and of the peak (default: bf16 on CUDA, fp32 on a CPU)")
    parser.add_argument("--cpu-autocast", action="store_true",
                        help="on the CPU, run the bf16 and fp16 sections through CPU autocast")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on the CPU (default with --tiny: 1, enough for its tiny models, and "
                             "robust on a busy machine, where torch's threads wait on each other many times over)")
    parser.add_argument("--workdir", help="where to build the data and models (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    wanted = SECTIONS if not args.only else ("setup", *[s.strip() for s in args.only.split(",") if s.strip()])
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device == "cpu" and args.timing_precision not in (None, "fp32") and not args.cpu_autocast:
        parser.error(f"--timing-precision {args.timing_precision} on the CPU needs --cpu-autocast")
    if device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        parser.exit(2, f"gpu_check: no CUDA device (torch {torch.__version__}, {build}); --tiny runs on the CPU\n")
    if args.threads or (device == "cpu" and args.tiny):
        torch.set_num_threads(args.threads or 1)
    deadline = STARTED + (args.budget or (900 if args.tiny else 470))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    kit = Kit(args=args, sizes=TINY if args.tiny else FULL, device=device, work=work,
              timing_precision=args.timing_precision or ("bf16" if device == "cuda" else "fp32"))
    out_dir = Path(args.out)
    report: dict = {"kit": {"tiny": args.tiny, "device": device, "timing_precision": kit.timing_precision,
                            "budget_s": round(deadline - STARTED), "bounds": BOUNDS,
                            "check_runs": list(CHECK_RUNS), "check_fields": CHECK_FIELDS,
                            "sizes": kit.sizes.__dict__},
                    "sections": {}, "rows": []}
    try:
        for name in SECTIONS:
            if name not in wanted:
                continue
            report["sections"][name] = run_section(kit, name, deadline, report)
            report["rows"] = [r for s in report["sections"].values() for r in s["rows"]]
            report["notes"] = kit.notes
            write(report, out_dir)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = time.perf_counter() - STARTED
    table = format_table(report["rows"]) + "\n\n" + legend(kit, report)
    write(report, out_dir)
    (out_dir / "gpu_check.txt").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"\n{len(report['sections'])} sections in {report['seconds']:.0f} s; "
          f"JSON: {out_dir / 'gpu_check.json'}" + (f"; models and data kept in {work}" if args.keep else ""))
    bad = [n for n, s in report["sections"].items() if s["status"] in ("fail", "failed")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
