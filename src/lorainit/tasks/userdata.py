"""A user's rows checked and taken apart: classification texts and labels, SFT examples, held-out
splits, and macro-F1. Pure Python over a `readers.Table`; tokenising is the task family's job.

Every problem is a DataError of one line naming the file, the line (or row) and the column. A
problem found on several rows is reported once, with their count and the first of their lines.

Labels. A label column whose values all read as integers (3, "3", " 3") holds integer labels: the
classes are those ints in numeric order (so 1 and "1" are one class, and 10 comes after 2).
Otherwise the labels are the stripped strings, in sorted order. `task.labels` fixes the set and
its order instead. Floats, booleans, nulls and lists are not labels.
"""

from __future__ import annotations

import json
import re

from lorainit.tasks.glue import DataError
from lorainit.tasks.readers import Table, one_line, repeats

ROLES = ("system", "user", "assistant", "tool")
STYLES = ("text", "prompt_completion", "instruction", "messages")
# Each style's columns by their default names; task.columns maps these to the file's names.
STYLE_COLUMNS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "input", "output"),  # input may be absent, null or empty
    "messages": ("messages",),
}
OPTIONAL_COLUMNS = ("input",)

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?[0-9]+[eE][+-]?[0-9]+")
_ABSENT = object()  # a JSON row without the key
# Role names other datasets use, and the role a message of theirs plays (for the hint in messages).
_ROLE_GUESSES = {"gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
                 "chatbot": "assistant", "human": "user", "prompter": "user", "customer": "user",
                 "function": "tool", "ipython": "tool", "observation": "tool"}


def _show(value) -> str:
    """A cell's value as messages name it: 'null', 'a number (3)', 'true', 'a list'."""
    if value is _ABSENT:
        return "no value"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return {list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")


class _Problems:
    """Problems found over a table's rows, kept by kind, so that one message counts a kind's rows.

    The message is that of the first row found with a problem, for its kind."""

    def __init__(self, table: Table):
        self.table = table
        self.found: dict = {}  # kind -> (head, advice, noun, [locators])

    def add(self, kind, i: int, head: str, advice: str = "", noun: str = "rows") -> None:
        head, advice, noun, where = self.found.setdefault(kind, (head, advice, noun, []))
        line = self.table.lines[i]
        if not where or where[-1] != line:  # one row counts once, however many of its cells
            where.append(line)

    def check(self) -> None:
        if self.found:
            head, advice, noun, where = next(iter(self.found.values()))
            raise DataError(f"{head}{repeats(self.table.unit, where, noun)}{advice}")


def _columns(table: Table) -> str:
    return ", ".join(one_line(name) for name in table.columns)


def _need_columns(table: Table, names: list[str], setting: str) -> None:
    for name in names:
        if name not in table.columns:
            raise DataError(f"{table.where}: no column {name!r} (columns: {_columns(table)}); "
                            f"set {setting} to one of them")


# -- classification ---------------------------------------------------------------------------

def _label_problem(value) -> tuple[str, str, str] | None:
    """(kind, what is wrong, what to do) for a value that cannot be a class label, else None."""
    if value is None or value is _ABSENT:
        return "null", f"{_show(value)} is not a label", "; give every row a label, or remove those rows"
    if isinstance(value, bool):
        return "bool", f"{_show(value)} is a boolean, not a label", "; write the labels as integers (0, 1) or strings"
    if isinstance(value, float) or (isinstance(value, str) and _FLOAT.fullmatch(value.strip())):
        shown = value.strip() if isinstance(value, str) else value
        number = float(value)
        whole = f" (write {int(number)} for {shown})" if number.is_integer() else ""
        return ("float", f"{shown} is a float", "; classification needs integer or string labels, "
                f"and regression is not supported{whole}")
    if isinstance(value, str) and not value.strip():
        return "empty", "an empty label", "; give every row a label, or remove those rows"
    if not isinstance(value, (int, str)):
        return "shape", f"{_show(value)} is not a label", "; give each row one label, an integer or a string"
    return None


def canonical_label(value) -> int | str:
    """A label as one class is known: an int for ints and integer strings (' 3' -> 3), else the
    stripped string. (In a column that is not all integers, `label_set` keeps every label a string.)"""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{_show(value)} is not a label; labels are integers or strings")
    if isinstance(value, int):
        return value
    value = value.strip()
    return int(value) if _INT.fullmatch(value) else value


def _as_text(value) -> str:
    return value.strip() if isinstance(value, str) else str(value)


def _canonical_column(values: list) -> list:
    """Each value's class: ints if every value reads as an integer, else stripped strings."""
    labels = [canonical_label(v) for v in values]
    if all(isinstance(label, int) for label in labels):
        return labels
    return [_as_text(v) for v in values]


def _listed(labels) -> str:
    shown = ", ".join(one_line(str(label)) for label in list(labels)[:20])
    return shown + (f", ... ({len(labels)} labels)" if len(labels) > 20 else "")


def classification_rows(table: Table, text: list[str], label: str) -> tuple[list[tuple[str, ...]], list]:
    """(texts, raw labels) of every row: a tuple of 1 or 2 stripped strings (the `text` columns),
    and the `label` column's values as read (canonicalise them with `label_set` and `label_ids`)."""
    if len(text) not in (1, 2):
        raise DataError(f"task.text names {len(text)} columns ({', '.join(text)}); classification reads one "
                        "text column, or two for sentence pairs")
    _need_columns(table, text, "task.text")
    _need_columns(table, [label], "task.label")
    problems = _Problems(table)
    texts, labels = [], []
    first_int = first_str = None  # the first row holding an int label, and a non-integer string
    for i, row in enumerate(table.rows):
        cells = []
        for column in text:
            value = row.get(column, _ABSENT)
            if isinstance(value, str):
                cells.append(value.strip())
            else:
                problems.add(("text", column), i, f"{table.at(i)}, column {column!r}: {_show(value)} is not text",
                             "; give every row text there, or remove those rows")
        value = row.get(label, _ABSENT)
        problem = _label_problem(value)
        if problem:
            kind, what, advice = problem
            problems.add(("label", kind), i, f"{table.at(i)}, column {label!r}: {what}", advice)
        elif isinstance(value, int):
            first_int = i if first_int is None else first_int
        elif not _INT.fullmatch(value.strip()):
            first_str = i if first_str is None else first_str
        texts.append(tuple(cells))
        labels.append(value)
    problems.check()
    if first_int is not None and first_str is not None:
        raise DataError(f"{table.where}: column {label!r} mixes types: a number at {table.unit} "
                        f"{table.lines[first_int]}, a string at {table.unit} {table.lines[first_str]}; use one type")
    return texts, labels


def label_set(values: list, given: list | None = None, where: str = "the training file",
              column: str = "label") -> tuple:
    """The classes, in id order: `given` (task.labels) canonicalised, else the training split's
    `values`: ints in numeric order if every value reads as an integer, else strings, sorted."""
    if given is not None:
        for label in given:
            if _label_problem(label):
                raise DataError(f"task.labels: {_show(label)} is not a label; "
                                "labels are integers or strings")
        labels = _canonical_column(list(given))
        twice = next((label for k, label in enumerate(labels) if label in labels[:k]), None)
        if twice is not None:
            raise DataError(f"task.labels lists {str(twice)!r} twice; list each label once")
        if len(labels) < 2:
            raise DataError(f"task.labels lists {len(labels)} label{'s' * (len(labels) != 1)}; "
                            "classification needs two or more")
    else:
        labels = sorted(set(_canonical_column(list(values))))
    seen = set(_canonical_column(list(values))) if values else set()
    if len(seen) == 1:
        raise DataError(f"{where}: column {column!r} holds one value ({str(next(iter(seen)))!r}); "
                        "classification needs two or more")
    return tuple(labels)


def label_ids(values: list, labels: tuple, table: Table, column: str) -> list[int]:
    """Each row's class id: its value's index in `labels`. A value outside them is an error (never
    a new class); one message counts every such row."""
    integer = all(isinstance(label, int) for label in labels)
    index = {label: k for k, label in enumerate(labels)}
    ids, unknown = [], []
    for i, value in enumerate(values):
        key = canonical_label(value) if integer else _as_text(value)
        if key in index:
            ids.append(index[key])
        else:
            unknown.append((i, key))
    if unknown:
        i, key = unknown[0]
        raise DataError(f"{table.at(i)}, column {column!r}: label {str(key)!r} is not one of the labels "
                        f"{_listed(labels)}{repeats(table.unit, [table.lines[j] for j, _ in unknown])}; "
                        "list it under task.labels or remove those rows")
    return ids


def macro_f1(references: list[int], predictions: list[int]) -> float:
    """The mean F1 over the labels present in `references` or `predictions`; a label's F1 is
    2·tp / (2·tp + fp + fn), 0 where it has no true positive. This is scikit-learn's
    f1_score(average='macro') with its defaults."""
    if len(references) != len(predictions) or not references:
        raise ValueError(f"macro_f1 needs equally many references and predictions, at least one "
                         f"(got {len(references)} and {len(predictions)})")
    scores = []
    for label in sorted(set(references) | set(predictions)):
        tp = sum(r == label and p == label for r, p in zip(references, predictions))
        fp = sum(r != label and p == label for r, p in zip(references, predictions))
        fn = sum(r == label and p != label for r, p in zip(references, predictions))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


# -- SFT --------------------------------------------------------------------------------------

def detect_style(columns: list[str], columns_map: dict | None = None, *, where: str | None = None) -> str:
    """The SFT style a file's columns fit, first found: messages, prompt and completion,
    instruction and output, text. `columns_map` (task.columns) renames the defaults."""
    names = columns_map or {}
    for style, needed in (("messages", ("messages",)), ("prompt_completion", ("prompt", "completion")),
                          ("instruction", ("instruction", "output")), ("text", ("text",))):
        if all(names.get(default, default) in columns for default in needed):
            return style
    raise DataError(f"{where + ': ' if where else ''}cannot tell the SFT style from the columns "
                    f"({', '.join(one_line(c) for c in columns)}): it reads messages, prompt and completion, "
                    f"instruction and output, or text; set task.style to one of {', '.join(STYLES)}, "
                    "and task.columns to name the columns")


def _role_hint(role) -> str:
    guess = _ROLE_GUESSES.get(str(role).lower(), "<system, user, assistant or tool>")
    return f"; map it with task.roles: {{{one_line(str(role))}: {guess}}}"


def _conversation(value, i: int, table: Table, column: str, keys: tuple[str, str], roles: dict,
                  problems: _Problems) -> list[dict] | None:
    """One row's messages as [{role, content}], roles mapped; None (and a problem noted) if unusable."""
    role_key, content_key = keys
    if isinstance(value, str):  # a CSV cell can hold the conversation as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # plain text stays as it is: reported just below as not a list of messages
    at = table.at(i)
    if not isinstance(value, list):
        problems.add("not_list", i, f"{at}, column {column!r}: {_show(value)} is not a list of messages",
                     f"; each row's {column!r} is a list of objects with {role_key!r} and {content_key!r}")
        return None
    if not value:
        problems.add("empty", i, f"{at}, column {column!r}: an empty conversation", "; remove those rows",
                     "conversations")
        return None
    messages, ok = [], True
    for j, message in enumerate(value, start=1):
        where = f"{at}, message {j}"
        if not isinstance(message, dict):
            problems.add("not_object", i, f"{where}: {_show(message)} is not a message",
                         f"; each message is an object with {role_key!r} and {content_key!r}", "conversations")
            ok = False
            continue
        missing = next((k for k in keys if k not in message), None)
        if missing is not None:
            found = ", ".join(one_line(str(k)) for k in message) or "none"
            guess = "{role: from, content: value}" if {"from", "value"} <= set(message) \
                else "{role: <key>, content: <key>}"
            problems.add("keys", i, f"{where}: no {missing!r} key (keys: {found})",
                         f"; name the keys with task.message_keys: {guess}", "conversations")
            ok = False
            continue
        role, content = message[role_key], message[content_key]
        mapped = roles.get(role, role) if isinstance(role, str) else role
        if mapped not in ROLES:
            problems.add("role", i, f"{where}: role {role!r} is not system, user, assistant or tool",
                         _role_hint(role), "conversations")
            ok = False
        if not isinstance(content, str):
            problems.add("content", i, f"{where}: the content is {_show(content)}, not text",
                         "; every message's content is a string", "conversations")
            ok = False
        messages.append({"role": mapped, "content": content})
    if ok and not any(m["role"] == "assistant" for m in messages):
        seen = ", ".join(dict.fromkeys(m["role"] for m in messages))
        problems.add("no_assistant", i, f"{at}: no assistant message (roles: {seen}), nothing to train on",
                     "", "conversations")
        return None
    return messages if ok else None


def sft_rows(table: Table, style: str, columns: dict | None = None, roles: dict | None = None,
             message_keys: dict | None = None) -> list:
    """Each row as its style's example, values unstripped: text -> str; prompt_completion ->
    (prompt, completion); instruction -> (instruction, input, output), input '' where absent;
    messages -> [{'role', 'content'}, ...] with roles mapped to system/user/assistant/tool.

    `columns` maps the style's default column names to the file's ({output: response}); `roles`
    maps the file's role names ({human: user, gpt: assistant}); `message_keys` names the keys of a
    message ({role: from, content: value}, as in ShareGPT files)."""
    if style not in STYLES:
        raise DataError(f"task.style {style!r} is not one of {', '.join(STYLES)}")
    columns, roles, message_keys = columns or {}, roles or {}, message_keys or {}
    defaults = STYLE_COLUMNS[style]
    for key in columns:
        if key not in defaults:
            raise DataError(f"task.columns: {key!r} is not a column of the {style} style "
                            f"(its columns: {', '.join(defaults)})")
    for key in message_keys:
        if key not in ("role", "content"):
            raise DataError(f"task.message_keys: {key!r} is not 'role' or 'content'")
    for name, role in roles.items():
        if role not in ROLES:
            raise DataError(f"task.roles maps {name!r} to {role!r}, which is not system, user, assistant or tool")
    names = {default: columns.get(default, default) for default in defaults}
    for default, name in names.items():
        if name not in table.columns and default not in OPTIONAL_COLUMNS:
            raise DataError(f"{table.where}: no column {name!r} for the {style} style (columns: "
                            f"{_columns(table)}); map it with task.columns: {{{default}: <column>}}")
    keys = (message_keys.get("role", "role"), message_keys.get("content", "content"))
    problems = _Problems(table)
    out = []
    for i, row in enumerate(table.rows):
        if style == "messages":
            out.append(_conversation(row.get(names["messages"], _ABSENT), i, table, names["messages"], keys,
                                     roles, problems))
            continue
        cells = []
        for default, name in names.items():
            value = row.get(name, _ABSENT)
            if default in OPTIONAL_COLUMNS and value in (_ABSENT, None, ""):
                value = ""
            elif not isinstance(value, str):
                problems.add(("text", name), i, f"{table.at(i)}, column {name!r}: {_show(value)} is not text",
                             "; give every row text there, or remove those rows")
            cells.append(value)
        out.append(cells[0] if style == "text" else tuple(cells))
    problems.check()
    return out


# -- splits -----------------------------------------------------------------------------------

def held_out(n: int, fraction: float, split_seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices, each ascending: eval is the first max(1, round(fraction·n)) of a
    permutation drawn from numpy's default_rng(split_seed), the same for the same n and seed."""
    if not 0 < fraction < 1:
        raise DataError(f"task.eval_fraction must be between 0 and 1 (both excluded), got {fraction}")
    k = max(1, round(fraction * n))
    if n - k < 1:
        raise DataError(f"task.eval_fraction {fraction} of {n} row{'s' * (n != 1)} leaves no training rows; "
                        "lower it, or give task.eval as a file")
    import numpy as np  # here, so that reading a spec's rows does not load numpy

    order = np.random.default_rng(split_seed).permutation(n)
    return sorted(int(i) for i in order[k:]), sorted(int(i) for i in order[:k])


def overlap(train_keys: list[str], eval_keys: list[str]) -> int:
    """How many evaluation rows' keys also occur among the training rows' keys."""
    seen = set(train_keys)
    return sum(key in seen for key in eval_keys)


def identical(a: Table, b: Table) -> bool:
    """Whether two tables were read from byte-identical files."""
    return a.sha256 == b.sha256
