"""Utilities with torch.nn.utils' names: `lstmkit.utils.rnn` holds the variable-length batch tools."""

from . import rnn

__all__ = ["rnn"]
