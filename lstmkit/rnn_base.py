"""The multi-layer, optionally bidirectional recurrent stack that LSTM, GRU and RNN share
(modules.py): input and state checks as torch makes them, packed batches, dropout between layers,
the layer functions of the chosen backend run layer by layer and direction by direction, and the
backward that walks them in reverse.

Shape letters
    L   sequence length (T inside the layers)     N   batch (B inside the layers)
    I   input_size      H   hidden_size           P   proj_size if > 0 else hidden_size
    D   2 if bidirectional else 1                 G   gate rows: 4H (LSTM), 3H (GRU) or H (RNN)
    T   the longest sequence of a packed batch    B   its sequences        N   (packed) real tokens

Devices: the stack is written against the module's array module `xp` (numpy, or cupy after
.to("cuda")); the layers come from module._backend(xp). Dropout masks are drawn on the host by
the module's NumPy generator (and copied to the GPU once per layer), so a seed gives the same
masks on both devices. A packed batch on the GPU has its data there and its layout (batch_sizes,
indices) on the host, as torch keeps batch_sizes on the CPU. Which of a call's arrays come from
scratch.py's pool, and when they go back: stack_arrays.py.
"""

import numbers
import warnings

import numpy as np

from . import contexts, gru, packed, scratch, stack_arrays
from .contexts import is_grad_enabled
from .module import _backend, _check_dtype, _check_int, _check_size, _kernels, _Module
from .utils.rnn import PackedSequence


class _RNNBase(_Module):
    """The multi-layer, optionally bidirectional recurrent stack shared by LSTM, GRU and RNN."""

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
        gate_size = {"LSTM": 4, "GRU": 3}.get(mode, 1) * hidden_size
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

    # ------------------------------------------------------------------ input and states
    def _prepare_input(self, input):
        """Check the input as torch does; return it as (L, N, I), whether it was batched, and for a
        PackedSequence its packing (the input then on the sorted grid, see _prepare_packed)."""
        if isinstance(input, PackedSequence):
            return self._prepare_packed(input)
        x = self._array(input, "the input")
        shape = x.shape
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
                               f"got input of shape {shape}")
        return x, batched, None

    def _prepare_packed(self, seq):
        """A PackedSequence's data checked as torch checks it ((N, I), the weights' dtype), its
        layout by packed.packing. Returns x (T, B, I) on the sorted grid, True, and the packing.
        batch_first does not apply: a PackedSequence has one layout, as in torch."""
        data = self._array(seq.data, "the input's data")
        self._check_input_dtype(data)
        if data.ndim != 2:
            raise RuntimeError(f"{self._name}: input must have 2 dimensions, got {data.ndim} "
                               f"(a PackedSequence's data is (N, input_size); its shape is {data.shape})")
        if data.shape[1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {data.shape[1]}")
        packing = packed.packing(seq, self._name)
        return packed.to_grid(data, packing["bs"]), True, packing

    def _prepare_state(self, state, name, size, batched, N, packing=None):
        """Check one of h_0 / c_0 as torch does; return it as (num_layers*D, N, size). For a packed
        input it is in the user's batch order and comes back in the sorted order (torch permutes
        h_0 by sorted_indices the same way)."""
        expected = (self.num_layers * self._D, N, size)
        s = self._array(state, name)
        if s.dtype != self.dtype:
            raise RuntimeError(f"{self._name}: {name} has dtype {s.dtype}, expected {self.dtype} "
                               "like the weights and the input")
        if batched:
            if s.shape != expected:
                raise RuntimeError(f"Expected {name} size {expected}, got {list(s.shape)}")
            return s if packing is None else packed.sort_batch(s, packing["sorted"])
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

    # ------------------------------------------------------------------ one layer, one direction
    def _layer_forward(self, backend, layer, d, x, h0, c0, bs, save, out=None):
        """One layer in one direction: out (T, N, P), h_T, c_T (None but for the LSTM), cache.
        bs: the batch_sizes of a packed batch (x on its sorted grid), or None; every layer takes
        it (real tokens only: kernels.py and gru.py natively, functional.py through packed.py's
        segment runner). out: a kept array for the output (the fused LSTM layers only)."""
        sfx = self._suffixes[layer][d]
        p = self._plain
        W_ih, W_hh = p["weight_ih" + sfx], p["weight_hh" + sfx]
        if self.mode == "GRU":   # b_hn sits inside r ⊙ (W_hn h + b_hn): the biases stay apart
            b_ih, b_hh = (p["bias_ih" + sfx], p["bias_hh" + sfx]) if self.bias else (None, None)
            forward = getattr(backend, "gru_layer_forward", gru.gru_layer_forward)   # the GPU's own
            out, h_T, cache = forward(x, h0, W_ih, W_hh, b_ih, b_hh, bs, save=save)
            return out, h_T, None, cache
        b = self._summed_bias(sfx) if self.bias else None
        if self.mode == "LSTM":
            # lstm_fused.py's CPU time loops read W_hh^T from its own memory (_lstm_forward_loop
            # says why); one step of batch 1 without backward reads W_hh's rows instead, and
            # lstm_parts.py's loops (B >= 16 in float32) the weights packed for the kernel
            one_token = x.shape[0] == 1 and x.shape[1] == 1 and not save
            fused = backend is _kernels and _kernels is not None and bs is None
            parts = fused and _kernels.lstm_parts.usable(np.result_type(x.dtype, W_ih.dtype), x.shape[1],
                                                         self.proj_size > 0)
            # batch 1 over several steps without save: its recurrent product on tile_gemm's packing
            b1_steps = fused and not save and x.shape[1] == 1 and x.shape[0] > 1 and self.proj_size == 0
            W_hh_T = self._transposed_W_hh(sfx) if self._xp is np and not one_token and not parts else None
            if bs is None and out is None and not parts and not b1_steps:   # generation's hot path
                return backend.lstm_layer_forward(x, h0, c0, W_ih, W_hh, b, p.get("weight_hr" + sfx),
                                                  save=save, W_hh_T=W_hh_T)
            extra = {} if out is None else {"out": out}   # out: the fused CPU layers only
            if (parts or b1_steps) and not save:   # inference keeps the packed weights; training changes them every step
                extra["packed"] = self._derived(("packed", sfx), ("weight_ih" + sfx, "weight_hh" + sfx),
                                                _kernels.lstm_parts.pack_weights)
            return backend.lstm_layer_forward(x, h0, c0, W_ih, W_hh, b, p.get("weight_hr" + sfx),
                                              save=save, W_hh_T=W_hh_T, batch_sizes=bs, **extra)
        nl = "tanh" if self.mode == "RNN_TANH" else "relu"
        out, h_T, cache = backend.rnn_layer_forward(x, h0, W_ih, W_hh, b, nl, save=save, batch_sizes=bs)
        return out, h_T, None, cache

    def _layer_backward(self, backend, layer, d, dout, dh, dc, cache):
        """Backward of _layer_forward: dx, dh0, dc0 (None but for the LSTM); the parameter gradients
        are added into self.grads. Each layer's backward follows its own cache (packed or not)."""
        sfx = self._suffixes[layer][d]
        if self.mode == "GRU":
            dx, dh0, dW_ih, dW_hh, db_ih, db_hh = gru.gru_layer_backward(dout, dh, cache)
            self._accumulate(sfx, dW_ih, dW_hh, db_ih, db_hh)
            return dx, dh0, None
        if self.mode == "LSTM":
            dx, dh0, dc0, dW_ih, dW_hh, db, dW_hr = backend.lstm_layer_backward(dout, dh, dc, cache)
        else:
            (dx, dh0, dW_ih, dW_hh, db), dc0, dW_hr = backend.rnn_layer_backward(dout, dh, cache), None, None
        # b = b_ih + b_hh in these layers, so both biases receive its gradient
        self._accumulate(sfx, dW_ih, dW_hh, db, db, dW_hr)
        # the fused layers' new arrays (from scratch.py's pool), read by nothing once added
        if backend is _kernels and _kernels is not None:
            scratch.give(dW_ih)
            scratch.give(dW_hh)
        return dx, dh0, dc0

    def _accumulate(self, sfx, dW_ih, dW_hh, db_ih, db_hh, dW_hr=None):
        g = self.grads
        g["weight_ih" + sfx] += dW_ih
        g["weight_hh" + sfx] += dW_hh
        if db_ih is not None:
            g["bias_ih" + sfx] += db_ih
            g["bias_hh" + sfx] += db_hh
        if dW_hr is not None:
            g["weight_hr" + sfx] += dW_hr

    # ------------------------------------------------------------------ the stack
    @staticmethod
    def _flip(packing):
        """The reverse direction's view of time: x[::-1], or for a packed batch each sequence
        reversed within its own length (it starts at its own last step, never in padding)."""
        if packing is None or packing["uniform"]:
            return lambda a: a[::-1]
        return lambda a: packed.reverse_within_lengths(a, packing["lengths"])

    def _run_stack(self, x, h0, c0, backend, save, packing=None):
        """Forward through every layer and direction. x (L, N, I) -> (L, N, D*P), h_n, c_n, and what
        backward needs ({"caches", "masks"}), or None when save is False (no_grad)."""
        D, L_ = self._D, self.num_layers
        bs = None if packing is None or packing["uniform"] else packing["bs"]
        flip = self._flip(packing) if D == 2 else None   # (a generating sampler runs this every token)
        xp = self._xp
        h_n = xp.empty_like(h0)
        c_n = xp.empty_like(c0) if c0 is not None else None
        caches, masks = [], []
        kept = []      # the layers' outputs written into kept arrays: (array, layer)
        for layer in range(L_):
            mask = None
            if layer > 0 and self.training and self.dropout > 0:
                keep = 1.0 - self.dropout
                mask = (self.dropout_rng.random(x.shape) < keep).astype(self.dtype)
                if keep > 0:
                    mask /= keep
                if xp is not np:
                    mask = xp.asarray(mask)
                x = x * mask
            masks.append(mask)
            outs, layer_caches = [], []
            for d in range(D):
                idx = layer * D + d
                xin = xp.ascontiguousarray(x if d == 0 else flip(x))
                buf = stack_arrays.layer_output(self, backend, xin, layer, save, packing)
                out, h_n[idx], c_T, cache = self._layer_forward(
                    backend, layer, d, xin, h0[idx], None if c0 is None else c0[idx], bs, save, buf)
                if buf is not None and (save or layer < L_ - 1):   # not the one handed out
                    kept.append((buf, layer))
                if c_T is not None:
                    c_n[idx] = c_T
                outs.append(out if d == 0 else flip(out))
                layer_caches.append(cache)
            caches.append(layer_caches)
            x = outs[0] if D == 1 else xp.concatenate(outs, axis=2)
        if save and D == 1 and packing is None:   # the top layer's cache holds its output as h: hand out a copy
            x = stack_arrays.copy_for_caller(xp, x)
        stack_arrays.give_back_outputs(kept, caches, save)
        if not save:
            return x, h_n, c_n, None
        return x, h_n, c_n, {"caches": caches, "masks": masks}

    def _backward_stack(self, dy, dh_n, dc_n, saved):
        """Backward through the stack in reverse. dy (L, N, D*P) -> dx (L, N, I), dh_0, dc_0."""
        D, P = self._D, self._P
        backend, packing = saved["backend"], saved["packing"]
        flip = self._flip(packing)
        xp = self._xp
        dh0 = xp.empty_like(dh_n)
        dc0 = xp.empty_like(dc_n) if dc_n is not None else None
        ours = None     # the gradient that a layer above made (never the caller's grad_output)
        for layer in reversed(range(self.num_layers)):
            dx_layer = None
            for d in range(D):
                idx = layer * D + d
                dout = dy[:, :, d * P:(d + 1) * P]
                dout = xp.ascontiguousarray(dout if d == 0 else flip(dout))
                dx, dh0[idx], dc = self._layer_backward(backend, layer, d, dout, dh_n[idx],
                                                        None if dc_n is None else dc_n[idx],
                                                        saved["caches"][layer][d])
                if dc is not None:
                    dc0[idx] = dc
                dx = dx if d == 0 else flip(dx)
                dx_layer = dx if dx_layer is None else dx_layer + dx
            if ours is not None and xp is np:   # the layer above's dx: read by nothing any more
                scratch.give(ours)
            if saved["masks"][layer] is not None:
                if D == 1 and xp is np:
                    dx_layer *= saved["masks"][layer]     # dx is this layer's new array
                else:
                    dx_layer = dx_layer * saved["masks"][layer]
            dy = ours = dx_layer
        return dy, dh0, dc0

    # ------------------------------------------------------------------ forward and backward
    def _forward(self, x, h0, c0, batched, given, return_ctx, packing=None):
        """The stack forward and its context. given: [(label, array the caller passed)]."""
        self.__dict__["_last"] = None   # drop the previous context first: two sets of caches never coexist
        backend = _backend(self._xp)
        save = is_grad_enabled()
        scratch.reclaim(stack_arrays.handed(self), "output")     # the last output, if let go of
        y, h_n, c_n, saved = self._run_stack(x, h0, c0, backend, save, packing)
        if packing is None and self._xp is np:
            scratch.hold(stack_arrays.handed(self), "output", y)
        if packing is None:
            output = self._finish_output(y, batched)
            h_n, c_n = self._state_out(h_n, batched), None if c_n is None else self._state_out(c_n, batched)
        else:   # h_n, c_n back in the user's batch order, as torch returns them
            output = PackedSequence(packed.from_grid(y, packing["bs"]), packing["batch_sizes"],
                                    packing["sorted"], packing["unsorted"])
            h_n, c_n = (None if s is None else packed.unsort_batch(s, packing["unsorted"]) for s in (h_n, c_n))
        if saved is not None:
            saved.update(batched=batched, N=x.shape[1], backend=backend, packing=packing,
                         out_shape=output.shape if packing is None else output.data.shape)
        ctx = self._record(saved, given, return_ctx)
        state = h_n if c_n is None else (h_n, c_n)
        return (output, state, ctx) if return_ctx else (output, state)

    def _backward(self, grad_output, grad_h_n, grad_c_n, ctx, retain):
        """Checks, then the stack backward: grad_x, grad_h_0, grad_c_0 (None but for the LSTM)."""
        ctx = contexts.take(self, ctx)
        saved = ctx.saved
        batched, packing = saved["batched"], saved["packing"]
        if packing is not None:
            grad_output = packed.grad_data(grad_output, packing, self._name)
        dy = self._grad_in(grad_output, "grad_output", saved["out_shape"])
        dh_n = self._grad_in(grad_h_n, "grad_h_n", self._state_shape(self._P, saved))
        dc_n = None if self.mode != "LSTM" else \
            self._grad_in(grad_c_n, "grad_c_n", self._state_shape(self.hidden_size, saved))
        if packing is not None:   # to the layers' layout: the sorted grid, states in sorted order
            dy = packed.to_grid(dy, packing["bs"])
            dh_n, dc_n = (None if g is None else packed.sort_batch(g, packing["sorted"]) for g in (dh_n, dc_n))
        elif not batched:   # back to the layers' layout: (L, N, .) and (num_layers*D, N, .)
            dy, dh_n = dy[:, None, :], dh_n[:, None, :]
            dc_n = None if dc_n is None else dc_n[:, None, :]
        elif self.batch_first:
            dy = dy.swapaxes(0, 1)
        scratch.reclaim(stack_arrays.handed(self), "dx")     # the last dx, if let go of
        dx, dh0, dc0 = self._backward_stack(dy, dh_n, dc_n, saved)
        if packing is None and self._xp is np:
            scratch.hold(stack_arrays.handed(self), "dx", dx)
        contexts.done(ctx, retain)
        if packing is not None:
            dx = PackedSequence(packed.from_grid(dx, packing["bs"]), packing["batch_sizes"],
                                packing["sorted"], packing["unsorted"])
            return (dx, *(None if g is None else packed.unsort_batch(g, packing["unsorted"]) for g in (dh0, dc0)))
        return self._finish_output(dx, batched), self._state_out(dh0, batched), \
            None if dc0 is None else self._state_out(dc0, batched)

    def _state_shape(self, size, saved):
        full = (self.num_layers * self._D, saved["N"], size)
        return full if saved["batched"] else (full[0], full[2])

    def _grad_in(self, grad, name, shown):
        """A gradient given to backward, checked against the shape the forward returned; None: zeros."""
        if grad is None:
            return self._xp.zeros(shown, dtype=self.dtype)
        g = self._array(grad, name)
        if g.shape != shown:
            raise RuntimeError(f"{self._name}.backward: {name} must have the shape of the forward's "
                               f"{name.removeprefix('grad_')}, {shown}, got {g.shape}")
        return g if g.dtype == self.dtype else g.astype(self.dtype)

    def _finish_output(self, y, batched):
        if not batched:
            return y[:, 0, :]
        return y.swapaxes(0, 1) if self.batch_first else y

    def _state_out(self, s, batched):
        return s if batched else s[:, 0, :]

    # ------------------------------------------------------------------ RNN and GRU: one state
    def _forward_h(self, input, hx, return_ctx):
        """forward of the modules whose state is h alone (RNN, GRU)."""
        x, batched, packing = self._prepare_input(input)
        N = x.shape[1]
        if hx is None:
            h0 = self._xp.zeros((self.num_layers * self._D, N, self.hidden_size), dtype=self.dtype)
        else:
            if np.ndim(hx) != (3 if batched else 2):
                kind, want = ("batched 3-D", 3) if batched else ("unbatched 2-D", 2)
                raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got "
                                   f"{np.ndim(hx)}-D tensor")
            h0 = self._prepare_state(hx, "hidden", self.hidden_size, batched, N, packing)
        given = [("the input", _data_of(input)), ("h_0", hx)]
        return self._forward(x, h0, None, batched, given, return_ctx, packing)

    def __repr__(self):
        extra = f", num_layers={self.num_layers}" if self.num_layers != 1 else ""
        extra += "" if self.bias else ", bias=False"
        extra += ", batch_first=True" if self.batch_first else ""
        extra += f", dropout={self.dropout}" if self.dropout else ""
        extra += ", bidirectional=True" if self.bidirectional else ""
        extra += f", proj_size={self.proj_size}" if self.proj_size else ""
        return f"{self._name}({self.input_size}, {self.hidden_size}{extra})"


def _data_of(input):
    """What a forward fingerprints of its input: a PackedSequence's data, else the input."""
    return input.data if isinstance(input, PackedSequence) else input
