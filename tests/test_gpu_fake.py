"""The modules' device plumbing on a stand-in for CuPy, so that it is checked without a GPU.

FakeCupy is CuPy as strict as CuPy is where it matters here: its arrays are not NumPy arrays
(type module "cupy", so device.py takes them for GPU arrays); turning one into a NumPy array
implicitly is the TypeError CuPy raises (only .get() copies to the host); mixing one with a
NumPy array in arithmetic, a setitem or a function call is a TypeError, as in CuPy; NumPy's ufuncs
refuse them. Its functions are NumPy's on the wrapped data, and its "kernels" are the g++ build of
the CUDA source (cuda_kernels.CpuKernels). So every host/device slip in module.py, rnn_base.py,
cells.py, contexts.py and cuda_layers.py (a np.zeros where xp.zeros was meant, a NumPy mask
multiplied into a device array, a state_dict that hands out device arrays) fails here as it would
on the GPU; what it cannot catch is a NumPy function that CuPy lacks.
"""

import contextlib
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch

import lstmkit
from lstmkit import contexts, cuda_kernels, device

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import gpu_parity  # noqa: E402

_NO_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                "a NumPy array explicitly.")


def _host_operand(v):
    return isinstance(v, np.ndarray) and v.ndim > 0


class FakeArray:
    """A device array: NumPy data behind an interface that refuses implicit host use."""

    __array_ufunc__ = None          # np.tanh(fake) etc. raise TypeError; xp.tanh is the way

    def __init__(self, a):
        self._a = a

    def __array__(self, *args, **kwargs):
        raise TypeError(_NO_IMPLICIT)

    # ---- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    flags = property(lambda self: self._a.flags)
    ctypes = property(lambda self: self._a.ctypes)    # for the g++ kernels only
    T = property(lambda self: FakeArray(self._a.T))
    device = property(lambda self: types.SimpleNamespace(id=0))

    def get(self):
        return self._a.copy()

    def __repr__(self):
        return f"FakeArray({self._a!r})"

    # ---- indexing and methods
    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value):
        if _host_operand(value):
            raise TypeError("FakeCupy: setitem with a NumPy array (a hidden host-to-device copy)")
        self._a[_unwrap(key)] = _unwrap(value)

    def __getattr__(self, name):   # reshape, swapaxes, copy, astype, sum, any, view, fill, ...
        if name.startswith("__") or name == "_a":
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)
        return lambda *a, **k: _wrap(attr(*_unwrap(a), **{n: _unwrap(v) for n, v in k.items()}))

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __len__(self):
        return len(self._a)


def _binary(op, reflected=False, inplace=False):
    def method(self, other):
        if _host_operand(other):
            raise TypeError(f"FakeCupy: {op} of a device array and a NumPy array")
        other = _unwrap(other)
        if inplace:
            getattr(self._a, op)(other)
            return self
        return _wrap(getattr(self._a, op)(other))
    return method


for _op in ("add", "sub", "mul", "truediv", "pow", "matmul", "rmatmul", "gt", "lt", "ge", "le", "eq", "ne",
            "radd", "rsub", "rmul", "rtruediv", "iadd", "isub", "imul", "itruediv"):
    setattr(FakeArray, f"__{_op}__", _binary(f"__{_op}__", inplace=_op.startswith("i")))
FakeArray.__neg__ = lambda self: FakeArray(-self._a)
FakeArray.__hash__ = None
FakeArray.__module__ = "cupy._core.core"    # what device.py looks at to tell a CuPy array


def _wrap(v):
    if isinstance(v, np.ndarray):
        return FakeArray(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_wrap(x) for x in v)
    return v


def _unwrap(v):
    if isinstance(v, FakeArray):
        return v._a
    if isinstance(v, (list, tuple)):
        return type(v)(_unwrap(x) for x in v)
    return v


class FakeCupy(types.ModuleType):
    """cupy: ndarray, the dtypes, cuda.Device / cuda.runtime, and NumPy's functions made device ones."""

    ndarray = FakeArray
    _HOST_IN = {"asarray", "array"}      # the only functions that take host arrays (and copy them in)

    def __init__(self):
        super().__init__("cupy")
        self.cuda = types.SimpleNamespace(Device=lambda index=0: contextlib.nullcontext(),
                                          runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))

    def __getattr__(self, name):
        f = getattr(np, name)
        if not callable(f) or isinstance(f, type):
            return f                                   # dtypes, constants

        def device_function(*args, **kwargs):
            if name not in self._HOST_IN and any(_host_operand(a) for a in args):
                raise TypeError(f"FakeCupy: cupy.{name} got a NumPy array")
            result = f(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
            if name in self._HOST_IN and isinstance(result, np.ndarray) and not result.flags.owndata \
                    and any(_host_operand(a) for a in args):
                result = result.copy()                 # host -> device is a copy, as in CuPy
            return _wrap(result)
        return device_function


@pytest.fixture(scope="module")
def cpu_runner(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the kernels' CPU build needs it")
    return cuda_kernels.CpuKernels(str(tmp_path_factory.mktemp("fake_cupy_kernels")))


@pytest.fixture
def fake_cupy(cpu_runner, monkeypatch):
    fake = FakeCupy()
    monkeypatch.setattr(device, "_cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(cuda_kernels._runners, fake, cpu_runner)
    return fake


def test_fake_is_strict(fake_cupy):
    a = fake_cupy.zeros(3)
    for misuse in (lambda: np.asarray(a), lambda: a + np.ones(3), lambda: np.tanh(a),
                   lambda: a.__setitem__(slice(None), np.ones(3)), lambda: fake_cupy.add(a, np.ones(3))):
        with pytest.raises(TypeError):
            misuse()
    assert device.array_module(a) is fake_cupy and device.device_of(a) == "cuda:0"


MODULE_GRID = [
    (lstmkit.LSTM, dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True)),
    (lstmkit.LSTM, dict()),
    (lstmkit.GRU, dict(num_layers=2, bidirectional=True, bias=False)),
    (lstmkit.RNN, dict(nonlinearity="relu")),
]


@pytest.mark.parametrize("reference", [False, True], ids=["fused", "reference"])
@pytest.mark.parametrize("cls,kwargs", MODULE_GRID, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_modules_on_fake_gpu_match_torch(fake_cupy, monkeypatch, cls, kwargs, reference):
    if reference:
        monkeypatch.setenv("LSTMKIT_REFERENCE", "1")
    gpu_parity.check_module(cls, kwargs, np.float64, "cuda", "cpu")
    gpu_parity.check_module(cls, kwargs, np.float64, "cuda", "cpu", unbatched=True)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_on_fake_gpu_match_torch(fake_cupy, cell):
    gpu_parity.check_cell(getattr(lstmkit, cell), np.float64, "cuda", "cpu")


def test_training_steps_on_fake_gpu_match_the_cpu(fake_cupy):
    assert len(gpu_parity.train_check("cuda")["losses"]) == 5


def test_dropout_masks_are_the_same_on_both_devices(fake_cupy):
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    outs = []
    for where in ("cpu", "cuda"):
        lstm = lstmkit.LSTM(3, 5, num_layers=3, dropout=0.5, dtype=np.float64, seed=7).to(where)
        out, _ = lstm(fake_cupy.asarray(x) if where == "cuda" else x)
        outs.append(device.to_numpy(out))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-12, atol=1e-12)


def test_to_moves_everything_and_back(fake_cupy):
    lstm = lstmkit.LSTM(3, 4, num_layers=2, seed=0)
    before = lstm.state_dict()
    lstm.grads["weight_ih_l0"][...] = 1.5
    assert lstm.to("cuda") is lstm and lstm.device == "cuda:0"
    assert all(isinstance(p, FakeArray) for p in lstm.parameters())
    assert all(isinstance(g, FakeArray) for g in lstm.grads.values())
    sd = lstm.state_dict()
    assert all(type(v) is np.ndarray for v in sd.values())     # host arrays, for torch and checkpoints
    for k, v in sd.items():
        np.testing.assert_array_equal(v, before[k])
    torch.nn.LSTM(3, 4, num_layers=2).load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    lstm.load_state_dict({k: torch.from_numpy(v * 2) for k, v in before.items()})     # torch tensors in
    lstm.weight_hh_l1 = fake_cupy.zeros((16, 4), np.float32)                        # a device array in
    lstm.to("cpu")
    assert lstm.device == "cpu" and isinstance(lstm.weight_ih_l0, contexts.Parameter)
    np.testing.assert_array_equal(lstm.weight_ih_l0, before["weight_ih_l0"] * 2)
    np.testing.assert_array_equal(lstm.weight_hh_l1, 0)
    np.testing.assert_array_equal(lstm.grads["weight_ih_l0"], 1.5)


def test_mixed_devices_are_torchs_error(fake_cupy):
    lstm = lstmkit.LSTM(3, 4).to("cuda")
    with pytest.raises(RuntimeError, match=r"cuda:0 \(the module's parameters\) and cpu \(the input, a NumPy array\)"):
        lstm(np.ones((2, 3), np.float32))
    with pytest.raises(RuntimeError, match=r"and cpu \(hidden\[0\]"):
        lstm(fake_cupy.ones((2, 3), np.float32), (np.zeros((1, 4), np.float32), fake_cupy.zeros((1, 4), np.float32)))
    out, _ = lstm(fake_cupy.ones((2, 3), np.float32))
    with pytest.raises(RuntimeError, match=r"and cpu \(grad_output"):
        lstm.backward(np.ones((2, 4), np.float32))
    cell = lstmkit.GRUCell(3, 4).to("cuda")
    with pytest.raises(RuntimeError, match=r"and cpu \(hx"):
        cell(fake_cupy.ones(3, np.float32), np.zeros(4, np.float32))
    seq = lstmkit.utils.rnn.pack_sequence([np.ones((2, 3), np.float32)])
    with pytest.raises(RuntimeError, match=r"and cpu \(the input's data, a NumPy array\)"):
        lstm(seq)


def test_guards_hold_on_the_gpu(fake_cupy):
    """The caller's arrays are compared with their device copies; the module's own writes and
    bump_version move versions; a move invalidates older contexts."""
    lstm = lstmkit.LSTM(3, 4, dtype=np.float64).to("cuda")
    x = fake_cupy.ones((2, 3))
    out, _, ctx = lstm(x, return_ctx=True)
    x[0, 0] = 2.0
    with pytest.raises(RuntimeError, match="the input was modified in place"):
        lstm.backward(fake_cupy.ones((2, 4)), ctx=ctx)
    x[0, 0] = 1.0
    lstm.backward(fake_cupy.ones((2, 4)), ctx=ctx, retain=True)
    lstm.bump_version()
    with pytest.raises(RuntimeError, match="weight_ih_l0 was modified in place"):
        lstm.backward(fake_cupy.ones((2, 4)), ctx=ctx)
    out, _, ctx = lstm(x, return_ctx=True)
    lstm.to("cpu")
    with pytest.raises(RuntimeError, match="modified in place"):
        lstm.backward(np.ones((2, 4)), ctx=ctx)


def test_generation_and_batch1_cells_take_the_one_launch_step(fake_cupy, monkeypatch):
    """Tokens one at a time (batch 1, under no_grad) and an LSTMCell at batch 1 with its backward
    run cuda_layers' one-launch step, and agree with the CPU to float64 rounding."""
    from lstmkit import cuda_layers
    calls = []
    step = cuda_layers._lstm_step_b1
    monkeypatch.setattr(cuda_layers, "_lstm_step_b1", lambda *a: calls.append(1) or step(*a))
    x = np.random.default_rng(0).standard_normal((6, 1, 5))
    cpu = lstmkit.LSTM(5, 5, num_layers=2, dtype=np.float64, seed=3)
    gpu = lstmkit.LSTM(5, 5, num_layers=2, dtype=np.float64, seed=3).to("cuda")
    state_c = state_g = None
    with lstmkit.no_grad():
        for t in range(6):
            out_c, state_c = cpu(x[t:t + 1], state_c)
            out_g, state_g = gpu(fake_cupy.asarray(x[t:t + 1]), state_g)
            np.testing.assert_allclose(out_g.get(), out_c, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(state_g[1].get(), state_c[1], rtol=1e-12, atol=1e-12)
    assert len(calls) == 12                     # 6 tokens x 2 layers
    gpu_parity.check_cell(lstmkit.LSTMCell, np.float64, "cuda", "cpu", N=1)
    assert len(calls) == 13


@pytest.mark.parametrize("name,kwargs", [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)),
                                         ("GRU", dict(bidirectional=True)), ("RNN", dict(num_layers=2))])
def test_packed_batches_on_fake_gpu_match_the_cpu(fake_cupy, name, kwargs):
    """A PackedSequence whose data is on the device (its layout on the host, as torch keeps
    batch_sizes), unsorted lengths, h_0 given: outputs and every gradient as on the CPU."""
    from lstmkit.utils.rnn import PackedSequence, pack_padded_sequence
    rng = np.random.default_rng(5)
    lengths = [3, 5, 2, 5]
    x = rng.standard_normal((5, 4, 3))
    seq = pack_padded_sequence(x, lengths, enforce_sorted=False)
    D = 2 if kwargs.get("bidirectional") else 1
    S, P = kwargs.get("num_layers", 1) * D, kwargs.get("proj_size", 0) or 4
    h0, c0 = rng.standard_normal((S, 4, P)), rng.standard_normal((S, 4, 4))
    g_out = rng.standard_normal((seq.data.shape[0], D * P))
    results = []
    for where in ("cpu", "cuda"):
        module = getattr(lstmkit, name)(3, 4, dtype=np.float64, seed=2, **kwargs).to(where)
        on = fake_cupy.asarray if where == "cuda" else (lambda a: a)
        data = PackedSequence(on(seq.data), seq.batch_sizes, seq.sorted_indices, seq.unsorted_indices)
        hx = (on(h0), on(c0)) if name == "LSTM" else on(h0)
        out, state = module(data, hx)
        dx, dstate = module.backward(on(g_out))
        flat = [out.data, *(state if name == "LSTM" else (state,)), dx.data,
                *(dstate if name == "LSTM" else (dstate,)), *module.grads.values()]
        results.append([device.to_numpy(a) for a in flat])
    for k, (c, g) in enumerate(zip(*results)):
        np.testing.assert_allclose(g, c, rtol=1e-10, atol=1e-10, err_msg=f"array {k}")


@pytest.mark.parametrize("name,kwargs", gpu_parity.PACKED)
def test_packed_on_fake_gpu_match_torch(fake_cupy, name, kwargs):
    gpu_parity.check_packed(getattr(lstmkit, name), kwargs, np.float64, "cuda", "cpu")
