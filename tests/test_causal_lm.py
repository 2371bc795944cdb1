"""Decoder LLMs in packs, on the real SmolLM2-135M weights and real GSM8K and WikiText-2 rows."""

import math

import pytest
import torch
from torch.nn import functional as F

from conftest import needs_data, pack_steps, peft_causal_lm_steps
from lorainit import models
from lorainit.config import RunConfig
from lorainit.tasks import causal_lm, lm_data
from lorainit.tasks.glue import DataError
from lorainit.train import PackTrainer, train_pack

pytestmark = pytest.mark.usefixtures("lm_data_folder")

BASE = dict(model="smollm2-135m", batch_size=2, max_seq_len=48, max_train_samples=24, max_eval_samples=4,
            max_new_tokens=12, max_steps=3, lr=1e-3)


UNEVEN = 200  # GSM8K's first 24 training rows run 104..442 tokens: cut at 200, half of them are shorter


def _run(**fields):
    return RunConfig.from_dict(BASE | fields)


def _losses(result):
    return [m["value"] for m in result.metrics if m["name"] == "train_loss"]


@pytest.fixture(scope="module")
def lm_data_folder():
    needs_data("gsm8k", "wikitext-2")


def test_gsm8k_rows_count_the_answer_only_and_wikitext_blocks_are_contiguous():
    _, tok = models.load("smollm2-135m", "causal_lm")
    qa = lm_data.read_gsm8k("train", max_rows=3)
    rows = causal_lm.encode_gsm8k(qa, tok, 512)
    for row, start, q in zip(rows.ids, rows.start, qa):
        assert tok.decode(row[:start]) == lm_data.gsm8k_prompt(q.question)
        assert tok.decode(row[start:]) == " " + q.answer + tok.eos_token
    batch = causal_lm.collate(rows, [0, 1], tok.pad_token_id)
    counted = batch["labels"] != causal_lm.IGNORE
    assert counted.sum(1).tolist() == [len(x) - s for x, s in zip(rows.ids[:2], rows.start[:2])]
    text, where = lm_data.wikitext_file("train")
    assert where.endswith("valid.txt")  # the shared copy has no train.txt
    blocks = causal_lm.encode_blocks(text[:20000], tok, 64)
    stream = tok(text[:20000], add_special_tokens=False)["input_ids"]
    assert sum(blocks.ids, []) == stream and all(len(b) == 64 for b in blocks.ids[:-1])


def test_chunked_loss_equals_the_plain_one_in_value_and_gradient(measured):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(700, 32, generator=g, requires_grad=True)
    weight = torch.randn(500, 32, generator=g)
    targets = torch.randint(0, 500, (700,), generator=g)
    chunked = causal_lm.token_losses(hidden, weight, targets, chunk=128)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    (grad_plain,) = torch.autograd.grad(plain.sum(), hidden)
    # the same products in row chunks, the loss as log-sum-exp minus the target logit and its
    # gradient as (softmax - onehot) @ W: fp32 rounding of 32- and 500-long sums (6e-7 seen)
    assert measured("chunked_loss", chunked, plain) <= 1e-5
    assert measured("chunked_grad", grad_chunked, grad_plain) <= 1e-5


def test_a_runs_loss_is_the_mean_over_its_answer_tokens_whatever_its_pack_mates_hold(measured):
    runs = [_run(task="gsm8k", seed=0), _run(task="gsm8k", seed=1, init="b")]
    trainer = PackTrainer(runs, show_progress=False)
    task = trainer.task
    rows0 = trainer.orders[0].rows_at(0)
    batch, lengths = trainer._batch([0, 1])
    trainer.state.set_batch([0, 1], lengths)
    trainer.model.eval()  # no dropout: the hand computation below has none either
    with torch.no_grad():
        from lorainit.tasks.base import Forward

        losses = task.loss(trainer.state, batch, Forward([0, 1], False, False))
        # by hand: run 0's own rows alone, full logits, the answer tokens only
        alone = task.batch(rows0)
        trainer.state.set_batch([0], None)
        logits = trainer.model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits
        tokens = [(r, t) for r, (x, s) in enumerate(zip((task.train.ids[i] for i in rows0),
                                                        (task.train.start[i] for i in rows0)))
                  for t in range(s - 1, len(x) - 1)]
        by_hand = torch.stack([F.cross_entropy(logits[r, t], alone["input_ids"][r, t + 1]) for r, t in tokens]).mean()
        assert int(losses.counts[0]) == len(tokens)
        # the same model, unchunked and unpacked (another batch shape through 30 layers): fp32
        # rounding; 0 under AVX-512 kernels here, 1.1e-5 under AVX2
        assert measured("hand_mean", losses.means()[0], by_hand) <= 1e-4
        # another pack-mate's rows (longer padding, other tokens) change nothing for run 0
        other = task.batch(trainer.orders[1].rows_at(5))
        stacked, lengths = task.stack([alone, other], trainer.device)
        trainer.state.set_batch([0, 1], lengths)
        again = task.loss(trainer.state, stacked, Forward([0, 1], False, False))
        assert measured("pack_mate_rows", again.means()[0], losses.means()[0]) <= 1e-6


def test_padding_free_forward_equals_the_padded_one_in_loss_and_adapter_gradients(measured, monkeypatch):
    """GSM8K rows of uneven length: the real tokens end to end with restarted positions and
    attention on the padded layout give each run the loss and gradients of right-padded rows."""
    from lorainit.tasks.base import Forward

    runs = [_run(task="gsm8k", seed=s, init=i, lr=lr, dropout=0.0, max_seq_len=UNEVEN)
            for s, i, lr in ((0, "a", 1e-3), (1, "b", 3e-3))]

    def loss_and_grads(padding_free):
        monkeypatch.setattr(causal_lm, "PADDING_FREE", padding_free)
        trainer = PackTrainer(runs, show_progress=False)
        assert trainer.task.padding_free is padding_free
        trainer.train_step(log=False)  # both adapters nonzero: Init[A]'s B and Init[B]'s A have had a step
        batch, lengths = trainer._batch([0, 1])
        assert not batch["attention_mask"].all()  # the batch has padding
        trainer.state.set_batch([0, 1], lengths)
        trainer.model.train()
        means = trainer.task.loss(trainer.state, batch, Forward([0, 1], False, False)).means()
        params = trainer.pack.parameters()
        grads = torch.autograd.grad(means.sum(), params, allow_unused=True)
        return means.detach(), torch.cat([g.flatten() for g in grads if g is not None])

    # WikiText-2's blocks are all one length: there, padding-free would only add its scatter
    monkeypatch.setattr(causal_lm, "PADDING_FREE", True)
    assert not PackTrainer([_run(task="wikitext2")], show_progress=False).task.padding_free
    loss_flat, grad_flat = loss_and_grads(True)
    loss_padded, grad_padded = loss_and_grads(False)
    # the same 30 layers on other matrix shapes (N tokens against rows x width): fp32 rounding,
    # 1.9e-7 in the loss and 4.6e-6 in the gradients under AVX-512 here
    assert measured("padding_free_loss", loss_flat, loss_padded) <= 1e-5
    assert measured("padding_free_grad", grad_flat, grad_padded) <= 1e-4


@pytest.mark.parametrize("padding_free", [True, False])
def test_attention_dropout_with_grouped_query_heads_in_a_pack_equals_runs_alone(padding_free, measured,
                                                                                  monkeypatch):
    """SmolLM2 has 9 query heads sharing 3 key/value heads; with attention dropout on, the pack's own
    attention (per-run masks) serves them, padded or padding-free."""
    monkeypatch.setattr(causal_lm, "PADDING_FREE", padding_free)
    runs = [_run(task="gsm8k", seed=s, init=i, max_steps=1, max_seq_len=UNEVEN) for s, i in ((0, "a"), (1, "b"))]
    overrides = {"attention_dropout": 0.2}

    def first_losses(runs, **kwargs):  # the first step's training losses: the forward under dropout
        trainer = PackTrainer(runs, show_progress=False, **kwargs)
        assert trainer.task.padding_free == padding_free
        losses, _ = trainer.train_step(log=False)
        return [losses[k] for k in range(len(runs))]

    packed = first_losses(runs, model_overrides=overrides)
    for k, run in enumerate(runs):
        (alone,) = first_losses([run], model_overrides=overrides)
        assert measured("attention_dropout_pack_vs_alone", packed[k], alone) <= 1e-4
    (without,) = first_losses(runs[:1])
    assert abs(without - packed[0]) > 1e-4  # the dropout did act


def test_attention_dropout_on_rows_without_padding_stays_causal():
    """WikiText-2 blocks are all one length, so their padded forward gets no mask at all; with
    attention dropout on, the pack's own attention must still hide the later tokens. Changing each
    row's last token changes nothing before it, under the same dropout draws."""
    run = _run(task="wikitext2", max_seq_len=16, dropout=0.0)
    trainer = PackTrainer([run], show_progress=False, model_overrides={"attention_dropout": 0.5})
    batch, lengths = trainer._batch([0])
    assert trainer.task._mask(batch) is None  # no row is padded
    trainer.state.set_batch([0], lengths)
    trainer.model.train()

    def hidden(ids, fresh_streams=True):
        if fresh_streams:  # every call draws the same dropout masks
            trainer.state.streams.set_state({})
        with torch.no_grad():
            return trainer.model.base_model(input_ids=ids, attention_mask=None, use_cache=False).last_hidden_state

    ids = batch["input_ids"]
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % trainer.model.config.vocab_size
    a, b = hidden(ids), hidden(changed)
    assert torch.equal(a[:, :-1], b[:, :-1])  # the same arithmetic on the same inputs: bit for bit
    assert not torch.allclose(a[:, -1], b[:, -1])
    assert not torch.allclose(a, hidden(ids, fresh_streams=False))  # the dropout did act


def test_gradient_checkpointing_of_a_decoder_pack_changes_no_number(measured):
    """Padding-free GSM8K rows, LoRA and attention dropout, two seeds: the recomputed layers see
    the forward's dropout draws and token layout."""
    overrides = {"attention_dropout": 0.2}
    runs = [_run(task="gsm8k", seed=s, init=i, max_steps=2, max_seq_len=UNEVEN, max_eval_samples=2,
                 max_new_tokens=4) for s, i in ((0, "a"), (1, "b"))]

    def trained(runs):  # two steps' losses, then every adapter entry after the second update
        trainer = PackTrainer(runs, show_progress=False, model_overrides=overrides)
        steps = [trainer.train_step(log=False)[0] for _ in range(2)]
        assert trainer.state.checkpointing == runs[0].gradient_checkpointing
        return [s[k] for s in steps for k in (0, 1)], torch.cat([p.detach().flatten() for p in trainer.pack.parameters()])

    plain_losses, plain_params = trained(runs)
    losses, params = trained([RunConfig.from_dict(r.to_dict() | {"gradient_checkpointing": True}) for r in runs])
    assert measured("checkpointed_loss", losses, plain_losses) <= 1e-6
    assert measured("checkpointed_adapters", params, plain_params) <= 1e-6


def test_grouped_query_attention_in_the_packs_attention_equals_sdpa(measured):
    from lorainit.engine.packing import attend

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 8, generator=g)
    k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    ours = attend(q, k, v, mask, 8 ** -0.5, 0.0, None)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    # explicit softmax against SDPA's kernel over 5 keys: fp32 rounding (2.2e-7 here)
    assert measured("gqa_attend", ours, ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_run_matches_peft_and_torch_adamw(measured, dtype):
    """K = 1 SmolLM2 against PEFT (CAUSAL_LM) and torch.optim.AdamW: losses and A, B gradients over
    3 steps. In fp64 the two are the same arithmetic to 1e-9; in fp32 they differ by rounding."""
    run = _run(task="gsm8k", dropout=0.0, warmup_ratio=0.0, max_grad_norm=0.0, rank=4, lr=2e-3)
    trainer = PackTrainer([run], show_progress=False, model_overrides={"dtype": dtype})
    ours_losses, ours_grads = pack_steps(trainer, run.max_steps)
    for step, (loss, grads) in enumerate(peft_causal_lm_steps(trainer, run.max_steps, dtype)):
        if dtype == torch.float64:  # the same arithmetic: only fp64 rounding (eps 2.2e-16) apart
            assert measured("peft64_loss", ours_losses[step], loss) <= 1e-9
            for (name, f), ours in ours_grads[step].items():
                assert measured(f"peft64_grad_{f}", ours, grads[name, f]) <= 1e-9, (step, name, f)
        else:
            # fp32: the 49k-long softmax sums and 30 layers in other kernels; Adam then turns the
            # rounding of near-zero gradient entries into whole steps, so only the losses compare
            assert measured("peft32_loss", ours_losses[step], loss) <= 1e-4
    assert ours_losses[-1] != ours_losses[0]


@pytest.fixture(scope="module")
def lm_pack():
    """4 runs (2 inits x 2 lrs; seeds 0 and 1, so rows of different lengths share a step), packed
    and alone, on each task."""
    out = {}
    for task in ("gsm8k", "wikitext2"):
        runs = [_run(task=task, init=i, lr=lr, seed=s, max_seq_len=UNEVEN if task == "gsm8k" else 48,
                     max_eval_samples=2, max_new_tokens=4) for i, lr, s in
                (("a", 1e-3, 0), ("b", 1e-3, 1), ("a", 3e-3, 1), ("b", 3e-3, 0))]
        out[task] = (runs, train_pack(runs, show_progress=False), [train_pack([r], show_progress=False)[0] for r in runs])
    return out


@pytest.mark.parametrize("task", ["gsm8k", "wikitext2"])
def test_pack_equals_runs_alone(lm_pack, task, measured):
    runs, packed, alone = lm_pack[task]
    for res, ref in zip(packed, alone):
        assert res.status == ref.status == "done" and res.steps == 3
        # slots of a 4-run batch against a batch of one, 3 steps: fp32 rounding Adam carries on
        assert measured("pack_vs_alone_loss", _losses(res), _losses(ref)) <= 1e-4
        for name in ("eval_loss", "perplexity") if task == "wikitext2" else ("eval_loss",):
            assert measured(f"pack_vs_alone_{name}", res.final[name], ref.final[name]) <= 1e-4
    assert len({round(_losses(r)[-1], 5) for r in packed}) == 4  # the runs differ


def test_packed_generation_equals_each_run_alone():
    runs = [_run(task="gsm8k", init=i, lr=lr, seed=s, max_steps=2) for i, lr, s in
            (("a", 1e-3, 0), ("b", 1e-3, 1), ("a", 3e-3, 1), ("b", 3e-3, 0))]
    questions = [lm_data.gsm8k_prompt(q.question) for q in lm_data.read_gsm8k("eval", max_rows=2)]

    def decode(trainer, active):
        for _ in range(2):
            trainer.train_step(log=False)
        trainer.state.set_batch(active, None)
        trainer.model.eval()
        prompts = [trainer.task.tokenizer(q)["input_ids"] for q in questions]
        with torch.inference_mode():
            return trainer.task.generate(trainer.state, len(active), prompts, 8, ["\n\nQuestion:"])

    packed = decode(PackTrainer(runs, show_progress=False), [0, 1, 2, 3])
    for k, run in enumerate(runs):
        (alone,) = decode(PackTrainer([run], show_progress=False), [0])
        assert packed[k] == alone, k
    assert all(len(t) > 0 for texts in packed for t in texts)


def test_gsm8k_adapter_reloads_in_peft_to_the_same_eval_loss(tmp_path, measured):
    from peft import PeftModel

    run = _run(task="gsm8k", max_steps=2)
    trainer = PackTrainer([run], show_progress=False)
    (res,) = trainer.run(adapters_dir=tmp_path)
    import json

    config = json.loads((tmp_path / run.run_id() / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    base, _ = models.load(run.model, "causal_lm")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / run.run_id())).eval()
    sums = counts = 0.0
    with torch.no_grad():
        for i in range(trainer.task.eval_size):
            batch = causal_lm.collate(trainer.task.eval, [i], trainer.task.pad_id)
            logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            counted = batch["labels"] != causal_lm.IGNORE
            sums += F.cross_entropy(logits[counted], batch["labels"][counted], reduction="sum").item()
            counts += counted.sum().item()
    # PEFT's kernels and one row at a time against the pack's chunked evaluation: fp32 rounding
    assert measured("peft_reload_eval_loss", res.final["eval_loss"], sums / counts) <= 1e-4


@pytest.mark.parametrize("text,expected", [
    ("She pays 3 + 4 = 7.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("so the total is\n#### $18.00 dollars", "18"),
    ("#### -5", "-5"),
    ("#### 2.50", "2.5"),
    ("#### 12 apples\n\nQuestion: next", "12"),
    ("first #### 3 then #### 4", "3"),
    ("the answer is 42", None),
    ("####", None),
    ("#### none", None),
])
def test_final_answer_normalises_the_number_after_the_first_marker(text, expected):
    assert lm_data.final_answer(text) == expected


def test_exact_match_on_real_answers():
    rows = lm_data.read_gsm8k("eval", max_rows=20)
    assert all(lm_data.exact_match(r.answer, r.answer) for r in rows)  # every real answer has a number
    assert not lm_data.exact_match("no marker at all", rows[0].answer)  # scores 0, counted as wrong
    wrong = str(int(lm_data.final_answer(rows[0].answer).replace("-", "")) + 1)
    assert not lm_data.exact_match(f"#### {wrong}", rows[0].answer)


def test_bad_rows_are_named_with_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a\\n#### 1"}\n{"question": "q", "answer": "7"}\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 2: the answer has no '#### N'"):
        lm_data.read_gsm8k("train", str(tmp_path))
    (tmp_path / "train.jsonl").write_text('{"question": "q"\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 1 is not JSON"):
        lm_data.read_gsm8k("train", str(tmp_path))
    with pytest.raises(DataError, match=r"test.jsonl: file not found"):
        lm_data.read_gsm8k("eval", str(tmp_path))
    (tmp_path / "test.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"test.txt: the split is empty"):
        lm_data.wikitext_file("eval", str(tmp_path))


def test_decoder_tasks_default_to_the_decoders_projection_names():
    assert _run(task="gsm8k").targets == ("q_proj", "v_proj")
    assert _run(task="wikitext2", targets="q_proj,k_proj").targets == ("q_proj", "k_proj")
    assert RunConfig.from_dict({"max_steps": 1}).targets == ("query", "value")
    assert math.isfinite(_run(task="gsm8k").max_new_tokens)


def test_without_a_folder_rows_come_from_the_hub_files(tmp_path, monkeypatch):
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq

    local_qa = {s: lm_data.read_gsm8k(s, max_rows=5) for s in ("train", "eval")}
    local_text = {s: lm_data.wikitext_file(s)[0][:5000] for s in ("train", "eval")}
    asked = []

    def download(repo_id, filename, repo_type):  # the hub, laid out as openai/gsm8k and Salesforce/wikitext
        asked.append((repo_id, filename, repo_type))
        split = "train" if "/train-" in filename else "eval"
        path = tmp_path / filename.replace("/", "_")
        if repo_id == "openai/gsm8k":
            rows = local_qa[split]
            pq.write_table(pa.table({"question": [r.question for r in rows], "answer": [r.answer for r in rows]}), path)
        else:
            pq.write_table(pa.table({"text": local_text[split].splitlines(keepends=True)}), path)
        return str(path)

    monkeypatch.delenv("LORAINIT_DATA", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    for split in ("train", "eval"):
        assert lm_data.read_gsm8k(split, max_rows=3) == local_qa[split][:3]
        assert lm_data.wikitext_file(split)[0] == local_text[split]
    assert ("openai/gsm8k", "main/test-00000-of-00001.parquet", "dataset") in asked
    assert ("Salesforce/wikitext", "wikitext-2-raw-v1/train-00000-of-00001.parquet", "dataset") in asked

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError, match=r"openai/gsm8k:main/train-00000-of-00001.parquet could not be fetched .*"
                                        r"OSError.*pass data_dir"):
        lm_data.read_gsm8k("train")


def test_a_decoders_trivial_loss_is_its_step0_eval_loss_once_per_seed_without_generating(monkeypatch, measured):
    """Runs whose adapters start at zero and share a seed are one function at step 0: the pack
    evaluates one of them per seed, loss only, and records it for all as `trivial_loss`."""
    runs = [_run(task="gsm8k", seed=s, init=i, lr=lr) for s, i, lr in ((0, "a", 1e-3), (0, "b", 1e-2), (1, "a", 1e-3))]
    trainer = PackTrainer(runs, show_progress=False)
    asked = []
    evaluated = trainer.task.trivial_losses

    def spy(state, active):
        asked.append(list(active))
        return evaluated(state, active)

    def no_generation(*args, **kwargs):
        raise AssertionError("the step-0 evaluation generated text")

    monkeypatch.setattr(trainer.task, "trivial_losses", spy)
    monkeypatch.setattr(trainer.task, "generate", no_generation)
    trainer.record_trivial()
    assert asked == [[0, 2]]  # one run per seed
    values = [r.trivial_loss for r in trainer.results]
    assert values[0] == values[1] and all(math.isfinite(v) for v in values)
    assert [m for m in trainer.results[1].metrics] == [{"step": 0, "name": "trivial_loss", "value": values[1]}]
    # the same number as the untrained runs' own evaluation loss, each alone
    for k in (0, 2):
        alone = PackTrainer([runs[k]], show_progress=False)
        alone.state.set_batch([0], None)
        alone.model.eval()
        with torch.inference_mode():
            (own,) = alone.task.trivial_losses(alone.state, [0])
        assert measured(f"step0 loss, run {k}", values[k], own) < 1e-5
