"""PEFT interop: one run of a pack <-> a PEFT LoRA adapter folder.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys read
`base_model.model.<module path>.lora_A.weight` (and `lora_B`), and, for a task head saved through
`modules_to_save`, `base_model.model.<head module>.<param>`. `peft.PeftModel.from_pretrained(base,
folder)` then rebuilds run k exactly.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorainit.engine.lora import LoRAPack
from lorainit.errors import BadInput
from lorainit.files import write_atomic, write_text_atomic

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(BadInput):
    """An adapter folder that does not fit the pack; the message names the mismatch."""


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model class, from its class name."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None


def _saved_modules(pack: LoRAPack) -> list[str]:
    """The modules PEFT saves whole (`modules_to_save`): the head's top-level module (`classifier`)
    and any layer the checkpoint lacks outside it, since a base model loaded afresh draws those anew."""
    tops = [pack.head_name.split(".")[0]] if pack.head_name else []
    return tops + [name for name in pack.fresh if not any(name.startswith(f"{t}.") for t in tops)]


def _packed(pack: LoRAPack, k: int) -> dict[str, torch.Tensor]:
    """Run k's slice of every packed head and fresh layer tensor, by model path."""
    tensors = dict(pack.fresh_tensors())
    if pack.head is not None:
        tensors[f"{pack.head_name}.weight"] = pack.head.weight
        if pack.head.bias is not None:
            tensors[f"{pack.head_name}.bias"] = pack.head.bias
    return {name: t[k] for name, t in tensors.items()}


def _head_tensors(pack: LoRAPack, k: int) -> dict[str, torch.Tensor]:
    """Every tensor under the saved modules, with the packed ones taken from run k."""
    packed, saved = _packed(pack, k), _saved_modules(pack)
    out = {}
    for top in saved:
        for name, tensor in pack.model.get_submodule(top).named_parameters(prefix=top):
            if name not in packed:  # the packed (K, ...) tensors themselves are replaced below
                out[name] = tensor
    return out | {name: t for name, t in packed.items() if any(name.startswith(f"{m}.") for m in saved)}


def export_run(pack: LoRAPack, k: int, folder: str | os.PathLike, base_model: str,
               base_note: str | None = None) -> Path:
    """Write run k of `pack` as a PEFT LoRA adapter folder; return the folder.

    `base_model` is what PEFT users load the adapter on (`base_model_name_or_path`); `base_note`
    says how the weights it was trained on differ from that base, when they do (an offline alias
    dequantised from 4 bits). The note goes into the folder's README.md and the weights file's
    metadata. Adapters of `Conv1D` layers (GPT-2) are saved with `fan_in_fan_out`, as PEFT saves them."""
    if not 0 <= k < pack.num_runs:
        raise IndexError(f"run {k} is outside this pack of {pack.num_runs}")
    cfg = pack.config
    config = {
        "peft_type": "LORA",
        "task_type": task_type(pack.model),
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": sorted(cfg.targets),
        "modules_to_save": _saved_modules(pack) or None,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in pack.layers.values()),
        "inference_mode": True,
    }
    tensors = {}
    for name, layer in pack.layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[k]
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[k]
    for name, tensor in _head_tensors(pack, k).items():
        tensors[PREFIX + name] = tensor
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}

    folder = Path(folder)
    # weights first, config last: a folder with a config always has its weights
    metadata = {"format": "pt"} | ({"base_model_note": base_note} if base_note else {})
    write_atomic(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    if base_note:
        write_text_atomic(folder / "README.md", f"# LoRA adapter for {base_model}\n\nTrained on {base_note}.\n"
                          f"Loaded on {base_model} itself, it applies to weights that differ from those.\n")
    write_text_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return folder


def import_run(pack: LoRAPack, k: int, folder: str | os.PathLike) -> None:
    """Load a PEFT LoRA adapter folder into run k of `pack`, checking that it fits."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{path} is missing: not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_path} is not valid JSON: {err}") from err
    cfg = pack.config
    checks = [("peft_type", config.get("peft_type"), "LORA"),
              ("r", config.get("r"), cfg.rank),
              ("lora_alpha", config.get("lora_alpha"), cfg.alpha),
              ("use_rslora", bool(config.get("use_rslora", False)), cfg.rslora)]
    for key, got, want in checks:
        if got != want:
            raise AdapterError(f"{config_path}: {key} is {got!r}, but the pack has {want!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterError(f"{config_path}: per-module {key} is not supported by a pack")
    if config.get("use_dora"):
        raise AdapterError(f"{config_path}: DoRA adapters are not LoRA adapters")

    tensors = load_file(str(weights_path))
    # the pack's `...query.lora_A` is PEFT's `base_model.model....query.lora_A.weight`; head keys match
    wanted = {PREFIX + name + (".weight" if name.endswith((".lora_A", ".lora_B")) else ""): param
              for name, param in pack.named_parameters().items()}
    lora_keys = [key for key in tensors if ".lora_" in key]
    unknown = [key for key in lora_keys if key not in wanted]
    if unknown:
        raise AdapterError(f"{weights_path} adapts modules the pack does not: {', '.join(unknown[:5])}")
    missing = [key for key in wanted if ".lora_" in key and key not in tensors]
    if missing:
        raise AdapterError(f"{weights_path} lacks {', '.join(missing[:5])}")
    for key, param in wanted.items():
        if key not in tensors:
            continue  # an adapter without a saved head keeps run k's current head
        if tuple(tensors[key].shape) != tuple(param.shape[1:]):
            raise AdapterError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, "
                               f"the pack expects {tuple(param.shape[1:])}")
    fresh = {PREFIX + name: t for name, t in pack.fresh_tensors().items()}
    for key, tensor in fresh.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(tensor.shape[1:]):
            raise AdapterError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, "
                               f"the pack expects {tuple(tensor.shape[1:])}")
    packed = _packed(pack, k)
    frozen = {key: t for key, t in _head_tensors(pack, k).items() if key not in packed}
    for key, base_tensor in frozen.items():
        saved = tensors.get(PREFIX + key)
        if saved is not None and not torch.equal(saved.to(base_tensor), base_tensor.detach()):
            warnings.warn(f"{weights_path}: {key} differs from the base model's; a pack keeps it frozen "
                          "and ignores the saved value", stacklevel=2)
    with torch.no_grad():
        for key, param in (wanted | fresh).items():
            if key in tensors:  # a fresh layer saved with the adapter is that run's own draw
                param[k].copy_(tensors[key])
