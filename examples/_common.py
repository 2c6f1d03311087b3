"""Small helpers shared by the examples: device choice, seeding, the LSTM backend switch, a
dependency-free progress bar and the final JSON line."""
import json
import os
import random
import sys
import time

import torch
from torch import nn

import lstm_fused


def pick_device(name=None):
    """The --device argument, defaulting to CUDA when there is one."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def lstm_class(backend):
    """--backend fused -> lstm_fused.LSTM, --backend torch -> torch.nn.LSTM.

    The two take the same arguments and initialise the same parameters, with the same names, in
    the same order, from the same random stream: built after the same torch.manual_seed they hold
    identical weights (and their state_dicts load into each other).
    """
    return {"fused": lstm_fused.LSTM, "torch": nn.LSTM}[backend]


def print_metrics(metrics, out_dir=None):
    """The last line of stdout: the run's final metrics as one JSON object (also written to
    out_dir/metrics.json when out_dir is given)."""
    line = json.dumps(metrics, sort_keys=True)
    if out_dir is not None:
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            f.write(line + "\n")
    print(line, flush=True)


class Progress:
    """A minimal progress bar on stderr.

        bar = Progress(total=1000, desc="train")
        for step in range(1000):
            ...
            bar.update(step + 1, loss=f"{loss:.3f}")
        bar.close()

    On a terminal it redraws one line with '\\r' (at most 10 times a second); when stderr is a file
    or a pipe it prints a plain line every 10% instead, so logs stay readable.
    """

    def __init__(self, total, desc="", enabled=True, start=0):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.tty = sys.stderr.isatty()
        self.start_time = self.last_draw = time.perf_counter()
        self.start_step = self.last_step = start
        self.next_line = start + max(1, total // 10)

    def update(self, step, **fields):
        if not self.enabled:
            return
        now = time.perf_counter()
        self.last_step = step
        if self.tty:
            if now - self.last_draw < 0.1 and step < self.total:
                return
            self.last_draw = now
            sys.stderr.write("\r" + self._line(step, now, fields) + "\033[K")
            sys.stderr.flush()
        elif step >= self.next_line or step == self.total:
            self.next_line = step + max(1, self.total // 10)
            sys.stderr.write(self._line(step, now, fields) + "\n")
            sys.stderr.flush()

    def write(self, message):
        """Prints a message on its own line(s), above the bar."""
        if self.enabled:
            sys.stderr.write(("\r\033[K" if self.tty else "") + message + "\n")
            sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _line(self, step, now, fields):
        width = 24
        done = int(width * step / max(self.total, 1))
        elapsed = now - self.start_time
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        extra = "".join(f" {key}={value}" for key, value in fields.items())
        return (f"{self.desc} [{'#' * done}{'.' * (width - done)}] {step}/{self.total}"
                f" {_clock(elapsed)}<{_clock(eta)}{extra}")


def _clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes:d}:{seconds:02d}"
