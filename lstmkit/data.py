"""Text -> normalised string -> ids -> (T, B) batches for truncated backpropagation through time.

Reading: the bytes are decoded as UTF-8 strictly (a bad byte is an error naming its offset), CRLF
(and a lone CR) become LF, and the text is NFC-normalised, so that the same visible text always
gives the same ids.

Batches, as char-rnn makes them: the N ids are cut into B contiguous streams of S = N // B ids
    streams[b, s] = ids[b * S + s]                              (B, S)
and the streams are walked in chunks of T, each chunk's targets one step ahead of its inputs,
    x_k = streams[:, kT : kT+T].T,  y_k = streams[:, kT+1 : kT+T+1].T          (T, B)
so that stream b of chunk k+1 continues stream b of chunk k and the LSTM's h and c are carried
from chunk to chunk.  Under MPI a process walks only its rows [lo, hi) of the same B streams
(distributed.py), so N processes together read exactly what one process reads.  Scoring reads a text as one stream (stream_chunks), never as B.  An epoch has K = (S - 1) // T chunks; after the last, the walk restarts at
k = 0 with fresh (zero) states.

Shape letters: N number of ids, B batch size (streams), S stream length, T chunk length, K chunks.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import unicodedata
from importlib import resources

import numpy as np

from .config import BUILTIN_CORPORA, LMError


class DataError(LMError, ValueError):
    """A problem with the user's text (missing, empty, undecodable, too short)."""


def normalize_text(text: str) -> str:
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def decode_utf8(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise DataError(f"{name} is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} "
                        f"cannot be decoded ({e.reason})") from None


def read_data_bytes(spec: str, builtins: dict, kind: str) -> bytes:
    """The bytes of a built-in data set (name -> gzip file in lstmkit/corpora) or of a regular file.
    kind names what a path should be ("text", "TSV or CSV") in the errors. A device or a FIFO (a
    config.json naming /dev/zero, say) is refused before it is opened: reading it would never end."""
    if spec in builtins:
        return gzip.decompress(resources.files("lstmkit").joinpath("corpora", builtins[spec]).read_bytes())
    try:
        st = os.stat(spec)
    except FileNotFoundError:
        raise DataError(f"data file {spec!r} does not exist (give a {kind} file, or one of: "
                        f"{', '.join(builtins)})") from None
    except OSError as e:
        raise DataError(f"cannot read data file {spec!r}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"data file {spec!r} is a directory, not a {kind} file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"data file {spec!r} is not a regular file (a device, FIFO or socket)")
    try:
        with open(spec, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read data file {spec!r}: {e.strerror}") from None


def read_text(spec: str) -> str:
    """The normalised text of a file path or of a built-in corpus name ("mujeong", "shakespeare")."""
    raw = read_data_bytes(spec, BUILTIN_CORPORA, "text")
    text = normalize_text(decode_utf8(raw, repr(spec)))
    if not text:
        raise DataError(f"data file {spec!r} is empty")
    return text


def text_digest(text: str) -> str:
    """sha256 of the normalised text: identifies the data a run was trained on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_train_val(ids: np.ndarray, val_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last round(val_frac * N) ids for validation."""
    n_val = int(round(len(ids) * val_frac))
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:]


def make_streams(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """(N,) -> (B, S): B contiguous streams; the N - B*S trailing ids are dropped."""
    S = len(ids) // batch_size
    return np.ascontiguousarray(ids[: batch_size * S].reshape(batch_size, S))


class BatchStream:
    """Chunks (x, y) of shape (T, B) walked in order; `position` (epoch, chunk) is saved for resuming."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, what: str = "training text",
                 rows: tuple[int, int] | None = None):
        """rows: the streams [lo, hi) of the B this process walks (data-parallel training); all by default."""
        need = batch_size * (seq_len + 1)
        if len(ids) < need:
            raise DataError(f"the {what} has {len(ids)} tokens, fewer than one batch: --batch-size "
                            f"{batch_size} x (--seq-len {seq_len} + 1) = {need} are needed")
        self.B, self.T = batch_size, seq_len
        self.streams = make_streams(ids, batch_size)              # (B, S)
        if rows is not None:
            self.streams = self.streams[rows[0]:rows[1]]          # (b, S): this process's share
        self.b = self.streams.shape[0]                            # b: streams walked here
        self.chunks_per_epoch = (self.streams.shape[1] - 1) // seq_len   # K
        self.epoch = 0
        self.chunk = 0

    @property
    def tokens_per_epoch(self) -> int:
        return self.chunks_per_epoch * self.B * self.T

    def next(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """The next chunk (x, y), both (T, B) int64, and whether it starts an epoch (reset h, c)."""
        if self.chunk >= self.chunks_per_epoch:
            self.epoch += 1
            self.chunk = 0
        start = self.chunk == 0
        t0 = self.chunk * self.T
        x = self.streams[:, t0: t0 + self.T].T                     # (T, B)
        y = self.streams[:, t0 + 1: t0 + self.T + 1].T             # (T, B)
        self.chunk += 1
        return np.ascontiguousarray(x), np.ascontiguousarray(y), start

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.chunk / self.chunks_per_epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "chunk": self.chunk}

    def load_state(self, d: dict) -> None:
        self.epoch, self.chunk = int(d["epoch"]), int(d["chunk"])


def stream_chunks(ids: np.ndarray, seq_len: int):
    """The text as ONE stream in chunks of at most T: yields (x, y), each (t, 1) with t <= T, the
    targets one step ahead; carried state between them makes every id but the first predicted once,
    from all the ids before it (evaluate.py)."""
    ids = np.asarray(ids)
    for t0 in range(0, len(ids) - 1, seq_len):
        t1 = min(t0 + seq_len, len(ids) - 1)
        yield ids[t0:t1, None], ids[t0 + 1:t1 + 1, None]
