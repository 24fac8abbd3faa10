"""The GPU path, checked as far as a machine without a GPU allows, and on one with a GPU as well.

Without a GPU: the CUDA kernels' source (cuda_kernels.SOURCE) is compiled by g++ (its prelude
turns each kernel into a loop) and the GPU layers (cuda_layers.py) run their whole algorithm on
NumPy arrays through it, against the reference (functional.py, gru.py) and, as whole modules,
against torch; the source also goes through `nvcc --ptx` when nvcc is there. Devices: .to()
round trips, the errors for "cuda" without CuPy or a GPU, bad device strings, mixed devices.
With CuPy and a GPU, the classes at the bottom run the modules on it against torch.

Shape letters: T steps, B batch, I input size, H hidden size, P proj size.
"""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import lstmkit
from lstmkit import contexts, cuda_kernels, cuda_layers, device, functional, gru
from lstmkit import cells as cells_module
from lstmkit import rnn_base
from oracle import TOL

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import gpu_parity  # noqa: E402 - the GPU check's parity code, run here on the CPU

DTYPES = [np.float64, np.float32]


@pytest.fixture(scope="module")
def cpu_kernels(tmp_path_factory):
    """The CUDA source built by g++ into a temporary directory, installed for NumPy arrays."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the kernels' CPU build needs it")
    runner = cuda_kernels.CpuKernels(str(tmp_path_factory.mktemp("cuda_kernels")))
    cuda_kernels.use_cpu_kernels(runner)
    yield runner
    cuda_kernels.use_cpu_kernels(None)


def _rand(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def _close(ours, theirs, dtype, what):
    assert (ours is None) == (theirs is None), what
    if ours is not None:
        np.testing.assert_allclose(ours, theirs, err_msg=what, **TOL[dtype])


# ---------------------------------------------------------------------- the source itself
def test_source_compiles_to_ptx(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    src = tmp_path / "kernels.cu"
    src.write_text(cuda_kernels.SOURCE)
    done = subprocess.run(["nvcc", "--ptx", "-o", str(tmp_path / "kernels.ptx"), str(src)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ptx = (tmp_path / "kernels.ptx").read_text()
    for name in cuda_kernels.SIGNATURES:
        for sfx in ("f32", "f64"):
            assert f".entry {name}_{sfx}(" in ptx, f"{name}_{sfx} missing from the PTX"


def _find_nvrtc():
    """libnvrtc: the CUDA toolkit's, or the nvidia-cuda-nvrtc wheel's that CuPy uses; None if absent."""
    import ctypes.util
    import glob
    found = ctypes.util.find_library("nvrtc")
    if found:
        return found
    for path in sys.path:
        hits = sorted(glob.glob(os.path.join(path, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
        if hits:
            return hits[0]
    return None


def test_source_compiles_with_nvrtc():
    """NVRTC is what cupy.RawModule compiles with (no GPU needed to compile)."""
    import ctypes
    path = _find_nvrtc()
    if path is None:
        pytest.skip("libnvrtc is not installed (CUDA toolkit or the nvidia-cuda-nvrtc wheel)")
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), cuda_kernels.SOURCE.encode(), b"kernels.cu", 0, None, None) == 0
    opts = (ctypes.c_char_p * 1)(b"--gpu-architecture=compute_90")
    rc = lib.nvrtcCompileProgram(prog, 1, opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    for name in cuda_kernels.SIGNATURES:
        assert f".entry {name}_f32(" in ptx.value.decode() and f".entry {name}_f64(" in ptx.value.decode()


def test_launch_refuses_non_contiguous_and_mixed_dtypes(cpu_kernels):
    a = np.zeros((4, 8))
    with pytest.raises(ValueError, match="not C-contiguous"):
        cpu_kernels("rnn_fwd", 16, a[:, ::2], a[:, ::2], 0, a[:, :4].copy())
    with pytest.raises(TypeError, match="dtypes float64 and float32"):
        cpu_kernels("rnn_fwd", 4, a[0, :4].copy(), a[0, :4].astype(np.float32), 0, a[0, :4].copy())


# ---------------------------------------------------------------------- layers vs the reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("proj,bias,given", [(0, True, True), (3, True, False), (0, False, False), (3, False, True)])
@pytest.mark.parametrize("T,B", [(5, 3), (1, 1), (4, 1)], ids=["loop", "one-launch-step", "batch1-loop"])
def test_lstm_layer_matches_reference(cpu_kernels, dtype, proj, bias, given, T, B):
    """(1, 1) without projection is the one-launch step (lstm_b1): I = 37 and H = 6, so its
    32-lane split of the dot products has lanes with one column, two, and none."""
    rng = np.random.default_rng(1)
    I, H = 37, 6
    P = proj or H
    x, h0, c0 = _rand(rng, (T, B, I), dtype), _rand(rng, (B, P), dtype), _rand(rng, (B, H), dtype)
    W_ih, W_hh = _rand(rng, (4 * H, I), dtype, 0.5), _rand(rng, (4 * H, P), dtype, 0.5)
    b = _rand(rng, (4 * H,), dtype) if bias else None
    W_hr = _rand(rng, (P, H), dtype, 0.5) if proj else None
    ours = cuda_layers.lstm_layer_forward(x, h0, c0, W_ih, W_hh, b, W_hr)
    ref = functional.lstm_layer_forward(x, h0, c0, W_ih, W_hh, b, W_hr)
    for k, what in enumerate(("out", "h_T", "c_T")):
        _close(ours[k], ref[k], dtype, what)
    dout = _rand(rng, (T, B, P), dtype)
    dh, dc = (_rand(rng, (B, P), dtype), _rand(rng, (B, H), dtype)) if given else (None, None)
    got = cuda_layers.lstm_layer_backward(dout, dh, dc, ours[3])
    want = functional.lstm_layer_backward(dout, dh, dc, ref[3])
    for g, w, what in zip(got, want, ("dx", "dh0", "dc0", "dW_ih", "dW_hh", "db", "dW_hr")):
        _close(g, w, dtype, what)
    nograd = cuda_layers.lstm_layer_forward(x, h0, c0, W_ih, W_hh, b, W_hr, save=False)
    assert nograd[3] is None
    _close(nograd[0], ref[0], dtype, "out without save")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nonlinearity,bias", [("tanh", True), ("relu", False)])
def test_rnn_layer_matches_reference(cpu_kernels, dtype, nonlinearity, bias):
    rng = np.random.default_rng(2)
    T, B, I, H = 6, 2, 3, 5
    x, h0 = _rand(rng, (T, B, I), dtype), _rand(rng, (B, H), dtype)
    W_ih, W_hh = _rand(rng, (H, I), dtype, 0.5), _rand(rng, (H, H), dtype, 0.5)
    b = _rand(rng, (H,), dtype) if bias else None
    ours = cuda_layers.rnn_layer_forward(x, h0, W_ih, W_hh, b, nonlinearity)
    ref = functional.rnn_layer_forward(x, h0, W_ih, W_hh, b, nonlinearity)
    _close(ours[0], ref[0], dtype, "out")
    _close(ours[1], ref[1], dtype, "h_T")
    dout, dh = _rand(rng, (T, B, H), dtype), _rand(rng, (B, H), dtype)
    got = cuda_layers.rnn_layer_backward(dout, dh, ours[2])
    want = functional.rnn_layer_backward(dout, dh, ref[2])
    for g, w, what in zip(got, want, ("dx", "dh0", "dW_ih", "dW_hh", "db")):
        _close(g, w, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_ih,bias_hh,given", [(True, True, True), (False, True, False), (True, False, False)])
def test_gru_layer_matches_reference(cpu_kernels, dtype, bias_ih, bias_hh, given):
    rng = np.random.default_rng(3)
    T, B, I, H = 5, 3, 4, 6
    x, h0 = _rand(rng, (T, B, I), dtype), _rand(rng, (B, H), dtype)
    W_ih, W_hh = _rand(rng, (3 * H, I), dtype, 0.5), _rand(rng, (3 * H, H), dtype, 0.5)
    b_ih = _rand(rng, (3 * H,), dtype) if bias_ih else None
    b_hh = _rand(rng, (3 * H,), dtype) if bias_hh else None
    ours = cuda_layers.gru_layer_forward(x, h0, W_ih, W_hh, b_ih, b_hh)
    ref = gru.reference_forward(x, h0, W_ih, W_hh, b_ih, b_hh)
    _close(ours[0], ref[0], dtype, "out")
    _close(ours[1], ref[1], dtype, "h_T")
    assert ours[2]["path"] == "cuda"
    dout = _rand(rng, (T, B, H), dtype)
    dh = _rand(rng, (B, H), dtype) if given else None
    got = gru.gru_layer_backward(dout, dh, ours[2])        # dispatched by the cache's path
    want = gru.reference_backward(dout, dh, ref[2])
    for g, w, what in zip(got, want, ("dx", "dh0", "dW_ih", "dW_hh", "db_ih", "db_hh")):
        _close(g, w, dtype, what)


@pytest.mark.parametrize("cell", ["LSTM", "RNN", "GRU"])
def test_layers_run_packed_batches_as_the_reference(cpu_kernels, cell):
    """batch_sizes: the segment runner over the GPU layers, against the reference's packed run
    (functional.py's through the same runner, gru.py's natively), gradients included."""
    rng = np.random.default_rng(4)
    T, B, I, H = 5, 3, 4, 6
    bs = np.array([3, 3, 2, 1, 1])
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[cell] * H
    x, h0, c0 = _rand(rng, (T, B, I), np.float64), _rand(rng, (B, H), np.float64), _rand(rng, (B, H), np.float64)
    W = (_rand(rng, (G, I), np.float64, 0.5), _rand(rng, (G, H), np.float64, 0.5), _rand(rng, (G,), np.float64))
    dout, dh = _rand(rng, (T, B, H), np.float64), _rand(rng, (B, H), np.float64)
    if cell == "LSTM":
        ours = cuda_layers.lstm_layer_forward(x, h0, c0, *W, batch_sizes=bs)
        ref = functional.lstm_layer_forward(x, h0, c0, *W, batch_sizes=bs)
        got = cuda_layers.lstm_layer_backward(dout, dh, None, ours[-1])
        want = functional.lstm_layer_backward(dout, dh, None, ref[-1])
    elif cell == "RNN":
        ours = cuda_layers.rnn_layer_forward(x, h0, *W, batch_sizes=bs)
        ref = functional.rnn_layer_forward(x, h0, *W, batch_sizes=bs)
        got = cuda_layers.rnn_layer_backward(dout, dh, ours[-1])
        want = functional.rnn_layer_backward(dout, dh, ref[-1])
    else:
        ours = cuda_layers.gru_layer_forward(x, h0, *W[:2], W[2], W[2] * 0.5, bs)
        ref = gru.reference_forward(x, h0, *W[:2], W[2], W[2] * 0.5, bs)
        got = gru.gru_layer_backward(dout, dh, ours[-1])      # routed back to cuda_layers by "path"
        want = gru.reference_backward(dout, dh, ref[-1])
    for k, (o, r) in enumerate(zip(ours[:-1], ref[:-1])):
        _close(o, r, np.float64, f"forward output {k}")
    for k, (g, w) in enumerate(zip(got, want)):
        _close(g, w, np.float64, f"gradient {k}")


def test_numpy_arrays_need_the_cpu_build(cpu_kernels):
    cuda_kernels.use_cpu_kernels(None)
    try:
        with pytest.raises(RuntimeError, match="runs on CuPy arrays"):
            cuda_kernels.kernels_for(np)
    finally:
        cuda_kernels.use_cpu_kernels(cpu_kernels)


# ---------------------------------------------------------------------- whole modules vs torch
@pytest.fixture
def gpu_layers_on_numpy(cpu_kernels, monkeypatch):
    """The modules' stack and cells run cuda_layers on NumPy arrays (the GPU path, minus CuPy)."""
    monkeypatch.setattr(rnn_base, "_backend", lambda xp=np: cuda_layers)
    monkeypatch.setattr(cells_module, "_backend", lambda xp=np: cuda_layers)


MODULE_GRID = [  # (class, kwargs): a small slice of the CPU tests' option grid
    (lstmkit.LSTM, dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True)),
    (lstmkit.LSTM, dict(num_layers=1, bias=False)),
    (lstmkit.GRU, dict(num_layers=2, bidirectional=True)),
    (lstmkit.RNN, dict(num_layers=2, nonlinearity="relu", batch_first=True)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,kwargs", MODULE_GRID, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_modules_on_gpu_path_match_torch(gpu_layers_on_numpy, dtype, cls, kwargs):
    gpu_parity.check_module(cls, kwargs, dtype, "cpu", "cpu")


@pytest.mark.parametrize("cls,state", [(lstmkit.LSTMCell, 2), (lstmkit.GRUCell, 1), (lstmkit.RNNCell, 1)])
def test_cells_on_gpu_path_match_torch(gpu_layers_on_numpy, cls, state):
    gpu_parity.check_cell(cls, np.float64, "cpu", "cpu")


def test_parity_script_runs_on_the_gpu_path(gpu_layers_on_numpy, tmp_path):
    """benchmarks/gpu_parity.py's whole quick grid, its cases on the emulated GPU path."""
    out = tmp_path / "parity.jsonl"
    assert gpu_parity.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[-1] == {"summary": True, "passed": len(rows) - 1, "failed": 0}
    assert {r["case"] for r in rows[:-1]} >= {"LSTMCell", "GRUCell", "train 5 SGD steps", "LSTM unbatched"}


# ---------------------------------------------------------------------- devices
def test_to_cpu_is_a_no_op_returning_self():
    lstm = lstmkit.LSTM(3, 4, seed=0)
    before = lstm.state_dict()
    assert lstm.to("cpu") is lstm and lstm.cpu() is lstm and lstm.device == "cpu"
    assert lstm.to(torch.device("cpu")) is lstm
    for k, v in lstm.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
        assert type(v) is np.ndarray


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:0", "CUDA", ""])
def test_bad_device_string(bad):
    with pytest.raises(RuntimeError, match="Expected a device string of the form 'cpu', 'cuda' or 'cuda:N'"):
        lstmkit.LSTM(3, 4).to(bad)


@pytest.fixture
def fresh_cupy(monkeypatch):
    """device.py as if CuPy had never been imported; sys.modules["cupy"] set by the test."""
    monkeypatch.setattr(device, "_cupy", None)
    return monkeypatch


def test_cuda_without_cupy_is_one_clear_error(fresh_cupy):
    fresh_cupy.setitem(sys.modules, "cupy", None)      # makes `import cupy` raise ImportError
    lstm = lstmkit.LSTM(3, 4, seed=0)
    with pytest.raises(RuntimeError, match=r'lstmkit needs CuPy for device "cuda": pip install "lstmkit\[cuda\]"'):
        lstm.to("cuda")
    assert lstm.device == "cpu"
    out, _ = lstm(np.ones((2, 3), np.float32))          # nothing changed: the module still runs
    assert out.shape == (2, 4)


@pytest.mark.parametrize("count", [0, "raise"])
def test_cuda_without_a_device_is_one_clear_error(fresh_cupy, count):
    def get_count():
        if count == "raise":   # what CuPy 14 raises on a machine without a driver
            raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
        return count
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count)))
    fresh_cupy.setitem(sys.modules, "cupy", fake)
    with pytest.raises(RuntimeError, match='device "cuda": CuPy is installed but no CUDA device is visible'):
        lstmkit.GRU(3, 4).to("cuda:0")


class _FakeGpuArray:
    """Anything on a GPU as far as lstmkit can tell: it has __cuda_array_interface__."""
    __cuda_array_interface__ = {}
    device = "cuda:1"
    ndim = 2


@pytest.mark.parametrize("make", [lambda: lstmkit.LSTM(3, 4), lambda: lstmkit.RNN(3, 4), lambda: lstmkit.LSTMCell(3, 4)])
def test_gpu_input_to_cpu_module_names_both_devices(make):
    with pytest.raises(RuntimeError, match=r"found at least two devices, cpu \(the module's parameters\) "
                                           r"and cuda:1 \(the input"):
        make()(_FakeGpuArray())


def test_gpu_state_to_cpu_module_names_both_devices():
    lstm = lstmkit.LSTM(3, 4)
    with pytest.raises(RuntimeError, match=r"cpu \(the module's parameters\) and cuda:1 \(hidden\[1\]"):
        lstm(np.ones((2, 3), np.float32), (np.zeros((1, 4), np.float32), _FakeGpuArray()))


def test_device_of_and_to_numpy():
    assert device.device_of(np.zeros(2)) == "cpu" and device.device_of([1.0]) == "cpu"
    assert device.device_of(torch.zeros(2)) == "cpu"
    assert device.device_of(_FakeGpuArray()) == "cuda:1"
    t = torch.arange(3.0)
    np.testing.assert_array_equal(device.to_numpy(t), [0.0, 1.0, 2.0])
    assert device.array_module(np.zeros(1)) is np and device.array_module([1]) is np
    assert device.parse_device("cuda") == ("cuda", 0) and device.parse_device("cuda:3") == ("cuda", 3)


def test_changed_compares_bits_as_the_gpu_guard_does():
    """contexts.changed on a copy (what a GPU forward keeps of the caller's arrays): exact bits,
    so a NaN that stayed NaN is unchanged and -0.0 for 0.0 is a change."""
    a = np.array([1.0, np.nan, 0.0], np.float32)
    snap = a.copy()
    assert not contexts.changed(a, snap)
    a[2] = -0.0
    assert contexts.changed(a, snap)
    assert contexts.changed(a[:2], snap)


def test_reference_runs_on_any_array_module():
    """functional.py takes its array module from the input: a NumPy subclass stays a plain run."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4))
    out, h, c, cache = functional.lstm_layer_forward(x, np.zeros((2, 5)), np.zeros((2, 5)),
                                                     rng.standard_normal((20, 4)), rng.standard_normal((20, 5)))
    assert out.shape == (3, 2, 5) and cache["gates"].shape == (3, 2, 20)
    assert device.array_module(x) is np


# ---------------------------------------------------------------------- on a GPU (skipped here)
def _gpu_reason():
    try:
        device.require_cupy()
    except RuntimeError as e:
        return str(e)
    return None


_NO_GPU = _gpu_reason()
needs_gpu = pytest.mark.skipif(_NO_GPU is not None, reason=f"needs CuPy and a GPU: {_NO_GPU}")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,kwargs", MODULE_GRID, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_modules_on_cuda_match_torch(dtype, cls, kwargs):
    gpu_parity.check_module(cls, kwargs, dtype, "cuda", "cpu")


@needs_gpu
def test_to_cuda_and_back():
    import cupy
    lstm = lstmkit.LSTM(3, 4, seed=0)
    before = lstm.state_dict()
    assert lstm.to("cuda") is lstm and lstm.device == "cuda:0"
    assert isinstance(lstm.weight_ih_l0, cupy.ndarray) and isinstance(lstm.grads["weight_ih_l0"], cupy.ndarray)
    assert all(type(v) is np.ndarray for v in lstm.state_dict().values())
    with pytest.raises(RuntimeError, match=r"cuda:0 \(the module's parameters\) and cpu \(the input"):
        lstm(np.ones((2, 3), np.float32))
    out, _ = lstm(cupy.ones((2, 3), cupy.float32))
    assert isinstance(out, cupy.ndarray)
    lstm.to("cpu")
    for k, v in lstm.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
