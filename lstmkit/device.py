"""Devices: where arrays live ("cpu": NumPy, "cuda": CuPy), and the one place that imports CuPy.

The layers are written once against an array module `xp` (numpy or cupy) taken from their input,
`xp = array_module(x)`, so the readable reference (functional.py, gru.py) runs on either device
unchanged. Modules are moved with `module.to("cuda")` / `.to("cpu")` as in torch.

Without CuPy, or without a visible GPU, nothing here is imported or touched on the NumPy path, and
asking for "cuda" is one RuntimeError saying which of the two is missing.
"""

import numpy as np

_cupy = None        # the cupy module once imported and checked (require_cupy)


def array_module(a):
    """numpy or cupy: the module whose functions work on `a` (numpy for anything not CuPy's)."""
    if isinstance(a, np.ndarray):       # the CPU path pays one isinstance
        return np
    if type(a).__module__.startswith("cupy"):
        return require_cupy()
    return np


def require_cupy():
    """The cupy module, checked once: RuntimeError when CuPy is not installed or sees no GPU."""
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError('lstmkit needs CuPy for device "cuda": pip install "lstmkit[cuda]" (or the '
                           f'cupy-cuda* wheel matching your CUDA); importing it failed: {e}') from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CuPy's CUDARuntimeError (no driver, driver too old, ...)
        raise RuntimeError(f'device "cuda": CuPy is installed but no CUDA device is visible ({e})') from None
    if count == 0:
        raise RuntimeError('device "cuda": CuPy is installed but no CUDA device is visible')
    _cupy = cupy
    return cupy


def parse_device(device):
    """"cpu", "cuda", "cuda:N" (or a torch.device, or anything whose str() is one) -> ("cpu", None)
    or ("cuda", N). A bad string is the RuntimeError torch raises for it."""
    text = str(device).strip()
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return "cpu", None
    if kind == "cuda":
        if not index:
            return "cuda", 0
        if index.isdigit():
            return "cuda", int(index)
    raise RuntimeError(f"Expected a device string of the form 'cpu', 'cuda' or 'cuda:N' (N a device "
                       f"index), got {text!r}")


def device_of(a):
    """"cpu" for NumPy arrays (and anything else on the host), "cuda:N" for CuPy arrays and other
    objects on a GPU (anything with __cuda_array_interface__, e.g. a torch CUDA tensor)."""
    if isinstance(a, np.ndarray):
        return "cpu"
    if type(a).__module__.startswith("cupy"):
        return f"cuda:{a.device.id}"
    try:
        has = hasattr(a, "__cuda_array_interface__")
    except Exception:  # noqa: BLE001 - torch raises RuntimeError for a tensor that requires grad
        has = True
    if has:
        dev = getattr(a, "device", None)
        return str(dev) if dev is not None and str(dev).startswith("cuda") else "cuda:0"
    return "cpu"


def _kind(a):
    return "a NumPy array" if isinstance(a, np.ndarray) else type(a).__name__


def same_device_error(module_name, module_device, what, a):
    """torch's error for arrays on two devices, naming both and how to move either."""
    where = device_of(a)
    fix = (f"cupy.asarray({what})" if module_device.startswith("cuda") else f"{what}.get()")
    return RuntimeError(f"{module_name}: Expected all arrays to be on the same device, but found at least "
                        f"two devices, {module_device} (the module's parameters) and {where} ({what}, "
                        f"{_kind(a)}). Move {what} with {fix}, or the module with .to({where.split(':')[0]!r})")


def to_numpy(a):
    """A host NumPy array of `a` (a copy from the GPU, np.asarray otherwise): what state_dict hands
    out and load_state_dict checks, so checkpoints and torch interchange stay on the host."""
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.startswith("cupy"):
        return a.get()
    if device_of(a).startswith("cuda"):      # a torch CUDA tensor, or another library's GPU array
        detach = getattr(a, "detach", None)
        if detach is not None:
            return detach().cpu().numpy()
        return require_cupy().asarray(a).get()
    return np.asarray(a)
