"""lstmkit: the LSTM written from its equations, with torch.nn.LSTM's contract, in NumPy.

    from lstmkit import LSTM, RNN, LSTMCell, RNNCell
"""

from .modules import LSTM, RNN, LSTMCell, RNNCell

__all__ = ["LSTM", "RNN", "LSTMCell", "RNNCell"]
__version__ = "0.1.0"
