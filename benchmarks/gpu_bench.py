"""Speed of one library's LSTM on one device, for issue 15's targets: run once per library, each in
its own process (so neither warms or fragments the other's GPU memory), then --summarize.

    python benchmarks/gpu_bench.py --lib lstmkit --device cuda --tf32 off --out lstmkit.jsonl
    python benchmarks/gpu_bench.py --lib torch   --device cuda --tf32 off --out torch.jsonl
    python benchmarks/gpu_bench.py --summarize DIR          # DIR/*.jsonl -> a table, lstmkit / torch

Cases, float32 (L sequence length, N batch, I input size, H hidden size, layers):
    train     one training step: forward, backward of a fixed grad_output (the input's gradient
              too: torch's input requires grad), gradients zeroed; at (100, 64, 512, 512, 1),
              (50, 50, 512, 512, 2) and (100, 256, 1024, 1024, 2)
    generate  batch-1 generation: one token per forward call (L = 1, N = 1) under no_grad, the
              state carried over and the output fed back as the next input; tokens/s at
              (I = H = 256, 2 layers: the main job's LSTM) and (512, 512, 2)
Timing: CUDA events around `steps` calls (time.perf_counter on the CPU), repeated `samples` times
after warm-up; the median per call is reported, with all samples. TF32: "off" sets torch's
allow_tf32 flags False (cuDNN's defaults to True) and expects CUPY_TF32 unset; "on" sets torch's
True and expects CUPY_TF32=1 in lstmkit's environment (CuPy reads it at import; gpu_check.sh sets it).
"""

import argparse
import glob
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TRAIN = [(100, 64, 512, 512, 1), (50, 50, 512, 512, 2), (100, 256, 1024, 1024, 2)]
GENERATE = [(256, 256, 2), (512, 512, 2)]
QUICK_TRAIN, QUICK_GENERATE = [(5, 3, 8, 8, 2)], [(8, 8, 2)]     # the CPU dry run: same code, tiny


class Timer:
    """ms of a callable's `steps` calls: CUDA events on the GPU (lib's own), perf_counter on the CPU."""

    def __init__(self, lib, device):
        self.lib, self.device = lib, device

    def __call__(self, fn, steps):
        if self.device == "cpu":
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            return (time.perf_counter() - start) * 1e3
        if self.lib == "torch":
            import torch
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(steps):
                fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        import cupy
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        for _ in range(steps):
            fn()
        b.record()
        b.synchronize()
        return cupy.cuda.get_elapsed_time(a, b)


def _lstmkit_case(kind, shape, device, rng):
    """The callable one step or one token is, for lstmkit."""
    import lstmkit
    xp = np
    if device == "cuda":
        import cupy as xp
    if kind == "train":
        L, N, I, H, layers = shape
        lstm = lstmkit.LSTM(I, H, layers, dtype=np.float32, seed=0).to(device)
        x = xp.asarray(rng.standard_normal((L, N, I), dtype=np.float32))
        g = xp.asarray(rng.standard_normal((L, N, H), dtype=np.float32))

        def step():
            lstm(x)
            lstm.zero_grad()
            lstm.backward(g)
        return step
    I, H, layers = shape
    lstm = lstmkit.LSTM(I, H, layers, dtype=np.float32, seed=0).to(device).eval()
    box = {"x": xp.asarray(rng.standard_normal((1, 1, I), dtype=np.float32)), "state": None}

    def token():
        with lstmkit.no_grad():
            out, box["state"] = lstm(box["x"], box["state"])
        if I == H:
            box["x"] = out
    return token


def _torch_case(kind, shape, device, rng):
    import torch
    dev = torch.device(device)
    if kind == "train":
        L, N, I, H, layers = shape
        lstm = torch.nn.LSTM(I, H, layers).to(dev)
        x = torch.tensor(rng.standard_normal((L, N, I), dtype=np.float32), device=dev, requires_grad=True)
        g = torch.tensor(rng.standard_normal((L, N, H), dtype=np.float32), device=dev)

        def step():
            out, _ = lstm(x)
            lstm.zero_grad(set_to_none=False)
            x.grad = None
            out.backward(g)
        return step
    I, H, layers = shape
    lstm = torch.nn.LSTM(I, H, layers).to(dev).eval()
    box = {"x": torch.tensor(rng.standard_normal((1, 1, I), dtype=np.float32), device=dev), "state": None}

    def token():
        with torch.no_grad():
            out, box["state"] = lstm(box["x"], box["state"])
        if I == H:
            box["x"] = out
    return token


def _set_tf32(lib, tf32):
    if lib == "torch":
        import torch
        torch.backends.cuda.matmul.allow_tf32 = tf32 == "on"
        torch.backends.cudnn.allow_tf32 = tf32 == "on"
    elif (os.environ.get("CUPY_TF32") == "1") != (tf32 == "on"):
        raise SystemExit(f"--tf32 {tf32} for lstmkit needs CUPY_TF32={'1' if tf32 == 'on' else 'unset'} "
                         "in the environment before CuPy is imported")


def run(args):
    _set_tf32(args.lib, args.tf32)
    make = _lstmkit_case if args.lib == "lstmkit" else _torch_case
    timer = Timer(args.lib, args.device)
    rng = np.random.default_rng(0)
    kinds = [k for k in ("train", "generate") if k in args.kinds.split(",")]
    with open(args.out, "w", encoding="utf-8") as f:
        for kind in kinds:
            shapes = (QUICK_TRAIN if args.quick else TRAIN) if kind == "train" else \
                (QUICK_GENERATE if args.quick else GENERATE)
            for shape in shapes:
                row = {"lib": args.lib, "device": args.device, "tf32": args.tf32, "kind": kind, "shape": shape}
                try:
                    fn = make(kind, shape, args.device, rng)
                    steps = args.tokens if kind == "generate" else max(1, args.steps // (2 if shape[1] > 64 else 1))
                    timer(fn, 2 if kind == "train" else steps)            # warm-up: kernels compiled, memory pooled
                    ms = [timer(fn, steps) / steps for _ in range(args.samples)]
                    row.update(ok=True, ms_median=statistics.median(ms), ms_all=[round(m, 4) for m in ms])
                    if kind == "generate":
                        row["tokens_per_s"] = 1e3 / row["ms_median"]
                except Exception as e:  # noqa: BLE001 - one case failing (OOM, ...) must not lose the others
                    row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-1500:])
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)


def summarize(directory):
    """Every DIR/bench_*.jsonl row, lstmkit next to torch per (kind, shape, tf32): a Markdown table."""
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "bench_*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    table = {}
    for r in rows:
        key = (r["kind"], tuple(r["shape"]), r["tf32"])
        table.setdefault(key, {})[r["lib"]] = r
    lines = ["| case | shape | TF32 | lstmkit | torch (cuDNN) | lstmkit / torch |", "|---|---|---|---|---|---|"]
    for (kind, shape, tf32), libs in sorted(table.items()):
        def cell(lib):
            r = libs.get(lib)
            if r is None:
                return "-"
            if not r["ok"]:
                return "error: " + r["error"][:80]
            return f"{r['tokens_per_s']:.0f} tok/s" if kind == "generate" else f"{r['ms_median']:.3f} ms"
        ratio = "-"
        a, b = libs.get("lstmkit"), libs.get("torch")
        if a and b and a["ok"] and b["ok"]:
            ratio = f"{a['ms_median'] / b['ms_median']:.2f}x time" if kind == "train" else \
                f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s"
        lines.append(f"| {kind} | {shape} | {tf32} | {cell('lstmkit')} | {cell('torch')} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", choices=["lstmkit", "torch"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tf32", default="off", choices=["off", "on"])
    ap.add_argument("--kinds", default="train,generate", help="comma-separated: train, generate")
    ap.add_argument("--out", help="JSON lines file to write")
    ap.add_argument("--steps", type=int, default=6, help="training steps per timed sample")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per timed sample")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes: the CPU dry run")
    ap.add_argument("--summarize", metavar="DIR", help="print the table of DIR/bench_*.jsonl and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if not args.lib or not args.out:
        ap.error("--lib and --out are needed (or --summarize DIR)")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
