"""Reading a user's data file into rows: CSV, TSV, JSON, JSON Lines, Parquet, or a hub dataset.

A `Table` is the file's rows as dicts, with each row's locator (the line it starts on, or its row
number) so that every message can point at the row it is about. Nothing here checks what the rows
mean; `tasks.userdata` does that. Text files are UTF-8 (a BOM is allowed). pyarrow (the `hub`
extra) is imported only to read Parquet.

    read_table('data/train.csv')       -> Table(where='data/train.csv', columns=['text', 'label'], ...)
    hub_table('org/name', 'train')     -> the hub's Parquet conversion of that split, read the same way

- CSV: RFC 4180 quoting (a field holding a comma, quote or line break is in double quotes).
- TSV: tab-separated with no quoting at all, like GLUE's files, whose text holds stray '"'.
- JSON: an array of objects; a .json file that does not start with '[' is read as JSON Lines.
- JSON Lines: one object a line.
Blank lines are skipped in CSV, TSV and JSON Lines.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from lorainit.tasks.glue import DataError

FILE_TYPES = ("csv", "tsv", "json", "jsonl", "parquet")
_BOM = b"\xef\xbb\xbf"
HUB_INSTALL = "pip install 'lorainit[hub]'"


@dataclass
class Table:
    where: str          # the file as messages name it (its path as given)
    columns: list[str]  # the header / keys, in first-seen order, names stripped
    rows: list[dict]    # one dict per data row; CSV/TSV values are str, the others keep their JSON types
    lines: list[int]    # each row's locator: CSV/TSV the line it starts on (the header is line 1),
                        # JSON Lines its line, JSON/Parquet its 1-based row number
    unit: str           # how a message names a locator: "line" or "row"
    sha256: str         # of the file's bytes (a hub split: of its Parquet files' bytes, in name order)

    def at(self, i: int) -> str:
        """Where row `i` (0-based) is, for messages: 'data/train.csv: line 12'."""
        return f"{self.where}: {self.unit} {self.lines[i]}"


def repeats(unit: str, numbers: list[int], noun: str = "rows") -> str:
    """The count a message gives when its problem repeats: ' (3 rows: lines 57, 90, 311)'; '' for one."""
    if len(numbers) < 2:
        return ""
    shown = ", ".join(str(n) for n in numbers[:5]) + (", ..." if len(numbers) > 5 else "")
    return f" ({len(numbers)} {noun}: {unit}s {shown})"


def one_line(text: str) -> str:
    """`text` with its line breaks written as \\n and \\r, to quote a file's text in a one-line message."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def file_type_of(path: str | Path, given: str | None = None) -> str:
    """The file's type: `given` (task.file_type) if set, else its extension."""
    if given is not None:
        if given.lower() not in FILE_TYPES:
            raise DataError(f"{path}: file_type {given!r} is not one of {', '.join(FILE_TYPES)}")
        return given.lower()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FILE_TYPES:
        found = f"its extension '.{suffix}'" if suffix else "a name without an extension"
        raise DataError(f"{path}: cannot tell the file type from {found}; name it .csv, .tsv, .json, .jsonl "
                        f"or .parquet, or set task.file_type to one of {', '.join(FILE_TYPES)}")
    return suffix


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    return _sha256([path])


def _sha256(paths: list) -> str:
    """sha256 hex digest of the files' bytes, one after another."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def read_table(path: str | Path, file_type: str | None = None, max_rows: int | None = None) -> Table:
    """The rows of a data file, the first `max_rows` of them (file order) if given.

    `file_type` overrides the extension. The digest is always of the whole file."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be 1 or more, got {max_rows}")
    kind = file_type_of(path, file_type)
    where = str(path)
    if Path(path).is_dir():
        raise DataError(f"{where}: a folder, not a file; name the data file itself")
    if not Path(path).is_file():
        raise DataError(f"{where}: file not found")
    if kind == "parquet":
        table = _parquet_rows([Path(path)], where, max_rows)
        table.sha256 = sha256_file(path)
        return table
    data = Path(path).read_bytes()
    text = _decode(data, where)
    if kind in ("csv", "tsv"):
        table = _delimited(text, where, kind, max_rows)
    elif kind == "json" and text.lstrip().startswith("["):
        table = _json_array(text, where, max_rows)
    else:
        table = _json_lines(text, where, max_rows, kind)
    table.sha256 = hashlib.sha256(data).hexdigest()
    return table


def _decode(data: bytes, where: str) -> str:
    """UTF-8 text, without a leading BOM."""
    skip = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skip + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(f"{where}: not UTF-8 (byte 0x{data[offset]:02x} at offset {offset}, line {line}); "
                        "save the file as UTF-8") from None


def _blank(row: list[str]) -> bool:
    """A CSV/TSV line with nothing on it (whitespace at most)."""
    return len(row) == 0 or (len(row) == 1 and not row[0].strip())


def _delimited(text: str, where: str, kind: str, max_rows: int | None) -> Table:
    """CSV (quoted fields) or TSV (no quoting: a '"' is text)."""
    if kind == "csv":
        options = {}
        hint = "; a field holding a comma, a quote or a line break must be in double quotes"
    else:
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
        hint = ("; a .tsv file is read tab-separated with no quoting (a '\"' is text), "
                "so for a comma-separated file with quoted fields set task.file_type: csv")
    reader = csv.reader(io.StringIO(text, newline=""), **options)
    header, columns, rows, lines = None, [], [], []
    ragged: list[tuple[int, int]] = []  # (line, fields)
    limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)  # a long document is one field; the default caps a field at 128 KiB
    stopped = False  # at max_rows, before the end of the file
    last = 0  # the line the last data row read starts on
    try:
        end = 0
        for row in reader:
            start, end = end + 1, reader.line_num
            if _blank(row):
                continue
            if header is None:
                header = row
                columns = [name.strip() for name in row]
                twice = sorted({c for c in columns if columns.count(c) > 1})
                if twice:
                    raise DataError(f"{where}: line {start}: the header names {', '.join(map(repr, twice))} "
                                    "more than once; give each column its own name")
                continue
            if max_rows is not None and len(rows) >= max_rows:
                stopped = True
                break
            last = start
            if len(row) != len(columns):
                ragged.append((start, len(row)))
                continue
            rows.append(dict(zip(columns, row)))
            lines.append(start)
    except csv.Error as err:
        raise DataError(f"{where}: line {reader.line_num}: {err}") from None
    finally:
        csv.field_size_limit(limit)
    if header is None:
        raise DataError(f"{where}: the file is empty")
    # An unclosed quote swallows the rest of the file into the last row: name it before its field count.
    if kind == "csv" and not stopped and (rows or ragged) and _unclosed_quote(text, last):
        raise DataError(f"{where}: line {last}: a quoted field opened on this line is never closed, so it "
                        "runs to the end of the file; close it with '\"' (a quote inside a field is written '\"\"')")
    if ragged:
        line, fields = ragged[0]
        if kind == "csv" and len(columns) == 1 and "\t" in header[0]:
            hint = "; the header is one field holding tabs: a tab-separated file is read with task.file_type: tsv"
        raise DataError(f"{where}: line {line} has {fields} field{'s' * (fields != 1)}, the header "
                        f"{len(columns)}{repeats('line', [n for n, _ in ragged])}{hint}")
    if not rows:
        raise DataError(f"{where}: a header but no data rows")
    return Table(where, columns, rows, lines, "line", "")


def _unclosed_quote(text: str, line: int) -> bool:
    """Whether the CSV row starting at `line` (1-based) opens a quoted field it never closes."""
    tail = "".join(io.StringIO(text, newline="").readlines()[line - 1:])
    try:
        list(csv.reader(io.StringIO(tail, newline=""), strict=True))  # read to the end: strict raises there
    except csv.Error as err:
        return "unexpected end of data" in str(err)
    return False


def _kind(value) -> str:
    """A JSON value's kind, for messages: 'an array', 'a string'."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _collect(objects, where: str, unit: str, max_rows: int | None) -> Table:
    """A Table from (locator, object) pairs, each object already parsed."""
    columns: dict[str, None] = {}  # an ordered set
    rows, lines = [], []
    for locator, obj in objects:
        if max_rows is not None and len(rows) >= max_rows:
            break
        if any(key != key.strip() for key in obj):
            obj = {key.strip(): value for key, value in obj.items()}
        columns.update(dict.fromkeys(obj))
        rows.append(obj)
        lines.append(locator)
    return Table(where, list(columns), rows, lines, unit, "")


def _json_array(text: str, where: str, max_rows: int | None) -> Table:
    """A top-level JSON array of objects; rows are numbered from 1."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(items, list):
        raise DataError(f"{where}: the top level is {_kind(items)}, not an array of row objects")
    if not items:
        raise DataError(f"{where}: an empty array, no data rows")
    if max_rows is not None:
        items = items[:max_rows]
    bad = [i for i, item in enumerate(items, start=1) if not isinstance(item, dict)]
    if bad:
        raise DataError(f"{where}: row {bad[0]} is {_kind(items[bad[0] - 1])}, not an object"
                        f"{repeats('row', bad)}; each element of the array is one row, an object of columns")
    return _collect(enumerate(items, start=1), where, "row", max_rows)


def _json_lines(text: str, where: str, max_rows: int | None, kind: str) -> Table:
    """One JSON object a line; blank lines are skipped."""
    objects, not_json, not_object = [], [], []
    first_error = ""
    for line_no, line in enumerate(text.split("\n"), start=1):
        if max_rows is not None and len(objects) >= max_rows:
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            not_json.append(line_no)
            first_error = first_error or f"{err.msg} at column {err.colno}"
            continue
        if isinstance(obj, dict):
            objects.append((line_no, obj))
        else:
            not_object.append((line_no, _kind(obj)))
    if not_json and kind == "json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            keys = one_line(", ".join(list(whole)[:8]))
            raise DataError(f"{where}: holds one JSON object (keys: {keys}), not rows; "
                            "give an array of row objects, or one object a line (JSON Lines)")
    if not_json:
        raise DataError(f"{where}: line {not_json[0]} is not JSON ({first_error}){repeats('line', not_json)}; "
                        "JSON Lines holds one object a line")
    if not_object:
        raise DataError(f"{where}: line {not_object[0][0]} is {not_object[0][1]}, not an object"
                        f"{repeats('line', [n for n, _ in not_object])}; JSON Lines holds one object a line")
    if not objects:
        raise DataError(f"{where}: the file is empty")
    return _collect(objects, where, "line", max_rows)


def _parquet_rows(paths: list[Path], where: str, max_rows: int | None) -> Table:
    """The rows of Parquet files read one after another; rows are numbered from 1 across them."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{where}: reading Parquet needs pyarrow: {HUB_INSTALL}") from None
    objects: list = []
    for path in paths:
        try:
            part = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a damaged or foreign file
            raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
        if max_rows is not None:
            part = part.slice(0, max_rows - len(objects))
        objects.extend(part.to_pylist())
        if max_rows is not None and len(objects) >= max_rows:
            break
    if not objects:
        raise DataError(f"{where}: no data rows")
    return _collect(enumerate(objects, start=1), where, "row", max_rows)


def hub_table(repo: str, split: str, config: str | None = None, revision: str | None = None,
              max_rows: int | None = None) -> Table:
    """A hub dataset's split, from the Parquet files the hub converts every dataset to.

    The files are `{config}/{split}/*.parquet` at `revision` (default: the hub's conversion branch,
    refs/convert/parquet), downloaded once into the hub cache and read in name order."""
    from huggingface_hub import snapshot_download

    config = config or "default"
    revision = revision or "refs/convert/parquet"
    pattern = f"{config}/{split}/*.parquet"
    where = f"hub dataset '{repo}' (config {config}, split {split})"
    try:
        folder = snapshot_download(repo_id=repo, repo_type="dataset", revision=revision, allow_patterns=[pattern])
    except Exception as err:  # offline and not cached, unreachable, no such repo: all mean "give a file"
        spec_key = "task.train" if split == "train" else "task.eval"
        raise DataError(f"{where} is not in the hub cache and could not be fetched ({type(err).__name__}); "
                        f"fetch it once online, or give {spec_key} as a file") from None
    paths = sorted(Path(folder).glob(pattern))
    if not paths:
        raise DataError(f"{where}: no Parquet files at {pattern} (revision {revision}); check the config and "
                        "split names on the dataset's page")
    table = _parquet_rows(paths, where, max_rows)
    table.sha256 = _sha256(paths)
    return table
