"""Init families in a pack: each draws what its reference draws, a base-rewriting family is carried
as a per-run correction that equals PEFT's rewritten base, and a mixed pack trains each run as it
trains alone, resumes exactly and decomposes each weight once."""

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import sst2_eval_batch, train_killed_at
from lorainit import models
from lorainit.config import RunConfig
from lorainit.engine import families, rng
from lorainit.engine.lora import DropoutStreams, LoRAConfig, LoRAPack, PackedLoRALinear, stack_runs
from lorainit.errors import BadInput
from lorainit.train import PackTrainer, train_pack

PEFT_FAMILIES = ("gaussian", "orthogonal", "pissa", "pissa_niter_4", "olora")
MIXED = ("a", "b", "gaussian", "orthogonal", "pissa", "olora", "ab")


def _peft(base, config: LoRAConfig, init, seed, task_type="SEQ_CLS"):
    """PEFT's own model for `init`, drawn from the run's init seed as torch's global generator."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(rng.purpose_seed(seed, "init"))
    return get_peft_model(base, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                           use_rslora=config.rslora, target_modules=list(config.targets),
                                           init_lora_weights=init, task_type=task_type))


def _lora(peft_model, name):
    layer = peft_model.base_model.model.get_submodule(name)
    return layer, layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


def _check_draws(model, config, init, seed, task_type):
    base = copy.deepcopy(model)
    pack = LoRAPack(model, config, num_runs=2)
    pack.init_run(1, init, seed=seed)
    peft_model = _peft(base, config, init, seed, task_type)
    assert len(pack.layers) >= 2
    for name, layer in pack.layers.items():
        theirs, A, B = _lora(peft_model, name)
        assert torch.equal(layer.lora_A[1], A) and torch.equal(layer.lora_B[1], B), name
        assert torch.count_nonzero(layer.lora_A[0]) == 0  # the other run is untouched
        if families.get(init).rewrites_base():
            assert pack.corrected == [False, True]
            assert torch.equal(layer.lora_A0[1], A) and torch.equal(layer.lora_B0[1], B)
            # the correction stands for exactly the base PEFT rewrote
            W = layer.base.weight
            assert torch.equal(theirs.base_layer.weight, W - layer.scaling * layer.lora_B0[1] @ layer.lora_A0[1])
        else:
            assert pack.corrected == [False, False] and layer.lora_A0 is None


@pytest.mark.parametrize("init", PEFT_FAMILIES)
def test_each_peft_family_draws_what_peft_draws_on_minilm(minilm, init):
    model, _ = minilm
    _check_draws(model, LoRAConfig(rank=8, alpha=16, targets=("query", "value")), init, seed=3, task_type="SEQ_CLS")


@pytest.fixture(scope="module")
def smollm2():
    model, _ = models.load("smollm2-135m", "causal_lm")
    return model.eval()


@pytest.mark.parametrize("init", PEFT_FAMILIES)
def test_each_peft_family_draws_what_peft_draws_on_smollm2(smollm2, init):
    # two layers of the decoder (its q and v of blocks 0 and 1), at a rank and alpha other than MiniLM's
    targets = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
    _check_draws(copy.deepcopy(smollm2), LoRAConfig(rank=4, alpha=4, targets=targets), init, seed=1,
                 task_type="CAUSAL_LM")


def test_init_ab_equals_its_reference(minilm):
    """Init[AB] as "Learning Rate Matters" draws it: PEFT's default model first, then every layer's
    A ~ U(±1/sqrt(in)) and B ~ U(±1/sqrt(in)) from torch's global generator, then W -= (B A) s."""
    from peft import LoraConfig, get_peft_model

    model, _ = minilm
    base = copy.deepcopy(model)
    config = LoRAConfig(rank=8, alpha=16, targets=("query", "value"))
    pack = LoRAPack(model, config, num_runs=3)
    pack.init_run(0, "ab", seed=5)
    pack.init_run(1, "ab", seed=5, args={"reset": False})
    pack.init_run(2, "ab", seed=5, args={"scale_a": 2.0, "scale_b": 0.5})
    for k, (beta_a, beta_b, reset) in enumerate([(1, 1, True), (1, 1, False), (2.0, 0.5, True)]):
        torch.manual_seed(rng.purpose_seed(5, "init"))
        ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                             task_type="SEQ_CLS"))
        for module in ref.modules():  # the reference's loop, module by module
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                fan_in = module.in_features
                nn.init.uniform_(module.lora_A.default.weight, -beta_a / fan_in ** 0.5, beta_a / fan_in ** 0.5)
                nn.init.uniform_(module.lora_B.default.weight, -beta_b / fan_in ** 0.5, beta_b / fan_in ** 0.5)
                if reset:
                    product = module.lora_B.default.weight.data @ module.lora_A.default.weight.data
                    module.base_layer.weight.data -= product * module.scaling["default"]
        for name, layer in pack.layers.items():
            theirs, A, B = _lora(ref, name)
            assert torch.equal(layer.lora_A[k], A) and torch.equal(layer.lora_B[k], B)
            assert torch.count_nonzero(layer.lora_A[k]) == A.numel() and torch.count_nonzero(B) == B.numel()
        assert pack.corrected[k] == reset
    # the product moves the output: without reset the run starts off the base by design
    layer = next(iter(pack.layers.values()))
    assert (layer.scaling * layer.lora_B[1] @ layer.lora_A[1]).abs().max() > 1e-3


def _hidden(model, batch):
    return model(**batch, output_hidden_states=True).hidden_states[-1]


def test_a_corrected_run_starts_exactly_at_the_base_model(minilm, sst2_batch, measured):
    model, _ = minilm
    base = copy.deepcopy(model)
    batch, _ = sst2_batch
    with torch.no_grad():
        want = _hidden(base, batch)
        alone = LoRAPack(model, LoRAConfig(rank=8, alpha=16, targets=("query", "value")), num_runs=1)
        alone.init_run(0, "pissa", seed=0)
        # the correction runs on the adapters' shapes: B0 (A0 x) - B (A x) is exactly 0
        assert torch.equal(_hidden(model, batch), want)
        mixed_model = copy.deepcopy(base)
        mixed = LoRAPack(mixed_model, LoRAConfig(rank=8, alpha=16, targets=("query", "value")), num_runs=3)
        for k, init in enumerate(("b", "olora", "ab")):
            mixed.init_run(k, init, seed=k)
        hidden = _hidden(mixed_model, stack_runs(batch, 3)).view(3, *want.shape)
        # runs 1 and 2 (corrected) against the base: the correction gathered over 2 of 3 runs and
        # the frozen layers over a 3-run batch, equal to fp32 rounding
        for k in (0, 1, 2):
            assert measured("corrected_step0", hidden[k], want) <= 1e-6
        # the product itself is far from zero: the correction is what cancels it
        layer = next(iter(mixed.layers.values()))
        assert (layer.scaling * layer.lora_B[1] @ layer.lora_A[1]).abs().max() > 1e-2


def test_the_correction_takes_the_undropped_input():
    """With LoRA dropout, run k computes W x + s B A drop(x) - s B0 A0 x: the correction belongs to
    the frozen base. The fused form [B, -B0] [A; A0] drop(x) would differ."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = PackedLoRALinear(base, num_runs=2, rank=4, alpha=8, dropout=0.5)
    A0, B0 = torch.randn(4, 16), torch.randn(12, 4)
    with torch.no_grad():
        layer.lora_A[1].copy_(A0 + 0.1)
        layer.lora_B[1].copy_(B0 - 0.1)
    layer.set_initial(1, A0, B0)
    layer.correct = (torch.tensor([1]), torch.tensor([1]), [1], [1])
    layer.streams = DropoutStreams([7, 7])
    layer.train()
    x = torch.randn(2 * 5, 16)
    y = layer(x).view(2, 5, 12)
    keep = DropoutStreams([7]).mask(0.5, (5, 16), None, x.device, x.dtype)[0]  # the same stream's first mask
    xd = x.view(2, 5, 16)[1] * keep
    s = layer.scaling
    want = base(x.view(2, 5, 16)[1]) + s * xd @ layer.lora_A[1].T @ layer.lora_B[1].T - s * x.view(2, 5, 16)[1] @ A0.T @ B0.T
    assert torch.allclose(y[1], want, atol=1e-5)
    fused = base(x.view(2, 5, 16)[1]) + s * (xd @ layer.lora_A[1].T @ layer.lora_B[1].T - xd @ A0.T @ B0.T)
    assert not torch.allclose(y[1], fused, atol=1e-2)
    # run 0 has no correction (runs sharing a seed share their masks)
    x0 = x.view(2, 5, 16)[0]
    assert torch.allclose(y[0], base(x0) + s * (x0 * keep) @ layer.lora_A[0].T @ layer.lora_B[0].T, atol=1e-6)
    # merged, run 1 is the base PEFT rewrote plus its adapter: W - s B0 A0 + s B A
    layer.eval()
    x1 = x[:5]
    assert torch.allclose(layer.merge(1)(x1), base(x1) + s * (x1 @ layer.lora_A[1].T @ layer.lora_B[1].T
                                                               - x1 @ A0.T @ B0.T), atol=1e-5)


def _reference_model(base, config, init, seed):
    """Run `init`'s own PEFT model: PEFT's for its families, `apply_init` where PEFT lacks it (and
    for `a`, whose draws lorainit makes without PEFT's constructor draws)."""
    if init in ("a", "b", "ab"):
        from lorainit.peft import apply_init

        peft_model = _peft(base, config, True, seed)
        apply_init(peft_model, init=init, seed=seed)
        return peft_model
    return _peft(base, config, init, seed)


def test_a_mixed_pack_matches_each_runs_own_peft_model_at_init_and_after_5_adamw_steps(minilm, sst2_batch, measured):
    model, _ = minilm
    base = copy.deepcopy(model)
    batch, labels = sst2_batch
    config = LoRAConfig(rank=8, alpha=16, targets=("query", "value"))
    K = len(MIXED)
    pack = LoRAPack(model, config, num_runs=K)
    for k, init in enumerate(MIXED):
        pack.init_run(k, init, seed=k)
    assert pack.corrected == [init in ("pissa", "olora", "ab") for init in MIXED]
    refs = []
    for k, init in enumerate(MIXED):
        ref = _reference_model(copy.deepcopy(base), config, init, k)
        head = ref.base_model.model.classifier.modules_to_save["default"]
        with torch.no_grad():  # the pack draws its head from the run's own stream
            head.weight.copy_(pack.head.weight[k])
            head.bias.copy_(pack.head.bias[k])
        refs.append(ref)
    model.train()
    # elementwise, so each run's slice steps alone; eps 1e-6, not 1e-8: Adam divides each gradient
    # entry by its running RMS, so an entry whose gradient is rounding noise would step by about lr
    # in a direction the rounding decides, on one side and not the other
    opt = torch.optim.AdamW(pack.parameters(), lr=2e-3, eps=1e-6)
    ref_opts = [torch.optim.AdamW([p for p in r.parameters() if p.requires_grad], lr=2e-3, eps=1e-6) for r in refs]
    for r in refs:
        r.train()
    for step in range(6):
        logits = model(**stack_runs(batch, K)).logits
        losses = F.cross_entropy(logits, labels.repeat(K), reduction="none").view(K, -1).mean(1)
        if step == 0:  # a run's loss moves no other run's factors
            for j in (0, 4, 6):
                grads = torch.autograd.grad(losses[j], pack.parameters(), retain_graph=True)
                assert all(torch.count_nonzero(g[k]) == 0 for g in grads for k in range(K) if k != j)
        losses.sum().backward()
        logits = logits.view(K, len(labels), -1)
        for k, (ref, ref_opt) in enumerate(zip(refs, ref_opts)):
            out = ref(**batch).logits
            F.cross_entropy(out, labels).backward()
            # another implementation (batched adapters, a correction in place of a rewritten base),
            # fp32 rounding carried through 6 layers and `step` AdamW steps; logits of order 1
            assert measured(f"logits_step{step}", logits[k], out) <= (1e-5 if step == 0 else 1e-4), (MIXED[k], step)
            if step in (0, 5):
                for f in ("A", "B"):
                    ours = torch.cat([getattr(layer, f"lora_{f}").grad[k].flatten() for layer in pack.layers.values()])
                    theirs = torch.cat([_lora_param(ref, name, f).grad.flatten() for name in pack.layers])
                    assert measured(f"grad_{f}_step{step}", ours, theirs) <= (2e-5 if step == 0 else 2e-4), (MIXED[k], f)
            if step < 5:
                ref_opt.step()
                ref_opt.zero_grad()
        if step < 5:
            opt.step()
            opt.zero_grad()
    for k in range(K):  # the factors themselves, after 5 steps
        for name, layer in pack.layers.items():
            # 6.1e-5 measured (Intel Xeon): what rounding leaves after 5 Adam steps of entries near zero
            assert measured("A_after_5", layer.lora_A[k], _lora_param(refs[k], name, "A")) <= 5e-4


def _lora_param(peft_model, name, f):
    return getattr(peft_model.base_model.model.get_submodule(name), f"lora_{f}")["default"].weight


BASE = dict(task="sst2-slice", max_steps=5, max_train_samples=40, max_eval_samples=16, batch_size=4, dropout=0.1,
            lr=2e-3, warmup_ratio=0.0)


def _runs(inits=MIXED, **extra):
    return [RunConfig.from_dict(BASE | {"init": init, "seed": k % 2} | extra) for k, init in enumerate(inits)]


def _losses(result):
    return [m["value"] for m in result.metrics if m["name"] == "train_loss"]


def test_each_run_of_a_mixed_pack_equals_itself_alone(tmp_path, measured):
    runs = _runs()
    cache = families.FactorCache(tmp_path / "inits")
    packed = PackTrainer(runs, show_progress=False, factor_cache=cache).run()
    for run, res in zip(runs, packed):
        alone = PackTrainer([run], show_progress=False, factor_cache=cache).run()[0]
        assert res.status == alone.status == "done"
        # a slot of a 7-run pack against a 1-run one, 5 steps with LoRA dropout: fp32 rounding
        assert measured("mixed_vs_alone_loss", _losses(res), _losses(alone)) <= 1e-5, run.init
        assert measured("mixed_vs_alone_eval", res.final["eval_loss"], alone.final["eval_loss"]) <= 1e-5
    assert len({round(_losses(r)[-1], 6) for r in packed}) == len(runs)


def test_a_killed_mixed_pack_resumes_to_the_run_straight_through_and_decomposes_nothing_again(
        tmp_path, monkeypatch):
    runs = _runs(("pissa", "olora", "ab", "a"), checkpoint_every=2)
    calls = {"svd": 0, "qr": 0}
    svd, qr = torch.linalg.svd, torch.linalg.qr

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch.linalg, "svd", counted("svd", svd))
    monkeypatch.setattr(torch.linalg, "qr", counted("qr", qr))
    cache = families.FactorCache(tmp_path / "inits")
    straight = PackTrainer(runs, show_progress=False, factor_cache=cache).run()
    layers = 12  # MiniLM's query and value in 6 blocks
    assert calls == {"svd": layers, "qr": layers}  # pissa's SVDs, olora's QRs: once each

    ckpt = tmp_path / "ckpt"
    train_killed_at(runs, ckpt, tmp_path / "inits", step=3)
    assert calls == {"svd": layers, "qr": layers}  # a new process reads the folder's cache
    # the resumed pack takes its corrections from the checkpoint: factors now in the cache would not
    # change them
    for path in (tmp_path / "inits").glob("*.safetensors"):
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(path))
        save_file({k: v + 1.0 for k, v in tensors.items()}, str(path))
    resumed = PackTrainer(runs, show_progress=False, factor_cache=families.FactorCache(tmp_path / "inits"))
    results = resumed.run(checkpoint_dir=ckpt)
    assert resumed.resumed_at == 2
    for a, b in zip(results, straight):
        assert _losses(a) == _losses(b) and a.final == b.final
    assert calls == {"svd": layers, "qr": layers}


def test_the_factor_cache_keeps_the_first_bits_written(tmp_path):
    targets = [families.Target("w", torch.randn(6, 5))]
    one, two = families.FactorCache(tmp_path), families.FactorCache(tmp_path)
    key = families.FactorCache.key("pissa", {}, targets, 2, 4.0, False, 0)
    first = families.Factors([torch.ones(2, 5)], [torch.ones(6, 2)], True)
    assert one.put(key, first) is first
    kept = two.put(key, families.Factors([torch.zeros(2, 5)], [torch.zeros(6, 2)], True))
    assert torch.equal(kept.A[0], first.A[0])
    # the key covers what determines the factors
    assert key != families.FactorCache.key("pissa", {}, targets, 2, 8.0, False, 0)
    assert key == families.FactorCache.key("pissa", {}, targets, 2, 4.0, False, 1)  # pissa draws nothing
    assert (families.FactorCache.key("pissa_niter_2", {}, targets, 2, 4.0, False, 0)
            != families.FactorCache.key("pissa_niter_2", {}, targets, 2, 4.0, False, 1))
    moved = [families.Target("w", targets[0].weight + 1e-7)]
    assert key != families.FactorCache.key("pissa", {}, moved, 2, 4.0, False, 0)


@pytest.mark.parametrize("fields,needle", [
    ({"init": "dora_like"}, "init is 'dora_like'; expected one of a, b, ab, gaussian, orthogonal, pissa, olora"),
    ({"init": "pissa", "init_args": {"niter": 4}}, "init_args has 'niter', which init pissa does not take; its "
                                                   "options: none"),
    ({"init": "ab", "init_args": {"reset": "no"}}, "init_args.reset must be true or false"),
    ({"init": "ab", "init_args": {"scale_c": 1}}, "its options: scale_a, scale_b, reset"),
    ({"init": "orthogonal", "rank": 5}, "init orthogonal needs an even rank"),
    ({"init": "gaussian", "init_variance": "gaussian"}, "PEFT's gaussian init is A ~ N(0, 1/r^2)"),
    ({"init": "pissa", "init_variance": "gaussian"}, "init_variance applies to inits a and b only, not pissa"),
    ({"init": "loftq"}, "LoftQ replaces the frozen base by its quantised copy"),
    ({"init": False}, "PEFT's init_lora_weights=false draws both A and B"),
    ({"init": "false"}, "the model's output moves at step 0"),
    ({"init": "eva", "init_args": {"rho": 2}}, "init_args.rho is 2; EVA's rank redistribution (rho > 1)"),
    ({"init": "lora_ga", "init_args": {"scale": "huge"}}, "init_args.scale is 'huge'; init lora_ga takes stable, "
                                                          "weight_svd, gd_scale, unit, original"),
    ({"init": "corda", "init_args": {"batches": 0}}, "init_args.batches must be a whole number of at least 1"),
    ({"init": "lora_one", "init_args": {"batches": 2.5}}, "init_args.batches must be a whole number"),
    ({"init": "eva", "init_args": {"tau": 2}}, "init_args.tau must be in (0, 1]"),
    ({"init": "dora"}, "DoRA rescales every row of the base weight"),
    ({"init": "ab", "init_args": "[1, 2]"}, "init_args must be a mapping"),
])
def test_bad_inits_are_named(fields, needle):
    with pytest.raises(BadInput, match=re_escape(needle)):
        RunConfig.from_dict({"max_steps": 1} | fields)


def re_escape(text):
    import re
    return re.escape(text)


def test_peft_strings_and_defaults_keep_run_ids():
    a = RunConfig.from_dict({"max_steps": 1})
    assert RunConfig.from_dict({"max_steps": 1, "init": True}).run_id() == a.run_id()  # PEFT's true is Init[A]
    assert RunConfig.from_dict({"max_steps": 1, "init": "TRUE"}).init == "a"
    assert RunConfig.from_dict({"max_steps": 1, "init": "pissa_niter_16"}).init == "pissa_niter_16"
    ab = RunConfig.from_dict({"max_steps": 1, "init": "ab"})
    same = RunConfig.from_dict({"max_steps": 1, "init": "ab", "init_args": {"reset": True, "scale_a": 1}})
    assert same.init_args is None and same.run_id() == ab.run_id()  # defaults are not options
    other = RunConfig.from_dict({"max_steps": 1, "init": "ab", "init_args": "{reset: false}"})
    assert json.loads(other.init_args) == {"reset": False} and other.run_id() != ab.run_id()


@pytest.mark.parametrize("fields,needle", [
    ({"init": "lora_xs"}, "init is 'lora_xs'; expected one of"),
    ({"init": "ab", "init_args": {"reset_b": True}}, "init_args has 'reset_b'"),
    ({"init": "orthogonal", "rank": 7}, "needs an even rank"),
    ({"init": "olora", "init_variance": "gaussian"}, "init_variance applies to inits a and b only"),
    ({"init": "loftq"}, "LoftQ replaces the frozen base"),
    ({"init": False}, "PEFT's init_lora_weights=false"),
    ({"init": "lora_ga", "init_args": {"reuse": False, "batches": 996}},
     "with reuse: false reads the 996 batches after its last training step, but its 5 steps and those 996 "
     "batches need 1001 of the 1000 batches an epoch of its 4000 rows has"),
])
def test_a_sweep_with_a_bad_init_exits_2_before_any_write(tmp_path, capsys, fields, needle):
    import yaml

    from lorainit import cli

    sweep = tmp_path / "bad.yaml"
    grid = {"lr": [1e-3]} | {key: [value] for key, value in fields.items()}
    sweep.write_text(yaml.safe_dump({"name": "bad", "base": {"task": "sst2-slice", "max_steps": 5}, "grid": grid}))
    out = tmp_path / "out"
    assert cli.main(["sweep", str(sweep), "--out", str(out)]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_every_familys_trained_adapter_reloads_in_peft_to_the_runs_eval_loss_and_accuracy(tmp_path, measured):
    """Trained in one pack, each family's adapter (the converted rank-2r form where the run is
    corrected) is loaded by PEFT alone onto the unmodified base and evaluated on the run's rows."""
    from peft import PeftModel

    runs = [RunConfig.from_dict(BASE | {"init": init, "seed": 1, "max_eval_samples": 32, "lr": 5e-3})
            for init in ("a", "b", "gaussian", "orthogonal", "pissa", "pissa_niter_4", "olora", "ab")]
    runs.append(RunConfig.from_dict(runs[-1].to_dict() | {"init_args": {"reset": False}}))
    results = train_pack(runs, adapters_dir=tmp_path, show_progress=False)
    base, batch, labels = sst2_eval_batch(32)
    for run, res in zip(runs, results):
        config = json.loads((tmp_path / run.run_id() / "adapter_config.json").read_text())
        corrected = families.get(run.init).rewrites_base(json.loads(run.init_args or "{}"))
        assert config["r"] == (2 * run.rank if corrected else run.rank), run.init
        model = PeftModel.from_pretrained(copy.deepcopy(base), res.adapter).eval()
        with torch.no_grad():
            logits = model(**batch).logits
        # PEFT's layers against the pack's batched ones, padded against unpadded: fp32 rounding
        assert measured("reloaded_eval_loss", float(F.cross_entropy(logits, labels)), res.final["eval_loss"]) <= 1e-5
        assert float((logits.argmax(-1) == labels).float().mean()) == res.final["accuracy"], run.init
        sidecar = json.loads((tmp_path / run.run_id() / "lorainit_init.json").read_text())
        assert sidecar["init"] == run.init and sidecar["seed"] == 1
