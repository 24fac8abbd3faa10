"""Generation from a trained language model: temperature, top-k, top-p (nucleus), greedy, prime text.

At each step, from the logits z (V,) of the last token:
    p = softmax(z / τ)                              temperature τ > 0 (τ < 1 sharper, τ > 1 flatter),
                                                    computed as exp((z - max z) / τ) / Σ: no overflow for any τ
    top-k:  keep the k largest p, zero the rest
    top-p:  keep the smallest set of largest p whose sum reaches p_top, zero the rest
    renormalise, draw the next id by inverting the cumulative sum at u ~ U[0, 1)
    greedy: the next id is argmax z (no randomness)
The draws come from numpy.random.default_rng(seed): the same seed gives the same text.

Shape letters: V vocabulary size.
"""

from __future__ import annotations

import numpy as np

from .config import LMError
from .contexts import no_grad


class SampleError(LMError, ValueError):
    """A prime text the model cannot read."""


def filter_probs(z, temperature=1.0, top_k=0, top_p=1.0):
    """Logits (V,) -> probabilities (V,) float64 after temperature, top-k and top-p."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore"):     # a tiny τ sends (z - max) / τ to -inf: p -> one-hot, as τ -> 0
        p = np.exp((z - z.max()) / temperature)
    p /= p.sum()
    if top_k and top_k < len(p):
        kth = np.partition(p, len(p) - top_k)[len(p) - top_k]
        p = np.where(p >= kth, p, 0.0)
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        keep = int(np.searchsorted(csum, top_p * csum[-1])) + 1       # smallest prefix reaching top_p
        mask = np.zeros_like(p)
        mask[order[:keep]] = 1.0
        p = p * mask
    return p / p.sum()


def draw(p, rng) -> int:
    """Inverse-CDF draw of one index from probabilities p (V,)."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


class Sampler:
    """Generates text from (model, tokenizer).

        text = Sampler(model, tokenizer).generate(500, temperature=0.8, prime="형식은", seed=1)
    """

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer

    def start(self, prime: str, rng):
        """Feed the prime (or a newline / a random token when there is none); return logits and state."""
        model = self.model
        if prime:
            self.tok.check_known(prime, "the prime text")
            ids = self.tok.encode(prime)
            if len(ids) == 0:
                raise SampleError("the prime text has no tokens")
        else:
            nl = self.tok.index.get("\n")
            ids = np.array([nl if nl is not None else int(rng.integers(self.tok.vocab_size))])
        logits, state, _ = model.forward(ids[:, None], None)          # (t, 1, V)
        return logits[-1, 0], state, ids

    def generate(self, length, temperature=1.0, top_k=0, top_p=1.0, greedy=False, prime="", seed=None,
                 on_text=None) -> str:
        """Generate `length` tokens after the prime; returns prime + generated text.  on_text(piece)
        is called with each piece of text as soon as it is final (the prime first).  Runs in eval
        mode and under no_grad (generation never runs a backward), leaving the model as it was."""
        rng = np.random.default_rng(seed)
        was_training = self.model.lstm.training
        self.model.eval()
        try:
            with no_grad():
                return self._generate(length, temperature, top_k, top_p, greedy, prime, rng, on_text)
        finally:
            self.model.train(was_training)

    def _generate(self, length, temperature, top_k, top_p, greedy, prime, rng, on_text) -> str:
        z, state, prime_ids = self.start(prime, rng)
        pieces = [prime] if prime else []
        if on_text and prime:
            on_text(prime)
        dec = self.tok.stream()
        if prime and self.tok.kind == "word":
            dec.prev_word = self.tok.vocab[int(prime_ids[-1])]
        for _ in range(length):
            nxt = int(np.argmax(z)) if greedy else draw(filter_probs(z, temperature, top_k, top_p), rng)
            piece = dec.feed(nxt)
            if piece:
                pieces.append(piece)
                if on_text:
                    on_text(piece)
            z, state = self.model.step_logits(nxt, state)
        tail = dec.flush()
        if tail:
            pieces.append(tail)
            if on_text:
                on_text(tail)
        return "".join(pieces)
