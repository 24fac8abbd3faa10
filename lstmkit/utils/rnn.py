"""Variable-length batches as torch.nn.utils.rnn builds them, on NumPy arrays.

Same functions, arguments, results (down to sorted_indices, unsorted_indices and int64
batch_sizes) and exception types as torch.nn.utils.rnn; tests/test_packed.py runs both.

Shape letters
    T   time steps of the longest sequence (the padded length)
    B   batch: number of sequences
    N   real tokens, Σ_b lengths[b] = Σ_t batch_sizes[t]
    *   any trailing dimensions (features)

The packed layout. Sequences are sorted by length, longest first; then the data holds step 0 of
every sequence, then step 1 of every sequence still running, and so on:

    lengths [3, 2, 1]:   a0 a1 a2          data        = a0 b0 c0 a1 b1 a2    (N, *)
                         b0 b1             batch_sizes = [3, 2, 1]            (T,)
                         c0

so step t is the contiguous block of batch_sizes[t] rows after Σ_{s<t} batch_sizes[s], and its
active sequences are always the first batch_sizes[t] of the sorted batch. A recurrent layer reads
the blocks in order and never sees padding. sorted_indices[k] is the original position of the
k-th longest sequence (None when the caller promised sorted input); unsorted_indices inverts it.

Deliberate differences, where torch 2.13 goes on silently: a length longer than T (torch reads
past the input's end) and fewer lengths than sequences with enforce_sorted=False (torch drops
the rest) are RuntimeErrors, with torch's type for its own length checks; non-integer lengths
(torch truncates 2.5 to 2) are the TypeError torch raises for other non-integers. With
enforce_sorted=False equal lengths keep their order (a stable sort): torch's sort is stable up to
16 sequences, beyond that it orders ties by its internals, so sorted_indices may differ there
while every unpacked result is the same.
"""

from collections.abc import Iterable
from typing import NamedTuple, Optional

import numpy as np

__all__ = ["PackedSequence", "invert_permutation", "pack_padded_sequence", "pad_packed_sequence",
           "pad_sequence", "unpad_sequence", "pack_sequence", "unpack_sequence"]


class _PackedSequenceFields(NamedTuple):
    data: np.ndarray                          # (N, *)
    batch_sizes: np.ndarray                   # (T,) int64
    sorted_indices: Optional[np.ndarray]      # (B,) int64 or None
    unsorted_indices: Optional[np.ndarray]    # (B,) int64 or None


class PackedSequence(_PackedSequenceFields):
    """torch.nn.utils.rnn.PackedSequence: a namedtuple (data, batch_sizes, sorted_indices,
    unsorted_indices). Build it with pack_padded_sequence or pack_sequence; as in torch,
    unsorted_indices is derived from sorted_indices when not given, and
    PackedSequence((data, batch_sizes)) is accepted."""

    __slots__ = ()

    def __new__(cls, data, batch_sizes=None, sorted_indices=None, unsorted_indices=None):
        if unsorted_indices is None:
            unsorted_indices = invert_permutation(sorted_indices)
        if batch_sizes is None:
            if not (isinstance(data, (list, tuple)) and len(data) == 2):
                raise AssertionError("Expected data to be a list or tuple of length 2")
            data, batch_sizes = data
        return super().__new__(cls, data, batch_sizes, sorted_indices, unsorted_indices)


def invert_permutation(permutation):
    """The inverse of a permutation array (None stays None): inverse[permutation[k]] = k."""
    if permutation is None:
        return None
    inverse = np.empty_like(permutation)
    inverse[permutation] = np.arange(permutation.shape[0], dtype=permutation.dtype)
    return inverse


def _as_lengths(lengths):
    """lengths as a 1-D int64 array, or torch's exception type for what is wrong with it."""
    arr = np.asarray(lengths)
    if arr.size == 0 and arr.dtype.kind == "f":
        arr = arr.astype(np.int64)       # [] comes out of NumPy as float64; it holds no fraction
    if arr.dtype.kind not in "iu":
        # torch converts with int64 semantics and truncates floats; silently dropping a fraction
        # of a length hides a bug, so anything but integers is refused.
        raise TypeError(f"lengths must be integers, got an array of dtype {arr.dtype}")
    if arr.ndim != 1:
        raise RuntimeError(f"'lengths' argument should be a 1D int64 array, but got {arr.ndim}D "
                           f"array of shape {arr.shape}")
    return arr.astype(np.int64)


def _check_lengths(lengths, T, B, batch_dim):
    """torch's checks, in torch's order, plus the one torch 2.13 lacks (a length beyond T)."""
    if lengths.shape[0] != B:
        raise RuntimeError(f"Expected `len(lengths)` to be equal to batch_size, but got "
                           f"{lengths.shape[0]} (batch_size={B})")
    # In sorted order the last length is the smallest, so checking it covers all of them.
    if lengths[-1] <= 0:
        raise RuntimeError("Length of all samples has to be greater than 0, but found an element "
                           f"in 'lengths' that is <= 0 (lengths: {lengths.tolist()})")
    if np.any(lengths[1:] > lengths[:-1]):
        raise RuntimeError("`lengths` array must be sorted in decreasing order when "
                           "`enforce_sorted` is True. You can pass `enforce_sorted=False` to "
                           "pack_padded_sequence and/or pack_sequence to sidestep this requirement "
                           "if you do not need ONNX exportability. "
                           f"(lengths: {lengths.tolist()})")
    if lengths[0] > T:
        raise RuntimeError(f"Expected every length to be at most the input's length {T} "
                           f"(dimension {batch_dim ^ 1} of input), but got a length of {lengths[0]}")


def _active(lengths, T):
    """(T, B) bool: step t of sequence b is real. Row-major order over it is the packed order."""
    return np.arange(T)[:, None] < lengths[None, :]


def pack_padded_sequence(input, lengths, batch_first=False, enforce_sorted=True):
    """Pack a padded batch (T, B, *) (or (B, T, *) with batch_first) of sequences of the given
    lengths. With enforce_sorted=False the batch is sorted by length first (stable: equal
    lengths keep their order) and sorted_indices records how."""
    input = np.asarray(input)
    batch_dim = 0 if batch_first else 1
    if input.ndim < 2:
        raise IndexError(f"Dimension out of range: pack_padded_sequence needs input of at least "
                         f"2 dimensions (T, B, *), got shape {input.shape}")
    lengths = _as_lengths(lengths)
    sorted_indices = None
    # With too few lengths torch 2.13 sorts a subset and drops the rest of the batch silently;
    # here the batch is left whole so that the length check below reports the mismatch.
    if not enforce_sorted and lengths.shape[0] == input.shape[batch_dim]:
        sorted_indices = np.argsort(-lengths, kind="stable")
        lengths = lengths[sorted_indices]
        input = np.take(input, sorted_indices, axis=batch_dim)
    if batch_first:
        input = input.swapaxes(0, 1)
    T, B = input.shape[:2]
    if input.size == 0:
        raise RuntimeError("Cannot pack empty tensors.")
    _check_lengths(lengths, T, B, batch_dim)
    T = int(lengths[0])
    batch_sizes = _active(lengths, T).sum(axis=1).astype(np.int64)        # (T,)
    data = input[:T][_active(lengths, T)]                                  # (N, *), a copy
    return PackedSequence(data, batch_sizes, sorted_indices, None)


def _lengths_of(batch_sizes):
    """The sorted lengths (B,) that produced batch_sizes (T,): sequence b runs while b < bs[t]."""
    return (batch_sizes[None, :] > np.arange(batch_sizes[0])[:, None]).sum(axis=1).astype(np.int64)


def pad_packed_sequence(sequence, batch_first=False, padding_value=0.0, total_length=None):
    """Undo pack_padded_sequence: (padded (T, B, *) or (B, T, *), lengths (B,) int64), the batch
    back in its original order. total_length pads T further (never shorter than the longest)."""
    data, batch_sizes = sequence.data, np.asarray(sequence.batch_sizes)
    T = batch_sizes.shape[0]
    if total_length is not None:
        if total_length < T:
            raise ValueError("Expected total_length to be at least the length of the longest "
                             f"sequence in input, but got total_length={total_length} and max "
                             f"sequence length being {T}")
        if not isinstance(total_length, (int, np.integer)) or isinstance(total_length, bool):
            raise TypeError(f"total_length must be int, not {type(total_length).__name__}")
    lengths = _lengths_of(batch_sizes)
    padded = np.full((T if total_length is None else total_length, lengths.shape[0]) +
                     data.shape[1:], padding_value, dtype=data.dtype)
    padded[:T][_active(lengths, T)] = data
    if batch_first:
        padded = np.ascontiguousarray(padded.swapaxes(0, 1))
    if sequence.unsorted_indices is not None:
        padded = np.take(padded, sequence.unsorted_indices, axis=0 if batch_first else 1)
        lengths = lengths[sequence.unsorted_indices]
    return padded, lengths


def pad_sequence(sequences, batch_first=False, padding_value=0.0, padding_side="right"):
    """Stack sequences (L_b, *) into (T, B, *) (or (B, T, *)), padding each to the longest on the
    right (or left). The result has the first sequence's dtype, as torch's has."""
    if not isinstance(sequences, Iterable):
        raise RuntimeError("pad_sequence: Expected iterable for input sequences, but got arg of "
                           f"type: {type(sequences)}")
    if padding_side not in ("left", "right"):
        raise RuntimeError(f"Expected padding_side to be one of left or right, but got "
                           f"{padding_side}.")
    seqs = [np.asarray(s) for s in sequences]
    if not seqs:
        raise RuntimeError("received an empty list of sequences")
    trailing = seqs[0].shape[1:]
    for k, s in enumerate(seqs):
        if s.ndim == 0 or s.shape[1:] != trailing:
            raise RuntimeError(f"pad_sequence: expected every sequence to have shape (L, "
                               f"*{trailing}) like the first, but sequence {k} has shape {s.shape}")
    T = max(s.shape[0] for s in seqs)
    out = np.full((len(seqs), T) + trailing, padding_value, dtype=seqs[0].dtype)
    for b, s in enumerate(seqs):
        if padding_side == "right":
            out[b, : s.shape[0]] = s
        else:
            out[b, T - s.shape[0]:] = s
    return out if batch_first else np.ascontiguousarray(out.swapaxes(0, 1))


def unpad_sequence(padded_sequences, lengths, batch_first=False):
    """The list of sequences (L_b, *) inside a padded batch: the inverse of pad_sequence."""
    padded = padded_sequences if batch_first else padded_sequences.swapaxes(0, 1)
    return [padded[b, : int(n)].copy() for b, n in enumerate(lengths)]


def pack_sequence(sequences, enforce_sorted=True):
    """Pack a list of sequences (L_b, *): pad_sequence, then pack_padded_sequence."""
    lengths = np.array([np.shape(s)[0] for s in sequences], dtype=np.int64)
    return pack_padded_sequence(pad_sequence(sequences), lengths, enforce_sorted=enforce_sorted)


def unpack_sequence(packed_sequences):
    """The list of sequences inside a PackedSequence, in their original order."""
    padded, lengths = pad_packed_sequence(packed_sequences, batch_first=True)
    return unpad_sequence(padded, lengths, batch_first=True)
