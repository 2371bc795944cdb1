"""Feature-norm probes: the quantities the paper's theory is about, per LoRA layer and per run.

At a logging step, forward hooks on every `PackedLoRALinear` record, for each run k, over the
batch's real (non-padding) tokens x:

- `z_a_rms`: RMS of Z_A = A_k x (the LoRA layer's internal features; Init[A] grows them);
- `lora_out_rms`: RMS of the LoRA output s B_k A_k x (its contribution to the layer's output);
- `a_norm`, `b_norm`: Frobenius norms of A_k and B_k;
- `net_out_rms`, for a run whose init family rewrites the base (`families.py`) only: RMS of the
  net change s (B_k A_k - B0_k A0_k) x, what the adapter adds to the base model it started from
  (`lora_out_rms` is then the RMS of s B_k A_k x, which starts at the rank-r part PiSSA or OLoRA
  took out of the base).

Rows are plain dicts (step, layer, run, name, value), in the style of muP's coordinate checks.
The hooks do nothing outside a `capture` block, so the cost is one rank-r matmul per layer at
logging steps only.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from lorainit.engine.lora import LoRAPack

NAMES = ("z_a_rms", "lora_out_rms", "a_norm", "b_norm")
NET = "net_out_rms"  # corrected runs only


class Probes:
    def __init__(self, pack: LoRAPack):
        self.pack = pack
        self._armed = False
        self._token_mask: torch.Tensor | None = None  # (n*b, T) bool, real tokens
        self._runs: list[int] = []
        self._step = 0
        self.rows: list[dict] = []
        for name, layer in pack.layers.items():
            layer.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        @torch.no_grad()
        def hook(layer, inputs, output):
            if not self._armed:
                return
            x = inputs[0].float()
            n = len(self._runs)
            A, B = layer.lora_A[self._runs].float(), layer.lora_B[self._runs].float()  # (n, r, in), (n, out, r)
            if layer.row_counts is not None:  # unpadded: real tokens, run after run
                parts = x.reshape(-1, x.shape[-1]).split(layer.row_counts)
            else:
                xs = x.reshape(n, -1, x.shape[-1])                      # (n, rows, in)
                if self._token_mask is not None and x.dim() >= 3:
                    real = self._token_mask.reshape(n, -1)               # (n, rows)
                    parts = [xs[j][real[j]] for j in range(n)]
                else:
                    parts = list(xs)
            z_rms, o_rms, net = [], [], {}
            for j, xj in enumerate(parts):
                z = xj @ A[j].T                                          # (tokens, r): Z_A
                out = layer.scaling * (z @ B[j].T)                       # (tokens, out)
                z_rms.append(z.pow(2).mean().sqrt())
                o_rms.append(out.pow(2).mean().sqrt())
                k = self._runs[j]
                if layer.corrected[k]:
                    initial = layer.scaling * ((xj @ layer.lora_A0[k].float().T) @ layer.lora_B0[k].float().T)
                    net[j] = (out - initial).pow(2).mean().sqrt()
            for j, run in enumerate(self._runs):
                values = (z_rms[j], o_rms[j], A[j].norm(), B[j].norm())
                for metric, value in zip(NAMES, values):
                    self.rows.append({"step": self._step, "layer": name, "run": run, "name": metric,
                                      "value": float(value)})
                if j in net:
                    self.rows.append({"step": self._step, "layer": name, "run": run, "name": NET,
                                      "value": float(net[j])})
        return hook

    @contextmanager
    def capture(self, step: int, runs: list[int], token_mask: torch.Tensor | None):
        """Record probe rows during the forwards inside this block, for `runs` in stacking order."""
        self._armed, self._step, self._runs, self._token_mask = True, step, list(runs), token_mask
        try:
            yield
        finally:
            self._armed, self._token_mask = False, None
