"""The decoder architectures a pack serves (`lorainit.decoders`), each a tiny random model built
from its config with its distinguishing feature switched on, saved with a half dtype declared:
the pack's own forward equals the model's own eager forward, a pack equals its runs alone,
adapters and optimiser state are fp32, PEFT parity for a Llama and a GPT-2, and the refusals."""

import contextlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from torch.nn import functional as F

from conftest import pack_steps, peft_causal_lm_steps
from lorainit import cli, decoders, models, slices
from lorainit.config import RunConfig
from lorainit.engine import packing, precision
from lorainit.errors import BadInput
from lorainit.tasks import causal_lm
from lorainit.tasks.base import Forward
from lorainit.train import PackTrainer, train_pack

VOCAB = 1024   # the tiny models' embedding rows: the tokenizer's 1,000 tokens and room to spare
WINDOW = 8     # a sliding window far shorter than the rows (up to MAX_SEQ_LEN tokens)
MAX_SEQ_LEN = 200
EPS = 1e-12    # an attention dropout that keeps every entry in fp32: the pack's own attention runs, exactly


def _common():
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _configs():
    import transformers as t

    big = dict(initializer_range=0.2)  # scores near the caps, so that softcapping changes the numbers
    return {
        "llama": lambda: t.LlamaConfig(**_common()),
        "qwen2": lambda: t.Qwen2Config(**_common(), use_sliding_window=True, sliding_window=WINDOW,
                                       max_window_layers=1),
        "qwen3": lambda: t.Qwen3Config(**_common(), head_dim=8, use_sliding_window=True, sliding_window=WINDOW,
                                       max_window_layers=1),
        "mistral": lambda: t.MistralConfig(**_common(), sliding_window=WINDOW),
        "gemma": lambda: t.GemmaConfig(**_common(), head_dim=8),
        "gemma2": lambda: t.Gemma2Config(**_common(), **big, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                         attn_logit_softcapping=0.5, final_logit_softcapping=0.5),
        "gemma3_text": lambda: t.Gemma3TextConfig(**_common(), head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                                  layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: t.Phi3Config(**_common(), sliding_window=WINDOW),
        "gpt2": lambda: t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                     bos_token_id=0, eos_token_id=0),
    }


ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2")


def _dropout(arch: str, attention: float) -> dict:
    """Config overrides: attention dropout `attention`, every other base dropout off."""
    if arch == "gpt2":
        return {"attn_pdrop": attention, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
    if arch == "phi3":
        return {"attention_dropout": attention, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
    return {"attention_dropout": attention}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A 1,000-token byte-level BPE tokenizer trained on the shipped GSM8K rows (fast, offline)."""
    import transformers
    from tokenizers import Tokenizer, decoders as tok_decoders, models as tok_models, pre_tokenizers, trainers

    texts = []
    for line in (slices.ROOT / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["question"], row["answer"]]
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tok_decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    folder = tmp_path_factory.mktemp("tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>").save_pretrained(folder)
    return folder


def _build(folder, arch: str, tokenizer_dir, declared: str = "dtype", dtype=torch.bfloat16, **config):
    """A tiny random `arch` saved to `folder` in `dtype`, declared under the config key `declared`."""
    import transformers

    cfg = _configs()[arch]()
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    path = folder / "config.json"
    values = json.loads(path.read_text())
    values[declared] = values.pop("dtype", None) or values.pop("torch_dtype")
    path.write_text(json.dumps(values))
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer_dir):
    """arch -> the folder of its tiny model, saved in bf16 with `dtype: bfloat16` declared."""
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = _build(tmp_path_factory.mktemp(arch), arch, tokenizer_dir)
        return built[arch]
    return get


def _run(folder, **fields) -> RunConfig:
    return RunConfig.from_dict(dict(model=str(folder), task="gsm8k-slice", batch_size=2, max_seq_len=MAX_SEQ_LEN,
                                    max_train_samples=16, max_eval_samples=2, max_new_tokens=4, max_steps=3,
                                    lr=1e-2, warmup_ratio=0.0) | fields)


def _losses(result):
    return [m["value"] for m in result.metrics if m["name"] == "train_loss"]


def _pack_against_eager(folder, arch: str, measured, name: str) -> float:
    """Two runs trained 2 steps, then each run's loss through the pack (padding-free rows, the
    pack's own attention, the chunked loss) against the model's own eager forward of its merged
    weights on the same right-padded rows: the largest relative difference."""
    runs = [_run(folder, seed=s, init=i, dropout=0.0) for s, i in ((0, "a"), (1, "b"))]
    trainer = PackTrainer(runs, show_progress=False, model_overrides=_dropout(arch, EPS))
    assert trainer.task.padding_free  # rows of uneven length: the padding-free layout runs
    for _ in range(2):
        trainer.train_step(log=False)
    batch, lengths = trainer._batch([0, 1])
    assert int(batch["attention_mask"].sum(1).min()) > 2 * WINDOW  # every row is longer than the window
    trainer.state.set_batch([0, 1], lengths)
    trainer.model.train()
    with torch.no_grad():
        ours = trainer.task.loss(trainer.state, batch, Forward([0, 1], False, False)).means()
    rows = batch["input_ids"].shape[0] // 2
    worst = 0.0
    for k in range(2):
        merged = trainer.pack.merged_model(k)
        merged.set_attn_implementation("eager")
        part = slice(k * rows, (k + 1) * rows)
        with torch.no_grad():
            logits = merged.eval()(input_ids=batch["input_ids"][part], attention_mask=batch["attention_mask"][part]).logits
        labels = batch["labels"][part]
        counted = labels != causal_lm.IGNORE
        worst = max(worst, measured(name, ours[k], F.cross_entropy(logits[counted], labels[counted])))
    return worst


@pytest.mark.parametrize("arch", ARCHS)
def test_the_packs_forward_equals_the_models_own_eager_forward(arch, tiny, measured):
    """The sliding window, both softcaps, fused and Conv1D projections are all computed as the
    model computes them."""
    # other kernels on the same fp32 numbers: 0 to 1.4e-7 measured on a 6.9 loss
    assert _pack_against_eager(tiny(arch), arch, measured, f"eager_{arch}") <= 1e-5


def _causal_only(window_mask):
    return lambda q_len, kv_len, window, device: torch.ones(q_len, kv_len, dtype=torch.bool,
                                                            device=device).tril(kv_len - q_len)


def _no_softcap(attend):
    return lambda *args, softcap=None: attend(*args[:7])


def _no_final_softcap(losses):
    return lambda hidden, weight, targets, chunk=causal_lm.LOSS_CHUNK, softcap=None: losses(hidden, weight, targets, chunk)


@pytest.mark.parametrize("arch, switched_off", [
    ("mistral", (packing, "window_mask", _causal_only)),
    ("gemma2", (packing, "window_mask", _causal_only)),
    ("gemma2", (packing, "attend", _no_softcap)),
    ("gemma2", (causal_lm, "token_losses", _no_final_softcap)),
], ids=["mistral-window", "gemma2-window", "gemma2-attention-softcap", "gemma2-final-softcap"])
def test_the_eager_comparison_sees_each_feature(arch, switched_off, tiny, measured, monkeypatch):
    """The comparison above has teeth: with one feature left out of the pack, its loss moves away
    from the eager forward's by far more than the bound (7e-4 to 8.5e-2 relative, measured)."""
    module, name, without = switched_off
    monkeypatch.setattr(module, name, without(getattr(module, name)))
    assert _pack_against_eager(tiny(arch), arch, measured, f"eager_without_{name}_{arch}") > 1e-4


def _cpu_kernels_forced_below_the_hardware():
    """torch's CPU flash attention in bf16 packs its operands for AVX-512 where the hardware has it,
    then runs the kernel build ATEN_CPU_CAPABILITY chose: forced below the hardware (avx2 on an
    AVX-512 CPU) the two disagree and it raises. There SDPA's math kernel serves; anywhere else
    the default kernels run, as a user's would."""
    if not os.environ.get("ATEN_CPU_CAPABILITY"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("declared", ["dtype", "torch_dtype"])
def test_adapters_and_optimiser_state_are_fp32_whatever_the_checkpoint_declares(arch, declared, tokenizer_dir,
                                                                                 tmp_path):
    folder = _build(tmp_path, arch, tokenizer_dir, declared=declared)
    assert json.loads((folder / "config.json").read_text())[declared] == "bfloat16"
    for name, base in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        trainer = PackTrainer([_run(folder, precision=name, init="b", max_steps=2)], show_progress=False)
        for _ in range(2):  # B's gradient is zero at step 1 (A = 0), not at step 2
            with _cpu_kernels_forced_below_the_hardware():
                losses, _ = trainer.train_step(log=False)
            assert torch.isfinite(torch.tensor(losses[0]))
        packed = {id(p) for p in trainer.pack.parameters()}
        frozen = [p for p in trainer.model.parameters() if id(p) not in packed]
        assert {p.dtype for p in frozen} == {base}, name  # the precision decides the base's dtype
        for pname, param in trainer.pack.named_parameters().items():
            assert param.dtype == torch.float32, (name, pname)
            assert param.grad is None or param.grad.dtype == torch.float32
            state = trainer.optimizer.state[pname]
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
            assert state["exp_avg_sq"].abs().sum() > 0  # the steps reached it
        # Init[B]'s random factor moved by a step of lr 1e-2: in bf16 most entries would not
        b = next(iter(trainer.pack.layers.values())).lora_B
        assert b.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_decoder_classifiers_head_is_fp32_too(arch, tiny):
    """The same bf16 checkpoints as sequence classifiers on SST-2 rows: the trained `score` head
    and its AdamW state are fp32 beside a bf16 base, and the targets are the architecture's."""
    run = RunConfig.from_dict(dict(model=str(tiny(arch)), task="sst2-slice", precision="bf16", max_steps=2,
                                   max_train_samples=16, max_eval_samples=8, batch_size=2))
    assert run.targets == decoders.DECODERS[arch].targets
    trainer = PackTrainer([run], show_progress=False)
    assert trainer.pack.head_name == "score"
    trainer.train_step(log=False)
    head = trainer.pack.named_parameters()["score.weight"]
    assert head.dtype == trainer.optimizer.state["score.weight"]["exp_avg"].dtype == torch.float32
    assert trainer.model.get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ARCHS)
def test_a_pack_with_two_seeds_and_uneven_rows_equals_its_runs_alone(arch, tiny, measured):
    """LoRA dropout and attention dropout on, seeds 0 and 1 (rows of different lengths share a step)."""
    overrides = _dropout(arch, 0.1)
    runs = [_run(tiny(arch), seed=s, init=i, lr=lr) for s, i, lr in ((0, "a", 1e-2), (1, "b", 1e-2), (0, "b", 3e-2))]
    packed = train_pack(runs, show_progress=False, model_overrides=overrides)
    for res, run in zip(packed, runs):
        (alone,) = train_pack([run], show_progress=False, model_overrides=overrides)
        assert res.status == alone.status == "done"
        # other matrix shapes over 3 steps: fp32 rounding that Adam carries on
        assert measured(f"pack_vs_alone_{arch}", _losses(res), _losses(alone)) <= 1e-4
        assert measured(f"pack_vs_alone_eval_{arch}", res.final["eval_loss"], alone.final["eval_loss"]) <= 1e-4
    assert len({round(_losses(r)[-1], 6) for r in packed}) == 3  # the runs differ
    (still,) = train_pack(runs[:1], show_progress=False, model_overrides=_dropout(arch, 0.0))
    assert _losses(still)[-1] != _losses(packed[0])[-1]  # the attention dropout did act


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_run_matches_peft_and_torch_adamw_in_losses_and_every_gradient(arch, tiny, measured, tmp_path):
    """K = 1 against PEFT (`get_peft_model`, CAUSAL_LM; GPT-2's Conv1D with fan_in_fan_out) and
    torch.optim.AdamW, 5 steps, in fp64: the losses and every A and B gradient at every step,
    since Adam's first steps are close to lr * sign(g) and would hide a gradient's scale. Then the
    exported adapter, loaded by PEFT on a fresh base, gives the pack's logits."""
    from peft import PeftModel

    dtype = torch.float64
    overrides = _dropout(arch, 0.0)
    run = _run(tiny(arch), dropout=0.0, max_grad_norm=0.0, rank=4, lr=3e-3, max_steps=5)
    trainer = PackTrainer([run], show_progress=False, model_overrides=overrides | {"dtype": dtype})
    assert trainer.task.padding_free
    ours_losses, ours_grads = pack_steps(trainer, run.max_steps)
    for step, (loss, grads) in enumerate(peft_causal_lm_steps(trainer, run.max_steps, dtype, overrides)):
        # the same arithmetic in fp64: only rounding (eps 2.2e-16) apart
        assert measured(f"peft_{arch}_loss", ours_losses[step], loss) <= 1e-9
        for (name, f), ours in ours_grads[step].items():
            assert measured(f"peft_{arch}_grad_{f}", ours, grads[name, f]) <= 1e-9, (step, name, f)
    assert all(layer.lora_B.abs().sum() > 0 for layer in trainer.pack.layers.values())  # B = 0 at init: it trained

    from lorainit.engine.peft_io import export_run

    folder = export_run(trainer.pack, 0, tmp_path / "adapter", base_model=run.model)
    assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is (arch == "gpt2")
    fresh, _ = models.load(run.model, "causal_lm", dtype=dtype, **overrides)
    loaded = PeftModel.from_pretrained(fresh, str(folder)).eval()
    merged = trainer.pack.merged_model(0).eval()
    ids = trainer.task.batch([0])["input_ids"]
    with torch.no_grad():
        assert measured(f"peft_{arch}_export", loaded(input_ids=ids).logits, merged(input_ids=ids).logits) <= 1e-9


# -- refusals -------------------------------------------------------------------------------


def _train(tmp_path, capsys, *args):
    """`lorainit train` in this process: (exit code, its stderr alone)."""
    capsys.readouterr()  # what came before (a model saved) is not the command's
    code = cli.main(["train", "--out", str(tmp_path / "out"), "--max_steps", "2", *args])
    return code, capsys.readouterr().err


def test_a_decoder_the_pack_has_not_been_checked_on_is_refused_by_name(tmp_path, tokenizer_dir, capsys):
    import transformers

    folder = tmp_path / "olmo2"
    cfg = transformers.Olmo2Config(**_common())
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    code, err = _train(tmp_path, capsys, "--model", str(folder), "--task", "gsm8k-slice")
    assert code == 2 and not (tmp_path / "out").exists()
    assert "olmo2 is not among the decoder architectures a pack serves exactly" in err
    assert "Phi-3 (phi3)" in err and len(err.strip().splitlines()) == 1


def test_gpt2_attention_outside_the_interface_is_refused(tmp_path, tokenizer_dir):
    folder = _build(tmp_path, "gpt2", tokenizer_dir, reorder_and_upcast_attn=True)
    with pytest.raises(BadInput, match="reorder_and_upcast_attn computes its attention scores in fp32 in its own code"):
        PackTrainer([_run(folder)], show_progress=False)
    import transformers

    crossed = transformers.GPT2Config(add_cross_attention=True)
    assert "cross-attention" in decoders.refusal(crossed)


def test_an_output_head_with_a_bias_is_refused(tiny):
    model, _ = models.load(str(tiny("llama")), "causal_lm")
    decoders.check(model, "tiny")  # served as it is
    head = model.get_output_embeddings()
    model.set_output_embeddings(torch.nn.Linear(head.in_features, head.out_features, bias=True))
    with pytest.raises(BadInput, match="its output head has a bias"):
        decoders.check(model, "tiny")


def test_attention_arguments_the_pack_does_not_compute_are_refused():
    class Attention(torch.nn.Module):
        is_causal = True

    q = torch.zeros(1, 2, 3, 4)
    for name in packing.UNSERVED:
        with pytest.raises(RuntimeError, match=f"Attention asks its attention for .* \\({name}\\)"):
            packing.packed_attention(Attention(), q, q, q, None, **{name: torch.zeros(2)})


def test_sliding_window_mask_is_transformers_own():
    from transformers.masking_utils import sliding_window_causal_mask_function

    allowed = sliding_window_causal_mask_function(3)
    expected = allowed(0, 0, torch.arange(6)[:, None], torch.arange(6)[None, :])  # (6, 6)
    assert torch.equal(packing.window_mask(6, 6, 3, torch.device("cpu")), expected)
    assert torch.equal(packing.window_mask(2, 6, 3, torch.device("cpu")), expected[4:])  # the last queries


# -- checks before any write ----------------------------------------------------------------


def test_a_bf16_checkpoint_trained_from_the_command_line_exports_fp32_adapters(tiny, tmp_path, capsys):
    folder = tiny("llama")
    code, err = _train(tmp_path, capsys, "--model", str(folder), "--task", "gsm8k-slice", "--max_seq_len", "64",
                       "--max_train_samples", "8", "--max_eval_samples", "2", "--max_new_tokens", "2", "--init", "b")
    assert code == 0, err
    (adapter,) = (tmp_path / "out" / "adapters").iterdir()
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(key).dtype for key in f.keys()}
    assert dtypes == {torch.float32}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder) and config["target_modules"] == ["q_proj", "v_proj"]


def test_a_tokenizer_larger_than_the_embeddings_exits_2_before_any_write(tmp_path, tokenizer_dir, capsys):
    folder = _build(tmp_path / "small", "llama", tokenizer_dir, vocab_size=600)
    code, err = _train(tmp_path, capsys, "--model", str(folder), "--task", "gsm8k-slice")
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.strip().splitlines() == [
        f"lorainit: error: model {str(folder)!r}: its tokenizer has 1000 tokens but its embeddings hold 600 rows, "
        "so token ids 600 to 999 index past them; give the tokenizer the model was trained with, or resize the "
        "embeddings and save the model again"]


def test_a_model_the_task_cannot_use_exits_2_before_any_write(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, "--model", "minilm", "--task", "gsm8k-slice")
    assert code == 2 and not (tmp_path / "out").exists()
    assert "model 'minilm': bert is not among the decoder architectures a pack serves exactly" in err
    vision = tmp_path / "vit"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "vit"}))
    code, err = _train(tmp_path, capsys, "--model", str(vision), "--task", "sst2-slice")
    assert code == 2 and not (tmp_path / "out").exists()
    assert "is a vit, for which transformers has no sequence-classification model; this task needs one" in err


def test_a_precision_the_device_cannot_run_is_refused(monkeypatch):
    precision.check("bf16", "cpu")  # a CPU runs both half dtypes
    precision.check("fp16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(BadInput, match="precision bf16 cannot run on cuda: Tesla T4 has no bf16 units; use fp16 or fp32"):
        precision.check("bf16", "cuda")
    precision.check("fp16", "cuda")


def test_default_targets_follow_the_architecture(tiny):
    assert _run(tiny("phi3")).targets == ("qkv_proj",)
    assert _run(tiny("gpt2")).targets == ("c_attn",)
    assert _run(tiny("mistral")).targets == ("q_proj", "v_proj")
    assert RunConfig.from_dict({"model": "smollm2-135m", "task": "gsm8k", "max_steps": 1}).targets == ("q_proj", "v_proj")
    with pytest.raises(BadInput, match="its linear module names are: c_attn, c_fc, c_proj, lm_head"):
        PackTrainer([_run(tiny("gpt2"), targets="q_proj")], show_progress=False)


def test_the_offline_decoder_says_it_is_dequantised_from_4_bits(tmp_path, capsys):
    base, note = models.peft_base("smollm2-135m")
    assert base == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "dequantised from a 4-bit GGUF" in note and "not the hub model's weights" in note
    assert cli.main(["model", "smollm2-135m"]) == 0
    assert "weights: SmolLM2-135M-Instruct dequantised from a 4-bit GGUF (Q4_1" in capsys.readouterr().out


def test_the_memory_estimate_counts_the_base_in_its_precisions_dtype(tiny):
    from lorainit.sweeps import estimates

    folder = str(tiny("gemma2"))
    shape = estimates.model_shape(folder)
    assert shape is not None and shape.layers == 2 and shape.hidden == 32
    fp32, bf16 = _run(folder), _run(folder, precision="bf16")
    # no runs: the frozen base alone, 4 bytes a parameter in fp32, 2 in bf16
    assert estimates.memory_per_pack(fp32, shape, 0) == 4 * shape.params
    assert estimates.memory_per_pack(bf16, shape, 0) == 2 * shape.params
    # one run: its adapters and their AdamW state at 4 bytes in both, its activations at half in bf16
    lora = 4 * 4 * fp32.rank * 2 * shape.hidden * shape.layers * len(fp32.targets)
    act32 = estimates.memory_per_pack(fp32, shape, 1) - estimates.memory_per_pack(fp32, shape, 0) - lora
    act16 = estimates.memory_per_pack(bf16, shape, 1) - estimates.memory_per_pack(bf16, shape, 0) - lora
    assert act32 > 0 and act16 * 2 == act32


def test_an_adapter_trained_on_rounded_weights_says_so(tiny, tmp_path):
    from lorainit.engine.peft_io import export_run

    trainer = PackTrainer([_run(tiny("llama"), max_steps=1)], show_progress=False)
    base, note = models.peft_base("smollm2-135m")
    folder = export_run(trainer.pack, 0, tmp_path / "adapter", base_model=base, base_note=note)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert note in (folder / "README.md").read_text()
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["base_model_note"] == note
    plain = export_run(trainer.pack, 0, tmp_path / "plain", base_model="a/model")
    assert not (plain / "README.md").exists()  # weights that are their base's need no note
