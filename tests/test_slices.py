"""The data slices lorainit ships: intact, in the package, and named as what they are."""

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lorainit import slices
from lorainit.config import RunConfig
from lorainit.errors import BadInput
from lorainit.tasks import glue, lm_data

REPO = Path(__file__).resolve().parents[1]


def _listed() -> dict[str, str]:
    """path -> sha256, as the slices' README lists them."""
    text = (slices.ROOT / "README.md").read_text(encoding="utf-8")
    return {path: digest for digest, path in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, flags=re.M)}


def test_every_shipped_file_has_the_checksum_its_readme_states():
    listed = _listed()
    shipped = {str(p.relative_to(slices.ROOT)) for p in slices.ROOT.rglob("*")
               if p.is_file() and p.suffix in (".tsv", ".jsonl", ".txt") and not p.name.startswith("LICENSE")}
    assert set(listed) == shipped and len(shipped) == 6
    for path, digest in listed.items():
        assert hashlib.sha256((slices.ROOT / path).read_bytes()).hexdigest() == digest, path


def test_a_slice_is_its_own_task_and_never_stands_in_for_the_full_one(monkeypatch, tmp_path):
    assert glue.read("sst2-slice", "train").labels.__len__() == 4000
    assert len(glue.read("sst2-slice", "eval").labels) == 872
    assert len(lm_data.read_gsm8k("train", str(slices.folder("gsm8k-slice")))) == 320
    assert slices.base("wikitext2-slice") == "wikitext2" and slices.folder("wikitext2") is None
    # the full task with no data anywhere is an error naming where rows come from, not the slice
    monkeypatch.setenv("LORAINIT_DATA", str(tmp_path))
    with pytest.raises(BadInput, match=r"SST-2/train.tsv: file not found"):
        glue.read("sst2", "train")
    with pytest.raises(BadInput, match=r"task sst2-slice reads the rows shipped with lorainit.*use task sst2"):
        RunConfig.from_dict({"task": "sst2-slice", "data_dir": str(tmp_path), "max_steps": 1})
    # a slice's runs are keyed apart from the full task's
    full = RunConfig.from_dict({"task": "sst2", "max_steps": 1})
    assert RunConfig.from_dict({"task": "sst2-slice", "max_steps": 1}).run_id() != full.run_id()


def test_a_built_wheel_carries_the_slices(tmp_path):
    """A non-editable install has them: they are package data."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "dist"), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("lorainit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in [*_listed(), "README.md", "LICENSE-sst2-alps.txt", "LICENSE-gsm8k.txt", "LICENSE-wikitext.txt"]:
        assert f"lorainit/slices/{path}" in names, path
