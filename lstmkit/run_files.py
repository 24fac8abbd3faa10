"""A run folder's files: read without trusting them, written durably, and locked for one writer.

Checkpoints are downloaded and shared, so nothing in one is believed before it is checked:

    open_regular(d, name, limit)     lstat first: only a regular file is ever opened (opening a device
                                     can have side effects, /dev/zero never ends); then open with
                                     O_NOFOLLOW (a symlink swapped in meanwhile fails) and O_NONBLOCK
                                     (a FIFO cannot hang open()); then fstat: the same file, at most
                                     `limit` bytes, before a buffer of its size is allocated
    read_json(d, name, limit)        the object of a JSON file read that way
    read_safetensors(d, name, limit, check)
                                     {key: array (shape) float32|float64}, all finite.  The header is
                                     read and checked first and handed to check(header) before the
                                     data is read, so sizes claimed elsewhere (config.json) are
                                     compared with the real arrays before anything is allocated
    atomic_write(path, write_fn)     replace a file durably (fsync'ed temporary, os.replace, fsync'ed folder)
    check_output(path, sig, what)    refuse to overwrite what is not an earlier output of ours
    run_lock(run_dir)                RUN/.lock held with fcntl.flock for a block: one writer per run

safetensors layout (https://github.com/huggingface/safetensors):
    [n: 8 bytes, little-endian u64][header: n bytes of JSON][data: the arrays' bytes, back to back]
    header = {key: {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...,
              "__metadata__": {str: str} (optional)};  offsets count from the start of data.

Shape letters: none here (arrays keep the shapes their headers give).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import stat
import tempfile

import numpy as np

from .config import LMError

try:                                   # POSIX; elsewhere the lock is a no-op (documented in run_lock)
    import fcntl
except ImportError:                    # pragma: no cover
    fcntl = None

MiB = 1 << 20
JSON_LIMIT = 64 * MiB                  # vocab.json of a ~4M-word vocabulary; state.json's loss history
SMALL_JSON_LIMIT = 1 * MiB             # checkpoint.json and config.json hold a few hundred bytes
TENSOR_LIMIT = 16 << 30                # one safetensors file: 4G float32 values, more than lstmkit trains
HEADER_LIMIT = 100_000_000            # the safetensors library's own bound on its JSON header
DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}   # what lstmkit writes and computes in
LOCK = ".lock"

# no symlink followed, no FIFO waited on, no descriptor leaked into children
_O_SAFE = (getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
           | getattr(os, "O_BINARY", 0))
_O_READ = os.O_RDONLY | _O_SAFE


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


MODE_DIR = 0o777 & ~_umask()
MODE_FILE = 0o666 & ~_umask()      # what open() would give; mkstemp's 0600 is changed to it


class CheckpointError(LMError, ValueError):
    """A checkpoint that is missing, incomplete, corrupt or of another version."""


class MissingFile(CheckpointError):
    """A file of a state folder is not there (the folder may have been replaced since it was found)."""


def _kind(st) -> str:
    m = st.st_mode
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(m):
            return name
    return "not a regular file"


OPEN_ATTEMPTS = 10      # a writer's os.replace between lstat and open is legitimate: look again


def open_regular(d, name, limit):
    """(fd, size) of d/name, a regular file of at most limit bytes, else CheckpointError. The file
    opened must be the one lstat saw (no symlink or device swapped in); when a writer atomically
    replaced it in between (checkpoint.json on every save), it is looked at again."""
    p = os.path.join(d, name)
    for _ in range(OPEN_ATTEMPTS):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise MissingFile(f"checkpoint {d!r} is incomplete: {name} is missing") from None
        except OSError as e:
            raise CheckpointError(f"checkpoint {d!r}: cannot read {name} ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"checkpoint {d!r} is corrupt: {name} is {_kind(st)}; "
                                  f"a checkpoint holds regular files only")
        try:
            fd = os.open(p, _O_READ)
        except FileNotFoundError:
            raise MissingFile(f"checkpoint {d!r} is incomplete: {name} is missing") from None
        except OSError as e:
            raise CheckpointError(f"checkpoint {d!r}: cannot read {name} ({e.strerror})") from None
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino) and stat.S_ISREG(fst.st_mode):
            break
        os.close(fd)
    else:
        raise CheckpointError(f"checkpoint {d!r} is corrupt: {name} kept changing while it was being opened")
    if fst.st_size > limit:
        os.close(fd)
        raise CheckpointError(f"checkpoint {d!r} is corrupt: {name} has {fst.st_size} bytes; "
                              f"at most {limit} expected")
    return fd, fst.st_size


def _read_exact(f, n, d, name) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise CheckpointError(f"checkpoint {d!r} is corrupt: {name} is shorter than it claims")
        got += k
    return buf


def read_json(d, name, limit=JSON_LIMIT):
    """The JSON object of d/name, read through open_regular; CheckpointError if it is not JSON."""
    fd, size = open_regular(d, name, limit)
    with os.fdopen(fd, "rb", buffering=0) as f:
        data = _read_exact(f, size, d, name)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:          # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"checkpoint {d!r} is corrupt: cannot read {name} "
                              f"({type(e).__name__}: {str(e)[:200]})") from None


def _header_entries(header, data_size, where):
    """{key: (dtype, shape, begin, end)} of a safetensors header, every claim checked against data_size."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the header is not a JSON object")
    entries = {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)
                and len(e["data_offsets"]) == 2 and len(e["shape"]) <= 8
                and all(type(v) is int and v >= 0 for v in e["shape"] + e["data_offsets"])):
            raise CheckpointError(f"{where}: the header entry of {key!r} is malformed")
        if e.get("dtype") not in DTYPES:
            raise CheckpointError(f"{where}: {key} is {e.get('dtype')!r}; lstmkit reads F32 or F64 arrays only")
        dtype, (begin, end) = DTYPES[e["dtype"]], e["data_offsets"]
        if end - begin != math.prod(e["shape"]) * dtype.itemsize:
            raise CheckpointError(f"{where}: {key} claims shape {tuple(e['shape'])} in {end - begin} bytes")
        entries[key] = (dtype, tuple(e["shape"]), begin, end)
    # the arrays must tile the data exactly: no overlaps (one byte read as two arrays), no gaps
    pos = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != pos:
            raise CheckpointError(f"{where}: {key} starts at byte {begin} of the data, expected {pos}")
        pos = end
    if pos != data_size:
        raise CheckpointError(f"{where}: the arrays cover {pos} bytes of {data_size}")
    return entries


def read_safetensors(d, name, limit=None, check=None) -> dict:
    """{key: array} of d/name: float32/float64, finite, writable.  check({key: (dtype, shape)}) runs on
    the header before the data is read, so that it can refuse sizes before they are allocated.
    limit: the file's size bound in bytes, TENSOR_LIMIT if None."""
    where = f"checkpoint {d!r} is corrupt: {name}"
    fd, size = open_regular(d, name, TENSOR_LIMIT if limit is None else limit)
    with os.fdopen(fd, "rb", buffering=0) as f:
        if size < 8:
            raise CheckpointError(f"{where} has {size} bytes, fewer than its 8-byte header length")
        n = int.from_bytes(_read_exact(f, 8, d, name), "little")
        if n > min(size - 8, HEADER_LIMIT):
            raise CheckpointError(f"{where} claims a {n}-byte header in a file of {size} bytes")
        try:
            header = json.loads(_read_exact(f, n, d, name).decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{where} has an unreadable header ({type(e).__name__})") from None
        entries = _header_entries(header, size - 8 - n, where)
        if check is not None:
            check({k: (dt, shape) for k, (dt, shape, _, _) in entries.items()})
        data = _read_exact(f, size - 8 - n, d, name)
    arrays = {}
    for key, (dtype, shape, begin, end) in entries.items():
        a = np.frombuffer(data, dtype, (end - begin) // dtype.itemsize, begin).reshape(shape)
        if not a.flags.aligned:              # an odd offset (F32 next to F64): numpy wants aligned data
            a = a.copy()
        if not np.isfinite(a).all():
            raise CheckpointError(f"{where}: {key} holds NaN or infinite values")
        arrays[key] = a.astype(dtype.newbyteorder("="), copy=False)
    return arrays


# ---- writing durably ------------------------------------------------------------------------
# Durability: data reaches the disk only when fsync'ed, and a rename only when its folder is.

def fsync_dir(path) -> None:
    """fsync a folder, so that the names created, renamed or removed in it survive a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:         # a platform that cannot open folders (Windows): nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError:         # some file systems do not support it on folders
        pass
    finally:
        os.close(fd)


def _write_synced(path, write_fn) -> None:
    """Create path, write_fn(binary file), flush and fsync it."""
    with open(path, "wb") as f:
        write_fn(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path, write_fn) -> None:
    """Replace path durably and atomically: write_fn(f) writes a temporary file (binary) in the same
    folder, which is flushed, fsync'ed and os.replace'd over path, and the folder is fsync'ed.
    Readers see the old file or the new one, never half; after a failure no temporary is left."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=d)
    os.close(fd)
    try:
        os.chmod(tmp, MODE_FILE)
        _write_synced(tmp, write_fn)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(d)


def check_output(path, signature: bytes, what: str) -> None:
    """Refuse an output file we may not replace: its folder must exist, and an existing file must be a
    regular file starting with signature (an earlier output of ours), so nothing else of the user's is
    overwritten (and a FIFO or device at --out is never opened: it could block or never end)."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise LMError(f"output folder {d!r} does not exist")
    if os.path.isdir(path):
        raise LMError(f"--out {path!r} is a directory; give a file name")
    if os.path.exists(path):
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise LMError(f"refusing to overwrite {path!r}: it is {_kind(os.stat(path))}, not {what}")
        fd = os.open(path, (_O_READ & ~getattr(os, "O_NOFOLLOW", 0)))    # --out may be the user's symlink
        with os.fdopen(fd, "rb") as f:
            head = f.read(4096)
        if signature not in head:
            raise LMError(f"refusing to overwrite {path!r}: it is not {what} (remove it or choose another --out)")


# ---- one writer per run ------------------------------------------------------------------------

_held: dict = {}        # realpath of a run -> [fd of its lock file, nesting depth] in this process


def _holder(fd) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8"))
        host = "" if info["host"] == socket.gethostname() else f" on host {info['host']}"
        return f"pid {int(info['pid'])}{host}"
    except (OSError, ValueError, KeyError, TypeError):   # written at this very moment, or not by us
        return "pid unknown"


def _lock_fd(run_dir, path):
    """An fd of RUN/.lock holding its flock, or CheckpointError naming the holder."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_SAFE, MODE_FILE)
        except OSError as e:
            raise CheckpointError(f"cannot lock {run_dir!r}: {LOCK} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise CheckpointError(f"{run_dir!r} is being written by another lstmkit process ({who}); wait "
                                  f"for it to finish or stop it, or choose another --out") from None
        # the previous holder unlinks the file on release: a lock on an unlinked file locks nothing
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same and stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        if not same:
            continue
        raise CheckpointError(f"cannot lock {run_dir!r}: {LOCK} is not a regular file")


def acquire_run_lock(run_dir) -> str:
    """Take RUN/.lock (creating RUN) for this process; nested calls in one process share it."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise CheckpointError(f"{run_dir!r} exists and is not a directory")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {run_dir!r} ({e.strerror or e})") from None
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key][1] += 1
        return key
    if fcntl is None:                 # pragma: no cover - no flock (Windows): one writer is not enforced
        _held[key] = [None, 1]
        return key
    fd = _lock_fd(run_dir, os.path.join(key, LOCK))
    # the pid is only informative (the kernel releases a flock when its holder dies: no stale locks)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    _held[key] = [fd, 1]
    return key


def release_run_lock(key) -> None:
    entry = _held[key]
    entry[1] -= 1
    if entry[1] or entry[0] is None:
        if not entry[1]:
            del _held[key]
        return
    del _held[key]
    try:
        os.unlink(os.path.join(key, LOCK))     # while still locked, so no one else holds this file
    except OSError:
        pass
    os.close(entry[0])


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold the run's lock for the block: a second process gets CheckpointError("... is being written by
    another lstmkit process (pid N) ...").  The lock is fcntl.flock on RUN/.lock, released by the kernel
    if the process dies, so a lock is never stale; RUN/.lock is removed on release.  Re-entrant within a
    process.  Without fcntl (Windows) it does nothing."""
    key = acquire_run_lock(run_dir)
    try:
        yield key
    finally:
        release_run_lock(key)
