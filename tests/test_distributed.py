"""Quantizer statistics under DistributedDataParallel (2 CPU processes, gloo): every process
quantizes on the same grid — LSQ's first-batch steps and QAT/PTQ's tracked ranges are reduced over
the processes' batches (DDP itself keeps only the parameters equal)."""

from __future__ import annotations

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


def _worker(rank: int, world: int, port: int, method: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        lowbit.quantize(model, CFG, method, optimizer=opt)
        ddp = nn.parallel.DistributedDataParallel(model)
        gen = torch.Generator().manual_seed(100 + rank)
        firsts = []
        for step in range(4):
            x = torch.randn(32, 6, generator=gen) * (1 + 3 * rank)  # the processes' batches differ in range
            firsts.append(x)
            loss = ddp(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({"state": model.state_dict(), "first": firsts[0]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("method", ["lsq", "qat"])
def test_quantizer_statistics_agree_across_ddp_processes(method, tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), method, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    quant = [k for k in r0["state"] if "_quantizer." in k]
    assert quant
    for k in quant:  # steps, ranges, scales, zero points: one grid in both processes
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    for k in r0["state"]:  # and DDP's own promise for the parameters
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    if method == "lsq":
        # the first batches' steps were averaged: neither process's own initialisation
        both = torch.cat([r0["first"], r1["first"]])
        own = [2 * b.abs().mean() / 255**0.5 for b in (r0["first"], r1["first"])]
        assert r0["state"]["0.input_quantizer.signed"] == bool(both.min() < 0)
        assert not any(torch.equal(r0["state"]["0.input_quantizer.scale"], o) for o in own)


def test_quantizing_a_ddp_wrapped_model_is_refused(tmp_path):
    class Fake(nn.parallel.DistributedDataParallel):  # (no process group needed to check the type)
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module

    with pytest.raises(ConfigError, match="before wrapping it in DistributedDataParallel"):
        lowbit.quantize(Fake(nn.Sequential(nn.Linear(4, 4))), CFG, "lsq")
