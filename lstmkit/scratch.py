"""Scratch arrays the fused layers reuse from call to call, so that a training step does not map fresh
memory for its largest arrays every time.

Why: without torch in the process (torch's allocator changes glibc's settings for everyone),
glibc's malloc hands multi-MB arrays out of freshly mapped or freshly grown memory and gives it
back to the system when they are freed, so every step touches new pages: 2,244 minor page faults a
step at (T, B, I, H) = (50, 32, 64, 128), and the step took 1.5x as long as with the faults
stopped (`python benchmarks/page_faults.py`; BENCHMARKS.md). The largest arrays of a step are the
layer's gates (T, B, 4H), kept for the backward, and the backward's dgates of the same shape.

How: `take(shape, dtype)` returns a kept array of that shape if one is free, else a new one;
`give(a)` keeps `a` for the next take. Only arrays that nothing else can still read are given:
dgates at the end of the backward that made it, the forward's gates when no backward will follow
(no_grad), a cache's gates, cell states and (stack_arrays.py) outputs when the cache itself is
gone (its last reference dropped: the backward consumed it, or the caller let it go), through
`give_when_gone`; in a module's stack also the weight gradients once added into .grads and the dx
passed down between layers once used. A cache kept for a second backward (retain=True) keeps its
arrays. At most KEEP arrays per shape and SHAPES shapes are kept
(the least recently used shape is dropped first), so varying sequence lengths cannot grow it.

Arrays handed to the caller (a module's output and dx) are new; the module holds them and gives
them to the pool at its next call only when the caller has let go of them (hold/reclaim, below).

Shape letters: T steps, B batch, H hidden size.
"""

import math
import sys
import threading
import weakref
from collections import OrderedDict

import numpy as np

# arrays kept per (shape, dtype). A training step of an L-layer LSTM gives back L gates and one
# dgates (T, B, 4H), and L cell states and L outputs (T, B, H) (rnn_base.py keeps the outputs):
# 8 covers four layers without any step mapping fresh memory for them.
KEEP = 8
SHAPES = 8      # (shape, dtype) keys kept, least recently used dropped first

_free = OrderedDict()     # (shape, dtype) -> [arrays]
# Reentrant: give_when_gone's finalizers call give(), and a finalizer runs wherever its cache dies,
# which can be a garbage collection set off by an allocation inside take() or give() of this same
# thread while it holds the lock; a plain Lock would deadlock there.
_lock = threading.RLock()


_DTYPE_STR = {}   # dtype (as given) -> its .str: np.dtype() is slow for a per-call key


def _key(shape, dtype):
    s = _DTYPE_STR.get(dtype)
    if s is None:
        s = _DTYPE_STR[dtype] = np.dtype(dtype).str
    return tuple(map(int, shape)), s


# ---------------------------------------------------------------------- cache-line aligned arrays
# NumPy's arrays start wherever malloc puts them: 16 bytes past a page for the multi-MB ones (glibc's
# chunk header). The layers' parts (lstm_parts.py) write neighbouring batch rows of the same arrays
# from two cores; at 16 bytes off, the line holding one part's last row and the next part's first
# is written by both every step, and every row's vector loads and stores straddle lines. Arrays
# that start on a 64-byte line: 5-7% faster forward at (50, 32, 64, 128) and (50, 50, 128, 128)
# (BENCHMARKS.md, "Eighth session"). A NumPy array cannot own memory it did not allocate, so these
# are views of a slightly larger byte buffer; `_aligned` knows those buffers (by id, checked against
# a weak reference, stale entries pruned in bulk), so that give() can keep such a view, or the buffer itself (what .base of a reshape of one
# is), as it keeps an array that owns its memory.
LINE = 64
# id(buffer) -> (weakref to the buffer, weakref to its aligned view, byte offset, shape, dtype); an
# entry whose buffer is gone is stale (its id may come back for another object), pruned in bulk
_aligned = {}
_PRUNE_AT = [1024]


def _address(a):
    return a.__array_interface__["data"][0]


def empty(shape, dtype):
    """np.empty(shape, dtype) starting on a LINE-byte boundary."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = np.empty(nbytes + LINE, np.uint8)
    off = -_address(buf) % LINE
    a = buf[off:off + nbytes].view(dtype).reshape(shape)
    with _lock:
        if len(_aligned) >= _PRUNE_AT[0]:
            for k in [k for k, e in _aligned.items() if e[0]() is None]:
                del _aligned[k]
            _PRUNE_AT[0] = max(1024, 2 * len(_aligned))
        _aligned[id(buf)] = (weakref.ref(buf), weakref.ref(a), off, a.shape, dtype)
    return a


def _entry(buf):
    """buf's registry entry if buf is one of empty()'s buffers, else None."""
    e = _aligned.get(id(buf))
    return e if e is not None and e[0]() is buf else None


def _keepable(a):
    """The array to keep for `a` (itself, or the aligned view of the buffer it is or spans), or None
    for what must not be kept: a view of part of an array, or of memory not ours."""
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
        return None
    if a.base is None:
        e = _entry(a)
        if e is None:
            return a            # an array that owns its memory
        buf = a
    else:
        buf = a.base
        e = _entry(buf)
        if e is None:
            return None         # a view of memory not ours
        if e[1]() is a:
            return a            # the aligned view itself
        if _address(a) != _address(buf) + e[2] or a.nbytes != buf.nbytes - LINE:
            return None         # a view of part of it
    view = e[1]()
    if view is None:            # the first view is gone (a reshape of it kept the buffer alive)
        view = buf[e[2]:e[2] + buf.nbytes - LINE].view(e[4]).reshape(e[3])
        _aligned[id(buf)] = (e[0], weakref.ref(view), *e[2:])
    return view


def take(shape, dtype):
    """An uninitialised (shape) array of dtype, starting on a cache line: a kept one when there is
    one, else a new one."""
    key = _key(shape, dtype)
    with _lock:
        kept = _free.get(key)
        if kept:
            _free.move_to_end(key)
            return kept.pop()
    return empty(shape, dtype)


def give(a):
    """Keep `a` for a later take; the caller promises that nothing reads or writes it any more.
    `a` may be an array take() returned, a reshape of one, or its .base."""
    a = _keepable(a) if a is not None else None
    if a is None:
        return      # views of part of an array (and arrays others may share) are never kept
    key = _key(a.shape, a.dtype)
    with _lock:
        kept = _free.setdefault(key, [])
        _free.move_to_end(key)
        if len(kept) < KEEP and not any(k is a for k in kept):
            kept.append(a)
        while len(_free) > SHAPES:
            _free.popitem(last=False)


class Cache(dict):
    """A layer's cache (a dict) that can be watched: when it is gone, give_when_gone's arrays are kept."""

    __slots__ = ("__weakref__",)


def give_when_gone(cache, *arrays):
    """Give `arrays` back once `cache` (a Cache, or a list of them) has no references left: with
    several, once every one of them is gone (an array that two caches read, such as a layer's
    output that the next layer's cache holds as its input)."""
    caches = cache if isinstance(cache, (list, tuple)) else [cache]
    left = [len(caches)]

    def one_gone():
        left[0] -= 1
        if left[0] == 0:
            _give_all(arrays)

    for c in caches:
        weakref.finalize(c, one_gone)


def _give_all(arrays):
    for a in arrays:
        give(a)


# ---------------------------------------------------------------------- arrays handed to the caller
# A module hands out its output (and, from backward, dx): new arrays that only the caller can know to
# be dead. `hold(held, key, a)` keeps a reference to the array handed out; at the next call,
# `reclaim(held, key)` gives it to the pool if the caller has let go of it and of every view of it.
# CPython counts references exactly: a view holds its base, a memoryview or a buffer export holds
# the array, so a count equal to what our own dict and locals make (measured below, through the same
# function, at import) means nobody else can reach the memory. Without exact counts (PyPy, a
# free-threaded build) nothing is reclaimed and the caller's arrays stay new, as before.
def _references(held, key):
    a = held.get(key)
    return sys.getrefcount(a)


def _buffer_references(held, key):
    """References to the byte buffer under an aligned array (its own .base counts one): a view the
    caller made of the array holds the buffer, not the array."""
    a = held.get(key)
    return sys.getrefcount(a.base)


def _alone_counts():
    if sys.implementation.name != "cpython" or not getattr(sys, "_is_gil_enabled", lambda: True)():
        return None, None
    probe = {"a": np.empty(1), "b": empty(1, np.float64)}
    return _references(probe, "a"), _buffer_references(probe, "b")


_ALONE, _ALONE_BUFFER = _alone_counts()


def hold(held, key, a):
    """Remember `a`, just handed to the caller under `key` (held: a dict the module owns)."""
    if _ALONE is not None and isinstance(a, np.ndarray) and (a.base is None or _keepable(a) is a):
        held[key] = a


def reclaim(held, key):
    """Give the array held under `key` to the pool when nothing but `held` refers to it (nor,
    for an aligned array, to the buffer under it)."""
    if key in held and _references(held, key) == _ALONE and \
            (held[key].base is None or _buffer_references(held, key) == _ALONE_BUFFER):
        give(held.pop(key))
