"""LSTMCell, GRUCell and RNNCell: one step of a recurrent layer, torch.nn.*Cell's contract, on NumPy
arrays, or CuPy arrays after cell.to("cuda") (module.py: devices).

A cell runs the layer functions of functional.py / kernels.py / gru.py on a sequence of length one,
so its equations, caches and backward are the layer's (see functional.py and gru.py). Everything a
module shares (parameters, contexts, state_dict) is module._Module's.

Shape letters
    N   batch           I   input_size          H   hidden_size         G   4H (LSTM), 3H (GRU) or H (RNN)

    h', c' = lstm_cell(x, (h, c))          grad_x, (grad_h, grad_c) = lstm_cell.backward((grad_h', grad_c'))
    h' = gru_cell(x, h)                    grad_x, grad_h = gru_cell.backward(grad_h')
    h' = rnn_cell(x, h)                    grad_x, grad_h = rnn_cell.backward(grad_h')
    state, ctx = cell(x, hx, return_ctx=True);  cell.backward(grad_state, ctx=ctx)
"""

import numpy as np

from . import contexts, gru
from .contexts import is_grad_enabled
from .module import _Module, _backend, _check_dtype, _check_int


class _CellBase(_Module):
    """One step of a recurrent layer, torch.nn.*Cell's contract: input (N, I) or unbatched (I,)."""

    def __init__(self, input_size, hidden_size, bias, gates, dtype, seed):
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            _check_int(name, value)
            if value < 0:   # torch fails here while creating the weight tensor, with RuntimeError
                raise RuntimeError(f"Trying to create tensor with negative dimension: {name}={value}")
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bool(bias)
        self.dtype = _check_dtype(dtype)
        G = gates * hidden_size
        shapes = [("weight_ih", (G, input_size)), ("weight_hh", (G, hidden_size))]
        if bias:
            shapes += [("bias_ih", (G,)), ("bias_hh", (G,))]
        self._init_parameters(shapes, max(hidden_size, 1), seed)

    def _prepare(self, input, states):
        """Check input and states as torch does; return x (N, I), states as (N, H), batched."""
        x = self._array(input, "the input")
        if x.ndim not in (1, 2):
            raise ValueError(f"{self._name}: Expected input to be 1D or 2D, got {x.ndim}D instead")
        self._check_input_dtype(x, RuntimeError)   # torch's cells fail in the product, with RuntimeError
        batched = x.ndim == 2
        x = x if batched else x[None]
        if x.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        out = []
        for k, s in enumerate(states):
            if s is None:
                out.append(self._xp.zeros((x.shape[0], self.hidden_size), dtype=self.dtype))
                continue
            label = f"hx[{k}]" if len(states) == 2 else "hx"
            s = self._array(s, label)
            if s.ndim not in (1, 2):
                raise ValueError(f"{self._name}: Expected {label} to be 1D or 2D, got {s.ndim}D instead")
            if s.dtype != self.dtype:
                raise RuntimeError(f"{self._name}: {label} has dtype {s.dtype}, expected {self.dtype}")
            if not batched and s.ndim != 1:
                raise RuntimeError(f"hidden{k} has inconsistent hidden_size: for unbatched input (I,) "
                                   f"{label} must be 1-D ({self.hidden_size},), got shape {s.shape}")
            s = s if batched else s[None]
            if s.ndim != 2 or s.shape[1] != self.hidden_size:
                raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {s.shape[-1]}, "
                                   f"expected {self.hidden_size}")
            if s.shape[0] != x.shape[0]:
                raise RuntimeError(f"Input batch size {x.shape[0]} doesn't match hidden{k} batch size "
                                   f"{s.shape[0]}")
            out.append(s)
        return x, out, batched

    def _b(self):
        return self._summed_bias() if self.bias else None

    def _step(self, x, states, batched, given, return_ctx):
        """One step through the layer function (a sequence of length 1) and its context."""
        self.__dict__["_last"] = None
        p = self._plain
        backend = _backend(self._xp)
        save = is_grad_enabled()
        if len(states) == 2:
            # only the CPU's backward reads it
            W_hh_T = self._transposed_W_hh() if x.shape[0] == 1 and save and self._xp is np else None
            _, h, c, cache = backend.lstm_layer_forward(x[None], states[0], states[1], p["weight_ih"],
                                                        p["weight_hh"], self._b(), None, save=save, W_hh_T=W_hh_T)
            state = (h, c) if batched else (h[0], c[0])
        elif self._name == "GRUCell":
            b_ih, b_hh = (p["bias_ih"], p["bias_hh"]) if self.bias else (None, None)
            forward = getattr(backend, "gru_layer_forward", gru.gru_layer_forward)   # the GPU's own
            _, h, cache = forward(x[None], states[0], p["weight_ih"], p["weight_hh"], b_ih, b_hh, save=save)
            state = h if batched else h[0]
        else:
            _, h, cache = backend.rnn_layer_forward(x[None], states[0], p["weight_ih"], p["weight_hh"],
                                                    self._b(), self.nonlinearity, save=save)
            state = h if batched else h[0]
        saved = None if cache is None else {"cache": cache, "batched": batched, "N": x.shape[0],
                                            "backend": backend, "caches": [[cache]]}
        ctx = self._record(saved, given, return_ctx)
        return (state, ctx) if return_ctx else state

    def _grad_in(self, grad, name, saved):
        if grad is None:
            return self._xp.zeros((saved["N"], self.hidden_size), dtype=self.dtype)
        g = self._array(grad, name)
        expected = (saved["N"], self.hidden_size) if saved["batched"] else (self.hidden_size,)
        if g.shape != expected:
            raise RuntimeError(f"{self._name}.backward: {name} must have shape {expected}, got {g.shape}")
        g = g.astype(self.dtype, copy=False)
        return g if saved["batched"] else g[None]

    def _accumulate(self, dW_ih, dW_hh, db_ih, db_hh=None):
        """Add parameter gradients; db_hh None: the layer took b = b_ih + b_hh, whose gradient is both."""
        self.grads["weight_ih"] += dW_ih
        self.grads["weight_hh"] += dW_hh
        if db_ih is not None:
            self.grads["bias_ih"] += db_ih
            self.grads["bias_hh"] += db_ih if db_hh is None else db_hh

    def _backward_h(self, grad_state, ctx, retain, layer_backward):
        """The backward of a one-state cell (RNNCell, GRUCell): a one-step layer backward
        layer_backward(saved, dout, dh, cache) -> (dx, dh0, dW_ih, dW_hh, db_ih[, db_hh])."""
        ctx = contexts.take(self, ctx)
        saved = ctx.saved
        dh = self._grad_in(grad_state, "grad_h", saved)
        dx, dh0, *dparams = layer_backward(saved, self._xp.zeros_like(dh)[None], dh, saved["cache"])
        self._accumulate(*dparams)
        contexts.done(ctx, retain)
        dx = dx[0]
        return (dx, dh0) if saved["batched"] else (dx[0], dh0[0])

    def _given(self, input, hx):
        states = hx if isinstance(hx, (tuple, list)) else (hx,)
        labels = ("hx[0]", "hx[1]") if len(states) == 2 else ("hx",)
        return [("the input", input)] + list(zip(labels, states))

    def __repr__(self):
        return f"{self._name}({self.input_size}, {self.hidden_size}{'' if self.bias else ', bias=False'})"


class LSTMCell(_CellBase):
    """One LSTM step: h', c' = cell(x, (h, c)); x (N, I) or (I,), h and c (N, H) or (H,).

    grad_x, (grad_h, grad_c) = cell.backward((grad_h', grad_c'))    either may be None
    (h', c'), ctx = cell(x, (h, c), return_ctx=True);  cell.backward(grad_state, ctx=ctx): a loop
    over steps keeps the list of contexts and walks it in reverse (backpropagation through time).
    """

    _name = "LSTMCell"

    def __init__(self, input_size, hidden_size, bias=True, *, dtype=np.float32, seed=None):
        super().__init__(input_size, hidden_size, bias, 4, dtype, seed)

    def forward(self, input, hx=None, *, return_ctx=False):
        x, states, batched = self._prepare(input, (None, None) if hx is None else hx)
        return self._step(x, states, batched, self._given(input, hx), return_ctx)

    def backward(self, grad_state=None, *, ctx=None, retain=False):
        """grad_x, (grad_h, grad_c) of a forward (the latest one's, or ctx's) from grad_state =
        (grad_h', grad_c'), the gradients at the state it returned; parameter grads are added."""
        ctx = contexts.take(self, ctx)
        if grad_state is None:
            grad_state = (None, None)
        elif not isinstance(grad_state, (tuple, list)) or len(grad_state) != 2:
            raise TypeError("LSTMCell.backward: grad_state must be a tuple (grad_h, grad_c) or None, "
                            f"got {type(grad_state).__name__}")
        saved = ctx.saved
        dh = self._grad_in(grad_state[0], "grad_h", saved)
        dc = self._grad_in(grad_state[1], "grad_c", saved)
        dx, dh0, dc0, dW_ih, dW_hh, db, _ = saved["backend"].lstm_layer_backward(
            self._xp.zeros_like(dh)[None], dh, dc, saved["cache"])
        self._accumulate(dW_ih, dW_hh, db)
        contexts.done(ctx, retain)
        dx = dx[0]
        return (dx, (dh0, dc0)) if saved["batched"] else (dx[0], (dh0[0], dc0[0]))


class RNNCell(_CellBase):
    """One Elman RNN step: h' = cell(x, h). grad_x, grad_h = cell.backward(grad_h').

    h', ctx = cell(x, h, return_ctx=True);  cell.backward(grad_state, ctx=ctx)
    An unknown nonlinearity is refused here, at construction, with ValueError (as nn.RNN does);
    torch.nn.RNNCell only notices it at the first forward call.
    """

    _name = "RNNCell"

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", *, dtype=np.float32, seed=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, 1, dtype, seed)

    def forward(self, input, hx=None, *, return_ctx=False):
        x, states, batched = self._prepare(input, (hx,))
        return self._step(x, states, batched, self._given(input, hx), return_ctx)

    def backward(self, grad_state=None, *, ctx=None, retain=False):
        """grad_x, grad_h of a forward (the latest one's, or ctx's) from grad_state = grad_h'."""
        return self._backward_h(grad_state, ctx, retain,
                                lambda saved, *args: saved["backend"].rnn_layer_backward(*args))


class GRUCell(_CellBase):
    """One GRU step, torch.nn.GRUCell's contract: h' = cell(x, h); x (N, I) or (I,), h (N, H) or (H,).

        r = σ(W_ir x + b_ir + W_hr h + b_hr)      z = σ(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))      h' = (1 - z) ⊙ n + z ⊙ h

    weight_ih (3H, I), weight_hh (3H, H), bias_ih, bias_hh (3H,), rows r, z, n as in torch.
    grad_x, grad_h = cell.backward(grad_h');  h', ctx = cell(x, h, return_ctx=True);
    cell.backward(grad_state, ctx=ctx). An input of another dtype than the weights is a
    RuntimeError, as torch's cells raise (its layers raise ValueError).
    """

    _name = "GRUCell"

    def __init__(self, input_size, hidden_size, bias=True, *, dtype=np.float32, seed=None):
        super().__init__(input_size, hidden_size, bias, 3, dtype, seed)

    def forward(self, input, hx=None, *, return_ctx=False):
        x, states, batched = self._prepare(input, (hx,))
        return self._step(x, states, batched, self._given(input, hx), return_ctx)

    def backward(self, grad_state=None, *, ctx=None, retain=False):
        """grad_x, grad_h of a forward (the latest one's, or ctx's) from grad_state = grad_h'."""
        return self._backward_h(grad_state, ctx, retain, lambda saved, *args: gru.gru_layer_backward(*args))
