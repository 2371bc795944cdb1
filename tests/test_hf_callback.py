"""`lorainit.hf.ProbeCallback` inside a user's own `transformers.Trainer` and TRL `SFTTrainer`: the
probes reach the logs and the reporting callbacks, equal a pack's probes for the same run, and the
run folders it writes give a report, alone or several together."""

import copy

import pytest
import torch
import transformers.trainer
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import NO_DROPOUT
from lorainit import cli, models, report
from lorainit.config import RunConfig
from lorainit.engine.families import FactorCache
from lorainit.engine.order import DataOrder
from lorainit.engine.probes import NAMES, NET
from lorainit.errors import BadInput
from lorainit.hf import ProbeCallback, add_probes
from lorainit.peft import apply_init
from lorainit.report.sweep import load
from lorainit.sweeps.store import Store
from lorainit.train import PackTrainer

STEPS, LOGGED = 10, (1, 5, 10)  # logging_first_step and logging_steps 5; the pack probes there with eval_every 5


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these small runs gain nothing from more, and on a busy machine two
    spinning threads made them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder(TrainerCallback):
    """A reporting integration's stand-in: what its `on_log` was given, as TensorBoard or W&B would write it."""

    seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        Recorder.seen.append(dict(logs))


@pytest.fixture
def recorder(monkeypatch):
    """Recorder registered as transformers registers report_to's integrations: ahead of the user's callbacks."""
    Recorder.seen = []
    monkeypatch.setattr(transformers.trainer, "get_reporting_integration_callbacks", lambda report_to: [Recorder])
    return Recorder


def _run(**fields) -> RunConfig:
    """A MiniLM run on the SST-2 slice: 10 steps of 4 rows, no dropout anywhere, evaluated every 5 steps."""
    return RunConfig.from_dict(dict(model="minilm", task="sst2-slice", rank=8, alpha=16, dropout=0.0, batch_size=4,
                                    max_steps=STEPS, eval_every=5, max_train_samples=64, max_eval_samples=8,
                                    warmup_ratio=0.1, max_grad_norm=1.0, lr=2e-3, save_adapters=False) | fields)


def _peft_model(init=None, seed=0, head=None, peft_init=True):
    """MiniLM (dropout off) in PEFT LoRA on query and value; `init`: set by `apply_init`; `head`: the
    classifier's (weight, bias)."""
    from peft import LoraConfig, get_peft_model

    base, _ = models.load("minilm", "classification", num_labels=2, **NO_DROPOUT)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                                            task_type="SEQ_CLS", init_lora_weights=peft_init))
    if init is not None:
        apply_init(model, init=init, seed=seed)
    if head is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            params["base_model.model.classifier.modules_to_save.default.weight"].copy_(head[0])
            params["base_model.model.classifier.modules_to_save.default.bias"].copy_(head[1])
    return model


def _trainer(model, task, run: RunConfig, out, callbacks=(), evaluate=True, **overrides) -> Trainer:
    """A Trainer that trains `run` as a pack would: its seed's data order laid out in advance and read
    in sequence (2 micro-batches of 2 rows a step, each collated as the pack collates rows), its
    warmup and linear decay, AdamW without weight decay, clipping at its max_grad_norm."""
    order = DataOrder(run.seed, task.train_size, run.batch_size)
    rows = [{"row": i} for step in range(run.max_steps) for i in order.rows_at(step)]
    evaluated = [{"row": i} for i in range(8)]

    def collate(features):
        return task.batch([f["row"] for f in features])

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    args = TrainingArguments(
        output_dir=str(out), max_steps=run.max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=run.lr, lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.0,
        max_grad_norm=run.max_grad_norm, seed=run.seed, logging_steps=5, logging_first_step=True,
        eval_strategy="steps" if evaluate else "no", eval_steps=5, per_device_eval_batch_size=8,
        save_strategy=overrides.pop("save_strategy", "no"), report_to="none", disable_tqdm=True, use_cpu=True, remove_unused_columns=False,
        train_sampling_strategy="sequential", **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=evaluated if evaluate else None,
                      data_collator=collate, compute_metrics=accuracy, callbacks=list(callbacks))
    # BERT's forward takes **kwargs, so the Trainer expects it to divide by the step's row count
    # itself and leaves each micro-batch's mean undivided: the step's loss, and its gradient, would be
    # the sum of 2 means, twice the mean over 4 rows. Divided by the micro-batches, as for a model
    # that takes no such keywords, it is the pack's mean.
    trainer.model_accepts_loss_kwargs = False
    return trainer


@pytest.fixture(scope="module")
def sst2_task():
    """The SST-2 slice's rows as a pack's task reads and collates them (64 training rows)."""
    from lorainit.tasks import family

    run = _run()
    return family(run.task)(run, NO_DROPOUT)


def test_probes_reach_log_history_and_the_reporting_callbacks(sst2_task, recorder, tmp_path):
    model = _peft_model(init="b")
    trainer = _trainer(model, sst2_task, _run(), tmp_path, callbacks=[ProbeCallback(task="sst2-mine")])
    trainer.train()
    callbacks = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert callbacks[:3] == ["DefaultFlowCallback", "ProbeCallback", "Recorder"]  # it moved ahead of the integration
    keys = {f"probe/{name}" for name in NAMES}
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(LOGGED)
    for entry in logged:
        assert keys <= set(entry) and f"probe/{NET}" not in entry  # Init[B] keeps the base
    assert not any(k.startswith("probe/") for e in trainer.state.log_history if "loss" not in e for k in e)
    seen = [e for e in recorder.seen if "loss" in e]
    assert [{k: e[k] for k in keys} for e in seen] == [{k: e[k] for k in keys} for e in logged]
    first = logged[0]
    assert first["probe/a_norm"] == first["probe/z_a_rms"] == 0.0 and first["probe/b_norm"] > 0  # Init[B]: A = 0
    assert logged[-1]["probe/z_a_rms"] > 0  # training moved A

    built = report.build(tmp_path)  # the run folder is the output_dir
    (run,) = built.sweep.runs
    assert (run.init, run.status, run.steps, run.config["task"]) == ("b", "done", STEPS, "sst2-mine")
    assert run.config["lr"] == 2e-3
    assert run.config["batch_size"] == 4 and run.config["targets"] == ["query", "value"]
    assert set(run.probes) == {*NAMES} and sorted(run.probes["z_a_rms"]) == list(LOGGED)
    assert run.final["eval_loss"] == trainer.state.log_history[-2]["eval_loss"]  # the last evaluation
    assert run.final["accuracy"] == trainer.state.log_history[-2]["eval_accuracy"]
    assert [f.metric.name for f in built.findings] == ["accuracy", "eval_loss"]
    assert (tmp_path / "report" / "index.html").is_file()


def _store_rows(folder) -> dict[tuple[int, str], float]:
    store = Store(folder)
    try:
        return {(step, name): value for _, step, name, value in store.db.execute(
            "SELECT run_id, step, name, value FROM metrics")}
    finally:
        store.close()


def test_a_run_resumed_from_its_checkpoint_keeps_the_rows_written_before_it(sst2_task, tmp_path):
    """`trainer.train(resume_from_checkpoint=...)`: the same run (same fields, same id) goes on from
    the checkpoint's step; what the folder held up to that step stays, and is not logged again."""
    def trainer(folder):
        return _trainer(_peft_model(init="a"), sst2_task, _run(), folder, callbacks=[ProbeCallback(task="sst2-mine")],
                        save_strategy="steps", save_steps=5)

    trainer(tmp_path).train()
    straight = _store_rows(tmp_path)
    trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    rows = _store_rows(tmp_path)
    assert set(rows) == set(straight)  # every step's rows, those before the checkpoint included
    assert {step for step, name in rows if name == "train_loss"} == set(LOGGED)
    before = {key: value for key, value in rows.items() if key[0] <= 5}
    assert before == {key: straight[key] for key in before}  # the first run's, kept as they were
    (run,) = report.build(tmp_path).sweep.runs
    assert run.status == "done" and run.steps == STEPS and run.final["eval_loss"] == rows[(STEPS, "eval_loss")]


def test_add_probes_places_the_callback_without_searching(sst2_task, recorder, tmp_path):
    trainer = _trainer(_peft_model(), sst2_task, _run(max_steps=1), tmp_path, evaluate=False)
    callback = add_probes(trainer, task="sst2-mine")
    assert trainer.callback_handler.callbacks[1] is callback
    trainer.train()
    assert "probe/z_a_rms" in recorder.seen[0] and callback.run.fields["init"] == "a"  # PEFT's default is Init[A]


@pytest.mark.parametrize("init", ["a", "pissa"])
def test_the_callback_measures_what_the_pack_measures(sst2_task, init, tmp_path, measured):
    """The same run in a pack and in a Trainer (the pack's data order, schedule, clipping, initial
    factors and head; 2 micro-batches of 2 rows against the pack's batch of 4): the probes at steps
    1, 5 and 10, layer by layer, equal the pack's."""
    run = _run(init=init)
    # a fresh decomposition cache: PiSSA's SVD made here, as apply_init makes it, to the same bits
    pack = PackTrainer([run], device="cpu", show_progress=False, model_overrides=NO_DROPOUT,
                       factor_cache=FactorCache(tmp_path / "inits"))
    head = (pack.pack.head.weight[0].detach().clone(), pack.pack.head.bias[0].detach().clone())
    (result,) = pack.run()
    ours = _trainer(_peft_model(init=init, seed=run.seed, head=head), sst2_task, run, tmp_path / "hf",
                    callbacks=[ProbeCallback()], evaluate=False)
    ours.train()
    callback = next(c for c in ours.callback_handler.callbacks if isinstance(c, ProbeCallback))
    store = Store(tmp_path / "hf")
    got = {(step, name): value for step, name, value in store.metrics(callback.run.run_id())}
    store.close()
    want = {(m["step"], m["name"]): m["value"] for m in result.metrics}
    probes = [key for key in want if key[1].startswith("probe/")]
    names = (*NAMES, NET) if init == "pissa" else NAMES
    assert {step for step, _ in probes} == set(LOGGED)
    assert len(probes) == len(LOGGED) * len(pack.pack.layers) * len(names)
    assert set(got) >= set(probes)
    # the step-1 loss: the same rows, factors and head (the pack's mean over 4 rows, the Trainer's over 2 x 2)
    assert measured("first_loss", got[(1, "train_loss")], want[(1, "train_loss")]) <= 1e-6
    for name in names:
        for step in LOGGED:
            keys = [key for key in probes if key[0] == step and key[1].endswith(f"/{name}")]
            mine, theirs = [got[k] for k in keys], [want[k] for k in keys]
            # another forward of the same run (BERT on padded micro-batches against the pack's unpadded
            # batch of 4), then AdamW steps that carry the fp32 rounding: relative to the values' scale.
            # Measured on an Intel Xeon (AVX-512): at most 1.4e-7 at step 1, 1.4e-6 at steps 5 and 10
            # (net_out_rms, a difference of two outputs; the others 5e-7)
            assert measured(f"{name}_step{step}", mine, theirs) <= (2e-6 if step == 1 else 3e-5), (name, step)
    if init == "pissa":
        net = [want[k] for k in probes if k[0] == 1 and k[1].endswith(NET)]
        assert max(net) < 1e-6 and max(want[k] for k in probes if k[0] == STEPS and k[1].endswith(NET)) > 1e-3


def test_a_model_without_lora_layers_is_refused_naming_it(sst2_task, tmp_path):
    base, _ = models.load("minilm", "classification", num_labels=2)
    with pytest.raises(BadInput, match=r"the model, a BertForSequenceClassification, has no PEFT LoRA layer .* "
                                       r"wrap it with peft.get_peft_model"):
        _trainer(base, sst2_task, _run(), tmp_path, callbacks=[ProbeCallback()])


def test_peft_own_pissa_logs_the_net_change_from_its_factors_at_train_begin(sst2_task, tmp_path):
    model = _peft_model(peft_init="pissa")
    trainer = _trainer(model, sst2_task, _run(), tmp_path, callbacks=[ProbeCallback(task="sst2-mine")])
    trainer.train()
    net = [entry[f"probe/{NET}"] for entry in trainer.state.log_history if "loss" in entry]
    assert net[0] == 0.0 and net[-1] > 0  # B A = B0 A0 at step 1; the adapter then moves off its start
    (run,) = load(tmp_path).runs
    assert run.init == "pissa" and sorted(run.probes[NET]) == list(LOGGED)


def test_several_run_folders_report_together_as_one_sweep(sst2_task, tmp_path, capsys):
    for name, init, lr in (("a-lr2e-3", "a", 2e-3), ("a-lr5e-3", "a", 5e-3), ("b-lr2e-3", "b", 2e-3)):
        trainer = _trainer(_peft_model(init=init), sst2_task, _run(lr=lr), tmp_path / name,
                           callbacks=[ProbeCallback(task="sst2-mine")])
        trainer.train()
    assert cli.main(["report", str(tmp_path)]) == 0
    assert "3 runs: 3 done" in capsys.readouterr().out
    sweep = load(tmp_path)
    assert sorted((r.init, r.lr) for r in sweep.runs) == [("a", 2e-3), ("a", 5e-3), ("b", 2e-3)]
    assert len(sweep.groups) == 1 and sweep.groups[0].title == "sst2-mine"
    found = report.analyse(sweep)
    assert [f.metric.name for f in found] == ["accuracy", "eval_loss"]
    loss = found[1]
    assert set(loss.inits) == {"a", "b"} and loss.inits["a"].best_lr in (2e-3, 5e-3)
    assert [c.text for c in loss.claims][0] == "Init[A]'s optimal lr > Init[B]'s"  # judged as a sweep's would be
    assert (tmp_path / "report" / "index.html").is_file()


def test_sft_trainer_run_logs_probes_and_writes_a_folder(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    folder = models.resolve("smollm2-135m").path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["The cat sat on the mat.", "Two plus two is four.", "Paris is in France.", "Water boils at 100 C.",
             "The sky is blue today.", "Bees make honey."]
    config = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                       logging_steps=2, max_length=16, bf16=False, use_cpu=True, save_strategy="no",
                       eval_strategy="steps", eval_steps=4, per_device_eval_batch_size=2, report_to="none",
                       disable_tqdm=True, seed=1)
    trainer = SFTTrainer(model=folder, args=config, train_dataset=Dataset.from_dict({"text": texts[:4]}),
                         eval_dataset=Dataset.from_dict({"text": texts[4:]}), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"),
                         callbacks=[ProbeCallback(out=tmp_path / "run", task="tiny-sft", log_layers=True)])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    for entry in logged:
        assert entry["probe/z_a_rms"] > 0 and "probe/model.layers.0.self_attn.q_proj/b_norm" in entry  # log_layers
    (run,) = load(tmp_path / "run").runs
    assert (run.init, run.status, run.config["task"], run.config["rank"]) == ("a", "done", "tiny-sft", 4)
    assert run.config["seed"] == 1
    assert {"eval_loss", "mean_token_accuracy"} <= set(run.final)
    layers = {key.split("/")[1] for key, in _names(tmp_path / "run") if key.startswith("probe/")}
    assert len(layers) == 2 * 30 and "model.layers.29.self_attn.v_proj" in layers  # q and v in SmolLM2's 30 layers


def _names(folder):
    store = Store(folder)
    try:
        return store.db.execute("SELECT DISTINCT name FROM metrics").fetchall()
    finally:
        store.close()


def test_an_init_given_by_name_keeps_the_variance_apply_init_recorded_for_it():
    from types import SimpleNamespace

    from lorainit.hf import record

    applied = SimpleNamespace(record=SimpleNamespace(init="a", init_args={}, init_variance="gaussian"))
    assert record.family("a", None, applied, True) == ("a", None, "gaussian")
    assert record.family("b", None, applied, True) == ("b", None, "kaiming")  # another init than the one applied
    assert record.family(None, None, applied, True) == ("a", None, "gaussian")


def test_evaluations_of_several_sets_at_one_step_are_one_evaluation():
    callback = ProbeCallback()
    callback._evaluations = []
    callback._evaluated(5, {"x_loss": 1.0, "x_accuracy": 0.5})
    callback._evaluated(5, {"y_loss": 2.0})
    callback._evaluated(10, {"x_loss": 0.5})
    assert callback._evaluations == [(5, {"x_loss": 1.0, "x_accuracy": 0.5, "y_loss": 2.0}), (10, {"x_loss": 0.5})]
