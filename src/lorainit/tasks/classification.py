"""Sequence classification: a classifier head on an encoder (or decoder), one label per row.

One path for every classification task: the GLUE tasks (`sst2`, `qnli`, `mnli`) are presets of
it, their rows read from GLUE's layout (`tasks.glue`), and `classification` reads the rows a run
declares (`tasks.spec`: one text column or a pair, integer or string labels). Either way the rows
are tokenised once (`tasks.declared.encoded`), each run's loss is the cross-entropy summed over
its rows, counted in rows, and evaluation reports `accuracy`, `macro_f1` (for a declared task) and
`eval_loss` (the mean cross-entropy) on the evaluation rows. BERT and RoBERTa classifiers run
their token-wise work on real tokens only (`engine.unpadded`); other models run their own padded
forward.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from lorainit import models, slices
from lorainit.engine import unpadded
from lorainit.errors import BadInput
from lorainit.tasks import declared, glue, spec as specs, userdata
from lorainit.tasks.base import Forward, Losses, OnDevice, Task, eval_budget, host_tensor, stack_padded, token_chunks

# Evaluation forwards hold about this many tokens over all active runs on a CPU (rows sorted by
# length, so little padding): large enough for efficient matmuls, small enough to stay in cache
# and memory; more on a GPU (`base.eval_budget`).
EVAL_TOKENS = 4096


@dataclass
class Split:
    ids: list[list[int]]                 # token ids per row
    type_ids: list[list[int]] | None     # token type ids per row (BERT pairs), or None
    labels: torch.Tensor                 # (rows,)

    def __len__(self) -> int:
        return len(self.ids)


def collate(ids: list[list[int]], pad_id: int, type_ids: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its own longest row: input_ids, attention_mask (and token_type_ids)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if type_ids is not None:
        tt = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(type_ids):
            tt[i, :len(x)] = torch.tensor(x)
        batch["token_type_ids"] = tt
    return batch


def examples(run) -> tuple[glue.Examples, glue.Examples, tuple]:
    """(training rows, evaluation rows, the label names in id order) the run reads: a GLUE preset's
    first `max_*_samples` rows, or the declared data's (its label set read from the whole training
    split unless `labels` gives it; a label outside the set is an error, never a new class)."""
    if run.data is None:
        train = glue.read(run.task, "train", run.data_dir, max_rows=run.max_train_samples)
        evaluated = glue.read(run.task, "eval", run.data_dir, max_rows=run.max_eval_samples)
        return train, evaluated, glue.spec_of(run.task).labels
    spec = specs.loads(run.data)
    text, column = spec.get("text", ["text"]), spec.get("label", "label")
    labels = label_set(spec)
    out = []
    for split in declared.splits(spec, run.max_train_samples, run.max_eval_samples):
        texts, raw = userdata.classification_rows(split, text, column)
        out.append(glue.Examples(texts, userdata.label_ids(raw, labels, split, column)))
    declared.warn_overlap([json.dumps(t) for t in out[0].texts], [json.dumps(t) for t in out[1].texts],
                          f"{specs.label(spec)}")
    return out[0], out[1], tuple(labels)


def label_set(spec: dict) -> tuple:
    """A declared task's labels in id order: `labels`, else every label of the training split. Every
    row of the training file is checked first, whichever split a held-out cut puts it in."""
    text, column = spec.get("text", ["text"]), spec.get("label", "label")
    userdata.classification_rows(declared.table(spec, "train"), text, column)
    whole, _ = declared.splits(spec, None, 1)
    _, values = userdata.classification_rows(whole, text, column)
    return userdata.label_set(values, spec.get("labels"), where=whole.where, column=column)


def num_labels(run) -> int:
    """The classifier's outputs: the preset's labels, or the declared set (read without tokenising)."""
    if run.data is None:
        return len(glue.spec_of(run.task).labels)
    return len(label_set(specs.loads(run.data)))


def encode_run(run, tokenizer, say: bool = False) -> dict:
    """The run's rows tokenised to `max_seq_len` (a pair truncates its longer side first), once:
    {split: {ids, type_ids, labels}, labels: names, prior_loss}, from the cache when there."""
    def build() -> dict:
        train, evaluated, labels = examples(run)
        out = {"labels": [str(y) for y in labels],
               "prior_loss": prior_loss(train.labels, evaluated.labels, len(labels))}
        for split, rows in (("train", train), ("eval", evaluated)):
            ids, type_ids = glue.encode(rows, tokenizer, run.max_seq_len)
            out[split] = {"ids": ids, "type_ids": type_ids, "labels": rows.labels}
        return out

    return declared.encoded(run, tokenizer, "classification", build, say)


def read_split(encoded: dict, split: str) -> Split:
    rows = encoded[split]
    return Split(rows["ids"], rows["type_ids"], torch.tensor(rows["labels"]))


def prior_loss(train_labels: list[int], eval_labels: list[int], num_labels: int) -> float:
    """Mean cross-entropy on `eval_labels` of the constant prediction p(y) = the training labels'
    frequencies (add-one smoothed, so that a label unseen in training costs a finite loss): the
    loss of a classifier that learned nothing from its inputs. Equal to the prior's entropy where
    both splits share one prior (ln 2 for a balanced binary task)."""
    counts = [1] * num_labels
    for y in train_labels:
        counts[y] += 1
    total = sum(counts)
    return -sum(math.log(counts[y] / total) for y in eval_labels) / len(eval_labels)


class Classification(Task):
    """A sequence classifier with `len(labels)` outputs, trained on a GLUE task's rows."""

    def __init__(self, run, model_overrides: dict | None = None):
        super().__init__(run, model_overrides)
        declared.check_unchanged(run)
        rows = encode_run(run, models.tokenizer(run.model))
        self.labels = rows["labels"]
        self.model, self.tokenizer, self.fresh_weights = self.load_model(
            run, "classification", model_overrides, num_labels=len(self.labels))
        self.pad_id = self.tokenizer.pad_token_id
        self.train = read_split(rows, "train")
        self.eval = read_split(rows, "eval")
        self.prior_loss = rows["prior_loss"]
        # BERT-family classifiers skip padding in every token-wise op (see engine/unpadded.py)
        self.unpadded = unpadded.supports(self.model)

    def rows_batch(self, split: Split, rows: list[int]) -> dict[str, torch.Tensor]:
        """Rows of `split` collated and right-padded to their own longest row, with their labels."""
        batch = collate([split.ids[i] for i in rows], self.pad_id,
                        [split.type_ids[i] for i in rows] if split.type_ids is not None else None)
        batch["labels"] = split.labels[rows]
        return batch

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return self.rows_batch(self.train, rows)

    def stack(self, batches, device):
        return stack_padded(batches, {"input_ids": self.pad_id}, device)

    def token_mask(self, batch):
        return batch["attention_mask"].bool()

    def logits(self, state, batch: dict[str, torch.Tensor], every_token: bool = False,
               shared: bool = False) -> torch.Tensor:
        """(rows, labels) of a stacked batch (its labels, if any, are ignored)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.unpadded:
            return unpadded.forward(state.pack.model, state, **inputs, every_token=every_token, shared=shared,
                                    host_mask=host_tensor(batch, "attention_mask"))
        return state.pack.model(**inputs).logits

    def loss(self, state, batch, forward: Forward) -> Losses:
        # probes read every token's features, and every layer's adapters through their forward
        logits = self.logits(state, batch, every_token=forward.probing, shared=forward.shared_rows)
        n = len(forward.runs)
        per_row = F.cross_entropy(logits.float(), batch["labels"], reduction="none").view(n, -1)  # (n, b)
        return Losses(per_row.sum(1), torch.full((n,), per_row.shape[1], device=per_row.device))

    def evaluate(self, state, runs: list[int]) -> list[dict[str, float]]:
        n = len(runs)
        device = state.pack.parameters()[0].device
        order = sorted(range(len(self.eval)), key=lambda i: len(self.eval.ids[i]))
        correct = torch.zeros(n, device=device)
        loss_sum = torch.zeros(n, device=device)
        predicted: list[list[torch.Tensor]] = [[] for _ in range(n)]  # each run's predictions, in `order`
        for rows in token_chunks(order, [len(x) for x in self.eval.ids], n, eval_budget(EVAL_TOKENS, device)):
            batch = self.rows_batch(self.eval, rows)
            y = batch.pop("labels").to(device)
            stacked = OnDevice({key: v.repeat(n, 1) for key, v in batch.items()}, device)
            logits = self.logits(state, stacked, shared=True).float().view(n, len(rows), -1)  # (n, b, C)
            guess = logits.argmax(-1)                                              # (n, b)
            correct += (guess == y).sum(1).float()
            for j in range(n):
                predicted[j].append(guess[j].cpu())
            loss_sum += F.cross_entropy(logits.transpose(1, 2), y.expand(n, -1), reduction="none").sum(1)
        correct, loss_sum = correct.cpu(), loss_sum.cpu()  # one read of the device per evaluation
        results = [{"accuracy": float(correct[j] / len(self.eval)), "eval_loss": float(loss_sum[j] / len(self.eval))}
                   for j in range(n)]
        if "macro_f1" in {m.name for m in self.metrics}:
            references = [self.eval.labels[i].item() for i in order]
            for j in range(n):
                results[j]["macro_f1"] = userdata.macro_f1(references, torch.cat(predicted[j]).tolist())
        return results

    def trivial_losses(self, state, runs: list[int]) -> list[float]:
        """Always predicting the training rows' label prior: no model needed."""
        return [self.prior_loss] * len(runs)

    @classmethod
    def trivial_loss_of(cls, run) -> float | None:
        try:
            train, evaluated, labels = examples(run)
        except BadInput:
            return None
        return prior_loss(train.labels, evaluated.labels, len(labels))

    @classmethod
    def check_data(cls, run) -> None:
        """Every row the run will read, checked and tokenised (into the cache), before anything is written."""
        declared.check(run, encode_run)

    @classmethod
    def train_lengths(cls, run) -> list[int]:
        return [len(ids) for ids in encode_run(run, models.tokenizer(run.model))["train"]["ids"]]

    @classmethod
    def data_files(cls, run) -> dict[str, str]:
        return declared.files_of(run, lambda: glue.files(run.task, run.data_dir))

    @classmethod
    def skeleton(cls, run):
        return models.skeleton(run.model, "classification", num_labels=num_labels(run))

    @classmethod
    def data_size(cls, run, split: str, sample: int = 200) -> tuple[int, float] | None:
        """(rows, mean tokens per row) of a split in a local data folder, the tokens guessed from the
        first rows' characters (about 4 per token, plus 2 special tokens); None without local files."""
        if run.data is not None:
            table = declared.split_for_estimate(run, split)
            if table is None:
                return None
            spec = specs.loads(run.data)
            texts = [[str(row.get(c) or "") for c in spec.get("text", ["text"])] for row in table.rows[:sample]]
            tokens = sum(len(" ".join(t)) for t in texts) / max(1, len(texts)) / 4 + 2
            return len(table.rows), min(run.max_seq_len, tokens)
        root = glue.glue_root(slices.data_dir(run.task, run.data_dir))
        if root is None:  # the hub: an estimate downloads nothing
            return None
        spec = glue.spec_of(run.task)
        path = root / spec.folder / f"{'train' if split == 'train' else spec.eval_split}.tsv"
        try:
            texts = glue.read(run.task, split, run.data_dir, max_rows=sample).texts
            with open(path, "rb") as f:
                rows = sum(1 for _ in f) - 1
        except (BadInput, OSError):
            return None
        limit = run.max_train_samples if split == "train" else run.max_eval_samples
        tokens = min(run.max_seq_len, sum(len(" ".join(t)) for t in texts) / len(texts) / 4 + 2)
        return min(rows, limit or rows), tokens
