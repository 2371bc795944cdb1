"""A training step reads the device once, and a task's forward not at all.

On a GPU every read of a device tensor on the host (`.item()`, `.tolist()`, `.cpu()`, a boolean
mask, `nonzero`, `bincount`) waits for all the work queued before it, so the host stops feeding
the GPU. Here the batch's device tensors are a tensor subclass that counts such reads, and every
tensor computed from them is one too: a read anywhere downstream of the batch, in the model or in
the loss, is counted, on a CPU as it would happen on a GPU. The layouts are worked out from the
host copies the batch keeps (`tasks.base.OnDevice`), which are plain tensors.

What this cannot see: work outside `__torch_function__` (autograd's backward, which runs in
C++), the optimiser and loss scaler on plain parameters, and host-to-device copies (on CUDA the
batch's are pinned and asynchronous). On a GPU the kit's `syncs` column counts all of them.
"""

from __future__ import annotations

import pytest
import torch

from conftest import needs_data
from lorainit.config import RunConfig
from lorainit.tasks import causal_lm
from lorainit.tasks.base import Forward, OnDevice
from lorainit.train import PackTrainer

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu,
         torch.Tensor.nonzero, torch.nonzero, torch.Tensor.bincount, torch.bincount,
         torch.Tensor.masked_select, torch.masked_select, torch.Tensor.unique, torch.unique,
         torch.Tensor.repeat_interleave, torch.repeat_interleave}


class DeviceTensor(torch.Tensor):
    """A tensor standing for one on the device: each read of its values on the host is logged."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if func in READS and not (func in (torch.Tensor.repeat_interleave, torch.repeat_interleave)
                                  and "output_size" in kwargs):
            cls.reads.append(name)
        elif func is torch.Tensor.to and any(str(a) == "cpu" for a in args[1:]):
            # a copy to the host named as such; `.to(device=...)` to the model's own device (which
            # transformers does with masks) is a copy on the device, but here both are the CPU
            cls.reads.append("to(cpu)")
        elif func is torch.Tensor.__getitem__ and _has_bool_index(args[1]):
            cls.reads.append("boolean index")
        return super().__torch_function__(func, types, args, kwargs)


def _has_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _on_device(batch: OnDevice) -> OnDevice:
    """The batch with its device tensors replaced by logging ones (the host copies stay plain)."""
    for key in batch:
        batch[key] = batch.host[key].clone().as_subclass(DeviceTensor)
    return batch


def _reads(fn) -> list[str]:
    DeviceTensor.reads = []
    fn()
    return list(DeviceTensor.reads)


def _trainer(**fields) -> PackTrainer:
    base = dict(max_steps=4, batch_size=2, max_train_samples=24, max_eval_samples=8)
    runs = [RunConfig.from_dict(base | fields | {"seed": seed, "init": init, "lr": lr})
            for seed, init, lr in ((0, "a", 1e-3), (1, "b", 3e-3), (0, "b", 1e-3))]
    return PackTrainer(runs, show_progress=False)


def _forward_reads(trainer: PackTrainer, shared: bool = False) -> list[str]:
    active = list(range(trainer.K))
    batch, lengths = trainer._batch(active)
    trainer.state.set_batch(active, lengths)
    trainer.model.train()
    forward = Forward(active, probing=False, shared_rows=shared)
    return _reads(lambda: trainer.task.loss(trainer.state, _on_device(batch), forward).means())


def _step_reads(trainer: PackTrainer) -> list[str]:
    stack = trainer.task.stack
    trainer.task.stack = lambda batches, device: (lambda b: (_on_device(b[0]), b[1]))(stack(batches, device))
    try:
        return _reads(lambda: trainer.train_step(log=False))
    finally:
        del trainer.task.stack


def test_a_classification_step_reads_the_device_once(glue_data):
    """MiniLM on SST-2, its token-wise work on real tokens: the layout comes from the host mask."""
    trainer = _trainer(model="minilm", task="sst2", dropout=0.1)
    assert trainer.task.unpadded
    assert _forward_reads(trainer) == []
    # one seed, so every run holds the same rows: the embeddings and first projections shared
    one_seed = PackTrainer([RunConfig.from_dict(r.to_dict() | {"seed": 0}) for r in trainer.runs],
                           show_progress=False)
    assert _forward_reads(one_seed, shared=True) == []
    assert _step_reads(trainer) == ["cpu", "tolist"]  # the losses and the token count, together


@pytest.mark.parametrize("task", ["gsm8k", "wikitext2"])
def test_a_decoder_step_reads_the_device_once(task, glue_data, monkeypatch):
    """SmolLM2 on GSM8K (uneven rows: padding-free) and WikiText-2 (blocks of one length: padded):
    which tokens count, and whose, comes from the host labels."""
    monkeypatch.setattr(causal_lm, "PADDING_FREE", True)
    needs_data({"gsm8k": "gsm8k", "wikitext2": "wikitext-2"}[task])
    trainer = _trainer(model="smollm2-135m", task=task, max_seq_len=200 if task == "gsm8k" else 48, dropout=0.1)
    assert trainer.task.padding_free is (task == "gsm8k")
    assert _forward_reads(trainer) == []
    assert _step_reads(trainer) == ["cpu", "tolist"]


def test_the_logging_tensor_counts_what_a_step_would_wait_for():
    """The check itself: each kind of read is seen, and plain arithmetic is not."""
    x = torch.arange(6.0).as_subclass(DeviceTensor)
    assert _reads(lambda: (x * 2 + 1).sum()) == []
    assert _reads(lambda: x[x > 2]) == ["boolean index"]
    assert _reads(lambda: (x > 2).nonzero()) == ["nonzero"]
    assert _reads(lambda: x.sum().item()) == ["item"]
    assert _reads(lambda: x.to("cpu")) == ["to(cpu)"]
    assert _reads(lambda: torch.bincount(x.long())) == ["bincount"]
