"""Reading examples from disk, and k-shot sampling.

Every problem with a data file is raised as a one-line `DataError` that names the file, the line and
the field, e.g. ``sst2/train.tsv line 17: label 'pos' is not one of 0, 1``, so a user can open the
file at that line. The CLI turns DataError into exit status 2.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

SUPPORTED_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
REPO_ROOT = Path(__file__).resolve().parent.parent


class DataError(ValueError):
    """A problem in a data file, as one line: ``<file> line <n>: <what is wrong>``."""


def display_path(path: str | Path, root: str | Path | None = None) -> str:
    """`path` relative to the data root when it lies under it (short, and the same on every
    machine), else as given. Without `root`, the usual data root is looked up, if there is one."""
    if root is None:
        try:
            root = resolve_data_root()
        except DataError:
            return str(path)
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def data_error(path: str | Path, line: int | None, message: str,
               root: str | Path | None = None) -> DataError:
    where = display_path(path, root)
    return DataError(f"{where}: {message}" if line is None else f"{where} line {line}: {message}")


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The folder holding sst2/, rte/, ...: the argument, else $LMADAPT_DATA, else
    ../shared/data from the working directory, else ../shared/data next to the repository."""
    how_to = ("pass --data-root DIR (data_root= in Python) or set LMADAPT_DATA to the folder "
              "that holds sst2/, rte/, squad_v1.1/, ...")
    given = [(data_root, "data_root"), (os.environ.get("LMADAPT_DATA") or None, "LMADAPT_DATA")]
    for value, source in given:
        if value is not None:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise DataError(f"data root '{value}' (from {source}) is not a directory; {how_to}")
            return path.resolve()
    tried = [Path.cwd() / ".." / "shared" / "data", REPO_ROOT.parent / "shared" / "data"]
    for path in tried:
        if path.is_dir():
            return path.resolve()
    raise DataError(f"no data root found (tried {', '.join(str(p) for p in tried)}); {how_to}")


@dataclass
class Example:
    """One example of any task kind; fields a kind does not use stay None.

    `label` is a class index into `Task.label_names` (or, for distillation, a tuple of C teacher
    scores: PET's soft labels). `target` is what a generation model should
    produce (for preference tasks: the chosen response), `references` every acceptable output for
    multi-reference metrics (BLEU, ROUGE-L, SQuAD). Loaders return fresh copies, so callers may
    edit examples (e.g. PET's pseudo-labels) without corrupting the cache.
    """

    text: str
    text_pair: str | None = None
    label: int | None = None
    target: str | None = None
    rejected: str | None = None
    references: list[str] | None = None
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# readers


def read_rows(path: str | Path, *, delimiter: str | None = None, quoting: int | None = None,
              required: Sequence[str] = (), root: str | Path | None = None
              ) -> list[tuple[int, dict]]:
    """Read a .tsv/.csv (header row), .jsonl (one object a line) or .json (array of objects).

    Returns ``(line, row)`` pairs, where `line` is the 1-based physical line on which the row
    starts (the header is line 1), so errors raised later can point into the file. `required`
    columns must be present in the header (tsv/csv) or in every object (json/jsonl). `quoting` is a
    `csv.QUOTE_*` constant: GLUE files need QUOTE_NONE (bare `"` inside sentences), files with
    quoted multi-line fields need the default QUOTE_MINIMAL. `root` only shortens paths in errors.
    """
    path = Path(path)
    if not path.exists():
        raise data_error(path, None, "does not exist", root)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise data_error(path, None, f"unsupported file type '{suffix}'; "
                         f"use one of: {', '.join(SUPPORTED_SUFFIXES)}", root)
    text = _read_text(path, root)
    if suffix in (".tsv", ".csv"):
        if delimiter is None:
            delimiter = "\t" if suffix == ".tsv" else ","
        rows = _read_delimited(path, text, delimiter, csv.QUOTE_MINIMAL if quoting is None
                               else quoting, required, root)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path, text, root)
    else:
        rows = _read_json_array(path, text, root)
    if suffix in (".jsonl", ".json"):
        for line, row in rows:
            for name in required:
                if name not in row:
                    raise data_error(path, line, f"missing field '{name}' "
                                     f"(fields: {', '.join(row)})", root)
    if not rows:
        raise data_error(path, None, "has no data rows", root)
    return rows


def read_json(path: str | Path, root: str | Path | None = None):
    """Parse a whole JSON file (e.g. SQuAD's nested layout) with file/line errors."""
    path = Path(path)
    if not path.exists():
        raise data_error(path, None, "does not exist", root)
    text = _read_text(path, root)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise data_error(path, e.lineno, f"invalid JSON ({e.msg} at column {e.colno})", root)


def _read_text(path: Path, root) -> str:
    try:
        # utf-8-sig: spreadsheet exports often start with a BOM, which would otherwise become
        # part of the first column's name ('\ufeffsentence').
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise data_error(path, None, f"is not UTF-8 text (bad byte at offset {e.start})", root)
    except IsADirectoryError:
        raise data_error(path, None, "is a directory, not a data file", root)
    if not text.strip():
        raise data_error(path, None, "is empty", root)
    return text


def _read_delimited(path, text, delimiter, quoting, required, root):
    # StringIO(newline='') hands csv the raw line ends, as a file opened with newline='' would,
    # so quoted fields with embedded newlines (Amazon reviews) and CRLF rows both parse.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting,
                        strict=True)
    try:
        header = next(reader)
    except csv.Error as e:
        raise data_error(path, 1, f"cannot parse header ({e})", root)
    header = [h.strip() for h in header]
    for name in required:
        if name not in header:
            raise data_error(path, 1, f"missing column '{name}' (columns: {', '.join(header)})",
                             root)
    width = len(header)
    rows = []
    start = reader.line_num + 1  # the physical line the next record starts on
    try:
        for fields in reader:
            if fields:  # csv yields [] for a blank line (e.g. two newlines at the end)
                if len(fields) != width:
                    raise data_error(path, start, f"expected {width} fields "
                                     f"({', '.join(header)}), got {len(fields)}", root)
                rows.append((start, dict(zip(header, fields))))
            start = reader.line_num + 1
    except csv.Error as e:
        raise data_error(path, start, f"cannot parse row ({e})", root) from None
    return rows


def _read_jsonl(path, text, root):
    rows = []
    loads = json.loads
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = loads(line)
        except json.JSONDecodeError as e:
            raise data_error(path, line_no, f"invalid JSON ({e.msg} at column {e.colno})", root)
        if not isinstance(row, dict):
            raise data_error(path, line_no, f"expected a JSON object, got {type(row).__name__}",
                             root)
        rows.append((line_no, row))
    return rows


def _read_json_array(path, text, root):
    """A JSON array of objects, with the line each object starts on (json.load loses it)."""
    decoder = json.JSONDecoder()
    rows = []
    pos, line = 0, 1

    def skip_ws(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def lineno(i):
        nonlocal pos, line
        line += text.count("\n", pos, i)  # incremental: one pass over the text in total
        pos = i
        return line

    i = skip_ws(0)
    if text[i] != "[":
        raise data_error(path, lineno(i), "expected a JSON array of objects "
                         "(for a nested layout such as SQuAD, the task reads it itself)", root)
    i = skip_ws(i + 1)
    if i < len(text) and text[i] == "]":
        return rows
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise data_error(path, e.lineno, f"invalid JSON ({e.msg} at column {e.colno})", root)
        start_line = lineno(i)
        if not isinstance(obj, dict):
            raise data_error(path, start_line, f"expected a JSON object, got "
                             f"{type(obj).__name__}", root)
        rows.append((start_line, obj))
        i = skip_ws(end)
        if i < len(text) and text[i] == ",":
            i = skip_ws(i + 1)
        elif i < len(text) and text[i] == "]":
            break
        else:
            # Point at the line the element ends on: that is where the ',' or ']' is missing.
            raise data_error(path, lineno(end), "invalid JSON (expected ',' or ']' "
                             "after an array element; is the file truncated?)", root)
    if skip_ws(i + 1) != len(text):
        raise data_error(path, lineno(skip_ws(i + 1)), "invalid JSON (extra data after the array)",
                         root)
    return rows


# ---------------------------------------------------------------------------------------------
# fields and labels of a row, with errors at the row's line


def text_field(row: dict, col: str, path: str | Path, line: int, root=None) -> str:
    value = row.get(col)
    if type(value) is not str:
        raise data_error(path, line, f"field '{col}' should be a string, got "
                         f"{'null' if value is None else type(value).__name__}", root)
    return value.strip()  # GLUE TSVs end every sentence with a space before the tab


def label_key(row: dict, col: str, path: str | Path, line: int, root=None) -> str:
    """A row's label as a string, so "1" in a TSV and 1 in a JSON file name the same class."""
    value = row.get(col)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) not in (str, int):  # bool is an int subclass, but True is no class label
        raise data_error(path, line, f"field '{col}' should be a label string or integer, got "
                         f"{'null' if value is None else repr(value)}", root)
    key = str(value).strip()
    if not key:
        raise data_error(path, line, f"field '{col}' is empty", root)
    return key


def label_index(row: dict, col: str, labels: Mapping[str, int], path: str | Path, line: int,
                root=None, hint: str = "") -> int:
    """The class index of a row's label under `labels` (label string -> index)."""
    value = row.get(col)
    if type(value) is str and value in labels:  # fast path: the common, clean case
        return labels[value]
    key = label_key(row, col, path, line, root)
    if key not in labels:
        what = "label" if col == "label" else f"field '{col}': label"
        raise data_error(path, line, f"{what} '{key}' is not one of "
                         f"{', '.join(sorted_labels(labels))}{hint}", root)
    return labels[key]


def sorted_labels(labels) -> list[str]:
    # Numeric order when every label is an integer ("2" before "10"), else alphabetical.
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


# ---------------------------------------------------------------------------------------------
# k-shot sampling


def parse_shots(value: str | int | None) -> int | None:
    """CLI value for --shots: a positive integer, or 'full' (None) for the whole split."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("full", "all"):
        return None
    try:
        shots = int(text)
    except ValueError:
        raise ValueError(f"shots must be a positive integer or 'full', got '{value}'") from None
    if shots <= 0:
        raise ValueError(f"shots must be a positive integer or 'full', got '{value}'")
    return shots


def sample_kshot(examples: Sequence[Example], shots: int | str | None, seed: int
                 ) -> list[Example]:
    """A seeded few-shot subset.

    Labelled examples: `shots` per class (class-balanced, as in LM-BFF and PET), so a 16-shot
    SST-2 run trains on 32 examples. Unlabelled (generation/preference) examples: `shots` in total.
    None or 'full' returns every example. The result is shuffled with the same seed, so its order is
    deterministic but does not group classes together (in-context demonstrations take a prefix).
    """
    shots = parse_shots(shots) if isinstance(shots, str) else shots
    if shots is None:
        return list(examples)
    if shots <= 0:
        raise ValueError(f"shots must be a positive integer or 'full', got {shots}")
    rng = random.Random(seed)
    labelled = [e.label is not None for e in examples]
    if all(labelled) and examples:
        by_class: dict[int, list[Example]] = {}
        for e in examples:
            by_class.setdefault(e.label, []).append(e)
        chosen = []
        for label in sorted(by_class):  # a fixed class order keeps the draws reproducible
            pool = by_class[label]
            if len(pool) < shots:
                raise DataError(f"class {label} has only {len(pool)} examples; cannot sample "
                                f"{shots} per class (lower --shots or use 'full')")
            chosen.extend(rng.sample(pool, shots))
    elif any(labelled):
        raise DataError(f"{labelled.count(False)} of {len(examples)} examples have no label; "
                        "k-shot sampling needs all or none labelled")
    else:
        if len(examples) < shots:
            raise DataError(f"only {len(examples)} examples; cannot sample {shots} "
                            "(lower --shots or use 'full')")
        chosen = rng.sample(list(examples), shots)
    rng.shuffle(chosen)
    return chosen


def parse_cap(value: str | int | None, flag: str) -> int | None:
    """CLI value for an evaluation cap (--max-eval, --max-ood): a positive integer, or 'all' (None)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("all", "full", "none"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(f"{flag} must be a positive integer or 'all', got '{value}'")
    return n


def subsample(examples: Sequence[Example], n: int | None, seed: int = 0) -> list[Example]:
    """At most `n` examples: a seeded random subset kept in file order (None: all). The seed is
    fixed by default, independent of the run's seed, so every method and run of a comparison is
    scored on the same examples; a random subset rather than the first n, because files are often
    sorted (by label, by table, by article)."""
    if n is None or n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]
