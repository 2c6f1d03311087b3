"""Forecasting a sine wave with lstm_fused.LSTM.

A (by default slightly noisy) sine series is cut into windows; an LSTM regressor (lstm_fused.LSTM
followed by a Linear layer) learns to predict each next value. It is then evaluated on a held-out
segment at the end of the series two ways:

  * one step ahead: each prediction sees the true history (the last --window values);
  * autoregressively: after a warm-up on the true values just before the segment, the model is
    fed its own predictions, carrying its LSTM state (h, c) from step to step, for the whole
    segment.

Both are plotted against the truth in DIR/sine_forecast.png (needs matplotlib).

    python examples/sine.py                      # lstm_fused.LSTM
    python examples/sine.py --backend torch      # the same on torch.nn.LSTM, same initial weights
    python examples/sine.py --noise 0 --steps 300 --out /tmp/sine

Progress goes to stderr; the last line on stdout is the final metrics as JSON.
"""
import argparse
import math
import os
import sys
import time

import torch
from torch import nn

from _common import Progress, lstm_class, pick_device, print_metrics, seed_everything


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--length", type=int, default=2000, help="number of samples in the series")
    data.add_argument("--period", type=float, default=50.0, help="samples per sine cycle")
    data.add_argument("--noise", type=float, default=0.05,
                      help="standard deviation of the Gaussian noise added to the sine (0: clean)")
    data.add_argument("--holdout", type=int, default=300,
                      help="held-out samples at the end of the series, never trained on")
    data.add_argument("--window", type=int, default=50, help="input window length")
    model = p.add_argument_group("model")
    model.add_argument("--backend", choices=["fused", "torch"], default="fused",
                       help="fused: lstm_fused.LSTM; torch: torch.nn.LSTM (same initial weights)")
    model.add_argument("--hidden", type=int, default=32, help="LSTM hidden size")
    model.add_argument("--layers", type=int, default=1, help="LSTM layers")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; None: cuda if "
                       "available, else cpu")
    train.add_argument("--out", default="results/sine", help="directory for the plot and metrics")
    train.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    return p.parse_args(argv)


def make_series(length, period, noise, seed):
    """(observed, clean): the sine wave with and without the noise, float32 [length]."""
    t = torch.arange(length, dtype=torch.float64)
    clean = torch.sin(2 * math.pi * t / period)
    generator = torch.Generator().manual_seed(seed)
    observed = clean + noise * torch.randn(length, generator=generator, dtype=torch.float64)
    return observed.float(), clean.float()


def windows(series, length):
    """All windows of `length` consecutive values: [len(series) - length + 1, length]."""
    return series.unfold(0, length, 1)


class Regressor(nn.Module):
    """x [B, T] -> the prediction of the next value after each step, [B, T]."""

    def __init__(self, hidden, layers, backend):
        super().__init__()
        self.lstm = lstm_class(backend)(input_size=1, hidden_size=hidden, num_layers=layers,
                                        batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, state=None):
        output, state = self.lstm(x.unsqueeze(-1), state)  # output: [B, T, hidden]
        return self.head(output).squeeze(-1), state


@torch.no_grad()
def forecast(model, history, horizon):
    """Autoregressive forecast: warm up on `history` [T], then feed back each prediction."""
    prediction, state = model(history[None])  # batch of one sequence
    value = prediction[:, -1:]                 # the prediction for the step after `history`
    forecasts = [value]
    for _ in range(horizon - 1):
        value, state = model(value, state)     # one step: the model's own output becomes its input
        forecasts.append(value)
    return torch.cat(forecasts, dim=1)[0]


def plot(path, observed, clean, one_step, autoregressive, start, metrics):
    try:
        import matplotlib
    except ImportError:
        sys.exit("sine.py: the plot needs matplotlib: pip install matplotlib (or pass --no-plot)")
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = range(start, start + len(observed))
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=90)
    ax.plot(steps, observed, ".", color="0.55", markersize=3, label="observed (held out)")
    ax.plot(steps, clean, color="0.3", linewidth=0.8, label="clean sine")
    ax.plot(steps, one_step, color="tab:blue", linewidth=1.2,
            label=f"one step ahead (MSE {metrics['test_mse']:.4f})")
    ax.plot(steps, autoregressive, "--", color="tab:red", linewidth=1.4,
            label=f"autoregressive (MSE {metrics['forecast_mse']:.4f})")
    ax.set_xlabel("sample")
    ax.set_title(f"sine forecast on the held-out segment ({metrics['backend']} LSTM, "
                 f"{metrics['steps']} steps)")
    ax.legend(loc="lower left", fontsize=8, ncol=2)
    ax.set_ylim(-1.6, 1.6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    seed_everything(args.seed)

    # Data: train on everything before the held-out segment.
    observed, clean = make_series(args.length, args.period, args.noise, args.seed)
    split = args.length - args.holdout
    if split < args.window + 1 or args.holdout < 1:
        sys.exit("sine.py: --length must exceed --holdout by more than --window")
    # Each window of window+1 values is one example: the first `window` values are the input,
    # the same shifted by one are the targets (the next value after every step).
    train_windows = windows(observed[:split], args.window + 1).to(device)

    # The model. Built right after seeding, lstm_fused.LSTM and nn.LSTM get the same weights.
    torch.manual_seed(args.seed)
    model = Regressor(args.hidden, args.layers, args.backend).to(device)
    initial_checksum = sum(p.double().sum().item() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.MSELoss()

    # Training: random minibatches of windows, drawn from a generator of their own.
    batches = torch.Generator().manual_seed(args.seed)
    progress = Progress(args.steps, desc=f"sine/{args.backend}")
    start = time.perf_counter()
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(args.steps):
        index = torch.randint(len(train_windows), (args.batch_size,), generator=batches)
        batch = train_windows[index.to(device)]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        prediction, _ = model(inputs)
        loss = loss_fn(prediction, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.update(step + 1, loss=f"{loss.item():.5f}")
    progress.close()
    train_seconds = time.perf_counter() - start

    # Evaluation on the held-out segment.
    model.eval()
    with torch.no_grad():
        # One step ahead: for each held-out value, the window of true values just before it.
        contexts = windows(observed[split - args.window:-1], args.window).to(device)
        one_step = model(contexts)[0][:, -1].cpu()
        autoregressive = forecast(model, observed[split - args.window:split].to(device),
                                  args.holdout).cpu()
    truth = observed[split:]
    metrics = {
        "example": "sine",
        "backend": args.backend,
        "device": str(device),
        "steps": args.steps,
        "seed": args.seed,
        "initial_param_checksum": initial_checksum,
        "train_loss": loss.item(),  # MSE of the last training batch
        "test_mse": nn.functional.mse_loss(one_step, truth).item(),
        "forecast_mse": nn.functional.mse_loss(autoregressive, truth).item(),
        "forecast_mse_vs_clean": nn.functional.mse_loss(autoregressive, clean[split:]).item(),
        "noise_variance": args.noise ** 2,  # the best any predictor can do against `observed`
        "holdout": args.holdout,
        "train_seconds": round(train_seconds, 3),
    }
    if not args.no_plot:
        metrics["plot"] = os.path.join(args.out, "sine_forecast.png")
        plot(metrics["plot"], truth, clean[split:], one_step, autoregressive, split, metrics)
        print(f"plot: {metrics['plot']}", file=sys.stderr)
    print_metrics(metrics, args.out)


if __name__ == "__main__":
    main()
