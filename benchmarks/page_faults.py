"""lstmkit training steps with glibc's default malloc thresholds against fixed ones (README's tip).

    python benchmarks/page_faults.py                     # all sizes, 4 processes each way
    python benchmarks/page_faults.py --sizes 0 --runs 2

Without torch in the process, glibc's dynamic mmap threshold keeps mapping and unmapping the
few-MB arrays of every step, and each fresh page is a fault. Each run here is a fresh process that
repeats `lstm.zero_grad(); out, _ = lstm(x); lstm.backward(dy)` (out alive until the backward is
done, as in a training loop; freed before it, glibc reuses its memory and the faults hide) inside a
function for --seconds and prints the median step and
the minor faults per step; the two settings alternate process by process. The fixed setting is the
README's: MALLOC_MMAP_THRESHOLD_=33554432 (32 MiB, glibc's maximum) MALLOC_TRIM_THRESHOLD_=536870912.

Shape letters: T steps, B batch, I input size, H hidden size, L layers.
"""

import argparse
import os
import statistics
import subprocess
import sys

SIZES = [(50, 32, 64, 128, 1), (50, 50, 128, 128, 2), (100, 32, 256, 256, 1), (50, 50, 512, 512, 2)]
FIXED = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "536870912"}

CHILD = """
import resource, sys, time
import numpy as np
import lstmkit
T, B, I, H, L, seconds = [float(a) if '.' in a else int(a) for a in sys.argv[1:]]
rng = np.random.default_rng(0)
lstm = lstmkit.LSTM(I, H, L)
x = rng.standard_normal((T, B, I), dtype=np.float32)
dy = rng.standard_normal((T, B, H), dtype=np.float32)
def step():   # the output lives until the backward is done, as in a training loop (a loss reads it)
    lstm.zero_grad(); out, _ = lstm(x); lstm.backward(dy)
for _ in range(3):
    step()
faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
times, t0 = [], time.perf_counter()
while time.perf_counter() - t0 < seconds:
    a = time.perf_counter(); step(); times.append(time.perf_counter() - a)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
print(sorted(times)[len(times) // 2] * 1e3, faults / len(times))
"""


def run_child(size, seconds, fixed):
    env = {k: v for k, v in os.environ.items() if k not in FIXED}
    if fixed:
        env.update(FIXED)
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, size), str(seconds)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(str(i) for i in range(len(SIZES))),
                    help="comma-separated indices into SIZES (default: all)")
    ap.add_argument("--runs", type=int, default=4, help="processes per setting and size (default 4)")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed steps per process (default 2 s)")
    args = ap.parse_args(argv)
    for i in (int(s) for s in args.sizes.split(",")):
        res = {False: [], True: []}
        for _ in range(args.runs):
            for fixed in (False, True):
                res[fixed].append(run_child(SIZES[i], args.seconds, fixed))
        d, f = (statistics.median(ms for ms, _ in res[k]) for k in (False, True))
        print(f"T,B,I,H,L={','.join(map(str, SIZES[i]))}  default {d:.2f} ms "
              f"({statistics.median(n for _, n in res[False]):.0f} faults/step)  fixed {f:.2f} ms "
              f"({statistics.median(n for _, n in res[True]):.0f} faults/step)  fixed/default {f / d:.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
