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
    ({"init": "c"}, "init is 'c'; expected one of a, b, ab"),
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


def test_run_ids_are_stable_across_versions():
    """Ids name the runs in every sweep folder; this one was computed when the id scheme was fixed."""
    assert RunConfig.from_dict({"max_steps": 10}).run_id() == "405189e5610f"
    assert RunConfig.from_dict({"max_steps": 10, "lr": 1e-3, "init": "b"}).run_id() != "405189e5610f"


def test_a_new_field_changes_no_id_at_its_default_and_every_id_off_it():
    import dataclasses

    Extended = dataclasses.make_dataclass("RunConfig", [("new_knob", "float", dataclasses.field(default=0.5))],
                                          bases=(RunConfig,), frozen=True)
    for values in ({"max_steps": 10}, {"epochs": 2, "lr": 3e-4, "init": "b", "targets": "query,key"}):
        run = RunConfig.from_dict(values)
        assert Extended.from_dict(values).run_id() == run.run_id()
        assert Extended.from_dict(values | {"new_knob": 0.75}).run_id() != run.run_id()
