"""Which arrays of a recurrent stack's call (rnn_base.py) come from scratch.py's pool, and when
they go back to it.

A layer's output is a (T, N, P) array every call, and so are the caller's output and dx; fresh
memory each time is fresh pages, and page faults cost up to a quarter of a small step (scratch.py).
    * The fused LSTM layers write every layer's output into an array from the pool (out=): in
      training all of them (the top one is copied for the caller, the others are the next layer's
      input; the caches read them until they go), under no_grad all of them too (the top one of a
      plain unidirectional stack is handed to the caller as it is; a packed or bidirectional top is
      not pooled: from_grid and concatenate make the caller's array). A packed batch of unequal
      lengths is not pooled at all: its layers build their output grid from the real rows; nor
      is a batch of one, whose compiled layer makes its own arrays.
    * A pooled output goes back once nothing reads it (give_back_outputs).
    * What the caller receives (output, dx) is held by the module and reclaimed at its next call if
      the caller has let go of it (scratch.hold / scratch.reclaim).

Shape letters: T steps, N batch, P output size of a layer (proj_size or hidden_size).
"""

import numpy as np

from . import scratch
from .module import _kernels


def layer_output(stack, backend, x, layer, save, packing):
    """A pooled (T, N, P) array for this layer's output, or None where the layer makes its own."""
    if stack.mode != "LSTM" or backend is not _kernels or _kernels is None:
        return None
    if packing is not None and not packing["uniform"]:
        return None     # the packed layer builds its (T, N, P) grid from its real rows anyway
    if x.shape[1] == 1:
        return None     # so does the compiled batch-1 layer (and a sampler runs this every token)
    if not save and layer == stack.num_layers - 1 and (stack._D == 2 or packing is not None):
        return None
    return scratch.take((x.shape[0], x.shape[1], stack._P), stack.dtype)


def copy_for_caller(xp, y):
    """A copy of y for the caller, in a pooled array on the CPU."""
    if xp is not np:
        return y.copy()
    out = scratch.take(y.shape, y.dtype)
    np.copyto(out, y)
    return out


def handed(stack):
    """What the module handed to its caller last (output, dx), for scratch.reclaim."""
    return stack.__dict__.setdefault("_handed_out", {})


def give_back_outputs(kept, caches, save):
    """kept: [(array, layer)] pooled outputs of one call. Each goes back once nothing reads it:
    under no_grad now (the next layer has run), in training once every cache that holds it is gone
    (its own layer's, as h, and the next layer's, as x, without dropout in between). A layer whose
    caches are not all scratch.Cache (a packed batch's) keeps its array out of the pool."""
    for buf, layer in kept:
        if not save:
            scratch.give(buf)
            continue
        readers = [c for lc in caches[layer:layer + 2] for c in lc
                   if isinstance(c, scratch.Cache) and any(v is buf for v in c.values())]
        if readers and all(isinstance(c, scratch.Cache) for c in caches[layer]):
            scratch.give_when_gone(readers, buf)
