"""A character-level language model on Shakespeare, with lstm_fused.LSTM as its recurrent layer.

    embedding -> lstm_fused.LSTM (2 layers) -> linear -> next-character logits

Training uses truncated backpropagation through time (TBPTT): the training text is cut into
--batch-size parallel streams, each read --seq-len characters at a time, and the LSTM state at the
end of one batch is the initial state of the next (detached, so gradients stop at the batch edge).
Gradients are clipped by norm, the learning rate follows a cosine decay, the validation loss is
reported in nats and bits per character, a checkpoint is written to --out, --resume continues
from it, and the model finally writes a sample of text.

    python examples/char_lm.py                                  # CPU-sized defaults
    python examples/char_lm.py --resume                         # continue an interrupted run
    python examples/char_lm.py --resume --steps 0 --sample 2000 --temperature 0.6 --prime "Ham.\\n"
    torchrun --nproc_per_node=2 examples/char_lm.py --out results/ddp  # DistributedDataParallel

Progress goes to stderr; the last line on stdout is the final metrics as JSON.
"""
import argparse
import gzip
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from _common import Progress, lstm_class, pick_device, print_metrics, seed_everything

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default=os.path.join(HERE, "data", "shakespeare.txt.gz"),
                      help="a text file, optionally gzipped")
    data.add_argument("--val-fraction", type=float, default=0.1,
                      help="fraction of the text held out for validation")
    data.add_argument("--split", choices=["blocks", "tail"], default="blocks",
                      help="blocks: every (1/val-fraction)-th block of --val-block characters is "
                      "validation, so every play is in both sets; tail: the end of the text is "
                      "validation (for the bundled corpus mostly a play never seen in training, "
                      "a harder test)")
    data.add_argument("--val-block", type=int, default=10_000,
                      help="block size of --split blocks, in characters")
    model = p.add_argument_group("model (taken from the checkpoint with --resume)")
    model.add_argument("--backend", choices=["fused", "torch"], default="fused",
                       help="fused: lstm_fused.LSTM; torch: torch.nn.LSTM (same state_dict)")
    model.add_argument("--embed", type=int, default=64, help="character embedding size")
    model.add_argument("--hidden", type=int, default=256, help="LSTM hidden size")
    model.add_argument("--layers", type=int, default=2, help="LSTM layers")
    model.add_argument("--dropout", type=float, default=0.0,
                       help="dropout between the LSTM layers and before the output layer")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=1200,
                       help="total optimizer steps (with --resume: up to this step)")
    train.add_argument("--batch-size", type=int, default=32, help="streams per process")
    train.add_argument("--seq-len", type=int, default=128, help="TBPTT length, in characters")
    train.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    train.add_argument("--min-lr", type=float, default=0.05,
                       help="final learning rate of the cosine decay, as a fraction of --lr")
    train.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    train.add_argument("--eval-every", type=int, default=200,
                       help="validate every this many steps (and at the end)")
    train.add_argument("--eval-chars", type=int, default=0,
                       help="validate on the first this many validation characters (0: all)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cpu, cuda, ...; None: cuda if available, "
                       "else cpu (under torchrun each process takes cuda:LOCAL_RANK)")
    train.add_argument("--out", default="results/char_lm",
                       help="directory for checkpoint.pt, metrics.json and sample.txt")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    sample = p.add_argument_group("sampling")
    sample.add_argument("--sample", type=int, default=600,
                        help="characters to generate at the end (0: none)")
    sample.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature: lower is more conservative, 0 is greedy")
    sample.add_argument("--prime", default="Ham.\\n",
                        help="text the sample starts from (backslash escapes such as \\n work)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Data

def load_text(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def split_train_val(tokens, split, val_fraction, block):
    """(train, validation) token tensors: held-out blocks spread over the text, or its tail."""
    if not 0 < val_fraction < 1:
        raise SystemExit("char_lm.py: --val-fraction must be between 0 and 1")
    if split == "tail":
        end = int(len(tokens) * (1 - val_fraction))
        return tokens[:end], tokens[end:]
    every = max(2, round(1 / val_fraction))
    blocks = tokens.split(block)
    held_out = [i % every == every - 1 for i in range(len(blocks))]
    train = torch.cat([b for b, out in zip(blocks, held_out) if not out])
    val = torch.cat([b for b, out in zip(blocks, held_out) if out] or [tokens[:0]])
    return train, val


def batchify(data, num_streams):
    """Cuts a 1-D token tensor into num_streams contiguous streams of equal length:
    [num_streams, len(data) // num_streams] (the few leftover tokens at the end are dropped)."""
    length = len(data) // num_streams
    return data[:num_streams * length].view(num_streams, length)


def my_streams(data, batch_size, rank, world_size):
    """This process's share of the data: with N processes the text is cut into N * batch_size
    streams and process r reads streams r*batch_size ... (r+1)*batch_size - 1, so every process
    sees different text (what a DistributedSampler does for a map-style dataset)."""
    streams = batchify(data, batch_size * world_size)
    return streams[rank * batch_size:(rank + 1) * batch_size]


def chunk(streams, index, seq_len):
    """The index-th TBPTT chunk: inputs and targets (the inputs shifted by one), [B, <= seq_len]."""
    start = index * seq_len
    targets = streams[:, start + 1:start + 1 + seq_len]
    inputs = streams[:, start:start + targets.shape[1]]
    return inputs, targets


# ---------------------------------------------------------------------------------------------
# Model

class CharLM(nn.Module):
    def __init__(self, vocab_size, embed, hidden, layers, dropout=0.0, backend="fused"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = lstm_class(backend)(embed, hidden, num_layers=layers, dropout=dropout,
                                        batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens, state=None):
        """tokens [B, T] -> (logits [B, T, vocab], (h, c) to pass to the next call)."""
        output, state = self.lstm(self.embed(tokens), state)
        return self.head(self.drop(output)), state


def detach(state):
    """TBPTT: keep the state's values, cut its history (no gradient flows into earlier batches)."""
    return None if state is None else tuple(s.detach() for s in state)


@torch.no_grad()
def evaluate(model, streams, seq_len, distributed):
    """Mean cross-entropy in nats per character over streams [B, L], carrying the state through
    them as training does; with several processes each evaluates its share and they add up."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=streams.device)  # loss sum, characters
    state = None
    for index in range(math.ceil((streams.shape[1] - 1) / seq_len)):
        inputs, targets = chunk(streams, index, seq_len)
        logits, state = model(inputs, state)
        total[0] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        total[1] += targets.numel()
    if distributed:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def generate(model, vocab, prime, length, temperature, device, seed=0):
    """Samples `length` characters after `prime`, one at a time, carrying the LSTM state."""
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(prime) - set(index))
    if unknown:
        raise SystemExit(f"char_lm.py: --prime has characters outside the vocabulary: {unknown}")
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    logits, state = model(torch.tensor([[index[ch] for ch in prime]], device=device))
    chars = []
    for _ in range(length):
        last = logits[0, -1]
        if temperature > 0:
            probs = F.softmax(last / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
        else:
            token = last.argmax(-1, keepdim=True)
        chars.append(vocab[token.item()])
        logits, state = model(token.view(1, 1), state)
    model.train()
    return prime + "".join(chars)


# ---------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process's environment.

def setup_distributed(device_name):
    """(rank, world_size, device); initialises the process group when launched by torchrun."""
    device = pick_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    # NCCL is the backend for CUDA tensors, gloo for CPU ones.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def learning_rate(args, step):
    """Cosine decay from --lr at step 0 to --lr * --min-lr at --steps."""
    progress = min(step / max(args.steps, 1), 1.0)
    return args.lr * (args.min_lr + (1 - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path, **contents):
    torch.save(contents, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-save never leaves a truncated checkpoint


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    distributed = world_size > 1
    main_process = rank == 0

    def log(message):
        if main_process:
            print(message, file=sys.stderr, flush=True)

    os.makedirs(args.out, exist_ok=True)
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    seed_everything(args.seed)

    # Model configuration and vocabulary: from the checkpoint when resuming.
    checkpoint = None
    if args.resume:
        if not os.path.exists(checkpoint_path):
            raise SystemExit(f"char_lm.py: --resume: no checkpoint at {checkpoint_path}")
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
        config, vocab = checkpoint["config"], checkpoint["vocab"]
        log(f"resuming from {checkpoint_path} at step {checkpoint['step']}: {config}")
    else:
        config = dict(embed=args.embed, hidden=args.hidden, layers=args.layers,
                      dropout=args.dropout)
        vocab = None

    # Data: characters -> integer tokens, split into training and validation text. (With
    # --split blocks the training text jumps where a held-out block was: a negligible seam.)
    text = load_text(args.data)
    if vocab is None:
        vocab = "".join(sorted(set(text)))
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = set(text) - set(index)
    if unknown:
        raise SystemExit(f"char_lm.py: the text has characters outside the vocabulary: {unknown}")
    tokens = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    train_tokens, val_tokens = split_train_val(tokens, args.split, args.val_fraction,
                                               args.val_block)
    val_tokens = val_tokens[:args.eval_chars or None]
    train_streams = my_streams(train_tokens, args.batch_size, rank, world_size).to(device)
    val_streams = my_streams(val_tokens, args.batch_size, rank, world_size).to(device)
    chunks_per_epoch = (train_streams.shape[1] - 1) // args.seq_len
    if chunks_per_epoch < 1 or val_streams.shape[1] < 2:
        raise SystemExit("char_lm.py: too little text for this --batch-size, --seq-len and "
                         "number of processes")
    log(f"{len(text):,} characters, vocabulary {len(vocab)}; train {len(train_tokens):,}, "
        f"validation {len(val_tokens):,} ({args.split}); {world_size} process(es) x "
        f"{args.batch_size} streams x {args.seq_len} characters per step, "
        f"{chunks_per_epoch} steps per epoch")

    # Model and optimizer. Same seed on every process; DDP also broadcasts rank 0's weights.
    torch.manual_seed(args.seed)
    model = CharLM(len(vocab), backend=args.backend, **config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])  # the same for either --backend
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
    torch.manual_seed(args.seed + 1000 * rank + step)  # dropout differs across processes/resumes
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params:,} parameters, {args.backend} LSTM, {config}, on {device}")
    # DDP averages the gradients of all processes during backward(). lstm_fused.LSTM is an
    # ordinary nn.Module with ordinary Parameters, so DDP needs nothing special for it.
    trainer = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                      else None) if distributed else model

    # Training.
    start_step, state, smooth_loss = step, None, None
    val_loss, eval_seconds = None, 0.0
    progress = Progress(args.steps, desc="train", enabled=main_process, start=start_step)
    started = time.perf_counter()
    trainer.train()
    while step < args.steps:
        position = step % chunks_per_epoch
        if position == 0:
            state = None  # a new epoch starts at the beginning of every stream
        inputs, targets = chunk(train_streams, position, args.seq_len)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)

        logits, state = trainer(inputs, detach(state))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        step += 1

        value = loss.item()
        smooth_loss = value if smooth_loss is None else 0.95 * smooth_loss + 0.05 * value
        seconds = time.perf_counter() - started - eval_seconds  # training time only
        chars_per_s = (step - start_step) * args.batch_size * args.seq_len * world_size / seconds
        progress.update(step, loss=f"{smooth_loss:.3f}", grad=f"{grad_norm.item():.2f}",
                        chars_per_s=f"{chars_per_s:,.0f}")

        if step % args.eval_every == 0 or step == args.steps:
            eval_started = time.perf_counter()
            val_loss = evaluate(model, val_streams, args.seq_len, distributed)
            eval_seconds += time.perf_counter() - eval_started
            progress.write(f"step {step}: train {smooth_loss:.4f}, validation {val_loss:.4f} "
                           f"nats/char = {val_loss / math.log(2):.4f} bits/char "
                           f"({time.perf_counter() - started:.0f} s)")
            if main_process:
                save_checkpoint(checkpoint_path, model=model.state_dict(),
                                optimizer=optimizer.state_dict(), step=step, config=config,
                                vocab=vocab, val_loss=val_loss, backend=args.backend)
    progress.close()
    wall_seconds = time.perf_counter() - started
    train_seconds = wall_seconds - eval_seconds
    if val_loss is None:  # nothing to train (e.g. --resume --steps 0): just measure
        val_loss = evaluate(model, val_streams, args.seq_len, distributed)

    if main_process:
        metrics = {
            "example": "char_lm",
            "backend": args.backend,
            "device": str(device),
            "world_size": world_size,
            "parameters": params,
            "config": config,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": step,
            "steps_this_run": step - start_step,
            "wall_seconds": round(wall_seconds, 2),  # this run's training loop, validation included
            "train_seconds": round(train_seconds, 2),  # the same without validation
            "chars_per_second": round((step - start_step) * args.batch_size * args.seq_len
                                      * world_size / train_seconds) if step > start_step else 0,
            "train_loss": smooth_loss,
            "val_loss": val_loss,
            "val_bits_per_char": val_loss / math.log(2),
            "checkpoint": checkpoint_path,
        }
        if args.sample > 0:
            prime = args.prime.encode().decode("unicode_escape")
            text = generate(model, vocab, prime, args.sample, args.temperature, device, args.seed)
            with open(os.path.join(args.out, "sample.txt"), "w") as f:
                f.write(text + "\n")
            log(f"\n--- sample (temperature {args.temperature}) ---\n{text}\n---")
            metrics["sample"] = text
        print_metrics(metrics, args.out)
    if distributed:
        dist.barrier()  # let rank 0 finish sampling and writing before the group goes away
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
