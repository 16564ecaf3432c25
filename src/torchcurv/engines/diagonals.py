r"""Structured per-sample parameter diagonals: Hessian and Gauss-Newton backpropagation
over the module's traced graph.

For a parameter ``W`` of a ``Linear`` layer ``z = a W^T + b`` the per-sample curvature
factors: with ``V_c`` the derivative of row ``c`` of a factorisation of the curvature
with respect to ``z`` (one vector-Jacobian product per row, all rows in one batched
backward) and ``M`` the rows' weights,

.. math::

    \operatorname{diag}(G)_W = \Big(\sum_{cd} M_{cd}\, V_c \odot V_d\Big) \otimes a^{\odot 2}

when the layer sees one vector per sample (a sequence's tokens, ``[T, in]``, make the
per-row gradient ``sum_t V_{c,t} \otimes a_t`` first; a ``Conv1d`` / ``Conv2d`` is the
same with one token per output position and ``a_t`` the input patch it sees, per group).
No ``[C, P]`` per-sample Jacobian is formed: a row costs one backward through the
activations, not one per parameter.

- **Gauss-Newton** (``J^T H J`` of the module output and the loss): the rows are the
  output's basis vectors, ``M`` the loss Hessian of that output by autograd (any loss;
  indefinite where the loss is not convex). Parameters of other modules (a norm, an
  attention block) take their per-row gradients from the same backward and are
  contracted the same way, so every fx-traceable model is served.
- **Hessian** (of a scalar objective): the rows add, for every elementwise activation
  ``y = s(u)`` downstream of a parameter, the basis of ``u`` weighted by
  ``s''(u) * dL/dy`` (the residual terms of Hessian backpropagation, as BackPACK's
  ``DiagHessian`` has them). That is the whole second derivative only where every op
  that depends on the parameters is linear in them, an elementwise activation or max
  pooling: the graph is checked, and anything else (a product of two such tensors, a
  norm, attention, the parameters of a layer other than ``Linear``, ``Conv1d`` and
  ``Conv2d``) is an obstacle; ``"auto"`` then takes the generic engine.

The graph comes from ``torch.fx.symbolic_trace`` (standard ``torch.nn`` layers are its
leaves), run node by node by an interpreter that taps the outputs of the layers it
differentiates, under ``vmap`` over the batch like every engine, so a sample sees what
it sees in the generic engine. Parameters tied between modules, hooks and forwards that
write buffers are obstacles.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .._decompositions import corrected_ops
from .._losses import Sampling, curvature, mc_sampling, sampled_rows
from .._objective import Objective
from .._runner import Work, draws, vmapped, with_draws, with_nones
from . import Request
from ._graph import (
    CURVED_FUNCTIONS,
    CURVED_METHODS,
    CURVED_MODULES,
    KINKED_FUNCTIONS,
    KINKED_METHODS,
    KINKED_MODULES,
    LINEAR_FUNCTIONS,
    LINEAR_METHODS,
    LINEAR_MODULES,
    SCALING_METHODS,
    SCALINGS,
    SUM_METHODS,
    SUMS,
    live_args,
    plain_module,
    traced,
)

__all__ = ["ParameterDiagonals"]

QUANTITIES = ("diagonal", "ggn_diagonal")

# The layers whose outputs are tapped: their weight's diagonal is the contraction of the
# rows' output derivatives with the (patches of the) inputs, token by token.
_TAPPED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class _Plan:
    """What the traced graph showed: the layers tapped, the activations with rows, the
    parameters read directly, and the per-sample shapes (a batch of one)."""

    graph: fx.GraphModule
    #: node name -> (module path, weight name or None, bias name or None)
    layers: dict[str, tuple[str, str | None, str | None]] = field(default_factory=dict)
    #: node names of the curved activations (Hessian only)
    curved: list[str] = field(default_factory=list)
    #: requested parameters not in a tapped layer (their gradients are taken directly)
    direct: list[str] = field(default_factory=list)
    #: module path -> {local name: full name} of the parameters of the other layers
    owners: dict[str, dict[str, str]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    out_shape: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        """Rows of the curvature's factorisation: the output's entries, then the
        curved activations' inputs."""
        return math.prod(self.out_shape) + sum(
            math.prod(self.shapes["u:" + n]) for n in self.curved
        )


class _Run(fx.Interpreter):
    """Runs the traced graph on one sample with the given parameters, adding ``taps``
    to the outputs of the tapped layers and curved activations, recording the inputs
    of the tapped layers (``inputs``), of the curved activations (``activations``) and
    the activations themselves as functions of their inputs (``functions``)."""

    def __init__(self, plan: _Plan, state: dict[str, Tensor], taps: dict[str, Tensor]) -> None:
        super().__init__(plan.graph, garbage_collect_values=True)
        self.plan, self.state, self.taps = plan, state, taps
        self.inputs: dict[str, Tensor] = {}
        self.activations: dict[str, Tensor] = {}
        self.functions: dict[str, Any] = {}
        #: the tapped nodes' values, when not None (the shapes of the taps)
        self.seen: dict[str, Tensor] | None = None

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.state:
            return self.state[target]
        return super().get_attr(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        plan = self.plan
        if n.name in plan.layers:
            args, _ = self.fetch_args_kwargs_from_env(n)
            path = plan.layers[n.name][0]
            layer: Any = self.module.get_submodule(path)
            a = args[0]
            self.inputs[n.name] = a
            w, b = self.state[f"{path}.weight"], self.state.get(f"{path}.bias")
            out = (
                F.linear(a, w, b) if isinstance(layer, nn.Linear) else layer._conv_forward(a, w, b)
            )
        elif n.op == "call_module" and str(n.target) in plan.owners:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            local = {k: self.state[full] for k, full in plan.owners[str(n.target)].items()}
            out = torch.func.functional_call(
                self.module.get_submodule(str(n.target)), local, tuple(args), kwargs
            )
        else:
            out = super().run_node(n)
        if n.name in plan.curved:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.activations[n.name] = args[0]
            self.functions[n.name] = _elementwise(self, n, args, kwargs)
        if self.seen is not None and (n.name in plan.layers or n.name in plan.curved):
            self.seen[n.name] = out
        tap = self.taps.get(n.name)
        if tap is not None:
            out = out + tap
        return out


def _elementwise(run: _Run, n: fx.Node, args: Any, kwargs: Any) -> Any:
    """The activation of node `n` as a function of its first argument."""
    rest = tuple(args[1:])
    if n.op == "call_module":
        layer = run.module.get_submodule(str(n.target))
        return lambda u: layer(u, *rest, **kwargs)
    if n.op == "call_method":
        name = str(n.target)
        return lambda u: getattr(u, name)(*rest, **kwargs)
    target: Any = n.target
    return lambda u: target(u, *rest, **kwargs)


def _second_derivative(function: Any, u: Tensor) -> Tensor:
    """``s''(u)`` of an elementwise function, entry by entry (two backward passes)."""
    ones = torch.ones_like(u)

    def first(v: Tensor) -> Tensor:
        return torch.func.vjp(function, v)[1](ones)[0]  # type: ignore[no-any-return]

    second: Tensor = torch.func.vjp(first, u)[1](ones)[0]
    return second


def _nonlinear(n: fx.Node, module: nn.Module, positions: list[int]) -> str | None:
    """Why node `n` (with parameter-dependent arguments at `positions`) is neither
    linear in them nor an elementwise activation of one, or None; "curved" / "kinked"
    for activations."""
    one = positions == [0]
    if n.op == "call_module":
        layer = module.get_submodule(str(n.target))
        if one and plain_module(layer, CURVED_MODULES):
            return "curved"
        if one and plain_module(layer, (*KINKED_MODULES, *LINEAR_MODULES)):
            return None
        if one and isinstance(layer, nn.modules.dropout._DropoutNd):
            return None if not layer.training or layer.p == 0 else "random"
        if one and isinstance(layer, nn.modules.batchnorm._BatchNorm) and not layer.training:
            return None
        return f"layer {n.target!r} ({type(layer).__name__})"
    if n.op == "call_function":
        target: Any = n.target
        if target in SUMS or (one and target in LINEAR_FUNCTIONS):
            return None
        if (
            target in SCALINGS
            and len(positions) == 1
            and (positions == [0] or target in (operator.mul, torch.mul))
        ):
            return None
        if one and target in CURVED_FUNCTIONS:
            return "curved"
        if one and target in KINKED_FUNCTIONS:
            return None
        if target is F.dropout and one:
            inert = not n.kwargs.get("training", True) or n.kwargs.get("p") == 0
            return None if inert else "random"
        return f"{getattr(target, '__name__', target)!s} (node {n.name!r})"
    if n.op == "call_method":
        name = str(n.target)
        if name in SUM_METHODS or (one and name in LINEAR_METHODS):
            return None
        if one and name in SCALING_METHODS:
            return None
        if one and name in CURVED_METHODS:
            return "curved"
        if one and name in KINKED_METHODS:
            return None
        return f"the method .{name}() (node {n.name!r})"
    return None


class ParameterDiagonals:
    """Per-sample Hessian and Gauss-Newton diagonals of parameters (see the module
    docstring); part of the ``"structured"`` engine."""

    name = "structured"

    def __init__(self) -> None:
        self._plans: dict[Any, _Plan | str] = {}

    def obstacle(self, request: Request) -> str | None:
        """Why this engine cannot compute `request`, or None if it can."""
        if request.quantity not in QUANTITIES:
            return "it computes the diagonals of parameter curvature only"
        if request.method not in ("exact", "mc"):
            return f"it computes exact diagonals, not a {request.method} estimate"
        if request.objective.wrt != "params":
            wrt = request.objective.wrt
            return f"it differentiates with respect to the parameters, got wrt={wrt!r}"
        if request.quantity == "diagonal" and request.out_numel != 1:
            return (
                "the Hessian diagonal of parameters needs an objective with one entry per "
                f"sample (a loss, or one output), got shape {request.out_shape}"
            )
        plan = self._plan(request)
        return plan if isinstance(plan, str) else None

    def predicted_faster(self, request: Request) -> bool:
        plan = self._plan(request)
        assert not isinstance(plan, str)
        if request.quantity == "ggn_diagonal":
            return True  # the same backward rows as the generic engine, without [C, P]
        # One backward per row against one Hessian-vector product per parameter.
        return plan.rows < 4 * sum(p.numel() for p in request.objective.params.values())

    def axes(self, request: Request) -> tuple[int, ...]:
        return ()

    def _plan(self, request: Request) -> _Plan | str:
        obj = request.objective
        key = (request.quantity, obj.signature())
        if key not in self._plans:
            self._plans[key] = _analyse(obj, hessian=request.quantity == "diagonal")
        return self._plans[key]

    def work(self, request: Request, chunks: tuple[int | None, ...]) -> Work:
        obj = request.objective
        plan = self._plan(request)
        assert not isinstance(plan, str)
        hessian = request.quantity == "diagonal"
        absent = obj.absent()
        fixed = {n: p.detach() for n, p in obj.module.named_parameters()}
        like = next(iter(obj.params.values()))
        cotangents = _row_basis(plan, like.dtype, like.device, hessian)
        mc = request.method == "mc"
        sampling = mc_sampling(request.function, obj.loss) if mc else None

        def diagonal(diff: Any, xs: Any, target: Any, buffers: Any, vectors: Any) -> Any:
            del buffers
            params, inputs = obj._split(diff, xs)
            return _sample_diagonal(
                obj, plan, {**fixed, **params}, params, inputs, target, cotangents, hessian,
                sampling, vectors,
            )  # fmt: skip

        func = with_nones(diagonal, absent, len(obj.in_dims()))
        work = vmapped(func, obj.in_dims(), 0, request.randomness, absent)
        if sampling is None:
            return work
        shape = (request.num_samples or 0, request.model_numel)
        return with_draws(
            work, lambda seeds: draws(seeds, shape, like.dtype, like.device, sampling.law)
        )


def _row_basis(
    plan: _Plan, dtype: torch.dtype, device: torch.device, hessian: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """The cotangents of every row: the output's basis, then (Hessian) each curved
    activation input's basis, each row zero elsewhere."""
    c = math.prod(plan.out_shape)
    n = plan.rows if hessian else c
    out = torch.zeros(n, c, dtype=dtype, device=device)
    out[:c] = torch.eye(c, dtype=dtype, device=device)
    us = {}
    start = c
    for name in plan.curved if hessian else ():
        shape = plan.shapes["u:" + name]
        w = math.prod(shape)
        u = torch.zeros(n, w, dtype=dtype, device=device)
        u[start : start + w] = torch.eye(w, dtype=dtype, device=device)
        us[name] = u.reshape(n, *shape)
        start += w
    return out.reshape(n, *plan.out_shape), us


def _contract(v: Tensor, h: Tensor, weights: Tensor | None) -> Tensor:
    """``sum_cd h_cd v_c v_d`` over the output rows (the first ``len(h)``) plus
    ``sum_r weights_r v_r^2`` over the rest; `v` is ``[rows, *shape]``."""
    c = h.shape[0]
    loss_rows = v[:c]
    total: Tensor = (loss_rows * torch.tensordot(h, loss_rows, dims=1)).sum(0)
    if weights is not None and v.shape[0] > c:
        rest = v[c:]
        total = total + (weights.reshape(-1, *([1] * (v.dim() - 1))) * rest * rest).sum(0)
    return total


def _tokens(layer: Any, v: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """A tapped layer's rows of output derivatives ``[rows, tokens, groups, out]`` and
    its inputs ``[tokens, groups, in]``, one token per vector the weight multiplies (a
    Linear's leading dims; a convolution's output positions, with the input patches
    each sees, padded as the layer pads), so that each row's weight gradient is
    ``sum_t v_t (x) a_t`` per group."""
    rows = v.shape[0]
    if isinstance(layer, nn.Linear):
        return v.reshape(rows, -1, 1, v.shape[-1]), a.reshape(-1, 1, a.shape[-1])
    groups, channels = layer.groups, layer.out_channels
    v = v.reshape(rows, channels, -1).transpose(1, 2).reshape(rows, -1, groups, channels // groups)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(a, layer._reversed_padding_repeated_twice, mode=mode)
    kernel, dilation, stride = layer.kernel_size, layer.dilation, layer.stride
    if isinstance(layer, nn.Conv1d):  # as a convolution of height one
        x, kernel, dilation, stride = x.unsqueeze(-2), (1, *kernel), (1, *dilation), (1, *stride)
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)[0]  # [in x kernel, tokens]
    return v, patches.T.reshape(patches.shape[1], groups, -1)


def _sample_diagonal(
    obj: Objective,
    plan: _Plan,
    state: dict[str, Tensor],
    params: Mapping[str, Tensor],
    inputs: tuple[Any, ...],
    target: Any,
    cotangents: tuple[Tensor, dict[str, Tensor]],
    hessian: bool,
    sampling: Sampling | None = None,
    noise: Tensor | None = None,
) -> dict[str, Tensor]:
    """The diagonal of one sample (inside vmap): one forward with taps, one batched
    backward of every row, contracted layer by layer (with `sampling`, the rows are
    the loss's sampled ones drawn from `noise`: the Monte-Carlo Gauss-Newton
    diagonal)."""
    like = cotangents[0]
    taps = {
        name: torch.zeros(plan.shapes[name], dtype=like.dtype, device=like.device)
        for name in (*plan.layers, *(plan.curved if hessian else ()))
    }
    direct = {name: state[name] for name in plan.direct}
    args = tuple(x.unsqueeze(0) for x in inputs)
    placeholders = [n for n in plan.graph.graph.nodes if n.op == "placeholder"]

    functions: dict[str, Any] = {}  # (not tensors: outside the vjp's aux)

    def forward(taps: dict[str, Tensor], direct: dict[str, Tensor]) -> Any:
        run = _Run(plan, {**state, **direct}, taps)
        run.functions = functions
        given = list(args) + [
            obj.kwargs[p.target] if p.target in obj.kwargs else p.args[0]
            for p in placeholders[len(args) :]
        ]
        with corrected_ops() if obj.routed else nullcontext():
            out = run.run(*given)
        return (out, run.activations), (run.inputs, run.activations)

    primal, pull, (inputs_of, activations) = torch.func.vjp(  # type: ignore[misc]
        forward, taps, direct, has_aux=True
    )
    out = primal[0]

    def objective(o: Tensor) -> Tensor:
        return obj.sample_loss(o, target) if not hessian else obj._objective(o, target)

    c = out.numel()
    if sampling is not None and noise is not None:  # method="mc": H = I / S
        rows_out, rows_u = sampled_rows(sampling, out, target, noise), cotangents[1]
        h = torch.eye(len(rows_out), dtype=out.dtype, device=out.device) / len(rows_out)
    else:
        h, g = curvature(obj, objective, out, target)
        rows_out, rows_u = cotangents
    grads_taps, grads_direct = torch.vmap(pull)((rows_out, rows_u))
    weights = None
    if hessian and plan.curved:
        parts = []
        for name in plan.curved:
            gbar = torch.tensordot(g, grads_taps[name][:c], dims=1)  # dL/d(activation)
            parts.append((_second_derivative(functions[name], activations[name]) * gbar).flatten())
        weights = torch.cat(parts)
    result: dict[str, Tensor] = {}
    # A layer called more than once (a reused Linear) has one gradient per row, the sum
    # over its calls: its calls' tokens are concatenated before the contraction.
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for node, (path, _, _) in plan.layers.items():
        layer = obj.module.get_submodule(path)
        calls.setdefault(path, []).append(_tokens(layer, grads_taps[node], inputs_of[node]))
    names = {path: (weight, bias) for path, weight, bias in plan.layers.values()}
    for path, pieces in calls.items():
        weight, bias = names[path]
        v = torch.cat([piece[0] for piece in pieces], dim=1)  # [rows, tokens, groups, out]
        a = torch.cat([piece[1] for piece in pieces], dim=0)  # [tokens, groups, in]
        if a.shape[:2] == (1, 1):  # one vector per sample: the outer product of diagonals
            dz = _contract(v[:, 0, 0], h, weights)
            if weight:
                result[weight] = torch.outer(dz, a[0, 0] * a[0, 0]).reshape(params[weight].shape)
            if bias:
                result[bias] = dz
            continue
        if weight:
            per_row = torch.einsum("rtgo,tgi->rgoi", v, a)  # each row's weight gradient
            result[weight] = _contract(per_row, h, weights).reshape(params[weight].shape)
        if bias:
            result[bias] = _contract(v.sum(1), h, weights).reshape(params[bias].shape)
    for name in plan.direct:
        result[name] = _contract(grads_direct[name], h, None)
    return {
        name: result[name] if name in result else torch.zeros_like(p) for name, p in params.items()
    }


def _analyse(obj: Objective, *, hessian: bool) -> _Plan | str:
    """The plan of `obj`'s module, or why there is none."""
    module = obj.module
    every = list(module.named_parameters(remove_duplicate=False))
    if len({id(p) for _, p in every}) != len(every):
        return "parameters are shared between modules (tied weights)"
    graph = traced(obj)
    if isinstance(graph, str):
        return graph
    requested = set(obj.params)
    plan = _Plan(graph)
    calls: dict[str, int] = {}
    read_directly = {str(n.target) for n in graph.graph.nodes if n.op == "get_attr"}
    live: set[str] = set()
    for n in graph.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    for n in graph.graph.nodes:
        positions = live_args(n, live)
        if n.op == "get_attr":
            if any(r == str(n.target) or r.startswith(str(n.target) + ".") for r in requested):
                if hessian:
                    return f"the forward reads the parameter {n.target!r} directly"
                live.add(n.name)
            continue
        if n.op == "call_module":
            path = str(n.target)
            layer = module.get_submodule(path)
            mine = {r for r in requested if r.startswith(path + ".")}
            if mine and plain_module(layer, _TAPPED) and not (mine & read_directly):
                if hessian and calls[path] > 1:
                    return f"the layer {path!r} is called {calls[path]} times"
                weight = f"{path}.weight" if f"{path}.weight" in requested else None
                bias = f"{path}.bias" if f"{path}.bias" in requested else None
                plan.layers[n.name] = (path, weight, bias)
                live.add(n.name)
                if hessian and positions and positions != [0]:
                    return f"the layer {path!r} takes parameter-dependent keyword arguments"
                continue
            if mine:
                if hessian:
                    return (
                        f"the parameters of {path!r} ({type(layer).__name__}) enter the "
                        "Hessian through more than a Linear or convolution layer"
                    )
                plan.direct.extend(sorted(mine - set(plan.direct)))
                live.add(n.name)
            # every layer runs on the call's parameters (requested or fixed copies)
            owned = {local: f"{path}.{local}" for local, _ in layer.named_parameters()}
            if owned:
                plan.owners[path] = owned
            if mine:
                continue
        if not positions or n.op in ("output", "placeholder"):
            continue
        live.add(n.name)
        if not hessian:
            continue
        kind = _nonlinear(n, module, positions)
        if kind == "curved":
            plan.curved.append(n.name)
        elif kind == "random":
            return f"the dropout at node {n.name!r} is in training mode"
        elif kind is not None:
            return (
                f"the parameters reach the objective through {kind}, which is neither "
                "linear in them nor an elementwise activation"
            )
    tapped = {name for _, *names in plan.layers.values() for name in names if name}
    unused = _unused(requested, plan, read_directly)
    plan.direct.extend(sorted(requested - tapped - set(plan.direct) - unused))
    if hessian and plan.direct:
        return f"the parameters {plan.direct} are not those of a Linear or convolution layer"
    return _shaped(obj, plan)


def _unused(requested: set[str], plan: _Plan, read_directly: set[str]) -> set[str]:
    """Requested parameters the graph never reads (their diagonal is zero)."""
    used = {path for path, _, _ in plan.layers.values()} | set(plan.owners)
    return {
        r
        for r in requested
        if not any(r.startswith(p + ".") for p in used)
        and not any(r == t or r.startswith(t + ".") for t in read_directly)
    }


def _shaped(obj: Objective, plan: _Plan) -> _Plan | str:
    """`plan` with the per-sample shapes of its taps, from a run of sample 0."""
    diff, xs, _ = obj.probe_sample()
    params, inputs = obj._split(diff, xs)
    state = {n: p.detach() for n, p in obj.module.named_parameters()}
    state.update((n, p.detach()) for n, p in params.items())
    run = _Run(plan, state, {})
    placeholders = [n for n in plan.graph.graph.nodes if n.op == "placeholder"]
    args = [x.unsqueeze(0) for x in inputs]
    try:
        given = args + [
            obj.kwargs[p.target] if p.target in obj.kwargs else p.args[0]
            for p in placeholders[len(args) :]
        ]
        seen: dict[str, Tensor] = {}
        run.seen = seen
        with torch.no_grad():
            out = run.run(*given)
    except Exception as error:  # the real run reports it; the generic engine may not fail
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"the traced graph does not run ({type(error).__name__}: {first})"
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != 1:
        return "the module must return one tensor with the batch dim first"
    plan.out_shape = tuple(out.shape)
    for name, value in seen.items():
        plan.shapes[name] = tuple(value.shape)
    for name in plan.curved:
        plan.shapes["u:" + name] = tuple(run.activations[name].shape)
    return plan
