"""Causal language modelling and supervised finetuning on the decoder LLMs a pack serves exactly
(`lorainit.decoders`: Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, Phi-3, GPT-2); any other is refused.

One decoder path for `sft` (rows a run declares) and its presets `gsm8k` and `wikitext2`: rows are
encoded once (`tasks.sft_data`, cached by `tasks.declared.encoded`) as token ids and the spans of
positions whose token counts. Each run's loss is the cross-entropy summed over its own counted
tokens, counted in tokens. Rows are right-padded with the tokenizer's pad id and masked, so
positions, the causal mask and every count are what the run would have alone. Where rows are uneven
(GSM8K, chats), a transformers decoder runs padding-free instead: the real tokens end to end,
positions restarted per row, attention on the padded layout (`engine.packing.FlatLayout`).

The output projection never sees the positions that do not count, and runs over the counted ones
in chunks of `LOSS_CHUNK` tokens, each chunk's gradient in the hidden states formed with its loss:
neither forward nor backward holds more than one chunk's logits, and none is computed twice (over
a 49k vocabulary, the K runs' full logits would be the largest tensor by far).

Evaluation reports `eval_loss` (the mean counted-token loss, every counted token weighing the same),
`perplexity` (its exp) where the task reports it, and `exact_match` where the rows name references:
one batched greedy generation of every active run (`generate`), scored by `sft_data.matches`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from lorainit import decoders, models, slices
from lorainit.engine.packing import FlatLayout, causal_mask
from lorainit.tasks import declared, lm_data, sft_data, spec as specs
from lorainit.tasks.base import Forward, Losses, OnDevice, Task, eval_budget, host_tensor, stack_padded, token_chunks

IGNORE = -100           # a label that does not count
LOSS_CHUNK = 1024       # counted tokens per projection + cross-entropy chunk (49k vocab: ~200 MB in fp32)
EVAL_TOKENS = 8192      # tokens per evaluation forward, over all active runs, on a CPU (`base.eval_budget`)
GENERATE_ROWS = 64      # rows (runs x questions) per generation batch (a 7B model's KV cache bounds it on a GPU)
PADDING_FREE = True     # transformers decoders train on their real tokens only (`packing.FlatLayout`)...
PADDING_FREE_ABOVE = 0.05  # ...when padding to the longest row would be more than this share of a batch


@dataclass
class Rows:
    ids: list[list[int]]              # token ids per row
    spans: list[list[list[int]]]      # per row, the [lo, hi) positions whose token counts (predicted from the one before)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def start(self) -> list[int]:
        """Each row's first counted position."""
        return [spans[0][0] for spans in self.spans]

    def padding_share(self) -> float:
        """The share of padding were every row padded to the longest."""
        lengths = [len(x) for x in self.ids]
        return 1.0 - sum(lengths) / (len(lengths) * max(lengths)) if lengths else 0.0


def encode_gsm8k(rows: list[lm_data.QA], tokenizer, max_seq_len: int) -> Rows:
    """GSM8K rows as the `gsm8k` preset encodes them: prompt (with the tokenizer's special tokens)
    then ' {answer}' and EOS (without); a prompt too long is cut from the left, so that at least one
    answer token fits, the answer from the right."""
    enc = sft_data.prompt_completion([(lm_data.gsm8k_prompt(q.question), " " + q.answer) for q in rows], tokenizer,
                                     sft_data.Encoded("gsm8k", max_seq_len, "truncate"))
    return Rows(enc.ids, enc.spans)


def encode_blocks(text: str, tokenizer, max_seq_len: int) -> Rows:
    """The text as one token stream cut into contiguous blocks of `max_seq_len` (the last may be
    shorter); every token of a block but its first counts."""
    rows = sft_data.blocks(tokenizer(text, add_special_tokens=False)["input_ids"], max_seq_len)
    return Rows(rows["ids"], rows["spans"])


def encode_run(run, tokenizer, say: bool = False) -> dict:
    """The run's rows encoded once ({train, eval: {ids, spans}, generate}), from the cache when there."""
    def build() -> dict:
        if run.data is not None:
            return sft_data.encode_declared(run, tokenizer)
        if slices.base(run.task) == "gsm8k":
            return sft_data.encode_gsm8k_preset(run, _data_dir(run), tokenizer)
        return sft_data.encode_wikitext_preset(run, _data_dir(run), tokenizer)

    return declared.encoded(run, tokenizer, "causal_lm", build, say)


def collate(rows: Rows, index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask, and labels: the next token where it counts, else IGNORE."""
    width = max(len(rows.ids[i]) for i in index)
    input_ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    labels = torch.full((len(index), width), IGNORE, dtype=torch.long)
    for j, i in enumerate(index):
        x = rows.ids[i]
        input_ids[j, :len(x)] = torch.tensor(x)
        mask[j, :len(x)] = 1
        for lo, hi in rows.spans[i]:
            labels[j, lo - 1:hi - 1] = torch.tensor(x[lo:hi])  # position t predicts token t + 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `hidden @ weight.T` against `targets`, chunk by chunk, with the
    gradient in the hidden states formed in the same pass: each chunk's logits exist once, for its
    loss (minus the target's log-softmax) and for its gradient ((softmax - onehot) @ weight).
    The backward only scales those stored gradients, (N, d), by the upstream per-token weights, so
    it neither holds nor recomputes logits. The projection is frozen (a decoder's output embedding).

    With `softcap` (Gemma 2's final logit softcapping) the logits are softcap * tanh(z / softcap)
    of the projection z, as the model computes them, and the gradient carries tanh's derivative."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, softcap):
        losses = hidden.new_empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        w = weight.to(hidden.dtype)
        for i in range(0, hidden.shape[0], chunk):
            logits = hidden[i:i + chunk] @ w.T                                   # (c, V)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            capped = None
            if softcap is not None:
                capped = torch.tanh(logits / softcap)                            # (c, V)
                logits = capped * softcap
            y = targets[i:i + chunk]
            logp = torch.log_softmax(logits, dim=-1)                             # (c, V), one fused pass
            del logits
            losses[i:i + chunk] = -logp.gather(1, y[:, None]).squeeze(1)
            if grad is not None:
                probs = logp.exp_()                                              # softmax, in place
                probs[torch.arange(len(y), device=y.device), y] -= 1.0           # d loss / d logits
                if capped is not None:
                    probs.mul_(1.0 - capped.square_())                           # d logits / d z
                grad[i:i + chunk] = (probs.to(w.dtype) @ w).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None, None


def token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 chunk: int = LOSS_CHUNK, softcap: float | None = None) -> torch.Tensor:
    """(N,) cross-entropy of the projection `hidden @ weight.T` (softcapped with `softcap`) against
    `targets`, `chunk` rows at a time: only one chunk's logits exist at once, forward or backward.
    `weight` must be frozen."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("the chunked loss takes a frozen output projection")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, softcap)


def _data_dir(run) -> str | None:
    """The folder a run reads: a shipped slice's own, else its `data_dir` (None: LORAINIT_DATA or the hub)."""
    return slices.data_dir(run.task, run.data_dir)


_STOPPING: dict[tuple, object] = {}  # (tokenizer, its size, stop strings) -> criteria; see CausalLM._stops


class CausalLM(Task):
    """A decoder LLM trained on its counted tokens: GSM8K answers or WikiText-2 blocks."""

    def __init__(self, run, model_overrides: dict | None = None):
        super().__init__(run, model_overrides)
        declared.check_unchanged(run)
        encoded = encode_run(run, models.tokenizer(run.model))
        self.model, self.tokenizer, self.fresh_weights = self.load_model(run, "causal_lm", model_overrides)
        decoders.check(self.model, run.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.train = Rows(encoded["train"]["ids"], encoded["train"]["spans"])
        self.eval = Rows(encoded["eval"]["ids"], encoded["eval"]["spans"])
        self.generation = encoded.get("generate")  # exact_match's prompts and references, or None
        # Padding-free pays where rows are uneven (GSM8K: 1.29x over right padding, measured); on
        # rows of one length (WikiText-2's blocks) its scatter and gather only cost (0.97x). Decided
        # from the training rows, which every run of the pack and each run alone share.
        self.padding_free = (PADDING_FREE and hasattr(self.model, "set_attn_implementation")
                             and self.train.padding_share() > PADDING_FREE_ABOVE)

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return collate(self.train, rows, self.pad_id)

    def stack(self, batches, device):
        return stack_padded(batches, {"input_ids": self.pad_id, "labels": IGNORE}, device)

    def token_mask(self, batch):
        return batch["attention_mask"].bool()

    def label_mask(self, batch):
        """The tokens that are targets: labels here are the next token's, so token t counts where
        position t - 1's label does (Hugging Face's own labels mark the targets in place)."""
        counts = batch["labels"] != IGNORE
        target = torch.zeros_like(counts)
        target[:, 1:] = counts[:, :-1]
        return batch["attention_mask"].bool() & target

    def _sums(self, state, batch: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each of the n runs' summed counted-token loss and its count, on a stacked batch.

        Which tokens count, and whose they are, is worked out on the host from the batch's host
        labels: the device sees only index gathers, never a boolean mask or a count it would have
        to report back. Each run's sum is the reduction of its own block of tokens, as alone; no
        atomic adds, so it is the same on every call on a GPU too."""
        model = state.pack.model
        device = batch["labels"].device
        labels = host_tensor(batch, "labels")                              # (n*b, T), host
        rows, width = labels.shape
        if self.padding_free:
            hidden, slots = self._hidden_flat(state, batch, n)            # (N, d), (N,) host slots
        else:
            hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=self._mask(batch),
                                      use_cache=False).last_hidden_state.flatten(0, 1)  # (n*b*T, d)
            slots = None
        flat = labels.flatten() if slots is None else labels.flatten()[slots]
        counted = (flat != IGNORE).nonzero().squeeze(1)                   # rows of `hidden` that count
        where = counted if slots is None else slots[counted]              # their slots in the batch
        owner = where // (rows // n * width)                              # their runs: blocks of slots
        counts = torch.bincount(owner, minlength=n)                       # (n,)
        targets = batch["labels"].flatten().index_select(0, where.to(device, non_blocking=True))
        losses = token_losses(hidden.index_select(0, counted.to(device, non_blocking=True)),
                              model.get_output_embeddings().weight, targets,
                              softcap=getattr(model.config, "final_logit_softcapping", None))  # (N,)
        # each run's tokens are one block (runs are stacked in order): its sum is the reduction it
        # would have alone, over the same tokens
        sums = torch.stack([part.sum() for part in losses.split(counts.tolist())])
        return sums, counts.to(device, non_blocking=True)

    @staticmethod
    def _mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The attention mask to give a padded decoder forward, decided on the host: None when no
        row is padded (causal attention alone), else (rows, 1, T, T), causal and real keys only.
        Given the 2-d mask, transformers would ask the device whether every entry is 1."""
        if host_tensor(batch, "attention_mask").bool().all():
            return None
        return causal_mask(batch["attention_mask"].bool())

    def _hidden_flat(self, state, batch: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The padding-free forward: the real tokens of the stacked rows end to end, (1, N), each
        row's positions restarted at 0, attention on the padded layout (`packing.FlatLayout`).
        Returns the final hidden states (N, d) and, on the host, each one's flat slot (N,) in the
        padded (rows, width) batch."""
        device = batch["attention_mask"].device
        host = host_tensor(batch, "attention_mask").bool()  # the layout is worked out on the host
        rows, width = host.shape
        slots = FlatLayout.of(host).index
        layout = FlatLayout(slots.to(device, non_blocking=True), batch["attention_mask"].bool())
        per_row = host.sum(1)
        positions = (slots % width).to(device, non_blocking=True)
        # a 4-d attention_mask passes through transformers' mask building untouched; the pack's
        # attention reads the layout instead
        state.flat = layout
        state.set_row_counts(per_row.view(n, -1).sum(1).tolist())
        try:
            hidden = state.pack.model.base_model(
                input_ids=batch["input_ids"].flatten().index_select(0, layout.index)[None],
                attention_mask=layout.keep[:, None, None, :], position_ids=positions[None],
                use_cache=False).last_hidden_state[0]
        finally:
            state.flat = None
            state.set_row_counts(None)
        if layout.calls == 0:
            raise RuntimeError(f"{type(state.pack.model).__name__} does not call its attention through the "
                               "attention interface, so it cannot run padding-free")
        return hidden, slots

    def loss(self, state, batch, forward: Forward) -> Losses:
        return Losses(*self._sums(state, batch, len(forward.runs)))

    def evaluate(self, state, runs: list[int]) -> list[dict[str, float]]:
        results = []
        reported = {m.name for m in self.metrics}
        for loss in self._eval_losses(state, len(runs)):
            metrics = {"eval_loss": loss}
            if "perplexity" in reported:
                metrics["perplexity"] = math.exp(loss) if loss < 700 else float("inf")
            results.append(metrics)
        if self.generation is not None and "exact_match" in reported:
            wanted = self.generation
            texts = self.generate(state, len(runs), wanted["prompts"], self.run.max_new_tokens, wanted["stop"])
            for j, generated in enumerate(texts):
                hits = sum(sft_data.matches(t, refs, wanted["match"]) for t, refs in zip(generated, wanted["references"]))
                results[j]["exact_match"] = hits / len(wanted["references"])
        return results

    def trivial_losses(self, state, runs: list[int]) -> list[float]:
        """The runs' own eval loss before any update, without generating."""
        return self._eval_losses(state, len(runs))

    def _eval_losses(self, state, n: int) -> list[float]:
        """Each of the n active runs' mean loss over the evaluation rows' counted tokens."""
        device = state.pack.parameters()[0].device
        order = sorted(range(len(self.eval)), key=lambda i: len(self.eval.ids[i]))
        sums = torch.zeros(n, dtype=torch.float64, device=device)
        counts = torch.zeros(n, dtype=torch.float64, device=device)
        for chunk in token_chunks(order, [len(x) for x in self.eval.ids], n, eval_budget(EVAL_TOKENS, device)):
            batch = collate(self.eval, chunk, self.pad_id)
            s, c = self._sums(state, OnDevice({k: v.repeat(n, 1) for k, v in batch.items()}, device), n)
            sums += s.double()
            counts += c.double()
        sums, counts = sums.cpu(), counts.cpu()  # one read of the device per evaluation
        return [float(sums[j] / counts[j]) for j in range(n)]

    def generate(self, state, n: int, prompts: list[list[int]], max_new_tokens: int,
                 stop: list[str] = ()) -> list[list[str]]:
        """Greedy continuations of `prompts` (token ids) by each of the n active runs: texts[run][prompt].

        One batched generation per chunk of prompts, every run's copy of the rows through its own
        adapters, left-padded (transformers derives the positions from the mask), with a KV cache;
        a row stops at EOS, at one of the `stop` strings (cut there), or after `max_new_tokens`."""
        model = state.pack.model
        device = state.pack.parameters()[0].device
        encoded = prompts
        stop = list(stop)
        per_chunk = max(1, GENERATE_ROWS // n)
        texts: list[list[str]] = [[] for _ in range(n)]
        chunks = range(0, len(encoded), per_chunk)
        for lo in chunks:  # no display of its own: the caller's one display says it is evaluating
            part = encoded[lo:lo + per_chunk]
            width = max(len(x) for x in part)
            ids = torch.full((len(part), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, x in enumerate(part):  # left padding: every prompt ends where generation starts
                ids[i, width - len(x):] = torch.tensor(x)
                mask[i, width - len(x):] = 1
            out = model.generate(input_ids=ids.repeat(n, 1).to(device), attention_mask=mask.repeat(n, 1).to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id,
                                 eos_token_id=self.tokenizer.eos_token_id, stopping_criteria=self._stops(stop))
            new = out[:, width:].view(n, len(part), -1)
            for j in range(n):
                for row in new[j].tolist():
                    if self.tokenizer.eos_token_id in row:
                        row = row[:row.index(self.tokenizer.eos_token_id)]
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    for marker in stop:
                        text = text.split(marker)[0]
                    texts[j].append(text)
        return texts

    def _stops(self, stop: list[str]):
        """The criteria that end a row at one of the `stop` strings, built once per tokenizer and
        strings in a process: given the strings themselves, transformers rebuilds its table over
        the whole vocabulary on every call (0.8 s for SmolLM2's 49k tokens, each evaluation of
        each pack). The criteria hold no state between calls."""
        if not stop:
            return None
        key = (self.tokenizer.name_or_path, len(self.tokenizer), tuple(stop))
        if key not in _STOPPING:
            from transformers import StoppingCriteriaList, StopStringCriteria

            if len(_STOPPING) >= 8:
                _STOPPING.pop(next(iter(_STOPPING)))
            _STOPPING[key] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stop))])
        return _STOPPING[key]

    @classmethod
    def skeleton(cls, run):
        return models.skeleton(run.model, "causal_lm")

    @classmethod
    def check_model(cls, run, skeleton) -> None:
        if skeleton is not None:
            decoders.check(skeleton, run.model)

    @classmethod
    def check_data(cls, run) -> None:
        """Every row the run will read, checked and tokenised (into the cache), before anything is written."""
        declared.check(run, encode_run)

    @classmethod
    def train_lengths(cls, run) -> list[int]:
        return [len(ids) for ids in encode_run(run, models.tokenizer(run.model))["train"]["ids"]]

    @classmethod
    def data_files(cls, run) -> dict[str, str]:
        return declared.files_of(run, lambda: lm_data.files(slices.base(run.task), _data_dir(run)))

    @classmethod
    def data_size(cls, run, split: str) -> tuple[int, float] | None:
        """(rows, tokens per row) from the local files, the tokens guessed at ~4 characters each."""
        if run.data is not None:
            table = declared.split_for_estimate(run, split)
            if table is None:
                return None
            sample = table.rows[:200]
            chars = sum(len(json.dumps(row)) for row in sample) / max(1, len(sample))
            return len(table.rows), min(run.max_seq_len, chars / 4)
        if lm_data.data_root(slices.base(run.task), _data_dir(run)) is None:
            return None
        try:
            if slices.base(run.task) == "gsm8k":
                rows = lm_data.read_gsm8k(split, _data_dir(run))
                tokens = sum(len(r.question) + len(r.answer) + 20 for r in rows) / len(rows) / 4
                count = len(rows)
            else:
                text, _ = lm_data.wikitext_file(split, _data_dir(run))
                count, tokens = max(1, len(text) // 4 // run.max_seq_len), run.max_seq_len
        except Exception:  # noqa: BLE001 - an estimate, never an error
            return None
        limit = run.max_train_samples if split == "train" else run.max_eval_samples
        return min(count, limit or count), min(run.max_seq_len, tokens)
