"""The main job (`lstmkit train` on 무정 with its defaults) against the same recipe in plain PyTorch,
each ALONE in its own process (lstmkit's without torch imported), for the same training-time budget.

    python benchmarks/main_job_vs_torch.py                      # 8 minutes each, lstmkit then torch
    python benchmarks/main_job_vs_torch.py --minutes 2 --rounds 2   # A B A B
    python benchmarks/main_job_vs_torch.py --side torch --minutes 8  # one side, one JSON line

The recipe, from lstmkit/config.py: character tokenizer, embedding E = H = 256, a 2-layer LSTM with
dropout 0.3 between the layers, linear head, softmax cross-entropy, Adam 3e-3, gradient norm
clipped at 5, B = 32 streams of T = 64 (h and c carried between chunks), the last 5% of the text
held out. Both sides validate every 100 steps on that text read as one stream (as `lstmkit eval`
does), and the time spent validating counts towards the budget on both; lstmkit prints no samples
here (--sample-every 0 --sample-length 0), the only difference from the main job as users run it.
Reported: steps, training tokens per second (training steps only), final and best validation
bits per character.

torch's side: torch.nn.Embedding -> torch.nn.LSTM(256, 256, 2, dropout=0.3) -> torch.nn.Linear,
torch.optim.Adam, torch.nn.utils.clip_grad_norm_, at torch's default threads for this machine.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

RECIPE = dict(hidden_size=256, num_layers=2, dropout=0.3, batch_size=32, seq_len=64, lr=3e-3, grad_clip=5.0,
              val_frac=0.05, eval_every=100, seed=1234)


def lstmkit_side(minutes, data):
    import tempfile

    from lstmkit.config import TrainConfig
    from lstmkit.train import Trainer
    cfg = TrainConfig(data=data, minutes=minutes, sample_every=0, sample_length=0)
    for k in ("hidden_size", "num_layers", "dropout", "batch_size", "seq_len", "grad_clip", "val_frac",
              "eval_every", "seed"):
        assert getattr(cfg, k) == RECIPE[k], f"the main job's {k} changed: update RECIPE"
    assert cfg.effective_lr == RECIPE["lr"] and cfg.optimizer == "adam"
    step_times = []
    with tempfile.TemporaryDirectory() as d, open(os.devnull, "w") as null:
        t = Trainer(cfg, os.path.join(d, "run"), progress=False, out=null, err=null)
        orig = t._train_step

        def timed():
            t0 = time.perf_counter()
            loss = orig()
            step_times.append(time.perf_counter() - t0)
            return loss
        t._train_step = timed
        res = t.run()
        vals = t.history["val_bpc"]
    return {"side": "lstmkit", "steps": res["step"], "train_s": sum(step_times),
            "tokens_per_s": len(step_times) * cfg.batch_size * cfg.seq_len / sum(step_times),
            "val_bpc": vals[-1], "best_val_bpc": min(vals), "vocab": t.tok.vocab_size}


def torch_side(minutes, data):
    import numpy as np
    import torch

    from lstmkit.data import BatchStream, read_text, split_train_val, stream_chunks
    from lstmkit.tokenizers import build_tokenizer
    r = RECIPE
    torch.manual_seed(r["seed"])
    text = read_text(data)
    tok = build_tokenizer("char", text)
    train_ids, val_ids = split_train_val(tok.encode(text), r["val_frac"])
    tokens_per_char = len(val_ids) / len(tok.decode(val_ids))
    V, H, L = tok.vocab_size, r["hidden_size"], r["num_layers"]
    emb, lstm, head = torch.nn.Embedding(V, H), torch.nn.LSTM(H, H, L, dropout=r["dropout"]), torch.nn.Linear(H, V)
    params = [*emb.parameters(), *lstm.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=r["lr"])

    def validate():
        lstm.eval()
        total, state = 0.0, None
        with torch.no_grad():
            for x, y in stream_chunks(val_ids, 512):
                out, state = lstm(emb(torch.from_numpy(x)), state)
                z = head(out).reshape(-1, V)
                total += torch.nn.functional.cross_entropy(z, torch.from_numpy(y).reshape(-1), reduction="sum").item()
        lstm.train()
        return total / (len(val_ids) - 1) / math.log(2) * tokens_per_char

    stream = BatchStream(train_ids, r["batch_size"], r["seq_len"])
    state, step, elapsed, step_times, vals = None, 0, 0.0, [], []
    while elapsed < minutes * 60:
        t0 = time.perf_counter()
        x, y, start = stream.next()
        state = None if start or state is None else tuple(s.detach() for s in state)
        opt.zero_grad()
        out, state = lstm(emb(torch.from_numpy(x)), state)
        loss = torch.nn.functional.cross_entropy(head(out).reshape(-1, V), torch.from_numpy(y).reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r["grad_clip"])
        opt.step()
        step += 1
        dt = time.perf_counter() - t0
        step_times.append(dt)
        elapsed += dt
        if step % r["eval_every"] == 0 or elapsed >= minutes * 60:
            t1 = time.perf_counter()
            vals.append(validate())
            elapsed += time.perf_counter() - t1
    return {"side": "torch", "steps": step, "train_s": sum(step_times),
            "tokens_per_s": step * r["batch_size"] * r["seq_len"] / sum(step_times),
            "val_bpc": vals[-1], "best_val_bpc": min(vals), "vocab": V, "threads": torch.get_num_threads(),
            "median_step_s": float(np.median(step_times))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=("lstmkit", "torch"), help="run one side here and print its JSON line")
    p.add_argument("--minutes", type=float, default=8.0, help="training-time budget of each run (default 8)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each side, taken in turn A B A B")
    p.add_argument("--data", default="mujeong")
    a = p.parse_args()
    if a.side:
        fn = lstmkit_side if a.side == "lstmkit" else torch_side
        print(json.dumps(fn(a.minutes, a.data)))
        return
    results = []
    for rnd in range(a.rounds):
        for side in ("lstmkit", "torch"):
            out = subprocess.run([sys.executable, __file__, "--side", side, "--minutes", str(a.minutes),
                                  "--data", a.data], capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n| side | round | steps | tokens/s | final val bits/char | best val bits/char |\n|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        print(f"| {r['side']} | {i // 2 + 1} | {r['steps']} | {r['tokens_per_s']:,.0f} | {r['val_bpc']:.3f} | "
              f"{r['best_val_bpc']:.3f} |")


if __name__ == "__main__":
    main()
