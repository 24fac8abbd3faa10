"""Tokenizers: text <-> list of tokens <-> ids.  The vocabulary is sorted and stored with the model.

- `char`: one token per Unicode code point (after NFC, see data.py).
- `jamo`: every precomposed Hangul syllable S (U+AC00..U+D7A3) split into its conjoining jamo,
      s = S - 0xAC00;  L = 0x1100 + s // 588;  V = 0x1161 + (s % 588) // 28;  T = 0x11A7 + s % 28
      (T omitted when s % 28 == 0), and recomposed by the inverse S = 0xAC00 + (L'*21 + V')*28 + T'
      before text is shown.  무정's ~1,700 symbols become ~700 (the Hanja and punctuation stay whole).
- `word`: whitespace-separated words plus "\n" as a token of its own; decoding joins words with one
      space.  Words not in the vocabulary map to "<unk>".

An unknown symbol: the word tokenizer always has "<unk>"; char and jamo get one, U+FFFD (the
Unicode replacement character), when built with unknown=True (the classifier's vocabularies, whose
inputs at prediction time hold symbols no training text had). With min_count > 1, symbols seen
fewer times in the training text are left out of the vocabulary, so their uses teach the unknown
symbol's embedding.

Shape letters: V vocabulary size.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from .config import LMError

S_BASE, L_BASE, V_BASE, T_BASE = 0xAC00, 0x1100, 0x1161, 0x11A7
L_COUNT, V_COUNT, T_COUNT = 19, 21, 28
N_COUNT = V_COUNT * T_COUNT          # 588 syllables per leading consonant
S_COUNT = L_COUNT * N_COUNT          # 11,172 syllables
UNK = "<unk>"
UNK_CHAR = "\ufffd"                 # the unknown symbol of char and jamo vocabularies built with unknown=True
MAX_VOCAB = 1 << 22                  # tokens a stored vocabulary may hold (checkpoint.MODEL_LIMITS agrees)


class VocabularyError(LMError, ValueError):
    """A text with symbols the model's vocabulary does not have."""


def _is_syllable(ch: str) -> bool:
    return S_BASE <= ord(ch) < S_BASE + S_COUNT


def _is_l(ch: str) -> bool:
    return L_BASE <= ord(ch) < L_BASE + L_COUNT


def _is_v(ch: str) -> bool:
    return V_BASE <= ord(ch) < V_BASE + V_COUNT


def _is_t(ch: str) -> bool:
    return T_BASE < ord(ch) < T_BASE + T_COUNT


def decompose_hangul(text: str) -> str:
    """Split each precomposed Hangul syllable into 2 or 3 conjoining jamo; other characters unchanged."""
    out = []
    for ch in text:
        if _is_syllable(ch):
            s = ord(ch) - S_BASE
            out.append(chr(L_BASE + s // N_COUNT))
            out.append(chr(V_BASE + (s % N_COUNT) // T_COUNT))
            if s % T_COUNT:
                out.append(chr(T_BASE + s % T_COUNT))
        else:
            out.append(ch)
    return "".join(out)


def compose_hangul(text: str) -> str:
    """Inverse of decompose_hangul: L V [T] -> syllable; jamo that form no syllable are left as they are."""
    out = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if _is_l(ch) and i + 1 < n and _is_v(text[i + 1]):
            s = ((ord(ch) - L_BASE) * V_COUNT + (ord(text[i + 1]) - V_BASE)) * T_COUNT
            i += 2
            if i < n and _is_t(text[i]):
                s += ord(text[i]) - T_BASE
                i += 1
            out.append(chr(S_BASE + s))
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class Tokenizer:
    """Base class: `vocab` is a sorted list of token strings; id = position in it."""

    kind = ""
    unk_token = UNK_CHAR          # what an unknown symbol becomes, when the vocabulary holds it

    def __init__(self, vocab, unknown=False):
        vocab = list(vocab)
        if vocab != sorted(set(vocab)):
            raise ValueError("vocabulary must be sorted and without duplicates")
        if not vocab:
            raise ValueError("vocabulary is empty")
        self.vocab = vocab
        self.index = {tok: i for i, tok in enumerate(vocab)}
        if unknown and self.unk_token not in self.index:
            raise ValueError(f"a vocabulary with an unknown symbol must hold {self.unk_token!r}")
        self.unk_id = self.index[self.unk_token] if unknown else None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # text -> tokens (strings); implemented by subclasses
    def tokenize(self, text: str) -> list[str]:
        raise NotImplementedError

    # tokens -> text; implemented by subclasses
    def detokenize(self, tokens) -> str:
        raise NotImplementedError

    @classmethod
    def _tokens_for_vocab(cls, text: str):
        raise NotImplementedError

    def unknown(self, text: str) -> list[str]:
        """The distinct tokens of `text` that are not in the vocabulary, in order of appearance."""
        seen = {}
        for tok in self.tokenize(text):
            if tok not in self.index and tok not in seen:
                seen[tok] = None
        return list(seen)

    def check_known(self, text: str, what: str = "the text") -> None:
        """Raise VocabularyError naming (the first 20 of) the symbols of text not in the vocabulary
        (none, when the vocabulary has an unknown symbol: they become it)."""
        if self.unk_id is not None:
            return
        missing = self.unknown(text)
        if missing:
            shown = " ".join(repr(m) for m in missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise VocabularyError(f"{what} has {len(missing)} symbol(s) not in the model's vocabulary: {shown}")

    def encode(self, text: str) -> np.ndarray:
        """text -> int64 ids. Symbols not in the vocabulary become the unknown symbol when there is
        one; otherwise VocabularyError lists them."""
        toks = self.tokenize(text)
        if self.unk_id is not None:
            unk, index = self.unk_id, self.index
            return np.fromiter((index.get(t, unk) for t in toks), dtype=np.int64, count=len(toks))
        try:
            return np.fromiter((self.index[t] for t in toks), dtype=np.int64, count=len(toks))
        except KeyError:
            pass
        self.check_known(text)          # a KeyError means some symbol is unknown: this raises
        raise AssertionError("unreachable")

    def decode(self, ids) -> str:
        return self.detokenize([self.vocab[int(i)] for i in ids])

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "vocab": self.vocab}
        if self.unk_id is not None and self.kind != "word":
            d["unknown"] = self.unk_token
        return d


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, vocab=("\n",), unknown=False):
        super().__init__(vocab, unknown)

    def tokenize(self, text):
        return list(text)

    def detokenize(self, tokens):
        return "".join(tokens)

    @classmethod
    def _tokens_for_vocab(cls, text):
        return set(text)


class JamoTokenizer(Tokenizer):
    kind = "jamo"

    def __init__(self, vocab=("\n",), unknown=False):
        super().__init__(vocab, unknown)

    def tokenize(self, text):
        return list(decompose_hangul(text))

    def detokenize(self, tokens):
        return compose_hangul("".join(tokens))

    @classmethod
    def _tokens_for_vocab(cls, text):
        return set(decompose_hangul(text))


_WORD_RE = re.compile(r"\n|[^\s]+")


class WordTokenizer(Tokenizer):
    kind = "word"
    unk_token = UNK

    def __init__(self, vocab=("\n", UNK), unknown=True):
        super().__init__(vocab, unknown=True)       # a word vocabulary always has <unk>

    def tokenize(self, text):
        return _WORD_RE.findall(text)

    def detokenize(self, tokens):
        out = []
        for tok in tokens:
            if tok != "\n" and out and out[-1] != "\n":
                out.append(" ")
            out.append(tok)
        return "".join(out)

    @classmethod
    def _tokens_for_vocab(cls, text):
        return set(_WORD_RE.findall(text)) | {UNK}



TOKENIZER_CLASSES = {cls.kind: cls for cls in (CharTokenizer, JamoTokenizer, WordTokenizer)}


def build_tokenizer(kind: str, text: str, min_count: int = 1, unknown: bool = False) -> Tokenizer:
    """The tokenizer `kind` with the sorted vocabulary of `text`: the tokens seen at least min_count
    times, and with unknown=True (always for word) the unknown symbol."""
    if kind not in TOKENIZER_CLASSES:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZER_CLASSES)}, got {kind!r}")
    cls = TOKENIZER_CLASSES[kind]
    if min_count <= 1 and not unknown:
        return cls(sorted(cls._tokens_for_vocab(text)))
    counts = Counter(cls("\n", unknown=False).tokenize(text) if kind != "word" else _WORD_RE.findall(text))
    vocab = {t for t, n in counts.items() if n >= min_count} | {cls.unk_token}
    return cls(sorted(vocab), unknown=True)


def _check_token(kind: str, i: int, tok) -> None:
    """ValueError unless tok is a token the tokenizer `kind` could produce (and print)."""
    if not isinstance(tok, str) or not tok:
        raise ValueError(f"token {i} is {tok!r}; expected a non-empty string")
    try:
        tok.encode("utf-8")             # a lone surrogate ("\\ud800" in JSON) cannot be printed
    except UnicodeEncodeError:
        raise ValueError(f"token {i} is {tok!r}, which is not valid Unicode text") from None
    if kind in ("char", "jamo") and len(tok) != 1:
        raise ValueError(f"token {i} is {tok!r}; a {kind} vocabulary holds single characters")
    if kind == "jamo" and _is_syllable(tok):
        # text is decomposed before lookup, so a precomposed syllable would be an id nothing maps to
        raise ValueError(f"token {i} is the Hangul syllable {tok!r}; a jamo vocabulary holds its jamo")
    if kind == "word" and tok != "\n" and not _WORD_RE.fullmatch(tok):
        raise ValueError(f"token {i} is {tok!r}; a word is \"\\n\" or characters without whitespace")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """The tokenizer of to_dict()'s {"kind", "vocab"}; ValueError naming the problem for anything else.

    A vocabulary is read from files users share, so every token is checked: a sorted list of at most
    MAX_VOCAB unique non-empty strings; char and jamo tokens are single characters (jamo: no
    precomposed syllables); word tokens hold no whitespace except the token "\\n", and "<unk>" must be
    there (encode maps unknown words to it).  "\\n" itself is optional: a one-line text has none."""
    if not isinstance(d, dict):
        raise ValueError(f"expected {{\"kind\": ..., \"vocab\": [...]}}, got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in TOKENIZER_CLASSES:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    vocab = d.get("vocab")
    if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
        raise ValueError("vocab must be a list of strings")
    if not 1 <= len(vocab) <= MAX_VOCAB:
        raise ValueError(f"vocab has {len(vocab)} tokens; expected 1 to {MAX_VOCAB}")
    for i, tok in enumerate(vocab):
        _check_token(kind, i, tok)
    if kind == "word" and UNK not in vocab:
        raise ValueError(f"a word vocabulary must hold {UNK!r} (unknown words become it)")
    unknown = d.get("unknown")
    if unknown is not None and (kind == "word" or unknown != UNK_CHAR or UNK_CHAR not in vocab):
        raise ValueError(f"unknown must be {UNK_CHAR!r} and in the vocabulary of a char or jamo tokenizer, "
                         f"got {unknown!r}")
    return TOKENIZER_CLASSES[kind](vocab, unknown=unknown is not None)


class StreamDecoder:
    """Turns generated ids into text piece by piece, holding back what the next token may still change
    (a jamo tokenizer's unfinished syllable; the space before a word)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.pending: list[str] = []
        self.prev_word: str | None = None

    def feed(self, token_id: int) -> str:
        t = self.tok.vocab[int(token_id)]
        if isinstance(self.tok, JamoTokenizer):
            # composition is greedy from the left, so only the last composed character can still grow
            composed = compose_hangul("".join(self.pending) + t)
            self.pending = list(decompose_hangul(composed[-1]))
            return composed[:-1]
        if isinstance(self.tok, WordTokenizer):
            sep = " " if (t != "\n" and self.prev_word is not None and self.prev_word != "\n") else ""
            self.prev_word = t
            return sep + t
        return t

    def flush(self) -> str:
        out = compose_hangul("".join(self.pending))
        self.pending = []
        return out
