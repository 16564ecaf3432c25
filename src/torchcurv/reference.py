"""The loop oracle: Jacobians and Hessians the classic way, one autograd call per row.

This is the code people write by hand before they find a vectorised library: for
every entry ``r`` of the output, ``torch.autograd.grad`` with a one-hot
``grad_outputs``. It uses no `vmap` and no forward mode, so it is an independent check
of every transform in torchcurv. It is slow by design; it is a reference, not a tool.

Unlike the hand-written loop, it returns zeros (never None, never the error "One of
the differentiated Tensors appears to not have been used in the graph") where the
output does not depend on an input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._transforms import (
    _assemble,
    _check_callable,
    _check_differentiable,
    _flat_output,
    _resolve_argnums,
    check_argnums,
)

__all__ = ["hessian", "jacobian"]


def _loop_rows(
    y: torch.Tensor, leaves: Sequence[torch.Tensor], create_graph: bool
) -> list[torch.Tensor]:
    """``d y / d leaf`` for each leaf, one ``autograd.grad`` call per entry of `y`.

    Returns one tensor per leaf, shaped ``y.shape + leaf.shape``.
    """
    flat_y = y.reshape(-1)
    rows: list[list[torch.Tensor]] = [[] for _ in leaves]
    grads: Sequence[torch.Tensor | None]
    for r in range(flat_y.numel()):
        if flat_y.requires_grad:
            one_hot = torch.zeros_like(flat_y)
            one_hot[r] = 1
            grads = torch.autograd.grad(
                flat_y,
                list(leaves),
                grad_outputs=one_hot,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
            )
        else:
            grads = (None,) * len(leaves)
        for j, (grad, leaf) in enumerate(zip(grads, leaves, strict=True)):
            rows[j].append(torch.zeros_like(leaf) if grad is None else grad)
    return [
        torch.stack(r).reshape((*y.shape, *leaf.shape))
        if r
        else leaf.new_zeros((*y.shape, *leaf.shape))
        for r, leaf in zip(rows, leaves, strict=True)
    ]


def _loop_derivative(
    func: Callable[..., Any], argnums: int | tuple[int, ...], order: int, name: str
) -> Callable[..., Any]:
    _check_callable(name, func)
    argnums = check_argnums(name, argnums)
    single = isinstance(argnums, int)

    def derivative(*args: Any, **kwargs: Any) -> Any:
        indices = _resolve_argnums(name, argnums, len(args))
        diff_args = tuple(args[i] for i in indices)
        flat_in, in_spec = tree_flatten(diff_args)
        _check_differentiable(name, flat_in, indices)
        with torch.enable_grad():
            leaves = [leaf.detach().requires_grad_(True) for leaf in flat_in]
            new_args = list(args)
            for index, value in zip(indices, tree_unflatten(leaves, in_spec), strict=True):
                new_args[index] = value
            flat_out, out_spec = _flat_output(name, func(*new_args, **kwargs))
            first = [_loop_rows(y, leaves, create_graph=order == 2) for y in flat_out]
            if order == 1:
                blocks: list[list[Any]] = [[b.detach() for b in row] for row in first]
            else:
                blocks = [
                    [
                        _assemble(
                            [[b.detach() for b in _loop_rows(block, leaves, False)]],
                            in_spec,
                            tree_flatten(0)[1],
                            single,
                        )
                        for block in row
                    ]
                    for row in first
                ]
        return _assemble(blocks, in_spec, out_spec, single)

    return derivative


def jacobian(func: Callable[..., Any], argnums: int | tuple[int, ...] = 0) -> Callable[..., Any]:
    """The Jacobian by the classic loop: one ``torch.autograd.grad`` per output entry.

    Same signature conventions and result layout as `torchcurv.jacobian`.

    Args:
        func: A function of tensors returning a tensor or a pytree of tensors.
        argnums: Which positional argument(s) to differentiate.

    Returns:
        A function returning the Jacobian, ``y.shape + x.shape`` per block.

    Example:
        >>> import torch
        >>> from torchcurv import reference
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> reference.jacobian(lambda x: x ** 2)(x)
        tensor([[2., 0.],
                [0., 4.]], dtype=torch.float64)
    """
    return _loop_derivative(func, argnums, 1, "reference.jacobian")


def hessian(func: Callable[..., Any], argnums: int | tuple[int, ...] = 0) -> Callable[..., Any]:
    """The Hessian by the classic loop: differentiate every gradient entry again.

    Same signature conventions and result layout as `torchcurv.hessian`; a function
    linear in (or independent of) its input gets zeros.

    Args:
        func: A function of tensors returning a tensor or a pytree of tensors.
        argnums: Which positional argument(s) to differentiate.

    Returns:
        A function returning the Hessian, ``y.shape + x.shape + x.shape`` per block.

    Example:
        >>> import torch
        >>> from torchcurv import reference
        >>> w = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> x = torch.tensor([0.3, 0.7], dtype=torch.float64)
        >>> reference.hessian(lambda x: w @ x)(x)  # linear: zeros, not an error
        tensor([[0., 0.],
                [0., 0.]], dtype=torch.float64)
    """
    return _loop_derivative(func, argnums, 2, "reference.hessian")
