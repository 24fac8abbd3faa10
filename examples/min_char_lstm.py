"""The original experiment: a character-level LSTM on 이광수's 무정, at its original scale.

    python examples/min_char_lstm.py [--steps 3000] [--sample-every 1000] [--data FILE] [--seed 0]

Karpathy's min-char-rnn with the RNN replaced by an LSTM, as the experiment this project grows
from did it: batch 1, sequence length 25, hidden size 100, one-hot characters (무정 has about 1,700
distinct ones), Adagrad with learning rate 0.1, gradients clipped elementwise to [-5, 5], h and c
carried from chunk to chunk (truncated backpropagation through time), a 200-character sample
printed every so often. The samples start as noise; within a minute the most frequent syllables,
spaces and sentence endings (다.) appear; hours of training give the novel's names and dialogue
(use `lstmkit train` for that: minibatches and the fast path make it far quicker).

    x_t = onehot(char_t)                           (T, 1, V)
    out, (h, c) = LSTM(x, (h, c))                  (T, 1, H)      lstmkit.LSTM, hand-written BPTT
    z_t = out_t W_hy^T + b_y;  p_t = softmax(z_t)  (T, V)
    loss = -Σ_t log p_t[char_{t+1}]               summed over the 25 steps, as min-char-rnn does
    dz_t = p_t - onehot(char_{t+1});  dW_hy = Σ_t dz_t^T out_t;  db_y = Σ_t dz_t;  dout_t = dz_t W_hy
    LSTM.backward(dout) adds dW_ih, dW_hh, db into lstm.grads
    Adagrad: s += g²;  p -= 0.1 g / (√s + 1e-8)   (lstmkit.optim.Adagrad)

The printed loss is min-char-rnn's smoothed one, s = 0.999 s + 0.001 loss, starting from the loss of
a uniform guess, 25 ln V.

Shape letters: T sequence length (25), V vocabulary (distinct characters), H hidden size (100).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from lstmkit import LSTM  # noqa: E402
from lstmkit.data import read_text  # noqa: E402
from lstmkit.optim import Adagrad, clip_grad_value  # noqa: E402


def sample(lstm, W_hy, b_y, state, seed_id, n, rng):
    """n characters drawn one at a time from the model, starting after seed_id in the given state."""
    V = W_hy.shape[0]
    x = np.zeros((1, 1, V), dtype=np.float32)
    ids = []
    idx = seed_id
    for _ in range(n):
        x[...] = 0.0
        x[0, 0, idx] = 1.0
        out, state = lstm(x, state)
        z = out[0, 0] @ W_hy.T + b_y
        p = np.exp(z - z.max())
        idx = int(rng.choice(V, p=p / p.sum()))
        ids.append(idx)
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description="min-char-rnn with an LSTM, on 무정 (or any UTF-8 text).")
    ap.add_argument("--data", default="mujeong", help="a text file, or a built-in corpus name (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=3000, help="training steps of 25 characters (default: %(default)s)")
    ap.add_argument("--sample-every", type=int, default=1000, help="print a sample every N steps (default: %(default)s)")
    ap.add_argument("--sample-length", type=int, default=200, help="characters per sample (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.sample_every < 1 or args.sample_length < 1:
        ap.error("--steps, --sample-every and --sample-length must be >= 1")

    seq_length, hidden_size, learning_rate = 25, 100, 1e-1
    data = read_text(args.data)
    chars = sorted(set(data))
    V = len(chars)
    char_to_ix = {ch: i for i, ch in enumerate(chars)}
    ids = np.fromiter((char_to_ix[ch] for ch in data), dtype=np.int64, count=len(data))
    print(f"data has {len(data)} characters, {V} unique.")
    if len(ids) < seq_length + 2:
        ap.error(f"the text needs at least {seq_length + 2} characters")

    rng = np.random.default_rng(args.seed)
    lstm = LSTM(V, hidden_size, seed=args.seed)
    W_hy = (rng.standard_normal((V, hidden_size)) * 0.01).astype(np.float32)   # min-char-rnn's init
    b_y = np.zeros(V, dtype=np.float32)
    params = dict(lstm.named_parameters())
    params.update({"W_hy": W_hy, "b_y": b_y})
    opt = Adagrad(params, learning_rate, eps=1e-8)
    eye = np.eye(V, dtype=np.float32)

    smooth_loss = -np.log(1.0 / V) * seq_length      # loss at iteration 0
    recent = []
    p = 0
    state = None
    t0 = time.perf_counter()
    for n in range(args.steps + 1):
        if p + seq_length + 1 >= len(ids) or n == 0:
            state = None                              # reset the memory at the start of the text
            p = 0
        inputs, targets = ids[p:p + seq_length], ids[p + 1:p + seq_length + 1]

        if n % args.sample_every == 0 or n == args.steps:
            sampled = sample(lstm, W_hy, b_y, state, int(inputs[0]), args.sample_length, rng)
            text = "".join(chars[i] for i in sampled)
            print(f"----\n {text} \n----")

        x = eye[inputs][:, None, :]                   # (T, 1, V) one-hot
        out, state = lstm(x, state)                   # (T, 1, H); state carried to the next chunk
        hs = out[:, 0]                                # (T, H)
        z = hs @ W_hy.T + b_y                         # (T, V)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        probs = e / e.sum(axis=1, keepdims=True)
        loss = -float(np.log(probs[np.arange(seq_length), targets]).sum())

        dz = probs
        dz[np.arange(seq_length), targets] -= 1.0     # backprop into the softmax's input
        lstm.zero_grad()
        lstm.backward((dz @ W_hy)[:, None, :])        # no gradient flows into the carried state
        grads = dict(lstm.grads)
        grads.update({"W_hy": dz.T @ hs, "b_y": dz.sum(axis=0)})
        clip_grad_value(grads, 5.0)                   # mitigate exploding gradients
        opt.step(grads)

        smooth_loss = smooth_loss * 0.999 + loss * 0.001
        recent.append(loss / seq_length)
        if n % args.sample_every == 0 or n == args.steps:
            print(f"iter {n}, loss: {smooth_loss:f}")
        p += seq_length

    tail = recent[-100:]
    print(f"mean loss per character over the last {len(tail)} steps: {np.mean(tail):.3f} nats "
          f"(a uniform guess: ln {V} = {np.log(V):.3f}); {args.steps} steps in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
