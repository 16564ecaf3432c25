"""`assert_quantities_match_hessian`: the per-sample quantities against the full Hessian."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_map

from ._assertions import assert_trees_close

__all__ = ["assert_quantities_match_hessian"]

_NO_WRT = ("wrt", "params")  # per_sample_laplacian differentiates the inputs only


def _block(H: Any, path: tuple[Any, ...]) -> torch.Tensor:
    """``H[path][path]``: the block of one differentiated leaf with itself."""
    row = H
    for key in path:
        row = key.get(row)
    block = row
    for key in path:
        block = key.get(block)
    tensor: torch.Tensor = block
    return tensor


def assert_quantities_match_hessian(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    vectors: Any = None,
    **options: Any,
) -> None:
    """Check the per-sample quantities of `module` against its full per-sample Hessian.

    Computes ``torchcurv.per_sample_hessian(module, inputs, **options)`` and checks, with
    the tolerance policy of `assert_trees_close`, that `torchcurv.per_sample_hessian_diag`
    gives the diagonal of each differentiated tensor's own block, that
    `torchcurv.per_sample_laplacian` gives the trace of the input Hessian (with
    ``wrt="inputs"``, the default), and, for an objective with one entry per sample, that
    `torchcurv.per_sample_hvp` gives ``H v`` for `vectors` (random ones, seeded, when
    None) and `torchcurv.per_sample_hessian_eigvalsh` (Lanczos, as many iterations as
    entries) the top eigenvalues of the full Hessian. Use it on your own model in
    float64, next to `check_model` (which checks the full Hessian against the loop
    oracle).

    Args:
        module: The model.
        inputs: The batch ``[B, ...]`` or a tuple of such tensors.
        vectors: The vectors of `torchcurv.per_sample_hvp` (shaped like what is
            differentiated, batch first); None draws them (standard normal, seed 0).
        **options: The keyword arguments shared by the functions: ``wrt``, ``output``,
            ``loss``, ``targets``, ``params``, ``kwargs``, ``argnums``, ``mode``,
            ``chunk_size`` (a tuple of the quantities' own form is not shared; pass an
            int or None), ``randomness``.

    Raises:
        AssertionError: If a quantity disagrees with the full Hessian reduced.

    Example:
        >>> import torch
        >>> from torchcurv.testing import assert_quantities_match_hessian
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 1)).double()
        >>> X = torch.randn(5, 3, dtype=torch.float64)
        >>> assert_quantities_match_hessian(model, X, output=0)
        >>> assert_quantities_match_hessian(model, X, output=0, wrt="params", mode="rev-over-rev")
    """
    import torchcurv

    H = torchcurv.per_sample_hessian(module, inputs, **options)
    diagonal = torchcurv.per_sample_hessian_diag(module, inputs, **options)
    leaves, spec = tree_flatten_with_path(diagonal)
    expected, scalar = [], True
    for path, leaf in leaves:
        block = _block(H, path)
        x_dims = block.dim() - leaf.dim()
        lead = leaf.shape[: leaf.dim() - x_dims]
        scalar = scalar and len(lead) == 1  # the batch dim only: one entry per sample
        n = math.prod(leaf.shape[leaf.dim() - x_dims :])
        expected.append(block.reshape(*lead, n, n).diagonal(dim1=-2, dim2=-1).reshape(leaf.shape))
    assert_trees_close(diagonal, spec.unflatten(expected))
    if options.get("wrt", "inputs") == "inputs":
        laplacian_options = {k: v for k, v in options.items() if k not in _NO_WRT}
        laplacian = torchcurv.per_sample_laplacian(module, inputs, **laplacian_options)
        diagonals = tree_flatten(diagonal)[0]
        traces = [d.reshape(*d.shape[: laplacian.dim()], -1).sum(-1) for d in diagonals]
        assert_trees_close(laplacian, sum(traces))
    size = leaves[0][1].shape[0]
    if not scalar or not size:
        return  # not one entry per sample: no Hessian-vector product
    matrix = torchcurv.to_matrix(H, batch_dims=1)
    if vectors is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
        vectors = tree_map(
            lambda d: torch.randn(d.shape, generator=generator, dtype=d.dtype).to(d.device),
            diagonal,
        )
    products = torchcurv.per_sample_hvp(module, inputs, vectors, **options)
    flat_v = torch.cat([v.reshape(size, -1) for v in tree_flatten(vectors)[0]], dim=1)
    flat_hv = torch.cat([p.reshape(size, -1) for p in tree_flatten(products)[0]], dim=1)
    assert_trees_close(flat_hv, torch.einsum("bij,bj->bi", matrix, flat_v))
    n = matrix.shape[-1]
    k = min(n, 3)
    top = torchcurv.per_sample_hessian_eigvalsh(
        module, inputs, k=k, num_iterations=n, generator=torch.Generator().manual_seed(0),
        **{key: value for key, value in options.items() if key != "chunk_size"},
    )  # fmt: skip
    symmetric = (matrix + matrix.transpose(1, 2)) / 2
    assert_trees_close(top, torch.linalg.eigvalsh(symmetric)[:, -k:])
