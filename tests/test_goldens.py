"""The built-in tasks against the golden data frozen from them (tests/goldens/freeze.py): every
row's token ids exactly, and a short run's losses and final metrics within the pack tolerance, with
every dropout off and with the defaults. The tasks are to become presets of the data-declared
families; these files are what the presets must reproduce, and they do not follow the code."""

import json
from pathlib import Path

import pytest

from goldens.freeze import rows, train
from lorainit.config import RunConfig
from lorainit.train import PackTrainer

GOLDENS = Path(__file__).parent / "goldens"


def _golden(name: str) -> dict:
    return json.loads((GOLDENS / f"{name}.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["sst2", "gsm8k"])
def test_a_built_in_task_encodes_its_rows_as_frozen(name):
    golden = _golden(name)
    trainer = PackTrainer([RunConfig.from_dict(golden["fields"]["dropout_off"])], show_progress=False,
                          model_overrides=golden["base_dropout_off"])
    assert rows(trainer) == golden["rows"]


@pytest.mark.parametrize("name", ["sst2", "gsm8k"])
@pytest.mark.parametrize("variant", ["dropout_off", "defaults"])
def test_a_built_in_task_trains_to_its_frozen_losses(name, variant, measured):
    golden = _golden(name)
    frozen = golden["runs"][variant]
    now = train(golden["fields"][variant], golden["base_dropout_off"] if variant == "dropout_off" else None)
    # the same code on another CPU: fp32 rounding over 3 steps, well inside the pack tolerance
    assert measured(f"golden_{name}_{variant}_loss", now["train_loss"], frozen["train_loss"]) <= 1e-4
    assert measured(f"golden_{name}_{variant}_eval", now["final"]["eval_loss"], frozen["final"]["eval_loss"]) <= 1e-4
    for metric in ("accuracy", "exact_match"):
        if metric in frozen["final"]:
            assert now["final"][metric] == frozen["final"][metric], metric
