"""lstmkit.LSTM against torch.nn.LSTM on the CPU, each library alone in its own process, as users run them.

    python benchmarks/bench_lstm.py --json bench.json      # the full table (~10-15 min on a quiet 2-core machine)
    python benchmarks/bench_lstm.py --quick                # a first look (~2-3 min), not for quoting
    python benchmarks/bench_lstm.py --quick --sizes 0,5 --what train,mem
    python benchmarks/bench_lstm.py --cell gru             # lstmkit.GRU against torch.nn.GRU
    python benchmarks/bench_lstm.py --one-core --what fwd,train   # per-core efficiency, valid under load

Why separate processes (issue 10). A user runs one library, not both. In one process the two
disturb each other: torch's allocator raises glibc's dynamic mmap and trim thresholds for the whole
process, which hides the page faults lstmkit pays per call when it runs alone; and each side's
spinning BLAS/OpenMP worker threads slow whichever side is timed right after it. The old
in-process alternating mode measured that mixture; it has been removed, and there is no in-process
view here (the old script: `git show d025eb2^:benchmarks/bench_lstm.py`).

The processes. This script (the driver) imports neither library, nor NumPy. It starts workers,
each a fresh `python bench_lstm.py --worker SIDE --size T,B,I,H,L --what ... --repeats N`:
    lstmkit worker   imports numpy + lstmkit and never torch (asserted at its end: 'torch' not in
                     sys.modules); no MALLOC_* variables (the driver removes any it inherited), so
                     glibc behaves as it does for a user
    torch worker     imports numpy + torch and never lstmkit (asserted likewise); torch at its
                     default thread count (not set by this script)
Both build the same float32 weights and inputs from NumPy with a fixed seed (torch through
torch.from_numpy / load_state_dict): uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter under
torch.nn's names, standard normal x (T, B, I) and dy (T, B, H). Each worker also reports checksums
of its last results (sum |out|, sum |dx|, sum |dW_ih_l0|, sum |output| of the last generated step) and the driver checks
that the two sides agree (relative difference < 1e-3); a mismatch is printed and kept in the JSON.

What is timed (sizes are (T, B, I, H, layers) = time steps, batch, input size, hidden, stacked layers):
    train   forward + backward of the whole stack, dx computed on both sides.
            lstmkit: lstm.zero_grad(); out, _ = lstm(x); lstm.backward(dy)
            torch:   tl.zero_grad(); x.grad = None; out, _ = tl(x); out.backward(dy)  (x.requires_grad)
    fwd     inference forward. torch: eval mode, under torch.no_grad(). lstmkit: eval mode and
            inside lstmkit.no_grad() when lstmkit has it (else eval mode alone); which one ran is
            printed above the table and recorded in the JSON ("lstmkit_fwd_mode").
    gen     batch 1, 100 steps one at a time carrying the state, as a sampler does (same inference
            settings as fwd); reported as tokens per second.
    mem     peak resident memory of training, in a fresh process per side and size: VmHWM minus
            VmRSS, the baseline taken after imports and a tiny warm-up (T=3, batch 1 and 2: JIT
            code, BLAS/OpenMP and oneDNN initialisation not counted), the peak covering building the
            model and inputs and two training steps. No malloc settings: what glibc keeps after a
            free counts, as it does for a user.
Within a worker the order is gen, fwd, train (an inference user never ran a training step first).
Each is called twice as warm-up, then once more to size the samples: a sample is `inner` calls
back to back, with inner chosen so that a sample lasts >= 0.2 s; --repeats samples are taken, each
recorded as seconds per call. Nothing else is excluded (gc runs as usual).

Rounds. One round runs, for every size, one lstmkit worker and one torch worker, one after the
other (a worker exits before the next starts, so no thread of one side is alive while the other is
timed). Which side goes first alternates: lstmkit first when round + size index is even, torch first
otherwise, so each side goes first equally often for every size over an even number of rounds,
and slow drift of the machine falls on both. Memory runs after the timing rounds, --mem-rounds
times per side and size, alternating the same way.

What the numbers mean.
    ms, tok/s   the median over all samples of all rounds of that side (rounds x repeats samples)
    ratio       lstmkit median time / torch median time (< 1: lstmkit faster). Targets: train and
                fwd <= 1.0 (milestone), <= 0.9 (goal)
    gen x       lstmkit tokens/s / torch tokens/s (= torch time / lstmkit time). Target: >= 3
    rounds      the spread of the per-round ratios: in each round, the median of that round's
                lstmkit samples over the median of its torch samples; min-max in the table, min-max
                and the middle half (25th-75th percentile) in the JSON. A target is shown as met "in
                every round" only when the worst round meets it: a spread that straddles a target
                has not shown that the target is met
    peak MiB    median over --mem-rounds of each side's peak (MiB = 2^20 bytes). Target: lstmkit <= torch
The machine (lscpu: CPU model, family/model, AVX2/AVX-512), numpy's BLAS and the OpenBLAS core type
and threads it runs (found in the lstmkit worker through lstmkit.kernels._find_openblas), torch's
threads, BLAS, oneDNN and CPU capability, the versions, the git commit (and whether lstmkit/ had
uncommitted changes) and the load average at start and end are printed above the table and written
to --json. The load average at the end includes this run's own workers (about 1-2). A run whose
1-minute load average is above 0.5 at the start is marked NOT QUIET above the table: on busy cores
torch's OpenMP threads lose far more than their share (batch-1 calls tens of times slower were
seen on a loaded 2-core machine), so such a run says nothing about either library.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

SIZES = [  # (T, B, I, H, layers)
    (50, 32, 64, 128, 1),
    (100, 32, 256, 256, 1),
    (100, 64, 512, 512, 1),   # PyTorch's fastrnns default
    (50, 50, 128, 128, 2),    # char-rnn default
    (50, 50, 512, 512, 2),    # char-rnn large
    (50, 1, 65, 128, 2),      # batch 1
]
SIDES = ("lstmkit", "torch")
TIMED = ("gen", "fwd", "train")   # the order inside a worker
GEN_TOKENS = 100
SAMPLE_S = 0.2
WARMUP_CALLS = 2
GATES = {"lstm": 4, "gru": 3}
TARGETS = {"milestone": 1.0, "goal": 0.9, "gen_x": 3.0}
CHECK_RTOL = 1e-3
BUSY_LOAD = 0.5   # 1-minute load average above which the run is marked NOT QUIET
HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))


# ============================================================================= worker side
def make_data(cell, T, B, I, H, L, seed=0):
    """The weights (torch.nn's names and shapes, uniform(-1/sqrt(H), 1/sqrt(H)) like its init),
    x (T, B, I), dy (T, B, H) and the generation inputs (GEN_TOKENS, 1, 1, I): float32, from one seed."""
    import numpy as np
    rng = np.random.default_rng(seed)
    G, k = GATES[cell] * H, 1.0 / math.sqrt(H)
    params = {}
    for layer in range(L):
        i_l = I if layer == 0 else H
        for name, shape in ((f"weight_ih_l{layer}", (G, i_l)), (f"weight_hh_l{layer}", (G, H)),
                            (f"bias_ih_l{layer}", (G,)), (f"bias_hh_l{layer}", (G,))):
            params[name] = rng.uniform(-k, k, shape).astype(np.float32)
    x = rng.standard_normal((T, B, I), dtype=np.float32)
    dy = rng.standard_normal((T, B, H), dtype=np.float32)
    xs = rng.standard_normal((GEN_TOKENS, 1, 1, I), dtype=np.float32)
    return params, x, dy, xs


def _same_layout(have, want):
    """Assert the model's parameters are exactly the ones make_data builds (names, order, shapes)."""
    got = [(k, tuple(v.shape)) for k, v in have]
    exp = [(k, v.shape) for k, v in want.items()]
    assert got == exp, f"parameter layout differs from the benchmark's: {got} vs {exp}"


def lstmkit_side(cell, I, H, L, params):
    """fns: bind(x, dy, xs) hands over the inputs, mode(training) sets train/eval mode, and
    train(), fwd(), gen() each run one call and return what the checksums need."""
    import numpy as np
    import lstmkit
    cls = getattr(lstmkit, cell.upper(), None)
    if cls is None:
        raise SystemExit(f"lstmkit.{cell.upper()} does not exist (yet): --cell {cell} needs it")
    m = cls(I, H, L, dtype=np.float32)
    _same_layout(m.named_parameters(), params)
    m.load_state_dict(params)
    no_grad = getattr(lstmkit, "no_grad", None)
    first = next(iter(params))
    d = {}

    def train():
        m.zero_grad()
        out, _ = m(d["x"])
        dx = m.backward(d["dy"])[0]
        return out, dx, m.grads[first]

    def run_fwd():
        return m(d["x"])[0]

    def run_gen():
        state = None
        for xt in d["xs"]:
            out, state = m(xt, state)
        return out

    def fwd():
        if no_grad is None:
            return run_fwd()
        with no_grad():
            return run_fwd()

    def gen():
        if no_grad is None:
            return run_gen()
        with no_grad():
            return run_gen()

    def bind(x, dy, xs):
        d.update(x=x, dy=dy, xs=list(xs))

    return {"train": train, "fwd": fwd, "gen": gen, "mode": m.train, "bind": bind}


def torch_side(cell, I, H, L, params):
    """The same functions as lstmkit_side, through torch.nn."""
    import torch
    tl = getattr(torch.nn, cell.upper())(I, H, L)
    _same_layout(tl.named_parameters(), params)
    tl.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    first = next(iter(params))
    d = {}

    def train():
        tl.zero_grad()
        d["x"].grad = None
        out, _ = tl(d["x"])
        out.backward(d["dy"])
        return out.detach(), d["x"].grad, getattr(tl, first).grad

    def fwd():
        with torch.no_grad():
            return tl(d["x"])[0]

    def gen():
        state = None
        with torch.no_grad():
            for xt in d["xs"]:
                out, state = tl(xt, state)
        return out

    def bind(x, dy, xs):   # x requires grad so that training computes dx; no_grad ignores that
        d.update(x=torch.from_numpy(x).requires_grad_(True), dy=torch.from_numpy(dy),
                 xs=[torch.from_numpy(v) for v in xs])

    return {"train": train, "fwd": fwd, "gen": gen, "mode": tl.train, "bind": bind}


def _abs_sum(a):
    import numpy as np
    return float(np.abs(np.asarray(a, dtype=np.float64)).sum())


# --one-core: every library on one thread, timed in this process's CPU time, which does not grow
# while the process waits for a core; so the figures hold on a machine that others are using. They
# measure each library's work per core, not its speed on all cores (the default mode's question).
_CLOCK = time.process_time if os.environ.get("LSTMKIT_BENCH_CPU_CLOCK") == "1" else time.perf_counter
ONE_CORE_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "NUMBA_NUM_THREADS": "1", "LSTMKIT_BENCH_CPU_CLOCK": "1"}


def _sample(fn, inner):
    """(seconds per call over `inner` calls back to back, the last call's result)."""
    t0 = _CLOCK()
    for _ in range(inner):
        last = fn()
    return (_CLOCK() - t0) / inner, last


def worker_time(side, cell, size, whats, repeats):
    """Warm-up, then `repeats` samples (each >= SAMPLE_S) of each of `whats`; seconds per call."""
    T, B, I, H, L = size
    params, x, dy, xs = make_data(cell, *size)
    fns = (lstmkit_side if side == "lstmkit" else torch_side)(cell, I, H, L, params)
    del params
    fns["bind"](x, dy, xs)
    out = {"side": side, "size": list(size), "results": {}, "check": {}, "loadavg": os.getloadavg()[0]}
    for what in TIMED:   # gen and fwd run in eval mode before any training step, as for a user who only infers
        if what not in whats:
            continue
        fns["mode"](what == "train")
        fn = fns[what]
        for _ in range(WARMUP_CALLS):
            fn()
        inner = max(1, math.ceil(SAMPLE_S / max(_sample(fn, 1)[0], 1e-9)))
        samples = []
        for _ in range(repeats):
            t, last = _sample(fn, inner)
            samples.append(t)
        out["results"][what] = {"samples_s": samples, "inner": inner}
        if what == "train":
            out["check"].update(train_out=_abs_sum(last[0]), train_dx=_abs_sum(last[1]),
                                train_dW=_abs_sum(last[2]))
        else:
            out["check"][what] = _abs_sum(last)
    return out


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def worker_memory(side, cell, size):
    """Peak RSS growth (MiB) of building the model and inputs and two training steps at `size`."""
    import gc
    T, B, I, H, L = size
    make = lstmkit_side if side == "lstmkit" else torch_side
    for tiny_b in (1, 2):   # warm-up: JIT code from the cache, BLAS/OpenMP threads, oneDNN
        params, x, dy, xs = make_data(cell, 3, tiny_b, I, H, L)
        fns = make(cell, I, H, L, params)
        fns["bind"](x, dy, xs)
        fns["train"]()
        del params, x, dy, xs, fns
    gc.collect()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:   # resets VmHWM to the current RSS
        fh.write("5")
    params, x, dy, xs = make_data(cell, *size)
    fns = make(cell, I, H, L, params)
    del params
    fns["bind"](x, dy, xs)
    fns["train"]()
    fns["train"]()
    return {"side": side, "size": list(size), "peak_mib": (_status_kb("VmHWM") - base) / 1024}


def _openblas():
    """numpy's OpenBLAS (library, thread count, core type), found the way lstmkit.kernels finds it."""
    import ctypes
    try:
        from lstmkit.kernels import _find_openblas
        found = _find_openblas()
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"library": f"unknown ({type(e).__name__})"}
    if found is None:
        return {"library": "unknown"}
    lib, prefix, suffix = found
    out = {"library": os.path.basename(lib._name),
           "threads": getattr(lib, f"{prefix}_get_num_threads{suffix}")()}
    core = getattr(lib, f"{prefix}_get_corename{suffix}", None)
    if core is not None:
        core.restype = ctypes.c_char_p
        out["core"] = core().decode()
    return out


def worker_probe(side, cell):
    """The versions and settings of one side, from a process like the timing workers."""
    import numpy as np
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    env = {"python": platform.python_version(), "numpy": np.__version__,
           "numpy_blas": f"{blas.get('name')} {blas.get('version')}"}
    if side == "lstmkit":
        import numba
        import lstmkit
        import lstmkit.modules as M
        if getattr(lstmkit, cell.upper(), None) is None:
            print(f"lstmkit.{cell.upper()} does not exist (yet) in {os.path.dirname(lstmkit.__file__)}: "
                  f"--cell {cell} needs it", file=sys.stderr)
            sys.exit(3)
        env.update(numba=numba.__version__, lstmkit=lstmkit.__version__, lstmkit_path=os.path.dirname(lstmkit.__file__),
                   lstmkit_backend=M._backend().__name__, openblas_runtime=_openblas(),
                   lstmkit_fwd_mode="eval + lstmkit.no_grad()" if getattr(lstmkit, "no_grad", None)
                   else "eval only (no lstmkit.no_grad)")
    else:
        import torch
        show = torch.__config__.show()
        blas_info = next((p.split("=", 1)[1] for p in show.replace(",", " ").split() if p.startswith("BLAS_INFO=")), "?")
        capability = next((ln.split(":", 1)[1].strip() for ln in show.splitlines() if "CPU capability" in ln), "?")
        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   torch_interop_threads=torch.get_num_interop_threads(), torch_blas=blas_info,
                   torch_mkldnn=torch.backends.mkldnn.is_available(), torch_cpu_capability=capability)
    return env


def worker_main(args):
    size = tuple(int(v) for v in args.size.split(",")) if args.size else None
    whats = args.what.split(",")
    if whats == ["probe"]:
        result = worker_probe(args.worker, args.cell)
    elif whats == ["mem"]:
        result = worker_memory(args.worker, args.cell, size)
    else:
        result = worker_time(args.worker, args.cell, size, whats, args.repeats)
    # The point of the separate processes: neither side may have loaded the other.
    other = "torch" if args.worker == "lstmkit" else "lstmkit"
    assert other not in sys.modules, f"the {args.worker} worker imported {other}"
    print(json.dumps(result))


# ============================================================================= driver side
def _cpu_info():
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0))}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    fields = dict(ln.split(":", 1) for ln in text.splitlines() if ":" in ln)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("Flags", "").split()
    info.update(cpu=fields.get("Model name", info["cpu"]), family=fields.get("CPU family"),
                model=fields.get("Model"), threads_per_core=fields.get("Thread(s) per core"),
                hypervisor=fields.get("Hypervisor vendor"), l3=fields.get("L3 cache"),
                simd=" ".join(f for f in ("avx2", "fma", "avx512f") if f in flags) or "none of avx2/fma/avx512f")
    return info


def _git():
    def run(*a):
        try:
            return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": run("rev-parse", "--short", "HEAD") or "?",
            "lstmkit_dirty": bool(run("status", "--porcelain", "--", "lstmkit"))}


def _worker_env():
    """The user's environment without malloc tuning: users do not set MALLOC_* (see page_faults.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    removed = sorted(set(os.environ) - set(env))
    return env, removed


def run_worker(env, side, cell, what, size=None, repeats=1, timeout=900):
    cmd = [sys.executable, HERE, "--worker", side, "--cell", cell, "--what", what, "--repeats", str(repeats)]
    if size is not None:
        cmd += ["--size", ",".join(map(str, size))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"bench_lstm.py: the {side} worker ({what}, {size}) ran past {timeout} s")
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        if r.returncode == 3 and lines:   # the probe's one-line refusal (a missing module)
            sys.exit(f"bench_lstm.py: {lines[-1]}")
        sys.exit(f"bench_lstm.py: the {side} worker ({what}, {size}) failed (exit {r.returncode}):\n"
                 + "\n".join(lines[-15:]))
    return json.loads(r.stdout.strip().splitlines()[-1])


def _spread(values):
    """(min, 25th, 75th, max) of the per-round ratios."""
    if len(values) >= 2:
        q = statistics.quantiles(values, n=4, method="inclusive")
        return min(values), q[0], q[2], max(values)
    return values[0], values[0], values[0], values[0]


def summarise(size, records, mem):
    """One table row from the timing records of every round: {(round, side): worker result}."""
    rounds = sorted({r for r, _ in records})
    row = {"size": list(size)}
    for what in TIMED:
        if what not in records[(rounds[0], "lstmkit")]["results"]:
            continue
        per_side, per_round = {}, []
        for side in SIDES:
            per_side[side] = [s for r in rounds for s in records[(r, side)]["results"][what]["samples_s"]]
        for r in rounds:
            l_med = statistics.median(records[(r, "lstmkit")]["results"][what]["samples_s"])
            t_med = statistics.median(records[(r, "torch")]["results"][what]["samples_s"])
            per_round.append(l_med / t_med)
        med = {side: statistics.median(v) for side, v in per_side.items()}
        if what == "gen":   # a speedup: lstmkit tokens/s over torch's
            row["gen_tok_s"] = {side: GEN_TOKENS / med[side] for side in SIDES}
            row["gen_x"] = med["torch"] / med["lstmkit"]
            row["gen_x_rounds"] = [1.0 / v for v in per_round]
            row["gen_x_spread"] = _spread(row["gen_x_rounds"])
        else:
            row[f"{what}_ms"] = {side: med[side] * 1e3 for side in SIDES}
            row[f"{what}_ratio"] = med["lstmkit"] / med["torch"]
            row[f"{what}_ratio_rounds"] = per_round
            row[f"{what}_ratio_spread"] = _spread(per_round)
        row[f"{what}_samples_s"] = per_side
    if "train_ms" in row:
        T, B, I, H, L = size
        flops = sum(24 * H * ((I if layer == 0 else H) + H) for layer in range(L)) * T * B
        row["train_gflops"] = {side: flops / (row["train_ms"][side] / 1e3) / 1e9 for side in SIDES}
    if mem:
        row["peak_mib"] = {side: statistics.median(mem[side]) for side in SIDES}
        row["peak_mib_runs"] = mem
    # Both sides computed the same thing: their checksums agree.
    diffs = {}
    for key, l_val in records[(rounds[0], "lstmkit")]["check"].items():
        t_val = records[(rounds[0], "torch")]["check"][key]
        diffs[key] = abs(l_val - t_val) / max(abs(t_val), 1e-30)
    row["check_rel_diff"] = diffs
    return row


def _fmt_size(size):
    return ", ".join(map(str, size))


def _mib(v):
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def _progress(size, r, recs):
    parts = []
    for what in TIMED:
        if what in recs["lstmkit"]["results"]:
            l_med = statistics.median(recs["lstmkit"]["results"][what]["samples_s"])
            t_med = statistics.median(recs["torch"]["results"][what]["samples_s"])
            if what == "gen":
                parts.append(f"gen {GEN_TOKENS / l_med:.0f}/{GEN_TOKENS / t_med:.0f} tok/s ({t_med / l_med:.1f}x)")
            else:
                parts.append(f"{what} {l_med * 1e3:.2f}/{t_med * 1e3:.2f} ms (x{l_med / t_med:.2f})")
    return f"  round {r + 1} ({_fmt_size(size)}): lstmkit/torch " + ", ".join(parts)


def header(meta):
    m, lk, tc = meta["machine"], meta["lstmkit_env"], meta["torch_env"]
    ob = lk.get("openblas_runtime", {})
    cpu = f"{m['cpu']}"
    if m.get("family"):
        cpu += f" (family {m['family']} model {m['model']}, {m.get('simd')}"
        cpu += f", {m['hypervisor']} guest)" if m.get("hypervisor") else ")"
    lines = [
        f"{meta['cell'].upper()}: lstmkit against torch.nn.{meta['cell'].upper()}, each alone in its own process "
        f"(`{meta['command']}`), {meta['started']} to {meta['finished']}, {meta['rounds']} rounds x "
        f"{meta['repeats']} samples per side and round, memory {meta['mem_rounds']} run(s) per side; commit {meta['git']['commit']}"
        + (" with uncommitted changes in lstmkit/" if meta["git"]["lstmkit_dirty"] else ""),
        f"- CPU: {cpu}, {m['cores']} cores ({m['cpus_usable']} usable), {m.get('threads_per_core', '?')} thread(s) per core",
        f"- lstmkit {lk['lstmkit']} ({lk['lstmkit_backend']}), numpy {lk['numpy']} with {lk['numpy_blas']}: "
        f"OpenBLAS core {ob.get('core', '?')}, {ob.get('threads', '?')} threads ({ob.get('library')}); "
        f"numba {lk['numba']}; Python {lk['python']}; fwd/gen run in {lk['lstmkit_fwd_mode']}",
        f"- torch {tc['torch']}: {tc['torch_threads']} threads (its default), BLAS {tc['torch_blas']}, "
        f"oneDNN {'yes' if tc['torch_mkldnn'] else 'no'}, CPU capability {tc['torch_cpu_capability']}; "
        "fwd/gen in eval mode under torch.no_grad()",
        "- load average (1, 5, 15 min) at start " + " ".join(f"{v:.2f}" for v in meta["loadavg_start"])
        + ", at end " + " ".join(f"{v:.2f}" for v in meta["loadavg_end"]) + " (the end includes this run's workers)",
    ]
    if meta.get("one_core"):
        lines.append("- ONE CORE: both libraries on one thread, times in each worker's CPU time (holds under load); "
                     "per-core work, not the two-core speed users get by default")
    busy = meta["loadavg_start"][0] > BUSY_LOAD and not meta.get("one_core")
    if busy:
        lines.append(f"- NOT QUIET: load average {meta['loadavg_start'][0]:.2f} at the start on {m['cores']} cores. Other "
                     "processes were running: torch's OpenMP threads (and both sides' BLAS threads) lose far more than "
                     "their share on busy cores, so these figures are not for quoting")
    if meta["removed_env"]:
        lines.append("- removed from the workers' environment: " + ", ".join(meta["removed_env"]))
    if meta["thread_env"]:
        lines.append("- thread variables set (they change both libraries' defaults): "
                     + ", ".join(f"{k}={v}" for k, v in meta["thread_env"].items()))
    return "\n".join(lines)


def table(rows):
    """The Markdown table. Ratios are lstmkit/torch times (< 1: lstmkit faster); gen x is a speedup."""
    head = ("| T, B, I, H, layers | train ms lstmkit | train ms torch | ratio | rounds min-max "
            "| fwd ms lstmkit | fwd ms torch | ratio | rounds min-max "
            "| gen tok/s lstmkit | gen tok/s torch | gen x (rounds min-max) "
            "| peak MiB lstmkit | peak MiB torch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [_fmt_size(r["size"])]
        for what in ("train", "fwd"):
            if f"{what}_ms" in r:
                s = r[f"{what}_ratio_spread"]
                cells += [f"{r[f'{what}_ms']['lstmkit']:.2f}", f"{r[f'{what}_ms']['torch']:.2f}",
                          f"{r[f'{what}_ratio']:.2f}", f"{s[0]:.2f}-{s[3]:.2f}"]
            else:
                cells += ["-"] * 4
        if "gen_x" in r:
            s = r["gen_x_spread"]
            cells += [f"{r['gen_tok_s']['lstmkit']:.0f}", f"{r['gen_tok_s']['torch']:.0f}",
                      f"{r['gen_x']:.1f}x ({s[0]:.1f}-{s[3]:.1f})"]
        else:
            cells += ["-"] * 3
        if "peak_mib" in r:
            cells += [_mib(r["peak_mib"]["lstmkit"]), _mib(r["peak_mib"]["torch"])]
        else:
            cells += ["-"] * 2
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows):
    """Against the targets: how many sizes meet each by the medians, and in every round."""
    out = []
    for what in ("train", "fwd"):
        have = [r for r in rows if f"{what}_ratio" in r]
        if not have:
            continue
        for name in ("milestone", "goal"):
            lim = TARGETS[name]
            med = [r for r in have if r[f"{what}_ratio"] <= lim]
            every = [r for r in have if r[f"{what}_ratio_spread"][3] <= lim]
            miss = [f"({_fmt_size(r['size'])}) {r[f'{what}_ratio']:.2f}" for r in have if r not in med]
            out.append(f"- {what} <= {lim:.1f}x torch's time ({name}): {len(med)}/{len(have)} sizes by the medians, "
                       f"{len(every)}/{len(have)} in every round" + (f"; missed at {', '.join(miss)}" if miss else ""))
    have = [r for r in rows if "gen_x" in r]
    if have:
        lim = TARGETS["gen_x"]
        med = [r for r in have if r["gen_x"] >= lim]
        every = [r for r in have if r["gen_x_spread"][0] >= lim]
        miss = [f"({_fmt_size(r['size'])}) {r['gen_x']:.1f}x" for r in have if r not in med]
        out.append(f"- gen >= {lim:.0f}x torch's tokens/s: {len(med)}/{len(have)} sizes by the medians, "
                   f"{len(every)}/{len(have)} in every round" + (f"; missed at {', '.join(miss)}" if miss else ""))
    have = [r for r in rows if "peak_mib" in r]
    if have:
        ok = [r for r in have if r["peak_mib"]["lstmkit"] <= r["peak_mib"]["torch"]]
        miss = [f"({_fmt_size(r['size'])}) {_mib(r['peak_mib']['lstmkit'])} vs {_mib(r['peak_mib']['torch'])}"
                for r in have if r not in ok]
        out.append(f"- peak memory <= torch's: {len(ok)}/{len(have)} sizes" + (f"; above at {', '.join(miss)}" if miss else ""))
    return "\n".join(out)


def driver_main(args):
    sizes = SIZES if args.sizes is None else [SIZES[int(i)] for i in args.sizes.split(",")]
    whats = args.what.split(",")
    bad = [w for w in whats if w not in TIMED + ("mem",)]
    if bad:
        sys.exit(f"bench_lstm.py: --what takes {','.join(TIMED + ('mem',))}, got {','.join(bad)}")
    timed = [w for w in TIMED if w in whats]
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 8)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    mem_rounds = 0 if "mem" not in whats else (args.mem_rounds if args.mem_rounds is not None else (1 if args.quick else 3))
    env, removed = _worker_env()
    if args.one_core:
        env.update(ONE_CORE_ENV)
    meta = {"command": "python benchmarks/bench_lstm.py " + " ".join(sys.argv[1:]), "cell": args.cell,
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_start": os.getloadavg(), "machine": _cpu_info(), "git": _git(),
            "rounds": rounds if timed else 0, "repeats": repeats, "mem_rounds": mem_rounds,
            "sample_s": SAMPLE_S, "warmup_calls": WARMUP_CALLS, "gen_tokens": GEN_TOKENS,
            "removed_env": removed, "one_core": args.one_core,
            "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                      "NUMBA_NUM_THREADS") if k in os.environ}}
    meta["lstmkit_env"] = run_worker(env, "lstmkit", args.cell, "probe")
    meta["torch_env"] = run_worker(env, "torch", args.cell, "probe")
    print(f"machine: {meta['machine']['cpu']} ({meta['machine']['cores']} cores) | load average at start: "
          + " ".join(f"{v:.2f}" for v in meta["loadavg_start"])
          + (" | NOT QUIET: other processes are running, the figures will not be for quoting"
             if meta["loadavg_start"][0] > BUSY_LOAD else ""), flush=True)
    print(f"lstmkit fwd/gen: {meta['lstmkit_env']['lstmkit_fwd_mode']}; OpenBLAS core "
          f"{meta['lstmkit_env']['openblas_runtime'].get('core', '?')}; torch threads {meta['torch_env']['torch_threads']}"
          + (f"; removed from workers' environment: {', '.join(removed)}" if removed else ""), flush=True)

    records = {size: {} for size in sizes}   # size -> {(round, side): result}
    for r in range(meta["rounds"]):
        print(f"round {r + 1}/{rounds} (load average {os.getloadavg()[0]:.2f})", flush=True)
        for i, size in enumerate(sizes):
            order = SIDES if (r + i) % 2 == 0 else SIDES[::-1]
            for side in order:
                res = run_worker(env, side, args.cell, ",".join(timed), size, repeats)
                res["first"] = order[0]
                records[size][(r, side)] = res
            print(_progress(size, r, {s: records[size][(r, s)] for s in SIDES}), flush=True)

    mem = {size: {side: [] for side in SIDES} for size in sizes}
    for r in range(mem_rounds):
        for i, size in enumerate(sizes):
            for side in (SIDES if (r + i) % 2 == 0 else SIDES[::-1]):
                mem[size][side].append(run_worker(env, side, args.cell, "mem", size)["peak_mib"])
            print(f"  memory run {r + 1} ({_fmt_size(size)}): peak MiB lstmkit/torch "
                  f"{mem[size]['lstmkit'][-1]:.0f}/{mem[size]['torch'][-1]:.0f}", flush=True)

    rows = []
    for size in sizes:
        if timed:
            rows.append(summarise(size, records[size], mem[size] if mem_rounds else None))
        else:
            rows.append({"size": list(size), "peak_mib": {s: statistics.median(mem[size][s]) for s in SIDES},
                         "peak_mib_runs": mem[size], "check_rel_diff": {}})
    meta["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta["loadavg_end"] = os.getloadavg()

    print()
    print(header(meta))
    print()
    print(table(rows))
    print()
    print(targets(rows))
    mismatch = [(r["size"], k, v) for r in rows for k, v in r["check_rel_diff"].items() if v > CHECK_RTOL]
    if mismatch:
        print("\nWARNING: the two sides did not compute the same results (relative difference of checksums):")
        for size, k, v in mismatch:
            print(f"  {_fmt_size(size)} {k}: {v:.2e}")
    if args.json:
        raw = {_fmt_size(size): [dict(v, round=r) for (r, _), v in sorted(recs.items())]
               for size, recs in records.items()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "workers": raw}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 1 if mismatch else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Method: see the docstring at the top of this file.")
    ap.add_argument("--quick", action="store_true",
                    help="2 rounds x 2 samples, 1 memory run: a first look, not for quoting")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 8; --quick 2)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed samples per worker and measurement (default 3; --quick 2)")
    ap.add_argument("--mem-rounds", type=int, default=None, help="memory runs per side and size (default 3; --quick 1)")
    ap.add_argument("--sizes", type=str, default=None,
                    help="comma-separated indices into the size list: "
                         + "; ".join(f"{i}: {_fmt_size(s)}" for i, s in enumerate(SIZES)))
    ap.add_argument("--what", type=str, default="gen,fwd,train,mem",
                    help="what to measure, comma-separated subset of gen,fwd,train,mem (default all)")
    ap.add_argument("--no-memory", action="store_true", help="same as leaving mem out of --what")
    ap.add_argument("--cell", choices=("lstm", "gru"), default="lstm",
                    help="lstm: lstmkit.LSTM vs torch.nn.LSTM (default); gru: lstmkit.GRU vs torch.nn.GRU")
    ap.add_argument("--one-core", action="store_true",
                    help="both libraries on one thread, timed in CPU time: valid on a busy machine, but per-core "
                         "work rather than the default two-core speed (mem is unchanged)")
    ap.add_argument("--json", type=str, default=None, help="also write the results (and every sample) here")
    ap.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.repeats is None:
            args.repeats = 3
        worker_main(args)
        return 0
    if args.no_memory:
        args.what = ",".join(w for w in args.what.split(",") if w != "mem")
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
