"""`lstmkit classify train` (its defaults, on the built-in reviews) against the same model in plain
PyTorch, each ALONE in its own process, for the same training-time budgets; test accuracy on the
50,000 test reviews at each budget, and reviews per second.

    python benchmarks/classify_vs_torch.py                       # budgets 5 and 10 minutes, each side once
    python benchmarks/classify_vs_torch.py --budgets 1,2         # a quick look
    python benchmarks/classify_vs_torch.py --side torch --budgets 5,10   # one side, JSON lines

The recipe is ClassifyConfig's defaults (lstmkit/config.py): character vocabulary of the training
reviews seen at least twice plus an unknown symbol, embedding 128, a bidirectional LSTM of 128,
max-pooling over each review's real steps, linear head, cross-entropy, Adam 2e-3, gradient norm
clipped at 5, batches of 128 reviews of similar length as packed sequences, 2% of the training
reviews held out (seeded) and scored every 200 steps; the time spent validating counts towards the
budget on both sides. Both sides read the same batches in the same order (lstmkit's labelled.py and
tokenizers, which are NumPy and Python only: the torch process never imports lstmkit's layers).
At each budget the run is paused (untimed), the last state and the best-by-validation state are
scored on the test reviews, and training goes on.

torch's side: torch.nn.Embedding -> torch.nn.LSTM(128, 128, bidirectional=True) over
pack_padded_sequence(enforce_sorted=False) -> masked max over time -> torch.nn.Linear,
torch.optim.Adam, clip_grad_norm_, at torch's default threads.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def lstmkit_side(budgets):
    from lstmkit.classify_train import ClassifierTrainer, encode_texts, predict_proba
    from lstmkit.config import ClassifyConfig
    from lstmkit.labelled import read_labelled
    results, out_dir, done = [], os.path.join(tempfile.mkdtemp(), "run"), 0.0
    test = None
    for b in budgets:
        with open(os.devnull, "w") as null:
            t = ClassifierTrainer(ClassifyConfig(minutes=b, show=0) if not done else ClassifyConfig(), out_dir,
                                  resume=out_dir if done else None, overrides={"minutes": b - done} if done else None,
                                  progress=False, out=null, err=null)
            step_times = []
            orig = t._train_step

            def timed(orig=orig, step_times=step_times):
                t0 = time.perf_counter()
                loss = orig()
                step_times.append(time.perf_counter() - t0)
                return loss
            t._train_step = timed
            t.run()
        if test is None:
            test = read_labelled("nsmc-test", classes=t.classes)
            test_ids = encode_texts(t.tok, test.texts, t.cfg.max_len)
        from lstmkit.checkpoint import load_checkpoint
        from lstmkit.classifier import SequenceClassifier
        acc = {}
        for which in ("last", "best"):
            model = load_checkpoint(out_dir, which=which, format=SequenceClassifier.FORMAT)[0]
            acc[which] = float(np.mean(predict_proba(model, test_ids).argmax(axis=1) == test.labels))
        tokens = sum(len(t.train_ids[i]) for i in range(len(t.train_ids))) / len(t.train_ids)
        rps = len(step_times) * t.cfg.batch_size / sum(step_times)
        results.append({"side": "lstmkit", "minutes": b, "steps": t.step, "reviews_per_s": rps,
                        "tokens_per_s": rps * tokens, "val_accuracy": t.last_val, "best_val_accuracy": t.best_val,
                        "test_accuracy_last": acc["last"], "test_accuracy_best": acc["best"]})
        done = b
    assert "torch" not in sys.modules
    return results


def _torch_model(V, cfg):
    import torch
    torch.manual_seed(cfg.seed)
    emb = torch.nn.Embedding(V, cfg.embed_size)
    rnn = torch.nn.LSTM(cfg.embed_size, cfg.hidden_size, cfg.num_layers, bidirectional=cfg.bidirectional)
    head = torch.nn.Linear(cfg.hidden_size * (2 if cfg.bidirectional else 1), 2)
    return torch.nn.ModuleDict({"emb": emb, "rnn": rnn, "head": head})


def _torch_logits(m, seqs):
    import torch
    lengths = torch.tensor([len(s) for s in seqs])
    T = int(lengths.max())
    ids = torch.zeros((T, len(seqs)), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[:len(s), j] = torch.from_numpy(s)
    packed = torch.nn.utils.rnn.pack_padded_sequence(m["emb"](ids), lengths, enforce_sorted=False)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(m["rnn"](packed)[0], total_length=T)
    valid = (torch.arange(T)[:, None] < lengths[None, :])[:, :, None]
    return m["head"](out.masked_fill(~valid, -torch.inf).max(dim=0).values)


def _torch_accuracy(m, seqs, labels):
    import torch
    order = np.argsort([len(s) for s in seqs], kind="stable")
    pred = np.empty(len(seqs), dtype=np.int64)
    m.eval()
    with torch.no_grad():
        for i in range(0, len(order), 256):
            idx = order[i:i + 256]
            pred[idx] = _torch_logits(m, [seqs[j] for j in idx]).argmax(dim=1).numpy()
    m.train()
    return float(np.mean(pred == labels))


def torch_side(budgets):
    import copy

    import torch

    from lstmkit.config import ClassifyConfig
    from lstmkit.labelled import bucket_batches, read_labelled, split_validation
    from lstmkit.tokenizers import build_tokenizer
    cfg = ClassifyConfig()
    data = read_labelled(cfg.data)
    train_rows, val_rows = split_validation(len(data.texts), cfg.val_frac, cfg.seed)
    tok = build_tokenizer(cfg.tokenizer, "\n".join(data.texts[i] for i in train_rows), cfg.min_count, unknown=True)
    enc = lambda texts: [tok.encode(t)[:cfg.max_len] for t in texts]
    train_ids, train_y = enc([data.texts[i] for i in train_rows]), data.labels[train_rows]
    val_ids, val_y = enc([data.texts[i] for i in val_rows]), data.labels[val_rows]
    test = read_labelled("nsmc-test", classes=data.classes)
    test_ids = enc(test.texts)
    lengths = np.array([len(s) for s in train_ids])
    m = _torch_model(tok.vocab_size, cfg)
    opt = torch.optim.Adam(m.parameters(), lr=cfg.lr)
    per_epoch = int(np.ceil(len(train_ids) / cfg.batch_size))
    step, elapsed, step_times, best, best_state, results = 0, 0.0, [], None, None, []
    for b in budgets:
        while elapsed < b * 60:
            epoch, chunk = divmod(step, per_epoch)
            if chunk == 0:
                order = bucket_batches(lengths, cfg.batch_size, np.random.default_rng([cfg.seed, epoch]))
            rows = order[chunk]
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(_torch_logits(m, [train_ids[i] for i in rows]),
                                                     torch.from_numpy(train_y[rows]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            dt = time.perf_counter() - t0
            step_times.append(dt)
            elapsed += dt
            if step % cfg.eval_every == 0 or elapsed >= b * 60:
                t1 = time.perf_counter()
                val = _torch_accuracy(m, val_ids, val_y)
                if best is None or val > best:
                    best, best_state = val, copy.deepcopy(m.state_dict())
                elapsed += time.perf_counter() - t1
        last = _torch_accuracy(m, test_ids, test.labels)
        now = copy.deepcopy(m.state_dict())
        m.load_state_dict(best_state)
        best_test = _torch_accuracy(m, test_ids, test.labels)
        m.load_state_dict(now)
        rps = len(step_times) * cfg.batch_size / sum(step_times)
        results.append({"side": "torch", "minutes": b, "steps": step, "reviews_per_s": rps,
                        "tokens_per_s": rps * float(lengths.mean()), "val_accuracy": val, "best_val_accuracy": best,
                        "test_accuracy_last": last, "test_accuracy_best": best_test,
                        "threads": torch.get_num_threads()})
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=("lstmkit", "torch"), help="run one side here and print JSON lines")
    p.add_argument("--budgets", default="5,10", help="training minutes at which to score (default 5,10)")
    a = p.parse_args()
    budgets = [float(x) for x in a.budgets.split(",")]
    if a.side:
        for r in (lstmkit_side if a.side == "lstmkit" else torch_side)(budgets):
            print(json.dumps(r), flush=True)
        return
    rows = []
    for side in ("lstmkit", "torch"):
        out = subprocess.run([sys.executable, __file__, "--side", side, "--budgets", a.budgets],
                             capture_output=True, text=True, check=True).stdout
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for r in rows[-len(budgets):]:
            print(json.dumps(r), flush=True)
    print("\n| side | minutes | steps | reviews/s | tokens/s | test acc. (last) | test acc. (best val) |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['minutes']:g} | {r['steps']} | {r['reviews_per_s']:,.0f} | "
              f"{r['tokens_per_s']:,.0f} | {100 * r['test_accuracy_last']:.2f}% | {100 * r['test_accuracy_best']:.2f}% |")


if __name__ == "__main__":
    main()
