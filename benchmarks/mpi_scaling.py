"""Data-parallel training over MPI on one machine: tokens/s of `lstmkit train` with 1 process x 2 BLAS
threads (A) against 2 processes x 1 thread (B), and the communication share of a B step, at the LM
sizes 2x256 and 2x512 (BENCHMARKS.md, "Data-parallel training over MPI").

    python benchmarks/mpi_scaling.py [--rounds 2] [--steps 12] [--warmup 3] [--data mujeong]

Each measurement is a fresh child process (or two under mpiexec) that trains the real Trainer
(batch 32 x 64, dropout 0.3, Adam) for warmup + steps steps and reports, from rank 0:
    step_s       median wall time of the timed steps (all ranks step together)
    reduce_s     median time inside the step's one Allreduce call (World.reduce_step), which also
                 holds any wait for the slower rank
    allreduce_s  median of 20 bare Allreduces of the same flat buffer after a Barrier: the
                 transfer cost alone, the figure the multi-machine estimate starts from
    params       P, the gradient's length (4 P bytes travel)
The machine is shared, so A and B are taken in turn (A B A B ...) and medians reported; the load
average before each round is printed with it.

Shape letters: P parameters, B batch (streams), T sequence length, H hidden size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (256, 512)
BATCH, SEQ = 32, 64


def child(args):
    """One measurement inside the (MPI) job: train, time the steps and the reduce, print JSON (rank 0)."""
    import numpy as np

    from lstmkit.config import TrainConfig
    from lstmkit.distributed import World, world
    from lstmkit.train import Trainer

    w = world()
    step_times, reduce_times = [], []
    if isinstance(w, World):
        inner = w.reduce_step

        def timed(*a):
            t0 = time.perf_counter()
            r = inner(*a)
            reduce_times.append(time.perf_counter() - t0)
            return r
        w.reduce_step = timed
    out = tempfile.mkdtemp(prefix="mpi-bench-")
    cfg = TrainConfig(data=args.data, hidden_size=args.hidden, num_layers=2, dropout=0.3, batch_size=BATCH,
                      seq_len=SEQ, steps=args.warmup + args.steps, eval_every=10 ** 6, sample_every=0,
                      sample_length=0, val_frac=0.0)
    trainer = Trainer(cfg, out_dir=out if w.rank == 0 else out + "-unused", progress=False,
                      out=open(os.devnull, "w"))
    inner_step = trainer._train_step

    def timed_step():
        t0 = time.perf_counter()
        r = inner_step()
        step_times.append(time.perf_counter() - t0)
        return r
    trainer._train_step = timed_step
    trainer.run()
    bare = []
    if isinstance(w, World):
        buf = np.zeros_like(trainer._flat)
        for _ in range(20):
            w.comm.Barrier()
            t0 = time.perf_counter()
            w.comm.Allreduce(w.MPI.IN_PLACE, buf, op=w.MPI.SUM)
            bare.append(time.perf_counter() - t0)
    if w.rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        timed_ = slice(args.warmup, None)
        print(json.dumps({"step_s": statistics.median(step_times[timed_]),
                          "reduce_s": statistics.median(reduce_times[timed_]) if reduce_times else 0.0,
                          "allreduce_s": statistics.median(bare) if bare else 0.0,
                          "params": trainer.model.num_parameters()}))


def measure(kind, hidden, args):
    """kind A: one process, 2 threads; B: mpiexec -n 2, 1 thread each. Returns the child's JSON."""
    threads = "2" if kind == "A" else "1"
    env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               NUMBA_NUM_THREADS=threads, PYTHONPATH=ROOT, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--hidden", str(hidden), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--data", args.data]
    if kind == "B":
        mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
        cmd = [mpiexec, "-n", "2"] + cmd
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--data", default="mujeong")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    if args.child:
        return child(args)
    tokens = BATCH * SEQ
    for hidden in SIZES:
        runs = {"A": [], "B": []}
        for rnd in range(args.rounds):
            for kind in "AB":
                load = os.getloadavg()[0]
                r = measure(kind, hidden, args)
                runs[kind].append(r)
                print(f"2x{hidden} round {rnd + 1} {kind}: {tokens / r['step_s']:8,.0f} tokens/s  step "
                      f"{r['step_s'] * 1e3:6.1f} ms  reduce {r['reduce_s'] * 1e3:5.2f} ms  bare allreduce "
                      f"{r['allreduce_s'] * 1e3:5.2f} ms  (load {load:.2f})", flush=True)
        med = {k: statistics.median(tokens / r["step_s"] for r in v) for k, v in runs.items()}
        # each round's B against the A just before it, taken under about the same load
        paired = statistics.median(a["step_s"] / b["step_s"] for a, b in zip(runs["A"], runs["B"]))
        b = runs["B"]
        step = statistics.median(r["step_s"] for r in b)
        red = statistics.median(r["reduce_s"] for r in b)
        bare = statistics.median(r["allreduce_s"] for r in b)
        print(f"2x{hidden}: P = {b[0]['params']:,} ({b[0]['params'] * 4 / 2**20:.1f} MiB of gradient); median "
              f"A (1 x 2 threads) {med['A']:,.0f} tokens/s, B (2 x 1 thread) {med['B']:,.0f} tokens/s "
              f"(B/A of medians {med['B'] / med['A']:.2f}, median of the rounds' B/A {paired:.2f}); B's reduce {red * 1e3:.2f} ms of a {step * 1e3:.1f} ms step "
              f"({red / step:.1%}), bare allreduce {bare * 1e3:.2f} ms ({bare / step:.1%})", flush=True)


if __name__ == "__main__":
    main()
