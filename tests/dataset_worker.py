"""A worker process for tests/test_datasets.py: ``python dataset_worker.py MODE OUT``.

``distributed`` (under ``torchrun``, gloo): map_dataset into OUT and reduce_dataset,
rank 0 saving the reduction to OUT.pt. ``kill``: map_dataset into OUT, the process
killing itself (SIGKILL) while computing its fourth batch.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

import torchcurv


def setup() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    return model, TensorDataset(torch.randn(23, 3, dtype=torch.float64))


def quantities(model: nn.Module) -> Any:
    def fn(batch: Any) -> Any:
        return {
            "laplacian": torchcurv.per_sample_laplacian(model, batch[0], output=0),
            "hessian": torchcurv.per_sample_hessian(model, batch[0], output=1),
        }

    return fn


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    model, data = setup()
    fn = quantities(model)
    if mode == "distributed":
        torch.distributed.init_process_group("gloo")
        torchcurv.map_dataset(fn, data, out, batch_size=5)
        total = torchcurv.reduce_dataset(fn, data, op="mean", batch_size=5)
        if torch.distributed.get_rank() == 0:
            torch.save(total, out + ".pt")
        torch.distributed.destroy_process_group()
        return
    calls = []

    def dying(batch: Any) -> Any:
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(batch)

    torchcurv.map_dataset(dying, data, out, batch_size=5)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
