"""lorainit's init families on a PEFT model of your own: `apply_init`, then `save`.

    from peft import LoraConfig, get_peft_model
    from lorainit.peft import apply_init, save

    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    apply_init(model, init="pissa", seed=0)   # the factors a lorainit run (pissa, seed 0) starts from
    ...                                       # train it as you like
    save(model, "adapter")                    # loads on the unmodified base with PeftModel.from_pretrained

`apply_init` sets every LoRA layer of one adapter to what `LoRAPack.init_run` draws for a run of
that family and seed, bit for bit: the same draws from the run's 'init' stream, layer by layer in
module order (`engine/families.py`, `engine/inits.py`). The task head and every other parameter
are left as they are.

The families computed from data (lora_ga, lora_one, eva, corda) read `data`: an iterable of batches
the model takes as `model(**batch)` (a DataLoader), with `labels` for the gradient families, whose
loss is the model's own. The statistics are gathered as a pack gathers a run's
(`engine/statistics.py`) with the adapter switched off, through the model's own head, in train mode
(gradients, with the model's own dropout) or eval mode (activations), from the first `batches`
batches (EVA: until its components settle, cycling `data` as PEFT does).

A family that rewrites the base (pissa, pissa_niter_<K>, olora, ab with reset) rewrites it here as
its reference does: W <- W - s B0 A0, computed on a CPU copy (in fp32 and cast back to W's dtype for
PEFT's families, as PEFT's `pissa_init` does; `W -= (B0 @ A0) * s` in W's dtype for ab, as the
Init[AB] reference does). A pack keeps the same run's base and subtracts s B0 A0 x instead: the
same function of (A, B), so the same training. `apply_init` remembers (A0, B0) on the model
(`model.lorainit_init[adapter_name]`, an `Applied`), and `save` converts such an adapter with
PEFT's own conversion (rank 2r, `engine/peft_io.py`) so that it loads on the unmodified base.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorainit.engine import families, rng
from lorainit.engine.inits import VARIANCES, get_init
from lorainit.engine.lora import is_adaptable, is_conv1d, train_dtype
from lorainit.engine.peft_io import WEIGHTS_FILE, InitRecord, write_sidecar
from lorainit.errors import BadInput
from lorainit.files import write_atomic

__all__ = ["Applied", "apply_init", "save"]

# PEFT's `init_lora_weights` values whose init has already rewritten the base when the model was built
REWRITTEN_BY_PEFT = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class Applied:
    """What `apply_init` did to one adapter of a PEFT model; `save` reads it."""

    record: InitRecord  # family, options, variance, seed, r and alpha (written beside the adapter)
    # layer path -> (A0 (r, in), B0 (out, r)), fp32 on the CPU: kept for a family that rewrites the base
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rewrote_base(self) -> bool:
        return bool(self.initial)


def _lora_config(peft_model: nn.Module, adapter_name: str):
    """The adapter's `LoraConfig`; BadInput for a model that is not a PEFT LoRA model holding it."""
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict):
        raise BadInput(f"apply_init needs a PEFT model (peft.get_peft_model), got a {type(peft_model).__name__} "
                       "with no peft_config")
    if adapter_name not in configs:
        raise BadInput(f"the model has no adapter {adapter_name!r}; its adapters: {', '.join(configs)}")
    config = configs[adapter_name]
    if str(getattr(config, "peft_type", "")).rpartition(".")[2] != "LORA":
        raise BadInput(f"adapter {adapter_name!r} is a {config.peft_type} adapter, not LoRA")
    if getattr(config, "use_dora", False):
        raise BadInput(f"adapter {adapter_name!r} uses DoRA, whose magnitude depends on the init; "
                       "lorainit's families are LoRA inits")
    return config


def _lora_layers(peft_model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every PEFT LoRA layer holding `adapter_name`, in module order."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, m) for name, m in peft_model.named_modules()
              if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    if not layers:
        kinds = sorted({type(m).__name__ for m in peft_model.modules() if isinstance(m, LoraLayer)})
        raise BadInput(f"{type(peft_model).__name__} has no LoRA layer holding adapter {adapter_name!r}"
                       + (f" (its LoRA layers: {', '.join(kinds)}, for other adapters)" if kinds else
                          " (it has no LoRA layer at all)"))
    odd = [name for name, m in layers if not is_adaptable(m.get_base_layer())]
    if odd:
        raise BadInput(f"apply_init sets LoRA on linear layers (nn.Linear, Conv1D) only; {odd[0]} adapts a "
                       f"{type(dict(layers)[odd[0]].get_base_layer()).__name__}")
    return layers


def _target(name: str, layer: nn.Module) -> families.Target:
    """The layer's frozen weight as the families read it: (out, in), fp32, CPU."""
    base = layer.get_base_layer()
    return families.Target.of(name, base.weight, is_conv1d(base))


def _draw(init: str, args: dict, targets: list[families.Target], ranks: list[int], alphas: list[float],
          rslora: bool, seed: int) -> families.Factors:
    """`families.factors` for layers that may differ in rank and alpha (PEFT's rank_pattern and
    alpha_pattern): each layer's draws from the one 'init' stream in module order, which is the
    same sequence as one call over all layers where they agree."""
    if len(set(zip(ranks, alphas))) == 1:
        return families.factors(init, args, targets, ranks[0], alphas[0], rslora, seed)
    if init == "ab":  # its reference draws every layer's default before any U draw: one rank for all
        raise BadInput("init ab needs one rank and alpha for every layer (its reference draws all layers' "
                       f"defaults first), got ranks {sorted(set(ranks))} and alphas {sorted(set(alphas))}")
    g = rng.generator(seed, "init")
    per_layer = [families.draw(init, args, [t], r, a, rslora, g) for t, r, a in zip(targets, ranks, alphas)]
    return families.Factors([f.A[0] for f in per_layer], [f.B[0] for f in per_layer], per_layer[0].corrected)


@torch.no_grad()
def _rewrite_base(layer: nn.Module, A0: torch.Tensor, B0: torch.Tensor, scaling: float, init: str) -> None:
    """W <- W - s B0 A0, as the family's reference computes it, on a CPU copy of W."""
    base = layer.get_base_layer()
    w = base.weight.detach().to("cpu", copy=True)
    w = w.T if is_conv1d(base) else w  # (out, in)
    if init == "ab":  # the Init[AB] reference: `weight.data -= (B @ A) * scaling`, in W's dtype
        w -= (B0 @ A0) * scaling
    elif init == "lora_ga":  # PEFT's lora_ga_init: `W - scaling * (B @ A)` in fp32, cast back
        w = (w.to(torch.float32) - scaling * (B0 @ A0)).to(w.dtype)
    else:  # PEFT's pissa_init / olora_init: `W - scaling * B @ A` in fp32, cast back
        w = (w.to(torch.float32) - scaling * B0 @ A0).to(w.dtype)
    base.weight.copy_((w.T if is_conv1d(base) else w).to(base.weight.device))


def _gathered(peft_model: nn.Module, layers: list[tuple[str, nn.Module]], init: str, args: dict, ranks: list[int],
              data) -> list:
    """A data family's statistics of each layer over `data`, with the adapters off (the base alone)."""
    from itertools import cycle

    from lorainit.engine import statistics

    plan = statistics.Plan(0, init, args, list(range(statistics.batches(args))))
    collector = statistics.Collector(dict(layers), [plan], dict(zip((n for n, _ in layers), ranks)))
    handles = [layer.register_forward_hook(collector.hook(name)) for name, layer in layers]
    grad = plan.kind == "grad"
    weights = [layer.get_base_layer().weight for _, layer in layers]
    was_training, frozen = peft_model.training, [w.requires_grad for w in weights]
    device = weights[0].device
    batches = iter(cycle(data) if plan.kind == "eva" else data)
    try:
        with peft_model.disable_adapter():
            peft_model.train(grad)
            for w in weights:  # the layers' outputs then carry the gradient the statistics read
                w.requires_grad_(grad)
            for i in plan.steps:
                stats = collector.stats[0].values()
                for st in stats:
                    st.stopped = st.stopped or st.settled
                if plan.kind == "eva" and all(st.stopped for st in stats):
                    break
                batch = next(batches, None)
                if batch is None:
                    raise BadInput(f"init {init} reads {len(plan.steps)} batches, but data gave {i}")
                batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
                ids = batch.get("input_ids")
                keep = batch.get("attention_mask", torch.ones_like(ids) if ids is not None else None)
                if keep is None:
                    raise BadInput("apply_init's data gives batches with input_ids (and attention_mask)")
                labels = batch.get("labels")
                labelled = keep.bool() & (labels != -100) if labels is not None and labels.shape == keep.shape \
                    else keep.bool()
                collector.set_batch([0], keep, labelled)
                if grad:
                    with torch.enable_grad():
                        loss = peft_model(**batch).loss
                        if loss is None:
                            raise BadInput(f"init {init} reads gradients: data's batches need labels, so that "
                                           "the model returns its loss")
                        loss.backward()
                else:
                    with torch.no_grad():
                        peft_model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        for w, flag in zip(weights, frozen):
            w.grad = None
            w.requires_grad_(flag)
        for p in peft_model.parameters():
            p.grad = None
        peft_model.train(was_training)
    found = [st.finish() for st in collector.stats[0].values()]
    if plan.kind == "eva" and (why := statistics.unsettled([n for n, _ in layers], found, args["tau"], len(plan.steps))):
        raise BadInput(why)
    return found


def apply_init(peft_model: nn.Module, init: str = "b", seed: int = 0, adapter_name: str = "default",
               init_args: dict | None = None, init_variance: str = "kaiming", data=None) -> Applied:
    """Set every LoRA layer of `adapter_name` to the factors a lorainit run of family `init` (with
    options `init_args`; `init_variance` for a and b) draws from `seed`; return what was done.
    `data`: for a family computed from data, the batches it reads (see the module's doc).

    Bit for bit what `LoRAPack.init_run` draws for that run. Each layer's rank and scaling are read
    from the layer (rank_pattern, alpha_pattern and rsLoRA as PEFT built them). A family that
    rewrites the base rewrites it (see the module's doc), and is refused on a model holding more
    than one adapter, whose others would see the change. Refused too: a model PEFT built with an
    init that already rewrote its base, or one whose base `apply_init` already rewrote."""
    init = families.canonical(init)
    family = families.get(init)
    config = _lora_config(peft_model, adapter_name)
    layers = _lora_layers(peft_model, adapter_name)
    if init_variance not in VARIANCES:
        raise BadInput(f"unknown init_variance {init_variance!r}; expected one of {', '.join(VARIANCES)}")
    if init_variance != "kaiming" and not family.variance:
        raise BadInput(f"init_variance applies to inits a and b only, not {init}")
    ranks = [layer.r[adapter_name] for _, layer in layers]
    alphas = [layer.lora_alpha[adapter_name] for _, layer in layers]
    rslora = bool(config.use_rslora)
    for (name, layer), r, alpha in zip(layers, ranks, alphas):
        families.check_args(init, init_args, r, where=f"apply_init: {name}")
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        if not math.isclose(layer.scaling[adapter_name], scaling, rel_tol=1e-12):
            raise BadInput(f"{name}: scaling is {layer.scaling[adapter_name]:g}, but r {r} and alpha {alpha:g} "
                           f"give {scaling:g} (was it rescaled?)")
    args = {**family.args, **(init_args or {})}
    if family.needs and data is None:
        raise BadInput(f"init {init} is computed from data: give apply_init data=, an iterable of batches "
                       "the model takes as model(**batch)")
    if not family.needs and data is not None:
        raise BadInput(f"init {init} reads no data; leave out data=")
    if family.needs and not args["reuse"]:
        raise BadInput("init_args.reuse is a pack's choice of rows from its data order; apply_init reads "
                       "the batches data gives")
    rewrites = family.rewrites_base(args)
    if rewrites and len(peft_model.peft_config) > 1:
        raise BadInput(f"init {init} rewrites the base weights, which the model's other adapters "
                       f"({', '.join(n for n in peft_model.peft_config if n != adapter_name)}) share; "
                       "apply it to a model holding one adapter")
    built = str(config.init_lora_weights).lower()
    if built.startswith(REWRITTEN_BY_PEFT):
        raise BadInput(f"adapter {adapter_name!r} was built with init_lora_weights={config.init_lora_weights!r}, "
                       "which already rewrote the base; build the PEFT model with init_lora_weights=True")
    before = getattr(peft_model, "lorainit_init", {}).get(adapter_name)
    if before is not None and before.rewrote_base:
        raise BadInput(f"apply_init already rewrote this model's base for init {before.record.init}; "
                       "apply it to a freshly built PEFT model")

    targets = [_target(name, layer) for name, layer in layers]
    with torch.no_grad():
        if init in ("a", "b"):  # as `LoRAPack.init_run`: `inits.py`, layer by layer, one stream
            fill, g = get_init(init), rng.generator(seed, "init")
            A, B = [], []
            for t, r, (_, layer) in zip(targets, ranks, layers):
                dtype = train_dtype(layer.get_base_layer().weight.dtype)  # a pack's adapter dtype
                a = torch.zeros(r, t.weight.shape[1], dtype=dtype)   # (r, in)
                b = torch.zeros(t.weight.shape[0], r, dtype=dtype)   # (out, r)
                fill(a, b, init_variance, g)
                A.append(a)
                B.append(b)
        elif family.needs:
            stats = _gathered(peft_model, layers, init, args, ranks, data)
            g = rng.generator(seed, "init")
            per_layer = [families.from_statistics(init, args, [t], r, a, rslora, g, [st])
                         for t, r, a, st in zip(targets, ranks, alphas, stats)]
            A, B = [f.A[0] for f in per_layer], [f.B[0] for f in per_layer]
        else:
            drawn = _draw(init, init_args or {}, targets, ranks, alphas, rslora, seed)
            A, B = drawn.A, drawn.B
        initial = {}
        for (name, layer), a, b in zip(layers, A, B):
            layer.lora_A[adapter_name].weight.copy_(a)
            layer.lora_B[adapter_name].weight.copy_(b)
            if rewrites:
                _rewrite_base(layer, a, b, layer.scaling[adapter_name], init)
                initial[name] = (a.clone(), b.clone())
    applied = Applied(InitRecord.of(init, init_args, init_variance, seed, config.r, config.lora_alpha, rslora,
                                    converted=rewrites), initial)
    if not isinstance(getattr(peft_model, "lorainit_init", None), dict):
        peft_model.lorainit_init = {}
    peft_model.lorainit_init[adapter_name] = applied
    return applied


def save(peft_model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> Path:
    """PEFT's `save_pretrained` of one adapter, plus `lorainit_init.json`; return the folder that
    holds the adapter (`folder`, or `folder/<adapter_name>` as PEFT lays out a named adapter).

    After `apply_init` with a family that rewrote the base, the adapter is written converted by
    PEFT's own conversion (`path_initial_model_for_weight_conversion`, from an initial adapter
    saved with init_lora_weights=True in a temporary folder): rank 2r, alpha 2 alpha (sqrt(2)
    alpha with rsLoRA), loading on the unmodified base. PEFT's conversion keeps only the LoRA
    factors; the adapter's other saved tensors (the task head in `modules_to_save`) are put back."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    config = _lora_config(peft_model, adapter_name)
    layers = _lora_layers(peft_model, adapter_name)
    applied = getattr(peft_model, "lorainit_init", {}).get(adapter_name)
    folder = Path(folder)
    out = folder if adapter_name == "default" else folder / adapter_name
    if applied is None:
        built = str(config.init_lora_weights).lower()
        if built.startswith(REWRITTEN_BY_PEFT):
            raise BadInput(f"adapter {adapter_name!r} was built with PEFT's {config.init_lora_weights!r} init, whose "
                           "initial factors lorainit does not hold; convert it with PEFT's own save_pretrained("
                           "..., path_initial_model_for_weight_conversion=...)")
        # the family PEFT drew (its true is Init[A]), from torch's global generator: no lorainit seed
        applied = Applied(InitRecord.of(families.PEFT_NAMES.get(built), None, "kaiming", None, config.r,
                                        config.lora_alpha, config.use_rslora, converted=False))
    if not applied.rewrote_base:
        peft_model.save_pretrained(str(folder), selected_adapters=[adapter_name])
        write_sidecar(out, applied.record)
        return out

    if len(layers) != len(applied.initial) or any(name not in applied.initial for name, _ in layers):
        raise BadInput(f"adapter {adapter_name!r} has LoRA layers other than those apply_init set")
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    initial = dict(state)
    for name, layer in layers:  # the initial adapter: A0, B0 in place of A, B
        a0, b0 = applied.initial[name]
        initial[f"{name}.lora_A.weight"] = a0.to(layer.lora_A[adapter_name].weight.dtype)
        initial[f"{name}.lora_B.weight"] = b0.to(layer.lora_B[adapter_name].weight.dtype)
    missing = [key for key in initial if key not in state]
    if missing:
        raise RuntimeError(f"PEFT names adapter tensors other than expected: {missing[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        init_dir = Path(tmp) / "lorainit_initial"
        init_config = copy.deepcopy(config)
        init_config.init_lora_weights = True  # PEFT's conversion refuses an initial adapter that would rewrite again
        init_config.save_pretrained(str(init_dir))
        save_file({k: v.detach().cpu().contiguous() for k, v in initial.items()}, str(init_dir / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        peft_model.save_pretrained(str(folder), selected_adapters=[adapter_name],
                                   path_initial_model_for_weight_conversion=str(init_dir))
    saved = load_file(str(out / WEIGHTS_FILE))
    dropped = {key: t.detach().cpu().contiguous() for key, t in state.items() if key not in saved}
    if any(".lora_A." in key or ".lora_B." in key for key in dropped):
        raise RuntimeError(f"PEFT's conversion left out LoRA factors: {next(iter(dropped))}")
    if dropped:
        write_atomic(out / WEIGHTS_FILE, lambda tmp: save_file(saved | dropped, tmp, metadata={"format": "pt"}))
    write_sidecar(out, applied.record)
    return out
