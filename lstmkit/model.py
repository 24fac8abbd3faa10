"""The language model: embedding -> lstmkit.LSTM -> linear -> softmax cross-entropy.

Forward, for a chunk of ids (T, B) with next-token targets y (T, B):
    x = E[ids]                                    (T, B, E)   embedding lookup (a row per id)
    out, (h_T, c_T) = LSTM(x, (h_0, c_0))         (T, B, H)
    z = out W^T + b                               (N, V)      N = T*B rows
    p = softmax(z) = exp(z - max z) / Σ exp(z - max z)
    loss = -(1/N) Σ_n log p[n, y_n]               nats per token (mean over the chunk)
Backward (hand-written; each layer's d<name> from the one after it):
    dz = (p - onehot(y)) / N                      (N, V)
    dW = dz^T out,  db = Σ_n dz,  dout = dz W     (V, H), (V,), (N, H)
    dx = LSTM.backward(dout)                      (T, B, E)   h_0/c_0 get no gradient: truncated BPTT
    dE[ids[n]] += dx[n]                           (V, E)      scatter-add: a row used twice gets both

Parameter names (the model's state dict): "embedding.weight" (V, E), "decoder.weight" (V, H),
"decoder.bias" (V,), and the LSTM's own under "lstm." + torch.nn.LSTM's keys ("lstm.weight_ih_l0").
Initialisation as torch.nn: embedding N(0, 1), decoder U(-1/√H, 1/√H), LSTM U(-1/√H, 1/√H).

Shape letters: V vocabulary, E embedding size, H hidden size, L layers, T time steps, B batch, N = T*B.
"""

from __future__ import annotations

import numpy as np

from . import LSTM, embedding_fused, softmax_fused


# ---- the layers around the LSTM, forward and backward ----------------------------------------

def embedding_forward(ids, W):
    """ids (...) int, W (V, E) -> x (..., E) = W[ids]."""
    return W[ids], {"ids": ids, "V": W.shape[0]}


def embedding_backward(dx, cache):
    """dx (..., E) -> dW (V, E): each id's row receives the sum of the gradients of its uses."""
    ids = cache["ids"].reshape(-1)
    E = dx.shape[-1]
    dW = np.zeros((cache["V"], E), dtype=dx.dtype)
    if not embedding_fused.add_rows(dW, ids, np.ascontiguousarray(dx).reshape(-1, E)):
        np.add.at(dW, ids, dx.reshape(-1, E))      # the readable form; embedding_fused.py is its fast path
    return dW


def linear_forward(x, W, b):
    """x (N, H), W (V, H), b (V,) -> z (N, V) = x W^T + b."""
    z = x @ W.T
    z += b
    return z, {"x": x, "W": W}


def linear_backward(dz, cache):
    """dz (N, V) -> dx (N, H), dW (V, H), db (V,)."""
    x, W = cache["x"], cache["W"]
    return dz @ W, dz.T @ x, dz.sum(axis=0)


def softmax_cross_entropy_forward(z, y, overwrite=False):
    """z (N, V) logits, y (N,) int targets -> mean loss in nats (a Python float) and the cache.
    overwrite: z may be overwritten (the caller has no further use for it). softmax_fused.py is
    the fast path (one pass per row, the gradient made there); this is the readable form."""
    y = np.asarray(y)
    V = z.shape[-1]
    lo, hi = (y.min(), y.max()) if y.size else (0, 0)
    if lo < 0 or hi >= V:
        raise IndexError(f"target {lo if lo < 0 else hi} is out of range: the logits have {V} classes (0..{V - 1})")
    fused = softmax_fused.cross_entropy(z, y, overwrite)
    if fused is not None:
        loss, dz = fused
        return loss, {"dz": dz, "y": y}
    zmax = z.max(axis=1, keepdims=True)
    p = z - zmax                                                       # (N, V), shifted: exp cannot overflow
    logp_y = p[np.arange(len(y)), y]                                   # (N,) before exp overwrites p
    np.exp(p, out=p)
    s = p.sum(axis=1, keepdims=True)
    p /= s                                                             # softmax
    logp_y = logp_y - np.log(s[:, 0])                                  # log p[n, y_n]
    loss = -float(np.mean(logp_y, dtype=np.float64))
    return loss, {"p": p, "y": y}


def softmax_cross_entropy_backward(cache):
    """dloss/dz for the mean loss: (p - onehot(y)) / N (made by the forward on the fast path)."""
    if "dz" in cache:
        return cache["dz"]
    p, y = cache["p"], cache["y"]
    N = len(y)
    dz = p  # reuse the buffer: p is not needed after this
    dz[np.arange(N), y] -= 1.0
    dz /= N
    return dz


def copy_params(params: dict, arrays: dict) -> None:
    """Copy arrays[k] into each live params[k], all or nothing: every name and shape is checked
    before anything is written."""
    missing = [k for k in params if k not in arrays]
    if missing:
        raise ValueError(f"missing parameter(s): {', '.join(missing)}")
    for k, p in params.items():
        if tuple(arrays[k].shape) != p.shape:
            raise ValueError(f"parameter {k} has shape {tuple(arrays[k].shape)}, expected {p.shape}")
    for k, p in params.items():
        p[...] = arrays[k]


class ModelBase:
    """What both models (this one and classifier.SequenceClassifier) do the same way with their
    `params` and `grads` dicts (name -> live array)."""

    def num_parameters(self) -> int:
        return sum(p.size for p in self.params.values())

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0.0

    def load_params(self, arrays: dict) -> None:
        """Copy arrays into the parameters (names as in self.params); shapes are checked first."""
        copy_params(self.params, arrays)

    def flatten_grads(self, extra: int = 0) -> np.ndarray:
        """Move every gradient into one flat buffer of P + extra elements and make self.grads (and
        the recurrent module's own grads, which backward adds into) views of it, values kept. Data
        parallel training (distributed.py) then sums all gradients with one message instead of one
        per parameter. Returns the buffer; its last `extra` elements are the caller's."""
        dtypes = {g.dtype for g in self.grads.values()}
        if len(dtypes) != 1:
            raise ValueError(f"gradients of one dtype are needed for one flat buffer, got {sorted(map(str, dtypes))}")
        flat = np.zeros(sum(g.size for g in self.grads.values()) + extra, dtype=dtypes.pop())
        off = 0
        for k, g in self.grads.items():
            view = flat[off:off + g.size].reshape(g.shape)
            view[...] = g
            self.grads[k] = view
            off += g.size
        prefix, module = self.RECURRENT, getattr(self, self.RECURRENT.rstrip("."))
        for k in module.grads:
            module.grads[k] = self.grads[prefix + k]
        return flat


# ---- the model ---------------------------------------------------------------------------------

class LanguageModel(ModelBase):
    """embedding -> LSTM -> linear, trained with softmax cross-entropy.

        model = LanguageModel(vocab_size=65, hidden_size=128, num_layers=2, seed=0)
        loss, state = model.loss(x, y, state)     # x, y (T, B) ids; state (h, c) carried across chunks
        model.backward()                          # adds into model.grads
        logits, state, cache = model.forward(ids, state)   # cache["lstm"]: per-layer LSTM caches
    """

    def __init__(self, vocab_size, hidden_size=128, num_layers=1, dropout=0.0, embed_size=0,
                 *, seed=None, dtype=np.float32):
        self.vocab_size, self.hidden_size, self.num_layers = int(vocab_size), int(hidden_size), int(num_layers)
        self.embed_size = int(embed_size) if embed_size else self.hidden_size
        self.dropout = float(dropout)
        self.dtype = np.dtype(dtype)
        s_emb, s_lstm, s_dec = np.random.SeedSequence(seed).spawn(3)
        V, E, H = self.vocab_size, self.embed_size, self.hidden_size
        rng = np.random.default_rng(s_emb)
        self.embedding = rng.standard_normal((V, E)).astype(self.dtype)
        self.lstm = LSTM(E, H, num_layers, dropout=self.dropout, dtype=self.dtype,
                         seed=int(s_lstm.generate_state(1, np.uint64)[0]))
        rng = np.random.default_rng(s_dec)
        bound = 1.0 / np.sqrt(H)
        self.decoder_weight = rng.uniform(-bound, bound, (V, H)).astype(self.dtype)
        self.decoder_bias = rng.uniform(-bound, bound, (V,)).astype(self.dtype)
        # live views: optimizers update these arrays in place
        self.params = {"embedding.weight": self.embedding, "decoder.weight": self.decoder_weight,
                       "decoder.bias": self.decoder_bias}
        self.params.update({"lstm." + k: p for k, p in self.lstm.named_parameters()})
        self.grads = {k: np.zeros_like(self.params[k]) for k in ("embedding.weight", "decoder.weight",
                                                                 "decoder.bias")}
        self.grads.update({"lstm." + k: g for k, g in self.lstm.grads.items()})
        self._cache = None

    RECURRENT = "lstm."      # the recurrent module's attribute and its key prefix in params and grads
    # -- what a checkpoint holds (checkpoint.py): config as JSON, arrays per safetensors file
    FORMAT = "lstmkit-language-model"
    ARRAY_FILES = {"lstm.safetensors": "lstm.", "model.safetensors": ""}     # file -> key prefix in params
    SIZES = ("vocab_size", "embed_size", "hidden_size", "num_layers")        # checked against MODEL_LIMITS

    def config(self) -> dict:
        return {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "dropout": self.dropout, "embed_size": self.embed_size, "dtype": self.dtype.name}

    def checkpoint_arrays(self) -> dict:
        """{file: {key: array}}: the LSTM under torch.nn.LSTM's own keys, the rest under torch.nn's."""
        return {"lstm.safetensors": self.lstm.state_dict(),
                "model.safetensors": {k: v for k, v in self.params.items() if not k.startswith("lstm.")}}

    @staticmethod
    def check_config(cfg: dict) -> None:
        """Nothing beyond the sizes and dtype checkpoint.py checks for every model."""

    @staticmethod
    def expected_shapes(cfg: dict) -> dict:
        """{file: {key: shape}} that a config's sizes imply, checked against the files' headers."""
        V, H, L = cfg["vocab_size"], cfg["hidden_size"], cfg["num_layers"]
        E = cfg["embed_size"] or H
        lstm = {}
        for k in range(L):
            lstm.update({f"weight_ih_l{k}": (4 * H, E if k == 0 else H), f"weight_hh_l{k}": (4 * H, H),
                         f"bias_ih_l{k}": (4 * H,), f"bias_hh_l{k}": (4 * H,)})
        return {"lstm.safetensors": lstm,
                "model.safetensors": {"embedding.weight": (V, E), "decoder.weight": (V, H), "decoder.bias": (V,)}}

    @classmethod
    def from_config(cls, cfg: dict, seed=None) -> "LanguageModel":
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["num_layers"], cfg["dropout"],
                   cfg["embed_size"], seed=seed, dtype=np.dtype(cfg.get("dtype", "float32")))

    def train(self, mode=True):
        self.lstm.train(mode)
        return self

    def initial_state(self, batch_size):
        L, H = self.num_layers, self.hidden_size
        return (np.zeros((L, batch_size, H), self.dtype), np.zeros((L, batch_size, H), self.dtype))

    # -- forward / backward
    def forward(self, ids, state=None):
        """ids (T, B) -> logits (T, B, V), (h_T, c_T) each (L, B, H), and the cache for backward.

        cache["lstm"] is the LSTM's per-layer list of caches ([layer][direction] dicts holding
        "gates" (T, B, 4H) after the nonlinearities and "c" (T, B, H)), for looking inside."""
        ids = np.asarray(ids)
        T, B = ids.shape
        x, emb_cache = embedding_forward(ids, self.embedding)                    # (T, B, E)
        out, state = self.lstm(x, state)                                          # (T, B, H)
        z, lin_cache = linear_forward(out.reshape(T * B, self.hidden_size),
                                      self.decoder_weight, self.decoder_bias)      # (N, V)
        cache = {"emb": emb_cache, "lin": lin_cache, "T": T, "B": B, "lstm": self.lstm._caches}
        return z.reshape(T, B, self.vocab_size), state, cache

    def loss(self, ids, targets, state=None):
        """Mean cross-entropy (nats per token) of predicting targets (T, B) from ids (T, B).
        Keeps what backward() needs; returns (loss, (h_T, c_T))."""
        z, state, cache = self.forward(ids, state)
        loss, ce_cache = softmax_cross_entropy_forward(z.reshape(-1, self.vocab_size),
                                                       np.asarray(targets).reshape(-1), overwrite=True)
        cache["ce"] = ce_cache
        self._cache = cache
        return loss, state

    def backward(self):
        """Backward of the latest loss(); parameter gradients are ADDED into self.grads."""
        if self._cache is None:
            raise RuntimeError("LanguageModel.backward() called before loss(): run the forward pass first")
        cache, self._cache = self._cache, None
        T, B = cache["T"], cache["B"]
        dz = softmax_cross_entropy_backward(cache["ce"])                          # (N, V)
        dout, dW, db = linear_backward(dz, cache["lin"])                         # (N, H)
        self.grads["decoder.weight"] += dW
        self.grads["decoder.bias"] += db
        dx, _ = self.lstm.backward(dout.reshape(T, B, self.hidden_size))          # (T, B, E)
        self.grads["embedding.weight"] += embedding_backward(dx, cache["emb"])

    def step_logits(self, token_id: int, state=None):
        """One token in (batch of one), logits (V,) and the new state out: for generation."""
        x = self.embedding[np.array([[int(token_id)]])]                          # (1, 1, E)
        out, state = self.lstm(x, state)
        z = out[0, 0] @ self.decoder_weight.T + self.decoder_bias
        return z, state
