"""Packed variable-length batches: lstmkit against torch, each alone in its own process, and what a
packed batch costs against the padded batch it replaces.

    python benchmarks/bench_packed.py                 # LSTM and GRU, 6 rounds
    python benchmarks/bench_packed.py --rounds 2      # a quick look

The batch (issue 11): T = 100, B = 64, I = H = 256, one layer, lengths drawn uniformly from
[10, 100] (seed 0), so about 55% of the padded grid is real tokens. Timed, on each side, float32:
    packed   forward + backward over pack_padded_sequence(x, lengths, enforce_sorted=False)
             (lstmkit: out, _ = rnn(packed); rnn.backward(grad of out); torch: autograd)
    padded   the same on the full (T, B) grid, as if every sequence were T long
The rounds alternate which side goes first (A B, B A, ...); each sample is >= 0.2 s of back-to-back
calls; the medians over all samples are reported, and packed/padded is each side's own ratio: a
packed batch should cost about its share of real tokens, not the padded batch's time.

Shape letters: T longest sequence, B batch, I input size, H hidden size.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

T, B, I, H = 100, 64, 256, 256


def data(cell):
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, T + 1, B)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    G = {"lstm": 4, "gru": 3}[cell] * H
    bound = 1 / np.sqrt(H)
    w = {k: rng.uniform(-bound, bound, s).astype(np.float32) for k, s in
         (("weight_ih_l0", (G, I)), ("weight_hh_l0", (G, H)), ("bias_ih_l0", (G,)), ("bias_hh_l0", (G,)))}
    return lengths, x, dy, w


def _samples(fn, repeats):
    fn(), fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, int(0.2 / max(time.perf_counter() - t0, 1e-6)))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return out


def lstmkit_worker(cell, repeats):
    import lstmkit
    from lstmkit.utils.rnn import pack_padded_sequence
    lengths, x, dy, w = data(cell)
    rnn = {"lstm": lstmkit.LSTM, "gru": lstmkit.GRU}[cell](I, H)
    rnn.load_state_dict(w)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    dpacked = pack_padded_sequence(dy, lengths, enforce_sorted=False)

    def run(inp, grad):
        rnn.zero_grad()
        rnn(inp)
        rnn.backward(grad)
    res = {"packed": _samples(lambda: run(packed, dpacked), repeats), "padded": _samples(lambda: run(x, dy), repeats)}
    assert "torch" not in sys.modules
    return res


def torch_worker(cell, repeats):
    import torch
    lengths, x, dy, w = data(cell)
    rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](I, H)
    rnn.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    xt, dyt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)
    dpacked = torch.nn.utils.rnn.pack_padded_sequence(dyt, torch.from_numpy(lengths), enforce_sorted=False).data

    def packed():
        rnn.zero_grad()
        xt.grad = None
        p = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.from_numpy(lengths), enforce_sorted=False)
        rnn(p)[0].data.backward(dpacked)

    def padded():
        rnn.zero_grad()
        xt.grad = None
        rnn(xt)[0].backward(dyt)
    res = {"packed": _samples(packed, repeats), "padded": _samples(padded, repeats)}
    assert "lstmkit" not in sys.modules
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3, help="samples per side per round")
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--worker", choices=("lstmkit", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--cell", default="lstm", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps((lstmkit_worker if a.worker == "lstmkit" else torch_worker)(a.cell, a.repeats)))
        return
    lengths = data("lstm")[0]
    print(f"T={T} B={B} I=H={H}, lengths uniform in [10, {T}]: {lengths.sum() / (T * B):.0%} of the grid is real")
    print("| cell | lstmkit packed ms | torch packed ms | lstmkit/torch | lstmkit packed/padded | "
          "torch packed/padded |\n|---|---|---|---|---|---|")
    for cell in a.cells.split(","):
        got = {"lstmkit": {"packed": [], "padded": []}, "torch": {"packed": [], "padded": []}}
        for r in range(a.rounds):
            for side in (("lstmkit", "torch") if r % 2 == 0 else ("torch", "lstmkit")):
                out = subprocess.run([sys.executable, __file__, "--worker", side, "--cell", cell, "--repeats",
                                      str(a.repeats)], capture_output=True, text=True, check=True).stdout
                for k, v in json.loads(out.splitlines()[-1]).items():
                    got[side][k] += v
        med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in got.items()}
        print(f"| {cell} | {1e3 * med['lstmkit']['packed']:.1f} | {1e3 * med['torch']['packed']:.1f} | "
              f"{med['lstmkit']['packed'] / med['torch']['packed']:.2f} | "
              f"{med['lstmkit']['packed'] / med['lstmkit']['padded']:.2f} | "
              f"{med['torch']['packed'] / med['torch']['padded']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
