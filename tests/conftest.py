"""Shared fixtures. `backend` runs a test once with the readable reference and once with the fused
kernels (when Numba is available), through the public API, the way a user would get each."""

import pytest

from lstmkit import module as modules   # the backend rule lives in module.py


def _backends():
    names = ["reference"]
    if modules._kernels is not None and getattr(modules._kernels, "AVAILABLE", False):
        names.append("fast")
    return names


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv("LSTMKIT_REFERENCE", "1")
    else:
        monkeypatch.delenv("LSTMKIT_REFERENCE", raising=False)
    assert modules._backend().__name__.endswith("functional" if request.param == "reference" else "kernels")
    return request.param
