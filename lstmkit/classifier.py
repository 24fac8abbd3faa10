"""The sequence classifier: embedding -> RNN, GRU or LSTM over a packed batch -> pooling over time ->
dropout -> linear -> softmax cross-entropy.

Forward, for B sequences of ids of lengths ℓ_b (padded to T) and labels y (B,):
    x = E[ids]                                       (T, B, E)   padding rows are never read:
    out = RNN(pack(x, ℓ))                            (T, B, D·H) the packed batch runs only real steps
    v_b = pool(out[:ℓ_b, b])                         (B, D·H)
        last:  forward half at each sequence's own last step, backward half at its first step
               (where the reverse direction ends), i.e. the top layer's h_n of both directions
        max:   max over t < ℓ_b, feature by feature
        mean:  (1/ℓ_b) Σ_{t<ℓ_b} out[t, b]
    v = v ⊙ m / (1 - p)                              dropout on the pooled features (training only)
    z = v W^T + b                                    (B, C)
    loss = -(1/B) Σ_b log softmax(z_b)[y_b]
Backward walks it in reverse: dz = (softmax(z) - onehot(y)) / B; dW = dz^T v; dv = dz W; dv ⊙= m/(1-p);
dout from the pooling (last: dv placed at the two positions it came from; max: at each feature's
argmax; mean: dv/ℓ_b on every real step); dx = RNN.backward(pack(dout)); dE[ids] += dx on real steps.

Parameter names: "embedding.weight" (V, E), "rnn." + torch.nn.LSTM/GRU/RNN's keys, "head.weight"
(C, D·H), "head.bias" (C,). Initialisation as torch.nn (embedding N(0, 1), the rest U(-1/√k, 1/√k)).

Shape letters: V vocabulary, E embedding size, H hidden size, D directions (1 or 2), L layers,
T longest sequence, B batch, C classes.
"""

from __future__ import annotations

import numpy as np

from .config import CELLS, POOLS
from .model import (ModelBase, embedding_backward, embedding_forward, linear_backward, linear_forward,
                    softmax_cross_entropy_backward, softmax_cross_entropy_forward)
from .utils.rnn import pack_padded_sequence, pad_packed_sequence


def _rnn_class(cell):
    from . import modules
    return {"lstm": modules.LSTM, "gru": getattr(modules, "GRU", None), "rnn": modules.RNN}[cell]


# ---- pooling over time, forward and backward ----------------------------------------------------

def pool_forward(out, lengths, mode, D):
    """out (T, B, D*H) with zeros past each length, lengths (B,) -> v (B, D*H) and the cache."""
    T, B, F = out.shape
    lengths = np.asarray(lengths)
    rows = np.arange(B)
    if mode == "last":
        H = F // D
        v = out[lengths - 1, rows].copy()                                  # forward: own last step
        if D == 2:
            v[:, H:] = out[0, :, H:]                                       # reverse: ends at step 0
        return v, {"mode": mode, "lengths": lengths, "shape": out.shape, "D": D}
    valid = np.arange(T)[:, None] < lengths[None, :]                       # (T, B)
    if mode == "max":
        masked = np.where(valid[:, :, None], out, -np.inf)
        arg = masked.argmax(axis=0)                                        # (B, F)
        return np.take_along_axis(out, arg[None], axis=0)[0], {"mode": mode, "arg": arg, "shape": out.shape}
    v = out.sum(axis=0) / lengths[:, None].astype(out.dtype)                # padding is zero
    return v, {"mode": mode, "valid": valid, "lengths": lengths, "shape": out.shape}


def pool_backward(dv, cache):
    """dv (B, D*H) -> dout (T, B, D*H), zero past each length."""
    T, B, F = cache["shape"]
    dout = np.zeros((T, B, F), dtype=dv.dtype)
    rows = np.arange(B)
    if cache["mode"] == "last":
        lengths, D = cache["lengths"], cache["D"]
        H = F // D
        dout[lengths - 1, rows, :H] += dv[:, :H]
        if D == 2:
            dout[0, :, H:] += dv[:, H:]
        else:
            dout[lengths - 1, rows, H:] += dv[:, H:]
        return dout
    if cache["mode"] == "max":
        np.put_along_axis(dout, cache["arg"][None], dv[None], axis=0)
        return dout
    dout += (dv / cache["lengths"][:, None].astype(dv.dtype))[None]
    dout *= cache["valid"][:, :, None]
    return dout


# ---- the model ----------------------------------------------------------------------------------

class SequenceClassifier(ModelBase):
    """Classifies sequences of ids into C classes.

        model = SequenceClassifier(vocab_size=2000, num_classes=2, cell="lstm", bidirectional=True)
        loss = model.loss([ids_0, ids_1, ...], labels)     # ids_b (ℓ_b,) int, labels (B,) int
        model.backward()                                    # adds into model.grads
        probs = model.predict_proba([ids_0, ...])           # (B, C), no cache kept
    """

    def __init__(self, vocab_size, num_classes, cell="lstm", hidden_size=128, num_layers=1,
                 bidirectional=False, dropout=0.0, embed_size=0, pool="max", *, seed=None, dtype=np.float32):
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.vocab_size, self.num_classes = int(vocab_size), int(num_classes)
        self.cell, self.pool, self.dropout = cell, pool, float(dropout)
        self.hidden_size, self.num_layers, self.bidirectional = int(hidden_size), int(num_layers), bool(bidirectional)
        self.embed_size = int(embed_size) if embed_size else self.hidden_size
        self.dtype = np.dtype(dtype)
        D = 2 if self.bidirectional else 1
        s_emb, s_rnn, s_head, s_drop = np.random.SeedSequence(seed).spawn(4)
        V, E, H, C = self.vocab_size, self.embed_size, self.hidden_size, self.num_classes
        self.embedding = np.random.default_rng(s_emb).standard_normal((V, E)).astype(self.dtype)
        self.rnn = _rnn_class(cell)(E, H, self.num_layers, dropout=self.dropout if self.num_layers > 1 else 0.0,
                                    bidirectional=self.bidirectional, dtype=self.dtype,
                                    seed=int(s_rnn.generate_state(1, np.uint64)[0]))
        bound = 1.0 / np.sqrt(D * H)
        rng = np.random.default_rng(s_head)
        self.head_weight = rng.uniform(-bound, bound, (C, D * H)).astype(self.dtype)
        self.head_bias = rng.uniform(-bound, bound, (C,)).astype(self.dtype)
        self.dropout_rng = np.random.default_rng(s_drop)
        self.training = True
        self.params = {"embedding.weight": self.embedding, "head.weight": self.head_weight,
                       "head.bias": self.head_bias}
        self.params.update({"rnn." + k: p for k, p in self.rnn.named_parameters()})
        self.grads = {k: np.zeros_like(self.params[k]) for k in ("embedding.weight", "head.weight", "head.bias")}
        self.grads.update({"rnn." + k: g for k, g in self.rnn.grads.items()})
        self._cache = None

    RECURRENT = "rnn."       # the recurrent module's attribute and its key prefix in params and grads
    # -- what a checkpoint holds (checkpoint.py): config as JSON, arrays per safetensors file
    FORMAT = "lstmkit-classifier"
    ARRAY_FILES = {"rnn.safetensors": "rnn.", "model.safetensors": ""}       # file -> key prefix in params
    SIZES = ("vocab_size", "embed_size", "hidden_size", "num_layers", "num_classes")

    def checkpoint_arrays(self) -> dict:
        """{file: {key: array}}: the RNN under torch.nn.LSTM/GRU/RNN's own keys, the rest under torch.nn's."""
        return {"rnn.safetensors": self.rnn.state_dict(),
                "model.safetensors": {k: v for k, v in self.params.items() if not k.startswith("rnn.")}}

    @staticmethod
    def check_config(cfg: dict) -> None:
        if cfg.get("cell") not in CELLS:
            raise ValueError(f"cell is {cfg.get('cell')!r}, expected one of {', '.join(CELLS)}")
        if cfg.get("pool") not in POOLS:
            raise ValueError(f"pool is {cfg.get('pool')!r}, expected one of {', '.join(POOLS)}")
        if type(cfg.get("bidirectional")) is not bool:
            raise ValueError(f"bidirectional is {cfg.get('bidirectional')!r}, expected true or false")
        if cfg["num_classes"] < 2:
            raise ValueError(f"num_classes is {cfg['num_classes']}, expected 2 or more")

    @staticmethod
    def expected_shapes(cfg: dict) -> dict:
        """{file: {key: shape}} that a config's sizes imply, checked against the files' headers."""
        V, H, L, C = cfg["vocab_size"], cfg["hidden_size"], cfg["num_layers"], cfg["num_classes"]
        E = cfg["embed_size"] or H
        D = 2 if cfg["bidirectional"] else 1
        G = {"lstm": 4, "gru": 3, "rnn": 1}[cfg["cell"]] * H
        rnn = {}
        for k in range(L):
            for sfx in ("", "_reverse")[:D]:
                rnn.update({f"weight_ih_l{k}{sfx}": (G, E if k == 0 else D * H), f"weight_hh_l{k}{sfx}": (G, H),
                            f"bias_ih_l{k}{sfx}": (G,), f"bias_hh_l{k}{sfx}": (G,)})
        return {"rnn.safetensors": rnn,
                "model.safetensors": {"embedding.weight": (V, E), "head.weight": (C, D * H), "head.bias": (C,)}}

    def config(self) -> dict:
        return {"vocab_size": self.vocab_size, "num_classes": self.num_classes, "cell": self.cell,
                "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "bidirectional": self.bidirectional, "dropout": self.dropout, "embed_size": self.embed_size,
                "pool": self.pool, "dtype": self.dtype.name}

    @classmethod
    def from_config(cls, cfg: dict, seed=None) -> "SequenceClassifier":
        return cls(cfg["vocab_size"], cfg["num_classes"], cfg["cell"], cfg["hidden_size"], cfg["num_layers"],
                   cfg["bidirectional"], cfg["dropout"], cfg["embed_size"], cfg["pool"], seed=seed,
                   dtype=np.dtype(cfg.get("dtype", "float32")))

    def train(self, mode=True):
        self.training = bool(mode)
        self.rnn.train(mode)
        return self

    # -- forward / backward
    def _pad(self, seqs):
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        if len(seqs) == 0 or lengths.min() < 1:
            raise ValueError("every sequence needs at least one token")
        ids = np.zeros((int(lengths.max()), len(seqs)), dtype=np.int64)    # (T, B), 0 past each length
        for b, s in enumerate(seqs):
            ids[:lengths[b], b] = s
        return ids, lengths

    def forward(self, seqs):
        """seqs: B arrays of ids -> logits (B, C) and the cache for backward."""
        ids, lengths = self._pad(seqs)
        x, emb_cache = embedding_forward(ids, self.embedding)                         # (T, B, E)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out_packed, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out_packed, total_length=ids.shape[0])           # (T, B, D*H)
        v, pool_cache = pool_forward(out, lengths, self.pool, 2 if self.bidirectional else 1)
        mask = None
        if self.training and self.dropout > 0:
            keep = 1.0 - self.dropout
            mask = (self.dropout_rng.random(v.shape) < keep).astype(self.dtype) / self.dtype.type(keep)
            v = v * mask
        z, lin_cache = linear_forward(v, self.head_weight, self.head_bias)             # (B, C)
        cache = {"emb": emb_cache, "lengths": lengths, "pool": pool_cache, "mask": mask, "lin": lin_cache,
                 "packed": out_packed}
        return z, cache

    def loss(self, seqs, labels):
        """Mean cross-entropy (nats per sequence); keeps what backward() needs."""
        z, cache = self.forward(seqs)
        loss, cache["ce"] = softmax_cross_entropy_forward(z, np.asarray(labels))
        self._cache = cache
        return loss

    def backward(self):
        """Backward of the latest loss(); parameter gradients are ADDED into self.grads."""
        if self._cache is None:
            raise RuntimeError("SequenceClassifier.backward() called before loss(): run the forward pass first")
        cache, self._cache = self._cache, None
        dz = softmax_cross_entropy_backward(cache["ce"])                               # (B, C)
        dv, dW, db = linear_backward(dz, cache["lin"])
        self.grads["head.weight"] += dW
        self.grads["head.bias"] += db
        if cache["mask"] is not None:
            dv *= cache["mask"]
        dout = pool_backward(dv, cache["pool"])                                        # (T, B, D*H)
        lengths = cache["lengths"]
        dpacked = pack_padded_sequence(dout, lengths, enforce_sorted=False)
        dx_packed, _ = self.rnn.backward(dpacked)
        dx, _ = pad_packed_sequence(dx_packed, total_length=dout.shape[0])            # (T, B, E), 0 padding
        self.grads["embedding.weight"] += embedding_backward(dx, cache["emb"])

    def predict_proba(self, seqs) -> np.ndarray:
        """(B, C) class probabilities, in eval mode, keeping nothing for backward."""
        from .contexts import no_grad
        was = self.training
        self.eval()
        try:
            with no_grad():
                z, _ = self.forward(seqs)
        finally:
            self.train(was)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)
