"""GLUE files are read in file order, and bad files get errors naming the file, row and column."""


import pytest

from conftest import needs_data
from lorainit.tasks import glue


def test_reads_real_rows_in_file_order():
    root = needs_data("glue/SST-2", "glue/QNLI", "glue/MNLI") / "glue"
    ex = glue.read("sst2", "train", max_rows=3)
    assert len(ex.texts) == 3 and all(len(t) == 1 and t[0] for t in ex.texts) and set(ex.labels) <= {0, 1}
    qnli = glue.read("qnli", "eval", max_rows=2)
    assert all(len(t) == 2 for t in qnli.texts) and set(qnli.labels) <= {0, 1}  # entailment, not_entailment
    mnli = glue.read("mnli", "eval", max_rows=5)
    assert all(len(t) == 2 for t in mnli.texts) and set(mnli.labels) <= {0, 1, 2}
    assert len(glue.read("sst2", "eval").labels) == 872  # the GLUE validation split, in any copy
    # the first rows as the files hold them, split here by hand
    header, *lines = (root / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[:4]
    cells = [dict(zip(header.split("\t"), line.split("\t"))) for line in lines]
    assert ex.texts == [(c["sentence"].strip(),) for c in cells]
    assert ex.labels == [int(c["label"]) for c in cells]
    header, line = (root / "MNLI" / "dev_matched.tsv").read_text(encoding="utf-8").splitlines()[:2]
    cell = dict(zip(header.split("\t"), line.split("\t")))
    assert mnli.texts[0] == (cell["sentence1"].strip(), cell["sentence2"].strip())
    assert mnli.labels[0] == glue.TASKS["mnli"].labels.index(cell["gold_label"].strip())


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


def _hub_parquet(folder, task, split, examples):
    """Write `examples` as the hub's parquet file of that task and split would hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = glue.TASKS[task]
    columns = {name: [t[i] for t in examples.texts] for i, name in enumerate(spec.hub_columns)}
    columns |= {"label": examples.labels, "idx": list(range(len(examples.labels)))}
    path = folder / f"{split}.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def test_without_a_folder_rows_come_from_the_hub_files(tmp_path, monkeypatch):
    import huggingface_hub

    needs_data("glue/SST-2", "glue/QNLI", "glue/MNLI")
    tsv = {(task, split): glue.read(task, split, max_rows=50) for task in glue.TASKS for split in ("train", "eval")}
    asked = []

    def download(repo_id, filename, repo_type):  # the hub, laid out as nyu-mll/glue's parquet files
        asked.append((repo_id, filename, repo_type))
        task, name = filename.split("/")
        split = "train" if name.startswith("train-") else "eval"
        return str(_hub_parquet(tmp_path, task, name.split("-")[0], tsv[task, split]))

    monkeypatch.delenv("LORAINIT_DATA", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    for (task, split), expected in tsv.items():
        got = glue.read(task, split, max_rows=20)
        assert got.texts == expected.texts[:20] and got.labels == expected.labels[:20]
    assert ("nyu-mll/glue", "mnli/validation_matched-00000-of-00001.parquet", "dataset") in asked
    assert ("nyu-mll/glue", "sst2/train-00000-of-00001.parquet", "dataset") in asked


def test_no_folder_and_no_hub_says_what_to_pass(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.delenv("LORAINIT_DATA", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(glue.DataError, match=r"nyu-mll/glue:sst2/train-00000-of-00001.parquet could not be "
                                             r"fetched .*LocalEntryNotFoundError.*pass data_dir"):
        glue.read("sst2", "train")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(glue.DataError, match="bad.parquet: not a readable parquet file"):
        glue.read_parquet(bad, "sst2")
    path = _hub_parquet(tmp_path, "sst2", "train", glue.Examples([("fine",), ("odd",)], [1, 7]))
    with pytest.raises(glue.DataError, match=r"train.parquet: row 2, column 'label': 7 is not a label id 0..1"):
        glue.read_parquet(path, "sst2")
