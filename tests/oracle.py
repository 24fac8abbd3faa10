"""PyTorch as the oracle: build the torch twin of an lstmkit module and run the same numbers through it.

Shape letters: L sequence length, N batch, I input size, H hidden size.
"""

import numpy as np
import torch

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}

# Tolerances: float64 must agree to rounding; float32 to what float32 arithmetic in a different
# summation order allows.
TOL = {np.float64: dict(rtol=1e-10, atol=1e-10), np.float32: dict(rtol=2e-4, atol=2e-5)}


def torch_twin(ours, torch_cls, **kwargs):
    """A torch module with exactly our weights."""
    twin = torch_cls(**kwargs, dtype=TORCH_DTYPE[ours.dtype.type])
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})
    return twin


def leaf(a):
    return torch.from_numpy(np.array(a)).requires_grad_(True)


def weighted_sum(outputs, weights):
    """A scalar loss whose gradient with respect to each output is the given weight array."""
    return sum((o * torch.from_numpy(np.array(w))).sum() for o, w in zip(outputs, weights))


def numerical_grad(f, a, eps=1e-6):
    """dF/da by central differences (f(a+ε) - f(a-ε)) / 2ε, perturbing a in place one element at a time."""
    grad = np.zeros_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    for k in range(flat.size):
        old = flat[k]
        flat[k] = old + eps
        plus = f()
        flat[k] = old - eps
        minus = f()
        flat[k] = old
        gflat[k] = (plus - minus) / (2 * eps)
    return grad


def assert_close(ours, theirs, dtype, what):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs torch {theirs.shape}"
    np.testing.assert_allclose(ours, theirs, err_msg=what, **TOL[dtype])
