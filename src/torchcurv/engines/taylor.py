r"""Taylor mode: exact per-sample Laplacians and input-Hessian diagonals in one forward.

Each value of the module's traced graph that depends on the differentiated input ``x``
is carried as a *jet* ``(y, Y_1, Y_2)``: the value, its first directional derivatives
along ``R`` directions ``e_r`` (the basis vectors of the selected coordinates, the
columns of sigma for ``tr(sigma sigma^T H)``, or Hutchinson's probes; ``[R,
*y.shape]``) and the second-order part,

- collapsed (a Laplacian): ``Y_2 = sum_r w_r d^2 y / d x_r^2``, ``[1, *y.shape]``;
- or per direction (a Hessian diagonal): ``Y_2[r] = d^2 y / d x_r^2``, ``[R, *y.shape]``.

Linear ops act on every part (``Linear`` and convolutions drop their bias from the
derivative parts), sums add them, and the chain rule of an elementwise ``s`` is

.. math::

    Y_1 = s'(u) U_1, \qquad Y_2 = s'(u)\, U_2 + s''(u) \sum_r w_r U_{1,r}^2,

with ``s'`` and ``s''`` derived by forward-mode AD of ``s`` itself (no hand-written
rule per activation); a product ``u v`` of two jets adds ``2 sum_r w_r U_{1,r} V_{1,r}``.
So the Laplacian costs one forward with ``R + 1`` tangents instead of ``R``
Hessian-vector products, and never forms the Hessian ("Collapsing Taylor Mode AD",
NeurIPS 2025; folx for JAX).

The graph comes from ``torch.fx.symbolic_trace`` and runs node by node (under ``vmap``
over the batch, a sample as a batch of one, like every engine) with the module's
parameters as they are, so ``create_graph=True`` differentiates through it. Softmax,
norms, products of matrices and quotients have rules composed of the cheap ones (see
`_RULES`); other smooth ops (attention modules) take nested forward-mode products per
direction. An op without a rule (batch norm, a recurrent layer, a loss) is an obstacle:
``explain`` names it and the other engines compute the quantity.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .._compat import DERIVATIVE_LOCK, tree_flatten, tree_unflatten
from .._decompositions import corrected_ops
from .._runner import Batch, Work, draws, vmapped, with_draws, with_nones
from .._transforms import copied_chunks
from . import Request, directions, embedded, trace_coefficients
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

__all__ = ["TaylorEngine"]

QUANTITIES = ("trace", "diagonal")
# Layers affine in their input: the derivative parts go through them without the bias.
_AFFINE = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)  # fmt: skip
_PRODUCTS = {operator.mul, torch.mul}
_SEQUENCES = {torch.cat, torch.stack}
# Piecewise-linear ops that are not elementwise: linearised at the value.
_MAX_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
# More elementwise functions (the activations' lists are shared with the diagonals); s'
# and s'' derived by forward mode, piecewise ones almost everywhere.
_ELEMENTWISE_FUNCTIONS = {
    torch.log, torch.sqrt, torch.rsqrt, torch.reciprocal, torch.square, torch.log1p,
    torch.expm1, torch.atan, torch.sinh, torch.cosh, torch.tan, torch.asinh, torch.erfc,
    F.celu, F.selu, F.softsign, F.tanhshrink, F.hardswish, F.hardsigmoid, torch.clamp,
    torch.clip,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "log", "sqrt", "rsqrt", "reciprocal", "square", "log1p", "expm1", "atan", "sinh", "cosh",
    "tan", "asinh", "pow", "__pow__", "clamp", "clip",
}  # fmt: skip
_ELEMENTWISE_MODULES = (
    nn.CELU, nn.SELU, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Hardswish,
    nn.Hardsigmoid,
)  # fmt: skip
# Piecewise-linear elementwise modules.
_PIECEWISE_MODULES = (nn.Hardshrink, nn.Softshrink, nn.Threshold)
# Linear ops beyond the diagonals' list (there only linearity in parameters matters).
_MORE_LINEAR_FUNCTIONS = {torch.flip, torch.roll, torch.cumsum, torch.diagonal, torch.tile}
_MORE_LINEAR_METHODS = {"flip", "roll", "cumsum", "repeat", "diagonal", "tile", "movedim"}
_LINEAR_ATTRIBUTES = {"T", "mT"}
_POWERS = {operator.pow, torch.pow}
# Smooth ops of one or more jets without a cheaper rule (vector-valued: softmax, norms,
# attention; bilinear: matmul of two jets; quotients): first derivatives by a
# Jacobian-vector product per direction, second-order parts by nested ones.
_SMOOTH_FUNCTIONS = {
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.layer_norm, F.normalize,
    F.rms_norm, F.group_norm, torch.matmul, operator.matmul, torch.bmm, torch.einsum,
    operator.truediv, torch.div, torch.true_divide, operator.pow, torch.pow,
    F.scaled_dot_product_attention, torch.logsumexp,
}  # fmt: skip
_SMOOTH_METHODS = {
    "softmax", "log_softmax", "matmul", "bmm", "div", "pow", "__truediv__", "__rtruediv__",
    "logsumexp", "norm",
}  # fmt: skip
_SMOOTH_MODULES = (
    nn.Softmax, nn.LogSoftmax, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
)  # fmt: skip
# Smooth ops with rules of their own, composed of the cheap ones (shifts, sums, products,
# elementwise functions): softmax ``e / sum(e)`` with ``e = exp(u - max u)``, its log,
# layer and RMS norms written out (not torch's second-order rule of layer norm, wrong
# under forward mode: pytorch/pytorch#196700), products of matrices (bilinear: a product
# rule), quotients ``u * (1 / v)``.
_COMPOSED_FUNCTIONS = {
    F.softmax: "softmax", torch.softmax: "softmax", F.log_softmax: "log_softmax",
    torch.log_softmax: "log_softmax", F.layer_norm: "layer_norm", F.rms_norm: "rms_norm",
    torch.matmul: "bilinear", operator.matmul: "bilinear", torch.bmm: "bilinear",
    operator.truediv: "quotient", torch.div: "quotient", torch.true_divide: "quotient",
}  # fmt: skip
_COMPOSED_METHODS = {
    "softmax": "softmax", "log_softmax": "log_softmax", "matmul": "bilinear",
    "bmm": "bilinear", "div": "quotient", "__truediv__": "quotient",
}  # fmt: skip
_COMPOSED_MODULES: dict[type[nn.Module], str] = {
    nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax", nn.LayerNorm: "layer_norm",
    nn.RMSNorm: "rms_norm",
}  # fmt: skip
# Ops that read only the shape, dtype or device of a jet: their results are constants.
_SHAPE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like}
_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}
_SHAPE_METHODS = {"size", "dim", "numel", "new_zeros", "new_ones", "new_full", "new_empty"}
# Methods linear in `self` that take another tensor's shape or dtype.
_AS_METHODS = {"expand_as", "view_as", "reshape_as", "type_as"}


@dataclass
class Jet:
    """A value and its derivative parts along the directions (see the module docstring)."""

    value: Tensor
    first: Tensor
    second: Tensor


def _is_jet(x: Any) -> bool:
    return isinstance(x, Jet)


def _kind(n: fx.Node, module: nn.Module, live: list[int]) -> str | None:
    """The rule of node `n`, whose arguments at positions `live` are jets, or None."""
    one = live == [0]
    if n.op == "call_module":
        layer = module.get_submodule(str(n.target))
        if one and plain_module(layer, _AFFINE):
            return "affine"
        if one and plain_module(layer, CURVED_MODULES):
            return "curved"
        if one and plain_module(layer, _MAX_POOLS):
            return "piecewise"
        if one and plain_module(layer, KINKED_MODULES):
            return "kinked"
        if one and plain_module(layer, _ELEMENTWISE_MODULES):
            return "curved"
        if one and plain_module(layer, _PIECEWISE_MODULES):
            return "kinked"
        if one and plain_module(layer, LINEAR_MODULES):
            return "linear"
        if one and isinstance(layer, nn.modules.dropout._DropoutNd):
            return "linear" if not layer.training or layer.p == 0 else None
        composed = next((v for k, v in _COMPOSED_MODULES.items() if plain_module(layer, (k,))),
                        None)  # fmt: skip
        if one and composed is not None:
            return composed
        if plain_module(layer, _SMOOTH_MODULES) and not _random(layer):
            return "smooth"
        return None
    if n.op == "call_function":
        target: Any = n.target
        if target in _SHAPE_FUNCTIONS or (
            target is getattr and len(n.args) > 1 and n.args[1] in _SHAPE_ATTRIBUTES
        ):
            return "shape"
        if one and target is getattr and len(n.args) > 1 and n.args[1] in _LINEAR_ATTRIBUTES:
            return "linear"
        if one and target in _MORE_LINEAR_FUNCTIONS:
            return "linear"
        if target in SUMS:
            return "sum"
        if target in _PRODUCTS and len(live) == 2:
            return "product"
        if target in SCALINGS and (live == [0] or (target in _PRODUCTS and len(live) == 1)):
            return "linear"
        if one and target in LINEAR_FUNCTIONS:
            return "linear"
        if one and target in CURVED_FUNCTIONS:
            return "curved"
        if one and (target in KINKED_FUNCTIONS or target is torch.abs):
            return "kinked"
        if one and (target in _ELEMENTWISE_FUNCTIONS or target in _POWERS):
            return "curved"
        composed = _COMPOSED_FUNCTIONS.get(target)
        if composed is not None and _composable(composed, live, n.kwargs):
            return composed
        if target in _SMOOTH_FUNCTIONS:
            return "smooth"
        return None
    if n.op == "call_method":
        name = str(n.target)
        if name in _SHAPE_METHODS or (name in _AS_METHODS and 0 not in live):
            return "shape"
        if one and (name in _AS_METHODS or name in _MORE_LINEAR_METHODS):
            return "linear"
        if name in SUM_METHODS:
            return "sum"
        if name == "mul" and len(live) == 2:
            return "product"
        if one and (name in LINEAR_METHODS or name in SCALING_METHODS):
            return "linear"
        if one and name in CURVED_METHODS:
            return "curved"
        if one and (name in KINKED_METHODS or name == "abs"):
            return "kinked"
        if one and name in _ELEMENTWISE_METHODS:
            return "curved"
        composed = _COMPOSED_METHODS.get(name)
        if composed is not None and _composable(composed, live, n.kwargs):
            return composed
        if name in _SMOOTH_METHODS:
            return "smooth"
    return None


def _composable(kind: str, live: list[int], kwargs: Any) -> bool:
    """Whether a composed rule takes a node of `kind` whose jets are at `live`: the
    bilinear and quotient rules take any, the others the first argument only (a norm's
    weight is not differentiated) and no dtype conversion."""
    if kind == "bilinear":
        return -1 not in live
    if kind == "quotient":
        return -1 not in live and kwargs.get("rounding_mode") is None
    return live == [0] and kwargs.get("dtype") is None


def _random(layer: nn.Module) -> bool:
    """Whether a layer's forward draws random numbers (a dropout in training mode)."""
    return any(
        isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
        for m in layer.modules()
    )


@dataclass
class _Plan:
    graph: fx.GraphModule
    kinds: dict[str, str]
    #: the position of the differentiated input among the forward's placeholders
    position: int


def _analyse(request: Request) -> _Plan | str:
    """The plan of `request`'s module, or why Taylor mode cannot take it."""
    obj = request.objective
    if obj.loss is not None:
        return "a loss is not traced (Taylor mode follows the module's graph only)"
    if obj.wrt != "inputs" or not obj.single:
        return "it differentiates one input tensor (wrt='inputs', one argnum)"
    module = obj.module
    graph = traced(obj)
    if isinstance(graph, str):
        return graph
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    position = obj.argnums[0]
    if position >= len(placeholders):
        return "the differentiated input is not a positional argument of the forward"
    live = {placeholders[position].name}
    kinds: dict[str, str] = {}
    for n in graph.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            continue
        positions = live_args(n, live)
        if not positions or n.op == "output":
            continue
        kind = _kind(n, module, positions)
        if kind is None:
            what = n.target if n.op != "call_function" else getattr(n.target, "__name__", n.target)
            if n.op == "call_module":
                layer = module.get_submodule(str(n.target))
                what = f"{n.target} ({type(layer).__name__})"
                if _random(layer):
                    return (
                        f"{what} draws random numbers (dropout in training mode): call "
                        ".eval() for its deterministic forward, or use a generic mode"
                    )
            return f"it has no rule for {what!s} (node {n.name!r})"
        kinds[n.name] = kind
        if kind != "shape":  # a shape, dtype or device is a constant
            live.add(n.name)
    return _Plan(graph, kinds, position)


# Plans and probe outcomes per module and request signature (weakly keyed by the module).
_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[Any, Any]] = weakref.WeakKeyDictionary()


class TaylorEngine:
    """Per-sample Laplacians and input-Hessian diagonals by Taylor mode (see the module
    docstring)."""

    name = "taylor"

    def _plan(self, request: Request) -> _Plan | str:
        obj = request.objective
        plans = _PLANS.setdefault(obj.module, {})
        key = ("plan", obj.signature())
        if key not in plans:
            plans[key] = _analyse(request)
        return plans[key]  # type: ignore[no-any-return]

    def obstacle(self, request: Request) -> str | None:
        """Why this engine cannot compute `request`, or None if it can."""
        if request.order != 2 or request.quantity not in QUANTITIES:
            return "it computes Laplacians and input-Hessian diagonals only"
        if request.method == "hutchinson" and (
            request.quantity != "trace" or request.weights is not None
            or request.per_sample == "weights"
        ):  # fmt: skip
            return (
                "its Hutchinson estimate is of unweighted traces (v^T H v per probe; a "
                "diagonal or weights need H v; weights w >= 0 are sigma = diag(sqrt(w)), "
                "which it takes: the same expectation, another estimator)"
            )
        if request.method not in ("exact", "hutchinson"):
            method = request.method
            return f"it computes exact quantities and Hutchinson traces, not a {method} estimate"
        if request.quantity == "diagonal" and request.coordinates is not None:
            return "it computes the whole diagonal"
        plan = self._plan(request)
        if isinstance(plan, str):
            return plan
        probes = _PLANS.setdefault(request.objective.module, {})
        key = ("probe", request.quantity, request.randomness, request.objective.signature())
        if key not in probes:
            probes[key] = self._probe(request)
        return probes[key]  # type: ignore[no-any-return]

    def _probe(self, request: Request) -> str | None:
        """Run the rules on one sample: an op whose derivatives torch cannot take in
        forward mode (a fused kernel) is an obstacle, not a failure of the real run."""
        obj = request.objective
        batch = Batch(request.function, obj.args(), obj.in_dims())
        try:
            with DERIVATIVE_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the real run warns, if it must
                self.work(request, ()).batched(*batch.first(1))
        except Exception as error:  # torch's errors, many kinds
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            return f"its rules fail on this module ({type(error).__name__}: {first})"
        return None

    def predicted_faster(self, request: Request) -> bool:
        """Faster than the Hessian-vector products where every op has a cheap rule: a
        smooth op's nested products per direction cost what the products cost."""
        plan = self._plan(request)
        return not isinstance(plan, str) and "smooth" not in plan.kinds.values()

    def axes(self, request: Request) -> tuple[int, ...]:
        """``(1, directions)``: the outer axis, as the Hessian-vector products' outer
        stage, runs over the directions (the coordinates' basis vectors, or the probes);
        a chunk of them runs the forward with its own tangents, a Laplacian adds the
        chunks' sums, a diagonal concatenates their entries. No inner axis."""
        if request.method == "hutchinson":
            return (1, request.num_samples or 0)
        return (1, directions(request))

    def work(self, request: Request, chunks: tuple[int | None, ...]) -> Work:
        obj = request.objective
        plan = self._plan(request)
        assert not isinstance(plan, str)
        absent = obj.absent()
        collapse = request.quantity == "trace"
        n = request.in_numel
        coordinates = request.coordinates
        like = obj.probe_sample()[0]
        # the module's parameters: themselves with create_graph (a PINN trains through
        # the Laplacian), detached otherwise, as the other engines' results are
        state = {
            name: p if obj.create_graph else p.detach()
            for name, p in obj.module.named_parameters()
        }
        basis = torch.eye(n, dtype=like.dtype, device=like.device)
        if coordinates is not None:
            basis = basis[list(coordinates)]
        mask = torch.zeros(n, dtype=like.dtype, device=like.device)
        mask[list(coordinates) if coordinates is not None else slice(None)] = 1.0
        chunk = chunks[1] if len(chunks) > 1 else None

        def quantity(diff: Any, xs: Any, target: Any, buffers: Any, vectors: Any) -> Any:
            del buffers
            inputs = obj._split(diff, xs)[1]
            x = inputs[plan.position]
            # the directions and their weights: the basis vectors of the coordinates,
            # sigma's columns (weights 1), or the probes (each 1 / S; sigma z for sigma's)
            probes, weights, sigma = trace_coefficients(request, vectors)
            rows = basis
            if sigma is not None:
                rows = embedded(sigma.to(like.dtype), coordinates, n).T
                weights = None
            if probes is not None:
                rows = probes @ rows if sigma is not None else probes * mask
                weights = torch.full((len(probes),), 1.0 / len(probes),
                                     dtype=like.dtype, device=like.device)  # fmt: skip
            if weights is not None:
                weights = weights.to(dtype=like.dtype, device=like.device)
            if chunk is None or chunk >= len(rows):
                return along(inputs, x, target, rows, weights)
            starts = range(0, len(rows), chunk)
            copied = copied_chunks(len(starts), len(rows) % chunk != 0)  # the planner's probe
            pieces: list[Tensor] = []
            for index, i in enumerate(starts):
                if index in copied:
                    pieces.append(pieces[0].clone())
                    continue
                part = None if weights is None else weights[i : i + chunk]
                pieces.append(along(inputs, x, target, rows[i : i + chunk], part))
            if collapse:
                return torch.stack(pieces).sum(0)
            return torch.cat(pieces, dim=-1)

        def along(
            inputs: tuple[Any, ...], x: Tensor, target: Any, rows: Tensor, w: Tensor | None
        ) -> Tensor:
            """The quantity's part along the directions `rows` (``[r, n]``): a sum for a
            Laplacian, ``[*y, r]`` entries for a diagonal."""
            tangents = rows.reshape(len(rows), 1, *x.shape)
            k = 1 if collapse else len(rows)
            seed = Jet(
                x.unsqueeze(0),
                tangents,
                torch.zeros(k, 1, *x.shape, dtype=x.dtype, device=x.device),
            )
            run = _Run(plan, state, seed, w if collapse else None, collapse)
            given = [seed if i == plan.position else v.unsqueeze(0) for i, v in enumerate(inputs)]
            placeholders = [p for p in plan.graph.graph.nodes if p.op == "placeholder"]
            given += [
                obj.kwargs[p.target] if p.target in obj.kwargs else p.args[0]
                for p in placeholders[len(given) :]
            ]
            with corrected_ops() if obj.routed else nullcontext():
                out = run.run(*given)
            # the second-order parts of the output (a tensor or a pytree: zeros where a
            # leaf does not depend on x), then the objective's selection of them
            leaves, spec = tree_flatten(out, is_leaf=_is_jet)
            parts = [
                leaf.second if _is_jet(leaf) else leaf.new_zeros(k, *leaf.shape)
                for leaf in leaves
                if _is_jet(leaf) or isinstance(leaf, Tensor)
            ]

            def select(*ts: Tensor) -> Tensor:
                given = iter(ts)
                filled = [
                    next(given) if _is_jet(leaf) or isinstance(leaf, Tensor) else leaf
                    for leaf in leaves
                ]
                return obj._objective(tree_unflatten(filled, spec), target)

            second = torch.vmap(select)(*parts)
            if collapse:
                return second[0]
            return second.movedim(0, -1)  # [*y, r]: the diagonal's entries last

        def quantity_of(diff: Any, xs: Any, target: Any, buffers: Any, vectors: Any) -> Any:
            result = quantity(diff, xs, target, buffers, vectors)
            if collapse:
                return result
            x = obj._split(diff, xs)[1][plan.position]
            return result.reshape(*result.shape[:-1], *x.shape)  # [*y, *x], as the others

        func = with_nones(quantity_of, absent, len(obj.in_dims()))
        work = vmapped(func, obj.in_dims(), 0, request.randomness, absent)
        if request.method == "exact":
            return work
        # the Hessian-vector products' probes, drawn the same way from the same seeds
        shape = (request.num_samples or 0, request.rank or n)
        return with_draws(work, lambda seeds: draws(seeds, shape, like.dtype, like.device))


class _Run(fx.Interpreter):
    """Runs the traced graph on one sample, jets where the values depend on ``x``."""

    def __init__(
        self,
        plan: _Plan,
        state: dict[str, Tensor],
        seed: Jet,
        weights: Tensor | None,
        collapse: bool,
    ) -> None:
        super().__init__(plan.graph, garbage_collect_values=True)
        self.plan, self.state, self.seed = plan, state, seed
        self.weights, self.collapse = weights, collapse

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.state:
            return self.state[target]
        return super().get_attr(target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        layer = self.module.get_submodule(str(target))
        local = {
            name: self.state[f"{target}.{name}"]
            for name, _ in layer.named_parameters()
            if f"{target}.{name}" in self.state
        }
        if not local:
            return layer(*args, **kwargs)
        return torch.func.functional_call(layer, local, tuple(args), kwargs)

    def run_node(self, n: fx.Node) -> Any:
        kind = self.plan.kinds.get(n.name)
        if kind is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if kind == "shape":  # a constant: computed from the values
            n_args, n_kwargs = _values((args, kwargs))
            return getattr(self, n.op)(n.target, n_args, n_kwargs)
        if kind == "affine":
            return self._affine(str(n.target), args[0])
        op = self._callable(n)
        if kind == "linear":
            return _linear(op, args, kwargs, summands=0)
        if kind == "sum":  # add / sub: two terms; cat / stack: a sequence of them
            return _linear(op, args, kwargs, summands=1 if n.target in _SEQUENCES else 2)
        if kind == "product":
            return self._product(args[0], args[1])
        if kind == "smooth":
            return self._smooth(op, args, kwargs)
        if kind in _RULES:
            return _RULES[kind](self, n, args, kwargs)
        if kind == "piecewise":  # second derivative zero almost everywhere: linearised
            u = args[0]

            def function(t: Tensor) -> Tensor:
                return op(t, *args[1:], **kwargs)  # type: ignore[no-any-return]

            parts = torch.vmap(lambda t: torch.func.jvp(function, (u.value,), (t,))[1])
            return Jet(function(u.value), parts(u.first), parts(u.second))
        closed = _CLOSED.get(_closed_name(n, self.module)) if not args[1:] and not kwargs else None
        curved = kind == "curved"
        derivatives = closed or (
            lambda u: _derived(lambda t: op(t, *args[1:], **kwargs), u, second=curved)
        )
        return self._elementwise(derivatives, args[0], curved)

    def _callable(self, n: fx.Node) -> Callable[..., Any]:
        if n.op == "call_module":
            path = str(n.target)
            return lambda *a, **k: self.call_module(path, a, k)
        if n.op == "call_method":
            name = str(n.target)
            return lambda self_, *a, **k: getattr(self_, name)(*a, **k)
        target: Any = n.target
        return target  # type: ignore[no-any-return]

    def _affine(self, path: str, u: Jet) -> Jet:
        layer: Any = self.module.get_submodule(path)
        weight, bias = self.state[f"{path}.weight"], self.state.get(f"{path}.bias")

        def apply(t: Tensor, b: Tensor | None) -> Tensor:
            if isinstance(layer, nn.Linear):
                return torch.nn.functional.linear(t, weight, b)
            if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return layer._conv_forward(t, weight, b)  # type: ignore[no-any-return]
            local = {"weight": weight}
            if bias is not None:  # the derivative parts see a zero bias
                local["bias"] = bias if b is not None else torch.zeros_like(bias)
            return torch.func.functional_call(layer, local, (t,))  # type: ignore[no-any-return]

        parts = torch.vmap(lambda t: apply(t, None))
        return Jet(apply(u.value, bias), parts(u.first), parts(u.second))

    def _square(self, a: Tensor, b: Tensor) -> Tensor:
        """``sum_r w_r a_r b_r`` (collapsed, ``[1, ...]``) or ``a_r b_r`` per direction."""
        return self._collapse(a * b)

    def _elementwise(self, derivatives: Callable[[Tensor], Any], u: Jet, curved: bool) -> Jet:
        """The chain rule of an elementwise function, from ``(s(u), s'(u), s''(u))``
        (``s''`` unused, and None from `_derived`, where the function is not curved)."""
        value, slope, curvature = derivatives(u.value)
        second = slope * u.second
        if curved:
            second = second + curvature * self._square(u.first, u.first)
        return Jet(value, slope * u.first, second)

    def _smooth(self, op: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """Any smooth op of its jet arguments: ``Y_1 = Df[U_1]``, ``Y_2 = Df[U_2] +
        sum_r w_r D^2 f[U_{1,r}, U_{1,r}]`` by (nested) Jacobian-vector products."""
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)), is_leaf=_is_jet)
        jets = [i for i, leaf in enumerate(leaves) if _is_jet(leaf)]
        values = tuple(leaves[i].value for i in jets)

        def function(*xs: Tensor) -> Tensor:
            filled = list(leaves)
            for i, x in zip(jets, xs, strict=True):
                filled[i] = x
            a, k = tree_unflatten(filled, spec)
            return op(*a, **k)  # type: ignore[no-any-return]

        def along(*tangents: Tensor) -> Tensor:
            return torch.func.jvp(function, values, tangents)[1]  # type: ignore[no-any-return]

        def twice(*tangents: Tensor) -> Tensor:
            def inner(*xs: Tensor) -> Tensor:
                return torch.func.jvp(function, xs, tangents)[1]  # type: ignore[no-any-return]

            return torch.func.jvp(inner, values, tangents)[1]  # type: ignore[no-any-return]

        firsts = [leaves[i].first for i in jets]
        value = function(*values)
        first = torch.vmap(along)(*firsts)
        second = torch.vmap(along)(*[leaves[i].second for i in jets])
        curvature = torch.vmap(twice)(*firsts)  # [R, *y] per output
        out, out_spec = tree_flatten(value)
        parts = [tree_flatten(t)[0] for t in (first, second, curvature)]
        jets_out = []
        for y, y1, y2, c in zip(out, *parts, strict=True):
            if not isinstance(y, Tensor) or not y.is_floating_point():
                jets_out.append(y)
                continue
            jets_out.append(Jet(y, y1, y2 + self._collapse(c)))
        return tree_unflatten(jets_out, out_spec)

    def _collapse(self, curvature: Tensor) -> Tensor:
        """Second directional derivatives ``[R, *y]``, summed with the weights into
        ``[1, *y]`` for a Laplacian, kept per direction for a diagonal."""
        if not self.collapse:
            return curvature
        if self.weights is None:
            return curvature.sum(0, keepdim=True)
        collapsed: Tensor = torch.tensordot(self.weights, curvature, dims=1)
        return collapsed.unsqueeze(0)

    def _bilinear(self, op: Callable[[Tensor, Tensor], Tensor], u: Any, v: Any) -> Jet:
        """A product `op` (elementwise, of matrices) of two values, jets or constants."""
        if not _is_jet(u) or not _is_jet(v):
            constant = u if not _is_jet(u) else v
            jet = v if constant is u else u

            def with_constant(t: Tensor) -> Tensor:
                return op(constant, t) if constant is u else op(t, constant)

            parts = torch.vmap(with_constant)
            return Jet(with_constant(jet.value), parts(jet.first), parts(jet.second))
        left = torch.vmap(lambda t: op(t, v.value))
        right = torch.vmap(lambda t: op(u.value, t))
        cross = self._collapse(torch.vmap(op)(u.first, v.first))
        return Jet(
            op(u.value, v.value),
            left(u.first) + right(v.first),
            left(u.second) + right(v.second) + 2 * cross,
        )

    def _product(self, u: Any, v: Any) -> Jet:
        return Jet(
            u.value * v.value,
            u.first * v.value + u.value * v.first,
            u.second * v.value + u.value * v.second + 2 * self._square(u.first, v.first),
        )


def _derived(
    function: Callable[[Tensor], Tensor], u: Tensor, second: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(s(u), s'(u), s''(u))`` of an elementwise function, by forward-mode AD of it;
    ``s''`` only where asked (`second`: not for a piecewise-linear function)."""
    ones = torch.ones_like(u)

    def derivative(v: Tensor) -> Tensor:
        return torch.func.jvp(function, (v,), (ones,))[1]  # type: ignore[no-any-return]

    value, slope = torch.func.jvp(function, (u,), (ones,))[:2]
    if not second:
        return value, slope, None
    return value, slope, torch.func.jvp(derivative, (u,), (ones,))[1]


def _tanh(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.tanh(u)
    slope = 1 - y * y
    return y, slope, -2 * y * slope


def _sigmoid(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.sigmoid(u)
    slope = y * (1 - y)
    return y, slope, slope * (1 - 2 * y)


# Closed forms of the commonest activations: fewer kernels than nested forward mode.
_CLOSED: dict[str | None, Callable[[Tensor], tuple[Tensor, Tensor, Tensor | None]]] = {
    "tanh": _tanh,
    "sigmoid": _sigmoid,
}


def _closed_name(n: fx.Node, module: nn.Module) -> str | None:
    """``"tanh"`` / ``"sigmoid"`` where node `n` is that activation, else None."""
    if n.op == "call_module":
        layer = module.get_submodule(str(n.target))
        kinds = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
        return next((v for k, v in kinds.items() if plain_module(layer, (k,))), None)
    if n.op == "call_method":
        return str(n.target) if n.target in ("tanh", "sigmoid") else None
    functions: dict[Any, str] = {
        torch.tanh: "tanh",
        F.tanh: "tanh",
        torch.sigmoid: "sigmoid",
        F.sigmoid: "sigmoid",
    }
    return functions.get(n.target)


def _values(tree: Any) -> Any:
    """`tree` with its jets replaced by their values."""
    leaves, spec = tree_flatten(tree, is_leaf=_is_jet)
    return tree_unflatten([leaf.value if _is_jet(leaf) else leaf for leaf in leaves], spec)


def _linear(op: Callable[..., Any], args: Any, kwargs: Any, *, summands: int) -> Jet:
    """`op`, linear in its jet arguments, applied to every part. In the derivative parts
    the other arguments stay (a scaling's factor, a view's shape), except the constant
    terms of a sum (in its first `summands` positional arguments), which become zeros."""
    args = tuple(args)
    terms, term_spec = tree_flatten(args[:summands], is_leaf=_is_jet)
    rest, rest_spec = tree_flatten((args[summands:], dict(kwargs)), is_leaf=_is_jet)

    def zero(leaf: Any) -> Any:
        if isinstance(leaf, Tensor):
            return torch.zeros_like(leaf)
        return 0 if isinstance(leaf, (int, float)) and not isinstance(leaf, bool) else leaf

    def call(terms_: list[Any], rest_: list[Any]) -> Any:
        front = tree_unflatten(terms_, term_spec)
        back, k = tree_unflatten(rest_, rest_spec)
        return op(*front, *back, **k)

    def value(leaf: Any) -> Any:
        return leaf.value if _is_jet(leaf) else leaf

    leaves = terms + rest
    jets = [i for i, leaf in enumerate(leaves) if _is_jet(leaf)]
    constants = [zero(leaf) for leaf in terms] + [value(leaf) for leaf in rest]

    def parts(*p: Tensor) -> Any:
        filled = list(constants)
        for i, part in zip(jets, p, strict=True):
            filled[i] = part
        return call(filled[: len(terms)], filled[len(terms) :])

    vectorised = torch.vmap(parts)
    return Jet(
        call([value(leaf) for leaf in terms], [value(leaf) for leaf in rest]),
        vectorised(*[leaves[i].first for i in jets]),
        vectorised(*[leaves[i].second for i in jets]),
    )


# ---- composed rules: smooth ops written with the cheap ones ------------------------


def _exp(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.exp(u)
    return y, y, y


def _log(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r = 1 / u
    return torch.log(u), r, -r * r


def _reciprocal(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r = 1 / u
    return r, -r * r, 2 * r * r * r


def _rsqrt(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r = torch.rsqrt(u)
    cube = r * r * r
    return r, -0.5 * cube, 0.75 * cube * r * r


def _shift(u: Jet, c: Tensor) -> Jet:
    """``u + c`` for a constant `c`."""
    return Jet(u.value + c, u.first, u.second)


def _minus(u: Jet, v: Jet) -> Jet:
    return Jet(u.value - v.value, u.first - v.first, u.second - v.second)


def _reduce(u: Jet, reduce: Callable[..., Tensor], dims: tuple[int, ...]) -> Jet:
    """A sum or mean over `dims` (negative: the parts have leading dims of their own)."""
    return Jet(*(reduce(t, dims, keepdim=True) for t in (u.value, u.first, u.second)))


def _negative(dims: Any, ndim: int) -> tuple[int, ...]:
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return tuple(d - ndim if d >= 0 else d for d in dims)


def _argument(n: fx.Node, args: Any, kwargs: Any, position: int, name: str, default: Any) -> Any:
    """Argument `name` of a call (at `position` of a function's signature; a method's
    ``self`` is position 0 too)."""
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def _exponentials(run: _Run, n: fx.Node, args: Any, kwargs: Any) -> tuple[Jet, Jet, Jet]:
    """A softmax's ``u - max u`` (the max a constant), its exponentials and their sum."""
    u = args[0]
    if n.op == "call_module":
        dim = run.module.get_submodule(str(n.target)).dim
    else:
        dim = _argument(n, args, kwargs, 1, "dim", None)
    if dim is None:  # torch's legacy implicit dim (of the forward's batch of one)
        dim = 0 if u.value.dim() in (0, 1, 3) else 1
    dims = _negative(dim, u.value.dim())
    shifted = _shift(u, -u.value.detach().amax(dims, keepdim=True))
    e = run._elementwise(_exp, shifted, True)
    return shifted, e, _reduce(e, torch.sum, dims)


def _softmax(run: _Run, n: fx.Node, args: Any, kwargs: Any) -> Jet:
    _, e, total = _exponentials(run, n, args, kwargs)
    return run._bilinear(torch.mul, e, run._elementwise(_reciprocal, total, True))


def _log_softmax(run: _Run, n: fx.Node, args: Any, kwargs: Any) -> Jet:
    shifted, _, total = _exponentials(run, n, args, kwargs)
    return _minus(shifted, run._elementwise(_log, total, True))


def _norm(run: _Run, n: fx.Node, args: Any, kwargs: Any, centred: bool) -> Jet:
    """Layer norm (`centred`) or RMS norm over the last dims, then the elementwise
    affine map, its weight and bias constants."""
    u = args[0]
    if n.op == "call_module":
        path = str(n.target)
        layer: Any = run.module.get_submodule(path)
        shape, eps = layer.normalized_shape, layer.eps
        weight, bias = run.state.get(f"{path}.weight"), run.state.get(f"{path}.bias")
    else:
        shape = _argument(n, args, kwargs, 1, "normalized_shape", None)
        weight = _argument(n, args, kwargs, 2, "weight", None)
        bias = _argument(n, args, kwargs, 3, "bias", None) if centred else None
        eps = _argument(n, args, kwargs, 4 if centred else 3, "eps", 1e-5 if centred else None)
    if eps is None:  # RMS norm's default
        eps = torch.finfo(u.value.dtype).eps
    dims = tuple(range(-(1 if isinstance(shape, int) else len(shape)), 0))
    if centred:
        u = _minus(u, _reduce(u, torch.mean, dims))
    variance = _reduce(run._bilinear(torch.mul, u, u), torch.mean, dims)
    y = run._bilinear(torch.mul, u, run._elementwise(_rsqrt, _shift(variance, eps), True))
    if weight is not None:
        y = Jet(y.value * weight, y.first * weight, y.second * weight)
    return y if bias is None else _shift(y, bias)


def _layer_norm(run: _Run, n: fx.Node, args: Any, kwargs: Any) -> Jet:
    return _norm(run, n, args, kwargs, centred=True)


def _rms_norm(run: _Run, n: fx.Node, args: Any, kwargs: Any) -> Jet:
    return _norm(run, n, args, kwargs, centred=False)


def _matrix_product(run: _Run, n: fx.Node, args: Any, kwargs: Any) -> Jet:
    op = torch.bmm if n.target in (torch.bmm, "bmm") else torch.matmul
    return run._bilinear(op, args[0], args[1])


def _quotient(run: _Run, n: fx.Node, args: Any, kwargs: Any) -> Jet:
    """``u / v = u * (1 / v)`` with `v` a jet (``u / c`` is a scaling: linear)."""
    return run._bilinear(torch.mul, args[0], run._elementwise(_reciprocal, args[1], True))


_RULES: dict[str, Callable[[_Run, fx.Node, Any, Any], Any]] = {
    "softmax": _softmax,
    "log_softmax": _log_softmax,
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "bilinear": _matrix_product,
    "quotient": _quotient,
}
