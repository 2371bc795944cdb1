"""The decoder architectures a pack serves exactly, their default LoRA targets, and the refusals.

A decoder pack does not run the model's own attention kernel nor its own output head: attention
goes through `engine.packing.packed_attention` (per-run attention dropout, the padding-free
layout), and the loss through the chunked projection of `tasks.causal_lm.token_losses`. Each
architecture below has been checked against its own eager forward (tests/test_decoders.py), with
the feature that sets it apart switched on:

| model_type    | family   | its feature the pack computes                                  | targets   |
|---------------|----------|----------------------------------------------------------------|-----------|
| `llama`       | Llama    | grouped-query attention                                        | q_proj, v_proj |
| `mistral`     | Mistral  | a sliding window shorter than the sequence                     | q_proj, v_proj |
| `qwen2`       | Qwen2    | q/k/v biases; a sliding window on the layers that set one      | q_proj, v_proj |
| `qwen3`       | Qwen3    | q/k norms; a sliding window on the layers that set one         | q_proj, v_proj |
| `gemma`       | Gemma    | embeddings scaled by sqrt(hidden), a tied output head          | q_proj, v_proj |
| `gemma2`      | Gemma 2  | attention and final logit softcapping, alternate sliding window| q_proj, v_proj |
| `gemma3_text` | Gemma 3  | sliding window on most layers, q/k norms                       | q_proj, v_proj |
| `phi3`        | Phi-3    | fused `qkv_proj` and `gate_up_proj`                            | qkv_proj  |
| `gpt2`        | GPT-2    | `Conv1D` projections (adapted as PEFT's `fan_in_fan_out`)      | c_attn    |

Any other decoder is refused by name, with the reason, before anything is written: a pack's
numbers would otherwise rest on an attention or output head no test has compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorainit import models
from lorainit.errors import BadInput


@dataclass(frozen=True)
class Decoder:
    family: str                  # as people name it
    targets: tuple[str, ...]     # default LoRA targets (PEFT's for the architecture)
    gated_mlp: bool = True       # its MLP has gate, up and down projections (for estimates)


DECODERS = {
    "llama": Decoder("Llama", ("q_proj", "v_proj")),
    "mistral": Decoder("Mistral", ("q_proj", "v_proj")),
    "qwen2": Decoder("Qwen2", ("q_proj", "v_proj")),
    "qwen3": Decoder("Qwen3", ("q_proj", "v_proj")),
    "gemma": Decoder("Gemma", ("q_proj", "v_proj")),
    "gemma2": Decoder("Gemma 2", ("q_proj", "v_proj")),
    "gemma3_text": Decoder("Gemma 3", ("q_proj", "v_proj")),
    "phi3": Decoder("Phi-3", ("qkv_proj",)),
    "gpt2": Decoder("GPT-2", ("c_attn",), gated_mlp=False),
}

def served() -> str:
    """The served families, for messages: 'Llama (llama), Mistral (mistral), ...'."""
    return ", ".join(f"{d.family} ({t})" for t, d in DECODERS.items())


def model_type_of(spec: str) -> str | None:
    """The `model_type` of a model spec, read without loading anything: an alias's, a folder's
    config.json, or a hub id's config in the local hub cache; None where it is not at hand."""
    if spec in models.ALIASES:
        return models.ALIASES[spec].model_type
    path = Path(spec).expanduser() / "config.json"
    if not path.is_file():
        cached = models.hub_cached_config(spec)
        if cached is None:
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def default_targets(spec: str, fallback: tuple[str, ...]) -> tuple[str, ...]:
    """The LoRA targets of the model's architecture where it is a served decoder, else `fallback`."""
    decoder = DECODERS.get(model_type_of(spec) or "")
    return decoder.targets if decoder is not None else fallback


def refusal(config) -> str | None:
    """Why a pack cannot serve this decoder config exactly, or None when it can."""
    kind = getattr(config, "model_type", None)
    if kind not in DECODERS:
        return (f"{kind} is not among the decoder architectures a pack serves exactly ({served()}): its "
                "attention and output head have not been checked against the pack's own attention "
                "(padding-free rows, per-run attention dropout) and chunked loss")
    if getattr(config, "add_cross_attention", False):
        return f"{DECODERS[kind].family} with cross-attention is an encoder-decoder layer, not a decoder LM"
    if kind == "gpt2" and getattr(config, "reorder_and_upcast_attn", False):
        return ("GPT-2 with reorder_and_upcast_attn computes its attention scores in fp32 in its own code, "
                "outside the attention interface through which a pack applies per-run attention dropout "
                "and its padding-free layout")
    return None


def check(model, spec: str) -> None:
    """BadInput, naming the model and the reason, when a pack cannot serve it exactly (the model or
    its skeleton: the config and the output head are read)."""
    why = refusal(model.config)
    head = model.get_output_embeddings() if why is None else None
    if why is None and getattr(head, "bias", None) is not None:
        why = "its output head has a bias, which the chunked loss (a plain projection) does not add"
    if why is not None:
        raise BadInput(f"model {spec!r}: {why}")
