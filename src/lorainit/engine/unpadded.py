"""BERT-family classifiers computed on their real tokens only.

GLUE rows are short and uneven: in batches of 4 SST-2 rows about 45% of a padded batch is
padding, and a padded forward spends that share of every matmul on it. Here every token-wise
operation (the Q/K/V/output projections with their LoRA adapters, the feed-forward block,
LayerNorm, dropout) runs on the real tokens laid end to end, (tokens, d); only attention scatters
them back into a padded (rows, heads, T, d_head) layout, where padding costs little. The last
layer computes only the first token of each row, the one the classifier reads (its keys and
values still come from every token): that skips 10/12 of its frozen matmul work. The modules
are the model's own (LoRA-wrapped) modules, called in the order `BertLayer` calls them, so the
numbers equal the padded forward's to float rounding.

Runs stay adapter-major: run j's rows come before run j+1's, so its tokens are one contiguous
block, whose size each LoRA layer and dropout learns through `PackState.set_row_counts`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorainit.engine.lora import PackedLoRALinear, RowSubset
from lorainit.engine.packing import PackState, attend

SUPPORTED = ("bert", "roberta")


def supports(model: nn.Module) -> bool:
    """True for BERT and RoBERTa sequence classifiers, whose layers this module knows."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in SUPPORTED
            and type(model).__name__.endswith("ForSequenceClassification")
            and not getattr(config, "is_decoder", False))


def _layer(layer: nn.Module, x: torch.Tensor | None, keep: torch.Tensor, index: torch.Tensor,
           state: PackState, first: tuple[torch.Tensor, RowSubset] | None = None,
           shared: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """One encoder layer on real tokens x (N, d); keep (B, T) marks them, index their flat slots.

    With `first` = (positions (B,) in x of each row's first token, the same as a RowSubset), only
    those tokens' outputs are computed, (B, d): keys and values still come from every token, but
    the queries, the attention output and the feed-forward block run on one token per row. The
    head reads nothing else, so the last layer needs nothing else. Dropout masks are drawn as for
    every token and the first tokens' rows taken, so the numbers are those of the full layer.
    """
    rows, width = keep.shape
    attn = layer.attention.self
    heads, size = attn.num_attention_heads, attn.attention_head_size

    def padded(t: torch.Tensor) -> torch.Tensor:  # (N, h*dh) -> (B, h, T, dh)
        out = t.new_zeros(rows * width, t.shape[-1]).index_copy(0, index, t)
        return out.view(rows, width, heads, size).transpose(1, 2)

    if shared is not None:
        x0, n = shared
        # in the order the unshared path draws their dropout masks: key, value, query
        k, v, q = (padded(_projection(m, x0, n)) for m in (attn.key, attn.value, attn.query))
        x = x0.repeat(n, 1)
    else:
        k, v = padded(attn.key(x)), padded(attn.value(x))
    if first is None:
        if shared is None:
            q = padded(attn.query(x))
    else:
        positions, subset = first
        x = x.index_select(0, positions)  # (B, d): from here on, one token per row
        state.set_row_counts([rows // state.num_active()] * state.num_active(), subset)
        q = attn.query(x).view(rows, 1, heads, size).transpose(1, 2)  # (B, h, 1, dh)
    dropout = attn.dropout.p if attn.training else 0.0
    mask = keep[:, None, None, :]  # (B, 1, 1, T): which keys exist
    if dropout > 0:
        context = attend(q, k, v, mask, attn.scaling, dropout, state)  # (B, Tq, h, dh)
    else:
        context = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        context = context.transpose(1, 2)
    if first is None:
        context = context.reshape(rows * width, heads * size).index_select(0, index)  # (N, d)
    else:
        context = context.reshape(rows, heads * size)  # (B, d)
    out = layer.attention.output
    a = out.LayerNorm(out.dropout(out.dense(context)) + x)
    ff = layer.output
    return ff.LayerNorm(ff.dropout(ff.dense(layer.intermediate(a))) + a)


def _projection(module: nn.Module, x0: torch.Tensor, n: int) -> torch.Tensor:
    """module applied to x0 repeated for n runs, its frozen matmul done once: (n * N0, out)."""
    if isinstance(module, PackedLoRALinear):
        return module.forward_shared(x0, n)
    return module(x0).repeat(n, 1)


@contextmanager
def _first_run_only(state: PackState):
    """Let the packed dropout see one run (the first active one) while shared rows are computed."""
    active, runs = state.active, state.streams.active_runs
    state.active = active[:1] if active is not None else torch.zeros(1, dtype=torch.long)
    state.streams.set_active(state.active, [runs[0] if runs is not None else 0])  # no device read
    try:
        yield
    finally:
        state.active = active
        state.streams.set_active(active, runs)


def forward(model: nn.Module, state: PackState, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None, every_token: bool = False,
            shared: bool = False, host_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (rows, labels) of a BERT/RoBERTa classifier, computing token-wise work on real tokens.

    Rows are right-padded (real tokens first), stacked adapter-major over the active runs. The
    last layer computes only each row's first token, unless `every_token` (for probes, which
    read every token's features); the logits are the same either way.

    `shared` says every active run holds the same rows under the same dropout stream (an
    evaluation, or a pack of one seed): the embeddings and the first layer's frozen projections
    are then computed once, not once per run. The caller keeps it off while probes record, as
    the first layer's adapters then run outside their modules' forward.

    `host_mask` is `attention_mask` on the host, where the caller has it: the layout is then
    worked out without reading the device at all.
    """
    base = model.base_model
    device = input_ids.device
    # the layout is worked out on the host (one read of the mask if the caller has no host copy),
    # then no device read in any layer
    host = (attention_mask.to("cpu") if host_mask is None else host_mask).bool()  # (B, T)
    keep = attention_mask.bool()
    rows, width = host.shape
    n = state.num_active()
    slots = host.flatten().nonzero().squeeze(1)                # (N,) flat slots of real tokens, host
    x0 = None
    if shared and n > 1 and len(base.encoder.layer) > 1:
        one = rows // n                                        # run 0's rows: every run's
        with _first_run_only(state):
            hidden = base.embeddings(input_ids=input_ids[:one],
                                     token_type_ids=None if token_type_ids is None else token_type_ids[:one])
        index0 = slots[:int(host[:one].sum())].to(device, non_blocking=True)  # run 0's: the first slots
        x0 = hidden.reshape(one * width, -1).index_select(0, index0)  # (N / n, d)
        x = None
    else:
        hidden = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, T, d)
    index = slots.to(device, non_blocking=True)
    if x0 is None:
        x = hidden.reshape(rows * width, -1).index_select(0, index)  # (N, d)
    per_row = host.sum(1)                                      # (B,)
    tokens = per_row.view(n, -1).sum(1)                        # (n,) tokens of each run
    state.set_row_counts(tokens.tolist())
    # the heads read the first token of every row (real, since rows are right-padded)
    first = torch.cumsum(per_row, 0) - per_row                 # (B,) offsets of each row's first token
    local = first.view(n, -1) - (torch.cumsum(tokens, 0) - tokens)[:, None]  # (n, b): within each run
    subset = RowSubset(tokens.tolist(), [row.to(device, non_blocking=True) for row in local])
    first = first.to(device, non_blocking=True)
    layers = base.encoder.layer
    try:
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1 and not every_token
            args = (layer, x, keep, index, state, (first, subset) if last else None,
                    (x0, n) if i == 0 and x0 is not None else None)
            if state.checkpointing and layer.training:
                x = checkpoint(_layer, *args, use_reentrant=False, context_fn=state.checkpoint_contexts)
            else:
                x = _layer(*args)
    finally:
        state.set_row_counts(None)
    sequence = (x.index_select(0, first) if every_token else x).unsqueeze(1)  # (B, 1, d)
    if model.config.model_type == "roberta":
        return model.classifier(sequence)
    pooled = base.pooler(sequence)
    return model.classifier(model.dropout(pooled))
