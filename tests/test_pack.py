"""A pack of K runs: trainable parameters, parity with PEFT, independence of runs, merging."""

import copy

import pytest
import torch
from torch.nn import functional as F

from lorainit.engine.lora import DropoutStreams, LoRAConfig, LoRAPack, PackedLoRALinear, stack_runs


def _perturb(pack, seed=0, scale=0.05):
    """Move every factor off its init, as training would, so both A and B get gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pack.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _moved_pack(model, K, inits, variance="kaiming", **config):
    """K runs (run k: init inits[k % len(inits)], seed k) moved off their init, as after training."""
    pack = LoRAPack(model, LoRAConfig(targets=("query", "value"), **config), num_runs=K)
    for k in range(K):
        pack.init_run(k, inits[k % len(inits)], variance, seed=k)
    _perturb(pack)
    return pack


def _peft_model(base, config, head_name="classifier"):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.rslora,
        target_modules=list(config.targets), task_type="SEQ_CLS"))


def _load_run_into_peft(peft_model, pack, k):
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in pack.layers.items():
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A[k])
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B[k])
        params["base_model.model.classifier.modules_to_save.default.weight"].copy_(pack.head.weight[k])
        params["base_model.model.classifier.modules_to_save.default.bias"].copy_(pack.head.bias[k])
    return params


@pytest.mark.parametrize("targets,rank", [(("query", "value"), 8), (("query", "key", "value", "dense"), 4)])
def test_only_lora_and_head_train_and_counts_match_peft(minilm, targets, rank):
    model, _ = minilm
    base = copy.deepcopy(model)
    config = LoRAConfig(rank=rank, targets=targets)
    pack = LoRAPack(model, config, num_runs=5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_A" for n in pack.layers} | {f"{n}.lora_B" for n in pack.layers}
    expected |= {"classifier.weight", "classifier.bias"}
    assert trainable == expected
    assert set(pack.named_parameters()) == expected

    peft_model = _peft_model(base, config)
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert pack.trainable_per_run() == peft_trainable
    assert sum(p.numel() for p in pack.parameters()) == 5 * peft_trainable


def test_unmatched_target_lists_the_linear_module_names(minilm):
    model, _ = minilm
    with pytest.raises(ValueError) as err:
        LoRAPack(model, LoRAConfig(targets=("query", "q_proj")), num_runs=2)
    message = str(err.value)
    assert "'q_proj'" in message and "'query'" not in message.split("match")[0]
    for name in ("query", "key", "value", "dense", "classifier"):
        assert name in message.split("names are:")[1]
    # nothing was replaced: the model is still plain
    assert not any(isinstance(m, PackedLoRALinear) for m in model.modules())


def test_a_model_takes_one_pack(minilm):
    model, _ = minilm
    LoRAPack(model, LoRAConfig(), num_runs=2)
    with pytest.raises(ValueError, match="already holds a LoRA pack"):
        LoRAPack(model, LoRAConfig(), num_runs=2)


@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_and_gradients_match_peft(minilm, sst2_batch, rslora, measured):
    model, _ = minilm
    base = copy.deepcopy(model)
    batch, labels = sst2_batch
    config = LoRAConfig(rank=8, alpha=16, rslora=rslora, targets=("query", "value", "dense"))
    K = 3
    pack = LoRAPack(model, config, num_runs=K)
    for k, (init, var) in enumerate([("a", "kaiming"), ("b", "gaussian"), ("a", "gaussian")]):
        pack.init_run(k, init, var, seed=k)
    _perturb(pack)

    logits = model(**stack_runs(batch, K)).logits  # (K*b, 2)
    per_run = F.cross_entropy(logits, labels.repeat(K), reduction="none").view(K, -1).mean(1)
    per_run.sum().backward()
    logits = logits.view(K, len(labels), -1)

    for k in range(K):
        peft_model = _peft_model(copy.deepcopy(base), config)
        params = _load_run_into_peft(peft_model, pack, k)
        ref = peft_model(**batch).logits
        F.cross_entropy(ref, labels).backward()
        # the same model in other kernels (batched matmuls for the adapters and the head), relative
        # to the values' scale: fp32 rounding (eps 1.2e-7) through 6 layers forward and back. The
        # factors' gradients are compared all layers at once, relative to the largest: one layer's
        # gradient can be 1e-6 of another's (the last query's, whose attention barely moves the loss),
        # and on its own scale its rounding is order 1 (0.4 measured on an Intel Xeon). All at once:
        # up to 8.9e-6 on that Xeon (AVX-512); a wrong gradient is off by order 1.
        assert measured("logits", logits[k], ref) <= 1e-5
        for f in ("A", "B"):
            ours = torch.cat([getattr(layer, f"lora_{f}").grad[k].flatten() for layer in pack.layers.values()])
            theirs = torch.cat([params[f"base_model.model.{name}.lora_{f}.default.weight"].grad.flatten()
                                for name in pack.layers])
            assert measured(f"grad_{f}", ours, theirs) <= 2e-5, f
        head_grad = params["base_model.model.classifier.modules_to_save.default.weight"].grad
        assert measured("grad_head", pack.head.weight.grad[k], head_grad) <= 1e-5


def test_a_runs_loss_has_exactly_zero_gradient_in_other_runs(minilm, sst2_batch):
    model, _ = minilm
    batch, labels = sst2_batch
    K = 3
    pack = _moved_pack(model, K, "ab")
    logits = model(**stack_runs(batch, K)).logits
    per_run = F.cross_entropy(logits, labels.repeat(K), reduction="none").view(K, -1).mean(1)
    params = pack.parameters()
    for j in range(K):
        grads = torch.autograd.grad(per_run[j], params, retain_graph=True)
        for g in grads:
            for k in range(K):
                if k == j:
                    continue
                assert torch.count_nonzero(g[k]) == 0
            assert torch.count_nonzero(g[j]) > 0


def test_equal_seeds_give_equal_outputs_after_training(minilm, sst2_batch, measured):
    """Four runs with one seed, trained in one pack with LoRA dropout on, stay equal."""
    model, _ = minilm
    batch, labels = sst2_batch
    K = 4
    pack = LoRAPack(model, LoRAConfig(dropout=0.1, targets=("query", "value")), num_runs=K)
    for k in range(K):
        pack.init_run(k, "a", seed=7)
    pack.set_dropout_seeds([7] * K)
    with torch.no_grad():
        before = model(**stack_runs(batch, K)).logits.view(K, len(labels), -1)
    opt = torch.optim.AdamW(pack.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):
        logits = model(**stack_runs(batch, K)).logits
        F.cross_entropy(logits, labels.repeat(K), reduction="none").view(K, -1).mean(1).sum().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        out = model(**stack_runs(batch, K)).logits.view(K, len(labels), -1)
    assert (out[0] - before[0]).abs().max() > 1e-3  # training moved the runs
    # their inputs, masks and draws are equal by construction, but each run is its own slot of a
    # batched matmul, which some kernels (AVX2 MKL) round differently per slot; three Adam steps
    # carry those roundings (fp32 eps 1.2e-7) into every factor
    for k in range(1, K):
        assert measured("same_seed_slots", out[k], out[0]) <= 1e-5


def test_dropout_masks_are_per_run_and_independent_of_the_pack():
    shape = (5, 7)
    alone = DropoutStreams([2]).mask(0.5, shape, None, torch.device("cpu"), torch.float32)
    packed = DropoutStreams([1, 2, 1]).mask(0.5, shape, None, torch.device("cpu"), torch.float32)
    assert torch.equal(packed[1], alone[0])       # run seeded 2 sees its own masks in any pack
    assert torch.equal(packed[0], packed[2])      # same seed, same mask
    assert not torch.equal(packed[0], packed[1])  # different seeds, independent masks
    assert set(packed.unique().tolist()) == {0.0, 2.0}  # inverted dropout scaling 1/(1-p)


@pytest.mark.parametrize("lead", [(6,), (6, 5), (6, 2, 3)])
def test_layer_forward_routes_rows_to_their_adapter(minilm, lead):
    model, _ = minilm
    linear = model.bert.encoder.layer[0].attention.self.query
    K, r = 3, 4
    layer = PackedLoRALinear.from_linear(linear, num_runs=K, rank=r, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_A.normal_(generator=g)
        layer.lora_B.normal_(generator=g)
    x = torch.randn(*lead, linear.in_features, generator=g)  # (K*b, ..., in) with b = 2
    y = layer(x)
    b = lead[0] // K
    for k in range(K):
        xk = x[k * b:(k + 1) * b]
        ref = linear(xk) + 2.0 * (xk @ layer.lora_A[k].T @ layer.lora_B[k].T)
        assert torch.allclose(y[k * b:(k + 1) * b], ref, atol=1e-4)
    # merging adapter k gives a plain linear with the same function
    merged = layer.merge(1)
    assert torch.allclose(merged(x[b:2 * b]), y[b:2 * b], atol=1e-4)


def test_merged_model_equals_packed_run(minilm, sst2_batch, measured):
    model, _ = minilm
    batch, _ = sst2_batch
    K = 2
    pack = _moved_pack(model, K, "b", "gaussian", rslora=True)
    with torch.no_grad():
        packed = model(**stack_runs(batch, K)).logits.view(K, len(batch["input_ids"]), -1)
        for k in range(K):
            plain = pack.merged_model(k)
            assert not any(isinstance(m, PackedLoRALinear) for m in plain.modules())
            # W + s B A rounded into one matrix, against the frozen and LoRA paths apart: each
            # merged weight rounds once (eps 1.2e-7) and 6 layers carry it; up to 8e-6 seen
            assert measured("merged", plain(**batch).logits, packed[k]) <= 5e-5


def test_active_subset_computes_only_those_runs(minilm, sst2_batch, measured):
    model, _ = minilm
    batch, _ = sst2_batch
    K = 3
    pack = _moved_pack(model, K, "a")
    n = len(batch["input_ids"])
    with torch.no_grad():
        full = model(**stack_runs(batch, K)).logits.view(K, n, -1)
        pack.set_active([2, 0])
        part = model(**stack_runs(batch, 2)).logits.view(2, n, -1)
        pack.set_active(None)
    # the same runs as slots of a 2-run and of a 3-run batched matmul: fp32 rounding at most
    assert measured("subset", part[0], full[2]) <= 1e-5
    assert measured("subset", part[1], full[0]) <= 1e-5
    with pytest.raises(ValueError, match="subset"):
        pack.set_active([3])


def test_every_run_in_order_uses_the_parameters_whole(minilm):
    """All K runs in stacking order is the full pack: no index, so no gather and no scatter-add."""
    model, _ = minilm
    pack = _moved_pack(model, 3, "a")
    layers = list(pack.layers.values())
    pack.set_active([0, 1, 2])
    assert all(layer.active is None for layer in layers) and pack.head.active is None
    pack.set_active([1, 2])
    assert all(layer.active.tolist() == [1, 2] for layer in layers)
    pack.set_active([2, 1, 0])  # every run, out of order: still indexed
    assert all(layer.active.tolist() == [2, 1, 0] for layer in layers)
    pack.set_active(None)
