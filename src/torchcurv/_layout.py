"""Views between derivative pytrees and matrices.

A Jacobian or Hessian pytree is a grid of blocks: its flattened leaves come in rows of
``L`` blocks, one per leaf of the differentiated input (torch.func's nesting puts the
input structure innermost). `to_matrix` concatenates that grid into one matrix;
`from_matrix` cuts it back.

Ordering: blocks follow ``torch.utils._pytree.tree_flatten`` order of the input (dicts
in insertion order, e.g. ``named_parameters()`` order), and entries inside a block
follow row-major (C) order of the tensor's shape.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._errors import argument_error, describe

__all__ = ["from_matrix", "to_matrix"]


def _check_batch_dims(function: str, batch_dims: Any) -> int:
    if not isinstance(batch_dims, int) or isinstance(batch_dims, bool) or batch_dims < 0:
        argument_error(
            function,
            "batch_dims",
            "must be a non-negative int",
            batch_dims,
            "Pass batch_dims=1 for per-sample results with a leading batch dim.",
        )
    return batch_dims


def _column_shapes(tree_leaves: list[Any], like: Any, batch_dims: int) -> list[torch.Size]:
    if like is not None:
        like_leaves = tree_flatten(like)[0]
        if not like_leaves or not all(isinstance(x, torch.Tensor) for x in like_leaves):
            argument_error(
                "to_matrix",
                "like",
                "must be a tensor or a pytree of tensors",
                like,
                "Pass the differentiated input, e.g. like=x or like=params.",
            )
        return [x.shape for x in like_leaves]
    side = math.isqrt(len(tree_leaves))
    if side * side != len(tree_leaves):
        argument_error(
            "to_matrix",
            "like",
            "is needed: the tree is not a square grid of Hessian blocks",
            f"{len(tree_leaves)} blocks",
            "Pass like=<the differentiated input> to give the column blocks.",
        )
    shapes = []
    for k in range(side):
        diag = tree_leaves[k * side + k].shape[batch_dims:]
        half = len(diag) // 2
        if len(diag) % 2 or diag[:half] != diag[half:]:
            argument_error(
                "to_matrix",
                "like",
                "is needed: a diagonal block is not of shape x.shape + x.shape",
                f"block of shape {tuple(diag)}",
                "Pass like=<the differentiated input> to give the column blocks.",
            )
        shapes.append(diag[half:])
    return shapes


def to_matrix(tree: Any, like: Any = None, *, batch_dims: int = 0) -> torch.Tensor:
    """One matrix from a Jacobian or Hessian pytree.

    Works on a single tensor (``y.shape + x.shape`` becomes ``[y.numel(), x.numel()]``)
    and on nested blocks (argument tuples, parameter dicts): block ``(i, j)`` lands at
    rows of output leaf ``i`` and columns of input leaf ``j``. With ``batch_dims=1``
    per-sample results ``[B, ...]`` become ``[B, rows, cols]``.

    Args:
        tree: The derivative: a tensor or a pytree of blocks as returned by torchcurv or
            torch.func.
        like: The differentiated input (a tensor or pytree of tensors, without batch
            dims), giving the column blocks. May be omitted for the Hessian of a scalar,
            whose diagonal blocks tell the shapes.
        batch_dims: Number of leading batch dims each block carries.

    Returns:
        A tensor ``[*batch, rows, cols]``.

    Raises:
        TorchcurvError: If the blocks do not fit the column shapes.

    Example:
        >>> import torch, torchcurv
        >>> H = torch.zeros(1, 1, 28, 28, 1, 1, 28, 28)
        >>> torchcurv.to_matrix(H).shape
        torch.Size([784, 784])
        >>> J = torch.arange(6.0).reshape(3, 2)
        >>> torch.equal(torchcurv.to_matrix(J, like=torch.zeros(2)), J)
        True
    """
    batch_dims = _check_batch_dims("to_matrix", batch_dims)
    leaves = tree_flatten(tree)[0]
    if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
        argument_error(
            "to_matrix",
            "tree",
            "must be a tensor or a pytree of tensors",
            tree,
            "Pass the result of torchcurv.jacobian or torchcurv.hessian.",
        )
    columns = _column_shapes(leaves, like, batch_dims)
    width = len(columns)
    if len(leaves) % width:
        argument_error(
            "to_matrix",
            "tree",
            f"has {len(leaves)} blocks, not a multiple of the {width} input block(s) of like",
            describe(like),
            "Pass like= with the structure of the differentiated input.",
        )
    batch = leaves[0].shape[:batch_dims]
    rows = []
    for start in range(0, len(leaves), width):
        row_shape = None
        pieces = []
        for block, col in zip(leaves[start : start + width], columns, strict=True):
            ncol = len(col)
            if (
                block.shape[:batch_dims] != batch
                or block.dim() < batch_dims + ncol
                or (ncol and block.shape[block.dim() - ncol :] != col)
            ):
                argument_error(
                    "to_matrix",
                    "tree",
                    f"has a block that does not end in the "
                    f"input shape {tuple(col)} after {batch_dims} batch dim(s)",
                    block,
                    "Check like= and batch_dims=.",
                )
            this_rows = block.shape[batch_dims : block.dim() - ncol]
            if row_shape is None:
                row_shape = this_rows
            elif this_rows != row_shape:
                argument_error(
                    "to_matrix",
                    "tree",
                    "has blocks of one row with different output shapes",
                    block,
                    "Check like= and batch_dims=.",
                )
            pieces.append(block.reshape(*batch, math.prod(this_rows), math.prod(col)))
        rows.append(torch.cat(pieces, dim=-1))
    return torch.cat(rows, dim=-2)


def from_matrix(
    matrix: torch.Tensor, like: Any, *, rows_like: Any = None, batch_dims: int = 0
) -> Any:
    """The inverse of `to_matrix`: cut a matrix back into nested blocks.

    Args:
        matrix: ``[*batch, rows, cols]``.
        like: The differentiated input (tensor or pytree), giving the column blocks.
        rows_like: The output (tensor or pytree) giving the row blocks; defaults to
            `like`, the layout of a scalar function's Hessian.
        batch_dims: Number of leading batch dims of `matrix`.

    Returns:
        A pytree nested as torch.func nests derivatives: row structure outside, column
        structure inside; block ``(i, j)`` has shape
        ``(*batch, *rows_like_i.shape, *like_j.shape)``.

    Raises:
        TorchcurvError: If the matrix size does not match the blocks.

    Example:
        >>> import torch, torchcurv
        >>> params = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
        >>> M = torch.arange(36.0).reshape(6, 6)
        >>> blocks = torchcurv.from_matrix(M, params)
        >>> blocks["w"]["b"].shape
        torch.Size([2, 2, 2])
        >>> torch.equal(torchcurv.to_matrix(blocks, like=params), M)
        True
    """
    batch_dims = _check_batch_dims("from_matrix", batch_dims)
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != batch_dims + 2:
        argument_error(
            "from_matrix",
            "matrix",
            f"must be a tensor with {batch_dims} batch dim(s) and 2 matrix dims",
            matrix,
            "Pass the output of to_matrix.",
        )
    col_leaves, col_spec = tree_flatten(like)
    row_leaves, row_spec = tree_flatten(like if rows_like is None else rows_like)
    for argument, items in (("like", col_leaves), ("rows_like", row_leaves)):
        if not items or not all(isinstance(x, torch.Tensor) for x in items):
            argument_error(
                "from_matrix",
                argument,
                "must be a tensor or a pytree of tensors",
                like if argument == "like" else rows_like,
                "Pass the differentiated input (and output).",
            )
    n_rows = sum(x.numel() for x in row_leaves)
    n_cols = sum(x.numel() for x in col_leaves)
    if tuple(matrix.shape[-2:]) != (n_rows, n_cols):
        argument_error(
            "from_matrix",
            "matrix",
            f"must be {n_rows} x {n_cols} to match the blocks",
            matrix,
            "Check like= and rows_like=.",
        )
    batch = matrix.shape[:batch_dims]
    rows_out = []
    r0 = 0
    for row in row_leaves:
        c0 = 0
        cols_out = []
        for col in col_leaves:
            piece = matrix[..., r0 : r0 + row.numel(), c0 : c0 + col.numel()]
            cols_out.append(piece.reshape((*batch, *row.shape, *col.shape)))
            c0 += col.numel()
        rows_out.append(tree_unflatten(cols_out, col_spec))
        r0 += row.numel()
    return tree_unflatten(rows_out, row_spec)
