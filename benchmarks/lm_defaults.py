"""How the main job's defaults were chosen: training throughput of candidate model shapes on 무정,
and validation bits per character after a fixed time budget.

    python benchmarks/lm_defaults.py speed                 # tokens/s of each candidate (about 20 s each)
    python benchmarks/lm_defaults.py budget --minutes 2    # val bits/char of each after 2 minutes

Run by hand on an otherwise idle machine; numbers move with the machine's load.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from lstmkit.config import TrainConfig
from lstmkit.data import read_text
from lstmkit.model import LanguageModel
from lstmkit.optim import Adam
from lstmkit.tokenizers import build_tokenizer
from lstmkit.train import Trainer

CANDIDATES = [  # (tokenizer, hidden, layers, seq_len, batch)
    ("char", 256, 1, 64, 32),
    ("char", 384, 1, 64, 32),
    ("char", 512, 1, 64, 32),
    ("char", 256, 2, 64, 32),
    ("char", 256, 1, 64, 64),
    ("jamo", 256, 1, 64, 32),
]


def speed(seconds=15.0):
    text = read_text("mujeong")
    for kind, H, L, T, B in CANDIDATES:
        tok = build_tokenizer(kind, text)
        ids = tok.encode(text)
        m = LanguageModel(tok.vocab_size, H, L, seed=0)
        opt = Adam(m.params, 2e-3)
        rng = np.random.default_rng(0)
        n, t0, state = 0, None, None
        while t0 is None or time.perf_counter() - t0 < seconds:
            if n == 1:
                t0 = time.perf_counter()      # the first step compiles the kernels
            s = rng.integers(0, len(ids) - T - 1, B)
            x = np.stack([ids[i:i + T] for i in s], 1)
            y = np.stack([ids[i + 1:i + T + 1] for i in s], 1)
            m.zero_grad()
            m.loss(x, y, state)
            m.backward()
            opt.step(m.grads)
            n += 1
        dt = (time.perf_counter() - t0) / (n - 1)
        tps = T * B / dt
        cpt = len(text) / len(ids)
        print(f"{kind:5s} H={H:4d} L={L} T={T} B={B}: {dt * 1000:6.0f} ms/step, {tps:7.0f} tokens/s, "
              f"{tps * cpt:7.0f} chars/s", flush=True)


def budget(minutes, which=None):
    for i, (kind, H, L, T, B) in enumerate(CANDIDATES):
        if which and i not in which:
            continue
        cfg = TrainConfig(data="mujeong", tokenizer=kind, hidden_size=H, num_layers=L, seq_len=T, batch_size=B,
                          minutes=minutes, eval_every=10**9, sample_every=0, sample_length=0)
        with tempfile.TemporaryDirectory() as d, open(os.devnull, "w") as devnull:
            r = Trainer(cfg, d, progress=False, out=devnull).run()
        print(f"{kind:5s} H={H:4d} L={L} T={T} B={B}: {minutes:g} min -> step {r['step']}, "
              f"val {r['val']:.3f} bits/char", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["speed", "budget"])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--only", type=int, nargs="*", help="indices into CANDIDATES")
    a = p.parse_args()
    speed(a.seconds) if a.what == "speed" else budget(a.minutes, a.only)
    sys.exit(0)
