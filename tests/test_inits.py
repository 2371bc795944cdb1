"""Init[A] / Init[B] under both variance conventions draw exactly the distributions the inits promise."""

import copy
import math

import pytest
import torch
from torch import nn

from lorainit.engine import rng
from lorainit.engine.inits import get_init, init_a
from lorainit.engine.lora import LoRAConfig, LoRAPack, stack_runs

CASES = [(init, variance) for init in ("a", "b") for variance in ("kaiming", "gaussian")]


def _factors(pack, k, init):
    """(random factor values, zero factor values, fan_in of the random factor) over all layers."""
    random, zero = [], []
    for layer in pack.layers.values():
        A, B = layer.lora_A[k].detach(), layer.lora_B[k].detach()
        random.append((A if init == "a" else B).flatten())
        zero.append((B if init == "a" else A).flatten())
    layer = next(iter(pack.layers.values()))
    fan_in = layer.lora_A.shape[2] if init == "a" else layer.lora_A.shape[1]
    return torch.cat(random).double(), torch.cat(zero), fan_in


@pytest.mark.parametrize("init,variance", CASES)
def test_init_statistics(minilm, init, variance):
    model, _ = minilm
    # rank 16 on query/key/value: 18 layers give about 110k draws of each factor
    pack = LoRAPack(model, LoRAConfig(rank=16, targets=("query", "key", "value")), num_runs=2)
    pack.init_run(1, init, variance, seed=3)
    x, zero, fan_in = _factors(pack, 1, init)
    n = x.numel()

    assert torch.count_nonzero(zero) == 0
    var = 1.0 / (3 * fan_in) if variance == "kaiming" else 1.0 / fan_in
    std = math.sqrt(var)
    assert abs(x.mean().item()) < 5 * std / math.sqrt(n)
    # the sample variance's relative sd is sqrt((kurtosis - 1) / n), at most 0.5% here
    assert x.var().item() == pytest.approx(var, rel=0.03)
    kurtosis = (((x - x.mean()) / x.std()) ** 4).mean().item()
    if variance == "kaiming":
        bound = 1.0 / math.sqrt(fan_in)
        assert x.abs().max().item() <= bound
        assert x.abs().max().item() > 0.999 * bound
        assert kurtosis == pytest.approx(1.8, abs=0.05)  # uniform
    else:
        assert ((x.abs() < std).double().mean().item()) == pytest.approx(0.6827, abs=0.01)
        assert kurtosis == pytest.approx(3.0, abs=0.1)  # gaussian
    # the run that was not initialised is untouched (still all zero)
    x0, zero0, _ = _factors(pack, 0, init)
    assert torch.count_nonzero(x0) == 0 and torch.count_nonzero(zero0) == 0


@pytest.mark.parametrize("init,variance", CASES)
def test_step0_product_is_zero_and_output_equals_base(minilm, sst2_batch, init, variance, measured):
    model, _ = minilm
    base = copy.deepcopy(model)
    batch, _ = sst2_batch
    pack = LoRAPack(model, LoRAConfig(rank=8, targets=("query", "key", "value", "dense")), num_runs=3)
    for k in range(3):
        pack.init_run(k, init, variance, seed=k)
    for layer in pack.layers.values():
        for k in range(3):
            assert torch.count_nonzero(layer.lora_B[k] @ layer.lora_A[k]) == 0
    stacked = stack_runs(batch, 3)
    with torch.no_grad():
        # the body adds s * B A x = exactly 0 to every frozen output: equal bit for bit
        body, base_body = model.bert(**stacked), base.bert(**stacked)
        assert torch.equal(body.last_hidden_state, base_body.last_hidden_state)
        assert torch.equal(body.pooler_output, base_body.pooler_output)
        # with run k's head on the base, only the head's kernel differs: the packed head is a
        # batched matmul, the base's a plain Linear, so fp32 rounding (eps 1.2e-7, a 384-long
        # dot product) apart
        out = model(**stacked).logits.view(3, len(batch["input_ids"]), -1)
        for k in range(3):
            base.classifier.weight.copy_(pack.head.weight[k])
            base.classifier.bias.copy_(pack.head.bias[k])
            ref = base(**stacked).logits.view(3, len(batch["input_ids"]), -1)[k]
            assert measured("head_logits", out[k], ref) <= 1e-5


def test_kaiming_init_a_draws_exactly_what_peft_draws():
    """With the same generator state, Init[A] kaiming equals PEFT's default init bit for bit."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(64, 32))
    state = torch.get_rng_state()
    peft_model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    peft_A = peft_model.base_model.model.proj.lora_A["default"].weight.detach()

    # PEFT builds lora_A (4, 64) and lora_B (32, 4) as nn.Linear (each drawing its default init),
    # then re-draws lora_A with kaiming_uniform_(a=sqrt(5)) and zeroes lora_B.
    g = torch.Generator()
    g.set_state(state)
    nn.init.kaiming_uniform_(torch.empty(4, 64), a=math.sqrt(5), generator=g)
    nn.init.kaiming_uniform_(torch.empty(32, 4), a=math.sqrt(5), generator=g)
    A, B = torch.empty(4, 64), torch.ones(32, 4)
    init_a(A, B, "kaiming", g)
    assert torch.equal(A, peft_A)
    assert torch.count_nonzero(B) == 0


def test_init_is_a_pure_function_of_seed():
    A1, B1, A2, B2 = torch.empty(4, 10), torch.empty(6, 4), torch.empty(4, 10), torch.empty(6, 4)
    get_init("b")(A1, B1, "gaussian", rng.generator(5, "init"))
    torch.manual_seed(123)  # global state must not matter
    get_init("b")(A2, B2, "gaussian", rng.generator(5, "init"))
    assert torch.equal(B1, B2) and torch.count_nonzero(A1) == 0
    get_init("b")(A2, B2, "gaussian", rng.generator(6, "init"))
    assert not torch.equal(B1, B2)


def test_unknown_init_and_variance_are_named(minilm):
    model, _ = minilm
    pack = LoRAPack(model, LoRAConfig(), num_runs=1)
    with pytest.raises(ValueError, match="init is 'c'; expected one of a, b, ab"):
        pack.init_run(0, "c")
    with pytest.raises(ValueError, match="unknown init_variance 'uniform'.*kaiming, gaussian"):
        pack.init_run(0, "a", "uniform")
