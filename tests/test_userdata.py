"""Tasks declared as data: reading a user's files (readers) and checking their rows (userdata).

Each error test pins the whole one-line message: the file, the line or row, the column, what was
found and what to do."""

import csv
import hashlib
import json

import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import needs_data

from lorainit.tasks.glue import DataError
from lorainit.tasks.readers import FILE_TYPES, file_type_of, hub_table, read_table, sha256_file
from lorainit.tasks.userdata import (canonical_label, classification_rows, detect_style, held_out, identical,
                                     label_ids, label_set, macro_f1, overlap, sft_rows)

ROWS = [{"text": 'a "quoted", comma', "label": "pos"},
        {"text": "naïve café ☕", "label": "neg"},
        {"text": "  spaced  ", "label": "pos"}]


def error(call, *args, **kwargs) -> str:
    """The DataError message `call` raises, checked to be one line."""
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def write(path, rows, kind):
    """`rows` (dicts of the same keys) written as a `kind` file at `path`; returns the path."""
    if kind == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(rows[0])
            writer.writerows([list(r.values()) for r in rows])
    elif kind == "tsv":
        path.write_text("\n".join("\t".join(r) for r in [list(rows[0])] + [list(r.values()) for r in rows]) + "\n",
                        encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def text_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


# -- readers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", FILE_TYPES)
def test_every_file_type_reads_the_same_rows(tmp_path, kind):
    path = write(tmp_path / f"rows.{kind}", ROWS, kind)
    table = read_table(path)
    assert table.rows == ROWS
    assert table.columns == ["text", "label"]
    assert table.where == str(path)
    assert table.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    if kind in ("csv", "tsv"):  # the header is line 1
        assert (table.unit, table.lines, table.at(0)) == ("line", [2, 3, 4], f"{path}: line 2")
    elif kind == "jsonl":
        assert (table.unit, table.lines) == ("line", [1, 2, 3])
    else:
        assert (table.unit, table.lines, table.at(2)) == ("row", [1, 2, 3], f"{path}: row 3")


def test_json_keeps_types_and_columns_in_first_seen_order(tmp_path):
    path = text_file(tmp_path, "t.jsonl", '{"a": 1, " b ": null}\n\n{"c": [1], "a": 2.5}\n')
    table = read_table(path)
    assert table.columns == ["a", "b", "c"]  # names stripped
    assert table.rows == [{"a": 1, "b": None}, {"c": [1], "a": 2.5}]
    assert table.lines == [1, 3]  # the blank line is skipped, not renumbered


def test_csv_lines_are_physical_lines_across_quoted_line_breaks_and_blank_lines(tmp_path):
    path = text_file(tmp_path, "t.csv", 'text,label\r\n"two\r\nlines",1\r\n\r\n  \r\nlast,2\r\n')
    table = read_table(path)
    assert table.rows == [{"text": "two\r\nlines", "label": "1"}, {"text": "last", "label": "2"}]
    assert table.lines == [2, 6]


def test_tsv_reads_quotes_as_text(tmp_path):
    path = text_file(tmp_path, "t.tsv", 'sentence\tlabel\n"it\'s" a "film\t1\n')
    assert read_table(path).rows == [{"sentence": '"it\'s" a "film', "label": "1"}]


def test_file_type_from_the_extension_or_as_given(tmp_path):
    assert file_type_of("d/Train.CSV") == "csv"
    assert file_type_of("d/train.txt", "tsv") == "tsv"
    assert error(file_type_of, "d/train.txt") == (
        "d/train.txt: cannot tell the file type from its extension '.txt'; name it .csv, .tsv, .json, .jsonl or "
        ".parquet, or set task.file_type to one of csv, tsv, json, jsonl, parquet")
    assert error(file_type_of, "d/train", None).startswith("d/train: cannot tell the file type from a name without")
    assert error(file_type_of, "d/train.csv", "xlsx") == (
        "d/train.csv: file_type 'xlsx' is not one of csv, tsv, json, jsonl, parquet")
    path = text_file(tmp_path, "rows.txt", "a,b\n1,2\n")
    assert read_table(path, "csv").rows == [{"a": "1", "b": "2"}]
    assert error(read_table, tmp_path / "absent.csv") == f"{tmp_path / 'absent.csv'}: file not found"


def test_utf8_with_a_bom_reads_and_other_encodings_are_named(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\nx,1\n")
    assert read_table(path).columns == ["text", "label"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"\xef\xbb\xbftext,label\ncaf\xe9,1\n")
    assert error(read_table, latin) == (
        f"{latin}: not UTF-8 (byte 0xe9 at offset 17, line 2); save the file as UTF-8")  # 3 + 11 + len("caf")


def test_ragged_rows_are_counted(tmp_path):
    path = text_file(tmp_path, "t.csv", "a,b,c,d\n1,2,3,4\n1,2,3,4,5\n1,2,3,4\n1,2\n")
    assert error(read_table, path) == (
        f"{path}: line 3 has 5 fields, the header 4 (2 rows: lines 3, 5); "
        "a field holding a comma, a quote or a line break must be in double quotes")
    tsv = text_file(tmp_path, "t.tsv", "a\tb\n1\t2\t3\n")
    assert error(read_table, tsv) == (
        f"{tsv}: line 2 has 3 fields, the header 2; a .tsv file is read tab-separated with no quoting "
        "(a '\"' is text), so for a comma-separated file with quoted fields set task.file_type: csv")


def test_empty_files_and_headers_without_rows(tmp_path):
    for name, text in [("e.csv", ""), ("blank.tsv", "\n  \n"), ("e.jsonl", "\n")]:
        path = text_file(tmp_path, name, text)
        assert error(read_table, path) == f"{path}: the file is empty"
    header = text_file(tmp_path, "h.csv", "text,label\n\n")
    assert error(read_table, header) == f"{header}: a header but no data rows"
    array = text_file(tmp_path, "a.json", " []")
    assert error(read_table, array) == f"{array}: an empty array, no data rows"


def test_a_header_naming_a_column_twice(tmp_path):
    path = text_file(tmp_path, "t.csv", "text, text ,label\na,b,1\n")
    assert error(read_table, path) == (
        f"{path}: line 1: the header names 'text' more than once; give each column its own name")


def test_a_quote_never_closed(tmp_path):
    path = text_file(tmp_path, "t.csv", 'text,label\nok,1\n"open,2\nrest,3\n')
    assert error(read_table, path) == (
        f"{path}: line 3: a quoted field opened on this line is never closed, so it runs to the end of the file; "
        "close it with '\"' (a quote inside a field is written '\"\"')")


def test_malformed_json_lines_are_counted(tmp_path):
    path = text_file(tmp_path, "t.jsonl", '{"a": 1}\n{"a": \n[1]\n{oops}\n')
    assert error(read_table, path) == (
        f"{path}: line 2 is not JSON (Expecting value at column 7) (2 rows: lines 2, 4); "
        "JSON Lines holds one object a line")
    arrays = text_file(tmp_path, "u.jsonl", '{"a": 1}\n[1]\n')
    assert error(read_table, arrays) == (
        f"{arrays}: line 2 is an array, not an object; JSON Lines holds one object a line")


def test_json_arrays_objects_and_json_lines_named_json(tmp_path):
    lines = text_file(tmp_path, "lines.json", '{"a": 1}\n{"a": 2}\n')
    assert read_table(lines).rows == [{"a": 1}, {"a": 2}]
    broken = text_file(tmp_path, "b.json", '[{"a": 1},\n {"a": 2]')
    assert error(read_table, broken) == f"{broken}: not JSON (Expecting ',' delimiter at line 2, column 9)"
    mixed = text_file(tmp_path, "m.json", '[{"a": 1}, "x", 3]')
    assert error(read_table, mixed) == (
        f"{mixed}: row 2 is a string, not an object (2 rows: rows 2, 3); "
        "each element of the array is one row, an object of columns")
    one = text_file(tmp_path, "o.json", '{\n "data": [{"a": 1}],\n "version": 2\n}\n')
    assert error(read_table, one) == (
        f"{one}: holds one JSON object (keys: data, version), not rows; "
        "give an array of row objects, or one object a line (JSON Lines)")


def test_parquet_unreadable_or_without_pyarrow(tmp_path, monkeypatch):
    path = text_file(tmp_path, "t.parquet", "not parquet")
    assert error(read_table, path).startswith(f"{path}: not a readable Parquet file (")
    good = write(tmp_path / "g.parquet", ROWS, "parquet")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # import fails as if absent
    assert error(read_table, good) == f"{good}: reading Parquet needs pyarrow: pip install 'lorainit[hub]'"


@pytest.mark.parametrize("kind", FILE_TYPES)
def test_max_rows_stops_early_but_the_digest_is_of_the_whole_file(tmp_path, kind):
    path = write(tmp_path / f"rows.{kind}", ROWS, kind)
    table = read_table(path, max_rows=2)
    assert table.rows == ROWS[:2]
    assert table.sha256 == sha256_file(path)


def test_qnli_dev_is_tsv_not_csv(tmp_path):
    root = needs_data("glue/QNLI")
    path = root / "glue" / "QNLI" / "dev.tsv"
    assert len(read_table(path).rows) == 5463  # 606 of its lines hold a '"', which a TSV keeps as text
    message = error(read_table, path, "csv")
    assert message.startswith(f"{path}: line 2 has 2 fields, the header 1 (")
    assert message.endswith("; the header is one field holding tabs: a tab-separated file is read with "
                            "task.file_type: tsv")


def test_trec_string_labels():
    root = needs_data("byo/trec")
    table = read_table(root / "byo" / "trec" / "train.csv")
    texts, raw = classification_rows(table, ["text"], "label")
    labels = label_set(raw, where=table.where, column="label")
    assert labels == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    assert texts[0] == ("How did serfdom develop in and then leave Russia ?",)
    ids = label_ids(raw, labels, table, "label")
    assert len(ids) == 5452 and np.bincount(ids).tolist() == [86, 1162, 1250, 1223, 835, 896]


def fake_hub(tmp_path, parts, calls):
    """A snapshot_download that lays out `parts` (lists of rows) as default/train/000k.parquet."""
    def snapshot_download(**kwargs):
        calls.append(kwargs)
        folder = tmp_path / "snapshot" / "default" / "train"
        folder.mkdir(parents=True, exist_ok=True)
        for k, rows in enumerate(parts):
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{k:04d}.parquet")
        return str(tmp_path / "snapshot")
    return snapshot_download


def test_hub_table_reads_the_split_parquet_files_in_order(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(tmp_path, [ROWS[:2], ROWS[2:]], calls))
    table = hub_table("org/name", "train")
    assert calls == [{"repo_id": "org/name", "repo_type": "dataset", "revision": "refs/convert/parquet",
                      "allow_patterns": ["default/train/*.parquet"]}]
    assert table.rows == ROWS and table.lines == [1, 2, 3] and table.unit == "row"
    assert table.at(2) == "hub dataset 'org/name' (config default, split train): row 3"
    files = sorted((tmp_path / "snapshot" / "default" / "train").glob("*.parquet"))
    assert table.sha256 == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    assert hub_table("org/name", "train", max_rows=3).rows == ROWS
    assert hub_table("org/name", "train", max_rows=1).rows == ROWS[:1]


def test_hub_table_names_what_it_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(tmp_path, [ROWS], []))
    assert error(hub_table, "org/name", "test", config="en") == (
        "hub dataset 'org/name' (config en, split test): no Parquet files at en/test/*.parquet "
        "(revision refs/convert/parquet); check the config and split names on the dataset's page")


def test_hub_table_offline_and_not_cached():
    message = error(hub_table, "lorainit-tests/no-such-dataset", "train")
    assert message.startswith("hub dataset 'lorainit-tests/no-such-dataset' (config default, split train) is not "
                              "in the hub cache and could not be fetched (")
    assert message.endswith("); fetch it once online, or give task.train as a file")
    assert error(hub_table, "lorainit-tests/no-such-dataset", "validation").endswith("give task.eval as a file")


def test_identical_and_overlap(tmp_path):
    first = read_table(write(tmp_path / "a.csv", ROWS, "csv"))
    copy = read_table(write(tmp_path / "b.csv", ROWS, "csv"))
    other = read_table(write(tmp_path / "c.csv", ROWS[:2], "csv"))
    assert identical(first, copy) and not identical(first, other)
    assert overlap(["a", "b", "c"], ["b", "x", "c", "c"]) == 3


# -- classification ---------------------------------------------------------------------------

def test_classification_rows_strip_texts_and_pairs(tmp_path):
    path = text_file(tmp_path, "t.csv", "q,s,label\n what? , because ,1\nwho,me,0\n")
    texts, labels = classification_rows(read_table(path), ["q", "s"], "label")
    assert texts == [("what?", "because"), ("who", "me")] and labels == ["1", "0"]


def test_missing_columns_name_the_setting(tmp_path):
    table = read_table(text_file(tmp_path, "t.csv", "text,stars\nx,1\n"))
    assert error(classification_rows, table, ["review"], "stars") == (
        f"{table.where}: no column 'review' (columns: text, stars); set task.text to one of them")
    assert error(classification_rows, table, ["text"], "label") == (
        f"{table.where}: no column 'label' (columns: text, stars); set task.label to one of them")


def test_text_that_is_not_text_is_counted(tmp_path):
    path = text_file(tmp_path, "t.jsonl", '{"review": "ok", "label": 1}\n{"review": null, "label": 0}\n'
                                          '{"label": 0}\n{"review": 3, "label": 1}\n')
    assert error(classification_rows, read_table(path), ["review"], "label") == (
        f"{path}: line 2, column 'review': null is not text (3 rows: lines 2, 3, 4); "
        "give every row text there, or remove those rows")


@pytest.mark.parametrize("value, message", [
    ("null", "null is not a label (2 rows: lines 2, 3); give every row a label, or remove those rows"),
    ("3.5", "3.5 is a float (2 rows: lines 2, 3); classification needs integer or string labels, "
            "and regression is not supported"),
    ("2.0", "2.0 is a float (2 rows: lines 2, 3); classification needs integer or string labels, "
            "and regression is not supported (write 2 for 2.0)"),
    ("true", "true is a boolean, not a label (2 rows: lines 2, 3); write the labels as integers (0, 1) or strings"),
    ("[1, 2]", "a list is not a label (2 rows: lines 2, 3); give each row one label, an integer or a string"),
])
def test_labels_that_cannot_be_classes(tmp_path, value, message):
    path = text_file(tmp_path, "t.jsonl", '{"t": "a", "label": 1}\n' + f'{{"t": "b", "label": {value}}}\n' * 2)
    assert error(classification_rows, read_table(path), ["t"], "label") == f"{path}: line 2, column 'label': {message}"


def test_csv_float_labels_and_empty_labels(tmp_path):
    path = text_file(tmp_path, "t.csv", "t,stars\na,1\nb, 3.5\n")
    assert error(classification_rows, read_table(path), ["t"], "stars") == (
        f"{path}: line 3, column 'stars': 3.5 is a float; classification needs integer or string labels, "
        "and regression is not supported")
    empty = text_file(tmp_path, "e.csv", "t,stars\na,1\nb,\n")
    assert error(classification_rows, read_table(empty), ["t"], "stars") == (
        f"{empty}: line 3, column 'stars': an empty label; give every row a label, or remove those rows")


def test_json_labels_mixing_numbers_and_strings(tmp_path):
    path = text_file(tmp_path, "t.jsonl", '{"t": "a", "label": 1}\n{"t": "b", "label": "pos"}\n')
    assert error(classification_rows, read_table(path), ["t"], "label") == (
        f"{path}: column 'label' mixes types: a number at line 1, a string at line 2; use one type")
    same = text_file(tmp_path, "s.jsonl", '{"t": "a", "label": 1}\n{"t": "b", "label": "2"}\n')
    assert classification_rows(read_table(same), ["t"], "label")[1] == [1, "2"]  # "2" reads as 2


def test_csv_labels_are_integers_when_all_read_as_integers(tmp_path):
    path = text_file(tmp_path, "t.csv", "t,label\na,10\nb, 2\nc,1\nd,2\n")
    table = read_table(path)
    _, raw = classification_rows(table, ["t"], "label")
    labels = label_set(raw)
    assert labels == (1, 2, 10)  # numeric order: 10 after 2
    assert label_ids(raw, labels, table, "label") == [2, 1, 0, 1]
    words = text_file(tmp_path, "w.csv", "t,label\na,10\nb,2\nc,x\n")
    _, raw = classification_rows(read_table(words), ["t"], "label")  # not an error: string labels
    assert label_set(raw) == ("10", "2", "x")


def test_one_and_the_string_one_are_one_class():
    assert canonical_label(" 1 ") == canonical_label(1) == 1
    assert canonical_label(" pos ") == "pos"
    assert label_set([1, "1", 2, " 2"]) == (1, 2)


def test_given_labels_fix_the_set_and_its_order(tmp_path):
    table = read_table(text_file(tmp_path, "t.csv", "t,stars\na,3\nb,1\nc,6\nd,1\ne,7\n"))
    _, raw = classification_rows(table, ["t"], "stars")
    labels = label_set(raw, given=["3", 1, 2])
    assert labels == (3, 1, 2)
    assert label_ids(raw[:2], labels, table, "stars") == [0, 1]
    assert error(label_set, raw, given=[1, "1", 2]) == "task.labels lists '1' twice; list each label once"
    assert error(label_set, raw, given=["a"]) == "task.labels lists 1 label; classification needs two or more"
    assert error(label_set, raw, given=[1, 2.5]) == "task.labels: a number (2.5) is not a label; " \
                                                    "labels are integers or strings"


def test_labels_outside_the_set_are_counted_never_new_classes(tmp_path):
    table = read_table(text_file(tmp_path, "t.csv", "t,stars\na,1\nb,6\nc,2\nd,9\ne,6\n"))
    _, raw = classification_rows(table, ["t"], "stars")
    assert error(label_ids, raw, (1, 2, 3, 4, 5), table, "stars") == (
        f"{table.where}: line 3, column 'stars': label '6' is not one of the labels 1, 2, 3, 4, 5 "
        "(3 rows: lines 3, 5, 6); list it under task.labels or remove those rows")


def test_one_class_is_not_classification():
    assert error(label_set, ["5", " 5", 5], where="train.csv", column="stars") == (
        "train.csv: column 'stars' holds one value ('5'); classification needs two or more")


def test_macro_f1_by_hand():
    # references 0 0 1 1 2 2, predictions 0 0 1 0 1 1: class 2 is never predicted.
    # class 0: tp 2, fp 1 (row 4), fn 0 -> F1 = 2·2 / (2·2 + 1 + 0) = 0.8
    # class 1: tp 1, fp 2 (rows 5, 6), fn 1 (row 4) -> F1 = 2 / (2 + 2 + 1) = 0.4
    # class 2: tp 0 -> F1 = 0;  macro = (0.8 + 0.4 + 0) / 3 = 0.4
    assert macro_f1([0, 0, 1, 1, 2, 2], [0, 0, 1, 0, 1, 1]) == pytest.approx(0.4)
    # references 0 0 1 1, predictions 0 2 1 1: class 2 occurs only among the predictions and counts.
    # class 0: tp 1, fp 0, fn 1 -> 2/3;  class 1: tp 2 -> 1;  class 2: tp 0, fp 1 -> 0;  macro = 5/9
    assert macro_f1([0, 0, 1, 1], [0, 2, 1, 1]) == pytest.approx(5 / 9)
    assert macro_f1([3, 1, 3], [3, 1, 3]) == 1.0


# -- SFT --------------------------------------------------------------------------------------

def test_detect_style_in_order():
    assert detect_style(["prompt", "completion", "messages"], None) == "messages"
    assert detect_style(["text", "prompt", "completion"], None) == "prompt_completion"
    assert detect_style(["instruction", "input", "response"], {"output": "response"}) == "instruction"
    assert detect_style(["id", "text"], {}) == "text"
    assert error(detect_style, ["question", "answer"], None, where="qa.jsonl") == (
        "qa.jsonl: cannot tell the SFT style from the columns (question, answer): it reads messages, prompt and "
        "completion, instruction and output, or text; set task.style to one of text, prompt_completion, "
        "instruction, messages, and task.columns to name the columns")


def test_sft_rows_each_style_unstripped(tmp_path):
    rows = [{"prompt": "Q: 2+2?\n", "completion": " 4", "instruction": "Add", "input": "2, 2", "response": "4"},
            {"prompt": "Hi", "completion": " there", "instruction": "Greet", "input": None, "response": "Hello"}]
    table = read_table(write(tmp_path / "t.parquet", rows, "parquet"))
    assert sft_rows(table, "prompt_completion", None, None, None) == [("Q: 2+2?\n", " 4"), ("Hi", " there")]
    assert sft_rows(table, "instruction", {"output": "response"}, None, None) == [
        ("Add", "2, 2", "4"), ("Greet", "", "Hello")]
    no_input = read_table(text_file(tmp_path, "i.jsonl", '{"instruction": "Add", "output": "4"}\n'))
    assert sft_rows(no_input, "instruction", None, None, None) == [("Add", "", "4")]
    texts = read_table(text_file(tmp_path, "t.tsv", "text\n  keep spaces \n"))
    assert sft_rows(texts, "text", None, None, None) == ["  keep spaces "]


def test_sft_columns_missing_or_not_text(tmp_path):
    table = read_table(text_file(tmp_path, "t.jsonl", '{"instruction": "a", "response": "b"}\n'))
    assert error(sft_rows, table, "instruction", None, None, None) == (
        f"{table.where}: no column 'output' for the instruction style (columns: instruction, response); "
        "map it with task.columns: {output: <column>}")
    assert error(sft_rows, table, "instruction", {"answer": "response"}, None, None) == (
        "task.columns: 'answer' is not a column of the instruction style (its columns: instruction, input, output)")
    nulls = read_table(text_file(tmp_path, "n.jsonl", '{"prompt": "a", "completion": null}\n'
                                                      '{"prompt": "b", "completion": ["x"]}\n'))
    assert error(sft_rows, nulls, "prompt_completion", None, None, None) == (
        f"{nulls.where}: line 1, column 'completion': null is not text (2 rows: lines 1, 2); "
        "give every row text there, or remove those rows")


def messages_file(tmp_path, conversations):
    return read_table(text_file(tmp_path, "m.jsonl", "".join(json.dumps({"messages": c}) + "\n"
                                                             for c in conversations)))


def test_messages_with_sharegpt_keys_and_roles(tmp_path):
    table = messages_file(tmp_path, [[{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                      {"from": "gpt", "value": " Hello"}]])
    assert sft_rows(table, "messages", None, {"human": "user", "gpt": "assistant"},
                    {"role": "from", "content": "value"}) == [[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello"}]]
    assert error(sft_rows, table, "messages", None, None, None) == (
        f"{table.where}: line 1, message 1: no 'role' key (keys: from, value); "
        "name the keys with task.message_keys: {role: from, content: value}")


def test_messages_in_a_csv_cell_as_json(tmp_path):
    cell = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    table = read_table(write(tmp_path / "m.csv", [{"messages": cell}], "csv"))
    assert sft_rows(table, "messages", None, None, None)[0][1] == {"role": "assistant", "content": "Yo"}


def test_unknown_roles_are_counted_by_conversation(tmp_path):
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    bad = [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}, {"role": "bot", "content": "!"}]
    table = messages_file(tmp_path, [good, good, bad, good, bad])
    assert error(sft_rows, table, "messages", None, None, None) == (
        f"{table.where}: line 3, message 2: role 'bot' is not system, user, assistant or tool "
        "(2 conversations: lines 3, 5); map it with task.roles: {bot: assistant}")
    assert error(sft_rows, table, "messages", None, {"bot": "model"}, None) == (
        "task.roles maps 'bot' to 'model', which is not system, user, assistant or tool")


def test_conversations_without_an_assistant_message(tmp_path):
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    none = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    table = messages_file(tmp_path, [good, none, good, none, none])
    assert error(sft_rows, table, "messages", None, None, None) == (
        f"{table.where}: line 2: no assistant message (roles: system, user), nothing to train on "
        "(3 conversations: lines 2, 4, 5)")


@pytest.mark.parametrize("value, message", [
    ([], "column 'messages': an empty conversation; remove those rows"),
    ("hello", "column 'messages': the string 'hello' is not a list of messages; each row's 'messages' is a list "
              "of objects with 'role' and 'content'"),
    (["hi"], "message 1: the string 'hi' is not a message; each message is an object with 'role' and 'content'"),
    ([{"role": "assistant", "content": None}], "message 1: the content is null, not text; "
                                              "every message's content is a string"),
])
def test_messages_that_are_not_conversations(tmp_path, value, message):
    table = messages_file(tmp_path, [value])
    assert error(sft_rows, table, "messages", None, None, None) == f"{table.where}: line 1, {message}"


# -- splits -----------------------------------------------------------------------------------

def test_held_out_is_a_seeded_permutation():
    train, evaluation = held_out(10, 0.2, split_seed=7)
    assert evaluation == sorted(np.random.default_rng(7).permutation(10)[:2].tolist())
    assert train == sorted(set(range(10)) - set(evaluation))
    assert held_out(10, 0.2, 7) == (train, evaluation)
    assert held_out(10, 0.2, 8)[1] != evaluation
    assert len(held_out(10, 0.01, 0)[1]) == 1  # at least one evaluation row


def test_held_out_needs_rows_on_both_sides():
    assert error(held_out, 10, 1.0, 0) == "task.eval_fraction must be between 0 and 1 (both excluded), got 1.0"
    assert error(held_out, 10, 0.96, 0) == (
        "task.eval_fraction 0.96 of 10 rows leaves no training rows; lower it, or give task.eval as a file")
    assert error(held_out, 1, 0.5, 0) == (
        "task.eval_fraction 0.5 of 1 row leaves no training rows; lower it, or give task.eval as a file")
