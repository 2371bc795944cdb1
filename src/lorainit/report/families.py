"""An init family: an init and its arguments, as the report groups, names, orders and pairs runs.

A run's family is its `init` when it has no `init_args` (and in a store written before that field
existed), else its init followed by its arguments as canonical JSON: `ab` and `ab{"reset":false}`
are two families, named "Init[AB]" and "Init[AB] (reset: false)". The same spelling names a
family in a sweep file's `compare:` and in `lorainit report --pair X:Y`.
"""

from __future__ import annotations

import json
import re

from lorainit.errors import BadInput

# how the page, the figures and the sentences name each init; an unknown init is shown as given
INIT_NAMES = {"a": "Init[A]", "b": "Init[B]", "ab": "Init[AB]", "gaussian": "Gaussian (PEFT)",
              "orthogonal": "Orthogonal", "pissa": "PiSSA", "olora": "OLoRA", "lora_ga": "LoRA-GA",
              "lora_one": "LoRA-One", "eva": "EVA", "corda": "CorDA"}
_PISSA_NITER = re.compile(r"^pissa_niter_(\d+)$")  # PiSSA's fast SVD with K subspace iterations


def canonical(args) -> str | None:
    """A mapping (or its JSON text) as sorted, compact JSON; None for no arguments or an empty mapping."""
    if args is None:
        return None
    value = json.loads(args) if isinstance(args, str) else args
    return json.dumps(value, sort_keys=True, separators=(",", ":")) if value else None


def key(config: dict) -> str:
    """A run's family: its init, followed by its init_args when it has any."""
    args = canonical(config.get("init_args"))
    return config["init"] + (args or "")


def split(family: str) -> tuple[str, dict]:
    """A family key -> (init, its arguments)."""
    init, brace, rest = family.partition("{")
    return init, json.loads(brace + rest) if brace else {}


def init_name(init: str) -> str:
    niter = _PISSA_NITER.match(init)
    return f"PiSSA (niter {niter.group(1)})" if niter else INIT_NAMES.get(init, init)


def name(family: str) -> str:
    """How a reader knows a family: 'Init[A]', 'PiSSA (niter 4)', 'Init[AB] (reset: false)'."""
    init, args = split(family)
    shown = ", ".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items())
    return init_name(init) + (f" ({shown})" if shown else "")


def order(family: str) -> tuple:
    """Sort key: the inits in INIT_NAMES' order (PiSSA's niter variants after PiSSA, by K), then any
    other init by name; within an init, no arguments first."""
    init, _ = split(family)
    known = list(INIT_NAMES)
    niter = _PISSA_NITER.match(init)
    if niter:
        place = (known.index("pissa"), int(niter.group(1)), "")
    else:
        place = (known.index(init) if init in known else len(known), 0, init)
    return (*place, family != init, family)


def parse(text: str, where: str) -> str:
    """A family as a user writes it ('pissa', 'ab{"reset": false}') -> its key."""
    text = str(text).strip()
    init, brace, rest = text.partition("{")
    if not init:
        raise BadInput(f"{where}: {text!r} names no init; write an init, e.g. pissa or ab{{\"reset\":false}}")
    if not brace:
        return init
    try:
        args = json.loads(brace + rest)
    except json.JSONDecodeError:
        raise BadInput(f"{where}: {text!r}: the init's arguments are not a JSON mapping") from None
    if not isinstance(args, dict):
        raise BadInput(f"{where}: {text!r}: the init's arguments are not a JSON mapping")
    return init + (canonical(args) or "")


def parse_pair(text: str, where: str) -> tuple[str, str]:
    """'X:Y' -> (X, Y), split at the colon outside any braces (an argument mapping has its own)."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == ":" and depth == 0:
            return check_pair((text[:i], text[i + 1:]), where)
    raise BadInput(f"{where}: {text!r} is not a pair of families; write X:Y, e.g. pissa:olora")


def check_pair(pair, where: str) -> tuple[str, str]:
    """Two distinct families -> their keys."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise BadInput(f"{where}: {pair!r} is not a pair of families; write e.g. [pissa, olora]")
    x, y = (parse(p, where) for p in pair)
    if x == y:
        raise BadInput(f"{where}: {x} is compared with itself; name two different families")
    return x, y
