r"""Exact structured per-sample input Hessians for ``Linear``/activation stacks.

For a network built from affine layers and elementwise activations the per-sample input
Hessian of a scalar ``y`` has the closed form ("Hessian backpropagation")

.. math::

    H(x) = \sum_l J_l(x)^\top \operatorname{diag}\big(\sigma_l''(z_l) \odot g_l\big) J_l(x)
           \; + \; J_{out}^\top C \, J_{out},

where :math:`z_l` is the input of the :math:`l`-th activation, :math:`J_l = \partial z_l /
\partial x`, :math:`g_l = \partial y / \partial \sigma_l(z_l)` and :math:`C` is the curvature
of an optional loss with respect to the network output. The Jacobians are propagated forward
as batched ``[B, n, width]`` matrices (so every ``Linear`` is one large GEMM) and the
:math:`g_l` come from a single backward pass batched over the selected outputs, so the whole
Hessian costs about one forward pass with ``n`` tangents plus one backward pass, instead of
``n`` Hessian-vector products. When the layers before the first activation narrow the input
(``k < n`` features), the Hessian is computed with respect to that affine prefix's output and
projected back, ``H = A^T H_k A``.

`StructuredEngine` (in `torchcurv.engines`) is its face to the engine interface:
:func:`torchcurv.per_sample_hessian` uses it for ``mode="structured"`` and, when
:func:`prefer_structured` predicts it faster, for ``mode="auto"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._compat import global_module_hooks
from .._errors import TorchcurvError, UnsupportedModuleError
from .._runner import Work
from . import Request, embedded, trace_coefficients

__all__ = [
    "StructuredEngine",
    "prefer_structured",
    "structured_cost",
    "structured_input_hessian",
    "unsupported_layer",
]

_FN = "structured_input_hessian"


def _fail(
    argument: str,
    problem: str,
    got: str,
    fix: str,
    *,
    fn: str = _FN,
    error: type[TorchcurvError] = TorchcurvError,
) -> NoReturn:
    """Raise ``error`` with the house message: function, argument, what came in, the fix."""
    raise error(f"{fn}: {argument} {problem}, got {got}. {fix}")


# --------------------------------------------------------------------------------------------
# Layer parsing
# --------------------------------------------------------------------------------------------

_ActKind = Literal[
    "tanh", "sigmoid", "softplus", "gelu", "gelu_tanh", "silu", "relu", "leaky", "elu"
]

_SUPPORTED_NAMES = (
    "Linear, Tanh, Sigmoid, Softplus, GELU, SiLU, ReLU, LeakyReLU, ELU, Identity, "
    "Flatten, Unflatten, Dropout (eval mode or p=0), nested Sequential"
)


@dataclass(frozen=True)
class _Linear:
    name: str
    weight: Tensor
    bias: Tensor | None


@dataclass(frozen=True)
class _Act:
    name: str
    kind: _ActKind
    p1: float = 0.0  # beta / negative_slope / alpha
    p2: float = 0.0  # softplus threshold

    @property
    def curved(self) -> bool:
        """Whether the activation can have a non-zero second derivative."""
        return self.kind not in ("relu", "leaky")


@dataclass(frozen=True)
class _Flatten:
    name: str
    start_dim: int
    end_dim: int


@dataclass(frozen=True)
class _Unflatten:
    name: str
    dim: int
    sizes: tuple[int, ...]


_Op = _Linear | _Act | _Flatten | _Unflatten


def _plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """True if ``module`` is a ``cls`` whose forward is not overridden."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _act_of(name: str, m: nn.Module) -> _Act | None:
    if _plain(m, nn.Tanh):
        return _Act(name, "tanh")
    if _plain(m, nn.Sigmoid):
        return _Act(name, "sigmoid")
    if isinstance(m, nn.Softplus) and _plain(m, nn.Softplus):
        return _Act(name, "softplus", float(m.beta), float(m.threshold))
    if isinstance(m, nn.GELU) and _plain(m, nn.GELU):
        if m.approximate == "tanh":
            return _Act(name, "gelu_tanh")
        if m.approximate == "none":
            return _Act(name, "gelu")
        return None
    if _plain(m, nn.SiLU):
        return _Act(name, "silu")
    if _plain(m, nn.ReLU):
        return _Act(name, "relu")
    if isinstance(m, nn.LeakyReLU) and _plain(m, nn.LeakyReLU):
        return _Act(name, "leaky", float(m.negative_slope))
    if isinstance(m, nn.ELU) and _plain(m, nn.ELU):
        return _Act(name, "elu", float(m.alpha))
    return None


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _parse(module: nn.Module, prefix: str = "") -> list[_Op] | str:
    """Flatten ``module`` into a list of ops, or return the reason it is unsupported."""
    label = prefix or "<root>"
    if _has_hooks(module):
        return (
            f"layer {label} ({type(module).__name__}) has forward hooks, which are not supported"
        )
    if _plain(module, nn.Sequential):
        ops: list[_Op] = []
        for child_name, child in module.named_children():
            sub = _parse(child, f"{prefix}.{child_name}" if prefix else child_name)
            if isinstance(sub, str):
                return sub
            ops.extend(sub)
        return ops
    if isinstance(module, nn.Linear) and _plain(module, nn.Linear):
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            return f"layer {label} (LazyLinear) is not initialised yet; run one forward pass first"
        return [_Linear(label, module.weight, module.bias)]
    act = _act_of(label, module)
    if act is not None:
        return [act]
    if isinstance(module, nn.Flatten) and _plain(module, nn.Flatten):
        if module.start_dim == 0:
            return f"layer {label} (Flatten) flattens the batch dimension (start_dim=0)"
        return [_Flatten(label, module.start_dim, module.end_dim)]
    if isinstance(module, nn.Unflatten) and _plain(module, nn.Unflatten):
        if not isinstance(module.dim, int) or module.dim == 0:
            return f"layer {label} (Unflatten) must unflatten a per-sample dim given as an int"
        sizes = module.unflattened_size
        if not all(isinstance(s, int) for s in sizes):
            return f"layer {label} (Unflatten) must use integer sizes"
        return [_Unflatten(label, module.dim, tuple(int(s) for s in sizes))]
    if _plain(module, nn.Identity):
        return []
    if isinstance(module, nn.Dropout) and _plain(module, nn.Dropout):
        if module.training and module.p > 0:
            return (
                f"layer {label} (Dropout) is in training mode with p={module.p}, which makes the "
                "function random; call module.eval() or use p=0"
            )
        return []
    return (
        f"layer {label} ({type(module).__name__}) is not supported; supported: {_SUPPORTED_NAMES}"
    )


def unsupported_layer(module: nn.Module) -> str | None:
    """Explain why ``module`` cannot use the structured Hessian path.

    Args:
        module: The network to check.

    Returns:
        ``None`` if every layer is supported by :func:`structured_input_hessian`, otherwise a
        human-readable reason naming the first unsupported layer by its qualified name.

    Example:
        >>> unsupported_layer(nn.Sequential(nn.Linear(2, 3), nn.Tanh())) is None
        True
        >>> print(unsupported_layer(nn.Sequential(nn.Linear(2, 3), nn.Conv1d(1, 1, 1))))
        ... # doctest: +ELLIPSIS
        layer 1 (Conv1d) is not supported; supported: Linear, Tanh, ...
    """
    parsed = _parse(module)
    return parsed if isinstance(parsed, str) else None


# --------------------------------------------------------------------------------------------
# Shape propagation (shared by the computation and the cost model)
# --------------------------------------------------------------------------------------------


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _out_shape(op: _Op, cur: tuple[int, ...], fn: str, arg: str) -> tuple[int, ...]:
    """Per-sample output shape of ``op`` for per-sample input shape ``cur``; raises on mismatch."""
    full = len(cur) + 1  # including the batch dimension
    got = f"per-sample shape {cur} at layer {op.name}"
    if isinstance(op, _Linear):
        in_f = op.weight.shape[1]
        if len(cur) == 0 or cur[-1] != in_f:
            _fail(
                arg,
                f"does not fit layer {op.name} (Linear), which expects per-sample features "
                f"whose last dim is {in_f}",
                got,
                "Pass inputs of the right shape or add an nn.Flatten() before the layer.",
                fn=fn,
            )
        return (*cur[:-1], op.weight.shape[0])
    if isinstance(op, _Act):
        return cur
    if isinstance(op, _Flatten):
        start, end = _norm_dim(op.start_dim, full), _norm_dim(op.end_dim, full)
        if not (1 <= start < full and 1 <= end < full) or start > end:
            _fail(
                "module",
                f"has layer {op.name} (Flatten(start_dim={op.start_dim}, "
                f"end_dim={op.end_dim})), which must flatten per-sample feature dims only",
                got,
                "Use nn.Flatten(start_dim=1) so the batch dimension is kept.",
                fn=fn,
                error=UnsupportedModuleError,
            )
        i, j = start - 1, end - 1
        return (*cur[:i], math.prod(cur[i : j + 1]), *cur[j + 1 :])
    dim = _norm_dim(op.dim, full)
    sizes = list(op.sizes)
    if 1 <= dim < full and sizes.count(-1) == 1:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = cur[dim - 1] // known if known else 0
    if not 1 <= dim < full or math.prod(sizes) != cur[dim - 1]:
        _fail(
            "module",
            f"has layer {op.name} (Unflatten(dim={op.dim}, {op.sizes})), which must unflatten "
            "a per-sample feature dim of matching size",
            got,
            "Fix the Unflatten sizes or the input shape.",
            fn=fn,
            error=UnsupportedModuleError,
        )
    return (*cur[: dim - 1], *sizes, *cur[dim:])


def _shapes(
    ops: Sequence[_Op], feature_shape: tuple[int, ...], fn: str = _FN, arg: str = "x"
) -> list[tuple[int, ...]]:
    """Per-sample shapes before each op and after the last one (``len(ops) + 1`` entries)."""
    shapes = [feature_shape]
    for op in ops:
        shapes.append(_out_shape(op, shapes[-1], fn, arg))
    return shapes


# --------------------------------------------------------------------------------------------
# Activation derivatives (exactly matching torch's autograd formulas, including boundaries)
# --------------------------------------------------------------------------------------------


def _act_derivs(act: _Act, z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Return ``(sigma(z), sigma'(z), sigma''(z))``; ``sigma''`` is ``None`` when identically 0."""
    k = act.kind
    if k == "tanh":
        t = torch.tanh(z)
        d1 = 1 - t * t
        return t, d1, -2 * t * d1
    if k == "sigmoid":
        s = torch.sigmoid(z)
        d1 = s * (1 - s)
        return s, d1, d1 * (1 - 2 * s)
    if k == "softplus":
        beta, thr = act.p1, act.p2
        bz = z * beta
        s = torch.sigmoid(bz)
        # torch: linear region for beta*z > threshold in value/first derivative, but the second
        # derivative is only non-zero for beta*z < threshold (exactly as autograd computes it).
        d1 = torch.where(bz > thr, torch.ones_like(s), s)
        d2 = (s * (1 - s) * beta) * (bz < thr)
        return F.softplus(z, beta, thr), d1, d2
    if k == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return z * cdf, cdf + z * pdf, pdf * (2 - z * z)
    if k == "gelu_tanh":
        c, a = math.sqrt(2 / math.pi), 0.044715
        z2 = z * z
        t = torch.tanh(c * (z + a * z2 * z))
        sech2 = 1 - t * t
        du = c * (1 + 3 * a * z2)
        d1 = 0.5 * (1 + t) + 0.5 * z * sech2 * du
        d2 = sech2 * (du + 0.5 * z * (6 * a * c * z - 2 * t * du * du))
        return F.gelu(z, approximate="tanh"), d1, d2
    if k == "silu":
        s = torch.sigmoid(z)
        ds = s * (1 - s)
        return z * s, s + z * ds, ds * (2 + z * (1 - 2 * s))
    if k == "relu":
        pos = z > 0
        return torch.relu(z), pos.to(z.dtype), None
    if k == "leaky":
        return F.leaky_relu(z, act.p1), torch.full_like(z, act.p1).masked_fill_(z > 0, 1.0), None
    # elu: first derivative uses z <= 0, autograd's second derivative uses z < 0.
    alpha = act.p1
    e = torch.exp(z) * alpha
    d1 = torch.where(z <= 0, e, torch.ones_like(e))
    d2 = e * (z < 0)
    return F.elu(z, alpha), d1, d2


# --------------------------------------------------------------------------------------------
# Argument validation helpers
# --------------------------------------------------------------------------------------------

_LOSSES = "torch.nn.functional.cross_entropy or torch.nn.functional.mse_loss"


def _select_outputs(output: int | slice | None, m: int) -> tuple[list[int], bool]:
    """Indices of the selected (flattened) outputs and whether the result is per-output."""
    if output is None:
        return list(range(m)), m != 1
    if isinstance(output, slice):
        idx = list(range(m))[output]
        if not idx:
            _fail(
                "output",
                f"selects no outputs of the network, which has {m} (flattened) outputs per sample",
                repr(output),
                "Pass a non-empty slice, an int or None.",
            )
        return idx, True
    if isinstance(output, bool) or not isinstance(output, int):
        _fail(
            "output",
            "must be None, an int or a slice",
            f"{type(output).__name__} {output!r}",
            "Pass output=None (all outputs), an index such as output=0, or a slice.",
        )
    if not -m <= output < m:
        _fail(
            "output",
            f"is out of range for a network with {m} (flattened) outputs per sample",
            str(output),
            f"Pass an index in [{-m}, {m - 1}].",
        )
    return [output % m], False


_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _targets_problem(
    loss: Callable[..., Tensor], targets: Tensor, b: int, out_shape: tuple[int, ...]
) -> tuple[str, str, str, str] | None:
    """Why the structured path cannot use `targets` with `loss`, as `_fail`'s
    ``(argument, problem, got, fix)``, or None if it can."""
    m = math.prod(out_shape)
    if loss is F.cross_entropy:
        if len(out_shape) != 1:
            return (
                "loss",
                "is cross_entropy, which needs a 1-D per-sample output of class logits",
                f"per-sample output shape {out_shape}",
                "Flatten the network output or use loss=F.mse_loss.",
            )
        if targets.dtype in _INTEGER_DTYPES:
            if targets.shape != (b,):
                return (
                    "targets",
                    f"of class indices must have shape ({b},), one per sample",
                    f"shape {tuple(targets.shape)}",
                    "Pass one class index per sample.",
                )
            if b and bool(((targets < 0) | (targets >= m)).any()):
                return (
                    "targets",
                    f"must hold class indices in [0, {m - 1}]",
                    f"values in [{int(targets.min())}, {int(targets.max())}]",
                    "Fix the targets; ignore_index is not supported by the structured path.",
                )
            return None
        if targets.is_floating_point():
            if targets.shape != (b, m):
                return (
                    "targets",
                    f"of class probabilities must have shape ({b}, {m})",
                    f"shape {tuple(targets.shape)}",
                    "Pass one probability vector per sample.",
                )
            return None
        return (
            "targets",
            "for cross_entropy must be integer class indices or floating class probabilities",
            f"dtype {targets.dtype}",
            "Convert the targets with .long() or .float().",
        )
    if loss is F.mse_loss:
        if tuple(targets.shape) != (b, *out_shape):
            return (
                "targets",
                f"for mse_loss must have the output's shape {(b, *out_shape)}",
                f"shape {tuple(targets.shape)}",
                "Reshape the targets to the network output's shape.",
            )
        if not targets.is_floating_point():
            return (
                "targets",
                "for mse_loss must be floating point",
                f"dtype {targets.dtype}",
                "Convert the targets with .to(x.dtype).",
            )
        return None
    return None


def _loss_grad_and_curv(
    loss: Callable[..., Tensor], out: Tensor, targets: Tensor, out_shape: tuple[int, ...]
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Loss gradient w.r.t. the flat output ``[B, m]`` and a ``J -> J C J^T`` closure."""
    b, m = out.shape
    problem = _targets_problem(loss, targets, b, out_shape)
    if problem is not None:
        _fail(*problem)
    if loss is F.cross_entropy:
        p = torch.softmax(out, dim=-1)
        if targets.dtype in _INTEGER_DTYPES:
            onehot = F.one_hot(targets.long(), m).to(out.dtype)
            grad = p - onehot
            scale: Tensor | None = None
        else:
            t = targets.to(out.dtype)
            scale = t.sum(dim=-1)
            grad = p * scale[:, None] - t

        def ce_term(jac: Tensor) -> Tensor:  # jac: [B, n, m]
            ps = p if scale is None else p * scale[:, None]
            jp = jac @ ps.unsqueeze(-1)  # [B, n, 1]
            h = (jac * ps.unsqueeze(1)) @ jac.transpose(-1, -2)
            if scale is None:
                return h - jp @ jp.transpose(-1, -2)
            jq = jac @ p.unsqueeze(-1)
            return h - (jq * scale[:, None, None]) @ jq.transpose(-1, -2)

        return grad, ce_term
    if loss is F.mse_loss:
        grad = (out - targets.reshape(b, m).to(out.dtype)) * (2.0 / m)

        def mse_term(jac: Tensor) -> Tensor:
            return (jac @ jac.transpose(-1, -2)) * (2.0 / m)

        return grad, mse_term
    _unsupported_loss(loss)


def _unsupported_loss(loss: object) -> NoReturn:
    _fail(
        "loss",
        f"is not supported by the structured path, which supports {_LOSSES} (identity check)",
        getattr(loss, "__qualname__", repr(loss)),
        "Use one of those, or a generic mode such as per_sample_hessian(mode='fwd-over-rev') "
        "for other losses.",
    )


# --------------------------------------------------------------------------------------------
# The structured Hessian
# --------------------------------------------------------------------------------------------


def _fold_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``a [..., k]`` and a matrix ``b [k, o]`` as one GEMM (never a bmm)."""
    return (a.reshape(-1, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[-1])


def _apply_reshape(t: Tensor, lead: int, shape: tuple[int, ...]) -> Tensor:
    """Reshape the trailing per-sample dims of ``t`` (``lead`` leading dims kept)."""
    return t.reshape(*t.shape[:lead], *shape)


def structured_input_hessian(
    module: nn.Module,
    x: Tensor,
    *,
    output: int | slice | None = None,
    loss: Callable[..., Tensor] | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """Exact per-sample input Hessians of a ``Linear``/activation stack.

    Uses Hessian backpropagation: ``H = sum_l J_l^T diag(sigma_l''(z_l) * g_l) J_l`` (plus
    ``J_out^T C J_out`` for a loss), with the Jacobians ``J_l = dz_l/dx`` propagated forward as
    batched matrices and the output gradients ``g_l`` from one batched backward pass.

    Args:
        module: An ``nn.Sequential`` (possibly nested) of ``nn.Linear``, ``nn.Tanh``,
            ``nn.Sigmoid``, ``nn.Softplus``, ``nn.GELU`` (``'none'``/``'tanh'``), ``nn.SiLU``,
            ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.ELU``, ``nn.Identity``, ``nn.Flatten``/
            ``nn.Unflatten`` of per-sample dims and ``nn.Dropout`` in eval mode (or ``p=0``).
            A single supported layer is accepted too.
        x: Inputs ``[B, *feature_shape]``; ``n = prod(feature_shape)``.
        output: Which (flattened) per-sample outputs to differentiate. ``None``: all of them
            (a single output gives ``[B, *fs, *fs]``, ``m > 1`` outputs give
            ``[B, m, *fs, *fs]``); an ``int``: that output, ``[B, *fs, *fs]``; a ``slice``:
            ``[B, len, *fs, *fs]``. Must be ``None`` when ``loss`` is given.
        loss: ``F.cross_entropy`` or ``F.mse_loss``, applied per sample as
            ``loss(out_i.unsqueeze(0), targets_i.unsqueeze(0))`` with reduction ``'mean'``.
        targets: Per-sample targets for ``loss``: class indices ``[B]`` or probabilities
            ``[B, m]`` for cross entropy, ``[B, *out_shape]`` for MSE.

    Returns:
        The per-sample Hessians, ``[B, *fs, *fs]`` or ``[B, m, *fs, *fs]``, with the dtype and
        device of ``x``. Differentiable with respect to ``x`` and the parameters.

    Raises:
        UnsupportedModuleError: If ``module`` contains an unsupported layer, a forward hook or
            a ``Dropout`` with ``p > 0`` in training mode.
        TorchcurvError: For shape mismatches, an out-of-range ``output``, an unsupported
            ``loss`` or malformed ``targets``. Both are ``ValueError`` subclasses.

    Example:
        A one-hidden-layer ``tanh`` network ``y = v^T tanh(W x + b)`` has the closed form
        ``H = W^T diag(tanh''(W x + b) * v) W`` with ``tanh'' = -2 tanh (1 - tanh^2)``:

        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1, bias=False))
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> net = net.double()
        >>> H = structured_input_hessian(net, x)
        >>> H.shape
        torch.Size([4, 3, 3])
        >>> W, b, v = net[0].weight, net[0].bias, net[2].weight[0]
        >>> t = torch.tanh(x @ W.T + b)
        >>> closed = torch.einsum("ip,bi,iq->bpq", W, -2 * t * (1 - t**2) * v, W)
        >>> torch.allclose(H, closed)
        True
    """
    parsed = _parse(module)
    if isinstance(parsed, str):
        raise UnsupportedModuleError(
            f"{_FN}: module cannot use the structured path, got {type(module).__name__} in "
            f"which {parsed}. Use per_sample_hessian(mode='fwd-over-rev') or replace the layer."
        )
    ops = parsed
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        _fail(
            "x",
            "must be a floating-point tensor [B, *feature_shape]",
            (
                f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
                if isinstance(x, Tensor)
                else type(x).__name__
            ),
            "Pass a batch of floating-point inputs.",
        )
    for op in ops:
        if isinstance(op, _Linear) and op.weight.dtype != x.dtype:
            _fail(
                "x",
                f"must have the dtype of layer {op.name} (Linear), {op.weight.dtype}",
                f"dtype {x.dtype}",
                "Convert one of them, e.g. module.to(x.dtype).",
            )
    if loss is None and targets is not None:
        _fail(
            "targets",
            "was given without `loss`",
            f"Tensor(shape={tuple(targets.shape)})",
            "Pass loss=F.cross_entropy or loss=F.mse_loss, or drop targets.",
        )
    if loss is not None:
        if targets is None:
            _fail("loss", "needs `targets`", "targets=None", "Pass one target per sample.")
        if output is not None:
            _fail(
                "output",
                "must be None when `loss` is given (the loss uses the full output)",
                repr(output),
                "Pass output=None.",
            )
        if loss is not F.cross_entropy and loss is not F.mse_loss:
            _unsupported_loss(loss)

    bsz = x.shape[0]
    fs = tuple(x.shape[1:])
    n = math.prod(fs)
    shapes = _shapes(ops, fs)
    m_all = math.prod(shapes[-1])
    idx: list[int] | None = None
    per_output = False
    if loss is None:
        idx, per_output = _select_outputs(output, m_all)
    msel = 1 if idx is None else len(idx)
    need_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(isinstance(o, _Linear) and o.weight.requires_grad for o in ops)
    )

    prefix = _plan(ops, shapes, float(bsz), float(msel))[0]
    if prefix == 0:
        hess = _core(ops, shapes, x, idx, loss, targets, need_grad)
    else:
        # The layers before the first activation form an affine map a0 = A x + b with a
        # narrower output (k < n): compute the Hessian w.r.t. a0, then H = A^T H_a0 A.
        a0 = x
        jac: Tensor | None = None  # [n, *shape]: the Jacobian of the prefix (batch-free)
        for i in range(prefix):
            op = ops[i]
            if isinstance(op, _Linear):
                a0 = F.linear(a0, op.weight, op.bias)
                if jac is None and len(shapes[i]) == 1:
                    jac = op.weight.t()
                    continue
                if jac is None:
                    jac = torch.eye(n, dtype=x.dtype, device=x.device).reshape(n, *shapes[i])
                jac = _fold_mm(jac, op.weight.t())
            else:
                a0 = _apply_reshape(a0, 1, shapes[i + 1])
                if jac is not None:
                    jac = _apply_reshape(jac, 1, shapes[i + 1])
        assert jac is not None
        k = math.prod(shapes[prefix])
        jf = jac.reshape(n, k)
        h_a0 = _core(ops[prefix:], shapes[prefix:], a0, idx, loss, targets, need_grad)
        right = _fold_mm(h_a0, jf.t())  # [B, msel, k, n] = H_a0 A
        hess = _fold_mm(right.transpose(-1, -2), jf.t())  # (H_a0 A)^T A = A^T H_a0 A

    if per_output:
        return hess.reshape(bsz, msel, *fs, *fs)
    return hess.reshape(bsz, *fs, *fs)


def _core(
    ops: Sequence[_Op],
    shapes: Sequence[tuple[int, ...]],
    x: Tensor,
    idx: list[int] | None,
    loss: Callable[..., Tensor] | None,
    targets: Tensor | None,
    need_grad: bool,
) -> Tensor:
    """Hessian backpropagation; returns ``[B, msel, n, n]`` (``msel = 1`` with a loss)."""
    bsz = x.shape[0]
    n = math.prod(shapes[0])
    out_shape = shapes[-1]
    m_all = math.prod(out_shape)
    dtype, device = x.dtype, x.device

    # ---- 1. forward pass: activation derivatives -----------------------------------------
    a = x
    d1s: dict[int, Tensor] = {}
    d2s: dict[int, Tensor] = {}
    for i, op in enumerate(ops):
        if isinstance(op, _Linear):
            a = F.linear(a, op.weight, op.bias)
        elif isinstance(op, _Act):
            a, d1, d2 = _act_derivs(op, a)
            d1s[i] = d1
            if d2 is not None:
                d2s[i] = d2
        else:
            a = _apply_reshape(a, 1, shapes[i + 1])

    # ---- 2. backward pass: the cotangents and the curvature weights c_l -----------------
    out_term: Callable[[Tensor], Tensor] | None = None
    if idx is None:
        assert loss is not None
        assert targets is not None
        grad, out_term = _loss_grad_and_curv(loss, a.reshape(bsz, m_all), targets, out_shape)
        g: Tensor = grad.unsqueeze(1)  # [B, 1, m]
        g_batched = True
        msel = 1
    else:
        msel = len(idx)
        g = torch.eye(m_all, dtype=dtype, device=device)[idx]  # [msel, m] shared over batch
        g_batched = False
    g = _apply_reshape(g, 2 if g_batched else 1, out_shape)

    curv_idx = sorted(d2s)
    first_curv = curv_idx[0] if curv_idx else len(ops)
    last_needed = len(ops) if out_term is not None else (curv_idx[-1] if curv_idx else -1)
    cs: dict[int, Tensor] = {}
    for i in range(len(ops) - 1, first_curv - 1, -1):
        op = ops[i]
        if isinstance(op, _Linear):
            g = _fold_mm(g, op.weight)
        elif isinstance(op, _Act):
            d1 = d1s[i].unsqueeze(1)
            if i in d2s:
                cs[i] = d2s[i].unsqueeze(1) * g  # [B, msel, *shape]
            if i > first_curv:
                g = d1 * g
                g_batched = True
        else:
            g = _apply_reshape(g, 2 if g_batched else 1, shapes[i])

    # ---- 3. forward Jacobian propagation and curvature accumulation ----------------------
    hess: Tensor | None = None  # [B, msel, n, n]; None while still zero

    def accumulate(contrib: Tensor) -> Tensor:
        if hess is None:
            return contrib
        if need_grad:
            return hess + contrib
        return hess.add_(contrib)

    jac: Tensor | None = None  # None: identity; [n, *shape]: shared; [B, n, *shape]: batched
    batched = False
    for i in range(len(ops) if out_term is not None else last_needed + 1):
        op = ops[i]
        if isinstance(op, _Linear):
            if jac is None:
                if len(shapes[i]) == 1:
                    jac = op.weight.t().contiguous()  # [n, out]
                    continue
                jac = torch.eye(n, dtype=dtype, device=device).reshape(n, *shapes[i])
            jac = _fold_mm(jac, op.weight.t())
        elif isinstance(op, _Act):
            if i in cs:
                k = math.prod(shapes[i])
                c = cs[i].reshape(bsz, msel, k)
                if jac is None:
                    hess = accumulate(torch.diag_embed(c))
                elif not batched:  # one GEMM: [B * msel * n, k] @ [k, n]
                    jf = jac.reshape(n, k)
                    hess = accumulate(_fold_mm(c.unsqueeze(2) * jf, jf.t()))
                else:  # batched: [B, msel * n, k] @ [B, k, n]
                    jf = jac.reshape(bsz, n, k)
                    left = (c.unsqueeze(2) * jf.unsqueeze(1)).reshape(bsz, msel * n, k)
                    if hess is None:
                        hess = torch.bmm(left, jf.transpose(1, 2)).view(bsz, msel, n, n)
                    elif need_grad:
                        hv = hess.view(bsz, msel * n, n)
                        hess = torch.baddbmm(hv, left, jf.transpose(1, 2)).view_as(hess)
                    else:
                        hess.view(bsz, msel * n, n).baddbmm_(left, jf.transpose(1, 2))
            if i == last_needed and out_term is None:
                break
            d1 = d1s[i]
            if jac is None:
                jac = torch.diag_embed(d1.reshape(bsz, n)).reshape(bsz, n, *shapes[i])
            elif not batched:
                jac = d1.unsqueeze(1) * jac
            elif need_grad:
                jac = jac * d1.unsqueeze(1)
            else:
                jac.mul_(d1.unsqueeze(1))
            batched = True
        elif jac is not None:
            jac = _apply_reshape(jac, 2 if batched else 1, shapes[i + 1])

    if out_term is not None:
        if jac is None:
            jo = torch.eye(n, dtype=dtype, device=device).expand(bsz, n, n)
        elif not batched:
            jo = jac.reshape(n, m_all).expand(bsz, n, m_all)
        else:
            jo = jac.reshape(bsz, n, m_all)
        hess = accumulate(out_term(jo).unsqueeze(1))
    if hess is None:
        hess = torch.zeros(bsz, msel, n, n, dtype=dtype, device=device)
    return hess


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------

# Machine constants, in units of "one flop inside a large float32 GEMM" on the development CPU
# (2 cores, ~148 GFLOP/s), fitted by non-negative least squares over 19 shapes with
# `python benchmarks/structured_calibration.py --fit` (median relative error 0.10). The fit
# puts batched small matmuls at 0.17; they are clamped to 1 (never cheaper than a big GEMM).
_ELEM_COST = 18.0  # one element read or written by an elementwise kernel
_BMM_COST = 1.0  # per flop of a batched matmul of small matrices (vs a large GEMM)
_OP_COST_STRUCTURED = 1.5e6  # fixed cost per kernel launched by the structured path (~10 us)
_OP_COST_GENERIC = 7.7e6  # fixed cost per kernel under vmap(jacfwd(jacrev)) (~50 us)

_Terms = dict[str, float]


def _new_terms() -> _Terms:
    return {"gemm": 0.0, "bmm": 0.0, "elem": 0.0, "ops": 0.0}


def _mm(t: _Terms, rows: float, k: float, cols: float) -> None:
    """Count an ``[rows, k] @ [k, cols]`` GEMM: flops, memory traffic, one kernel."""
    t["gemm"] += 2.0 * rows * k * cols
    t["elem"] += rows * k + k * cols + rows * cols
    t["ops"] += 1.0


def _linear_dims(op: _Linear, k_in: float) -> tuple[float, float, float]:
    din, dout = float(op.weight.shape[1]), float(op.weight.shape[0])
    return k_in / din, din, dout


def _struct_terms(
    ops: Sequence[_Op], shapes: Sequence[tuple[int, ...]], bsz: float, m: float
) -> _Terms:
    """Counts for :func:`_core` on ``ops`` (input ``shapes[0]``), mirroring its three sweeps."""
    t = _new_terms()
    n = float(math.prod(shapes[0]))
    curved = [isinstance(op, _Act) and op.curved for op in ops]
    first_curv = curved.index(True) if any(curved) else len(ops)
    last_curv = len(curved) - 1 - curved[::-1].index(True) if any(curved) else -1
    t["elem"] += bsz * m * n * n * max(1, sum(curved))  # result init / accumulation
    t["ops"] += 6.0
    jac = "none"  # none (identity) / shared / batched
    for i, op in enumerate(ops):
        k_in = float(math.prod(shapes[i]))
        k = float(math.prod(shapes[i + 1]))
        if isinstance(op, _Linear):
            rows, din, dout = _linear_dims(op, k_in)
            _mm(t, bsz * rows, din, dout)  # forward
            if i > first_curv:  # backward; shared over the batch until the last activation
                down_act = any(isinstance(o, _Act) for o in ops[i + 1 :])
                _mm(t, (bsz if down_act else 1.0) * m * rows, dout, din)
            if i < last_curv:  # Jacobian propagation
                if jac == "batched":
                    _mm(t, bsz * n * rows, din, dout)
                elif jac == "shared" or len(shapes[i]) != 1:
                    _mm(t, n * rows, din, dout)
                else:
                    t["elem"] += n * k
                jac = "batched" if jac == "batched" else "shared"
        elif isinstance(op, _Act):
            t["elem"] += 6.0 * bsz * k  # value and derivatives
            t["ops"] += 8.0
            if i >= first_curv:  # c = sigma'' * g and g * sigma'
                t["elem"] += 2.0 * bsz * m * k
                t["ops"] += 2.0
            if curved[i]:
                t["ops"] += 3.0
                if jac == "none":
                    t["elem"] += bsz * m * n * n
                else:
                    t["elem"] += 2.0 * bsz * m * n * k
                    t["bmm" if jac == "batched" else "gemm"] += 2.0 * bsz * m * n * n * k
            if i < last_curv:  # J * sigma'
                t["elem"] += bsz * n * k * (1.0 if jac == "none" else 2.0)
                t["ops"] += 1.0
                jac = "batched"
        else:
            t["ops"] += 1.0
    return t


def _generic_terms(
    ops: Sequence[_Op], shapes: Sequence[tuple[int, ...]], bsz: float, m: float
) -> _Terms:
    """Counts for ``vmap(jacfwd(jacrev(f)))``: a forward pass, ``m`` backward passes and ``n``
    forward-over-reverse Hessian-vector products."""
    t = _new_terms()
    n = float(math.prod(shapes[0]))
    curved = [isinstance(op, _Act) and op.curved for op in ops]
    t["elem"] += 2.0 * bsz * m * n * n  # assembling and permuting the result
    t["ops"] += 12.0
    for i, op in enumerate(ops):
        k_in = float(math.prod(shapes[i]))
        k = float(math.prod(shapes[i + 1]))
        if isinstance(op, _Linear):
            rows, din, dout = _linear_dims(op, k_in)
            _mm(t, bsz * rows, din, dout)  # forward
            _mm(t, bsz * m * rows, dout, din)  # backward (m cotangents)
            _mm(t, bsz * n * rows, din, dout)  # tangent forward (n tangents)
            if any(curved[i + 1 :]):  # tangent of the backward pass
                _mm(t, bsz * n * m * rows, dout, din)
        elif isinstance(op, _Act):
            t["elem"] += 3.0 * bsz * k + 4.0 * bsz * m * k + 4.0 * bsz * n * k
            t["ops"] += 10.0
            if curved[i]:
                t["elem"] += 10.0 * bsz * n * m * k
                t["ops"] += 6.0
        else:
            t["ops"] += 2.0
    return t


def _weigh_structured(t: _Terms) -> float:
    return (
        t["gemm"] + _BMM_COST * t["bmm"] + _ELEM_COST * t["elem"] + _OP_COST_STRUCTURED * t["ops"]
    )


def _weigh_generic(t: _Terms) -> float:
    return t["gemm"] + _BMM_COST * t["bmm"] + _ELEM_COST * t["elem"] + _OP_COST_GENERIC * t["ops"]


def _plan(
    ops: Sequence[_Op], shapes: Sequence[tuple[int, ...]], bsz: float, m: float
) -> tuple[int, _Terms]:
    """Choose whether to reduce through the affine prefix (the layers before the first
    activation) when it narrows the input, ``k < n``; return the prefix length (0: do not
    reduce) and the structured cost counts of the chosen plan."""
    full = _struct_terms(ops, shapes, bsz, m)
    p = next((i for i, o in enumerate(ops) if isinstance(o, _Act)), len(ops))
    if not any(isinstance(o, _Linear) for o in ops[:p]):
        return 0, full
    n = float(math.prod(shapes[0]))
    k = float(math.prod(shapes[p]))
    if k >= n:
        return 0, full
    red = _struct_terms(ops[p:], shapes[p:], bsz, m)
    jac_started = False
    for i in range(p):
        op = ops[i]
        if isinstance(op, _Linear):
            rows, din, dout = _linear_dims(op, float(math.prod(shapes[i])))
            _mm(red, bsz * rows, din, dout)
            if jac_started or len(shapes[i]) != 1:
                _mm(red, n * rows, din, dout)
            jac_started = True
    # H = A^T H_a0 A: two GEMMs and a transposed copy
    red["gemm"] += 2.0 * bsz * m * (k * k * n + k * n * n)
    red["elem"] += bsz * m * (k * k + 3.0 * k * n + n * n)
    red["ops"] += 4.0
    return (p, red) if _weigh_structured(red) < _weigh_structured(full) else (0, full)


def _cost_terms(
    ops: Sequence[_Op], shapes: Sequence[tuple[int, ...]], bsz: float, m: float
) -> dict[str, float]:
    """Raw counts of both paths, keys ``s_*`` (structured, chosen plan) and ``g_*`` (generic)."""
    s = _plan(ops, shapes, bsz, m)[1]
    g = _generic_terms(ops, shapes, bsz, m)
    return {**{f"s_{k}": v for k, v in s.items()}, **{f"g_{k}": v for k, v in g.items()}}


def structured_cost(
    module: nn.Module,
    x_shape: tuple[int, ...],
    *,
    n_outputs_selected: int,
    dtype_bytes: int,
) -> dict[str, float]:
    """Predict the cost of the structured path and of the generic ``vmap(hessian)`` path.

    The model counts, layer by layer, matrix-multiply flops, elementwise memory traffic and
    launched kernels, and weighs them with machine constants fitted by
    ``benchmarks/structured_calibration.py --fit`` (in units of one large-GEMM flop). The
    structured path costs a forward pass, a backward pass with ``m`` cotangents, a forward
    pass with ``n`` tangents and the curvature contractions (``2 B m n^2 width`` flops per
    curved activation; when the layers before the first activation narrow the input to
    ``k < n`` features, ``n`` is replaced by ``k`` and a final ``A^T H A`` projection is
    added if that is cheaper). The generic path (``vmap(jacfwd(jacrev(f)))``) costs a forward
    pass, ``m`` backward passes and ``n`` forward-over-reverse Hessian-vector products
    (``~4x`` a forward pass each).

    Args:
        module: A network accepted by :func:`structured_input_hessian`.
        x_shape: The input shape ``[B, *feature_shape]``.
        n_outputs_selected: ``m``, the number of output Hessians requested (1 for a loss).
        dtype_bytes: Bytes per element (4 for float32, 8 for float64).

    Returns:
        ``{"structured_flops", "generic_flops", "structured_bytes", "generic_bytes"}``: the
        predicted cost in flop equivalents and the predicted peak memory of the intermediates
        (bytes) of both paths.

    Raises:
        UnsupportedModuleError: If ``module`` is not supported.
        TorchcurvError: If ``x_shape`` does not fit the module.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
        >>> cost = structured_cost(net, (128, 8), n_outputs_selected=1, dtype_bytes=4)
        >>> cost["structured_flops"] < cost["generic_flops"]
        True
    """
    parsed = _parse(module)
    if isinstance(parsed, str):
        raise UnsupportedModuleError(
            f"structured_cost: module cannot use the structured path, got "
            f"{type(module).__name__} in which {parsed}. Check unsupported_layer(module) first."
        )
    ops = parsed
    bsz = float(x_shape[0])
    fs = tuple(int(s) for s in x_shape[1:])
    shapes = _shapes(ops, fs, "structured_cost", "x_shape")
    m = float(max(1, n_outputs_selected))
    n = float(math.prod(fs))
    prefix, s_terms = _plan(ops, shapes, bsz, m)
    g_terms = _generic_terms(ops, shapes, bsz, m)

    # Peak memory: the result plus the largest simultaneously live intermediates.
    nj = float(math.prod(shapes[prefix])) if prefix else n  # rows of the propagated Jacobian
    kmax = max(float(math.prod(s)) for s in shapes)
    act_total = sum(
        float(math.prod(shapes[i + 1])) for i, o in enumerate(ops) if isinstance(o, _Act)
    )
    hess = bsz * m * n * n
    s_bytes = hess + bsz * act_total * (2.0 + m) + bsz * kmax * nj * (3.0 + 2.0 * m)
    if prefix:
        s_bytes += 2.0 * bsz * m * nj * (nj + n)
    # generic: saved activations and their tangents, the tangent cotangents, the result twice
    g_bytes = 2.0 * hess + bsz * act_total * (3.0 + 2.0 * n) + bsz * kmax * 3.0 * n * m
    return {
        "structured_flops": _weigh_structured(s_terms),
        "generic_flops": _weigh_generic(g_terms),
        "structured_bytes": s_bytes * dtype_bytes,
        "generic_bytes": g_bytes * dtype_bytes,
    }


def prefer_structured(
    module: nn.Module,
    x_shape: tuple[int, ...],
    *,
    n_outputs_selected: int,
    dtype_bytes: int,
) -> bool:
    """The ``mode="auto"`` rule: supported by the structured path and predicted faster.

    Args:
        module: The network.
        x_shape: The input shape ``[B, *feature_shape]``.
        n_outputs_selected: Number of output Hessians requested (1 for a loss).
        dtype_bytes: Bytes per element.

    Returns:
        ``True`` if :func:`structured_input_hessian` supports ``module`` with inputs of shape
        ``x_shape`` and :func:`structured_cost` predicts it to be faster than the generic path.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
        >>> prefer_structured(net, (128, 8), n_outputs_selected=1, dtype_bytes=4)
        True
        >>> prefer_structured(nn.Conv1d(1, 1, 1), (2, 1, 4), n_outputs_selected=1, dtype_bytes=4)
        False
    """
    if unsupported_layer(module) is not None:
        return False
    try:
        cost = structured_cost(
            module, x_shape, n_outputs_selected=n_outputs_selected, dtype_bytes=dtype_bytes
        )
    except TorchcurvError:
        return False
    return cost["structured_flops"] < cost["generic_flops"]


# --------------------------------------------------------------------------------------------
# The engine interface
# --------------------------------------------------------------------------------------------


class StructuredEngine:
    """Hessian backpropagation as an engine (see `torchcurv.engines`)."""

    name = "structured"

    def __init__(self) -> None:
        from .diagonals import ParameterDiagonals

        #: per-sample diagonals of parameter curvature (`torchcurv.engines.diagonals`)
        self.diagonals = ParameterDiagonals()

    def _of_parameters(self, request: Request) -> bool:
        return request.objective.wrt == "params" and request.quantity in (
            "diagonal",
            "ggn_diagonal",
        )

    def obstacle(self, request: Request) -> str | None:
        """Why this engine cannot compute `request`, or None if it can."""
        obj = request.objective
        if request.order != 2:
            return "it computes Hessians only"
        if self._of_parameters(request):
            return self.diagonals.obstacle(request)
        if request.quantity == "hvp":
            return "it forms whole Hessians, and a Hessian-vector product needs none"
        if request.quantity == "ggn":
            return "it computes Gauss-Newton diagonals, not whole Gauss-Newton matrices"
        if request.quantity == "ggn_diagonal":
            return "it computes Gauss-Newton diagonals of the parameters only (wrt='params')"
        if request.method != "exact":
            return f"it computes exact quantities, not a {request.method} estimate"
        if obj.wrt != "inputs":
            return f"it differentiates with respect to the inputs only, got wrt={obj.wrt!r}"
        if len(obj.xs) != 1 or obj.kwargs:
            return "the module must take one input tensor and no keyword arguments"
        if isinstance(obj.output, bool) or not (
            obj.output is None or isinstance(obj.output, (int, slice))
        ):
            return f"output must be None, an int or a slice, got {obj.output!r}"
        if obj.loss is not None and obj.loss not in (F.cross_entropy, F.mse_loss):
            return "loss must be torch.nn.functional.cross_entropy or mse_loss"
        hooks = global_module_hooks()
        if hooks:
            return f"global module hooks are registered ({', '.join(hooks)})"
        for path, layer in obj.module.named_modules():
            if isinstance(layer, nn.modules.dropout._DropoutNd) and layer.training and layer.p > 0:
                return f"{type(layer).__name__} at {path!r} is in training mode"
        reason = unsupported_layer(obj.module)
        if reason is not None:
            return reason
        parsed = _parse(obj.module)
        assert not isinstance(parsed, str)
        try:
            out_dims = len(_shapes(parsed, tuple(obj.xs[0].shape[1:]))[-1])
        except TorchcurvError as error:
            return str(error)
        if out_dims != 1 and (obj.output is not None or obj.loss is not None):
            return (
                "output= and loss= need a one-dimensional per-sample output, and this "
                f"network's has {out_dims} dims"
            )
        if obj.loss is not None and obj.targets is not None:
            out_shape = _shapes(parsed, tuple(obj.xs[0].shape[1:]))[-1]
            problem = _targets_problem(obj.loss, obj.targets, obj.targets.shape[0], out_shape)
            if problem is not None:
                argument, text, got, _ = problem
                return f"its {argument} {text}, got {got}"
        return None

    def predicted_faster(self, request: Request) -> bool:
        if self._of_parameters(request):
            return self.diagonals.predicted_faster(request)
        x = request.objective.xs[0]
        return prefer_structured(
            request.objective.module,
            tuple(x.shape),
            n_outputs_selected=request.out_numel,
            dtype_bytes=x.element_size(),
        )

    def axes(self, request: Request) -> tuple[int, ...]:
        return ()

    def work(self, request: Request, chunks: tuple[int | None, ...]) -> Work:
        if self._of_parameters(request):
            return self.diagonals.work(request, chunks)
        obj = request.objective
        features = tuple(obj.xs[0].shape[1:])

        def batched(x: Tensor, _: object, targets: Tensor | None, *rest: object) -> Tensor:
            try:
                with torch.set_grad_enabled(obj.create_graph):
                    hess = structured_input_hessian(
                        obj.module,
                        x,
                        output=obj.output,  # type: ignore[arg-type]
                        loss=obj.loss,
                        targets=targets,
                    )
            except TorchcurvError as error:
                text = str(error).replace(f"{_FN}:", f"{request.function}:", 1)
                raise type(error)(text) from None
            if request.quantity == "hessian":
                return hess.reshape(x.shape[0], *request.out_shape, *features, *features)
            n = math.prod(features)
            diagonal = hess.reshape(x.shape[0], -1, n, n).diagonal(dim1=2, dim2=3)
            if request.quantity == "trace":
                vectors = rest[1] if len(rest) > 1 else None
                _, weights, sigma = trace_coefficients(request, vectors)
                if sigma is not None:  # tr(sigma^T H sigma), sigma shared or per sample
                    sigma = embedded(sigma, request.coordinates, n)
                    pattern = "byij,bik,bjk->by" if sigma.dim() == 3 else "byij,ik,jk->by"
                    traces = torch.einsum(pattern, hess.reshape(x.shape[0], -1, n, n),
                                          sigma, sigma)  # fmt: skip
                    return traces.reshape(x.shape[0], *request.out_shape)
                if request.coordinates is not None:
                    diagonal = diagonal[..., list(request.coordinates)]
                if weights is not None:  # [D], or [b, D] per sample
                    diagonal = diagonal * (weights if weights.dim() == 1 else weights[:, None])
                return diagonal.sum(-1).reshape(x.shape[0], *request.out_shape)
            return diagonal.reshape(x.shape[0], *request.out_shape, *features)

        return Work(batched)
