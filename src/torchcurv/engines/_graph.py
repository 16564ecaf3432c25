"""What the graph engines (the parameter diagonals, Taylor mode) share: the module's
torch.fx graph, the obstacles to taking it, which arguments of a node depend on the
differentiated tensors, and the tables of ops by how they act on such an argument."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._compat import global_module_hooks
from .._objective import Objective

# Modules, functions and methods linear in their (one) parameter-dependent argument.
LINEAR_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
SUMS = {operator.add, operator.sub, torch.add, torch.sub, torch.cat, torch.stack}
LINEAR_FUNCTIONS = {
    operator.neg,
    operator.pos,
    operator.getitem,
    torch.flatten,
    torch.reshape,
    torch.sum,
    torch.mean,
    torch.transpose,
    torch.permute,
    torch.squeeze,
    torch.unsqueeze,
    torch.neg,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}
SCALINGS = {operator.mul, operator.truediv, torch.mul, torch.div}
LINEAR_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "unsqueeze",
    "squeeze", "sum", "mean", "neg", "t", "expand", "unflatten", "__getitem__",
}  # fmt: skip
SUM_METHODS = {"add", "sub"}
SCALING_METHODS = {"mul", "div"}
# Elementwise ops with a second derivative (rows of their own) ...
CURVED_FUNCTIONS = {
    torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.gelu, F.silu, F.softplus, F.elu,
    F.mish, F.logsigmoid, torch.sin, torch.cos, torch.exp, torch.erf,
}  # fmt: skip
CURVED_METHODS = {"tanh", "sigmoid", "sin", "cos", "exp", "erf"}
CURVED_MODULES = (nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.SiLU, nn.ELU, nn.Mish)
# ... and piecewise-linear ones (none; max pooling picks an entry: linear a.e.).
KINKED_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.relu6, F.hardtanh}
KINKED_METHODS = {"relu"}
KINKED_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip


def plain_module(m: nn.Module, kinds: tuple[type[nn.Module], ...]) -> bool:
    return (
        isinstance(m, kinds)
        and type(m).forward is next(k for k in type(m).__mro__ if k in kinds).forward
    )


def has_hooks(module: nn.Module) -> str | None:
    hooks = global_module_hooks()
    if hooks:
        return f"global module hooks are registered ({', '.join(hooks)})"
    for path, m in module.named_modules():
        if (
            m._forward_hooks
            or m._forward_pre_hooks
            or m._backward_hooks
            or getattr(m, "_backward_pre_hooks", None)
        ):
            return f"the module at {path or '<root>'!r} ({type(m).__name__}) has hooks"
    return None


def live_args(n: fx.Node, live: set[str]) -> list[int]:
    """Positions of the arguments of `n` that depend on the differentiated tensors (the
    `live` nodes; -1 for a keyword argument)."""
    found = []
    for i, arg in enumerate(n.args):
        nodes: list[fx.Node] = []
        fx.node.map_arg(arg, nodes.append)
        if any(m.name in live for m in nodes):
            found.append(i)
    for arg in n.kwargs.values():
        nodes = []
        fx.node.map_arg(arg, nodes.append)
        if any(m.name in live for m in nodes):
            found.append(-1)
    return found


def traced(obj: Objective) -> fx.GraphModule | str:
    """The torch.fx graph of `obj`'s module (standard ``torch.nn`` layers are its
    leaves), or why a graph engine cannot take it: hooks (the interpreter would not run
    them), a forward that writes buffers, or one torch.fx cannot trace."""
    hooks = has_hooks(obj.module)
    if hooks:
        return hooks
    if obj.written:
        return "the forward writes buffers"
    try:
        return fx.symbolic_trace(obj.module)
    except Exception as error:  # tracing fails in many ways, none of them ours
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"torch.fx cannot trace the module ({type(error).__name__}: {first})"
