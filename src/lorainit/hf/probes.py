"""A pack's probes (`engine/probes.py`) measured on a PEFT model's LoRA layers, by forward hooks.

Per LoRA layer of one adapter, with x the layer's input before LoRA dropout, over the real tokens
of every training forward between `arm()` and `finish()`: the RMS of Z_A = A x (`z_a_rms`), of
the LoRA output s B A x (`lora_out_rms`), of the net change s (B A - B0 A0) x (`net_out_rms`) for
a layer given its initial factors, and the Frobenius norms of A and B when `finish()` is called.
The forwards of the armed window are pooled: one RMS over all their tokens (the micro-batches of
one optimiser step). A token is real where the `attention_mask` the top model was called with is
set; a forward without a 2-d mask of its batch's shape (a padding-free batch) counts every token.
Only forwards inside the top model's training forward count: a checkpointed layer recomputed in
the backward is not counted twice, nor a forward with the adapter off (a reference model's).
Hooks exist only while armed, so the model runs untouched the rest of the time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lorainit.engine.probes import NAMES, NET
from lorainit.errors import BadInput

PEFT_PREFIX = "base_model.model."  # a PeftModel's path to the model it wraps: dropped from layer names
# PEFT's `init_lora_weights` values whose init replaced W by W - s B0 A0 when the model was built
# (pissa_niter_<K> too); LoftQ quantises W instead, which is no such change
CORRECTED_BY_PEFT = ("pissa", "olora", "corda", "lora_ga")
ORDER = (*NAMES, NET)  # the order values are given in


@dataclass
class Layer:
    """One PEFT LoRA layer and its sums over the armed forwards."""

    name: str                                   # as a pack names it (PEFT's `base_model.model.` dropped)
    path: str                                   # its path in the model
    module: nn.Module                           # peft's LoraLayer
    initial: tuple[torch.Tensor, torch.Tensor] | None = None  # (A0 (r, in), B0 (out, r)), fp32, for a rewritten base
    sums: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> sum of squares, per forward
    counts: dict[str, int] = field(default_factory=dict)              # name -> entries summed


def lora_layers(model: nn.Module, adapter: str, who: str = "ProbeCallback") -> list[Layer]:
    """Every linear PEFT LoRA layer holding `adapter`, in module order; BadInput naming what the
    model is, and how to fix it, when it has none."""
    from peft.tuners.lora import LoraLayer

    found = [Layer(path.removeprefix(PEFT_PREFIX), path, m) for path, m in model.named_modules()
             if isinstance(m, LoraLayer) and adapter in m.lora_A and isinstance(m.lora_A[adapter], nn.Linear)]
    if not found:
        held = sorted({a for m in model.modules() if isinstance(m, LoraLayer) for a in m.lora_A})
        raise BadInput(f"{who}: the model, a {type(model).__name__}, has no PEFT LoRA layer "
                       f"(peft.tuners.lora.LoraLayer) holding adapter {adapter!r}"
                       + (f" (its LoRA layers hold {', '.join(held)})" if held else "")
                       + "; wrap it with peft.get_peft_model(model, LoraConfig(...)), and "
                         "lorainit.peft.apply_init for a lorainit init family, before handing it to the Trainer")
    return found


def initial_factors(model: nn.Module, adapter: str, layers: list[Layer], init_lora_weights,
                    resumed_at: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer path -> (A0, B0) for a run whose init rewrote the base, else empty: those
    `lorainit.peft.apply_init` kept on the model, or for PEFT's own pissa, olora, corda and lora_ga
    the factors as they are now, at train begin (unknown when training resumed at a later step)."""
    applied = getattr(model, "lorainit_init", None)
    applied = applied.get(adapter) if isinstance(applied, dict) else None
    if applied is not None:
        return dict(applied.initial)
    if not str(init_lora_weights).lower().startswith(CORRECTED_BY_PEFT):
        return {}
    if resumed_at > 0:
        warnings.warn(f"ProbeCallback: training resumed at step {resumed_at}, so the initial factors of PEFT's "
                      f"{init_lora_weights!r} init are not known; net_out_rms is not recorded", stacklevel=3)
        return {}
    return {layer.path: (layer.module.lora_A[adapter].weight.detach().float().clone(),
                         layer.module.lora_B[adapter].weight.detach().float().clone()) for layer in layers}


class PeftProbes:
    """The probes of one adapter's LoRA layers of `model` (the top module a Trainer calls)."""

    def __init__(self, model: nn.Module, adapter: str, layers: list[Layer],
                 initial: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.model, self.adapter, self.layers = model, adapter, layers
        for layer in layers:
            start = initial.get(layer.path)
            if start is not None:
                device = layer.module.lora_A[adapter].weight.device
                layer.initial = tuple(t.detach().float().to(device) for t in start)
        self._handles: list = []                # the hooks while armed
        self._training_forward = False          # inside the top model's training forward
        self._mask: torch.Tensor | None = None  # (b, T) bool: that forward's real tokens

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def factors(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (out, r)) of the layer's adapter, as trained."""
        return layer.module.lora_A[self.adapter].weight, layer.module.lora_B[self.adapter].weight

    def arm(self) -> None:
        """Register the hooks: the forwards from now until `finish()` are measured."""
        for layer in self.layers:
            layer.sums, layer.counts = {}, {}
            self._handles.append(layer.module.register_forward_hook(self._layer_hook(layer)))
        self._handles.append(self.model.register_forward_pre_hook(self._enter, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._leave))

    def disarm(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._training_forward, self._mask = [], False, None

    def finish(self) -> dict[str, dict[str, float]]:
        """Layer name -> probe name -> value over the armed forwards, with the factors' norms as
        they are now; the hooks removed. A layer no forward reached has its norms only."""
        self.disarm()
        squares = [(layer, name, torch.stack(sums).sum()) for layer in self.layers for name, sums in layer.sums.items()]
        norms = [(layer, name, t.detach().float().norm()) for layer in self.layers
                 for name, t in zip(("a_norm", "b_norm"), self.factors(layer))]
        measured = squares + norms
        read = torch.stack([v.to(norms[0][2].device) for *_, v in measured]).cpu().tolist()  # one transfer
        values: dict[str, dict[str, float]] = {layer.name: {} for layer in self.layers}
        for (layer, name, _), value in zip(measured, read):
            values[layer.name][name] = math.sqrt(value / layer.counts[name]) if name in layer.counts else value
        for layer in self.layers:
            layer.sums, layer.counts = {}, {}
        return {name: dict(sorted(v.items(), key=lambda kv: ORDER.index(kv[0]))) for name, v in values.items()}

    def _enter(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None
        self._training_forward = module.training

    def _leave(self, module, args, output) -> None:
        self._training_forward, self._mask = False, None

    def _layer_hook(self, layer: Layer):
        adapter = self.adapter

        @torch.no_grad()
        def hook(module, inputs, output):
            if not self._training_forward or module.disable_adapters or module.merged \
                    or adapter not in module.active_adapters:
                return  # a recompute in the backward, or a forward without this adapter (a reference model's)
            x = inputs[0]
            rows = x.reshape(-1, x.shape[-1])                       # (b*T, in)
            if self._mask is not None and self._mask.shape == x.shape[:-1]:
                rows = rows[self._mask.reshape(-1)]                 # (tokens, in): the real ones
            rows = rows.float()
            A, B = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
            scaling = module.scaling[adapter]
            z = rows @ A.T                                          # (tokens, r): Z_A
            out = scaling * (z @ B.T)                               # (tokens, out)
            parts = {"z_a_rms": z, "lora_out_rms": out}
            if layer.initial is not None:
                A0, B0 = layer.initial
                parts[NET] = out - scaling * ((rows @ A0.T) @ B0.T)
            for name, t in parts.items():
                layer.sums.setdefault(name, []).append(t.pow(2).sum())
                layer.counts[name] = layer.counts.get(name, 0) + t.numel()
        return hook
