"""The commands in README.md and docs/*.md cannot rot: every code block is classified and checked.

The scheme (docs/tests.md, "The docs' commands", says it for readers): every fenced block names
its language; a bash, sh, console, yaml or python block has an HTML comment on the line before it,

    <!-- check: run -->             run for real, with tiny settings, in order, one folder per page
    <!-- check: dry-run -->         run with --dry-run added to every `lorainit sweep` / `lorainit train`
    <!-- check: parse -->           checked without running (CLI parser, sweep-file parser, ast)
    <!-- check: skip: REASON -->    not checked, for the stated reason

optionally followed by qualifiers after `;`: `save as NAME` (a yaml block is also written to NAME
for the blocks after it) and `needs LORAINIT_DATA` (reads the full data sets). Blocks of other
languages (`text`) are output and are not checked. Relative links must name existing files and
headings.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "console")
CHECKED = (*SHELL, "yaml", "python")  # the languages whose blocks must carry a check
MODES = ("run", "dry-run", "parse", "skip")
LINKED = ("configs", "benchmarks")  # repository folders each page's folder links, for commands that name them
# Tiny settings for `run` blocks: enough to go through every code path, in seconds.
TINY = {"max_steps": 2, "max_eval_samples": 8}
RUN_TIMEOUT_S = 300

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)\s*$")
CHECK = re.compile(r"^\s*<!--\s*check:\s*(?P<body>.*?)\s*-->\s*$")
HEREDOC = re.compile(r"^\s*cat\s*>\s*(?P<name>\S+)\s*<<-?\s*(?P<q>['\"]?)(?P<tag>\w+)(?P=q)\s*$")


@dataclass
class Block:
    page: Path
    line: int                   # 1-based line of the opening fence
    lang: str                   # "" when the fence names none
    text: str                   # the content, the fence's indentation removed
    check: str | None = None    # one of MODES; None when the block carries no annotation
    reason: str = ""            # skip: why
    save_as: str | None = None  # yaml: also written to this file in the page's folder
    needs_data: bool = False    # reads the full data sets from $LORAINIT_DATA
    problem: str = ""           # what is wrong with the annotation, if anything

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def _annotation(body: str, block: Block) -> None:
    """Fill block.check and its qualifiers from a `check:` comment's body."""
    head, *qualifiers = [part.strip() for part in body.split(";")]
    mode, _, reason = (part.strip() for part in head.partition(":"))
    if mode not in MODES:
        block.problem = f"check mode {mode!r}; allowed: {', '.join(MODES)}"
        return
    if mode == "skip" and not reason:
        block.problem = "a skipped block says why: <!-- check: skip: REASON -->"
        return
    block.check, block.reason = mode, reason
    for qualifier in qualifiers:
        if qualifier.startswith("save as "):
            block.save_as = qualifier.removeprefix("save as ").strip()
        elif qualifier == "needs LORAINIT_DATA":
            block.needs_data = True
        else:
            block.problem = f"unknown qualifier {qualifier!r}; allowed: 'save as NAME', 'needs LORAINIT_DATA'"


def blocks_of(page: Path) -> list[Block]:
    """Every fenced block of a page, with the check on the last non-blank line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opener = FENCE.match(lines[i])
        if not opener:
            i += 1
            continue
        indent, fence = len(opener["indent"]), opener["fence"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), len(lines))
        body = "\n".join(re.sub(rf"^ {{0,{indent}}}", "", line) for line in lines[i + 1:end])  # the fence's indent off
        block = Block(page, i + 1, opener["lang"], body + "\n")
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        if annotation := CHECK.match(before):
            _annotation(annotation["body"], block)
        found.append(block)
        i = end + 1
    return found


BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def _of(mode: str) -> list:
    return [pytest.param(b, id=b.where) for b in BLOCKS if b.check == mode and b.lang in CHECKED]


def test_every_block_is_classified():
    """Each fence names a language, and each block of a checked language says how it is checked."""
    problems = []
    for b in BLOCKS:
        if not b.lang:
            problems.append(f"{b.where}: the fence names no language (```text for output)")
        elif b.problem:
            problems.append(f"{b.where}: {b.problem}")
        elif b.lang in CHECKED and b.check is None:
            problems.append(f"{b.where}: a {b.lang} block without <!-- check: run|dry-run|parse|skip: why --> "
                            "on the line before it")
        elif b.lang not in CHECKED and b.check is not None:
            problems.append(f"{b.where}: a check on a {b.lang} block, which is never run; use one of {CHECKED}")
        elif b.save_as and b.lang != "yaml":
            problems.append(f"{b.where}: 'save as' is for yaml blocks")
    assert not problems, "\n".join(problems)
    assert len(PAGES) > 1 and any(b.check == "run" for b in BLOCKS)  # the pages were found and read


# --- shell text -> commands -----------------------------------------------------------------------

def _shell_lines(block: Block) -> list[str]:
    """The block's shell lines: console prompts stripped (and its output dropped), heredoc bodies
    dropped, continuation lines joined."""
    text = block.text
    if block.lang == "console":
        kept, going_on = [], False
        for line in text.splitlines():
            if line.startswith("$ ") or going_on:
                kept.append(line.removeprefix("$ "))
                going_on = line.rstrip().endswith("\\")
        text = "\n".join(kept)
    lines, tag = [], None
    for line in text.replace("\\\n", " ").splitlines():
        if tag is not None:
            tag = None if line.strip() == tag else tag
            continue
        if heredoc := HEREDOC.match(line):
            tag = heredoc["tag"]
        lines.append(line)
    return lines


def commands(block: Block) -> list[list[str]]:
    """Each simple command of a shell block as its words: split at ;, &&, ||, |, &, without
    redirections or leading VAR=value assignments."""
    found = []
    for line in _shell_lines(block):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words, skip_next = [], False
        for token in [*lexer, ";"]:
            if skip_next:
                skip_next = False
            elif token in (";", "&&", "||", "|", "&"):
                while words and re.match(r"^\w+=", words[0]):
                    words.pop(0)
                if words:
                    found.append(words)
                words = []
            elif token in (">", ">>", "<", "<<", "<<-", ">&", "2>"):
                skip_next = True
            else:
                words.append(token)
    return found


def _materialise(block: Block, folder: Path) -> None:
    """Write the files a block makes without running anything: its heredocs, its `save as`."""
    if block.save_as:
        (folder / block.save_as).write_text(block.text, encoding="utf-8")
    if block.lang not in SHELL:
        return
    lines = block.text.splitlines()
    for i, line in enumerate(lines):
        if heredoc := HEREDOC.match(line):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == heredoc["tag"])
            (folder / heredoc["name"]).write_text("\n".join(lines[i + 1:end]) + "\n", encoding="utf-8")


def page_folder(block: Block, tmp_path: Path) -> Path:
    """A fresh folder for a block: the repository's configs/ and benchmarks/ linked, and the files
    that the page's earlier blocks write (heredocs, `save as`) in place."""
    for name in LINKED:
        (tmp_path / name).symlink_to(REPO / name, target_is_directory=True)
    for earlier in BLOCKS:
        if earlier.page == block.page and earlier.line < block.line:
            _materialise(earlier, tmp_path)
    return tmp_path


# --- parse ----------------------------------------------------------------------------------------

def _parse_lorainit(args: list[str], folder: Path, where: str) -> None:
    """The arguments are accepted by the CLI's own parser; a run's fields by RunConfig; a sweep
    file that the command names is loaded and checked."""
    from lorainit import cli
    from lorainit.config import RunConfig
    from lorainit.errors import BadInput
    from lorainit.sweeps import file

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            parsed = cli.build_parser().parse_args(args)
    except SystemExit as exited:
        assert exited.code == 0, f"{where}: lorainit {shlex.join(args)}: {said.getvalue().strip()}"
        return  # --help
    try:
        if parsed.command == "train":
            RunConfig.from_dict({name: getattr(parsed, name) for name in RunConfig.field_names()
                                 if getattr(parsed, name) is not None}, where="lorainit train")
        if parsed.command == "sweep":
            path = folder / parsed.file
            assert path.is_file(), (f"{where}: lorainit sweep {parsed.file}: no such file in the repository, "
                                    "nor written by an earlier block of the page")
            file.load(path)
    except BadInput as err:
        pytest.fail(f"{where}: lorainit {shlex.join(args)}: {err}")


def _script_options(script: Path) -> set[str]:
    """The --options a benchmark script's argparse declares, read from its source."""
    options = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            options |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return options


def _parse_command(words: list[str], folder: Path, where: str) -> None:
    program, args = words[0], words[1:]
    if program == "lorainit" or program.endswith("/lorainit"):
        _parse_lorainit(args, folder, where)
    elif program == "make":
        makefile = (REPO / "Makefile").read_text(encoding="utf-8")
        for target in (a for a in args if not a.startswith("-") and "=" not in a):
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{where}: make {target}: no such target"
    elif args and re.match(r"^(bash|sh|python3?|\S*/python3?)$", program) and args[0].startswith("benchmarks/"):
        script = REPO / args[0]
        assert script.is_file(), f"{where}: {args[0]}: no such script"
        source = script.with_suffix(".py")  # a .sh kit hands its options to the .py of its name
        if source.is_file():
            declared = _script_options(source)
            unknown = [a.split("=")[0] for a in args[1:] if a.startswith("--") and a.split("=")[0] not in declared]
            assert not unknown, f"{where}: {args[0]} has no option {unknown[0]} (it has {sorted(declared)})"


def _parse_python(block: Block) -> None:
    """Valid Python, and every name it imports from lorainit exists."""
    try:
        tree = ast.parse(block.text, filename=block.where)
    except SyntaxError as err:
        pytest.fail(f"{block.where}: line {err.lineno} of the block: {err.msg}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lorainit":
            module = importlib.import_module(node.module)
            for alias in node.names:
                submodule = hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")
                assert hasattr(module, alias.name) or submodule, \
                    f"{block.where}: from {node.module} import {alias.name}: no such name"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lorainit":
                    importlib.import_module(alias.name)


@pytest.mark.parametrize("block", _of("parse"))
def test_parse(block: Block, tmp_path):
    if block.lang == "yaml":
        from lorainit.errors import BadInput
        from lorainit.sweeps import file

        try:
            sweep = file.parse(block.text, where=block.where)
        except BadInput as err:
            pytest.fail(str(err))
        assert sweep.runs
    elif block.lang == "python":
        _parse_python(block)
    else:
        folder = page_folder(block, tmp_path)
        _materialise(block, folder)
        found = commands(block)
        assert found, f"{block.where}: no command found in the block"
        for words in found:
            _parse_command(words, folder, block.where)


# --- dry-run and run ------------------------------------------------------------------------------

def _env() -> dict:
    """The environment a reader has after `. .venv/bin/activate`, offline. One torch thread unless
    told otherwise: the tiny runs gain nothing from more, and on a busy machine two spinning
    threads made them several times slower."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return os.environ | {"PATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                         "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _execute(block: Block, code: str, folder: Path) -> str:
    """Run shell text (bash) or Python in `folder`; fail naming the block, with the output's tail."""
    if block.lang == "python":
        script = folder / f"block_{block.line}.py"
        script.write_text(code, encoding="utf-8")
        argv = [sys.executable, script.name]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(argv, cwd=folder, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"{block.where}: exit {done.returncode}\n--- ran:\n{code}\n--- output:\n{output[-4000:]}")
    return output


def _needs_data(block: Block) -> None:
    from lorainit import slices

    data = os.environ.get("LORAINIT_DATA")
    if block.needs_data and (not data or Path(data).resolve() == slices.ROOT.resolve()):
        skip_or_fail(f"{block.where} reads the full data sets: set LORAINIT_DATA to a folder laid out as "
                     "glue/SST-2/, glue/QNLI/, glue/MNLI/, gsm8k/, wikitext-2/ (docs/data.md)")


def _with_dry_run(block: Block) -> str:
    """The block's shell text with --dry-run after every `lorainit sweep` and `lorainit train`."""
    from lorainit import cli

    probe = {"sweep": ["sweep", "FILE", "--out", "DIR", "--dry-run"], "train": ["train", "--out", "DIR", "--dry-run"]}
    for words in commands(block):
        if words[0] == "lorainit" or words[0].endswith("/lorainit"):
            assert len(words) > 1 and words[1] in probe, \
                f"{block.where}: a dry-run block runs lorainit sweep and train only, not {shlex.join(words)}"
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    cli.build_parser().parse_args(probe[words[1]])
            except SystemExit:
                pytest.fail(f"{block.where}: lorainit {words[1]} has no --dry-run; check the block with parse")
    text = "\n".join(_shell_lines(block)) if block.lang == "console" else block.text
    return re.sub(r"(\blorainit (?:sweep|train))\b", r"\1 --dry-run", text)


@pytest.mark.parametrize("block", _of("dry-run"))
def test_dry_run(block: Block, tmp_path):
    _needs_data(block)
    output = _execute(block, _with_dry_run(block), page_folder(block, tmp_path))
    leftover = [p.name for p in tmp_path.iterdir() if p.name == "runs"]
    assert not leftover, f"{block.where}: a dry run wrote {leftover}; it must write nothing\n{output[-2000:]}"


def tiny(block: Block) -> str:
    """The block's code with the tiny settings: max_steps 2, max_eval_samples 8 (TINY), wherever
    they are given as YAML keys, --options or Python keywords; added after max_steps in YAML and
    to every `lorainit train` where absent. A block that trains must say max_steps."""
    code = "\n".join(_shell_lines(block)) if block.lang == "console" else block.text
    trains = re.search(r"\blorainit (?:sweep|train)\b|\bRunConfig\b", code) and "--dry-run" not in code
    assert not trains or re.search(r"max[_-]steps", code), \
        f"{block.where}: a run block that trains must set max_steps, so that the test can shrink it"
    for key, value in TINY.items():
        code = re.sub(rf"(?m)^(\s*){key}:\s*\S+", rf"\g<1>{key}: {value}", code)
        code = re.sub(rf"--{key}(?:=|\s+)\S+|--{key.replace('_', '-')}(?:=|\s+)\S+", f"--{key} {value}", code)
        code = re.sub(rf"\b{key}\s*=\s*[\w.]+", f"{key}={value}", code)
    if "max_eval_samples:" not in code:
        code = re.sub(r"(?m)^(\s*)max_steps: 2$", rf"\g<0>\n\g<1>max_eval_samples: {TINY['max_eval_samples']}", code)
    for key, value in TINY.items():
        code = re.sub(r"\blorainit train\b(?![^\n]*--" + key + ")", rf"\g<0> --{key} {value}", code)
    return code


@pytest.mark.parametrize("page", sorted({b.page for b in BLOCKS if b.check == "run" and b.lang in CHECKED}),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_run(page: Path, tmp_path):
    """A page's run blocks, in order, in one folder, so that later blocks read what earlier ones made."""
    folder = page_folder(Block(page, 0, "", ""), tmp_path)
    for block in (b for b in BLOCKS if b.page == page):
        if block.check == "run" and block.lang in CHECKED:
            _needs_data(block)
            _execute(block, tiny(block), folder)
        else:
            _materialise(block, folder)


def test_tiny_settings_are_what_the_docs_say():
    """The substitution that test_run makes, on the forms the docs use."""
    yaml_block = Block(REPO / "README.md", 1, "bash", "cat > s.yaml <<'EOF'\nbase:\n  max_steps: 200\nEOF\n"
                       "lorainit sweep s.yaml --out runs/s\n")
    assert "  max_steps: 2\n  max_eval_samples: 8\n" in tiny(yaml_block)
    train = Block(REPO / "README.md", 1, "bash", "lorainit train --out o --max-steps 300  # one run\n")
    assert tiny(train) == "lorainit train --max_eval_samples 8 --out o --max_steps 2  # one run\n"
    python = Block(REPO / "README.md", 1, "python", "RunConfig.from_dict(dict(max_steps=100, max_eval_samples=200))\n")
    assert tiny(python) == "RunConfig.from_dict(dict(max_steps=2, max_eval_samples=8))\n"
    untrimmable = Block(REPO / "README.md", 7, "bash", "lorainit sweep configs/cpu/glue-sst2-minilm.yaml --out r\n")
    with pytest.raises(AssertionError, match="README.md:7: a run block that trains must set max_steps"):
        tiny(untrimmable)


def test_commands_are_split_as_a_shell_would():
    block = Block(REPO / "README.md", 1, "bash",
                  "LORAINIT_DATA=/d lorainit sweep f.yaml \\\n  --out r  # a comment\n"
                  "cat > f.yaml <<'EOF'\nlorainit theory\nEOF\ncd x && make test > log.txt; . .venv/bin/activate\n")
    assert commands(block) == [["lorainit", "sweep", "f.yaml", "--out", "r"], ["cat"], ["cd", "x"],
                               ["make", "test"], [".", ".venv/bin/activate"]]


# --- links ----------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"^#{1,6}\s+(.*)$", line)):
            slug = _slug(heading[1])
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_links_resolve():
    broken = []
    for page in PAGES:
        in_code = False
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            if FENCE.match(line):
                in_code = not in_code
                continue
            for link in [] if in_code else LINK.finditer(line):
                target = link["target"]
                if re.match(r"^[a-z]+:", target):
                    continue  # http:, https:, mailto:
                name, _, anchor = target.partition("#")
                path = (page.parent / name).resolve() if name else page
                where = f"{page.relative_to(REPO)}:{number}: {target}"
                if not path.exists():
                    broken.append(f"{where}: no such file")
                elif anchor and anchor not in _anchors(path):
                    broken.append(f"{where}: no heading with that anchor in {path.name}")
    assert not broken, "\n".join(broken)
