"""The loop oracle: Jacobians and Hessians the classic way, one autograd call per row.

This is the code people write by hand before they find a vectorised library: for
every entry ``r`` of the output, ``torch.autograd.grad`` with a one-hot
``grad_outputs``; a Hessian differentiates every entry of that Jacobian again. It uses
no `vmap` and no forward mode, and it shares no code with the rest of torchcurv (only
its error types), so it is an independent check of every transform. It is slow by
design; it is a reference, not a tool.

Unlike the hand-written loop, it returns zeros (never None, never the error "One of
the differentiated Tensors appears to not have been used in the graph") where the
output does not depend on an input, and it works the same under `torch.no_grad` and
`torch.inference_mode`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ._errors import TorchcurvError, argument_error, describe

__all__ = ["hessian", "jacobian"]

Argnums = int | tuple[int, ...]


# --------------------------------------------------------------------------------------
# argument checks: when the transform is built, then when it is called
# --------------------------------------------------------------------------------------


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_build_arguments(name: str, func: Any, argnums: Any, create_graph: Any) -> Argnums:
    if not callable(func):
        argument_error(
            name,
            "func",
            "must be callable",
            func,
            "Pass a function of tensors, e.g. lambda x: (x ** 2).sum().",
        )
    if not isinstance(create_graph, bool):
        argument_error(
            name,
            "create_graph",
            "must be a bool",
            create_graph,
            "Pass create_graph=True to keep the result attached to the graph, else False.",
        )
    if _is_index(argnums):
        return int(argnums)
    if not (isinstance(argnums, tuple) and argnums and all(_is_index(a) for a in argnums)):
        argument_error(
            name,
            "argnums",
            "must be an int or a non-empty tuple of ints",
            argnums,
            "Pass argnums=0 for the first argument or argnums=(0, 1) for several.",
        )
    if len(set(argnums)) != len(argnums):
        argument_error(
            name,
            "argnums",
            "must not repeat an index",
            argnums,
            "Name each argument once, e.g. argnums=(0, 1).",
        )
    return tuple(int(a) for a in argnums)


def _argument_positions(name: str, argnums: Argnums, nargs: int) -> tuple[int, ...]:
    """The non-negative positions `argnums` names in a call with `nargs` arguments."""
    requested = (argnums,) if isinstance(argnums, int) else argnums
    if any(not -nargs <= a < nargs for a in requested):
        argument_error(
            name,
            "argnums",
            f"is out of range for a call with {nargs} positional argument(s)",
            argnums,
            f"Use indices between {-nargs} and {nargs - 1}."
            if nargs
            else "Call the transformed function with the tensors to differentiate.",
        )
    positions = tuple(a % nargs for a in requested)
    if len(set(positions)) != len(positions):
        argument_error(
            name,
            "argnums",
            "names the same argument twice",
            argnums,
            "Name each argument once, e.g. argnums=(0, 1) rather than (0, -2).",
        )
    return positions


def _check_inputs(name: str, leaves: Sequence[Any], argnums: Argnums) -> list[torch.Tensor]:
    where = f"the argument(s) at argnums={argnums}"
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            argument_error(
                name,
                where,
                "must be tensors or pytrees of tensors",
                leaf,
                "Pass floating-point tensors, e.g. torch.tensor([1.0, 2.0]).",
            )
        if leaf.is_complex():
            argument_error(
                name,
                where,
                "must be real: the loop oracle does not differentiate complex tensors",
                leaf,
                "Differentiate the real and imaginary parts as real tensors, "
                "e.g. pass torch.view_as_real(z) and rebuild z with torch.view_as_complex.",
            )
        if not leaf.is_floating_point():
            argument_error(
                name,
                where,
                "must be floating-point to be differentiated",
                leaf,
                "Convert it with x.to(torch.float64) (or .float()), or leave it out of argnums.",
            )
    return list(leaves)


def _check_outputs(name: str, out: Any) -> tuple[list[torch.Tensor], TreeSpec]:
    leaves, spec = tree_flatten(out)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        argument_error(
            name,
            "func",
            "must return a Tensor or a pytree of Tensors",
            out,
            "Return tensors only, e.g. a loss tensor or a dict of tensors.",
        )
    for leaf in leaves:
        if leaf.is_complex():
            argument_error(
                name,
                "func",
                "must return real tensors: the loop oracle does not differentiate complex ones",
                out,
                "Return torch.view_as_real(y) to differentiate the real and imaginary parts.",
            )
    return leaves, spec


def _refuse_inference_tensor(name: str, error: RuntimeError) -> None:
    """Re-raise torch's error about an inference tensor with the cause and the fix.

    Returns (for the caller to re-raise `error` itself) when it is about anything else.
    """
    if "inference tensor" not in str(error).lower():
        return
    raise TorchcurvError(
        f"{name}: func uses a tensor created under torch.inference_mode() (a parameter or "
        f"a captured tensor) in a computation autograd must record, got {describe(error)}. "
        "Create that tensor outside inference mode, or clone it under "
        "torch.inference_mode(False); the differentiated arguments themselves may be "
        "inference tensors."
    ) from error


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------


def _differentiable_copy(leaf: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """The tensor `func` receives in place of `leaf`, and the one we differentiate by.

    With `create_graph` and a `leaf` that requires grad, an alias of the caller's tensor
    (a view), so the result stays attached to the caller's graph; a fresh node per
    argument keeps the derivatives partial when one tensor is passed twice or is also
    captured by `func`. Otherwise a detached copy: a clone, because an inference
    tensor cannot be made to require grad.
    """
    if create_graph and leaf.requires_grad and not leaf.is_inference():
        return leaf.view_as(leaf)
    return leaf.detach().clone().requires_grad_(True)


def _derivative_rows(
    y: torch.Tensor, wrt: Sequence[torch.Tensor], create_graph: bool
) -> list[torch.Tensor]:
    """``d y / d w`` for each ``w`` in `wrt`, one ``autograd.grad`` per entry of `y`.

    Returns one tensor per ``w``, shaped ``y.shape + w.shape``; a ``w`` that `y` does not
    depend on (or a `y` outside the graph, such as an integer output) gets zeros.
    """
    flat_y = y.reshape(-1)
    rows: list[list[torch.Tensor]] = [[] for _ in wrt]
    if flat_y.requires_grad:
        for r in range(flat_y.numel()):
            one_hot = torch.zeros_like(flat_y)
            one_hot[r] = 1
            grads: Sequence[torch.Tensor | None] = torch.autograd.grad(
                flat_y,
                list(wrt),
                grad_outputs=one_hot,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
            )
            for row, grad, w in zip(rows, grads, wrt, strict=True):
                row.append(torch.zeros_like(w) if grad is None else grad)
    return [
        torch.stack(row).reshape((*y.shape, *w.shape))
        if row
        else w.new_zeros((*y.shape, *w.shape))
        for row, w in zip(rows, wrt, strict=True)
    ]


def _nest_inputs(blocks: Sequence[Any], in_spec: TreeSpec, single: bool) -> Any:
    """Lay blocks out like the differentiated arguments (unwrapped for an int argnums)."""
    nested = tree_unflatten(list(blocks), in_spec)
    return nested[0] if single else nested


def _loop_derivative(
    name: str, func: Any, argnums: Any, create_graph: Any, order: int
) -> Callable[..., Any]:
    argnums = _check_build_arguments(name, func, argnums, create_graph)
    single = isinstance(argnums, int)

    def derivative(*args: Any, **kwargs: Any) -> Any:
        positions = _argument_positions(name, argnums, len(args))
        flat_in, in_spec = tree_flatten(tuple(args[p] for p in positions))
        inputs = _check_inputs(name, flat_in, argnums)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                wrt = [_differentiable_copy(x, create_graph) for x in inputs]
                call_args = list(args)
                for p, value in zip(positions, tree_unflatten(wrt, in_spec), strict=True):
                    call_args[p] = value
                outputs, out_spec = _check_outputs(name, func(*call_args, **kwargs))
                # The first stage keeps its graph when a second stage differentiates it.
                first = [_derivative_rows(y, wrt, create_graph or order == 2) for y in outputs]
                per_output = []
                for row in first:
                    blocks: list[Any] = list(row)
                    if order == 2:  # differentiate each Jacobian block once more
                        blocks = [
                            _nest_inputs(_derivative_rows(b, wrt, create_graph), in_spec, single)
                            for b in row
                        ]
                    per_output.append(_nest_inputs(blocks, in_spec, single))
        except RuntimeError as error:
            _refuse_inference_tensor(name, error)
            raise
        return tree_unflatten(per_output, out_spec)

    return derivative


# --------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------


def jacobian(
    func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, *, create_graph: bool = False
) -> Callable[..., Any]:
    """The Jacobian by the classic loop: one ``torch.autograd.grad`` per output entry.

    Same conventions and result layout as `torchcurv.jacobian` and `torch.func.jacrev`:
    for one input ``x`` and output ``y`` the result has shape ``y.shape + x.shape``; with
    pytrees it nests as the output structure outside, the differentiated arguments inside
    (a tuple of them when `argnums` is a tuple). It computes one sample; batch by
    stacking a Python loop over samples, ``(B, *y, *x)``. It works the same under
    `torch.no_grad` and `torch.inference_mode`.

    Args:
        func: A function of tensors returning a tensor or a pytree of tensors.
        argnums: Which positional argument(s) to differentiate.
        create_graph: If True, the result stays attached to the caller's graph, so it
            can be differentiated again, with respect to the arguments (when they
            require grad) and to tensors `func` captures, such as parameters. If False,
            the result is detached.

    Returns:
        A function of ``func``'s arguments returning the Jacobian.

    Raises:
        TorchcurvError: If `func` is not callable, `argnums` is not an int or a tuple of
            distinct ints, or, at call time, `argnums` is out of range, a differentiated
            argument is not a real floating-point tensor, or `func` returns anything but
            real tensors.

    Example:
        >>> import torch
        >>> from torchcurv import reference
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> reference.jacobian(lambda x: x ** 2)(x)  # diag(2 x)
        tensor([[2., 0.],
                [0., 4.]], dtype=torch.float64)
        >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> J = reference.jacobian(lambda A, x: A @ x, argnums=(0, 1))(A, x)
        >>> J[1]  # d(A x)/dx = A
        tensor([[1., 2.],
                [3., 4.]], dtype=torch.float64)
        >>> J[0].shape  # d(A x)/dA: (Ax).shape + A.shape
        torch.Size([2, 2, 2])
    """
    return _loop_derivative("reference.jacobian", func, argnums, create_graph, 1)


def hessian(
    func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, *, create_graph: bool = False
) -> Callable[..., Any]:
    """The Hessian by the classic loop: differentiate every gradient entry again.

    Same conventions and result layout as `torchcurv.hessian` and `torch.func.hessian`:
    for one input ``x`` and output ``y`` the result has shape
    ``y.shape + x.shape + x.shape``; with pytrees it nests as the output structure, then
    the row argument, then the column argument (tuples of them when `argnums` is a
    tuple). A function linear in (or independent of) its input gets zeros. It computes
    one sample; batch by stacking a Python loop over samples, ``(B, *y, *x, *x)``. It
    works the same under `torch.no_grad` and `torch.inference_mode`.

    Args:
        func: A function of tensors returning a tensor or a pytree of tensors.
        argnums: Which positional argument(s) to differentiate.
        create_graph: If True, the result stays attached to the caller's graph, so a
            loss of the Hessian can be differentiated with respect to the arguments
            (when they require grad) and to tensors `func` captures, such as
            parameters. If False, the result is detached.

    Returns:
        A function of ``func``'s arguments returning the Hessian.

    Raises:
        TorchcurvError: As `jacobian`.

    Example:
        >>> import torch
        >>> from torchcurv import reference
        >>> w = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> x = torch.tensor([0.3, 0.7], dtype=torch.float64)
        >>> reference.hessian(lambda x: w @ x)(x)  # linear: zeros, not an error
        tensor([[0., 0.],
                [0., 0.]], dtype=torch.float64)
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 3.0]], dtype=torch.float64, requires_grad=True)
        >>> H = reference.hessian(lambda x: x @ A @ x, create_graph=True)(x)
        >>> H.detach()  # the Hessian of x^T A x is A + A^T
        tensor([[2., 2.],
                [2., 6.]], dtype=torch.float64)
        >>> torch.autograd.grad(H.trace(), A)[0]  # trace(A + A^T) = 2 trace(A)
        tensor([[2., 0.],
                [0., 2.]], dtype=torch.float64)
    """
    return _loop_derivative("reference.hessian", func, argnums, create_graph, 2)
