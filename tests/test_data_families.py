"""Data-driven init families (LoRA-GA, LoRA-One, EVA, CorDA) in a pack: the statistics each run
gathers there equal PEFT's own preprocessing on the same rows, the factors made from them equal
PEFT's, LoRA-One's start is its closed form, and a pack mixing them with data-free runs trains,
resumes and exports as each run does alone."""

import copy

import pytest
import torch
from torch.nn import functional as F

from conftest import NO_DROPOUT, sst2_eval_batch, train_killed_at
from lorainit import models
from lorainit.config import RunConfig
from lorainit.engine import families, rng, statistics
from lorainit.train import PackTrainer

TARGETS = ["query", "value"]
DATA = dict(task="sst2-slice", max_steps=5, max_train_samples=400, max_eval_samples=16, batch_size=8,
            dropout=0.0, lr=2e-3, warmup_ratio=0.0, rank=4, alpha=8)
# (init, seed, init_args): a pack of every data family over two seeds
GATHERED = [("lora_ga", 0, {"batches": 3}), ("lora_one", 1, {"batches": 3}), ("eva", 0, {"tau": 0.9}),
            ("corda", 1, {"batches": 3}), ("lora_ga", 1, {"batches": 3})]


def _run(init, seed, args=None, **extra):
    return RunConfig.from_dict(DATA | {"init": init, "seed": seed, "init_args": args} | extra)


class _Seen:
    """statistics.gather, recording what it returns and how often it runs."""

    def __init__(self):
        self.calls, self.found, self.real = 0, {}, statistics.gather

    def __call__(self, trainer, plans, show_progress=False):
        self.calls += 1
        found = self.real(trainer, plans, show_progress)
        self.found = found
        return found


@pytest.fixture(scope="module")
def gathered():
    """A pack of GATHERED with base dropout off (the references' preprocessing needs it), and what
    each run's statistics were."""
    seen = _Seen()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(statistics, "gather", seen)
        trainer = PackTrainer([_run(*r) for r in GATHERED], show_progress=False, model_overrides=NO_DROPOUT,
                              factor_cache=families.FactorCache(None))
    return trainer, seen.found


def _reference(trainer, k):
    """MiniLM as a run alone has it before training: the frozen base with run k's own head."""
    model, _ = models.load("minilm", "classification", num_labels=2, **NO_DROPOUT)
    model.classifier = trainer.pack.head.unpack(k)
    return model


def _batches(trainer, k, count, labels=True):
    run = trainer.runs[k]
    out = []
    for step in range(count):
        batch = trainer.task.batch(trainer.orders[run.seed].rows_at(step))
        out.append(batch if labels else {key: v for key, v in batch.items() if key != "labels"})
    return out


def _peft_config(init, **extra):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, task_type="SEQ_CLS",
                      **extra)


def _assert_factors_are_peft(trainer, k, peft_model):
    for name, layer in trainer.pack.layers.items():
        lora = peft_model.base_model.model.get_submodule(name)
        A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        assert torch.equal(layer.lora_A[k], A) and torch.equal(layer.lora_B[k], B), name
        if trainer.pack.corrected[k]:
            assert torch.equal(layer.lora_A0[k], A) and torch.equal(layer.lora_B0[k], B), name


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # PEFT's counting hook, on frozen inputs
def test_lora_ga_gradient_equals_peft_preprocess_loraga_and_factors_from_it_are_peft_s(gathered, measured):
    from peft import get_peft_model
    from peft.tuners.lora import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    trainer, found = gathered
    model = _reference(trainer, 0)
    config = _peft_config("lora_ga", lora_ga_config=LoraGAConfig())
    batches = _batches(trainer, 0, 3)

    def train_step():
        for batch in batches:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step)
    for name, st in zip(trainer.pack.layers, found[0]):
        # the pack's unpadded batched layers against PEFT's padded ones: fp32 rounding
        assert measured("lora_ga_grad", st.grad, model.get_submodule(name)._peft_loraga_grad) <= 1e-5, name
        model.get_submodule(name)._peft_loraga_grad = st.grad.clone()  # then PEFT makes the factors
    torch.manual_seed(rng.purpose_seed(0, "init"))
    _assert_factors_are_peft(trainer, 0, get_peft_model(model, config))
    assert trainer.pack.corrected[0]


def test_lora_one_starts_at_its_closed_form_from_a_full_svd_of_the_autograd_gradient(gathered, measured):
    trainer, _ = gathered
    k, run = 1, trainer.runs[1]
    model = _reference(trainer, k).train()
    weights = [model.get_submodule(name).weight for name in trainer.pack.layers]
    for w in weights:
        w.requires_grad_(True)
    grads = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for batch in _batches(trainer, k, 3):
        for g, part in zip(grads, torch.autograd.grad(model(**batch).loss, weights)):
            g += part.double() / 3
    gamma, s = 128.0, run.alpha / run.rank
    for (name, layer), G in zip(trainer.pack.layers.items(), grads):
        U, S, Vh = torch.linalg.svd(-G, full_matrices=False)
        closed = s / (gamma * S[0]) * (U[:, :4] * S[:4]) @ Vh[:4]  # -(s / (gamma sigma_1)) [G]_r
        start = s * layer.lora_B[k].double() @ layer.lora_A[k].double()
        # the top-4 subspace of a gradient the pack sums in another order than autograd: its fp32
        # rounding, grown by the SVD where singular values lie close (1.1e-5 measured on one thread)
        assert measured("lora_one_start", start, closed) <= 5e-5, name
    assert not trainer.pack.corrected[k]


def test_eva_components_equal_peft_get_eva_state_dict(gathered, measured):
    from peft.tuners.lora import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    trainer, found = gathered
    k = 2
    model = _reference(trainer, k)
    loader = _batches(trainer, k, 64, labels=False)  # sequence labels are no token mask
    config = _peft_config("eva", eva_config=EvaConfig(rho=1.0, tau=0.9))
    theirs = get_eva_state_dict(model, loader, peft_config=config, show_progress_bar=False)
    for name, layer in trainer.pack.layers.items():
        ours, ref = layer.lora_A[k], theirs[name]
        cos = (ours * ref).sum(1) / (ours.norm(dim=1) * ref.norm(dim=1))
        assert measured("eva_cos", cos.abs(), torch.ones_like(cos)) <= 1e-5, name
        assert torch.count_nonzero(layer.lora_B[k]) == 0
    assert not trainer.pack.corrected[k]


def test_corda_covariance_equals_peft_preprocess_corda_and_factors_from_it_are_peft_s(gathered, measured):
    from peft import get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import collect_eigens, crop_corda_eigens, preprocess_corda

    trainer, found = gathered
    k = 3
    model = _reference(trainer, k)
    config = _peft_config("corda", corda_config=CordaConfig(corda_method="ipm", prune_temporary_fields=False))
    rows = []
    for batch in _batches(trainer, k, 3, labels=False):  # PEFT's CorDA takes one row per forward
        for i in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][i].bool()
            rows.append({key: v[i][real][None] for key, v in batch.items()})

    def run_model():
        for row in rows:
            model(**row)

    preprocess_corda(model, config, run_model=run_model)
    for name, st in zip(trainer.pack.layers, found[k]):
        module = model.get_submodule(name)
        assert measured("corda_cov", st.covariance, module.covariance_matrix) <= 1e-5, name
        module.covariance_matrix = st.covariance.clone()
    collect_eigens(model, config, False)  # PEFT's eigens of the pack's covariance
    crop_corda_eigens(model, config)
    torch.manual_seed(rng.purpose_seed(1, "init"))
    _assert_factors_are_peft(trainer, k, get_peft_model(model, config))
    assert trainer.pack.corrected[k]


def test_statistics_are_each_runs_own_and_a_rerun_reads_the_cache(gathered, tmp_path, monkeypatch, measured):
    trainer, found = gathered
    # two seeds read different rows and draw different heads: their gradients differ
    assert measured("seeds_apart", found[4][0].grad, found[0][0].grad) > 1e-2
    seen = _Seen()
    monkeypatch.setattr(statistics, "gather", seen)
    cache = families.FactorCache(tmp_path / "inits")
    alone = PackTrainer([_run(*GATHERED[0])], show_progress=False, model_overrides=NO_DROPOUT, factor_cache=cache)
    for mine, theirs in zip(seen.found[0], found[0]):  # the same run in a pack of 5 and alone: the same bits
        assert torch.equal(mine.grad, theirs.grad)
    assert seen.calls == 1 and alone.statistics_seconds > 0
    again = PackTrainer([_run(*GATHERED[0])], show_progress=False, model_overrides=NO_DROPOUT,
                        factor_cache=families.FactorCache(tmp_path / "inits"))
    assert seen.calls == 1 and again.statistics_seconds == 0  # a new process reads the folder's cache
    for a, b in zip(alone.pack.layers.values(), again.pack.layers.values()):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B0, b.lora_B0)
    other = PackTrainer([_run("lora_ga", 0, {"batches": 2})], show_progress=False, model_overrides=NO_DROPOUT,
                        factor_cache=families.FactorCache(tmp_path / "inits"))
    assert seen.calls == 2 and other.statistics_seconds > 0  # other rows: gathered anew


def test_runs_of_one_seed_share_one_pass_and_each_reads_its_own_batches(monkeypatch):
    seen = _Seen()
    monkeypatch.setattr(statistics, "gather", seen)
    runs = [_run("lora_ga", 0, {"batches": 3}), _run("lora_one", 0, {"batches": 2}), _run("corda", 0, {"batches": 2}),
            _run("eva", 0, {"tau": 0.9}), _run("lora_ga", 0, {"batches": 3}, lr=1e-3)]  # the last: a sweep's other lr
    pack = PackTrainer(runs, show_progress=False, model_overrides=NO_DROPOUT, factor_cache=families.FactorCache(None))
    together = seen.found
    assert together[4] is together[0]  # same seed, family and options: gathered once
    for layer in pack.pack.layers.values():
        assert torch.equal(layer.lora_A[4], layer.lora_A[0]) and torch.equal(layer.lora_B0[4], layer.lora_B0[0])
    runs = runs[:4]
    forwards = []
    for k, run in enumerate(runs):
        alone = PackTrainer([run], show_progress=False, model_overrides=NO_DROPOUT,
                            factor_cache=families.FactorCache(None))
        forwards.append(alone.statistics_batches)
        for mine, theirs in zip(seen.found[0], together[k]):
            for field in ("grad", "covariance"):
                if getattr(mine, field) is not None:
                    assert torch.equal(getattr(mine, field), getattr(theirs, field)), (run.init, field)
            if mine.pca is not None:
                assert torch.equal(mine.components, theirs.components)
    assert forwards[:3] == [3, 2, 2] and forwards[3] > 2  # EVA: until its components settle
    assert pack.statistics_batches == 3 + forwards[3]  # one pass per kind, not one per run


MIXED = [("lora_ga", 0, {"batches": 2}), ("lora_one", 1, {"batches": 2}), ("eva", 0, {"tau": 0.9}),
         ("corda", 1, {"batches": 2, "mode": "kpm"}), ("lora_ga", 1, {"batches": 2, "scale": "original"}),
         ("a", 0, None), ("pissa", 1, None)]


def _mixed(**extra):
    return [_run(init, seed, args, dropout=0.1, **extra) for init, seed, args in MIXED]


def _losses(result):
    return [m["value"] for m in result.metrics if m["name"] == "train_loss"]


def test_a_mixed_pack_equals_each_run_alone_and_every_adapter_reloads_in_peft(tmp_path, measured):
    from peft import PeftModel

    runs = _mixed(max_eval_samples=32)
    cache = families.FactorCache(tmp_path / "inits")
    packed = PackTrainer(runs, show_progress=False, factor_cache=cache).run(adapters_dir=tmp_path / "adapters")
    for run, res in zip(runs, packed):
        alone = PackTrainer([run], show_progress=False, factor_cache=families.FactorCache(None)).run()[0]
        assert res.status == alone.status == "done"
        # statistics gathered and trained in a pack of 7 against alone, with dropout: fp32 rounding
        assert measured("mixed_vs_alone_loss", _losses(res), _losses(alone)) <= 1e-5, run.init
        assert measured("mixed_vs_alone_eval", res.final["eval_loss"], alone.final["eval_loss"]) <= 1e-5
    base, batch, labels = sst2_eval_batch(32)
    for run, res in zip(runs, packed):
        model = PeftModel.from_pretrained(copy.deepcopy(base), res.adapter).eval()  # the unmodified base
        with torch.no_grad():
            loss = float(F.cross_entropy(model(**batch).logits, labels))
        assert measured("reloaded_eval_loss", loss, res.final["eval_loss"]) <= 1e-5, run.init


def test_a_killed_mixed_pack_resumes_to_the_run_straight_through(tmp_path):
    runs = _mixed(checkpoint_every=2)
    # one cache folder for all three trainers, as a sweep's: factors made by another machine (another
    # CPU's SVD kernels) would start the runs elsewhere in their last bits
    straight = PackTrainer(runs, show_progress=False, factor_cache=families.FactorCache(tmp_path / "inits")).run()
    ckpt = tmp_path / "ckpt"
    train_killed_at(runs, ckpt, tmp_path / "inits", step=3)
    resumed = PackTrainer(runs, show_progress=False, factor_cache=families.FactorCache(tmp_path / "inits"))
    assert resumed.statistics_seconds == 0  # the folder's cache holds every data run's factors
    results = resumed.run(checkpoint_dir=ckpt)
    assert resumed.resumed_at == 2
    for a, b in zip(results, straight):
        assert _losses(a) == _losses(b) and a.final == b.final, a.config.init


def test_reuse_false_reads_the_batches_after_training_and_is_refused_where_training_reaches_them():
    from lorainit.errors import BadInput

    trainer = PackTrainer([_run("lora_ga", 0, {"batches": 2, "reuse": False})], show_progress=False,
                          factor_cache=families.FactorCache(None))
    p = statistics.plan(trainer, 0)
    assert p.steps == [5, 6]  # after its 5 training steps: rows it never trains on
    trained = {row for step in range(5) for row in trainer.orders[0].rows_at(step)}
    assert not trained & {row for step in p.steps for row in trainer.orders[0].rows_at(step)}
    with pytest.raises(BadInput, match="with reuse: false reads the 2 batches after its last training step, but "
                                       "its 49 steps and those 2 batches need 51 of the 50 batches an epoch of "
                                       "its 400 rows has"):
        PackTrainer([_run("lora_ga", 0, {"batches": 2, "reuse": False}, max_steps=49)], show_progress=False)


@pytest.mark.parametrize("init", ["lora_ga", "lora_one", "eva", "corda"])
def test_apply_init_with_data_starts_a_peft_model_where_the_pack_starts_the_run(gathered, init, measured):
    """The same rows through the same head, padded batches in PEFT against the pack's unpadded ones."""
    from peft import get_peft_model

    from lorainit.peft import apply_init

    trainer, _ = gathered
    k = next(i for i, (name, _, _) in enumerate(GATHERED) if name == init)
    run = trainer.runs[k]
    peft_model = get_peft_model(_reference(trainer, k), _peft_config(True))
    args = dict(GATHERED[k][2])
    applied = apply_init(peft_model, init, seed=run.seed, init_args=args,
                         data=_batches(trainer, k, 64 if init == "eva" else 3))
    assert applied.rewrote_base == trainer.pack.corrected[k]
    for name, layer in trainer.pack.layers.items():
        lora = peft_model.base_model.model.get_submodule(name)
        A, B = lora.lora_A["default"].weight.detach(), lora.lora_B["default"].weight.detach()
        # a singular pair's sign follows the last bits of its matrix: each row of A and column of B
        # up to its sign
        pairs = [("A", A, layer.lora_A[k].detach(), 1)] + ([] if init == "eva" else [("B", B, layer.lora_B[k].detach(), 0)])
        for which, theirs, ours, dim in pairs:
            cos = (theirs * ours).sum(dim) / (theirs.norm(dim=dim) * ours.norm(dim=dim))
            assert measured(f"apply_{init}_{which}_cos", cos.abs(), torch.ones_like(cos)) <= 1e-4, name
            assert measured(f"apply_{init}_{which}_norm", theirs.norm(dim=dim), ours.norm(dim=dim)) <= 1e-4, name
        if applied.rewrote_base:
            assert torch.equal(lora.get_base_layer().weight,
                               layer.base.weight - layer.scaling * (B @ A) if init == "lora_ga" else
                               layer.base.weight - layer.scaling * B @ A), name


def test_apply_init_names_what_a_data_family_lacks(gathered):
    from peft import get_peft_model

    from lorainit.errors import BadInput
    from lorainit.peft import apply_init

    trainer, _ = gathered
    model = get_peft_model(_reference(trainer, 0), _peft_config(True))
    with pytest.raises(BadInput, match="init lora_ga is computed from data: give apply_init data="):
        apply_init(model, "lora_ga")
    with pytest.raises(BadInput, match="init pissa reads no data"):
        apply_init(model, "pissa", data=_batches(trainer, 0, 1))
    with pytest.raises(BadInput, match="init lora_ga reads 8 batches, but data gave 2"):
        apply_init(model, "lora_ga", data=_batches(trainer, 0, 2))
    with pytest.raises(BadInput, match="need labels"):
        apply_init(model, "lora_one", init_args={"batches": 1}, data=_batches(trainer, 0, 1, labels=False))


def test_a_run_that_starts_off_the_base_is_judged_against_its_own_start():
    """A decoder's trivial loss is its step-0 eval loss: LoRA-One starts one gradient step away from
    the base, so it is not the base's, which a same-seed Init[A] run keeps."""
    base = dict(model="smollm2-135m", task="wikitext2-slice", max_steps=1, batch_size=2, rank=4, alpha=8,
                dropout=0.0, targets=["q_proj", "v_proj"], max_train_samples=8, max_eval_samples=2, lr=1e-4,
                save_adapters=False)
    runs = [RunConfig.from_dict(base | {"init": init, "seed": 0, "init_args": args})
            for init, args in (("lora_one", {"batches": 1, "gamma": 1.0}), ("a", None), ("eva", {"tau": 0.5}))]
    trainer = PackTrainer(runs, show_progress=False, factor_cache=families.FactorCache(None))
    trainer.record_trivial()
    one, a, eva = (res.trivial_loss for res in trainer.results)
    assert a == eva  # both start at the base: one evaluation serves the seed
    assert one != a and abs(one - a) > 1e-4


def test_an_eva_run_that_does_not_settle_fails_alone_naming_why():
    runs = [_run("eva", 0, {"max_batches": 2}), _run("a", 0)]
    results = PackTrainer(runs, show_progress=False, factor_cache=families.FactorCache(None)).run()
    assert results[0].status == "failed" and results[0].final == {}
    assert "EVA's components of bert.encoder.layer.0.attention.self.query (and 11 more layers) did not settle " \
           "to tau 0.99 within 2 batches; raise init_args.max_batches or lower tau" == results[0].error
    assert results[1].status == "done" and results[1].steps == 5
