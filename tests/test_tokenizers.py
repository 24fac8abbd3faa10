"""Tokenizers: the jamo round trip on any Korean text, sorted vocabularies, unknown symbols named,
streamed decoding equal to whole decoding."""

import unicodedata

import numpy as np
import pytest

from lstmkit.tokenizers import (JamoTokenizer, StreamDecoder, VocabularyError, build_tokenizer, compose_hangul,
                                decompose_hangul, tokenizer_from_dict)


def test_every_hangul_syllable_round_trips_and_matches_unicode_nfd():
    syllables = "".join(chr(s) for s in range(0xAC00, 0xD7A4))
    jamo = decompose_hangul(syllables)
    assert jamo == unicodedata.normalize("NFD", syllables)
    assert compose_hangul(jamo) == syllables


def test_jamo_round_trips_random_korean_text():
    rng = np.random.default_rng(0)
    pool = [chr(c) for c in rng.integers(0xAC00, 0xD7A4, 300)] + list(" \n.,?!\"'") + \
        list("無情善馨ㄱㅏㅎ") + list("abcXYZ0123")
    text = unicodedata.normalize("NFC", "".join(rng.choice(pool, 3000)))
    tok = build_tokenizer("jamo", text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) > len(text)                              # syllables became 2-3 symbols
    assert tok.vocab_size < len(set(text))                   # ... from a much smaller alphabet


def test_jamo_vocabulary_of_korean_is_small():
    text = "경성학교 영어 교사 이형식은 오후 두시 사년급 영어 시간을 마치고 내려쪼이는 유월 볕에 땀을 흘리면서"
    char, jamo = build_tokenizer("char", text), build_tokenizer("jamo", text)
    assert jamo.vocab_size < char.vocab_size
    assert all(len(t) == 1 for t in jamo.vocab)


@pytest.mark.parametrize("kind", ["char", "jamo", "word"])
def test_vocab_sorted_and_serialisable(kind):
    text = "b a c\na 가 나다\n"
    tok = build_tokenizer(kind, text)
    assert tok.vocab == sorted(tok.vocab) and len(set(tok.vocab)) == len(tok.vocab)
    again = tokenizer_from_dict(tok.to_dict())
    assert again.vocab == tok.vocab and again.kind == kind
    assert again.decode(again.encode(text)).split() == text.split()


def test_char_round_trip_and_unknown_symbols_are_named():
    tok = build_tokenizer("char", "hello\n")
    assert tok.decode(tok.encode("hello\nhole")) == "hello\nhole"
    with pytest.raises(VocabularyError, match=r"2 symbol\(s\).*'x'.*'z'"):
        tok.encode("hexzoo")


def test_word_tokenizer_keeps_newlines_and_maps_unknown_words():
    text = "the cat sat\non the mat\n"
    tok = build_tokenizer("word", text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("the dog sat")) == "the <unk> sat"


def test_unsorted_vocab_is_rejected():
    with pytest.raises(ValueError, match="sorted"):
        JamoTokenizer(["b", "a"])


@pytest.mark.parametrize("kind", ["char", "jamo", "word"])
def test_stream_decoder_equals_whole_decode(kind):
    text = "무정(無情) 이형식은 갔다.\n값 ㄱ 가 읽었다 형식\n"
    tok = build_tokenizer(kind, text)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, tok.vocab_size, 400)          # arbitrary sequences, including broken jamo
    dec = StreamDecoder(tok)
    streamed = "".join(dec.feed(i) for i in ids) + dec.flush()
    assert streamed == tok.decode(ids)


@pytest.mark.parametrize("d,message", [
    ({"kind": "word", "vocab": ["\n", "fox", "the"]}, r"must hold '<unk>'"),          # encode would crash
    ({"kind": "jamo", "vocab": ["", "a"]}, r"token 0 is ''; expected a non-empty string"),
    ({"kind": "char", "vocab": ["", "a"]}, r"token 0 is ''"),
    ({"kind": "char", "vocab": ["a", "bc"]}, r"token 1 is 'bc'; a char vocabulary holds single characters"),
    ({"kind": "jamo", "vocab": ["가"]}, r"Hangul syllable '가'"),
    ({"kind": "word", "vocab": ["<unk>", "a b"]}, r"token 1 is 'a b'"),
    ({"kind": "word", "vocab": [" ", "<unk>"]}, r"token 0 is ' '"),
    ({"kind": "char", "vocab": ["\ud800"]}, r"not valid Unicode"),
    ({"kind": "char", "vocab": ["a", "a"]}, r"sorted and without duplicates"),
    ({"kind": "char", "vocab": ["b", "a"]}, r"sorted"),
    ({"kind": "char", "vocab": []}, r"vocab has 0 tokens"),
    ({"kind": "char", "vocab": "abc"}, r"list of strings"),
    ({"kind": "bpe", "vocab": ["a"]}, r"unknown tokenizer kind"),
])
def test_a_stored_vocabulary_is_checked_token_by_token(d, message):
    with pytest.raises(ValueError, match=message):
        tokenizer_from_dict(d)


def test_a_word_vocabulary_of_one_line_has_no_newline_and_is_valid():
    tok = build_tokenizer("word", "one line only")
    assert "\n" not in tok.vocab
    assert tokenizer_from_dict(tok.to_dict()).vocab == tok.vocab


def test_a_vocabulary_too_large_is_refused(monkeypatch):
    from lstmkit import tokenizers
    monkeypatch.setattr(tokenizers, "MAX_VOCAB", 3)
    with pytest.raises(ValueError, match="vocab has 4 tokens; expected 1 to 3"):
        tokenizer_from_dict({"kind": "char", "vocab": list("abcd")})


def test_unknown_symbol_and_min_count():
    from lstmkit.tokenizers import UNK_CHAR, build_tokenizer, tokenizer_from_dict
    tok = build_tokenizer("char", "aaab bc\n", min_count=2, unknown=True)
    assert tok.vocab == sorted(["a", "b", UNK_CHAR])                  # ' ', 'c', '\n' seen once: left out
    assert tok.encode("abcz").tolist() == [tok.index["a"], tok.index["b"], tok.unk_id, tok.unk_id]
    tok.check_known("anything at all")                                  # unknown symbols are fine
    again = tokenizer_from_dict(tok.to_dict())
    assert again.vocab == tok.vocab and again.unk_id == tok.unk_id
    jamo = build_tokenizer("jamo", "한국 한국 한", min_count=3, unknown=True)
    assert jamo.encode("국")[0] == jamo.unk_id and jamo.decode(jamo.encode("한")) == "한"
    word = build_tokenizer("word", "a a b", min_count=2)
    assert word.vocab == ["<unk>", "a"] and word.encode("a b").tolist() == [1, 0]
    plain = build_tokenizer("char", "ab")
    assert plain.unk_id is None and "unknown" not in plain.to_dict()
    for bad in ({"kind": "char", "vocab": ["a"], "unknown": UNK_CHAR},
                {"kind": "char", "vocab": ["a", UNK_CHAR], "unknown": "a"},
                {"kind": "word", "vocab": ["<unk>"], "unknown": UNK_CHAR}):
        with pytest.raises(ValueError, match="unknown must be"):
            tokenizer_from_dict(bad)
