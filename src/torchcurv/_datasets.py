"""From a batch to a dataset: per-sample results streamed to disk, resumable, and
reductions over every sample.

`map_dataset` runs ``fn`` over a dataset in batches, in order, and writes each batch's
per-sample results into a zarr store (one array per leaf of ``fn``'s result, chunked
along the samples with one chunk per batch), so a batch is one chunk file and a kill
cannot leave half a chunk behind a completed batch: a batch is complete when its marker
file exists, and the marker is written (atomically: a rename) only after its chunks.
Rerunning the same call skips the completed batches; a store written by another call
(another length, batch size, key, result structure, or a first batch whose recomputed
result no longer matches: another model) is refused.

`reduce_dataset` sums (or averages) ``fn``'s per-sample values over the dataset.

Under ``torchrun`` (torch.distributed initialised) every rank reads the same dataset
with the same batch boundaries as one process and takes batches ``rank, rank + world,
...``: a disjoint, deterministic share. Rank 0 creates the store; every rank writes its
own batches' chunks and markers (distinct files); `reduce_dataset` adds the ranks'
sums with ``all_reduce``, so every rank returns the whole dataset's reduction.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, SequentialSampler

from ._compat import tree_flatten, tree_unflatten
from ._errors import TorchcurvError, argument_error

__all__ = ["map_dataset", "open_results", "reduce_dataset"]

logger = logging.getLogger("torchcurv")

#: Samples per batch when neither ``batch_size`` nor a DataLoader's batch size is given.
DEFAULT_BATCH = 256
_FORMAT = 1
_DONE = "_torchcurv_done"


def _zarr(function: str) -> Any:
    try:
        import zarr
    except ImportError:  # pragma: no cover - the datasets extra installs it
        raise TorchcurvError(
            f"{function} writes zarr stores and needs the zarr package: pip install zarr "
            "(or pip install 'torchcurv[datasets]')."
        ) from None
    return zarr


# ---- the batches ------------------------------------------------------------------


class _Batches:
    """A dataset or a deterministic DataLoader as batches of known boundaries."""

    def __init__(self, function: str, data: Any, batch_size: int | None) -> None:
        self.loader: DataLoader[Any] | None = None
        if isinstance(data, DataLoader):
            sampler = getattr(data, "sampler", None)
            if type(sampler).__name__ == "DistributedSampler":
                argument_error(
                    function, "data", "is split by a DistributedSampler, which pads the "
                    "ranks' shares with duplicates", data,
                    "Pass the unsplit DataLoader (or its dataset): every rank takes its own "
                    "share of the batches.",
                )  # fmt: skip
            if data.batch_sampler is None or not isinstance(sampler, SequentialSampler):
                argument_error(
                    function, "data", "must read the dataset in order (a DataLoader with "
                    "shuffle=False and no custom sampler), so that a rerun resumes the same "
                    "batches", data, "Pass shuffle=False, or the dataset itself.",
                )  # fmt: skip
            if data.drop_last:
                argument_error(function, "data", "drops its last batch (drop_last=True)", data,
                               "Pass drop_last=False: every sample gets its result.")  # fmt: skip
            given = data.batch_size
            if batch_size is not None and batch_size != given:
                argument_error(
                    function, "batch_size", f"differs from the DataLoader's ({given})",
                    batch_size, "Leave batch_size=None with a DataLoader.",
                )  # fmt: skip
            assert given is not None
            self.loader, self.size, self.dataset = data, int(given), data.dataset
        else:
            if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
                argument_error(function, "data", "must be a Dataset (with __len__ and "
                               "__getitem__) or a DataLoader", data,
                               "Wrap tensors in torch.utils.data.TensorDataset.")  # fmt: skip
            size = DEFAULT_BATCH if batch_size is None else batch_size
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                argument_error(function, "batch_size", "must be a positive int or None",
                               batch_size, "Pass e.g. batch_size=256.")  # fmt: skip
            self.size, self.dataset = size, data
        self.length = len(self.dataset)  # type: ignore[arg-type]
        if self.length == 0:
            argument_error(function, "data", "is empty", data, "Pass a non-empty dataset.")
        self.count = math.ceil(self.length / self.size)

    def batch(self, index: int) -> Any:
        """Batch `index`: samples ``[index * size, ...)``, collated."""
        start = index * self.size
        stop = min(start + self.size, self.length)
        collate = self.loader.collate_fn if self.loader is not None else _collate
        return collate([self.dataset[i] for i in range(start, stop)])

    def rows(self, index: int) -> int:
        return min(self.size, self.length - index * self.size)


def _collate(samples: list[Any]) -> Any:
    from torch.utils.data import default_collate

    return default_collate(samples)


def _leaves(
    function: str, result: Any, rows: int, stored: bool = True
) -> tuple[list[torch.Tensor], Any]:
    """`result`'s leaves, checked for a per-sample dim of `rows` (`stored`: detached, on
    the CPU, for the store)."""
    leaves, spec = tree_flatten(result)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        argument_error(function, "fn", "must return a tensor or a pytree of tensors",
                       result, "Return e.g. per_sample_laplacian(model, batch[0]).")  # fmt: skip
    for t in leaves:
        if t.dim() == 0 or t.shape[0] != rows:
            argument_error(
                function, "fn", f"must return a leading per-sample dim ({rows} for this "
                "batch)", tuple(t.shape), "Return one row per sample of the batch.",
            )  # fmt: skip
    return [t.detach().cpu() for t in leaves] if stored else leaves, spec


def _ranks() -> tuple[int, int]:
    """``(rank, world size)`` under torch.distributed, ``(0, 1)`` without it."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank(), distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ---- progress ---------------------------------------------------------------------


class _Progress:
    """A tqdm bar where wanted (a terminal, or progress=True), else a log line every
    few seconds."""

    def __init__(self, progress: bool | None, total: int, done: int, name: str) -> None:
        interactive = sys.stderr.isatty() if progress is None else bool(progress)
        self.bar = None
        self.total, self.done, self.name = total, done, name
        self.last = time.monotonic()
        if interactive:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - the datasets extra installs it
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=done, unit="sample", desc=name)

    def update(self, rows: int) -> None:
        self.done += rows
        if self.bar is not None:
            self.bar.update(rows)
        elif time.monotonic() - self.last > 5.0:
            self.last = time.monotonic()
            logger.info("%s: %d of %d samples", self.name, self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- map_dataset ------------------------------------------------------------------


def map_dataset(
    fn: Callable[[Any], Any],
    data: Any,
    out: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    key: str | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Any:
    """Run `fn` over a dataset in batches and write its per-sample results to disk.

    ``fn(batch)`` returns a tensor or a pytree of tensors with a leading per-sample dim
    (e.g. ``lambda b: torchcurv.per_sample_laplacian(model, b[0])``). The results go to
    a zarr store at `out`: one array per leaf, ``[N, *per-sample shape]``, one chunk per
    batch, readable with plain ``zarr.open_group(out)``, numpy or dask; the store's
    attributes record the call (length, batch size, `key`, the leaves' names, shapes
    and dtypes, the torchcurv version).

    A rerun of the same call resumes: completed batches are skipped. A batch counts as
    complete only once its chunks are written (a marker file, written atomically after
    them), so a run killed at any moment loses at most the batch in flight. A store made
    by another call (another length, batch size, `key`, result structure, or a first
    batch whose recomputed result differs: another model) is refused, never mixed.

    Args:
        fn: The per-sample computation of one batch.
        data: A `torch.utils.data.Dataset` (read in order, `batch_size` samples at a
            time) or a `torch.utils.data.DataLoader` that reads it in order
            (``shuffle=False``, no ``drop_last``).
        out: The store's folder.
        batch_size: Samples per batch (a Dataset; default 256); a DataLoader's own.
        key: A string naming the call (a model's checkpoint, a step), checked on resume.
        resume: Continue an existing store of the same call (False: refuse one).
        overwrite: With ``resume=False``, delete an existing store first.
        progress: A progress bar (True), a log line every few seconds (False), or a bar
            only on a terminal (None).

    Returns:
        `open_results(out)`: ``fn``'s pytree with zarr arrays as leaves.

    Raises:
        TorchcurvError: For bad arguments, a store of another call, or ``fn`` returning
            something without a per-sample dim.

    Example:
        >>> import tempfile, torch, torchcurv
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.arange(10.0).reshape(5, 2))
        >>> store = tempfile.mkdtemp() + "/squares"
        >>> result = torchcurv.map_dataset(lambda b: (b[0] ** 2).sum(1), data, store,
        ...                                batch_size=2)
        >>> result[:].tolist()   # [0+1, 4+9, 16+25, 36+49, 64+81]
        [1.0, 13.0, 41.0, 85.0, 145.0]
    """
    name = "map_dataset"
    zarr = _zarr(name)
    batches = _Batches(name, data, batch_size)
    path = Path(out)
    if key is not None and not isinstance(key, str):
        argument_error(name, "key", "must be a string or None", key, "Pass e.g. key='step-1000'.")
    rank, world = _ranks()
    existed = path.exists() and any(path.iterdir())
    if existed and not resume and not overwrite:
        argument_error(
            name, "out", "holds a store already and resume=False", str(path),
            "Pass resume=True to continue it, or overwrite=True to start again.",
        )  # fmt: skip
    _barrier(world)  # every rank has looked before rank 0 replaces or creates it
    if existed and overwrite and not resume and rank == 0:
        shutil.rmtree(path)
    done_dir = path / _DONE
    # the first batch: its result fixes the store's layout, and on resume it must match
    first = batches.batch(0)
    leaves, spec = _leaves(name, fn(first), batches.rows(0))
    names = _leaf_names(spec, len(leaves))
    meta = {
        "format": _FORMAT,
        "length": batches.length,
        "batch_size": batches.size,
        "key": key,
        "leaves": [
            {"name": n, "shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
            for n, t in zip(names, leaves, strict=True)
        ],
        "treespec": _spec_text(spec),
    }
    if rank == 0 and not (path / "zarr.json").exists():
        import torchcurv

        path.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(path), mode="w")
        for n, t in zip(names, leaves, strict=True):
            group.create_array(
                n, shape=(batches.length, *t.shape[1:]), chunks=(batches.size, *t.shape[1:]),
                dtype=str(t.dtype).removeprefix("torch."), fill_value=0,
            )  # fmt: skip
        group.attrs["torchcurv"] = {**meta, "version": torchcurv.__version__}
        done_dir.mkdir(exist_ok=True)
    _barrier(world)  # the store exists
    group = zarr.open_group(str(path), mode="r+")
    _check_same_call(name, path, dict(group.attrs.get("torchcurv", {})), meta)
    if (done_dir / "0").exists():
        stored = [torch.from_numpy(group[n][: batches.rows(0)]) for n in names]
        _check_first_batch(name, path, leaves, stored)
    complete = {int(p.name) for p in done_dir.iterdir() if p.name.isdigit()}
    todo = [i for i in range(rank, batches.count, world) if i not in complete]
    bar = _Progress(progress if rank == 0 else False, batches.length,
                    sum(batches.rows(i) for i in complete), name)  # fmt: skip
    try:
        for index in todo:
            if index == 0:
                result_leaves = leaves
            else:
                result_leaves = _leaves(name, fn(batches.batch(index)), batches.rows(index))[0]
            _write(group, names, result_leaves, index, batches)
            _mark(done_dir, index)
            bar.update(batches.rows(index) * world)
    finally:
        bar.close()
    _barrier(world)  # every rank's batches are written
    return open_results(path)


def _write(group: Any, names: list[str], leaves: list[torch.Tensor], index: int,
           batches: _Batches) -> None:  # fmt: skip
    start = index * batches.size
    for n, t in zip(names, leaves, strict=True):
        group[n][start : start + len(t)] = t.numpy()


def _mark(done_dir: Path, index: int) -> None:
    """Batch `index` complete: a marker, renamed into place (atomic) after its chunks."""
    temporary = done_dir / f".{index}.{os.getpid()}.tmp"
    with open(temporary, "w") as marker:
        marker.write("done\n")
        marker.flush()
        os.fsync(marker.fileno())
    os.replace(temporary, done_dir / str(index))


def _leaf_names(spec: Any, count: int) -> list[str]:
    """Array names of the result's leaves: their pytree paths (``"0"`` for a tensor)."""
    if count == 1 and spec.num_leaves == 1 and spec.num_children == 0:
        return ["0"]
    from torch.utils._pytree import tree_flatten_with_path
    from torch.utils._pytree import tree_unflatten as unflatten

    dummy = unflatten([0] * count, spec)
    paths = [path for path, _ in tree_flatten_with_path(dummy)[0]]
    names = []
    for path in paths:
        parts = [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]
        names.append("/".join(parts).replace(".", "_") or "0")
    return names


def _spec_text(spec: Any) -> str:
    from torch.utils._pytree import treespec_dumps

    return treespec_dumps(spec)


def _check_same_call(function: str, path: Path, stored: dict[str, Any],
                     meta: dict[str, Any]) -> None:  # fmt: skip
    for field in ("format", "length", "batch_size", "key", "leaves", "treespec"):
        if stored.get(field) != meta[field]:
            raise TorchcurvError(
                f"{function}: the store at {str(path)!r} was written by another call: its "
                f"{field} is {stored.get(field)!r}, this call's {meta[field]!r}. Pass another "
                "out=, or resume=False, overwrite=True to replace it."
            )


def _check_first_batch(function: str, path: Path, leaves: list[torch.Tensor],
                       stored: list[torch.Tensor]) -> None:  # fmt: skip
    for new, old in zip(leaves, stored, strict=True):
        scale = float(old.abs().max()) if old.numel() else 0.0
        tolerance = 1e-4 if new.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-9
        if new.shape != old.shape or not torch.allclose(
            new.to(old.dtype), old, rtol=tolerance, atol=tolerance * max(scale, 1e-30)
        ):
            raise TorchcurvError(
                f"{function}: the store at {str(path)!r} holds other results for the first "
                "batch than this call computes (another model or other data?). Pass another "
                "out=, or resume=False, overwrite=True to replace it."
            )


def open_results(out: str | os.PathLike[str]) -> Any:
    """The results of `map_dataset` at `out`: its ``fn``'s pytree, zarr arrays as leaves
    (read lazily: index them, e.g. ``result[:100]``, or ``numpy.asarray(result)``).

    Args:
        out: The store's folder.

    Returns:
        The pytree of ``zarr.Array``.

    Raises:
        TorchcurvError: If `out` holds no store of `map_dataset`.

    Example:
        >>> import tempfile, torch, torchcurv
        >>> from torch.utils.data import TensorDataset
        >>> store = tempfile.mkdtemp() + "/pairs"
        >>> data = TensorDataset(torch.arange(6.0).reshape(3, 2))
        >>> _ = torchcurv.map_dataset(lambda b: {"sum": b[0].sum(1), "x": b[0]}, data, store)
        >>> results = torchcurv.open_results(store)
        >>> results["sum"][:].tolist(), results["x"].shape   # 0+1, 2+3, 4+5
        ([1.0, 5.0, 9.0], (3, 2))
    """
    zarr = _zarr("open_results")
    path = Path(out)
    if not (path / "zarr.json").exists():
        raise TorchcurvError(f"open_results: no map_dataset store at {str(path)!r}.")
    group = zarr.open_group(str(path), mode="r")
    meta = dict(group.attrs.get("torchcurv", {}))
    from torch.utils._pytree import treespec_loads

    spec = treespec_loads(meta["treespec"])
    return tree_unflatten([group[leaf["name"]] for leaf in meta["leaves"]], spec)


# ---- reduce_dataset ---------------------------------------------------------------


def reduce_dataset(
    fn: Callable[[Any], Any],
    data: Any,
    *,
    op: Literal["sum", "mean"] = "sum",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Any:
    """The sum (or mean) over every sample of `fn`'s per-sample values.

    ``fn(batch)`` returns per-sample values with a leading per-sample dim, as for
    `map_dataset`; ``"mean"`` weighs every sample equally, whatever the batch sizes
    (e.g. the dataset Hessian of the mean loss from per-sample Hessians).

    Args:
        fn: The per-sample computation of one batch.
        data: A Dataset or an in-order DataLoader, as for `map_dataset`.
        op: ``"sum"`` or ``"mean"``.
        batch_size: Samples per batch (a Dataset; default 256).
        progress: As for `map_dataset`.

    Returns:
        ``fn``'s pytree, each leaf reduced over the samples.

    Example:
        >>> import torch, torchcurv
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.arange(5.0))
        >>> torchcurv.reduce_dataset(lambda b: b[0] ** 2, data, op="mean", batch_size=2)
        tensor(6.)
    """
    name = "reduce_dataset"
    if op not in ("sum", "mean"):
        argument_error(name, "op", "must be 'sum' or 'mean'", op, "Pass op='sum' or 'mean'.")
    batches = _Batches(name, data, batch_size)
    rank, world = _ranks()
    totals: list[torch.Tensor] | None = None
    spec = None
    bar = _Progress(progress if rank == 0 else False, batches.length, 0, name)
    try:
        for index in range(rank, batches.count, world):
            leaves, spec = _leaves(name, fn(batches.batch(index)), batches.rows(index), False)
            sums = [t.sum(0) for t in leaves]
            totals = sums if totals is None else [a + b for a, b in zip(totals, sums, strict=True)]
            bar.update(batches.rows(index) * world)
    finally:
        bar.close()
    if world > 1:  # every rank's share added up, on every rank
        if totals is None:  # fewer batches than ranks: this rank had none
            leaves, spec = _leaves(name, fn(batches.batch(0)), batches.rows(0), False)
            totals = [torch.zeros_like(t.sum(0)) for t in leaves]
        for total in totals:
            torch.distributed.all_reduce(total)
    assert totals is not None
    assert spec is not None
    if op == "mean":
        totals = [t / batches.length for t in totals]
    return tree_unflatten(totals, spec)
