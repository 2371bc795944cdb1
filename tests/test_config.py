"""Run configs: typed fields, errors that name the key, a stable identity."""

import pytest

from lorainit.config import RunConfig
from lorainit.errors import BadInput


def test_values_are_coerced_from_text():
    run = RunConfig.from_dict({"lr": "1e-3", "max-steps": "20", "targets": "query, value", "rslora": "true"})
    assert run.lr == 1e-3 and run.max_steps == 20 and run.targets == ("query", "value") and run.rslora is True


@pytest.mark.parametrize("values,needle", [
    ({"lrr": 1}, "unknown key 'lrr'; run fields are: model, task"),
    ({"lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"max_steps": 2.5}, "max_steps must be an integer"),
    ({"rslora": "maybe"}, "rslora must be true or false"),
    ({"init": "c"}, "init is 'c'; allowed: a, b"),
    ({"task": "cola"}, "task is 'cola'; allowed: sst2, qnli, mnli"),
    ({"precision": "fp8"}, "precision is 'fp8'; allowed: fp32, bf16, fp16"),
    ({"lr": -1}, "lr must be a positive number"),
    ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ({"targets": []}, "targets is empty"),
    ({"max_steps": None}, "give epochs or max_steps"),
])
def test_bad_values_name_the_key(values, needle):
    with pytest.raises(BadInput) as err:
        RunConfig.from_dict({"max_steps": 10} | values)
    assert needle in str(err.value)


def test_identity_is_a_hash_of_the_resolved_config():
    a = RunConfig.from_dict({"max_steps": 10, "lr": 1e-3})
    assert a.run_id() == RunConfig.from_dict({"lr": "0.001", "max_steps": "10"}).run_id()
    assert a.run_id() != RunConfig.from_dict({"max_steps": 10, "lr": 2e-3}).run_id()
    # lr and init may differ inside a pack; the rank may not
    assert a.pack_key() == RunConfig.from_dict({"max_steps": 10, "lr": 5e-3, "init": "b"}).pack_key()
    assert a.pack_key() != RunConfig.from_dict({"max_steps": 10, "rank": 4}).pack_key()
