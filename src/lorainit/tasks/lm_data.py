"""Language-model data: GSM8K question/answer rows and WikiText-2 text, and GSM8K's scoring.

Where rows come from, first found: `data_dir` (the folder holding the files), else
`$LORAINIT_DATA/gsm8k` or `$LORAINIT_DATA/wikitext-2`, else the hub's parquet files
(`openai/gsm8k`, `Salesforce/wikitext` `wikitext-2-raw-v1`; pyarrow, the `hub` extra).

- GSM8K: `train.jsonl` and `test.jsonl`, one `{"question", "answer"}` object a line; every answer
  ends in `#### N`, the final number.
- WikiText-2: `train.txt`, `valid.txt`, `test.txt`. A folder without `train.txt` (the shared copy
  holds only the validation and test splits) trains on `valid.txt`; evaluation is on `test.txt`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lorainit.tasks.glue import DataError

GSM8K_HUB = ("openai/gsm8k", "main/{split}-00000-of-00001.parquet")
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1/{split}-00000-of-00001.parquet")
FOLDERS = {"gsm8k": "gsm8k", "wikitext2": "wikitext-2"}


def data_root(task: str, data_dir: str | None) -> Path | None:
    """The task's data folder: `data_dir`, else $LORAINIT_DATA/<folder>, else None (the hub)."""
    if data_dir:
        return Path(data_dir)
    env = os.environ.get("LORAINIT_DATA")
    return Path(env) / FOLDERS[task] if env else None


def _hub_path(repo: str, name: str, task: str) -> str:
    """A hub parquet file, fetched once into the hub cache."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, name, repo_type="dataset")
    except Exception as err:  # offline, unreachable, or not cached: all mean "give a folder"
        raise DataError(f"no data folder was given and {repo}:{name} could not be fetched from the hub "
                        f"({type(err).__name__}); pass data_dir (the folder holding the {task} files) or set "
                        f"LORAINIT_DATA to a root holding {FOLDERS[task]}/") from None


def files(task: str, data_dir: str | None = None) -> dict[str, Path]:
    """role ('train', 'eval') -> the file `gsm8k` or `wikitext2` reads (WikiText-2's training file is
    `train.txt`, else `valid.txt`): in its data folder, or the hub's parquet file."""
    root = data_root(task, data_dir)
    names = {"gsm8k": ("train", "test"), "wikitext2": ("train", "test")}[task]
    if root is None:
        repo, pattern = GSM8K_HUB if task == "gsm8k" else WIKITEXT_HUB
        return {role: Path(_hub_path(repo, pattern.format(split=name), task))
                for role, name in zip(("train", "eval"), names)}
    if task == "gsm8k":
        return {"train": root / "train.jsonl", "eval": root / "test.jsonl"}
    train = next((root / n for n in ("train.txt", "valid.txt") if (root / n).is_file()), root / "train.txt")
    return {"train": train, "eval": root / "test.txt"}


def _hub_parquet(repo: str, name: str, column: str, task: str) -> tuple[list, str]:
    """One column of a hub parquet file, and the file's name for messages."""
    path = _hub_path(repo, name, task)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading from the hub needs pyarrow: pip install 'lorainit[hub]', or pass data_dir") from None
    table = pq.read_table(path)
    if column not in table.column_names:
        raise DataError(f"{path}: no column {column!r} (found {', '.join(table.column_names)})")
    return table.column(column).to_pylist(), path


# -- GSM8K ------------------------------------------------------------------------------------

@dataclass
class QA:
    question: str
    answer: str   # the worked answer, ending in '#### N'


def read_gsm8k(split: str, data_dir: str | None = None, max_rows: int | None = None) -> list[QA]:
    """The first `max_rows` rows of 'train' or 'eval' (the test split), in file order."""
    name = "train" if split == "train" else "test"
    root = data_root("gsm8k", data_dir)
    rows: list[tuple[str, str, str]] = []  # question, answer, where
    if root is None:
        repo, pattern = GSM8K_HUB
        questions, path = _hub_parquet(repo, pattern.format(split=name), "question", "gsm8k")
        answers, _ = _hub_parquet(repo, pattern.format(split=name), "answer", "gsm8k")
        rows = [(q, a, f"{path}: row {i}") for i, (q, a) in enumerate(zip(questions, answers), start=1)]
    else:
        path = root / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: file not found (expected the layout <folder>/{name}.jsonl)")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if max_rows is not None and len(rows) >= max_rows:
                    break
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {line_no} is not JSON ({err.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) \
                        or not isinstance(obj.get("answer"), str):
                    raise DataError(f"{path}: line {line_no} needs string fields 'question' and 'answer'")
                rows.append((obj["question"], obj["answer"], f"{path}: line {line_no}"))
    rows = rows[:max_rows] if max_rows is not None else rows
    if not rows:
        raise DataError(f"{path}: no rows")
    for question, answer, where in rows:
        if "#### " not in answer:
            raise DataError(f"{where}: the answer has no '#### N' final number")
    return [QA(q.strip(), a.strip()) for q, a, _ in rows]


def gsm8k_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalise_number(text: str) -> str | None:
    """The first number in `text`, without commas, '$' or a trailing '.0' ('1,000.00' -> '1000');
    None if there is none."""
    found = _NUMBER.search(text.replace("$", ""))
    if found is None:
        return None
    number = found.group(0).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number in ("-0", "") else number


def final_answer(text: str) -> str | None:
    """The normalised number after the first '#### ' in `text`, or None without one."""
    head, marker, tail = text.partition("#### ")
    if not marker:
        return None
    return normalise_number(tail.split("\n")[0])


def exact_match(generated: str, reference: str) -> bool:
    """GSM8K's score of one generation: its final number equals the reference answer's."""
    ours = final_answer(generated)
    return ours is not None and ours == final_answer(reference)


# -- WikiText-2 -------------------------------------------------------------------------------

def wikitext_file(split: str, data_dir: str | None = None) -> tuple[str, str]:
    """(text, where it came from) of 'train' or 'eval' (the test split)."""
    root = data_root("wikitext2", data_dir)
    if root is None:
        repo, pattern = WIKITEXT_HUB
        lines, path = _hub_parquet(repo, pattern.format(split="train" if split == "train" else "test"), "text",
                                   "wikitext2")
        text, where = "".join(lines), str(path)
    else:
        names = ["train.txt", "valid.txt"] if split == "train" else ["test.txt"]
        found = next((root / n for n in names if (root / n).is_file()), None)
        if found is None:
            raise DataError(f"{root / names[0]}: file not found (expected {' or '.join(names)} in {root})")
        text, where = found.read_text(encoding="utf-8"), str(found)
    if not text.strip():
        raise DataError(f"{where}: the split is empty")
    return text, where
