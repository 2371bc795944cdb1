"""A long run's history stays bounded: metric rows stream into the store, and a checkpoint holds
only what continuing needs, so its size does not grow with the steps taken.

(`benchmarks/history.py` measures the same over 50,000 steps, with write times and RSS.)
"""

from pathlib import Path

import pytest
import torch

from lorainit import models
from lorainit.config import RunConfig
from lorainit.engine import checkpoint
from lorainit.sweeps.store import MetricWriter, Store
from lorainit.train import PackTrainer

pytestmark = pytest.mark.usefixtures("glue_data")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    _, tokenizer = models.load("minilm", "classification")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "bert"
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _train(model: str, folder: Path, steps: int, sink: bool) -> dict[int, int]:
    """Checkpoint sizes by step of a 2-run pack trained `steps` steps, a checkpoint every 200."""
    runs = [RunConfig.from_dict(dict(model=model, task="sst2", max_steps=steps, max_train_samples=400,
                                     max_eval_samples=32, max_seq_len=32, init=init, lr=1e-3, eval_every=500,
                                     checkpoint_every=200, log_every=1)) for init in "ab"]
    sizes = {}
    save = checkpoint.save

    def measured_save(where, step, state):
        path = save(where, step, state)
        sizes[step] = path.stat().st_size
        return path

    Store(folder / "sweep").close()
    writer = MetricWriter(folder / "sweep") if sink else None
    checkpoint.save, previous = measured_save, checkpoint.save
    try:
        PackTrainer(runs, show_progress=False).run(checkpoint_dir=folder / "ckpt", sink=writer)
    finally:
        checkpoint.save = previous
        if writer is not None:
            writer.close()
    if sink:
        db = Store(folder / "sweep").db
        assert db.execute("SELECT COUNT(*) FROM metrics WHERE name = 'train_loss'").fetchone()[0] == 2 * steps
    return sizes


def test_a_checkpoint_does_not_grow_with_the_steps_when_rows_stream_to_the_store(tiny_bert, tmp_path):
    sizes = _train(tiny_bert, tmp_path / "streamed", 1000, sink=True)
    # the same tensors and a few counters at every step: equal to within a few bytes of pickled numbers
    assert max(sizes.values()) / min(sizes.values()) < 1.01, sizes
    # rows kept on the results grow every checkpoint: the history the store now takes
    held = _train(tiny_bert, tmp_path / "held", 600, sink=False)
    assert held[600] - held[200] > 20 * 2 * 400, held  # at least 20 bytes for each of the 800 rows since
