"""LSTM, RNN, LSTMCell and RNNCell with torch.nn's contract, on NumPy arrays.

Same constructor arguments, parameter names and shapes, initialisation U(-1/sqrt(H), 1/sqrt(H)),
input conventions and exception types as torch.nn; plus a hand-written `backward`.

Shape letters
    L   sequence length (T inside the layers)     N   batch (B inside the layers)
    I   input_size      H   hidden_size           P   proj_size if > 0 else hidden_size
    D   2 if bidirectional else 1                 G   gate rows: 4H (LSTM) or H (RNN)

Stacking (torch.nn.LSTM): layer k > 0 takes the D directions of layer k-1 concatenated,
(L, N, D*P); in train mode dropout with probability p zeroes elements of that input (inverted
dropout, kept elements scaled by 1/(1-p)); the reverse direction reads the sequence back to front.
"""

import numbers
import os
import warnings

import numpy as np

from . import functional

try:  # the fused kernels are optional: without Numba, the reference runs
    from . import kernels as _kernels
except Exception:  # noqa: BLE001 - any failure to build the fast path falls back to the reference
    _kernels = None

_DTYPES = (np.float32, np.float64)


def _backend():
    """The module that runs the layers: the fused kernels unless LSTMKIT_REFERENCE=1 asks otherwise."""
    if _kernels is not None and getattr(_kernels, "AVAILABLE", False) and \
            os.environ.get("LSTMKIT_REFERENCE") != "1":
        return _kernels
    return functional


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype.type not in _DTYPES:
        raise TypeError(f"dtype must be numpy.float32 or numpy.float64, got {dtype}")
    return dtype


def _check_int(name, value):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")


def _check_size(name, value):
    _check_int(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")


class _Module:
    """What every layer shares: named parameters, their gradients, train/eval, state_dict."""

    _name = "Module"

    def _init_parameters(self, shapes, hidden_size, seed):
        # One seed gives init and dropout independent streams, so dropout draws never shift weights.
        init_seq, dropout_seq = np.random.SeedSequence(seed).spawn(2)
        rng = np.random.default_rng(init_seq)
        self.dropout_rng = np.random.default_rng(dropout_seq)
        bound = 1.0 / np.sqrt(hidden_size)
        # Filled in torch's parameter order, so a given seed always gives the same weights.
        self._params = {name: rng.uniform(-bound, bound, size=shape).astype(self.dtype)
                        for name, shape in shapes}
        self.grads = {name: np.zeros_like(p) for name, p in self._params.items()}
        self.training = True
        self._ctx = None

    def __getattr__(self, name):  # lstm.weight_ih_l0, as in torch
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def named_parameters(self):
        """(name, array) pairs of the live parameters, in torch's order; optimizers update them in place."""
        return iter(self._params.items())

    def parameters(self):
        return iter(self._params.values())

    def state_dict(self):
        """Copies of the parameters under torch.nn's keys, in torch.nn's order."""
        return {name: p.copy() for name, p in self._params.items()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays (NumPy arrays, torch tensors, anything np.asarray takes) into the parameters."""
        missing = [k for k in self._params if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self._params]
        errors = []
        if strict and missing:
            errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing))
        if strict and unexpected:
            errors.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected))
        arrays = {}
        for name, param in self._params.items():
            if name not in state_dict:
                continue
            value = np.asarray(state_dict[name])
            if value.shape != param.shape:
                errors.append(f"size mismatch for {name}: copying a param with shape {value.shape} "
                              f"from checkpoint, the shape in current model is {param.shape}.")
            arrays[name] = value
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {self._name}:\n\t" + "\n\t".join(errors))
        for name, value in arrays.items():  # only after every check passed: all or nothing
            self._params[name][...] = value

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0.0

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _check_input_dtype(self, x):
        if x.dtype != self.dtype:
            raise ValueError(f"{self._name} input dtype ({x.dtype}) does not match weight dtype "
                             f"({self.dtype}). Convert the input with .astype(np.{self.dtype}), or build "
                             f"the module with dtype=np.{x.dtype}")

    def _saved(self):
        if self._ctx is None:
            raise RuntimeError(f"{self._name}.backward() called before any forward call: "
                               "run the forward pass first")
        return self._ctx


class _RNNBase(_Module):
    """The multi-layer, optionally bidirectional recurrent stack shared by LSTM and RNN."""

    def __init__(self, mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                 bidirectional, proj_size, dtype, seed):
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability "
                             f"of an element being zeroed, got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero "
                          f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}", UserWarning, stacklevel=3)
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        _check_size("num_layers", num_layers)
        _check_int("proj_size", proj_size)
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections, "
                             f"got {proj_size}")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
                             f"and hidden_size={hidden_size}")
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional, self.proj_size = bool(bidirectional), int(proj_size)
        self.dtype = _check_dtype(dtype)
        gate_size = 4 * hidden_size if mode == "LSTM" else hidden_size
        D = 2 if bidirectional else 1
        P = proj_size if proj_size > 0 else hidden_size
        shapes = []
        # "_l0", "_l0_reverse", ...: built once, since a generating sampler looks them up every step
        self._suffixes = [[f"_l{layer}" + ("_reverse" if direction == 1 else "") for direction in range(D)]
                          for layer in range(num_layers)]
        for layer in range(num_layers):
            for direction in range(D):
                sfx = self._suffixes[layer][direction]
                layer_input = input_size if layer == 0 else P * D
                shapes += [("weight_ih" + sfx, (gate_size, layer_input)), ("weight_hh" + sfx, (gate_size, P))]
                if bias:
                    shapes += [("bias_ih" + sfx, (gate_size,)), ("bias_hh" + sfx, (gate_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr" + sfx, (proj_size, hidden_size))]
        self._init_parameters(shapes, hidden_size, seed)

    @property
    def _D(self):
        return 2 if self.bidirectional else 1

    @property
    def _P(self):
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _layer_params(self, layer, direction):
        sfx = self._suffixes[layer][direction]
        p = self._params
        b = p["bias_ih" + sfx] + p["bias_hh" + sfx] if self.bias else None
        return sfx, p["weight_ih" + sfx], p["weight_hh" + sfx], b, p.get("weight_hr" + sfx)

    def _prepare_input(self, input):
        """Check the input as torch does; return it as (L, N, I) and whether it was batched."""
        x = np.asarray(input)
        if x.ndim not in (2, 3):
            raise ValueError(f"{self._name}: Expected input to be 2D or 3D, got {x.ndim}D instead")
        self._check_input_dtype(x)
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {x.shape[-1]}")
        batched = x.ndim == 3
        if not batched:
            x = x[:, None, :]
        elif self.batch_first:
            x = x.swapaxes(0, 1)
        if x.shape[0] == 0:
            raise RuntimeError(f"Expected sequence length to be larger than 0 in {self._name}, "
                               f"got input of shape {np.asarray(input).shape}")
        return x, batched

    def _prepare_state(self, state, name, size, batched, N):
        """Check one of h_0 / c_0 as torch does; return it as (num_layers*D, N, size)."""
        expected = (self.num_layers * self._D, N, size)
        s = np.asarray(state)
        if s.dtype != self.dtype:
            raise RuntimeError(f"{self._name}: {name} has dtype {s.dtype}, expected {self.dtype} "
                               "like the weights and the input")
        if batched:
            if s.shape != expected:
                raise RuntimeError(f"Expected {name} size {expected}, got {list(s.shape)}")
            return s
        if s.shape != (expected[0], expected[2]):
            raise RuntimeError(f"Expected {name} size {(expected[0], expected[2])}, got {list(s.shape)}")
        return s[:, None, :]

    def _check_state_ranks(self, states, batched):
        want = 3 if batched else 2
        ranks = tuple(np.ndim(s) for s in states)
        if any(r != want for r in ranks):
            kind = "batched 3-D" if batched else "unbatched 2-D"
            names = "hx and cx" if len(states) == 2 else "hx"
            got = ", ".join(f"{r}-D" for r in ranks)
            raise RuntimeError(f"For {kind} input, {names} should also be {want}-D but got ({got}) tensors")

    def _run_stack(self, x, h0, c0, backend):
        """Forward through every layer and direction. x (L, N, I) -> (L, N, D*P), h_n, c_n."""
        # Drop the previous call's activations first, so two sets never coexist (peak memory).
        self._ctx = self._caches = self._masks = None
        D, L_ = self._D, self.num_layers
        h_n = np.empty_like(h0)
        c_n = np.empty_like(c0) if c0 is not None else None
        caches, masks = [], []
        for layer in range(L_):
            mask = None
            if layer > 0 and self.training and self.dropout > 0:
                keep = 1.0 - self.dropout
                mask = (self.dropout_rng.random(x.shape) < keep).astype(self.dtype)
                if keep > 0:
                    mask /= keep
                x = x * mask
            masks.append(mask)
            outs, layer_caches = [], []
            for d in range(D):
                idx = layer * D + d
                _, W_ih, W_hh, b, W_hr = self._layer_params(layer, d)
                xin = np.ascontiguousarray(x if d == 0 else x[::-1])
                if self.mode == "LSTM":
                    out, h_T, c_T, cache = backend.lstm_layer_forward(xin, h0[idx], c0[idx], W_ih, W_hh, b, W_hr)
                    c_n[idx] = c_T
                else:
                    nl = "tanh" if self.mode == "RNN_TANH" else "relu"
                    out, h_T, cache = backend.rnn_layer_forward(xin, h0[idx], W_ih, W_hh, b, nl)
                h_n[idx] = h_T
                outs.append(out if d == 0 else out[::-1])
                layer_caches.append(cache)
            caches.append(layer_caches)
            x = outs[0] if D == 1 else np.concatenate(outs, axis=2)
        self._caches = caches   # [layer][direction]: what each layer saw, for backward and the lessons
        self._masks = masks
        return x, h_n, c_n

    def _backward_stack(self, dy, dh_n, dc_n, backend):
        """Backward through the stack in reverse. dy (L, N, D*P) -> dx (L, N, I), dh_0, dc_0."""
        D, P = self._D, self._P
        dh0 = np.empty_like(dh_n)
        dc0 = np.empty_like(dc_n) if dc_n is not None else None
        for layer in reversed(range(self.num_layers)):
            dx_layer = None
            for d in range(D):
                idx = layer * D + d
                sfx, *_ = self._layer_params(layer, d)
                cache = self._caches[layer][d]
                dout = dy[:, :, d * P:(d + 1) * P]
                dout = np.ascontiguousarray(dout if d == 0 else dout[::-1])
                if self.mode == "LSTM":
                    dx, dh, dc, dW_ih, dW_hh, db, dW_hr = backend.lstm_layer_backward(
                        dout, dh_n[idx], dc_n[idx], cache)
                    dc0[idx] = dc
                    if dW_hr is not None:
                        self.grads["weight_hr" + sfx] += dW_hr
                else:
                    dx, dh, dW_ih, dW_hh, db = backend.rnn_layer_backward(dout, dh_n[idx], cache)
                dh0[idx] = dh
                self.grads["weight_ih" + sfx] += dW_ih
                self.grads["weight_hh" + sfx] += dW_hh
                if db is not None:   # b = b_ih + b_hh, so both receive the same gradient
                    self.grads["bias_ih" + sfx] += db
                    self.grads["bias_hh" + sfx] += db
                dx = dx if d == 0 else dx[::-1]
                dx_layer = dx if dx_layer is None else dx_layer + dx
            if self._masks[layer] is not None:
                dx_layer = dx_layer * self._masks[layer]
            dy = dx_layer
        return dy, dh0, dc0

    def _prepare_grad(self, grad, name, expected, batched):
        g = np.asarray(grad)
        if g.shape != expected:
            raise RuntimeError(f"{self._name}.backward: {name} must have the shape of the forward's "
                               f"{name.removeprefix('grad_')}, {expected}, got {g.shape}")
        if g.dtype != self.dtype:
            g = g.astype(self.dtype)
        return g

    def _backward_prologue(self, grad_output):
        ctx = self._saved()
        dy = self._prepare_grad(grad_output, "grad_output", ctx["out_shape"], ctx["batched"])
        if not ctx["batched"]:
            dy = dy[:, None, :]
        elif self.batch_first:
            dy = dy.swapaxes(0, 1)
        return ctx, dy

    def _state_grad(self, grad, name, size, ctx):
        """A grad for h_n / c_n as (num_layers*D, N, size); None gives zeros."""
        full = (self.num_layers * self._D, ctx["N"], size)
        if grad is None:
            return np.zeros(full, dtype=self.dtype)
        shown = full if ctx["batched"] else (full[0], full[2])
        g = self._prepare_grad(grad, name, shown, ctx["batched"])
        return g if ctx["batched"] else g[:, None, :]

    def _finish_output(self, y, batched):
        if not batched:
            return y[:, 0, :]
        return y.swapaxes(0, 1) if self.batch_first else y

    def _state_out(self, s, batched):
        return s if batched else s[:, 0, :]

    def __repr__(self):
        extra = f", num_layers={self.num_layers}" if self.num_layers != 1 else ""
        extra += "" if self.bias else ", bias=False"
        extra += ", batch_first=True" if self.batch_first else ""
        extra += f", dropout={self.dropout}" if self.dropout else ""
        extra += ", bidirectional=True" if self.bidirectional else ""
        extra += f", proj_size={self.proj_size}" if self.proj_size else ""
        return f"{self._name}({self.input_size}, {self.hidden_size}{extra})"


class LSTM(_RNNBase):
    """Multi-layer LSTM over a sequence, torch.nn.LSTM's contract (see functional.py for the equations).

    output, (h_n, c_n) = lstm(x, (h_0, c_0))      x (L, N, I), (N, L, I) if batch_first, or (L, I)
        output (L, N, D*P); h_n (num_layers*D, N, P); c_n (num_layers*D, N, H)
    grad_x, (grad_h_0, grad_c_0) = lstm.backward(grad_output, (grad_h_n, grad_c_n))
        backward of the latest forward call; parameter gradients are added into lstm.grads.
    """

    _name = "LSTM"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, *, dtype=np.float32, seed=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, dtype, seed)

    def forward(self, input, hx=None):
        x, batched = self._prepare_input(input)
        N = x.shape[1]
        if hx is None:
            h0 = np.zeros((self.num_layers * self._D, N, self._P), dtype=self.dtype)
            c0 = np.zeros((self.num_layers * self._D, N, self.hidden_size), dtype=self.dtype)
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"LSTM: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            self._check_state_ranks(hx, batched)
            h0 = self._prepare_state(hx[0], "hidden[0]", self._P, batched, N)
            c0 = self._prepare_state(hx[1], "hidden[1]", self.hidden_size, batched, N)
        backend = _backend()
        y, h_n, c_n = self._run_stack(x, h0, c0, backend)
        output = self._finish_output(y, batched)
        self._ctx = {"batched": batched, "N": N, "out_shape": output.shape, "backend": backend}
        return output, (self._state_out(h_n, batched), self._state_out(c_n, batched))

    def backward(self, grad_output, grad_hx=None):
        """Gradients of the latest forward: grad_x, (grad_h_0, grad_c_0); parameter grads are added."""
        ctx, dy = self._backward_prologue(grad_output)
        if grad_hx is None:
            grad_hx = (None, None)
        elif not isinstance(grad_hx, (tuple, list)) or len(grad_hx) != 2:
            raise TypeError(f"LSTM.backward: grad_hx must be a tuple (grad_h_n, grad_c_n) or None, "
                            f"got {type(grad_hx).__name__}")
        dh_n = self._state_grad(grad_hx[0], "grad_h_n", self._P, ctx)
        dc_n = self._state_grad(grad_hx[1], "grad_c_n", self.hidden_size, ctx)
        dx, dh0, dc0 = self._backward_stack(dy, dh_n, dc_n, ctx["backend"])
        b = ctx["batched"]
        return self._finish_output(dx, b), (self._state_out(dh0, b), self._state_out(dc0, b))


class RNN(_RNNBase):
    """Multi-layer Elman RNN, torch.nn.RNN's contract: h_t = tanh or relu(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    output, h_n = rnn(x, h_0);   grad_x, grad_h_0 = rnn.backward(grad_output, grad_h_n=None)
    """

    _name = "RNN"

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, *, dtype=np.float32, seed=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size,
                         num_layers, bias, batch_first, dropout, bidirectional, 0, dtype, seed)

    def forward(self, input, hx=None):
        x, batched = self._prepare_input(input)
        N = x.shape[1]
        if hx is None:
            h0 = np.zeros((self.num_layers * self._D, N, self.hidden_size), dtype=self.dtype)
        else:
            if np.ndim(hx) != (3 if batched else 2):
                kind, want = ("batched 3-D", 3) if batched else ("unbatched 2-D", 2)
                raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got "
                                   f"{np.ndim(hx)}-D tensor")
            h0 = self._prepare_state(hx, "hidden", self.hidden_size, batched, N)
        backend = _backend()
        y, h_n, _ = self._run_stack(x, h0, None, backend)
        output = self._finish_output(y, batched)
        self._ctx = {"batched": batched, "N": N, "out_shape": output.shape, "backend": backend}
        return output, self._state_out(h_n, batched)

    def backward(self, grad_output, grad_h_n=None):
        ctx, dy = self._backward_prologue(grad_output)
        dh_n = self._state_grad(grad_h_n, "grad_h_n", self.hidden_size, ctx)
        dx, dh0, _ = self._backward_stack(dy, dh_n, None, ctx["backend"])
        b = ctx["batched"]
        return self._finish_output(dx, b), self._state_out(dh0, b)


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
        x = np.asarray(input)
        if x.ndim not in (1, 2):
            raise ValueError(f"{self._name}: Expected input to be 1D or 2D, got {x.ndim}D instead")
        self._check_input_dtype(x)
        batched = x.ndim == 2
        x = x if batched else x[None]
        if x.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        out = []
        for k, s in enumerate(states):
            if s is None:
                out.append(np.zeros((x.shape[0], self.hidden_size), dtype=self.dtype))
                continue
            s = np.asarray(s)
            label = f"hx[{k}]" if len(states) == 2 else "hx"
            if s.ndim not in (1, 2):
                raise ValueError(f"{self._name}: Expected {label} to be 1D or 2D, got {s.ndim}D instead")
            if s.dtype != self.dtype:
                raise RuntimeError(f"{self._name}: {label} has dtype {s.dtype}, expected {self.dtype}")
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
        return self._params["bias_ih"] + self._params["bias_hh"] if self.bias else None

    def _grad_in(self, grad, name, ctx):
        if grad is None:
            return np.zeros((ctx["N"], self.hidden_size), dtype=self.dtype)
        g = np.asarray(grad)
        expected = (ctx["N"], self.hidden_size) if ctx["batched"] else (self.hidden_size,)
        if g.shape != expected:
            raise RuntimeError(f"{self._name}.backward: {name} must have shape {expected}, got {g.shape}")
        g = g.astype(self.dtype, copy=False)
        return g if ctx["batched"] else g[None]

    def _accumulate(self, dW_ih, dW_hh, db):
        self.grads["weight_ih"] += dW_ih
        self.grads["weight_hh"] += dW_hh
        if db is not None:
            self.grads["bias_ih"] += db
            self.grads["bias_hh"] += db

    def __repr__(self):
        return f"{self._name}({self.input_size}, {self.hidden_size}{'' if self.bias else ', bias=False'})"


class LSTMCell(_CellBase):
    """One LSTM step: h', c' = cell(x, (h, c)); x (N, I) or (I,), h and c (N, H) or (H,).

    grad_x, (grad_h, grad_c) = cell.backward(grad_h_next, grad_c_next=None)
    """

    _name = "LSTMCell"

    def __init__(self, input_size, hidden_size, bias=True, *, dtype=np.float32, seed=None):
        super().__init__(input_size, hidden_size, bias, 4, dtype, seed)

    def forward(self, input, hx=None):
        x, (h, c), batched = self._prepare(input, (None, None) if hx is None else hx)
        p = self._params
        backend = _backend()
        out, h_T, c_T, cache = backend.lstm_layer_forward(x[None], h, c, p["weight_ih"], p["weight_hh"],
                                                          self._b(), None)
        self._ctx = {"cache": cache, "batched": batched, "N": x.shape[0], "backend": backend}
        return (h_T, c_T) if batched else (h_T[0], c_T[0])

    def backward(self, grad_h, grad_c=None):
        ctx = self._saved()
        dh = self._grad_in(grad_h, "grad_h", ctx)
        dc = self._grad_in(grad_c, "grad_c", ctx)
        dx, dh0, dc0, dW_ih, dW_hh, db, _ = ctx["backend"].lstm_layer_backward(
            np.zeros_like(dh)[None], dh, dc, ctx["cache"])
        self._accumulate(dW_ih, dW_hh, db)
        dx = dx[0]
        return (dx, (dh0, dc0)) if ctx["batched"] else (dx[0], (dh0[0], dc0[0]))


class RNNCell(_CellBase):
    """One Elman RNN step: h' = cell(x, h). grad_x, grad_h = cell.backward(grad_h_next).

    An unknown nonlinearity is refused here, at construction, with ValueError (as nn.RNN does);
    torch.nn.RNNCell only notices it at the first forward call.
    """

    _name = "RNNCell"

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", *, dtype=np.float32, seed=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, 1, dtype, seed)

    def forward(self, input, hx=None):
        x, (h,), batched = self._prepare(input, (hx,))
        p = self._params
        backend = _backend()
        out, h_T, cache = backend.rnn_layer_forward(x[None], h, p["weight_ih"], p["weight_hh"], self._b(),
                                                    self.nonlinearity)
        self._ctx = {"cache": cache, "batched": batched, "N": x.shape[0], "backend": backend}
        return h_T if batched else h_T[0]

    def backward(self, grad_h):
        ctx = self._saved()
        dh = self._grad_in(grad_h, "grad_h", ctx)
        dx, dh0, dW_ih, dW_hh, db = ctx["backend"].rnn_layer_backward(np.zeros_like(dh)[None], dh, ctx["cache"])
        self._accumulate(dW_ih, dW_hh, db)
        dx = dx[0]
        return (dx, dh0) if ctx["batched"] else (dx[0], dh0[0])
