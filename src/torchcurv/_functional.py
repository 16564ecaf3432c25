"""`functional`: an nn.Module as a pure function of (a selection of) its parameters."""

from __future__ import annotations

import copy
import fnmatch
import inspect
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ._checks import check_module
from ._compat import global_module_hooks, tree_map
from ._decompositions import corrected_ops, discarding_running_updates
from ._errors import TorchcurvError, argument_error
from ._types import ParamSelection

__all__ = ["functional", "functional_of", "select_names"]


def aliases(module: nn.Module) -> dict[str, str]:
    """Every name of every parameter -> the name `named_parameters()` gives it (a tied
    weight's later names map to its first)."""
    first: dict[int, str] = {}
    names = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names[n] = first.setdefault(id(p), n)
    return names


def _predicate(function: str, params: Callable[..., Any]) -> Callable[[str, Any], Any]:
    """A predicate of (name, tensor) or of the name alone, as a function of both."""
    try:
        signature = inspect.signature(params)
    except (TypeError, ValueError):  # a builtin without a signature: assume (name, tensor)
        return params
    for arguments, wrap in ((("n", None), params), (("n",), lambda n, p: params(n))):
        try:
            signature.bind(*arguments)
        except TypeError:
            continue
        return wrap
    argument_error(
        function,
        "params",
        "is a callable that takes neither (name, tensor) nor (name)",
        params,
        'Pass e.g. params=lambda name, p: name.endswith("bias").',
    )


def select_names(function: str, module: nn.Module, params: Any) -> list[str]:
    named = dict(module.named_parameters())
    every = aliases(module)
    available = ", ".join(named) or "(none)"
    if len(every) > len(named):
        available += " (tied: " + ", ".join(f"{a} is {n}" for a, n in every.items() if a != n)
        available += ")"
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
        predicate = _predicate(function, params)
        names = [n for n, p in named.items() if predicate(n, p)]
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
    for pattern in patterns:  # a tied weight's every name selects its one entry
        matched = [every[n] for n in every if n == pattern or fnmatch.fnmatchcase(n, pattern)]
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
    weights stay tied: a shared tensor is one entry, under its first name. Every call
    works on copies of the buffers and of the tensors passed in (a forward that edits
    them in place edits the copies), runs the ops whose second derivatives are wrong
    upstream through `torchcurv._decompositions.corrected_ops` (batch norm in training
    and instance norm with running statistics normalise by the batch's or the input's
    statistics; the running ones, copies, are left as they were), and skips the module's
    backward hooks (the derivatives are those of the forward; forward hooks run).

    Args:
        module: The model. It is never modified.
        params: Which parameters to differentiate: None (all with
            ``requires_grad=True``), a name or glob pattern (``"fc2.*"``,
            ``"*.bias"``), a list of them, a predicate ``(name, tensor) -> bool`` or
            ``(name) -> bool``, or a dict ``{name: tensor}`` that also gives their
            values. Any name of a tied weight selects its one entry.

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
    aliased: bool = False,
    routing: Callable[[], bool] | None = None,
) -> tuple[Callable[..., Any], dict[str, torch.Tensor]]:
    """`functional` without the module check; ``select=False`` fixes every parameter.

    ``attached=True`` uses the parameters themselves instead of detached copies, so that
    results stay connected to the module's autograd graph (``create_graph=True``).
    ``aliased=True`` reads the parameters and buffers through detached aliases and
    passes the inputs as they come (no copies; the aliases are made once and valid for
    repeated calls: an optimizer's in-place update is seen): for callers that ran the
    forward once on copies, found it writes no parameter, and pass their own copies of
    the buffers and inputs it writes (`torchcurv._objective.Objective`). A write the
    first forward did not show is met inside the transforms by torch.func's "mutate a
    captured Tensor" error, reported as the in-place write it is. ``routing``, when
    given, says at each call whether to route the forward (`corrected_ops`); a caller
    whose first forward called no routed op skips the mode.
    """
    names = select_names(function, module, params) if select else []
    given = {}
    if isinstance(params, Mapping):
        every = aliases(module)
        given = {every[k]: (k, v) for k, v in params.items()}
    named = list(module.named_parameters())
    selected = {}
    for n, p in named:
        if n in names:
            key, value = given.get(n, (n, p))
            if not isinstance(value, torch.Tensor):
                argument_error(
                    function,
                    f"params[{key!r}]",
                    "must be a tensor",
                    value,
                    "Pass {name: tensor} or names only.",
                )
            if value.shape != p.shape:
                argument_error(
                    function,
                    f"params[{key!r}]",
                    f"must have the parameter's shape {tuple(p.shape)}",
                    value,
                    f"Pass a tensor shaped like module.get_parameter({n!r}).",
                )
            alias = value if attached else value.detach()
            selected[n] = alias if attached or aliased else alias.clone()
    # Copies, once per call: a forward that writes a parameter in place outside a
    # transform writes these, never the caller's.
    fixed = {
        n: p.clone() if attached else p.detach() if aliased else p.detach().clone()
        for n, p in named
        if n not in names
    }
    buffers = {n: b.detach() for n, b in module.named_buffers()}
    copied = not aliased
    target = _without_backward_hooks(module)

    def fn(params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        # Inputs and buffers (unless aliased) are copied on every call, inside any
        # enclosing transform, so a forward that edits them in place edits its own
        # copies (never the caller's tensors, and no "mutate a captured tensor" error
        # under torch.func).
        _refuse_global_backward_hooks(function)
        state = {**fixed, **({n: b.clone() for n, b in buffers.items()} if copied else buffers)}
        state.update(params)
        if not copied:
            pass  # the caller copies the inputs the forward writes
        elif kwargs or not all(isinstance(a, torch.Tensor) for a in args):
            args, kwargs = tree_map(_copy, (args, kwargs))
        else:
            args = tuple(a.clone() for a in args)
        try:
            if routing is not None and not routing():
                return torch.func.functional_call(
                    target, state, args, kwargs, tie_weights=True, strict=False
                )
            with corrected_ops(), discarding_running_updates():
                return torch.func.functional_call(
                    target, state, args, kwargs, tie_weights=True, strict=False
                )
        except RuntimeError as error:
            if "would mutate a captured Tensor" not in str(error):
                raise
            op = re.search(r"\((aten::[^)]*)\)", str(error))
            message = in_place_message(function, module, op.group(1) if op else None)
            raise TorchcurvError(message) from None

    return fn, selected


def in_place_message(function: str, module: nn.Module, op: str | None) -> str:
    """The refusal of a forward that writes a parameter (or a captured tensor) in place."""
    return (
        f"{function}: the forward of {type(module).__name__} writes in place "
        f"({op or 'an in-place op'}) into a parameter or another tensor it captures, "
        "and torchcurv never writes the caller's tensors. Do that write outside the "
        "forward (e.g. clamp the weights after the optimizer step), or write out of place."
    )


class InPlaceWrites(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records (``.op``) the first op that writes into a tensor whose storage is one of
    `storages` (data pointers)."""

    def __init__(self, storages: set[int]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.storages = storages
        self.op: str | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.op is None and func._schema.is_mutable:
            written = [
                value
                for argument, value in zip(func._schema.arguments, args, strict=False)
                if argument.alias_info is not None and argument.alias_info.is_write
            ]
            written += [
                kwargs[a.name]
                for a in func._schema.arguments
                if a.name in kwargs and a.alias_info is not None and a.alias_info.is_write
            ]
            if any(
                isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages
                for t in written
            ):
                self.op = f"aten::{func._schema.name.split('::')[-1]}"
        return func(*args, **kwargs)


def _refuse_global_backward_hooks(function: str) -> None:
    hooks = [kind for kind in global_module_hooks() if kind.startswith("backward")]
    if hooks:
        raise TorchcurvError(
            f"{function}: global module {' and '.join(hooks)} hooks are registered "
            "(torch.nn.modules.module.register_module_full_backward_hook); torch.func "
            "cannot run them inside derivatives, and torchcurv does not switch off "
            "process-wide hooks. Remove them around the call (handle.remove()), or "
            "register them on the module, where torchcurv skips them."
        )


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


def _has_backward_hooks(module: nn.Module) -> bool:
    return bool(module._backward_hooks or module._backward_pre_hooks)


def has_backward_hooks(module: nn.Module) -> bool:
    """Whether `module` or a submodule has backward hooks (see `_without_backward_hooks`)."""
    return any(_has_backward_hooks(m) for m in module.modules())


def _without_backward_hooks(module: nn.Module) -> nn.Module:
    """`module`, or a copy of its tree of modules without backward hooks if it has any.

    Backward hooks (``register_full_backward_hook``, as BackPACK and Captum install
    them) observe or rewrite gradients of a training backward; inside a curvature
    computation they would fire once per basis vector on transformed tensors, and
    torch.func cannot run them (their ``autograd.Function`` has no ``setup_context``).
    The derivatives are those of the forward: the copy keeps the forward hooks, and
    shares the caller's hook functions, parameters and buffers (shallow copies of each
    module, with their own dictionaries, so nothing of the caller's is changed).
    """
    if not has_backward_hooks(module):
        return module
    copies: dict[int, nn.Module] = {}

    def copy_of(m: nn.Module) -> nn.Module:
        if id(m) in copies:
            return copies[id(m)]  # shared submodules stay shared
        clone = copy.copy(m)
        copies[id(m)] = clone
        clone._parameters = dict(m._parameters)
        clone._buffers = dict(m._buffers)
        clone._modules = {
            name: None if child is None else copy_of(child) for name, child in m._modules.items()
        }
        clone._backward_hooks = OrderedDict()
        clone._backward_pre_hooks = OrderedDict()
        clone._is_full_backward_hook = None
        return clone

    return copy_of(module)
