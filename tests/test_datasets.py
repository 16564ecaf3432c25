"""map_dataset, open_results and reduce_dataset in one process: the store against the
same calls kept in memory, resuming after a failure mid-run, refusing another call's
store, reading back with plain zarr; reductions against the direct sums."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchcurv
from torchcurv.testing import assert_trees_close

zarr = pytest.importorskip("zarr")
np = pytest.importorskip("numpy")

D = torch.float64


def _setup(n: int = 23) -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(D)
    X, y = torch.randn(n, 3, dtype=D), torch.randint(0, 2, (n,))
    return model, TensorDataset(X, y)


def _quantities(model: nn.Module) -> Any:
    def fn(batch: Any) -> Any:
        x, y = batch
        return {
            "laplacian": torchcurv.per_sample_laplacian(model, x, output=0),
            "hessian": torchcurv.per_sample_hessian(model, x, output=1),
            "label": y,
        }

    return fn


def test_the_store_holds_what_the_calls_return(tmp_path: Path) -> None:
    model, data = _setup()
    result = torchcurv.map_dataset(_quantities(model), data, tmp_path / "s", batch_size=5)
    X, y = data.tensors
    assert_trees_close(torch.from_numpy(result["laplacian"][:]),
                       torchcurv.per_sample_laplacian(model, X, output=0))  # fmt: skip
    assert_trees_close(torch.from_numpy(result["hessian"][:]),
                       torchcurv.per_sample_hessian(model, X, output=1))  # fmt: skip
    assert torch.equal(torch.from_numpy(result["label"][:]), y)
    # plain zarr: one array per leaf, one chunk per batch, the call in the attributes
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert group["hessian"].shape == (23, 3, 3)
    assert group["hessian"].chunks == (5, 3, 3)
    meta = group.attrs["torchcurv"]
    assert (meta["length"], meta["batch_size"], meta["version"]) == (23, 5, torchcurv.__version__)
    assert np.asarray(group["laplacian"]).shape == (23,)
    again = torchcurv.open_results(tmp_path / "s")
    assert np.array_equal(again["hessian"][:], result["hessian"][:])


def test_a_run_that_fails_midway_resumes_where_it_stopped(tmp_path: Path) -> None:
    model, data = _setup()
    quantities = _quantities(model)
    seen: list[int] = []

    def failing(batch: Any) -> Any:
        seen.append(len(seen))
        if len(seen) == 4:  # the fourth batch computed: a fault mid-run
            raise RuntimeError("killed")
        return quantities(batch)

    with pytest.raises(RuntimeError, match="killed"):
        torchcurv.map_dataset(failing, data, tmp_path / "s", batch_size=5)
    done = sorted(p.name for p in (tmp_path / "s" / "_torchcurv_done").iterdir())
    assert done == ["0", "1", "2"]  # the batch in flight is not marked
    seen.clear()
    counted = []

    def counting(batch: Any) -> Any:
        counted.append(len(batch[0]))
        return quantities(batch)

    result = torchcurv.map_dataset(counting, data, tmp_path / "s", batch_size=5)
    assert counted == [5, 5, 3]  # the first batch again (to check the store), then 3 and 4
    whole = torchcurv.map_dataset(quantities, data, tmp_path / "whole", batch_size=5)
    for name in ("laplacian", "hessian", "label"):
        assert np.array_equal(result[name][:], whole[name][:])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model", "holds other results for the first batch"),
        ("length", "its length is 23, this call's 20"),
        ("batch_size", "its batch_size is 5, this call's 4"),
        ("key", "its key is 'a', this call's 'b'"),
        ("structure", "its leaves is"),
    ],
)
def test_another_calls_store_is_refused(tmp_path: Path, change: str, message: str) -> None:
    model, data = _setup()
    torchcurv.map_dataset(_quantities(model), data, tmp_path / "s", batch_size=5, key="a")
    fn, size, key = _quantities(model), 5, "a"
    if change == "model":
        other, _ = _setup()
        with torch.no_grad():
            other[0].weight.mul_(2.0)
        fn = _quantities(other)
    elif change == "length":
        data = TensorDataset(*(t[:20] for t in data.tensors))
    elif change == "batch_size":
        size = 4
    elif change == "key":
        key = "b"
    else:
        fn = lambda batch: torchcurv.per_sample_laplacian(model, batch[0], output=0)  # noqa: E731
    with pytest.raises(torchcurv.TorchcurvError, match=message):
        torchcurv.map_dataset(fn, data, tmp_path / "s", batch_size=size, key=key)


def test_resume_false_needs_overwrite(tmp_path: Path) -> None:
    model, data = _setup()
    fn = _quantities(model)
    torchcurv.map_dataset(fn, data, tmp_path / "s", batch_size=5)
    with pytest.raises(torchcurv.TorchcurvError, match="holds a store already and resume=False"):
        torchcurv.map_dataset(fn, data, tmp_path / "s", batch_size=5, resume=False)
    fresh = torchcurv.map_dataset(lambda b: b[0].sum(1), data, tmp_path / "s", batch_size=4,
                                  resume=False, overwrite=True)  # fmt: skip
    assert np.allclose(fresh[:], data.tensors[0].sum(1).numpy())


def test_data_loaders_in_order_only() -> None:
    model, data = _setup()
    fn = _quantities(model)
    with pytest.raises(torchcurv.TorchcurvError, match="must read the dataset in order"):
        torchcurv.map_dataset(fn, DataLoader(data, batch_size=4, shuffle=True), "/nonexistent")
    with pytest.raises(torchcurv.TorchcurvError, match="drop_last"):
        torchcurv.map_dataset(fn, DataLoader(data, batch_size=4, drop_last=True), "/nonexistent")
    with pytest.raises(torchcurv.TorchcurvError, match="differs from the DataLoader's"):
        torchcurv.map_dataset(fn, DataLoader(data, batch_size=4), "/nonexistent", batch_size=5)
    with pytest.raises(torchcurv.TorchcurvError, match="leading per-sample dim"):
        torchcurv.map_dataset(lambda b: b[0].sum(), data, "/nonexistent")


def test_a_data_loader_gives_the_same_store(tmp_path: Path) -> None:
    model, data = _setup()
    fn = _quantities(model)
    a = torchcurv.map_dataset(fn, data, tmp_path / "a", batch_size=6)
    b = torchcurv.map_dataset(fn, DataLoader(data, batch_size=6), tmp_path / "b")
    assert np.array_equal(a["hessian"][:], b["hessian"][:])


@pytest.mark.parametrize("op", ["sum", "mean"])
def test_reductions_weigh_every_sample_equally(op: str) -> None:
    model, data = _setup()
    X, y = data.tensors

    def loss_hessians(batch: Any) -> Any:
        x, t = batch
        return torchcurv.per_sample_hessian(model, x, wrt="params", params="2.*",
                                            loss=F.cross_entropy, targets=t)  # fmt: skip

    got = torchcurv.reduce_dataset(loss_hessians, data, op=op, batch_size=5)  # 5,5,5,5,3
    every = loss_hessians((X, y))
    expected = {r: {c: h.sum(0) / (len(X) if op == "mean" else 1) for c, h in row.items()}
                for r, row in every.items()}  # fmt: skip
    assert_trees_close(got, expected)
    # the dataset Hessian of the mean loss, directly
    if op == "mean":
        params = {k: v.detach() for k, v in model.named_parameters() if k.startswith("2.")}

        def mean_loss(p: Any) -> torch.Tensor:
            out = torch.func.functional_call(model, p, (X,), strict=False)
            return F.cross_entropy(out, y)

        direct = torch.func.hessian(mean_loss)(params)
        assert_trees_close(got, direct)


WORKER = Path(__file__).with_name("dataset_worker.py")


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    source = str(Path(torchcurv.__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": source}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_a_process_killed_midway_resumes(tmp_path: Path) -> None:
    """SIGKILL while the fourth batch is computed: three batches marked, the rest resumed
    in this process; the store equals an uninterrupted one."""
    import dataset_worker as worker

    done = _run(sys.executable, str(WORKER), "kill", str(tmp_path / "s"))
    assert done.returncode == -signal.SIGKILL, done.stderr
    marked = sorted(p.name for p in (tmp_path / "s" / "_torchcurv_done").iterdir())
    assert marked == ["0", "1", "2"]
    model, data = worker.setup()
    resumed = torchcurv.map_dataset(worker.quantities(model), data, tmp_path / "s", batch_size=5)
    whole = torchcurv.map_dataset(worker.quantities(model), data, tmp_path / "w", batch_size=5)
    for name in ("laplacian", "hessian"):
        assert np.allclose(resumed[name][:], whole[name][:], rtol=1e-12, atol=1e-14)


def test_two_processes_under_torchrun_write_one_store(tmp_path: Path) -> None:
    """torchrun --standalone --nproc_per_node=2 with gloo: the store and the reduction
    equal one process's."""
    import dataset_worker as worker

    done = _run(sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", str(WORKER), "distributed", str(tmp_path / "s"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    model, data = worker.setup()
    fn = worker.quantities(model)
    one = torchcurv.map_dataset(fn, data, tmp_path / "one", batch_size=5)
    two = torchcurv.open_results(tmp_path / "s")
    for name in ("laplacian", "hessian"):
        assert np.allclose(two[name][:], one[name][:], rtol=1e-12, atol=1e-14)
    marked = sorted(int(p.name) for p in (tmp_path / "s" / "_torchcurv_done").iterdir())
    assert marked == [0, 1, 2, 3, 4]
    total = torch.load(str(tmp_path / "s") + ".pt")
    assert_trees_close(total, torchcurv.reduce_dataset(fn, data, op="mean", batch_size=5))
