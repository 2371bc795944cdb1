"""Tasks declared as data: the built-in tasks' goldens reproduced from the same rows written as a
user's files, chats whose assistant tokens alone count, a pack of chats equal to its runs alone,
the tokenise-once cache, run ids keyed by contents, and the refusal of changed data on resume."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from goldens.freeze import rows
from lorainit import cli, models, slices
from lorainit.config import RunConfig
from lorainit.tasks import causal_lm, declared, sft_data
from lorainit.train import PackTrainer

GOLDENS = Path(__file__).parent / "goldens"


def _golden(name: str) -> dict:
    return json.loads((GOLDENS / f"{name}.json").read_text(encoding="utf-8"))


def _tsv_rows(path: Path, limit: int) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row for _, row in zip(range(limit), reader)]


def _jsonl_rows(path: Path, limit: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(limit), f)]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _losses(result) -> list[float]:
    return [m["value"] for m in result.metrics if m["name"] == "train_loss"]


def test_sst2_written_as_a_csv_reproduces_the_built_in_golden(tmp_path, measured):
    golden = _golden("sst2")
    fields = golden["fields"]["dropout_off"]
    sst2 = slices.folder("sst2-slice") / "SST-2"
    # the user's names for the columns, the GLUE rows quoted by the CSV writer where they need it
    for split, source, limit in (("train", "train.tsv", 16), ("test", "dev.tsv", 8)):
        _write_csv(tmp_path / f"{split}.csv", [{"review": r["sentence"], "stars": r["label"]}
                                               for r in _tsv_rows(sst2 / source, limit)])
    task = {"type": "classification", "train": "train.csv", "eval": "test.csv", "text": "review", "label": "stars"}
    run = RunConfig.from_dict(fields | {"task": task}, relative_to=tmp_path)
    trainer = PackTrainer([run], show_progress=False, model_overrides=golden["base_dropout_off"])
    assert rows(trainer) == golden["rows"]
    (result,) = trainer.run()
    frozen = golden["runs"]["dropout_off"]
    assert measured("declared_sst2_loss", _losses(result), frozen["train_loss"]) <= 1e-4
    assert measured("declared_sst2_eval", result.final["eval_loss"], frozen["final"]["eval_loss"]) <= 1e-4
    assert result.final["accuracy"] == frozen["final"]["accuracy"]
    assert 0.0 <= result.final["macro_f1"] <= 1.0


def test_gsm8k_written_as_prompt_completion_jsonl_reproduces_the_built_in_golden(tmp_path, measured):
    golden = _golden("gsm8k")
    fields = golden["fields"]["dropout_off"]
    gsm8k = slices.folder("gsm8k-slice")
    for split, limit in (("train", 8), ("test", 2)):
        _write_jsonl(tmp_path / f"{split}.jsonl",
                     [{"prompt": f"Question: {r['question'].strip()}\nAnswer:", "completion": " " + r["answer"].strip(),
                       "answer": r["answer"].strip()} for r in _jsonl_rows(gsm8k / f"{split}.jsonl", limit)])
    # 256 tokens cut some rows: truncated as gsm8k truncates; exact_match as gsm8k scores it
    task = {"type": "sft", "train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "test.jsonl"),
            "too_long": "truncate", "reference": "answer", "match": "final_number", "stop": ["\n\nQuestion:"]}
    run = RunConfig.from_dict(fields | {"task": task})
    trainer = PackTrainer([run], show_progress=False, model_overrides=golden["base_dropout_off"])
    assert rows(trainer) == golden["rows"]
    (result,) = trainer.run()
    frozen = golden["runs"]["dropout_off"]
    assert measured("declared_gsm8k_loss", _losses(result), frozen["train_loss"]) <= 1e-4
    assert measured("declared_gsm8k_eval", result.final["eval_loss"], frozen["final"]["eval_loss"]) <= 1e-4
    assert result.final["exact_match"] == frozen["final"]["exact_match"]


def _chats(limit: int) -> list[dict]:
    """GSM8K slice rows as conversations of uneven length: one or two question/answer exchanges,
    some with a system turn."""
    qa = _jsonl_rows(slices.folder("gsm8k-slice") / "train.jsonl", 2 * limit)
    out = []
    for i in range(limit):
        a, b = qa[2 * i], qa[2 * i + 1]
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": a["question"]}, {"role": "assistant", "content": a["answer"]}]
        if i % 2:
            messages += [{"role": "user", "content": b["question"]}, {"role": "assistant", "content": b["answer"]}]
        out.append({"messages": messages})
    return out


def _template_ids(tokenizer, messages, **kwargs) -> list[int]:
    """The ids `apply_chat_template` gives (a list, or an encoding holding them)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out) if isinstance(out, list) else list(out["input_ids"])


def test_exactly_the_assistant_tokens_of_a_chat_count():
    tokenizer = models.tokenizer("smollm2-135m")
    chats = [row["messages"] for row in _chats(6)]
    encoded = sft_data.conversations(chats, [f"row {i}" for i in range(len(chats))], tokenizer,
                                     sft_data.Encoded("chats", 10_000, "drop"))
    assert len(encoded.ids) == len(chats)
    for messages, ids, spans in zip(chats, encoded.ids, encoded.spans):
        # the expectation from token counts alone: each assistant turn is what the tokens of the
        # conversation up to it add to the tokens of the turns before it with the generation prompt
        expected = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                before = _template_ids(tokenizer, messages[:i], add_generation_prompt=True)
                upto = _template_ids(tokenizer, messages[:i + 1])
                assert upto[:len(before)] == before
                expected += range(len(before), len(upto))
        assert ids == _template_ids(tokenizer, messages)
        counted = [t for lo, hi in spans for t in range(lo, hi)]
        assert counted == expected
        # and what they say: each answer and the end of its turn
        answers = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
        assert "".join(tokenizer.decode(ids[lo:hi]) for lo, hi in spans) == "".join(answers)


def test_a_pack_of_two_seeds_on_uneven_chats_equals_each_run_alone(tmp_path, measured):
    chats = _chats(10)
    _write_jsonl(tmp_path / "chats.jsonl", chats[:8])
    _write_jsonl(tmp_path / "test.jsonl", chats[8:])
    task = {"type": "sft", "style": "messages", "train": str(tmp_path / "chats.jsonl"),
            "eval": str(tmp_path / "test.jsonl")}
    base = dict(model="smollm2-135m", task=task, max_steps=2, batch_size=2, max_seq_len=320, warmup_ratio=0.0,
                save_adapters=False, log_every=1)
    runs = [RunConfig.from_dict(base | {"init": i, "lr": 2e-3, "seed": s}) for i, s in (("a", 0), ("b", 1))]
    pack = PackTrainer(runs, show_progress=False)
    assert pack.task.padding_free and pack.task.train.padding_share() > 0.2
    packed = pack.run()
    for run, res in zip(runs, packed):
        (alone,) = PackTrainer([run], show_progress=False).run()
        assert res.status == alone.status == "done"
        assert measured("chat_pack_vs_alone_loss", _losses(res), _losses(alone)) <= 1e-4
        assert measured("chat_pack_vs_alone_eval", res.final["eval_loss"], alone.final["eval_loss"]) <= 1e-4
    assert _losses(packed[0]) != _losses(packed[1])


def test_rows_are_tokenised_once_and_rekeyed_by_a_changed_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(declared, "cache_folder", lambda: tmp_path / "cache" / "data")
    _write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(6)])
    _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "Q9:", "completion": " A9"}])
    task = {"type": "sft", "train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "test.jsonl")}
    run = RunConfig.from_dict({"model": "smollm2-135m", "task": task, "max_steps": 1})
    first = causal_lm.encode_run(run, models.tokenizer(run.model))
    assert len(list((tmp_path / "cache" / "data").glob("*.json"))) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    with monkeypatch.context() as patched:
        patched.setattr(sft_data, "prompt_completion", no_tokenising)
        assert causal_lm.encode_run(run, models.tokenizer(run.model)) == first
    # the same rows moved elsewhere: the same run id and cache entry
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        shutil.copy(tmp_path / name, moved / name)
    again = RunConfig.from_dict({"model": "smollm2-135m", "max_steps": 1,
                                 "task": task | {"train": str(moved / "train.jsonl"), "eval": str(moved / "test.jsonl")}})
    assert again.run_id() == run.run_id() and declared.cache_key(again, models.tokenizer(run.model), "causal_lm") \
        == declared.cache_key(run, models.tokenizer(run.model), "causal_lm")
    # one byte changed: another fingerprint, another id, another entry
    (moved / "train.jsonl").write_text((moved / "train.jsonl").read_text().replace("A5", "A6"), encoding="utf-8")
    changed = RunConfig.from_dict(again.to_dict() | {"data_sha": None})
    assert changed.data_sha != run.data_sha and changed.run_id() != run.run_id()
    causal_lm.encode_run(changed, models.tokenizer(run.model))
    assert len(list((tmp_path / "cache" / "data").glob("*.json"))) == 2


def _sweep(tmp_path: Path, task: dict, extra: dict | None = None) -> Path:
    import yaml

    base = {"model": "minilm", "task": task, "max_steps": 1, "batch_size": 4, "save_adapters": False} | (extra or {})
    file = tmp_path / "sweep.yaml"
    file.write_text(yaml.safe_dump({"name": "mine", "base": base, "grid": {"lr": [1e-3]}}), encoding="utf-8")
    return file


def test_a_resume_over_changed_data_is_refused_and_reports_need_no_data(tmp_path, capsys):
    rows_ = [{"text": f"question {i} about {'places' if i % 2 else 'people'}", "label": "LOC" if i % 2 else "HUM"}
             for i in range(12)]
    _write_csv(tmp_path / "train.csv", rows_[:8])
    _write_csv(tmp_path / "test.csv", rows_[8:])
    file = _sweep(tmp_path, {"type": "classification", "train": "train.csv", "eval": "test.csv", "name": "questions"})
    out = tmp_path / "out"
    assert cli.main(["sweep", str(file), "--out", str(out), "--quiet"]) in (0, 1)
    with open(out / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert json.loads(row["data"])["train"] == str(tmp_path / "train.csv") and row["final_macro_f1"] != ""
    # the report reads the store alone: the data may be gone
    shutil.move(tmp_path / "train.csv", tmp_path / "train.kept")
    assert cli.main(["report", str(out)]) == 0
    assert "questions (classification)" in (out / "report" / "index.html").read_text(encoding="utf-8")
    # one edited row, then a resume: refused by name, the folder as it was
    kept = (tmp_path / "train.kept").read_text(encoding="utf-8")
    (tmp_path / "train.csv").write_text(kept.replace("question 3", "question 33"), encoding="utf-8")
    before = _contents(out)
    capsys.readouterr()
    assert cli.main(["sweep", str(file), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{tmp_path / 'train.csv'}: changed since this sweep started" in err
    assert _contents(out) == before


def _contents(out: Path) -> dict:
    """A sweep folder as a reader sees it: its store's rows and its tables' bytes."""
    import sqlite3

    db = sqlite3.connect(out / "store.sqlite")
    try:
        rows = list(db.iterdump())
    finally:
        db.close()
    return {"store": rows, **{name: (out / name).read_bytes() for name in ("results.csv", "metrics.csv")}}


def test_a_wikitext_folder_that_gains_train_txt_is_refused_on_resume(tmp_path, capsys):
    folder = tmp_path / "wikitext-2"
    shutil.copytree(slices.folder("wikitext2-slice"), folder)
    (folder / "train.txt").unlink(missing_ok=True)
    text = (folder / "valid.txt").read_text(encoding="utf-8")[:6000]
    (folder / "valid.txt").write_text(text, encoding="utf-8")
    (folder / "test.txt").write_text(text[:2000], encoding="utf-8")
    file = _sweep(tmp_path, "wikitext2", {"model": "smollm2-135m", "data_dir": str(folder), "max_seq_len": 32,
                                          "max_train_samples": 4, "max_eval_samples": 2})
    out = tmp_path / "out"
    assert cli.main(["sweep", str(file), "--out", str(out), "--quiet"]) == 0
    (folder / "train.txt").write_text(text[::-1], encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["sweep", str(file), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{folder / 'train.txt'}: this sweep's train data was {folder / 'valid.txt'}" in err and "\n" not in err


CLASSES = "text,label\nwhere is paris,LOC\nwho was ada,HUM\n"
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
# (what the user gave: {file name: its bytes}, the task's other keys, a piece of the one line it must print)
BAD = {
    "missing column": ({"train.csv": b"question,label\nwhere,LOC\nwho,HUM\n"}, {}, "train.csv: no column 'text'"),
    "empty file": ({"train.csv": b""}, {}, "train.csv: the file is empty"),
    "empty split": ({"train.csv": b"text,label\n"}, {}, "train.csv: a header but no data rows"),
    "one class": ({"train.csv": b"text,label\na,LOC\nb,LOC\n"}, {}, "column 'label' holds one value ('LOC')"),
    "null label": ({"train.jsonl": b'{"text": "a", "label": 1}\n{"text": "b", "label": null}\n'}, {},
                   "train.jsonl: line 2, column 'label': null is not a label"),
    "float label": ({"train.csv": b"text,label\na,1\nb,3.5\n"}, {}, "train.csv: line 3, column 'label': 3.5 is a float"),
    "label out of the set": ({"train.csv": CLASSES.encode(), "test.csv": b"text,label\nwhat is pi,NUM\n"}, {},
                             "test.csv: line 2, column 'label': label 'NUM' is not one of the labels HUM, LOC"),
    "mixed label types": ({"train.jsonl": b'{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n'}, {},
                          "train.jsonl: column 'label' mixes types"),
    "ragged row": ({"train.csv": b"text,label\na,LOC\nb,HUM,extra\n"}, {}, "train.csv: line 3 has 3 fields, the header 2"),
    "not UTF-8": ({"train.csv": b"text,label\ncaf\xe9,LOC\nb,HUM\n"}, {}, "train.csv: not UTF-8 (byte 0xe9"),
    "malformed JSON": ({"train.jsonl": b'{"text": "a", "label": 1}\n{"text": "b", "label": \n'}, {},
                       "train.jsonl: line 2 is not JSON"),
    "identical eval file": ({"train.csv": CLASSES.encode(), "test.csv": CLASSES.encode()}, {},
                            "test.csv: the evaluation file is identical to the training file"),
    "no assistant turn": ({"train.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
                           + b"\n" + json.dumps(CHAT).encode() + b"\n"},
                          {"type": "sft", "model": "smollm2-135m"}, "train.jsonl: line 1: no assistant message"),
    "unknown role": ({"train.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "bot", "content": "yo"}]}).encode() + b"\n"
                                    + json.dumps(CHAT).encode() + b"\n"},
                     {"type": "sft", "model": "smollm2-135m"},
                     "train.jsonl: line 1, message 2: role 'bot' is not system, user, assistant or tool"),
    "no chat template": ({"train.jsonl": (json.dumps(CHAT) + "\n").encode() * 2},
                         {"type": "sft", "style": "messages", "model": "no-template"}, "has no chat template"),
}


def _decoder_without_a_chat_template(folder: Path) -> Path:
    """SmolLM2's config and tokenizer, without weights or a chat template: a served decoder whose
    tokenizer cannot render messages (the checks never load weights)."""
    source = Path(models.resolve("smollm2-135m").path)
    folder.mkdir()
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and "chat_template" not in f.name:
            shutil.copy(f, folder / f.name)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    files, extra, expected = BAD[case]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    train = next(n for n in files if n.startswith("train"))
    task = {"type": "classification", "train": train}
    task |= {"eval": "test.csv"} if "test.csv" in files else {"eval_fraction": 0.5}
    task |= {k: v for k, v in extra.items() if k != "model"}
    model = extra.get("model", "minilm")
    if model == "no-template":
        model = str(_decoder_without_a_chat_template(tmp_path / "no-template"))
    file = _sweep(tmp_path, task, {"model": model})
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["sweep", str(file), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_a_hub_dataset_not_in_the_cache_offline_exits_2(tmp_path, capsys):
    file = _sweep(tmp_path, {"type": "classification", "hub": "nobody/no-such-set", "train": "train",
                             "eval": "test"})
    assert cli.main(["sweep", str(file), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "hub dataset 'nobody/no-such-set' (config default, split train) is not in the hub cache" in err
    assert not (tmp_path / "out").exists()


def test_evaluation_rows_also_in_training_are_a_warning(tmp_path, capsys):
    _write_csv(tmp_path / "train.csv", [{"text": f"row {i}", "label": i % 2} for i in range(8)])
    _write_csv(tmp_path / "test.csv", [{"text": f"row {i}", "label": i % 2} for i in (1, 2, 20, 21)])
    run = RunConfig.from_dict({"task": {"type": "classification", "train": str(tmp_path / "train.csv"),
                                        "eval": str(tmp_path / "test.csv")}, "max_steps": 1})
    from lorainit.tasks.classification import Classification

    Classification.check_data(run)
    assert "2 of 4 evaluation rows (50.0%) also occur in the training rows" in capsys.readouterr().err


def test_train_takes_the_task_mapping_inline_or_as_a_file(tmp_path, capsys):
    _write_csv(tmp_path / "train.csv", [{"text": f"question {i} about {'places' if i % 2 else 'people'}",
                                         "label": "LOC" if i % 2 else "HUM"} for i in range(8)])
    _write_csv(tmp_path / "test.csv", [{"text": "where is it", "label": "LOC"}, {"text": "who is it", "label": "HUM"}])
    (tmp_path / "task.yaml").write_text("{type: classification, train: train.csv, eval: test.csv}\n")
    inline = "{type: classification, train: %s, eval: %s}" % (tmp_path / "train.csv", tmp_path / "test.csv")
    ids = []
    for given in (inline, str(tmp_path / "task.yaml")):
        out = tmp_path / f"out{len(ids)}"
        assert cli.main(["train", "--task", given, "--max_steps", "1", "--out", str(out), "--quiet"]) in (0, 1)
        with open(out / "results.csv", newline="") as f:
            (row,) = list(csv.DictReader(f))
        assert row["task"] == "classification" and row["status"] in ("done", "did_not_learn")
        ids.append(row["run_id"])
    assert ids[0] == ids[1]  # one task, one id, however it was given
