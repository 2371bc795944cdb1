"""Shared fixtures: the real MiniLM weights and real SST-2 rows, loaded once per session."""

import copy
import os
from pathlib import Path

# Tests never reach a hub, and read the real data laid beside the checkout.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LORAINIT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

import pytest  # noqa: E402
import torch  # noqa: E402

from lorainit import models  # noqa: E402
from lorainit.tasks import glue  # noqa: E402
from lorainit.tasks.classification import collate  # noqa: E402

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="session")
def _minilm():
    return models.load("minilm", "classification", num_labels=2, **NO_DROPOUT)


@pytest.fixture
def minilm(_minilm):
    """A fresh (model, tokenizer) pair: MiniLM with a 2-way head, base dropout off."""
    model, tokenizer = _minilm
    torch.manual_seed(0)
    return copy.deepcopy(model).eval(), tokenizer


@pytest.fixture(scope="session")
def sst2_rows():
    """The first 8 rows of the real SST-2 dev set: (texts, labels)."""
    ex = glue.read("sst2", "eval", max_rows=8)
    return ex


@pytest.fixture
def sst2_batch(minilm, sst2_rows):
    """Those rows tokenised and padded: (batch dict, labels tensor)."""
    _, tokenizer = minilm
    ids, type_ids = glue.encode(sst2_rows, tokenizer, 128)
    return collate(ids, tokenizer.pad_token_id, type_ids), torch.tensor(sst2_rows.labels)
