"""The unpadded forward equals the model's own padded forward, outputs and gradients."""

import copy

import torch

from lorainit.engine import packing, unpadded
from lorainit.engine.lora import LoRAConfig, LoRAPack, stack_runs
from lorainit.tasks import glue
from lorainit.tasks.classification import collate


def _packed(model, K=3):
    pack = LoRAPack(model, LoRAConfig(targets=("query", "value", "dense")), num_runs=K)
    g = torch.Generator().manual_seed(0)
    for k in range(K):
        pack.init_run(k, "ab"[k % 2], seed=k)
    with torch.no_grad():
        for p in pack.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return pack, packing.install(pack, list(range(K)))


def test_unpadded_equals_padded_forward_and_gradients(minilm, sst2_rows, measured):
    model, tokenizer = minilm
    assert unpadded.supports(model)
    pack, state = _packed(model)
    ids, type_ids = glue.encode(sst2_rows, tokenizer, 128)
    batch = stack_runs(collate(ids, tokenizer.pad_token_id, type_ids), 3)
    assert batch["attention_mask"].float().mean() < 0.9  # there is padding to skip
    state.set_batch(None, None)
    model.eval()  # dropout off on both sides; gradients still flow

    ref = model(**batch).logits
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in pack.parameters()]
    pack.model.zero_grad()
    out = unpadded.forward(model, state, **batch)
    out.square().sum().backward()
    assert measured("logits", out, ref) <= 1e-5
    # fp32 rounding, relative to each gradient's scale: the last layer's attention runs on one
    # query per row, a different reduction order from the padded one, and the gradients sum over
    # every token through 6 layers; up to 3.4e-6 seen
    for p, g in zip(pack.parameters(), ref_grads):
        assert measured("grads", p.grad, g) <= 2e-5


def test_unequal_token_counts_per_run(minilm, sst2_rows, measured):
    """Runs with different rows (different seeds) own different numbers of tokens."""
    model, tokenizer = minilm
    pack, state = _packed(copy.deepcopy(model), K=2)
    ids, type_ids = glue.encode(sst2_rows, tokenizer, 128)
    first = collate(ids[:4], tokenizer.pad_token_id, type_ids[:4])
    second = collate(ids[4:], tokenizer.pad_token_id, type_ids[4:])
    width = max(first["input_ids"].shape[1], second["input_ids"].shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    batch = {k: torch.cat([pad(first[k]), pad(second[k])]) for k in first}
    assert first["attention_mask"].sum() != second["attention_mask"].sum()
    state.set_batch(None, None)
    pack.model.eval()
    with torch.no_grad():
        ref = pack.model(**batch).logits
        out = unpadded.forward(pack.model, state, **batch)
    assert measured("logits", out, ref) <= 1e-5  # fp32 rounding of another layout


def _forward_backward(pack, state, batch, lengths, **options):
    """Logits and parameter gradients of one unpadded forward, drawn from fresh dropout streams."""
    state.streams._generators.clear()
    state.set_batch(None, lengths)
    pack.model.zero_grad()
    out = unpadded.forward(pack.model, state, **batch, **options)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in pack.parameters()]


def test_last_layer_on_first_tokens_equals_every_token_with_dropout_on(sst2_rows, measured):
    """The last layer computes one token per row; with every dropout on (hidden, attention,
    LoRA), its masks are the full layer's masks at those rows, so the logits and gradients match."""
    from lorainit import models

    model, tokenizer = models.load("minilm", "classification", num_labels=2)  # dropout 0.1 everywhere
    assert model.config.hidden_dropout_prob > 0 and model.config.attention_probs_dropout_prob > 0
    pack = LoRAPack(model, LoRAConfig(targets=("query", "value", "dense"), dropout=0.1), num_runs=4)
    for k in range(4):
        pack.init_run(k, "ab"[k % 2], seed=k // 2)
    with torch.no_grad():
        for p in pack.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ids, type_ids = glue.encode(sst2_rows, tokenizer, 128)
    half = len(ids) // 2
    batches = [collate(ids[s], tokenizer.pad_token_id, type_ids[s]) for s in (slice(0, half), slice(half, 2 * half))]
    width = max(b["input_ids"].shape[1] for b in batches)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    # runs 0, 1 (seed 0) see the first rows, runs 2, 3 (seed 1) the others: unequal token counts
    batch = {k: torch.cat([pad(batches[0][k])] * 2 + [pad(batches[1][k])] * 2) for k in batches[0]}
    state = packing.install(pack, [0, 0, 1, 1])
    model.train()
    lengths = [b["input_ids"].shape[1] for b in batches for _ in range(2)]
    outs, grads = zip(*(_forward_backward(pack, state, batch, lengths, every_token=every_token)
                        for every_token in (True, False)))
    assert measured("logits", outs[0], outs[1]) <= 1e-5  # the last layer's reductions on fewer queries
    model.eval()
    with torch.no_grad():
        undropped = unpadded.forward(model, state, **batch)
    assert (outs[0] - undropped).abs().max().item() > 1e-2  # the dropouts were on
    for g_all, g_first in zip(*grads):
        assert measured("grads", g_first, g_all) <= 2e-5  # as above: up to 3.4e-6 seen


def test_shared_rows_compute_the_first_layer_once_with_the_same_numbers(sst2_rows, measured):
    """Runs of one seed hold the same rows: the embeddings and the first layer's frozen
    projections run once, and the logits and gradients (every dropout on) are unchanged."""
    from lorainit import models

    model, tokenizer = models.load("minilm", "classification", num_labels=2)  # dropout 0.1 everywhere
    pack = LoRAPack(model, LoRAConfig(targets=("query", "key", "value", "dense"), dropout=0.1), num_runs=4)
    for k in range(4):
        pack.init_run(k, "ab"[k % 2], seed=0)
    with torch.no_grad():
        for p in pack.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    ids, type_ids = glue.encode(sst2_rows, tokenizer, 128)
    batch = stack_runs(collate(ids, tokenizer.pad_token_id, type_ids), 4)
    state = packing.install(pack, [0, 0, 0, 0])
    model.train()
    lengths = [batch["input_ids"].shape[1]] * 4
    outs, grads = zip(*(_forward_backward(pack, state, batch, lengths, shared=shared) for shared in (False, True)))
    assert measured("logits", outs[1], outs[0]) <= 1e-5
    assert (outs[0][:8] - outs[0][8:16]).abs().max().item() > 1e-3  # the runs differ (inits)
    # fp32 rounding: Z_A of all runs comes from one matmul instead of one per run; the first
    # layer's B gradients sum ~100 such products with cancellation (3.1e-5 of scale seen)
    for g_full, g_shared in zip(*grads):
        assert measured("grads", g_shared, g_full) <= 2e-4
