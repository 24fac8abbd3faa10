"""lstmkit's language model against the same model in PyTorch: same initial weights, same batches,
same optimizer (Adam), same clipping, same number of steps, trained in lockstep (the side that
goes first alternates every step).  Reports the validation loss of each (they should agree within
1%) and the median-step training throughput of each.  Both libraries share this process, which
changes each one's speed: its throughput figures are a cross-check, not for quoting
(benchmarks/main_job_vs_torch.py times each side alone).

    python benchmarks/lm_vs_torch.py                            # Tiny Shakespeare, 1x256, 300 steps
    python benchmarks/lm_vs_torch.py --data mujeong --steps 200 --hidden-size 256

The PyTorch twin: torch.nn.Embedding(V, E) -> torch.nn.LSTM(E, H, L) -> torch.nn.Linear(H, V),
cross_entropy, torch.optim.Adam, torch.nn.utils.clip_grad_norm_; h and c carried (detached) from
chunk to chunk, exactly as the lstmkit trainer does.  torch uses the machine's cores as it likes.
"""

import argparse
import time

import numpy as np
import torch

from lstmkit.data import BatchStream, read_text, split_train_val, stream_chunks
from lstmkit.evaluate import evaluate
from lstmkit.model import LanguageModel
from lstmkit.optim import Adam, clip_grad_norm
from lstmkit.tokenizers import build_tokenizer


class TorchLM(torch.nn.Module):
    def __init__(self, V, E, H, L):
        super().__init__()
        self.embedding = torch.nn.Embedding(V, E)
        self.lstm = torch.nn.LSTM(E, H, L)
        self.decoder = torch.nn.Linear(H, V)

    def forward(self, ids, state=None):
        out, state = self.lstm(self.embedding(ids), state)
        return self.decoder(out), state


def torch_eval(t, ids, seq_len):
    """Nats per token over ids read as one stream, as lstmkit.evaluate does."""
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for x, y in stream_chunks(ids, seq_len):
            z, state = t(torch.from_numpy(x), state)
            total += torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), torch.from_numpy(y).reshape(-1),
                                                       reduction="sum").item()
            count += y.size
    return total / count


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()

    text = read_text(a.data)
    tok = build_tokenizer("char", text)
    train_ids, val_ids = split_train_val(tok.encode(text), 0.05)
    ours = LanguageModel(tok.vocab_size, a.hidden_size, a.num_layers, seed=a.seed)
    twin = TorchLM(tok.vocab_size, ours.embed_size, a.hidden_size, a.num_layers)
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.params.items()})
    opt = Adam(ours.params, a.lr)
    topt = torch.optim.Adam(twin.parameters(), lr=a.lr)
    print(f"{a.data}: V={tok.vocab_size} E=H={a.hidden_size} L={a.num_layers} T={a.seq_len} B={a.batch_size} "
          f"Adam lr {a.lr} clip {a.grad_clip}, {a.steps} steps; torch threads {torch.get_num_threads()}")

    # Both models train in lockstep on the same batches, the side that goes first alternating every
    # step, so both see the same machine conditions; step 0 of each is not timed (JIT, warm-up).
    stream = BatchStream(train_ids, a.batch_size, a.seq_len)
    state, tstate, t_ours, t_torch = None, None, [], []

    def ours_step(x, y, start):
        nonlocal state
        state = None if start else state
        ours.train()
        ours.zero_grad()
        _, state = ours.loss(x, y, state)
        ours.backward()
        clip_grad_norm(ours.grads, a.grad_clip)
        opt.step(ours.grads)

    def torch_step(x, y, start):
        nonlocal tstate
        tstate = None if start or tstate is None else tuple(s.detach() for s in tstate)
        twin.train()
        topt.zero_grad()
        z, tstate = twin(torch.from_numpy(x), tstate)
        tl = torch.nn.functional.cross_entropy(z.reshape(-1, tok.vocab_size), torch.from_numpy(y).reshape(-1))
        tl.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), a.grad_clip)
        topt.step()

    for step in range(a.steps):
        x, y, start = stream.next()
        sides = [(ours_step, t_ours), (torch_step, t_torch)]
        for fn, times in (sides if step % 2 == 0 else sides[::-1]):
            t0 = time.perf_counter()
            fn(x, y, start)
            if step > 0:
                times.append(time.perf_counter() - t0)
    val_ours, _ = evaluate(ours, val_ids, a.seq_len)
    twin.eval()
    val_torch = torch_eval(twin, val_ids, a.seq_len)

    tokens = a.batch_size * a.seq_len            # per step
    med_ours, med_torch = float(np.median(t_ours)), float(np.median(t_torch))
    rel = abs(val_ours - val_torch) / val_torch
    print(f"validation loss  lstmkit {val_ours:.4f} nats ({val_ours / np.log(2):.4f} bits/char)   "
          f"torch {val_torch:.4f} nats ({val_torch / np.log(2):.4f} bits/char)   difference {100 * rel:.2f}%")
    print(f"throughput (median step)  lstmkit {tokens / med_ours:,.0f} tokens/s   torch {tokens / med_torch:,.0f} "
          f"tokens/s   time ratio lstmkit/torch {med_ours / med_torch:.2f}")
    print("within 1%:", "yes" if rel < 0.01 else "NO")


if __name__ == "__main__":
    main()
