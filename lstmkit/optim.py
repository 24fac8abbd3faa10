"""Optimizers (torch.optim's update rules, so that runs can be compared step for step), gradient
clipping and learning-rate decay.  Parameters and gradients are dicts name -> array; every update
is done in place on the live parameter arrays.

For each parameter p with gradient g, at step t = 1, 2, ... and learning rate lr:
    SGD:      buf = μ buf + g;                  p -= lr buf          (μ = 0: p -= lr g)
    Adagrad:  s += g²;                          p -= lr g / (√s + ε)
    RMSprop:  v = α v + (1-α) g²;               p -= lr g / (√v + ε)
    Adam:     m = β1 m + (1-β1) g;  v = β2 v + (1-β2) g²;
              p -= (lr / (1-β1^t)) m / (√v / √(1-β2^t) + ε)
Weight decay wd (on weight matrices and embeddings, never biases: parameters with 2 or more axes):
    Adam:     decoupled, as torch.optim.AdamW:  p -= lr wd p  before the update above
    others:   L2, as torch.optim's weight_decay: g = g + wd p   before the update
Clipping, before the update:
    by global norm:  ‖g‖ = √(Σ_p Σ g²);  if ‖g‖ > c: g *= c / ‖g‖        (all parameters together)
    elementwise:     g = clip(g, -c, c)                                    (min-char-rnn's)
Learning-rate schedules, t = updates already done, W warm-up steps, progress u in [0, 1] (the
share of the run's budget used after warm-up, in steps or in time):
    warm-up (t < W):  lr_t = lr · (t + 1) / W
    constant:         lr_t = lr
    step:             lr_t = lr · decay^⌊t / every⌋
    cosine:           lr_t = min_lr + (lr - min_lr) · (1 + cos(π u)) / 2
"""

from __future__ import annotations

import math

import numpy as np

from . import optim_fused


class Optimizer:
    """Base: `slots` names the per-parameter state arrays, created zeroed like the parameter."""

    name = ""
    slots: tuple[str, ...] = ()

    decoupled_decay = False     # AdamW's p -= lr wd p instead of torch's L2 (g += wd p)

    def __init__(self, params: dict, lr: float, weight_decay: float = 0.0):
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"learning rate must be a number > 0, got {lr}")
        self.params = params
        self.lr = lr
        self.weight_decay = weight_decay
        self.t = 0
        self.state = {slot: {k: np.zeros_like(p) for k, p in params.items()} for slot in self.slots}

    def step(self, grads: dict, lr: float | None = None) -> None:
        self.t += 1
        lr = self.lr if lr is None else lr
        for k, p in self.params.items():
            g = grads[k]
            if self.weight_decay and p.ndim >= 2:
                if self.decoupled_decay:
                    p *= 1.0 - lr * self.weight_decay
                else:
                    g = g + self.weight_decay * p
            self._update(k, p, g, lr)

    def _update(self, k, p, g, lr):
        raise NotImplementedError

    # state as arrays (safetensors) + scalars (JSON)
    def state_arrays(self) -> dict:
        return {f"{slot}.{k}": a for slot, d in self.state.items() for k, a in d.items()}

    def state_meta(self) -> dict:
        return {"name": self.name, "t": self.t, "lr": self.lr}

    def load_state(self, arrays: dict, meta: dict) -> None:
        if not isinstance(meta, dict):
            raise ValueError(f"optimizer state must be a dict with name, t and lr, got {meta!r}")
        if meta.get("name") != self.name:
            raise ValueError(f"optimizer state is for {meta.get('name')!r}, not {self.name!r}")
        for slot, d in self.state.items():
            for k, a in d.items():
                key = f"{slot}.{k}"
                if key not in arrays:
                    raise ValueError(f"optimizer state lacks {key!r}")
                if tuple(arrays[key].shape) != a.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {tuple(arrays[key].shape)}, "
                                     f"expected {a.shape}")
                if not np.isfinite(arrays[key]).all():
                    raise ValueError(f"optimizer state {key!r} holds non-finite values")
        t = meta.get("t")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"optimizer step t must be an integer >= 0, got {t!r}")
        for slot, d in self.state.items():       # only now that every value has passed
            for k, a in d.items():
                a[...] = arrays[f"{slot}.{k}"]
        self.t = t


class SGD(Optimizer):
    name = "sgd"

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        self.momentum = momentum
        self.slots = ("momentum",) if momentum > 0 else ()
        super().__init__(params, lr, weight_decay)

    def _update(self, k, p, g, lr):
        if self.momentum > 0:
            buf = self.state["momentum"][k]
            buf *= self.momentum
            buf += g
            p -= lr * buf
        else:
            p -= lr * g


class Adagrad(Optimizer):
    name = "adagrad"
    slots = ("sum",)

    def __init__(self, params, lr, eps=1e-10, weight_decay=0.0):
        super().__init__(params, lr, weight_decay)
        self.eps = eps

    def _update(self, k, p, g, lr):
        s = self.state["sum"][k]
        s += g * g
        p -= lr * g / (np.sqrt(s) + self.eps)


class RMSprop(Optimizer):
    name = "rmsprop"
    slots = ("square_avg",)

    def __init__(self, params, lr, alpha=0.99, eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr, weight_decay)
        self.alpha, self.eps = alpha, eps

    def _update(self, k, p, g, lr):
        v = self.state["square_avg"][k]
        v *= self.alpha
        v += (1.0 - self.alpha) * g * g
        p -= lr * g / (np.sqrt(v) + self.eps)


class Adam(Optimizer):
    name = "adam"
    slots = ("exp_avg", "exp_avg_sq")
    decoupled_decay = True

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr, weight_decay)
        self.beta1, self.beta2 = betas
        self.eps = eps

    def _update(self, k, p, g, lr):
        m, v = self.state["exp_avg"][k], self.state["exp_avg_sq"][k]
        bc1 = 1.0 - self.beta1 ** self.t
        bc2 = 1.0 - self.beta2 ** self.t
        if optim_fused.adam_update(p, g, m, v, self.beta1, self.beta2, lr / bc1, 1.0 / math.sqrt(bc2), self.eps):
            return     # the same update in one compiled pass (optim_fused.py); below, the readable form
        m *= self.beta1
        m += (1.0 - self.beta1) * g
        v *= self.beta2
        v += (1.0 - self.beta2) * g * g
        denom = np.sqrt(v) / math.sqrt(bc2)
        denom += self.eps
        p -= (lr / bc1) * m / denom


def make_optimizer(name: str, params: dict, lr: float, momentum: float = 0.9, *, betas=(0.9, 0.999),
                   weight_decay: float = 0.0) -> Optimizer:
    if name == "sgd":
        return SGD(params, lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adagrad":
        return Adagrad(params, lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return RMSprop(params, lr, weight_decay=weight_decay)
    if name == "adam":
        return Adam(params, lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of sgd, adagrad, rmsprop, adam, got {name!r}")


def global_norm(grads: dict) -> float:
    return math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most max_norm; returns the norm before."""
    norm = global_norm(grads)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= scale
    return norm


def clip_grad_value(grads: dict, clip: float) -> None:
    """Clip every gradient element into [-clip, clip]."""
    for g in grads.values():
        np.clip(g, -clip, clip, out=g)


def decayed_lr(lr: float, step: int, decay: float, every: int) -> float:
    """lr · decay^⌊step / every⌋ (step counts the updates already done)."""
    return lr * decay ** (step // every)


def scheduled_lr(lr: float, step: int, schedule: str = "constant", *, warmup: int = 0, progress: float = 0.0,
                 decay: float = 1.0, every: int = 1, min_lr: float = 0.0) -> float:
    """The learning rate of update number step + 1 (see the module docstring); progress in [0, 1] is
    the share of the budget used after warm-up, which only the cosine schedule reads."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "step":
        return decayed_lr(lr, step, decay, every)
    if schedule == "cosine":
        u = min(max(progress, 0.0), 1.0)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * u))
    return lr
