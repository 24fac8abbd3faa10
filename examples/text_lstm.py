"""Predict the third word from the first two: the smallest LSTM lesson, trained end to end by hand.

    python examples/text_lstm.py [--epochs 500] [--seed 0]

    "i like dog", "i love coffee", "i hate milk", "you like cat", "you love milk", "you hate coffee"
    input: the first two words, one-hot          target: the third word

Neither word alone decides the answer ("like" -> dog or cat; "i" -> dog, coffee or milk), so the
LSTM must carry the first word in its state until it has read the second.

The model and its hand-written backward pass (no autograd):
    x          (B, L, V)   one-hot words, batch_first
    out, _ = LSTM(x)       (B, L, H)   lstmkit.LSTM, hidden size 5
    z = out[:, -1] W^T + b (B, V)      a linear layer on the last step's h
    loss = -(1/B) Σ_b log softmax(z)[b, y_b]         cross-entropy
    dz = (softmax(z) - onehot(y)) / B;   dW = dz^T h;   db = Σ_b dz;   dh = dz W
    dout[:, -1] = dh (the earlier step has no loss of its own); LSTM.backward(dout) adds into .grads
Adam, learning rate 0.01, 500 epochs of the whole batch (the six sentences).

Shape letters: B batch (6 sentences), L input length (2 words), V vocabulary (9 words), H hidden (5).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from lstmkit import LSTM  # noqa: E402
from lstmkit.optim import Adam  # noqa: E402

SENTENCES = ["i like dog", "i love coffee", "i hate milk", "you like cat", "you love milk", "you hate coffee"]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Predict the third word of six sentences from the first two.")
    ap.add_argument("--epochs", type=int, default=500, help="training epochs (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed (default: %(default)s)")
    args = ap.parse_args(argv)

    words = sorted({w for s in SENTENCES for w in s.split()})
    index = {w: i for i, w in enumerate(words)}
    V, H = len(words), 5
    ids = np.array([[index[w] for w in s.split()] for s in SENTENCES])    # (B, 3)
    x = np.eye(V, dtype=np.float32)[ids[:, :2]]                          # (B, L, V) one-hot
    y = ids[:, 2]                                                        # (B,)
    B = len(y)

    lstm = LSTM(V, H, batch_first=True, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    bound = 1.0 / np.sqrt(H)                                  # torch.nn.Linear's initialisation
    W = rng.uniform(-bound, bound, (V, H)).astype(np.float32)
    b = rng.uniform(-bound, bound, V).astype(np.float32)
    params = dict(lstm.named_parameters())                    # live arrays, updated in place
    params.update({"linear.weight": W, "linear.bias": b})
    opt = Adam(params, args.lr)

    for epoch in range(1, args.epochs + 1):
        out, _ = lstm(x)                                      # (B, L, H)
        h = out[:, -1]                                        # (B, H)
        z = h @ W.T + b                                       # (B, V)
        z -= z.max(axis=1, keepdims=True)                     # the same softmax, no overflow in exp
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(B), y]))
        if epoch % 100 == 0:
            print(f"Epoch: {epoch:04d} cost = {loss:.6f}")

        dz = p.copy()
        dz[np.arange(B), y] -= 1.0
        dz /= B                                               # (B, V)
        dout = np.zeros_like(out)
        dout[:, -1] = dz @ W                                  # only the last step feeds the loss
        lstm.zero_grad()
        lstm.backward(dout)
        grads = dict(lstm.grads)
        grads.update({"linear.weight": dz.T @ h, "linear.bias": dz.sum(axis=0)})
        opt.step(grads)

    out, _ = lstm(x)
    predicted = (out[:, -1] @ W.T + b).argmax(axis=1)
    right = 0
    for s, pred in zip(SENTENCES, predicted):
        first_two = " ".join(s.split()[:2])
        ok = words[pred] == s.split()[2]
        right += ok
        print(f"{first_two} -> {words[pred]}" + ("" if ok else f"   (wrong: expected {s.split()[2]})"))
    print(f"{right}/{B} right")
    return 0 if right == B else 1


if __name__ == "__main__":
    sys.exit(main())
