"""Why the LSTM exists: gradients through a plain RNN vanish with distance, through an LSTM's cell they need not.

    lstmkit gradient-flow [--out gradient_flow.png] [--lengths 5,20,50,100,200] [--steps 400] ...
    python -m lstmkit.gradient_flow --help

Two experiments, one figure (two panels) and two printed tables. Both use the hand-written backward
passes of lstmkit.RNN and lstmkit.LSTM; there is no autograd anywhere.

1. Gradient flow.  A loss L at the last step T of a sequence, and the norm of its gradient with
   respect to the hidden state k steps earlier, ‖∂L/∂h_{T-k}‖, for k = 0 .. K. Through the RNN,
       ∂L/∂h_{t-1} = ∂L/∂h_t · diag(1 - h_t²) · W_hh
   a product of k Jacobians, each of norm well below 1 at initialisation (the spectral radius of
   W_hh ~ U(-1/√H, 1/√H) is about 1/√3, and tanh' ≤ 1): it shrinks geometrically. Through the
   LSTM's cell the path is
       ∂L/∂c_{t-1} = ∂L/∂c_t ⊙ f_t  (+ terms through the gates)
   elementwise, with no matrix and no squashing: with forget gates near 1 it barely shrinks at all.

   How all K gradients come out of ONE backward call: h_{t-1} only reaches the loss through the
   pre-activations a_t of step t, a_t = x_t W_ih^T + h_{t-1} W_hh^T + b, so
       ∂L/∂h_{t-1} = ∂L/∂a_t W_hh      while      ∂L/∂x_t = ∂L/∂a_t W_ih.
   A copy of the network whose input weight is [W_ih | W_hh], fed [x_t, 0], computes exactly the
   same forward pass (the extra inputs are zero), and its input gradient's last H columns are
   ∂L/∂a_t W_hh = ∂L/∂h_{t-1}. (tests/test_gradient_flow.py checks this against restarting the
   network at step t and reading grad_h_0.)

2. Long-range memory.  A sequence of N one-hot symbols: the first is one of S "signal" symbols,
   the other N-1 are random "distractor" symbols; at the last step the network must name the first
   symbol (S-way softmax on h_T; chance is 1/S). An RNN and an LSTM of the same hidden size are
   trained with the same optimizer (Adam, clipped) for the same number of steps at each N. The RNN
   learns short N and falls to chance as N grows; the LSTM keeps up.

   The LSTM starts with "chrono" initialisation of its forget gate (Tallec & Ollivier, 2018):
   b_f = log u, u ~ U(1, N_max - 1), and b_i = -b_f. A cell whose forget gate is σ(b_f) = u/(1+u)
   keeps a memory for about 1 + u steps, so the cells start with time scales spread over 1..N_max.
   With PyTorch's default initialisation (b_f ≈ 0, so f ≈ 1/2) the LSTM's memory also halves every
   step at first, and at these short training budgets it stays at chance even at N = 20, where the
   RNN succeeds (`--lstm-init default` shows it). The forget gate is what makes the long path possible; its
   bias says how long the memory starts out.

Shape letters: N sequence length, B batch, S signal symbols (classes), I = 2S input size (signal
and distractor symbols), H hidden size, K largest distance k in the gradient plot.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .checkpoint import atomic_write, check_output
from .cli import Parser, write_output     # cli imports the lessons only inside main(): no cycle
from .config import LMError
from .model import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .modules import LSTM, RNN
from .optim import Adam, clip_grad_norm

KINDS = ("rnn", "lstm")
LABELS = {"rnn": "RNN", "lstm": "LSTM"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- the long-range memory task ----------------------------------------------------------------

def memory_task(rng, batch, length, symbols):
    """x (N, B, 2S) one-hot, y (B,): y is the first symbol; symbols S..2S-1 are distractors."""
    seq = rng.integers(symbols, 2 * symbols, size=(length, batch))
    y = rng.integers(0, symbols, size=batch)
    seq[0] = y
    x = np.zeros((length, batch, 2 * symbols))
    np.put_along_axis(x, seq[:, :, None], 1.0, axis=2)
    return x, y


class Classifier:
    """A recurrent net (lstmkit.RNN or lstmkit.LSTM) read out at its last step by a softmax layer.

        z = h_T W^T + b          (B, S)      L = -(1/B) Σ_b log softmax(z)[b, y_b]
        dz = (softmax(z) - onehot(y)) / B,   dW = dz^T h_T,   db = Σ_b dz,   ∂L/∂h_T = dz W
    """

    def __init__(self, kind, hidden_size, symbols, *, seed, lstm_init="chrono", t_max=100):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.H, self.S = kind, hidden_size, symbols
        net_seed, out_seed, chrono_seed = np.random.SeedSequence(seed).spawn(3)
        net_seed = int(net_seed.generate_state(1)[0])
        cls = LSTM if kind == "lstm" else RNN
        self.net = cls(2 * symbols, hidden_size, dtype=np.float64, seed=net_seed)
        if kind == "lstm" and lstm_init == "chrono":
            chrono_init(self.net, t_max, np.random.default_rng(chrono_seed))
        bound = 1.0 / np.sqrt(hidden_size)
        rng = np.random.default_rng(out_seed)
        self.W = rng.uniform(-bound, bound, (symbols, hidden_size))
        self.b = np.zeros(symbols)
        # live arrays: the optimizer updates them in place
        self.params = {"net." + k: p for k, p in self.net.named_parameters()}
        self.params.update({"out.weight": self.W, "out.bias": self.b})

    def logits(self, x):
        out, _ = self.net(x)
        return out[-1] @ self.W.T + self.b

    def loss_and_grads(self, x, y):
        """Forward and backward of one batch; returns the loss and the gradients (name -> array)."""
        out, _ = self.net(x)                                   # (N, B, H)
        h_T = out[-1]
        z = h_T @ self.W.T + self.b                            # (B, S)
        loss, ce_cache = softmax_cross_entropy_forward(z, y)
        dz = softmax_cross_entropy_backward(ce_cache)          # (B, S) = (softmax(z) - onehot(y)) / B
        dout = np.zeros_like(out)
        dout[-1] = dz @ self.W                                 # only the last step has a loss
        self.net.zero_grad()
        self.net.backward(dout)
        grads = {"net." + k: g for k, g in self.net.grads.items()}
        grads.update({"out.weight": dz.T @ h_T, "out.bias": dz.sum(axis=0)})
        return loss, grads

    def accuracy(self, x, y):
        return float(np.mean(self.logits(x).argmax(axis=1) == y))


def chrono_init(lstm, t_max, rng):
    """Forget-gate bias log u, u ~ U(1, t_max - 1), input-gate bias its negative (Tallec & Ollivier).

    Written into bias_ih (bias_hh's i and f blocks zeroed), so that b = b_ih + b_hh is as stated."""
    H = lstm.hidden_size
    b_f = np.log(rng.uniform(1.0, max(t_max - 1.0, 1.0 + 1e-6), size=H))
    lstm.bias_ih_l0[H:2 * H] = b_f
    lstm.bias_ih_l0[:H] = -b_f
    lstm.bias_hh_l0[:2 * H] = 0.0


def train(clf, length, steps, batch, lr, rng, clip=1.0):
    """Adam on fresh batches of the memory task; returns the list of losses."""
    opt = Adam(clf.params, lr)
    losses = []
    for _ in range(steps):
        x, y = memory_task(rng, batch, length, clf.S)
        loss, grads = clf.loss_and_grads(x, y)
        # Clipping keeps an occasional exploding RNN gradient from wrecking the run; it changes
        # nothing about which net can learn the task.
        clip_grad_norm(grads, clip)
        opt.step(grads)
        losses.append(loss)
    return losses


# ---- the gradient with respect to every earlier hidden state ------------------------------------

def hidden_state_grads(clf, x, y):
    """∂L/∂h_t for every t, the loss L being the readout's cross-entropy at the last step.

    x (N, B, I), y (B,) -> dh (N + 1, B, H): dh[j] = ∂L/∂h_{j-1}, so dh[0] is the gradient for the
    initial state h_0 and dh[N] the one for the last state. Uses the probe network described in
    the module docstring: one forward and one backward call of the real lstmkit module."""
    net = clf.net
    N, B, I = x.shape
    H = clf.H
    probe = (LSTM if clf.kind == "lstm" else RNN)(I + H, H, dtype=np.float64)
    state = net.state_dict()
    state["weight_ih_l0"] = np.concatenate([state["weight_ih_l0"], state["weight_hh_l0"]], axis=1)
    probe.load_state_dict(state)
    x_probe = np.concatenate([x, np.zeros((N, B, H))], axis=2)     # the extra inputs are zero
    out, _ = probe(x_probe)
    z = out[-1] @ clf.W.T + clf.b
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(B), y] -= 1.0
    dout = np.zeros_like(out)
    dout[-1] = (p / B) @ clf.W                                     # ∂L/∂h at the last step
    grad_x, grad_state = probe.backward(dout)
    grad_h0 = grad_state[0] if clf.kind == "lstm" else grad_state   # (1, B, H)
    dh = np.empty((N + 1, B, H))
    dh[0] = grad_h0[0]
    dh[1:N] = grad_x[1:, :, I:]        # ∂L/∂h_{t-1} = ∂L/∂a_t W_hh, read off the probe's input gradient
    dh[N] = dout[-1]
    return dh


def gradient_norms(clf, x, y):
    """‖∂L/∂h_{T-k}‖ / ‖∂L/∂h_T‖ for k = 0 .. N (norms over batch and hidden units together)."""
    dh = hidden_state_grads(clf, x, y)
    norms = np.sqrt((dh ** 2).sum(axis=(1, 2)))[::-1]           # index k = distance from the end
    return norms / norms[0]


# ---- the experiment ---------------------------------------------------------------------------

def run(lengths=(5, 20, 50, 100, 200), hidden_size=32, symbols=4, steps=400, batch_size=32, lr=0.01,
        k_max=300, eval_size=1000, seed=0, lstm_init="chrono", log=print):
    """Train both nets at each length, measure gradient flow; returns a dict of results."""
    lengths = sorted(lengths)
    t_max = max(max(lengths), 2)
    gen = np.random.SeedSequence(seed)
    seeds = gen.spawn(3)
    x_probe, y_probe = memory_task(np.random.default_rng(seeds[0]), 16, k_max + 1, symbols)
    res = {"lengths": lengths, "hidden_size": hidden_size, "symbols": symbols, "steps": steps,
           "k_max": k_max, "lstm_init": lstm_init, "accuracy": {k: [] for k in KINDS},
           "grad": {}, "seconds": {k: 0.0 for k in KINDS}}
    eval_rng = np.random.default_rng(seeds[1])
    evals = {n: memory_task(eval_rng, eval_size, n, symbols) for n in lengths}
    net_seed = int(seeds[2].generate_state(1)[0])
    for kind in KINDS:
        for n in lengths:
            # The same initial weights at every N, so that only the distance changes.
            clf = Classifier(kind, hidden_size, symbols, seed=net_seed, lstm_init=lstm_init, t_max=t_max)
            if n == lengths[0]:
                res["grad"][f"{kind} initialised"] = gradient_norms(clf, x_probe, y_probe)
            t0 = time.perf_counter()
            losses = train(clf, n, steps, batch_size, lr, np.random.default_rng([seed, n]))
            res["seconds"][kind] += time.perf_counter() - t0
            acc = clf.accuracy(*evals[n])
            res["accuracy"][kind].append(acc)
            log(f"  {LABELS[kind]:<4} N={n:<4d} accuracy {acc:6.1%}   final loss {np.mean(losses[-20:]):.3f}")
        res["grad"][f"{kind} trained (N={lengths[-1]})"] = gradient_norms(clf, x_probe, y_probe)
    return res


def format_tables(res):
    S = res["symbols"]
    lines = [f"Long-range memory: name the first of N symbols ({S} classes, chance {1 / S:.0%}); "
             f"hidden {res['hidden_size']}, {res['steps']} training steps at each N",
             f"{'N':>6}  {'RNN':>7}  {'LSTM':>7}"]
    for j, n in enumerate(res["lengths"]):
        lines.append(f"{n:>6}  {res['accuracy']['rnn'][j]:>7.1%}  {res['accuracy']['lstm'][j]:>7.1%}")
    names = list(res["grad"])
    lines += ["", "Gradient flow: ‖∂L/∂h_{T-k}‖ / ‖∂L/∂h_T‖", f"{'k':>6}  " + "  ".join(f"{n:>22}" for n in names)]
    K = res["k_max"]
    for k in sorted({1, 5, 10, 20, 50, 100, 200, 300, K} & set(range(K + 1))):
        lines.append(f"{k:>6}  " + "  ".join(f"{res['grad'][n][k]:>22.2e}" for n in names))
    return "\n".join(lines)


def plot(res, path, dpi=100):
    """Both experiments in one PNG of 1200 x 450 pixels (at dpi 100), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    colours = {"rnn": "tab:red", "lstm": "tab:blue"}
    tiny = np.finfo(np.float64).tiny   # a log axis cannot show an exact 0 (underflow)
    for name, g in res["grad"].items():
        kind = name.split()[0]
        ax1.semilogy(np.arange(len(g)), np.maximum(g, tiny), color=colours[kind],
                     linestyle="--" if "initialised" in name else "-", label=name.replace(kind, LABELS[kind]))
    ax1.set_xlabel("k (steps before the end)")
    ax1.set_ylabel("‖∂L/∂h$_{T-k}$‖ / ‖∂L/∂h$_T$‖")
    ax1.set_title("Gradient reaching the hidden state k steps back")
    ax1.set_ylim(bottom=max(1e-30, min(float(np.maximum(g, tiny).min()) for g in res["grad"].values())))
    ax1.grid(True, which="major", alpha=0.3)
    ax1.legend(fontsize=8)
    for kind in KINDS:
        ax2.plot(res["lengths"], res["accuracy"][kind], "o-", color=colours[kind], label=LABELS[kind])
    ax2.axhline(1.0 / res["symbols"], color="gray", linestyle=":", label="chance")
    ax2.set_xscale("log")
    ax2.set_xticks(res["lengths"], [str(n) for n in res["lengths"]])
    ax2.minorticks_off()
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("N (distance to remember)")
    ax2.set_ylabel("accuracy")
    ax2.set_title(f"Remember the first symbol for N steps ({res['steps']} training steps)")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


# ---- command line ---------------------------------------------------------------------------

def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 2, got {text!r}")
    return sorted(set(values))


def _positive(cast, minimum):
    def parse(text):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (v >= minimum) or not np.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {text!r}")
        return v
    return parse


def build_parser(prog="lstmkit gradient-flow"):
    p = Parser(prog=prog, description="Gradient flow through an RNN and an LSTM, and a long-range "
                "memory task on which the RNN fails as the distance grows. Writes one PNG and prints tables.")
    p.add_argument("--out", default="gradient_flow.png", help="PNG file to write (default: %(default)s)")
    p.add_argument("--lengths", type=_int_list, default=[5, 20, 50, 100, 200],
                   help="memory-task distances N, comma-separated (default: 5,20,50,100,200)")
    p.add_argument("--hidden-size", type=_positive(int, 1), default=32, help="hidden size of both nets (default: %(default)s)")
    p.add_argument("--symbols", type=_positive(int, 2), default=4, help="classes to remember (default: %(default)s)")
    p.add_argument("--steps", type=_positive(int, 0), default=400, help="training steps at each N (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive(int, 1), default=32, help="sequences per step (default: %(default)s)")
    p.add_argument("--lr", type=_positive(float, 1e-12), default=0.01, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--k-max", type=_positive(int, 1), default=300,
                   help="largest distance k in the gradient plot (default: %(default)s)")
    p.add_argument("--lstm-init", choices=("chrono", "default"), default="chrono",
                   help="LSTM forget-gate bias: chrono (spread over 1..max N) or PyTorch's default (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return p


def main(argv=None, prog="lstmkit gradient-flow"):
    """Command-line entry point; returns the exit code."""
    try:
        args = build_parser(prog).parse_args(argv)
        check_output(args.out, PNG_SIGNATURE, "a PNG file")
    except SystemExit as e:       # --help
        return int(e.code or 0)
    except LMError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _run_main(args, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _run_main(args, prog):
    t0 = time.perf_counter()
    print(f"Training an RNN and an LSTM (hidden {args.hidden_size}) on the memory task, "
          f"{args.steps} steps at each N in {args.lengths} ...", flush=True)
    res = run(args.lengths, args.hidden_size, args.symbols, args.steps, args.batch_size, args.lr,
              args.k_max, seed=args.seed, lstm_init=args.lstm_init,
              log=lambda s: print(s, flush=True))
    print()
    print(format_tables(res))
    if not write_output(prog, args.out, lambda: plot(res, args.out)):
        return 1
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
