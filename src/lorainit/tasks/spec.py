"""A data-declared task: the mapping a sweep file gives as `task:`, checked and normalised.

    task: {type: classification, train: data/train.csv, eval: data/test.csv, text: question, label: label}
    task: {type: sft, style: messages, train: chats.jsonl, eval_fraction: 0.1}

`type` is a registered task that takes data (`classification` or `sft`); the rest of the mapping is
the spec, held by the run as canonical JSON (its `data` field). Relative file paths are resolved
against the sweep file's folder (the working folder on the command line) when the run is built, so
that a run carries absolute paths wherever it trains. A run's identity covers the spec without its
paths and a fingerprint of the files' contents (`fingerprint`): moving the files does not re-key
runs, changing them does. Nothing here imports torch or reads more than the files' bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lorainit.errors import BadInput

# key -> (the types it takes, what it is); every key is optional unless named in REQUIRED
COMMON = {
    "train": ((str,), "the training file (a hub split name with `hub`)"),
    "eval": ((str,), "the evaluation file (a hub split name with `hub`)"),
    "eval_fraction": ((float, int), "hold out this fraction of the training rows instead of an eval file"),
    "split_seed": ((int,), "the seed of that held-out cut (never a run's seed; default 0)"),
    "file_type": ((str,), "csv | tsv | json | jsonl | parquet, where the extension does not say"),
    "hub": ((str,), "a hub dataset id; train and eval then name its splits"),
    "config": ((str,), "the hub dataset's config (default: 'default')"),
    "revision": ((str,), "a pinned commit of the hub dataset's parquet files"),
    "name": ((str,), "a label for reports (default: the training file's name)"),
}
KEYS = {
    "classification": COMMON | {
        "text": ((str, list), "the text column, or a pair [first, second] (default: text)"),
        "label": ((str,), "the label column (default: label)"),
        "labels": ((list,), "the label set, in id order (default: the training labels, sorted)"),
    },
    "sft": COMMON | {
        "style": ((str,), "text | prompt_completion | instruction | messages (default: from the columns)"),
        "columns": ((dict,), "the style's column names mapped to yours, e.g. {output: response}"),
        "roles": ((dict,), "your role names mapped to system/user/assistant/tool, e.g. {human: user}"),
        "message_keys": ((dict,), "a message's keys mapped, e.g. {role: from, content: value}"),
        "templates": ((dict,), "format strings over the columns: {prompt: ..., completion: ...}"),
        "train_on": ((str,), "completion (the default: completions or assistant turns) | all"),
        "too_long": ((str,), "drop (the default) | truncate, for rows longer than max_seq_len"),
        "blocks": ((bool,), "text style: cut the stream into max_seq_len blocks (as wikitext2)"),
        "reference": ((str,), "a column of reference answers (a string, or a list): adds exact_match"),
        "match": ((str,), "exact (the default: whitespace collapsed, case folded) | final_number"),
        "stop": ((list,), "strings that end a generation"),
    },
}
CHOICES = {"train_on": ("completion", "all"), "too_long": ("drop", "truncate"),
           "match": ("exact", "final_number"), "style": ("text", "prompt_completion", "instruction", "messages"),
           "file_type": ("csv", "tsv", "json", "jsonl", "parquet")}
PATH_KEYS = ("train", "eval")  # file paths, unless the spec names a hub dataset


def where(key: str) -> str:
    return f"task.{key}"


def normalise(kind: str, given: dict, relative_to: str | Path | None = None) -> dict:
    """The spec of a `kind` task from a sweep file's mapping (without `type`), checked: unknown
    keys, wrong types and impossible combinations raise BadInput naming `task.<key>`. Relative
    paths become absolute against `relative_to` (default: the working folder)."""
    known = KEYS[kind]
    spec = {}
    for key, value in given.items():
        key = str(key).replace("-", "_")
        if key not in known:
            raise BadInput(f"task: unknown key {key!r} for type {kind}; its keys are: {', '.join(known)}")
        types, _ = known[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise BadInput(f"{where(key)} must be {' or '.join(_kind(t) for t in types)}, got {value!r}")
        spec[key] = value
    for key, allowed in CHOICES.items():
        if key in spec and spec[key] not in allowed:
            raise BadInput(f"{where(key)} is {spec[key]!r}; allowed: {', '.join(allowed)}")
    if "train" not in spec:
        raise BadInput(f"task: type {kind} needs train: the training file (or, with hub, its split)")
    if ("eval" in spec) == ("eval_fraction" in spec):
        raise BadInput("task: give eval (a file, or a hub split) or eval_fraction (a held-out share of train), "
                       "exactly one")
    if "eval_fraction" in spec:
        spec["eval_fraction"] = float(spec["eval_fraction"])
        if not 0.0 < spec["eval_fraction"] < 1.0:
            raise BadInput(f"{where('eval_fraction')} must be between 0 and 1, got {spec['eval_fraction']!r}")
    if "hub" not in spec:
        for key in ("config", "revision"):
            if key in spec:
                raise BadInput(f"{where(key)} applies to a hub dataset; give task.hub too")
        base = Path(relative_to) if relative_to is not None else Path.cwd()
        for key in PATH_KEYS:
            if key in spec:
                path = Path(spec[key]).expanduser()
                spec[key] = str((path if path.is_absolute() else base / path).resolve())
    if kind == "classification":
        text = spec.get("text", "text")
        text = [text] if isinstance(text, str) else text
        if not 1 <= len(text) <= 2 or not all(isinstance(t, str) and t for t in text):
            raise BadInput(f"{where('text')} must be a column name or a pair of them, got {spec.get('text')!r}")
        if "text" in spec:
            spec["text"] = text
        if "labels" in spec and len(spec["labels"]) < 2:
            raise BadInput(f"{where('labels')} must list two or more labels, got {spec['labels']!r}")
    else:
        for key in ("columns", "roles", "message_keys", "templates"):
            if key in spec and not all(isinstance(k, str) and isinstance(v, str) for k, v in spec[key].items()):
                raise BadInput(f"{where(key)} must map names to names, got {spec[key]!r}")
        if "stop" in spec and not all(isinstance(s, str) and s for s in spec["stop"]):
            raise BadInput(f"{where('stop')} must be a list of non-empty strings, got {spec['stop']!r}")
        if "match" in spec and "reference" not in spec:
            raise BadInput(f"{where('match')} scores generations against task.reference; name that column too")
        if spec.get("blocks") and spec.get("style", "text") != "text":
            raise BadInput(f"{where('blocks')} cuts a text stream into blocks: it needs style: text")
        unknown = set(spec.get("templates", {})) - {"prompt", "completion"}
        if unknown:
            raise BadInput(f"{where('templates')}: unknown template {sorted(unknown)[0]!r}; templates are prompt, "
                           "completion")
    return spec


def _kind(t: type) -> str:
    return {str: "a string", list: "a list", dict: "a mapping", float: "a number", int: "an integer",
            bool: "true or false"}[t]


def dumps(spec: dict) -> str:
    """The canonical JSON a run holds: sorted keys, no spaces."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def loads(text: str | dict) -> dict:
    return dict(text) if isinstance(text, dict) else json.loads(text)


def identity(spec: dict) -> dict:
    """The spec as a run id covers it: without its file paths (the fingerprint covers their contents)."""
    if "hub" in spec:
        return spec
    return {k: v for k, v in spec.items() if k not in PATH_KEYS}


def files(spec: dict) -> dict[str, str]:
    """role -> path of each local file the spec reads ('train', 'eval')."""
    if "hub" in spec:
        return {}
    return {key: spec[key] for key in PATH_KEYS if key in spec}


def label(spec: dict) -> str:
    """A short name for reports: `name`, else the training file's stem (or the hub id)."""
    if "name" in spec:
        return spec["name"]
    if "hub" in spec:
        return spec["hub"].split("/")[-1]
    return Path(spec["train"]).stem if Path(spec["train"]).stem not in ("train", "data") \
        else Path(spec["train"]).parent.name or Path(spec["train"]).stem


_HASHED: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: a grid's runs hash each file once


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in blocks (once per process while it is unchanged)."""
    stat = Path(path).stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _HASHED:
        return _HASHED[key]
    from lorainit.tasks import readers

    _HASHED[key] = readers.sha256_file(path)
    return _HASHED[key]


def task_name(task: str, data: str | None) -> str:
    """A run's task as a reader knows it: its name, or a declared task's data and type ('trec (classification)')."""
    return task if not data else f"{label(loads(data))} ({task})"


def fingerprint(spec: dict) -> str:
    """A hash of the contents the spec reads: each local file's bytes by role; for a hub dataset, its
    parquet files' bytes (fetched into the hub cache, or read from it offline)."""
    if "hub" in spec:
        from lorainit.tasks import readers


        parts = {role: readers.hub_table(spec["hub"], spec[role], spec.get("config"), spec.get("revision")).sha256
                 for role in PATH_KEYS if role in spec}
    else:
        parts = {}
        for role, path in files(spec).items():
            if not Path(path).is_file():
                raise BadInput(f"{path}: file not found (task.{role})")
            parts[role] = sha256_file(path)
    return hashlib.sha256(dumps(parts).encode()).hexdigest()[:16]
