"""Round trips between a pack slot and a PEFT adapter folder."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from lorainit.engine import rng
from lorainit.engine.lora import LoRAConfig, LoRAPack, stack_runs
from lorainit.engine.peft_io import AdapterError, export_run, import_run


def _trained_pack(model, config, K=3):
    pack = LoRAPack(model, config, num_runs=K)
    for k in range(K):
        pack.init_run(k, "ab"[k % 2], "kaiming", seed=10 + k)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pack.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return pack


@pytest.mark.parametrize("rslora", [False, True])
def test_export_loads_in_peft_with_equal_outputs(minilm, sst2_batch, tmp_path, rslora, measured):
    from peft import PeftModel

    model, _ = minilm
    base = copy.deepcopy(model)
    batch, _ = sst2_batch
    config = LoRAConfig(rank=4, alpha=8, dropout=0.1, rslora=rslora, targets=("query", "value"))
    pack = _trained_pack(model, config)
    with torch.no_grad():
        packed = model(**stack_runs(batch, 3)).logits.view(3, len(batch["input_ids"]), -1)
    folder = export_run(pack, 2, tmp_path / "run2", base_model="minilm")

    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8 and saved["use_rslora"] is rslora
    assert saved["modules_to_save"] == ["classifier"] and saved["task_type"] == "SEQ_CLS"
    assert sorted(saved["target_modules"]) == ["query", "value"]

    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        ref = peft_model(**batch).logits
    # PEFT's kernels against the pack's batched ones: fp32 rounding, relative to the logits' scale
    assert measured("peft_reload", ref, packed[2]) <= 1e-5
    # and it is run 2, not another run of the pack
    assert (ref - packed[1]).abs().max().item() > 1e-3


def test_import_then_export_is_bit_exact(minilm, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = minilm
    base = copy.deepcopy(model)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                 task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "peft")

    pack = LoRAPack(model, LoRAConfig(rank=8, alpha=16, targets=("query", "value")), num_runs=3)
    import_run(pack, 1, tmp_path / "peft")
    export_run(pack, 1, tmp_path / "ours", base_model="minilm")

    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype
        assert torch.equal(ours[key], theirs[key]), key
    # the other slots are untouched
    assert torch.count_nonzero(pack.layers["bert.encoder.layer.0.attention.self.query"].lora_A[0]) == 0


def test_import_refuses_adapters_that_do_not_fit(minilm, tmp_path):
    model, _ = minilm
    plain = copy.deepcopy(model)
    source = _trained_pack(copy.deepcopy(plain), LoRAConfig(rank=4, alpha=8, targets=("query", "value")))
    export_run(source, 0, tmp_path / "r4", base_model="minilm")

    pack = LoRAPack(model, LoRAConfig(rank=8, alpha=16, targets=("query", "value")), num_runs=2)
    before = {n: p.detach().clone() for n, p in pack.named_parameters().items()}
    with pytest.raises(AdapterError, match=r"r is 4, but the pack has 8"):
        import_run(pack, 0, tmp_path / "r4")
    with pytest.raises(AdapterError, match="missing: not a PEFT adapter folder"):
        import_run(pack, 0, tmp_path / "nowhere")

    wider = _trained_pack(copy.deepcopy(plain), LoRAConfig(rank=8, alpha=16, targets=("query", "key", "value")))
    export_run(wider, 0, tmp_path / "qkv", base_model="minilm")
    with pytest.raises(AdapterError, match="adapts modules the pack does not: .*attention.self.key"):
        import_run(pack, 0, tmp_path / "qkv")
    # a refused import changes nothing
    for n, p in pack.named_parameters().items():
        assert torch.equal(p, before[n])


# -- runs whose family rewrites the base: exported converted, at rank 2r ---------------------

FAMILIES = ("a", "b", "gaussian", "orthogonal", "pissa", "pissa_niter_4", "olora", "ab", "ab")
ARGS = ({}, {}, {}, {}, {}, {}, {}, {}, {"reset": False})  # the last: Init[AB] without reset
CORRECTED = [init in ("pissa", "pissa_niter_4", "olora") or (init == "ab" and args == {})
             for init, args in zip(FAMILIES, ARGS)]


def _family_pack(model, config, seed=3):
    """One run per family (all from `seed`), every trained tensor moved off its init."""
    pack = LoRAPack(model, config, num_runs=len(FAMILIES))
    for k, (init, args) in enumerate(zip(FAMILIES, ARGS)):
        pack.init_run(k, init, seed=seed, args=args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pack.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return pack


def _export(pack, k, folder, seed=3):
    return export_run(pack, k, folder, base_model="minilm", init=FAMILIES[k], init_args=ARGS[k], seed=seed)


@pytest.mark.parametrize("rslora", [False, True])
def test_every_family_reloads_in_peft_on_the_unmodified_base(minilm, sst2_batch, tmp_path, rslora, measured):
    from peft import PeftModel

    model, _ = minilm
    base = copy.deepcopy(model)
    batch, _ = sst2_batch
    batch = {key: t[:4] for key, t in batch.items()}
    config = LoRAConfig(rank=4, alpha=8, rslora=rslora, targets=("query", "value"))
    pack = _family_pack(model, config)
    assert pack.corrected == CORRECTED
    K = len(FAMILIES)
    with torch.no_grad():
        packed = model(**stack_runs(batch, K)).logits.view(K, 4, -1)
    for k, init in enumerate(FAMILIES):
        folder = _export(pack, k, tmp_path / f"run{k}")
        saved = json.loads((folder / "adapter_config.json").read_text())
        sidecar = json.loads((folder / "lorainit_init.json").read_text())
        assert sidecar["init"] == init and sidecar["seed"] == 3 and sidecar["r"] == 4 and sidecar["lora_alpha"] == 8
        if CORRECTED[k]:  # [A; A0], [B, -B0]: rank 2r, the same scaling
            assert saved["r"] == 8 and saved["lora_alpha"] == (8 * 2 ** 0.5 if rslora else 16)
            assert sidecar["converted"]["split_at"] == 4
        else:
            assert saved["r"] == 4 and saved["lora_alpha"] == 8 and sidecar["converted"] is None
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
        with torch.no_grad():
            ref = reloaded(**batch).logits
        # PEFT's kernels on W + s B'A' against the pack's W x + s B A x - s B0 A0 x: fp32 rounding
        assert measured("family_reload", ref, packed[k]) <= 1e-5, (init, ARGS[k])
    assert sidecar["init_args"] == {"scale_a": 1.0, "scale_b": 1.0, "reset": False}  # every option, defaults too


# PEFT warns, saving its own reference model, that a base-rewriting init should be converted: it is
@pytest.mark.filterwarnings("ignore:(PiSSA|OLoRA) changes the base weights:UserWarning")
@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_a_corrected_run_exports_what_peft_converts_bit_for_bit(minilm, tmp_path, init, rslora):
    """PEFT's documented conversion: save the initial adapter with init_lora_weights=True, train,
    then save_pretrained(..., path_initial_model_for_weight_conversion=...)."""
    from peft import LoraConfig, get_peft_model

    model, _ = minilm
    base = copy.deepcopy(model)
    config = LoRAConfig(rank=4, alpha=8, rslora=rslora, targets=("query", "value"))
    torch.manual_seed(rng.purpose_seed(3, "init"))  # the run's init stream, as torch's global generator
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, init_lora_weights=init,
                                                 target_modules=["query", "value"], task_type="SEQ_CLS"))
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(tmp_path / "init")
    peft_model.peft_config["default"].init_lora_weights = init
    pack = LoRAPack(model, config, num_runs=2)
    pack.init_run(1, init, seed=3)
    params = dict(peft_model.named_parameters())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the same "training" on both sides
        for name, layer in pack.layers.items():
            for f in "AB":
                theirs = params[f"base_model.model.{name}.lora_{f}.default.weight"]
                theirs.add_(0.05 * torch.randn(theirs.shape, generator=g))
                getattr(layer, f"lora_{f}")[1].copy_(theirs)
    peft_model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    export_run(pack, 1, tmp_path / "ours", base_model="minilm", init=init, seed=3)

    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    lora = [key for key in theirs if ".lora_" in key]
    assert len(lora) == 2 * len(pack.layers) and set(theirs) <= set(ours)  # ours keeps the head too
    for key in lora:
        assert ours[key].shape[0 if "lora_A" in key else 1] == 8
        assert torch.equal(ours[key], theirs[key]), key
    their_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "init_lora_weights"):
        assert our_config[key] == their_config[key], key


def test_import_splits_a_converted_adapter_back_and_exports_it_bit_exact(minilm, tmp_path):
    model, _ = minilm
    plain = copy.deepcopy(model)
    config = LoRAConfig(rank=4, alpha=8, targets=("query", "value"))
    source = _family_pack(copy.deepcopy(plain), config)
    k_pissa, k_ab = FAMILIES.index("pissa"), FAMILIES.index("ab")
    _export(source, k_pissa, tmp_path / "pissa")
    _export(source, k_ab, tmp_path / "ab")

    pack = LoRAPack(model, config, num_runs=2)
    pack.init_run(0, "pissa", seed=9)  # pissa draws nothing: any seed decomposes W alike
    pack.init_run(1, "ab", seed=3)
    import_run(pack, 0, tmp_path / "pissa")
    import_run(pack, 1, tmp_path / "ab")
    for k, j in ((0, k_pissa), (1, k_ab)):
        for name, layer in pack.layers.items():
            want = source.layers[name]
            assert torch.equal(layer.lora_A[k], want.lora_A[j]) and torch.equal(layer.lora_B[k], want.lora_B[j])
            assert torch.equal(layer.lora_A0[k], want.lora_A0[j]) and torch.equal(layer.lora_B0[k], want.lora_B0[j])
        assert torch.equal(pack.head.weight[k], source.head.weight[j])
    assert pack.corrected == [True, True]
    export_run(pack, 0, tmp_path / "again", base_model="minilm", init="pissa", seed=3)
    first = load_file(str(tmp_path / "pissa" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert set(first) == set(again) and all(torch.equal(first[key], again[key]) for key in first)
    for name in ("adapter_config.json", "lorainit_init.json"):
        assert (tmp_path / "again" / name).read_text() == (tmp_path / "pissa" / name).read_text()


def test_import_refuses_a_converted_adapter_that_is_not_the_runs(minilm, tmp_path):
    model, _ = minilm
    plain = copy.deepcopy(model)
    config = LoRAConfig(rank=4, alpha=8, targets=("query", "value"))
    source = _family_pack(copy.deepcopy(plain), config)
    _export(source, FAMILIES.index("pissa"), tmp_path / "pissa")
    _export(source, FAMILIES.index("ab"), tmp_path / "ab")
    _export(source, FAMILIES.index("a"), tmp_path / "a")

    pack = LoRAPack(model, config, num_runs=4)
    for k, (init, seed) in enumerate((("olora", 3), ("ab", 4), ("a", 3), ("pissa", 3))):
        pack.init_run(k, init, seed=seed)
    before = {n: p.detach().clone() for n, p in (pack.named_parameters() | pack.initial_factors()).items()}
    # another family's A0, B0, or the same family drawn from another seed
    with pytest.raises(AdapterError, match=r"query: the adapter's A0 differs from run 0's by .* converted from init "
                                           r"pissa .* seed 3"):
        import_run(pack, 0, tmp_path / "pissa")
    with pytest.raises(AdapterError, match=r"A0 differs from run 1's .* init ab with \{'scale_a': 1.0, 'scale_b': 1.0, "
                                           r"'reset': True\} and seed 3"):
        import_run(pack, 1, tmp_path / "ab")
    # a converted adapter into a run that keeps the base, and a plain one into a corrected run
    with pytest.raises(AdapterError, match="converted from init pissa .* but run 2 keeps the base"):
        import_run(pack, 2, tmp_path / "pissa")
    with pytest.raises(AdapterError, match="run 3 keeps its initial factors as a correction .* a plain adapter"):
        import_run(pack, 3, tmp_path / "a")
    # rank 2r without the sidecar that says where to split it
    (tmp_path / "pissa" / "lorainit_init.json").unlink()
    with pytest.raises(AdapterError, match="r is 8, twice the pack's 4, .* the folder has no lorainit_init.json"):
        import_run(pack, 3, tmp_path / "pissa")
    # converted at rank 4 is not an adapter of rank 8
    wide = LoRAPack(copy.deepcopy(plain), LoRAConfig(rank=8, alpha=16, targets=("query", "value")), num_runs=1)
    wide.init_run(0, "ab", seed=3)
    with pytest.raises(AdapterError, match="converted at rank 4 .* but the pack has rank 8"):
        import_run(wide, 0, tmp_path / "ab")
    for n, t in (pack.named_parameters() | pack.initial_factors()).items():
        assert torch.equal(t, before[n]), n


def test_export_refuses_an_init_that_disagrees_with_the_run(minilm, tmp_path):
    model, _ = minilm
    pack = LoRAPack(model, LoRAConfig(rank=4, alpha=8, targets=("query", "value")), num_runs=2)
    pack.init_run(0, "pissa", seed=0)
    pack.init_run(1, "ab", seed=0, args={"reset": False})
    with pytest.raises(ValueError, match="run 0 is corrected, but init a with {} keeps the base"):
        export_run(pack, 0, tmp_path / "a", base_model="minilm", init="a", seed=0)
    with pytest.raises(ValueError, match="run 1 is not corrected, but init ab with {} rewrites the base"):
        export_run(pack, 1, tmp_path / "ab", base_model="minilm", init="ab", seed=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "ab").exists()
