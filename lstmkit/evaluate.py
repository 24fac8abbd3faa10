"""Scoring a text with a language model: one stream, the state carried, every token predicted once.

A text of N ids is read as ONE stream, in calls of T tokens with h and c carried between them, so
token k is predicted from all of ids[0..k-1] exactly as the model would read the text:

    loss = (1 / (N-1)) Σ_{k=1}^{N-1} -log p(ids[k] | ids[0..k-1])        nats per token
    bits per character = loss / ln 2 × tokens / characters                 (char, jamo)
    perplexity = e^loss                                                     (word)

Splitting the text into B parallel streams would be faster but not the same number: each stream
would restart from a zero state, and a short text cut into 32 streams is scored with almost no
context (5.0 bits/char instead of 4.35 on one 31-character file). The call length T changes only
the speed, never the number.

Symbols the model's vocabulary lacks (a held-out text nearly always has some):
    unknown="skip"   (default) char and jamo: the symbol is left out of the stream, so it is neither
                     predicted nor read, and the next symbol is predicted from the text before it;
                     word: the word is read and predicted as <unk>, as word-level models are scored.
                     The count is reported ("unknown", "unknown_symbols").
    unknown="error"  refuse the text, naming the symbols.

Shape letters: N ids in the text, T tokens per call, V vocabulary size.
"""

from __future__ import annotations

import math

import numpy as np

from .config import EVAL_SEQ_LEN, LMError
from .contexts import no_grad
from .data import stream_chunks

LN2 = math.log(2.0)


class ScoreError(LMError, ValueError):
    """A text that cannot be scored (too short, or unknown symbols with unknown="error")."""


def evaluate(model, ids, seq_len=EVAL_SEQ_LEN) -> tuple[float, int]:
    """Mean nats per predicted token over ids (N,) read as one stream, and how many were predicted
    (N - 1). Runs in eval mode (no dropout) and leaves the model's training mode as it was."""
    was = model.lstm.training
    model.eval()
    total, count, state = 0.0, 0, None
    try:
        for x, y in stream_chunks(ids, seq_len):                    # (T, 1) each
            with no_grad():                                         # scoring keeps nothing for a backward
                loss, state = model.loss(x, y, state)
            total += loss * y.size
            count += y.size
    finally:
        model._cache = None
        model.train(was)
    return total / max(count, 1), count


def unknown_text(symbols) -> str:
    shown = " ".join(repr(s) for s in symbols[:10]) + (" ..." if len(symbols) > 10 else "")
    return f"{len(symbols)} symbol(s) not in the model's vocabulary: {shown}"


def known_ids(tokenizer, text, unknown="skip") -> tuple[np.ndarray, list[str], int]:
    """The ids of text for scoring, the distinct unknown symbols (sorted) and how many tokens were
    unknown. Char and jamo leave unknown symbols out; word maps them to <unk> (see the docstring)."""
    tokens = tokenizer.tokenize(text)
    missing = [t for t in tokens if t not in tokenizer.index]
    symbols = sorted(set(missing))
    if missing and unknown == "error":
        raise ScoreError(f"the text has {unknown_text(symbols)} (--unknown skip scores the rest)")
    if tokenizer.unk_id is not None:          # word (always), or built with an unknown symbol
        return tokenizer.encode(text), symbols, len(missing)
    index = tokenizer.index
    ids = np.fromiter((index[t] for t in tokens if t in index), dtype=np.int64)
    return ids, symbols, len(missing)


def score_text(model, tokenizer, text, unknown="skip", seq_len=EVAL_SEQ_LEN) -> dict:
    """Loss of a model on a text: {"loss_nats", "tokens", "unknown", "unknown_symbols", and
    "bits_per_char" with "characters" (char, jamo) or "perplexity" (word)}."""
    ids, symbols, n_unknown = known_ids(tokenizer, text, unknown)
    if len(ids) < 2:
        skipped = f" ({unknown_text(symbols)} skipped)" if symbols else ""
        raise ScoreError(f"the text has {len(ids)} token(s) the model knows{skipped}; at least 2 are needed "
                         f"to score it")
    nats, n = evaluate(model, ids, seq_len)
    out = {"loss_nats": nats, "tokens": n, "tokenizer": tokenizer.kind, "unknown": n_unknown,
           "unknown_symbols": symbols}
    if tokenizer.kind == "word":
        out["perplexity"] = math.exp(nats)
    else:
        characters = len(tokenizer.decode(ids))       # the characters actually scored
        out["bits_per_char"] = nats / LN2 * (len(ids) / characters)
        out["characters"] = characters
    return out
