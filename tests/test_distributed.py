"""Quantizer statistics under DistributedDataParallel (2 CPU processes, gloo): in DDP's forward
pass every process quantizes on the same grid — LSQ's first-batch steps and QAT/PTQ's tracked
ranges are reduced over the processes' batches (DDP itself keeps only the parameters equal) —
and nothing else changes: a model called outside DDP (calibrate on one rank), DDP's join() for
uneven inputs and an empty batch in one process run as they do without lowbit."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lowbit
from lowbit.config import ConfigError

CFG = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(method: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    lowbit.quantize(model, CFG, method, optimizer=opt)
    return model, opt


def _step(ddp, opt, x) -> None:
    loss = ddp(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _worker(rank: int, world: int, port: int, method: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # (a deadlock fails the test after 60 s instead of hanging it)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        batch = lambda: torch.randn(32, 6, generator=gen) * (1 + 3 * rank)  # noqa: E731  (ranges differ)
        model, opt = _build(method)
        ddp = nn.parallel.DistributedDataParallel(model)
        # the first batch is empty in process 1: it takes part in the first reduction all the same
        first = batch()
        _step(ddp, opt, first[:0] if rank == 1 else first)
        for _ in range(3):
            _step(ddp, opt, batch())
        torch.save({"state": model.state_dict()}, f"{out}/rank{rank}.pt")
        # a model called outside DDP (calibration on one process) reduces nothing: no deadlock
        if rank == 0:
            lowbit.calibrate(model, [batch()])
        dist.barrier()
        # DDP's join() for uneven inputs: per-process statistics there, and no stray collective
        model, opt = _build(method)
        ddp = nn.parallel.DistributedDataParallel(model)
        with ddp.join():
            for _ in range(2 + rank):
                _step(ddp, opt, batch())
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("method", ["lsq", "qat"])
def test_quantizer_statistics_agree_across_ddp_processes(method, tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), method, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    quant = [k for k in r0["state"] if "_quantizer." in k]
    assert quant
    for k in r0["state"]:  # steps, ranges, scales, zero points: one grid in both; parameters too (DDP)
        assert torch.equal(r0["state"][k], r1["state"][k]), k


def test_quantizing_a_ddp_wrapped_model_is_refused():
    class Fake(nn.parallel.DistributedDataParallel):  # (no process group needed to check the type)
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module

    with pytest.raises(ConfigError, match="before wrapping it in DistributedDataParallel"):
        lowbit.quantize(Fake(nn.Sequential(nn.Linear(4, 4))), CFG, "lsq")
