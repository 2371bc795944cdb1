"""Round trips between a pack slot and a PEFT adapter folder."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

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
