"""What a forward saves for its backward, and the guards that keep a backward from going silently wrong.

A backward is only right if everything its forward read is still what the forward read. Torch
guarantees that with autograd's saved tensors and version counters; lstmkit does the same by hand:

    Context      one forward's saved arrays (the layer caches, dropout masks) and what it read:
                 the parameters' versions and a fingerprint of each array the caller passed.
                 `out, state, ctx = lstm(x, hx, return_ctx=True)` hands it to the caller, so a
                 module can serve several forwards and their backwards run in any order
                 (`lstm.backward(grad, ctx=ctx)`); a plain call keeps it inside the module.
    Parameter    a NumPy array that counts in-place writes (`p -= lr * g`, `p[...] = v`,
                 np.copyto(p, v), p.fill(0), ...): `p._version`, like a torch tensor's.
    no_grad      forward keeps nothing for backward inside it (thread-local, like torch's).

The guards, each a RuntimeError naming what happened, as torch raises:
    * a context is used by one backward and then freed, unless that backward passes retain=True;
    * a parameter written in place since the forward (its version moved);
    * an array the caller passed (input, h_0, c_0) changed since the forward (its fingerprint,
      a hash of its bytes, moved); lstmkit never copies these, so it must check them;
    * a backward of a forward that ran under no_grad, or before any forward.
Outputs handed to the caller are never arrays a context keeps, so editing them changes nothing.

What the version counter cannot see: writes that bypass NumPy's operators on the parameter (through
`np.asarray(p)` or a view NumPy functions return, `p.flat`, the buffer protocol, compiled code).
After such a write call `module.bump_version()`. lstmkit's optimizers need nothing.

On the GPU (CuPy arrays, module.to("cuda")) parameters are plain CuPy arrays, whose writes nothing
counts: the version guard sees the module's own writes and bump_version(). The caller's arrays
are kept as a device copy instead of a hash (a hash would need a host sync at every forward; the
copy is one device-to-device memcpy, compared bit for bit at backward).
"""

import functools
import threading
import zlib

import numpy as np

from .device import array_module

# ---------------------------------------------------------------------- grad mode

_mode = threading.local()   # each thread has its own grad mode, as in torch


def is_grad_enabled():
    """False inside `with lstmkit.no_grad():` (in this thread), else True."""
    return getattr(_mode, "enabled", True)


class no_grad:
    """`with lstmkit.no_grad():` or `@lstmkit.no_grad()` (or `@lstmkit.no_grad`): forwards inside
    keep nothing for backward.

    The lean inference path: no caches, no context, no copies made for backward; a backward of
    such a forward raises RuntimeError. Nesting restores the outer mode on exit. eval() alone does
    not forbid backward (dropout off is all it means), as in torch.
    """

    def __new__(cls, func=None):
        if func is not None:      # @no_grad without parentheses, as torch also allows
            return cls()(func)
        return super().__new__(cls)

    def __init__(self, func=None):
        self._outer = []

    def __enter__(self):
        self._outer.append(is_grad_enabled())
        _mode.enabled = False
        return self

    def __exit__(self, *exc):
        _mode.enabled = self._outer.pop()
        return False

    def __call__(self, func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with no_grad():
                return func(*args, **kwargs)
        return wrapper


# ---------------------------------------------------------------------- versioned parameters

# NumPy functions (not ufuncs) that write into their first argument.
_WRITES_FIRST = {np.copyto, np.put, np.place, np.putmask, np.fill_diagonal, np.put_along_axis}


def _plain(obj):
    """Parameters (also inside a list or tuple argument) as plain ndarray views."""
    if isinstance(obj, Parameter):
        return obj.view(np.ndarray)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(o) for o in obj)
    return obj


def _bump(obj):
    if isinstance(obj, Parameter):
        obj._cell[0] += 1


def mark_written(array):
    """Count a write into `array` that NumPy did not see (a compiled kernel wrote into its memory):
    a Parameter's version goes up, so what was derived from it is computed again. Anything else: nothing."""
    _bump(array)


class Parameter(np.ndarray):
    """A parameter array with a version counter: `p._version` goes up on every in-place write
    made through NumPy (operators, ufuncs with out=, item assignment, np.copyto, fill, ...).

    Views (p[0], p.T, p.reshape(...)) share their parameter's counter, so a write through them
    counts too. Everything computed from a parameter (p * 2, p.sum(), p.copy(), np.zeros_like(p))
    is a plain ndarray: only the live parameter and its views carry the counter.
    """

    def __array_finalize__(self, obj):
        # A view shares its parameter's counter; anything else (a copy, p[[0, 1]], an unpickled
        # array) starts its own. A fancy-indexed copy has a base too (a temporary): memory tells.
        shared = isinstance(obj, Parameter) and self.base is not None and np.may_share_memory(self, obj)
        self._cell = obj._cell if shared else [0]

    @property
    def _version(self):
        return self._cell[0]

    def __setitem__(self, key, value):
        self._cell[0] += 1
        super().__setitem__(key, value)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if out is not None:
            for o in out:
                _bump(o)
            kwargs["out"] = _plain(out)
        if method == "at":      # np.add.at(p, idx, v) writes into its first input
            _bump(inputs[0])
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is not None and all(o is not None for o in out):
            return out[0] if len(out) == 1 else out   # `p -= g` rebinds p to this: the parameter itself
        return result

    def __array_function__(self, func, types, args, kwargs):
        if func in _WRITES_FIRST:
            _bump(args[0] if args else next(iter(kwargs.values())))
        return func(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()})

    def fill(self, value):
        self._cell[0] += 1
        super().fill(value)

    def sort(self, *args, **kwargs):
        self._cell[0] += 1
        super().sort(*args, **kwargs)

    def copy(self, order="C"):
        return np.array(self, order=order)

    def astype(self, dtype, *args, **kwargs):
        return self.view(np.ndarray).astype(dtype, *args, **kwargs)


def as_parameter(array):
    """A new Parameter holding `array` (contiguous, its own memory)."""
    return np.array(array, order="C").view(Parameter)


# ---------------------------------------------------------------------- contexts

try:   # the vectorised hash of the fast path, when Numba is there
    from .jit import AVAILABLE as _FAST
    if _FAST:
        from .jit import _fingerprint_words
except Exception:  # noqa: BLE001 - without the fast path, zlib's CRC-32 does the same job
    _FAST = False

_SMALL = 1 << 14   # bytes: below this, one zlib call is cheaper than a Numba dispatch


def fingerprint(a):
    """A hash of an array's bytes that any edit changes: kernels' 64-bit word hash for large arrays
    (~15 GB/s), zlib's CRC-32 (~4 GB/s, exact for any edit of up to 32 bits) for small ones."""
    if not a.flags.c_contiguous or a.ndim == 0:
        a = np.ascontiguousarray(a).reshape(-1)
    if _FAST and a.nbytes >= _SMALL and a.dtype.itemsize % 4 == 0:
        return int(_fingerprint_words(a.reshape(-1).view(np.uint32)))
    return zlib.crc32(a)


class Context:
    """One forward's saved state. The module fills `saved` (whatever its backward reads: the layer
    caches, dropout masks, shapes) and names what the forward read, so that the backward can tell
    whether it still holds:

        versions  each parameter's version at forward, in module._params' order
        arrays    [(label, the caller's array, fingerprint at forward)]

    `caches` are the layers' caches ([layer][direction] dicts, "gates" and "c" inside), for looking
    inside. A backward frees all of it unless asked to retain it.
    """

    __slots__ = ("module", "saved", "versions", "arrays", "state", "handed_out")

    def __init__(self, module, saved, versions, arrays):
        self.module, self.saved, self.versions, self.arrays = module, saved, versions, arrays
        self.state = "ready"       # "ready" -> "freed" after a backward without retain
        self.handed_out = False

    @property
    def caches(self):
        return None if self.saved is None else self.saved.get("caches")

    def __repr__(self):
        return f"<{type(self.module).__name__} forward context, {self.state}>"


# A forward under no_grad leaves this in the module, so that a plain backward after it refuses.
NO_GRAD = object()


def record(module, saved, arrays):
    """The context of a forward that just ran: the versions of all the module's parameters, and
    fingerprints of the caller's arrays [(label, array or None)] (a device copy for a GPU array)."""
    versions = [cell[0] for cell in module._cells]
    prints = []
    for label, a in arrays:
        if a is None:
            continue
        xp = array_module(a)
        a = xp.asarray(a)
        prints.append((label, a, fingerprint(a) if xp is np else a.copy()))
    return Context(module, saved, versions, prints)


def changed(a, print_):
    """Whether array `a` differs from its fingerprint (or, for a GPU array, its copy) taken at
    forward. The copy is compared as raw bits, so that a NaN that stayed a NaN is unchanged."""
    if isinstance(a, np.ndarray) and not isinstance(print_, np.ndarray):
        return fingerprint(a) != print_
    if a.shape != print_.shape:
        return True
    bits = {4: np.uint32, 8: np.uint64}.get(a.dtype.itemsize)
    if bits is None:
        return bool((a != print_).any())
    return bool((a.view(bits) != print_.view(bits)).any())


def take(module, ctx):
    """The context a backward runs on (the module's latest forward's when ctx is None), checked
    against every guard; RuntimeError naming the first that fails."""
    name = type(module).__name__
    if ctx is None:
        ctx = module.__dict__.get("_last")
        if ctx is None:
            raise RuntimeError(f"{name}.backward() called before any forward call: run the forward pass first")
        if ctx is NO_GRAD:
            raise RuntimeError(f"{name}.backward(): the latest forward ran under lstmkit.no_grad(), which keeps "
                               "nothing for backward; run the forward outside no_grad")
        if ctx.handed_out:
            raise RuntimeError(f"{name}.backward(): the latest forward returned its context "
                               "(return_ctx=True); pass it as backward(..., ctx=ctx)")
    elif not isinstance(ctx, Context):
        raise TypeError(f"{name}.backward: ctx must be the context a forward returned "
                        f"(return_ctx=True) or None, got {type(ctx).__name__}")
    elif ctx.module is not module:
        raise RuntimeError(f"{name}.backward(): ctx was made by the forward of another module "
                           f"({type(ctx.module).__name__} at {id(ctx.module):#x}); run its backward on that module")
    _check(name, ctx)
    return ctx


def _check(name, ctx):
    if ctx.state == "freed":
        raise RuntimeError(f"{name}.backward(): trying to backward through the same forward a second time: "
                           "its saved arrays were freed by the first backward. Pass retain=True to the first "
                           "backward to run another; a module stepped over several inputs keeps only its "
                           "latest forward, so use forward(..., return_ctx=True) and backward(..., ctx=ctx)")
    for pname, cell, version in zip(ctx.module._params, ctx.module._cells, ctx.versions):
        if cell[0] != version:
            raise RuntimeError(f"{name}.backward(): parameter {pname} was modified in place after the forward "
                               f"(version {version} at forward, now {cell[0]}), e.g. by an optimizer step; "
                               "the gradient would be of weights the forward did not use. Run backward first")
    for label, a, crc in ctx.arrays:
        if changed(a, crc):
            raise RuntimeError(f"{name}.backward(): {label} was modified in place after the forward that read it; "
                               "backward needs the values the forward used. Pass a copy to the forward, or "
                               "modify it after backward")


def done(ctx, retain):
    """After a backward that succeeded: free the context's arrays (they may be large) unless retained;
    its state stays, so a second backward still refuses."""
    if not retain:
        ctx.state = "freed"
        ctx.saved = None
        ctx.arrays = ()
