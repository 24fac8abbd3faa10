"""Data-parallel training over MPI: `mpiexec -n N lstmkit train ...` trains ONE model with N processes.

Why MPI: it is what clusters and cloud HPC images already run, and `mpiexec` starts it; the scheme
is the one Horovod and PyTorch DDP use. Each process (rank r of N) owns a share of the global
batch, computes the gradient of its share, and before every optimizer step the shares' gradients
are summed with ONE MPI Allreduce over one flat buffer, so every rank takes the same step:

    g = Σ_r w_r g_r,   w_r = n_r / n         n_r items (tokens, reviews) of rank r, n = Σ_r n_r
    flat = [g (P,) | loss_hi, loss_lo | n_int, n_term | clock_hi, clock_lo]   one Allreduce(SUM) per step

so the gradient is the mean over the global batch, as one process computes it, and unequal
shares (a classifier's last, short batch) weigh what they hold. The tail carries what the ranks
must agree on without a second message: the global loss (Σ w_r loss_r, split into a float32 high
and low part so that nothing is lost to float32), the stop flags (how many ranks have received
SIGINT, and SIGTERM: any at all stops every rank after the same step) and rank 0's clock (only
rank 0 adds to it; --minutes and the cosine schedule then read the same time on every rank).

Start: rank 0's parameters (and optimizer slots, on a resume) are broadcast to all, so every rank
starts from the same point; at every checkpoint a CRC of each rank's parameters is compared and a
difference is an error. Rank 0 alone prints and writes checkpoints.

Detection: this module is imported by every trainer, but mpi4py only when a launcher's variables
say that the process was started by mpiexec with N > 1 (OMPI_COMM_WORLD_SIZE, PMI_SIZE,
PMIX_RANK), so `lstmkit` alone starts as light as ever and never needs MPI. Without them, world()
is Single: rank 0 of 1, every collective the identity.

Failures: an error is one line for the whole job (report_failure): a bad flag or file fails alike
on every rank and rank 0 says it; an error on one rank alone names the rank and aborts the job (the
others wait in a collective). A rank killed outright (SIGKILL, the OOM killer) cannot speak: the
launcher ends the job with its own message (MPICH: "BAD TERMINATION ... EXIT CODE: 9"). Either way
the last checkpoint stays whole: rank 0 writes it atomically (checkpoint.py).

Dropout: each rank takes its own rows of the GLOBAL batch's mask from the shared generator,
jumping over the other ranks' numbers (SlicedRNG), so the generators stay equal on all ranks and
rank r's mask is the rows of one process's mask: N ranks reproduce one process, dropout included.

Shape letters: N ranks, r a rank, P parameters (all tensors flattened), L layers, B global batch,
b = B / N a rank's share, H hidden size, T time steps.
"""

from __future__ import annotations

import os
import signal
import sys
import zlib

import numpy as np

from .config import LMError

# set by mpiexec in each process it starts: Open MPI, MPICH/Intel MPI (Hydra), PMIx launchers
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
TAIL = 6                 # loss_hi, loss_lo, n_int, n_term, clock_hi, clock_lo after the gradient
LOSS, STOP, CLOCK = -6, -4, -2


class DistributedError(LMError):
    """An MPI set-up problem: mpi4py missing, or a batch that does not split over the ranks."""


def launched_size() -> int:
    """How many processes mpiexec started, from its variables (1 when not started by one). PMIx
    sets the rank but not the size: a PMIX_RANK alone means 'ask MPI' (returned as 0)."""
    for k in SIZE_VARS:
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0 if "PMIX_RANK" in os.environ else 1


def launched_rank() -> int:
    """This process's rank from the launcher's variables, known before MPI is started."""
    for k in RANK_VARS:
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def split(n: int, size: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n items: np.array_split's sizes (the first n % size
    ranks get one more), so shares differ by at most one."""
    q, extra = divmod(n, size)
    lo = rank * q + min(rank, extra)
    return lo, lo + q + (rank < extra)


def _split_float(x: float) -> tuple[np.float32, np.float32]:
    """x as a float32 pair (hi, lo) with hi + lo = x to about 1e-14 relative: a float64 through a
    float32 buffer."""
    hi = np.float32(x)
    return hi, np.float32(x - float(hi))


class SlicedRNG:
    """Stands in for a module's dropout Generator (modules.py calls `dropout_rng.random(x.shape)`):
    returns this rank's rows [lo, hi) of the array one process would draw for the GLOBAL batch,
    and leaves the generator where that draw would, alike on every rank: rank r's mask is exactly
    one process's rows.

    axis: the batch axis of the arrays drawn (1 for the LSTM's (T, b, I) input, 0 for (b, F)).
    set(total, lo, hi, steps): the global batch size B, this rank's rows, and for axis 1 the global
    batch's time steps T (a packed batch's local T is its own longest sequence, on the same sorted
    grid: rows sorted longest first, so rank r's rows are the global grid's rows lo..hi-1).
    `bit_generator` is the real one's, so checkpoints save and restore it as before."""

    def __init__(self, rng, axis):
        self.rng, self.axis = rng, axis
        self.total = self.lo = self.hi = self.steps = None

    def set(self, total, lo, hi, steps=None):
        self.total, self.lo, self.hi, self.steps = total, lo, hi, steps

    @property
    def bit_generator(self):
        return self.rng.bit_generator

    def random(self, shape):
        full = list(shape)
        full[self.axis] = self.total
        if self.axis == 1:
            full[0] = self.steps or shape[0]
        skip = getattr(self.rng.bit_generator, "advance", None)
        if skip is None:                        # no jumps: draw the global array, keep the rows
            idx = [slice(None)] * len(shape)
            idx[self.axis] = slice(self.lo, self.hi)
            idx[0] = slice(0, shape[0]) if self.axis == 1 else idx[0]
            return self.rng.random(tuple(full))[tuple(idx)]
        return self._jump(shape, full, skip)

    def _jump(self, shape, full, skip):
        """The same numbers without drawing the other ranks' rows: random() takes one 64-bit output
        per float64, in C order, so the generator jumps (PCG64.advance) over every run of rows that
        is not this rank's: T runs for a (T, B, I) mask, one for (B, F). The state after equals the
        global draw's."""
        row = int(np.prod(full[self.axis + 1:], dtype=np.int64))          # outputs per batch row
        block = self.total * row                                           # one time step (axis 1), or all
        times = shape[0] if self.axis == 1 else 1
        out = np.empty((times, self.hi - self.lo) + tuple(full[self.axis + 1:]))
        for t in range(times):
            skip(self.lo * row)
            out[t] = self.rng.random(out.shape[1:])
            skip((self.total - self.hi) * row)
        skip(block * ((full[0] if self.axis == 1 else 1) - times))         # a packed batch's later steps
        return out if self.axis == 1 else out[0]


def share(batch_size, w, what="--batch-size") -> tuple[int, int]:
    """[lo, hi) of this rank's streams when every rank must hold the same number (the LM's B)."""
    if batch_size % w.size:
        raise DistributedError(f"{what} {batch_size} does not split over {w.size} processes: give a "
                               f"multiple of {w.size} (each process trains on {what} / {w.size} of the batch)")
    b = batch_size // w.size
    return w.rank * b, (w.rank + 1) * b


class Single:
    """One process: rank 0 of 1. Every collective is the identity, so the trainers call the same
    methods whether or not they run under MPI."""

    rank, size, started = 0, 1, True

    def reduce_step(self, flat, weight, loss, stop, clock):
        """The step's values all ranks share: (global loss, stop signal or 0, rank 0's clock)."""
        return loss, stop, clock

    def broadcast(self, arrays):
        pass

    def sum(self, values):
        return np.asarray(values, dtype=np.float64)

    def gather_rows(self, a, axis):
        return a

    def check_same(self, params, step):
        pass

    def agree(self, failed):
        return 0 if failed else None


class RanksDiffer(LMError):
    """The ranks' parameters drifted apart; raised on every rank alike."""
    collective = True


class World(Single):
    """N > 1 processes under MPI (mpi4py's COMM_WORLD)."""

    def __init__(self, MPI, comm):
        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.started = False         # set by agree(): from then on an error on one rank aborts all

    def reduce_step(self, flat, weight, loss, stop, clock):
        """flat (P + TAIL,) holds this rank's gradient in flat[:-TAIL]: weighted by the rank's share
        and summed over ranks in place, with the tail, by one Allreduce."""
        flat[:-TAIL] *= np.float32(weight)
        flat[LOSS], flat[LOSS + 1] = _split_float(weight * loss)
        flat[STOP], flat[STOP + 1] = stop == signal.SIGINT, stop == signal.SIGTERM
        flat[CLOCK], flat[CLOCK + 1] = _split_float(clock if self.rank == 0 else 0.0)
        self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)
        agreed = signal.SIGINT if flat[STOP] > 0 else signal.SIGTERM if flat[STOP + 1] > 0 else 0
        return (float(flat[LOSS]) + float(flat[LOSS + 1]), int(agreed),
                float(flat[CLOCK]) + float(flat[CLOCK + 1]))

    def broadcast(self, arrays):
        """Rank 0's values into every rank's arrays (in place), one message per dtype."""
        by_dtype = {}
        for a in arrays:
            by_dtype.setdefault(a.dtype, []).append(a)
        for dtype, group in by_dtype.items():
            buf = np.concatenate([a.reshape(-1) for a in group]) if self.rank == 0 else \
                np.empty(sum(a.size for a in group), dtype)
            self.comm.Bcast(buf, root=0)
            off = 0
            for a in group:
                a[...] = buf[off:off + a.size].reshape(a.shape)
                off += a.size

    def sum(self, values):
        """Σ over ranks of a few float64 numbers (validation sums), the same on every rank."""
        buf = np.array(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def _allgather_int(self, n):
        buf = np.empty(self.size, np.int64)
        self.comm.Allgather(np.array([n], np.int64), buf)
        return buf

    def gather_rows(self, a, axis):
        """Rank 0 gets every rank's `a` joined along `axis` in rank order (the global picture a
        checkpoint holds, e.g. the carried h (L, B, H) from each rank's (L, b, H)); others get None."""
        local = np.ascontiguousarray(np.moveaxis(a, axis, 0))
        rows = self._allgather_int(local.shape[0])                       # each rank's share
        out = np.empty((int(rows.sum()),) + local.shape[1:], a.dtype) if self.rank == 0 else None
        counts = rows * int(np.prod(local.shape[1:], dtype=np.int64))     # in elements, for Gatherv
        self.comm.Gatherv(local, [out, counts] if self.rank == 0 else None, root=0)
        return np.moveaxis(out, 0, axis) if self.rank == 0 else None

    def check_same(self, params, step):
        """Every rank holds the same parameters, bit for bit (a CRC of each compared); else an error
        naming the first rank that differs from rank 0, raised on every rank alike."""
        crc = 0
        for p in params.values():
            crc = zlib.crc32(np.ascontiguousarray(p).view(np.uint8), crc)
        crcs = self._allgather_int(crc)
        bad = [r for r in range(self.size) if crcs[r] != crcs[0]]
        if bad:
            raise RanksDiffer(f"at step {step} the parameters of rank {bad[0]} differ from rank 0's "
                              f"({len(bad)} of {self.size} ranks differ); nothing was saved")

    def agree(self, failed):
        """Called once by every rank when its set-up has succeeded or failed: the lowest rank that
        failed (it alone reports its error), or None when all are ready."""
        buf = np.array([self.rank if failed else self.size], np.int64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.MIN)
        self.started = True
        return None if buf[0] == self.size else int(buf[0])

    def abort(self, code):
        """End every rank now. The error is already printed; MPICH would add a line of its own
        ("Abort(2) on node ..."), so stderr is closed first: the job's error stays one line."""
        sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        self.comm.Abort(code)


_world = None


def world():
    """The process group this process trains in: World under mpiexec with N > 1, else Single.
    mpi4py is imported only here, and only when a launcher started this process."""
    global _world
    if _world is not None:
        return _world
    if launched_size() == 1:
        _world = Single()
        return _world
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistributedError(f"started by mpiexec with {launched_size() or 'several'} processes, but "
                               f"mpi4py is not installed: pip install 'lstmkit[mpi]'") from None
    comm = MPI.COMM_WORLD
    _world = World(MPI, comm) if comm.Get_size() > 1 else Single()
    return _world


def report_failure(err, line, code) -> int:
    """An error that ends the command: print `line` on stderr once per job and return `code`.
    One process: as always. Before every rank has reported in (World.agree): the lowest failing
    rank prints (a bad flag fails alike on all), the others exit quietly with the same code; before
    MPI started at all, rank 0 (from the launcher's variables) prints. After the start an error
    here is this rank's alone (those raised alike on every rank go to report_collective), so it
    names the rank and aborts the job, whose other ranks wait in a collective and would never return."""
    w = _world
    if w is None or w.size == 1:
        if w is None and launched_rank() != 0:
            return code
        err.write(line + "\n")
        return code
    if not w.started:
        if w.agree(failed=True) == w.rank:
            err.write(line + "\n")
        return code
    err.write(line.replace("lstmkit: error: ", f"lstmkit: error: rank {w.rank} of {w.size}: ", 1) + "\n")
    err.flush()
    w.abort(code)
    return code


def report_collective(err, line, code) -> int:
    """An error every rank raised alike after the start (TrainingStopped, RanksDiffer): rank 0 prints it."""
    if _world is None or _world.rank == 0:
        err.write(line + "\n")
    return code


def null_output():
    """Where ranks other than 0 print: nowhere (rank 0 alone prints progress and samples)."""
    return open(os.devnull, "w")


class DataParallel:
    """What trainer.TrainerBase does under MPI, kept here beside the collectives it uses; with one
    process (Single) each method is the one-process behaviour. The loop calls, on every rank alike:
    _reduce after backward, _stop_requested before each step, _add_time for time spent, and
    _checkpoint to save; run() starts with world.agree and _start_world."""

    def _init_world(self):
        self.world = world()
        self.rank0 = self.world.rank == 0
        self.share = 1.0 / self.world.size     # this rank's weight in the global mean (n_r / n)
        self._agreed_stop = 0                  # the stop signal the ranks agreed on at the last step
        self._flat = None                      # the flat gradient buffer (model.flatten_grads)

    def _start_world(self):
        """Once every rank's set-up has succeeded: rank 0's parameters and optimizer slots on all
        ranks, and the gradients in one flat buffer for the step's one Allreduce."""
        self.world.broadcast(list(self.model.params.values()) + list(self.optimizer.state_arrays().values()))
        self._flat = self.model.flatten_grads(TAIL)
        self._clock = self.elapsed

    def _reduce(self, loss):
        """The step's one Allreduce: the gradients become the global batch's mean on every rank;
        returns the global loss, and takes in the agreed stop signal and rank 0's clock."""
        loss, self._agreed_stop, self.elapsed = self.world.reduce_step(
            self._flat, self.share, loss, self.stop_signal or 0, self._clock)
        return loss

    def _stop_requested(self):
        """One process: a signal has arrived. MPI: the ranks agreed at the last step that one has
        arrived somewhere (the step's Allreduce carries it), so all stop after the same step."""
        if self.world.size == 1:
            return self.stop_signal is not None
        if self._agreed_stop:
            self.stop_signal = self._agreed_stop
        return bool(self._agreed_stop)

    def _add_time(self, dt):
        """Training time towards --minutes. Under MPI rank 0's clock is the one that counts: it
        reaches every rank in the next step's Allreduce (_reduce), so that every rank decides alike
        when the budget is spent and which learning rate the cosine schedule gives (elapsed lags
        rank 0's clock by at most one step)."""
        if self.world.size == 1:
            self.elapsed += dt
        else:
            self._clock += dt

    def _checkpoint(self, best=False):
        """Save (rank 0), after checking that every rank holds the same parameters and gathering
        what the ranks hold apart (_collect): all ranks call this together."""
        self.world.check_same(self.model.params, self.step)
        self._collect()
        if self.rank0:
            self.save(best=best)

    def _collect(self):
        """Gather to rank 0 what save() needs from every rank (the LM's carried state)."""
