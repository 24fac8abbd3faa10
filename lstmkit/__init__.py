"""lstmkit: the LSTM written from its equations, with torch.nn.LSTM's contract, in NumPy.

    from lstmkit import LSTM, RNN, LSTMCell, RNNCell

The layers are imported on first use, so that `lstmkit --help` (and a Ctrl-C while it starts) does
not wait for NumPy and Numba to load.
"""

__version__ = "0.1.0"
__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "no_grad", "utils"]


def __getattr__(name):
    if name in __all__:
        from . import modules
        return getattr(modules, name)
    raise AttributeError(f"module 'lstmkit' has no attribute {name!r}")
