"""lstmkit.LSTM against torch.nn.LSTM on the CPU: training step, forward, generation, memory.

    python benchmarks/bench_lstm.py                 # the full table (~4 min idle, ~15 min loaded)
    python benchmarks/bench_lstm.py --quick         # fewer repeats, for a first look

Both run in this process, alternating (lstmkit, torch, torch, lstmkit, ...), on the same shapes,
the same weights and the same float32 inputs; every number is a median over repeats.

Sizes are (T, B, I, H, layers) = (time steps, batch, input size, hidden size, stacked layers).
    train   forward + backward of the whole stack (lstmkit: lstm(x); lstm.backward(dy);
            torch: lstm(x) then out.backward(dy), x.requires_grad so both compute dx), zero_grad
            included on both sides
    fwd     forward only (lstmkit in eval mode; torch under no_grad)
    gen     batch 1, one step at a time carrying (h, c), as a sampler does (both under their
            inference settings); reported in tokens per second
    GF/s    training FLOPs: 24·H·(I_l + H) per token per layer (I_l = I for layer 0, else H):
            the 3 matrix products of forward + backward over the stacked 4H gates. % of peak is
            against the best NumPy float32 2048x2048 matmul measured in the same run
    mem     peak resident memory of one training step, each side in a fresh subprocess: VmHWM
            minus VmRSS taken after imports and a tiny warm-up (so JIT code, BLAS and oneDNN
            initialisation are not counted) and before the model, the inputs and two training
            steps at the measured size. It counts everything a user pays for: weights, grads,
            inputs, activations, caches kept between calls, workspaces. glibc is told to serve big
            blocks with mmap (MALLOC_MMAP_THRESHOLD_) so freed memory leaves RSS at once on both
            sides and the peak is the live peak, not allocator retention.

Ratios: lstmkit time / torch time, from the two medians; "paired ratios, middle half" is the
25th-75th percentile of the ratio within each repeat (the two samples taken back to back). On a
shared machine the medians drift between rows and runs; the paired spread shows how far a ratio
can be trusted (a row whose spread straddles a target has not shown that it meets it).

Timing hygiene: a pause between the two sides lets OpenBLAS's and OpenMP's spinning worker threads
go to sleep, so neither side pays for the other's threads; each timed sample runs long enough
(>= ~0.2 s) that the timer and scheduler noise are small.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

SIZES = [  # (T, B, I, H, layers)
    (50, 32, 64, 128, 1),
    (100, 32, 256, 256, 1),
    (100, 64, 512, 512, 1),   # PyTorch's fastrnns default
    (50, 50, 128, 128, 2),    # char-rnn default
    (50, 50, 512, 512, 2),    # char-rnn large
    (50, 1, 65, 128, 2),      # batch 1
]
GEN_TOKENS = 100
PAUSE_S = 0.15


# ----------------------------------------------------------------------------- environment
def _openblas():
    """numpy's OpenBLAS (library, thread count, core type), found the way lstmkit.kernels finds it."""
    from lstmkit.kernels import _find_openblas
    found = _find_openblas()
    if found is None:
        return {"library": "unknown", "threads": "unknown"}
    lib, prefix, suffix = found
    out = {"library": os.path.basename(lib._name),
           "threads": getattr(lib, f"{prefix}_get_num_threads{suffix}")()}
    core = getattr(lib, f"{prefix}_get_corename{suffix}", None)
    if core is not None:
        core.restype = ctypes.c_char_p
        out["core"] = core().decode()
    return out


def _cpu_model():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment():
    import numba
    import torch
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "numpy": np.__version__, "numba": numba.__version__, "torch": torch.__version__,
        "numpy_blas": f"{blas.get('name')} {blas.get('version')}", "openblas_runtime": _openblas(),
        "torch_threads": torch.get_num_threads(), "torch_mkldnn": torch.backends.mkldnn.is_available(),
        "loadavg_start": os.getloadavg(),
    }


# ----------------------------------------------------------------------------- timing helpers
def _time_once(fn, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _inner_count(fn, target_s=0.2):
    t = _time_once(fn, 1)
    return max(1, int(round(target_s / max(t, 1e-6))))


def race(fns, repeats):
    """fns: {"ours": callable, "torch": callable}. Alternate them, reversing the order every repeat;
    return ({name: median seconds per call}, [ours/torch time ratio of each repeat]). The two
    samples of one repeat are taken back to back, so their ratio is what the machine's drift
    disturbs least; the spread of those ratios says how far to trust the medians' ratio."""
    for fn in fns.values():   # warm-up: JIT, BLAS threads, oneDNN primitives
        fn()
        fn()
    inner = {k: _inner_count(fn) for k, fn in fns.items()}
    samples = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            time.sleep(PAUSE_S)
            samples[k].append(_time_once(fns[k], inner[k]))
    paired = [o / t for o, t in zip(samples["ours"], samples["torch"])]
    return {k: statistics.median(v) for k, v in samples.items()}, paired


def quartiles(values):
    """(25th, 75th) percentile: the middle half of the paired ratios."""
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def matmul_peak(repeats=7):
    n = 2048
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = a.copy()
    a @ b
    best = min(_time_once(lambda: a @ b, 1) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def train_flops(T, B, I, H, L):
    return sum(24 * H * ((I if layer == 0 else H) + H) for layer in range(L)) * T * B


# ----------------------------------------------------------------------------- the two sides
def build(T, B, I, H, L, seed=0):
    """The same LSTM on both sides (torch's initialisation, copied into lstmkit) and inputs."""
    import torch
    import lstmkit
    torch.manual_seed(seed)
    tl = torch.nn.LSTM(I, H, L)
    ours = lstmkit.LSTM(I, H, L, dtype=np.float32)
    ours.load_state_dict({k: v.detach().numpy().copy() for k, v in tl.state_dict().items()})
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I), dtype=np.float32)
    dy = rng.standard_normal((T, B, H), dtype=np.float32)
    return ours, tl, x, dy


def train_fns(ours, tl, x, dy):
    import torch
    xt = torch.from_numpy(x).requires_grad_(True)
    dyt = torch.from_numpy(dy)

    def lstmkit_train():
        ours.zero_grad()
        ours(x)
        ours.backward(dy)

    def torch_train():
        tl.zero_grad()
        xt.grad = None
        out, _ = tl(xt)
        out.backward(dyt)

    return lstmkit_train, torch_train


def forward_fns(ours, tl, x):
    import torch
    xt = torch.from_numpy(x)

    def lstmkit_fwd():
        ours(x)

    def torch_fwd():
        with torch.no_grad():
            tl(xt)

    return lstmkit_fwd, torch_fwd


def generation_fns(ours, tl, I, n=GEN_TOKENS):
    import torch
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 1, I), dtype=np.float32) for _ in range(n)]
    xts = [torch.from_numpy(x) for x in xs]

    def lstmkit_gen():
        state = None
        for x in xs:
            _, state = ours(x, state)

    def torch_gen():
        state = None
        with torch.no_grad():
            for x in xts:
                _, state = tl(x, state)

    return lstmkit_gen, torch_gen


# ----------------------------------------------------------------------------- memory (child)
def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(side, T, B, I, H, L):
    """Run in a fresh process: print the peak RSS growth (MiB) of training at this size."""
    import torch  # noqa: F401 - both libraries loaded on both sides: same starting point
    import lstmkit  # noqa: F401
    # Tiny warm-up: loads numba's cached machine code (batch 1 and batched paths), starts
    # BLAS/OpenMP threads, initialises oneDNN.
    for tiny_b in (1, 2):
        o, t_, x, dy = build(3, tiny_b, I, H, L)
        f = train_fns(o, t_, x, dy)[0 if side == "lstmkit" else 1]
        f()
        del o, t_, x, dy, f
    gc.collect()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:   # resets VmHWM to the current RSS
        fh.write("5")
    ours, tl, x, dy = build(T, B, I, H, L)
    step = train_fns(ours, tl, x, dy)[0 if side == "lstmkit" else 1]
    if side == "lstmkit":
        del tl   # only the side being measured stays alive
    else:
        del ours
    gc.collect()
    step()
    step()
    print(json.dumps({"peak_mib": (_status_kb("VmHWM") - base) / 1024}))


def memory(side, size):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", side,
                        *map(str, size)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return float("nan")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mib"]


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed samples per side (median taken)")
    ap.add_argument("--quick", action="store_true", help="3 repeats, for a first look")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--sizes", type=str, default=None, help="comma-separated indices into the size list")
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    ap.add_argument("--memory-child", nargs=6, metavar=("SIDE", "T", "B", "I", "H", "L"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        side, *dims = args.memory_child
        memory_child(side, *map(int, dims))
        return

    import torch
    import lstmkit.modules as M
    torch.set_num_threads(os.cpu_count())   # torch's default, stated explicitly
    repeats = 3 if args.quick else args.repeats
    env = environment()
    env["lstmkit_backend"] = M._backend().__name__
    print("machine:", env["cpu"], f"({env['cores']} cores)", "| load average at start:",
          " ".join(f"{v:.2f}" for v in env["loadavg_start"]))
    print(f"numpy {env['numpy']} ({env['numpy_blas']}, runtime {env['openblas_runtime']}), "
          f"numba {env['numba']}, torch {env['torch']} (threads {env['torch_threads']}, "
          f"mkldnn {env['torch_mkldnn']}); lstmkit backend: {env['lstmkit_backend']}")
    peak = matmul_peak()
    print(f"matmul peak (NumPy float32 2048^3, best of 7): {peak:.1f} GFLOP/s")

    sizes = SIZES if args.sizes is None else [SIZES[int(i)] for i in args.sizes.split(",")]
    rows = []
    for size in sizes:
        T, B, I, H, L = size
        ours, tl, x, dy = build(*size)
        tr, tr_pairs = race(dict(zip(("ours", "torch"), train_fns(ours, tl, x, dy))), repeats)
        ours.eval()
        tl.eval()
        fw, fw_pairs = race(dict(zip(("ours", "torch"), forward_fns(ours, tl, x))), repeats)
        ge, _ = race(dict(zip(("ours", "torch"), generation_fns(ours, tl, I))), repeats)
        ours.train()
        tl.train()
        fl = train_flops(*size)
        row = {
            "size": size,
            "train_ms": {k: v * 1e3 for k, v in tr.items()}, "train_ratio": tr["ours"] / tr["torch"],
            "train_ratio_iqr": quartiles(tr_pairs), "train_ratio_pairs": tr_pairs,
            "fwd_ms": {k: v * 1e3 for k, v in fw.items()}, "fwd_ratio": fw["ours"] / fw["torch"],
            "fwd_ratio_pairs": fw_pairs,
            "gen_tok_s": {k: GEN_TOKENS / v for k, v in ge.items()},
            "gen_speedup": ge["torch"] / ge["ours"],
            "train_gflops": {k: fl / v / 1e9 for k, v in tr.items()},
        }
        if not args.no_memory:
            row["peak_mib"] = {"ours": memory("lstmkit", size), "torch": memory("torch", size)}
        rows.append(row)
        print(_format_row(row), flush=True)

    peak_end = matmul_peak()
    env["loadavg_end"] = os.getloadavg()
    env["matmul_peak_gflops"] = [peak, peak_end]
    print(f"matmul peak at the end: {peak_end:.1f} GFLOP/s | load average at end: "
          + " ".join(f"{v:.2f}" for v in env["loadavg_end"]))
    # Fractions of the higher of the two peaks: a peak measured while the machine was busy would
    # flatter every row.
    for row in rows:
        row["train_peak_frac"] = {k: v / max(peak, peak_end) for k, v in row["train_gflops"].items()}
    print()
    print(table(rows, max(peak, peak_end)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows, "command": " ".join(sys.argv)}, f, indent=1)


def _format_row(r):
    lo, hi = r["train_ratio_iqr"]
    return (f"{r['size']}: train {r['train_ms']['ours']:.2f} vs {r['train_ms']['torch']:.2f} ms "
            f"(x{r['train_ratio']:.2f}, paired {lo:.2f}-{hi:.2f}), fwd x{r['fwd_ratio']:.2f}, "
            f"gen {r['gen_tok_s']['ours']:.0f} vs {r['gen_tok_s']['torch']:.0f} tok/s")


def table(rows, peak):
    """A Markdown table; ratios are lstmkit/torch times (< 1: lstmkit faster), gen is a speedup."""
    head = ("| T, B, I, H, layers | train ms lstmkit / torch | ratio | paired ratios, middle half "
            "| fwd ms lstmkit / torch | ratio "
            "| gen tok/s lstmkit / torch | speedup | train GFLOP/s lstmkit / torch (% of peak) "
            "| peak MiB lstmkit / torch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        g, f = r["train_gflops"], r["train_peak_frac"]
        mem = r.get("peak_mib")
        mem_s = f"{mem['ours']:.0f} / {mem['torch']:.0f}" if mem else "-"
        lines.append(
            f"| {', '.join(map(str, r['size']))} "
            f"| {r['train_ms']['ours']:.2f} / {r['train_ms']['torch']:.2f} | {r['train_ratio']:.2f} "
            f"| {r['train_ratio_iqr'][0]:.2f}-{r['train_ratio_iqr'][1]:.2f} "
            f"| {r['fwd_ms']['ours']:.2f} / {r['fwd_ms']['torch']:.2f} | {r['fwd_ratio']:.2f} "
            f"| {r['gen_tok_s']['ours']:.0f} / {r['gen_tok_s']['torch']:.0f} | {r['gen_speedup']:.1f}x "
            f"| {g['ours']:.1f} ({100 * f['ours']:.0f}%) / {g['torch']:.1f} ({100 * f['torch']:.0f}%) "
            f"| {mem_s} |")
    lines.append(f"\nmatmul peak: {peak:.1f} GFLOP/s (NumPy float32 2048x2048, best of 7, higher of "
                 "start and end of the run)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
