"""What every module here shares (the layers in modules.py and the cells in cells.py): parameters
with torch's names, state_dict, train/eval, gradients added into .grads, arrays derived from the
weights kept until a weight changes, the context of the latest forward (contexts.py), and the
checks on constructor arguments torch makes.

Devices (device.py): a module lives on "cpu" (NumPy; parameters are contexts.Parameter arrays
that count their in-place writes) or on "cuda" (CuPy arrays), moved with `.to(device)` as in
torch. Inputs must be on the module's device (RuntimeError naming both, as torch's). state_dict()
always hands out host NumPy arrays, also for a module on the GPU (torch hands out device tensors):
checkpoints and `torch.from_numpy` interchange stay one format on every machine; load_state_dict
takes NumPy arrays, CuPy arrays and torch tensors on either device. On the GPU, in-place writes
through CuPy are not counted (CuPy arrays have no hook for it): arrays derived from the weights
are recomputed every forward instead of cached, and the "modified since the forward" guard sees
the module's own writes (assignment, load_state_dict) and bump_version(), which an optimizer
updating GPU parameters in place should call after each step.

Shape letters: G gate rows (4H LSTM, 3H GRU, H RNN), H hidden size, I input size, P size of h.
"""

import numbers
import os

import numpy as np

from . import contexts, functional
from .contexts import NO_GRAD, as_parameter
from .device import device_of, parse_device, require_cupy, same_device_error, to_numpy

try:  # the fused kernels are optional: without Numba, the reference runs
    from . import kernels as _kernels
except Exception:  # noqa: BLE001 - any failure to build the fast path falls back to the reference
    _kernels = None

_DTYPES = (np.float32, np.float64)


def _backend(xp=np):
    """The module that runs the layers on arrays of `xp`: the fused kernels (CPU: kernels.py, GPU:
    cuda_layers.py) unless LSTMKIT_REFERENCE=1 asks for the reference, functional.py."""
    if xp is not np:
        if os.environ.get("LSTMKIT_REFERENCE") == "1":
            return functional
        from . import cuda_layers
        return cuda_layers
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
    """What every layer shares: named parameters, their gradients, train/eval, state_dict, and the
    context of the latest forward (contexts.py)."""

    _name = "Module"

    def _init_parameters(self, shapes, hidden_size, seed):
        # One seed gives init and dropout independent streams, so dropout draws never shift weights.
        init_seq, dropout_seq = np.random.SeedSequence(seed).spawn(2)
        rng = np.random.default_rng(init_seq)
        self.dropout_rng = np.random.default_rng(dropout_seq)
        bound = 1.0 / np.sqrt(hidden_size)
        # Filled in torch's parameter order, so a given seed always gives the same weights.
        self._params = {name: as_parameter(rng.uniform(-bound, bound, size=shape).astype(self.dtype))
                        for name, shape in shapes}
        # Plain views of the same memory for the layers: NumPy never routes them through Parameter.
        self._plain = {name: p.view(np.ndarray) for name, p in self._params.items()}
        self._cells = [p._cell for p in self._params.values()]   # their version counters, in order
        self._cell_of = dict(zip(self._params, self._cells))
        self.grads = {name: np.zeros(p.shape, p.dtype) for name, p in self._params.items()}
        self.training = True
        self._last = None      # the latest forward's Context, NO_GRAD, or None before any forward
        self._derived_arrays = {}   # arrays computed from the weights, with the versions they were computed at
        self._xp, self._device = np, "cpu"   # the array module of parameters and inputs, and its device

    def __getattr__(self, name):  # lstm.weight_ih_l0, as in torch
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name, value):
        """`module.weight_ih_l0 = array` COPIES array into the live parameter (shape checked, dtype
        converted, NaN/Inf refused), so that optimizers and contexts holding it stay right; torch
        raises TypeError here instead. Any other attribute is set as usual."""
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            value = to_numpy(value)
            problem = _value_problem(name, value, params[name])
            if problem is not None:
                raise problem[0](f"{self._name}: cannot assign to {name}: {problem[1]}")
            self._write(name, value)
            return
        object.__setattr__(self, name, value)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def named_parameters(self):
        """(name, array) pairs of the live parameters, in torch's order. Optimizers update them in
        place; each is a contexts.Parameter, whose version counter sees those updates."""
        return iter(self._params.items())

    def parameters(self):
        return iter(self._params.values())

    def bump_version(self):
        """Mark every parameter as changed: only needed after writing one in a way NumPy's operators
        do not see (through np.asarray(p), from compiled code)."""
        for cell in self._cells:
            cell[0] += 1

    def state_dict(self):
        """Copies of the parameters (plain NumPy arrays, on the host also for a module on the GPU)
        under torch.nn's keys, in torch.nn's order."""
        if self._xp is not np:
            return {name: p.get() for name, p in self._params.items()}
        return {name: np.array(p) for name, p in self._params.items()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays (NumPy arrays, torch tensors, anything np.asarray takes) into the parameters.
        Every value is checked (shape, a float-convertible dtype, all finite) before any is written:
        a bad value anywhere leaves the module as it was."""
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
            value = to_numpy(state_dict[name])
            problem = _value_problem(name, value, param)
            if problem is not None:
                errors.append(problem[1])
            arrays[name] = value
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {self._name}:\n\t" + "\n\t".join(errors))
        for name, value in arrays.items():  # only after every check passed: all or nothing
            self._write(name, value)

    def _write(self, name, value):
        """Copy a checked host array into parameter `name` on its device; its version moves."""
        if self._xp is np:
            self._params[name][...] = value
        else:
            self._params[name][...] = self._xp.asarray(value, dtype=self.dtype)
            self._cell_of[name][0] += 1

    @property
    def device(self):
        """"cpu" or "cuda:N": where the parameters are (torch modules have no such attribute)."""
        return self._device

    def to(self, device):
        """Move parameters and gradients to `device` ("cpu", "cuda", "cuda:N"), in place, and return
        self, as torch's Module.to does. Build optimizers after moving: they hold the parameter
        arrays, which are new ones on the new device. Contexts of forwards before the move can no
        longer run a backward (their parameters' versions moved). RuntimeError when "cuda" is asked
        for without CuPy or a visible GPU."""
        kind, index = parse_device(device)
        target = "cpu" if kind == "cpu" else f"cuda:{index}"
        if target == self._device:
            return self
        params = {n: to_numpy(p) for n, p in self._params.items()}
        grads = {n: to_numpy(g) for n, g in self.grads.items()}
        versions = [cell[0] + 1 for cell in self._cells]
        if kind == "cpu":
            xp = np
            self._params = {n: as_parameter(a) for n, a in params.items()}
            self._plain = {n: p.view(np.ndarray) for n, p in self._params.items()}
            self._cells = [p._cell for p in self._params.values()]
            self.grads = {n: np.array(g) for n, g in grads.items()}
        else:
            xp = require_cupy()
            with xp.cuda.Device(index):
                self._params = {n: xp.asarray(a) for n, a in params.items()}
                self.grads = {n: xp.asarray(g) for n, g in grads.items()}
            self._plain = dict(self._params)
            self._cells = [[0] for _ in self._params]
        for cell, version in zip(self._cells, versions):   # older contexts now fail the version check
            cell[0] = version
        self._cell_of = dict(zip(self._params, self._cells))
        self._derived_arrays = {}
        self._xp, self._device = xp, target
        self.__dict__["_last"] = None
        return self

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None):
        return self.to("cuda" if device is None else f"cuda:{int(device)}")

    def _array(self, value, what):
        """An input (x, a state, a gradient) as an array of the module's device: NumPy arrays pass
        as they are on the CPU (one isinstance), CuPy arrays on the GPU; anything on the other
        device is torch's RuntimeError naming both."""
        xp = self._xp
        if xp is np:
            if isinstance(value, np.ndarray):
                return value
            if device_of(value) != "cpu":
                raise same_device_error(self._name, self._device, what, value)
            return np.asarray(value)
        where = device_of(value)
        if where != self._device:
            raise same_device_error(self._name, self._device, what, value)
        return value if isinstance(value, xp.ndarray) else xp.asarray(value)

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0.0

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _check_input_dtype(self, x, error=ValueError):
        if x.dtype != self.dtype:
            raise error(f"{self._name} input dtype ({x.dtype}) does not match weight dtype "
                             f"({self.dtype}). Convert the input with .astype(np.{self.dtype}), or build "
                             f"the module with dtype=np.{x.dtype}")

    def _derived(self, key, names, compute):
        """compute(*parameters `names`), kept until one of them changes (its version moves): b_ih +
        b_hh and W_hh's transposed copy are computed once per optimizer step, not once per call.
        A new array each time, never written in place, so contexts holding the old one stay valid."""
        if self._xp is not np:   # CuPy writes are not counted (see the docstring above): recompute
            return compute(*(self._plain[n] for n in names))
        versions = tuple(self._cell_of[n][0] for n in names)
        hit = self._derived_arrays.get(key)
        if hit is None or hit[0] != versions:
            hit = self._derived_arrays[key] = (versions, compute(*(self._plain[n] for n in names)))
        return hit[1]

    def _summed_bias(self, sfx=""):
        return self._derived(("b", sfx), ("bias_ih" + sfx, "bias_hh" + sfx), lambda a, b: a + b)

    def _transposed_W_hh(self, sfx=""):
        return self._derived(("W_hh_T", sfx), ("weight_hh" + sfx,), lambda w: w.T.copy())

    def _record(self, saved, arrays, return_ctx):
        """After a forward: its context (None under no_grad), also kept as the module's latest.
        arrays: [(label, array the caller passed)] that the saved caches may reference."""
        # (__dict__ directly: this runs every generated token, and __setattr__ checks parameter names)
        if saved is None:
            self.__dict__["_last"] = NO_GRAD
            return None
        ctx = contexts.record(self, saved, arrays)
        ctx.handed_out = bool(return_ctx)
        self.__dict__["_last"] = ctx
        return ctx

    @property
    def _caches(self):
        """The latest forward's layer caches ([layer][direction]), None under no_grad or once freed."""
        last = self._last
        return last.caches if isinstance(last, contexts.Context) else None


def _value_problem(name, value, param):
    """Why `value` cannot be copied into parameter `name`, as (exception type, message), or None."""
    if value.shape != param.shape:
        return RuntimeError, (f"size mismatch for {name}: copying a param with shape {value.shape} "
                              f"from checkpoint, the shape in current model is {param.shape}.")
    if value.dtype.kind not in "biuf":
        return TypeError, f"{name} has dtype {value.dtype}; a real number type convertible to {param.dtype} is needed."
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        bad = int(value.size - np.isfinite(value).sum())
        return RuntimeError, f"{name} has {bad} non-finite value(s) (NaN or Inf) out of {value.size}."
    return None
