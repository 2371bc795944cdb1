"""`lorainit.peft.apply_init` and `save` on a user's own PEFT model: the pack's draws bit for bit,
the base rewritten as the family's reference rewrites it, five AdamW steps as the pack trains
them, and a saved adapter that loads on the unmodified base."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from lorainit.engine import rng
from lorainit.engine.lora import LoRAConfig, LoRAPack
from lorainit.engine.optim import PackedAdamW
from lorainit.engine.peft_io import export_run
from lorainit.errors import BadInput
from lorainit.peft import apply_init, save

CONFIG = LoRAConfig(rank=8, alpha=16, targets=("query", "value"))
REWRITES = ("pissa", "pissa_niter_4", "olora", "ab")  # with its default reset: true


def _peft(base, init=True, r=8, alpha=16, rslora=False, **extra):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0,
                                           init_lora_weights=init, target_modules=["query", "value"],
                                           task_type="SEQ_CLS", **extra))


def _layers(peft_model):
    """(path in the base model, PEFT layer) of every LoRA layer, in module order."""
    return [(name.removeprefix("base_model.model."), m) for name, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]


@pytest.mark.parametrize("init, args, variance", [
    ("a", {}, "kaiming"), ("a", {}, "gaussian"), ("b", {}, "kaiming"), ("b", {}, "gaussian"),
    ("gaussian", {}, "kaiming"), ("orthogonal", {}, "kaiming"), ("pissa", {}, "kaiming"),
    ("pissa_niter_4", {}, "kaiming"), ("olora", {}, "kaiming"), ("ab", {}, "kaiming"),
    ("ab", {"reset": False, "scale_b": 0.5}, "kaiming"),
])
def test_apply_init_draws_what_the_pack_draws(minilm, init, args, variance):
    model, _ = minilm
    pack = LoRAPack(copy.deepcopy(model), CONFIG, num_runs=2)
    pack.init_run(1, init, variance, seed=7, args=args)
    torch.manual_seed(123)  # PEFT's own draws at build time come from anywhere: apply_init replaces them
    peft_model = _peft(copy.deepcopy(model))
    applied = apply_init(peft_model, init=init, seed=7, init_args=args, init_variance=variance)
    rewrites = pack.corrected[1]
    assert rewrites == (init in REWRITES and args.get("reset", True)) == applied.rewrote_base
    layers = _layers(peft_model)
    assert [name for name, _ in layers] == list(pack.layers)
    for name, theirs in layers:
        ours = pack.layers[name]
        assert torch.equal(theirs.lora_A["default"].weight, ours.lora_A[1]), name
        assert torch.equal(theirs.lora_B["default"].weight, ours.lora_B[1]), name
        W, s = ours.base.weight, ours.scaling
        got = theirs.get_base_layer().weight
        if not rewrites:
            assert torch.equal(got, W)
        elif init == "ab":  # the Init[AB] reference: W -= (B0 @ A0) * s
            assert torch.equal(got, W - (ours.lora_B0[1] @ ours.lora_A0[1]) * s)
        else:  # PEFT's pissa_init / olora_init
            assert torch.equal(got, W - s * ours.lora_B0[1] @ ours.lora_A0[1])
            assert torch.equal(applied.initial[f"base_model.model.{name}"][0], ours.lora_A0[1])
    record = peft_model.lorainit_init["default"].record
    assert (record.init, record.seed, record.r, record.lora_alpha, record.converted) == (init, 7, 8, 16.0, rewrites)
    assert record.init_variance == (variance if init in ("a", "b") else None)


@pytest.mark.parametrize("init", ["gaussian", "orthogonal", "pissa", "olora"])
def test_apply_init_equals_peft_own_init_with_a_rank_per_layer(minilm, init):
    """PEFT's families with rank_pattern and alpha_pattern: apply_init on a default model equals
    PEFT's own init drawn from the run's 'init' seed as torch's global generator, factors and base."""
    model, _ = minilm
    pattern = {"rank_pattern": {"value": 4}, "alpha_pattern": {"value": 4}}
    torch.manual_seed(rng.purpose_seed(2, "init"))
    theirs = _peft(copy.deepcopy(model), init=init, **pattern)
    ours = _peft(copy.deepcopy(model), **pattern)
    apply_init(ours, init=init, seed=2)
    layers = dict(_layers(theirs))
    assert {layer.r["default"] for layer in layers.values()} == {8, 4}
    for name, layer in _layers(ours):
        for f in ("lora_A", "lora_B"):
            assert torch.equal(getattr(layer, f)["default"].weight, getattr(layers[name], f)["default"].weight), name
        assert torch.equal(layer.get_base_layer().weight, layers[name].get_base_layer().weight), name


def test_apply_init_refuses_what_it_cannot_do(minilm):
    model, _ = minilm
    with pytest.raises(BadInput, match="needs a PEFT model .* got a BertForSequenceClassification"):
        apply_init(copy.deepcopy(model), init="b")
    peft_model = _peft(copy.deepcopy(model))
    with pytest.raises(BadInput, match="has no adapter 'other'; its adapters: default"):
        apply_init(peft_model, init="b", adapter_name="other")
    with pytest.raises(BadInput, match="init_args has 'scale_a', which init pissa does not take"):
        apply_init(peft_model, init="pissa", init_args={"scale_a": 2.0})
    with pytest.raises(BadInput, match="init_args.reset must be true or false"):
        apply_init(peft_model, init="ab", init_args={"reset": 1})
    with pytest.raises(BadInput, match="init_variance applies to inits a and b only, not olora"):
        apply_init(peft_model, init="olora", init_variance="gaussian")
    with pytest.raises(BadInput, match="init 'loftq' is refused"):
        apply_init(peft_model, init="loftq")
    with pytest.raises(BadInput, match="orthogonal needs an even rank"):
        apply_init(_peft(copy.deepcopy(model), r=3), init="orthogonal")
    with pytest.raises(BadInput, match="init ab needs one rank and alpha for every layer"):
        apply_init(_peft(copy.deepcopy(model), rank_pattern={"value": 4}), init="ab")
    # a base-rewriting family where another adapter shares the base
    peft_model.add_adapter("second", copy.deepcopy(peft_model.peft_config["default"]))
    with pytest.raises(BadInput, match=r"init pissa rewrites the base weights, which the model's other adapters "
                                       r"\(second\) share"):
        apply_init(peft_model, init="pissa")
    apply_init(peft_model, init="b", adapter_name="second")  # one that keeps the base is fine
    # a base already rewritten, by PEFT or by apply_init
    with pytest.raises(BadInput, match="built with init_lora_weights='olora', which already rewrote the base"):
        apply_init(_peft(copy.deepcopy(model), init="olora"), init="pissa")
    once = _peft(copy.deepcopy(model))
    apply_init(once, init="pissa")
    with pytest.raises(BadInput, match="already rewrote this model's base for init pissa"):
        apply_init(once, init="olora")
    # not LoRA at all
    from peft import IA3Config, get_peft_model
    ia3 = get_peft_model(copy.deepcopy(model), IA3Config(target_modules=["query", "value"], feedforward_modules=[],
                                                         task_type="SEQ_CLS"))
    with pytest.raises(BadInput, match="adapter 'default' is a .*IA3 adapter, not LoRA"):
        apply_init(ia3, init="b")


def _move(peft_model, seed=5):
    """Every trainable tensor (LoRA factors, the head) moved off its init: a stand-in for training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("ab", False), ("olora", True), ("b", False)])
def test_a_saved_model_loads_on_the_unmodified_base(minilm, sst2_batch, tmp_path, init, rslora, measured):
    from peft import PeftModel

    model, _ = minilm
    batch, _ = sst2_batch
    batch = {key: t[:4] for key, t in batch.items()}
    peft_model = _peft(copy.deepcopy(model), rslora=rslora).eval()
    applied = apply_init(peft_model, init=init, seed=1)
    _move(peft_model)
    with torch.no_grad():
        want = peft_model(**batch).logits
    folder = save(peft_model, tmp_path / "adapter")
    with torch.no_grad():  # saving leaves the model as it was (PEFT's conversion loads, then drops, an adapter)
        assert torch.equal(peft_model(**batch).logits, want) and list(peft_model.peft_config) == ["default"]
    config = json.loads((folder / "adapter_config.json").read_text())
    sidecar = json.loads((folder / "lorainit_init.json").read_text())
    assert sidecar["init"] == init and sidecar["seed"] == 1 and (sidecar["r"], sidecar["lora_alpha"]) == (8, 16)
    if applied.rewrote_base:  # PEFT's conversion: rank 2r, the same scaling
        assert config["r"] == 16 and config["lora_alpha"] == (16 * 2 ** 0.5 if rslora else 32)
        assert config["init_lora_weights"] is True and sidecar["converted"]["split_at"] == 8
    else:
        assert config["r"] == 8 and sidecar["converted"] is None
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in weights  # the head, which PEFT's conversion leaves out
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
    # W + s B'A' against W' + s B A: fp32 rounding, relative to logits of order 1
    assert measured("saved_reload", got, want) <= 1e-5


def test_save_records_what_it_knows_of_a_model_apply_init_did_not_set(minilm, tmp_path):
    model, _ = minilm
    folder = save(_peft(copy.deepcopy(model), init="gaussian"), tmp_path / "gaussian")
    sidecar = json.loads((folder / "lorainit_init.json").read_text())
    # PEFT drew it from torch's global generator: the family is known, no lorainit seed is
    assert (sidecar["init"], sidecar["seed"], sidecar["converted"]) == ("gaussian", None, None)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
    with pytest.raises(BadInput, match="built with PEFT's 'pissa' init, whose initial factors lorainit does not hold"):
        save(_peft(copy.deepcopy(model), init="pissa"), tmp_path / "pissa")


def test_save_writes_what_export_run_writes_for_the_same_run(minilm, tmp_path):
    """The same pissa run, trained to the same factors, saved from PEFT by `save` and from a pack
    by `export_run`: the same tensors, bit for bit."""
    model, _ = minilm
    peft_model = _peft(copy.deepcopy(model))
    apply_init(peft_model, init="pissa", seed=0)
    _move(peft_model)
    pack = LoRAPack(copy.deepcopy(model), CONFIG, num_runs=1)
    pack.init_run(0, "pissa", seed=0)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in pack.layers.items():
            layer.lora_A[0].copy_(params[f"base_model.model.{name}.lora_A.default.weight"])
            layer.lora_B[0].copy_(params[f"base_model.model.{name}.lora_B.default.weight"])
        pack.head.weight[0].copy_(params["base_model.model.classifier.modules_to_save.default.weight"])
        pack.head.bias[0].copy_(params["base_model.model.classifier.modules_to_save.default.bias"])
    saved = load_file(str(save(peft_model, tmp_path / "peft") / "adapter_model.safetensors"))
    exported = load_file(str(export_run(pack, 0, tmp_path / "pack", base_model="minilm", init="pissa", seed=0)
                             / "adapter_model.safetensors"))
    assert set(saved) == set(exported)
    for key in saved:
        assert torch.equal(saved[key], exported[key]), key
    sidecars = [(tmp_path / side / "lorainit_init.json").read_text() for side in ("peft", "pack")]
    assert sidecars[0] == sidecars[1]


@pytest.mark.parametrize("init", ["a", "b", "gaussian", "orthogonal", "pissa", "olora", "ab"])
def test_apply_init_trains_as_the_pack_trains_its_run(minilm, sst2_batch, init, measured):
    """Five steps of torch.optim.AdamW on the PEFT model against the run alone in a pack with
    lorainit's PackedAdamW (no warmup, no clipping, the same linear decay), from the run's head."""
    from transformers import get_linear_schedule_with_warmup

    model, _ = minilm
    batch, labels = sst2_batch
    batches = [({key: t[i:i + 4] for key, t in batch.items()}, labels[i:i + 4]) for i in (0, 4)]
    # eps above the gradients' rounding: Adam's g / (|g| + eps) would otherwise turn fp32 rounding in
    # a near-zero gradient entry (W' x against W x - s B0 A0 x) into a step of up to lr either way
    lr, eps, steps = 2e-4, 1e-6, 5
    pack_model = copy.deepcopy(model)
    pack = LoRAPack(pack_model, CONFIG, num_runs=1)
    pack.init_run(0, init, seed=4)
    opt = PackedAdamW(pack.named_parameters(), lr=[lr], lr_b_ratio=[1.0], weight_decay=[0.0], max_grad_norm=[0.0],
                      warmup_ratio=[0.0], total_steps=steps, eps=eps)
    peft_model = _peft(copy.deepcopy(model))
    apply_init(peft_model, init=init, seed=4)
    params = dict(peft_model.named_parameters())
    head = {"weight": params["base_model.model.classifier.modules_to_save.default.weight"],
            "bias": params["base_model.model.classifier.modules_to_save.default.bias"]}
    with torch.no_grad():  # the pack draws the head from the run's 'head' stream
        head["weight"].copy_(pack.head.weight[0])
        head["bias"].copy_(pack.head.bias[0])
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trainable) == len(pack.parameters())
    start = {(name, f): getattr(layer, f"lora_{f}")[0].detach().clone()
             for name, layer in pack.layers.items() for f in "AB"}
    ref_opt = torch.optim.AdamW(trainable, lr=lr, eps=eps, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(ref_opt, 0, steps)
    for step in range(steps):
        rows, y = batches[step % 2]
        F.cross_entropy(pack_model(**rows).logits, y).backward()
        opt.step()
        opt.zero_grad()
        F.cross_entropy(peft_model(**rows).logits, y).backward()
        ref_opt.step()
        sched.step()
        ref_opt.zero_grad()
    for name, layer in pack.layers.items():
        for f in "AB":
            ours, theirs = getattr(layer, f"lora_{f}")[0], params[f"base_model.model.{name}.lora_{f}.default.weight"]
            # another implementation of the same run (batched adapters, a correction in place of a
            # rewritten base) through 5 AdamW steps: fp32 rounding relative to the factor's scale,
            # which Adam's normalised steps carry (4.1e-5 measured for Init[A]'s B under AVX2 kernels
            # on an Intel Xeon, 5.5e-6 under AVX-512)
            assert measured(f"trained_{f}", ours, theirs) <= 2e-4, (name, f)
            assert (ours - start[name, f]).abs().max() > 5e-5  # and training moved it, by far more
    with torch.no_grad():
        ours, theirs = pack_model(**batch).logits, peft_model(**batch).logits
    assert measured("trained_logits", ours, theirs) <= 1e-5
