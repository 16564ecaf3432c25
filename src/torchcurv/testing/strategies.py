"""Hypothesis strategies for curvature code: dtypes, modes, chunk sizes, test functions
with closed-form Hessians, small networks and their inputs.

Designed like `hypothesis.extra.numpy`: arguments are keyword-only (but for the basis
size of `chunk_sizes` and the module of `inputs_for`), take a value or a strategy of
values, and have small defaults. A bad argument raises
`hypothesis.errors.InvalidArgument` naming the function and the argument: a value when
the strategy is built, a value drawn from an argument strategy when it is drawn.
Everything is float64 unless asked otherwise, tiny, and shrinks towards the simplest
case: the smallest sizes, the first dtype, mode and kind listed, zero coefficients and
inputs.

Networks are built in eval mode, with weights made deterministically from a drawn seed
(`torch.Generator`), and carry their per-sample input shape as ``module.input_shape``
so that `inputs_for` can draw a batch for them: MLPs (`mlps`, `normalized_nets`,
`residual_nets`), CNNs (`conv_nets`, `residual_nets`), sequence models on ``[B, T, F]``
(`transformer_blocks`, `recurrent_nets`) and token models on integer ids
(`embedding_nets`, which also carry ``module.vocab_size``). Every network maps its
batch to ``[B, out_features]``.

Example:
    >>> import torch, torchcurv
    >>> from hypothesis import given, settings
    >>> from torchcurv.testing import strategies as tcst
    >>> @settings(deadline=None)
    ... @given(tcst.functions())
    ... def test_hessian_closed_form(f):
    ...     H = torchcurv.hessian(f.func)(f.x)
    ...     assert torch.allclose(H, f.hessian(f.x))
    >>> test_hessian_closed_form()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy
from torch import nn

from .._types import HESSIAN_MODES, JACOBIAN_MODES

__all__ = [
    "ACTIVATIONS",
    "CELLS",
    "EMBEDDING_POOLING",
    "FUNCTION_KINDS",
    "MASKS",
    "NORMS",
    "POOLING",
    "RESIDUAL_KINDS",
    "TRANSFORMER_ACTIVATIONS",
    "TRANSFORMER_KINDS",
    "AttentionBlock",
    "MaskedBlock",
    "MeanOverPositions",
    "RecurrentNet",
    "ResidualBlock",
    "TestFunction",
    "TiedMLP",
    "chunk_sizes",
    "conv_nets",
    "dtypes",
    "embedding_nets",
    "functions",
    "hessian_modes",
    "inputs_for",
    "jacobian_modes",
    "mlps",
    "normalized_nets",
    "recurrent_nets",
    "residual_nets",
    "transformer_blocks",
]

T = TypeVar("T")

#: The kinds of `TestFunction` that `functions` draws.
FUNCTION_KINDS: tuple[str, ...] = ("quadratic", "separable", "composition")

#: Activation names accepted by `mlps` and `conv_nets`, and the layers they stand for.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "identity": nn.Identity,
}

#: Pooling choices accepted by `conv_nets` (None: no pooling layer).
POOLING: tuple[str | None, ...] = (None, "max", "avg")

#: Inputs with at most this many entries are drawn entry by entry (they shrink entry by
#: entry); larger ones are a drawn scale times a seeded uniform pattern, which keeps
#: hypothesis' choice sequence small (it refuses examples of more than a few kB).
ELEMENTWISE_LIMIT = 64

_SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


# --------------------------------------------------------------------------------------
# argument checks and resolution of value-or-strategy arguments
# --------------------------------------------------------------------------------------


def _fail(function: str, argument: str, value: Any, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{function}: {argument}={value!r} {problem}.")


def _check_int(function: str, argument: str, value: Any, min_value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(function, argument, value, "must be an int")
    if value < min_value:
        raise _fail(function, argument, value, f"must be at least {min_value}")
    return value


def _check_order(function: str, low_name: str, low: int, high_name: str, high: int) -> None:
    if low > high:
        raise _fail(function, low_name, low, f"must be at most {high_name}={high!r}")


def _check_bool(function: str, argument: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(function, argument, value, "must be a bool (or a strategy of bools)")
    return value


def _check_dtype(function: str, argument: str, value: Any) -> torch.dtype:
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise _fail(
            function, argument, value, "must be a floating-point torch.dtype such as torch.float64"
        )
    return value


def _check_choices(
    function: str, argument: str, values: Any, known: Sequence[Any]
) -> tuple[Any, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise _fail(
            function,
            argument,
            values,
            "must be a non-empty sequence of names; known: " + ", ".join(repr(k) for k in known),
        )
    for value in values:
        if value not in known:
            raise _fail(
                function,
                argument,
                values,
                f"has unknown entry {value!r}; known: " + ", ".join(repr(k) for k in known),
            )
    return tuple(values)


def _resolve(
    build: Callable[..., SearchStrategy[T]], arguments: Mapping[str, Any]
) -> SearchStrategy[T] | None:
    """``build(**arguments)`` drawn lazily if any argument is a strategy, else None.

    The drawn values are checked by `build` when it runs, so a strategy of bad values
    raises `InvalidArgument` at draw time.
    """
    if not any(isinstance(v, SearchStrategy) for v in arguments.values()):
        return None
    drawn = st.fixed_dictionaries(
        {k: v if isinstance(v, SearchStrategy) else st.just(v) for k, v in arguments.items()}
    )
    return drawn.flatmap(lambda kwargs: build(**kwargs))


def _as_strategy(value: T | SearchStrategy[T]) -> SearchStrategy[T]:
    return value if isinstance(value, SearchStrategy) else st.just(value)


def _floats(low: float, high: float) -> SearchStrategy[float]:
    return st.floats(
        min_value=low, max_value=high, allow_nan=False, allow_infinity=False, allow_subnormal=False
    )


def _vector(
    draw: st.DrawFn, size: int, low: float, high: float, dtype: torch.dtype
) -> torch.Tensor:
    """Floats drawn in ``[low, high]``, rounded to `dtype` and held exactly in float64."""
    values = draw(st.lists(_floats(low, high), min_size=size, max_size=size))
    return torch.tensor(values, dtype=torch.float64).to(dtype).to(torch.float64)


# --------------------------------------------------------------------------------------
# dtypes, modes, chunk sizes
# --------------------------------------------------------------------------------------


def dtypes(
    *,
    allowed: Sequence[torch.dtype] | SearchStrategy[Sequence[torch.dtype]] = (
        torch.float64,
        torch.float32,
    ),
) -> SearchStrategy[torch.dtype]:
    """Floating-point torch dtypes, shrinking towards the first one allowed.

    Args:
        allowed: The dtypes to choose from (floating point). Default float64 (where
            failures shrink to) and float32.

    Returns:
        A strategy of `torch.dtype`.

    Raises:
        InvalidArgument: If `allowed` is empty or holds a non-floating dtype.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from torchcurv.testing.strategies import dtypes
        >>> find(dtypes(), lambda dtype: True)
        torch.float64
        >>> find(dtypes(), lambda dtype: dtype.itemsize < 8)
        torch.float32
    """
    resolved = _resolve(lambda allowed: dtypes(allowed=allowed), {"allowed": allowed})
    if resolved is not None:
        return resolved
    if isinstance(allowed, (str, bytes)) or not isinstance(allowed, Sequence) or not allowed:
        raise _fail("dtypes", "allowed", allowed, "must be a non-empty sequence of dtypes")
    for dtype in allowed:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise _fail(
                "dtypes",
                "allowed",
                allowed,
                f"has {dtype!r}, which is not a floating-point torch.dtype",
            )
    return st.sampled_from(list(allowed))


def hessian_modes(*, auto: bool | SearchStrategy[bool] = True) -> SearchStrategy[str]:
    """The `mode` values of `torchcurv.hessian`, shrinking towards the default.

    The four explicit modes (``"fwd-over-rev"``, ``"rev-over-rev"``,
    ``"rev-over-fwd"``, ``"fwd-over-fwd"``) and, unless ``auto=False``, ``"auto"``.

    Args:
        auto: Whether to include ``"auto"``.

    Returns:
        A strategy of mode names, shrinking towards ``"fwd-over-rev"`` (the default).

    Raises:
        InvalidArgument: If `auto` is not a bool.

    Example:
        >>> import torch, torchcurv
        >>> from hypothesis import given, settings
        >>> from torchcurv.testing.strategies import hessian_modes
        >>> x = torch.tensor([0.5, -1.0], dtype=torch.float64)
        >>> @settings(deadline=None)
        ... @given(hessian_modes())
        ... def test_modes_agree(mode):
        ...     H = torchcurv.hessian(lambda x: x.exp().sum(), mode=mode)(x)
        ...     assert torch.allclose(H, torch.diag(x.exp()))
        >>> test_modes_agree()
    """
    resolved = _resolve(lambda auto: hessian_modes(auto=auto), {"auto": auto})
    if resolved is not None:
        return resolved
    _check_bool("hessian_modes", "auto", auto)
    return st.sampled_from([m for m in HESSIAN_MODES if auto or m != "auto"])


def jacobian_modes(*, auto: bool | SearchStrategy[bool] = True) -> SearchStrategy[str]:
    """The `mode` values of `torchcurv.jacobian`: ``"rev"``, ``"fwd"`` and ``"auto"``.

    Args:
        auto: Whether to include ``"auto"``.

    Returns:
        A strategy of mode names, shrinking towards ``"rev"`` (the default).

    Raises:
        InvalidArgument: If `auto` is not a bool.

    Example:
        >>> from hypothesis import find
        >>> from torchcurv.testing.strategies import jacobian_modes
        >>> find(jacobian_modes(), lambda mode: True)
        'rev'
        >>> find(jacobian_modes(auto=False), lambda mode: mode != "rev")
        'fwd'
    """
    resolved = _resolve(lambda auto: jacobian_modes(auto=auto), {"auto": auto})
    if resolved is not None:
        return resolved
    _check_bool("jacobian_modes", "auto", auto)
    return st.sampled_from([m for m in JACOBIAN_MODES if auto or m != "auto"])


def chunk_sizes(
    n: int | SearchStrategy[int], *, pairs: bool | SearchStrategy[bool] = True
) -> SearchStrategy[int | tuple[int | None, int | None] | None]:
    """Chunk sizes for a basis of `n` vectors: None, ints ``1..n+1`` and pairs of them.

    ``n + 1`` is included to cover "a chunk larger than the basis". With `pairs`, also
    ``(inner, outer)`` pairs of None or ints, as `torchcurv.hessian` accepts. Shrinks
    towards None (no chunking), then 1.

    Args:
        n: The size of the basis (e.g. ``x.numel()``), at least 0.
        pairs: Whether to draw ``(inner, outer)`` pairs too (False for Jacobians).

    Returns:
        A strategy of chunk sizes.

    Raises:
        InvalidArgument: If `n` is negative or not an int, or `pairs` not a bool.

    Example:
        >>> import torch, torchcurv
        >>> from hypothesis import given, settings
        >>> from torchcurv.testing.strategies import chunk_sizes
        >>> x = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
        >>> @settings(deadline=None)
        ... @given(chunk_sizes(x.numel()))
        ... def test_chunking_is_invisible(chunk):
        ...     H = torchcurv.hessian(lambda x: x.sin().sum(), chunk_size=chunk)(x)
        ...     assert torch.allclose(H, torch.diag(-x.sin()))
        >>> test_chunking_is_invisible()
    """
    resolved = _resolve(lambda n, pairs: chunk_sizes(n, pairs=pairs), {"n": n, "pairs": pairs})
    if resolved is not None:
        return resolved
    size = _check_int("chunk_sizes", "n", n, 0)
    _check_bool("chunk_sizes", "pairs", pairs)
    ints = st.integers(min_value=1, max_value=size + 1)
    single: SearchStrategy[int | tuple[int | None, int | None] | None] = st.none() | ints
    if not pairs:
        return single
    return single | st.tuples(st.none() | ints, st.none() | ints)


# --------------------------------------------------------------------------------------
# test functions with closed-form derivatives
# --------------------------------------------------------------------------------------

_Elementwise = Callable[[torch.Tensor], torch.Tensor]


def _tanh_prime(z: torch.Tensor) -> torch.Tensor:
    return 1 - torch.tanh(z) ** 2


def _tanh_second(z: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(z)
    return -2 * t * (1 - t**2)


def _sigmoid_prime(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _neg_sin(z: torch.Tensor) -> torch.Tensor:
    return -torch.sin(z)


def _double(z: torch.Tensor) -> torch.Tensor:
    return 2 * z


def _two(z: torch.Tensor) -> torch.Tensor:
    return torch.full_like(z, 2.0)


#: Scalar functions with their first and second derivatives, written out by hand.
_SCALARS: dict[str, tuple[_Elementwise, _Elementwise, _Elementwise]] = {
    "sin": (torch.sin, torch.cos, _neg_sin),
    "exp": (torch.exp, torch.exp, torch.exp),
    "softplus": (nn.functional.softplus, torch.sigmoid, _sigmoid_prime),
    "tanh": (torch.tanh, _tanh_prime, _tanh_second),
    "square": (torch.square, _double, _two),
}
_SEPARABLE = ("sin", "exp", "softplus", "tanh")
_OUTER = ("sin", "exp", "softplus", "tanh", "square")


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return repr(value.tolist())
    if isinstance(value, tuple):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return repr(value)


@dataclass(frozen=True, eq=False, repr=False)
class TestFunction:
    """A scalar function of a 1-D tensor with exact gradient and Hessian, and a point.

    Drawn by `functions`. The kinds and their closed forms (``n = x.numel()``):

    * ``quadratic``: ``f(x) = x^T A x + b^T x``; ``grad = (A + A^T) x + b``,
      ``H = A + A^T`` (``A`` is not symmetric in general).
    * ``separable``: ``f(x) = sum_i c_i g_i(x_i)`` with each ``g_i`` one of sin, exp,
      softplus, tanh; ``grad_i = c_i g_i'(x_i)``, ``H = diag(c_i g_i''(x_i))``.
    * ``composition``: ``f(x) = h(a^T x + c)`` with ``h`` one of sin, exp, softplus,
      tanh, square; ``grad = h'(z) a``, ``H = h''(z) a a^T`` at ``z = a^T x + c``.

    Coefficients are exactly representable in the function's dtype; the closed forms
    are evaluated in float64 and rounded to the dtype of their argument, so they are
    the correctly rounded derivatives of the float32 function too.

    Attributes:
        name: A readable name such as ``"quadratic(n=3)"``.
        func: The function, ``x`` of shape ``(n,)`` to a 0-d tensor.
        x: A point, shape ``(n,)``, entries in ``[-2, 2]``.
        kind: One of `FUNCTION_KINDS`.
        parameters: The coefficients (float64 tensors) and scalar functions used.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from torchcurv import reference
        >>> from torchcurv.testing.strategies import functions
        >>> find(functions(min_dim=2, kinds=["separable"]), lambda f: True)
        separable(n=2, g=(sin, sin))[c=[0.0, 0.0], x=[0.0, 0.0], dtype=float64]
        >>> f = find(functions(min_dim=2, kinds=["separable"]),
        ...          lambda f: bool(f.hessian(f.x).diagonal().abs().min() > 0.1))
        >>> torch.allclose(reference.hessian(f.func)(f.x), f.hessian(f.x))
        True
    """

    __test__: ClassVar[bool] = False  # a library class, not a pytest test class

    name: str
    func: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    kind: str
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def _z(self, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.parameters["a"] @ x + self.parameters["c"]
        return z

    def gradient(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """The exact gradient at `x` (default: `self.x`), shape ``(n,)``.

        Args:
            x: The point, a 1-D tensor of any floating dtype.

        Returns:
            The gradient, in the dtype of `x` (computed in float64).
        """
        point = self.x if x is None else x
        x64 = point.detach().to(torch.float64)
        p = self.parameters
        if self.kind == "quadratic":
            grad: torch.Tensor = (p["A"] + p["A"].T) @ x64 + p["b"]
        elif self.kind == "separable":
            grad = torch.stack([_SCALARS[g][1](x64[i]) for i, g in enumerate(p["g"])]) * p["c"]
        else:
            grad = _SCALARS[p["h"]][1](self._z(x64)) * p["a"]
        return grad.to(point.dtype)

    def hessian(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """The exact Hessian at `x` (default: `self.x`), shape ``(n, n)``.

        Args:
            x: The point, a 1-D tensor of any floating dtype.

        Returns:
            The Hessian, in the dtype of `x` (computed in float64).
        """
        point = self.x if x is None else x
        x64 = point.detach().to(torch.float64)
        p = self.parameters
        if self.kind == "quadratic":
            hess: torch.Tensor = p["A"] + p["A"].T
        elif self.kind == "separable":
            second = torch.stack([_SCALARS[g][2](x64[i]) for i, g in enumerate(p["g"])])
            hess = torch.diag(second * p["c"])
        else:
            hess = _SCALARS[p["h"]][2](self._z(x64)) * torch.outer(p["a"], p["a"])
        return hess.to(point.dtype)

    @property
    def dim(self) -> int:
        """``n``, the number of entries of ``x``."""
        return self.x.numel()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis prints falsifying examples with IPython's protocol; without this it
        # would list the dataclass fields instead of the readable repr.
        printer.text(repr(self))

    def __repr__(self) -> str:
        shown = [f"{k}={_show(v)}" for k, v in self.parameters.items() if k not in ("g", "h")]
        shown.append(f"x={_show(self.x)}")
        shown.append(f"dtype={str(self.x.dtype).removeprefix('torch.')}")
        return f"{self.name}[{', '.join(shown)}]"


def _quadratic(draw: st.DrawFn, n: int, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    A = _vector(draw, n * n, -2.0, 2.0, dtype).reshape(n, n)
    b = _vector(draw, n, -2.0, 2.0, dtype)
    A_, b_ = A.to(dtype), b.to(dtype)

    def quadratic(x: torch.Tensor) -> torch.Tensor:
        return x @ A_ @ x + b_ @ x

    return quadratic, {"A": A, "b": b}


def _separable(draw: st.DrawFn, n: int, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    g = tuple(draw(st.lists(st.sampled_from(_SEPARABLE), min_size=n, max_size=n)))
    c = _vector(draw, n, -2.0, 2.0, dtype)
    c_ = c.to(dtype)

    def separable(x: torch.Tensor) -> torch.Tensor:
        return (torch.stack([_SCALARS[name][0](x[i]) for i, name in enumerate(g)]) * c_).sum()

    return separable, {"g": g, "c": c}


def _composition(draw: st.DrawFn, n: int, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    h = draw(st.sampled_from(_OUTER))
    # |a^T x| <= 2/n * 2 * n = 4 for x in [-2, 2]: exp(z) stays below e^5.
    a = _vector(draw, n, -2.0 / n, 2.0 / n, dtype)
    c = _vector(draw, 1, -1.0, 1.0, dtype)[0]
    a_, c_ = a.to(dtype), c.to(dtype)
    outer = _SCALARS[h][0]

    def composition(x: torch.Tensor) -> torch.Tensor:
        return outer(a_ @ x + c_)

    return composition, {"h": h, "a": a, "c": c}


_BUILDERS = {"quadratic": _quadratic, "separable": _separable, "composition": _composition}


def functions(
    *,
    min_dim: int | SearchStrategy[int] = 1,
    max_dim: int | SearchStrategy[int] = 5,
    kinds: Sequence[str] | SearchStrategy[Sequence[str]] = FUNCTION_KINDS,
    dtype: torch.dtype | SearchStrategy[torch.dtype] = torch.float64,
) -> SearchStrategy[TestFunction]:
    """Scalar test functions with closed-form gradients and Hessians, and a point.

    See `TestFunction` for the kinds. Coefficients lie in ``[-2, 2]`` (the composition's
    ``a`` in ``[-2/n, 2/n]``, so ``|a^T x + c| <= 5``), the point in ``[-2, 2]``: values
    stay moderate and float32 results are meaningful. Shrinks towards ``n = min_dim``,
    the first kind and zero coefficients.

    Args:
        min_dim: The smallest ``n`` (at least 1).
        max_dim: The largest ``n``.
        kinds: The kinds to draw from, a subset of `FUNCTION_KINDS`.
        dtype: The dtype of ``x`` and of the function's coefficients.

    Returns:
        A strategy of `TestFunction`.

    Raises:
        InvalidArgument: If ``min_dim < 1``, ``min_dim > max_dim``, a kind is unknown or
            `dtype` is not floating point.

    Example:
        >>> import torch, torchcurv
        >>> from hypothesis import given, settings
        >>> from torchcurv.testing.strategies import functions
        >>> @settings(deadline=None)
        ... @given(functions(max_dim=3))
        ... def test_gradient(f):
        ...     assert torch.allclose(torchcurv.jacobian(f.func)(f.x), f.gradient(f.x))
        >>> test_gradient()
    """
    arguments = {"min_dim": min_dim, "max_dim": max_dim, "kinds": kinds, "dtype": dtype}
    resolved = _resolve(lambda **kw: functions(**kw), arguments)
    if resolved is not None:
        return resolved
    name = "functions"
    low = _check_int(name, "min_dim", min_dim, 1)
    high = _check_int(name, "max_dim", max_dim, 1)
    _check_order(name, "min_dim", low, "max_dim", high)
    chosen = _check_choices(name, "kinds", kinds, FUNCTION_KINDS)
    resolved_dtype = _check_dtype(name, "dtype", dtype)
    return _functions(low, high, chosen, resolved_dtype)


@st.composite
def _functions(
    draw: st.DrawFn, min_dim: int, max_dim: int, kinds: tuple[str, ...], dtype: torch.dtype
) -> TestFunction:
    kind = draw(st.sampled_from(kinds))
    n = draw(st.integers(min_value=min_dim, max_value=max_dim))
    func, parameters = _BUILDERS[kind](draw, n, dtype)
    x = _vector(draw, n, -2.0, 2.0, dtype).to(dtype)
    label = f"{kind}(n={n}"
    if kind == "separable":
        label += f", g={_show(parameters['g'])}"
    elif kind == "composition":
        label += f", h={parameters['h']}"
    return TestFunction(name=label + ")", func=func, x=x, kind=kind, parameters=parameters)


# --------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------


class TiedMLP(nn.Module):
    """An MLP whose first two layers are square and share one weight tensor.

    ``layers[0].weight is layers[1].weight``; the biases are separate. `forward` runs
    the layers in order, like `nn.Sequential`, on a batch ``[B, width]``.
    """

    input_shape: tuple[int, ...]

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def extra_repr(self) -> str:
        return "layers[0].weight is layers[1].weight"


def _uniform(
    generator: torch.Generator, shape: tuple[int, ...], low: float, high: float
) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _linear(
    generator: torch.Generator, fan_in: int, fan_out: int, bias: bool, dtype: torch.dtype
) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, bias=bias, dtype=dtype)
    bound = 2.0 / math.sqrt(fan_in)
    with torch.no_grad():
        layer.weight.copy_(_uniform(generator, (fan_out, fan_in), -bound, bound))
        if layer.bias is not None:
            layer.bias.copy_(_uniform(generator, (fan_out,), -0.5, 0.5))
    return layer


def _batch_norm(generator: torch.Generator, width: int, dtype: torch.dtype) -> nn.BatchNorm1d:
    layer = nn.BatchNorm1d(width, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(_uniform(generator, (width,), 0.5, 1.5))
        layer.bias.copy_(_uniform(generator, (width,), -0.5, 0.5))
        mean, var = layer.running_mean, layer.running_var
        assert mean is not None
        assert var is not None
        mean.copy_(_uniform(generator, (width,), -0.5, 0.5))
        var.copy_(_uniform(generator, (width,), 0.5, 2.0))
    return layer


def _set_input_shape(module: nn.Module, shape: tuple[int, ...]) -> None:
    # A plain attribute; nn.Module.__setattr__ is typed for tensors and modules only.
    module.__dict__["input_shape"] = shape


def _draw_bias(
    draw: st.DrawFn, bias: bool | SearchStrategy[bool] | None, function: str = "mlps"
) -> bool:
    value = draw(st.booleans() if bias is None else _as_strategy(bias))
    return _check_bool(function, "bias", value)


def mlps(
    *,
    in_features: int | SearchStrategy[int] | None = None,
    out_features: int | SearchStrategy[int] | None = None,
    min_depth: int | SearchStrategy[int] = 1,
    max_depth: int | SearchStrategy[int] = 3,
    min_width: int | SearchStrategy[int] = 1,
    max_width: int | SearchStrategy[int] = 8,
    activations: Sequence[str] | SearchStrategy[Sequence[str]] = (
        "tanh",
        "sigmoid",
        "softplus",
        "gelu",
    ),
    bias: bool | SearchStrategy[bool] | None = None,
    batch_norm: bool | SearchStrategy[bool] = False,
    tied: bool | SearchStrategy[bool] = False,
    dtype: torch.dtype | SearchStrategy[torch.dtype] = torch.float64,
) -> SearchStrategy[nn.Module]:
    """Small multilayer perceptrons in eval mode, with deterministic drawn weights.

    ``depth`` Linear layers (drawn in ``[min_depth, max_depth]``), hidden widths in
    ``[min_width, max_width]``; each hidden layer is followed by an optional
    `nn.BatchNorm1d` (eval mode, non-trivial running statistics and affine parameters)
    and an activation drawn from `activations`. Weights are uniform in
    ``±2/sqrt(fan_in)``, biases in ``±0.5``, made by a `torch.Generator` from a drawn
    seed. The module is an `nn.Sequential`, or with ``tied=True`` a `TiedMLP`; either
    way ``module.input_shape == (in_features,)`` and ``module(X)`` maps
    ``[B, in_features]`` to ``[B, out_features]``.

    Args:
        in_features: Input size; default drawn in ``[1, 4]``.
        out_features: Output size; default drawn in ``[1, 3]``.
        min_depth: Fewest Linear layers (at least 1).
        max_depth: Most Linear layers.
        min_width: Smallest hidden width (at least 1).
        max_width: Largest hidden width.
        activations: Names from `ACTIVATIONS` to draw each hidden activation from.
        bias: Whether Linear layers have a bias: a bool, or a strategy drawn once per
            layer; default `st.booleans()`.
        batch_norm: Whether hidden layers are followed by `nn.BatchNorm1d`.
        tied: If True, the first two layers are square (``in_features`` = the hidden
            width) and share one weight tensor; this needs ``max_depth >= 3`` and
            raises the drawn depth to at least 3.
        dtype: The parameters' dtype.

    Returns:
        A strategy of `nn.Module` with an ``input_shape`` attribute.

    Raises:
        InvalidArgument: On sizes below 1, a ``min_*`` above its ``max_*``, unknown
            activations, non-bool flags, ``tied=True`` with ``max_depth < 3``, or a
            non-floating `dtype`.

    Example:
        >>> from hypothesis import given, settings, strategies as st
        >>> from torchcurv.testing.strategies import inputs_for, mlps
        >>> @settings(deadline=None)
        ... @given(mlps(out_features=2, batch_norm=True), st.data())
        ... def test_shapes(model, data):
        ...     X = data.draw(inputs_for(model))
        ...     assert not model.training
        ...     assert model(X).shape == (X.shape[0], 2)
        >>> test_shapes()
    """
    arguments = {
        "in_features": in_features,
        "out_features": out_features,
        "min_depth": min_depth,
        "max_depth": max_depth,
        "min_width": min_width,
        "max_width": max_width,
        "activations": activations,
        "batch_norm": batch_norm,
        "tied": tied,
        "dtype": dtype,
    }
    resolved = _resolve(lambda **kw: mlps(bias=bias, **kw), arguments)
    if resolved is not None:
        return resolved
    name = "mlps"
    n_in = None if in_features is None else _check_int(name, "in_features", in_features, 1)
    n_out = None if out_features is None else _check_int(name, "out_features", out_features, 1)
    low_depth = _check_int(name, "min_depth", min_depth, 1)
    high_depth = _check_int(name, "max_depth", max_depth, 1)
    _check_order(name, "min_depth", low_depth, "max_depth", high_depth)
    low_width = _check_int(name, "min_width", min_width, 1)
    high_width = _check_int(name, "max_width", max_width, 1)
    _check_order(name, "min_width", low_width, "max_width", high_width)
    chosen = _check_choices(name, "activations", activations, list(ACTIVATIONS))
    if bias is not None and not isinstance(bias, SearchStrategy):
        _check_bool(name, "bias", bias)
    use_bn = _check_bool(name, "batch_norm", batch_norm)
    use_tied = _check_bool(name, "tied", tied)
    if use_tied and high_depth < 3:
        raise _fail(
            name,
            "max_depth",
            high_depth,
            "must be at least 3 with tied=True (two tied square layers and an output layer)",
        )
    resolved_dtype = _check_dtype(name, "dtype", dtype)
    return _mlps(
        n_in,
        n_out,
        max(low_depth, 3) if use_tied else low_depth,
        high_depth,
        low_width,
        high_width,
        chosen,
        bias,
        use_bn,
        use_tied,
        resolved_dtype,
    )


@st.composite
def _mlps(
    draw: st.DrawFn,
    in_features: int | None,
    out_features: int | None,
    min_depth: int,
    max_depth: int,
    min_width: int,
    max_width: int,
    activations: tuple[str, ...],
    bias: bool | SearchStrategy[bool] | None,
    batch_norm: bool,
    tied: bool,
    dtype: torch.dtype,
) -> nn.Module:
    depth = draw(st.integers(min_value=min_depth, max_value=max_depth))
    n_out = out_features if out_features is not None else draw(st.integers(1, 3))
    if tied:
        # The tied layers are square: one width for the input and the first hidden layer.
        n_in = in_features if in_features is not None else draw(st.integers(min_width, max_width))
        widths = [n_in] * 3 + [draw(st.integers(min_width, max_width)) for _ in range(depth - 3)]
    else:
        n_in = in_features if in_features is not None else draw(st.integers(1, 4))
        widths = [n_in] + [draw(st.integers(min_width, max_width)) for _ in range(depth - 1)]
    widths.append(n_out)
    hidden = [draw(st.sampled_from(activations)) for _ in range(depth - 1)]
    biases = [_draw_bias(draw, bias) for _ in range(depth)]
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    layers: list[nn.Module] = []
    linears: list[nn.Linear] = []
    for k in range(depth):
        linear = _linear(generator, widths[k], widths[k + 1], biases[k], dtype)
        linears.append(linear)
        layers.append(linear)
        if k < depth - 1:
            if batch_norm:
                layers.append(_batch_norm(generator, widths[k + 1], dtype))
            layers.append(ACTIVATIONS[hidden[k]]())
    module: nn.Module
    if tied:
        linears[1].weight = linears[0].weight
        module = TiedMLP(layers)
    else:
        module = nn.Sequential(*layers)
    _set_input_shape(module, (n_in,))
    return module.eval()


def conv_nets(
    *,
    channels: int | SearchStrategy[int] | None = None,
    min_size: int | SearchStrategy[int] = 6,
    max_size: int | SearchStrategy[int] = 10,
    min_filters: int | SearchStrategy[int] = 1,
    max_filters: int | SearchStrategy[int] = 3,
    max_kernel_size: int | SearchStrategy[int] = 3,
    activations: Sequence[str] | SearchStrategy[Sequence[str]] = (
        "tanh",
        "sigmoid",
        "softplus",
        "gelu",
    ),
    pooling: Sequence[str | None] | SearchStrategy[Sequence[str | None]] = POOLING,
    out_features: int | SearchStrategy[int] | None = None,
    bias: bool | SearchStrategy[bool] | None = None,
    dtype: torch.dtype | SearchStrategy[torch.dtype] = torch.float64,
) -> SearchStrategy[nn.Module]:
    """Small CNNs in eval mode: Conv2d, activation, optional pooling, Flatten, Linear.

    An `nn.Sequential` ``Conv2d(C, F, k) -> act -> [MaxPool2d(2) | AvgPool2d(2)] ->
    Flatten -> Linear(..., out_features)`` with deterministic weights from a drawn seed
    (as `mlps`), ``module.input_shape == (C, H, W)`` with ``H, W`` drawn in
    ``[min_size, max_size]``; ``module(X)`` maps ``[B, C, H, W]`` to
    ``[B, out_features]``. Pooling is left out where the feature map is smaller than 2.

    Args:
        channels: Input channels ``C``; default drawn in ``[1, 2]``.
        min_size: Smallest height and width (at least 1).
        max_size: Largest height and width.
        min_filters: Fewest convolution output channels (at least 1).
        max_filters: Most convolution output channels.
        max_kernel_size: Largest (square) kernel; the kernel is drawn in
            ``[1, min(max_kernel_size, H, W)]``.
        activations: Names from `ACTIVATIONS` to draw the activation from.
        pooling: Choices among None, ``"max"``, ``"avg"``.
        out_features: Output size; default drawn in ``[1, 3]``.
        bias: Whether the layers have biases (a bool or a strategy of bools; default
            `st.booleans()` per layer).
        dtype: The parameters' dtype.

    Returns:
        A strategy of `nn.Sequential` with an ``input_shape`` attribute.

    Raises:
        InvalidArgument: On sizes below 1, a ``min_*`` above its ``max_*``, an unknown
            activation or pooling, or a non-floating `dtype`.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from torchcurv.testing.strategies import conv_nets
        >>> net = find(conv_nets(channels=2, out_features=3), lambda net: True)
        >>> net.input_shape
        (2, 6, 6)
        >>> net(torch.zeros(5, *net.input_shape, dtype=torch.float64)).shape
        torch.Size([5, 3])
    """
    arguments = {
        "channels": channels,
        "min_size": min_size,
        "max_size": max_size,
        "min_filters": min_filters,
        "max_filters": max_filters,
        "max_kernel_size": max_kernel_size,
        "activations": activations,
        "pooling": pooling,
        "out_features": out_features,
        "dtype": dtype,
    }
    resolved = _resolve(lambda **kw: conv_nets(bias=bias, **kw), arguments)
    if resolved is not None:
        return resolved
    name = "conv_nets"
    n_channels = None if channels is None else _check_int(name, "channels", channels, 1)
    n_out = None if out_features is None else _check_int(name, "out_features", out_features, 1)
    low_size = _check_int(name, "min_size", min_size, 1)
    high_size = _check_int(name, "max_size", max_size, 1)
    _check_order(name, "min_size", low_size, "max_size", high_size)
    low_filters = _check_int(name, "min_filters", min_filters, 1)
    high_filters = _check_int(name, "max_filters", max_filters, 1)
    _check_order(name, "min_filters", low_filters, "max_filters", high_filters)
    kernel = _check_int(name, "max_kernel_size", max_kernel_size, 1)
    chosen = _check_choices(name, "activations", activations, list(ACTIVATIONS))
    pools = _check_choices(name, "pooling", pooling, POOLING)
    if bias is not None and not isinstance(bias, SearchStrategy):
        _check_bool(name, "bias", bias)
    resolved_dtype = _check_dtype(name, "dtype", dtype)
    return _conv_nets(
        n_channels,
        low_size,
        high_size,
        low_filters,
        high_filters,
        kernel,
        chosen,
        pools,
        n_out,
        bias,
        resolved_dtype,
    )


@st.composite
def _conv_nets(
    draw: st.DrawFn,
    channels: int | None,
    min_size: int,
    max_size: int,
    min_filters: int,
    max_filters: int,
    max_kernel_size: int,
    activations: tuple[str, ...],
    pooling: tuple[str | None, ...],
    out_features: int | None,
    bias: bool | SearchStrategy[bool] | None,
    dtype: torch.dtype,
) -> nn.Module:
    c = channels if channels is not None else draw(st.integers(1, 2))
    height = draw(st.integers(min_size, max_size))
    width = draw(st.integers(min_size, max_size))
    filters = draw(st.integers(min_filters, max_filters))
    k = draw(st.integers(1, min(max_kernel_size, height, width)))
    activation = draw(st.sampled_from(activations))
    pool = draw(st.sampled_from(pooling))
    n_out = out_features if out_features is not None else draw(st.integers(1, 3))
    conv_bias, linear_bias = (
        _draw_bias(draw, bias, "conv_nets"),
        _draw_bias(draw, bias, "conv_nets"),
    )
    generator = torch.Generator().manual_seed(draw(_SEEDS))

    conv = nn.Conv2d(c, filters, k, bias=conv_bias, dtype=dtype)
    bound = 2.0 / math.sqrt(c * k * k)
    with torch.no_grad():
        conv.weight.copy_(_uniform(generator, tuple(conv.weight.shape), -bound, bound))
        if conv.bias is not None:
            conv.bias.copy_(_uniform(generator, (filters,), -0.5, 0.5))
    layers: list[nn.Module] = [conv, ACTIVATIONS[activation]()]
    h, w = height - k + 1, width - k + 1
    if pool is not None and min(h, w) >= 2:
        layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
        h, w = h // 2, w // 2
    layers += [nn.Flatten(), _linear(generator, filters * h * w, n_out, linear_bias, dtype)]
    module = nn.Sequential(*layers)
    _set_input_shape(module, (c, height, width))
    return module.eval()


# --------------------------------------------------------------------------------------
# today's architectures: normalisation, residual blocks, attention, recurrence, tokens
# --------------------------------------------------------------------------------------

#: Normalisation layers accepted by `normalized_nets`: LayerNorm, GroupNorm, BatchNorm1d
#: (eval mode, non-trivial running statistics) and RMSNorm.
NORMS: tuple[str, ...] = ("layer", "group", "batch", "rms")

#: The kinds of block that `residual_nets` draws: ``x + f(x)`` with ``f`` an MLP or a
#: "same"-padded convolution stack.
RESIDUAL_KINDS: tuple[str, ...] = ("mlp", "conv")

#: The kinds of block that `transformer_blocks` draws: `nn.TransformerEncoderLayer`
#: (attention by `torch.nn.functional.scaled_dot_product_attention`) or the hand-written
#: `AttentionBlock` (`nn.MultiheadAttention` with ``need_weights=True``: an explicit
#: softmax).
TRANSFORMER_KINDS: tuple[str, ...] = ("encoder_layer", "attention_block")

#: Feed-forward activations accepted by `transformer_blocks` (those of
#: `nn.TransformerEncoderLayer`).
TRANSFORMER_ACTIVATIONS: tuple[str, ...] = ("relu", "gelu")

#: Attention masks accepted by `transformer_blocks`: None, ``"causal"`` (a float mask,
#: ``-inf`` above the diagonal, passed with ``is_causal=True``) or ``"fixed"`` (a drawn
#: boolean mask, True where attention is blocked, never on the diagonal).
MASKS: tuple[str | None, ...] = (None, "causal", "fixed")

#: Recurrent layers accepted by `recurrent_nets`.
CELLS: dict[str, Callable[..., nn.RNNBase]] = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

#: How `embedding_nets` pools the embedded tokens: flatten them, or average them.
EMBEDDING_POOLING: tuple[str, ...] = ("flatten", "mean")


def _initialise(module: nn.Module, generator: torch.Generator) -> None:
    """Deterministic weights: matrices uniform in ``±2/sqrt(fan_in)``, biases in
    ``±0.5``, other vectors (norm scales) in ``[0.5, 1.5]``."""
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            shape = tuple(tensor.shape)
            if tensor.dim() >= 2:
                bound = 2.0 / math.sqrt(math.prod(shape[1:]))
                tensor.copy_(_uniform(generator, shape, -bound, bound))
            elif "bias" in name.rsplit(".", 1)[-1]:
                tensor.copy_(_uniform(generator, shape, -0.5, 0.5))
            else:
                tensor.copy_(_uniform(generator, shape, 0.5, 1.5))


def _finish(module: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    _set_input_shape(module, shape)
    return module.eval()


class MeanOverPositions(nn.Module):
    """The mean over dim 1: ``[B, T, F]`` to ``[B, F]`` (sequence pooling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x.mean(dim=1)
        return out


class ResidualBlock(nn.Module):
    """``x + body(x)``, where `body` keeps the shape of ``x``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x)
        return out

    def extra_repr(self) -> str:
        return "x + body(x)"


class AttentionBlock(nn.Module):
    """A hand-written transformer block on ``[B, T, d_model]``: self-attention and a
    feed-forward net, each with a residual connection and a LayerNorm, before
    (``norm_first=True``, pre-norm) or after (post-norm) the residual branch.

    Attention is `nn.MultiheadAttention` called with ``need_weights=True``, so it runs
    the explicit ``softmax(Q K^T / sqrt(d)) V`` of `multi_head_attention_forward`
    rather than `scaled_dot_product_attention` (what `nn.TransformerEncoderLayer` uses).
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        feedforward: int,
        activation: str,
        norm_first: bool,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attn = nn.MultiheadAttention(
            d_model, heads, dropout=0.0, batch_first=True, dtype=dtype
        )
        self.norm1 = nn.LayerNorm(d_model, dtype=dtype)
        self.ff = nn.Sequential(
            nn.Linear(d_model, feedforward, dtype=dtype),
            ACTIVATIONS[activation](),
            nn.Linear(feedforward, d_model, dtype=dtype),
        )
        self.norm2 = nn.LayerNorm(d_model, dtype=dtype)

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        out: torch.Tensor = self.attn(
            x, x, x, attn_mask=mask, need_weights=True, is_causal=is_causal
        )[0]
        return out

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if self.norm_first:
            x = x + self._attend(self.norm1(x), mask, is_causal)
            out: torch.Tensor = x + self.ff(self.norm2(x))
            return out
        x = self.norm1(x + self._attend(x, mask, is_causal))
        out = self.norm2(x + self.ff(x))
        return out

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}"


class MaskedBlock(nn.Module):
    """A transformer block called with a fixed attention mask (a buffer, or None).

    ``forward(x)`` is ``block(x, mask, is_causal)`` on ``[B, T, d_model]``, the mask
    ``[T, T]`` shared by the batch; `mask_kind` is one of `MASKS`.
    """

    mask: torch.Tensor | None

    def __init__(
        self,
        block: nn.TransformerEncoderLayer | AttentionBlock,
        mask: torch.Tensor | None,
        mask_kind: str | None,
    ) -> None:
        super().__init__()
        self.block = block
        self.register_buffer("mask", mask)
        self.mask_kind = mask_kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal = self.mask_kind == "causal"
        if isinstance(self.block, nn.TransformerEncoderLayer):
            out: torch.Tensor = self.block(x, src_mask=self.mask, is_causal=causal)
        else:
            out = self.block(x, self.mask, causal)
        return out

    def extra_repr(self) -> str:
        return f"mask={self.mask_kind!r}"


class RecurrentNet(nn.Module):
    """A batch-first recurrent layer read out at its last step: ``[B, T, F]`` to
    ``[B, out_features]`` as ``readout(rnn(x)[0][:, -1])``."""

    input_shape: tuple[int, ...]

    def __init__(self, rnn: nn.RNNBase, readout: nn.Linear) -> None:
        super().__init__()
        self.rnn = rnn
        self.readout = readout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x)
        out: torch.Tensor = self.readout(states[:, -1])
        return out


def _check_flag(
    function: str, argument: str, value: bool | SearchStrategy[bool] | None
) -> bool | SearchStrategy[bool] | None:
    if value is not None and not isinstance(value, SearchStrategy):
        _check_bool(function, argument, value)
    return value


def _draw_flag(
    draw: st.DrawFn, function: str, argument: str, value: bool | SearchStrategy[bool] | None
) -> bool:
    drawn = draw(st.booleans() if value is None else _as_strategy(value))
    return _check_bool(function, argument, drawn)


def _check_range(
    function: str, name: str, low: Any, high: Any, min_value: int = 1
) -> tuple[int, int]:
    low_value = _check_int(function, f"min_{name}", low, min_value)
    high_value = _check_int(function, f"max_{name}", high, min_value)
    _check_order(function, f"min_{name}", low_value, f"max_{name}", high_value)
    return low_value, high_value


def _optional_int(function: str, argument: str, value: Any, min_value: int = 1) -> int | None:
    return None if value is None else _check_int(function, argument, value, min_value)


def _norm(
    kind: str, width: int, groups: int, generator: torch.Generator, dtype: torch.dtype
) -> nn.Module:
    if kind == "batch":
        return _batch_norm(generator, width, dtype)
    layer: nn.Module
    if kind == "layer":
        layer = nn.LayerNorm(width, dtype=dtype)
    elif kind == "group":
        layer = nn.GroupNorm(groups, width, dtype=dtype)
    else:
        layer = nn.RMSNorm(width, eps=1e-5, dtype=dtype)
    _initialise(layer, generator)
    return layer


def normalized_nets(
    *,
    norms: Sequence[str] | SearchStrategy[Sequence[str]] = NORMS,
    in_features: int | SearchStrategy[int] | None = None,
    out_features: int | SearchStrategy[int] | None = None,
    min_depth: int | SearchStrategy[int] = 2,
    max_depth: int | SearchStrategy[int] = 3,
    min_width: int | SearchStrategy[int] = 2,
    max_width: int | SearchStrategy[int] = 6,
    activations: Sequence[str] | SearchStrategy[Sequence[str]] = ("tanh", "gelu", "softplus"),
    bias: bool | SearchStrategy[bool] | None = None,
    dtype: torch.dtype | SearchStrategy[torch.dtype] = torch.float64,
) -> SearchStrategy[nn.Module]:
    """MLPs with a normalisation layer after every hidden Linear, in eval mode.

    An `nn.Sequential` ``Linear -> norm -> act -> ... -> Linear(..., out_features)``
    with ``depth`` Linear layers (drawn in ``[min_depth, max_depth]``), each hidden
    norm drawn from `norms`: `nn.LayerNorm`, `nn.GroupNorm` (the number of groups drawn
    among the divisors of the width that leave at least two features a group, as torch
    requires; on ``[B, C]`` each group is normalised per sample; a hidden width of 1
    takes another norm), `nn.BatchNorm1d` (running statistics, eval mode) or `nn.RMSNorm`
    (``eps=1e-5``), all with drawn affine parameters. Weights are deterministic from a
    drawn seed, as in `mlps`. ``module.input_shape == (in_features,)``; ``module(X)``
    maps ``[B, in_features]`` to ``[B, out_features]``.

    Args:
        norms: Names from `NORMS` to draw each norm from.
        in_features: Input size; default drawn in ``[1, 4]``.
        out_features: Output size; default drawn in ``[1, 3]``.
        min_depth: Fewest Linear layers (at least 2: one norm at least).
        max_depth: Most Linear layers.
        min_width: Smallest hidden width (at least 1; the default 2 keeps LayerNorm from
            normalising a single feature to its bias).
        max_width: Largest hidden width.
        activations: Names from `ACTIVATIONS` for the hidden activations.
        bias: Whether Linear layers have a bias (a bool or a strategy drawn per layer;
            default `st.booleans()`).
        dtype: The parameters' dtype.

    Returns:
        A strategy of `nn.Sequential` with an ``input_shape`` attribute.

    Raises:
        InvalidArgument: On ``min_depth < 2``, sizes below 1, a ``min_*`` above its
            ``max_*``, unknown norms or activations, a non-bool `bias` or a
            non-floating `dtype`.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from torchcurv.testing.strategies import normalized_nets
        >>> net = find(normalized_nets(norms=["layer"], in_features=3, out_features=1),
        ...            lambda net: True)
        >>> net
        Sequential(
          (0): Linear(in_features=3, out_features=2, bias=False)
          (1): LayerNorm((2,), eps=1e-05, elementwise_affine=True, bias=True)
          (2): Tanh()
          (3): Linear(in_features=2, out_features=1, bias=False)
        )
        >>> net(torch.zeros(4, *net.input_shape, dtype=torch.float64)).shape
        torch.Size([4, 1])
    """
    arguments = {
        "norms": norms,
        "in_features": in_features,
        "out_features": out_features,
        "min_depth": min_depth,
        "max_depth": max_depth,
        "min_width": min_width,
        "max_width": max_width,
        "activations": activations,
        "dtype": dtype,
    }
    resolved = _resolve(lambda **kw: normalized_nets(bias=bias, **kw), arguments)
    if resolved is not None:
        return resolved
    name = "normalized_nets"
    chosen_norms = _check_choices(name, "norms", norms, NORMS)
    n_in = _optional_int(name, "in_features", in_features)
    n_out = _optional_int(name, "out_features", out_features)
    depths = _check_range(name, "depth", min_depth, max_depth, min_value=2)
    widths = _check_range(name, "width", min_width, max_width)
    if chosen_norms == ("group",) and widths[0] < 2:
        raise _fail(
            name,
            "min_width",
            widths[0],
            "must be at least 2 with norms=('group',): GroupNorm needs two features a group",
        )
    chosen = _check_choices(name, "activations", activations, list(ACTIVATIONS))
    _check_flag(name, "bias", bias)
    resolved_dtype = _check_dtype(name, "dtype", dtype)
    return _normalized_nets(
        chosen_norms, n_in, n_out, depths, widths, chosen, bias, resolved_dtype
    )


@st.composite
def _normalized_nets(
    draw: st.DrawFn,
    norms: tuple[str, ...],
    in_features: int | None,
    out_features: int | None,
    depths: tuple[int, int],
    widths: tuple[int, int],
    activations: tuple[str, ...],
    bias: bool | SearchStrategy[bool] | None,
    dtype: torch.dtype,
) -> nn.Module:
    depth = draw(st.integers(*depths))
    n_in = in_features if in_features is not None else draw(st.integers(1, 4))
    n_out = out_features if out_features is not None else draw(st.integers(1, 3))
    sizes = [n_in] + [draw(st.integers(*widths)) for _ in range(depth - 1)] + [n_out]
    # torch's group_norm needs at least two features per group: a width of 1 takes
    # another norm (the check in normalized_nets keeps one available).
    kinds = [
        draw(st.sampled_from([n for n in norms if n != "group" or w >= 2])) for w in sizes[1:-1]
    ]
    groups = [
        draw(st.sampled_from([g for g in range(1, w // 2 + 1) if w % g == 0]))
        if kind == "group"
        else 1
        for kind, w in zip(kinds, sizes[1:-1], strict=True)
    ]
    hidden = [draw(st.sampled_from(activations)) for _ in range(depth - 1)]
    biases = [_draw_flag(draw, "normalized_nets", "bias", bias) for _ in range(depth)]
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    layers: list[nn.Module] = []
    for k in range(depth):
        layers.append(_linear(generator, sizes[k], sizes[k + 1], biases[k], dtype))
        if k < depth - 1:
            layers.append(_norm(kinds[k], sizes[k + 1], groups[k], generator, dtype))
            layers.append(ACTIVATIONS[hidden[k]]())
    return _finish(nn.Sequential(*layers), (n_in,))


def residual_nets(
    *,
    kinds: Sequence[str] | SearchStrategy[Sequence[str]] = RESIDUAL_KINDS,
    min_blocks: int | SearchStrategy[int] = 1,
    max_blocks: int | SearchStrategy[int] = 2,
    min_width: int | SearchStrategy[int] = 1,
    max_width: int | SearchStrategy[int] = 4,
    min_size: int | SearchStrategy[int] = 2,
    max_size: int | SearchStrategy[int] = 4,
    activations: Sequence[str] | SearchStrategy[Sequence[str]] = ("tanh", "gelu", "softplus"),
    out_features: int | SearchStrategy[int] | None = None,
    dtype: torch.dtype | SearchStrategy[torch.dtype] = torch.float64,
) -> SearchStrategy[nn.Module]:
    """Residual networks: `ResidualBlock` s ``x + f(x)`` and a Linear readout, in eval
    mode with deterministic weights from a drawn seed.

    * ``"mlp"``: ``f = Linear(W, H) -> act -> Linear(H, W)`` on ``[B, W]``;
      ``module.input_shape == (W,)``.
    * ``"conv"``: ``f = Conv2d(C, C, k, padding="same") -> act -> Conv2d(C, C, k,
      padding="same")`` with ``k`` in ``{1, 3}``, on ``[B, C, S, S]``, then Flatten;
      ``module.input_shape == (C, S, S)``.

    The residual width ``W`` (or channels ``C``) and each hidden width ``H`` are drawn
    in ``[min_width, max_width]``, the image side ``S`` in ``[min_size, max_size]``;
    ``module(X)`` is ``[B, out_features]``.

    Args:
        kinds: Entries of `RESIDUAL_KINDS` to draw the kind from.
        min_blocks: Fewest residual blocks (at least 1).
        max_blocks: Most residual blocks.
        min_width: Smallest width or channel count (at least 1).
        max_width: Largest width or channel count (keep it small for ``"conv"``: the
            input has ``C * S * S`` entries).
        min_size: Smallest image side (``"conv"``; at least 1).
        max_size: Largest image side.
        activations: Names from `ACTIVATIONS` for the activation inside each block.
        out_features: Output size; default drawn in ``[1, 3]``.
        dtype: The parameters' dtype.

    Returns:
        A strategy of `nn.Sequential` with an ``input_shape`` attribute.

    Raises:
        InvalidArgument: On sizes below 1, a ``min_*`` above its ``max_*``, an unknown
            kind or activation, or a non-floating `dtype`.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from torchcurv.testing.strategies import residual_nets
        >>> net = find(residual_nets(kinds=["conv"], out_features=2), lambda net: True)
        >>> net.input_shape
        (1, 2, 2)
        >>> net[0]
        ResidualBlock(
          x + body(x)
          (body): Sequential(
            (0): Conv2d(1, 1, kernel_size=(1, 1), stride=(1, 1), padding=same)
            (1): Tanh()
            (2): Conv2d(1, 1, kernel_size=(1, 1), stride=(1, 1), padding=same)
          )
        )
        >>> net(torch.zeros(3, *net.input_shape, dtype=torch.float64)).shape
        torch.Size([3, 2])
    """
    arguments = {
        "kinds": kinds,
        "min_blocks": min_blocks,
        "max_blocks": max_blocks,
        "min_width": min_width,
        "max_width": max_width,
        "min_size": min_size,
        "max_size": max_size,
        "activations": activations,
        "out_features": out_features,
        "dtype": dtype,
    }
    resolved = _resolve(lambda **kw: residual_nets(**kw), arguments)
    if resolved is not None:
        return resolved
    name = "residual_nets"
    chosen_kinds = _check_choices(name, "kinds", kinds, RESIDUAL_KINDS)
    blocks = _check_range(name, "blocks", min_blocks, max_blocks)
    widths = _check_range(name, "width", min_width, max_width)
    sizes = _check_range(name, "size", min_size, max_size)
    chosen = _check_choices(name, "activations", activations, list(ACTIVATIONS))
    n_out = _optional_int(name, "out_features", out_features)
    resolved_dtype = _check_dtype(name, "dtype", dtype)
    return _residual_nets(chosen_kinds, blocks, widths, sizes, chosen, n_out, resolved_dtype)


@st.composite
def _residual_nets(
    draw: st.DrawFn,
    kinds: tuple[str, ...],
    blocks: tuple[int, int],
    widths: tuple[int, int],
    sizes: tuple[int, int],
    activations: tuple[str, ...],
    out_features: int | None,
    dtype: torch.dtype,
) -> nn.Module:
    kind = draw(st.sampled_from(kinds))
    count = draw(st.integers(*blocks))
    width = draw(st.integers(*widths))
    side = draw(st.integers(*sizes)) if kind == "conv" else 0
    n_out = out_features if out_features is not None else draw(st.integers(1, 3))
    layers: list[nn.Module] = []
    for _ in range(count):
        hidden = draw(st.integers(*widths))
        act = ACTIVATIONS[draw(st.sampled_from(activations))]()
        if kind == "mlp":
            body = [
                nn.Linear(width, hidden, dtype=dtype),
                act,
                nn.Linear(hidden, width, dtype=dtype),
            ]
        else:
            k = draw(st.sampled_from([1, 3]))
            body = [
                nn.Conv2d(width, hidden, k, padding="same", dtype=dtype),
                act,
                nn.Conv2d(hidden, width, k, padding="same", dtype=dtype),
            ]
        layers.append(ResidualBlock(nn.Sequential(*body)))
    if kind == "conv":
        layers.append(nn.Flatten())
    features = width * side * side if kind == "conv" else width
    layers.append(nn.Linear(features, n_out, dtype=dtype))
    module = nn.Sequential(*layers)
    _initialise(module, torch.Generator().manual_seed(draw(_SEEDS)))
    return _finish(module, (width, side, side) if kind == "conv" else (width,))


def transformer_blocks(
    *,
    kinds: Sequence[str] | SearchStrategy[Sequence[str]] = TRANSFORMER_KINDS,
    min_length: int | SearchStrategy[int] = 1,
    max_length: int | SearchStrategy[int] = 3,
    min_heads: int | SearchStrategy[int] = 1,
    max_heads: int | SearchStrategy[int] = 2,
    min_head_dim: int | SearchStrategy[int] = 2,
    max_head_dim: int | SearchStrategy[int] = 3,
    min_feedforward: int | SearchStrategy[int] = 1,
    max_feedforward: int | SearchStrategy[int] = 4,
    norm_first: bool | SearchStrategy[bool] | None = None,
    activations: Sequence[str] | SearchStrategy[Sequence[str]] = TRANSFORMER_ACTIVATIONS,
    masks: Sequence[str | None] | SearchStrategy[Sequence[str | None]] = MASKS,
    out_features: int | SearchStrategy[int] | None = None,
    dtype: torch.dtype | SearchStrategy[torch.dtype] = torch.float64,
) -> SearchStrategy[nn.Module]:
    """One transformer encoder block on a short sequence, mean-pooled and read out.

    An `nn.Sequential` ``MaskedBlock -> MeanOverPositions -> Linear(d_model,
    out_features)``: the block (a kind from `TRANSFORMER_KINDS`: an
    `nn.TransformerEncoderLayer` with ``batch_first=True``, or the hand-written
    `AttentionBlock`) has ``heads`` heads of ``head_dim`` features
    (``d_model = heads * head_dim``), a feed-forward width drawn in
    ``[min_feedforward, max_feedforward]``, dropout 0, pre- or post-norm, and is called
    with a fixed mask from `masks` (see `MASKS`). Weights are deterministic from a
    drawn seed. ``module.input_shape == (T, d_model)``; ``module(X)`` maps
    ``[B, T, d_model]`` to ``[B, out_features]``.

    Args:
        kinds: Entries of `TRANSFORMER_KINDS`.
        min_length: Shortest sequence ``T`` (at least 1).
        max_length: Longest sequence.
        min_heads: Fewest attention heads (at least 1).
        max_heads: Most attention heads.
        min_head_dim: Smallest per-head width (at least 1; the default 2 keeps
            ``d_model >= 2``, where LayerNorm does not collapse features to its bias).
        max_head_dim: Largest per-head width.
        min_feedforward: Smallest feed-forward width (at least 1).
        max_feedforward: Largest feed-forward width.
        norm_first: Pre-norm (True) or post-norm (False); default drawn.
        activations: Feed-forward activations among `TRANSFORMER_ACTIVATIONS`.
        masks: Masks among `MASKS`.
        out_features: Output size; default drawn in ``[1, 3]``.
        dtype: The parameters' dtype.

    Returns:
        A strategy of `nn.Sequential` with an ``input_shape`` attribute.

    Raises:
        InvalidArgument: On sizes below 1, a ``min_*`` above its ``max_*``, an unknown
            kind, activation or mask, a non-bool `norm_first` or a non-floating `dtype`.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from torchcurv.testing.strategies import transformer_blocks
        >>> net = find(transformer_blocks(masks=["causal"], out_features=1),
        ...            lambda net: net.input_shape[0] == 3)
        >>> net.input_shape, net[0].mask_kind
        ((3, 2), 'causal')
        >>> net[0].mask
        tensor([[0., -inf, -inf],
                [0., 0., -inf],
                [0., 0., 0.]], dtype=torch.float64)
        >>> net(torch.zeros(2, *net.input_shape, dtype=torch.float64)).shape
        torch.Size([2, 1])
    """
    arguments = {
        "kinds": kinds,
        "min_length": min_length,
        "max_length": max_length,
        "min_heads": min_heads,
        "max_heads": max_heads,
        "min_head_dim": min_head_dim,
        "max_head_dim": max_head_dim,
        "min_feedforward": min_feedforward,
        "max_feedforward": max_feedforward,
        "activations": activations,
        "masks": masks,
        "out_features": out_features,
        "dtype": dtype,
    }
    resolved = _resolve(lambda **kw: transformer_blocks(norm_first=norm_first, **kw), arguments)
    if resolved is not None:
        return resolved
    name = "transformer_blocks"
    chosen_kinds = _check_choices(name, "kinds", kinds, TRANSFORMER_KINDS)
    lengths = _check_range(name, "length", min_length, max_length)
    heads = _check_range(name, "heads", min_heads, max_heads)
    head_dims = _check_range(name, "head_dim", min_head_dim, max_head_dim)
    feedforward = _check_range(name, "feedforward", min_feedforward, max_feedforward)
    _check_flag(name, "norm_first", norm_first)
    chosen = _check_choices(name, "activations", activations, TRANSFORMER_ACTIVATIONS)
    chosen_masks = _check_choices(name, "masks", masks, MASKS)
    n_out = _optional_int(name, "out_features", out_features)
    resolved_dtype = _check_dtype(name, "dtype", dtype)
    return _transformer_blocks(
        chosen_kinds,
        lengths,
        heads,
        head_dims,
        feedforward,
        norm_first,
        chosen,
        chosen_masks,
        n_out,
        resolved_dtype,
    )


@st.composite
def _transformer_blocks(
    draw: st.DrawFn,
    kinds: tuple[str, ...],
    lengths: tuple[int, int],
    heads: tuple[int, int],
    head_dims: tuple[int, int],
    feedforward: tuple[int, int],
    norm_first: bool | SearchStrategy[bool] | None,
    activations: tuple[str, ...],
    masks: tuple[str | None, ...],
    out_features: int | None,
    dtype: torch.dtype,
) -> nn.Module:
    kind = draw(st.sampled_from(kinds))
    length = draw(st.integers(*lengths))
    n_heads = draw(st.integers(*heads))
    d_model = n_heads * draw(st.integers(*head_dims))
    ff = draw(st.integers(*feedforward))
    pre_norm = _draw_flag(draw, "transformer_blocks", "norm_first", norm_first)
    activation = draw(st.sampled_from(activations))
    mask_kind = draw(st.sampled_from(masks))
    n_out = out_features if out_features is not None else draw(st.integers(1, 3))
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    block: nn.TransformerEncoderLayer | AttentionBlock
    if kind == "encoder_layer":
        block = nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            dim_feedforward=ff,
            dropout=0.0,
            activation=activation,
            batch_first=True,
            norm_first=pre_norm,
            dtype=dtype,
        )
    else:
        block = AttentionBlock(d_model, n_heads, ff, activation, pre_norm, dtype)
    mask: torch.Tensor | None = None
    if mask_kind == "causal":
        mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=dtype)
    elif mask_kind == "fixed":
        blocked = torch.rand((length, length), generator=generator) < 0.5
        mask = blocked & ~torch.eye(length, dtype=torch.bool)
    module = nn.Sequential(
        MaskedBlock(block, mask, mask_kind),
        MeanOverPositions(),
        nn.Linear(d_model, n_out, dtype=dtype),
    )
    _initialise(module, generator)
    return _finish(module, (length, d_model))


def recurrent_nets(
    *,
    cells: Sequence[str] | SearchStrategy[Sequence[str]] = tuple(CELLS),
    in_features: int | SearchStrategy[int] | None = None,
    out_features: int | SearchStrategy[int] | None = None,
    min_length: int | SearchStrategy[int] = 1,
    max_length: int | SearchStrategy[int] = 4,
    min_layers: int | SearchStrategy[int] = 1,
    max_layers: int | SearchStrategy[int] = 2,
    min_hidden: int | SearchStrategy[int] = 1,
    max_hidden: int | SearchStrategy[int] = 3,
    bias: bool | SearchStrategy[bool] | None = None,
    dtype: torch.dtype | SearchStrategy[torch.dtype] = torch.float64,
) -> SearchStrategy[nn.Module]:
    """Recurrent nets: `nn.RNN` (tanh), `nn.GRU` or `nn.LSTM`, read out at the last step.

    A `RecurrentNet`: the recurrent layer (``batch_first=True``, 1 to 2 stacked layers
    by default, hidden size in ``[min_hidden, max_hidden]``, dropout 0) followed by
    ``Linear(hidden, out_features)`` on the last step's output. Weights are
    deterministic from a drawn seed (matrices uniform in ``±2/sqrt(fan_in)``).
    ``module.input_shape == (T, in_features)``; ``module(X)`` maps
    ``[B, T, in_features]`` to ``[B, out_features]``.

    Args:
        cells: Keys of `CELLS` (``"rnn"``, ``"gru"``, ``"lstm"``).
        in_features: Features per step; default drawn in ``[1, 3]``.
        out_features: Output size; default drawn in ``[1, 3]``.
        min_length: Shortest sequence ``T`` (at least 1).
        max_length: Longest sequence.
        min_layers: Fewest stacked layers (at least 1).
        max_layers: Most stacked layers.
        min_hidden: Smallest hidden size (at least 1).
        max_hidden: Largest hidden size.
        bias: Whether the recurrent layer and readout have biases (one draw each;
            default `st.booleans()`).
        dtype: The parameters' dtype.

    Returns:
        A strategy of `RecurrentNet` with an ``input_shape`` attribute.

    Raises:
        InvalidArgument: On sizes below 1, a ``min_*`` above its ``max_*``, an unknown
            cell, a non-bool `bias` or a non-floating `dtype`.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from torchcurv.testing.strategies import recurrent_nets
        >>> net = find(recurrent_nets(cells=["gru"], in_features=2, out_features=1),
        ...            lambda net: net.rnn.num_layers == 2)
        >>> net
        RecurrentNet(
          (rnn): GRU(2, 1, num_layers=2, bias=False, batch_first=True)
          (readout): Linear(in_features=1, out_features=1, bias=False)
        )
        >>> net(torch.zeros(5, *net.input_shape, dtype=torch.float64)).shape
        torch.Size([5, 1])
    """
    arguments = {
        "cells": cells,
        "in_features": in_features,
        "out_features": out_features,
        "min_length": min_length,
        "max_length": max_length,
        "min_layers": min_layers,
        "max_layers": max_layers,
        "min_hidden": min_hidden,
        "max_hidden": max_hidden,
        "dtype": dtype,
    }
    resolved = _resolve(lambda **kw: recurrent_nets(bias=bias, **kw), arguments)
    if resolved is not None:
        return resolved
    name = "recurrent_nets"
    chosen = _check_choices(name, "cells", cells, tuple(CELLS))
    n_in = _optional_int(name, "in_features", in_features)
    n_out = _optional_int(name, "out_features", out_features)
    lengths = _check_range(name, "length", min_length, max_length)
    layers = _check_range(name, "layers", min_layers, max_layers)
    hidden = _check_range(name, "hidden", min_hidden, max_hidden)
    _check_flag(name, "bias", bias)
    resolved_dtype = _check_dtype(name, "dtype", dtype)
    return _recurrent_nets(chosen, n_in, n_out, lengths, layers, hidden, bias, resolved_dtype)


@st.composite
def _recurrent_nets(
    draw: st.DrawFn,
    cells: tuple[str, ...],
    in_features: int | None,
    out_features: int | None,
    lengths: tuple[int, int],
    layers: tuple[int, int],
    hidden: tuple[int, int],
    bias: bool | SearchStrategy[bool] | None,
    dtype: torch.dtype,
) -> nn.Module:
    cell = draw(st.sampled_from(cells))
    n_in = in_features if in_features is not None else draw(st.integers(1, 3))
    n_out = out_features if out_features is not None else draw(st.integers(1, 3))
    length = draw(st.integers(*lengths))
    n_layers = draw(st.integers(*layers))
    size = draw(st.integers(*hidden))
    rnn_bias = _draw_flag(draw, "recurrent_nets", "bias", bias)
    readout_bias = _draw_flag(draw, "recurrent_nets", "bias", bias)
    rnn = CELLS[cell](
        n_in, size, num_layers=n_layers, bias=rnn_bias, batch_first=True, dtype=dtype
    )
    module = RecurrentNet(rnn, nn.Linear(size, n_out, bias=readout_bias, dtype=dtype))
    _initialise(module, torch.Generator().manual_seed(draw(_SEEDS)))
    return _finish(module, (length, n_in))


def embedding_nets(
    *,
    vocab_size: int | SearchStrategy[int] | None = None,
    min_length: int | SearchStrategy[int] = 1,
    max_length: int | SearchStrategy[int] = 4,
    min_embedding_dim: int | SearchStrategy[int] = 1,
    max_embedding_dim: int | SearchStrategy[int] = 3,
    pooling: Sequence[str] | SearchStrategy[Sequence[str]] = EMBEDDING_POOLING,
    activations: Sequence[str] | SearchStrategy[Sequence[str]] = ("tanh", "gelu", "softplus"),
    padding: bool | SearchStrategy[bool] | None = None,
    out_features: int | SearchStrategy[int] | None = None,
    dtype: torch.dtype | SearchStrategy[torch.dtype] = torch.float64,
) -> SearchStrategy[nn.Module]:
    """Token models: `nn.Embedding`, pooling, an activation and a Linear readout.

    An `nn.Sequential` ``Embedding(V, E) -> [Flatten | MeanOverPositions] -> act ->
    Linear(..., out_features)`` in eval mode, with deterministic weights from a drawn
    seed (with `padding`, ``padding_idx=0`` and row 0 of the table is zero, as torch
    makes it). The inputs are integer token ids, so only parameter Hessians exist
    (``wrt="params"``); the Hessian of the embedding table is non-zero through the
    activation. ``module.input_shape == (T,)`` and ``module.vocab_size == V``: for such
    a module `inputs_for` draws int64 ids in ``[0, V)``. ``module(X)`` maps ``[B, T]``
    to ``[B, out_features]``. (For input Hessians through an embedding, differentiate
    the embedded ``[B, T, E]`` floats with `transformer_blocks` or `recurrent_nets`.)

    Args:
        vocab_size: ``V``, the number of tokens; default drawn in ``[2, 6]``.
        min_length: Fewest tokens ``T`` per sample (at least 1).
        max_length: Most tokens per sample.
        min_embedding_dim: Smallest embedding width ``E`` (at least 1).
        max_embedding_dim: Largest embedding width.
        pooling: Entries of `EMBEDDING_POOLING`.
        activations: Names from `ACTIVATIONS` for the activation after pooling.
        padding: Whether token 0 is a padding index; default drawn.
        out_features: Output size; default drawn in ``[1, 3]``.
        dtype: The parameters' dtype.

    Returns:
        A strategy of `nn.Sequential` with ``input_shape`` and ``vocab_size``.

    Raises:
        InvalidArgument: On sizes below 1, a ``min_*`` above its ``max_*``, an unknown
            pooling or activation, a non-bool `padding` or a non-floating `dtype`.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from torchcurv.testing.strategies import embedding_nets, inputs_for
        >>> net = find(embedding_nets(vocab_size=5, pooling=["mean"], padding=True),
        ...            lambda net: True)
        >>> net[0]
        Embedding(5, 1, padding_idx=0)
        >>> ids = find(inputs_for(net, batch_size=2), lambda ids: bool(ids.sum() > 0))
        >>> ids.dtype, ids.shape, net(ids).shape
        (torch.int64, torch.Size([2, 1]), torch.Size([2, 1]))
    """
    arguments = {
        "vocab_size": vocab_size,
        "min_length": min_length,
        "max_length": max_length,
        "min_embedding_dim": min_embedding_dim,
        "max_embedding_dim": max_embedding_dim,
        "pooling": pooling,
        "activations": activations,
        "out_features": out_features,
        "dtype": dtype,
    }
    resolved = _resolve(lambda **kw: embedding_nets(padding=padding, **kw), arguments)
    if resolved is not None:
        return resolved
    name = "embedding_nets"
    n_vocab = _optional_int(name, "vocab_size", vocab_size)
    lengths = _check_range(name, "length", min_length, max_length)
    dims = _check_range(name, "embedding_dim", min_embedding_dim, max_embedding_dim)
    pools = _check_choices(name, "pooling", pooling, EMBEDDING_POOLING)
    chosen = _check_choices(name, "activations", activations, list(ACTIVATIONS))
    _check_flag(name, "padding", padding)
    n_out = _optional_int(name, "out_features", out_features)
    resolved_dtype = _check_dtype(name, "dtype", dtype)
    return _embedding_nets(n_vocab, lengths, dims, pools, chosen, padding, n_out, resolved_dtype)


@st.composite
def _embedding_nets(
    draw: st.DrawFn,
    vocab_size: int | None,
    lengths: tuple[int, int],
    dims: tuple[int, int],
    pooling: tuple[str, ...],
    activations: tuple[str, ...],
    padding: bool | SearchStrategy[bool] | None,
    out_features: int | None,
    dtype: torch.dtype,
) -> nn.Module:
    vocab = vocab_size if vocab_size is not None else draw(st.integers(2, 6))
    length = draw(st.integers(*lengths))
    width = draw(st.integers(*dims))
    pool = draw(st.sampled_from(pooling))
    activation = draw(st.sampled_from(activations))
    padded = _draw_flag(draw, "embedding_nets", "padding", padding)
    n_out = out_features if out_features is not None else draw(st.integers(1, 3))
    embedding = nn.Embedding(vocab, width, padding_idx=0 if padded else None, dtype=dtype)
    features = width * length if pool == "flatten" else width
    module = nn.Sequential(
        embedding,
        nn.Flatten() if pool == "flatten" else MeanOverPositions(),
        ACTIVATIONS[activation](),
        nn.Linear(features, n_out, dtype=dtype),
    )
    _initialise(module, torch.Generator().manual_seed(draw(_SEEDS)))
    if padded:
        with torch.no_grad():
            embedding.weight[0].zero_()
    module.__dict__["vocab_size"] = vocab
    return _finish(module, (length,))


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


def _module_dtype(module: nn.Module) -> torch.dtype:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float64


def inputs_for(
    module_or_shape: nn.Module | Sequence[int] | SearchStrategy[Any],
    *,
    min_batch: int | SearchStrategy[int] = 1,
    max_batch: int | SearchStrategy[int] = 4,
    batch_size: int | SearchStrategy[int] | None = None,
    dtype: torch.dtype | SearchStrategy[torch.dtype] | None = None,
    elements: SearchStrategy[float] | None = None,
) -> SearchStrategy[torch.Tensor]:
    """Batches ``[B, *input_shape]`` for a module from the network strategies, or a shape.

    Entries lie in ``[-2, 2]``. Tensors of at most `ELEMENTWISE_LIMIT` entries are drawn
    entry by entry (and shrink entry by entry towards 0); larger ones are a drawn scale
    in ``[0, 2]`` times a uniform ``[-1, 1]`` pattern from a drawn seed (they shrink
    towards zeros), which keeps hypothesis' example size small. Sequence models
    (`transformer_blocks`, `recurrent_nets`) get ``[B, T, F]``. A module with a
    ``vocab_size`` attribute (`embedding_nets`) gets integer token ids in
    ``[0, vocab_size)``, drawn id by id and shrinking towards 0.

    Args:
        module_or_shape: A module with an ``input_shape`` attribute (what the network
            strategies build) or the per-sample shape itself, e.g. ``(3,)``.
        min_batch: The smallest batch size ``B`` (at least 1).
        max_batch: The largest batch size.
        batch_size: A fixed batch size (overrides `min_batch` / `max_batch`).
        dtype: The dtype; default the module's parameter dtype, float64 for a shape,
            int64 for token ids (which take an integer dtype only).
        elements: A strategy of floats for the entries, always drawn entry by entry
            (keep such tensors small: hypothesis refuses very large examples); not for
            token ids.

    Returns:
        A strategy of tensors of shape ``(B, *input_shape)``.

    Raises:
        InvalidArgument: If the module has no ``input_shape``, the shape has negative
            sizes, batch sizes are below 1 or out of order, `dtype` is not floating
            (not an integer dtype for token ids), or `elements` is given for token ids.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from torchcurv.testing.strategies import inputs_for
        >>> X = find(inputs_for((3,), batch_size=2), lambda X: bool(X.abs().sum() > 0))
        >>> X.shape, X.dtype
        (torch.Size([2, 3]), torch.float64)
    """
    arguments = {
        "module_or_shape": module_or_shape,
        "min_batch": min_batch,
        "max_batch": max_batch,
        "batch_size": batch_size,
        "dtype": dtype,
    }
    resolved = _resolve(lambda **kw: inputs_for(elements=elements, **kw), arguments)
    if resolved is not None:
        return resolved
    name = "inputs_for"
    if isinstance(module_or_shape, nn.Module):
        shape = getattr(module_or_shape, "input_shape", None)
        if shape is None:
            raise _fail(
                name,
                "module_or_shape",
                type(module_or_shape).__name__,
                "has no input_shape attribute; build it with mlps() or conv_nets(), "
                "set module.input_shape = (...), or pass the per-sample shape",
            )
        default_dtype = _module_dtype(module_or_shape)
    else:
        shape = module_or_shape
        default_dtype = torch.float64
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, Sequence)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise _fail(
            name,
            "module_or_shape",
            shape,
            "must be a module with input_shape or a tuple of non-negative ints",
        )
    if batch_size is not None:
        low = high = _check_int(name, "batch_size", batch_size, 1)
    else:
        low = _check_int(name, "min_batch", min_batch, 1)
        high = _check_int(name, "max_batch", max_batch, 1)
        _check_order(name, "min_batch", low, "max_batch", high)
    vocab = getattr(module_or_shape, "vocab_size", None)
    if vocab is not None:
        vocab = _check_int(name, "module_or_shape.vocab_size", vocab, 1)
        token_dtype = torch.int64 if dtype is None else dtype
        if not isinstance(token_dtype, torch.dtype) or token_dtype.is_floating_point:
            raise _fail(
                name,
                "dtype",
                dtype,
                "must be an integer torch.dtype such as torch.int64 for a module of "
                "token ids (it has a vocab_size)",
            )
        if elements is not None:
            raise _fail(name, "elements", elements, "cannot be used for token ids")
        return _tokens(tuple(shape), low, high, vocab, token_dtype)
    resolved_dtype = _check_dtype(name, "dtype", default_dtype if dtype is None else dtype)
    if elements is not None and not isinstance(elements, SearchStrategy):
        raise _fail(name, "elements", elements, "must be a strategy of floats or None")
    return _inputs(tuple(shape), low, high, resolved_dtype, elements)


@st.composite
def _tokens(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    min_batch: int,
    max_batch: int,
    vocab_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    batch = draw(st.integers(min_value=min_batch, max_value=max_batch))
    full = (batch, *shape)
    count = math.prod(full)
    ids = draw(st.lists(st.integers(0, vocab_size - 1), min_size=count, max_size=count))
    return torch.tensor(ids, dtype=dtype).reshape(full)


@st.composite
def _inputs(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    min_batch: int,
    max_batch: int,
    dtype: torch.dtype,
    elements: SearchStrategy[float] | None,
) -> torch.Tensor:
    batch = draw(st.integers(min_value=min_batch, max_value=max_batch))
    full = (batch, *shape)
    count = math.prod(full)
    if elements is not None or count <= ELEMENTWISE_LIMIT:
        values = draw(
            st.lists(
                elements if elements is not None else _floats(-2.0, 2.0),
                min_size=count,
                max_size=count,
            )
        )
        return torch.tensor(values, dtype=torch.float64).reshape(full).to(dtype)
    scale = draw(_floats(0.0, 2.0))
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    return (scale * _uniform(generator, full, -1.0, 1.0)).to(dtype)
