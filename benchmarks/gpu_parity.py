"""Parity of lstmkit's modules on a device with torch.nn's: outputs, final states, and the gradients
of the input, the initial states and every parameter, for a small slice of the CPU tests' grid.

    python benchmarks/gpu_parity.py --device cuda --out parity.jsonl     # on a GPU machine
    python benchmarks/gpu_parity.py --device cpu --out parity.jsonl      # the same code on the CPU

One JSON line per case: {"case", "dtype", "ok", "max_err" {what: largest |ours - torch|}, "error"};
a case that fails or raises is recorded and the next one runs. The last line is a summary. Torch
runs with TF32 off, so float32 is compared at the CPU tests' tolerance (tests/oracle.py):
float64 to 1e-10, float32 to rtol 2e-4, atol 2e-5. `--reference` runs lstmkit's readable
reference (LSTMKIT_REFERENCE=1) instead of the fused path: functional.py on CuPy arrays.
The "train" case runs a few SGD steps of a 2-layer LSTM on the device and on the CPU and compares
the losses (float64): the path an optimizer takes (in-place updates, bump_version) on the device.

tests/test_gpu.py imports check_module and check_cell from here (the emulated GPU path on the CPU).
Shape letters: L sequence length, N batch, I input size, H hidden size.
"""

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lstmkit  # noqa: E402
from lstmkit.device import to_numpy  # noqa: E402

TOL = {np.float64: dict(rtol=1e-10, atol=1e-10), np.float32: dict(rtol=2e-4, atol=2e-5)}   # tests/oracle.py's


def _torch():
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False    # TF32 off: float32 must be float32
    torch.backends.cudnn.allow_tf32 = False
    return torch


def _on(a, dev):
    """A host array on lstmkit's device `dev` ("cpu" or "cuda")."""
    if dev == "cpu":
        return a
    import cupy
    return cupy.asarray(a)


def _compare(pairs, dtype):
    """[(what, ours, theirs tensor)] -> {what: max abs error}; AssertionError naming the first beyond tolerance."""
    errs, bad = {}, []
    for what, ours, theirs in pairs:
        o = to_numpy(ours)
        t = theirs.detach().cpu().numpy()
        if o.shape != t.shape:
            bad.append(f"{what}: shape {o.shape} vs torch {t.shape}")
            continue
        errs[what] = float(np.max(np.abs(o - t))) if o.size else 0.0
        if not np.allclose(o, t, **TOL[dtype]):
            bad.append(f"{what}: max |ours - torch| = {errs[what]:.3g}")
    if bad:
        raise AssertionError("; ".join(bad) + f" (max errors {errs})")
    return errs


def _twins(cls, kwargs, dtype, seed, I, H, ours_dev, torch_dev):
    """lstmkit's cls(I, H, **kwargs) on ours_dev and torch.nn's module of the same name with the same
    weights on torch_dev."""
    torch = _torch()
    ours = cls(I, H, dtype=dtype, seed=seed, **kwargs)
    twin = getattr(torch.nn, cls.__name__)(I, H, dtype=torch.float64 if dtype == np.float64 else torch.float32,
                                           **kwargs)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    return ours.to(ours_dev), twin.to(torch_dev)


def check_module(cls, kwargs, dtype, ours_dev, torch_dev, L=5, N=3, I=4, H=6, seed=0, unbatched=False):
    """lstmkit cls(I, H, **kwargs) on ours_dev against torch.nn's twin on torch_dev: returns the max
    errors, raises AssertionError beyond tolerance."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    ours, twin = _twins(cls, kwargs, dtype, seed, I, H, ours_dev, torch_dev)
    lstm = cls.__name__ == "LSTM"
    D = 2 if kwargs.get("bidirectional") else 1
    S = kwargs.get("num_layers", 1) * D
    P = kwargs.get("proj_size", 0) or H
    x_shape = (L, I) if unbatched else ((N, L, I) if kwargs.get("batch_first") else (L, N, I))
    lead = (S,) if unbatched else (S, N)
    host = {"x": rng.standard_normal(x_shape), "h0": rng.standard_normal(lead + (P,)),
            "c0": rng.standard_normal(lead + (H,))}
    host = {k: v.astype(dtype) for k, v in host.items()}
    t = {k: torch.tensor(v, device=torch_dev, requires_grad=True) for k, v in host.items()}
    hx = (_on(host["h0"], ours_dev), _on(host["c0"], ours_dev)) if lstm else _on(host["h0"], ours_dev)
    out, state = ours(_on(host["x"], ours_dev), hx)
    t_out, t_state = twin(t["x"], (t["h0"], t["c0"]) if lstm else t["h0"])
    states, t_states = (state if lstm else (state,)), (t_state if lstm else (t_state,))
    grads = [rng.standard_normal(a.shape).astype(dtype) for a in (to_numpy(out), *map(to_numpy, states))]
    loss = sum((a * torch.tensor(g, device=torch_dev)).sum() for a, g in zip((t_out, *t_states), grads))
    loss.backward()
    g_dev = [_on(g, ours_dev) for g in grads]
    dx, dstate = ours.backward(g_dev[0], tuple(g_dev[1:]) if lstm else g_dev[1])
    dstates = dstate if lstm else (dstate,)
    pairs = [("output", out, t_out)] + [(f"state{k}", s, ts) for k, (s, ts) in enumerate(zip(states, t_states))]
    pairs += [("grad_x", dx, t["x"].grad), ("grad_h0", dstates[0], t["h0"].grad)]
    if lstm:
        pairs.append(("grad_c0", dstates[1], t["c0"].grad))
    pairs += [(f"grad {k}", ours.grads[k], p.grad) for k, p in twin.named_parameters()]
    return _compare(pairs, dtype)


def check_cell(cls, dtype, ours_dev, torch_dev, N=3, I=4, H=5, seed=0):
    """A cell on ours_dev against torch.nn's on torch_dev, one step, all gradients."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    ours = cls(I, H, dtype=dtype, seed=seed)
    twin = getattr(torch.nn, cls.__name__)(I, H, dtype=torch.float64 if dtype == np.float64 else torch.float32)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    twin.to(torch_dev)
    ours.to(ours_dev)
    lstm = cls.__name__ == "LSTMCell"
    host = [rng.standard_normal(s).astype(dtype) for s in ((N, I), (N, H), (N, H))]
    t = [torch.tensor(a, device=torch_dev, requires_grad=True) for a in host]
    hx = (_on(host[1], ours_dev), _on(host[2], ours_dev)) if lstm else _on(host[1], ours_dev)
    state = ours(_on(host[0], ours_dev), hx)
    t_state = twin(t[0], (t[1], t[2]) if lstm else t[1])
    states, t_states = (state if lstm else (state,)), (t_state if lstm else (t_state,))
    grads = [rng.standard_normal((N, H)).astype(dtype) for _ in states]
    sum((a * torch.tensor(g, device=torch_dev)).sum() for a, g in zip(t_states, grads)).backward()
    g_dev = [_on(g, ours_dev) for g in grads]
    dx, dstate = ours.backward(tuple(g_dev) if lstm else g_dev[0])
    dstates = dstate if lstm else (dstate,)
    pairs = [(f"state{k}", s, ts) for k, (s, ts) in enumerate(zip(states, t_states))]
    pairs += [("grad_x", dx, t[0].grad)] + [(f"grad_hx{k}", d, t[1 + k].grad) for k, d in enumerate(dstates)]
    pairs += [(f"grad {k}", ours.grads[k], p.grad) for k, p in twin.named_parameters()]
    return _compare(pairs, dtype)


def check_packed(cls, kwargs, dtype, ours_dev, torch_dev, lengths=(3, 5, 2, 5), I=4, H=6, seed=0):
    """A padded batch of unsorted lengths packed by each library (lstmkit on the host, its data
    then moved to ours_dev; torch on torch_dev) through both modules: the packed output, h_n
    (and c_n), the padded input's gradient and every parameter gradient."""
    torch = _torch()
    from torch.nn.utils.rnn import pack_padded_sequence as torch_pack
    from lstmkit.utils.rnn import PackedSequence, pack_padded_sequence
    rng = np.random.default_rng(seed)
    ours, twin = _twins(cls, kwargs, dtype, seed, I, H, ours_dev, torch_dev)
    x = rng.standard_normal((max(lengths), len(lengths), I)).astype(dtype)
    seq = pack_padded_sequence(x, list(lengths), enforce_sorted=False)
    seq = PackedSequence(_on(seq.data, ours_dev), seq.batch_sizes, seq.sorted_indices, seq.unsorted_indices)
    tx = torch.tensor(x, device=torch_dev, requires_grad=True)
    out, state = ours(seq)
    t_out, t_state = twin(torch_pack(tx, torch.tensor(lengths), enforce_sorted=False))
    lstm = cls.__name__ == "LSTM"
    states, t_states = (state if lstm else (state,)), (t_state if lstm else (t_state,))
    g_out = rng.standard_normal(t_out.data.shape).astype(dtype)
    t_out.data.backward(torch.tensor(g_out, device=torch_dev))
    dx, _ = ours.backward(_on(g_out, ours_dev))
    t_dx = torch_pack(tx.grad, torch.tensor(lengths), enforce_sorted=False).data   # packed as ours is
    pairs = [("output", out.data, t_out.data), ("grad_x", dx.data, t_dx)]
    pairs += [(f"state{k}", s, ts) for k, (s, ts) in enumerate(zip(states, t_states))]
    pairs += [(f"grad {k}", ours.grads[k], p.grad) for k, p in twin.named_parameters()]
    return _compare(pairs, dtype)


def train_check(dev, steps=5, seed=0):
    """A 2-layer LSTM fitted by SGD to a fixed target on `dev` and on the CPU (float64): the
    losses of every step must agree to 1e-10 and fall. Returns both loss lists."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, 4, 5))
    target = rng.standard_normal((8, 4, 6))
    losses = {}
    for where in ("cpu", dev):
        lstm = lstmkit.LSTM(5, 6, num_layers=2, dtype=np.float64, seed=seed).to(where)
        xd, td = _on(x, where), _on(target, where)
        run = []
        for _ in range(steps):
            out, _ = lstm(xd)
            diff = out - td
            run.append(float((diff * diff).sum()))
            lstm.zero_grad()
            lstm.backward(2 * diff)
            for name, p in lstm.named_parameters():
                p -= 0.01 * lstm.grads[name]
            lstm.bump_version()           # CuPy writes are not counted (module.py); harmless on the CPU
        losses[where] = run
    ours, ref = np.array(losses[dev]), np.array(losses["cpu"])
    if not (np.allclose(ours, ref, rtol=1e-10, atol=1e-10) and ours[-1] < ours[0]):
        raise AssertionError(f"losses on {dev} {ours.tolist()} vs cpu {ref.tolist()}")
    return {"losses": ours.tolist()}


MODULES = [
    ("LSTM", dict()),
    ("LSTM", dict(bias=False)),
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("LSTM", dict(proj_size=3)),
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3)),
    ("GRU", dict()),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True, bias=False)),
    ("RNN", dict(nonlinearity="tanh", num_layers=2)),
    ("RNN", dict(nonlinearity="relu", bidirectional=True)),
]


PACKED = [
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("GRU", dict(bidirectional=True)),
    ("RNN", dict()),
]


def cases(device, quick):
    """(name, dtype, thunk) for every check."""
    for dtype in (np.float64, np.float32):
        for name, kw in MODULES[: 3 if quick else None]:
            yield (f"{name}{kw}", dtype, lambda n=name, kw=kw, d=dtype:
                   check_module(getattr(lstmkit, n), kw, d, device, device))
        yield ("LSTM unbatched", dtype, lambda d=dtype: check_module(lstmkit.LSTM, {}, d, device, device,
                                                                    unbatched=True))
        for name, kw in PACKED[: 1 if quick else None]:
            yield (f"packed {name}{kw}", dtype, lambda n=name, kw=kw, d=dtype:
                   check_packed(getattr(lstmkit, n), kw, d, device, device))
        for cell in ("LSTMCell", "GRUCell", "RNNCell"):
            yield (cell, dtype, lambda c=cell, d=dtype: check_cell(getattr(lstmkit, c), d, device, device))
    yield ("train 5 SGD steps", np.float64, lambda: train_check(device))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", required=True, help="JSON lines file to write")
    ap.add_argument("--quick", action="store_true", help="3 module configurations instead of all")
    ap.add_argument("--reference", action="store_true", help="LSTMKIT_REFERENCE=1: the readable reference")
    args = ap.parse_args(argv)
    if args.reference:
        os.environ["LSTMKIT_REFERENCE"] = "1"
    passed = failed = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for name, dtype, thunk in cases(args.device, args.quick):
            start = time.perf_counter()
            row = {"case": name, "dtype": np.dtype(dtype).name, "reference": args.reference}
            try:
                row.update(ok=True, max_err=thunk())
            except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
                row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
            row["seconds"] = round(time.perf_counter() - start, 3)
            passed, failed = passed + row["ok"], failed + (not row["ok"])
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(("ok   " if row["ok"] else "FAIL ") + f"{row['dtype']:8s} {name}" +
                  ("" if row["ok"] else f"  {row['error'][:300]}"), flush=True)
        f.write(json.dumps({"summary": True, "passed": passed, "failed": failed}) + "\n")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
