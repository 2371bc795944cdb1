"""The base model's own dropout, made per run, so that a pack equals its runs done one by one; and
the padding-free layout of decoder packs.

BERT and RoBERTa train with hidden and attention dropout (0.1). With torch's global generator,
the rows of a pack would draw masks that no run alone would draw. Here every `nn.Dropout` of the
model becomes a `PackedDropout` and attention dropout goes through `packed_attention`: both draw
each run's masks from the run's own 'dropout' stream (`lora.DropoutStreams`), once per distinct
seed, at the run's own sequence length. With dropout probability 0, or in eval mode, nothing is
drawn and the model's usual attention kernel runs.

A decoder pack may also run padding-free (`FlatLayout`): the stacked rows' real tokens are laid
end to end as one sequence (1, N) with each row's positions restarted, so that every token-wise
op (projections, adapters, MLP, norms) costs the real tokens only; attention alone scatters the
queries, keys and values back into the rows' padded layout, where it applies each row's causal
mask, and gathers the real tokens' outputs again.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lorainit.engine.lora import DropoutStreams, LoRAPack, RowSubset

ATTENTION_NAME = "lorainit_packed"


class PackedDropout(nn.Module):
    """`nn.Dropout` whose masks come from per-run streams; rows are stacked adapter-major."""

    def __init__(self, p: float, state: "PackState"):
        super().__init__()
        self.p = p
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.state.row_counts is not None:  # unpadded tokens, run after run: (N, d) or (1, N, d)
            return self.state.streams.drop_ragged(x.reshape(-1, x.shape[-1]), self.p, self.state.row_counts,
                                                  self.state.active, self.state.row_subset).view(x.shape)
        n = self.state.num_active()
        per_run = (x.shape[0] // n, *x.shape[1:])  # (b, T, d) or (b, d)
        keep = self.state.streams.mask(self.p, per_run, self.state.active, x.device, x.dtype,
                                       seq_dims=(1,) if x.dim() >= 3 else ())
        return self.state.streams.apply(x, keep)


def causal_mask(keep: torch.Tensor) -> torch.Tensor:
    """(rows, 1, width, width) bool for right-padded rows whose real tokens `keep` (rows, width)
    marks: each query sees the keys up to itself that are real."""
    width = keep.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=keep.device).tril()
    return causal & keep[:, None, None, :]


@dataclass
class FlatLayout:
    """Where the real tokens of a padded (rows, width) batch sit when laid end to end."""

    index: torch.Tensor   # (N,) flat slot in rows * width of each real token, in order
    keep: torch.Tensor    # (rows, width) bool: the real tokens
    calls: int = 0        # attention calls served: a model whose attention bypasses ours fails loudly
    masks: dict = field(default_factory=dict, repr=False)  # sliding window -> mask, built once per forward

    @classmethod
    def of(cls, keep: torch.Tensor) -> "FlatLayout":
        """The layout of right-padded rows whose real tokens `keep` (rows, width) marks."""
        return cls(keep.flatten().nonzero().squeeze(1), keep)

    @property
    def rows(self) -> int:
        return self.keep.shape[0]

    @property
    def width(self) -> int:
        return self.keep.shape[1]

    def mask(self, window: int | None = None) -> torch.Tensor:
        """(rows, 1, width, width) bool: causal, real keys only, and with `window` the latest
        `window` keys only. Built once per window, for all the forward's layers."""
        if window not in self.masks:
            mask = causal_mask(self.keep)
            if window is not None:
                mask = mask & window_mask(self.width, self.width, window, mask.device)
            self.masks[window] = mask
        return self.masks[window]

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """(1, heads, N, d) -> (rows, heads, width, d), zeros where there is no token."""
        _, heads, _, size = t.shape
        out = t.new_zeros(self.rows * self.width, heads, size)
        out = out.index_copy(0, self.index, t[0].transpose(0, 1))
        return out.view(self.rows, self.width, heads, size).transpose(1, 2)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """(rows, width, heads, d) -> (1, N, heads, d): the real tokens' rows."""
        return t.reshape(self.rows * self.width, *t.shape[2:]).index_select(0, self.index).unsqueeze(0)


class PackState:
    """What the packed dropout needs to know about the current batch: active runs and lengths."""

    def __init__(self, pack: LoRAPack, seeds: list[int]):
        self.pack = pack
        self.streams = DropoutStreams(seeds)
        self.active: torch.Tensor | None = None
        self.row_counts: list[int] | None = None  # tokens per active run in the unpadded layout
        self.row_subset: RowSubset | None = None  # which tokens of each run, when not all are present
        self.flat: FlatLayout | None = None       # a padding-free decoder forward's layout
        self.checkpointing = False                # recompute the frozen base's layers in the backward

    def num_active(self) -> int:
        return self.pack.num_runs if self.active is None else len(self.active)

    def set_row_counts(self, counts: list[int] | None, subset: RowSubset | None = None) -> None:
        """Declare (or end, with None) the unpadded layout: run j owns the next counts[j] rows.

        With `subset`, those rows are a subset of each run's rows; dropout masks are drawn for all
        of them and the subset's rows taken, as if every row were present."""
        self.row_counts, self.row_subset = counts, subset
        for layer in self.pack.layers.values():
            layer.row_counts, layer.row_subset = counts, subset

    def snapshot(self) -> tuple:
        """What a forward reads besides its inputs: the streams' positions and the token layout."""
        return self.streams.get_state(), self.row_counts, self.row_subset, self.flat

    def restore(self, snapshot: tuple) -> None:
        streams, counts, subset, self.flat = snapshot
        self.streams.set_state(streams)
        self.set_row_counts(counts, subset)

    def checkpoint_contexts(self):
        """`context_fn` of `torch.utils.checkpoint`: a checkpointed layer's recompute (in the
        backward) sees what its forward saw, the same dropout draws and layout, so checkpointing
        changes no number."""
        saved = []

        @contextmanager
        def forward():
            saved.append(self.snapshot())
            yield

        @contextmanager
        def recompute():
            now = self.snapshot()
            self.restore(saved[0])
            try:
                yield
            finally:
                self.restore(now)

        return forward(), recompute()

    def set_batch(self, active: list[int] | None, lengths: list[int] | None) -> None:
        """Declare the next batch: which runs it stacks and each one's own padded length."""
        self.pack.set_active(active)
        layer = next(iter(self.pack.layers.values()))
        self.active = layer.active
        self.streams.lengths = lengths


def window_mask(q_len: int, kv_len: int, window: int, device: torch.device) -> torch.Tensor:
    """(q_len, kv_len) bool: causal, and each query sees only the `window` latest keys up to
    itself (transformers' sliding window: key j is seen from query i when i - window < j <= i).
    The queries are the last q_len of the kv_len positions."""
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    return (k <= q) & (k > q - window)


def _and_mask(mask: torch.Tensor | None, allowed: torch.Tensor) -> torch.Tensor:
    """`mask` (bool, or additive float) further restricted to `allowed` (bool, broadcastable)."""
    if mask is None:
        return allowed[None, None] if allowed.dim() == 2 else allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           scaling: float, dropout: float, state: "PackState | None", softcap: float | None = None) -> torch.Tensor:
    """Softmax attention with per-run dropout masks on its probabilities.

    query: (n*b, heads, Tq, d_head), key/value: (n*b, kv_heads, T, d_head), kv_heads dividing heads
    (grouped-query attention, as transformers' `repeat_kv` repeats them); mask: bool, broadcastable
    to (n*b, heads, Tq, T), True where a key may be seen, or an additive float mask. Returns
    (n*b, Tq, heads, d_head). With Tq < T the queries are the first Tq positions: their dropout
    masks are the first Tq query rows of the masks drawn for all T, as if every query were present.
    `softcap` caps the scores as Gemma 2 does, softcap * tanh(scores / softcap), before the mask.
    """
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves a group
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (n*b, h, T, T)
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + mask
    weights = nn.functional.softmax(weights, dim=-1)
    if dropout > 0 and state is not None:
        n = state.num_active()
        b, h, tq, t = weights.shape[0] // n, *weights.shape[1:]
        keep = state.streams.mask(dropout, (b, h, t, t), state.active, weights.device, weights.dtype, seq_dims=(2, 3))
        keep = keep[:, :, :, :tq]  # (n, b, h, Tq, T)
        weights = state.streams.apply(weights, keep)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


# attention arguments that change the arithmetic in ways the pack's attention does not compute:
# a model that passes one is refused rather than silently computed without it
UNSERVED = {"s_aux": "attention sinks", "sinks": "attention sinks", "position_bias": "a relative position bias"}


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
                     **kwargs):
    """The model's attention call with per-run dropout masks; without dropout or softcapping,
    torch's SDPA. In a padding-free forward (`state.flat`), on the rows' padded layout (`FlatLayout`).

    Every feature the model asks for is computed: grouped-query heads, a sliding window shorter
    than the sequence (Mistral, Qwen2 and 3, Gemma 2 and 3, Phi-3), score softcapping (Gemma 2). The
    masks lorainit builds itself (padding-free, right-padded rows) are causal only, so the window
    is applied here, to any mask, whenever the queries are the whole sequence (a training or
    evaluation forward); a cached generation step gets the model's own mask, which holds it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for name, what in UNSERVED.items():
        if kwargs.get(name) is not None:
            raise RuntimeError(f"{type(module).__name__} asks its attention for {what} ({name}), which a "
                               "pack's attention does not compute")
    state: PackState | None = getattr(module, "lorainit_state", None)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if state is not None and state.flat is not None and query.shape[0] == 1:
        return _flat_attention(module, query, key, value, scaling, dropout, state, sliding_window, softcap), None
    q_len, kv_len = query.shape[2], key.shape[2]
    if sliding_window is not None and q_len == kv_len and kv_len > sliding_window:
        attention_mask = _and_mask(attention_mask, window_mask(q_len, kv_len, sliding_window, query.device))
    dropping = dropout > 0 and state is not None and module.training
    if not dropping and softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if attention_mask is None and getattr(module, "is_causal", False) and q_len > 1:
        # no mask stands for causal attention alone (SDPA's is_causal); the explicit softmax needs
        # it spelled out, queries being the last positions
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    return attend(query, key, value, attention_mask, scaling, dropout if dropping else 0.0, state, softcap), None


def _flat_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scaling: float, dropout: float, state: PackState, sliding_window: int | None,
                    softcap: float | None) -> torch.Tensor:
    """Attention of tokens laid end to end, (1, heads, N, d) -> (1, N, heads, d), computed row by
    row on the padded layout under each row's causal mask (and sliding window, and softcap).

    Rows are right-padded, so a real query's causal window holds real keys only: the causal mask
    alone is exact for every real token (the padding's queries are computed and dropped), and
    SDPA's causal kernel skips the masked half of each row."""
    flat = state.flat
    flat.calls += 1
    q, k, v = flat.pad(query), flat.pad(key), flat.pad(value)
    window = sliding_window if sliding_window is not None and flat.width > sliding_window else None
    dropping = dropout > 0 and module.training
    if dropping or softcap is not None:
        out = attend(q, k, v, flat.mask(window), scaling, dropout if dropping else 0.0, state, softcap)
    else:  # SDPA: its causal kernel, or the windowed mask
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if window is None else flat.mask(window), is_causal=window is None,
            scale=scaling, enable_gqa=k.shape[1] != q.shape[1]).transpose(1, 2)
    return flat.unpad(out)  # (rows, T, h, d) -> (1, N, h, d)


def install(pack: LoRAPack, seeds: list[int]) -> PackState:
    """Route every dropout of the packed model (LoRA, hidden, attention) through per-run streams."""
    state = PackState(pack, seeds)
    model = pack.model
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, child_name, PackedDropout(child.p, state))
        if hasattr(module, "is_causal") or type(module).__name__.endswith("SelfAttention"):
            module.lorainit_state = state
    for layer in pack.layers.values():
        layer.streams = state.streams
    if hasattr(model, "set_attn_implementation"):  # a transformers model: its attention calls through ours
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(ATTENTION_NAME, packed_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, AttentionMaskInterface._global_mapping["sdpa"])
        model.set_attn_implementation(ATTENTION_NAME)
    model.train(model.training)
    return state
