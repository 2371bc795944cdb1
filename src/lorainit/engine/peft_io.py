"""PEFT interop: one run of a pack <-> a PEFT LoRA adapter folder.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys read
`base_model.model.<module path>.lora_A.weight` (and `lora_B`), and, for a task head saved through
`modules_to_save`, `base_model.model.<head module>.<param>`. `peft.PeftModel.from_pretrained(base,
folder)` then rebuilds run k exactly.

A run whose init family rewrites the base (pissa, pissa_niter_<K>, olora, ab with reset; see
`families.py`) trains W x + s B A x - s B0 A0 x on the unmodified W. It is written as PEFT's own
conversion of such an adapter writes it (`save_pretrained(..., path_initial_model_for_weight_conversion
=...)`), a plain LoRA adapter of rank 2r on the unmodified base:

    lora_A' = [A; A0]   (2r, in)      lora_B' = [B, -B0]   (out, 2r)
    r' = 2r     lora_alpha' = 2 alpha (sqrt(2) alpha with rsLoRA), so s' = s     init_lora_weights: true

since s B' A' = s (B A - B0 A0). A run of any other family is written at rank r, as PEFT writes it.

Beside every adapter, `lorainit_init.json` (`InitRecord`) says how the run started: its family,
the family's options (all of them, defaults included), `init_variance` (a and b), the seed, r and
alpha, use_rslora, and whether the adapter was converted (and where to split it: at r). PEFT
ignores the file; `import_run` needs it to take a rank-2r adapter back as A, B and A0, B0.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorainit.engine import families
from lorainit.engine.lora import LoRAPack
from lorainit.errors import BadInput
from lorainit.files import write_atomic, write_text_atomic

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SIDECAR_FILE = "lorainit_init.json"
SIDECAR_FORMAT = 1  # the version of `lorainit_init.json`'s layout
CONVERSION = ("lora_A = cat([A, A0], 0), lora_B = cat([B, -B0], 1); adapter_config.json has r = 2 r and "
              "lora_alpha = 2 alpha (sqrt(2) alpha with rsLoRA)")
# A0, B0 in a converted adapter against the pack's own: equal up to this, relative to their norm
# (a decomposition's last bits differ between machines; a different init differs at order 1)
INITIAL_RTOL = 1e-6


class AdapterError(BadInput):
    """An adapter folder that does not fit the pack; the message names the mismatch."""


@dataclass(frozen=True)
class InitRecord:
    """How an adapter's run started: what `lorainit_init.json` beside the adapter holds."""

    init: str | None            # the init family (`families.py`); None: its writer did not know it
    init_args: dict             # every option of the family, defaults included
    init_variance: str | None   # a and b: kaiming | gaussian; None for the other families
    seed: int | None            # the seed whose 'init' stream drew the factors; None: not drawn by lorainit
    r: int                      # the run's rank (of A and B, before any conversion)
    lora_alpha: float           # the run's alpha
    use_rslora: bool            # s = alpha / sqrt(r) rather than alpha / r
    converted: bool             # the adapter is [A; A0], [B, -B0] at rank 2r, split at r

    @classmethod
    def of(cls, init: str | None, init_args: dict | None, init_variance: str | None, seed: int | None,
           r: int, alpha: float, rslora: bool, converted: bool) -> "InitRecord":
        """A record with the family's options filled in from its defaults."""
        family = families.get(init) if init is not None else None
        return cls(init=init, init_args={**family.args, **(init_args or {})} if family else {},
                   init_variance=init_variance if family is not None and family.variance else None,
                   seed=None if seed is None else int(seed), r=int(r), lora_alpha=float(alpha),
                   use_rslora=bool(rslora), converted=converted)

    def to_json(self) -> dict:
        return {"format": SIDECAR_FORMAT, "init": self.init, "init_args": self.init_args,
                "init_variance": self.init_variance, "seed": self.seed, "r": self.r, "lora_alpha": self.lora_alpha,
                "use_rslora": self.use_rslora,
                "converted": {"split_at": self.r, "how": CONVERSION} if self.converted else None}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "InitRecord":
        """The record a `lorainit_init.json` holds; AdapterError naming what is wrong with it."""
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise AdapterError(f"{where}: not a lorainit_init.json of format {SIDECAR_FORMAT}")
        converted = data.get("converted")
        try:
            record = cls(init=data["init"], init_args=dict(data["init_args"]), init_variance=data["init_variance"],
                         seed=data["seed"], r=int(data["r"]), lora_alpha=float(data["lora_alpha"]),
                         use_rslora=bool(data["use_rslora"]), converted=converted is not None)
        except (KeyError, TypeError, ValueError) as err:
            raise AdapterError(f"{where}: lacks or mangles {err}") from None
        split = converted.get("split_at") if isinstance(converted, dict) else converted
        if converted is not None and split != record.r:
            raise AdapterError(f"{where}: converted.split_at is {split!r}, but r is {record.r}")
        return record


def write_sidecar(folder: str | os.PathLike, record: InitRecord) -> Path:
    """Write `lorainit_init.json` into `folder`."""
    return write_text_atomic(Path(folder) / SIDECAR_FILE, json.dumps(record.to_json(), indent=2) + "\n")


def read_sidecar(folder: str | os.PathLike) -> InitRecord | None:
    """The `lorainit_init.json` of an adapter folder, or None if it has none."""
    path = Path(folder) / SIDECAR_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from err
    return InitRecord.from_json(data, str(path))


def converted_alpha(alpha: float, rslora: bool) -> float:
    """The lora_alpha of a converted adapter (rank 2r) whose scaling equals alpha's at rank r, as
    PEFT's `save_pretrained` computes it."""
    return alpha * 2 ** 0.5 if rslora else alpha * 2


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
               base_note: str | None = None, init: str | None = None, init_args: dict | None = None,
               init_variance: str = "kaiming", seed: int | None = None) -> Path:
    """Write run k of `pack` as a PEFT LoRA adapter folder, with `lorainit_init.json`; return the folder.

    `base_model` is what PEFT users load the adapter on (`base_model_name_or_path`); `base_note`
    says how the weights it was trained on differ from that base, when they do (an offline alias
    dequantised from 4 bits). The note goes into the folder's README.md and the weights file's
    metadata. Adapters of `Conv1D` layers (GPT-2) are saved with `fan_in_fan_out`, as PEFT saves them.

    A run that keeps its initial factors as a correction (`pack.corrected[k]`) is written converted,
    at rank 2r (see the module's doc), so that it loads on the unmodified base. `init`, `init_args`,
    `init_variance` and `seed` are the run's, for the sidecar; `init` must agree with whether the
    run is corrected."""
    if not 0 <= k < pack.num_runs:
        raise IndexError(f"run {k} is outside this pack of {pack.num_runs}")
    cfg = pack.config
    converted = pack.corrected[k]
    if init is not None and families.get(init).rewrites_base(init_args) != converted:
        raise ValueError(f"run {k} is {'' if converted else 'not '}corrected, but init {init} with "
                         f"{init_args or {}} {'keeps' if converted else 'rewrites'} the base")
    record = InitRecord.of(init, init_args, init_variance, seed, cfg.rank, cfg.alpha, cfg.rslora, converted)
    config = {
        "peft_type": "LORA",
        "task_type": task_type(pack.model),
        "base_model_name_or_path": base_model,
        "r": 2 * cfg.rank if converted else cfg.rank,
        "lora_alpha": converted_alpha(cfg.alpha, cfg.rslora) if converted else cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "init_lora_weights": True,  # as PEFT writes a converted adapter: nothing to redo on load
        "target_modules": sorted(cfg.targets),
        "modules_to_save": _saved_modules(pack) or None,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in pack.layers.values()),
        "inference_mode": True,
    }
    tensors = {}
    for name, layer in pack.layers.items():
        A, B = layer.lora_A[k], layer.lora_B[k]
        if converted:  # s [B, -B0] [A; A0] = s (B A - B0 A0), PEFT's `subtract_mutated_init`
            A = torch.cat([A, layer.lora_A0[k]], 0)    # (2r, in)
            B = torch.cat([B, -layer.lora_B0[k]], 1)   # (out, 2r)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B
    for name, tensor in _head_tensors(pack, k).items():
        tensors[PREFIX + name] = tensor
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}

    folder = Path(folder)
    # weights first, config last: a folder with a config always has its weights and sidecar
    metadata = {"format": "pt"} | ({"base_model_note": base_note} if base_note else {})
    write_atomic(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    if base_note:
        write_text_atomic(folder / "README.md", f"# LoRA adapter for {base_model}\n\nTrained on {base_note}.\n"
                          f"Loaded on {base_model} itself, it applies to weights that differ from those.\n")
    write_sidecar(folder, record)
    write_text_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return folder


def import_run(pack: LoRAPack, k: int, folder: str | os.PathLike) -> None:
    """Load a PEFT LoRA adapter folder into run k of `pack`, checking that it fits; a refused
    adapter changes nothing.

    An adapter of the pack's rank r goes into a run that keeps the base. One of rank 2r is taken
    only with a `lorainit_init.json` saying it was converted at rank r: it is split back (A: its
    first r rows of lora_A, A0 the last r; B: the first r columns of lora_B, B0 minus the last r),
    and run k must be a corrected run whose own A0, B0 equal the file's to INITIAL_RTOL of their
    norm. The file's A0, B0 then replace the run's (they differ at most in their last bits), so that
    exporting the run again gives the file's bits."""
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
    record = read_sidecar(folder)
    converted = config.get("r") == 2 * cfg.rank
    if converted:
        _check_converted(pack, k, folder, record)
    elif record is not None and record.converted:
        raise AdapterError(f"{folder / SIDECAR_FILE} says the adapter was converted at rank {record.r} (r "
                           f"{2 * record.r} in {CONFIG_FILE}, which has {config.get('r')!r}), but the pack has "
                           f"rank {cfg.rank}")
    elif pack.corrected[k]:
        raise AdapterError(f"run {k} keeps its initial factors as a correction (its init family rewrites the "
                           f"base), but {folder} is a plain adapter of the unmodified base; import it into a run "
                           "whose family keeps the base (a, b, gaussian, orthogonal, ab with reset false)")
    rank, alpha = (2 * cfg.rank, converted_alpha(cfg.alpha, cfg.rslora)) if converted else (cfg.rank, cfg.alpha)
    checks = [("peft_type", config.get("peft_type"), "LORA"),
              ("r", config.get("r"), rank),
              ("lora_alpha", config.get("lora_alpha"), alpha),
              ("use_rslora", bool(config.get("use_rslora", False)), cfg.rslora)]
    for key, got, want in checks:
        same = (isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-12)
                if key == "lora_alpha" else got == want)
        if not same:
            raise AdapterError(f"{config_path}: {key} is {got!r}, but the pack has {want!r}"
                               + (" (its converted form: rank 2r)" if converted and key != "peft_type" else ""))
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
    initial = _split(tensors, lora_keys, cfg.rank, weights_path) if converted else {}
    for key, param in wanted.items():
        if key not in tensors:
            continue  # an adapter without a saved head keeps run k's current head
        if tuple(tensors[key].shape) != tuple(param.shape[1:]):
            split = " (once split at r)" if converted else ""
            raise AdapterError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}{split}, "
                               f"the pack expects {tuple(param.shape[1:])}")
    if converted:
        _check_initial(pack, k, initial, record, weights_path)
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
        if converted:
            for name, layer in pack.layers.items():
                layer.set_initial(k, initial[f"{PREFIX}{name}.lora_A.weight"], initial[f"{PREFIX}{name}.lora_B.weight"])


def _check_converted(pack: LoRAPack, k: int, folder: Path, record: InitRecord | None) -> None:
    """A rank-2r adapter fits run k only if its sidecar says it was converted at the pack's rank r
    and run k keeps its initial factors as a correction."""
    r = pack.config.rank
    if record is None:
        raise AdapterError(f"{folder}: r is {2 * r}, twice the pack's {r}, as an adapter converted from an init "
                           f"that rewrites the base (PiSSA, OLoRA, Init[AB] with reset) has it; its factors split "
                           f"back into A, B and A0, B0 only where {SIDECAR_FILE} says the adapter was converted at "
                           f"rank {r}, and the folder has no {SIDECAR_FILE} (a plain adapter of rank {2 * r} "
                           f"does not fit a pack of rank {r} either)")
    where = folder / SIDECAR_FILE
    if not record.converted:
        raise AdapterError(f"{where} says the adapter was not converted, but its r is {2 * r}, twice the pack's {r}")
    if record.r != r:
        raise AdapterError(f"{where} says the adapter was converted at rank {record.r}, but the pack has rank {r}")
    if not pack.corrected[k]:
        raise AdapterError(f"{folder} was converted from init {record.init} (it rewrites the base), but run {k} "
                           "keeps the base; initialise run k with that family before importing it")


def _split(tensors: dict[str, torch.Tensor], lora_keys: list[str], r: int, where: Path) -> dict[str, torch.Tensor]:
    """Split a converted adapter's factors in place: lora_A [A; A0] -> A, lora_B [B, -B0] -> B;
    return A0 and B0 by key."""
    initial = {}
    for key in lora_keys:
        t = tensors[key]
        if key.endswith(".lora_A.weight") and t.dim() == 2 and t.shape[0] == 2 * r:
            tensors[key], initial[key] = t[:r], t[r:]           # (r, in) each
        elif key.endswith(".lora_B.weight") and t.dim() == 2 and t.shape[1] == 2 * r:
            tensors[key], initial[key] = t[:, :r], -t[:, r:]    # (out, r) each
        else:
            raise AdapterError(f"{where}: {key} has shape {tuple(t.shape)}, not that of a factor converted at rank {r}")
    return initial


def _check_initial(pack: LoRAPack, k: int, initial: dict[str, torch.Tensor], record: InitRecord, where: Path) -> None:
    """Run k's own A0, B0 equal the converted adapter's, to INITIAL_RTOL of their norm."""
    for name, layer in pack.layers.items():
        for f, mine in (("A", layer.lora_A0[k]), ("B", layer.lora_B0[k])):
            theirs = initial[f"{PREFIX}{name}.lora_{f}.weight"]
            mine = mine.detach().to("cpu", torch.float64)
            diff = (theirs.double() - mine).norm().item() / max(mine.norm().item(), torch.finfo(torch.float64).tiny)
            if not diff <= INITIAL_RTOL:
                raise AdapterError(
                    f"{where}: {name}: the adapter's {f}0 differs from run {k}'s by {diff:.2e} of its norm (more "
                    f"than {INITIAL_RTOL:g}); it was converted from init {record.init} with {record.init_args} and "
                    f"seed {record.seed} on its base, which is not how run {k} started")
