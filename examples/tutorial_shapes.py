"""The shapes of a deep bidirectional LSTM with projection, as in the PyTorch tutorial, side by side.

    python examples/tutorial_shapes.py

    lstm = LSTM(input_size=128, hidden_size=256, num_layers=3, batch_first=True,
                bidirectional=True, proj_size=64)
    x (4, 6, 128) -> output (4, 6, 128), h_n (6, 4, 64), c_n (6, 4, 256)

Why these numbers:
    output  (N, L, D*P) = (4, 6, 2*64):   batch_first puts the batch first; each step concatenates
                                           the forward and the reverse direction's projected h.
    h_n     (D*num_layers, N, P) = (6, 4, 64):   one final h per layer and direction, projected;
                                                  batch_first never applies to h and c.
    c_n     (D*num_layers, N, H) = (6, 4, 256):  the cell state is never projected.
    layer 2 and 3 take D*P = 128 inputs, which is why weight_ih_l1 is (4H, 128) = (1024, 128).

When torch is installed, the same lines run in PyTorch with lstmkit's weights copied in, and the
largest difference between the two outputs is printed.

Shape letters: N batch (4), L sequence length (6), D directions (2), H hidden size (256),
P proj_size (64), I input size (128).
"""

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from lstmkit import LSTM  # noqa: E402


def main():
    rng = np.random.default_rng(0)
    lstm = LSTM(input_size=128, hidden_size=256, num_layers=3, batch_first=True,
                bidirectional=True, proj_size=64, seed=0)
    x = rng.standard_normal((4, 6, 128)).astype(np.float32)     # (N, L, I)
    h_0 = rng.standard_normal((6, 4, 64)).astype(np.float32)    # (D*num_layers, N, P)
    c_0 = rng.standard_normal((6, 4, 256)).astype(np.float32)   # (D*num_layers, N, H)
    output, (h_n, c_n) = lstm(x, (h_0, c_0))

    print("lstmkit")
    print(f"  input   {x.shape}")
    print(f"  output  {output.shape}")
    print(f"  h_n     {h_n.shape}")
    print(f"  c_n     {c_n.shape}")
    print(f"  weight_ih_l0 {lstm.weight_ih_l0.shape}, weight_ih_l1 {lstm.weight_ih_l1.shape}, "
          f"weight_hr_l0 {lstm.weight_hr_l0.shape}")

    try:
        import torch
    except ImportError:
        print("\n(torch is not installed: pip install torch to see the same lines in PyTorch)")
        return 0
    tl = torch.nn.LSTM(input_size=128, hidden_size=256, num_layers=3, batch_first=True,
                       bidirectional=True, proj_size=64)
    tl.load_state_dict({k: torch.from_numpy(v) for k, v in lstm.state_dict().items()})
    with torch.no_grad(), warnings.catch_warnings():
        # torch notes that its oneDNN path lacks projections and falls back: not our concern here
        warnings.filterwarnings("ignore", message="LSTM with projections")
        t_out, (t_h, t_c) = tl(torch.from_numpy(x), (torch.from_numpy(h_0), torch.from_numpy(c_0)))
    print("torch.nn.LSTM (same weights)")
    print(f"  output  {tuple(t_out.shape)}")
    print(f"  h_n     {tuple(t_h.shape)}")
    print(f"  c_n     {tuple(t_c.shape)}")
    diff = max(float(np.abs(a - b.numpy()).max()) for a, b in ((output, t_out), (h_n, t_h), (c_n, t_c)))
    print(f"  largest difference from lstmkit: {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
