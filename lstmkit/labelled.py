"""Labelled text for classification: a TSV or CSV file with a header -> texts and class ids -> batches.

Reading: the bytes are decoded as UTF-8 strictly (data.decode_utf8), then split into rows by the
file's kind: `.tsv` (or a header holding a tab) is tab-separated with no quoting, as NSMC is;
`.csv` (otherwise) is comma-separated with the usual double-quote quoting (Python's csv module).
Each text is normalised like a language model's text (data.normalize_text: CRLF -> LF, NFC).
The text column is `--text-column` (default: `document`, else `text`) and the label column
`--label-column` (default `label`). Labels are any strings; the classes are the distinct labels in
sorted (string) order, class id = position, and a checkpoint keeps them, so eval data is mapped
with the model's classes (a label the model never saw is an error).

Built in: `nsmc` (150,000 Korean movie reviews, negative 0 / positive 1, NSMC recipe, CC0; see
corpora/README.md) and `nsmc-test` (its 50,000 test reviews).

Batches: sequences of similar length go together (bucketing), so a packed batch wastes little:
the training rows are sorted by length with a random tie-break, cut into batches of B, and the
batches are visited in random order, anew each epoch.

Shape letters: N rows, B batch size, C classes.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from .data import DataError, decode_utf8, normalize_text, read_data_bytes

BUILTIN_LABELLED = {"nsmc": "nsmc_train.tsv.gz", "nsmc-test": "nsmc_test.tsv.gz"}
TEXT_COLUMNS = ("document", "text")        # tried in this order when --text-column is not given
LABEL_COLUMN = "label"


@dataclass
class LabelledData:
    texts: list[str]
    labels: np.ndarray          # (N,) int64 class ids
    classes: list[str]          # class id -> label string, sorted
    source: str


def _rows(text: str, spec: str) -> list[list[str]]:
    first = text.split("\n", 1)[0]
    tsv = spec.endswith(".tsv") or spec in BUILTIN_LABELLED or (not spec.endswith(".csv") and "\t" in first)
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE) if tsv \
        else csv.reader(io.StringIO(text))
    try:
        return [row for row in reader if row]
    except csv.Error as e:
        raise DataError(f"{spec!r} is not a valid CSV file: {e}") from None


def _column(header, name, spec, what, flag):
    if name not in header:
        raise DataError(f"{spec!r} has no {what} column {name!r} (its columns: {', '.join(header)}); "
                        f"choose one with {flag}")
    return header.index(name)


def read_labelled(spec: str, text_column: str | None = None, label_column: str = LABEL_COLUMN,
                  classes: list[str] | None = None) -> LabelledData:
    """Texts and class ids of a labelled file. classes: the model's classes (eval, predict); None
    makes them from this file's labels (training), which must hold two classes or more."""
    text = normalize_text(decode_utf8(read_data_bytes(spec, BUILTIN_LABELLED, "TSV or CSV"), repr(spec)))
    rows = _rows(text, spec)
    if len(rows) < 2:
        raise DataError(f"{spec!r} has no rows under its header")
    header = rows[0]
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMNS if c in header), TEXT_COLUMNS[0])
    ti = _column(header, text_column, spec, "text", "--text-column")
    li = _column(header, label_column, spec, "label", "--label-column")
    texts, labels = [], []
    for line, row in enumerate(rows[1:], start=2):
        if max(ti, li) >= len(row):
            raise DataError(f"{spec!r} line {line} has {len(row)} field(s); the header has {len(header)}")
        t = row[ti].strip()
        if not t:
            raise DataError(f"{spec!r} line {line}: the text is empty")
        texts.append(t)
        labels.append(row[li].strip())
    given = sorted(set(labels))
    if classes is None:
        if len(given) < 2:
            raise DataError(f"{spec!r}: the label column {label_column!r} holds one class only ({given[0]!r}); "
                            f"a classifier needs two or more")
        classes = given
    unseen = [c for c in given if c not in classes]
    if unseen:
        raise DataError(f"{spec!r} has label(s) the model never saw: {', '.join(map(repr, unseen[:10]))} "
                        f"(the model's classes: {', '.join(map(repr, classes))})")
    index = {c: i for i, c in enumerate(classes)}
    return LabelledData(texts, np.array([index[c] for c in labels], dtype=np.int64), list(classes), spec)


def split_validation(n: int, frac: float, seed) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of a random held-out fraction of n rows."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * frac))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def bucket_batches(lengths, batch_size: int, rng) -> list[np.ndarray]:
    """Row indices in batches of similar length (each batch's rows longest first), in random order."""
    lengths = np.asarray(lengths)
    order = np.lexsort((rng.random(len(lengths)), lengths))        # by length, ties at random
    batches = [order[i:i + batch_size][::-1] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
