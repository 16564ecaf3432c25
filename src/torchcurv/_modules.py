"""nn.Modules as pure functions, and their per-sample and batch-level derivatives.

`functional` turns a module into ``fn(params, *args, **kwargs)`` through
`torch.func.functional_call`. The module-level transforms build one objective for a
single sample, ``objective(diff, inputs, target)``, differentiate it with
`torchcurv.jacobian` / `torchcurv.hessian` and batch it with `per_sample` (or, at batch
level, apply it to the whole batch). The user's module is never modified: parameters
and buffers are passed as detached copies and the training flag is left alone.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ._batching import BATCH_RANDOMNESS, check_batch_chunk_size, run_chunked
from ._errors import TorchcurvError, UnsupportedModuleError, argument_error, describe
from ._planning import WORK_PER_FORWARD, count_allocations, parse_budget, plan_chunks
from ._structured import (
    prefer_structured,
    structured_cost,
    structured_input_hessian,
    unsupported_layer,
)
from ._transforms import (
    HESSIAN_MODES,
    JACOBIAN_MODES,
    _check_mode,
    check_chunk_size,
    check_randomness,
    hessian,
    hessian_basis_sizes,
    jacobian,
)

logger = logging.getLogger("torchcurv")

__all__ = ["batch_hessian", "functional", "per_sample_hessian", "per_sample_jacobian"]

ParamSelection = (
    None | str | Sequence[str] | Callable[[str, torch.Tensor], bool] | Mapping[str, torch.Tensor]
)
Wrt = Literal["inputs", "params", "both"]
OutputSelection = None | int | slice | tuple[Any, ...] | Callable[[Any], torch.Tensor]
LossFunction = Callable[[Any, torch.Tensor], torch.Tensor]
ModuleChunk = int | Literal["auto"] | tuple[int | None, int | None, int | None] | None

WRT: tuple[str, ...] = ("inputs", "params", "both")


# --------------------------------------------------------------------------------------
# module -> pure function
# --------------------------------------------------------------------------------------


def _check_module(function: str, module: Any) -> None:
    if not isinstance(module, nn.Module):
        argument_error(
            function,
            "module",
            "must be a torch.nn.Module",
            module,
            "Pass the model itself, e.g. torchcurv.functional(model).",
        )


def _select_names(function: str, module: nn.Module, params: Any) -> list[str]:
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
    _check_module(name, module)
    return _functional(name, module, params)


def _functional(
    function: str, module: nn.Module, params: ParamSelection, *, select: bool = True
) -> tuple[Callable[..., Any], dict[str, torch.Tensor]]:
    """`functional` without the module check; ``select=False`` fixes every parameter."""
    names = _select_names(function, module, params) if select else []
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
            selected[n] = value.detach().clone()
    fixed = {n: p.detach() for n, p in module.named_parameters() if n not in names}
    fixed.update({n: b.detach().clone() for n, b in module.named_buffers()})

    def fn(params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(
            module, {**fixed, **params}, args, kwargs, tie_weights=True, strict=False
        )

    return fn, selected


# --------------------------------------------------------------------------------------
# checks on modules, inputs and objectives
# --------------------------------------------------------------------------------------


def _check_layers(function: str, module: nn.Module, randomness: str) -> None:
    for path, layer in module.named_modules():
        where = f"{type(layer).__name__} at {path!r}" if path else type(layer).__name__
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training:
            raise UnsupportedModuleError(
                f"{function}: {where} is in training mode: its batch statistics couple the "
                "samples and its running statistics would be updated. Call model.eval() "
                "first (and model.train() afterwards if you are training)."
            )
        if (
            isinstance(layer, nn.modules.dropout._DropoutNd)
            and layer.training
            and layer.p > 0
            and randomness == "error"
        ):
            raise UnsupportedModuleError(
                f"{function}: {where} is in training mode and randomness='error'. Call "
                "model.eval() to switch dropout off, or pass randomness='different' (each "
                "sample its own mask, shared by all rows of its derivative) or 'same'."
            )


def _as_inputs(
    function: str, inputs: Any, need_float: bool
) -> tuple[tuple[torch.Tensor, ...], bool]:
    single = isinstance(inputs, torch.Tensor)
    xs = (inputs,) if single else inputs
    if not isinstance(xs, tuple) or not xs or not all(isinstance(x, torch.Tensor) for x in xs):
        argument_error(
            function,
            "inputs",
            "must be a tensor or a non-empty tuple of tensors (the module's positional arguments)",
            inputs,
            "Pass inputs=X, or inputs=(x1, x2) for a forward with several inputs.",
        )
    for x in xs:
        if x.dim() == 0:
            argument_error(
                function,
                "inputs",
                "must have a leading batch dim",
                x,
                "Pass a batch, e.g. X of shape (B, ...); use x.unsqueeze(0) for one sample.",
            )
        if need_float and not x.is_floating_point():
            argument_error(
                function,
                "inputs",
                "must be floating-point to be differentiated",
                x,
                "Convert with X.double() or X.float(), or use wrt='params'.",
            )
    return xs, single


def _check_objective(function: str, output: Any, loss: Any, targets: Any) -> None:
    if loss is not None and not callable(loss):
        argument_error(
            function,
            "loss",
            "must be callable (out, target) -> scalar",
            loss,
            "Pass e.g. loss=torch.nn.functional.cross_entropy.",
        )
    if loss is not None and targets is None:
        argument_error(
            function,
            "targets",
            "must be given with loss=",
            targets,
            "Pass targets=Y with one target per sample.",
        )
    if loss is None and targets is not None:
        argument_error(
            function,
            "loss",
            "must be given with targets=",
            loss,
            "Pass loss=torch.nn.functional.cross_entropy (or any (out, y) -> scalar).",
        )
    if loss is not None and output is not None:
        argument_error(
            function,
            "output",
            "cannot be combined with loss=",
            output,
            "Pass output= to differentiate a model output, or loss= and targets= "
            "to differentiate a loss.",
        )
    if targets is not None and not isinstance(targets, torch.Tensor):
        argument_error(
            function,
            "targets",
            "must be a tensor",
            targets,
            "Pass targets as a tensor with one entry per sample.",
        )
    if output is not None and not (callable(output) or isinstance(output, (int, slice, tuple))):
        argument_error(
            function,
            "output",
            "must be an int, a slice, an index tuple or a callable out -> tensor",
            output,
            "Pass output=2 for class 2's logit.",
        )


def _select_output(function: str, out: Any, output: OutputSelection) -> torch.Tensor:
    if output is None:
        selected = out
    elif callable(output):
        selected = output(out)
    elif isinstance(out, (tuple, list)) and isinstance(output, int):
        selected = out[output]
    else:
        try:
            selected = out[output]
        except (IndexError, TypeError) as error:
            shape = describe(out)
            raise TorchcurvError(
                f"{function}: output={output!r} cannot index the per-sample output {shape}: "
                f"{error}. Use an index valid for one sample's output (batch dim removed)."
            ) from None
    if not isinstance(selected, torch.Tensor):
        argument_error(
            function,
            "output",
            "did not produce a tensor",
            selected,
            "Select a tensor, e.g. output=0 for the first element of a tuple "
            "output, or output=lambda out: out['logits'].",
        )
    return selected


def _drop_batch(function: str, out: Any) -> Any:
    def first(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != 1:
            argument_error(
                function,
                "module",
                "must return outputs with a leading batch dim",
                t,
                "torchcurv feeds one sample as a batch of one; return (1, ...) "
                "outputs, or wrap the module.",
            )
        return t[0]

    return tree_map(first, out)


def _loss_value(function: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        argument_error(
            function,
            "loss",
            "must return a scalar (one-element) tensor",
            value,
            "Use a reduction such as reduction='mean' or 'sum'.",
        )
    return value.reshape(())


class _Objective:
    """A module and a choice of what to differentiate, as functions of one sample."""

    def __init__(
        self,
        function: str,
        module: nn.Module,
        inputs: Any,
        *,
        wrt: Any,
        params: ParamSelection,
        output: OutputSelection,
        loss: LossFunction | None,
        targets: torch.Tensor | None,
        kwargs: Mapping[str, Any] | None,
    ) -> None:
        _check_module(function, module)
        if wrt not in WRT:
            argument_error(
                function,
                "wrt",
                "must be 'inputs', 'params' or 'both'",
                wrt,
                "Pass wrt='inputs' (input curvature) or wrt='params'.",
            )
        _check_objective(function, output, loss, targets)
        if kwargs is not None and not isinstance(kwargs, Mapping):
            argument_error(
                function,
                "kwargs",
                "must be a dict of keyword arguments",
                kwargs,
                "Pass kwargs={'mask': mask}.",
            )
        self.function, self.module, self.wrt = function, module, wrt
        self.output, self.loss, self.targets = output, loss, targets
        self.kwargs = dict(kwargs or {})
        self.xs, self.single = _as_inputs(function, inputs, wrt != "params")
        if wrt == "inputs" and params is not None:
            argument_error(
                function,
                "params",
                "only applies with wrt='params' or wrt='both'",
                params,
                "Drop params=, or pass wrt='params'.",
            )
        self.fn, self.params = _functional(function, module, params, select=wrt != "inputs")

    def diff(self, xs: tuple[Any, ...]) -> Any:
        """The differentiated pytree for inputs `xs` (one sample or the whole batch)."""
        x = xs[0] if self.single else xs
        if self.wrt == "inputs":
            return x
        if self.wrt == "params":
            return self.params
        return {"inputs": x, "params": self.params}

    def _split(self, diff: Any, xs: Any) -> tuple[Mapping[str, torch.Tensor], tuple[Any, ...]]:
        if self.wrt == "inputs":
            return self.params, (diff,) if self.single else tuple(diff)
        if self.wrt == "params":
            return diff, xs
        x = diff["inputs"]
        return diff["params"], (x,) if self.single else tuple(x)

    def per_sample(self, diff: Any, xs: Any, target: Any) -> torch.Tensor:
        """The objective of one sample (fed to the module as a batch of one)."""
        params, xs = self._split(diff, xs)
        out = self.fn(params, *(x.unsqueeze(0) for x in xs), **self.kwargs)
        if self.loss is not None:
            return _loss_value(self.function, self.loss(out, target.unsqueeze(0)))
        return _select_output(self.function, _drop_batch(self.function, out), self.output)

    def whole_batch(self, diff: Any, xs: Any, target: Any) -> torch.Tensor:
        """The objective of the whole batch (the loss over all samples)."""
        params, xs = self._split(diff, xs)
        out = self.fn(params, *xs, **self.kwargs)
        if self.loss is not None:
            return _loss_value(self.function, self.loss(out, target))
        return _select_output(self.function, out, self.output)

    def batch_size(self) -> int:
        sizes = {x.shape[0] for x in self.xs}
        if self.targets is not None:
            if self.targets.dim() == 0:
                argument_error(
                    self.function,
                    "targets",
                    "must have a leading batch dim",
                    self.targets,
                    "Pass one target per sample.",
                )
            sizes.add(self.targets.shape[0])
        if len(sizes) != 1:
            argument_error(
                self.function,
                "inputs",
                "and targets must have the same batch size",
                sorted(sizes),
                "Pass one entry per sample in each.",
            )
        return int(sizes.pop())

    def in_dims(self) -> tuple[Any, Any, Any]:
        x_dims: Any = 0 if self.single else (0,) * len(self.xs)
        diff_dims: Any = (
            {"inputs": x_dims, "params": None}
            if self.wrt == "both"
            else (x_dims if self.wrt == "inputs" else None)
        )
        xs_dims = (0,) * len(self.xs) if self.wrt == "params" else None
        return diff_dims, xs_dims, None if self.targets is None else 0

    def args(self) -> tuple[Any, Any, Any]:
        return self.diff(self.xs), self.xs if self.wrt == "params" else None, self.targets

    def signature(self, order: int) -> tuple[Any, ...]:
        """What the working memory of one sample depends on (not parameter values)."""
        return (
            self.wrt,
            order,
            tuple((n, tuple(p.shape), p.dtype) for n, p in self.params.items()),
            tuple((tuple(x.shape[1:]), x.dtype) for x in self.xs),
            None if self.targets is None else (tuple(self.targets.shape[1:]), self.targets.dtype),
            repr(self.output) if not callable(self.output) else id(self.output),
            id(self.loss),
            tuple(sorted(self.kwargs)),
        )

    def sample(self, index: int) -> tuple[Any, Any, Any]:
        """``(diff, xs, target)`` of one sample, without its batch dim."""
        xs = tuple(x[index] for x in self.xs)
        target = None if self.targets is None else self.targets[index]
        return self.diff(xs), xs if self.wrt == "params" else None, target


# --------------------------------------------------------------------------------------
# planning for module-level calls
# --------------------------------------------------------------------------------------

_PROBES: weakref.WeakKeyDictionary[
    nn.Module, dict[tuple[Any, ...], tuple[int, tuple[int, ...]]]
] = weakref.WeakKeyDictionary()


def _probe(obj: _Objective, order: int) -> tuple[int, tuple[int, ...]]:
    """``(work, shape)``: working bytes of one basis vector of one sample, and the shape
    of the differentiated output of one sample.

    The work is `WORK_PER_FORWARD` ``[order]`` times the bytes the operators of one
    single-sample forward allocate (see `torchcurv._planning`). Cached per module and
    shapes; the random number generators are restored afterwards, so a probe never
    changes the dropout masks of the real computation.
    """
    cache = _PROBES.setdefault(obj.module, {})
    key = obj.signature(order)
    if key not in cache:
        diff, xs, target = obj.sample(0)
        devices = sorted({x.device.index or 0 for x in obj.xs if x.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            forward, out = count_allocations(obj.per_sample, diff, xs, target)
        cache[key] = (WORK_PER_FORWARD[order] * max(forward, 1), tuple(out.shape))
    return cache[key]


def _check_module_chunk(
    function: str, chunk_size: Any, memory_budget: Any, n_axes: int
) -> tuple[Any, tuple[int | None, ...]]:
    """``(batch_chunk, basis_chunks)`` from a module-level chunk_size."""
    if isinstance(chunk_size, tuple):
        if len(chunk_size) != 1 + n_axes:
            parts = "(batch, inner, outer)" if n_axes == 2 else "(batch, basis)"
            argument_error(
                function,
                "chunk_size",
                f"must be a tuple {parts} when a tuple",
                chunk_size,
                f"Pass chunk_size={parts}, 'auto', None or an int.",
            )
        if memory_budget is not None:
            argument_error(
                function,
                "chunk_size",
                "must be 'auto' when memory_budget is given",
                chunk_size,
                "Pass either explicit chunk sizes or memory_budget=.",
            )
        batch = check_chunk_size(function, chunk_size[0], "chunk_size[0] (batch)")
        axes = tuple(
            check_chunk_size(function, c, f"chunk_size[{i + 1}]")
            for i, c in enumerate(chunk_size[1:])
        )
        return batch, axes
    return check_batch_chunk_size(function, chunk_size, memory_budget), (None,) * n_axes


def _label(function: str, module: nn.Module) -> str:
    return f"{function}({type(module).__name__})"


def _numel(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in tree_flatten(tree)[0])


def _itemsize(tree: Any) -> int:
    return max(int(x.element_size()) for x in tree_flatten(tree)[0])


# --------------------------------------------------------------------------------------
# public module-level transforms
# --------------------------------------------------------------------------------------


def _per_sample_objective(
    function: str,
    module: nn.Module,
    inputs: Any,
    randomness: str,
    **what: Any,
) -> tuple[_Objective, int]:
    """The checked objective of a per-sample call and its batch size."""
    obj = _Objective(function, module, inputs, **what)
    _check_layers(function, module, randomness)
    return obj, obj.batch_size()


def per_sample_hessian(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    wrt: Wrt = "inputs",
    output: OutputSelection = None,
    targets: torch.Tensor | None = None,
    loss: LossFunction | None = None,
    params: ParamSelection = None,
    kwargs: Mapping[str, Any] | None = None,
    mode: str = "auto",
    chunk_size: ModuleChunk = "auto",
    memory_budget: int | float | str | None = None,
    randomness: Literal["error", "different", "same"] = "error",
) -> Any:
    """The Hessian of a module's output (or loss) for every sample of a batch.

    Each sample is fed to the module alone, as a batch of one, so samples never mix.
    For a single-sample input ``x`` (``inputs`` is ``[B, *x.shape]``) and a scalar
    objective the result is ``[B, *x.shape, *x.shape]`` with ``wrt="inputs"``; a
    non-scalar selected output ``y`` gives ``[B, *y.shape, *x.shape, *x.shape]``. With
    ``wrt="params"`` the result is a dict of dicts of blocks
    ``H[name_i][name_j]: [B, *p_i.shape, *p_j.shape]``; with ``wrt="both"`` it is
    ``H[a][b]`` for ``a, b`` in ``{"inputs", "params"}`` (the params entries nested
    again by name), symmetric as a whole. `torchcurv.to_matrix` (``batch_dims=1``)
    turns any of them into ``[B, N, N]``.

    Args:
        module: The model; never modified (parameters, buffers, training flag).
        inputs: The batch, ``[B, ...]``, or a tuple of such tensors for a forward with
            several positional inputs.
        wrt: ``"inputs"``, ``"params"`` or ``"both"``.
        output: Which output to differentiate, applied to one sample's output with the
            batch dim removed: a class index (``output=2``: the logit of class 2), an
            index tuple, a slice, or a callable ``out -> tensor``. None: all of it.
        targets: One target per sample, with `loss`.
        loss: ``loss(out, target) -> scalar`` (e.g. ``F.cross_entropy``), called on the
            sample's output and target as a batch of one.
        params: Which parameters (``wrt="params"``/``"both"``): names, glob patterns,
            a predicate or a dict; see `torchcurv.functional`.
        kwargs: Keyword arguments for the forward, the same for every sample.
        mode: A `torchcurv.hessian` mode, ``"structured"`` or ``"auto"`` (default).
            ``"structured"`` computes input Hessians of ``nn.Sequential`` stacks of
            ``Linear`` layers and elementwise activations exactly by Hessian
            backpropagation (``H = sum_l J_l^T diag(sigma_l'' g_l) J_l``, plus the loss
            curvature for ``F.cross_entropy`` / ``F.mse_loss``), without ``n``
            Hessian-vector products; it raises for anything else. ``"auto"`` takes the
            structured path where it applies and a cost model (FLOPs and memory of both
            paths for these shapes) predicts it faster, otherwise ``"fwd-over-rev"``.
        chunk_size: ``"auto"`` (plan from `memory_budget`), None (no chunking), an int
            (samples per chunk) or ``(batch, inner, outer)``.
        memory_budget: Bytes or a size such as ``"2GiB"``; default half the available
            memory. The planner keeps its predicted peak within it or raises.
        randomness: ``"error"`` (default), ``"different"`` (each sample its own dropout
            mask, the same for every row of its Hessian) or ``"same"``.

    Returns:
        The per-sample Hessians, batch dim first.

    Raises:
        UnsupportedModuleError: For BatchNorm in training mode, or dropout in training
            mode with ``randomness="error"``.
        MemoryBudgetError: If the budget cannot be met even with chunks of one.
        TorchcurvError: For other bad arguments.

    Example:
        >>> import torch, torchcurv
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X = torch.randn(5, 3, dtype=torch.float64)
        >>> H = torchcurv.per_sample_hessian(model, X, output=1)
        >>> H.shape
        torch.Size([5, 3, 3])
        >>> W1, b1, w2 = model[0].weight, model[0].bias, model[2].weight[1]
        >>> z = X[0] @ W1.T + b1  # tanh'' = -2 tanh (1 - tanh^2)
        >>> d2 = -2 * torch.tanh(z) * (1 - torch.tanh(z) ** 2)
        >>> torch.allclose(H[0], W1.T @ torch.diag(w2 * d2) @ W1)
        True
    """
    name = "per_sample_hessian"
    _check_mode(name, mode, (*HESSIAN_MODES, "structured"))
    batch_chunk, (inner, outer) = _check_module_chunk(name, chunk_size, memory_budget, 2)
    randomness = check_randomness(name, randomness, BATCH_RANDOMNESS)  # type: ignore[assignment]
    obj, size = _per_sample_objective(
        name,
        module,
        inputs,
        randomness,
        wrt=wrt,
        params=params,
        output=output,
        loss=loss,
        targets=targets,
        kwargs=kwargs,
    )
    obstacle = _structured_obstacle(obj) if mode in ("auto", "structured") else None
    if mode == "structured" and obstacle is not None:
        raise UnsupportedModuleError(
            f"{name}: mode='structured' cannot be used here: {obstacle}. Pass mode='auto' "
            "(which takes the generic path when the structured one does not apply) or a "
            "generic mode such as mode='fwd-over-rev'."
        )
    work, out_shape = _probe(obj, 2) if "auto" in (mode, batch_chunk) else (0, ())
    m, n, itemsize = math.prod(out_shape), _numel(obj.sample(0)[0]), _itemsize(obj.diff(obj.xs))
    if mode == "auto":
        structured = obstacle is None and prefer_structured(
            module, tuple(obj.xs[0].shape), n_outputs_selected=m, dtype_bytes=itemsize
        )
        mode = "structured" if structured else "fwd-over-rev"
        logger.debug("%s: mode='auto' chose %r", name, mode)
    if mode == "structured":
        return _structured_hessians(name, obj, batch_chunk, memory_budget, out_shape)
    if batch_chunk == "auto":
        budget = parse_budget(name, memory_budget, obj.xs[0].device)
        plan = plan_chunks(
            name,
            batch=size,
            axes=hessian_basis_sizes(mode, m, n),
            result_bytes=m * n * n * itemsize,
            work_bytes=work,
            budget=budget,
        )
        logger.debug("%s: %s", name, plan.describe())
        batch_chunk, (inner, outer) = plan.batch, plan.axes
    transform = hessian(
        obj.per_sample,
        mode=mode,  # type: ignore[arg-type]
        chunk_size=(inner, outer),
        randomness="error" if randomness == "error" else "same",
    )
    return run_chunked(
        _label(name, module),
        transform,
        obj.args(),
        in_dims=obj.in_dims(),
        out_dims=0,
        randomness=randomness,
        chunk=batch_chunk,
    )


def _structured_obstacle(obj: _Objective) -> str | None:
    """Why the structured path cannot compute this objective, or None if it can."""
    if obj.wrt != "inputs":
        return f"it differentiates with respect to the inputs only, got wrt={obj.wrt!r}"
    if not obj.single or obj.kwargs:
        return "the module must take one input tensor and no keyword arguments"
    if isinstance(obj.output, bool) or not (
        obj.output is None or isinstance(obj.output, (int, slice))
    ):
        return f"output must be None, an int or a slice, got {describe(obj.output)}"
    if obj.loss is not None and obj.loss not in (F.cross_entropy, F.mse_loss):
        return "loss must be torch.nn.functional.cross_entropy or mse_loss"
    for path, layer in obj.module.named_modules():
        if isinstance(layer, nn.modules.dropout._DropoutNd) and layer.training and layer.p > 0:
            return f"{type(layer).__name__} at {path!r} is in training mode"
    return unsupported_layer(obj.module)


def _structured_hessians(
    function: str,
    obj: _Objective,
    batch_chunk: Any,
    memory_budget: Any,
    out_shape: tuple[int, ...],
) -> torch.Tensor:
    """`per_sample_hessian` by Hessian backpropagation (`torchcurv._structured`).

    The memory plan counts twice the structured path's own estimate of its
    intermediates per sample: measured peaks exceeded the estimate alone by up to 20%.
    """
    X = obj.xs[0]
    size, features = X.shape[0], tuple(X.shape[1:])
    if not out_shape:  # no probe ran (explicit chunk sizes): one forward gives the shape
        with torch.no_grad():
            out_shape = tuple(obj.per_sample(*obj.sample(0)).shape)
    m, n, itemsize = math.prod(out_shape), math.prod(features), X.element_size()
    if batch_chunk == "auto":
        cost = structured_cost(
            obj.module, tuple(X.shape), n_outputs_selected=m, dtype_bytes=itemsize
        )
        plan = plan_chunks(
            function,
            batch=size,
            axes=(),
            result_bytes=m * n * n * itemsize,
            work_bytes=2 * int(cost["structured_bytes"] / size) + 1,
            budget=parse_budget(function, memory_budget, X.device),
        )
        logger.debug("%s (structured): %s", function, plan.describe())
        batch_chunk = plan.batch
    step = size if batch_chunk is None else batch_chunk
    pieces = []
    with torch.no_grad():
        for start in range(0, size, step):
            targets = None if obj.targets is None else obj.targets[start : start + step]
            pieces.append(
                structured_input_hessian(
                    obj.module,
                    X[start : start + step],
                    output=obj.output,  # type: ignore[arg-type]
                    loss=obj.loss,
                    targets=targets,
                )
            )
    result = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return result.reshape(size, *out_shape, *features, *features)


def per_sample_jacobian(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    wrt: Wrt = "inputs",
    output: OutputSelection = None,
    targets: torch.Tensor | None = None,
    loss: LossFunction | None = None,
    params: ParamSelection = None,
    kwargs: Mapping[str, Any] | None = None,
    mode: str = "auto",
    chunk_size: int | Literal["auto"] | tuple[int | None, int | None] | None = "auto",
    memory_budget: int | float | str | None = None,
    randomness: Literal["error", "different", "same"] = "error",
) -> Any:
    """The Jacobian of a module's output (or the gradient of its loss) per sample.

    Same conventions as `per_sample_hessian`: the result for a selected output ``y``
    and ``wrt="inputs"`` is ``[B, *y.shape, *x.shape]``; with ``wrt="params"`` a dict
    ``J[name]: [B, *y.shape, *p.shape]`` (per-sample gradients for a scalar loss).

    Args:
        module: The model; never modified.
        inputs: The batch, ``[B, ...]``, or a tuple of such tensors.
        wrt: ``"inputs"``, ``"params"`` or ``"both"``.
        output: Which output to differentiate (see `per_sample_hessian`).
        targets: One target per sample, with `loss`.
        loss: ``loss(out, target) -> scalar``.
        params: Which parameters, see `torchcurv.functional`.
        kwargs: Keyword arguments for the forward, the same for every sample.
        mode: ``"rev"``, ``"fwd"`` or ``"auto"`` (by output vs input size).
        chunk_size: ``"auto"``, None, an int (samples per chunk) or ``(batch, basis)``.
        memory_budget: Bytes or a size such as ``"2GiB"``.
        randomness: ``"error"``, ``"different"`` or ``"same"``.

    Returns:
        The per-sample Jacobians, batch dim first.

    Raises:
        UnsupportedModuleError: For BatchNorm in training mode, or dropout in training
            mode with ``randomness="error"``.
        TorchcurvError: For bad arguments.

    Example:
        >>> import torch, torchcurv
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X = torch.randn(4, 3, dtype=torch.float64)
        >>> J = torchcurv.per_sample_jacobian(model, X)
        >>> J.shape
        torch.Size([4, 2, 3])
        >>> torch.equal(J[2], model.weight.detach())
        True
    """
    name = "per_sample_jacobian"
    _check_mode(name, mode, JACOBIAN_MODES)
    batch_chunk, (basis,) = _check_module_chunk(name, chunk_size, memory_budget, 1)
    randomness = check_randomness(name, randomness, BATCH_RANDOMNESS)  # type: ignore[assignment]
    obj, size = _per_sample_objective(
        name,
        module,
        inputs,
        randomness,
        wrt=wrt,
        params=params,
        output=output,
        loss=loss,
        targets=targets,
        kwargs=kwargs,
    )
    if "auto" in (mode, batch_chunk):
        work, shape = _probe(obj, 1)
        m, n = math.prod(shape), _numel(obj.sample(0)[0])
        if mode == "auto":  # decided here, so the vectorised call wastes no trial run
            mode = "rev" if m <= n else "fwd"
    if batch_chunk == "auto":
        budget = parse_budget(name, memory_budget, obj.xs[0].device)
        plan = plan_chunks(
            name,
            batch=size,
            axes=(n if mode == "fwd" else m,),
            result_bytes=m * n * _itemsize(obj.diff(obj.xs)),
            work_bytes=work,
            budget=budget,
        )
        logger.debug("%s: %s", name, plan.describe())
        batch_chunk, (basis,) = plan.batch, plan.axes
    transform = jacobian(
        obj.per_sample,
        mode=mode,  # type: ignore[arg-type]
        chunk_size=basis,
        randomness="error" if randomness == "error" else "same",
    )
    return run_chunked(
        _label(name, module),
        transform,
        obj.args(),
        in_dims=obj.in_dims(),
        out_dims=0,
        randomness=randomness,
        chunk=batch_chunk,
    )


def batch_hessian(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    targets: torch.Tensor,
    *,
    loss: LossFunction,
    wrt: Wrt = "params",
    params: ParamSelection = None,
    kwargs: Mapping[str, Any] | None = None,
    mode: str = "fwd-over-rev",
    chunk_size: int | tuple[int | None, int | None] | None = None,
    randomness: Literal["error", "same"] = "error",
) -> Any:
    """The Hessian of a loss over the whole batch, ``loss(module(inputs), targets)``.

    With the default ``reduction="mean"`` of torch's losses this is the Hessian of the
    mean loss: the mean of the per-sample loss Hessians. With ``wrt="params"`` the
    result is a dict of dicts ``H[name_i][name_j]: [*p_i.shape, *p_j.shape]``;
    ``torchcurv.to_matrix(H)`` gives the ``P x P`` matrix.

    Args:
        module: The model; never modified.
        inputs: The batch (or a tuple of batched inputs).
        targets: The targets of the batch.
        loss: ``loss(out, targets) -> scalar``.
        wrt: ``"params"`` (default), ``"inputs"`` (the whole batch as one input) or
            ``"both"``.
        params: Which parameters, see `torchcurv.functional`.
        kwargs: Keyword arguments for the forward.
        mode: A `torchcurv.hessian` mode.
        chunk_size: Chunk size(s) of the two Hessian stages, see `torchcurv.hessian`.
        randomness: ``"error"`` or ``"same"`` (one dropout mask for the whole Hessian).

    Returns:
        The Hessian blocks.

    Raises:
        UnsupportedModuleError: For BatchNorm in training mode, or dropout in training
            mode with ``randomness="error"``.
        TorchcurvError: For bad arguments.

    Example:
        >>> import torch, torchcurv
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> X = torch.randn(8, 3, dtype=torch.float64)
        >>> y = torch.randn(8, 1, dtype=torch.float64)
        >>> H = torchcurv.batch_hessian(model, X, y, loss=torch.nn.functional.mse_loss)
        >>> M = torchcurv.to_matrix(H)  # mean squared error: 2 X^T X / B
        >>> torch.allclose(M, 2 * X.T @ X / 8)
        True
    """
    name = "batch_hessian"
    _check_mode(name, mode, HESSIAN_MODES)
    randomness = check_randomness(name, randomness)  # type: ignore[assignment]
    if loss is None:
        argument_error(
            name,
            "loss",
            "is required",
            loss,
            "Pass loss=torch.nn.functional.cross_entropy or another (out, y) -> scalar.",
        )
    obj = _Objective(
        name,
        module,
        inputs,
        wrt=wrt,
        params=params,
        output=None,
        loss=loss,
        targets=targets,
        kwargs=kwargs,
    )
    _check_layers(name, module, randomness)
    obj.batch_size()
    transform = hessian(
        obj.whole_batch,
        mode=mode,  # type: ignore[arg-type]
        chunk_size=chunk_size,
        randomness=randomness,
    )
    return transform(obj.diff(obj.xs), obj.xs, targets)
