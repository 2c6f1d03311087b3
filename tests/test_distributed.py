"""DistributedDataParallel: 2 processes (gloo) training a model with lstm_fused.LSTM give the
gradients and parameters of single-process training on the same global batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lstm_fused
from lstm_testing import Tagger

WORLD_SIZE = 2
STEPS = 3
BATCH = 8  # global; each rank takes BATCH / WORLD_SIZE rows

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build")


def make_model():
    torch.manual_seed(0)
    return lstm_fused.replace_lstm(Tagger().double())


def batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 10, (BATCH, 7), generator=generator),
             torch.randint(0, 5, (BATCH, 7), generator=generator)) for _ in range(STEPS)]


def train(model, steps, rows=slice(None)):
    """SGD on the mean loss over the given rows of each batch; the gradients of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gradients = []
    for tokens, targets in steps:
        logits = model(tokens[rows])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
        optimizer.zero_grad()
        loss.backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return gradients


def worker(rank, rendezvous, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        share = BATCH // WORLD_SIZE
        gradients = train(model, batches(), slice(rank * share, (rank + 1) * share))
        if rank == 0:
            torch.save({"gradients": gradients,
                        "parameters": [p.detach() for p in model.module.parameters()]}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process_training(tmp_path):
    out = tmp_path / "rank0.pt"
    # The children run without a GPU and with one thread each, whatever this process has.
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(worker, args=(str(tmp_path / "rendezvous"), str(out)), nprocs=WORLD_SIZE,
                 join=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    distributed = torch.load(out, weights_only=True)
    model = make_model()
    assert type(model.encoder) is lstm_fused.LSTM
    expected = train(model, batches())
    for step, (actual, wanted) in enumerate(zip(distributed["gradients"], expected)):
        for (name, _), a, e in zip(model.named_parameters(), actual, wanted):
            torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10,
                                       msg=lambda m, n=name, s=step: f"step {s}, {n}: {m}")
    for a, e in zip(distributed["parameters"], model.parameters()):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)
