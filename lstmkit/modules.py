"""LSTM, GRU, RNN (and the cells, in cells.py) with torch.nn's contract, on NumPy arrays, or on
CuPy arrays after module.to("cuda") (module.py and device.py say how devices work).

Same constructor arguments, parameter names and shapes, initialisation U(-1/sqrt(H), 1/sqrt(H)),
input conventions and exception types as torch.nn; plus a hand-written `backward`.

Shape letters
    L   sequence length (T inside the layers)     N   batch (B inside the layers)
    I   input_size      H   hidden_size           P   proj_size if > 0 else hidden_size
    D   2 if bidirectional else 1                 G   gate rows: 4H (LSTM), 3H (GRU) or H (RNN)
    T   the longest sequence of a packed batch    B   its sequences        N   (packed) real tokens

Stacking (torch.nn.LSTM): layer k > 0 takes the D directions of layer k-1 concatenated,
(L, N, D*P); in train mode dropout with probability p zeroes elements of that input (inverted
dropout, kept elements scaled by 1/(1-p)); the reverse direction reads the sequence back to front.

Packed batches (torch.nn.utils.rnn.PackedSequence, here lstmkit.utils.rnn's): the data (N, I) is
laid out on the sorted (T, B) grid (packed.py), every layer runs over the real tokens only (each
takes batch_sizes), the reverse direction starts each sequence at its own last step, and the
output is packed again.

Forward and backward (the same shape for every module; contexts.py has the guards):
    out, state = module(x, hx)                              plain: the module keeps this forward's
    grad_x, grad_hx = module.backward(grad_output, grad_state)    context, its backward uses it once
    out, state, ctx = module(x, hx, return_ctx=True)        the context handed to the caller: one
    grad_x, grad_hx = module.backward(grad_output, grad_state, ctx=ctx)   module, many forwards
state is (h_n, c_n) for LSTM, h_n for RNN; a cell returns only its state (and ctx). Every gradient
given to backward is optional (None: that output does not reach the loss); backward(..., retain=True)
keeps the context for another backward. Parameter gradients are added into module.grads.
"""
import numpy as np

from . import utils  # noqa: F401 - lstmkit.utils (.rnn: pack_padded_sequence, ...), as torch.nn.utils
from .cells import GRUCell, LSTMCell, RNNCell  # noqa: F401 - `from lstmkit.modules import LSTMCell` works
from .contexts import no_grad  # noqa: F401 - no_grad re-exported
from .module import _backend, _kernels  # noqa: F401 - the backend rule; tests and benchmarks read it here
from .rnn_base import _data_of, _RNNBase


_NOT_GIVEN = object()


def _refuse_proj_size(proj_size):
    if proj_size is not _NOT_GIVEN:   # torch refuses the argument itself, even proj_size=0
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


class LSTM(_RNNBase):
    """Multi-layer LSTM over a sequence, torch.nn.LSTM's contract (see functional.py for the equations).

    output, (h_n, c_n) = lstm(x, (h_0, c_0))      x (L, N, I), (N, L, I) if batch_first, or (L, I)
        output (L, N, D*P); h_n (num_layers*D, N, P); c_n (num_layers*D, N, H)
    grad_x, (grad_h_0, grad_c_0) = lstm.backward(grad_output, (grad_h_n, grad_c_n))
        each gradient optional; parameter gradients are added into lstm.grads.
    output, (h_n, c_n), ctx = lstm(x, hx, return_ctx=True);  lstm.backward(..., ctx=ctx)

    A PackedSequence x (lstmkit.utils.rnn) gives a PackedSequence output with x's batch_sizes
    and indices, and backward takes grad_output packed the same way (or its data) and returns
    grad_x packed like x. h_0, c_0, h_n, c_n and their gradients are in the user's batch order:
    as torch does, h_0 is permuted by sorted_indices on the way in and h_n by unsorted_indices
    on the way out. h_n is each sequence's state at its own last step.
    """

    _name = "LSTM"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, *, dtype=np.float32, seed=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, dtype, seed)

    def forward(self, input, hx=None, *, return_ctx=False):
        x, batched, packing = self._prepare_input(input)
        N = x.shape[1]
        given = [("the input", _data_of(input))]
        if hx is None:
            h0 = self._xp.zeros((self.num_layers * self._D, N, self._P), dtype=self.dtype)
            c0 = self._xp.zeros((self.num_layers * self._D, N, self.hidden_size), dtype=self.dtype)
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"LSTM: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            self._check_state_ranks(hx, batched)
            h0 = self._prepare_state(hx[0], "hidden[0]", self._P, batched, N, packing)
            c0 = self._prepare_state(hx[1], "hidden[1]", self.hidden_size, batched, N, packing)
            given += [("h_0", hx[0]), ("c_0", hx[1])]
        return self._forward(x, h0, c0, batched, given, return_ctx, packing)

    def backward(self, grad_output=None, grad_state=None, *, ctx=None, retain=False):
        """grad_x, (grad_h_0, grad_c_0) of a forward: the latest one's, or ctx's. grad_state is
        (grad_h_n, grad_c_n), either may be None; parameter gradients are added into lstm.grads."""
        if grad_state is None:
            grad_state = (None, None)
        elif not isinstance(grad_state, (tuple, list)) or len(grad_state) != 2:
            raise TypeError("LSTM.backward: grad_state must be a tuple (grad_h_n, grad_c_n) or None, "
                            f"got {type(grad_state).__name__}")
        dx, dh0, dc0 = self._backward(grad_output, grad_state[0], grad_state[1], ctx, retain)
        return dx, (dh0, dc0)


class RNN(_RNNBase):
    """Multi-layer Elman RNN, torch.nn.RNN's contract: h_t = tanh or relu(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    output, h_n = rnn(x, h_0);   grad_x, grad_h_0 = rnn.backward(grad_output=None, grad_state=None)
    output, h_n, ctx = rnn(x, h_0, return_ctx=True);  rnn.backward(..., ctx=ctx)
    x may be a PackedSequence, as for LSTM. proj_size is refused with ValueError, as torch does.
    """

    _name = "RNN"

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, *, dtype=np.float32, seed=None,
                 proj_size=_NOT_GIVEN):
        _refuse_proj_size(proj_size)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size,
                         num_layers, bias, batch_first, dropout, bidirectional, 0, dtype, seed)

    def forward(self, input, hx=None, *, return_ctx=False):
        return self._forward_h(input, hx, return_ctx)

    def backward(self, grad_output=None, grad_state=None, *, ctx=None, retain=False):
        """grad_x, grad_h_0 of a forward: the latest one's, or ctx's. grad_state is grad_h_n or None."""
        dx, dh0, _ = self._backward(grad_output, grad_state, None, ctx, retain)
        return dx, dh0


class GRU(_RNNBase):
    """Multi-layer GRU, torch.nn.GRU's contract (gru.py has the equations and both layer paths):

        r = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)      z = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n = tanh(W_in x_t + b_in + r ⊙ (W_hn h_{t-1} + b_hn))      h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}

    Parameters weight_ih_l{k} (3H, I or D*H), weight_hh_l{k} (3H, H), bias_ih_l{k}, bias_hh_l{k}
    (3H,), rows in torch's order r, z, n; both biases are kept apart by the layer (b_hn is scaled
    by r), so their gradients differ, as in torch.

    output, h_n = gru(x, h_0)       x (L, N, I), (N, L, I) if batch_first, (L, I), or a PackedSequence
        output (L, N, D*H) (or packed like x); h_n (num_layers*D, N, H), for packed input in the
        user's batch order, each sequence's state at its own last step
    grad_x, grad_h_0 = gru.backward(grad_output=None, grad_state=None)
    output, h_n, ctx = gru(x, h_0, return_ctx=True);  gru.backward(..., ctx=ctx)
    proj_size is refused with ValueError, as torch does (even proj_size=0).
    """

    _name = "GRU"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, *, dtype=np.float32, seed=None, proj_size=_NOT_GIVEN):
        _refuse_proj_size(proj_size)
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, dtype, seed)

    def forward(self, input, hx=None, *, return_ctx=False):
        return self._forward_h(input, hx, return_ctx)

    def backward(self, grad_output=None, grad_state=None, *, ctx=None, retain=False):
        """grad_x, grad_h_0 of a forward: the latest one's, or ctx's. grad_state is grad_h_n or None;
        parameter gradients are added into gru.grads."""
        dx, dh0, _ = self._backward(grad_output, grad_state, None, ctx, retain)
        return dx, dh0
