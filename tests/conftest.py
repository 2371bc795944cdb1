"""Shared fixtures (the real MiniLM weights and real GLUE rows, loaded once per session), and the
rule that a CI run skips nothing.

Where the rows come from, first found: $LORAINIT_DATA, the data folder laid beside the checkout
(../shared/data), or the slices lorainit ships (`lorainit.slices`: glue/SST-2, gsm8k/,
wikitext-2/ in the same layout). The slices are the first rows of each set, in file order, so a
test that reads no more rows than a slice holds sees the same rows from any of the three. Tests
that need more (QNLI, MNLI) skip with one line naming the data and how to provide it; under
CI=true any skip fails the run instead, since CI must run every test.
"""

import copy
import os
from pathlib import Path

# The tests never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist (`make test` runs one worker per core) each worker, and every process it
# starts, computes on one thread: workers of several threads each would oversubscribe the cores,
# and torch's parallel regions then wait on each other, several times slower. Set before torch
# is imported, which reads it once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "data"
if not os.environ.get("LORAINIT_DATA"):
    from lorainit import slices

    os.environ["LORAINIT_DATA"] = str(_BESIDE if (_BESIDE / "glue").is_dir() else slices.ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from lorainit import models  # noqa: E402
from lorainit.tasks import glue  # noqa: E402
from lorainit.tasks.classification import collate  # noqa: E402

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# A full run of the suite collects at least this many tests: a run that skips nothing must not get
# there by collecting fewer. Raise it when tests are added.
MIN_COLLECTED = 606


def skip_or_fail(message: str) -> None:
    """Skip a test that cannot run here, with one line saying what it needs; fail under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run every test, but: {message}")
    pytest.skip(message)


def needs_data(*folders: str) -> Path:
    """$LORAINIT_DATA, if it holds every one of `folders` (e.g. 'glue/MNLI'); else skip naming them."""
    root = Path(os.environ["LORAINIT_DATA"])
    missing = [f for f in folders if not (root / f).is_dir()]
    if missing:
        skip_or_fail(f"needs {', '.join(f + '/' for f in missing)} under LORAINIT_DATA ({root} has "
                     f"{'none of them' if len(missing) == len(folders) else 'not all'}): set LORAINIT_DATA to a "
                     "folder laid out as glue/SST-2/, glue/QNLI/, glue/MNLI/ (GLUE's TSV files), gsm8k/, wikitext-2/")
    return root


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure (a skip inside a test, a fixture or a marker alike)."""
    report = yield
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"CI must run every test, but it skipped: {reason}"
    return report


WORKER_MEMORY = 4 * 2 ** 30  # what one worker may hold at its peak (a decoder pack, a Ray cluster), with room


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (`make test`): one worker per CPU this process may run on (its affinity, and a
    cgroup's CPU quota where one is set), at most one per WORKER_MEMORY of the machine's memory;
    $PYTEST_XDIST_AUTO_NUM_WORKERS wins. pytest-xdist's own count is physical cores, which is 1 on a
    machine that exposes two hyperthreads of one core, where two one-thread workers still pay."""
    given = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if given:
        return int(given)
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(cpus, memory // WORKER_MEMORY))


def pytest_collection_finish(session):
    """Under CI=true the whole suite (pytest run with no paths) collects at least MIN_COLLECTED tests."""
    whole = not session.config.args or [Path(a).resolve() for a in session.config.args] == [
        Path(session.config.rootpath, "tests").resolve()]
    if os.environ.get("CI") and whole and len(session.items) < MIN_COLLECTED:
        raise pytest.UsageError(f"collected {len(session.items)} tests, fewer than the {MIN_COLLECTED} "
                                "this suite had: a test was lost")


@pytest.fixture(scope="session")
def glue_data() -> str:
    """'folder': SST-2 rows are under $LORAINIT_DATA (always, with the shipped slice at worst)."""
    needs_data("glue/SST-2")
    return "folder"


@pytest.fixture(scope="session")
def _minilm():
    return models.load("minilm", "classification", num_labels=2, **NO_DROPOUT)


@pytest.fixture
def minilm(_minilm):
    """A fresh (model, tokenizer) pair: MiniLM with a 2-way head, base dropout off."""
    model, tokenizer = _minilm
    torch.manual_seed(0)
    return copy.deepcopy(model).eval(), tokenizer


@pytest.fixture(scope="session")
def sst2_rows(glue_data):
    """The first 8 rows of the real SST-2 dev set: (texts, labels)."""
    return glue.read("sst2-slice", "eval", max_rows=8)


@pytest.fixture
def sst2_batch(minilm, sst2_rows):
    """Those rows tokenised and padded: (batch dict, labels tensor)."""
    _, tokenizer = minilm
    ids, type_ids = glue.encode(sst2_rows, tokenizer, 128)
    return collate(ids, tokenizer.pad_token_id, type_ids), torch.tensor(sst2_rows.labels)


class Measured:
    """Two code paths that compute the same numbers in different places (two slots of a batched
    matmul, a pack and a run alone, ours and PEFT's) agree only to fp32 rounding, which differs
    between CPUs and kernel paths. Each such comparison goes through here: the difference relative
    to the values' scale, recorded as a test property (pytest --junitxml shows them), so a bound
    can be checked against what each machine gives."""

    def __init__(self):
        self.seen: dict[str, float] = {}

    def __call__(self, name: str, ours, reference) -> float:
        """max |ours - reference| / max |reference| (the absolute difference where reference is 0)."""
        ours, reference = torch.as_tensor(ours).double(), torch.as_tensor(reference).double()
        scale = reference.abs().max().item()
        diff = (ours - reference).abs().max().item() / (scale if scale > 0 else 1.0)
        self.seen[name] = max(self.seen.get(name, 0.0), diff)
        return diff


@pytest.fixture
def measured(record_property):
    m = Measured()
    yield m
    for name, value in m.seen.items():
        record_property(name, f"{value:.3e}")


def pack_steps(trainer, steps: int) -> tuple[list[float], list[dict]]:
    """A one-run trainer's training losses and its A and B gradients, (layer, 'A' | 'B') -> tensor,
    at each of `steps` steps."""
    losses, grads = [], []
    for _ in range(steps):
        values, _ = trainer.train_step(log=False)
        losses.append(values[0])
        grads.append({(n, f): getattr(layer, f"lora_{f}").grad[0].clone()
                      for n, layer in trainer.pack.layers.items() for f in "AB"})
    return losses, grads


def peft_causal_lm_steps(trainer, steps: int, dtype, model_overrides: dict | None = None):
    """The trainer's one run done in PEFT (`get_peft_model`, CAUSAL_LM; `fan_in_fan_out` for GPT-2's
    Conv1D) with torch.optim.AdamW and a linear schedule, from the factors a pack draws for it, on
    the batches its data order gives: yields (loss, {(layer, 'A' | 'B'): gradient}) at each step."""
    from peft import LoraConfig, get_peft_model
    from torch.nn import functional as F
    from transformers import get_linear_schedule_with_warmup

    from lorainit.engine.lora import LoRAConfig, LoRAPack
    from lorainit.engine.order import DataOrder
    from lorainit.tasks.causal_lm import IGNORE

    (run,) = trainer.runs
    base, _ = models.load(run.model, "causal_lm", dtype=dtype, **(model_overrides or {}))
    donor = LoRAPack(copy.deepcopy(base), LoRAConfig(rank=run.rank, alpha=run.alpha, targets=run.targets), 1)
    donor.init_run(0, run.init, run.init_variance, run.seed)
    peft_model = get_peft_model(base, LoraConfig(
        r=run.rank, lora_alpha=run.alpha, lora_dropout=0.0, target_modules=list(run.targets), task_type="CAUSAL_LM",
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in donor.layers.values())))
    peft_model.to(dtype)
    params = dict(peft_model.named_parameters())
    key = "base_model.model.{}.lora_{}.default.weight"
    with torch.no_grad():
        for name, layer in donor.layers.items():
            params[key.format(name, "A")].copy_(layer.lora_A[0])
            params[key.format(name, "B")].copy_(layer.lora_B[0])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=run.lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    order = DataOrder(run.seed, trainer.task.train_size, run.batch_size)
    peft_model.train()
    for step in range(steps):
        batch = trainer.task.batch(order.rows_at(step))
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        counted = batch["labels"] != IGNORE
        loss = F.cross_entropy(logits[counted], batch["labels"][counted])
        loss.backward()
        yield loss.item(), {(name, f): params[key.format(name, f)].grad for name in donor.layers for f in "AB"}
        opt.step()
        sched.step()
        opt.zero_grad()


class Killed(Exception):
    """What `train_killed_at` raises to stop a pack between two steps, as a kill would."""


def train_killed_at(runs, checkpoint_dir, cache_dir, step: int) -> None:
    """Train `runs` as one pack checkpointing into `checkpoint_dir` (init factors cached in
    `cache_dir`), and stop it after `step` steps, as a kill would."""
    from lorainit.engine.families import FactorCache
    from lorainit.train import PackTrainer

    def kill(trainer, losses, seconds):
        if trainer.step == step:
            raise Killed

    with pytest.raises(Killed):
        PackTrainer(runs, show_progress=False, factor_cache=FactorCache(cache_dir)).run(
            checkpoint_dir=checkpoint_dir, on_step=kill)


def sst2_eval_batch(rows: int):
    """MiniLM as loaded (a 2-way head, its own dropout) and the first `rows` SST-2 slice validation
    rows as one padded batch with their labels: (base, batch, labels), for reloading adapters."""
    from lorainit.tasks import glue
    from lorainit.tasks.classification import collate

    examples = glue.read("sst2-slice", "eval", max_rows=rows)
    base, tokenizer = models.load("minilm", "classification", num_labels=2)
    ids, type_ids = glue.encode(examples, tokenizer, 128)
    return base, collate(ids, tokenizer.pad_token_id, type_ids), torch.tensor(examples.labels)
