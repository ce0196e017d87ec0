"""Readers, DataError messages (file, line, field), data-root resolution and k-shot sampling.

Malformed files are written to tmp_path; each test asserts the message a user would see.
"""

import csv
from pathlib import Path

import pytest

from lmadapt.data import (DataError, Example, parse_shots, read_json, read_rows,
                          resolve_data_root, sample_kshot)
from lmadapt.tasks import TASKS, task_from_files


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- readers ----------------------------------------------------------------------------------


def test_tsv_rows_carry_the_physical_line_they_start_on(tmp_path):
    # Row 2 is a quoted field spanning two lines (as in the Amazon TSVs), so row 3 starts on line 5.
    p = write(tmp_path / "a.tsv",
              'sentence\tlabel\r\nfirst\t0\r\n"two\n\tlines"\t1\r\nthird\t0\r\n')
    rows = read_rows(p)
    assert [line for line, _ in rows] == [2, 3, 5]
    assert rows[1][1] == {"sentence": "two\n\tlines", "label": "1"}


def test_glue_quoting_none_keeps_bare_quotes(tmp_path):
    p = write(tmp_path / "g.tsv", 'sentence\tlabel\nthe " film \t1\n"quoted start\t0\n')
    rows = read_rows(p, quoting=csv.QUOTE_NONE)
    assert [r["sentence"] for _, r in rows] == ['the " film ', '"quoted start']


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"t": "a"}\n\n{"t": "b"}\n')
    assert read_rows(p) == [(1, {"t": "a"}), (3, {"t": "b"})]


def test_json_array_rows_start_lines(tmp_path):
    p = write(tmp_path / "a.json", '[\n  {"t": "a",\n   "u": 1},\n  {"t": "b"}\n]\n')
    assert read_rows(p) == [(2, {"t": "a", "u": 1}), (4, {"t": "b"})]


def test_bad_label_names_file_line_and_choices(tmp_path):
    write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\ngood film \t1\nbad film \tpos\n")
    with pytest.raises(DataError) as e:
        TASKS["sst2"].load("train", data_root=tmp_path)
    # Path shown relative to the data root, line 3 = the second data row.
    assert str(e.value) == "sst2/train.tsv line 3: label 'pos' is not one of 0, 1"


def test_missing_column(tmp_path):
    p = write(tmp_path / "train.tsv", "sentence\tlabl\nfine\t1\n")
    with pytest.raises(DataError, match=r"train\.tsv line 1: missing column 'label' "
                                        r"\(columns: sentence, labl\)$"):
        read_rows(p, required=["sentence", "label"])


def test_missing_field_in_jsonl_row(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2: missing field 'label'"):
        read_rows(p, required=["text", "label"])


def test_truncated_json_line_reports_its_line(tmp_path):
    lines = ['{"text": "ok", "label": 0}'] * 4 + ['{"text": "cut off", "lab']
    p = write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        read_rows(p)
    assert "train.jsonl line 5: invalid JSON (Unterminated string" in str(e.value)


def test_truncated_json_array(tmp_path):
    p = write(tmp_path / "a.json", '[\n {"t": "a"},\n {"t": "b"}\n')
    with pytest.raises(DataError, match=r"a\.json line 3: invalid JSON .*truncated"):
        read_rows(p)


def test_nested_json_is_refused_by_read_rows_but_read_by_read_json(tmp_path):
    p = write(tmp_path / "squad.json", '{"data": []}')
    with pytest.raises(DataError, match="expected a JSON array of objects"):
        read_rows(p)
    assert read_json(p) == {"data": []}
    bad = write(tmp_path / "bad.json", '{\n"data": [,]}')
    with pytest.raises(DataError, match=r"bad\.json line 2: invalid JSON"):
        read_json(bad)


def test_wrong_number_of_fields(tmp_path):
    p = write(tmp_path / "t.tsv", "sentence\tlabel\na\t1\nb\t0\textra\n")
    with pytest.raises(DataError, match=r"t\.tsv line 3: expected 2 fields \(sentence, label\), "
                                        r"got 3"):
        read_rows(p)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path, content):
    p = write(tmp_path / "empty.csv", content)
    with pytest.raises(DataError, match=r"empty\.csv: is empty$"):
        read_rows(p)


def test_header_only_file(tmp_path):
    with pytest.raises(DataError, match="has no data rows"):
        read_rows(write(tmp_path / "h.csv", "text,label\n"))


def test_nonexistent_path_shown_as_given(tmp_path):
    missing = tmp_path / "nope" / "train.tsv"
    with pytest.raises(DataError) as e:
        read_rows(missing)
    assert str(e.value) == f"{missing}: does not exist"


def test_path_under_the_data_root_is_shown_relative(monkeypatch):
    monkeypatch.delenv("LMADAPT_DATA", raising=False)
    with pytest.raises(DataError) as e:
        read_rows(resolve_data_root() / "sst2" / "missing.tsv")
    assert str(e.value) == "sst2/missing.tsv: does not exist"


def test_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'; use one of: \.tsv"):
        read_rows(write(tmp_path / "a.txt", "x"))


# --- user files -------------------------------------------------------------------------------


def test_task_from_files_string_labels_sorted(tmp_path):
    train = write(tmp_path / "train.csv", "review,stars\ngreat,pos\nawful,neg\nok,neutral\n")
    dev = write(tmp_path / "dev.jsonl", '{"review": "fine", "stars": "pos"}\n')
    task = task_from_files(train, dev, "review", "stars", name="mine")
    assert task.label_names == ("neg", "neutral", "pos")
    assert [e.label for e in task.load("train")] == [2, 0, 1]
    assert task.load("dev")[0].label == 2
    assert task.kind == "classification"


def test_task_from_files_integer_labels_sort_numerically_and_match_json_ints(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\na\t10\nb\t2\nc\t2\n")
    dev = write(tmp_path / "dev.jsonl", '{"text": "d", "label": 10}\n')
    task = task_from_files(train, dev, "text", "label")
    assert task.label_names == ("2", "10")
    assert task.load("dev")[0].label == 1


def test_task_from_files_unseen_dev_label(tmp_path):
    train = write(tmp_path / "train.csv", "text,sentiment\na,yes\nb,no\n")
    dev = write(tmp_path / "dev.csv", "text,sentiment\nc,yes\nd,maybe\n")
    with pytest.raises(DataError) as e:
        task_from_files(train, dev, "text", "sentiment")
    assert str(e.value) == (f"{dev} line 3: field 'sentiment': label 'maybe' is not one of no, "
                            "yes (the labels in train.csv)")


def test_task_from_files_pair_and_missing_column(tmp_path):
    train = write(tmp_path / "train.tsv", "p\th\ty\na\tb\t0\nc\td\t1\n")
    task = task_from_files(train, None, "p", "y", text_pair_col="h")
    ex = task.load("train")[0]
    assert (ex.text, ex.text_pair, task.kind) == ("a", "b", "pair_classification")
    with pytest.raises(DataError, match="line 1: missing column 'hyp'"):
        task_from_files(train, None, "p", "y", text_pair_col="hyp")


# --- data root --------------------------------------------------------------------------------


def test_data_root_from_env(tmp_path, monkeypatch):
    write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\nnice \t1\n")
    monkeypatch.setenv("LMADAPT_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path.resolve()
    assert [(e.text, e.label) for e in TASKS["sst2"].load("dev")] == [("nice", 1)]


def test_missing_data_root_says_how_to_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LMADAPT_DATA", raising=False)
    with pytest.raises(DataError) as e:
        resolve_data_root(tmp_path / "no-such-dir")
    assert "--data-root" in str(e.value) and "LMADAPT_DATA" in str(e.value)
    monkeypatch.setenv("LMADAPT_DATA", str(tmp_path / "also-missing"))
    with pytest.raises(DataError, match="from LMADAPT_DATA"):
        TASKS["sst2"].load("dev")


# --- k-shot -----------------------------------------------------------------------------------


def labelled(n_per_class=(30, 20, 10)):
    return [Example(text=f"c{c} #{i}", label=c)
            for c, n in enumerate(n_per_class) for i in range(n)]


def test_kshot_is_class_balanced():
    picked = sample_kshot(labelled(), 8, seed=0)
    assert sorted(e.label for e in picked) == [0] * 8 + [1] * 8 + [2] * 8
    assert len({e.text for e in picked}) == 24  # no example drawn twice


def test_kshot_seeded():
    a = [e.text for e in sample_kshot(labelled(), 4, seed=1)]
    assert a == [e.text for e in sample_kshot(labelled(), 4, seed=1)]
    assert a != [e.text for e in sample_kshot(labelled(), 4, seed=2)]


def test_kshot_unlabelled_counts_total_and_full_returns_all():
    gen = [Example(text=str(i), target="t") for i in range(50)]
    assert len(sample_kshot(gen, 16, seed=0)) == 16
    assert sample_kshot(gen, None, seed=0) == gen
    assert sample_kshot(gen, "full", seed=0) == gen


def test_kshot_too_few_examples_in_a_class():
    with pytest.raises(DataError, match="class 2 has only 10 examples; cannot sample 16 per class"):
        sample_kshot(labelled(), 16, seed=0)


def test_parse_shots():
    assert parse_shots("16") == 16
    assert parse_shots("full") is None
    for bad in ("0", "-3", "many"):
        with pytest.raises(ValueError, match="positive integer or 'full'"):
            parse_shots(bad)
