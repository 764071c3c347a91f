"""Our networks under torch.distributed (DDP), as nnU-Net's ``-num_gpus N`` runs them.

CI has no GPU, so this runs DDP with the gloo backend on CPU, 2 processes: each process
gets half of the batch, DDP averages the gradients, and they must equal the gradients of
one process on the whole batch (the loss is a mean over the batch). The networks here
normalise per sample (InstanceNorm / LayerNorm), so the split does not change the forward
pass; BatchNorm networks are converted to SyncBatchNorm by nnU-Net, which needs CUDA.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "SegMamba":
        from nnunet_mamba.networks.segmamba import SegMamba
        return SegMamba(2, 3, widths=(4, 8, 16, 32), hidden=32)
    if name == "Mamba":
        from nnunet_mamba.ssm import Mamba

        class Tokens(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.mamba = Mamba(8, d_state=4)

            def forward(self, x):
                return self.mamba(x)
        return Tokens()
    raise ValueError(name)


def _inputs(name: str):
    g = torch.Generator().manual_seed(1)
    if name == "SegMamba":
        return torch.randn(4, 2, 32, 32, 32, generator=g)
    return torch.randn(4, 20, 8, generator=g)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out.float() ** 2).mean()


def _worker(rank: int, world: int, port: int, name: str, result_file: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = torch.nn.parallel.DistributedDataParallel(_build(name))
        x = _inputs(name).chunk(world)[rank]
        _loss(net(x)).backward()
        if rank == 0:
            torch.save({k: p.grad.clone() for k, p in net.module.named_parameters()
                        if p.grad is not None}, result_file)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("name", ["Mamba", "SegMamba"])
def test_ddp_gradients_equal_single_process(name, tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    net = _build(name)
    _loss(net(_inputs(name))).backward()
    single = {k: p.grad for k, p in net.named_parameters() if p.grad is not None}

    result = tmp_path / "ddp_grads.pt"
    mp.spawn(_worker, args=(2, _free_port(), name, str(result)), nprocs=2, join=True)
    ddp = torch.load(result, weights_only=True)

    assert set(ddp) == set(single) and single
    for k, g in single.items():
        torch.testing.assert_close(ddp[k], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {k}")
