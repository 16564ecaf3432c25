"""`functional`: an nn.Module as a pure function of (a selection of) its parameters."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._checks import check_module
from ._errors import argument_error
from ._types import ParamSelection

__all__ = ["functional", "functional_of", "select_names"]


def select_names(function: str, module: nn.Module, params: Any) -> list[str]:
    named = dict(module.named_parameters())
    available = ", ".join(named) or "(none)"
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            argument_error(
                function,
                "params",
                "selected nothing: the module has no trainable parameters",
                params,
                f"Name parameters explicitly; available: {available}.",
            )
        return names
    if callable(params) and not isinstance(params, (str, Mapping)):
        names = [n for n, p in named.items() if params(n, p)]
        if not names:
            argument_error(
                function,
                "params",
                "is a predicate that matched no parameter",
                params,
                f"Available parameters: {available}.",
            )
        return names
    if isinstance(params, Mapping):
        patterns: Sequence[Any] = list(params.keys())
    elif isinstance(params, str):
        patterns = [params]
    elif isinstance(params, (list, tuple)):
        patterns = params
    else:
        argument_error(
            function,
            "params",
            "must be None, names, glob patterns, a dict of "
            "tensors or a predicate (name, tensor) -> bool",
            params,
            'Pass e.g. params=["fc2.*"] or params=lambda n, p: n.endswith("bias").',
        )
    if not patterns or not all(isinstance(p, str) for p in patterns):
        argument_error(
            function,
            "params",
            "must list parameter names or glob patterns (str)",
            params,
            "Pass names, e.g. [name for name, _ in "
            f"model.named_parameters()] or ['fc2.*']; available: {available}.",
        )
    names = []
    for pattern in patterns:
        matched = [n for n in named if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            argument_error(
                function,
                "params",
                "names a parameter or pattern that matches nothing",
                pattern,
                f"Available parameters: {available}.",
            )
        names.extend(n for n in matched if n not in names)
    return [n for n in named if n in names]


def functional(
    module: nn.Module, params: ParamSelection = None
) -> tuple[Callable[..., Any], dict[str, torch.Tensor]]:
    """A module as a pure function of the selected parameters.

    ``fn(params, *args, **kwargs)`` runs ``module(*args, **kwargs)`` through
    `torch.func.functional_call` with `params` in place of the selected parameters.
    Buffers and unselected parameters are held fixed at their current values. Tied
    weights stay tied: a shared tensor is one entry, under its first name.

    Args:
        module: The model. It is never modified.
        params: Which parameters to differentiate: None (all with
            ``requires_grad=True``), a name or glob pattern (``"fc2.*"``,
            ``"*.bias"``), a list of them, a predicate ``(name, tensor) -> bool``, or a
            dict ``{name: tensor}`` that also gives their values.

    Returns:
        ``(fn, params)``: the function and detached copies of the selected parameters
        (insertion order of ``named_parameters()``).

    Raises:
        TorchcurvError: If a name or pattern matches nothing (the message lists the
            available names), or `params` is of the wrong type.

    Example:
        >>> import torch, torchcurv
        >>> model = torch.nn.Linear(3, 1).double()
        >>> fn, params = torchcurv.functional(model, params="weight")
        >>> list(params)
        ['weight']
        >>> x = torch.ones(1, 3, dtype=torch.float64)
        >>> H = torchcurv.hessian(lambda p: (fn(p, x) ** 2).sum())(params)
        >>> torch.allclose(H["weight"]["weight"], 2 * torch.ones(1, 3, 1, 3, dtype=torch.float64))
        True
    """
    name = "functional"
    check_module(name, module)
    return functional_of(name, module, params)


def functional_of(
    function: str,
    module: nn.Module,
    params: ParamSelection,
    *,
    select: bool = True,
    attached: bool = False,
) -> tuple[Callable[..., Any], dict[str, torch.Tensor]]:
    """`functional` without the module check; ``select=False`` fixes every parameter.

    ``attached=True`` uses the parameters themselves instead of detached copies, so that
    results stay connected to the module's autograd graph (``create_graph=True``).
    """
    names = select_names(function, module, params) if select else []
    given = params if isinstance(params, Mapping) else {}
    selected = {}
    for n, p in module.named_parameters():
        if n in names:
            value = given.get(n, p)
            if not isinstance(value, torch.Tensor):
                argument_error(
                    function,
                    f"params[{n!r}]",
                    "must be a tensor",
                    value,
                    "Pass {name: tensor} or names only.",
                )
            selected[n] = value if attached else value.detach().clone()
    fixed = {
        n: p if attached else p.detach() for n, p in module.named_parameters() if n not in names
    }
    fixed.update({n: b.detach().clone() for n, b in module.named_buffers()})

    def fn(params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(
            module, {**fixed, **params}, args, kwargs, tie_weights=True, strict=False
        )

    return fn, selected
