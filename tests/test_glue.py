"""GLUE files are read in file order, and bad files get errors naming the file, row and column."""

import pytest

from lorainit.tasks import glue


def test_reads_real_rows_in_file_order():
    ex = glue.read("sst2", "train", max_rows=3)
    assert ex.texts[0] == ("when are bears bears and",) and ex.labels[:2] == [1, 1]
    qnli = glue.read("qnli", "eval", max_rows=2)
    assert len(qnli.texts[0]) == 2 and qnli.labels == [0, 1]  # entailment, not_entailment
    mnli = glue.read("mnli", "eval", max_rows=1)
    assert mnli.texts[0] == ("Salt kept the town fed.", "Salt kept the town thriving.") and mnli.labels == [0]
    assert len(glue.read("sst2", "eval").labels) == 872


def _write(root, task_folder, name, text):
    (root / task_folder).mkdir(parents=True, exist_ok=True)
    (root / task_folder / name).write_text(text)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(glue.DataError, match=r"SST-2/train.tsv: file not found"):
        glue.read("sst2", "train", str(tmp_path))
    _write(tmp_path, "SST-2", "train.tsv", "sentence\tlabel\ngood\t1\nbad\tnegative\n")
    with pytest.raises(glue.DataError, match=r"train.tsv: row 3, column 'label': label 'negative'"):
        glue.read("sst2", "train", str(tmp_path))
    _write(tmp_path, "SST-2", "train.tsv", "text\tlabel\ngood\t1\n")
    with pytest.raises(glue.DataError, match=r"header has no column 'sentence'"):
        glue.read("sst2", "train", str(tmp_path))
    _write(tmp_path, "QNLI", "dev.tsv", "index\tquestion\tsentence\tlabel\n0\twhy?\n")
    with pytest.raises(glue.DataError, match=r"dev.tsv: row 2 has 2 columns, the header has 4"):
        glue.read("qnli", "eval", str(tmp_path))
    with pytest.raises(glue.DataError, match="unknown GLUE task 'cola'"):
        glue.read("cola", "train", str(tmp_path))
