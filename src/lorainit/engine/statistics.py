"""The statistics of a run's own rows that the data-driven init families read, gathered in a pack.

| init | statistic of each adapted layer | pass | reference |
|---|---|---|---|
| `lora_ga`, `lora_one` | G: the gradient of the batch's mean loss with respect to W, averaged over `batches` batches | train mode, backward | PEFT's `preprocess_loraga` |
| `eva` | the centred incremental PCA of the layer's inputs at the counted tokens, batch after batch until each layer's top r components have a cosine of at least `tau` to the previous batch's | eval mode | PEFT's `get_eva_state_dict` (rho 1) |
| `corda` | C: the mean over rows of X̃ᵀX̃, X̃ a row's inputs divided by abs(max X) | eval mode | PEFT's `preprocess_corda`, one row per forward |

Every run reads the batches of its own data order: by default the first ones, which its first
training steps then train on again, as PEFT's examples reuse them (`reuse: true`); with
`reuse: false`, the batches that follow its last training step, which it never trains on (refused
when training reaches them). The statistics are gathered on the pack's shared base, by forward
hooks on the adapted layers, before training. A run's adapters are still zero then, so every layer
computes W x, as in the reference's preprocessing; its loss goes through its own head; in train
mode the base's dropout draws from the run's own stream, kept apart from the one training draws
from (salted), so that gathering does not move training.

Runs that share a seed read the same rows, through the same head, under the same dropout: one pass
serves all of them (each stops at its own batch count), so a pack of K data runs over S seeds
makes S passes per kind where the runs alone make K. Each pass forwards one batch of one seed's
rows, the shapes the run alone forwards, so a run's statistics are bit for bit those it gathers
alone, whatever its pack-mates: an SVD of them would turn last-bit differences into different
factors where singular values are close.

Counted tokens are the real tokens of each row (EVA with `label_mask`: those whose label counts, for
a causal LM); the layer input may be padded (rows, T, in), laid end to end (the padding-free
layouts) or one vector per row (a pooler): all three are told apart by their number of rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lorainit.engine import families, rng
from lorainit.engine.lora import DropoutStreams
from lorainit.engine.order import steps_per_epoch, total_steps
from lorainit.errors import BadInput

STREAM_SALT = 1  # the init pass's dropout stream: the run's 'dropout' stream salted with this


@dataclass
class LayerStats:
    """One run's statistics of one adapted layer."""

    grad: torch.Tensor | None = None        # sum of per-batch gradients (out, in), then their mean
    batches: int = 0                        # backward passes that reached the layer
    covariance: torch.Tensor | None = None  # sum of X̃ᵀX̃ (in, in), then the mean over rows
    samples: int = 0                        # rows that went into it
    pca: object | None = None               # EVA's incremental PCA
    converged: torch.Tensor | None = None   # EVA: per component, cosine to the last batch >= tau
    stopped: bool = False                   # EVA: converged, takes no more batches

    @property
    def settled(self) -> bool:
        """EVA: every component's cosine to the previous batch's reached tau."""
        return self.converged is not None and bool(self.converged.all())

    def finish(self) -> "LayerStats":
        if self.grad is not None:
            self.grad = (self.grad / self.batches).cpu()
        if self.covariance is not None:
            self.covariance = (self.covariance / self.samples).cpu()
        return self

    @property
    def components(self) -> torch.Tensor:
        return self.pca.components_.cpu()

    @property
    def singular_values(self) -> torch.Tensor:
        return self.pca.singular_values_.cpu()

    def fit(self, xs: torch.Tensor, rank: int, tau: float) -> None:
        """EVA's step on one batch's inputs (PEFT's SVDHook): too few rows are skipped; from the
        second fit on, each component's cosine to the previous decides its convergence."""
        from peft.utils.incremental_pca import IncrementalPCA

        if self.pca is None:
            self.pca = IncrementalPCA(n_components=rank, copy=True, lowrank=True, lowrank_seed=42)
            self.converged = torch.zeros(rank, dtype=torch.bool)
        if xs.shape[0] < rank:
            return
        previous = self.pca.components_.clone() if hasattr(self.pca, "components_") else None
        self.pca.partial_fit(xs.to(torch.float32))
        if previous is not None:
            sim = nn.functional.cosine_similarity(self.pca.components_, previous)
            self.converged = (sim >= tau).cpu()


@dataclass
class Plan:
    """One run's statistics pass: what it reads and how."""

    run: int               # its index in the pack
    init: str
    args: dict             # every option of its family
    steps: list[int]       # the data-order steps whose batches it may read, in order
    kind: str = field(init=False)

    def __post_init__(self):
        self.kind = "grad" if families.get(self.init).needs == "grad" else self.init


def held_out_steps(run, rows: int, count: int) -> list[int]:
    """The data-order steps a run with `reuse: false` reads: the `count` after its last training
    step, all inside the first epoch so that it never trains on them; BadInput naming the numbers
    where they are not (`rows`: its training rows)."""
    total = total_steps(rows, run.batch_size, run.epochs, run.max_steps)
    per_epoch = steps_per_epoch(rows, run.batch_size)
    if total + count > per_epoch:
        raise BadInput(f"run {run.run_id()}: init {run.init} with reuse: false reads the {count} batches after its "
                       f"last training step, but its {total} steps and those {count} batches need "
                       f"{total + count} of the {per_epoch} batches an epoch of its {rows} rows has; train fewer "
                       "steps, read fewer batches, or set reuse: true")
    return list(range(total, total + count))


def batches(args: dict) -> int:
    """How many batches a data family's options let it read (EVA: at most)."""
    return args["batches"] if "batches" in args else args["max_batches"]


def plan(trainer, k: int) -> Plan:
    """Run k's pass: its first `batches` steps, or with `reuse: false` the steps after its last."""
    run = trainer.runs[k]
    args = families.args_of(run.init, run.init_args)
    count = batches(args)
    if args["reuse"]:
        return Plan(k, run.init, args, list(range(count)))
    return Plan(k, run.init, args, held_out_steps(run, trainer.task.train_size, count))


def check_rows(run, rows: int | None) -> None:
    """Before anything is written (a sweep's checks): a run whose statistics must be held out of
    training (`reuse: false`) has rows enough for both; `rows`: its training rows, None if unknown."""
    family = families.get(run.init)
    if not family.needs or rows is None:
        return
    args = families.args_of(run.init, run.init_args)
    if not args["reuse"]:
        held_out_steps(run, rows, batches(args))


def data_digest(trainer, p: Plan) -> str:
    """What the run's statistics read besides the adapted weights: the rows' tensors of every batch
    it may read, its model, precision, base-model settings and dropout (the cache key's `data`)."""
    run = trainer.runs[p.run]
    h = hashlib.sha256(json.dumps({
        "model": run.model, "precision": run.precision, "dropout": run.dropout,
        "overrides": {k: repr(v) for k, v in sorted((trainer.model_overrides or {}).items())},
        "task": run.task}, sort_keys=True).encode())
    order = trainer.orders[run.seed]
    for step in p.steps:
        batch = trainer.task.batch(order.rows_at(step))
        for key in sorted(batch):
            h.update(key.encode())
            h.update(batch[key].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class Collector:
    """Forward hooks on the adapted layers that add a batch's share to the statistics of every run
    listening to it (the runs of one seed: they read the same rows through the same head)."""

    def __init__(self, layers: dict[str, nn.Module], plans: list[Plan], rank: int | dict[str, int]):
        self.layers = layers
        self.rank = rank if isinstance(rank, dict) else {name: rank for name in layers}  # per layer
        self.plans = {p.run: p for p in plans}
        self.stats = {p.run: {name: LayerStats() for name in layers} for p in plans}
        self.listening: list[int] = []
        self.masks: dict[str, torch.Tensor] = {}
        self._selected: dict[tuple, tuple] = {}

    def set_batch(self, listening: list[int], keep: torch.Tensor, labelled: torch.Tensor) -> None:
        """The runs the next batch counts for, its real tokens and its counted-label tokens (rows, T)."""
        self.listening = listening
        self.masks = {"keep": keep.bool().cpu(), "labelled": (labelled.bool() & keep.bool()).cpu()}
        self._selected = {}

    def _select(self, which: str, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions of the batch's `which` tokens among a layer input's `size` rows, and the
        batch row each belongs to."""
        key = (which, size, str(device))
        if key in self._selected:
            return self._selected[key]
        keep, mask = self.masks["keep"], self.masks[which]
        rows, width = keep.shape
        if size == rows * width:      # padded: (rows, T) slots
            slot = torch.arange(rows * width).view(rows, width)
        elif size == int(keep.sum()):  # real tokens laid end to end, row after row
            slot = torch.full((rows, width), -1, dtype=torch.long)
            slot[keep] = torch.arange(size)
        elif size == rows:            # one vector per row
            slot = torch.arange(rows)[:, None].expand(rows, width)
            mask = torch.zeros_like(mask)
            mask[:, 0] = True
        else:
            raise RuntimeError(f"an adapted layer's input has {size} rows, which is neither the batch's "
                               f"{rows} x {width} slots, its {int(keep.sum())} tokens, nor its {rows} rows")
        where = mask.nonzero()
        self._selected[key] = (slot[where[:, 0], where[:, 1]].to(device), where[:, 0].to(device))
        return self._selected[key]

    def hook(self, name: str):
        def observe(module, inputs, output):
            x = inputs[0].detach()
            flat = x.reshape(-1, x.shape[-1])
            kinds = {self.plans[k].kind for k in self.listening}
            if "corda" in kinds:
                idx, row = self._select("keep", flat.shape[0], flat.device)
                xs = flat.index_select(0, idx).float()
                rows = self.masks["keep"].shape[0]
                top = torch.full((rows,), -torch.inf, device=xs.device).scatter_reduce(0, row, xs.amax(1), "amax")
                xs = xs / top.abs()[row, None]  # each row over abs(its max entry)
                cov = xs.T @ xs
            for k in self.listening:
                p, st = self.plans[k], self.stats[k][name]
                if p.kind == "corda":
                    st.covariance = cov if st.covariance is None else st.covariance + cov
                    st.samples += rows
                elif p.kind == "eva" and not st.stopped:
                    idx, _ = self._select("labelled" if p.args["label_mask"] else "keep", flat.shape[0], flat.device)
                    st.fit(flat.index_select(0, idx), self.rank[name], p.args["tau"])
            if "grad" in kinds and output.requires_grad:
                grads = [k for k in self.listening if self.plans[k].kind == "grad"]
                output.register_hook(lambda g: self._add_grad(name, flat, g, grads))
        return observe

    def _add_grad(self, name: str, flat: torch.Tensor, g: torch.Tensor, runs: list[int]) -> None:
        """W.grad's share of this batch: the output gradient times the input, over the real tokens."""
        idx, _ = self._select("keep", flat.shape[0], flat.device)
        gflat = g.detach().reshape(-1, g.shape[-1])
        part = gflat.index_select(0, idx).float().T @ flat.index_select(0, idx).float()  # (out, in)
        for k in runs:
            st = self.stats[k][name]
            st.grad = part if st.grad is None else st.grad + part
            st.batches += 1


def _groups(trainer, plans: list[Plan]) -> list[list[Plan]]:
    """Plans that read the same batches in the same mode: one seed (so one data order, one head,
    one dropout stream), one kind of pass, the same first step."""
    out: dict[tuple, list[Plan]] = {}
    for p in plans:
        out.setdefault((trainer.runs[p.run].seed, p.kind == "grad", p.steps[0]), []).append(p)
    return list(out.values())


def gather(trainer, plans: list[Plan], show_progress: bool = False) -> dict[int, list[LayerStats]]:
    """Every plan's statistics, layer by layer in the pack's module order.

    Runs that share a seed read the same rows through the same head under the same dropout, so
    their statistics come from one pass: a forward (and, for gradients, a backward) of each batch
    once, on that batch's rows alone, with one of them active; runs that also share their family
    and options share their statistics, gathered once. Each pass is then exactly the pass
    the run makes alone, in the same shapes, bit for bit; and a pack of K runs over S seeds makes
    S passes (per kind) where K runs alone make K."""
    from lorainit.display import ProgressDisplay
    from lorainit.engine import precision
    from lorainit.tasks.base import Forward

    pack, state, task, model = trainer.pack, trainer.state, trainer.task, trainer.model
    # runs of one seed, family and options (a sweep's lrs) have the same statistics: gathered once
    twins: dict[tuple, Plan] = {}
    for p in plans:
        twins.setdefault((trainer.runs[p.run].seed, p.init, json.dumps(p.args, sort_keys=True)), p)
    twin_of = {p.run: twins[trainer.runs[p.run].seed, p.init, json.dumps(p.args, sort_keys=True)].run for p in plans}
    plans = list(twins.values())
    collector = Collector(pack.layers, plans, pack.config.rank)
    handles = [layer.register_forward_hook(collector.hook(name)) for name, layer in pack.layers.items()]
    streams, was_training = state.streams, model.training
    groups = _groups(trainer, plans)
    bar = ProgressDisplay("init statistics", sum(max(len(p.steps) for p in g) for g in groups), "batch",
                          enabled=show_progress)
    try:
        for group in groups:
            seed, grad = trainer.runs[group[0].run].seed, group[0].kind == "grad"
            state.streams = DropoutStreams([r.seed for r in trainer.runs], salt=(STREAM_SALT,))  # fresh, as alone
            for layer in pack.layers.values():
                layer.streams = state.streams
            for i in range(max(len(p.steps) for p in group)):
                listening = []
                for p in group:
                    if i >= len(p.steps):
                        continue
                    if p.kind == "eva":  # a layer whose components settled takes no more batches
                        for st in collector.stats[p.run].values():
                            st.stopped = st.stopped or st.settled
                        if all(st.stopped for st in collector.stats[p.run].values()):
                            continue
                    listening.append(p.run)
                if not listening:
                    break
                step = collector.plans[listening[0]].steps[i]  # a group's plans share their steps
                batch, lengths = task.stack([task.batch(trainer.orders[seed].rows_at(step))], trainer.device)
                state.set_batch(listening[:1], lengths)
                collector.set_batch(listening, task.token_mask(batch), task.label_mask(batch))
                forward = Forward(listening[:1], probing=True, shared_rows=False)  # every token of every layer
                with precision.autocast(trainer.runs[0].precision, trainer.device):
                    if grad:
                        model.train()
                        with torch.enable_grad():
                            task.loss(state, batch, forward).means().sum().backward()
                    else:
                        model.eval()
                        with torch.no_grad():
                            task.loss(state, batch, forward)
                trainer.statistics_batches += 1
                bar.update(1, f"seed {seed}: {len(listening)} runs")
    finally:
        for handle in handles:
            handle.remove()
        state.streams = streams
        for layer in pack.layers.values():
            layer.streams = streams
        for p in pack.parameters():
            p.grad = None
        state.set_batch(None, None)
        model.train(was_training)
        bar.close()
    found = {p.run: [st.finish() for st in collector.stats[p.run].values()] for p in plans}
    return {run: found[twin] for run, twin in twin_of.items()}


def unsettled(names: list[str], stats: list[LayerStats], tau: float, count: int) -> str | None:
    """Why an EVA run's statistics cannot make its factors (a layer whose components did not settle
    within its batches), or None."""
    late = [name for name, st in zip(names, stats) if not st.settled]
    if not late:
        return None
    more = f" (and {len(late) - 1} more layers)" if len(late) > 1 else ""
    return (f"EVA's components of {late[0]}{more} did not settle to tau {tau} within {count} batches; "
            "raise init_args.max_batches or lower tau")


def initialise(trainer, runs: list[int], cache: families.FactorCache | None,
               show_progress: bool = False) -> dict[int, str]:
    """Set the data-driven runs' initial factors: from `cache` where it holds them (keyed also by
    the rows and seed their statistics read), else from statistics gathered now, one pass per seed.
    Records the pass's seconds on `trainer.statistics_seconds`. Returns the runs whose statistics
    could make no factors (EVA that did not settle), each with why: they fail, their pack-mates go on."""
    pack, cfg = trainer.pack, trainer.pack.config
    targets = pack.targets()
    missing = []
    for k in runs:
        p = plan(trainer, k)
        run = trainer.runs[k]
        key = families.FactorCache.key(run.init, p.args, targets, cfg.rank, cfg.alpha, cfg.rslora, run.seed,
                                       data=data_digest(trainer, p))
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            pack.set_factors(k, hit)
        else:
            missing.append((p, key))
    if not missing:
        return {}
    start = time.perf_counter()
    found = gather(trainer, [p for p, _ in missing], show_progress)
    trainer.statistics_seconds += time.perf_counter() - start
    failed = {}
    for p, key in missing:
        run = trainer.runs[p.run]
        if p.kind == "eva" and (why := unsettled(list(pack.layers), found[p.run], p.args["tau"], len(p.steps))):
            failed[p.run] = why
            continue
        made = families.from_statistics(run.init, p.args, targets, cfg.rank, cfg.alpha, cfg.rslora,
                                        rng.generator(run.seed, "init"), found[p.run])
        pack.set_factors(p.run, cache.put(key, made) if cache is not None else made)
    return failed
