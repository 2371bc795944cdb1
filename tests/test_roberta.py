"""A small RoBERTa with the paper's head: the checkpoint lacks `classifier`, so its frozen `dense`
is drawn per run from the run's own seed, and travels with checkpoints and exported adapters.

The model has random weights, is built from a config and saved to a temporary folder (no hub):
the shape of `roberta-large` with its `classifier` missing, at a size a CPU trains in seconds.
"""

import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from lorainit import models
from lorainit.config import RunConfig
from lorainit.tasks import glue
from lorainit.tasks.classification import collate
from lorainit.train import PackTrainer, train_pack

pytestmark = pytest.mark.usefixtures("glue_data")  # every test here trains on GLUE rows

BASE = dict(task="sst2", max_steps=8, max_train_samples=64, max_eval_samples=32, max_seq_len=48,
            targets=["query", "value"])


@pytest.fixture(scope="module")
def roberta(tmp_path_factory) -> str:
    """A folder holding a 2-layer RoBERTa masked LM (random weights) and a tokenizer: no classifier."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    _, tokenizer = models.load("minilm", "classification")  # any offline tokenizer serves
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64, type_vocab_size=1,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("roberta") / "model"
    RobertaForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _run(model: str, **fields) -> RunConfig:
    return RunConfig.from_dict(BASE | {"model": model} | fields)


def _losses(result):
    return [m["value"] for m in result.metrics if m["name"] == "train_loss"]


def test_the_missing_dense_is_drawn_per_run_and_a_mixed_seed_pack_equals_its_runs_alone(roberta, measured):
    runs = [_run(roberta, seed=s, init=i, lr=2e-3) for s, i in ((0, "a"), (1, "a"), (0, "b"))]
    trainer = PackTrainer(runs, show_progress=False)
    assert sorted(trainer.pack.fresh) == ["classifier.dense"]  # out_proj is the trained head
    dense = trainer.pack.fresh["classifier.dense"].weight
    assert not dense.requires_grad
    assert torch.equal(dense[0], dense[2]) and not torch.equal(dense[0], dense[1])  # by seed
    # the draw is the run's own: the same alone, in another pack, in another process order
    assert torch.equal(PackTrainer(runs[1:2], show_progress=False).pack.fresh["classifier.dense"].weight[0], dense[1])
    packed = trainer.run()
    for run, res in zip(runs, packed):
        (alone,) = train_pack([run], show_progress=False)
        assert res.status == alone.status == "done"
        # 8 steps of fp32 rounding between a 3-run and a 1-run batch, relative to losses of order 0.7
        assert measured("roberta_pack_vs_alone_loss", _losses(res), _losses(alone)) <= 1e-5
        assert measured("roberta_pack_vs_alone_eval", res.final["eval_loss"], alone.final["eval_loss"]) <= 1e-5
    assert trainer.pack.fresh["classifier.dense"].weight.equal(dense)  # frozen: never trained
    assert "fresh" in trainer.state_dict() and "classifier.dense.weight" in trainer.state_dict()["fresh"]


SWEEP = """\
name: roberta
base:
  model: {model}
  task: sst2
  max_steps: 12
  max_train_samples: 64
  max_eval_samples: 32
  max_seq_len: 48
  eval_every: 6
  checkpoint_every: 2
  targets: [query, value]
grid:
  seed: [0, 1]
  init: [a, b]
pack_size: 4
"""


def _sweep(file, out):
    return [sys.executable, "-m", "lorainit.cli", "sweep", str(file), "--out", str(out), "--quiet"]


def _metrics(out):
    db = sqlite3.connect(out / "store.sqlite")
    try:
        return db.execute("SELECT run_id, step, name, value FROM metrics ORDER BY run_id, step, name").fetchall()
    finally:
        db.close()


def test_a_killed_and_resumed_sweep_equals_one_run_straight_through(roberta, tmp_path):
    file = tmp_path / "roberta.yaml"
    file.write_text(SWEEP.format(model=roberta))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_sweep(file, straight), check=True, capture_output=True)
    proc = subprocess.Popen(_sweep(file, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(killed.glob("checkpoints/*/step-*.ckpt")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(killed.glob("checkpoints/*/step-*.ckpt")), "the sweep ended before its first checkpoint"
    done = subprocess.run(_sweep(file, killed), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from its checkpoint" in done.stderr
    # a resumed process draws no dense of its own: it takes each run's from the checkpoint, and
    # every number repeats bit for bit
    assert _metrics(killed) == _metrics(straight)
    assert len({v for _, s, n, v in _metrics(straight) if n == "train_loss" and s == 12}) == 4


def test_the_exported_adapter_reloads_in_peft_to_the_same_accuracy(roberta, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    runs = [_run(roberta, seed=s, init="a", lr=3e-3, max_steps=30) for s in (0, 1)]
    results = train_pack(runs, adapters_dir=tmp_path, show_progress=False)
    examples = glue.read("sst2", "eval", None, max_rows=32)
    _, tokenizer = models.load(roberta, "classification")
    ids, _ = glue.encode(examples, tokenizer, 48)
    batch = collate(ids, tokenizer.pad_token_id)
    for res in results:
        torch.manual_seed(123)  # the base's own classifier is drawn from torch's generator: any draw
        base = AutoModelForSequenceClassification.from_pretrained(roberta, num_labels=2)
        model = PeftModel.from_pretrained(base, res.adapter).eval()
        with torch.no_grad():
            predicted = model(**batch).logits.argmax(-1)
        accuracy = float((predicted == torch.tensor(examples.labels)).float().mean())
        assert accuracy == res.final["accuracy"]
    # the two seeds' adapters carry different frozen dense layers: each run's own
    from safetensors.torch import load_file
    dense = [load_file(f"{r.adapter}/adapter_model.safetensors")["base_model.model.classifier.dense.weight"]
             for r in results]
    assert not torch.equal(dense[0], dense[1])


def test_a_llama_style_score_head_is_drawn_per_run_too(tmp_path, measured):
    """A decoder checkpoint holds no `score`: each run's is drawn from its seed, and trained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = models.load("minilm", "classification")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    runs = [_run(str(tmp_path / "llama"), seed=s, lr=2e-3, targets=["q_proj", "v_proj"]) for s in (0, 1)]
    trainer = PackTrainer(runs, show_progress=False)
    assert trainer.pack.head_name == "score" and not trainer.pack.fresh
    score = trainer.pack.head.weight.detach().clone()
    assert not torch.equal(score[0], score[1])
    (alone,) = train_pack(runs[1:], show_progress=False)
    packed = trainer.run()
    assert measured("llama_score_pack_vs_alone", _losses(packed[1]), _losses(alone)) <= 1e-5
