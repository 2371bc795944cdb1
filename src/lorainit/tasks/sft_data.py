"""Decoder rows: text, prompt/completion, instruction and chat data encoded as token ids and the
spans of them that count.

One encoding for every decoder task: the built-in `gsm8k` is a prompt/completion preset (its
prompt `Question: {question}\\nAnswer:`, its completion ` {answer}`, rows too long truncated), the
built-in `wikitext2` a text preset cut into blocks, and `sft` encodes the rows a run declares
(`tasks.spec`). A row is its token ids and the spans [lo, hi) of positions whose token counts
(each predicted from the one before):

- text: every token but the first (with `blocks`, the rows form one stream cut into
  `max_seq_len` blocks, as `wikitext2`);
- prompt/completion: the prompt is tokenised with the tokenizer's special tokens, the completion
  apart without them, then EOS: the completion and EOS count, the boundary exact by construction;
- messages (and instruction rows, where the tokenizer has a chat template): the conversation is
  rendered once with the chat template and tokenised with character offsets. Each assistant turn
  spans the characters between the rendering of the turns before it (with the generation prompt)
  and the rendering that includes it: its content and the template's end-of-turn text. A token
  counts when it starts inside an assistant turn's span. No generation markers are needed, and
  the ids are those `apply_chat_template` gives.

`train_on: all` counts every token but the first. Rows longer than `max_seq_len` are dropped (the
default), or truncated as `gsm8k` truncates (the prompt cut from the left so that one completion
token fits, then the row cut to `max_seq_len`); a row left with no counted token is dropped. Each
count is printed.
"""

from __future__ import annotations

from lorainit.tasks import declared, lm_data, spec as specs, userdata
from lorainit.tasks.glue import DataError

# Stanford Alpaca's prompt, for instruction rows on a tokenizer without a chat template
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
GSM8K_STOP = "\n\nQuestion:"  # a GSM8K generation that starts the next question is cut there


class Encoded:
    """Rows being encoded: ids, counted spans, and what was dropped or cut (for the printed counts)."""

    def __init__(self, where: str, max_seq_len: int, too_long: str):
        self.where, self.max_seq_len, self.too_long = where, max_seq_len, too_long
        self.ids: list[list[int]] = []
        self.spans: list[list[list[int]]] = []
        self.kept: list[int] = []       # each kept row's index among the rows given
        self.long = self.cut = self.empty = 0
        self.longest = 0

    def add(self, index: int, ids: list[int], spans: list[tuple[int, int]], prompt_len: int | None = None) -> None:
        """One row; `prompt_len` (prompt/completion rows) lets truncation cut the prompt from the left."""
        if len(ids) > self.max_seq_len:
            self.long += 1
            self.longest = max(self.longest, len(ids))
            if self.too_long == "drop":
                return
            self.cut += 1
            if prompt_len is not None and prompt_len > self.max_seq_len - 1:
                shift = prompt_len - (self.max_seq_len - 1)
                ids = ids[shift:]
                spans = [(lo - shift, hi - shift) for lo, hi in spans]
            ids = ids[:self.max_seq_len]
            spans = [(max(lo, 1), min(hi, len(ids))) for lo, hi in spans]
        spans = [[lo, hi] for lo, hi in spans if hi > lo]
        if not spans:
            self.empty += 1
            return
        self.ids.append(ids)
        self.spans.append(spans)
        self.kept.append(index)

    def report(self, total: int) -> None:
        """The counts a user should see: rows dropped or cut for length, rows with nothing to train on."""
        if self.long:
            did = "dropped" if self.too_long == "drop" else "cut"
            hint = "too_long: truncate keeps them, cut" if self.too_long == "drop" else "raise max_seq_len to keep them whole"
            declared.note(f"{self.where}: {did} {self.long} of {total} rows ({self.long / total:.1%}) longer than "
                          f"max_seq_len={self.max_seq_len} (longest {self.longest} tokens); {hint}")
        if self.empty:
            declared.note(f"{self.where}: dropped {self.empty} of {total} rows with no token to train on left")
        if not self.ids:
            raise DataError(f"{self.where}: no row is left to train on (max_seq_len={self.max_seq_len}); raise "
                            "max_seq_len" + (", or set too_long: truncate" if self.too_long == "drop" else ""))

    def rows(self) -> dict:
        return {"ids": self.ids, "spans": self.spans}


def prompt_completion(pairs: list[tuple[str, str]], tokenizer, out: Encoded, train_on: str = "completion") -> Encoded:
    """Prompt (with the tokenizer's special tokens) then completion (without) and EOS."""
    for i, (prompt, completion) in enumerate(pairs):
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = head + tail
        out.add(i, ids, [(1 if train_on == "all" else max(len(head), 1), len(ids))], prompt_len=len(head))
    return out


def texts(rows: list[str], tokenizer, out: Encoded) -> Encoded:
    """Each text a row: its tokens (with special tokens) and EOS; every token but the first counts."""
    for i, text in enumerate(rows):
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        out.add(i, ids, [(1, len(ids))])
    return out


def blocks(stream: list[int], max_seq_len: int) -> dict:
    """A token stream cut into contiguous blocks of `max_seq_len` (the last may be shorter); every
    token of a block but its first counts."""
    cut = [stream[i:i + max_seq_len] for i in range(0, len(stream), max_seq_len)]
    cut = [b for b in cut if len(b) > 1]
    return {"ids": cut, "spans": [[[1, len(b)]] for b in cut]}


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered with the chat template, and each assistant turn's character span."""
    whole = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        upto = render(tokenizer, messages[:i + 1])
        if not (whole.startswith(before) and whole.startswith(upto) and upto.startswith(before)):
            raise DataError(f"{where}, message {i + 1}: the chat template renders earlier turns differently once "
                            "later ones follow, so the assistant's tokens cannot be located; use train_on: all, "
                            "or a model whose template keeps earlier turns as they were")
        spans.append((len(before), len(upto)))
    return whole, spans


def conversations(chats: list[list[dict]], wheres: list[str], tokenizer, out: Encoded,
                  train_on: str = "completion") -> Encoded:
    """Chats rendered with the tokenizer's chat template; the assistant turns count (or all)."""
    for i, (messages, where) in enumerate(zip(chats, wheres)):
        text, spans = assistant_spans(tokenizer, messages, where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if train_on == "all":
            counted = [(1, len(ids))]
        else:
            starts = [a for a, _ in offsets]
            counted = []
            for lo, hi in spans:
                first = next((t for t, s in enumerate(starts) if s >= lo), len(ids))
                last = next((t for t, s in enumerate(starts) if s >= hi), len(ids))
                counted.append((max(first, 1), last))
        out.add(i, ids, counted)
    return out


def check_template(tokenizer, model: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"model {model!r} has no chat template, so messages cannot be rendered; use a chat model, "
                        "or give the rows as style: prompt_completion")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"model {model!r}: its tokenizer gives no character offsets (not a fast tokenizer), so "
                        "assistant turns cannot be located")


def _normalise_reference(value, where: str) -> list[str]:
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: a reference is a string or a list of strings, got {value!r}")
    return answers


def _declared_rows(spec: dict, t, tokenizer, model: str) -> tuple[str, list, list[str]]:
    """(style, rows in that style, each row's locator) of a declared table."""
    style = spec.get("style")
    if style is None:
        style = userdata.detect_style(t.columns, spec.get("columns"), where=t.where)
    templates = spec.get("templates")
    if templates and style == "prompt_completion":
        rows = []
        for row, line in zip(t.rows, t.lines):
            try:
                rows.append((templates.get("prompt", "{prompt}").format_map(row),
                             templates.get("completion", "{completion}").format_map(row)))
            except KeyError as err:
                raise DataError(f"{t.where}: {t.unit} {line}: no column {err.args[0]!r} for task.templates "
                                f"(columns: {', '.join(t.columns)})") from None
        return style, rows, [f"{t.where}: {t.unit} {n}" for n in t.lines]
    rows = userdata.sft_rows(t, style, spec.get("columns"), spec.get("roles"), spec.get("message_keys"))
    if style == "instruction":
        if getattr(tokenizer, "chat_template", None):
            style = "messages"
            rows = [[{"role": "user", "content": ins + (f"\n\n{inp}" if inp else "")},
                     {"role": "assistant", "content": output}] for ins, inp, output in rows]
        else:
            style = "prompt_completion"
            rows = [((ALPACA if inp else ALPACA_NO_INPUT).format(instruction=ins, input=inp), output)
                    for ins, inp, output in rows]
    if style == "messages":
        check_template(tokenizer, model)
    return style, rows, [f"{t.where}: {t.unit} {n}" for n in t.lines]


def encode_declared(run, tokenizer) -> dict:
    """A declared `sft` run's rows: {train, eval, generate (or None)}."""
    spec = specs.loads(run.data)
    train_on, too_long = spec.get("train_on", "completion"), spec.get("too_long", "drop")
    out, keys = {}, {}
    for split, t in zip(("train", "eval"), declared.splits(spec, run.max_train_samples, run.max_eval_samples)):
        style, rows, wheres = _declared_rows(spec, t, tokenizer, run.model)
        keys[split] = [repr(r) for r in rows]
        enc = Encoded(t.where if "eval_fraction" not in spec else f"{t.where} ({split})", run.max_seq_len, too_long)
        if style == "text" and spec.get("blocks"):
            stream = [tok for text in rows for tok in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
            out[split] = blocks(stream, run.max_seq_len)
            continue
        if style == "text":
            texts(rows, tokenizer, enc)
        elif style == "prompt_completion":
            prompt_completion(rows, tokenizer, enc, train_on)
        else:
            conversations(rows, wheres, tokenizer, enc, train_on)
        enc.report(len(rows))
        out[split] = enc.rows()
        if split == "eval":
            out["generate"] = _generation(spec, style, t, rows, enc.kept, tokenizer)
    declared.warn_overlap(keys["train"], keys["eval"], specs.label(spec))
    return out


def _generation(spec: dict, style: str, t, rows: list, kept: list[int], tokenizer) -> dict | None:
    """What exact_match generates from, for the kept evaluation rows: prompts as token ids, references."""
    if "reference" not in spec:
        return None
    prompts, references = [], []
    for i in kept:
        if t.rows[i].get(spec["reference"]) is None:
            raise DataError(f"{t.at(i)}: no reference in column {spec['reference']!r} (task.reference)")
        references.append(_normalise_reference(t.rows[i][spec["reference"]], t.at(i)))
        if style == "prompt_completion":
            prompts.append(tokenizer(rows[i][0])["input_ids"])
        elif style == "messages":
            last = max(j for j, m in enumerate(rows[i]) if m["role"] == "assistant")
            prompts.append(tokenizer(render(tokenizer, rows[i][:last], generation_prompt=True),
                                     add_special_tokens=False)["input_ids"])
        else:
            raise DataError(f"task.reference: exact_match generates from a prompt; style {style} has none")
    return {"prompts": prompts, "references": references, "match": spec.get("match", "exact"),
            "stop": spec.get("stop", [])}


def encode_gsm8k_preset(run, data_dir: str | None, tokenizer) -> dict:
    """The `gsm8k` preset: its question/answer rows as prompt/completion, rows too long truncated."""
    out = {}
    for split, limit in (("train", run.max_train_samples), ("eval", run.max_eval_samples)):
        qa = lm_data.read_gsm8k(split, data_dir, max_rows=limit)
        enc = prompt_completion([(lm_data.gsm8k_prompt(q.question), " " + q.answer) for q in qa], tokenizer,
                                Encoded(f"gsm8k {split}", run.max_seq_len, "truncate"))
        out[split] = enc.rows()
        if split == "eval":
            out["generate"] = {"prompts": [tokenizer(lm_data.gsm8k_prompt(q.question))["input_ids"] for q in qa],
                               "references": [[q.answer] for q in qa], "match": "final_number",
                               "stop": [GSM8K_STOP]}
    return out


def encode_wikitext_preset(run, data_dir: str | None, tokenizer) -> dict:
    """The `wikitext2` preset: each split's text one stream cut into blocks."""
    out = {"generate": None}
    for split, limit in (("train", run.max_train_samples), ("eval", run.max_eval_samples)):
        text, where = lm_data.wikitext_file(split, data_dir)
        if split == "train" and where.endswith("valid.txt"):
            declared.note(f"wikitext2: no train.txt, training on {where}")
        rows = blocks(tokenizer(text, add_special_tokens=False)["input_ids"], run.max_seq_len)
        out[split] = {key: value[:limit] for key, value in rows.items()} if limit else rows
    return out


def normalise_answer(text: str) -> str:
    """`match: exact`: surrounding whitespace dropped, inner runs of whitespace made one space, case folded."""
    return " ".join(text.split()).casefold()


def matches(generated: str, references: list[str], match: str) -> bool:
    """Whether a generation equals one of the acceptable references under `match`."""
    if match == "final_number":
        return any(lm_data.exact_match(generated, ref) for ref in references)
    return any(normalise_answer(generated) == normalise_answer(ref) for ref in references)
