"""Shared fixtures: the real MiniLM weights and real GLUE rows, loaded once per session.

Where the rows come from, first found: $LORAINIT_DATA (a folder holding glue/SST-2/, glue/QNLI/,
glue/MNLI/ as GLUE's TSV files), the data folder laid beside the checkout (../shared/data), or the
Hugging Face hub's GLUE parquet files, fetched once into the hub cache when the hub can be reached.
With none of them, the tests that need rows skip with one line saying how to provide them; under
CI=true they fail instead, since CI must run every test.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

# The tests themselves never reach a hub (the one fetch of GLUE rows happens before, in a child).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "data"
if not os.environ.get("LORAINIT_DATA") and (_BESIDE / "glue").is_dir():
    os.environ["LORAINIT_DATA"] = str(_BESIDE)

import pytest  # noqa: E402
import torch  # noqa: E402

from lorainit import models  # noqa: E402
from lorainit.tasks import glue  # noqa: E402
from lorainit.tasks.classification import collate  # noqa: E402

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
HOW = "set LORAINIT_DATA to a folder holding glue/SST-2/, glue/QNLI/, glue/MNLI/ (GLUE TSVs), or reach the hub"


def _fetch_from_hub() -> str | None:
    """Fetch every GLUE file the tests read into the hub cache, in a child process that may go
    online; None when that worked, else why not."""
    files = [f"{task}/{split}-00000-of-00001.parquet"
             for task, spec in glue.TASKS.items() for split in ("train", spec.hub_eval_split)]
    code = ("import sys\nfrom huggingface_hub import hf_hub_download\n"
            f"for name in {files!r}:\n    hf_hub_download({glue.HUB_DATASET!r}, name, repo_type='dataset')\n")
    env = os.environ | {"HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "10", "HF_HUB_DOWNLOAD_TIMEOUT": "30"}
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "the hub did not answer in time"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"the hub could not be reached ({last.split(':')[0].rpartition('.')[2]})"  # the error's class
    return None


@pytest.fixture(scope="session")
def glue_data() -> str:
    """'folder' or 'hub': where this session's GLUE rows come from. Skips (fails under CI) without."""
    folder = os.environ.get("LORAINIT_DATA")
    if folder:
        missing = [spec.folder for spec in glue.TASKS.values() if not (Path(folder) / "glue" / spec.folder).is_dir()]
        if not missing:
            return "folder"
        why = f"LORAINIT_DATA={folder} holds no glue/{missing[0]}/"
    else:
        why = _fetch_from_hub()
        if why is None:
            return "hub"
    message = f"no GLUE rows: {why}; {HOW}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


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
def sst2_rows(glue_data):
    """The first 8 rows of the real SST-2 dev set: (texts, labels)."""
    ex = glue.read("sst2", "eval", max_rows=8)
    return ex


@pytest.fixture
def sst2_batch(minilm, sst2_rows):
    """Those rows tokenised and padded: (batch dict, labels tensor)."""
    _, tokenizer = minilm
    ids, type_ids = glue.encode(sst2_rows, tokenizer, 128)
    return collate(ids, tokenizer.pad_token_id, type_ids), torch.tensor(sst2_rows.labels)


class Measured:
    """Two code paths that compute the same numbers in different places (two slots of a batched
    matmul, a pack and a run alone, ours and PEFT's) agree only to fp32 rounding, which differs
    between CPUs and kernel paths. Each such comparison goes through here: the difference relative
    to the values' scale, recorded as a test property (pytest --junitxml shows them), so a bound
    can be checked against what each machine gives."""

    def __init__(self):
        self.seen: dict[str, float] = {}

    def __call__(self, name: str, ours, reference) -> float:
        """max |ours - reference| / max |reference| (the absolute difference where reference is 0)."""
        ours, reference = torch.as_tensor(ours).double(), torch.as_tensor(reference).double()
        scale = reference.abs().max().item()
        diff = (ours - reference).abs().max().item() / (scale if scale > 0 else 1.0)
        self.seen[name] = max(self.seen.get(name, 0.0), diff)
        return diff


@pytest.fixture
def measured(record_property):
    m = Measured()
    yield m
    for name, value in m.seen.items():
        record_property(name, f"{value:.3e}")
