"""Two versions of the fused layers (kernels.py: lstm_fused.py, rnn_fused.py; or gru.py) against each other: one layer's forward + backward.

    git worktree add /tmp/base HEAD                      # the version to compare against
    python benchmarks/ab_kernels.py /tmp/base .          # base tree, candidate tree
    python benchmarks/ab_kernels.py /tmp/base . --mode rnn --sizes 0,4 --seconds 12
    python benchmarks/ab_kernels.py /tmp/base . --mode gru          # gru.py's fused layer
    python benchmarks/ab_kernels.py /tmp/base . --inference         # the forward alone, as no_grad runs it

Each tree's file is loaded as a submodule of a package made up for that tree (lstmkit_ab_base,
lstmkit_ab_candidate) whose path is the tree's lstmkit/ folder, so its relative imports (jit.py's
`from . import jit_cache`, lstm_fused.py's `from .blas import ...`) load that tree's files, never the
installed lstmkit's, and lstmkit/__init__.py is not run.

Both kernels files are loaded into this one process and called alternately, call by call (the
order swapped every round), for --seconds per size. Reported per size: the minimum and the median
time of each, and candidate/base for both. On a shared machine neighbours only ever slow a call
down, so the minimum is the steadier of the two; a change is worth keeping when both ratios agree.
This is the test a kernel change has to pass: in this project, timing a product or a kernel alone
repeatedly promised gains that the whole layer call did not show (BENCHMARKS.md).

Shape letters: T steps, B batch, I input size, H hidden size, G gate rows (4H LSTM, 3H GRU, H RNN).
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import types

import numpy as np

SIZES = [(50, 32, 64, 128), (100, 32, 256, 256), (100, 64, 512, 512), (50, 50, 128, 128),
         (50, 50, 512, 512)]   # (T, B, I, H): the layer sizes of bench_lstm.py


def load_kernels(tree, name, file="kernels"):
    """lstmkit/<file>.py of a source tree, as module `name.<file>` of a package `name` made up for
    that tree. Numba's cache goes to a private folder: its cached functions name the module they
    were compiled for, which these loaded copies are not."""
    folder = os.path.join(os.path.abspath(tree), "lstmkit")
    path = os.path.join(folder, file + ".py")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist: give the root of a source tree holding lstmkit/")
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [folder]        # `from . import jit_cache` finds the tree's own file
        package.__package__ = name
        sys.modules[name] = package
    spec = importlib.util.spec_from_file_location(f"{name}.{file}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not getattr(module, "AVAILABLE", False):
        raise SystemExit(f"{path}: Numba is not available there, so it has no fused kernels to time")
    return module


def layer_call(K, mode, x, h0, c0, W_ih, W_hh, b, dy, inference=False):
    if inference:       # the forward alone, keeping nothing for a backward (what no_grad runs)
        if mode == "lstm":
            K.lstm_layer_forward(x, h0, c0, W_ih, W_hh, b, save=False)
        elif mode == "gru":
            K.fused_forward(x, h0, W_ih, W_hh, b, b, save=False)
        else:
            K.rnn_layer_forward(x, h0, W_ih, W_hh, b, save=False)
        return
    if mode == "lstm":
        _, _, _, cache = K.lstm_layer_forward(x, h0, c0, W_ih, W_hh, b)
        K.lstm_layer_backward(dy, None, None, cache)
    elif mode == "gru":   # b_ih = b_hh = b: the GRU keeps the two apart, their values do not matter here
        _, _, cache = K.fused_forward(x, h0, W_ih, W_hh, b, b)
        K.fused_backward(dy, None, cache)
    else:
        _, _, cache = K.rnn_layer_forward(x, h0, W_ih, W_hh, b)
        K.rnn_layer_backward(dy, None, cache)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="source tree holding the version to compare against")
    ap.add_argument("candidate", help="source tree holding the changed version")
    ap.add_argument("--mode", choices=["lstm", "gru", "rnn"], default="lstm",
                    help="which layer (default lstm); gru times gru.py's fused layer")
    ap.add_argument("--sizes", default=None, help="comma-separated indices into the size list (default all)")
    ap.add_argument("--seconds", type=float, default=8.0, help="time spent per size (default 8)")
    ap.add_argument("--inference", action="store_true",
                    help="time the forward alone without saving for a backward (no_grad), not forward + backward")
    args = ap.parse_args()
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="lstmkit-ab-")
    file = "gru" if args.mode == "gru" else "kernels"
    base = load_kernels(args.base, "lstmkit_ab_base", file)
    cand = load_kernels(args.candidate, "lstmkit_ab_candidate", file)
    sizes = SIZES if args.sizes is None else [SIZES[int(i)] for i in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    f32 = np.float32
    for T, B, I, H in sizes:
        G = {"lstm": 4, "gru": 3}.get(args.mode, 1) * H
        x = rng.standard_normal((T, B, I), dtype=f32)
        W_ih = rng.standard_normal((G, I), dtype=f32) * 0.1
        W_hh = rng.standard_normal((G, H), dtype=f32) * 0.1
        b = rng.standard_normal(G, dtype=f32) * 0.1
        h0, c0 = np.zeros((B, H), f32), np.zeros((B, H), f32)
        dy = rng.standard_normal((T, B, H), dtype=f32)
        sides = {"base": base, "candidate": cand}
        for K in (base, cand, base, cand):   # JIT compilation and BLAS thread start-up
            layer_call(K, args.mode, x, h0, c0, W_ih, W_hh, b, dy, args.inference)
        times = {k: [] for k in sides}
        rounds, end = 0, time.time() + args.seconds
        while time.time() < end or rounds < 10:
            order = list(sides) if rounds % 2 == 0 else list(sides)[::-1]
            for k in order:
                t0 = time.perf_counter()
                layer_call(sides[k], args.mode, x, h0, c0, W_ih, W_hh, b, dy, args.inference)
                times[k].append(time.perf_counter() - t0)
            rounds += 1
        lo = {k: min(v) * 1e3 for k, v in times.items()}
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{args.mode}{' inference' if args.inference else ''} T,B,I,H={T},{B},{I},{H} rounds={rounds}  "
              f"min base {lo['base']:.2f} cand {lo['candidate']:.2f} ms (x{lo['candidate'] / lo['base']:.3f})  "
              f"median base {med['base']:.2f} cand {med['candidate']:.2f} ms "
              f"(x{med['candidate'] / med['base']:.3f})", flush=True)


if __name__ == "__main__":
    main()
